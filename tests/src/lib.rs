//! Harness for the privileged end-to-end tests of the `ebsocks` daemon.
//!
//! The tests drive the real binary as a black box: they start it with a
//! temporary config ([`daemon::Daemon`]), talk to it with a SOCKS5 client
//! written here from RFC 1928 ([`socks`]) and check what arrives at target
//! servers that run inside the test ([`targets`]). SOCKS4/4a has its own small
//! client ([`socks4`]), and [`users`] writes RFC 1929 users files. Nothing
//! here depends on a crate of the workspace, so a bug shared by the codec and
//! its user cannot hide itself.
//!
//! Every test starts with [`gate::require_privileged`]: without root, bpffs,
//! a working `bpf(2)` or the daemon binary it prints `SKIP: …` and passes,
//! unless `CI=true`, where it fails.
//!
//! Running (as root; `/sys/fs/bpf` is mounted as bpffs when it is not):
//!
//! ```text
//! cargo build --release -p proxy-userspace
//! cargo test -p proxy-integration -- --test-threads=2
//! ```
//!
//! `EBSOCKS_BIN` picks another daemon binary (default: `target/release/ebsocks`,
//! else `target/debug/ebsocks`); `RUST_LOG` is passed on to the daemon, whose
//! stderr is printed when a test fails.
//!
//! Payloads are deterministic pseudo-random streams ([`pattern`]); the
//! receiver regenerates the stream and compares byte for byte. That is as
//! strong as comparing SHA-256 digests for these tests and about twenty times
//! cheaper in an unoptimised test build (SHA-256 of 256 MiB takes ~7 s there).

pub mod checks;
pub mod daemon;
pub mod dgram;
pub mod gate;
pub mod netns;
pub mod pattern;
pub mod procfs;
pub mod socks;
pub mod socks4;
pub mod stats;
pub mod targets;
pub mod users;
pub mod util;

pub use daemon::{Daemon, DaemonOpts, DataPath};
pub use gate::{require_privileged, skip_or_panic};
pub use pattern::{exchange, recv_exact, recv_to_eof, send_and_recv, send_pattern, Pattern, Plan};
pub use stats::{SessionRow, Stats};
pub use targets::{accept_one, listen, Echo, Task};
pub use users::UsersFile;
pub use util::{assert_no_connection, poll_until, raise_nofile_limit, wait_closed, within};
