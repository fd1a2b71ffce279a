//! `user = "nobody"`: after start-up the daemon runs as that user with no capability at all
//! (every thread), and still splices in the kernel, reloads on SIGHUP and removes its pins and
//! control socket at exit.

use std::{os::unix::fs::PermissionsExt as _, time::Duration};

use proxy_integration::{
    checks::{assert_path_used, wait_log, wait_sessions_drained},
    exchange,
    procfs::{self, cap_mask, status_field},
    require_privileged, send_and_recv, socks, within, Daemon, DaemonOpts, DataPath, Echo, Plan,
};

const LIMIT: Duration = Duration::from_secs(60);
const NOBODY: u32 = 65534;

fn nobody_group() -> u32 {
    // The primary group of `nobody` (nogroup on Debian, nobody elsewhere).
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"nobody")).then(|| f[3].parse().expect("gid"))
        })
        .expect("no user nobody in /etc/passwd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_nobody_without_capabilities_and_still_splices() {
    if !require_privileged("data path sockmap") {
        return;
    }
    let gid = nobody_group();
    let control = std::env::temp_dir().join(format!("ebsocks-priv-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&control);
    let user = format!(
        "user = \"nobody\"\ncontrol_socket = {}\n",
        proxy_integration::daemon::toml_str(&control.to_string_lossy())
    );
    // SO_BINDTODEVICE on each outgoing socket and pacing on both sockets of a session are
    // done after the switch: they must work without CAP_NET_RAW or CAP_NET_ADMIN.
    let extra = format!("{user}[outgoing]\ninterface = \"lo\"\n[limits]\nbandwidth = \"40gbit\"\n");
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: extra.clone(),
        dir_owner: Some((NOBODY, gid)),
        ..DaemonOpts::path(DataPath::Sockmap)
    });
    let pid = daemon.pid();

    // Every thread, not only the main one: capabilities are per thread in Linux.
    let threads = procfs::thread_statuses(pid);
    assert!(threads.len() > 1, "expected worker threads: {threads:?}");
    for (tid, st) in &threads {
        let ids = |f| {
            status_field(st, f)
                .split_whitespace()
                .map(|v| v.parse::<u32>().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("Uid:"), [NOBODY; 4], "thread {tid} Uid:\n{st}");
        assert_eq!(ids("Gid:"), [gid; 4], "thread {tid} Gid:\n{st}");
        assert_eq!(ids("Groups:"), [gid], "thread {tid} Groups:\n{st}");
        for f in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(cap_mask(st, f), 0, "thread {tid} {f}:\n{st}");
        }
        assert_eq!(status_field(st, "NoNewPrivs:"), "1", "thread {tid}:\n{st}");
    }
    // The pins and the control socket now belong to nobody, so it can remove them at exit.
    use std::os::unix::fs::MetadataExt as _;
    let pins = std::fs::metadata(daemon.pin_dir()).expect("pin dir");
    assert_eq!((pins.uid(), pins.gid()), (NOBODY, gid));
    let sock = std::fs::metadata(&control).expect("control socket");
    assert_eq!(sock.uid(), NOBODY);

    // The sockmap path works without CAP_BPF: map updates on descriptors the daemon holds.
    let echo = Echo::start("127.0.0.1:0").await;
    let mut s = socks::connect(daemon.addr(), echo.addr).await;
    within(
        LIMIT,
        "echo",
        send_and_recv(&mut s, (1, 16 << 20), (1, 16 << 20)),
    )
    .await
    .unwrap_or_else(|e| panic!("transfer as nobody: {e}"));
    assert_path_used(&daemon, DataPath::Sockmap, 1).await;
    let stats = daemon.stats();
    assert_eq!(stats.counter("sessions_fallback"), 0, "{stats}");
    assert!(stats.traffic("tcp", "sockmap", "up") >= 16 << 20, "{stats}");
    within(LIMIT, "close", exchange(&mut s, Plan::close()))
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));

    let log = daemon.stderr_log();
    assert!(
        !log.contains("cannot set the pacing rate"),
        "pacing failed as nobody:\n{log}"
    );
    assert!(
        !log.contains("cannot read"),
        "a readable config was warned about:\n{log}"
    );

    // SIGHUP still reloads: the config file is readable by nobody.
    daemon.rewrite_config(&format!("{extra}[timeouts]\nidle = \"2m\"\n"));
    daemon.sighup();
    wait_log(&daemon, "configuration reloaded", 1).await;
    let mut s = socks::connect(daemon.addr(), echo.addr).await;
    within(
        LIMIT,
        "echo",
        send_and_recv(&mut s, (2, 1 << 20), (2, 1 << 20)),
    )
    .await
    .unwrap_or_else(|e| panic!("transfer after reload: {e}"));
    drop(s);
    wait_sessions_drained(&daemon).await;

    // `stop` checks exit status 0 and that the pin directory is gone.
    daemon.stop();
    assert!(!control.exists(), "control socket left behind");
}

