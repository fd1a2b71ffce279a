//! Command-line interface.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

use crate::config::DataPathMode;

/// ebsocks: a SOCKS5 server whose TCP data plane lives in the kernel (eBPF sockhash).
#[derive(Debug, Parser)]
#[command(name = "ebsocks", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the SOCKS server (needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON, for the
    /// in-kernel path).
    Run(RunArgs),
    /// Validate a configuration file and print the effective configuration.
    CheckConfig {
        /// The TOML file (also accepted as `--config FILE`, as `run` takes it).
        #[arg(value_name = "FILE", required_unless_present = "config")]
        file: Option<PathBuf>,
        /// The TOML file.
        #[arg(long, value_name = "FILE", conflicts_with = "file")]
        config: Option<PathBuf>,
    },
    /// Print the counters of a running daemon (reads its pinned BPF maps, and asks its control
    /// socket about itself).
    Stats(StatsArgs),
    /// List a running daemon's live sessions, one line each (asks its control socket).
    Sessions(SessionsArgs),
    /// Read a password on standard input and print its hash, for `auth.users_file`
    /// (`name:HASH` per line).
    HashPassword,
}

/// `ebsocks run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Configuration file (TOML). Without it, the embedded default: 127.0.0.1:1080 and
    /// [::1]:1080, no authentication, loopback clients only.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Listen on ADDR instead of the configured addresses (repeatable; port 0 picks a port).
    #[arg(short, long, value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,
    /// Override `data_path`: auto, sockmap, splice or copy.
    #[arg(long, value_name = "PATH", value_parser = clap::value_parser!(DataPathArg))]
    pub data_path: Option<DataPathArg>,
    /// Override `pin_dir`, the bpffs directory for the pinned counters.
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Once ready, write the bound addresses (one per line) to FILE.
    #[arg(long, value_name = "FILE")]
    pub addr_file: Option<PathBuf>,
}

/// `--data-path` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DataPathArg {
    /// splice(2) first; interactive and idle sessions move into the sockhash.
    Auto,
    /// In-kernel sockhash redirect.
    Sockmap,
    /// splice(2) through a pipe.
    Splice,
    /// Userspace copy.
    Copy,
}

impl From<DataPathArg> for DataPathMode {
    fn from(a: DataPathArg) -> Self {
        match a {
            DataPathArg::Auto => Self::Auto,
            DataPathArg::Sockmap => Self::Sockmap,
            DataPathArg::Splice => Self::Splice,
            DataPathArg::Copy => Self::Copy,
        }
    }
}

/// `ebsocks stats`.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// The daemon's `pin_dir`.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/ebsocks")]
    pub pin_dir: PathBuf,
    /// The daemon's control socket (default: derived from --pin-dir as the daemon does).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Refresh every --interval seconds (with --json: one JSON object per line).
    #[arg(long)]
    pub watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(long, value_name = "SECS", default_value_t = 1.0, requires = "watch")]
    pub interval: f64,
    /// Stop after N refreshes with --watch (default: until interrupted).
    #[arg(long, value_name = "N", requires = "watch")]
    pub count: Option<u64>,
}

/// `ebsocks sessions`.
#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    /// The daemon's `pin_dir`, from which the default control socket is derived.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/ebsocks")]
    pub pin_dir: PathBuf,
    /// The daemon's control socket (default: derived from --pin-dir as the daemon does).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}
