//! Decode errors and the reply each one earns.

use crate::types::{Reply, Socks4Reply};

/// Why a decoder could not produce a message.
///
/// [`DecodeError::Incomplete`] is kept apart from the protocol errors on purpose: it is the
/// normal outcome of decoding a partly received message, and the caller should read more bytes
/// and call the decoder again. Every other variant means the peer sent something this codec
/// will never accept, whatever follows; [`DecodeError::reply`] says whether the peer should be
/// told before the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DecodeError {
    /// The buffer is a strict prefix of a message that may still turn out valid: read more
    /// bytes and retry. Not a protocol error.
    #[error("incomplete message: more bytes needed")]
    Incomplete,
    /// The version byte is not the one this message type requires (5 for SOCKS5 messages,
    /// 4 for a SOCKS4 request, 0 for a SOCKS4 reply). Usually a client speaking another
    /// protocol to the port, so it gets no reply.
    #[error("unsupported protocol version {found:#04x}")]
    Version {
        /// The version byte received.
        found: u8,
    },
    /// A SOCKS5 greeting with NMETHODS = 0: the client offers no way to authenticate, so no
    /// method can be selected (RFC 1928 section 3 requires at least one).
    #[error("greeting offers no authentication methods")]
    NoMethods,
    /// A CMD byte that names no command. SOCKS5 answers it with reply `X'07'`.
    #[error("unknown command {found:#04x}")]
    Command {
        /// The CMD byte received.
        found: u8,
    },
    /// An ATYP byte that names no address type. SOCKS5 answers it with reply `X'08'`.
    #[error("unknown address type {found:#04x}")]
    AddressType {
        /// The ATYP byte received.
        found: u8,
    },
    /// A domain name that is empty, is not valid UTF-8 or contains a NUL byte. Such a name
    /// cannot be handed to a resolver safely (a NUL would silently truncate it).
    #[error("invalid domain name")]
    Domain,
    /// Any other malformed field: an RFC 1929 sub-negotiation version other than 1, an empty
    /// username, an unknown SOCKS4 reply code, a SOCKS4 user id or domain over 255 bytes.
    #[error("malformed field: {what}")]
    Field {
        /// Which field was malformed, for logs.
        what: &'static str,
    },
}

impl DecodeError {
    /// The SOCKS5 reply to send before closing, or `None` to close without a reply.
    ///
    /// RFC 1928 section 6 has dedicated codes for an unsupported command (`X'07'`) and address
    /// type (`X'08'`). An unusable domain name is a well-framed request that the server cannot
    /// act on, which the RFC's catch-all "general SOCKS server failure" (`X'01'`) covers. The
    /// remaining errors mean the peer does not speak the protocol (or the framing is lost), so
    /// a reply would not be understood: close instead. [`DecodeError::Incomplete`] is not a
    /// failure at all and never earns a reply.
    pub fn reply(&self) -> Option<Reply> {
        match self {
            Self::Command { .. } => Some(Reply::CommandNotSupported),
            Self::AddressType { .. } => Some(Reply::AddressTypeNotSupported),
            Self::Domain => Some(Reply::GeneralFailure),
            Self::Incomplete | Self::Version { .. } | Self::NoMethods | Self::Field { .. } => None,
        }
    }

    /// The SOCKS4 reply to send before closing, or `None` to close without a reply.
    ///
    /// SOCKS4 has a single failure code, so an unknown command or an unusable SOCKS4a domain
    /// both map to [`Socks4Reply::Rejected`]; errors that mean the framing is lost get none.
    pub fn socks4_reply(&self) -> Option<Socks4Reply> {
        match self {
            Self::Command { .. } | Self::Domain => Some(Socks4Reply::Rejected),
            Self::Incomplete
            | Self::Version { .. }
            | Self::NoMethods
            | Self::AddressType { .. }
            | Self::Field { .. } => None,
        }
    }

    /// Whether this is [`DecodeError::Incomplete`], so a read loop can tell "read more" from
    /// "give up" without matching.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, Self::Incomplete)
    }
}
