//! `ebsocks stats`: reads a running daemon's pinned BPF maps from another process, and what the
//! daemon adds through its control socket. The same [`Snapshot`] is built inside the daemon for
//! the Prometheus endpoint ([`Snapshot::from_daemon`]), so both always show the same figures.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use proxy_common::metrics::{
    Counter, DataPath, Direction, SessionTraffic, Traffic, TrafficSlot, DAEMON_COUNTERS,
    DAEMON_TRAFFIC, HISTOGRAMS, KERNEL_TRAFFIC, LATENCY_BUCKETS_US, SESSIONS, TRAFFIC_SLOTS,
};
use serde::Serialize;

use crate::{
    control::Info,
    registry::{SessionInfo, State},
    Shared,
};

/// Why the counters could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot read {map} under {dir}: {}{}",
    crate::with_causes(source),
    crate::reach_hint(source, "its pins", "pin_dir")
)]
pub struct StatsError {
    map: &'static str,
    dir: String,
    #[source]
    source: aya::maps::MapError,
}

/// One traffic row.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TrafficRow {
    /// `tcp`.
    pub proto: &'static str,
    /// `sockmap`, `splice` or `copy`.
    pub path: &'static str,
    /// `up` (client to target) or `down`.
    pub dir: &'static str,
    /// Payload bytes.
    pub bytes: u64,
    /// skbs (kernel) or chunks (daemon).
    pub packets: u64,
}

/// One live spliced session.
#[derive(Debug, Serialize, PartialEq, Eq, Default)]
pub struct SessionRow {
    /// Daemon session id.
    pub id: u64,
    /// Always `sockmap` for now.
    pub path: &'static str,
    /// Bytes client -> target carried by the kernel.
    pub up_bytes: u64,
    /// Bytes target -> client carried by the kernel.
    pub down_bytes: u64,
    /// skbs client -> target.
    pub up_packets: u64,
    /// skbs target -> client.
    pub down_packets: u64,
}

/// One cumulative histogram bucket.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BucketRow {
    /// Upper bound in seconds.
    pub le: f64,
    /// Observations of at most `le`.
    pub count: u64,
}

/// A latency histogram.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HistogramRow {
    /// Cumulative buckets, narrowest first; the `+Inf` bucket is `count`.
    pub buckets: Vec<BucketRow>,
    /// Observations.
    pub count: u64,
    /// Sum of the observations in seconds.
    pub sum_seconds: f64,
}

impl HistogramRow {
    /// Builds a histogram from raw cells, made consistent (buckets non-decreasing, count at
    /// least the widest bucket) in case a reader raced a writer.
    pub(crate) fn from_cells(buckets: &[u64], count: u64, sum_us: u64) -> Self {
        let mut running = 0;
        let buckets: Vec<BucketRow> = buckets
            .iter()
            .zip(LATENCY_BUCKETS_US)
            .map(|(&n, bound)| {
                running = running.max(n);
                BucketRow {
                    le: bound as f64 / 1e6,
                    count: running,
                }
            })
            .collect();
        Self {
            buckets,
            count: count.max(running),
            sum_seconds: sum_us as f64 / 1e6,
        }
    }

    /// The upper bound of the bucket holding quantile `q`, None when empty or beyond the
    /// widest bucket.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        self.buckets.iter().find(|b| b.count >= rank).map(|b| b.le)
    }
}

/// Everything `ebsocks stats` shows.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// Per protocol, path and direction.
    pub traffic: Vec<TrafficRow>,
    /// Daemon counters by name (histogram cells included).
    pub counters: BTreeMap<&'static str, u64>,
    /// Latency histograms by name (`connect_latency`, `dns_latency`).
    pub histograms: BTreeMap<&'static str, HistogramRow>,
    /// Live spliced sessions (the kernel's per-socket counters).
    pub sessions: Vec<SessionRow>,
    /// The XDP UDP fast path's counters, when its maps are pinned (`udp.xdp_interfaces`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xdp: Option<crate::udp::xdp::XdpSnapshot>,
    /// What the daemon said through its control socket, when it could be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daemon: Option<Info>,
}

