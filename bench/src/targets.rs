//! In-process loopback targets: sinks (read and discard, count per connection; one thread per
//! connection for a few streams, tokio for many), a source (writes a repeating buffer until the
//! peer goes away), and echo servers (one thread per connection for latency, tokio for many
//! short sessions). A fresh target is started for each measured run, so bytes still in flight
//! from an earlier run never count.

use std::cell::RefCell;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Buffer size used by every bulk reader and writer.
pub const BULK_BUF: usize = 256 * 1024;
/// Listen backlog of the bench's own listeners (capped by net.core.somaxconn): workloads that
/// open sessions in batches of hundreds must never overflow the accept queue.
pub const LISTEN_BACKLOG: libc::c_int = 4096;
/// How often blocked handlers look at the stop flag.
const POLL: Duration = Duration::from_millis(500);

/// Per-stream byte counters; the sum is the bytes received, a stream whose counter does not
/// move is stalled.
#[derive(Default)]
pub struct Meter {
    streams: Mutex<Vec<Arc<AtomicU64>>>,
}

impl Meter {
    pub fn add_stream(&self) -> Arc<AtomicU64> {
        let c = Arc::new(AtomicU64::new(0));
        self.streams.lock().expect("meter lock").push(c.clone());
        c
    }

    /// Streams registered so far.
    pub fn len(&self) -> usize {
        self.streams.lock().expect("meter lock").len()
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.streams
            .lock()
            .expect("meter lock")
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// Reads and discards; counts bytes per connection in the target's meter.
    Sink,
    /// [`TargetKind::Sink`] with one tokio task per connection and one read buffer per
    /// runtime thread, for hundreds of concurrent streams.
    SinkAsync,
    /// Writes a repeating buffer until the peer closes.
    Source,
    /// Echoes, one OS thread per connection (lowest latency).
    Echo,
    /// Echoes, one tokio task per connection (many short sessions).
    EchoAsync,
}

pub struct Target {
    pub addr: SocketAddrV4,
    pub meter: Arc<Meter>,
    stop: Arc<AtomicBool>,
    /// Wakes the tokio connection tasks that wait for data when the target stops.
    stop_signal: watch::Sender<bool>,
    active: Arc<AtomicUsize>,
    accept_thread: Option<JoinHandle<()>>,
    accept_task: Option<tokio::task::JoinHandle<()>>,
}

struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    fn new(a: &Arc<AtomicUsize>) -> ActiveGuard {
        a.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(a.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn retryable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// A listener on 127.0.0.1 with a free port and a [`LISTEN_BACKLOG`] accept queue.
pub fn loopback_listener() -> Result<TcpListener> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind loopback target")?;
    // listen(2) on a listening socket only changes its backlog.
    // SAFETY: plain listen(2) on a socket this function owns.
    if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error()).context("raise the target's listen backlog");
    }
    Ok(listener)
}

