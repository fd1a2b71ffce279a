//! SIGHUP re-reads the config file: a valid file applies to new sessions while a running
//! in-kernel transfer goes on untouched; an invalid file is logged and ignored.

use std::time::Duration;

use proxy_integration::{
    accept_one,
    checks::{wait_counter, wait_log, wait_sessions_drained},
    exchange, listen, recv_to_eof, require_privileged,
    socks::{self, Target},
    wait_closed, within, Daemon, DaemonOpts, DataPath, Echo, Pattern, Plan, Task,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{tcp::OwnedWriteHalf, TcpListener},
    sync::oneshot,
};

const LEN: u64 = 256 << 20;
const BACK: u64 = 1 << 20;
const SEED_UP: u64 = 0x4e10_0001;
const SEED_DOWN: u64 = 0x4e10_0002;
const LIMIT: Duration = Duration::from_secs(120);

/// Sends `LEN` bytes of `SEED_UP`; after the first half it reports on `half` and waits for
/// `go`, so the session is certainly mid-transfer while the test reloads. Then shuts down.
async fn gated_send(
    mut w: OwnedWriteHalf,
    half: oneshot::Sender<()>,
    go: oneshot::Receiver<()>,
) -> Result<(), String> {
    let mut p = Pattern::new(SEED_UP);
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    let mut gate = Some((half, go));
    while sent < LEN {
        if sent >= LEN / 2 {
            if let Some((half, go)) = gate.take() {
                let _ = half.send(());
                go.await
                    .map_err(|_| "the test dropped the gate".to_owned())?;
            }
        }
        let n = (LEN - sent).min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n])
            .await
            .map_err(|e| format!("write failed after {sent} of {LEN} bytes: {e}"))?;
        sent += n as u64;
    }
    w.shutdown().await.map_err(|e| format!("shutdown: {e}"))
}

