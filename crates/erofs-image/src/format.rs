//! On-disk EROFS structures and constants.
//!
//! Everything here is little-endian and position-independent: encoders write into a caller's
//! buffer, decoders take a byte slice of exactly the structure's size. Enum-like fields stay raw
//! integers and are interpreted by the reader, so bytes from an image are never trusted to be a
//! valid enum.
//!
//! Only the uncompressed subset is written (flat, inline and chunk-based layouts, a device table
//! for tar-index images), which keeps full images mountable by kernels from 5.16 and tar-index
//! images from 6.4.

/// Byte offset of the superblock in the primary device, whatever the block size.
pub const SUPER_OFFSET: u64 = 1024;
/// Superblock magic.
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// Size of the base superblock (no extension slots).
pub const SUPERBLOCK_SIZE: usize = 128;
/// Size of one device-table slot.
pub const DEVICE_SLOT_SIZE: usize = 128;
/// Inodes are addressed in 32-byte slots: `iloc(nid) = meta_blkaddr * bs + nid * 32`.
pub const INODE_SLOT_BITS: u32 = 5;
/// Size of one inode slot.
pub const INODE_SLOT_SIZE: u64 = 1 << INODE_SLOT_BITS;
/// Compact (v1) inode size.
pub const COMPACT_INODE_SIZE: usize = 32;
/// Extended (v2) inode size.
pub const EXTENDED_INODE_SIZE: usize = 64;
/// Directory entry size; names follow the entries inside each directory block.
pub const DIRENT_SIZE: usize = 12;
/// Longest file name a directory entry may hold.
pub const NAME_MAX: usize = 255;
/// "No block": empty files, inline-only data, holes in chunk tables.
pub const NULL_ADDR: u32 = 0xFFFF_FFFF;
/// Size of an 8-byte chunk index entry.
pub const CHUNK_INDEX_SIZE: usize = 8;
/// Size of a 4-byte chunk block-map entry.
pub const BLOCK_MAP_ENTRY_SIZE: usize = 4;
/// Smallest block size the kernel accepts (`blkszbits >= 9`).
pub const MIN_BLKSZBITS: u8 = 9;
/// Largest block size we write or read (the kernel additionally limits it to PAGE_SHIFT).
pub const MAX_BLKSZBITS: u8 = 16;
/// Size of the xattr ibody header.
pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
/// Size of an xattr entry header.
pub const XATTR_ENTRY_SIZE: usize = 4;

/// `feature_compat`: superblock checksum present.
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
/// `feature_compat`: extended inodes carry their own mtime (informational).
pub const FEATURE_COMPAT_MTIME: u32 = 0x2;
/// `feature_compat`: xattr bloom filter in every inode.
pub const FEATURE_COMPAT_XATTR_FILTER: u32 = 0x4;

/// `feature_incompat`: LZ4 0-padding (compression).
pub const FEATURE_INCOMPAT_ZERO_PADDING: u32 = 0x1;
/// `feature_incompat`: compression configs / big pclusters.
pub const FEATURE_INCOMPAT_COMPR_CFGS: u32 = 0x2;
/// `feature_incompat`: chunk-based files.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// `feature_incompat`: device table (extra devices).
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;
/// `feature_incompat`: compressed tail packing.
pub const FEATURE_INCOMPAT_ZTAILPACKING: u32 = 0x10;
/// `feature_incompat`: fragments / dedupe.
pub const FEATURE_INCOMPAT_FRAGMENTS: u32 = 0x20;
/// `feature_incompat`: long xattr name prefixes.
pub const FEATURE_INCOMPAT_XATTR_PREFIXES: u32 = 0x40;
/// `feature_incompat`: 48-bit block addressing.
pub const FEATURE_INCOMPAT_48BIT: u32 = 0x80;
/// `feature_incompat`: metabox.
pub const FEATURE_INCOMPAT_METABOX: u32 = 0x100;
/// The incompat features the reader understands. Images with other bits are refused, as the
/// kernel would refuse them.
pub const FEATURE_INCOMPAT_SUPPORTED: u32 =
    FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE;

