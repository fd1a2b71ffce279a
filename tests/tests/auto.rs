//! `data_path = "auto"`: a session starts on splice(2) and moves into the kernel (the sockhash)
//! once it looks interactive (a run of small chunks) or sits idle; a bulk stream stays on
//! splice(2). After the move every byte still arrives once and in order, the kernel's
//! per-session counters cover the whole session, and half-closes still pass.

use std::time::Duration;

use proxy_integration::{
    accept_one,
    checks::{close_pair, kernel_session_reads},
    listen, poll_until, recv_exact, recv_to_eof, require_privileged, send_and_recv, send_pattern,
    socks, within, Daemon, DaemonOpts, DataPath, Pattern, Stats, Task,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const LIMIT: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(5);

async fn open(daemon: &Daemon) -> (TcpStream, TcpStream) {
    let listener = listen("127.0.0.1:0").await;
    let target_addr = listener.local_addr().unwrap();
    let accept = Task::spawn(async move { accept_one(&listener).await });
    let client = socks::connect(daemon.addr(), target_addr).await;
    let target = accept.join(LIMIT, "target accept").await;
    (client, target)
}

/// `rounds` 64-byte requests from the client, each answered by 64 bytes from the target, the
/// next request only after the answer: request/response traffic.
async fn ping_pong(client: &mut TcpStream, target: &mut TcpStream, rounds: u64, seed: u64) {
    within(LIMIT, "request/response rounds", async {
        for i in 0..rounds {
            let req = Pattern::bytes(seed + i, 64);
            client.write_all(&req).await.unwrap();
            let mut got = [0u8; 64];
            target.read_exact(&mut got).await.unwrap();
            assert_eq!(&got[..], &req[..], "request {i} changed on the way");
            let resp = Pattern::bytes(!(seed + i), 64);
            target.write_all(&resp).await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got[..], &resp[..], "response {i} changed on the way");
        }
    })
    .await;
}

async fn wait_promoted(daemon: &Daemon, n: u64) -> Stats {
    poll_until(SETTLE, &format!("sessions_promoted == {n}"), |last| {
        let s = daemon.stats();
        *last = s.json["counters"].to_string();
        (s.counter("sessions_promoted") == n && s.counter("sessions_active_sockmap") == 1)
            .then_some(s)
    })
    .await
}

async fn wait_ended(daemon: &Daemon) -> Stats {
    poll_until(SETTLE, "the session to end", |last| {
        let s = daemon.stats();
        *last = s.json["counters"].to_string();
        (s.active_sessions() == 0 && s.sessions().is_empty()).then_some(s)
    })
    .await
}

