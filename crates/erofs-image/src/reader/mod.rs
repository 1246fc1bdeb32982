//! Reading EROFS images in userspace: stat, readdir, file data, xattrs, symlinks, path lookup.
//!
//! Every read is bounds-checked against its device, every count and size taken from the image
//! is validated before it is used to allocate or loop, and nothing is cached, so a hostile image
//! yields an error ([`crate::error::CorruptError`]), never a panic, a hang or an out-of-bounds
//! read. Uncompressed layouts are supported (flat, inline, chunk-based, extra devices in both
//! flat and separate form); compressed inodes are refused.

mod source;

use std::ops::ControlFlow;

pub use source::ReadAt;

use crate::error::{CorruptKind, Error, Result};
use crate::format::{self, ChunkIndex, DeviceSlot, Dirent, RawInode, Superblock, file_type, mode};

/// Largest directory the reader accepts (protects memory on hostile images).
pub const MAX_DIR_SIZE: u64 = 1 << 30;
/// Largest symlink target the reader accepts.
pub const MAX_SYMLINK_SIZE: u64 = 4096;

struct Device {
    src: Box<dyn ReadAt>,
    size: u64,
}

/// An open image.
pub struct Image {
    devices: Vec<Device>,
    slots: Vec<DeviceSlot>,
    /// No extra devices were given: device N lives in the primary at its unified address.
    flat: bool,
    sb: Superblock,
    bits: u8,
    bs: u64,
    meta_base: u64,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("sb", &self.sb)
            .field("devices", &self.devices.len())
            .field("flat", &self.flat)
            .finish()
    }
}

/// A parsed inode.
#[derive(Debug, Clone)]
pub struct Inode {
    /// Its nid.
    pub nid: u64,
    /// The on-disk fields.
    pub raw: RawInode,
    /// Data layout.
    pub layout: u8,
    /// Absolute offset of the inode in the primary device.
    pub pos: u64,
    /// mtime seconds (compact inodes take the superblock's epoch).
    pub mtime: i64,
    /// mtime nanoseconds.
    pub mtime_nsec: u32,
    chunk: Option<ChunkInfo>,
}

/// Where a chunk-based inode keeps its chunk table, and how it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// log2 of the chunk size.
    pub bits: u32,
    /// 8-byte chunk indexes (with device ids) rather than 4-byte block-map entries.
    pub indexes: bool,
    /// Absolute offset of the table in the primary device.
    pub table: u64,
    /// Number of entries (`ceil(size / chunk size)`).
    pub count: u64,
}

impl ChunkInfo {
    /// Bytes per table entry.
    pub fn entry_size(&self) -> u64 {
        if self.indexes {
            format::CHUNK_INDEX_SIZE as u64
        } else {
            format::BLOCK_MAP_ENTRY_SIZE as u64
        }
    }
}

/// One chunk-table entry as stored (before the kernel's device-id mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawChunk {
    /// The device id as stored (always 0 in block-map entries).
    pub device_id: u16,
    /// The low 32 bits of the start block, or [`format::NULL_ADDR`] for a hole.
    pub blkaddr: u32,
    /// The 48-bit high half (0 unless 48BIT).
    pub blkaddr_hi: u16,
}

/// How many chunk entries [`Image::for_each_chunk`] reads at once.
const CHUNK_BATCH: usize = 512;

