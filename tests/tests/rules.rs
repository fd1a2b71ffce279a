//! Access rules, one test per match kind: `[[client_rule]]` by client address, and
//! `[[socks_rule]]` by destination CIDR, exact name, name suffix, port range, command, user
//! and SOCKS version; and a name that resolves into a blocked network.
//!
//! A blocked request must get reply 0x02 (SOCKS4: 91), the target must never see a
//! connection, and `requests_blocked` must count it; the same daemon must still serve what
//! the rules allow.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs},
    sync::OnceLock,
    time::Duration,
};

use proxy_integration::{
    accept_one,
    checks::wait_counter,
    listen, require_privileged,
    socks::{self, tcp_connect_from, Auth, Target},
    socks4, wait_closed, within, Daemon, DaemonOpts, UsersFile,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const LIMIT: Duration = Duration::from_secs(20);
const PROMPT: Duration = Duration::from_secs(2);
/// How long a target is watched for a connection that must not come.
const NO_CONN: Duration = Duration::from_millis(700);

fn start(feature: &str, extra: &str) -> Option<Daemon> {
    require_privileged(feature).then(|| {
        Daemon::start(DaemonOpts {
            extra_toml: extra.into(),
            ..DaemonOpts::default()
        })
    })
}

fn dom(name: &str, port: u16) -> Target {
    Target::Domain(name.into(), port)
}

fn ip(a: SocketAddr) -> Target {
    Target::Ip(a)
}

/// A SOCKS5 request that must be refused with 0x02 and then closed.
async fn expect_blocked5(proxy: SocketAddr, auth: &Auth, cmd: u8, target: &Target, what: &str) {
    let (mut s, reply) = socks::handshake_auth(proxy, auth, cmd, target)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        reply.code,
        socks::REP_NOT_ALLOWED,
        "{what}: reply {reply:?}, expected 0x02 (not allowed by ruleset)"
    );
    wait_closed(&mut s, PROMPT, &format!("{what}: after 0x02")).await;
}

/// A SOCKS4 request that must be rejected with 91 and then closed.
async fn expect_blocked4(proxy: SocketAddr, request: &[u8], what: &str) {
    let (mut s, reply) = socks4::handshake(proxy, request)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(reply.code, socks4::REJECTED, "{what}: reply {reply:?}");
    wait_closed(&mut s, PROMPT, &format!("{what}: after 91")).await;
}

/// Checks that `client` (just granted) really reaches the connection `l` accepts.
async fn check_reaches(mut client: TcpStream, l: &TcpListener, what: &str) {
    let mut t = accept_one(l).await;
    client.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    within(LIMIT, what, t.read_exact(&mut b))
        .await
        .unwrap_or_else(|e| panic!("{what}: target read: {e}"));
    assert_eq!(&b, b"ping", "{what}");
    t.write_all(b"pong").await.unwrap();
    within(LIMIT, what, client.read_exact(&mut b))
        .await
        .unwrap_or_else(|e| panic!("{what}: client read: {e}"));
    assert_eq!(&b, b"pong", "{what}");
}

/// A SOCKS5 CONNECT that must pass and reach the target behind `l`.
async fn expect_pass5(
    proxy: SocketAddr,
    auth: &Auth,
    target: &Target,
    l: &TcpListener,
    what: &str,
) {
    let s = socks::connect_auth(proxy, auth, target.clone())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    check_reaches(s, l, what).await;
}

fn port_of(l: &TcpListener) -> u16 {
    l.local_addr().unwrap().port()
}

fn addr_of(l: &TcpListener) -> SocketAddr {
    l.local_addr().unwrap()
}

/// Stage 1: a client rule blocks 127.0.0.2; its connection is closed at once, without a
/// byte, and counted under `connections_refused`. 127.0.0.1 still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rule_blocks_address() {
    if !require_privileged("client rules") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: "[[client_rule]]\nname = \"not-dot-two\"\naction = \"block\"\nfrom = [\"127.0.0.2\"]\n\
                     [[client_rule]]\nname = \"loopback\"\naction = \"pass\"\nfrom = [\"127.0.0.0/8\"]\n"
            .into(),
        allow_clients: false,
        ..DaemonOpts::default()
    });
    let mut s = tcp_connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), daemon.addr())
        .await
        .expect("connect from 127.0.0.2");
    let (took, got) = wait_closed(&mut s, PROMPT, "client blocked by a client rule").await;
    assert!(got.is_empty(), "blocked client received {got:02x?}");
    eprintln!("blocked client closed after {took:?}");
    wait_counter(&daemon, "connections_refused", 1).await;

    let l = listen("127.0.0.1:0").await;
    expect_pass5(
        daemon.addr(),
        &Auth::None,
        &ip(addr_of(&l)),
        &l,
        "client 127.0.0.1",
    )
    .await;
    wait_counter(&daemon, "connections_refused", 1).await;
    daemon.stop();
}

