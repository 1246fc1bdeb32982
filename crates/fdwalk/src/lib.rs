//! Walking a directory tree that someone else may be changing at the same time, by file
//! descriptors, without ever following a symlink or leaving the tree.
//!
//! The tree this is for is a running container's overlayfs upper directory, read by a daemon
//! that runs as root in the host's mount namespace (to diff it, to turn it into a layer, to
//! measure it). The container can rename, replace and symlink anything in that tree while we
//! read it, so a walk that goes by path (`stat(root/a/b)`, then `open(root/a/b)`) can be made
//! to open a host file: swap `a` or `b` for a symlink to `/` between the two calls and the open
//! follows it (the CVE-2018-15664 class). This crate is the one way the workspace reads such
//! trees: the image builder (`erofs-image`'s directory source) and the snapshotter (Compare,
//! Usage) both use it, and it knows nothing of either (no EROFS, no containerd), which is why it
//! is its own crate rather than a module of one of them.
//!
//! # What it promises
//!
//! - **Nothing is followed, nothing is left.** The root is opened once; every other open is an
//!   `openat2` relative to a directory of the tree that we hold open, with `RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV` and `O_NOFOLLOW`. The kernel
//!   then refuses, atomically with the lookup, any symlink on the way (a symlink entry itself
//!   is opened as an `O_PATH` handle on the link, never its target), any `..` above the root
//!   and any mount crossing. Metadata comes from `statx(AT_SYMLINK_NOFOLLOW)` of a name in a
//!   held directory or from the opened descriptor itself; link targets from `readlinkat` on
//!   the link's own descriptor.
//! - **What is opened is what was walked.** Each [`Entry`] is reported with the metadata of
//!   the name when it was listed. Every later open of it ([`Entry::open`], a directory being
//!   listed, [`Tree::open_at`] long after the walk, a reopen for reading) checks the type,
//!   device and inode of the opened descriptor against that metadata. A mismatch, or the name
//!   being gone, is [`Error::Changed`] naming the path: the tree changed under us, and nothing
//!   of what the name now points at is read.
//! - **Entries removed before we look are left out**: a name listed but gone when it is stat'ed
//!   is skipped, as if it had been removed just before the walk started. (A directory that is
//!   gone or replaced when its turn to be listed comes is an error, unless the walk was built
//!   with [`Walk::skip_changed`], which skips it: Usage wants a number, not a refusal.)
//! - **Other filesystems are not entered.** A mount point inside the tree (only the host can
//!   make one: a container's mounts live in its own namespace, on top of the merged view, not
//!   in the upper directory) holds host data, not the container's. A walk refuses it with
//!   [`Error::CrossesMount`], or skips it with [`Walk::skip_mounts`] (which also skips entries
//!   on another device, as Usage always did).
//!
//! A walk of a live tree is not a snapshot of it: entries are read one after the other, so the
//! result can mix states the tree was in at different moments. Each entry is consistent in
//! itself (its metadata, attributes, link target and data come from one inode), and every
//! byte read belongs to an inode that was inside the tree when it was read.
//!
//! # Regular files, attributes and `/proc`
//!
//! Entries are opened with `O_PATH` first: such a handle neither opens a device node (with its
//! driver's side effects), nor blocks on a FIFO, nor follows a symlink. Reading a regular file
//! or listing the attributes of a file or a directory needs a real descriptor: the `O_PATH`
//! handle is reopened through its `/proc/self/fd/N` link, which names that very inode (the
//! kernel jumps to the handle's file; no name in the tree is looked up again), and the reopened
//! descriptor is checked against the handle. Only regular files and directories are reopened.
//!
//! The attributes of symlinks, device nodes, FIFOs and sockets cannot be read by descriptor
//! (`fgetxattr` refuses `O_PATH` handles, and opening the node is what we must not do). They are
//! read with `getxattr("/proc/self/fd/N")`: the magic link resolves to the inode the handle
//! holds and is not resolved further (a symlink's own attributes are read, not its target's,
//! which the tests check), and nothing is opened. This trusts the host's `/proc`, which a
//! container cannot change; [`Tree::open`] checks that `/proc/self/fd` is procfs and fails
//! with [`Error::NoProcfs`] otherwise.

mod error;
mod meta;
mod xattr;

use std::cell::OnceCell;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, StatxFlags};
use rustix::io::Errno;

pub use error::{Error, Result};
pub use meta::{Kind, Meta};

