//! `cargo xtask setup --apt`: the Debian packages the privileged tests and the benchmark call.

use anyhow::{bail, Result};

use crate::cmd::{self, Cmd};

/// A Debian package the tests or the benchmark run a program from.
struct AptPackage {
    name: &'static str,
    /// Skipped with a note when the distribution has no package of that name.
    optional: bool,
}

/// Every package `--apt` installs when missing.
const APT_PACKAGES: &[AptPackage] = &[
    // `ip netns`, `ip link add type veth`: the tests' network namespaces.
    AptPackage {
        name: "iproute2",
        optional: false,
    },
    // SOCKS5 client (`--socks5-hostname`).
    AptPackage {
        name: "curl",
        optional: false,
    },
    // Plain TCP peers (`nc`).
    AptPackage {
        name: "netcat-openbsd",
        optional: false,
    },
    // Inspecting loaded programs and pinned maps. Named `bpftool` from Debian 12 on.
    AptPackage {
        name: "bpftool",
        optional: true,
    },
    // `ssh`: a protocol whose server speaks first (bytes queued before the splice starts).
    AptPackage {
        name: "openssh-client",
        optional: false,
    },
    // A real SOCKS5 UDP ASSOCIATE client (PySocks) for the UDP relay's tests.
    AptPackage {
        name: "python3-socks",
        optional: false,
    },
    // `strace -c`: the system calls a short session costs the daemon (tests/tests/syscalls.rs).
    AptPackage {
        name: "strace",
        optional: false,
    },
    // `ps`, `pgrep`, `sysctl`.
    AptPackage {
        name: "procps",
        optional: false,
    },
];

/// The other SOCKS servers `cargo xtask bench --with-peers` measures ebsocks against (the bench
/// configures them for loopback itself).
const PEER_PACKAGES: &[AptPackage] = &[
    AptPackage {
        name: "microsocks",
        optional: true,
    },
    // Dante's `danted`.
    AptPackage {
        name: "dante-server",
        optional: true,
    },
];

/// Installs the packages of [`APT_PACKAGES`] that dpkg does not list as installed, after one
/// `apt-get update`; does nothing (and needs no network) when all are present.
pub fn install_missing() -> Result<()> {
    install(APT_PACKAGES)
}

/// Installs the benchmark's peers ([`PEER_PACKAGES`]) that are missing.
pub fn install_peers() -> Result<()> {
    install(PEER_PACKAGES)
}

fn install(packages: &[AptPackage]) -> Result<()> {
    for tool in ["dpkg-query", "apt-get", "apt-cache"] {
        if cmd::find_on_path(tool).is_none() {
            bail!("`setup --apt` needs a Debian-based system: `{tool}` not found");
        }
    }
    let names: Vec<&str> = packages.iter().map(|p| p.name).collect();
    // dpkg-query exits 1 when a package was never known; its stdout still lists the others.
    let out = Cmd::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Abbrev}\n"])
        .args(&names)
        .probe()?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let installed = |name: &str| {
        listed.lines().any(|l| {
            let mut fields = l.split_whitespace();
            fields.next() == Some(name) && fields.next() == Some("ii")
        })
    };
    let missing: Vec<&AptPackage> = packages.iter().filter(|p| !installed(p.name)).collect();
    if missing.is_empty() {
        progress!("apt: all present ({})", names.join(", "));
        return Ok(());
    }
    let missing_names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    progress!("apt: missing {}", missing_names.join(", "));

    apt_get()?.arg("update").run()?;
    let mut install = Vec::new();
    for package in missing {
        let AptPackage { name, optional } = *package;
        if optional && !has_candidate(name)? {
            progress!("apt: no package `{name}` in this distribution; skipped");
        } else {
            install.push(name);
        }
    }
    if install.is_empty() {
        return Ok(());
    }
    apt_get()?
        .args(["install", "-y", "--no-install-recommends"])
        .args(&install)
        .run()
}

fn apt_get() -> Result<Cmd> {
    Ok(cmd::as_root("apt-get", "installing Debian packages")?
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Whether apt knows a version of `name` it could install.
fn has_candidate(name: &str) -> Result<bool> {
    let policy = Cmd::new("apt-cache").args(["policy", name]).read()?;
    Ok(policy
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate:"))
        .any(|c| c.trim() != "(none)"))
}