impl Inode {
    /// Full mode (type and permissions).
    pub fn mode(&self) -> u32 {
        self.raw.mode as u32
    }
    /// File type bits.
    pub fn file_type(&self) -> u32 {
        self.mode() & mode::S_IFMT
    }
    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.file_type() == mode::S_IFDIR
    }
    /// Whether this is a regular file.
    pub fn is_file(&self) -> bool {
        self.file_type() == mode::S_IFREG
    }
    /// Whether this is a symlink.
    pub fn is_symlink(&self) -> bool {
        self.file_type() == mode::S_IFLNK
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.raw.size
    }
    /// `(major, minor)` for device nodes.
    pub fn rdev(&self) -> (u32, u32) {
        match self.file_type() {
            mode::S_IFCHR | mode::S_IFBLK => format::decode_rdev(self.raw.i_u),
            _ => (0, 0),
        }
    }
    /// Whether this is an overlayfs whiteout (character device 0:0).
    pub fn is_whiteout(&self) -> bool {
        self.file_type() == mode::S_IFCHR && self.raw.i_u == 0
    }
    /// Absolute offset of the inline xattr body (right after the inode).
    pub fn xattr_start(&self) -> u64 {
        self.pos + self.raw.inode_size() as u64
    }
    /// The chunk table of a chunk-based inode.
    pub fn chunk_info(&self) -> Option<ChunkInfo> {
        self.chunk
    }
    fn inline_start(&self) -> u64 {
        self.xattr_start() + self.raw.xattr_isize() as u64
    }
}

/// A directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Name bytes.
    pub name: Vec<u8>,
    /// Target nid.
    pub nid: u64,
    /// One of [`format::file_type`].
    pub file_type: u8,
    /// Index of the directory block holding the entry.
    pub block: u64,
}

/// Where one piece of file data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// A hole of this many bytes.
    Hole(u64),
    /// Bytes on a device.
    Data {
        /// Device id (0 = primary).
        device: u16,
        /// Byte offset within that device (after resolving flat mode).
        offset: u64,
        /// Length.
        len: u64,
    },
}

fn corrupt(kind: CorruptKind) -> Error {
    Error::Corrupt(kind.into())
}

impl Image {
    /// Open an image. Data on extra devices is read from the primary at the devices' unified
    /// addresses (the single-file `[index][tar]` form).
    pub fn open(primary: impl ReadAt + 'static) -> Result<Self> {
        Self::open_with_devices(primary, Vec::new())
    }

    /// Open an image with its extra devices, in device-table order. An empty list means flat
    /// mode, like mounting without `-o device=`.
    pub fn open_with_devices(
        primary: impl ReadAt + 'static,
        devices: Vec<Box<dyn ReadAt>>,
    ) -> Result<Self> {
        let size = primary
            .size()
            .map_err(|e| Error::io("reading the image size", e))?;
        let primary = Device {
            src: Box::new(primary),
            size,
        };
        let mut raw = [0u8; format::SUPERBLOCK_SIZE];
        read_exact_dev(&primary, 0, format::SUPER_OFFSET, &mut raw)?;
        let sb = Superblock::decode(&raw);
        if sb.magic != format::MAGIC {
            return Err(corrupt(CorruptKind::BadMagic(sb.magic)));
        }
        if !(format::MIN_BLKSZBITS..=format::MAX_BLKSZBITS).contains(&sb.blkszbits) {
            return Err(corrupt(CorruptKind::BadBlockSize(sb.blkszbits)));
        }
        let bs = 1u64 << sb.blkszbits;
        if sb.feature_compat & format::FEATURE_COMPAT_SB_CHKSUM != 0 {
            let len = format::checksum_len(bs as u32);
            let mut covered = vec![0u8; len];
            read_exact_dev(&primary, 0, format::SUPER_OFFSET, &mut covered)?;
            let computed = format::superblock_checksum(&covered);
            if computed != sb.checksum {
                return Err(corrupt(CorruptKind::BadChecksum {
                    stored: sb.checksum,
                    computed,
                }));
            }
        }
        let unknown = sb.feature_incompat & !format::FEATURE_INCOMPAT_SUPPORTED;
        if unknown != 0 {
            return Err(corrupt(CorruptKind::UnsupportedFeatures(unknown)));
        }
        if sb.dirblkbits != 0 {
            return Err(corrupt(CorruptKind::BadSuperblock("dirblkbits is not 0")));
        }
        if sb.xattr_prefix_count != 0 {
            return Err(corrupt(CorruptKind::BadSuperblock(
                "long xattr prefixes are not supported",
            )));
        }
        let mut slots = Vec::new();
        if sb.extra_devices > 0 {
            if sb.feature_incompat & format::FEATURE_INCOMPAT_DEVICE_TABLE == 0 {
                return Err(corrupt(CorruptKind::BadSuperblock(
                    "extra devices without a device table",
                )));
            }
            let base = sb.devt_slotoff as u64 * format::DEVICE_SLOT_SIZE as u64;
            if base < format::SUPER_OFFSET + format::SUPERBLOCK_SIZE as u64 {
                return Err(corrupt(CorruptKind::BadSuperblock(
                    "device table overlaps the superblock",
                )));
            }
            for i in 0..sb.extra_devices as u64 {
                let mut b = [0u8; format::DEVICE_SLOT_SIZE];
                read_exact_dev(
                    &primary,
                    0,
                    base + i * format::DEVICE_SLOT_SIZE as u64,
                    &mut b,
                )?;
                slots.push(DeviceSlot::decode(&b));
            }
        }
        let flat = devices.is_empty();
        if !flat && devices.len() != slots.len() {
            return Err(Error::InvalidOption(format!(
                "image has {} extra devices, {} given",
                slots.len(),
                devices.len()
            )));
        }
        let mut all = vec![primary];
        for d in devices {
            let size = d
                .size()
                .map_err(|e| Error::io("reading a device size", e))?;
            all.push(Device { src: d, size });
        }
        let img = Image {
            devices: all,
            slots,
            flat,
            meta_base: sb.meta_blkaddr as u64 * bs,
            bits: sb.blkszbits,
            bs,
            sb,
        };
        let root = img.inode(img.root_nid())?;
        if !root.is_dir() {
            return Err(Error::Corrupt(CorruptKind::NotDirectory.at(img.root_nid())));
        }
        Ok(img)
    }

