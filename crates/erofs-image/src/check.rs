//! The checker: walk a whole image and verify what the kernel relies on, reporting every
//! problem found rather than stopping at the first.
//!
//! Checked: the superblock (magic, checksum, block size, features, device table ranges),
//! every reachable inode (format bits, mode, layout, inline tails not crossing blocks and not
//! starting a block, block and chunk ranges inside their devices, chunk formats, chunk device
//! ids against the device table), every directory (block structure, names, strict byte order
//! across blocks, `.` and `..`, duplicates, dirent type against inode mode, nid range), link
//! counts (directories: 2 + subdirs; others: number of entries), symlink targets, xattr bodies
//! (shared and inline), that given extra devices have the sizes their slots declare (fsmeta
//! over its layers: every chunk must land inside its own layer) and, when the image turns the xattr name filter on, that the filter
//! hides none of an inode's xattrs. Directories reachable from two parents are reported too,
//! since the kernel would loop or mis-count on them.
//!
//! The image is untrusted, so the check itself is bounded: it reads at most
//! [`WORK_PER_BYTE`] bytes of metadata per byte of image (plus [`WORK_BASE`]) however the
//! metadata overlaps (chunk tables over other inodes, many inodes sharing one directory's
//! blocks), streams directories a block at a time, keeps a path per directory rather than per
//! entry (built back only for findings, shortened to its end), and keeps the first
//! [`MAX_FINDINGS`] findings, counting the rest.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;

use crate::error::{CorruptKind, Error};
use crate::format::{self, file_type, mode};
use crate::reader::{DirEntry, Extent, Image, Inode, ReadAt};

/// Findings kept in a [`Report`]; later ones are only counted.
pub const MAX_FINDINGS: usize = 1000;
/// Bytes of metadata the checker may read per byte of image (all devices together). An
/// image whose structures do not overlap needs about one.
pub const WORK_PER_BYTE: u64 = 4;
/// Bytes of metadata the checker may read whatever the image's size.
pub const WORK_BASE: u64 = 1 << 20;
/// Bytes of a path shown in a finding: its end, after `…` when cut.
const PATH_SHOWN: usize = 400;
/// Shared xattrs whose validation is remembered (each later reference is then cheap).
const SHARED_REMEMBERED: usize = 1 << 20;
/// What reading one inode costs.
const INODE_COST: u64 = format::EXTENDED_INODE_SIZE as u64;

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
    /// The path (lossy), when known; its end only (after `…`) when long.
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
    /// Problems, in the order found: the first [`MAX_FINDINGS`] (and the work-budget error,
    /// if the budget ran out).
    pub findings: Vec<Finding>,
    /// Errors found after [`MAX_FINDINGS`], counted only.
    pub omitted_errors: u64,
    /// Warnings found after [`MAX_FINDINGS`], counted only.
    pub omitted_warnings: u64,
    /// Inodes reached.
    pub inodes: u64,
    /// Directories reached.
    pub directories: u64,
    /// Regular files reached.
    pub files: u64,
    /// Sum of regular file sizes.
    pub file_bytes: u64,
    /// Bytes of metadata read.
    pub work: u64,
    /// Bytes of metadata the image's size allowed.
    pub work_budget: u64,
}

impl Report {
    /// Whether no error was found (warnings allowed).
    pub fn is_ok(&self) -> bool {
        self.errors() == 0
    }

    /// Errors found, kept or not.
    pub fn errors(&self) -> u64 {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count() as u64
            + self.omitted_errors
    }

    /// The first `n` errors, then "and N more" if there were more.
    pub fn summary(&self, n: usize) -> String {
        let mut parts: Vec<String> = self
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .take(n)
            .map(|f| f.to_string())
            .collect();
        let more = self.errors().saturating_sub(parts.len() as u64);
        if more > 0 {
            parts.push(format!("and {more} more"));
        }
        parts.join("; ")
    }
}

/// Where a finding is: the superblock, a directory, or an entry of one.
#[derive(Clone, Copy)]
enum At<'p> {
    Super,
    Dir(u64),
    Entry(u64, &'p [u8]),
}