/// A new CONNECT to the target's port is refused with 0x02 and never reaches it; another
/// port still works.
async fn check_blocked(daemon: &Daemon, l: &TcpListener, other: &Echo, when: &str) {
    let target = Target::Ip(l.local_addr().unwrap());
    let (mut s, reply) = socks::handshake(daemon.addr(), socks::CMD_CONNECT, &target, None)
        .await
        .unwrap_or_else(|e| panic!("{when}: new session: {e}"));
    assert_eq!(
        reply.code,
        socks::REP_NOT_ALLOWED,
        "{when}: a new session to the now-blocked port got {reply:?}"
    );
    wait_closed(&mut s, Duration::from_secs(2), when).await;
    proxy_integration::assert_no_connection(l, Duration::from_millis(500), when).await;

    let mut s = socks::connect(daemon.addr(), other.addr).await;
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    within(Duration::from_secs(10), when, s.read_exact(&mut b))
        .await
        .unwrap_or_else(|e| panic!("{when}: session to another port: {e}"));
    assert_eq!(&b, b"ping");
    within(
        Duration::from_secs(10),
        when,
        exchange(&mut s, Plan::close()),
    )
    .await
    .unwrap_or_else(|e| panic!("{when}: closing: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_during_sockmap_transfer() {
    if !require_privileged("data path sockmap") {
        return;
    }
    let mut daemon = Daemon::start(DaemonOpts::path(DataPath::Sockmap));
    let l = listen("127.0.0.1:0").await;
    let port = l.local_addr().unwrap().port();
    let other = Echo::start("127.0.0.1:0").await;

    let client = socks::connect(daemon.addr(), l.local_addr().unwrap()).await;
    let mut target = accept_one(&l).await;
    let target_task = Task::spawn(async move {
        exchange(
            &mut target,
            Plan {
                send: Some((SEED_DOWN, BACK)),
                recv: (SEED_UP, LEN),
            },
        )
        .await
    });
    let (half_tx, half_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel();
    let client_task = Task::spawn(async move {
        let (mut r, w) = client.into_split();
        tokio::try_join!(gated_send(w, half_tx, go_rx), async {
            recv_to_eof(&mut r, SEED_DOWN, BACK)
                .await
                .map_err(|e| format!("receive: {e}"))
        })
    });
    within(LIMIT, "the first 128 MiB to be sent", half_rx)
        .await
        .expect("the sender ended before half");

    // Valid change: block the target's port for new sessions.
    daemon.rewrite_config(&format!(
        "[[socks_rule]]\nname = \"block-target\"\naction = \"block\"\nports = [{port}]\n\
         [[socks_rule]]\nname = \"rest\"\naction = \"pass\"\n"
    ));
    daemon.sighup();
    wait_log(&daemon, "configuration reloaded", 1).await;
    check_blocked(&daemon, &l, &other, "after a valid reload").await;
    wait_counter(&daemon, "requests_blocked", 1).await;

    // The running session is unaffected: the rest of the 256 MiB and the reply arrive intact.
    go_tx.send(()).expect("sender gone");
    client_task
        .join(LIMIT, "client side of the 256 MiB transfer")
        .await
        .unwrap_or_else(|e| panic!("client side of the transfer across the reload: {e}"));
    let got = target_task
        .join(LIMIT, "target side of the 256 MiB transfer")
        .await
        .unwrap_or_else(|e| panic!("target side of the transfer across the reload: {e}"));
    assert_eq!(got, LEN);
    let s = daemon.stats();
    assert!(
        s.traffic("tcp", "sockmap", "up") >= LEN,
        "the transfer did not run on the sockmap path: {s}"
    );
    assert_eq!(s.counter("sessions_fallback"), 0, "{s}");

    // Invalid file: logged, daemon keeps running with the previous (valid) config.
    daemon.write_config_raw("listen = [\"127.0.0.1:0\"]\n[[socks_rule]\naction = = \"pass\"\n");
    daemon.sighup();
    wait_log(&daemon, "not reloaded", 1).await;
    assert!(
        daemon.try_wait().is_none(),
        "the daemon exited after reloading an invalid file: {:?}",
        daemon.try_wait()
    );
    check_blocked(&daemon, &l, &other, "after an invalid reload").await;
    wait_counter(&daemon, "requests_blocked", 2).await;
    assert_eq!(
        daemon
            .stderr_log()
            .matches("configuration reloaded")
            .count(),
        1,
        "the invalid file was reported as reloaded"
    );
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}

/// A reload that changes what the daemon set up at start-up names exactly those keys, and
/// they keep their start-up values: here the session limit stays 1, so a second session is
/// closed at accept (the rest of a reloaded file applies, as the test above checks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_the_settings_fixed_at_start_up() {
    if !require_privileged("SIGHUP reload") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: "[limits]\nmax_sessions = 1\n".into(),
        ..DaemonOpts::default()
    });
    daemon.rewrite_config("[limits]\nmax_sessions = 2\n[timeouts]\nidle = \"2m\"\n");
    daemon.sighup();
    wait_log(&daemon, "configuration reloaded", 1).await;
    wait_log(
        &daemon,
        "changes to limits.max_sessions take effect at the next start; the rest applies to new sessions",
        1,
    )
    .await;
    let echo = Echo::start("127.0.0.1:0").await;
    let _first = socks::connect(daemon.addr(), echo.addr).await;
    let mut second = tokio::net::TcpStream::connect(daemon.addr())
        .await
        .expect("connect");
    wait_closed(&mut second, Duration::from_secs(5), "the second session").await;
    wait_counter(&daemon, "failures_limit", 1).await;
    drop(_first);
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}

/// SIGHUP applies a new `[log] level` to the running daemon: a refused client is logged at
/// debug level, so its line appears only after the reload (unless `RUST_LOG`, which wins
/// over the file, is set for the daemon: then the reload says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_log_level() {
    if !require_privileged("SIGHUP reload") {
        return;
    }
    const REFUSED: &str = "client refused by rule";
    let rules = "[[client_rule]]\naction = \"block\"\nfrom = [\"127.0.0.2/32\"]\n\
                 [[client_rule]]\naction = \"pass\"\n";
    let daemon = Daemon::start(DaemonOpts {
        allow_clients: false,
        extra_toml: rules.into(),
        ..DaemonOpts::default()
    });
    let refused = || async {
        let mut s = socks::tcp_connect_from([127, 0, 0, 2].into(), daemon.addr())
            .await
            .expect("connect from 127.0.0.2");
        wait_closed(&mut s, Duration::from_secs(5), "a refused client").await;
    };
    refused().await;
    wait_counter(&daemon, "connections_refused", 1).await;
    assert!(
        !daemon.stderr_log().contains(REFUSED),
        "logged at info level"
    );

    daemon.rewrite_config(&format!("{rules}[log]\nlevel = \"debug\"\n"));
    daemon.sighup();
    wait_log(&daemon, "configuration reloaded", 1).await;
    if std::env::var_os("RUST_LOG").is_some() {
        wait_log(&daemon, "RUST_LOG is set, so it decides the log level", 1).await;
    } else {
        wait_log(&daemon, "log level changed", 1).await;
        refused().await;
        wait_log(&daemon, REFUSED, 1).await;
    }
    daemon.stop();
}