/// Uploads `len` bytes of `seed` from the client, closes both ends and returns the daemon's
/// counters once the session has ended.
async fn upload_and_close(
    daemon: &Daemon,
    mut client: TcpStream,
    mut target: TcpStream,
    seed: u64,
    len: u64,
) -> Stats {
    within(LIMIT, "bulk upload", async {
        tokio::try_join!(
            async {
                send_pattern(&mut client, seed, len).await?;
                client.shutdown().await.map_err(|e| e.to_string())
            },
            async { recv_to_eof(&mut target, seed, len).await.map(drop) },
        )
    })
    .await
    .unwrap_or_else(|e| panic!("bulk upload: {e}"));
    drop((client, target));
    wait_ended(daemon).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_traffic_moves_into_the_kernel() {
    if !require_privileged("data path auto") {
        return;
    }
    const ROUNDS: u64 = 64;
    const BULK: u64 = (2 << 20) + 4_321;
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Auto));
    let (mut client, mut target) = open(&daemon).await;
    ping_pong(&mut client, &mut target, ROUNDS, 0xa070_0000).await;
    let s = wait_promoted(&daemon, 1).await;
    assert_eq!(s.counter("sessions_total_splice"), 1, "{s}");
    assert_eq!(s.counter("sessions_total_sockmap"), 1, "{s}");
    assert_eq!(s.counter("sessions_active_splice"), 0, "{s}");
    // What splice(2) moved before the promotion.
    let (up0, down0) = (
        s.traffic("tcp", "splice", "up"),
        s.traffic("tcp", "splice", "down"),
    );
    assert!(
        up0 > 0 && down0 > 0,
        "nothing moved on splice(2) first: {s}"
    );

    // In the kernel now: more rounds, then a transfer each way at once.
    ping_pong(&mut client, &mut target, ROUNDS, 0xa070_1000).await;
    let c = send_and_recv(&mut client, (0xa070_2001, BULK), (0xa070_2002, BULK));
    let t = send_and_recv(&mut target, (0xa070_2002, BULK), (0xa070_2001, BULK));
    within(LIMIT, "transfer after the promotion", async {
        tokio::try_join!(c, t)
    })
    .await
    .unwrap_or_else(|e| panic!("transfer after the promotion: {e}"));
    let total = 2 * ROUNDS * 64 + BULK;
    let (_, s) = kernel_session_reads(&daemon, total, total).await;
    // The verdict program carried everything after the handover; splice(2) nothing more.
    assert!(
        s.traffic("tcp", "sockmap", "up") + up0 >= total,
        "tcp/sockmap/up does not cover the bytes after the promotion: {s}"
    );
    assert!(
        s.traffic("tcp", "sockmap", "down") + down0 >= total,
        "tcp/sockmap/down does not cover the bytes after the promotion: {s}"
    );
    assert_eq!(s.traffic("tcp", "splice", "up"), up0, "{s}");
    assert_eq!(s.traffic("tcp", "splice", "down"), down0, "{s}");
    assert_eq!(
        s.traffic("tcp", "splice", "up") + s.traffic("tcp", "sockmap", "up"),
        total,
        "every payload byte counted once: {s}"
    );

    close_pair(client, target).await;
    let s = wait_ended(&daemon).await;
    assert_eq!(s.counter("sessions_ended_sockmap"), 1, "{s}");
    assert_eq!(s.counter("sessions_ended_splice"), 1, "{s}");
    assert_eq!(s.counter("sessions_fallback"), 0, "{s}");
    let log = daemon.stderr_log();
    assert!(
        log.contains("splice>sockmap"),
        "the session's log line names both paths: {log}"
    );
    daemon.stop();
}

