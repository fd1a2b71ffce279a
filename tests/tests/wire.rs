//! What the daemon puts on the wire around the negotiation. A new TCP connection acknowledges
//! its first segments at once; the daemon's accepted sockets start with delayed
//! acknowledgements instead (README, "Control plane"), so the client's greeting is
//! acknowledged by the method reply that answers it, not by a pure ACK before it: one packet
//! fewer per session, which short sessions on a busy host pay for in softirq time.

use std::time::{Duration, Instant};

use proxy_integration::{
    procfs::tcp_segments,
    require_privileged,
    socks::{self, Target},
    within, Daemon, DaemonOpts, DataPath, Echo,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const LIMIT: Duration = Duration::from_secs(10);
/// A reply later than this may have let the delayed-ACK timer (40 ms) fire first, which is
/// the kernel's rule and not what this test checks; such an attempt is repeated.
const PROMPT: Duration = Duration::from_millis(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_method_reply_acknowledges_the_greeting() {
    if !require_privileged(&DataPath::Copy.feature()) {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Copy));
    let echo = Echo::start("127.0.0.1:0").await;
    let mut prompt = 0;
    for attempt in 1..=10 {
        let mut s = TcpStream::connect(daemon.addr()).await.expect("connect");
        s.set_nodelay(true).unwrap();
        let t = Instant::now();
        s.write_all(&socks::greeting()).await.unwrap();
        within(LIMIT, "method reply", socks::read_method(&mut s))
            .await
            .expect("method reply");
        let took = t.elapsed();
        let (_, segs_in) = tcp_segments(s.local_addr().unwrap(), daemon.addr())
            .expect("the client's socket in ss");
        if took > PROMPT {
            eprintln!("attempt {attempt}: the reply took {took:?}; again");
            continue;
        }
        prompt += 1;
        // SYN-ACK and the method reply; a pure ACK of the greeting would be a third.
        assert_eq!(
            segs_in, 2,
            "attempt {attempt}: the client received {segs_in} segments up to the method reply \
             (reply after {took:?})"
        );
        // The session goes on as any other.
        s.write_all(&socks::request(socks::CMD_CONNECT, &Target::Ip(echo.addr)))
            .await
            .unwrap();
        let r = within(LIMIT, "CONNECT reply", socks::read_reply(&mut s))
            .await
            .expect("CONNECT reply");
        assert_eq!(r.code, socks::REP_SUCCEEDED, "reply {r:?}");
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        within(LIMIT, "echo", s.read_exact(&mut back))
            .await
            .expect("echo");
        assert_eq!(&back, b"ping");
        if prompt == 3 {
            break;
        }
    }
    assert_eq!(prompt, 3, "the daemon never replied within {PROMPT:?}");
    daemon.stop();
}
