//! The UDP fast path: `ebsocks_xdp`, attached to the interfaces in `[udp] xdp_interfaces`.
//!
//! Every frame is counted by protocol ([`IFACE_TRAFFIC`]). A UDP datagram addressed to a relay
//! socket (a key of [`RELAYS`]) is then sorted as the relay would sort it:
//!
//! ```text
//! from the client:  malformed header -> drop   FRAG != 0 -> drop   refused dst (DENY) -> drop
//!                   offloaded dst (PEERS) -> strip the SOCKS header, rewrite, FIB, transmit
//! from a target:    offloaded (PEERS) -> add the SOCKS header, rewrite, FIB, transmit
//! from anyone else: drop as foreign, once the relay's target list is complete
//! ```
//!
//! Anything else (a domain destination, IP options or fragments, a result over the egress MTU,
//! a FIB miss) passes to the stack and reaches the relay socket, which handles every datagram
//! correctly. Only IPv4 without options and IPv6 without extension headers are parsed, so the
//! UDP header and the SOCKS header sit at fixed offsets; every packet access is bounds-checked
//! against `data_end`.
//!
//! # Minimum kernel version
//! `bpf_fib_lookup` in XDP needs Linux 4.18; `bpf_link`-based attachment (detached when the
//! daemon exits) 5.9. IPv6 offload asks the FIB for the source address
//! (`BPF_FIB_LOOKUP_SRC`), which needs 6.7: an older kernel fails the lookup at run time and
//! IPv6 flows pass to the relay (counted as `xdp_passed_fib`).

use core::{
    mem::size_of,
    ptr::{read_unaligned, write_unaligned},
};

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action::XDP_DROP, xdp_action::XDP_PASS,
        xdp_action::XDP_TX, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_SRC_ADDR,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
    EbpfContext as _,
};
use proxy_common::{
    metrics::{Direction, Traffic, TrafficSlot, UdpPath},
    xdp::{
        csum, iface_slot, IfaceDir, Peer, PeerKey, Proto, Relay, RelayKey, XdpCounter,
        COUNTERS_MAX, DENY_MAX_ENTRIES, IFACE_SLOTS, PEERS_MAX_ENTRIES, PEER_OFFLOAD,
        RELAYS_MAX_ENTRIES, RELAY_PEERS_COMPLETE,
    },
};

use crate::programs::{add, KTRAFFIC};

/// `relay socket -> association`; see `proxy_common::xdp::RELAYS`.
#[map(name = "EBSOCKS_XRELAYS")]
static RELAYS: HashMap<RelayKey, Relay> = HashMap::with_max_entries(RELAYS_MAX_ENTRIES, 0);

/// `(relay, target) -> flow`; see `proxy_common::xdp::PEERS`.
#[map(name = "EBSOCKS_XPEERS")]
static PEERS: HashMap<PeerKey, Peer> = HashMap::with_max_entries(PEERS_MAX_ENTRIES, 0);

/// `(relay, destination)` the rules refused; see `proxy_common::xdp::DENY`.
#[map(name = "EBSOCKS_XDENY")]
static DENY: LruHashMap<PeerKey, u32> = LruHashMap::with_max_entries(DENY_MAX_ENTRIES, 0);

/// Frames per protocol and direction, per CPU.
#[map(name = "EBSOCKS_XSTATS")]
static IFACE_TRAFFIC: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(IFACE_SLOTS, 0);

/// Per-reason counters, per CPU.
#[map(name = "EBSOCKS_XCOUNT")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_MAX, 0);

const ETH_LEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const UDP_LEN: usize = 8;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;
/// Hop limit of the datagrams the program sends: they leave the proxy as its own.
const TTL: u8 = 64;
/// Whether offloaded flows are rewritten and transmitted here.
const OFFLOAD: bool = true;
/// `udp` found an offloaded client -> target datagram; `PENDING` holds what `up_v4` or
/// `up_v6` needs.
const NEXT_UP: u32 = 0x100;
/// `udp` found an offloaded target -> client datagram; see `down_v4` and `down_v6`.
const NEXT_DOWN: u32 = 0x101;
/// The IPv6 header (no extension headers).
const IP6_LEN: usize = 40;
/// Offsets in an IPv6 frame: the IPv6 header, the UDP header, the UDP payload.
const V6_IP: usize = ETH_LEN;
const V6_UDP: usize = V6_IP + IP6_LEN;
const V6_PAYLOAD: usize = V6_UDP + UDP_LEN;
/// A SOCKS UDP header naming an IPv6 address.
const SOCKS_V6: usize = 22;

/// What the sorting stage hands to the rewrite stage. The two run as separate BPF functions
/// called one after the other from the entry point, so that their stack frames are not on
/// one call chain (the BPF stack limit is 512 bytes for the whole chain).
///
/// The IPv6 rewrite reads the addresses and ports it writes from here (and the rest from
/// the packet), so that no header copy sits on its stack.
#[repr(C)]
#[derive(Clone, Copy)]
struct Pending {
    /// IPv4 only: the IP header and UDP header as received.
    ip: [u8; 20],
    udp: [u8; UDP_LEN],
    /// UDP payload length as received (SOCKS header included when from the client).
    payload: u32,
    /// The flow: relay socket and target.
    key: PeerKey,
    /// Target -> client only: the client's address and port (network order).
    client_addr: [u8; 16],
    client_port: u16,
    _pad: [u8; 2],
    /// The rewrite stage's `bpf_fib_lookup` parameters: 64 bytes kept off the stack.
    fib: FibParams,
}

