//! Sessions the kernel carries, kept without a task while nothing happens to them.
//!
//! Once a pair is in the sockhash the daemon has nothing to do for it until a FIN, a reset, a
//! brake checkpoint or the idle timeout. A task waiting for those keeps its whole state machine
//! (the session's stages and the relay's futures, a few kilobytes) for as long as the session
//! lives, which for an idle session is all of it. A parked session is instead one record in a
//! map, keyed by session id: the end-of-stream watcher and the brake ring buffer wake it by id
//! ([`Parking::wake`]), which spawns a task that carries the session to its end
//! ([`Carry::run`]); one sweeper task reads the parked sessions' kernel byte counters for their
//! idle timeouts.
//!
//! Under `auto`, sessions that have not moved payload yet wait here too ([`super::quiet`]),
//! until their first input or their promotion.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, OnceLock, Weak},
    time::{Duration, Instant},
};

use proxy_common::metrics::Counter;
use tokio::sync::Notify;

use super::{
    quiet::{Quiet, Woken},
    sockmap::Carry,
    IdleClock, Relayed,
};
use crate::{kernel::Sockmap, session::Tail, Shared};

/// The parked sessions.
#[derive(Debug, Default)]
pub struct Parking {
    inner: Mutex<Inner>,
    /// Wakes the sweeper when a session parks with an earlier idle check than it waits for.
    sweep: Notify,
    sweeper: OnceLock<()>,
}

#[derive(Debug, Default)]
struct Inner {
    parked: HashMap<u64, Box<Parked>>,
    /// Every parked session's next check, earliest first: a sweep looks at the due ones only.
    schedule: BTreeSet<(Instant, u64)>,
}

impl Inner {
    /// Takes a session out of the map and its check out of the schedule.
    fn remove(&mut self, id: u64) -> Option<Box<Parked>> {
        let rec = self.parked.remove(&id)?;
        self.schedule.remove(&(rec.check_at, id));
        Some(rec)
    }
}

/// One parked session: the pair, its idle clock, and what its end needs.
#[derive(Debug)]
struct Parked {
    shared: Arc<Shared>,
    held: Held,
    tail: Tail,
    clock: IdleClock,
    /// When the sweeper reads its counters next.
    check_at: Instant,
}

/// What a parked session is waiting in.
#[derive(Debug)]
enum Held {
    /// The kernel carries the pair.
    Carried(Carry),
    /// No payload yet (`auto`).
    Quiet(Quiet),
}

impl Held {
    /// The sockets' cookies, for the idle check on the kernel's counters (None: a quiet
    /// session, due at a fixed time).
    fn cookies(&self) -> Option<(u64, u64)> {
        match self {
            Self::Carried(c) => Some(c.cookies()),
            Self::Quiet(_) => None,
        }
    }
}

/// Why a parked session got its task back.
#[derive(Clone, Copy, Debug)]
enum Wakeup {
    /// A watch fired (or may have): carry the session on.
    Event,
    /// Its check came due: no payload for the idle timeout (carried), or none since the relay
    /// began (quiet).
    Due,
}

impl Parking {
    /// Parks a session the kernel carries ([`Relayed::Carried`]) or one with no payload yet
    /// ([`Relayed::Quiet`]); `tail` ends it. A session that needs a task at once (an event came
    /// before the record was there to be woken) gets one. A session that ended is ended.
    pub fn park(self: &Arc<Self>, shared: &Arc<Shared>, relayed: Relayed, tail: Tail) {
        let id = tail.id();
        let (held, clock, check_at) = match relayed {
            Relayed::Done(outcome) => return tail.finish(outcome),
            Relayed::Carried(carry) => {
                let Some(sm) = shared.sockmap() else {
                    // Cannot happen (the pair came from the sockhash); carry it in a task all
                    // the same.
                    let clock = IdleClock::new(carry.idle, 0);
                    let held = Held::Carried(*carry);
                    tokio::spawn(resume(shared.clone(), held, tail, clock, Wakeup::Event));
                    return;
                };
                let clock = IdleClock::new(carry.idle, carry.activity(sm));
                let check_at = Instant::now() + clock.tick();
                (Held::Carried(*carry), clock, check_at)
            }
            Relayed::Quiet(quiet) => {
                let check_at = quiet.due();
                let clock = IdleClock::new(quiet.idle(), 0);
                (Held::Quiet(*quiet), clock, check_at)
            }
        };
        let rec = Box::new(Parked {
            shared: shared.clone(),
            held,
            tail,
            clock,
            check_at,
        });
        let pending = {
            let mut inner = self.inner.lock().expect("parking lock");
            inner.parked.insert(id, rec);
            shared.metrics.inc(Counter::SessionsParked);
            if inner.schedule.first().is_none_or(|&(t, _)| check_at < t) {
                self.sweep.notify_one();
            }
            inner.schedule.insert((check_at, id));
            // Whatever fired before the record was in the map woke nobody; look now that it is.
            inner.parked.get(&id).is_some_and(|r| match &r.held {
                Held::Carried(c) => shared.sockmap().is_none_or(|sm| c.needs_task(sm)),
                Held::Quiet(q) => q.needs_task(),
            })
        };
        self.sweeper.get_or_init(|| {
            tokio::spawn(sweeper(Arc::downgrade(self), Arc::downgrade(shared)));
        });
        if pending {
            self.wake(id);
        }
    }

    /// Gives a parked session a task, because one of its watches fired. Nothing happens if the
    /// session is not parked (it was woken already).
    pub fn wake(&self, id: u64) {
        let rec = self.inner.lock().expect("parking lock").remove(id);
        if let Some(rec) = rec {
            rec.unpark(Wakeup::Event);
        }
    }

