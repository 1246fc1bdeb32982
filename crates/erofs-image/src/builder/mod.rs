//! Building EROFS images from tar streams and directories.
//!
//! Full images stream file data into the image as it arrives (block-aligned, from the block
//! after the superblock) and lay the metadata out after the data once the input is exhausted;
//! only metadata and inline tails are held in memory. Tar-index images write no file data at
//! all: regular files become chunk tables pointing into the tar, which follows the index as an
//! extra device (one file `[index][tar]`, or two files).
//!
//! Write order of full images, which callers may rely on (the snapshotter hashes layers for
//! fs-verity and dm-verity while they are built): file data goes from block 1 upward, each
//! block written once and never below the current end of the output; the metadata follows
//! the data; block 0 (the superblock) is written last. So while a full image is being built,
//! every complete block between block 1 and the output's current size is final. Tar-index
//! images give no such guarantee (the tar is written first and moved behind the index).

mod data;
mod dir;
mod index;
pub(crate) mod layout;
mod tar;

use std::io::{Read, Seek, SeekFrom, Write};

pub use dir::dir_to_image;
pub use index::{TarIndex, tar_file_to_index_file, tar_to_index, tar_to_index_file};

use crate::error::{EntryError, Error, Result};
use crate::format::{self, Superblock};
use crate::output::ImageOutput;
use crate::tree::{Meta, Tree};
use data::DataArea;

/// How to build an image.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Block size of full images (512..=4096, a power of two). Tar-index images always use 512.
    pub block_size: u32,
    /// Store the last partial block of small enough regular files right after their inode
    /// (tail packing). Off gives containerd's `-Enoinline_data` layout, where file data stays
    /// block-aligned. Directories and symlinks are inlined either way.
    pub inline_data: bool,
    /// Filesystem UUID.
    pub uuid: [u8; 16],
    /// Image timestamp (`-T`): the mtime of directories the builder creates itself.
    pub timestamp: Option<i64>,
    /// With a timestamp, give every inode that mtime (mkfs.erofs's default when `-T` is given
    /// without `--mkfs-time`).
    pub all_time: bool,
    /// Translate OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) into overlayfs whiteouts and opaque
    /// directories (`mkfs.erofs --aufs`).
    pub oci_whiteouts: bool,
    /// Refuse to write an image larger than this.
    pub max_image_size: Option<u64>,
    /// Budgets on what one source may make the builder hold in memory.
    pub limits: Limits,
    /// Asked between entries and between chunks of file data whether to stop (the caller
    /// gave up, or ran out of something): the build then fails with [`Error::Interrupted`].
    pub interrupt: Interrupt,
}

/// A question the builder asks between entries and between chunks of file data: "stop
/// now?". None by default. The answer should be cheap (it can be asked for every 64 KiB).
#[derive(Clone, Default)]
pub struct Interrupt(Option<std::sync::Arc<dyn Fn() -> bool + Send + Sync>>);

impl Interrupt {
    /// Stop the build once `stop` returns true.
    pub fn new(stop: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Interrupt(Some(std::sync::Arc::new(stop)))
    }

    /// [`Error::Interrupted`] once the caller says stop.
    pub(crate) fn check(&self) -> Result<()> {
        match &self.0 {
            Some(stop) if stop() => Err(Error::Interrupted),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Interrupt(set)"
        } else {
            "Interrupt(none)"
        })
    }
}

/// Budgets on what one layer may make the builder hold or do, so a few kilobytes of hostile
/// (compressed) input cannot take the memory of a node. Each breach is an error naming the
/// entry where it happened and the limit. The defaults are far above real images (the
/// largest seen have about a million entries, nesting below 100 and metadata of a few
/// hundred MB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most inodes an image may have (entries plus the directories they imply).
    pub max_entries: u64,
    /// Most path components of one entry (a PATH_MAX path has at most 2048).
    pub max_depth: usize,
    /// Most bytes of names, link targets and xattrs (names and values) in all.
    pub max_metadata: u64,
    /// A sparse file may take at most this many bytes of image (chunk table and the chunks
    /// its data touches) beyond twice its stored data.
    pub max_sparse_overhead: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 1 << 23,
            max_depth: 2048,
            max_metadata: 1 << 30,
            max_sparse_overhead: 256 << 20,
        }
    }
}

/// What a build has used of its [`Limits`] so far.
#[derive(Debug, Default)]
pub(crate) struct Budget {
    metadata: u64,
}

