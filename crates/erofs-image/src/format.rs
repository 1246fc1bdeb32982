//! On-disk EROFS structures and constants.
//!
//! Everything here is little-endian and position-independent. Each on-disk structure is laid
//! out once, as a `#[repr(C)]` struct of little-endian fields in a private `disk` module
//! (`zerocopy`, sizes checked at compile time); the public types are their native views, with
//! encoders writing into a caller's buffer and decoders taking fixed-size arrays or returning
//! `None` for short slices. Enum-like fields stay raw integers and are interpreted by the
//! reader, so bytes from an image are never trusted to be a valid enum.
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

/// The on-disk layouts, each defined once: little-endian fields at their offsets, read and
/// written without offsets spelled out (`zerocopy`). The public structures above them are
/// the widened, native-endian views the builder and the reader work with.
mod disk {
    use zerocopy::little_endian::{U16, U32, U64};
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

    /// `struct erofs_super_block` (the base 128 bytes).
    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Default)]
    #[repr(C)]
    pub(super) struct Superblock {
        pub magic: U32,
        pub checksum: U32,
        pub feature_compat: U32,
        pub blkszbits: u8,
        pub sb_extslots: u8,
        pub root_nid: U16,
        pub inos: U64,
        pub epoch: U64,
        pub fixed_nsec: U32,
        pub blocks: U32,
        pub meta_blkaddr: U32,
        pub xattr_blkaddr: U32,
        pub uuid: [u8; 16],
        pub volume_name: [u8; 16],
        pub feature_incompat: U32,
        pub u1: U16,
        pub extra_devices: U16,
        pub devt_slotoff: U16,
        pub dirblkbits: u8,
        pub xattr_prefix_count: u8,
        pub xattr_prefix_start: U32,
        pub packed_nid: U64,
        pub xattr_filter_reserved: u8,
        pub reserved: [u8; 3],
        pub build_time: U32,
        pub reserved2: [u8; 16],
    }

    /// `struct erofs_deviceslot`.
    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
    #[repr(C)]
    pub(super) struct DeviceSlot {
        pub tag: [u8; 64],
        pub blocks: U32,
        pub uniaddr: U32,
        pub reserved: [u8; 56],
    }

    /// `struct erofs_inode_compact`.
    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Default)]
    #[repr(C)]
    pub(super) struct CompactInode {
        pub format: U16,
        pub xattr_icount: U16,
        pub mode: U16,
        pub nlink: U16,
        pub size: U32,
        pub mtime: U32,
        pub i_u: U32,
        pub ino: U32,
        pub uid: U16,
        pub gid: U16,
        pub reserved: [u8; 4],
    }

    /// `struct erofs_inode_extended`.
    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Default)]
    #[repr(C)]
    pub(super) struct ExtendedInode {
        pub format: U16,
        pub xattr_icount: U16,
        pub mode: U16,
        pub reserved: U16,
        pub size: U64,
        pub i_u: U32,
        pub ino: U32,
        pub uid: U32,
        pub gid: U32,
        pub mtime: U64,
        pub mtime_nsec: U32,
        pub nlink: U32,
        pub reserved2: [u8; 16],
    }

    /// `struct erofs_dirent`.
    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
    #[repr(C)]
    pub(super) struct Dirent {
        pub nid: U64,
        pub nameoff: U16,
        pub file_type: u8,
        pub reserved: u8,
    }

    /// `struct erofs_inode_chunk_index`.
    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
    #[repr(C)]
    pub(super) struct ChunkIndex {
        pub startblk_hi: U16,
        pub device_id: U16,
        pub startblk_lo: U32,
    }

    /// `struct erofs_xattr_ibody_header`.
    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
    #[repr(C)]
    pub(super) struct XattrIbodyHeader {
        pub name_filter: U32,
        pub shared_count: u8,
        pub reserved: [u8; 7],
    }

    /// `struct erofs_xattr_entry` (the name and the value follow it).
    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
    #[repr(C)]
    pub(super) struct XattrEntry {
        pub name_len: u8,
        pub name_index: u8,
        pub value_size: U16,
    }

    const _: () = assert!(size_of::<Superblock>() == super::SUPERBLOCK_SIZE);
    const _: () = assert!(size_of::<DeviceSlot>() == super::DEVICE_SLOT_SIZE);
    const _: () = assert!(size_of::<CompactInode>() == super::COMPACT_INODE_SIZE);
    const _: () = assert!(size_of::<ExtendedInode>() == super::EXTENDED_INODE_SIZE);
    const _: () = assert!(size_of::<Dirent>() == super::DIRENT_SIZE);
    const _: () = assert!(size_of::<ChunkIndex>() == super::CHUNK_INDEX_SIZE);
    const _: () = assert!(size_of::<XattrIbodyHeader>() == super::XATTR_IBODY_HEADER_SIZE);
    const _: () = assert!(size_of::<XattrEntry>() == super::XATTR_ENTRY_SIZE);
    // Alignment 1 everywhere: structures are read from any offset of a block.
    const _: () = assert!(align_of::<Superblock>() == 1 && align_of::<ExtendedInode>() == 1);
}

