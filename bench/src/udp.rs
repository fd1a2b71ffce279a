//! `--udp`: 512-byte datagram rate through ebsocks' UDP relay, in a topology of network
//! namespaces (client -- proxy -- target, joined by veth pairs, created here and removed at the
//! end), beside a direct send (the proxy namespace only routes) and Dante when installed.
//!
//! Subjects: `direct`, `ebsocks-relay` (userspace relay only, no XDP), `ebsocks-xdp` (XDP on
//! the proxy's interfaces, `offload = true`), `dante` (when installed: danted in the proxy namespace). The XDP
//! program of `ebsocks-xdp` stays attached while the others run, so they pay its per-frame
//! counting too. One client thread in the client
//! namespace sends 512-byte payloads as fast as it can for the window; one thread in the target
//! namespace counts what arrives. Figures: datagrams per second received, and whole-machine CPU
//! per received datagram (all of it: sender, receiver, softirq, daemon). Every loop is bounded
//! by the window and by socket timeouts.

use std::{
    ffi::CString,
    fmt::Write as _,
    net::{SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::procfs::machine_busy_seconds;

/// Payload of every datagram.
pub const PAYLOAD: usize = 512;
/// Dante's SOCKS port in the proxy namespace (the namespace is the bench's own).
const DANTE_PORT: u16 = 1080;
/// Bound for a daemon to become ready.
const READY: Duration = Duration::from_secs(20);

struct Ns(String);

impl Ns {
    fn new(name: String) -> Result<Self> {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name])?;
        let ns = Self(name);
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }

    fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let home = open_ns("/proc/thread-self/ns/net")?;
        let there = open_ns(&self.path())?;
        setns(&there)?;
        let out = f();
        setns(&home)?;
        Ok(out)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn open_ns(path: &str) -> Result<OwnedFd> {
    let c = CString::new(path)?;
    // SAFETY: NUL-terminated path; result checked.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        bail!("open {path}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setns(fd: &OwnedFd) -> Result<()> {
    // SAFETY: a network namespace descriptor; switches this thread only.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// `ethtool -K dev tx off gro on`: complete checksums on the wire, NAPI for XDP redirects.
fn veth_for_xdp(ns: &Ns, dev: &str) -> Result<()> {
    ns.enter(|| -> Result<()> {
        for (cmd, data) in [(0x17u32, 0u32), (0x2c, 1)] {
            let mut value = [cmd, data];
            // SAFETY: all-zero ifreq is valid.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
                *d = s as libc::c_char;
            }
            req.ifr_ifru.ifru_data = value.as_mut_ptr().cast();
            let s = UdpSocket::bind("0.0.0.0:0")?;
            // SAFETY: `req` names the device and points at a live ethtool_value.
            if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCETHTOOL, &raw mut req) } != 0 {
                bail!("SIOCETHTOOL on {dev}: {}", std::io::Error::last_os_error());
            }
        }
        Ok(())
    })?
}

struct Topology {
    client: Ns,
    proxy: Ns,
    target: Ns,
}

impl Topology {
    fn new() -> Result<Self> {
        let pid = std::process::id();
        let t = Self {
            client: Ns::new(format!("ebb-c-{pid}"))?,
            proxy: Ns::new(format!("ebb-p-{pid}"))?,
            target: Ns::new(format!("ebb-t-{pid}"))?,
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
            &t.client.0,
        ])?;
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
            &t.target.0,
        ])?;
        for (ns, dev, a) in [
            (&t.client, "c0", "10.253.1.2/24"),
            (&t.proxy, "p0", "10.253.1.1/24"),
            (&t.proxy, "p1", "10.253.2.1/24"),
            (&t.target, "t0", "10.253.2.2/24"),
        ] {
            ns.ip(&["addr", "add", a, "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        t.client
            .ip(&["route", "add", "default", "via", "10.253.1.1"])?;
        t.target
            .ip(&["route", "add", "default", "via", "10.253.2.1"])?;
        t.proxy
            .enter(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))??;
        veth_for_xdp(&t.client, "c0")?;
        veth_for_xdp(&t.target, "t0")?;
        Ok(t)
    }
}

/// A running daemon, the association's control connection and its relay address.
type Proxied = (Server, std::net::TcpStream, SocketAddr);