/// `i_format` bit 0: extended inode.
pub const I_VERSION_EXTENDED: u16 = 0x1;
/// `i_format` bits 1..=3: data layout.
pub const I_DATALAYOUT_SHIFT: u16 = 1;
/// Mask of the data layout bits after shifting.
pub const I_DATALAYOUT_MASK: u16 = 0x7;
/// All `i_format` bits a pre-6.15 kernel accepts. We never write bit 4 (NLINK_1/DOT_OMITTED).
pub const I_FORMAT_ALL: u16 = 0xF;

/// Data layout: contiguous blocks.
pub const LAYOUT_FLAT_PLAIN: u8 = 0;
/// Data layout: compressed, full indexes (not supported here).
pub const LAYOUT_COMPRESSED_FULL: u8 = 1;
/// Data layout: contiguous blocks plus a tail stored right after the inode.
pub const LAYOUT_FLAT_INLINE: u8 = 2;
/// Data layout: compressed, compact indexes (not supported here).
pub const LAYOUT_COMPRESSED_COMPACT: u8 = 3;
/// Data layout: chunk table (holes, extra devices).
pub const LAYOUT_CHUNK_BASED: u8 = 4;

/// Chunk format: low 5 bits are `chunkbits - blkszbits`.
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1F;
/// Chunk format: 8-byte chunk indexes (with device ids) instead of a 4-byte block map.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;
/// Chunk format: 48-bit addressing (not supported here).
pub const CHUNK_FORMAT_48BIT: u16 = 0x40;

/// Directory entry file types.
pub mod file_type {
    /// Unknown.
    pub const UNKNOWN: u8 = 0;
    /// Regular file.
    pub const REG: u8 = 1;
    /// Directory.
    pub const DIR: u8 = 2;
    /// Character device.
    pub const CHR: u8 = 3;
    /// Block device.
    pub const BLK: u8 = 4;
    /// FIFO.
    pub const FIFO: u8 = 5;
    /// Socket.
    pub const SOCK: u8 = 6;
    /// Symbolic link.
    pub const SYMLINK: u8 = 7;
}

/// POSIX file-type bits of `st_mode`.
pub mod mode {
    /// Mask of the type bits.
    pub const S_IFMT: u32 = 0o170000;
    /// Socket.
    pub const S_IFSOCK: u32 = 0o140000;
    /// Symbolic link.
    pub const S_IFLNK: u32 = 0o120000;
    /// Regular file.
    pub const S_IFREG: u32 = 0o100000;
    /// Block device.
    pub const S_IFBLK: u32 = 0o060000;
    /// Directory.
    pub const S_IFDIR: u32 = 0o040000;
    /// Character device.
    pub const S_IFCHR: u32 = 0o020000;
    /// FIFO.
    pub const S_IFIFO: u32 = 0o010000;
}

/// The dirent file type that matches a mode, or `None` for an invalid type.
pub fn file_type_of_mode(m: u32) -> Option<u8> {
    Some(match m & mode::S_IFMT {
        mode::S_IFREG => file_type::REG,
        mode::S_IFDIR => file_type::DIR,
        mode::S_IFCHR => file_type::CHR,
        mode::S_IFBLK => file_type::BLK,
        mode::S_IFIFO => file_type::FIFO,
        mode::S_IFSOCK => file_type::SOCK,
        mode::S_IFLNK => file_type::SYMLINK,
        _ => return None,
    })
}

/// Xattr name index values and their prefixes.
pub mod xattr_index {
    /// `user.`
    pub const USER: u8 = 1;
    /// `system.posix_acl_access` (whole name; suffix empty)
    pub const POSIX_ACL_ACCESS: u8 = 2;
    /// `system.posix_acl_default` (whole name; suffix empty)
    pub const POSIX_ACL_DEFAULT: u8 = 3;
    /// `trusted.`
    pub const TRUSTED: u8 = 4;
    /// `lustre.` (no kernel handler)
    pub const LUSTRE: u8 = 5;
    /// `security.`
    pub const SECURITY: u8 = 6;
}

