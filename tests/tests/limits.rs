//! `[limits]` and `[timeouts] idle`: sessions per client, per-session bandwidth on the
//! in-kernel path, and idle sessions being closed.

use std::time::{Duration, Instant};

use proxy_integration::{
    accept_one,
    checks::{wait_counter, wait_sessions_drained, STATS_SETTLE},
    exchange, listen, poll_until, recv_exact, require_privileged, send_pattern,
    socks::{self},
    wait_closed, within, Daemon, DaemonOpts, DataPath, Echo, Plan, Task,
};
use rstest::rstest;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const LIMIT: Duration = Duration::from_secs(60);

/// A few bytes through an echo session: it is really relaying.
async fn ping(s: &mut TcpStream, what: &str) {
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    within(Duration::from_secs(10), what, s.read_exact(&mut b))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(&b, b"ping", "{what}");
}

/// `max_sessions_per_client = 2`: a third concurrent session from 127.0.0.1 is closed at
/// accept time and counted; once one session ends, a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_per_client() {
    if !require_privileged("limits.max_sessions_per_client") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: "[limits]\nmax_sessions_per_client = 2\n".into(),
        ..DaemonOpts::default()
    });
    let echo = Echo::start("127.0.0.1:0").await;
    let mut s1 = socks::connect(daemon.addr(), echo.addr).await;
    let mut s2 = socks::connect(daemon.addr(), echo.addr).await;
    ping(&mut s1, "session 1").await;
    ping(&mut s2, "session 2").await;

    let mut s3 = within(
        Duration::from_secs(10),
        "connect",
        TcpStream::connect(daemon.addr()),
    )
    .await
    .expect("connect");
    // Whatever it sends, the third connection must be closed without an answer.
    let _ = s3.write_all(&socks::greeting()).await;
    let (_, got) = wait_closed(
        &mut s3,
        Duration::from_secs(2),
        "third session from one client",
    )
    .await;
    assert!(got.is_empty(), "third session got an answer: {got:02x?}");
    wait_counter(&daemon, "connections_refused", 1).await;

    // End session 1 cleanly, then a new session must be served.
    within(
        Duration::from_secs(10),
        "closing session 1",
        exchange(&mut s1, Plan::close()),
    )
    .await
    .unwrap_or_else(|e| panic!("closing session 1: {e}"));
    drop(s1);
    poll_until(STATS_SETTLE, "one relaying session left", |last| {
        let s = daemon.stats();
        *last = s.json["counters"].to_string();
        (s.active_sessions() == 1).then_some(())
    })
    .await;
    let t0 = Instant::now();
    let mut s4 = loop {
        match socks::try_connect(daemon.addr(), echo.addr).await {
            Ok(s) => break s,
            Err(e) if t0.elapsed() < Duration::from_secs(5) => {
                eprintln!("new session not served yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("a session slot was freed 5 s ago, but a new session is refused: {e}"),
        }
    };
    ping(&mut s4, "session 4").await;
    ping(&mut s2, "session 2 again").await;
    drop((s2, s4));
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}

/// `bandwidth = "80mbit"` (10 MB/s per session and direction): 20 MiB each way take at
/// least ~1.5 s (2.1 s at the rate), and the session stays on the sockmap path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_limit_paces_sockmap_session() {
    if !require_privileged("data path sockmap") {
        return;
    }
    const LEN: u64 = 20 << 20;
    const MIN: Duration = Duration::from_millis(1500);
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: "[limits]\nbandwidth = \"80mbit\"\n".into(),
        ..DaemonOpts::path(DataPath::Sockmap)
    });
    let l = listen("127.0.0.1:0").await;
    let target_addr = l.local_addr().unwrap();
    let accept = Task::spawn(async move { accept_one(&l).await });
    let mut client = socks::connect(daemon.addr(), target_addr).await;
    let mut target = accept.join(Duration::from_secs(10), "target accept").await;

    let t0 = Instant::now();
    let (mut cr, mut cw) = client.split();
    let (mut tr, mut tw) = target.split();
    let (up, down) = within(LIMIT, "20 MiB each way at 80 mbit/s", async {
        tokio::try_join!(
            async {
                send_pattern(&mut cw, 0xba0d_0001, LEN)
                    .await
                    .map_err(|e| format!("client send: {e}"))
            },
            async {
                send_pattern(&mut tw, 0xba0d_0002, LEN)
                    .await
                    .map_err(|e| format!("target send: {e}"))
            },
            async {
                recv_exact(&mut tr, 0xba0d_0001, LEN)
                    .await
                    .map_err(|e| format!("target receive: {e}"))?;
                Ok::<_, String>(t0.elapsed())
            },
            async {
                recv_exact(&mut cr, 0xba0d_0002, LEN)
                    .await
                    .map_err(|e| format!("client receive: {e}"))?;
                Ok::<_, String>(t0.elapsed())
            },
        )
    })
    .await
    .map(|(_, _, up, down)| (up, down))
    .unwrap_or_else(|e| panic!("paced transfer: {e}"));
    eprintln!("20 MiB up in {up:?}, down in {down:?} at 80 mbit/s");
    assert!(
        up >= MIN,
        "20 MiB client -> target took {up:?}; 80 mbit/s needs ~2.1 s (at least {MIN:?})"
    );
    assert!(
        down >= MIN,
        "20 MiB target -> client took {down:?}; 80 mbit/s needs ~2.1 s (at least {MIN:?})"
    );

    let s = daemon.stats();
    assert_eq!(
        s.counter("sessions_total_sockmap"),
        1,
        "the paced session must stay spliced: {s}"
    );
    assert_eq!(s.counter("sessions_fallback"), 0, "{s}");
    for path in ["splice", "copy"] {
        for dir in ["up", "down"] {
            assert_eq!(
                s.traffic("tcp", path, dir),
                0,
                "tcp/{path}/{dir} moved bytes: {s}"
            );
        }
    }
    assert!(
        s.traffic("tcp", "sockmap", "up") >= LEN && s.traffic("tcp", "sockmap", "down") >= LEN,
        "{s}"
    );
    within(Duration::from_secs(10), "closing", async {
        tokio::try_join!(
            exchange(&mut client, Plan::close()),
            exchange(&mut target, Plan::sink(0, 0))
        )
    })
    .await
    .unwrap_or_else(|e| panic!("closing: {e}"));
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}

