//! A structure-aware generator of EROFS images for the checker: a tree of directories, files
//! (flat, inline and chunk-based, with block maps or indexes naming devices), symlinks and
//! devices, inline and shared xattrs with name filters, an optional device table, all laid
//! out as mkfs would; then, driven by the same bytes, hostile twists (overlapping inodes and
//! chunk tables, directories made of one block repeated, wrong types, links and filters, out
//! of range ids, flipped bytes). Shared by the fuzz target `check` and the test
//! `generated_images` (which feeds it pseudo-random bytes), so the generator itself runs in
//! the suite.
#![allow(dead_code)]

use erofs_image::format::{
    self, ChunkIndex, DeviceSlot, Dirent, RawInode, Superblock, XattrEntry, XattrIbodyHeader,
    file_type, mode,
};

/// Bytes to decide by; zeros once they run out (so every input gives an image).
pub struct Src<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Src<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Src { data, pos: 0 }
    }
    pub fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    /// 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        let v = if n <= 256 {
            self.byte() as u64
        } else {
            self.u32() as u64
        };
        v % n
    }
    /// True with probability 1/n.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// A generated image, and whether it was left as a correct builder would write it (then the
/// checker must accept it).
pub struct Generated {
    pub image: Vec<u8>,
    pub clean: bool,
}

/// Layout: superblock at 1024, device table at 2048, inodes from 4096 in records of
/// `RECORD` bytes (inode, xattr body, chunk table), then one block per directory, the shared
/// xattr block, data blocks, and the extra devices' blocks (flat, after the primary).
const META: u64 = 4096;
const RECORD: u64 = 512;
const XATTR_NAMES: [(u8, &[u8]); 6] = [
    (format::xattr_index::USER, b"foo"),
    (format::xattr_index::USER, b"mime_type"),
    (format::xattr_index::TRUSTED, b"overlay.opaque"),
    (format::xattr_index::SECURITY, b"selinux"),
    (format::xattr_index::SECURITY, b"test"),
    (
        format::xattr_index::USER,
        b"a_much_longer_name_than_sixteen_bytes",
    ),
];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Dir,
    Reg,
    Symlink,
    Chr,
}

