//! 256 MiB through one session, each way and both ways at once, with the
//! payload checked byte for byte at the receiving end.

use std::time::Duration;

use proxy_integration::{
    checks::assert_path_used, exchange, listen, require_privileged, socks, targets::spawn_peer,
    within, Daemon, DaemonOpts, DataPath, Plan,
};
use rstest::rstest;

const BULK: u64 = 256 << 20;
const SEED_UP: u64 = 0x0b0b_0001;
const SEED_DOWN: u64 = 0x0b0b_0002;
const LIMIT: Duration = Duration::from_secs(45);

/// Moves `up` bytes client -> target and `down` bytes target -> client in one
/// session. A side with nothing to send shuts down only after reading EOF.
async fn bulk(path: DataPath, up: u64, down: u64) {
    if !require_privileged(&path.feature()) {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::path(path));
    let listener = listen("127.0.0.1:0").await;
    let target_addr = listener.local_addr().unwrap();
    let plan_for = |send: u64, send_seed: u64, recv: u64, recv_seed: u64| Plan {
        send: (send > 0).then_some((send_seed, send)),
        recv: (recv_seed, recv),
    };
    let target = spawn_peer(listener, plan_for(down, SEED_DOWN, up, SEED_UP));
    let mut client = socks::connect(daemon.addr(), target_addr).await;
    let got = within(
        LIMIT,
        "client side of the bulk transfer",
        exchange(&mut client, plan_for(up, SEED_UP, down, SEED_DOWN)),
    )
    .await
    .unwrap_or_else(|e| panic!("client ({path}, up {up}, down {down}): {e}"));
    assert_eq!(got, down);
    let got = target
        .join(LIMIT, "target side of the bulk transfer")
        .await
        .unwrap_or_else(|e| panic!("target ({path}, up {up}, down {down}): {e}"));
    assert_eq!(got, up);
    drop(client);
    assert_path_used(&daemon, path, 1).await;
    daemon.stop();
}

#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[case::auto(DataPath::Auto)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_256m(#[case] path: DataPath) {
    bulk(path, BULK, 0).await;
}

#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[case::auto(DataPath::Auto)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_256m(#[case] path: DataPath) {
    bulk(path, 0, BULK).await;
}

#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[case::auto(DataPath::Auto)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ways_256m(#[case] path: DataPath) {
    bulk(path, BULK, BULK).await;
}
