//! Starting writeback of a file's dirty pages early (`sync_file_range` with
//! `SYNC_FILE_RANGE_WRITE`), so that the disk writes a large file while it is
//! still being produced instead of all at once in the final `fsync`.
//!
//! This is not a durability primitive: it neither waits for the I/O nor
//! flushes metadata or the disk cache. Callers still `fsync` at the end; the
//! early start only shortens that wait.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Ask the kernel to start writing back the dirty pages of `file` in
/// `offset..offset + len` (`len` 0: to the end of the file), without waiting
/// for the I/O to finish.
pub fn start(file: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    let fd = file.as_fd();
    let off = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: sync_file_range takes no pointers; `fd` is a BorrowedFd, open for the
    // whole call, and the flag is a constant the kernel validates.
    let r = unsafe { libc::sync_file_range(fd.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    #[test]
    fn starts_writeback_of_a_written_file() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        super::start(&f, 0, 0).unwrap();
        super::start(&f, 4096, 8192).unwrap();
    }

    #[test]
    fn rejects_what_the_kernel_rejects() {
        let f = tempfile::tempfile().unwrap();
        assert!(super::start(&f, u64::MAX, 0).is_err());
        let dir = std::fs::File::open("/").unwrap();
        // A directory has no pages to write; the kernel accepts or refuses, never panics.
        let _ = super::start(&dir, 0, 0);
    }
}
