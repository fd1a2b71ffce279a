//! splice(2) through a pipe per direction: the kernel moves page references from one socket to
//! the pipe and from the pipe to the other socket; the daemon only drives readiness.
//!
//! Under `data_path = "auto"` a session starts here and may be *promoted* to the in-kernel
//! sockhash path ([`Promotion`]): splice(2) measured best for bulk streams and short sessions,
//! the sockhash for request/response traffic and for sessions that sit idle (no daemon wake-ups,
//! no pipes). Promotion stops both directions with their pipes empty and hands the sockets back.

use std::{
    convert::Infallible,
    io,
    os::fd::{AsFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed},
        Mutex,
    },
    time::Duration,
};

use proxy_common::metrics::{Counter, DataPath, Direction};
use tokio::{io::Interest, net::TcpStream, sync::watch};

use super::{copy::abort, idle_watch, End, HalfCloses, Outcome};
use crate::{metrics::Metrics, registry::ByteCounters, sys, Shared};

/// Pipe size requested per direction. Larger pipes mean fewer syscalls per byte.
const PIPE_SIZE: usize = 1 << 20;
/// Pipes kept for reuse; beyond that, returned pipes are closed. Enough for a few hundred
/// sessions starting at once; every pooled pipe holds two descriptors.
pub const POOL_MAX: usize = 256;

/// A pipe and its capacity.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
    /// Its slots (one page each): every slot the splice(2) from a socket fills holds at least
    /// one byte, so fewer bytes than this cannot have filled the pipe.
    slots: usize,
}

/// Reusable empty pipes, so that short sessions do not pay for pipe2 + F_SETPIPE_SZ.
#[derive(Debug, Default)]
pub struct PipePool {
    pipes: Mutex<Vec<Pipe>>,
}

impl PipePool {
    fn get(&self) -> io::Result<Pipe> {
        if let Some(p) = self.pipes.lock().expect("pipe pool lock").pop() {
            return Ok(p);
        }
        let (r, w) = sys::pipe()?;
        // The kernel may refuse a large size (fs.pipe-max-size, per-user pipe quota): keep the
        // default then.
        let cap = sys::set_pipe_size(w.as_fd(), PIPE_SIZE).unwrap_or(1 << 16);
        let slots = cap / sys::page_size();
        Ok(Pipe { r, w, cap, slots })
    }

    /// Returns an empty pipe to the pool.
    fn put(&self, p: Pipe) {
        let mut pipes = self.pipes.lock().expect("pipe pool lock");
        if pipes.len() < POOL_MAX {
            pipes.push(p);
        }
    }
}

/// A chunk below this size (one splice(2) call's worth) is the mark of request/response or
/// interactive traffic; a bulk stream on a fast path moves tens of KiB per wake-up, and its
/// first such chunk fits the direction's socket buffers (see [`super::buffers`]).
pub(super) const SMALL_CHUNK: usize = 16 * 1024;
/// Consecutive small chunks (both directions together) after which a session is promoted.
pub const PROMOTE_STREAK: u32 = 16;
/// A session that moved nothing for this long is promoted.
pub const PROMOTE_IDLE: Duration = Duration::from_secs(1);

/// When a session on splice(2) should move to the in-kernel path, shared by its two
/// directions. A session is promoted after [`PROMOTE_STREAK`] small chunks in a row, after
/// [`PROMOTE_IDLE`] without payload, or when no pipe can be had (descriptor pressure: the
/// sockhash needs none); never once a direction has reached end of file (a socket that received
/// a FIN cannot enter a sockhash).
#[derive(Debug)]
pub struct Promotion {
    streak: AtomicU32,
    closed: AtomicBool,
    requested: watch::Sender<bool>,
}

impl Default for Promotion {
    fn default() -> Self {
        Self {
            streak: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            requested: watch::Sender::new(false),
        }
    }
}

impl Promotion {
    fn request(&self) {
        if !self.closed.load(Relaxed) {
            self.requested.send_replace(true);
        }
    }

    fn observe(&self, chunk: usize) {
        if chunk >= SMALL_CHUNK {
            self.streak.store(0, Relaxed);
        } else if self.streak.fetch_add(1, Relaxed) + 1 >= PROMOTE_STREAK {
            self.request();
        }
    }

    fn close(&self) {
        self.closed.store(true, Relaxed);
    }