fn histograms(get: impl Fn(Counter) -> u64) -> BTreeMap<&'static str, HistogramRow> {
    HISTOGRAMS
        .iter()
        .map(|h| {
            let cells: Vec<u64> = (0..LATENCY_BUCKETS_US.len())
                .map(|i| get(h.bucket(i)))
                .collect();
            (
                h.name,
                HistogramRow::from_cells(&cells, get(h.count), get(h.sum_us)),
            )
        })
        .collect()
}

fn traffic_row(i: u32, t: Traffic) -> TrafficRow {
    let (proto, path, dir) = TrafficSlot(i).names();
    TrafficRow {
        proto,
        path,
        dir,
        bytes: t.bytes,
        packets: t.packets,
    }
}

/// Sums the kernel's per-CPU traffic counters of every slot, from the pinned map.
fn kernel_traffic(dir: &Path) -> Result<Vec<Traffic>, StatsError> {
    let map = open(dir, KERNEL_TRAFFIC)?;
    let ktraffic: PerCpuArray<_, Traffic> =
        PerCpuArray::try_from(Map::PerCpuArray(map)).map_err(|source| StatsError {
            map: KERNEL_TRAFFIC,
            dir: dir.display().to_string(),
            source,
        })?;
    Ok((0..TRAFFIC_SLOTS)
        .map(|i| {
            let mut t = Traffic::default();
            if let Ok(per_cpu) = ktraffic.get(&i, 0) {
                for v in per_cpu.iter() {
                    t.bytes += v.bytes;
                    t.packets += v.packets;
                }
            }
            t
        })
        .collect())
}

fn open(dir: &Path, name: &'static str) -> Result<MapData, StatsError> {
    MapData::from_pin(dir.join(name)).map_err(|source| StatsError {
        map: name,
        dir: dir.display().to_string(),
        source,
    })
}

impl Snapshot {
    /// Reads the maps pinned under `dir`.
    pub fn read(dir: &Path) -> Result<Self, StatsError> {
        let err = |map: &'static str| {
            let dir = dir.display().to_string();
            move |source| StatsError { map, dir, source }
        };
        let ktraffic: PerCpuArray<_, Traffic> =
            PerCpuArray::try_from(Map::PerCpuArray(open(dir, KERNEL_TRAFFIC)?))
                .map_err(err(KERNEL_TRAFFIC))?;
        let utraffic: Array<_, Traffic> =
            Array::try_from(Map::Array(open(dir, DAEMON_TRAFFIC)?)).map_err(err(DAEMON_TRAFFIC))?;
        let counters: Array<_, u64> = Array::try_from(Map::Array(open(dir, DAEMON_COUNTERS)?))
            .map_err(err(DAEMON_COUNTERS))?;
        let sessions: HashMap<_, u64, SessionTraffic> =
            HashMap::try_from(Map::HashMap(open(dir, SESSIONS)?)).map_err(err(SESSIONS))?;

        let mut traffic = Vec::new();
        for i in 0..TRAFFIC_SLOTS {
            let mut t = Traffic::default();
            if let Ok(per_cpu) = ktraffic.get(&i, 0) {
                for v in per_cpu.iter() {
                    t.bytes += v.bytes;
                    t.packets += v.packets;
                }
            }
            if let Ok(v) = utraffic.get(&i, 0) {
                t.bytes += v.bytes;
                t.packets += v.packets;
            }
            traffic.push(traffic_row(i, t));
        }

        // Narrowest histogram bucket first, count last: see `Metrics::observe`.
        let counters: BTreeMap<&'static str, u64> = Counter::ALL
            .iter()
            .map(|&c| (c.name(), counters.get(&(c as u32), 0).unwrap_or(0)))
            .collect();
        let histograms = histograms(|c| counters.get(c.name()).copied().unwrap_or(0));

