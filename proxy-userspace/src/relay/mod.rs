//! Moving payload between an established client/upstream pair, on one of three data paths:
//! the in-kernel sockhash redirect ([`sockmap`]), splice(2) through a pipe ([`splice`]), or a
//! userspace copy ([`copy`]). [`relay`] picks the path and falls back per session.

pub mod copy;
pub mod sockmap;
pub mod splice;
pub mod watch;

use std::{
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use proxy_common::metrics::{Counter, DataPath};
use tokio::net::TcpStream;

use crate::{
    config::DataPathMode,
    registry::{ByteCounters, SessionHandle},
    Config, Shared,
};

/// What a finished relay did.
#[derive(Debug)]
pub struct Outcome {
    /// The path that carried the session.
    pub path: DataPath,
    /// Payload bytes client -> target (after the negotiation).
    pub up: u64,
    /// Payload bytes target -> client.
    pub down: u64,
    /// Why it ended: `eof` (both sides closed), or the error.
    pub end: End,
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
    /// Bytes the daemon read from the client socket (negotiation and pipelined payload).
    pub from_client: u64,
    /// Payload bytes the daemon already wrote to the upstream (what the client pipelined behind
    /// its request). Counted as the session's first payload on whichever path it takes.
    pub forwarded: u64,
}

/// Relays until both directions are closed, on the configured path, falling back per session.
pub async fn relay(
    shared: &Shared,
    session: &SessionHandle<'_>,
    config: &Config,
    session_id: u64,
    client: TcpStream,
    upstream: TcpStream,
    consumed: Consumed,
) -> Outcome {
    let want_sockmap = matches!(config.data_path, DataPathMode::Auto | DataPathMode::Sockmap);
    let idle = config.timeouts.idle;
    let (client, upstream) = match (want_sockmap, shared.sockmap()) {
        (true, Some(sm)) => {
            // The sockets keep their descriptors when they leave the reactor, so the registry can
            // read their TCP_INFO; the byte counts are the kernel's per-socket counters.
            session.relaying(DataPath::Sockmap, &client, &upstream, None, 0);
            match sockmap::relay(shared, sm, session_id, client, upstream, consumed, idle).await {
                Ok(outcome) => return outcome,
                Err(fallback) => {
                    shared.metrics.inc(Counter::SessionsFallback);
                    tracing::debug!(session = session_id, cause = %fallback.error, "sockmap splice refused, falling back to splice(2)");
                    (fallback.client, fallback.upstream)
                }
            }
        }
        _ => (client, upstream),
    };
    let path = if config.data_path == DataPathMode::Copy {
        DataPath::Copy
    } else {
        DataPath::Splice
    };
    if consumed.forwarded > 0 {
        shared.metrics.add_traffic(
            path,
            proxy_common::metrics::Direction::Up,
            consumed.forwarded,
        );
    }
    let bytes = Arc::new(ByteCounters::default());
    session.relaying(
        path,
        &client,
        &upstream,
        Some(bytes.clone()),
        consumed.forwarded,
    );
    let mut outcome = match path {
        DataPath::Copy => copy::relay(shared, client, upstream, idle, &bytes).await,
        _ => splice::relay(shared, client, upstream, idle, &bytes).await,
    };
    outcome.up += consumed.forwarded;
    outcome
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
