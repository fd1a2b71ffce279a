//! In-process end-to-end tests of the SOCKS5 server through `ebsocks::run`, on loopback with
//! port 0, on the userspace data paths (no privileges needed). The in-kernel path is covered by
//! the privileged `proxy-integration` crate.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use ebsocks::{config::DataPathMode, Config, RunOptions};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
    time::timeout,
};

const T: Duration = Duration::from_secs(10);

struct Server {
    addr: SocketAddr,
    stop: Option<mpsc::Sender<()>>,
    task: JoinHandle<Result<(), ebsocks::Error>>,
    _dir: RemovedOnDrop,
}

/// The server's working directory (its address file, its pin directory), removed when the
/// server is dropped, also when a test fails.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Server {
    async fn start(path: DataPathMode, negotiation: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "ebsocks-proto-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let addr_file = dir.join("addr");
        let mut config = Config::parse(&format!(
            "listen = [\"127.0.0.1:0\"]\npin_dir = \"{}\"\n[timeouts]\nnegotiation = \"{negotiation}\"\ndrain = \"1s\"\n",
            dir.join("pins").display()
        ))
        .unwrap();
        config.data_path = path;
        let (tx, rx) = mpsc::channel::<()>(1);
        let opts = RunOptions {
            addr_file: Some(addr_file.clone()),
            ..Default::default()
        };
        let task = tokio::spawn(ebsocks::run(config, opts, rx));
        let addr = timeout(T, async {
            loop {
                if let Ok(s) = std::fs::read_to_string(&addr_file) {
                    if let Some(l) = s.lines().next() {
                        return l.parse().unwrap();
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("server did not start");
        Self {
            addr,
            stop: Some(tx),
            task,
            _dir: RemovedOnDrop(dir),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(()).await;
        timeout(T, self.task)
            .await
            .expect("run() did not return")
            .unwrap()
            .unwrap();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

fn connect_request(target: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(v4) = target else {
        panic!("v4 only")
    };
    let mut r = vec![5, 1, 0, 1];
    r.extend_from_slice(&v4.ip().octets());
    r.extend_from_slice(&v4.port().to_be_bytes());
    r
}

/// Reads until EOF (bounded); returns everything read.
async fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    timeout(T, s.read_to_end(&mut out))
        .await
        .expect("no EOF")
        .unwrap_or(0);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_greeting_request_and_payload_are_all_relayed() {
    for path in [DataPathMode::Copy, DataPathMode::Splice] {
        let server = Server::start(path, "5s").await;
        let echo = echo_server().await;
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut first = vec![5, 1, 0];
        first.extend(connect_request(echo));
        first.extend(&payload);
        c.write_all(&first).await.unwrap();
        c.shutdown().await.unwrap();
        let got = read_to_eof(&mut c).await;
        assert_eq!(&got[..2], &[5, 0], "{path:?}: method selection");
        assert_eq!(&got[2..4], &[5, 0], "{path:?}: CONNECT reply");
        assert_eq!(got[5], 1, "{path:?}: BND.ADDR is IPv4");
        assert_eq!(&got[12..], &payload[..], "{path:?}: echoed payload");
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_rfc_replies_and_a_close() {
    let server = Server::start(DataPathMode::Copy, "5s").await;
    // (bytes sent, expected reply bytes before the close)
    let cases: [(&[u8], &[u8]); 5] = [
        // Wrong version in the greeting: close without a reply.
        (&[4, 1, 0], &[]),
        // No acceptable method (only username/password offered).
        (&[5, 1, 2], &[5, 0xff]),
        // Unknown command 9.
        (
            &[5, 1, 0, 5, 9, 0, 1, 127, 0, 0, 1, 0, 80],
            &[5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0],
        ),
        // Unknown address type 9.
        (
            &[5, 1, 0, 5, 1, 0, 9, 1, 2, 3],
            &[5, 0, 5, 8, 0, 1, 0, 0, 0, 0, 0, 0],
        ),
        // SOCKS4 with an unknown command: request rejected (91).
        (&[4, 9, 0, 80, 127, 0, 0, 1, 0], &[0, 91, 0, 0, 0, 0, 0, 0]),
    ];
    for (sent, want) in cases {
        let mut c = TcpStream::connect(server.addr).await.unwrap();
        c.write_all(sent).await.unwrap();
        let got = read_to_eof(&mut c).await;
        assert_eq!(got, want, "reply to {sent:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_target_gets_0x05_and_silent_client_is_cut() {
    let server = Server::start(DataPathMode::Copy, "300ms").await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut c = TcpStream::connect(server.addr).await.unwrap();
    let mut req = vec![5, 1, 0];
    req.extend(connect_request(closed));
    c.write_all(&req).await.unwrap();
    let got = read_to_eof(&mut c).await;
    assert_eq!(&got[..4], &[5, 0, 5, 5]);

    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let started = std::time::Instant::now();
    assert!(read_to_eof(&mut silent).await.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
    server.stop().await;
}
