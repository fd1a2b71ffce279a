//! BIND (RFC 1928 section 6, and SOCKS4): the daemon listens, tells the client where, waits
//! for the expected peer, names it in a second reply, then relays.
//!
//! The test plays both the client and the "target" that connects back. Only a peer whose
//! address is the request's DST.ADDR may be handed over (Dante's check); the listener goes
//! away when the client abandons its control connection.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use proxy_integration::{
    checks::{assert_path_used, wait_counter, wait_sessions_drained},
    exchange, poll_until, require_privileged, send_and_recv,
    socks::{self, tcp_connect_from, Target},
    socks4, wait_closed, within, Daemon, DaemonOpts, DataPath, Plan,
};
use rstest::rstest;
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(30);
const LEN: u64 = 1 << 20;
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Sends BIND for `expected` (port 0: the peer's port is not known in advance) in SOCKS
/// `version` and returns the control connection and the address of the first reply.
async fn bind_request(daemon: &Daemon, version: u8, expected: IpAddr) -> (TcpStream, SocketAddr) {
    match version {
        5 => {
            let (s, reply) = socks::handshake(
                daemon.addr(),
                socks::CMD_BIND,
                &Target::Ip(SocketAddr::new(expected, 0)),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("SOCKS5 BIND: {e}"));
            assert_eq!(
                reply.code,
                socks::REP_SUCCEEDED,
                "first BIND reply {reply:?}"
            );
            let Target::Ip(bound) = reply.bound else {
                panic!("first BIND reply names a domain: {reply:?}")
            };
            (s, bound)
        }
        4 => {
            let IpAddr::V4(v4) = expected else {
                unreachable!("SOCKS4 is IPv4 only")
            };
            let req = socks4::request(socks4::CMD_BIND, SocketAddrV4::new(v4, 0), "tester");
            let (s, reply) = socks4::handshake(daemon.addr(), &req)
                .await
                .unwrap_or_else(|e| panic!("SOCKS4 BIND: {e}"));
            assert_eq!(
                reply.code,
                socks4::GRANTED,
                "first SOCKS4 BIND reply {reply:?}"
            );
            (s, SocketAddr::V4(reply.addr))
        }
        _ => unreachable!(),
    }
}

/// Reads the second reply; returns (success, the address it names).
async fn second_reply(ctl: &mut TcpStream, version: u8) -> (bool, SocketAddr) {
    match version {
        5 => {
            let r = within(LIMIT, "second BIND reply", socks::read_reply(ctl))
                .await
                .unwrap_or_else(|e| panic!("second BIND reply: {e}"));
            let Target::Ip(a) = r.bound else {
                panic!("second BIND reply names a domain: {r:?}")
            };
            (r.code == socks::REP_SUCCEEDED, a)
        }
        _ => {
            let r = within(LIMIT, "second SOCKS4 BIND reply", socks4::read_reply(ctl))
                .await
                .unwrap_or_else(|e| panic!("second SOCKS4 BIND reply: {e}"));
            (r.code == socks4::GRANTED, SocketAddr::V4(r.addr))
        }
    }
}

/// The first reply must name an address a peer can connect to.
fn check_bound(bound: SocketAddr) {
    assert!(
        bound.port() != 0 && !bound.ip().is_unspecified() && bound.ip().is_loopback(),
        "first BIND reply names {bound}; expected a loopback address with a port"
    );
}

/// BIND, the peer connects from 127.0.0.1, both replies are right, then 1 MiB each way.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_relays_both_ways(
    #[values(DataPath::Sockmap, DataPath::Splice)] path: DataPath,
    #[values(5, 4)] version: u8,
) {
    if !require_privileged(&path.feature()) {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::path(path));
    let (mut ctl, bound) = bind_request(&daemon, version, LOCALHOST).await;
    check_bound(bound);

    let mut peer = tcp_connect_from(LOCALHOST, bound)
        .await
        .unwrap_or_else(|e| panic!("peer connecting to the BIND address {bound}: {e}"));
    let peer_addr = peer.local_addr().unwrap();
    let (ok, named) = second_reply(&mut ctl, version).await;
    assert!(ok, "second BIND reply is a failure (names {named})");
    assert_eq!(
        named, peer_addr,
        "second BIND reply must name the peer that connected"
    );

    const UP: u64 = 0xb1d0_0001;
    const DOWN: u64 = 0xb1d0_0002;
    within(LIMIT, "1 MiB each way through BIND", async {
        tokio::try_join!(
            send_and_recv(&mut ctl, (UP, LEN), (DOWN, LEN)),
            send_and_recv(&mut peer, (DOWN, LEN), (UP, LEN)),
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{path}, SOCKS{version} BIND transfer: {e}"));
    within(LIMIT, "closing the BIND session", async {
        tokio::try_join!(
            exchange(&mut ctl, Plan::close()),
            exchange(&mut peer, Plan::sink(0, 0))
        )
    })
    .await
    .unwrap_or_else(|e| panic!("closing: {e}"));

    wait_counter(&daemon, "binds_total", 1).await;
    assert_path_used(&daemon, path, 1).await;
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}

/// BIND expecting 127.0.0.2; a peer from 127.0.0.1 must not be handed over. With
/// `bind = "1s"` the client then gets a failure reply or a close, never a success.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_refuses_unexpected_peer(#[values(5, 4)] version: u8) {
    if !require_privileged("BIND") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: "[timeouts]\nbind = \"1s\"\n".into(),
        ..DaemonOpts::default()
    });
    let (mut ctl, bound) = bind_request(&daemon, version, OTHER).await;
    let t0 = Instant::now();
    check_bound(bound);

    let mut rogue = tcp_connect_from(LOCALHOST, bound)
        .await
        .unwrap_or_else(|e| panic!("rogue peer connecting to {bound}: {e}"));
    // The daemon must drop the rogue connection, and send it nothing.
    let (_, got) = wait_closed(
        &mut rogue,
        Duration::from_secs(5),
        "connection from an unexpected address",
    )
    .await;
    assert!(
        got.is_empty(),
        "the unexpected peer received {} bytes",
        got.len()
    );

    // The client: a failure reply or a close, within a few seconds of the 1 s timeout.
    let mut head = [0u8; 2];
    let r = within(
        Duration::from_secs(6),
        "client waiting for the end of the BIND",
        tokio::io::AsyncReadExt::read_exact(&mut ctl, &mut head),
    )
    .await;
    match r {
        Ok(_) => {
            let code = head[1];
            let success = match version {
                5 => code == socks::REP_SUCCEEDED,
                _ => code == socks4::GRANTED,
            };
            assert!(
                !success,
                "SOCKS{version}: second reply {head:02x?} is a success although only an unexpected peer connected"
            );
            eprintln!(
                "SOCKS{version}: failure reply {code:#04x} after {:?}",
                t0.elapsed()
            );
        }
        Err(e) => eprintln!(
            "SOCKS{version}: control connection closed ({e}) after {:?}",
            t0.elapsed()
        ),
    }
    wait_counter(&daemon, "binds_total", 1).await;
    daemon.stop();
}