/// Every lookup stays in the tree: no symlink, no magic link, no `..` above the start, no
/// other mount.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// The longest path handed to one `openat2` (PATH_MAX is 4096 with its NUL); longer relative
/// paths are resolved a few components at a time, each step beneath the last.
const CHUNK: usize = 4000;

/// A directory tree, its root held open.
#[derive(Debug)]
pub struct Tree {
    root: OwnedFd,
    meta: Meta,
    path: PathBuf,
    /// `/proc/self/fd`, checked to be procfs: where `O_PATH` handles are reopened.
    proc_fd: OwnedFd,
}

impl Tree {
    /// Open the tree at `path` (which must be a directory, not a symlink to one; the path
    /// itself is the caller's and is trusted).
    pub fn open(path: &Path) -> Result<Tree> {
        let root = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::NOTDIR | Errno::LOOP => Error::NotADirectory {
                path: path.display().to_string(),
            },
            e => Error::io("opening", path.display().to_string(), e),
        })?;
        let meta = stat_fd(&root).map_err(|e| Error::io("stat", path.display().to_string(), e))?;
        let proc_fd = rustix::fs::open(
            "/proc/self/fd",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|_| Error::NoProcfs)?;
        match rustix::fs::fstatfs(&proc_fd) {
            Ok(s) if s.f_type == rustix::fs::PROC_SUPER_MAGIC => {}
            _ => return Err(Error::NoProcfs),
        }
        Ok(Tree {
            root,
            meta,
            path: path.to_path_buf(),
            proc_fd,
        })
    }

    /// The root's metadata.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The root's path, as given to [`Tree::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root itself, as a [`Node`] (for its attributes).
    pub fn root(&self) -> Result<Node<'_>> {
        self.open_at(b"", &self.meta)
    }

    /// A walk of the tree (the root itself is not one of its entries). Entries come directory
    /// by directory: all of one directory's entries in byte order of their names, then the
    /// first subdirectory's, its subdirectories depth first, then the next subdirectory's.
    pub fn walk(&self) -> Walk<'_> {
        Walk {
            tree: self,
            skip_mounts: false,
            skip_changed: false,
            pending: vec![(Vec::new(), self.meta)],
            cur: None,
            done: false,
        }
    }

    /// Open the entry at `rel` (a path relative to the root, `/`-separated, as
    /// [`Entry::path`] gives it) again, checking that it is still the inode `walked` describes.
    /// For reading an entry long after it was walked.
    pub fn open_at(&self, rel: &[u8], walked: &Meta) -> Result<Node<'_>> {
        let fd = self
            .resolve(rel, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC)
            .map_err(|e| self.open_error(rel, e))?;
        self.check(&fd, rel, walked)?;
        Ok(Node {
            tree: self,
            fd,
            meta: *walked,
            path: rel.to_vec(),
            file: OnceCell::new(),
        })
    }

    /// Open the directory at `rel` for listing, checking it is still the one walked.
    fn open_dir(&self, rel: &[u8], walked: &Meta) -> Result<OwnedFd> {
        let fd = self
            .resolve(
                rel,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            )
            .map_err(|e| self.open_error(rel, e))?;
        self.check(&fd, rel, walked)?;
        Ok(fd)
    }

    /// `openat2` of `rel` beneath the root, a chunk at a time when it is longer than one
    /// lookup may be.
    fn resolve(&self, rel: &[u8], flags: OFlags) -> rustix::io::Result<OwnedFd> {
        let mut held: Option<OwnedFd> = None;
        let mut rest = if rel.is_empty() { &b"."[..] } else { rel };
        while rest.len() > CHUNK {
            // Names are at most 255 bytes, so a separator is always within the chunk.
            let cut = rest[..CHUNK]
                .iter()
                .rposition(|&c| c == b'/')
                .ok_or(Errno::NAMETOOLONG)?;
            let dir = held.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let next = openat2(
                dir,
                &rest[..cut],
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            )?;
            held = Some(next);
            rest = &rest[cut + 1..];
        }
        let dir = held.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
        openat2(dir, rest, flags)
    }

    /// The error for an open of a walked entry that failed.
    fn open_error(&self, rel: &[u8], e: Errno) -> Error {
        match e {
            // Gone, or a symlink (ELOOP) or a non-directory (ENOTDIR) where a directory was.
            Errno::NOENT | Errno::LOOP | Errno::NOTDIR => Error::Changed {
                path: self.display(rel),
                what: "it was removed or replaced",
            },
            Errno::XDEV => Error::CrossesMount {
                path: self.display(rel),
            },
            e => Error::io("opening", self.display(rel), e),
        }
    }

    /// That `fd` is the inode `walked` describes.
    fn check(&self, fd: &OwnedFd, rel: &[u8], walked: &Meta) -> Result<()> {
        let now = stat_fd(fd).map_err(|e| Error::io("stat", self.display(rel), e))?;
        if now.same_inode(walked) {
            Ok(())
        } else {
            Err(Error::Changed {
                path: self.display(rel),
                what: "it was replaced by another file",
            })
        }
    }

    /// A path of the tree for messages: the root, then `rel` shortened if long.
    pub fn display(&self, rel: &[u8]) -> String {
        if rel.is_empty() {
            return self.path.display().to_string();
        }
        format!("{}/{}", self.path.display(), error::shorten(rel))
    }
}

