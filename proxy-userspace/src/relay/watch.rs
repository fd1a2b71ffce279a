//! Event-driven end-of-stream detection for spliced sockets, at no cost per data chunk.
//!
//! A socket in the sockhash still signals `sk_data_ready` (an `EPOLLIN`-keyed wake-up) whenever
//! the verdict program has forwarded a chunk. Registered with tokio's reactor it would wake the
//! daemon for every chunk it never reads. Instead, spliced sockets go into one private epoll set
//! that asks only for `EPOLLRDHUP` (plus the implicit `EPOLLERR`/`EPOLLHUP`): the kernel's
//! `ep_poll_callback` drops wake-ups whose key has none of the requested bits, so data arrival
//! costs nothing and a FIN or RST wakes exactly the session concerned. The epoll descriptor itself
//! sits in tokio's reactor.
//!
//! A socket starts out watched for a parked session (one with no task while nothing happens to
//! it, see [`super::park`]): its epoll data is the session id, tagged with [`PARKED`] (and
//! [`UPSTREAM`] for the session's upstream socket), so that the set keeps no per-socket entry,
//! and an event gives the session a task. From then on ([`Watch::activate`]) events on that
//! epoll data wake the task's [`Notify`]: the registration itself never changes, so handing a
//! socket to a task costs no `epoll_ctl`.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex, OnceLock},
};

use tokio::{io::unix::AsyncFd, sync::Notify};

use super::park::Parking;

/// Tag of an epoll token that carries a session id.
const PARKED: u64 = 1 << 63;
/// Tag of the token of a session's upstream socket (the client's has none).
const UPSTREAM: u64 = 1 << 62;
/// What a spliced socket is watched for: its peer's FIN or a reset (errors and hang-ups are
/// always reported), edge-triggered.
const END_OF_STREAM: u32 = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// The shared epoll set and the sessions waiting on it.
#[derive(Debug)]
pub struct Watcher {
    epoll: AsyncFd<OwnedFd>,
    /// Tasks waiting, by token; a token without a waiter wakes its parked session.
    waiters: Mutex<HashMap<u64, Arc<Notify>>>,
    /// Where parked sessions wait (set by the first parked registration).
    parking: OnceLock<Arc<Parking>>,
}

/// What wakes a parked session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeOn {
    /// A FIN, a reset or an error: a session the kernel carries.
    EndOfStream,
    /// Its first input as well (payload): a session with no payload yet ([`super::quiet`]).
    Input,
}

/// A socket's registration; deregisters on drop.
#[derive(Debug)]
pub struct Watch {
    watcher: Arc<Watcher>,
    token: u64,
    fd: RawFd,
    /// Set while a task waits on the socket; None while its session is parked.
    notify: Option<Arc<Notify>>,
}

/// What the socket's state says now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// The peer's FIN (or a reset) was received: nothing more will arrive.
    pub read_closed: bool,
    /// An error (reset, timeout) is pending on the socket.
    pub error: bool,
}

/// Polls the socket's current state without blocking and without reading.
pub fn state(fd: BorrowedFd<'_>) -> io::Result<SockState> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&raw mut p, 1, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SockState {
        read_closed: p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0,
        error: p.revents & libc::POLLERR != 0,
    })
}

/// True when the socket has input waiting (payload, end of stream) or an error, or cannot be
/// polled: what wakes a session parked before its first payload.
pub fn has_input(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&raw mut p, 1, 0) };
    r != 0
}

