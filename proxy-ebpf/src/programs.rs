//! The programs and maps (only compiled for the bpf target).

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel},
    macros::{map, stream_verdict},
    maps::{Array, HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use proxy_common::{
    metrics::{
        DataPath, SessionTraffic, Traffic, TrafficSlot, BPF_F_MMAPABLE, COUNTERS_MAX,
        SESSIONS_MAX_ENTRIES, TRAFFIC_SLOTS_MAX,
    },
    sockmap::{
        BrakeControl, BrakeEvent, BrakeState, LayoutSlot, BRAKE_EVENTS_BYTES, LAYOUT_SLOTS,
        SEQ_BROKEN, SOCKHASH_MAX_ENTRIES,
    },
};

// Map names must equal the constants in proxy_common (the attribute needs a literal).

/// `cookie(socket) -> peer socket`, the redirect targets; see `proxy_common::sockmap::PAIRS`.
#[map(name = "EBSOCKS_PAIRS")]
static PAIRS: SockHash<u64> = SockHash::with_max_entries(SOCKHASH_MAX_ENTRIES, 0);

/// `cookie(socket) -> socket`: membership runs this program on the socket; see
/// `proxy_common::sockmap::ACTIVE`. The program never reads it.
#[map(name = "EBSOCKS_ACTIVE")]
static ACTIVE: SockHash<u64> = SockHash::with_max_entries(SOCKHASH_MAX_ENTRIES, 0);

/// `cookie -> the daemon's brake settings`; see `proxy_common::sockmap::BRAKES`.
#[map(name = "EBSOCKS_BRAKES")]
static BRAKES: HashMap<u64, BrakeControl> = HashMap::with_max_entries(SESSIONS_MAX_ENTRIES, 0);

/// Kernel structure offsets, by `LayoutSlot`; see `proxy_common::sockmap::LAYOUT`.
#[map(name = "EBSOCKS_LAYOUT")]
static LAYOUT: Array<u32> = Array::with_max_entries(LAYOUT_SLOTS, 0);

/// Cookies of sockets that reached their checkpoint, for the daemon.
#[map(name = "EBSOCKS_BRAKE_EVENTS")]
static BRAKE_EVENTS: RingBuf = RingBuf::with_byte_size(BRAKE_EVENTS_BYTES, 0);

/// Per-socket counters and this program's brake state (`SessionTraffic::brake`); entries are
/// created and removed by the daemon.
#[map(name = "EBSOCKS_SESSIONS")]
static SESSIONS: HashMap<u64, SessionTraffic> = HashMap::with_max_entries(SESSIONS_MAX_ENTRIES, 0);

/// Bytes and skbs per traffic slot, per CPU.
#[map(name = "EBSOCKS_KTRAFFIC")]
pub(crate) static KTRAFFIC: PerCpuArray<Traffic> =
    PerCpuArray::with_max_entries(TRAFFIC_SLOTS_MAX, 0);

/// Written by the daemon only (splice/copy bytes) through a shared mapping
/// (`BPF_F_MMAPABLE`); declared here so that one object defines every map `ebsocks stats` reads.
#[map(name = "EBSOCKS_UTRAFFIC")]
static UTRAFFIC: Array<Traffic> = Array::with_max_entries(TRAFFIC_SLOTS_MAX, BPF_F_MMAPABLE);

/// Daemon event counters; written by the daemon only, through a shared mapping.
#[map(name = "EBSOCKS_COUNTERS")]
static COUNTERS: Array<u64> = Array::with_max_entries(COUNTERS_MAX, BPF_F_MMAPABLE);

#[stream_verdict]
pub fn ebsocks_verdict(ctx: SkBuffContext) -> u32 {
    // Keep the daemon-only maps referenced so that the linker keeps them in the object.
    let _ = (&UTRAFFIC, &COUNTERS, &ACTIVE);
    match try_verdict(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

/// Byte offset of `cb` in the kernel's `struct sk_buff` on 64-bit kernels (unchanged since
/// Linux 4.x); TCP's control block there starts with the skb's `seq` and `end_seq`. Every skb
/// checks the layout: a range that does not span the payload is not used.
const SKB_CB_OFFSET: usize = 40;
/// Most bytes one `bpf_skb_adjust_room` call may cut from an sk_skb.
const TRIM_STEP: u32 = 0xfff;
/// Most cuts per skb: an overlap of up to 4 full loopback segments.
const TRIM_STEPS: u32 = 64;

/// The skb's TCP sequence range `(seq, end_seq)`, if it spans exactly its payload (plus one
/// for a FIN).
#[inline(always)]
fn tcp_range(ctx: &SkBuffContext, len: u32) -> Option<(u32, u32)> {
    let cb = ctx
        .skb
        .skb
        .cast::<u8>()
        .wrapping_add(SKB_CB_OFFSET)
        .cast::<[u32; 2]>();
    // SAFETY: the context pointer is the kernel's sk_buff; the helper reads it safely.
    let [seq, end] = unsafe { bpf_probe_read_kernel(cb) }.ok()?;
    let span = end.wrapping_sub(seq);
    (span == len || span == len.wrapping_add(1)).then_some((seq, end))
}

/// The receiving socket's `copied_seq` (see `LayoutSlot::TcpCopiedSeq`), if its offsets are
/// known.
#[inline(always)]
fn copied_seq(ctx: &SkBuffContext) -> Option<u32> {
    let offset = |slot: LayoutSlot| LAYOUT.get(slot as u32).copied().filter(|&o| o != 0);
    let (sk_off, seq_off) = (
        offset(LayoutSlot::SkbSk)?,
        offset(LayoutSlot::TcpCopiedSeq)?,
    );
    let at = ctx
        .skb
        .skb
        .cast::<u8>()
        .wrapping_add(sk_off as usize)
        .cast::<u64>();
    // SAFETY: the context pointer is the kernel's sk_buff; the helper reads it safely.
    let sk = unsafe { bpf_probe_read_kernel(at) }.ok()?;
    if sk == 0 {
        return None;
    }
    let at = (sk as usize).wrapping_add(seq_off as usize) as *const u32;
    // SAFETY: as above, a checked read of kernel memory.
    unsafe { bpf_probe_read_kernel(at) }.ok()
}

/// Cuts `n` bytes off the skb's head.
#[inline(always)]
fn trim(ctx: &SkBuffContext, mut n: u32) -> bool {
    for _ in 0..TRIM_STEPS {
        if n == 0 {
            return true;
        }
        let step = if n < TRIM_STEP { n } else { TRIM_STEP };
        // Mode and flags 0: the only ones sk_skb takes; a negative difference pulls the head.
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            return false;
        }
        n -= step;
    }
    n == 0
}

/// Cuts off what the skb repeats of bytes already forwarded (see
/// `proxy_common::sockmap::BrakeState`) and advances the socket's forwarded sequence. Returns
/// the payload length left (0: nothing new, drop it), or `None` if the repeat could not be cut.
///
/// # Safety
/// `st` must point into this socket's map value, written only by this program under the
/// socket's lock.
#[inline(always)]
unsafe fn deduplicate(ctx: &SkBuffContext, st: *mut BrakeState, len: u32) -> Option<u32> {
    let Some((seq, end)) = tcp_range(ctx, len) else {
        return Some(len);
    };
    // SAFETY: guaranteed by the caller.
    unsafe {
        if (*st).seq_known == SEQ_BROKEN {
            return None;
        }
        let mut len = len;
        if (*st).seq_known == 0 {
            // The first skb since the socket entered the sockhash. What lies before the socket's
            // copied_seq the daemon has read itself: a retransmission arriving now may repeat it.
            (*st).next_seq = match copied_seq(ctx) {
                // Serial-number arithmetic: `c` within [seq, end].
                Some(c)
                    if (c.wrapping_sub(seq) as i32) >= 0 && (end.wrapping_sub(c) as i32) >= 0 =>
                {
                    c
                }
                _ => seq,
            };
            (*st).seq_known = 1;
        }
        let next = (*st).next_seq;
        // Serial-number arithmetic: positive when `seq` lies before `next`.
        let overlap = next.wrapping_sub(seq) as i32;
        if (end.wrapping_sub(next) as i32) > 0 {
            (*st).next_seq = end;
        }
        if overlap > 0 {
            let overlap = overlap as u32;
            if overlap >= len {
                // No new payload (at most a FIN, which the daemon forwards itself).
                (*st).overlap += u64::from(len);
                return Some(0);
            }
            if !trim(ctx, overlap) {
                // The repeat cannot be cut: the stream cannot be kept exact; the daemon
                // resets the session.
                (*st).seq_known = SEQ_BROKEN;
                return None;
            }
            (*st).overlap += u64::from(overlap);
            len -= overlap;
        }
        Some(len)
    }
}

#[inline(always)]
fn try_verdict(ctx: &SkBuffContext) -> Result<u32, u32> {
    let len = ctx.len();
    // A bare FIN reaches the verdict as an empty skb. Redirecting it makes the peer's backlog
    // worker read skb_send_sock() == 0 as EPIPE and stop sending for good, so drop it; the daemon
    // forwards the FIN itself once the redirected bytes have drained.
    if len == 0 {
        return Err(SK_DROP);
    }
    // SAFETY: the context pointer is the program's own __sk_buff.
    let own = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let session = SESSIONS.get_ptr_mut(&own);
    let event = BrakeEvent {
        cookie: own,
        // SAFETY: a map value valid for this program run; the id is written once, at insert.
        session_id: session.map_or(0, |s| unsafe { (*s).session_id }),
    };
    // SAFETY: the daemon replaces BRAKES entries whole; this run reads one consistent value.
    let control = unsafe { BRAKES.get(&own) }.copied();
    // SAFETY: a map value valid for this program run; only this program writes `brake`, under
    // the socket's lock.
    let state = session.map(|s| unsafe { &raw mut (*s).brake });
    let len = match state {
        // SAFETY: this socket's value; the verdict runs under the socket's lock.
        Some(st) => match unsafe { deduplicate(ctx, st, len) } {
            Some(0) => return Err(SK_DROP),
            Some(n) => n,
            None => {
                // Tell the daemon at once, whatever the checkpoint.
                let _ = BRAKE_EVENTS.output::<BrakeEvent>(&event, 0);
                return Err(SK_DROP);
            }
        },
        None => len,
    };

    // Braked, or bytes passed earlier are still waiting for the daemon: pass this one too, so
    // that it queues behind them on the socket itself (and counts against its receive buffer).
    // The verdict runs under the socket's lock, so `state` has one writer at a time.
    let mut hold = false;
    if let (Some(c), Some(st)) = (control, state) {
        // SAFETY: map value valid for this run, written only by this program under the lock.
        unsafe {
            if c.braked != 0 || (*st).passed != c.read {
                (*st).passed += u64::from(len);
                hold = true;
            }
        }
    }
    if !hold {
        let mut cookie = own;
        let action = PAIRS.redirect_skb(ctx, &mut cookie, 0);
        if action != i64::from(SK_PASS) {
            return Err(SK_DROP);
        }
    }

    if let Some(session) = session {
        // SAFETY: `session` points into a map value that stays valid for this program run; the
        // counters are only ever modified with atomic adds.
        let (dir, total) = unsafe {
            add(&raw mut (*session).bytes, u64::from(len));
            add(&raw mut (*session).packets, 1);
            ((*session).direction, (*session).bytes)
        };
        if let (Some(c), Some(st)) = (control, state) {
            // SAFETY: as above.
            unsafe {
                if total >= c.checkpoint && (*st).reported != c.checkpoint {
                    (*st).reported = c.checkpoint;
                    let _ = BRAKE_EVENTS.output::<BrakeEvent>(&event, 0);
                }
            }
        }
        let slot = TrafficSlot::tcp(DataPath::Sockmap, dir_from(dir));
        if let Some(t) = KTRAFFIC.get_ptr_mut(slot.0) {
            // SAFETY: per-CPU value, no other writer on this CPU while the program runs.
            unsafe {
                (*t).bytes += u64::from(len);
                (*t).packets += 1;
            }
        }
    }
    Ok(SK_PASS)
}

#[inline(always)]
fn dir_from(raw: u32) -> proxy_common::metrics::Direction {
    if raw == 0 {
        proxy_common::metrics::Direction::Up
    } else {
        proxy_common::metrics::Direction::Down
    }
}

/// Atomic add whose result is unused, so that it compiles to BPF_XADD (valid on every kernel).
///
/// # Safety
/// `p` must point to a valid, 8-byte aligned u64 in a map value.
#[inline(always)]
pub(crate) unsafe fn add(p: *mut u64, v: u64) {
    // SAFETY: guaranteed by the caller. The returned old value is discarded, so LLVM emits the
    // plain BPF_XADD that every kernel accepts (fetching variants need Linux 5.12).
    let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
