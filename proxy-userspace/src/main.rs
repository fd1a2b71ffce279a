//! `ebsocks` binary: parses the command line and wires the library together.

use std::process::ExitCode;

use clap::Parser as _;
use ebsocks::{
    cli::{Cli, Command, RunArgs},
    config::{Config, LogFormat},
    stats, Overrides, RunOptions,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ebsocks: {}: {e}", file.display());
                ExitCode::from(2)
            }
        },
        Command::Stats(args) => match stats::Snapshot::read(&args.pin_dir) {
            Ok(s) => {
                if args.json {
                    println!("{}", s.to_json());
                } else {
                    print!("{}", s.to_table());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ebsocks: {e}");
                ExitCode::from(1)
            }
        },
        Command::Run(args) => run(args),
        Command::HashPassword => hash_password(),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let RunArgs { config, listen, data_path, pin_dir, addr_file } = args;
    let cfg = match &config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ebsocks: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => Config::embedded_default(),
    };
    let overrides = Overrides { listen, data_path: data_path.map(Into::into), pin_dir };

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ebsocks: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let opts = RunOptions { addr_file, config_path: config, overrides };
    let result = runtime.block_on(ebsocks::run(cfg, opts, shutdown_signal()));
    // Dropping the runtime ends the remaining session tasks, which releases the eBPF programs
    // and removes the pinned maps.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ebsocks: {e}");
            ExitCode::from(1)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Reads a password from standard input (one line) and prints its hash for the users file.
fn hash_password() -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("ebsocks: reading the password: {e}");
        return ExitCode::from(1);
    }
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        eprintln!("ebsocks: empty password");
        return ExitCode::from(2);
    }
    println!("{}", ebsocks::auth::hash_password(password));
    ExitCode::SUCCESS
}
