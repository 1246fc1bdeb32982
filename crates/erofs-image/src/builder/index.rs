//! Tar-index images: an EROFS index with 512-byte blocks whose regular files are chunk tables
//! pointing into the original tar, which is the index's extra device.
//!
//! The single-file form is `[index][tar]` with the device slot's unified address pointing just
//! past the index, so the kernel mounts it with no options (flat device mode, Linux 6.4+). It
//! is what containerd's differ produces with `mkfs.erofs --tar=i` followed by appending the tar.
//! Here the tar is copied once, straight into the final output, while the index is built; the
//! index is then put in front of it with [`ImageOutput::insert_front`] (which moves no data
//! where the output can insert a range, as ext4 and xfs can), and with an in-place backward
//! copy elsewhere.

use std::fs::File;
use std::io::{self, Read, SeekFrom, Write};

use super::tar::read_into_tree;
use super::{BuildOptions, DeviceTableGeometry, Summary, layout, write_device_table_head};
use crate::error::{EntryError, Error, Result};
use crate::format::{self, ChunkIndex, DeviceSlot};
use crate::output::{ImageOutput, shift_forward};
use crate::tar::{Entry, TarReader};
use crate::tree::{FileData, Tree};

/// Block size of tar-index images: tar data is 512-byte aligned.
pub const INDEX_BLOCK_SIZE: u32 = 512;
const INDEX_BLKSZBITS: u8 = 9;
/// The index is padded to this so the tar after it stays page-aligned (and so that an insert
/// in front, `FALLOC_FL_INSERT_RANGE`, is accepted on 4 KiB-block filesystems).
const INDEX_ALIGN: usize = 4096;
/// First inode after the superblock and the device slot (byte 1280, nid 40).
const INDEX_META_START: u64 = 1280;

/// A built tar index.
#[derive(Debug)]
pub struct TarIndex {
    /// The index image (512-byte blocks, padded to 4 KiB). Its device slot points right after
    /// itself, so `[index][tar]` mounts as one file; the index alone mounts with
    /// `-o device=TAR`.
    pub index: Vec<u8>,
    /// Bytes of tar (the whole input, including anything after the end-of-archive marker).
    pub tar_len: u64,
    /// What was built.
    pub summary: Summary,
}

struct Tee<R, W> {
    r: R,
    w: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.w.write_all(&buf[..n])?;
        Ok(n)
    }
}

fn index_file(e: &Entry) -> Result<FileData> {
    if e.sparse.is_some() {
        return Err(Error::entry(&e.path, EntryError::SparseInIndex));
    }
    let size = e.size;
    if size == 0 {
        return Ok(FileData::Empty);
    }
    // One chunk per file when possible (chunks up to 2^40 bytes at 512-byte blocks).
    let bits = (64 - (size - 1).leading_zeros())
        .clamp(INDEX_BLKSZBITS as u32, INDEX_BLKSZBITS as u32 + 31);
    let count = size.div_ceil(1u64 << bits);
    let mut chunks = Vec::with_capacity(count as usize);
    for i in 0..count {
        let off = e.data_offset + (i << bits);
        if !off.is_multiple_of(INDEX_BLOCK_SIZE as u64) {
            return Err(Error::Unsupported("tar data not 512-byte aligned".into()));
        }
        let blk = u32::try_from(off / INDEX_BLOCK_SIZE as u64)
            .ok()
            .filter(|&b| b != format::NULL_ADDR)
            .ok_or_else(|| {
                Error::TooLarge("a tar index cannot address more than 2 TiB of tar".into())
            })?;
        chunks.push(ChunkIndex {
            device_id: 1,
            blkaddr: blk,
        });
    }
    Ok(FileData::Chunks {
        size,
        chunkbits: bits as u8,
        chunks,
    })
}

/// Read a tar stream, copy every byte of it to `tar_out`, and build the index over it.
pub fn tar_to_index<R: Read, W: Write>(
    input: R,
    tar_out: W,
    opts: &BuildOptions,
) -> Result<TarIndex> {
    let mut reader = TarReader::new(Tee {
        r: input,
        w: tar_out,
    });
    let mut tree = Tree::new(opts.implicit_dir_meta());
    read_into_tree(&mut reader, &mut tree, opts, &mut |_, e, _| index_file(e))?;
    reader.drain()?;
    reader
        .get_mut()
        .w
        .flush()
        .map_err(|e| Error::io("writing the tar", e))?;
    let tar_len = reader.offset();
    build_index(&mut tree, tar_len, opts)
}