    /// The superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// The device table.
    pub fn device_slots(&self) -> &[DeviceSlot] {
        &self.slots
    }

    /// Whether extra devices are read from the primary (flat mode).
    pub fn is_flat(&self) -> bool {
        self.flat
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.bs
    }

    /// Size of a device in bytes (0 = primary). In flat mode only the primary exists.
    pub fn device_size(&self, device: u16) -> Option<u64> {
        self.devices.get(device as usize).map(|d| d.size)
    }

    /// The root directory's nid.
    pub fn root_nid(&self) -> u64 {
        self.sb.root_nid as u64
    }

    /// Read exactly `buf.len()` bytes at `offset` of a device (0 = primary), bounds-checked.
    pub fn read_exact_at(&self, device: u16, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_exact(device, offset, buf)
    }

    fn read_exact(&self, device: u16, offset: u64, buf: &mut [u8]) -> Result<()> {
        let d = self
            .devices
            .get(device as usize)
            .ok_or_else(|| corrupt(CorruptKind::MissingDevice(device)))?;
        read_exact_dev(d, device, offset, buf)
    }

    /// Absolute position of an inode in the primary.
    pub fn inode_pos(&self, nid: u64) -> Result<u64> {
        nid.checked_mul(format::INODE_SLOT_SIZE)
            .and_then(|o| o.checked_add(self.meta_base))
            .filter(|&p| p < self.devices[0].size)
            .ok_or_else(|| corrupt(CorruptKind::BadNid(nid)))
    }