impl Target {
    pub fn start(kind: TargetKind, rt: &tokio::runtime::Handle) -> Result<Target> {
        let listener = loopback_listener()?;
        let addr = match listener.local_addr()? {
            std::net::SocketAddr::V4(a) => a,
            other => anyhow::bail!("unexpected target address {other}"),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let meter = Arc::new(Meter::default());
        let mut t = Target {
            addr,
            meter,
            stop,
            stop_signal: watch::Sender::new(false),
            active,
            accept_thread: None,
            accept_task: None,
        };
        if matches!(kind, TargetKind::EchoAsync | TargetKind::SinkAsync) {
            let _enter = rt.enter();
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let (stop, active, meter) = (t.stop.clone(), t.active.clone(), t.meter.clone());
            let stop_signal = t.stop_signal.clone();
            t.accept_task = Some(rt.spawn(async move {
                loop {
                    let Ok((s, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    };
                    let guard = ActiveGuard::new(&active);
                    if kind == TargetKind::SinkAsync {
                        let counter = meter.add_stream();
                        tokio::spawn(sink_async(s, stop_signal.subscribe(), counter, guard));
                    } else {
                        tokio::spawn(echo_async(s, stop.clone(), guard));
                    }
                }
            }));
        } else {
            let (stop, active, meter) = (t.stop.clone(), t.active.clone(), t.meter.clone());
            t.accept_thread = Some(
                std::thread::Builder::new()
                    .name(format!("{kind:?}-accept").to_lowercase())
                    .spawn(move || accept_loop(kind, listener, stop, active, meter))?,
            );
        }
        Ok(t)
    }

    /// Connections currently open on the target side.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Waits until every connection to the target has closed; false on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while self.active() > 0 {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

impl Drop for Target {
    /// Stops accepting and closes the open connections (at once while data flows, within
    /// [`POLL`] otherwise), so that nothing a server still queues disturbs the next run.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.stop_signal.send_replace(true);
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
        if let Some(th) = self.accept_thread.take() {
            // Wake the blocking accept().
            let _ = TcpStream::connect_timeout(&self.addr.into(), Duration::from_secs(1));
            let _ = th.join();
        }
        self.wait_idle(POLL * 2);
    }
}

fn accept_loop(
    kind: TargetKind,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    meter: Arc<Meter>,
) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok((s, _)) = accepted else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let guard = ActiveGuard::new(&active);
        let stop = stop.clone();
        let counter = (kind == TargetKind::Sink).then(|| meter.add_stream());
        let spawned = std::thread::Builder::new()
            .name("target-conn".into())
            .spawn(move || {
                let _guard = guard;
                let _ = s.set_nodelay(true);
                match kind {
                    TargetKind::Sink => sink(s, &stop, &counter.expect("sink counter")),
                    TargetKind::Source => source(s, &stop),
                    _ => echo(s, &stop),
                }
            });
        if spawned.is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn sink(mut s: TcpStream, stop: &AtomicBool, counter: &AtomicU64) {
    let _ = s.set_read_timeout(Some(POLL));
    let mut buf = vec![0u8; BULK_BUF];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                counter.fetch_add(n as u64, Ordering::Relaxed);
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(e) if retryable(&e) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

fn source(mut s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_write_timeout(Some(POLL));
    let buf = pattern(BULK_BUF);
    while !stop.load(Ordering::Relaxed) {
        match s.write(&buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if retryable(&e) => {}
            Err(_) => return,
        }
    }
}

fn echo(mut s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(POLL));
    let _ = s.set_write_timeout(Some(POLL * 4));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() || stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(e) if retryable(&e) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

thread_local! {
    /// The read buffer of [`sink_async`]: one per runtime thread instead of one per connection.
    static SINK_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; BULK_BUF].into_boxed_slice());
}

/// One read per wake-up, and a unit of tokio's budget per read, so that a connection that stays
/// readable yields after the budget's 128 reads instead of starving the others on its runtime
/// thread. The sink does not yield after every read, as the `fair-1000` clients do after every
/// write: the senders decide who gets the bandwidth, and a yield per read cost direct a quarter
/// of its throughput (53 against 70 Gbit/s) for no gain in fairness (Jain 0.97 either way).
async fn sink_async(
    s: tokio::net::TcpStream,
    mut stop: watch::Receiver<bool>,
    counter: Arc<AtomicU64>,
    _guard: ActiveGuard,
) {
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|&stop| stop) => return,
            r = s.readable() => if r.is_err() { return },
        }
        match SINK_BUF.with_borrow_mut(|buf| s.try_read(buf)) {
            Ok(0) => return,
            Ok(n) => {
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
        // `readable()` does not count against the budget while the socket stays readable.
        tokio::task::coop::consume_budget().await;
    }
}

async fn echo_async(mut s: tokio::net::TcpStream, stop: Arc<AtomicBool>, _guard: ActiveGuard) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 4096];
    loop {
        match tokio::time::timeout(POLL, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                if !matches!(
                    tokio::time::timeout(POLL * 4, s.write_all(&buf[..n])).await,
                    Ok(Ok(()))
                ) {
                    return;
                }
            }
            Err(_) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
        }
    }
}

/// A non-constant byte pattern (so that nothing along the path can shortcut zero pages).
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}
