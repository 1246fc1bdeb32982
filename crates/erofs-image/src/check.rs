//! The checker: walk a whole image and verify what the kernel relies on, reporting every
//! problem found rather than stopping at the first.
//!
//! Checked: the superblock (magic, checksum, block size, features, device table ranges),
//! every reachable inode (format bits, mode, layout, inline tails not crossing blocks and not
//! starting a block, block and chunk ranges inside their devices, chunk formats and device ids),
//! every directory (block structure, names, strict byte order across blocks, `.` and `..`,
//! duplicates, dirent type against inode mode, nid range), link counts (directories: 2 + subdirs;
//! others: number of entries), symlink targets and xattr bodies. Directories reachable from two
//! parents are reported too, since the kernel would loop or mis-count on them.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::error::{CorruptKind, Error};
use crate::format::{self, file_type, mode};
use crate::reader::{Extent, Image, Inode, ReadAt};

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The kernel may misbehave, or data is unreachable.
    Error,
    /// Valid but unwise (e.g. nid 0 is used, which glibc hides from readdir).
    Warning,
}

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How serious.
    pub severity: Severity,
    /// The inode concerned.
    pub nid: Option<u64>,
    /// The path (lossy), when known.
    pub path: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}")?;
        if let Some(p) = &self.path {
            write!(f, ": {p}")?;
        }
        if let Some(n) = self.nid {
            write!(f, " (nid {n})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The result of a check.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Problems, in the order found.
    pub findings: Vec<Finding>,
    /// Inodes reached.
    pub inodes: u64,
    /// Directories reached.
    pub directories: u64,
    /// Regular files reached.
    pub files: u64,
    /// Sum of regular file sizes.
    pub file_bytes: u64,
}

impl Report {
    /// Whether no error was found (warnings allowed).
    pub fn is_ok(&self) -> bool {
        !self.findings.iter().any(|f| f.severity == Severity::Error)
    }
}

struct Checker<'a> {
    img: &'a Image,
    report: Report,
}

impl Checker<'_> {
    fn add(
        &mut self,
        severity: Severity,
        nid: Option<u64>,
        path: &[u8],
        message: impl Into<String>,
    ) {
        self.report.findings.push(Finding {
            severity,
            nid,
            path: Some(if path.is_empty() {
                "/".into()
            } else {
                format!("/{}", String::from_utf8_lossy(path))
            }),
            message: message.into(),
        });
    }
    fn err(&mut self, nid: Option<u64>, path: &[u8], message: impl Into<String>) {
        self.add(Severity::Error, nid, path, message);
    }
}

/// Open and check an image. An image that cannot even be opened yields one finding.
pub fn check_image(primary: impl ReadAt + 'static, devices: Vec<Box<dyn ReadAt>>) -> Report {
    match Image::open_with_devices(primary, devices) {
        Ok(img) => check(&img),
        Err(e) => Report {
            findings: vec![Finding {
                severity: Severity::Error,
                nid: None,
                path: None,
                message: e.to_string(),
            }],
            ..Default::default()
        },
    }
}

/// Check an open image.
pub fn check(img: &Image) -> Report {
    let mut c = Checker {
        img,
        report: Report::default(),
    };
    c.superblock();
    c.tree();
    c.report
}

