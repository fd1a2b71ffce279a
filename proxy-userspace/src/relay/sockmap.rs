//! The in-kernel path: both sockets go into the sockhashes and the verdict program redirects each
//! side's received bytes to the other side's egress. The daemon never reads payload; it only
//!
//! - notices a FIN or reset through [`Watcher`] (no wake-up per data chunk),
//! - waits until every byte the kernel received before the FIN has been handed to the peer
//!   socket (the kernel does not forward FIN across a redirect, and closing early would discard
//!   the redirect backlog), then sends the FIN itself with `shutdown(SHUT_WR)`,
//! - closes both sockets once both directions are done.

use std::{
    io::{self, Read as _, Write as _},
    net::TcpStream as StdTcpStream,
    os::fd::{AsFd, BorrowedFd},
    sync::Mutex,
    time::Duration,
};

use proxy_common::{
    metrics::{Counter, DataPath, Direction},
    sockmap::{BrakeControl, SEQ_BROKEN},
};
use tokio::net::TcpStream;

use super::{
    watch::{self, Watch},
    Consumed, End, Outcome,
};
use crate::{
    kernel::{Sockmap, SpliceError, BRAKE_STEP},
    sys, Shared,
};

/// `TCP_CLOSE` in `tcpi_state`.
const TCP_CLOSE: u8 = 7;

/// A pair the kernel refused, handed back for another data path.
#[derive(Debug)]
pub struct Fallback {
    /// The client socket, untouched.
    pub client: TcpStream,
    /// The upstream socket, untouched.
    pub upstream: TcpStream,
    /// Why the sockhash refused the pair.
    pub error: SpliceError,
    /// What the daemon had moved by then, the handover's own bytes included.
    pub consumed: Consumed,
}

/// Everything ever written into a socket's send queue: acknowledged bytes plus those still
/// queued. Only the daemon and the redirect write to it, so it grows exactly by what they write.
fn sent_total(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(sys::tcp_info(fd)?.bytes_acked + sys::outq(fd)?)
}

