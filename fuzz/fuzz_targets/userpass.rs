//! `UserPassRequest::decode` never panics, and what it decodes round-trips.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_socks5::UserPassRequest;

fuzz_target!(|data: &[u8]| proxy_socks5_fuzz::round_trip::<UserPassRequest>(data));