/// Destination CIDR: 127.0.0.2/31 is blocked, 127.0.0.1 passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_rule_blocks_destination_cidr() {
    let Some(daemon) = start(
        "socks rules",
        "[[socks_rule]]\nname = \"no-dot-two\"\naction = \"block\"\nto = [\"127.0.0.2/31\"]\n\
         [[socks_rule]]\naction = \"pass\"\n",
    ) else {
        return;
    };
    let blocked = listen("127.0.0.2:0").await;
    let blocked3 = listen("127.0.0.3:0").await;
    let open = listen("127.0.0.1:0").await;
    expect_blocked5(
        daemon.addr(),
        &Auth::None,
        socks::CMD_CONNECT,
        &ip(addr_of(&blocked)),
        "CONNECT 127.0.0.2",
    )
    .await;
    expect_blocked5(
        daemon.addr(),
        &Auth::None,
        socks::CMD_CONNECT,
        &ip(addr_of(&blocked3)),
        "CONNECT 127.0.0.3",
    )
    .await;
    // The same network written as an IPv4-mapped IPv6 address is the same destination.
    let mapped = SocketAddr::new(
        Ipv4Addr::new(127, 0, 0, 2).to_ipv6_mapped().into(),
        port_of(&blocked),
    );
    expect_blocked5(
        daemon.addr(),
        &Auth::None,
        socks::CMD_CONNECT,
        &ip(mapped),
        "CONNECT [::ffff:127.0.0.2]",
    )
    .await;
    wait_counter(&daemon, "requests_blocked", 3).await;
    expect_pass5(
        daemon.addr(),
        &Auth::None,
        &ip(addr_of(&open)),
        &open,
        "CONNECT 127.0.0.1",
    )
    .await;
    assert_no_conn(&blocked, "127.0.0.2 target").await;
    assert_no_conn(&blocked3, "127.0.0.3 target").await;
    wait_counter(&daemon, "requests_blocked", 3).await;
    daemon.stop();
}

async fn assert_no_conn(l: &TcpListener, what: &str) {
    proxy_integration::assert_no_connection(l, NO_CONN, what).await;
}

/// Exact name: `to = ["localhost"]` blocks the name (any case, trailing dot) but neither
/// the literal address it resolves to nor a subdomain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_rule_blocks_exact_name() {
    let Some(daemon) = start(
        "socks rules",
        "[[socks_rule]]\nname = \"no-localhost\"\naction = \"block\"\nto = [\"localhost\"]\n\
         [[socks_rule]]\naction = \"pass\"\n",
    ) else {
        return;
    };
    let l = listen("127.0.0.1:0").await;
    let p = port_of(&l);
    for name in ["localhost", "LocalHost", "localhost."] {
        expect_blocked5(
            daemon.addr(),
            &Auth::None,
            socks::CMD_CONNECT,
            &dom(name, p),
            &format!("CONNECT {name}"),
        )
        .await;
    }
    assert_no_conn(&l, "target behind a blocked name").await;
    wait_counter(&daemon, "requests_blocked", 3).await;
    expect_pass5(
        daemon.addr(),
        &Auth::None,
        &ip(addr_of(&l)),
        &l,
        "CONNECT 127.0.0.1 (a name rule does not match a literal)",
    )
    .await;
    daemon.stop();

    // The other way round: only `localhost` passes, so `www.localhost` (not an exact match)
    // falls through to the catch-all block, decided without DNS.
    let Some(daemon) = start(
        "socks rules",
        "[[socks_rule]]\nname = \"only-localhost\"\naction = \"pass\"\nto = [\"localhost\"]\n\
         [[socks_rule]]\nname = \"rest\"\naction = \"block\"\n",
    ) else {
        return;
    };
    expect_pass5(
        daemon.addr(),
        &Auth::None,
        &dom("localhost", p),
        &l,
        "CONNECT localhost (pass rule)",
    )
    .await;
    expect_blocked5(
        daemon.addr(),
        &Auth::None,
        socks::CMD_CONNECT,
        &dom("www.localhost", p),
        "CONNECT www.localhost",
    )
    .await;
    wait_counter(&daemon, "requests_blocked", 1).await;
    daemon.stop();
}

