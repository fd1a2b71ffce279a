//! SOCKS4 and SOCKS4a messages against literal bytes.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use proxy_socks5::{
    Address, DecodeError, Socks4Command, Socks4Reply, Socks4Request, Socks4Response, Wire,
    MAX_SOCKS4_REQUEST_LEN,
};
use rstest::rstest;

use crate::support::{
    assert_decodes, assert_error, assert_prefixes_incomplete, assert_round_trip, assert_wire,
};

fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> Address {
    Address::Ip(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(a, b, c, d),
        port,
    )))
}

fn request(command: Socks4Command, address: Address, user_id: &[u8]) -> Socks4Request {
    Socks4Request {
        command,
        address,
        user_id: user_id.to_vec(),
    }
}

#[rstest]
#[case::connect(
    request(Socks4Command::Connect, v4(192, 0, 2, 1, 80), b"fred"),
    b"\x04\x01\x00\x50\xc0\x00\x02\x01fred\x00"
)]
#[case::bind_no_user(
    request(Socks4Command::Bind, v4(10, 0, 0, 1, 8080), b""),
    b"\x04\x02\x1f\x90\x0a\x00\x00\x01\x00"
)]
#[case::unspecified_is_plain(
    request(Socks4Command::Connect, v4(0, 0, 0, 0, 1), b""),
    b"\x04\x01\x00\x01\x00\x00\x00\x00\x00"
)]
#[case::socks4a(
    request(Socks4Command::Connect, Address::Domain("ex.com".into(), 80), b"fred"),
    b"\x04\x01\x00\x50\x00\x00\x00\x01fred\x00ex.com\x00"
)]
#[case::socks4a_no_user(
    request(Socks4Command::Connect, Address::Domain("x".into(), 443), b""),
    b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00x\x00"
)]
fn socks4_request(#[case] value: Socks4Request, #[case] bytes: &[u8]) {
    assert_wire(&value, bytes);
}

#[test]
fn socks4a_marker_is_any_nonzero_last_octet() {
    let expected = request(Socks4Command::Connect, Address::Domain("h".into(), 1), b"");
    for x in [1, 2, 0x7f, 0xff] {
        let bytes = [4, 1, 0, 1, 0, 0, 0, x, 0, b'h', 0];
        assert_decodes(&bytes, &expected);
        // Re-encoding writes the canonical 0.0.0.1, same length.
        assert_eq!(expected.to_vec(), [4, 1, 0, 1, 0, 0, 0, 1, 0, b'h', 0]);
    }
}

#[test]
fn socks4_longest_fields() {
    let value = request(
        Socks4Command::Connect,
        Address::Domain("d".repeat(255), 1),
        &[b'u'; 255],
    );
    assert_eq!(value.encoded_len(), MAX_SOCKS4_REQUEST_LEN);
    assert_round_trip(&value);
    assert_round_trip(&request(
        Socks4Command::Bind,
        v4(1, 2, 3, 4, 5),
        &[0xff; 255],
    ));
}

#[test]
fn socks4_user_id_over_255_bytes_is_refused_without_waiting_for_nul() {
    let mut bytes = b"\x04\x01\x00\x50\x01\x02\x03\x04".to_vec();
    bytes.extend_from_slice(&[b'u'; 255]);
    // 255 bytes and no NUL yet: may still be valid.
    assert_error::<Socks4Request>(&bytes, DecodeError::Incomplete);
    bytes.push(b'u');
    assert_error::<Socks4Request>(
        &bytes,
        DecodeError::Field {
            what: "SOCKS4 user id over 255 bytes",
        },
    );
    bytes.push(0);
    assert_error::<Socks4Request>(
        &bytes,
        DecodeError::Field {
            what: "SOCKS4 user id over 255 bytes",
        },
    );
}

#[test]
fn socks4a_domain_over_255_bytes_is_refused_without_waiting_for_nul() {
    let mut bytes = b"\x04\x01\x00\x50\x00\x00\x00\x01\x00".to_vec();
    bytes.extend_from_slice(&[b'd'; 255]);
    assert_error::<Socks4Request>(&bytes, DecodeError::Incomplete);
    bytes.push(b'd');
    assert_error::<Socks4Request>(
        &bytes,
        DecodeError::Field {
            what: "SOCKS4a domain over 255 bytes",
        },
    );
}

#[test]
fn socks4a_prefixes_including_the_domain_are_incomplete() {
    let bytes = b"\x04\x01\x00\x50\x00\x00\x00\x01fred\x00example.org\x00";
    assert_prefixes_incomplete::<Socks4Request>(bytes);
}

#[rstest]
#[case::granted(
    Socks4Reply::Granted,
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
    b"\x00\x5a\x00\x00\x00\x00\x00\x00"
)]
#[case::rejected(
    Socks4Reply::Rejected,
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
    b"\x00\x5b\x00\x00\x00\x00\x00\x00"
)]
#[case::no_identd(
    Socks4Reply::NoIdentd,
    SocketAddrV4::new(Ipv4Addr::new(1, 2, 3, 4), 0x1234),
    b"\x00\x5c\x12\x34\x01\x02\x03\x04"
)]
#[case::ident_mismatch(
    Socks4Reply::IdentMismatch,
    SocketAddrV4::new(Ipv4Addr::BROADCAST, 65535),
    b"\x00\x5d\xff\xff\xff\xff\xff\xff"
)]
fn socks4_response(
    #[case] reply: Socks4Reply,
    #[case] address: SocketAddrV4,
    #[case] bytes: &[u8],
) {
    assert_wire(&Socks4Response { reply, address }, bytes);
}

#[test]
fn socks4_codes_round_trip_through_u8() {
    for code in 0..=u8::MAX {
        if let Ok(command) = Socks4Command::try_from(code) {
            assert_eq!(u8::from(command), code);
        }
        if let Ok(reply) = Socks4Reply::try_from(code) {
            assert_eq!(u8::from(reply), code);
        }
    }
    assert_eq!(
        Socks4Command::try_from(3),
        Err(DecodeError::Command { found: 3 })
    );
    assert_eq!(
        Socks4Reply::try_from(94),
        Err(DecodeError::Field {
            what: "SOCKS4 reply code"
        })
    );
}

#[rstest]
#[case::ipv6(|| { request(Socks4Command::Connect, "[::1]:1".parse::<SocketAddr>().unwrap().into(), b"").to_vec(); })]
#[case::socks4a_marker_as_ip(|| { request(Socks4Command::Connect, v4(0, 0, 0, 9, 1), b"").to_vec(); })]
#[case::nul_in_user_id(|| { request(Socks4Command::Connect, v4(1, 1, 1, 1, 1), b"a\0b").to_vec(); })]
#[case::long_user_id(|| { request(Socks4Command::Connect, v4(1, 1, 1, 1, 1), &[1; 256]).to_vec(); })]
#[case::long_domain(|| { request(Socks4Command::Connect, Address::Domain("d".repeat(256), 1), b"").to_vec(); })]
#[case::empty_domain(|| { request(Socks4Command::Connect, Address::Domain(String::new(), 1), b"").to_vec(); })]
#[should_panic]
fn unencodable_socks4_values_panic(#[case] encode: fn()) {
    encode();
}
