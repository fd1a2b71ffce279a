//! `cargo xtask setup`: makes the machine able to build the eBPF crate and run the privileged
//! tests. Every step checks first and acts only when something is missing, so a second run
//! takes well under a second.
//!
//! The eBPF crate is compiled by `proxy-userspace/build.rs` (aya-build), which runs
//! `rustup run nightly cargo build -Z build-std=core --target bpfel-unknown-none`. That needs:
//! - the `nightly` toolchain with `rust-src`;
//! - `bpf-linker` on PATH, linked against the nightly's own libLLVM: the bitcode rustc emits
//!   can only be read by an LLVM at least as new, and older bpf-linker releases emit BTF the
//!   kernel rejects. Its rpath ties it to the nightly's directory, so it is rebuilt when that
//!   library no longer loads.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    apt,
    cmd::{self, Cmd},
};

/// The bpf-linker release known to produce objects whose BTF the kernel accepts.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where the daemon pins its maps by default; `ebsocks stats` and the tests read them there.
const BPFFS: &str = "/sys/fs/bpf";

/// Runs every setup step; `apt` also installs the Debian packages the tests use.
pub fn setup(root: &Path, apt: bool) -> Result<()> {
    let nightly = Nightly::probe()?;
    ensure_rust_src()?;
    if apt {
        apt::install_missing()?;
    }
    ensure_bpf_linker(root, &nightly)?;
    ensure_cargo_fuzz(root)?;
    if cmd::is_root() {
        ensure_bpffs()?;
    } else if bpffs_mounted()? {
        progress!("bpffs: mounted at {BPFFS}");
    } else {
        progress!(
            "bpffs: not mounted at {BPFFS}; not root, so left alone (`cargo xtask run` mounts it \
             through sudo)"
        );
    }
    Ok(())
}

/// The installed `nightly` toolchain, as far as building bpf-linker needs to know it.
struct Nightly {
    /// `release:` of `rustc -vV`, e.g. `1.97.0-nightly`.
    release: String,
    /// Major of `LLVM version:` of `rustc -vV`, e.g. `22`.
    llvm_major: String,
    /// `<sysroot>/lib`, which holds `libLLVM-<major>-rust-<release>.so`.
    lib_dir: PathBuf,
}

impl Nightly {
    fn probe() -> Result<Self> {
        let out = Cmd::new("rustup")
            .args(["which", "--toolchain", "nightly", "rustc"])
            .env("RUSTUP_AUTO_INSTALL", "0")
            .probe()
            .context("rustup is needed: the eBPF build runs `rustup run nightly cargo`")?;
        if !out.status.success() {
            bail!(
                "the `nightly` Rust toolchain is not installed; the eBPF crate needs it and xtask \
                 does not install toolchains. Install it with \
                 `rustup toolchain install nightly --component rust-src` \
                 (rustup said: {})",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .next()
                    .unwrap_or_default()
            );
        }
        let rustc = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());

        let version = Cmd::new(&rustc).arg("-vV").read()?;
        let field = |name: &str| {
            version
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .with_context(|| format!("`{} -vV` printed no `{name}` line", rustc.display()))
        };
        let release = field("release:")?.to_owned();
        let llvm = field("LLVM version:")?;
        let llvm_major = llvm.split('.').next().unwrap_or(llvm).to_owned();

        let sysroot = Cmd::new(&rustc).args(["--print", "sysroot"]).read()?;
        let lib_dir = Path::new(sysroot.trim()).join("lib");
        progress!("nightly: rustc {release}, LLVM {llvm}");
        Ok(Self {
            release,
            llvm_major,
            lib_dir,
        })
    }

    /// The name to pass to `-l dylib=`: `LLVM-<major>-rust-<release>` from the file
    /// `lib<name>.so` in the nightly's lib directory.
    fn llvm_dylib(&self) -> Result<String> {
        let Self {
            release,
            llvm_major,
            lib_dir,
        } = self;
        let prefix = format!("libLLVM-{llvm_major}-rust-");
        let mut names = Vec::new();
        for entry in
            fs::read_dir(lib_dir).with_context(|| format!("cannot list {}", lib_dir.display()))?
        {
            let file = entry?.file_name();
            let file = file.to_string_lossy();
            if file.starts_with(&prefix) && file.ends_with(".so") {
                names.push(file["lib".len()..file.len() - ".so".len()].to_owned());
            }
        }
        let expected = format!("LLVM-{llvm_major}-rust-{release}");
        if names.contains(&expected) {
            return Ok(expected);
        }
        match names.as_slice() {
            [name] => Ok(name.clone()),
            [] => bail!(
                "no {prefix}*.so in {}: cannot link bpf-linker against the nightly's LLVM",
                lib_dir.display()
            ),
            _ => bail!(
                "several {prefix}*.so in {} ({}); expected lib{expected}.so",
                lib_dir.display(),
                names.join(", ")
            ),
        }
    }
}

