//! A directory tree (typically an overlayfs upper directory) into a full image.
//!
//! Everything is copied as it is on disk: overlayfs whiteouts are already character devices
//! 0:0 and opaque directories already carry `trusted.overlay.opaque`, so the image works as an
//! overlay lower layer as is. Directories that hold whiteouts additionally get
//! `trusted.overlay.origin=""` (see [`Tree::apply_overlay_xattrs`]). Hardlinks inside the tree
//! stay hardlinks, and sparse files keep their holes (chunk tables with null chunks). Symlinks
//! are never followed.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

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
    let root_md =
        fs::symlink_metadata(root).map_err(|e| Error::io(format!("stat {}", root.display()), e))?;
    if !root_md.is_dir() {
        return Err(Error::InvalidOption(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut tree = Tree::new(meta_of(&root_md, opts));
    tree.implicit_dir = opts.implicit_dir_meta();
    let (xattrs, _) = checked_xattrs(b"", read_xattrs(root)?)?;
    tree.node_mut(ROOT).xattrs = xattrs;

    let mut area = DataArea::new(output, bs, first_data_block(bs), opts.max_blocks(bs))?;
    let mut links: HashMap<(u64, u64), NodeId> = HashMap::new();
    let mut input_bytes = 0u64;
    let mut budget = super::Budget::default();
    // Depth-first, byte-sorted, so file data lands in a deterministic order.
    let mut stack: Vec<(PathBuf, Vec<u8>)> = vec![(root.to_path_buf(), Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut names: Vec<Vec<u8>> = fs::read_dir(&dir)
            .map_err(|e| Error::io(format!("reading directory {}", dir.display()), e))?
            .map(|r| r.map(|d| d.file_name().as_bytes().to_vec()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io(format!("reading directory {}", dir.display()), e))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = dir.join(std::ffi::OsStr::from_bytes(&name));
            let mut rel_path = rel.clone();
            if !rel_path.is_empty() {
                rel_path.push(b'/');
            }
            rel_path.extend_from_slice(&name);
            let md = fs::symlink_metadata(&path)
                .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
            let ft = md.mode() & mode::S_IFMT;
            if ft != mode::S_IFDIR
                && md.nlink() > 1
                && let Some(&target) = links.get(&(md.dev(), md.ino()))
            {
                let parent = tree.ensure_dir(&rel)?;
                tree.insert_child(parent, &name, target);
                continue;
            }
            let (xattrs, xattr_len) = checked_xattrs(&rel_path, read_xattrs(&path)?)?;
            super::Budget::check_depth(&opts.limits, &rel_path)?;
            budget.charge(&opts.limits, &rel_path, b"", &xattrs, tree.len())?;
            let body = match ft {
                mode::S_IFDIR => {
                    subdirs.push((path.clone(), rel_path.clone()));
                    Body::Dir(Default::default())
                }
                mode::S_IFREG => {
                    input_bytes += md.size();
                    Body::File(
                        write_file(&mut area, &path, &rel_path, &md, xattr_len, opts)
                            .map_err(|e| e.in_entry(&rel_path))?,
                    )
                }
                mode::S_IFLNK => {
                    let target = fs::read_link(&path)
                        .map_err(|e| Error::io(format!("readlink {}", path.display()), e))?;
                    Body::Symlink(target.as_os_str().as_bytes().into())
                }
                mode::S_IFCHR | mode::S_IFBLK => {
                    let rdev = md.rdev();
                    let (major, minor) = (libc_major(rdev), libc_minor(rdev));
                    Body::Device(format::encode_rdev(major, minor))
                }
                mode::S_IFIFO | mode::S_IFSOCK => Body::Special,
                _ => return Err(Error::entry(&rel_path, EntryError::UnsupportedType)),
            };
            let id = tree.put(
                &rel_path,
                Node {
                    meta: meta_of(&md, opts),
                    xattrs,
                    body,
                    opaque: false,
                },
            )?;
            if ft != mode::S_IFDIR && md.nlink() > 1 {
                links.insert((md.dev(), md.ino()), id);
            }
        }
        // Reverse so the stack pops them in sorted order.
        stack.extend(subdirs.into_iter().rev());
    }
    let (out, data_end) = area.finish()?;
    finish_full(out, &mut tree, data_end, opts, input_bytes)
}

fn libc_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

fn libc_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}

fn meta_of(md: &fs::Metadata, opts: &BuildOptions) -> Meta {
    let (mtime, mtime_nsec) = opts.mtime(md.mtime(), md.mtime_nsec() as u32);
    Meta {
        mode: md.mode() & (mode::S_IFMT | 0o7777),
        uid: md.uid(),
        gid: md.gid(),
        mtime,
        mtime_nsec,
    }
}

fn read_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let ctx =
        |e: rustix::io::Errno| Error::io(format!("reading xattrs of {}", path.display()), e.into());
    let mut names = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::llistxattr(path, &mut names) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => {
                let need: usize = rustix::fs::llistxattr(path, &mut [0u8; 0][..]).map_err(ctx)?;
                names.resize(need.max(names.len() * 2), 0);
            }
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(ctx(e)),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&c| c == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::CString::new(name).expect("xattr names have no NUL");
        let mut value = vec![0u8; 256];
        loop {
            match rustix::fs::lgetxattr(path, cname.as_c_str(), &mut value) {
                Ok(k) => {
                    value.truncate(k);
                    break;
                }
                Err(rustix::io::Errno::RANGE) => {
                    let need: usize =
                        rustix::fs::lgetxattr(path, cname.as_c_str(), &mut [0u8; 0][..])
                            .map_err(ctx)?;
                    value.resize(need.max(value.len() * 2), 0);
                }
                // Removed between list and get: nothing to copy.
                Err(rustix::io::Errno::NODATA) => {
                    value.clear();
                    break;
                }
                Err(e) => return Err(ctx(e)),
            }
        }
        out.push((name.to_vec(), value));
    }
    Ok(out)
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
    f: File,
    path: &'a Path,
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
                .map_err(|e| Error::io(format!("reading {}", self.path.display()), e))?;
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
            _ => Error::io(format!("reading {}", self.path.display()), e),
        })
    }
}

fn write_file<W: ImageOutput>(
    area: &mut DataArea<W>,
    path: &Path,
    rel: &[u8],
    md: &fs::Metadata,
    xattr_len: usize,
    opts: &BuildOptions,
) -> Result<FileData> {
    let size = md.size();
    if size == 0 {
        return Ok(FileData::Empty);
    }
    let f = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let sparse = if md.blocks() * 512 < size {
        Some(
            data_segments(&f, size)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?,
        )
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
