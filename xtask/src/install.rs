//! `cargo xtask install`: the release binary, a commented configuration and a hardened systemd
//! unit, under `--prefix` (and `--destdir` for packaging).
//!
//! Layout (defaults):
//!
//! | file | path |
//! |---|---|
//! | binary | `PREFIX/bin/ebsocks` (0755, replaced) |
//! | configuration | `SYSCONFDIR/ebsocks/ebsocks.toml` (0644, never overwritten) |
//! | unit | `PREFIX/lib/systemd/system/ebsocks.service` (0644, replaced) |
//!
//! The configuration is the daemon's embedded default (loopback listeners, loopback clients
//! only) with `user = "nobody"` switched on, so the service drops root after start-up.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

use crate::cmd::{self, Cmd};

/// The daemon's embedded default configuration (the same file it compiles in).
const DEFAULT_CONFIG: &str = include_str!("../../proxy-userspace/src/default-config.toml");
/// The unit template; `@BINDIR@` and `@SYSCONFDIR@` are filled in.
const UNIT_TEMPLATE: &str = include_str!("../../dist/ebsocks.service");

/// Where to install.
#[derive(Clone, Debug)]
pub struct Options {
    /// Installation prefix, e.g. `/usr/local`.
    pub prefix: PathBuf,
    /// Configuration directory, e.g. `/etc`.
    pub sysconfdir: PathBuf,
    /// Staging root prepended to every path (packaging); None: the live system.
    pub destdir: Option<PathBuf>,
    /// Print what would be done, change nothing.
    pub dry_run: bool,
}

/// One file to put in place.
struct Item {
    /// Final path on the target system (without destdir).
    path: PathBuf,
    contents: Vec<u8>,
    mode: u32,
    /// Whether an existing file is replaced (the binary, the unit) or kept (the configuration).
    replace: bool,
}

/// The installed configuration: the embedded default, switched to drop root.
pub fn installed_config() -> String {
    let mut text = DEFAULT_CONFIG.replacen("# user = \"nobody\"", "user = \"nobody\"", 1);
    text.insert_str(
        0,
        "# Installed by `cargo xtask install`; later installs never overwrite this file.\n",
    );
    text
}

/// The unit for binaries in `bindir` and the configuration under `sysconfdir`.
pub fn unit(bindir: &Path, sysconfdir: &Path) -> String {
    UNIT_TEMPLATE
        .replace("@BINDIR@", &bindir.display().to_string())
        .replace("@SYSCONFDIR@", &sysconfdir.display().to_string())
}

fn staged(destdir: Option<&Path>, path: &Path) -> PathBuf {
    match destdir {
        Some(d) => d.join(path.strip_prefix("/").unwrap_or(path)),
        None => path.to_owned(),
    }
}

/// Installs `binary` and the files around it; returns the staged paths of (binary,
/// configuration, unit).
pub fn install(binary: &Path, opts: &Options) -> Result<[PathBuf; 3]> {
    let Options {
        prefix,
        sysconfdir,
        destdir,
        dry_run,
    } = opts;
    if !prefix.is_absolute() || !sysconfdir.is_absolute() {
        bail!("--prefix and --sysconfdir must be absolute paths");
    }
    let bindir = prefix.join("bin");
    let items = [
        Item {
            path: bindir.join("ebsocks"),
            contents: fs::read(binary)
                .with_context(|| format!("cannot read {}", binary.display()))?,
            mode: 0o755,
            replace: true,
        },
        Item {
            path: sysconfdir.join("ebsocks/ebsocks.toml"),
            contents: installed_config().into_bytes(),
            mode: 0o644,
            replace: false,
        },
        Item {
            path: prefix.join("lib/systemd/system/ebsocks.service"),
            contents: unit(&bindir, sysconfdir).into_bytes(),
            mode: 0o644,
            replace: true,
        },
    ];
    let destdir = destdir.as_deref();
    let mut staged_paths = Vec::new();
    for item in &items {
        let Item {
            path,
            contents,
            mode,
            replace,
        } = item;
        let target = staged(destdir, path);
        staged_paths.push(target.clone());
        if target.exists() && !replace {
            progress!(
                "install: keeping the existing {} (the new default is not written)",
                target.display()
            );
            continue;
        }
        if *dry_run {
            progress!("install: would write {} (mode {mode:o})", target.display());
            continue;
        }
        let dir = target
            .parent()
            .context("install path without a directory")?;
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // Write beside, then rename: a running binary is replaced, not overwritten in place.
        let tmp = target.with_extension("xtask-new");
        fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(*mode))?;
        fs::rename(&tmp, &target)
            .with_context(|| format!("cannot move {} into place", target.display()))?;
        progress!("install: wrote {}", target.display());
    }
    let [bin, config, unit]: [PathBuf; 3] = staged_paths
        .try_into()
        .map_err(|_| anyhow::anyhow!("three files"))?;
    if !dry_run {
        verify_unit(&unit, &bin)?;
    }
    if destdir.is_none() && !dry_run {
        progress!(
            "install: done; `systemctl daemon-reload && systemctl enable --now ebsocks` starts it"
        );
    }
    Ok([bin, config, unit])
}

