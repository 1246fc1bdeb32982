//! A streaming tar reader: ustar, GNU (long names and links, base-256 numbers, old sparse) and
//! PAX (local and global headers, xattrs, sparse 0.0/0.1/1.0).
//!
//! The reader pulls from any [`Read`] once, front to back, and hands out entry data in chunks
//! from its own buffer, so nothing is staged and memory is bounded by the largest extension
//! header it accepts ([`TarLimits`]). It tracks the absolute offset of every entry's data in the
//! uncompressed stream, which is what a tar index points at.
//!
//! Paths are normalised here (`./` and duplicate slashes dropped); absolute paths, `..`
//! components, NUL bytes and components over 255 bytes are errors that name the entry.

mod header;
mod pax;
mod writer;

pub use writer::TarWriter;

use std::collections::HashMap;
use std::io::{self, Read};

use header::BLOCK;

/// Size of a tar block.
pub const TAR_BLOCK: u64 = BLOCK as u64;

/// What went wrong, without the position.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TarErrorKind {
    /// The stream ended inside a header or inside entry data.
    #[error("unexpected end of archive (truncated tar)")]
    Truncated,
    /// A header block's checksum does not match.
    #[error("header checksum mismatch (not a tar stream, or corrupted)")]
    BadChecksum,
    /// A numeric header field is not valid octal or base-256, or out of range.
    #[error("invalid number in header field `{0}`")]
    BadNumber(&'static str),
    /// A malformed PAX extended header.
    #[error("invalid PAX header: {0}")]
    BadPax(String),
    /// An absolute path (`/etc/passwd`).
    #[error("absolute path is not allowed in a layer")]
    AbsolutePath,
    /// A `..` component.
    #[error("path with a `..` component is not allowed in a layer")]
    DotDot,
    /// A path component longer than 255 bytes.
    #[error("path component longer than 255 bytes")]
    NameTooLong,
    /// A NUL byte inside a name or link target.
    #[error("NUL byte in a name or link target")]
    NulInName,
    /// A GNU long name or link record (`L`, `K`) with no NUL within its size and bytes other
    /// than zeros after it: GNU tar reads such a name on into the padding, up to the next NUL,
    /// so readers would disagree on the name.
    #[error("GNU long name record is not NUL-terminated and runs on into its padding")]
    UnterminatedLongName,
    /// An empty hardlink or symlink target.
    #[error("empty link target")]
    EmptyLinkTarget,
    /// A symlink target longer than 4095 bytes.
    #[error("symlink target longer than 4095 bytes")]
    LinkTooLong,
    /// An extension header (PAX, GNU long name) larger than the limit, or extension headers of
    /// one member (chained `x`, `L`, `K` headers) adding up to more than it.
    #[error("extension header of {0} bytes exceeds the limit")]
    HeaderTooLarge(u64),
    /// PAX global headers holding more records or bytes than the limit ([`TarLimits`]).
    #[error("PAX global headers exceed the limit of {0}")]
    TooManyGlobals(String),
    /// More extended attributes on one entry than the limit.
    #[error("more than {0} extended attributes on one entry")]
    TooManyXattrs(usize),
    /// A size (data, file or sparse) above 2^63-1 bytes, which no filesystem stores and GNU
    /// tar and bsdtar refuse.
    #[error("size {0} is larger than 2^63-1 bytes")]
    SizeTooLarge(u64),
    /// A uid or gid that does not fit in 32 bits.
    #[error("uid/gid {0} does not fit in 32 bits")]
    IdTooLarge(u64),
    /// A malformed or inconsistent sparse map.
    #[error("invalid sparse map: {0}")]
    BadSparse(&'static str),
    /// A header type this reader refuses (multi-volume archives).
    #[error("unsupported tar entry type {0:?}")]
    UnsupportedType(char),
    /// The underlying reader failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A tar parsing error: where it happened and, when known, which entry it concerns.
#[derive(Debug, thiserror::Error)]
#[error("tar: {}{kind} (at byte {offset})", entry.as_ref().map(|e| format!("entry {e:?}: ")).unwrap_or_default())]
pub struct TarError {
    /// Offset in the uncompressed stream.
    pub offset: u64,
    /// The entry's path, lossily decoded, when the error concerns one entry.
    pub entry: Option<String>,
    /// What went wrong.
    #[source]
    pub kind: TarErrorKind,
}

/// The type of a tar entry after extension headers are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Regular file (possibly sparse: see [`Entry::sparse`]).
    Regular,
    /// Hard link to an earlier path ([`Entry::link`]).
    Hardlink,
    /// Symbolic link ([`Entry::link`]).
    Symlink,
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Directory.
    Directory,
    /// FIFO.
    Fifo,
}

/// One archive member.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Normalised path: relative, `/`-separated, no `.` components; empty for the root.
    pub path: Vec<u8>,
    /// Entry type.
    pub kind: EntryKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time (PAX fractional mtime).
    pub mtime_nsec: u32,
    /// Bytes of data stored in the archive for this entry.
    pub size: u64,
    /// Logical file size (differs from `size` for sparse files).
    pub file_size: u64,
    /// Symlink target (raw) or hardlink target (normalised path).
    pub link: Vec<u8>,
    /// Device major number.
    pub devmajor: u32,
    /// Device minor number.
    pub devminor: u32,
    /// Extended attributes, full names, binary values, in archive order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For sparse files: the data segments `(offset, length)` in file order. Their bytes are
    /// stored back to back as the entry data.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// Offset of the entry's first header block (including extension headers).
    pub header_offset: u64,
    /// Offset of the entry's data in the uncompressed stream (always a multiple of 512).
    pub data_offset: u64,
}

