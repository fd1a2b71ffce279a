//! ebsocks: a SOCKS5 server whose TCP data plane lives in the kernel.
//!
//! The daemon negotiates SOCKS in userspace ([`session`]), then hands each established
//! client/upstream pair to a data path ([`relay`]): an eBPF sockhash with an sk_skb verdict
//! program ([`kernel`]) when the kernel supports it, splice(2), or a plain copy. Counters live in
//! BPF maps pinned under bpffs, where `ebsocks stats` ([`stats`]) reads them; live sessions are
//! in a [`registry`] that `ebsocks sessions` reads through the [`control`] socket, and
//! [`exporter`] serves everything to Prometheus when configured.

pub mod acl;
pub mod auth;
pub mod btf;
pub mod cli;
pub mod config;
pub mod control;
pub mod exporter;
pub mod kernel;
pub mod metrics;
pub mod privileges;
pub mod registry;
pub mod relay;
pub mod resolve;
pub mod session;
pub mod stats;
pub mod sys;
pub mod udp;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::Instant,
};

use proxy_common::metrics::Counter;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{mpsc, watch, Semaphore},
};

pub use crate::config::Config;
use crate::{
    acl::Action,
    auth::FailureTracker,
    config::DataPathMode,
    kernel::Kernel,
    metrics::{Failure, Metrics},
    registry::Registry,
    relay::{buffers::Buffers, park::Parking, splice::PipePool, watch::Watcher},
};

/// State shared by every session.
#[derive(Debug)]
pub struct Shared {
    /// The configuration in force; replaced on SIGHUP. Sessions keep the snapshot they started
    /// with.
    config: RwLock<Arc<Config>>,
    /// Daemon counters.
    pub metrics: Metrics,
    /// Loaded eBPF programs and maps, if the kernel accepted them.
    pub kernel: Option<Kernel>,
    /// Whether the sockhash splice passed its start-up probe.
    pub sockmap_ok: bool,
    /// The XDP UDP fast path, when `udp.xdp_interfaces` is set and it attached.
    pub xdp: Option<udp::xdp::XdpPlane>,
    /// Pipes for the splice(2) path.
    pub pipes: PipePool,
    /// Socket buffer sizes per data path, within this system's limits.
    pub buffers: Buffers,
    /// End-of-stream watcher for spliced sockets.
    pub watcher: Arc<Watcher>,
    /// Sessions the kernel carries, while they wait without a task.
    pub parking: Arc<Parking>,
    /// Slows down repeated authentication failures per source address.
    pub auth_failures: FailureTracker,
    /// Name resolution, bounded daemon-wide.
    pub names: resolve::Names,
    /// Sessions per client address, for `limits.max_sessions_per_client`.
    per_client: Mutex<HashMap<IpAddr, usize>>,
    /// Live sessions.
    pub registry: Registry,
    /// When the daemon started.
    pub started: Instant,
    /// The data path chosen at start-up: `auto` (splice(2), promoting into the sockhash),
    /// `sockmap`, `splice` or `copy`.
    pub data_path: &'static str,
    /// The bound SOCKS listeners.
    pub listen: OnceLock<Vec<SocketAddr>>,
    /// The bound Prometheus endpoint.
    pub metrics_listen: OnceLock<SocketAddr>,
    /// Set once shutdown begins: the listeners stop accepting, and sessions still negotiating
    /// end at once (relaying ones get `timeouts.drain`).
    pub stopping: watch::Sender<bool>,
}

/// What an open session holds until it ends: its place under the session limit and the
/// per-client limit, and in the count the shutdown drain waits on.
#[derive(Debug)]
pub struct Guards {
    _slot: ClientSlot,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _done: mpsc::Sender<()>,
}

