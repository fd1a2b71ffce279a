//! SOCKS4, SOCKS4a and SOCKS5 wire codec: RFC 1928 (SOCKS5), RFC 1929 (username/password
//! authentication) and the SOCKS4/4a protocol notes.
//!
//! The crate is pure: no sockets, no async runtime, no clock, only `bytes` and `thiserror`.
//! That keeps the protocol logic unit-testable with byte literals and fuzzable without
//! building the daemon or its eBPF programs.
//!
//! Every message type has the same three operations (also available generically through
//! [`Wire`]):
//!
//! - `fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError>` parses one message from the
//!   front of `src` and returns it with the number of bytes it took. Bytes after the message
//!   (a client's pipelined request or payload) are not touched: the caller keeps them.
//!   [`DecodeError::Incomplete`] means "read more and call again"; it is returned for every
//!   strict prefix of a valid message, and never once a buffer holds [`Wire::MAX_LEN`] bytes.
//! - `fn encode(&self, dst: &mut impl BufMut)` writes the exact wire bytes.
//! - `fn encoded_len(&self) -> usize` says how many bytes `encode` will write.
//!
//! Decoders never panic, whatever the input.
//!
//! ```
//! use proxy_socks5::{Address, Command, DecodeError, Greeting, Method, Request};
//!
//! // A client that sends its greeting and request back to back, then payload.
//! let input = b"\x05\x01\x00\x05\x01\x00\x03\x0bexample.com\x01\xbbGET /";
//! let (greeting, used) = Greeting::decode(input)?;
//! assert_eq!(greeting.methods, [Method::NoAuth]);
//! let (request, used2) = Request::decode(&input[used..])?;
//! assert_eq!(request.command, Command::Connect);
//! assert_eq!(request.address, Address::Domain("example.com".into(), 443));
//! assert_eq!(&input[used + used2..], b"GET /");
//!
//! // A partial message asks for more bytes instead of failing.
//! assert_eq!(Request::decode(&input[used..used + 5]), Err(DecodeError::Incomplete));
//! # Ok::<(), DecodeError>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod decode;
mod encode;
mod error;
mod types;

use bytes::BufMut;

pub use crate::{
    error::DecodeError,
    types::{
        Address, Command, Greeting, Method, MethodSelection, Reply, Request, Response,
        Socks4Command, Socks4Reply, Socks4Request, Socks4Response, UdpHeader, UserPassRequest,
        UserPassResponse,
    },
};

/// VER of every SOCKS5 message; a connection's first byte tells SOCKS5 from SOCKS4.
pub const SOCKS5_VERSION: u8 = 5;
/// VN of a SOCKS4/4a request; a connection's first byte tells SOCKS4 from SOCKS5.
pub const SOCKS4_VERSION: u8 = 4;
/// VN of a SOCKS4 reply, which is 0 rather than 4.
pub const SOCKS4_REPLY_VERSION: u8 = 0;
/// VER of both RFC 1929 username/password messages (the sub-negotiation version).
pub const USERPASS_VERSION: u8 = 1;

pub(crate) const ATYP_IPV4: u8 = 0x01;
pub(crate) const ATYP_DOMAIN: u8 = 0x03;
pub(crate) const ATYP_IPV6: u8 = 0x04;

/// Longest domain name a SOCKS5 address can carry (its length is one octet); SOCKS4a names
/// are held to the same bound.
pub const MAX_DOMAIN_LEN: usize = 255;
/// Longest SOCKS4 USERID or SOCKS4a DOMAIN accepted, NUL excluded. The protocol sets no
/// limit; this one stops a peer that never sends the NUL from growing the caller's buffer.
pub const MAX_SOCKS4_FIELD_LEN: usize = 255;

/// Longest encoded [`Address`]: ATYP, length octet, 255-byte name, port.
pub const MAX_ADDRESS_LEN: usize = 1 + 1 + MAX_DOMAIN_LEN + 2;
/// Longest [`Greeting`]: VER, NMETHODS, 255 methods.
pub const MAX_GREETING_LEN: usize = 2 + 255;
/// Longest [`UserPassRequest`]: VER, ULEN, 255-byte UNAME, PLEN, 255-byte PASSWD.
pub const MAX_USERPASS_REQUEST_LEN: usize = 3 + 255 + 255;
/// Longest [`Request`]: VER, CMD, RSV, longest address.
pub const MAX_REQUEST_LEN: usize = 3 + MAX_ADDRESS_LEN;
/// Longest [`Response`]: VER, REP, RSV, longest address.
pub const MAX_RESPONSE_LEN: usize = 3 + MAX_ADDRESS_LEN;
/// Longest [`UdpHeader`]: RSV, FRAG, longest address.
pub const MAX_UDP_HEADER_LEN: usize = 3 + MAX_ADDRESS_LEN;
/// Longest [`Socks4Request`]: fixed 8 bytes, USERID + NUL, DOMAIN + NUL.
pub const MAX_SOCKS4_REQUEST_LEN: usize = 8 + (MAX_SOCKS4_FIELD_LEN + 1) * 2;
/// Longest message a client can send during negotiation, of any protocol version: a buffer
/// this big is enough for every handshake step.
pub const MAX_CLIENT_MESSAGE_LEN: usize = {
    let lens = [
        MAX_GREETING_LEN,
        MAX_USERPASS_REQUEST_LEN,
        MAX_REQUEST_LEN,
        MAX_SOCKS4_REQUEST_LEN,
    ];
    let mut max = 0;
    let mut i = 0;
    while i < lens.len() {
        if lens[i] > max {
            max = lens[i];
        }
        i += 1;
    }
    max
};

/// The operations every message type has, for code that is generic over the message it
/// reads or writes (a read-until-complete loop, tests, fuzz targets).
///
/// Each method delegates to the type's inherent method of the same name, so callers that know
/// the type need not import this trait.
pub trait Wire: Sized {
    /// Longest encoding of this type. A buffer holding this many bytes is enough to decode
    /// it: the decoder returns a message or a protocol error, never
    /// [`DecodeError::Incomplete`]. Read no more than this before giving up on a peer.
    const MAX_LEN: usize;

    /// Decodes one message from the front of `src`; returns it and the number of bytes
    /// consumed, leaving the rest of `src` to the caller.
    fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError>;

    /// Writes the message's exact wire bytes.
    fn encode(&self, dst: &mut impl BufMut);

    /// How many bytes [`Wire::encode`] writes.
    fn encoded_len(&self) -> usize;

    /// The wire bytes in a new `Vec`, for callers that write whole messages at once.
    fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out
    }
}

macro_rules! impl_wire {
    ($($ty:ty => $max:expr),* $(,)?) => {$(
        impl Wire for $ty {
            const MAX_LEN: usize = $max;

            fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError> {
                <$ty>::decode(src)
            }

            fn encode(&self, dst: &mut impl BufMut) {
                <$ty>::encode(self, dst)
            }

            fn encoded_len(&self) -> usize {
                <$ty>::encoded_len(self)
            }
        }
    )*};
}

impl_wire! {
    Address => MAX_ADDRESS_LEN,
    Greeting => MAX_GREETING_LEN,
    MethodSelection => 2,
    Request => MAX_REQUEST_LEN,
    Response => MAX_RESPONSE_LEN,
    UserPassRequest => MAX_USERPASS_REQUEST_LEN,
    UserPassResponse => 2,
    UdpHeader => MAX_UDP_HEADER_LEN,
    Socks4Request => MAX_SOCKS4_REQUEST_LEN,
    Socks4Response => 8,
}