impl Entry {
    /// An entry with the given path and kind, mode 0644 (0755 for directories), owned by root,
    /// mtime 0 and no data.
    pub fn new(path: impl Into<Vec<u8>>, kind: EntryKind) -> Self {
        Entry {
            path: path.into(),
            kind,
            mode: if kind == EntryKind::Directory {
                0o755
            } else {
                0o644
            },
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            file_size: 0,
            link: Vec::new(),
            devmajor: 0,
            devminor: 0,
            xattrs: Vec::new(),
            sparse: None,
            header_offset: 0,
            data_offset: 0,
        }
    }

    /// The path for messages.
    pub fn display_path(&self) -> String {
        lossy(&self.path)
    }
}

fn lossy(p: &[u8]) -> String {
    if p.is_empty() {
        "/".into()
    } else {
        String::from_utf8_lossy(p).into_owned()
    }
}

/// A path for an error message or a log line: hostile paths can be megabytes long, so long
/// ones keep their start and end only.
pub fn path_for_message(p: &[u8]) -> String {
    const KEEP: usize = 200;
    if p.len() <= 2 * KEEP {
        return lossy(p);
    }
    format!(
        "{}...({} bytes)...{}",
        String::from_utf8_lossy(&p[..KEEP]),
        p.len() - 2 * KEEP,
        String::from_utf8_lossy(&p[p.len() - KEEP..])
    )
}

/// Bounds on what the reader will hold in memory for one entry, and on the work one entry
/// may cost: every breach is an error naming the entry, found in time linear in the input.
#[derive(Debug, Clone, Copy)]
pub struct TarLimits {
    /// Largest PAX or GNU long-name payload, and largest sum of the extension headers of one
    /// member (chained `x`, `L` and `K` headers).
    pub max_extension_header: u64,
    /// Largest number of sparse segments in one file.
    pub max_sparse_segments: usize,
    /// Largest number of distinct PAX global records in force at once (each applies to every
    /// later entry, so their number multiplies the work per entry). Their bytes count against
    /// `max_extension_header` too.
    pub max_global_records: usize,
    /// Largest number of extended attributes on one entry.
    pub max_xattrs: usize,
}

impl Default for TarLimits {
    fn default() -> Self {
        TarLimits {
            max_extension_header: 16 << 20,
            max_sparse_segments: 1 << 20,
            // Real archives carry a handful (git archive: one comment).
            max_global_records: 256,
            // Linux lists at most 64 KiB of xattr names per file, a few thousand names.
            max_xattrs: 4096,
        }
    }
}