/// Holds a client's slot in the per-client count.
#[derive(Debug)]
struct ClientSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self.shared.per_client.lock().expect("per-client lock");
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Shared {
    /// The configuration for a new session.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().expect("config lock").clone()
    }

    /// Applies a reloaded configuration to new sessions. What the daemon set up at start-up
    /// (listeners, `data_path`, the pins, the control socket, the user, the metrics endpoint,
    /// the session limit, the XDP attachment) keeps its start-up value; changes to it are
    /// named in a warning.
    pub fn replace_config(&self, new: Config) {
        let mut cur = self.config.write().expect("config lock");
        let fixed = [
            ("listen", new.listen != cur.listen),
            ("pin_dir", new.pin_dir != cur.pin_dir),
            ("data_path", new.data_path != cur.data_path),
            (
                "control_socket",
                new.control_socket_path() != cur.control_socket_path(),
            ),
            ("user/group", new.run_as != cur.run_as),
            ("[metrics]", new.metrics != cur.metrics),
            ("log.format", new.log.format != cur.log.format),
            (
                "limits.max_sessions",
                new.limits.max_sessions != cur.limits.max_sessions,
            ),
            (
                "udp.xdp_interfaces/xdp_mode",
                new.udp.xdp_interfaces != cur.udp.xdp_interfaces
                    || new.udp.xdp_mode != cur.udp.xdp_mode,
            ),
        ];
        let changed: Vec<&str> = fixed
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(key, _)| *key)
            .collect();
        if !changed.is_empty() {
            tracing::warn!(
                "changes to {} take effect at the next start; the rest applies to new sessions",
                changed.join(", ")
            );
        }
        let mut new = new;
        new.listen.clone_from(&cur.listen);
        new.pin_dir.clone_from(&cur.pin_dir);
        new.data_path = cur.data_path;
        new.control_socket.clone_from(&cur.control_socket);
        new.metrics = cur.metrics.clone();
        new.run_as.clone_from(&cur.run_as);
        new.limits.max_sessions = cur.limits.max_sessions;
        new.udp.xdp_interfaces.clone_from(&cur.udp.xdp_interfaces);
        new.udp.xdp_mode = cur.udp.xdp_mode;
        new.log.format = cur.log.format;
        *cur = Arc::new(new);
    }

    fn client_slot(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut m = self.per_client.lock().expect("per-client lock");
        let n = m.entry(ip).or_insert(0);
        if max != 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            shared: self.clone(),
            ip,
        })
    }

    /// The sockhash splice, when loaded and working.
    pub fn sockmap(&self) -> Option<&kernel::Sockmap> {
        self.kernel
            .as_ref()
            .filter(|_| self.sockmap_ok)
            .map(Kernel::sockmap)
    }

    /// What `{"cmd":"info"}` on the control socket answers.
    pub fn info(&self) -> control::Info {
        let config = self.config();
        control::Info {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            data_path: self.data_path.to_owned(),
            pin_dir: config.pin_dir.display().to_string(),
            listen: self.listen.get().cloned().unwrap_or_default(),
            metrics_listen: self.metrics_listen.get().copied(),
            sessions: self.registry.len(),
            states: self
                .registry
                .states()
                .into_iter()
                .map(|(s, n)| (s.name().to_owned(), n))
                .collect(),
            accounts: self.registry.accounts(self),
        }
    }

    /// Counts a connection closed at accept (client rule or limit).
    fn refuse(&self, failure: Failure) {
        self.metrics.inc(Counter::ConnectionsRefused);
        self.metrics.inc(failure.counter());
    }
}

/// Sets a log filter from a directive, or says why not.
pub type SetLogLevel = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// Sets the running daemon's log filter (`[log] level` of a reloaded file).
#[derive(Clone)]
pub struct LogLevelHandle(pub Arc<SetLogLevel>);

impl std::fmt::Debug for LogLevelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogLevelHandle")
    }
}

/// Options of `ebsocks run` that are not configuration.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Where a reload's `[log] level` goes; None when `RUST_LOG` decides the level.
    pub log_level: Option<LogLevelHandle>,
    /// Write the bound listener addresses here once ready.
    pub addr_file: Option<PathBuf>,
    /// The configuration file to re-read on SIGHUP (None: SIGHUP is ignored).
    pub config_path: Option<PathBuf>,
    /// Command-line overrides, applied again to every reloaded file.
    pub overrides: Overrides,
}

/// Command-line settings that win over the configuration file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Vec<SocketAddr>,
    /// `--data-path`.
    pub data_path: Option<DataPathMode>,
    /// `--pin-dir`.
    pub pin_dir: Option<PathBuf>,
}

