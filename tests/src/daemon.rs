//! Starts and stops an `ebsocks` daemon per test.

use std::{
    fmt,
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use crate::stats::Stats;

/// Bound for the daemon to write its address file.
pub const READY_LIMIT: Duration = Duration::from_secs(20);
/// Bound for the daemon to exit after SIGTERM.
pub const EXIT_LIMIT: Duration = Duration::from_secs(10);
/// Bound for one `ebsocks stats` run.
pub const STATS_LIMIT: Duration = Duration::from_secs(10);

/// Where the daemon binary is: `EBSOCKS_BIN`, else the workspace's release
/// build, else its debug build (the debug path is returned when neither
/// exists, for the skip message).
pub fn daemon_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("EBSOCKS_BIN") {
        return PathBuf::from(p);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let release = target.join("release/ebsocks");
    if release.is_file() {
        return release;
    }
    target.join("debug/ebsocks")
}

/// `data_path` of the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPath {
    Auto,
    Sockmap,
    Splice,
    Copy,
}

impl DataPath {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Sockmap => "sockmap",
            Self::Splice => "splice",
            Self::Copy => "copy",
        }
    }

    /// Feature name for [`crate::require_privileged`].
    pub fn feature(self) -> String {
        format!("data path {}", self.as_str())
    }
}

impl fmt::Display for DataPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to start a daemon.
#[derive(Clone, Debug)]
pub struct DaemonOpts {
    pub data_path: DataPath,
    /// `listen` of the config; port 0 lets the kernel choose.
    pub listen: Vec<String>,
    /// Appended after the top-level keys, e.g. "[timeouts]\nnegotiation = \"1s\"".
    pub extra_toml: String,
    /// Whether to write `allow_clients = ["127.0.0.0/8", "::1/128"]`. The daemon refuses it
    /// next to `[[client_rule]]` tables, so tests with client rules turn it off.
    pub allow_clients: bool,
    /// Pin directory to use instead of a fresh one. The daemon object does not remove it on
    /// drop: the test owns it (e.g. to start a second daemon on the same directory).
    pub pin_dir: Option<PathBuf>,
    /// Program and arguments the daemon is started through, e.g. `["prlimit", "--nofile=64:64"]`
    /// (the program must exec the daemon, so the pid stays the daemon's).
    pub wrapper: Vec<String>,
    /// Hand the test's temporary directory (config file, address file) to this uid and gid,
    /// for a daemon that switches users and must still read its config on SIGHUP.
    pub dir_owner: Option<(u32, u32)>,
}

impl Default for DaemonOpts {
    fn default() -> Self {
        Self {
            data_path: DataPath::Auto,
            listen: vec!["127.0.0.1:0".into()],
            extra_toml: String::new(),
            allow_clients: true,
            pin_dir: None,
            wrapper: Vec::new(),
            dir_owner: None,
        }
    }
}

impl DaemonOpts {
    pub fn path(data_path: DataPath) -> Self {
        Self {
            data_path,
            ..Self::default()
        }
    }
}

/// A running daemon; dropping it stops it (SIGTERM, then SIGKILL after
/// [`EXIT_LIMIT`]) and removes pins it left. [`Daemon::stop`] is the checked
/// way to end a test.
pub struct Daemon {
    child: Option<Child>,
    addrs: Vec<SocketAddr>,
    pin_dir: PathBuf,
    /// Whether [`Drop`] removes `pin_dir` (false when the test chose it).
    owns_pin_dir: bool,
    /// The top-level keys of the config file (listen, data_path, pin_dir, allow_clients),
    /// kept so that [`Daemon::rewrite_config`] changes only the rest.
    header: String,
    config: PathBuf,
    dir: tempfile::TempDir,
}

/// `s` as a TOML basic string (quoted and escaped).
pub fn toml_str(s: &str) -> String {
    // A JSON string literal is a valid TOML basic string.
    serde_json::Value::String(s.to_owned()).to_string()
}