/// A promotion that meets a sender already streaming: the handover empties the client's
/// receive queue before the insert, and a sender that keeps it busy past 4 MiB sends the session
/// back to splice(2). Whichever way it goes, every byte arrives once and is counted once, in the
/// traffic figures and in the session's end line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_racing_a_bulk_upload_counts_every_byte() {
    if !require_privileged("data path auto") {
        return;
    }
    // Two small chunks a round; the daemon's PROMOTE_STREAK is 16: the last one requests the
    // promotion, and the upload starts as the daemon hands the pair over.
    const ROUNDS: u64 = 8;
    const BULK: u64 = 64 << 20;
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Auto));
    let (mut client, mut target) = open(&daemon).await;
    ping_pong(&mut client, &mut target, ROUNDS, 0xa070_3000).await;
    let s = upload_and_close(&daemon, client, target, 0xa070_3001, BULK).await;
    let total = ROUNDS * 64 + BULK;
    let up: u64 = ["splice", "sockmap", "copy"]
        .iter()
        .map(|p| s.traffic("tcp", p, "up"))
        .sum();
    eprintln!(
        "promoted {}, fell back {}",
        s.counter("sessions_promoted"),
        s.counter("sessions_fallback")
    );
    assert_eq!(up, total, "client-to-target bytes counted: {s}");
    let log = daemon.stderr_log();
    assert!(
        log.contains(&format!("up={total} ")),
        "the session's end line does not say up={total}:\n{log}"
    );
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_moves_into_the_kernel_and_half_closes() {
    if !require_privileged("data path auto") {
        return;
    }
    const FIRST: u64 = 100_000;
    const LATER: u64 = (1 << 20) + 77;
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Auto));
    let (mut client, mut target) = open(&daemon).await;
    // One burst each way on splice(2), then nothing.
    let c = send_and_recv(&mut client, (0x1d1e_0001, FIRST), (0x1d1e_0002, FIRST));
    let t = send_and_recv(&mut target, (0x1d1e_0002, FIRST), (0x1d1e_0001, FIRST));
    within(LIMIT, "the first burst", async { tokio::try_join!(c, t) })
        .await
        .unwrap_or_else(|e| panic!("first burst: {e}"));
    let s = daemon.stats();
    assert_eq!(
        s.counter("sessions_promoted"),
        0,
        "a burst is no reason to move: {s}"
    );
    wait_promoted(&daemon, 1).await;
    kernel_session_reads(&daemon, FIRST, FIRST).await;

    // The target sends more and closes its side; the client must get it all, then EOF, and
    // can still send on its half.
    let (mut cr, mut cw) = client.split();
    let (mut tr, mut tw) = target.split();
    within(LIMIT, "half-close after the promotion", async {
        tokio::try_join!(
            async {
                send_pattern(&mut tw, 0x1d1e_0003, LATER).await?;
                tw.shutdown().await.map_err(|e| e.to_string())
            },
            async { recv_to_eof(&mut cr, 0x1d1e_0003, LATER).await.map(drop) },
        )
    })
    .await
    .unwrap_or_else(|e| panic!("target -> client with a FIN: {e}"));
    within(LIMIT, "the client's half after the target's FIN", async {
        tokio::try_join!(
            async {
                send_pattern(&mut cw, 0x1d1e_0004, LATER).await?;
                cw.shutdown().await.map_err(|e| e.to_string())
            },
            async { recv_to_eof(&mut tr, 0x1d1e_0004, LATER).await.map(drop) },
        )
    })
    .await
    .unwrap_or_else(|e| panic!("client -> target after the target's FIN: {e}"));
    let s = wait_ended(&daemon).await;
    assert_eq!(s.counter("sessions_ended_sockmap"), 1, "{s}");
    assert_eq!(
        s.traffic("tcp", "splice", "up") + s.traffic("tcp", "sockmap", "up"),
        FIRST + LATER,
        "{s}"
    );
    assert_eq!(
        s.traffic("tcp", "splice", "down") + s.traffic("tcp", "sockmap", "down"),
        FIRST + LATER,
        "{s}"
    );
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_stream_stays_on_splice() {
    if !require_privileged("data path auto") {
        return;
    }
    const LEN: u64 = 64 << 20;
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Auto));
    let (client, target) = open(&daemon).await;
    let s = upload_and_close(&daemon, client, target, 0xb01c_0001, LEN).await;
    assert_eq!(
        s.counter("sessions_promoted"),
        0,
        "a bulk stream was promoted: {s}"
    );
    assert_eq!(s.counter("sessions_total_sockmap"), 0, "{s}");
    assert_eq!(s.traffic("tcp", "splice", "up"), LEN, "{s}");
    daemon.stop();
}

/// A session already half-closed when it would be promoted stays on splice(2) and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_idle_session_is_not_promoted() {
    if !require_privileged("data path auto") {
        return;
    }
    const LEN: u64 = 10_000;
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Auto));
    let (mut client, mut target) = open(&daemon).await;
    send_pattern(&mut client, 0x4a1f_0001, LEN).await.unwrap();
    client.shutdown().await.unwrap();
    within(LIMIT, "the client's bytes and FIN", async {
        recv_to_eof(&mut target, 0x4a1f_0001, LEN).await
    })
    .await
    .unwrap();
    // Past the idle promotion delay with one direction closed.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let s = daemon.stats();
    assert_eq!(s.counter("sessions_promoted"), 0, "{s}");
    assert_eq!(s.counter("sessions_active_splice"), 1, "{s}");
    within(LIMIT, "the target's answer", async {
        tokio::try_join!(
            async {
                send_pattern(&mut target, 0x4a1f_0002, LEN).await?;
                target.shutdown().await.map_err(|e| e.to_string())
            },
            recv_exact(&mut client, 0x4a1f_0002, LEN),
        )
    })
    .await
    .unwrap_or_else(|e| panic!("answer on the open half: {e}"));
    let mut rest = Vec::new();
    within(LIMIT, "EOF", client.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty(), "bytes after the answer: {}", rest.len());
    wait_ended(&daemon).await;
    daemon.stop();
}
