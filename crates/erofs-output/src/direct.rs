//! An output that writes the data area of full images (or a streamed tar) with `O_DIRECT`.
//!
//! Streamed into the page cache, a layer's data is copied once more by the kernel into pages
//! it has to allocate, then written back; for a multi-gigabyte layer that copy is a large
//! share of the CPU the conversion uses (on a 2-core VM, 4.7 of 14 CPU seconds for a 3.7 GB
//! layer), on the same thread that parses the tar. With `O_DIRECT` the disk reads the data
//! from our own buffer: a helper thread writes each full 512 KiB buffer while the builder fills
//! the next one.
//!
//! Only the data area goes direct: it is written sequentially from a 4 KiB-aligned offset in
//! whole 4 KiB blocks (each file's data is padded to the block), which is what `O_DIRECT`
//! needs. The first seek after the data (to write the metadata), or a flush, ends the direct
//! phase; the metadata and the superblock are ordinary writes, and so is an unaligned tail
//! (the end of a tar copied behind a tar index). Where `O_DIRECT` is refused (a filesystem
//! without it, an unaligned start), everything is ordinary writes. Durability is unchanged:
//! the caller still fsyncs, which also flushes the disk's cache for the direct writes.
//!
//! The image is not in the page cache afterwards; callers that read the image right after
//! building it (to hash it, say) should write it the ordinary way ([`FileOutput`](crate::FileOutput)).
//!
//! Kernel copies and inserts in front work as [`FileOutput`](crate::FileOutput)'s do; a copy ends the
//! direct phase.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::mpsc;
use std::thread::JoinHandle;

use erofs_image::ImageOutput;

use crate::file::{copy_file_range_at, insert_range};

/// Bytes per direct write. At most three buffers exist (one filling, one queued, one being
/// written), so this also bounds the memory used: 1.5 MiB (measured: 1 MiB buffers were no
/// faster and 4 MiB ones raised peak memory above mkfs.erofs's).
const CHUNK: usize = 512 << 10;
/// Alignment of buffers, offsets and lengths (the largest logical block size in common use).
const ALIGN: usize = 4096;

/// A buffer with a 4 KiB-aligned window of [`CHUNK`] bytes, without `unsafe`: the window
/// starts where the allocation happens to be aligned.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new() -> Self {
        let raw = vec![0u8; CHUNK + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        Aligned { raw, start }
    }

    /// No buffer: what is left once the direct phase is over.
    fn empty() -> Self {
        Aligned {
            raw: Vec::new(),
            start: 0,
        }
    }

    fn window(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + CHUNK]
    }

    fn bytes(&self, len: usize) -> &[u8] {
        &self.raw[self.start..self.start + len]
    }
}

/// A write for the helper thread: `len` bytes of `buf` at `offset`.
struct Job {
    buf: Aligned,
    len: usize,
    offset: u64,
}

struct Writer {
    jobs: mpsc::SyncSender<Job>,
    spare: mpsc::Receiver<Aligned>,
    thread: JoinHandle<io::Result<()>>,
}

/// An [`ImageOutput`] over a file for [`tar_to_image`](erofs_image::tar_to_image) and
/// [`tar_to_index_file`](erofs_image::tar_to_index_file): the data area (the tar) direct,
/// the rest ordinary. Errors of the direct writes surface at the seek that ends the data
/// area, or from [`finish`](Self::finish).
pub struct DirectFile<'a> {
    file: &'a File,
    /// Ordinary writes (all of them where `O_DIRECT` is unavailable, and everything after
    /// the direct phase), buffered as an ordinary image output would be.
    plain: BufWriter<&'a File>,
    writer: Option<Writer>,
    buf: Aligned,
    len: usize,
    /// File offset of the buffer's first byte.
    offset: u64,
    /// Nothing written yet: the first seek places the data area.
    fresh: bool,
}

impl std::fmt::Debug for DirectFile<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectFile")
            .field("direct", &self.writer.is_some())
            .field("offset", &self.offset)
            .finish()
    }
}

