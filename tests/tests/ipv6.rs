//! IPv6 and domain-name targets.

use std::time::Duration;

use proxy_integration::{
    exchange, require_privileged, skip_or_panic,
    socks::{self, Target},
    within, Daemon, DaemonOpts, DataPath, Echo, Plan,
};
use rstest::rstest;
use tokio::net::TcpListener;

const LIMIT: Duration = Duration::from_secs(20);
const LEN: u64 = 1 << 20;

fn ipv6_loopback() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// Echoes through `target` and checks the bytes.
async fn echo_through(daemon: &Daemon, target: Target, seed: u64, what: &str) {
    let (mut s, reply) = socks::handshake(daemon.addr(), socks::CMD_CONNECT, &target, None)
        .await
        .unwrap_or_else(|e| panic!("{what}: handshake: {e}"));
    assert_eq!(reply.code, socks::REP_SUCCEEDED, "{what}: reply {reply:?}");
    within(
        LIMIT,
        what,
        exchange(
            &mut s,
            Plan {
                send: Some((seed, LEN)),
                recv: (seed, LEN),
            },
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// Daemon on [::1], CONNECT with ATYP 4 to an echo target on [::1].
#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_ipv6_through_ipv6_listener(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    if !ipv6_loopback() && !skip_or_panic("IPv6", "cannot bind [::1]") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts {
        listen: vec!["[::1]:0".into()],
        ..DaemonOpts::path(path)
    });
    assert!(
        daemon.addr().is_ipv6(),
        "daemon listens on {}",
        daemon.addr()
    );
    let echo = Echo::start("[::1]:0").await;
    echo_through(
        &daemon,
        Target::Ip(echo.addr),
        0x1960_0001,
        &format!("{path}: IPv6 echo"),
    )
    .await;
    daemon.stop();
}

/// Binds 127.0.0.1 and [::1] on the same port, so `localhost` reaches an
/// echo server whichever address it resolves to.
async fn dual_loopback_echo() -> (Echo, Echo) {
    for _ in 0..50 {
        let v4 = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let port = v4.local_addr().unwrap().port();
        if let Ok(v6) = TcpListener::bind(("::1", port)).await {
            return (Echo::serve(v4), Echo::serve(v6));
        }
    }
    panic!("no port free on both 127.0.0.1 and [::1]");
}

/// CONNECT with ATYP 3 to `localhost:PORT`.
#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_domain_localhost(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::path(path));
    // Without IPv6, `localhost` can only mean 127.0.0.1.
    let (v4, _v6) = if ipv6_loopback() {
        let (v4, v6) = dual_loopback_echo().await;
        (v4, Some(v6))
    } else {
        (Echo::start("127.0.0.1:0").await, None)
    };
    let target = Target::Domain("localhost".into(), v4.addr.port());
    echo_through(
        &daemon,
        target,
        0x1960_0002,
        &format!("{path}: localhost echo"),
    )
    .await;
    daemon.stop();
}

/// Every address of both families at one port, as operators write it:
/// `listen = ["0.0.0.0:P", "[::]:P"]`. On Linux `[::]` also takes IPv4 unless told not to
/// (`net.ipv6.bindv6only` is 0 by default), so binding it after `0.0.0.0` failed with
/// "Address already in use"; the daemon now binds `[::]` to IPv6 alone when an IPv4 address
/// shares its port, and serves IPv4 clients on the one and IPv6 clients on the other. `[::]`
/// alone still serves both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_of_both_families_on_one_port() {
    if !require_privileged("listening on both wildcards") {
        return;
    }
    if !ipv6_loopback() && !skip_or_panic("IPv6", "cannot bind [::1]") {
        return;
    }
    let echo = Echo::start("127.0.0.1:0").await;
    for listen in [
        vec!["0.0.0.0", "[::]"],
        vec!["[::]", "0.0.0.0"],
        vec!["[::]"],
    ] {
        let port = std::net::TcpListener::bind("[::]:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen: Vec<String> = listen.iter().map(|a| format!("{a}:{port}")).collect();
        let daemon = Daemon::start(DaemonOpts {
            listen: listen.clone(),
            ..DaemonOpts::path(DataPath::Splice)
        });
        for client in ["127.0.0.1", "[::1]"] {
            let proxy: std::net::SocketAddr = format!("{client}:{port}").parse().unwrap();
            let mut s = socks::connect(proxy, echo.addr).await;
            within(
                LIMIT,
                "echo",
                exchange(
                    &mut s,
                    Plan {
                        send: Some((7, 4096)),
                        recv: (7, 4096),
                    },
                ),
            )
            .await
            .unwrap_or_else(|e| panic!("{listen:?}, client {client}: {e}"));
            drop(s);
        }
        proxy_integration::checks::wait_sessions_drained(&daemon).await;
        daemon.stop();
    }
}
