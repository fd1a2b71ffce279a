//! One client connection: SOCKS5 negotiation, the CONNECT to the target, then the relay.

use std::{
    io,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use proxy_common::metrics::Counter;
use proxy_socks5::{Address, Command, DecodeError, Greeting, Method, MethodSelection, Reply, Request, Response};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout,
};

use crate::{
    relay::{self, Consumed, End},
    Shared,
};

/// Upper bound on what the daemon buffers from a client before the relay starts. A greeting
/// and a request fit in well under 600 bytes; pipelined payload beyond this stays in the
/// socket's receive queue, where the relay picks it up.
const NEGOTIATION_BUF: usize = 4096;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

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
    /// The request could not be served; the reply code was sent.
    #[error("request refused with reply {reply:?}: {reason}")]
    Refused {
        /// The reply sent.
        reply: Reply,
        /// What happened.
        reason: String,
    },
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> SessionError {
    move |source| SessionError::Io { context, source }
}

/// Runs one client connection to completion. Never panics on network input.
pub async fn handle(shared: &Shared, mut client: TcpStream, peer: SocketAddr) {
    let id = NEXT_SESSION.fetch_add(1, Relaxed);
    let started = Instant::now();
    let negotiated = match timeout(shared.config.timeouts.negotiation, negotiate(&mut client)).await {
        Ok(r) => r,
        Err(_) => {
            shared.metrics.inc(Counter::NegotiationTimeouts);
            Err(SessionError::NegotiationTimeout)
        }
    };
    let (request, leftover, consumed) = match negotiated {
        Ok(n) => n,
        Err(e) => {
            fail(shared, id, peer, None, &e);
            return;
        }
    };
    let target = request.address.clone();
    let upstream = match serve(shared, &mut client, request, &leftover).await {
        Ok(u) => u,
        Err(e) => {
            fail(shared, id, peer, Some(&target), &e);
            return;
        }
    };
    let consumed = Consumed { from_client: consumed, forwarded: leftover.len() as u64 };
    let outcome = relay::relay(shared, id, client, upstream, consumed).await;
    let up = outcome.up;
    let path = outcome.path.name();
    let secs = started.elapsed().as_secs_f64();
    match outcome.end {
        End::Eof | End::Shutdown => {
            tracing::info!(session = id, client = %peer, target = %target, path, up, down = outcome.down, secs, "session closed");
        }
        End::Error(e) => {
            tracing::info!(session = id, client = %peer, target = %target, path, up, down = outcome.down, secs, cause = %e, "session reset");
        }
    }
}

fn fail(shared: &Shared, id: u64, peer: SocketAddr, target: Option<&Address>, e: &SessionError) {
    shared.metrics.inc(Counter::SessionsFailed);
    match target {
        Some(t) => tracing::info!(session = id, client = %peer, target = %t, cause = %e, "session failed"),
        None => tracing::debug!(session = id, client = %peer, cause = %e, "session failed"),
    }
}

/// Reads greeting and request. Returns the request, payload bytes the client pipelined behind
/// it, and how many bytes were read from the client in all.
async fn negotiate(client: &mut TcpStream) -> Result<(Request, Vec<u8>, u64), SessionError> {
    let mut buf = Vec::with_capacity(NEGOTIATION_BUF);
    let mut read_total = 0u64;

    let greeting: Greeting = read_message(client, &mut buf, &mut read_total, Greeting::decode).await?;
    if !greeting.methods.contains(&Method::NoAuth) {
        send(client, &MethodSelection { method: Method::NoAcceptable }).await?;
        return Err(SessionError::NoAcceptableMethod);
    }
    send(client, &MethodSelection { method: Method::NoAuth }).await?;

    let request = match read_message(client, &mut buf, &mut read_total, Request::decode).await {
        Ok(r) => r,
        Err(SessionError::Decode(e)) => {
            if let Some(reply) = e.reply() {
                let _ = send(client, &Response { reply, address: Address::UNSPECIFIED }).await;
            }
            return Err(SessionError::Decode(e));
        }
        Err(e) => return Err(e),
    };
    Ok((request, buf, read_total))
}

