//! What a walk reports of an inode.

use rustix::fs::{Statx, StatxAttributes};

/// The type of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A character device (overlayfs whiteouts are 0:0 ones).
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A FIFO.
    Fifo,
    /// A socket.
    Socket,
    /// Anything else the kernel may report.
    Unknown,
}

/// An inode's metadata, from `statx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Type and permission bits (`st_mode`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Hard links.
    pub nlink: u64,
    /// Size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// The device holding it (`makedev` of the major and minor numbers).
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Major number of a device node.
    pub rdev_major: u32,
    /// Minor number of a device node.
    pub rdev_minor: u32,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Whether it is the root of a mount (`None` where the kernel does not say).
    mount_root: Option<bool>,
}

impl Meta {
    /// Its type.
    pub fn kind(&self) -> Kind {
        match self.mode & 0o170000 {
            0o100000 => Kind::Regular,
            0o040000 => Kind::Directory,
            0o120000 => Kind::Symlink,
            0o020000 => Kind::CharDevice,
            0o060000 => Kind::BlockDevice,
            0o010000 => Kind::Fifo,
            0o140000 => Kind::Socket,
            _ => Kind::Unknown,
        }
    }

    /// Whether it is the root of a mount, where the kernel says (Linux 5.8 and later).
    pub fn mount_root(&self) -> Option<bool> {
        self.mount_root
    }

    /// Whether `other` describes the same inode: same device, inode number and type.
    pub fn same_inode(&self, other: &Meta) -> bool {
        self.dev == other.dev && self.ino == other.ino && self.kind() == other.kind()
    }
}

impl From<&Statx> for Meta {
    fn from(s: &Statx) -> Meta {
        let mount_root = s
            .stx_attributes_mask
            .contains(StatxAttributes::MOUNT_ROOT)
            .then(|| s.stx_attributes.contains(StatxAttributes::MOUNT_ROOT));
        Meta {
            mode: s.stx_mode as u32,
            uid: s.stx_uid,
            gid: s.stx_gid,
            nlink: s.stx_nlink as u64,
            size: s.stx_size,
            blocks: s.stx_blocks,
            dev: rustix::fs::makedev(s.stx_dev_major, s.stx_dev_minor),
            ino: s.stx_ino,
            rdev_major: s.stx_rdev_major,
            rdev_minor: s.stx_rdev_minor,
            mtime: s.stx_mtime.tv_sec,
            mtime_nsec: s.stx_mtime.tv_nsec,
            mount_root,
        }
    }
}
