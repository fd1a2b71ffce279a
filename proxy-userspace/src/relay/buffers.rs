//! Socket buffer sizes per data path.
//!
//! The kernel's autotuning grows a busy socket's buffers towards `tcp_wmem`/`tcp_rmem`'s
//! maximum (4 and 32 MiB here), sized by round trips that, between two sockets on one host,
//! are mostly queueing. A relay on splice(2) or copy then holds megabytes of every bulk stream
//! in its two sockets, and the bytes a sender wrote have left the CPU caches by the time the
//! receiver copies them out: the copies at the two ends of proxied loopback streams took 1.7 and
//! 2.4 times as long per byte as on a direct connection. So a *near* socket (its lowest round trip at
//! most [`NEAR_RTT_US`]: on this host, in a namespace beside it) that starts carrying a bulk
//! direction on those paths gets fixed buffers of [`FIT`]: the receive buffer of the socket the
//! direction reads and the send buffer of the one it writes. Far sockets keep autotuning, which
//! their bandwidth-delay product needs.
//!
//! The sockhash wants the opposite: its brake judges the backlog by what the peer's send queue
//! accepted, and a larger send buffer lets more of the kernel's redirect backlog in before the
//! brake engages. Sockets entering it get send buffers of [`KERNEL`] (kernel-side 8 MiB, twice
//! autotuning's 4 MiB ceiling here), and near ones receive buffers of the same size, which also
//! undoes the splice(2) fit of a session promoted under `auto`. A fit that could not be undone
//! that way (system maximums below [`KERNEL_MIN`], which an unprivileged daemon cannot exceed)
//! is not made on a session that may be promoted.

use std::{fs, os::fd::BorrowedFd, path::Path};

use crate::sys::{self, TcpInfo};

/// Lowest round trip (`tcpi_min_rtt`) up to which a peer is near, in microseconds: loopback
/// sockets measured 1-11 µs under load here; a hop through a switch is mostly above it.
pub const NEAR_RTT_US: u32 = 50;
/// `SO_SNDBUF`/`SO_RCVBUF` for a near socket carrying bulk on splice(2) or copy. The kernel
/// doubles it for its bookkeeping: 512 KiB, which carries 80 Gbit/s at [`NEAR_RTT_US`].
pub const FIT: i32 = 256 << 10;
/// `SO_SNDBUF` of a socket in the sockhash, and `SO_RCVBUF` of a near one (capped at the
/// system maximums, `net.core.wmem_max` and `rmem_max`).
pub const KERNEL: i32 = 4 << 20;
/// Smallest sockhash buffer worth setting: a fixed 1 MiB one measured slower than autotuning.
pub const KERNEL_MIN: i32 = 2 << 20;

/// Buffer sizes allowed by this system's limits, read once at start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Buffers {
    /// `SO_SNDBUF` for sockhash sockets: set when it is at least what autotuning could reach.
    kernel_snd: Option<i32>,
    /// `SO_RCVBUF` for near sockhash sockets.
    kernel_rcv: Option<i32>,
}

impl Buffers {
    /// From the system's limits: `net.core.wmem_max`, `net.core.rmem_max` and the maximum of
    /// `net.ipv4.tcp_wmem`. A limit that cannot be read disables what depends on it.
    pub fn from_system() -> Self {
        let read = |p: &str| fs::read_to_string(Path::new("/proc/sys/net").join(p)).ok();
        let last = |s: Option<String>| s?.split_whitespace().last()?.parse::<i64>().ok();
        Self::new(
            last(read("core/wmem_max")),
            last(read("core/rmem_max")),
            last(read("ipv4/tcp_wmem")),
        )
    }

    fn new(wmem_max: Option<i64>, rmem_max: Option<i64>, tcp_wmem_max: Option<i64>) -> Self {
        let cap = |max: Option<i64>| {
            let v = i32::try_from(max?.min(i64::from(KERNEL))).ok()?;
            (v >= KERNEL_MIN).then_some(v)
        };
        Self {
            // The kernel doubles it; below autotuning's own ceiling it would only cap a far path.
            kernel_snd: cap(wmem_max)
                .filter(|v| 2 * i64::from(*v) >= tcp_wmem_max.unwrap_or(i64::MAX)),
            kernel_rcv: cap(rmem_max),
        }
    }

    /// A direction on splice(2) or copy started moving bulk from `from` to `to`: fits the
    /// buffers of the near ones. `promotable`: the session may move into the sockhash later,
    /// which must be able to undo the fit. Returns how many sockets were fitted.
    pub fn fit(&self, from: BorrowedFd<'_>, to: BorrowedFd<'_>, promotable: bool) -> u64 {
        if promotable && (self.kernel_snd.is_none() || self.kernel_rcv.is_none()) {
            return 0;
        }
        let mut n = 0;
        for (fd, opt) in [(from, libc::SO_RCVBUF), (to, libc::SO_SNDBUF)] {
            if sys::tcp_info(fd).is_ok_and(|i| near(&i))
                && sys::setsockopt_int(fd, libc::SOL_SOCKET, opt, FIT).is_ok()
            {
                n += 1;
            }
        }
        n
    }

