//! Aggregation of repeated runs (median, min, max, ratio to direct) and the Markdown / JSON
//! output.

use std::fmt::Write as _;

use serde::Serialize;

use crate::idle::IdleSample;
use crate::procfs::Machine;
use crate::subjects::SubjectInfo;
use crate::workloads::{Metric, RunSample, Workload};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Stat> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// Steal (the share of CPU time a VM's host took) from which a cell says so in its notes.
const STEAL_NOTE_PERCENT: f64 = 5.0;

/// Every figure of one (subject, workload) pair.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub subject: String,
    pub workload: String,
    pub metric: Metric,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// The main figure over the successful runs.
    pub figure: Option<Stat>,
    /// `figure.median` / direct's `figure.median`.
    pub ratio_to_direct: Option<f64>,
    pub p50_us: Option<Stat>,
    pub p99_us: Option<Stat>,
    pub ops_per_s: Option<Stat>,
    pub cpu_unit: &'static str,
    /// Server CPU per GiB received (bulk) or per request / session; median over runs.
    pub daemon_cpu: Option<Stat>,
    /// Whole-machine busy CPU in the same unit (steal excluded).
    pub machine_cpu: Option<Stat>,
    /// Percent of the machine's CPU time its host took during the runs (steal).
    pub steal_percent: Option<Stat>,
    /// Highest peak RSS of the server's processes over the runs, KiB.
    pub daemon_peak_rss_kib: Option<u64>,
    /// `fair-1000`: Jain's fairness index over the sessions.
    pub jain_index: Option<Stat>,
    /// `fair-1000`: the slowest session's bytes over the mean.
    pub min_share: Option<Stat>,
    /// `idle-10k`: medians over the runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleStats>,
    pub errors: u64,
    pub runs: Vec<RunSample>,
    /// Runs that produced no figure, with the reason.
    pub failed_runs: Vec<String>,
    pub notes: Vec<String>,
}

/// `idle-10k` figures of one subject, each the median over the runs (KiB and MiB as in
/// [`IdleSample`]).
#[derive(Debug, Clone, Serialize)]
pub struct IdleStats {
    pub attempted: usize,
    pub established: Stat,
    pub open: Stat,
    pub verified: Stat,
    pub setup_s: Stat,
    pub rss_before_mib: Option<Stat>,
    pub rss_after_mib: Option<Stat>,
    pub rss_per_session_kib: Option<Stat>,
    pub rss_at_100k_mib: Option<Stat>,
    pub fds_per_session: Option<Stat>,
    pub idle_cpu_percent: Option<Stat>,
    pub kernel_slab_per_session_kib: Option<Stat>,
}

impl IdleStats {
    fn of(samples: &[&IdleSample]) -> Option<IdleStats> {
        let first = samples.first()?;
        let stat =
            |f: &dyn Fn(&IdleSample) -> Option<f64>| Stat::of(samples.iter().filter_map(|s| f(s)));
        let mib = |k: Option<u64>| k.map(|k| k as f64 / 1024.0);
        Some(IdleStats {
            attempted: first.attempted,
            established: stat(&|s| Some(s.established as f64))?,
            open: stat(&|s| Some(s.open as f64))?,
            verified: stat(&|s| Some(s.verified as f64))?,
            setup_s: stat(&|s| Some(s.setup_s))?,
            rss_before_mib: stat(&|s| mib(s.rss_before_kib)),
            rss_after_mib: stat(&|s| mib(s.rss_after_kib)),
            rss_per_session_kib: stat(&|s| s.rss_per_session_kib),
            rss_at_100k_mib: stat(&|s| s.rss_at_100k_mib),
            fds_per_session: stat(&|s| s.fds_per_session),
            idle_cpu_percent: stat(&|s| s.idle_cpu_percent),
            kernel_slab_per_session_kib: stat(&|s| s.kernel_slab_per_session_kib),
        })
    }

