//! Readings from /proc: the machine's description, whole-machine busy CPU time and kernel memory,
//! and the CPU time, memory and descriptors of a subject's process tree.

use std::collections::HashMap;
use std::fs;

use serde::Serialize;

/// Clock ticks per second used by /proc/stat and /proc/PID/stat.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub arch: String,
    pub hostname: String,
    pub cpu_model: String,
    pub cores: usize,
    pub mem_total_mib: u64,
}

impl Machine {
    pub fn detect() -> Machine {
        let (kernel, arch, hostname) = uname();
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".to_string());
        let cores = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let cores = if cores > 0 {
            cores
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        };
        let mem_total_mib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        Machine {
            kernel,
            arch,
            hostname,
            cpu_model,
            cores,
            mem_total_mib,
        }
    }

    pub fn one_line(&self) -> String {
        format!(
            "Linux {} {}, {}, {} cores, {:.0} GiB RAM",
            self.kernel,
            self.arch,
            self.cpu_model,
            self.cores,
            self.mem_total_mib as f64 / 1024.0
        )
    }
}

fn uname() -> (String, String, String) {
    // SAFETY: utsname is plain old data; uname fills it in.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return ("unknown".into(), "unknown".into(), "unknown".into());
    }
    fn field(f: &[libc::c_char]) -> String {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    (field(&u.release), field(&u.machine), field(&u.nodename))
}

/// CPU time of the whole machine, from the `cpu` lines of /proc/stat.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    /// Seconds the CPUs worked: user, nice, system, irq and softirq (guest time is already
    /// part of user); idle, iowait and steal are not work.
    pub busy_s: f64,
    /// Seconds a virtual CPU was ready to run while its host ran something else (steal): no
    /// work of this machine's, but every figure measured meanwhile is slowed by it.
    pub steal_s: f64,
    /// CPUs counted (`cpuN` lines).
    pub cpus: usize,
}

/// The machine's CPU time so far.
pub fn machine_cpu() -> MachineCpu {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    parse_machine_cpu(&stat)
}

fn parse_machine_cpu(stat: &str) -> MachineCpu {
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return MachineCpu::default();
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal guest guest_nice
    let busy = get(0) + get(1) + get(2) + get(5) + get(6);
    MachineCpu {
        busy_s: busy as f64 / clock_ticks(),
        steal_s: get(7) as f64 / clock_ticks(),
        cpus,
    }
}

/// Busy time of the whole machine in seconds ([`MachineCpu::busy_s`]).
pub fn machine_busy_seconds() -> f64 {
    machine_cpu().busy_s
}

/// A `kB` field of /proc/meminfo (e.g. `SUnreclaim`), in KiB.
pub fn meminfo_kib(field: &str) -> Option<u64> {
    kib_field(&fs::read_to_string("/proc/meminfo").ok()?, field)
}

/// A `kB` field of /proc/PID/status (e.g. `VmRSS`), in KiB.
pub fn status_kib(pid: i32, field: &str) -> Option<u64> {
    kib_field(
        &fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        field,
    )
}

/// `Name:   1234 kB` lines, as in /proc/meminfo and /proc/PID/status.
fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.split_once(':').is_some_and(|(k, _)| k == field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Open descriptors of a process (entries of /proc/PID/fd).
pub fn fd_count(pid: i32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

#[derive(Debug, Clone, Copy)]
struct PidStat {
    ppid: i32,
    starttime: u64,
    /// Zombie or dead: exited, waiting to be reaped.
    dead: bool,
    /// utime + stime + cutime + cstime, in clock ticks.
    cpu_ticks: u64,
}

fn read_pid_stat(pid: i32) -> Option<PidStat> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] = state (field 3), f[1] = ppid (4), f[11..15] = utime stime cutime cstime (14..17),
    // f[19] = starttime (22).
    let num = |i: usize| f.get(i).and_then(|x| x.parse::<i64>().ok()).unwrap_or(0);
    let cpu = num(11) + num(12) + num(13) + num(14);
    Some(PidStat {
        ppid: num(1) as i32,
        starttime: num(19) as u64,
        dead: matches!(f.first(), Some(&"Z") | Some(&"X")),
        cpu_ticks: cpu.max(0) as u64,
    })
}