/// Splices the pair in the kernel and waits for the session to end.
///
/// Must be called after the daemon has written everything it owes to either socket and has
/// stopped reading from both; `consumed` says how much it read from the client.
pub async fn relay(
    shared: &Shared,
    sm: &Sockmap,
    session_id: u64,
    mut client: TcpStream,
    mut upstream: TcpStream,
    consumed: Consumed,
    idle: Duration,
) -> Result<Outcome, Fallback> {
    // The verdict reads whole skbs from the receive queue and ignores how much of a partially
    // read skb the daemon already consumed: a payload that arrived in the same segment as the
    // SOCKS request would be forwarded again from the skb's start, negotiation bytes included.
    // Empty the client's receive queue first, so that only whole, unread skbs remain; the
    // upstream's too when the daemon has read from it (splice(2), on a session promoted from
    // it, may have taken part of an skb). An upstream never read holds whole skbs only, and
    // draining it would race a target that talks first and fast.
    let mut consumed = consumed;
    let queued = match take_queued(&client, &mut upstream).await {
        Ok(n) => {
            consumed.from_client += n;
            consumed.forwarded += n;
            if consumed.from_upstream > 0 {
                take_queued(&upstream, &mut client).await.map(|n| {
                    consumed.from_upstream += n;
                    consumed.forwarded_down += n;
                })
            } else {
                Ok(())
            }
        }
        Err(e) => Err(e),
    };
    if let Err(source) = queued {
        let error = SpliceError {
            context: "forwarding queued bytes",
            source,
        };
        return Err(Fallback {
            client,
            upstream,
            error,
            consumed,
        });
    }
    let baselines = sent_total(client.as_fd()).and_then(|c| Ok((c, sent_total(upstream.as_fd())?)));
    let (sent0_client, sent0_upstream) = match baselines {
        Ok(b) => b,
        Err(source) => {
            let error = SpliceError {
                context: "reading TCP_INFO",
                source,
            };
            return Err(Fallback {
                client,
                upstream,
                error,
                consumed,
            });
        }
    };
    let pair = match sm.splice(
        session_id,
        client.as_fd(),
        upstream.as_fd(),
        (consumed.forwarded, consumed.forwarded_down),
    ) {
        Ok(p) => p,
        Err(error) => {
            return Err(Fallback {
                client,
                upstream,
                error,
                consumed,
            })
        }
    };
    let _active = shared.metrics.relaying(DataPath::Sockmap);
    // Payload the daemon forwarded at the handover belongs to this path's figures too, so that
    // they count every payload byte exactly once.
    for (dir, n) in [
        (Direction::Up, consumed.forwarded - consumed.counted_up),
        (
            Direction::Down,
            consumed.forwarded_down - consumed.counted_down,
        ),
    ] {
        if n > 0 {
            shared.metrics.add_traffic(DataPath::Sockmap, dir, n);
        }
    }

    // Leave tokio's reactor: it would be woken by every forwarded chunk.
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        (c, u) => {
            // Cannot happen for a registered TcpStream; end the session cleanly all the same.
            drop((c, u));
            sm.finish(&pair);
            let e = io::Error::other("cannot leave the reactor");
            return Ok(Outcome {
                path: DataPath::Sockmap,
                up: 0,
                down: 0,
                end: End::Error(e),
                promoted: false,
            });
        }
    };

    let watches = shared
        .watcher
        .watch(client.as_fd())
        .and_then(|c| Ok((c, shared.watcher.watch(upstream.as_fd())?)));
    let res = match watches {
        Ok((cw, uw)) => {
            let up_dir = Dir {
                sm,
                src: &client,
                src_cookie: pair.client_cookie,
                src_watch: &cw,
                dst: &upstream,
                consumed_src: consumed.from_client,
                seed: consumed.forwarded,
                sent0_dst: sent0_upstream,
                control: Mutex::new(BrakeControl {
                    checkpoint: consumed.forwarded + BRAKE_STEP,
                    ..Default::default()
                }),
            };
            let down_dir = Dir {
                sm,
                src: &upstream,
                src_cookie: pair.upstream_cookie,
                src_watch: &uw,
                dst: &client,
                consumed_src: consumed.from_upstream,
                seed: consumed.forwarded_down,
                sent0_dst: sent0_client,
                control: Mutex::new(BrakeControl {
                    checkpoint: consumed.forwarded_down + BRAKE_STEP,
                    ..Default::default()
                }),
            };
            // Idle time is judged on the kernel's per-socket counters.
            let activity = || {
                let bytes = |cookie| sm.traffic(cookie).map_or(0, |t| t.bytes);
                bytes(pair.client_cookie) + bytes(pair.upstream_cookie)
            };
            // The direction futures are built in place: a future held in a local before being
            // moved into another would take room in this state twice.
            tokio::select! {
                r = async {
                    tokio::try_join!(up_dir.run(shared), async {
                        if pair.upstream_active {
                            down_dir.run(shared).await
                        } else {
                            Box::pin(copy_rest(shared, &upstream, &uw, &client, Direction::Down))
                                .await
                        }
                    })
                } => r.map(|_| End::Eof),
                () = super::idle_watch(idle, activity) => Ok(End::Idle),
            }
        }
        Err(e) => Err(e),
    };
    let overlap = sm.overlap(&pair);
    if overlap > 0 {
        shared.metrics.add(Counter::SockmapOverlapBytes, overlap);
    }
    let (up, down) = sm.finish(&pair);
    let end = match res {
        Ok(end) => end,
        Err(e) => {
            let _ = sys::set_linger_zero(client.as_fd());
            let _ = sys::set_linger_zero(upstream.as_fd());
            End::Error(e)
        }
    };
    Ok(Outcome {
        path: DataPath::Sockmap,
        up: up.bytes,
        down: down.bytes,
        end,
        promoted: false,
    })
}

/// Most the daemon reads from a client while emptying its receive queue before the splice; a
/// client still sending beyond this gets the splice(2) path instead.
const QUEUED_MAX: u64 = 4 << 20;

/// Reads everything queued on `client` without waiting and writes it to `upstream` (or the
/// reverse). Returns the byte count. Fails (so the session falls back) if the source keeps the
/// queue busy past [`QUEUED_MAX`]: then the queue may end in a partially read skb.
async fn take_queued(client: &TcpStream, upstream: &mut TcpStream) -> io::Result<u64> {
    use tokio::io::AsyncWriteExt as _;
    let mut total = 0u64;
    // Read into spare capacity: no page of the buffer is touched unless bytes are queued,
    // which they seldom are.
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        if total >= QUEUED_MAX {
            return Err(io::Error::other("peer keeps sending during the handover"));
        }
        buf.clear();
        match client.try_read_buf(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                upstream.write_all(&buf[..n]).await?;
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
            Err(e) => return Err(e),
        }
    }
}