impl Budget {
    /// Charge one entry (its path, link target and xattrs) and check the tree it went into.
    /// Its depth is checked first, with [`Self::check_depth`].
    pub(crate) fn charge(
        &mut self,
        limits: &Limits,
        path: &[u8],
        link: &[u8],
        xattrs: &[crate::tree::Xattr],
        tree_len: usize,
    ) -> Result<()> {
        let over = |what: &'static str, value: u64, limit: u64| {
            Err(Error::entry(path, EntryError::Limit { what, value, limit }))
        };
        let x: usize = xattrs.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.metadata += (path.len() + link.len() + x) as u64;
        if self.metadata > limits.max_metadata {
            return over("metadata bytes", self.metadata, limits.max_metadata);
        }
        if tree_len as u64 > limits.max_entries {
            return over("entries", tree_len as u64, limits.max_entries);
        }
        Ok(())
    }

    /// Before anything of an entry is stored: its depth, so implicit parents of a deep path
    /// are never created.
    pub(crate) fn check_depth(limits: &Limits, path: &[u8]) -> Result<()> {
        let depth = path.split(|&c| c == b'/').count();
        if depth > limits.max_depth {
            return Err(Error::entry(
                path,
                EntryError::Limit {
                    what: "path depth",
                    value: depth as u64,
                    limit: limits.max_depth as u64,
                },
            ));
        }
        Ok(())
    }
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            block_size: 4096,
            inline_data: true,
            uuid: [0; 16],
            timestamp: None,
            all_time: false,
            oci_whiteouts: false,
            max_image_size: None,
            limits: Limits::default(),
            interrupt: Interrupt::default(),
        }
    }
}

impl BuildOptions {
    /// Check the options.
    pub fn validate(&self) -> Result<()> {
        if !self.block_size.is_power_of_two() || !(512..=4096).contains(&self.block_size) {
            return Err(Error::InvalidOption(format!(
                "block size {} must be a power of two between 512 and 4096",
                self.block_size
            )));
        }
        Ok(())
    }

    pub(crate) fn blkszbits(&self) -> u8 {
        self.block_size.trailing_zeros() as u8
    }

    /// Attributes of directories the builder creates (root without a `./` entry, implicit
    /// parents): 0755, root-owned, at the image timestamp.
    pub(crate) fn implicit_dir_meta(&self) -> Meta {
        Meta {
            mode: format::mode::S_IFDIR | 0o755,
            uid: 0,
            gid: 0,
            mtime: self.timestamp.unwrap_or(0),
            mtime_nsec: 0,
        }
    }

    /// The mtime an entry gets.
    pub(crate) fn mtime(&self, mtime: i64, nsec: u32) -> (i64, u32) {
        match self.timestamp {
            Some(t) if self.all_time => (t, 0),
            _ => (mtime, nsec),
        }
    }

    fn max_blocks(&self, bs: u32) -> u64 {
        let cap = format::NULL_ADDR as u64 - 1;
        self.max_image_size
            .map_or(cap, |m| (m / bs as u64).min(cap))
    }
}

/// What a build produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Block size.
    pub block_size: u32,
    /// Blocks in the primary image (the index, for tar-index images).
    pub blocks: u64,
    /// Inodes in the image.
    pub inodes: u64,
    /// Bytes of input consumed (the uncompressed tar, for tar input).
    pub input_bytes: u64,
    /// Filesystem UUID.
    pub uuid: [u8; 16],
}

/// First block usable for data: the one after the superblock.
fn first_data_block(bs: u32) -> u64 {
    (format::SUPER_OFFSET + format::SUPERBLOCK_SIZE as u64).div_ceil(bs as u64)
}

/// Convert a tar stream (already decompressed; see [`crate::compression`]) into a full image.
/// File data is copied into `output` as it is read; the metadata follows the data.
pub fn tar_to_image<R: Read, W: ImageOutput>(
    input: R,
    output: W,
    opts: &BuildOptions,
) -> Result<Summary> {
    opts.validate()?;
    let bs = opts.block_size;
    let mut reader = crate::tar::TarReader::new(input);
    let mut area = DataArea::new(output, bs, first_data_block(bs), opts)?;
    let mut tree = Tree::new(opts.implicit_dir_meta());
    tar::read_into_tree(&mut reader, &mut tree, opts, &mut |r, e, xattr_len| {
        tar::write_full(&mut area, r, e, xattr_len, opts, tar::copy_data)
    })?;
    reader.drain()?;
    let (out, data_end) = area.finish()?;
    finish_full(out, &mut tree, data_end, opts, reader.offset())
}

