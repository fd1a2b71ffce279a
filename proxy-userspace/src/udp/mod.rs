//! UDP ASSOCIATE (RFC 1928 section 7): the userspace relay between a SOCKS client and the UDP
//! targets it names, one relay socket per association.
//!
//! ```text
//!  client --[RSV FRAG ATYP DST.ADDR DST.PORT | DATA]--> relay socket --[DATA]--> target
//!  client <--[RSV FRAG ATYP SRC.ADDR SRC.PORT | DATA]-- relay socket <--[DATA]-- target
//! ```
//!
//! The rules follow Dante:
//!
//! - Client datagrams are taken only from the control connection's peer IP. A non-zero
//!   DST.PORT in the request fixes the client's port (when DST.ADDR is zero or that same IP);
//!   otherwise the first datagram from that IP fixes it. A non-zero DST.ADDR other than the
//!   peer's is what a client behind NAT reports about itself, so it is ignored rather than
//!   allowed to make every datagram foreign.
//! - A datagram from any other source goes to the client only if the client has sent to that
//!   address (the last 4,096 of them); anything else is dropped as foreign.
//! - FRAG != 0 is dropped (no reassembly), as RFC 1928 allows.
//! - Names are resolved off the relay path, cached per association (60 s; failures 5 s), and
//!   datagrams for a name being resolved wait in a small bounded queue. What overflows it
//!   counts as blocked, like a name that does not resolve.
//!
//! Every datagram the relay refuses is counted under one `UdpDropped*` counter; relayed payload
//! goes to the UDP relay traffic slots. A datagram the kernel refuses to send (unreachable
//! network, over the path's size limit) is logged at debug level only.
//!
//! The socket is read and written in batches: one recvmmsg(2) takes up to 32 datagrams, and
//! what is to be relayed leaves in one sendmmsg(2), each payload sent from the buffer it was
//! received into.

mod batch;
mod table;
pub mod xdp;

use std::{io, net::SocketAddr, os::fd::AsFd as _, time::Duration};

use proxy_common::metrics::{Counter, Direction};
use proxy_socks5::{Address, Reply, Response, UdpHeader};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::{TcpStream, UdpSocket},
    time::Instant,
};

use self::{
    batch::{RecvBatch, SendBatch},
    table::{key, Cached, Resolved, Resolver, Targets},
};
use crate::metrics::Metrics;

/// What the rules allow an association to do, supplied by the session that accepted the
/// request, so the relay applies the same rules as CONNECT without knowing their form.
pub struct UdpPolicy<'a> {
    /// The daemon's counters.
    pub metrics: &'a Metrics,
    /// Destination check for literal addresses (the rules); false => drop the datagram, count
    /// `UdpDroppedBlocked`. Called with IPv4-mapped IPv6 addresses already turned into IPv4, so
    /// IPv4 rules cannot be dodged by writing the address the other way.
    pub allow: &'a (dyn Fn(SocketAddr) -> bool + Send + Sync),
    /// Name check before resolution; false => drop. Resolved addresses then go through
    /// `allow`.
    pub allow_name: &'a (dyn Fn(&str, u16) -> bool + Send + Sync),
    /// The association ends after this long without a datagram in either direction.
    pub idle: Duration,
    /// The XDP fast path, when attached: early drops, and offload when `offload` is set.
    pub xdp: Option<&'a xdp::XdpPlane>,
    /// Whether flows to literal addresses are handed to XDP (`udp.offload`).
    pub offload: bool,
    /// The daemon's resolver, for domain destinations.
    pub names: &'a crate::resolve::Names,
    /// Payload bytes the relay socket moved so far, for `ebsocks sessions` (what XDP forwards
    /// is added to the outcome at the end).
    pub bytes: &'a crate::registry::ByteCounters,
}

/// How an association went, for the session's log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpOutcome {
    /// The relay socket's address, as sent to the client in BND.ADDR/BND.PORT.
    pub relay_addr: SocketAddr,
    /// Datagrams relayed from the client to targets (by the relay socket or by XDP).
    pub up_datagrams: u64,
    /// Payload bytes (SOCKS header excluded) relayed from the client to targets.
    pub up_bytes: u64,
    /// Datagrams relayed from targets to the client.
    pub down_datagrams: u64,
    /// Payload bytes (SOCKS header excluded) relayed from targets to the client.
    pub down_bytes: u64,
    /// Why it ended: [`END_CONTROL_CLOSED`], [`END_IDLE`] or [`END_ERROR`].
    pub end: &'static str,
}

