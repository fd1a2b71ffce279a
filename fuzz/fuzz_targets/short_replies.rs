//! The fixed-size server messages and a bare address: decoding never panics, and what decodes
//! round-trips. One target for all of them, since each is only a few bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_socks5::{Address, MethodSelection, Socks4Response, UserPassResponse};
use proxy_socks5_fuzz::round_trip;

fuzz_target!(|data: &[u8]| {
    round_trip::<MethodSelection>(data);
    round_trip::<UserPassResponse>(data);
    round_trip::<Socks4Response>(data);
    round_trip::<Address>(data);
});
