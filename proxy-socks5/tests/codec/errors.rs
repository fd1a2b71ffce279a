//! Every error variant, which inputs produce it, and the reply it earns.

use proxy_socks5::{
    Address, DecodeError, Greeting, MethodSelection, Reply, Request, Response, Socks4Reply,
    Socks4Request, Socks4Response, UdpHeader, UserPassRequest, UserPassResponse, Wire,
};
use rstest::rstest;

use crate::support::assert_error;

const USERPASS_VERSION: DecodeError = DecodeError::Field {
    what: "username/password sub-negotiation version",
};

/// Decodes `bytes` as the named message type and returns the error.
fn decode_err(kind: &str, bytes: &[u8]) -> DecodeError {
    fn err<T: Wire>(bytes: &[u8]) -> DecodeError {
        match T::decode(bytes) {
            Ok((_, n)) => panic!("{bytes:02x?} decoded, {n} bytes"),
            Err(e) => e,
        }
    }
    match kind {
        "address" => err::<Address>(bytes),
        "greeting" => err::<Greeting>(bytes),
        "selection" => err::<MethodSelection>(bytes),
        "request" => err::<Request>(bytes),
        "response" => err::<Response>(bytes),
        "userpass" => err::<UserPassRequest>(bytes),
        "userpass_response" => err::<UserPassResponse>(bytes),
        "udp" => err::<UdpHeader>(bytes),
        "socks4" => err::<Socks4Request>(bytes),
        "socks4_response" => err::<Socks4Response>(bytes),
        other => unreachable!("{other}"),
    }
}

#[rstest]
// Version
#[case::greeting_socks4("greeting", b"\x04\x01\x00", DecodeError::Version { found: 4 })]
#[case::greeting_http("greeting", b"GET / HTTP/1.1\r\n", DecodeError::Version { found: b'G' })]
#[case::greeting_version_alone("greeting", b"\x06", DecodeError::Version { found: 6 })]
#[case::selection("selection", b"\x04\x00", DecodeError::Version { found: 4 })]
#[case::request("request", b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", DecodeError::Version { found: 4 })]
#[case::response("response", b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x50", DecodeError::Version { found: 0 })]
#[case::socks4_given_socks5("socks4", b"\x05\x01\x00", DecodeError::Version { found: 5 })]
#[case::socks4_response_vn4("socks4_response", b"\x04\x5a\x00\x00\x00\x00\x00\x00", DecodeError::Version { found: 4 })]
// NoMethods
#[case::no_methods("greeting", b"\x05\x00", DecodeError::NoMethods)]
#[case::no_methods_trailing("greeting", b"\x05\x00\x00\x01", DecodeError::NoMethods)]
// Command: reported as soon as the CMD byte arrives
#[case::command_zero("request", b"\x05\x00", DecodeError::Command { found: 0 })]
#[case::command_four("request", b"\x05\x04\x00\x01\x7f\x00\x00\x01\x00\x50", DecodeError::Command { found: 4 })]
#[case::command_ff("request", b"\x05\xff", DecodeError::Command { found: 0xff })]
#[case::socks4_command("socks4", b"\x04\x03", DecodeError::Command { found: 3 })]
#[case::socks4_command_zero("socks4", b"\x04\x00\x00\x50\x01\x02\x03\x04\x00", DecodeError::Command { found: 0 })]
// AddressType: reported as soon as the ATYP byte arrives
#[case::atyp_zero("request", b"\x05\x01\x00\x00", DecodeError::AddressType { found: 0 })]
#[case::atyp_two("request", b"\x05\x01\x00\x02\x7f\x00\x00\x01\x00\x50", DecodeError::AddressType { found: 2 })]
#[case::atyp_five_response("response", b"\x05\x00\x00\x05", DecodeError::AddressType { found: 5 })]
#[case::atyp_udp("udp", b"\x00\x00\x00\xff", DecodeError::AddressType { found: 0xff })]
#[case::atyp_bare("address", b"\x06", DecodeError::AddressType { found: 6 })]
// Domain
#[case::domain_empty("request", b"\x05\x01\x00\x03\x00\x00\x50", DecodeError::Domain)]
#[case::domain_empty_no_port_yet("request", b"\x05\x01\x00\x03\x00", DecodeError::Domain)]
#[case::domain_not_utf8(
    "request",
    b"\x05\x01\x00\x03\x02\xc3\x28\x00\x50",
    DecodeError::Domain
)]
#[case::domain_nul("request", b"\x05\x01\x00\x03\x03a\x00b\x00\x50", DecodeError::Domain)]
#[case::domain_udp("udp", b"\x00\x00\x00\x03\x01\xff\x00\x35", DecodeError::Domain)]
#[case::domain_response("response", b"\x05\x00\x00\x03\x00", DecodeError::Domain)]
#[case::socks4a_empty(
    "socks4",
    b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00",
    DecodeError::Domain
)]
#[case::socks4a_not_utf8(
    "socks4",
    b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\xff\xfe\x00",
    DecodeError::Domain
)]
// Field
#[case::userpass_version("userpass", b"\x05\x01\x00", USERPASS_VERSION)]
#[case::userpass_version_zero("userpass", b"\x00\x04user\x04pass", USERPASS_VERSION)]
#[case::userpass_empty_username("userpass", b"\x01\x00\x04pass", DecodeError::Field { what: "empty username" })]
#[case::userpass_response_version("userpass_response", b"\x05\x00", USERPASS_VERSION)]
#[case::socks4_reply_code("socks4_response", b"\x00\x00\x00\x00\x00\x00\x00\x00", DecodeError::Field { what: "SOCKS4 reply code" })]
#[case::socks4_reply_code_high("socks4_response", b"\x00\x5e", DecodeError::Field { what: "SOCKS4 reply code" })]
fn protocol_errors(#[case] kind: &str, #[case] bytes: &[u8], #[case] expected: DecodeError) {
    assert_eq!(decode_err(kind, bytes), expected);
}

