//! The message types and the small enums inside them.
//!
//! Decoding lives in `decode.rs` and encoding in `encode.rs`; this module only says what each
//! message is and how its one-byte codes map to enum variants.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use crate::error::DecodeError;

/// An authentication method code (RFC 1928 section 3), as offered in a [`Greeting`] and chosen
/// in a [`MethodSelection`].
///
/// Unknown codes are kept as [`Method::Other`] rather than rejected: a client may offer
/// methods this server has never heard of, and the greeting is still valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `X'00'` NO AUTHENTICATION REQUIRED.
    NoAuth,
    /// `X'01'` GSSAPI (RFC 1961). Named so logs can say what a client asked for; this project
    /// does not implement it.
    Gssapi,
    /// `X'02'` USERNAME/PASSWORD, negotiated with [`UserPassRequest`] (RFC 1929).
    UserPass,
    /// `X'FF'` NO ACCEPTABLE METHODS: the server's answer when nothing offered is allowed.
    NoAcceptable,
    /// Any other code (IANA-assigned `X'03'`-`X'7F'`, private `X'80'`-`X'FE'`). Holds only codes
    /// not named by another variant, which is what [`From<u8>`] produces.
    Other(u8),
}

impl From<u8> for Method {
    fn from(code: u8) -> Self {
        match code {
            0x00 => Self::NoAuth,
            0x01 => Self::Gssapi,
            0x02 => Self::UserPass,
            0xFF => Self::NoAcceptable,
            other => Self::Other(other),
        }
    }
}

impl From<Method> for u8 {
    fn from(method: Method) -> Self {
        match method {
            Method::NoAuth => 0x00,
            Method::Gssapi => 0x01,
            Method::UserPass => 0x02,
            Method::NoAcceptable => 0xFF,
            Method::Other(code) => code,
        }
    }
}

/// The client's first message: which authentication methods it can do (RFC 1928 section 3).
///
/// ```text
/// +----+----------+----------+
/// |VER | NMETHODS | METHODS  |
/// +----+----------+----------+
/// | 1  |    1     | 1 to 255 |
/// +----+----------+----------+
/// ```
///
/// VER is `X'05'`. NMETHODS = 0 is rejected with [`DecodeError::NoMethods`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Greeting {
    /// The methods offered, in the client's order of preference. 1 to 255 entries; duplicates
    /// are kept as sent.
    pub methods: Vec<Method>,
}

/// The server's answer to a [`Greeting`]: the one method both sides will use (RFC 1928
/// section 3). Decodable too, for clients and tests.
///
/// ```text
/// +----+--------+
/// |VER | METHOD |
/// +----+--------+
/// | 1  |   1    |
/// +----+--------+
/// ```
///
/// VER is `X'05'`; METHOD `X'FF'` ([`Method::NoAcceptable`]) tells the client to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MethodSelection {
    /// The method selected.
    pub method: Method,
}

/// A SOCKS5 command (RFC 1928 section 4): what the client wants the server to do.
///
/// Unknown codes are an error ([`DecodeError::Command`], reply `X'07'`), since the server
/// cannot act on a request it does not understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `X'01'` CONNECT: open a TCP connection to the destination.
    Connect,
    /// `X'02'` BIND: accept one inbound TCP connection on the client's behalf.
    Bind,
    /// `X'03'` UDP ASSOCIATE: relay UDP datagrams framed with [`UdpHeader`].
    UdpAssociate,
}

impl TryFrom<u8> for Command {
    type Error = DecodeError;

    fn try_from(code: u8) -> Result<Self, DecodeError> {
        match code {
            0x01 => Ok(Self::Connect),
            0x02 => Ok(Self::Bind),
            0x03 => Ok(Self::UdpAssociate),
            found => Err(DecodeError::Command { found }),
        }
    }
}

impl From<Command> for u8 {
    fn from(command: Command) -> Self {
        match command {
            Command::Connect => 0x01,
            Command::Bind => 0x02,
            Command::UdpAssociate => 0x03,
        }
    }
}