pub fn image(s: &mut Src) -> Generated {
    let mut clean = true;
    // Half the inputs are left as a builder would write them.
    let hostile = s.byte() & 1 == 1;
    // A hostile change: the image is no longer what a builder would write.
    macro_rules! twist {
        ($n:expr) => {{
            let t = hostile && s.one_in($n);
            if t {
                clean = false;
            }
            t
        }};
    }
    let bits = 9 + s.below(4) as u8;
    let bs = 1u64 << bits;
    let count = 1 + s.below(20) as usize;
    let max_entries = (bs as usize / (format::DIRENT_SIZE + 4)).min(30) - 2;
    // The tree: inode 0 is the root; each later inode hangs from an earlier directory.
    let mut kinds = vec![Kind::Dir];
    let mut parent = vec![0usize];
    let mut children: Vec<Vec<usize>> = vec![Vec::new()];
    for i in 1..count {
        let kind = match s.below(6) {
            0 | 1 => Kind::Dir,
            2 => Kind::Symlink,
            3 => Kind::Chr,
            _ => Kind::Reg,
        };
        let dirs: Vec<usize> = (0..i)
            .filter(|&d| kinds[d] == Kind::Dir && children[d].len() < max_entries)
            .collect();
        let Some(&p) = dirs.get(s.below(dirs.len().max(1) as u64) as usize) else {
            break;
        };
        kinds.push(kind);
        parent.push(p);
        children.push(Vec::new());
        children[p].push(i);
    }
    let count = kinds.len();
    // nids: records RECORD bytes apart, or (a twist) one slot apart so that inodes, their
    // xattr bodies and their chunk tables overlap.
    let spacing = if twist!(16) { 1 } else { RECORD / 32 };
    let nid = |i: usize| i as u64 * spacing;
    let pos = |i: usize| META + nid(i) * 32;
    let meta_end = META + count as u64 * RECORD;
    let dir_blk0 = meta_end.div_ceil(bs);
    let xattr_blk = dir_blk0 + count as u64;
    let data_blk0 = xattr_blk + 1;
    let data_blocks = 1 + s.below(16);
    let primary_blocks = data_blk0 + data_blocks;
    let extra_devices = if s.one_in(3) {
        1 + s.below(3) as u16
    } else {
        0
    };
    let dev_blocks = 4u64;
    let total = (primary_blocks + extra_devices as u64 * dev_blocks) * bs;
    let mut img = vec![0u8; total as usize];
    let put = |img: &mut Vec<u8>, at: u64, b: &[u8]| {
        let at = at as usize;
        if at < img.len() {
            let n = b.len().min(img.len() - at);
            img[at..at + n].copy_from_slice(&b[..n]);
        }
    };

    let mut sb = Superblock {
        magic: format::MAGIC,
        blkszbits: bits,
        root_nid: 0,
        inos: count as u64,
        blocks: primary_blocks as u32,
        meta_blkaddr: (META / bs) as u32,
        xattr_blkaddr: xattr_blk as u32,
        ..Default::default()
    };
    if s.one_in(2) {
        sb.feature_compat |= format::FEATURE_COMPAT_SB_CHKSUM;
    }
    let filter_on = s.one_in(2);
    if filter_on {
        sb.feature_compat |= format::FEATURE_COMPAT_XATTR_FILTER;
    }
    if extra_devices > 0 {
        sb.feature_incompat |= format::FEATURE_INCOMPAT_DEVICE_TABLE;
        sb.extra_devices = extra_devices;
        sb.devt_slotoff = (2048 / format::DEVICE_SLOT_SIZE) as u16;
        for d in 0..extra_devices as u64 {
            let slot = DeviceSlot {
                tag: [0; 64],
                blocks: dev_blocks as u32,
                uniaddr: (primary_blocks + d * dev_blocks) as u32,
            };
            put(&mut img, 2048 + d * 128, &slot.encode());
        }
    }

    // The shared xattr block: entries for the first few names, their ids recorded.
    let mut shared_ids = Vec::new();
    let mut at = xattr_blk * bs;
    for (index, name) in XATTR_NAMES.iter().take(3) {
        shared_ids.push(((at - xattr_blk * bs) / 4) as u32);
        let mut e = XattrEntry {
            name_len: name.len() as u8,
            name_index: *index,
            value_size: 2,
        }
        .encode()
        .to_vec();
        e.extend_from_slice(name);
        e.extend_from_slice(b"v1");
        put(&mut img, at, &e);
        at += (e.len() as u64).next_multiple_of(4);
    }

    // Link counts as a builder computes them.
    let nlink = |i: usize| -> u32 {
        match kinds[i] {
            Kind::Dir => {
                2 + children[i]
                    .iter()
                    .filter(|&&c| kinds[c] == Kind::Dir)
                    .count() as u32
            }
            _ => 1,
        }
    };

    for i in 0..count {
        let kind = kinds[i];
        // Xattrs: some shared, some inline, a filter that is right unless twisted.
        let mut body = Vec::new();
        let mut bits_used = 0u32;
        if s.one_in(3) {
            let nshared = s.below(3) as usize;
            let mut ids = Vec::new();
            for k in 0..nshared {
                let id = if twist!(24) {
                    s.u32()
                } else {
                    shared_ids[k % shared_ids.len()]
                };
                let (index, name) = XATTR_NAMES[k % 3];
                bits_used |= 1 << format::xattr_filter_bit(index, name);
                ids.push(id);
            }
            let mut inline = Vec::new();
            for (index, name) in XATTR_NAMES.iter().skip(3) {
                if s.one_in(2) {
                    let index = if twist!(32) { s.byte() } else { *index };
                    bits_used |= 1 << format::xattr_filter_bit(index, name);
                    let mut e = XattrEntry {
                        name_len: name.len() as u8,
                        name_index: index,
                        value_size: 3,
                    }
                    .encode()
                    .to_vec();
                    e.extend_from_slice(name);
                    e.extend_from_slice(b"val");
                    e.resize(e.len().next_multiple_of(4), 0);
                    inline.extend_from_slice(&e);
                }
            }
            let filter = if twist!(8) {
                s.u32()
            } else if filter_on {
                !bits_used
            } else {
                0
            };
            body = XattrIbodyHeader {
                name_filter: filter,
                shared_count: ids.len() as u8,
            }
            .encode()
            .to_vec();
            for id in ids {
                body.extend_from_slice(&id.to_le_bytes());
            }
            body.extend_from_slice(&inline);
            if body.len() == format::XATTR_IBODY_HEADER_SIZE {
                // A header alone is refused by the kernel: no xattrs, no body.
                body.clear();
            }
        }
        let icount = format::xattr_icount_for(body.len()).unwrap_or(0);
        let data_blk = data_blk0 + s.below(data_blocks);
        let (mut layout, mut size, mut i_u, mut table) =
            (format::LAYOUT_FLAT_PLAIN, 0u64, 0u32, Vec::new());
        let mut inline_tail = Vec::new();
        match kind {
            Kind::Dir => {
                let mut entries: Vec<(Vec<u8>, u64, u8)> = vec![
                    (b".".to_vec(), nid(i), file_type::DIR),
                    (b"..".to_vec(), nid(parent[i]), file_type::DIR),
                ];
                for &c in &children[i] {
                    let ft = match kinds[c] {
                        Kind::Dir => file_type::DIR,
                        Kind::Reg => file_type::REG,
                        Kind::Symlink => file_type::SYMLINK,
                        Kind::Chr => file_type::CHR,
                    };
                    let ft = if twist!(32) { s.below(8) as u8 } else { ft };
                    let target = if twist!(32) {
                        s.below(count as u64 * spacing + 4)
                    } else {
                        nid(c)
                    };
                    entries.push((format!("c{c:03}").into_bytes(), target, ft));
                }
                if twist!(24) && entries.len() > 3 {
                    entries.swap(2, 3);
                }
                let block = dir_block(&entries);
                let blk = dir_blk0 + i as u64;
                put(&mut img, blk * bs, &block);
                size = block.len() as u64;
                i_u = blk as u32;
                if twist!(12) {
                    // One block repeated: a chunk-based directory of many blocks.
                    layout = format::LAYOUT_CHUNK_BASED;
                    let n = 1 + s.below(64);
                    size = n * bs;
                    i_u = 0;
                    table = (blk as u32).to_le_bytes().repeat(n as usize);
                }
            }
            Kind::Symlink => {
                size = 1 + s.below(40);
                layout = format::LAYOUT_FLAT_INLINE;
                inline_tail = vec![b'l'; size as usize];
            }
            Kind::Chr => {
                i_u = format::encode_rdev(s.below(8) as u32, s.below(8) as u32);
            }
            Kind::Reg => match s.below(3) {
                0 => {
                    size = s.below(bs + 1);
                    i_u = data_blk as u32;
                    if size > bs * (primary_blocks - data_blk) {
                        size = bs;
                    }
                }
                1 => {
                    size = 1 + s.below(64);
                    layout = format::LAYOUT_FLAT_INLINE;
                    inline_tail = vec![b'd'; size as usize];
                }
                _ => {
                    layout = format::LAYOUT_CHUNK_BASED;
                    let indexes = s.one_in(2);
                    let mut fmt = s.below(4) as u16;
                    if indexes {
                        fmt |= format::CHUNK_FORMAT_INDEXES;
                    }
                    if twist!(32) {
                        fmt = s.u32() as u16;
                    }
                    i_u = fmt as u32;
                    let chunk = bs << (fmt & format::CHUNK_FORMAT_BLKBITS_MASK);
                    let most = if twist!(16) { 4096 } else { 6 };
                    let n = 1 + s.below(most);
                    size = n * chunk - s.below(chunk);
                    for _ in 0..n {
                        let hole = s.one_in(3);
                        let (device_id, blkaddr) = if hole {
                            (0, format::NULL_ADDR)
                        } else if extra_devices > 0 && indexes && s.one_in(2) {
                            let d = 1 + s.below(extra_devices as u64) as u16;
                            (d, 0)
                        } else {
                            (0, data_blk as u32)
                        };
                        let device_id = if twist!(32) {
                            s.byte() as u16
                        } else {
                            device_id
                        };
                        let blkaddr = if twist!(32) { s.u32() } else { blkaddr };
                        if indexes {
                            let mut e = [0u8; 8];
                            ChunkIndex { device_id, blkaddr }.encode(&mut e);
                            table.extend_from_slice(&e);
                        } else {
                            table.extend_from_slice(&blkaddr.to_le_bytes());
                        }
                    }
                    // A chunk past what the data area holds is cut to one block.
                    if !hole_safe(&table, indexes, fmt, bs, primary_blocks, dev_blocks) {
                        clean = false;
                    }
                }
            },
        }
        let extended = size > u32::MAX as u64 || s.one_in(8);
        let m = match kind {
            Kind::Dir => mode::S_IFDIR | 0o755,
            Kind::Reg => mode::S_IFREG | 0o644,
            Kind::Symlink => mode::S_IFLNK | 0o777,
            Kind::Chr => mode::S_IFCHR | 0o600,
        };
        let raw = RawInode {
            format: ((layout as u16) << format::I_DATALAYOUT_SHIFT) | extended as u16,
            xattr_icount: icount,
            mode: if twist!(48) { s.u32() as u16 } else { m as u16 },
            nlink: if twist!(24) {
                s.below(5) as u32
            } else {
                nlink(i)
            },
            size,
            i_u,
            ino: i as u32,
            ..Default::default()
        };
        let mut ib = [0u8; 64];
        raw.encode(&mut ib);
        let isz = if extended { 64 } else { 32 };
        let mut rec = ib[..isz].to_vec();
        rec.extend_from_slice(&body);
        if !table.is_empty() {
            let unit = if i_u as u16 & format::CHUNK_FORMAT_INDEXES != 0
                && layout == format::LAYOUT_CHUNK_BASED
                && kind == Kind::Reg
            {
                8
            } else {
                4
            };
            let start = (pos(i) + rec.len() as u64).next_multiple_of(unit) - pos(i);
            rec.resize(start as usize, 0);
            rec.extend_from_slice(&table);
        }
        if !inline_tail.is_empty() {
            // The tail must not cross a block: start it in the next block if it would.
            let start = pos(i) + rec.len() as u64;
            if start % bs + inline_tail.len() as u64 > bs {
                clean = false;
            }
            rec.extend_from_slice(&inline_tail);
        }
        if rec.len() as u64 > RECORD {
            clean = false;
        }
        put(&mut img, pos(i), &rec);
    }
    put(&mut img, format::SUPER_OFFSET, &sb.encode());
    if sb.feature_compat & format::FEATURE_COMPAT_SB_CHKSUM != 0 {
        let len = format::checksum_len(bs as u32);
        let start = format::SUPER_OFFSET as usize;
        let sum = format::superblock_checksum(&img[start..start + len]);
        img[start + 4..start + 8].copy_from_slice(&sum.to_le_bytes());
    }
    // Flipped bytes anywhere.
    for _ in 0..s.below(4) {
        if twist!(2) {
            let p = s.below(img.len() as u64) as usize;
            img[p] ^= 1 << s.below(8);
        }
    }
    Generated { image: img, clean }
}

