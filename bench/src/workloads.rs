//! Workloads and the measurement harness. A workload starts its clients against a fresh
//! target (through the subject's SOCKS5 server, if any); the harness lets them warm up, then
//! takes a snapshot (bytes, operations, CPU time of the server and of the machine), lets them
//! run for the measured window, takes a second snapshot, stops them and waits (bounded) for
//! the clients and the target's connections to close.
//!
//! `idle-10k` has no measured window of traffic and runs its own sequence (see [`crate::idle`]).
//!
//! To add a workload: add a variant to [`Workload`], give it a name, description, metric and
//! target kind, list it in [`Workload::all`], and start its clients in [`start_clients`].

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

use crate::idle::IdleSample;
use crate::procfs::machine_cpu;
use crate::socks;
use crate::subjects::Subject;
use crate::targets::{pattern, Meter, Target, TargetKind, BULK_BUF};

/// Bound on connecting and on the SOCKS5 handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on one request/response exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on one short session (connect, handshake, one exchange).
const SESSION_TIMEOUT: Duration = Duration::from_secs(3);
/// How long all clients may take to connect before the run is abandoned.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The same for the 1,000 sessions of `fair-1000`.
const FAIR_SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections of `fair-1000` being set up at once: well inside any server's accept queue.
const FAIR_CONNECTING: usize = 64;
/// Shortest warm-up of `fair-1000`: a thousand streams take longer than one to settle.
const FAIR_MIN_WARMUP: Duration = Duration::from_millis(500);
/// Concurrent sessions of `fair-1000`.
pub const FAIR_SESSIONS: usize = 1000;
/// Idle sessions `idle-10k` opens by default: the largest round count that fits under ebsocks'
/// descriptor limit on the 20,000-descriptor test machine, where the sockmap and copy paths
/// hold 9,984 (two descriptors a session, 31 for the daemon itself; see [`crate::idle`]).
pub const IDLE_SESSIONS: usize = 9_900;
/// How long clients may take to stop after the window.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the target's connections may stay open after the clients closed theirs.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// The same for `fair-1000`, whose thousand sessions may have gigabytes queued in a server.
const FAIR_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often blocked clients look at the phase.
const POLL: Duration = Duration::from_millis(250);
/// Request and response size of the rr and conn-rate workloads.
const SMALL: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    /// client -> target
    Up,
    /// target -> client
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// `streams` parallel bulk transfers in one direction; Gbit/s aggregate.
    Bulk { dir: Dir, streams: usize },
    /// Back-to-back small request/response exchanges over one session; latency.
    Rr { size: usize },
    /// Short sessions (connect, one exchange, close) from `clients` concurrent clients; rate.
    ConnRate { clients: usize, size: usize },
    /// `sessions` concurrent bulk transfers client -> sink, all set up before any sends;
    /// aggregate Gbit/s and Jain's fairness index over the sessions.
    Fair { sessions: usize },
    /// Up to `sessions` established sessions that carry nothing; the server's memory per
    /// session.
    Idle { sessions: usize },
}

/// What a workload's main figure is, which decides units and the direction of "better".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// Gbit/s received; CPU per GiB.
    Throughput,
    /// p50 latency in µs (lower is better); CPU per request.
    Latency,
    /// Sessions per second; CPU per session.
    SessionRate,
    /// Server RSS per idle session in KiB (lower is better); no CPU figure.
    Memory,
}

impl Metric {
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Throughput => "Gbit/s",
            Metric::Latency => "µs (p50)",
            Metric::SessionRate => "sessions/s",
            Metric::Memory => "KiB/session",
        }
    }

    pub fn cpu_unit(self) -> &'static str {
        match self {
            Metric::Throughput => "s/GiB",
            Metric::Latency => "µs/req",
            Metric::SessionRate => "µs/session",
            Metric::Memory => "n/a",
        }
    }

    pub fn higher_is_better(self) -> bool {
        !matches!(self, Metric::Latency | Metric::Memory)
    }
}

