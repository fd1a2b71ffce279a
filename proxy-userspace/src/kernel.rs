//! The eBPF side of the daemon: loading the embedded object, pinning the counters, attaching the
//! verdict program and putting socket pairs into the sockhashes. This is the only module that
//! touches BPF maps at run time.

use std::{
    io::{self, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::{
        fd::{AsFd, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues, RingBuf, SockHash},
    programs::SkSkb,
    Ebpf, EbpfLoader,
};
use proxy_common::{
    metrics::{
        Direction, SessionTraffic, Traffic, COUNTERS_MAX, DAEMON_COUNTERS, DAEMON_TRAFFIC,
        KERNEL_TRAFFIC, SESSIONS, TRAFFIC_SLOTS_MAX,
    },
    sockmap::{
        BrakeControl, LayoutSlot, ACTIVE, BRAKES, BRAKE_EVENTS, LAYOUT, PAIRS, VERDICT_PROG,
    },
};

use crate::{
    metrics::{Cells, Metrics},
    relay::park::Parking,
    sys,
};

/// The eBPF object built from `proxy-ebpf` (empty when built with `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// Why the kernel side could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The binary was built without the eBPF programs.
    #[error("this binary was built without eBPF programs (AYA_BUILD_SKIP)")]
    NoObject,
    /// Loading the object or a program failed (old kernel, no BTF, missing privileges).
    #[error("{context}: {}", crate::with_causes(source.as_ref()))]
    Ebpf {
        /// The step that failed.
        context: &'static str,
        /// The aya error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The functional probe of the sockhash splice failed.
    #[error("sockhash splice probe failed: {0}")]
    Probe(String),
}

fn ebpf_err<E: std::error::Error + Send + Sync + 'static>(
    context: &'static str,
) -> impl FnOnce(E) -> KernelError {
    move |e| KernelError::Ebpf {
        context,
        source: Box::new(e),
    }
}

/// Loaded programs and maps. Dropping it detaches the programs and removes the pins.
pub struct Kernel {
    // Field order matters for drop: maps and programs go before the pin directory is removed.
    _ebpf: Ebpf,
    ktraffic: Mutex<PerCpuArray<MapData, Traffic>>,
    metrics: Mutex<Option<Metrics>>,
    sockmap: Sockmap,
    pins: Option<PinDir>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

/// The sockhashes and the per-socket counter map.
pub struct Sockmap {
    pairs: Mutex<SockHash<MapData, u64>>,
    active: Mutex<SockHash<MapData, u64>>,
    sessions: Mutex<HashMap<MapData, u64, SessionTraffic>>,
    brakes: Mutex<HashMap<MapData, u64, BrakeControl>>,
    brake_events: Mutex<Option<RingBuf<MapData>>>,
    dispatcher: std::sync::OnceLock<Option<std::sync::Arc<BrakeDispatcher>>>,
}

/// Delivers brake events from the ring buffer to the sessions waiting for them: a task by the
/// socket's cookie, else a parked session by the event's session id (parked sessions have no
/// entry here).
struct BrakeDispatcher {
    waiters: Mutex<std::collections::HashMap<u64, std::sync::Arc<tokio::sync::Notify>>>,
    parking: std::sync::OnceLock<std::sync::Arc<Parking>>,
}

/// A socket's subscription to its brake events; unsubscribes on drop.
pub struct BrakeWatch {
    dispatcher: std::sync::Arc<BrakeDispatcher>,
    cookie: u64,
    /// Set while a task waits; None while the session is parked.
    notify: Option<std::sync::Arc<tokio::sync::Notify>>,
}

impl BrakeWatch {
    /// Resolves when the verdict reported that the socket reached its checkpoint (spurious
    /// returns are possible). Never resolves before [`Self::activate`] on a watch made for a
    /// parked session.
    pub async fn fired(&self) {
        match &self.notify {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Hands the socket's brake events to a task from now on (its session was parked), with one
    /// event pending: one may have gone to the parked session in the meantime.
    pub fn activate(&mut self) {
        let notify = self.notify.get_or_insert_with(|| {
            let notify = std::sync::Arc::new(tokio::sync::Notify::new());
            self.dispatcher
                .waiters
                .lock()
                .expect("brake waiters lock")
                .insert(self.cookie, notify.clone());
            notify
        });
        notify.notify_one();
    }
}

impl Drop for BrakeWatch {
    fn drop(&mut self) {
        // Only a task's subscription has an entry.
        if self.notify.is_some() {
            self.dispatcher
                .waiters
                .lock()
                .expect("brake waiters lock")
                .remove(&self.cookie);
        }
    }
}

impl std::fmt::Debug for BrakeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrakeWatch")
            .field("cookie", &self.cookie)
            .finish()
    }
}

fn start_dispatcher(ring: RingBuf<MapData>) -> io::Result<std::sync::Arc<BrakeDispatcher>> {
    use tokio::io::{unix::AsyncFd, Interest};
    // SAFETY: the ring buffer's descriptor belongs to `ring`, which moves into the AsyncFd and
    // stays open, unchanged, for the AsyncFd's whole life.
    let mut afd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let d = std::sync::Arc::new(BrakeDispatcher {
        waiters: Mutex::new(std::collections::HashMap::new()),
        parking: std::sync::OnceLock::new(),
    });
    let weak = std::sync::Arc::downgrade(&d);
    tokio::spawn(async move {
        let drain = |ring: &mut RingBuf<MapData>,
                     weak: &std::sync::Weak<BrakeDispatcher>|
         -> Option<bool> {
            let d = weak.upgrade()?;
            let waiters = d.waiters.lock().expect("brake waiters lock");
            let mut any = false;
            while let Some(item) = ring.next() {
                any = true;
                let field = |at: usize| {
                    item.get(at..at + 8)
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        .map(u64::from_ne_bytes)
                };
                // A `BrakeEvent`: cookie, then session id.
                let (Some(cookie), session) = (field(0), field(8)) else {
                    continue;
                };
                if let Some(n) = waiters.get(&cookie) {
                    n.notify_one();
                } else if let (Some(id), Some(p)) = (session.filter(|&id| id != 0), d.parking.get())
                {
                    p.wake(id);
                }
            }
            Some(any)
        };
        loop {
            let Ok(mut guard) = afd.readable_mut().await else {
                return;
            };
            loop {
                if drain(guard.get_inner_mut(), &weak).is_none() {
                    return;
                }
                guard.clear_ready();
                // Events that landed between the drain and clearing readiness.
                match drain(guard.get_inner_mut(), &weak) {
                    Some(true) => continue,
                    Some(false) => break,
                    None => return,
                }
            }
        }
    });
    Ok(d)
}

/// Redirected bytes between two brake checks of one socket.
pub const BRAKE_STEP: u64 = 4 << 20;

/// A pinned-map directory, locked while the daemon lives and removed on drop.
#[derive(Debug)]
struct PinDir {
    path: PathBuf,
    // Dropped after the directory is removed, so no other daemon takes it over meanwhile.
    _lock: std::fs::File,
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let removed = remove_pins(&self.path).and_then(|_| std::fs::remove_dir(&self.path));
        if let Err(e) = removed {
            tracing::warn!(dir = %self.path.display(), cause = %e, "cannot remove pinned maps");
        }
    }
}

/// Removes every pin in `dir`; returns how many there were.
fn remove_pins(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        std::fs::remove_file(e?.path())?;
        n += 1;
    }
    Ok(n)
}