impl Daemon {
    /// Writes a config, spawns `ebsocks run --config F --addr-file F2` and
    /// waits (at most [`READY_LIMIT`]) for the address file.
    pub fn start(opts: DaemonOpts) -> Self {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let owns_pin_dir = opts.pin_dir.is_none();
        let pin_dir = opts.pin_dir.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "/sys/fs/bpf/ebsocks-test-{}-{n}",
                std::process::id()
            ))
        });
        if owns_pin_dir && pin_dir.exists() {
            let _ = std::fs::remove_dir_all(&pin_dir);
        }
        let dir = tempfile::Builder::new()
            .prefix("ebsocks-test-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("ebsocks.toml");
        let addr_file = dir.path().join("addrs");
        let listen: Vec<String> = opts.listen.iter().map(|a| toml_str(a)).collect();
        let mut header = format!(
            "listen = [{}]\ndata_path = {}\npin_dir = {}\n",
            listen.join(", "),
            toml_str(opts.data_path.as_str()),
            toml_str(&pin_dir.to_string_lossy()),
        );
        if opts.allow_clients {
            header.push_str("allow_clients = [\"127.0.0.0/8\", \"::1/128\"]\n");
        }
        let text = format!("{header}{}\n", opts.extra_toml);
        std::fs::write(&config, &text).expect("write config");
        if let Some((uid, gid)) = opts.dir_owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown temp dir");
            std::os::unix::fs::chown(&config, Some(uid), Some(gid)).expect("chown config");
        }
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr log");
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).expect("stdout log");
        let bin = daemon_binary();
        let mut cmd = match opts.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--addr-file")
            .arg(&addr_file)
            // The captured stderr is a file, so the logs must come plain without being told
            // (the tests that match log lines check it).
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // SAFETY: prctl is async-signal-safe. The daemon gets SIGTERM if the
        // spawning thread dies, so a killed test run leaves no daemon behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut d = Self {
            child: Some(child),
            addrs: Vec::new(),
            pin_dir,
            owns_pin_dir,
            header,
            config,
            dir,
        };
        d.addrs = d.wait_ready(&addr_file, &text);
        d
    }

    fn wait_ready(&mut self, addr_file: &Path, config: &str) -> Vec<SocketAddr> {
        let t0 = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(addr_file) {
                let addrs: Vec<SocketAddr> = text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| {
                        l.trim()
                            .parse()
                            .unwrap_or_else(|e| panic!("address file line {l:?}: {e}"))
                    })
                    .collect();
                assert!(!addrs.is_empty(), "address file is empty");
                return addrs;
            }
            let child = self.child.as_mut().expect("child");
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "daemon exited with {status} before writing its address file\nconfig:\n{config}\nstderr:\n{}",
                    self.stderr_log()
                );
            }
            if t0.elapsed() > READY_LIMIT {
                panic!(
                    "daemon did not write its address file within {READY_LIMIT:?}\nconfig:\n{config}\nstderr:\n{}",
                    self.stderr_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Every listening address, in address-file order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon stopped").id()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Runs `ebsocks stats --json --pin-dir DIR` and parses its output.
    pub fn stats_json(&self) -> serde_json::Value {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let out_path = self.dir.path().join(format!("stats-{n}.json"));
        let err_path = self.dir.path().join(format!("stats-{n}.err"));
        let out = std::fs::File::create(&out_path).expect("stats output file");
        let err = std::fs::File::create(&err_path).expect("stats error file");
        let mut child = Command::new(daemon_binary())
            .args(["stats", "--json", "--pin-dir"])
            .arg(&self.pin_dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn ebsocks stats");
        let status = wait_bounded(&mut child, STATS_LIMIT);
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        let _ = std::fs::remove_file(&out_path);
        let _ = std::fs::remove_file(&err_path);
        match status {
            Some(s) if s.success() => {}
            Some(s) => panic!(
                "`ebsocks stats --json` exited with {s}\nstdout:\n{stdout}\nstderr:\n{stderr}"
            ),
            None => panic!("`ebsocks stats --json` did not finish within {STATS_LIMIT:?}"),
        }
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("`ebsocks stats --json` printed invalid JSON ({e}):\n{stdout}")
        })
    }

    /// [`Self::stats_json`] wrapped in typed accessors.
    pub fn stats(&self) -> Stats {
        Stats {
            json: self.stats_json(),
        }
    }

    /// The config file the daemon was started with (and re-reads on SIGHUP).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Replaces the config file with the same top-level keys (listen, data_path, pin_dir,
    /// allow_clients) followed by `extra_toml`. The file is replaced atomically (rename), so
    /// a reload never reads half of it. The daemon sees it only after [`Daemon::sighup`].
    pub fn rewrite_config(&self, extra_toml: &str) {
        self.write_config_raw(&format!("{}{extra_toml}\n", self.header));
    }

    /// Replaces the config file with exactly `text` (e.g. an invalid one), atomically.
    pub fn write_config_raw(&self, text: &str) {
        let tmp = self.dir.path().join("ebsocks.toml.new");
        std::fs::write(&tmp, text).expect("write new config");
        std::fs::rename(&tmp, &self.config).expect("rename new config into place");
    }

    /// Sends SIGHUP (reload the config file).
    pub fn sighup(&self) {
        self.signal(libc::SIGHUP);
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid");
        // SAFETY: `pid` is our own child, not yet reaped (the Child is still held).
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({sig}): {}", std::io::Error::last_os_error());
    }

    /// Waits at most `limit` for the daemon to exit (after a signal the test sent) and returns
    /// its status; None while it still runs. Once it returned a status the daemon is gone and
    /// [`Daemon::stop`] must not be called.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("daemon stopped");
        let status = wait_bounded_no_kill(child, limit)?;
        self.child = None;
        Some(status)
    }

    /// The exit status if the daemon has exited, `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .expect("daemon stopped")
            .try_wait()
            .expect("try_wait")
    }

    /// Sends SIGTERM and checks that the daemon exits with status 0 within [`EXIT_LIMIT`].
    /// For a daemon that could not pin its maps: the pin directory is another's.
    pub fn stop_unpinned(mut self) {
        self.terminate_checked();
    }

    fn terminate_checked(&mut self) {
        let mut child = self.child.take().expect("daemon already stopped");
        let status = terminate(&mut child);
        assert_eq!(
            status.code(),
            Some(0),
            "daemon exited with {status} after SIGTERM, expected status 0\nstderr:\n{}",
            self.stderr_log()
        );
    }

    /// Sends SIGTERM and checks a clean shutdown: exit status 0 within
    /// [`EXIT_LIMIT`] and the pin directory removed.
    pub fn stop(mut self) {
        self.terminate_checked();
        assert!(
            !self.pin_dir.exists(),
            "clean shutdown left the pin directory {} behind: {:?}\nstderr:\n{}",
            self.pin_dir.display(),
            std::fs::read_dir(&self.pin_dir)
                .map(|d| d
                    .filter_map(Result::ok)
                    .map(|e| e.file_name())
                    .collect::<Vec<_>>())
                .unwrap_or_default(),
            self.stderr_log()
        );
    }
}

/// Polls `child` for at most `limit`, then kills it.
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let status = wait_bounded_no_kill(child, limit);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

/// SIGTERM, wait [`EXIT_LIMIT`], then SIGKILL. A SIGKILL shows as a status
/// without exit code.
fn terminate(child: &mut Child) -> ExitStatus {
    if let Some(s) = child.try_wait().expect("try_wait") {
        return s;
    }
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: `pid` is our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if let Some(s) = wait_bounded_no_kill(child, EXIT_LIMIT) {
        return s;
    }
    let _ = child.kill();
    child.wait().expect("wait after SIGKILL")
}

fn wait_bounded_no_kill(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() <= limit {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.stderr_log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(200)..];
            eprintln!(
                "---- ebsocks stderr (last {} lines) ----\n{}\n----",
                tail.len(),
                tail.join("\n")
            );
        }
        if let Some(mut child) = self.child.take() {
            let status = terminate(&mut child);
            if !std::thread::panicking() && status.code() != Some(0) {
                eprintln!("ebsocks exited with {status} when the test dropped it");
            }
        }
        if self.owns_pin_dir && self.pin_dir.exists() {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}
