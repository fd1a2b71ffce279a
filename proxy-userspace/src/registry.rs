//! Live sessions, for `ebsocks sessions` and the per-state gauges.
//!
//! One `Mutex<HashMap>` entry per session, touched at state transitions only (accept,
//! authentication, resolution, connect, relay start, end), never per byte. Byte counts are read
//! when someone asks: from the kernel's per-socket map for spliced sessions, from the relay's own
//! atomics for splice(2) and copy sessions. TCP state and RTT come from `TCP_INFO` on the
//! session's sockets, checked by socket cookie so that a descriptor number reused after the
//! session closed is never read as the session's.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Instant,
};

use proxy_common::metrics::{Counter, DataPath};
use serde::{Deserialize, Serialize};

use crate::{acl, sys, Shared};

/// Where a session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Reading the greeting and the request.
    Negotiating,
    /// RFC 1929 username/password exchange.
    Authenticating,
    /// Resolving the target's name.
    Resolving,
    /// Connecting to the target.
    Connecting,
    /// BIND: waiting for the target to connect back.
    BindWaiting,
    /// Relaying payload (the data path says how).
    Relaying,
    /// A UDP association is open.
    Udp,
}

impl State {
    /// Lower-case name used in listings and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Negotiating => "negotiating",
            Self::Authenticating => "authenticating",
            Self::Resolving => "resolving",
            Self::Connecting => "connecting",
            Self::BindWaiting => "bind_waiting",
            Self::Relaying => "relaying",
            Self::Udp => "udp",
        }
    }

    /// The gauge kept by the registry for this state. Relaying and UDP sessions are counted by
    /// the data paths themselves (`sessions_active_*`, `udp_associations_active`).
    const fn gauge(self) -> Option<Counter> {
        match self {
            Self::Negotiating => Some(Counter::SessionsNegotiating),
            Self::Authenticating => Some(Counter::SessionsAuthenticating),
            Self::Resolving => Some(Counter::SessionsResolving),
            Self::Connecting => Some(Counter::SessionsConnecting),
            Self::BindWaiting => Some(Counter::SessionsBindWaiting),
            Self::Relaying | Self::Udp => None,
        }
    }
}

/// The "sessions created" counter of a command.
fn created(c: acl::Command) -> Counter {
    match c {
        acl::Command::Connect => Counter::SessionsCreatedConnect,
        acl::Command::Bind => Counter::SessionsCreatedBind,
        acl::Command::UdpAssociate => Counter::SessionsCreatedUdp,
    }
}

/// The "sessions ended" counter of a command.
fn ended(c: acl::Command) -> Counter {
    match c {
        acl::Command::Connect => Counter::SessionsEndedConnect,
        acl::Command::Bind => Counter::SessionsEndedBind,
        acl::Command::UdpAssociate => Counter::SessionsEndedUdp,
    }
}

/// Bytes a userspace relay (splice(2), copy, or a UDP association's relay socket) has moved so
/// far, shared with the registry.
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// Client to target.
    pub up: AtomicU64,
    /// Target to client.
    pub down: AtomicU64,
}

/// A socket of a relaying session: its descriptor number and cookie.
#[derive(Clone, Copy, Debug)]
struct Sock {
    fd: RawFd,
    cookie: u64,
}

impl Sock {
    fn of(fd: BorrowedFd<'_>) -> Option<Self> {
        Some(Self {
            fd: fd.as_raw_fd(),
            cookie: sys::socket_cookie(fd).ok()?,
        })
    }

    /// `TCP_INFO` of the socket, if the descriptor still refers to it.
    fn tcp(self) -> Option<TcpRow> {
        // SAFETY: the descriptor is only passed to getsockopt; if it was closed or reused since,
        // the calls fail or the cookie differs, and nothing is returned.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        if sys::socket_cookie(fd).ok()? != self.cookie {
            return None;
        }
        let info = sys::tcp_info(fd).ok()?;
        // Checked again: the descriptor could have been closed and reused during the read.
        if sys::socket_cookie(fd).ok()? != self.cookie {
            return None;
        }
        Some(TcpRow {
            state: sys::tcp_state_name(info.state).to_owned(),
            rtt_us: info.rtt_us,
        })
    }
}

#[derive(Clone, Debug)]
struct Entry {
    client: SocketAddr,
    started: Instant,
    user: Option<String>,
    command: Option<acl::Command>,
    target: Option<String>,
    rule: Option<String>,
    state: State,
    path: Option<DataPath>,
    /// Client and upstream sockets once relaying.
    sockets: Option<(Sock, Sock)>,
    /// Userspace relay counters (splice(2), copy).
    bytes: Option<Arc<ByteCounters>>,
    /// Payload the daemon forwarded itself before a userspace relay took over.
    forwarded_up: u64,
    /// Final payload bytes (up, down), recorded when the session ends.
    final_bytes: Option<(u64, u64)>,
}

