//! The relay socket and its batched I/O: one recvmmsg(2) takes up to [`BATCH`] datagrams and one
//! sendmmsg(2) sends up to [`BATCH`], so a busy association costs two syscalls per batch rather
//! than two per datagram.
//!
//! The kernel's `mmsghdr`/`iovec` arrays hold raw pointers into the buffers, so they are built on
//! the stack for each call and never kept. What the association keeps across `.await` points is
//! plain data, and its future stays `Send`.

use std::{
    io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    ops::Range,
    os::fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    ptr,
};

use proxy_common::metrics::Direction;
use proxy_socks5::UdpHeader;
use tokio::net::UdpSocket;

/// Datagrams per recvmmsg/sendmmsg call.
pub const BATCH: usize = 32;

/// Receive buffer per datagram: the largest UDP payload (65,507 bytes over IPv4, 65,527 over
/// IPv6 without jumbograms) fits.
pub const SLOT: usize = 64 * 1024;

/// The longest SOCKS UDP header the relay writes towards the client: RSV, FRAG, ATYP, an IPv6
/// address and the port. Replies always carry an IP address, never a name.
pub const MAX_REPLY_HEADER: usize = 2 + 1 + 1 + 16 + 2;

/// Socket buffer size asked for on the relay socket; the kernel caps it at
/// `net.core.{r,w}mem_max`. A burst of client datagrams waits here while the relay sends the
/// previous batch.
const SOCKET_BUF: libc::c_int = 4 * 1024 * 1024;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain integers; all-zero is a valid (AF_UNSPEC) value.
    unsafe { mem::zeroed() }
}

fn set_int_opt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a readable c_int and the length says so.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Opens the association's relay socket for a control connection whose local address is
/// `local` (already canonical: IPv4-mapped addresses given as IPv4).
///
/// IPv4: bound to `local:0`, and it can only reach IPv4 targets. IPv6: bound to `[::]:0` with
/// `IPV6_V6ONLY` off, so the one socket reaches IPv4 targets too (as IPv4-mapped addresses);
/// a socket bound to a specific IPv6 address could not. Returns the socket and whether it is
/// an IPv6 socket.
pub fn bind_relay(local: IpAddr) -> io::Result<(UdpSocket, bool)> {
    let v6 = local.is_ipv6();
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2) call; the result is checked.
    let raw = cvt(unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: `raw` is a fresh descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if v6 {
        set_int_opt(fd.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    }
    // Best effort: a smaller buffer only means more drops under a burst.
    let _ = set_int_opt(fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_BUF);
    let _ = set_int_opt(fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, SOCKET_BUF);
    let bind_to = if v6 {
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0)
    } else {
        SocketAddr::new(local, 0)
    };
    let mut storage = zeroed_storage();
    let len = write_sockaddr(bind_to, v6, &mut storage);
    // SAFETY: `storage` holds a sockaddr of `len` bytes.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), (&raw const storage).cast(), len) })?;
    Ok((UdpSocket::from_std(std::net::UdpSocket::from(fd))?, v6))
}