use zerocopy::{FromBytes, IntoBytes};

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
        let d = disk::Superblock {
            magic: self.magic.into(),
            checksum: self.checksum.into(),
            feature_compat: self.feature_compat.into(),
            blkszbits: self.blkszbits,
            sb_extslots: self.sb_extslots,
            root_nid: self.root_nid.into(),
            inos: self.inos.into(),
            epoch: self.epoch.into(),
            fixed_nsec: self.fixed_nsec.into(),
            blocks: self.blocks.into(),
            meta_blkaddr: self.meta_blkaddr.into(),
            xattr_blkaddr: self.xattr_blkaddr.into(),
            uuid: self.uuid,
            volume_name: self.volume_name,
            feature_incompat: self.feature_incompat.into(),
            u1: self.u1.into(),
            extra_devices: self.extra_devices.into(),
            devt_slotoff: self.devt_slotoff.into(),
            dirblkbits: self.dirblkbits,
            xattr_prefix_count: self.xattr_prefix_count,
            xattr_prefix_start: self.xattr_prefix_start.into(),
            packed_nid: self.packed_nid.into(),
            xattr_filter_reserved: self.xattr_filter_reserved,
            build_time: self.build_time.into(),
            ..Default::default()
        };
        zerocopy::transmute!(d)
    }

    /// Parse the base superblock from exactly [`SUPERBLOCK_SIZE`] bytes. No validation.
    pub fn decode(b: &[u8; SUPERBLOCK_SIZE]) -> Self {
        let d: disk::Superblock = zerocopy::transmute!(*b);
        Superblock {
            magic: d.magic.get(),
            checksum: d.checksum.get(),
            feature_compat: d.feature_compat.get(),
            blkszbits: d.blkszbits,
            sb_extslots: d.sb_extslots,
            root_nid: d.root_nid.get(),
            inos: d.inos.get(),
            epoch: d.epoch.get(),
            fixed_nsec: d.fixed_nsec.get(),
            blocks: d.blocks.get(),
            meta_blkaddr: d.meta_blkaddr.get(),
            xattr_blkaddr: d.xattr_blkaddr.get(),
            uuid: d.uuid,
            volume_name: d.volume_name,
            feature_incompat: d.feature_incompat.get(),
            u1: d.u1.get(),
            extra_devices: d.extra_devices.get(),
            devt_slotoff: d.devt_slotoff.get(),
            dirblkbits: d.dirblkbits,
            xattr_prefix_count: d.xattr_prefix_count,
            xattr_prefix_start: d.xattr_prefix_start.get(),
            packed_nid: d.packed_nid.get(),
            xattr_filter_reserved: d.xattr_filter_reserved,
            build_time: d.build_time.get(),
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
        zerocopy::transmute!(disk::DeviceSlot {
            tag: self.tag,
            blocks: self.blocks.into(),
            uniaddr: self.uniaddr.into(),
            reserved: [0; 56],
        })
    }
    /// Parse a slot.
    pub fn decode(b: &[u8; DEVICE_SLOT_SIZE]) -> Self {
        let d: disk::DeviceSlot = zerocopy::transmute!(*b);
        DeviceSlot {
            tag: d.tag,
            blocks: d.blocks.get(),
            uniaddr: d.uniaddr.get(),
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

    /// Serialize into the first [`inode_size`](Self::inode_size) bytes of `out`. The caller
    /// has chosen the version in `format` and checked that the fields fit.
    pub fn encode(&self, out: &mut [u8]) {
        if self.is_extended() {
            let d = disk::ExtendedInode {
                format: self.format.into(),
                xattr_icount: self.xattr_icount.into(),
                mode: self.mode.into(),
                size: self.size.into(),
                i_u: self.i_u.into(),
                ino: self.ino.into(),
                uid: self.uid.into(),
                gid: self.gid.into(),
                mtime: self.mtime.into(),
                mtime_nsec: self.mtime_nsec.into(),
                nlink: self.nlink.into(),
                ..Default::default()
            };
            out[..EXTENDED_INODE_SIZE].copy_from_slice(d.as_bytes());
        } else {
            let d = disk::CompactInode {
                format: self.format.into(),
                xattr_icount: self.xattr_icount.into(),
                mode: self.mode.into(),
                nlink: (self.nlink as u16).into(),
                size: (self.size as u32).into(),
                mtime: self.compact_mtime.into(),
                i_u: self.i_u.into(),
                ino: self.ino.into(),
                uid: (self.uid as u16).into(),
                gid: (self.gid as u16).into(),
                ..Default::default()
            };
            out[..COMPACT_INODE_SIZE].copy_from_slice(d.as_bytes());
        }
    }

    /// Parse the first 32 bytes; if the inode is extended, `rest` must hold bytes 32..64.
    pub fn decode_compact_part(b: &[u8; COMPACT_INODE_SIZE]) -> Self {
        let d: disk::CompactInode = zerocopy::transmute!(*b);
        RawInode {
            format: d.format.get(),
            xattr_icount: d.xattr_icount.get(),
            mode: d.mode.get(),
            nlink: d.nlink.get() as u32,
            size: d.size.get() as u64,
            compact_mtime: d.mtime.get(),
            i_u: d.i_u.get(),
            ino: d.ino.get(),
            uid: d.uid.get() as u32,
            gid: d.gid.get() as u32,
            mtime: 0,
            mtime_nsec: 0,
        }
    }

    /// Parse an extended inode from 64 bytes.
    pub fn decode_extended(b: &[u8; EXTENDED_INODE_SIZE]) -> Self {
        let d: disk::ExtendedInode = zerocopy::transmute!(*b);
        RawInode {
            format: d.format.get(),
            xattr_icount: d.xattr_icount.get(),
            mode: d.mode.get(),
            size: d.size.get(),
            i_u: d.i_u.get(),
            ino: d.ino.get(),
            uid: d.uid.get(),
            gid: d.gid.get(),
            mtime: d.mtime.get(),
            mtime_nsec: d.mtime_nsec.get(),
            nlink: d.nlink.get(),
            compact_mtime: 0,
        }
    }
}

/// The header of an inode's inline xattr body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XattrIbodyHeader {
    /// Bloom filter of the names (0 here: the filter feature is not set).
    pub name_filter: u32,
    /// Number of 4-byte shared xattr ids after the header.
    pub shared_count: u8,
}

impl XattrIbodyHeader {
    /// Serialize into [`XATTR_IBODY_HEADER_SIZE`] bytes.
    pub fn encode(&self) -> [u8; XATTR_IBODY_HEADER_SIZE] {
        zerocopy::transmute!(disk::XattrIbodyHeader {
            name_filter: self.name_filter.into(),
            shared_count: self.shared_count,
            reserved: [0; 7],
        })
    }
    /// Parse the header at the start of `b`; `None` if `b` is too short.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let (d, _) = disk::XattrIbodyHeader::ref_from_prefix(b).ok()?;
        Some(XattrIbodyHeader {
            name_filter: d.name_filter.get(),
            shared_count: d.shared_count,
        })
    }
}

