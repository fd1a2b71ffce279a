//! Configuration: a private serde [`RawConfig`] mirrors the TOML file, and [`Config`] is the
//! validated form whose fields are already parsed (`SocketAddr`, `Duration`, CIDRs). Every error
//! names the key it is about.

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    acl::{AuthMethod, RawClientRule, RawSocksRule, Rules},
    auth::UserDb,
};

/// The configuration used when none is given: loopback only, no authentication, loopback
/// clients only. It is also the commented example printed in the README.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

/// How established TCP sessions carry payload (`data_path`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPathMode {
    /// splice(2) first; interactive and idle sessions move into the sockhash when the kernel
    /// supports it.
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
            other => Err(format!(
                "unknown data path {other:?} (expected auto, sockmap, splice or copy)"
            )),
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
    /// A relaying session without payload for this long is closed.
    pub idle: Duration,
    /// BIND: waiting for the target's connection.
    pub bind: Duration,
    /// UDP ASSOCIATE idle time.
    pub udp_idle: Duration,
    /// Grace period for relaying sessions at shutdown.
    pub drain: Duration,
}

/// Authentication settings.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// Methods offered, in order of preference.
    pub methods: Vec<AuthMethod>,
    /// The users file, when configured.
    pub users_file: Option<PathBuf>,
    /// The loaded users (hashes), when `users_file` is set.
    pub users: Option<Arc<UserDb>>,
}

impl PartialEq for AuthConfig {
    fn eq(&self, other: &Self) -> bool {
        self.methods == other.methods && self.users_file == other.users_file
    }
}

/// Source address selection for outgoing connections (Dante's `external`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outgoing {
    /// Source for IPv4 targets.
    pub ipv4: Option<Ipv4Addr>,
    /// Source for IPv6 targets.
    pub ipv6: Option<Ipv6Addr>,
    /// Interface to bind outgoing sockets to (SO_BINDTODEVICE).
    pub interface: Option<String>,
}

/// Resource limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Sessions at once (0 = from the open-file limit).
    pub max_sessions: usize,
    /// Sessions at once per client address (0 = unlimited).
    pub max_sessions_per_client: usize,
    /// Pacing rate in bytes per second per session and direction (0 = none).
    pub bandwidth: u64,
    /// Per-user pacing rates in bytes per second.
    pub user_bandwidth: BTreeMap<String, u64>,
}

/// Where the control socket goes (`control_socket`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ControlSocket {
    /// Derived from `pin_dir`: see [`default_control_socket`].
    #[default]
    Default,
    /// This path.
    Path(PathBuf),
    /// No control socket.
    Off,
}

/// The control socket path used when `control_socket` is not set: `/run/ebsocks/` followed by
/// the last component of `pin_dir` and `.sock`, so daemons with different pin directories do not
/// collide.
pub fn default_control_socket(pin_dir: &std::path::Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map_or_else(|| "ebsocks".into(), |n| n.to_string_lossy().into_owned());
    PathBuf::from("/run/ebsocks").join(format!("{name}.sock"))
}

/// The Prometheus endpoint (`[metrics]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Address of the HTTP listener; None: no endpoint.
    pub listen: Option<SocketAddr>,
    /// Whether a non-loopback `listen` is accepted.
    pub allow_remote: bool,
}

/// Who the daemon becomes once its privileged start-up is done (`user`, `group`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// A user name, or a numeric uid.
    pub user: String,
    /// A group name or numeric gid; None: the user's primary group.
    pub group: Option<String>,
}

/// How the XDP program is attached (`udp.xdp_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpMode {
    /// Native (driver) mode where the driver has it, generic otherwise.
    #[default]
    Auto,
    /// Native mode only; an interface without it is an error.
    Native,
    /// Generic (skb) mode, which every interface has.
    Generic,
}

impl XdpMode {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }
}

