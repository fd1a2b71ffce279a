//! SOCKS5 (RFC 1928) and username/password (RFC 1929) messages against literal bytes.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use proxy_socks5::{
    Address, Command, Greeting, Method, MethodSelection, Reply, Request, Response, UdpHeader,
    UserPassRequest, UserPassResponse, Wire, MAX_ADDRESS_LEN, MAX_GREETING_LEN, MAX_REQUEST_LEN,
    MAX_RESPONSE_LEN, MAX_UDP_HEADER_LEN, MAX_USERPASS_REQUEST_LEN,
};
use rstest::rstest;

use crate::support::{assert_decodes, assert_round_trip, assert_wire};

fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> Address {
    Address::Ip(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(a, b, c, d),
        port,
    )))
}

fn v6(ip: Ipv6Addr, port: u16) -> Address {
    Address::Ip(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)))
}

fn domain(name: &str, port: u16) -> Address {
    Address::Domain(name.to_owned(), port)
}

/// A domain of exactly `len` bytes.
fn long_name(len: usize) -> String {
    "a".repeat(len)
}

#[rstest]
#[case::no_auth(&[Method::NoAuth], b"\x05\x01\x00")]
#[case::two(&[Method::NoAuth, Method::UserPass], b"\x05\x02\x00\x02")]
#[case::all_named(
    &[Method::Gssapi, Method::UserPass, Method::NoAcceptable, Method::Other(0x80), Method::Other(0x03)],
    b"\x05\x05\x01\x02\xff\x80\x03"
)]
#[case::duplicates_kept(&[Method::UserPass, Method::UserPass], b"\x05\x02\x02\x02")]
fn greeting(#[case] methods: &[Method], #[case] bytes: &[u8]) {
    assert_wire(
        &Greeting {
            methods: methods.to_vec(),
        },
        bytes,
    );
}

#[test]
fn greeting_with_255_methods() {
    let methods: Vec<Method> = (0..=254).map(Method::from).collect();
    let greeting = Greeting { methods };
    let bytes = greeting.to_vec();
    assert_eq!(bytes.len(), MAX_GREETING_LEN);
    assert_eq!(&bytes[..4], b"\x05\xff\x00\x01");
    assert_eq!(bytes[256], 0xfe);
    assert_round_trip(&greeting);
}

#[rstest]
#[case::no_auth(Method::NoAuth, b"\x05\x00")]
#[case::user_pass(Method::UserPass, b"\x05\x02")]
#[case::no_acceptable(Method::NoAcceptable, b"\x05\xff")]
#[case::other(Method::Other(0x42), b"\x05\x42")]
fn method_selection(#[case] method: Method, #[case] bytes: &[u8]) {
    assert_wire(&MethodSelection { method }, bytes);
}

#[rstest]
#[case::connect_v4(
    Command::Connect,
    v4(127, 0, 0, 1, 1080),
    b"\x05\x01\x00\x01\x7f\x00\x00\x01\x04\x38"
)]
#[case::bind_domain(Command::Bind, domain("a.b", 80), b"\x05\x02\x00\x03\x03a.b\x00\x50")]
#[case::udp_v6(
    Command::UdpAssociate,
    v6(Ipv6Addr::LOCALHOST, 53),
    b"\x05\x03\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x35"
)]
#[case::connect_unspecified(
    Command::Connect,
    Address::UNSPECIFIED,
    b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"
)]
#[case::port_max(
    Command::Connect,
    domain("example.com", 65535),
    b"\x05\x01\x00\x03\x0bexample.com\xff\xff"
)]
#[case::utf8_name(
    Command::Connect,
    domain("b\u{fc}cher.de", 443),
    b"\x05\x01\x00\x03\x0ab\xc3\xbccher.de\x01\xbb"
)]
fn request(#[case] command: Command, #[case] address: Address, #[case] bytes: &[u8]) {
    assert_wire(&Request { command, address }, bytes);
}

#[test]
fn request_with_longest_domain() {
    let request = Request {
        command: Command::Connect,
        address: domain(&long_name(255), 443),
    };
    let bytes = request.to_vec();
    assert_eq!(bytes.len(), MAX_REQUEST_LEN);
    assert_eq!(&bytes[..5], b"\x05\x01\x00\x03\xff");
    assert_eq!(&bytes[260..], b"\x01\xbb");
    assert_round_trip(&request);
}

#[test]
fn request_rsv_is_ignored_on_decode() {
    let expected = Request {
        command: Command::Connect,
        address: v4(10, 0, 0, 1, 80),
    };
    assert_decodes(b"\x05\x01\xff\x01\x0a\x00\x00\x01\x00\x50", &expected);
}

