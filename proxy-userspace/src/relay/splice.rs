//! splice(2) through a pipe per direction: the kernel moves page references from one socket to
//! the pipe and from the pipe to the other socket; the daemon only drives readiness.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Mutex,
    },
    time::Duration,
};

use proxy_common::metrics::{DataPath, Direction};
use tokio::{io::Interest, net::TcpStream};

use super::{copy::abort, idle_watch, End, Outcome};
use crate::{metrics::Metrics, registry::ByteCounters, sys, Shared};

/// Pipe size requested per direction. Larger pipes mean fewer syscalls per byte.
const PIPE_SIZE: usize = 1 << 20;
/// Pipes kept for reuse; beyond that, returned pipes are closed.
const POOL_MAX: usize = 1024;

/// A pipe and its capacity.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
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
        Ok(Pipe { r, w, cap })
    }

    /// Returns an empty pipe to the pool.
    fn put(&self, p: Pipe) {
        let mut pipes = self.pipes.lock().expect("pipe pool lock");
        if pipes.len() < POOL_MAX {
            pipes.push(p);
        }
    }
}

/// Relays both directions with splice(2) until both reach end of file.
///
/// `bytes` receives the running totals (read by the session registry).
pub async fn relay(
    shared: &Shared,
    client: TcpStream,
    upstream: TcpStream,
    idle: Duration,
    bytes: &ByteCounters,
) -> Outcome {
    let _active = shared.metrics.relaying(DataPath::Splice);
    let (up, down) = (&bytes.up, &bytes.down);
    let end = tokio::select! {
        res = async {
            tokio::try_join!(
                one_way(&client, &upstream, &shared.pipes, &shared.metrics, Direction::Up, up),
                one_way(&upstream, &client, &shared.pipes, &shared.metrics, Direction::Down, down),
            )
        } => match res {
            Ok(_) => End::Eof,
            Err(e) => End::Error(e),
        },
        () = idle_watch(idle, || up.load(Relaxed) + down.load(Relaxed)) => End::Idle,
    };
    if matches!(end, End::Error(_)) {
        abort(&client, &upstream);
    }
    Outcome {
        path: DataPath::Splice,
        up: up.load(Relaxed),
        down: down.load(Relaxed),
        end,
    }
}

async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    pool: &PipePool,
    metrics: &Metrics,
    dir: Direction,
    total: &AtomicU64,
) -> io::Result<()> {
    let pipe = pool.get()?;
    loop {
        from.readable().await?;
        let n = match from.try_io(Interest::READABLE, || {
            sys::splice(from.as_fd(), pipe.w.as_fd(), pipe.cap)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            pool.put(pipe);
            // Forward the half-close; the other direction may go on.
            return sys::shutdown_write(to.as_fd());
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                sys::splice(pipe.r.as_fd(), to.as_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        total.fetch_add(n as u64, Relaxed);
        metrics.add_traffic(DataPath::Splice, dir, n as u64);
    }
}
