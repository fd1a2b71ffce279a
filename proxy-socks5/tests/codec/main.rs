//! Tests of the public codec API, as the daemon and clients use it.

mod errors;
mod properties;
mod socks4;
mod socks5;
mod support;
