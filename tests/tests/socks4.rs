//! SOCKS4 CONNECT (IPv4 literal) and SOCKS4a (host name resolved by the daemon).

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use proxy_integration::{
    exchange, require_privileged, socks4, wait_closed, within, Daemon, DaemonOpts, DataPath, Echo,
    Plan,
};
use rstest::rstest;
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(20);
const LEN: u64 = 1 << 20;

fn v4(a: SocketAddr) -> SocketAddrV4 {
    match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("{a} is not IPv4"),
    }
}

/// 1 MiB through the echo target, checked on return.
async fn echo(s: &mut TcpStream, seed: u64, what: &str) {
    within(
        LIMIT,
        what,
        exchange(
            s,
            Plan {
                send: Some((seed, LEN)),
                recv: (seed, LEN),
            },
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks4_connect_ipv4(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::path(path));
    let target = Echo::start("127.0.0.1:0").await;
    let req = socks4::request(socks4::CMD_CONNECT, v4(target.addr), "tester");
    let (mut s, reply) = socks4::handshake(daemon.addr(), &req)
        .await
        .unwrap_or_else(|e| panic!("SOCKS4 CONNECT: {e}"));
    assert_eq!(
        reply.code,
        socks4::GRANTED,
        "SOCKS4 CONNECT reply {reply:?}"
    );
    echo(&mut s, 0x5004_0001, "SOCKS4 echo").await;
    daemon.stop();
}

#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks4a_connect_localhost(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::path(path));
    // `localhost` resolves to 127.0.0.1 here (and maybe ::1 too); the daemon tries its
    // addresses in order, so serve the same port on both when possible.
    let target = Echo::start("127.0.0.1:0").await;
    let _v6 = match tokio::net::TcpListener::bind(("::1", target.addr.port())).await {
        Ok(l) => Some(Echo::serve(l)),
        Err(_) => None,
    };
    let req = socks4::request_4a(
        socks4::CMD_CONNECT,
        "localhost",
        target.addr.port(),
        "tester",
    );
    let (mut s, reply) = socks4::handshake(daemon.addr(), &req)
        .await
        .unwrap_or_else(|e| panic!("SOCKS4a CONNECT: {e}"));
    assert_eq!(
        reply.code,
        socks4::GRANTED,
        "SOCKS4a CONNECT reply {reply:?}"
    );
    echo(&mut s, 0x5004_0002, "SOCKS4a echo").await;
    daemon.stop();
}

/// A refused connection gets 91 (request rejected or failed), then the daemon closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks4_refused_port_gets_91() {
    if !require_privileged("SOCKS4") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::default());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The listener is dropped: nothing listens on `port` any more.
    let req = socks4::request(
        socks4::CMD_CONNECT,
        SocketAddrV4::new([127, 0, 0, 1].into(), port),
        "",
    );
    let (mut s, reply) = socks4::handshake(daemon.addr(), &req)
        .await
        .unwrap_or_else(|e| panic!("SOCKS4 CONNECT to a closed port: {e}"));
    assert_eq!(reply.code, socks4::REJECTED, "SOCKS4 reply {reply:?}");
    wait_closed(&mut s, Duration::from_secs(2), "after a SOCKS4 rejection").await;
    daemon.stop();
}
