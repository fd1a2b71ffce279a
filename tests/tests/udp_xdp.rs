//! The XDP UDP fast path, in a topology of three network namespaces joined by veth pairs:
//! client -- proxy (the daemon, XDP on both of its interfaces) -- target.
//!
//! Proof that a datagram bypassed the relay socket: the XDP counters rise while the proxy
//! namespace's `Udp: InDatagrams` (every datagram delivered to a UDP socket there) and the
//! `udp/relay` traffic rows do not.

use std::net::SocketAddr;

use proxy_integration::dgram::{assert_quiet, recv_from};
use proxy_integration::{
    checks::{wait_gauge, STATS_SETTLE},
    netns::{self, udp_in_datagrams, Topology},
    poll_until, require_privileged, skip_or_panic,
    socks::{self, parse_udp_datagram, udp_datagram, Auth, Target},
    Daemon, DaemonOpts, DataPath, Pattern, Stats,
};
use rstest::rstest;
use tokio::net::{TcpStream, UdpSocket};

fn gate(feature: &str) -> bool {
    if !require_privileged(feature) {
        return false;
    }
    match netns::available() {
        Ok(()) => true,
        Err(e) => skip_or_panic(feature, &e),
    }
}

/// The daemon in the proxy namespace, listening on its client-side address, XDP on p0 and p1.
fn start(t: &Topology, v6: bool, offload: bool, extra: &str) -> Daemon {
    let [n4, n6] = t.networks();
    Daemon::start(DaemonOpts {
        data_path: DataPath::Auto,
        listen: vec![SocketAddr::new(t.proxy_ip(v6), 0).to_string()],
        extra_toml: format!(
            "allow_clients = [\"{n4}\", \"{n6}\"]\n[udp]\nxdp_interfaces = [\"p0\", \"p1\"]\noffload = {offload}\n{extra}"
        ),
        allow_clients: false,
        wrapper: vec!["nsenter".into(), format!("--net={}", t.proxy.path())],
        ..DaemonOpts::default()
    })
}

struct Assoc {
    _ctl: TcpStream,
    relay: SocketAddr,
    udp: UdpSocket,
}

async fn associate(t: &Topology, proxy: SocketAddr, v6: bool) -> Assoc {
    let udp = Topology::udp(&t.client, t.client_ip(v6));
    let local = udp.local_addr().unwrap();
    let tcp = Topology::tcp(&t.client, proxy);
    let (ctl, reply) = socks::handshake_on(
        tcp,
        &Auth::None,
        socks::CMD_UDP_ASSOCIATE,
        &Target::Ip(local),
    )
    .await
    .unwrap_or_else(|e| panic!("UDP ASSOCIATE via {proxy}: {e}"));
    assert_eq!(reply.code, socks::REP_SUCCEEDED, "reply {reply:?}");
    let Target::Ip(relay) = reply.bound else {
        panic!("reply names a domain: {reply:?}")
    };
    udp.connect(relay).await.expect("connect to the relay");
    Assoc {
        _ctl: ctl,
        relay,
        udp,
    }
}

/// Client -> relay -> target and back; checks payloads and headers.
async fn round_trip(a: &Assoc, target: &UdpSocket, dst: &Target, up: &[u8], down: &[u8]) {
    let taddr = target.local_addr().unwrap();
    a.udp
        .send(&udp_datagram(0, dst, up))
        .await
        .expect("client send");
    let (got, from) = recv_from(target, "target waiting for the relayed datagram").await;
    assert_eq!(got.len(), up.len(), "payload length at the target");
    assert!(got == up, "payload at the target differs");
    assert_eq!(from.port(), a.relay.port(), "source port at the target");
    target.send_to(down, from).await.expect("target reply");
    let (d, _) = recv_from(&a.udp, "client waiting for the relayed reply").await;
    let d = parse_udp_datagram(&d).unwrap_or_else(|e| panic!("reply datagram: {e}"));
    assert_eq!(d.frag, 0);
    assert_eq!(
        d.source,
        Target::Ip(taddr),
        "reply header must name the target"
    );
    assert!(
        d.data == down,
        "reply payload differs ({} bytes)",
        d.data.len()
    );
}