/// Whether every data chunk of a table lies inside its device.
fn hole_safe(
    table: &[u8],
    indexes: bool,
    fmt: u16,
    bs: u64,
    primary_blocks: u64,
    dev_blocks: u64,
) -> bool {
    let chunk_blocks = 1u64 << (fmt & format::CHUNK_FORMAT_BLKBITS_MASK);
    let unit = if indexes { 8 } else { 4 };
    let _ = bs;
    table.chunks_exact(unit).all(|e| {
        let (dev, blk) = if indexes {
            let (c, _) = ChunkIndex::decode(e.try_into().unwrap());
            (c.device_id, c.blkaddr)
        } else {
            (0, u32::from_le_bytes(e.try_into().unwrap()))
        };
        let limit = if dev == 0 { primary_blocks } else { dev_blocks };
        blk == format::NULL_ADDR || blk as u64 + chunk_blocks <= limit
    })
}

fn dir_block(entries: &[(Vec<u8>, u64, u8)]) -> Vec<u8> {
    let mut heads = Vec::new();
    let mut names = Vec::new();
    let base = entries.len() * format::DIRENT_SIZE;
    for (name, nid, ft) in entries {
        let mut d = [0u8; format::DIRENT_SIZE];
        Dirent {
            nid: *nid,
            nameoff: (base + names.len()) as u16,
            file_type: *ft,
        }
        .encode(&mut d);
        heads.extend_from_slice(&d);
        names.extend_from_slice(name);
    }
    heads.extend_from_slice(&names);
    heads
}
