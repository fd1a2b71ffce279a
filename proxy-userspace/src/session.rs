//! One client connection: SOCKS4/4a/5 negotiation, authentication, the rules, then CONNECT,
//! BIND or UDP ASSOCIATE, and the relay.

use std::{
    io,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    os::fd::AsFd,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use proxy_common::metrics::Counter;
use proxy_socks5::{
    Address, Command, DecodeError, Greeting, Method, MethodSelection, Reply, Request, Response,
    Socks4Command, Socks4Reply, Socks4Request, Socks4Response, UserPassRequest, UserPassResponse,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    time::{timeout, timeout_at},
};

use crate::{
    acl::{self, Action, AuthMethod, Dest, RequestInfo},
    config::Config,
    metrics::Failure,
    registry::{SessionHandle, State},
    relay::{self, Consumed, End},
    sys, udp, Guards, Shared,
};

/// Upper bound on what the daemon buffers from a client before the relay starts. Any SOCKS
/// message fits in well under this; pipelined payload beyond it stays in the socket's receive
/// queue, where the relay picks it up.
const NEGOTIATION_BUF: usize = 4096;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// How long a client waits before the next accept after an accept error (descriptors
/// exhausted): existing sessions go on, and the loop does not spin.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Why a session ended before relaying.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// The step that failed.
        context: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The client closed before finishing the negotiation.
    #[error("client closed during negotiation")]
    ClientClosed,
    /// The client did not finish the negotiation in time.
    #[error("negotiation timed out")]
    NegotiationTimeout,
    /// A malformed SOCKS message.
    #[error("malformed SOCKS message: {0}")]
    Decode(#[from] DecodeError),
    /// The client offered no method the server accepts.
    #[error("no acceptable authentication method")]
    NoAcceptableMethod,
    /// Username/password authentication failed.
    #[error("authentication failed for user {user:?}")]
    AuthFailed {
        /// The username given.
        user: String,
    },
    /// A rule blocked the request.
    #[error("blocked by rule {rule:?}")]
    Blocked {
        /// The rule's name.
        rule: String,
    },
    /// The request could not be served; the reply code was sent.
    #[error("request refused with reply {reply:?}: {reason}")]
    Refused {
        /// The reply sent.
        reply: Reply,
        /// What happened.
        reason: String,
        /// The cause, for the failure counters.
        failure: Failure,
    },
}

impl SessionError {
    /// The failure counter this error counts under.
    pub fn failure(&self) -> Failure {
        match self {
            Self::Io { .. } => Failure::IoError,
            Self::ClientClosed => Failure::ClientClosed,
            Self::NegotiationTimeout => Failure::NegotiationTimeout,
            Self::Decode(DecodeError::Command { .. }) => Failure::Reply(Reply::CommandNotSupported),
            Self::Decode(DecodeError::AddressType { .. }) => {
                Failure::Reply(Reply::AddressTypeNotSupported)
            }
            Self::Decode(_) => Failure::ProtocolError,
            Self::NoAcceptableMethod => Failure::NoAcceptableMethod,
            Self::AuthFailed { .. } => Failure::AuthFailed,
            Self::Blocked { .. } => Failure::RuleBlocked,
            Self::Refused { failure, .. } => *failure,
        }
    }
}

/// A refusal with `reply`, counted under that reply code.
fn refused(reply: Reply, reason: String) -> SessionError {
    SessionError::Refused {
        reply,
        reason,
        failure: Failure::Reply(reply),
    }
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> SessionError {
    move |source| SessionError::Io { context, source }
}

/// What the client asked for, whatever its SOCKS version.
struct Negotiated {
    version: u8,
    user: Option<String>,
    command: acl::Command,
    address: Address,
    /// Bytes the client pipelined behind its request.
    leftover: Vec<u8>,
    /// Bytes read from the client in all.
    read_total: u64,
}

/// What remains of the negotiation buffer: the pipelined payload, without the buffer's spare
/// capacity (the session keeps it for its whole life).
fn pipelined(mut buf: Vec<u8>) -> Vec<u8> {
    buf.shrink_to_fit();
    buf
}

/// Replies in the client's SOCKS version.
#[derive(Clone, Copy)]
struct Replier {
    version: u8,
}

impl Replier {
    async fn send(
        self,
        client: &mut TcpStream,
        reply: Reply,
        address: SocketAddr,
    ) -> Result<(), SessionError> {
        let mut out = Vec::with_capacity(32);
        if self.version == 4 {
            let reply = if reply == Reply::Succeeded {
                Socks4Reply::Granted
            } else {
                Socks4Reply::Rejected
            };
            let address = match address {
                SocketAddr::V4(a) => a,
                // SOCKS4 cannot carry an IPv6 address: the port alone is still useful.
                SocketAddr::V6(a) => SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, a.port()),
            };
            Socks4Response { reply, address }.encode(&mut out);
        } else {
            Response {
                reply,
                address: Address::Ip(address),
            }
            .encode(&mut out);
        }
        client
            .write_all(&out)
            .await
            .map_err(io_err("writing to the client"))
    }

    async fn refuse<T>(
        self,
        client: &mut TcpStream,
        reply: Reply,
        err: SessionError,
    ) -> Result<T, SessionError> {
        let _ = self.send(client, reply, unspecified()).await;
        Err(err)
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// Runs one client connection to completion. Never panics on network input.
///
/// `methods` is the client rule's method restriction (`None`: the configured methods).
pub async fn handle(
    shared: &Arc<Shared>,
    config: Arc<Config>,
    mut client: TcpStream,
    peer: SocketAddr,
    methods: Option<Vec<AuthMethod>>,
    guards: Guards,
) {
    let id = NEXT_SESSION.fetch_add(1, Relaxed);
    let session = shared.registry.open(shared, id, peer);
    let mut end = Ending {
        id,
        peer,
        started: Instant::now(),
        command: None,
        target: None,
        user: None,
    };
    // Each stage's state is boxed and freed when the stage ends, so that a long-lived relaying
    // session holds only what relaying needs (a future is as large as its largest state).
    let negotiation = Box::pin(timeout(
        config.timeouts.negotiation,
        negotiate(
            shared,
            &session,
            &config,
            &mut client,
            peer,
            methods.as_deref(),
        ),
    ));
    let mut stopping = shared.stopping.subscribe();
    let negotiated = tokio::select! {
        r = negotiation => match r {
            Ok(r) => r,
            Err(_) => {
                shared.metrics.inc(Counter::NegotiationTimeouts);
                Err(SessionError::NegotiationTimeout)
            }
        },
        // The daemon is shutting down and the client has been granted nothing yet: it is not
        // waited for (its registry entry logs the end, "closed at shutdown").
        _ = stopping.wait_for(|s| *s) => return,
    };
    let n = match negotiated {
        Ok(n) => n,
        Err(e) => {
            if let SessionError::AuthFailed { user } = &e {
                end.user = Some(user.clone());
            }
            end.failed(shared, &session, &e);
            return;
        }
    };
    end.command = Some(n.command);
    end.target = Some(n.address.to_string());
    end.user.clone_from(&n.user);
    session.set_request(n.command, n.address.to_string(), n.user.clone());
    // The request's state is freed before relaying begins (bound first, so that its box is
    // dropped at the end of the statement).
    let served = Box::pin(serve(shared, &session, &config, client, peer, n)).await;
    let served = match served {
        Ok(Next::Relay(r)) => {
            let Ready {
                client,
                upstream,
                consumed,
            } = *r;
            let relayed = Box::pin(relay::relay(
                shared, &session, &config, id, client, upstream, consumed,
            ))
            .await;
            match relayed {
                relay::Relayed::Done(o) => Ok(Served::Relayed(o)),
                relayed @ (relay::Relayed::Carried(_) | relay::Relayed::Quiet(_)) => {
                    // The kernel carries the pair, or no payload came yet: this task ends, and
                    // the session waits as a parked record until something happens to it.
                    // What the end line needs is in the registry; the tail keeps no copy.
                    drop(end);
                    let tail = Tail {
                        session,
                        _guards: guards,
                    };
                    shared.parking.park(shared, relayed, tail);
                    return;
                }
            }
        }
        Ok(Next::Served(s)) => Ok(s),
        Err(e) => Err(e),
    };
    match served {
        Ok(s) => end.served(&session, s),
        Err(e) => end.failed(shared, &session, &e),
    }
}

/// What a parked session's end needs: its registry entry (which holds its log line's fields),
/// and the places it holds under the session limits and in the drain's count. Fields drop in
/// order: the session leaves the registry before its places are freed.
#[derive(Debug)]
pub struct Tail {
    session: SessionHandle,
    _guards: Guards,
}

impl Tail {
    /// The session's id.
    pub fn id(&self) -> u64 {
        self.session.id()
    }

    /// The session's registry entry.
    pub fn session(&self) -> &SessionHandle {
        &self.session
    }

    /// Ends the session with what its relay did: one log line, the registry's totals.
    pub fn finish(self, outcome: relay::Outcome) {
        let id = self.session.id();
        let ending = match self.session.identity() {
            Some(i) => Ending {
                id,
                peer: i.client,
                started: i.started,
                command: i.command,
                target: i.target,
                user: i.user,
            },
            None => Ending {
                id,
                peer: unspecified(),
                started: Instant::now(),
                command: None,
                target: None,
                user: None,
            },
        };
        ending.served(&self.session, Served::Relayed(outcome));
    }
}

/// What serving a request leads to.
enum Next {
    /// CONNECT or BIND established its pair; the relay comes next.
    Relay(Box<Ready>),
    /// The request was served without a relay.
    Served(Served),
}

/// A CONNECT or BIND pair ready for the relay.
struct Ready {
    client: TcpStream,
    upstream: TcpStream,
    consumed: Consumed,
}

/// What a served request did.
enum Served {
    /// CONNECT or BIND relayed payload.
    Relayed(relay::Outcome),
    /// A UDP association ended.
    Udp(udp::UdpOutcome),
    /// BIND: the client went away before the peer connected.
    BindAbandoned,
}

/// What the end-of-session log line needs; every way a session ends goes through
/// [`Ending::served`] or [`Ending::failed`], which log exactly one `session ...` line with the
/// same fields.
#[derive(Debug)]
struct Ending {
    id: u64,
    peer: SocketAddr,
    started: Instant,
    command: Option<acl::Command>,
    target: Option<String>,
    user: Option<String>,
}

impl Ending {
    fn served(&self, session: &SessionHandle, served: Served) {
        match &served {
            Served::Relayed(o) => session.ended(o.up, o.down),
            Served::Udp(o) => session.ended(o.up_bytes, o.down_bytes),
            Served::BindAbandoned => session.ended(0, 0),
        }
        let Self {
            id,
            peer,
            started,
            command,
            target,
            user,
        } = self;
        let (secs, rule) = (started.elapsed().as_secs_f64(), session.rule());
        let (target, user) = (
            target.as_deref().unwrap_or("-"),
            user.as_deref().unwrap_or("-"),
        );
        let (rule, command) = (
            rule.as_deref().unwrap_or("-"),
            command.map_or("-", acl::Command::as_str),
        );
        match served {
            Served::Relayed(o) => {
                let (path, up, down) = (o.path_name(), o.up, o.down);
                match o.end {
                    End::Eof => {
                        tracing::info!(session = id, client = %peer, target, user, rule, command, path, up, down, secs, end = "eof", "session closed");
                    }
                    End::Shutdown => {
                        tracing::info!(session = id, client = %peer, target, user, rule, command, path, up, down, secs, end = "shutdown", "session closed");
                    }
                    End::Idle => {
                        tracing::info!(session = id, client = %peer, target, user, rule, command, path, up, down, secs, end = "idle", "session idle, closed");
                    }
                    End::Error(e) => {
                        tracing::info!(session = id, client = %peer, target, user, rule, command, path, up, down, secs, end = "error", cause = %e, "session reset");
                    }
                }
            }
            Served::Udp(o) => {
                tracing::info!(
                    session = id, client = %peer, target, user, rule, command, path = "udp", up = o.up_bytes, down = o.down_bytes, secs,
                    end = o.end, relay = %o.relay_addr, up_datagrams = o.up_datagrams, down_datagrams = o.down_datagrams,
                    "UDP association closed"
                );
            }
            Served::BindAbandoned => {
                tracing::info!(session = id, client = %peer, target, user, rule, command, path = "-", up = 0u64, down = 0u64, secs, end = "client_closed", "session closed before the BIND peer connected");
            }
        }
    }

    fn failed(&self, shared: &Shared, session: &SessionHandle, e: &SessionError) {
        session.logged();
        shared.metrics.inc(Counter::SessionsFailed);
        let failure = e.failure();
        shared.metrics.inc(failure.counter());
        let Self {
            id,
            peer,
            started,
            command,
            target,
            user,
        } = self;
        let rule = match e {
            SessionError::Blocked { rule } => Some(rule.clone()),
            _ => session.rule(),
        };
        let secs = started.elapsed().as_secs_f64();
        let (target, user) = (
            target.as_deref().unwrap_or("-"),
            user.as_deref().unwrap_or("-"),
        );
        let (rule, command) = (
            rule.as_deref().unwrap_or("-"),
            command.map_or("-", acl::Command::as_str),
        );
        let reason = failure.name();
        if failure == Failure::AuthFailed {
            tracing::warn!(session = id, client = %peer, target, user, rule, command, path = "-", up = 0u64, down = 0u64, secs, end = "failed", reason, cause = %e, "authentication failed");
        } else {
            tracing::info!(session = id, client = %peer, target, user, rule, command, path = "-", up = 0u64, down = 0u64, secs, end = "failed", reason, cause = %e, "session failed");
        }
    }
}

/// Reads until `buf` holds at least one byte more than `have`.
async fn read_more(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    read_total: &mut u64,
) -> Result<(), SessionError> {
    if buf.len() >= NEGOTIATION_BUF {
        return Err(DecodeError::Field {
            what: "message longer than any valid SOCKS message",
        }
        .into());
    }
    let mut chunk = [0u8; 1024];
    let room = (NEGOTIATION_BUF - buf.len()).min(chunk.len());
    let n = client
        .read(&mut chunk[..room])
        .await
        .map_err(io_err("reading from the client"))?;
    if n == 0 {
        return Err(SessionError::ClientClosed);
    }
    *read_total += n as u64;
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// A codec entry point: the message and how many bytes it used, or why not.
type Decoder<T> = fn(&[u8]) -> Result<(T, usize), DecodeError>;

/// Decodes one message from `buf`, reading more as needed; consumed bytes are removed from
/// `buf`, anything after the message stays.
async fn read_message<T>(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    read_total: &mut u64,
    decode: Decoder<T>,
) -> Result<T, SessionError> {
    loop {
        match decode(buf) {
            Ok((msg, used)) => {
                buf.drain(..used);
                return Ok(msg);
            }
            Err(DecodeError::Incomplete) => read_more(client, buf, read_total).await?,
            Err(e) => return Err(e.into()),
        }
    }
}

async fn write(client: &mut TcpStream, bytes: &[u8]) -> Result<(), SessionError> {
    client
        .write_all(bytes)
        .await
        .map_err(io_err("writing to the client"))
}

async fn negotiate(
    shared: &Shared,
    session: &SessionHandle,
    config: &Config,
    client: &mut TcpStream,
    peer: SocketAddr,
    restrict: Option<&[AuthMethod]>,
) -> Result<Negotiated, SessionError> {
    let mut buf = Vec::with_capacity(NEGOTIATION_BUF);
    let mut read_total = 0u64;
    while buf.is_empty() {
        read_more(client, &mut buf, &mut read_total).await?;
    }
    match buf[0] {
        4 => negotiate_v4(client, buf, read_total).await,
        5 => {
            negotiate_v5(
                shared, session, config, client, peer, restrict, buf, read_total,
            )
            .await
        }
        found => Err(DecodeError::Version { found }.into()),
    }
}

async fn negotiate_v4(
    client: &mut TcpStream,
    mut buf: Vec<u8>,
    mut read_total: u64,
) -> Result<Negotiated, SessionError> {
    let req = match read_message(client, &mut buf, &mut read_total, Socks4Request::decode).await {
        Ok(r) => r,
        Err(SessionError::Decode(e)) => {
            if e.socks4_reply().is_some() {
                let _ = Replier { version: 4 }
                    .send(client, Reply::GeneralFailure, unspecified())
                    .await;
            }
            return Err(SessionError::Decode(e));
        }
        Err(e) => return Err(e),
    };
    let Socks4Request {
        command,
        address,
        user_id,
    } = req;
    let command = match command {
        Socks4Command::Connect => acl::Command::Connect,
        Socks4Command::Bind => acl::Command::Bind,
    };
    // The SOCKS4 USERID is unauthenticated; rules may still match on it, as in Dante.
    let user = (!user_id.is_empty()).then(|| String::from_utf8_lossy(&user_id).into_owned());
    Ok(Negotiated {
        version: 4,
        user,
        command,
        address,
        leftover: pipelined(buf),
        read_total,
    })
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the negotiation state is passed along as is"
)]
async fn negotiate_v5(
    shared: &Shared,
    session: &SessionHandle,
    config: &Config,
    client: &mut TcpStream,
    peer: SocketAddr,
    restrict: Option<&[AuthMethod]>,
    mut buf: Vec<u8>,
    mut read_total: u64,
) -> Result<Negotiated, SessionError> {
    let greeting: Greeting =
        read_message(client, &mut buf, &mut read_total, Greeting::decode).await?;
    // Server preference order, narrowed by the client rule, intersected with what was offered.
    let chosen = config
        .auth
        .methods
        .iter()
        .copied()
        .filter(|m| restrict.is_none_or(|r| r.contains(m)))
        .find(|m| greeting.methods.contains(&wire_method(*m)));
    let Some(chosen) = chosen else {
        write(
            client,
            &encode(&MethodSelection {
                method: Method::NoAcceptable,
            }),
        )
        .await?;
        return Err(SessionError::NoAcceptableMethod);
    };
    write(
        client,
        &encode(&MethodSelection {
            method: wire_method(chosen),
        }),
    )
    .await?;

    let user = match chosen {
        AuthMethod::None => None,
        AuthMethod::Username => {
            session.set_state(State::Authenticating);
            let user =
                authenticate(shared, config, client, peer, &mut buf, &mut read_total).await?;
            session.set_state(State::Negotiating);
            Some(user)
        }
    };

    let request = match read_message(client, &mut buf, &mut read_total, Request::decode).await {
        Ok(r) => r,
        Err(SessionError::Decode(e)) => {
            if let Some(reply) = e.reply() {
                let _ = Replier { version: 5 }
                    .send(client, reply, unspecified())
                    .await;
            }
            return Err(SessionError::Decode(e));
        }
        Err(e) => return Err(e),
    };
    let Request { command, address } = request;
    let command = match command {
        Command::Connect => acl::Command::Connect,
        Command::Bind => acl::Command::Bind,
        Command::UdpAssociate => acl::Command::UdpAssociate,
    };
    Ok(Negotiated {
        version: 5,
        user,
        command,
        address,
        leftover: pipelined(buf),
        read_total,
    })
}

fn wire_method(m: AuthMethod) -> Method {
    match m {
        AuthMethod::None => Method::NoAuth,
        AuthMethod::Username => Method::UserPass,
    }
}

fn encode(m: &MethodSelection) -> [u8; 2] {
    let mut out = Vec::with_capacity(2);
    m.encode(&mut out);
    [out[0], out[1]]
}

/// RFC 1929. Repeated failures from one address are slowed down before the check.
async fn authenticate(
    shared: &Shared,
    config: &Config,
    client: &mut TcpStream,
    peer: SocketAddr,
    buf: &mut Vec<u8>,
    read_total: &mut u64,
) -> Result<String, SessionError> {
    let req: UserPassRequest =
        read_message(client, buf, read_total, UserPassRequest::decode).await?;
    let delay = shared.auth_failures.delay(peer.ip(), Instant::now());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let user = String::from_utf8_lossy(&req.username).into_owned();
    let ok = match &config.auth.users {
        Some(db) => {
            let db = db.clone();
            let UserPassRequest { username, password } = req;
            tokio::task::spawn_blocking(move || db.verify(&username, &password))
                .await
                .unwrap_or(false)
        }
        None => false,
    };
    let mut out = Vec::with_capacity(2);
    if ok {
        UserPassResponse::SUCCESS.encode(&mut out);
        write(client, &out).await?;
        shared.auth_failures.succeeded(peer.ip());
        shared.metrics.inc(Counter::AuthSuccesses);
        Ok(user)
    } else {
        UserPassResponse::FAILURE.encode(&mut out);
        let _ = write(client, &out).await;
        shared.auth_failures.failed(peer.ip(), Instant::now());
        shared.metrics.inc(Counter::AuthFailures);
        Err(SessionError::AuthFailed { user })
    }
}

/// Applies the rules to the request. For a domain, the name is checked first, then every
/// resolved address; only addresses that pass are returned. The resolution must end by
/// `deadline` (a resolver that never answers would otherwise hold the client for as long as the
/// system resolver's own retries last).
async fn authorize(
    shared: &Shared,
    session: &SessionHandle,
    config: &Config,
    peer: SocketAddr,
    n: &Negotiated,
    deadline: tokio::time::Instant,
) -> Result<Vec<SocketAddr>, (Reply, SessionError)> {
    let info = |dest| RequestInfo {
        client: peer.ip().to_canonical(),
        user: n.user.as_deref(),
        command: n.command,
        version: n.version,
        dest,
    };
    let blocked = |shared: &Shared, verdict: &acl::Verdict<'_>| {
        shared.metrics.inc(Counter::RequestsBlocked);
        (
            Reply::NotAllowed,
            SessionError::Blocked {
                rule: verdict.rule.to_owned(),
            },
        )
    };
    let log = |verdict: &acl::Verdict<'_>, what: &dyn std::fmt::Display| {
        if verdict.log {
            tracing::info!(client = %peer, target = %what, rule = verdict.rule, action = ?verdict.action, "rule matched");
        }
    };
    match &n.address {
        Address::Ip(a) => {
            let v = config
                .rules
                .check_request(&info(Dest::Ip(a.ip().to_canonical(), a.port())));
            log(&v, a);
            if v.action == Action::Block {
                return Err(blocked(shared, &v));
            }
            session.set_rule(v.rule);
            Ok(vec![*a])
        }
        Address::Domain(host, port) => {
            if let Some(v) = config.rules.check_name(&info(Dest::Name(host, *port))) {
                log(&v, &n.address);
                if v.action == Action::Block {
                    return Err(blocked(shared, &v));
                }
            }
            session.set_state(State::Resolving);
            let t0 = Instant::now();
            let lookup = timeout_at(deadline, shared.names.lookup(host)).await;
            shared
                .metrics
                .observe(proxy_common::metrics::DNS_LATENCY, t0.elapsed());
            let resolved: Vec<SocketAddr> = match lookup {
                Ok(Ok(ips)) => ips.iter().map(|&ip| SocketAddr::new(ip, *port)).collect(),
                failed => {
                    let reason = match failed {
                        Ok(Err(e)) => format!("cannot resolve {host}: {e}"),
                        _ => format!(
                            "resolving {host} timed out (timeouts.connect, {:?})",
                            config.timeouts.connect
                        ),
                    };
                    let failure = Failure::ResolveFailed;
                    return Err((
                        Reply::HostUnreachable,
                        SessionError::Refused {
                            reply: Reply::HostUnreachable,
                            reason,
                            failure,
                        },
                    ));
                }
            };
            let mut allowed = Vec::with_capacity(resolved.len());
            let mut first_block = None;
            for a in resolved {
                let v = config.rules.check_request(&info(Dest::Resolved(
                    host,
                    a.ip().to_canonical(),
                    a.port(),
                )));
                log(&v, &a);
                match v.action {
                    Action::Pass => {
                        if allowed.is_empty() {
                            session.set_rule(v.rule);
                        }
                        allowed.push(a);
                    }
                    Action::Block => {
                        first_block.get_or_insert(v.rule.to_owned());
                    }
                }
            }
            if allowed.is_empty() {
                let rule = first_block.unwrap_or_else(|| "default".to_owned());
                shared.metrics.inc(Counter::RequestsBlocked);
                return Err((Reply::NotAllowed, SessionError::Blocked { rule }));
            }
            Ok(allowed)
        }
    }
}

/// Serves an authorised request. Returns the relay outcome for CONNECT and BIND, None for UDP.
async fn serve(
    shared: &Shared,
    session: &SessionHandle,
    config: &Config,
    mut client: TcpStream,
    peer: SocketAddr,
    n: Negotiated,
) -> Result<Next, SessionError> {
    let replier = Replier { version: n.version };
    // `timeouts.connect` bounds resolving the target's name and connecting to it, together.
    let deadline = tokio::time::Instant::now() + config.timeouts.connect;
    let targets = match Box::pin(authorize(shared, session, config, peer, &n, deadline)).await {
        Ok(t) => t,
        Err((reply, e)) => return replier.refuse(&mut client, reply, e).await,
    };
    // The client socket has TCP_NODELAY from its listener (`bind`).
    let upstream = match n.command {
        acl::Command::Connect => {
            session.set_state(State::Connecting);
            let t0 = Instant::now();
            let upstream = match timeout_at(deadline, Box::pin(connect(config, &targets))).await {
                Ok(Ok(s)) => {
                    shared
                        .metrics
                        .observe(proxy_common::metrics::CONNECT_LATENCY, t0.elapsed());
                    s
                }
                Ok(Err(e)) => {
                    let reply = reply_for(&e);
                    let reason = format!("connect to {}: {e}", n.address);
                    return replier
                        .refuse(&mut client, reply, refused(reply, reason))
                        .await;
                }
                Err(_) => {
                    let reason = format!("connect to {} timed out", n.address);
                    let err = SessionError::Refused {
                        reply: Reply::TtlExpired,
                        reason,
                        failure: Failure::ConnectTimeout,
                    };
                    return replier.refuse(&mut client, Reply::TtlExpired, err).await;
                }
            };
            let bound = upstream
                .local_addr()
                .map_err(io_err("reading the outbound address"))?;
            replier.send(&mut client, Reply::Succeeded, bound).await?;
            upstream
        }
        acl::Command::Bind => {
            match Box::pin(bind(
                shared,
                session,
                config,
                &mut client,
                replier,
                &targets,
            ))
            .await?
            {
                Some(s) => s,
                None => return Ok(Next::Served(Served::BindAbandoned)),
            }
        }
        acl::Command::UdpAssociate => {
            session.set_state(State::Udp);
            return Box::pin(udp_associate(
                shared,
                session,
                config,
                &mut client,
                peer,
                &n,
            ))
            .await
            .map(|u| Next::Served(Served::Udp(u)));
        }
    };
    let _ = upstream.set_nodelay(true);
    pace(config, n.user.as_deref(), &client, &upstream);
    // Payload the client pipelined behind its request goes first, before the relay starts.
    let mut upstream = upstream;
    if !n.leftover.is_empty() {
        upstream
            .write_all(&n.leftover)
            .await
            .map_err(io_err("writing pipelined bytes to the target"))?;
    }
    let consumed = Consumed {
        from_client: n.read_total,
        forwarded: n.leftover.len() as u64,
        ..Consumed::default()
    };
    Ok(Next::Relay(Box::new(Ready {
        client,
        upstream,
        consumed,
    })))
}

/// Bandwidth limits as socket pacing (SO_MAX_PACING_RATE): enforced by TCP itself, so spliced
/// sessions stay in the kernel.
fn pace(config: &Config, user: Option<&str>, client: &TcpStream, upstream: &TcpStream) {
    let rate = user
        .and_then(|u| config.limits.user_bandwidth.get(u).copied())
        .unwrap_or(config.limits.bandwidth);
    if rate == 0 {
        return;
    }
    let rate = libc::c_int::try_from(rate).unwrap_or(libc::c_int::MAX);
    // Client-bound bytes leave through the client socket, target-bound ones through the upstream.
    for s in [client.as_fd(), upstream.as_fd()] {
        if let Err(e) = sys::setsockopt_int(s, libc::SOL_SOCKET, libc::SO_MAX_PACING_RATE, rate) {
            tracing::warn!(cause = %e, "cannot set the pacing rate");
        }
    }
}

/// What an [`outgoing_socket`] is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outbound {
    /// A connection to a target: its port is chosen at `connect`, for the whole 4-tuple.
    Connect,
    /// A BIND listener: its port is chosen at `bind`.
    Listen,
}

