//! The in-kernel path: both sockets go into the sockhashes and the verdict program redirects each
//! side's received bytes to the other side's egress. The daemon never reads payload; it only
//!
//! - notices a FIN or reset through [`Watcher`](super::watch::Watcher) (no wake-up per data chunk),
//! - waits until every byte the kernel received before the FIN has been handed to the peer
//!   socket (the kernel does not forward FIN across a redirect, and closing early would discard
//!   the redirect backlog), then sends the FIN itself with `shutdown(SHUT_WR)`,
//! - closes both sockets once both directions are done.
//!
//! [`hand_over`] puts the pair in the kernel and returns a [`Carry`]; until something happens to
//! the pair the session waits parked ([`super::park`]), and [`Carry::run`] does the rest.

use std::{
    io::{self, Read as _, Write as _},
    net::TcpStream as StdTcpStream,
    os::fd::{AsFd, BorrowedFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use proxy_common::{
    metrics::{Counter, DataPath, Direction},
    sockmap::{BrakeControl, SEQ_BROKEN},
};
use tokio::net::TcpStream;

use super::{
    watch::{self, WakeOn, Watch},
    Consumed, End, IdleClock, Outcome,
};
use crate::{
    kernel::{BrakeWatch, Sockmap, SpliceError, SplicedPair, BRAKE_STEP},
    metrics::OwnedActiveGuard,
    sys::{self, TcpInfo},
    Shared,
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
fn sent_total(fd: BorrowedFd<'_>, info: &TcpInfo) -> io::Result<u64> {
    Ok(info.bytes_acked + sys::outq(fd)?)
}

/// What handing a pair to the sockhash led to.
#[derive(Debug)]
pub enum Handover {
    /// The kernel carries the pair; [`Carry`] holds what its end needs.
    Carried(Box<Carry>),
    /// The kernel refused the pair, which goes to another path.
    Refused(Fallback),
    /// The session ended during the handover.
    Failed(Outcome),
}

/// A pair in the sockhash and what carrying it to its end takes: the sockets, their watches
/// and the byte counts the end-of-stream logic works from. The daemon runs no code for the pair
/// until one of the watches fires or the idle check is due, so a session that waits is only
/// this record (see [`super::park`]).
#[derive(Debug)]
pub struct Carry {
    // Fields drop in order: the watches leave the epoll set before the sockets close (a closed
    // descriptor's number may be reused at once by another session's socket).
    /// End-of-stream watches: client, upstream.
    watches: (Watch, Watch),
    /// Brake events: client, upstream (None without the ring buffer).
    brakes: (Option<BrakeWatch>, Option<BrakeWatch>),
    client: StdTcpStream,
    upstream: StdTcpStream,
    pair: SplicedPair,
    consumed: Consumed,
    /// The sockets' sent totals when the splice started: client, upstream.
    sent0: (u64, u64),
    _active: OwnedActiveGuard,
    /// The idle timeout of the session.
    pub idle: Duration,
    /// The session began on splice(2) and was promoted (`auto`).
    pub promoted: bool,
}

/// Splices the pair in the kernel. Events on the pair (FIN, reset, brake checkpoint) wake the
/// session in `shared.parking`, where it waits once the caller parks the [`Carry`].
///
/// Must be called after the daemon has written everything it owes to either socket and has
/// stopped reading from both; `consumed` says how much it read from the client.
pub async fn hand_over(
    shared: &Arc<Shared>,
    sm: &Sockmap,
    session_id: u64,
    mut client: TcpStream,
    mut upstream: TcpStream,
    consumed: Consumed,
    idle: Duration,
) -> Handover {
    // The verdict reads whole skbs from the receive queue and ignores how much of a partially
    // read skb the daemon already consumed: a payload that arrived in the same segment as the
    // SOCKS request would be forwarded again from the skb's start, negotiation bytes included.
    // Empty the client's receive queue first, so that only whole, unread skbs remain; the
    // upstream's too when the daemon has read from it (splice(2), on a session promoted from
    // it, may have taken part of an skb). An upstream never read holds whole skbs only, and
    // draining it would race a target that talks first and fast.
    let mut consumed = consumed;
    // What a failed drain moved before it gave up counts too: the session falls back with it.
    let mut up = 0;
    let mut queued = take_queued(&client, &mut upstream, &mut up).await;
    consumed.from_client += up;
    consumed.forwarded += up;
    if queued.is_ok() && consumed.from_upstream > 0 {
        let mut down = 0;
        queued = take_queued(&upstream, &mut client, &mut down).await;
        consumed.from_upstream += down;
        consumed.forwarded_down += down;
    }
    if let Err(source) = queued {
        let error = SpliceError {
            context: "forwarding queued bytes",
            source,
        };
        return Handover::Refused(Fallback {
            client,
            upstream,
            error,
            consumed,
        });
    }
    let baselines = (|| {
        let (c, u) = (client.as_fd(), upstream.as_fd());
        let info = (sys::tcp_info(c)?, sys::tcp_info(u)?);
        // The kernel path's buffer sizes, in place before its first byte.
        shared.buffers.for_kernel(c, &info.0);
        shared.buffers.for_kernel(u, &info.1);
        io::Result::Ok((sent_total(c, &info.0)?, sent_total(u, &info.1)?))
    })();
    let sent0 = match baselines {
        Ok(b) => b,
        Err(source) => {
            let error = SpliceError {
                context: "reading TCP_INFO",
                source,
            };
            return Handover::Refused(Fallback {
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
            return Handover::Refused(Fallback {
                client,
                upstream,
                error,
                consumed,
            })
        }
    };
    let active = OwnedActiveGuard::new(shared.clone(), DataPath::Sockmap);
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
    let failed = |e: io::Error| {
        let _ = sm.finish(&pair);
        Handover::Failed(Outcome {
            path: DataPath::Sockmap,
            up: 0,
            down: 0,
            end: End::Error(e),
            promoted: false,
        })
    };
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        // Cannot happen for a registered TcpStream; end the session cleanly all the same.
        _ => return failed(io::Error::other("cannot leave the reactor")),
    };
    let parking = &shared.parking;
    let fds = (client.as_fd(), upstream.as_fd());
    let watches = shared
        .watcher
        .watch_parked(fds, parking, session_id, WakeOn::EndOfStream);
    let watches = match watches {
        Ok(w) => w,
        Err(e) => {
            let _ = sys::set_linger_zero(client.as_fd());
            let _ = sys::set_linger_zero(upstream.as_fd());
            return failed(e);
        }
    };
    let brakes = (
        sm.brake_watch(pair.client_cookie, parking),
        sm.brake_watch(pair.upstream_cookie, parking),
    );
    Handover::Carried(Box::new(Carry {
        client,
        upstream,
        pair,
        consumed,
        sent0,
        watches,
        brakes,
        _active: active,
        idle,
        promoted: false,
    }))
}

impl Carry {
    /// The sockets' cookies: client, upstream.
    pub fn cookies(&self) -> (u64, u64) {
        (self.pair.client_cookie, self.pair.upstream_cookie)
    }

    /// Payload bytes the kernel counted on both sockets: what the idle check compares.
    pub fn activity(&self, sm: &Sockmap) -> u64 {
        let bytes = |cookie| sm.traffic(cookie).map_or(0, |t| t.bytes);
        bytes(self.pair.client_cookie) + bytes(self.pair.upstream_cookie)
    }

    /// True when the pair needs a task now: an event may have fired before anyone listened for
    /// it (a FIN, an error, a passed checkpoint, a stream the verdict could not keep exact), or
    /// the upstream is not in the sockhash and its bytes need copying.
    pub fn needs_task(&self, sm: &Sockmap) -> bool {
        if !self.pair.upstream_active {
            return true;
        }
        let closed = |s: &StdTcpStream| {
            watch::state(s.as_fd()).map_or(true, |st| st.read_closed || st.error)
        };
        let braking = |cookie, seed| {
            sm.traffic(cookie)
                .is_some_and(|t| t.bytes >= seed + BRAKE_STEP || t.brake.seq_known == SEQ_BROKEN)
        };
        closed(&self.client)
            || closed(&self.upstream)
            || braking(self.pair.client_cookie, self.consumed.forwarded)
            || braking(self.pair.upstream_cookie, self.consumed.forwarded_down)
    }

    /// Ends a session that stayed idle for its timeout.
    pub fn end_idle(self, shared: &Shared) -> Outcome {
        self.end(shared, Ok(End::Idle))
    }

    /// Carries the pair to its end: waits for each side's FIN (braking a source whose peer falls
    /// behind), forwards it once the kernel has handed every byte over, and returns when both
    /// directions are closed, on an error, or after `idle` without payload.
    pub async fn run(mut self, shared: &Shared, clock: IdleClock) -> Outcome {
        let Some(sm) = shared.sockmap() else {
            return self.end(shared, Err(io::Error::other("the sockhash is gone")));
        };
        // Events now wake this task; each direction re-checks its socket and brake first.
        self.watches.0.activate();
        self.watches.1.activate();
        for b in [&mut self.brakes.0, &mut self.brakes.1]
            .into_iter()
            .flatten()
        {
            b.activate();
        }
        let consumed = &self.consumed;
        let up_dir = Dir {
            sm,
            src: &self.client,
            src_cookie: self.pair.client_cookie,
            src_watch: &self.watches.0,
            brake: self.brakes.0.as_ref(),
            dst: &self.upstream,
            consumed_src: consumed.from_client,
            seed: consumed.forwarded,
            sent0_dst: self.sent0.1,
            control: Mutex::new(BrakeControl {
                checkpoint: consumed.forwarded + BRAKE_STEP,
                ..Default::default()
            }),
        };
        let down_dir = Dir {
            sm,
            src: &self.upstream,
            src_cookie: self.pair.upstream_cookie,
            src_watch: &self.watches.1,
            brake: self.brakes.1.as_ref(),
            dst: &self.client,
            consumed_src: consumed.from_upstream,
            seed: consumed.forwarded_down,
            sent0_dst: self.sent0.0,
            control: Mutex::new(BrakeControl {
                checkpoint: consumed.forwarded_down + BRAKE_STEP,
                ..Default::default()
            }),
        };
        // Idle time is judged on the kernel's per-socket counters.
        let activity = || self.activity(sm);
        // The direction futures are built in place: a future held in a local before being
        // moved into another would take room in this state twice.
        let res = tokio::select! {
            r = async {
                tokio::try_join!(up_dir.run(shared), async {
                    if self.pair.upstream_active {
                        down_dir.run(shared).await
                    } else {
                        Box::pin(copy_rest(
                            shared,
                            &self.upstream,
                            &self.watches.1,
                            &self.client,
                            Direction::Down,
                        ))
                        .await
                    }
                })
            } => r.map(|_| End::Eof),
            () = super::idle_watch_from(clock, activity) => Ok(End::Idle),
        };
        self.end(shared, res)
    }

    /// Takes the pair out of the sockhash and reports the session's end.
    fn end(self, shared: &Shared, res: io::Result<End>) -> Outcome {
        let (up, down) = match shared.sockmap() {
            Some(sm) => {
                let last = sm.finish(&self.pair);
                if last.overlap > 0 {
                    shared
                        .metrics
                        .add(Counter::SockmapOverlapBytes, last.overlap);
                }
                (last.up.bytes, last.down.bytes)
            }
            None => (0, 0),
        };
        let end = match res {
            Ok(end) => end,
            Err(e) => {
                let _ = sys::set_linger_zero(self.client.as_fd());
                let _ = sys::set_linger_zero(self.upstream.as_fd());
                End::Error(e)
            }
        };
        Outcome {
            path: DataPath::Sockmap,
            up,
            down,
            end,
            promoted: self.promoted,
        }
    }
}

/// Most the daemon reads from a client while emptying its receive queue before the splice; a
/// client still sending beyond this gets the splice(2) path instead.
const QUEUED_MAX: u64 = 4 << 20;

/// Reads everything queued on `client` without waiting and writes it to `upstream` (or the
/// reverse), adding the bytes moved to `total` as it goes. Fails (so the session falls back)
/// if the source keeps the queue busy past [`QUEUED_MAX`]: then the queue may end in a
/// partially read skb. What it moved before failing is in `total` all the same.
async fn take_queued(
    client: &TcpStream,
    upstream: &mut TcpStream,
    total: &mut u64,
) -> io::Result<()> {
    take_queued_up_to(client, upstream, total, QUEUED_MAX).await
}

/// [`take_queued`], giving up past `max` bytes.
async fn take_queued_up_to(
    client: &TcpStream,
    upstream: &mut TcpStream,
    total: &mut u64,
    max: u64,
) -> io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let start = *total;
    // Read into spare capacity: no page of the buffer is touched unless bytes are queued,
    // which they seldom are.
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        if *total - start >= max {
            return Err(io::Error::other("peer keeps sending during the handover"));
        }
        buf.clear();
        match client.try_read_buf(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                upstream.write_all(&buf[..n]).await?;
                *total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
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
    /// The source's brake events.
    brake: Option<&'a BrakeWatch>,
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
        let brake = self.brake;
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
        Box::pin(self.flush(shared, None)).await?;
        Box::pin(drain(self.src, self.dst, self.consumed_src, self.sent0_dst)).await?;
        sys::shutdown_write(self.dst.as_fd())
    }

    /// Bytes the kernel took from the source that the destination has not accepted yet, and
    /// the source's byte count.
    fn backlog(&self) -> io::Result<(u64, u64)> {
        let (total, passed) = self
            .sm
            .traffic(self.src_cookie)
            .map_or((0, 0), |t| (t.bytes, t.brake.passed));
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
            .traffic(self.src_cookie)
            .is_some_and(|t| t.brake.seq_known == SEQ_BROKEN)
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
        // Only a receive buffer the daemon fixed itself can be shut and given back as it was;
        // an autotuned one would stay fixed at whatever size it had reached.
        let window = shared.buffers.kernel_rcv(&sys::tcp_info(self.src.as_fd())?);
        self.flush(shared, window).await
    }

    /// Moves the bytes the verdict passed to the source (while braked) to the destination, in
    /// order; the kernel redirects again once they are all gone.
    ///
    /// `window`: the source's receive buffer, when the daemon fixed it at the insert (a near
    /// socket), so that the sender's window can be kept shut while the hold drains and given
    /// back as it was. Reading a held byte frees receive memory and reopens the window: a
    /// sender faster than the destination then refilled the hold as fast as the daemon drained
    /// it (at the destination's pace), the hold never emptied, and the daemon carried the rest
    /// of the stream by copy (on a link shaped to 400 Mbit/s, 68-87 % of every upload). So
    /// before each read the receive buffer shrinks by what the read will free, which keeps the
    /// window where it was: the sender fills what it was offered and stops. The hold's last
    /// byte is peeked, written ahead and counted, so that the kernel redirects again before any
    /// new byte can come; only then is the buffer given back and the byte consumed, a read that
    /// sends the window update. (Userspace has no other way to make TCP announce a window, and
    /// on a near link the sender's next segment arrives within that very read.) Without
    /// `window` (after the FIN, or an autotuned buffer), the held bytes are simply moved.
    async fn flush(&self, shared: &Shared, window: Option<i32>) -> io::Result<()> {
        let src = self.src.as_fd();
        let mut buf = Vec::new();
        let mut delay = Duration::from_micros(100);
        let mut caught_up = false;
        // The hold's last byte was written and counted ahead; it is still queued in `src`.
        let mut ahead = false;
        let result = loop {
            let read = self.control().read;
            let passed = self
                .sm
                .traffic(self.src_cookie)
                .map_or(read, |t| t.brake.passed);
            if ahead {
                let last = passed <= read;
                if let (true, Some(rcvbuf)) = (last, window) {
                    // Everything held is at the destination and the kernel redirects again:
                    // the read below announces the window.
                    if let Err(e) =
                        sys::setsockopt_int(src, libc::SOL_SOCKET, libc::SO_RCVBUF, rcvbuf)
                    {
                        break Err(e);
                    }
                }
                match (&*self.src).read(&mut [0u8]) {
                    Ok(1) => ahead = false,
                    Ok(_) => {
                        break Err(io::Error::other("a peeked byte was not there to read"));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_millis(10));
                        continue;
                    }
                    Err(e) => break Err(e),
                }
                if last {
                    return Ok(());
                }
                continue;
            }
            if passed <= read {
                break Ok(());
            }
            if !caught_up {
                // Bytes the kernel redirected before the brake may still wait in the peer's
                // backlog; ours must not overtake them. No new ones are redirected meanwhile.
                if let Err(e) = self.wait_backlog_below(0).await {
                    break Err(e);
                }
                caught_up = true;
            }
            let remaining = passed - read;
            let shut = window.is_some();
            let step = if shut && remaining == 1 {
                buf.resize(1, 0);
                sys::peek(src, &mut buf)
            } else {
                // With the window shut, the last byte is left for the peek.
                let want = usize::try_from(remaining - u64::from(shut))
                    .unwrap_or(usize::MAX)
                    .min(FLUSH_CHUNK);
                // Give up the memory this read frees (its share of what the hold takes), so that
                // the window it announces is no larger than the one before it.
                if let (true, Ok((rmem, kept))) = (shut, sys::rcv_meminfo(src)) {
                    let freed = rmem.saturating_mul(want as u64) / remaining;
                    let smaller = i32::try_from(kept.saturating_sub(freed) / 2).unwrap_or(i32::MAX);
                    let _ =
                        sys::setsockopt_int(src, libc::SOL_SOCKET, libc::SO_RCVBUF, smaller.max(1));
                }
                buf.resize(want, 0);
                (&*self.src).read(&mut buf)
            };
            let n = match step {
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
                Err(e) => break Err(e),
            };
            delay = Duration::from_micros(100);
            if let Err(e) = write_all(self.dst, &buf[..n]).await {
                break Err(e);
            }
            shared.metrics.add(Counter::SockmapBrakeBytes, n as u64);
            if let Err(e) = self.set_control(BrakeControl {
                read: read + n as u64,
                ..self.control()
            }) {
                break Err(e);
            }
            ahead = shut && remaining == 1;
        };
        // Nothing was peeked ahead, or the session is failing: the buffer goes back as it was.
        if let Some(rcvbuf) = window {
            let _ = sys::setsockopt_int(src, libc::SOL_SOCKET, libc::SO_RCVBUF, rcvbuf);
        }
        result
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

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream as StdTcpStream},
        thread,
    };

    use tokio::net::TcpStream;

    use super::take_queued_up_to;

    /// A connected loopback pair: (ours, for tokio; the peer's end).
    fn pair() -> (TcpStream, StdTcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = StdTcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (TcpStream::from_std(ours).unwrap(), peer)
    }

    /// A queue fuller than the drain's limit makes it give up, and the bytes it moved before
    /// are counted all the same: the session falls back with them in its figures.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_that_gives_up_counts_what_it_moved() {
        const QUEUED: usize = 512 * 1024;
        const MAX: u64 = 32 * 1024;
        let (client, mut sender) = pair();
        let (mut upstream, mut target) = pair();
        // More queued than MAX: the receive queue takes at least its initial buffer.
        let writer = thread::spawn(move || {
            let _ = sender.write_all(&vec![7u8; QUEUED]);
            sender
        });
        let reader = thread::spawn(move || {
            let mut got = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match target.read(&mut buf) {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n as u64,
                }
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut total = 0;
        let r = take_queued_up_to(&client, &mut upstream, &mut total, MAX).await;
        assert!(
            r.is_err(),
            "the drain read {total} bytes and found the queue empty"
        );
        assert!(total >= MAX, "gave up after {total} bytes");
        drop(upstream);
        assert_eq!(
            reader.join().unwrap(),
            total,
            "bytes moved against bytes counted"
        );
        drop((client, writer.join()));
    }
}
