//! Resource bombs: small archives that would make the builder hold or do far more than their
//! size. Each must be refused with an error naming the limit, quickly and in bounded memory
//! (nextest runs each test in its own process, so the peak RSS is this test's).

use std::io::Cursor;
use std::time::{Duration, Instant};

use erofs_image::{BuildOptions, Image, Limits};

use crate::common::*;

/// A ustar header block (name, typeflag, size).
fn header(name: &[u8], typeflag: u8, size: u64) -> Vec<u8> {
    raw_header(name, typeflag, size, b"")
}

/// One PAX record, `"<len> key=value\n"` with the length counting itself.
fn record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while format!("{len}").len() + body != len {
        len += 1;
    }
    let mut r = format!("{len} ").into_bytes();
    r.extend_from_slice(key);
    r.push(b'=');
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

/// A PAX extension member (`x` local or `g` global) holding `payload`.
fn pax(typeflag: u8, payload: &[u8]) -> Vec<u8> {
    let mut m = header(b"PaxHeader", typeflag, payload.len() as u64);
    m.extend_from_slice(payload);
    m.resize(m.len().div_ceil(512) * 512, 0);
    m
}

/// A regular file member with `data`.
fn file(name: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = header(name, b'0', data.len() as u64);
    m.extend_from_slice(data);
    m.resize(m.len().div_ceil(512) * 512, 0);
    m
}

fn end(mut t: Vec<u8>) -> Vec<u8> {
    t.extend_from_slice(&[0u8; 1024]);
    t
}

/// Build `tar` both ways (full image and tar index) with `opts`; both must fail within
/// `within` without growing the peak RSS by more than `max_mem`. Returns the error.
fn refused(tar: &[u8], opts: &BuildOptions, within: Duration, max_mem: u64) -> String {
    let before = peak_rss();
    let t = Instant::now();
    let full = erofs_image::tar_to_image(tar, Cursor::new(Vec::new()), opts)
        .expect_err("the full builder must refuse it")
        .to_string();
    let idx = erofs_image::tar_to_index(tar, std::io::sink(), opts)
        .expect_err("the index builder must refuse it")
        .to_string();
    let took = t.elapsed();
    let grew = peak_rss().saturating_sub(before);
    assert_eq!(full, idx, "both builders give the same error");
    assert!(
        took < within,
        "refused after {took:?} (limit {within:?}): {full}"
    );
    assert!(
        grew < max_mem,
        "peak memory grew by {} MiB refusing it: {full}",
        grew >> 20
    );
    eprintln!(
        "refused in {took:?}, peak memory +{} MiB: {full}",
        grew >> 20
    );
    full
}

const SEC: Duration = Duration::from_secs(1);
const MIB: u64 = 1 << 20;

/// A 16 MiB PAX path of one-letter components would make 8 million directories.
#[test]
fn deep_path_is_refused_before_its_parents_exist() {
    let path = "a/".repeat(8 << 20);
    let tar = end([
        pax(
            b'x',
            &record(b"path", path.as_bytes()[..(16 << 20) - 64].as_ref()),
        ),
        file(b"x", b""),
    ]
    .concat());
    let e = refused(&tar, &oci_opts(), 5 * SEC, 256 * MIB);
    assert!(
        e.contains("path depth") && e.contains("limit of 2048"),
        "{e}"
    );
}

/// Global records apply to every later entry: 40k of them once took 25 s to read, and 20k
/// then 20k entries 117 s. Now their number is bounded, and entries under the records that
/// are allowed cost no copy of them.
#[test]
fn pax_global_records_are_bounded_and_cheap() {
    let mut g = Vec::new();
    for i in 0..40_000 {
        g.extend(record(format!("comment.{i}").as_bytes(), b"x"));
    }
    let tar = end([pax(b'g', &g), file(b"f", b"")].concat());
    let e = refused(&tar, &oci_opts(), SEC, 64 * MIB);
    assert!(
        e.contains("PAX global headers exceed the limit of 256 records"),
        "{e}"
    );

    // 256 global records of 4 KiB and 20k entries after them: built, fast.
    let mut g = Vec::new();
    for i in 0..256 {
        g.extend(record(format!("comment.{i}").as_bytes(), &[b'v'; 4000]));
    }
    let mut t = pax(b'g', &g);
    for i in 0..20_000 {
        t.extend(file(format!("f{i}").as_bytes(), b""));
    }
    let tar = end(t);
    let start = Instant::now();
    erofs_image::tar_to_image(&tar[..], Cursor::new(Vec::new()), &oci_opts()).unwrap();
    assert!(start.elapsed() < 10 * SEC, "took {:?}", start.elapsed());
}

