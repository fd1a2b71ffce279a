//! What the kernel says about the daemon process: credentials, descriptors, CPU time, and the
//! BPF programs and maps it holds.

use std::time::Duration;

/// `/proc/<pid>/status` of the daemon (its main thread).
pub fn status(pid: u32) -> String {
    let path = format!("/proc/{pid}/status");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The value of `field` (e.g. `Uid:`) in a status text, whitespace-trimmed.
pub fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in status:\n{status}"))
        .trim()
}

/// A capability mask of a status text (`CapEff:` ...).
pub fn cap_mask(status: &str, field: &str) -> u64 {
    let v = status_field(status, field);
    u64::from_str_radix(v, 16).unwrap_or_else(|e| panic!("{field} {v:?}: {e}"))
}

/// The status text of every thread of `pid`.
pub fn thread_statuses(pid: u32) -> Vec<(String, String)> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {dir}: {e}")) {
        let tid = e
            .expect("task entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Ok(s) = std::fs::read_to_string(format!("{dir}/{tid}/status")) {
            out.push((tid, s));
        }
    }
    out
}

/// Open descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    let dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("list {dir}: {e}"))
        .count()
}

/// User plus system CPU time of `pid` so far.
pub fn cpu_time(pid: u32) -> Duration {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

/// BPF objects a process holds descriptors to, by id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BpfObjects {
    pub progs: Vec<u32>,
    pub maps: Vec<u32>,
}

/// Reads `prog_id:` and `map_id:` from `/proc/<pid>/fdinfo/*`.
pub fn bpf_objects(pid: u32) -> BpfObjects {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut out = BpfObjects::default();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {dir}: {e}")) {
        let Ok(text) = std::fs::read_to_string(e.expect("fdinfo entry").path()) else {
            continue;
        };
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("prog_id:") {
                out.progs.extend(v.trim().parse::<u32>().ok());
            } else if let Some(v) = line.strip_prefix("map_id:") {
                out.maps.extend(v.trim().parse::<u32>().ok());
            }
        }
    }
    out.progs.sort_unstable();
    out.progs.dedup();
    out.maps.sort_unstable();
    out.maps.dedup();
    out
}

/// `BPF_PROG_GET_FD_BY_ID` and `BPF_MAP_GET_FD_BY_ID` of `bpf(2)`.
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;

fn exists(cmd: libc::c_long, id: u32) -> bool {
    // union bpf_attr for the GET_FD_BY_ID commands: the id, next_id, open_flags.
    let mut attr = [0u32; 8];
    attr[0] = id;
    // SAFETY: `attr` is a readable buffer of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor the kernel just returned to us.
        unsafe { libc::close(fd as libc::c_int) };
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT)
}

/// The ids of `objs` that still exist in the kernel.
pub fn still_loaded(objs: &BpfObjects) -> BpfObjects {
    BpfObjects {
        progs: objs
            .progs
            .iter()
            .copied()
            .filter(|&id| exists(BPF_PROG_GET_FD_BY_ID, id))
            .collect(),
        maps: objs
            .maps
            .iter()
            .copied()
            .filter(|&id| exists(BPF_MAP_GET_FD_BY_ID, id))
            .collect(),
    }
}

/// Waits (at most `limit`; the kernel frees BPF objects after an RCU grace period) until none
/// of `objs` exists any more.
pub async fn wait_bpf_gone(objs: &BpfObjects, limit: Duration, what: &str) {
    crate::poll_until(limit, what, |last| {
        let left = still_loaded(objs);
        *last = format!("{left:?} of {objs:?}");
        (left == BpfObjects::default()).then_some(())
    })
    .await;
}

/// `ss` about the established TCP socket bound to `local` and connected to `peer` (`opts`:
/// what to show, e.g. `-m`), as text; empty when there is no such socket.
fn ss(opts: &str, local: std::net::SocketAddr, peer: std::net::SocketAddr) -> String {
    let (local, peer) = (local.to_string(), peer.to_string());
    crate::util::run(
        "ss",
        &[
            "-tnH",
            opts,
            "state",
            "established",
            "src",
            &local,
            "dst",
            &peer,
        ],
    )
}

/// Receive and send buffer sizes (`SO_RCVBUF`, `SO_SNDBUF` as the kernel keeps them) of the
/// established TCP socket bound to `local` and connected to `peer`, from `ss -tm`; None when
/// there is no such socket.
pub fn tcp_buffers(local: std::net::SocketAddr, peer: std::net::SocketAddr) -> Option<(u64, u64)> {
    let text = ss("-m", local, peer);
    let mem = text.split("skmem:(").nth(1)?;
    let field = |name: &str| -> u64 {
        mem.split([',', ')'])
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in ss output: {text}"))
    };
    Some((field("rb"), field("tb")))
}

/// Segments sent and received (`tcpi_segs_out`, `tcpi_segs_in`: every segment, pure
/// acknowledgements and the handshake included) by the established TCP socket bound to `local`
/// and connected to `peer`, from `ss -ti`; None when there is no such socket.
pub fn tcp_segments(local: std::net::SocketAddr, peer: std::net::SocketAddr) -> Option<(u64, u64)> {
    let text = ss("-i", local, peer);
    if text.trim().is_empty() {
        return None;
    }
    let field = |name: &str| -> u64 {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in ss output: {text}"))
    };
    Some((field("segs_out:"), field("segs_in:")))
}

/// An integer under /proc/sys (e.g. `net/core/wmem_max`); for a vector, its last value.
pub fn sysctl(path: &str) -> u64 {
    let full = format!("/proc/sys/{path}");
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {full}: {e}"));
    text.split_whitespace()
        .last()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{full}: {text:?}"))
}
