//! Layer compression: the one [`Compression`] type of the workspace. Detect gzip or zstd by
//! magic bytes and decompress as a stream, with a guard against decompression bombs, or
//! compress a stream ([`Encoder`]).

use std::io::{self, BufReader, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The compression of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Not compressed.
    None,
    /// gzip (possibly several members).
    Gzip,
    /// zstd (possibly several frames).
    Zstd,
}

impl Compression {
    /// All three.
    pub const ALL: [Compression; 3] = [Compression::None, Compression::Gzip, Compression::Zstd];

    /// The usual name (`gzip`, `zstd`: the suffix of media types and file names); `None` for
    /// an uncompressed stream.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Gzip => Some("gzip"),
            Compression::Zstd => Some("zstd"),
        }
    }

    /// The compression a name (as [`Compression::name`] gives it) stands for.
    pub fn from_name(name: &str) -> Option<Compression> {
        match name {
            "gzip" => Some(Compression::Gzip),
            "zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// An encoder that writes the compressed form of its input into `out`, at the levels the
    /// `gzip` and `zstd` tools use by default (6 and 3). Call [`Encoder::finish`] at the end.
    pub fn encoder<W: Write>(self, out: W) -> io::Result<Encoder<W>> {
        Ok(Encoder(match self {
            Compression::None => EncoderKind::None(out),
            Compression::Gzip => EncoderKind::Gzip(flate2::write::GzEncoder::new(
                out,
                flate2::Compression::default(),
            )),
            Compression::Zstd => EncoderKind::Zstd(zstd::stream::write::Encoder::new(out, 3)?),
        }))
    }

    /// Compress a whole buffer (a copy of it for [`Compression::None`]).
    pub fn compress(self, data: &[u8]) -> io::Result<Vec<u8>> {
        let mut e = self.encoder(Vec::with_capacity(data.len() / 2))?;
        e.write_all(data)?;
        e.finish()
    }

    /// Identify a stream from its first bytes.
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// A compressing writer (see [`Compression::encoder`]).
pub struct Encoder<W: Write>(EncoderKind<W>);

enum EncoderKind<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> std::fmt::Debug for Encoder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Encoder").field(&self.compression()).finish()
    }
}

impl<W: Write> Encoder<W> {
    /// The compression it writes.
    pub fn compression(&self) -> Compression {
        match self.0 {
            EncoderKind::None(_) => Compression::None,
            EncoderKind::Gzip(_) => Compression::Gzip,
            EncoderKind::Zstd(_) => Compression::Zstd,
        }
    }

    /// End the compressed stream (gzip trailer, last zstd frame); the writer underneath.
    pub fn finish(self) -> io::Result<W> {
        match self.0 {
            EncoderKind::None(w) => Ok(w),
            EncoderKind::Gzip(g) => g.finish(),
            EncoderKind::Zstd(z) => z.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            EncoderKind::None(w) => w.write(b),
            EncoderKind::Gzip(g) => g.write(b),
            EncoderKind::Zstd(z) => z.write(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.0 {
            EncoderKind::None(w) => w.flush(),
            EncoderKind::Gzip(g) => g.flush(),
            EncoderKind::Zstd(z) => z.flush(),
        }
    }
}

/// Limits on what decompression may produce.
#[derive(Debug, Clone, Copy)]
pub struct BombGuard {
    /// Once more than `grace` bytes are produced, output may be at most `max_ratio` times the
    /// compressed input consumed.
    pub max_ratio: u64,
    /// Output allowed before the ratio is enforced.
    pub grace: u64,
    /// Absolute cap on the output.
    pub max_output: Option<u64>,
}

impl Default for BombGuard {
    /// Real layers stay far below 100:1; a stream of zeros reaches ~1000:1 with gzip and far
    /// more with zstd.
    fn default() -> Self {
        BombGuard {
            max_ratio: 500,
            grace: 256 << 20,
            max_output: None,
        }
    }
}

/// Counts bytes read through it into a shared counter.
#[derive(Debug)]
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A decompressing reader.
pub struct Decompressed {
    inner: Box<dyn Read + Send>,
    compression: Compression,
    compressed: Arc<AtomicU64>,
    produced: u64,
    guard: BombGuard,
}

impl std::fmt::Debug for Decompressed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decompressed")
            .field("compression", &self.compression)
            .field("produced", &self.produced)
            .finish()
    }
}

