//! Many sessions at once must not mix up their sockets: each of 500
//! concurrent sessions sends its own bytes to an echo target and must get
//! exactly those back.

use std::time::Duration;

use proxy_integration::{
    checks::wait_sessions_drained, exchange, raise_nofile_limit, require_privileged, skip_or_panic,
    socks, Daemon, DaemonOpts, DataPath, Echo, Plan,
};
use rstest::rstest;

const SESSIONS: u64 = 500;
const LEN: u64 = 64 << 10;
const LIMIT: Duration = Duration::from_secs(45);

#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_sessions_echo(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    // Per session: two sockets here, two in the daemon (plus pipes on the
    // splice path), all under this limit, which the daemon inherits.
    let nofile = raise_nofile_limit();
    if nofile < SESSIONS * 6 + 256
        && !skip_or_panic(
            &path.feature(),
            &format!("RLIMIT_NOFILE hard limit {nofile} is too low"),
        )
    {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::path(path));
    let echo = Echo::start("127.0.0.1:0").await;
    let proxy = daemon.addr();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..SESSIONS {
        let target = echo.addr;
        set.spawn(async move {
            let seed = 0xc0c0_0000 + i;
            let mut s = socks::try_connect(proxy, target).await?;
            exchange(
                &mut s,
                Plan {
                    send: Some((seed, LEN)),
                    recv: (seed, LEN),
                },
            )
            .await?;
            Ok::<(), String>(())
        });
    }
    let mut failures = Vec::new();
    let all = tokio::time::timeout(LIMIT, async {
        let mut i = 0u64;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e),
                Err(e) => failures.push(format!("task: {e}")),
            }
            i += 1;
        }
        i
    })
    .await;
    let finished = match all {
        Ok(n) => n,
        Err(_) => {
            let left = set.len();
            set.abort_all();
            panic!("{path}: {left} of {SESSIONS} sessions still running after {LIMIT:?}; failures so far: {failures:?}")
        }
    };
    assert_eq!(finished, SESSIONS);
    assert!(
        failures.is_empty(),
        "{path}: {} of {SESSIONS} sessions failed; first ones: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}