impl Overrides {
    /// Applies the overrides to `config`.
    pub fn apply(&self, config: &mut Config) {
        if !self.listen.is_empty() {
            config.listen.clone_from(&self.listen);
        }
        if let Some(p) = self.data_path {
            config.data_path = p;
        }
        if let Some(p) = &self.pin_dir {
            config.pin_dir.clone_from(p);
        }
    }
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
    /// `user`/`group` are set and the daemon could not become them.
    #[error("cannot drop privileges: {0}")]
    Privileges(#[from] privileges::PrivilegeError),
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

fn bind(addr: SocketAddr, v6only: bool) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    if addr.is_ipv6() {
        // Set either way, so that `net.ipv6.bindv6only` does not decide.
        sys::setsockopt_int(
            sock.as_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            libc::c_int::from(v6only),
        )?;
    }
    // Accepted sockets inherit TCP_NODELAY: replies and relayed chunks are never held back
    // waiting for an acknowledgement, and no session pays a setsockopt(2) for it.
    sock.set_nodelay(true)?;
    sock.bind(addr)?;
    let listener = sock.listen(1024)?;
    // Accepted sockets inherit delayed acknowledgements from the listener, so the client's
    // greeting is acknowledged by the method reply that answers it at once, not by a pure ACK
    // of its own first (a new connection acknowledges its first segments immediately): one
    // packet fewer per session. The kernel's own rules take over from the next segment on.
    let _ = sys::setsockopt_int(listener.as_fd(), libc::IPPROTO_TCP, libc::TCP_QUICKACK, 0);
    Ok(listener)
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

/// Runs the daemon until the first message on `stop` (or until every sender is gone), then stops
/// accepting and gives open sessions `timeouts.drain` to finish; a second message on `stop` ends
/// the drain at once.
pub async fn run(
    config: Config,
    opts: RunOptions,
    mut stop: mpsc::Receiver<()>,
) -> Result<(), Error> {
    let mut config = config;
    opts.overrides.apply(&mut config);
    for w in config.warnings() {
        tracing::warn!("configuration: {w}");
    }
    let nofile = sys::raise_nofile_limit().unwrap_or(1024);
    let (mut kernel, sockmap_ok) = load_kernel(&config);
    let xdp = udp::xdp::start_configured(kernel.as_mut().map(Kernel::ebpf_mut), &config.udp)
        .map_err(|source| Error::Io {
            context: "attaching the XDP UDP fast path",
            source,
        })?;

    let mut listeners = Vec::new();
    for &addr in &config.listen {
        let v6only = config::ipv6_only(addr, &config.listen);
        listeners.push(bind(addr, v6only).map_err(|source| Error::Bind { addr, source })?);
    }
    let watcher = Watcher::start().map_err(|source| Error::Io {
        context: "creating the epoll set",
        source,
    })?;
    // What sessions will use: `auto` only when the sockhash is there to promote them into.
    let data_path = match (config.data_path, sockmap_ok) {
        (DataPathMode::Auto, true) => "auto",
        (DataPathMode::Sockmap, true) => "sockmap",
        (DataPathMode::Copy, _) => "copy",
        _ => "splice",
    };
    let metrics = kernel
        .as_ref()
        .and_then(Kernel::take_metrics)
        .unwrap_or_default();
    // Two descriptors per session (its sockets), after headroom for listeners and maps and
    // the pipe pool. Pipes beyond that are a bonus: a session that cannot have one copies
    // that direction, or under `auto` moves into the sockhash, which needs none.
    let fit = usize::try_from(nofile.saturating_sub(64 + 2 * relay::splice::POOL_MAX as u64) / 2)
        .unwrap_or(1024)
        .max(16);
    let max_sessions = match config.limits.max_sessions {
        0 => fit,
        n => {
            if n > fit {
                tracing::warn!(max_sessions = n, open_files = nofile, "limits.max_sessions is {n}, but {nofile} open files hold about {fit} sessions (two descriptors each, after the pipe pool): past that, new connections wait for descriptors instead of being refused; raise the open-file limit (LimitNOFILE=) or lower max_sessions");
            }
            n
        }
    };
    let shared = Arc::new(Shared {
        config: RwLock::new(Arc::new(config)),
        metrics,
        kernel,
        sockmap_ok,
        xdp,
        pipes: PipePool::default(),
        buffers: Buffers::from_system(),
        watcher,
        parking: Arc::default(),
        auth_failures: FailureTracker::new(),
        names: resolve::Names::default(),
        per_client: Mutex::new(HashMap::new()),
        registry: Registry::default(),
        started: Instant::now(),
        data_path,
        listen: OnceLock::new(),
        metrics_listen: OnceLock::new(),
        stopping: watch::Sender::new(false),
    });

    let bound: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    for a in &bound {
        tracing::info!(addr = %a, data_path, "listening on {a}");
    }
    let _ = shared.listen.set(bound.clone());

    // Observability endpoints: failures are logged and cost only those endpoints.
    let config = shared.config();
    let _control = config.control_socket_path().and_then(|path| match control::start(shared.clone(), &path) {
        Ok(c) => {
            tracing::info!(path = %path.display(), "control socket ready");
            Some(c)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), cause = %e, "no control socket: `ebsocks sessions` will not see this daemon");
            None
        }
    });
    let _exporter = match config.metrics.listen {
        Some(addr) => match exporter::start(shared.clone(), addr).await {
            Ok(e) => {
                let _ = shared.metrics_listen.set(e.addr());
                tracing::info!(addr = %e.addr(), "Prometheus metrics on http://{}/metrics", e.addr());
                Some(e)
            }
            Err(source) => {
                return Err(Error::Io {
                    context: "binding the metrics listener",
                    source,
                })
            }
        },
        None => None,
    };
    // Everything privileged is done: become `user` before anyone can reach the daemon.
    if let Some(run_as) = &config.run_as {
        let id = privileges::resolve(run_as)?;
        let handover = privileges::Handover {
            pin_dir: shared
                .kernel
                .as_ref()
                .filter(|k| k.is_pinned())
                .map(|_| config.pin_dir.clone()),
            control_socket: _control.as_ref().map(|c| c.path().to_owned()),
        };
        privileges::drop_to(id, &handover)?;
        tracing::info!(user = %run_as.user, uid = id.uid, gid = id.gid, "privileges dropped");
        // SIGHUP re-reads these as that user: say so now rather than at the first reload.
        let files = opts.config_path.iter().chain(&config.auth.users_file);
        for file in files {
            if let Err(e) = std::fs::File::open(file) {
                tracing::warn!(file = %file.display(), user = %run_as.user, cause = %e, "{} cannot read {}, so SIGHUP will not reload the configuration; make it readable by that user", run_as.user, file.display());
            }
        }
    }
    drop(config);
    sys::release_free_memory();
    // Install the SIGHUP handler before anyone can learn the daemon is up (the address file):
    // SIGHUP's default action would kill it.
    let hup = match &opts.config_path {
        Some(path) => {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(hup) => Some((hup, path.clone())),
                Err(e) => {
                    tracing::error!(cause = %e, "cannot install the SIGHUP handler; reload is unavailable");
                    None
                }
            }
        }
        None => None,
    };
    if let Some(path) = &opts.addr_file {
        let text: String = bound.iter().map(|a| format!("{a}\n")).collect();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| Error::Io {
                context: "writing the address file",
                source,
            })?;
    }

    let permits = Arc::new(Semaphore::new(max_sessions));
    // Every session holds a clone; when all are dropped, `done_rx.recv()` returns None.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);

    let mut accept_tasks = Vec::new();
    for listener in listeners {
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            permits.clone(),
            shared.stopping.subscribe(),
            done_tx.clone(),
        )));
    }
    drop(done_tx);

    let reloader = hup.map(|(hup, path)| {
        tokio::spawn(reload_loop(
            shared.clone(),
            hup,
            path,
            opts.overrides.clone(),
            opts.log_level.clone(),
        ))
    });

    let _ = stop.recv().await;
    if let Some(r) = reloader {
        r.abort();
    }
    tracing::info!("shutting down: no new sessions");
    shared.stopping.send_replace(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    let drain = shared.config().timeouts.drain;
    let open = shared.registry.len();
    if open > 0 {
        tracing::info!(sessions = open, limit = ?drain, "waiting for open sessions to finish (signal again to close them now)");
    }
    let again = async {
        match stop.recv().await {
            Some(()) => {}
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = tokio::time::timeout(drain, done_rx.recv()) => {
            if r.is_err() {
                tracing::warn!(after = ?drain, sessions = shared.registry.len(), "sessions still open at the end of the drain period; closing them");
            }
        }
        () = again => tracing::warn!(sessions = shared.registry.len(), "second stop signal: closing open sessions now"),
    }
    // Parked sessions hold the shared state; their tasks would go with the runtime.
    shared.parking.close();
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
                shared.metrics.inc(Counter::AcceptErrors);
                tracing::warn!(cause = %e, "accept failed");
                tokio::time::sleep(session::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        shared.metrics.inc(Counter::ConnectionsAccepted);
        let config = shared.config();
        // Stage 1 of the rules: the client address alone, before any negotiation.
        let (verdict, methods) = config.rules.check_client(peer.ip().to_canonical());
        if verdict.log {
            tracing::info!(client = %peer, rule = verdict.rule, action = ?verdict.action, "client rule matched");
        }
        if verdict.action == Action::Block {
            shared.refuse(Failure::ClientBlocked);
            tracing::debug!(client = %peer, rule = verdict.rule, "client refused by rule");
            continue;
        }
        let methods = methods.map(<[_]>::to_vec);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.refuse(Failure::Limit);
            tracing::warn!(client = %peer, "session limit reached");
            continue;
        };
        let Some(slot) = shared.client_slot(
            peer.ip().to_canonical(),
            config.limits.max_sessions_per_client,
        ) else {
            shared.refuse(Failure::Limit);
            tracing::warn!(client = %peer, "per-client session limit reached");
            continue;
        };
        let shared = shared.clone();
        let guards = Guards {
            _slot: slot,
            _permit: permit,
            _done: done.clone(),
        };
        tokio::spawn(async move {
            session::handle(&shared, config, stream, peer, methods, guards).await;
        });
    }
}

