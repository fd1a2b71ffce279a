//! UDP ASSOCIATE (RFC 1928 section 7) through the daemon's relay socket.
//!
//! The test holds the client's UDP socket (connected to the relay, so datagrams from any
//! other source never reach it) and the target's UDP socket, and checks every datagram
//! on both sides: headers, payloads, and what the relay drops and counts.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use proxy_integration::dgram::{assert_quiet, recv, recv_from};
use proxy_integration::{
    checks::{wait_counter, wait_gauge, STATS_SETTLE},
    poll_until, require_privileged, skip_or_panic,
    socks::{self, parse_udp_datagram, udp_datagram, Target},
    wait_closed, Daemon, DaemonOpts, Pattern,
};
use rstest::rstest;
use tokio::net::{TcpStream, UdpSocket};

fn ipv6_loopback() -> bool {
    std::net::UdpSocket::bind("[::1]:0").is_ok() && std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// One association: its control connection and the client's socket, connected to the
/// relay address from the reply.
struct Assoc {
    ctl: TcpStream,
    relay: SocketAddr,
    udp: UdpSocket,
}

/// Requests UDP ASSOCIATE with DST = the client socket's own address (so the daemon knows
/// the client's port), and connects that socket to BND.
async fn associate(proxy: SocketAddr, client_bind: &str) -> Assoc {
    let udp = UdpSocket::bind(client_bind)
        .await
        .unwrap_or_else(|e| panic!("bind {client_bind}: {e}"));
    let local = udp.local_addr().unwrap();
    let (ctl, reply) = socks::handshake(proxy, socks::CMD_UDP_ASSOCIATE, &Target::Ip(local), None)
        .await
        .unwrap_or_else(|e| panic!("UDP ASSOCIATE via {proxy}: {e}"));
    assert_eq!(
        reply.code,
        socks::REP_SUCCEEDED,
        "UDP ASSOCIATE reply {reply:?}"
    );
    let Target::Ip(relay) = reply.bound else {
        panic!("UDP ASSOCIATE reply names a domain: {reply:?}")
    };
    assert!(
        relay.port() != 0 && relay.ip() == proxy.ip(),
        "UDP ASSOCIATE reply names {relay}; expected the control connection's local address {} with a port",
        proxy.ip()
    );
    udp.connect(relay).await.expect("connect to the relay");
    Assoc { ctl, relay, udp }
}

/// Client -> relay -> target and back for one payload pair; checks headers and payloads.
/// `dst` is what the client writes in the header; `target_addr` where the datagram must
/// land.
async fn round_trip(a: &Assoc, target: &UdpSocket, dst: &Target, up: &[u8], down: &[u8]) {
    let target_addr = target.local_addr().unwrap();
    a.udp
        .send(&udp_datagram(0, dst, up))
        .await
        .expect("client send");
    let (got, from) = recv_from(target, "target waiting for the relayed datagram").await;
    assert_eq!(got, up, "payload at the target (header must be stripped)");
    assert_eq!(
        from.port(),
        a.relay.port(),
        "the target's datagram came from {from}, not the relay socket {}",
        a.relay
    );
    target.send_to(down, from).await.expect("target reply");
    let d = recv(&a.udp, "client waiting for the relayed reply").await;
    let d = parse_udp_datagram(&d).unwrap_or_else(|e| panic!("reply datagram: {e}"));
    assert_eq!(d.frag, 0, "reply FRAG");
    assert_eq!(
        d.source,
        Target::Ip(target_addr),
        "reply header must name the target"
    );
    assert_eq!(d.data, down, "reply payload");
}

/// Round trips for an IPv4 literal, an IPv6 literal (daemon on [::1]) and the domain
/// `localhost`; the udp/relay traffic rows count exactly the payload bytes and datagrams.
#[rstest]
#[case::ipv4("127.0.0.1", false)]
#[case::ipv6("::1", false)]
#[case::domain("127.0.0.1", true)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_round_trips(#[case] ip: &str, #[case] by_name: bool) {
    if !require_privileged("UDP ASSOCIATE") {
        return;
    }
    let ip: IpAddr = ip.parse().unwrap();
    if ip.is_ipv6() && !ipv6_loopback() && !skip_or_panic("IPv6", "cannot bind [::1]") {
        return;
    }
    let bind = SocketAddr::new(ip, 0).to_string();
    let daemon = Daemon::start(DaemonOpts {
        listen: vec![bind.clone()],
        ..DaemonOpts::default()
    });
    let a = associate(daemon.addr(), &bind).await;
    let target = UdpSocket::bind(&bind).await.unwrap();
    let taddr = target.local_addr().unwrap();
    let dst = if by_name {
        Target::Domain("localhost".into(), taddr.port())
    } else {
        Target::Ip(taddr)
    };

    const N: u64 = 12;
    let (mut up_bytes, mut down_bytes) = (0u64, 0u64);
    for i in 0..N {
        let up = Pattern::bytes(0x0d90_0000 + i, 1 + (i as usize * 113) % 1400);
        let down = Pattern::bytes(0x0d91_0000 + i, 1 + (i as usize * 71) % 1400);
        round_trip(&a, &target, &dst, &up, &down).await;
        up_bytes += up.len() as u64;
        down_bytes += down.len() as u64;
    }

    poll_until(
        STATS_SETTLE,
        &format!("udp/relay rows: up {up_bytes} bytes / {N} datagrams, down {down_bytes} / {N}"),
        |last| {
            let s = daemon.stats();
            let got = (
                s.traffic("udp", "relay", "up"),
                s.traffic_packets("udp", "relay", "up"),
                s.traffic("udp", "relay", "down"),
                s.traffic_packets("udp", "relay", "down"),
            );
            *last = format!("{got:?} in {}", s.json["traffic"]);
            assert!(
                got.0 <= up_bytes && got.2 <= down_bytes,
                "udp/relay counts more bytes than were relayed: {last}"
            );
            (got == (up_bytes, N, down_bytes, N)).then_some(())
        },
    )
    .await;
    // `ebsocks sessions` follows the open association's bytes.
    let client = a.ctl.local_addr().unwrap().to_string();
    let out = std::process::Command::new(proxy_integration::daemon::daemon_binary())
        .args(["sessions", "--json", "--pin-dir"])
        .arg(daemon.pin_dir())
        .output()
        .expect("run ebsocks sessions");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("`ebsocks sessions --json`: {e}: {out:?}"));
    let row = list
        .as_array()
        .and_then(|l| l.iter().find(|s| s["client"].as_str() == Some(&client)))
        .unwrap_or_else(|| panic!("no session of {client} in {list}"));
    assert_eq!(row["state"], "udp", "{row}");
    assert_eq!(
        (row["up_bytes"].as_u64(), row["down_bytes"].as_u64()),
        (Some(up_bytes), Some(down_bytes)),
        "the association's bytes in `ebsocks sessions`: {row}"
    );
    wait_counter(&daemon, "udp_associations_total", 1).await;
    wait_gauge(&daemon, "udp_associations_active", 1).await;
    drop(a);
    wait_gauge(&daemon, "udp_associations_active", 0).await;
    daemon.stop();
}