/// [`tar_to_image`] for an uncompressed tar that is a regular file: the data of large files
/// is handed to the output as ranges of the tar ([`ImageOutput::copy_range`]), which an
/// output over a file can copy in the kernel, never through userspace.
pub fn tar_file_to_image<W: ImageOutput>(
    input: &std::fs::File,
    output: W,
    opts: &BuildOptions,
) -> Result<Summary> {
    opts.validate()?;
    let bs = opts.block_size;
    let mut reader = crate::tar::TarReader::from_file(input);
    let mut area = DataArea::new(output, bs, first_data_block(bs), opts)?;
    let mut tree = Tree::new(opts.implicit_dir_meta());
    tar::read_into_tree(&mut reader, &mut tree, opts, &mut |r, e, xattr_len| {
        tar::write_full(&mut area, r, e, xattr_len, opts, tar::copy_data_direct)
    })?;
    reader.drain()?;
    let (out, data_end) = area.finish()?;
    finish_full(out, &mut tree, data_end, opts, reader.offset())
}

/// Lay out the metadata after the data and write it with the superblock.
pub(crate) fn finish_full<W: Write + Seek>(
    mut out: W,
    tree: &mut Tree,
    data_end: u64,
    opts: &BuildOptions,
    input_bytes: u64,
) -> Result<Summary> {
    let bs = opts.block_size as u64;
    opts.interrupt.check()?;
    tree.apply_overlay_xattrs();
    let meta_blkaddr = u32::try_from(data_end)
        .map_err(|_| Error::TooLarge("data area exceeds 2^32 blocks".into()))?;
    let emitted = layout::emit(
        tree,
        layout::Params {
            blkszbits: opts.blkszbits(),
            meta_blkaddr,
            // nid 0 stays unused: glibc treats d_ino 0 as a deleted entry.
            start: format::INODE_SLOT_SIZE,
        },
    )?;
    if emitted.end_block > opts.max_blocks(opts.block_size) {
        return Err(Error::TooLarge(format!(
            "image would be {} bytes, over the limit",
            emitted.end_block * bs
        )));
    }
    let wr = |e| Error::io("writing the image", e);
    out.seek(SeekFrom::Start(meta_blkaddr as u64 * bs))
        .map_err(wr)?;
    out.write_all(&emitted.bytes).map_err(wr)?;

    let mut feature_incompat = 0;
    if emitted.chunked {
        feature_incompat |= format::FEATURE_INCOMPAT_CHUNKED_FILE;
    }
    let sb = Superblock {
        magic: format::MAGIC,
        feature_compat: format::FEATURE_COMPAT_SB_CHKSUM | format::FEATURE_COMPAT_MTIME,
        blkszbits: opts.blkszbits(),
        root_nid: emitted.root_nid,
        inos: emitted.inodes,
        epoch: emitted.epoch,
        fixed_nsec: emitted.fixed_nsec,
        blocks: emitted.end_block as u32,
        meta_blkaddr,
        uuid: opts.uuid,
        feature_incompat,
        ..Default::default()
    };
    let head_len = first_data_block(opts.block_size) * bs;
    let mut head = vec![0u8; head_len as usize];
    write_superblock(&mut head, sb, opts.block_size);
    out.seek(SeekFrom::Start(0)).map_err(wr)?;
    out.write_all(&head).map_err(wr)?;
    out.flush().map_err(wr)?;
    Ok(Summary {
        block_size: opts.block_size,
        blocks: emitted.end_block,
        inodes: emitted.inodes,
        input_bytes,
        uuid: opts.uuid,
    })
}

/// Byte offset / 128 of the device table in images that have one: right after the
/// superblock (byte 1152), as mkfs.erofs puts it.
pub(crate) const DEVT_SLOTOFF: u16 = 9;

/// The head of an image with a device table (tar indexes, fsmeta): `slots` (device 1 first)
/// from [`DEVT_SLOTOFF`], and a superblock for the metadata `emitted` describes, checksummed
/// over `head`, which begins at byte 0 of the image.
pub(crate) fn write_device_table_head(
    head: &mut [u8],
    emitted: &layout::Emitted,
    slots: &[format::DeviceSlot],
    geometry: DeviceTableGeometry,
) {
    let start = DEVT_SLOTOFF as usize * format::DEVICE_SLOT_SIZE;
    for (i, slot) in slots.iter().enumerate() {
        let at = start + i * format::DEVICE_SLOT_SIZE;
        head[at..at + format::DEVICE_SLOT_SIZE].copy_from_slice(&slot.encode());
    }
    let mut feature_incompat = format::FEATURE_INCOMPAT_DEVICE_TABLE;
    if emitted.chunked {
        feature_incompat |= format::FEATURE_INCOMPAT_CHUNKED_FILE;
    }
    let sb = Superblock {
        magic: format::MAGIC,
        feature_compat: format::FEATURE_COMPAT_SB_CHKSUM | format::FEATURE_COMPAT_MTIME,
        blkszbits: geometry.blkszbits,
        root_nid: emitted.root_nid,
        inos: emitted.inodes,
        epoch: emitted.epoch,
        fixed_nsec: emitted.fixed_nsec,
        blocks: geometry.blocks,
        meta_blkaddr: geometry.meta_blkaddr,
        uuid: geometry.uuid,
        feature_incompat,
        extra_devices: slots.len() as u16,
        devt_slotoff: DEVT_SLOTOFF,
        ..Default::default()
    };
    write_superblock(head, sb, 1 << geometry.blkszbits);
}