/// Prefixes in the order we try them when encoding a name. The ACL names must come before any
/// shorter `system.` match (there is none: `system.` itself has no index).
const XATTR_PREFIXES: [(u8, &[u8]); 5] = [
    (xattr_index::USER, b"user."),
    (xattr_index::POSIX_ACL_ACCESS, b"system.posix_acl_access"),
    (xattr_index::POSIX_ACL_DEFAULT, b"system.posix_acl_default"),
    (xattr_index::TRUSTED, b"trusted."),
    (xattr_index::SECURITY, b"security."),
];

/// Split a full xattr name into (index, suffix). `None` when EROFS has no short prefix for it
/// (for example `system.nfs4_acl`): such names cannot be stored without long-prefix support.
pub fn split_xattr_name(name: &[u8]) -> Option<(u8, &[u8])> {
    for (index, prefix) in XATTR_PREFIXES {
        if let Some(suffix) = name.strip_prefix(prefix) {
            let whole = matches!(
                index,
                xattr_index::POSIX_ACL_ACCESS | xattr_index::POSIX_ACL_DEFAULT
            );
            if whole && !suffix.is_empty() {
                continue;
            }
            return Some((index, suffix));
        }
    }
    None
}

/// The prefix of a short name index, or `None` for an unknown index.
pub fn xattr_prefix(index: u8) -> Option<&'static [u8]> {
    match index {
        xattr_index::USER => Some(b"user."),
        xattr_index::POSIX_ACL_ACCESS => Some(b"system.posix_acl_access"),
        xattr_index::POSIX_ACL_DEFAULT => Some(b"system.posix_acl_default"),
        xattr_index::TRUSTED => Some(b"trusted."),
        xattr_index::LUSTRE => Some(b"lustre."),
        xattr_index::SECURITY => Some(b"security."),
        _ => None,
    }
}

/// Encode a device number the way Linux `new_encode_dev` does.
pub fn encode_rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Decode a device number encoded by [`encode_rdev`].
pub fn decode_rdev(rdev: u32) -> (u32, u32) {
    let major = (rdev & 0xfff00) >> 8;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    (major, minor)
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// The base (128-byte) superblock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Superblock {
    /// Must be [`MAGIC`].
    pub magic: u32,
    /// CRC-32C of the superblock block (see [`superblock_checksum`]).
    pub checksum: u32,
    /// Compatible feature bits.
    pub feature_compat: u32,
    /// log2 of the block size.
    pub blkszbits: u8,
    /// Number of 16-byte extension slots (we write 0).
    pub sb_extslots: u8,
    /// nid of the root directory.
    pub root_nid: u16,
    /// Number of inodes (informational).
    pub inos: u64,
    /// Base mtime of compact inodes.
    pub epoch: u64,
    /// Nanoseconds of every compact inode's mtime.
    pub fixed_nsec: u32,
    /// Size of the primary device in blocks.
    pub blocks: u32,
    /// Block of nid 0.
    pub meta_blkaddr: u32,
    /// Block where the shared xattr area starts.
    pub xattr_blkaddr: u32,
    /// Filesystem UUID.
    pub uuid: [u8; 16],
    /// Volume label, NUL-terminated.
    pub volume_name: [u8; 16],
    /// Incompatible feature bits.
    pub feature_incompat: u32,
    /// Compression algorithms or LZ4 distance (0 here).
    pub u1: u16,
    /// Number of device-table slots.
    pub extra_devices: u16,
    /// Device table byte offset divided by 128.
    pub devt_slotoff: u16,
    /// Must be 0.
    pub dirblkbits: u8,
    /// Long xattr prefix count (0 here).
    pub xattr_prefix_count: u8,
    /// Long xattr prefix table start (0 here).
    pub xattr_prefix_start: u32,
    /// Packed inode nid (0 here).
    pub packed_nid: u64,
    /// Must be 0 for the xattr filter to be honoured.
    pub xattr_filter_reserved: u8,
    /// mkfs time relative to `epoch`, seconds (informational).
    pub build_time: u32,
}

