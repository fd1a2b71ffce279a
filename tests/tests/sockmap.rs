//! Proof that the sockmap path moves payload in the kernel: the verdict
//! program's counters match the bytes moved exactly, the daemon moves payload
//! itself only after a brake (and says so), and a reader that stops stops its
//! sender.

use std::time::Duration;

use proxy_integration::{
    accept_one,
    checks::{close_pair, kernel_session_reads},
    listen, poll_until, recv_exact, require_privileged, send_and_recv, socks, within, Daemon,
    DaemonOpts, DataPath, Pattern, SessionRow, Stats, Task,
};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(5);
const SEED_UP: u64 = 0x50c4_0001;
const SEED_DOWN: u64 = 0x50c4_0002;

/// Held by each bulk test for its whole run: two of them at once on a 2-vCPU machine measure
/// CPU contention rather than the property each one checks.
static BULK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A live session through a sockmap daemon, with both sockets.
struct Session {
    client: TcpStream,
    target: TcpStream,
}

/// Opens a session and waits until the daemon lists it under `sessions`
/// (that is, it is on the sockmap path) before any payload is sent, so the
/// counts below cover the verdict program only.
async fn open(daemon: &Daemon) -> Session {
    let listener = listen("127.0.0.1:0").await;
    let target_addr = listener.local_addr().unwrap();
    let accept = Task::spawn(async move { accept_one(&listener).await });
    let client = socks::connect(daemon.addr(), target_addr).await;
    let target = accept.join(LIMIT, "target accept").await;
    poll_until(
        SETTLE,
        "the session to be listed under `sessions`",
        |last| {
            let s = daemon.stats();
            *last = s.json["sessions"].to_string();
            (s.sessions().len() == 1).then_some(())
        },
    )
    .await;
    Session { client, target }
}

/// Sends `up` bytes client -> target and `down` bytes target -> client at the
/// same time and waits until both have fully arrived; nothing is closed.
async fn transfer(s: &mut Session, seeds: (u64, u64), up: u64, down: u64) {
    let Session { client, target } = s;
    let c = send_and_recv(client, (seeds.0, up), (seeds.1, down));
    let t = send_and_recv(target, (seeds.1, down), (seeds.0, up));
    within(LIMIT, "transfer through the live session", async {
        tokio::try_join!(c, t)
    })
    .await
    .unwrap_or_else(|e| panic!("transfer ({up} up, {down} down): {e}"));
}

/// Closes the session from both ends, client first.
async fn close(s: Session) {
    let Session { client, target } = s;
    close_pair(client, target).await;
}

/// The only `sessions` entry, once its counters equal (up, down).
async fn session_with(daemon: &Daemon, up: u64, down: u64) -> (SessionRow, Stats) {
    kernel_session_reads(daemon, up, down).await
}

