//! Bad input: hostile tars get clear errors naming the entry; corrupt images get errors, never
//! panics or hangs.

use std::io::Cursor;

use erofs_image::tar::{Entry, EntryKind, TarWriter};
use erofs_image::{BuildOptions, Image};

use crate::common::*;

fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut w = TarWriter::new(Vec::new());
    for e in entries {
        w.append_bytes(
            e,
            if e.kind == EntryKind::Regular {
                b"data"
            } else {
                b""
            },
        )
        .unwrap();
    }
    w.finish().unwrap()
}

fn build_err(tar: &[u8]) -> String {
    // The file fast paths must refuse the same input with the same message.
    let t = tempfile::tempdir().unwrap();
    let tp = t.path().join("in.tar");
    std::fs::write(&tp, tar).unwrap();
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(t.path().join("o"))
        .unwrap();
    let direct =
        erofs_image::tar_file_to_image(&std::fs::File::open(&tp).unwrap(), &out, &oci_opts())
            .expect_err("direct conversion must fail")
            .to_string();
    let direct_idx =
        erofs_image::tar_file_to_index_file(&std::fs::File::open(&tp).unwrap(), &out, &oci_opts())
            .expect_err("direct index must fail")
            .to_string();
    let full = erofs_image::tar_to_image(tar, Cursor::new(Vec::new()), &oci_opts())
        .expect_err("full conversion must fail")
        .to_string();
    let idx = erofs_image::tar_to_index(tar, std::io::sink(), &oci_opts())
        .expect_err("index must fail")
        .to_string();
    assert_eq!(full, idx);
    assert_eq!(full, direct);
    assert_eq!(full, direct_idx);
    full
}

#[test]
fn bad_tars_name_the_entry() {
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let good = tar_of(&[
        Entry::new("dir", EntryKind::Directory),
        Entry::new("dir/file", EntryKind::Regular),
    ]);
    let mut w = TarWriter::new(Vec::new());
    w.append_bytes(&Entry::new("dir/file", EntryKind::Regular), &[7u8; 5000])
        .unwrap();
    let long = w.finish().unwrap();
    cases.push((
        "truncated",
        long[..3000].to_vec(),
        "\"dir/file\": unexpected end",
    ));
    let mut bad_sum = good.clone();
    bad_sum[512 + 5] ^= 0x55; // inside the second header's name
    cases.push(("checksum", bad_sum, "checksum"));
    let mut v = raw_header(b"../escape", b'0', 0, b"");
    v.extend_from_slice(&[0; 1024]);
    cases.push(("dotdot", v, "../escape"));
    let mut v = raw_header(b"/etc/passwd", b'0', 0, b"");
    v.extend_from_slice(&[0; 1024]);
    cases.push(("absolute", v, "/etc/passwd"));
    cases.push((
        "long name",
        tar_of(&[Entry::new(
            format!("d/{}", "x".repeat(256)),
            EntryKind::Regular,
        )]),
        "longer than 255",
    ));
    let mut v = Vec::new();
    let rec = b"16 path=a\0b/cde\n";
    v.extend(raw_header(b"pax", b'x', rec.len() as u64, b""));
    v.extend_from_slice(rec);
    v.resize(v.len().next_multiple_of(512), 0);
    v.extend(raw_header(b"f", b'0', 0, b""));
    v.extend_from_slice(&[0; 1024]);
    cases.push(("nul", v, "NUL"));
    let mut l = Entry::new("link", EntryKind::Hardlink);
    l.link = b"missing".to_vec();
    cases.push((
        "hardlink missing",
        tar_of(&[l]),
        "\"link\": hard link target \"missing\" does not exist",
    ));
    let mut l = Entry::new("link", EntryKind::Hardlink);
    l.link = b"dir".to_vec();
    cases.push((
        "hardlink to dir",
        tar_of(&[Entry::new("dir", EntryKind::Directory), l]),
        "\"link\": hard link target \"dir\" is a directory",
    ));
    let mut v = raw_header(b"huge", b'0', 0o77777777777, b"");
    v.extend_from_slice(&[0; 512]);
    cases.push(("100 GB in 1 KB", v, "\"huge\""));
    cases.push((
        "parent is a file",
        tar_of(&[
            Entry::new("f", EntryKind::Regular),
            Entry::new("f/x", EntryKind::Regular),
        ]),
        "not a directory",
    ));
    for (what, tar, needle) in cases {
        let err = build_err(&tar);
        assert!(
            err.contains(needle),
            "{what}: error {err:?} should mention {needle:?}"
        );
    }
}

