//! The data area of a full image: file contents written as they arrive, block-aligned, from
//! the first block after the superblock.

use std::io::{BufWriter, SeekFrom, Write};

use super::{BuildOptions, Interrupt};
use crate::error::{Error, Result};
use crate::format::{ChunkIndex, NULL_ADDR};
use crate::output::ImageOutput;

static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

/// Sequential block-aligned writer for file data.
#[derive(Debug)]
pub(crate) struct DataArea<W: ImageOutput> {
    out: BufWriter<W>,
    bs: u64,
    next_block: u64,
    max_blocks: u64,
    /// Bytes written for the file in progress.
    in_file: u64,
    /// Asked before every chunk of data.
    interrupt: Interrupt,
}

/// Most bytes handed to [`ImageOutput::copy_range`] at once, so an interrupt is noticed
/// within one such piece of a large file.
const RANGE_PIECE: u64 = 64 << 20;

impl<W: ImageOutput> DataArea<W> {
    pub(crate) fn new(mut out: W, bs: u32, first_block: u64, opts: &BuildOptions) -> Result<Self> {
        out.seek(SeekFrom::Start(first_block * bs as u64))
            .map_err(|e| Error::io("seeking in the image", e))?;
        Ok(DataArea {
            out: BufWriter::with_capacity(1 << 20, out),
            bs: bs as u64,
            next_block: first_block,
            max_blocks: opts.max_blocks(bs),
            in_file: 0,
            interrupt: opts.interrupt.clone(),
        })
    }

    /// Start a file whose data will need `len` bytes; returns its first block.
    pub(crate) fn begin(&mut self, len: u64) -> Result<u32> {
        debug_assert_eq!(self.in_file, 0);
        let blocks = len.div_ceil(self.bs);
        let end = self.next_block + blocks;
        if end > self.max_blocks || end >= NULL_ADDR as u64 {
            return Err(Error::TooLarge(format!(
                "image would need more than {} blocks of {} bytes",
                self.max_blocks.min(NULL_ADDR as u64 - 1),
                self.bs
            )));
        }
        Ok(self.next_block as u32)
    }

    pub(crate) fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.interrupt.check()?;
        self.out
            .write_all(buf)
            .map_err(|e| Error::io("writing the image", e))?;
        self.in_file += buf.len() as u64;
        Ok(())
    }

    pub(crate) fn write_zeros(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Finish the file in progress: pad its last block and advance.
    pub(crate) fn end(&mut self) -> Result<()> {
        let pad = (self.bs - self.in_file % self.bs) % self.bs;
        let written = self.in_file;
        self.write_zeros(pad)?;
        self.next_block += written.div_ceil(self.bs);
        self.in_file = 0;
        Ok(())
    }

    /// Flush and hand back the sink and the first block after the data.
    pub(crate) fn finish(self) -> Result<(W, u64)> {
        let next = self.next_block;
        let out = self
            .out
            .into_inner()
            .map_err(|e| Error::io("writing the image", e.into_error()))?;
        Ok((out, next))
    }
}

impl<W: ImageOutput> DataArea<W> {
    /// Copy `n` bytes at `src_off` of `src` into the file in progress, the output's fastest
    /// way ([`ImageOutput::copy_range`]).
    pub(crate) fn copy_range(&mut self, src: &std::fs::File, src_off: u64, n: u64) -> Result<()> {
        let io = |e| Error::io("writing the image", e);
        self.out.flush().map_err(io)?;
        let mut done = 0;
        while done < n {
            self.interrupt.check()?;
            let k = (n - done).min(RANGE_PIECE);
            self.out
                .get_mut()
                .copy_range(src, src_off + done, k)
                .map_err(io)?;
            done += k;
        }
        self.in_file += n;
        Ok(())
    }
}

/// Where a regular file's bytes come from.
pub(crate) trait FileBytes<W: ImageOutput> {
    /// Write `n` bytes of the file, from file offset `off`, into `area` (calls come in
    /// increasing offset order).
    fn copy(&mut self, area: &mut DataArea<W>, off: u64, n: u64) -> Result<()>;
    /// Fill `buf` with the file's bytes at `off` (the inline tail).
    fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<()>;
}

/// Write a regular file of `size` bytes: chunks with holes for sparse files (`sparse` lists
/// the data segments), otherwise contiguous blocks, with the last partial block kept for
/// inlining when it is sure to fit beside the largest inode and its xattrs.
pub(crate) fn write_file<W: ImageOutput>(
    area: &mut DataArea<W>,
    src: &mut dyn FileBytes<W>,
    size: u64,
    sparse: Option<&[(u64, u64)]>,
    xattr_len: usize,
    opts: &super::BuildOptions,
) -> Result<crate::tree::FileData> {
    use crate::tree::FileData;
    if let Some(map) = sparse {
        let plan = plan_chunks(map, size, opts.blkszbits());
        // Segments spread over a huge file can make any chunking materialise far more than
        // the archive holds: refuse before allocating the table.
        let stored: u64 = map.iter().map(|s| s.1).sum();
        let allowed = stored
            .saturating_mul(2)
            .saturating_add(opts.limits.max_sparse_overhead);
        if plan.cost > allowed as u128 {
            return Err(crate::error::Error::TooLarge(format!(
                "sparse file of {size} bytes with {} segments would take {} bytes of image (chunk table and chunks), over the limit of {allowed} (twice its {stored} stored bytes plus limits.max_sparse_overhead)",
                map.len(),
                plan.cost
            )));
        }
        let chunks = write_sparse(area, &plan, map, size, |a, off, n| src.copy(a, off, n))?;
        return Ok(FileData::Chunks {
            size,
            chunkbits: plan.chunkbits,
            chunks,
        });
    }
    if size == 0 {
        return Ok(FileData::Empty);
    }
    let bs = opts.block_size as u64;
    let tail = size % bs;
    if opts.inline_data
        && tail != 0
        && (crate::format::EXTENDED_INODE_SIZE + xattr_len) as u64 + tail <= bs
    {
        let full = size - tail;
        let blkaddr = if full > 0 {
            let b = area.begin(full)?;
            src.copy(area, 0, full)?;
            area.end()?;
            b
        } else {
            NULL_ADDR
        };
        let mut t = vec![0u8; tail as usize];
        src.read(full, &mut t)?;
        return Ok(FileData::Tail {
            blkaddr,
            size,
            tail: t.into(),
        });
    }
    let blkaddr = area.begin(size)?;
    src.copy(area, 0, size)?;
    area.end()?;
    Ok(FileData::Blocks { blkaddr, size })
}

