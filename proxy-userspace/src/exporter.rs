//! The Prometheus endpoint (`[metrics] listen`): `GET /metrics` answers with the OpenMetrics
//! text exposition, encoded by `prometheus-client` from a [`Snapshot`] taken at scrape time, so
//! it shows exactly what `ebsocks stats` shows. The transport is a minimal HTTP/1.1 responder:
//! one request per connection, bounded in size and time.

use std::{fmt, io, net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::{Registry, Unit},
};
use proxy_common::metrics::Counter;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::{metrics::failure_reasons, stats::Snapshot, Shared};

/// Content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Largest request head read.
const HEAD_MAX: usize = 8192;
/// A client must send its request and take the answer within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen queue.
const CONNECTIONS_MAX: usize = 16;

/// The running endpoint; stops when dropped.
#[derive(Debug)]
pub struct Exporter {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Exporter {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `/metrics` until the returned value drops.
pub async fn start(shared: Arc<Shared>, addr: SocketAddr) -> io::Result<Exporter> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(accept_loop(listener, shared));
    Ok(Exporter { addr, task })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(cause = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(crate::session::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, serve(stream, &shared)).await;
            drop(permit);
        });
    }
}

async fn serve(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() >= HEAD_MAX {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"request head too large\n",
                &[],
                false,
            )
            .await;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render(Snapshot::from_daemon(shared));
            respond(
                &mut stream,
                "200 OK",
                CONTENT_TYPE,
                body.as_bytes(),
                &[],
                head_only,
            )
            .await
        }
        ("GET" | "HEAD", "/") => {
            respond(
                &mut stream,
                "200 OK",
                "text/plain; charset=utf-8",
                b"ebsocks: metrics at /metrics\n",
                &[],
                head_only,
            )
            .await
        }
        (_, "/metrics" | "/") => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                b"use GET\n",
                &["Allow: GET, HEAD"],
                false,
            )
            .await
        }
        _ => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                b"not found; metrics are at /metrics\n",
                &[],
                head_only,
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    extra: &[&str],
    head_only: bool,
) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for h in extra {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// The OpenMetrics text exposition of a snapshot (ends with `# EOF`).
pub fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::with_prefix("ebsocks");
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!(cause = %e, "cannot encode the metrics");
    }
    out
}

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

