//! The daemon's life as an operator sees it: SIGTERM drains and cleans up (closing at once the
//! sessions still negotiating), a second SIGTERM cuts the drain short, SIGHUP is safe from the first moment and under load, a daemon
//! killed with SIGKILL leaves nothing that stops the next one or outlives it, and a second
//! daemon on the pins of a running one leaves them alone.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use proxy_integration::{
    accept_one,
    checks::{assert_path_used, wait_log, wait_sessions_drained},
    exchange, listen, poll_until,
    procfs::{self, BpfObjects},
    recv_exact, require_privileged, send_and_recv, send_pattern,
    socks::{self},
    within, Daemon, DaemonOpts, DataPath, Echo, Plan, Task,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const LIMIT: Duration = Duration::from_secs(60);
/// Bound for the kernel to free the programs and maps of a daemon that exited.
const FREE_LIMIT: Duration = Duration::from_secs(10);

/// One round trip of `len` bytes each way on an open session whose target echoes.
async fn round_trip(s: &mut TcpStream, seed: u64, len: u64, what: &str) {
    within(LIMIT, what, send_and_recv(s, (seed, len), (seed, len)))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// Waits until a TCP connect to `addr` is refused: the listener is closed.
async fn wait_listener_closed(addr: std::net::SocketAddr) {
    poll_until(
        Duration::from_secs(10),
        "the SOCKS listener to close",
        |last| match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(_) => {
                *last = "connect succeeded".into();
                None
            }
            Err(e) => (e.kind() == std::io::ErrorKind::ConnectionRefused).then_some(()),
        },
    )
    .await;
}