/// A socket for an outgoing connection or BIND listener, bound per `[outgoing]`.
///
/// A connection bound to a source address defers its port to `connect`
/// (`IP_BIND_ADDRESS_NO_PORT`). A port chosen at `bind` must be free of every other socket on
/// that address, TIME_WAIT ones included, whatever their peer: the daemon could then hold no
/// more connections at once than `ip_local_port_range` has ports, and would fail sessions with
/// `EADDRINUSE` once a few seconds of short sessions fill the range with TIME_WAIT. Chosen at
/// `connect`, a port only needs to be free towards that one target.
fn outgoing_socket(config: &Config, target: &SocketAddr, role: Outbound) -> io::Result<TcpSocket> {
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ifname) = &config.outgoing.interface {
        sys::bind_to_device(sock.as_fd(), ifname)?;
    }
    let source: Option<IpAddr> = match target {
        SocketAddr::V4(_) => config.outgoing.ipv4.map(IpAddr::V4),
        SocketAddr::V6(_) => config.outgoing.ipv6.map(IpAddr::V6),
    };
    if let Some(ip) = source {
        if role == Outbound::Connect {
            // Linux 4.2+; without it the port is chosen at bind as before.
            let _ = sys::setsockopt_int(
                sock.as_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                1,
            );
        }
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    Ok(sock)
}

