//! Encoders: each message writes exactly its wire bytes into a [`BufMut`], and says in advance
//! how many that will be.
//!
//! Encoders are infallible for every value a decoder can produce. A value the wire cannot
//! carry (a domain over 255 bytes, more than 255 methods, an IPv6 address in a SOCKS4
//! request, ...) is a bug in the caller, and the encoder panics rather than put different
//! bytes on the wire than the value says; each such case is listed under `# Panics`.
//! A `BufMut` that cannot grow (a `&mut [u8]`) must have `encoded_len()` bytes of room.

use std::net::SocketAddr;

use bytes::BufMut;

use crate::{
    types::{
        Address, Greeting, MethodSelection, Request, Response, Socks4Request, Socks4Response,
        UdpHeader, UserPassRequest, UserPassResponse,
    },
    ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6, MAX_SOCKS4_FIELD_LEN, SOCKS4_REPLY_VERSION, SOCKS4_VERSION,
    SOCKS5_VERSION, USERPASS_VERSION,
};

/// Writes a length byte and the bytes it counts.
fn put_len_prefixed(dst: &mut impl BufMut, bytes: &[u8], what: &str) {
    let len = u8::try_from(bytes.len())
        .unwrap_or_else(|_| panic!("{what} is {} bytes, over 255", bytes.len()));
    dst.put_u8(len);
    dst.put_slice(bytes);
}

/// Writes a SOCKS4 NUL-terminated field.
fn put_nul_terminated(dst: &mut impl BufMut, bytes: &[u8], what: &str) {
    assert!(
        bytes.len() <= MAX_SOCKS4_FIELD_LEN,
        "{what} is {} bytes, over 255",
        bytes.len()
    );
    assert!(!bytes.contains(&0), "{what} contains a NUL byte");
    dst.put_slice(bytes);
    dst.put_u8(0);
}

impl Address {
    /// Writes ATYP, ADDR and PORT.
    ///
    /// # Panics
    ///
    /// If an [`Address::Domain`] name fails [`Address::is_valid_domain`].
    pub fn encode(&self, dst: &mut impl BufMut) {
        match self {
            Self::Ip(SocketAddr::V4(addr)) => {
                dst.put_u8(ATYP_IPV4);
                dst.put_slice(&addr.ip().octets());
                dst.put_u16(addr.port());
            }
            Self::Ip(SocketAddr::V6(addr)) => {
                dst.put_u8(ATYP_IPV6);
                dst.put_slice(&addr.ip().octets());
                dst.put_u16(addr.port());
            }
            Self::Domain(name, port) => {
                assert!(
                    Self::is_valid_domain(name),
                    "domain {name:?} cannot be encoded: need 1 to 255 bytes without NUL"
                );
                dst.put_u8(ATYP_DOMAIN);
                put_len_prefixed(dst, name.as_bytes(), "domain");
                dst.put_u16(*port);
            }
        }
    }

    /// How many bytes [`Address::encode`] writes: 7 for IPv4, 19 for IPv6, 4 + name length
    /// for a domain. Never panics.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Ip(SocketAddr::V4(_)) => 1 + 4 + 2,
            Self::Ip(SocketAddr::V6(_)) => 1 + 16 + 2,
            Self::Domain(name, _) => 1 + 1 + name.len() + 2,
        }
    }
}

impl Greeting {
    /// Writes VER, NMETHODS and METHODS.
    ///
    /// # Panics
    ///
    /// If `methods` is empty or has more than 255 entries.
    pub fn encode(&self, dst: &mut impl BufMut) {
        let Self { methods } = self;
        assert!(!methods.is_empty(), "a greeting needs at least one method");
        let n = u8::try_from(methods.len())
            .unwrap_or_else(|_| panic!("{} methods, over 255", methods.len()));
        dst.put_u8(SOCKS5_VERSION);
        dst.put_u8(n);
        for &method in methods {
            dst.put_u8(method.into());
        }
    }

    /// How many bytes [`Greeting::encode`] writes: 2 + number of methods.
    pub fn encoded_len(&self) -> usize {
        2 + self.methods.len()
    }
}

impl MethodSelection {
    /// Writes VER and METHOD.
    pub fn encode(&self, dst: &mut impl BufMut) {
        let Self { method } = *self;
        dst.put_u8(SOCKS5_VERSION);
        dst.put_u8(method.into());
    }

    /// How many bytes [`MethodSelection::encode`] writes: always 2.
    pub fn encoded_len(&self) -> usize {
        2
    }
}

impl Request {
    /// Writes VER, CMD, RSV (`X'00'`), ATYP, DST.ADDR and DST.PORT.
    ///
    /// # Panics
    ///
    /// As [`Address::encode`].
    pub fn encode(&self, dst: &mut impl BufMut) {
        let Self { command, address } = self;
        dst.put_u8(SOCKS5_VERSION);
        dst.put_u8((*command).into());
        dst.put_u8(0);
        address.encode(dst);
    }

    /// How many bytes [`Request::encode`] writes: 3 + the address's.
    pub fn encoded_len(&self) -> usize {
        3 + self.address.encoded_len()
    }
}

