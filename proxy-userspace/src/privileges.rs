//! Dropping root once start-up is done (`user`, `group` in the configuration).
//!
//! Everything that needs privileges happens before: loading the eBPF programs, creating and
//! pinning the maps, attaching the verdict, binding the listeners, the control socket and the
//! metrics endpoint, raising `RLIMIT_NOFILE`. What the daemon does afterwards (map updates on
//! descriptors it already holds, `setsockopt`, `connect`, `accept`) needs no capability on
//! Linux 6.5 and later, so the daemon keeps none:
//!
//! 1. every thread drops every capability from its bounding set except [`KEEP`], clears its
//!    ambient set and sets `no_new_privs` (capabilities are per thread in Linux, and the tokio
//!    workers already run, so this is broadcast to each thread with a signal);
//! 2. `setgroups([gid])`, `setresgid`, `setresuid` (glibc applies these to every thread): the
//!    uid change from 0 clears the permitted and effective sets of every thread;
//! 3. the result is checked on this thread (`/proc/thread-self/status`).
//!
//! The pin directory and its pins, and the control socket, are handed to the new user first,
//! so the daemon can still remove them at exit (the pins need the parent, `/sys/fs/bpf`, to be
//! searchable by that user; the unit file's `ExecStopPost=` covers a mode-0700 bpffs).
//!
//! # Minimum kernel version
//!
//! Linux 6.5: before it, every `bpf(2)` command (map updates included) needed `CAP_BPF` when
//! `kernel.unprivileged_bpf_disabled` is set; there, leave `user` unset and confine the daemon
//! with the service manager's capability bounding set instead.

use std::{
    ffi::CString,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use crate::config::RunAs;

/// Capabilities kept in the bounding set (bit numbers as in `linux/capability.h`). None: see
/// the module documentation.
pub const KEEP: u64 = 0;

/// Bound for every thread to apply the per-thread restrictions.
const BROADCAST_LIMIT: Duration = Duration::from_secs(5);

/// Why the daemon could not switch users. Start-up fails: a daemon told to drop root must not
/// go on as root.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// `user` or `group` names nobody on this system.
    #[error("no {kind} {name:?} on this system")]
    Unknown {
        /// "user" or "group".
        kind: &'static str,
        /// The configured name.
        name: String,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// The step that failed.
        context: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The process still holds what it should have dropped.
    #[error("after switching users: {0}")]
    Check(String),
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> PrivilegeError {
    move |source| PrivilegeError::Io { context, source }
}

/// A resolved `user`/`group`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The uid to switch to.
    pub uid: libc::uid_t,
    /// The gid to switch to (the only group kept).
    pub gid: libc::gid_t,
}

/// Looks up `run_as` in the user and group databases; numeric ids are accepted too.
pub fn resolve(run_as: &RunAs) -> Result<Identity, PrivilegeError> {
    let RunAs { user, group } = run_as;
    let unknown = |kind, name: &str| PrivilegeError::Unknown {
        kind,
        name: name.to_owned(),
    };
    let (uid, primary) = match lookup_user(user)? {
        Some(ids) => ids,
        None => match user.parse::<libc::uid_t>() {
            Ok(uid) => (uid, uid),
            Err(_) => return Err(unknown("user", user)),
        },
    };
    let gid = match group {
        None => primary,
        Some(g) => match lookup_group(g)? {
            Some(gid) => gid,
            None => g.parse().map_err(|_| unknown("group", g))?,
        },
    };
    Ok(Identity { uid, gid })
}

fn cstring(s: &str) -> Result<CString, PrivilegeError> {
    CString::new(s).map_err(|_| PrivilegeError::Unknown {
        kind: "user or group",
        name: s.to_owned(),
    })
}

fn lookup_user(name: &str) -> Result<Option<(libc::uid_t, libc::gid_t)>, PrivilegeError> {
    let c = cstring(name)?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut res: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the stated sizes; the strings pwd points to live in
    // `buf`, which is not read after this.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &raw mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &raw mut res,
        )
    };
    if rc != 0 {
        return Err(io_err("looking up the user")(io::Error::from_raw_os_error(
            rc,
        )));
    }
    Ok((!res.is_null()).then_some((pwd.pw_uid, pwd.pw_gid)))
}

