//! Configuration: a private serde [`RawConfig`] mirrors the TOML file, and [`Config`] is the
//! validated form whose fields are already parsed (`SocketAddr`, `Duration`, CIDRs). Every error
//! names the key it is about.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The configuration used when none is given: loopback only, no authentication, loopback
/// clients only. It is also the commented example printed in the README.
pub const DEFAULT_CONFIG: &str = r#"# ebsocks configuration (TOML). Unknown keys are errors.

# Addresses the SOCKS server listens on.
listen = ["127.0.0.1:1080", "[::1]:1080"]

# How established TCP sessions carry payload:
#   "auto"    - the in-kernel sockhash splice when the kernel supports it, else splice(2)
#   "sockmap" - eBPF sockhash + sk_skb verdict: payload never leaves the kernel
#   "splice"  - splice(2) through a pipe, driven by the daemon
#   "copy"    - plain userspace copy
data_path = "auto"

# bpffs directory where the counters are pinned for `ebsocks stats`.
pin_dir = "/sys/fs/bpf/ebsocks"

# Client addresses allowed to connect (CIDR). Anything else is closed at accept time.
allow_clients = ["127.0.0.0/8", "::1/128"]

[timeouts]
# A client must finish the SOCKS negotiation within this time.
negotiation = "10s"
# Connecting to the target (all of its addresses together).
connect = "10s"
# On SIGTERM/SIGINT, relaying sessions get this long to finish.
drain = "10s"

[log]
level = "info"      # error | warn | info | debug | trace (RUST_LOG overrides)
format = "text"     # text | json
"#;

/// How established TCP sessions carry payload (`data_path`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPathMode {
    /// sockmap when the kernel supports it, else splice.
    Auto,
    /// In-kernel sockhash redirect.
    Sockmap,
    /// splice(2) through a pipe.
    Splice,
    /// Userspace copy.
    Copy,
}

impl FromStr for DataPathMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "sockmap" => Ok(Self::Sockmap),
            "splice" => Ok(Self::Splice),
            "copy" => Ok(Self::Copy),
            other => Err(format!("unknown data path {other:?} (expected auto, sockmap, splice or copy)")),
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Timeouts, all non-zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Greeting, authentication and request must arrive within this.
    pub negotiation: Duration,
    /// Connecting to the target.
    pub connect: Duration,
    /// Grace period for relaying sessions at shutdown.
    pub drain: Duration,
}

/// Logging settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// tracing filter directive, e.g. `info` or `ebsocks=debug`.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Listening addresses (at least one).
    pub listen: Vec<SocketAddr>,
    /// Requested data path.
    pub data_path: DataPathMode,
    /// bpffs directory for pinned maps.
    pub pin_dir: PathBuf,
    /// Client networks allowed to connect.
    pub allow_clients: Vec<IpNet>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Logging.
    pub log: LogConfig,
}

/// A configuration error. `Display` names the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, type or unknown-key error (the message carries the key and line).
    #[error("{0}")]
    Syntax(#[from] toml::de::Error),
    /// A value that parsed but is not acceptable.
    #[error("invalid value for `{key}`: {problem}")]
    Invalid {
        /// Dotted key, e.g. `timeouts.connect`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.to_string() }
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Vec<String>>,
    data_path: Option<String>,
    pin_dir: Option<String>,
    allow_clients: Option<Vec<String>>,
    timeouts: Option<RawTimeouts>,
    log: Option<RawLog>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    negotiation: Option<String>,
    connect: Option<String>,
    drain: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

/// Parses `"250ms"`, `"10s"`, `"5m"`, `"1h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like \"10s\" or \"250ms\""))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?} has no unit (use ms, s, m or h)")),
    };
    Ok(d)
}

fn format_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

