//! Per-association state with a fixed upper bound: the targets the client has sent to (the
//! only sources whose datagrams go back to it) and the cache of resolved names.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::{
    task::{Id, JoinSet},
    time::Instant,
};

use crate::resolve::Names;

/// Targets remembered per association; past this the oldest is forgotten, and its replies are
/// then dropped as foreign.
pub const MAX_TARGETS: usize = 4096;

/// How long a resolved name is used before it is looked up again.
pub const DNS_TTL: Duration = Duration::from_secs(60);
/// How long a failed lookup is remembered, so a stream of datagrams to a name that does not
/// resolve does not start a lookup each.
pub const DNS_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Names cached per association.
pub const DNS_CACHE_MAX: usize = 256;
/// Lookups in flight per association.
pub const MAX_LOOKUPS: usize = 16;
/// Datagrams held per name while its first lookup runs.
pub const MAX_QUEUED_PER_NAME: usize = 32;
/// Payload bytes held per association while lookups run.
pub const MAX_QUEUED_BYTES: usize = 256 * 1024;
/// A lookup that takes longer counts as failed.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The key under which an address is compared: IPv4-mapped IPv6 as IPv4, and no IPv6 flow
/// label or scope id (the SOCKS header carries neither, the kernel reports both).
pub fn key(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The targets the client has sent to, oldest first.
#[derive(Debug, Default)]
pub struct Targets {
    set: HashSet<SocketAddr>,
    order: VecDeque<SocketAddr>,
}

impl Targets {
    /// Remembers `target` (a [`key`]), forgetting the oldest one when full. Returns whether
    /// it is new and which one was forgotten, so that the XDP peer map can follow.
    pub fn insert(&mut self, target: SocketAddr) -> (bool, Option<SocketAddr>) {
        if self.set.contains(&target) {
            return (false, None);
        }
        let mut evicted = None;
        if self.order.len() >= MAX_TARGETS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
                evicted = Some(old);
            }
        }
        self.set.insert(target);
        self.order.push_back(target);
        (true, evicted)
    }

    /// Whether `source` (a [`key`]) is a target the client has sent to.
    pub fn contains(&self, source: &SocketAddr) -> bool {
        self.set.contains(source)
    }
}

/// What the cache knows about a name.
#[derive(Debug, PartialEq, Eq)]
pub enum Cached<'a> {
    /// Resolved to these addresses; the datagram can go now.
    Hit(&'a [IpAddr]),
    /// The name did not resolve a moment ago.
    Failed,
    /// Not known yet: queue the datagram with [`Resolver::enqueue`].
    Miss,
}

#[derive(Debug)]
struct Entry {
    /// Empty when the lookup failed.
    ips: Vec<IpAddr>,
    expires: Instant,
}

#[derive(Debug)]
struct Pending {
    task: Id,
    queue: Vec<(u16, Vec<u8>)>,
}

/// A name whose lookup finished, with the datagrams that waited for it.
#[derive(Debug)]
pub struct Resolved {
    /// The name as the client sent it.
    pub name: String,
    /// Port and payload of each queued datagram, in arrival order.
    pub queue: Vec<(u16, Vec<u8>)>,
}

/// Asynchronous name resolution with a small cache, so that the relay goes on moving other
/// datagrams while a name resolves and a stream to one name resolves it once a minute.
///
/// Lookups run as tasks on the daemon's resolver ([`Names`]); dropping the resolver aborts
/// them. An expired entry that resolved is still used while it is refreshed,
/// so a steady stream is not held up at each expiry.
#[derive(Debug, Default)]
pub struct Resolver {
    cache: HashMap<String, Entry>,
    pending: HashMap<String, Pending>,
    tasks: JoinSet<(String, io::Result<Vec<IpAddr>>)>,
    queued_bytes: usize,
    names: Names,
}

impl Resolver {
    /// A resolver for one association, on the daemon's `names`.
    pub fn new(names: Names) -> Self {
        Self {
            names,
            ..Self::default()
        }
    }

