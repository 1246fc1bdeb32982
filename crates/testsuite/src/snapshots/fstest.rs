//! Filesystem appliers and directory comparison (in the spirit of continuity's `fstest`).
//!
//! An applier is a list of [`Op`]s run against a root (a mounted snapshot, or a flat
//! reference directory). [`check_equal`] compares two trees entry by entry: type, mode
//! (with setuid, setgid, sticky), owner, size and content hash of regular files, symlink
//! targets, device numbers, extended attributes (except overlayfs' own `trusted.overlay.*`)
//! and hard-link groups. Times are not compared (the reference tree is written at other
//! moments than the snapshot), and neither are directory sizes.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rustix::fs::{FileType, Mode as FMode, XattrFlags};
use sha2::{Digest, Sha256};

/// One change to a tree. Paths are relative to the root (a leading `/` is ignored).
#[derive(Debug, Clone)]
pub enum Op {
    /// Write (create or truncate) a file, then chmod it.
    File(String, Vec<u8>, u32),
    /// `mkdir -p`, then chmod.
    Dir(String, u32),
    /// `rm -rf` (missing is fine).
    RemoveAll(String),
    /// lchown.
    Chown(String, u32, u32),
    /// chmod (full mode bits, setuid and friends included).
    Chmod(String, u32),
    /// rename(from, to).
    Rename(String, String),
    /// link(existing, new).
    Link(String, String),
    /// symlink(target, path).
    Symlink(String, String),
    /// mknod of a character device (path, major, minor, permission bits).
    CharDev(String, u32, u32, u32),
    /// mkfifo (path, permission bits).
    Fifo(String, u32),
    /// lsetxattr (path, name, value).
    Xattr(String, String, Vec<u8>),
}

/// [`Op::File`].
pub fn file(p: &str, content: &[u8], mode: u32) -> Op {
    Op::File(p.into(), content.to_vec(), mode)
}
/// [`Op::Dir`].
pub fn dir(p: &str, mode: u32) -> Op {
    Op::Dir(p.into(), mode)
}
/// [`Op::RemoveAll`].
pub fn remove_all(p: &str) -> Op {
    Op::RemoveAll(p.into())
}
/// [`Op::Chown`].
pub fn chown(p: &str, uid: u32, gid: u32) -> Op {
    Op::Chown(p.into(), uid, gid)
}
/// [`Op::Chmod`].
pub fn chmod(p: &str, mode: u32) -> Op {
    Op::Chmod(p.into(), mode)
}
/// [`Op::Rename`].
pub fn rename(from: &str, to: &str) -> Op {
    Op::Rename(from.into(), to.into())
}
/// [`Op::Link`].
pub fn link(existing: &str, new: &str) -> Op {
    Op::Link(existing.into(), new.into())
}
/// [`Op::Symlink`].
pub fn symlink(target: &str, path: &str) -> Op {
    Op::Symlink(target.into(), path.into())
}

fn at(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

/// Runs `ops` against `root`.
pub fn apply(root: &Path, ops: &[Op]) -> Result<()> {
    for op in ops {
        apply_one(root, op).with_context(|| format!("applying {op:?} in {}", root.display()))?;
    }
    Ok(())
}

fn apply_one(root: &Path, op: &Op) -> Result<()> {
    match op {
        Op::File(p, content, mode) => {
            let path = at(root, p);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            f.write_all(content)?;
            drop(f);
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
        }
        Op::Dir(p, mode) => {
            let path = at(root, p);
            fs::create_dir_all(&path)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
        }
        Op::RemoveAll(p) => {
            let path = at(root, p);
            match fs::symlink_metadata(&path) {
                Ok(md) if md.is_dir() => fs::remove_dir_all(&path)?,
                Ok(_) => fs::remove_file(&path)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Op::Chown(p, uid, gid) => {
            std::os::unix::fs::lchown(at(root, p), Some(*uid), Some(*gid))?;
        }
        Op::Chmod(p, mode) => {
            fs::set_permissions(at(root, p), fs::Permissions::from_mode(*mode))?;
        }
        Op::Rename(from, to) => fs::rename(at(root, from), at(root, to))?,
        Op::Link(existing, new) => fs::hard_link(at(root, existing), at(root, new))?,
        Op::Symlink(target, p) => std::os::unix::fs::symlink(target, at(root, p))?,
        Op::CharDev(p, major, minor, mode) => {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                at(root, p),
                FileType::CharacterDevice,
                FMode::from_raw_mode(*mode),
                rustix::fs::makedev(*major, *minor),
            )?;
            fs::set_permissions(at(root, p), fs::Permissions::from_mode(*mode))?;
        }
        Op::Fifo(p, mode) => {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                at(root, p),
                FileType::Fifo,
                FMode::from_raw_mode(*mode),
                0,
            )?;
            fs::set_permissions(at(root, p), fs::Permissions::from_mode(*mode))?;
        }
        Op::Xattr(p, name, value) => {
            rustix::fs::lsetxattr(at(root, p), name.as_str(), value, XattrFlags::empty())?;
        }
    }
    Ok(())
}

/// What is compared of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `dir`, `file`, `symlink`, `char`, `block`, `fifo`, `socket`.
    pub kind: &'static str,
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size (regular files and symlinks).
    pub size: Option<u64>,
    /// sha256 of the content (regular files).
    pub sha256: Option<String>,
    /// Symlink target.
    pub target: Option<String>,
    /// Device numbers (character and block devices).
    pub rdev: Option<(u32, u32)>,
    /// Extended attributes except `trusted.overlay.*` (values shown lossily).
    pub xattrs: BTreeMap<String, String>,
    /// The other names of this inode in the tree (hard links), sorted.
    pub links: Vec<String>,
}

