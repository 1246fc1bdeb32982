//! Metadata layout and emission: inode order and nids, inline placement, directory blocks.
//!
//! One routine plans every inode (version, xattr body, data layout, inline tail, record size)
//! and places it; emission then writes exactly what was planned, so sizes and offsets cannot
//! drift apart. Inodes are in breadth-first order over byte-sorted names, root first, which
//! keeps the root nid small and the output deterministic.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::format::{
    self, ChunkIndex, DIRENT_SIZE, Dirent, INODE_SLOT_SIZE, LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN, NULL_ADDR, RawInode,
};
use crate::tree::{Body, FileData, Meta, NodeId, ROOT, Tree, Xattr};

/// Where the metadata goes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    pub blkszbits: u8,
    /// Block of nid 0.
    pub meta_blkaddr: u32,
    /// First byte, relative to `meta_blkaddr * bs`, where inodes may be placed.
    pub start: u64,
}

/// The laid-out metadata.
#[derive(Debug)]
pub(crate) struct Emitted {
    /// Bytes from `meta_blkaddr * bs` to the end of the image's metadata and directory blocks.
    pub bytes: Vec<u8>,
    /// First block after everything emitted.
    pub end_block: u64,
    pub root_nid: u16,
    pub inodes: u64,
    pub epoch: u64,
    pub fixed_nsec: u32,
    pub chunked: bool,
}

const NO_INDEX: u32 = u32::MAX;

struct DirPlan<'t> {
    /// All entries including `.` and `..`, byte-sorted.
    entries: Vec<(&'t [u8], NodeId)>,
    /// Per block: entry range and bytes used.
    blocks: Vec<(usize, usize, usize)>,
}

enum Inline<'t> {
    None,
    DirTail,
    Bytes(&'t [u8]),
}

struct Planned<'t> {
    node: NodeId,
    raw: RawInode,
    xattrs: Vec<u8>,
    inline: Inline<'t>,
    inline_len: usize,
    chunks: &'t [ChunkIndex],
    dir: Option<DirPlan<'t>>,
    /// Blocks in the area after the metadata (directory blocks, long symlinks).
    extra_blocks: u64,
    pos: u64,
}