impl<'a> DirectFile<'a> {
    /// Wrap `file`, which must be open for writing. Falls back to ordinary writes when the
    /// file cannot be reopened with `O_DIRECT`.
    pub fn new(file: &'a File) -> Self {
        let mut f = file;
        let offset = f.stream_position().unwrap_or(1);
        let writer = if offset.is_multiple_of(ALIGN as u64) {
            reopen_direct(file).ok().map(start_writer)
        } else {
            None
        };
        DirectFile {
            file,
            plain: BufWriter::with_capacity(CHUNK, file),
            buf: if writer.is_some() {
                Aligned::new()
            } else {
                Aligned::empty()
            },
            writer,
            len: 0,
            offset,
            fresh: true,
        }
    }

    /// Whether the data is being written with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.writer.is_some()
    }

    fn ship(&mut self) -> io::Result<()> {
        let Some(w) = &self.writer else {
            return Ok(());
        };
        let next = w.spare.try_recv().unwrap_or_else(|_| Aligned::new());
        let job = Job {
            buf: std::mem::replace(&mut self.buf, next),
            len: self.len,
            offset: self.offset,
        };
        if w.jobs.send(job).is_err() {
            // The helper stopped on an error: finish() reports it.
            return self.finish();
        }
        self.offset += self.len as u64;
        self.len = 0;
        Ok(())
    }

    /// End the direct phase: write what is buffered, wait for the helper, report its error.
    /// Later writes are ordinary ones at the file position, which is left after the data.
    pub fn finish(&mut self) -> io::Result<()> {
        let Some(w) = self.writer.take() else {
            return Ok(());
        };
        let aligned = self.len / ALIGN * ALIGN;
        // An unaligned tail (the end of a tar; never the builder's data area, which is padded
        // to whole blocks) goes the ordinary way once the direct writes are done.
        let tail = self.buf.bytes(self.len)[aligned..].to_vec();
        let mut r = Ok(());
        if aligned > 0 {
            let job = Job {
                buf: std::mem::replace(&mut self.buf, Aligned::empty()),
                len: aligned,
                offset: self.offset,
            };
            if w.jobs.send(job).is_err() {
                r = Err(io::Error::other("the direct writer stopped"));
            }
            self.offset += aligned as u64;
        }
        self.buf = Aligned::empty();
        self.len = 0;
        drop(w.jobs);
        let joined = w
            .thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the direct writer panicked")));
        r = joined.and(r);
        if !tail.is_empty() {
            r = r.and(self.file.write_all_at(&tail, self.offset));
            self.offset += tail.len() as u64;
        }
        let mut f = self.file;
        r.and(f.seek(SeekFrom::Start(self.offset)).map(drop))
    }
}

fn reopen_direct(file: &File) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

fn start_writer(direct: File) -> Writer {
    let (jobs, rx) = mpsc::sync_channel::<Job>(1);
    let (give_back, spare) = mpsc::channel::<Aligned>();
    let thread = std::thread::spawn(move || -> io::Result<()> {
        let mut plain: Option<File> = None;
        for job in rx {
            let data = job.buf.bytes(job.len);
            match &plain {
                None => match direct.write_all_at(data, job.offset) {
                    Ok(()) => {}
                    // The device or filesystem wants other alignments after all: go on with
                    // ordinary writes through a descriptor without O_DIRECT.
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                        let f = reopen_plain(&direct)?;
                        f.write_all_at(data, job.offset)?;
                        plain = Some(f);
                    }
                    Err(e) => return Err(e),
                },
                Some(f) => f.write_all_at(data, job.offset)?,
            }
            let _ = give_back.send(job.buf);
        }
        Ok(())
    });
    Writer {
        jobs,
        spare,
        thread,
    }
}

fn reopen_plain(direct: &File) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{}", direct.as_raw_fd()))
}

impl Write for DirectFile<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.fresh = false;
        if self.writer.is_none() {
            return self.plain.write(b);
        }
        let n = b.len().min(CHUNK - self.len);
        let at = self.len;
        self.buf.window()[at..at + n].copy_from_slice(&b[..n]);
        self.len += n;
        if self.len == CHUNK {
            self.ship()?;
        }
        Ok(n)
    }

    /// Ends the direct phase: afterwards everything written is in the file.
    fn flush(&mut self) -> io::Result<()> {
        self.finish()?;
        self.plain.flush()
    }
}

