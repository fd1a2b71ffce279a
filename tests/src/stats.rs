//! Typed access to `ebsocks stats --json` (schema in docs/CONTRACT.md).

use serde_json::Value;

/// One parsed `stats --json` document.
#[derive(Clone, Debug)]
pub struct Stats {
    pub json: Value,
}

/// One entry of `sessions` (a live sockmap session and its kernel counters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRow {
    pub id: u64,
    pub path: String,
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub up_packets: u64,
    pub down_packets: u64,
}

fn u64_field(v: &Value, key: &str, doc: &Value) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or_else(|| {
        panic!("stats: `{key}` missing or not an unsigned integer in {v}; document: {doc}")
    })
}

impl Stats {
    /// `bytes` of the `traffic` row (proto, path, dir); the contract says every
    /// row exists, so a missing one fails the test.
    pub fn traffic(&self, proto: &str, path: &str, dir: &str) -> u64 {
        self.traffic_row(proto, path, dir, "bytes")
    }

    /// `packets` of the `traffic` row (proto, path, dir).
    pub fn traffic_packets(&self, proto: &str, path: &str, dir: &str) -> u64 {
        self.traffic_row(proto, path, dir, "packets")
    }

    fn traffic_row(&self, proto: &str, path: &str, dir: &str, field: &str) -> u64 {
        let rows = self
            .json
            .get("traffic")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("stats: no `traffic` array in {}", self.json));
        let row = rows
            .iter()
            .find(|r| {
                r.get("proto").and_then(Value::as_str) == Some(proto)
                    && r.get("path").and_then(Value::as_str) == Some(path)
                    && r.get("dir").and_then(Value::as_str) == Some(dir)
            })
            .unwrap_or_else(|| {
                panic!(
                    "stats: no traffic row {proto}/{path}/{dir} in {}",
                    self.json
                )
            });
        u64_field(row, field, &self.json)
    }

    /// A value of `counters`.
    pub fn counter(&self, name: &str) -> u64 {
        let c = self
            .json
            .get("counters")
            .unwrap_or_else(|| panic!("stats: no `counters` in {}", self.json));
        u64_field(c, name, &self.json)
    }

    /// Sum of `sessions_active_{sockmap,splice,copy}`.
    pub fn active_sessions(&self) -> u64 {
        ["sockmap", "splice", "copy"]
            .iter()
            .map(|p| self.counter(&format!("sessions_active_{p}")))
            .sum()
    }

    /// The `sessions` array.
    pub fn sessions(&self) -> Vec<SessionRow> {
        let rows = self
            .json
            .get("sessions")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("stats: no `sessions` array in {}", self.json));
        rows.iter()
            .map(|r| SessionRow {
                id: u64_field(r, "id", &self.json),
                path: r
                    .get("path")
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("stats: session without `path`: {r}"))
                    .to_owned(),
                up_bytes: u64_field(r, "up_bytes", &self.json),
                down_bytes: u64_field(r, "down_bytes", &self.json),
                up_packets: u64_field(r, "up_packets", &self.json),
                down_packets: u64_field(r, "down_packets", &self.json),
            })
            .collect()
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.json)
    }
}