/// Chained `x` headers once accumulated without bound: each is under the per-header limit,
/// together they are not.
#[test]
fn chained_extension_headers_share_one_budget() {
    let mut t = Vec::new();
    for i in 0..20 {
        t.extend(pax(
            b'x',
            &record(format!("comment.{i}").as_bytes(), &vec![b'c'; 1 << 20]),
        ));
    }
    t.extend(file(b"f", b""));
    let e = refused(&end(t), &oci_opts(), 2 * SEC, 128 * MIB);
    assert!(
        e.contains("extension header of") && e.contains("exceeds the limit"),
        "{e}"
    );
}

/// A 16 MiB PAX header of tiny xattr records was de-duplicated with a scan per record
/// (quadratic: hours).
#[test]
fn xattr_floods_are_refused_in_linear_time() {
    let mut x = Vec::new();
    let mut i = 0u64;
    while x.len() < 15 << 20 {
        x.extend(record(format!("SCHILY.xattr.user.{i}").as_bytes(), b"v"));
        i += 1;
    }
    let tar = end([pax(b'x', &x), file(b"f", b"")].concat());
    // The records are read borrowed from the payload and the names counted as they come:
    // once +194 MiB (every record copied out first), now a few MiB.
    let e = refused(&tar, &oci_opts(), 5 * SEC, 64 * MIB);
    assert!(e.contains("more than 4096 extended attributes"), "{e}");

    // Many repeats of a few names: the last value of each wins, quickly.
    let mut x = Vec::new();
    for i in 0..100_000u64 {
        x.extend(record(
            format!("SCHILY.xattr.user.k{}", i % 10).as_bytes(),
            format!("{i}").as_bytes(),
        ));
    }
    let tar = end([pax(b'x', &x), file(b"f", b"")].concat());
    let start = Instant::now();
    let mut img = Cursor::new(Vec::new());
    erofs_image::tar_to_image(&tar[..], &mut img, &oci_opts()).unwrap();
    assert!(start.elapsed() < 5 * SEC, "took {:?}", start.elapsed());
    let img = Image::open(img.into_inner()).unwrap();
    let f = img.resolve(b"f").unwrap();
    let xs = img.xattrs(&f).unwrap();
    assert_eq!(xs.len(), 10);
    assert!(
        xs.contains(&(b"user.k9".to_vec(), b"99999".to_vec())),
        "{xs:?}"
    );
}

/// A few hundred bytes of sparse map spread over an exabyte-sized file: any chunking would
/// materialise gigabytes (once: 664 MB of RAM for 451 bytes of layer).
#[test]
fn sparse_files_that_would_explode_are_refused() {
    let size: u64 = 1 << 62;
    let n = 64u64;
    let map: Vec<String> = (0..n).map(|i| format!("{},1", i * (size / n))).collect();
    let recs = [
        record(b"GNU.sparse.major", b"0"),
        record(b"GNU.sparse.minor", b"1"),
        record(b"GNU.sparse.realsize", size.to_string().as_bytes()),
        record(b"GNU.sparse.map", map.join(",").as_bytes()),
    ]
    .concat();
    let tar = end([pax(b'x', &recs), file(b"sparse", &vec![b's'; n as usize])].concat());
    let e = erofs_image::tar_to_image(&tar[..], Cursor::new(Vec::new()), &oci_opts())
        .expect_err("must be refused")
        .to_string();
    assert!(
        e.contains("sparse file") && e.contains("over the limit"),
        "{e}"
    );

    // A sparse file whose chunks fit: built (one segment at 1 GiB in a 5 GiB file).
    let recs = [
        record(b"GNU.sparse.major", b"0"),
        record(b"GNU.sparse.minor", b"1"),
        record(b"GNU.sparse.realsize", (5u64 << 30).to_string().as_bytes()),
        record(b"GNU.sparse.map", format!("{},4096", 1u64 << 30).as_bytes()),
    ]
    .concat();
    let tar = end([pax(b'x', &recs), file(b"ok", &[b'd'; 4096])].concat());
    erofs_image::tar_to_image(&tar[..], Cursor::new(Vec::new()), &oci_opts()).unwrap();
}

