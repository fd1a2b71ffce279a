//! Daemon-side counters: relaxed atomics updated on the hot path.
//!
//! When the eBPF object is loaded, the atomics *are* the pinned BPF arrays `EBSOCKS_COUNTERS` and
//! `EBSOCKS_UTRAFFIC`, mapped into the daemon (`BPF_F_MMAPABLE`): an update is one atomic add,
//! no syscall, and `ebsocks stats` in another process reads the live values. Without the eBPF
//! object they live on the heap.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{
        AtomicU64,
        Ordering::{Acquire, Relaxed, Release},
    },
};

use proxy_common::metrics::{
    Counter, DataPath, Direction, Histogram, Traffic, TrafficSlot, UdpPath, COUNTERS_MAX,
    LATENCY_BUCKETS_US, TRAFFIC_SLOTS_MAX,
};

/// A run of `u64` cells, on the heap or in a shared mapping of a BPF array.
pub struct Cells {
    ptr: NonNull<AtomicU64>,
    len: usize,
    mapped_bytes: usize,
    _heap: Option<Box<[AtomicU64]>>,
}

// SAFETY: the cells are atomics; the pointer is only used to reach them.
unsafe impl Send for Cells {}
// SAFETY: as above.
unsafe impl Sync for Cells {}

impl std::fmt::Debug for Cells {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cells")
            .field("len", &self.len)
            .field("mapped", &(self.mapped_bytes != 0))
            .finish()
    }
}

impl Cells {
    fn heap(len: usize) -> Self {
        let mut heap: Box<[AtomicU64]> = (0..len).map(|_| AtomicU64::new(0)).collect();
        let ptr = NonNull::new(heap.as_mut_ptr()).expect("non-null box");
        Self {
            ptr,
            len,
            mapped_bytes: 0,
            _heap: Some(heap),
        }
    }

    /// Maps a `BPF_F_MMAPABLE` array of `len` 8-byte cells.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        let page = crate::sys::page_size();
        let bytes = (len * 8).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's value area; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self {
            ptr,
            len,
            mapped_bytes: bytes,
            _heap: None,
        })
    }

    fn get(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.len, "counter index {i} out of range");
        // SAFETY: `i < len` and the cells stay mapped/allocated while `self` lives; the mapping
        // is page-aligned, so every cell is 8-byte aligned.
        unsafe { self.ptr.add(i).as_ref() }
    }
}

impl Drop for Cells {
    fn drop(&mut self) {
        if self.mapped_bytes != 0 {
            // SAFETY: unmapping exactly what `map` mapped; no reference outlives `self`.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped_bytes) };
        }
    }
}

/// All daemon counters.
#[derive(Debug)]
pub struct Metrics {
    counters: Cells,
    /// Two cells per traffic slot: bytes, packets (the layout of `Traffic`).
    traffic: Cells,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            counters: Cells::heap(COUNTERS_MAX as usize),
            traffic: Cells::heap(2 * TRAFFIC_SLOTS_MAX as usize),
        }
    }
}

impl Metrics {
    /// Counters backed by the mapped BPF arrays.
    pub fn mapped(counters: Cells, traffic: Cells) -> Self {
        Self { counters, traffic }
    }

    /// Adds one to a counter.
    pub fn inc(&self, c: Counter) {
        self.counters.get(c as usize).fetch_add(1, Relaxed);
    }

    /// Subtracts one from a gauge.
    pub fn dec(&self, c: Counter) {
        self.counters.get(c as usize).fetch_sub(1, Relaxed);
    }

    /// Reads a counter.
    pub fn get(&self, c: Counter) -> u64 {
        self.counters.get(c as usize).load(Relaxed)
    }

    /// Records `bytes` moved by the daemon on `path` in `dir`, as one packet (chunk).
    pub fn add_traffic(&self, path: DataPath, dir: Direction, bytes: u64) {
        let slot = TrafficSlot::tcp(path, dir).0 as usize;
        self.traffic.get(2 * slot).fetch_add(bytes, Relaxed);
        self.traffic.get(2 * slot + 1).fetch_add(1, Relaxed);
    }

