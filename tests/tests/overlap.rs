//! A TCP retransmission that repeats bytes the proxy already received must reach the target
//! once.
//!
//! TCP queues a segment that overlaps received bytes (`seq < rcv_nxt < end_seq`) whole and
//! leaves the cut to whoever reads the queue. `recv(2)` and `splice(2)` cut it; the kernel's
//! sockmap verdict path takes whole skbs and, left alone, forwards the repeated head again. A
//! sender retransmits like this when a segment's acknowledgement comes late (under load, a
//! tail loss probe after a brake). Here the client's segment is made by hand: the client runs
//! in its own network namespace, its socket's sequence numbers are read with `TCP_REPAIR`, and
//! a raw socket sends one segment that repeats the last 700 bytes sent and adds 700 new ones;
//! the client's own socket then sends from where it had stopped, repeating those 700 in turn.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use proxy_integration::{
    netns::{self, Topology},
    poll_until, socks, within, Daemon, DataPath, Pattern, Task,
};
use rstest::rstest;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const LIMIT: Duration = Duration::from_secs(20);
const SEED: u64 = 0x0e71_a901;
/// Sent normally before the forged segment.
const FIRST: usize = 4000;
/// Bytes of the forged segment that repeat the end of `FIRST`.
const OVERLAP: usize = 700;
/// Bytes of the forged segment that are new.
const NEW: usize = 700;
const TOTAL: usize = 64 * 1024;

// linux/tcp.h
const TCP_REPAIR: libc::c_int = 19;
const TCP_REPAIR_QUEUE: libc::c_int = 20;
const TCP_QUEUE_SEQ: libc::c_int = 21;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;

fn setsockopt(fd: RawFd, name: libc::c_int, value: libc::c_int) {
    // SAFETY: plain setsockopt(2) with an int option.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt(IPPROTO_TCP, {name}, {value}): {}",
        std::io::Error::last_os_error()
    );
}

fn getsockopt(fd: RawFd, name: libc::c_int) -> u32 {
    let mut value: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: plain getsockopt(2) into a u32.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "getsockopt(IPPROTO_TCP, {name}): {}",
        std::io::Error::last_os_error()
    );
    value
}

/// The socket's next send sequence number and the next one it expects to receive.
fn sequence_numbers(fd: RawFd) -> (u32, u32) {
    setsockopt(fd, TCP_REPAIR, 1);
    setsockopt(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE);
    let snd = getsockopt(fd, TCP_QUEUE_SEQ);
    setsockopt(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE);
    let rcv = getsockopt(fd, TCP_QUEUE_SEQ);
    setsockopt(fd, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP);
    (snd, rcv)
}

/// Bytes the socket sent that its peer has not acknowledged (`SIOCOUTQ`).
fn unacked(fd: RawFd) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut n) };
    assert_eq!(rc, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    n
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum_words(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// An IPv4 packet carrying one TCP segment (flags ACK and PSH, no options).
fn segment(
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    window: u16,
    payload: &[u8],
) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("IPv4 only");
    };
    let tcp_len = 20 + payload.len();
    let mut tcp = Vec::with_capacity(tcp_len);
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, 0x18]);
    tcp.extend_from_slice(&window.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&s.octets());
    pseudo.extend_from_slice(&d.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    let csum = fold(sum_words(&pseudo) + sum_words(&tcp));
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());

    let total = (20 + tcp_len) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_TCP as u8, 0, 0]);
    ip.extend_from_slice(&s.octets());
    ip.extend_from_slice(&d.octets());
    let csum = fold(sum_words(&ip));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// Sends `packet` (a whole IPv4 packet) from a raw socket in the calling thread's namespace.
fn send_raw(packet: &[u8], to: Ipv4Addr) {
    // SAFETY: plain socket(2); IPPROTO_RAW implies IP_HDRINCL.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: just opened, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_addr.s_addr = u32::from(to).to_be();
    // SAFETY: `packet` and `sa` are valid for the call.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(
        n,
        packet.len() as isize,
        "raw send: {}",
        std::io::Error::last_os_error()
    );
}