/// Sizes above 2^63-1 (GNU tar and bsdtar refuse them; no off_t holds them): once an i_size
/// of 2^64-1 was built.
#[test]
fn sizes_past_i64_max_are_refused() {
    for size in [u64::MAX, 1u64 << 63] {
        let tar = end([
            pax(b'x', &record(b"size", size.to_string().as_bytes())),
            file(b"f", b""),
        ]
        .concat());
        let e = refused(&tar, &oci_opts(), SEC, 64 * MIB);
        assert!(e.contains("larger than 2^63-1"), "{e}");
        let recs = [
            record(b"GNU.sparse.major", b"0"),
            record(b"GNU.sparse.minor", b"1"),
            record(b"GNU.sparse.realsize", size.to_string().as_bytes()),
            record(b"GNU.sparse.map", b"0,0"),
        ]
        .concat();
        let tar = end([pax(b'x', &recs), file(b"s", b"")].concat());
        let e = refused(&tar, &oci_opts(), SEC, 64 * MIB);
        assert!(e.contains("larger than 2^63-1"), "{e}");
    }
    // Base-256 size field of 2^64-1 in the header itself.
    let mut h: [u8; 512] = header(b"big", b'0', 0).try_into().unwrap();
    h[124] = 0x80;
    h[125..136].fill(0xff);
    tar_checksum(&mut h);
    let e = refused(&end(h.to_vec()), &oci_opts(), SEC, 64 * MIB);
    assert!(
        e.contains("larger than 2^63-1") || e.contains("invalid number"),
        "{e}"
    );
}

/// Entry count and metadata budgets, at small limits.
#[test]
fn entry_and_metadata_budgets() {
    let mut t = Vec::new();
    for i in 0..200 {
        t.extend(file(format!("d{}/f{i}", i % 7).as_bytes(), b""));
    }
    let tar = end(t);
    let opts = BuildOptions {
        limits: Limits {
            max_entries: 100,
            ..Default::default()
        },
        ..oci_opts()
    };
    let e = refused(&tar, &opts, SEC, 64 * MIB);
    assert!(e.contains("entries (101) exceed the limit of 100"), "{e}");
    let opts = BuildOptions {
        limits: Limits {
            max_metadata: 1000,
            ..Default::default()
        },
        ..oci_opts()
    };
    let e = refused(&tar, &opts, SEC, 64 * MIB);
    assert!(
        e.contains("metadata bytes") && e.contains("limit of 1000"),
        "{e}"
    );
    // At the default limits the same archive builds.
    erofs_image::tar_to_image(&tar[..], Cursor::new(Vec::new()), &oci_opts()).unwrap();
}

/// overlayfs's own xattrs in an OCI layer (a redirect or metacopy overlayfs would honour on
/// the mounted image) are dropped; outside OCI mode they are kept as given.
#[test]
fn overlay_xattrs_from_a_layer_are_dropped() {
    let recs = [
        record(b"SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
        record(b"SCHILY.xattr.trusted.overlay.metacopy", b""),
        record(b"SCHILY.xattr.user.kept", b"1"),
    ]
    .concat();
    let tar = end([pax(b'x', &recs), header(b"d/", b'5', 0)].concat());
    let names = |opts: &BuildOptions| {
        let mut img = Cursor::new(Vec::new());
        erofs_image::tar_to_image(&tar[..], &mut img, opts).unwrap();
        let img = Image::open(img.into_inner()).unwrap();
        let d = img.resolve(b"d").unwrap();
        let mut n: Vec<String> = img
            .xattrs(&d)
            .unwrap()
            .into_iter()
            .map(|(k, _)| String::from_utf8(k).unwrap())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&oci_opts()), ["user.kept"]);
    let plain = BuildOptions {
        oci_whiteouts: false,
        ..oci_opts()
    };
    assert_eq!(
        names(&plain),
        [
            "trusted.overlay.metacopy",
            "trusted.overlay.redirect",
            "user.kept"
        ]
    );
}

/// An image whose inode claims 2^64-1 bytes (once built, and passed by the checker): the
/// checker reports it.
#[test]
fn checker_reports_sizes_past_i64_max() {
    let mut h: [u8; 512] = header(b"f", b'0', 4).try_into().unwrap();
    // A per-file mtime makes the builder use an extended inode, whose i_size is 64-bit.
    h[136..147].copy_from_slice(b"00000012345");
    tar_checksum(&mut h);
    let mut t = h.to_vec();
    t.extend_from_slice(b"data");
    t.resize(1024, 0);
    let mut img = Cursor::new(Vec::new());
    // Data in a block of its own, not inline (containerd's -Enoinline_data).
    let opts = BuildOptions {
        inline_data: false,
        ..oci_opts()
    };
    erofs_image::tar_to_image(&end(t)[..], &mut img, &opts).unwrap();
    let mut bytes = img.into_inner();
    let (pos, isize) = {
        let im = Image::open(bytes.clone()).unwrap();
        let f = im.resolve(b"f").unwrap();
        (f.pos as usize, f.raw.inode_size())
    };
    assert_eq!(isize, 64, "expected an extended inode");
    assert!(erofs_image::check::check_image(bytes.clone(), Vec::new()).is_ok());
    bytes[pos + 8..pos + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    let report = erofs_image::check::check_image(bytes, Vec::new());
    assert!(!report.is_ok());
    let all: Vec<String> = report.findings.iter().map(|f| f.to_string()).collect();
    assert!(
        all.iter().any(|f| f.contains("larger than 2^63-1")),
        "{all:?}"
    );
}
