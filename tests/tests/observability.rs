//! Observability, checked against known traffic and known failures:
//!
//! - after N bytes each way through a session, the per-session figures (`ebsocks sessions`)
//!   and the per-protocol rows (`ebsocks stats`) equal N, on every data path;
//! - the per-state gauges follow sessions through their states and return to zero;
//! - each failure reason's counter moves by exactly the failures provoked;
//! - `/metrics`, scraped over HTTP and parsed by a strict OpenMetrics parser, agrees with
//!   `ebsocks stats --json` figure for figure;
//! - `ebsocks sessions` shows a live spliced session's bytes growing while it transfers;
//! - the end of every session is logged with its fields.

use std::{
    net::SocketAddr,
    os::{fd::AsRawFd as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use openmetrics_parser::{HistogramValue, MetricsExposition, OpenMetricsType, OpenMetricsValue};
use proxy_integration::{
    accept_one,
    checks::{wait_counter, wait_gauge, wait_log, wait_sessions_drained},
    daemon::daemon_binary,
    exchange, listen, poll_until, require_privileged, send_and_recv,
    socks::{self, Auth, Target},
    wait_closed, within, Daemon, DaemonOpts, DataPath, Echo, Plan, Task, UsersFile,
};
use rstest::rstest;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const LIMIT: Duration = Duration::from_secs(30);
/// Bound for figures the daemon publishes after the fact.
const SETTLE: Duration = Duration::from_secs(5);
/// Bound for one CLI run.
const CLI_LIMIT: Duration = Duration::from_secs(10);
/// The Prometheus endpoint on a port the kernel picks.
const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

// ---------------------------------------------------------------------------------------------
// The CLI, the control socket and the endpoint, as a user reaches them.
// ---------------------------------------------------------------------------------------------

/// Runs the daemon binary with `args` and returns its standard output; panics unless it exits
/// 0 within [`CLI_LIMIT`].
fn cli(args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(daemon_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn ebsocks {args:?}: {e}"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if t0.elapsed() > CLI_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`ebsocks {}` did not finish within {CLI_LIMIT:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        status.success(),
        "`ebsocks {}` exited with {status}\nstdout:\n{out}\nstderr:\n{err}",
        args.join(" ")
    );
    out
}

/// Runs `ebsocks ARGS` (bounded by [`CLI_LIMIT`]) with its output into a pipe whose reading end
/// is already closed; returns its exit status and what it wrote to stderr.
fn cli_into_closed_pipe(args: &[&str]) -> (std::process::ExitStatus, String) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new("timeout")
        .arg(CLI_LIMIT.as_secs().to_string())
        .arg(daemon_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .output()
        .unwrap_or_else(|e| panic!("spawn ebsocks {args:?}: {e}"));
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ebsocks sessions --json` for this daemon (control socket derived from its pin directory).
fn sessions(d: &Daemon) -> Vec<Value> {
    let pin = d.pin_dir().to_string_lossy().into_owned();
    let out = cli(&["sessions", "--json", "--pin-dir", &pin]);
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("`ebsocks sessions --json` printed invalid JSON ({e}):\n{out}"));
    v.as_array()
        .unwrap_or_else(|| panic!("`ebsocks sessions --json` is not an array: {v}"))
        .clone()
}

/// The session of `ebsocks sessions` whose client address is `client`.
fn session_of(d: &Daemon, client: SocketAddr) -> Option<Value> {
    sessions(d)
        .into_iter()
        .find(|s| s["client"].as_str() == Some(&client.to_string()))
}

/// Where the daemon puts its control socket when the config does not say.
fn control_path(d: &Daemon) -> PathBuf {
    let name = d
        .pin_dir()
        .file_name()
        .expect("pin dir name")
        .to_string_lossy()
        .into_owned();
    Path::new("/run/ebsocks").join(format!("{name}.sock"))
}

/// The bound `/metrics` address, as `ebsocks stats --json` reports it from the daemon.
fn metrics_addr(d: &Daemon) -> SocketAddr {
    let s = d.stats_json();
    s["daemon"]["metrics_listen"]
        .as_str()
        .unwrap_or_else(|| panic!("`stats --json` has no daemon.metrics_listen: {s}"))
        .parse()
        .expect("metrics address")
}

/// One HTTP/1.1 exchange; returns (status line, headers, body).
async fn http(addr: SocketAddr, request: &str) -> (String, String, String) {
    within(LIMIT, "HTTP exchange with the metrics endpoint", async {
        let mut s = TcpStream::connect(addr)
            .await
            .expect("connect to the metrics endpoint");
        s.write_all(request.as_bytes())
            .await
            .expect("send the request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read the response");
        let text = String::from_utf8(raw).expect("UTF-8 response");
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of headers in {text:?}"));
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (
            status.to_owned(),
            headers.to_ascii_lowercase(),
            body.to_owned(),
        )
    })
    .await
}

/// Scrapes `/metrics` and parses it as Prometheus would (OpenMetrics text).
async fn scrape(addr: SocketAddr) -> (String, Exposition) {
    let (status, headers, body) = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: ebsocks\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
    assert!(
        headers.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{headers}"
    );
    assert!(
        headers.contains(&format!("content-length: {}", body.len())),
        "{headers}"
    );
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&body)
        .unwrap_or_else(|e| panic!("/metrics is not valid OpenMetrics text ({e:?}):\n{body}"));
    (body, parsed)
}

/// The value of the counter or gauge sample of `family` with exactly `labels`.
fn sample(m: &Exposition, family: &str, labels: &[(&str, &str)], body: &str) -> f64 {
    let f = m
        .families
        .get(family)
        .unwrap_or_else(|| panic!("/metrics has no family {family}:\n{body}"));
    let s = f
        .iter_samples()
        .find(|s| {
            let set = s.get_labelset().expect("label set");
            set.iter_names().count() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| set.get_label_value(k) == Some(*v))
        })
        .unwrap_or_else(|| panic!("/metrics: {family} has no sample {labels:?}:\n{body}"));
    match &s.value {
        OpenMetricsValue::Counter(c) => c.value.as_f64(),
        OpenMetricsValue::Gauge(g) => g.as_f64(),
        other => panic!("/metrics: {family}{labels:?} is {other:?}, expected a counter or gauge"),
    }
}

fn histogram<'a>(m: &'a Exposition, family: &str, body: &str) -> &'a HistogramValue {
    let f = m
        .families
        .get(family)
        .unwrap_or_else(|| panic!("/metrics has no family {family}:\n{body}"));
    assert_eq!(f.family_type, OpenMetricsType::Histogram, "{family}");
    match &f
        .iter_samples()
        .next()
        .unwrap_or_else(|| panic!("{family} has no sample"))
        .value
    {
        OpenMetricsValue::Histogram(h) => h,
        other => panic!("{family} is {other:?}"),
    }
}

fn counter(stats: &Value, name: &str) -> u64 {
    stats["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("stats: no counter {name}: {}", stats["counters"]))
}

/// Every figure of `stats --json` against its `/metrics` sample; the first mismatch, if any.
fn disagreement(stats: &Value, m: &Exposition, body: &str) -> Option<String> {
    let mut checks: Vec<(String, f64, f64)> = Vec::new();
    let mut check = |what: String, want: u64, got: f64| checks.push((what, want as f64, got));

    for row in stats["traffic"].as_array().expect("traffic rows") {
        let (proto, path, dir) = (
            row["proto"].as_str().unwrap(),
            row["path"].as_str().unwrap(),
            row["dir"].as_str().unwrap(),
        );
        let labels = [("path", path), ("direction", dir)];
        let packets = if proto == "udp" {
            "ebsocks_udp_datagrams"
        } else {
            "ebsocks_tcp_packets"
        };
        check(
            format!("{proto} bytes {path}/{dir}"),
            row["bytes"].as_u64().unwrap(),
            sample(m, &format!("ebsocks_{proto}_bytes"), &labels, body),
        );
        check(
            format!("{proto} packets {path}/{dir}"),
            row["packets"].as_u64().unwrap(),
            sample(m, packets, &labels, body),
        );
    }
    let states = [
        ("negotiating", "sessions_negotiating"),
        ("authenticating", "sessions_authenticating"),
        ("resolving", "sessions_resolving"),
        ("connecting", "sessions_connecting"),
        ("bind_waiting", "sessions_bind_waiting"),
        ("sockmap", "sessions_active_sockmap"),
        ("splice", "sessions_active_splice"),
        ("copy", "sessions_active_copy"),
        ("udp", "udp_associations_active"),
    ];
    for (state, c) in states {
        check(
            format!("state {state}"),
            counter(stats, c),
            sample(m, "ebsocks_sessions_active", &[("state", state)], body),
        );
    }
    for (cmd, c) in [
        ("connect", "connect"),
        ("bind", "bind"),
        ("udpassociate", "udp_associate"),
    ] {
        check(
            format!("created {cmd}"),
            counter(stats, &format!("sessions_created_{c}")),
            sample(m, "ebsocks_sessions_created", &[("command", cmd)], body),
        );
        check(
            format!("ended {cmd}"),
            counter(stats, &format!("sessions_ended_{c}")),
            sample(m, "ebsocks_sessions_ended", &[("command", cmd)], body),
        );
    }
    for p in ["sockmap", "splice", "copy"] {
        check(
            format!("relays started {p}"),
            counter(stats, &format!("sessions_total_{p}")),
            sample(m, "ebsocks_relays_started", &[("path", p)], body),
        );
        check(
            format!("relays ended {p}"),
            counter(stats, &format!("sessions_ended_{p}")),
            sample(m, "ebsocks_relays_ended", &[("path", p)], body),
        );
    }
    let mut reasons = 0;
    for (name, v) in stats["counters"].as_object().expect("counters") {
        if let Some(reason) = name.strip_prefix("failures_") {
            reasons += 1;
            check(
                format!("failure {reason}"),
                v.as_u64().unwrap(),
                sample(m, "ebsocks_session_failures", &[("reason", reason)], body),
            );
        }
    }
    assert!(
        reasons >= 15,
        "stats has only {reasons} failure reasons: {}",
        stats["counters"]
    );
    for (metric, c) in [
        ("ebsocks_relay_fallbacks", "sessions_fallback"),
        ("ebsocks_sessions_failed", "sessions_failed"),
        ("ebsocks_connections_accepted", "connections_accepted"),
        ("ebsocks_connections_refused", "connections_refused"),
        ("ebsocks_accept_errors", "accept_errors"),
        ("ebsocks_negotiation_timeouts", "negotiation_timeouts"),
        ("ebsocks_requests_blocked", "requests_blocked"),
        ("ebsocks_binds", "binds_total"),
        ("ebsocks_udp_associations", "udp_associations_total"),
    ] {
        check(
            metric.to_owned(),
            counter(stats, c),
            sample(m, metric, &[], body),
        );
    }
    for (result, c) in [("success", "auth_successes"), ("failure", "auth_failures")] {
        check(
            format!("auth {result}"),
            counter(stats, c),
            sample(m, "ebsocks_auth_attempts", &[("result", result)], body),
        );
    }
    for r in ["frag", "foreign", "malformed", "blocked"] {
        check(
            format!("udp dropped {r}"),
            counter(stats, &format!("udp_dropped_{r}")),
            sample(m, "ebsocks_udp_dropped", &[("reason", r)], body),
        );
    }
    for name in ["connect_latency", "dns_latency"] {
        let want = &stats["histograms"][name];
        let got = histogram(m, &format!("ebsocks_{name}_seconds"), body);
        check(
            format!("{name} count"),
            want["count"].as_u64().unwrap(),
            got.count.unwrap_or(u64::MAX) as f64,
        );
        let (ws, gs) = (
            want["sum_seconds"].as_f64().unwrap(),
            got.sum.map_or(f64::NAN, |s| s.as_f64()),
        );
        if (ws - gs).abs() > 1e-6 {
            return Some(format!("{name} sum: stats {ws}, /metrics {gs}"));
        }
        let wb = want["buckets"].as_array().unwrap();
        // The exposition has the same bounds plus +Inf.
        if got.buckets.len() != wb.len() + 1 {
            return Some(format!(
                "{name}: {} buckets in /metrics, {} in stats",
                got.buckets.len(),
                wb.len()
            ));
        }
        for (w, g) in wb.iter().zip(&got.buckets) {
            let le = w["le"].as_f64().unwrap();
            if (le - g.upper_bound).abs() > 1e-12 {
                return Some(format!(
                    "{name}: bucket bound {le} in stats, {} in /metrics",
                    g.upper_bound
                ));
            }
            check(
                format!("{name} le {le}"),
                w["count"].as_u64().unwrap(),
                g.count.as_f64(),
            );
        }
        check(
            format!("{name} +Inf"),
            want["count"].as_u64().unwrap(),
            got.buckets.last().unwrap().count.as_f64(),
        );
    }
    checks
        .into_iter()
        .find(|(_, want, got)| want != got)
        .map(|(what, want, got)| format!("{what}: stats {want}, /metrics {got}"))
}

/// Reads `stats --json` and `/metrics` until two stats reads around one scrape are equal (the
/// daemon is quiet), then requires every figure to agree.
async fn assert_stats_and_metrics_agree(d: &Daemon) {
    let addr = metrics_addr(d);
    let t0 = Instant::now();
    loop {
        let before = d.stats_json();
        let (body, parsed) = scrape(addr).await;
        let after = d.stats_json();
        let quiet = ["traffic", "counters", "histograms"]
            .iter()
            .all(|k| before[k] == after[k]);
        if quiet {
            if let Some(diff) = disagreement(&after, &parsed, &body) {
                panic!("`ebsocks stats --json` and /metrics disagree: {diff}\nstats: {after}\n/metrics:\n{body}");
            }
            return;
        }
        assert!(
            t0.elapsed() < SETTLE,
            "the daemon's figures kept changing; cannot compare stats and /metrics"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every per-state gauge is zero.
async fn wait_states_zero(d: &Daemon) {
    for g in [
        "sessions_negotiating",
        "sessions_authenticating",
        "sessions_resolving",
        "sessions_connecting",
        "sessions_bind_waiting",
        "sessions_active_sockmap",
        "sessions_active_splice",
        "sessions_active_copy",
        "udp_associations_active",
    ] {
        wait_gauge(d, g, 0).await;
    }
}

/// Waits until the daemon lists `client`'s session in `state` and the state's gauge reads 1.
async fn wait_state(d: &Daemon, client: SocketAddr, state: &str, gauge: &str) -> Value {
    let s = poll_until(
        SETTLE,
        &format!("session of {client} in state {state}"),
        |last| {
            let s = session_of(d, client);
            *last = format!("{s:?}");
            s.filter(|s| s["state"] == state)
        },
    )
    .await;
    wait_gauge(d, gauge, 1).await;
    s
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[rstest]
#[case::sockmap(DataPath::Sockmap)]
#[case::splice(DataPath::Splice)]
#[case::copy(DataPath::Copy)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_equal_the_bytes_moved(#[case] path: DataPath) {
    if !require_privileged(&path.feature()) {
        return;
    }
    const UP: u64 = (3 << 20) + 777;
    const DOWN: u64 = (5 << 20) + 99;
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: METRICS.into(),
        ..DaemonOpts::path(path)
    });
    let p = path.as_str();

    // The control socket: root only, removed at exit (checked after `stop`).
    let control = control_path(&daemon);
    let mode = std::fs::metadata(&control)
        .unwrap_or_else(|e| panic!("control socket {}: {e}", control.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    let listener = listen("127.0.0.1:0").await;
    let target_addr = listener.local_addr().unwrap();
    let accept = Task::spawn(async move { accept_one(&listener).await });
    let mut client = socks::connect(daemon.addr(), target_addr).await;
    let client_addr = client.local_addr().unwrap();
    let mut target = accept.join(LIMIT, "target accept").await;
    within(LIMIT, "transfer", async {
        tokio::try_join!(
            send_and_recv(&mut client, (1, UP), (2, DOWN)),
            send_and_recv(&mut target, (2, DOWN), (1, UP))
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{path}: transfer: {e}"));

    // Per session, while it is open: `ebsocks sessions`.
    let s = poll_until(
        SETTLE,
        &format!("ebsocks sessions to show up {UP} down {DOWN}"),
        |last| {
            let s = session_of(&daemon, client_addr);
            *last = format!("{s:?}");
            s.filter(|s| s["up_bytes"] == UP && s["down_bytes"] == DOWN)
        },
    )
    .await;
    assert_eq!(s["state"], "relaying", "{s}");
    assert_eq!(s["path"], p, "{s}");
    assert_eq!(s["command"], "connect", "{s}");
    assert_eq!(s["target"], target_addr.to_string(), "{s}");
    assert_eq!(s["rule"], "pass-all", "{s}");
    assert_eq!(s["user"], Value::Null, "{s}");
    for side in ["client_tcp", "upstream_tcp"] {
        assert_eq!(s[side]["state"], "ESTABLISHED", "{side}: {s}");
        assert!(
            s[side]["rtt_us"].as_u64().is_some_and(|r| r > 0),
            "{side} RTT: {s}"
        );
    }
    let id = s["id"].as_u64().expect("session id");

    // Per protocol, and the kernel's own per-session rows for the sockmap path.
    let stats = daemon.stats();
    assert_eq!(
        (
            stats.traffic("tcp", p, "up"),
            stats.traffic("tcp", p, "down")
        ),
        (UP, DOWN),
        "{stats}"
    );
    if path == DataPath::Sockmap {
        let row = stats
            .sessions()
            .into_iter()
            .find(|r| r.id == id)
            .unwrap_or_else(|| panic!("no kernel row for session {id}: {stats}"));
        assert_eq!((row.up_bytes, row.down_bytes), (UP, DOWN), "{stats}");
    }
    assert_eq!(stats.counter(&format!("sessions_active_{p}")), 1, "{stats}");
    assert_eq!(stats.counter("sessions_created_connect"), 1, "{stats}");
    assert_eq!(stats.counter("sessions_ended_connect"), 0, "{stats}");
    // The human table shows the session too.
    let table = cli(&["sessions", "--pin-dir", &daemon.pin_dir().to_string_lossy()]);
    assert!(
        table.contains(&client_addr.to_string()) && table.contains(&UP.to_string()),
        "{table}"
    );
    // Into a reader that went away (`ebsocks sessions | head -1`, when head has exited): a
    // quiet end, not a panic.
    for args in [
        &["sessions"][..],
        &["sessions", "--json"],
        &["stats"],
        &["stats", "--json"],
    ] {
        let pin = daemon.pin_dir().to_string_lossy().into_owned();
        let (status, stderr) = cli_into_closed_pipe(&[args, &["--pin-dir", &pin]].concat());
        assert!(
            status.success() && stderr.is_empty(),
            "{args:?}: {status}: {stderr}"
        );
    }
    assert_stats_and_metrics_agree(&daemon).await;

    within(LIMIT, "closing the session", async {
        tokio::try_join!(
            exchange(&mut client, Plan::close()),
            exchange(&mut target, Plan::sink(0, 0))
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{path}: closing: {e}"));
    wait_sessions_drained(&daemon).await;
    wait_states_zero(&daemon).await;
    wait_counter(&daemon, "sessions_ended_connect", 1).await;
    let stats = daemon.stats();
    assert_eq!(stats.counter(&format!("sessions_ended_{p}")), 1, "{stats}");
    assert_eq!(
        (
            stats.traffic("tcp", p, "up"),
            stats.traffic("tcp", p, "down")
        ),
        (UP, DOWN),
        "{stats}"
    );
    assert_eq!(
        stats.json["histograms"]["connect_latency"]["count"], 1,
        "{stats}"
    );
    assert!(
        sessions(&daemon).is_empty(),
        "a closed session is still listed"
    );
    assert_stats_and_metrics_agree(&daemon).await;

    // One end line with every field.
    let line = format!("session={id} client={client_addr} target=\"{target_addr}\" user=\"-\" rule=\"pass-all\" command=\"connect\" path=\"{p}\" up={UP} down={DOWN}");
    wait_log(&daemon, &line, 1).await;
    assert!(
        daemon.stderr_log().contains("end=\"eof\""),
        "{}",
        daemon.stderr_log()
    );

    // The endpoint speaks only GET /metrics.
    let addr = metrics_addr(&daemon);
    let (status, ..) = http(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    let (status, ..) = http(addr, "GET /other HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    daemon.stop();
    assert!(
        !control.exists(),
        "the control socket {} outlived the daemon",
        control.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_shows_spliced_bytes_growing() {
    if !require_privileged("data path sockmap") {
        return;
    }
    const CHUNK: usize = 128 * 1024;
    const CHUNKS: u64 = 30;
    const TOTAL: u64 = CHUNKS * CHUNK as u64;
    let daemon = Daemon::start(DaemonOpts::path(DataPath::Sockmap));
    let listener = listen("127.0.0.1:0").await;
    let target_addr = listener.local_addr().unwrap();
    let accept = Task::spawn(async move { accept_one(&listener).await });
    let mut client = socks::connect(daemon.addr(), target_addr).await;
    let client_addr = client.local_addr().unwrap();
    let mut target = accept.join(LIMIT, "target accept").await;

    // The target reads everything; the client sends a chunk every 100 ms.
    let reader = Task::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        while got < TOTAL {
            let n = target.read(&mut buf).await.expect("target read");
            assert!(n > 0, "EOF after {got} bytes");
            got += n as u64;
        }
        target
    });
    let writer = Task::spawn(async move {
        let chunk = vec![0x5a; CHUNK];
        for _ in 0..CHUNKS {
            client.write_all(&chunk).await.expect("client write");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        client
    });

    let mut seen: Vec<u64> = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2500) {
        if let Some(s) = session_of(&daemon, client_addr) {
            assert_eq!(s["path"], "sockmap", "{s}");
            assert_eq!(s["state"], "relaying", "{s}");
            if let Some(up) = s["up_bytes"].as_u64() {
                assert!(up <= TOTAL, "up_bytes {up} beyond the {TOTAL} sent");
                if seen.last() != Some(&up) {
                    seen.push(up);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "up_bytes went down: {seen:?}"
    );
    assert!(
        seen.len() >= 4,
        "up_bytes did not grow while the session transferred: {seen:?}"
    );

    let mut client = writer.join(LIMIT, "client writes").await;
    let mut target = reader.join(LIMIT, "target reads").await;
    poll_until(SETTLE, &format!("up_bytes == {TOTAL}"), |last| {
        let s = session_of(&daemon, client_addr);
        *last = format!("{s:?}");
        s.filter(|s| s["up_bytes"] == TOTAL && s["down_bytes"] == 0)
    })
    .await;
    within(LIMIT, "closing the session", async {
        tokio::try_join!(
            exchange(&mut client, Plan::close()),
            exchange(&mut target, Plan::close())
        )
    })
    .await
    .unwrap_or_else(|e| panic!("closing: {e}"));
    wait_sessions_drained(&daemon).await;
    daemon.stop();
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
/// hangs until the connecting side gives up. Loopback only.
struct FullListener {
    addr: SocketAddr,
    _listener: std::net::TcpListener,
    _queued: std::net::TcpStream,
}

impl FullListener {
    fn new() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        // SAFETY: a valid listening socket; listen(2) again only changes the backlog.
        let rc = unsafe { libc::listen(listener.as_raw_fd(), 0) };
        assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
        let addr = listener.local_addr().unwrap();
        let queued = std::net::TcpStream::connect(addr).expect("fill the accept queue");
        Self {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }
}

/// Sends `bytes` after connecting and returns the stream.
async fn raw(proxy: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = within(LIMIT, "connect to the daemon", TcpStream::connect(proxy))
        .await
        .expect("connect");
    s.write_all(bytes).await.expect("write");
    s
}

/// No-auth greeting, then the raw request; returns the reply code.
async fn raw_request(proxy: SocketAddr, request: &[u8]) -> u8 {
    let mut s = raw(proxy, &socks::greeting()).await;
    within(LIMIT, "method selection", socks::read_method(&mut s))
        .await
        .expect("method");
    s.write_all(request).await.expect("request");
    let mut head = [0u8; 2];
    within(LIMIT, "reply", s.read_exact(&mut head))
        .await
        .expect("reply");
    head[1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_counters_move_for_each_reason() {
    if !require_privileged("failure counters") {
        return;
    }
    let users = UsersFile::new(&[("alice", "secret")]);
    let blocked = listen("127.0.0.1:0").await;
    let blocked_port = blocked.local_addr().unwrap().port();
    let extra = format!(
        "{}[timeouts]\nnegotiation = \"2s\"\nconnect = \"2s\"\nbind = \"2s\"\n{METRICS}\
         [[socks_rule]]\nname = \"no-blocked-port\"\naction = \"block\"\nports = [{blocked_port}]\n\
         [[socks_rule]]\nname = \"rest\"\naction = \"pass\"\n",
        users.auth_toml(&["username", "none"])
    );
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: extra,
        ..DaemonOpts::default()
    });
    let proxy = daemon.addr();
    let mut want: Vec<(&str, u64)> = Vec::new();

    // connection_refused: a port nobody listens on.
    let closed = listen("127.0.0.1:0").await.local_addr().unwrap();
    let (_s, r) = socks::handshake(proxy, socks::CMD_CONNECT, &Target::Ip(closed), None)
        .await
        .expect("handshake");
    assert_eq!(r.code, socks::REP_CONNECTION_REFUSED);
    want.push(("connection_refused", 1));

    // rule_blocked.
    let (_s, r) = socks::handshake(
        proxy,
        socks::CMD_CONNECT,
        &Target::Ip(blocked.local_addr().unwrap()),
        None,
    )
    .await
    .expect("handshake");
    assert_eq!(r.code, socks::REP_NOT_ALLOWED);
    want.push(("rule_blocked", 1));
    wait_log(&daemon, "rule=\"no-blocked-port\"", 1).await;

    // auth_failed.
    let e = socks::handshake_auth(
        proxy,
        &Auth::user("alice", "wrong"),
        socks::CMD_CONNECT,
        &Target::Ip(closed),
    )
    .await
    .expect_err("wrong password");
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    want.push(("auth_failed", 1));

    // no_acceptable_method: GSSAPI only.
    let mut s = raw(proxy, &socks::greeting_methods(&[0x01])).await;
    assert_eq!(
        within(LIMIT, "method", socks::read_method_choice(&mut s))
            .await
            .expect("method"),
        socks::METHOD_NO_ACCEPTABLE
    );
    want.push(("no_acceptable_method", 1));

    // negotiation_timeout, seen in the negotiating state first.
    let mut s = raw(proxy, &[]).await;
    let s_addr = s.local_addr().unwrap();
    wait_state(&daemon, s_addr, "negotiating", "sessions_negotiating").await;
    wait_closed(&mut s, SETTLE, "silent client").await;
    // And once more from the authenticating state.
    let mut s = raw(proxy, &socks::greeting_methods(&[socks::METHOD_USERPASS])).await;
    assert_eq!(
        within(LIMIT, "method", socks::read_method_choice(&mut s))
            .await
            .expect("method"),
        socks::METHOD_USERPASS
    );
    wait_state(
        &daemon,
        s.local_addr().unwrap(),
        "authenticating",
        "sessions_authenticating",
    )
    .await;
    wait_closed(&mut s, SETTLE, "client silent in authentication").await;
    want.push(("negotiation_timeout", 2));

    // connect_timeout, seen in the connecting state first.
    let full = FullListener::new();
    let mut s = raw(proxy, &socks::greeting()).await;
    within(LIMIT, "method", socks::read_method(&mut s))
        .await
        .expect("method");
    s.write_all(&socks::request(socks::CMD_CONNECT, &Target::Ip(full.addr)))
        .await
        .expect("request");
    let st = wait_state(
        &daemon,
        s.local_addr().unwrap(),
        "connecting",
        "sessions_connecting",
    )
    .await;
    assert_eq!(st["target"], full.addr.to_string(), "{st}");
    let r = within(LIMIT, "reply", socks::read_reply(&mut s))
        .await
        .expect("reply");
    assert_eq!(r.code, socks::REP_TTL_EXPIRED);
    want.push(("connect_timeout", 1));

    // bind_timeout, seen in the bind_waiting state first.
    let mut s = raw(proxy, &socks::greeting()).await;
    within(LIMIT, "method", socks::read_method(&mut s))
        .await
        .expect("method");
    s.write_all(&socks::request(
        socks::CMD_BIND,
        &Target::Ip("127.0.0.1:0".parse().unwrap()),
    ))
    .await
    .expect("request");
    let r = within(LIMIT, "first BIND reply", socks::read_reply(&mut s))
        .await
        .expect("reply");
    assert_eq!(r.code, socks::REP_SUCCEEDED);
    wait_state(
        &daemon,
        s.local_addr().unwrap(),
        "bind_waiting",
        "sessions_bind_waiting",
    )
    .await;
    let r = within(LIMIT, "second BIND reply", socks::read_reply(&mut s))
        .await
        .expect("reply");
    assert_eq!(r.code, socks::REP_TTL_EXPIRED);
    want.push(("bind_timeout", 1));

    // command_not_supported and address_type_not_supported.
    assert_eq!(
        raw_request(proxy, &[5, 9, 0, 1, 127, 0, 0, 1, 0, 80]).await,
        socks::REP_COMMAND_NOT_SUPPORTED
    );
    want.push(("command_not_supported", 1));
    assert_eq!(
        raw_request(proxy, &[5, 1, 0, 5, 127, 0, 0, 1, 0, 80]).await,
        socks::REP_ADDRESS_TYPE_NOT_SUPPORTED
    );
    want.push(("address_type_not_supported", 1));

    // protocol_error: not SOCKS at all.
    let mut s = raw(proxy, &[6, 1, 0]).await;
    wait_closed(&mut s, SETTLE, "bad version").await;
    want.push(("protocol_error", 1));

    // client_closed: half a greeting, then EOF.
    let mut s = raw(proxy, &[5]).await;
    s.shutdown().await.expect("shutdown");
    wait_closed(&mut s, SETTLE, "half greeting").await;
    want.push(("client_closed", 1));

    // resolve_failed: a name with a 64-byte label, which the resolver refuses without asking
    // any server.
    let name = format!("{}.test", "a".repeat(64));
    let (_s, r) = socks::handshake(proxy, socks::CMD_CONNECT, &Target::Domain(name, 80), None)
        .await
        .expect("handshake");
    assert_eq!(r.code, socks::REP_HOST_UNREACHABLE);
    want.push(("resolve_failed", 1));

    // Two sessions that work, one by name: the latency histograms move.
    let echo = Echo::start("127.0.0.1:0").await;
    for t in [
        Target::Domain("localhost".into(), echo.addr.port()),
        Target::Ip(echo.addr),
    ] {
        let mut s = socks::try_connect(proxy, t).await.expect("CONNECT");
        within(LIMIT, "echo", async {
            s.write_all(b"ping").await?;
            s.shutdown().await?;
            let mut b = Vec::new();
            s.read_to_end(&mut b).await?;
            assert_eq!(b, b"ping");
            Ok::<_, std::io::Error>(())
        })
        .await
        .expect("echo");
    }

    let total: u64 = want.iter().map(|(_, n)| n).sum();
    for (reason, n) in &want {
        wait_counter(&daemon, &format!("failures_{reason}"), *n).await;
        wait_log(
            &daemon,
            &format!("reason=\"{reason}\""),
            usize::try_from(*n).unwrap(),
        )
        .await;
    }
    wait_counter(&daemon, "sessions_failed", total).await;
    wait_sessions_drained(&daemon).await;
    wait_states_zero(&daemon).await;
    let stats = daemon.stats_json();
    for (name, v) in stats["counters"].as_object().unwrap() {
        if let Some(reason) = name.strip_prefix("failures_") {
            let expected = want
                .iter()
                .find(|(r, _)| *r == reason)
                .map_or(0, |(_, n)| *n);
            assert_eq!(
                v.as_u64(),
                Some(expected),
                "failures_{reason}: {}",
                stats["counters"]
            );
        }
    }
    // CONNECT: refused, blocked, timed out, unresolvable, two that worked; BIND: one.
    assert_eq!(
        counter(&stats, "sessions_created_connect"),
        6,
        "{}",
        stats["counters"]
    );
    assert_eq!(
        counter(&stats, "sessions_created_bind"),
        1,
        "{}",
        stats["counters"]
    );
    wait_counter(&daemon, "sessions_ended_connect", 6).await;
    wait_counter(&daemon, "sessions_ended_bind", 1).await;
    assert_eq!(
        stats["histograms"]["dns_latency"]["count"], 2,
        "{}",
        stats["histograms"]
    );
    assert_eq!(
        stats["histograms"]["connect_latency"]["count"], 2,
        "{}",
        stats["histograms"]
    );
    assert_eq!(counter(&stats, "auth_failures"), 1);
    assert_stats_and_metrics_agree(&daemon).await;
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_time_refusals_are_counted() {
    if !require_privileged("failure counters") {
        return;
    }
    let extra = format!(
        "[limits]\nmax_sessions_per_client = 1\n[timeouts]\nnegotiation = \"5s\"\n{METRICS}\
         [[client_rule]]\nname = \"not-dot-two\"\naction = \"block\"\nfrom = [\"127.0.0.2\"]\n\
         [[client_rule]]\nname = \"loopback\"\naction = \"pass\"\nfrom = [\"127.0.0.0/8\"]\n"
    );
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: extra,
        allow_clients: false,
        ..DaemonOpts::default()
    });
    let proxy = daemon.addr();

    // client_blocked.
    let mut s = socks::tcp_connect_from("127.0.0.2".parse().unwrap(), proxy)
        .await
        .expect("connect from 127.0.0.2");
    wait_closed(&mut s, SETTLE, "blocked client").await;
    wait_counter(&daemon, "failures_client_blocked", 1).await;

    // limit: one session held in negotiation, a second one from the same address.
    let held = raw(proxy, &[]).await;
    wait_state(
        &daemon,
        held.local_addr().unwrap(),
        "negotiating",
        "sessions_negotiating",
    )
    .await;
    let mut s = raw(proxy, &[]).await;
    wait_closed(&mut s, SETTLE, "client over its session limit").await;
    wait_counter(&daemon, "failures_limit", 1).await;
    wait_counter(&daemon, "connections_refused", 2).await;

    drop(held);
    wait_counter(&daemon, "failures_client_closed", 1).await;
    wait_states_zero(&daemon).await;
    let stats = daemon.stats_json();
    assert_eq!(
        counter(&stats, "sessions_failed"),
        1,
        "{}",
        stats["counters"]
    );
    assert_eq!(
        counter(&stats, "connections_accepted"),
        3,
        "{}",
        stats["counters"]
    );
    assert_stats_and_metrics_agree(&daemon).await;
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_watch_and_control_errors() {
    if !require_privileged("stats --watch") {
        return;
    }
    let daemon = Daemon::start(DaemonOpts::default());
    let pin = daemon.pin_dir().to_string_lossy().into_owned();
    // Three refreshes, one JSON document per line, each with the daemon's part.
    let out = cli(&[
        "stats",
        "--pin-dir",
        &pin,
        "--watch",
        "--json",
        "--interval",
        "0.1",
        "--count",
        "3",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for l in lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert_eq!(
            v["daemon"]["pid"].as_u64(),
            Some(u64::from(daemon.pid())),
            "{v}"
        );
        assert!(v["counters"]["sessions_negotiating"].is_u64(), "{v}");
    }
    let table = cli(&[
        "stats",
        "--pin-dir",
        &pin,
        "--watch",
        "--interval",
        "0.1",
        "--count",
        "2",
    ]);
    assert!(
        table.contains("SESSIONS NOW") && table.contains("RATE"),
        "{table}"
    );
    // Into a file: both tables, one after the other, without a terminal's control codes.
    assert_eq!(table.matches("SESSIONS NOW").count(), 2, "{table}");
    assert!(!table.contains('\x1b'), "{table:?}");

    // The protocol: one JSON line each way; errors are answered, not dropped.
    let control = control_path(&daemon);
    let answer = within(LIMIT, "control exchange", async {
        let mut s = tokio::net::UnixStream::connect(&control)
            .await
            .expect("connect to the control socket");
        s.write_all(b"{\"cmd\":\"bogus\"}\n{\"cmd\":\"info\"}\n")
            .await
            .expect("write");
        s.shutdown().await.expect("shutdown");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    })
    .await;
    let lines: Vec<Value> = answer
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{answer}");
    assert_eq!(lines[0]["ok"], false, "{answer}");
    assert!(lines[0]["error"].is_string(), "{answer}");
    assert_eq!(lines[1]["ok"], true, "{answer}");
    assert_eq!(lines[1]["info"]["sessions"], 0, "{answer}");

    // Refusals say what to do: another user than root (or the daemon's) is told who may read,
    // a directory or socket no daemon made asks whether one runs with it.
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let missing = format!("{pin}-none");
    let cases: [(&[&str], &[&str], &str); 4] = [
        (&nobody, &["stats", "--pin-dir", &pin], "may open its pins"),
        (
            &nobody,
            &["sessions", "--pin-dir", &pin],
            "may open its control socket",
        ),
        (
            &[],
            &["stats", "--pin-dir", &missing],
            "is the daemon running with this pin_dir?",
        ),
        (
            &[],
            &["sessions", "--pin-dir", &missing],
            "is the daemon running with this control socket?",
        ),
    ];
    for (wrapper, args, hint) in cases {
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(daemon_binary());
                c
            }
            None => Command::new(daemon_binary()),
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run ebsocks {args:?}: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(hint), "{wrapper:?} {args:?}: {stderr}");
    }
    daemon.stop();
}

/// Per-user and per-rule accounting: each user's and rule's figures equal the payload its
/// sessions moved, while they are open and after they ended, in `stats --json` and `/metrics`;
/// `clients_active` counts the connected client addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_by_user_and_rule() {
    if !require_privileged("data path sockmap") {
        return;
    }
    const ALICE: (u64, u64) = ((2 << 20) + 11, (1 << 20) + 22);
    const BOB: (u64, u64) = (333_333, (3 << 20) + 44);
    let users = UsersFile::new(&[("alice", "a-secret"), ("bob", "b-secret")]);
    let extra = format!(
        "{}{METRICS}\
         [[socks_rule]]\nname = \"alice-only\"\naction = \"pass\"\nusers = [\"alice\"]\n\
         [[socks_rule]]\nname = \"others\"\naction = \"pass\"\n",
        users.auth_toml(&["username"])
    );
    let daemon = Daemon::start(DaemonOpts {
        extra_toml: extra,
        ..DaemonOpts::path(DataPath::Sockmap)
    });

    let mut open = Vec::new();
    for (user, pass, (up, down)) in [("alice", "a-secret", ALICE), ("bob", "b-secret", BOB)] {
        let listener = listen("127.0.0.1:0").await;
        let target_addr = listener.local_addr().unwrap();
        let accept = Task::spawn(async move { accept_one(&listener).await });
        let mut client =
            socks::connect_auth(daemon.addr(), &socks::Auth::user(user, pass), target_addr)
                .await
                .unwrap_or_else(|e| panic!("{user}: {e}"));
        let mut target = accept.join(LIMIT, "target accept").await;
        within(LIMIT, "transfer", async {
            tokio::try_join!(
                send_and_recv(&mut client, (1, up), (2, down)),
                send_and_recv(&mut target, (2, down), (1, up))
            )
        })
        .await
        .unwrap_or_else(|e| panic!("{user}: transfer: {e}"));
        open.push((client, target));
    }

    let account = |s: &Value, kind: &str, name: &str| -> (u64, u64, u64) {
        let rows = s["daemon"]["accounts"][kind]
            .as_array()
            .unwrap_or_else(|| panic!("no daemon.accounts.{kind}: {s}"));
        rows.iter()
            .find(|r| r["name"] == name)
            .map(|r| {
                let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
                (n("sessions"), n("up_bytes"), n("down_bytes"))
            })
            .unwrap_or_else(|| panic!("no {kind} row {name:?}: {s}"))
    };
    let want = [
        ("users", "alice", (1, ALICE.0, ALICE.1)),
        ("users", "bob", (1, BOB.0, BOB.1)),
        ("rules", "alice-only", (1, ALICE.0, ALICE.1)),
        ("rules", "others", (1, BOB.0, BOB.1)),
    ];
    let check = |live: bool| {
        let s = daemon.stats_json();
        for (kind, name, figures) in want {
            assert_eq!(
                account(&s, kind, name),
                figures,
                "{kind} {name} (live: {live}): {s}"
            );
        }
        assert_eq!(
            s["daemon"]["accounts"]["clients_active"],
            u64::from(live),
            "{s}"
        );
    };
    // Live: the kernel's per-socket counters (poll until both sessions are spliced and counted).
    poll_until(
        SETTLE,
        "the accounts to show the live sessions' bytes",
        |last| {
            let s = daemon.stats_json();
            *last = s["daemon"]["accounts"].to_string();
            want.iter()
                .all(|(kind, name, f)| {
                    s["daemon"]["accounts"][kind]
                        .as_array()
                        .is_some_and(|rows| {
                            rows.iter().any(|r| {
                                r["name"] == *name && r["up_bytes"] == f.1 && r["down_bytes"] == f.2
                            })
                        })
                })
                .then_some(())
        },
    )
    .await;
    check(true);
    let (body, m) = scrape(metrics_addr(&daemon)).await;
    assert_eq!(
        sample(
            &m,
            "ebsocks_user_bytes",
            &[("user", "alice"), ("direction", "up")],
            &body
        ),
        ALICE.0 as f64
    );
    assert_eq!(
        sample(
            &m,
            "ebsocks_user_bytes",
            &[("user", "bob"), ("direction", "down")],
            &body
        ),
        BOB.1 as f64
    );
    assert_eq!(
        sample(
            &m,
            "ebsocks_rule_bytes",
            &[("rule", "alice-only"), ("direction", "down")],
            &body
        ),
        ALICE.1 as f64
    );
    assert_eq!(
        sample(&m, "ebsocks_user_sessions", &[("user", "bob")], &body),
        1.0
    );
    assert_eq!(sample(&m, "ebsocks_clients_active", &[], &body), 1.0);

    // Ended: the same figures, from the sessions' final counts.
    for (mut client, mut target) in open {
        within(LIMIT, "closing", async {
            tokio::try_join!(
                exchange(&mut client, Plan::close()),
                exchange(&mut target, Plan::sink(0, 0))
            )
        })
        .await
        .unwrap_or_else(|e| panic!("closing: {e}"));
    }
    wait_sessions_drained(&daemon).await;
    check(false);
    let (body, m) = scrape(metrics_addr(&daemon)).await;
    assert_eq!(
        sample(
            &m,
            "ebsocks_user_bytes",
            &[("user", "alice"), ("direction", "up")],
            &body
        ),
        ALICE.0 as f64
    );
    assert_eq!(sample(&m, "ebsocks_clients_active", &[], &body), 0.0);
    let table = cli(&["stats", "--pin-dir", &daemon.pin_dir().to_string_lossy()]);
    assert!(
        table.contains("alice-only") && table.contains(&ALICE.0.to_string()),
        "{table}"
    );
    daemon.stop();
}
