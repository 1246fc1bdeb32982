use super::*;

fn entries(data: &[u8]) -> Result<Vec<(Entry, Vec<u8>)>, TarError> {
    let mut r = TarReader::new(data);
    let mut out = Vec::new();
    while let Some(e) = r.next_entry()? {
        let mut buf = vec![0u8; e.size as usize];
        let n = r.read_data(&mut buf)?;
        buf.truncate(n);
        out.push((e, buf));
    }
    Ok(out)
}

fn header(name: &[u8], typeflag: u8, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    if size < 1 << 33 {
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    } else {
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    fix_checksum(&mut h);
    h
}

fn fix_checksum(h: &mut [u8; 512]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&c| c as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

fn archive(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p);
        v.resize(v.len().next_multiple_of(512), 0);
    }
    v.extend_from_slice(&[0u8; 1024]);
    v
}

#[test]
fn writer_round_trip_with_pax() {
    let mut w = TarWriter::new(Vec::new());
    let long = "d/".repeat(80) + "file";
    let mut e = Entry::new(long.clone(), EntryKind::Regular);
    e.uid = 100_000;
    e.gid = 4_000_000_000;
    e.mtime = 1_700_000_000;
    e.mtime_nsec = 123_456_789;
    e.xattrs = vec![
        (b"user.bin".to_vec(), vec![0, 1, 2, 255]),
        (b"security.capability".to_vec(), vec![1; 20]),
    ];
    w.append_bytes(&e, b"payload").unwrap();
    let mut l = Entry::new("link", EntryKind::Symlink);
    l.link = vec![b'x'; 300];
    w.append_bytes(&l, &[]).unwrap();
    let mut neg = Entry::new("old", EntryKind::Regular);
    neg.mtime = -2;
    neg.mtime_nsec = 500_000_000;
    w.append_bytes(&neg, b"").unwrap();
    let data = w.finish().unwrap();
    let got = entries(&data).unwrap();
    assert_eq!(got.len(), 3);
    let (e0, d0) = &got[0];
    assert_eq!(e0.path, long.as_bytes());
    assert_eq!((e0.uid, e0.gid), (100_000, 4_000_000_000));
    assert_eq!((e0.mtime, e0.mtime_nsec), (1_700_000_000, 123_456_789));
    assert_eq!(e0.xattrs, e.xattrs);
    assert_eq!(d0, b"payload");
    assert_eq!(e0.data_offset % 512, 0);
    assert_eq!(
        &data[e0.data_offset as usize..e0.data_offset as usize + 7],
        b"payload"
    );
    assert_eq!(got[1].0.link, vec![b'x'; 300]);
    assert_eq!((got[2].0.mtime, got[2].0.mtime_nsec), (-2, 500_000_000));
}

#[test]
fn gnu_long_names_and_base256() {
    let name = "n/".repeat(100) + "end";
    let mut longname = header(b"././@LongLink", b'L', name.len() as u64 + 1);
    fix_checksum(&mut longname);
    let mut name_data = name.clone().into_bytes();
    name_data.push(0);
    let mut h = header(b"truncated", b'0', 3);
    // GNU magic, and a base-256 uid of 3_000_000.
    h[257..263].copy_from_slice(b"ustar ");
    h[263..265].copy_from_slice(b" \0");
    h[108..116].copy_from_slice(&[0x80, 0, 0, 0, 0, 0x2d, 0xc6, 0xc0]);
    fix_checksum(&mut h);
    let data = archive(&[&longname, &name_data, &h, b"abc"]);
    let got = entries(&data).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.path, name.as_bytes());
    assert_eq!(got[0].0.uid, 3_000_000);
    assert_eq!(got[0].1, b"abc");
}

