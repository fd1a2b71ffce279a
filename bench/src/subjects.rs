//! The things being measured: direct connections, ebsocks on each data path, and other SOCKS5
//! servers when installed. Servers are spawned on loopback ports, watched, and stopped with
//! SIGTERM at the end; a workload that must see a fresh process restarts them the same way.

use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::procfs::{same_process, ProcTree};

/// How long a server may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Daemon {
    child: Child,
    pub tree: ProcTree,
    pub log: PathBuf,
    exited: Option<String>,
    /// What the server removes itself when it exits cleanly (ebsocks' pin directory and
    /// control socket), removed here when it had to be killed.
    leftovers: Vec<PathBuf>,
}

pub struct Subject {
    pub name: String,
    /// The SOCKS5 server to go through; None for direct connections.
    pub proxy: Option<SocketAddr>,
    pub daemon: Option<Daemon>,
    pub info: SubjectInfo,
    /// How the server was started, to start it again; None for direct.
    start: Option<Start>,
}

/// How to start a server subject.
#[derive(Debug, Clone)]
pub enum Start {
    Ebsocks(EbsocksSpec),
    Microsocks { workdir: PathBuf },
    Dante { workdir: PathBuf },
}

impl Start {
    /// Starts the server; the subject is unavailable, with the reason, when that fails.
    pub fn start(&self) -> Subject {
        let mut s = match self {
            Start::Ebsocks(spec) => start_ebsocks(spec),
            Start::Microsocks { workdir } => start_microsocks(workdir),
            Start::Dante { workdir } => start_dante(workdir),
        };
        s.start = Some(self.clone());
        s
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct SubjectInfo {
    pub name: String,
    pub available: bool,
    /// Why the subject was not measured (or stopped being measured).
    pub unavailable_reason: Option<String>,
    pub command: Option<String>,
    pub version: Option<String>,
    pub listen: Option<String>,
    /// How the server ended when it was stopped.
    pub exit: Option<String>,
    pub log: Option<String>,
    pub notes: Vec<String>,
    /// Times the server was stopped and started again (idle-10k starts from a fresh process).
    pub restarts: usize,
}

impl Subject {
    pub fn direct() -> Subject {
        Subject {
            name: "direct".into(),
            proxy: None,
            daemon: None,
            start: None,
            info: SubjectInfo {
                name: "direct".into(),
                available: true,
                ..Default::default()
            },
        }
    }

    pub fn unavailable(name: &str, reason: String) -> Subject {
        Subject {
            name: name.into(),
            proxy: None,
            daemon: None,
            start: None,
            info: SubjectInfo {
                name: name.into(),
                available: false,
                unavailable_reason: Some(reason),
                ..Default::default()
            },
        }
    }

    pub fn available(&self) -> bool {
        self.info.available
    }

    /// Marks the subject as failed for the rest of the run.
    pub fn fail(&mut self, reason: String) {
        self.info.available = false;
        self.info.unavailable_reason = Some(reason);
    }

    /// Checks that the server process is still running; if not, marks the subject failed and
    /// returns the reason.
    pub fn check_alive(&mut self) -> Option<String> {
        let d = self.daemon.as_mut()?;
        let why = d.exited_early()?;
        self.fail(why.clone());
        Some(why)
    }

    /// Stops the server and starts a new one the same way (on a new port), so that the next run
    /// sees no memory that earlier runs left in the process (allocators keep freed memory and
    /// hand it to the next sessions, which then seem to cost nothing). Nothing to do for direct.
    /// When the new server does not start, the subject is marked failed.
    pub fn restart(&mut self) -> Result<(), String> {
        let Some(start) = self.start.clone() else {
            return Ok(());
        };
        if let Some(mut d) = self.daemon.take() {
            let exit = d.stop();
            if exit != "SIGTERM: exited with status 0" {
                self.info
                    .notes
                    .push(format!("stopped for a restart: {exit}"));
            }
        }
        let fresh = start.start();
        if !fresh.available() {
            let why = format!(
                "restart failed: {}",
                fresh.info.unavailable_reason.unwrap_or_default()
            );
            self.fail(why.clone());
            return Err(why);
        }
        self.proxy = fresh.proxy;
        self.daemon = fresh.daemon;
        self.info.listen = fresh.info.listen;
        self.info.restarts += 1;
        Ok(())
    }

    /// Stops the server (SIGTERM, then SIGKILL after a grace period) and records how it ended.
    pub fn stop(&mut self) {
        if let Some(d) = self.daemon.as_mut() {
            self.info.exit = Some(d.stop());
        }
    }
}

impl Daemon {
    fn spawn(mut cmd: Command, log: PathBuf) -> Result<Daemon, String> {
        // Appended to: a restarted server writes after its predecessor.
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe. The server gets SIGTERM if the benchmark dies without
        // stopping it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))?;
        let tree = ProcTree::new(child.id() as i32);
        Ok(Daemon {
            child,
            tree,
            log,
            exited: None,
            leftovers: Vec::new(),
        })
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(12)..].join("\n");
        if tail.is_empty() {
            "(no output)".into()
        } else {
            tail
        }
    }

    /// Some(reason) when the process has exited on its own.
    fn exited_early(&mut self) -> Option<String> {
        if self.exited.is_some() {
            return self.exited.clone();
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                let why = format!(
                    "{} unexpectedly; last output:\n{}",
                    describe(st),
                    self.log_tail()
                );
                self.exited = Some(why.clone());
                Some(why)
            }
            _ => None,
        }
    }

