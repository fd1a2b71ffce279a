//! Rebuild the eBPF object when the linker changes (a rebuilt bpf-linker can emit different BTF).
use std::env;

fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    } else if env::var_os("CARGO_CFG_TARGET_ARCH").is_some_and(|a| a == "bpf") {
        println!("cargo:warning=bpf-linker not found on PATH; run `cargo xtask setup`");
    }
}
