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
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use proxy_common::metrics::{
    Counter, DataPath, Direction, TrafficSlot, UdpPath, COUNTERS_MAX, TRAFFIC_SLOTS_MAX,
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
        f.debug_struct("Cells").field("len", &self.len).field("mapped", &(self.mapped_bytes != 0)).finish()
    }
}

impl Cells {
    fn heap(len: usize) -> Self {
        let mut heap: Box<[AtomicU64]> = (0..len).map(|_| AtomicU64::new(0)).collect();
        let ptr = NonNull::new(heap.as_mut_ptr()).expect("non-null box");
        Self { ptr, len, mapped_bytes: 0, _heap: Some(heap) }
    }

    /// Maps a `BPF_F_MMAPABLE` array of `len` 8-byte cells.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (len * 8).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's value area; checked below.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<AtomicU64>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len, mapped_bytes: bytes, _heap: None })
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
        Self { counters: Cells::heap(COUNTERS_MAX as usize), traffic: Cells::heap(2 * TRAFFIC_SLOTS_MAX as usize) }
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
        self.traffic.get(2 * TrafficSlot::tcp(path, dir).0 as usize).load(Relaxed)
    }

    /// Marks a session as relaying on `path` until the guard drops.
    pub fn relaying(&self, path: DataPath) -> ActiveGuard<'_> {
        self.inc(Counter::total(path));
        self.inc(Counter::active(path));
        ActiveGuard { metrics: self, path }
    }
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
        m.add_traffic(DataPath::Copy, Direction::Down, 10);
        assert_eq!(m.traffic_bytes(DataPath::Copy, Direction::Down), 10);
        assert_eq!(m.traffic_bytes(DataPath::Copy, Direction::Up), 0);
    }
}