    /// Notes on how the runs went: early stops, sessions that did not echo, descriptors the
    /// server kept.
    fn notes(samples: &[&IdleSample]) -> Vec<String> {
        let mut notes = Vec::new();
        let runs = samples.len();
        let stopped: Vec<&IdleSample> = samples
            .iter()
            .copied()
            .filter(|s| s.stopped_early.is_some())
            .collect();
        if let Some(s) = stopped.first() {
            notes.push(format!(
                "set-up stopped early in {} of {runs} run(s), at {} established: {}",
                stopped.len(),
                s.established,
                s.stopped_early.as_deref().unwrap_or_default()
            ));
        }
        let unchecked: usize = samples.iter().map(|s| s.unchecked).sum();
        if unchecked > 0 {
            notes.push(format!(
                "{unchecked} session(s) not echo-checked (time bound)"
            ));
        }
        if let Some(s) = samples
            .iter()
            .find(|s| s.target_connections != s.established)
        {
            notes.push(format!(
                "{} sessions got their CONNECT reply, the target held {} of them when the memory was read",
                s.established, s.target_connections
            ));
        }
        if let Some(s) = samples.iter().find(|s| {
            s.fds_before
                .zip(s.fds_after_close)
                .is_some_and(|(b, a)| a > b)
        }) {
            notes.push(format!(
                "the server held {} descriptors after the close, {} before",
                s.fds_after_close.unwrap_or_default(),
                s.fds_before.unwrap_or_default()
            ));
        }
        notes
    }
}