/// What [`write_device_table_head`] puts in the superblock besides the metadata's own fields.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceTableGeometry {
    /// log2 of the block size.
    pub blkszbits: u8,
    /// Size of the primary device in blocks.
    pub blocks: u32,
    /// Block of nid 0.
    pub meta_blkaddr: u32,
    /// Filesystem UUID.
    pub uuid: [u8; 16],
}

/// Put the superblock into `image_start` (which begins at byte 0 of the image and covers the
/// checksummed range) and compute its checksum over what is there.
pub(crate) fn write_superblock(image_start: &mut [u8], mut sb: Superblock, block_size: u32) {
    let off = format::SUPER_OFFSET as usize;
    sb.checksum = 0;
    image_start[off..off + format::SUPERBLOCK_SIZE].copy_from_slice(&sb.encode());
    let len = format::checksum_len(block_size);
    let crc = format::superblock_checksum(&image_start[off..off + len]);
    image_start[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod interrupt_tests {
    use std::io::{Cursor, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::tar::{Entry, EntryKind, TarWriter};

    /// 50 files of 300 KiB (each several chunks of data).
    fn tar() -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        for i in 0..50 {
            let mut e = Entry::new(format!("f{i}").into_bytes(), EntryKind::Regular);
            e.mode = 0o644;
            w.append_bytes(&e, &vec![i as u8; 300 << 10]).unwrap();
        }
        w.finish().unwrap()
    }

    /// Options whose interrupt says stop from its `after`-th question on; and the count.
    fn opts(after: usize) -> (BuildOptions, Arc<AtomicUsize>) {
        let asked = Arc::new(AtomicUsize::new(0));
        let n = asked.clone();
        let opts = BuildOptions {
            interrupt: Interrupt::new(move || n.fetch_add(1, Ordering::Relaxed) + 1 >= after),
            ..Default::default()
        };
        (opts, asked)
    }

    /// Every builder asks between entries and chunks, stops at the first "yes" with
    /// `Interrupted`, and builds normally when the answer stays "no".
    #[test]
    fn builders_stop_when_interrupted() {
        let tar = tar();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&tar).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for i in 0..50 {
            std::fs::write(dir.path().join(format!("f{i}")), vec![i as u8; 300 << 10]).unwrap();
        }
        type Build = fn(&[u8], &std::fs::File, &std::path::Path, &BuildOptions) -> Result<()>;
        let builds: [(&str, Build); 5] = [
            ("tar_to_image", |t, _, _, o| {
                tar_to_image(t, Cursor::new(Vec::new()), o).map(drop)
            }),
            ("tar_file_to_image", |_, f, _, o| {
                tar_file_to_image(f, Cursor::new(Vec::new()), o).map(drop)
            }),
            ("tar_to_index_file", |t, _, _, o| {
                tar_to_index_file(t, Cursor::new(Vec::new()), o).map(drop)
            }),
            ("tar_file_to_index_file", |_, f, _, o| {
                tar_file_to_index_file(f, Cursor::new(Vec::new()), o).map(drop)
            }),
            ("dir_to_image", |_, _, d, o| {
                dir_to_image(d, Cursor::new(Vec::new()), o).map(drop)
            }),
        ];
        for (name, build) in builds {
            let (never, asked) = opts(usize::MAX);
            build(&tar, &file, dir.path(), &never).unwrap_or_else(|e| panic!("{name}: {e}"));
            let total = asked.load(Ordering::Relaxed);
            assert!(
                total >= 50,
                "{name} asked only {total} times for 50 entries"
            );
            let (stop, asked) = opts(total / 2);
            let e = build(&tar, &file, dir.path(), &stop).unwrap_err();
            assert!(matches!(e, Error::Interrupted), "{name}: {e}");
            // Stopped at the first "yes".
            assert_eq!(asked.load(Ordering::Relaxed), total / 2, "{name}");
        }
    }
}
