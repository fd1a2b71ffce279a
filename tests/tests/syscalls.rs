//! What a short session costs the daemon in the system calls its own code makes, counted with
//! `strace -c` on the running daemon (README, "Where the time goes"): a CONNECT, 64 bytes each
//! way, a close from each side.
//!
//! - splice(2): three per direction that succeed (the chunk into the pipe, out of it, the end of
//!   file). A chunk shorter than the pipe's slots emptied the socket, so the daemon does not try
//!   another splice(2) that fails with EAGAIN (one per direction before).
//! - recvfrom(2): the greeting and the request. Under `auto`, the wait for the first payload
//!   reads the sockets' readiness instead of peeking (three before).
//! - setsockopt(2): `TCP_NODELAY` on the upstream only; the client's socket inherits it from the
//!   listener (two before).
//! - shutdown(2): the half-close of the first side to finish only. The second side's FIN goes out
//!   with the close that follows at once (two before).
//!
//! These are calls tokio itself never makes, so the counts are the relay's and the
//! negotiation's alone. Reads that fail with EAGAIN are the client's timing, not the daemon's
//! choice: the greeting is read as soon as the connection is accepted, and a slow client has not
//! sent it yet. So recvfrom(2) is bounded on the calls that read something; splice(2), which
//! only follows reported readiness, may fail now and then (readiness the reactor reported
//! before a read consumed it), not once a session.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use proxy_integration::{
    procfs::{status_field, thread_statuses},
    require_privileged, skip_or_panic, socks, within, Daemon, DaemonOpts, DataPath, Echo,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const LIMIT: Duration = Duration::from_secs(10);
const SESSIONS: u64 = 20;
const COUNTED: &str = "splice,recvfrom,setsockopt,shutdown";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_session_makes_no_needless_calls() {
    if !require_privileged(&DataPath::Auto.feature()) {
        return;
    }
    if Command::new("strace").arg("-V").output().is_err() {
        skip_or_panic(
            "strace",
            "`strace` is not installed (cargo xtask setup --apt)",
        );
        return;
    }
    let echo = Echo::start("127.0.0.1:0").await;
    for path in [DataPath::Auto, DataPath::Splice] {
        let daemon = Daemon::start(DaemonOpts::path(path));
        // The first sessions make the pipes the later ones take from the pool.
        for _ in 0..3 {
            short_session(&daemon, &echo).await;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("strace.txt");
        let tracer = Tracer::attach(daemon.pid(), &out);
        for _ in 0..SESSIONS {
            short_session(&daemon, &echo).await;
        }
        let counts = tracer.finish(&out);
        eprintln!("{path}: {SESSIONS} sessions: {counts:?}");
        let count = |name: &str| {
            counts
                .iter()
                .find(|c| c.name == name)
                .map_or((0, 0), |c| (c.calls - c.errors, c.errors))
        };
        let at_most = |name: &str, ok: u64, most: u64| {
            assert!(
                ok <= most * SESSIONS,
                "{path}: {ok} {name} calls succeeded for {SESSIONS} short sessions, at most \
                 {most} each expected: {counts:?}"
            );
        };
        let (spliced, failed) = count("splice");
        at_most("splice", spliced, 6);
        // The relay ran on splice(2), and the calls were counted at all.
        assert!(spliced >= 4 * SESSIONS, "{path}: {counts:?}");
        assert!(
            failed <= SESSIONS / 4,
            "{path}: {failed} splice calls failed for {SESSIONS} short sessions: {counts:?}"
        );
        at_most("recvfrom", count("recvfrom").0, 2);
        at_most("shutdown", count("shutdown").0, 1);
        let (ok, failed) = count("setsockopt");
        assert!(
            ok + failed <= SESSIONS,
            "{path}: {} setsockopt calls for {SESSIONS} short sessions, one each expected: \
             {counts:?}",
            ok + failed
        );
        daemon.stop();
    }
}

/// Connect through the daemon, 64 bytes to the echo server and back, then each side closes.
async fn short_session(daemon: &Daemon, echo: &Echo) {
    let mut s = socks::connect(daemon.addr(), echo.addr).await;
    let ping = [7u8; 64];
    s.write_all(&ping).await.unwrap();
    let mut back = [0u8; 64];
    within(LIMIT, "echo", s.read_exact(&mut back))
        .await
        .expect("echo");
    assert_eq!(back, ping);
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(LIMIT, "end of file", s.read_to_end(&mut rest))
        .await
        .expect("end of file");
    assert!(rest.is_empty());
}

/// `strace -c` attached to every thread of a process.
struct Tracer {
    child: Child,
}

impl Tracer {
    fn attach(pid: u32, out: &Path) -> Self {
        let child = Command::new("strace")
            .args(["-f", "-c", "-e", &format!("trace={COUNTED}"), "-o"])
            .arg(out)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("strace");
        // Attached once every thread names a tracer.
        let t = Instant::now();
        while !all_traced(pid) {
            assert!(t.elapsed() < LIMIT, "strace did not attach to {pid}");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child }
    }

    /// Detaches and returns the rows of its summary.
    fn finish(mut self, out: &Path) -> Vec<Row> {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let status = self.child.wait().expect("strace");
        let text = std::fs::read_to_string(out).unwrap_or_default();
        assert!(
            status.success() || !text.is_empty(),
            "strace: {status}, no summary"
        );
        summary(&text)
    }
}

fn all_traced(pid: u32) -> bool {
    thread_statuses(pid)
        .iter()
        .all(|(_, status)| status_field(status, "TracerPid:") != "0")
}

/// A row of `strace -c`.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    name: String,
    calls: u64,
    errors: u64,
}

/// Rows of `strace -c`: `% time, seconds, usecs/call, calls, [errors], syscall`.
fn summary(text: &str) -> Vec<Row> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = *f.last()?;
            if !(5..=6).contains(&f.len())
                || name == "total"
                || !f[0].ends_with(|c: char| c.is_ascii_digit())
            {
                return None;
            }
            Some(Row {
                name: name.to_owned(),
                calls: f[3].parse().ok()?,
                errors: if f.len() == 6 { f[4].parse().ok()? } else { 0 },
            })
        })
        .collect()
}

#[test]
fn reads_the_summary() {
    let text = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 62.10    0.046818           7      6000      2000 splice
 37.90    0.010500           5      2000           recvfrom
------ ----------- ----------- --------- --------- ----------------
100.00    0.057318           7      8000      2000 total
";
    let row = |name: &str, calls, errors| Row {
        name: name.to_owned(),
        calls,
        errors,
    };
    assert_eq!(
        summary(text),
        [row("splice", 6000, 2000), row("recvfrom", 2000, 0)]
    );
}