    /// Drops every parked session (the daemon is stopping and the drain is over): each is
    /// logged as closed at shutdown and its sockets close.
    pub fn close(&self) {
        let parked = {
            let mut inner = self.inner.lock().expect("parking lock");
            inner.schedule.clear();
            std::mem::take(&mut inner.parked)
        };
        for rec in parked.into_values() {
            rec.shared.metrics.dec(Counter::SessionsParked);
        }
    }

    /// Reads the counters of the sessions whose idle check is due, takes out those idle for
    /// their timeout and the quiet ones that came due, and notes when to look next. The caller
    /// gives the sessions taken out their tasks.
    #[expect(
        clippy::vec_box,
        reason = "the records leave in the boxes they were parked in"
    )]
    fn sweep_once(&self, sm: &Sockmap) -> Vec<Box<Parked>> {
        let now = Instant::now();
        let mut due: Vec<Due> = {
            let inner = self.inner.lock().expect("parking lock");
            inner
                .schedule
                .iter()
                .take_while(|&&(t, _)| t <= now)
                .filter_map(|&(at, id)| {
                    let cookies = inner.parked.get(&id)?.held.cookies();
                    Some(Due {
                        at,
                        id,
                        cookies,
                        activity: None,
                    })
                })
                .collect()
        };
        // The map lookups run without the lock: wake-ups and new sessions do not wait on them.
        let bytes = |cookie| sm.traffic(cookie).map_or(0, |t| t.bytes);
        for d in &mut due {
            d.activity = d.cookies.map(|(c, u)| bytes(c) + bytes(u));
        }
        let mut out = Vec::new();
        let mut inner = self.inner.lock().expect("parking lock");
        let now = Instant::now();
        for Due {
            at: t,
            id,
            activity,
            ..
        } in due
        {
            // Only the record that was due: the session may have been woken, and even parked
            // again under the same id, in the meantime.
            let Some(r) = inner.parked.get_mut(&id).filter(|r| r.check_at == t) else {
                continue;
            };
            let expired = match activity {
                Some(a) => r.clock.expired(a),
                None => true,
            };
            if expired {
                out.extend(inner.remove(id));
            } else {
                r.check_at = now + r.clock.tick();
                let next = r.check_at;
                inner.schedule.remove(&(t, id));
                inner.schedule.insert((next, id));
            }
        }
        out
    }
}

/// A parked session whose check came due, and what its kernel counters read.
struct Due {
    at: Instant,
    id: u64,
    /// The sockets' cookies (None: a quiet session).
    cookies: Option<(u64, u64)>,
    /// Both sockets' byte counts, read without the lock.
    activity: Option<u64>,
}

impl Parked {
    /// Leaves the parking (and its gauge) for a task of its own.
    fn unpark(self: Box<Self>, why: Wakeup) {
        self.shared.metrics.dec(Counter::SessionsParked);
        let Self {
            shared,
            held,
            tail,
            clock,
            ..
        } = *self;
        tokio::spawn(resume(shared, held, tail, clock, why));
    }
}

/// The task a woken session gets: it carries the pair to its end and ends the session, or, for
/// a quiet session, relays it until it ends or can wait parked again.
async fn resume(shared: Arc<Shared>, held: Held, tail: Tail, clock: IdleClock, why: Wakeup) {
    match held {
        Held::Carried(carry) => {
            let outcome = match why {
                Wakeup::Event => carry.run(&shared, clock).await,
                Wakeup::Due => carry.end_idle(&shared),
            };
            tail.finish(outcome);
        }
        Held::Quiet(quiet) => {
            let woken = match why {
                Wakeup::Event => Woken::Input,
                Wakeup::Due => Woken::Due,
            };
            // Boxed: the splice(2) stage's state is freed when it ends, before a promoted
            // session parks again.
            let relayed = Box::pin(quiet.resume(&shared, tail.session(), woken)).await;
            shared.parking.park(&shared, relayed, tail);
        }
    }
}

/// Sessions given their tasks back in one go before the sweeper lets them run: a burst of quiet
/// sessions coming due at once is promoted a few at a time rather than all spawned first.
const UNPARK_BATCH: usize = 32;

/// Least time between two sweeps: checks that come due within it are made together, so that
/// sessions parked one after another (a burst) cost a sweep per gap, not one each.
const SWEEP_GAP: Duration = Duration::from_millis(20);

/// Checks the parked sessions' idle timeouts, each when it is due, until the daemon is gone.
async fn sweeper(parking: Weak<Parking>, shared: Weak<Shared>) {
    let mut earliest = Instant::now();
    loop {
        let Some(p) = parking.upgrade() else { return };
        let first = p
            .inner
            .lock()
            .expect("parking lock")
            .schedule
            .first()
            .map(|&(t, _)| t);
        let next = first.map(|t| t.max(earliest));
        match next {
            None => {
                p.sweep.notified().await;
                continue;
            }
            Some(at) if at > Instant::now() => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {}
                    () = p.sweep.notified() => continue,
                }
            }
            Some(_) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(sm) = shared.sockmap() else { return };
        let due = p.sweep_once(sm);
        earliest = Instant::now() + SWEEP_GAP;
        drop((p, shared));
        for (i, rec) in due.into_iter().enumerate() {
            if i > 0 && i % UNPARK_BATCH == 0 {
                tokio::task::yield_now().await;
            }
            rec.unpark(Wakeup::Due);
        }
    }
}
