//! The XDP UDP fast path, in a topology of three network namespaces joined by veth pairs:
//! client -- proxy (the daemon, XDP on both of its interfaces) -- target.
//!
//! Proof that a datagram bypassed the relay socket: the XDP counters rise while the proxy
//! namespace's `Udp: InDatagrams` and `Udp6InDatagrams` (every datagram delivered to a UDP
//! socket there) and the `udp/relay` traffic rows do not.
//!
//! The sockets in the client and target namespaces drop datagrams with a bad UDP checksum
//! (their veths have no checksum offload), so a datagram that arrives proves the checksum
//! the program wrote.

use std::net::SocketAddr;

use proxy_integration::dgram::{assert_quiet, recv_from};
use proxy_integration::{
    checks::{wait_gauge, STATS_SETTLE},
    netns::{self, udp_in_datagrams, Topology},
    poll_until,
    socks::{self, parse_udp_datagram, udp_datagram, Auth, Target},
    Daemon, DataPath, Pattern, Stats,
};
use rstest::rstest;
use tokio::net::{TcpStream, UdpSocket};

/// The daemon in the proxy namespace, listening on its client-side address, XDP on p0 and p1.
fn start(t: &Topology, v6: bool, offload: bool, extra: &str) -> Daemon {
    Daemon::start(t.proxy_daemon(
        DataPath::Auto,
        v6,
        &format!("[udp]\nxdp_interfaces = [\"p0\", \"p1\"]\noffload = {offload}\n{extra}"),
    ))
}