/// Sessions and payload bytes accounted to one user or one rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Totals {
    sessions: u64,
    up: u64,
    down: u64,
}

impl Totals {
    fn add(&mut self, up: u64, down: u64) {
        self.sessions += 1;
        self.up += up;
        self.down += down;
    }
}

/// Totals of the sessions that ended, per user and per rule.
#[derive(Debug, Default)]
struct Ended {
    users: HashMap<String, Totals>,
    rules: HashMap<String, Totals>,
}

/// The live sessions, and what ended ones add up to.
#[derive(Debug, Default)]
pub struct Registry {
    /// Boxed: a table of 200-byte entries would be as large as its capacity, up to twice the
    /// sessions open; boxes cost one pointer per slot.
    sessions: Mutex<HashMap<u64, Box<Entry>>>,
    ended: Mutex<Ended>,
}

/// Sessions and payload bytes of one user or rule since the daemon started: ended sessions plus
/// what live ones moved so far, so the figures only grow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRow {
    /// User name (`-` for sessions without one) or rule name.
    pub name: String,
    /// Sessions whose request was read, live ones included.
    pub sessions: u64,
    /// Payload bytes client to target.
    pub up_bytes: u64,
    /// Payload bytes target to client.
    pub down_bytes: u64,
}

/// Per-user and per-rule accounting, and how many clients are connected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accounts {
    /// By user, sorted by name.
    pub users: Vec<AccountRow>,
    /// By the socks rule that let the request through, sorted by name.
    pub rules: Vec<AccountRow>,
    /// Distinct client addresses with a session open now.
    pub clients_active: usize,
}

/// The user name a session is accounted to.
fn user_key(user: Option<&str>) -> &str {
    user.unwrap_or("-")
}

/// `TCP_INFO` figures of one socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRow {
    /// Linux TCP state name (`ESTABLISHED`, `CLOSE_WAIT`, ...).
    pub state: String,
    /// Smoothed round-trip time in microseconds.
    pub rtt_us: u32,
}

/// One live session as `ebsocks sessions` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Daemon session id (the `session` field of the logs).
    pub id: u64,
    /// Client address.
    pub client: SocketAddr,
    /// Requested target, once the request was read.
    pub target: Option<String>,
    /// Authenticated user (or SOCKS4 user id).
    pub user: Option<String>,
    /// `connect`, `bind` or `udpassociate`, once the request was read.
    pub command: Option<String>,
    /// The socks rule that let the request through.
    pub rule: Option<String>,
    /// See [`State`].
    pub state: State,
    /// `sockmap`, `splice` or `copy` while relaying TCP.
    pub path: Option<String>,
    /// Seconds since the connection was accepted.
    pub age_secs: f64,
    /// Payload bytes client to target so far (relaying TCP sessions).
    pub up_bytes: Option<u64>,
    /// Payload bytes target to client so far.
    pub down_bytes: Option<u64>,
    /// `TCP_INFO` of the client socket (relaying TCP sessions).
    pub client_tcp: Option<TcpRow>,
    /// `TCP_INFO` of the upstream socket.
    pub upstream_tcp: Option<TcpRow>,
}

impl Registry {
    /// Registers a new session in state `Negotiating`; it leaves the registry, and its state
    /// gauge, when the handle drops.
    pub fn open(&self, shared: &Arc<Shared>, id: u64, client: SocketAddr) -> SessionHandle {
        let entry = Entry {
            client,
            started: Instant::now(),
            user: None,
            command: None,
            target: None,
            rule: None,
            state: State::Negotiating,
            path: None,
            sockets: None,
            bytes: None,
            forwarded_up: 0,
            final_bytes: None,
        };
        let mut m = self.sessions.lock().expect("registry lock");
        shared.metrics.inc(Counter::SessionsNegotiating);
        m.insert(id, Box::new(entry));
        SessionHandle {
            shared: shared.clone(),
            id,
            logged: AtomicBool::new(false),
        }
    }

    /// Sessions registered now.
    pub fn len(&self) -> usize {
        self.sessions.lock().expect("registry lock").len()
    }

    /// Whether no session is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live session, by id, with its current byte counts and TCP figures.
    pub fn list(&self, shared: &Shared) -> Vec<SessionInfo> {
        // Copy out under the lock; the syscalls happen after it is released.
        let mut entries: Vec<(u64, Entry)> = self
            .sessions
            .lock()
            .expect("registry lock")
            .iter()
            .map(|(id, e)| (*id, Entry::clone(e)))
            .collect();
        entries.sort_unstable_by_key(|(id, _)| *id);
        let now = Instant::now();
        entries
            .into_iter()
            .map(|(id, e)| info(shared, now, id, e))
            .collect()
    }