/// Creates `dir` when missing and locks it (`flock`) for as long as the returned file is open.
///
/// A directory that another running daemon holds is an error (`AddrInUse`): its pins are that
/// daemon's, not stale ones to remove. A daemon that dies, however it dies, releases the lock
/// with its descriptors, so what it left behind can be taken over.
fn lock_pin_dir(dir: &Path) -> io::Result<std::fs::File> {
    // The holder removes the directory before its lock goes: a lock taken on a directory that
    // is no longer at `dir` is worthless, and the next round creates a new one.
    for _ in 0..3 {
        match std::fs::create_dir(dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let f = match std::fs::File::open(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            r => r?,
        };
        if !sys::try_lock_exclusive(f.as_fd())? {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use by another running daemon (set pin_dir)",
                    dir.display()
                ),
            ));
        }
        let held = f.metadata()?;
        match std::fs::metadata(dir) {
            Ok(m) if m.dev() == held.dev() && m.ino() == held.ino() => return Ok(f),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "{} was removed and created again while being locked",
        dir.display()
    )))
}

/// True when `dir`'s parent directory is on a bpffs mount.
fn on_bpffs(dir: &Path) -> bool {
    let Some(parent) = dir.parent() else {
        return false;
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let parent = parent.canonicalize().unwrap_or_else(|_| parent.to_owned());
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, mnt, fstype) = (f.next(), f.next(), f.next());
        fstype == Some("bpf") && mnt.is_some_and(|m| parent.starts_with(m))
    })
}

