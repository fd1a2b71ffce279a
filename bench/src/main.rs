//! ebsocks-bench: measures ebsocks on each data path, and other SOCKS5 servers when installed,
//! against direct loopback connections in one invocation, and reports figures as ratios to the
//! direct baseline of the same invocation.

mod idle;
mod procfs;
mod report;
mod socks;
mod subjects;
mod targets;
mod udp;
mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::procfs::{utc_now, Machine};
use crate::report::{Cell, Report};
use crate::subjects::{EbsocksSpec, Start, Subject};
use crate::workloads::{RunSample, Settings, Workload};

const DATA_PATHS: [&str; 4] = ["sockmap", "splice", "copy", "auto"];
const PEERS: [&str; 2] = ["microsocks", "dante"];

#[derive(Parser, Debug)]
#[command(
    name = "ebsocks-bench",
    version,
    about = "Loopback benchmark of ebsocks' data paths against direct connections and other SOCKS5 servers",
    after_help = "Workloads: bulk-up-1, bulk-up-8, bulk-down-1, bulk-down-8, rr, conn-rate, fair-1000, \
                  idle-10k (a prefix such as bulk-up or bulk selects every workload it starts).\n\
                  Subjects: direct, ebsocks-<path> for each --paths entry, and microsocks / dante when installed.\n\
                  Run as root (ebsocks loads eBPF programs). Only 127.0.0.1 is used."
)]
struct Cli {
    /// ebsocks binary [default: `ebsocks` next to this program]
    #[arg(long, value_name = "PATH")]
    ebsocks: Option<PathBuf>,
    /// Measured seconds per run
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Runs per (subject, workload); figures are the median
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// ebsocks data paths to measure, comma-separated; `none` or '' for none
    #[arg(long, default_value = "sockmap,splice,copy,auto")]
    paths: String,
    /// Workloads, comma-separated names or prefixes; `all` for every one
    #[arg(long, default_value = "all")]
    workloads: String,
    /// Other SOCKS5 servers to measure when installed: microsocks, dante; `none` for none
    #[arg(long, default_value = "microsocks,dante")]
    peers: String,
    /// Warm-up seconds before each measured window [default: seconds / 20, 0.1 to 1]
    #[arg(long)]
    warmup: Option<f64>,
    /// Write every figure as JSON to FILE
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the Markdown report to FILE too
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// RUST_LOG for the ebsocks daemons
    #[arg(long, default_value = "warn")]
    daemon_log: String,
    /// Keep the working directory (server logs, generated configs)
    #[arg(long)]
    keep_logs: bool,
    /// Sessions idle-10k opens; it stops early, and says so, at the first refused session
    #[arg(long, default_value_t = workloads::IDLE_SESSIONS)]
    idle_sessions: usize,
    /// Run as the echo target process of idle-10k (started by ebsocks-bench itself)
    #[arg(long = "echo-target-helper", hide = true)]
    echo_target_helper: bool,
    /// Also measure 512-byte UDP datagrams through the relay (userspace only vs XDP offload)
    /// against a direct send, in a network-namespace topology. Part of `--workloads all` (and
    /// selected by `--workloads udp`); `--udp --workloads none` runs only this
    #[arg(long)]
    udp: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// True once SIGINT or SIGTERM has been received.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (children inherit it); returns the limit
/// in force.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid, writable rlimit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        lim.rlim_cur
    }
}

fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty() && x != "none")
        .collect()
}

fn parse_workloads(s: &str, idle_sessions: usize) -> Result<Vec<Workload>> {
    let all: Vec<Workload> = Workload::all()
        .into_iter()
        .map(|w| match w {
            Workload::Idle { .. } => Workload::Idle {
                sessions: idle_sessions,
            },
            w => w,
        })
        .collect();
    let tokens = split_list(s);
    if tokens.iter().any(|t| t == "all") {
        return Ok(all);
    }
    let mut chosen = Vec::new();
    for t in &tokens {
        let hits: Vec<Workload> = all
            .iter()
            .copied()
            .filter(|w| {
                let n = w.name();
                n == *t || n.starts_with(&format!("{t}-"))
            })
            .collect();
        if hits.is_empty() {
            if let Some(w) = sized_workload(t) {
                chosen.push(w);
                continue;
            }
            let names: Vec<String> = all.iter().map(|w| w.name()).collect();
            bail!(
                "unknown workload {t:?}; known: {} (and bulk-up-N, bulk-down-N, fair-N for other \
                 stream counts, N from 1 to {})",
                names.join(", "),
                workloads::FAIR_SESSIONS * 4
            );
        }
        chosen.extend(hits);
    }
    // The canonical order, without duplicates; other sizes after, in the order given.
    let mut out: Vec<Workload> = all.iter().copied().filter(|w| chosen.contains(w)).collect();
    for w in chosen {
        if !out.contains(&w) {
            out.push(w);
        }
    }
    Ok(out)
}