impl Checker<'_> {
    fn superblock(&mut self) {
        let sb = self.img.superblock().clone();
        let bs = self.img.block_size();
        let primary = self.img.device_size(0).unwrap_or(0);
        let sb_finding = |c: &mut Self, m: String| {
            c.report.findings.push(Finding {
                severity: Severity::Error,
                nid: None,
                path: None,
                message: format!("superblock: {m}"),
            })
        };
        if sb.feature_compat & format::FEATURE_COMPAT_SB_CHKSUM == 0 {
            self.report.findings.push(Finding {
                severity: Severity::Warning,
                nid: None,
                path: None,
                message: "superblock: no checksum".into(),
            });
        }
        if (sb.blocks as u64) * bs > primary {
            sb_finding(
                self,
                format!(
                    "{} blocks declared but the image has {primary} bytes",
                    sb.blocks
                ),
            );
        }
        if sb.blkszbits > 12 {
            self.report.findings.push(Finding {
                severity: Severity::Warning,
                nid: None,
                path: None,
                message: format!(
                    "superblock: block size {bs} needs a kernel with pages that large"
                ),
            });
        }
        for (i, slot) in self.img.device_slots().iter().enumerate() {
            let id = (i + 1) as u16;
            let need = slot.blocks as u64 * bs;
            if self.img.is_flat() {
                if slot.uniaddr == 0 {
                    sb_finding(
                        self,
                        format!("device {id} has no unified address; flat mounts cannot reach it"),
                    );
                } else if (slot.uniaddr as u64 * bs) < sb.blocks as u64 * bs {
                    sb_finding(self, format!("device {id} overlaps the primary image"));
                }
                let end = (slot.uniaddr as u64 + slot.blocks as u64) * bs;
                // The last block of a tar may be short (tar padding is not always kept).
                if end > primary.next_multiple_of(bs) {
                    sb_finding(
                        self,
                        format!(
                            "device {id} extends to byte {end}, past the end of the image ({primary})"
                        ),
                    );
                }
            } else if let Some(size) = self.img.device_size(id)
                && size.next_multiple_of(bs) < need
            {
                sb_finding(
                    self,
                    format!(
                        "device {id} is {size} bytes but declares {} blocks",
                        slot.blocks
                    ),
                );
            }
        }
    }

    fn tree(&mut self) {
        let img = self.img;
        let root_nid = img.root_nid();
        // nid -> (links seen, declared nlink, path) for non-directories.
        let mut links: HashMap<u64, (u64, u32, Vec<u8>)> = HashMap::new();
        let mut dir_parent: HashMap<u64, u64> = HashMap::new();
        let mut queue: VecDeque<(Vec<u8>, u64, u64)> = VecDeque::new();
        let mut visited: HashSet<u64> = HashSet::new();
        dir_parent.insert(root_nid, root_nid);
        queue.push_back((Vec::new(), root_nid, root_nid));
        visited.insert(root_nid);

        match img.inode(root_nid) {
            Ok(root) => self.inode(&root, b""),
            Err(e) => return self.err(Some(root_nid), b"", e.to_string()),
        }

        while let Some((path, nid, parent)) = queue.pop_front() {
            let dir = match img.inode(nid) {
                Ok(d) => d,
                Err(e) => {
                    self.err(Some(nid), &path, e.to_string());
                    continue;
                }
            };
            self.report.directories += 1;
            let entries = match img.read_dir(&dir) {
                Ok(e) => e,
                Err(e) => {
                    self.err(Some(nid), &path, e.to_string());
                    continue;
                }
            };
            let mut prev: Option<&[u8]> = None;
            let (mut dot, mut dotdot) = (false, false);
            let mut subdirs = 0u64;
            for e in &entries {
                if let Some(p) = prev
                    && p >= e.name.as_slice()
                {
                    let what = if p == e.name.as_slice() {
                        format!("duplicate entry {:?}", String::from_utf8_lossy(&e.name))
                    } else {
                        CorruptKind::DirentOrder {
                            prev: String::from_utf8_lossy(p).into_owned(),
                            next: String::from_utf8_lossy(&e.name).into_owned(),
                        }
                        .to_string()
                    };
                    self.err(
                        Some(nid),
                        &path,
                        format!("{what} (block {}): lookups of later names fail", e.block),
                    );
                }
                prev = Some(&e.name);
                if e.name.contains(&b'/') || e.name.contains(&0) || e.name.is_empty() {
                    self.err(
                        Some(nid),
                        &path,
                        format!("illegal file name {:?}", String::from_utf8_lossy(&e.name)),
                    );
                    continue;
                }
                if e.name == b"." {
                    dot = true;
                    if e.nid != nid {
                        self.err(
                            Some(nid),
                            &path,
                            format!("`.` points to nid {} instead of itself", e.nid),
                        );
                    }
                    continue;
                }
                if e.name == b".." {
                    dotdot = true;
                    if e.nid != parent {
                        self.err(
                            Some(nid),
                            &path,
                            format!(
                                "`..` points to nid {} instead of its parent {parent}",
                                e.nid
                            ),
                        );
                    }
                    continue;
                }
                let mut child_path = path.clone();
                if !child_path.is_empty() {
                    child_path.push(b'/');
                }
                child_path.extend_from_slice(&e.name);
                if e.nid == 0 {
                    self.add(
                        Severity::Warning,
                        Some(0),
                        &child_path,
                        "nid 0 is used; glibc readdir skips entries with inode number 0",
                    );
                }
                let child = match img.inode(e.nid) {
                    Ok(c) => c,
                    Err(err) => {
                        self.err(Some(e.nid), &child_path, err.to_string());
                        continue;
                    }
                };
                let ft = format::file_type_of_mode(child.mode()).unwrap_or(file_type::UNKNOWN);
                if e.file_type != ft {
                    self.err(
                        Some(e.nid),
                        &child_path,
                        format!(
                            "dirent type {} does not match the inode's mode {:#o}",
                            e.file_type,
                            child.mode()
                        ),
                    );
                }
                if child.is_dir() {
                    subdirs += 1;
                    if let Some(&p) = dir_parent.get(&child.nid) {
                        self.err(
                            Some(child.nid),
                            &child_path,
                            format!("directory is linked from two parents (nids {p} and {nid})"),
                        );
                        continue;
                    }
                    dir_parent.insert(child.nid, nid);
                    self.inode(&child, &child_path);
                    if visited.insert(child.nid) {
                        queue.push_back((child_path, child.nid, nid));
                    }
                } else {
                    let ent =
                        links
                            .entry(child.nid)
                            .or_insert((0, child.raw.nlink, child_path.clone()));
                    ent.0 += 1;
                    if ent.0 == 1 {
                        self.inode(&child, &child_path);
                    }
                }
            }
            if !dot || !dotdot {
                self.err(Some(nid), &path, "`.` or `..` entry is missing");
            }
            let want = 2 + subdirs;
            if dir.raw.nlink as u64 != want {
                self.err(Some(nid), &path, format!("directory nlink is {} but it has {subdirs} subdirectories (expected {want})", dir.raw.nlink));
            }
        }
        for (nid, (seen, declared, path)) in links {
            if seen != declared as u64 {
                self.err(
                    Some(nid),
                    &path,
                    format!("nlink is {declared} but {seen} entries link to it"),
                );
            }
        }
    }

    fn inode(&mut self, inode: &Inode, path: &[u8]) {
        let img = self.img;
        let nid = Some(inode.nid);
        self.report.inodes += 1;
        let bs = img.block_size();
        if let Err(e) = img.xattrs(inode) {
            self.err(nid, path, e.to_string());
        }
        if inode.layout == format::LAYOUT_FLAT_INLINE {
            let tail_start =
                inode.pos + inode.raw.inode_size() as u64 + inode.raw.xattr_isize() as u64;
            if tail_start.is_multiple_of(bs) {
                self.add(
                    Severity::Warning,
                    nid,
                    path,
                    CorruptKind::InlineAtBlockStart.to_string(),
                );
            }
        }
        // The kernel keeps i_size in a signed loff_t: above 2^63-1 it is negative there.
        if inode.size() > i64::MAX as u64 {
            self.err(
                nid,
                path,
                format!("size {} is larger than 2^63-1 bytes", inode.size()),
            );
            return;
        }
        match inode.file_type() {
            mode::S_IFREG => {
                self.report.files += 1;
                self.report.file_bytes = self.report.file_bytes.saturating_add(inode.size());
                self.extents(inode, path);
            }
            mode::S_IFDIR => self.extents(inode, path),
            mode::S_IFLNK => match img.read_link(inode) {
                Ok(t) if t.contains(&0) => self.err(nid, path, "symlink target contains NUL"),
                Ok(t) if t.len() > 4095 => {
                    self.err(nid, path, "symlink target longer than 4095 bytes")
                }
                Ok(_) => {}
                Err(e) => self.err(nid, path, e.to_string()),
            },
            _ => {
                if inode.size() != 0 {
                    self.err(nid, path, format!("special file has size {}", inode.size()));
                }
            }
        }
    }

    /// Map every extent of a file and check it lies inside its device.
    fn extents(&mut self, inode: &Inode, path: &[u8]) {
        let img = self.img;
        let size = inode.size();
        let mut off = 0u64;
        let mut steps = 0u64;
        while off < size {
            steps += 1;
            if steps > 1 << 26 {
                self.err(Some(inode.nid), path, "too many extents");
                return;
            }
            match img.map(inode, off, size - off) {
                Ok(Extent::Hole(0)) => return,
                Ok(Extent::Hole(n)) => off = off.saturating_add(n),
                Ok(Extent::Data {
                    device,
                    offset,
                    len,
                }) => {
                    let dev_size = img.device_size(device);
                    let end = offset.saturating_add(len);
                    match dev_size {
                        None => {
                            self.err(
                                Some(inode.nid),
                                path,
                                format!("data on device {device}, which was not provided"),
                            );
                            return;
                        }
                        Some(s) if end > s => {
                            self.err(Some(inode.nid), path, format!("data at {offset}..{end} is past the end of device {device} ({s} bytes)"));
                            return;
                        }
                        _ => {}
                    }
                    off = off.saturating_add(len);
                }
                Err(Error::Corrupt(c)) => {
                    self.err(Some(inode.nid), path, c.kind.to_string());
                    return;
                }
                Err(e) => {
                    self.err(Some(inode.nid), path, e.to_string());
                    return;
                }
            }
        }
    }
}