/// Where the kernel's BTF is.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Gives the verdict the offsets it reads `tcp_sock.copied_seq` with (see
/// [`LayoutSlot::TcpCopiedSeq`]). Without BTF they stay unknown and the verdict starts each
/// socket's sequence tracking at its first skb instead.
fn write_layout(layout: &mut Array<MapData, u32>) {
    let offsets = std::fs::read(VMLINUX_BTF).ok().and_then(|blob| {
        let btf = crate::btf::Btf::parse(&blob)?;
        Some((
            btf.member_offset("sk_buff", "sk")?,
            btf.member_offset("tcp_sock", "copied_seq")?,
        ))
    });
    let Some((sk, copied_seq)) = offsets else {
        tracing::warn!(btf = VMLINUX_BTF, "cannot read tcp_sock.copied_seq's place from the kernel's BTF; a retransmission arriving first after a handover is not cut");
        return;
    };
    for (slot, offset) in [
        (LayoutSlot::SkbSk, sk),
        (LayoutSlot::TcpCopiedSeq, copied_seq),
    ] {
        if let Err(e) = layout.set(slot as u32, offset, 0) {
            tracing::warn!(cause = %e, "cannot write the layout map; a retransmission arriving first after a handover is not cut");
            return;
        }
    }
    tracing::debug!(
        sk_buff_sk = sk,
        tcp_sock_copied_seq = copied_seq,
        "kernel layout"
    );
}

impl Kernel {
    /// Loads the programs and maps, attaches the verdict, pins the counters under `pin_dir`.
    ///
    /// Pinning problems only cost `ebsocks stats`; they are logged and not fatal.
    pub fn load(pin_dir: &Path) -> Result<Self, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(ebpf_err("loading the eBPF object"))?;

        let pins = match pin_maps(&ebpf, pin_dir) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(dir = %pin_dir.display(), cause = %e, "cannot pin the BPF maps; `ebsocks stats` will not see this daemon");
                None
            }
        };

        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or_else(|| KernelError::Ebpf {
                context: "finding a map in the eBPF object",
                source: format!("map {name} missing").into(),
            })
        };
        let pairs = SockHash::try_from(take(&mut ebpf, PAIRS)?)
            .map_err(ebpf_err("opening the pairs sockhash"))?;
        let active = SockHash::try_from(take(&mut ebpf, ACTIVE)?)
            .map_err(ebpf_err("opening the active sockhash"))?;
        let sessions = HashMap::try_from(take(&mut ebpf, SESSIONS)?)
            .map_err(ebpf_err("opening the sessions map"))?;
        let brakes = HashMap::try_from(take(&mut ebpf, BRAKES)?)
            .map_err(ebpf_err("opening the brakes map"))?;
        let brake_events = RingBuf::try_from(take(&mut ebpf, BRAKE_EVENTS)?)
            .map_err(ebpf_err("opening the brake ring buffer"))?;
        let ktraffic = PerCpuArray::try_from(take(&mut ebpf, KERNEL_TRAFFIC)?)
            .map_err(ebpf_err("opening the kernel traffic map"))?;
        let utraffic = take(&mut ebpf, DAEMON_TRAFFIC)?;
        let counters = take(&mut ebpf, DAEMON_COUNTERS)?;
        let metrics = map_metrics(&utraffic, &counters)
            .map_err(ebpf_err("mapping the counter arrays (needs Linux 5.5+)"))?;

        let mut layout = Array::<_, u32>::try_from(take(&mut ebpf, LAYOUT)?)
            .map_err(ebpf_err("opening the layout map"))?;
        write_layout(&mut layout);

        let prog: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROG)
            .ok_or_else(|| KernelError::Ebpf {
                context: "finding the verdict program",
                source: "missing".into(),
            })?
            .try_into()
            .map_err(ebpf_err("typing the verdict program"))?;
        prog.load().map_err(ebpf_err(
            "loading the sk_skb verdict program (needs Linux 5.13+)",
        ))?;
        prog.attach(active.fd())
            .map_err(ebpf_err("attaching the verdict program to the sockhash"))?;

        Ok(Self {
            _ebpf: ebpf,
            ktraffic: Mutex::new(ktraffic),
            metrics: Mutex::new(Some(metrics)),
            sockmap: Sockmap {
                pairs: Mutex::new(pairs),
                active: Mutex::new(active),
                sessions: Mutex::new(sessions),
                brakes: Mutex::new(brakes),
                brake_events: Mutex::new(Some(brake_events)),
                dispatcher: std::sync::OnceLock::new(),
            },
            pins,
        })
    }

    /// The loaded object, for the UDP fast path to load and attach its XDP program
    /// (`udp::xdp::start`).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self._ebpf
    }

    /// Whether the maps are pinned (the pin directory is the daemon's, removed on drop).
    pub fn is_pinned(&self) -> bool {
        self.pins.is_some()
    }

    /// The sockhash splice.
    pub fn sockmap(&self) -> &Sockmap {
        &self.sockmap
    }

    /// Splices a loopback pair and checks a byte crosses, to learn whether this kernel carries
    /// the sockhash path correctly (program accepted, cookies, verdict without parser, redirect).
    /// The probe's own bytes are then cleared from the kernel counters.
    pub fn probe(&self) -> Result<(), KernelError> {
        let res = probe(&self.sockmap).map_err(|e| KernelError::Probe(e.to_string()));
        self.reset_kernel_traffic();
        res
    }

    fn reset_kernel_traffic(&self) {
        let Ok(cpus) = aya::util::nr_cpus() else {
            return;
        };
        let Ok(mut map) = self.ktraffic.lock() else {
            return;
        };
        for i in 0..map.len() {
            if let Ok(zero) = PerCpuValues::try_from(vec![Traffic::default(); cpus]) {
                let _ = map.set(i, zero, 0);
            }
        }
    }

    /// The daemon counters, living in the mapped BPF arrays (taken once).
    pub fn take_metrics(&self) -> Option<Metrics> {
        self.metrics.lock().ok()?.take()
    }
}

