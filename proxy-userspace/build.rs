//! Builds the eBPF object (`proxy-ebpf`, target bpfel-unknown-none, nightly + bpf-linker) into
//! OUT_DIR so that the daemon can embed it.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (for `cargo check`/clippy on machines without the eBPF
//! toolchain): an empty object is embedded and the daemon then runs with the splice(2) and copy
//! paths only.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out.join("proxy-ebpf");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(&object, []).context("writing the empty eBPF object")?;
        return Ok(());
    }
    let package = aya_build::Package {
        name: "proxy-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("nightly"))
        .context("building the eBPF programs (run `cargo xtask setup` if nightly rust-src or bpf-linker is missing)")
}