/// RFC 8305's Connection Attempt Delay: how long an attempt to one address runs alone before
/// the next address is tried beside it.
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Connects to the first target that accepts, Happy Eyeballs style (RFC 8305): the addresses
/// in resolver order with the families alternating, a new attempt every [`ATTEMPT_DELAY`] or
/// as soon as one fails, the first to connect wins and the others are dropped. An address that
/// does not answer at all (an IPv6 route that blackholes, a filtered host) then costs a quarter
/// of a second instead of the whole connect timeout. Fails with the last error when every
/// address has failed.
async fn connect(config: &Config, targets: &[SocketAddr]) -> io::Result<TcpStream> {
    use std::{future::Future, pin::Pin, task::Poll};
    if let [t] = targets {
        // One address (a literal, or a name with one): no race to run.
        return outgoing_socket(config, t, Outbound::Connect)?
            .connect(*t)
            .await;
    }
    type Attempt<'a> = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>>;
    let attempt = |t: SocketAddr| -> Attempt<'_> {
        Box::pin(async move {
            outgoing_socket(config, &t, Outbound::Connect)?
                .connect(t)
                .await
        })
    };
    let mut rest = interleave_families(targets).into_iter();
    let mut pending: Vec<Attempt<'_>> = Vec::new();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    let mut delay = Box::pin(tokio::time::sleep(ATTEMPT_DELAY));
    let mut start_next = true;
    loop {
        if std::mem::take(&mut start_next) {
            if let Some(t) = rest.next() {
                pending.push(attempt(t));
                delay
                    .as_mut()
                    .reset(tokio::time::Instant::now() + ATTEMPT_DELAY);
            }
        }
        if pending.is_empty() {
            return Err(last);
        }
        let more = rest.len() > 0;
        let event = std::future::poll_fn(|cx| {
            for (i, a) in pending.iter_mut().enumerate() {
                if let Poll::Ready(r) = a.as_mut().poll(cx) {
                    return Poll::Ready(Some((i, r)));
                }
            }
            if more && delay.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match event {
            Some((_, Ok(s))) => return Ok(s),
            // A failed attempt lets the next address start at once.
            Some((i, Err(e))) => {
                drop(pending.swap_remove(i));
                last = e;
                start_next = true;
            }
            // The delay ran out: the next address starts beside the running attempts.
            None => start_next = true,
        }
    }
}

/// The addresses in resolver order, the families alternating from the first address's family
/// on (RFC 8305, section 4).
fn interleave_families(targets: &[SocketAddr]) -> Vec<SocketAddr> {
    let Some(first) = targets.first() else {
        return Vec::new();
    };
    let (mut same, mut other): (std::collections::VecDeque<_>, std::collections::VecDeque<_>) =
        targets
            .iter()
            .copied()
            .partition(|t| t.is_ipv4() == first.is_ipv4());
    let mut out = Vec::with_capacity(targets.len());
    while !same.is_empty() || !other.is_empty() {
        out.extend(same.pop_front());
        out.extend(other.pop_front());
    }
    out
}

/// RFC 1928 BIND: listen, tell the client where, wait for the expected peer, tell the client
/// who connected. Returns the accepted connection, or None when the client went away.
async fn bind(
    shared: &Shared,
    session: &SessionHandle,
    config: &Config,
    client: &mut TcpStream,
    replier: Replier,
    expected: &[SocketAddr],
) -> Result<Option<TcpStream>, SessionError> {
    let Some(first) = expected.first() else {
        return replier
            .refuse(client, Reply::GeneralFailure, SessionError::ClientClosed)
            .await;
    };
    // Listen on the address the target will reach us by: the configured outgoing address, else
    // the source address routing picks towards the expected peer.
    let local_ip = match first {
        SocketAddr::V4(_) => config.outgoing.ipv4.map(IpAddr::V4),
        SocketAddr::V6(_) => config.outgoing.ipv6.map(IpAddr::V6),
    }
    .or_else(|| sys::route_source(*first).ok())
    .unwrap_or_else(|| {
        client
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::from([0, 0, 0, 0]))
    });
    let listener = match outgoing_socket(config, first, Outbound::Listen).and_then(|s| {
        s.set_reuseaddr(true)?;
        if config.outgoing.ipv4.is_none() && config.outgoing.ipv6.is_none() {
            s.bind(SocketAddr::new(local_ip, 0))?;
        }
        s.listen(1)
    }) {
        Ok(l) => l,
        Err(e) => {
            let reply = reply_for(&e);
            return replier
                .refuse(client, reply, refused(reply, format!("BIND listen: {e}")))
                .await;
        }
    };
    let bound = listener
        .local_addr()
        .map_err(io_err("reading the BIND address"))?;
    shared.metrics.inc(Counter::BindsTotal);
    replier.send(client, Reply::Succeeded, bound).await?;
    session.set_state(State::BindWaiting);

    let wait = accept_expected(&listener, expected);
    let accepted = tokio::select! {
        r = timeout(config.timeouts.bind, wait) => r,
        // The client closing its connection abandons the BIND.
        () = closed(client) => return Ok(None),
    };
    let (stream, from) = match accepted {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            return replier
                .refuse(
                    client,
                    Reply::GeneralFailure,
                    SessionError::Io {
                        context: "BIND accept",
                        source: e,
                    },
                )
                .await
        }
        Err(_) => {
            let reason = "no connection before timeouts.bind".to_owned();
            let err = SessionError::Refused {
                reply: Reply::TtlExpired,
                reason,
                failure: Failure::BindTimeout,
            };
            return replier.refuse(client, Reply::TtlExpired, err).await;
        }
    };
    replier.send(client, Reply::Succeeded, from).await?;
    Ok(Some(stream))
}

