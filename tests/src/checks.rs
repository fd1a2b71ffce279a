//! Assertions on the daemon's published state that several tests share.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::{exchange, poll_until, within, Daemon, DataPath, Plan, SessionRow, Stats};

/// Bound for state the daemon publishes asynchronously (stats are flushed at
/// least once a second).
pub const STATS_SETTLE: Duration = Duration::from_secs(5);

/// Waits until no session is active on any path: a session whose both sides
/// closed must be torn down.
pub async fn wait_sessions_drained(d: &Daemon) {
    poll_until(STATS_SETTLE, "sessions_active_* to return to 0", |last| {
        let s = d.stats();
        *last = s.json["counters"].to_string();
        (s.active_sessions() == 0).then_some(())
    })
    .await;
}

/// For a forced data path, waits until `sessions_total_<path>` shows at
/// least `n` sessions: the daemon really used the path it was told to.
/// Nothing is checked for [`DataPath::Auto`].
pub async fn assert_path_used(d: &Daemon, path: DataPath, n: u64) {
    if path == DataPath::Auto {
        return;
    }
    let key = format!("sessions_total_{path}");
    poll_until(STATS_SETTLE, &format!("{key} >= {n}"), |last| {
        let s = d.stats();
        *last = s.json["counters"].to_string();
        (s.counter(&key) >= n).then_some(())
    })
    .await;
}

/// Waits until the monotonic `counters.<name>` equals `want`; fails at once if it goes beyond (an event
/// counted that should not have been) or if it does not get there within [`STATS_SETTLE`].
pub async fn wait_counter(d: &Daemon, name: &str, want: u64) {
    poll_until(
        STATS_SETTLE,
        &format!("counters.{name} == {want}"),
        |last| {
            let s = d.stats();
            let v = s.counter(name);
            *last = s.json["counters"].to_string();
            assert!(
                v <= want,
                "counters.{name} is {v}, more than the {want} expected: {}",
                s.json["counters"]
            );
            (v == want).then_some(())
        },
    )
    .await;
}

/// Waits until the gauge `counters.<name>` (e.g. `udp_associations_active`) equals `want`;
/// unlike [`wait_counter`] it may pass through other values on the way.
pub async fn wait_gauge(d: &Daemon, name: &str, want: u64) {
    poll_until(
        STATS_SETTLE,
        &format!("counters.{name} == {want}"),
        |last| {
            let s = d.stats();
            *last = s.json["counters"].to_string();
            (s.counter(name) == want).then_some(())
        },
    )
    .await;
}

/// Polls the daemon's stderr until it contains `needle` at least `times` times.
pub async fn wait_log(d: &Daemon, needle: &str, times: usize) {
    poll_until(
        STATS_SETTLE,
        &format!("{times} x {needle:?} in the daemon's stderr"),
        |last| {
            let log = d.stderr_log();
            let n = log.matches(needle).count();
            *last = format!("{n} times; log tail: {}", tail(&log, 10));
            (n >= times).then_some(())
        },
    )
    .await;
}

fn tail(log: &str, lines: usize) -> String {
    let v: Vec<&str> = log.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// The daemon's only live kernel session row (`sessions`), once its counters read exactly
/// (up, down); fails at once if they go beyond (a byte counted twice).
pub async fn kernel_session_reads(d: &Daemon, up: u64, down: u64) -> (SessionRow, Stats) {
    poll_until(
        STATS_SETTLE,
        &format!("the session's counters to read up {up}, down {down}"),
        |last| {
            let s = d.stats();
            *last = s.json["sessions"].to_string();
            let rows = s.sessions();
            match rows.as_slice() {
                [row] if row.up_bytes == up && row.down_bytes == down => Some((row.clone(), s)),
                [row] if row.up_bytes > up || row.down_bytes > down => {
                    panic!(
                        "session counters exceed the payload moved (up {up}, down {down}): {row:?}"
                    )
                }
                _ => None,
            }
        },
    )
    .await
}

/// Closes a proxied pair from both ends, client first, within 30 s.
pub async fn close_pair(mut client: TcpStream, mut target: TcpStream) {
    within(Duration::from_secs(30), "closing the session", async {
        tokio::try_join!(
            exchange(&mut client, Plan::close()),
            exchange(&mut target, Plan::sink(0, 0))
        )
    })
    .await
    .unwrap_or_else(|e| panic!("closing the session: {e}"));
}
