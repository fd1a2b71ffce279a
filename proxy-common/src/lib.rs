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
            let dir = if self.0 % 2 == 0 { Direction::Up } else { Direction::Down };
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
    /// The daemon inserts the entry (zeroed counters, `session_id`, `direction`) before it puts
    /// the socket into the sockhash; the verdict program only adds to `bytes`/`packets` with
    /// atomic adds, so several CPUs may update one entry. Layout read by the daemon and by
    /// `ebsocks stats`; do not reorder.
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
    }

    impl Counter {
        /// Every counter, in index order.
        pub const ALL: [Self; 21] = [
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
    }

    /// Capacity of [`DAEMON_COUNTERS`] (room for counters added later).
    pub const COUNTERS_MAX: u32 = 128;

    /// `BPF_F_MMAPABLE` (Linux 5.5+): the daemon-written arrays are mapped into the daemon,
    /// which updates them with plain atomics, without a syscall.
    pub const BPF_F_MMAPABLE: u32 = 1 << 10;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers without padding; every bit pattern is valid.
    unsafe impl aya::Pod for crate::metrics::Traffic {}
    // SAFETY: as above; `_pad` makes the trailing padding explicit.
    unsafe impl aya::Pod for crate::metrics::SessionTraffic {}
}
