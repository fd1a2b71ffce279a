//! The UDP fast path's userspace half: attaching `ebsocks_xdp` to the configured interfaces and
//! keeping its maps in step with the relay's associations.
//!
//! Each association registers its relay socket ([`AssocXdp::register`]); the relay then tells it
//! what it decided: the client's port once learned, each new target (offloaded when it was
//! named by a literal address and `udp.offload` is on), each destination the rules refused.
//! The XDP program drops early what the relay would drop and forwards offloaded flows itself;
//! the relay socket stays open for the whole association, so the kernel never answers an
//! offloaded flow with ICMP port unreachable, and still gets every datagram XDP passes.
//!
//! The map entries go when the association ends ([`AssocXdp`]'s `Drop`), after their counters
//! were added to the association's figures ([`AssocXdp::totals`]).

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Mutex,
};

use aya::{
    maps::{HashMap, MapData},
    programs::{Xdp, XdpMode as AyaXdpMode},
    Ebpf,
};
use proxy_common::{
    metrics::Traffic,
    xdp::{
        iface_slot, IfaceDir, Peer, PeerKey, Proto, Relay, RelayKey, XdpCounter, COUNTERS, DENY,
        IFACE_TRAFFIC, PEERS, PEER_OFFLOAD, RELAYS, RELAY_PEERS_COMPLETE, XDP_PROG,
    },
};

use crate::config::{UdpConfig, XdpMode};

/// Destinations remembered as refused per association (the map is an LRU shared by all).
const MAX_DENIED: usize = 1024;

/// Why the fast path could not be set up. The relay works without it.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {}", crate::with_causes(source.as_ref()))]
pub struct XdpError {
    /// The step that failed.
    pub context: String,
    /// The cause.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The error of attaching to `iface`: says so when another XDP program holds the interface
/// (`EEXIST`), which is what a second daemon on the same `xdp_interfaces` meets.
fn attach_err(iface: &str, how: &str) -> impl FnOnce(aya::programs::ProgramError) -> XdpError {
    let iface = iface.to_owned();
    let how = how.to_owned();
    move |e| {
        let context =
            if crate::io_cause(&e).and_then(std::io::Error::raw_os_error) == Some(libc::EEXIST) {
                format!(
                "attaching XDP to {iface}{how}: the interface already has an XDP program (another \
                 daemon's? `ip link show {iface}` names it)"
            )
            } else {
                format!("attaching XDP to {iface}{how}")
            };
        XdpError {
            context,
            source: Box::new(e),
        }
    }
}

fn err<E: std::error::Error + Send + Sync + 'static>(
    context: impl Into<String>,
) -> impl FnOnce(E) -> XdpError {
    let context = context.into();
    move |e| XdpError {
        context,
        source: Box::new(e),
    }
}

/// The XDP maps the daemon writes, and where the program is attached. The program itself (and
/// its links, which detach it) live in the daemon's [`Ebpf`].
pub struct XdpPlane {
    relays: Mutex<HashMap<MapData, RelayKey, Relay>>,
    peers: Mutex<HashMap<MapData, PeerKey, Peer>>,
    deny: Mutex<HashMap<MapData, PeerKey, u32>>,
    /// `(interface, "native" | "generic")`.
    pub attached: Vec<(String, &'static str)>,
}

impl std::fmt::Debug for XdpPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpPlane")
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

/// Loads `ebsocks_xdp` and attaches it to every interface in `cfg.xdp_interfaces` (native mode
/// first in `auto`). Any failure is an error: a daemon told to use XDP on an interface does not
/// start half-attached.
pub fn start(ebpf: &mut Ebpf, cfg: &UdpConfig) -> Result<XdpPlane, XdpError> {
    let take = |ebpf: &mut Ebpf, name: &'static str| {
        ebpf.take_map(name).ok_or_else(|| XdpError {
            context: "finding a map in the eBPF object".into(),
            source: format!("map {name} missing").into(),
        })
    };
    let relays = HashMap::try_from(take(ebpf, RELAYS)?).map_err(err("opening the relay map"))?;
    let peers = HashMap::try_from(take(ebpf, PEERS)?).map_err(err("opening the peer map"))?;
    let deny = HashMap::try_from(take(ebpf, DENY)?).map_err(err("opening the deny map"))?;
    let prog: &mut Xdp = ebpf
        .program_mut(XDP_PROG)
        .ok_or_else(|| XdpError {
            context: "finding the XDP program".into(),
            source: "missing".into(),
        })?
        .try_into()
        .map_err(err("typing the XDP program"))?;
    prog.load().map_err(err("loading the XDP program"))?;
    let mut attached = Vec::new();
    for iface in &cfg.xdp_interfaces {
        let mode = match cfg.xdp_mode {
            XdpMode::Native => {
                prog.attach(iface, AyaXdpMode::Driver)
                    .map_err(attach_err(iface, " in native mode"))?;
                "native"
            }
            XdpMode::Generic => {
                prog.attach(iface, AyaXdpMode::Skb)
                    .map_err(attach_err(iface, " in generic mode"))?;
                "generic"
            }
            XdpMode::Auto => match prog.attach(iface, AyaXdpMode::Driver) {
                Ok(_) => "native",
                Err(e) => {
                    tracing::debug!(interface = %iface, cause = %e, "no native XDP; trying generic mode");
                    prog.attach(iface, AyaXdpMode::Skb)
                        .map_err(attach_err(iface, ""))?;
                    "generic"
                }
            },
        };
        tracing::info!(interface = %iface, mode, "XDP UDP fast path attached");
        attached.push((iface.clone(), mode));
    }
    Ok(XdpPlane {
        relays: Mutex::new(relays),
        peers: Mutex::new(peers),
        deny: Mutex::new(deny),
        attached,
    })
}