impl Superblock {
    /// Serialize into exactly [`SUPERBLOCK_SIZE`] bytes.
    pub fn encode(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut b = [0u8; SUPERBLOCK_SIZE];
        put32(&mut b, 0, self.magic);
        put32(&mut b, 4, self.checksum);
        put32(&mut b, 8, self.feature_compat);
        b[12] = self.blkszbits;
        b[13] = self.sb_extslots;
        put16(&mut b, 14, self.root_nid);
        put64(&mut b, 16, self.inos);
        put64(&mut b, 24, self.epoch);
        put32(&mut b, 32, self.fixed_nsec);
        put32(&mut b, 36, self.blocks);
        put32(&mut b, 40, self.meta_blkaddr);
        put32(&mut b, 44, self.xattr_blkaddr);
        b[48..64].copy_from_slice(&self.uuid);
        b[64..80].copy_from_slice(&self.volume_name);
        put32(&mut b, 80, self.feature_incompat);
        put16(&mut b, 84, self.u1);
        put16(&mut b, 86, self.extra_devices);
        put16(&mut b, 88, self.devt_slotoff);
        b[90] = self.dirblkbits;
        b[91] = self.xattr_prefix_count;
        put32(&mut b, 92, self.xattr_prefix_start);
        put64(&mut b, 96, self.packed_nid);
        b[104] = self.xattr_filter_reserved;
        put32(&mut b, 108, self.build_time);
        b
    }

    /// Parse the base superblock from exactly [`SUPERBLOCK_SIZE`] bytes. No validation.
    pub fn decode(b: &[u8; SUPERBLOCK_SIZE]) -> Self {
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[48..64]);
        let mut volume_name = [0u8; 16];
        volume_name.copy_from_slice(&b[64..80]);
        Superblock {
            magic: le32(b, 0),
            checksum: le32(b, 4),
            feature_compat: le32(b, 8),
            blkszbits: b[12],
            sb_extslots: b[13],
            root_nid: le16(b, 14),
            inos: le64(b, 16),
            epoch: le64(b, 24),
            fixed_nsec: le32(b, 32),
            blocks: le32(b, 36),
            meta_blkaddr: le32(b, 40),
            xattr_blkaddr: le32(b, 44),
            uuid,
            volume_name,
            feature_incompat: le32(b, 80),
            u1: le16(b, 84),
            extra_devices: le16(b, 86),
            devt_slotoff: le16(b, 88),
            dirblkbits: b[90],
            xattr_prefix_count: b[91],
            xattr_prefix_start: le32(b, 92),
            packed_nid: le64(b, 96),
            xattr_filter_reserved: b[104],
            build_time: le32(b, 108),
        }
    }
}

/// Number of bytes after [`SUPER_OFFSET`] covered by the superblock checksum.
pub fn checksum_len(block_size: u32) -> usize {
    if block_size > SUPER_OFFSET as u32 {
        block_size as usize - SUPER_OFFSET as usize
    } else {
        block_size as usize
    }
}

/// The superblock checksum: CRC-32C seeded with all ones and without the final inversion, over
/// [`checksum_len`] bytes from [`SUPER_OFFSET`] with the checksum field zeroed. `covered` is
/// those bytes as they stand; the checksum field inside them is ignored.
pub fn superblock_checksum(covered: &[u8]) -> u32 {
    let mut crc = crc32c::crc32c(&covered[..4]);
    crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc = crc32c::crc32c_append(crc, &covered[8..]);
    !crc
}

/// One device-table slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    /// Blob tag (path or digest); only used by fscache/non-flat lookups.
    pub tag: [u8; 64],
    /// Device size in blocks.
    pub blocks: u32,
    /// First block of this device in the unified address space.
    pub uniaddr: u32,
}

impl DeviceSlot {
    /// Serialize into [`DEVICE_SLOT_SIZE`] bytes.
    pub fn encode(&self) -> [u8; DEVICE_SLOT_SIZE] {
        let mut b = [0u8; DEVICE_SLOT_SIZE];
        b[..64].copy_from_slice(&self.tag);
        put32(&mut b, 64, self.blocks);
        put32(&mut b, 68, self.uniaddr);
        b
    }
    /// Parse a slot.
    pub fn decode(b: &[u8; DEVICE_SLOT_SIZE]) -> Self {
        let mut tag = [0u8; 64];
        tag.copy_from_slice(&b[..64]);
        DeviceSlot {
            tag,
            blocks: le32(b, 64),
            uniaddr: le32(b, 68),
        }
    }
}

