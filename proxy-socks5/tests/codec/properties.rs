//! Properties that hold for every decoder on any input, checked over exhaustive short inputs
//! and systematic mutations of valid messages. The fuzz targets check the same properties on
//! inputs libFuzzer finds; these run on every `cargo test`.

use std::fmt::Debug;

use proxy_socks5::{
    Address, Command, DecodeError, Greeting, Method, MethodSelection, Reply, Request, Response,
    Socks4Command, Socks4Reply, Socks4Request, Socks4Response, UdpHeader, UserPassRequest,
    UserPassResponse, Wire, MAX_CLIENT_MESSAGE_LEN,
};

/// Decodes `bytes` as `T` and checks what any outcome must satisfy. Returns whether it decoded.
fn check<T: Wire + Debug + PartialEq>(bytes: &[u8]) -> bool {
    match T::decode(bytes) {
        Ok((value, used)) => {
            assert!(
                0 < used && used <= bytes.len(),
                "{value:?} consumed {used} of {}",
                bytes.len()
            );
            let encoded = value.to_vec();
            assert_eq!(encoded.len(), value.encoded_len());
            assert_eq!(
                encoded.len(),
                used,
                "{value:?} from {bytes:02x?} re-encodes to another length"
            );
            assert_eq!(
                T::decode(&encoded),
                Ok((value, used)),
                "re-encoding of {bytes:02x?} decodes differently"
            );
            assert_eq!(
                T::decode(&encoded[..used - 1]).map(|(_, n)| n),
                Err(DecodeError::Incomplete)
            );
            true
        }
        Err(DecodeError::Incomplete) => {
            assert!(
                bytes.len() < T::MAX_LEN,
                "{} bytes, at least MAX_LEN, still Incomplete: {bytes:02x?}",
                bytes.len()
            );
            false
        }
        Err(_) => false,
    }
}

/// Runs [`check`] for every message type; returns how many decoded.
fn check_all(bytes: &[u8]) -> usize {
    [
        check::<Address>(bytes),
        check::<Greeting>(bytes),
        check::<MethodSelection>(bytes),
        check::<Request>(bytes),
        check::<Response>(bytes),
        check::<UserPassRequest>(bytes),
        check::<UserPassResponse>(bytes),
        check::<UdpHeader>(bytes),
        check::<Socks4Request>(bytes),
        check::<Socks4Response>(bytes),
    ]
    .into_iter()
    .filter(|&ok| ok)
    .count()
}

/// A deterministic xorshift generator, so failures reproduce without a seed file.
struct Rng(u64);

impl Rng {
    fn byte(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0.to_le_bytes()[0]
    }
}

/// Valid encodings of every message type, as seeds for mutation.
fn seeds() -> Vec<Vec<u8>> {
    let domain = || Address::Domain("example.com".into(), 443);
    let v4 = || Address::from("192.0.2.1:80".parse::<std::net::SocketAddr>().unwrap());
    let v6 = || Address::from("[2001:db8::1]:53".parse::<std::net::SocketAddr>().unwrap());
    vec![
        Greeting {
            methods: vec![Method::NoAuth, Method::UserPass],
        }
        .to_vec(),
        MethodSelection {
            method: Method::UserPass,
        }
        .to_vec(),
        Request {
            command: Command::Connect,
            address: domain(),
        }
        .to_vec(),
        Request {
            command: Command::UdpAssociate,
            address: v6(),
        }
        .to_vec(),
        Response {
            reply: Reply::Succeeded,
            address: v4(),
        }
        .to_vec(),
        UserPassRequest {
            username: b"user".to_vec(),
            password: b"pw".to_vec(),
        }
        .to_vec(),
        UserPassResponse::SUCCESS.to_vec(),
        UdpHeader {
            frag: 0,
            address: domain(),
        }
        .to_vec(),
        UdpHeader {
            frag: 0,
            address: v4(),
        }
        .to_vec(),
        Socks4Request {
            command: Socks4Command::Connect,
            address: v4(),
            user_id: b"id".to_vec(),
        }
        .to_vec(),
        Socks4Request {
            command: Socks4Command::Bind,
            address: domain(),
            user_id: b"id".to_vec(),
        }
        .to_vec(),
        Socks4Response {
            reply: Socks4Reply::Granted,
            address: "10.0.0.1:80".parse().unwrap(),
        }
        .to_vec(),
    ]
}

#[test]
fn every_input_up_to_two_bytes() {
    check_all(&[]);
    for a in 0..=u8::MAX {
        check_all(&[a]);
        for b in 0..=u8::MAX {
            check_all(&[a, b]);
        }
    }
}

#[test]
fn every_single_byte_mutation_of_valid_messages() {
    let mut decoded = 0;
    for seed in seeds() {
        assert!(check_all(&seed) > 0, "seed {seed:02x?} decodes as nothing");
        for i in 0..seed.len() {
            let mut mutated = seed.clone();
            for b in 0..=u8::MAX {
                mutated[i] = b;
                decoded += check_all(&mutated);
            }
        }
    }
    assert!(
        decoded > 1000,
        "mutations should mostly stay decodable, {decoded} did"
    );
}

#[test]
fn truncations_and_extensions_of_valid_messages() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for seed in seeds() {
        for end in 0..=seed.len() {
            let mut bytes = seed[..end].to_vec();
            for _ in 0..64 {
                bytes.push(rng.byte());
                check_all(&bytes);
            }
        }
    }
}

/// The `MAX_LEN` promise: whatever the peer sends, a full buffer never asks for more.
#[test]
fn a_max_len_buffer_is_never_incomplete() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let fills: [fn(&mut Rng) -> u8; 5] = [|_| 0x00, |_| 0x01, |_| 0xff, |_| b'a', Rng::byte];
    for seed in seeds() {
        for start in 0..=seed.len() {
            for fill in fills {
                let mut bytes = seed[..start].to_vec();
                while bytes.len() < MAX_CLIENT_MESSAGE_LEN {
                    bytes.push(fill(&mut rng));
                }
                check_all(&bytes);
            }
        }
    }
}

#[test]
fn max_client_message_len_covers_every_client_message() {
    for max in [
        Greeting::MAX_LEN,
        UserPassRequest::MAX_LEN,
        Request::MAX_LEN,
        Socks4Request::MAX_LEN,
    ] {
        assert!(max <= MAX_CLIENT_MESSAGE_LEN);
    }
    assert_eq!(MAX_CLIENT_MESSAGE_LEN, Socks4Request::MAX_LEN);
}
