//! ebsocks kernel programs.
//!
//! `ebsocks_verdict` is an `sk_skb/stream_verdict` program attached to the `EBSOCKS_ACTIVE`
//! sockhash. Every skb received on a socket of a spliced SOCKS session is redirected to the
//! egress of the peer socket, so TCP payload moves from one socket to the other inside the kernel
//! and never reaches the daemon.
//!
//! `ebsocks_xdp` (in `xdp.rs`) is the UDP fast path in front of the UDP relay sockets.
//!
//! # Minimum kernel version
//! A stream verdict program without a stream parser needs Linux 5.13; `bpf_get_socket_cookie`
//! in sk_skb programs needs 5.x with BTF. The daemon probes both at start-up and falls back to
//! splice(2) when the kernel refuses the program.
// Built for the host (a plain `cargo build --workspace`), this crate is an empty program; the
// real one only exists for target_arch = "bpf".
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        internal_features,
        reason = "atomic_xadd is the only way to emit BPF_XADD from Rust"
    )
)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod xdp;
