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

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock, Weak},
    time::Instant,
};

use proxy_common::metrics::Counter;
use tokio::sync::Notify;

use super::{sockmap::Carry, IdleClock};
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
    /// When the sweeper looks next (None: nothing parked).
    next_sweep: Option<Instant>,
}

/// One parked session: the pair, its idle clock, and what its end needs.
#[derive(Debug)]
struct Parked {
    shared: Arc<Shared>,
    carry: Carry,
    tail: Tail,
    clock: IdleClock,
    /// When the sweeper reads its counters next.
    check_at: Instant,
}

/// Why a parked session got its task back.
#[derive(Clone, Copy, Debug)]
enum Wakeup {
    /// A watch fired (or may have): carry the session on.
    Event,
    /// No payload for the idle timeout: end it.
    Idle,
}

impl Parking {
    /// Parks a session the kernel carries; `tail` ends it. A session that needs a task at once
    /// (an event came before the record was there to be woken) gets one.
    pub fn park(self: &Arc<Self>, shared: &Arc<Shared>, carry: Box<Carry>, tail: Tail) {
        let id = tail.id();
        let Some(sm) = shared.sockmap() else {
            // Cannot happen (the pair came from the sockhash); carry it in a task all the same.
            let clock = IdleClock::new(carry.idle, 0);
            tokio::spawn(resume(shared.clone(), *carry, tail, clock, Wakeup::Event));
            return;
        };
        let clock = IdleClock::new(carry.idle, carry.activity(sm));
        let check_at = Instant::now() + clock.tick();
        let rec = Box::new(Parked {
            shared: shared.clone(),
            carry: *carry,
            tail,
            clock,
            check_at,
        });
        let pending = {
            let mut inner = self.inner.lock().expect("parking lock");
            inner.parked.insert(id, rec);
            shared.metrics.inc(Counter::SessionsParked);
            if inner.next_sweep.is_none_or(|t| check_at < t) {
                inner.next_sweep = Some(check_at);
                self.sweep.notify_one();
            }
            // Whatever fired before the record was in the map woke nobody; look now that it is.
            inner
                .parked
                .get(&id)
                .is_some_and(|r| r.carry.needs_task(sm))
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
        let rec = self.inner.lock().expect("parking lock").parked.remove(&id);
        if let Some(rec) = rec {
            rec.unpark(Wakeup::Event);
        }
    }

    /// Drops every parked session (the daemon is stopping and the drain is over): each is
    /// logged as closed at shutdown and its sockets close.
    pub fn close(&self) {
        let parked = std::mem::take(&mut self.inner.lock().expect("parking lock").parked);
        for rec in parked.into_values() {
            rec.shared.metrics.dec(Counter::SessionsParked);
        }
    }

    /// Reads the counters of the sessions whose idle check is due, ends those idle for their
    /// timeout, and notes when to look next.
    fn sweep_once(&self, sm: &Sockmap) {
        let now = Instant::now();
        let due: Vec<(u64, (u64, u64))> = {
            let inner = self.inner.lock().expect("parking lock");
            inner
                .parked
                .iter()
                .filter(|(_, r)| r.check_at <= now)
                .map(|(&id, r)| (id, r.carry.cookies()))
                .collect()
        };
        // The map lookups run without the lock: wake-ups and new sessions do not wait on them.
        let bytes = |cookie| sm.traffic(cookie).map_or(0, |t| t.bytes);
        let readings: Vec<(u64, u64)> = due
            .into_iter()
            .map(|(id, (c, u))| (id, bytes(c) + bytes(u)))
            .collect();
        let mut idle = Vec::new();
        {
            let mut inner = self.inner.lock().expect("parking lock");
            let now = Instant::now();
            for (id, activity) in readings {
                let Some(r) = inner.parked.get_mut(&id) else {
                    continue;
                };
                if r.clock.expired(activity) {
                    idle.extend(inner.parked.remove(&id));
                } else {
                    r.check_at = now + r.clock.tick();
                }
            }
            inner.next_sweep = inner.parked.values().map(|r| r.check_at).min();
        }
        for rec in idle {
            rec.unpark(Wakeup::Idle);
        }
    }
}

impl Parked {
    /// Leaves the parking (and its gauge) for a task of its own.
    fn unpark(self: Box<Self>, why: Wakeup) {
        self.shared.metrics.dec(Counter::SessionsParked);
        let Self {
            shared,
            carry,
            tail,
            clock,
            ..
        } = *self;
        tokio::spawn(resume(shared, carry, tail, clock, why));
    }
}

/// The task a woken session gets: it carries the pair to its end and ends the session.
async fn resume(shared: Arc<Shared>, carry: Carry, tail: Tail, clock: IdleClock, why: Wakeup) {
    let outcome = match why {
        Wakeup::Event => carry.run(&shared, clock).await,
        Wakeup::Idle => carry.end_idle(&shared),
    };
    tail.finish(outcome);
}

/// Checks the parked sessions' idle timeouts, each when it is due, until the daemon is gone.
async fn sweeper(parking: Weak<Parking>, shared: Weak<Shared>) {
    loop {
        let Some(p) = parking.upgrade() else { return };
        let next = p.inner.lock().expect("parking lock").next_sweep;
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
        p.sweep_once(sm);
    }
}