        let mut by_id: BTreeMap<u64, SessionRow> = BTreeMap::new();
        for entry in sessions.iter().flatten() {
            let (_cookie, st) = entry;
            let row = by_id.entry(st.session_id).or_insert_with(|| SessionRow {
                id: st.session_id,
                path: "sockmap",
                ..Default::default()
            });
            if st.direction == 0 {
                row.up_bytes += st.bytes;
                row.up_packets += st.packets;
            } else {
                row.down_bytes += st.bytes;
                row.down_packets += st.packets;
            }
        }
        Ok(Self {
            traffic,
            counters,
            histograms,
            xdp: crate::udp::xdp::XdpSnapshot::read(dir),
            sessions: by_id.into_values().collect(),
            daemon: None,
        })
    }

    /// The same figures, read inside the daemon: its own counters directly, the kernel's from
    /// the pinned map (zero when the eBPF programs are not loaded), and what the control socket
    /// would say. Without per-session rows.
    pub fn from_daemon(shared: &Shared) -> Self {
        let kernel = match &shared.kernel {
            Some(_) => kernel_traffic(&shared.config().pin_dir).unwrap_or_else(|e| {
                tracing::debug!(cause = %e, "kernel traffic counters unavailable");
                Vec::new()
            }),
            None => Vec::new(),
        };
        let traffic = (0..TRAFFIC_SLOTS)
            .map(|i| {
                let k = kernel.get(i as usize).copied().unwrap_or_default();
                let d = shared.metrics.traffic(TrafficSlot(i));
                traffic_row(
                    i,
                    Traffic {
                        bytes: k.bytes + d.bytes,
                        packets: k.packets + d.packets,
                    },
                )
            })
            .collect();
        let histograms = HISTOGRAMS
            .iter()
            .map(|&h| {
                let (cells, count, sum) = shared.metrics.histogram(h);
                (h.name, HistogramRow::from_cells(&cells, count, sum))
            })
            .collect();
        let counters = Counter::ALL
            .iter()
            .map(|&c| (c.name(), shared.metrics.get(c)))
            .collect();
        Self {
            traffic,
            counters,
            histograms,
            xdp: shared
                .xdp
                .as_ref()
                .and_then(|_| crate::udp::xdp::XdpSnapshot::read(&shared.config().pin_dir)),
            sessions: Vec::new(),
            daemon: Some(shared.info()),
        }
    }

    /// A counter's value.
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters.get(c.name()).copied().unwrap_or(0)
    }

    /// Bytes of a TCP traffic row.
    pub fn tcp_bytes(&self, path: DataPath, dir: Direction) -> u64 {
        let (proto, path, dir) = TrafficSlot::tcp(path, dir).names();
        self.traffic
            .iter()
            .find(|r| (r.proto, r.path, r.dir) == (proto, path, dir))
            .map_or(0, |r| r.bytes)
    }

    /// Live sessions per state: the registry's gauges plus the data paths' own.
    pub fn states(&self) -> Vec<(&'static str, u64)> {
        vec![
            (
                State::Negotiating.name(),
                self.counter(Counter::SessionsNegotiating),
            ),
            (
                State::Authenticating.name(),
                self.counter(Counter::SessionsAuthenticating),
            ),
            (
                State::Resolving.name(),
                self.counter(Counter::SessionsResolving),
            ),
            (
                State::Connecting.name(),
                self.counter(Counter::SessionsConnecting),
            ),
            (
                State::BindWaiting.name(),
                self.counter(Counter::SessionsBindWaiting),
            ),
            (
                DataPath::Sockmap.name(),
                self.counter(Counter::SessionsActiveSockmap),
            ),
            (
                DataPath::Splice.name(),
                self.counter(Counter::SessionsActiveSplice),
            ),
            (
                DataPath::Copy.name(),
                self.counter(Counter::SessionsActiveCopy),
            ),
            (
                State::Udp.name(),
                self.counter(Counter::UdpAssociationsActive),
            ),
        ]
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// JSON on one line (for `--watch --json`).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// A human-readable table.
    pub fn to_table(&self) -> String {
        self.to_table_since(None)
    }

    /// A human-readable table; with an earlier snapshot and the time since, traffic rows get
    /// a bytes-per-second column.
    pub fn to_table_since(&self, prev: Option<(&Snapshot, Duration)>) -> String {
        let mut out = String::new();
        let rate = |i: usize, bytes: u64| -> String {
            match prev {
                Some((p, dt)) if !dt.is_zero() => {
                    let before = p.traffic.get(i).map_or(0, |r| r.bytes);
                    human_rate(bytes.saturating_sub(before) as f64 / dt.as_secs_f64())
                }
                _ => String::new(),
            }
        };
        let _ = writeln!(
            out,
            "{:<6} {:<8} {:<5} {:>16} {:>12} {:>12}",
            "PROTO",
            "PATH",
            "DIR",
            "BYTES",
            "PACKETS",
            if prev.is_some() { "RATE" } else { "" }
        );
        for (i, r) in self.traffic.iter().enumerate() {
            let _ = writeln!(
                out,
                "{:<6} {:<8} {:<5} {:>16} {:>12} {:>12}",
                r.proto,
                r.path,
                r.dir,
                r.bytes,
                r.packets,
                rate(i, r.bytes)
            );
        }

        let mut shown = std::collections::BTreeSet::new();
        let mut section =
            |out: &mut String, title: &str, rows: Vec<(String, u64)>, names: Vec<&'static str>| {
                shown.extend(names);
                let _ = writeln!(out, "\n{title}");
                for (k, v) in rows {
                    let _ = writeln!(out, "  {k:<30} {v:>12}");
                }
            };
        let mut states: Vec<(String, u64)> = self
            .states()
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        states.push((
            "parked (of sockmap, splice)".to_owned(),
            self.counter(Counter::SessionsParked),
        ));
        section(
            &mut out,
            "SESSIONS NOW (by state)",
            states,
            vec![
                Counter::SessionsParked.name(),
                Counter::SessionsNegotiating.name(),
                Counter::SessionsAuthenticating.name(),
                Counter::SessionsResolving.name(),
                Counter::SessionsConnecting.name(),
                Counter::SessionsBindWaiting.name(),
                Counter::SessionsActiveSockmap.name(),
                Counter::SessionsActiveSplice.name(),
                Counter::SessionsActiveCopy.name(),
                Counter::UdpAssociationsActive.name(),
            ],
        );
        let lifecycle = [
            Counter::SessionsCreatedConnect,
            Counter::SessionsCreatedBind,
            Counter::SessionsCreatedUdp,
            Counter::SessionsEndedConnect,
            Counter::SessionsEndedBind,
            Counter::SessionsEndedUdp,
            Counter::SessionsTotalSockmap,
            Counter::SessionsTotalSplice,
            Counter::SessionsTotalCopy,
            Counter::SessionsEndedSockmap,
            Counter::SessionsEndedSplice,
            Counter::SessionsEndedCopy,
            Counter::SessionsPromoted,
        ];
        section(
            &mut out,
            "SESSIONS (created/ended by command, started/ended by data path)",
            lifecycle
                .iter()
                .map(|c| (c.name().to_owned(), self.counter(*c)))
                .collect(),
            lifecycle.iter().map(|c| c.name()).collect(),
        );
        let failures: Vec<(&'static str, Counter)> = crate::metrics::failure_reasons().collect();
        let total: u64 = failures.iter().map(|(_, c)| self.counter(*c)).sum();
        let mut rows: Vec<(String, u64)> = failures
            .iter()
            .filter(|(_, c)| self.counter(*c) != 0)
            .map(|(n, c)| ((*n).to_owned(), self.counter(*c)))
            .collect();
        rows.push(("(total)".to_owned(), total));
        section(
            &mut out,
            "FAILURES (by reason)",
            rows,
            failures.iter().map(|(_, c)| c.name()).collect(),
        );

        let _ = writeln!(
            out,
            "\nLATENCY                         {:>10} {:>10} {:>10} {:>10} {:>10}",
            "COUNT", "MEAN", "P50<=", "P90<=", "P99<="
        );
        for (name, h) in &self.histograms {
            let mean = if h.count == 0 {
                "-".to_owned()
            } else {
                human_secs(h.sum_seconds / h.count as f64)
            };
            let q = |q| {
                h.quantile_bound(q)
                    .map_or_else(|| "-".to_owned(), human_secs)
            };
            let _ = writeln!(
                out,
                "  {name:<30} {:>10} {:>10} {:>10} {:>10} {:>10}",
                h.count,
                mean,
                q(0.5),
                q(0.9),
                q(0.99)
            );
        }
        for h in HISTOGRAMS {
            for i in 0..LATENCY_BUCKETS_US.len() {
                shown.insert(h.bucket(i).name());
            }
            shown.insert(h.count.name());
            shown.insert(h.sum_us.name());
        }

        if let Some(x) = &self.xdp {
            x.write_table(&mut out);
        }

        let _ = writeln!(out, "\nOTHER COUNTERS");
        for (k, v) in self.counters.iter().filter(|(k, _)| !shown.contains(*k)) {
            let _ = writeln!(out, "  {k:<30} {v:>12}");
        }
        if let Some(d) = &self.daemon {
            let _ = writeln!(
                out,
                "\nDAEMON pid {} version {} up {} data path {} sessions {}{}",
                d.pid,
                d.version,
                human_secs(d.uptime_secs),
                d.data_path,
                d.sessions,
                d.metrics_listen
                    .map(|a| format!(" metrics http://{a}/metrics"))
                    .unwrap_or_default()
            );
            let _ = writeln!(
                out,
                "  clients connected now: {}",
                d.accounts.clients_active
            );
            for (title, rows) in [("USER", &d.accounts.users), ("RULE", &d.accounts.rules)] {
                if rows.is_empty() {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "\n{title:<24} {:>10} {:>16} {:>16}",
                    "SESSIONS", "UP BYTES", "DOWN BYTES"
                );
                for r in rows {
                    let _ = writeln!(
                        out,
                        "{:<24} {:>10} {:>16} {:>16}",
                        r.name, r.sessions, r.up_bytes, r.down_bytes
                    );
                }
            }
        }
        if !self.sessions.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<10} {:<8} {:>16} {:>16}",
                "SESSION", "PATH", "UP BYTES", "DOWN BYTES"
            );
            for s in &self.sessions {
                let _ = writeln!(
                    out,
                    "{:<10} {:<8} {:>16} {:>16}",
                    s.id, s.path, s.up_bytes, s.down_bytes
                );
            }
        }
        out
    }
}