    /// Read and validate an inode.
    pub fn inode(&self, nid: u64) -> Result<Inode> {
        let at = |k: CorruptKind| Error::Corrupt(k.at(nid));
        let pos = self.inode_pos(nid)?;
        let mut head = [0u8; format::COMPACT_INODE_SIZE];
        self.read_exact(0, pos, &mut head)
            .map_err(|_| at(CorruptKind::BadNid(nid)))?;
        let compact = RawInode::decode_compact_part(&head);
        if compact.format & !format::I_FORMAT_ALL != 0 {
            return Err(at(CorruptKind::BadInodeFormat(compact.format)));
        }
        let raw = if compact.is_extended() {
            let mut full = [0u8; format::EXTENDED_INODE_SIZE];
            self.read_exact(0, pos, &mut full)
                .map_err(|_| at(CorruptKind::BadNid(nid)))?;
            RawInode::decode_extended(&full)
        } else {
            compact
        };
        let (mtime, mtime_nsec) = if raw.is_extended() {
            (raw.mtime as i64, raw.mtime_nsec)
        } else {
            (self.sb.epoch as i64, self.sb.fixed_nsec)
        };
        if format::file_type_of_mode(raw.mode as u32).is_none() {
            return Err(at(CorruptKind::BadMode(raw.mode)));
        }
        let layout = raw.layout();
        let mut inode = Inode {
            nid,
            layout,
            pos,
            mtime,
            mtime_nsec,
            chunk: None,
            raw,
        };
        let bs = self.bs;
        match layout {
            format::LAYOUT_FLAT_PLAIN => {}
            format::LAYOUT_FLAT_INLINE => {
                let nblocks = inode.raw.size.div_ceil(bs);
                if nblocks == 0 {
                    return Err(at(CorruptKind::BadInline("inline layout with no data")));
                }
                let tail = inode.raw.size - (nblocks - 1) * bs;
                let start = inode.inline_start();
                if start % bs + tail > bs {
                    return Err(at(CorruptKind::InlineCrossesBlock));
                }
            }
            format::LAYOUT_CHUNK_BASED => {
                let fmt = (inode.raw.i_u & 0xFFFF) as u16;
                if fmt & format::CHUNK_FORMAT_48BIT != 0 || fmt & !0x7F != 0 {
                    return Err(at(CorruptKind::BadChunk("unsupported chunk format")));
                }
                let bits = self.bits as u32 + (fmt & format::CHUNK_FORMAT_BLKBITS_MASK) as u32;
                let indexes = fmt & format::CHUNK_FORMAT_INDEXES != 0;
                let unit = if indexes {
                    format::CHUNK_INDEX_SIZE
                } else {
                    format::BLOCK_MAP_ENTRY_SIZE
                } as u64;
                let count = inode.raw.size.div_ceil(1u64 << bits);
                let table = inode.inline_start().next_multiple_of(unit);
                let end = count
                    .checked_mul(unit)
                    .and_then(|l| l.checked_add(table))
                    .ok_or_else(|| at(CorruptKind::BadChunk("chunk table overflows")))?;
                if end > self.devices[0].size {
                    return Err(at(CorruptKind::BadChunk("chunk table beyond the image")));
                }
                inode.chunk = Some(ChunkInfo {
                    bits,
                    indexes,
                    table,
                    count,
                });
            }
            format::LAYOUT_COMPRESSED_FULL | format::LAYOUT_COMPRESSED_COMPACT => {
                return Err(Error::Unsupported(format!(
                    "nid {nid}: compressed inodes are not supported"
                )));
            }
            other => return Err(at(CorruptKind::BadLayout(other))),
        }
        // Inline xattrs (and, for inline layouts, the tail) must be inside the image.
        if inode.inline_start() > self.devices[0].size {
            return Err(at(CorruptKind::BadXattr("xattr body beyond the image")));
        }
        Ok(inode)
    }

    /// The unified address space: in separate-device mode, an address inside device N's
    /// range is redirected to device N.
    fn resolve_unified(&self, addr: u64) -> (u16, u64) {
        if !self.flat {
            for (i, s) in self.slots.iter().enumerate() {
                let start = s.uniaddr as u64 * self.bs;
                let end = start + s.blocks as u64 * self.bs;
                if s.uniaddr != 0 && (start..end).contains(&addr) {
                    return ((i + 1) as u16, addr - start);
                }
            }
        }
        (0, addr)
    }

