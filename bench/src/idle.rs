//! `idle-10k`: how much memory a server spends on a session that carries nothing.
//!
//! The client side (this process) opens up to N sessions through the subject in batches, so that
//! no accept queue overflows, and keeps them open. The target side is a separate process, this
//! binary started again with `--echo-target-helper`: one thread, one epoll set, echoes what it
//! reads. Two processes because one process may hold only so many descriptors (20,000 on the test
//! machine, a hard limit), and a session holds one at each end. The harness starts the server
//! afresh before each run ([`crate::workloads::Workload::fresh_server`]). Once the sessions have
//! settled, the server's resident memory is compared with its figure before; then each session
//! must echo 16 bytes of its own, so that every session counted was really established end to
//! end; then all close and the run waits for the target to see every close.
//!
//! A server that runs out of descriptors (or hits a session limit) refuses a session; the first
//! batch with a refusal ends the set-up, and the run reports how many sessions fit and why it
//! stopped.
//!
//! Every step is bounded: set-up [`SETUP_TIMEOUT`], each connection and handshake
//! [`CONNECT_TIMEOUT`], the echo check [`VERIFY_TIMEOUT`] (each exchange [`EXCHANGE_TIMEOUT`]),
//! the close [`CLOSE_TIMEOUT`]; the helper exits when its stdin closes, when the benchmark dies
//! (`PR_SET_PDEATHSIG`), and after [`HELPER_LIFETIME`] in any case.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream as StdTcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::procfs::{self, machine_busy_seconds};
use crate::socks;
use crate::subjects::Subject;
use crate::workloads::{sleep_interruptible, RunSample, CONNECT_TIMEOUT};

/// Sessions connecting at once; the next batch starts when the previous one is done, so that at
/// most this many wait in any accept queue (ebsocks listens with a backlog of 1024, the echo
/// target with [`crate::targets::LISTEN_BACKLOG`]).
pub const BATCH: usize = 250;
/// Bound on opening all sessions.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Time between the last session opened and the memory reading; the server's CPU time over it
/// is the idle CPU figure.
pub const SETTLE: Duration = Duration::from_secs(2);
/// Bound on checking every session with an echo.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one echo exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the target may take to see every session close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to give its descriptors back after the close.
const FD_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the echo target may take to say where it listens, or to answer a question.
const HELPER_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The echo target exits after this long whatever happens.
const HELPER_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// Command-line flag that makes `ebsocks-bench` the echo target (hidden from `--help`).
pub const HELPER_FLAG: &str = "--echo-target-helper";
/// Bytes of the echo check: a tag and the session's index.
const CHECK_LEN: usize = 16;

/// What one `idle-10k` run found. RSS figures are VmRSS summed over the server's processes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleSample {
    /// Sessions the run set out to open.
    pub attempted: usize,
    /// Sessions that completed the SOCKS5 CONNECT (or, direct, the TCP handshake).
    pub established: usize,
    /// Connections the echo target held once the set-up was over.
    pub target_connections: usize,
    /// Sessions open at both ends when the memory was read: the smaller of `established` and
    /// `target_connections` (a server may fail a session after its CONNECT reply, e.g. when it
    /// has no descriptor left for a pipe). The per-session figures divide by this.
    pub open: usize,
    /// Sessions that echoed their 16 bytes back at the end.
    pub verified: usize,
    /// Sessions that did not (closed, wrong bytes or timed out), with the first reason.
    pub verify_failures: usize,
    pub first_verify_error: Option<String>,
    /// Sessions the echo check had no time left for.
    pub unchecked: usize,
    pub setup_s: f64,
    /// Why the set-up ended before `attempted` sessions were open.
    pub stopped_early: Option<String>,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    /// (after − before) / open.
    pub rss_per_session_kib: Option<f64>,
    /// before + 100,000 × per session, in MiB.
    pub rss_at_100k_mib: Option<f64>,
    /// The server's open descriptors before, with the sessions open, and after they closed.
    pub fds_before: Option<usize>,
    pub fds_open: Option<usize>,
    pub fds_after_close: Option<usize>,
    pub fds_per_session: Option<f64>,
    /// The server's CPU over [`SETTLE`] with every session open and idle, % of one CPU.
    pub idle_cpu_percent: Option<f64>,
    /// Growth of the machine's unreclaimable slab (/proc/meminfo SUnreclaim) per session,
    /// KiB: the kernel's memory for every socket of the session. Other activity on the
    /// machine shows up in it too.
    pub kernel_slab_per_session_kib: Option<f64>,
    /// Growth of the echo target's RSS per connection, KiB (an epoll loop: next to nothing).
    pub target_rss_per_session_kib: Option<f64>,
    /// Time from closing the client sockets to the target having seen every close.
    pub close_ms: Option<f64>,
}