/// [`start`] when `udp.xdp_interfaces` names any interface: None when it names none. Fails
/// when it names some but the eBPF object is not loaded or an attachment fails.
pub fn start_configured(
    ebpf: Option<&mut Ebpf>,
    cfg: &UdpConfig,
) -> std::io::Result<Option<XdpPlane>> {
    if cfg.xdp_interfaces.is_empty() {
        return Ok(None);
    }
    let Some(ebpf) = ebpf else {
        return Err(std::io::Error::other(
            "udp.xdp_interfaces is set but the eBPF programs are not loaded",
        ));
    };
    start(ebpf, cfg).map(Some).map_err(std::io::Error::other)
}

/// 16 bytes, IPv4 written IPv4-mapped, as the XDP program keys addresses.
fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The map key of a relay socket.
pub fn relay_key(relay: SocketAddr) -> RelayKey {
    RelayKey {
        addr: mapped(relay.ip()),
        port: relay.port().to_be(),
        _pad: [0; 2],
    }
}

fn peer_key(relay: RelayKey, peer: SocketAddr) -> PeerKey {
    PeerKey {
        relay,
        addr: mapped(peer.ip()),
        port: peer.port().to_be(),
        _pad: [0; 2],
    }
}

/// What XDP moved for an association.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpTotals {
    /// Payload bytes client -> targets.
    pub up_bytes: u64,
    /// Datagrams client -> targets.
    pub up_datagrams: u64,
    /// Payload bytes targets -> client.
    pub down_bytes: u64,
    /// Datagrams targets -> client.
    pub down_datagrams: u64,
}

impl XdpTotals {
    fn add(&mut self, p: &Peer) {
        let Peer {
            flags: _,
            _pad: _,
            up_bytes,
            up_packets,
            down_bytes,
            down_packets,
        } = *p;
        self.up_bytes += up_bytes;
        self.up_datagrams += up_packets;
        self.down_bytes += down_bytes;
        self.down_datagrams += down_packets;
    }
}

/// One association's entries in the XDP maps; removes them on drop.
pub struct AssocXdp<'a> {
    plane: &'a XdpPlane,
    key: RelayKey,
    entry: Relay,
    offload: bool,
    /// Targets in the peer map, and whether each is offloaded.
    peers: StdHashMap<SocketAddr, bool>,
    denied: HashSet<SocketAddr>,
    /// Counters of peers already taken out of the map.
    gone: XdpTotals,
}

impl std::fmt::Debug for AssocXdp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssocXdp")
            .field("key", &self.key)
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

impl<'a> AssocXdp<'a> {
    /// Registers the relay socket at `relay` for a client at `client_ip` (port when known).
    /// None if the entry cannot be added (map full): the association then runs without XDP.
    pub fn register(
        plane: &'a XdpPlane,
        relay: SocketAddr,
        client_ip: IpAddr,
        client_port: Option<u16>,
        offload: bool,
    ) -> Option<Self> {
        let key = relay_key(relay);
        let entry = Relay {
            client_addr: mapped(client_ip),
            client_port: client_port.unwrap_or(0).to_be(),
            flags: RELAY_PEERS_COMPLETE,
        };
        if let Err(e) = plane
            .relays
            .lock()
            .expect("xdp relays lock")
            .insert(key, entry, 0)
        {
            tracing::warn!(relay = %relay, cause = %e, "association not registered with XDP");
            return None;
        }
        Some(Self {
            plane,
            key,
            entry,
            offload,
            peers: StdHashMap::new(),
            denied: HashSet::new(),
            gone: XdpTotals::default(),
        })
    }