/// An inode in either on-disk form, with fields widened to the extended form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawInode {
    /// `i_format`.
    pub format: u16,
    /// `i_xattr_icount`.
    pub xattr_icount: u16,
    /// `i_mode`.
    pub mode: u16,
    /// Link count.
    pub nlink: u32,
    /// Size in bytes.
    pub size: u64,
    /// `i_u`: start block, rdev or chunk format.
    pub i_u: u32,
    /// Inode serial number (32-bit stat only).
    pub ino: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// mtime seconds (extended inodes; compact inodes use the superblock epoch).
    pub mtime: u64,
    /// mtime nanoseconds (extended inodes).
    pub mtime_nsec: u32,
    /// Compact: `i_mtime` relative to the epoch (6.15+ semantics); we write 0.
    pub compact_mtime: u32,
}

impl RawInode {
    /// Whether this is an extended (64-byte) inode.
    pub fn is_extended(&self) -> bool {
        self.format & I_VERSION_EXTENDED != 0
    }
    /// The data layout field.
    pub fn layout(&self) -> u8 {
        ((self.format >> I_DATALAYOUT_SHIFT) & I_DATALAYOUT_MASK) as u8
    }
    /// On-disk size of the inode structure.
    pub fn inode_size(&self) -> usize {
        if self.is_extended() {
            EXTENDED_INODE_SIZE
        } else {
            COMPACT_INODE_SIZE
        }
    }
    /// Size of the inline xattr body that follows the inode.
    pub fn xattr_isize(&self) -> usize {
        xattr_ibody_size(self.xattr_icount)
    }

    /// Serialize. The caller has chosen the version in `format` and checked that the fields fit.
    pub fn encode(&self, out: &mut [u8]) {
        put16(out, 0, self.format);
        put16(out, 2, self.xattr_icount);
        put16(out, 4, self.mode);
        if self.is_extended() {
            put16(out, 6, 0);
            put64(out, 8, self.size);
            put32(out, 16, self.i_u);
            put32(out, 20, self.ino);
            put32(out, 24, self.uid);
            put32(out, 28, self.gid);
            put64(out, 32, self.mtime);
            put32(out, 40, self.mtime_nsec);
            put32(out, 44, self.nlink);
            out[48..64].fill(0);
        } else {
            put16(out, 6, self.nlink as u16);
            put32(out, 8, self.size as u32);
            put32(out, 12, self.compact_mtime);
            put32(out, 16, self.i_u);
            put32(out, 20, self.ino);
            put16(out, 24, self.uid as u16);
            put16(out, 26, self.gid as u16);
            out[28..32].fill(0);
        }
    }

    /// Parse the first 32 bytes; if the inode is extended, `rest` must hold bytes 32..64.
    pub fn decode_compact_part(b: &[u8; COMPACT_INODE_SIZE]) -> Self {
        RawInode {
            format: le16(b, 0),
            xattr_icount: le16(b, 2),
            mode: le16(b, 4),
            nlink: le16(b, 6) as u32,
            size: le32(b, 8) as u64,
            compact_mtime: le32(b, 12),
            i_u: le32(b, 16),
            ino: le32(b, 20),
            uid: le16(b, 24) as u32,
            gid: le16(b, 26) as u32,
            mtime: 0,
            mtime_nsec: 0,
        }
    }

    /// Parse an extended inode from 64 bytes.
    pub fn decode_extended(b: &[u8; EXTENDED_INODE_SIZE]) -> Self {
        RawInode {
            format: le16(b, 0),
            xattr_icount: le16(b, 2),
            mode: le16(b, 4),
            size: le64(b, 8),
            i_u: le32(b, 16),
            ino: le32(b, 20),
            uid: le32(b, 24),
            gid: le32(b, 28),
            mtime: le64(b, 32),
            mtime_nsec: le32(b, 40),
            nlink: le32(b, 44),
            compact_mtime: 0,
        }
    }
}

/// Size of the inline xattr body for an `i_xattr_icount`.
pub fn xattr_ibody_size(icount: u16) -> usize {
    if icount == 0 {
        0
    } else {
        XATTR_IBODY_HEADER_SIZE + 4 * (icount as usize - 1)
    }
}

