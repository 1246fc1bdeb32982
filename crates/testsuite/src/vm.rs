//! Linux kernels from Debian's packages, booted under `qemu-system-x86_64` (software
//! emulation: no KVM is assumed) to run test binaries on kernels other than the host's.
//!
//! - [`Kernel::fetch`]: a kernel package (`linux-image-*`, or the `linux-image-amd64`
//!   metapackage of a suite, resolved through its `Depends`) unpacked with the workplace's
//!   `debian-pkgs` into a cache directory keyed by package and version, with `depmod -b` run
//!   on its modules. A cached kernel is reused as is; when the archive cannot be reached, the
//!   newest cached version of the package is used.
//! - [`initramfs`]: a gzip'd newc cpio with Debian's static busybox, the module closure of
//!   [`GUEST_MODULES`] (`modprobe -d DIR --show-depends`, decompressed) and an `/init` that
//!   loads them, mounts the host's root read-only over 9p, a writable 9p share for results at
//!   the same path as on the host, and the scratch disk (ext4 with the `verity` feature) on
//!   `/tmp`, then runs the script `run.sh` of the results directory in a chroot of the host's
//!   root: the guest sees the host's binaries, libraries and build output at their own paths.
//!   Cached next to the kernel, keyed by a hash of everything in it.
//! - [`run`]: boots one guest with a fresh scratch disk, waits for it with a deadline and
//!   returns what the script's exit status and the console say. The qemu process is killed
//!   (by its pid) and the scratch image deleted when the run ends, whatever way it ends.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

/// Modules every guest loads (with their dependencies): virtio transport and disks, 9p for
/// the shared trees, and what the snapshotter uses (erofs, overlayfs, loop devices, ext4 for
/// writable layers and the scratch disk, dm-verity), and tun (the tap device of the CRI
/// test's pod network).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "9pnet_virtio",
    "9p",
    "erofs",
    "overlay",
    "loop",
    "ext4",
    "dm_verity",
    "tun",
];

/// Where kernels and initramfs images are cached unless `VM_CACHE` says otherwise.
pub const DEFAULT_CACHE: &str = "/var/cache/erofs-snapshotter-vm";

/// The cache directory: `$VM_CACHE` or [`DEFAULT_CACHE`].
pub fn cache_dir() -> PathBuf {
    std::env::var_os("VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

/// The workplace's shared tools directory (`debian-pkgs`): `$SHARED_TOOLS`, `../shared/tools`
/// next to the checkout, or `/work/shared/tools`.
pub fn shared_tools() -> Result<PathBuf> {
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cands = [
        std::env::var_os("SHARED_TOOLS").map(PathBuf::from),
        Some(checkout.join("../shared/tools")),
        Some(PathBuf::from("/work/shared/tools")),
    ];
    for c in cands.into_iter().flatten() {
        if c.join("debian-pkgs").is_file() {
            return Ok(c);
        }
    }
    bail!("the shared tools (debian-pkgs) are not found: set SHARED_TOOLS")
}

/// A kernel to fetch: a Debian suite and a package in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSpec {
    /// `bookworm`, `trixie`, `sid`, ...
    pub suite: String,
    /// `linux-image-amd64` (the suite's current kernel) or `linux-image-6.1.0-47-amd64`.
    pub package: String,
}

impl FromStr for KernelSpec {
    type Err = anyhow::Error;

    /// `SUITE` (its `linux-image-amd64`) or `SUITE:PACKAGE`.
    fn from_str(s: &str) -> Result<Self> {
        let (suite, package) = s.split_once(':').unwrap_or((s, "linux-image-amd64"));
        let ok = |x: &str| {
            !x.is_empty()
                && x.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.+_".contains(&b))
        };
        ensure!(
            ok(suite) && ok(package) && package.starts_with("linux-image-"),
            "a kernel is SUITE or SUITE:linux-image-..., not {s:?}"
        );
        Ok(KernelSpec {
            suite: suite.into(),
            package: package.into(),
        })
    }
}

impl std::fmt::Display for KernelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.suite, self.package)
    }
}

/// A kernel unpacked in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// What was asked for.
    pub spec: KernelSpec,
    /// The package holding the kernel (`linux-image-6.1.0-47-amd64`).
    pub package: String,
    /// Its Debian version (`6.1.170-3`).
    pub version: String,
    /// Its release (`uname -r`: `6.1.0-47-amd64`).
    pub release: String,
    /// Its cache directory: `vmlinuz` and `lib/modules/RELEASE`.
    pub dir: PathBuf,
}

