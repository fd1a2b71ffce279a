//! Types and names shared by the ebsocks kernel programs (`proxy-ebpf`) and the daemon
//! (`proxy-userspace`).
//!
//! Everything here is `#[repr(C)]`, `Copy`, free of `bool` and of implicit padding, because the
//! same bytes are read by BPF programs compiled for `bpfel-unknown-none` and by the daemon on the
//! host. Integers are in host byte order unless a field's doc says otherwise.
#![no_std]

/// The sockhash that carries established TCP pairs.
pub mod sockmap {
    /// Name of the redirect-target sockhash. No program is attached to it.
    ///
    /// Key: the socket cookie (`u64`, host order) of the socket whose *received* bytes are to be
    /// forwarded. Value: the peer socket, whose *egress* gets those bytes. A spliced pair
    /// occupies two entries, `cookie(client) -> upstream` and `cookie(upstream) -> client`; the
    /// verdict program redirects with its own socket's cookie as the key.
    pub const PAIRS: &str = "EBSOCKS_PAIRS";

    /// Name of the activation sockhash, to which the verdict program is attached.
    ///
    /// Key: a socket's cookie; value: that socket. Putting a socket here starts the verdict on
    /// it. The daemon fills [`PAIRS`] for both sockets first and only then activates them, so the
    /// verdict never runs on a socket whose peer is not yet a redirect target (its bytes would
    /// be dropped).
    pub const ACTIVE: &str = "EBSOCKS_ACTIVE";

    /// Name of the hash map `cookie -> `[`BrakeControl`], written by the daemon only.
    ///
    /// The kernel's redirect ignores how much the peer socket can take: for a peer that reads
    /// slowly it would queue without bound. The brake bounds that queue without ever taking a
    /// socket out of the sockhash (removing the verdict while the kernel runs it drops the skbs
    /// it is handling, after TCP acknowledged them):
    ///
    /// - when a socket's byte count reaches `checkpoint`, the verdict reports the cookie on
    ///   [`BRAKE_EVENTS`] (once per checkpoint value);
    /// - the daemon compares what the kernel took from the socket with what its peer accepted;
    ///   if the peer is too far behind it sets `braked`. The verdict then *passes* the socket's
    ///   bytes to the socket itself instead of redirecting them: they wait in its receive
    ///   queue, charged to its receive buffer, so TCP's window closes on the sender;
    /// - once the peer caught up the daemon clears `braked`. While bytes it passed are still
    ///   queued (`BrakeState::passed != read`) the verdict keeps passing, so that nothing
    ///   overtakes them; the daemon reads them, writes them to the peer and raises `read`. When
    ///   the two meet the verdict redirects again.
    pub const BRAKES: &str = "EBSOCKS_BRAKES";

    /// Name of the array of kernel structure offsets the verdict needs, written by the daemon
    /// at start-up from the kernel's BTF; see [`LayoutSlot`]. An offset of 0 means unknown.
    pub const LAYOUT: &str = "EBSOCKS_LAYOUT";

    /// The entries of [`LAYOUT`].
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum LayoutSlot {
        /// Byte offset of `sk` in `struct sk_buff`.
        SkbSk = 0,
        /// Byte offset of `copied_seq` in `struct tcp_sock`: the sequence number up to which
        /// the socket's receive queue has been consumed. At the first skb after a socket enters
        /// the sockhash it is where the daemon stopped reading, so the verdict cuts below it.
        TcpCopiedSeq = 1,
    }

    /// Entries in [`LAYOUT`].
    pub const LAYOUT_SLOTS: u32 = 2;

    /// The daemon's half of a socket's brake; see [`BRAKES`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct BrakeControl {
        /// Byte count (as in `SessionTraffic::bytes`) at which the verdict reports the socket.
        pub checkpoint: u64,
        /// Bytes the daemon has read from the socket out of those the verdict passed to it.
        pub read: u64,
        /// Non-zero: pass every byte to the socket itself.
        pub braked: u32,
        /// Reserved, zero.
        pub _pad: u32,
    }

    /// The verdict's own state for a socket: its half of the brake (see [`BRAKES`]) and the
    /// TCP sequence it has forwarded up to. It lives in the socket's entry of the per-socket
    /// counters (`SessionTraffic::brake`), which the verdict looks up for every skb anyway; the
    /// daemon creates it zeroed with the entry and only reads it after that.
    ///
    /// The kernel hands the verdict whole skbs from the receive queue (`tcp_read_skb`), and TCP
    /// queues a segment that overlaps bytes already received (a retransmission of partly
    /// delivered data: `seq < rcv_nxt < end_seq`) without trimming it, leaving that to readers
    /// that track `copied_seq`, which the verdict path does not. Forwarded whole, its repeated
    /// head would reach the peer twice. So the verdict reads each skb's sequence range from
    /// TCP's control block and cuts off what lies before `next_seq`. The first skb after the
    /// socket entered the sockhash starts `next_seq` at the socket's `copied_seq` (where the
    /// daemon stopped reading; see [`LAYOUT`]) when that lies within the skb, else at the skb's
    /// start.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct BrakeState {
        /// Bytes the verdict passed to the socket itself rather than to its peer.
        pub passed: u64,
        /// The checkpoint last reported, so that each is reported once.
        pub reported: u64,
        /// Bytes cut off the head of retransmitted skbs (they repeated forwarded bytes).
        pub overlap: u64,
        /// TCP sequence number after the last byte forwarded or passed (valid if `seq_known`).
        pub next_seq: u32,
        /// Non-zero once `next_seq` holds a sequence number; [`SEQ_BROKEN`] once a repeat
        /// could not be cut (the daemon then resets the session).
        pub seq_known: u32,
    }

    /// `BrakeState::seq_known` of a socket whose stream can no longer be kept exact.
    pub const SEQ_BROKEN: u32 = 2;

    /// Name of the ring buffer of [`BrakeEvent`]s: sockets that reached their brake checkpoint
    /// (or whose stream the verdict could not keep exact).
    pub const BRAKE_EVENTS: &str = "EBSOCKS_BRAKE_EVENTS";

    /// One entry of [`BRAKE_EVENTS`]. The session id lets the daemon wake a session that waits
    /// with no task (one it keeps no per-socket subscription for).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct BrakeEvent {
        /// Cookie of the socket.
        pub cookie: u64,
        /// The socket's session (0: not known).
        pub session_id: u64,
    }

    /// Size in bytes of [`BRAKE_EVENTS`].
    pub const BRAKE_EVENTS_BYTES: u32 = 256 * 1024;

    /// Capacity of each sockhash: two entries per spliced session.
    pub const SOCKHASH_MAX_ENTRIES: u32 = 2 * 65_536;

    /// Name of the stream-verdict program attached to [`ACTIVE`].
    pub const VERDICT_PROG: &str = "ebsocks_verdict";
}

/// Counters: per protocol/path/direction (kernel and daemon), per spliced session (kernel) and
/// daemon-wide event counters.
pub mod metrics {
    /// Name of the per-CPU array of [`Traffic`] counters updated by the kernel programs.
    /// Indexed by [`TrafficSlot`].
    pub const KERNEL_TRAFFIC: &str = "EBSOCKS_KTRAFFIC";

    /// Name of the array of [`Traffic`] counters written by the daemon for bytes it moves itself
    /// (splice(2) and copy paths), through a shared mapping. Same index space as
    /// [`KERNEL_TRAFFIC`].
    pub const DAEMON_TRAFFIC: &str = "EBSOCKS_UTRAFFIC";