    /// Records one UDP datagram of `bytes` payload relayed by the daemon in `dir`.
    pub fn add_udp(&self, dir: Direction, bytes: u64) {
        let slot = TrafficSlot::udp(UdpPath::Relay, dir).0 as usize;
        self.traffic.get(2 * slot).fetch_add(bytes, Relaxed);
        self.traffic.get(2 * slot + 1).fetch_add(1, Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(&self, c: Counter, n: u64) {
        self.counters.get(c as usize).fetch_add(n, Relaxed);
    }

    /// Bytes the daemon moved on `path` in `dir`.
    pub fn traffic_bytes(&self, path: DataPath, dir: Direction) -> u64 {
        self.traffic
            .get(2 * TrafficSlot::tcp(path, dir).0 as usize)
            .load(Relaxed)
    }

    /// The daemon's own bytes and chunks in a traffic slot.
    pub fn traffic(&self, slot: TrafficSlot) -> Traffic {
        let i = 2 * slot.0 as usize;
        Traffic {
            bytes: self.traffic.get(i).load(Relaxed),
            packets: self.traffic.get(i + 1).load(Relaxed),
        }
    }

    /// Records one observation of `elapsed` in a latency histogram.
    ///
    /// The count goes first and the buckets from the widest down, each with release ordering,
    /// so that a reader going from the narrowest bucket to the count (acquire) never sees a
    /// bucket larger than a wider one.
    pub fn observe(&self, h: Histogram, elapsed: std::time::Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.counters.get(h.sum_us as usize).fetch_add(us, Relaxed);
        self.counters.get(h.count as usize).fetch_add(1, Release);
        for (i, &bound) in LATENCY_BUCKETS_US.iter().enumerate().rev() {
            if us > bound {
                break;
            }
            self.counters
                .get(h.bucket(i) as usize)
                .fetch_add(1, Release);
        }
    }

    /// Reads a histogram: cumulative bucket counts (in [`LATENCY_BUCKETS_US`] order), count,
    /// and sum in microseconds.
    pub fn histogram(&self, h: Histogram) -> ([u64; LATENCY_BUCKETS_US.len()], u64, u64) {
        let mut buckets = [0u64; LATENCY_BUCKETS_US.len()];
        for (i, b) in buckets.iter_mut().enumerate() {
            *b = self.counters.get(h.bucket(i) as usize).load(Acquire);
        }
        let count = self.counters.get(h.count as usize).load(Acquire);
        (
            buckets,
            count,
            self.counters.get(h.sum_us as usize).load(Relaxed),
        )
    }

    /// Marks a session as relaying on `path` until the guard drops.
    pub fn relaying(&self, path: DataPath) -> ActiveGuard<'_> {
        self.inc(Counter::total(path));
        self.inc(Counter::active(path));
        ActiveGuard {
            metrics: self,
            path,
        }
    }
}

/// Why a session failed. Each failed session is counted once, under its most specific cause;
/// the reply-code causes cover refusals that have no more specific one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Refused with this SOCKS5 reply code (0x01-0x08).
    Reply(proxy_socks5::Reply),
    /// Username/password authentication failed.
    AuthFailed,
    /// No acceptable authentication method.
    NoAcceptableMethod,
    /// Request blocked by a socks rule.
    RuleBlocked,
    /// Connection closed at accept by a client rule.
    ClientBlocked,
    /// Negotiation not finished in time.
    NegotiationTimeout,
    /// Target not connected within `timeouts.connect`.
    ConnectTimeout,
    /// No BIND peer within `timeouts.bind`.
    BindTimeout,
    /// Connection closed at accept by a session limit.
    Limit,
    /// The target's name did not resolve.
    ResolveFailed,
    /// Malformed SOCKS message.
    ProtocolError,
    /// The client closed during the negotiation.
    ClientClosed,
    /// Another socket error.
    IoError,
}

impl Failure {
    /// The counter of this cause.
    pub fn counter(self) -> Counter {
        use proxy_socks5::Reply;
        match self {
            Self::Reply(Reply::NotAllowed) => Counter::FailNotAllowed,
            Self::Reply(Reply::NetworkUnreachable) => Counter::FailNetworkUnreachable,
            Self::Reply(Reply::HostUnreachable) => Counter::FailHostUnreachable,
            Self::Reply(Reply::ConnectionRefused) => Counter::FailConnectionRefused,
            Self::Reply(Reply::TtlExpired) => Counter::FailTtlExpired,
            Self::Reply(Reply::CommandNotSupported) => Counter::FailCommandNotSupported,
            Self::Reply(Reply::AddressTypeNotSupported) => Counter::FailAddressTypeNotSupported,
            Self::Reply(_) => Counter::FailGeneralFailure,
            Self::AuthFailed => Counter::FailAuthFailed,
            Self::NoAcceptableMethod => Counter::FailNoAcceptableMethod,
            Self::RuleBlocked => Counter::FailRuleBlocked,
            Self::ClientBlocked => Counter::FailClientBlocked,
            Self::NegotiationTimeout => Counter::FailNegotiationTimeout,
            Self::ConnectTimeout => Counter::FailConnectTimeout,
            Self::BindTimeout => Counter::FailBindTimeout,
            Self::Limit => Counter::FailLimit,
            Self::ResolveFailed => Counter::FailResolveFailed,
            Self::ProtocolError => Counter::FailProtocolError,
            Self::ClientClosed => Counter::FailClientClosed,
            Self::IoError => Counter::FailIoError,
        }
    }

