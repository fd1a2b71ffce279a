//! `user = "nobody"`: after start-up the daemon runs as that user with no capability at all
//! (every thread), and still splices in the kernel, reloads on SIGHUP and removes its pins and
//! control socket at exit.

use std::time::Duration;

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
