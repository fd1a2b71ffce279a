//! Access rules in Dante's two stages, as pure decisions: no DNS, no I/O, no clock.
//!
//! Stage 1, `[[client_rule]]`, runs when a connection is accepted and sees only the client
//! address; it also says which SOCKS authentication methods that client may use. Stage 2,
//! `[[socks_rule]]`, runs on every request and sees the client, the user, the command, the
//! SOCKS version and the destination. In both stages the first matching rule decides and no
//! match means block.
//!
//! A destination given as a name is checked in two steps so that an address rule cannot be
//! bypassed by a name that resolves into a blocked network, and a name rule still works when
//! the name is resolved:
//!
//! 1. [`Rules::check_name`] before resolving. It walks the rules in order and answers only when
//!    the answer cannot depend on the addresses: at the first rule matched by name (or with no
//!    `to`), or at the default when no rule could match. It returns `None` as soon as it meets a
//!    rule that could match some resolved address (one with CIDRs in `to`).
//! 2. On `None` (and, harmlessly, on a pass), the daemon resolves the name and calls
//!    [`Rules::check_request`] with [`Dest::Resolved`] for each address, keeping only those that
//!    pass. A resolved destination matches a rule by its name *or* by its address, so the
//!    outcome per address is exactly Dante's first match.
//!
//! With `block 10.0.0.0/8` before `pass` (no `to`), a name resolving to 10.1.2.3 is blocked
//! for that address. With `pass .example.com` before a catch-all `block`, `www.example.com`
//! passes for all its addresses.

use std::{
    collections::HashSet,
    fmt::{self, Write as _},
    net::IpAddr,
};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use crate::config::{parse_net, ConfigError};

/// What a rule does with what it matches (config values `pass` and `block`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let the client in, or carry out the request.
    Pass,
    /// Close the connection, or refuse the request.
    Block,
}

impl Action {
    /// The config spelling, for logs and `check-config`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Block => "block",
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "pass" => Ok(Self::Pass),
            "block" => Ok(Self::Block),
            other => Err(format!(
                "{other:?} is not an action (expected \"pass\" or \"block\")"
            )),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The SOCKS command of a request (config values `connect`, `bind`, `udpassociate`), so rules
/// can allow e.g. CONNECT but not BIND.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// CONNECT (SOCKS4 and 5).
    Connect,
    /// BIND (SOCKS4 and 5).
    Bind,
    /// UDP ASSOCIATE (SOCKS5 only).
    UdpAssociate,
}

impl Command {
    /// The config spelling, for logs and `check-config`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Bind => "bind",
            Self::UdpAssociate => "udpassociate",
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "connect" => Ok(Self::Connect),
            "bind" => Ok(Self::Bind),
            "udpassociate" => Ok(Self::UdpAssociate),
            other => Err(format!(
                "{other:?} is not a command (expected \"connect\", \"bind\" or \"udpassociate\")"
            )),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<proxy_socks5::Command> for Command {
    fn from(c: proxy_socks5::Command) -> Self {
        match c {
            proxy_socks5::Command::Connect => Self::Connect,
            proxy_socks5::Command::Bind => Self::Bind,
            proxy_socks5::Command::UdpAssociate => Self::UdpAssociate,
        }
    }
}

impl From<proxy_socks5::Socks4Command> for Command {
    fn from(c: proxy_socks5::Socks4Command) -> Self {
        match c {
            proxy_socks5::Socks4Command::Connect => Self::Connect,
            proxy_socks5::Socks4Command::Bind => Self::Bind,
        }
    }
}

/// A SOCKS5 authentication method a client rule may allow (config values `none`, `username`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// No authentication (`X'00'`).
    None,
    /// RFC 1929 username/password (`X'02'`).
    Username,
}

impl AuthMethod {
    /// The config spelling, for logs and `check-config`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Username => "username",
        }
    }

    /// Parses the config spelling (`none`, `username`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "username" => Ok(Self::Username),
            other => Err(format!(
                "{other:?} is not a supported method (expected \"none\" or \"username\")"
            )),
        }
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<AuthMethod> for proxy_socks5::Method {
    fn from(m: AuthMethod) -> Self {
        match m {
            AuthMethod::None => Self::NoAuth,
            AuthMethod::Username => Self::UserPass,
        }
    }
}

/// Where a request wants to go, as far as the daemon knows when it asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest<'a> {
    /// A literal address and port from the request.
    Ip(IpAddr, u16),
    /// A name from the request, not resolved yet, and the port. Give it to
    /// [`Rules::check_name`]; a name that is really a literal address should be turned into
    /// [`Dest::Ip`] first.
    Name(&'a str, u16),
    /// One address the requested name resolved to: the name, the address, the port. Matches a
    /// rule by name or by address.
    Resolved(&'a str, IpAddr, u16),
}

impl Dest<'_> {
    fn port(&self) -> u16 {
        match *self {
            Self::Ip(_, p) | Self::Name(_, p) | Self::Resolved(_, _, p) => p,
        }
    }
}

impl<'a> From<&'a proxy_socks5::Address> for Dest<'a> {
    fn from(a: &'a proxy_socks5::Address) -> Self {
        match a {
            proxy_socks5::Address::Ip(sa) => Self::Ip(sa.ip(), sa.port()),
            proxy_socks5::Address::Domain(name, port) => match name.parse::<IpAddr>() {
                Ok(ip) => Self::Ip(ip, *port),
                Err(_) => Self::Name(name, *port),
            },
        }
    }
}

/// Everything a socks rule looks at, gathered by the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestInfo<'a> {
    /// The client's address (IPv4-mapped IPv6 is treated as IPv4).
    pub client: IpAddr,
    /// The RFC 1929 username, if the client authenticated with one.
    pub user: Option<&'a str>,
    /// The SOCKS command.
    pub command: Command,
    /// The SOCKS version, 4 or 5.
    pub version: u8,
    /// The destination.
    pub dest: Dest<'a>,
}