fn xdp(s: &Stats, name: &str) -> u64 {
    s.json["xdp"]["counters"][name].as_u64().unwrap_or(0)
}

fn iface(s: &Stats, proto: &str, dir: &str) -> u64 {
    s.json["xdp"]["interfaces"]
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["proto"] == proto && r["dir"] == dir)
                .and_then(|r| r["packets"].as_u64())
        })
        .unwrap_or(0)
}

/// Round trips through the relay: IPv4 and IPv6 literals with offload on and off, and a
/// domain destination (a numeric name, which resolves without DNS). With offload, every
/// datagram after the first of a flow bypasses the relay socket.
#[rstest]
#[case::ipv4_offload(false, true, false)]
#[case::ipv4_userspace(false, false, false)]
#[case::ipv6_offload(true, true, false)]
#[case::ipv6_userspace(true, false, false)]
#[case::domain(false, true, true)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_round_trips(#[case] v6: bool, #[case] offload: bool, #[case] by_name: bool) {
    if !gate("XDP UDP fast path") {
        return;
    }
    let t = Topology::new();
    let daemon = start(&t, v6, offload, "");
    let a = associate(&t, daemon.addr(), v6).await;
    let target = Topology::udp(&t.target, t.target_ip(v6));
    let taddr = target.local_addr().unwrap();
    let dst = if by_name {
        Target::Domain(taddr.ip().to_string(), taddr.port())
    } else {
        Target::Ip(taddr)
    };
    // The first exchange goes through the relay, which installs the flow.
    round_trip(&a, &target, &dst, b"first", b"first reply").await;
    let before = daemon.stats();
    let delivered = udp_in_datagrams(daemon.pid());

    const N: u64 = 20;
    let (mut up_bytes, mut down_bytes) = (0u64, 0u64);
    for i in 0..N {
        let up = Pattern::bytes(0x0d80_0000 + i, 1 + (i as usize * 97) % 1400);
        let down = Pattern::bytes(0x0d81_0000 + i, 1 + (i as usize * 61) % 1400);
        round_trip(&a, &target, &dst, &up, &down).await;
        up_bytes += up.len() as u64;
        down_bytes += down.len() as u64;
    }
    let delivered_after = udp_in_datagrams(daemon.pid());
    // IPv6 flows are not offloaded yet: they pass to the relay, which must stay correct.
    let fast = offload && !by_name && !v6;
    poll_until(STATS_SETTLE, "XDP and relay counters", |last| {
        let s = daemon.stats();
        let rows = |path: &str| {
            (
                s.traffic("udp", path, "up") - before.traffic("udp", path, "up"),
                s.traffic_packets("udp", path, "up") - before.traffic_packets("udp", path, "up"),
                s.traffic("udp", path, "down") - before.traffic("udp", path, "down"),
                s.traffic_packets("udp", path, "down")
                    - before.traffic_packets("udp", path, "down"),
            )
        };
        let (relay, fastpath) = (rows("relay"), rows("xdp"));
        let offloaded = (
            xdp(&s, "xdp_offloaded_up") - xdp(&before, "xdp_offloaded_up"),
            xdp(&s, "xdp_offloaded_down") - xdp(&before, "xdp_offloaded_down"),
        );
        *last = format!(
            "relay {relay:?} xdp {fastpath:?} offloaded {offloaded:?} {}",
            s.json["xdp"]
        );
        assert!(iface(&s, "udp", "rx") > 0, "XDP saw no UDP frame: {last}");
        assert!(iface(&s, "tcp", "rx") > 0, "XDP saw no TCP frame: {last}");
        let want = (up_bytes, N, down_bytes, N);
        if fast {
            assert_eq!(
                relay,
                (0, 0, 0, 0),
                "the relay socket moved offloaded datagrams: {last}"
            );
            (fastpath == want && offloaded == (N, N)).then_some(())
        } else {
            assert_eq!(
                offloaded,
                (0, 0),
                "offloaded with offload off or a domain: {last}"
            );
            (relay == want).then_some(())
        }
    })
    .await;
    if fast {
        assert_eq!(
            delivered_after, delivered,
            "datagrams were delivered to UDP sockets in the proxy namespace while offloaded"
        );
    } else {
        assert!(
            delivered_after >= delivered + 2 * N,
            "the relay socket did not receive the datagrams ({delivered} -> {delivered_after})"
        );
    }
    if by_name {
        let s = daemon.stats();
        assert!(xdp(&s, "xdp_passed_domain") >= N, "{}", s.json["xdp"]);
    }
    drop(a);
    wait_gauge(&daemon, "udp_associations_active", 0).await;
    daemon.stop();
}

