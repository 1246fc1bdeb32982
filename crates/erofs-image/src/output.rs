//! Where images are written: [`ImageOutput`], a `Write + Seek` sink that may also know faster
//! ways to do the two bulk operations builders need.
//!
//! The builders only ever ask for ordinary writes and seeks, plus:
//!
//! * [`copy_range`](ImageOutput::copy_range): "append these bytes of that file here", when the
//!   input is an uncompressed tar in a regular file. The portable way reads and writes them;
//!   an output over a file can have the kernel copy (or reflink) them instead.
//! * [`insert_front`](ImageOutput::insert_front): "make room for this much in front of what
//!   was written", for the single-file tar index `[index][tar]`, whose index is only known
//!   once the tar has been streamed. The portable answer is "unsupported", and the builder
//!   then moves the tar itself with reads and writes.
//!
//! Plain sinks (`File`, `&File`, in-memory cursors, or anything `Write + Seek` wrapped in
//! [`PlainOutput`]) get the portable behaviour. Outputs that use operating-system specifics
//! (`copy_file_range`, `FALLOC_FL_INSERT_RANGE`, `O_DIRECT`) live outside this crate.

use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

/// Bytes per read/write in the portable copies.
const COPY_BUF: usize = 1 << 20;

/// A sink for images. See the [module documentation](self).
pub trait ImageOutput: Write + Seek {
    /// Write `len` bytes of `src`, from `src_off`, at the current position, and advance the
    /// position past them. The default reads and writes them through userspace.
    fn copy_range(&mut self, src: &File, src_off: u64, len: u64) -> io::Result<()> {
        copy_through_userspace(self, src, src_off, len)
    }

    /// Insert `len` zero bytes (a multiple of 4 KiB) at the front of the output, moving
    /// everything written so far `len` bytes further; the position afterwards is unspecified.
    /// An error of kind [`io::ErrorKind::Unsupported`] (the default) leaves the output
    /// untouched and makes the builder move the data with reads and writes.
    fn insert_front(&mut self, len: u64) -> io::Result<()> {
        let _ = len;
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// The portable [`ImageOutput::copy_range`]: read `src` at explicit offsets, write to `out`.
pub fn copy_through_userspace<W: Write + ?Sized>(
    out: &mut W,
    src: &File,
    mut src_off: u64,
    len: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF.min(usize::try_from(len).unwrap_or(COPY_BUF))];
    let mut left = len;
    while left > 0 {
        let k = (buf.len() as u64).min(left) as usize;
        src.read_exact_at(&mut buf[..k], src_off)?;
        out.write_all(&buf[..k])?;
        src_off += k as u64;
        left -= k as u64;
    }
    Ok(())
}

/// Move `[0, len)` of `out` to `[by, by + len)`, copying backwards so nothing is overwritten
/// before it is read (what the builder does when [`ImageOutput::insert_front`] is
/// unsupported).
pub(crate) fn shift_forward<O: Read + Write + Seek + ?Sized>(
    out: &mut O,
    len: u64,
    by: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF.min(usize::try_from(len).unwrap_or(COPY_BUF))];
    let mut end = len;
    while end > 0 {
        let k = (buf.len() as u64).min(end);
        let start = end - k;
        out.seek(SeekFrom::Start(start))?;
        out.read_exact(&mut buf[..k as usize])?;
        out.seek(SeekFrom::Start(start + by))?;
        out.write_all(&buf[..k as usize])?;
        end = start;
    }
    Ok(())
}

/// Any `Write + Seek` as an [`ImageOutput`] with the portable behaviour (and `Read` when the
/// inner sink has it, which the single-file tar index needs).
#[derive(Debug)]
pub struct PlainOutput<W>(pub W);

impl<W: Write> Write for PlainOutput<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Seek> Seek for PlainOutput<W> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}

impl<W: Read> Read for PlainOutput<W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<W: Write + Seek> ImageOutput for PlainOutput<W> {}

impl ImageOutput for File {}
impl ImageOutput for &File {}
impl ImageOutput for Cursor<Vec<u8>> {}
impl ImageOutput for Cursor<&mut Vec<u8>> {}
impl ImageOutput for Cursor<&mut [u8]> {}

impl<O: ImageOutput + ?Sized> ImageOutput for &mut O {
    fn copy_range(&mut self, src: &File, src_off: u64, len: u64) -> io::Result<()> {
        (**self).copy_range(src, src_off, len)
    }
    fn insert_front(&mut self, len: u64) -> io::Result<()> {
        (**self).insert_front(len)
    }
}

impl<O: ImageOutput + ?Sized> ImageOutput for Box<O> {
    fn copy_range(&mut self, src: &File, src_off: u64, len: u64) -> io::Result<()> {
        (**self).copy_range(src, src_off, len)
    }
    fn insert_front(&mut self, len: u64) -> io::Result<()> {
        (**self).insert_front(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_forward_moves_bytes() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = Cursor::new(data.clone());
        shift_forward(&mut out, data.len() as u64, 4096).unwrap();
        let got = out.into_inner();
        assert_eq!(got.len(), data.len() + 4096);
        assert_eq!(&got[4096..], &data[..]);
    }

    #[test]
    fn portable_copy_range_appends_at_the_position() {
        let src = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..(COPY_BUF + 777) as u32)
            .map(|i| (i % 241) as u8)
            .collect();
        src.write_all_at(&data, 0).unwrap();
        let mut out = Cursor::new(Vec::new());
        out.write_all(b"head").unwrap();
        out.copy_range(&src, 10, data.len() as u64 - 10).unwrap();
        out.write_all(b"tail").unwrap();
        let got = out.into_inner();
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[4..got.len() - 4], &data[10..]);
        assert_eq!(&got[got.len() - 4..], b"tail");
    }

    #[test]
    fn insert_front_is_unsupported_by_default() {
        let mut out = Cursor::new(vec![1u8; 10]);
        let e = out.insert_front(4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert_eq!(out.into_inner(), vec![1u8; 10]);
    }
}
