//! The userspace paths (splice, copy) count payload bytes in the pinned
//! traffic map: the rows for the path equal the bytes moved, flushed while
//! the session is still open.

use std::time::Duration;

use proxy_integration::{
    accept_one, checks::wait_sessions_drained, exchange, listen, poll_until, require_privileged,
    send_and_recv, socks, within, Daemon, DaemonOpts, DataPath, Plan, Task,
};
use rstest::rstest;

const LIMIT: Duration = Duration::from_secs(30);
/// The daemon flushes at least once a second.
const FLUSH: Duration = Duration::from_secs(5);

#[rstest]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_rows_equal_bytes_moved(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    const UP: u64 = (7 << 20) + 4_321;
    const DOWN: u64 = (2 << 20) + 1_234;
    const SEED_UP: u64 = 0x3e7c_0001;
    const SEED_DOWN: u64 = 0x3e7c_0002;
    let daemon = Daemon::start(DaemonOpts::path(path));
    let listener = listen("127.0.0.1:0").await;
    let target_addr = listener.local_addr().unwrap();
    let accept = Task::spawn(async move { accept_one(&listener).await });
    let mut client = socks::connect(daemon.addr(), target_addr).await;
    let mut target = accept.join(LIMIT, "target accept").await;
    within(LIMIT, "transfer", async {
        tokio::try_join!(
            send_and_recv(&mut client, (SEED_UP, UP), (SEED_DOWN, DOWN)),
            send_and_recv(&mut target, (SEED_DOWN, DOWN), (SEED_UP, UP)),
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{path}: transfer: {e}"));

    let p = path.as_str();
    let s = poll_until(
        FLUSH,
        &format!("tcp/{p} rows to read up {UP}, down {DOWN} (session still open)"),
        |last| {
            let s = daemon.stats();
            let (up, down) = (s.traffic("tcp", p, "up"), s.traffic("tcp", p, "down"));
            *last = format!("up {up}, down {down}");
            assert!(
                up <= UP && down <= DOWN,
                "{path}: rows exceed the payload moved (up {UP}, down {DOWN}): {s}"
            );
            (up == UP && down == DOWN).then_some(s)
        },
    )
    .await;
    for other in ["sockmap", "splice", "copy"]
        .into_iter()
        .filter(|o| *o != p)
    {
        for dir in ["up", "down"] {
            assert_eq!(
                s.traffic("tcp", other, dir),
                0,
                "{path} daemon counted tcp/{other}/{dir}: {s}"
            );
        }
    }
    assert_eq!(s.counter(&format!("sessions_active_{p}")), 1, "{s}");
    assert!(
        s.sessions().is_empty(),
        "`sessions` lists sockmap sessions only: {s}"
    );

    within(LIMIT, "closing the session", async {
        tokio::try_join!(
            exchange(&mut client, Plan::close()),
            exchange(&mut target, Plan::sink(0, 0))
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{path}: closing: {e}"));
    wait_sessions_drained(&daemon).await;
    let s = daemon.stats();
    assert_eq!(s.counter(&format!("sessions_total_{p}")), 1, "{s}");
    assert_eq!(
        (s.traffic("tcp", p, "up"), s.traffic("tcp", p, "down")),
        (UP, DOWN),
        "rows changed after the session ended: {s}"
    );
    daemon.stop();
}
