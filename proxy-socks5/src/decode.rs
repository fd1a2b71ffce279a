//! Decoders: `&[u8]` in, `(message, bytes consumed)` out.
//!
//! Every decoder reads through [`Reader`], whose accessors fail with
//! [`DecodeError::Incomplete`] when the buffer runs out, and checks each field as soon as it
//! has it. So a strict prefix of a valid message is always `Incomplete` (a valid message has
//! no bad field to trip over), a bad field is reported as soon as it arrives, and nothing
//! indexes past the end of the input.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use crate::{
    error::DecodeError,
    types::{
        Address, Command, Greeting, Method, MethodSelection, Reply, Request, Response,
        Socks4Command, Socks4Reply, Socks4Request, Socks4Response, UdpHeader, UserPassRequest,
        UserPassResponse,
    },
    ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6, MAX_SOCKS4_FIELD_LEN, SOCKS4_REPLY_VERSION, SOCKS4_VERSION,
    SOCKS5_VERSION, USERPASS_VERSION,
};

/// A bounds-checked cursor over the input.
struct Reader<'a> {
    src: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(src: &'a [u8]) -> Self {
        Self { src, pos: 0 }
    }

    /// How many bytes have been read so far.
    fn consumed(&self) -> usize {
        self.pos
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let rest = self.src.get(self.pos..).unwrap_or_default();
        let taken = rest.get(..n).ok_or(DecodeError::Incomplete)?;
        self.pos += n;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        let [b] = self.array()?;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    /// Reads the version byte and checks it.
    fn version(&mut self, expected: u8) -> Result<(), DecodeError> {
        match self.u8()? {
            found if found == expected => Ok(()),
            found => Err(DecodeError::Version { found }),
        }
    }

    /// Reads a NUL-terminated field of at most `max` bytes (NUL excluded) and consumes the NUL.
    ///
    /// Fails with `too_long` once `max + 1` bytes have arrived without a NUL, rather than
    /// asking for more forever.
    fn nul_terminated(
        &mut self,
        max: usize,
        too_long: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        let rest = self.src.get(self.pos..).unwrap_or_default();
        let window = &rest[..rest.len().min(max + 1)];
        match window.iter().position(|&b| b == 0) {
            Some(len) => {
                let field = &rest[..len];
                self.pos += len + 1;
                Ok(field)
            }
            None if window.len() > max => Err(DecodeError::Field { what: too_long }),
            None => Err(DecodeError::Incomplete),
        }
    }
}

/// Checks a domain name's bytes: non-empty, UTF-8, no NUL. The length limit of 255 is the
/// caller's (the SOCKS5 length byte enforces it by construction).
fn domain(bytes: &[u8]) -> Result<String, DecodeError> {
    if bytes.is_empty() || bytes.contains(&0) {
        return Err(DecodeError::Domain);
    }
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| DecodeError::Domain)
}

/// ATYP, ADDR and PORT, shared by requests, responses and UDP headers.
fn address(r: &mut Reader<'_>) -> Result<Address, DecodeError> {
    match r.u8()? {
        ATYP_IPV4 => {
            let ip = Ipv4Addr::from(r.array::<4>()?);
            let port = r.u16()?;
            Ok(Address::Ip(SocketAddr::V4(SocketAddrV4::new(ip, port))))
        }
        ATYP_DOMAIN => {
            let len = r.u8()?;
            if len == 0 {
                return Err(DecodeError::Domain);
            }
            let name = domain(r.bytes(usize::from(len))?)?;
            let port = r.u16()?;
            Ok(Address::Domain(name, port))
        }
        ATYP_IPV6 => {
            let ip = Ipv6Addr::from(r.array::<16>()?);
            let port = r.u16()?;
            Ok(Address::Ip(SocketAddr::V6(SocketAddrV6::new(
                ip, port, 0, 0,
            ))))
        }
        found => Err(DecodeError::AddressType { found }),
    }
}

impl Address {
    /// Decodes ATYP, ADDR and PORT on their own, for framing this crate does not cover.
    /// Returns the address and the number of bytes consumed.
    pub fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(src);
        let addr = address(&mut r)?;
        Ok((addr, r.consumed()))
    }
}

impl Greeting {
    /// Decodes a greeting from the front of `src`; returns it and the number of bytes
    /// consumed. Bytes after it (an eager client's request) are left alone.
    pub fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(src);
        r.version(SOCKS5_VERSION)?;
        let n = r.u8()?;
        if n == 0 {
            return Err(DecodeError::NoMethods);
        }
        let methods = r
            .bytes(usize::from(n))?
            .iter()
            .copied()
            .map(Method::from)
            .collect();
        Ok((Self { methods }, r.consumed()))
    }
}

impl MethodSelection {
    /// Decodes a method selection from the front of `src`; returns it and the number of
    /// bytes consumed.
    pub fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(src);
        r.version(SOCKS5_VERSION)?;
        let method = Method::from(r.u8()?);
        Ok((Self { method }, r.consumed()))
    }
}