/// The header of one xattr entry; the name suffix and the value follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XattrEntry {
    /// Length of the name suffix.
    pub name_len: u8,
    /// One of [`xattr_index`] (raw: an image may hold any value).
    pub name_index: u8,
    /// Length of the value.
    pub value_size: u16,
}

impl XattrEntry {
    /// Serialize into [`XATTR_ENTRY_SIZE`] bytes.
    pub fn encode(&self) -> [u8; XATTR_ENTRY_SIZE] {
        zerocopy::transmute!(disk::XattrEntry {
            name_len: self.name_len,
            name_index: self.name_index,
            value_size: self.value_size.into(),
        })
    }
    /// Parse the header at the start of `b`; `None` if `b` is too short.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let (d, _) = disk::XattrEntry::ref_from_prefix(b).ok()?;
        Some(XattrEntry {
            name_len: d.name_len,
            name_index: d.name_index,
            value_size: d.value_size.get(),
        })
    }
}

/// Seed of the xattr name filter's hash (plus the name index), as the kernel defines it.
pub const XATTR_FILTER_SEED: u32 = 0x25BB_E08F;
/// Bits of the xattr name filter.
pub const XATTR_FILTER_BITS: u32 = 32;

/// The xattr name-filter bit of a name: `xxh32(suffix, SEED + index) % 32`. A set bit in an
/// inode's `h_name_filter` means "no xattr hashing here", and the kernel's getxattr then
/// answers ENODATA without looking.
pub fn xattr_filter_bit(index: u8, suffix: &[u8]) -> u32 {
    xxh32(suffix, XATTR_FILTER_SEED.wrapping_add(index as u32)) & (XATTR_FILTER_BITS - 1)
}