    /// Map the file data at `offset` to an extent of at most `want` bytes.
    pub fn map(&self, inode: &Inode, offset: u64, want: u64) -> Result<Extent> {
        let at = |k: CorruptKind| Error::Corrupt(k.at(inode.nid));
        let size = inode.raw.size;
        if offset >= size {
            return Ok(Extent::Hole(0));
        }
        let want = want.min(size - offset);
        let bs = self.bs;
        match inode.layout {
            format::LAYOUT_FLAT_PLAIN | format::LAYOUT_FLAT_INLINE => {
                let nblocks = size.div_ceil(bs);
                let inline = inode.layout == format::LAYOUT_FLAT_INLINE;
                let lastblk = nblocks - inline as u64;
                if offset < lastblk * bs {
                    if inode.raw.i_u == format::NULL_ADDR {
                        return Err(at(CorruptKind::BadSize("data blocks at the null address")));
                    }
                    let addr = (inode.raw.i_u as u64 * bs)
                        .checked_add(offset)
                        .ok_or_else(|| at(CorruptKind::BadSize("data address overflows")))?;
                    let len = want.min(lastblk * bs - offset);
                    let (device, off) = self.resolve_unified(addr);
                    Ok(Extent::Data {
                        device,
                        offset: off,
                        len,
                    })
                } else {
                    Ok(Extent::Data {
                        device: 0,
                        offset: inode.inline_start() + (offset - lastblk * bs),
                        len: want,
                    })
                }
            }
            format::LAYOUT_CHUNK_BASED => {
                let c = inode.chunk.expect("chunk info for chunk-based inode");
                let idx = offset >> c.bits;
                if idx >= c.count {
                    return Err(at(CorruptKind::BadChunk("chunk index out of range")));
                }
                let within = offset - (idx << c.bits);
                let len = want.min((1u64 << c.bits) - within);
                let entry = self.chunk_entry(&c, idx)?;
                self.chunk_extent(inode, entry, within, len)
            }
            other => Err(at(CorruptKind::BadLayout(other))),
        }
    }

    fn chunk_entry(&self, c: &ChunkInfo, idx: u64) -> Result<RawChunk> {
        let mut b = [0u8; format::CHUNK_INDEX_SIZE];
        let unit = c.entry_size() as usize;
        self.read_exact(0, c.table + idx * unit as u64, &mut b[..unit])?;
        Ok(decode_chunk(c, &b[..unit]))
    }

    /// Where `len` bytes starting `within` bytes into the chunk of `entry` live. Device ids
    /// are masked as the kernel does (to the device table size rounded up to a power of two).
    fn chunk_extent(
        &self,
        inode: &Inode,
        entry: RawChunk,
        within: u64,
        len: u64,
    ) -> Result<Extent> {
        let at = |k: CorruptKind| Error::Corrupt(k.at(inode.nid));
        if entry.blkaddr == format::NULL_ADDR {
            return Ok(Extent::Hole(len));
        }
        if entry.blkaddr_hi != 0 {
            return Err(at(CorruptKind::BadChunk("48-bit chunk address")));
        }
        let device_id = entry.device_id & self.device_id_mask();
        let blk_off = entry.blkaddr as u64 * self.bs + within;
        if device_id == 0 {
            let (device, off) = self.resolve_unified(blk_off);
            return Ok(Extent::Data {
                device,
                offset: off,
                len,
            });
        }
        let slot = self
            .slots
            .get(device_id as usize - 1)
            .ok_or_else(|| at(CorruptKind::BadChunk("device id beyond the device table")))?;
        if self.flat {
            Ok(Extent::Data {
                device: 0,
                offset: slot.uniaddr as u64 * self.bs + blk_off,
                len,
            })
        } else {
            Ok(Extent::Data {
                device: device_id,
                offset: blk_off,
                len,
            })
        }
    }

    /// The kernel's mask for chunk device ids: the device count (with the primary) rounded up
    /// to a power of two, minus one.
    pub fn device_id_mask(&self) -> u16 {
        ((self.sb.extra_devices as u32 + 1).next_power_of_two() - 1) as u16
    }

