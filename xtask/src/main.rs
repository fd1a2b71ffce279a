//! `cargo xtask`: the entry point for building, running and testing ebsocks. Every command
//! first runs `setup`, which bootstraps the eBPF toolchain when something is missing.

/// Prints a progress line, `xtask: <what>`, on stderr (next to cargo's own output).
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("xtask: {}", format_args!($($arg)*))
    };
}

mod apt;
mod cmd;
mod fuzz;
mod install;
mod setup;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

use crate::cmd::Cmd;

/// The daemon's package and binary.
const DAEMON_PACKAGE: &str = "proxy-userspace";
const DAEMON_BIN: &str = "ebsocks";
/// The benchmark's package and binary.
const BENCH_PACKAGE: &str = "proxy-bench";
const BENCH_BIN: &str = "ebsocks-bench";
/// The privileged integration tests (root, eBPF, network namespaces).
const INTEGRATION_PACKAGE: &str = "proxy-integration";

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, run and test ebsocks"
)]
struct Cli {
    /// Also print the commands xtask runs to inspect the machine.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the eBPF toolchain (nightly + rust-src, bpf-linker) and bpffs; install what is missing.
    Setup {
        /// Also install the Debian packages the tests and the benchmark use (needs root or sudo).
        #[arg(long)]
        apt: bool,
    },
    /// Build the daemon, target/release/ebsocks.
    Build {
        /// Build target/debug/ebsocks instead.
        #[arg(long)]
        debug: bool,
    },
    /// Build the daemon and run it as root: `ebsocks run ARGS` (default config without ARGS).
    Run {
        /// Arguments for `ebsocks run`, e.g. `-- --listen 127.0.0.1:1080 --data-path copy`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Unit and unprivileged tests, then the privileged integration tests (root).
    Test {
        /// Arguments for the test binaries of both runs, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Install the release binary, a commented configuration (never overwritten) and a hardened
    /// systemd unit.
    Install {
        /// Installation prefix: PREFIX/bin/ebsocks, PREFIX/lib/systemd/system/ebsocks.service.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Configuration directory: SYSCONFDIR/ebsocks/ebsocks.toml.
        #[arg(long, default_value = "/etc")]
        sysconfdir: PathBuf,
        /// Staging directory prepended to every path (for packaging; default: $DESTDIR).
        #[arg(long)]
        destdir: Option<PathBuf>,
        /// Print what would be written; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Install this binary instead of building one.
        #[arg(long, value_name = "PATH")]
        bin: Option<PathBuf>,
    },
    /// Build the fuzz targets and run each for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
    /// Build the daemon and the benchmark in release and run the benchmark.
    Bench {
        /// First install Dante (`dante-server`) and microsocks from Debian's packages when
        /// missing, so that the run measures them too.
        #[arg(long)]
        with_peers: bool,
        /// Arguments for ebsocks-bench.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let Cli { verbose, command } = Cli::parse();
    cmd::set_verbose(verbose);
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            progress!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    let ws = Workspace::new();
    match command {
        Command::Setup { apt } => setup::setup(&ws.root, apt),
        Command::Build { debug } => {
            setup::setup(&ws.root, false)?;
            let profile = if debug {
                Profile::Debug
            } else {
                Profile::Release
            };
            ws.build_daemon(profile).map(drop)
        }
        Command::Run { args } => run_daemon(&ws, &args),
        Command::Test { args } => test(&ws, &args),
        Command::Bench { with_peers, args } => bench(&ws, with_peers, &args),
        Command::Install {
            prefix,
            sysconfdir,
            destdir,
            dry_run,
            bin,
        } => {
            let bin = match bin {
                Some(b) => b,
                None => {
                    setup::setup(&ws.root, false)?;
                    ws.build_daemon(Profile::Release)?
                }
            };
            let opts = install::Options {
                prefix,
                sysconfdir,
                destdir: destdir
                    .or_else(|| std::env::var_os("DESTDIR").map(PathBuf::from))
                    .filter(|d| !d.as_os_str().is_empty()),
                dry_run,
            };
            install::install(&bin, &opts).map(drop)
        }
        Command::Fuzz { secs } => {
            setup::setup(&ws.root, false)?;
            fuzz::run(&ws.root, secs)
        }
    }
}

#[derive(Clone, Copy)]
enum Profile {
    Debug,
    Release,
}

impl Profile {
    /// The directory under the target directory.
    fn dir(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Release => "release",
        }
    }
}

struct Workspace {
    root: PathBuf,
}

impl Workspace {
    /// The workspace this xtask was built from, wherever it is run from.
    fn new() -> Self {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir.parent().unwrap_or(manifest_dir).to_owned();
        Self { root }
    }

    /// `cargo`, run in the workspace root.
    fn cargo(&self) -> Cmd {
        Cmd::new("cargo").current_dir(&self.root)
    }

    /// Cargo's target directory (honours CARGO_TARGET_DIR and build.target-dir), absolute.
    fn target_dir(&self) -> Result<PathBuf> {
        let metadata = self
            .cargo()
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .read()?;
        let metadata: serde_json::Value =
            serde_json::from_str(&metadata).context("cannot parse `cargo metadata` output")?;
        let dir = metadata["target_directory"]
            .as_str()
            .context("`cargo metadata` printed no target_directory")?;
        Ok(PathBuf::from(dir))
    }

    /// Builds `ebsocks` and returns its absolute path.
    fn build_daemon(&self, profile: Profile) -> Result<PathBuf> {
        progress!("building the daemon ({} profile)", profile.dir());
        let mut build = self.cargo().arg("build");
        if let Profile::Release = profile {
            build = build.arg("--release");
        }
        build.args(["--locked", "-p", DAEMON_PACKAGE]).run()?;
        let bin = self.target_dir()?.join(profile.dir()).join(DAEMON_BIN);
        if !cmd::is_executable(&bin) {
            bail!("the build succeeded but {} is missing", bin.display());
        }
        progress!("built {}", bin.display());
        Ok(bin)
    }
}

/// `cargo xtask run`: the daemon replaces xtask, so Ctrl-C and SIGTERM reach it directly.
fn run_daemon(ws: &Workspace, args: &[OsString]) -> Result<()> {
    let root = cmd::is_root();
    if !root && cmd::find_on_path("sudo").is_none() {
        bail!(
            "ebsocks loads eBPF programs and needs root: run xtask as root (sudo is not installed)"
        );
    }
    setup::setup(&ws.root, false)?;
    let bin = ws.build_daemon(Profile::Release)?;
    if !root {
        progress!("not root: running the daemon through sudo");
        // Built as the calling user; only the daemon (and the bpffs mount) gets root.
        setup::ensure_bpffs()?;
    }
    let daemon = cmd::as_root(&bin, "running the daemon")?
        .arg("run")
        .args(args);
    Err(daemon.exec())
}

/// `cargo xtask test`: three steps, stopping at the first that fails.
fn test(ws: &Workspace, args: &[OsString]) -> Result<()> {
    let root = cmd::is_root();
    if !root && cmd::is_ci() {
        bail!("CI=true and not root: the privileged integration tests cannot run; run as root");
    }
    setup::setup(&ws.root, false)?;

    // Release: the privileged tests push hundreds of MiB through the daemon, and this is the
    // binary `cargo xtask build`, `run` and `bench` use. Built first: the install test runs
    // `ebsocks check-config` on the configuration it installs.
    progress!("test 1/4: the daemon");
    let bin = ws.build_daemon(Profile::Release)?;

    // --no-fail-fast: one run reports every failing test binary; the step still fails.
    progress!("test 2/4: unit and unprivileged tests");
    // Every test build uses the release profile too: the daemon's dependencies and its eBPF
    // object are then compiled once for all three builds.
    let mut unit = ws.cargo().env("EBSOCKS_BIN", &bin).args([
        "test",
        "--release",
        "--locked",
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        INTEGRATION_PACKAGE,
        "--exclude",
        "proxy-ebpf",
    ]);
    if !args.is_empty() {
        unit = unit.arg("--").args(args);
    }
    unit.run()?;

    progress!("test 3/4: fuzz targets, {} s each", fuzz::CI_SECS);
    fuzz::run(&ws.root, fuzz::CI_SECS)?;

    progress!("test 4/4: privileged integration tests (root, eBPF, network namespaces)");
    if !root {
        progress!("not root: privileged integration tests SKIPPED; run `cargo xtask test` as root to run them");
        return Ok(());
    }
    ws.cargo()
        .env("EBSOCKS_BIN", &bin)
        .args([
            "test",
            "--release",
            "--locked",
            "--no-fail-fast",
            "-p",
            INTEGRATION_PACKAGE,
            "--",
            "--test-threads=2",
        ])
        .args(args)
        .run()?;
    progress!("all tests passed");
    Ok(())
}

/// `cargo xtask bench`: the benchmark replaces xtask; it starts the daemon itself.
fn bench(ws: &Workspace, with_peers: bool, args: &[OsString]) -> Result<()> {
    setup::setup(&ws.root, false)?;
    if with_peers {
        apt::install_peers()?;
    }
    progress!("building the daemon and the benchmark (release profile)");
    ws.cargo()
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            DAEMON_PACKAGE,
            "-p",
            BENCH_PACKAGE,
        ])
        .run()?;
    let release = ws.target_dir()?.join(Profile::Release.dir());
    let (daemon, bench) = (release.join(DAEMON_BIN), release.join(BENCH_BIN));
    let bench = if cmd::is_root() {
        Cmd::new(bench)
    } else if cmd::find_on_path("sudo").is_some() {
        progress!("not root: running the benchmark through sudo (the daemon loads eBPF programs)");
        setup::ensure_bpffs()?;
        Cmd::new("sudo").arg("-E").arg(bench)
    } else {
        progress!("not root and no sudo: running the benchmark unprivileged");
        Cmd::new(bench)
    };
    Err(bench
        .current_dir(&ws.root)
        .arg("--ebsocks")
        .arg(daemon)
        .args(args)
        .exec())
}