/// The daemon's programs and maps, read while it runs; at least the verdict program and the
/// sockhashes must be there for the later "all gone" check to mean anything.
fn daemon_bpf(d: &Daemon) -> BpfObjects {
    let objs = procfs::bpf_objects(d.pid());
    assert!(
        !objs.progs.is_empty() && objs.maps.len() >= 4,
        "the daemon holds too few BPF objects for the sockmap path: {objs:?}"
    );
    objs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_open_session_then_cleans_up() {
    if !require_privileged("data path sockmap") {
        return;
    }
    let mut daemon = Daemon::start(DaemonOpts {
        extra_toml: "[timeouts]\ndrain = \"60s\"\n".into(),
        ..DaemonOpts::path(DataPath::Sockmap)
    });
    let echo = Echo::start("127.0.0.1:0").await;
    let mut s = socks::connect(daemon.addr(), echo.addr).await;
    round_trip(&mut s, 1, 1 << 20, "before SIGTERM").await;
    assert_path_used(&daemon, DataPath::Sockmap, 1).await;
    let objs = daemon_bpf(&daemon);
    let pin_dir = daemon.pin_dir().to_owned();

    daemon.signal(libc::SIGTERM);
    wait_log(&daemon, "waiting for open sessions to finish", 1).await;
    // No new sessions...
    wait_listener_closed(daemon.addr()).await;
    // ...but the open one goes on transferring, in the kernel, until it ends.
    for seed in 2..5 {
        round_trip(&mut s, seed, 8 << 20, "during the drain").await;
    }
    assert!(daemon.try_wait().is_none(), "the daemon exited mid-drain");
    within(
        LIMIT,
        "closing the session",
        exchange(&mut s, Plan::close()),
    )
    .await
    .unwrap_or_else(|e| panic!("closing the session: {e}"));

    let status = daemon
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the daemon did not exit once its last session ended"));
    assert_eq!(status.code(), Some(0), "exit status after the drain");
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
    procfs::wait_bpf_gone(
        &objs,
        FREE_LIMIT,
        "the daemon's programs and maps to be freed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_ends_the_drain_at_once() {
    if !require_privileged("data path sockmap") {
        return;
    }
    let mut daemon = Daemon::start(DaemonOpts {
        extra_toml: "[timeouts]\ndrain = \"5m\"\n".into(),
        ..DaemonOpts::path(DataPath::Sockmap)
    });
    let echo = Echo::start("127.0.0.1:0").await;
    let mut s = socks::connect(daemon.addr(), echo.addr).await;
    round_trip(&mut s, 7, 64 << 10, "before SIGTERM").await;
    let objs = daemon_bpf(&daemon);
    let pin_dir = daemon.pin_dir().to_owned();

    daemon.signal(libc::SIGTERM);
    wait_log(&daemon, "waiting for open sessions to finish", 1).await;
    assert!(daemon.try_wait().is_none(), "exited before the drain");
    let t0 = Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the daemon ignored the second SIGTERM (drain is 5 min)"));
    eprintln!("exited {:?} after the second SIGTERM", t0.elapsed());
    assert_eq!(status.code(), Some(0));
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
    // The session was cut.
    proxy_integration::wait_closed(&mut s, Duration::from_secs(10), "session after exit").await;
    procfs::wait_bpf_gone(
        &objs,
        FREE_LIMIT,
        "the daemon's programs and maps to be freed",
    )
    .await;
}

/// SIGTERM gives relaying sessions the drain, but does not wait for clients that were granted
/// nothing yet: one that connected and said nothing, and one that has its method and has not
/// sent its request, are closed at once (with negotiation and drain at 5 minutes, waiting for
/// them would hold the daemon for as long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sessions_still_negotiating_and_drains_the_rest() {
    if !require_privileged("SIGTERM with sessions negotiating") {
        return;
    }
    let mut daemon = Daemon::start(DaemonOpts {
        extra_toml: "[timeouts]\nnegotiation = \"5m\"\ndrain = \"5m\"\n".into(),
        ..DaemonOpts::path(DataPath::Splice)
    });
    let echo = Echo::start("127.0.0.1:0").await;
    let mut relaying = socks::connect(daemon.addr(), echo.addr).await;
    round_trip(&mut relaying, 11, 64 << 10, "before SIGTERM").await;
    let mut silent = TcpStream::connect(daemon.addr()).await.expect("connect");
    let mut greeted = TcpStream::connect(daemon.addr()).await.expect("connect");
    greeted
        .write_all(&socks::greeting())
        .await
        .expect("greeting");
    socks::read_method(&mut greeted).await.expect("method");
    proxy_integration::checks::wait_gauge(&daemon, "sessions_negotiating", 2).await;

    daemon.signal(libc::SIGTERM);
    for (s, what) in [
        (&mut silent, "the silent client"),
        (&mut greeted, "the greeted client"),
    ] {
        let (after, got) = proxy_integration::wait_closed(s, Duration::from_secs(5), what).await;
        assert!(got.is_empty(), "{what} got {got:?} before the close");
        eprintln!("{what} closed {after:?} after SIGTERM");
    }
    wait_log(&daemon, "session closed at shutdown", 2).await;
    let log = daemon.stderr_log();
    assert_eq!(
        log.matches("state=\"negotiating\"").count(),
        2,
        "both ended as negotiating sessions:\n{log}"
    );
    // The relaying session is drained as before: it goes on, and the daemon waits for it.
    round_trip(&mut relaying, 12, 1 << 20, "during the drain").await;
    assert!(daemon.try_wait().is_none(), "the daemon exited mid-drain");
    within(
        LIMIT,
        "closing the session",
        exchange(&mut relaying, Plan::close()),
    )
    .await
    .unwrap_or_else(|e| panic!("closing the session: {e}"));
    let status = daemon
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the daemon did not exit once its last session ended"));
    assert_eq!(status.code(), Some(0), "exit status after the drain");
}

/// The address file is the daemon's "ready": a SIGHUP sent the moment it appears must be
/// handled (a reload), not kill the daemon with SIGHUP's default action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_at_the_first_moment_reloads() {
    if !require_privileged("SIGHUP at start-up") {
        return;
    }
    for round in 0..3 {
        let mut daemon = Daemon::start(DaemonOpts::default());
        daemon.sighup();
        daemon.sighup();
        wait_log(&daemon, "configuration reloaded", 1).await;
        assert!(
            daemon.try_wait().is_none(),
            "round {round}: SIGHUP right after start-up ended the daemon: {:?}",
            daemon.try_wait()
        );
        let echo = Echo::start("127.0.0.1:0").await;
        let mut s = socks::connect(daemon.addr(), echo.addr).await;
        round_trip(&mut s, 11, 4096, "after the early SIGHUP").await;
        drop(s);
        daemon.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_under_load_leave_transfers_intact() {
    if !require_privileged("data path sockmap") {
        return;
    }
    const SESSIONS: u64 = 4;
    const LEN: u64 = 48 << 20;
    const RELOADS: usize = 6;
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Sockmap));
    let l = listen("127.0.0.1:0").await;
    let target = l.local_addr().unwrap();
    let mut transfers = Vec::new();
    for i in 0..SESSIONS {
        let mut c = socks::connect(daemon.addr(), target).await;
        let mut t = accept_one(&l).await;
        let (up, down) = (100 + 2 * i, 101 + 2 * i);
        transfers.push(Task::spawn(async move {
            let (a, b) = tokio::join!(
                exchange(
                    &mut c,
                    Plan {
                        send: Some((up, LEN)),
                        recv: (down, LEN),
                    }
                ),
                exchange(
                    &mut t,
                    Plan {
                        send: Some((down, LEN)),
                        recv: (up, LEN),
                    }
                ),
            );
            a.map_err(|e| format!("client {i}: {e}"))?;
            b.map_err(|e| format!("target {i}: {e}"))
        }));
    }
    for n in 0..RELOADS {
        tokio::time::sleep(Duration::from_millis(150)).await;
        daemon.rewrite_config(&format!(
            "[timeouts]\nidle = \"{}m\"\n[log]\nlevel = \"info\"\n",
            10 + n
        ));
        daemon.sighup();
        wait_log(&daemon, "configuration reloaded", n + 1).await;
    }
    for (i, t) in transfers.into_iter().enumerate() {
        let got = t
            .join(LIMIT * 2, &format!("transfer {i}"))
            .await
            .unwrap_or_else(|e| panic!("transfer {i} across {RELOADS} reloads: {e}"));
        assert_eq!(got, LEN);
    }
    assert_path_used(&daemon, DataPath::Sockmap, SESSIONS).await;
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}