/// Gives the proxy one source address towards the target over IPv6, its client-side one (a
/// host route with `src`), as on a proxy with one address per family. The relay's
/// dual-stack socket then sends from its own address, as the IPv4 one (bound to it) always
/// does; IPv6 offload needs that.
fn same_source_v6(t: &Topology) {
    t.proxy.ip(&[
        "-6",
        "route",
        "add",
        &format!("{}/128", t.target_ip(true)),
        "dev",
        "p1",
        "src",
        &t.proxy_ip(true).to_string(),
    ]);
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

/// Client -> relay -> target and back; checks payloads and headers. Returns the source the
/// target saw.
async fn round_trip(
    a: &Assoc,
    target: &UdpSocket,
    dst: &Target,
    up: &[u8],
    down: &[u8],
) -> SocketAddr {
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
    from
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

/// What a round-trip case sends where.
#[derive(Clone, Copy, Debug)]
enum Flow {
    /// IPv4 client, IPv4 literal target.
    V4,
    /// IPv6 client, IPv6 literal target; the relay's address is its source towards both.
    V6,
    /// As `V6`, but the proxy sends to the target from its target-side address.
    V6OtherSource,
    /// IPv6 client, IPv4 literal target (through the relay's dual-stack socket).
    V6ToV4,
    /// IPv4 client, a domain target (a numeric name, which resolves without DNS).
    Domain,
}

impl Flow {
    fn client_v6(self) -> bool {
        matches!(self, Self::V6 | Self::V6OtherSource | Self::V6ToV4)
    }

    fn target_v6(self) -> bool {
        matches!(self, Self::V6 | Self::V6OtherSource)
    }

    /// With offload on: the counter under which XDP passes the client's datagrams to the
    /// relay, or None when it offloads the flow.
    fn passed(self) -> Option<&'static str> {
        match self {
            Self::V4 | Self::V6 => None,
            Self::V6OtherSource => Some("xdp_passed_source"),
            Self::V6ToV4 => Some("xdp_passed_no_flow"),
            Self::Domain => Some("xdp_passed_domain"),
        }
    }
}

/// Round trips through the relay with offload on and off. With offload, every datagram
/// after the first of an IPv4 or IPv6 flow bypasses the relay socket; what XDP does not
/// offload (a domain, IPv6 to IPv4, an IPv6 flow the proxy would send from another address)
/// passes to the relay, counted under its reason. Relayed or offloaded, the target sees one
/// source.
#[rstest]
#[case::ipv4_offload(Flow::V4, true)]
#[case::ipv4_userspace(Flow::V4, false)]
#[case::ipv6_offload(Flow::V6, true)]
#[case::ipv6_userspace(Flow::V6, false)]
#[case::ipv6_other_source(Flow::V6OtherSource, true)]
#[case::ipv6_to_ipv4(Flow::V6ToV4, true)]
#[case::domain(Flow::Domain, true)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_round_trips(#[case] flow: Flow, #[case] offload: bool) {
    if !netns::require("XDP UDP fast path") {
        return;
    }
    let t = Topology::new();
    if matches!(flow, Flow::V6) {
        same_source_v6(&t);
    }
    let daemon = start(&t, flow.client_v6(), offload, "");
    let a = associate(&t, daemon.addr(), flow.client_v6()).await;
    let target = Topology::udp(&t.target, t.target_ip(flow.target_v6()));
    let taddr = target.local_addr().unwrap();
    let dst = if matches!(flow, Flow::Domain) {
        Target::Domain(taddr.ip().to_string(), taddr.port())
    } else {
        Target::Ip(taddr)
    };
    // The first exchange goes through the relay, which installs the flow.
    let src = round_trip(&a, &target, &dst, b"first", b"first reply").await;
    if matches!(flow, Flow::V4 | Flow::V6) {
        assert_eq!(src, a.relay, "the relay sent from another address");
    }
    // The relay counts a datagram after its send returned, which can be after the reply
    // arrived: wait for the first exchange (its reply relayed or already offloaded).
    poll_until(STATS_SETTLE, "the first exchange counted", |last| {
        let s = daemon.stats();
        let got = (
            s.traffic_packets("udp", "relay", "up"),
            s.traffic_packets("udp", "relay", "down") + s.traffic_packets("udp", "xdp", "down"),
        );
        *last = format!("(up, down) {got:?}");
        (got == (1, 1)).then_some(())
    })
    .await;
    let before = daemon.stats();
    let delivered = udp_in_datagrams(daemon.pid());

    const N: u64 = 20;
    let (mut up_bytes, mut down_bytes) = (0u64, 0u64);
    for i in 0..N {
        let up = Pattern::bytes(0x0d80_0000 + i, 1 + (i as usize * 97) % 1400);
        let down = Pattern::bytes(0x0d81_0000 + i, 1 + (i as usize * 61) % 1400);
        let from = round_trip(&a, &target, &dst, &up, &down).await;
        assert_eq!(
            from, src,
            "datagram {i} reached the target from another source"
        );
        up_bytes += up.len() as u64;
        down_bytes += down.len() as u64;
    }
    let delivered_after = udp_in_datagrams(daemon.pid());
    let fast = offload && flow.passed().is_none();
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
            (fastpath == want && offloaded == (N, N) && iface(&s, "udp", "tx") >= 2 * N)
                .then_some(())
        } else {
            assert_eq!(
                offloaded,
                (0, 0),
                "offloaded with offload off or a flow XDP does not take: {last}"
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
    if let (true, Some(reason)) = (offload, flow.passed()) {
        let s = daemon.stats();
        assert!(
            xdp(&s, reason) - xdp(&before, reason) >= N,
            "{reason}: {}",
            s.json["xdp"]
        );
    }
    drop(a);
    wait_gauge(&daemon, "udp_associations_active", 0).await;
    daemon.stop();
}

/// Datagrams the relay would drop are dropped by XDP, each counted under its reason, and
/// never reach the relay socket (its own drop counters stay put).
#[rstest]
#[case::ipv4(false)]
#[case::ipv6(true)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_early_drops(#[case] v6: bool) {
    if !netns::require("XDP UDP fast path") {
        return;
    }
    let t = Topology::new();
    if v6 {
        same_source_v6(&t);
    }
    let blocked = t.unused_target_ip(v6);
    let host = if v6 { 128 } else { 32 };
    let daemon = start(
        &t,
        v6,
        true,
        &format!(
            "[[socks_rule]]\nname = \"no-99\"\naction = \"block\"\nto = [\"{blocked}/{host}\"]\n\
             [[socks_rule]]\nname = \"rest\"\naction = \"pass\"\n"
        ),
    );
    let a = associate(&t, daemon.addr(), v6).await;
    let target = Topology::udp(&t.target, t.target_ip(v6));
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
    let stranger = Topology::udp(&t.target, t.target_ip(v6));
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
#[rstest]
#[case::ipv4(false)]
#[case::ipv6(true)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_teardown_removes_the_flow(#[case] v6: bool) {
    if !netns::require("XDP UDP fast path") {
        return;
    }
    let t = Topology::new();
    if v6 {
        same_source_v6(&t);
    }
    let daemon = start(&t, v6, true, "");
    let a = associate(&t, daemon.addr(), v6).await;
    let target = Topology::udp(&t.target, t.target_ip(v6));
    let dst = Target::Ip(target.local_addr().unwrap());
    for i in 0..3u8 {
        round_trip(&a, &target, &dst, &[i; 100], &[i; 50]).await;
    }
    poll_until(STATS_SETTLE, "offloaded datagrams", |last| {
        let s = daemon.stats();
        *last = s.json["xdp"].to_string();
        (xdp(&s, "xdp_offloaded_up") >= 2 && xdp(&s, "xdp_offloaded_down") >= 2).then_some(())
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

/// Datagrams near the MTU (1500 on the veths), each arriving intact (so with a correct
/// checksum). Client -> target shrinks by the SOCKS header: the largest that fits is
/// offloaded. Target -> client grows by it: a reply that still fits is offloaded, the
/// largest one would not fit, so XDP passes it (FIB: fragmentation needed) and the relay
/// sends it fragmented. A client datagram over the MTU arrives fragmented and passes.
#[rstest]
#[case::ipv4(false)]
#[case::ipv6(true)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_large_datagrams(#[case] v6: bool) {
    if !netns::require("XDP UDP fast path") {
        return;
    }
    let t = Topology::new();
    if v6 {
        same_source_v6(&t);
    }
    let daemon = start(&t, v6, true, "");
    let a = associate(&t, daemon.addr(), v6).await;
    let target = Topology::udp(&t.target, t.target_ip(v6));
    let dst = Target::Ip(target.local_addr().unwrap());
    round_trip(&a, &target, &dst, b"small", b"small").await;
    let before = daemon.stats();
    let (iph, hdr) = if v6 { (40, 22) } else { (20, 10) };
    // The largest payload that fits one 1500-byte packet with the SOCKS header, and without.
    let (with_header, bare) = (1500 - iph - 8 - hdr, 1500 - iph - 8);
    for i in 0..3 {
        let up = Pattern::bytes(0x0d82_0000 + i, with_header);
        let down = Pattern::bytes(0x0d83_0000 + i, with_header);
        round_trip(&a, &target, &dst, &up, &down).await;
    }
    for i in 0..3 {
        let down = Pattern::bytes(0x0d84_0000 + i, bare);
        round_trip(&a, &target, &dst, b"small", &down).await;
    }
    let up = Pattern::bytes(0x0d85_0000, 2000);
    round_trip(&a, &target, &dst, &up, b"small").await;
    poll_until(
        STATS_SETTLE,
        "large datagrams offloaded or passed",
        |last| {
            let s = daemon.stats();
            let d = |n: &str| xdp(&s, n) - xdp(&before, n);
            let got = (
                d("xdp_offloaded_up"),
                d("xdp_offloaded_down"),
                d("xdp_passed_too_big"),
            );
            *last = format!("(up, down, too big) {got:?} {}", s.json["xdp"]);
            (got == (6, 4, 3)).then_some(())
        },
    )
    .await;
    drop(a);
    wait_gauge(&daemon, "udp_associations_active", 0).await;
    daemon.stop();
}

/// A second daemon configured with the interfaces of a running one cannot attach its XDP
/// program: it exits with an error that names the interface and why, before it serves, and the
/// running daemon's program stays attached and offloading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_a_second_daemon_on_the_same_interface_is_refused() {
    if !netns::require("XDP UDP fast path") {
        return;
    }
    let t = Topology::new();
    let daemon = start(&t, false, true, "");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("second.toml");
    let pin = format!("/sys/fs/bpf/ebsocks-test-xdp-second-{}", std::process::id());
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:0\"]\npin_dir = \"{pin}\"\ncontrol_socket = \"off\"\n\
             [udp]\nxdp_interfaces = [\"p0\"]\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new("timeout")
        .arg("20")
        .arg("nsenter")
        .arg(format!("--net={}", t.proxy.path()))
        .arg(proxy_integration::daemon::daemon_binary())
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run a second ebsocks");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("attaching XDP to p0") && stderr.contains("already has an XDP program"),
        "{stderr}"
    );
    assert!(
        !std::path::Path::new(&pin).exists(),
        "pins left after a failed start"
    );

    // The first daemon's program still offloads.
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
    drop(a);
    daemon.stop();
}