fn human_secs(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0}us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1}ms", s * 1e3)
    } else if s < 120.0 {
        format!("{s:.2}s")
    } else if s < 7200.0 {
        format!("{:.1}m", s / 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

fn human_rate(bytes_per_sec: f64) -> String {
    const UNITS: [&str; 5] = ["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"];
    let mut v = bytes_per_sec;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1}{}", UNITS[u])
}

/// `ebsocks stats --watch`: prints a snapshot every `interval` (a table, redrawn in place on a
/// terminal, or one JSON object per line), `count` times or until killed.
pub fn watch(
    dir: &Path,
    control: Option<&Path>,
    interval: Duration,
    count: Option<u64>,
    json: bool,
) -> Result<(), StatsError> {
    use std::io::{IsTerminal as _, Write as _};
    // A terminal is cleared before each table; a file or a pipe gets the tables one after
    // another, a blank line apart, without control codes.
    let redraw = if std::io::stdout().is_terminal() {
        "\x1b[H\x1b[2J"
    } else {
        ""
    };
    let mut prev: Option<(Snapshot, Instant)> = None;
    let mut n = 0u64;
    loop {
        let mut s = Snapshot::read(dir)?;
        s.daemon = control.and_then(|c| crate::control::info(c).ok());
        let now = Instant::now();
        let text = if json {
            s.to_json_line() + "\n"
        } else {
            let since = prev.as_ref().map(|(p, t)| (p, now.duration_since(*t)));
            let table = s.to_table_since(since);
            if n == 0 || !redraw.is_empty() {
                format!("{redraw}{table}")
            } else {
                format!("\n{table}")
            }
        };
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // The reader went away (a closed pipe): stop quietly.
            return Ok(());
        }
        drop(stdout);
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return Ok(());
        }
        prev = Some((s, now));
        std::thread::sleep(interval);
    }
}