const READY: &str = "ready";

impl Kernel {
    /// The kernel image.
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The modules directory.
    pub fn modules(&self) -> PathBuf {
        self.dir.join("lib/modules").join(&self.release)
    }

    /// Fetches `spec` into `cache` (see the module docs) with `tools/debian-pkgs`.
    pub fn fetch(spec: &KernelSpec, cache: &Path, tools: &Path) -> Result<Kernel> {
        let suite_dir = cache.join(&spec.suite);
        fs::create_dir_all(&suite_dir)?;
        let fetched = (|| -> Result<Kernel> {
            let (package, version) = resolve(spec, &suite_dir, tools)?;
            let dir = suite_dir.join(format!("{package}_{version}"));
            if !dir.join(READY).exists() {
                unpack(spec, &package, &version, &dir, tools)?;
            }
            Self::load(spec, &dir)
        })();
        match fetched {
            Ok(k) => Ok(k),
            Err(e) => match Self::newest_cached(spec, &suite_dir)? {
                Some(k) => {
                    eprintln!(
                        "vm: fetching {spec} failed ({e:#}); using the cached {} {}",
                        k.package, k.version
                    );
                    Ok(k)
                }
                None => Err(e.context(format!("fetching kernel {spec}"))),
            },
        }
    }

    fn load(spec: &KernelSpec, dir: &Path) -> Result<Kernel> {
        let ready = fs::read_to_string(dir.join(READY))
            .with_context(|| format!("{} is not a complete kernel", dir.display()))?;
        let mut f = ready.split_whitespace();
        let (Some(package), Some(version), Some(release)) = (f.next(), f.next(), f.next()) else {
            bail!("{}: malformed {READY} file", dir.display());
        };
        Ok(Kernel {
            spec: spec.clone(),
            package: package.into(),
            version: version.into(),
            release: release.into(),
            dir: dir.to_path_buf(),
        })
    }

    /// The most recently unpacked kernel of `spec` in the cache, if any.
    fn newest_cached(spec: &KernelSpec, suite_dir: &Path) -> Result<Option<Kernel>> {
        let meta = spec.package == "linux-image-amd64";
        let mut best: Option<(SystemTime, PathBuf)> = None;
        for e in fs::read_dir(suite_dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let matches = if meta {
                name.starts_with("linux-image-")
            } else {
                name.starts_with(&format!("{}_", spec.package))
            };
            let ready = e.path().join(READY);
            if matches
                && let Ok(m) = fs::metadata(&ready).and_then(|m| m.modified())
                && best.as_ref().is_none_or(|(t, _)| m > *t)
            {
                best = Some((m, e.path()));
            }
        }
        best.map(|(_, d)| Self::load(spec, &d)).transpose()
    }
}

/// Runs `debian-pkgs ROOT SUITE PKG` and returns the version it unpacked.
fn debian_pkgs(tools: &Path, root: &Path, suite: &str, pkg: &str) -> Result<String> {
    let out = Command::new(tools.join("debian-pkgs"))
        .arg(root)
        .arg(suite)
        .arg(pkg)
        .stdin(Stdio::null())
        .output()
        .context("running debian-pkgs")?;
    ensure!(
        out.status.success(),
        "debian-pkgs {suite} {pkg} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{pkg} ")))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("debian-pkgs printed no version for {pkg}: {text}"))
}

/// The package and version holding the kernel of `spec`: the metapackage's `Depends`
/// (`linux-image-X (= V)`) for `linux-image-amd64`, the package itself otherwise.
fn resolve(spec: &KernelSpec, suite_dir: &Path, tools: &Path) -> Result<(String, String)> {
    let tmp = tempfile::Builder::new()
        .prefix(".resolve-")
        .tempdir_in(suite_dir)?;
    let version = debian_pkgs(tools, tmp.path(), &spec.suite, &spec.package)?;
    if spec.package != "linux-image-amd64" {
        return Ok((spec.package.clone(), version));
    }
    let deb = cached_deb(&spec.suite, &spec.package, &version)?;
    let depends = deb_field(&deb, "Depends")?;
    parse_kernel_depends(&depends).with_context(|| {
        format!(
            "{}: no linux-image dependency in {depends:?}",
            deb.display()
        )
    })
}

