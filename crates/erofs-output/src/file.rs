//! Ordinary writes to a file, with kernel copies and range inserts.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use erofs_image::ImageOutput;
use rustix::io::Errno;

/// Largest single `copy_file_range` request (the kernel caps one call near 2 GiB anyway).
const MAX_COPY: u64 = 1 << 30;
/// Buffer of the userspace fallback copy.
const FALLBACK_BUF: usize = 1 << 20;

/// Copy `len` bytes from `src` at `src_off` to `dst` at `dst_off`, in the kernel where it can
/// (`copy_file_range`), otherwise (across filesystems, without kernel support, on files the
/// call refuses) with positional reads and writes. Neither file's position moves.
pub fn copy_file_range_at(
    src: &File,
    mut src_off: u64,
    dst: &File,
    mut dst_off: u64,
    len: u64,
) -> io::Result<()> {
    let mut left = len;
    while left > 0 {
        match rustix::fs::copy_file_range(
            src,
            Some(&mut src_off),
            dst,
            Some(&mut dst_off),
            left.min(MAX_COPY) as usize,
        ) {
            // The kernel moved both offsets.
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => left -= k as u64,
            Err(Errno::XDEV | Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL) => {
                let mut buf = vec![0u8; FALLBACK_BUF.min(left as usize)];
                while left > 0 {
                    let k = (buf.len() as u64).min(left) as usize;
                    src.read_exact_at(&mut buf[..k], src_off)?;
                    dst.write_all_at(&buf[..k], dst_off)?;
                    src_off += k as u64;
                    dst_off += k as u64;
                    left -= k as u64;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Insert `len` bytes (a multiple of the filesystem's block size) at the front of `file`
/// without moving its data (`FALLOC_FL_INSERT_RANGE`, ext4 and xfs). Filesystems that cannot
/// give an error of kind [`io::ErrorKind::Unsupported`], as [`ImageOutput::insert_front`]
/// wants.
pub fn insert_range(file: &File, len: u64) -> io::Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    match fallocate(file, FallocateFlags::INSERT_RANGE, 0, len) {
        Ok(()) => Ok(()),
        Err(e @ (Errno::OPNOTSUPP | Errno::INVAL)) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            io::Error::from(e),
        )),
        Err(e) => Err(e.into()),
    }
}

/// A file as an [`ImageOutput`]: every write and seek is the file's own (one system call
/// each, as for a plain `&File`), ranges are copied with [`copy_file_range_at`] and inserts
/// use [`insert_range`].
#[derive(Debug)]
pub struct FileOutput<'a> {
    file: &'a File,
    /// The file position, once a seek has told it (kept so copies need no extra `lseek`).
    pos: Option<u64>,
}

impl<'a> FileOutput<'a> {
    /// Write to `file`, which must be open for writing (and reading, for a single-file tar
    /// index).
    pub fn new(file: &'a File) -> Self {
        FileOutput { file, pos: None }
    }

    fn advance(&mut self, n: usize) {
        if let Some(p) = &mut self.pos {
            *p += n as u64;
        }
    }
}

impl Write for FileOutput<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&mut &*self.file).write(buf)?;
        self.advance(n);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for FileOutput<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (&mut &*self.file).read(buf)?;
        self.advance(n);
        Ok(n)
    }
}

impl Seek for FileOutput<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let p = (&mut &*self.file).seek(pos)?;
        self.pos = Some(p);
        Ok(p)
    }
}

impl ImageOutput for FileOutput<'_> {
    fn copy_range(&mut self, src: &File, src_off: u64, len: u64) -> io::Result<()> {
        let at = match self.pos {
            Some(p) => p,
            None => self.stream_position()?,
        };
        copy_file_range_at(src, src_off, self.file, at, len)?;
        self.seek(SeekFrom::Start(at + len)).map(drop)
    }

    fn insert_front(&mut self, len: u64) -> io::Result<()> {
        insert_range(self.file, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(29) ^ seed).collect()
    }

    /// Writes, a kernel copy in the middle, and writes after it: in order, at the right
    /// offsets, with the file position after the copy.
    #[test]
    fn copy_range_lands_at_the_position() {
        let src = tempfile::tempfile().unwrap();
        let data = pattern(3 << 20, 1);
        src.write_all_at(&data, 0).unwrap();
        let dst = tempfile::tempfile().unwrap();
        let mut out = FileOutput::new(&dst);
        out.seek(SeekFrom::Start(4096)).unwrap();
        out.write_all(b"before").unwrap();
        out.copy_range(&src, 100, data.len() as u64 - 100).unwrap();
        out.write_all(b"after").unwrap();
        let mut got = Vec::new();
        (&dst).rewind().unwrap();
        (&dst).read_to_end(&mut got).unwrap();
        assert_eq!(&got[4096..4102], b"before");
        assert_eq!(&got[4102..got.len() - 5], &data[100..]);
        assert_eq!(&got[got.len() - 5..], b"after");
    }

    /// Without a known position (no seek yet) the copy asks the file for it.
    #[test]
    fn copy_range_without_a_seek() {
        let src = tempfile::tempfile().unwrap();
        src.write_all_at(b"0123456789", 0).unwrap();
        let dst = tempfile::tempfile().unwrap();
        (&dst).write_all(b"ab").unwrap();
        let mut out = FileOutput::new(&dst);
        out.copy_range(&src, 3, 4).unwrap();
        out.write_all(b"z").unwrap();
        let mut got = Vec::new();
        (&dst).rewind().unwrap();
        (&dst).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ab3456z");
    }

    /// On ext4 or xfs (the test directory's filesystem, normally) the insert succeeds and
    /// moves the data; elsewhere it reports Unsupported and leaves the file as it was.
    #[test]
    fn insert_range_moves_data_or_says_unsupported() {
        for dir in [std::env::temp_dir(), "/dev/shm".into()] {
            let f = tempfile::tempfile_in(&dir).unwrap();
            let data = pattern(64 << 10, 3);
            f.write_all_at(&data, 0).unwrap();
            let mut got = Vec::new();
            match insert_range(&f, 4096) {
                Ok(()) => {
                    (&f).rewind().unwrap();
                    (&f).read_to_end(&mut got).unwrap();
                    assert_eq!(got.len(), data.len() + 4096, "{}", dir.display());
                    assert!(got[..4096].iter().all(|&b| b == 0));
                    assert_eq!(&got[4096..], &data[..]);
                }
                Err(e) => {
                    assert_eq!(
                        e.kind(),
                        io::ErrorKind::Unsupported,
                        "{}: {e}",
                        dir.display()
                    );
                    (&f).rewind().unwrap();
                    (&f).read_to_end(&mut got).unwrap();
                    assert_eq!(got, data);
                }
            }
        }
    }
}