#[rstest]
#[case::succeeded_v4(
    Reply::Succeeded,
    v4(10, 0, 0, 1, 40000),
    b"\x05\x00\x00\x01\x0a\x00\x00\x01\x9c\x40"
)]
#[case::failure_unspecified(
    Reply::GeneralFailure,
    Address::UNSPECIFIED,
    b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"
)]
#[case::not_allowed(
    Reply::NotAllowed,
    Address::UNSPECIFIED,
    b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"
)]
#[case::net_unreachable(
    Reply::NetworkUnreachable,
    Address::UNSPECIFIED,
    b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"
)]
#[case::host_unreachable(
    Reply::HostUnreachable,
    Address::UNSPECIFIED,
    b"\x05\x04\x00\x01\x00\x00\x00\x00\x00\x00"
)]
#[case::refused(
    Reply::ConnectionRefused,
    Address::UNSPECIFIED,
    b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"
)]
#[case::ttl(
    Reply::TtlExpired,
    Address::UNSPECIFIED,
    b"\x05\x06\x00\x01\x00\x00\x00\x00\x00\x00"
)]
#[case::command(
    Reply::CommandNotSupported,
    Address::UNSPECIFIED,
    b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"
)]
#[case::atyp(
    Reply::AddressTypeNotSupported,
    Address::UNSPECIFIED,
    b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00"
)]
#[case::other(
    Reply::Other(0x09),
    Address::UNSPECIFIED,
    b"\x05\x09\x00\x01\x00\x00\x00\x00\x00\x00"
)]
#[case::v6(
    Reply::Succeeded,
    v6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 1080),
    b"\x05\x00\x00\x04\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x04\x38"
)]
#[case::domain(
    Reply::Succeeded,
    domain("proxy.example", 1080),
    b"\x05\x00\x00\x03\x0dproxy.example\x04\x38"
)]
fn response(#[case] reply: Reply, #[case] address: Address, #[case] bytes: &[u8]) {
    assert_wire(&Response { reply, address }, bytes);
}

#[test]
fn response_rsv_is_ignored_on_decode() {
    let expected = Response {
        reply: Reply::Succeeded,
        address: v4(1, 2, 3, 4, 5),
    };
    assert_decodes(b"\x05\x00\x01\x01\x01\x02\x03\x04\x00\x05", &expected);
}

#[rstest]
#[case::simple(b"user", b"pass", b"\x01\x04user\x04pass")]
#[case::empty_password(b"u", b"", b"\x01\x01u\x00")]
#[case::binary(b"\x00\xff", b"\x00", b"\x01\x02\x00\xff\x01\x00")]
fn userpass_request(#[case] username: &[u8], #[case] password: &[u8], #[case] bytes: &[u8]) {
    assert_wire(
        &UserPassRequest {
            username: username.to_vec(),
            password: password.to_vec(),
        },
        bytes,
    );
}

#[test]
fn userpass_request_longest() {
    let request = UserPassRequest {
        username: vec![b'u'; 255],
        password: vec![b'p'; 255],
    };
    let bytes = request.to_vec();
    assert_eq!(bytes.len(), MAX_USERPASS_REQUEST_LEN);
    assert_eq!(&bytes[..2], b"\x01\xff");
    assert_eq!(bytes[257], 0xff);
    assert_round_trip(&request);
}

#[test]
fn userpass_request_debug_hides_password() {
    let request = UserPassRequest {
        username: b"alice".to_vec(),
        password: b"hunter2".to_vec(),
    };
    let debug = format!("{request:?}");
    assert!(debug.contains("alice"), "{debug}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("7 bytes redacted"), "{debug}");
}

#[rstest]
#[case::success(UserPassResponse::SUCCESS, b"\x01\x00", true)]
#[case::failure(UserPassResponse::FAILURE, b"\x01\x01", false)]
#[case::other_failure(UserPassResponse { status: 0xff }, b"\x01\xff", false)]
fn userpass_response(
    #[case] response: UserPassResponse,
    #[case] bytes: &[u8],
    #[case] success: bool,
) {
    assert_wire(&response, bytes);
    assert_eq!(response.is_success(), success);
}

#[rstest]
#[case::v4(0, v4(8, 8, 8, 8, 53), b"\x00\x00\x00\x01\x08\x08\x08\x08\x00\x35")]
#[case::fragment(
    1,
    domain("dns.example", 53),
    b"\x00\x00\x01\x03\x0bdns.example\x00\x35"
)]
#[case::v6(
    0x81,
    v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2), 4000),
    b"\x00\x00\x81\x04\xfe\x80\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x0f\xa0"
)]
fn udp_header(#[case] frag: u8, #[case] address: Address, #[case] bytes: &[u8]) {
    assert_wire(&UdpHeader { frag, address }, bytes);
}

#[test]
fn udp_header_leaves_payload() {
    let datagram = b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35payload";
    let (header, len) = UdpHeader::decode(datagram).unwrap();
    assert_eq!(
        header,
        UdpHeader {
            frag: 0,
            address: v4(127, 0, 0, 1, 53)
        }
    );
    assert_eq!(&datagram[len..], b"payload");
}