    /// Polls `ready` until it yields an address, the process exits, or the deadline passes.
    fn wait_ready(
        &mut self,
        mut ready: impl FnMut() -> Option<SocketAddr>,
    ) -> Result<SocketAddr, String> {
        let end = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(why) = self.exited_early() {
                return Err(why);
            }
            if let Some(a) = ready() {
                return Ok(a);
            }
            if Instant::now() >= end || crate::interrupted() {
                let tail = self.log_tail();
                self.stop();
                return Err(format!(
                    "not ready after {} s; last output:\n{tail}",
                    START_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) -> String {
        if let Some(e) = &self.exited {
            return e.clone();
        }
        let members = self.tree.pids();
        let pid = self.child.id() as i32;
        // SAFETY: plain kill(2) on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        // Forking servers: their children get SIGTERM too, as from a terminal's Ctrl-C.
        for &(p, start) in members.iter().filter(|(p, _)| *p != pid) {
            if same_process(p, start) {
                // SAFETY: kill(2) on a process of this server's tree, identified by pid and
                // start time.
                unsafe { libc::kill(p, libc::SIGTERM) };
            }
        }
        let end = Instant::now() + STOP_TIMEOUT;
        let mut status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break format!("SIGTERM: {}", describe(st)),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let mut why = format!(
                        "did not exit within {} s of SIGTERM, killed",
                        STOP_TIMEOUT.as_secs()
                    );
                    for p in self.leftovers.iter().filter(|p| p.exists()) {
                        let removed = if p.is_dir() {
                            fs::remove_dir_all(p)
                        } else {
                            fs::remove_file(p)
                        };
                        why.push_str(&match removed {
                            Ok(()) => format!("; removed its {}", p.display()),
                            Err(e) => format!("; left its {}: {e}", p.display()),
                        });
                    }
                    break why;
                }
            }
        };
        // Children that outlived their parent (forking servers) get one more second.
        let children: Vec<(i32, u64)> = members.into_iter().filter(|(p, _)| *p != pid).collect();
        let end = Instant::now() + Duration::from_secs(1);
        while children.iter().any(|&(p, start)| same_process(p, start)) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut leftover = 0;
        for &(p, start) in &children {
            if same_process(p, start) {
                // SAFETY: kill(2) on a process of this server's tree, identified by pid and
                // start time.
                unsafe { libc::kill(p, libc::SIGKILL) };
                leftover += 1;
            }
        }
        if leftover > 0 {
            status.push_str(&format!(
                "; {leftover} child process(es) left behind, killed"
            ));
        }
        self.exited = Some(status.clone());
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn describe(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => st.to_string(),
    }
}

/// A free loopback port (bound and released; a small race with other programs is accepted).
fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("find a free port: {e}"))
}

fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Looks a program up in PATH (and the sbin directories, which root's PATH may lack).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn package_version(pkg: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !v.is_empty()).then(|| format!("{pkg} {v}"))
}