/// The `.deb` of `pkg` `version` that debian-pkgs left in its apt cache (its control file
/// is what says which packages make up a kernel).
fn cached_deb(suite: &str, pkg: &str, version: &str) -> Result<PathBuf> {
    let archives = std::env::var_os("DEBIAN_PKGS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/debian-pkgs"))
        .join(suite)
        .join("archives");
    fs::read_dir(&archives)
        .with_context(|| format!("reading {}", archives.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with(&format!("{pkg}_"))
                && n.ends_with(".deb")
                && deb_field(p, "Version").is_ok_and(|v| v == version)
        })
        .with_context(|| format!("no {pkg} {version} .deb in {}", archives.display()))
}

fn deb_field(deb: &Path, field: &str) -> Result<String> {
    let out = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg(field)
        .output()
        .context("running dpkg-deb")?;
    ensure!(out.status.success(), "dpkg-deb -f {} failed", deb.display());
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The `(name, version)` pins of a `Depends` field: `name (= version)` entries (the first
/// alternative of each).
fn pinned_depends(depends: &str) -> Vec<(String, String)> {
    depends
        .split(',')
        .filter_map(|dep| {
            let first = dep.split('|').next()?.trim();
            let (name, rest) = first.split_once(' ')?;
            let version = rest.trim().strip_prefix("(=")?.strip_suffix(')')?.trim();
            (!version.is_empty()).then(|| (name.to_string(), version.to_string()))
        })
        .collect()
}

/// `linux-image-6.1.0-47-amd64 (= 6.1.170-3)` in a `Depends` field: the package and the
/// version it pins.
fn parse_kernel_depends(depends: &str) -> Option<(String, String)> {
    pinned_depends(depends)
        .into_iter()
        .find(|(name, _)| name.starts_with("linux-image-"))
}

/// The packages a split kernel package (Debian's kernels since 6.17: `linux-image-R` holds
/// nothing but depends on `linux-binary-R` with the kernel image, `linux-modules-R` and
/// `linux-base-R` with `config` and `modules.builtin`) pins to its own `version`.
fn kernel_parts(depends: &str, version: &str) -> Vec<String> {
    pinned_depends(depends)
        .into_iter()
        .filter(|(name, v)| {
            v == version
                && ["linux-binary-", "linux-modules-", "linux-base-"]
                    .iter()
                    .any(|p| name.starts_with(p))
        })
        .map(|(name, _)| name)
        .collect()
}

/// The kernel image in an unpacked package tree and its release: `/boot/vmlinuz-R` (Debian
/// until 6.16) or `/usr/lib/modules/R/vmlinuz` (the split packages).
fn find_vmlinuz(root: &Path) -> Result<Option<(PathBuf, String)>> {
    if let Ok(rd) = fs::read_dir(root.join("boot")) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(release) = n.strip_prefix("vmlinuz-") {
                return Ok(Some((e.path(), release.to_string())));
            }
        }
    }
    for mods in ["lib/modules", "usr/lib/modules"] {
        let Ok(rd) = fs::read_dir(root.join(mods)) else {
            continue;
        };
        for e in rd.flatten() {
            if e.path().join("vmlinuz").is_file() {
                let release = e.file_name().to_string_lossy().into_owned();
                return Ok(Some((e.path().join("vmlinuz"), release)));
            }
        }
    }
    Ok(None)
}