#[test]
fn global_pax_and_libarchive_xattrs() {
    let g = writer::encode_records(&[(b"mtime".to_vec(), b"42.5".to_vec())]);
    let x = writer::encode_records(&[
        (
            b"LIBARCHIVE.xattr.user.a%3Db".to_vec(),
            b"aGVsbG8=".to_vec(),
        ),
        (b"uname".to_vec(), b"nobody".to_vec()),
    ]);
    let data = archive(&[
        &header(b"pax_global_header", b'g', g.len() as u64),
        &g,
        &header(b"x", b'x', x.len() as u64),
        &x,
        &header(b"f", b'0', 0),
        &header(b"f2", b'0', 0),
    ]);
    let got = entries(&data).unwrap();
    assert_eq!(
        got[0].0.xattrs,
        vec![(b"user.a=b".to_vec(), b"hello".to_vec())]
    );
    assert_eq!((got[0].0.mtime, got[0].0.mtime_nsec), (42, 500_000_000));
    assert_eq!((got[1].0.mtime, got[1].0.mtime_nsec), (42, 500_000_000));
    assert!(got[1].0.xattrs.is_empty());
}

#[test]
fn path_normalisation() {
    assert_eq!(normalize_path(b"./a//b/./c/").unwrap(), b"a/b/c");
    assert_eq!(normalize_path(b"./").unwrap(), b"");
    assert!(matches!(
        normalize_path(b"/etc/passwd"),
        Err(TarErrorKind::AbsolutePath)
    ));
    assert!(matches!(
        normalize_path(b"a/../../x"),
        Err(TarErrorKind::DotDot)
    ));
    assert!(matches!(
        normalize_path(&[b'a'; 256]),
        Err(TarErrorKind::NameTooLong)
    ));
    assert!(matches!(
        normalize_path(b"a\0b"),
        Err(TarErrorKind::NulInName)
    ));
}

