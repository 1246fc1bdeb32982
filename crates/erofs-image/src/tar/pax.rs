//! PAX extended header records (`"<len> <key>=<value>\n"`).

use super::TarErrorKind;

/// The records of a PAX header payload, in order, borrowed from it: `(key, value)`. Values
/// are raw bytes (xattr values in `SCHILY.xattr.*` are binary). Nothing is copied, so a
/// payload of many tiny records costs no more memory than the payload itself.
pub(crate) fn records(data: &[u8]) -> Records<'_> {
    Records {
        data,
        failed: false,
    }
}

/// See [`records`]. Ends at the payload's end or its NUL padding; after an error, ends.
pub(crate) struct Records<'a> {
    data: &'a [u8],
    failed: bool,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<(&'a [u8], &'a [u8]), TarErrorKind>;

    fn next(&mut self) -> Option<Self::Item> {
        // Trailing NUL padding ends the record list.
        if self.failed || self.data.is_empty() || self.data[0] == 0 {
            return None;
        }
        let r = split_record(self.data);
        match r {
            Ok((k, v, rest)) => {
                self.data = rest;
                Some(Ok((k, v)))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// A record split off a payload: key, value, and the payload after it.
type Split<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// The first record of `data`.
fn split_record(data: &[u8]) -> Result<Split<'_>, TarErrorKind> {
    let sp = data
        .iter()
        .position(|&c| c == b' ')
        .ok_or_else(|| bad("record without length"))?;
    let len_str = &data[..sp];
    if len_str.is_empty() || len_str.len() > 20 || !len_str.iter().all(u8::is_ascii_digit) {
        return Err(bad("bad record length"));
    }
    let len: usize = std::str::from_utf8(len_str)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad record length"))?;
    if len <= sp + 1 || len > data.len() {
        return Err(bad("record length out of range"));
    }
    let record = &data[sp + 1..len];
    if record.last() != Some(&b'\n') {
        return Err(bad("record not terminated by newline"));
    }
    let record = &record[..record.len() - 1];
    let eq = record
        .iter()
        .position(|&c| c == b'=')
        .ok_or_else(|| bad("record without '='"))?;
    Ok((&record[..eq], &record[eq + 1..], &data[len..]))
}

/// Every record of `data`, or its first error (the payload is checked whole before use).
pub(crate) fn check_records(data: &[u8]) -> Result<(), TarErrorKind> {
    records(data).try_for_each(|r| r.map(drop))
}

fn bad(what: &'static str) -> TarErrorKind {
    TarErrorKind::BadPax(what.into())
}

/// Parse a PAX decimal number.
pub(crate) fn parse_u64(v: &[u8], key: &str) -> Result<u64, TarErrorKind> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| TarErrorKind::BadPax(format!("bad {key} value")))
}

/// Parse a PAX time (`[-]seconds[.fraction]`) into seconds and nanoseconds, with the
/// nanoseconds always non-negative (so -1.5 becomes (-2, 500000000)).
pub(crate) fn parse_time(v: &[u8]) -> Result<(i64, u32), TarErrorKind> {
    let s = std::str::from_utf8(v).map_err(|_| bad("time is not text"))?;
    let s = s.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(bad("empty time"));
    }
    if !int.bytes().all(|c| c.is_ascii_digit()) || !frac.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad("bad time"));
    }
    let secs: i64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad("time out of range"))?
    };
    let mut nanos: u32 = 0;
    for (i, c) in frac.bytes().take(9).enumerate() {
        nanos += (c - b'0') as u32 * 10u32.pow(8 - i as u32);
    }
    if !neg {
        return Ok((secs, nanos));
    }
    if nanos == 0 {
        Ok((-secs, 0))
    } else {
        Ok((-secs - 1, 1_000_000_000 - nanos))
    }
}

/// Decode `%XX` escapes (libarchive's xattr names).
pub(crate) fn url_decode(v: &[u8]) -> Result<Vec<u8>, TarErrorKind> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' {
            let hex = v.get(i + 1..i + 3).ok_or_else(|| bad("bad %-escape"))?;
            let s = std::str::from_utf8(hex).map_err(|_| bad("bad %-escape"))?;
            out.push(u8::from_str_radix(s, 16).map_err(|_| bad("bad %-escape"))?);
            i += 3;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Decode standard base64 (with or without padding), as libarchive writes xattr values.
pub(crate) fn base64_decode(v: &[u8]) -> Result<Vec<u8>, TarErrorKind> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let v: Vec<u8> = v.iter().copied().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(v.len() * 3 / 4);
    for chunk in v.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | val(c).ok_or_else(|| bad("bad base64"))?;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&acc.to_be_bytes()[1..]),
            3 => out.extend_from_slice(&(acc << 6).to_be_bytes()[1..3]),
            2 => out.push((acc >> 4) as u8),
            _ => return Err(bad("bad base64 length")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_borrowed_and_checked() {
        let data = b"12 path=a/b\n26 SCHILY.xattr.user.x=\x00\x01\n\0\0";
        let r: Vec<_> = records(data).collect::<Result<_, _>>().unwrap();
        assert_eq!(r[0], (&b"path"[..], &b"a/b"[..]));
        assert_eq!(r[1], (&b"SCHILY.xattr.user.x"[..], &b"\x00\x01"[..]));
        assert_eq!(r.len(), 2);
        assert!(check_records(b"99 path=a\n").is_err());
        assert!(check_records(b"x path=a\n").is_err());
        assert!(check_records(b"12 path=a/b\nx").is_err());
        let mut it = records(b"9 a=b\n\n");
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none(), "an error ends the records");
    }

    #[test]
    fn times() {
        assert_eq!(
            parse_time(b"1700000000.123456789").unwrap(),
            (1700000000, 123456789)
        );
        assert_eq!(parse_time(b"5.5").unwrap(), (5, 500000000));
        assert_eq!(parse_time(b"-1.5").unwrap(), (-2, 500000000));
        assert_eq!(parse_time(b"-3").unwrap(), (-3, 0));
        assert_eq!(parse_time(b"12.1234567891234").unwrap(), (12, 123456789));
        assert!(parse_time(b"abc").is_err());
    }

    #[test]
    fn decoders() {
        assert_eq!(url_decode(b"user.a%3Db").unwrap(), b"user.a=b");
        assert_eq!(base64_decode(b"aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode(b"aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode(b"AAE=").unwrap(), vec![0, 1]);
        assert!(base64_decode(b"a!").is_err());
    }
}