/// The UDP relay's fast path (`[udp]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UdpConfig {
    /// Interfaces the XDP program is attached to; empty: no XDP.
    pub xdp_interfaces: Vec<String>,
    /// Attachment mode.
    pub xdp_mode: XdpMode,
    /// Whether established flows to literal addresses are forwarded by XDP (otherwise XDP only
    /// counts and drops early).
    pub offload: bool,
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
#[derive(Clone, Debug)]
pub struct Config {
    /// Listening addresses (at least one).
    pub listen: Vec<SocketAddr>,
    /// Requested data path.
    pub data_path: DataPathMode,
    /// bpffs directory for pinned maps.
    pub pin_dir: PathBuf,
    /// The control socket setting; [`Config::control_socket_path`] resolves it.
    pub control_socket: ControlSocket,
    /// The user (and group) to switch to after start-up (`user`, `group`); None: stay.
    pub run_as: Option<RunAs>,
    /// Client networks allowed to connect (shorthand kept for `to_toml`).
    pub allow_clients: Vec<IpNet>,
    /// Authentication.
    pub auth: AuthConfig,
    /// Outgoing address selection.
    pub outgoing: Outgoing,
    /// Limits.
    pub limits: Limits,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Logging.
    pub log: LogConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// UDP fast path.
    pub udp: UdpConfig,
    /// Client and request rules.
    pub rules: Arc<Rules>,
    raw_rules: (Vec<RawClientRule>, Vec<RawSocksRule>),
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
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.to_string(),
    }
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Vec<String>>,
    data_path: Option<String>,
    pin_dir: Option<String>,
    control_socket: Option<String>,
    user: Option<String>,
    group: Option<String>,
    allow_clients: Option<Vec<String>>,
    auth: Option<RawAuth>,
    outgoing: Option<RawOutgoing>,
    limits: Option<RawLimits>,
    timeouts: Option<RawTimeouts>,
    log: Option<RawLog>,
    metrics: Option<RawMetrics>,
    udp: Option<RawUdp>,
    client_rule: Option<Vec<RawClientRule>>,
    socks_rule: Option<Vec<RawSocksRule>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    methods: Option<Vec<String>>,
    users_file: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawOutgoing {
    ipv4: Option<String>,
    ipv6: Option<String>,
    interface: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_sessions: Option<usize>,
    max_sessions_per_client: Option<usize>,
    bandwidth: Option<String>,
    user_bandwidth: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    negotiation: Option<String>,
    connect: Option<String>,
    idle: Option<String>,
    bind: Option<String>,
    udp_idle: Option<String>,
    drain: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
    allow_remote: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawUdp {
    xdp_interfaces: Option<Vec<String>>,
    xdp_mode: Option<String>,
    offload: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

/// Two listen addresses the daemon cannot bind both of: the index of the second and why. The
/// same address twice, or an address and the wildcard of its family at the same port
/// (`0.0.0.0`, `[::]`), would otherwise fail at start-up with "Address already in use", as if
/// another program held the port. An IPv4 address and `[::]` at the same port do not conflict:
/// the daemon then binds `[::]` to IPv6 alone ([`ipv6_only`]).
/// `name` names an entry by its index in messages (`listen[0]`).
pub fn listen_conflict(
    listen: &[SocketAddr],
    name: impl Fn(usize) -> String,
) -> Option<(usize, String)> {
    let canonical = |a: &SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    for (j, b) in listen.iter().enumerate() {
        for (i, a) in listen[..j].iter().enumerate() {
            let (ca, cb) = (canonical(a), canonical(b));
            if ca.port() != cb.port() || ca.port() == 0 || ca.is_ipv4() != cb.is_ipv4() {
                continue;
            }
            if ca.ip() == cb.ip() {
                return Some((j, format!("{b} is listed twice (also {})", name(i))));
            }
            if let Some(wild) = [a, b].into_iter().find(|x| x.ip().is_unspecified()) {
                let family = if ca.is_ipv4() { "IPv4" } else { "IPv6" };
                return Some((
                    j,
                    format!(
                        "{b} and {}, {a}, overlap: {wild} already listens on every {family} \
                         address at port {}; keep one of them",
                        name(i),
                        b.port()
                    ),
                ));
            }
        }
    }
    None
}

/// Whether the IPv6 listener at `addr` is bound to IPv6 alone (`IPV6_V6ONLY`): the wildcard
/// `[::]` serves IPv4 clients too unless `listen` also has an IPv4 address at its port, which
/// then serves them.
pub fn ipv6_only(addr: SocketAddr, listen: &[SocketAddr]) -> bool {
    addr.is_ipv6()
        && listen
            .iter()
            .any(|a| a.is_ipv4() && a.port() == addr.port() && addr.port() != 0)
}

/// Parses `"250ms"`, `"10s"`, `"5m"`, `"1h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const UNITS: &str = "ms, s, m or h";
    let (n, unit) = number_and_unit(s, "a duration like \"10s\" or \"250ms\"", UNITS)?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "" => return Err(format!("{s:?} has no unit (use {UNITS}, e.g. \"{n}s\")")),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use {UNITS})")),
    };
    Ok(d)
}

/// Splits `"250ms"` or `"250 ms"` into 250 and `"ms"`; `what` and `units` word the errors.
fn number_and_unit<'a>(s: &'a str, what: &str, units: &str) -> Result<(u64, &'a str), String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim_start();
    if num.is_empty() {
        return Err(format!("{s:?} is not {what}"));
    }
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "{s:?} is not a whole number: use a smaller unit ({units})"
        ));
    }
    let n = num.parse().map_err(|_| format!("{s:?} is too large"))?;
    Ok((n, unit))
}

/// Parses a rate such as `"100mbit"`, `"512kbit"`, `"1gbit"` or `"0"` into bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    const UNITS: &str = "bit, kbit, mbit or gbit (per second)";
    if s.trim() == "0" {
        return Ok(0);
    }
    let (n, unit) = number_and_unit(s, "a rate like \"100mbit\"", UNITS)?;
    let bits = match unit {
        "bit" => n,
        "kbit" => n.saturating_mul(1_000),
        "mbit" => n.saturating_mul(1_000_000),
        "gbit" => n.saturating_mul(1_000_000_000),
        "" => return Err(format!("{s:?} needs a unit: {UNITS}")),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use {UNITS})")),
    };
    Ok(bits / 8)
}

