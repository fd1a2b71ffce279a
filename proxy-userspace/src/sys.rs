//! Thin, safe wrappers over the few Linux socket and pipe calls the data paths need.
//!
//! Each function takes a borrowed descriptor and returns `io::Result`, so callers never handle
//! raw `-1`/errno themselves.

use std::{
    io, mem,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// The leading part of Linux's `struct tcp_info` (uapi/linux/tcp.h), up to `tcpi_min_rtt`
/// (Linux 4.9+). Layout must match the kernel's; do not reorder.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpInfo {
    /// `TCP_ESTABLISHED` = 1 ... see [`tcp_state_name`].
    pub state: u8,
    _u8s: [u8; 7],
    _rto_to_rcv_mss: [u32; 4],
    _unacked_to_fackets: [u32; 5],
    _last_times: [u32; 4],
    _pmtu_rcv_ssthresh: [u32; 2],
    /// Smoothed RTT in microseconds.
    pub rtt_us: u32,
    _rttvar_to_reordering: [u32; 5],
    _rcv_rtt_rcv_space_total_retrans: [u32; 3],
    _pacing: [u64; 2],
    /// Bytes acknowledged by the peer (RFC 4898 tcpEStatsAppHCThruOctetsAcked).
    pub bytes_acked: u64,
    /// Bytes received, counting a received FIN as one (RFC 4898 tcpEStatsAppHCThruOctetsReceived).
    pub bytes_received: u64,
    _segs_notsent: [u32; 3],
    /// Lowest round trip seen, in microseconds; `u32::MAX` before the first sample.
    pub min_rtt_us: u32,
}

/// Reads `TCP_INFO`. Fields past what the kernel fills stay zero.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    let mut info = TcpInfo::default();
    let mut len = mem::size_of::<TcpInfo>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes; the kernel writes at most `len`.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    })?;
    Ok(info)
}

/// Linux TCP state names, indexed by `tcpi_state`.
pub fn tcp_state_name(state: u8) -> &'static str {
    const NAMES: [&str; 13] = [
        "UNKNOWN",
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
        "NEW_SYN_RECV",
    ];
    NAMES.get(usize::from(state)).copied().unwrap_or("UNKNOWN")
}

/// Bytes in the socket's send queue not yet acknowledged by the peer (`SIOCOUTQ`).
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (== SIOCOUTQ) writes one int.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut n) })?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Reads and clears the pending socket error (`SO_ERROR`).
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<Option<io::Error>> {
    let v: libc::c_int = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ERROR)?;
    Ok((v != 0).then(|| io::Error::from_raw_os_error(v)))
}

/// Reads an integer socket option.
pub fn getsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` is a writable int of `len` bytes.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&raw mut v).cast(),
            &raw mut len,
        )
    })?;
    Ok(v)
}

/// Sets an integer socket option.
pub fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a readable int of the stated size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `SO_MEMINFO`: the socket's receive memory in use (`SK_MEMINFO_RMEM_ALLOC`, what queued
/// bytes take with their bookkeeping) and its receive buffer as the kernel keeps it
/// (`SK_MEMINFO_RCVBUF`, twice what `SO_RCVBUF` was given), in bytes.
pub fn rcv_meminfo(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SK_MEMINFO_VARS (linux/sock_diag.h): the kernel fills this many u32s.
    let mut mem = [0u32; libc::SK_MEMINFO_DROPS as usize + 1];
    let mut len = mem::size_of_val(&mem) as libc::socklen_t;
    // SAFETY: `mem` is a writable buffer of `len` bytes; the kernel writes at most `len`.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            mem.as_mut_ptr().cast(),
            &raw mut len,
        )
    })?;
    Ok((
        u64::from(mem[libc::SK_MEMINFO_RMEM_ALLOC as usize]),
        u64::from(mem[libc::SK_MEMINFO_RCVBUF as usize]),
    ))
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)`: copies queued bytes without consuming them.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    cvt_size(n)
}