/// Unpacks kernel `package` into `dir`: `vmlinuz`, `config`, `lib/modules/RELEASE`
/// (depmod'ed) and a `ready` file naming package, version and release, written last.
fn unpack(spec: &KernelSpec, package: &str, version: &str, dir: &Path, tools: &Path) -> Result<()> {
    let parent = dir.parent().context("cache dir")?;
    let tmp = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(parent)?;
    let root = tmp.path().join("root");
    let got = debian_pkgs(tools, &root, &spec.suite, package)?;
    ensure!(
        got == version,
        "{package}: wanted version {version}, the archive has {got}"
    );
    if find_vmlinuz(&root)?.is_none() {
        let deb = cached_deb(&spec.suite, package, version)?;
        let parts = kernel_parts(&deb_field(&deb, "Depends")?, version);
        ensure!(
            !parts.is_empty(),
            "{package} {version} has no kernel image and depends on no linux-binary-/linux-modules- package of its version"
        );
        for p in &parts {
            let got = debian_pkgs(tools, &root, &spec.suite, p)?;
            ensure!(
                got == version,
                "{p}: wanted version {version} (as {package} pins), the archive has {got}"
            );
        }
    }
    let (vmlinuz, release) = find_vmlinuz(&root)?.with_context(|| {
        format!("{package} (and its parts) has no /boot/vmlinuz-* or lib/modules/*/vmlinuz")
    })?;
    // Merged-/usr packages (trixie on) ship modules under /usr/lib/modules.
    let modules = [
        root.join("lib/modules").join(&release),
        root.join("usr/lib/modules").join(&release),
    ]
    .into_iter()
    .find(|p| p.join("kernel").is_dir())
    .with_context(|| format!("{package} has no modules for {release}"))?;
    let out = tmp.path().join("kernel");
    fs::create_dir_all(out.join("lib/modules"))?;
    fs::rename(&vmlinuz, out.join("vmlinuz"))?;
    let config = [
        root.join("boot").join(format!("config-{release}")),
        modules.join("config"),
    ]
    .into_iter()
    .find(|p| p.is_file());
    if let Some(cfg) = config {
        fs::copy(cfg, out.join("config"))?;
    }
    fs::rename(&modules, out.join("lib/modules").join(&release))?;
    let st = Command::new("depmod")
        .arg("-b")
        .arg(&out)
        .arg(&release)
        .status()
        .context("running depmod (kmod)")?;
    ensure!(st.success(), "depmod -b {} {release} failed", out.display());
    fs::write(out.join(READY), format!("{package} {version} {release}\n"))?;
    let _ = fs::remove_dir_all(dir);
    fs::rename(&out, dir)?;
    Ok(())
}

/// The module files to load, in load order, for `names` and their dependencies.
fn module_closure(kernel: &Kernel, names: &[&str]) -> Result<Vec<PathBuf>> {
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for name in names {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(&kernel.dir)
            .arg("-S")
            .arg(&kernel.release)
            .arg("--show-depends")
            .arg(name)
            .output()
            .context("running modprobe (kmod)")?;
        ensure!(
            out.status.success(),
            "kernel {} has no module {name} (modprobe --show-depends: {})",
            kernel.release,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "insmod /path/mod.ko[.xz] [options]" or "builtin name".
            let mut w = line.split_whitespace();
            if w.next() == Some("insmod")
                && let Some(p) = w.next()
                && seen.insert(p.to_string())
            {
                order.push(PathBuf::from(p));
            }
        }
    }
    Ok(order)
}

/// A module file's contents, decompressed (`.ko.xz`, `.ko.zst`, `.ko.gz`, `.ko`).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(t) => {
            let out = Command::new(t)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {t}"))?;
            ensure!(out.status.success(), "{t} -dc {} failed", path.display());
            Ok(out.stdout)
        }
    }
}

/// The guest's `/init`. Kernel command line: `vm.out=DIR` (the results share's path on the
/// host, where the guest mounts it too). Writes `DIR/exit-status` (the script's status) and
/// `DIR/boot-seconds` (uptime when userspace started).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# The loopback interface (local registries listen on 127.0.0.1).
ip link set lo up
boot=$(cut -d' ' -f1 /proc/uptime)
echo "vm: userspace at ${boot}s"
fail() { echo "vm: $*"; sync; poweroff -f; sleep 10; }
while read -r m; do
  insmod "$m" 2>/dev/null || echo "vm: insmod $m failed (ignored: a driver for absent hardware)"
