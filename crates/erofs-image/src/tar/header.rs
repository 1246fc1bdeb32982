//! One 512-byte tar header block: ustar, GNU and v7 forms.

use super::TarErrorKind;

/// Size of a tar block.
pub const BLOCK: usize = 512;

/// The fields of a header block that we use, still raw.
#[derive(Debug, Clone)]
pub(crate) struct RawHeader {
    pub name: Vec<u8>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub typeflag: u8,
    pub linkname: Vec<u8>,
    pub devmajor: u64,
    pub devminor: u64,
    /// GNU old sparse: the map entries in this header, whether more follow, and the real size.
    pub gnu_sparse: Option<GnuSparseHeader>,
}

#[derive(Debug, Clone)]
pub(crate) struct GnuSparseHeader {
    pub entries: Vec<(u64, u64)>,
    pub extended: bool,
    pub realsize: u64,
}

/// Whether a block is all zeros (end-of-archive marker).
pub(crate) fn is_zero_block(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

fn field(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(n) => &b[..n],
        None => b,
    }
}

/// Parse a numeric field: octal ASCII (leading spaces/zeros, terminated by NUL or space) or
/// GNU base-256 (first byte 0x80 positive, 0xFF negative).
pub(crate) fn parse_number(b: &[u8], what: &'static str) -> Result<i128, TarErrorKind> {
    if let Some(&first) = b.first()
        && first & 0x80 != 0
    {
        // Base-256: two's complement big-endian, with the marker bit folded into the sign.
        let negative = first & 0x40 != 0;
        let mut v: i128 = if negative { -1 } else { 0 };
        let mut bytes = b.to_vec();
        bytes[0] = if negative { first | 0x80 } else { first & 0x7f };
        // A value must fit in 64 bits plus sign; longer runs of significant bytes are refused.
        let significant = bytes
            .iter()
            .skip_while(|&&x| x == if negative { 0xff } else { 0 })
            .count();
        if significant > 8 {
            return Err(TarErrorKind::BadNumber(what));
        }
        for &x in &bytes {
            v = (v << 8) | x as i128;
        }
        return Ok(v);
    }
    let s = field(b);
    let s = trim(s);
    if s.is_empty() {
        return Ok(0);
    }
    let mut v: i128 = 0;
    for &c in s {
        if !(b'0'..=b'7').contains(&c) {
            return Err(TarErrorKind::BadNumber(what));
        }
        v = v * 8 + (c - b'0') as i128;
        if v > u64::MAX as i128 {
            return Err(TarErrorKind::BadNumber(what));
        }
    }
    Ok(v)
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&c| c != b' ').unwrap_or(s.len());
    let end = s.iter().rposition(|&c| c != b' ').map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

fn unsigned(b: &[u8], what: &'static str) -> Result<u64, TarErrorKind> {
    let v = parse_number(b, what)?;
    u64::try_from(v).map_err(|_| TarErrorKind::BadNumber(what))
}

/// Verify the header checksum. Both the unsigned and the historical signed sums are accepted.
pub(crate) fn checksum_ok(b: &[u8]) -> Result<bool, TarErrorKind> {
    let stored = unsigned(&b[148..156], "checksum")?;
    let mut unsigned_sum: u64 = 0;
    let mut signed_sum: i64 = 0;
    for (i, &c) in b.iter().enumerate().take(BLOCK) {
        let c = if (148..156).contains(&i) { b' ' } else { c };
        unsigned_sum += c as u64;
        signed_sum += c as i8 as i64;
    }
    Ok(stored == unsigned_sum || stored as i64 == signed_sum)
}

/// Parse a header block whose checksum has been verified.
pub(crate) fn parse(b: &[u8]) -> Result<RawHeader, TarErrorKind> {
    debug_assert_eq!(b.len(), BLOCK);
    let magic = &b[257..263];
    let version = &b[263..265];
    let is_ustar = magic == b"ustar\0" && version == b"00";
    let is_gnu = magic == b"ustar " && version == b" \0";
    let mut name = field(&b[0..100]).to_vec();
    if is_ustar {
        let prefix = field(&b[345..500]);
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
    }
    let typeflag = b[156];
    let mode = unsigned(&b[100..108], "mode")?;
    let gnu_sparse = if is_gnu && typeflag == b'S' {
        let mut entries = Vec::new();
        for i in 0..4 {
            let o = 386 + i * 24;
            let off = unsigned(&b[o..o + 12], "sparse offset")?;
            let len = unsigned(&b[o + 12..o + 24], "sparse length")?;
            if off == 0 && len == 0 && b[o] == 0 {
                break;
            }
            entries.push((off, len));
        }
        Some(GnuSparseHeader {
            entries,
            extended: b[482] != 0,
            realsize: unsigned(&b[483..495], "sparse real size")?,
        })
    } else {
        None
    };
    let mtime = parse_number(&b[136..148], "mtime")?;
    Ok(RawHeader {
        name,
        mode: (mode & 0o7777) as u32,
        uid: unsigned(&b[108..116], "uid")?,
        gid: unsigned(&b[116..124], "gid")?,
        size: unsigned(&b[124..136], "size")?,
        mtime: i64::try_from(mtime).map_err(|_| TarErrorKind::BadNumber("mtime"))?,
        typeflag,
        linkname: field(&b[157..257]).to_vec(),
        devmajor: if is_ustar || is_gnu {
            unsigned(&b[329..337], "devmajor")?
        } else {
            0
        },
        devminor: if is_ustar || is_gnu {
            unsigned(&b[337..345], "devminor")?
        } else {
            0
        },
        gnu_sparse,
    })
}

/// Parse one GNU sparse extension block (21 entries and a continuation flag).
pub(crate) fn parse_gnu_sparse_ext(b: &[u8]) -> Result<(Vec<(u64, u64)>, bool), TarErrorKind> {
    let mut entries = Vec::new();
    for i in 0..21 {
        let o = i * 24;
        if b[o] == 0 {
            break;
        }
        entries.push((
            unsigned(&b[o..o + 12], "sparse offset")?,
            unsigned(&b[o + 12..o + 24], "sparse length")?,
        ));
    }
    Ok((entries, b[504] != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"0000644\0", "m").unwrap(), 0o644);
        assert_eq!(parse_number(b"  644 \0", "m").unwrap(), 0o644);
        assert_eq!(parse_number(b"\0\0\0\0", "m").unwrap(), 0);
        let mut b256 = [0u8; 12];
        b256[0] = 0x80;
        b256[11] = 0x05;
        b256[10] = 0x01;
        assert_eq!(parse_number(&b256, "s").unwrap(), 0x105);
        let neg = [0xffu8; 12];
        assert_eq!(parse_number(&neg, "s").unwrap(), -1);
        assert!(parse_number(b"12x4", "m").is_err());
        let mut huge = [0xffu8; 12];
        huge[0] = 0x80;
        assert!(parse_number(&huge, "s").is_err());
    }
}