impl Seek for DirectFile<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        if self.fresh
            && self.writer.is_some()
            && let SeekFrom::Start(at) = pos
        {
            // Placing the data area.
            if !at.is_multiple_of(ALIGN as u64) {
                self.writer = None;
                self.buf = Aligned::empty();
            }
            self.offset = at;
            return self.plain.seek(pos);
        }
        self.fresh = false;
        if pos == SeekFrom::Current(0) && self.writer.is_some() {
            return Ok(self.offset + self.len as u64);
        }
        self.finish()?;
        self.plain.seek(pos)
    }
}

/// Reads come after the direct phase (which they end), from the file position.
impl Read for DirectFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.flush()?;
        let mut f = self.file;
        f.read(buf)
    }
}

impl ImageOutput for DirectFile<'_> {
    fn copy_range(&mut self, src: &File, src_off: u64, len: u64) -> io::Result<()> {
        self.flush()?;
        let at = self.plain.stream_position()?;
        copy_file_range_at(src, src_off, self.file, at, len)?;
        self.plain.seek(SeekFrom::Start(at + len)).map(drop)
    }

    fn insert_front(&mut self, len: u64) -> io::Result<()> {
        self.flush()?;
        insert_range(self.file, len)
    }
}

impl Drop for DirectFile<'_> {
    fn drop(&mut self) {
        // A build that failed half way: wait for the helper, the error is already reported.
        let _ = self.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};

    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    /// A data area of several chunks plus a tail, then ordinary writes after it and at block
    /// 0: the file holds exactly what was written, wherever it went.
    #[test]
    fn direct_and_ordinary_writes_land_where_they_should() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let path = dir.path().join("img");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let data = pattern(3 * CHUNK + 5 * 4096, 7);
        let meta = pattern(10_000, 9);
        {
            let mut d = DirectFile::new(&file);
            d.seek(SeekFrom::Start(4096)).unwrap();
            for piece in data.chunks(100_003) {
                d.write_all(piece).unwrap();
            }
            assert_eq!(
                d.stream_position().unwrap(),
                4096 + data.len() as u64,
                "position during the data area"
            );
            d.seek(SeekFrom::Start(4096 + data.len() as u64)).unwrap();
            d.write_all(&meta).unwrap();
            d.seek(SeekFrom::Start(1024)).unwrap();
            d.write_all(b"superblock").unwrap();
        }
        let mut got = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 4096 + data.len() + meta.len());
        assert_eq!(&got[1024..1034], b"superblock");
        assert_eq!(&got[4096..4096 + data.len()], &data[..]);
        assert_eq!(&got[4096 + data.len()..], &meta[..]);
    }

    /// A stream written from offset 0 and ended by a flush, with an unaligned tail (the tar
    /// of a tar-index image): all of it lands, and later writes go after it.
    #[test]
    fn a_flush_ends_the_direct_phase_with_an_unaligned_tail() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let path = dir.path().join("tar");
        let file = File::create(&path).unwrap();
        let data = pattern(CHUNK + 3 * 4096 + 512 * 3, 5);
        {
            let mut d = DirectFile::new(&file);
            for piece in data.chunks(65_536) {
                d.write_all(piece).unwrap();
            }
            d.flush().unwrap();
            d.write_all(b"after").unwrap();
        }
        let got = std::fs::read(&path).unwrap();
        assert_eq!(&got[..data.len()], &data[..]);
        assert_eq!(&got[data.len()..], b"after");
    }

    /// An unaligned start means no direct writes, and the same bytes.
    #[test]
    fn an_unaligned_start_writes_the_ordinary_way() {
        let mut file = tempfile::tempfile().unwrap();
        let data = pattern(CHUNK + 1000, 3);
        {
            let mut d = DirectFile::new(&file);
            d.seek(SeekFrom::Start(2048)).unwrap();
            assert!(!d.is_direct());
            d.write_all(&data).unwrap();
            d.seek(SeekFrom::Start(0)).unwrap();
            d.write_all(b"x").unwrap();
        }
        let mut got = Vec::new();
        file.rewind().unwrap();
        file.read_to_end(&mut got).unwrap();
        assert_eq!(&got[2048..], &data[..]);
        assert_eq!(got[0], b'x');
    }
}