    /// Name of the array of `u64` daemon event counters indexed by [`Counter`], written by the
    /// daemon through a shared mapping.
    pub const DAEMON_COUNTERS: &str = "EBSOCKS_COUNTERS";

    /// Name of the hash map of per-socket [`SessionTraffic`] keyed by socket cookie (`u64`).
    pub const SESSIONS: &str = "EBSOCKS_SESSIONS";

    /// Capacity of [`SESSIONS`]: one entry per spliced socket.
    pub const SESSIONS_MAX_ENTRIES: u32 = 2 * 65_536;

    /// Bytes and packets (skbs for the kernel, read/write chunks for the daemon).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Traffic {
        /// Payload bytes.
        pub bytes: u64,
        /// Packets: skbs seen by the verdict program, or chunks moved by the daemon.
        pub packets: u64,
    }

    /// Direction of a byte stream relative to the SOCKS client.
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Direction {
        /// Client to target.
        Up = 0,
        /// Target to client.
        Down = 1,
    }

    impl Direction {
        /// Lower-case name used in stats output.
        pub const fn name(self) -> &'static str {
            match self {
                Self::Up => "up",
                Self::Down => "down",
            }
        }
    }

    /// How a TCP session's payload is carried.
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum DataPath {
        /// In-kernel redirect between sockets in the sockhash.
        Sockmap = 0,
        /// `splice(2)` through a pipe, driven by the daemon.
        Splice = 1,
        /// Plain userspace copy.
        Copy = 2,
    }

    impl DataPath {
        /// Every data path, in index order.
        pub const ALL: [Self; 3] = [Self::Sockmap, Self::Splice, Self::Copy];

        /// Lower-case name used in config and stats output.
        pub const fn name(self) -> &'static str {
            match self {
                Self::Sockmap => "sockmap",
                Self::Splice => "splice",
                Self::Copy => "copy",
            }
        }
    }

    /// Index into the traffic arrays: one slot per (protocol, path, direction).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct TrafficSlot(pub u32);

    /// How a UDP datagram was relayed.
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum UdpPath {
        /// By the daemon's relay socket.
        Relay = 0,
        /// By the XDP program, without reaching the daemon.
        Xdp = 1,
    }

    impl UdpPath {
        /// Lower-case name used in stats output.
        pub const fn name(self) -> &'static str {
            match self {
                Self::Relay => "relay",
                Self::Xdp => "xdp",
            }
        }
    }

    impl TrafficSlot {
        /// TCP carried on `path` in direction `dir` (slots 0..6).
        pub const fn tcp(path: DataPath, dir: Direction) -> Self {
            Self(path as u32 * 2 + dir as u32)
        }

        /// UDP payload relayed on `path` in direction `dir` (slots 6..10).
        pub const fn udp(path: UdpPath, dir: Direction) -> Self {
            Self(6 + path as u32 * 2 + dir as u32)
        }

        /// The protocol, path and direction names of this slot, for display.
        pub const fn names(self) -> (&'static str, &'static str, &'static str) {
            let dir = if self.0.is_multiple_of(2) {
                Direction::Up
            } else {
                Direction::Down
            };
            let (proto, path) = match self.0 / 2 {
                0 => ("tcp", DataPath::Sockmap.name()),
                1 => ("tcp", DataPath::Splice.name()),
                2 => ("tcp", DataPath::Copy.name()),
                3 => ("udp", UdpPath::Relay.name()),
                _ => ("udp", UdpPath::Xdp.name()),
            };
            (proto, path, dir.name())
        }
    }

    /// Slots in use; the arrays are sized [`TRAFFIC_SLOTS_MAX`] to leave room for more.
    pub const TRAFFIC_SLOTS: u32 = 10;

    /// Capacity of the traffic arrays (reserved for UDP and per-protocol slots).
    pub const TRAFFIC_SLOTS_MAX: u32 = 32;

    /// Per-socket counters of a spliced session, keyed by the socket's cookie.
    ///
    /// The daemon inserts the entry (`bytes` seeded with what it forwarded itself,
    /// `session_id`, `direction`, a zeroed `brake`) before it puts the socket into the
    /// sockhash, and never writes it again; it removes it when the session ends. The verdict
    /// adds to `bytes`/`packets` with atomic adds, and writes `brake` under the socket's lock
    /// (one writer at a time). Layout read by the daemon and by `ebsocks stats`; do not reorder.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct SessionTraffic {
        /// Payload bytes received on this socket and redirected to its peer.
        pub bytes: u64,
        /// skbs redirected.
        pub packets: u64,
        /// Daemon-assigned session id, shared by the two sockets of a pair.
        pub session_id: u64,
        /// [`Direction`] of the bytes received on this socket (`Up` for the client socket).
        pub direction: u32,
        /// Reserved, zero.
        pub _pad: u32,
        /// The verdict's brake and sequence state for this socket.
        pub brake: crate::sockmap::BrakeState,
    }

    /// Daemon event counters, indexes into [`DAEMON_COUNTERS`].
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Counter {
        /// Sessions that started relaying on the sockmap path.
        SessionsTotalSockmap = 0,
        /// Sessions that started relaying on the splice path.
        SessionsTotalSplice = 1,
        /// Sessions that started relaying on the copy path.
        SessionsTotalCopy = 2,
        /// Sessions currently relaying on the sockmap path (gauge).
        SessionsActiveSockmap = 3,
        /// Sessions currently relaying on the splice path (gauge).
        SessionsActiveSplice = 4,
        /// Sessions currently relaying on the copy path (gauge).
        SessionsActiveCopy = 5,
        /// Sessions that ended before relaying (error reply, timeout, bad input).
        SessionsFailed = 6,
        /// Sessions that asked for the sockmap path but fell back to another one.
        SessionsFallback = 7,
        /// Client connections accepted.
        ConnectionsAccepted = 8,
        /// Client connections refused by the client address rules.
        ConnectionsRefused = 9,
        /// Sessions cut at the negotiation timeout.
        NegotiationTimeouts = 10,
        /// Requests refused by a `block` rule (reply 0x02).
        RequestsBlocked = 11,
        /// Username/password authentications that failed.
        AuthFailures = 12,
        /// Username/password authentications that succeeded.
        AuthSuccesses = 13,
        /// UDP associations created.
        UdpAssociationsTotal = 14,
        /// UDP associations open now (gauge).
        UdpAssociationsActive = 15,
        /// Client datagrams dropped: FRAG != 0.
        UdpDroppedFrag = 16,
        /// Datagrams dropped: source is not the associated client (nor a reply to it).
        UdpDroppedForeign = 17,
        /// Client datagrams dropped: malformed SOCKS UDP header.
        UdpDroppedMalformed = 18,
        /// Client datagrams dropped: destination forbidden by the rules or unresolvable.
        UdpDroppedBlocked = 19,
        /// BIND requests served (first reply sent).
        BindsTotal = 20,
        /// Times a spliced socket's verdict was stopped because its peer fell behind.
        SockmapBrakes = 21,
        /// Sessions whose request was CONNECT (counted once the request is read).
        SessionsCreatedConnect = 22,
        /// Sessions whose request was BIND (counted once the request is read).
        SessionsCreatedBind = 23,
        /// Sessions whose request was UDP ASSOCIATE (counted once the request is read).
        SessionsCreatedUdp = 24,
        /// Sessions created by a CONNECT request that ended, whatever the outcome.
        SessionsEndedConnect = 25,
        /// Sessions created by a BIND request that ended, whatever the outcome.
        SessionsEndedBind = 26,
        /// Sessions created by a UDP ASSOCIATE request that ended, whatever the outcome.
        SessionsEndedUdp = 27,
        /// Sessions that stopped relaying on the sockmap path.
        SessionsEndedSockmap = 28,
        /// Sessions that stopped relaying on the splice path.
        SessionsEndedSplice = 29,
        /// Sessions that stopped relaying on the copy path.
        SessionsEndedCopy = 30,
        /// Sessions reading the greeting and the request now (gauge).
        SessionsNegotiating = 31,
        /// Sessions in username/password authentication now (gauge).
        SessionsAuthenticating = 32,
        /// Sessions resolving the target's name now (gauge).
        SessionsResolving = 33,
        /// Sessions connecting to the target now (gauge).
        SessionsConnecting = 34,
        /// Sessions waiting for the BIND peer to connect now (gauge).
        SessionsBindWaiting = 35,
        /// Failed sessions, reason `general_failure`: Refused with reply 0x01 (general failure).
        FailGeneralFailure = 36,
        /// Failed sessions, reason `not_allowed`: Refused with reply 0x02 (not allowed) for a reason other than a rule, e.g. EACCES on connect.
        FailNotAllowed = 37,
        /// Failed sessions, reason `network_unreachable`: Refused with reply 0x03 (network unreachable).
        FailNetworkUnreachable = 38,
        /// Failed sessions, reason `host_unreachable`: Refused with reply 0x04 (host unreachable), other than a failed name resolution.
        FailHostUnreachable = 39,
        /// Failed sessions, reason `connection_refused`: Refused with reply 0x05 (connection refused).
        FailConnectionRefused = 40,
        /// Failed sessions, reason `ttl_expired`: Refused with reply 0x06 (TTL expired) for a kernel timeout (ETIMEDOUT).
        FailTtlExpired = 41,
        /// Failed sessions, reason `command_not_supported`: Refused with reply 0x07 (command not supported).
        FailCommandNotSupported = 42,
        /// Failed sessions, reason `address_type_not_supported`: Refused with reply 0x08 (address type not supported).
        FailAddressTypeNotSupported = 43,
        /// Failed sessions, reason `auth_failed`: Username/password authentication failed.
        FailAuthFailed = 44,
        /// Failed sessions, reason `no_acceptable_method`: The client offered no acceptable method (reply 0xFF).
        FailNoAcceptableMethod = 45,
        /// Failed sessions, reason `rule_blocked`: Request blocked by a socks rule (reply 0x02).
        FailRuleBlocked = 46,
        /// Failed sessions, reason `client_blocked`: Connection closed at accept by a client rule.
        FailClientBlocked = 47,
        /// Failed sessions, reason `negotiation_timeout`: Negotiation not finished within timeouts.negotiation.
        FailNegotiationTimeout = 48,
        /// Failed sessions, reason `connect_timeout`: Target not connected within timeouts.connect (reply 0x06).
        FailConnectTimeout = 49,
        /// Failed sessions, reason `bind_timeout`: No BIND peer within timeouts.bind (reply 0x06).
        FailBindTimeout = 50,
        /// Failed sessions, reason `limit`: Connection closed at accept by max_sessions or max_sessions_per_client.
        FailLimit = 51,
        /// Failed sessions, reason `resolve_failed`: The target's name did not resolve (reply 0x04).
        FailResolveFailed = 52,
        /// Failed sessions, reason `protocol_error`: Malformed SOCKS message (reply where the protocol has one).
        FailProtocolError = 53,
        /// Failed sessions, reason `client_closed`: The client closed before the session was established.
        FailClientClosed = 54,
        /// Failed sessions, reason `io_error`: Another socket error before relaying.
        FailIoError = 55,
        /// Errors from accept(2) on a listener (descriptors exhausted and the like).
        AcceptErrors = 56,
        /// Connects to a target (per attempted address list) that took at most 250us (cumulative histogram bucket).
        ConnectLatencyLe250Us = 57,
        /// Connects to a target (per attempted address list) that took at most 500us (cumulative histogram bucket).
        ConnectLatencyLe500Us = 58,
        /// Connects to a target (per attempted address list) that took at most 1ms (cumulative histogram bucket).
        ConnectLatencyLe1Ms = 59,
        /// Connects to a target (per attempted address list) that took at most 2.5ms (cumulative histogram bucket).
        ConnectLatencyLe2p5Ms = 60,
        /// Connects to a target (per attempted address list) that took at most 5ms (cumulative histogram bucket).
        ConnectLatencyLe5Ms = 61,
        /// Connects to a target (per attempted address list) that took at most 10ms (cumulative histogram bucket).
        ConnectLatencyLe10Ms = 62,
        /// Connects to a target (per attempted address list) that took at most 25ms (cumulative histogram bucket).
        ConnectLatencyLe25Ms = 63,
        /// Connects to a target (per attempted address list) that took at most 50ms (cumulative histogram bucket).
        ConnectLatencyLe50Ms = 64,
        /// Connects to a target (per attempted address list) that took at most 100ms (cumulative histogram bucket).
        ConnectLatencyLe100Ms = 65,
        /// Connects to a target (per attempted address list) that took at most 250ms (cumulative histogram bucket).
        ConnectLatencyLe250Ms = 66,
        /// Connects to a target (per attempted address list) that took at most 500ms (cumulative histogram bucket).
        ConnectLatencyLe500Ms = 67,
        /// Connects to a target (per attempted address list) that took at most 1s (cumulative histogram bucket).
        ConnectLatencyLe1S = 68,
        /// Connects to a target (per attempted address list) that took at most 2.5s (cumulative histogram bucket).
        ConnectLatencyLe2p5S = 69,
        /// Connects to a target (per attempted address list) that took at most 5s (cumulative histogram bucket).
        ConnectLatencyLe5S = 70,
        /// Connects to a target (per attempted address list) that took at most 10s (cumulative histogram bucket).
        ConnectLatencyLe10S = 71,
        /// Connects to a target (per attempted address list): observations (the +Inf bucket).
        ConnectLatencyCount = 72,
        /// Connects to a target (per attempted address list): total time in microseconds.
        ConnectLatencySumUs = 73,
        /// Name resolutions of a request's target that took at most 250us (cumulative histogram bucket).
        DnsLatencyLe250Us = 74,
        /// Name resolutions of a request's target that took at most 500us (cumulative histogram bucket).
        DnsLatencyLe500Us = 75,
        /// Name resolutions of a request's target that took at most 1ms (cumulative histogram bucket).
        DnsLatencyLe1Ms = 76,
        /// Name resolutions of a request's target that took at most 2.5ms (cumulative histogram bucket).
        DnsLatencyLe2p5Ms = 77,
        /// Name resolutions of a request's target that took at most 5ms (cumulative histogram bucket).
        DnsLatencyLe5Ms = 78,
        /// Name resolutions of a request's target that took at most 10ms (cumulative histogram bucket).
        DnsLatencyLe10Ms = 79,
        /// Name resolutions of a request's target that took at most 25ms (cumulative histogram bucket).
        DnsLatencyLe25Ms = 80,
        /// Name resolutions of a request's target that took at most 50ms (cumulative histogram bucket).
        DnsLatencyLe50Ms = 81,
        /// Name resolutions of a request's target that took at most 100ms (cumulative histogram bucket).
        DnsLatencyLe100Ms = 82,
        /// Name resolutions of a request's target that took at most 250ms (cumulative histogram bucket).
        DnsLatencyLe250Ms = 83,
        /// Name resolutions of a request's target that took at most 500ms (cumulative histogram bucket).
        DnsLatencyLe500Ms = 84,
        /// Name resolutions of a request's target that took at most 1s (cumulative histogram bucket).
        DnsLatencyLe1S = 85,
        /// Name resolutions of a request's target that took at most 2.5s (cumulative histogram bucket).
        DnsLatencyLe2p5S = 86,
        /// Name resolutions of a request's target that took at most 5s (cumulative histogram bucket).
        DnsLatencyLe5S = 87,
        /// Name resolutions of a request's target that took at most 10s (cumulative histogram bucket).
        DnsLatencyLe10S = 88,
        /// Name resolutions of a request's target: observations (the +Inf bucket).
        DnsLatencyCount = 89,
        /// Name resolutions of a request's target: total time in microseconds.
        DnsLatencySumUs = 90,
        /// Bytes a brake held on a spliced socket that the daemon then moved to the peer itself.
        SockmapBrakeBytes = 91,
        /// Sessions that began on splice(2) under `auto` and moved to the sockhash.
        SessionsPromoted = 92,
        /// Bytes of retransmitted TCP segments that repeated bytes a spliced socket had already
        /// received, cut off by the verdict so that the peer gets every byte once.
        SockmapOverlapBytes = 93,
        /// Sessions the kernel carries that wait as a record, with no task, until a FIN, a
        /// reset, a brake checkpoint or their idle timeout (a gauge; part of the sockmap
        /// sessions active).
        SessionsParked = 94,
        /// Sockets of a bulk direction on splice(2) or copy whose buffers were fitted to a
        /// near peer (see the daemon's `relay::buffers`).
        BuffersFitted = 95,
    }

    impl Counter {
        /// Every counter, in index order.
        pub const ALL: [Self; 96] = [
            Self::SessionsTotalSockmap,
            Self::SessionsTotalSplice,
            Self::SessionsTotalCopy,
            Self::SessionsActiveSockmap,
            Self::SessionsActiveSplice,
            Self::SessionsActiveCopy,
            Self::SessionsFailed,
            Self::SessionsFallback,
            Self::ConnectionsAccepted,
            Self::ConnectionsRefused,
            Self::NegotiationTimeouts,
            Self::RequestsBlocked,
            Self::AuthFailures,
            Self::AuthSuccesses,
            Self::UdpAssociationsTotal,
            Self::UdpAssociationsActive,
            Self::UdpDroppedFrag,
            Self::UdpDroppedForeign,
            Self::UdpDroppedMalformed,
            Self::UdpDroppedBlocked,
            Self::BindsTotal,
            Self::SockmapBrakes,
            Self::SessionsCreatedConnect,
            Self::SessionsCreatedBind,
            Self::SessionsCreatedUdp,
            Self::SessionsEndedConnect,
            Self::SessionsEndedBind,
            Self::SessionsEndedUdp,
            Self::SessionsEndedSockmap,
            Self::SessionsEndedSplice,
            Self::SessionsEndedCopy,
            Self::SessionsNegotiating,
            Self::SessionsAuthenticating,
            Self::SessionsResolving,
            Self::SessionsConnecting,
            Self::SessionsBindWaiting,
            Self::FailGeneralFailure,
            Self::FailNotAllowed,
            Self::FailNetworkUnreachable,
            Self::FailHostUnreachable,
            Self::FailConnectionRefused,
            Self::FailTtlExpired,
            Self::FailCommandNotSupported,
            Self::FailAddressTypeNotSupported,
            Self::FailAuthFailed,
            Self::FailNoAcceptableMethod,
            Self::FailRuleBlocked,
            Self::FailClientBlocked,
            Self::FailNegotiationTimeout,
            Self::FailConnectTimeout,
            Self::FailBindTimeout,
            Self::FailLimit,
            Self::FailResolveFailed,
            Self::FailProtocolError,
            Self::FailClientClosed,
            Self::FailIoError,
            Self::AcceptErrors,
            Self::ConnectLatencyLe250Us,
            Self::ConnectLatencyLe500Us,
            Self::ConnectLatencyLe1Ms,
            Self::ConnectLatencyLe2p5Ms,
            Self::ConnectLatencyLe5Ms,
            Self::ConnectLatencyLe10Ms,
            Self::ConnectLatencyLe25Ms,
            Self::ConnectLatencyLe50Ms,
            Self::ConnectLatencyLe100Ms,
            Self::ConnectLatencyLe250Ms,
            Self::ConnectLatencyLe500Ms,
            Self::ConnectLatencyLe1S,
            Self::ConnectLatencyLe2p5S,
            Self::ConnectLatencyLe5S,
            Self::ConnectLatencyLe10S,
            Self::ConnectLatencyCount,
            Self::ConnectLatencySumUs,
            Self::DnsLatencyLe250Us,
            Self::DnsLatencyLe500Us,
            Self::DnsLatencyLe1Ms,
            Self::DnsLatencyLe2p5Ms,
            Self::DnsLatencyLe5Ms,
            Self::DnsLatencyLe10Ms,
            Self::DnsLatencyLe25Ms,
            Self::DnsLatencyLe50Ms,
            Self::DnsLatencyLe100Ms,
            Self::DnsLatencyLe250Ms,
            Self::DnsLatencyLe500Ms,
            Self::DnsLatencyLe1S,
            Self::DnsLatencyLe2p5S,
            Self::DnsLatencyLe5S,
            Self::DnsLatencyLe10S,
            Self::DnsLatencyCount,
            Self::DnsLatencySumUs,
            Self::SockmapBrakeBytes,
            Self::SessionsPromoted,
            Self::SockmapOverlapBytes,
            Self::SessionsParked,
            Self::BuffersFitted,
        ];

        /// Name used in stats output.
        pub const fn name(self) -> &'static str {
            match self {
                Self::SessionsTotalSockmap => "sessions_total_sockmap",
                Self::SessionsTotalSplice => "sessions_total_splice",
                Self::SessionsTotalCopy => "sessions_total_copy",
                Self::SessionsActiveSockmap => "sessions_active_sockmap",
                Self::SessionsActiveSplice => "sessions_active_splice",
                Self::SessionsActiveCopy => "sessions_active_copy",
                Self::SessionsFailed => "sessions_failed",
                Self::SessionsFallback => "sessions_fallback",
                Self::ConnectionsAccepted => "connections_accepted",
                Self::ConnectionsRefused => "connections_refused",
                Self::NegotiationTimeouts => "negotiation_timeouts",
                Self::RequestsBlocked => "requests_blocked",
                Self::AuthFailures => "auth_failures",
                Self::AuthSuccesses => "auth_successes",
                Self::UdpAssociationsTotal => "udp_associations_total",
                Self::UdpAssociationsActive => "udp_associations_active",
                Self::UdpDroppedFrag => "udp_dropped_frag",
                Self::UdpDroppedForeign => "udp_dropped_foreign",
                Self::UdpDroppedMalformed => "udp_dropped_malformed",
                Self::UdpDroppedBlocked => "udp_dropped_blocked",
                Self::BindsTotal => "binds_total",
                Self::SockmapBrakes => "sockmap_brakes",
                Self::SockmapBrakeBytes => "sockmap_brake_bytes",
                Self::SessionsPromoted => "sessions_promoted",
                Self::SockmapOverlapBytes => "sockmap_overlap_bytes",
                Self::SessionsParked => "sessions_parked",
                Self::BuffersFitted => "buffers_fitted",
                Self::SessionsCreatedConnect => "sessions_created_connect",
                Self::SessionsCreatedBind => "sessions_created_bind",
                Self::SessionsCreatedUdp => "sessions_created_udp_associate",
                Self::SessionsEndedConnect => "sessions_ended_connect",
                Self::SessionsEndedBind => "sessions_ended_bind",
                Self::SessionsEndedUdp => "sessions_ended_udp_associate",
                Self::SessionsEndedSockmap => "sessions_ended_sockmap",
                Self::SessionsEndedSplice => "sessions_ended_splice",
                Self::SessionsEndedCopy => "sessions_ended_copy",
                Self::SessionsNegotiating => "sessions_negotiating",
                Self::SessionsAuthenticating => "sessions_authenticating",
                Self::SessionsResolving => "sessions_resolving",
                Self::SessionsConnecting => "sessions_connecting",
                Self::SessionsBindWaiting => "sessions_bind_waiting",
                Self::FailGeneralFailure => "failures_general_failure",
                Self::FailNotAllowed => "failures_not_allowed",
                Self::FailNetworkUnreachable => "failures_network_unreachable",
                Self::FailHostUnreachable => "failures_host_unreachable",
                Self::FailConnectionRefused => "failures_connection_refused",
                Self::FailTtlExpired => "failures_ttl_expired",
                Self::FailCommandNotSupported => "failures_command_not_supported",
                Self::FailAddressTypeNotSupported => "failures_address_type_not_supported",
                Self::FailAuthFailed => "failures_auth_failed",
                Self::FailNoAcceptableMethod => "failures_no_acceptable_method",
                Self::FailRuleBlocked => "failures_rule_blocked",
                Self::FailClientBlocked => "failures_client_blocked",
                Self::FailNegotiationTimeout => "failures_negotiation_timeout",
                Self::FailConnectTimeout => "failures_connect_timeout",
                Self::FailBindTimeout => "failures_bind_timeout",
                Self::FailLimit => "failures_limit",
                Self::FailResolveFailed => "failures_resolve_failed",
                Self::FailProtocolError => "failures_protocol_error",
                Self::FailClientClosed => "failures_client_closed",
                Self::FailIoError => "failures_io_error",
                Self::AcceptErrors => "accept_errors",
                Self::ConnectLatencyLe250Us => "connect_latency_le_250us",
                Self::ConnectLatencyLe500Us => "connect_latency_le_500us",
                Self::ConnectLatencyLe1Ms => "connect_latency_le_1ms",
                Self::ConnectLatencyLe2p5Ms => "connect_latency_le_2_5ms",
                Self::ConnectLatencyLe5Ms => "connect_latency_le_5ms",
                Self::ConnectLatencyLe10Ms => "connect_latency_le_10ms",
                Self::ConnectLatencyLe25Ms => "connect_latency_le_25ms",
                Self::ConnectLatencyLe50Ms => "connect_latency_le_50ms",
                Self::ConnectLatencyLe100Ms => "connect_latency_le_100ms",
                Self::ConnectLatencyLe250Ms => "connect_latency_le_250ms",
                Self::ConnectLatencyLe500Ms => "connect_latency_le_500ms",
                Self::ConnectLatencyLe1S => "connect_latency_le_1s",
                Self::ConnectLatencyLe2p5S => "connect_latency_le_2_5s",
                Self::ConnectLatencyLe5S => "connect_latency_le_5s",
                Self::ConnectLatencyLe10S => "connect_latency_le_10s",
                Self::ConnectLatencyCount => "connect_latency_count",
                Self::ConnectLatencySumUs => "connect_latency_sum_us",
                Self::DnsLatencyLe250Us => "dns_latency_le_250us",
                Self::DnsLatencyLe500Us => "dns_latency_le_500us",
                Self::DnsLatencyLe1Ms => "dns_latency_le_1ms",
                Self::DnsLatencyLe2p5Ms => "dns_latency_le_2_5ms",
                Self::DnsLatencyLe5Ms => "dns_latency_le_5ms",
                Self::DnsLatencyLe10Ms => "dns_latency_le_10ms",
                Self::DnsLatencyLe25Ms => "dns_latency_le_25ms",
                Self::DnsLatencyLe50Ms => "dns_latency_le_50ms",
                Self::DnsLatencyLe100Ms => "dns_latency_le_100ms",
                Self::DnsLatencyLe250Ms => "dns_latency_le_250ms",
                Self::DnsLatencyLe500Ms => "dns_latency_le_500ms",
                Self::DnsLatencyLe1S => "dns_latency_le_1s",
                Self::DnsLatencyLe2p5S => "dns_latency_le_2_5s",
                Self::DnsLatencyLe5S => "dns_latency_le_5s",
                Self::DnsLatencyLe10S => "dns_latency_le_10s",
                Self::DnsLatencyCount => "dns_latency_count",
                Self::DnsLatencySumUs => "dns_latency_sum_us",
            }
        }

        /// The "sessions started" counter of a data path.
        pub const fn total(path: DataPath) -> Self {
            match path {
                DataPath::Sockmap => Self::SessionsTotalSockmap,
                DataPath::Splice => Self::SessionsTotalSplice,
                DataPath::Copy => Self::SessionsTotalCopy,
            }
        }

        /// The "sessions active" gauge of a data path.
        pub const fn active(path: DataPath) -> Self {
            match path {
                DataPath::Sockmap => Self::SessionsActiveSockmap,
                DataPath::Splice => Self::SessionsActiveSplice,
                DataPath::Copy => Self::SessionsActiveCopy,
            }
        }

        /// The "sessions that stopped relaying" counter of a data path.
        pub const fn ended(path: DataPath) -> Self {
            match path {
                DataPath::Sockmap => Self::SessionsEndedSockmap,
                DataPath::Splice => Self::SessionsEndedSplice,
                DataPath::Copy => Self::SessionsEndedCopy,
            }
        }
    }

    /// Upper bounds, in microseconds, of the latency histogram buckets: each histogram keeps one
    /// cumulative counter per bound (`..._le_250us` counts observations of at most 250 µs), then
    /// a count (the `+Inf` bucket) and a sum in microseconds, in consecutive [`Counter`] slots.
    pub const LATENCY_BUCKETS_US: [u64; 15] = [
        250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
        1_000_000, 2_500_000, 5_000_000, 10_000_000,
    ];

    /// A latency histogram kept in the counter array.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Histogram {
        /// Name used in stats output (`connect_latency`).
        pub name: &'static str,
        /// The counter of the first bucket; the others follow in [`LATENCY_BUCKETS_US`] order.
        pub first_bucket: Counter,
        /// Observations (the `+Inf` bucket).
        pub count: Counter,
        /// Sum of the observations in microseconds.
        pub sum_us: Counter,
    }

    impl Histogram {
        /// The counter of bucket `i` (bound `LATENCY_BUCKETS_US[i]`).
        pub const fn bucket(self, i: usize) -> Counter {
            Counter::ALL[self.first_bucket as usize + i]
        }
    }

    /// Time to connect to a target (every resolved address tried, until one accepts).
    pub const CONNECT_LATENCY: Histogram = Histogram {
        name: "connect_latency",
        first_bucket: Counter::ConnectLatencyLe250Us,
        count: Counter::ConnectLatencyCount,
        sum_us: Counter::ConnectLatencySumUs,
    };

    /// Time to resolve a request's target name.
    pub const DNS_LATENCY: Histogram = Histogram {
        name: "dns_latency",
        first_bucket: Counter::DnsLatencyLe250Us,
        count: Counter::DnsLatencyCount,
        sum_us: Counter::DnsLatencySumUs,
    };

    /// Every histogram.
    pub const HISTOGRAMS: [Histogram; 2] = [CONNECT_LATENCY, DNS_LATENCY];

    /// Capacity of [`DAEMON_COUNTERS`] (room for counters added later).
    pub const COUNTERS_MAX: u32 = 128;

    const _: () = {
        assert!(Counter::ALL.len() <= COUNTERS_MAX as usize);
        let mut i = 0;
        while i < Counter::ALL.len() {
            assert!(
                Counter::ALL[i] as usize == i,
                "Counter::ALL must list the counters in index order"
            );
            i += 1;
        }
        let mut h = 0;
        while h < HISTOGRAMS.len() {
            let hist = HISTOGRAMS[h];
            assert!(hist.first_bucket as usize + LATENCY_BUCKETS_US.len() == hist.count as usize);
            assert!(hist.count as usize + 1 == hist.sum_us as usize);
            h += 1;
        }
    };

    /// `BPF_F_MMAPABLE` (Linux 5.5+): the daemon-written arrays are mapped into the daemon,
    /// which updates them with plain atomics, without a syscall.
    pub const BPF_F_MMAPABLE: u32 = 1 << 10;
}

