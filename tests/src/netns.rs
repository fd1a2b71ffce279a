//! Network namespaces joined by veth pairs, created by a test and removed when it drops them.
//!
//! ```text
//!  client ns            proxy ns                     target ns
//!  c0 10.N.1.2  ----  p0 10.N.1.1   p1 10.N.2.1  ----  t0 10.N.2.2
//!     fdN:1::2            fdN:1::1     fdN:2::1           fdN:2::2
//! ```
//!
//! `N` is unique per topology in the process, so tests may run side by side; namespace names
//! carry the pid. The client and the target route everything through the proxy namespace,
//! which forwards (for direct sends without the proxy). On `c0` and `t0`, transmit checksum
//! offload is off (frames carry complete checksums, as from a real NIC) and GRO is on (a veth
//! needs it, or an XDP program, to take frames an XDP program redirects to its peer).
//!
//! Sockets are opened inside a namespace with [`Netns::enter`], which switches the calling
//! thread only and switches back before it returns; a socket keeps its namespace for life.

use crate::{DaemonOpts, DataPath};

use std::{
    ffi::CString,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
}

fn ip(args: &[&str]) {
    crate::util::run("ip", args);
}

fn open_ns(path: &str) -> OwnedFd {
    let c = CString::new(path).expect("path without NUL");
    // SAFETY: `c` is NUL-terminated; the result is checked.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    assert!(fd >= 0, "open {path}: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn setns(fd: &OwnedFd) {
    // SAFETY: a namespace descriptor; CLONE_NEWNET switches the calling thread only.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Netns {
    /// Creates `name` (which must be unique on the machine).
    pub fn new(name: String) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, e.g. for `nsenter --net=`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NAME args...`; panics with ip's message on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs `f` on this thread inside the namespace.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        let home = open_ns("/proc/thread-self/ns/net");
        let target = open_ns(&self.path());
        setns(&target);
        struct Back(OwnedFd);
        impl Drop for Back {
            fn drop(&mut self) {
                setns(&self.0);
            }
        }
        let _back = Back(home);
        f()
    }

    /// Writes a sysctl of this namespace (`net/ipv4/ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{key}");
        self.enter(|| std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("{} {path}: {e}", self.name));
    }

    /// `ethtool -K dev tx off gro on` through SIOCETHTOOL.
    pub fn veth_for_xdp(&self, dev: &str) {
        const ETHTOOL_STXCSUM: u32 = 0x17;
        const ETHTOOL_SGRO: u32 = 0x2c;
        self.enter(|| {
            for (cmd, data) in [(ETHTOOL_STXCSUM, 0u32), (ETHTOOL_SGRO, 1u32)] {
                let mut value = [cmd, data];
                // SAFETY: all-zero is a valid ifreq.
                let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
                for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
                    *d = s as libc::c_char;
                }
                req.ifr_ifru.ifru_data = value.as_mut_ptr().cast();
                // SAFETY: plain socket(2).
                let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
                assert!(s >= 0, "socket: {}", std::io::Error::last_os_error());
                // SAFETY: `s` was just opened here and is owned by this value.
                let s = unsafe { OwnedFd::from_raw_fd(s) };
                // SAFETY: `req` names the device and points at a live ethtool_value.
                let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCETHTOOL, &raw mut req) };
                assert_eq!(
                    rc,
                    0,
                    "SIOCETHTOOL {cmd:#x} on {dev}: {}",
                    std::io::Error::last_os_error()
                );
            }
        });
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace takes its veth ends, and their peers, with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Client, proxy and target namespaces; see the module docs.
pub struct Topology {
    pub client: Netns,
    pub proxy: Netns,
    pub target: Netns,
    n: u32,
}

/// [`crate::require_privileged`] plus working network namespaces: `true` when a test that
/// builds a [`Topology`] may go on; otherwise skips or, when `CI=true`, panics.
pub fn require(feature: &str) -> bool {
    if !crate::require_privileged(feature) {
        return false;
    }
    match available() {
        Ok(()) => true,
        Err(e) => crate::skip_or_panic(feature, &e),
    }
}