/// A SOCKS address with its port: the ATYP, ADDR and PORT fields shared by requests,
/// responses and UDP headers (RFC 1928 section 5).
///
/// ```text
/// +------+----------+------+
/// | ATYP |   ADDR   | PORT |
/// +------+----------+------+
/// |  1   | Variable |  2   |
/// +------+----------+------+
///
/// ATYP X'01' IPv4:   ADDR = 4 octets
/// ATYP X'03' domain: ADDR = 1 length octet (1 to 255), then that many name octets
/// ATYP X'04' IPv6:   ADDR = 16 octets
/// PORT is in network byte order.
/// ```
///
/// SOCKS4 messages carry an address too but encode it their own way; SOCKS4a names decode to
/// [`Address::Domain`] so the daemon handles both protocols' targets alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// An IPv4 (ATYP `X'01'`) or IPv6 (ATYP `X'04'`) address. The IPv6 flow info and scope id
    /// are not on the wire: they encode as nothing and decode as zero.
    Ip(SocketAddr),
    /// A domain name (ATYP `X'03'`) for the server to resolve, and the port. The name is
    /// 1 to 255 bytes of UTF-8 without NUL (see [`Address::is_valid_domain`]).
    Domain(String, u16),
}

impl Address {
    /// `0.0.0.0:0`, the BND address to put in a failure [`Response`], where there is nothing
    /// bound to report.
    pub const UNSPECIFIED: Self =
        Self::Ip(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));

    /// The port, whichever kind of address this is.
    pub fn port(&self) -> u16 {
        match self {
            Self::Ip(addr) => addr.port(),
            Self::Domain(_, port) => *port,
        }
    }

    /// Whether `name` can be carried as a domain address: 1 to 255 bytes, no NUL.
    ///
    /// The decoders enforce exactly this (plus UTF-8, which a `&str` already is), and the
    /// encoders panic on a name that fails it, so a caller building an [`Address::Domain`]
    /// from user input should check it first.
    pub fn is_valid_domain(name: &str) -> bool {
        (1..=crate::MAX_DOMAIN_LEN).contains(&name.len()) && !name.as_bytes().contains(&0)
    }
}

impl From<SocketAddr> for Address {
    fn from(addr: SocketAddr) -> Self {
        Self::Ip(addr)
    }
}

impl fmt::Display for Address {
    /// `192.0.2.1:80`, `[2001:db8::1]:443` or `example.com:443`, the form logs and ACL messages
    /// use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(addr) => addr.fmt(f),
            Self::Domain(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// A SOCKS5 request (RFC 1928 section 4): the command and its destination, sent once
/// authentication is done.
///
/// ```text
/// +----+-----+-------+------+----------+----------+
/// |VER | CMD |  RSV  | ATYP | DST.ADDR | DST.PORT |
/// +----+-----+-------+------+----------+----------+
/// | 1  |  1  | X'00' |  1   | Variable |    2     |
/// +----+-----+-------+------+----------+----------+
/// ```
///
/// VER is `X'05'`. RSV is ignored on decode and written as `X'00'`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Request {
    /// What to do.
    pub command: Command,
    /// Where to do it: DST.ADDR and DST.PORT.
    pub address: Address,
}

/// A SOCKS5 reply code (RFC 1928 section 6): the outcome of a [`Request`].
///
/// Unknown codes are kept as [`Reply::Other`] so a client can still report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reply {
    /// `X'00'` succeeded.
    Succeeded,
    /// `X'01'` general SOCKS server failure.
    GeneralFailure,
    /// `X'02'` connection not allowed by ruleset.
    NotAllowed,
    /// `X'03'` network unreachable.
    NetworkUnreachable,
    /// `X'04'` host unreachable.
    HostUnreachable,
    /// `X'05'` connection refused.
    ConnectionRefused,
    /// `X'06'` TTL expired.
    TtlExpired,
    /// `X'07'` command not supported.
    CommandNotSupported,
    /// `X'08'` address type not supported.
    AddressTypeNotSupported,
    /// `X'09'`-`X'FF'`, unassigned. Holds only codes not named by another variant, which is
    /// what [`From<u8>`] produces.
    Other(u8),
}

impl From<u8> for Reply {
    fn from(code: u8) -> Self {
        match code {
            0x00 => Self::Succeeded,
            0x01 => Self::GeneralFailure,
            0x02 => Self::NotAllowed,
            0x03 => Self::NetworkUnreachable,
            0x04 => Self::HostUnreachable,
            0x05 => Self::ConnectionRefused,
            0x06 => Self::TtlExpired,
            0x07 => Self::CommandNotSupported,
            0x08 => Self::AddressTypeNotSupported,
            other => Self::Other(other),
        }
    }
}

