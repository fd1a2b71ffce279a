//! RFC 1929 users files for the daemon, hashed by the daemon binary itself
//! (`ebsocks hash-password`), so the tests do not depend on its hash format.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::daemon::{daemon_binary, toml_str};

/// Bound for one `ebsocks hash-password` run (Argon2id takes tens of milliseconds).
const HASH_LIMIT: Duration = Duration::from_secs(20);

/// Runs `ebsocks hash-password` with `password` on stdin and returns the hash it prints.
pub fn hash_password(password: &str) -> String {
    let bin = daemon_binary();
    let mut child = Command::new(&bin)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {} hash-password: {e}", bin.display()));
    {
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{password}").expect("write the password");
    }
    let t0 = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if t0.elapsed() > HASH_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`ebsocks hash-password` did not finish within {HASH_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("hash-password output");
    assert!(
        out.status.success(),
        "`ebsocks hash-password` exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = String::from_utf8(out.stdout)
        .expect("hash is UTF-8")
        .trim()
        .to_owned();
    assert!(!hash.is_empty(), "`ebsocks hash-password` printed nothing");
    hash
}

/// A users file (`name:HASH` per line): in a temporary directory that lives as long as this,
/// or at a path of the caller's that is left in place ([`UsersFile::kept`]).
pub struct UsersFile {
    _dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl UsersFile {
    /// Writes one line per (user, password).
    pub fn new(users: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ebsocks-users-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("users");
        write_users(&path, users);
        Self {
            _dir: Some(dir),
            path,
        }
    }

    /// Writes one line per (user, password) to `path`, which outlives this: for a file held in
    /// a `static` (never dropped) by a whole test binary, e.g. under its
    /// `CARGO_TARGET_TMPDIR`, where the next run overwrites it.
    pub fn kept(path: PathBuf, users: &[(&str, &str)]) -> Self {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        write_users(&path, users);
        Self { _dir: None, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An `[auth]` table offering `methods` (config spelling) with this file.
    pub fn auth_toml(&self, methods: &[&str]) -> String {
        let m: Vec<String> = methods.iter().map(|m| toml_str(m)).collect();
        format!(
            "[auth]\nmethods = [{}]\nusers_file = {}\n",
            m.join(", "),
            toml_str(&self.path.to_string_lossy())
        )
    }
}

fn write_users(path: &Path, users: &[(&str, &str)]) {
    let text: String = users
        .iter()
        .map(|(u, p)| format!("{u}:{}\n", hash_password(p)))
        .collect();
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