impl Cell {
    pub fn new(subject: &str, w: Workload, outcomes: &[Result<RunSample, String>]) -> Cell {
        let m = w.metric();
        let runs: Vec<RunSample> = outcomes
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        let failed_runs: Vec<String> = outcomes
            .iter()
            .filter_map(|r| r.as_ref().err().cloned())
            .collect();
        let errors = runs.iter().map(|r| r.errors).sum();
        let mut notes = Vec::new();
        if errors > 0 {
            let first = runs
                .iter()
                .find_map(|r| r.first_error.clone())
                .unwrap_or_default();
            notes.push(format!("{errors} error(s), first: {first}"));
        }
        let stalled: usize = runs.iter().map(|r| r.stalled_streams).sum();
        if stalled > 0 {
            notes.push(format!(
                "{stalled} stalled stream-run(s) (no byte received in a window)"
            ));
        }
        let lingering = runs.iter().filter(|r| r.lingering_target_conns > 0).count();
        let close_lag = Stat::of(runs.iter().filter_map(|r| r.target_close_ms));
        if lingering > 0 {
            notes.push(format!(
                "in {lingering} of {} run(s) the target still had connections open {} s after the clients closed",
                runs.len(),
                w.drain_timeout().as_secs_f64()
            ));
        } else if let Some(lag) = close_lag.filter(|l| l.median >= 100.0) {
            notes.push(format!(
                "the target saw the close {:.0} ms after the clients (median)",
                lag.median
            ));
        }
        let idle_samples: Vec<&IdleSample> = runs.iter().filter_map(|r| r.idle.as_ref()).collect();
        notes.extend(IdleStats::notes(&idle_samples));
        let steal_percent = Stat::of(runs.iter().filter_map(|r| r.steal_share.map(|x| 100.0 * x)));
        if let Some(st) = steal_percent.filter(|st| st.median >= STEAL_NOTE_PERCENT) {
            notes.push(format!(
                "the host took {:.0} % of the CPU time (steal, median)",
                st.median
            ));
        }
        if !failed_runs.is_empty() {
            notes.push(format!(
                "{} of {} run(s) failed: {}",
                failed_runs.len(),
                outcomes.len(),
                failed_runs[0]
            ));
        }
        Cell {
            subject: subject.into(),
            workload: w.name(),
            metric: m,
            unit: m.unit(),
            higher_is_better: m.higher_is_better(),
            figure: Stat::of(runs.iter().filter_map(|r| r.figure(m))),
            ratio_to_direct: None,
            p50_us: Stat::of(runs.iter().filter_map(|r| r.p50_us)),
            p99_us: Stat::of(runs.iter().filter_map(|r| r.p99_us)),
            ops_per_s: Stat::of(runs.iter().filter_map(|r| r.ops_per_s)),
            cpu_unit: m.cpu_unit(),
            daemon_cpu: Stat::of(
                runs.iter()
                    .filter_map(|r| r.daemon_cpu_s.and_then(|c| r.cpu_per_unit(m, c))),
            ),
            machine_cpu: Stat::of(
                runs.iter()
                    .filter_map(|r| r.cpu_per_unit(m, r.machine_cpu_s)),
            ),
            steal_percent,
            daemon_peak_rss_kib: runs.iter().filter_map(|r| r.daemon_peak_rss_kib).max(),
            jain_index: Stat::of(runs.iter().filter_map(|r| r.jain_index)),
            min_share: Stat::of(runs.iter().filter_map(|r| r.min_share)),
            idle: IdleStats::of(&idle_samples),
            errors,
            runs,
            failed_runs,
            notes,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub seconds: f64,
    pub warmup_seconds: f64,
    pub repeat: usize,
    pub paths: Vec<String>,
    pub workloads: Vec<String>,
    /// Sessions idle-10k set out to open.
    pub idle_sessions: Option<usize>,
    /// The open-files limit of the benchmark and of the servers it starts.
    pub nofile_limit: u64,
    pub peers: Vec<String>,
    pub ebsocks: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub date: String,
    pub machine: Machine,
    pub settings: Settings,
    /// Busy CPUs (out of `machine.cores`) in 0.5 s with no benchmark traffic, before and
    /// after the runs.
    pub background_busy_cpus: [f64; 2],
    pub duration_s: f64,
    pub interrupted: bool,
    pub notes: Vec<String>,
    pub subjects: Vec<SubjectInfo>,
    pub results: Vec<Cell>,
    /// The UDP datagram-rate comparison, when it ran.
    pub udp: Vec<crate::udp::UdpResult>,
}

impl Report {
    /// Fills in every cell's ratio to the direct subject of the same workload.
    pub fn compute_ratios(&mut self) {
        let direct: Vec<(String, f64)> = self
            .results
            .iter()
            .filter(|c| c.subject == "direct")
            .filter_map(|c| c.figure.map(|f| (c.workload.clone(), f.median)))
            .collect();
        for c in &mut self.results {
            let base = direct
                .iter()
                .find(|(w, _)| *w == c.workload)
                .map(|(_, f)| *f);
            c.ratio_to_direct = match (c.figure, base) {
                (Some(f), Some(b)) if b > 0.0 => Some(f.median / b),
                _ => None,
            };
        }
    }

    /// Steal over every measured window of every run, weighted by the window's length.
    pub fn steal_percent(&self) -> Option<f64> {
        let (mut stolen, mut total) = (0.0, 0.0);
        for r in self.results.iter().flat_map(|c| &c.runs) {
            if let Some(x) = r.steal_share {
                stolen += x * r.window_s;
                total += r.window_s;
            }
        }
        (total > 0.0).then(|| 100.0 * stolen / total)
    }

    fn cell(&self, subject: &str, workload: &str) -> Option<&Cell> {
        self.results
            .iter()
            .find(|c| c.subject == subject && c.workload == workload)
    }

    pub fn markdown(&self, workloads: &[Workload]) -> String {
        let mut o = String::new();
        let s = &self.settings;
        let _ = writeln!(o, "# ebsocks benchmark, {}\n", self.date);
        let _ = writeln!(
            o,
            "Machine: {}; background load {:.2} / {:.2} CPUs busy before / after the runs.\n",
            self.machine.one_line(),
            self.background_busy_cpus[0],
            self.background_busy_cpus[1]
        );
        let _ = writeln!(
            o,
            "Loopback (127.0.0.1) only; targets and load generator run inside ebsocks-bench. Each figure is the \
             median of {} run(s) of {} s (after {} s of warm-up), min–max beside it; × direct is the ratio to \
             the direct connection measured in the same invocation. Server CPU = user + system time of the \
             server's processes; machine CPU = all busy time of the machine (including softirq, the load \
             generator and the targets) in the same window, not counting steal (time a VM's host ran \
             something else, which slows every figure but is no work of this machine's; it is given \
             apart); per GiB received for bulk, per request / session \
             otherwise (server CPU is counted in 1/{} s ticks, so a server that does next to nothing shows 0). \
             Peak RSS = VmHWM during the run, summed over the server's processes.{}\n",
            s.repeat,
            fmt_num(s.seconds),
            fmt_num(s.warmup_seconds),
            crate::procfs::clock_ticks(),
            if self.interrupted { " **Interrupted: figures are partial.**" } else { "" }
        );
        if let Some(steal) = self.steal_percent() {
            let _ = writeln!(
                o,
                "Host steal during the measured windows: {steal:.1} % of the CPU time{}.\n",
                if steal >= STEAL_NOTE_PERCENT {
                    format!("; cells where it reached {STEAL_NOTE_PERCENT} % say so in their notes")
                } else {
                    String::new()
                }
            );
        }
        for n in &self.notes {
            let _ = writeln!(o, "Note: {n}\n");
        }

        let measured: Vec<&SubjectInfo> = self
            .subjects
            .iter()
            .filter(|si| self.results.iter().any(|c| c.subject == si.name))
            .collect();

        // Summary: direct in absolute figures, everyone else as a ratio.
        let _ = writeln!(o, "## Summary\n");
        let _ = writeln!(
            o,
            "direct in absolute figures; other rows × direct (throughput and session rate: higher is better; \
             rr latency: lower is better); idle-10k: the server's RSS per idle session, absolute (direct \
             has no server).\n"
        );
        let mut head = String::from("| subject |");
        let mut rule = String::from("|---|");
        for w in workloads {
            let _ = write!(head, " {} |", w.name());
            rule.push_str("---:|");
        }
        let _ = writeln!(o, "{head}\n{rule}");
        for si in &measured {
            let mut row = format!("| {} |", si.name);
            for w in workloads {
                let text = match self.cell(&si.name, &w.name()) {
                    Some(c) if si.name == "direct" && w.metric() == Metric::Memory => {
                        if c.runs.is_empty() { "failed" } else { "n/a" }.into()
                    }
                    Some(c) if si.name == "direct" => c
                        .figure
                        .map(|f| {
                            format!(
                                "{} {}",
                                fmt_fig(w.metric(), f.median),
                                short_unit(w.metric())
                            )
                        })
                        .unwrap_or("failed".into()),
                    Some(c) => match (c.ratio_to_direct, c.figure) {
                        (Some(r), _) => format!("{r:.2}×"),
                        (None, Some(f)) => format!(
                            "{} {}",
                            fmt_fig(w.metric(), f.median),
                            short_unit(w.metric())
                        ),
                        (None, None) => "failed".into(),
                    },
                    None => "–".into(),
                };
                let _ = write!(row, " {text} |");
            }
            let _ = writeln!(o, "{row}");
        }
        let _ = writeln!(o);

        for w in workloads {
            let m = w.metric();
            let _ = writeln!(o, "## {}\n\n{}.\n", w.name(), w.describe());
            let cu = m.cpu_unit();
            match (w, m) {
                (Workload::Fair { .. }, _) => {
                    let _ = writeln!(
                        o,
                        "| subject | Gbit/s | min–max | × direct | Jain index | min/mean | server CPU {cu} | machine CPU {cu} | server peak RSS MiB | notes |\n\
                         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
                    );
                }
                (_, Metric::Memory) => {
                    let _ = writeln!(
                        o,
                        "| subject | sessions open | echoed | set-up s | server RSS before MiB | after MiB | KiB/session | at 100k sessions MiB | server fds/session | server CPU idle % | kernel slab KiB/session | notes |\n\
                         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
                    );
                }
                (_, Metric::Throughput) => {
                    let _ = writeln!(
                        o,
                        "| subject | Gbit/s | min–max | × direct | server CPU {cu} | machine CPU {cu} | server peak RSS MiB | notes |\n\
                         |---|---:|---:|---:|---:|---:|---:|---|"
                    );
                }
                (_, Metric::Latency) => {
                    let _ = writeln!(
                        o,
                        "| subject | p50 µs | min–max p50 | p99 µs | × direct (p50) | req/s | server CPU {cu} | machine CPU {cu} | server peak RSS MiB | notes |\n\
                         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
                    );
                }
                (_, Metric::SessionRate) => {
                    let _ = writeln!(
                        o,
                        "| subject | sessions/s | min–max | × direct | session p50 / p99 ms | server CPU {cu} | machine CPU {cu} | server peak RSS MiB | notes |\n\
                         |---|---:|---:|---:|---:|---:|---:|---:|---|"
                    );
                }
            }
            for si in &measured {
                let Some(c) = self.cell(&si.name, &w.name()) else {
                    continue;
                };
                let fig =
                    |st: Option<Stat>| st.map(|f| fmt_fig(m, f.median)).unwrap_or("failed".into());
                let range = |st: Option<Stat>| {
                    st.map(|f| format!("{}–{}", fmt_fig(m, f.min), fmt_fig(m, f.max)))
                        .unwrap_or_default()
                };
                let ratio = c
                    .ratio_to_direct
                    .map(|r| format!("{r:.2}"))
                    .unwrap_or("–".into());
                let cpu =
                    |st: Option<Stat>| st.map(|x| fmt_cpu(m, x.median)).unwrap_or("n/a".into());
                let rss = c
                    .daemon_peak_rss_kib
                    .map(|k| format!("{:.1}", k as f64 / 1024.0))
                    .unwrap_or("n/a".into());
                let notes = c
                    .notes
                    .iter()
                    .map(|n| one_line(n, 160))
                    .collect::<Vec<_>>()
                    .join("; ");
                let opt = |st: Option<Stat>, digits: usize| {
                    st.map(|x| format!("{:.*}", digits, x.median))
                        .unwrap_or("n/a".into())
                };
                let row = match (w, m) {
                    (Workload::Fair { .. }, _) => format!(
                        "| {} | {} | {} | {ratio} | {} | {} | {} | {} | {rss} | {notes} |",
                        c.subject,
                        fig(c.figure),
                        range(c.figure),
                        opt(c.jain_index, 3),
                        opt(c.min_share, 2),
                        cpu(c.daemon_cpu),
                        cpu(c.machine_cpu)
                    ),
                    (_, Metric::Memory) => match &c.idle {
                        Some(i) => format!(
                            "| {} | {:.0} of {} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {notes} |",
                            c.subject,
                            i.open.median,
                            i.attempted,
                            i.verified.median,
                            i.setup_s.median,
                            opt(i.rss_before_mib, 1),
                            opt(i.rss_after_mib, 1),
                            opt(i.rss_per_session_kib, 2),
                            opt(i.rss_at_100k_mib, 0),
                            opt(i.fds_per_session, 2),
                            opt(i.idle_cpu_percent, 1),
                            opt(i.kernel_slab_per_session_kib, 2),
                        ),
                        None => format!(
                            "| {} | failed | | | | | | | | | | {notes} |",
                            c.subject
                        ),
                    },
                    (_, Metric::Throughput) => format!(
                        "| {} | {} | {} | {ratio} | {} | {} | {rss} | {notes} |",
                        c.subject,
                        fig(c.figure),
                        range(c.figure),
                        cpu(c.daemon_cpu),
                        cpu(c.machine_cpu)
                    ),
                    (_, Metric::Latency) => format!(
                        "| {} | {} | {} | {} | {ratio} | {} | {} | {} | {rss} | {notes} |",
                        c.subject,
                        fig(c.figure),
                        range(c.figure),
                        c.p99_us
                            .map(|p| format!("{:.1}", p.median))
                            .unwrap_or_default(),
                        c.ops_per_s
                            .map(|p| format!("{:.0}", p.median))
                            .unwrap_or_default(),
                        cpu(c.daemon_cpu),
                        cpu(c.machine_cpu)
                    ),
                    (_, Metric::SessionRate) => format!(
                        "| {} | {} | {} | {ratio} | {} | {} | {} | {rss} | {notes} |",
                        c.subject,
                        fig(c.figure),
                        range(c.figure),
                        match (c.p50_us, c.p99_us) {
                            (Some(a), Some(b)) =>
                                format!("{:.2} / {:.2}", a.median / 1e3, b.median / 1e3),
                            _ => String::new(),
                        },
                        cpu(c.daemon_cpu),
                        cpu(c.machine_cpu)
                    ),
                };
                let _ = writeln!(o, "{row}");
            }
            let _ = writeln!(o);
        }

        let _ = writeln!(o, "## Subjects\n");
        for si in &self.subjects {
            let status = if si.available || self.results.iter().any(|c| c.subject == si.name) {
                match &si.unavailable_reason {
                    Some(r) => format!("measured until it failed: {}", one_line(r, 400)),
                    None => "measured".to_string(),
                }
            } else {
                format!(
                    "unavailable: {}",
                    one_line(si.unavailable_reason.as_deref().unwrap_or("?"), 400)
                )
            };
            let _ = write!(o, "- **{}**: {status}", si.name);
            if let Some(v) = &si.version {
                let _ = write!(o, "; {v}");
            }
            if let Some(c) = &si.command {
                let _ = write!(o, "; `{c}`");
            }
            if let Some(e) = &si.exit {
                let _ = write!(o, "; stop: {}", one_line(e, 200));
            }
            let _ = writeln!(o);
        }
        let _ = writeln!(o, "\nTotal time {:.0} s.", self.duration_s);
        o
    }
}

fn short_unit(m: Metric) -> &'static str {
    match m {
        Metric::Throughput => "Gbit/s",
        Metric::Latency => "µs",
        Metric::SessionRate => "/s",
        Metric::Memory => "KiB/session",
    }
}

fn fmt_fig(m: Metric, v: f64) -> String {
    match m {
        Metric::Throughput => format!("{v:.2}"),
        Metric::Latency => format!("{v:.1}"),
        Metric::SessionRate => format!("{v:.0}"),
        Metric::Memory => format!("{v:.2}"),
    }
}

fn fmt_cpu(m: Metric, v: f64) -> String {
    match m {
        Metric::Throughput => format!("{v:.3}"),
        Metric::Latency | Metric::SessionRate | Metric::Memory => format!("{v:.1}"),
    }
}

fn fmt_num(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Markdown-safe single line, cut at `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let flat = s
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|");
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max).collect();
        format!("{cut}…")
    } else {
        flat
    }
}
