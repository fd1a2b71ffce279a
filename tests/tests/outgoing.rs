//! Connections to targets: `[outgoing]` source addresses (they must not cap the sessions at
//! the size of the ephemeral port range), and a name whose first address never answers.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use proxy_integration::{
    netns::{self, Topology},
    socks::{self, Target},
    within, Daemon, DataPath, Echo,
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
async fn connect(
    t: &Topology,
    proxy: SocketAddr,
    target: impl Into<Target>,
) -> (TcpStream, SocketAddr) {
    let target = target.into();
    let mut s = Topology::tcp(&t.client, proxy);
    s.write_all(&socks::greeting()).await.expect("greeting");
    socks::read_method(&mut s).await.expect("method selection");
    s.write_all(&socks::request(1, &target))
        .await
        .expect("request");
    let reply = socks::read_reply(&mut s).await.expect("reply");
    assert_eq!(reply.code, 0, "CONNECT {target:?} failed: {reply:?}");
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
    let key = if v6 { "ipv6" } else { "ipv4" };
    let daemon = Daemon::start(t.proxy_daemon(
        DataPath::Auto,
        v6,
        &format!("[outgoing]\n{key} = \"{source}\"\n"),
    ));

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

/// A name that resolves to an address nobody answers, then to the target: the daemon tries
/// the second address 250 ms into the first attempt (RFC 8305), so the CONNECT succeeds well
/// within a 2 s connect timeout. Trying the addresses one after another, the first attempt
/// took the whole timeout (the address is on the link, and its ARP resolution only gives up
/// after 3 s) and the client got reply 0x06.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_address_that_never_answers_does_not_fail_the_connect() {
    if !netns::require("CONNECT to a name whose first address never answers") {
        return;
    }
    let t = Topology::new();
    // On the target link, owned by nobody: ARP never resolves it.
    let dead = t.addr_on(false, 2, 4);
    let live = t.addr_on(false, 2, 200);
    t.target
        .ip(&["addr", "add", &format!("{live}/24"), "dev", "t0"]);
    let dir = tempfile::tempdir().expect("temporary directory");
    let hosts = dir.path().join("hosts");
    let system = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    std::fs::write(
        &hosts,
        format!("{system}\n{dead} slowhost.test\n{live} slowhost.test\n"),
    )
    .expect("hosts file");
    // The daemon sees that hosts file in a mount namespace of its own.
    let mut opts = t.proxy_daemon(DataPath::Auto, false, "[timeouts]\nconnect = \"2s\"\n");
    opts.wrapper.extend([
        "unshare".to_owned(),
        "-m".to_owned(),
        "sh".to_owned(),
        "-c".to_owned(),
        format!("mount --bind {} /etc/hosts && exec \"$@\"", hosts.display()),
        "sh".to_owned(),
    ]);
    // The resolver must give the dead address first, or the test proves nothing.
    let mut probe = opts.wrapper.clone();
    probe.extend([
        "getent".to_owned(),
        "ahostsv4".to_owned(),
        "slowhost.test".to_owned(),
    ]);
    let out = std::process::Command::new(&probe[0])
        .args(&probe[1..])
        .output()
        .expect("getent in the daemon's namespaces");
    let order = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        order.starts_with(&dead.to_string()),
        "the resolver does not give {dead} first: {order:?}"
    );

    let daemon = Daemon::start(opts);
    let peers = Arc::new(Mutex::new(Vec::new()));
    let echo = echo_target(&t, live, peers.clone());
    let (mut s, _) = within(
        LIMIT,
        "CONNECT to slowhost.test",
        connect(
            &t,
            daemon.addr(),
            Target::Domain("slowhost.test".into(), echo.addr.port()),
        ),
    )
    .await;
    s.write_all(b"eyeballs").await.expect("write");
    let mut got = [0u8; 8];
    within(LIMIT, "echo", s.read_exact(&mut got))
        .await
        .expect("echo");
    assert_eq!(&got, b"eyeballs");
    assert_eq!(peers.lock().unwrap().len(), 1, "connections at the target");
    drop(s);
    daemon.stop();
}