/// One [`Pending`] per CPU (XDP runs to completion on one CPU).
#[map(name = "EBSOCKS_XPEND")]
static PENDING: PerCpuArray<Pending> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn ebsocks_xdp(ctx: XdpContext) -> u32 {
    match try_xdp(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

/// Bounds-checked pointer to `T` at `off` bytes into the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, u32> {
    // Volatile loads: LLVM must not drop this check as implied by an earlier length
    // comparison (e.g. the UDP length against `data_end - data`), which the verifier cannot
    // follow.
    // SAFETY: the context pointer is the program's own xdp_md.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&raw const (*ctx.ctx).data_end) as usize,
        )
    };
    if start + off + size_of::<T>() > end {
        return Err(XDP_PASS);
    }
    Ok((start + off) as *mut T)
}

/// A copy of `N` packet bytes at `off`.
#[inline(always)]
fn read<const N: usize>(ctx: &XdpContext, off: usize) -> Result<[u8; N], u32> {
    let p = ptr_at::<[u8; N]>(ctx, off)?;
    // SAFETY: `ptr_at` checked that the N bytes lie inside the packet.
    Ok(unsafe { read_unaligned(p) })
}

#[inline(always)]
fn count(c: XdpCounter) {
    if let Some(v) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU value; no other writer on this CPU while the program runs.
        unsafe { *v += 1 };
    }
}

#[inline(always)]
fn count_frame(proto: Proto, dir: IfaceDir, len: u64) {
    if let Some(t) = IFACE_TRAFFIC.get_ptr_mut(iface_slot(proto, dir)) {
        // SAFETY: as above.
        unsafe {
            (*t).bytes += len;
            (*t).packets += 1;
        }
    }
}

#[inline(always)]
fn count_udp(dir: Direction, payload: u64) {
    if let Some(t) = KTRAFFIC.get_ptr_mut(TrafficSlot::udp(UdpPath::Xdp, dir).0) {
        // SAFETY: as above.
        unsafe {
            (*t).bytes += payload;
            (*t).packets += 1;
        }
    }
}

#[inline(always)]
fn try_xdp(ctx: &XdpContext) -> Result<u32, u32> {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let Ok(eth_type) = read::<2>(ctx, 12) else {
        count_frame(Proto::Other, IfaceDir::Rx, len);
        return Ok(XDP_PASS);
    };
    let l4 = if eth_type == ETH_P_IP {
        read::<1>(ctx, ETH_LEN + 9).map(|p| (p[0], 4u8))
    } else if eth_type == ETH_P_IPV6 {
        read::<1>(ctx, ETH_LEN + 6).map(|p| (p[0], 6u8))
    } else {
        Err(XDP_PASS)
    };
    let proto = match l4 {
        Ok((IPPROTO_TCP, _)) => Proto::Tcp,
        Ok((IPPROTO_UDP, _)) => Proto::Udp,
        Ok((IPPROTO_ICMP, 4)) | Ok((IPPROTO_ICMPV6, 6)) => Proto::Icmp,
        _ => Proto::Other,
    };
    count_frame(proto, IfaceDir::Rx, len);
    match l4 {
        Ok((IPPROTO_UDP, 4)) => match udp::<20, 4>(ctx) {
            Ok(NEXT_UP) => Ok(up_v4(ctx)),
            Ok(NEXT_DOWN) => Ok(down_v4(ctx)),
            other => other,
        },
        Ok((IPPROTO_UDP, 6)) => match udp::<40, 16>(ctx) {
            Ok(NEXT_UP) => Ok(up_v6(ctx)),
            Ok(NEXT_DOWN) => Ok(down_v6(ctx)),
            other => other,
        },
        _ => Ok(XDP_PASS),
    }
}

/// An address as 16 bytes, IPv4 written IPv4-mapped.
#[inline(always)]
fn mapped<const AL: usize>(a: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    if AL == 4 {
        out[10] = 0xff;
        out[11] = 0xff;
        out[12] = a[0];
        out[13] = a[1];
        out[14] = a[2];
        out[15] = a[3];
    } else {
        let mut i = 0;
        while i < 16 {
            out[i] = a[i];
            i += 1;
        }
    }
    out
}

/// Whether a 16-byte address is IPv4-mapped.
#[inline(always)]
fn is_v4(a: &[u8; 16]) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// Adds (or with `sub`, removes) the words of `b` to a running checksum sum.
#[inline(always)]
fn sum_bytes(mut sum: u32, b: &[u8], sub: bool) -> u32 {
    let mut i = 0;
    while i + 1 < b.len() {
        let w = csum::word(b[i], b[i + 1]);
        sum = if sub {
            csum::sub(sum, w)
        } else {
            csum::add(sum, w)
        };
        i += 2;
    }
    sum
}

/// The parsed headers of a UDP datagram over IPv4 (`IPH` = 20, `AL` = 4) or IPv6 (40, 16).
struct Datagram<const IPH: usize> {
    ip: [u8; IPH],
    udp: [u8; UDP_LEN],
    /// UDP payload length.
    payload: usize,
}

impl<const IPH: usize> Datagram<IPH> {
    const SRC: usize = if IPH == 20 { 12 } else { 8 };
    const DST: usize = if IPH == 20 { 16 } else { 24 };
}

