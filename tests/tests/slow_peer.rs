//! A sender faster than its peer, on the sockhash path: the brake holds the sender back while
//! the peer catches up, and then the kernel carries the stream again.
//!
//! Client, daemon and target share one network namespace; its loopback sends the peer's
//! packets (those to the target's port for an upload, from the daemon's port for a download)
//! through an HTB class of 200 Mbit/s, far less than a sender on loopback manages even on a
//! loaded machine, so the redirect backlog grows until the brake engages. (Loopback rather
//! than veth: its sockets are near, under 50 µs, even under load, and near sockets are the
//! ones whose receive buffer the daemon sets and may shut.) Releasing a brake means moving the
//! bytes held meanwhile through the daemon; if the sender refilled the hold as fast as the
//! daemon drained it, the hold would never empty, the kernel would never redirect again, and
//! the daemon would copy the rest of the stream itself (before the release kept the window
//! shut: one brake, and 62-74 % of this stream moved by the daemon; with it, three brakes and
//! 31-37 %).

use std::{net::SocketAddr, process::Command, time::Duration};

use proxy_integration::{
    netns::{self, Netns},
    poll_until, recv_exact, send_pattern, socks, within, Daemon, DaemonOpts, DataPath, Task,
};
use rstest::rstest;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const LIMIT: Duration = Duration::from_secs(60);
const LEN: u64 = 64 << 20;
const SEED: u64 = 0x510e_0001;

/// Which way the bulk stream goes, and so whose link is the slow one.
#[derive(Clone, Copy, Debug)]
enum Way {
    /// Client to target: the target's side is slow.
    Up,
    /// Target to client: the client's side is slow.
    Down,
}

/// `tc -n NS ...`, checked.
fn tc(ns: &Netns, args: &[&str]) {
    let out = Command::new("tc")
        .args(["-n", ns.name()])
        .args(args)
        .output()
        .expect("run tc");
    assert!(
        out.status.success(),
        "tc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Loopback packets whose `field` (`sport` or `dport`) is `port` go at most 200 Mbit/s; the
/// rest are not held back.
fn shape(ns: &Netns, field: &str, port: u16) {
    let port = port.to_string();
    tc(
        ns,
        &[
            "qdisc", "replace", "dev", "lo", "root", "handle", "1:", "htb", "default", "1",
        ],
    );
    for (class, rate) in [("1:1", "100gbit"), ("1:2", "200mbit")] {
        tc(
            ns,
            &[
                "class", "add", "dev", "lo", "parent", "1:", "classid", class, "htb", "rate", rate,
                "burst", "256k", "cburst", "256k",
            ],
        );
    }
    tc(
        ns,
        &[
            "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
        ]
        .into_iter()
        .chain(["match", "ip", field, &port, "0xffff", "flowid", "1:2"])
        .collect::<Vec<_>>(),
    );
}

/// A TCP connection from inside `ns`, for tokio.
fn connect_in(ns: &Netns, to: SocketAddr) -> TcpStream {
    let s = ns
        .enter(|| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("connect {to} in {}: {e}", ns.name()));
    s.set_nonblocking(true).expect("nonblocking");
    TcpStream::from_std(s).expect("tokio TCP stream")
}

#[rstest]
#[case::upload(Way::Up)]
#[case::download(Way::Down)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_brake_the_kernel_carries_again(#[case] way: Way) {
    if !netns::require("a sockhash session to a slower peer") {
        return;
    }
    let ns = Netns::new(format!("ebx-slow-{}-{way:?}", std::process::id()));
    let daemon = Daemon::start(DaemonOpts {
        wrapper: vec!["nsenter".into(), format!("--net={}", ns.path())],
        ..DaemonOpts::path(DataPath::Sockmap)
    });
    let listener = ns
        .enter(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("target listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let target_addr = listener.local_addr().expect("target address");
    match way {
        Way::Up => shape(&ns, "dport", target_addr.port()),
        Way::Down => shape(&ns, "sport", daemon.addr().port()),
    }
    let accept = Task::spawn(async move { listener.accept().await.map(|(s, _)| s) });
    let mut client = connect_in(&ns, daemon.addr());
    client
        .write_all(&socks::greeting())
        .await
        .expect("greeting");
    socks::read_method(&mut client).await.expect("method");
    client
        .write_all(&socks::request(socks::CMD_CONNECT, &target_addr.into()))
        .await
        .expect("request");
    let reply = socks::read_reply(&mut client).await.expect("reply");
    assert_eq!(
        reply.code,
        socks::REP_SUCCEEDED,
        "CONNECT failed: {reply:?}"
    );
    let target = accept
        .join(LIMIT, "the target's accept")
        .await
        .expect("accept");
    poll_until(LIMIT, "the session to enter the sockhash", |_| {
        (daemon.stats().counter("sessions_active_sockmap") == 1).then_some(())
    })
    .await;
    let (mut from, mut to) = match way {
        Way::Up => (client, target),
        Way::Down => (target, client),
    };
    let sender = Task::spawn(async move {
        send_pattern(&mut from, SEED, LEN).await.expect("send");
        from.shutdown().await.expect("shutdown");
        from
    });
    within(LIMIT, "the stream", recv_exact(&mut to, SEED, LEN))
        .await
        .unwrap_or_else(|e| panic!("{way:?}: {e}"));
    let mut rest = Vec::new();
    within(LIMIT, "the end of the stream", to.read_to_end(&mut rest))
        .await
        .expect("read to EOF");
    assert!(
        rest.is_empty(),
        "{way:?}: {} bytes past the stream",
        rest.len()
    );
    let from = sender.join(LIMIT, "the sender").await;

    let s = daemon.stats();
    let (brakes, moved) = (
        s.counter("sockmap_brakes"),
        s.counter("sockmap_brake_bytes"),
    );
    let report = format!(
        "{way:?}: {brakes} brake(s), the daemon moved {moved} of {LEN} bytes ({:.0} %)",
        moved as f64 * 100.0 / LEN as f64
    );
    eprintln!("{report}");
    // A brake needs 8 MiB of redirect backlog, which only bytes the kernel redirects make: a
    // second one shows that the kernel carried the stream again after the first.
    assert!(brakes >= 1, "{report}: the peer never fell behind");
    assert!(
        brakes >= 2,
        "{report}: after the first brake the kernel never carried the stream again"
    );
    drop((from, to));
    daemon.stop();
}
