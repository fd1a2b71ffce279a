//! Faults a daemon on the open network meets: running out of descriptors, thousands of
//! malformed, truncated and reset connections, and clients that negotiate one byte at a time.
//! The daemon must neither spin nor leak, and must keep serving.

use std::time::{Duration, Instant};

use proxy_integration::{
    checks::{wait_counter, wait_sessions_drained},
    exchange, poll_until,
    procfs::{self, cpu_time, fd_count},
    raise_nofile_limit, require_privileged, send_and_recv,
    socks::{self, Target},
    within, Daemon, DaemonOpts, DataPath, Echo, Plan,
};
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::Semaphore};

const LIMIT: Duration = Duration::from_secs(30);

/// Gauges of sessions in any state; all must be back to 0 once every client left.
const GAUGES: [&str; 9] = [
    "sessions_negotiating",
    "sessions_authenticating",
    "sessions_resolving",
    "sessions_connecting",
    "sessions_bind_waiting",
    "sessions_active_sockmap",
    "sessions_active_splice",
    "sessions_active_copy",
    "udp_associations_active",
];

async fn echo_once(s: &mut TcpStream, seed: u64, what: &str) {
    within(LIMIT, what, send_and_recv(s, (seed, 4096), (seed, 4096)))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// Lets the daemon open `room` more descriptors than it holds now, whatever that is; soft and
/// hard limit both, as the daemon would raise its soft limit.
fn limit_descriptors(daemon: &Daemon, room: usize) {
    let pid = daemon.pid();
    let limit = procfs::fd_count(pid) + room;
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit --pid {pid}: {status}");
}

/// A full CONNECT through the daemon, or None when it does not complete within 3 s or is
/// refused (the daemon is out of descriptors).
async fn try_session(d: &Daemon, target: std::net::SocketAddr) -> Option<TcpStream> {
    let target = Target::Ip(target);
    let hs = socks::handshake(d.addr(), socks::CMD_CONNECT, &target, None);
    match tokio::time::timeout(Duration::from_secs(3), hs).await {
        Ok(Ok((s, r))) if r.code == socks::REP_SUCCEEDED => Some(s),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_backs_off_and_recovers() {
    if !require_privileged("descriptor exhaustion") {
        return;
    }
    raise_nofile_limit();
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: "[limits]\nmax_sessions = 1000\n[timeouts]\nnegotiation = \"60s\"\n".into(),
        ..DaemonOpts::path(DataPath::Sockmap)
    });
    let pid = daemon.pid();
    // Room for a few dozen more descriptors than the daemon holds once ready.
    const ROOM: usize = 40;
    limit_descriptors(&daemon, ROOM);
    let echo = Echo::start("127.0.0.1:0").await;

    // Fill the table with working sessions until one cannot be set up.
    let mut sessions = Vec::new();
    for i in 0..ROOM as u64 {
        match try_session(&daemon, echo.addr).await {
            Some(mut s) => {
                echo_once(&mut s, i, "a session while filling").await;
                sessions.push(s);
            }
            None => break,
        }
    }
    assert!(
        sessions.len() >= 5 && sessions.len() < ROOM,
        "{} sessions fit in {ROOM} more descriptors",
        sessions.len()
    );
    // Silent clients take what is left; the next ones wait in the backlog while accept(2)
    // fails with EMFILE.
    let mut idle = Vec::new();
    for _ in 0..6 {
        idle.push(
            TcpStream::connect(daemon.addr())
                .await
                .expect("connect (backlog)"),
        );
    }
    poll_until(Duration::from_secs(10), "accept_errors > 0", |last| {
        let s = daemon.stats();
        *last = s.json["counters"].to_string();
        (s.counter("accept_errors") > 0).then_some(())
    })
    .await;

    // accept(2) keeps failing while the listener stays readable: the daemon must back off,
    // not spin.
    let (c0, t0) = (cpu_time(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (used, wall) = (cpu_time(pid) - c0, t0.elapsed());
    eprintln!("daemon CPU while out of descriptors: {used:?} in {wall:?}");
    assert!(
        // A 50 ms pause costs about 10 ms here; a spin, or even a 1 ms pause, over 100 ms.
        used < wall / 20,
        "the daemon used {used:?} of CPU in {wall:?} while out of descriptors (busy loop?)"
    );

    // Existing sessions go on.
    for (i, s) in sessions.iter_mut().enumerate() {
        echo_once(s, 1000 + i as u64, "an existing session while exhausted").await;
    }

    // Once descriptors are free again, new sessions work.
    drop(idle);
    for mut s in sessions.drain(..4) {
        within(LIMIT, "close", exchange(&mut s, Plan::close()))
            .await
            .unwrap_or_else(|e| panic!("close: {e}"));
    }
    let mut s = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.is_none() && Instant::now() < deadline {
        s = try_session(&daemon, echo.addr).await;
    }
    let mut s = s.expect("no new session within 20 s after descriptors were freed");
    echo_once(&mut s, 7, "a new session after recovery").await;
    drop(s);
    drop(sessions);
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}

/// xorshift64: reproducible garbage.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One hostile connection of kind `i % 7`; errors are expected and ignored, only the bound
/// matters.
async fn hostile(addr: std::net::SocketAddr, i: u64) {
    let mut rng = Rng(0x9e37_79b9 ^ (i.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1));
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return;
    };
    // SO_LINGER 0: the close sends RST (never blocks with a zero timeout).
    let rst = |s: &TcpStream| {
        use std::os::fd::AsRawFd as _;
        let lg = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: passes a readable linger of the stated size on a socket we own.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const lg).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
    };
    let len = 1 + (rng.next() % 400) as usize;
    match i % 7 {
        // Random bytes, then a close.
        0 => {
            let _ = s.write_all(&rng.bytes(len)).await;
        }
        // A truncated greeting.
        1 => {
            let _ = s.write_all(&[5, 3, 0]).await;
        }
        // A greeting and a truncated domain request.
        2 => {
            let _ = s.write_all(&[5, 1, 0, 5, 1, 0, 3, 40, b'a', b'b']).await;
        }
        // Reset right after connecting.
        3 => rst(&s),
        // A greeting, half a request, then a reset.
        4 => {
            let _ = s.write_all(&[5, 1, 0, 5, 1, 0, 1, 127]).await;
            rst(&s);
        }
        // SOCKS4 without the user id's terminating NUL, then random bytes.
        5 => {
            let mut b = vec![4, 1, 0, 80, 127, 0, 0, 1];
            b.extend(rng.bytes(len).into_iter().map(|x| x | 1));
            let _ = s.write_all(&b).await;
        }
        // A valid greeting followed by garbage as the request.
        _ => {
            let mut b = vec![5, 1, 0];
            b.extend(rng.bytes(len));
            let _ = s.write_all(&b).await;
            if rng.next() & 1 == 0 {
                rst(&s);
            }
        }
    }
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_and_reset_connections_leak_nothing() {
    if !require_privileged("hostile connections") {
        return;
    }
    const CONNECTIONS: u64 = 3000;
    const IN_FLIGHT: usize = 48;
    raise_nofile_limit();
    let mut daemon = Daemon::start(DaemonOpts {
        extra_toml: "[timeouts]\nnegotiation = \"2s\"\n".into(),
        ..DaemonOpts::path(DataPath::Auto)
    });
    let pid = daemon.pid();
    let echo = Echo::start("127.0.0.1:0").await;
    // A clean session first, so that whatever the daemon sets up lazily exists at baseline.
    let mut s = socks::connect(daemon.addr(), echo.addr).await;
    echo_once(&mut s, 1, "warm-up session").await;
    drop(s);
    wait_sessions_drained(&daemon).await;
    let baseline = fd_count(pid);

    let addr = daemon.addr();
    let gate = std::sync::Arc::new(Semaphore::new(IN_FLIGHT));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..CONNECTIONS {
        let permit = gate.clone().acquire_owned().await.expect("semaphore");
        tasks.push(tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), hostile(addr, i)).await;
            drop(permit);
        }));
        assert!(t0.elapsed() < Duration::from_secs(120), "storm too slow");
    }
    for t in tasks {
        within(LIMIT, "a hostile connection", t)
            .await
            .expect("hostile task");
    }
    eprintln!("{CONNECTIONS} hostile connections in {:?}", t0.elapsed());
    assert!(daemon.try_wait().is_none(), "the daemon died in the storm");

    // Still serving.
    let mut s = socks::connect(daemon.addr(), echo.addr).await;
    echo_once(&mut s, 2, "a clean session after the storm").await;
    within(LIMIT, "close", exchange(&mut s, Plan::close()))
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    drop(s);

    // Nothing leaked: every gauge back to 0, the descriptors back to the baseline.
    poll_until(
        Duration::from_secs(15),
        "gauges at 0 and fds at baseline",
        |last| {
            let st = daemon.stats();
            let busy: Vec<String> = GAUGES
                .iter()
                .filter(|g| st.counter(g) != 0)
                .map(|g| format!("{g}={}", st.counter(g)))
                .collect();
            let fds = fd_count(pid);
            *last = format!("fds {fds} (baseline {baseline}), gauges {busy:?}");
            (busy.is_empty() && fds <= baseline).then_some(())
        },
    )
    .await;
    let st = daemon.stats();
    assert!(
        st.counter("connections_accepted") > CONNECTIONS / 2,
        "the storm did not reach the daemon: {st}"
    );
    daemon.stop();
}