/// A process (identified by pid and start time, so that a reused pid is never mistaken for it)
/// and all its live descendants.
#[derive(Debug, Clone)]
pub struct ProcTree {
    pub root: i32,
    root_start: u64,
}

impl ProcTree {
    pub fn new(root: i32) -> ProcTree {
        let root_start = read_pid_stat(root).map(|s| s.starttime).unwrap_or(0);
        ProcTree { root, root_start }
    }

    /// The live members of the tree (root first) with their /proc stat.
    fn members(&self) -> Vec<(i32, PidStat)> {
        let Some(root) = read_pid_stat(self.root) else {
            return Vec::new();
        };
        if root.starttime != self.root_start {
            return Vec::new();
        }
        let mut all: HashMap<i32, PidStat> = HashMap::new();
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                    if let Some(st) = read_pid_stat(pid) {
                        all.insert(pid, st);
                    }
                }
            }
        }
        let mut out = vec![(self.root, root)];
        let mut i = 0;
        while i < out.len() {
            let parent = out[i].0;
            for (&pid, st) in &all {
                if st.ppid == parent && pid != self.root {
                    out.push((pid, *st));
                }
            }
            i += 1;
        }
        out
    }

    /// Live process ids of the tree with their start times.
    pub fn pids(&self) -> Vec<(i32, u64)> {
        self.members()
            .into_iter()
            .map(|(p, s)| (p, s.starttime))
            .collect()
    }

    /// CPU seconds (user + system, including reaped children) summed over the tree.
    pub fn cpu_seconds(&self) -> f64 {
        let ticks: u64 = self.members().iter().map(|(_, s)| s.cpu_ticks).sum();
        ticks as f64 / clock_ticks()
    }

    /// Resets the peak resident set size (VmHWM) of every process in the tree to its current
    /// RSS. Returns false when that is not possible (then VmHWM stays a lifetime peak).
    pub fn reset_peak_rss(&self) -> bool {
        let mut ok = true;
        for (pid, _) in self.members() {
            ok &= fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
        }
        ok
    }

    /// Sum of VmHWM over the tree, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.sum(|pid| status_kib(pid, "VmHWM"))
    }

    /// Sum of VmRSS (current resident memory) over the tree, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.sum(|pid| status_kib(pid, "VmRSS"))
    }

    /// Open descriptors summed over the tree.
    pub fn fd_count(&self) -> Option<usize> {
        self.sum(fd_count)
    }

    /// `f` summed over the live members (a member that vanished in between counts 0); None
    /// when the root is gone.
    fn sum<T: std::iter::Sum<T> + Default>(&self, f: impl Fn(i32) -> Option<T>) -> Option<T> {
        let m = self.members();
        if m.is_empty() {
            return None;
        }
        Some(
            m.into_iter()
                .map(|(pid, _)| f(pid).unwrap_or_default())
                .sum(),
        )
    }
}

/// True when `pid` still runs (exists and is not a zombie) and was started at `starttime`.
pub fn same_process(pid: i32, starttime: u64) -> bool {
    read_pid_stat(pid).is_some_and(|s| s.starttime == starttime && !s.dead)
}

/// Calendar date and time (UTC) of the current moment, "YYYY-MM-DD HH:MM:SS UTC".
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        tod / 3600,
        (tod % 3600) / 60,
        tod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_not_work() {
        let stat = "cpu  100 5 200 900 7 3 20 50 11 0\n\
                    cpu0 50 2 100 450 3 1 10 25 5 0\n\
                    cpu1 50 3 100 450 4 2 10 25 6 0\n\
                    intr 12345\n\
                    ctxt 678\n";
        let m = parse_machine_cpu(stat);
        let hz = clock_ticks();
        assert_eq!(m.cpus, 2);
        // user + nice + system + irq + softirq; guest is inside user.
        assert!((m.busy_s - 328.0 / hz).abs() < 1e-9, "{m:?}");
        assert!((m.steal_s - 50.0 / hz).abs() < 1e-9, "{m:?}");
        assert_eq!(parse_machine_cpu("").cpus, 0);
    }
}