/// A decision and where it came from, so the session can act on it and log which rule fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict<'r> {
    /// What to do.
    pub action: Action,
    /// The rule's name, or `"default"` when no rule matched.
    pub rule: &'r str,
    /// Whether the rule asks for its decisions to be logged.
    pub log: bool,
}

impl Verdict<'_> {
    /// Whether the verdict lets the connection or request through.
    pub fn is_pass(&self) -> bool {
        self.action == Action::Pass
    }
}

/// The verdict when no rule matches: block, unlogged.
const DEFAULT: Verdict<'static> = Verdict {
    action: Action::Block,
    rule: "default",
    log: false,
};

/// One `[[client_rule]]` table as written in the config file; [`Rules::from_raw`] validates it.
/// Public so that the config module can embed it in its own raw type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientRule {
    /// Name for logs; default `client_rule[N]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `pass` or `block` (required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Client CIDRs or addresses; absent = any client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<String>>,
    /// Allowed methods (`none`, `username`); absent = no restriction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Log every decision of this rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<bool>,
}

/// One `[[socks_rule]]` table as written in the config file; [`Rules::from_raw`] validates it.
/// Public so that the config module can embed it in its own raw type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSocksRule {
    /// Name for logs; default `socks_rule[N]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `pass` or `block` (required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Client CIDRs or addresses; absent = any client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<String>>,
    /// Destination CIDRs or addresses, exact names, or `.suffix` names; absent = anywhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<String>>,
    /// Destination ports: `"80"`, `80` or an inclusive `"1-1023"`; absent = any port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<RawPort>>,
    /// `connect`, `bind`, `udpassociate`; absent = any command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commands: Option<Vec<String>>,
    /// Authenticated usernames; absent = anyone, including unauthenticated clients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
    /// SOCKS versions, 4 and/or 5; absent = both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<i64>>,
    /// Log every decision of this rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<bool>,
}

/// A `ports` entry: TOML lets users write `443` as well as `"443"` or `"1-1023"`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawPort {
    /// A bare port number.
    Number(i64),
    /// `"443"` or an inclusive range `"1-1023"`.
    Text(String),
}

/// The validated rule set, consulted by every session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    client: Vec<ClientRule>,
    socks: Vec<SocksRule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ClientRule {
    name: String,
    action: Action,
    from: Option<Vec<IpNet>>,
    methods: Option<Vec<AuthMethod>>,
    log: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct SocksRule {
    name: String,
    action: Action,
    from: Option<Vec<IpNet>>,
    to: Option<Vec<Target>>,
    ports: Option<Vec<PortRange>>,
    commands: Option<Vec<Command>>,
    users: Option<Vec<String>>,
    versions: Option<Vec<u8>>,
    log: bool,
}

/// A `to` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// A network (a bare address is a /32 or /128).
    Net(IpNet),
    /// An exact host name: lower case, no trailing dot.
    Name(String),
    /// A domain and all its subdomains (written `.example.com`): lower case, no dots around.
    Suffix(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PortRange {
    lo: u16,
    hi: u16,
}

impl Target {
    fn matches_name(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).as_bytes();
        match self {
            Self::Net(_) => false,
            Self::Name(n) => name.eq_ignore_ascii_case(n.as_bytes()),
            Self::Suffix(s) => {
                let s = s.as_bytes();
                name.eq_ignore_ascii_case(s)
                    || (name.len() > s.len()
                        && name[name.len() - s.len() - 1] == b'.'
                        && name[name.len() - s.len()..].eq_ignore_ascii_case(s))
            }
        }
    }

    fn matches_ip(&self, ip: IpAddr) -> bool {
        match self {
            Self::Net(n) => n.contains(&ip.to_canonical()),
            Self::Name(_) | Self::Suffix(_) => false,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Net(n) => write!(f, "{n}"),
            Self::Name(n) => f.write_str(n),
            Self::Suffix(s) => write!(f, ".{s}"),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

fn nets_match(nets: Option<&[IpNet]>, ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.is_none_or(|nets| nets.iter().any(|n| n.contains(&ip)))
}

impl ClientRule {
    fn verdict(&self) -> Verdict<'_> {
        Verdict {
            action: self.action,
            rule: &self.name,
            log: self.log,
        }
    }
}

impl SocksRule {
    /// Whether the rule can match SOCKS4 requests.
    fn matches_socks4(&self) -> bool {
        self.versions.as_ref().is_none_or(|v| v.contains(&4))
    }

    fn verdict(&self) -> Verdict<'_> {
        Verdict {
            action: self.action,
            rule: &self.name,
            log: self.log,
        }
    }

    /// Everything but the destination address or name.
    fn matches_rest(&self, req: &RequestInfo<'_>) -> bool {
        let Self {
            name: _,
            action: _,
            from,
            to: _,
            ports,
            commands,
            users,
            versions,
            log: _,
        } = self;
        let port = req.dest.port();
        nets_match(from.as_deref(), req.client)
            && ports
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|p| (p.lo..=p.hi).contains(&port)))
            && commands.as_ref().is_none_or(|cs| cs.contains(&req.command))
            && users
                .as_ref()
                .is_none_or(|us| req.user.is_some_and(|u| us.iter().any(|x| x == u)))
            && versions.as_ref().is_none_or(|vs| vs.contains(&req.version))
    }

    fn matches_dest(&self, dest: &Dest<'_>) -> bool {
        let Some(to) = &self.to else { return true };
        match *dest {
            Dest::Ip(ip, _) => to.iter().any(|t| t.matches_ip(ip)),
            Dest::Name(name, _) => to.iter().any(|t| t.matches_name(name)),
            Dest::Resolved(name, ip, _) => {
                to.iter().any(|t| t.matches_ip(ip) || t.matches_name(name))
            }
        }
    }
}

