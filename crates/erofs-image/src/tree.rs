//! The in-memory filesystem tree a builder fills before laying out the image.
//!
//! Only metadata lives here: file data has already been written (full images) or stays in the
//! tar (index images), and nodes only record where. Memory is therefore proportional to the
//! number of entries and the size of their names, xattrs and inline tails.
//!
//! The tree also implements how an OCI layer changes a directory tree: later entries replace
//! earlier ones (a directory over a directory only updates attributes), hardlinks alias earlier
//! nodes, missing parents are created, and `.wh.` markers become overlayfs whiteouts and opaque
//! directories.

use std::collections::BTreeMap;

use crate::error::{EntryError, Error};
use crate::format::{self, ChunkIndex, mode};

/// Index of a node in the arena.
pub type NodeId = u32;

/// The root directory's id.
pub const ROOT: NodeId = 0;

/// An extended attribute: full name, value.
pub type Xattr = (Box<[u8]>, Box<[u8]>);

/// Inode attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
}

/// Where a regular file's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileData {
    /// No data.
    Empty,
    /// `ceil(size / bs)` contiguous blocks from `blkaddr` in the primary device.
    Blocks {
        /// First block.
        blkaddr: u32,
        /// File size.
        size: u64,
    },
    /// `size / bs` full blocks from `blkaddr` ([`format::NULL_ADDR`] if none), and the last
    /// partial block stored right after the inode.
    Tail {
        /// First full block.
        blkaddr: u32,
        /// File size.
        size: u64,
        /// The last `size % bs` bytes.
        tail: Box<[u8]>,
    },
    /// A chunk table: holes, or data on an extra device (tar index).
    Chunks {
        /// File size.
        size: u64,
        /// log2 of the chunk size.
        chunkbits: u8,
        /// One entry per chunk.
        chunks: Vec<ChunkIndex>,
    },
}

impl FileData {
    /// The file size.
    pub fn size(&self) -> u64 {
        match self {
            FileData::Empty => 0,
            FileData::Blocks { size, .. }
            | FileData::Tail { size, .. }
            | FileData::Chunks { size, .. } => *size,
        }
    }
}

/// What a node is.
#[derive(Debug, Clone)]
pub enum Body {
    /// Directory: children by name.
    Dir(BTreeMap<Box<[u8]>, NodeId>),
    /// Regular file.
    File(FileData),
    /// Symbolic link target.
    Symlink(Box<[u8]>),
    /// Character or block device (type in the mode), encoded rdev.
    Device(u32),
    /// FIFO or socket (type in the mode).
    Special,
}

/// One inode.
#[derive(Debug, Clone)]
pub struct Node {
    /// Attributes.
    pub meta: Meta,
    /// Extended attributes: full name, value.
    pub xattrs: Vec<Xattr>,
    /// Contents.
    pub body: Body,
    /// `.wh..wh..opq` seen for this directory.
    pub opaque: bool,
}

impl Node {
    /// Whether this node is an overlayfs whiteout (character device 0:0).
    pub fn is_whiteout(&self) -> bool {
        self.meta.mode & mode::S_IFMT == mode::S_IFCHR && matches!(self.body, Body::Device(0))
    }
    /// Whether this node is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir(_))
    }
}

/// The tree being built.
#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
    /// Attributes for directories created only because a descendant needed them.
    pub implicit_dir: Meta,
}

/// Xattr names EROFS can store; others are dropped with a warning, as mkfs.erofs does.
pub fn storable_xattr(name: &[u8]) -> bool {
    matches!(format::split_xattr_name(name), Some((idx, suffix))
        if !suffix.is_empty() || matches!(idx, format::xattr_index::POSIX_ACL_ACCESS | format::xattr_index::POSIX_ACL_DEFAULT))
}

impl Tree {
    /// A tree holding only a root directory with `root` attributes.
    pub fn new(root: Meta) -> Self {
        Tree {
            nodes: vec![Node {
                meta: Meta {
                    mode: mode::S_IFDIR | (root.mode & 0o7777),
                    ..root
                },
                xattrs: Vec::new(),
                body: Body::Dir(BTreeMap::new()),
                opaque: false,
            }],
            implicit_dir: Meta {
                mode: mode::S_IFDIR | 0o755,
                ..root
            },
        }
    }