    async fn requested(&self) {
        let mut rx = self.requested.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Requests the promotion once `activity()` has not changed for [`PROMOTE_IDLE`].
    async fn idle(&self, activity: impl Fn() -> u64) {
        let mut last = activity();
        loop {
            tokio::time::sleep(PROMOTE_IDLE).await;
            let now = activity();
            if now == last {
                self.request();
                return;
            }
            last = now;
        }
    }
}

/// How a splice(2) relay ended.
#[derive(Debug)]
pub enum Spliced {
    /// The session is over.
    Done(Outcome),
    /// Both directions stopped with their pipes empty and no end of file seen: the sockets,
    /// for the in-kernel path. Every byte read so far has been written to the peer and is in
    /// `bytes`.
    Promoted {
        /// The client socket.
        client: TcpStream,
        /// The upstream socket.
        upstream: TcpStream,
    },
}

/// How one direction stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// End of file, forwarded to the peer as a half-close.
    Eof,
    /// Promotion requested; nothing read is left unwritten.
    Promote,
}

/// Relays both directions with splice(2) until both reach end of file, or, with `promotion`,
/// until the session is promoted.
///
/// `bytes` receives the running totals (read by the session registry). The caller holds the
/// session's place under `sessions_active_splice`.
pub async fn relay(
    shared: &Shared,
    client: TcpStream,
    upstream: TcpStream,
    idle: Duration,
    bytes: &ByteCounters,
    promotion: Option<&Promotion>,
) -> Spliced {
    let (up, down) = (&bytes.up, &bytes.down);
    let activity = || up.load(Relaxed) + down.load(Relaxed);
    let (fit_up, fit_down) = (AtomicBool::new(false), AtomicBool::new(false));
    let closes = HalfCloses::default();
    let way_up = Way {
        from: &client,
        to: &upstream,
        dir: Direction::Up,
        total: up,
        fitted: &fit_up,
    };
    let way_down = Way {
        from: &upstream,
        to: &client,
        dir: Direction::Down,
        total: down,
        fitted: &fit_down,
    };
    let end = tokio::select! {
        res = async {
            let (u, d) = tokio::try_join!(
                one_way(shared, way_up, &closes, promotion),
                one_way(shared, way_down, &closes, promotion),
            )?;
            if u == Flow::Promote && d == Flow::Promote {
                return Ok(None);
            }
            // One side reached end of file while the promotion was asked for: the session
            // stays here and the other side goes on.
            tokio::try_join!(
                resume(shared, u, way_up, &closes),
                resume(shared, d, way_down, &closes),
            )?;
            Ok(Some(End::Eof))
        } => match res {
            Ok(Some(end)) => end,
            Ok(None) => return Spliced::Promoted { client, upstream },
            Err(e) => End::Error(e),
        },
        () = idle_watch(idle, activity) => End::Idle,
        never = promote_when_idle(promotion, activity) => match never {},
    };
    if matches!(end, End::Error(_)) {
        abort(&client, &upstream);
    }
    Spliced::Done(Outcome {
        path: DataPath::Splice,
        up: up.load(Relaxed),
        down: down.load(Relaxed),
        end,
        promoted: false,
    })
}

/// Requests the promotion once the session has been idle for [`PROMOTE_IDLE`], then never
/// resolves (the relay ends when both directions have stopped).
async fn promote_when_idle(
    promotion: Option<&Promotion>,
    activity: impl Fn() -> u64,
) -> Infallible {
    if let Some(p) = promotion {
        p.idle(activity).await;
    }
    std::future::pending().await
}

/// Runs a direction that stopped for a promotion to its end, without promotion.
async fn resume(shared: &Shared, flow: Flow, way: Way<'_>, closes: &HalfCloses) -> io::Result<()> {
    if flow == Flow::Promote {
        one_way(shared, way, closes, None).await?;
    }
    Ok(())
}

/// One direction of a session: the socket it reads, the one it writes, and its state.
#[derive(Clone, Copy)]
struct Way<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    dir: Direction,
    /// The direction's running byte total.
    total: &'a AtomicU64,
    /// Whether the direction has fitted its sockets' buffers, across a promotion that did not
    /// happen.
    fitted: &'a AtomicBool,
}

