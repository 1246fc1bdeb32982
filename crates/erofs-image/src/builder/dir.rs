//! A directory tree (typically an overlayfs upper directory) into a full image.
//!
//! Everything is copied as it is on disk: overlayfs whiteouts are already character devices
//! 0:0 and opaque directories already carry `trusted.overlay.opaque`, so the image works as an
//! overlay lower layer as is. Directories that hold whiteouts additionally get
//! `trusted.overlay.origin=""` (see [`Tree::apply_overlay_xattrs`]). Hardlinks inside the tree
//! stay hardlinks, and sparse files keep their holes (chunk tables with null chunks).
//!
//! The tree may belong to a running container, so it is read with [`fdwalk`]: by file
//! descriptors, never following a symlink, never leaving the tree, never entering another
//! filesystem mounted inside it, and every entry's data, attributes and link target come from
//! the inode that was walked. A tree that changes under the build so that this cannot hold
//! fails it with the walker's error naming the path.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::data::{self, DataArea};
use super::tar::checked_xattrs;
use super::{BuildOptions, Summary, finish_full, first_data_block};
use crate::error::{EntryError, Error, Result};
use crate::format::{self, mode};
use crate::output::ImageOutput;
use crate::tree::{Body, FileData, Meta, Node, NodeId, ROOT, Tree};

/// Build a full image of the directory `root` into `output`.
pub fn dir_to_image<W: ImageOutput>(
    root: &Path,
    output: W,
    opts: &BuildOptions,
) -> Result<Summary> {
    opts.validate()?;
    let bs = opts.block_size;
    let src = match fdwalk::Tree::open(root) {
        Ok(t) => t,
        Err(fdwalk::Error::NotADirectory { path }) => {
            return Err(Error::InvalidOption(format!("{path} is not a directory")));
        }
        Err(e) => return Err(e.into()),
    };
    let mut tree = Tree::new(meta_of(src.meta(), opts));
    tree.implicit_dir = opts.implicit_dir_meta();
    let (xattrs, _) = checked_xattrs(b"", src.root()?.xattrs()?)?;
    tree.node_mut(ROOT).xattrs = xattrs;

    let mut area = DataArea::new(output, bs, first_data_block(bs), opts)?;
    let mut links: HashMap<(u64, u64), NodeId> = HashMap::new();
    let mut input_bytes = 0u64;
    let mut budget = super::Budget::default();
    // Depth-first, byte-sorted (the walk's order), so file data lands in a deterministic order.
    for entry in src.walk() {
        opts.interrupt.check()?;
        let entry = entry?;
        let md = *entry.meta();
        let rel_path = entry.path();
        let ft = md.mode & mode::S_IFMT;
        if ft != mode::S_IFDIR
            && md.nlink > 1
            && let Some(&target) = links.get(&(md.dev, md.ino))
        {
            let parent = tree.ensure_dir(entry.parent_path())?;
            tree.insert_child(parent, entry.name(), target);
            continue;
        }
        let node = entry.open()?;
        let (xattrs, xattr_len) = checked_xattrs(rel_path, node.xattrs()?)?;
        super::Budget::check_depth(&opts.limits, rel_path)?;
        budget.charge(&opts.limits, rel_path, b"", &xattrs, tree.len())?;
        let body = match ft {
            mode::S_IFDIR => Body::Dir(Default::default()),
            mode::S_IFREG => {
                input_bytes += md.size;
                Body::File(
                    write_file(&mut area, &node, &src, rel_path, xattr_len, opts)
                        .map_err(|e| e.in_entry(rel_path))?,
                )
            }
            mode::S_IFLNK => Body::Symlink(node.read_link()?.into()),
            mode::S_IFCHR | mode::S_IFBLK => {
                Body::Device(format::encode_rdev(md.rdev_major, md.rdev_minor))
            }
            mode::S_IFIFO | mode::S_IFSOCK => Body::Special,
            _ => return Err(Error::entry(rel_path, EntryError::UnsupportedType)),
        };
        let id = tree.put(
            rel_path,
            Node {
                meta: meta_of(&md, opts),
                xattrs,
                body,
                opaque: false,
            },
        )?;
        if ft != mode::S_IFDIR && md.nlink > 1 {
            links.insert((md.dev, md.ino), id);
        }
    }
    let (out, data_end) = area.finish()?;
    finish_full(out, &mut tree, data_end, opts, input_bytes)
}

fn meta_of(md: &fdwalk::Meta, opts: &BuildOptions) -> Meta {
    let (mtime, mtime_nsec) = opts.mtime(md.mtime, md.mtime_nsec);
    Meta {
        mode: md.mode & (mode::S_IFMT | 0o7777),
        uid: md.uid,
        gid: md.gid,
        mtime,
        mtime_nsec,
    }
}

/// Data segments of a file with holes, from SEEK_DATA/SEEK_HOLE.
fn data_segments(f: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    let mut segs = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(f, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = seek(f, SeekFrom::Hole(start))?.min(size);
        segs.push((start, end - start));
        pos = end;
    }
    Ok(segs)
}

struct FileSource<'a> {
    f: &'a File,
    path: String,
    rel: &'a [u8],
    buf: Vec<u8>,
}

impl<W: ImageOutput> data::FileBytes<W> for FileSource<'_> {
    fn copy(&mut self, area: &mut DataArea<W>, mut off: u64, mut n: u64) -> Result<()> {
        while n > 0 {
            let k = (self.buf.len() as u64).min(n) as usize;
            let got = self
                .f
                .read_at(&mut self.buf[..k], off)
                .map_err(|e| Error::io(format!("reading {}", self.path), e))?;
            if got == 0 {
                return Err(Error::entry(self.rel, EntryError::ChangedWhileReading));
            }
            area.write(&self.buf[..got])?;
            off += got as u64;
            n -= got as u64;
        }
        Ok(())
    }
    fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.f.read_exact_at(buf, off).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                Error::entry(self.rel, EntryError::ChangedWhileReading)
            }
            _ => Error::io(format!("reading {}", self.path), e),
        })
    }
}

fn write_file<W: ImageOutput>(
    area: &mut DataArea<W>,
    node: &fdwalk::Node<'_>,
    src: &fdwalk::Tree,
    rel: &[u8],
    xattr_len: usize,
    opts: &BuildOptions,
) -> Result<FileData> {
    let md = node.meta();
    let size = md.size;
    if size == 0 {
        return Ok(FileData::Empty);
    }
    let f = node.file()?;
    let path = src.display(rel);
    let sparse = if md.blocks * 512 < size {
        Some(data_segments(f, size).map_err(|e| Error::io(format!("reading {path}"), e))?)
    } else {
        None
    };
    let mut src = FileSource {
        f,
        path,
        rel,
        buf: vec![0u8; (1 << 20).min(size as usize)],
    };
    data::write_file(area, &mut src, size, sparse.as_deref(), xattr_len, opts)
}