/// Resolves when the client closes (or resets) its connection; never when it merely sends.
async fn closed(client: &TcpStream) {
    let mut b = [0u8; 1];
    match client.peek(&mut b).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Accepts connections until one comes from an expected address (Dante checks the peer's
/// address against the request's; an unspecified request address accepts anyone).
async fn accept_expected(
    listener: &TcpListener,
    expected: &[SocketAddr],
) -> io::Result<(TcpStream, SocketAddr)> {
    loop {
        let (s, from) = listener.accept().await?;
        let ok = expected
            .iter()
            .any(|e| e.ip().is_unspecified() || e.ip().to_canonical() == from.ip().to_canonical());
        if ok {
            return Ok((s, from));
        }
        tracing::info!(from = %from, "BIND: connection from an unexpected address refused");
    }
}

async fn udp_associate(
    shared: &Shared,
    session: &SessionHandle,
    config: &Config,
    client: &mut TcpStream,
    peer: SocketAddr,
    n: &Negotiated,
) -> Result<udp::UdpOutcome, SessionError> {
    let rules = config.rules.clone();
    let user = n.user.clone();
    let client_ip = peer.ip().to_canonical();
    let check = move |dest: Dest<'_>| {
        let info = RequestInfo {
            client: client_ip,
            user: user.as_deref(),
            command: acl::Command::UdpAssociate,
            version: 5,
            dest,
        };
        rules.check_request(&info).action == Action::Pass
    };
    let rules2 = config.rules.clone();
    let user2 = n.user.clone();
    let check_name = move |host: &str, port: u16| {
        let info = RequestInfo {
            client: client_ip,
            user: user2.as_deref(),
            command: acl::Command::UdpAssociate,
            version: 5,
            dest: Dest::Name(host, port),
        };
        rules2
            .check_name(&info)
            .is_none_or(|v| v.action == Action::Pass)
    };
    let allow = move |a: SocketAddr| check(Dest::Ip(a.ip().to_canonical(), a.port()));
    let bytes = Arc::new(crate::registry::ByteCounters::default());
    session.counting(bytes.clone());
    let policy = udp::UdpPolicy {
        metrics: &shared.metrics,
        allow: &allow,
        allow_name: &check_name,
        idle: config.timeouts.udp_idle,
        xdp: shared.xdp.as_ref(),
        offload: config.udp.offload,
        names: &shared.names,
        bytes: &bytes,
    };
    udp::associate(client, &n.address, &policy)
        .await
        .map_err(|e| SessionError::Io {
            context: "UDP association",
            source: e,
        })
}

/// The RFC 1928 reply code for a connect error.
pub fn reply_for(e: &io::Error) -> Reply {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => Reply::ConnectionRefused,
        Some(libc::ENETUNREACH) => Reply::NetworkUnreachable,
        Some(libc::EHOSTUNREACH) | Some(libc::EHOSTDOWN) => Reply::HostUnreachable,
        Some(libc::ETIMEDOUT) => Reply::TtlExpired,
        Some(libc::EACCES) | Some(libc::EPERM) => Reply::NotAllowed,
        _ => Reply::GeneralFailure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_alternate_families_from_the_first_one_on() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let got = super::interleave_families(&[
            a("[2001:db8::1]:80"),
            a("[2001:db8::2]:80"),
            a("[2001:db8::3]:80"),
            a("192.0.2.1:80"),
            a("192.0.2.2:80"),
        ]);
        assert_eq!(
            got,
            [
                a("[2001:db8::1]:80"),
                a("192.0.2.1:80"),
                a("[2001:db8::2]:80"),
                a("192.0.2.2:80"),
                a("[2001:db8::3]:80"),
            ]
        );
        let v4 = [a("192.0.2.1:80"), a("192.0.2.2:80"), a("[2001:db8::1]:80")];
        assert_eq!(
            super::interleave_families(&v4),
            [a("192.0.2.1:80"), a("[2001:db8::1]:80"), a("192.0.2.2:80")]
        );
        assert!(super::interleave_families(&[]).is_empty());
    }

    #[test]
    fn connect_errors_map_to_reply_codes() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(reply_for(&e(libc::ECONNREFUSED)), Reply::ConnectionRefused);
        assert_eq!(reply_for(&e(libc::ENETUNREACH)), Reply::NetworkUnreachable);
        assert_eq!(reply_for(&e(libc::EHOSTUNREACH)), Reply::HostUnreachable);
        assert_eq!(reply_for(&e(libc::ETIMEDOUT)), Reply::TtlExpired);
        assert_eq!(reply_for(&e(libc::EIO)), Reply::GeneralFailure);
    }
}