impl From<Reply> for u8 {
    fn from(reply: Reply) -> Self {
        match reply {
            Reply::Succeeded => 0x00,
            Reply::GeneralFailure => 0x01,
            Reply::NotAllowed => 0x02,
            Reply::NetworkUnreachable => 0x03,
            Reply::HostUnreachable => 0x04,
            Reply::ConnectionRefused => 0x05,
            Reply::TtlExpired => 0x06,
            Reply::CommandNotSupported => 0x07,
            Reply::AddressTypeNotSupported => 0x08,
            Reply::Other(code) => code,
        }
    }
}

/// The server's answer to a [`Request`] (RFC 1928 section 6). Decodable too, for clients and
/// tests.
///
/// ```text
/// +----+-----+-------+------+----------+----------+
/// |VER | REP |  RSV  | ATYP | BND.ADDR | BND.PORT |
/// +----+-----+-------+------+----------+----------+
/// | 1  |  1  | X'00' |  1   | Variable |    2     |
/// +----+-----+-------+------+----------+----------+
/// ```
///
/// VER is `X'05'`. RSV is ignored on decode and written as `X'00'`. On failure there is no
/// bound address; send [`Address::UNSPECIFIED`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Response {
    /// The outcome.
    pub reply: Reply,
    /// BND.ADDR and BND.PORT: for CONNECT the server's local address towards the target, for
    /// UDP ASSOCIATE where the client must send its datagrams.
    pub address: Address,
}

/// A username/password sub-negotiation request (RFC 1929 section 2), sent after the server
/// selected [`Method::UserPass`].
///
/// ```text
/// +----+------+----------+------+----------+
/// |VER | ULEN |  UNAME   | PLEN |  PASSWD  |
/// +----+------+----------+------+----------+
/// | 1  |  1   | 1 to 255 |  1   | 0 to 255 |
/// +----+------+----------+------+----------+
/// ```
///
/// VER is `X'01'` (the sub-negotiation version, not the SOCKS version). RFC 1929 draws PASSWD
/// as 1 to 255 octets, but common clients send an empty password as PLEN = 0, so that decodes;
/// whether an empty password is acceptable is the authenticator's decision.
///
/// Both fields are raw bytes: RFC 1929 does not name an encoding. `Debug` does not print the
/// password, so the request can be logged.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UserPassRequest {
    /// UNAME, 1 to 255 bytes.
    pub username: Vec<u8>,
    /// PASSWD, 0 to 255 bytes.
    pub password: Vec<u8>,
}

impl fmt::Debug for UserPassRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self { username, password } = self;
        f.debug_struct("UserPassRequest")
            .field("username", &String::from_utf8_lossy(username))
            .field(
                "password",
                &format_args!("<{} bytes redacted>", password.len()),
            )
            .finish()
    }
}

/// The server's answer to a [`UserPassRequest`] (RFC 1929 section 2). Decodable too, for
/// clients and tests.
///
/// ```text
/// +----+--------+
/// |VER | STATUS |
/// +----+--------+
/// | 1  |   1    |
/// +----+--------+
/// ```
///
/// VER is `X'01'`. STATUS `X'00'` is success; anything else is failure and the server must
/// close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UserPassResponse {
    /// `X'00'` for success, any other value for failure.
    pub status: u8,
}

impl UserPassResponse {
    /// The response that lets the client proceed to its [`Request`].
    pub const SUCCESS: Self = Self { status: 0x00 };
    /// A failure response. RFC 1929 allows any non-zero STATUS; `X'01'` is what common
    /// servers send.
    pub const FAILURE: Self = Self { status: 0x01 };

    /// Whether STATUS says success (`X'00'`).
    pub fn is_success(&self) -> bool {
        self.status == 0
    }
}

/// The header in front of every datagram relayed under UDP ASSOCIATE (RFC 1928 section 7).
///
/// ```text
/// +----+------+------+----------+----------+----------+
/// |RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
/// +----+------+------+----------+----------+----------+
/// | 2  |  1   |  1   | Variable |    2     | Variable |
/// +----+------+------+----------+----------+----------+
/// ```
///
/// RSV is ignored on decode and written as `X'0000'`. DATA is not part of this type: `decode`
/// returns the header length and the payload is the rest of the datagram. A datagram is
/// complete when it arrives, so [`DecodeError::Incomplete`] here means a truncated datagram
/// that should be dropped.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UdpHeader {
    /// The fragment number; `X'00'` is a standalone datagram. Servers that do not reassemble
    /// (this one) drop datagrams with a non-zero FRAG, as RFC 1928 allows.
    pub frag: u8,
    /// For a datagram from the client, where to send DATA; for one to the client, where DATA
    /// came from.
    pub address: Address,
}

