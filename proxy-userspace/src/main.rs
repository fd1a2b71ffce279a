//! `ebsocks` binary: parses the command line and wires the library together.

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use ebsocks::{
    cli::{Cli, Command, RunArgs, SessionsArgs, StatsArgs},
    config::{default_control_socket, Config, LogFormat},
    control, stats, Overrides, RunOptions,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file, config } => {
            // clap requires exactly one of the two.
            let file = file.or(config).unwrap_or_default();
            check_config(&file)
        }
        Command::Stats(args) => stats_cmd(&args),
        Command::Sessions(args) => sessions_cmd(&args),
        Command::Run(args) => run(args),
        Command::HashPassword => hash_password(),
    }
}

/// Writes a command's output. A reader that went away (`ebsocks sessions | head`) ends the
/// command quietly, as it would end a shell tool; any other failure is reported.
fn output(text: &str) -> ExitCode {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ebsocks: writing the output: {e}");
            ExitCode::from(1)
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(c) => {
            for w in c.warnings() {
                eprintln!("ebsocks: {}: warning: {w}", file.display());
            }
            output(&c.to_toml())
        }
        Err(e) => {
            eprintln!("ebsocks: {}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}

fn stats_cmd(args: &StatsArgs) -> ExitCode {
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| default_control_socket(&args.pin_dir));
    if args.watch {
        if !(args.interval.is_finite() && args.interval > 0.0) {
            eprintln!("ebsocks: --interval must be a positive number of seconds");
            return ExitCode::from(2);
        }
        let interval = std::time::Duration::from_secs_f64(args.interval);
        return match stats::watch(
            &args.pin_dir,
            Some(&control),
            interval,
            args.count,
            args.json,
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ebsocks: {e}");
                ExitCode::from(1)
            }
        };
    }
    match stats::Snapshot::read(&args.pin_dir) {
        Ok(mut s) => {
            match control::info(&control) {
                Ok(info) => s.daemon = Some(info),
                // The maps alone are enough; only say why the daemon part is missing when the
                // socket was named.
                Err(e) if args.control.is_some() => eprintln!("ebsocks: {e}"),
                Err(_) => {}
            }
            if args.json {
                output(&(s.to_json() + "\n"))
            } else {
                output(&s.to_table())
            }
        }
        Err(e) => {
            eprintln!("ebsocks: {e}");
            ExitCode::from(1)
        }
    }
}

fn sessions_cmd(args: &SessionsArgs) -> ExitCode {
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| default_control_socket(&args.pin_dir));
    match control::sessions(&control) {
        Ok(list) => {
            if args.json {
                let json = serde_json::to_string_pretty(&list)
                    .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
                output(&(json + "\n"))
            } else {
                output(&stats::sessions_table(&list))
            }
        }
        Err(e) => {
            eprintln!("ebsocks: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let RunArgs {
        config,
        listen,
        data_path,
        pin_dir,
        addr_file,
    } = args;
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
    let nth = |i: usize| format!("--listen #{}", i + 1);
    if let Some((i, problem)) = ebsocks::config::listen_conflict(&listen, nth) {
        eprintln!("ebsocks: {}: {problem}", nth(i));
        return ExitCode::from(2);
    }
    let overrides = Overrides {
        listen,
        data_path: data_path.map(Into::into),
        pin_dir,
    };

    // RUST_LOG wins over `[log] level`, at start-up and at every reload.
    let (filter, log_level) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, None),
        Err(_) => (EnvFilter::new(&cfg.log.level), Some(())),
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let log_level = log_level.map(|()| {
        ebsocks::LogLevelHandle(std::sync::Arc::new(move |level: &str| {
            handle
                .reload(EnvFilter::new(level))
                .map_err(|e| e.to_string())
        }))
    });
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(colored_stderr())
        .with_writer(std::io::stderr);
    {
        use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
        let registry = tracing_subscriber::registry().with(filter);
        match cfg.log.format {
            LogFormat::Text => registry.with(layer).init(),
            LogFormat::Json => registry.with(layer.json()).init(),
        }
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ebsocks: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let opts = RunOptions {
        log_level,
        addr_file,
        config_path: config,
        overrides,
    };
    let result = runtime.block_on(async {
        let stop = match stop_signals() {
            Ok(rx) => rx,
            Err(e) => {
                eprintln!("ebsocks: cannot install the SIGTERM/SIGINT handlers: {e}");
                return Ok(());
            }
        };
        ebsocks::run(cfg, opts, stop).await
    });
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

/// Installs the SIGTERM and SIGINT handlers (before anything can signal the daemon) and
/// forwards every such signal: the first starts the graceful drain, the second ends it.
fn stop_signals() -> std::io::Result<tokio::sync::mpsc::Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
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
    output(&(ebsocks::auth::hash_password(password) + "\n"))
}

/// Whether log lines may carry terminal colours: only on a terminal, and never with `NO_COLOR`
/// set (<https://no-color.org>). A file, a pipe or journald's stream gets plain text.
fn colored_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