fn map_metrics(utraffic: &aya::maps::Map, counters: &aya::maps::Map) -> io::Result<Metrics> {
    let fd = |m: &aya::maps::Map| -> io::Result<std::os::fd::OwnedFd> {
        let aya::maps::Map::Array(data) = m else {
            return Err(io::Error::other("counter map is not an array"));
        };
        data.fd().as_fd().try_clone_to_owned()
    };
    let (t, c) = (fd(utraffic)?, fd(counters)?);
    Ok(Metrics::mapped(
        Cells::map(c.as_fd(), COUNTERS_MAX as usize)?,
        Cells::map(t.as_fd(), 2 * TRAFFIC_SLOTS_MAX as usize)?,
    ))
}

fn pin_maps(ebpf: &Ebpf, dir: &Path) -> io::Result<PinDir> {
    if !on_bpffs(dir) {
        return Err(io::Error::other(format!(
            "{} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)",
            dir.parent().unwrap_or(dir).display()
        )));
    }
    let guard = PinDir {
        path: dir.to_owned(),
        _lock: lock_pin_dir(dir)?,
    };
    if remove_pins(dir)? > 0 {
        tracing::warn!(dir = %dir.display(), "removed stale pinned maps left by a daemon that is gone");
    }
    for name in [
        KERNEL_TRAFFIC,
        DAEMON_TRAFFIC,
        DAEMON_COUNTERS,
        SESSIONS,
        proxy_common::xdp::IFACE_TRAFFIC,
        proxy_common::xdp::COUNTERS,
    ] {
        let map = ebpf
            .map(name)
            .ok_or_else(|| io::Error::other(format!("map {name} missing")))?;
        map.pin(dir.join(name)).map_err(io::Error::other)?;
    }
    Ok(guard)
}

/// A pair in the sockhashes. The kernel drops the sockets from the maps when they close;
/// [`Sockmap::finish`] removes the counter entries.
#[derive(Debug)]
pub struct SplicedPair {
    /// Cookie of the client socket.
    pub client_cookie: u64,
    /// Cookie of the upstream socket.
    pub upstream_cookie: u64,
    /// False when the upstream socket could not be activated (it received a FIN between the
    /// two activations): its bytes must then be copied to the client by the daemon.
    pub upstream_active: bool,
}

/// Why a pair could not be spliced; the session then uses another path.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct SpliceError {
    /// The step that failed.
    pub context: &'static str,
    /// The cause (`EOPNOTSUPP` for a socket that already received a FIN).
    #[source]
    pub source: io::Error,
}