#[test]
fn udp_header_rsv_is_ignored_on_decode() {
    assert_decodes(
        b"\x12\x34\x00\x01\x7f\x00\x00\x01\x00\x35",
        &UdpHeader {
            frag: 0,
            address: v4(127, 0, 0, 1, 53),
        },
    );
}

#[test]
fn udp_header_longest() {
    let header = UdpHeader {
        frag: 0,
        address: domain(&long_name(255), 1),
    };
    assert_eq!(header.encoded_len(), MAX_UDP_HEADER_LEN);
    assert_round_trip(&header);
}

#[rstest]
#[case::v4(v4(192, 0, 2, 1, 80), b"\x01\xc0\x00\x02\x01\x00\x50", "192.0.2.1:80")]
#[case::v6(
    v6(Ipv6Addr::LOCALHOST, 443),
    b"\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x01\xbb",
    "[::1]:443"
)]
#[case::domain(
    domain("example.com", 443),
    b"\x03\x0bexample.com\x01\xbb",
    "example.com:443"
)]
#[case::one_byte_name(domain("x", 0), b"\x03\x01x\x00\x00", "x:0")]
fn address_codec(#[case] address: Address, #[case] bytes: &[u8], #[case] display: &str) {
    assert_wire(&address, bytes);
    assert_eq!(address.to_string(), display);
}

#[test]
fn address_helpers() {
    assert_eq!(Address::UNSPECIFIED.to_string(), "0.0.0.0:0");
    assert_eq!(Address::MAX_LEN, MAX_ADDRESS_LEN);
    assert_eq!(domain("x", 7).port(), 7);
    assert_eq!(v4(1, 1, 1, 1, 9).port(), 9);
    let sa: SocketAddr = "[::1]:5".parse().unwrap();
    assert_eq!(Address::from(sa), Address::Ip(sa));
    assert!(Address::is_valid_domain("a"));
    assert!(Address::is_valid_domain(&long_name(255)));
    assert!(!Address::is_valid_domain(""));
    assert!(!Address::is_valid_domain(&long_name(256)));
    assert!(!Address::is_valid_domain("a\0b"));
}

#[test]
fn ipv6_flow_info_and_scope_are_not_on_the_wire() {
    let scoped = Address::Ip(SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::LOCALHOST,
        1,
        7,
        3,
    )));
    let (decoded, _) = Address::decode(&scoped.to_vec()).unwrap();
    assert_eq!(decoded, v6(Ipv6Addr::LOCALHOST, 1));
}

#[test]
fn max_lens_match_the_longest_encodings() {
    assert_eq!(
        MAX_RESPONSE_LEN,
        Response {
            reply: Reply::Succeeded,
            address: domain(&long_name(255), 1)
        }
        .encoded_len()
    );
    assert_eq!(
        <MethodSelection as Wire>::MAX_LEN,
        MethodSelection {
            method: Method::NoAuth
        }
        .encoded_len()
    );
    assert_eq!(
        <UserPassResponse as Wire>::MAX_LEN,
        UserPassResponse::SUCCESS.encoded_len()
    );
}

#[test]
fn codes_round_trip_through_u8() {
    for code in 0..=u8::MAX {
        assert_eq!(u8::from(Method::from(code)), code);
        assert_eq!(u8::from(Reply::from(code)), code);
        if let Ok(command) = Command::try_from(code) {
            assert_eq!(u8::from(command), code);
        }
    }
    assert_eq!(Method::from(0x7f), Method::Other(0x7f));
    assert_eq!(Reply::from(0xff), Reply::Other(0xff));
    assert_eq!(
        (1..=3)
            .map(Command::try_from)
            .collect::<Result<Vec<_>, _>>(),
        Ok(vec![Command::Connect, Command::Bind, Command::UdpAssociate])
    );
}

#[rstest]
#[case::empty_greeting(|| { Greeting { methods: vec![] }.to_vec(); })]
#[case::too_many_methods(|| { Greeting { methods: vec![Method::NoAuth; 256] }.to_vec(); })]
#[case::long_domain(|| { domain(&long_name(256), 1).to_vec(); })]
#[case::empty_domain(|| { Request { command: Command::Connect, address: domain("", 1) }.to_vec(); })]
#[case::nul_in_domain(|| { UdpHeader { frag: 0, address: domain("a\0", 1) }.to_vec(); })]
#[case::empty_username(|| { UserPassRequest { username: vec![], password: vec![] }.to_vec(); })]
#[case::long_password(|| { UserPassRequest { username: vec![1], password: vec![1; 256] }.to_vec(); })]
#[should_panic]
fn unencodable_values_panic(#[case] encode: fn()) {
    encode();
}

#[test]
fn encoded_len_does_not_panic_on_unencodable_values() {
    assert_eq!(domain(&long_name(300), 1).encoded_len(), 304);
    assert_eq!(Greeting { methods: vec![] }.encoded_len(), 2);
}