// Not inlined (a BPF-to-BPF call): the IPv4 and IPv6 paths then have stack frames of their
// own instead of sharing the entry point's 512 bytes.
#[inline(never)]
fn udp<const IPH: usize, const AL: usize>(ctx: &XdpContext) -> Result<u32, u32> {
    let ip = read::<IPH>(ctx, ETH_LEN)?;
    if IPH == 20 && ip[0] != 0x45 {
        // IP options: the UDP header is not where this program looks.
        return Ok(XDP_PASS);
    }
    let udp_hdr = read::<UDP_LEN>(ctx, ETH_LEN + IPH)?;
    let mut dg = Datagram::<IPH> {
        ip,
        udp: udp_hdr,
        payload: 0,
    };
    let relay_key = RelayKey {
        addr: mapped::<AL>(&dg.ip[Datagram::<IPH>::DST..Datagram::<IPH>::DST + AL]),
        port: u16::from_ne_bytes([dg.udp[2], dg.udp[3]]),
        _pad: [0; 2],
    };
    // SAFETY: entries are replaced whole by the daemon; this run reads one consistent value.
    let Some(relay) = (unsafe { RELAYS.get(&relay_key) }).copied() else {
        return Ok(XDP_PASS);
    };
    if IPH == 20 && (dg.ip[6] & 0x3f != 0 || dg.ip[7] != 0) {
        // MF or a fragment offset: the relay socket gets the reassembled datagram.
        count(XdpCounter::PassUnparsed);
        return Ok(XDP_PASS);
    }
    let udp_len = u16::from_be_bytes([dg.udp[4], dg.udp[5]]) as usize;
    let frame = ctx.data_end() - ctx.data();
    if udp_len < UDP_LEN || frame != ETH_LEN + IPH + udp_len {
        // Padding, or lengths that disagree: not rewritten here.
        count(XdpCounter::PassUnparsed);
        return Ok(XDP_PASS);
    }
    dg.payload = udp_len - UDP_LEN;
    let src = mapped::<AL>(&dg.ip[Datagram::<IPH>::SRC..Datagram::<IPH>::SRC + AL]);
    let sport = u16::from_ne_bytes([dg.udp[0], dg.udp[1]]);
    if src == relay.client_addr {
        if relay.client_port == 0 {
            count(XdpCounter::PassLearning);
            return Ok(XDP_PASS);
        }
        if sport == relay.client_port {
            return from_client::<IPH, AL>(ctx, &dg, &relay_key);
        }
    }
    let key = PeerKey {
        relay: relay_key,
        addr: src,
        port: sport,
        _pad: [0; 2],
    };
    match PEERS.get_ptr_mut(&key) {
        // SAFETY: the value stays valid for this run; flags are written by the daemon only.
        Some(peer) if unsafe { (*peer).flags } & PEER_OFFLOAD != 0 => {
            let _ = peer;
            pend_down::<IPH, AL>(&dg, &key, &relay)
        }
        Some(_) => {
            count(XdpCounter::PassNoFlow);
            Ok(XDP_PASS)
        }
        None if relay.flags & RELAY_PEERS_COMPLETE != 0 => {
            count(XdpCounter::DropForeign);
            Ok(XDP_DROP)
        }
        None => {
            count(XdpCounter::PassNoFlow);
            Ok(XDP_PASS)
        }
    }
}

/// A datagram from the association's client: check its SOCKS header like the relay would.
#[inline(always)]
fn from_client<const IPH: usize, const AL: usize>(
    ctx: &XdpContext,
    dg: &Datagram<IPH>,
    relay: &RelayKey,
) -> Result<u32, u32> {
    let at = ETH_LEN + IPH + UDP_LEN;
    if dg.payload < 4 {
        count(XdpCounter::DropMalformed);
        return Ok(XDP_DROP);
    }
    let head = read::<4>(ctx, at)?;
    let (frag, atyp) = (head[2], head[3]);
    match atyp {
        ATYP_IPV4 => {
            if dg.payload < 10 {
                count(XdpCounter::DropMalformed);
                return Ok(XDP_DROP);
            }
            if frag != 0 {
                count(XdpCounter::DropFrag);
                return Ok(XDP_DROP);
            }
            let h = read::<10>(ctx, at)?;
            let key = PeerKey {
                relay: *relay,
                addr: mapped::<4>(&h[4..8]),
                port: u16::from_ne_bytes([h[8], h[9]]),
                _pad: [0; 2],
            };
            let _ = h;
            Ok(up::<IPH, AL, 10>(dg, &key))
        }
        ATYP_IPV6 => {
            if dg.payload < 22 {
                count(XdpCounter::DropMalformed);
                return Ok(XDP_DROP);
            }
            if frag != 0 {
                count(XdpCounter::DropFrag);
                return Ok(XDP_DROP);
            }
            let h = read::<22>(ctx, at)?;
            let key = PeerKey {
                relay: *relay,
                addr: mapped::<16>(&h[4..20]),
                port: u16::from_ne_bytes([h[20], h[21]]),
                _pad: [0; 2],
            };
            let _ = h;
            Ok(up::<IPH, AL, 22>(dg, &key))
        }
        ATYP_DOMAIN => {
            let n = match read::<5>(ctx, at) {
                Ok(b) => b[4] as usize,
                Err(_) => 0,
            };
            if dg.payload < 5 || dg.payload < 5 + n + 2 {
                count(XdpCounter::DropMalformed);
                return Ok(XDP_DROP);
            }
            count(XdpCounter::PassDomain);
            Ok(XDP_PASS)
        }
        _ => {
            count(XdpCounter::DropMalformed);
            Ok(XDP_DROP)
        }
    }
}

