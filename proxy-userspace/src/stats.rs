//! `ebsocks stats`: reads a running daemon's pinned BPF maps from another process.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use proxy_common::metrics::{
    Counter, SessionTraffic, Traffic, TrafficSlot, DAEMON_COUNTERS, DAEMON_TRAFFIC, KERNEL_TRAFFIC,
    SESSIONS, TRAFFIC_SLOTS,
};
use serde::Serialize;

/// Why the counters could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {map} under {dir}: {source} (is the daemon running with this pin_dir?)")]
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

/// Everything `ebsocks stats` shows.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// Per protocol, path and direction.
    pub traffic: Vec<TrafficRow>,
    /// Daemon counters by name.
    pub counters: BTreeMap<&'static str, u64>,
    /// Live spliced sessions.
    pub sessions: Vec<SessionRow>,
}

fn open(dir: &Path, name: &'static str) -> Result<MapData, StatsError> {
    MapData::from_pin(dir.join(name)).map_err(|source| StatsError { map: name, dir: dir.display().to_string(), source })
}

impl Snapshot {
    /// Reads the maps pinned under `dir`.
    pub fn read(dir: &Path) -> Result<Self, StatsError> {
        let err = |map: &'static str| {
            let dir = dir.display().to_string();
            move |source| StatsError { map, dir, source }
        };
        let ktraffic: PerCpuArray<_, Traffic> =
            PerCpuArray::try_from(Map::PerCpuArray(open(dir, KERNEL_TRAFFIC)?)).map_err(err(KERNEL_TRAFFIC))?;
        let utraffic: Array<_, Traffic> = Array::try_from(Map::Array(open(dir, DAEMON_TRAFFIC)?)).map_err(err(DAEMON_TRAFFIC))?;
        let counters: Array<_, u64> = Array::try_from(Map::Array(open(dir, DAEMON_COUNTERS)?)).map_err(err(DAEMON_COUNTERS))?;
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
            let (proto, path, dir) = TrafficSlot(i).names();
            traffic.push(TrafficRow { proto, path, dir, bytes: t.bytes, packets: t.packets });
        }

        let counters = Counter::ALL
            .iter()
            .map(|&c| (c.name(), counters.get(&(c as u32), 0).unwrap_or(0)))
            .collect();

        let mut by_id: BTreeMap<u64, SessionRow> = BTreeMap::new();
        for entry in sessions.iter().flatten() {
            let (_cookie, st) = entry;
            let row = by_id.entry(st.session_id).or_insert_with(|| SessionRow { id: st.session_id, path: "sockmap", ..Default::default() });
            if st.direction == 0 {
                row.up_bytes += st.bytes;
                row.up_packets += st.packets;
            } else {
                row.down_bytes += st.bytes;
                row.down_packets += st.packets;
            }
        }
        Ok(Self { traffic, counters, sessions: by_id.into_values().collect() })
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// A human-readable table.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{:<6} {:<8} {:<5} {:>16} {:>12}", "PROTO", "PATH", "DIR", "BYTES", "PACKETS");
        for r in &self.traffic {
            let _ = writeln!(out, "{:<6} {:<8} {:<5} {:>16} {:>12}", r.proto, r.path, r.dir, r.bytes, r.packets);
        }
        out.push('\n');
        for (k, v) in &self.counters {
            let _ = writeln!(out, "{k:<28} {v:>12}");
        }
        if !self.sessions.is_empty() {
            let _ = writeln!(out, "\n{:<10} {:<8} {:>16} {:>16}", "SESSION", "PATH", "UP BYTES", "DOWN BYTES");
            for s in &self.sessions {
                let _ = writeln!(out, "{:<10} {:<8} {:>16} {:>16}", s.id, s.path, s.up_bytes, s.down_bytes);
            }
        }
        out
    }
}
