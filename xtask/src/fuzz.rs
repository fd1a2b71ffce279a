//! The fuzz targets of `fuzz/` (their own workspace, cargo-fuzz + libFuzzer, nightly): built,
//! then each run for a bounded time on its corpus. A crash fails the step and leaves the input
//! under `fuzz/artifacts/TARGET/`.

use std::path::Path;

use anyhow::{bail, Result};

use crate::cmd::Cmd;

/// Seconds per target in `cargo xtask test`.
pub const CI_SECS: u64 = 10;

/// `rustup run nightly cargo fuzz ARGS` in `fuzz/`.
fn cargo_fuzz(dir: &Path) -> Cmd {
    Cmd::new("rustup")
        .args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(dir)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
}

/// Builds every target, then runs each for `secs` seconds (bounded in memory too).
pub fn run(root: &Path, secs: u64) -> Result<()> {
    let dir = root.join("fuzz");
    let list = cargo_fuzz(&dir).arg("list").read()?;
    let targets: Vec<&str> = list.split_whitespace().collect();
    if targets.is_empty() {
        bail!("`cargo fuzz list` printed no target");
    }
    cargo_fuzz(&dir).arg("build").run()?;
    for t in &targets {
        std::fs::create_dir_all(dir.join("corpus").join(t))?;
        cargo_fuzz(&dir)
            .args(["run", t, "--"])
            .arg(format!("-max_total_time={secs}"))
            .args(["-rss_limit_mb=2048", "-print_final_stats=1"])
            .run()?;
    }
    progress!(
        "fuzz: {} targets ran {secs} s each without a crash",
        targets.len()
    );
    Ok(())
}
