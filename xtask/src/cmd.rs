//! Child processes. Every command that does work is printed before it runs, inherits stdio,
//! and fails with its command line and exit status. Queries (`probe`, `read`) capture their
//! output and are printed only with `--verbose`.

use std::{
    env,
    ffi::{OsStr, OsString},
    fmt, io,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{anyhow, bail, Context as _, Result};

static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Makes `probe` and `read` print their command lines too.
pub fn set_verbose(verbose: bool) {
    VERBOSE.store(verbose, Ordering::Relaxed);
}

/// A command line plus the environment changes it needs, printable as a shell line so a
/// failing step can be rerun by hand.
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    set_env: Vec<(OsString, OsString)>,
    unset_env: Vec<OsString>,
    cwd: Option<PathBuf>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            set_env: Vec::new(),
            unset_env: Vec::new(),
            cwd: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I>(mut self, args: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.set_env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.unset_env.push(key.as_ref().to_owned());
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    fn command(&self) -> Command {
        let Self {
            program,
            args,
            set_env,
            unset_env,
            cwd,
        } = self;
        let mut cmd = Command::new(program);
        cmd.args(args);
        for key in unset_env {
            cmd.env_remove(key);
        }
        for (key, value) in set_env {
            cmd.env(key, value);
        }
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        cmd
    }

    /// Runs the command with inherited stdio; fails unless it exits with status 0.
    pub fn run(&self) -> Result<()> {
        progress!("$ {self}");
        let status = self.command().status().map_err(|e| self.spawn_error(e))?;
        if !status.success() {
            bail!("`{self}` failed: {status}");
        }
        Ok(())
    }

    /// Runs a query and returns its output whatever the exit status; fails only when the
    /// program cannot be started.
    pub fn probe(&self) -> Result<Output> {
        if VERBOSE.load(Ordering::Relaxed) {
            progress!("$ {self}");
        }
        self.command()
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.spawn_error(e))
    }

    /// Runs a query and returns its stdout; fails with its stderr unless it exits with 0.
    pub fn read(&self) -> Result<String> {
        let Output {
            status,
            stdout,
            stderr,
        } = self.probe()?;
        if !status.success() {
            bail!(
                "`{self}` failed: {status}: {}",
                String::from_utf8_lossy(&stderr).trim()
            );
        }
        String::from_utf8(stdout).with_context(|| format!("`{self}` printed non-UTF-8 output"))
    }

    /// Replaces xtask with the command, so signals (Ctrl-C) reach it directly and its exit
    /// status becomes ours. Returns only on failure.
    pub fn exec(&self) -> anyhow::Error {
        progress!("$ {self}");
        let err = self.command().exec();
        self.spawn_error(err)
    }

    fn spawn_error(&self, err: io::Error) -> anyhow::Error {
        if err.kind() == io::ErrorKind::NotFound {
            anyhow!(
                "cannot run `{self}`: `{}` not found",
                self.program.to_string_lossy()
            )
        } else {
            anyhow!(err).context(format!("cannot run `{self}`"))
        }
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            program,
            args,
            set_env,
            unset_env,
            cwd,
        } = self;
        if let Some(cwd) = cwd {
            if env::current_dir().ok().as_deref() != Some(cwd.as_path()) {
                write!(f, "cd {} && ", quote(cwd.as_os_str()))?;
            }
        }
        if !unset_env.is_empty() {
            f.write_str("env")?;
            for key in unset_env {
                write!(f, " -u {}", quote(key))?;
            }
            f.write_str(" ")?;
        }
        for (key, value) in set_env {
            write!(f, "{}={} ", key.to_string_lossy(), quote(value))?;
        }
        f.write_str(&quote(program))?;
        for arg in args {
            write!(f, " {}", quote(arg))?;
        }
        Ok(())
    }
}

/// Quotes `s` for a POSIX shell when it holds anything but plain characters.
fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Whether xtask runs with effective uid 0 (loading eBPF programs, mounting bpffs and apt need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether this is a CI run; then a privileged step that cannot run is an error, not a skip.
pub fn is_ci() -> bool {
    env::var_os("CI").is_some_and(|v| v == "true")
}

/// The first executable file called `name` in PATH.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A command that needs root: run as is when xtask is root, through `sudo -E` otherwise.
/// `what` names the step in the error when neither is possible.
pub fn as_root(program: impl AsRef<OsStr>, what: &str) -> Result<Cmd> {
    if is_root() {
        Ok(Cmd::new(program))
    } else if find_on_path("sudo").is_some() {
        Ok(Cmd::new("sudo").arg("-E").arg(program))
    } else {
        bail!("{what} needs root: run xtask as root (sudo is not installed)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_a_shell_line() {
        let cmd = Cmd::new("cargo")
            .args(["install", "a b", "it's"])
            .env("RUSTFLAGS", "-L native=/x")
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        assert_eq!(
            cmd.to_string(),
            r"env -u CARGO_ENCODED_RUSTFLAGS RUSTFLAGS='-L native=/x' cargo install 'a b' 'it'\''s'"
        );
    }
}
