//! TCP half-close must cross the proxy in both directions: after one side
//! shuts down its write side, the other direction keeps working until it is
//! shut down too. On the sockmap path the kernel never forwards FIN, so the
//! daemon must notice it without reading and pass it on after the data.

use std::time::Duration;

use proxy_integration::{
    accept_one, checks::wait_sessions_drained, listen, recv_to_eof, require_privileged,
    send_pattern, socks, within, Daemon, DaemonOpts, DataPath, Task,
};
use rstest::rstest;
use tokio::io::AsyncWriteExt;

const FIRST: u64 = 4096;
const SECOND: u64 = 1 << 20;
const SEED_FIRST: u64 = 0x4a1f_0001;
const SEED_SECOND: u64 = 0x4a1f_0002;
const LIMIT: Duration = Duration::from_secs(15);

/// Client sends 4 KiB and shuts down; the target, having seen EOF, sends
/// 1 MiB and shuts down; the client gets exactly that, then EOF.
#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[case::auto(DataPath::Auto)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_shuts_down_first(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::path(path));
    let listener = listen("127.0.0.1:0").await;
    let target_addr = listener.local_addr().unwrap();
    let target = Task::spawn(async move {
        let mut s = accept_one(&listener).await;
        let (mut r, mut w) = s.split();
        recv_to_eof(&mut r, SEED_FIRST, FIRST)
            .await
            .map_err(|e| format!("target, before the client's FIN: {e}"))?;
        send_pattern(&mut w, SEED_SECOND, SECOND)
            .await
            .map_err(|e| format!("target, sending after the client's FIN: {e}"))?;
        w.shutdown()
            .await
            .map_err(|e| format!("target shutdown: {e}"))
    });
    let mut client = socks::connect(daemon.addr(), target_addr).await;
    let (mut r, mut w) = client.split();
    within(
        LIMIT,
        "client sending",
        send_pattern(&mut w, SEED_FIRST, FIRST),
    )
    .await
    .unwrap_or_else(|e| panic!("client: {e}"));
    w.shutdown().await.expect("client shutdown");
    let got = within(
        LIMIT,
        "client receiving 1 MiB then EOF after its own FIN",
        recv_to_eof(&mut r, SEED_SECOND, SECOND),
    )
    .await
    .unwrap_or_else(|e| panic!("client, after its FIN ({path}): {e}"));
    assert_eq!(got, SECOND);
    target
        .join(LIMIT, "target")
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    drop(client);
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}

/// The target sends 4 KiB and shuts down first; the client, having seen EOF,
/// sends 1 MiB and shuts down; the target gets exactly that, then EOF.
#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[case::auto(DataPath::Auto)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_shuts_down_first(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::path(path));
    let listener = listen("127.0.0.1:0").await;
    let target_addr = listener.local_addr().unwrap();
    let target = Task::spawn(async move {
        let mut s = accept_one(&listener).await;
        let (mut r, mut w) = s.split();
        send_pattern(&mut w, SEED_FIRST, FIRST)
            .await
            .map_err(|e| format!("target sending: {e}"))?;
        w.shutdown()
            .await
            .map_err(|e| format!("target shutdown: {e}"))?;
        recv_to_eof(&mut r, SEED_SECOND, SECOND)
            .await
            .map_err(|e| format!("target, after its own FIN: {e}"))
    });
    let mut client = socks::connect(daemon.addr(), target_addr).await;
    let (mut r, mut w) = client.split();
    within(
        LIMIT,
        "client receiving 4 KiB then EOF",
        recv_to_eof(&mut r, SEED_FIRST, FIRST),
    )
    .await
    .unwrap_or_else(|e| panic!("client, before the target's FIN ({path}): {e}"));
    within(
        LIMIT,
        "client sending 1 MiB after the target's FIN",
        async {
            send_pattern(&mut w, SEED_SECOND, SECOND).await?;
            w.shutdown()
                .await
                .map_err(|e| format!("client shutdown: {e}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("client ({path}): {e}"));
    let got = target
        .join(LIMIT, "target receiving 1 MiB then EOF after its own FIN")
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(got, SECOND);
    drop(client);
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}