#[test]
fn gzip_bomb_is_refused() {
    // A tar with one 8 GiB file of zeros, gzipped at the best ratio (~1000:1), streamed.
    let (r, w) = std::io::pipe().unwrap();
    let producer = std::thread::spawn(move || {
        let mut gz = flate2::write::GzEncoder::new(w, flate2::Compression::best());
        let mut tw = TarWriter::new(&mut gz);
        let mut e = Entry::new("bomb", EntryKind::Regular);
        e.size = 8 << 30;
        // Fails with a broken pipe once the reader gives up.
        let _ = tw.append(&e, &mut std::io::repeat(0));
    });
    let input = erofs_image::compression::Decompressed::new(r, Default::default()).unwrap();
    let t = tempfile::tempdir().unwrap();
    let out = std::fs::File::create(t.path().join("bomb.erofs")).unwrap();
    let err = erofs_image::tar_to_image(input, out, &BuildOptions::default())
        .unwrap_err()
        .to_string();
    producer.join().unwrap();
    assert!(
        err.contains("bomb") && err.contains("decompression") && err.contains("\"bomb\""),
        "{err}"
    );
}

/// Deterministic mutations of valid images: every byte position class gets flipped; the
/// reader and the checker must return (errors are fine), never panic or loop.
#[test]
fn corrupt_images_never_panic() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    rich_fixture(&src);
    let tar = t.path().join("x.tar");
    tar_dir(&src, &tar, "posix", &["--xattrs", "--xattrs-include=*"]);
    let mut images = Vec::new();
    for bs in [4096u32, 512] {
        let mut out = Cursor::new(Vec::new());
        erofs_image::tar_to_image(
            std::fs::File::open(&tar).unwrap(),
            &mut out,
            &BuildOptions {
                block_size: bs,
                ..Default::default()
            },
        )
        .unwrap();
        images.push(out.into_inner());
    }
    let idx = erofs_image::tar_to_index(
        std::fs::File::open(&tar).unwrap(),
        std::io::sink(),
        &BuildOptions::default(),
    )
    .unwrap();
    images.push(idx.index);
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for img in &images {
        // Concentrate on the metadata: superblock block and the end of the image.
        let meta_start = img.len().saturating_sub(64 * 1024);
        for round in 0..1500 {
            let mut m = img.clone();
            for _ in 0..1 + round % 4 {
                let pos = if next() % 3 == 0 {
                    1024 + (next() as usize % 128)
                } else {
                    meta_start + next() as usize % (img.len() - meta_start)
                };
                m[pos] ^= 1 << (next() % 8);
            }
            if let Ok(image) = Image::open(m.clone()) {
                let _ = erofs_image::check::check(&image);
                let _ = image.walk(|_, ino| {
                    let mut buf = [0u8; 4096];
                    let _ = image.read(ino, 0, &mut buf);
                    let _ = image.xattrs(ino);
                    Ok(())
                });
            }
        }
    }
}

/// Regression fixtures found by fuzzing (fuzz/corpus keeps them too): the reader and the
/// checker must return, not panic.
#[test]
fn fuzz_regressions() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/image/testdata");
    for e in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        if let Ok(img) = Image::open(data) {
            let _ = erofs_image::check::check(&img);
            let _ = img.walk(|_, ino| {
                let mut buf = [0u8; 4096];
                let _ = img.read(ino, 0, &mut buf);
                Ok(())
            });
        }
    }
}

/// A source directory never leads the builder out of it: symlinks (to a host file, to a host
/// directory) become symlinks, and a filesystem mounted inside it (host data, not the
/// directory's) is refused by name instead of copied. The old path-based walk copied a bind
/// mount's files into the image.
#[test]
fn dir_sources_stay_in_their_tree() {
    assert!(
        rustix::process::geteuid().is_root(),
        "needs root (bind mount)"
    );
    const SECRET: &[u8] = b"HOST-ONLY-4d1c9e";
    let t = tempfile::tempdir().unwrap();
    let host = t.path().join("host");
    let src = t.path().join("src");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::create_dir_all(src.join("mnt")).unwrap();
    std::fs::write(host.join("shadow"), SECRET).unwrap();
    std::fs::write(src.join("file"), b"in the tree").unwrap();
    std::os::unix::fs::symlink(host.join("shadow"), src.join("to-file")).unwrap();
    std::os::unix::fs::symlink(&host, src.join("to-dir")).unwrap();
    let img = t.path().join("img");
    let build = || {
        erofs_image::dir_to_image(
            &src,
            std::fs::File::create(&img).unwrap(),
            &BuildOptions::default(),
        )
    };

    build().unwrap();
    let bytes = std::fs::read(&img).unwrap();
    assert!(!bytes.windows(SECRET.len()).any(|w| w == SECRET));
    let image = Image::open(std::fs::File::open(&img).unwrap()).unwrap();
    let link = image.resolve(b"to-dir").unwrap();
    assert_eq!(
        image.read_link(&link).unwrap(),
        host.as_os_str().as_encoded_bytes()
    );

    rustix::mount::mount_bind(&host, src.join("mnt")).unwrap();
    let err = build();
    rustix::mount::unmount(src.join("mnt"), rustix::mount::UnmountFlags::DETACH).unwrap();
    let err = err.unwrap_err().to_string();
    assert!(err.contains("src/mnt is a mount point"), "{err}");
    let bytes = std::fs::read(&img).unwrap();
    assert!(!bytes.windows(SECRET.len()).any(|w| w == SECRET));
}
