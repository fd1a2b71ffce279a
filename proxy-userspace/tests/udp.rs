//! The UDP ASSOCIATE relay driven directly through `ebsocks::udp::associate`, on loopback with
//! real sockets: a TCP pair stands in for the SOCKS control connection, UDP echo servers for
//! the targets. Every wait is bounded.

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::Arc,
    time::Duration,
};

use ebsocks::{
    metrics::Metrics,
    udp::{associate, UdpOutcome, UdpPolicy, END_CONTROL_CLOSED, END_IDLE},
};
use proxy_common::metrics::Counter;
use proxy_socks5::{Address, DecodeError, Reply, Response, UdpHeader};
use tokio::{
    io::AsyncReadExt as _,
    net::{TcpListener, TcpStream, UdpSocket},
    task::JoinHandle,
    time::timeout,
};

/// Bound on any single wait for something that should happen.
const T: Duration = Duration::from_secs(10);
/// How long to wait for a datagram that should not come.
const QUIET: Duration = Duration::from_millis(300);

type Allow = Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>;
type AllowName = Arc<dyn Fn(&str, u16) -> bool + Send + Sync>;

struct Opts {
    allow: Allow,
    allow_name: AllowName,
    idle: Duration,
    requested: Address,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            allow: Arc::new(|_| true),
            allow_name: Arc::new(|_, _| true),
            idle: Duration::from_secs(60),
            requested: Address::UNSPECIFIED,
        }
    }
}

/// One association: the client's end of the control connection, the relay address from the
/// reply, and the task running `associate`.
struct Assoc {
    control: TcpStream,
    relay: SocketAddr,
    task: JoinHandle<io::Result<UdpOutcome>>,
    metrics: Arc<Metrics>,
}