/// Re-reads the configuration on every SIGHUP. A valid file applies to new sessions (existing
/// ones keep theirs); an invalid one is logged and the old configuration stays.
async fn reload_loop(
    shared: Arc<Shared>,
    mut hup: tokio::signal::unix::Signal,
    path: PathBuf,
    overrides: Overrides,
    log_level: Option<LogLevelHandle>,
) {
    while hup.recv().await.is_some() {
        let loaded = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Config::load(&path)).await
        };
        match loaded {
            Ok(Ok(mut c)) => {
                overrides.apply(&mut c);
                let warnings = c.warnings();
                let level = (c.log.level != shared.config().log.level).then(|| c.log.level.clone());
                shared.replace_config(c);
                tracing::info!(file = %path.display(), "configuration reloaded");
                match (level, &log_level) {
                    (None, _) => {}
                    (Some(level), Some(set)) => match (set.0)(&level) {
                        Ok(()) => tracing::info!(level, "log level changed"),
                        Err(e) => tracing::error!(level, cause = %e, "log level not changed"),
                    },
                    (Some(_), None) => {
                        tracing::warn!(
                            "RUST_LOG is set, so it decides the log level, not [log] level"
                        );
                    }
                }
                for w in warnings {
                    tracing::warn!(file = %path.display(), "configuration: {w}");
                }
            }
            Ok(Err(e)) => {
                let config = shared.config();
                let denied = |f: &PathBuf| {
                    std::fs::File::open(f)
                        .is_err_and(|e| e.kind() == io::ErrorKind::PermissionDenied)
                };
                let unreadable = std::iter::once(&path)
                    .chain(&config.auth.users_file)
                    .find(|f| denied(f));
                let hint = match (&config.run_as, unreadable) {
                    (Some(run_as), Some(f)) => format!(
                        " ({} cannot read {}: the daemon runs as that user since it dropped privileges)",
                        run_as.user,
                        f.display()
                    ),
                    _ => String::new(),
                };
                tracing::error!(file = %path.display(), cause = %format_args!("{e}{hint}"), "configuration not reloaded, keeping the previous one")
            }
            Err(e) => tracing::error!(cause = %e, "configuration reload failed"),
        }
    }
}