/// Suffix: `.localhost` blocks `localhost` and every subdomain (decided without DNS), not
/// the literal address; `.calhost` does not match `localhost` (label boundary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_rule_blocks_name_suffix() {
    let Some(daemon) = start(
        "socks rules",
        "[[socks_rule]]\nname = \"no-localhost-domain\"\naction = \"block\"\nto = [\".localhost\"]\n\
         [[socks_rule]]\naction = \"pass\"\n",
    ) else {
        return;
    };
    let l = listen("127.0.0.1:0").await;
    let p = port_of(&l);
    for name in ["localhost", "www.localhost", "a.b.LOCALHOST."] {
        expect_blocked5(
            daemon.addr(),
            &Auth::None,
            socks::CMD_CONNECT,
            &dom(name, p),
            &format!("CONNECT {name}"),
        )
        .await;
    }
    assert_no_conn(&l, "target behind a blocked suffix").await;
    wait_counter(&daemon, "requests_blocked", 3).await;
    expect_pass5(
        daemon.addr(),
        &Auth::None,
        &ip(addr_of(&l)),
        &l,
        "CONNECT 127.0.0.1",
    )
    .await;
    daemon.stop();

    let Some(daemon) = start(
        "socks rules",
        "[[socks_rule]]\nname = \"no-calhost\"\naction = \"block\"\nto = [\".calhost\"]\n\
         [[socks_rule]]\naction = \"pass\"\n",
    ) else {
        return;
    };
    expect_pass5(
        daemon.addr(),
        &Auth::None,
        &dom("localhost", p),
        &l,
        "CONNECT localhost under a `.calhost` block",
    )
    .await;
    wait_counter(&daemon, "requests_blocked", 0).await;
    daemon.stop();
}

/// Two listeners on adjacent ports p and p+1 (both ends of the blocked range).
async fn adjacent_listeners() -> (TcpListener, TcpListener) {
    for _ in 0..100 {
        let a = listen("127.0.0.1:0").await;
        let p = port_of(&a);
        if p == u16::MAX {
            continue;
        }
        if let Ok(b) = TcpListener::bind(("127.0.0.1", p + 1)).await {
            return (a, b);
        }
    }
    panic!("no two adjacent free ports on 127.0.0.1");
}

/// Port range `"p-(p+1)"` (inclusive) blocks both ends; a port outside passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_rule_blocks_port_range() {
    if !require_privileged("socks rules") {
        return;
    }
    let (lo, hi) = adjacent_listeners().await;
    let p = port_of(&lo);
    let open = loop {
        let l = listen("127.0.0.1:0").await;
        if !(p..=p + 1).contains(&port_of(&l)) {
            break l;
        }
    };
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: format!(
            "[[socks_rule]]\nname = \"ports\"\naction = \"block\"\nports = [\"{p}-{}\"]\n\
             [[socks_rule]]\naction = \"pass\"\n",
            p + 1
        ),
        ..DaemonOpts::default()
    });
    expect_blocked5(
        daemon.addr(),
        &Auth::None,
        socks::CMD_CONNECT,
        &ip(addr_of(&lo)),
        "CONNECT to the range's low end",
    )
    .await;
    expect_blocked5(
        daemon.addr(),
        &Auth::None,
        socks::CMD_CONNECT,
        &ip(addr_of(&hi)),
        "CONNECT to the range's high end",
    )
    .await;
    assert_no_conn(&lo, "low-end target").await;
    assert_no_conn(&hi, "high-end target").await;
    wait_counter(&daemon, "requests_blocked", 2).await;
    expect_pass5(
        daemon.addr(),
        &Auth::None,
        &ip(addr_of(&open)),
        &open,
        "CONNECT outside the range",
    )
    .await;
    daemon.stop();
}

/// `commands = ["bind"]` blocks BIND (SOCKS5 and 4) and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_rule_blocks_command() {
    let Some(daemon) = start(
        "socks rules",
        "[[socks_rule]]\nname = \"no-bind\"\naction = \"block\"\ncommands = [\"bind\"]\n\
         [[socks_rule]]\naction = \"pass\"\n",
    ) else {
        return;
    };
    let l = listen("127.0.0.1:0").await;
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    expect_blocked5(
        daemon.addr(),
        &Auth::None,
        socks::CMD_BIND,
        &ip(any),
        "SOCKS5 BIND",
    )
    .await;
    expect_blocked4(
        daemon.addr(),
        &socks4::request(
            socks4::CMD_BIND,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            "",
        ),
        "SOCKS4 BIND",
    )
    .await;
    wait_counter(&daemon, "requests_blocked", 2).await;
    wait_counter(&daemon, "binds_total", 0).await;
    expect_pass5(
        daemon.addr(),
        &Auth::None,
        &ip(addr_of(&l)),
        &l,
        "SOCKS5 CONNECT",
    )
    .await;
    let SocketAddr::V4(a4) = addr_of(&l) else {
        unreachable!()
    };
    let (s, reply) =
        socks4::handshake(daemon.addr(), &socks4::request(socks4::CMD_CONNECT, a4, ""))
            .await
            .expect("SOCKS4 CONNECT");
    assert_eq!(reply.code, socks4::GRANTED, "SOCKS4 CONNECT {reply:?}");
    check_reaches(s, &l, "SOCKS4 CONNECT").await;
    wait_counter(&daemon, "requests_blocked", 2).await;
    daemon.stop();
}