impl Assoc {
    async fn open(ip: IpAddr, opts: Opts) -> Self {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
        let mut control = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let metrics = Arc::new(Metrics::default());
        let m = metrics.clone();
        let Opts {
            allow,
            allow_name,
            idle,
            requested,
        } = opts;
        let task = tokio::spawn(async move {
            let names = ebsocks::resolve::Names::default();
            let bytes = ebsocks::registry::ByteCounters::default();
            let policy = UdpPolicy {
                metrics: &m,
                allow: &*allow,
                allow_name: &*allow_name,
                idle,
                xdp: None,
                offload: false,
                names: &names,
                bytes: &bytes,
            };
            associate(&mut server, &requested, &policy).await
        });
        let mut buf = Vec::new();
        let response = timeout(T, async {
            loop {
                match Response::decode(&buf) {
                    Ok((r, _)) => return r,
                    Err(DecodeError::Incomplete) => {}
                    Err(e) => panic!("bad reply: {e}"),
                }
                let mut chunk = [0u8; 64];
                let n = control.read(&mut chunk).await.unwrap();
                assert_ne!(n, 0, "control closed before the reply");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("no reply");
        assert_eq!(response.reply, Reply::Succeeded);
        let Address::Ip(relay) = response.address else {
            panic!("BND is not an IP: {:?}", response.address)
        };
        assert_eq!(
            relay.ip(),
            ip,
            "relay bound on the control connection's local IP"
        );
        assert_ne!(relay.port(), 0);
        assert_eq!(metrics.get(Counter::UdpAssociationsActive), 1);
        Self {
            control,
            relay,
            task,
            metrics,
        }
    }

    /// Closes the control connection and returns the outcome.
    async fn close(self) -> (UdpOutcome, Arc<Metrics>) {
        let Self {
            control,
            task,
            metrics,
            ..
        } = self;
        drop(control);
        let outcome = timeout(T, task)
            .await
            .expect("associate did not end")
            .unwrap()
            .unwrap();
        assert_eq!(outcome.end, END_CONTROL_CLOSED);
        assert_eq!(metrics.get(Counter::UdpAssociationsActive), 0);
        assert_eq!(metrics.get(Counter::UdpAssociationsTotal), 1);
        (outcome, metrics)
    }
}

/// A UDP echo target; returns its address.
async fn echo(ip: IpAddr) -> SocketAddr {
    let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap();
    set_buffers(&sock);
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// Large socket buffers (up to `net.core.rmem_max`/`wmem_max`).
fn set_buffers(sock: &UdpSocket) {
    let size: libc::c_int = 4 << 20;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt with a readable c_int of the given length.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

async fn client(ip: IpAddr) -> UdpSocket {
    let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap();
    set_buffers(&sock);
    sock
}

fn datagram(frag: u8, to: Address, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 300);
    UdpHeader { frag, address: to }.encode(&mut out);
    out.extend_from_slice(payload);
    out
}

/// Receives one datagram through the relay: its SOCKS source address and payload.
async fn recv(sock: &UdpSocket, within: Duration) -> Option<(Address, Vec<u8>)> {
    let mut buf = vec![0u8; 70_000];
    let (n, _) = timeout(within, sock.recv_from(&mut buf))
        .await
        .ok()?
        .unwrap();
    let (header, used) = UdpHeader::decode(&buf[..n]).expect("relay sent a bad header");
    assert_eq!(header.frag, 0);
    Some((header.address, buf[used..n].to_vec()))
}

async fn round_trip(
    sock: &UdpSocket,
    relay: SocketAddr,
    to: Address,
    payload: &[u8],
) -> (Address, Vec<u8>) {
    sock.send_to(&datagram(0, to.clone(), payload), relay)
        .await
        .unwrap();
    recv(sock, T)
        .await
        .unwrap_or_else(|| panic!("no echo from {to} through the relay"))
}

fn v4() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

fn v6() -> IpAddr {
    "::1".parse().unwrap()
}

async fn have_ipv6() -> bool {
    let ok = TcpListener::bind("[::1]:0").await.is_ok() && UdpSocket::bind("[::1]:0").await.is_ok();
    if !ok {
        eprintln!("skipped: no IPv6 loopback");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_literal_round_trip() {
    let target = echo(v4()).await;
    let a = Assoc::open(v4(), Opts::default()).await;
    let c = client(v4()).await;
    let (from, data) = round_trip(&c, a.relay, Address::Ip(target), b"hello").await;
    assert_eq!(from, Address::Ip(target));
    assert_eq!(data, b"hello");
    let (out, m) = a.close().await;
    assert_eq!(
        (
            out.up_datagrams,
            out.up_bytes,
            out.down_datagrams,
            out.down_bytes
        ),
        (1, 5, 1, 5)
    );
    for c in [
        Counter::UdpDroppedForeign,
        Counter::UdpDroppedMalformed,
        Counter::UdpDroppedFrag,
        Counter::UdpDroppedBlocked,
    ] {
        assert_eq!(m.get(c), 0, "{c:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_literal_and_dual_stack() {
    if !have_ipv6().await {
        return;
    }
    let target6 = echo(v6()).await;
    let target4 = echo(v4()).await;
    let a = Assoc::open(v6(), Opts::default()).await;
    let c = client(v6()).await;
    let (from, data) = round_trip(&c, a.relay, Address::Ip(target6), b"six").await;
    assert_eq!((from, data.as_slice()), (Address::Ip(target6), &b"six"[..]));
    // The IPv6 association's socket is dual-stack: an IPv4 target works, and its replies
    // carry an IPv4 source (ATYP 1), not an IPv4-mapped one.
    let (from, data) = round_trip(&c, a.relay, Address::Ip(target4), b"four").await;
    assert_eq!(
        (from, data.as_slice()),
        (Address::Ip(target4), &b"four"[..])
    );
    // An IPv4-mapped destination is the IPv4 target too.
    let mapped = SocketAddr::new(
        IpAddr::V6(match target4.ip() {
            IpAddr::V4(ip) => ip.to_ipv6_mapped(),
            IpAddr::V6(_) => unreachable!(),
        }),
        target4.port(),
    );
    let (from, _) = round_trip(&c, a.relay, Address::Ip(mapped), b"mapped").await;
    assert_eq!(from, Address::Ip(target4));
    let (out, _) = a.close().await;
    assert_eq!((out.up_datagrams, out.down_datagrams), (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_association_drops_ipv6_targets() {
    if !have_ipv6().await {
        return;
    }
    let target6 = echo(v6()).await;
    let target4 = echo(v4()).await;
    let a = Assoc::open(v4(), Opts::default()).await;
    let c = client(v4()).await;
    c.send_to(&datagram(0, Address::Ip(target6), b"x"), a.relay)
        .await
        .unwrap();
    round_trip(&c, a.relay, Address::Ip(target4), b"after").await;
    assert_eq!(a.metrics.get(Counter::UdpDroppedBlocked), 1);
    assert!(recv(&c, QUIET).await.is_none());
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_destination() {
    let target = echo(v4()).await;
    let a = Assoc::open(v4(), Opts::default()).await;
    let c = client(v4()).await;
    // The first datagram waits for the lookup; the next ones use the cache.
    for i in 0..5u8 {
        let (from, data) = round_trip(
            &c,
            a.relay,
            Address::Domain("localhost".into(), target.port()),
            &[i; 3],
        )
        .await;
        assert_eq!(
            from,
            Address::Ip(target),
            "replies carry the IP the name resolved to"
        );
        assert_eq!(data, [i; 3]);
    }
    let (out, m) = a.close().await;
    assert_eq!((out.up_datagrams, out.down_datagrams), (5, 5));
    assert_eq!(m.get(Counter::UdpDroppedBlocked), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_refused_by_name_rule() {
    let target = echo(v4()).await;
    let opts = Opts {
        allow_name: Arc::new(|name, _| name != "localhost"),
        ..Opts::default()
    };
    let a = Assoc::open(v4(), opts).await;
    let c = client(v4()).await;
    c.send_to(
        &datagram(0, Address::Domain("localhost".into(), target.port()), b"x"),
        a.relay,
    )
    .await
    .unwrap();
    round_trip(&c, a.relay, Address::Ip(target), b"after").await;
    assert!(recv(&c, QUIET).await.is_none());
    assert_eq!(a.metrics.get(Counter::UdpDroppedBlocked), 1);
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frag_dropped_and_counted() {
    let target = echo(v4()).await;
    let a = Assoc::open(v4(), Opts::default()).await;
    let c = client(v4()).await;
    c.send_to(&datagram(1, Address::Ip(target), b"fragment"), a.relay)
        .await
        .unwrap();
    // Datagrams from one socket are handled in order: once this one is back, the first was seen.
    let (_, data) = round_trip(&c, a.relay, Address::Ip(target), b"whole").await;
    assert_eq!(data, b"whole");
    assert!(recv(&c, QUIET).await.is_none(), "the fragment went through");
    assert_eq!(a.metrics.get(Counter::UdpDroppedFrag), 1);
    let (out, _) = a.close().await;
    assert_eq!(out.up_datagrams, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_dropped_and_counted() {
    let target = echo(v4()).await;
    let a = Assoc::open(v4(), Opts::default()).await;
    let c = client(v4()).await;
    for bad in [
        &b"\x00\x00"[..],
        b"\x00\x00\x00\x09junk",
        b"\x00\x00\x00\x01\x7f\x00",
        b"",
    ] {
        c.send_to(bad, a.relay).await.unwrap();
    }
    round_trip(&c, a.relay, Address::Ip(target), b"fine").await;
    assert_eq!(a.metrics.get(Counter::UdpDroppedMalformed), 4);
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_source_dropped_and_counted() {
    let target = echo(v4()).await;
    let a = Assoc::open(v4(), Opts::default()).await;
    let c = client(v4()).await;
    // The client's first datagram fixes its port.
    round_trip(&c, a.relay, Address::Ip(target), b"first").await;
    // Same IP, another port, never a destination of the client.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stranger.send_to(b"unsolicited", a.relay).await.unwrap();
    stranger
        .send_to(
            &datagram(0, Address::Ip(target), b"spoofed request"),
            a.relay,
        )
        .await
        .unwrap();
    round_trip(&c, a.relay, Address::Ip(target), b"second").await;
    assert!(
        recv(&c, QUIET).await.is_none(),
        "a foreign datagram reached the client"
    );
    assert_eq!(a.metrics.get(Counter::UdpDroppedForeign), 2);
    let (out, _) = a.close().await;
    assert_eq!((out.up_datagrams, out.down_datagrams), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_client_port() {
    let target = echo(v4()).await;
    let c = client(v4()).await;
    let pinned = c.local_addr().unwrap();
    let opts = Opts {
        requested: Address::Ip(SocketAddr::new("0.0.0.0".parse().unwrap(), pinned.port())),
        ..Opts::default()
    };
    let a = Assoc::open(v4(), opts).await;
    // Another socket of the client's IP sends first: it is not the client.
    let other = client(v4()).await;
    other
        .send_to(&datagram(0, Address::Ip(target), b"not me"), a.relay)
        .await
        .unwrap();
    round_trip(&c, a.relay, Address::Ip(target), b"me").await;
    assert!(recv(&other, QUIET).await.is_none());
    assert_eq!(a.metrics.get(Counter::UdpDroppedForeign), 1);
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_refusal_dropped_and_counted() {
    let allowed = echo(v4()).await;
    let refused = echo(v4()).await;
    let opts = Opts {
        allow: Arc::new(move |a| a != refused),
        ..Opts::default()
    };
    let a = Assoc::open(v4(), opts).await;
    let c = client(v4()).await;
    c.send_to(&datagram(0, Address::Ip(refused), b"no"), a.relay)
        .await
        .unwrap();
    round_trip(&c, a.relay, Address::Ip(allowed), b"yes").await;
    assert!(recv(&c, QUIET).await.is_none());
    assert_eq!(a.metrics.get(Counter::UdpDroppedBlocked), 1);
    let (out, _) = a.close().await;
    assert_eq!(out.up_datagrams, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_close_ends_the_association() {
    let target = echo(v4()).await;
    let a = Assoc::open(v4(), Opts::default()).await;
    let c = client(v4()).await;
    round_trip(&c, a.relay, Address::Ip(target), b"x").await;
    let relay = a.relay;
    let started = std::time::Instant::now();
    a.close().await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    // The relay port is closed: the kernel answers with port unreachable.
    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    probe.connect(relay).await.unwrap();
    probe
        .send(&datagram(0, Address::Ip(target), b"late"))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let err = timeout(T, probe.recv(&mut buf))
        .await
        .expect("no answer from the closed port")
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_on_control_are_ignored() {
    use tokio::io::AsyncWriteExt as _;
    let target = echo(v4()).await;
    let mut a = Assoc::open(v4(), Opts::default()).await;
    a.control.write_all(b"anything at all").await.unwrap();
    let c = client(v4()).await;
    round_trip(&c, a.relay, Address::Ip(target), b"still relaying").await;
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_ends_the_association() {
    let target = echo(v4()).await;
    let idle = Duration::from_millis(300);
    let a = Assoc::open(
        v4(),
        Opts {
            idle,
            ..Opts::default()
        },
    )
    .await;
    let c = client(v4()).await;
    // Traffic keeps it open past the idle time...
    for _ in 0..8 {
        round_trip(&c, a.relay, Address::Ip(target), b"keepalive").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!a.task.is_finished(), "ended while in use");
    // ...and silence ends it.
    let started = std::time::Instant::now();
    let Assoc {
        control,
        task,
        metrics,
        ..
    } = a;
    let out = timeout(T, task)
        .await
        .expect("idle association did not end")
        .unwrap()
        .unwrap();
    assert_eq!(out.end, END_IDLE);
    assert!(
        started.elapsed() < idle + Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(out.up_datagrams, 8);
    assert_eq!(metrics.get(Counter::UdpAssociationsActive), 0);
    drop(control);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_ten_thousand() {
    const COUNT: u32 = 10_000;
    const SIZE: usize = 512;
    /// Datagrams in flight: well under what default socket buffers hold.
    const WINDOW: u32 = 64;
    let target = echo(v4()).await;
    let a = Assoc::open(v4(), Opts::default()).await;
    let c = client(v4()).await;
    let mut seen = HashSet::new();
    let mut sent = 0u32;
    let mut buf = vec![0u8; 2048];
    let mut payload = vec![0xA5u8; SIZE];
    let started = std::time::Instant::now();
    while seen.len() < COUNT as usize {
        while sent < COUNT && sent - seen.len() as u32 <= WINDOW {
            payload[..4].copy_from_slice(&sent.to_be_bytes());
            c.send_to(&datagram(0, Address::Ip(target), &payload), a.relay)
                .await
                .unwrap();
            sent += 1;
        }
        let n = match timeout(Duration::from_secs(2), c.recv(&mut buf)).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!("lost datagrams: {} of {sent} sent came back", seen.len()),
        };
        let (header, used) = UdpHeader::decode(&buf[..n]).unwrap();
        assert_eq!(header.address, Address::Ip(target));
        assert_eq!(n - used, SIZE);
        let seq = u32::from_be_bytes(buf[used..used + 4].try_into().unwrap());
        assert!(buf[used + 4..n].iter().all(|&b| b == 0xA5));
        assert!(seen.insert(seq), "datagram {seq} twice");
    }
    eprintln!(
        "{COUNT} round trips of {SIZE} bytes in {:?}",
        started.elapsed()
    );
    let (out, m) = a.close().await;
    let bytes = u64::from(COUNT) * SIZE as u64;
    assert_eq!(
        (
            out.up_datagrams,
            out.up_bytes,
            out.down_datagrams,
            out.down_bytes
        ),
        (u64::from(COUNT), bytes, u64::from(COUNT), bytes)
    );
    for c in [
        Counter::UdpDroppedForeign,
        Counter::UdpDroppedMalformed,
        Counter::UdpDroppedFrag,
        Counter::UdpDroppedBlocked,
    ] {
        assert_eq!(m.get(c), 0, "{c:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_datagrams_intact() {
    let target = echo(v4()).await;
    let a = Assoc::open(v4(), Opts::default()).await;
    let c = client(v4()).await;
    for size in [1400usize, 65_000] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
        let (from, data) = round_trip(&c, a.relay, Address::Ip(target), &payload).await;
        assert_eq!(from, Address::Ip(target));
        assert_eq!(data.len(), size);
        assert!(data == payload, "{size}-byte payload changed");
    }
    let (out, _) = a.close().await;
    assert_eq!((out.up_bytes, out.down_bytes), (66_400, 66_400));
}