impl Rules {
    /// Validates the `[[client_rule]]` and `[[socks_rule]]` arrays. Errors name the key, e.g.
    /// `socks_rule[2].ports[0]`.
    pub fn from_raw(
        client: Vec<RawClientRule>,
        socks: Vec<RawSocksRule>,
    ) -> Result<Self, ConfigError> {
        let mut names = HashSet::new();
        let client = client
            .into_iter()
            .enumerate()
            .map(|(i, raw)| client_rule(i, raw, &mut names))
            .collect::<Result<Vec<_>, _>>()?;
        let mut names = HashSet::new();
        let socks = socks
            .into_iter()
            .enumerate()
            .map(|(i, raw)| socks_rule(i, raw, &mut names))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { client, socks })
    }

    /// The rules used when the config has none: clients from loopback only, any request from
    /// them. A server reachable from elsewhere must say so explicitly.
    pub fn loopback_default() -> Self {
        let loopback = ["127.0.0.0/8", "::1/128"]
            .iter()
            .map(|s| s.parse().expect("literal CIDR"))
            .collect();
        Self {
            client: vec![ClientRule {
                name: "loopback".to_owned(),
                action: Action::Pass,
                from: Some(loopback),
                methods: None,
                log: false,
            }],
            socks: vec![SocksRule {
                name: "any".to_owned(),
                action: Action::Pass,
                from: None,
                to: None,
                ports: None,
                commands: None,
                users: None,
                versions: None,
                log: false,
            }],
        }
    }

    /// The `methods` of every `pass` client rule (`None`: any method the server offers).
    pub fn passing_client_methods(&self) -> impl Iterator<Item = Option<&[AuthMethod]>> {
        self.client
            .iter()
            .filter(|r| r.action == Action::Pass)
            .map(|r| r.methods.as_deref())
    }

    /// Every user name a socks rule matches on: its key (`socks_rule[N].users`), the rule's
    /// name, the user, and whether the rule can match SOCKS4 requests (whose unauthenticated
    /// USERID it then matches too).
    pub fn named_users(&self) -> impl Iterator<Item = (String, &str, &str, bool)> {
        self.socks.iter().enumerate().flat_map(|(i, r)| {
            let v4 = r.matches_socks4();
            r.users.iter().flatten().map(move |u| {
                (
                    format!("socks_rule[{i}].users"),
                    r.name.as_str(),
                    u.as_str(),
                    v4,
                )
            })
        })
    }

    /// Whether some socks rule passes SOCKS4 requests.
    pub fn passes_socks4(&self) -> bool {
        self.socks
            .iter()
            .any(|r| r.action == Action::Pass && r.matches_socks4())
    }

    /// Stage 1, at accept time: the first client rule whose `from` holds `client` decides
    /// (default block). Also returns that rule's `methods`, `None` meaning any method the server
    /// supports.
    pub fn check_client(&self, client: IpAddr) -> (Verdict<'_>, Option<&[AuthMethod]>) {
        self.client
            .iter()
            .find(|r| nets_match(r.from.as_deref(), client))
            .map_or((DEFAULT, None), |r| (r.verdict(), r.methods.as_deref()))
    }

    /// Stage 2: the first socks rule matching the request decides (default block). Meant for
    /// [`Dest::Ip`] and [`Dest::Resolved`]; with an unresolved [`Dest::Name`], rules with only
    /// CIDRs in `to` cannot match, so prefer [`Rules::check_name`] there.
    pub fn check_request(&self, req: &RequestInfo<'_>) -> Verdict<'_> {
        self.socks
            .iter()
            .find(|r| r.matches_rest(req) && r.matches_dest(&req.dest))
            .map_or(DEFAULT, SocksRule::verdict)
    }

    /// Stage 2 for a name, before resolving it. `Some` is the verdict every address of the name
    /// would get: from the first rule that matches by name (a name or `.suffix` entry, or no
    /// `to`), or the default block when no rule can match at all, so that a blocked name is
    /// refused without a DNS query. Rules whose other criteria do not match, and rules whose
    /// `to` holds only names that do not match, are skipped. `None` means a rule with CIDRs in
    /// `to` came first, so the answer depends on the addresses: resolve the name and call
    /// [`Rules::check_request`] with [`Dest::Resolved`] for each address.
    ///
    /// A [`Dest::Ip`] needs no resolution and gets its [`Rules::check_request`] verdict.
    pub fn check_name(&self, req: &RequestInfo<'_>) -> Option<Verdict<'_>> {
        let name = match req.dest {
            Dest::Ip(..) => return Some(self.check_request(req)),
            Dest::Name(name, _) | Dest::Resolved(name, _, _) => name,
        };
        for rule in self.socks.iter().filter(|r| r.matches_rest(req)) {
            let Some(to) = &rule.to else {
                return Some(rule.verdict());
            };
            if to.iter().any(|t| t.matches_name(name)) {
                return Some(rule.verdict());
            }
            if to.iter().any(|t| matches!(t, Target::Net(_))) {
                return None;
            }
        }
        Some(DEFAULT)
    }

    /// One line per rule, in evaluation order, with its key and name, then each stage's
    /// default; printed by `ebsocks check-config`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, r) in self.client.iter().enumerate() {
            let ClientRule {
                name,
                action,
                from,
                methods,
                log,
            } = r;
            let _ = write!(
                out,
                "client_rule[{i}] {name:?}: {action} from {}",
                list(from.as_deref(), "any")
            );
            if let Some(m) = methods {
                let _ = write!(out, " methods {}", list(Some(m), ""));
            }
            out.push_str(if *log { " log\n" } else { "\n" });
        }
        out.push_str("client default: block\n");
        for (i, r) in self.socks.iter().enumerate() {
            let SocksRule {
                name,
                action,
                from,
                to,
                ports,
                commands,
                users,
                versions,
                log,
            } = r;
            let _ = write!(
                out,
                "socks_rule[{i}] {name:?}: {action} from {} to {}",
                list(from.as_deref(), "any"),
                list(to.as_deref(), "any")
            );
            if let Some(p) = ports {
                let _ = write!(out, " ports {}", list(Some(p), ""));
            }
            if let Some(c) = commands {
                let _ = write!(out, " commands {}", list(Some(c), ""));
            }
            if let Some(u) = users {
                let _ = write!(out, " users {}", list(Some(u), ""));
            }
            if let Some(v) = versions {
                let _ = write!(out, " versions {}", list(Some(v), ""));
            }
            out.push_str(if *log { " log\n" } else { "\n" });
        }
        out.push_str("socks default: block\n");
        out
    }

    /// The rules in config form, so that the effective configuration can be printed and read
    /// back unchanged.
    pub fn to_raw(&self) -> (Vec<RawClientRule>, Vec<RawSocksRule>) {
        fn strings<T: fmt::Display>(v: Option<&[T]>) -> Option<Vec<String>> {
            v.map(|v| v.iter().map(ToString::to_string).collect())
        }
        let client = self
            .client
            .iter()
            .map(|r| {
                let ClientRule {
                    name,
                    action,
                    from,
                    methods,
                    log,
                } = r;
                RawClientRule {
                    name: Some(name.clone()),
                    action: Some(action.to_string()),
                    from: strings(from.as_deref()),
                    methods: strings(methods.as_deref()),
                    log: Some(*log),
                }
            })
            .collect();
        let socks = self
            .socks
            .iter()
            .map(|r| {
                let SocksRule {
                    name,
                    action,
                    from,
                    to,
                    ports,
                    commands,
                    users,
                    versions,
                    log,
                } = r;
                RawSocksRule {
                    name: Some(name.clone()),
                    action: Some(action.to_string()),
                    from: strings(from.as_deref()),
                    to: strings(to.as_deref()),
                    ports: ports
                        .as_ref()
                        .map(|ps| ps.iter().map(|p| RawPort::Text(p.to_string())).collect()),
                    commands: strings(commands.as_deref()),
                    users: users.clone(),
                    versions: versions
                        .as_ref()
                        .map(|vs| vs.iter().map(|&v| i64::from(v)).collect()),
                    log: Some(*log),
                }
            })
            .collect();
        (client, socks)
    }
}