#[test]
fn errors_name_the_entry() {
    // Truncated data.
    let data = archive(&[&header(b"big", b'0', 100_000_000_000)]);
    let mut r = TarReader::new(&data[..1024]);
    let e = r.next_entry().unwrap().unwrap();
    assert_eq!(e.size, 100_000_000_000);
    let mut buf = vec![0u8; 1 << 16];
    let err = loop {
        match r.read_data(&mut buf) {
            Ok(0) => panic!("no error"),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(matches!(err.kind, TarErrorKind::Truncated));
    assert_eq!(err.entry.as_deref(), Some("big"));

    // Bad checksum.
    let mut h = header(b"bad", b'0', 0);
    h[0] = b'c';
    let err = entries(&archive(&[&h])).unwrap_err();
    assert!(matches!(err.kind, TarErrorKind::BadChecksum));
    assert!(err.to_string().contains("cad"), "{err}");

    // Path escapes.
    for (name, want) in [(&b"../x"[..], "DotDot"), (b"/abs", "AbsolutePath")] {
        let err = entries(&archive(&[&header(name, b'0', 0)])).unwrap_err();
        assert_eq!(format!("{:?}", err.kind), want, "{name:?}");
        assert!(err.entry.is_some());
    }

    // Truncated header.
    let full = archive(&[&header(b"a", b'0', 0)]);
    let err = entries(&full[..300]).unwrap_err();
    assert!(matches!(err.kind, TarErrorKind::Truncated));

    // Oversized PAX header.
    let err = entries(&archive(&[&header(b"x", b'x', 1 << 40)])).unwrap_err();
    assert!(matches!(err.kind, TarErrorKind::HeaderTooLarge(_)));

    // NUL in a PAX path.
    let x = writer::encode_records(&[(b"path".to_vec(), b"a\0b".to_vec())]);
    let err = entries(&archive(&[
        &header(b"x", b'x', x.len() as u64),
        &x,
        &header(b"f", b'0', 0),
    ]))
    .unwrap_err();
    assert!(matches!(err.kind, TarErrorKind::NulInName));
}

#[test]
fn end_marker_variants() {
    let one = header(b"a", b'0', 0);
    // No end marker at all: accepted.
    assert_eq!(entries(&one).unwrap().len(), 1);
    // One zero block: accepted.
    let mut v = one.to_vec();
    v.extend_from_slice(&[0u8; 512]);
    assert_eq!(entries(&v).unwrap().len(), 1);
    // Trailing bytes after the marker are drained, not parsed.
    let mut v = archive(&[&one]);
    v.extend_from_slice(b"garbage after the end");
    let mut r = TarReader::new(&v[..]);
    while r.next_entry().unwrap().is_some() {}
    assert_eq!(r.drain().unwrap(), 21);
    assert_eq!(r.offset(), v.len() as u64);
}

#[test]
fn pax_sparse_1_0() {
    // Map: 2 segments, (0, 4) and (8192, 3); real size 10000.
    let map = b"2\n0\n4\n8192\n3\n";
    let mut data = map.to_vec();
    data.resize(512, 0);
    data.extend_from_slice(b"ABCD");
    data.extend_from_slice(b"xyz");
    let x = writer::encode_records(&[
        (b"GNU.sparse.major".to_vec(), b"1".to_vec()),
        (b"GNU.sparse.minor".to_vec(), b"0".to_vec()),
        (b"GNU.sparse.name".to_vec(), b"real/name".to_vec()),
        (b"GNU.sparse.realsize".to_vec(), b"10000".to_vec()),
    ]);
    let ar = archive(&[
        &header(b"x", b'x', x.len() as u64),
        &x,
        &header(b"GNUSparseFile.0/name", b'0', data.len() as u64),
        &data,
    ]);
    let got = entries(&ar).unwrap();
    assert_eq!(got[0].0.path, b"real/name");
    assert_eq!(got[0].0.file_size, 10000);
    assert_eq!(got[0].0.sparse.as_deref(), Some(&[(0, 4), (8192, 3)][..]));
    assert_eq!(got[0].1, b"ABCDxyz");
}

#[test]
fn sparse_map_must_add_up() {
    assert!(validate_sparse(&[(0, 4), (2, 4)], 8, 100).is_err());
    assert!(validate_sparse(&[(0, 4)], 5, 100).is_err());
    assert!(validate_sparse(&[(96, 8)], 8, 100).is_err());
    assert!(validate_sparse(&[(0, 4), (10, 4), (100, 0)], 8, 100).is_ok());
}

/// A GNU long name without its NUL: the bytes after its size decide. GNU tar reads the name on
/// into the padding up to a NUL, so padding that is not zero would make the two readers name
/// different files; zero padding gives both the same name.
#[test]
fn long_name_without_nul_is_read_as_gnu_tar_reads_it_or_refused() {
    let archive = |padding_byte: u8| {
        let mut a = header(b"././@LongLink", b'L', 5).to_vec();
        let mut data = [0u8; 512];
        data[..5].copy_from_slice(b"abcde");
        data[5] = padding_byte;
        a.extend_from_slice(&data);
        a.extend_from_slice(&header(b"short", b'0', 0));
        a.extend_from_slice(&[0u8; 1024]);
        a
    };
    let ok = entries(&archive(0)).unwrap();
    assert_eq!(ok[0].0.path, b"abcde");
    let err = entries(&archive(b'f')).unwrap_err();
    assert!(
        matches!(err.kind, TarErrorKind::UnterminatedLongName),
        "{err}"
    );
    // With its NUL, what follows it is ignored, as GNU tar ignores it.
    let mut a = header(b"././@LongLink", b'L', 8).to_vec();
    let mut data = [0u8; 512];
    data[..8].copy_from_slice(b"abc\0junk");
    a.extend_from_slice(&data);
    a.extend_from_slice(&header(b"short", b'0', 0));
    a.extend_from_slice(&[0u8; 1024]);
    assert_eq!(entries(&a).unwrap()[0].0.path, b"abc");
}
