//! Checks shared by every message type's tests.

use std::fmt::Debug;

use proxy_socks5::{DecodeError, Wire};

/// Bytes a client might pipeline after a message; no decoder may consume them.
pub const TRAILER: &[u8] = b"\x05\x01\x00GET / HTTP/1.1\r\n";

/// Every strict prefix of `bytes` (including the empty one) decodes as `Incomplete`.
pub fn assert_prefixes_incomplete<T: Wire + Debug>(bytes: &[u8]) {
    for end in 0..bytes.len() {
        assert_eq!(
            T::decode(&bytes[..end]).map(|(_, n)| n),
            Err(DecodeError::Incomplete),
            "prefix of {end} of {} bytes: {:02x?}",
            bytes.len(),
            &bytes[..end]
        );
    }
}

/// `value` encodes to exactly `bytes`, `bytes` decodes to exactly `value` whether or not
/// more bytes follow, and every strict prefix of `bytes` is `Incomplete`.
pub fn assert_wire<T: Wire + Debug + PartialEq>(value: &T, bytes: &[u8]) {
    assert_encodes(value, bytes);
    assert_decodes(bytes, value);
}

/// `value` encodes to exactly `bytes`, through `encode`, `to_vec` and `encoded_len`.
pub fn assert_encodes<T: Wire + Debug>(value: &T, bytes: &[u8]) {
    let mut out = Vec::new();
    value.encode(&mut out);
    assert_eq!(out, bytes, "encoding of {value:?}");
    assert_eq!(value.encoded_len(), bytes.len(), "encoded_len of {value:?}");
    assert_eq!(value.to_vec(), bytes, "to_vec of {value:?}");
    // A non-growing buffer of exactly encoded_len bytes is enough.
    let mut fixed = vec![0xAA; value.encoded_len()];
    value.encode(&mut &mut fixed[..]);
    assert_eq!(fixed, bytes, "encoding into a fixed buffer of {value:?}");
}

/// `bytes` decodes to `value` using all of `bytes`, also with a pipelined trailer after it,
/// and each strict prefix is `Incomplete`.
pub fn assert_decodes<T: Wire + Debug + PartialEq>(bytes: &[u8], value: &T) {
    let (decoded, used) = T::decode(bytes).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"));
    assert_eq!(&decoded, value, "decoding of {bytes:02x?}");
    assert_eq!(used, bytes.len(), "bytes consumed decoding {bytes:02x?}");

    let mut pipelined = bytes.to_vec();
    pipelined.extend_from_slice(TRAILER);
    let (decoded, used) = T::decode(&pipelined).unwrap_or_else(|e| panic!("{pipelined:02x?}: {e}"));
    assert_eq!(&decoded, value, "decoding with a trailer");
    assert_eq!(used, bytes.len(), "a decoder consumed pipelined bytes");
    assert_eq!(&pipelined[used..], TRAILER);

    assert_prefixes_incomplete::<T>(bytes);
}

/// decode(encode(value)) == value, with every byte consumed and every prefix `Incomplete`.
pub fn assert_round_trip<T: Wire + Debug + PartialEq>(value: &T) {
    assert_decodes(&value.to_vec(), value);
}

/// Decoding `bytes` fails with exactly `error`.
pub fn assert_error<T: Wire + Debug>(bytes: &[u8], error: DecodeError) {
    assert_eq!(
        T::decode(bytes).map(|(_, n)| n),
        Err(error),
        "decoding {bytes:02x?}"
    );
}
