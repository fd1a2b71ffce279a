//! `data_path = "auto"`: a session that has not moved payload shortly after its reply waits as
//! a parked record with no task (`sessions_parked` while `sessions_active_splice`). Its first
//! byte from either side, its FIN or a reset gives it back to splice(2) with nothing lost; a
//! session still quiet a second after its reply is promoted to the sockhash from the record;
//! its idle timeout and the end of the shutdown drain close it and log it.

use std::time::Duration;

use proxy_integration::{
    checks::{close_pair, wait_gauge, wait_log, wait_sessions_drained},
    exchange, poll_until, recv_exact, require_privileged, send_and_recv, send_pattern, socks,
    wait_closed, within, Daemon, DaemonOpts, DataPath, Plan, Stats,
};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

const LIMIT: Duration = Duration::from_secs(30);
/// How long the checks made before the promotion (a second after each session's reply) may
/// take: they must see the quiet sessions still on splice(2).
const BEFORE_PROMOTION: Duration = Duration::from_millis(900);

/// `len` bytes of `seed` from one end of a session to the other.
async fn one_way(
    from: &mut TcpStream,
    to: &mut TcpStream,
    seed: u64,
    len: u64,
) -> Result<(), String> {
    tokio::try_join!(send_pattern(from, seed, len), recv_exact(to, seed, len)).map(drop)
}