/// The UDP fast path: an XDP program on the interfaces named in `[udp] xdp_interfaces`, in
/// front of the daemon's UDP relay sockets.
///
/// For a datagram addressed to a relay socket ([`RELAYS`]) it drops early what the relay would
/// drop anyway (counted per [`XdpCounter`]), and for a flow the daemon offloaded ([`PEERS`] with
/// [`PEER_OFFLOAD`]) it rewrites the datagram itself and transmits it, so that the relay socket
/// never sees it. Everything else passes to the stack unchanged; the relay stays correct for
/// every datagram.
///
/// Addresses are 16 bytes in network order; an IPv4 address is written IPv4-mapped
/// (`::ffff:a.b.c.d`). Ports are in network order.
pub mod xdp {
    /// Name of the XDP program.
    pub const XDP_PROG: &str = "ebsocks_xdp";

    /// Name of the hash map [`RelayKey`] -> [`Relay`]: one entry per UDP association, written by
    /// the daemon only.
    pub const RELAYS: &str = "EBSOCKS_XRELAYS";
    /// Name of the hash map [`PeerKey`] -> [`Peer`]: the targets an association's client has
    /// sent to (the only sources whose datagrams go back to the client). The daemon creates
    /// the entries; the XDP program adds to their counters.
    pub const PEERS: &str = "EBSOCKS_XPEERS";
    /// Name of the LRU hash map [`PeerKey`] -> `u32`: destinations the association's rules
    /// refused, learned from the relay's decisions. An entry evicted only costs a trip to the
    /// daemon, which refuses the datagram again.
    pub const DENY: &str = "EBSOCKS_XDENY";
    /// Name of the per-CPU array of `metrics::Traffic` per [`IfaceSlot`]: every frame seen on
    /// the XDP interfaces, by protocol and direction.
    pub const IFACE_TRAFFIC: &str = "EBSOCKS_XSTATS";
    /// Name of the per-CPU array of `u64` indexed by [`XdpCounter`].
    pub const COUNTERS: &str = "EBSOCKS_XCOUNT";