fn build_index(tree: &mut Tree, tar_len: u64, opts: &BuildOptions) -> Result<TarIndex> {
    tree.apply_overlay_xattrs();
    let mut emitted = layout::emit(
        tree,
        layout::Params {
            blkszbits: INDEX_BLKSZBITS,
            meta_blkaddr: 0,
            start: INDEX_META_START,
        },
    )?;
    let mut bytes = std::mem::take(&mut emitted.bytes);
    let len = bytes.len().next_multiple_of(INDEX_ALIGN);
    bytes.resize(len, 0);
    let index_blocks = (len / INDEX_BLOCK_SIZE as usize) as u32;
    let tar_blocks = u32::try_from(tar_len.div_ceil(INDEX_BLOCK_SIZE as u64))
        .map_err(|_| Error::TooLarge("tar larger than 2 TiB".into()))?;
    let slot = DeviceSlot {
        tag: [0; 64],
        blocks: tar_blocks,
        uniaddr: index_blocks,
    };
    write_device_table_head(
        &mut bytes,
        &emitted,
        &[slot],
        DeviceTableGeometry {
            blkszbits: INDEX_BLKSZBITS,
            blocks: index_blocks,
            meta_blkaddr: 0,
            uuid: opts.uuid,
        },
    );
    Ok(TarIndex {
        index: bytes,
        tar_len,
        summary: Summary {
            block_size: INDEX_BLOCK_SIZE,
            blocks: index_blocks as u64,
            inodes: emitted.inodes,
            input_bytes: tar_len,
            uuid: opts.uuid,
        },
    })
}

/// Build the single-file form `[index][tar]` in `out`, which must be empty (at position 0)
/// and readable: the tar is streamed into it once, then the index is placed in front of it
/// ([`ImageOutput::insert_front`], or moving the tar with reads and writes where that is
/// unsupported). Outputs that keep data from the page cache suit the tar: an insert in
/// front drops the file's cached pages anyway.
pub fn tar_to_index_file<R: Read, W: ImageOutput + Read>(
    input: R,
    mut out: W,
    opts: &BuildOptions,
) -> Result<Summary> {
    let idx = tar_to_index(input, &mut out, opts)?;
    insert_front(&mut out, &idx.index, idx.tar_len)?;
    Ok(idx.summary)
}

/// [`tar_to_index_file`] for an uncompressed tar that is a regular file: the tar is indexed
/// by reading only its headers, the index is written, and the tar is appended after it as
/// one range ([`ImageOutput::copy_range`]: no userspace copy, a reflink where the filesystem
/// can, for outputs over files that know how).
pub fn tar_file_to_index_file<W: ImageOutput>(
    input: &File,
    mut out: W,
    opts: &BuildOptions,
) -> Result<Summary> {
    let len = input
        .metadata()
        .map_err(|e| Error::io("stat of the tar", e))?
        .len();
    let mut reader = TarReader::from_file(input);
    let mut tree = Tree::new(opts.implicit_dir_meta());
    read_into_tree(&mut reader, &mut tree, opts, &mut |_, e, _| index_file(e))?;
    let idx = build_index(&mut tree, len, opts)?;
    let wr = |e| Error::io("writing the tar index", e);
    out.seek(SeekFrom::Start(0)).map_err(wr)?;
    out.write_all(&idx.index).map_err(wr)?;
    // In pieces, so an interrupt is noticed during the copy of a large tar.
    let mut done = 0;
    while done < len {
        opts.interrupt.check()?;
        let k = (len - done).min(64 << 20);
        out.copy_range(input, done, k)
            .map_err(|e| Error::io("copying the tar", e))?;
        done += k;
    }
    out.flush().map_err(wr)?;
    Ok(idx.summary)
}

fn insert_front<W: ImageOutput + Read>(out: &mut W, index: &[u8], tar_len: u64) -> Result<()> {
    let len = index.len() as u64;
    let inserted = tar_len > 0
        && match out.insert_front(len) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::Unsupported => false,
            Err(e) => return Err(Error::io("making room for the tar index", e)),
        };
    if !inserted {
        shift_forward(out, tar_len, len)
            .map_err(|e| Error::io("moving the tar after its index", e))?;
    }
    let wr = |e| Error::io("writing the tar index", e);
    out.seek(SeekFrom::Start(0)).map_err(wr)?;
    out.write_all(index).map_err(wr)?;
    out.flush().map_err(wr)
}
