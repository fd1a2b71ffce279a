//! Target servers the daemon connects to, all on loopback port 0.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::pattern::{exchange, Plan};

/// Bound for a target to see the daemon's connection.
pub const ACCEPT_LIMIT: Duration = Duration::from_secs(10);

/// A spawned task that is aborted when dropped, so a failed test leaves no
/// server behind, and that is joined with a bound.
pub struct Task<T> {
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Task<T> {
    pub fn spawn(fut: impl std::future::Future<Output = T> + Send + 'static) -> Self {
        Self {
            handle: Some(tokio::spawn(fut)),
        }
    }

    /// Waits at most `limit` for the task; its panic becomes ours.
    pub async fn join(mut self, limit: Duration, what: &str) -> T {
        let mut h = self.handle.take().expect("task joined twice");
        match tokio::time::timeout(limit, &mut h).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(e)) => panic!("{what}: {e}"),
            Err(_) => {
                h.abort();
                panic!("timed out after {limit:?}: {what}")
            }
        }
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.abort();
        }
    }
}

/// Binds a listener on `addr` (e.g. `127.0.0.1:0`, `[::1]:0`).
///
/// The backlog is the kernel's maximum (`net.core.somaxconn` caps it), not tokio's 1024: tests
/// that open hundreds of sessions at once must not overflow the target's accept queue, which
/// ends in a SYN retransmit, a failed syncookie and a reset that is not the daemon's.
pub async fn listen(addr: &str) -> TcpListener {
    let parsed: std::net::SocketAddr = match tokio::net::lookup_host(addr).await {
        Ok(mut a) => a
            .next()
            .unwrap_or_else(|| panic!("bind {addr}: no address")),
        Err(e) => panic!("bind {addr}: {e}"),
    };
    let socket = if parsed.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .unwrap_or_else(|e| panic!("socket for {addr}: {e}"));
    socket
        .set_reuseaddr(true)
        .and_then(|()| socket.bind(parsed))
        .and_then(|()| socket.listen(4096))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

/// Accepts one connection within [`ACCEPT_LIMIT`].
pub async fn accept_one(l: &TcpListener) -> TcpStream {
    let (s, _) = crate::within(
        ACCEPT_LIMIT,
        "target waiting for the daemon to connect",
        l.accept(),
    )
    .await
    .unwrap_or_else(|e| panic!("accept: {e}"));
    s.set_nodelay(true).expect("TCP_NODELAY");
    s
}

/// Echo server: every connection gets back what it sends; after EOF the
/// server shuts its write side down.
pub struct Echo {
    pub addr: SocketAddr,
    _task: Task<()>,
}

impl Echo {
    pub async fn start(bind: &str) -> Self {
        Self::serve(listen(bind).await)
    }

    pub fn serve(l: TcpListener) -> Self {
        Self::serve_noting_peers(l, None)
    }

    /// [`Echo::serve`] that also appends the address of every connection it accepts to
    /// `peers`, when given.
    pub fn serve_noting_peers(
        l: TcpListener,
        peers: Option<std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>>,
    ) -> Self {
        let addr = l.local_addr().expect("local_addr");
        let task = Task::spawn(async move {
            loop {
                let Ok((mut s, peer)) = l.accept().await else {
                    // EMFILE and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if let Some(p) = &peers {
                    p.lock().expect("peers lock").push(peer);
                }
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                });
            }
        });
        Self { addr, _task: task }
    }
}

/// Accepts one connection on `l` and runs `plan` on it: with
/// [`Plan::sink`] it is a sink that checks what it receives, with
/// [`Plan::source`] a source that sends then half-closes.
pub fn spawn_peer(l: TcpListener, plan: Plan) -> Task<Result<u64, String>> {
    Task::spawn(async move {
        let mut s = accept_one(&l).await;
        exchange(&mut s, plan).await
    })
}