#[rstest]
#[case::address("address")]
#[case::greeting("greeting")]
#[case::selection("selection")]
#[case::request("request")]
#[case::response("response")]
#[case::userpass("userpass")]
#[case::userpass_response("userpass_response")]
#[case::udp("udp")]
#[case::socks4("socks4")]
#[case::socks4_response("socks4_response")]
fn empty_input_is_incomplete(#[case] kind: &str) {
    assert_eq!(decode_err(kind, b""), DecodeError::Incomplete);
}

#[test]
fn a_truncated_datagram_is_incomplete() {
    assert_error::<UdpHeader>(
        b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00",
        DecodeError::Incomplete,
    );
}

#[rstest]
#[case::incomplete(DecodeError::Incomplete, None, None)]
#[case::version(DecodeError::Version { found: 4 }, None, None)]
#[case::no_methods(DecodeError::NoMethods, None, None)]
#[case::command(DecodeError::Command { found: 9 }, Some(Reply::CommandNotSupported), Some(Socks4Reply::Rejected))]
#[case::address_type(DecodeError::AddressType { found: 9 }, Some(Reply::AddressTypeNotSupported), None)]
#[case::domain(
    DecodeError::Domain,
    Some(Reply::GeneralFailure),
    Some(Socks4Reply::Rejected)
)]
#[case::field(DecodeError::Field { what: "x" }, None, None)]
fn replies(
    #[case] error: DecodeError,
    #[case] reply: Option<Reply>,
    #[case] socks4: Option<Socks4Reply>,
) {
    assert_eq!(error.reply(), reply);
    assert_eq!(error.socks4_reply(), socks4);
    assert_eq!(error.is_incomplete(), error == DecodeError::Incomplete);
}

#[test]
fn reply_codes_on_the_wire() {
    let code = |e: DecodeError| e.reply().map(u8::from);
    assert_eq!(code(DecodeError::Command { found: 9 }), Some(0x07));
    assert_eq!(code(DecodeError::AddressType { found: 9 }), Some(0x08));
    assert_eq!(code(DecodeError::Domain), Some(0x01));
}

#[rstest]
#[case(DecodeError::Incomplete, "incomplete message: more bytes needed")]
#[case(DecodeError::Version { found: 4 }, "unsupported protocol version 0x04")]
#[case(DecodeError::NoMethods, "greeting offers no authentication methods")]
#[case(DecodeError::Command { found: 0x0a }, "unknown command 0x0a")]
#[case(DecodeError::AddressType { found: 2 }, "unknown address type 0x02")]
#[case(DecodeError::Domain, "invalid domain name")]
#[case(DecodeError::Field { what: "empty username" }, "malformed field: empty username")]
fn display(#[case] error: DecodeError, #[case] text: &str) {
    assert_eq!(error.to_string(), text);
}

#[test]
fn is_a_std_error() {
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(DecodeError::Domain);
    assert!(boxed.source().is_none());
}