done < /modules.list
out=
for a in $(cat /proc/cmdline); do case "$a" in vm.out=*) out=${a#vm.out=};; esac; done
[ -n "$out" ] || fail "no vm.out= on the kernel command line"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /newroot ||
  fail "mounting the host root (9p) failed"
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=262144 results "/newroot$out" ||
  fail "mounting the results share (9p) at $out failed"
echo "$boot" > "/newroot$out/boot-seconds"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs shm /newroot/dev/shm
mount -t tmpfs run /newroot/run
if [ -b /dev/vda ]; then
  mount -t ext4 /dev/vda /newroot/tmp || fail "mounting the scratch disk on /tmp failed"
else
  mount -t tmpfs tmp /newroot/tmp
fi
chmod 1777 /newroot/tmp
mount -t tmpfs vartmp /newroot/var/tmp
echo "vm: $(cut -d' ' -f1 /proc/uptime)s: running $out/run.sh"
# The host's root is moved onto / (as switch_root does) rather than chrooted into below it:
# the kernel refuses user namespaces to a chrooted process (EPERM), and setns(2) into a mount
# namespace (nsenter) puts the caller at that namespace's root. /init keeps the initramfs as
# its own root (for poweroff) and the moved tree as its working directory.
cd /newroot
mount --move . / || fail "moving the host root onto / failed"
chroot . /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/tmp TMPDIR=/tmp LANG=C.UTF-8 VM_OUT="$out" /bin/sh "$out/run.sh"
st=$?
echo "$st" > ".$out/exit-status"
echo "vm: $(cut -d' ' -f1 /proc/uptime)s: run.sh exited with $st"
sync
umount ./tmp 2>/dev/null
poweroff -f
"#;

/// Builds (or finds in the kernel's cache directory) the initramfs for `kernel` with the
/// static `busybox` given (Debian's busybox-static).
pub fn initramfs(kernel: &Kernel, busybox: &Path) -> Result<PathBuf> {
    let mods = module_closure(kernel, GUEST_MODULES)?;
    let bb = fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let mut h = Sha256::new();
    h.update(INIT.as_bytes());
    h.update(&bb);
    for m in &mods {
        h.update(m.as_os_str().as_encoded_bytes());
        h.update([0]);
    }
    let key = hex::encode(&h.finalize()[..8]);
    let path = kernel.dir.join(format!("initramfs-{key}.cpio.gz"));
    if path.exists() {
        return Ok(path);
    }
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        cpio.dir(d);
    }
    cpio.file("bin/busybox", 0o755, &bb);
    cpio.file("init", 0o755, INIT.as_bytes());
    let mut list = String::new();
    for (i, m) in mods.iter().enumerate() {
        let base = m.file_name().unwrap_or_default().to_string_lossy();
        let base = base
            .trim_end_matches(".xz")
            .trim_end_matches(".zst")
            .trim_end_matches(".gz");
        let name = format!("lib/modules/{i:03}-{base}");
        cpio.file(&name, 0o644, &module_bytes(m)?);
        writeln!(list, "/{name}").unwrap();
    }
    cpio.file("modules.list", 0o644, list.as_bytes());
    let tmp = path.with_extension("tmp");
    let mut gz = flate2::write::GzEncoder::new(File::create(&tmp)?, flate2::Compression::fast());
    gz.write_all(&cpio.finish())?;
    gz.finish()?.sync_all()?;
    fs::rename(&tmp, &path)?;
    Ok(path)
}

/// A newc ("070701") cpio archive in memory.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}

/// One guest run.
#[derive(Debug, Clone)]
pub struct VmOpts {
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// The whole run (boot, script, power-off) must end within this.
    pub timeout: Duration,
    /// Size of the scratch disk (ext4, `-O verity`) mounted on the guest's `/tmp`.
    pub scratch_bytes: u64,
    /// The guest must reach userspace (its `/init` writes `boot-seconds`) within this, else
    /// the run ends with [`BootHang`] (it takes 2-4 s; once in a while under software
    /// emulation a guest hangs before printing anything).
    pub boot_timeout: Duration,
    /// Extra kernel command line arguments.
    pub cmdline: String,
}

impl Default for VmOpts {
    fn default() -> Self {
        VmOpts {
            memory_mib: 1536,
            cpus: 2,
            timeout: Duration::from_secs(1800),
            scratch_bytes: 4 << 30,
            boot_timeout: Duration::from_secs(120),
            cmdline: String::new(),
        }
    }
}

/// What a guest run gave.
#[derive(Debug)]
pub struct VmRun {
    /// `run.sh`'s exit status, `None` when the guest did not get to write it.
    pub status: Option<i32>,
    /// Guest uptime when `/init` started.
    pub boot_seconds: Option<f64>,
    /// Host time from starting qemu to its exit.
    pub elapsed: Duration,
    /// The serial console (kernel messages, `/init`'s and the script's output).
    pub console: PathBuf,
    /// qemu's own messages.
    pub qemu_log: PathBuf,
}

impl VmRun {
    /// The last `n` lines of the console.
    pub fn console_tail(&self, n: usize) -> String {
        crate::process::log_tail(&self.console, n)
    }
}