impl Response {
    /// Writes VER, REP, RSV (`X'00'`), ATYP, BND.ADDR and BND.PORT.
    ///
    /// # Panics
    ///
    /// As [`Address::encode`].
    pub fn encode(&self, dst: &mut impl BufMut) {
        let Self { reply, address } = self;
        dst.put_u8(SOCKS5_VERSION);
        dst.put_u8((*reply).into());
        dst.put_u8(0);
        address.encode(dst);
    }

    /// How many bytes [`Response::encode`] writes: 3 + the address's.
    pub fn encoded_len(&self) -> usize {
        3 + self.address.encoded_len()
    }
}

impl UserPassRequest {
    /// Writes VER (`X'01'`), ULEN, UNAME, PLEN and PASSWD.
    ///
    /// # Panics
    ///
    /// If `username` is empty or over 255 bytes, or `password` is over 255 bytes.
    pub fn encode(&self, dst: &mut impl BufMut) {
        let Self { username, password } = self;
        assert!(!username.is_empty(), "RFC 1929 needs a non-empty username");
        dst.put_u8(USERPASS_VERSION);
        put_len_prefixed(dst, username, "username");
        put_len_prefixed(dst, password, "password");
    }

    /// How many bytes [`UserPassRequest::encode`] writes: 3 + username and password lengths.
    pub fn encoded_len(&self) -> usize {
        3 + self.username.len() + self.password.len()
    }
}

impl UserPassResponse {
    /// Writes VER (`X'01'`) and STATUS.
    pub fn encode(&self, dst: &mut impl BufMut) {
        let Self { status } = *self;
        dst.put_u8(USERPASS_VERSION);
        dst.put_u8(status);
    }

    /// How many bytes [`UserPassResponse::encode`] writes: always 2.
    pub fn encoded_len(&self) -> usize {
        2
    }
}

impl UdpHeader {
    /// Writes RSV (`X'0000'`), FRAG, ATYP, DST.ADDR and DST.PORT; the caller appends DATA.
    ///
    /// # Panics
    ///
    /// As [`Address::encode`].
    pub fn encode(&self, dst: &mut impl BufMut) {
        let Self { frag, address } = self;
        dst.put_u16(0);
        dst.put_u8(*frag);
        address.encode(dst);
    }

    /// How many bytes [`UdpHeader::encode`] writes: 3 + the address's. The payload of a
    /// datagram to the client may be at most the datagram limit minus this.
    pub fn encoded_len(&self) -> usize {
        3 + self.address.encoded_len()
    }
}

impl Socks4Request {
    /// Writes VN (4), CD, DSTPORT, DSTIP and USERID with its NUL, then for SOCKS4a (an
    /// [`Address::Domain`]) DSTIP 0.0.0.1 and the name with its NUL.
    ///
    /// # Panics
    ///
    /// If `user_id` is over 255 bytes or contains a NUL; if the address is IPv6, an IPv4
    /// address in 0.0.0.1-0.0.0.255 (on the wire that means SOCKS4a), or a domain that fails
    /// [`Address::is_valid_domain`].
    pub fn encode(&self, dst: &mut impl BufMut) {
        let Self {
            command,
            address,
            user_id,
        } = self;
        dst.put_u8(SOCKS4_VERSION);
        dst.put_u8((*command).into());
        dst.put_u16(address.port());
        match address {
            Address::Ip(SocketAddr::V4(addr)) => {
                let ip = addr.ip().octets();
                assert!(
                    !matches!(ip, [0, 0, 0, x] if x != 0),
                    "{addr} cannot be sent as SOCKS4: 0.0.0.x marks a SOCKS4a request"
                );
                dst.put_slice(&ip);
                put_nul_terminated(dst, user_id, "SOCKS4 user id");
            }
            Address::Ip(SocketAddr::V6(addr)) => {
                panic!("{addr} cannot be sent as SOCKS4: IPv4 only")
            }
            Address::Domain(name, _) => {
                assert!(
                    Address::is_valid_domain(name),
                    "domain {name:?} cannot be encoded: need 1 to 255 bytes without NUL"
                );
                dst.put_slice(&[0, 0, 0, 1]);
                put_nul_terminated(dst, user_id, "SOCKS4 user id");
                put_nul_terminated(dst, name.as_bytes(), "SOCKS4a domain");
            }
        }
    }

    /// How many bytes [`Socks4Request::encode`] writes: 9 + user id length, plus name
    /// length + 1 for SOCKS4a. Never panics.
    pub fn encoded_len(&self) -> usize {
        let domain = match &self.address {
            Address::Domain(name, _) => name.len() + 1,
            Address::Ip(_) => 0,
        };
        8 + self.user_id.len() + 1 + domain
    }
}

impl Socks4Response {
    /// Writes VN (0), CD, DSTPORT and DSTIP.
    pub fn encode(&self, dst: &mut impl BufMut) {
        let Self { reply, address } = *self;
        dst.put_u8(SOCKS4_REPLY_VERSION);
        dst.put_u8(reply.into());
        dst.put_u16(address.port());
        dst.put_slice(&address.ip().octets());
    }

    /// How many bytes [`Socks4Response::encode`] writes: always 8.
    pub fn encoded_len(&self) -> usize {
        8
    }
}