/// Largest size any tar field may give (data, file or sparse size): what `off_t` holds.
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Normalise an archive path. Returns the empty path for the root (`.`, `./`).
pub fn normalize_path(p: &[u8]) -> Result<Vec<u8>, TarErrorKind> {
    if p.first() == Some(&b'/') {
        return Err(TarErrorKind::AbsolutePath);
    }
    if p.contains(&0) {
        return Err(TarErrorKind::NulInName);
    }
    let mut out = Vec::with_capacity(p.len());
    for comp in p.split(|&c| c == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err(TarErrorKind::DotDot),
            c if c.len() > crate::format::NAME_MAX => return Err(TarErrorKind::NameTooLong),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// Pull-based streaming tar reader.
#[derive(Debug)]
pub struct TarReader<R> {
    src: R,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    /// Absolute stream offset of `buf[pos]`.
    offset: u64,
    src_eof: bool,
    /// Data bytes of the current entry not yet consumed.
    remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    /// PAX global records in force, by key (a later record of a key replaces the earlier one).
    global: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    /// Bytes of keys and values in `global`.
    global_bytes: u64,
    limits: TarLimits,
    current: Option<String>,
    finished: bool,
    /// Moves the source forward without reading (regular files), when available.
    skipper: Option<fn(&mut R, u64) -> io::Result<()>>,
}

/// A regular file read at a tracked position, so a [`TarReader`] over it can skip data
/// without reading it, and callers can hand data on as ranges of the file.
#[derive(Debug)]
pub struct FileInput<'a> {
    file: &'a std::fs::File,
    pos: u64,
    len: Option<u64>,
}

impl<'a> FileInput<'a> {
    /// Read `file` from its start.
    pub fn new(file: &'a std::fs::File) -> Self {
        FileInput {
            file,
            pos: 0,
            len: None,
        }
    }

    /// Move forward `n` bytes; an error if that passes the end of the file.
    fn skip(&mut self, n: u64) -> io::Result<()> {
        let len = match self.len {
            Some(l) => l,
            None => *self.len.insert(self.file.metadata()?.len()),
        };
        if self.pos.checked_add(n).is_none_or(|e| e > len) {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        self.pos += n;
        Ok(())
    }
    /// The file.
    pub fn file(&self) -> &'a std::fs::File {
        self.file
    }
}

impl Read for FileInput<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<'a> TarReader<FileInput<'a>> {
    /// A reader over a regular file that skips entry data it is not asked for without
    /// reading it, and lets callers transfer data directly ([`Self::unbuffered`]).
    pub fn from_file(file: &'a std::fs::File) -> Self {
        let mut r = TarReader::with_buffer(FileInput::new(file), TarLimits::default(), 64 << 10);
        r.skipper = Some(|f: &mut FileInput<'_>, n| f.skip(n));
        r
    }
}

impl<R: Read> TarReader<R> {
    /// A reader with a 1 MiB buffer.
    pub fn new(src: R) -> Self {
        Self::with_limits(src, TarLimits::default())
    }

    /// A reader with explicit limits.
    pub fn with_limits(src: R, limits: TarLimits) -> Self {
        Self::with_buffer(src, limits, 1 << 20)
    }

    fn with_buffer(src: R, limits: TarLimits, size: usize) -> Self {
        TarReader {
            src,
            buf: vec![0u8; size].into_boxed_slice(),
            pos: 0,
            end: 0,
            offset: 0,
            src_eof: false,
            remaining: 0,
            padding: 0,
            global: Default::default(),
            global_bytes: 0,
            limits,
            current: None,
            finished: false,
            skipper: None,
        }
    }

    /// Bytes of the stream consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The wrapped reader.
    pub fn get_ref(&self) -> &R {
        &self.src
    }

    /// The wrapped reader, mutably. Reading from it directly desynchronises the parser.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.src
    }

    fn err(&self, kind: TarErrorKind) -> TarError {
        TarError {
            offset: self.offset,
            entry: self.current.clone(),
            kind,
        }
    }

    fn err_entry(&self, entry: &[u8], kind: TarErrorKind) -> TarError {
        TarError {
            offset: self.offset,
            entry: Some(path_for_message(entry)),
            kind,
        }
    }

    /// Make at least `min` bytes available in the buffer. Returns the number available, which
    /// is less than `min` only at the end of the stream.
    fn fill(&mut self, min: usize) -> Result<usize, TarError> {
        debug_assert!(min <= self.buf.len());
        if self.end - self.pos >= min || self.src_eof {
            return Ok(self.end - self.pos);
        }
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        while self.end < min {
            match self.src.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.src_eof = true;
                    break;
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(TarErrorKind::Io(e))),
            }
        }
        Ok(self.end - self.pos)
    }

    fn advance(&mut self, n: usize) {
        self.pos += n;
        self.offset += n as u64;
    }

    /// Skip `n` bytes of the stream.
    fn skip(&mut self, mut n: u64) -> Result<(), TarError> {
        while n > 0 {
            let avail = self.end - self.pos;
            if avail == 0 {
                if let Some(skip) = self.skipper {
                    skip(&mut self.src, n).map_err(|e| self.err(io_kind(e)))?;
                    self.offset += n;
                    return Ok(());
                }
                self.pos = 0;
                self.end = 0;
                if self.fill(1)? == 0 {
                    return Err(self.err(TarErrorKind::Truncated));
                }
                continue;
            }
            let k = (avail as u64).min(n) as usize;
            self.advance(k);
            n -= k as u64;
        }
        Ok(())
    }

    /// Read `n` bytes (a bounded extension payload) plus its padding.
    fn read_payload(&mut self, n: u64, entry: &[u8]) -> Result<Vec<u8>, TarError> {
        self.read_payload_and(n, pad(n), entry)
    }

    /// `n` bytes of an extension record, then skip `padding`.
    fn read_payload_and(
        &mut self,
        n: u64,
        padding: u64,
        entry: &[u8],
    ) -> Result<Vec<u8>, TarError> {
        if n > self.limits.max_extension_header {
            return Err(self.err_entry(entry, TarErrorKind::HeaderTooLarge(n)));
        }
        let mut out = Vec::with_capacity(n as usize);
        let mut left = n as usize;
        while left > 0 {
            let avail = self.fill(1)?;
            if avail == 0 {
                return Err(self.err_entry(entry, TarErrorKind::Truncated));
            }
            let k = avail.min(left);
            out.extend_from_slice(&self.buf[self.pos..self.pos + k]);
            self.advance(k);
            left -= k;
        }
        self.skip(padding)?;
        Ok(out)
    }

    /// A GNU `L`/`K` record: a C string. GNU tar reads it from the padded blocks, so a record
    /// without a NUL within its size would name one file for GNU tar and another for us
    /// unless its padding starts with a zero.
    fn read_long_name(&mut self, n: u64, entry: &[u8]) -> Result<Vec<u8>, TarError> {
        let padding = pad(n) as usize;
        let mut data = self.read_payload_and(n, 0, entry)?;
        if let Some(end) = data.iter().position(|&c| c == 0) {
            data.truncate(end);
        } else if padding > 0 {
            if self.fill(1)? == 0 {
                return Err(self.err_entry(entry, TarErrorKind::Truncated));
            }
            if self.buf[self.pos] != 0 {
                return Err(self.err_entry(entry, TarErrorKind::UnterminatedLongName));
            }
        }
        self.skip(padding as u64)?;
        Ok(data)
    }

    fn read_block(&mut self) -> Result<Option<[u8; BLOCK]>, TarError> {
        let avail = self.fill(BLOCK)?;
        if avail == 0 {
            return Ok(None);
        }
        if avail < BLOCK {
            return Err(self.err(TarErrorKind::Truncated));
        }
        let mut b = [0u8; BLOCK];
        b.copy_from_slice(&self.buf[self.pos..self.pos + BLOCK]);
        self.advance(BLOCK);
        Ok(Some(b))
    }

    /// Advance to the next entry, skipping any unread data of the current one. `None` at the
    /// end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, TarError> {
        if self.finished {
            return Ok(None);
        }
        let skip = self.remaining + self.padding;
        self.remaining = 0;
        self.padding = 0;
        self.skip(skip)?;
        self.current = None;
        loop {
            if let Some(e) = self.next_member()? {
                return Ok(Some(e));
            }
            if self.finished {
                return Ok(None);
            }
            // A member of an unknown type was skipped; go on with the next one.
            let skip = self.remaining + self.padding;
            self.remaining = 0;
            self.padding = 0;
            self.skip(skip)?;
            self.current = None;
        }
    }

    /// Read headers up to the next member. `None` at the end of the archive, or when the
    /// member was of an unknown type (then `finished` is false and its data is pending).
    fn next_member(&mut self) -> Result<Option<Entry>, TarError> {
        // The payloads of this member's `x` headers, checked, kept whole: their records are
        // read (borrowed) once, when the entry is finished.
        let mut local: Vec<Vec<u8>> = Vec::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut header_offset: Option<u64> = None;
        // Extension bytes read for this member so far: chained headers share one budget.
        let mut ext_bytes: u64 = 0;
        loop {
            let at = self.offset;
            let Some(block) = self.read_block()? else {
                if header_offset.is_some() {
                    return Err(self.err(TarErrorKind::Truncated));
                }
                // No end-of-archive marker: tolerated, as GNU tar and mkfs.erofs do.
                tracing::warn!(
                    offset = at,
                    "tar stream ends without an end-of-archive marker"
                );
                self.finished = true;
                return Ok(None);
            };
            if header::is_zero_block(&block) {
                if header_offset.is_some() {
                    return Err(self.err(TarErrorKind::Truncated));
                }
                // The end marker is two zero blocks; a lone one at the end is accepted.
                if self.fill(BLOCK)? >= BLOCK {
                    self.advance(BLOCK);
                }
                self.finished = true;
                return Ok(None);
            }
            header_offset.get_or_insert(at);
            let name_hint = long_name.clone().unwrap_or_else(|| {
                let n = &block[..100];
                n[..n.iter().position(|&c| c == 0).unwrap_or(100)].to_vec()
            });
            match header::checksum_ok(&block) {
                Ok(true) => {}
                Ok(false) | Err(_) => {
                    return Err(self.err_entry(&name_hint, TarErrorKind::BadChecksum));
                }
            }
            let h = header::parse(&block).map_err(|k| self.err_entry(&name_hint, k))?;
            if h.size > MAX_SIZE {
                return Err(self.err_entry(&name_hint, TarErrorKind::SizeTooLarge(h.size)));
            }
            if matches!(h.typeflag, b'x' | b'X' | b'g' | b'L' | b'K') {
                ext_bytes = ext_bytes.saturating_add(h.size);
                if ext_bytes > self.limits.max_extension_header {
                    return Err(self.err_entry(&name_hint, TarErrorKind::HeaderTooLarge(ext_bytes)));
                }
            }
            match h.typeflag {
                b'x' | b'X' => {
                    let data = self.read_payload(h.size, &name_hint)?;
                    pax::check_records(&data).map_err(|k| self.err_entry(&name_hint, k))?;
                    local.push(data);
                }
                b'g' => {
                    let data = self.read_payload(h.size, &name_hint)?;
                    pax::check_records(&data).map_err(|k| self.err_entry(&name_hint, k))?;
                    for (k, v) in pax::records(&data).flatten() {
                        if let Some(old) = self.global.remove(k) {
                            self.global_bytes -= (k.len() + old.len()) as u64;
                        }
                        // An empty value deletes the record.
                        if !v.is_empty() {
                            self.global_bytes += (k.len() + v.len()) as u64;
                            self.global.insert(k.to_vec(), v.to_vec());
                        }
                        // Checked per record: the map never holds more than the limit.
                        if self.global.len() > self.limits.max_global_records {
                            break;
                        }
                    }
                    if self.global.len() > self.limits.max_global_records {
                        return Err(self.err_entry(
                            &name_hint,
                            TarErrorKind::TooManyGlobals(format!(
                                "{} records",
                                self.limits.max_global_records
                            )),
                        ));
                    }
                    if self.global_bytes > self.limits.max_extension_header {
                        return Err(self.err_entry(
                            &name_hint,
                            TarErrorKind::TooManyGlobals(format!(
                                "{} bytes",
                                self.limits.max_extension_header
                            )),
                        ));
                    }
                    // A global header describes no file; it may stand alone between entries.
                    if long_name.is_none() && long_link.is_none() && local.is_empty() {
                        header_offset = None;
                    }
                }
                b'L' => long_name = Some(self.read_long_name(h.size, &name_hint)?),
                b'K' => long_link = Some(self.read_long_name(h.size, &name_hint)?),
                b'V' => {
                    self.skip(h.size + pad(h.size))?;
                    header_offset = None;
                }
                b'M' => {
                    return Err(self.err_entry(&name_hint, TarErrorKind::UnsupportedType('M')));
                }
                _ => {
                    let header_offset = header_offset.unwrap_or(at);
                    return self.finish_entry(h, local, long_name, long_link, header_offset);
                }
            }
        }
    }

    fn finish_entry(
        &mut self,
        h: header::RawHeader,
        local: Vec<Vec<u8>>,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        header_offset: u64,
    ) -> Result<Option<Entry>, TarError> {
        let mut raw_name = long_name.unwrap_or(h.name);
        let mut raw_link = long_link.unwrap_or(h.linkname);
        let mut size = h.size;
        let mut uid = h.uid;
        let mut gid = h.gid;
        let mut mtime = (h.mtime, 0u32);
        let max_xattrs = self.limits.max_xattrs;
        let mut xattrs = LastOfEach::default();
        let mut libarchive_xattrs = LastOfEach::default();
        let mut devmajor = h.devmajor;
        let mut devminor = h.devminor;
        let mut sparse = SparsePax::default();

        // Global records first, then local ones override them. Borrowed, not cloned: the
        // globals apply to every entry.
        // (The local payloads were checked when they were read.)
        let records = self
            .global
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .chain(local.iter().flat_map(|d| pax::records(d).flatten()));
        let name_for_err = raw_name.clone();
        let too_many = || self.err_entry(&name_for_err, TarErrorKind::TooManyXattrs(max_xattrs));
        for (k, v) in records {
            let e = |kind| self.err_entry(&name_for_err, kind);
            match k {
                b"path" => raw_name = v.to_vec(),
                b"linkpath" => raw_link = v.to_vec(),
                b"size" => size = pax::parse_u64(v, "size").map_err(e)?,
                b"uid" => uid = pax::parse_u64(v, "uid").map_err(e)?,
                b"gid" => gid = pax::parse_u64(v, "gid").map_err(e)?,
                b"mtime" => mtime = pax::parse_time(v).map_err(e)?,
                b"SCHILY.devmajor" => devmajor = pax::parse_u64(v, "devmajor").map_err(e)?,
                b"SCHILY.devminor" => devminor = pax::parse_u64(v, "devminor").map_err(e)?,
                b"GNU.sparse.major" => sparse.major = Some(pax::parse_u64(v, "sparse").map_err(e)?),
                b"GNU.sparse.minor" => sparse.minor = Some(pax::parse_u64(v, "sparse").map_err(e)?),
                b"GNU.sparse.name" => sparse.name = Some(v.to_vec()),
                b"GNU.sparse.realsize" | b"GNU.sparse.size" => {
                    sparse.realsize = Some(pax::parse_u64(v, "sparse size").map_err(e)?)
                }
                b"GNU.sparse.map" => sparse.map01 = Some(v.to_vec()),
                b"GNU.sparse.offset" => sparse
                    .offsets
                    .push(pax::parse_u64(v, "sparse offset").map_err(e)?),
                b"GNU.sparse.numbytes" => sparse
                    .lengths
                    .push(pax::parse_u64(v, "sparse numbytes").map_err(e)?),
                _ => {
                    if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                        if !xattrs.put(name.to_vec(), v.to_vec(), max_xattrs) {
                            return Err(too_many());
                        }
                    } else if let Some(name) = k.strip_prefix(b"LIBARCHIVE.xattr.") {
                        let name = pax::url_decode(name).map_err(e)?;
                        let value = pax::base64_decode(v).map_err(e)?;
                        if !libarchive_xattrs.put(name, value, max_xattrs) {
                            return Err(too_many());
                        }
                    }
                    // Others (uname, gname, atime, ctime, SCHILY.acl.*, comment, charset)
                    // carry nothing EROFS stores.
                }
            }
        }
        // libarchive writes each xattr twice: LIBARCHIVE.xattr (exact, %-encoded name and
        // base64 value) and SCHILY.xattr (with the name %-encoded too). The former is exact.
        if !libarchive_xattrs.is_empty() {
            xattrs = libarchive_xattrs;
        }
        let xattrs = xattrs.into_vec();
        if size > MAX_SIZE {
            return Err(self.err_entry(&name_for_err, TarErrorKind::SizeTooLarge(size)));
        }
        if let Some(n) = sparse.name.take() {
            raw_name = n;
        }
        let is_dir_name = raw_name.last() == Some(&b'/');
        let path = normalize_path(&raw_name).map_err(|k| self.err_entry(&raw_name, k))?;
        self.current = Some(path_for_message(&path));
        let uid = u32::try_from(uid).map_err(|_| self.err(TarErrorKind::IdTooLarge(uid)))?;
        let gid = u32::try_from(gid).map_err(|_| self.err(TarErrorKind::IdTooLarge(gid)))?;
        let devmajor =
            u32::try_from(devmajor).map_err(|_| self.err(TarErrorKind::BadNumber("devmajor")))?;
        let devminor =
            u32::try_from(devminor).map_err(|_| self.err(TarErrorKind::BadNumber("devminor")))?;

        let kind = match h.typeflag {
            b'0' | 0 | b'7' if is_dir_name => EntryKind::Directory,
            b'0' | 0 | b'7' | b'S' => EntryKind::Regular,
            b'1' => EntryKind::Hardlink,
            b'2' => EntryKind::Symlink,
            b'3' => EntryKind::Char,
            b'4' => EntryKind::Block,
            b'5' | b'D' => EntryKind::Directory,
            b'6' => EntryKind::Fifo,
            other => {
                // Vendor extensions describe nothing a filesystem holds; skip them whole.
                tracing::warn!(entry = %path_for_message(&path), typeflag = %(other as char), "skipping tar entry of unknown type");
                self.remaining = size;
                self.padding = pad(size);
                return Ok(None);
            }
        };

        let link = match kind {
            EntryKind::Hardlink => {
                if raw_link.is_empty() {
                    return Err(self.err(TarErrorKind::EmptyLinkTarget));
                }
                normalize_path(&raw_link).map_err(|k| self.err(k))?
            }
            EntryKind::Symlink => {
                if raw_link.is_empty() {
                    return Err(self.err(TarErrorKind::EmptyLinkTarget));
                }
                if raw_link.contains(&0) {
                    return Err(self.err(TarErrorKind::NulInName));
                }
                if raw_link.len() > 4095 {
                    return Err(self.err(TarErrorKind::LinkTooLong));
                }
                raw_link
            }
            _ => Vec::new(),
        };

        let mut entry = Entry {
            path,
            kind,
            mode: h.mode,
            uid,
            gid,
            mtime: mtime.0,
            mtime_nsec: mtime.1,
            size,
            file_size: size,
            link,
            devmajor,
            devminor,
            xattrs,
            sparse: None,
            header_offset,
            data_offset: 0,
        };

        // Old GNU sparse: map in the header and in extension blocks before the data.
        if let Some(gs) = h.gnu_sparse {
            let mut map = gs.entries;
            let mut more = gs.extended;
            while more {
                let Some(b) = self.read_block()? else {
                    return Err(self.err(TarErrorKind::Truncated));
                };
                let (entries, m) = header::parse_gnu_sparse_ext(&b).map_err(|k| self.err(k))?;
                map.extend(entries);
                if map.len() > self.limits.max_sparse_segments {
                    return Err(self.err(TarErrorKind::BadSparse("too many segments")));
                }
                more = m;
            }
            entry.file_size = gs.realsize;
            entry.sparse = Some(map);
        }
        entry.data_offset = self.offset;
        self.remaining = entry.size;
        self.padding = pad(entry.size);

        // PAX sparse formats.
        if kind == EntryKind::Regular
            && (sparse.major.is_some() || sparse.map01.is_some() || !sparse.offsets.is_empty())
        {
            let realsize = sparse
                .realsize
                .ok_or_else(|| self.err(TarErrorKind::BadSparse("no real size")))?;
            let map = match (sparse.major, sparse.minor) {
                (Some(1), Some(0)) => self.read_sparse_map_10()?,
                _ => {
                    if let Some(m) = sparse.map01 {
                        parse_map_01(&m, self.limits.max_sparse_segments)
                            .map_err(|k| self.err(k))?
                    } else {
                        if sparse.offsets.len() != sparse.lengths.len() {
                            return Err(
                                self.err(TarErrorKind::BadSparse("offset/numbytes count mismatch"))
                            );
                        }
                        sparse.offsets.into_iter().zip(sparse.lengths).collect()
                    }
                }
            };
            entry.file_size = realsize;
            entry.size = self.remaining;
            entry.data_offset = self.offset;
            entry.sparse = Some(map);
        }
        if let Some(map) = &entry.sparse {
            validate_sparse(map, entry.size, entry.file_size).map_err(|k| self.err(k))?;
        }
        if !matches!(kind, EntryKind::Regular) {
            // Data of links, dirs and devices carries nothing; it is skipped on the next call.
            entry.size = 0;
            entry.file_size = 0;
        }
        Ok(Some(entry))
    }

    /// PAX sparse 1.0: the map is at the start of the data, as decimal lines padded to 512.
    fn read_sparse_map_10(&mut self) -> Result<Vec<(u64, u64)>, TarError> {
        let mut consumed: u64 = 0;
        let mut read_line = |this: &mut Self| -> Result<u64, TarError> {
            let mut digits = Vec::new();
            loop {
                if this.remaining == 0 || digits.len() > 20 {
                    return Err(this.err(TarErrorKind::BadSparse("bad 1.0 map")));
                }
                if this.fill(1)? == 0 {
                    return Err(this.err(TarErrorKind::Truncated));
                }
                let c = this.buf[this.pos];
                this.advance(1);
                this.remaining -= 1;
                consumed += 1;
                if c == b'\n' {
                    break;
                }
                if !c.is_ascii_digit() {
                    return Err(this.err(TarErrorKind::BadSparse("bad 1.0 map")));
                }
                digits.push(c);
            }
            std::str::from_utf8(&digits)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| this.err(TarErrorKind::BadSparse("bad 1.0 map")))
        };
        let count = read_line(self)?;
        if count as usize > self.limits.max_sparse_segments {
            return Err(self.err(TarErrorKind::BadSparse("too many segments")));
        }
        let mut map = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let off = read_line(self)?;
            let len = read_line(self)?;
            map.push((off, len));
        }
        let p = pad(consumed);
        if p > self.remaining {
            return Err(self.err(TarErrorKind::BadSparse("bad 1.0 map")));
        }
        self.skip(p)?;
        self.remaining -= p;
        Ok(map)
    }

    /// The next chunk of the current entry's stored data; empty when it has all been read.
    pub fn data_chunk(&mut self) -> Result<&[u8], TarError> {
        if self.remaining == 0 {
            return Ok(&[]);
        }
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
            if self.fill(1)? == 0 {
                return Err(self.err(TarErrorKind::Truncated));
            }
        }
        let n = ((self.end - self.pos) as u64).min(self.remaining) as usize;
        Ok(&self.buf[self.pos..self.pos + n])
    }

    /// Mark `n` bytes returned by [`Self::data_chunk`] as used.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n as u64 <= self.remaining && self.pos + n <= self.end);
        self.advance(n);
        self.remaining -= n as u64;
    }

    /// Read the current entry's data into `out` (for small payloads); returns bytes read.
    pub fn read_data(&mut self, out: &mut [u8]) -> Result<usize, TarError> {
        let mut done = 0;
        while done < out.len() {
            let chunk = self.data_chunk()?;
            if chunk.is_empty() {
                break;
            }
            let k = chunk.len().min(out.len() - done);
            out[done..done + k].copy_from_slice(&chunk[..k]);
            self.consume(k);
            done += k;
        }
        Ok(done)
    }

    /// Data bytes of the current entry not yet read.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// For readers that can skip ([`TarReader::from_file`]): when the buffer holds none of the
    /// current entry's remaining data, the stream offset and length of that data, so a caller
    /// can copy it directly from the file and then call [`Self::skip_unbuffered`].
    pub fn unbuffered(&self) -> Option<(u64, u64)> {
        (self.skipper.is_some() && self.pos == self.end && self.remaining > 0)
            .then_some((self.offset, self.remaining))
    }

    /// Mark `n` bytes of the current entry's data, obtained directly from the file, as read.
    pub fn skip_unbuffered(&mut self, n: u64) -> Result<(), TarError> {
        debug_assert!(self.pos == self.end && n <= self.remaining);
        let skip = self
            .skipper
            .ok_or_else(|| self.err(TarErrorKind::Io(io::Error::other("source cannot skip"))))?;
        skip(&mut self.src, n).map_err(|e| self.err(io_kind(e)))?;
        self.offset += n;
        self.remaining -= n;
        Ok(())
    }

    /// Read the rest of the stream after the end of the archive (so a hash or tee sees every
    /// byte). Returns the number of bytes after the end-of-archive marker.
    pub fn drain(&mut self) -> Result<u64, TarError> {
        let mut n = (self.end - self.pos) as u64;
        self.offset += n;
        self.pos = 0;
        self.end = 0;
        while !self.src_eof {
            match self.src.read(&mut self.buf) {
                Ok(0) => self.src_eof = true,
                Ok(k) => {
                    n += k as u64;
                    self.offset += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(TarErrorKind::Io(e))),
            }
        }
        Ok(n)
    }

    /// Whether the end-of-archive marker (or the end of the stream) was reached.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