fn lookup_group(name: &str) -> Result<Option<libc::gid_t>, PrivilegeError> {
    let c = cstring(name)?;
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: an all-zero group is a valid value to be overwritten.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut res: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in lookup_user.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &raw mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &raw mut res,
        )
    };
    if rc != 0 {
        return Err(io_err("looking up the group")(
            io::Error::from_raw_os_error(rc),
        ));
    }
    Ok((!res.is_null()).then_some(grp.gr_gid))
}

/// What the daemon created as root and must still be able to remove at exit.
#[derive(Debug, Default)]
pub struct Handover {
    /// The pin directory (its entries are handed over too), when the maps are pinned.
    pub pin_dir: Option<PathBuf>,
    /// The control socket, when listening.
    pub control_socket: Option<PathBuf>,
}

fn chown(path: &Path, id: Identity) -> Result<(), PrivilegeError> {
    std::os::unix::fs::lchown(path, Some(id.uid), Some(id.gid))
        .map_err(io_err("handing a file to the new user"))
}

fn hand_over(what: &Handover, id: Identity) -> Result<(), PrivilegeError> {
    let Handover {
        pin_dir,
        control_socket,
    } = what;
    if let Some(dir) = pin_dir {
        for e in std::fs::read_dir(dir).map_err(io_err("listing the pin directory"))? {
            let e = e.map_err(io_err("listing the pin directory"))?;
            chown(&e.path(), id)?;
        }
        chown(dir, id)?;
    }
    if let Some(sock) = control_socket {
        chown(sock, id)?;
        // The socket's own directory, when it is private to the daemon (mode 0700, owned by
        // root: what the daemon creates); never a shared one such as /tmp.
        if let Some(parent) = sock.parent() {
            let private =
                std::fs::metadata(parent).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o7777 == 0o700);
            if private {
                chown(parent, id)?;
            }
        }
    }
    Ok(())
}

/// Switches the whole process to `id`, keeping only [`KEEP`], after handing `what` over.
///
/// Must run as root, before anything that the new user could not do has to happen again.
pub fn drop_to(id: Identity, what: &Handover) -> Result<(), PrivilegeError> {
    hand_over(what, id)?;
    restrict_all_threads()?;
    let groups = [id.gid];
    // SAFETY: `groups` is a readable array of one gid.
    if unsafe { libc::setgroups(1, groups.as_ptr()) } != 0 {
        return Err(io_err("setgroups")(io::Error::last_os_error()));
    }
    // SAFETY: plain system calls; glibc applies them to every thread of the process.
    if unsafe { libc::setresgid(id.gid, id.gid, id.gid) } != 0 {
        return Err(io_err("setresgid")(io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(id.uid, id.uid, id.uid) } != 0 {
        return Err(io_err("setresuid")(io::Error::last_os_error()));
    }
    check(id)
}

/// Reads a hexadecimal capability mask line (`CapEff:` ...) of a status file.
fn cap_field(status: &str, field: &str) -> Option<u64> {
    let v = status.lines().find_map(|l| l.strip_prefix(field))?;
    u64::from_str_radix(v.trim(), 16).ok()
}

fn check(id: Identity) -> Result<(), PrivilegeError> {
    let status = std::fs::read_to_string("/proc/thread-self/status")
        .map_err(io_err("reading /proc/thread-self/status"))?;
    let fail = |what: String| Err(PrivilegeError::Check(what));
    for (field, want) in [("CapEff:", KEEP), ("CapPrm:", KEEP), ("CapAmb:", 0)] {
        match cap_field(&status, field) {
            Some(v) if v & !want == 0 => {}
            v => return fail(format!("{field} is {v:x?}, expected at most {want:x}")),
        }
    }
    if cap_field(&status, "CapBnd:").is_none_or(|v| v & !KEEP != 0) {
        return fail("the bounding set still holds capabilities".into());
    }
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if (uid, gid) != (id.uid, id.gid) {
        return fail(format!("uid/gid are {uid}/{gid}"));
    }
    Ok(())
}

/// Bounding-set mask the signal handler applies; set before the broadcast.
static DROP_MASK: AtomicU64 = AtomicU64::new(0);
/// Threads that ran [`restrict_this_thread`] in the current broadcast.
static DONE: AtomicUsize = AtomicUsize::new(0);
/// Threads where a step failed.
static FAILED: AtomicUsize = AtomicUsize::new(0);

/// The per-thread part: drop the bounding set bits in [`DROP_MASK`], clear the ambient set,
/// set `no_new_privs`. Only async-signal-safe calls (prctl).
fn restrict_this_thread() -> bool {
    let mask = DROP_MASK.load(Ordering::SeqCst);
    let mut ok = true;
    for cap in 0..64u64 {
        // Only what is still in the set: dropping needs CAP_SETPCAP, which a service manager's
        // bounding set may already have removed along with everything else.
        // SAFETY: prctl with integer arguments.
        if mask & (1 << cap) != 0
            && unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } == 1
        {
            // SAFETY: prctl with integer arguments.
            ok &= unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } == 0;
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        ok &= libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ) == 0;
        ok &= libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0;
    }
    ok
}