async fn one_way(
    shared: &Shared,
    way: Way<'_>,
    closes: &HalfCloses,
    promotion: Option<&Promotion>,
) -> io::Result<Flow> {
    let Way {
        from,
        to,
        dir,
        total,
        fitted,
    } = way;
    let (pool, metrics) = (&shared.pipes, &shared.metrics);
    // Taken at the first payload, so that an idle session holds no pipe.
    let mut pipe: Option<Pipe> = None;
    let result = async {
        loop {
            match promotion {
                Some(p) => tokio::select! {
                    biased;
                    () = p.requested() => return Ok(Flow::Promote),
                    r = from.readable() => r?,
                },
                None => from.readable().await?,
            }
            let p = match &mut pipe {
                Some(p) => p,
                None => match pool.get() {
                    Ok(p) => pipe.insert(p),
                    Err(e) => match promotion {
                        // Out of descriptors: the in-kernel path needs no pipe.
                        Some(pr) if !pr.closed.load(Relaxed) => {
                            pr.request();
                            continue;
                        }
                        _ => {
                            tracing::debug!(cause = %e, "no pipe for splice(2); copying this direction");
                            copy_one_way(from, to, metrics, dir, total, closes).await?;
                            if let Some(pr) = promotion {
                                pr.close();
                            }
                            return Ok(Flow::Eof);
                        }
                    },
                },
            };
            // The pipe is empty here. A read shorter than its slots cannot have filled it, so it
            // emptied the socket's receive queue: the closure then reports `WouldBlock`, which
            // makes tokio clear the socket's readiness (as its own reads do after a short read),
            // and the next round waits for the socket instead of making a splice(2) that fails
            // with EAGAIN: one call fewer per small chunk. Tokio clears it only if no event came
            // in since the read began, so input that arrived meanwhile is not missed; a FIN or
            // an error it has seen stays.
            let mut read = 0;
            let n = match from.try_io(Interest::READABLE, || {
                read = sys::splice(from.as_fd(), p.w.as_fd(), p.cap)?;
                if read > 0 && read < p.slots {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(read)
                }
            }) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => read,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                if let Some(pr) = promotion {
                    pr.close();
                }
                // Forward the half-close; the other direction may go on.
                closes.forward(to.as_fd())?;
                return Ok(Flow::Eof);
            }
            let mut left = n;
            while left > 0 {
                to.writable().await?;
                match to.try_io(Interest::WRITABLE, || {
                    sys::splice(p.r.as_fd(), to.as_fd(), left)
                }) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            total.fetch_add(n as u64, Relaxed);
            metrics.add_traffic(DataPath::Splice, dir, n as u64);
            // The direction's sockets get bulk buffer sizes at its first large chunk.
            if n >= SMALL_CHUNK && !fitted.swap(true, Relaxed) {
                fit(shared, from, to, promotion.is_some());
            }
            if let Some(pr) = promotion {
                pr.observe(n);
            }
        }
    }
    .await;
    // Only an empty pipe goes back: after an error it may hold bytes.
    if let (Some(p), Ok(_)) = (pipe, &result) {
        pool.put(p);
    }
    result
}

/// A direction started moving bulk: fits its sockets' buffers (see [`super::buffers`]).
pub(super) fn fit(shared: &Shared, from: &TcpStream, to: &TcpStream, promotable: bool) {
    let n = shared.buffers.fit(from.as_fd(), to.as_fd(), promotable);
    if n > 0 {
        shared.metrics.add(Counter::BuffersFitted, n);
    }
}

/// Buffer of a direction that copies because it could not have a pipe.
const COPY_BUF: usize = 16 * 1024;

/// A direction that cannot have a pipe (out of descriptors) copies through a buffer instead,
/// to its end of file, rather than failing a session that has already been told it succeeded.
async fn copy_one_way(
    from: &TcpStream,
    to: &TcpStream,
    metrics: &Metrics,
    dir: Direction,
    total: &AtomicU64,
    closes: &HalfCloses,
) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        from.readable().await?;
        let n = match from.try_read(&mut buf) {
            Ok(0) => return closes.forward(to.as_fd()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut off = 0;
        while off < n {
            to.writable().await?;
            match to.try_write(&buf[off..n]) {
                Ok(m) => off += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        total.fetch_add(n as u64, Relaxed);
        metrics.add_traffic(DataPath::Copy, dir, n as u64);
    }
}
