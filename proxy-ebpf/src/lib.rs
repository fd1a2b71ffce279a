//! Empty library target: it lets `proxy-userspace` name this package as a build dependency so that
//! cargo rebuilds the daemon when the programs change. The programs are in `main.rs`.
#![no_std]