/// The `i_xattr_icount` that describes an xattr body of `size` bytes (a multiple of 4, at least
/// the header), or `None` if it does not fit the 16-bit field.
pub fn xattr_icount_for(size: usize) -> Option<u16> {
    if size == 0 {
        return Some(0);
    }
    debug_assert!(size >= XATTR_IBODY_HEADER_SIZE && size.is_multiple_of(4));
    u16::try_from((size - XATTR_IBODY_HEADER_SIZE) / 4 + 1).ok()
}

/// One directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dirent {
    /// Target inode.
    pub nid: u64,
    /// Offset of the name within the directory block.
    pub nameoff: u16,
    /// One of [`file_type`].
    pub file_type: u8,
}

impl Dirent {
    /// Serialize.
    pub fn encode(&self, out: &mut [u8]) {
        put64(out, 0, self.nid);
        put16(out, 8, self.nameoff);
        out[10] = self.file_type;
        out[11] = 0;
    }
    /// Parse 12 bytes.
    pub fn decode(b: &[u8]) -> Self {
        Dirent {
            nid: le64(b, 0),
            nameoff: le16(b, 8),
            file_type: b[10],
        }
    }
}

/// One 8-byte chunk index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkIndex {
    /// 0 = primary device, N = device-table slot N.
    pub device_id: u16,
    /// Start block within that device, or [`NULL_ADDR`] for a hole.
    pub blkaddr: u32,
}

impl ChunkIndex {
    /// A hole.
    pub const HOLE: ChunkIndex = ChunkIndex {
        device_id: 0,
        blkaddr: NULL_ADDR,
    };
    /// Serialize.
    pub fn encode(&self, out: &mut [u8]) {
        put16(out, 0, 0);
        put16(out, 2, self.device_id);
        put32(out, 4, self.blkaddr);
    }
    /// Parse 8 bytes. The 48-bit high half is returned separately so the reader can refuse it.
    pub fn decode(b: &[u8]) -> (Self, u16) {
        (
            ChunkIndex {
                device_id: le16(b, 2),
                blkaddr: le32(b, 4),
            },
            le16(b, 0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdev_round_trip() {
        for (ma, mi) in [(0, 0), (1, 3), (8, 1), (259, 65536), (4095, 0xfffff)] {
            assert_eq!(decode_rdev(encode_rdev(ma, mi)), (ma, mi));
        }
        assert_eq!(encode_rdev(1, 3), 0x103);
    }

    #[test]
    fn xattr_names_split() {
        assert_eq!(split_xattr_name(b"user.foo"), Some((1, &b"foo"[..])));
        assert_eq!(
            split_xattr_name(b"trusted.overlay.opaque"),
            Some((4, &b"overlay.opaque"[..]))
        );
        assert_eq!(
            split_xattr_name(b"system.posix_acl_access"),
            Some((2, &b""[..]))
        );
        assert_eq!(split_xattr_name(b"system.posix_acl_accessX"), None);
        assert_eq!(split_xattr_name(b"system.nfs4_acl"), None);
        assert_eq!(
            split_xattr_name(b"security.capability"),
            Some((6, &b"capability"[..]))
        );
    }

    #[test]
    fn superblock_round_trip() {
        let sb = Superblock {
            magic: MAGIC,
            blkszbits: 12,
            root_nid: 36,
            inos: 7,
            epoch: 1_700_000_000,
            fixed_nsec: 5,
            blocks: 99,
            meta_blkaddr: 3,
            uuid: [7; 16],
            feature_incompat: FEATURE_INCOMPAT_DEVICE_TABLE,
            extra_devices: 1,
            devt_slotoff: 9,
            ..Default::default()
        };
        assert_eq!(Superblock::decode(&sb.encode()), sb);
    }

    #[test]
    fn icount_sizes() {
        assert_eq!(xattr_ibody_size(0), 0);
        assert_eq!(xattr_ibody_size(1), 12);
        assert_eq!(xattr_icount_for(12), Some(1));
        assert_eq!(xattr_icount_for(20), Some(3));
        assert_eq!(xattr_ibody_size(xattr_icount_for(400).unwrap()), 400);
    }
}