impl Request {
    /// Decodes a request from the front of `src`; returns it and the number of bytes
    /// consumed. Bytes after it (pipelined payload) are left alone.
    ///
    /// An unknown CMD or ATYP fails as soon as that byte arrives, so the server can reply
    /// without waiting for the rest.
    pub fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(src);
        r.version(SOCKS5_VERSION)?;
        let command = Command::try_from(r.u8()?)?;
        let _rsv = r.u8()?;
        let address = address(&mut r)?;
        Ok((Self { command, address }, r.consumed()))
    }
}

impl Response {
    /// Decodes a response from the front of `src`; returns it and the number of bytes
    /// consumed. Bytes after it (data the target already sent) are left alone.
    pub fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(src);
        r.version(SOCKS5_VERSION)?;
        let reply = Reply::from(r.u8()?);
        let _rsv = r.u8()?;
        let address = address(&mut r)?;
        Ok((Self { reply, address }, r.consumed()))
    }
}

impl UserPassRequest {
    /// Decodes a username/password request from the front of `src`; returns it and the
    /// number of bytes consumed. Bytes after it (an eager client's request) are left alone.
    pub fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(src);
        if r.u8()? != USERPASS_VERSION {
            return Err(DecodeError::Field {
                what: "username/password sub-negotiation version",
            });
        }
        let ulen = r.u8()?;
        if ulen == 0 {
            return Err(DecodeError::Field {
                what: "empty username",
            });
        }
        let username = r.bytes(usize::from(ulen))?.to_vec();
        let plen = r.u8()?;
        let password = r.bytes(usize::from(plen))?.to_vec();
        Ok((Self { username, password }, r.consumed()))
    }
}

impl UserPassResponse {
    /// Decodes a username/password response from the front of `src`; returns it and the
    /// number of bytes consumed.
    pub fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(src);
        if r.u8()? != USERPASS_VERSION {
            return Err(DecodeError::Field {
                what: "username/password sub-negotiation version",
            });
        }
        let status = r.u8()?;
        Ok((Self { status }, r.consumed()))
    }
}

impl UdpHeader {
    /// Decodes the header at the front of a datagram; returns it and the header length, so
    /// the payload is `&src[len..]`.
    pub fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(src);
        let _rsv = r.u16()?;
        let frag = r.u8()?;
        let address = address(&mut r)?;
        Ok((Self { frag, address }, r.consumed()))
    }
}

impl Socks4Request {
    /// Decodes a SOCKS4 or SOCKS4a request from the front of `src`; returns it and the number
    /// of bytes consumed. Bytes after it (pipelined payload) are left alone.
    pub fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(src);
        r.version(SOCKS4_VERSION)?;
        let command = Socks4Command::try_from(r.u8()?)?;
        let port = r.u16()?;
        let ip = r.array::<4>()?;
        let user_id = r
            .nul_terminated(MAX_SOCKS4_FIELD_LEN, "SOCKS4 user id over 255 bytes")?
            .to_vec();
        let address = match ip {
            [0, 0, 0, x] if x != 0 => {
                let name =
                    r.nul_terminated(MAX_SOCKS4_FIELD_LEN, "SOCKS4a domain over 255 bytes")?;
                Address::Domain(domain(name)?, port)
            }
            _ => Address::Ip(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port))),
        };
        Ok((
            Self {
                command,
                address,
                user_id,
            },
            r.consumed(),
        ))
    }
}

impl Socks4Response {
    /// Decodes a SOCKS4 reply from the front of `src`; returns it and the number of bytes
    /// consumed. Bytes after it (data the target already sent) are left alone.
    pub fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(src);
        r.version(SOCKS4_REPLY_VERSION)?;
        let reply = Socks4Reply::try_from(r.u8()?)?;
        let port = r.u16()?;
        let ip = Ipv4Addr::from(r.array::<4>()?);
        Ok((
            Self {
                reply,
                address: SocketAddrV4::new(ip, port),
            },
            r.consumed(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.bytes(4), Err(DecodeError::Incomplete));
        assert_eq!(r.consumed(), 0);
        assert_eq!(r.u16(), Ok(0x0102));
        assert_eq!(r.u16(), Err(DecodeError::Incomplete));
        assert_eq!(r.u8(), Ok(3));
        assert_eq!(r.u8(), Err(DecodeError::Incomplete));
        assert_eq!(r.bytes(0), Ok(&[][..]));
        assert_eq!(r.consumed(), 3);
    }

    #[test]
    fn nul_terminated_is_bounded() {
        let long = [b'a'; 3];
        assert_eq!(
            Reader::new(&long).nul_terminated(2, "x"),
            Err(DecodeError::Field { what: "x" })
        );
        assert_eq!(
            Reader::new(&long[..2]).nul_terminated(2, "x"),
            Err(DecodeError::Incomplete)
        );
        let mut r = Reader::new(b"ab\0c");
        assert_eq!(r.nul_terminated(2, "x"), Ok(&b"ab"[..]));
        assert_eq!(r.consumed(), 3);
        assert_eq!(r.nul_terminated(2, "x"), Err(DecodeError::Incomplete));
    }
}