/// Datagrams with FRAG != 0 are dropped (no reassembly) and counted under
/// `udp_dropped_frag`; an unfragmented one right after goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_frag_is_dropped_and_counted() {
    if !require_privileged("UDP ASSOCIATE") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::default());
    let a = associate(daemon.addr(), "127.0.0.1:0").await;
    let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dst = Target::Ip(target.local_addr().unwrap());
    for frag in [1u8, 0x7f, 0x81] {
        a.udp
            .send(&udp_datagram(
                frag,
                &dst,
                format!("fragment {frag}").as_bytes(),
            ))
            .await
            .unwrap();
    }
    round_trip(&a, &target, &dst, b"whole datagram", b"reply").await;
    assert_quiet(&target, "target after the fragments").await;
    wait_counter(&daemon, "udp_dropped_frag", 3).await;
    drop(a);
    wait_gauge(&daemon, "udp_associations_active", 0).await;
    daemon.stop();
}

/// Datagrams to the relay from sources that are neither the client nor a target the client
/// sent to are dropped and counted under `udp_dropped_foreign`; they reach nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_foreign_sources_are_ignored_and_counted() {
    if !require_privileged("UDP ASSOCIATE") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::default());
    let a = associate(daemon.addr(), "127.0.0.1:0").await;
    let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dst = Target::Ip(target.local_addr().unwrap());
    round_trip(&a, &target, &dst, b"first", b"first reply").await;

    // Same IP as the client, another port (the request pinned the client's port): a
    // well-formed SOCKS datagram for the target must not be relayed.
    let same_ip = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    same_ip
        .send_to(&udp_datagram(0, &dst, b"foreign, same ip"), a.relay)
        .await
        .unwrap();
    // Another address that the client never sent to: its datagram must not reach the client.
    let stranger = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    stranger
        .send_to(b"foreign payload from 127.0.0.2", a.relay)
        .await
        .unwrap();

    assert_quiet(&target, "target after the foreign datagrams").await;
    assert_quiet(&a.udp, "client after the foreign datagrams").await;
    wait_counter(&daemon, "udp_dropped_foreign", 2).await;
    // The association still works, and the foreign datagrams were not queued somewhere.
    round_trip(&a, &target, &dst, b"second", b"second reply").await;
    drop(a);
    wait_gauge(&daemon, "udp_associations_active", 0).await;
    daemon.stop();
}