    /// Per-user and per-rule totals: ended sessions plus the bytes live ones moved so far.
    pub fn accounts(&self, shared: &Shared) -> Accounts {
        let (mut users, mut rules, live) = {
            let live = self.sessions.lock().expect("registry lock");
            let ended = self.ended.lock().expect("registry lock");
            let entries: Vec<Entry> = live.values().map(|e| Entry::clone(e)).collect();
            (ended.users.clone(), ended.rules.clone(), entries)
        };
        let mut clients = std::collections::HashSet::new();
        for e in live {
            clients.insert(e.client.ip());
            if e.command.is_none() {
                continue;
            }
            let (up, down) = current_bytes(shared, &e);
            users
                .entry(user_key(e.user.as_deref()).to_owned())
                .or_default()
                .add(up, down);
            if let Some(rule) = &e.rule {
                rules.entry(rule.clone()).or_default().add(up, down);
            }
        }
        let rows = |m: HashMap<String, Totals>| {
            let mut v: Vec<AccountRow> = m
                .into_iter()
                .map(|(name, t)| AccountRow {
                    name,
                    sessions: t.sessions,
                    up_bytes: t.up,
                    down_bytes: t.down,
                })
                .collect();
            v.sort_unstable_by(|a, b| a.name.cmp(&b.name));
            v
        };
        Accounts {
            users: rows(users),
            rules: rows(rules),
            clients_active: clients.len(),
        }
    }

    /// Live sessions per state.
    pub fn states(&self) -> HashMap<State, usize> {
        let mut out = HashMap::new();
        for e in self.sessions.lock().expect("registry lock").values() {
            *out.entry(e.state).or_insert(0) += 1;
        }
        out
    }
}

/// Payload bytes a session moved so far (its final figures once it ended).
fn current_bytes(shared: &Shared, e: &Entry) -> (u64, u64) {
    if let Some(b) = e.final_bytes {
        return b;
    }
    let (up, down) = live_bytes(shared, e);
    (up.unwrap_or(0), down.unwrap_or(0))
}

fn live_bytes(shared: &Shared, e: &Entry) -> (Option<u64>, Option<u64>) {
    let (mut up, mut down) = (None, None);
    if let Some(b) = &e.bytes {
        up = Some(b.up.load(Relaxed) + e.forwarded_up);
        down = Some(b.down.load(Relaxed));
    } else if let (Some(DataPath::Sockmap), Some((c, u)), Some(sm)) =
        (e.path, e.sockets, shared.sockmap())
    {
        // The client socket's counter already includes what the daemon forwarded
        // at the handover.
        up = sm.traffic(c.cookie).map(|t| t.bytes);
        down = sm.traffic(u.cookie).map(|t| t.bytes);
    }
    (up, down)
}

fn info(shared: &Shared, now: Instant, id: u64, e: Entry) -> SessionInfo {
    let (up, down) = live_bytes(shared, &e);
    let (client_tcp, upstream_tcp) = match e.sockets {
        Some((c, u)) => (c.tcp(), u.tcp()),
        None => (None, None),
    };
    SessionInfo {
        id,
        client: e.client,
        target: e.target,
        user: e.user,
        command: e.command.map(|c| c.as_str().to_owned()),
        rule: e.rule,
        state: e.state,
        path: e.path.map(|p| p.name().to_owned()),
        age_secs: now.duration_since(e.started).as_secs_f64(),
        up_bytes: up,
        down_bytes: down,
        client_tcp,
        upstream_tcp,
    }
}

/// A session's place in the registry. Updates take the registry lock once each. It owns its
/// reference to the shared state, so a parked session (one whose task ended) can keep it.
#[derive(Debug)]
pub struct SessionHandle {
    shared: Arc<Shared>,
    id: u64,
    /// Set once the session's end line was logged.
    logged: AtomicBool,
}

/// What a session's end line says about the session, as the registry holds it.
#[derive(Debug)]
pub struct Identity {
    /// Client address.
    pub client: SocketAddr,
    /// When the session was accepted.
    pub started: Instant,
    /// The request's command, once read.
    pub command: Option<acl::Command>,
    /// The requested target, once read.
    pub target: Option<String>,
    /// The authenticated user.
    pub user: Option<String>,
}

impl SessionHandle {
    /// The session's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The session as its end line describes it (None cannot happen while the handle lives).
    pub fn identity(&self) -> Option<Identity> {
        let m = self.shared.registry.sessions.lock().expect("registry lock");
        m.get(&self.id).map(|e| Identity {
            client: e.client,
            started: e.started,
            command: e.command,
            target: e.target.clone(),
            user: e.user.clone(),
        })
    }

