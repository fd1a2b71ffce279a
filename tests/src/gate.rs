//! Decides whether this machine can run the privileged tests.
//!
//! A developer without root (or without the daemon built) gets `SKIP: …` and a
//! passing test; CI (`CI=true`) gets a failure instead, so a misconfigured CI
//! job cannot go green by skipping everything.

use std::{ffi::CStr, path::Path, sync::OnceLock};

/// `statfs` magic of bpffs (`BPF_FS_MAGIC` in `linux/magic.h`).
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
/// Where the daemon pins its maps for the `stats` command.
const BPFFS: &CStr = c"/sys/fs/bpf";
/// `BPF_MAP_CREATE` command of `bpf(2)`.
const BPF_MAP_CREATE: libc::c_long = 0;
/// `BPF_MAP_TYPE_ARRAY` in `enum bpf_map_type`.
const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// `BPF_MAP_TYPE_SOCKHASH` in `enum bpf_map_type`.
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;

/// Returns `true` when the test may go on; otherwise skips (prints
/// `SKIP: <reason>` and returns `false`) or, when `CI=true`, panics.
///
/// Always checks: effective uid 0, the daemon binary exists, bpffs is mounted
/// at `/sys/fs/bpf` (mounted here when missing, since we are root), and
/// `bpf(2)` can create a map. A `feature` that names `sockmap` also needs the
/// kernel to create a sockhash.
pub fn require_privileged(feature: &str) -> bool {
    static BASE: OnceLock<Result<(), String>> = OnceLock::new();
    static SOCKHASH: OnceLock<Result<(), String>> = OnceLock::new();
    let mut verdict = BASE.get_or_init(probe_base).clone();
    if verdict.is_ok() && feature.contains("sockmap") {
        verdict = SOCKHASH
            .get_or_init(|| {
                probe_map(BPF_MAP_TYPE_SOCKHASH, 8, 8)
                    .map_err(|e| format!("kernel cannot create a sockhash: {e}"))
            })
            .clone();
    }
    match verdict {
        Ok(()) => true,
        Err(reason) => skip_or_panic(feature, &reason),
    }
}

/// Skips the test (returns `false`) or, in CI, panics with `reason`.
///
/// For tests with requirements of their own, e.g. an IPv6 loopback.
pub fn skip_or_panic(feature: &str, reason: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{feature}: {reason}; this is required in CI");
    }
    eprintln!("SKIP: {feature}: {reason}");
    false
}

fn probe_base() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    let bin = crate::daemon::daemon_binary();
    if !bin.is_file() {
        return Err(format!(
            "daemon binary {} not found (build it with `cargo build --release -p proxy-userspace` or set EBSOCKS_BIN)",
            bin.display()
        ));
    }
    ensure_bpffs()?;
    probe_map(BPF_MAP_TYPE_ARRAY, 4, 8).map_err(|e| format!("bpf(2) cannot create a map: {e}"))
}

fn is_bpffs(path: &CStr) -> bool {
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is writable.
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut st) };
    rc == 0 && st.f_type as u64 == BPF_FS_MAGIC
}

fn ensure_bpffs() -> Result<(), String> {
    if is_bpffs(BPFFS) {
        return Ok(());
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        return Err("/sys/fs/bpf does not exist".into());
    }
    // SAFETY: every pointer is a NUL-terminated literal; data may be NULL.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            BPFFS.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    // Another test thread may have mounted it in between.
    if rc != 0 && !is_bpffs(BPFFS) {
        return Err(format!(
            "bpffs is not mounted at /sys/fs/bpf and mounting it failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Creates (and closes) a one-entry map of `map_type`.
fn probe_map(map_type: u32, key_size: u32, value_size: u32) -> Result<(), std::io::Error> {
    // The first words of `union bpf_attr` for BPF_MAP_CREATE: map_type,
    // key_size, value_size, max_entries; the rest must be zero. 128 bytes is
    // less than the kernel's union, which it accepts.
    let mut attr = [0u32; 32];
    attr[0] = map_type;
    attr[1] = key_size;
    attr[2] = value_size;
    attr[3] = 1;
    // SAFETY: `attr` is a readable buffer of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned here.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}