/// A SOCKS4 command.
///
/// SOCKS4 has no UDP; unknown codes are an error ([`DecodeError::Command`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Socks4Command {
    /// CD = 1, CONNECT.
    Connect,
    /// CD = 2, BIND.
    Bind,
}

impl TryFrom<u8> for Socks4Command {
    type Error = DecodeError;

    fn try_from(code: u8) -> Result<Self, DecodeError> {
        match code {
            1 => Ok(Self::Connect),
            2 => Ok(Self::Bind),
            found => Err(DecodeError::Command { found }),
        }
    }
}

impl From<Socks4Command> for u8 {
    fn from(command: Socks4Command) -> Self {
        match command {
            Socks4Command::Connect => 1,
            Socks4Command::Bind => 2,
        }
    }
}

/// A SOCKS4 or SOCKS4a request, told apart from SOCKS5 by its first byte, 4.
///
/// ```text
/// SOCKS4:
/// +----+----+----+----+----+----+----+----+----+----+....+----+
/// | VN | CD | DSTPORT |      DSTIP        | USERID       |NULL|
/// +----+----+----+----+----+----+----+----+----+----+....+----+
///    1    1      2              4           variable       1
///
/// SOCKS4a: DSTIP = 0.0.0.x with x != 0, and the name follows the user id:
/// +----+----+---------+---------+--------+----+--------+----+
/// | VN | CD | DSTPORT | 0.0.0.x | USERID |NULL| DOMAIN |NULL|
/// +----+----+---------+---------+--------+----+--------+----+
///    1    1      2         4     variable   1  variable   1
/// ```
///
/// VN is 4, DSTPORT is in network byte order. A SOCKS4a request decodes to
/// [`Address::Domain`] (the x is not kept; encoding writes 0.0.0.1), a plain one to an IPv4
/// [`Address::Ip`]. USERID and DOMAIN are each bounded at 255 bytes
/// ([`crate::MAX_SOCKS4_FIELD_LEN`]) so a peer that never sends the NUL cannot make the
/// caller buffer without limit; longer fails with [`DecodeError::Field`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Socks4Request {
    /// What to do.
    pub command: Socks4Command,
    /// The destination: an IPv4 [`Address::Ip`], or [`Address::Domain`] for SOCKS4a.
    pub address: Address,
    /// USERID without its NUL: 0 to 255 bytes, none of them NUL.
    pub user_id: Vec<u8>,
}

/// A SOCKS4 reply code.
///
/// Unknown codes are an error ([`DecodeError::Field`]): unlike SOCKS5 there is no range left
/// for future codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Socks4Reply {
    /// CD = 90, request granted.
    Granted,
    /// CD = 91, request rejected or failed.
    Rejected,
    /// CD = 92, rejected because the server cannot connect to identd on the client.
    NoIdentd,
    /// CD = 93, rejected because identd and the client reported different user ids.
    IdentMismatch,
}

impl TryFrom<u8> for Socks4Reply {
    type Error = DecodeError;

    fn try_from(code: u8) -> Result<Self, DecodeError> {
        match code {
            90 => Ok(Self::Granted),
            91 => Ok(Self::Rejected),
            92 => Ok(Self::NoIdentd),
            93 => Ok(Self::IdentMismatch),
            _ => Err(DecodeError::Field {
                what: "SOCKS4 reply code",
            }),
        }
    }
}

impl From<Socks4Reply> for u8 {
    fn from(reply: Socks4Reply) -> Self {
        match reply {
            Socks4Reply::Granted => 90,
            Socks4Reply::Rejected => 91,
            Socks4Reply::NoIdentd => 92,
            Socks4Reply::IdentMismatch => 93,
        }
    }
}

/// The server's answer to a [`Socks4Request`]. Decodable too, for clients and tests.
///
/// ```text
/// +----+----+----+----+----+----+----+----+
/// | VN | CD | DSTPORT |      DSTIP        |
/// +----+----+----+----+----+----+----+----+
///    1    1      2              4
/// ```
///
/// VN is 0 (the reply version, not 4). DSTPORT and DSTIP matter for BIND; for CONNECT clients
/// ignore them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Socks4Response {
    /// The outcome.
    pub reply: Socks4Reply,
    /// DSTIP and DSTPORT.
    pub address: SocketAddrV4,
}