/// Encode an inline xattr body (sorted by full name). Names must be storable.
pub(crate) fn encode_xattrs(xattrs: &[Xattr]) -> Result<Vec<u8>, crate::error::EntryError> {
    use crate::error::EntryError;
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut sorted: Vec<&Xattr> = xattrs.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut body = format::XattrIbodyHeader::default().encode().to_vec();
    for (name, value) in sorted {
        let (index, suffix) = format::split_xattr_name(name)
            .ok_or_else(|| EntryError::XattrTooLarge(String::from_utf8_lossy(name).into_owned()))?;
        if suffix.len() > 255 || value.len() > u16::MAX as usize {
            return Err(EntryError::XattrTooLarge(
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
        let entry = format::XattrEntry {
            name_len: suffix.len() as u8,
            name_index: index,
            value_size: value.len() as u16,
        };
        body.extend_from_slice(&entry.encode());
        body.extend_from_slice(suffix);
        body.extend_from_slice(value);
        while !body.len().is_multiple_of(4) {
            body.push(0);
        }
    }
    if format::xattr_icount_for(body.len()).is_none() {
        return Err(EntryError::XattrsTooLarge(body.len()));
    }
    Ok(body)
}

fn compact_fits(meta: &Meta, nlink: u32, size: u64, epoch: (u64, u32)) -> bool {
    meta.mtime >= 0
        && (meta.mtime as u64, meta.mtime_nsec) == epoch
        && meta.uid <= 0xFFFF
        && meta.gid <= 0xFFFF
        && nlink <= 0xFFFF
        && size <= u32::MAX as u64
}

/// The most common non-negative mtime; ties go to the smallest, for determinism.
fn choose_epoch(tree: &Tree, order: &[NodeId]) -> (u64, u32) {
    let mut counts: HashMap<(u64, u32), u32> = HashMap::new();
    for &n in order {
        let m = tree.node(n).meta;
        if m.mtime >= 0 {
            *counts.entry((m.mtime as u64, m.mtime_nsec)).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map_or((0, 0), |(k, _)| k)
}

fn pack_dir(entries: &[(&[u8], NodeId)], bs: usize) -> Vec<(usize, usize, usize)> {
    let mut blocks = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, (name, _)) in entries.iter().enumerate() {
        let need = DIRENT_SIZE + name.len();
        if used + need > bs {
            blocks.push((start, i, used));
            start = i;
            used = 0;
        }
        used += need;
    }
    blocks.push((start, entries.len(), used));
    blocks
}

fn file_type(tree: &Tree, n: NodeId) -> u8 {
    format::file_type_of_mode(tree.node(n).meta.mode).unwrap_or(format::file_type::UNKNOWN)
}

/// Plan, place and emit all metadata of `tree`.
pub(crate) fn emit(tree: &Tree, p: Params) -> Result<Emitted> {
    let bs = 1u64 << p.blkszbits;
    let n = tree.len();

    // Breadth-first order, parents and link counts.
    let mut index = vec![NO_INDEX; n];
    let mut parent = vec![ROOT; n];
    let mut nlink = vec![0u32; n];
    let mut order: Vec<NodeId> = vec![ROOT];
    index[ROOT as usize] = 0;
    let mut q = 0;
    while q < order.len() {
        let d = order[q];
        q += 1;
        let Body::Dir(children) = &tree.node(d).body else {
            continue;
        };
        let mut subdirs = 0u32;
        for &c in children.values() {
            let child = tree.node(c);
            if child.is_dir() {
                subdirs += 1;
                parent[c as usize] = d;
            }
            nlink[c as usize] = nlink[c as usize].saturating_add(1);
            if index[c as usize] == NO_INDEX {
                index[c as usize] = order.len() as u32;
                order.push(c);
            }
        }
        nlink[d as usize] = 2u32.saturating_add(subdirs);
    }

    let epoch = choose_epoch(tree, &order);
    let mut chunked = false;

    // Plan each inode.
    let mut planned: Vec<Planned> = Vec::with_capacity(order.len());
    for (i, &id) in order.iter().enumerate() {
        let node = tree.node(id);
        let xattrs = encode_xattrs(&node.xattrs).map_err(|e| Error::TooLarge(e.to_string()))?;
        let mut raw = RawInode {
            xattr_icount: format::xattr_icount_for(xattrs.len()).unwrap_or(0),
            mode: node.meta.mode as u16,
            nlink: nlink[id as usize],
            uid: node.meta.uid,
            gid: node.meta.gid,
            mtime: node.meta.mtime as u64,
            mtime_nsec: node.meta.mtime_nsec,
            ino: (i + 1) as u32,
            ..Default::default()
        };
        let mut inline = Inline::None;
        let mut inline_len = 0usize;
        let mut chunks: &[ChunkIndex] = &[];
        let mut dir = None;
        let mut extra_blocks = 0u64;
        let layout;
        match &node.body {
            Body::Dir(children) => {
                let mut entries: Vec<(&[u8], NodeId)> = Vec::with_capacity(children.len() + 2);
                entries.push((b".", id));
                entries.push((b"..", parent[id as usize]));
                entries.extend(children.iter().map(|(k, &v)| (&k[..], v)));
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                let blocks = pack_dir(&entries, bs as usize);
                let nb = blocks.len() as u64;
                let last_used = blocks.last().map_or(0, |b| b.2);
                raw.size = (nb - 1) * bs + last_used as u64;
                dir = Some(DirPlan { entries, blocks });
                raw.format = 0;
                let isize = inode_size(&node.meta, raw.nlink, raw.size, epoch);
                if isize + xattrs.len() + last_used <= bs as usize {
                    layout = LAYOUT_FLAT_INLINE;
                    inline = Inline::DirTail;
                    inline_len = last_used;
                    extra_blocks = nb - 1;
                } else {
                    layout = LAYOUT_FLAT_PLAIN;
                    extra_blocks = nb;
                }
            }
            Body::Symlink(target) => {
                raw.size = target.len() as u64;
                let isize = inode_size(&node.meta, raw.nlink, raw.size, epoch);
                if isize + xattrs.len() + target.len() <= bs as usize {
                    layout = LAYOUT_FLAT_INLINE;
                    inline = Inline::Bytes(target);
                    inline_len = target.len();
                } else {
                    layout = LAYOUT_FLAT_PLAIN;
                    extra_blocks = raw.size.div_ceil(bs);
                }
            }
            Body::File(data) => {
                raw.size = data.size();
                match data {
                    FileData::Empty => {
                        layout = LAYOUT_FLAT_PLAIN;
                        raw.i_u = NULL_ADDR;
                    }
                    FileData::Blocks { blkaddr, .. } => {
                        layout = LAYOUT_FLAT_PLAIN;
                        raw.i_u = *blkaddr;
                    }
                    FileData::Tail { blkaddr, tail, .. } => {
                        layout = LAYOUT_FLAT_INLINE;
                        raw.i_u = *blkaddr;
                        inline = Inline::Bytes(tail);
                        inline_len = tail.len();
                        let isize = inode_size(&node.meta, raw.nlink, raw.size, epoch);
                        if isize + xattrs.len() + tail.len() > bs as usize {
                            return Err(Error::TooLarge(
                                "inline tail does not fit its block".into(),
                            ));
                        }
                    }
                    FileData::Chunks {
                        chunkbits,
                        chunks: c,
                        ..
                    } => {
                        layout = LAYOUT_CHUNK_BASED;
                        chunked = true;
                        raw.i_u = ((*chunkbits - p.blkszbits) as u32
                            & format::CHUNK_FORMAT_BLKBITS_MASK as u32)
                            | format::CHUNK_FORMAT_INDEXES as u32;
                        chunks = c;
                    }
                }
            }
            Body::Device(rdev) => {
                layout = LAYOUT_FLAT_PLAIN;
                raw.i_u = *rdev;
            }
            Body::Special => {
                layout = LAYOUT_FLAT_PLAIN;
            }
        }
        let extended = !compact_fits(&node.meta, raw.nlink, raw.size, epoch);
        raw.format = (extended as u16) | ((layout as u16) << format::I_DATALAYOUT_SHIFT);
        planned.push(Planned {
            node: id,
            raw,
            xattrs,
            inline,
            inline_len,
            chunks,
            dir,
            extra_blocks,
            pos: 0,
        });
    }

    // Place records.
    let mut pos = p.start;
    for pl in &mut planned {
        pos = pos.next_multiple_of(INODE_SLOT_SIZE);
        let head = (pl.raw.inode_size() + pl.xattrs.len()) as u64;
        if pl.inline_len > 0 {
            let r = (pos + head) % bs;
            // The tail must not cross a block, and old kernels want a metadata byte before
            // it in its block.
            if r == 0 || r + pl.inline_len as u64 > bs {
                pos = pos.next_multiple_of(bs);
            }
        }
        pl.pos = pos;
        let mut len = head;
        if !pl.chunks.is_empty() {
            len = (pos + head).next_multiple_of(format::CHUNK_INDEX_SIZE as u64) - pos
                + (pl.chunks.len() * format::CHUNK_INDEX_SIZE) as u64;
        }
        pos += len + pl.inline_len as u64;
    }
    let meta_start = p.meta_blkaddr as u64 * bs;
    let extra_base = (meta_start + pos).div_ceil(bs);
    let total_extra: u64 = planned.iter().map(|p| p.extra_blocks).sum();
    let end_block = extra_base + total_extra;
    if end_block >= NULL_ADDR as u64 {
        return Err(Error::TooLarge("image exceeds 2^32 blocks".into()));
    }

    let mut nid = vec![0u64; n];
    for pl in &planned {
        nid[pl.node as usize] = pl.pos / INODE_SLOT_SIZE;
    }
    let root_nid = u16::try_from(nid[ROOT as usize])
        .map_err(|_| Error::TooLarge("root nid does not fit in 16 bits".into()))?;

    // Emit.
    let region_len = (end_block * bs - meta_start) as usize;
    let mut bytes = vec![0u8; region_len];
    let mut next_extra = extra_base;
    let mut block_buf = vec![0u8; bs as usize];
    for pl in &mut planned {
        let first_extra = next_extra;
        next_extra += pl.extra_blocks;
        let node = tree.node(pl.node);
        if matches!(node.body, Body::Dir(_) | Body::Symlink(_)) {
            pl.raw.i_u = if pl.extra_blocks > 0 {
                first_extra as u32
            } else {
                NULL_ADDR
            };
        }
        let at = pl.pos as usize;
        let isize = pl.raw.inode_size();
        pl.raw.encode(&mut bytes[at..at + isize]);
        bytes[at + isize..at + isize + pl.xattrs.len()].copy_from_slice(&pl.xattrs);
        let mut tail_at = at + isize + pl.xattrs.len();
        if !pl.chunks.is_empty() {
            tail_at = tail_at.next_multiple_of(format::CHUNK_INDEX_SIZE);
            for c in pl.chunks {
                c.encode(&mut bytes[tail_at..tail_at + format::CHUNK_INDEX_SIZE]);
                tail_at += format::CHUNK_INDEX_SIZE;
            }
        }
        match (&pl.inline, &pl.dir) {
            (Inline::Bytes(b), _) => bytes[tail_at..tail_at + b.len()].copy_from_slice(b),
            (_, Some(d)) => {
                let inline_last = matches!(pl.inline, Inline::DirTail);
                for (bi, &(s, e, used)) in d.blocks.iter().enumerate() {
                    block_buf.fill(0);
                    write_dir_block(tree, &d.entries[s..e], &nid, &mut block_buf);
                    if inline_last && bi == d.blocks.len() - 1 {
                        bytes[tail_at..tail_at + used].copy_from_slice(&block_buf[..used]);
                    } else {
                        let off = ((first_extra + bi as u64) * bs - meta_start) as usize;
                        bytes[off..off + bs as usize].copy_from_slice(&block_buf);
                    }
                }
            }
            (Inline::None, None) => {
                if let Body::Symlink(target) = &node.body {
                    let off = (first_extra * bs - meta_start) as usize;
                    bytes[off..off + target.len()].copy_from_slice(target);
                }
            }
            (Inline::DirTail, None) => unreachable!("dir tail without a dir plan"),
        }
    }

    Ok(Emitted {
        bytes,
        end_block,
        root_nid,
        inodes: planned.len() as u64,
        epoch: epoch.0,
        fixed_nsec: epoch.1,
        chunked,
    })
}

fn inode_size(meta: &Meta, nlink: u32, size: u64, epoch: (u64, u32)) -> usize {
    if compact_fits(meta, nlink, size, epoch) {
        format::COMPACT_INODE_SIZE
    } else {
        format::EXTENDED_INODE_SIZE
    }
}

fn write_dir_block(tree: &Tree, entries: &[(&[u8], NodeId)], nid: &[u64], out: &mut [u8]) {
    let mut nameoff = entries.len() * DIRENT_SIZE;
    for (i, (name, target)) in entries.iter().enumerate() {
        Dirent {
            nid: nid[*target as usize],
            nameoff: nameoff as u16,
            file_type: file_type(tree, *target),
        }
        .encode(&mut out[i * DIRENT_SIZE..(i + 1) * DIRENT_SIZE]);
        out[nameoff..nameoff + name.len()].copy_from_slice(name);
        nameoff += name.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_packing_is_greedy_and_exact() {
        let names: Vec<Vec<u8>> = (0..400)
            .map(|i| format!("file-{i:05}").into_bytes())
            .collect();
        let entries: Vec<(&[u8], NodeId)> = names.iter().map(|n| (&n[..], 0)).collect();
        let blocks = pack_dir(&entries, 4096);
        for &(s, e, used) in &blocks {
            assert!(used <= 4096);
            assert_eq!(used, (s..e).map(|i| 12 + names[i].len()).sum::<usize>());
        }
        assert_eq!(blocks.last().unwrap().1, 400);
        assert!(blocks.len() >= 2);
    }
}