fn xattrs(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let n = rustix::fs::llistxattr_query(path)?;
    if n == 0 {
        return Ok(out);
    }
    let mut buf = vec![0u8; n + 256];
    let n = rustix::fs::llistxattr(path, &mut buf[..])?;
    for name in buf[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if name.starts_with("trusted.overlay.") {
            continue;
        }
        let len = rustix::fs::lgetxattr_query(path, name.as_str())?;
        let mut v = vec![0u8; len + 256];
        let len = rustix::fs::lgetxattr(path, name.as_str(), &mut v[..])?;
        out.insert(name, String::from_utf8_lossy(&v[..len]).into_owned());
    }
    Ok(out)
}

/// Every entry under `root` (not `root` itself), by relative path; mount points are not
/// crossed into other filesystems' roots specially (the trees here are single mounts).
pub fn scan(root: &Path) -> Result<BTreeMap<String, Entry>> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            let md =
                fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
            let ft = md.file_type();
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_file() {
                "file"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_char_device() {
                "char"
            } else if ft.is_block_device() {
                "block"
            } else if ft.is_fifo() {
                "fifo"
            } else {
                "socket"
            };
            let mut ent = Entry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: None,
                sha256: None,
                target: None,
                rdev: None,
                xattrs: xattrs(&path).with_context(|| format!("xattrs of {}", path.display()))?,
                links: Vec::new(),
            };
            match kind {
                "dir" => stack.push(path.clone()),
                "file" => {
                    let data =
                        fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                    ent.size = Some(md.len());
                    ent.sha256 = Some(hex::encode(Sha256::digest(&data)));
                }
                "symlink" => {
                    ent.size = Some(md.len());
                    ent.target = Some(fs::read_link(&path)?.to_string_lossy().into_owned());
                }
                "char" | "block" => {
                    let r = md.rdev();
                    ent.rdev = Some((rustix::fs::major(r), rustix::fs::minor(r)));
                }
                _ => {}
            }
            if kind != "dir" {
                inodes
                    .entry((md.dev(), md.ino()))
                    .or_default()
                    .push(rel.clone());
            }
            out.insert(rel, ent);
        }
    }
    for names in inodes.values().filter(|n| n.len() > 1) {
        for n in names {
            let mut others: Vec<String> = names.iter().filter(|o| *o != n).cloned().collect();
            others.sort();
            out.get_mut(n).expect("scanned").links = others;
        }
    }
    Ok(out)
}

/// Fails unless the trees under `expected` and `actual` are the same (roots excluded).
pub fn check_equal(expected: &Path, actual: &Path) -> Result<()> {
    let e = scan(expected).with_context(|| format!("scanning {}", expected.display()))?;
    let a = scan(actual).with_context(|| format!("scanning {}", actual.display()))?;
    let diffs = diff(&e, &a);
    if !diffs.is_empty() {
        let n = diffs.len();
        let shown: Vec<String> = diffs.into_iter().take(25).collect();
        bail!(
            "{} differs from the reference {} ({n} differences):\n  {}",
            actual.display(),
            expected.display(),
            shown.join("\n  ")
        );
    }
    Ok(())
}

/// Human-readable differences between two scans.
pub fn diff(e: &BTreeMap<String, Entry>, a: &BTreeMap<String, Entry>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, ev) in e {
        match a.get(k) {
            None => out.push(format!("missing: {k} ({ev:?})")),
            Some(av) if av != ev => out.push(format!("{k}: expected {ev:?}, got {av:?}")),
            _ => {}
        }
    }
    for (k, av) in a {
        if !e.contains_key(k) {
            out.push(format!("unexpected: {k} ({av:?})"));
        }
    }
    out
}

/// The comparison must see every kind of difference it claims to (else the suite would
/// pass on anything).
#[test]
fn check_equal_detects_differences() {
    let base = tempfile::Builder::new()
        .prefix("ect-fstest-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let ops = vec![
        dir("d", 0o755),
        file("d/f", b"content", 0o644),
        link("d/f", "d/f-link"),
        symlink("d/f", "s"),
        Op::CharDev("c".into(), 1, 3, 0o666),
        Op::Xattr("d/f".into(), "user.x".into(), b"1".to_vec()),
        file("g", b"other", 0o600),
    ];
    let changes: Vec<(&str, Vec<Op>)> = vec![
        ("nothing", vec![]),
        ("mode", vec![chmod("d/f", 0o4644)]),
        ("dir mode", vec![chmod("d", 0o700)]),
        ("owner", vec![chown("g", 1, 1)]),
        ("content", vec![file("g", b"0ther", 0o600)]),
        (
            "xattr",
            vec![Op::Xattr("d/f".into(), "user.x".into(), b"2".to_vec())],
        ),
        ("symlink", vec![remove_all("s"), symlink("g", "s")]),
        (
            "device",
            vec![remove_all("c"), Op::CharDev("c".into(), 1, 5, 0o666)],
        ),
        (
            "hard link",
            vec![remove_all("d/f-link"), file("d/f-link", b"content", 0o644)],
        ),
        ("extra", vec![file("new", b"", 0o644)]),
        ("missing", vec![remove_all("g")]),
    ];
    for (i, (what, change)) in changes.iter().enumerate() {
        let a = base.path().join(format!("a{i}"));
        let b = base.path().join(format!("b{i}"));
        for d in [&a, &b] {
            fs::create_dir(d).expect("mkdir");
            apply(d, &ops).expect("apply");
        }
        apply(&b, change).expect("change");
        let r = check_equal(&a, &b);
        assert_eq!(r.is_ok(), change.is_empty(), "{what}: {r:?}");
    }
}
