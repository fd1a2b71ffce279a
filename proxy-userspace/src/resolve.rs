//! Name resolution for the whole daemon: the system resolver (`getaddrinfo`, so
//! `/etc/hosts`, `nsswitch.conf` and `resolv.conf` apply) on tokio's blocking pool, with three
//! bounds that keep a resolver that stops answering from taking the daemon down with it:
//!
//! - at most [`MAX_LOOKUPS`] lookups run at once. A lookup the resolver never answers holds
//!   its thread for as long as the resolver's own retries last (`timeout` x `attempts` per
//!   server, 10 s and more), and tokio's blocking pool, shared with the password checks of
//!   RFC 1929 logins, has 512 threads: unbounded lookups would leave logins waiting behind
//!   them, even logins for sessions to literal addresses;
//! - one lookup per name at a time, however many sessions ask for it;
//! - a lookup still waiting for its turn when every session that asked for it has given up
//!   (their `timeouts.connect` passed) is not run: a burst of requests during an outage would
//!   otherwise leave a backlog that delays every lookup after the resolver recovers.
//!
//! Callers bound their wait themselves (`tokio::time::timeout`); the lookup goes on without
//! them.

use std::{
    collections::HashMap,
    fmt, io,
    net::{IpAddr, ToSocketAddrs as _},
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::{watch, Semaphore};

/// Lookups running at once, daemon-wide: half of tokio's blocking pool, so that logins
/// always find a thread.
pub const MAX_LOOKUPS: usize = 256;

/// A finished lookup, shared by everyone who waited for it.
type Outcome = Result<Arc<[IpAddr]>, (io::ErrorKind, Arc<str>)>;

/// The blocking lookup itself (replaceable in tests).
type LookupFn = dyn Fn(&str) -> io::Result<Vec<IpAddr>> + Send + Sync;

/// The daemon's resolver; clones share it.
#[derive(Clone)]
pub struct Names {
    inner: Arc<Inner>,
}

/// Names being resolved, each with the channel its result comes on.
type InFlight = HashMap<String, watch::Receiver<Option<Outcome>>>;

impl Inner {
    fn map(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

struct Inner {
    /// Names being resolved, each with the channel its result comes on. The map's own receiver
    /// is not a waiter.
    in_flight: Mutex<InFlight>,
    permits: Arc<Semaphore>,
    lookup: Box<LookupFn>,
}

impl fmt::Debug for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Names")
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::with_lookup(MAX_LOOKUPS, system_lookup)
    }
}

/// `getaddrinfo` for `host`, every address in the resolver's order.
fn system_lookup(host: &str) -> io::Result<Vec<IpAddr>> {
    Ok((host, 0).to_socket_addrs()?.map(|a| a.ip()).collect())
}

impl Names {
    fn with_lookup(
        max: usize,
        lookup: impl Fn(&str) -> io::Result<Vec<IpAddr>> + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                in_flight: Mutex::new(HashMap::new()),
                permits: Arc::new(Semaphore::new(max)),
                lookup: Box::new(lookup),
            }),
        }
    }

    /// Names being resolved or waiting for their turn.
    pub fn in_flight(&self) -> usize {
        self.map().len()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.inner.map()
    }

    /// The addresses of `host`, in the resolver's order. Joins a lookup of the same name that
    /// is already under way. Cancel-safe: dropping the future leaves the lookup to the others
    /// who wait for it, or, if it has not started, to be skipped.
    pub async fn lookup(&self, host: &str) -> io::Result<Arc<[IpAddr]>> {
        let mut rx = {
            let mut map = self.map();
            if let Some(rx) = map.get(host) {
                rx.clone()
            } else {
                let (tx, rx) = watch::channel(None);
                map.insert(host.to_owned(), rx.clone());
                tokio::spawn(run(self.inner.clone(), host.to_owned(), tx));
                rx
            }
        };
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(done) => done.clone(),
            // The runtime is shutting down.
            Err(_) => None,
        };
        match outcome {
            Some(Ok(ips)) => Ok(ips),
            Some(Err((kind, message))) => Err(io::Error::new(kind, message.to_string())),
            None => Err(io::Error::other("the lookup ended without an answer")),
        }
    }
}