fn map_io(context: &'static str) -> impl FnOnce(aya::maps::MapError) -> SpliceError {
    move |e| SpliceError {
        context,
        source: io::Error::other(e),
    }
}

impl Sockmap {
    /// Puts a connected pair into the sockhashes so that the kernel redirects each side's
    /// received bytes to the other side's egress.
    ///
    /// Call it after the daemon has written everything it owes each socket (the SOCKS reply to
    /// the client, pipelined bytes to the upstream) and has stopped reading from both.
    ///
    /// `forwarded` is payload the daemon already sent itself, `(to the upstream, to the
    /// client)`; it starts the sockets' counters so that the per-session figures cover every
    /// payload byte.
    pub fn splice(
        &self,
        session_id: u64,
        client: BorrowedFd<'_>,
        upstream: BorrowedFd<'_>,
        forwarded: (u64, u64),
    ) -> Result<SplicedPair, SpliceError> {
        let (forwarded_up, forwarded_down) = forwarded;
        let io_err = |context| move |source| SpliceError { context, source };
        let c = sys::socket_cookie(client).map_err(io_err("reading the client socket cookie"))?;
        let u =
            sys::socket_cookie(upstream).map_err(io_err("reading the upstream socket cookie"))?;

        {
            let mut s = self.sessions.lock().expect("sessions lock");
            let entry = |direction: Direction| SessionTraffic {
                session_id,
                direction: direction as u32,
                ..Default::default()
            };
            let up = SessionTraffic {
                bytes: forwarded_up,
                ..entry(Direction::Up)
            };
            s.insert(c, up, 0)
                .map_err(map_io("adding the client counters"))?;
            let down = SessionTraffic {
                bytes: forwarded_down,
                ..entry(Direction::Down)
            };
            if let Err(e) = s.insert(u, down, 0) {
                let _ = s.remove(&c);
                return Err(map_io("adding the upstream counters")(e));
            }
        }
        let undo_sessions = || {
            let mut s = self.sessions.lock().expect("sessions lock");
            let _ = s.remove(&c);
            let _ = s.remove(&u);
            drop(s);
            self.forget_brakes(c, u);
        };
        // Without its brake entry a socket is simply never braked.
        {
            let mut b = self.brakes.lock().expect("brakes lock");
            for (cookie, checkpoint) in [
                (c, forwarded_up + BRAKE_STEP),
                (u, forwarded_down + BRAKE_STEP),
            ] {
                let _ = b.insert(
                    cookie,
                    BrakeControl {
                        checkpoint,
                        ..Default::default()
                    },
                    0,
                );
            }
        }

        // 1. Redirect targets for both sides. No program runs on these sockets yet.
        {
            let mut pairs = self.pairs.lock().expect("pairs lock");
            if let Err(e) = pairs.insert(c, upstream, 0) {
                drop(pairs);
                undo_sessions();
                return Err(map_io("adding the upstream socket to the pairs sockhash")(
                    e,
                ));
            }
            if let Err(e) = pairs.insert(u, client, 0) {
                let _ = pairs.remove(&c);
                drop(pairs);
                undo_sessions();
                return Err(map_io("adding the client socket to the pairs sockhash")(e));
            }
        }
        let undo_pairs = || {
            let mut pairs = self.pairs.lock().expect("pairs lock");
            let _ = pairs.remove(&c);
            let _ = pairs.remove(&u);
        };

        // 2. Activate the client: its bytes (including any it queued before now) start flowing
        // to the upstream, which is already a valid target.
        if let Err(e) = self
            .active
            .lock()
            .expect("active lock")
            .insert(c, client, 0)
        {
            undo_pairs();
            undo_sessions();
            return Err(map_io("activating the client socket")(e));
        }
        // Bytes queued before the insert are only pushed through the verdict on the next
        // data_ready; setting SO_RCVLOWAT triggers one now.
        let _ = sys::set_rcvlowat(client, 1);

        // 3. Activate the upstream. If it has just received a FIN it cannot be inserted any more;
        // the client direction stays in the kernel and the caller copies the upstream's last bytes.
        let upstream_active = match self
            .active
            .lock()
            .expect("active lock")
            .insert(u, upstream, 0)
        {
            Ok(()) => {
                let _ = sys::set_rcvlowat(upstream, 1);
                true
            }
            Err(e) => {
                tracing::debug!(session = session_id, cause = %e, "upstream socket could not be activated; copying its bytes");
                false
            }
        };
        Ok(SplicedPair {
            client_cookie: c,
            upstream_cookie: u,
            upstream_active,
        })
    }