/// A running qemu: killed (SIGKILL, by its pid) and reaped when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Boots `kernel` with `initramfs`, with `out` (a host directory, created if missing) shared
/// writable at the same path in the guest and `script` written to `out/run.sh`, and waits for
/// the guest to power off (the qemu process is killed at `opts.timeout`). The scratch disk is
/// created in a temporary directory and removed afterwards.
pub fn run(
    kernel: &Kernel,
    initramfs: &Path,
    out: &Path,
    script: &str,
    opts: &VmOpts,
) -> Result<VmRun> {
    fs::create_dir_all(out)?;
    let out = fs::canonicalize(out)?;
    for stale in ["exit-status", "boot-seconds", "console.log", "qemu.log"] {
        let _ = fs::remove_file(out.join(stale));
    }
    let run_sh = out.join("run.sh");
    fs::write(&run_sh, script)?;
    fs::set_permissions(&run_sh, fs::Permissions::from_mode(0o755))?;
    let scratch_dir = tempfile::Builder::new().prefix("vm-scratch-").tempdir()?;
    let scratch = scratch_dir.path().join("scratch.img");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "verity", "-E", "nodiscard", "-b", "4096"])
        .arg(&scratch)
        .arg(format!("{}k", opts.scratch_bytes / 1024))
        .stdout(Stdio::null())
        .status()
        .context("running mkfs.ext4 (e2fsprogs)")?;
    ensure!(st.success(), "mkfs.ext4 of the scratch disk failed");

    let console = out.join("console.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine",
        "q35",
        "-cpu",
        "max",
        // One host thread for all vCPUs: with multi-threaded TCG, sid's kernel oopsed now
        // and then on a half-patched static-branch NOP (an int3 or `0f <1f> 44 00 00` at
        // RIP, in get_page_from_freelist, allocate_slab): the guest's cross-CPU text patching
        // racing TCG's translated code. Single-threaded TCG serialises the vCPUs.
        "-accel",
        "tcg,thread=single",
        "-nodefaults",
        "-no-reboot",
    ])
    .args(["-display", "none", "-monitor", "none", "-serial"])
    .arg(format!("file:{}", console.display()))
    .arg("-m")
    .arg(opts.memory_mib.to_string())
    .arg("-smp")
    .arg(opts.cpus.to_string())
    .arg("-kernel")
    .arg(kernel.vmlinuz())
    .arg("-initrd")
    .arg(initramfs)
    .arg("-append")
    .arg(format!(
        "console=ttyS0 panic=-1 quiet loglevel=4 vm.out={} {}",
        out.display(),
        opts.cmdline
    ))
    .arg("-virtfs")
    .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
    .arg("-virtfs")
    .arg(format!(
        "local,path={},mount_tag=results,security_model=none,multidevs=remap",
        out.display()
    ))
    .arg("-drive")
    .arg(format!(
        "file={},format=raw,if=virtio,cache=unsafe,discard=unmap",
        scratch.display()
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(File::create(out.join("qemu.log"))?);
    let t0 = Instant::now();
    let mut qemu = Qemu(
        cmd.spawn()
            .context("starting qemu-system-x86_64 (Debian package qemu-system-x86)")?,
    );
    let deadline = t0 + opts.timeout;
    let exited = loop {
        if let Some(st) = qemu.0.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            break None;
        }
        if t0.elapsed() >= opts.boot_timeout && !out.join("boot-seconds").exists() {
            drop(qemu);
            drop(scratch_dir);
            return Err(anyhow::Error::new(BootHang {
                after: opts.boot_timeout,
                console_tail: crate::process::log_tail(&console, 20),
            }));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(qemu);
    let elapsed = t0.elapsed();
    drop(scratch_dir);
    let status = fs::read_to_string(out.join("exit-status"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let boot_seconds = fs::read_to_string(out.join("boot-seconds"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let run = VmRun {
        status,
        boot_seconds,
        elapsed,
        console,
        qemu_log: out.join("qemu.log"),
    };
    match exited {
        None => bail!(
            "the guest did not power off within {:?}; killed qemu. Console tail:\n{}",
            opts.timeout,
            run.console_tail(40)
        ),
        Some(st) if run.status.is_none() => bail!(
            "qemu exited ({st}) before the guest's script finished. Console tail:\n{}\nqemu: {}",
            run.console_tail(40),
            read_text(&run.qemu_log).trim()
        ),
        Some(_) => Ok(run),
    }
}

/// A guest that did not reach userspace within [`VmOpts::boot_timeout`] (qemu killed).
#[derive(Debug)]
pub struct BootHang {
    /// The boot timeout.
    pub after: Duration,
    /// The console's last lines.
    pub console_tail: String,
}

impl std::fmt::Display for BootHang {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the guest did not reach userspace within {:?}; killed qemu. Console tail:\n{}",
            self.after, self.console_tail
        )
    }
}

impl std::error::Error for BootHang {}

/// Counts of a libtest run's results, from its output.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Tests passed.
    pub passed: u32,
    /// Tests failed (a binary that gave no summary counts as one failure).
    pub failed: u32,
    /// Tests ignored.
    pub ignored: u32,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }
}

/// The tally of libtest output (`test result: ok. 3 passed; 1 failed; 0 ignored; ...`); an
/// output without a summary line counts as one failure.
pub fn tally(output: &str) -> Tally {
    let mut t = Tally::default();
    let mut found = false;
    for line in output.lines() {
        let Some(rest) = line.strip_prefix("test result: ") else {
            continue;
        };
        found = true;
        for part in rest.split(';') {
            let mut w = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (w.next(), w.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u32>() else { continue };
            match what {
                "passed" => t.passed += n,
                "failed" => t.failed += n,
                "ignored" => t.ignored += n,
                _ => {}
            }
        }
    }
    if !found {
        t.failed += 1;
    }
    t
}

/// Reads a whole file as (lossy) text.
pub fn read_text(path: &Path) -> String {
    let mut s = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut s);
    }
    String::from_utf8_lossy(&s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_specs() {
        let s: KernelSpec = "bookworm".parse().unwrap();
        assert_eq!(
            (s.suite.as_str(), s.package.as_str()),
            ("bookworm", "linux-image-amd64")
        );
        let s: KernelSpec = "sid:linux-image-6.1.0-47-amd64".parse().unwrap();
        assert_eq!(s.package, "linux-image-6.1.0-47-amd64");
        assert!("sid:bash".parse::<KernelSpec>().is_err());
        assert!("../x".parse::<KernelSpec>().is_err());
        assert!("".parse::<KernelSpec>().is_err());
    }

    #[test]
    fn metapackage_depends() {
        assert_eq!(
            parse_kernel_depends("linux-image-6.1.0-47-amd64 (= 6.1.170-3)"),
            Some(("linux-image-6.1.0-47-amd64".into(), "6.1.170-3".into()))
        );
        assert_eq!(
            parse_kernel_depends("foo, linux-image-6.19-amd64 (= 6.19.2-1) | bar"),
            Some(("linux-image-6.19-amd64".into(), "6.19.2-1".into()))
        );
        assert_eq!(parse_kernel_depends("linux-image-6.1.0-47-amd64"), None);
        // sid's metapackage names linux-base-amd64 first.
        assert_eq!(
            parse_kernel_depends(
                "linux-base-amd64 (= 7.2.13-1), linux-image-7.2.13+deb14-amd64 (= 7.2.13-1)"
            ),
            Some(("linux-image-7.2.13+deb14-amd64".into(), "7.2.13-1".into()))
        );
    }

    #[test]
    fn split_kernel_parts() {
        // sid's linux-image-7.2.13+deb14-amd64 (Debian's kernels since 6.17).
        let depends = "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, \
                       linux-base-7.2.13+deb14-amd64 (= 7.2.13-1), linux-binary-7.2.13+deb14-amd64 (= 7.2.13-1), \
                       linux-modules-7.2.13+deb14-amd64 (= 7.2.13-1)";
        assert_eq!(
            kernel_parts(depends, "7.2.13-1"),
            [
                "linux-base-7.2.13+deb14-amd64",
                "linux-binary-7.2.13+deb14-amd64",
                "linux-modules-7.2.13+deb14-amd64"
            ]
        );
        assert!(kernel_parts(depends, "7.2.12-1").is_empty());
        // bookworm's: a whole package, no parts.
        assert!(kernel_parts("kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool", "6.1.176-1").is_empty());
    }

    #[test]
    fn libtest_tallies() {
        let out = "test a ... ok\ntest result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 0.1s\n\
                   test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out\n";
        assert_eq!(
            tally(out),
            Tally {
                passed: 4,
                failed: 2,
                ignored: 1
            }
        );
        assert_eq!(tally("thread main panicked\n").failed, 1);
    }

    #[test]
    fn cpio_is_newc() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"#!/bin/sh\n");
        let b = c.finish();
        assert_eq!(&b[..6], b"070701");
        assert_eq!(b.len() % 4, 0);
        assert!(b.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