/// The next hop towards `dst` for a packet of `tot_len` bytes (IP header included):
/// `(egress ifindex, smac, dmac)`, or the counter that says why not. The parameters live in
/// [`PENDING`] (the helper takes a map value as well as stack memory).
///
/// IPv6 also asks for the source address the kernel would pick (`BPF_FIB_LOOKUP_SRC`,
/// Linux 6.7), and it must be `src`: an IPv4 relay socket is bound to its address, but an
/// IPv6 one is dual-stack, bound to `[::]`, and sends from the address the routing table
/// picks; the program must not send from another address than the relay would.
#[inline(always)]
fn fib<const AL: usize>(
    ctx: &XdpContext,
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: u16,
    dport: u16,
    tot_len: u16,
) -> Result<(u32, [u8; 6], [u8; 6]), XdpCounter> {
    let pending = PENDING.get_ptr_mut(0).ok_or(XdpCounter::PassFib)?;
    // SAFETY: per-CPU value, only this program run uses it; all-zero is a valid
    // bpf_fib_lookup.
    let p = unsafe {
        let p = &raw mut (*pending).fib;
        p.write_bytes(0, 1);
        &mut *p
    };
    p.l4_protocol = IPPROTO_UDP;
    p.sport = sport;
    p.dport = dport;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = ctx.ingress_ifindex() as u32;
    let flags = if AL == 4 { 0 } else { BPF_FIB_LOOKUP_SRC };
    if AL == 4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[12], src[13], src[14], src[15]]);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[12], dst[13], dst[14], dst[15]]);
    } else {
        p.family = AF_INET6;
        // SAFETY: plain integers in a union of integer arrays.
        let (s, d) = unsafe {
            (
                &mut p.__bindgen_anon_3.ipv6_src,
                &mut p.__bindgen_anon_4.ipv6_dst,
            )
        };
        let mut i = 0;
        while i < 4 {
            s[i] = u32::from_ne_bytes([src[4 * i], src[4 * i + 1], src[4 * i + 2], src[4 * i + 3]]);
            d[i] = u32::from_ne_bytes([dst[4 * i], dst[4 * i + 1], dst[4 * i + 2], dst[4 * i + 3]]);
            i += 1;
        }
    }
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size passed; the context is the
    // program's own.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &raw mut *p,
            size_of::<FibParams>() as i32,
            flags,
        )
    };
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        if AL == 16 {
            // SAFETY: as above; the helper wrote the source it picked.
            let picked = unsafe { &p.__bindgen_anon_3.ipv6_src };
            let mut i = 0;
            while i < 4 {
                let want = u32::from_ne_bytes([
                    src[4 * i],
                    src[4 * i + 1],
                    src[4 * i + 2],
                    src[4 * i + 3],
                ]);
                if picked[i] != want {
                    return Err(XdpCounter::PassSource);
                }
                i += 1;
            }
        }
        Ok((p.ifindex, p.smac, p.dmac))
    } else if rc == i64::from(BPF_FIB_LKUP_RET_NO_SRC_ADDR) {
        Err(XdpCounter::PassSource)
    } else if rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        Err(XdpCounter::PassTooBig)
    } else {
        Err(XdpCounter::PassFib)
    }
}

/// Writes the new Ethernet, IP and UDP headers at the start of the packet (after the head was
/// moved) and transmits it.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "every header field is an input")]
fn emit<const IPH: usize, const AL: usize>(
    ctx: &XdpContext,
    dg: &Datagram<IPH>,
    hop: (u32, [u8; 6], [u8; 6]),
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: u16,
    dport: u16,
    udp_len: usize,
    check: u16,
) -> Result<u32, u32> {
    let (ifindex, smac, dmac) = hop;
    let mut eth = [0u8; ETH_LEN];
    let mut i = 0;
    while i < 6 {
        eth[i] = dmac[i];
        eth[6 + i] = smac[i];
        i += 1;
    }
    let ty = if IPH == 20 { ETH_P_IP } else { ETH_P_IPV6 };
    eth[12] = ty[0];
    eth[13] = ty[1];

    let mut ip = dg.ip;
    let off = 16 - AL;
    let mut i = 0;
    while i < AL {
        ip[Datagram::<IPH>::SRC + i] = src[off + i];
        ip[Datagram::<IPH>::DST + i] = dst[off + i];
        i += 1;
    }
    if IPH == 20 {
        let tot = ((IPH + udp_len) as u16).to_be_bytes();
        ip[2] = tot[0];
        ip[3] = tot[1];
        ip[8] = TTL;
        ip[10] = 0;
        ip[11] = 0;
        if let Ok(h) = <&[u8; 20]>::try_from(&ip[..20]) {
            let c = csum::ipv4_header(h).to_ne_bytes();
            ip[10] = c[0];
            ip[11] = c[1];
        }
    } else {
        let pl = (udp_len as u16).to_be_bytes();
        ip[4] = pl[0];
        ip[5] = pl[1];
        ip[7] = TTL;
    }
    let mut udp = [0u8; UDP_LEN];
    let sp = sport.to_ne_bytes();
    let dp = dport.to_ne_bytes();
    let ul = (udp_len as u16).to_be_bytes();
    let ck = check.to_ne_bytes();
    udp[0] = sp[0];
    udp[1] = sp[1];
    udp[2] = dp[0];
    udp[3] = dp[1];
    udp[4] = ul[0];
    udp[5] = ul[1];
    udp[6] = ck[0];
    udp[7] = ck[1];

    let e = ptr_at::<[u8; ETH_LEN]>(ctx, 0)?;
    let i = ptr_at::<[u8; IPH]>(ctx, ETH_LEN)?;
    let u = ptr_at::<[u8; UDP_LEN]>(ctx, ETH_LEN + IPH)?;
    // SAFETY: each pointer was bounds-checked for its size.
    unsafe {
        write_unaligned(e, eth);
        write_unaligned(i, ip);
        write_unaligned(u, udp);
    }
    let frame = (ETH_LEN + IPH + udp_len) as u64;
    count_frame(Proto::Udp, IfaceDir::Tx, frame);
    if ifindex as usize == ctx.ingress_ifindex() {
        Ok(XDP_TX)
    } else {
        // SAFETY: plain helper call.
        Ok(unsafe { bpf_redirect(ifindex, 0) } as u32)
    }
}