/// Backlog (bytes the kernel took from a source but its peer has not accepted yet) above which
/// the source is braked, so that TCP's window closes on its sender.
const BRAKE_HIGH: u64 = 8 << 20;
/// Backlog at which a braked source is released.
const BRAKE_LOW: u64 = 1 << 20;

/// One kernel-carried direction and what its end-of-stream and brake logic need.
struct Dir<'a> {
    sm: &'a Sockmap,
    src: &'a StdTcpStream,
    src_cookie: u64,
    src_watch: &'a Watch,
    dst: &'a StdTcpStream,
    /// Bytes the daemon read from `src` itself before the splice.
    consumed_src: u64,
    /// Payload the daemon forwarded itself before the splice (seeds the kernel counter).
    seed: u64,
    /// `dst`'s sent total when the splice started.
    sent0_dst: u64,
    /// The brake settings last given to the kernel.
    control: Mutex<BrakeControl>,
}

impl Dir<'_> {
    /// Waits for the source's FIN (braking when the peer falls behind), waits for the
    /// redirected bytes to reach the destination's send queue, forwards the FIN.
    async fn run(&self, shared: &Shared) -> io::Result<()> {
        let brake = self.sm.brake_watch(self.src_cookie);
        loop {
            let st = watch::state(self.src.as_fd())?;
            if st.error {
                return Err(sys::take_error(self.src.as_fd())?
                    .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into()));
            }
            if st.read_closed {
                // A reset also shuts the receive side down, but leaves an error pending (POLLERR,
                // checked above). The TCP state cannot tell: a socket whose FIN_WAIT2 ends in
                // TIME_WAIT reads as CLOSE too.
                break;
            }
            tokio::select! {
                () = self.src_watch.changed() => {}
                () = async { match &brake { Some(b) => b.fired().await, None => std::future::pending().await } } => {
                    // Boxed, here and below: rare steps that would otherwise enlarge every
                    // spliced session's state.
                    Box::pin(self.brake(shared)).await?;
                }
            }
        }
        Box::pin(self.flush(shared)).await?;
        Box::pin(drain(self.src, self.dst, self.consumed_src, self.sent0_dst)).await?;
        sys::shutdown_write(self.dst.as_fd())
    }

    /// Bytes the kernel took from the source that the destination has not accepted yet, and
    /// the source's byte count.
    fn backlog(&self) -> io::Result<(u64, u64)> {
        let total = self.sm.traffic(self.src_cookie).map_or(0, |t| t.bytes);
        let passed = self.sm.brake_state(self.src_cookie).map_or(0, |s| s.passed);
        // Bytes that went (or are going) to dst: redirected by the kernel plus moved by us.
        let sent = (total.saturating_sub(self.seed + passed)) + self.control().read;
        let dinfo = sys::tcp_info(self.dst.as_fd())?;
        if dinfo.state == TCP_CLOSE {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        let accepted =
            (dinfo.bytes_acked + sys::outq(self.dst.as_fd())?).saturating_sub(self.sent0_dst);
        Ok((sent.saturating_sub(accepted), total))
    }

    fn control(&self) -> BrakeControl {
        *self.control.lock().expect("brake control lock")
    }

    fn set_control(&self, control: BrakeControl) -> io::Result<()> {
        self.sm
            .set_brake(self.src_cookie, control)
            .map_err(|e| e.source)?;
        *self.control.lock().expect("brake control lock") = control;
        Ok(())
    }

    async fn wait_backlog_below(&self, limit: u64) -> io::Result<()> {
        let mut delay = Duration::from_micros(100);
        while self.backlog()?.0 > limit {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The source reached its checkpoint (or its verdict could not keep the stream exact):
    /// brake it while the peer is too far behind.
    async fn brake(&self, shared: &Shared) -> io::Result<()> {
        if self
            .sm
            .brake_state(self.src_cookie)
            .is_some_and(|s| s.seq_known == SEQ_BROKEN)
        {
            return Err(io::Error::other(
                "a retransmitted segment repeating forwarded bytes could not be cut",
            ));
        }
        let (backlog, total) = self.backlog()?;
        if backlog < BRAKE_HIGH {
            return self.set_control(BrakeControl {
                checkpoint: total + BRAKE_STEP,
                ..self.control()
            });
        }
        self.set_control(BrakeControl {
            checkpoint: u64::MAX,
            braked: 1,
            ..self.control()
        })?;
        shared.metrics.inc(Counter::SockmapBrakes);
        self.wait_backlog_below(BRAKE_LOW).await?;
        let (_, total) = self.backlog()?;
        self.set_control(BrakeControl {
            checkpoint: total + BRAKE_STEP,
            braked: 0,
            ..self.control()
        })?;
        // Held bytes go to the peer through the daemon; new ones queue behind them meanwhile.
        self.flush(shared).await
    }

    /// Moves the bytes the verdict passed to the source (while braked) to the destination, in
    /// order; the kernel redirects again once they are all gone.
    async fn flush(&self, shared: &Shared) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut delay = Duration::from_micros(100);
        let mut caught_up = false;
        loop {
            let read = self.control().read;
            let passed = self
                .sm
                .brake_state(self.src_cookie)
                .map_or(read, |s| s.passed);
            if passed <= read {
                return Ok(());
            }
            if !caught_up {
                // Bytes the kernel redirected before the brake may still wait in the peer's
                // backlog; ours must not overtake them. No new ones are redirected meanwhile.
                self.wait_backlog_below(0).await?;
                caught_up = true;
            }
            let want = usize::try_from(passed - read)
                .unwrap_or(usize::MAX)
                .min(FLUSH_CHUNK);
            buf.resize(want, 0);
            let n = match (&*self.src).read(&mut buf) {
                Ok(n) if n > 0 => n,
                // A passed skb queues behind the bytes the peer direction redirects into this
                // socket (one kernel backlog per socket) and reaches the receive queue only after
                // them; until then a read finds nothing (0 after a FIN).
                Ok(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(10));
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(10));
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            delay = Duration::from_micros(100);
            write_all(self.dst, &buf[..n]).await?;
            shared.metrics.add(Counter::SockmapBrakeBytes, n as u64);
            self.set_control(BrakeControl {
                read: read + n as u64,
                ..self.control()
            })?;
        }
    }
}

/// Largest read while moving passed bytes.
const FLUSH_CHUNK: usize = 256 * 1024;

/// Writes all of `buf` to a non-blocking socket outside the reactor, backing off while full.
async fn write_all(dst: &StdTcpStream, buf: &[u8]) -> io::Result<()> {
    let mut off = 0;
    let mut delay = Duration::from_micros(100);
    while off < buf.len() {
        match (&*dst).write(&buf[off..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => {
                off += m;
                delay = Duration::from_micros(100);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(10));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until every byte `src` received (minus what the daemon read itself, minus the FIN) has
/// entered `dst`'s send queue. Polls with backoff: this runs once per direction per session,
/// only after the FIN.
async fn drain(
    src: &StdTcpStream,
    dst: &StdTcpStream,
    consumed_src: u64,
    sent0_dst: u64,
) -> io::Result<()> {
    let mut delay = Duration::from_micros(200);
    loop {
        let received = sys::tcp_info(src.as_fd())?.bytes_received;
        let want = received.saturating_sub(1 + consumed_src);
        let dinfo = sys::tcp_info(dst.as_fd())?;
        // We have not sent our FIN on `dst` yet, so CLOSE can only mean it was reset.
        if dinfo.state == TCP_CLOSE {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        let have = (dinfo.bytes_acked + sys::outq(dst.as_fd())?).saturating_sub(sent0_dst);
        if have >= want {
            return Ok(());
        }
        tokio::time::sleep(delay).await;
        // Capped low: the FIN waits on this, and a slow reader keeps the loop short anyway.
        delay = (delay * 2).min(Duration::from_millis(20));
    }
}

/// The rare half-spliced case: the upstream received its FIN before it could be activated, so
/// its remaining bytes are still in its receive queue. Copy them to the client, then forward
/// the FIN.
async fn copy_rest(
    shared: &Shared,
    src: &StdTcpStream,
    watch: &Watch,
    dst: &StdTcpStream,
    dir: Direction,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match (&*src).read(&mut buf) {
            Ok(0) => return sys::shutdown_write(dst.as_fd()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::select! {
                    () = watch.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        write_all(dst, &buf[..n]).await?;
        shared.metrics.add_traffic(DataPath::Copy, dir, n as u64);
    }
}