/// XXH32 (the xxHash 32-bit algorithm), which the xattr name filter uses.
pub fn xxh32(data: &[u8], seed: u32) -> u32 {
    const P1: u32 = 0x9E37_79B1;
    const P2: u32 = 0x85EB_CA77;
    const P3: u32 = 0xC2B2_AE3D;
    const P4: u32 = 0x27D4_EB2F;
    const P5: u32 = 0x1656_67B1;
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let round = |acc: u32, w: u32| {
        acc.wrapping_add(w.wrapping_mul(P2))
            .rotate_left(13)
            .wrapping_mul(P1)
    };
    let mut rest = data;
    let mut h = if data.len() >= 16 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        while rest.len() >= 16 {
            for (i, lane) in v.iter_mut().enumerate() {
                *lane = round(*lane, word(&rest[i * 4..]));
            }
            rest = &rest[16..];
        }
        v[0].rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18))
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(data.len() as u32);
    while rest.len() >= 4 {
        h = h
            .wrapping_add(word(rest).wrapping_mul(P3))
            .rotate_left(17)
            .wrapping_mul(P4);
        rest = &rest[4..];
    }
    for &b in rest {
        h = h
            .wrapping_add((b as u32).wrapping_mul(P5))
            .rotate_left(11)
            .wrapping_mul(P1);
    }
    h ^= h >> 15;
    h = h.wrapping_mul(P2);
    h ^= h >> 13;
    h = h.wrapping_mul(P3);
    h ^ (h >> 16)
}