fn finish(
    name: &str,
    mut d: Daemon,
    cmd: String,
    version: Option<String>,
    ready: Result<SocketAddr, String>,
) -> Subject {
    let log = Some(d.log.display().to_string());
    match ready {
        Ok(addr) => Subject {
            name: name.into(),
            proxy: Some(addr),
            start: None,
            info: SubjectInfo {
                name: name.into(),
                available: true,
                command: Some(cmd),
                version,
                listen: Some(addr.to_string()),
                log,
                ..Default::default()
            },
            daemon: Some(d),
        },
        Err(why) => {
            let exit = d.stop();
            let mut s = Subject::unavailable(name, format!("failed to start: {why}"));
            s.info.command = Some(cmd);
            s.info.version = version;
            s.info.exit = Some(exit);
            s.info.log = log;
            s
        }
    }
}

/// Makes sure a BPF filesystem is mounted at /sys/fs/bpf, where ebsocks pins its maps.
/// Returns a note when it had to mount it, an error text when that failed.
pub fn ensure_bpffs() -> Result<Option<String>, String> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let dir = c"/sys/fs/bpf";
    // SAFETY: statfs is plain old data, filled in by statfs(2) from a valid C string path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(dir.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(None);
    }
    // SAFETY: mount(2) with valid C strings and no data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            dir.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(Some(
            "mounted a BPF filesystem at /sys/fs/bpf (ebsocks pins its maps there)".into(),
        ))
    } else {
        Err(format!(
            "/sys/fs/bpf is not a BPF filesystem and mounting one failed: {}",
            std::io::Error::last_os_error()
        ))
    }
}

#[derive(Debug, Clone)]
pub struct EbsocksSpec {
    pub binary: PathBuf,
    pub data_path: String,
    pub workdir: PathBuf,
    pub log_level: String,
    pub pin_root: String,
    /// `limits.max_sessions`. The daemon's default, (open-files limit − 576) / 2, keeps room
    /// for its pipe pool; the bench passes the open-files limit, so that descriptors are what
    /// runs out.
    pub max_sessions: u64,
}

/// `ebsocks run` on a loopback port with one data path; readiness is the address file. The
/// configuration is the embedded default except `control_socket` and `limits.max_sessions`.
fn start_ebsocks(spec: &EbsocksSpec) -> Subject {
    let name = format!("ebsocks-{}", spec.data_path);
    if !spec.binary.is_file() {
        return Subject::unavailable(
            &name,
            format!("binary not found: {}", spec.binary.display()),
        );
    }
    let addr_file = spec.workdir.join(format!("{name}.addr"));
    let _ = fs::remove_file(&addr_file);
    let conf = spec.workdir.join(format!("{name}.toml"));
    let pin_dir = format!("{}-{}", spec.pin_root, spec.data_path);
    // Named after the pin directory, as the daemon's default is, so that `ebsocks stats
    // --pin-dir` finds it; chosen here so that the bench knows what to remove if it has to kill
    // the daemon.
    let control = format!(
        "/run/ebsocks/{}.sock",
        Path::new(&pin_dir)
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
    );
    let text = format!(
        "# generated by ebsocks-bench: the embedded defaults, but a known control socket and a\n\
         # session limit above what the descriptor limit allows, so that idle-10k finds the\n\
         # descriptor limit\n\
         control_socket = \"{control}\"\n\
         [limits]\nmax_sessions = {}\n",
        spec.max_sessions
    );
    if let Err(e) = fs::write(&conf, text) {
        return Subject::unavailable(&name, format!("write {}: {e}", conf.display()));
    }
    let args = [
        "run",
        "--config",
        conf.to_str().unwrap_or_default(),
        "--listen",
        "127.0.0.1:0",
        "--data-path",
        &spec.data_path,
        "--pin-dir",
        &pin_dir,
        "--addr-file",
        addr_file.to_str().unwrap_or_default(),
    ];
    let cmd_line = format!(
        "RUST_LOG={} {} {}",
        spec.log_level,
        spec.binary.display(),
        args.join(" ")
    );
    let mut cmd = Command::new(&spec.binary);
    cmd.args(args).env("RUST_LOG", &spec.log_level);
    let mut d = match Daemon::spawn(cmd, spec.workdir.join(format!("{name}.log"))) {
        Ok(d) => d,
        Err(e) => return Subject::unavailable(&name, e),
    };
    d.leftovers = vec![PathBuf::from(&pin_dir), PathBuf::from(control)];
    let ready = d.wait_ready(|| {
        let text = fs::read_to_string(&addr_file).ok()?;
        let addrs: Vec<SocketAddr> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        addrs
            .iter()
            .copied()
            .find(|a| a.is_ipv4() && a.ip().is_loopback())
    });
    let mut s = finish(&name, d, cmd_line, None, ready);
    if s.available() && Path::new(&pin_dir).exists() {
        s.info.notes.push(format!("maps pinned in {pin_dir}"));
    }
    s
}