    /// Subscribes to the brake events of one socket of a parked session: they wake the session
    /// in `parking` (by the session id the event carries) until [`BrakeWatch::activate`] hands
    /// them to a task. The dispatcher task starts on first use (inside the runtime). None if the
    /// ring buffer could not be watched: the session then runs without a brake.
    pub fn brake_watch(
        &self,
        cookie: u64,
        parking: &std::sync::Arc<Parking>,
    ) -> Option<BrakeWatch> {
        let d = self
            .dispatcher
            .get_or_init(|| {
                let ring = self.brake_events.lock().ok()?.take()?;
                match start_dispatcher(ring) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        tracing::warn!(cause = %e, "cannot watch the brake ring buffer; spliced sessions run without backpressure");
                        None
                    }
                }
            })
            .clone()?;
        d.parking.get_or_init(|| parking.clone());
        Some(BrakeWatch {
            dispatcher: d,
            cookie,
            notify: None,
        })
    }

    /// Sets a socket's brake; see [`proxy_common::sockmap::BRAKES`].
    pub fn set_brake(&self, cookie: u64, control: BrakeControl) -> Result<(), SpliceError> {
        self.brakes
            .lock()
            .expect("brakes lock")
            .insert(cookie, control, 0)
            .map_err(map_io("setting a brake"))
    }

    fn forget_brakes(&self, c: u64, u: u64) {
        let mut b = self.brakes.lock().expect("brakes lock");
        let _ = b.remove(&c);
        let _ = b.remove(&u);
    }

    /// Current counters and brake state of one socket of a spliced pair (one map lookup).
    pub fn traffic(&self, cookie: u64) -> Option<SessionTraffic> {
        self.sessions
            .lock()
            .expect("sessions lock")
            .get(&cookie, 0)
            .ok()
    }

    /// Reads the final counters of a pair and removes every entry the pair has in the maps;
    /// its sockets leave the sockhashes when they are closed.
    pub fn finish(&self, pair: &SplicedPair) -> Finished {
        let cookies = [pair.client_cookie, pair.upstream_cookie];
        let [up, down] = {
            let mut s = self.sessions.lock().expect("sessions lock");
            cookies.map(|c| take(&mut s, c).unwrap_or_default())
        };
        let mut b = self.brakes.lock().expect("brakes lock");
        for c in cookies {
            let _ = b.remove(&c);
        }
        Finished {
            up,
            down,
            overlap: up.brake.overlap + down.brake.overlap,
        }
    }
}

/// The last figures of a spliced pair, from [`Sockmap::finish`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Finished {
    /// The client socket's counters (client to target).
    pub up: SessionTraffic,
    /// The upstream socket's counters (target to client).
    pub down: SessionTraffic,
    /// Bytes the verdict cut off retransmitted skbs of the pair (both sockets): they repeated
    /// bytes already forwarded.
    pub overlap: u64,
}

/// Removes `key` from a hash map and returns its last value: one `bpf(2)` call where the kernel
/// has `BPF_MAP_LOOKUP_AND_DELETE_ELEM` for hash maps (5.14), a lookup and a delete before.
fn take<V: aya::Pod>(map: &mut HashMap<MapData, u64, V>, key: u64) -> Option<V> {
    use aya::maps::IterableMap as _;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    /// Set once the kernel has refused the combined call.
    static TWO_CALLS: AtomicBool = AtomicBool::new(false);
    if !TWO_CALLS.load(Relaxed) {
        match sys::bpf_map_take::<u64, V>(map.map().fd().as_fd(), &key) {
            Ok(v) => return v,
            Err(e) => {
                tracing::debug!(cause = %e, "BPF_MAP_LOOKUP_AND_DELETE_ELEM refused; looking up and deleting apart");
                TWO_CALLS.store(true, Relaxed);
            }
        }
    }
    let v = map.get(&key, 0).ok();
    let _ = map.remove(&key);
    v
}