/// A users file the unprivileged user cannot read (SIGHUP re-reads it with the configuration):
/// the daemon says so at start-up, the SIGHUP that fails says why, and once the file is
/// readable by that user the next one reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_user_cannot_read_is_named_at_start_up() {
    if !require_privileged("privilege drop") {
        return;
    }
    // Root's, mode 0600.
    let users = proxy_integration::UsersFile::new(&[("alice", "pw")]);
    std::fs::set_permissions(users.path(), std::fs::Permissions::from_mode(0o600))
        .expect("chmod the users file");
    let extra = format!(
        "user = \"nobody\"\ncontrol_socket = \"off\"\n{}",
        users.auth_toml(&["username"])
    );
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: extra.clone(),
        dir_owner: Some((NOBODY, nobody_group())),
        ..DaemonOpts::default()
    });
    let file = users.path().display().to_string();
    let warning = format!("nobody cannot read {file}, so SIGHUP will not reload");
    let log = daemon.stderr_log();
    assert_eq!(
        log.matches(&warning).count(),
        1,
        "no start-up warning:\n{log}"
    );
    assert_eq!(log.matches("cannot read").count(), 1, "{log}");
    daemon.sighup();
    wait_log(&daemon, "not reloaded", 1).await;
    let log = daemon.stderr_log();
    assert!(
        log.contains(&format!(
            "(nobody cannot read {file}: the daemon runs as that user since it dropped privileges)"
        )),
        "the failed reload does not say why:\n{log}"
    );
    std::os::unix::fs::chown(users.path(), Some(NOBODY), None).expect("chown the users file");
    daemon.rewrite_config(&format!("{extra}[timeouts]\nidle = \"2m\"\n"));
    daemon.sighup();
    wait_log(&daemon, "configuration reloaded", 1).await;
    daemon.stop();
}

/// A `user` that does not exist stops the start-up: a daemon told to drop root must not go on
/// as root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_user_is_fatal() {
    if !require_privileged("privilege drop") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let pin = format!("/sys/fs/bpf/ebsocks-test-nouser-{}", std::process::id());
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:0\"]\npin_dir = \"{pin}\"\ncontrol_socket = \"off\"\nuser = \"no-such-ebsocks-user\"\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(proxy_integration::daemon::daemon_binary())
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ebsocks");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no-such-ebsocks-user"), "{stderr}");
    assert!(
        !std::path::Path::new(&pin).exists(),
        "pins left after a failed start"
    );
}

/// The capabilities `dist/ebsocks.service` bounds the daemon to, as setpriv names them.
fn unit_capabilities() -> Vec<String> {
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/ebsocks.service");
    let text = std::fs::read_to_string(&unit).unwrap_or_else(|e| panic!("{}: {e}", unit.display()));
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet= in the unit");
    line.split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .expect("CAP_ name")
                .to_ascii_lowercase()
        })
        .collect()
}

/// Starts the daemon with `user = "nobody"` under exactly `caps` (setpriv bounding set, no
/// inheritable or ambient capabilities) and reports whether it came up on the sockmap path.
fn sockmap_with(caps: &[String]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    // nobody writes the address file after the switch.
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(nobody_group())).unwrap();
    let cfg = dir.path().join("c.toml");
    let addr = dir.path().join("addr");
    let pin = format!("/sys/fs/bpf/ebsocks-test-caps-{}", std::process::id());
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:0\"]\ndata_path = \"sockmap\"\npin_dir = \"{pin}\"\n\
             control_socket = \"off\"\nuser = \"nobody\"\n"
        ),
    )
    .unwrap();
    let bounding: String = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let log = dir.path().join("log");
    let mut child = std::process::Command::new("setpriv")
        .args(["--inh-caps=-all", "--ambient-caps=-all"])
        .arg(format!("--bounding-set={bounding}"))
        .arg("--")
        .arg(proxy_integration::daemon::daemon_binary())
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .arg("--addr-file")
        .arg(&addr)
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run setpriv");
    let t0 = std::time::Instant::now();
    let outcome = loop {
        if addr.exists() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            break if text.contains("data_path=\"sockmap\"") {
                Ok(())
            } else {
                Err(format!("came up without the sockmap path:\n{text}"))
            };
        }
        if let Some(st) = child.try_wait().unwrap() {
            break Err(format!(
                "exited with {st}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        if t0.elapsed() > Duration::from_secs(20) {
            break Err("not ready within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&pin);
    outcome
}

/// The unit's bounding set is exactly enough: with it the daemon loads the sockmap path and
/// switches to nobody; without any one of those capabilities it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_units_capability_set_is_enough_and_each_one_is_needed() {
    if !require_privileged("data path sockmap") {
        return;
    }
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("setpriv").is_file()));
    if !on_path {
        proxy_integration::skip_or_panic("capability set", "setpriv (util-linux) not installed");
        return;
    }
    let caps = unit_capabilities();
    sockmap_with(&caps).unwrap_or_else(|e| panic!("with the unit's set {caps:?}: {e}"));
    for (i, cap) in caps.iter().enumerate() {
        let mut fewer = caps.clone();
        fewer.remove(i);
        assert!(
            sockmap_with(&fewer).is_err(),
            "the daemon does not need {cap} (unit set {caps:?}): drop it from the unit"
        );
    }
}