extern "C" fn on_restrict_signal(_: libc::c_int) {
    if !restrict_this_thread() {
        FAILED.fetch_add(1, Ordering::SeqCst);
    }
    DONE.fetch_add(1, Ordering::SeqCst);
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid cannot fail.
    unsafe { libc::gettid() }
}

fn thread_ids() -> io::Result<Vec<libc::pid_t>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/task")? {
        if let Some(tid) = e?.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(tid);
        }
    }
    Ok(out)
}

/// Runs [`restrict_this_thread`] on every thread of the process: here directly, on the others
/// from a real-time signal's handler, until no thread is left that has not run it.
fn restrict_all_threads() -> Result<(), PrivilegeError> {
    let last: u64 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
        .min(63);
    let all = if last == 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    };
    DROP_MASK.store(all & !KEEP, Ordering::SeqCst);
    DONE.store(0, Ordering::SeqCst);
    FAILED.store(0, Ordering::SeqCst);

    let sig = libc::SIGRTMAX() - 1;
    // SAFETY: an all-zero sigaction is valid; the handler only makes async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_restrict_signal as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&raw mut sa.sa_mask);
        if libc::sigaction(sig, &raw const sa, std::ptr::null_mut()) != 0 {
            return Err(io_err("installing the thread broadcast handler")(
                io::Error::last_os_error(),
            ));
        }
    }
    if !restrict_this_thread() {
        return Err(io_err(
            "emptying the capability bounding set (needs CAP_SETPCAP)",
        )(io::Error::last_os_error()));
    }
    let me = gettid();
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() };
    let mut signalled = vec![me];
    let t0 = Instant::now();
    loop {
        let base = DONE.load(Ordering::SeqCst);
        let mut sent = 0usize;
        for tid in thread_ids().map_err(io_err("listing the threads"))? {
            if signalled.contains(&tid) {
                continue;
            }
            // SAFETY: tgkill to a thread of our own process.
            let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
            signalled.push(tid);
            if rc == 0 {
                sent += 1;
            }
        }
        // Wait for this round's threads; a thread that exited meanwhile never answers, so the
        // bound is a few milliseconds per round, then a rescan.
        let want = base + sent;
        let round = Instant::now();
        while DONE.load(Ordering::SeqCst) < want && round.elapsed() < Duration::from_millis(200) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if sent == 0 {
            break;
        }
        if t0.elapsed() > BROADCAST_LIMIT {
            return Err(PrivilegeError::Check(
                "threads did not apply the restrictions in time".into(),
            ));
        }
    }
    if FAILED.load(Ordering::SeqCst) != 0 {
        return Err(PrivilegeError::Check(
            "a thread could not drop its bounding set".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_numbers() {
        let root = resolve(&RunAs {
            user: "root".into(),
            group: None,
        })
        .unwrap();
        assert_eq!(root, Identity { uid: 0, gid: 0 });
        let n = resolve(&RunAs {
            user: "4242".into(),
            group: Some("4343".into()),
        })
        .unwrap();
        assert_eq!(
            n,
            Identity {
                uid: 4242,
                gid: 4343
            }
        );
        let e = resolve(&RunAs {
            user: "no-such-ebsocks-user".into(),
            group: None,
        })
        .unwrap_err();
        assert!(e.to_string().contains("no-such-ebsocks-user"), "{e}");
        let e = resolve(&RunAs {
            user: "root".into(),
            group: Some("no-such-ebsocks-group".into()),
        })
        .unwrap_err();
        assert!(e.to_string().contains("group"), "{e}");
    }

    #[test]
    fn reads_capability_masks() {
        let s = "Name:\tx\nCapPrm:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(cap_field(s, "CapPrm:"), Some(0));
        assert_eq!(cap_field(s, "CapEff:"), Some(0x1ff_ffff_ffff));
        assert_eq!(cap_field(s, "CapBnd:"), None);
    }
}