/// After refusing an unexpected peer the daemon keeps waiting, and the expected peer
/// (127.0.0.2) is handed over and named in the second reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_waits_past_unexpected_peer() {
    if !require_privileged("BIND") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::default());
    let (mut ctl, bound) = bind_request(&daemon, 5, OTHER).await;
    check_bound(bound);

    let mut rogue = tcp_connect_from(LOCALHOST, bound).await.expect("rogue");
    wait_closed(
        &mut rogue,
        Duration::from_secs(5),
        "connection from an unexpected address",
    )
    .await;

    let mut peer = tcp_connect_from(OTHER, bound)
        .await
        .unwrap_or_else(|e| panic!("expected peer (127.0.0.2) connecting to {bound}: {e}"));
    let (ok, named) = second_reply(&mut ctl, 5).await;
    assert!(ok, "second BIND reply is a failure (names {named})");
    assert_eq!(named, peer.local_addr().unwrap(), "second BIND reply");
    within(LIMIT, "64 KiB each way", async {
        tokio::try_join!(
            send_and_recv(&mut ctl, (1, 65_536), (2, 65_536)),
            send_and_recv(&mut peer, (2, 65_536), (1, 65_536)),
        )
    })
    .await
    .unwrap_or_else(|e| panic!("transfer: {e}"));
    within(LIMIT, "closing the BIND session", async {
        tokio::try_join!(
            exchange(&mut ctl, Plan::close()),
            exchange(&mut peer, Plan::sink(0, 0))
        )
    })
    .await
    .unwrap_or_else(|e| panic!("closing: {e}"));
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}

/// A client closing its control connection abandons the BIND: the listener goes away.
/// The probes come from an unexpected address, so they cannot end the BIND themselves.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_ends_when_client_closes(#[values(5, 4)] version: u8) {
    if !require_privileged("BIND") {
        return;
    }
    // Default bind timeout (2 min): only the close can end it within the test.
    let daemon = Daemon::start(DaemonOpts::default());
    let (ctl, bound) = bind_request(&daemon, version, OTHER).await;
    check_bound(bound);
    drop(ctl);
    poll_until(
        Duration::from_secs(5),
        "the BIND listener to refuse connections after the client closed",
        |last| {
            let r = std::net::TcpStream::connect_timeout(&bound, Duration::from_secs(1));
            *last = format!("connect to {bound}: {r:?}");
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
                _ => None,
            }
        },
    )
    .await;
    daemon.stop();
}