/// Datagrams the relay would drop are dropped by XDP, each counted under its reason, and
/// never reach the relay socket (its own drop counters stay put).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_early_drops() {
    if !gate("XDP UDP fast path") {
        return;
    }
    let t = Topology::new();
    let blocked = t.unused_target_ip(false);
    let daemon = start(
        &t,
        false,
        true,
        &format!(
            "[[socks_rule]]\nname = \"no-99\"\naction = \"block\"\nto = [\"{blocked}/32\"]\n\
             [[socks_rule]]\nname = \"rest\"\naction = \"pass\"\n"
        ),
    );
    let a = associate(&t, daemon.addr(), false).await;
    let target = Topology::udp(&t.target, t.target_ip(false));
    let dst = Target::Ip(target.local_addr().unwrap());
    round_trip(&a, &target, &dst, b"ping", b"pong").await;
    // The relay refuses the blocked destination once and tells XDP.
    let forbidden = Target::Ip(SocketAddr::new(blocked, 9));
    a.udp
        .send(&udp_datagram(0, &forbidden, b"blocked"))
        .await
        .unwrap();
    poll_until(STATS_SETTLE, "udp_dropped_blocked == 1", |last| {
        let s = daemon.stats();
        *last = s.json["counters"].to_string();
        (s.counter("udp_dropped_blocked") == 1).then_some(())
    })
    .await;
    let before = daemon.stats();
    let delivered = udp_in_datagrams(daemon.pid());

    const K: u64 = 3;
    for _ in 0..K {
        // Malformed: too short, and an unknown address type.
        a.udp.send(&[0, 0, 0]).await.unwrap();
        a.udp.send(&[0, 0, 0, 9, 1, 2, 3, 4, 0, 80]).await.unwrap();
        // FRAG != 0.
        a.udp
            .send(&udp_datagram(1, &dst, b"fragment"))
            .await
            .unwrap();
        // Forbidden destination.
        a.udp
            .send(&udp_datagram(0, &forbidden, b"blocked"))
            .await
            .unwrap();
    }
    // Foreign: a socket in the target namespace that the client never sent to.
    let stranger = Topology::udp(&t.target, t.target_ip(false));
    for _ in 0..K {
        stranger.send_to(b"foreign", a.relay).await.unwrap();
    }
    assert_quiet(&target, "target after the dropped datagrams").await;
    assert_quiet(&a.udp, "client after the foreign datagrams").await;
    poll_until(STATS_SETTLE, "XDP drop counters", |last| {
        let s = daemon.stats();
        let d = |n: &str| xdp(&s, n) - xdp(&before, n);
        let got = (
            d("xdp_dropped_malformed"),
            d("xdp_dropped_frag"),
            d("xdp_dropped_blocked"),
            d("xdp_dropped_foreign"),
        );
        *last = format!("{got:?} {}", s.json["xdp"]);
        (got == (2 * K, K, K, K)).then_some(())
    })
    .await;
    let s = daemon.stats();
    for c in [
        "udp_dropped_malformed",
        "udp_dropped_frag",
        "udp_dropped_blocked",
        "udp_dropped_foreign",
    ] {
        assert_eq!(
            s.counter(c),
            before.counter(c),
            "{c} rose: the relay saw a datagram XDP should have dropped"
        );
    }
    assert_eq!(udp_in_datagrams(daemon.pid()), delivered);
    // The association still works.
    round_trip(&a, &target, &dst, b"again", b"again reply").await;
    drop(a);
    wait_gauge(&daemon, "udp_associations_active", 0).await;
    daemon.stop();
}

