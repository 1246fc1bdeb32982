//! Shared helpers: fixtures, mounts, tree snapshots and oracle runs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use erofs_image::{BuildOptions, Image};
use sha2::{Digest, Sha256};

pub fn tool(env: &str, default: &str) -> PathBuf {
    let p = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    assert!(
        p.exists(),
        "{} not found: run scripts/setup (or set {env}) to install the test oracles",
        p.display()
    );
    p
}

/// fsck.erofs from erofs-utils 1.9 (Debian sid, through ../shared/tools/erofs-utils-new).
pub fn fsck_new() -> PathBuf {
    tool("FSCK_EROFS_NEW", "/opt/erofs-utils-new/bin/fsck.erofs")
}
/// mkfs.erofs 1.9.
pub fn mkfs_new() -> PathBuf {
    tool("MKFS_EROFS_NEW", "/opt/erofs-utils-new/bin/mkfs.erofs")
}
/// Debian 12's fsck.erofs 1.5 (4096-byte images only).
pub fn fsck_old() -> PathBuf {
    tool("FSCK_EROFS_OLD", "/usr/bin/fsck.erofs")
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sh(script: &str) -> String {
    run(Command::new("sh").arg("-ec").arg(script))
}

/// Check an image with our checker and with the fsck.erofs oracles that can read it.
/// `device` is the tar of a two-file index image.
pub fn fsck_all(image: &Path, device: Option<&Path>) {
    let report = erofs_image::check::check_image(
        File::open(image).unwrap(),
        device
            .map(|d| vec![Box::new(File::open(d).unwrap()) as Box<dyn erofs_image::ReadAt>])
            .unwrap_or_default(),
    );
    assert!(
        report.is_ok(),
        "our checker on {}: {:#?}",
        image.display(),
        report.findings
    );
    let img = Image::open(File::open(image).unwrap()).unwrap();
    let bs = img.block_size();
    let flat_index = img.device_slots().len() == 1 && device.is_none();
    if !flat_index {
        // fsck.erofs cannot read the single-file [index][tar] form ("invalid device id 1");
        // the split form is checked instead by callers.
        let mut c = Command::new(fsck_new());
        if let Some(d) = device {
            c.arg(format!("--device={}", d.display()));
        }
        run(c.arg(image));
    }
    if bs == 4096 {
        run(Command::new(fsck_old()).arg(image));
    }
}

/// A mount that is detached when dropped, even when the test fails.
pub struct Mount {
    pub dir: tempfile::TempDir,
}

impl Mount {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(self.dir.path(), rustix::mount::UnmountFlags::DETACH);
    }
}

/// Mount an image file-backed (no loop device), with extra devices as `device=` options.
pub fn mount_erofs(image: &Path, devices: &[&Path]) -> Mount {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = String::new();
    for d in devices {
        if !opts.is_empty() {
            opts.push(',');
        }
        opts.push_str(&format!("device={}", d.display()));
    }
    let data = std::ffi::CString::new(opts).unwrap();
    rustix::mount::mount(
        image,
        dir.path(),
        "erofs",
        rustix::mount::MountFlags::RDONLY,
        data.as_c_str(),
    )
    .unwrap_or_else(|e| panic!("mount {}: {e}", image.display()));
    Mount { dir }
}

/// An overlay of read-only lowers, top first.
pub fn mount_overlay(lowers: &[&Path]) -> Mount {
    mount_overlay_opts(lowers, "")
}

/// A writable overlay over `lowers` with the given upper and work directories.
pub fn mount_overlay_rw(lowers: &[&Path], upper: &Path, work: &Path) -> Mount {
    mount_overlay_opts(
        lowers,
        &format!(",upperdir={},workdir={}", upper.display(), work.display()),
    )
}

fn mount_overlay_opts(lowers: &[&Path], extra: &str) -> Mount {
    let dir = tempfile::tempdir().unwrap();
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let data = std::ffi::CString::new(format!("lowerdir={}{extra}", lowerdir.join(":"))).unwrap();
    let flags = if extra.is_empty() {
        rustix::mount::MountFlags::RDONLY
    } else {
        rustix::mount::MountFlags::empty()
    };
    rustix::mount::mount("overlay", dir.path(), "overlay", flags, data.as_c_str())
        .unwrap_or_else(|e| panic!("overlay mount: {e}"));
    Mount { dir }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub size: Option<u64>,
    pub content: Option<String>,
    pub link: Option<Vec<u8>>,
    pub rdev: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub nlink: u64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Compare {
    /// Seconds-only mtimes (tar formats without nanoseconds).
    pub ignore_nsec: bool,
    /// Skip xattrs (formats that cannot carry them).
    pub ignore_xattrs: bool,
    /// Skip the root directory's own attributes.
    pub ignore_root: bool,
    /// Skip `trusted.overlay.origin` (added by the builder to whiteout parents).
    pub ignore_origin: bool,
    /// Skip directories' nlink (overlayfs reports 1 for merged directories).
    pub ignore_dir_nlink: bool,
}

fn hash_file(p: &Path) -> String {
    let mut f = File::open(p).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

pub fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 65536];
    let n = match rustix::fs::llistxattr(p, &mut names[..]) {
        Ok(n) => n,
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&c| c == 0).filter(|n| !n.is_empty()) {
        let c = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // user.* xattrs on symlinks are listed but unreadable (VFS rule): skip those.
        if let Ok(k) = rustix::fs::lgetxattr(p, c.as_c_str(), &mut v[..]) {
            v.truncate(k);
            out.push((name.to_vec(), v));
        }
    }
    out.sort();
    out
}

