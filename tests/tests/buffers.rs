//! Socket buffers per data path (README, "Socket buffers"): a near socket (loopback here)
//! carrying a bulk direction on splice(2) or copy gets fixed 256 KiB buffers, the receive
//! buffer where the direction reads and the send buffer where it writes, and only then;
//! sockets entering the sockhash get 4 MiB send buffers (and, being near, receive buffers),
//! which also undoes the fit of a session promoted under `auto`. The figures are read from the
//! kernel (`ss -tm`), so the test fails if the daemon sizes nothing.

use std::{net::SocketAddr, time::Duration};

use proxy_integration::{
    accept_one,
    checks::{close_pair, wait_counter},
    listen, poll_until,
    procfs::{sysctl, tcp_buffers},
    recv_exact, require_privileged, send_pattern, socks, within, Daemon, DaemonOpts, DataPath,
    Pattern, Task,
};
use rstest::rstest;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const LIMIT: Duration = Duration::from_secs(30);
const BULK: u64 = 4 << 20;
/// What the daemon asks for a fitted socket, and for the sockhash (before the kernel doubles
/// it, capped at the system maximum first).
const FIT: u64 = 256 << 10;
const KERNEL: u64 = 4 << 20;

/// One session's four sockets as the daemon holds two of them.
struct Pair {
    client: TcpStream,
    target: TcpStream,
    /// The daemon's socket facing the client: (local, peer).
    daemon_client: (SocketAddr, SocketAddr),
    /// The daemon's socket facing the target.
    daemon_upstream: (SocketAddr, SocketAddr),
}

impl Pair {
    async fn open(daemon: &Daemon) -> Self {
        let listener = listen("127.0.0.1:0").await;
        let target_addr = listener.local_addr().unwrap();
        let accept = Task::spawn(async move { accept_one(&listener).await });
        let client = socks::connect(daemon.addr(), target_addr).await;
        let target = accept.join(LIMIT, "target accept").await;
        Self {
            daemon_client: (daemon.addr(), client.local_addr().unwrap()),
            daemon_upstream: (target.peer_addr().unwrap(), target.local_addr().unwrap()),
            client,
            target,
        }
    }

    /// (rcvbuf, sndbuf) of the daemon's client-side and upstream sockets.
    fn buffers(&self) -> ((u64, u64), (u64, u64)) {
        let get = |(l, p): (SocketAddr, SocketAddr)| {
            tcp_buffers(l, p).unwrap_or_else(|| panic!("no daemon socket {l} -> {p}"))
        };
        (get(self.daemon_client), get(self.daemon_upstream))
    }

    /// [`BULK`] bytes client -> target, checked at the target.
    async fn upload(&mut self, seed: u64) {
        transfer(&mut self.client, &mut self.target, seed, "upload").await;
    }

    /// [`BULK`] bytes target -> client, checked at the client.
    async fn download(&mut self, seed: u64) {
        transfer(&mut self.target, &mut self.client, seed, "download").await;
    }

    /// 64-byte requests, each answered before the next.
    async fn ping_pong(&mut self, rounds: u64) {
        let (c, t) = (&mut self.client, &mut self.target);
        within(LIMIT, "request/response rounds", async {
            for i in 0..rounds {
                let req = Pattern::bytes(0x5b5b_0000 + i, 64);
                c.write_all(&req).await.unwrap();
                let mut got = [0u8; 64];
                t.read_exact(&mut got).await.unwrap();
                assert_eq!(got[..], req[..], "request {i}");
                t.write_all(&got).await.unwrap();
                c.read_exact(&mut got).await.unwrap();
                assert_eq!(got[..], req[..], "response {i}");
            }
        })
        .await;
    }
}