/// How to cut a sparse file into chunks: `chunkbits` and, per chunk, whether it holds data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkPlan {
    pub chunkbits: u8,
    pub count: u64,
    /// Bytes of image the plan takes: chunk table plus the chunks that hold data.
    pub cost: u128,
    /// Sorted indices of chunks that hold data.
    pub data_chunks: Vec<u64>,
}

/// Choose the chunk size for a file with the given data segments that minimises chunk-table
/// bytes plus materialised zero bytes. Chunks touching any data are stored whole.
pub(crate) fn plan_chunks(segments: &[(u64, u64)], size: u64, blkszbits: u8) -> ChunkPlan {
    let max_bits = (blkszbits as u32 + 31).min(63);
    let mut best: Option<(u128, u8)> = None;
    for bits in blkszbits as u32..=max_bits {
        let c = 1u64 << bits;
        let count = size.div_ceil(c) as u128;
        let data = count_data_chunks(segments, bits) as u128;
        let cost = count * 8 + data * c as u128;
        if best.is_none_or(|(b, _)| cost < b) {
            best = Some((cost, bits as u8));
        }
        if c >= size {
            break;
        }
    }
    let (cost, bits) = best.unwrap_or((0, blkszbits));
    let mut data_chunks = Vec::new();
    for &(off, len) in segments {
        if len == 0 {
            continue;
        }
        let first = off >> bits;
        let last = (off + len - 1) >> bits;
        for i in first..=last {
            if data_chunks.last().is_none_or(|&l| l < i) {
                data_chunks.push(i);
            }
        }
    }
    ChunkPlan {
        chunkbits: bits,
        cost,
        count: size.div_ceil(1u64 << bits),
        data_chunks,
    }
}

fn count_data_chunks(segments: &[(u64, u64)], bits: u32) -> u64 {
    let mut n = 0;
    let mut last: Option<u64> = None;
    for &(off, len) in segments {
        if len == 0 {
            continue;
        }
        let first = off >> bits;
        let end = (off + len - 1) >> bits;
        let first = match last {
            Some(l) if l >= first => l + 1,
            _ => first,
        };
        if end >= first {
            n += end - first + 1;
        }
        last = Some(last.map_or(end, |l| l.max(end)));
    }
    n
}

/// Write a sparse file's chunks. `copy(area, file_offset, len)` must write `len` bytes of
/// segment data starting at `file_offset`; it is called in increasing offset order, and zeros
/// between segments are written here.
pub(crate) fn write_sparse<W: ImageOutput>(
    area: &mut DataArea<W>,
    plan: &ChunkPlan,
    segments: &[(u64, u64)],
    size: u64,
    mut copy: impl FnMut(&mut DataArea<W>, u64, u64) -> Result<()>,
) -> Result<Vec<ChunkIndex>> {
    let c = 1u64 << plan.chunkbits;
    let mut chunks = vec![ChunkIndex::HOLE; plan.count as usize];
    let mut seg = segments.iter().filter(|s| s.1 > 0).peekable();
    for &i in &plan.data_chunks {
        let start = i * c;
        let end = (start + c).min(size);
        let blk = area.begin(end - start)?;
        chunks[i as usize] = ChunkIndex {
            device_id: 0,
            blkaddr: blk,
        };
        let mut pos = start;
        while pos < end {
            match seg.peek() {
                Some(&&(off, len)) if off < end => {
                    if off > pos {
                        area.write_zeros(off - pos)?;
                        pos = off;
                    }
                    let seg_end = off + len;
                    let take = seg_end.min(end) - pos;
                    copy(area, pos, take)?;
                    pos += take;
                    if pos >= seg_end {
                        seg.next();
                    }
                }
                _ => {
                    area.write_zeros(end - pos)?;
                    pos = end;
                }
            }
        }
        area.end()?;
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_plans() {
        // One 4 KiB extent at 1 GiB in a 5 GiB file: big chunks, one data chunk.
        let size = 5u64 << 30;
        let p = plan_chunks(&[(1 << 30, 4096)], size, 12);
        assert_eq!(p.data_chunks.len(), 1);
        assert!(p.count * 8 < 1 << 20, "table too big: {}", p.count);
        assert!(1u64 << p.chunkbits <= 1 << 20);
        // Dense file: one chunk per block would cost; a single chunk stores everything.
        let p = plan_chunks(&[(0, 100_000)], 100_000, 12);
        assert_eq!(p.data_chunks.len() as u64, p.count);
        // Empty sparse file: no data chunks.
        let p = plan_chunks(&[(size, 0)], size, 12);
        assert!(p.data_chunks.is_empty());
    }

    #[test]
    fn count_merges_shared_chunks() {
        assert_eq!(count_data_chunks(&[(0, 10), (20, 10)], 12), 1);
        assert_eq!(count_data_chunks(&[(0, 10), (5000, 10)], 12), 2);
        assert_eq!(count_data_chunks(&[(0, 8192)], 12), 2);
    }
}