/// Whether `ip netns` works here (root, iproute2).
pub fn available() -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ip netns` fails: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

impl Topology {
    /// Builds the three namespaces and both links.
    pub fn new() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        // 10.N/16 with N in 100..=199, from the pid and a counter.
        let n = 100 + (std::process::id().wrapping_mul(7).wrapping_add(seq)) % 100;
        let tag = format!("{}-{seq}", std::process::id());
        let client = Netns::new(format!("ebx-c-{tag}"));
        let proxy = Netns::new(format!("ebx-p-{tag}"));
        let target = Netns::new(format!("ebx-t-{tag}"));
        let t = Self {
            client,
            proxy,
            target,
            n,
        };
        t.proxy.ip(&[
            "link",
            "add",
            "p0",
            "type",
            "veth",
            "peer",
            "name",
            "c0",
            "netns",
            t.client.name(),
        ]);
        t.proxy.ip(&[
            "link",
            "add",
            "p1",
            "type",
            "veth",
            "peer",
            "name",
            "t0",
            "netns",
            t.target.name(),
        ]);
        let addr = |ns: &Netns, dev: &str, net: u32, host: u32| {
            ns.ip(&[
                "addr",
                "add",
                &format!("10.{n}.{net}.{host}/24"),
                "dev",
                dev,
            ]);
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("fd{n:02x}:{net}::{host}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ns.ip(&["link", "set", dev, "up"]);
        };
        addr(&t.client, "c0", 1, 2);
        addr(&t.proxy, "p0", 1, 1);
        addr(&t.proxy, "p1", 2, 1);
        addr(&t.target, "t0", 2, 2);
        t.client
            .ip(&["route", "add", "default", "via", &format!("10.{n}.1.1")]);
        t.client.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd{n:02x}:1::1"),
        ]);
        t.target
            .ip(&["route", "add", "default", "via", &format!("10.{n}.2.1")]);
        t.target.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd{n:02x}:2::1"),
        ]);
        t.proxy.sysctl("net/ipv4/ip_forward", "1");
        t.proxy.sysctl("net/ipv6/conf/all/forwarding", "1");
        t.client.veth_for_xdp("c0");
        t.target.veth_for_xdp("t0");
        t
    }

    /// The client's address (`v6`: its IPv6 one).
    pub fn client_ip(&self, v6: bool) -> IpAddr {
        self.ip(v6, 1, 2)
    }

    /// The proxy's address on the client link.
    pub fn proxy_ip(&self, v6: bool) -> IpAddr {
        self.ip(v6, 1, 1)
    }

    /// The target's address.
    pub fn target_ip(&self, v6: bool) -> IpAddr {
        self.ip(v6, 2, 2)
    }

    /// Adds a second address for the proxy on the target link (`10.N.2.3`, `fdN:2::3`) and
    /// returns it: a source address the proxy only uses when told to.
    pub fn add_proxy_alias(&self, v6: bool) -> IpAddr {
        let ip = self.ip(v6, 2, 3);
        let cidr = format!("{ip}/{}", if v6 { 64 } else { 24 });
        let mut args = vec!["addr", "add", &cidr, "dev", "p1"];
        if v6 {
            args.push("nodad");
        }
        self.proxy.ip(&args);
        ip
    }

    /// The address `host` on link `net` (1: client-proxy, 2: proxy-target) of this topology,
    /// assigned or not.
    pub fn addr_on(&self, v6: bool, net: u32, host: u32) -> IpAddr {
        self.ip(v6, net, host)
    }

    /// An unused address on the target link (for destinations nobody answers).
    pub fn unused_target_ip(&self, v6: bool) -> IpAddr {
        self.ip(v6, 2, 99)
    }

    fn ip(&self, v6: bool, net: u32, host: u32) -> IpAddr {
        let n = self.n;
        if v6 {
            format!("fd{n:02x}:{net}::{host}").parse().expect("literal")
        } else {
            format!("10.{n}.{net}.{host}").parse().expect("literal")
        }
    }

    /// Options for a daemon in the proxy namespace, listening on its client-side address
    /// (`v6`: the IPv6 one) and admitting the client and target networks; `extra_toml` follows.
    pub fn proxy_daemon(&self, data_path: DataPath, v6: bool, extra_toml: &str) -> DaemonOpts {
        let [n4, n6] = self.networks();
        DaemonOpts {
            data_path,
            listen: vec![SocketAddr::new(self.proxy_ip(v6), 0).to_string()],
            extra_toml: format!("allow_clients = [\"{n4}\", \"{n6}\"]\n{extra_toml}"),
            allow_clients: false,
            wrapper: vec!["nsenter".into(), format!("--net={}", self.proxy.path())],
            ..DaemonOpts::default()
        }
    }

    /// The client and target networks, for `allow_clients` and rules.
    pub fn networks(&self) -> [String; 2] {
        let n = self.n;
        [format!("10.{n}.0.0/16"), format!("fd{n:02x}::/16")]
    }

    /// A UDP socket bound in `ns` to `ip` port 0, for tokio.
    pub fn udp(ns: &Netns, ip: IpAddr) -> tokio::net::UdpSocket {
        let s = ns
            .enter(|| std::net::UdpSocket::bind(SocketAddr::new(ip, 0)))
            .unwrap_or_else(|e| panic!("bind UDP {ip} in {}: {e}", ns.name()));
        s.set_nonblocking(true).expect("nonblocking");
        tokio::net::UdpSocket::from_std(s).expect("tokio UDP socket")
    }

    /// A TCP connection from `ns` to `to`, for tokio.
    pub fn tcp(ns: &Netns, to: SocketAddr) -> tokio::net::TcpStream {
        let s = ns
            .enter(|| std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("connect {to} from {}: {e}", ns.name()));
        s.set_nonblocking(true).expect("nonblocking");
        tokio::net::TcpStream::from_std(s).expect("tokio TCP stream")
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// `Udp: InDatagrams` plus `Udp6InDatagrams` of the network namespace of process `pid`:
/// datagrams delivered to UDP sockets there.
pub fn udp_in_datagrams(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let v4 = match (lines.next(), lines.next()) {
        (Some(head), Some(values)) => head
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(k, _)| *k == "InDatagrams")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0),
        _ => 0,
    };
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/snmp6")).unwrap_or_default();
    let v6 = text
        .lines()
        .find_map(|l| l.strip_prefix("Udp6InDatagrams"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    v4 + v6
}