fn format_rate(bytes_per_sec: u64) -> String {
    if bytes_per_sec == 0 {
        "0".to_owned()
    } else {
        format!("{}bit", bytes_per_sec * 8)
    }
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
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// The embedded default configuration ([`DEFAULT_CONFIG`]).
    pub fn embedded_default() -> Self {
        // The embedded text is covered by a unit test, so this cannot fail at run time.
        Self::parse(DEFAULT_CONFIG).unwrap_or_else(|e| unreachable!("embedded default config: {e}"))
    }

    /// The control socket path in force, None when disabled.
    pub fn control_socket_path(&self) -> Option<PathBuf> {
        match &self.control_socket {
            ControlSocket::Default => Some(default_control_socket(&self.pin_dir)),
            ControlSocket::Path(p) => Some(p.clone()),
            ControlSocket::Off => None,
        }
    }

    /// Settings that are valid but almost certainly not what was meant, each naming its key:
    /// `check-config` prints them, the daemon logs them at start-up and at each reload.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let methods = &self.auth.methods;
        let offers_username = methods.contains(&AuthMethod::Username);
        let users = self.auth.users.as_deref();
        if let (Some(db), Some(path)) = (users, &self.auth.users_file) {
            if db.is_empty() {
                out.push(format!(
                    "`auth.users_file`: {} lists no user, so every login fails",
                    path.display()
                ));
            }
        }
        // A rule that can match SOCKS4 also matches a request's unauthenticated USERID, which
        // no users file lists and no method checks; per-user rates apply to those too.
        let named: Vec<_> = self.rules.named_users().collect();
        let socks4 = |yes: bool, user: &str| {
            if yes {
                format!(" (only SOCKS4 requests whose unauthenticated USERID is {user:?} do)")
            } else {
                String::new()
            }
        };
        let mut unreachable_rules = Vec::new();
        for (key, rule, user, v4) in &named {
            if !offers_username {
                if !unreachable_rules.contains(rule) {
                    unreachable_rules.push(rule);
                    let only = if *v4 {
                        "matches only SOCKS4 requests with such a USERID"
                    } else {
                        "never matches"
                    };
                    out.push(format!(
                        "`{key}`: rule {rule:?} names users, but auth.methods does not offer \
                         \"username\", so no client logs in as one and the rule {only}"
                    ));
                }
            } else if users.is_some_and(|db| !db.contains(user)) {
                out.push(format!(
                    "`{key}`: {user:?} (rule {rule:?}) is not in auth.users_file, so no login \
                     matches it{}",
                    socks4(*v4, user)
                ));
            }
        }
        let v4 = self.rules.passes_socks4();
        for user in self.limits.user_bandwidth.keys() {
            if !offers_username {
                out.push(format!(
                    "`limits.user_bandwidth.{user}`: auth.methods does not offer \"username\", \
                     so no client logs in as {user:?} and this rate applies to no login{}",
                    socks4(v4, user)
                ));
            } else if users.is_some_and(|db| !db.contains(user)) {
                out.push(format!(
                    "`limits.user_bandwidth.{user}`: {user:?} is not in auth.users_file, so this \
                     rate applies to no login{}",
                    socks4(v4, user)
                ));
            }
        }
        // The server picks the first of its methods that the client offers, so a client
        // offering both methods (curl with a user name in the proxy URL does) gets "none".
        let position = |m| methods.iter().position(|x| *x == m);
        let none_first = matches!(
            (position(AuthMethod::None), position(AuthMethod::Username)),
            (Some(n), Some(u)) if n < u
        );
        let both_allowed = self.rules.passing_client_methods().any(|r| {
            r.is_none_or(|r| r.contains(&AuthMethod::None) && r.contains(&AuthMethod::Username))
        });
        if none_first
            && both_allowed
            && (!named.is_empty() || !self.limits.user_bandwidth.is_empty())
        {
            out.push(
                "`auth.methods`: \"none\" comes before \"username\", so a client that offers \
                 both (curl with a user name in the proxy URL does) is never asked to log in, \
                 and the rules and rates that name users never apply to it; list \"username\" \
                 first"
                    .to_owned(),
            );
        }
        out
    }

    /// The effective configuration as TOML, every key present, followed by the rule list.
    pub fn to_toml(&self) -> String {
        let Self {
            listen,
            data_path,
            pin_dir,
            control_socket: _,
            run_as,
            allow_clients,
            auth,
            outgoing,
            limits,
            timeouts,
            log,
            metrics,
            udp,
            rules,
            raw_rules,
        } = self;
        let (client_rule, socks_rule) = raw_rules.clone();
        let raw = RawConfig {
            listen: Some(listen.iter().map(ToString::to_string).collect()),
            data_path: Some(format!("{data_path:?}").to_lowercase()),
            pin_dir: Some(pin_dir.display().to_string()),
            control_socket: Some(
                self.control_socket_path()
                    .map_or_else(|| "off".to_owned(), |p| p.display().to_string()),
            ),
            user: run_as.as_ref().map(|r| r.user.clone()),
            group: run_as.as_ref().and_then(|r| r.group.clone()),
            allow_clients: (client_rule.is_empty())
                .then(|| allow_clients.iter().map(ToString::to_string).collect()),
            auth: Some(RawAuth {
                methods: Some(auth.methods.iter().map(|m| m.as_str().to_owned()).collect()),
                users_file: auth.users_file.as_ref().map(|p| p.display().to_string()),
            }),
            outgoing: Some(RawOutgoing {
                ipv4: outgoing.ipv4.map(|a| a.to_string()),
                ipv6: outgoing.ipv6.map(|a| a.to_string()),
                interface: outgoing.interface.clone(),
            }),
            limits: Some(RawLimits {
                max_sessions: Some(limits.max_sessions),
                max_sessions_per_client: Some(limits.max_sessions_per_client),
                bandwidth: Some(format_rate(limits.bandwidth)),
                user_bandwidth: Some(
                    limits
                        .user_bandwidth
                        .iter()
                        .map(|(u, r)| (u.clone(), format_rate(*r)))
                        .collect(),
                ),
            }),
            timeouts: Some(RawTimeouts {
                negotiation: Some(format_duration(timeouts.negotiation)),
                connect: Some(format_duration(timeouts.connect)),
                idle: Some(format_duration(timeouts.idle)),
                bind: Some(format_duration(timeouts.bind)),
                udp_idle: Some(format_duration(timeouts.udp_idle)),
                drain: Some(format_duration(timeouts.drain)),
            }),
            log: Some(RawLog {
                level: Some(log.level.clone()),
                format: Some(format!("{:?}", log.format).to_lowercase()),
            }),
            metrics: Some(RawMetrics {
                listen: metrics.listen.map(|a| a.to_string()),
                allow_remote: Some(metrics.allow_remote),
            }),
            udp: Some(RawUdp {
                xdp_interfaces: Some(udp.xdp_interfaces.clone()),
                xdp_mode: Some(udp.xdp_mode.as_str().to_owned()),
                offload: Some(udp.offload),
            }),
            client_rule: (!client_rule.is_empty()).then_some(client_rule),
            socks_rule: (!socks_rule.is_empty()).then_some(socks_rule),
        };
        let mut out = toml::to_string(&raw)
            .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"));
        out.push_str(
            "\n# Effective rules, in evaluation order (first match wins, default block):\n",
        );
        for line in rules.describe().lines() {
            out.push_str("#   ");
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, Self::Error> {
        let RawConfig {
            listen,
            data_path,
            pin_dir,
            control_socket,
            user,
            group,
            allow_clients,
            auth,
            outgoing,
            limits,
            timeouts,
            log,
            metrics,
            udp,
            client_rule,
            socks_rule,
        } = raw;

        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        for (key, value) in [("user", &user), ("group", &group)] {
            if let Some(v) = value {
                if !name_ok(v) {
                    return Err(invalid(key, format!("{v:?} is not a user or group name")));
                }
            }
        }
        let run_as = match (user, group) {
            (Some(user), group) => Some(RunAs { user, group }),
            (None, Some(_)) => return Err(invalid("group", "needs `user` as well")),
            (None, None) => None,
        };

        let listen = match listen {
            None => vec![
                "127.0.0.1:1080".parse().expect("literal"),
                "[::1]:1080".parse().expect("literal"),
            ],
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (i, a) in list.iter().enumerate() {
                    let addr: SocketAddr = a.parse().map_err(|_| {
                        invalid(
                            format!("listen[{i}]"),
                            format!(
                                "{a:?} is not an address like \"127.0.0.1:1080\" or \"[::1]:1080\""
                            ),
                        )
                    })?;
                    out.push(addr);
                }
                out
            }
        };
        if listen.is_empty() {
            return Err(invalid("listen", "needs at least one address"));
        }
        if let Some((i, problem)) = listen_conflict(&listen, |i| format!("listen[{i}]")) {
            return Err(invalid(format!("listen[{i}]"), problem));
        }

        let data_path = match data_path {
            None => DataPathMode::Auto,
            Some(s) => s.parse().map_err(|p| invalid("data_path", p))?,
        };

        let pin_dir = PathBuf::from(pin_dir.unwrap_or_else(|| "/sys/fs/bpf/ebsocks".to_owned()));
        if !pin_dir.is_absolute() {
            return Err(invalid(
                "pin_dir",
                "must be an absolute path under a bpffs mount",
            ));
        }

        let control_socket = match control_socket.as_deref() {
            None => ControlSocket::Default,
            Some("off") => ControlSocket::Off,
            Some(p) if p.starts_with('/') => ControlSocket::Path(PathBuf::from(p)),
            Some(p) => {
                return Err(invalid(
                    "control_socket",
                    format!("{p:?} is not an absolute path or \"off\""),
                ))
            }
        };

        let RawMetrics {
            listen: metrics_listen,
            allow_remote,
        } = metrics.unwrap_or_default();
        let allow_remote = allow_remote.unwrap_or(false);
        let metrics_listen = match metrics_listen {
            None => None,
            Some(a) => {
                let addr: SocketAddr = a.parse().map_err(|_| {
                    invalid(
                        "metrics.listen",
                        format!("{a:?} is not an address like \"127.0.0.1:9108\""),
                    )
                })?;
                if !addr.ip().to_canonical().is_loopback() && !allow_remote {
                    return Err(invalid(
                        "metrics.listen",
                        format!("{addr} is not a loopback address; set metrics.allow_remote = true to expose the counters"),
                    ));
                }
                Some(addr)
            }
        };
        let metrics = MetricsConfig {
            listen: metrics_listen,
            allow_remote,
        };

        let allow_clients_given = allow_clients.is_some();
        let allow_clients = match allow_clients {
            None => vec![
                "127.0.0.0/8".parse().expect("literal"),
                "::1/128".parse().expect("literal"),
            ],
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (i, c) in list.iter().enumerate() {
                    out.push(parse_net(c).map_err(|p| invalid(format!("allow_clients[{i}]"), p))?);
                }
                out
            }
        };

        let RawTimeouts {
            negotiation,
            connect,
            idle,
            bind,
            udp_idle,
            drain,
        } = timeouts.unwrap_or_default();
        let timeouts = Timeouts {
            negotiation: duration("timeouts.negotiation", negotiation, Duration::from_secs(10))?,
            connect: duration("timeouts.connect", connect, Duration::from_secs(10))?,
            idle: duration("timeouts.idle", idle, Duration::from_secs(3600))?,
            bind: duration("timeouts.bind", bind, Duration::from_secs(120))?,
            udp_idle: duration("timeouts.udp_idle", udp_idle, Duration::from_secs(300))?,
            drain: duration("timeouts.drain", drain, Duration::from_secs(10))?,
        };

        let RawAuth {
            methods,
            users_file,
        } = auth.unwrap_or_default();
        let methods = match methods {
            None => vec![AuthMethod::None],
            Some(list) => {
                let mut out = Vec::new();
                for (i, m) in list.iter().enumerate() {
                    let m = AuthMethod::parse(m)
                        .map_err(|p| invalid(format!("auth.methods[{i}]"), p))?;
                    if !out.contains(&m) {
                        out.push(m);
                    }
                }
                out
            }
        };
        if methods.is_empty() {
            return Err(invalid("auth.methods", "needs at least one method"));
        }
        let users_file = users_file.map(PathBuf::from);
        let users = match &users_file {
            Some(path) => Some(Arc::new(
                UserDb::load(path).map_err(|e| invalid("auth.users_file", e))?,
            )),
            None => None,
        };
        if methods.contains(&AuthMethod::Username) && users.is_none() {
            return Err(invalid(
                "auth.users_file",
                "is required when auth.methods includes \"username\"",
            ));
        }
        let auth = AuthConfig {
            methods,
            users_file,
            users,
        };

        let RawOutgoing {
            ipv4,
            ipv6,
            interface,
        } = outgoing.unwrap_or_default();
        let outgoing = Outgoing {
            ipv4: ipv4
                .map(|a| {
                    a.parse().map_err(|_| {
                        invalid("outgoing.ipv4", format!("{a:?} is not an IPv4 address"))
                    })
                })
                .transpose()?,
            ipv6: ipv6
                .map(|a| {
                    a.parse().map_err(|_| {
                        invalid("outgoing.ipv6", format!("{a:?} is not an IPv6 address"))
                    })
                })
                .transpose()?,
            interface: match interface {
                Some(i) if i.is_empty() || i.len() >= 16 || i.contains('/') => {
                    return Err(invalid(
                        "outgoing.interface",
                        format!("{i:?} is not an interface name"),
                    ))
                }
                other => other,
            },
        };

        let RawLimits {
            max_sessions,
            max_sessions_per_client,
            bandwidth,
            user_bandwidth,
        } = limits.unwrap_or_default();
        let mut per_user = BTreeMap::new();
        for (user, rate) in user_bandwidth.unwrap_or_default() {
            let r = parse_rate(&rate)
                .map_err(|p| invalid(format!("limits.user_bandwidth.{user}"), p))?;
            per_user.insert(user, r);
        }
        let limits = Limits {
            max_sessions: max_sessions.unwrap_or(0),
            max_sessions_per_client: max_sessions_per_client.unwrap_or(0),
            bandwidth: parse_rate(bandwidth.as_deref().unwrap_or("0"))
                .map_err(|p| invalid("limits.bandwidth", p))?,
            user_bandwidth: per_user,
        };

        let RawUdp {
            xdp_interfaces,
            xdp_mode,
            offload,
        } = udp.unwrap_or_default();
        let xdp_interfaces = xdp_interfaces.unwrap_or_default();
        for (i, name) in xdp_interfaces.iter().enumerate() {
            if name.is_empty() || name.len() >= 16 || name.contains('/') || name.contains(' ') {
                return Err(invalid(
                    format!("udp.xdp_interfaces[{i}]"),
                    format!("{name:?} is not an interface name"),
                ));
            }
        }
        let udp = UdpConfig {
            xdp_interfaces,
            xdp_mode: match xdp_mode.as_deref() {
                None | Some("auto") => XdpMode::Auto,
                Some("native") => XdpMode::Native,
                Some("generic") => XdpMode::Generic,
                Some(other) => {
                    return Err(invalid(
                        "udp.xdp_mode",
                        format!("{other:?} is not \"auto\", \"native\" or \"generic\""),
                    ))
                }
            },
            offload: offload.unwrap_or(true),
        };

        let RawLog { level, format } = log.unwrap_or_default();
        let level = level.unwrap_or_else(|| "info".to_owned());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(invalid(
                "log.level",
                format!("{level:?} is not a log filter (try \"info\" or \"debug\")"),
            ));
        }
        let format = match format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log.format",
                    format!("{other:?} is not \"text\" or \"json\""),
                ))
            }
        };

        let client_rule = client_rule.unwrap_or_default();
        let socks_rule = socks_rule.unwrap_or_default();
        if !client_rule.is_empty() && allow_clients_given {
            return Err(invalid(
                "allow_clients",
                "cannot be combined with [[client_rule]]; add a pass rule instead",
            ));
        }
        let rules = if client_rule.is_empty() {
            let shorthand = RawClientRule {
                name: Some("allow_clients".to_owned()),
                action: Some("pass".to_owned()),
                from: Some(allow_clients.iter().map(ToString::to_string).collect()),
                ..Default::default()
            };
            Rules::from_raw(vec![shorthand], with_default_pass(&socks_rule))?
        } else {
            Rules::from_raw(client_rule.clone(), with_default_pass(&socks_rule))?
        };

        Ok(Self {
            listen,
            data_path,
            pin_dir,
            control_socket,
            run_as,
            allow_clients,
            auth,
            outgoing,
            limits,
            timeouts,
            log: LogConfig { level, format },
            metrics,
            udp,
            rules: Arc::new(rules),
            raw_rules: (client_rule, socks_rule),
        })
    }
}