/// The running UDP checksum sum with the old pseudo-header addresses, ports and length taken
/// out (`None`: the datagram carries no checksum, IPv4 only).
#[inline(always)]
fn csum_without_old<const IPH: usize, const AL: usize>(dg: &Datagram<IPH>) -> Option<u32> {
    let old = u16::from_ne_bytes([dg.udp[6], dg.udp[7]]);
    if old == 0 {
        return None;
    }
    let mut sum = csum::start(old);
    sum = sum_bytes(
        sum,
        &dg.ip[Datagram::<IPH>::SRC..Datagram::<IPH>::SRC + AL],
        true,
    );
    sum = sum_bytes(
        sum,
        &dg.ip[Datagram::<IPH>::DST..Datagram::<IPH>::DST + AL],
        true,
    );
    // Ports, and the length twice (UDP header and pseudo-header).
    sum = sum_bytes(sum, &dg.udp[0..6], true);
    sum = sum_bytes(sum, &dg.udp[4..6], true);
    Some(sum)
}

#[inline(always)]
fn csum_with_new<const AL: usize>(
    mut sum: u32,
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: u16,
    dport: u16,
    udp_len: usize,
) -> u32 {
    sum = sum_bytes(sum, &src[16 - AL..], false);
    sum = sum_bytes(sum, &dst[16 - AL..], false);
    sum = csum::add(sum, sport);
    sum = csum::add(sum, dport);
    let l = (udp_len as u16).to_be();
    sum = csum::add(sum, l);
    csum::add(sum, l)
}

/// Client -> target: the checks of the sorting stage; an offloaded flow is handed to
/// [`up_v4`] or [`up_v6`] through [`PENDING`].
#[inline(always)]
fn up<const IPH: usize, const AL: usize, const H: usize>(dg: &Datagram<IPH>, key: &PeerKey) -> u32 {
    // SAFETY: the daemon replaces DENY entries whole.
    if unsafe { DENY.get(key) }.is_some() {
        count(XdpCounter::DropBlocked);
        return XDP_DROP;
    }
    let Some(peer) = PEERS.get_ptr_mut(key) else {
        count(XdpCounter::PassNoFlow);
        return XDP_PASS;
    };
    // SAFETY: flags are written by the daemon only.
    let flags = unsafe { (*peer).flags };
    // IPv4 to an IPv4 target, IPv6 to an IPv6 target: IPv4 <-> IPv6 stays with the relay.
    if !OFFLOAD || flags & PEER_OFFLOAD == 0 || !same_family::<AL, H>(&key.addr) {
        count(XdpCounter::PassNoFlow);
        return XDP_PASS;
    }
    let Some(p) = PENDING.get_ptr_mut(0) else {
        return XDP_PASS;
    };
    // SAFETY: per-CPU value, only this program run uses it.
    unsafe {
        if IPH == 20 {
            let mut i = 0;
            while i < 20 {
                (*p).ip[i] = dg.ip[i];
                i += 1;
            }
            (*p).udp = dg.udp;
        }
        (*p).payload = dg.payload as u32;
        (*p).key = *key;
    }
    NEXT_UP
}

/// Whether a target at `addr` (named by an `H`-byte SOCKS header) is of the family of the
/// datagram's IP header (`AL`-byte addresses).
#[inline(always)]
fn same_family<const AL: usize, const H: usize>(addr: &[u8; 16]) -> bool {
    if AL == 4 {
        H == 10 && is_v4(addr)
    } else {
        H == SOCKS_V6 && !is_v4(addr)
    }
}

#[inline(always)]
fn pend_down<const IPH: usize, const AL: usize>(
    dg: &Datagram<IPH>,
    key: &PeerKey,
    relay: &Relay,
) -> Result<u32, u32> {
    // The target and the client of the datagram's family only (IPv4 <-> IPv6 stays with the
    // relay).
    let same = if AL == 4 {
        is_v4(&key.addr) && is_v4(&relay.client_addr)
    } else {
        !is_v4(&key.addr) && !is_v4(&relay.client_addr)
    };
    if !OFFLOAD || !same {
        count(XdpCounter::PassNoFlow);
        return Ok(XDP_PASS);
    }
    let Some(p) = PENDING.get_ptr_mut(0) else {
        return Ok(XDP_PASS);
    };
    // SAFETY: per-CPU value, only this program run uses it.
    unsafe {
        if IPH == 20 {
            let mut i = 0;
            while i < 20 {
                (*p).ip[i] = dg.ip[i];
                i += 1;
            }
            (*p).udp = dg.udp;
        }
        (*p).payload = dg.payload as u32;
        (*p).key = *key;
        (*p).client_addr = relay.client_addr;
        (*p).client_port = relay.client_port;
    }
    Ok(NEXT_DOWN)
}