impl Watcher {
    /// Creates the epoll set and starts the task that dispatches its events.
    pub fn start() -> io::Result<Arc<Self>> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own; the OwnedFd moves into the AsyncFd and
        // stays open, with the same descriptor, for the AsyncFd's whole life.
        let epoll = unsafe {
            AsyncFd::register_with_interest(OwnedFd::from_raw_fd(fd), tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        let w = Arc::new(Self {
            epoll,
            waiters: Mutex::new(HashMap::new()),
            parking: OnceLock::new(),
        });
        let weak = Arc::downgrade(&w);
        tokio::spawn(async move {
            loop {
                let Some(w) = weak.upgrade() else { return };
                if let Err(e) = w.dispatch().await {
                    tracing::error!(cause = %e, "splice watcher failed");
                    return;
                }
            }
        });
        Ok(w)
    }

    async fn dispatch(&self) -> io::Result<()> {
        const BATCH: usize = 256;
        let mut guard = self.epoll.readable().await?;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        loop {
            // SAFETY: `events` has room for BATCH entries; zero timeout.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.get_ref().as_raw_fd(),
                    events.as_mut_ptr(),
                    BATCH as i32,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
            {
                let waiters = self.waiters.lock().expect("watcher lock");
                for ev in &events[..n] {
                    let token = ev.u64;
                    if let Some(notify) = waiters.get(&token) {
                        notify.notify_one();
                    } else if let Some(p) = self.parking.get() {
                        p.wake(token & !(PARKED | UPSTREAM));
                    }
                }
            }
            if n < BATCH {
                guard.clear_ready();
                return Ok(());
            }
        }
    }

    /// Starts watching a session's two sockets on behalf of parked session `id`: their events
    /// wake the session in `parking`. For [`WakeOn::EndOfStream`], until [`Watch::activate`]
    /// hands them to a task; [`WakeOn::Input`] watches are dropped once they woke the session.
    pub fn watch_parked(
        self: &Arc<Self>,
        (client, upstream): (BorrowedFd<'_>, BorrowedFd<'_>),
        parking: &Arc<Parking>,
        id: u64,
        on: WakeOn,
    ) -> io::Result<(Watch, Watch)> {
        let events = match on {
            WakeOn::EndOfStream => END_OF_STREAM,
            WakeOn::Input => END_OF_STREAM | libc::EPOLLIN as u32,
        };
        debug_assert_eq!(
            id & (PARKED | UPSTREAM),
            0,
            "session id {id} takes a tag bit"
        );
        let c = self.register_parked(client, parking, PARKED | id, events)?;
        Ok((
            c,
            self.register_parked(upstream, parking, PARKED | UPSTREAM | id, events)?,
        ))
    }

    fn register_parked(
        self: &Arc<Self>,
        fd: BorrowedFd<'_>,
        parking: &Arc<Parking>,
        token: u64,
        events: u32,
    ) -> io::Result<Watch> {
        self.parking.get_or_init(|| parking.clone());
        self.ctl(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), token, events)?;
        Ok(Watch {
            watcher: self.clone(),
            token,
            fd: fd.as_raw_fd(),
            notify: None,
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: valid epoll and socket descriptors, `ev` readable.
        let r = unsafe { libc::epoll_ctl(self.epoll.get_ref().as_raw_fd(), op, fd, &raw mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Watch {
    /// Hands the socket's events to a task from now on (its session was parked). Leaves one
    /// notification pending: an event that went to the parked session in the meantime must not
    /// be lost, so the task re-checks the socket first.
    pub fn activate(&mut self) {
        if self.notify.is_none() {
            let notify = Arc::new(Notify::new());
            self.watcher
                .waiters
                .lock()
                .expect("watcher lock")
                .insert(self.token, notify.clone());
            self.notify = Some(notify);
        }
        if let Some(n) = &self.notify {
            n.notify_one();
        }
    }

    /// Waits until the socket may have changed state (FIN, reset, error). Spurious returns are
    /// possible; callers re-check [`state`]. Never returns before [`Self::activate`] on a
    /// watch made for a parked session.
    pub async fn changed(&self) {
        match &self.notify {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // The socket is still open here (the Watch is dropped before the stream).
        // SAFETY: valid descriptors; a failure (already closed) is harmless.
        unsafe {
            libc::epoll_ctl(
                self.watcher.epoll.get_ref().as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                self.fd,
                std::ptr::null_mut(),
            );
        }
        if self.notify.is_some() {
            self.watcher
                .waiters
                .lock()
                .expect("watcher lock")
                .remove(&self.token);
        }
    }
}