/// `pipelined`: the first bytes go with the request, so the daemon reads them itself before the
/// handover and the forged segment is the first skb the verdict sees: it must be cut against
/// where the daemon stopped reading (the socket's `copied_seq`), not against itself.
#[rstest]
#[case::sockmap(DataPath::Sockmap, false)]
#[case::splice(DataPath::Splice, false)]
#[case::auto(DataPath::Auto, false)]
#[case::sockmap_first_skb(DataPath::Sockmap, true)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmission_overlapping_received_bytes_arrives_once(
    #[case] path: DataPath,
    #[case] pipelined: bool,
) {
    if !netns::require("TCP overlap through the proxy, sockmap path included") {
        return;
    }
    let t = Topology::new();
    // Segments without options, so that the forged one looks like the socket's own.
    t.client.sysctl("net/ipv4/tcp_timestamps", "0");
    let daemon = Daemon::start(t.proxy_daemon(path, false, ""));
    let listener = t
        .target
        .enter(|| std::net::TcpListener::bind(SocketAddr::new(t.target_ip(false), 0)))
        .expect("target listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let target_addr = listener.local_addr().expect("target address");
    let accept = Task::spawn(async move { listener.accept().await.map(|(s, _)| s) });

    let stream = Pattern::bytes(SEED, TOTAL);
    let mut client = Topology::tcp(&t.client, daemon.addr());
    client
        .write_all(&socks::greeting())
        .await
        .expect("greeting");
    socks::read_method(&mut client).await.expect("method");
    let mut request = socks::request(1, &target_addr.into());
    if pipelined {
        request.extend_from_slice(&stream[..FIRST]);
    }
    client.write_all(&request).await.expect("request");
    let reply = socks::read_reply(&mut client).await.expect("reply");
    assert_eq!(reply.code, 0, "CONNECT failed: {reply:?}");
    let mut target = accept
        .join(LIMIT, "the target's accept")
        .await
        .expect("accept");
    if path == DataPath::Sockmap {
        poll_until(LIMIT, "the session to enter the sockhash", |_| {
            (daemon.stats().counter("sessions_active_sockmap") == 1).then_some(())
        })
        .await;
    }

    if !pipelined {
        client
            .write_all(&stream[..FIRST])
            .await
            .expect("first write");
    }
    let mut got = vec![0u8; FIRST];
    within(LIMIT, "the first bytes", target.read_exact(&mut got))
        .await
        .expect("target read");
    assert_eq!(got, stream[..FIRST], "the first bytes differ");
    let fd = client.as_raw_fd();
    poll_until(LIMIT, "the client's bytes to be acknowledged", |_| {
        (unacked(fd) == 0).then_some(())
    })
    .await;

    // One segment repeating the last OVERLAP bytes and adding NEW ones, as a retransmission
    // that found part of its data already received.
    let (snd, rcv) = sequence_numbers(fd);
    let src = client.local_addr().expect("client address");
    let dst = client.peer_addr().expect("proxy address");
    let forged = segment(
        src,
        dst,
        snd.wrapping_sub(OVERLAP as u32),
        rcv,
        512,
        &stream[FIRST - OVERLAP..FIRST + NEW],
    );
    let IpAddr::V4(to) = dst.ip() else {
        unreachable!()
    };
    t.client.enter(|| send_raw(&forged, to));

    // The client's socket sends on from where it stopped: its first NEW bytes repeat the
    // forged segment's tail.
    let sender = Task::spawn(async move {
        client
            .write_all(&stream[FIRST..])
            .await
            .expect("rest of the stream");
        client.shutdown().await.expect("shutdown");
        client
    });
    let mut rest = Vec::new();
    within(
        LIMIT,
        "the target's read to EOF",
        target.read_to_end(&mut rest),
    )
    .await
    .expect("target read");
    let client = sender.join(LIMIT, "the client's writes").await;
    let mut all = got;
    all.extend_from_slice(&rest);
    if let Some(at) = all
        .iter()
        .zip(&Pattern::bytes(SEED, TOTAL))
        .position(|(a, b)| a != b)
    {
        panic!(
            "{path:?} (pipelined: {pipelined}): {}; the target got {} bytes of {TOTAL}",
            proxy_integration::pattern::describe_mismatch(SEED, at as u64, &all[at..]),
            all.len()
        );
    }
    assert_eq!(all.len(), TOTAL, "{path:?}: the target got extra bytes");
    drop((client, target));

    if path == DataPath::Sockmap {
        let s = poll_until(LIMIT, "the session to end", |_| {
            let s = daemon.stats();
            (s.counter("sessions_active_sockmap") == 0).then_some(s)
        })
        .await;
        let cut = s.counter("sockmap_overlap_bytes");
        assert!(
            cut >= OVERLAP as u64,
            "sockmap_overlap_bytes is {cut}, under the {OVERLAP} bytes the forged segment repeated: {s}"
        );
    }
    daemon.stop();
}