/// The rewrite stage of client -> target (IPv4): strip the 10-byte SOCKS header and send the
/// payload from the relay socket's address to the target.
#[inline(never)]
fn up_v4(ctx: &XdpContext) -> u32 {
    match try_up_v4(ctx) {
        Ok(a) | Err(a) => a,
    }
}

#[inline(always)]
fn try_up_v4(ctx: &XdpContext) -> Result<u32, u32> {
    const IPH: usize = 20;
    const AL: usize = 4;
    const H: usize = 10;
    let p = PENDING.get_ptr(0).ok_or(XDP_PASS)?;
    // SAFETY: per-CPU value written by the sorting stage of this run.
    let (dg, key) = unsafe {
        (
            Datagram::<IPH> {
                ip: (*p).ip,
                udp: (*p).udp,
                payload: (*p).payload as usize,
            },
            (*p).key,
        )
    };
    let peer = PEERS.get_ptr_mut(&key).ok_or(XDP_PASS)?;
    if dg.payload < H {
        return Ok(XDP_PASS);
    }
    let header = read::<H>(ctx, ETH_LEN + IPH + UDP_LEN)?;
    let dg = &dg;
    let key = &key;
    let header = &header;
    let payload = dg.payload - H;
    let udp_len = UDP_LEN + payload;
    let src = key.relay.addr;
    let sport = key.relay.port;
    let hop = match fib::<AL>(
        ctx,
        &src,
        &key.addr,
        sport,
        key.port,
        (IPH + udp_len) as u16,
    ) {
        Ok(h) => h,
        Err(c) => {
            count(c);
            return Ok(XDP_PASS);
        }
    };
    let check = match csum_without_old::<IPH, AL>(dg) {
        Some(sum) => {
            let sum = sum_bytes(sum, header, true);
            csum::finish_udp(csum_with_new::<AL>(
                sum, &src, &key.addr, sport, key.port, udp_len,
            ))
        }
        None if AL == 4 => 0,
        None => {
            count(XdpCounter::PassUnparsed);
            return Ok(XDP_PASS);
        }
    };
    // SAFETY: the context is the program's own; a positive delta shrinks the head.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, H as i32) } != 0 {
        count(XdpCounter::PassUnparsed);
        return Ok(XDP_PASS);
    }
    // From here the packet has lost its first H bytes: it must leave rewritten or be dropped.
    let action = emit::<IPH, AL>(
        ctx, dg, hop, &src, &key.addr, sport, key.port, udp_len, check,
    )
    .unwrap_or(XDP_DROP);
    // SAFETY: map value valid for this run; counters only change by atomic adds.
    unsafe {
        add(&raw mut (*peer).up_bytes, payload as u64);
        add(&raw mut (*peer).up_packets, 1);
    }
    count(XdpCounter::OffloadUp);
    count_udp(Direction::Up, payload as u64);
    Ok(action)
}

/// The rewrite stage of target -> client (IPv4): put the SOCKS header naming the target in
/// front of the payload and send it from the relay socket's address to the client.
#[inline(never)]
fn down_v4(ctx: &XdpContext) -> u32 {
    match try_down_v4(ctx) {
        Ok(a) | Err(a) => a,
    }
}

#[inline(always)]
fn try_down_v4(ctx: &XdpContext) -> Result<u32, u32> {
    let p = PENDING.get_ptr(0).ok_or(XDP_PASS)?;
    // SAFETY: per-CPU value written by the sorting stage of this run.
    let (dg, key, relay) = unsafe {
        (
            Datagram::<20> {
                ip: (*p).ip,
                udp: (*p).udp,
                payload: (*p).payload as usize,
            },
            (*p).key,
            Relay {
                client_addr: (*p).client_addr,
                client_port: (*p).client_port,
                flags: 0,
            },
        )
    };
    let peer = PEERS.get_ptr_mut(&key).ok_or(XDP_PASS)?;
    let mut h = [0u8; 10];
    h[3] = ATYP_IPV4;
    h[4] = key.addr[12];
    h[5] = key.addr[13];
    h[6] = key.addr[14];
    h[7] = key.addr[15];
    let port = key.port.to_ne_bytes();
    h[8] = port[0];
    h[9] = port[1];
    down_with::<20, 4, 10>(ctx, &dg, &key, &relay, peer, &h)
}