/// `SO_RCVLOWAT`: on a socket in a sockhash, setting it makes the kernel run the verdict program
/// on bytes that were queued before the socket was inserted.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// `SO_LINGER` with a zero timeout: the next `close()` sends RST instead of FIN.
pub fn set_linger_zero(fd: BorrowedFd<'_>) -> io::Result<()> {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: passes a readable `linger` of the stated size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const lg).cast(),
            mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `shutdown(fd, SHUT_WR)`: sends FIN after the queued bytes.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed descriptor.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) }).map(drop)
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: false when another open file description holds a lock on the
/// same file. The lock lasts as long as the descriptor (and its duplicates) stays open.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: plain syscall on a borrowed descriptor.
    match cvt(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The socket cookie (`SO_COOKIE`, Linux 4.12+): the key the kernel programs see for a socket.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `v` is a writable u64 of `len` bytes.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut v).cast(),
            &raw mut len,
        )
    })?;
    Ok(v)
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on the hash map `map`: reads `key`'s value and removes the
/// entry in one call (Linux 5.14+ for hash maps). `Ok(None)`: no such key. Kernels without it
/// answer `EINVAL` or `ENOTSUPP`, which the caller takes as "do it in two calls".
///
/// `K` and `V` must be the map's key and value types exactly (plain data, the sizes the map
/// was created with): the kernel writes `size_of::<V>()` bytes into the value.
pub fn bpf_map_take<K: Copy, V: Copy>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    /// The members of `union bpf_attr` that the element commands use.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = mem::MaybeUninit::<V>::uninit();
    let attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: (&raw const *key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` of the stated size; the key is
    // readable and the value writable for the map's sizes, which the caller guarantees.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &raw const attr,
            mem::size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel filled the value on success.
    Ok(Some(unsafe { value.assume_init() }))
}

/// The size of a memory page.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// A non-blocking, close-on-exec pipe: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, both descriptors are fresh and owned by us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Resizes a pipe (`F_SETPIPE_SZ`); returns the size the kernel granted.
pub fn set_pipe_size(fd: BorrowedFd<'_>, size: usize) -> io::Result<usize> {
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: fcntl with an int argument.
    let got = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size) })?;
    Ok(usize::try_from(got).unwrap_or(0))
}

/// One non-blocking `splice(2)` of at most `len` bytes from `from` to `to`; one of them must be a
/// pipe. `Ok(0)` means end of file on `from`.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets (both descriptors are streams); the kernel moves page references.
    cvt_size(unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    })
}

/// `SO_BINDTODEVICE`: outgoing traffic of this socket leaves through `ifname`.
pub fn bind_to_device(fd: BorrowedFd<'_>, ifname: &str) -> io::Result<()> {
    // SAFETY: passes a readable byte string of the stated length.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            ifname.as_ptr().cast(),
            ifname.len() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The local address routing would use to reach `dst` (a connected UDP socket sends nothing).
pub fn route_source(dst: std::net::SocketAddr) -> io::Result<std::net::IpAddr> {
    let any: std::net::SocketAddr = if dst.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(any)?;
    let target = if dst.port() == 0 {
        std::net::SocketAddr::new(dst.ip(), 9)
    } else {
        dst
    };
    s.connect(target)?;
    Ok(s.local_addr()?.ip())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a writable rlimit.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a readable rlimit.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) })?;
    }
    Ok(lim.rlim_cur)
}

/// Hands the allocator's free pages back to the kernel. Loading the eBPF object (parsing the ELF
/// and its BTF) leaves about 2 MiB of freed heap that the allocator would otherwise keep for the
/// daemon's whole life; called once, when start-up is done.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        os::fd::AsFd,
    };

    use super::*;

    #[test]
    fn tcp_info_counts_bytes_and_fin() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(&[7u8; 1000]).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        assert_eq!(buf.len(), 1000);
        let info = tcp_info(s.as_fd()).unwrap();
        assert_eq!(tcp_state_name(info.state), "CLOSE_WAIT");
        // The FIN counts as one received byte.
        assert_eq!(info.bytes_received, 1001);
        // On the connecting side the SYN counts as an acknowledged byte and the FIN as a queued
        // one until acknowledged: acked + queued = SYN + data + FIN. The drain check in the
        // sockmap path therefore only compares differences against a baseline.
        let cinfo = tcp_info(c.as_fd()).unwrap();
        assert_eq!(cinfo.bytes_acked + outq(c.as_fd()).unwrap(), 1 + 1000 + 1);
        assert_ne!(
            socket_cookie(c.as_fd()).unwrap(),
            socket_cookie(s.as_fd()).unwrap()
        );
    }

    #[test]
    fn splice_moves_bytes_through_a_pipe() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let (r, w) = pipe().unwrap();
        assert!(set_pipe_size(w.as_fd(), 1 << 20).unwrap() >= 1 << 16);
        c.write_all(b"hello").unwrap();
        let mut moved = 0;
        for _ in 0..1000 {
            match splice(s.as_fd(), w.as_fd(), 4096) {
                Ok(n) => {
                    moved += n;
                    if moved == 5 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(moved, 5);
        let mut out = [0u8; 8];
        let n = std::fs::File::from(r).read(&mut out).unwrap();
        assert_eq!(&out[..n], b"hello");
    }
}