fn list<T: fmt::Display>(items: Option<&[T]>, none: &str) -> String {
    match items {
        None => none.to_owned(),
        Some(items) => items
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn invalid(key: impl Into<String>, problem: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.to_string(),
    }
}

/// Parses an optional list element by element; an empty list is refused because it would match
/// nothing, which is never what a rule author means.
fn parse_list<R, T>(
    key: &str,
    raw: Option<Vec<R>>,
    parse: impl Fn(R) -> Result<T, String>,
) -> Result<Option<Vec<T>>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    if raw.is_empty() {
        return Err(invalid(
            key,
            "an empty list matches nothing; leave the key out to match anything",
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| parse(r).map_err(|p| invalid(format!("{key}[{i}]"), p)))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn rule_name(
    prefix: &str,
    raw: Option<String>,
    names: &mut HashSet<String>,
) -> Result<String, ConfigError> {
    let key = format!("{prefix}.name");
    let name = raw.unwrap_or_else(|| prefix.to_owned());
    if name.trim().is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    if name == DEFAULT.rule {
        return Err(invalid(
            key,
            "\"default\" is reserved for the verdict when no rule matches",
        ));
    }
    if !names.insert(name.clone()) {
        return Err(invalid(
            key,
            format!("{name:?} is already the name of an earlier rule"),
        ));
    }
    Ok(name)
}

fn rule_action(prefix: &str, raw: Option<String>) -> Result<Action, ConfigError> {
    let key = format!("{prefix}.action");
    let raw = raw.ok_or_else(|| invalid(&key, "is required (\"pass\" or \"block\")"))?;
    Action::parse(&raw).map_err(|p| invalid(key, p))
}

fn client_rule(
    i: usize,
    raw: RawClientRule,
    names: &mut HashSet<String>,
) -> Result<ClientRule, ConfigError> {
    let prefix = format!("client_rule[{i}]");
    let RawClientRule {
        name,
        action,
        from,
        methods,
        log,
    } = raw;
    Ok(ClientRule {
        name: rule_name(&prefix, name, names)?,
        action: rule_action(&prefix, action)?,
        from: parse_list(&format!("{prefix}.from"), from, |s| parse_cidr(&s))?,
        methods: parse_list(&format!("{prefix}.methods"), methods, |s| {
            AuthMethod::parse(&s)
        })?,
        log: log.unwrap_or(false),
    })
}

fn socks_rule(
    i: usize,
    raw: RawSocksRule,
    names: &mut HashSet<String>,
) -> Result<SocksRule, ConfigError> {
    let prefix = format!("socks_rule[{i}]");
    let RawSocksRule {
        name,
        action,
        from,
        to,
        ports,
        commands,
        users,
        versions,
        log,
    } = raw;
    Ok(SocksRule {
        name: rule_name(&prefix, name, names)?,
        action: rule_action(&prefix, action)?,
        from: parse_list(&format!("{prefix}.from"), from, |s| parse_cidr(&s))?,
        to: parse_list(&format!("{prefix}.to"), to, |s| parse_target(&s))?,
        ports: parse_list(&format!("{prefix}.ports"), ports, parse_ports)?,
        commands: parse_list(&format!("{prefix}.commands"), commands, |s| {
            Command::parse(&s)
        })?,
        users: parse_list(&format!("{prefix}.users"), users, parse_user)?,
        versions: parse_list(&format!("{prefix}.versions"), versions, |v| {
            u8::try_from(v)
                .ok()
                .filter(|v| matches!(v, 4 | 5))
                .ok_or_else(|| format!("{v} is not a SOCKS version (expected 4 or 5)"))
        })?,
        log: log.unwrap_or(false),
    })
}

/// A CIDR or address; IPv4-mapped IPv6 networks (`::ffff:10.0.0.0/104`) become IPv4 networks,
/// since addresses are compared in their canonical form.
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net = parse_net(s)?;
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            let v4 = Ipv4Net::new(v4, v6.prefix_len() - 96).map_err(|e| format!("{s:?}: {e}"))?;
            return Ok(IpNet::V4(v4));
        }
    }
    Ok(net)
}