fn ensure_rust_src() -> Result<()> {
    let installed = Cmd::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .read()?;
    if installed
        .lines()
        .any(|l| l.split_whitespace().next() == Some("rust-src"))
    {
        progress!("nightly: rust-src present");
        return Ok(());
    }
    progress!("nightly: adding rust-src (the eBPF build compiles `core` from source)");
    Cmd::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .run()
}

/// Finds a working bpf-linker (first on PATH, then in cargo's install directory) or builds
/// one, and makes sure child processes find that one first on PATH.
fn ensure_bpf_linker(root: &Path, nightly: &Nightly) -> Result<()> {
    let install_root = cargo_install_root()?;
    let installed = install_root.join("bin").join("bpf-linker");
    let mut candidates = Vec::new();
    candidates.extend(cmd::find_on_path("bpf-linker"));
    if cmd::is_executable(&installed) && !candidates.contains(&installed) {
        candidates.push(installed.clone());
    }
    for candidate in &candidates {
        match check_bpf_linker(candidate, nightly) {
            Ok(()) => {
                progress!(
                    "bpf-linker: {BPF_LINKER_VERSION} at {}, linked to the nightly's LLVM",
                    candidate.display()
                );
                return put_first_on_path(candidate);
            }
            Err(why) => progress!("bpf-linker: {} is unusable: {why:#}", candidate.display()),
        }
    }
    if candidates.is_empty() {
        progress!("bpf-linker: not found");
    }

    let lib = nightly.llvm_dylib()?;
    let lib_dir = nightly
        .lib_dir
        .to_str()
        .filter(|d| !d.contains(char::is_whitespace));
    let Some(lib_dir) = lib_dir else {
        bail!(
            "the nightly lib directory {} cannot be passed in RUSTFLAGS",
            nightly.lib_dir.display()
        );
    };
    progress!(
        "bpf-linker: building {BPF_LINKER_VERSION} against the nightly's LLVM {} into {} \
         (about a minute)",
        nightly.llvm_major,
        install_root.display()
    );
    let mut install = Cmd::new("cargo")
        .current_dir(root)
        .env(
            "RUSTFLAGS",
            format!("-L native={lib_dir} -l dylib={lib} -C link-arg=-Wl,-rpath,{lib_dir}"),
        )
        .arg("install")
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args(["--locked", "--force", "--root"])
        .arg(&install_root)
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{},no-llvm-linking", nightly.llvm_major));
    if env::var_os("CARGO_ENCODED_RUSTFLAGS").is_some() {
        // It would take precedence over RUSTFLAGS.
        install = install.env_remove("CARGO_ENCODED_RUSTFLAGS");
    }
    install.run()?;
    check_bpf_linker(&installed, nightly).with_context(|| {
        format!(
            "the freshly built {} does not work either",
            installed.display()
        )
    })?;
    progress!(
        "bpf-linker: {BPF_LINKER_VERSION} installed at {}",
        installed.display()
    );
    put_first_on_path(&installed)
}