/// Writes `addr` into `out` in the form a socket of the relay's family takes: an IPv4 address
/// becomes IPv4-mapped on an IPv6 socket. Returns the length to pass to the kernel.
pub fn write_sockaddr(
    addr: SocketAddr,
    v6_socket: bool,
    out: &mut libc::sockaddr_storage,
) -> libc::socklen_t {
    let v6 = match (addr, v6_socket) {
        (SocketAddr::V4(a), false) => {
            // SAFETY: plain integers; all-zero is valid.
            let mut sin: libc::sockaddr_in = unsafe { mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { ptr::write((&raw mut *out).cast::<libc::sockaddr_in>(), sin) };
            return mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        }
        (SocketAddr::V4(a), true) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
        (SocketAddr::V6(a), _) => a,
    };
    // SAFETY: plain integers; all-zero is valid.
    let mut sin6: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sin6.sin6_port = v6.port().to_be();
    sin6.sin6_flowinfo = v6.flowinfo();
    sin6.sin6_addr.s6_addr = v6.ip().octets();
    sin6.sin6_scope_id = v6.scope_id();
    // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
    unsafe { ptr::write((&raw mut *out).cast::<libc::sockaddr_in6>(), sin6) };
    mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
}

/// Reads an address the kernel wrote into `storage` (`len` bytes). IPv4-mapped IPv6 addresses,
/// which a dual-stack socket reports for IPv4 peers, come back as IPv4.
pub fn read_sockaddr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the kernel wrote a sockaddr_in; storage is aligned for it.
            let sin = unsafe { &*(&raw const *storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the kernel wrote a sockaddr_in6; storage is aligned for it.
            let sin6 = unsafe { &*(&raw const *storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    port,
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )),
            })
        }
        _ => None,
    }
}

/// Anonymous memory for the receive slots, mapped directly rather than taken from the
/// allocator: its pages become resident only when a datagram is written into them, whatever
/// the allocator's thresholds, so an association that never sees large datagrams holds a few
/// pages of its 2 MiB rather than all of it.
struct SlotMemory {
    ptr: ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: plain bytes owned by this value alone; `&self` only reads them.
unsafe impl Send for SlotMemory {}
// SAFETY: as above.
unsafe impl Sync for SlotMemory {}

impl SlotMemory {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = ptr::NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` mapped, initialised (zero-filled) bytes that live as long as `self`;
        // writes need `&mut self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for SlotMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; no borrow outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Receive side: [`BATCH`] slots of [`SLOT`] bytes, mapped once per association.
pub struct RecvBatch {
    bufs: SlotMemory,
    names: Vec<libc::sockaddr_storage>,
    name_lens: [libc::socklen_t; BATCH],
    lens: [usize; BATCH],
    truncated: [bool; BATCH],
}

impl RecvBatch {
    /// Empty slots. Fails only if the slots cannot be mapped.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            bufs: SlotMemory::new(BATCH * SLOT)?,
            names: vec![zeroed_storage(); BATCH],
            name_lens: [0; BATCH],
            lens: [0; BATCH],
            truncated: [false; BATCH],
        })
    }

    /// One recvmmsg(2) on the non-blocking `fd`: fills slots `0..n` and returns `n` (at least
    /// 1). `WouldBlock` when nothing is queued, so that tokio clears the readiness.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let base = self.bufs.as_mut_ptr();
        // SAFETY: all-zero is a valid iovec and mmsghdr (null pointers, zero lengths).
        let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        for (i, iov) in iovs.iter_mut().enumerate() {
            // SAFETY: slot `i` lies within the BATCH * SLOT bytes of `bufs`.
            iov.iov_base = unsafe { base.add(i * SLOT) }.cast();
            iov.iov_len = SLOT;
        }
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        let iov_base = iovs.as_mut_ptr();
        let name_base = self.names.as_mut_ptr();
        for (i, msg) in msgs.iter_mut().enumerate() {
            // SAFETY: `i < BATCH`, the length of both arrays.
            msg.msg_hdr.msg_iov = unsafe { iov_base.add(i) };
            msg.msg_hdr.msg_iovlen = 1;
            // SAFETY: as above.
            msg.msg_hdr.msg_name = unsafe { name_base.add(i) }.cast();
            msg.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        // SAFETY: every mmsghdr points at a live iovec over its own slot and at its own
        // sockaddr_storage; the kernel writes at most the lengths given. Nothing else touches
        // those buffers during the call.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
                ptr::null_mut(),
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        for (i, msg) in msgs.iter().enumerate().take(n.min(BATCH)) {
            self.lens[i] = (msg.msg_len as usize).min(SLOT);
            self.name_lens[i] = msg.msg_hdr.msg_namelen;
            self.truncated[i] = msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        Ok(n.min(BATCH))
    }

    /// Where datagram `i` came from, IPv4-mapped sources given as IPv4.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        read_sockaddr(&self.names[i], self.name_lens[i])
    }

    /// Whether datagram `i` was larger than its slot (cannot happen for UDP over IP, whose
    /// payload is at most 65,535 bytes; checked anyway).
    pub fn truncated(&self, i: usize) -> bool {
        self.truncated[i]
    }

    /// The bytes of datagram `i`.
    pub fn data(&self, i: usize) -> &[u8] {
        &self.bufs.as_slice()[i * SLOT..i * SLOT + self.lens[i]]
    }

    /// Datagram `i` from byte `from` to its end, as a range into [`RecvBatch::bufs`], for
    /// [`SendBatch::push`].
    pub fn range_from(&self, i: usize, from: usize) -> Range<usize> {
        let start = i * SLOT;
        let end = start + self.lens[i];
        (start + from).min(end)..end
    }

    /// All slots, which [`SendBatch`] payload ranges index into.
    pub fn bufs(&self) -> &[u8] {
        self.bufs.as_slice()
    }
}

