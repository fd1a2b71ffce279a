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
//! An event wakes a [`Waiter`]: a task's [`Notify`], or a parked session (one with no task while
//! nothing happens to it, see [`super::park`]), which then gets a task.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use tokio::{io::unix::AsyncFd, sync::Notify};

use super::park::Parking;

/// What an event (end of stream, error, brake checkpoint) wakes.
#[derive(Clone, Debug)]
pub enum Waiter {
    /// A task waiting on the notification.
    Task(Arc<Notify>),
    /// A parked session, by session id: waking it gives it a task.
    Parked(Arc<Parking>, u64),
}

impl Waiter {
    /// Delivers one event.
    pub fn wake(&self) {
        match self {
            Self::Task(n) => n.notify_one(),
            Self::Parked(parking, id) => parking.wake(*id),
        }
    }
}

/// The shared epoll set and the sessions waiting on it.
#[derive(Debug)]
pub struct Watcher {
    epoll: AsyncFd<OwnedFd>,
    waiters: Mutex<HashMap<u64, Waiter>>,
    next: AtomicU64,
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
            next: AtomicU64::new(1),
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
                    if let Some(waiter) = waiters.get(&{ ev.u64 }) {
                        waiter.wake();
                    }
                }
            }
            if n < BATCH {
                guard.clear_ready();
                return Ok(());
            }
        }
    }

    /// Starts watching `fd` for end of stream and errors, for a task.
    pub fn watch(self: &Arc<Self>, fd: BorrowedFd<'_>) -> io::Result<Watch> {
        self.watch_for(fd, Waiter::Task(Arc::new(Notify::new())))
    }

    /// Starts watching `fd` for end of stream and errors; events wake `waiter`.
    pub fn watch_for(self: &Arc<Self>, fd: BorrowedFd<'_>, waiter: Waiter) -> io::Result<Watch> {
        let token = self.next.fetch_add(1, Relaxed);
        let notify = match &waiter {
            Waiter::Task(n) => Some(n.clone()),
            Waiter::Parked(..) => None,
        };
        self.waiters
            .lock()
            .expect("watcher lock")
            .insert(token, waiter);
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: valid epoll and socket descriptors, `ev` readable.
        let r = unsafe {
            libc::epoll_ctl(
                self.epoll.get_ref().as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &raw mut ev,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            self.waiters.lock().expect("watcher lock").remove(&token);
            return Err(e);
        }
        Ok(Watch {
            watcher: self.clone(),
            token,
            fd: fd.as_raw_fd(),
            notify,
        })
    }
}

impl Watch {
    /// Hands the socket's events to a task from now on (its session was parked). Leaves one
    /// notification pending: an event that went to the parked session in the meantime must not
    /// be lost, so the task re-checks the socket first.
    pub fn activate(&mut self) {
        let notify = self.notify.get_or_insert_with(|| {
            let notify = Arc::new(Notify::new());
            self.watcher
                .waiters
                .lock()
                .expect("watcher lock")
                .insert(self.token, Waiter::Task(notify.clone()));
            notify
        });
        notify.notify_one();
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
        self.watcher
            .waiters
            .lock()
            .expect("watcher lock")
            .remove(&self.token);
    }
}
