//! The property every fuzz target checks, written once.

use std::fmt::Debug;

use proxy_socks5::{DecodeError, Wire};

/// Decodes `data` as `T` and checks what must hold whatever the input:
///
/// - decoding does not panic (the fuzzer reports a panic as a crash);
/// - a decoded message consumed between 1 and `data.len()` bytes, and those bytes alone
///   decode to the same message (nothing after the message influences it);
/// - re-encoding it gives exactly as many bytes as were consumed and as `encoded_len` says,
///   and decoding those gives the same message: `decode(encode(x)) == x`;
/// - the re-encoding minus its last byte is `Incomplete`;
/// - `Incomplete` only while fewer than `T::MAX_LEN` bytes are available;
/// - every error's `reply()`, `socks4_reply()` and `Display` do not panic.
pub fn round_trip<T: Wire + Debug + PartialEq>(data: &[u8]) {
    match T::decode(data) {
        Ok((value, used)) => {
            assert!(
                0 < used && used <= data.len(),
                "{value:?} consumed {used} of {} bytes",
                data.len()
            );
            match T::decode(&data[..used]) {
                Ok((alone, n)) => assert!(
                    alone == value && n == used,
                    "{alone:?}/{n} != {value:?}/{used}"
                ),
                Err(e) => panic!("{value:?} does not decode from its own {used} bytes: {e}"),
            }

            let encoded = value.to_vec();
            assert_eq!(
                encoded.len(),
                value.encoded_len(),
                "encoded_len of {value:?}"
            );
            assert_eq!(
                encoded.len(),
                used,
                "{value:?} re-encodes to another length"
            );
            match T::decode(&encoded) {
                Ok((again, n)) => assert!(
                    again == value && n == used,
                    "{again:?}/{n} != {value:?}/{used}"
                ),
                Err(e) => panic!("re-encoding of {value:?} does not decode: {e}"),
            }
            assert!(matches!(
                T::decode(&encoded[..used - 1]),
                Err(DecodeError::Incomplete)
            ));
        }
        Err(DecodeError::Incomplete) => {
            assert!(
                data.len() < T::MAX_LEN,
                "Incomplete with {} bytes, MAX_LEN is {}",
                data.len(),
                T::MAX_LEN
            );
        }
        Err(e) => {
            let _ = (e.reply(), e.socks4_reply(), e.to_string());
        }
    }
}
