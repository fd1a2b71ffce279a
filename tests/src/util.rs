//! Small helpers that keep every test bounded in time.

use std::{future::Future, time::Duration};

/// Awaits `fut` for at most `limit`, panicking with `what` on timeout.
///
/// Every await in these tests goes through this (or [`crate::Task::join`]),
/// so a daemon that hangs a connection fails the test instead of hanging it.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Calls `probe` every 100 ms until it returns `Some`, for at most `limit`.
///
/// Used for state the daemon publishes asynchronously (stats flushed once a
/// second, sessions torn down after both sides closed). On timeout the panic
/// message carries the last value `probe` described through `last`.
pub async fn poll_until<T>(
    limit: Duration,
    what: &str,
    mut probe: impl FnMut(&mut String) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = String::new();
    loop {
        if let Some(v) = probe(&mut last) {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft
/// limit.
///
/// Tests with hundreds of sessions need two descriptors per session here and
/// two more in the daemon, which inherits the limit when it is started after
/// this call.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert_eq!(rc, 0, "getrlimit: {}", std::io::Error::last_os_error());
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit read just above.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
    }
    lim.rlim_cur
}

/// Reads one field (`rchar`, `wchar`, …) of `/proc/<pid>/io`.
///
/// `rchar` counts every byte the process got from read-like system calls, so
/// it shows whether the daemon itself read a payload.
pub fn proc_io_field(pid: u32, field: &str) -> u64 {
    let path = format!("/proc/{pid}/io");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{path} has no {field}: {text}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {field}: {e}"))
}