#[derive(Default)]
struct SparsePax {
    major: Option<u64>,
    minor: Option<u64>,
    name: Option<Vec<u8>>,
    realsize: Option<u64>,
    map01: Option<Vec<u8>>,
    offsets: Vec<u64>,
    lengths: Vec<u64>,
}

fn parse_map_01(v: &[u8], max: usize) -> Result<Vec<(u64, u64)>, TarErrorKind> {
    let nums: Vec<&[u8]> = v.split(|&c| c == b',').collect();
    if !nums.len().is_multiple_of(2) || nums.len() / 2 > max {
        return Err(TarErrorKind::BadSparse("bad 0.1 map"));
    }
    let mut out = Vec::with_capacity(nums.len() / 2);
    for pair in nums.chunks(2) {
        out.push((
            pax::parse_u64(pair[0], "sparse map")?,
            pax::parse_u64(pair[1], "sparse map")?,
        ));
    }
    Ok(out)
}

/// Segments must be in order, not overlap, lie inside the file and add up to the stored size.
fn validate_sparse(map: &[(u64, u64)], stored: u64, file_size: u64) -> Result<(), TarErrorKind> {
    if file_size > MAX_SIZE {
        return Err(TarErrorKind::SizeTooLarge(file_size));
    }
    let mut end = 0u64;
    let mut total = 0u64;
    for &(off, len) in map {
        if off < end {
            return Err(TarErrorKind::BadSparse(
                "segments overlap or are out of order",
            ));
        }
        end = off
            .checked_add(len)
            .ok_or(TarErrorKind::BadSparse("segment overflows"))?;
        if end > file_size {
            return Err(TarErrorKind::BadSparse("segment beyond the file size"));
        }
        total += len;
    }
    if total != stored {
        return Err(TarErrorKind::BadSparse(
            "segments do not add up to the stored size",
        ));
    }
    Ok(())
}