/// [`UdpOutcome::end`] when the client closed the control connection (or it failed): RFC 1928
/// ties the association's life to it.
pub const END_CONTROL_CLOSED: &str = "control closed";
/// [`UdpOutcome::end`] when no datagram moved for [`UdpPolicy::idle`].
pub const END_IDLE: &str = "idle";
/// [`UdpOutcome::end`] when the relay socket failed.
pub const END_ERROR: &str = "error";

/// Serves an accepted, authorised UDP ASSOCIATE request to completion.
///
/// Binds the relay socket on the control connection's local IP (port 0), sends the SOCKS5
/// success reply on `control` with BND = relay socket address, then relays until the control
/// connection closes (EOF/error on a read of `control`; any bytes the client sends on it are
/// ignored) or the association is idle.
///
/// An IPv6 control connection gets a dual-stack socket (bound to `[::]`) that reaches IPv4 and
/// IPv6 targets; an IPv4 one gets an IPv4 socket on that address, and datagrams for IPv6
/// targets are then dropped and counted as blocked. (Replies on the dual-stack socket leave
/// from the address the routing table picks, which on a host with several IPv6 addresses on
/// one path need not be the one the client sent to.)
///
/// `requested` is the request's DST.ADDR/DST.PORT: the address the client says it will send
/// from (see the module docs for how it is used).
///
/// # Errors
///
/// Only before relaying starts: reading the control connection's addresses, binding the relay
/// socket or mapping its buffers (nothing was written to `control`; the caller should send a
/// failure reply), or writing the reply. Once relaying, a socket failure ends the association
/// with [`END_ERROR`] in an `Ok` outcome, so the counts are not lost.
///
/// Dropping the future ends the association at once (for daemon shutdown): the socket closes,
/// pending name lookups are abandoned, and the gauge goes down.
pub async fn associate(
    control: &mut TcpStream,
    requested: &Address,
    policy: &UdpPolicy<'_>,
) -> io::Result<UdpOutcome> {
    let local_ip = control.local_addr()?.ip().to_canonical();
    let peer_ip = control.peer_addr()?.ip().to_canonical();
    let (sock, v6) = batch::bind_relay(local_ip)?;
    let relay_addr = SocketAddr::new(local_ip, sock.local_addr()?.port());
    let rx = RecvBatch::new()?;

    // Counted from before the reply, so that a client that has the relay address always finds
    // its association in the gauge.
    let _active = Active::start(policy.metrics);
    let mut reply = Vec::with_capacity(32);
    Response {
        reply: Reply::Succeeded,
        address: Address::Ip(relay_addr),
    }
    .encode(&mut reply);
    control.write_all(&reply).await?;

    let client = Client::new(peer_ip, requested);
    let assoc_xdp = policy
        .xdp
        .and_then(|x| xdp::AssocXdp::register(x, relay_addr, peer_ip, client.port, policy.offload));
    let mut relay = Relay {
        sock,
        v6,
        policy,
        xdp: assoc_xdp,
        xdp_seen: 0,
        client,
        targets: Targets::default(),
        resolver: Resolver::new(policy.names.clone()),
        rx,
        tx: SendBatch::new(),
        totals: Totals::default(),
        last_active: Instant::now(),
    };
    let end = relay.run(control).await;
    let fast = relay
        .xdp
        .as_ref()
        .map(xdp::AssocXdp::totals)
        .unwrap_or_default();
    let Totals {
        up_datagrams,
        up_bytes,
        down_datagrams,
        down_bytes,
    } = relay.totals;
    let (up_datagrams, up_bytes, down_datagrams, down_bytes) = (
        up_datagrams + fast.up_datagrams,
        up_bytes + fast.up_bytes,
        down_datagrams + fast.down_datagrams,
        down_bytes + fast.down_bytes,
    );
    Ok(UdpOutcome {
        relay_addr,
        up_datagrams,
        up_bytes,
        down_datagrams,
        down_bytes,
        end,
    })
}