    /// Visit every entry of a chunk-based inode's table in order, with the extent it maps
    /// (clipped to the file size), reading the table in batches rather than one entry per
    /// read. `f` returns [`ControlFlow::Break`] to stop early. Not chunk-based: nothing.
    pub fn for_each_chunk(
        &self,
        inode: &Inode,
        mut f: impl FnMut(u64, RawChunk, Result<Extent>) -> ControlFlow<()>,
    ) -> Result<()> {
        let Some(c) = inode.chunk else {
            return Ok(());
        };
        let unit = c.entry_size() as usize;
        let mut buf = vec![0u8; CHUNK_BATCH * unit];
        let chunk = 1u64 << c.bits;
        let mut idx = 0u64;
        while idx < c.count {
            let n = (c.count - idx).min(CHUNK_BATCH as u64) as usize;
            let bytes = &mut buf[..n * unit];
            self.read_exact(0, c.table + idx * unit as u64, bytes)?;
            for (i, e) in bytes.chunks_exact(unit).enumerate() {
                let k = idx + i as u64;
                let start = k << c.bits;
                let len = chunk.min(inode.raw.size - start);
                let raw = decode_chunk(&c, e);
                if f(k, raw, self.chunk_extent(inode, raw, 0, len)).is_break() {
                    return Ok(());
                }
            }
            idx += n as u64;
        }
        Ok(())
    }

    /// Read file (or directory, or symlink) data at `offset`; returns bytes read, fewer than
    /// `buf.len()` only at the end of the file.
    pub fn read(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = inode.raw.size;
        if offset >= size {
            return Ok(0);
        }
        let total = (buf.len() as u64).min(size - offset) as usize;
        let mut done = 0usize;
        while done < total {
            match self.map(inode, offset + done as u64, (total - done) as u64)? {
                Extent::Hole(0) => break,
                Extent::Hole(n) => {
                    buf[done..done + n as usize].fill(0);
                    done += n as usize;
                }
                Extent::Data {
                    device,
                    offset,
                    len,
                } => {
                    self.read_exact(device, offset, &mut buf[done..done + len as usize])?;
                    done += len as usize;
                }
            }
        }
        Ok(done)
    }