impl Decompressed {
    /// Wrap `input`, detecting its compression from the first bytes.
    pub fn new<R: Read + Send + 'static>(input: R, guard: BombGuard) -> io::Result<Self> {
        let compressed = Arc::new(AtomicU64::new(0));
        let mut counting = Counting {
            inner: input,
            count: compressed.clone(),
        };
        // Peek at the magic: a pipe may hand it over a byte at a time.
        let mut head = [0u8; 4];
        let mut got = 0;
        while got < head.len() {
            match counting.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let compression = Compression::detect(&head[..got]);
        let br = BufReader::with_capacity(
            1 << 20,
            io::Cursor::new(head[..got].to_vec()).chain(counting),
        );
        let inner: Box<dyn Read + Send> = match compression {
            Compression::None => Box::new(br),
            // The decoder's output goes through the tar reader's own 1 MiB buffer.
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(br)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(br)?),
        };
        Ok(Decompressed {
            inner,
            compression,
            compressed,
            produced: 0,
            guard,
        })
    }

    /// The detected compression.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Compressed bytes consumed so far.
    pub fn compressed_bytes(&self) -> u64 {
        self.compressed.load(Ordering::Relaxed)
    }

    /// Decompressed bytes produced so far.
    pub fn produced_bytes(&self) -> u64 {
        self.produced
    }
}

impl Read for Decompressed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.produced += n as u64;
        if self.compression != Compression::None {
            if let Some(max) = self.guard.max_output
                && self.produced > max
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("decompressed layer exceeds {max} bytes"),
                ));
            }
            let input = self.compressed.load(Ordering::Relaxed).max(1);
            if self.produced > self.guard.grace && self.produced / input > self.guard.max_ratio {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "decompression ratio over {}:1 ({} bytes from {input}): refusing a likely decompression bomb",
                        self.guard.max_ratio, self.produced
                    ),
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn detects_and_decompresses() {
        let plain = b"hello world".repeat(1000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&plain[..], 1).unwrap();
        for (input, kind) in [
            (plain.clone(), Compression::None),
            (gz, Compression::Gzip),
            (zs, Compression::Zstd),
        ] {
            let mut d =
                Decompressed::new(std::io::Cursor::new(input), BombGuard::default()).unwrap();
            assert_eq!(d.compression(), kind);
            let mut out = Vec::new();
            d.read_to_end(&mut out).unwrap();
            assert_eq!(out, plain);
        }
    }

    #[test]
    fn encodes_what_it_detects() {
        let plain = b"layer bytes ".repeat(5000);
        for c in Compression::ALL {
            let packed = c.compress(&plain).unwrap();
            assert_eq!(Compression::detect(&packed), c);
            let mut d =
                Decompressed::new(std::io::Cursor::new(packed), BombGuard::default()).unwrap();
            let mut out = Vec::new();
            d.read_to_end(&mut out).unwrap();
            assert_eq!(out, plain, "{c:?}");
            assert_eq!(
                c.name().and_then(Compression::from_name),
                c.name().map(|_| c)
            );
        }
        assert_eq!(Compression::from_name("xz"), None);
    }

    #[test]
    fn bomb_is_refused() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            gz.write_all(&zeros).unwrap();
        }
        let gz = gz.finish().unwrap();
        let guard = BombGuard {
            max_ratio: 100,
            grace: 1 << 20,
            max_output: None,
        };
        let mut d = Decompressed::new(std::io::Cursor::new(gz), guard).unwrap();
        let err = std::io::copy(&mut d, &mut std::io::sink()).unwrap_err();
        assert!(err.to_string().contains("decompression bomb"), "{err}");
    }
}
