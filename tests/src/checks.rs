//! Assertions on the daemon's published state that several tests share.

use std::time::Duration;

use crate::{poll_until, Daemon, DataPath};

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