/// One `openat2` with [`RESOLVE`], retried when the kernel asks (a rename elsewhere in the
/// filesystem raced the lookup).
fn openat2(dir: BorrowedFd<'_>, path: &[u8], flags: OFlags) -> rustix::io::Result<OwnedFd> {
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dir, path, flags, Mode::empty(), RESOLVE) {
            Err(Errno::AGAIN) if tries < 16 => tries += 1,
            r => return r,
        }
    }
}

fn stat_fd(fd: &OwnedFd) -> rustix::io::Result<Meta> {
    rustix::fs::statx(fd, c"", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS).map(|s| Meta::from(&s))
}

/// A walk: an iterator of [`Entry`], depth first, each directory's entries sorted by name
/// (see [`Tree::walk`]). It stops after the first error.
#[derive(Debug)]
pub struct Walk<'t> {
    tree: &'t Tree,
    skip_mounts: bool,
    skip_changed: bool,
    /// Directories still to list, the next on top.
    pending: Vec<(Vec<u8>, Meta)>,
    cur: Option<Listing>,
    done: bool,
}

/// The directory being listed.
#[derive(Debug)]
struct Listing {
    fd: Arc<OwnedFd>,
    path: Vec<u8>,
    meta: Meta,
    names: std::vec::IntoIter<Vec<u8>>,
    subdirs: Vec<(Vec<u8>, Meta)>,
}

impl<'t> Walk<'t> {
    /// Leave out mount points and entries on another device than the root (and what is
    /// under them) instead of failing with [`Error::CrossesMount`].
    pub fn skip_mounts(mut self) -> Self {
        self.skip_mounts = true;
        self
    }

    /// Leave out a directory that was removed or replaced between being reported and being
    /// listed, instead of failing with [`Error::Changed`].
    pub fn skip_changed(mut self) -> Self {
        self.skip_changed = true;
        self
    }