/// Keeps the association counted in `UdpAssociationsActive`, on every way out.
struct Active<'a>(&'a Metrics);

impl<'a> Active<'a> {
    fn start(metrics: &'a Metrics) -> Self {
        metrics.inc(Counter::UdpAssociationsTotal);
        metrics.inc(Counter::UdpAssociationsActive);
        Self(metrics)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.dec(Counter::UdpAssociationsActive);
    }
}

#[derive(Debug, Default)]
struct Totals {
    up_datagrams: u64,
    up_bytes: u64,
    down_datagrams: u64,
    down_bytes: u64,
}

/// Which source is the client.
#[derive(Debug)]
struct Client {
    /// The control connection's peer IP, canonical.
    ip: std::net::IpAddr,
    /// Pinned by the request or learned from the first datagram.
    port: Option<u16>,
    /// The client's address as the kernel reports it (with any IPv6 scope id), where replies
    /// go. Set by the first datagram accepted from the client.
    addr: Option<SocketAddr>,
}

impl Client {
    fn new(peer_ip: std::net::IpAddr, requested: &Address) -> Self {
        let port = match requested {
            Address::Ip(a)
                if a.port() != 0
                    && (a.ip().is_unspecified() || a.ip().to_canonical() == peer_ip) =>
            {
                Some(a.port())
            }
            _ => None,
        };
        Self {
            ip: peer_ip,
            port,
            addr: None,
        }
    }

    /// Whether a datagram from `source` (kernel form; `k` is its [`key`]) is the client's.
    fn accept(&mut self, k: SocketAddr, source: SocketAddr) -> bool {
        if k.ip() != self.ip {
            return false;
        }
        match self.port {
            Some(p) if p != k.port() => false,
            Some(_) => {
                self.addr.get_or_insert(source);
                true
            }
            None => {
                self.port = Some(k.port());
                self.addr = Some(source);
                true
            }
        }
    }
}

/// Whether the relay socket can send to `dst` at all; the rules are asked separately.
/// Unspecified addresses and port 0 are refused here: Linux delivers the first to this host.
fn sendable(dst: SocketAddr, v6_socket: bool) -> bool {
    (v6_socket || dst.is_ipv4()) && dst.port() != 0 && !dst.ip().is_unspecified()
}

/// The first resolved address the socket can reach and the rules allow.
fn choose(
    ips: &[std::net::IpAddr],
    port: u16,
    v6_socket: bool,
    policy: &UdpPolicy<'_>,
) -> Option<SocketAddr> {
    ips.iter()
        .map(|ip| SocketAddr::new(ip.to_canonical(), port))
        .find(|&a| sendable(a, v6_socket) && (policy.allow)(a))
}

struct Relay<'p, 'a> {
    sock: UdpSocket,
    /// The socket is IPv6 (dual-stack); IPv4 destinations are written IPv4-mapped.
    v6: bool,
    policy: &'p UdpPolicy<'a>,
    /// This association's entries in the XDP maps.
    xdp: Option<xdp::AssocXdp<'a>>,
    /// XDP's datagram count at the last idle check.
    xdp_seen: u64,
    client: Client,
    targets: Targets,
    resolver: Resolver,
    rx: RecvBatch,
    tx: SendBatch,
    totals: Totals,
    /// When a datagram last came from the client or a target.
    last_active: Instant,
}