/// `ebsocks sessions` as a table, one line per live session.
pub fn sessions_table(sessions: &[SessionInfo]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<22} {:<28} {:<10} {:<14} {:<8} {:>14} {:>14} {:>9} {:<12} {:>9} {:<12} {:>9}",
        "ID",
        "CLIENT",
        "TARGET",
        "USER",
        "STATE",
        "PATH",
        "UP BYTES",
        "DOWN BYTES",
        "AGE",
        "CLIENT TCP",
        "RTT",
        "UPSTREAM TCP",
        "RTT"
    );
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for s in sessions {
        let tcp = |t: &Option<crate::registry::TcpRow>| match t {
            Some(t) => (t.state.clone(), human_secs(f64::from(t.rtt_us) / 1e6)),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let (cstate, crtt) = tcp(&s.client_tcp);
        let (ustate, urtt) = tcp(&s.upstream_tcp);
        let state = if s.state == State::Relaying {
            "relaying"
        } else {
            s.state.name()
        };
        let _ =
            writeln!(
            out,
            "{:<8} {:<22} {:<28} {:<10} {:<14} {:<8} {:>14} {:>14} {:>9} {:<12} {:>9} {:<12} {:>9}",
            s.id,
            s.client.to_string(),
            s.target.as_deref().unwrap_or("-"),
            s.user.as_deref().unwrap_or("-"),
            state,
            s.path.as_deref().unwrap_or(if s.state == State::Udp { "udp" } else { "-" }),
            opt(s.up_bytes),
            opt(s.down_bytes),
            human_secs(s.age_secs),
            cstate,
            crtt,
            ustate,
            urtt
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_rows_are_made_consistent() {
        let mut cells = [0u64; LATENCY_BUCKETS_US.len()];
        cells[2] = 3;
        // A reader that raced a writer: a wider bucket read before its increment.
        cells[3] = 2;
        cells[4] = 5;
        for c in cells.iter_mut().skip(5) {
            *c = 5;
        }
        let h = HistogramRow::from_cells(&cells, 4, 2_500);
        let counts: Vec<u64> = h.buckets.iter().map(|b| b.count).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert_eq!(counts[3], 3);
        assert_eq!(h.count, 5, "the count is at least the widest bucket");
        assert_eq!(h.buckets[0].le, 0.00025);
        assert_eq!(h.sum_seconds, 0.0025);
        assert_eq!(h.quantile_bound(0.5), Some(0.001));
        assert_eq!(h.quantile_bound(1.0), Some(0.005));
        assert_eq!(
            HistogramRow::from_cells(&[0; LATENCY_BUCKETS_US.len()], 0, 0).quantile_bound(0.5),
            None
        );
    }

    #[test]
    fn sessions_table_has_a_line_per_session() {
        let s = SessionInfo {
            id: 7,
            client: "127.0.0.1:5000".parse().unwrap(),
            target: Some("example.test:443".into()),
            user: Some("alice".into()),
            command: Some("connect".into()),
            rule: Some("web".into()),
            state: State::Relaying,
            path: Some("sockmap".into()),
            age_secs: 12.5,
            up_bytes: Some(123),
            down_bytes: Some(456_789),
            client_tcp: Some(crate::registry::TcpRow {
                state: "ESTABLISHED".into(),
                rtt_us: 1500,
            }),
            upstream_tcp: None,
        };
        let t = sessions_table(&[s]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        for want in [
            "7",
            "127.0.0.1:5000",
            "example.test:443",
            "alice",
            "relaying",
            "sockmap",
            "123",
            "456789",
            "12.50s",
            "ESTABLISHED",
            "1.5ms",
        ] {
            assert!(lines[1].contains(want), "{want} missing: {t}");
        }
    }
}