/// Encodes one metric family of constant values, one sample per label set.
fn family<L, M>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    ty: MetricType,
    samples: &[(L, M)],
) -> fmt::Result
where
    L: prometheus_client::encoding::EncodeLabelSet,
    M: EncodeMetric,
{
    if samples.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, unit, ty)?;
    for (labels, value) in samples {
        value.encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

type Labels = Vec<(&'static str, &'static str)>;

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let s = &self.0;
        let c = |x: Counter| ConstCounter::new(s.counter(x));
        let rows = |proto: &str, packets: bool| -> Vec<(Labels, ConstCounter)> {
            s.traffic
                .iter()
                .filter(|r| r.proto == proto)
                .map(|r| {
                    (
                        vec![("path", r.path), ("direction", r.dir)],
                        ConstCounter::new(if packets { r.packets } else { r.bytes }),
                    )
                })
                .collect()
        };
        family(
            &mut enc,
            "tcp",
            "TCP payload bytes relayed, by data path and direction (up: client to target).",
            Some(&Unit::Bytes),
            MetricType::Counter,
            &rows("tcp", false),
        )?;
        family(
            &mut enc,
            "tcp_packets",
            "TCP chunks relayed: skbs redirected by the kernel (sockmap), read/write chunks of the daemon (splice, copy).",
            None,
            MetricType::Counter,
            &rows("tcp", true),
        )?;
        family(
            &mut enc,
            "udp",
            "UDP payload bytes relayed, by path and direction.",
            Some(&Unit::Bytes),
            MetricType::Counter,
            &rows("udp", false),
        )?;
        family(
            &mut enc,
            "udp_datagrams",
            "UDP datagrams relayed, by path and direction.",
            None,
            MetricType::Counter,
            &rows("udp", true),
        )?;

        let states: Vec<(Labels, ConstGauge)> = s
            .states()
            .into_iter()
            .map(|(state, n)| {
                (
                    vec![("state", state)],
                    ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)),
                )
            })
            .collect();
        family(
            &mut enc,
            "sessions_active",
            "Sessions now, by state (negotiating, authenticating, resolving, connecting, bind_waiting; relaying on sockmap, splice or copy; udp).",
            None,
            MetricType::Gauge,
            &states,
        )?;
        family(
            &mut enc,
            "sessions_parked",
            "Sessions waiting with no task: carried by the kernel until a FIN, a reset, a brake checkpoint or their idle timeout (part of sessions_active{state=\"sockmap\"}), or, under auto, with no payload yet until their first byte or their promotion (part of sessions_active{state=\"splice\"}).",
            None,
            MetricType::Gauge,
            &[(
                Labels::new(),
                ConstGauge::new(
                    i64::try_from(s.counter(Counter::SessionsParked)).unwrap_or(i64::MAX),
                ),
            )],
        )?;

        let commands = |counters: [Counter; 3]| -> Vec<(Labels, ConstCounter)> {
            ["connect", "bind", "udpassociate"]
                .into_iter()
                .zip(counters)
                .map(|(cmd, x)| (vec![("command", cmd)], c(x)))
                .collect()
        };
        family(
            &mut enc,
            "sessions_created",
            "Sessions whose request was read, by command.",
            None,
            MetricType::Counter,
            &commands([
                Counter::SessionsCreatedConnect,
                Counter::SessionsCreatedBind,
                Counter::SessionsCreatedUdp,
            ]),
        )?;
        family(
            &mut enc,
            "sessions_ended",
            "Sessions created by a request that ended (success or failure), by command.",
            None,
            MetricType::Counter,
            &commands([
                Counter::SessionsEndedConnect,
                Counter::SessionsEndedBind,
                Counter::SessionsEndedUdp,
            ]),
        )?;
        let paths = |counters: [Counter; 3]| -> Vec<(Labels, ConstCounter)> {
            ["sockmap", "splice", "copy"]
                .into_iter()
                .zip(counters)
                .map(|(p, x)| (vec![("path", p)], c(x)))
                .collect()
        };
        family(
            &mut enc,
            "relays_started",
            "TCP sessions that started relaying, by data path.",
            None,
            MetricType::Counter,
            &paths([
                Counter::SessionsTotalSockmap,
                Counter::SessionsTotalSplice,
                Counter::SessionsTotalCopy,
            ]),
        )?;
        family(
            &mut enc,
            "relays_ended",
            "TCP sessions that stopped relaying, by data path.",
            None,
            MetricType::Counter,
            &paths([
                Counter::SessionsEndedSockmap,
                Counter::SessionsEndedSplice,
                Counter::SessionsEndedCopy,
            ]),
        )?;
        counter(
            &mut enc,
            "relay_fallbacks",
            "Sessions that asked for the sockmap path and took another one.",
            s.counter(Counter::SessionsFallback),
        )?;

        let failures: Vec<(Labels, ConstCounter)> = failure_reasons()
            .map(|(reason, x)| (vec![("reason", reason)], c(x)))
            .collect();
        family(
            &mut enc,
            "session_failures",
            "Sessions that failed, each counted once under its most specific reason (reply-code reasons cover refusals with no more specific one); client_blocked and limit are connections closed at accept.",
            None,
            MetricType::Counter,
            &failures,
        )?;
        counter(
            &mut enc,
            "sessions_failed",
            "Accepted sessions that ended before relaying.",
            s.counter(Counter::SessionsFailed),
        )?;
        counter(
            &mut enc,
            "connections_accepted",
            "Client connections accepted.",
            s.counter(Counter::ConnectionsAccepted),
        )?;
        counter(
            &mut enc,
            "connections_refused",
            "Client connections closed at accept (client rules, session limits).",
            s.counter(Counter::ConnectionsRefused),
        )?;
        counter(
            &mut enc,
            "accept_errors",
            "Errors from accept(2) on the SOCKS listeners.",
            s.counter(Counter::AcceptErrors),
        )?;
        counter(
            &mut enc,
            "negotiation_timeouts",
            "Sessions cut at timeouts.negotiation.",
            s.counter(Counter::NegotiationTimeouts),
        )?;
        counter(
            &mut enc,
            "requests_blocked",
            "Requests refused by a socks rule.",
            s.counter(Counter::RequestsBlocked),
        )?;
        family(
            &mut enc,
            "auth_attempts",
            "Username/password authentications, by result.",
            None,
            MetricType::Counter,
            &[
                (vec![("result", "success")], c(Counter::AuthSuccesses)),
                (vec![("result", "failure")], c(Counter::AuthFailures)),
            ],
        )?;
        counter(
            &mut enc,
            "binds",
            "BIND requests served (first reply sent).",
            s.counter(Counter::BindsTotal),
        )?;
        counter(
            &mut enc,
            "udp_associations",
            "UDP associations created.",
            s.counter(Counter::UdpAssociationsTotal),
        )?;
        family(
            &mut enc,
            "udp_dropped",
            "UDP datagrams dropped, by reason.",
            None,
            MetricType::Counter,
            &[
                (vec![("reason", "frag")], c(Counter::UdpDroppedFrag)),
                (vec![("reason", "foreign")], c(Counter::UdpDroppedForeign)),
                (
                    vec![("reason", "malformed")],
                    c(Counter::UdpDroppedMalformed),
                ),
                (vec![("reason", "blocked")], c(Counter::UdpDroppedBlocked)),
            ],
        )?;
        if let Some(x) = &s.xdp {
            x.encode(&mut enc)?;
        }
        counter(
            &mut enc,
            "sockmap_brakes",
            "Times a spliced socket's verdict was stopped because its peer fell behind.",
            s.counter(Counter::SockmapBrakes),
        )?;
        if let Some(d) = &s.daemon {
            let a = &d.accounts;
            for (kind, rows) in [("user", &a.users), ("rule", &a.rules)] {
                let bytes: Vec<(Vec<(&str, String)>, ConstCounter)> = rows
                    .iter()
                    .flat_map(|r| {
                        [("up", r.up_bytes), ("down", r.down_bytes)].map(|(dir, v)| {
                            (
                                vec![(kind, r.name.clone()), ("direction", dir.to_owned())],
                                ConstCounter::new(v),
                            )
                        })
                    })
                    .collect();
                let sessions: Vec<(Vec<(&str, String)>, ConstCounter)> = rows
                    .iter()
                    .map(|r| (vec![(kind, r.name.clone())], ConstCounter::new(r.sessions)))
                    .collect();
                family(
                    &mut enc,
                    &format!("{kind}_bytes"),
                    &format!("Payload bytes of the sessions of each {kind} (ended ones plus live ones so far)."),
                    None,
                    MetricType::Counter,
                    &bytes,
                )?;
                family(
                    &mut enc,
                    &format!("{kind}_sessions"),
                    &format!("Sessions of each {kind} whose request was read, live ones included."),
                    None,
                    MetricType::Counter,
                    &sessions,
                )?;
            }
            family(
                &mut enc,
                "clients_active",
                "Distinct client addresses with a session open now.",
                None,
                MetricType::Gauge,
                &[(
                    Vec::<(&str, String)>::new(),
                    ConstGauge::new(i64::try_from(a.clients_active).unwrap_or(i64::MAX)),
                )],
            )?;
        }
        counter(
            &mut enc,
            "sockmap_brake_bytes",
            "Bytes a brake held on a spliced socket that the daemon then moved to the peer itself.",
            s.counter(Counter::SockmapBrakeBytes),
        )?;
        counter(
            &mut enc,
            "sockmap_overlap_bytes",
            "Bytes of retransmitted segments that repeated bytes a spliced socket had already received, cut off in the kernel.",
            s.counter(Counter::SockmapOverlapBytes),
        )?;
        counter(
            &mut enc,
            "relay_buffers_fitted",
            "Sockets of a bulk direction on splice(2) or copy whose buffers were fitted to a near peer.",
            s.counter(Counter::BuffersFitted),
        )?;
        counter(
            &mut enc,
            "relay_promotions",
            "Sessions that began on splice(2) under data_path auto and moved to the in-kernel path.",
            s.counter(Counter::SessionsPromoted),
        )?;

        for (name, help) in [
            ("connect_latency", "Time to connect to a target (every resolved address tried until one accepts), successful connects."),
            ("dns_latency", "Time to resolve a request's target name, answers and errors alike."),
        ] {
            let Some(h) = s.histograms.get(name) else { continue };
            // The encoder takes per-bucket counts and accumulates them itself.
            let mut below = 0;
            let buckets: Vec<(f64, u64)> = h
                .buckets
                .iter()
                .map(|b| (b.le, b.count))
                .chain(std::iter::once((f64::INFINITY, h.count)))
                .map(|(le, cumulative)| {
                    let n = cumulative.saturating_sub(below);
                    below = cumulative.max(below);
                    (le, n)
                })
                .collect();
            // The unit is in the name; no UNIT line, which some OpenMetrics parsers reject on
            // histograms.
            let name = format!("{name}_seconds");
            let mut m = enc.encode_descriptor(&name, help, None, MetricType::Histogram)?;
            m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(h.sum_seconds, h.count, &buckets, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openmetrics_parser::{MetricFamily, OpenMetricsType, OpenMetricsValue};

    use super::*;
    use crate::metrics::Metrics;

    fn snapshot(m: &Metrics) -> Snapshot {
        let mut s = Snapshot {
            traffic: (0..proxy_common::metrics::TRAFFIC_SLOTS)
                .map(|i| {
                    let (proto, path, dir) = proxy_common::metrics::TrafficSlot(i).names();
                    let t = m.traffic(proxy_common::metrics::TrafficSlot(i));
                    crate::stats::TrafficRow {
                        proto,
                        path,
                        dir,
                        bytes: t.bytes,
                        packets: t.packets,
                    }
                })
                .collect(),
            counters: Counter::ALL.iter().map(|&c| (c.name(), m.get(c))).collect(),
            histograms: BTreeMap::new(),
            xdp: None,
            sessions: Vec::new(),
            daemon: None,
        };
        for h in proxy_common::metrics::HISTOGRAMS {
            let (cells, count, sum) = m.histogram(h);
            s.histograms.insert(
                h.name,
                crate::stats::HistogramRow::from_cells(&cells, count, sum),
            );
        }
        s
    }

    fn value(f: &MetricFamily<OpenMetricsType, OpenMetricsValue>, labels: &[(&str, &str)]) -> f64 {
        let sample = f
            .iter_samples()
            .find(|s| {
                let set = s.get_labelset().expect("labels");
                labels
                    .iter()
                    .all(|(k, v)| set.get_label_value(k) == Some(*v))
            })
            .unwrap_or_else(|| panic!("{} has no sample {labels:?}", f.family_name));
        match &sample.value {
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            OpenMetricsValue::Gauge(g) => g.as_f64(),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn exposition_parses_and_carries_every_counter() {
        let m = Metrics::default();
        // Distinct values, so that every counter can be found in the exposition.
        for (i, &c) in Counter::ALL.iter().enumerate() {
            m.add(c, 1000 + i as u64);
        }
        m.observe(
            proxy_common::metrics::CONNECT_LATENCY,
            Duration::from_millis(3),
        );
        m.add_traffic(
            proxy_common::metrics::DataPath::Splice,
            proxy_common::metrics::Direction::Down,
            12_345,
        );
        let text = render(snapshot(&m));
        assert!(text.ends_with("# EOF\n"), "{text}");
        let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&text)
            .unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        let fam = |n: &str| {
            parsed
                .families
                .get(n)
                .unwrap_or_else(|| panic!("no family {n} in\n{text}"))
        };
        assert_eq!(
            fam("ebsocks_session_failures").family_type,
            OpenMetricsType::Counter
        );
        assert_eq!(
            value(
                fam("ebsocks_session_failures"),
                &[("reason", "connection_refused")]
            ),
            m.get(Counter::FailConnectionRefused) as f64
        );
        assert_eq!(
            value(fam("ebsocks_sessions_active"), &[("state", "resolving")]),
            m.get(Counter::SessionsResolving) as f64
        );
        assert_eq!(
            value(fam("ebsocks_sessions_created"), &[("command", "bind")]),
            m.get(Counter::SessionsCreatedBind) as f64
        );
        assert_eq!(
            value(
                fam("ebsocks_tcp_bytes"),
                &[("path", "splice"), ("direction", "down")]
            ),
            12_345.0
        );
        assert_eq!(
            value(
                fam("ebsocks_tcp_bytes"),
                &[("path", "sockmap"), ("direction", "up")]
            ),
            0.0
        );
        let h = fam("ebsocks_connect_latency_seconds");
        assert_eq!(h.family_type, OpenMetricsType::Histogram);
        let OpenMetricsValue::Histogram(hv) =
            &h.iter_samples().next().expect("histogram sample").value
        else {
            panic!("not a histogram")
        };
        let row = &snapshot(&m).histograms["connect_latency"];
        assert_eq!(hv.count, Some(row.count));
        for (b, r) in hv.buckets.iter().zip(&row.buckets) {
            assert_eq!((b.upper_bound, b.count.as_f64() as u64), (r.le, r.count));
        }

        // Every plain counter's value shows up in some sample.
        let mut seen = std::collections::BTreeSet::new();
        for f in parsed.families.values() {
            for s in f.iter_samples() {
                if let OpenMetricsValue::Counter(c) = &s.value {
                    seen.insert(c.value.as_f64() as u64);
                }
                if let OpenMetricsValue::Gauge(g) = &s.value {
                    seen.insert(g.as_f64() as u64);
                }
            }
        }
        let histogram_cells: std::collections::BTreeSet<&str> = proxy_common::metrics::HISTOGRAMS
            .iter()
            .flat_map(|h| {
                (0..proxy_common::metrics::LATENCY_BUCKETS_US.len())
                    .map(|i| h.bucket(i).name())
                    .chain([h.count.name(), h.sum_us.name()])
            })
            .collect();
        for c in Counter::ALL {
            if histogram_cells.contains(c.name()) {
                continue;
            }
            assert!(
                seen.contains(&m.get(c)),
                "counter {} ({}) is not exported:\n{text}",
                c.name(),
                m.get(c)
            );
        }
    }
}