    /// Notes that the end-of-session line was logged.
    pub fn logged(&self) {
        self.logged.store(true, Relaxed);
    }

    /// Records the session's final payload bytes for its user's and rule's totals, and notes
    /// that its end line was logged.
    pub fn ended(&self, up: u64, down: u64) {
        self.update(|e| e.final_bytes = Some((up, down)));
        self.logged();
    }

    fn update(&self, f: impl FnOnce(&mut Entry)) {
        let mut m = self.shared.registry.sessions.lock().expect("registry lock");
        if let Some(e) = m.get_mut(&self.id) {
            f(e);
        }
    }

    /// Moves the session to `state`, moving it between the state gauges.
    pub fn set_state(&self, state: State) {
        let metrics = &self.shared.metrics;
        self.update(|e| {
            if e.state == state {
                return;
            }
            if let Some(g) = e.state.gauge() {
                metrics.dec(g);
            }
            if let Some(g) = state.gauge() {
                metrics.inc(g);
            }
            e.state = state;
        });
    }

    /// Records what the client asked for, and counts the session as created by that command
    /// (it counts as ended by it when the handle drops).
    pub fn set_request(&self, command: acl::Command, target: String, user: Option<String>) {
        self.shared.metrics.inc(created(command));
        self.update(|e| {
            e.command = Some(command);
            e.target = Some(target);
            e.user = user;
        });
    }

    /// The socks rule recorded by [`Self::set_rule`].
    pub fn rule(&self) -> Option<String> {
        self.shared
            .registry
            .sessions
            .lock()
            .expect("registry lock")
            .get(&self.id)
            .and_then(|e| e.rule.clone())
    }

    /// Records the socks rule that let the request through.
    pub fn set_rule(&self, rule: &str) {
        self.update(|e| e.rule = Some(rule.to_owned()));
    }

    /// Shares a UDP association's byte counters with the registry, so that `ebsocks sessions`
    /// and the per-user and per-rule figures follow it live.
    pub fn counting(&self, bytes: Arc<ByteCounters>) {
        self.update(|e| e.bytes = Some(bytes));
    }

    /// Marks the session as relaying on `path` with these sockets. `bytes` are the userspace
    /// relay's counters (None on the sockmap path, whose counters are in the kernel);
    /// `forwarded_up` is payload the daemon already forwarded, not in `bytes`.
    pub fn relaying(
        &self,
        path: DataPath,
        client: &impl AsFd,
        upstream: &impl AsFd,
        bytes: Option<Arc<ByteCounters>>,
        forwarded_up: u64,
    ) {
        let sockets = Sock::of(client.as_fd()).zip(Sock::of(upstream.as_fd()));
        self.set_state(State::Relaying);
        self.update(|e| {
            e.path = Some(path);
            e.sockets = sockets;
            e.bytes = bytes;
            e.forwarded_up = forwarded_up;
        });
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        let registry = &self.shared.registry;
        let e = {
            // Both locks at once (in this order, as in `accounts`): a reader never sees the
            // session neither live nor in the totals.
            let mut live = registry.sessions.lock().expect("registry lock");
            let Some(e) = live.remove(&self.id) else {
                return;
            };
            let e = *e;
            if e.command.is_some() {
                let (up, down) = current_bytes(&self.shared, &e);
                let mut totals = registry.ended.lock().expect("registry lock");
                totals
                    .users
                    .entry(user_key(e.user.as_deref()).to_owned())
                    .or_default()
                    .add(up, down);
                if let Some(rule) = &e.rule {
                    totals.rules.entry(rule.clone()).or_default().add(up, down);
                }
            }
            e
        };
        if let Some(g) = e.state.gauge() {
            self.shared.metrics.dec(g);
        }
        if let Some(c) = e.command {
            self.shared.metrics.inc(ended(c));
        }
        if !self.logged.load(Relaxed) {
            // The session's task was dropped (the drain period ran out at shutdown): log its end
            // with what the registry knows.
            let i = info(&self.shared, Instant::now(), self.id, e);
            tracing::info!(
                session = i.id,
                client = %i.client,
                target = i.target.as_deref().unwrap_or("-"),
                user = i.user.as_deref().unwrap_or("-"),
                rule = i.rule.as_deref().unwrap_or("-"),
                command = i.command.as_deref().unwrap_or("-"),
                path = i.path.as_deref().unwrap_or(if i.state == State::Udp { "udp" } else { "-" }),
                up = i.up_bytes.unwrap_or(0),
                down = i.down_bytes.unwrap_or(0),
                secs = i.age_secs,
                end = "shutdown",
                state = i.state.name(),
                "session closed at shutdown"
            );
        }
    }
}
