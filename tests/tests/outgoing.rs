//! `[outgoing]`: connections to targets leave from the configured source address, and binding
//! that address does not cap the sessions at the size of the ephemeral port range.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use proxy_integration::{
    netns::{self, Topology},
    socks::{self, Target},
    within, Daemon, DaemonOpts, DataPath, Echo,
};
use rstest::rstest;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const LIMIT: Duration = Duration::from_secs(60);
/// The proxy namespace's `ip_local_port_range`: 100 ports.
const PORTS: (u16, u16) = (50_000, 50_099);
const TARGETS: usize = 3;
/// Sessions held open at once to each target: together more than the range has ports, each
/// target's share less.
const PER_TARGET: usize = 50;

/// An echo target in the target namespace that records every peer address it accepts.
fn echo_target(t: &Topology, ip: IpAddr, peers: Arc<Mutex<Vec<SocketAddr>>>) -> Echo {
    let l = t
        .target
        .enter(|| std::net::TcpListener::bind(SocketAddr::new(ip, 0)))
        .expect("target listener");
    l.set_nonblocking(true).expect("nonblocking");
    Echo::serve_noting_peers(
        TcpListener::from_std(l).expect("tokio listener"),
        Some(peers),
    )
}

/// CONNECT through the proxy from the client namespace; returns the stream and BND.ADDR.
async fn connect(t: &Topology, proxy: SocketAddr, target: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut s = Topology::tcp(&t.client, proxy);
    s.write_all(&socks::greeting()).await.expect("greeting");
    socks::read_method(&mut s).await.expect("method selection");
    s.write_all(&socks::request(1, &target.into()))
        .await
        .expect("request");
    let reply = socks::read_reply(&mut s).await.expect("reply");
    assert_eq!(reply.code, 0, "CONNECT {target} failed: {reply:?}");
    let Target::Ip(bound) = reply.bound else {
        panic!("BND.ADDR is a name: {reply:?}");
    };
    (s, bound)
}

/// With `[outgoing] ipv4`/`ipv6` set, every connection to a target comes from that address,
/// and the reply's BND.ADDR says so. The proxy's namespace has only 100 ephemeral ports, and
/// 150 sessions to three targets are held open at once: a source port chosen when the socket
/// is bound must differ from every other socket's on that address, so the 101st session
/// failed; chosen at connect (`IP_BIND_ADDRESS_NO_PORT`), it only has to be free towards its
/// own target.
#[rstest]
#[case::ipv4(false)]
#[case::ipv6(true)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outgoing_address_does_not_cap_sessions_at_the_port_range(#[case] v6: bool) {
    if !netns::require("[outgoing] source address") {
        return;
    }
    let t = Topology::new();
    t.proxy.sysctl(
        "net/ipv4/ip_local_port_range",
        &format!("{} {}", PORTS.0, PORTS.1),
    );
    // Not the address routing picks: connections come from it only if bound to it.
    let source = t.add_proxy_alias(v6);
    let [n4, n6] = t.networks();
    let key = if v6 { "ipv6" } else { "ipv4" };
    let daemon = Daemon::start(DaemonOpts {
        data_path: DataPath::Auto,
        listen: vec![SocketAddr::new(t.proxy_ip(v6), 0).to_string()],
        extra_toml: format!(
            "allow_clients = [\"{n4}\", \"{n6}\"]\n[outgoing]\n{key} = \"{source}\"\n"
        ),
        allow_clients: false,
        wrapper: vec!["nsenter".into(), format!("--net={}", t.proxy.path())],
        ..DaemonOpts::default()
    });

    let peers = Arc::new(Mutex::new(Vec::new()));
    let echoes: Vec<Echo> = (0..TARGETS)
        .map(|_| echo_target(&t, t.target_ip(v6), peers.clone()))
        .collect();
    let targets: Vec<SocketAddr> = echoes.iter().map(|e| e.addr).collect();

    let mut sessions = Vec::new();
    within(LIMIT, "opening the sessions", async {
        for i in 0..TARGETS * PER_TARGET {
            let target = targets[i % TARGETS];
            let (s, bound) = connect(&t, daemon.addr(), target).await;
            assert_eq!(bound.ip(), source, "BND.ADDR of session {i}");
            assert!(
                (PORTS.0..=PORTS.1).contains(&bound.port()),
                "BND.PORT {} of session {i} is outside the namespace's range",
                bound.port()
            );
            sessions.push((s, bound));
        }
    })
    .await;

    // Every session relays, and each of them is its own connection from the source address.
    within(LIMIT, "echo on every session", async {
        for (i, (s, _)) in sessions.iter_mut().enumerate() {
            let msg = format!("session {i}");
            s.write_all(msg.as_bytes()).await.expect("write");
            let mut got = vec![0u8; msg.len()];
            s.read_exact(&mut got).await.expect("echo");
            assert_eq!(got, msg.as_bytes(), "echo of session {i}");
        }
    })
    .await;
    let seen = peers.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        TARGETS * PER_TARGET,
        "connections at the targets"
    );
    assert!(
        seen.iter().all(|p| p.ip() == source),
        "a connection came from another address than {source}: {seen:?}"
    );
    // The targets saw exactly the sources the replies named (a port may serve each target).
    let mut seen = seen;
    seen.sort_unstable();
    let mut bound: Vec<_> = sessions.iter().map(|(_, b)| *b).collect();
    bound.sort_unstable();
    assert_eq!(seen, bound, "sources at the targets against BND.ADDR");
    drop(sessions);
    daemon.stop();
}