fn assert_userspace_rows_zero(s: &Stats) {
    for path in ["splice", "copy"] {
        for dir in ["up", "down"] {
            assert_eq!(
                s.traffic("tcp", path, dir),
                0,
                "a sockmap-only daemon counted tcp/{path}/{dir} traffic: {s}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_counters_match_bytes_moved() {
    if !require_privileged("data path sockmap") {
        return;
    }
    // Odd sizes so that an off-by-one or a negotiation byte counted as
    // payload shows.
    const UP: u64 = (3 << 20) + 12_345;
    const DOWN: u64 = (5 << 20) + 6_789;
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Sockmap));
    let mut session = open(&daemon).await;
    transfer(&mut session, (SEED_UP, SEED_DOWN), UP, DOWN).await;

    let (row, s) = session_with(&daemon, UP, DOWN).await;
    assert_eq!(row.path, "sockmap", "{row:?}");
    assert!(row.up_packets > 0 && row.down_packets > 0, "{row:?}");
    assert!(
        s.traffic("tcp", "sockmap", "up") >= UP,
        "traffic tcp/sockmap/up < {UP}: {s}"
    );
    assert!(
        s.traffic("tcp", "sockmap", "down") >= DOWN,
        "traffic tcp/sockmap/down < {DOWN}: {s}"
    );
    assert!(
        s.counter("sessions_total_sockmap") >= 1,
        "counters.sessions_total_sockmap >= 1 with a live sockmap session: {s}"
    );
    assert_eq!(
        s.counter("sessions_active_sockmap"),
        1,
        "counters.sessions_active_sockmap with one live sockmap session: {s}"
    );
    assert_userspace_rows_zero(&s);

    close(session).await;
    poll_until(
        SETTLE,
        "sessions_active_sockmap to return to 0 and `sessions` to empty",
        |last| {
            let s = daemon.stats();
            *last = format!(
                "counters {}, sessions {}",
                s.json["counters"], s.json["sessions"]
            );
            (s.counter("sessions_active_sockmap") == 0 && s.sessions().is_empty()).then_some(())
        },
    )
    .await;
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_carries_the_payload() {
    if !require_privileged("data path sockmap") {
        return;
    }
    let _bulk = BULK.lock().await;
    const LEN: u64 = 64 << 20;
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Sockmap));
    let mut session = open(&daemon).await;
    transfer(&mut session, (SEED_UP, SEED_DOWN), LEN, LEN).await;
    let (_, s) = session_with(&daemon, LEN, LEN).await;
    assert_userspace_rows_zero(&s);
    // The only payload the daemon may touch on this path is what a brake held back while the
    // kernel's backlog towards a peer was too long (counted separately); the kernel carried
    // the rest.
    let held = s.counter("sockmap_brake_bytes");
    assert!(
        held < 2 * LEN,
        "the daemon moved all {held} payload bytes itself: {s}"
    );
    eprintln!(
        "bytes moved by the daemon after brakes: {held} of {}",
        2 * LEN
    );
    close(session).await;
    daemon.stop();
}

/// The kernel's redirect ignores how much the receiving side can take. A
/// target that stops reading must close TCP's window on the client instead
/// of letting the proxy queue the client's bytes without bound; once the
/// target reads again every byte arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_stops_the_sender() {
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    };
    use tokio::io::AsyncWriteExt as _;

    if !require_privileged("data path sockmap") {
        return;
    }
    let _bulk = BULK.lock().await;
    const LEN: u64 = 256 << 20;
    // Socket buffers on both hops plus the brake's allowance; far below LEN.
    const MAX_QUEUED: u64 = 64 << 20;
    const SEED: u64 = 0x50c4_0003;
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Sockmap));
    let Session {
        mut client,
        mut target,
    } = open(&daemon).await;

    let written = Arc::new(AtomicU64::new(0));
    let progress = written.clone();
    let writer = Task::spawn(async move {
        let mut p = Pattern::new(SEED);
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < LEN {
            let n = (LEN - sent).min(buf.len() as u64) as usize;
            p.fill(&mut buf[..n]);
            client.write_all(&buf[..n]).await.expect("client write");
            sent += n as u64;
            progress.store(sent, Ordering::Relaxed);
        }
        client
    });

    // The target reads nothing for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let queued = written.load(Ordering::Relaxed);
    assert!(
        queued < MAX_QUEUED,
        "the client could write {queued} bytes while the target read nothing"
    );
    assert!(queued > 0, "nothing was written at all");
    let s = daemon.stats();
    assert!(s.counter("sockmap_brakes") >= 1, "no brake counted: {s}");

    within(
        LIMIT,
        "the target reading everything",
        recv_exact(&mut target, SEED, LEN),
    )
    .await
    .unwrap_or_else(|e| panic!("after the stall: {e}"));
    let client = writer.join(LIMIT, "the client writer").await;
    let (row, _) = session_with(&daemon, LEN, 0).await;
    assert_eq!(row.path, "sockmap", "{row:?}");
    eprintln!("queued while stalled: {queued} bytes");
    close(Session { client, target }).await;
    daemon.stop();
}