/// `microsocks -i 127.0.0.1 -p PORT`.
fn start_microsocks(workdir: &Path) -> Subject {
    let name = "microsocks";
    let Some(bin) = find_program("microsocks") else {
        return Subject::unavailable(name, "not installed (apt-get install microsocks)".into());
    };
    let port = match free_port() {
        Ok(p) => p,
        Err(e) => return Subject::unavailable(name, e),
    };
    let port_s = port.to_string();
    let args = ["-i", "127.0.0.1", "-p", port_s.as_str()];
    let cmd_line = format!("{} {}", bin.display(), args.join(" "));
    let mut cmd = Command::new(&bin);
    cmd.args(args);
    let mut d = match Daemon::spawn(cmd, workdir.join("microsocks.log")) {
        Ok(d) => d,
        Err(e) => return Subject::unavailable(name, e),
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let ready = d.wait_ready(|| accepts(addr).then_some(addr));
    finish(name, d, cmd_line, package_version("microsocks"), ready)
}

/// `danted -f CONF` in the foreground, with a generated loopback-only configuration.
fn start_dante(workdir: &Path) -> Subject {
    let name = "dante";
    let Some(bin) = find_program("danted") else {
        return Subject::unavailable(name, "not installed (apt-get install dante-server)".into());
    };
    let port = match free_port() {
        Ok(p) => p,
        Err(e) => return Subject::unavailable(name, e),
    };
    let conf = workdir.join("danted.conf");
    let pidfile = workdir.join("danted.pid");
    let text = format!(
        "# generated by ebsocks-bench: loopback only, no authentication\n\
         logoutput: stderr\n\
         internal: 127.0.0.1 port = {port}\n\
         external: 127.0.0.1\n\
         socksmethod: none\n\
         clientmethod: none\n\
         user.privileged: root\n\
         user.unprivileged: nobody\n\
         client pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n}}\n\
         socks pass {{\n  from: 127.0.0.0/8 to: 127.0.0.0/8\n  command: connect\n}}\n"
    );
    if let Err(e) = fs::write(&conf, text) {
        return Subject::unavailable(name, format!("write {}: {e}", conf.display()));
    }
    let args = [
        "-f".to_string(),
        conf.display().to_string(),
        "-p".to_string(),
        pidfile.display().to_string(),
    ];
    let cmd_line = format!("{} {}", bin.display(), args.join(" "));
    let mut cmd = Command::new(&bin);
    cmd.args(&args);
    let mut d = match Daemon::spawn(cmd, workdir.join("danted.log")) {
        Ok(d) => d,
        Err(e) => return Subject::unavailable(name, e),
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let ready = d.wait_ready(|| accepts(addr).then_some(addr));
    finish(name, d, cmd_line, package_version("dante-server"), ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_server_leaves_nothing_it_would_remove_itself() {
        let dir = std::env::temp_dir().join(format!("ebsocks-bench-test-{}", std::process::id()));
        let (pins, socket) = (dir.join("pins"), dir.join("control.sock"));
        fs::create_dir_all(pins.join("inner")).unwrap();
        fs::write(&socket, b"").unwrap();
        let mut cmd = Command::new("sh");
        // Ignores SIGTERM, as a daemon stuck in its drain does; says so once it does, so that
        // the SIGTERM cannot come before the trap.
        cmd.args(["-c", "trap '' TERM; echo trapped; exec sleep 30"]);
        let log = dir.join("log");
        let mut d = Daemon::spawn(cmd, log.clone()).unwrap();
        let t0 = std::time::Instant::now();
        while !fs::read_to_string(&log).is_ok_and(|l| l.contains("trapped")) {
            assert!(t0.elapsed().as_secs() < 10, "the shell never set its trap");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        d.leftovers = vec![pins.clone(), socket.clone()];
        let status = d.stop();
        assert!(status.contains("killed"), "{status}");
        assert!(status.contains("removed its"), "{status}");
        assert!(!pins.exists() && !socket.exists(), "{status}");
        let _ = fs::remove_dir_all(&dir);
    }
}