    /// Number of nodes ever created (some may have become unreachable).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether only the root exists.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// A node.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// A node, mutably.
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id as usize]
    }

    /// Add an unattached node.
    pub fn add(&mut self, node: Node) -> Result<NodeId, Error> {
        let id = NodeId::try_from(self.nodes.len())
            .map_err(|_| Error::TooLarge("more than 2^32 inodes".into()))?;
        self.nodes.push(node);
        Ok(id)
    }

    fn children(&self, dir: NodeId) -> &BTreeMap<Box<[u8]>, NodeId> {
        match &self.nodes[dir as usize].body {
            Body::Dir(c) => c,
            _ => unreachable!("children of a non-directory"),
        }
    }

    fn children_mut(&mut self, dir: NodeId) -> &mut BTreeMap<Box<[u8]>, NodeId> {
        match &mut self.nodes[dir as usize].body {
            Body::Dir(c) => c,
            _ => unreachable!("children of a non-directory"),
        }
    }

    /// Child `name` of directory `dir`.
    pub fn child(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.children(dir).get(name).copied()
    }

    /// Iterate a directory's children in byte order.
    pub fn dir_entries(&self, dir: NodeId) -> impl Iterator<Item = (&[u8], NodeId)> {
        self.children(dir).iter().map(|(k, &v)| (&k[..], v))
    }

    /// Resolve a normalised path to a node, without creating anything.
    pub fn lookup(&self, path: &[u8]) -> Option<NodeId> {
        let mut cur = ROOT;
        if path.is_empty() {
            return Some(cur);
        }
        for comp in path.split(|&c| c == b'/') {
            if !self.nodes[cur as usize].is_dir() {
                return None;
            }
            cur = self.child(cur, comp)?;
        }
        Some(cur)
    }

    /// The directory at `path`, creating missing directories (and replacing whiteouts that
    /// stand where a directory is needed, since a real entry beneath wins over them).
    pub fn ensure_dir(&mut self, path: &[u8]) -> Result<NodeId, Error> {
        let mut cur = ROOT;
        if path.is_empty() {
            return Ok(cur);
        }
        for comp in path.split(|&c| c == b'/') {
            match self.child(cur, comp) {
                Some(id) if self.nodes[id as usize].is_dir() => cur = id,
                Some(id) if self.nodes[id as usize].is_whiteout() => {
                    let d = self.new_implicit_dir()?;
                    self.children_mut(cur).insert(comp.into(), d);
                    cur = d;
                }
                Some(_) => {
                    return Err(Error::entry(path, EntryError::ParentNotDirectory));
                }
                None => {
                    let d = self.new_implicit_dir()?;
                    self.children_mut(cur).insert(comp.into(), d);
                    cur = d;
                }
            }
        }
        Ok(cur)
    }

    fn new_implicit_dir(&mut self) -> Result<NodeId, Error> {
        self.add(Node {
            meta: self.implicit_dir,
            xattrs: Vec::new(),
            body: Body::Dir(BTreeMap::new()),
            opaque: false,
        })
    }

    /// Add a directory entry `name` in `dir` pointing at an existing node (a hardlink found by
    /// inode number rather than by path).
    pub fn insert_child(&mut self, dir: NodeId, name: &[u8], target: NodeId) {
        self.children_mut(dir).insert(name.into(), target);
    }

    /// Remove the entry `name` from directory `dir` (the node stays in the arena, unreachable
    /// unless linked elsewhere).
    pub fn remove_child(&mut self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.children_mut(dir).remove(name)
    }

    /// Put `node` at `path`, following tar semantics: a directory over a directory updates the
    /// attributes and keeps the children; anything else replaces what was there.
    pub fn put(&mut self, path: &[u8], node: Node) -> Result<NodeId, Error> {
        if path.is_empty() {
            if !node.is_dir() {
                return Err(Error::entry(path, EntryError::RootNotDirectory));
            }
            let root = &mut self.nodes[ROOT as usize];
            root.meta = node.meta;
            root.xattrs = node.xattrs;
            return Ok(ROOT);
        }
        let (parent, name) = split_path(path);
        let parent = self.ensure_dir(parent)?;
        if let Some(existing) = self.child(parent, name)
            && self.nodes[existing as usize].is_dir()
            && node.is_dir()
        {
            let e = &mut self.nodes[existing as usize];
            e.meta = node.meta;
            e.xattrs = node.xattrs;
            return Ok(existing);
        }
        let id = self.add(node)?;
        self.children_mut(parent).insert(name.into(), id);
        Ok(id)
    }

    /// Hardlink `path` to the node at `target`.
    pub fn link(&mut self, path: &[u8], target: &[u8]) -> Result<NodeId, Error> {
        let t = self
            .lookup(target)
            .filter(|&t| !self.nodes[t as usize].is_whiteout())
            .ok_or_else(|| Error::entry(path, EntryError::HardlinkTargetMissing(lossy(target))))?;
        if self.nodes[t as usize].is_dir() {
            return Err(Error::entry(
                path,
                EntryError::HardlinkToDirectory(lossy(target)),
            ));
        }
        if path.is_empty() {
            return Err(Error::entry(path, EntryError::RootNotDirectory));
        }
        let (parent, name) = split_path(path);
        let parent = self.ensure_dir(parent)?;
        self.children_mut(parent).insert(name.into(), t);
        Ok(t)
    }

    /// Record an OCI whiteout `.wh.<name>` found in directory `parent_path`. A real entry of
    /// the same name in this layer wins, whichever came first.
    pub fn whiteout(&mut self, parent_path: &[u8], name: &[u8], meta: Meta) -> Result<(), Error> {
        let parent = self.ensure_dir(parent_path)?;
        if let Some(existing) = self.child(parent, name)
            && !self.nodes[existing as usize].is_whiteout()
        {
            return Ok(());
        }
        let id = self.add(Node {
            meta: Meta {
                mode: mode::S_IFCHR,
                ..meta
            },
            xattrs: Vec::new(),
            body: Body::Device(0),
            opaque: false,
        })?;
        self.children_mut(parent).insert(name.into(), id);
        Ok(())
    }

    /// Mark a directory opaque (`.wh..wh..opq`).
    pub fn set_opaque(&mut self, dir_path: &[u8]) -> Result<(), Error> {
        let d = self.ensure_dir(dir_path)?;
        self.nodes[d as usize].opaque = true;
        Ok(())
    }

    /// Apply the overlayfs xattrs a lower layer needs: `trusted.overlay.opaque=y` on opaque
    /// directories, and `trusted.overlay.origin=""` on directories that hold whiteouts (so
    /// overlayfs merge-iterates them and keeps the whiteouts hidden even where no lower layer
    /// has the directory). Existing values are kept.
    pub fn apply_overlay_xattrs(&mut self) {
        const OPAQUE: &[u8] = b"trusted.overlay.opaque";
        const ORIGIN: &[u8] = b"trusted.overlay.origin";
        for i in 0..self.nodes.len() {
            let Body::Dir(children) = &self.nodes[i].body else {
                continue;
            };
            let has_whiteout = children
                .values()
                .any(|&c| self.nodes[c as usize].is_whiteout());
            let n = &mut self.nodes[i];
            if n.opaque && !n.xattrs.iter().any(|(k, _)| &k[..] == OPAQUE) {
                n.xattrs.push((OPAQUE.into(), (*b"y").into()));
            }
            if has_whiteout && !n.xattrs.iter().any(|(k, _)| &k[..] == ORIGIN) {
                n.xattrs.push((ORIGIN.into(), Box::new([])));
            }
        }
    }
}