    fn store_entry(&self) {
        let _ = self
            .plane
            .relays
            .lock()
            .expect("xdp relays lock")
            .insert(self.key, self.entry, 0);
    }

    /// The client's port as the relay knows it now; the entry is rewritten when it changed.
    pub fn client_port(&mut self, port: Option<u16>) {
        let p = port.unwrap_or(0).to_be();
        if p != self.entry.client_port {
            self.entry.client_port = p;
            self.store_entry();
        }
    }

    /// The rules refused `dst` (a literal destination): XDP drops the next datagrams to it.
    pub fn deny(&mut self, dst: SocketAddr) {
        if self.denied.len() >= MAX_DENIED || !self.denied.insert(dst) {
            return;
        }
        let _ =
            self.plane
                .deny
                .lock()
                .expect("xdp deny lock")
                .insert(peer_key(self.key, dst), 1, 0);
    }

    /// The relay added `target` to the association's targets (`literal`: the client named it
    /// by address) and forgot `evicted`. Offloads the flow when allowed.
    pub fn target(&mut self, target: SocketAddr, literal: bool, evicted: Option<SocketAddr>) {
        if let Some(old) = evicted {
            self.remove_peer(old);
        }
        let offload = self.offload && literal;
        match self.peers.get(&target) {
            Some(&o) if o || !offload => return,
            _ => {}
        }
        let value = Peer {
            flags: if offload { PEER_OFFLOAD } else { 0 },
            ..Peer::default()
        };
        let res = self.plane.peers.lock().expect("xdp peers lock").insert(
            peer_key(self.key, target),
            value,
            0,
        );
        match res {
            Ok(()) => {
                self.peers.insert(target, offload);
            }
            Err(e) => {
                // Without the entry XDP would take the target's replies for foreign ones.
                tracing::debug!(target = %target, cause = %e, "peer not added to XDP; its flow stays in userspace");
                if self.entry.flags & RELAY_PEERS_COMPLETE != 0 {
                    self.entry.flags &= !RELAY_PEERS_COMPLETE;
                    self.store_entry();
                }
            }
        }
    }

    fn remove_peer(&mut self, peer: SocketAddr) {
        if self.peers.remove(&peer).is_none() {
            return;
        }
        let key = peer_key(self.key, peer);
        let mut map = self.plane.peers.lock().expect("xdp peers lock");
        if let Ok(p) = map.get(&key, 0) {
            self.gone.add(&p);
        }
        let _ = map.remove(&key);
    }

    /// What XDP moved for this association so far.
    pub fn totals(&self) -> XdpTotals {
        let mut t = self.gone;
        let map = self.plane.peers.lock().expect("xdp peers lock");
        for (peer, &offloaded) in &self.peers {
            if offloaded {
                if let Ok(p) = map.get(&peer_key(self.key, *peer), 0) {
                    t.add(&p);
                }
            }
        }
        t
    }

    /// Datagrams XDP moved so far, to tell an association busy on the fast path from an idle
    /// one.
    pub fn activity(&self) -> u64 {
        let t = self.totals();
        t.up_datagrams + t.down_datagrams
    }
}

impl Drop for AssocXdp<'_> {
    fn drop(&mut self) {
        // The relay entry first, so that the program stops matching the association at once.
        let _ = self
            .plane
            .relays
            .lock()
            .expect("xdp relays lock")
            .remove(&self.key);
        {
            let mut map = self.plane.peers.lock().expect("xdp peers lock");
            for peer in self.peers.keys() {
                let _ = map.remove(&peer_key(self.key, *peer));
            }
        }
        let mut deny = self.plane.deny.lock().expect("xdp deny lock");
        for d in &self.denied {
            let _ = deny.remove(&peer_key(self.key, *d));
        }
    }
}

/// One row of frames seen on the XDP interfaces.
#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq)]
pub struct IfaceRow {
    /// `tcp`, `udp`, `icmp` or `other`.
    pub proto: &'static str,
    /// `rx` (received) or `tx` (sent by the XDP program itself).
    pub dir: &'static str,
    /// Frame bytes (Ethernet header included).
    pub bytes: u64,
    /// Frames.
    pub packets: u64,
}

/// The fast path's counters, read from the pinned per-CPU maps.
#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq)]
pub struct XdpSnapshot {
    /// Frames on the XDP interfaces, by protocol and direction.
    pub interfaces: Vec<IfaceRow>,
    /// What the program did with datagrams addressed to relay sockets, by [`XdpCounter`] name.
    pub counters: std::collections::BTreeMap<&'static str, u64>,
}