/// Xattrs by name as records arrive, the last value of each name kept, in the order of
/// the last occurrences (a later record of a name overrides an earlier one, as tar does).
/// Linear in the records, and refusing a new name past the limit at once, so a header of
/// many tiny records never materialises more than `max` names.
#[derive(Default)]
struct LastOfEach {
    slots: Vec<Option<(Vec<u8>, Vec<u8>)>>,
    at: HashMap<Vec<u8>, usize>,
}

impl LastOfEach {
    /// Record `name = value`; false when `name` is new and `max` names are held already.
    fn put(&mut self, name: Vec<u8>, value: Vec<u8>, max: usize) -> bool {
        match self.at.get_mut(&name) {
            Some(i) => {
                self.slots[*i] = None;
                *i = self.slots.len();
            }
            None => {
                if self.at.len() >= max {
                    return false;
                }
                self.at.insert(name.clone(), self.slots.len());
            }
        }
        self.slots.push(Some((name, value)));
        // Overridden slots are dropped once they outnumber the live ones (amortised linear),
        // so a name repeated a million times holds one slot, not a million.
        if self.slots.len() > 2 * self.at.len() + 64 {
            self.slots.retain(Option::is_some);
            for (i, (n, _)) in self.slots.iter().flatten().enumerate() {
                if let Some(at) = self.at.get_mut(n) {
                    *at = i;
                }
            }
        }
        true
    }

    fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    fn into_vec(self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.slots.into_iter().flatten().collect()
    }
}

fn io_kind(e: io::Error) -> TarErrorKind {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        TarErrorKind::Truncated
    } else {
        TarErrorKind::Io(e)
    }
}

/// Padding after `n` bytes of data.
pub fn pad(n: u64) -> u64 {
    (TAR_BLOCK - n % TAR_BLOCK) % TAR_BLOCK
}

#[cfg(test)]
mod tests;
