//! Tar entries into the tree, with OCI layer semantics.

use std::io::Read;

use super::BuildOptions;
use super::data::{self, DataArea};
use crate::error::{EntryError, Error, Result};
use crate::format::{self, mode};
use crate::output::ImageOutput;
use crate::tar::{Entry, EntryKind, TarReader};
use crate::tree::{Body, FileData, Meta, Node, Tree, Xattr, split_path, storable_xattr};

/// Prefix of the xattrs overlayfs keeps for itself (with its default, non-`userxattr` mounts).
const OVERLAY_XATTRS: &[u8] = b"trusted.overlay.";

/// Produces a regular file's [`FileData`] from the reader positioned at its data. The last
/// argument is the size of the file's inline xattr body.
pub(crate) type FileSink<'a, R> =
    dyn FnMut(&mut TarReader<R>, &Entry, usize) -> Result<FileData> + 'a;

/// Keep the xattrs EROFS can store (dropping others with a warning, as mkfs.erofs does) and
/// check that they fit.
pub(crate) fn checked_xattrs(
    path: &[u8],
    xattrs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
) -> Result<(Vec<Xattr>, usize)> {
    let mut out: Vec<Xattr> = Vec::new();
    for (k, v) in xattrs {
        if !storable_xattr(&k) {
            tracing::warn!(entry = %String::from_utf8_lossy(path), xattr = %String::from_utf8_lossy(&k), "dropping xattr EROFS cannot store");
            continue;
        }
        out.push((k.into(), v.into()));
    }
    let body = super::layout::encode_xattrs(&out).map_err(|e| Error::entry(path, e))?;
    Ok((out, body.len()))
}

/// Read every entry of `tar` into `tree`.
pub(crate) fn read_into_tree<R: Read>(
    tar: &mut TarReader<R>,
    tree: &mut Tree,
    opts: &BuildOptions,
    file_sink: &mut FileSink<'_, R>,
) -> Result<()> {
    let mut budget = super::Budget::default();
    while let Some(entry) = tar.next_entry()? {
        opts.interrupt.check()?;
        let path = entry.path.as_slice();
        super::Budget::check_depth(&opts.limits, path)?;
        let (mtime, mtime_nsec) = opts.mtime(entry.mtime, entry.mtime_nsec);
        let type_bits = match entry.kind {
            EntryKind::Regular | EntryKind::Hardlink => mode::S_IFREG,
            EntryKind::Symlink => mode::S_IFLNK,
            EntryKind::Char => mode::S_IFCHR,
            EntryKind::Block => mode::S_IFBLK,
            EntryKind::Directory => mode::S_IFDIR,
            EntryKind::Fifo => mode::S_IFIFO,
        };
        let meta = Meta {
            mode: type_bits | entry.mode,
            uid: entry.uid,
            gid: entry.gid,
            mtime,
            mtime_nsec,
        };

        if opts.oci_whiteouts && !path.is_empty() {
            let (parent, base) = split_path(path);
            if base == b".wh..wh..opq" {
                tree.set_opaque(parent)?;
                continue;
            }
            if base.starts_with(b".wh..wh.") {
                // AUFS internals (.wh..wh.plnk, .wh..wh.aufs) describe nothing in the layer.
                continue;
            }
            if let Some(name) = base.strip_prefix(b".wh.") {
                if name.is_empty() || name == b"." || name == b".." {
                    return Err(Error::entry(path, EntryError::UnsupportedType));
                }
                tree.whiteout(parent, name, meta)?;
                continue;
            }
        }

        // In an OCI layer, overlayfs's own xattrs (redirect, metacopy, origin, opaque) are
        // never the layer's to set: overlayfs would honour them on the mounted image (a
        // redirect to another lower's directory, a metacopy without data). Opaque directories
        // come from `.wh..wh..opq` markers instead. Compare drops them the same way.
        let overlay_own = |k: &[u8]| opts.oci_whiteouts && k.starts_with(OVERLAY_XATTRS);
        for (k, _) in entry.xattrs.iter().filter(|(k, _)| overlay_own(k)) {
            tracing::warn!(entry = %String::from_utf8_lossy(path), xattr = %String::from_utf8_lossy(k), "dropping an overlayfs xattr from a layer");
        }
        let (xattrs, xattr_len) = checked_xattrs(
            path,
            entry
                .xattrs
                .iter()
                .filter(|(k, _)| !overlay_own(k))
                .cloned(),
        )?;
        let body = match entry.kind {
            EntryKind::Hardlink => {
                budget.charge(&opts.limits, path, &entry.link, &xattrs, tree.len())?;
                tree.link(path, &entry.link)?;
                continue;
            }
            EntryKind::Directory => Body::Dir(Default::default()),
            EntryKind::Regular => Body::File(file_sink(tar, &entry, xattr_len)?),
            EntryKind::Symlink => Body::Symlink(entry.link.clone().into()),
            EntryKind::Char | EntryKind::Block => {
                Body::Device(format::encode_rdev(entry.devmajor, entry.devminor))
            }
            EntryKind::Fifo => Body::Special,
        };
        budget.charge(&opts.limits, path, &entry.link, &xattrs, tree.len())?;
        tree.put(
            path,
            Node {
                meta,
                xattrs,
                body,
                opaque: false,
            },
        )?;
    }
    Ok(())
}

