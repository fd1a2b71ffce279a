//! A real SOCKS client against the daemon: curl with `--socks5-hostname` (with and without
//! RFC 1929 credentials) and `--socks4a`, fetching from a one-response HTTP server the test
//! runs on 127.0.0.1. Without curl the tests skip, except in CI, where they fail.

use std::{
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use proxy_integration::{
    checks::wait_counter, listen, require_privileged, skip_or_panic, Daemon, DaemonOpts, Task,
    UsersFile,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// curl's own bound (`--max-time`); the process is killed a little after it.
const CURL_LIMIT: Duration = Duration::from_secs(15);

fn curl_installed() -> bool {
    let ok = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok || skip_or_panic("curl", "curl is not installed (cargo xtask setup --apt)")
}

/// Runs curl with `args` (plus -q -sS --max-time), bounded, and returns its output.
async fn curl(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("curl");
        cmd.args(["-q", "-sS", "--max-time"])
            .arg(CURL_LIMIT.as_secs().to_string())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in [
            "http_proxy",
            "https_proxy",
            "HTTPS_PROXY",
            "all_proxy",
            "ALL_PROXY",
            "no_proxy",
            "NO_PROXY",
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn().expect("spawn curl");
        let t0 = Instant::now();
        while child.try_wait().expect("try_wait").is_none() {
            if t0.elapsed() > CURL_LIMIT + Duration::from_secs(5) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("curl {args:?} still running after {:?}", t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("curl output")
    })
    .await
    .expect("curl task")
}

/// An HTTP server that answers every request with `body` and records request heads.
struct Http {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    _task: Task<()>,
}

impl Http {
    async fn start(body: &'static str) -> Self {
        let l = listen("127.0.0.1:0").await;
        let port = l.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = Task::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await
                        {
                            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    seen.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Self {
            port,
            requests,
            _task: task,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn check_fetch(out: &Output, body: &str, what: &str) {
    assert!(
        out.status.success(),
        "{what}: curl exited with {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), body, "{what}: body");
}

/// `--socks5-hostname` and `--socks4a`: the proxy resolves `localhost`, the server sees
/// the request, and the daemon counts the sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_socks5_hostname_and_socks4a() {
    if !require_privileged("curl through the daemon") || !curl_installed() {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::default());
    const BODY: &str = "hello from the test server\n";
    let http = Http::start(BODY).await;
    let proxy = daemon.addr().to_string();
    for (i, (flag, path)) in [("--socks5-hostname", "/five"), ("--socks4a", "/four-a")]
        .into_iter()
        .enumerate()
    {
        let url = format!("http://localhost:{}{path}", http.port);
        let out = curl(vec![flag.into(), proxy.clone(), url.clone()]).await;
        check_fetch(&out, BODY, &format!("curl {flag} {proxy} {url}"));
        let reqs = http.requests();
        assert_eq!(reqs.len(), i + 1, "requests seen by the server: {reqs:?}");
        assert!(
            reqs[i].starts_with(&format!("GET {path} HTTP/1.1\r\n")),
            "request head: {:?}",
            reqs[i]
        );
        wait_counter(&daemon, "connections_accepted", i as u64 + 1).await;
    }
    daemon.stop();
}

/// `--socks5-hostname user:pass@host:port`: RFC 1929 with curl; a wrong password fails
/// and never reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_socks5_with_credentials() {
    if !require_privileged("curl through the daemon") || !curl_installed() {
        return;
    }
    let users = UsersFile::new(&[("alice", "s3cret-pass")]);
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: users.auth_toml(&["username"]),
        ..DaemonOpts::default()
    });
    const BODY: &str = "authenticated body\n";
    let http = Http::start(BODY).await;
    let url = format!("http://localhost:{}/auth", http.port);

    let proxy = format!("alice:s3cret-pass@{}", daemon.addr());
    let out = curl(vec!["--socks5-hostname".into(), proxy.clone(), url.clone()]).await;
    check_fetch(&out, BODY, &format!("curl --socks5-hostname {proxy} {url}"));
    wait_counter(&daemon, "auth_successes", 1).await;

    let bad = format!("alice:wrong@{}", daemon.addr());
    let out = curl(vec!["--socks5-hostname".into(), bad.clone(), url.clone()]).await;
    assert!(
        !out.status.success(),
        "curl with a wrong password succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_counter(&daemon, "auth_failures", 1).await;
    // No credentials at all: curl offers only "no authentication" and must fail too.
    let out = curl(vec![
        "--socks5-hostname".into(),
        daemon.addr().to_string(),
        url.clone(),
    ])
    .await;
    assert!(!out.status.success(), "curl without credentials succeeded");
    assert_eq!(
        http.requests().len(),
        1,
        "server requests: {:?}",
        http.requests()
    );
    wait_counter(&daemon, "auth_successes", 1).await;
    daemon.stop();
}