/// `idle = "1s"`: a session that moves a byte every 250 ms stays open past the idle time;
/// once silent it is closed on both sides within a few seconds.
#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_is_closed(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: "[timeouts]\nidle = \"1s\"\n".into(),
        ..DaemonOpts::path(path)
    });
    let l = listen("127.0.0.1:0").await;
    let target_addr = l.local_addr().unwrap();
    let accept = Task::spawn(async move { accept_one(&l).await });
    let mut client = socks::connect(daemon.addr(), target_addr).await;
    let mut target = accept.join(Duration::from_secs(10), "target accept").await;

    // Active for 2.5 s (> idle), alternating directions.
    for i in 0..10u8 {
        let (from, to) = if i % 2 == 0 {
            (&mut client, &mut target)
        } else {
            (&mut target, &mut client)
        };
        from.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        within(
            Duration::from_secs(5),
            "trickle byte",
            to.read_exact(&mut b),
        )
        .await
        .unwrap_or_else(|e| panic!("{path}: active session closed after {i} x 250 ms: {e}"));
        assert_eq!(b[0], i);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (took, got) = wait_closed(
        &mut client,
        Duration::from_secs(6),
        "idle session, client side",
    )
    .await;
    assert!(got.is_empty(), "client got {got:02x?}");
    assert!(
        took >= Duration::from_millis(700),
        "{path}: closed {took:?} after the last byte, before idle (1 s)"
    );
    wait_closed(
        &mut target,
        Duration::from_secs(3),
        "idle session, target side",
    )
    .await;
    eprintln!("{path}: idle session closed {took:?} after the last byte");
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}

/// A `max_sessions` beyond what the open-file limit holds is named at start-up, with both
/// figures; one within it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_limit_beyond_the_open_file_limit_is_named() {
    if !require_privileged("the session limit") {
        return;
    }
    for (max, warned) in [(5000, true), (100, false)] {
        let daemon = Daemon::start(DaemonOpts {
            extra_toml: format!("[limits]\nmax_sessions = {max}\n"),
            wrapper: vec!["prlimit".into(), "--nofile=2000:2000".into()],
            ..DaemonOpts::default()
        });
        let log = daemon.stderr_log();
        assert_eq!(
            log.contains(&format!(
                "limits.max_sessions is {max}, but 2000 open files hold about"
            )),
            warned,
            "max_sessions = {max} under 2,000 open files:\n{log}"
        );
        daemon.stop();
    }
}