/// `bulk-up-N`, `bulk-down-N` or `fair-N` with a stream count of its own (a crossover study
/// between the standard sizes).
fn sized_workload(t: &str) -> Option<Workload> {
    let (kind, n) = t.rsplit_once('-')?;
    let n: usize = n.parse().ok()?;
    if n == 0 || n > workloads::FAIR_SESSIONS * 4 {
        return None;
    }
    match kind {
        "bulk-up" => Some(Workload::Bulk {
            dir: workloads::Dir::Up,
            streams: n,
        }),
        "bulk-down" => Some(Workload::Bulk {
            dir: workloads::Dir::Down,
            streams: n,
        }),
        "fair" => Some(Workload::Fair { sessions: n }),
        _ => None,
    }
}

/// CPUs' worth of busy time on the machine over 0.5 s with no benchmark traffic.
fn background_busy_cpus() -> f64 {
    let a = procfs::machine_busy_seconds();
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    (procfs::machine_busy_seconds() - a) / t.elapsed().as_secs_f64()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.echo_target_helper {
        return idle::serve_echo_target();
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ebsocks-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if !(0.1..=600.0).contains(&cli.seconds) {
        bail!("--seconds must be between 0.1 and 600");
    }
    if !(1..=100).contains(&cli.repeat) {
        bail!("--repeat must be between 1 and 100");
    }
    if !(1..=1_000_000).contains(&cli.idle_sessions) {
        bail!("--idle-sessions must be between 1 and 1000000");
    }
    let tokens = split_list(&cli.workloads);
    let run_udp = cli.udp || tokens.iter().any(|t| t == "all" || t == "udp");
    let tcp_workloads: Vec<String> = tokens.into_iter().filter(|t| t != "udp").collect();
    let workloads = parse_workloads(&tcp_workloads.join(","), cli.idle_sessions)?;
    if workloads.is_empty() && !run_udp {
        bail!("no workload selected");
    }
    let paths = split_list(&cli.paths);
    if let Some(p) = paths.iter().find(|p| !DATA_PATHS.contains(&p.as_str())) {
        bail!("unknown data path {p:?}; known: {}", DATA_PATHS.join(", "));
    }
    let peers = split_list(&cli.peers);
    if let Some(p) = peers.iter().find(|p| !PEERS.contains(&p.as_str())) {
        bail!("unknown peer {p:?}; known: {}", PEERS.join(", "));
    }
    let warmup = cli.warmup.unwrap_or((cli.seconds / 20.0).clamp(0.1, 1.0));
    if !(0.0..=60.0).contains(&warmup) {
        bail!("--warmup must be between 0 and 60");
    }
    let ebsocks = match cli.ebsocks.clone() {
        Some(p) => p,
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("ebsocks")))
            .unwrap_or_else(|| PathBuf::from("ebsocks")),
    };

    install_signal_handlers();
    // fair-1000 and idle-10k hold thousands of sockets in this process; servers inherit it.
    let nofile = raise_nofile_limit();
    let started = Instant::now();
    let date = utc_now();
    let machine = Machine::detect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-rt")
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let pid = std::process::id();
    let workdir = std::env::temp_dir().join(format!("ebsocks-bench-{pid}"));
    std::fs::create_dir_all(&workdir).with_context(|| format!("create {}", workdir.display()))?;
    let mut notes = Vec::new();

    eprintln!("ebsocks-bench: {}", machine.one_line());
    let mut subjects = vec![Subject::direct()];
    if !paths.is_empty() {
        let bpffs = match subjects::ensure_bpffs() {
            Ok(note) => {
                notes.extend(note);
                None
            }
            Err(e) => Some(e),
        };
        let pin_root = format!("/sys/fs/bpf/ebsocks-bench-{pid}");
        for p in &paths {
            let name = format!("ebsocks-{p}");
            if let Some(e) = &bpffs {
                subjects.push(Subject::unavailable(&name, e.clone()));
                continue;
            }
            eprintln!("starting {name}");
            subjects.push(
                Start::Ebsocks(EbsocksSpec {
                    binary: ebsocks.clone(),
                    data_path: p.clone(),
                    workdir: workdir.clone(),
                    log_level: cli.daemon_log.clone(),
                    pin_root: pin_root.clone(),
                    max_sessions: nofile,
                })
                .start(),
            );
        }
    }
    for p in &peers {
        eprintln!("starting {p}");
        let workdir = workdir.clone();
        subjects.push(
            match p.as_str() {
                "microsocks" => Start::Microsocks { workdir },
                _ => Start::Dante { workdir },
            }
            .start(),
        );
    }
    for s in &subjects {
        match (&s.info.unavailable_reason, &s.info.listen) {
            (Some(r), _) => eprintln!(
                "  {}: unavailable: {}",
                s.name,
                r.lines().next().unwrap_or_default()
            ),
            (None, Some(l)) => eprintln!("  {}: listening on {l}", s.name),
            (None, None) => eprintln!("  {}: ready", s.name),
        }
    }

    let background_before = background_busy_cpus();
    eprintln!(
        "background load before the runs: {background_before:.2} of {} CPUs busy",
        machine.cores
    );

    let set = Settings {
        warmup: Duration::from_secs_f64(warmup),
        window: Duration::from_secs_f64(cli.seconds),
    };
    let n_avail = subjects.iter().filter(|s| s.available()).count();
    let total_runs = n_avail * workloads.len() * cli.repeat;
    let estimate: f64 =
        workloads.iter().map(|w| w.estimate_s(&set)).sum::<f64>() * (n_avail * cli.repeat) as f64;
    eprintln!(
        "{total_runs} runs ({n_avail} subjects × {} workloads × {} repeats) of {} s + {} s warm-up: about {:.0} s",
        workloads.len(),
        cli.repeat,
        cli.seconds,
        warmup,
        estimate + 5.0
    );

    // outcomes[subject][workload] = one entry per run.
    let mut outcomes: Vec<Vec<Vec<Result<RunSample, String>>>> = subjects
        .iter()
        .map(|_| workloads.iter().map(|_| Vec::new()).collect())
        .collect();
    let mut done = 0;
    'outer: for (wi, w) in workloads.iter().enumerate() {
        for r in 0..cli.repeat {
            for (si, s) in subjects.iter_mut().enumerate() {
                if interrupted() {
                    break 'outer;
                }
                if !s.available() {
                    continue;
                }
                if let Some(why) = s.check_alive() {
                    eprintln!("{}: {}", s.name, why);
                    continue;
                }
                if w.fresh_server() {
                    if let Err(why) = s.restart() {
                        eprintln!("{}: {why}", s.name);
                        continue;
                    }
                }
                done += 1;
                let res = workloads::run_once(*w, s, &set, &rt);
                if interrupted() {
                    break 'outer;
                }
                let line = match &res {
                    Ok(x) => x.progress(*w),
                    Err(e) => format!("failed: {e:#}"),
                };
                eprintln!(
                    "[{done}/{total_runs}] {} #{} {}: {line}",
                    w.name(),
                    r + 1,
                    s.name
                );
                outcomes[si][wi].push(res.map_err(|e| format!("{e:#}")));
                if let Some(why) = s.check_alive() {
                    eprintln!("{}: {}", s.name, why);
                }
                // Let the previous run's connections and softirq work settle.
                workloads::sleep_interruptible(Duration::from_millis(20));
            }
        }
    }
    let was_interrupted = interrupted();
    let background_after = background_busy_cpus();
    let idle_limit = 0.1 * machine.cores as f64;
    if background_before.max(background_after) > idle_limit {
        notes.push(format!(
            "the machine was not idle: {background_before:.2} CPUs busy in the 0.5 s before the runs, \
             {background_after:.2} after; other load disturbs every figure, machine CPU most"
        ));
    }

    for s in subjects.iter_mut().rev() {
        s.stop();
    }
    let mut results = Vec::new();
    for (si, s) in subjects.iter().enumerate() {
        for (wi, w) in workloads.iter().enumerate() {
            if !outcomes[si][wi].is_empty() {
                results.push(Cell::new(&s.name, *w, &outcomes[si][wi]));
            }
        }
    }
    // Keep the logs of any server that was started and then failed.
    let any_failure = subjects
        .iter()
        .any(|s| s.info.unavailable_reason.is_some() && s.info.log.is_some());
    let keep = cli.keep_logs || any_failure;
    let mut infos: Vec<_> = subjects.iter().map(|s| s.info.clone()).collect();
    if !keep {
        for i in &mut infos {
            i.log = None;
        }
    }
    let mut report = Report {
        tool: "ebsocks-bench",
        version: env!("CARGO_PKG_VERSION"),
        date,
        machine,
        settings: report::Settings {
            seconds: cli.seconds,
            warmup_seconds: warmup,
            repeat: cli.repeat,
            paths: paths.clone(),
            workloads: workloads.iter().map(|w| w.name()).collect(),
            idle_sessions: workloads
                .iter()
                .any(|w| matches!(w, Workload::Idle { .. }))
                .then_some(cli.idle_sessions),
            nofile_limit: nofile,
            peers,
            ebsocks: (!paths.is_empty()).then(|| ebsocks.display().to_string()),
        },
        background_busy_cpus: [background_before, background_after],
        duration_s: started.elapsed().as_secs_f64(),
        interrupted: was_interrupted,
        notes,
        subjects: infos,
        results,
        udp: Vec::new(),
    };
    report.compute_ratios();
    let mut md = report.markdown(&workloads);
    if run_udp && !was_interrupted {
        eprintln!("UDP: building the netns topology");
        match udp::run(&ebsocks, &workdir, cli.seconds, cli.repeat) {
            Ok((section, udp)) => {
                md.push_str(&section);
                report.udp = udp;
            }
            Err(e) => md.push_str(&format!("\n## UDP\n\nnot measured: {e:#}\n")),
        }
    }
    print!("{md}");
    if let Some(f) = &cli.markdown {
        std::fs::write(f, &md).with_context(|| format!("write {}", f.display()))?;
    }
    if let Some(f) = &cli.json {
        let j = serde_json::to_string_pretty(&report)?;
        std::fs::write(f, j + "\n").with_context(|| format!("write {}", f.display()))?;
    }
    drop(subjects);
    if keep {
        eprintln!("server logs kept in {}", workdir.display());
    } else {
        let _ = std::fs::remove_dir_all(&workdir);
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(if was_interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}