async fn transfer(from: &mut TcpStream, to: &mut TcpStream, seed: u64, what: &str) {
    within(LIMIT, what, async {
        tokio::try_join!(send_pattern(from, seed, BULK), recv_exact(to, seed, BULK))
    })
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// The size the kernel keeps for a request of `want` under the maximum at `max` (`SO_RCVBUF`
/// and `SO_SNDBUF` double the value after capping it).
fn kept(want: u64, max: &str) -> u64 {
    2 * want.min(sysctl(max))
}

/// Whether this system lets the daemon give sockhash sockets their buffers: system maximums of
/// at least 2 MiB, and a send buffer no smaller than autotuning's own ceiling. Where it does
/// not, a session that may be promoted is not fitted either.
fn kernel_sizes_allowed() -> bool {
    let snd = sysctl("net/core/wmem_max").min(KERNEL);
    let rcv = sysctl("net/core/rmem_max").min(KERNEL);
    snd >= 2 << 20 && rcv >= 2 << 20 && 2 * snd >= sysctl("net/ipv4/tcp_wmem")
}

#[rstest]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_direction_fits_its_near_sockets(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::path(path));
    let mut pair = Pair::open(&daemon).await;
    let (fit_rcv, fit_snd) = (
        kept(FIT, "net/core/rmem_max"),
        kept(FIT, "net/core/wmem_max"),
    );

    // Small exchanges fit nothing.
    pair.ping_pong(32).await;
    assert_eq!(daemon.stats().counter("buffers_fitted"), 0);
    let ((c_rcv, _), (_, u_snd)) = pair.buffers();
    assert_ne!(
        c_rcv, fit_rcv,
        "client-side receive buffer fitted before any bulk"
    );
    assert_ne!(
        u_snd, fit_snd,
        "upstream send buffer fitted before any bulk"
    );

    // An upload fits the socket it reads (client side) and the one it writes (upstream).
    pair.upload(0x5b5b_1001).await;
    wait_counter(&daemon, "buffers_fitted", 2).await;
    let ((c_rcv, c_snd), (u_rcv, u_snd)) = pair.buffers();
    assert_eq!(
        c_rcv, fit_rcv,
        "client-side receive buffer after the upload"
    );
    assert_eq!(u_snd, fit_snd, "upstream send buffer after the upload");
    assert_ne!(
        c_snd, fit_snd,
        "the download direction's sockets are not fitted yet"
    );
    assert_ne!(
        u_rcv, fit_rcv,
        "the download direction's sockets are not fitted yet"
    );

    // A download fits the other two.
    pair.download(0x5b5b_1002).await;
    wait_counter(&daemon, "buffers_fitted", 4).await;
    let ((c_rcv, c_snd), (u_rcv, u_snd)) = pair.buffers();
    assert_eq!(
        (c_rcv, c_snd),
        (fit_rcv, fit_snd),
        "client-side socket after both"
    );
    assert_eq!(
        (u_rcv, u_snd),
        (fit_rcv, fit_snd),
        "upstream socket after both"
    );

    // Still exact after the fit.
    pair.upload(0x5b5b_1003).await;
    pair.download(0x5b5b_1004).await;
    assert_eq!(
        daemon.stats().counter("buffers_fitted"),
        4,
        "fitted once per direction"
    );
    close_pair(pair.client, pair.target).await;
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_session_gets_the_kernel_sizes_back() {
    if !require_privileged("data path auto") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Auto));
    let mut pair = Pair::open(&daemon).await;
    let allowed = kernel_sizes_allowed();
    pair.upload(0x5b5b_2001).await;
    if allowed {
        wait_counter(&daemon, "buffers_fitted", 2).await;
        let ((c_rcv, _), (_, u_snd)) = pair.buffers();
        assert_eq!(c_rcv, kept(FIT, "net/core/rmem_max"));
        assert_eq!(u_snd, kept(FIT, "net/core/wmem_max"));
    }
    // Request/response traffic moves the session into the kernel.
    pair.ping_pong(64).await;
    poll_until(LIMIT, "the promotion", |last| {
        let s = daemon.stats();
        *last = s.json["counters"].to_string();
        (s.counter("sessions_promoted") == 1).then_some(())
    })
    .await;
    let s = daemon.stats();
    if allowed {
        let want = (
            kept(KERNEL, "net/core/rmem_max"),
            kept(KERNEL, "net/core/wmem_max"),
        );
        let (client_side, upstream) = pair.buffers();
        assert_eq!(client_side, want, "client-side socket in the sockhash");
        assert_eq!(upstream, want, "upstream socket in the sockhash");
    } else {
        assert_eq!(
            s.counter("buffers_fitted"),
            0,
            "a fit the sockhash could not undo: {s}"
        );
    }
    // The kernel carries bulk after the promotion, every byte once.
    let before = s.traffic("tcp", "sockmap", "up");
    pair.upload(0x5b5b_2002).await;
    pair.download(0x5b5b_2003).await;
    poll_until(LIMIT, "the kernel's count of the upload", |last| {
        let s = daemon.stats();
        *last = s.to_string();
        (s.traffic("tcp", "sockmap", "up") >= before + BULK).then_some(())
    })
    .await;
    close_pair(pair.client, pair.target).await;
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockhash_sockets_get_the_kernel_sizes() {
    if !require_privileged(&DataPath::Sockmap.feature()) {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Sockmap));
    let mut pair = Pair::open(&daemon).await;
    pair.ping_pong(4).await;
    let (client_side, upstream) = pair.buffers();
    if kernel_sizes_allowed() {
        let want = (
            kept(KERNEL, "net/core/rmem_max"),
            kept(KERNEL, "net/core/wmem_max"),
        );
        assert_eq!(client_side, want, "client-side socket");
        assert_eq!(upstream, want, "upstream socket");
    }
    pair.upload(0x5b5b_3001).await;
    pair.download(0x5b5b_3002).await;
    assert_eq!(
        daemon.stats().counter("buffers_fitted"),
        0,
        "the sockhash fits nothing"
    );
    close_pair(pair.client, pair.target).await;
    daemon.stop();
}