/// Decodes one message from `buf`, reading more as needed; consumed bytes are removed from
/// `buf`, anything after the message stays.
async fn read_message<T>(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    read_total: &mut u64,
    decode: fn(&[u8]) -> Result<(T, usize), DecodeError>,
) -> Result<T, SessionError> {
    loop {
        match decode(buf) {
            Ok((msg, used)) => {
                buf.drain(..used);
                return Ok(msg);
            }
            Err(DecodeError::Incomplete) => {}
            Err(e) => return Err(e.into()),
        }
        if buf.len() >= NEGOTIATION_BUF {
            return Err(DecodeError::Field { what: "message longer than any valid SOCKS message" }.into());
        }
        let mut chunk = [0u8; 1024];
        let room = (NEGOTIATION_BUF - buf.len()).min(chunk.len());
        let n = client.read(&mut chunk[..room]).await.map_err(io_err("reading from the client"))?;
        if n == 0 {
            return Err(SessionError::ClientClosed);
        }
        *read_total += n as u64;
        buf.extend_from_slice(&chunk[..n]);
    }
}

trait Encode {
    fn encode_to(&self, dst: &mut Vec<u8>);
}

macro_rules! impl_encode {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            fn encode_to(&self, dst: &mut Vec<u8>) {
                self.encode(dst);
            }
        }
    )*};
}
impl_encode!(MethodSelection, Response);

async fn send(client: &mut TcpStream, msg: &impl Encode) -> Result<(), SessionError> {
    let mut out = Vec::with_capacity(64);
    msg.encode_to(&mut out);
    client.write_all(&out).await.map_err(io_err("writing to the client"))
}

/// Serves the request: connects and sends the success reply, or sends the failure reply.
async fn serve(shared: &Shared, client: &mut TcpStream, request: Request, leftover: &[u8]) -> Result<TcpStream, SessionError> {
    let Request { command, address } = request;
    if command != Command::Connect {
        return refuse(client, Reply::CommandNotSupported, format!("{command:?} is not supported")).await;
    }
    let upstream = match timeout(shared.config.timeouts.connect, connect(&address)).await {
        Ok(Ok(s)) => s,
        Ok(Err((reply, reason))) => return refuse(client, reply, reason).await,
        Err(_) => return refuse(client, Reply::TtlExpired, "connect timed out".to_owned()).await,
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let bound = upstream.local_addr().map_err(io_err("reading the outbound address"))?;
    send(client, &Response { reply: Reply::Succeeded, address: Address::Ip(bound) }).await?;
    // Payload the client pipelined behind its request goes first, before the relay starts.
    let mut upstream = upstream;
    if !leftover.is_empty() {
        upstream.write_all(leftover).await.map_err(io_err("writing pipelined bytes to the target"))?;
    }
    Ok(upstream)
}

async fn refuse<T>(client: &mut TcpStream, reply: Reply, reason: String) -> Result<T, SessionError> {
    let _ = send(client, &Response { reply, address: Address::UNSPECIFIED }).await;
    Err(SessionError::Refused { reply, reason })
}

/// Resolves (for a domain) and connects, trying every address in turn.
async fn connect(address: &Address) -> Result<TcpStream, (Reply, String)> {
    let addrs: Vec<SocketAddr> = match address {
        Address::Ip(a) => vec![*a],
        Address::Domain(host, port) => match tokio::net::lookup_host((host.as_str(), *port)).await {
            Ok(it) => it.collect(),
            Err(e) => return Err((Reply::HostUnreachable, format!("cannot resolve {host}: {e}"))),
        },
    };
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let Some(e) = last else {
        return Err((Reply::HostUnreachable, format!("{address} has no addresses")));
    };
    Err((reply_for(&e), format!("connect to {address}: {e}")))
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

/// How long a refused client waits before the next accept after an accept error.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;

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