/// One lookup: waits for its turn, runs unless nobody waits any more, hands out the result
/// and leaves the in-flight map.
async fn run(inner: Arc<Inner>, host: String, tx: watch::Sender<Option<Outcome>>) {
    let Ok(permit) = inner.permits.clone().acquire_owned().await else {
        return;
    };
    {
        let mut map = inner.map();
        // Only the map's own receiver is left: every session that asked has given up.
        // Waiters subscribe under this lock, so none can join after this check.
        if tx.receiver_count() <= 1 {
            map.remove(&host);
            return;
        }
    }
    let job = {
        let inner = inner.clone();
        let host = host.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            (inner.lookup)(&host)
        })
    };
    let outcome = match job.await {
        Ok(Ok(ips)) => Ok(Arc::from(ips)),
        Ok(Err(e)) => Err((e.kind(), Arc::from(e.to_string()))),
        Err(e) => Err((
            io::ErrorKind::Other,
            Arc::from(format!("the lookup failed: {e}")),
        )),
    };
    let mut map = inner.map();
    tx.send_replace(Some(outcome));
    if map
        .get(&host)
        .is_some_and(|rx| rx.same_channel(&tx.subscribe()))
    {
        map.remove(&host);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Condvar,
        },
        time::Duration,
    };

    use super::*;

    /// A lookup that blocks until [`Gate::open`], counting calls and calls running at once.
    #[derive(Default)]
    struct Gate {
        open: Mutex<bool>,
        cv: Condvar,
        calls: AtomicUsize,
        running: AtomicUsize,
        most: AtomicUsize,
    }

    impl Gate {
        fn lookup(&self, host: &str) -> io::Result<Vec<IpAddr>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
            drop(open);
            self.running.fetch_sub(1, Ordering::SeqCst);
            if host.ends_with(".invalid") {
                return Err(io::Error::new(io::ErrorKind::NotFound, "no such name"));
            }
            Ok(vec![
                IpAddr::from([192, 0, 2, 1]),
                IpAddr::from([192, 0, 2, 2]),
            ])
        }

        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.cv.notify_all();
        }
    }

    fn names(max: usize) -> (Names, Arc<Gate>) {
        let gate = Arc::new(Gate::default());
        let g = gate.clone();
        (Names::with_lookup(max, move |h| g.lookup(h)), gate)
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_lookup_per_name_shared_by_every_waiter() {
        let (names, gate) = names(4);
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let names = names.clone();
                tokio::spawn(async move { names.lookup("a.test").await })
            })
            .collect();
        let bad = {
            let names = names.clone();
            tokio::spawn(async move { names.lookup("b.invalid").await })
        };
        settle().await;
        assert_eq!(gate.calls.load(Ordering::SeqCst), 2);
        assert_eq!(names.in_flight(), 2);
        gate.open();
        for w in waiters {
            let ips = w.await.unwrap().unwrap();
            assert_eq!(
                &*ips,
                &[IpAddr::from([192, 0, 2, 1]), IpAddr::from([192, 0, 2, 2])]
            );
        }
        let e = bad.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(e.to_string(), "no such name");
        assert_eq!(names.in_flight(), 0);
        // A later request looks the name up again.
        names.lookup("a.test").await.unwrap();
        assert_eq!(gate.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_at_once_are_bounded_and_abandoned_ones_skipped() {
        let (names, gate) = names(4);
        // 20 names, each asked for by a session that gives up after 100 ms.
        let gave_up: Vec<_> = (0..20)
            .map(|i| {
                let names = names.clone();
                tokio::spawn(async move {
                    tokio::time::timeout(
                        Duration::from_millis(100),
                        names.lookup(&format!("n{i}.test")),
                    )
                    .await
                })
            })
            .collect();
        for g in gave_up {
            assert!(
                g.await.unwrap().is_err(),
                "a lookup answered through a closed gate"
            );
        }
        assert_eq!(
            gate.calls.load(Ordering::SeqCst),
            4,
            "only 4 may run at once"
        );
        // One more name, with a session that waits.
        let waiting = {
            let names = names.clone();
            tokio::spawn(async move { names.lookup("late.test").await })
        };
        settle().await;
        gate.open();
        waiting.await.unwrap().unwrap();
        // The 16 that nobody waited for any more were never run.
        assert_eq!(gate.calls.load(Ordering::SeqCst), 5);
        assert_eq!(gate.most.load(Ordering::SeqCst), 4);
        settle().await;
        assert_eq!(names.in_flight(), 0);
    }
}