/// A client sending its negotiation one byte every 400 ms is cut at the negotiation timeout
/// (measured from the connection, not reset by every byte).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_at_a_time_is_cut_at_the_negotiation_timeout() {
    if !require_privileged("negotiation timeout") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: "[timeouts]\nnegotiation = \"2s\"\n".into(),
        ..DaemonOpts::default()
    });
    let echo = Echo::start("127.0.0.1:0").await;
    let mut bytes = socks::greeting();
    bytes.extend(socks::request(socks::CMD_CONNECT, &Target::Ip(echo.addr)));
    let t0 = Instant::now();
    let s = TcpStream::connect(daemon.addr()).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    let trickle = tokio::spawn(async move {
        for (i, b) in bytes.iter().enumerate() {
            if w.write_all(&[*b]).await.is_err() {
                return i;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        bytes.len()
    });
    // The method selection may come back after the third byte; then the close.
    let mut buf = Vec::new();
    let closed = within(Duration::from_secs(8), "the close", async {
        use tokio::io::AsyncReadExt as _;
        let mut b = [0u8; 64];
        loop {
            match r.read(&mut b).await {
                Ok(0) | Err(_) => return t0.elapsed(),
                Ok(n) => buf.extend_from_slice(&b[..n]),
            }
        }
    })
    .await;
    let sent = trickle.await.expect("trickle task");
    eprintln!("closed after {closed:?}, {sent} bytes sent, got {buf:02x?}");
    assert!(
        closed >= Duration::from_millis(1800) && closed < Duration::from_secs(5),
        "closed after {closed:?}; the negotiation timeout is 2 s"
    );
    assert!(
        !buf.starts_with(&[5, 0, 5, 0]),
        "the request completed: {buf:02x?}"
    );
    wait_counter(&daemon, "failures_negotiation_timeout", 1).await;
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}

/// Host routes the test adds for itself and removes on drop. They only make the kernel refuse
/// a connect at once (`unreachable`: EHOSTUNREACH, `throw` with no other table:
/// ENETUNREACH); nothing is sent anywhere.
struct Routes(Vec<String>);

impl Routes {
    fn add(routes: &[(&str, String)]) -> Option<Self> {
        let mut added = Vec::new();
        for (kind, addr) in routes {
            let dst = format!("{addr}/32");
            let ok = std::process::Command::new("ip")
                .args(["route", "add", kind, &dst])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                drop(Self(added));
                return None;
            }
            added.push(format!("{kind} {dst}"));
        }
        Some(Self(added))
    }
}