    /// A socket is about to enter the sockhash (`info`: its `TCP_INFO` now).
    pub fn for_kernel(&self, fd: BorrowedFd<'_>, info: &TcpInfo) {
        // Best effort: a refused size leaves the socket as it was, which still works.
        if let Some(v) = self.kernel_snd {
            let _ = sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, v);
        }
        if let Some(v) = self.kernel_rcv.filter(|_| near(info)) {
            let _ = sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, v);
        }
    }

    /// The `SO_RCVBUF` that [`Buffers::for_kernel`] gives a sockhash socket with this
    /// `TCP_INFO`, if it fixes one: the size the brake gives back to a source whose window it
    /// kept shut (see `relay::sockmap`). None: the socket autotunes, and is left to.
    pub fn kernel_rcv(&self, info: &TcpInfo) -> Option<i32> {
        self.kernel_rcv.filter(|_| near(info))
    }
}

/// Whether the socket's lowest round trip so far shows a near peer (0 or `u32::MAX`: no sample).
fn near(info: &TcpInfo) -> bool {
    (1..=NEAR_RTT_US).contains(&info.min_rtt_us)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream},
        os::fd::AsFd as _,
    };

    use super::*;

    fn sockopt(fd: BorrowedFd<'_>, opt: libc::c_int) -> i32 {
        sys::getsockopt_int(fd, libc::SOL_SOCKET, opt).unwrap()
    }

    #[test]
    fn limits_decide_what_is_set() {
        let mib = |n: i64| Some(n << 20);
        // This machine's kind: 4 MiB maximums, autotuning up to 4 MiB of send buffer.
        let b = Buffers::new(mib(4), mib(4), mib(4));
        assert_eq!((b.kernel_snd, b.kernel_rcv), (Some(4 << 20), Some(4 << 20)));
        // Larger system maximums are capped at KERNEL.
        let b = Buffers::new(mib(64), mib(64), mib(8));
        assert_eq!((b.kernel_snd, b.kernel_rcv), (Some(4 << 20), Some(4 << 20)));
        // Autotuning may grow a send buffer past twice KERNEL: leave it alone.
        assert_eq!(Buffers::new(mib(64), mib(64), mib(16)).kernel_snd, None);
        // The historical 208 KiB maximums: nothing for the sockhash, so no fit that it would
        // have to undo.
        let b = Buffers::new(Some(212_992), Some(212_992), mib(4));
        assert_eq!(b, Buffers::default());
        assert_eq!(Buffers::new(None, None, None), Buffers::default());
    }

    #[test]
    fn only_a_measured_short_round_trip_is_near() {
        let with = |min_rtt_us| {
            let mut i = TcpInfo::default();
            i.min_rtt_us = min_rtt_us;
            near(&i)
        };
        assert!(with(1) && with(NEAR_RTT_US));
        // A LAN hop, a WAN path, no sample yet (the kernel's ~0), a kernel without the field.
        assert!(!with(NEAR_RTT_US + 1) && !with(20_000) && !with(u32::MAX) && !with(0));
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        // One exchange each way, so that both ends have a round-trip sample.
        c.write_all(b"x").unwrap();
        s.read_exact(&mut [0]).unwrap();
        s.write_all(b"y").unwrap();
        c.read_exact(&mut [0]).unwrap();
        (c, s)
    }

    #[test]
    fn loopback_sockets_are_near_and_get_fitted() {
        let (a, b) = pair();
        let info = sys::tcp_info(a.as_fd()).unwrap();
        assert!(near(&info), "loopback min_rtt {} µs", info.min_rtt_us);
        let limits = Buffers::new(Some(4 << 20), Some(4 << 20), Some(4 << 20));
        assert_eq!(limits.fit(a.as_fd(), b.as_fd(), true), 2);
        // The kernel stores twice the value (capped at the system maximum first).
        assert!(sockopt(a.as_fd(), libc::SO_RCVBUF) <= 2 * FIT);
        assert!(sockopt(b.as_fd(), libc::SO_SNDBUF) <= 2 * FIT);
        // A session that may be promoted is not fitted where the sockhash could not undo it.
        let (c, d) = pair();
        let before = sockopt(d.as_fd(), libc::SO_SNDBUF);
        assert_eq!(Buffers::default().fit(c.as_fd(), d.as_fd(), true), 0);
        assert_eq!(sockopt(d.as_fd(), libc::SO_SNDBUF), before);
        // One that cannot be promoted is.
        assert_eq!(Buffers::default().fit(c.as_fd(), d.as_fd(), false), 2);
    }

    #[test]
    fn the_sockhash_gets_its_sizes_back() {
        let (a, b) = pair();
        let limits = Buffers::new(Some(4 << 20), Some(4 << 20), Some(4 << 20));
        limits.fit(a.as_fd(), b.as_fd(), true);
        for fd in [a.as_fd(), b.as_fd()] {
            limits.for_kernel(fd, &sys::tcp_info(fd).unwrap());
            let cap = |max: &str| {
                let v: i32 = fs::read_to_string(max).unwrap().trim().parse().unwrap();
                2 * v.min(KERNEL)
            };
            assert_eq!(
                sockopt(fd, libc::SO_SNDBUF),
                cap("/proc/sys/net/core/wmem_max")
            );
            assert_eq!(
                sockopt(fd, libc::SO_RCVBUF),
                cap("/proc/sys/net/core/rmem_max")
            );
        }
    }
}
