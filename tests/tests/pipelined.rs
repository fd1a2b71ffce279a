//! Bytes that reach a socket before the daemon has set up its data path must
//! not be lost or stalled (KERNEL-NOTES: bytes queued before a sockhash
//! insert wait for more data unless the daemon kicks the verdict; a socket
//! that already got FIN cannot be inserted at all).

use std::time::{Duration, Instant};

use proxy_integration::{
    accept_one, listen, recv_exact, recv_to_eof, require_privileged,
    socks::{self, Target},
    within, Daemon, DaemonOpts, DataPath, Echo, Pattern, Task,
};
use rstest::rstest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(15);
/// How long a few bytes may take to cross loopback through the proxy.
const PROMPT: Duration = Duration::from_secs(2);

/// Greeting, CONNECT and 64 KiB of payload in one write, before any answer:
/// the whole payload comes back from an echo target.
#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[case::auto(DataPath::Auto)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_payload_in_one_write(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    const LEN: u64 = 64 << 10;
    const SEED: u64 = 0x919e_0001;
    let daemon = Daemon::start(DaemonOpts::path(path));
    let echo = Echo::start("127.0.0.1:0").await;
    let payload = Pattern::bytes(SEED, LEN as usize);
    let (mut s, reply) = socks::handshake(
        daemon.addr(),
        socks::CMD_CONNECT,
        &Target::Ip(echo.addr),
        Some(&payload),
    )
    .await
    .unwrap_or_else(|e| panic!("pipelined handshake ({path}): {e}"));
    assert_eq!(reply.code, socks::REP_SUCCEEDED, "{path}: reply {reply:?}");
    within(
        LIMIT,
        "echo of the pipelined payload",
        recv_exact(&mut s, SEED, LEN),
    )
    .await
    .unwrap_or_else(|e| panic!("echo of the pipelined payload ({path}): {e}"));
    s.shutdown().await.expect("shutdown");
    within(LIMIT, "EOF after the echo", recv_to_eof(&mut s, 0, 0))
        .await
        .unwrap_or_else(|e| panic!("{path}: after the echo: {e}"));
    drop(s);
    daemon.stop();
}

/// The target sends a 40-byte banner as soon as it accepts (like SSH) and
/// the client only waits: the banner sits on the upstream socket before the
/// data path is set up and must still arrive within 2 s.
#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[case::auto(DataPath::Auto)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_speaks_first(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    const BANNER: &[u8; 40] = b"SSH-2.0-ebsocks_integration_test_server\n";
    const HELLO: &[u8] = b"client hello after the banner\n";
    let daemon = Daemon::start(DaemonOpts::path(path));
    let listener = listen("127.0.0.1:0").await;
    let target_addr = listener.local_addr().unwrap();
    let target = Task::spawn(async move {
        let mut s = accept_one(&listener).await;
        s.write_all(BANNER)
            .await
            .map_err(|e| format!("banner: {e}"))?;
        let mut got = vec![0u8; HELLO.len()];
        s.read_exact(&mut got)
            .await
            .map_err(|e| format!("reading the client's line: {e}"))?;
        if got != HELLO {
            return Err(format!("target got {got:?}"));
        }
        s.write_all(&got)
            .await
            .map_err(|e| format!("echoing the line: {e}"))?;
        recv_to_eof(&mut s, 0, 0)
            .await
            .map_err(|e| format!("target waiting for EOF: {e}"))?;
        s.shutdown()
            .await
            .map_err(|e| format!("target shutdown: {e}"))
    });
    let mut s = socks::connect(daemon.addr(), target_addr).await;
    let t0 = Instant::now();
    let mut banner = [0u8; 40];
    match tokio::time::timeout(PROMPT, s.read_exact(&mut banner)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("{path}: reading the banner: {e}"),
        Err(_) => panic!("{path}: the target's 40-byte banner did not arrive within {PROMPT:?} of the reply (bytes queued before the data path was set up are stuck)"),
    }
    assert_eq!(&banner, BANNER, "{path}: banner");
    eprintln!("{path}: banner after {:?}", t0.elapsed());
    s.write_all(HELLO).await.expect("client line");
    let mut back = vec![0u8; HELLO.len()];
    within(
        PROMPT,
        "the target's echo of the client's line",
        s.read_exact(&mut back),
    )
    .await
    .unwrap_or_else(|e| panic!("{path}: reading the echo: {e}"));
    assert_eq!(back, HELLO);
    s.shutdown().await.expect("shutdown");
    within(LIMIT, "EOF from the target", recv_to_eof(&mut s, 0, 0))
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    target
        .join(LIMIT, "target")
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    drop(s);
    daemon.stop();
}

/// A client that writes a few bytes right after the reply (iperf3 sends a
/// 37-byte cookie and waits) gets the echo within 2 s: the bytes may land
/// before the data path is set up.
#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[case::auto(DataPath::Auto)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_payload_right_after_reply(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    const SEED: u64 = 0x919e_0037;
    let daemon = Daemon::start(DaemonOpts::path(path));
    let echo = Echo::start("127.0.0.1:0").await;
    let mut s = socks::connect(daemon.addr(), echo.addr).await;
    s.write_all(&Pattern::bytes(SEED, 37))
        .await
        .expect("write cookie");
    match tokio::time::timeout(PROMPT, recv_exact(&mut s, SEED, 37)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{path}: echo of 37 bytes: {e}"),
        Err(_) => panic!(
            "{path}: echo of 37 bytes sent right after the reply did not arrive within {PROMPT:?}"
        ),
    }
    s.shutdown().await.expect("shutdown");
    within(LIMIT, "EOF after the echo", recv_to_eof(&mut s, 0, 0))
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    drop(s);
    daemon.stop();
}

/// Greeting, CONNECT, 4 KiB of payload in one write, then FIN at once: the
/// client socket may be in CLOSE_WAIT before the daemon sets up the data
/// path (and then cannot enter a sockhash). The payload must still reach the
/// echo target and its echo come back, followed by EOF.
#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[case::auto(DataPath::Auto)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_and_fin_with_the_request(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    const LEN: u64 = 4096;
    const SEED: u64 = 0x919e_0f17;
    let daemon = Daemon::start(DaemonOpts::path(path));
    let echo = Echo::start("127.0.0.1:0").await;
    let mut s = tokio::net::TcpStream::connect(daemon.addr())
        .await
        .expect("connect");
    let mut all = socks::greeting();
    all.extend_from_slice(&socks::request(socks::CMD_CONNECT, &Target::Ip(echo.addr)));
    all.extend_from_slice(&Pattern::bytes(SEED, LEN as usize));
    s.write_all(&all).await.expect("write");
    s.shutdown()
        .await
        .expect("shutdown right after the request");
    within(LIMIT, "method selection", socks::read_method(&mut s))
        .await
        .unwrap_or_else(|e| panic!("{path}: method selection: {e}"));
    let reply = within(LIMIT, "reply", socks::read_reply(&mut s))
        .await
        .unwrap_or_else(|e| panic!("{path}: reply: {e}"));
    assert_eq!(reply.code, socks::REP_SUCCEEDED, "{path}: reply {reply:?}");
    within(
        LIMIT,
        "echo of the payload sent with FIN, then EOF",
        recv_to_eof(&mut s, SEED, LEN),
    )
    .await
    .unwrap_or_else(|e| panic!("{path}: echo of the payload sent with FIN: {e}"));
    drop(s);
    daemon.stop();
}