impl Workload {
    pub fn all() -> Vec<Workload> {
        vec![
            Workload::Bulk {
                dir: Dir::Up,
                streams: 1,
            },
            Workload::Bulk {
                dir: Dir::Up,
                streams: 8,
            },
            Workload::Bulk {
                dir: Dir::Down,
                streams: 1,
            },
            Workload::Bulk {
                dir: Dir::Down,
                streams: 8,
            },
            Workload::Rr { size: SMALL },
            Workload::ConnRate {
                clients: 64,
                size: SMALL,
            },
            Workload::Fair {
                sessions: FAIR_SESSIONS,
            },
            Workload::Idle {
                sessions: IDLE_SESSIONS,
            },
        ]
    }

    pub fn name(&self) -> String {
        match self {
            Workload::Bulk {
                dir: Dir::Up,
                streams,
            } => format!("bulk-up-{streams}"),
            Workload::Bulk {
                dir: Dir::Down,
                streams,
            } => format!("bulk-down-{streams}"),
            Workload::Rr { .. } => "rr".into(),
            Workload::ConnRate { .. } => "conn-rate".into(),
            Workload::Fair { sessions } => format!("fair-{sessions}"),
            // The name stays when `--idle-sessions` changes the count.
            Workload::Idle { .. } => "idle-10k".into(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Workload::Bulk { dir, streams } => {
                let (streams, plural) = (*streams, if *streams == 1 { "" } else { "s" });
                let (way, op) = match dir {
                    Dir::Up => ("client → sink", "writes"),
                    Dir::Down => ("source → client", "reads"),
                };
                format!("{streams} stream{plural} {way}, {} KiB {op}, aggregate Gbit/s received", BULK_BUF / 1024)
            }
            Workload::Rr { size } => {
                format!("{size}-byte request/response back to back over one session, latency in µs")
            }
            Workload::ConnRate { clients, size } => format!(
                "short sessions (connect, SOCKS5 handshake, one {size}-byte request/response, close) \
                 from {clients} concurrent clients, sessions/s"
            ),
            Workload::Fair { sessions } => format!(
                "{sessions} concurrent sessions client → sink, all set up before any of them sends, \
                 {} KiB writes from one tokio runtime; aggregate Gbit/s received and Jain's fairness \
                 index (Σx)²/(n·Σx²) over the bytes each session delivered in the window (1 = all \
                 equal; min/mean: the slowest session against the average)",
                BULK_BUF / 1024
            ),
            Workload::Idle { sessions } => format!(
                "up to {sessions} established sessions that carry nothing, opened in batches of {} \
                 (the first batch with a refused session ends the set-up, bounded to {} s), the \
                 targets in a separate echo process. Sessions open = held at both ends when the \
                 memory is read, {} s after the last one was opened; echoed = sessions that then \
                 returned 16 bytes of their own. Each run starts a fresh server (memory freed by \
                 earlier runs but kept by the process would make sessions look free). Server RSS = \
                 VmRSS before and after; per session = (after − before) / sessions open; at 100k \
                 = before + 100,000 × per session. Server fds = descriptors the server holds per \
                 session; server CPU idle = its CPU while every session is open. Kernel slab = \
                 growth of the machine's unreclaimable slab (SUnreclaim) per session: every socket \
                 of a session (client, target and the server's two) and whatever the server adds. \
                 direct has no server: its row shows that the load generator and the target hold \
                 that many sessions, and the kernel's cost of a direct connection's two sockets",
                crate::idle::BATCH,
                crate::idle::SETUP_TIMEOUT.as_secs(),
                fmt_secs(crate::idle::SETTLE)
            ),
        }
    }

    pub fn metric(&self) -> Metric {
        match self {
            Workload::Bulk { .. } => Metric::Throughput,
            Workload::Rr { .. } => Metric::Latency,
            Workload::ConnRate { .. } => Metric::SessionRate,
            Workload::Fair { .. } => Metric::Throughput,
            Workload::Idle { .. } => Metric::Memory,
        }
    }

    /// The in-process target; `idle-10k` runs its echo target in a separate process instead.
    fn target(&self) -> TargetKind {
        match self {
            Workload::Bulk { dir: Dir::Up, .. } => TargetKind::Sink,
            Workload::Bulk { dir: Dir::Down, .. } => TargetKind::Source,
            Workload::Rr { .. } => TargetKind::Echo,
            Workload::ConnRate { .. } | Workload::Idle { .. } => TargetKind::EchoAsync,
            Workload::Fair { .. } => TargetKind::SinkAsync,
        }
    }

    /// Whether each run needs a freshly started server: `idle-10k` reads the server's memory
    /// growth, which memory that earlier runs freed but the process kept would hide.
    pub fn fresh_server(&self) -> bool {
        matches!(self, Workload::Idle { .. })
    }

    /// How long the target's connections may stay open after the clients closed theirs.
    pub fn drain_timeout(&self) -> Duration {
        match self {
            Workload::Fair { .. } => FAIR_DRAIN_TIMEOUT,
            _ => DRAIN_TIMEOUT,
        }
    }

    /// Rough seconds one run takes, for the estimate printed before the runs.
    pub fn estimate_s(&self, set: &Settings) -> f64 {
        let window = set.window.as_secs_f64();
        match self {
            Workload::Fair { .. } => window + set.warmup.max(FAIR_MIN_WARMUP).as_secs_f64() + 1.0,
            Workload::Idle { sessions } => {
                crate::idle::SETTLE.as_secs_f64() + 3.0 + *sessions as f64 / 5_000.0
            }
            _ => window + set.warmup.as_secs_f64() + 0.15,
        }
    }
}

fn fmt_secs(d: Duration) -> String {
    let s = format!("{:.1}", d.as_secs_f64());
    s.trim_end_matches(".0").to_string()
}

/// Measured values of one run; the window is between the two snapshots.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSample {
    pub window_s: f64,
    /// Payload bytes received in the window (bulk: at the receiving end; rr and conn-rate:
    /// requests plus responses).
    pub bytes: u64,
    /// Requests (rr) or sessions (conn-rate) completed in the window.
    pub ops: u64,
    pub gbit_s: Option<f64>,
    pub ops_per_s: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// User + system CPU seconds of the server's processes in the window.
    pub daemon_cpu_s: Option<f64>,
    /// Busy CPU seconds of the whole machine in the window (steal excluded).
    pub machine_cpu_s: f64,
    /// Share of the machine's CPU time in the window that its host took (steal), 0 to 1.
    pub steal_share: Option<f64>,
    /// Peak RSS of the server's processes during the run (sum of VmHWM), KiB.
    pub daemon_peak_rss_kib: Option<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Bulk streams that received nothing during the window.
    pub stalled_streams: usize,
    /// `fair-1000`: Jain's fairness index over the bytes each session delivered in the window.
    pub jain_index: Option<f64>,
    /// `fair-1000`: the slowest session's bytes in the window over the mean.
    pub min_share: Option<f64>,
    /// `idle-10k`: sessions, memory and the echo check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleSample>,
    /// Target connections still open [`Workload::drain_timeout`] after the clients closed.
    pub lingering_target_conns: usize,
    /// Time from the clients having closed to the last target connection closing (None when
    /// some were still open after [`Workload::drain_timeout`]).
    pub target_close_ms: Option<f64>,
}