#[inline(always)]
fn down_with<const IPH: usize, const AL: usize, const H: usize>(
    ctx: &XdpContext,
    dg: &Datagram<IPH>,
    key: &PeerKey,
    relay: &Relay,
    peer: *mut Peer,
    header: &[u8; H],
) -> Result<u32, u32> {
    let payload = dg.payload;
    let udp_len = UDP_LEN + H + payload;
    if udp_len > 0xffff - IPH {
        count(XdpCounter::PassTooBig);
        return Ok(XDP_PASS);
    }
    let src = key.relay.addr;
    let sport = key.relay.port;
    let dst = relay.client_addr;
    let dport = relay.client_port;
    let hop = match fib::<AL>(ctx, &src, &dst, sport, dport, (IPH + udp_len) as u16) {
        Ok(h) => h,
        Err(c) => {
            count(c);
            return Ok(XDP_PASS);
        }
    };
    let check = match csum_without_old::<IPH, AL>(dg) {
        Some(sum) => {
            let sum = sum_bytes(sum, header, false);
            csum::finish_udp(csum_with_new::<AL>(sum, &src, &dst, sport, dport, udp_len))
        }
        None if AL == 4 => 0,
        None => {
            count(XdpCounter::PassUnparsed);
            return Ok(XDP_PASS);
        }
    };
    // SAFETY: the context is the program's own; a negative delta grows the head.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(H as i32)) } != 0 {
        count(XdpCounter::PassUnparsed);
        return Ok(XDP_PASS);
    }
    let Ok(s) = ptr_at::<[u8; H]>(ctx, ETH_LEN + IPH + UDP_LEN) else {
        return Ok(XDP_DROP);
    };
    // SAFETY: bounds-checked above.
    unsafe { write_unaligned(s, *header) };
    let action =
        emit::<IPH, AL>(ctx, dg, hop, &src, &dst, sport, dport, udp_len, check).unwrap_or(XDP_DROP);
    // SAFETY: map value valid for this run; counters only change by atomic adds.
    unsafe {
        add(&raw mut (*peer).down_bytes, payload as u64);
        add(&raw mut (*peer).down_packets, 1);
    }
    count(XdpCounter::OffloadDown);
    count_udp(Direction::Down, payload as u64);
    Ok(action)
}

/// The rewrite stage of client -> target (IPv6): strip the 22-byte SOCKS header and send the
/// payload from the relay socket's address to the target.
///
/// Nothing is copied to the stack: the new addresses and ports are read from [`PENDING`],
/// the FIB parameters live there too, the checksum is updated incrementally
/// ([`csum::relayed`]) from words read in the packet, and the new headers are written field
/// by field into the packet after the head moved.
#[inline(never)]
fn up_v6(ctx: &XdpContext) -> u32 {
    match try_up_v6(ctx) {
        Ok(a) | Err(a) => a,
    }
}

#[inline(always)]
fn try_up_v6(ctx: &XdpContext) -> Result<u32, u32> {
    let p = PENDING.get_ptr(0).ok_or(XDP_PASS)?;
    // SAFETY: per-CPU value written by the sorting stage of this run; it stays valid (and
    // unchanged but for `fib`) for the whole run.
    let (key, wrapped) = unsafe { (&(*p).key, (*p).payload as usize) };
    let peer = PEERS.get_ptr_mut(key).ok_or(XDP_PASS)?;
    if wrapped < SOCKS_V6 {
        return Ok(XDP_PASS);
    }
    let payload = wrapped - SOCKS_V6;
    let udp_len = UDP_LEN + payload;
    if IP6_LEN + udp_len > 0xffff {
        // Not for the FIB's 16-bit length (nor for any MTU).
        count(XdpCounter::PassTooBig);
        return Ok(XDP_PASS);
    }
    let old_len = (UDP_LEN + wrapped) as u16;
    let ip = ptr_at::<[u8; IP6_LEN]>(ctx, V6_IP)?;
    let udp = ptr_at::<[u8; UDP_LEN]>(ctx, V6_UDP)?;
    let head = ptr_at::<[u8; 4]>(ctx, V6_PAYLOAD)?;
    // SAFETY: bounds-checked above; references into the packet, valid until the head moves.
    let (ip, udp, head) = unsafe { (&*ip, &*udp, &*head) };
    let old = u16::from_ne_bytes([udp[6], udp[7]]);
    if old == 0 {
        // No checksum: invalid over IPv6, the relay socket's kernel drops it.
        count(XdpCounter::PassUnparsed);
        return Ok(XDP_PASS);
    }
    let client = <&[u8; 16]>::try_from(&ip[8..24]).map_err(|_| XDP_PASS)?;
    let cport = u16::from_ne_bytes([udp[0], udp[1]]);
    let check = csum::relayed(old, client, cport, *head, old_len, udp_len as u16, true);
    let first = [ip[0], ip[1], ip[2], ip[3]];
    let hop = match fib::<16>(
        ctx,
        &key.relay.addr,
        &key.addr,
        key.relay.port,
        key.port,
        (IP6_LEN + udp_len) as u16,
    ) {
        Ok(h) => h,
        Err(c) => {
            count(c);
            return Ok(XDP_PASS);
        }
    };
    // SAFETY: the context is the program's own; a positive delta shrinks the head.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, SOCKS_V6 as i32) } != 0 {
        count(XdpCounter::PassUnparsed);
        return Ok(XDP_PASS);
    }
    // From here the packet has lost its first 22 bytes: it must leave rewritten or be dropped.
    let action = emit_v6(
        ctx,
        first,
        hop,
        (&key.relay.addr, key.relay.port),
        (&key.addr, key.port),
        udp_len,
        check,
    )
    .unwrap_or(XDP_DROP);
    // SAFETY: map value valid for this run; counters only change by atomic adds.
    unsafe {
        add(&raw mut (*peer).up_bytes, payload as u64);
        add(&raw mut (*peer).up_packets, 1);
    }
    count(XdpCounter::OffloadUp);
    count_udp(Direction::Up, payload as u64);
    Ok(action)
}

/// The rewrite stage of target -> client (IPv6): put the 22-byte SOCKS header naming the
/// target in front of the payload and send it from the relay socket's address to the client.
/// Written like [`up_v6`].
#[inline(never)]
fn down_v6(ctx: &XdpContext) -> u32 {
    match try_down_v6(ctx) {
        Ok(a) | Err(a) => a,
    }
}