/// Read the 4-byte little-endian shared xattr id (or block-map entry) at the start of `b`.
pub fn decode_u32(b: &[u8]) -> Option<u32> {
    let (v, _) = zerocopy::little_endian::U32::read_from_prefix(b).ok()?;
    Some(v.get())
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
    /// Serialize into the first [`DIRENT_SIZE`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) {
        let d = disk::Dirent {
            nid: self.nid.into(),
            nameoff: self.nameoff.into(),
            file_type: self.file_type,
            reserved: 0,
        };
        out[..DIRENT_SIZE].copy_from_slice(d.as_bytes());
    }
    /// Parse the entry at the start of `b`; `None` if `b` is shorter than [`DIRENT_SIZE`].
    pub fn decode(b: &[u8]) -> Option<Self> {
        let (d, _) = disk::Dirent::ref_from_prefix(b).ok()?;
        Some(Dirent {
            nid: d.nid.get(),
            nameoff: d.nameoff.get(),
            file_type: d.file_type,
        })
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
    /// Serialize into the first [`CHUNK_INDEX_SIZE`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) {
        let d = disk::ChunkIndex {
            startblk_hi: 0.into(),
            device_id: self.device_id.into(),
            startblk_lo: self.blkaddr.into(),
        };
        out[..CHUNK_INDEX_SIZE].copy_from_slice(d.as_bytes());
    }
    /// Parse 8 bytes. The 48-bit high half is returned separately so the reader can refuse it.
    pub fn decode(b: &[u8; CHUNK_INDEX_SIZE]) -> (Self, u16) {
        let d: disk::ChunkIndex = zerocopy::transmute!(*b);
        (
            ChunkIndex {
                device_id: d.device_id.get(),
                blkaddr: d.startblk_lo.get(),
            },
            d.startblk_hi.get(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxh32_known_values() {
        // The reference implementation's published values.
        assert_eq!(xxh32(b"", 0), 0x02CC_5D05);
        assert_eq!(xxh32(b"a", 0), 0x550D_7456);
        assert_eq!(xxh32(b"abc", 0), 0x32D1_53FF);
        assert_eq!(
            xxh32(b"Nobody inspects the spammish repetition", 0),
            0xE229_3B2F
        );
    }

    #[test]
    fn xattr_filter_bits_match_the_kernel() {
        // The bit table of the kernel patch that introduced the filter, and the ACL bits the
        // kernel tests (BIT(30) access, BIT(21) default).
        use xattr_index::*;
        assert_eq!(xattr_filter_bit(SECURITY, b"ima"), 0);
        assert_eq!(xattr_filter_bit(TRUSTED, b"overlay.nlink"), 2);
        assert_eq!(xattr_filter_bit(USER, b"overlay.nlink"), 4);
        assert_eq!(xattr_filter_bit(SECURITY, b"apparmor"), 8);
        assert_eq!(xattr_filter_bit(SECURITY, b"selinux"), 11);
        assert_eq!(xattr_filter_bit(POSIX_ACL_ACCESS, b""), 30);
        assert_eq!(xattr_filter_bit(POSIX_ACL_DEFAULT, b""), 21);
        // user.foo + security.capability, as mkfs.erofs writes it.
        let bits = (1 << xattr_filter_bit(USER, b"foo"))
            | (1 << xattr_filter_bit(SECURITY, b"capability"));
        assert_eq!(!bits, 0xdfff_efffu32);
    }

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

    /// Field offsets as the kernel's `erofs_fs.h` has them, checked on encoded bytes.
    #[test]
    fn fields_sit_at_the_kernels_offsets() {
        let sb = Superblock {
            magic: MAGIC,
            blocks: 0x0102_0304,
            devt_slotoff: 9,
            build_time: 0x0a0b_0c0d,
            ..Default::default()
        }
        .encode();
        assert_eq!(&sb[0..4], &MAGIC.to_le_bytes());
        assert_eq!(&sb[36..40], &[4, 3, 2, 1]);
        assert_eq!(&sb[88..90], &[9, 0]);
        assert_eq!(&sb[108..112], &[0x0d, 0x0c, 0x0b, 0x0a]);
        let mut ino = [0u8; EXTENDED_INODE_SIZE];
        RawInode {
            format: I_VERSION_EXTENDED,
            nlink: 7,
            mtime: 0x55,
            ..Default::default()
        }
        .encode(&mut ino);
        assert_eq!((ino[0], ino[32], ino[44]), (1, 0x55, 7));
        let mut d = [0u8; DIRENT_SIZE];
        Dirent {
            nid: 3,
            nameoff: 24,
            file_type: file_type::DIR,
        }
        .encode(&mut d);
        assert_eq!(d, [3, 0, 0, 0, 0, 0, 0, 0, 24, 0, 2, 0]);
        let mut c = [0u8; CHUNK_INDEX_SIZE];
        ChunkIndex {
            device_id: 1,
            blkaddr: 8,
        }
        .encode(&mut c);
        assert_eq!(c, [0, 0, 1, 0, 8, 0, 0, 0]);
        let slot = DeviceSlot {
            tag: [0; 64],
            blocks: 5,
            uniaddr: 6,
        }
        .encode();
        assert_eq!((slot[64], slot[68]), (5, 6));
    }

    #[test]
    fn inodes_and_entries_round_trip() {
        let compact = RawInode {
            format: (LAYOUT_FLAT_INLINE as u16) << I_DATALAYOUT_SHIFT,
            xattr_icount: 3,
            mode: 0o100644,
            nlink: 2,
            size: 4097,
            i_u: 9,
            ino: 11,
            uid: 1000,
            gid: 100,
            compact_mtime: 5,
            ..Default::default()
        };
        let mut b = [0u8; COMPACT_INODE_SIZE];
        compact.encode(&mut b);
        assert_eq!(RawInode::decode_compact_part(&b), compact);
        let ext = RawInode {
            format: I_VERSION_EXTENDED,
            mode: 0o040755,
            nlink: 70_000,
            size: 1 << 40,
            uid: 1 << 20,
            gid: 1 << 21,
            mtime: 1_700_000_000,
            mtime_nsec: 999,
            ..Default::default()
        };
        let mut b = [0u8; EXTENDED_INODE_SIZE];
        ext.encode(&mut b);
        assert_eq!(RawInode::decode_extended(&b), ext);
        let e = XattrEntry {
            name_len: 3,
            name_index: xattr_index::USER,
            value_size: 300,
        };
        assert_eq!(XattrEntry::decode(&e.encode()), Some(e));
        let h = XattrIbodyHeader {
            name_filter: 0,
            shared_count: 2,
        };
        assert_eq!(XattrIbodyHeader::decode(&h.encode()), Some(h));
        let (c, hi) = ChunkIndex::decode(&[1, 0, 2, 0, 3, 0, 0, 0]);
        assert_eq!((c.device_id, c.blkaddr, hi), (2, 3, 1));
    }

    /// Short input is an answer, not a panic.
    #[test]
    fn short_bytes_decode_to_none() {
        assert_eq!(Dirent::decode(&[0; DIRENT_SIZE - 1]), None);
        assert_eq!(XattrEntry::decode(&[0; 3]), None);
        assert_eq!(XattrIbodyHeader::decode(&[0; 11]), None);
        assert_eq!(decode_u32(&[0; 3]), None);
        assert_eq!(decode_u32(&[1, 0, 0, 0, 9]), Some(1));
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