/// Runs `systemd-analyze verify` on the unit when it is installed, on a copy whose `ExecStart`
/// names the staged binary (the final path does not exist yet under a destdir).
pub fn verify_unit(unit: &Path, staged_bin: &Path) -> Result<()> {
    let Some(analyze) = cmd::find_on_path("systemd-analyze") else {
        progress!("install: systemd-analyze not found; unit not verified");
        return Ok(());
    };
    let text = fs::read_to_string(unit)?;
    let dir = std::env::temp_dir().join(format!("ebsocks-unit-verify-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let copy = dir.join("ebsocks.service");
    let exec: String = text
        .lines()
        .map(|l| match l.strip_prefix("ExecStart=") {
            Some(rest) => {
                let args = rest.split_once(' ').map_or("", |(_, a)| a);
                format!("ExecStart={} {args}\n", staged_bin.display())
            }
            None => format!("{l}\n"),
        })
        .collect();
    fs::write(&copy, exec)?;
    let out = Cmd::new(analyze).arg("verify").arg(&copy).probe();
    let _ = fs::remove_dir_all(&dir);
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !stderr.trim().is_empty() {
        bail!(
            "systemd-analyze verify {} failed ({}): {}",
            unit.display(),
            out.status,
            stderr.trim()
        );
    }
    progress!(
        "install: systemd-analyze verify: {} is valid",
        unit.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn value<'a>(unit: &'a str, key: &str) -> &'a str {
        unit.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key}= in the unit:\n{unit}"))
    }

    /// The daemon binary for `check-config`: EBSOCKS_BIN (set by `cargo xtask test`). Without
    /// it a fake binary is installed and the configuration is not checked by the daemon, unless
    /// CI=true.
    fn daemon_binary() -> Option<PathBuf> {
        let bin = std::env::var_os("EBSOCKS_BIN").map(PathBuf::from);
        if bin.is_none() {
            assert!(
                !cmd::is_ci(),
                "CI=true: set EBSOCKS_BIN so the installed configuration is checked"
            );
            eprintln!("SKIP part: EBSOCKS_BIN not set, `ebsocks check-config` not run");
        }
        bin
    }

    #[test]
    fn installs_into_a_destdir_and_keeps_an_existing_config() {
        let root =
            std::env::temp_dir().join(format!("ebsocks-install-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let real = daemon_binary();
        let bin = real.clone().unwrap_or_else(|| {
            let fake = root.join("fake-ebsocks");
            fs::write(&fake, "#!/bin/sh\nexit 0\n").unwrap();
            fake
        });
        let opts = Options {
            prefix: "/usr/local".into(),
            sysconfdir: "/etc".into(),
            destdir: Some(root.join("stage")),
            dry_run: true,
        };
        install(&bin, &opts).unwrap();
        assert!(!root.join("stage").exists(), "--dry-run wrote files");

        let opts = Options {
            dry_run: false,
            ..opts
        };
        let [b, c, u] = install(&bin, &opts).unwrap();
        assert_eq!(b, root.join("stage/usr/local/bin/ebsocks"));
        assert_eq!(c, root.join("stage/etc/ebsocks/ebsocks.toml"));
        assert_eq!(
            u,
            root.join("stage/usr/local/lib/systemd/system/ebsocks.service")
        );
        assert_eq!(fs::read(&b).unwrap(), fs::read(&bin).unwrap());
        assert_eq!(
            fs::metadata(&b).unwrap().permissions().mode() & 0o777,
            0o755
        );

        let config = fs::read_to_string(&c).unwrap();
        assert!(config.contains("\nuser = \"nobody\"\n"), "{config}");
        assert!(config.contains("listen = [\"127.0.0.1:1080\", \"[::1]:1080\"]"));
        assert!(config.contains("allow_clients = [\"127.0.0.0/8\", \"::1/128\"]"));

        let unit = fs::read_to_string(&u).unwrap();
        assert_eq!(
            value(&unit, "ExecStart"),
            "/usr/local/bin/ebsocks run --config /etc/ebsocks/ebsocks.toml"
        );
        for (key, want) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("KillSignal", "SIGTERM"),
            ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ] {
            assert_eq!(value(&unit, key), want, "{key}");
        }
        let caps: Vec<&str> = value(&unit, "CapabilityBoundingSet").split(' ').collect();
        for cap in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"] {
            assert!(caps.contains(&cap), "{cap} missing: {caps:?}");
        }
        for cap in ["CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_SYS_PTRACE"] {
            assert!(!caps.contains(&cap), "{cap} granted: {caps:?}");
        }
        assert_eq!(value(&unit, "AmbientCapabilities"), "");
        let nofile: u64 = value(&unit, "LimitNOFILE").parse().unwrap();
        assert!(
            nofile >= 200_000,
            "LimitNOFILE={nofile}: two per session for 100k"
        );
        let stop: u64 = value(&unit, "TimeoutStopSec")
            .trim_end_matches('s')
            .parse()
            .unwrap();
        assert!(
            stop > 10,
            "TimeoutStopSec={stop}s is not above the 10 s drain"
        );

        // A second install keeps the operator's edits.
        fs::write(&c, "# edited\n").unwrap();
        install(&bin, &opts).unwrap();
        assert_eq!(fs::read_to_string(&c).unwrap(), "# edited\n");
        fs::remove_file(&c).unwrap();
        install(&bin, &opts).unwrap();

        if let Some(real) = real {
            let out = Command::new(&real)
                .arg("check-config")
                .arg(&c)
                .output()
                .unwrap();
            let printed = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "check-config of the installed file: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(printed.contains("user = \"nobody\""), "{printed}");
            assert!(
                printed.contains("listen = [\"127.0.0.1:1080\", \"[::1]:1080\"]"),
                "{printed}"
            );
        }
        fs::remove_dir_all(&root).unwrap();
    }
}