    /// All entries of a directory, in on-disk order, with the structure of every block
    /// validated. Directories larger than [`MAX_DIR_SIZE`] are refused (they would be held
    /// in memory); [`Image::for_each_dir_block`] streams any size.
    pub fn read_dir(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        if dir.is_dir() && dir.raw.size > MAX_DIR_SIZE {
            return Err(Error::Corrupt(
                CorruptKind::Limit("directory larger than 1 GiB").at(dir.nid),
            ));
        }
        let mut out = Vec::new();
        self.for_each_dir_block(dir, |_, entries| {
            out.extend_from_slice(entries);
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// Stream a directory one block at a time: `f(block index, entries of that block)`, each
    /// block's structure validated before `f` sees it; [`ControlFlow::Break`] stops. Memory
    /// is one block's worth whatever the directory's size.
    pub fn for_each_dir_block(
        &self,
        dir: &Inode,
        mut f: impl FnMut(u64, &[DirEntry]) -> ControlFlow<()>,
    ) -> Result<()> {
        let at = |k: CorruptKind| Error::Corrupt(k.at(dir.nid));
        if !dir.is_dir() {
            return Err(at(CorruptKind::NotDirectory));
        }
        let size = dir.raw.size;
        if size == 0 {
            return Err(at(CorruptKind::BadSize("empty directory (no . and ..)")));
        }
        let bs = self.bs;
        let mut entries = Vec::new();
        let mut block = vec![0u8; bs as usize];
        let nblocks = size.div_ceil(bs);
        for b in 0..nblocks {
            let len = (size - b * bs).min(bs) as usize;
            let got = self.read(dir, b * bs, &mut block[..len])?;
            if got != len {
                return Err(at(CorruptKind::BadSize("directory shorter than its size")));
            }
            entries.clear();
            parse_dir_block(&block[..len], b, &mut entries).map_err(at)?;
            if f(b, &entries).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Look up `name` in a directory.
    pub fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<DirEntry>> {
        Ok(self.read_dir(dir)?.into_iter().find(|e| e.name == name))
    }

    /// Resolve a `/`-separated path from the root, without following symlinks.
    pub fn resolve(&self, path: &[u8]) -> Result<Inode> {
        let mut cur = self.inode(self.root_nid())?;
        for comp in path
            .split(|&c| c == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            if !cur.is_dir() {
                return Err(corrupt(CorruptKind::NotDirectory));
            }
            let e = self.lookup(&cur, comp)?.ok_or_else(|| {
                corrupt(CorruptKind::NotFound(
                    String::from_utf8_lossy(path).into_owned(),
                ))
            })?;
            cur = self.inode(e.nid)?;
        }
        Ok(cur)
    }

    /// A symlink's target.
    pub fn read_link(&self, inode: &Inode) -> Result<Vec<u8>> {
        let at = |k: CorruptKind| Error::Corrupt(k.at(inode.nid));
        if !inode.is_symlink() {
            return Err(at(CorruptKind::BadSymlink("not a symlink")));
        }
        let size = inode.raw.size;
        if size == 0 || size > MAX_SYMLINK_SIZE {
            return Err(at(CorruptKind::BadSymlink("bad target length")));
        }
        let mut buf = vec![0u8; size as usize];
        if self.read(inode, 0, &mut buf)? != buf.len() {
            return Err(at(CorruptKind::BadSymlink("target shorter than its size")));
        }
        Ok(buf)
    }

    /// Extended attributes (shared and inline), with full names.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let at = |k: CorruptKind| Error::Corrupt(k.at(inode.nid));
        let isize = inode.raw.xattr_isize() as u64;
        if isize == 0 {
            return Ok(Vec::new());
        }
        if isize < format::XATTR_IBODY_HEADER_SIZE as u64 {
            return Err(at(CorruptKind::BadXattr(
                "xattr body smaller than its header",
            )));
        }
        let mut body = vec![0u8; isize as usize];
        self.read_exact(0, inode.xattr_start(), &mut body)
            .map_err(|_| at(CorruptKind::BadXattr("xattr body beyond the image")))?;
        let shared = format::XattrIbodyHeader::decode(&body)
            .ok_or(at(CorruptKind::BadXattr(
                "xattr body smaller than its header",
            )))?
            .shared_count as usize;
        let mut p = format::XATTR_IBODY_HEADER_SIZE + shared * 4;
        if p > body.len() {
            return Err(at(CorruptKind::BadXattr(
                "shared xattr ids overflow the body",
            )));
        }
        let mut out = Vec::new();
        for i in 0..shared {
            let o = format::XATTR_IBODY_HEADER_SIZE + i * 4;
            let id = body
                .get(o..)
                .and_then(format::decode_u32)
                .ok_or(at(CorruptKind::BadXattr(
                    "shared xattr ids overflow the body",
                )))? as u64;
            let addr = self.sb.xattr_blkaddr as u64 * self.bs + id * 4;
            let mut hdr = [0u8; format::XATTR_ENTRY_SIZE];
            self.read_exact(0, addr, &mut hdr)
                .map_err(|_| at(CorruptKind::BadXattr("shared xattr beyond the image")))?;
            let e = format::XattrEntry::decode(&hdr)
                .ok_or(at(CorruptKind::BadXattr("truncated entry")))?;
            let (nl, vl) = (e.name_len as usize, e.value_size as usize);
            let mut rest = vec![0u8; nl + vl];
            self.read_exact(0, addr + 4, &mut rest)
                .map_err(|_| at(CorruptKind::BadXattr("shared xattr beyond the image")))?;
            out.push(xattr_entry(e.name_index, &rest[..nl], &rest[nl..]).map_err(at)?);
        }
        while p < body.len() {
            let e = format::XattrEntry::decode(&body[p..])
                .ok_or(at(CorruptKind::BadXattr("truncated entry")))?;
            let (nl, idx, vl) = (e.name_len as usize, e.name_index, e.value_size as usize);
            let end = p + format::XATTR_ENTRY_SIZE + nl + vl;
            if end > body.len() {
                return Err(at(CorruptKind::BadXattr("entry overflows the body")));
            }
            let name = &body[p + 4..p + 4 + nl];
            let value = &body[p + 4 + nl..end];
            out.push(xattr_entry(idx, name, value).map_err(at)?);
            p = end.next_multiple_of(4);
        }
        Ok(out)
    }

    /// Walk the whole tree breadth-first from the root, calling `f(path, entry_or_root,
    /// inode)`. Directories reached twice are walked once.
    pub fn walk(&self, mut f: impl FnMut(&[u8], &Inode) -> Result<()>) -> Result<()> {
        let root = self.inode(self.root_nid())?;
        f(b"", &root)?;
        let mut seen = std::collections::HashSet::new();
        seen.insert(root.nid);
        let mut queue = std::collections::VecDeque::from([(Vec::new(), root)]);
        while let Some((path, dir)) = queue.pop_front() {
            for e in self.read_dir(&dir)? {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&e.name);
                let inode = self.inode(e.nid)?;
                f(&p, &inode)?;
                if inode.is_dir() && e.file_type == file_type::DIR && seen.insert(inode.nid) {
                    queue.push_back((p, inode));
                }
            }
        }
        Ok(())
    }
}

fn xattr_entry(
    index: u8,
    suffix: &[u8],
    value: &[u8],
) -> std::result::Result<(Vec<u8>, Vec<u8>), CorruptKind> {
    let prefix = format::xattr_prefix(index).ok_or(CorruptKind::BadXattr("unknown name index"))?;
    let mut name = prefix.to_vec();
    name.extend_from_slice(suffix);
    Ok((name, value.to_vec()))
}

fn decode_chunk(c: &ChunkInfo, e: &[u8]) -> RawChunk {
    if c.indexes {
        let b: &[u8; format::CHUNK_INDEX_SIZE] = e.try_into().expect("an 8-byte chunk index");
        let (i, hi) = ChunkIndex::decode(b);
        RawChunk {
            device_id: i.device_id,
            blkaddr: i.blkaddr,
            blkaddr_hi: hi,
        }
    } else {
        RawChunk {
            device_id: 0,
            blkaddr: format::decode_u32(e).unwrap_or(format::NULL_ADDR),
            blkaddr_hi: 0,
        }
    }
}

fn read_exact_dev(d: &Device, id: u16, offset: u64, buf: &mut [u8]) -> Result<()> {
    let len = buf.len() as u64;
    let oob = || {
        corrupt(CorruptKind::OutOfBounds {
            device: id,
            offset,
            len,
            size: d.size,
        })
    };
    let end = offset.checked_add(buf.len() as u64).ok_or_else(oob)?;
    if end > d.size {
        return Err(oob());
    }
    let n = d
        .src
        .read_at(buf, offset)
        .map_err(|e| Error::io(format!("reading device {id}"), e))?;
    if n != buf.len() {
        return Err(oob());
    }
    Ok(())
}

/// Parse one directory block, appending its entries.
fn parse_dir_block(
    b: &[u8],
    block: u64,
    out: &mut Vec<DirEntry>,
) -> std::result::Result<(), CorruptKind> {
    let bad = |what| CorruptKind::BadDirBlock { block, what };
    let first = Dirent::decode(b).ok_or(bad("block too short"))?;
    let nameoff0 = first.nameoff as usize;
    if nameoff0 < format::DIRENT_SIZE
        || nameoff0 >= b.len()
        || !nameoff0.is_multiple_of(format::DIRENT_SIZE)
    {
        return Err(bad("invalid first name offset"));
    }
    let n = nameoff0 / format::DIRENT_SIZE;
    let mut dirents = Vec::with_capacity(n);
    for i in 0..n {
        let d = b.get(i * format::DIRENT_SIZE..).and_then(Dirent::decode);
        dirents.push(d.ok_or(bad("entries overflow the block"))?);
    }
    for i in 0..n {
        let start = dirents[i].nameoff as usize;
        let end = if i + 1 < n {
            dirents[i + 1].nameoff as usize
        } else {
            let tail = &b[start.min(b.len())..];
            start + tail.iter().position(|&c| c == 0).unwrap_or(tail.len())
        };
        if start < nameoff0 || end > b.len() || start >= end {
            return Err(bad("invalid name offset"));
        }
        let name = &b[start..end];
        if name.len() > format::NAME_MAX {
            return Err(bad("name longer than 255 bytes"));
        }
        out.push(DirEntry {
            name: name.to_vec(),
            nid: dirents[i].nid,
            file_type: dirents[i].file_type,
            block,
        });
    }
    Ok(())
}