fn parse_target(s: &str) -> Result<Target, String> {
    if s.contains('/') || s.parse::<IpAddr>().is_ok() {
        return parse_cidr(s).map(Target::Net);
    }
    if s.contains(':') {
        return Err(format!(
            "{s:?} is neither an address, a CIDR nor a host name"
        ));
    }
    if let Some(rest) = s.strip_prefix("*.") {
        return Err(format!("{s:?}: wildcards are written as a leading dot, \".{rest}\", which matches the domain and all its subdomains"));
    }
    let (suffix, body) = match s.strip_prefix('.') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let body = body.strip_suffix('.').unwrap_or(body).to_ascii_lowercase();
    if body.is_empty() {
        return Err(format!(
            "{s:?} names no domain; leave `to` out to match any destination"
        ));
    }
    if body.len() > 253 {
        return Err(format!("{s:?} is longer than a host name can be"));
    }
    for label in body.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{s:?} has an empty or over-long label"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{s:?} is not a host name (letters, digits, '-', '_' and dots; international names in their xn-- form)"
            ));
        }
    }
    if body
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("{s:?} looks like an IPv4 address but is not one"));
    }
    Ok(if suffix {
        Target::Suffix(body)
    } else {
        Target::Name(body)
    })
}

fn parse_ports(raw: RawPort) -> Result<PortRange, String> {
    let port = |s: &str| -> Result<u16, String> {
        s.trim()
            .parse::<u16>()
            .map_err(|_| format!("{s:?} is not a port number (0-65535)"))
    };
    match raw {
        RawPort::Number(n) => u16::try_from(n)
            .map(|p| PortRange { lo: p, hi: p })
            .map_err(|_| format!("{n} is not a port number (0-65535)")),
        RawPort::Text(s) => {
            let (lo, hi) = match s.split_once('-') {
                Some((lo, hi)) => (port(lo)?, port(hi)?),
                None => {
                    let p = port(&s)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(format!("range {s:?} is backwards (write \"{hi}-{lo}\")"));
            }
            Ok(PortRange { lo, hi })
        }
    }
}

fn parse_user(s: String) -> Result<String, String> {
    if s.is_empty() || s.len() > 255 {
        return Err("a username is 1 to 255 bytes (RFC 1929)".to_owned());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use rstest::rstest;
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        client_rule: Vec<RawClientRule>,
        #[serde(default)]
        socks_rule: Vec<RawSocksRule>,
    }

    fn parse(text: &str) -> Result<Rules, ConfigError> {
        let File {
            client_rule,
            socks_rule,
        } = toml::from_str(text)?;
        Rules::from_raw(client_rule, socks_rule)
    }

    fn rules(text: &str) -> Rules {
        parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn req(dest: Dest<'_>) -> RequestInfo<'_> {
        RequestInfo {
            client: ip("192.0.2.10"),
            user: None,
            command: Command::Connect,
            version: 5,
            dest,
        }
    }

    /// The rule that decided, or "default".
    fn decided<'r>(r: &'r Rules, q: &RequestInfo<'_>) -> (&'r str, Action) {
        let v = r.check_request(q);
        (v.rule, v.action)
    }

    const EXAMPLE: &str = r#"
        [[client_rule]]
        name = "loopback"
        action = "pass"
        from = ["127.0.0.0/8", "::1/128"]
        methods = ["none", "username"]

        [[client_rule]]
        action = "block"
        from = ["10.0.0.0/8"]
        log = true

        [[client_rule]]
        name = "lan"
        action = "pass"
        from = ["192.0.2.0/24", "2001:db8::/32"]
        methods = ["username"]

        [[socks_rule]]
        name = "no-private"
        action = "block"
        from = ["0.0.0.0/0", "::/0"]
        to = ["10.0.0.0/8", "db.example.com", ".internal.example"]
        log = true

        [[socks_rule]]
        name = "web"
        action = "pass"
        ports = ["80", 443, "8000-8999"]
        commands = ["connect"]
        versions = [4, 5]

        [[socks_rule]]
        name = "alice-udp"
        action = "pass"
        commands = ["udpassociate", "bind"]
        users = ["alice"]
    "#;

    #[test]
    fn client_stage_first_match_and_default_block() {
        let r = rules(EXAMPLE);
        let (v, m) = r.check_client(ip("127.0.0.1"));
        assert_eq!((v.action, v.rule, v.log), (Action::Pass, "loopback", false));
        assert_eq!(m, Some(&[AuthMethod::None, AuthMethod::Username][..]));
        let (v, m) = r.check_client(ip("10.9.9.9"));
        assert_eq!(
            (v.action, v.rule, v.log),
            (Action::Block, "client_rule[1]", true)
        );
        assert_eq!(m, None);
        let (v, m) = r.check_client(ip("2001:db8::5"));
        assert_eq!((v.action, v.rule), (Action::Pass, "lan"));
        assert_eq!(m, Some(&[AuthMethod::Username][..]));
        let (v, _) = r.check_client(ip("198.51.100.1"));
        assert_eq!(
            v,
            Verdict {
                action: Action::Block,
                rule: "default",
                log: false
            }
        );
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_rules() {
        let r = rules(EXAMPLE);
        assert_eq!(r.check_client(ip("::ffff:127.0.0.1")).0.rule, "loopback");
        assert_eq!(
            r.check_client(ip("::ffff:10.1.2.3")).0.rule,
            "client_rule[1]"
        );
        // Mapped notation in a rule is IPv4 too.
        let r = rules("[[client_rule]]\naction = \"pass\"\nfrom = [\"::ffff:192.0.2.0/120\"]");
        assert!(r.check_client(ip("192.0.2.7")).0.is_pass());
        assert!(r.check_client(ip("::ffff:192.0.2.7")).0.is_pass());
        assert!(!r.check_client(ip("192.0.3.7")).0.is_pass());
        assert!(
            r.describe().contains("from 192.0.2.0/24"),
            "{}",
            r.describe()
        );
    }

    #[test]
    fn rule_without_from_matches_any_client() {
        let r = rules("[[client_rule]]\naction = \"pass\"");
        assert!(r.check_client(ip("203.0.113.1")).0.is_pass());
        assert!(r.check_client(ip("2001:db8::1")).0.is_pass());
    }

    #[test]
    fn loopback_default() {
        let r = Rules::loopback_default();
        assert!(r.check_client(ip("127.0.0.1")).0.is_pass());
        assert!(r.check_client(ip("::1")).0.is_pass());
        assert!(r.check_client(ip("::ffff:127.0.0.1")).0.is_pass());
        assert!(!r.check_client(ip("192.0.2.1")).0.is_pass());
        assert_eq!(r.check_client(ip("127.0.0.1")).1, None);
        let q = RequestInfo {
            client: ip("127.0.0.1"),
            user: None,
            command: Command::Bind,
            version: 4,
            dest: Dest::Ip(ip("10.0.0.1"), 0),
        };
        assert!(r.check_request(&q).is_pass());
        assert!(r
            .check_name(&RequestInfo {
                dest: Dest::Name("example.com", 443),
                ..q
            })
            .unwrap()
            .is_pass());
    }

    #[test]
    fn destination_cidrs_and_mapped_addresses() {
        let r = rules(EXAMPLE);
        assert_eq!(
            decided(&r, &req(Dest::Ip(ip("10.1.2.3"), 80))),
            ("no-private", Action::Block)
        );
        assert_eq!(
            decided(&r, &req(Dest::Ip(ip("::ffff:10.1.2.3"), 80))),
            ("no-private", Action::Block)
        );
        assert_eq!(
            decided(&r, &req(Dest::Ip(ip("11.1.2.3"), 80))),
            ("web", Action::Pass)
        );
        let v = r.check_request(&req(Dest::Ip(ip("10.1.2.3"), 80)));
        assert!(v.log);
    }

    #[rstest]
    #[case("db.example.com", true)]
    #[case("DB.Example.COM", true)]
    #[case("db.example.com.", true)]
    #[case("x.db.example.com", false)]
    #[case("example.com", false)]
    #[case("internal.example", true)]
    #[case("a.b.INTERNAL.example.", true)]
    #[case("notinternal.example", false)]
    #[case("internal.example.org", false)]
    fn destination_names_and_suffixes(#[case] name: &str, #[case] blocked: bool) {
        let r = rules(EXAMPLE);
        // The rule also lists a CIDR, so a name it does not match must wait for its addresses.
        let v = r.check_name(&req(Dest::Name(name, 80)));
        assert_eq!(
            v.map(|v| (v.rule, v.action)),
            blocked.then_some(("no-private", Action::Block)),
            "{name}"
        );
        let v = r.check_request(&req(Dest::Resolved(name, ip("192.0.2.80"), 80)));
        assert_eq!(v.rule == "no-private", blocked, "{name}: {v:?}");
    }

    #[rstest]
    #[case(80, "web")]
    #[case(443, "web")]
    #[case(8000, "web")]
    #[case(8999, "web")]
    #[case(9000, "default")]
    #[case(22, "default")]
    fn destination_ports(#[case] port: u16, #[case] rule: &str) {
        let r = rules(EXAMPLE);
        assert_eq!(
            r.check_request(&req(Dest::Ip(ip("198.51.100.1"), port)))
                .rule,
            rule
        );
    }

    #[test]
    fn commands_users_and_versions() {
        let r = rules(EXAMPLE);
        let dest = Dest::Ip(ip("198.51.100.1"), 5000);
        let anon = RequestInfo {
            command: Command::UdpAssociate,
            ..req(dest)
        };
        assert_eq!(
            r.check_request(&anon).rule,
            "default",
            "users set: unauthenticated does not match"
        );
        let bob = RequestInfo {
            user: Some("bob"),
            ..anon
        };
        assert_eq!(r.check_request(&bob).rule, "default");
        let alice = RequestInfo {
            user: Some("alice"),
            ..anon
        };
        assert_eq!(r.check_request(&alice).rule, "alice-udp");
        assert_eq!(
            r.check_request(&RequestInfo {
                command: Command::Bind,
                ..alice
            })
            .rule,
            "alice-udp"
        );
        assert_eq!(
            r.check_request(&RequestInfo {
                command: Command::Connect,
                ..alice
            })
            .rule,
            "default"
        );
        // No `users`: matches authenticated and unauthenticated alike.
        let web = req(Dest::Ip(ip("198.51.100.1"), 443));
        assert_eq!(r.check_request(&web).rule, "web");
        assert_eq!(
            r.check_request(&RequestInfo {
                user: Some("bob"),
                ..web
            })
            .rule,
            "web"
        );
        assert_eq!(
            r.check_request(&RequestInfo { version: 4, ..web }).rule,
            "web"
        );
        let r5 = rules("[[socks_rule]]\naction = \"pass\"\nversions = [5]");
        assert!(r5
            .check_request(&RequestInfo { version: 5, ..web })
            .is_pass());
        assert!(!r5
            .check_request(&RequestInfo { version: 4, ..web })
            .is_pass());
    }

    #[test]
    fn socks_rule_from() {
        let r = rules("[[socks_rule]]\naction = \"pass\"\nfrom = [\"192.0.2.0/24\"]");
        let q = req(Dest::Ip(ip("198.51.100.1"), 443));
        assert!(r.check_request(&q).is_pass());
        assert!(r
            .check_request(&RequestInfo {
                client: ip("::ffff:192.0.2.99"),
                ..q
            })
            .is_pass());
        assert!(!r
            .check_request(&RequestInfo {
                client: ip("192.0.3.1"),
                ..q
            })
            .is_pass());
    }

    #[test]
    fn first_match_wins_and_default_blocks() {
        let r = rules(
            r#"
            [[socks_rule]]
            name = "a"
            action = "pass"
            to = ["192.0.2.0/25"]
            [[socks_rule]]
            name = "b"
            action = "block"
            to = ["192.0.2.0/24"]
            [[socks_rule]]
            name = "c"
            action = "pass"
            to = ["192.0.2.128/25", "198.51.100.1"]
        "#,
        );
        assert_eq!(
            decided(&r, &req(Dest::Ip(ip("192.0.2.1"), 1))),
            ("a", Action::Pass)
        );
        assert_eq!(
            decided(&r, &req(Dest::Ip(ip("192.0.2.200"), 1))),
            ("b", Action::Block)
        );
        assert_eq!(
            decided(&r, &req(Dest::Ip(ip("198.51.100.1"), 1))),
            ("c", Action::Pass)
        );
        assert_eq!(
            decided(&r, &req(Dest::Ip(ip("198.51.100.2"), 1))),
            ("default", Action::Block)
        );
        assert_eq!(
            decided(
                &Rules::from_raw(vec![], vec![]).unwrap(),
                &req(Dest::Ip(ip("198.51.100.2"), 1))
            )
            .1,
            Action::Block
        );
        assert_eq!(
            Rules::from_raw(vec![], vec![])
                .unwrap()
                .check_client(ip("127.0.0.1"))
                .0
                .action,
            Action::Block
        );
    }

    const BLOCK_PRIVATE_THEN_PASS: &str = r#"
        [[socks_rule]]
        name = "no-private"
        action = "block"
        to = ["10.0.0.0/8"]
        [[socks_rule]]
        name = "rest"
        action = "pass"
    "#;

    #[test]
    fn name_stage_defers_to_addresses_behind_a_cidr_rule() {
        let r = rules(BLOCK_PRIVATE_THEN_PASS);
        let q = req(Dest::Name("intranet.example.com", 443));
        assert_eq!(
            r.check_name(&q),
            None,
            "a CIDR rule comes first: resolve and check each address"
        );
        // The name cannot bypass the CIDR rule: each resolved address is checked.
        let at = |a: &str| {
            r.check_request(&RequestInfo {
                dest: Dest::Resolved("intranet.example.com", ip(a), 443),
                ..q
            })
        };
        assert_eq!(
            (at("10.1.2.3").rule, at("10.1.2.3").action),
            ("no-private", Action::Block)
        );
        assert_eq!(
            (at("::ffff:10.1.2.3").rule, at("::ffff:10.1.2.3").action),
            ("no-private", Action::Block)
        );
        assert_eq!(
            (at("203.0.113.5").rule, at("203.0.113.5").action),
            ("rest", Action::Pass)
        );
    }

    #[test]
    fn name_stage_skips_rules_that_cannot_match() {
        let r = rules(
            r#"
            [[socks_rule]]
            name = "cidr-other-port"
            action = "block"
            to = ["10.0.0.0/8"]
            ports = ["25"]
            [[socks_rule]]
            name = "other-name"
            action = "block"
            to = ["other.example"]
            [[socks_rule]]
            name = "allowed"
            action = "pass"
            to = [".example.com"]
            [[socks_rule]]
            name = "catch-all"
            action = "block"
        "#,
        );
        // The CIDR rule is skipped because its port does not match; the name rule that does not
        // match is skipped; the suffix rule decides without DNS.
        let v = r
            .check_name(&req(Dest::Name("www.example.com", 443)))
            .unwrap();
        assert_eq!((v.rule, v.action), ("allowed", Action::Pass));
        // And every resolved address agrees, even under the catch-all block.
        let v = r.check_request(&req(Dest::Resolved("www.example.com", ip("10.0.0.1"), 443)));
        assert_eq!((v.rule, v.action), ("allowed", Action::Pass));
        // A name-only rule decides a block without DNS too.
        let v = r
            .check_name(&req(Dest::Name("other.example", 443)))
            .unwrap();
        assert_eq!((v.rule, v.action), ("other-name", Action::Block));
        // No `to` matches any name.
        let v = r
            .check_name(&req(Dest::Name("elsewhere.org", 443)))
            .unwrap();
        assert_eq!((v.rule, v.action), ("catch-all", Action::Block));
        // On port 25 the CIDR rule applies, so the addresses decide.
        assert_eq!(r.check_name(&req(Dest::Name("www.example.com", 25))), None);
    }

    #[test]
    fn name_stage_default_when_nothing_can_match() {
        let r = rules("[[socks_rule]]\naction = \"pass\"\nto = [\"a.example\"]");
        let v = r.check_name(&req(Dest::Name("b.example", 80))).unwrap();
        assert_eq!((v.rule, v.action), ("default", Action::Block));
        // A literal address needs no name stage.
        let v = r.check_name(&req(Dest::Ip(ip("192.0.2.1"), 80))).unwrap();
        assert_eq!(v.rule, "default");
        // An unresolved name never matches a CIDR entry.
        let r = rules("[[socks_rule]]\naction = \"pass\"\nto = [\"0.0.0.0/0\"]");
        assert_eq!(r.check_name(&req(Dest::Name("b.example", 80))), None);
        assert_eq!(
            r.check_request(&req(Dest::Name("b.example", 80))).rule,
            "default"
        );
        assert!(r
            .check_request(&req(Dest::Resolved("b.example", ip("192.0.2.1"), 80)))
            .is_pass());
    }

    #[test]
    fn socks5_conversions() {
        let a = proxy_socks5::Address::Domain("10.0.0.1".to_owned(), 80);
        assert_eq!(Dest::from(&a), Dest::Ip(ip("10.0.0.1"), 80));
        let a = proxy_socks5::Address::Domain("example.com".to_owned(), 80);
        assert_eq!(Dest::from(&a), Dest::Name("example.com", 80));
        let a = proxy_socks5::Address::Ip((Ipv4Addr::LOCALHOST, 22).into());
        assert_eq!(Dest::from(&a), Dest::Ip(ip("127.0.0.1"), 22));
        assert_eq!(
            Command::from(proxy_socks5::Command::UdpAssociate),
            Command::UdpAssociate
        );
        assert_eq!(
            proxy_socks5::Method::from(AuthMethod::Username),
            proxy_socks5::Method::UserPass
        );
    }

    #[test]
    fn describe_lists_rules_in_order() {
        let text = rules(EXAMPLE).describe();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8, "{text}");
        assert_eq!(
            lines[0],
            "client_rule[0] \"loopback\": pass from 127.0.0.0/8, ::1/128 methods none, username"
        );
        assert_eq!(
            lines[1],
            "client_rule[1] \"client_rule[1]\": block from 10.0.0.0/8 log"
        );
        assert_eq!(lines[3], "client default: block");
        assert_eq!(
            lines[4],
            "socks_rule[0] \"no-private\": block from 0.0.0.0/0, ::/0 to 10.0.0.0/8, db.example.com, .internal.example log"
        );
        assert_eq!(lines[5], "socks_rule[1] \"web\": pass from any to any ports 80, 443, 8000-8999 commands connect versions 4, 5");
        assert_eq!(lines[6], "socks_rule[2] \"alice-udp\": pass from any to any commands udpassociate, bind users alice");
        assert_eq!(lines[7], "socks default: block");
    }

    #[test]
    fn to_raw_round_trips_through_toml() {
        #[derive(Serialize)]
        struct Out {
            client_rule: Vec<RawClientRule>,
            socks_rule: Vec<RawSocksRule>,
        }
        for r in [rules(EXAMPLE), Rules::loopback_default()] {
            let (client_rule, socks_rule) = r.to_raw();
            let text = toml::to_string(&Out {
                client_rule,
                socks_rule,
            })
            .unwrap();
            assert_eq!(rules(&text), r, "{text}");
        }
    }

    #[rstest]
    #[case::bad_cidr(
        "[[socks_rule]]\naction = \"pass\"\nfrom = [\"10.0.0.0/33\"]",
        "socks_rule[0].from[0]"
    )]
    #[case::host_bits(
        "[[client_rule]]\naction = \"pass\"\nfrom = [\"127.0.0.1/8\"]",
        "client_rule[0].from[0]"
    )]
    #[case::host_bits_to(
        "[[socks_rule]]\naction = \"pass\"\nto = [\"a.example\", \"10.0.0.1/8\"]",
        "socks_rule[0].to[1]"
    )]
    #[case::backwards_range("[[socks_rule]]\naction = \"pass\"\n[[socks_rule]]\naction = \"pass\"\n[[socks_rule]]\naction = \"pass\"\nports = [\"80\", \"10-5\"]", "socks_rule[2].ports[1]")]
    #[case::port_too_big(
        "[[socks_rule]]\naction = \"pass\"\nports = [65536]",
        "socks_rule[0].ports[0]"
    )]
    #[case::port_text(
        "[[socks_rule]]\naction = \"pass\"\nports = [\"http\"]",
        "socks_rule[0].ports[0]"
    )]
    #[case::unknown_command(
        "[[socks_rule]]\naction = \"pass\"\ncommands = [\"connect\", \"ping\"]",
        "socks_rule[0].commands[1]"
    )]
    #[case::unknown_method(
        "[[client_rule]]\naction = \"pass\"\nmethods = [\"gssapi\"]",
        "client_rule[0].methods[0]"
    )]
    #[case::bad_version(
        "[[socks_rule]]\naction = \"pass\"\nversions = [6]",
        "socks_rule[0].versions[0]"
    )]
    #[case::missing_action("[[socks_rule]]\nname = \"x\"", "socks_rule[0].action")]
    #[case::bad_action("[[client_rule]]\naction = \"allow\"", "client_rule[0].action")]
    #[case::empty_list("[[socks_rule]]\naction = \"pass\"\nto = []", "socks_rule[0].to")]
    #[case::wildcard(
        "[[socks_rule]]\naction = \"pass\"\nto = [\"*.example.com\"]",
        "socks_rule[0].to[0]"
    )]
    #[case::bad_name(
        "[[socks_rule]]\naction = \"pass\"\nto = [\"exa mple.com\"]",
        "socks_rule[0].to[0]"
    )]
    #[case::bad_ipv4(
        "[[socks_rule]]\naction = \"pass\"\nto = [\"300.1.1.1\"]",
        "socks_rule[0].to[0]"
    )]
    #[case::bad_ipv6(
        "[[socks_rule]]\naction = \"pass\"\nto = [\"fe80::1::2\"]",
        "socks_rule[0].to[0]"
    )]
    #[case::bare_dot(
        "[[socks_rule]]\naction = \"pass\"\nto = [\".\"]",
        "socks_rule[0].to[0]"
    )]
    #[case::empty_user(
        "[[socks_rule]]\naction = \"pass\"\nusers = [\"\"]",
        "socks_rule[0].users[0]"
    )]
    #[case::duplicate_name("[[client_rule]]\nname = \"a\"\naction = \"pass\"\n[[client_rule]]\nname = \"a\"\naction = \"block\"", "client_rule[1].name")]
    #[case::reserved_name(
        "[[socks_rule]]\nname = \"default\"\naction = \"pass\"",
        "socks_rule[0].name"
    )]
    fn config_errors_name_the_key(#[case] text: &str, #[case] key: &str) {
        let err = parse(text).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&format!("`{key}`")),
            "{text:?}: {err}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = parse("[[socks_rule]]\naction = \"pass\"\nport = [\"80\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("port"), "{err}");
        let err = parse("[[client_rule]]\naction = \"pass\"\nto = [\"10.0.0.0/8\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `to`"), "{err}");
    }

    #[test]
    fn names_are_normalised_in_the_config() {
        let r = rules(
            "[[socks_rule]]\naction = \"block\"\nto = [\"DB.Example.com.\", \".Corp.Example.\"]",
        );
        assert_eq!(
            r.check_name(&req(Dest::Name("db.example.COM", 1)))
                .unwrap()
                .action,
            Action::Block
        );
        assert_eq!(
            r.check_name(&req(Dest::Name("x.corp.example", 1)))
                .unwrap()
                .action,
            Action::Block
        );
        assert!(
            r.describe().contains("to db.example.com, .corp.example"),
            "{}",
            r.describe()
        );
    }
}
