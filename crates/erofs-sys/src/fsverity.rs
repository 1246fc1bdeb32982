//! fs-verity: enable it on a file, measure a file's digest, and check
//! whether it is enabled.
//!
//! Kernels built without `CONFIG_FS_VERITY`, and filesystems that do not
//! support it (or were made without the `verity` feature), make these ioctls
//! fail with `EOPNOTSUPP` or `ENOTTY`; both map to
//! [`VerityError::Unsupported`] so that callers can fall back to other
//! integrity checks.

use std::ffi::c_void;
use std::io;
use std::os::fd::AsFd;

use rustix::fs::IFlags;
use rustix::io::Errno;
use rustix::ioctl::{self, Ioctl, IoctlOutput, Opcode, opcode};

/// `FS_VERITY_HASH_ALG_SHA256`.
pub const HASH_ALG_SHA256: u32 = 1;

/// Size of a SHA-256 fs-verity digest, in bytes.
pub const SHA256_DIGEST_SIZE: usize = 32;

/// `FS_VERITY_FL`: the inode flag reported by `FS_IOC_GETFLAGS` for files
/// with fs-verity enabled.
pub const FS_VERITY_FL: u32 = 0x0010_0000;

/// Room reserved for the digest returned by `FS_IOC_MEASURE_VERITY`
/// (`FS_VERITY_MAX_DIGEST_SIZE`, enough for SHA-512).
const MAX_DIGEST_SIZE: usize = 64;

/// `struct fsverity_enable_arg` from <linux/fsverity.h>.
#[repr(C)]
struct FsverityEnableArg {
    version: u32,
    hash_algorithm: u32,
    block_size: u32,
    salt_size: u32,
    salt_ptr: u64,
    sig_size: u32,
    reserved1: u32,
    sig_ptr: u64,
    reserved2: [u64; 11],
}

/// The fixed header of `struct fsverity_digest` from <linux/fsverity.h>.
#[repr(C)]
struct FsverityDigestHeader {
    digest_algorithm: u16,
    digest_size: u16,
}

/// `struct fsverity_digest` followed by room for the largest digest.
#[repr(C)]
struct FsverityDigestBuf {
    header: FsverityDigestHeader,
    digest: [u8; MAX_DIGEST_SIZE],
}

const FS_IOC_ENABLE_VERITY: Opcode = opcode::write::<FsverityEnableArg>(b'f', 133);
const FS_IOC_MEASURE_VERITY: Opcode = opcode::read_write::<FsverityDigestHeader>(b'f', 134);

const _: () = assert!(size_of::<FsverityEnableArg>() == 128);
const _: () = assert!(size_of::<FsverityDigestHeader>() == 4);
const _: () = assert!(FS_IOC_ENABLE_VERITY as u64 == 0x4080_6685);
const _: () = assert!(FS_IOC_MEASURE_VERITY as u64 == 0xc004_6686);

/// `FS_IOC_MEASURE_VERITY` with a buffer large enough for any digest.
struct Measure<'a>(&'a mut FsverityDigestBuf);

// SAFETY: FS_IOC_MEASURE_VERITY reads `digest_size` from the header to learn
// how much room follows it, fails with EOVERFLOW if that is too small, and
// otherwise writes the header and at most `digest_size` bytes after it.
// `as_ptr` points to a live, exclusively borrowed `FsverityDigestBuf` whose
// `digest_size` is set to the real size of the trailing array, so the kernel
// never writes outside it; IS_MUTATING is true because the kernel writes.
unsafe impl Ioctl for Measure<'_> {
    type Output = ();

    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        FS_IOC_MEASURE_VERITY
    }

    fn as_ptr(&mut self) -> *mut c_void {
        std::ptr::from_mut(self.0).cast()
    }

    unsafe fn output_from_ptr(_: IoctlOutput, _: *mut c_void) -> rustix::io::Result<()> {
        Ok(())
    }
}