fn duration(key: &str, raw: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    let d = parse_duration(&raw).map_err(|p| invalid(key, p))?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

impl Config {
    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text)?;
        Self::try_from(raw)
    }

    /// Reads and validates a file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text)
    }

    /// The embedded default configuration ([`DEFAULT_CONFIG`]).
    pub fn embedded_default() -> Self {
        // The embedded text is covered by a unit test, so this cannot fail at run time.
        Self::parse(DEFAULT_CONFIG).unwrap_or_else(|e| unreachable!("embedded default config: {e}"))
    }

    /// The effective configuration as TOML, every key present.
    pub fn to_toml(&self) -> String {
        let Self { listen, data_path, pin_dir, allow_clients, timeouts, log } = self;
        let raw = RawConfig {
            listen: Some(listen.iter().map(ToString::to_string).collect()),
            data_path: Some(format!("{data_path:?}").to_lowercase()),
            pin_dir: Some(pin_dir.display().to_string()),
            allow_clients: Some(allow_clients.iter().map(ToString::to_string).collect()),
            timeouts: Some(RawTimeouts {
                negotiation: Some(format_duration(timeouts.negotiation)),
                connect: Some(format_duration(timeouts.connect)),
                drain: Some(format_duration(timeouts.drain)),
            }),
            log: Some(RawLog {
                level: Some(log.level.clone()),
                format: Some(format!("{:?}", log.format).to_lowercase()),
            }),
        };
        toml::to_string(&raw).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, Self::Error> {
        let RawConfig { listen, data_path, pin_dir, allow_clients, timeouts, log } = raw;

        let listen = match listen {
            None => vec!["127.0.0.1:1080".parse().expect("literal"), "[::1]:1080".parse().expect("literal")],
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (i, a) in list.iter().enumerate() {
                    let addr: SocketAddr = a.parse().map_err(|_| {
                        invalid(format!("listen[{i}]"), format!("{a:?} is not an address like \"127.0.0.1:1080\" or \"[::1]:1080\""))
                    })?;
                    out.push(addr);
                }
                out
            }
        };
        if listen.is_empty() {
            return Err(invalid("listen", "needs at least one address"));
        }

        let data_path = match data_path {
            None => DataPathMode::Auto,
            Some(s) => s.parse().map_err(|p| invalid("data_path", p))?,
        };

        let pin_dir = PathBuf::from(pin_dir.unwrap_or_else(|| "/sys/fs/bpf/ebsocks".to_owned()));
        if !pin_dir.is_absolute() {
            return Err(invalid("pin_dir", "must be an absolute path under a bpffs mount"));
        }

        let allow_clients = match allow_clients {
            None => vec!["127.0.0.0/8".parse().expect("literal"), "::1/128".parse().expect("literal")],
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (i, c) in list.iter().enumerate() {
                    out.push(parse_net(c).map_err(|p| invalid(format!("allow_clients[{i}]"), p))?);
                }
                out
            }
        };

        let RawTimeouts { negotiation, connect, drain } = timeouts.unwrap_or_default();
        let timeouts = Timeouts {
            negotiation: duration("timeouts.negotiation", negotiation, Duration::from_secs(10))?,
            connect: duration("timeouts.connect", connect, Duration::from_secs(10))?,
            drain: duration("timeouts.drain", drain, Duration::from_secs(10))?,
        };

        let RawLog { level, format } = log.unwrap_or_default();
        let level = level.unwrap_or_else(|| "info".to_owned());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(invalid("log.level", format!("{level:?} is not a log filter (try \"info\" or \"debug\")")));
        }
        let format = match format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(invalid("log.format", format!("{other:?} is not \"text\" or \"json\""))),
        };

        Ok(Self { listen, data_path, pin_dir, allow_clients, timeouts, log: LogConfig { level, format } })
    }
}

/// Parses a CIDR (`10.0.0.0/8`) or a bare address (a /32 or /128).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        if n.trunc() != n {
            return Err(format!("{s:?} has host bits set (did you mean {}?)", n.trunc()));
        }
        return Ok(n);
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not a CIDR like \"10.0.0.0/8\" or an address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_loopback_only() {
        let c = Config::parse(DEFAULT_CONFIG).unwrap();
        assert!(c.listen.iter().all(|a| a.ip().is_loopback()));
        assert_eq!(c.data_path, DataPathMode::Auto);
        assert!(c.allow_clients.iter().all(|n| n.addr().is_loopback()));
        // Round trip through the effective TOML.
        assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("listen = [\"nope\"]", "listen[0]"),
            ("data_path = \"fast\"", "data_path"),
            ("[timeouts]\nconnect = \"10\"", "timeouts.connect"),
            ("[timeouts]\nnegotiation = \"0s\"", "timeouts.negotiation"),
            ("allow_clients = [\"10.0.0.1/8\"]", "allow_clients[0]"),
            ("pin_dir = \"relative\"", "pin_dir"),
            ("[log]\nformat = \"xml\"", "log.format"),
            ("listen = []", "listen"),
        ];
        for (text, key) in cases {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{text:?}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse("lisen = []").unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        let err = Config::parse("[timeouts]\nidle = \"1s\"").unwrap_err().to_string();
        assert!(err.contains("idle"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }
}