/// When the association ends its flow goes: later datagrams from the client to the old relay
/// port are not forwarded to the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_teardown_removes_the_flow() {
    if !gate("XDP UDP fast path") {
        return;
    }
    let t = Topology::new();
    let daemon = start(&t, false, true, "");
    let a = associate(&t, daemon.addr(), false).await;
    let target = Topology::udp(&t.target, t.target_ip(false));
    let dst = Target::Ip(target.local_addr().unwrap());
    for i in 0..3u8 {
        round_trip(&a, &target, &dst, &[i; 100], &[i; 50]).await;
    }
    poll_until(STATS_SETTLE, "offloaded datagrams", |last| {
        let s = daemon.stats();
        *last = s.json["xdp"].to_string();
        (xdp(&s, "xdp_offloaded_up") >= 2).then_some(())
    })
    .await;
    let Assoc { _ctl, relay, udp } = a;
    drop(_ctl);
    wait_gauge(&daemon, "udp_associations_active", 0).await;
    let before = daemon.stats();
    for _ in 0..5 {
        let _ = udp.send(&udp_datagram(0, &dst, b"after the end")).await;
    }
    assert_quiet(
        &target,
        &format!("target after the association on {relay} ended"),
    )
    .await;
    let s = daemon.stats();
    assert_eq!(
        xdp(&s, "xdp_offloaded_up"),
        xdp(&before, "xdp_offloaded_up"),
        "XDP forwarded after teardown: {}",
        s.json["xdp"]
    );
    daemon.stop();
}

/// Datagrams near the MTU: client -> target shrinks (offloaded); target -> client grows by
/// the SOCKS header past the MTU, so XDP passes it and the relay sends it (fragmented).
#[rstest]
#[case::ipv4(false)]
#[case::ipv6(true)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_large_datagrams(#[case] v6: bool) {
    if !gate("XDP UDP fast path") {
        return;
    }
    let t = Topology::new();
    let daemon = start(&t, v6, true, "");
    let a = associate(&t, daemon.addr(), v6).await;
    let target = Topology::udp(&t.target, t.target_ip(v6));
    let dst = Target::Ip(target.local_addr().unwrap());
    round_trip(&a, &target, &dst, b"small", b"small").await;
    let (iph, hdr) = if v6 { (40, 22) } else { (20, 10) };
    // The largest client datagram that fits a 1500-byte MTU, and the largest target reply.
    let up = Pattern::bytes(0x0d82_0000, 1500 - iph - 8 - hdr);
    let down = Pattern::bytes(0x0d83_0000, 1500 - iph - 8);
    for _ in 0..3 {
        round_trip(&a, &target, &dst, &up, &down).await;
    }
    poll_until(
        STATS_SETTLE,
        "large datagrams offloaded up, passed down",
        |last| {
            let s = daemon.stats();
            *last = s.json["xdp"].to_string();
            let done = if v6 {
                // IPv6 is not offloaded yet: the relay carries every datagram.
                xdp(&s, "xdp_offloaded_up") == 0 && xdp(&s, "xdp_offloaded_down") == 0
            } else {
                xdp(&s, "xdp_offloaded_up") >= 3 && xdp(&s, "xdp_passed_too_big") >= 3
            };
            done.then_some(())
        },
    )
    .await;
    drop(a);
    wait_gauge(&daemon, "udp_associations_active", 0).await;
    daemon.stop();
}