/// Every path under `root` (relative, "" for root) with its attributes.
pub fn snapshot(root: &Path, cmp: Compare) -> BTreeMap<Vec<u8>, Info> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_file() {
            'f'
        } else {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else if ft.is_fifo() {
                'p'
            } else {
                's'
            }
        };
        let mut xa = if cmp.ignore_xattrs {
            Vec::new()
        } else {
            xattrs(&p)
        };
        if cmp.ignore_origin {
            xa.retain(|(k, _)| k != b"trusted.overlay.origin");
        }
        let key = rel.as_os_str().as_bytes().to_vec();
        let info = Info {
            kind,
            mode: md.permissions().mode(),
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            mtime_nsec: if cmp.ignore_nsec { 0 } else { md.mtime_nsec() },
            size: if kind == 'd' { None } else { Some(md.size()) },
            content: (kind == 'f').then(|| hash_file(&p)),
            link: (kind == 'l').then(|| fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()),
            rdev: md.rdev(),
            xattrs: xa,
            nlink: if cmp.ignore_dir_nlink && kind == 'd' {
                0
            } else {
                md.nlink()
            },
        };
        if !(cmp.ignore_root && key.is_empty()) {
            out.insert(key, info);
        }
        if kind == 'd' {
            let mut names: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                stack.push(rel.join(n));
            }
        }
    }
    out
}

/// Assert two snapshots are equal, listing every difference.
pub fn assert_same_tree(expected: &BTreeMap<Vec<u8>, Info>, got: &BTreeMap<Vec<u8>, Info>) {
    let mut diffs = Vec::new();
    for (k, v) in expected {
        match got.get(k) {
            None => diffs.push(format!("missing: {:?}", String::from_utf8_lossy(k))),
            Some(g) if g != v => diffs.push(format!(
                "differs: {:?}\n  want {v:?}\n  got  {g:?}",
                String::from_utf8_lossy(k)
            )),
            _ => {}
        }
    }
    for k in got.keys() {
        if !expected.contains_key(k) {
            diffs.push(format!("unexpected: {:?}", String::from_utf8_lossy(k)));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A directory with every kind of entry the issue lists. Root-only operations (mknod, chown,
/// trusted.* xattrs) are used.
pub fn rich_fixture(dir: &Path) {
    let long_name = "L".repeat(255);
    let deep = (0..12)
        .map(|i| format!("deep-directory-level-{i:02}"))
        .collect::<Vec<_>>()
        .join("/");
    let script = format!(
        r#"
cd '{dir}'
mkdir -p a/b/c '{deep}' sticky setgid
chmod 1777 sticky; chmod 2755 setgid
printf hello > a/hello
: > a/empty
head -c 4096 /dev/urandom > a/exact4096
head -c 4097 /dev/urandom > a/over4096
head -c 100000 /dev/urandom > a/b/random
printf 'deep file' > '{deep}/file'
printf x > '{long_name}'
for n in '!bang' '#hash' '-dash' '+plus' '.hidden' '...' '.-x' 'spaces in name' 'ünï'; do printf '%s' "$n" > "a/$n"; done
ln -s hello a/link
ln -s /nonexistent/dangling a/dangling
ln -s "$(printf 't%.0s' $(seq 1 4095))" a/longlink
ln a/hello a/hardlink1; ln a/hello a/b/hardlink2
mknod a/chr c 1 3; mknod a/blk b 8 1; mknod a/bigdev c 259 65536; mkfifo a/fifo
printf s > a/suid; chmod 4755 a/suid
printf u > a/bigid; chown 100000:200000 a/bigid
touch -h -d '2020-01-02 03:04:05.123456789' a/hello a/link a/b
touch -d '1960-05-06 07:08:09.5' a/old
setfattr -n user.plain -v value a/hello
setfattr -n user.binary -v 0x00ff10 a/exact4096
setfattr -n trusted.t -v tvalue a/b
setfattr -n security.capability -v 0x0100000200200000000000000000000000000000 a/suid
for i in $(seq 1 40); do setfattr -n user.many$i -v "value number $i" a/empty; done
setfattr -n user.big -v "$(head -c 3000 /dev/zero | tr '\0' 'x')" a/over4096
chmod 0640 a/b/random; chmod 0700 a/b/c
touch -d '2021-06-07 08:09:10.987654321' a/b/c
"#,
        dir = dir.display()
    );
    sh(&script);
}

pub fn tar_dir(src: &Path, out: &Path, format: &str, extra: &[&str]) {
    let mut c = Command::new("tar");
    c.arg(format!("--format={format}"))
        .arg("--numeric-owner")
        .arg("-C")
        .arg(src);
    c.args(extra).arg("-cf").arg(out).arg(".");
    run(&mut c);
}

pub fn build_full(tar: &Path, out: &Path, opts: &BuildOptions) {
    let f = File::create(out).unwrap();
    erofs_image::tar_to_image(File::open(tar).unwrap(), f, opts).unwrap();
}

pub fn build_index_file(tar: &Path, out: &Path, opts: &BuildOptions) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(out)
        .unwrap();
    erofs_image::tar_to_index_file(File::open(tar).unwrap(), &f, opts).unwrap();
}

pub fn oci_opts() -> BuildOptions {
    BuildOptions {
        oci_whiteouts: true,
        uuid: [7; 16],
        ..Default::default()
    }
}

pub fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// A ustar header block written byte by byte (for archives TarWriter would refuse to make).
pub fn raw_header(name: &[u8], typeflag: u8, size: u64, link: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    tar_checksum(&mut h);
    h.to_vec()
}

/// Recompute a header block's checksum after editing it.
pub fn tar_checksum(h: &mut [u8; 512]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&c| c as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// Peak resident memory of this process so far, in bytes.
pub fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb << 10
}
