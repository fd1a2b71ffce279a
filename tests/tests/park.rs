//! Sessions the kernel carries wait as records with no task (`sessions_parked`) until something
//! happens to them: payload does not wake them, their own FIN does and they end exactly, and
//! when the shutdown drain runs out the parked ones are closed and logged like any other.

use std::time::Duration;

use proxy_integration::{
    accept_one,
    checks::{close_pair, wait_gauge, wait_log},
    exchange, listen, require_privileged, send_and_recv, socks, within, Daemon, DaemonOpts,
    DataPath, Plan, Task,
};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(30);
const SESSIONS: usize = 24;

/// Moves `len` bytes each way on every pair, checking every byte.
async fn exchange_all(pairs: &mut [(TcpStream, TcpStream)], seed: u64, len: u64) {
    for (i, (client, target)) in pairs.iter_mut().enumerate() {
        let (up, down) = (seed + 2 * i as u64, seed + 2 * i as u64 + 1);
        within(LIMIT, "payload on a session", async {
            tokio::try_join!(
                send_and_recv(client, (up, len), (down, len)),
                send_and_recv(target, (down, len), (up, len)),
            )
        })
        .await
        .unwrap_or_else(|e| panic!("session {i}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spliced_sessions_wait_parked_and_wake_for_their_own_end() {
    if !require_privileged("data path sockmap") {
        return;
    }
    let mut daemon = Daemon::start(DaemonOpts {
        extra_toml: "[timeouts]\ndrain = \"1s\"\n".into(),
        ..DaemonOpts::path(DataPath::Sockmap)
    });
    let mut pairs = socks::open_pairs(daemon.addr(), SESSIONS).await;
    wait_gauge(&daemon, "sessions_parked", SESSIONS as u64).await;
    wait_gauge(&daemon, "sessions_active_sockmap", SESSIONS as u64).await;

    // Payload in both directions on every session, well below a brake checkpoint: the kernel
    // moves it and no session needs its task for that.
    exchange_all(&mut pairs, 0x9a4c_0000, 256 << 10).await;
    let s = daemon.stats();
    assert_eq!(
        s.counter("sessions_parked"),
        SESSIONS as u64,
        "payload woke parked sessions: {}",
        s.json["counters"]
    );

    // A FIN wakes exactly its own session, which forwards it once every byte is through.
    let rest = pairs.split_off(SESSIONS / 2);
    for (client, target) in pairs {
        close_pair(client, target).await;
    }
    wait_gauge(&daemon, "sessions_parked", (SESSIONS / 2) as u64).await;
    wait_gauge(&daemon, "sessions_active_sockmap", (SESSIONS / 2) as u64).await;

    // A half-close on a parked session: the target still answers after the client's FIN.
    let mut rest = rest;
    let (mut client, mut target) = rest.pop().expect("a session");
    within(LIMIT, "half-closed exchange", async {
        tokio::try_join!(
            exchange(
                &mut client,
                Plan {
                    send: Some((0x9a4c_1000, 100_000)),
                    recv: (0x9a4c_1001, 300_000),
                }
            ),
            exchange(
                &mut target,
                Plan {
                    send: Some((0x9a4c_1001, 300_000)),
                    recv: (0x9a4c_1000, 100_000),
                }
            ),
        )
    })
    .await
    .unwrap_or_else(|e| panic!("half-closed session: {e}"));
    let parked = (SESSIONS / 2 - 1) as u64;
    wait_gauge(&daemon, "sessions_parked", parked).await;
    // The others are still carried in the kernel, exactly.
    exchange_all(&mut rest, 0x9a4c_2000, 64 << 10).await;

    // The drain runs out: parked sessions are closed and logged as closed at shutdown.
    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the daemon did not exit after its 1 s drain"));
    assert_eq!(status.code(), Some(0), "exit status after the drain");
    wait_log(&daemon, "session closed at shutdown", parked as usize).await;
    assert!(
        !daemon.pin_dir().exists(),
        "{} left behind: parked sessions kept the daemon's state alive",
        daemon.pin_dir().display()
    );
    for (i, (mut client, _target)) in rest.into_iter().enumerate() {
        proxy_integration::wait_closed(&mut client, LIMIT, &format!("parked session {i}")).await;
    }
}

/// A parked session whose client resets takes its target down with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_wakes_a_parked_session() {
    if !require_privileged("data path sockmap") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Sockmap));
    let l = listen("127.0.0.1:0").await;
    let addr = l.local_addr().unwrap();
    let accept = Task::spawn(async move { accept_one(&l).await });
    let client = socks::connect(daemon.addr(), addr).await;
    let mut target = accept.join(LIMIT, "target accept").await;
    wait_gauge(&daemon, "sessions_parked", 1).await;
    // SO_LINGER 0: close sends a reset (and never blocks, the timeout being zero).
    #[expect(deprecated, reason = "a zero linger does not block")]
    client.set_linger(Some(Duration::ZERO)).unwrap();
    drop(client);
    wait_gauge(&daemon, "sessions_parked", 0).await;
    wait_gauge(&daemon, "sessions_active_sockmap", 0).await;
    proxy_integration::wait_closed(&mut target, LIMIT, "target after the client's reset").await;
    daemon.stop();
}
