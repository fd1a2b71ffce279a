//! A real UDP ASSOCIATE client against the daemon: PySocks (Debian's `python3-socks`) sends
//! datagrams through the relay to a UDP echo server the test runs on 127.0.0.1, for an IPv4
//! literal and a domain name, and reads the echoes back.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use proxy_integration::{require_privileged, skip_or_panic, Daemon, DaemonOpts, Task};
use tokio::net::UdpSocket;

/// Debian's interpreter, where `python3-socks` installs the `socks` module.
const PYTHON: &str = "/usr/bin/python3";
const LIMIT: Duration = Duration::from_secs(20);

const CLIENT: &str = r#"
import socks, socket, sys
proxy_port, target, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port)
s.settimeout(5)
for i in range(3):
    msg = b"datagram %d for %s" % (i, target.encode())
    s.sendto(msg, (target, port))
    data, _ = s.recvfrom(2048)
    if data != msg[::-1]:
        sys.exit("echo mismatch: %r" % data)
print("ok")
"#;

fn pysocks_installed() -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import socks"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok || skip_or_panic(
        "PySocks UDP client",
        "python3-socks is not installed (cargo xtask setup --apt)",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pysocks_udp_associate_round_trips() {
    if !require_privileged("UDP ASSOCIATE with a real client") || !pysocks_installed() {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::default());
    // Echo server: answers each datagram reversed, so an echo cannot be the request looped back.
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = echo.local_addr().unwrap().port();
    let server = Task::spawn(async move {
        let mut buf = vec![0u8; 2048];
        for _ in 0..6 {
            let (n, from) = echo.recv_from(&mut buf).await.expect("echo recv");
            let reply: Vec<u8> = buf[..n].iter().rev().copied().collect();
            echo.send_to(&reply, from).await.expect("echo send");
        }
    });
    let proxy_port = daemon.addr().port().to_string();
    for target in ["127.0.0.1", "localhost"] {
        let args = vec![
            "-c".to_owned(),
            CLIENT.to_owned(),
            proxy_port.clone(),
            target.to_owned(),
            port.to_string(),
        ];
        let out = tokio::task::spawn_blocking(move || {
            let mut child = Command::new(PYTHON)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn python3");
            let t0 = Instant::now();
            while child.try_wait().expect("try_wait").is_none() {
                if t0.elapsed() > LIMIT {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            child.wait_with_output().expect("python3 output")
        })
        .await
        .unwrap();
        assert!(
            out.status.success() && out.stdout == b"ok\n",
            "PySocks to {target}: {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    server.join(LIMIT, "the UDP echo server").await;
    let s = daemon.stats();
    assert!(
        s.counter("udp_associations_total") >= 2,
        "two associations expected: {s}"
    );
    assert!(
        s.traffic("udp", "relay", "up") > 0 && s.traffic("udp", "relay", "down") > 0,
        "UDP relay traffic not counted: {s}"
    );
    daemon.stop();
}