impl Drop for Routes {
    fn drop(&mut self) {
        for r in &self.0 {
            let mut args = vec!["route", "del"];
            args.extend(r.split(' '));
            let _ = std::process::Command::new("ip").args(&args).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_targets_get_their_reply_codes_and_are_counted() {
    if !require_privileged("unreachable targets") {
        return;
    }
    // TEST-NET-2 addresses picked per process, so parallel runs do not share a route.
    let n = 20 + 2 * (std::process::id() % 100);
    let (host, net) = (format!("198.51.100.{n}"), format!("198.51.100.{}", n + 1));
    let Some(_routes) = Routes::add(&[("unreachable", host.clone()), ("throw", net.clone())])
    else {
        proxy_integration::skip_or_panic("unreachable targets", "`ip route add` failed");
        return;
    };
    let daemon = Daemon::start(DaemonOpts::default());
    for (addr, code, reason) in [
        (&host, socks::REP_HOST_UNREACHABLE, "host_unreachable"),
        (&net, socks::REP_NETWORK_UNREACHABLE, "network_unreachable"),
    ] {
        let target = Target::Ip(format!("{addr}:80").parse().unwrap());
        let (mut s, reply) = within(
            LIMIT,
            "reply",
            socks::handshake(daemon.addr(), socks::CMD_CONNECT, &target, None),
        )
        .await
        .unwrap_or_else(|e| panic!("CONNECT {addr}: {e}"));
        assert_eq!(reply.code, code, "CONNECT {addr} ({reason})");
        proxy_integration::wait_closed(&mut s, Duration::from_secs(5), reason).await;
        wait_counter(&daemon, &format!("failures_{reason}"), 1).await;
    }
    wait_counter(&daemon, "sessions_failed", 2).await;
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}

/// splice(2) needs two pipes per session; a session that cannot have them once it has been
/// told CONNECT succeeded must not be reset: that direction copies instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_without_pipes_copies() {
    if !require_privileged("descriptor exhaustion") {
        return;
    }
    raise_nofile_limit();
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: "[limits]\nmax_sessions = 1000\n".into(),
        ..DaemonOpts::path(DataPath::Splice)
    });
    // The sessions' sockets fit (two descriptors each); pipes, taken at the first payload,
    // run out after about one session.
    const SESSIONS: usize = 12;
    limit_descriptors(&daemon, 2 * SESSIONS + 6);
    let echo = Echo::start("127.0.0.1:0").await;
    let mut sessions = Vec::new();
    for i in 0..SESSIONS {
        let s = try_session(&daemon, echo.addr)
            .await
            .unwrap_or_else(|| panic!("session {i} of {SESSIONS} could not be set up"));
        sessions.push(s);
    }
    for round in 0..2u64 {
        for (i, s) in sessions.iter_mut().enumerate() {
            echo_once(s, round * 100 + i as u64, "a session without pipes").await;
        }
    }
    let s = daemon.stats();
    assert!(
        s.traffic("tcp", "copy", "up") > 0 && s.traffic("tcp", "copy", "down") > 0,
        "no direction copied although pipes ran out: {s}"
    );
    assert_eq!(s.counter("sessions_failed"), 0, "{s}");
    for mut s in sessions {
        within(LIMIT, "close", exchange(&mut s, Plan::close()))
            .await
            .unwrap_or_else(|e| panic!("close: {e}"));
    }
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}