impl Relay<'_, '_> {
    async fn run(&mut self, control: &mut TcpStream) -> &'static str {
        let mut scratch = [0u8; 1024];
        let idle = tokio::time::sleep(self.policy.idle);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                r = control.read(&mut scratch) => match r {
                    Ok(0) | Err(_) => return END_CONTROL_CLOSED,
                    Ok(_) => {}
                },
                () = &mut idle => {
                    // The timer is moved on lazily, here, rather than on every datagram.
                    let due = self.last_active + self.policy.idle;
                    if Instant::now() >= due {
                        // Datagrams XDP forwarded never reach the socket: they count too.
                        let fast = self.xdp.as_ref().map_or(0, xdp::AssocXdp::activity);
                        if fast == self.xdp_seen {
                            return END_IDLE;
                        }
                        self.xdp_seen = fast;
                        self.last_active = Instant::now();
                        idle.as_mut().reset(self.last_active + self.policy.idle);
                        continue;
                    }
                    idle.as_mut().reset(due);
                }
                r = self.sock.readable() => {
                    if let Err(e) = r {
                        tracing::warn!(cause = %e, "UDP relay socket failed");
                        return END_ERROR;
                    }
                    if let Err(e) = self.relay_batch().await {
                        tracing::warn!(cause = %e, "UDP relay socket failed");
                        return END_ERROR;
                    }
                }
                Some(done) = self.resolver.next(), if self.resolver.busy() => {
                    self.send_resolved(done).await;
                }
            }
        }
    }

    /// Receives one batch, sorts it and sends what is to be relayed.
    async fn relay_batch(&mut self) -> io::Result<()> {
        let n = {
            let Self { sock, rx, .. } = self;
            match sock.try_io(Interest::READABLE, || rx.recv(sock.as_fd())) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        };
        if self.sort(n) {
            self.last_active = Instant::now();
        }
        self.flush().await
    }

    /// Decides the fate of received datagrams `0..n`: queued in `tx`, held for a lookup, or
    /// dropped and counted. True if any came from the client or a target.
    fn sort(&mut self, n: usize) -> bool {
        let Self {
            v6,
            policy,
            client,
            targets,
            resolver,
            rx,
            tx,
            xdp,
            ..
        } = self;
        let (v6, metrics) = (*v6, policy.metrics);
        let now = Instant::now();
        let mut active = false;
        for i in 0..n {
            let Some(source) = rx.source(i) else { continue };
            let k = key(source);
            if client.accept(k, source) {
                active = true;
                if let Some(x) = xdp.as_mut() {
                    x.client_port(client.port);
                }
                let data = rx.data(i);
                let parsed = if rx.truncated(i) {
                    None
                } else {
                    UdpHeader::decode(data).ok()
                };
                let Some((header, header_len)) = parsed else {
                    metrics.inc(Counter::UdpDroppedMalformed);
                    continue;
                };
                if header.frag != 0 {
                    metrics.inc(Counter::UdpDroppedFrag);
                    continue;
                }
                let literal = matches!(header.address, Address::Ip(_));
                let dst = match header.address {
                    Address::Ip(a) => {
                        let a = key(a);
                        let ok = sendable(a, v6) && (policy.allow)(a);
                        if !ok {
                            if let Some(x) = xdp.as_mut() {
                                x.deny(a);
                            }
                        }
                        ok.then_some(a)
                    }
                    Address::Domain(name, port) => {
                        if !(policy.allow_name)(&name, port) {
                            None
                        } else {
                            match resolver.get(&name, now) {
                                Cached::Hit(ips) => choose(ips, port, v6, policy),
                                Cached::Failed => None,
                                Cached::Miss => {
                                    let payload =
                                        data.get(header_len..).unwrap_or_default().to_vec();
                                    if !resolver.enqueue(name, port, payload) {
                                        // Too many lookups or held datagrams: the name cannot
                                        // be resolved in time for this one.
                                        metrics.inc(Counter::UdpDroppedBlocked);
                                    }
                                    continue;
                                }
                            }
                        }
                    }
                };
                let Some(dst) = dst else {
                    metrics.inc(Counter::UdpDroppedBlocked);
                    continue;
                };
                let (new, evicted) = targets.insert(dst);
                if let Some(x) = xdp.as_mut() {
                    if new || literal {
                        x.target(dst, literal, evicted);
                    }
                }
                tx.push(dst, v6, None, rx.range_from(i, header_len), Direction::Up);
            } else if targets.contains(&k) {
                active = true;
                let Some(to) = client.addr else { continue };
                if rx.truncated(i) {
                    continue;
                }
                let header = UdpHeader {
                    frag: 0,
                    address: Address::Ip(k),
                };
                tx.push(to, v6, Some(&header), rx.range_from(i, 0), Direction::Down);
            } else {
                metrics.inc(Counter::UdpDroppedForeign);
            }
        }
        active
    }

    /// Sends everything in `tx`, waiting for room in the socket buffer when it is full. A
    /// datagram the kernel refuses (unreachable network, too large for the path, a firewall)
    /// is dropped and the rest go on.
    async fn flush(&mut self) -> io::Result<()> {
        let mut from = 0;
        while from < self.tx.len() {
            let sent = {
                let Self { sock, rx, tx, .. } = &*self;
                sock.try_io(Interest::WRITABLE, || {
                    tx.send(from, sock.as_fd(), rx.bufs())
                })
            };
            match sent {
                Ok(k) => {
                    for i in from..(from + k).min(self.tx.len()) {
                        let (dir, len) = self.tx.meta(i);
                        self.count(dir, len);
                    }
                    from += k.max(1);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.sock.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(cause = %e, "UDP datagram not sent");
                    from += 1;
                }
            }
        }
        self.tx.clear();
        Ok(())
    }

    /// Sends the datagrams that waited for a name, now that it resolved (or failed).
    async fn send_resolved(&mut self, done: Resolved) {
        let Resolved { name, queue } = done;
        let now = Instant::now();
        for (port, payload) in queue {
            let dst = match self.resolver.get(&name, now) {
                Cached::Hit(ips) => choose(ips, port, self.v6, self.policy),
                Cached::Failed | Cached::Miss => None,
            };
            let Some(dst) = dst else {
                self.policy.metrics.inc(Counter::UdpDroppedBlocked);
                continue;
            };
            let (new, evicted) = self.targets.insert(dst);
            if let Some(x) = self.xdp.as_mut() {
                if new {
                    x.target(dst, false, evicted);
                }
            }
            let to = match (dst, self.v6) {
                (SocketAddr::V4(a), true) => {
                    SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port())
                }
                (a, _) => a,
            };
            match self.sock.send_to(&payload, to).await {
                Ok(_) => self.count(Direction::Up, payload.len()),
                Err(e) => tracing::debug!(cause = %e, "UDP datagram not sent"),
            }
        }
    }

    fn count(&mut self, dir: Direction, len: usize) {
        let len = len as u64;
        self.policy.metrics.add_udp(dir, len);
        let (datagrams, bytes) = match dir {
            Direction::Up => (&mut self.totals.up_datagrams, &mut self.totals.up_bytes),
            Direction::Down => (&mut self.totals.down_datagrams, &mut self.totals.down_bytes),
        };
        *datagrams += 1;
        *bytes += len;
        let live = match dir {
            Direction::Up => &self.policy.bytes.up,
            Direction::Down => &self.policy.bytes.down,
        };
        live.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn client_port_is_pinned_or_learned() {
        let ip = "127.0.0.1".parse().unwrap();
        // Zero address and port: the first datagram from the peer IP fixes the port.
        let mut c = Client::new(ip, &Address::UNSPECIFIED);
        assert!(!c.accept(a("127.0.0.2:5000"), a("127.0.0.2:5000")));
        assert!(c.accept(a("127.0.0.1:5000"), a("127.0.0.1:5000")));
        assert!(!c.accept(a("127.0.0.1:5001"), a("127.0.0.1:5001")));
        assert_eq!(c.addr, Some(a("127.0.0.1:5000")));

        // The port from the request pins it, with a zero or matching address.
        for req in ["0.0.0.0:6000", "127.0.0.1:6000", "[::ffff:127.0.0.1]:6000"] {
            let mut c = Client::new(ip, &Address::Ip(a(req)));
            assert!(!c.accept(a("127.0.0.1:5000"), a("127.0.0.1:5000")), "{req}");
            assert!(c.accept(a("127.0.0.1:6000"), a("127.0.0.1:6000")), "{req}");
        }

        // Another address (the client's view from behind NAT) is not used: learn instead.
        let mut c = Client::new(ip, &Address::Ip(a("192.168.1.10:6000")));
        assert!(c.accept(a("127.0.0.1:5000"), a("127.0.0.1:5000")));
    }

    #[test]
    fn destinations_the_socket_cannot_or_must_not_reach() {
        assert!(sendable(a("192.0.2.1:53"), false));
        assert!(sendable(a("192.0.2.1:53"), true));
        assert!(!sendable(a("[2001:db8::1]:53"), false));
        assert!(sendable(a("[2001:db8::1]:53"), true));
        assert!(!sendable(a("0.0.0.0:53"), true));
        assert!(!sendable(a("[::]:53"), true));
        assert!(!sendable(a("192.0.2.1:0"), false));
    }
}