    /// The reason's name in logs and metrics (`connection_refused`, `auth_failed`, ...).
    pub fn name(self) -> &'static str {
        let c = self.counter().name();
        c.strip_prefix("failures_").unwrap_or(c)
    }
}

/// Every failure counter, with its reason name, in index order.
pub fn failure_reasons() -> impl Iterator<Item = (&'static str, Counter)> {
    Counter::ALL
        .into_iter()
        .filter_map(|c| Some((c.name().strip_prefix("failures_")?, c)))
}

/// Keeps a session counted in its path's "active" gauge.
#[derive(Debug)]
pub struct ActiveGuard<'a> {
    metrics: &'a Metrics,
    path: DataPath,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.metrics.dec(Counter::active(self.path));
        self.metrics.inc(Counter::ended(self.path));
    }
}

/// [`ActiveGuard`] for state that outlives any borrow: a parked session's.
#[derive(Debug)]
pub struct OwnedActiveGuard {
    shared: std::sync::Arc<crate::Shared>,
    path: DataPath,
}

impl OwnedActiveGuard {
    /// Marks a session as relaying on `path` until the guard drops.
    pub fn new(shared: std::sync::Arc<crate::Shared>, path: DataPath) -> Self {
        shared.metrics.inc(Counter::total(path));
        shared.metrics.inc(Counter::active(path));
        Self { shared, path }
    }
}

impl Drop for OwnedActiveGuard {
    fn drop(&mut self) {
        self.shared.metrics.dec(Counter::active(self.path));
        self.shared.metrics.inc(Counter::ended(self.path));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_follow_guards() {
        let m = Metrics::default();
        {
            let _g = m.relaying(DataPath::Splice);
            assert_eq!(m.get(Counter::SessionsActiveSplice), 1);
        }
        assert_eq!(m.get(Counter::SessionsActiveSplice), 0);
        assert_eq!(m.get(Counter::SessionsTotalSplice), 1);
        assert_eq!(m.get(Counter::SessionsEndedSplice), 1);
        m.add_traffic(DataPath::Copy, Direction::Down, 10);
        assert_eq!(m.traffic_bytes(DataPath::Copy, Direction::Down), 10);
        assert_eq!(m.traffic_bytes(DataPath::Copy, Direction::Up), 0);
    }

    #[test]
    fn failure_reasons_are_distinct() {
        use proxy_socks5::Reply;
        let all = [
            Failure::Reply(Reply::GeneralFailure),
            Failure::Reply(Reply::NotAllowed),
            Failure::Reply(Reply::NetworkUnreachable),
            Failure::Reply(Reply::HostUnreachable),
            Failure::Reply(Reply::ConnectionRefused),
            Failure::Reply(Reply::TtlExpired),
            Failure::Reply(Reply::CommandNotSupported),
            Failure::Reply(Reply::AddressTypeNotSupported),
            Failure::AuthFailed,
            Failure::NoAcceptableMethod,
            Failure::RuleBlocked,
            Failure::ClientBlocked,
            Failure::NegotiationTimeout,
            Failure::ConnectTimeout,
            Failure::BindTimeout,
            Failure::Limit,
            Failure::ResolveFailed,
            Failure::ProtocolError,
            Failure::ClientClosed,
            Failure::IoError,
        ];
        let names: std::collections::BTreeSet<_> = all.iter().map(|f| f.name()).collect();
        assert_eq!(names.len(), all.len());
        assert_eq!(failure_reasons().count(), all.len());
        assert_eq!(
            Failure::Reply(Reply::ConnectionRefused).name(),
            "connection_refused"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        use std::time::Duration;
        let m = Metrics::default();
        let h = proxy_common::metrics::CONNECT_LATENCY;
        m.observe(h, Duration::from_micros(100));
        m.observe(h, Duration::from_micros(250));
        m.observe(h, Duration::from_millis(3));
        m.observe(h, Duration::from_secs(60));
        let (buckets, count, sum) = m.histogram(h);
        assert_eq!(count, 4);
        assert_eq!(sum, 100 + 250 + 3_000 + 60_000_000);
        assert_eq!(buckets[0], 2, "le 250us");
        assert_eq!(buckets[1], 2, "le 500us");
        assert_eq!(buckets[3], 2, "le 2.5ms");
        assert_eq!(buckets[4], 3, "le 5ms");
        assert_eq!(buckets[14], 3, "le 10s");
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m.get(Counter::DnsLatencyCount), 0);
    }
}