/// Closing the control connection ends the association: the relay port stops answering
/// (ICMP port unreachable, seen as ECONNREFUSED on the connected client socket) and
/// `udp_associations_active` returns to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_association_ends_with_control_connection() {
    if !require_privileged("UDP ASSOCIATE") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::default());
    let a = associate(daemon.addr(), "127.0.0.1:0").await;
    let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dst = Target::Ip(target.local_addr().unwrap());
    round_trip(&a, &target, &dst, b"ping", b"pong").await;
    wait_gauge(&daemon, "udp_associations_active", 1).await;

    let Assoc { ctl, relay, udp } = a;
    drop(ctl);
    let probe = udp_datagram(0, &dst, b"after close");
    let mut buf = [0u8; 2048];
    let mut relayed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let _ = udp.send(&probe).await;
        match tokio::time::timeout(Duration::from_millis(200), udp.recv(&mut buf)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => {}
        }
        // A probe that still got through means the association lived on for a moment.
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(1), target.recv_from(&mut buf)).await
        {
            relayed += 1;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay {relay} still accepts datagrams 5 s after the control connection closed ({relayed} probes relayed)"
        );
    }
    wait_gauge(&daemon, "udp_associations_active", 0).await;
    wait_counter(&daemon, "udp_associations_total", 1).await;
    daemon.stop();
}

/// With `udp_idle = "1s"`, an association without datagrams ends by itself, and the daemon
/// closes the control connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_idle_association_ends() {
    if !require_privileged("UDP ASSOCIATE") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: "[timeouts]\nudp_idle = \"1s\"\n".into(),
        ..DaemonOpts::default()
    });
    let mut a = associate(daemon.addr(), "127.0.0.1:0").await;
    let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dst = Target::Ip(target.local_addr().unwrap());
    round_trip(&a, &target, &dst, b"ping", b"pong").await;
    let (took, _) = wait_closed(
        &mut a.ctl,
        Duration::from_secs(6),
        "control connection of an idle association",
    )
    .await;
    assert!(
        took >= Duration::from_millis(800),
        "association ended {took:?} after the last datagram, before udp_idle (1 s)"
    );
    wait_gauge(&daemon, "udp_associations_active", 0).await;
    daemon.stop();
}