fn probe(sockmap: &Sockmap) -> io::Result<()> {
    const MSG: &[u8] = b"ebsocks sockhash probe";
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut client = TcpStream::connect(addr)?;
    let (proxy_client_side, _) = listener.accept()?;
    let mut target = TcpStream::connect(addr)?;
    let (proxy_target_side, _) = listener.accept()?;
    // Bytes sent before the splice must come through too (the SO_RCVLOWAT kick).
    client.write_all(&MSG[..4])?;
    std::thread::sleep(Duration::from_millis(5));
    let pair = sockmap
        .splice(
            0,
            proxy_client_side.as_fd(),
            proxy_target_side.as_fd(),
            (0, 0),
        )
        .map_err(io::Error::other)?;
    client.write_all(&MSG[4..])?;
    target.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut got = vec![0u8; MSG.len()];
    let res = target.read_exact(&mut got);
    sockmap.finish(&pair);
    res.map_err(|e| io::Error::new(e.kind(), format!("redirected bytes did not arrive: {e}")))?;
    if got != MSG {
        return Err(io::Error::other("redirected bytes arrived altered"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_errors_carry_the_system_error() {
        #[derive(Debug, thiserror::Error)]
        #[error("failed to create map `M`")]
        struct Create(#[source] io::Error);
        let e =
            ebpf_err("loading the eBPF object")(Create(io::Error::from_raw_os_error(libc::EPERM)));
        assert_eq!(
            e.to_string(),
            "loading the eBPF object: failed to create map `M`: Operation not permitted (os \
             error 1)"
        );
    }

    /// Needs root and bpffs: skipped otherwise, except under `CI=true`, where it must run (the
    /// privileged suite covers the rest of the data path).
    #[test]
    fn a_braked_socket_keeps_its_bytes_and_releases_them_in_order() {
        let dir = PathBuf::from(format!("/sys/fs/bpf/ebsocks-unit-{}", std::process::id()));
        let k = match Kernel::load(&dir) {
            Ok(k) => k,
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI=true, and the eBPF programs cannot be loaded: {e}")
            }
            Err(e) => {
                eprintln!("SKIP: cannot load the eBPF programs here: {e}");
                return;
            }
        };
        let sm = k.sockmap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut pa, _) = l.accept().unwrap();
        let mut b = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut pb, _) = l.accept().unwrap();
        let pair = sm.splice(1, pa.as_fd(), pb.as_fd(), (0, 0)).unwrap();
        let c = pair.client_cookie;
        b.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut got = [0u8; 12];
        a.write_all(b"one").unwrap();
        b.read_exact(&mut got[..3]).unwrap();
        assert_eq!(&got[..3], b"one");

        // Braked: the bytes stay with the source socket.
        sm.set_brake(
            c,
            BrakeControl {
                checkpoint: u64::MAX,
                read: 0,
                braked: 1,
                _pad: 0,
            },
        )
        .unwrap();
        a.write_all(b"two").unwrap();
        assert!(b.read(&mut got).is_err(), "bytes crossed while braked");
        assert_eq!(sm.traffic(c).unwrap().brake.passed, 3);

        // Released, but "two" is still queued: "three" must wait behind it.
        sm.set_brake(
            c,
            BrakeControl {
                checkpoint: u64::MAX,
                read: 0,
                braked: 0,
                _pad: 0,
            },
        )
        .unwrap();
        a.write_all(b"three").unwrap();
        assert!(b.read(&mut got).is_err(), "bytes overtook the queued ones");
        assert_eq!(sm.traffic(c).unwrap().brake.passed, 8);

        // The daemon moves the queued bytes itself; after that the kernel redirects again.
        pa.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut queued = [0u8; 8];
        pa.read_exact(&mut queued).unwrap();
        assert_eq!(&queued, b"twothree");
        pb.write_all(&queued).unwrap();
        sm.set_brake(
            c,
            BrakeControl {
                checkpoint: u64::MAX,
                read: 8,
                braked: 0,
                _pad: 0,
            },
        )
        .unwrap();
        a.write_all(b"four").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"twothreefour");
        assert_eq!(sm.traffic(c).unwrap().brake.passed, 8);
        assert_eq!(sm.traffic(c).unwrap().bytes, 15);

        // The last figures come back, and nothing of the pair is left in the maps.
        let last = sm.finish(&pair);
        assert_eq!(last.up.bytes, 15);
        assert_eq!(last.down.bytes, 0);
        assert_eq!(last.overlap, 0);
        for cookie in [c, pair.upstream_cookie] {
            assert!(sm.traffic(cookie).is_none(), "counters of {cookie} left");
            assert!(
                sm.brakes.lock().unwrap().get(&cookie, 0).is_err(),
                "brake control of {cookie} left"
            );
        }
    }
}