/// Copies `n` bytes of the current entry's data into the data area.
pub(crate) type Copy<R, W> = fn(&mut DataArea<W>, &mut TarReader<R>, u64) -> Result<()>;

pub(crate) fn copy_data<R: Read, W: ImageOutput>(
    area: &mut DataArea<W>,
    tar: &mut TarReader<R>,
    mut n: u64,
) -> Result<()> {
    while n > 0 {
        let chunk = tar.data_chunk()?;
        let k = (chunk.len() as u64).min(n) as usize;
        area.write(&chunk[..k])?;
        tar.consume(k);
        n -= k as u64;
    }
    Ok(())
}

struct TarBytes<'a, R, W: ImageOutput> {
    tar: &'a mut TarReader<R>,
    copy: Copy<R, W>,
    path: &'a [u8],
}

impl<R: Read, W: ImageOutput> data::FileBytes<W> for TarBytes<'_, R, W> {
    fn copy(&mut self, area: &mut DataArea<W>, _off: u64, n: u64) -> Result<()> {
        (self.copy)(area, self.tar, n).map_err(|e| e.in_entry(self.path))
    }
    fn read(&mut self, _off: u64, buf: &mut [u8]) -> Result<()> {
        if self.tar.read_data(buf)? != buf.len() {
            return Err(Error::entry(self.path, EntryError::ChangedWhileReading));
        }
        Ok(())
    }
}

/// Full image: copy the file's data into the data area now.
pub(crate) fn write_full<R: Read, W: ImageOutput>(
    area: &mut DataArea<W>,
    tar: &mut TarReader<R>,
    entry: &Entry,
    xattr_len: usize,
    opts: &BuildOptions,
    copy: Copy<R, W>,
) -> Result<FileData> {
    let mut src = TarBytes {
        tar,
        copy,
        path: &entry.path,
    };
    data::write_file(
        area,
        &mut src,
        entry.file_size,
        entry.sparse.as_deref(),
        xattr_len,
        opts,
    )
}

/// Below this, data already in the reader's buffer is copied through userspace; above, the
/// rest of the entry goes file to file in the kernel.
const DIRECT_MIN: u64 = 64 << 10;

/// [`copy_data`] for a tar that is a regular file: large data is handed to the output as a
/// range of the tar ([`ImageOutput::copy_range`]: in the kernel, a reflink where the
/// filesystem can, for outputs that know how).
pub(crate) fn copy_data_direct<W: ImageOutput>(
    area: &mut DataArea<W>,
    tar: &mut TarReader<crate::tar::FileInput<'_>>,
    mut n: u64,
) -> Result<()> {
    while n > 0 {
        if n >= DIRECT_MIN
            && let Some((off, rem)) = tar.unbuffered()
            && rem >= n
        {
            let input = tar.get_ref().file();
            // Skipping first checks the tar really holds these bytes.
            tar.skip_unbuffered(n)?;
            return area.copy_range(input, off, n);
        }
        let chunk = tar.data_chunk()?;
        let k = (chunk.len() as u64).min(n) as usize;
        area.write(&chunk[..k])?;
        tar.consume(k);
        n -= k as u64;
    }
    Ok(())
}
