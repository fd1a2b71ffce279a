//! Moving payload between an established client/upstream pair, on one of three data paths:
//! the in-kernel sockhash redirect ([`sockmap`]), splice(2) through a pipe ([`splice`]), or a
//! userspace copy ([`copy`]). [`relay`] picks the path and falls back per session.

pub mod copy;
pub mod sockmap;
pub mod splice;
pub mod watch;

use std::{
    io,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use proxy_common::metrics::{Counter, DataPath, Direction};
use tokio::net::TcpStream;

use crate::{
    config::DataPathMode,
    registry::{ByteCounters, SessionHandle},
    Config, Shared,
};

/// What a finished relay did.
#[derive(Debug)]
pub struct Outcome {
    /// The path that carried the session (at its end).
    pub path: DataPath,
    /// Payload bytes client -> target (after the negotiation).
    pub up: u64,
    /// Payload bytes target -> client.
    pub down: u64,
    /// Why it ended: `eof` (both sides closed), or the error.
    pub end: End,
    /// The session began on splice(2) and was promoted to the in-kernel path (`auto`).
    pub promoted: bool,
}

impl Outcome {
    /// The path for the session's log line: `splice>sockmap` for a promoted session.
    pub fn path_name(&self) -> &'static str {
        if self.promoted {
            "splice>sockmap"
        } else {
            self.path.name()
        }
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached end of file and were forwarded.
    Eof,
    /// A socket error (reset, timeout) ended the session; the other side was reset too.
    Error(io::Error),
    /// No payload in either direction for `timeouts.idle`.
    Idle,
    /// The daemon is shutting down.
    Shutdown,
}

/// Byte counts the daemon already moved itself before handing the pair to a data path. The
/// sockmap path needs them to know when the kernel has forwarded everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct Consumed {
    /// Bytes the daemon read from the client socket (negotiation and payload).
    pub from_client: u64,
    /// Bytes the daemon read from the upstream socket (payload, on an earlier path).
    pub from_upstream: u64,
    /// Payload bytes the daemon already wrote to the upstream (what the client pipelined behind
    /// its request, and what an earlier path moved). Counted as the session's first payload on
    /// whichever path it takes.
    pub forwarded: u64,
    /// Payload bytes the daemon already wrote to the client.
    pub forwarded_down: u64,
    /// Of `forwarded`, the bytes already in an earlier path's traffic figures.
    pub counted_up: u64,
    /// Of `forwarded_down`, the bytes already in an earlier path's traffic figures.
    pub counted_down: u64,
}

/// Relays until both directions are closed, on the configured path, falling back per session.
///
/// `auto` starts on splice(2) and promotes the session to the sockhash once it looks
/// interactive or idle (see [`splice::Promotion`]); `sockmap` goes to the sockhash at once.
pub async fn relay(
    shared: &Shared,
    session: &SessionHandle<'_>,
    config: &Config,
    session_id: u64,
    client: TcpStream,
    upstream: TcpStream,
    consumed: Consumed,
) -> Outcome {
    let idle = config.timeouts.idle;
    let sockmap = shared.sockmap().is_some();
    // Every path's future is boxed: a future is as large as its largest state, so only the
    // running path's state is allocated while a session lives.
    let (client, upstream, consumed) = if config.data_path == DataPathMode::Sockmap && sockmap {
        match Box::pin(to_sockmap(
            shared, session, session_id, client, upstream, consumed, idle,
        ))
        .await
        {
            Ok(outcome) => return outcome,
            Err(f) => f,
        }
    } else {
        (client, upstream, consumed)
    };
    let path = if config.data_path == DataPathMode::Copy {
        DataPath::Copy
    } else {
        DataPath::Splice
    };
    count_handover(
        shared,
        path,
        &consumed,
        (consumed.counted_up, consumed.counted_down),
    );
    let bytes = Arc::new(ByteCounters::default());
    bytes.down.store(consumed.forwarded_down, Relaxed);
    session.relaying(
        path,
        &client,
        &upstream,
        Some(bytes.clone()),
        consumed.forwarded,
    );
    let promotion =
        (config.data_path == DataPathMode::Auto && sockmap).then(splice::Promotion::default);
    let mut outcome = match path {
        DataPath::Copy => Box::pin(copy::relay(shared, client, upstream, idle, &bytes)).await,
        _ => {
            // Bound first: a temporary in the `match` below would keep splice(2)'s box
            // allocated for the whole life of a promoted session.
            let spliced = Box::pin(splice::relay(
                shared,
                client,
                upstream,
                idle,
                &bytes,
                promotion.as_ref(),
            ))
            .await;
            match spliced {
                splice::Spliced::Done(outcome) => outcome,
                splice::Spliced::Promoted { client, upstream } => {
                    let pair = (client, upstream);
                    let promoted =
                        promote(shared, session, session_id, pair, consumed, &bytes, idle);
                    match Box::pin(promoted).await {
                        Ok(outcome) => return outcome,
                        Err(outcome) => outcome,
                    }
                }
            }
        }
    };
    outcome.up += consumed.forwarded;
    outcome
}

