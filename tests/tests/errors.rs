//! Negotiation failures get the reply code RFC 1928 prescribes, or a prompt
//! close when no reply can be formed; none of them may hang a connection.

use std::time::{Duration, Instant};

use proxy_integration::{
    require_privileged,
    socks::{self, Target},
    within, Daemon, DaemonOpts,
};
use rstest::rstest;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const LIMIT: Duration = Duration::from_secs(10);
const PROMPT: Duration = Duration::from_secs(2);

fn start() -> Option<Daemon> {
    require_privileged("SOCKS5 error replies").then(|| Daemon::start(DaemonOpts::default()))
}

/// Reads until EOF or a reset, for at most `limit`; returns how long it took
/// and how many bytes came before the close.
async fn wait_closed(s: &mut TcpStream, limit: Duration, what: &str) -> (Duration, usize) {
    let t0 = Instant::now();
    let mut buf = [0u8; 512];
    let mut seen = 0;
    loop {
        match tokio::time::timeout(limit.saturating_sub(t0.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (t0.elapsed(), seen),
            Ok(Ok(n)) => seen += n,
            Err(_) => {
                panic!("{what}: connection still open after {limit:?} ({seen} bytes received)")
            }
        }
    }
}

/// Sends `request` after a normal greeting and returns the reply code; the
/// connection must then be closed promptly.
async fn reply_code(d: &Daemon, request: &[u8]) -> u8 {
    let mut s = TcpStream::connect(d.addr()).await.expect("connect");
    s.write_all(&socks::greeting()).await.expect("greeting");
    within(LIMIT, "method selection", socks::read_method(&mut s))
        .await
        .expect("method selection");
    s.write_all(request).await.expect("request");
    let reply = within(LIMIT, "reply", socks::read_reply(&mut s))
        .await
        .unwrap_or_else(|e| panic!("reply to {request:02x?}: {e}"));
    wait_closed(&mut s, PROMPT, "after a failure reply").await;
    reply.code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_refused_port_replies_05() {
    let Some(daemon) = start() else { return };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The listener is dropped: nothing listens on `port` any more.
    let target = Target::Ip(([127, 0, 0, 1], port).into());
    let code = reply_code(&daemon, &socks::request(socks::CMD_CONNECT, &target)).await;
    assert_eq!(
        code,
        socks::REP_CONNECTION_REFUSED,
        "CONNECT to a closed port"
    );
    daemon.stop();
}

/// Commands the daemon does not serve. The expected codes are in the cases:
/// change a case when the daemon gains that command (UDP ASSOCIATE, say).
#[rstest]
#[case::unknown(0x7f, socks::REP_COMMAND_NOT_SUPPORTED)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_command(#[case] cmd: u8, #[case] expected: u8) {
    let Some(daemon) = start() else { return };
    let target = Target::Ip(([127, 0, 0, 1], 9).into());
    let code = reply_code(&daemon, &socks::request(cmd, &target)).await;
    assert_eq!(code, expected, "command {cmd:#04x}");
    daemon.stop();
}

/// ATYP 5 does not exist; the request stops there, so the daemon cannot know
/// the address length and must answer 0x08 right away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_address_type_replies_08() {
    let Some(daemon) = start() else { return };
    let code = reply_code(&daemon, &[socks::VERSION, socks::CMD_CONNECT, 0, 0x05]).await;
    assert_eq!(code, socks::REP_ADDRESS_TYPE_NOT_SUPPORTED, "ATYP 5");
    daemon.stop();
}

/// A wrong version byte, in the greeting or in the request, gets the
/// connection closed within 2 s (with or without an answer). Version 4 is
/// left out of the greeting cases: a SOCKS4 request may be served.
#[rstest]
#[case::version_6_greeting(&[6, 1, 0], false)]
#[case::garbage_greeting(b"GET / HTTP/1.1\r\n\r\n", false)]
#[case::version_4_request(&[4, 1, 0, 1, 127, 0, 0, 1, 0, 80], true)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_version_is_closed_promptly(#[case] bytes: &[u8], #[case] after_greeting: bool) {
    let Some(daemon) = start() else { return };
    let mut s = TcpStream::connect(daemon.addr()).await.expect("connect");
    if after_greeting {
        s.write_all(&socks::greeting()).await.expect("greeting");
        within(LIMIT, "method selection", socks::read_method(&mut s))
            .await
            .expect("method selection");
    }
    s.write_all(bytes).await.expect("write");
    let (took, _) = wait_closed(&mut s, PROMPT, &format!("after {bytes:02x?}")).await;
    eprintln!("closed after {took:?}");
    daemon.stop();
}

/// With `negotiation = "1s"`, a client that goes quiet during negotiation is
/// closed about a second after it connected: not much earlier (then it is not
/// the timeout), not much later.
#[rstest]
#[case::sends_nothing(false)]
#[case::sends_greeting_only(true)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_is_closed_after_negotiation_timeout(#[case] greet: bool) {
    if !require_privileged("SOCKS5 negotiation timeout") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: "[timeouts]\nnegotiation = \"1s\"\n".into(),
        ..DaemonOpts::default()
    });
    let t0 = Instant::now();
    let mut s = TcpStream::connect(daemon.addr()).await.expect("connect");
    if greet {
        s.write_all(&socks::greeting()).await.expect("greeting");
        within(LIMIT, "method selection", socks::read_method(&mut s))
            .await
            .expect("method selection");
    }
    wait_closed(
        &mut s,
        Duration::from_secs(4),
        "idle client with negotiation = 1s",
    )
    .await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "closed after {took:?}, before the 1 s negotiation timeout"
    );
    daemon.stop();
}