impl XdpSnapshot {
    /// Reads the maps pinned under `dir`; None when they are not there (no XDP configured).
    pub fn read(dir: &std::path::Path) -> Option<Self> {
        use aya::maps::{Map, PerCpuArray};
        let open = |name: &str| MapData::from_pin(dir.join(name)).ok();
        let traffic: PerCpuArray<_, Traffic> =
            PerCpuArray::try_from(Map::PerCpuArray(open(IFACE_TRAFFIC)?)).ok()?;
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(open(COUNTERS)?)).ok()?;
        let mut interfaces = Vec::new();
        for proto in Proto::ALL {
            for dir in IfaceDir::ALL {
                let mut row = IfaceRow {
                    proto: proto.name(),
                    dir: dir.name(),
                    bytes: 0,
                    packets: 0,
                };
                if let Ok(v) = traffic.get(&iface_slot(proto, dir), 0) {
                    for t in v.iter() {
                        row.bytes += t.bytes;
                        row.packets += t.packets;
                    }
                }
                interfaces.push(row);
            }
        }
        let counters = XdpCounter::ALL
            .iter()
            .map(|&c| {
                let n = counters
                    .get(&(c as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (c.name(), n)
            })
            .collect();
        Some(Self {
            interfaces,
            counters,
        })
    }

    /// A counter's value.
    pub fn counter(&self, c: XdpCounter) -> u64 {
        self.counters.get(c.name()).copied().unwrap_or(0)
    }

    /// The `ebsocks stats` section.
    pub fn write_table(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "\nXDP INTERFACES {:<5} {:>16} {:>12}",
            "DIR", "BYTES", "PACKETS"
        );
        for r in &self.interfaces {
            let _ = writeln!(
                out,
                "  {:<12} {:<5} {:>16} {:>12}",
                r.proto, r.dir, r.bytes, r.packets
            );
        }
        let _ = writeln!(out, "\nXDP (datagrams to relay sockets)");
        for (k, v) in &self.counters {
            let _ = writeln!(out, "  {k:<30} {v:>12}");
        }
    }

    /// The Prometheus families: `xdp_bytes`, `xdp_frames`, `xdp_dropped`, `xdp_passed`,
    /// `xdp_offloaded`.
    pub fn encode(
        &self,
        enc: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use prometheus_client::{
            encoding::EncodeMetric,
            metrics::{counter::ConstCounter, MetricType},
            registry::Unit,
        };
        type Labels = Vec<(&'static str, &'static str)>;
        let family = |enc: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
                      name: &str,
                      help: &str,
                      unit: Option<&Unit>,
                      rows: Vec<(Labels, u64)>|
         -> std::fmt::Result {
            if rows.is_empty() {
                return Ok(());
            }
            let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
            for (labels, v) in rows {
                ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
            }
            Ok(())
        };
        let ifaces = |bytes: bool| -> Vec<(Labels, u64)> {
            self.interfaces
                .iter()
                .map(|r| {
                    (
                        vec![("proto", r.proto), ("direction", r.dir)],
                        if bytes { r.bytes } else { r.packets },
                    )
                })
                .collect()
        };
        family(
            enc,
            "xdp",
            "Frame bytes on the XDP interfaces, by protocol and direction (rx: received; tx: sent by the XDP program).",
            Some(&Unit::Bytes),
            ifaces(true),
        )?;
        family(
            enc,
            "xdp_frames",
            "Frames on the XDP interfaces, by protocol and direction.",
            None,
            ifaces(false),
        )?;
        for (prefix, name, label, help) in [
            (
                "xdp_dropped_",
                "xdp_dropped",
                "reason",
                "Datagrams to relay sockets dropped by XDP, by reason.",
            ),
            (
                "xdp_passed_",
                "xdp_passed",
                "reason",
                "Datagrams to relay sockets XDP passed to the relay, by reason.",
            ),
            (
                "xdp_offloaded_",
                "xdp_offloaded",
                "direction",
                "Datagrams forwarded by XDP without reaching the relay socket, by direction.",
            ),
        ] {
            let rows = self
                .counters
                .iter()
                .filter_map(|(k, v)| Some((vec![(label, k.strip_prefix(prefix)?)], *v)))
                .collect();
            family(enc, name, help, None, rows)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_use_mapped_addresses_and_network_order() {
        let k = relay_key("10.1.0.1:4660".parse().unwrap());
        assert_eq!(&k.addr[10..], &[0xff, 0xff, 10, 1, 0, 1]);
        assert_eq!(k.port.to_ne_bytes(), [0x12, 0x34]);
        let same = relay_key("[::ffff:10.1.0.1]:4660".parse().unwrap());
        assert_eq!(k, same);
        let p = peer_key(k, "[2001:db8::1]:53".parse().unwrap());
        assert_eq!(p.addr[0..2], [0x20, 0x01]);
        assert_eq!(p.port.to_ne_bytes(), [0, 53]);
    }
}