/// The cargo-fuzz release `cargo xtask test` runs the fuzz targets with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Installs cargo-fuzz (into cargo's install directory) unless `cargo fuzz` already works.
fn ensure_cargo_fuzz(root: &Path) -> Result<()> {
    let installed = cargo_install_root()?.join("bin").join("cargo-fuzz");
    let found = cmd::find_on_path("cargo-fuzz")
        .or_else(|| cmd::is_executable(&installed).then(|| installed.clone()));
    if let Some(bin) = found {
        let out = Cmd::new(&bin).args(["fuzz", "--version"]).probe()?;
        if out.status.success() {
            progress!(
                "cargo-fuzz: {} at {}",
                String::from_utf8_lossy(&out.stdout).trim(),
                bin.display()
            );
            return Ok(());
        }
        progress!("cargo-fuzz: {} does not run; reinstalling", bin.display());
    }
    progress!(
        "cargo-fuzz: installing {CARGO_FUZZ_VERSION} (runs the fuzz targets in `cargo xtask test`)"
    );
    let mut install = Cmd::new("cargo")
        .current_dir(root)
        .arg("install")
        .arg(format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"))
        .args(["--locked", "--root"])
        .arg(cargo_install_root()?);
    if env::var_os("CARGO_ENCODED_RUSTFLAGS").is_some() {
        install = install.env_remove("CARGO_ENCODED_RUSTFLAGS");
    }
    install.run()
}

/// Where `cargo install` puts binaries (under `bin/`): CARGO_INSTALL_ROOT, else CARGO_HOME,
/// else ~/.cargo.
fn cargo_install_root() -> Result<PathBuf> {
    for var in ["CARGO_INSTALL_ROOT", "CARGO_HOME"] {
        if let Some(dir) = env::var_os(var).filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(dir));
        }
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// Fails with the reason when `linker` is not the pinned bpf-linker release loading the
/// nightly's libLLVM.
fn check_bpf_linker(linker: &Path, nightly: &Nightly) -> Result<()> {
    let out = Cmd::new(linker).arg("--version").probe()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`--version` failed ({}): {}",
            out.status,
            stderr.lines().next().unwrap_or_default()
        );
    }
    let version = String::from_utf8_lossy(&out.stdout);
    if version.split_whitespace().nth(1) != Some(BPF_LINKER_VERSION) {
        bail!("it is `{}`, not {BPF_LINKER_VERSION}", version.trim());
    }

    // `--version` loading is not enough: a build against another LLVM (static, or the
    // distribution's) starts fine but cannot read the nightly's bitcode.
    let Some(ldd) = cmd::find_on_path("ldd") else {
        progress!("bpf-linker: ldd not found, cannot check which libLLVM it loads");
        return Ok(());
    };
    let deps = Cmd::new(ldd).arg(linker).read()?;
    let Some(llvm) = deps.lines().find(|l| l.trim_start().starts_with("libLLVM")) else {
        bail!("it does not load a shared libLLVM (built with another LLVM?)");
    };
    let resolved = llvm
        .split_once("=>")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(Path::new);
    let in_nightly = resolved
        .and_then(|p| p.parent())
        .is_some_and(|dir| fs::canonicalize(dir).ok() == fs::canonicalize(&nightly.lib_dir).ok());
    if !in_nightly {
        bail!(
            "it loads `{}`, not the libLLVM in {}",
            llvm.trim(),
            nightly.lib_dir.display()
        );
    }
    Ok(())
}

/// Prepends the directory of `linker` to PATH (for our child processes) unless PATH already
/// finds that very file first.
fn put_first_on_path(linker: &Path) -> Result<()> {
    let first = cmd::find_on_path("bpf-linker").and_then(|p| fs::canonicalize(p).ok());
    if first.is_some() && first == fs::canonicalize(linker).ok() {
        return Ok(());
    }
    let dir = linker
        .parent()
        .context("bpf-linker path has no directory")?;
    let mut path = vec![dir.to_owned()];
    path.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    let path: OsString = env::join_paths(path).context("cannot extend PATH")?;
    env::set_var("PATH", path);
    progress!(
        "bpf-linker: {} put first on PATH for this run; add it to your PATH to build without xtask",
        dir.display()
    );
    Ok(())
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    }))
}

/// Mounts bpffs at /sys/fs/bpf unless it is there already, directly when root and through
/// sudo otherwise.
pub fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted()? {
        progress!("bpffs: mounted at {BPFFS}");
        return Ok(());
    }
    progress!("bpffs: mounting at {BPFFS} (the daemon pins its maps there)");
    cmd::as_root("mount", "mounting bpffs")?
        .args(["-t", "bpf", "bpf", BPFFS])
        .run()?;
    if !bpffs_mounted()? {
        bail!("mount reported success but {BPFFS} is still not a bpf mount");
    }
    Ok(())
}