    fn list(&self, path: Vec<u8>, meta: Meta) -> Result<Listing> {
        let fd = self.tree.open_dir(&path, &meta)?;
        let rd = |e| Error::io("reading directory", self.tree.display(&path), e);
        let mut names = Vec::new();
        for d in rustix::fs::Dir::read_from(&fd).map_err(rd)? {
            let name = d.map_err(rd)?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(name);
            }
        }
        names.sort_unstable();
        Ok(Listing {
            fd: Arc::new(fd),
            path,
            meta,
            names: names.into_iter(),
            subdirs: Vec::new(),
        })
    }

    fn next_entry(&mut self) -> Result<Option<Entry<'t>>> {
        loop {
            if let Some(l) = &mut self.cur {
                let Some(name) = l.names.next() else {
                    let l = self.cur.take().expect("a listing");
                    // Reversed, so they are popped in name order.
                    self.pending.extend(l.subdirs.into_iter().rev());
                    continue;
                };
                let mut path = l.path.clone();
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(&name);
                let st = rustix::fs::statx(
                    &*l.fd,
                    name.as_slice(),
                    AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT,
                    StatxFlags::BASIC_STATS,
                );
                let meta = match st {
                    Ok(s) => Meta::from(&s),
                    // Removed since the listing: left out.
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(Error::io("stat", self.tree.display(&path), e)),
                };
                let mount = meta.mount_root().unwrap_or(meta.dev != l.meta.dev);
                if mount || (self.skip_mounts && meta.dev != self.tree.meta.dev) {
                    if self.skip_mounts {
                        continue;
                    }
                    return Err(Error::CrossesMount {
                        path: self.tree.display(&path),
                    });
                }
                if meta.kind() == Kind::Directory {
                    l.subdirs.push((path.clone(), meta));
                }
                return Ok(Some(Entry {
                    tree: self.tree,
                    parent: l.fd.clone(),
                    name_at: path.len() - name.len(),
                    path,
                    meta,
                }));
            }
            let Some((path, meta)) = self.pending.pop() else {
                return Ok(None);
            };
            match self.list(path, meta) {
                Ok(l) => self.cur = Some(l),
                Err(Error::Changed { .. }) if self.skip_changed => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl<'t> Iterator for Walk<'t> {
    type Item = Result<Entry<'t>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_entry() {
            Ok(Some(e)) => Some(Ok(e)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// One entry of a walk: a name in a directory of the tree, and its metadata when it was
/// listed (never followed: a symlink is reported as a symlink).
#[derive(Debug)]
pub struct Entry<'t> {
    tree: &'t Tree,
    /// The directory it was listed in, held open.
    parent: Arc<OwnedFd>,
    path: Vec<u8>,
    /// Where the name starts in `path`.
    name_at: usize,
    meta: Meta,
}

impl<'t> Entry<'t> {
    /// Its path relative to the root (`a/b/c`).
    pub fn path(&self) -> &[u8] {
        &self.path
    }

    /// Its name.
    pub fn name(&self) -> &[u8] {
        &self.path[self.name_at..]
    }

    /// The path of the directory it is in (empty for the root).
    pub fn parent_path(&self) -> &[u8] {
        &self.path[..self.name_at.saturating_sub(1)]
    }

    /// Its metadata when it was listed.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Open it (an `O_PATH` handle, relative to its directory), checking it is still the
    /// inode that was listed.
    pub fn open(&self) -> Result<Node<'t>> {
        let fd = openat2(
            self.parent.as_fd(),
            self.name(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        )
        .map_err(|e| self.tree.open_error(&self.path, e))?;
        self.tree.check(&fd, &self.path, &self.meta)?;
        Ok(Node {
            tree: self.tree,
            fd,
            meta: self.meta,
            path: self.path.clone(),
            file: OnceCell::new(),
        })
    }
}

/// An opened entry: an `O_PATH` handle on the inode that was walked.
#[derive(Debug)]
pub struct Node<'t> {
    tree: &'t Tree,
    fd: OwnedFd,
    meta: Meta,
    path: Vec<u8>,
    /// The handle reopened for reading (regular files and directories only).
    file: OnceCell<File>,
}

impl Node<'_> {
    /// Its metadata when it was walked.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The inode open for reading: a regular file's data, or a directory (for its
    /// attributes). Other types are never opened.
    pub fn file(&self) -> Result<&File> {
        if let Some(f) = self.file.get() {
            return Ok(f);
        }
        let f = self.reopen()?;
        Ok(self.file.get_or_init(|| f))
    }

    /// [`Node::file`], owned.
    pub fn into_file(self) -> Result<File> {
        self.file()?;
        Ok(self.file.into_inner().expect("opened just above"))
    }

    fn reopen(&self) -> Result<File> {
        let flags = match self.meta.kind() {
            Kind::Regular => OFlags::RDONLY,
            Kind::Directory => OFlags::RDONLY | OFlags::DIRECTORY,
            _ => {
                return Err(Error::io(
                    "reading",
                    self.tree.display(&self.path),
                    Errno::INVAL,
                ));
            }
        };
        let n = self.fd.as_raw_fd().to_string();
        let fd = rustix::fs::openat(
            &self.tree.proc_fd,
            n.as_str(),
            flags | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        )
        .map_err(|e| Error::io("reopening", self.tree.display(&self.path), e))?;
        self.tree.check(&fd, &self.path, &self.meta)?;
        Ok(File::from(fd))
    }

    /// The target of a symlink, read from the link itself.
    pub fn read_link(&self) -> Result<Vec<u8>> {
        rustix::fs::readlinkat(&self.fd, c"", Vec::new())
            .map(|t| t.into_bytes())
            .map_err(|e| Error::io("reading the link", self.tree.display(&self.path), e))
    }

    /// Its extended attributes (names and values), as stored, in the order the filesystem
    /// lists them. An attribute removed while they are read is left out; a filesystem without
    /// attributes has none.
    pub fn xattrs(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let r = match self.meta.kind() {
            Kind::Regular | Kind::Directory => xattr::read(&xattr::ByFd(self.file()?)),
            _ => {
                let link = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
                xattr::read(&xattr::ByProcLink(&link))
            }
        };
        r.map_err(|e| Error::io("reading attributes of", self.tree.display(&self.path), e))
    }

    /// The `O_PATH` handle.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