/// Send side: up to [`BATCH`] datagrams, each an optional SOCKS header followed by a payload
/// that stays where [`RecvBatch`] received it (no copy).
pub struct SendBatch {
    dsts: Vec<libc::sockaddr_storage>,
    dst_lens: [libc::socklen_t; BATCH],
    headers: [[u8; MAX_REPLY_HEADER]; BATCH],
    header_lens: [usize; BATCH],
    payloads: [(usize, usize); BATCH],
    dirs: [Direction; BATCH],
    len: usize,
}

impl SendBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self {
            dsts: vec![zeroed_storage(); BATCH],
            dst_lens: [0; BATCH],
            headers: [[0; MAX_REPLY_HEADER]; BATCH],
            header_lens: [0; BATCH],
            payloads: [(0, 0); BATCH],
            dirs: [Direction::Up; BATCH],
            len: 0,
        }
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Drops every queued datagram.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Queues a datagram to `dst`: `header` (if any; it must carry an IP address) then the
    /// bytes at `payload` in the receive buffers. Returns false, queuing nothing, when the
    /// batch is full or the header does not fit; one received datagram never makes more than
    /// one to send, so neither happens.
    pub fn push(
        &mut self,
        dst: SocketAddr,
        v6_socket: bool,
        header: Option<&UdpHeader>,
        payload: Range<usize>,
        dir: Direction,
    ) -> bool {
        let i = self.len;
        if i >= BATCH {
            return false;
        }
        let header_len = match header {
            Some(h) if h.address.encoded_len() + 3 <= MAX_REPLY_HEADER => {
                let mut out: &mut [u8] = &mut self.headers[i];
                h.encode(&mut out);
                MAX_REPLY_HEADER - out.len()
            }
            Some(_) => return false,
            None => 0,
        };
        self.header_lens[i] = header_len;
        self.dst_lens[i] = write_sockaddr(dst, v6_socket, &mut self.dsts[i]);
        self.payloads[i] = (payload.start, payload.end);
        self.dirs[i] = dir;
        self.len += 1;
        true
    }

    /// Direction and payload length of queued datagram `i`, for the counters.
    pub fn meta(&self, i: usize) -> (Direction, usize) {
        let (start, end) = self.payloads[i];
        (self.dirs[i], end - start)
    }

    /// One sendmmsg(2) of datagrams `from..len` on the non-blocking `fd`, payloads taken from
    /// `bufs` (the [`RecvBatch`] they were received into). Returns how many the kernel took (at
    /// least 1). An error refers to datagram `from`; `WouldBlock` means the socket buffer is
    /// full.
    pub fn send(&self, from: usize, fd: BorrowedFd<'_>, bufs: &[u8]) -> io::Result<usize> {
        let count = self.len.saturating_sub(from);
        if count == 0 {
            return Ok(0);
        }
        // SAFETY: all-zero is a valid iovec and mmsghdr (null pointers, zero lengths).
        let mut iovs: [[libc::iovec; 2]; BATCH] = unsafe { mem::zeroed() };
        for (iov, i) in iovs.iter_mut().zip(from..self.len) {
            let (start, end) = self.payloads[i];
            let payload = bufs.get(start..end).unwrap_or_default();
            iov[0].iov_base = self.headers[i].as_ptr().cast_mut().cast();
            iov[0].iov_len = self.header_lens[i];
            iov[1].iov_base = payload.as_ptr().cast_mut().cast();
            iov[1].iov_len = payload.len();
        }
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for ((msg, iov), i) in msgs.iter_mut().zip(iovs.iter_mut()).zip(from..self.len) {
            msg.msg_hdr.msg_iov = iov.as_mut_ptr();
            msg.msg_hdr.msg_iovlen = 2;
            msg.msg_hdr.msg_name = (&raw const self.dsts[i]).cast_mut().cast();
            msg.msg_hdr.msg_namelen = self.dst_lens[i];
        }
        // SAFETY: each of the `count` mmsghdrs points at two live iovecs over bytes borrowed
        // for the call and at its destination address; sendmmsg only reads them.
        let n =
            unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), count as libc::c_uint, 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trips() {
        let cases: [(SocketAddr, bool, SocketAddr); 4] = [
            (
                "192.0.2.1:53".parse().unwrap(),
                false,
                "192.0.2.1:53".parse().unwrap(),
            ),
            (
                "192.0.2.1:53".parse().unwrap(),
                true,
                "192.0.2.1:53".parse().unwrap(),
            ),
            (
                "[2001:db8::1]:443".parse().unwrap(),
                true,
                "[2001:db8::1]:443".parse().unwrap(),
            ),
            (
                "[::ffff:10.0.0.1]:9".parse().unwrap(),
                true,
                "10.0.0.1:9".parse().unwrap(),
            ),
        ];
        for (addr, v6, expect) in cases {
            let mut s = zeroed_storage();
            let len = write_sockaddr(addr, v6, &mut s);
            assert_eq!(
                libc::c_int::from(s.ss_family),
                if v6 { libc::AF_INET6 } else { libc::AF_INET }
            );
            assert_eq!(read_sockaddr(&s, len), Some(expect), "{addr} on v6={v6}");
        }
        assert_eq!(read_sockaddr(&zeroed_storage(), 128), None);
    }

    #[test]
    fn reply_header_fits() {
        let mut b = SendBatch::new();
        let h = UdpHeader {
            frag: 0,
            address: proxy_socks5::Address::Ip("[2001:db8::1]:65535".parse().unwrap()),
        };
        assert!(b.push(
            "127.0.0.1:1".parse().unwrap(),
            false,
            Some(&h),
            0..0,
            Direction::Down
        ));
        assert_eq!(b.header_lens[0], MAX_REPLY_HEADER);
        let (decoded, used) = UdpHeader::decode(&b.headers[0]).unwrap();
        assert_eq!((decoded, used), (h, MAX_REPLY_HEADER));
        let long = UdpHeader {
            frag: 0,
            address: proxy_socks5::Address::Domain(
                "a-name-longer-than-an-ipv6-address.example".into(),
                1,
            ),
        };
        assert!(!b.push(
            "127.0.0.1:1".parse().unwrap(),
            false,
            Some(&long),
            0..0,
            Direction::Down
        ));
        for _ in 1..BATCH {
            assert!(b.push(
                "127.0.0.1:1".parse().unwrap(),
                false,
                None,
                0..0,
                Direction::Up
            ));
        }
        assert!(!b.push(
            "127.0.0.1:1".parse().unwrap(),
            false,
            None,
            0..0,
            Direction::Up
        ));
    }
}
