//! Moving payload between an established client/upstream pair, on one of three data paths:
//! the in-kernel sockhash redirect ([`sockmap`]), splice(2) through a pipe ([`splice`]), or a
//! userspace copy ([`copy`]). [`relay`] picks the path and falls back per session.

pub mod buffers;
pub mod copy;
pub mod park;
pub mod quiet;
pub mod sockmap;
pub mod splice;
pub mod watch;

use std::{
    io,
    os::fd::BorrowedFd,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use proxy_common::metrics::{Counter, DataPath, Direction};
use tokio::net::TcpStream;

use crate::{
    config::DataPathMode,
    metrics::OwnedActiveGuard,
    registry::{ByteCounters, SessionHandle},
    sys, Config, Shared,
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

/// The end of file of a session's two directions, on the paths whose relay returns (and whose
/// sockets close) as soon as both have reached it: splice(2) and copy.
///
/// The first direction to reach it forwards the half-close with `shutdown(SHUT_WR)`; the other
/// direction may go on. The second needs none: the socket it would shut has delivered its own end
/// of file already, so nothing is left unread in it and close(2), a moment later, sends the FIN
/// just as the shutdown would have, after the bytes queued before it. One system call fewer per
/// session.
#[derive(Debug, Default)]
pub(crate) struct HalfCloses(AtomicBool);

impl HalfCloses {
    /// A direction read end of file: forwards it to `to` unless the other direction has ended.
    pub(crate) fn forward(&self, to: BorrowedFd<'_>) -> io::Result<()> {
        if self.0.swap(true, Relaxed) {
            Ok(())
        } else {
            sys::shutdown_write(to)
        }
    }
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

/// Where a relay got to.
#[derive(Debug)]
pub enum Relayed {
    /// The session ended.
    Done(Outcome),
    /// The kernel carries the pair; the caller parks it ([`park`]) or runs it to its end.
    Carried(Box<sockmap::Carry>),
    /// Under `auto`, no payload yet: the caller parks the session until its first byte
    /// ([`quiet`]).
    Quiet(Box<quiet::Quiet>),
}

/// Relays on the configured path, falling back per session, until both directions are closed
/// or the session can wait parked.
///
/// `auto` starts on splice(2) and promotes the session to the sockhash once it looks
/// interactive or idle (see [`splice::Promotion`]); a session that has not moved payload
/// [`quiet::QUIET_AFTER`] after its reply waits parked for its first byte instead. `sockmap`
/// goes to the sockhash at once.
pub async fn relay(
    shared: &Arc<Shared>,
    session: &SessionHandle,
    config: &Config,
    session_id: u64,
    client: TcpStream,
    upstream: TcpStream,
    consumed: Consumed,
) -> Relayed {
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
            Ok(relayed) => return relayed,
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
    if path == DataPath::Copy {
        let mut outcome = Box::pin(copy::relay(shared, client, upstream, idle, &bytes)).await;
        outcome.up += consumed.forwarded;
        return Relayed::Done(outcome);
    }
    let active = OwnedActiveGuard::new(shared.clone(), DataPath::Splice);
    let auto = config.data_path == DataPathMode::Auto && sockmap;
    let stage = SpliceStage {
        consumed,
        bytes,
        active,
        idle,
        auto,
    };
    if auto && consumed.forwarded == 0 && consumed.forwarded_down == 0 {
        let began = Instant::now();
        let waited = Box::pin(quiet::first_payload(&client, &upstream)).await;
        if !waited {
            return quiet::Quiet::hold(shared, session_id, client, upstream, stage, began);
        }
    }
    stage
        .run(shared, session, session_id, client, upstream)
        .await
}

/// What the splice(2) stage of a session carries with it, from its start to its end or its
/// promotion (also while it waits parked, [`quiet`]).
#[derive(Debug)]
pub struct SpliceStage {
    /// What the daemon moved before the stage began.
    consumed: Consumed,
    /// The stage's running totals (read by the session registry).
    bytes: Arc<ByteCounters>,
    /// The session's place under `sessions_active_splice`.
    active: OwnedActiveGuard,
    idle: Duration,
    /// `auto`: the stage may promote the session to the sockhash.
    auto: bool,
}

impl SpliceStage {
    /// Relays on splice(2) to the end or, under `auto`, to the promotion.
    async fn run(
        self,
        shared: &Arc<Shared>,
        session: &SessionHandle,
        session_id: u64,
        client: TcpStream,
        upstream: TcpStream,
    ) -> Relayed {
        let promotion = self.auto.then(splice::Promotion::default);
        // Bound first: a temporary in the `match` below would keep splice(2)'s box allocated
        // for the whole life of a promoted session.
        let spliced = Box::pin(splice::relay(
            shared,
            client,
            upstream,
            self.idle,
            &self.bytes,
            promotion.as_ref(),
        ))
        .await;
        match spliced {
            splice::Spliced::Done(mut outcome) => {
                outcome.up += self.consumed.forwarded;
                Relayed::Done(outcome)
            }
            splice::Spliced::Promoted { client, upstream } => {
                let pair = (client, upstream);
                Box::pin(self.promote(shared, session, session_id, pair)).await
            }
        }
    }

    /// Moves a session that splice(2) stopped for its promotion (or that waited parked without
    /// payload) into the sockhash; a pair the kernel refuses finishes on splice(2).
    async fn promote(
        self,
        shared: &Arc<Shared>,
        session: &SessionHandle,
        session_id: u64,
        (client, upstream): (TcpStream, TcpStream),
    ) -> Relayed {
        let Self {
            consumed,
            bytes,
            active,
            idle,
            ..
        } = self;
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
        // Each outcome's future boxed on its own: this one's state is then only the larger
        // box's pointer, not the splice(2) fallback's state beside the sockhash's.
        let handed = Box::pin(to_sockmap(
            shared, session, session_id, client, upstream, moved, idle,
        ))
        .await;
        match handed {
            Ok(Relayed::Carried(mut carry)) => {
                carry.promoted = true;
                Relayed::Carried(carry)
            }
            Ok(Relayed::Done(mut outcome)) => {
                outcome.promoted = true;
                Relayed::Done(outcome)
            }
            // Not from a handover, which carries or ends the session.
            Ok(relayed @ Relayed::Quiet(_)) => relayed,
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
                // Still the same splice(2) session: `active` has held its place throughout.
                let spliced =
                    Box::pin(splice::relay(shared, client, upstream, idle, &bytes, None)).await;
                drop(active);
                let mut outcome = match spliced {
                    splice::Spliced::Done(outcome) => outcome,
                    // Without a `Promotion` splice(2) runs to the end.
                    splice::Spliced::Promoted { .. } => Outcome {
                        path: DataPath::Splice,
                        up: bytes.up.load(Relaxed),
                        down: bytes.down.load(Relaxed),
                        end: End::Error(io::Error::other("promotion without a request")),
                        promoted: false,
                    },
                };
                outcome.up += consumed.forwarded;
                Relayed::Done(outcome)
            }
        }
    }
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

/// Hands the pair to the sockhash; on refusal, gives it back with what the handover moved.
async fn to_sockmap(
    shared: &Arc<Shared>,
    session: &SessionHandle,
    session_id: u64,
    client: TcpStream,
    upstream: TcpStream,
    consumed: Consumed,
    idle: Duration,
) -> Result<Relayed, (TcpStream, TcpStream, Consumed)> {
    let Some(sm) = shared.sockmap() else {
        return Err((client, upstream, consumed));
    };
    // The sockets keep their descriptors when they leave the reactor, so the registry can read
    // their TCP_INFO; the byte counts are the kernel's per-socket counters.
    session.relaying(DataPath::Sockmap, &client, &upstream, None, 0);
    let handed = sockmap::hand_over(shared, sm, session_id, client, upstream, consumed, idle).await;
    match handed {
        sockmap::Handover::Carried(carry) => Ok(Relayed::Carried(carry)),
        sockmap::Handover::Failed(outcome) => Ok(Relayed::Done(outcome)),
        sockmap::Handover::Refused(fallback) => {
            shared.metrics.inc(Counter::SessionsFallback);
            tracing::debug!(session = session_id, cause = %fallback.error, "sockmap splice refused, falling back to splice(2)");
            Err((fallback.client, fallback.upstream, fallback.consumed))
        }
    }
}

/// Tells when a byte count stopped changing for the idle timeout.
#[derive(Clone, Copy, Debug)]
pub struct IdleClock {
    idle: Duration,
    last: u64,
    since: Instant,
}

impl IdleClock {
    /// Starts the clock at the count `activity`.
    pub fn new(idle: Duration, activity: u64) -> Self {
        Self {
            idle,
            last: activity,
            since: Instant::now(),
        }
    }

    /// How often to read the count: a few times per idle period, so an idle session costs a
    /// check every `idle / 4`, not one per byte.
    pub fn tick(&self) -> Duration {
        (self.idle / 4).max(Duration::from_millis(100))
    }

    /// Notes the count read now; true once it has not changed for the idle timeout.
    pub fn expired(&mut self, activity: u64) -> bool {
        if activity != self.last {
            self.last = activity;
            self.since = Instant::now();
            false
        } else {
            self.since.elapsed() >= self.idle
        }
    }
}

/// Resolves once `activity()` (a byte count) has not changed for `idle`.
pub async fn idle_watch(idle: Duration, activity: impl Fn() -> u64) {
    idle_watch_from(IdleClock::new(idle, activity()), activity).await;
}

/// [`idle_watch`] on a clock already running.
pub async fn idle_watch_from(clock: IdleClock, activity: impl Fn() -> u64) {
    let mut clock = clock;
    loop {
        tokio::time::sleep(clock.tick()).await;
        if clock.expired(activity()) {
            return;
        }
    }
}