/// SIGKILL with spliced sessions open, then a new daemon on the same pin directory: it starts
/// (the stale pins are replaced), serves, and nothing of the first run stays loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_live_sessions_then_restart_on_the_same_pins() {
    if !require_privileged("data path sockmap") {
        return;
    }
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/ebsocks-test-kill9-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let opts = DaemonOpts {
        pin_dir: Some(pin_dir.clone()),
        ..DaemonOpts::path(DataPath::Sockmap)
    };
    let mut first = Daemon::start(opts.clone());
    let l = listen("127.0.0.1:0").await;
    let target = l.local_addr().unwrap();
    let mut live = Vec::new();
    for seed in 0..3u64 {
        let mut c = socks::connect(first.addr(), target).await;
        let mut t = accept_one(&l).await;
        let (mut tr, mut tw) = t.split();
        let (mut cr, mut cw) = c.split();
        within(LIMIT, "transfer before SIGKILL", async {
            tokio::try_join!(
                send_pattern(&mut cw, 200 + seed, 4 << 20),
                recv_exact(&mut tr, 200 + seed, 4 << 20),
                send_pattern(&mut tw, 300 + seed, 1 << 20),
                recv_exact(&mut cr, 300 + seed, 1 << 20),
            )
        })
        .await
        .unwrap_or_else(|e| panic!("transfer before SIGKILL: {e}"));
        live.push((c, t));
    }
    assert_path_used(&first, DataPath::Sockmap, 3).await;
    let objs = daemon_bpf(&first);
    first.signal(libc::SIGKILL);
    let status = first
        .wait_exit(Duration::from_secs(10))
        .expect("SIGKILL did not end the daemon");
    assert_eq!(status.code(), None, "{status}");
    assert!(
        pin_dir.exists(),
        "SIGKILL gives no chance to clean up; the pins are expected to be left"
    );

    let second = Daemon::start(opts);
    wait_log(&second, "removed stale pinned maps", 1).await;
    let echo = Echo::start("127.0.0.1:0").await;
    let mut s = socks::connect(second.addr(), echo.addr).await;
    round_trip(&mut s, 9, 8 << 20, "through the restarted daemon").await;
    assert_path_used(&second, DataPath::Sockmap, 1).await;
    // Its counters start from zero: the first run's pinned maps were replaced, not reused.
    let stats = second.stats();
    assert_eq!(stats.counter("sessions_total_sockmap"), 1, "{stats}");
    procfs::wait_bpf_gone(
        &objs,
        FREE_LIMIT,
        "every program and map of the killed daemon to be freed",
    )
    .await;
    // The sessions the killed daemon carried are dead, not silently half-alive.
    for (i, (mut c, _t)) in live.into_iter().enumerate() {
        let mut b = [0u8; 1];
        let r = within(LIMIT, "old session", async {
            let _ = c.write_all(b"x").await;
            c.read(&mut b).await
        })
        .await;
        assert!(
            !matches!(r, Ok(n) if n > 0),
            "old session {i} still carries data after SIGKILL"
        );
    }
    within(LIMIT, "closing", exchange(&mut s, Plan::close()))
        .await
        .unwrap_or_else(|e| panic!("closing: {e}"));
    wait_sessions_drained(&second).await;
    second.stop();
    assert!(!pin_dir.exists());
}

/// A second daemon started on the pin directory of a running one (the same `pin_dir` in two
/// configurations) serves without pins and says why; the running daemon's pinned counters stay
/// its own, for `ebsocks stats`, while the second runs and after it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_leaves_the_pins_of_a_running_one_alone() {
    if !require_privileged("data path sockmap") {
        return;
    }
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/ebsocks-test-shared-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let opts = DaemonOpts {
        pin_dir: Some(pin_dir.clone()),
        ..DaemonOpts::path(DataPath::Sockmap)
    };
    let echo = Echo::start("127.0.0.1:0").await;
    let first = Daemon::start(opts.clone());
    for seed in 0..2 {
        let mut s = socks::connect(first.addr(), echo.addr).await;
        round_trip(&mut s, seed, 1 << 20, "through the first daemon").await;
    }
    assert_path_used(&first, DataPath::Sockmap, 2).await;

    let second = Daemon::start(opts);
    wait_log(
        &second,
        "is in use by another running daemon (set pin_dir)",
        1,
    )
    .await;
    let mut s = socks::connect(second.addr(), echo.addr).await;
    round_trip(&mut s, 7, 1 << 20, "through the second daemon").await;
    drop(s);
    // The pins are the first daemon's: its two sessions, not the second's one.
    let stats = first.stats();
    assert_eq!(stats.counter("sessions_total_sockmap"), 2, "{stats}");
    second.stop_unpinned();
    assert!(
        pin_dir.exists(),
        "the second daemon removed the first one's pins"
    );
    let stats = first.stats();
    assert_eq!(stats.counter("sessions_total_sockmap"), 2, "{stats}");

    wait_sessions_drained(&first).await;
    first.stop();
    assert!(!pin_dir.exists());
}
