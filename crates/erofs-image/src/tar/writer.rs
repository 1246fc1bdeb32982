//! A small tar writer (ustar headers plus PAX records where ustar cannot say it).
//!
//! Used to produce layer diffs and test archives. It writes what the reader reads back exactly:
//! nanosecond mtimes, 32-bit ids, long names and link targets, and binary xattrs travel in PAX
//! records (`SCHILY.xattr.*`).

use std::io::{self, Read, Write};

use super::header::BLOCK;
use super::{Entry, EntryKind, pad};

/// Streaming tar writer.
#[derive(Debug)]
pub struct TarWriter<W: Write> {
    out: W,
    written: u64,
}

const USTAR_MAX_OCTAL_8: u64 = 0o7777777;
const USTAR_MAX_OCTAL_12: u64 = 0o77777777777;

impl<W: Write> TarWriter<W> {
    /// Wrap a sink.
    pub fn new(out: W) -> Self {
        TarWriter { out, written: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad_to_block(&mut self, n: u64) -> io::Result<()> {
        let p = pad(n) as usize;
        if p > 0 {
            self.put(&[0u8; BLOCK][..p])?;
        }
        Ok(())
    }

    /// Append an entry. For regular files, exactly `entry.size` bytes are copied from `data`;
    /// other kinds take no data. `entry.path` is written as given (a trailing `/` is added for
    /// directories).
    pub fn append(&mut self, entry: &Entry, data: &mut dyn Read) -> io::Result<()> {
        let size = if entry.kind == EntryKind::Regular {
            entry.size
        } else {
            0
        };
        let mut name = entry.path.clone();
        if entry.kind == EntryKind::Directory && name.last() != Some(&b'/') {
            name.push(b'/');
        }
        let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if name.len() > 100 {
            records.push((b"path".to_vec(), name.clone()));
        }
        if entry.link.len() > 100 {
            records.push((b"linkpath".to_vec(), entry.link.clone()));
        }
        if entry.uid as u64 > USTAR_MAX_OCTAL_8 {
            records.push((b"uid".to_vec(), entry.uid.to_string().into_bytes()));
        }
        if entry.gid as u64 > USTAR_MAX_OCTAL_8 {
            records.push((b"gid".to_vec(), entry.gid.to_string().into_bytes()));
        }
        if size > USTAR_MAX_OCTAL_12 {
            records.push((b"size".to_vec(), size.to_string().into_bytes()));
        }
        if entry.mtime_nsec != 0 || entry.mtime < 0 || entry.mtime as u64 > USTAR_MAX_OCTAL_12 {
            records.push((
                b"mtime".to_vec(),
                format_time(entry.mtime, entry.mtime_nsec),
            ));
        }
        for (k, v) in &entry.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            records.push((key, v.clone()));
        }
        if !records.is_empty() {
            let payload = encode_records(&records);
            let mut pax_name = b"PaxHeaders/".to_vec();
            let base = name
                .rsplit(|&c| c == b'/')
                .find(|c| !c.is_empty())
                .unwrap_or(b"x");
            pax_name.extend_from_slice(&base[..base.len().min(80)]);
            let h = ustar_header(
                &pax_name,
                b'x',
                0o644,
                0,
                0,
                payload.len() as u64,
                0,
                b"",
                0,
                0,
            );
            self.put(&h)?;
            self.put(&payload)?;
            self.pad_to_block(payload.len() as u64)?;
        }
        let typeflag = match entry.kind {
            EntryKind::Regular => b'0',
            EntryKind::Hardlink => b'1',
            EntryKind::Symlink => b'2',
            EntryKind::Char => b'3',
            EntryKind::Block => b'4',
            EntryKind::Directory => b'5',
            EntryKind::Fifo => b'6',
        };
        let short = |v: &[u8]| -> Vec<u8> { v[..v.len().min(100)].to_vec() };
        let h = ustar_header(
            &short(&name),
            typeflag,
            entry.mode & 0o7777,
            (entry.uid as u64).min(USTAR_MAX_OCTAL_8),
            (entry.gid as u64).min(USTAR_MAX_OCTAL_8),
            size.min(USTAR_MAX_OCTAL_12),
            entry.mtime.clamp(0, USTAR_MAX_OCTAL_12 as i64) as u64,
            &short(&entry.link),
            entry.devmajor,
            entry.devminor,
        );
        self.put(&h)?;
        if size > 0 {
            let mut buf = vec![0u8; 256 * 1024];
            let mut left = size;
            while left > 0 {
                let k = (buf.len() as u64).min(left) as usize;
                let n = data.read(&mut buf[..k])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file data shorter than the size in its header",
                    ));
                }
                self.put(&buf[..n])?;
                left -= n as u64;
            }
            self.pad_to_block(size)?;
        }
        Ok(())
    }

    /// Append an entry whose data is in memory.
    pub fn append_bytes(&mut self, entry: &Entry, data: &[u8]) -> io::Result<()> {
        let mut e = entry.clone();
        if e.kind == EntryKind::Regular {
            e.size = data.len() as u64;
        }
        self.append(&e, &mut &data[..])
    }

    /// Write the end-of-archive marker and return the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.put(&[0u8; BLOCK * 2])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

fn format_time(secs: i64, nsec: u32) -> Vec<u8> {
    // Nanoseconds past a second carry into the seconds (an entry built by a caller need
    // not be normalised; `1e9 - nsec` below must not wrap).
    let secs = secs.saturating_add(i64::from(nsec / 1_000_000_000));
    let nsec = nsec % 1_000_000_000;
    if nsec == 0 {
        return secs.to_string().into_bytes();
    }
    // PAX times are decimal fractions; a negative time with nanoseconds is `-(|s|-1).(1e9-ns)`.
    if secs < 0 {
        let whole = -(secs + 1);
        format!("-{whole}.{:09}", 1_000_000_000 - nsec).into_bytes()
    } else {
        format!("{secs}.{nsec:09}").into_bytes()
    }
}

/// Encode PAX records; each record's length prefix counts itself.
pub(crate) fn encode_records(records: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 3; // ' ', '=', '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(len.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(k);
        out.push(b'=');
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn ustar_header(
    name: &[u8],
    typeflag: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    link: &[u8],
    devmajor: u32,
    devminor: u32,
) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], mode as u64);
    octal(&mut h[108..116], uid);
    octal(&mut h[116..124], gid);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], mtime);
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], devmajor as u64);
    octal(&mut h[337..345], devminor as u64);
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&c| c as u64).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    let s = &s.as_bytes()[s.len() - digits..];
    field[..digits].copy_from_slice(s);
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::format_time;

    #[test]
    fn times_with_nanoseconds_past_a_second_carry() {
        assert_eq!(format_time(5, 0), b"5");
        assert_eq!(format_time(5, 1), b"5.000000001");
        assert_eq!(format_time(-2, 250_000_000), b"-1.750000000");
        assert_eq!(format_time(5, 1_000_000_000), b"6");
        assert_eq!(format_time(0, u32::MAX), b"4.294967295");
        assert_eq!(format_time(-1, 2_147_483_647), b"1.147483647");
        assert_eq!(
            format_time(i64::MAX, u32::MAX),
            b"9223372036854775807.294967295"
        );
    }
}