/// Without any socks rule, every request from an admitted client passes.
fn with_default_pass(socks: &[RawSocksRule]) -> Vec<RawSocksRule> {
    if socks.is_empty() {
        vec![RawSocksRule {
            name: Some("pass-all".to_owned()),
            action: Some("pass".to_owned()),
            ..Default::default()
        }]
    } else {
        socks.to_vec()
    }
}

/// Parses a CIDR (`10.0.0.0/8`) or a bare address (a /32 or /128).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        if n.trunc() != n {
            return Err(format!(
                "{s:?} has host bits set (did you mean {}?)",
                n.trunc()
            ));
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
        let again = Config::parse(&c.to_toml()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
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
            ("control_socket = \"run/x.sock\"", "control_socket"),
            ("[metrics]\nlisten = \"9108\"", "metrics.listen"),
            ("[metrics]\nlisten = \"0.0.0.0:9108\"", "metrics.listen"),
            ("listen = []", "listen"),
            ("listen = [\"127.0.0.1:1\", \"127.0.0.1:1\"]", "listen[1]"),
            (
                "listen = [\"0.0.0.0:1\", \"127.0.0.1:2\", \"127.0.0.1:1\"]",
                "listen[2]",
            ),
            ("listen = [\"[::1]:1\", \"[::]:1\"]", "listen[1]"),
            ("user = \"\"", "user"),
            ("user = \"a b\"", "user"),
            ("group = \"nogroup\"", "group"),
            ("[udp]\nxdp_mode = \"fast\"", "udp.xdp_mode"),
            ("[udp]\nxdp_interfaces = [\"a/b\"]", "udp.xdp_interfaces[0]"),
        ];
        for (text, key) in cases {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{text:?}: {err}");
        }
    }

    #[test]
    fn listen_addresses_that_cannot_all_be_bound() {
        let addrs = |list: &[&str]| -> Vec<SocketAddr> {
            list.iter().map(|a| a.parse().unwrap()).collect()
        };
        let conflict = |list: &[&str]| listen_conflict(&addrs(list), |i| format!("listen[{i}]"));
        assert_eq!(
            conflict(&["127.0.0.1:1080", "[::1]:1080", "127.0.0.1:1080"]),
            Some((
                2,
                "127.0.0.1:1080 is listed twice (also listen[0])".to_owned()
            ))
        );
        assert_eq!(
            conflict(&["127.0.0.1:1080", "0.0.0.0:1080"]),
            Some((
                1,
                "0.0.0.0:1080 and listen[0], 127.0.0.1:1080, overlap: 0.0.0.0:1080 already \
                 listens on every IPv4 address at port 1080; keep one of them"
                    .to_owned()
            ))
        );
        // An IPv4-mapped address is the IPv4 one.
        assert!(conflict(&["[::ffff:127.0.0.1]:1080", "127.0.0.1:1080"]).is_some());
        // Different ports, families, or ports the kernel picks: all can be bound.
        for ok in [
            &["0.0.0.0:1080", "[::]:1080"][..],
            &["[::]:1080", "127.0.0.1:1080"],
            &["0.0.0.0:1080", "0.0.0.0:1081"],
            &["127.0.0.1:0", "127.0.0.1:0"],
        ] {
            assert_eq!(conflict(ok), None, "{ok:?}");
        }
        // `[::]` takes IPv6 alone only when an IPv4 address shares its port.
        let both = addrs(&["0.0.0.0:1080", "[::]:1080"]);
        assert!(ipv6_only(both[1], &both));
        let alone = addrs(&["[::]:1080", "127.0.0.1:1081"]);
        assert!(!ipv6_only(alone[0], &alone));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse("lisen = []").unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        let err = Config::parse("[timeouts]\nidel = \"1s\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("idel"), "{err}");
        let err = Config::parse("[[socks_rule]]\naction = \"pass\"\nport = [80]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn parity_sections() {
        let c = Config::parse(
            "[limits]\nbandwidth = \"8mbit\"\nuser_bandwidth = { alice = \"800kbit\" }\nmax_sessions_per_client = 3\n\
             [outgoing]\nipv4 = \"127.0.0.1\"\n\
             [[socks_rule]]\nname = \"web\"\naction = \"pass\"\nports = [80, \"443\"]\n",
        )
        .unwrap();
        assert_eq!(c.limits.bandwidth, 1_000_000);
        assert_eq!(c.limits.user_bandwidth["alice"], 100_000);
        assert_eq!(c.limits.max_sessions_per_client, 3);
        assert_eq!(c.outgoing.ipv4, Some(std::net::Ipv4Addr::LOCALHOST));
        assert!(c.to_toml().contains("web"));
        let again = Config::parse(&c.to_toml()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());

        let err = Config::parse("[auth]\nmethods = [\"username\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`auth.users_file`"), "{err}");
        let err = Config::parse("[auth]\nmethods = [\"gssapi\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`auth.methods[0]`"), "{err}");
        let err = Config::parse("[limits]\nbandwidth = \"10\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`limits.bandwidth`"), "{err}");
        let err =
            Config::parse("allow_clients = [\"10.0.0.0/8\"]\n[[client_rule]]\naction = \"pass\"")
                .unwrap_err()
                .to_string();
        assert!(err.contains("`allow_clients`"), "{err}");
    }

    #[test]
    fn control_socket_and_metrics() {
        let c = Config::parse("pin_dir = \"/sys/fs/bpf/ebsocks-a\"").unwrap();
        assert_eq!(
            c.control_socket_path(),
            Some(PathBuf::from("/run/ebsocks/ebsocks-a.sock"))
        );
        assert_eq!(c.metrics.listen, None);
        let c = Config::parse("control_socket = \"off\"").unwrap();
        assert_eq!(c.control_socket_path(), None);
        let c =
            Config::parse("control_socket = \"/tmp/c.sock\"\n[metrics]\nlisten = \"[::1]:9108\"")
                .unwrap();
        assert_eq!(c.control_socket_path(), Some(PathBuf::from("/tmp/c.sock")));
        assert_eq!(c.metrics.listen, Some("[::1]:9108".parse().unwrap()));
        let again = Config::parse(&c.to_toml()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
        let c = Config::parse("[metrics]\nlisten = \"0.0.0.0:9108\"\nallow_remote = true").unwrap();
        assert_eq!(c.metrics.listen, Some("0.0.0.0:9108".parse().unwrap()));
    }

    #[test]
    fn udp_fast_path() {
        let c = Config::embedded_default();
        assert!(c.udp.xdp_interfaces.is_empty());
        assert!(c.udp.offload);
        let c = Config::parse(
            "[udp]\nxdp_interfaces = [\"veth0\", \"eth1\"]\nxdp_mode = \"generic\"\noffload = false",
        )
        .unwrap();
        assert_eq!(c.udp.xdp_interfaces, ["veth0", "eth1"]);
        assert_eq!(c.udp.xdp_mode, XdpMode::Generic);
        assert!(!c.udp.offload);
        let again = Config::parse(&c.to_toml()).unwrap();
        assert_eq!(again.udp, c.udp);
    }

    #[test]
    fn run_as() {
        assert_eq!(Config::embedded_default().run_as, None);
        let c = Config::parse("user = \"nobody\"").unwrap();
        assert_eq!(
            c.run_as,
            Some(RunAs {
                user: "nobody".into(),
                group: None
            })
        );
        let c = Config::parse("user = \"ebsocks\"\ngroup = \"65534\"").unwrap();
        let again = Config::parse(&c.to_toml()).unwrap();
        assert_eq!(again.run_as, c.run_as);
    }

    /// The embedded default must never be an open proxy: it listens on loopback only, admits
    /// loopback clients only, and every client rule it has is about loopback networks.
    #[test]
    fn embedded_default_is_not_an_open_proxy() {
        let c = Config::embedded_default();
        assert!(!c.listen.is_empty());
        for a in &c.listen {
            assert!(a.ip().is_loopback(), "default listens on {a}");
        }
        for n in &c.allow_clients {
            assert!(n.addr().is_loopback(), "default admits {n}");
            assert!(n.network().is_loopback(), "default admits {n}");
        }
        for outside in ["192.0.2.1", "10.0.0.1", "2001:db8::1", "::ffff:192.0.2.1"] {
            let ip: std::net::IpAddr = outside.parse().unwrap();
            let (verdict, _) = c.rules.check_client(ip.to_canonical());
            assert_eq!(
                verdict.action,
                crate::acl::Action::Block,
                "default admits {outside}"
            );
        }
        assert_eq!(c.metrics.listen, None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration(" 5 m ").unwrap(), Duration::from_secs(300));
        let err = |s| parse_duration(s).unwrap_err();
        assert_eq!(
            err("5"),
            r#""5" has no unit (use ms, s, m or h, e.g. "5s")"#
        );
        assert_eq!(err("s"), r#""s" is not a duration like "10s" or "250ms""#);
        assert_eq!(
            err("-1s"),
            r#""-1s" is not a duration like "10s" or "250ms""#
        );
        assert_eq!(
            err("5min"),
            r#""5min": unknown unit "min" (use ms, s, m or h)"#
        );
        assert_eq!(
            err("1.5s"),
            r#""1.5s" is not a whole number: use a smaller unit (ms, s, m or h)"#
        );
        assert_eq!(
            err("99999999999999999999s"),
            r#""99999999999999999999s" is too large"#
        );
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert_eq!(parse_rate("100mbit").unwrap(), 12_500_000);
        assert_eq!(parse_rate("100 mbit").unwrap(), 12_500_000);
        let err = |s| parse_rate(s).unwrap_err();
        assert_eq!(
            err("100"),
            r#""100" needs a unit: bit, kbit, mbit or gbit (per second)"#
        );
        assert_eq!(
            err("10MB"),
            r#""10MB": unknown unit "MB" (use bit, kbit, mbit or gbit (per second))"#
        );
        assert_eq!(err("fast"), r#""fast" is not a rate like "100mbit""#);
    }

    /// A users file listing `users` (password "x"), removed on drop.
    struct UsersFile(PathBuf);

    impl UsersFile {
        fn new(users: &[&str]) -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "ebsocks-config-test-{}-{n}.users",
                std::process::id()
            ));
            let hash = crate::auth::hash_password("x");
            let text: String = users.iter().map(|u| format!("{u}:{hash}\n")).collect();
            std::fs::write(&path, text).unwrap();
            Self(path)
        }

        fn auth(&self, methods: &str) -> String {
            format!(
                "[auth]\nmethods = {methods}\nusers_file = {:?}\n",
                self.0.display().to_string()
            )
        }
    }

    impl Drop for UsersFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn warnings(text: &str) -> Vec<String> {
        Config::parse(text).unwrap().warnings()
    }

    #[test]
    fn warnings_name_what_can_never_apply() {
        assert_eq!(warnings(DEFAULT_CONFIG), Vec::<String>::new());
        let file = UsersFile::new(&["alice"]);
        let alice = "[[socks_rule]]\nname = \"a\"\naction = \"pass\"\nusers = [\"alice\"]\n";

        // Username first: a client with credentials logs in.
        let both = file.auth(r#"["username", "none"]"#);
        assert_eq!(warnings(&format!("{both}{alice}")), Vec::<String>::new());

        // "none" first, with a rule naming a user: that rule can never match a client that may
        // skip the login.
        let none_first = file.auth(r#"["none", "username"]"#);
        let w = warnings(&format!("{none_first}{alice}"));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("`auth.methods`: \"none\" comes before"),
            "{w:?}"
        );
        // ... or a per-user rate.
        let w = warnings(&format!(
            "{none_first}[limits]\nuser_bandwidth = {{ alice = \"1mbit\" }}\n"
        ));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("`auth.methods`"), "{w:?}");
        // Nothing names a user: the order does not matter.
        assert_eq!(warnings(&none_first), Vec::<String>::new());
        // Client rules that never allow both methods to the same client leave no such client.
        let split = "[[client_rule]]\naction = \"pass\"\nfrom = [\"10.0.0.0/8\"]\nmethods = [\"username\"]\n\
                     [[client_rule]]\naction = \"pass\"\nmethods = [\"none\"]\n";
        assert_eq!(
            warnings(&format!("{none_first}{split}{alice}")),
            Vec::<String>::new()
        );
        // A blocking client rule allowing both does not count.
        let blocked = "[[client_rule]]\naction = \"block\"\nfrom = [\"10.0.0.0/8\"]\n\
                       [[client_rule]]\naction = \"pass\"\nmethods = [\"username\"]\n";
        assert_eq!(
            warnings(&format!("{none_first}{blocked}{alice}")),
            Vec::<String>::new()
        );

        // Users the file does not list: in a SOCKS5 rule no request matches them; where
        // SOCKS4 passes, only a SOCKS4 USERID can.
        let w = warnings(&format!(
            "{both}[limits]\nuser_bandwidth = {{ bob = \"1mbit\" }}\n\
             [[socks_rule]]\nname = \"typo\"\naction = \"pass\"\nusers = [\"alice\", \"alcie\"]\nversions = [5]\n"
        ));
        assert_eq!(
            w,
            [
                r#"`socks_rule[0].users`: "alcie" (rule "typo") is not in auth.users_file, so no login matches it"#,
                r#"`limits.user_bandwidth.bob`: "bob" is not in auth.users_file, so this rate applies to no login"#,
            ],
        );
        let w = warnings(&format!(
            "{both}[[socks_rule]]\nname = \"typo\"\naction = \"pass\"\nusers = [\"alcie\"]\n"
        ));
        assert_eq!(
            w,
            [
                r#"`socks_rule[0].users`: "alcie" (rule "typo") is not in auth.users_file, so no login matches it (only SOCKS4 requests whose unauthenticated USERID is "alcie" do)"#
            ],
        );

        // Users named where nobody can log in.
        let w = warnings(
            "[auth]\nmethods = [\"none\"]\n[limits]\nuser_bandwidth = { alice = \"1mbit\" }\n\
             [[socks_rule]]\nname = \"a\"\naction = \"pass\"\nusers = [\"alice\", \"bob\"]\nversions = [5]\n",
        );
        assert_eq!(
            w,
            [
                "`socks_rule[0].users`: rule \"a\" names users, but auth.methods does not offer \
                 \"username\", so no client logs in as one and the rule never matches",
                "`limits.user_bandwidth.alice`: auth.methods does not offer \"username\", so no \
                 client logs in as \"alice\" and this rate applies to no login",
            ],
        );
        let w = warnings(
            "[auth]\nmethods = [\"none\"]\n\
             [[socks_rule]]\nname = \"legacy\"\naction = \"pass\"\nusers = [\"app\"]\n",
        );
        assert_eq!(
            w,
            ["`socks_rule[0].users`: rule \"legacy\" names users, but auth.methods does not offer \
              \"username\", so no client logs in as one and the rule matches only SOCKS4 requests \
              with such a USERID"],
        );

        // An empty users file.
        let empty = UsersFile::new(&[]);
        let w = warnings(&empty.auth(r#"["username"]"#));
        assert_eq!(
            w,
            [format!(
                "`auth.users_file`: {} lists no user, so every login fails",
                empty.0.display()
            )]
        );
    }
}