impl RunSample {
    /// The workload's main figure.
    pub fn figure(&self, m: Metric) -> Option<f64> {
        match m {
            Metric::Throughput => self.gbit_s,
            Metric::Latency => self.p50_us,
            Metric::SessionRate => self.ops_per_s,
            Metric::Memory => self.idle.as_ref().and_then(|i| i.rss_per_session_kib),
        }
    }

    /// One line for the progress output.
    pub fn progress(&self, w: Workload) -> String {
        let m = w.metric();
        let mut line = match (&self.idle, self.jain_index) {
            (Some(i), _) => i.progress(),
            (None, Some(j)) => format!(
                "{:.2} {}, Jain {j:.3}",
                self.figure(m).unwrap_or(f64::NAN),
                m.unit()
            ),
            (None, None) => format!("{:.2} {}", self.figure(m).unwrap_or(f64::NAN), m.unit()),
        };
        if self.errors > 0 {
            line.push_str(&format!(" ({} errors)", self.errors));
        }
        line
    }

    /// CPU seconds converted to the workload's CPU unit (per GiB or per operation).
    pub fn cpu_per_unit(&self, m: Metric, cpu_s: f64) -> Option<f64> {
        match m {
            Metric::Throughput => {
                (self.bytes > 0).then(|| cpu_s / (self.bytes as f64 / (1u64 << 30) as f64))
            }
            Metric::Latency | Metric::SessionRate => {
                (self.ops > 0).then(|| cpu_s / self.ops as f64 * 1e6)
            }
            Metric::Memory => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub warmup: Duration,
    pub window: Duration,
}

/// Clients connect; only `fair-1000` waits for the next phase before it sends.
const PHASE_SETUP: u8 = 0;
const PHASE_WARMUP: u8 = 1;
const PHASE_MEASURE: u8 = 2;
const PHASE_STOP: u8 = 3;

/// State shared between the harness and the clients of one run.
struct Shared {
    phase: AtomicU8,
    /// The phase again, for tokio clients that wait for it to change.
    phase_signal: watch::Sender<u8>,
    ready: AtomicUsize,
    setup_failed: AtomicUsize,
    ops: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    latencies_ns: Mutex<Vec<u64>>,
    /// Client-side receive counters (bulk-down).
    meter: Meter,
}

impl Shared {
    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Relaxed)
    }

