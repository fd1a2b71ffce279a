//! Small helpers that keep every test bounded in time.

use std::{
    future::Future,
    process::{Command, Stdio},
    time::Duration,
};

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

/// Reads until EOF or a reset, for at most `limit`; returns how long that took and the bytes
/// that arrived before the close (kept up to 64 KiB). Panics if the connection is still open
/// after `limit`.
pub async fn wait_closed(
    s: &mut tokio::net::TcpStream,
    limit: Duration,
    what: &str,
) -> (Duration, Vec<u8>) {
    use tokio::io::AsyncReadExt as _;
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(limit.saturating_sub(t0.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (t0.elapsed(), seen),
            Ok(Ok(n)) => {
                if seen.len() < 64 * 1024 {
                    seen.extend_from_slice(&buf[..n]);
                }
            }
            Err(_) => panic!(
                "{what}: connection still open after {limit:?} ({} bytes received: {:02x?})",
                seen.len(),
                &seen[..seen.len().min(32)]
            ),
        }
    }
}

/// Fails if `l` gets a connection within `wait`: the daemon must not have connected to this
/// target.
pub async fn assert_no_connection(l: &tokio::net::TcpListener, wait: Duration, what: &str) {
    if let Ok(Ok((_, from))) = tokio::time::timeout(wait, l.accept()).await {
        panic!("{what}: the target got a connection from {from}, expected none");
    }
}

/// Runs `program` with `args` (no input) and returns its standard output; panics, with its
/// error output, if it cannot run or fails.
pub fn run<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(program: &str, args: &[S]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