#[inline(always)]
fn try_down_v6(ctx: &XdpContext) -> Result<u32, u32> {
    let p = PENDING.get_ptr(0).ok_or(XDP_PASS)?;
    // SAFETY: as in `try_up_v6`.
    let (key, client, cport, payload) = unsafe {
        (
            &(*p).key,
            &(*p).client_addr,
            (*p).client_port,
            (*p).payload as usize,
        )
    };
    let peer = PEERS.get_ptr_mut(key).ok_or(XDP_PASS)?;
    let udp_len = UDP_LEN + SOCKS_V6 + payload;
    if IP6_LEN + udp_len > 0xffff {
        count(XdpCounter::PassTooBig);
        return Ok(XDP_PASS);
    }
    let ip = ptr_at::<[u8; 4]>(ctx, V6_IP)?;
    let udp = ptr_at::<[u8; UDP_LEN]>(ctx, V6_UDP)?;
    // SAFETY: bounds-checked above; references into the packet, valid until the head moves.
    let (first, udp) = unsafe { (*ip, &*udp) };
    let old = u16::from_ne_bytes([udp[6], udp[7]]);
    if old == 0 {
        count(XdpCounter::PassUnparsed);
        return Ok(XDP_PASS);
    }
    const HEAD: [u8; 4] = [0, 0, 0, ATYP_IPV6];
    let check = csum::relayed(
        old,
        client,
        cport,
        HEAD,
        (UDP_LEN + payload) as u16,
        udp_len as u16,
        false,
    );
    let hop = match fib::<16>(
        ctx,
        &key.relay.addr,
        client,
        key.relay.port,
        cport,
        (IP6_LEN + udp_len) as u16,
    ) {
        Ok(h) => h,
        Err(c) => {
            count(c);
            return Ok(XDP_PASS);
        }
    };
    // SAFETY: the context is the program's own; a negative delta grows the head.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(SOCKS_V6 as i32)) } != 0 {
        count(XdpCounter::PassUnparsed);
        return Ok(XDP_PASS);
    }
    let Ok(h) = ptr_at::<[u8; SOCKS_V6]>(ctx, V6_PAYLOAD) else {
        return Ok(XDP_DROP);
    };
    let h = h as *mut u8;
    // SAFETY: bounds-checked above: 22 bytes.
    unsafe {
        write_unaligned(h.cast::<[u8; 4]>(), HEAD);
        write_unaligned(h.add(4).cast::<[u8; 16]>(), key.addr);
        write_unaligned(h.add(20).cast::<u16>(), key.port);
    }
    let action = emit_v6(
        ctx,
        first,
        hop,
        (&key.relay.addr, key.relay.port),
        (client, cport),
        udp_len,
        check,
    )
    .unwrap_or(XDP_DROP);
    // SAFETY: map value valid for this run; counters only change by atomic adds.
    unsafe {
        add(&raw mut (*peer).down_bytes, payload as u64);
        add(&raw mut (*peer).down_packets, 1);
    }
    count(XdpCounter::OffloadDown);
    count_udp(Direction::Down, payload as u64);
    Ok(action)
}

/// Writes the Ethernet, IPv6 and UDP headers of the rewritten datagram into the packet (after
/// the head moved), field by field, and transmits it. `first`: the IPv6 header's first four
/// bytes as received (version, traffic class, flow label); addresses and ports in network
/// order.
#[inline(always)]
fn emit_v6(
    ctx: &XdpContext,
    first: [u8; 4],
    hop: (u32, [u8; 6], [u8; 6]),
    (src, sport): (&[u8; 16], u16),
    (dst, dport): (&[u8; 16], u16),
    udp_len: usize,
    check: u16,
) -> Result<u32, u32> {
    let (ifindex, smac, dmac) = hop;
    let h = ptr_at::<[u8; V6_PAYLOAD]>(ctx, 0)? as *mut u8;
    let len = (udp_len as u16).to_be_bytes();
    // SAFETY: bounds-checked above: the 62 bytes of the three headers.
    unsafe {
        write_unaligned(h.cast::<[u8; 6]>(), dmac);
        write_unaligned(h.add(6).cast::<[u8; 6]>(), smac);
        write_unaligned(h.add(12).cast::<[u8; 2]>(), ETH_P_IPV6);
        let ip = h.add(V6_IP);
        write_unaligned(ip.cast::<[u8; 4]>(), first);
        write_unaligned(ip.add(4).cast::<[u8; 2]>(), len);
        *ip.add(6) = IPPROTO_UDP;
        *ip.add(7) = TTL;
        write_unaligned(ip.add(8).cast::<[u8; 16]>(), *src);
        write_unaligned(ip.add(24).cast::<[u8; 16]>(), *dst);
        let udp = h.add(V6_UDP);
        write_unaligned(udp.cast::<u16>(), sport);
        write_unaligned(udp.add(2).cast::<u16>(), dport);
        write_unaligned(udp.add(4).cast::<[u8; 2]>(), len);
        write_unaligned(udp.add(6).cast::<u16>(), check);
    }
    count_frame(
        Proto::Udp,
        IfaceDir::Tx,
        (V6_PAYLOAD - UDP_LEN + udp_len) as u64,
    );
    if ifindex as usize == ctx.ingress_ifindex() {
        Ok(XDP_TX)
    } else {
        // SAFETY: plain helper call.
        Ok(unsafe { bpf_redirect(ifindex, 0) } as u32)
    }
}