    fn stopping(&self) -> bool {
        self.phase() == PHASE_STOP
    }

    fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
        self.phase_signal.send_replace(phase);
    }

    /// Counts an error that happened before the clients were told to stop.
    fn error(&self, e: impl std::fmt::Display) {
        if self.stopping() {
            return;
        }
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("error lock");
        if first.is_none() {
            *first = Some(format!("{e:#}"));
        }
    }

    fn setup_error(&self, e: impl std::fmt::Display) {
        self.error(e);
        self.setup_failed.fetch_add(1, Ordering::SeqCst);
    }
}

/// Runs one workload once against one subject.
pub fn run_once(
    w: Workload,
    subject: &Subject,
    set: &Settings,
    rt: &tokio::runtime::Runtime,
) -> Result<RunSample> {
    if let Workload::Idle { sessions } = w {
        return crate::idle::run(sessions, subject, rt);
    }
    let target = Target::start(w.target(), rt.handle())?;
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(PHASE_SETUP),
        phase_signal: watch::Sender::new(PHASE_SETUP),
        ready: AtomicUsize::new(0),
        setup_failed: AtomicUsize::new(0),
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        latencies_ns: Mutex::new(Vec::new()),
        meter: Meter::default(),
    });
    let tree = subject.daemon.as_ref().map(|d| &d.tree);
    if let Some(t) = tree {
        t.reset_peak_rss();
    }

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let started = start_clients(w, subject.proxy, target.addr, &shared, &done_tx, rt);
    drop(done_tx);
    let stop_clients = |shared: &Shared| {
        shared.set_phase(PHASE_STOP);
        wait_disconnected(&done_rx, STOP_TIMEOUT)
    };
    let expected = match started {
        Ok(n) => n,
        Err(e) => {
            stop_clients(&shared);
            return Err(e.context("start the clients"));
        }
    };

    // Setup: every client connected (or failed); for fair-1000 the sink has accepted every
    // session too, so that each has its counter before the window.
    let (setup_timeout, warmup) = match w {
        Workload::Fair { .. } => (FAIR_SETUP_TIMEOUT, set.warmup.max(FAIR_MIN_WARMUP)),
        _ => (SETUP_TIMEOUT, set.warmup),
    };
    let accepted_all = || match w {
        Workload::Fair { sessions } => target.meter.len() >= sessions,
        _ => true,
    };
    let setup_end = Instant::now() + setup_timeout;
    loop {
        let ready = shared.ready.load(Ordering::SeqCst);
        let failed = shared.setup_failed.load(Ordering::SeqCst);
        if failed > 0 || crate::interrupted() || Instant::now() >= setup_end {
            stop_clients(&shared);
            if crate::interrupted() {
                bail!("interrupted");
            }
            let first = shared.first_error.lock().expect("error lock").clone();
            bail!(
                "{ready} of {expected} clients connected: {}",
                first.unwrap_or_else(|| format!(
                    "setup took longer than {} s (the target accepted {})",
                    setup_timeout.as_secs(),
                    target.active()
                ))
            );
        }
        if ready >= expected && accepted_all() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }

    let meter: &Meter = match w {
        Workload::Bulk { dir: Dir::Up, .. } | Workload::Fair { .. } => &target.meter,
        _ => &shared.meter,
    };
    let snap = || Snap::take(tree, meter, &shared);

    shared.set_phase(PHASE_WARMUP);
    let interrupted = !sleep_interruptible(warmup);
    let a = snap();
    shared.set_phase(PHASE_MEASURE);
    let interrupted = interrupted || !sleep_interruptible(set.window);
    let b = snap();
    let peak_rss = tree.and_then(|t| t.peak_rss_kib());
    let clients_stopped = stop_clients(&shared);
    if interrupted {
        bail!("interrupted");
    }
    let closing = Instant::now();
    let (lingering, close_ms) = if target.wait_idle(w.drain_timeout()) {
        (0, Some(closing.elapsed().as_secs_f64() * 1e3))
    } else {
        (target.active(), None)
    };
    drop(target);

    let window_s = b.t.duration_since(a.t).as_secs_f64();
    let ops = b.ops - a.ops;
    let mut s = RunSample {
        window_s,
        ops,
        machine_cpu_s: b.machine.busy_s - a.machine.busy_s,
        steal_share: (window_s > 0.0 && b.machine.cpus > 0)
            .then(|| (b.machine.steal_s - a.machine.steal_s) / (window_s * b.machine.cpus as f64)),
        daemon_cpu_s: a
            .daemon_cpu_s
            .zip(b.daemon_cpu_s)
            .map(|(x, y)| (y - x).max(0.0)),
        daemon_peak_rss_kib: peak_rss,
        errors: shared.errors.load(Ordering::SeqCst),
        first_error: shared.first_error.lock().expect("error lock").clone(),
        lingering_target_conns: lingering,
        target_close_ms: close_ms,
        ..Default::default()
    };
    if !clients_stopped {
        s.errors += 1;
        s.first_error.get_or_insert_with(|| {
            format!("clients still busy {} s after stop", STOP_TIMEOUT.as_secs())
        });
    }
    match w {
        Workload::Bulk { streams, .. } => {
            let per_stream: Vec<u64> = b
                .bytes
                .iter()
                .enumerate()
                .map(|(i, &n)| n - a.bytes.get(i).copied().unwrap_or(0))
                .collect();
            s.bytes = per_stream.iter().sum();
            s.stalled_streams = per_stream.iter().filter(|&&n| n == 0).count()
                + streams.saturating_sub(per_stream.len());
            s.gbit_s = Some(s.bytes as f64 * 8.0 / window_s / 1e9);
        }
        Workload::Fair { sessions } => {
            let mut per_session: Vec<u64> = b
                .bytes
                .iter()
                .enumerate()
                .map(|(i, &n)| n - a.bytes.get(i).copied().unwrap_or(0))
                .collect();
            // Sessions the sink never accepted delivered nothing.
            per_session.resize(per_session.len().max(sessions), 0);
            s.bytes = per_session.iter().sum();
            s.stalled_streams = per_session.iter().filter(|&&n| n == 0).count();
            s.gbit_s = Some(s.bytes as f64 * 8.0 / window_s / 1e9);
            s.jain_index = jain_index(&per_session);
            let mean = s.bytes as f64 / per_session.len() as f64;
            s.min_share = per_session
                .iter()
                .min()
                .filter(|_| mean > 0.0)
                .map(|&m| m as f64 / mean);
        }
        Workload::Idle { .. } => unreachable!("idle-10k runs in crate::idle"),
        Workload::Rr { size } | Workload::ConnRate { size, .. } => {
            s.bytes = ops * size as u64 * 2;
            s.ops_per_s = Some(ops as f64 / window_s);
            let mut lat = std::mem::take(&mut *shared.latencies_ns.lock().expect("latency lock"));
            lat.sort_unstable();
            s.p50_us = percentile(&lat, 50.0).map(|ns| ns as f64 / 1e3);
            s.p99_us = percentile(&lat, 99.0).map(|ns| ns as f64 / 1e3);
        }
    }
    if s.figure(w.metric())
        .is_none_or(|f| f == 0.0 || !f.is_finite())
        || (ops == 0 && w.metric() != Metric::Throughput)
    {
        bail!(
            "nothing got through in {window_s:.1} s{}",
            s.first_error.map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    Ok(s)
}

struct Snap {
    t: Instant,
    bytes: Vec<u64>,
    ops: u64,
    daemon_cpu_s: Option<f64>,
    machine: crate::procfs::MachineCpu,
}

impl Snap {
    fn take(tree: Option<&crate::procfs::ProcTree>, meter: &Meter, shared: &Shared) -> Snap {
        // The /proc scan for the server's processes is the slow part: do it first, so that the
        // counters and the clock are read as close together as possible.
        let daemon_cpu_s = tree.map(|t| t.cpu_seconds());
        let machine = machine_cpu();
        let bytes = meter.snapshot();
        let ops = shared.ops.load(Ordering::SeqCst);
        Snap {
            t: Instant::now(),
            bytes,
            ops,
            daemon_cpu_s,
            machine,
        }
    }
}

/// Jain's fairness index (Σx)² / (n·Σx²): 1 when every session got the same, 1/n when one got
/// everything. None when nothing was delivered.
pub fn jain_index(per_session: &[u64]) -> Option<f64> {
    let n = per_session.len() as f64;
    let sum: f64 = per_session.iter().map(|&x| x as f64).sum();
    let sum_sq: f64 = per_session.iter().map(|&x| (x as f64) * (x as f64)).sum();
    (sum_sq > 0.0).then(|| sum * sum / (n * sum_sq))
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[idx])
}