/// A directory reached: its parent and its name there (the root is its own parent).
struct DirNode {
    parent: u64,
    name: Box<[u8]>,
}

/// A non-directory reached: entries seen so far, and where the first one is.
struct Link {
    seen: u64,
    nlink: u32,
    mode: u32,
    dir: u64,
    name: Box<[u8]>,
}

/// What one directory's walk keeps across its blocks.
#[derive(Default)]
struct DirWalk {
    prev: Option<Vec<u8>>,
    dot: bool,
    dotdot: bool,
    subdirs: u64,
}

struct Checker<'a> {
    img: &'a Image,
    report: Report,
    exhausted: bool,
    dirs: HashMap<u64, DirNode>,
    links: HashMap<u64, Link>,
    /// Shared xattr id -> (name index, filter bit), or why it is invalid.
    shared: HashMap<u32, Result<(u8, u32), &'static str>>,
}

impl Checker<'_> {
    fn add(&mut self, severity: Severity, nid: Option<u64>, at: At, message: impl Into<String>) {
        if self.report.findings.len() >= MAX_FINDINGS {
            match severity {
                Severity::Error => self.report.omitted_errors += 1,
                Severity::Warning => self.report.omitted_warnings += 1,
            }
            return;
        }
        let path = self.path(at);
        self.report.findings.push(Finding {
            severity,
            nid,
            path,
            message: message.into(),
        });
    }

    fn err(&mut self, nid: Option<u64>, at: At, message: impl Into<String>) {
        self.add(Severity::Error, nid, at, message);
    }

    /// The path of a directory (and an entry in it), built back from the parents recorded;
    /// only its last [`PATH_SHOWN`] bytes or so, after `…`, when it is longer.
    fn path(&self, at: At) -> Option<String> {
        let (dir, leaf) = match at {
            At::Super => return None,
            At::Dir(d) => (d, None),
            At::Entry(d, name) => (d, Some(name)),
        };
        let root = self.img.root_nid();
        let mut comps: Vec<&[u8]> = leaf.into_iter().collect();
        let mut len = leaf.map_or(0, |l| l.len());
        let mut cur = dir;
        let mut cut = false;
        while cur != root {
            // Each recorded parent was reached before its child, so this ends at the root.
            let Some(node) = self.dirs.get(&cur) else {
                cut = true;
                break;
            };
            if len >= PATH_SHOWN {
                cut = true;
                break;
            }
            comps.push(&node.name);
            len += node.name.len() + 1;
            cur = node.parent;
        }
        if comps.is_empty() {
            return Some("/".into());
        }
        let mut s = String::with_capacity(len + 4);
        if cut {
            s.push('…');
        }
        for c in comps.iter().rev() {
            s.push('/');
            s.push_str(&String::from_utf8_lossy(c));
        }
        Some(s)
    }

    /// Account for `n` bytes of metadata read; false (once with an error) past the budget.
    fn charge(&mut self, n: u64) -> bool {
        if self.exhausted {
            return false;
        }
        self.report.work = self.report.work.saturating_add(n);
        if self.report.work <= self.report.work_budget {
            return true;
        }
        self.exhausted = true;
        // Always kept, so that a capped report still says why it stopped.
        self.report.findings.push(Finding {
            severity: Severity::Error,
            nid: None,
            path: None,
            message: format!(
                "check stopped: the image's metadata needs more than {} bytes of reading \
                 ({WORK_PER_BYTE} per image byte + {WORK_BASE}); its structures overlap",
                self.report.work_budget
            ),
        });
        false
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
    let total: u64 = (0..=img.device_slots().len())
        .filter_map(|d| img.device_size(d as u16))
        .fold(0u64, |a, s| a.saturating_add(s));
    let mut c = Checker {
        img,
        report: Report {
            work_budget: WORK_BASE.saturating_add(total.saturating_mul(WORK_PER_BYTE)),
            ..Default::default()
        },
        exhausted: false,
        dirs: HashMap::new(),
        links: HashMap::new(),
        shared: HashMap::new(),
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
        let sb_err = |c: &mut Self, m: String| c.err(None, At::Super, format!("superblock: {m}"));
        if sb.feature_compat & format::FEATURE_COMPAT_SB_CHKSUM == 0 {
            self.add(
                Severity::Warning,
                None,
                At::Super,
                "superblock: no checksum",
            );
        }
        if (sb.blocks as u64) * bs > primary {
            sb_err(
                self,
                format!(
                    "{} blocks declared but the image has {primary} bytes",
                    sb.blocks
                ),
            );
        }
        if sb.blkszbits > 12 {
            self.add(
                Severity::Warning,
                None,
                At::Super,
                format!("superblock: block size {bs} needs a kernel with pages that large"),
            );
        }
        if sb.feature_compat & format::FEATURE_COMPAT_XATTR_FILTER != 0
            && sb.xattr_filter_reserved != 0
        {
            self.add(
                Severity::Warning,
                None,
                At::Super,
                format!(
                    "superblock: the xattr name filter is flagged but xattr_filter_reserved is \
                     {}, so kernels ignore it",
                    sb.xattr_filter_reserved
                ),
            );
        }
        for (i, slot) in self.img.device_slots().iter().enumerate() {
            let id = (i + 1) as u16;
            let need = slot.blocks as u64 * bs;
            if self.img.is_flat() {
                if slot.uniaddr == 0 {
                    sb_err(
                        self,
                        format!("device {id} has no unified address; flat mounts cannot reach it"),
                    );
                } else if (slot.uniaddr as u64 * bs) < sb.blocks as u64 * bs {
                    sb_err(self, format!("device {id} overlaps the primary image"));
                }
                let end = (slot.uniaddr as u64 + slot.blocks as u64) * bs;
                // The last block of a tar may be short (tar padding is not always kept).
                if end > primary.next_multiple_of(bs) {
                    sb_err(
                        self,
                        format!(
                            "device {id} extends to byte {end}, past the end of the image ({primary})"
                        ),
                    );
                }
            } else if let Some(size) = self.img.device_size(id) {
                if size.next_multiple_of(bs) < need {
                    sb_err(
                        self,
                        format!(
                            "device {id} is {size} bytes but declares {} blocks",
                            slot.blocks
                        ),
                    );
                } else if size.div_ceil(bs) != slot.blocks as u64 {
                    // Larger than its slot: readable, but likely not the device the image
                    // was built over (fsmeta over a different layer, a swapped order).
                    self.add(
                        Severity::Warning,
                        None,
                        At::Super,
                        format!(
                            "superblock: device {id} is {size} bytes, more than the {} blocks \
                             its slot declares (a different device?)",
                            slot.blocks
                        ),
                    );
                }
            }
        }
    }

    fn tree(&mut self) {
        let img = self.img;
        let root_nid = img.root_nid();
        self.dirs.insert(
            root_nid,
            DirNode {
                parent: root_nid,
                name: Box::default(),
            },
        );
        if !self.charge(INODE_COST) {
            return;
        }
        match img.inode(root_nid) {
            Ok(root) => self.inode(&root, At::Dir(root_nid)),
            Err(e) => return self.err(Some(root_nid), At::Dir(root_nid), e.to_string()),
        }
        let mut queue = VecDeque::from([root_nid]);
        while let Some(nid) = queue.pop_front() {
            if self.exhausted {
                return;
            }
            self.directory(nid, &mut queue);
        }
        if self.exhausted {
            // Link counts of a partial walk would be wrong; the budget error says enough.
            return;
        }
        let mut wrong: Vec<(u64, u64, u32)> = self
            .links
            .iter()
            .filter(|(_, l)| l.seen != l.nlink as u64)
            .map(|(&nid, l)| (nid, l.seen, l.nlink))
            .collect();
        wrong.sort_unstable();
        for (nid, seen, declared) in wrong {
            let l = &self.links[&nid];
            let (dir, name) = (l.dir, l.name.clone());
            self.err(
                Some(nid),
                At::Entry(dir, &name),
                format!("nlink is {declared} but {seen} entries link to it"),
            );
        }
    }

    fn directory(&mut self, nid: u64, queue: &mut VecDeque<u64>) {
        let img = self.img;
        let parent = self.dirs.get(&nid).map_or(nid, |d| d.parent);
        let at = At::Dir(nid);
        if !self.charge(INODE_COST) {
            return;
        }
        let dir = match img.inode(nid) {
            Ok(d) => d,
            Err(e) => return self.err(Some(nid), at, e.to_string()),
        };
        self.report.directories += 1;
        let mut walk = DirWalk::default();
        let bs = img.block_size();
        let read = img.for_each_dir_block(&dir, |_, entries| {
            if !self.charge(bs) {
                return ControlFlow::Break(());
            }
            for e in entries {
                self.entry(nid, parent, e, &mut walk, queue);
                if self.exhausted {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        });
        if let Err(e) = read {
            return self.err(Some(nid), at, e.to_string());
        }
        if self.exhausted {
            return;
        }
        if !walk.dot || !walk.dotdot {
            self.err(Some(nid), at, "`.` or `..` entry is missing");
        }
        let want = 2 + walk.subdirs;
        if dir.raw.nlink as u64 != want {
            self.err(
                Some(nid),
                at,
                format!(
                    "directory nlink is {} but it has {} subdirectories (expected {want})",
                    dir.raw.nlink, walk.subdirs
                ),
            );
        }
    }

    fn entry(
        &mut self,
        nid: u64,
        parent: u64,
        e: &DirEntry,
        walk: &mut DirWalk,
        queue: &mut VecDeque<u64>,
    ) {
        let img = self.img;
        let at = At::Dir(nid);
        if let Some(p) = &walk.prev
            && p.as_slice() >= e.name.as_slice()
        {
            let what = if p == &e.name {
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
                at,
                format!("{what} (block {}): lookups of later names fail", e.block),
            );
        }
        let prev = walk.prev.get_or_insert_with(Vec::new);
        prev.clear();
        prev.extend_from_slice(&e.name);
        if e.name.contains(&b'/') || e.name.contains(&0) || e.name.is_empty() {
            self.err(
                Some(nid),
                at,
                format!("illegal file name {:?}", String::from_utf8_lossy(&e.name)),
            );
            return;
        }
        if e.name == b"." {
            walk.dot = true;
            if e.nid != nid {
                self.err(
                    Some(nid),
                    at,
                    format!("`.` points to nid {} instead of itself", e.nid),
                );
            }
            return;
        }
        if e.name == b".." {
            walk.dotdot = true;
            if e.nid != parent {
                self.err(
                    Some(nid),
                    at,
                    format!(
                        "`..` points to nid {} instead of its parent {parent}",
                        e.nid
                    ),
                );
            }
            return;
        }
        let child_at = At::Entry(nid, &e.name);
        if e.nid == 0 {
            self.add(
                Severity::Warning,
                Some(0),
                child_at,
                "nid 0 is used; glibc readdir skips entries with inode number 0",
            );
        }
        let type_mismatch = |c: &mut Self, m: u32| {
            let ft = format::file_type_of_mode(m).unwrap_or(file_type::UNKNOWN);
            if e.file_type != ft {
                c.err(
                    Some(e.nid),
                    child_at,
                    format!(
                        "dirent type {} does not match the inode's mode {m:#o}",
                        e.file_type
                    ),
                );
            }
        };
        // Inodes already reached are not read again: a hard link costs its dirent only.
        if let Some(l) = self.links.get_mut(&e.nid) {
            l.seen += 1;
            let m = l.mode;
            return type_mismatch(self, m);
        }
        if let Some(d) = self.dirs.get(&e.nid) {
            let p = d.parent;
            walk.subdirs += 1;
            type_mismatch(self, mode::S_IFDIR);
            return self.err(
                Some(e.nid),
                child_at,
                format!("directory is linked from two parents (nids {p} and {nid})"),
            );
        }
        if !self.charge(INODE_COST) {
            return;
        }
        let child = match img.inode(e.nid) {
            Ok(c) => c,
            Err(err) => return self.err(Some(e.nid), child_at, err.to_string()),
        };
        type_mismatch(self, child.mode());
        if child.is_dir() {
            walk.subdirs += 1;
            self.dirs.insert(
                child.nid,
                DirNode {
                    parent: nid,
                    name: e.name.clone().into_boxed_slice(),
                },
            );
            self.inode(&child, At::Dir(child.nid));
            queue.push_back(child.nid);
        } else {
            self.links.insert(
                child.nid,
                Link {
                    seen: 1,
                    nlink: child.raw.nlink,
                    mode: child.mode(),
                    dir: nid,
                    name: e.name.clone().into_boxed_slice(),
                },
            );
            self.inode(&child, child_at);
        }
    }

    fn inode(&mut self, inode: &Inode, at: At) {
        let img = self.img;
        let nid = Some(inode.nid);
        self.report.inodes += 1;
        let bs = img.block_size();
        self.xattrs(inode, at);
        if inode.layout == format::LAYOUT_FLAT_INLINE {
            let tail_start =
                inode.pos + inode.raw.inode_size() as u64 + inode.raw.xattr_isize() as u64;
            if tail_start.is_multiple_of(bs) {
                self.add(
                    Severity::Warning,
                    nid,
                    at,
                    CorruptKind::InlineAtBlockStart.to_string(),
                );
            }
        }
        // The kernel keeps i_size in a signed loff_t: above 2^63-1 it is negative there.
        if inode.size() > i64::MAX as u64 {
            self.err(
                nid,
                at,
                format!("size {} is larger than 2^63-1 bytes", inode.size()),
            );
            return;
        }
        match inode.file_type() {
            mode::S_IFREG => {
                self.report.files += 1;
                self.report.file_bytes = self.report.file_bytes.saturating_add(inode.size());
                self.extents(inode, at);
            }
            mode::S_IFDIR => self.extents(inode, at),
            mode::S_IFLNK => {
                if !self.charge(inode.size().min(crate::reader::MAX_SYMLINK_SIZE)) {
                    return;
                }
                match img.read_link(inode) {
                    Ok(t) if t.contains(&0) => self.err(nid, at, "symlink target contains NUL"),
                    Ok(t) if t.len() > 4095 => {
                        self.err(nid, at, "symlink target longer than 4095 bytes")
                    }
                    Ok(_) => {}
                    Err(e) => self.err(nid, at, e.to_string()),
                }
            }
            _ => {
                if inode.size() != 0 {
                    self.err(nid, at, format!("special file has size {}", inode.size()));
                }
            }
        }
    }

    /// Check an extent lies inside its device; false (with an error) if not.
    fn in_device(&mut self, nid: u64, at: At, device: u16, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        match self.img.device_size(device) {
            None => {
                self.err(
                    Some(nid),
                    at,
                    format!("data on device {device}, which was not provided"),
                );
                false
            }
            Some(s) if end > s => {
                self.err(
                    Some(nid),
                    at,
                    format!(
                        "data at {offset}..{end} is past the end of device {device} ({s} bytes)"
                    ),
                );
                false
            }
            _ => true,
        }
    }

    /// Map every extent of a file and check it lies inside its device; for chunk-based
    /// inodes, every chunk-table entry (read in batches), its device id included.
    fn extents(&mut self, inode: &Inode, at: At) {
        let img = self.img;
        let nid = inode.nid;
        if let Some(c) = inode.chunk_info() {
            let extra = img.superblock().extra_devices;
            let mask = img.device_id_mask();
            let unit = c.entry_size();
            let walked = img.for_each_chunk(inode, |k, raw, extent| {
                if !self.charge(unit) {
                    return ControlFlow::Break(());
                }
                if raw.blkaddr != format::NULL_ADDR && raw.device_id > extra {
                    self.err(
                        Some(nid),
                        at,
                        format!(
                            "chunk {k}: device id {} is not in the device table ({extra} extra \
                             devices); the kernel would read device {} instead",
                            raw.device_id,
                            raw.device_id & mask
                        ),
                    );
                    return ControlFlow::Break(());
                }
                match extent {
                    Ok(Extent::Hole(_)) => ControlFlow::Continue(()),
                    Ok(Extent::Data {
                        device,
                        offset,
                        len,
                    }) => {
                        if self.in_device(nid, at, device, offset, len) {
                            ControlFlow::Continue(())
                        } else {
                            ControlFlow::Break(())
                        }
                    }
                    Err(e) => {
                        self.err(Some(nid), at, corrupt_message(e));
                        ControlFlow::Break(())
                    }
                }
            });
            if let Err(e) = walked {
                self.err(Some(nid), at, corrupt_message(e));
            }
            return;
        }
        // Flat layouts map in at most two extents (the blocks, then an inline tail).
        let size = inode.size();
        let mut off = 0u64;
        for _ in 0..4 {
            if off >= size {
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
                    if !self.in_device(nid, at, device, offset, len) {
                        return;
                    }
                    off = off.saturating_add(len);
                }
                Err(e) => return self.err(Some(nid), at, corrupt_message(e)),
            }
        }
        if off < size {
            self.err(Some(nid), at, "too many extents for a flat layout");
        }
    }

    /// The inline xattr body and the shared xattrs it names: structure as the kernel reads
    /// it, and, with the name filter on, that no xattr is filtered out.
    fn xattrs(&mut self, inode: &Inode, at: At) {
        let img = self.img;
        let nid = Some(inode.nid);
        let isize = inode.raw.xattr_isize();
        if isize == 0 {
            return;
        }
        if isize <= format::XATTR_IBODY_HEADER_SIZE {
            // i_xattr_icount 1: the kernel refuses a body that is only a header.
            return self.err(
                nid,
                at,
                format!("xattr body of {isize} bytes holds only its header (EOPNOTSUPP)"),
            );
        }
        if !self.charge(isize as u64) {
            return;
        }
        let mut body = vec![0u8; isize];
        if img
            .read_exact_at(0, inode.xattr_start(), &mut body)
            .is_err()
        {
            return self.err(
                nid,
                at,
                CorruptKind::BadXattr("xattr body beyond the image").to_string(),
            );
        }
        let Some(hdr) = format::XattrIbodyHeader::decode(&body) else {
            return self.err(nid, at, "xattr body smaller than its header");
        };
        let shared = hdr.shared_count as usize;
        let mut p = format::XATTR_IBODY_HEADER_SIZE + shared * 4;
        if p > body.len() {
            return self.err(
                nid,
                at,
                format!("{shared} shared xattr ids do not fit the {isize}-byte xattr body"),
            );
        }
        let sb = img.superblock();
        let filter = (sb.feature_compat & format::FEATURE_COMPAT_XATTR_FILTER != 0
            && sb.xattr_filter_reserved == 0)
            .then_some(hdr.name_filter);
        // The first xattr the filter hides: (index, suffix, bit).
        let mut hidden: Option<(u8, Vec<u8>, u32)> = None;
        for i in 0..shared {
            let o = format::XATTR_IBODY_HEADER_SIZE + i * 4;
            let id = format::decode_u32(&body[o..]).unwrap_or(0);
            match self.shared_xattr(id) {
                Ok((index, bit)) => {
                    if filter.is_some_and(|f| f & (1 << bit) != 0) && hidden.is_none() {
                        let name = self.shared_name(id).unwrap_or_default();
                        hidden = Some((index, name, bit));
                    }
                }
                Err(why) => {
                    if !self.exhausted {
                        self.err(nid, at, format!("shared xattr {id}: {why}"));
                    }
                    return;
                }
            }
        }
        while p < body.len() {
            let Some(e) = format::XattrEntry::decode(&body[p..]) else {
                return self.err(
                    nid,
                    at,
                    CorruptKind::BadXattr("truncated entry").to_string(),
                );
            };
            let (nl, vl) = (e.name_len as usize, e.value_size as usize);
            let end = p + format::XATTR_ENTRY_SIZE + nl + vl;
            if end > body.len() {
                return self.err(
                    nid,
                    at,
                    CorruptKind::BadXattr("entry overflows the body").to_string(),
                );
            }
            if format::xattr_prefix(e.name_index).is_none() {
                return self.err(
                    nid,
                    at,
                    format!("xattr name index {} is unknown", e.name_index),
                );
            }
            let suffix = &body[p + format::XATTR_ENTRY_SIZE..p + format::XATTR_ENTRY_SIZE + nl];
            let bit = format::xattr_filter_bit(e.name_index, suffix);
            if filter.is_some_and(|f| f & (1 << bit) != 0) && hidden.is_none() {
                hidden = Some((e.name_index, suffix.to_vec(), bit));
            }
            p = end.next_multiple_of(4);
        }
        if let (Some(f), Some((index, suffix, bit))) = (filter, hidden) {
            let mut name = format::xattr_prefix(index).unwrap_or_default().to_vec();
            name.extend_from_slice(&suffix);
            self.err(
                nid,
                at,
                format!(
                    "xattr {:?} is marked absent by the inode's name filter ({f:#010x}, bit \
                     {bit}): the kernel's getxattr answers ENODATA for it",
                    String::from_utf8_lossy(&name)
                ),
            );
        }
    }

    /// Validate one shared xattr (once per id, while there is room to remember it): its
    /// header, its name index, and that its name and value lie inside the image. Returns
    /// its name index and name-filter bit.
    fn shared_xattr(&mut self, id: u32) -> Result<(u8, u32), &'static str> {
        if let Some(&r) = self.shared.get(&id) {
            return if self.charge(4) {
                r
            } else {
                Err("check stopped")
            };
        }
        let img = self.img;
        let addr = img.superblock().xattr_blkaddr as u64 * img.block_size() + id as u64 * 4;
        let mut hdr = [0u8; format::XATTR_ENTRY_SIZE];
        let r = (|| {
            img.read_exact_at(0, addr, &mut hdr)
                .map_err(|_| "beyond the image")?;
            let e = format::XattrEntry::decode(&hdr).ok_or("truncated entry")?;
            if format::xattr_prefix(e.name_index).is_none() {
                return Err("unknown name index");
            }
            let name_at = addr + format::XATTR_ENTRY_SIZE as u64;
            let end = name_at + e.name_len as u64 + e.value_size as u64;
            if end > img.device_size(0).unwrap_or(0) {
                return Err("name or value beyond the image");
            }
            let mut name = [0u8; 255];
            let name = &mut name[..e.name_len as usize];
            img.read_exact_at(0, name_at, name)
                .map_err(|_| "beyond the image")?;
            Ok((e.name_index, format::xattr_filter_bit(e.name_index, name)))
        })();
        if !self.charge(format::XATTR_ENTRY_SIZE as u64 + 255) {
            return Err("check stopped");
        }
        if self.shared.len() < SHARED_REMEMBERED {
            self.shared.insert(id, r);
        }
        r
    }

    /// The name suffix of a shared xattr already validated (for a message).
    fn shared_name(&self, id: u32) -> Option<Vec<u8>> {
        let img = self.img;
        let addr = img.superblock().xattr_blkaddr as u64 * img.block_size() + id as u64 * 4;
        let mut hdr = [0u8; format::XATTR_ENTRY_SIZE];
        img.read_exact_at(0, addr, &mut hdr).ok()?;
        let e = format::XattrEntry::decode(&hdr)?;
        let mut name = vec![0u8; e.name_len as usize];
        img.read_exact_at(0, addr + format::XATTR_ENTRY_SIZE as u64, &mut name)
            .ok()?;
        Some(name)
    }
}

/// A reader error as a finding's message (corruption kinds without the "corrupt image"
/// wrapping, which the finding's nid already gives).
fn corrupt_message(e: Error) -> String {
    match e {
        Error::Corrupt(c) => c.kind.to_string(),
        e => e.to_string(),
    }
}