impl IdleSample {
    /// One line for the progress output.
    pub fn progress(&self) -> String {
        let mut line = format!(
            "{} of {} sessions open, {} echoed",
            self.open, self.attempted, self.verified
        );
        if let Some(k) = self.rss_per_session_kib {
            line.push_str(&format!(", {k:.2} KiB/session"));
        }
        if let Some(f) = self.fds_per_session {
            line.push_str(&format!(", {f:.2} fds/session"));
        }
        if let Some(why) = &self.stopped_early {
            line.push_str(&format!("; stopped early: {why}"));
        }
        line
    }
}

/// Runs `idle-10k` once against one subject: up to `sessions` sessions.
pub fn run(sessions: usize, subject: &Subject, rt: &tokio::runtime::Runtime) -> Result<RunSample> {
    let tree = subject.daemon.as_ref().map(|d| &d.tree);
    let mut helper = EchoTarget::start().context("start the echo target process")?;
    if let Some(t) = tree {
        t.reset_peak_rss();
    }
    let mut idle = IdleSample {
        attempted: sessions,
        rss_before_kib: tree.and_then(|t| t.rss_kib()),
        fds_before: tree.and_then(|t| t.fd_count()),
        ..Default::default()
    };
    let slab_before = procfs::meminfo_kib("SUnreclaim");
    let target_rss_before = helper.rss_kib();

    let started = Instant::now();
    let (streams, stopped_early) = rt.block_on(open_sessions(subject.proxy, helper.addr, sessions));
    idle.setup_s = started.elapsed().as_secs_f64();
    idle.established = streams.len();
    idle.stopped_early = stopped_early;
    // Sessions refused at a limit may still be closing: wait until the target holds exactly the
    // established ones.
    let established = streams.len();
    idle.target_connections = helper.wait_count(|c| c == established, HELPER_REPLY_TIMEOUT)?;
    idle.open = established.min(idle.target_connections);
    let n = idle.open;
    if crate::interrupted() {
        bail!("interrupted");
    }

    let cpu_a = tree.map(|t| t.cpu_seconds());
    let machine_a = machine_busy_seconds();
    let t_a = Instant::now();
    let settled = sleep_interruptible(SETTLE);
    let window_s = t_a.elapsed().as_secs_f64();
    let cpu_b = tree.map(|t| t.cpu_seconds());
    let machine_cpu_s = machine_busy_seconds() - machine_a;
    idle.rss_after_kib = tree.and_then(|t| t.rss_kib());
    idle.fds_open = tree.and_then(|t| t.fd_count());
    let slab_after = procfs::meminfo_kib("SUnreclaim");
    let target_rss_after = helper.rss_kib();
    let peak_rss = tree.and_then(|t| t.peak_rss_kib());
    if !settled {
        bail!("interrupted");
    }
    let daemon_cpu_s = cpu_a.zip(cpu_b).map(|(a, b)| (b - a).max(0.0));
    idle.idle_cpu_percent = daemon_cpu_s.map(|c| c / window_s * 100.0);
    if n > 0 {
        let per = |before: Option<u64>, after: Option<u64>| {
            before
                .zip(after)
                .map(|(b, a)| (a as f64 - b as f64) / n as f64)
        };
        idle.rss_per_session_kib = per(idle.rss_before_kib, idle.rss_after_kib);
        idle.rss_at_100k_mib = idle
            .rss_before_kib
            .zip(idle.rss_per_session_kib)
            .map(|(b, k)| (b as f64 + k * 100_000.0) / 1024.0);
        idle.fds_per_session = per(
            idle.fds_before.map(|f| f as u64),
            idle.fds_open.map(|f| f as u64),
        );
        idle.kernel_slab_per_session_kib = per(slab_before, slab_after);
        idle.target_rss_per_session_kib = per(target_rss_before, target_rss_after);
    }

    let verify = rt.block_on(verify_sessions(streams));
    idle.verified = verify.verified;
    idle.verify_failures = verify.failures;
    idle.first_verify_error = verify.first_error.clone();
    idle.unchecked = verify.unchecked;

    // Close every session and wait for the target (and the server) to see it. With a reset,
    // not a FIN: some 20,000 connections in TIME_WAIT would hold the loopback's ephemeral ports
    // for a minute, and the next run (or subject) could not bind its listeners.
    rt.block_on(async move {
        for s in &verify.streams {
            reset_on_close(s);
        }
        drop(verify.streams)
    });
    let closing = Instant::now();
    let left = helper.wait_count(|c| c == 0, CLOSE_TIMEOUT)?;
    idle.close_ms = (left == 0).then(|| closing.elapsed().as_secs_f64() * 1e3);
    if let (Some(t), Some(before)) = (tree, idle.fds_before) {
        let end = Instant::now() + FD_RELEASE_TIMEOUT;
        loop {
            idle.fds_after_close = t.fd_count();
            if idle.fds_after_close.is_none_or(|f| f <= before) || Instant::now() >= end {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(helper);

    if n == 0 {
        bail!(
            "no session open: {}",
            idle.stopped_early.as_deref().unwrap_or("?")
        );
    }
    let mut errors = verify.failures as u64;
    let mut first_error = verify.first_error;
    if left > 0 {
        errors += 1;
        first_error.get_or_insert_with(|| {
            format!(
                "{left} target connections still open {} s after the clients closed",
                CLOSE_TIMEOUT.as_secs()
            )
        });
    }
    Ok(RunSample {
        window_s,
        machine_cpu_s,
        daemon_cpu_s,
        daemon_peak_rss_kib: peak_rss,
        errors,
        first_error,
        lingering_target_conns: left,
        target_close_ms: idle.close_ms,
        idle: Some(idle),
        ..Default::default()
    })
}

/// Opens up to `n` sessions, [`BATCH`] at a time. Stops after the first batch in which a
/// session failed (the server is at a limit), at [`SETUP_TIMEOUT`], or when interrupted, and
/// says why.
async fn open_sessions(
    proxy: Option<SocketAddr>,
    target: SocketAddrV4,
    n: usize,
) -> (Vec<TcpStream>, Option<String>) {
    let end = Instant::now() + SETUP_TIMEOUT;
    let mut streams = Vec::with_capacity(n);
    while streams.len() < n {
        if crate::interrupted() {
            return (streams, Some("interrupted".into()));
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let why = format!("set-up bound of {} s reached", SETUP_TIMEOUT.as_secs());
            return (streams, Some(why));
        }
        let batch = BATCH.min(n - streams.len());
        let timeout = CONNECT_TIMEOUT.min(left);
        let mut tasks = JoinSet::new();
        for _ in 0..batch {
            tasks.spawn(tokio::time::timeout(
                timeout,
                socks::connect_async(proxy, target),
            ));
        }
        let (mut failed, mut first) = (0, None);
        while let Some(joined) = tasks.join_next().await {
            let err = match joined {
                Ok(Ok(Ok(s))) => {
                    streams.push(s);
                    continue;
                }
                Ok(Ok(Err(e))) => format!("{e:#}"),
                Ok(Err(_)) => format!("not established within {} s", timeout.as_secs_f64()),
                Err(e) => format!("connect task: {e}"),
            };
            failed += 1;
            first.get_or_insert(err);
        }
        if failed > 0 {
            let opened = streams.len();
            let first = first.unwrap_or_default();
            let why =
                format!("{failed} of a batch of {batch} failed with {opened} open; first: {first}");
            return (streams, Some(why));
        }
    }
    (streams, None)
}

struct Verified {
    streams: Vec<TcpStream>,
    verified: usize,
    failures: usize,
    first_error: Option<String>,
    unchecked: usize,
}

/// Sends each session 16 bytes of its own and expects them back, [`BATCH`] sessions at a time.
/// Returns the streams that are still open.
async fn verify_sessions(streams: Vec<TcpStream>) -> Verified {
    let end = Instant::now() + VERIFY_TIMEOUT;
    let mut out = Verified {
        streams: Vec::with_capacity(streams.len()),
        verified: 0,
        failures: 0,
        first_error: None,
        unchecked: 0,
    };
    let mut pending = streams.into_iter().enumerate();
    loop {
        let chunk: Vec<(usize, TcpStream)> = pending.by_ref().take(BATCH).collect();
        if chunk.is_empty() {
            break;
        }
        if crate::interrupted() || Instant::now() >= end {
            out.unchecked += chunk.len();
            out.streams.extend(chunk.into_iter().map(|(_, s)| s));
            continue;
        }
        let mut tasks = JoinSet::new();
        for (i, mut s) in chunk {
            tasks.spawn(async move {
                let r = tokio::time::timeout(EXCHANGE_TIMEOUT, echo_check(&mut s, i)).await;
                (s, r)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let err = match joined {
                Ok((s, Ok(Ok(())))) => {
                    out.verified += 1;
                    out.streams.push(s);
                    continue;
                }
                Ok((_, Ok(Err(e)))) => format!("{e:#}"),
                Ok((_, Err(_))) => format!("no echo within {} s", EXCHANGE_TIMEOUT.as_secs_f64()),
                Err(e) => format!("check task: {e}"),
            };
            out.failures += 1;
            out.first_error.get_or_insert(err);
        }
    }
    out
}

async fn echo_check(s: &mut TcpStream, i: usize) -> Result<()> {
    let mut msg = [0u8; CHECK_LEN];
    msg[..8].copy_from_slice(b"idle-10k");
    msg[8..].copy_from_slice(&(i as u64).to_le_bytes());
    s.write_all(&msg)
        .await
        .with_context(|| format!("session {i}: write"))?;
    let mut back = [0u8; CHECK_LEN];
    s.read_exact(&mut back)
        .await
        .with_context(|| format!("session {i}: read the echo"))?;
    if back != msg {
        bail!("session {i}: the echo differs from what was sent");
    }
    Ok(())
}

/// The echo target process, seen from the benchmark: its address, and a line protocol on its
/// stdin/stdout (`count` -> `count N`: connections open now).
struct EchoTarget {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    addr: SocketAddrV4,
}

impl EchoTarget {
    fn start() -> Result<EchoTarget> {
        let exe = std::env::current_exe().context("find this program")?;
        let mut cmd = Command::new(exe);
        cmd.arg(HELPER_FLAG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe: the target dies with the benchmark.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("spawn")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name("echo-target-out".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })?;
        let mut t = EchoTarget {
            child,
            stdin,
            lines,
            addr: SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 0),
        };
        let line = t.reply("listening ")?;
        t.addr = line
            .trim()
            .parse()
            .with_context(|| format!("echo target address {line:?}"))?;
        Ok(t)
    }

    /// The next line that starts with `prefix`, without it.
    fn reply(&mut self, prefix: &str) -> Result<String> {
        let end = Instant::now() + HELPER_REPLY_TIMEOUT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        return Ok(rest.to_string());
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "the echo target did not answer within {} s",
                    HELPER_REPLY_TIMEOUT.as_secs()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten();
                    bail!("the echo target exited ({status:?})");
                }
            }
        }
    }

    /// Connections the target holds now.
    fn count(&mut self) -> Result<usize> {
        let stdin = self.stdin.as_mut().context("echo target stdin closed")?;
        stdin
            .write_all(b"count\n")
            .and_then(|()| stdin.flush())
            .context("ask the echo target")?;
        let n = self.reply("count ")?;
        n.trim()
            .parse()
            .map_err(|e| anyhow!("echo target count {n:?}: {e}"))
    }

    /// Polls [`Self::count`] until `done` holds or `timeout` passes; returns the last count.
    fn wait_count(&mut self, done: impl Fn(usize) -> bool, timeout: Duration) -> Result<usize> {
        let end = Instant::now() + timeout;
        loop {
            let n = self.count()?;
            if done(n) || Instant::now() >= end || crate::interrupted() {
                return Ok(n);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn rss_kib(&self) -> Option<u64> {
        procfs::status_kib(self.child.id() as i32, "VmRSS")
    }
}

impl Drop for EchoTarget {
    /// Closes its stdin (it exits and closes everything), kills it after 2 s.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The echo target process (`ebsocks-bench --echo-target-helper`): prints `listening ADDR`,
/// echoes every connection from one epoll loop, answers `count` on stdin, and exits when stdin
/// closes or after [`HELPER_LIFETIME`].
pub fn serve_echo_target() -> ExitCode {
    match serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ebsocks-bench echo target: {e:#}");
            ExitCode::from(2)
        }
    }
}

const LISTENER: u64 = u64::MAX;
const STDIN: u64 = u64::MAX - 1;

fn serve() -> Result<()> {
    crate::raise_nofile_limit();
    let listener = crate::targets::loopback_listener()?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let ep = Epoll::new()?;
    ep.add(listener.as_raw_fd(), libc::EPOLLIN, LISTENER)?;
    ep.add(libc::STDIN_FILENO, libc::EPOLLIN, STDIN)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {addr}")?;
    out.flush()?;

    let mut conns: HashMap<RawFd, StdTcpStream> = HashMap::new();
    let mut commands = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let end = Instant::now() + HELPER_LIFETIME;
    while Instant::now() < end {
        for ev in ep.wait(&mut events, 1000)? {
            match ev.u64 {
                LISTENER => loop {
                    match listener.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(true)?;
                            let fd = s.as_raw_fd();
                            ep.add(fd, libc::EPOLLIN | libc::EPOLLRDHUP, fd as u64)?;
                            conns.insert(fd, s);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => {
                            // Out of descriptors: leave the rest in the queue for a moment.
                            eprintln!("ebsocks-bench echo target: accept: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                            break;
                        }
                    }
                },
                STDIN => {
                    let mut buf = [0u8; 512];
                    // SAFETY: read(2) into a buffer of the given length.
                    let n = unsafe {
                        libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len())
                    };
                    if n <= 0 {
                        // EOF (or an error): the benchmark is done with this target.
                        return Ok(());
                    }
                    commands.extend_from_slice(&buf[..n as usize]);
                    while let Some(pos) = commands.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = commands.drain(..=pos).collect();
                        if line.trim_ascii() == b"count" {
                            writeln!(out, "count {}", conns.len())?;
                            out.flush()?;
                        }
                    }
                }
                fd => {
                    let fd = fd as RawFd;
                    if let Some(s) = conns.get_mut(&fd) {
                        if !echo_ready(s) {
                            // Closing the socket takes it out of the epoll set.
                            conns.remove(&fd);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Echoes what is readable; false when the connection is done (EOF, error, or a peer that does
/// not read its echo).
fn echo_ready(s: &mut StdTcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => match s.write(&buf[..n]) {
                Ok(m) if m == n => {}
                _ => return false,
            },
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// An epoll set (level-triggered).
struct Epoll(std::os::fd::OwnedFd);

impl Epoll {
    fn new() -> Result<Epoll> {
        // SAFETY: epoll_create1 has no memory arguments; the fd is owned from here on.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_create1");
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Epoll(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    fn add(&self, fd: RawFd, events: libc::c_int, token: u64) -> Result<()> {
        let mut ev = libc::epoll_event {
            events: events as u32,
            u64: token,
        };
        // SAFETY: epoll_ctl with a valid epoll fd and a valid event structure.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_ctl(ADD)");
        }
        Ok(())
    }

    /// Waits up to `timeout_ms`; returns the events (none on EINTR).
    fn wait<'a>(
        &self,
        events: &'a mut [libc::epoll_event],
        timeout_ms: libc::c_int,
    ) -> Result<&'a [libc::epoll_event]> {
        // SAFETY: the buffer holds events.len() entries.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                return Ok(&events[..0]);
            }
            return Err(e).context("epoll_wait");
        }
        Ok(&events[..n as usize])
    }
}

/// Makes `close()` send a reset (SO_LINGER with a zero timeout) instead of a FIN.
fn reset_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a `linger` of the size passed.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