    /// Looks `name` up in the cache. A stale hit starts a refresh in the background.
    pub fn get(&mut self, name: &str, now: Instant) -> Cached<'_> {
        let (stale, failed) = match self.cache.get(name) {
            None => return Cached::Miss,
            Some(e) => (e.expires <= now, e.ips.is_empty()),
        };
        if stale {
            if failed {
                return Cached::Miss;
            }
            if !self.pending.contains_key(name) && self.tasks.len() < MAX_LOOKUPS {
                self.start(name.to_owned(), Vec::new());
            }
        }
        match self.cache.get(name) {
            Some(e) if !e.ips.is_empty() => Cached::Hit(&e.ips),
            _ => Cached::Failed,
        }
    }

    /// Holds a datagram for `name` until its lookup finishes, starting the lookup if none
    /// runs. False (nothing held) when the association's limits on lookups or held datagrams
    /// are reached.
    pub fn enqueue(&mut self, name: String, port: u16, payload: Vec<u8>) -> bool {
        if self.queued_bytes + payload.len() > MAX_QUEUED_BYTES {
            return false;
        }
        let len = payload.len();
        if let Some(p) = self.pending.get_mut(&name) {
            if p.queue.len() >= MAX_QUEUED_PER_NAME {
                return false;
            }
            p.queue.push((port, payload));
        } else {
            if self.tasks.len() >= MAX_LOOKUPS {
                return false;
            }
            self.start(name, vec![(port, payload)]);
        }
        self.queued_bytes += len;
        true
    }

    fn start(&mut self, name: String, queue: Vec<(u16, Vec<u8>)>) {
        let lookup_name = name.clone();
        let names = self.names.clone();
        let handle = self.tasks.spawn(async move {
            let res = match tokio::time::timeout(LOOKUP_TIMEOUT, names.lookup(&lookup_name)).await {
                Ok(Ok(ips)) => Ok(ips.to_vec()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "name lookup timed out",
                )),
            };
            (lookup_name, res)
        });
        self.pending.insert(
            name,
            Pending {
                task: handle.id(),
                queue,
            },
        );
    }

    /// Whether a lookup is running, i.e. whether [`Resolver::next`] can return.
    pub fn busy(&self) -> bool {
        !self.tasks.is_empty()
    }

    /// Waits for the next lookup to finish and caches its result. Cancel-safe: a lookup that
    /// finishes while the caller is busy elsewhere is kept for the next call.
    pub async fn next(&mut self) -> Option<Resolved> {
        let joined = self.tasks.join_next_with_id().await?;
        let now = Instant::now();
        let (name, ips) = match joined {
            Ok((_, (name, Ok(ips)))) => (name, ips),
            Ok((_, (name, Err(e)))) => {
                tracing::debug!(name, cause = %e, "UDP destination does not resolve");
                (name, Vec::new())
            }
            // Only at abort or a panic in the resolver: treat as a failed lookup.
            Err(e) => {
                let name = self
                    .pending
                    .iter()
                    .find(|(_, p)| p.task == e.id())
                    .map(|(n, _)| n.clone())?;
                (name, Vec::new())
            }
        };
        let queue = self
            .pending
            .remove(&name)
            .map(|p| p.queue)
            .unwrap_or_default();
        self.queued_bytes = self
            .queued_bytes
            .saturating_sub(queue.iter().map(|(_, d)| d.len()).sum());
        self.store(&name, ips, now);
        Some(Resolved { name, queue })
    }

    fn store(&mut self, name: &str, ips: Vec<IpAddr>, now: Instant) {
        if ips.is_empty() {
            // A failed refresh keeps the last good answer a little longer.
            if let Some(e) = self.cache.get_mut(name).filter(|e| !e.ips.is_empty()) {
                e.expires = now + DNS_NEGATIVE_TTL;
                return;
            }
        }
        let ttl = if ips.is_empty() {
            DNS_NEGATIVE_TTL
        } else {
            DNS_TTL
        };
        if !self.cache.contains_key(name) && self.cache.len() >= DNS_CACHE_MAX {
            let oldest = self
                .cache
                .iter()
                .min_by_key(|(_, e)| e.expires)
                .map(|(n, _)| n.clone());
            if let Some(n) = oldest {
                self.cache.remove(&n);
            }
        }
        self.cache.insert(
            name.to_owned(),
            Entry {
                ips,
                expires: now + ttl,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn key_drops_mapping_and_scope() {
        assert_eq!(key(a("[::ffff:192.0.2.1]:53")), a("192.0.2.1:53"));
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap(),
            9,
            7,
            3,
        ));
        assert_eq!(key(scoped), a("[fe80::1]:9"));
    }

    #[test]
    fn targets_forget_the_oldest() {
        let mut t = Targets::default();
        for port in 1..=MAX_TARGETS as u16 {
            t.insert(SocketAddr::new([127, 0, 0, 1].into(), port));
        }
        t.insert(a("127.0.0.1:1"));
        assert_eq!((t.order.len(), t.set.len()), (MAX_TARGETS, MAX_TARGETS));
        t.insert(a("10.0.0.1:1"));
        assert_eq!((t.order.len(), t.set.len()), (MAX_TARGETS, MAX_TARGETS));
        assert!(!t.contains(&a("127.0.0.1:1")));
        assert!(t.contains(&a("127.0.0.1:2")));
        assert!(t.contains(&a("10.0.0.1:1")));
    }

    /// Lookups that the tests start are never awaited; `shutdown_background` leaves any
    /// getaddrinfo still running behind instead of waiting for it.
    fn with_runtime(f: impl std::future::Future<Output = ()>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f);
        rt.shutdown_background();
    }

    #[test]
    fn cache_serves_stale_and_bounds_its_size() {
        with_runtime(async {
            let mut r = Resolver::default();
            let now = Instant::now();
            r.store("a.test", vec!["192.0.2.1".parse().unwrap()], now);
            r.store("gone.test", Vec::new(), now);
            assert_eq!(
                r.get("a.test", now),
                Cached::Hit(&["192.0.2.1".parse().unwrap()])
            );
            assert!(!r.busy());
            assert_eq!(r.get("gone.test", now), Cached::Failed);
            assert_eq!(r.get("new.test", now), Cached::Miss);

            let later = now + DNS_TTL;
            assert_eq!(r.get("gone.test", later), Cached::Miss);
            // Stale but good: still served, and a refresh starts.
            assert!(matches!(r.get("a.test", later), Cached::Hit(_)));
            assert!(r.busy());
            assert!(r.pending.contains_key("a.test"));
            // A failed refresh keeps the old answer.
            r.pending.clear();
            r.store("a.test", Vec::new(), later);
            assert!(matches!(r.get("a.test", later), Cached::Hit(_)));

            for i in 0..DNS_CACHE_MAX + 10 {
                r.store(
                    &format!("n{i}.test"),
                    vec!["192.0.2.2".parse().unwrap()],
                    later,
                );
            }
            assert_eq!(r.cache.len(), DNS_CACHE_MAX);
        });
    }

    #[test]
    fn queue_is_bounded() {
        with_runtime(async {
            let mut r = Resolver::default();
            for _ in 0..MAX_QUEUED_PER_NAME {
                assert!(r.enqueue("x.invalid".into(), 1, vec![0; 10]));
            }
            assert!(!r.enqueue("x.invalid".into(), 1, vec![0; 10]));
            assert!(!r.enqueue("y.invalid".into(), 1, vec![0; MAX_QUEUED_BYTES]));
            for i in 1..MAX_LOOKUPS {
                assert!(r.enqueue(format!("n{i}.invalid"), 1, vec![0; 1]));
            }
            assert!(!r.enqueue("one-too-many.invalid".into(), 1, vec![0; 1]));
        });
    }
}