/// Sleeps; false when interrupted by SIGINT/SIGTERM.
pub fn sleep_interruptible(d: Duration) -> bool {
    let end = Instant::now() + d;
    loop {
        if crate::interrupted() {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Waits until every sender of `rx` is gone; false on timeout.
fn wait_disconnected(rx: &mpsc::Receiver<()>, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Err(RecvTimeoutError::Disconnected) => return true,
            Err(RecvTimeoutError::Timeout) => return false,
            Ok(()) => {}
        }
    }
}

/// Starts the clients of `w`; returns how many must report ready. Each client holds a clone
/// of `done` until it has finished.
fn start_clients(
    w: Workload,
    proxy: Option<SocketAddr>,
    target: SocketAddrV4,
    shared: &Arc<Shared>,
    done: &Sender<()>,
    rt: &tokio::runtime::Runtime,
) -> Result<usize> {
    match w {
        Workload::Bulk { dir, streams } => {
            for i in 0..streams {
                let (shared, done) = (shared.clone(), done.clone());
                // Down: register the counter before connecting, so it exists at the first snapshot.
                let counter = (dir == Dir::Down).then(|| shared.meter.add_stream());
                std::thread::Builder::new()
                    .name(format!("bulk-{i}"))
                    .spawn(move || {
                        let _done = done;
                        bulk_stream(dir, proxy, target, &shared, counter.as_deref());
                    })?;
            }
            Ok(streams)
        }
        Workload::Rr { size } => {
            let (shared, done) = (shared.clone(), done.clone());
            std::thread::Builder::new()
                .name("rr".into())
                .spawn(move || {
                    let _done = done;
                    rr_client(proxy, target, size, &shared);
                })?;
            Ok(1)
        }
        Workload::ConnRate { clients, size } => {
            for i in 0..clients {
                let (shared, done) = (shared.clone(), done.clone());
                rt.spawn(async move {
                    let _done = done;
                    conn_rate_client(i, proxy, target, size, &shared).await;
                });
            }
            Ok(clients)
        }
        Workload::Fair { sessions } => {
            let buf: Arc<[u8]> = pattern(BULK_BUF).into();
            let connecting = Arc::new(Semaphore::new(FAIR_CONNECTING));
            for _ in 0..sessions {
                let (shared, done) = (shared.clone(), done.clone());
                let (buf, connecting) = (buf.clone(), connecting.clone());
                rt.spawn(async move {
                    let _done = done;
                    fair_client(proxy, target, &shared, &connecting, &buf).await;
                });
            }
            Ok(sessions)
        }
        Workload::Idle { .. } => unreachable!("idle-10k runs in crate::idle"),
    }
}

fn retryable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

fn bulk_stream(
    dir: Dir,
    proxy: Option<SocketAddr>,
    target: SocketAddrV4,
    shared: &Shared,
    counter: Option<&AtomicU64>,
) {
    let mut s = match socks::connect(proxy, target, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return shared.setup_error(e),
    };
    if let Err(e) = s
        .set_read_timeout(Some(POLL))
        .and_then(|()| s.set_write_timeout(Some(POLL)))
    {
        return shared.setup_error(e);
    }
    shared.ready.fetch_add(1, Ordering::SeqCst);
    match dir {
        Dir::Up => {
            let buf = pattern(BULK_BUF);
            while !shared.stopping() {
                match s.write(&buf) {
                    Ok(0) => {
                        shared.error("write returned 0");
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if retryable(&e) => {}
                    Err(e) => {
                        shared.error(format!("write: {e}"));
                        break;
                    }
                }
            }
        }
        Dir::Down => {
            let counter = counter.expect("bulk-down counter");
            let mut buf = vec![0u8; BULK_BUF];
            while !shared.stopping() {
                match s.read(&mut buf) {
                    Ok(0) => {
                        shared.error("connection closed by the server side");
                        break;
                    }
                    Ok(n) => {
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if retryable(&e) => {}
                    Err(e) => {
                        shared.error(format!("read: {e}"));
                        break;
                    }
                }
            }
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
}

fn rr_client(proxy: Option<SocketAddr>, target: SocketAddrV4, size: usize, shared: &Shared) {
    let mut s = match socks::connect(proxy, target, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return shared.setup_error(e),
    };
    if let Err(e) = s
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
    {
        return shared.setup_error(e);
    }
    shared.ready.fetch_add(1, Ordering::SeqCst);
    let mut req = pattern(size);
    let mut resp = vec![0u8; size];
    let mut lat = Vec::with_capacity(1 << 20);
    let mut seq: u64 = 0;
    while !shared.stopping() {
        seq += 1;
        let n = size.min(8);
        req[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
        let t = Instant::now();
        let r = s.write_all(&req).and_then(|()| s.read_exact(&mut resp));
        let dt = t.elapsed();
        if let Err(e) = r {
            shared.error(format!("request {seq}: {e}"));
            break;
        }
        if resp != req {
            shared.error(format!("request {seq}: echo differs from the request"));
            break;
        }
        shared.ops.fetch_add(1, Ordering::Relaxed);
        if shared.phase() == PHASE_MEASURE {
            lat.push(dt.as_nanos() as u64);
        }
    }
    shared
        .latencies_ns
        .lock()
        .expect("latency lock")
        .extend(lat);
    let _ = s.shutdown(std::net::Shutdown::Both);
}

async fn conn_rate_client(
    id: usize,
    proxy: Option<SocketAddr>,
    target: SocketAddrV4,
    size: usize,
    shared: &Shared,
) {
    shared.ready.fetch_add(1, Ordering::SeqCst);
    let mut req = pattern(size);
    let n = size.min(8);
    req[..n].copy_from_slice(&(id as u64).to_le_bytes()[..n]);
    let source = conn_rate_source(id);
    let mut lat = Vec::new();
    while !shared.stopping() {
        let t = Instant::now();
        match tokio::time::timeout(SESSION_TIMEOUT, short_session(source, proxy, target, &req))
            .await
        {
            Ok(Ok(())) => {
                shared.ops.fetch_add(1, Ordering::Relaxed);
                if shared.phase() == PHASE_MEASURE {
                    lat.push(t.elapsed().as_nanos() as u64);
                }
            }
            Ok(Err(e)) => {
                shared.error(e);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => shared.error(anyhow!(
                "session not done within {} s",
                SESSION_TIMEOUT.as_secs()
            )),
        }
    }
    shared
        .latencies_ns
        .lock()
        .expect("latency lock")
        .extend(lat);
}

/// One session of `fair-1000`: connects (at most [`FAIR_CONNECTING`] at once), waits until
/// every session is up, then writes the shared buffer until told to stop, one write per turn,
/// so that the runtime's threads serve the sessions round-robin.
async fn fair_client(
    proxy: Option<SocketAddr>,
    target: SocketAddrV4,
    shared: &Shared,
    connecting: &Semaphore,
    buf: &[u8],
) {
    let mut phase = shared.phase_signal.subscribe();
    let connected = {
        let Ok(_permit) = connecting.acquire().await else {
            return;
        };
        tokio::time::timeout(CONNECT_TIMEOUT, socks::connect_async(proxy, target)).await
    };
    let s = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return shared.setup_error(e),
        Err(_) => {
            return shared.setup_error(anyhow!(
                "connect and handshake not done within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        }
    };
    shared.ready.fetch_add(1, Ordering::SeqCst);
    if phase.wait_for(|&p| p != PHASE_SETUP).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            biased;
            _ = phase.wait_for(|&p| p == PHASE_STOP) => break,
            r = s.writable() => if let Err(e) = r {
                shared.error(format!("wait for writable: {e}"));
                break;
            },
        }
        match s.try_write(buf) {
            Ok(0) => {
                shared.error("write returned 0");
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => {
                shared.error(format!("write: {e}"));
                break;
            }
        }
        // To the back of the queue after every write: `writable()` returns at once while the
        // socket has room, and tokio's budget would let one session write 128 times in a row
        // (sessions whose buffers autotuned larger then pull ahead: Jain 0.85 for direct).
        tokio::task::yield_now().await;
    }
}

/// The loopback address `conn-rate` client `id` connects from: 127.0.0.2 onwards, one per
/// client, as clients on separate hosts would. From one address, every session of every
/// client would need its own port towards the one first hop, and the closing side keeps each
/// port in TIME_WAIT for 60 s: the 28,232 ports of the default range last about a second at
/// direct's rate, after which each connect searches the range for a reusable port (a third of
/// the machine's CPU in a profile, and direct's rate varied from 13,900 to 39,900 sessions/s
/// with what earlier runs had left).
fn conn_rate_source(id: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, (2 + id % 250) as u8)
}

async fn short_session(
    source: Ipv4Addr,
    proxy: Option<SocketAddr>,
    target: SocketAddrV4,
    req: &[u8],
) -> Result<()> {
    let mut s = socks::connect_async_from(Some(source), proxy, target).await?;
    s.write_all(req).await?;
    let mut resp = vec![0u8; req.len()];
    s.read_exact(&mut resp)
        .await
        .map_err(|e| anyhow!("read response: {e}"))?;
    if resp != req {
        bail!("echo differs from the request");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::jain_index;

    #[test]
    fn jain_index_is_one_for_equal_shares_and_one_over_n_for_one_winner() {
        assert_eq!(jain_index(&[7, 7, 7, 7]), Some(1.0));
        assert_eq!(jain_index(&[0, 0, 9, 0]), Some(0.25));
        // Two sessions at x and 3x: (4x)² / (2 · 10x²) = 0.8.
        let j = jain_index(&[100, 300]).expect("some bytes");
        assert!((j - 0.8).abs() < 1e-12, "{j}");
    }

    #[test]
    fn jain_index_needs_bytes() {
        assert_eq!(jain_index(&[]), None);
        assert_eq!(jain_index(&[0, 0]), None);
    }
}
