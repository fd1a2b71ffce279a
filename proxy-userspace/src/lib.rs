//! ebsocks: a SOCKS5 server whose TCP data plane lives in the kernel.
//!
//! The daemon negotiates SOCKS in userspace ([`session`]), then hands each established
//! client/upstream pair to a data path ([`relay`]): an eBPF sockhash with an sk_skb verdict
//! program ([`kernel`]) when the kernel supports it, splice(2), or a plain copy. Counters live in
//! BPF maps pinned under bpffs, where `ebsocks stats` ([`stats`]) reads them.

pub mod acl;
pub mod auth;
pub mod cli;
pub mod config;
pub mod kernel;
pub mod metrics;
pub mod relay;
pub mod session;
pub mod stats;
pub mod sys;
pub mod udp;

use std::{
    future::Future,
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
};

use proxy_common::metrics::Counter;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{mpsc, watch, Semaphore},
};

pub use crate::config::Config;
use crate::{config::DataPathMode, kernel::Kernel, metrics::Metrics, relay::{splice::PipePool, watch::Watcher}};

/// State shared by every session.
#[derive(Debug)]
pub struct Shared {
    /// The configuration in force.
    pub config: Config,
    /// Daemon counters.
    pub metrics: Metrics,
    /// Loaded eBPF programs and maps, if the kernel accepted them.
    pub kernel: Option<Kernel>,
    /// Whether the sockhash splice passed its start-up probe.
    pub sockmap_ok: bool,
    /// Pipes for the splice(2) path.
    pub pipes: PipePool,
    /// End-of-stream watcher for spliced sockets.
    pub watcher: Arc<Watcher>,
}

impl Shared {
    /// The sockhash splice, when loaded and working.
    pub fn sockmap(&self) -> Option<&kernel::Sockmap> {
        self.kernel.as_ref().filter(|_| self.sockmap_ok).map(Kernel::sockmap)
    }
}

/// Options of `ebsocks run` that are not configuration.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Write the bound listener addresses here once ready.
    pub addr_file: Option<PathBuf>,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another start-up step failed.
    #[error("{context}: {source}")]
    Io {
        /// The step.
        context: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// Loads the kernel side as far as this kernel allows and reports what the daemon will use.
fn load_kernel(config: &Config) -> (Option<Kernel>, bool) {
    let kernel = match Kernel::load(&config.pin_dir) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::warn!(cause = %e, "eBPF programs not loaded: TCP sessions use splice(2), and `ebsocks stats` is unavailable");
            None
        }
    };
    let wants = matches!(config.data_path, DataPathMode::Auto | DataPathMode::Sockmap);
    let sockmap_ok = match (&kernel, wants) {
        (Some(k), true) => match k.probe() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(cause = %e, "in-kernel splice unavailable on this kernel; using splice(2)");
                false
            }
        },
        _ => false,
    };
    (kernel, sockmap_ok)
}

/// Runs the daemon until `shutdown` resolves, then stops accepting and gives relaying sessions
/// `timeouts.drain` to finish.
pub async fn run(config: Config, opts: RunOptions, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let nofile = sys::raise_nofile_limit().unwrap_or(1024);
    let (kernel, sockmap_ok) = load_kernel(&config);

    let mut listeners = Vec::new();
    for &addr in &config.listen {
        listeners.push(bind(addr).map_err(|source| Error::Bind { addr, source })?);
    }
    let watcher = Watcher::start().map_err(|source| Error::Io { context: "creating the epoll set", source })?;
    let data_path = match (config.data_path, sockmap_ok) {
        (DataPathMode::Auto | DataPathMode::Sockmap, true) => "sockmap",
        (DataPathMode::Copy, _) => "copy",
        _ => "splice",
    };
    let metrics = kernel.as_ref().and_then(Kernel::take_metrics).unwrap_or_default();
    let shared = Arc::new(Shared { config, metrics, kernel, sockmap_ok, pipes: PipePool::default(), watcher });

    let bound: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    for a in &bound {
        tracing::info!(addr = %a, data_path, "listening on {a}");
    }
    if let Some(path) = &opts.addr_file {
        let text: String = bound.iter().map(|a| format!("{a}\n")).collect();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| Error::Io { context: "writing the address file", source })?;
    }

    // Two descriptors per session, and some headroom for listeners, pipes and maps.
    let max_sessions = usize::try_from(nofile.saturating_sub(64) / 4).unwrap_or(1024).max(16);
    let permits = Arc::new(Semaphore::new(max_sessions));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every session holds a clone; when all are dropped, `done_rx.recv()` returns None.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);

    let mut accept_tasks = Vec::new();
    for listener in listeners {
        accept_tasks.push(tokio::spawn(accept_loop(listener, shared.clone(), permits.clone(), stop_rx.clone(), done_tx.clone())));
    }
    drop(done_tx);

    shutdown.await;
    tracing::info!("shutting down: no new sessions");
    let _ = stop_tx.send(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    let drain = shared.config.timeouts.drain;
    if tokio::time::timeout(drain, done_rx.recv()).await.is_err() {
        tracing::warn!(after = ?drain, "sessions still open at the end of the drain period; closing them");
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: existing sessions go on; retry after a pause rather
                // than spinning on a listener that stays readable.
                tracing::warn!(cause = %e, "accept failed");
                tokio::time::sleep(session::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        shared.metrics.inc(Counter::ConnectionsAccepted);
        if !shared.config.allow_clients.iter().any(|n| n.contains(&peer.ip().to_canonical())) {
            shared.metrics.inc(Counter::ConnectionsRefused);
            tracing::info!(client = %peer, "client address not allowed");
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.metrics.inc(Counter::ConnectionsRefused);
            tracing::warn!(client = %peer, "session limit reached");
            continue;
        };
        let shared = shared.clone();
        let done = done.clone();
        tokio::spawn(async move {
            session::handle(&shared, stream, peer).await;
            drop(permit);
            drop(done);
        });
    }
}
