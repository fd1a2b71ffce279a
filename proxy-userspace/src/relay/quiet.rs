//! Sessions under `auto` that have not moved payload yet, kept without a task until their first
//! byte.
//!
//! A session opened and then left quiet (a pool's spare connection, a client that has not sent
//! its request, a server that has not greeted) would otherwise wait on splice(2) for a second,
//! with its task, its relay's futures and both sockets in the reactor, before `auto` moves it
//! into the kernel. A burst of such sessions sets the daemon's memory high-water mark for good.
//! Instead, a session with nothing moved [`QUIET_AFTER`] after its reply leaves its task: both
//! sockets go into the watcher's epoll set for their first input, tagged with the session id,
//! and the session waits as a record in the parking ([`super::park`]). Its first byte, FIN or
//! reset gives it a task on splice(2) again, as if it had never stopped; a session still quiet
//! [`PROMOTE_IDLE`] after its reply is promoted to the sockhash from the record, as `auto`
//! promotes any idle session.

use std::{
    io,
    net::TcpStream as StdTcpStream,
    os::fd::AsFd,
    sync::Arc,
    time::{Duration, Instant},
};

use proxy_common::metrics::DataPath;
use tokio::net::TcpStream;

use super::{
    splice::PROMOTE_IDLE,
    watch::{self, WakeOn, Watch},
    End, Outcome, Relayed, SpliceStage,
};
use crate::{registry::SessionHandle, Shared};

/// How long a session under `auto` may go without payload after its reply before it waits
/// parked. Short enough that a burst of sessions that stay quiet never piles up their tasks,
/// long enough that a client which sends its request at once (one round trip to the daemon) or a
/// target that greets at once is relayed without the detour.
pub const QUIET_AFTER: Duration = Duration::from_millis(10);

/// Waits up to [`QUIET_AFTER`] for either socket's first input (payload, end of stream, an
/// error) without reading it. False: nothing came.
pub async fn first_payload(client: &TcpStream, upstream: &TcpStream) -> bool {
    // No readiness is left over from the negotiation, so readiness is input and no peek(2) is
    // needed to tell: the negotiation's last read from the client was shorter than its buffer
    // (payload behind the request does not come here), which clears the client's readiness, and
    // the upstream has not been read. A request that filled the read buffer exactly leaves it
    // set: that session is relayed at once instead of waiting parked.
    tokio::select! {
        _ = client.readable() => true,
        _ = upstream.readable() => true,
        () = tokio::time::sleep(QUIET_AFTER) => false,
    }
}

/// A session with no payload yet, out of the reactor, waiting parked.
#[derive(Debug)]
pub struct Quiet {
    // Fields drop in order: the watches leave the epoll set before the sockets close.
    /// First-input watches: client, upstream (None if they could not be registered: then the
    /// session is woken as soon as it is parked).
    watches: Option<(Watch, Watch)>,
    client: StdTcpStream,
    upstream: StdTcpStream,
    stage: SpliceStage,
    /// When the relay began.
    since: Instant,
    session_id: u64,
}

/// Why a quiet session left the parking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woken {
    /// Input arrived (or may have) on either socket.
    Input,
    /// [`Quiet::due`] came with nothing arriving.
    Due,
}

/// How a quiet session that never moved payload ended.
fn ended(stage: &SpliceStage, end: End) -> Relayed {
    Relayed::Done(Outcome {
        path: DataPath::Splice,
        up: stage.consumed.forwarded,
        down: 0,
        end,
        promoted: false,
    })
}

impl Quiet {
    /// Takes the pair out of the reactor and watches it for its first input; the caller parks
    /// the session. `since`: when its relay began.
    pub(super) fn hold(
        shared: &Arc<Shared>,
        session_id: u64,
        client: TcpStream,
        upstream: TcpStream,
        stage: SpliceStage,
        since: Instant,
    ) -> Relayed {
        let (client, upstream) = match (client.into_std(), upstream.into_std()) {
            (Ok(c), Ok(u)) => (c, u),
            // Cannot happen for a registered TcpStream; end the session cleanly all the same.
            _ => {
                return ended(
                    &stage,
                    End::Error(io::Error::other("cannot leave the reactor")),
                )
            }
        };
        let fds = (client.as_fd(), upstream.as_fd());
        let watches = shared
            .watcher
            .watch_parked(fds, &shared.parking, session_id, WakeOn::Input);
        let watches = match watches {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::debug!(session = session_id, cause = %e, "cannot watch a quiet session; it keeps its task");
                None
            }
        };
        Relayed::Quiet(Box::new(Self {
            watches,
            client,
            upstream,
            stage,
            since,
            session_id,
        }))
    }

    /// The session's idle timeout.
    pub fn idle(&self) -> Duration {
        self.stage.idle
    }

    /// When the session is promoted if nothing arrives: [`PROMOTE_IDLE`] after its relay
    /// began, or at its idle timeout if that is shorter (then it ends).
    pub fn due(&self) -> Instant {
        self.since + PROMOTE_IDLE.min(self.stage.idle)
    }

    /// True when the session needs a task now: input may have arrived before anyone listened
    /// for it, or the sockets are not watched.
    pub fn needs_task(&self) -> bool {
        self.watches.is_none()
            || watch::has_input(self.client.as_fd())
            || watch::has_input(self.upstream.as_fd())
    }

    /// Gives the session back to splice(2) (`Input`), or promotes it (`Due`).
    pub async fn resume(
        self,
        shared: &Arc<Shared>,
        session: &SessionHandle,
        why: Woken,
    ) -> Relayed {
        let Self {
            watches,
            client,
            upstream,
            stage,
            since,
            session_id,
        } = self;
        // Out of the epoll set before the reactor takes the sockets.
        drop(watches);
        if why == Woken::Due && since.elapsed() >= stage.idle {
            return ended(&stage, End::Idle);
        }
        let (client, upstream) = match (TcpStream::from_std(client), TcpStream::from_std(upstream))
        {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => return ended(&stage, End::Error(e)),
        };
        match why {
            Woken::Input => {
                stage
                    .run(shared, session, session_id, client, upstream)
                    .await
            }
            Woken::Due => {
                stage
                    .promote(shared, session, session_id, (client, upstream))
                    .await
            }
        }
    }
}