/// One subject's figures.
#[derive(Debug, Serialize, Clone)]
pub struct UdpResult {
    pub subject: String,
    /// Datagrams per second received by the target, per run.
    pub rates: Vec<f64>,
    /// Whole-machine CPU microseconds per received datagram, per run.
    pub cpu_us: Vec<f64>,
    pub note: Option<String>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// A server in the proxy namespace, stopped when dropped.
struct Server {
    child: Child,
    /// ebsocks' pin directory, removed at the end.
    pin_dir: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = &self.pin_dir {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// `danted` in the proxy namespace, listening on the client side, sending from the target side.
fn start_dante(bin: &Path, t: &Topology, workdir: &Path) -> Result<(Server, SocketAddr)> {
    let conf = workdir.join("udp-danted.conf");
    std::fs::write(
        &conf,
        format!(
            "# generated by ebsocks-bench: the bench's network namespaces only, no authentication\n\
             logoutput: stderr\n\
             internal: 10.253.1.1 port = {DANTE_PORT}\n\
             external: 10.253.2.1\n\
             socksmethod: none\n\
             clientmethod: none\n\
             user.privileged: root\n\
             user.unprivileged: nobody\n\
             client pass {{\n  from: 10.253.0.0/16 to: 0.0.0.0/0\n}}\n\
             socks pass {{\n  from: 10.253.0.0/16 to: 10.253.0.0/16\n  command: udpassociate udpreply\n}}\n"
        ),
    )?;
    let log = std::fs::File::create(workdir.join("udp-danted.log"))?;
    let child = Command::new("nsenter")
        .arg(format!("--net={}", t.proxy.path()))
        .arg(bin)
        .arg("-f")
        .arg(&conf)
        .arg("-p")
        .arg(workdir.join("udp-danted.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting danted through nsenter")?;
    let d = Server {
        child,
        pin_dir: None,
    };
    let addr = SocketAddr::from(([10, 253, 1, 1], DANTE_PORT));
    let t0 = Instant::now();
    while t0.elapsed() < READY {
        let up = t
            .client
            .enter(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
            .is_ok_and(|r| r.is_ok());
        if up {
            return Ok((d, addr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "danted not ready within {READY:?}; see {}",
        workdir.display()
    )
}

fn start_ebsocks(
    bin: &Path,
    t: &Topology,
    workdir: &Path,
    offload: bool,
) -> Result<(Server, SocketAddr)> {
    let tag = if offload { "xdp" } else { "relay" };
    let pin_dir = format!("/sys/fs/bpf/ebsocks-bench-udp-{}-{tag}", std::process::id());
    let conf = workdir.join(format!("udp-{tag}.toml"));
    let addr_file = workdir.join(format!("udp-{tag}.addr"));
    let _ = std::fs::remove_file(&addr_file);
    std::fs::write(
        &conf,
        format!(
            "listen = [\"10.253.1.1:0\"]\npin_dir = \"{pin_dir}\"\ncontrol_socket = \"off\"\n\
             allow_clients = [\"10.253.0.0/16\"]\n[udp]\nxdp_interfaces = [{ifaces}]\noffload = {offload}\n[log]\nlevel = \"warn\"\n",
            ifaces = if offload { "\"p0\", \"p1\"" } else { "" }
        ),
    )?;
    let log = std::fs::File::create(workdir.join(format!("udp-{tag}.log")))?;
    let child = Command::new("nsenter")
        .arg(format!("--net={}", t.proxy.path()))
        .arg(bin)
        .args(["run", "--config"])
        .arg(&conf)
        .arg("--addr-file")
        .arg(&addr_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting ebsocks through nsenter")?;
    let d = Server {
        child,
        pin_dir: Some(pin_dir),
    };
    let t0 = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file) {
            if let Some(a) = text.lines().find_map(|l| l.trim().parse().ok()) {
                return Ok((d, a));
            }
        }
        if t0.elapsed() > READY {
            bail!(
                "ebsocks ({tag}) not ready within {READY:?}; see {}",
                workdir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SOCKS5 UDP ASSOCIATE from the client namespace; returns the control connection and the
/// relay address.
fn associate(
    t: &Topology,
    proxy: SocketAddr,
    client: SocketAddr,
) -> Result<(std::net::TcpStream, SocketAddr)> {
    use std::io::{Read, Write};
    let mut s = t
        .client
        .enter(|| std::net::TcpStream::connect_timeout(&proxy, Duration::from_secs(3)))??;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(&[5, 1, 0])?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m)?;
    let SocketAddr::V4(c) = client else {
        bail!("IPv4 only")
    };
    let mut req = vec![5, 3, 0, 1];
    req.extend_from_slice(&c.ip().octets());
    req.extend_from_slice(&c.port().to_be_bytes());
    s.write_all(&req)?;
    let mut r = [0u8; 10];
    s.read_exact(&mut r)?;
    if r[1] != 0 || r[3] != 1 {
        bail!("UDP ASSOCIATE refused: {r:?}");
    }
    let relay = SocketAddr::from(([r[4], r[5], r[6], r[7]], u16::from_be_bytes([r[8], r[9]])));
    Ok((s, relay))
}

/// Sends `datagram` to `to` from `sock` for `window` (after `warmup`) while the target counts.
fn measure(
    t: &Topology,
    sock: &UdpSocket,
    to: SocketAddr,
    datagram: &[u8],
    target: &UdpSocket,
    warmup: Duration,
    window: Duration,
) -> Result<(f64, f64)> {
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    target.set_read_timeout(Some(Duration::from_millis(100)))?;
    let rx = {
        let target = target.try_clone()?;
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if target.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let tx = {
        let sock = sock.try_clone()?;
        let stop = stop.clone();
        let datagram = datagram.to_vec();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    let _ = sock.send_to(&datagram, to);
                }
            }
        })
    };
    let _ = t;
    std::thread::sleep(warmup);
    let (n0, c0, t0) = (
        received.load(Ordering::Relaxed),
        machine_busy_seconds(),
        Instant::now(),
    );
    std::thread::sleep(window);
    let (n1, c1, dt) = (
        received.load(Ordering::Relaxed),
        machine_busy_seconds(),
        t0.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    let _ = tx.join();
    let _ = rx.join();
    let n = (n1 - n0) as f64;
    if n == 0.0 {
        bail!("nothing arrived");
    }
    Ok((n / dt.as_secs_f64(), (c1 - c0) / n * 1e6))
}

/// Runs the UDP comparison and returns its Markdown section and figures.
pub fn run(
    bin: &Path,
    workdir: &Path,
    seconds: f64,
    repeat: usize,
) -> Result<(String, Vec<UdpResult>)> {
    let t = Topology::new().context("building the netns topology")?;
    let window = Duration::from_secs_f64(seconds);
    let warmup = Duration::from_millis(300);
    let target = t.target.enter(|| UdpSocket::bind("10.253.2.2:0"))??;
    let taddr = target.local_addr()?;
    let client = t.client.enter(|| UdpSocket::bind("10.253.1.2:0"))??;
    let caddr = client.local_addr()?;
    let payload = vec![0x5au8; PAYLOAD];
    let mut socks = vec![0, 0, 0, 1, 10, 253, 2, 2];
    socks.extend_from_slice(&taddr.port().to_be_bytes());
    socks.extend_from_slice(&payload);

    let mut results = Vec::new();
    let mut subjects: Vec<(&str, Option<Proxied>)> = vec![("direct", None)];
    for (name, offload) in [("ebsocks-relay", false), ("ebsocks-xdp", true)] {
        match start_ebsocks(bin, &t, workdir, offload)
            .and_then(|(d, proxy)| associate(&t, proxy, caddr).map(|(c, r)| (d, c, r)))
        {
            Ok(x) => subjects.push((name, Some(x))),
            Err(e) => results.push(UdpResult {
                subject: name.into(),
                rates: Vec::new(),
                cpu_us: Vec::new(),
                note: Some(format!("unavailable: {e:#}")),
            }),
        }
    }
    match crate::subjects::find_program("danted") {
        None => results.push(UdpResult {
            subject: "dante".into(),
            rates: Vec::new(),
            cpu_us: Vec::new(),
            note: Some("not installed".into()),
        }),
        Some(danted) => match start_dante(&danted, &t, workdir)
            .and_then(|(d, proxy)| associate(&t, proxy, caddr).map(|(c, r)| (d, c, r)))
        {
            Ok(x) => subjects.push(("dante", Some(x))),
            Err(e) => results.push(UdpResult {
                subject: "dante".into(),
                rates: Vec::new(),
                cpu_us: Vec::new(),
                note: Some(format!("unavailable: {e:#}")),
            }),
        },
    }
    let mut runs: Vec<UdpResult> = subjects
        .iter()
        .map(|(n, _)| UdpResult {
            subject: (*n).into(),
            rates: Vec::new(),
            cpu_us: Vec::new(),
            note: None,
        })
        .collect();
    for _ in 0..repeat {
        for (i, (name, s)) in subjects.iter().enumerate() {
            if crate::interrupted() {
                break;
            }
            let (to, dgram) = match s {
                None => (taddr, &payload),
                Some((_, _, relay)) => (*relay, &socks),
            };
            match measure(&t, &client, to, dgram, &target, warmup, window) {
                Ok((rate, cpu)) => {
                    eprintln!("udp-512 {name}: {rate:.0} datagrams/s, {cpu:.2} µs CPU each");
                    runs[i].rates.push(rate);
                    runs[i].cpu_us.push(cpu);
                }
                Err(e) => runs[i].note = Some(format!("{e:#}")),
            }
            // Let queues drain between runs.
            std::thread::sleep(Duration::from_millis(200));
            let mut buf = [0u8; 2048];
            target.set_read_timeout(Some(Duration::from_millis(10)))?;
            for _ in 0..100_000 {
                if target.recv(&mut buf).is_err() {
                    break;
                }
            }
        }
    }
    drop(subjects);
    results.splice(0..0, runs);
    let direct = results
        .iter()
        .find(|r| r.subject == "direct")
        .map(|r| median(&r.rates))
        .unwrap_or(f64::NAN);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n## UDP: {PAYLOAD}-byte datagrams, client -> target through the relay (netns + veth)\n"
    );
    let _ = writeln!(
        md,
        "| subject | datagrams/s (median) | × direct | machine CPU µs/datagram | note |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for r in &results {
        let rate = median(&r.rates);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            r.subject,
            if rate.is_nan() {
                "-".into()
            } else {
                format!("{rate:.0}")
            },
            if rate.is_nan() {
                "-".into()
            } else {
                format!("{:.2}", rate / direct)
            },
            if r.cpu_us.is_empty() {
                "-".into()
            } else {
                format!("{:.2}", median(&r.cpu_us))
            },
            r.note.as_deref().unwrap_or("")
        );
    }
    Ok((md, results))
}