    /// Capacity of [`RELAYS`].
    pub const RELAYS_MAX_ENTRIES: u32 = 65_536;
    /// Capacity of [`PEERS`], shared by every association.
    pub const PEERS_MAX_ENTRIES: u32 = 262_144;
    /// Capacity of [`DENY`].
    pub const DENY_MAX_ENTRIES: u32 = 65_536;

    /// A relay socket: the address the client sends to and targets answer to.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct RelayKey {
        /// The relay socket's address (IPv4-mapped for IPv4), network order.
        pub addr: [u8; 16],
        /// The relay socket's port, network order.
        pub port: u16,
        /// Reserved, zero.
        pub _pad: [u8; 2],
    }

    /// An association, as the XDP program sees it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Relay {
        /// The client's address (IPv4-mapped for IPv4), network order.
        pub client_addr: [u8; 16],
        /// The client's port, network order; zero until the relay has learned it (the program
        /// then passes the client's datagrams to the relay, which learns it from the first).
        pub client_port: u16,
        /// [`RELAY_PEERS_COMPLETE`].
        pub flags: u16,
    }

    /// [`Relay::flags`]: every target of the association is in [`PEERS`], so a datagram from
    /// any other source (than the client) is foreign and dropped.
    pub const RELAY_PEERS_COMPLETE: u16 = 1;

    /// An association's peer (a target), or a destination in [`DENY`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct PeerKey {
        /// The association's relay socket.
        pub relay: RelayKey,
        /// The target's address (IPv4-mapped for IPv4), network order.
        pub addr: [u8; 16],
        /// The target's port, network order.
        pub port: u16,
        /// Reserved, zero.
        pub _pad: [u8; 2],
    }

    /// A peer's state and what the XDP program moved for it. Counters are added with atomic
    /// adds; layout read by the daemon, do not reorder.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Peer {
        /// [`PEER_OFFLOAD`].
        pub flags: u32,
        /// Reserved, zero.
        pub _pad: u32,
        /// Payload bytes (SOCKS header excluded) forwarded client -> target by XDP.
        pub up_bytes: u64,
        /// Datagrams forwarded client -> target by XDP.
        pub up_packets: u64,
        /// Payload bytes forwarded target -> client by XDP.
        pub down_bytes: u64,
        /// Datagrams forwarded target -> client by XDP.
        pub down_packets: u64,
    }

    /// [`Peer::flags`]: the target was named by a literal address and the rules allow it, so
    /// XDP may forward in both directions.
    pub const PEER_OFFLOAD: u32 = 1;

    /// Protocol of a frame, for [`IfaceSlot`].
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Proto {
        /// TCP over IPv4 or IPv6.
        Tcp = 0,
        /// UDP over IPv4 or IPv6.
        Udp = 1,
        /// ICMP or ICMPv6.
        Icmp = 2,
        /// Anything else (ARP, other IP protocols, extension headers, non-IP).
        Other = 3,
    }

    impl Proto {
        /// Every protocol, in index order.
        pub const ALL: [Self; 4] = [Self::Tcp, Self::Udp, Self::Icmp, Self::Other];

        /// Lower-case name used in stats output.
        pub const fn name(self) -> &'static str {
            match self {
                Self::Tcp => "tcp",
                Self::Udp => "udp",
                Self::Icmp => "icmp",
                Self::Other => "other",
            }
        }
    }

    /// Direction of a frame on an XDP interface.
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum IfaceDir {
        /// Received on the interface (everything the program sees).
        Rx = 0,
        /// Transmitted by the program itself (offloaded datagrams, after the rewrite).
        Tx = 1,
    }

    impl IfaceDir {
        /// Both directions, in index order.
        pub const ALL: [Self; 2] = [Self::Rx, Self::Tx];

        /// Lower-case name used in stats output.
        pub const fn name(self) -> &'static str {
            match self {
                Self::Rx => "rx",
                Self::Tx => "tx",
            }
        }
    }

    /// Index into [`IFACE_TRAFFIC`].
    pub const fn iface_slot(proto: Proto, dir: IfaceDir) -> u32 {
        proto as u32 * 2 + dir as u32
    }

    /// Entries of [`IFACE_TRAFFIC`].
    pub const IFACE_SLOTS: u32 = 8;

    /// What the XDP program did with a datagram addressed to a relay socket, indexes into
    /// [`COUNTERS`].
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum XdpCounter {
        /// Dropped: malformed SOCKS UDP header (too short, unknown address type).
        DropMalformed = 0,
        /// Dropped: FRAG != 0.
        DropFrag = 1,
        /// Dropped: neither the client nor a target the client sent to.
        DropForeign = 2,
        /// Dropped: destination the association's rules refused.
        DropBlocked = 3,
        /// Passed to the relay: destination is a domain name.
        PassDomain = 4,
        /// Passed: no offloaded flow for this destination or source (yet).
        PassNoFlow = 5,
        /// Passed: IP options, extension headers or an IP fragment.
        PassUnparsed = 6,
        /// Passed: the result would not fit the egress MTU.
        PassTooBig = 7,
        /// Passed: the FIB lookup found no route or no neighbour.
        PassFib = 8,
        /// Passed: the client's port is not known yet.
        PassLearning = 9,
        /// Forwarded client -> target by XDP.
        OffloadUp = 10,
        /// Forwarded target -> client by XDP.
        OffloadDown = 11,
        /// Passed (IPv6): the kernel picks another source address than the relay socket's own
        /// towards this destination (the relay's dual-stack socket sends from the address
        /// the routing table picks), or none.
        PassSource = 12,
    }

    impl XdpCounter {
        /// Every counter, in index order.
        pub const ALL: [Self; 13] = [
            Self::DropMalformed,
            Self::DropFrag,
            Self::DropForeign,
            Self::DropBlocked,
            Self::PassDomain,
            Self::PassNoFlow,
            Self::PassUnparsed,
            Self::PassTooBig,
            Self::PassFib,
            Self::PassLearning,
            Self::OffloadUp,
            Self::OffloadDown,
            Self::PassSource,
        ];

        /// Name used in stats output.
        pub const fn name(self) -> &'static str {
            match self {
                Self::DropMalformed => "xdp_dropped_malformed",
                Self::DropFrag => "xdp_dropped_frag",
                Self::DropForeign => "xdp_dropped_foreign",
                Self::DropBlocked => "xdp_dropped_blocked",
                Self::PassDomain => "xdp_passed_domain",
                Self::PassNoFlow => "xdp_passed_no_flow",
                Self::PassUnparsed => "xdp_passed_unparsed",
                Self::PassTooBig => "xdp_passed_too_big",
                Self::PassFib => "xdp_passed_fib",
                Self::PassLearning => "xdp_passed_learning",
                Self::OffloadUp => "xdp_offloaded_up",
                Self::OffloadDown => "xdp_offloaded_down",
                Self::PassSource => "xdp_passed_source",
            }
        }
    }

    /// Entries of [`COUNTERS`] (room for more).
    pub const COUNTERS_MAX: u32 = 32;

    const _: () = {
        let mut i = 0;
        while i < XdpCounter::ALL.len() {
            assert!(XdpCounter::ALL[i] as usize == i);
            i += 1;
        }
        assert!(XdpCounter::ALL.len() <= COUNTERS_MAX as usize);
    };

    /// One's-complement arithmetic for incremental checksum updates (RFC 1624), on 16-bit
    /// words taken from the packet as they lie in memory (the sum is byte-order neutral).
    pub mod csum {
        /// Adds a word to a running sum.
        #[inline(always)]
        pub const fn add(sum: u32, word: u16) -> u32 {
            sum + word as u32
        }

        /// Takes a word out of a running sum (adds its complement).
        #[inline(always)]
        pub const fn sub(sum: u32, word: u16) -> u32 {
            sum + (!word) as u32
        }

        /// Folds a running sum to 16 bits.
        #[inline(always)]
        pub const fn fold(mut sum: u32) -> u16 {
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            sum as u16
        }

        /// The word at `b[i..i + 2]`, as it lies in memory.
        #[inline(always)]
        pub const fn word(b0: u8, b1: u8) -> u16 {
            u16::from_ne_bytes([b0, b1])
        }

        /// Starts an update of the stored checksum `check`: the running sum it stands for.
        #[inline(always)]
        pub const fn start(check: u16) -> u32 {
            (!check) as u32
        }

        /// Ends an update: the checksum to store. A UDP checksum of zero is sent as 0xffff
        /// (zero means "none").
        #[inline(always)]
        pub const fn finish_udp(sum: u32) -> u16 {
            let c = !fold(sum);
            if c == 0 {
                0xffff
            } else {
                c
            }
        }

        /// The UDP checksum of a datagram the relay socket forwards, from the checksum `check`
        /// it arrived with, updated for what changes between the two (RFC 1624).
        ///
        /// Client -> target (`strip`): `client:client_port -> relay:rport`, payload
        /// `head, target, tport, data` becomes `relay:rport -> target:tport`, payload `data`.
        /// Target -> client (`!strip`) is the reverse. The relay's address and port move
        /// between destination and source, and the target's between the SOCKS header and the
        /// IP/UDP headers, so their words cancel out of the sum: what leaves it (`strip`) or
        /// enters it is the client's address and port and the header's first four bytes
        /// (`head`: RSV, FRAG, ATYP), and the UDP length changes from `old_len` to `new_len`
        /// (counted twice: UDP header and pseudo-header). The pseudo-header's other words (the
        /// protocol; IPv6's 32-bit length has a zero upper half) stay. Words are as they lie
        /// in memory (`client_port` in network order), lengths in host order. Never zero.
        #[inline(always)]
        pub fn relayed<const AL: usize>(
            check: u16,
            client: &[u8; AL],
            client_port: u16,
            head: [u8; 4],
            old_len: u16,
            new_len: u16,
            strip: bool,
        ) -> u16 {
            let moved = |sum: u32, w: u16| if strip { sub(sum, w) } else { add(sum, w) };
            let mut sum = start(check);
            let mut i = 0;
            while i + 1 < AL {
                sum = moved(sum, word(client[i], client[i + 1]));
                i += 2;
            }
            sum = moved(sum, client_port);
            sum = moved(sum, word(head[0], head[1]));
            sum = moved(sum, word(head[2], head[3]));
            let (old, new) = (old_len.to_be(), new_len.to_be());
            sum = sub(sub(sum, old), old);
            finish_udp(add(add(sum, new), new))
        }

        /// The IPv4 header checksum of 20 bytes whose checksum field holds zero.
        #[inline(always)]
        pub fn ipv4_header(h: &[u8; 20]) -> u16 {
            let mut sum = 0u32;
            let mut i = 0;
            while i < 20 {
                sum = add(sum, word(h[i], h[i + 1]));
                i += 2;
            }
            !fold(sum)
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers without padding; every bit pattern is valid.
    unsafe impl aya::Pod for crate::metrics::Traffic {}
    // SAFETY: as above; `_pad` makes the trailing padding explicit.
    unsafe impl aya::Pod for crate::metrics::SessionTraffic {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::sockmap::BrakeControl {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::sockmap::BrakeState {}
    // SAFETY: as above; `_pad` makes the padding explicit.
    unsafe impl aya::Pod for crate::xdp::RelayKey {}
    // SAFETY: as above (16 + 2 + 2 bytes, no padding).
    unsafe impl aya::Pod for crate::xdp::Relay {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::xdp::PeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::xdp::Peer {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{vec, vec::Vec};

    use super::xdp::csum;

    /// The UDP checksum of a datagram computed from scratch: pseudo-header (addresses,
    /// protocol 17, length), UDP header with a zero checksum, payload.
    fn full(src: &[u8], dst: &[u8], sport: u16, dport: u16, payload: &[u8]) -> u16 {
        let len = (8 + payload.len()) as u16;
        let mut b = [0u8; 1600];
        let mut n = 0;
        for x in src.iter().chain(dst) {
            b[n] = *x;
            n += 1;
        }
        for x in [0, 17]
            .iter()
            .chain(&len.to_be_bytes())
            .chain(&sport.to_be_bytes())
            .chain(&dport.to_be_bytes())
            .chain(&len.to_be_bytes())
            .chain(&[0, 0])
            .chain(payload)
        {
            b[n] = *x;
            n += 1;
        }
        if n % 2 == 1 {
            n += 1;
        }
        let mut sum = 0;
        let mut i = 0;
        while i < n {
            sum = csum::add(sum, csum::word(b[i], b[i + 1]));
            i += 2;
        }
        csum::finish_udp(sum)
    }

    fn words(mut sum: u32, b: &[u8], sub: bool) -> u32 {
        for w in b.chunks(2) {
            let w = csum::word(w[0], w[1]);
            sum = if sub {
                csum::sub(sum, w)
            } else {
                csum::add(sum, w)
            };
        }
        sum
    }

    /// Stripping a SOCKS header and rewriting addresses, ports and length incrementally gives
    /// the checksum computed from scratch; so does adding one.
    #[test]
    fn incremental_udp_checksum_matches_a_full_one() {
        let (client, relay, target) = ([10, 1, 0, 2], [10, 1, 0, 1], [10, 2, 0, 2]);
        let (cport, rport, tport) = (40_000u16, 50_000u16, 53u16);
        for plen in [0usize, 1, 2, 9, 100, 1471] {
            let payload: [u8; 1500] = core::array::from_fn(|i| (i * 7 + plen) as u8);
            let payload = &payload[..plen];
            let mut socks = [0u8; 10 + 1500];
            socks[3] = 1;
            socks[4..8].copy_from_slice(&target);
            socks[8..10].copy_from_slice(&tport.to_be_bytes());
            socks[10..10 + plen].copy_from_slice(payload);
            let with_header = &socks[..10 + plen];

            // Up: client -> relay with header, becomes relay -> target without.
            let old = full(&client, &relay, cport, rport, with_header);
            let mut sum = csum::start(old);
            let old_len = ((8 + with_header.len()) as u16).to_be_bytes();
            let new_len = ((8 + plen) as u16).to_be_bytes();
            sum = words(sum, &client, true);
            sum = words(sum, &relay, true);
            sum = words(sum, &cport.to_be_bytes(), true);
            sum = words(sum, &rport.to_be_bytes(), true);
            sum = words(sum, &old_len, true);
            sum = words(sum, &old_len, true);
            sum = words(sum, &with_header[..10], true);
            sum = words(sum, &relay, false);
            sum = words(sum, &target, false);
            sum = words(sum, &rport.to_be_bytes(), false);
            sum = words(sum, &tport.to_be_bytes(), false);
            sum = words(sum, &new_len, false);
            sum = words(sum, &new_len, false);
            assert_eq!(
                csum::finish_udp(sum),
                full(&relay, &target, rport, tport, payload),
                "up, {plen} bytes"
            );

            // Down: target -> relay without header, becomes relay -> client with it.
            let old = full(&target, &relay, tport, rport, payload);
            let mut sum = csum::start(old);
            sum = words(sum, &target, true);
            sum = words(sum, &relay, true);
            sum = words(sum, &tport.to_be_bytes(), true);
            sum = words(sum, &rport.to_be_bytes(), true);
            sum = words(sum, &new_len, true);
            sum = words(sum, &new_len, true);
            sum = words(sum, &with_header[..10], false);
            sum = words(sum, &relay, false);
            sum = words(sum, &client, false);
            sum = words(sum, &rport.to_be_bytes(), false);
            sum = words(sum, &cport.to_be_bytes(), false);
            sum = words(sum, &old_len, false);
            sum = words(sum, &old_len, false);
            assert_eq!(
                csum::finish_udp(sum),
                full(&relay, &client, rport, cport, with_header),
                "down, {plen} bytes"
            );
        }
    }

    /// A SOCKS UDP header naming `addr:port` (ATYP 1 or 4) in front of `payload`.
    fn socks(addr: &[u8], port: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 0, if addr.len() == 4 { 1 } else { 4 }];
        v.extend_from_slice(addr);
        v.extend_from_slice(&port.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn relayed_both_ways<const AL: usize>(
        client: [u8; AL],
        relay: [u8; AL],
        target: [u8; AL],
        payload: &[u8],
    ) {
        let (cport, rport, tport) = (40_000u16, 50_000u16, 53u16);
        let wrapped = socks(&target, tport, payload);
        let head: [u8; 4] = wrapped[..4].try_into().unwrap();
        let (long, short) = ((8 + wrapped.len()) as u16, (8 + payload.len()) as u16);
        let client_port = cport.to_be();
        let up = csum::relayed(
            full(&client, &relay, cport, rport, &wrapped),
            &client,
            client_port,
            head,
            long,
            short,
            true,
        );
        assert_eq!(
            up,
            full(&relay, &target, rport, tport, payload),
            "up, AL {AL}, {} bytes",
            payload.len()
        );
        let down = csum::relayed(
            full(&target, &relay, tport, rport, payload),
            &client,
            client_port,
            head,
            short,
            long,
            false,
        );
        assert_eq!(
            down,
            full(&relay, &client, rport, cport, &wrapped),
            "down, AL {AL}, {} bytes",
            payload.len()
        );
    }

    /// The shortcut of `csum::relayed` gives the checksum computed from scratch, IPv4 and IPv6
    /// (whose pseudo-header sums the same words: the 32-bit length's upper half is zero).
    #[test]
    fn relayed_checksum_matches_a_full_one() {
        let c6 = [0xfd, 0x64, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let r6 = [0xfd, 0x64, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let t6 = [
            0x20, 0x01, 0x0d, 0xb8, 0xff, 0xee, 0x12, 0x34, 0xab, 0xcd, 0, 0x99, 0xfe, 0xdc, 0xff,
            0xff,
        ];
        for plen in [0usize, 1, 2, 9, 100, 1431, 1471] {
            let payload: Vec<u8> = (0..plen).map(|i| (i * 7 + plen) as u8).collect();
            relayed_both_ways(c6, r6, t6, &payload);
            relayed_both_ways([10, 1, 0, 2], [10, 1, 0, 1], [10, 2, 0, 2], &payload);
        }
    }

    /// A datagram whose checksum computes to zero is sent as 0xffff, never as zero (which
    /// means "no checksum" over IPv4 and is invalid over IPv6).
    #[test]
    fn relayed_checksum_is_never_zero() {
        let c6 = [0xfd, 0x64, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let r6 = [0xfd, 0x64, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let t6 = [0xfd, 0x64, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let mut found = 0;
        for w in 0..=u16::MAX {
            let payload = w.to_be_bytes();
            let target_side = full(&r6, &t6, 50_000, 53, &payload);
            let client_side = full(&r6, &c6, 50_000, 40_000, &socks(&t6, 53, &payload));
            if target_side != 0xffff && client_side != 0xffff {
                continue;
            }
            found += 1;
            relayed_both_ways(c6, r6, t6, &payload);
            let wrapped = socks(&t6, 53, &payload);
            let head: [u8; 4] = wrapped[..4].try_into().unwrap();
            for (check, old, new, strip) in [
                (full(&c6, &r6, 40_000, 50_000, &wrapped), 32, 10, true),
                (full(&t6, &r6, 53, 50_000, &payload), 10, 32, false),
            ] {
                let c = csum::relayed(check, &c6, 40_000u16.to_be(), head, old, new, strip);
                assert_ne!(c, 0, "payload {w:#06x}");
            }
        }
        assert!(found > 0, "no payload with a zero checksum found");
    }

    #[test]
    fn ipv4_header_checksum() {
        // RFC 1071-style example header with its checksum field zeroed.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(csum::ipv4_header(&h).to_ne_bytes(), [0xb8, 0x61]);
    }
}