/// Split a non-empty normalised path into parent and last component.
pub fn split_path(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(m: u32) -> Meta {
        Meta {
            mode: m,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
        }
    }
    fn file() -> Node {
        Node {
            meta: meta(mode::S_IFREG | 0o644),
            xattrs: vec![],
            body: Body::File(FileData::Empty),
            opaque: false,
        }
    }
    fn dir(m: u32) -> Node {
        Node {
            meta: meta(mode::S_IFDIR | m),
            xattrs: vec![],
            body: Body::Dir(BTreeMap::new()),
            opaque: false,
        }
    }

    #[test]
    fn file_wins_over_whiteout_either_order() {
        let mut t = Tree::new(meta(0o755));
        t.put(b"a/x", file()).unwrap();
        t.whiteout(b"a", b"x", meta(0)).unwrap();
        assert!(!t.node(t.lookup(b"a/x").unwrap()).is_whiteout());
        t.whiteout(b"a", b"y", meta(0)).unwrap();
        t.put(b"a/y", file()).unwrap();
        assert!(!t.node(t.lookup(b"a/y").unwrap()).is_whiteout());
        t.whiteout(b"a", b"z", meta(0)).unwrap();
        assert!(t.node(t.lookup(b"a/z").unwrap()).is_whiteout());
        t.apply_overlay_xattrs();
        let a = t.node(t.lookup(b"a").unwrap());
        assert!(
            a.xattrs
                .iter()
                .any(|(k, _)| &k[..] == b"trusted.overlay.origin")
        );
    }

    #[test]
    fn dir_over_dir_keeps_children() {
        let mut t = Tree::new(meta(0o755));
        t.put(b"d/f", file()).unwrap();
        t.put(b"d", dir(0o700)).unwrap();
        let d = t.lookup(b"d").unwrap();
        assert_eq!(t.node(d).meta.mode & 0o7777, 0o700);
        assert!(t.lookup(b"d/f").is_some());
        t.put(b"d", file()).unwrap();
        assert!(t.lookup(b"d/f").is_none());
    }

    #[test]
    fn hardlinks() {
        let mut t = Tree::new(meta(0o755));
        t.put(b"a", file()).unwrap();
        t.link(b"b", b"a").unwrap();
        assert_eq!(t.lookup(b"a"), t.lookup(b"b"));
        assert!(matches!(t.link(b"c", b"missing"), Err(Error::Entry { .. })));
        t.put(b"d", dir(0o755)).unwrap();
        assert!(matches!(t.link(b"e", b"d"), Err(Error::Entry { .. })));
    }

    #[test]
    fn parent_must_be_dir() {
        let mut t = Tree::new(meta(0o755));
        t.put(b"f", file()).unwrap();
        assert!(t.put(b"f/x", file()).is_err());
    }
}