/// `error: cause: cause...`. aya's errors keep the system error (EPERM, E2BIG...) as their
/// source rather than in their message, and that is the part that tells an operator what to do.
/// The first system error in `e`'s chain of causes, `e` included.
pub(crate) fn io_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut next = Some(e);
    while let Some(cause) = next {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            return Some(io);
        }
        next = cause.source();
    }
    None
}

/// What an operator can do about a failure to reach `what` of a running daemon (its pins, its
/// control socket), configured as `key`, from the system error behind it.
pub(crate) fn reach_hint(e: &(dyn std::error::Error + 'static), what: &str, key: &str) -> String {
    match io_cause(e).map(io::Error::kind) {
        Some(io::ErrorKind::PermissionDenied) => format!(
            " (only root, or the daemon's `user` once it has dropped privileges, may open {what})"
        ),
        Some(io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
            format!(" (is the daemon running with this {key}?)")
        }
        _ => String::new(),
    }
}

pub(crate) fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        // Some errors repeat their source's message in their own.
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "current_thread")]
    async fn accepted_sockets_start_with_nodelay() {
        let listener = super::bind("127.0.0.1:0".parse().unwrap(), false).expect("bind");
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(
            accepted.nodelay().unwrap(),
            "an accepted socket must not need its own TCP_NODELAY"
        );
        // Only the listener's own sockets: a socket the test made has the kernel's default.
        assert!(!client.nodelay().unwrap());
    }
}