const ALICE_PW: &str = "alice's password";
const BOB_PW: &str = "bob's password";

fn users() -> &'static UsersFile {
    static U: OnceLock<UsersFile> = OnceLock::new();
    U.get_or_init(|| {
        UsersFile::kept(
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("rules-users"),
            &[("alice", ALICE_PW), ("bob", BOB_PW)],
        )
    })
}

/// `users = ["alice"]` passes alice; bob authenticates fine but his request is blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_rule_by_user() {
    if !require_privileged("socks rules") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: format!(
            "{}\n[[socks_rule]]\nname = \"alice-only\"\naction = \"pass\"\nusers = [\"alice\"]\n",
            users().auth_toml(&["username"])
        ),
        ..DaemonOpts::default()
    });
    let l = listen("127.0.0.1:0").await;
    expect_pass5(
        daemon.addr(),
        &Auth::user("alice", ALICE_PW),
        &ip(addr_of(&l)),
        &l,
        "alice",
    )
    .await;
    expect_blocked5(
        daemon.addr(),
        &Auth::user("bob", BOB_PW),
        socks::CMD_CONNECT,
        &ip(addr_of(&l)),
        "bob",
    )
    .await;
    assert_no_conn(&l, "target after bob's request").await;
    wait_counter(&daemon, "auth_successes", 2).await;
    wait_counter(&daemon, "requests_blocked", 1).await;
    daemon.stop();
}

/// `versions = [5]`: SOCKS4 and SOCKS4a are rejected, SOCKS5 passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_rule_by_version() {
    let Some(daemon) = start(
        "socks rules",
        "[[socks_rule]]\nname = \"v5-only\"\naction = \"pass\"\nversions = [5]\n",
    ) else {
        return;
    };
    let l = listen("127.0.0.1:0").await;
    let SocketAddr::V4(a4) = addr_of(&l) else {
        unreachable!()
    };
    expect_blocked4(
        daemon.addr(),
        &socks4::request(socks4::CMD_CONNECT, a4, "u"),
        "SOCKS4 CONNECT",
    )
    .await;
    expect_blocked4(
        daemon.addr(),
        &socks4::request_4a(socks4::CMD_CONNECT, "localhost", a4.port(), "u"),
        "SOCKS4a CONNECT",
    )
    .await;
    assert_no_conn(&l, "target after SOCKS4 requests").await;
    wait_counter(&daemon, "requests_blocked", 2).await;
    expect_pass5(
        daemon.addr(),
        &Auth::None,
        &ip(addr_of(&l)),
        &l,
        "SOCKS5 CONNECT",
    )
    .await;
    daemon.stop();
}

/// `block to 127.0.0.0/8` then `pass`: CONNECT to `localhost:P` must never reach the IPv4
/// target. If `localhost` also resolves to ::1 and a target listens there, the daemon must
/// use it; otherwise the request is blocked (0x02).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_resolving_into_blocked_network() {
    let Some(daemon) = start(
        "socks rules",
        "[[socks_rule]]\nname = \"no-v4-loopback\"\naction = \"block\"\nto = [\"127.0.0.0/8\"]\n\
         [[socks_rule]]\naction = \"pass\"\n",
    ) else {
        return;
    };
    let (v4, v6) = loop {
        let v4 = listen("127.0.0.1:0").await;
        match TcpListener::bind(("::1", port_of(&v4))).await {
            Ok(v6) => break (v4, Some(v6)),
            Err(_) if std::net::TcpListener::bind("[::1]:0").is_err() => break (v4, None),
            Err(_) => continue,
        }
    };
    let p = port_of(&v4);
    let resolved: Vec<SocketAddr> = ("localhost", p)
        .to_socket_addrs()
        .map(Iterator::collect)
        .unwrap_or_default();
    let via_v6 = v6.is_some()
        && resolved
            .iter()
            .any(|a| a.ip() == IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]));
    eprintln!(
        "localhost resolves to {resolved:?}; expecting {}",
        if via_v6 { "::1" } else { "a block" }
    );
    if via_v6 {
        let v6 = v6.as_ref().unwrap();
        expect_pass5(
            daemon.addr(),
            &Auth::None,
            &dom("localhost", p),
            v6,
            "CONNECT localhost (via ::1 only)",
        )
        .await;
        wait_counter(&daemon, "requests_blocked", 0).await;
    } else {
        expect_blocked5(
            daemon.addr(),
            &Auth::None,
            socks::CMD_CONNECT,
            &dom("localhost", p),
            "CONNECT localhost",
        )
        .await;
        wait_counter(&daemon, "requests_blocked", 1).await;
    }
    assert_no_conn(&v4, "IPv4 target (127.0.0.1 is blocked)").await;
    daemon.stop();
}
