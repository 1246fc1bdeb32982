//! Mounting what the daemon returns (read-only) and comparing directory trees.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use containerd_api::containerd::types::Mount;
use testsuite::rootfs::{Mounted, mount_all, parse_overlay};

/// The lower directories of a mount list (topmost first) and its upper directory, if any.
pub fn layers_of(mounts: &[Mount]) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
    let m = match mounts {
        [m] => m,
        _ => bail!("expected one mount, got {mounts:?}"),
    };
    match m.r#type.as_str() {
        "bind" => {
            let ro = m.options.iter().any(|o| o == "ro");
            let p = PathBuf::from(&m.source);
            Ok(if ro {
                (vec![p], None)
            } else {
                (Vec::new(), Some(p))
            })
        }
        "overlay" => {
            let o = parse_overlay(m)?;
            Ok((o.lowers, o.upper))
        }
        t => bail!("unexpected mount type {t:?}"),
    }
}

/// Mount `dirs` (topmost first) read-only on a new directory `target`: a bind mount for one,
/// an overlay for more (whiteouts and opaque directories in any of them take effect).
pub fn mount_stack(dirs: &[PathBuf], target: &Path) -> Result<Mounted> {
    fs::create_dir_all(target)?;
    let path = |d: &PathBuf| d.display().to_string();
    let m = match dirs {
        [] => bail!("nothing to mount"),
        [one] => Mount {
            r#type: "bind".into(),
            source: path(one),
            target: String::new(),
            options: vec!["ro".into()],
        },
        many => Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![format!(
                "lowerdir={}",
                many.iter().map(path).collect::<Vec<_>>().join(":")
            )],
        },
    };
    mount_all(&[m], target)
}

/// Mount an active snapshot's mounts read-write on `target` (an overlay with its upper and
/// work directories, or a bind mount).
pub fn mount_rw(mounts: &[Mount], target: &Path) -> Result<Mounted> {
    fs::create_dir_all(target)?;
    ensure!(mounts.len() == 1, "expected one mount, got {mounts:?}");
    mount_all(mounts, target)
}

/// Mount an EROFS image file read-only on `target`.
pub fn mount_erofs(image: &Path, target: &Path) -> Result<Mounted> {
    fs::create_dir_all(target)?;
    erofs_sys::mount::mount_erofs_file(image, target, &[])
        .with_context(|| format!("mounting {} on {}", image.display(), target.display()))?;
    Ok(Mounted::adopt(target))
}

/// What is compared of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `d`, `f`, `l`, `c`, `b`, `p`, `s`.
    pub kind: char,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Seconds and nanoseconds (not for directories: see [`tree`]).
    pub mtime: Option<(i64, i64)>,
    /// sha256 of regular file content, or the symlink target.
    pub content: String,
    /// Device numbers.
    pub rdev: u64,
}

/// A tree: relative path → node, plus the hardlink groups among regular files.
#[derive(Debug, Default)]
pub struct Tree {
    /// Everything below the root.
    pub nodes: BTreeMap<PathBuf, Node>,
    /// Sets of paths that are one inode (only inodes with more than one link).
    pub links: BTreeSet<Vec<PathBuf>>,
}

/// Read the whole tree below `root`. Directory mtimes are compared too, except the root's.
pub fn tree(root: &Path) -> Result<Tree> {
    let mut t = Tree::default();
    let mut inodes: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p)?;
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                'd'
            } else if ft.is_file() {
                'f'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else if ft.is_fifo() {
                'p'
            } else {
                's'
            };
            let content = match kind {
                'f' => testsuite::oci::sha256_file(&p)?,
                'l' => fs::read_link(&p)?.display().to_string(),
                _ => String::new(),
            };
            if kind == 'f' && md.nlink() > 1 {
                inodes
                    .entry((md.dev(), md.ino()))
                    .or_default()
                    .push(r.clone());
            }
            t.nodes.insert(
                r.clone(),
                Node {
                    kind,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    mtime: Some((md.mtime(), md.mtime_nsec())),
                    content,
                    rdev: md.rdev(),
                },
            );
            if kind == 'd' {
                stack.push(r);
            }
        }
    }
    t.links = inodes
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    Ok(t)
}

/// Differences between two trees, as readable lines (empty when equal).
pub fn differences(want: &Tree, got: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (p, a) in &want.nodes {
        match got.nodes.get(p) {
            None => out.push(format!("missing: {}", p.display())),
            Some(b) if a != b => {
                out.push(format!("differs: {}: want {a:?}, got {b:?}", p.display()))
            }
            Some(_) => {}
        }
    }
    for p in got.nodes.keys() {
        if !want.nodes.contains_key(p) {
            out.push(format!("unexpected: {}", p.display()));
        }
    }
    if want.links != got.links {
        out.push(format!(
            "hardlink groups differ: want {:?}, got {:?}",
            want.links, got.links
        ));
    }
    out
}