/// Waits, within [`BEFORE_PROMOTION`], for `parked` parked sessions while `splice` sessions are
/// on splice(2) and none was promoted: the quiet ones wait parked on splice(2).
async fn wait_quiet(daemon: &Daemon, parked: u64, splice: u64) -> Stats {
    poll_until(
        BEFORE_PROMOTION,
        &format!("{parked} parked sessions with {splice} on splice(2) and none promoted"),
        |last| {
            let s = daemon.stats();
            *last = s.json["counters"].to_string();
            (s.counter("sessions_parked") == parked
                && s.counter("sessions_active_splice") == splice
                && s.counter("sessions_promoted") == 0)
                .then_some(s)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_sessions_wait_parked_until_their_first_byte() {
    if !require_privileged("data path auto") {
        return;
    }
    const SESSIONS: usize = 16;
    const LEN: u64 = 200_000;
    const LATER: u64 = (1 << 20) + 123;
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Auto));
    let mut pairs = socks::open_pairs(daemon.addr(), SESSIONS).await;
    wait_quiet(&daemon, SESSIONS as u64, SESSIONS as u64).await;

    // The client talks first on sessions 0-3, the target on 4-7: each wakes its session, which
    // relays on splice(2) with nothing lost.
    for (i, (client, target)) in pairs[..8].iter_mut().enumerate() {
        let (a, b) = (0x0071_e700 + 2 * i as u64, 0x0071_e701 + 2 * i as u64);
        within(LIMIT, "the first payload of a quiet session", async {
            if i < 4 {
                one_way(client, target, a, LEN).await?;
                one_way(target, client, b, LEN).await
            } else {
                one_way(target, client, b, 100).await?;
                one_way(client, target, a, LEN).await
            }
        })
        .await
        .unwrap_or_else(|e| panic!("session {i}: {e}"));
    }
    // Session 8's client half-closes while quiet; its target still answers, then closes.
    let (mut client, mut target) = pairs.remove(8);
    client.shutdown().await.unwrap();
    within(LIMIT, "half-close of a quiet session", async {
        tokio::try_join!(
            exchange(
                &mut target,
                Plan {
                    send: Some((0x0071_e800, LEN)),
                    recv: (0, 0),
                }
            ),
            exchange(
                &mut client,
                Plan {
                    send: None,
                    recv: (0x0071_e800, LEN),
                }
            ),
        )
    })
    .await
    .unwrap_or_else(|e| panic!("half-closed quiet session: {e}"));
    // Session 9 (now 8) is reset by its client: the target sees the close.
    let (client, mut target) = pairs.remove(8);
    #[expect(deprecated, reason = "a zero linger does not block")]
    client.set_linger(Some(Duration::ZERO)).unwrap();
    drop(client);
    wait_closed(&mut target, LIMIT, "the target of a reset quiet session").await;
    // The six never woken are still parked; the payload above could only pass because the
    // woken eight left the parking for splice(2).
    let quiet = (SESSIONS - 10) as u64;

    // A second after its reply, every session that has been quiet since is promoted from its
    // record to the sockhash (the eight woken ones too, once idle for a second).
    let open = (SESSIONS - 2) as u64;
    wait_gauge(&daemon, "sessions_promoted", open).await;
    wait_gauge(&daemon, "sessions_active_sockmap", open).await;
    wait_gauge(&daemon, "sessions_parked", open).await;
    let s = daemon.stats();
    let (up0, down0) = (
        s.traffic("tcp", "sockmap", "up"),
        s.traffic("tcp", "sockmap", "down"),
    );
    let spliced = (
        s.traffic("tcp", "splice", "up"),
        s.traffic("tcp", "splice", "down"),
    );
    // The kernel carries the sessions promoted without ever moving a byte: exactly.
    for (i, (client, target)) in pairs[8..].iter_mut().enumerate() {
        let (a, b) = (0x0071_e900 + 2 * i as u64, 0x0071_e901 + 2 * i as u64);
        within(LIMIT, "payload after a promotion from the parking", async {
            tokio::try_join!(
                send_and_recv(client, (a, LATER), (b, LATER)),
                send_and_recv(target, (b, LATER), (a, LATER)),
            )
        })
        .await
        .unwrap_or_else(|e| panic!("promoted quiet session {i}: {e}"));
    }
    let moved = quiet * LATER;
    poll_until(LIMIT, "the kernel's figures to cover the payload", |last| {
        let s = daemon.stats();
        *last = s.json["traffic"].to_string();
        let (up, down) = (
            s.traffic("tcp", "sockmap", "up") - up0,
            s.traffic("tcp", "sockmap", "down") - down0,
        );
        assert!(up <= moved && down <= moved, "payload counted twice: {s}");
        (up == moved && down == moved).then_some(())
    })
    .await;
    let s = daemon.stats();
    assert_eq!(
        (
            s.traffic("tcp", "splice", "up"),
            s.traffic("tcp", "splice", "down")
        ),
        spliced,
        "splice(2) moved payload of promoted sessions: {s}"
    );

    for (client, target) in pairs {
        close_pair(client, target).await;
    }
    wait_sessions_drained(&daemon).await;
    let s = daemon.stats();
    assert_eq!(s.counter("sessions_fallback"), 0, "{s}");
    assert_eq!(s.counter("sessions_total_splice"), SESSIONS as u64, "{s}");
    assert_eq!(s.counter("sessions_ended_splice"), SESSIONS as u64, "{s}");
    assert_eq!(s.counter("sessions_parked"), 0, "{s}");
    wait_log(&daemon, "splice>sockmap", open as usize).await;
    daemon.stop();
}

/// A quiet session ends at its idle timeout (shorter here than the promotion's second), and the
/// ones still parked when the shutdown drain runs out are closed and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_sessions_end_at_their_idle_timeout_and_at_shutdown() {
    if !require_privileged("data path auto") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: "[timeouts]\nidle = \"700ms\"\n".into(),
        ..DaemonOpts::path(DataPath::Auto)
    });
    let pairs = socks::open_pairs(daemon.addr(), 3).await;
    wait_gauge(&daemon, "sessions_parked", 3).await;
    for (i, (mut client, mut target)) in pairs.into_iter().enumerate() {
        wait_closed(
            &mut client,
            LIMIT,
            &format!("client {i} after the idle timeout"),
        )
        .await;
        wait_closed(
            &mut target,
            LIMIT,
            &format!("target {i} after the idle timeout"),
        )
        .await;
    }
    wait_log(&daemon, "session idle, closed", 3).await;
    wait_sessions_drained(&daemon).await;
    let s = daemon.stats();
    assert_eq!(s.counter("sessions_promoted"), 0, "{s}");
    assert_eq!(s.counter("sessions_parked"), 0, "{s}");
    daemon.stop();

    let mut daemon = Daemon::start(DaemonOpts {
        extra_toml: "[timeouts]\ndrain = \"100ms\"\n".into(),
        ..DaemonOpts::path(DataPath::Auto)
    });
    let pairs = socks::open_pairs(daemon.addr(), 3).await;
    wait_quiet(&daemon, 3, 3).await;
    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the daemon did not exit after its drain"));
    assert_eq!(status.code(), Some(0), "exit status after the drain");
    wait_log(&daemon, "session closed at shutdown", 3).await;
    assert!(
        daemon.stderr_log().matches("path=\"splice\"").count() >= 3,
        "the quiet sessions' lines name splice(2): {}",
        daemon.stderr_log()
    );
    for (i, (mut client, _target)) in pairs.into_iter().enumerate() {
        wait_closed(
            &mut client,
            LIMIT,
            &format!("quiet session {i} at shutdown"),
        )
        .await;
    }
}