/// Adds the payload the daemon moved itself at a handover to `path`'s traffic figures, less
/// what an earlier path already counted (`counted`: up, down).
fn count_handover(shared: &Shared, path: DataPath, consumed: &Consumed, counted: (u64, u64)) {
    for (dir, n) in [
        (Direction::Up, consumed.forwarded - counted.0),
        (Direction::Down, consumed.forwarded_down - counted.1),
    ] {
        if n > 0 {
            shared.metrics.add_traffic(path, dir, n);
        }
    }
}

/// Moves a session that splice(2) stopped for its promotion into the sockhash. `Ok`: the
/// session's outcome there. `Err`: the kernel refused the pair, which then finished on
/// splice(2) (its `up` still lacks `consumed.forwarded`, like any splice(2) outcome).
async fn promote(
    shared: &Shared,
    session: &SessionHandle<'_>,
    session_id: u64,
    (client, upstream): (TcpStream, TcpStream),
    consumed: Consumed,
    bytes: &Arc<ByteCounters>,
    idle: Duration,
) -> Result<Outcome, Outcome> {
    let (up, down) = (bytes.up.load(Relaxed), bytes.down.load(Relaxed));
    let moved = Consumed {
        from_client: consumed.from_client + up,
        from_upstream: consumed.from_upstream + down,
        forwarded: consumed.forwarded + up,
        forwarded_down: down,
        counted_up: consumed.forwarded + up,
        counted_down: down,
    };
    shared.metrics.inc(Counter::SessionsPromoted);
    // Each outcome's future boxed on its own: this one's state is then only the larger box's
    // pointer, not the splice(2) fallback's state beside the sockhash's.
    let handed = Box::pin(to_sockmap(
        shared, session, session_id, client, upstream, moved, idle,
    ))
    .await;
    match handed {
        Ok(mut outcome) => {
            outcome.promoted = true;
            Ok(outcome)
        }
        Err((client, upstream, left)) => {
            // What the handover moved before the refusal belongs to splice(2)'s figures.
            count_handover(
                shared,
                DataPath::Splice,
                &left,
                (moved.forwarded, moved.forwarded_down),
            );
            bytes
                .up
                .fetch_add(left.forwarded - moved.forwarded, Relaxed);
            bytes
                .down
                .fetch_add(left.forwarded_down - moved.forwarded_down, Relaxed);
            session.relaying(
                DataPath::Splice,
                &client,
                &upstream,
                Some(bytes.clone()),
                consumed.forwarded,
            );
            match Box::pin(splice::relay(shared, client, upstream, idle, bytes, None)).await {
                splice::Spliced::Done(outcome) => Err(outcome),
                // Without a `Promotion` splice(2) runs to the end.
                splice::Spliced::Promoted { .. } => Err(Outcome {
                    path: DataPath::Splice,
                    up: bytes.up.load(Relaxed),
                    down: bytes.down.load(Relaxed),
                    end: End::Error(io::Error::other("promotion without a request")),
                    promoted: false,
                }),
            }
        }
    }
}

/// Hands the pair to the sockhash; on refusal, gives it back with what the handover moved.
async fn to_sockmap(
    shared: &Shared,
    session: &SessionHandle<'_>,
    session_id: u64,
    client: TcpStream,
    upstream: TcpStream,
    consumed: Consumed,
    idle: Duration,
) -> Result<Outcome, (TcpStream, TcpStream, Consumed)> {
    let Some(sm) = shared.sockmap() else {
        return Err((client, upstream, consumed));
    };
    // The sockets keep their descriptors when they leave the reactor, so the registry can read
    // their TCP_INFO; the byte counts are the kernel's per-socket counters.
    session.relaying(DataPath::Sockmap, &client, &upstream, None, 0);
    match sockmap::relay(shared, sm, session_id, client, upstream, consumed, idle).await {
        Ok(outcome) => Ok(outcome),
        Err(fallback) => {
            shared.metrics.inc(Counter::SessionsFallback);
            tracing::debug!(session = session_id, cause = %fallback.error, "sockmap splice refused, falling back to splice(2)");
            Err((fallback.client, fallback.upstream, fallback.consumed))
        }
    }
}

/// Resolves once `activity()` (a byte count) has not changed for `idle`. Checks a few times per
/// idle period, so an idle session costs a timer wake-up every `idle / 4`, not per byte.
pub async fn idle_watch(idle: Duration, activity: impl Fn() -> u64) {
    let tick = (idle / 4).max(Duration::from_millis(100));
    let mut last = activity();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = activity();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= idle {
            return;
        }
    }
}