/// Errors from this module.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    /// The kernel or the filesystem does not support fs-verity
    /// (`EOPNOTSUPP` or `ENOTTY`).
    #[error("fs-verity is not supported here: {0}")]
    Unsupported(#[source] io::Error),
    /// [`enable`]: fs-verity is already enabled on the file (`EEXIST`).
    #[error("fs-verity is already enabled on this file")]
    AlreadyEnabled,
    /// [`measure`]: fs-verity is not enabled on the file (`ENODATA`).
    #[error("fs-verity is not enabled on this file")]
    NotEnabled,
    /// [`measure`]: the file's digest uses another algorithm than SHA-256.
    #[error("fs-verity digest uses hash algorithm {algorithm}, not SHA-256")]
    UnexpectedAlgorithm {
        /// The `FS_VERITY_HASH_ALG_*` number reported by the kernel.
        algorithm: u16,
    },
    /// Any other failure of the named ioctl.
    #[error("{op}: {source}")]
    Ioctl {
        /// The ioctl that failed.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn map_errno(op: &'static str, e: Errno) -> VerityError {
    match e {
        Errno::OPNOTSUPP | Errno::NOTTY => VerityError::Unsupported(e.into()),
        e => VerityError::Ioctl {
            op,
            source: e.into(),
        },
    }
}

/// Enables fs-verity on the file `fd` with SHA-256 Merkle tree blocks of
/// `block_size` bytes (normally 4096), no salt and no signature.
///
/// This reads the whole file to build the Merkle tree. The file must not be
/// open for writing anywhere, including by `fd` itself (else `ETXTBSY`);
/// open it read-only. Fails with [`VerityError::Unsupported`] when the
/// kernel or filesystem lacks fs-verity and [`VerityError::AlreadyEnabled`]
/// when it is already on.
pub fn enable(fd: impl AsFd, block_size: u32) -> Result<(), VerityError> {
    let arg = FsverityEnableArg {
        version: 1,
        hash_algorithm: HASH_ALG_SHA256,
        block_size,
        salt_size: 0,
        salt_ptr: 0,
        sig_size: 0,
        reserved1: 0,
        sig_ptr: 0,
        reserved2: [0; 11],
    };
    // SAFETY: FS_IOC_ENABLE_VERITY reads one `struct fsverity_enable_arg`,
    // which `FsverityEnableArg` reproduces exactly (size and ioctl number
    // checked at compile time). Salt and signature are absent (sizes 0,
    // null pointers), so the kernel reads no other user memory.
    let result = unsafe {
        ioctl::ioctl(
            fd,
            ioctl::Setter::<FS_IOC_ENABLE_VERITY, FsverityEnableArg>::new(arg),
        )
    };
    result.map_err(|e| match e {
        Errno::EXIST => VerityError::AlreadyEnabled,
        e => map_errno("FS_IOC_ENABLE_VERITY", e),
    })
}

/// Returns the SHA-256 fs-verity digest of the file `fd`
/// (`FS_IOC_MEASURE_VERITY`).
///
/// Fails with [`VerityError::NotEnabled`] if fs-verity is not enabled on the
/// file, [`VerityError::Unsupported`] if the kernel or filesystem lacks it,
/// and [`VerityError::UnexpectedAlgorithm`] if the file's tree was built
/// with another hash than SHA-256 (so its digest cannot be compared with
/// ours).
pub fn measure(fd: impl AsFd) -> Result<Vec<u8>, VerityError> {
    let mut buf = FsverityDigestBuf {
        header: FsverityDigestHeader {
            digest_algorithm: 0,
            digest_size: MAX_DIGEST_SIZE as u16,
        },
        digest: [0; MAX_DIGEST_SIZE],
    };
    // SAFETY: see the `unsafe impl Ioctl for Measure` above; `buf` lives
    // across the call and is exclusively borrowed by it.
    unsafe { ioctl::ioctl(fd, Measure(&mut buf)) }.map_err(|e| match e {
        Errno::NODATA => VerityError::NotEnabled,
        e => map_errno("FS_IOC_MEASURE_VERITY", e),
    })?;
    if u32::from(buf.header.digest_algorithm) != HASH_ALG_SHA256 {
        return Err(VerityError::UnexpectedAlgorithm {
            algorithm: buf.header.digest_algorithm,
        });
    }
    let len = usize::from(buf.header.digest_size).min(MAX_DIGEST_SIZE);
    Ok(buf.digest[..len].to_vec())
}

/// Tells whether fs-verity is enabled on the file `fd` (`FS_VERITY_FL` in
/// `FS_IOC_GETFLAGS`).
///
/// A filesystem that does not implement `FS_IOC_GETFLAGS` at all
/// (`ENOTTY`/`EOPNOTSUPP`) cannot have fs-verity files, so that answers
/// `Ok(false)`.
pub fn is_enabled(fd: impl AsFd) -> Result<bool, VerityError> {
    match rustix::fs::ioctl_getflags(fd) {
        Ok(flags) => Ok(flags.contains(IFlags::from_bits_retain(FS_VERITY_FL))),
        Err(Errno::OPNOTSUPP | Errno::NOTTY) => Ok(false),
        Err(e) => Err(VerityError::Ioctl {
            op: "FS_IOC_GETFLAGS",
            source: e.into(),
        }),
    }
}
