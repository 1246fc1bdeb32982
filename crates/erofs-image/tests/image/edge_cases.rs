//! Scale and boundary cases: many inodes, big directories, every symlink length, big xattrs,
//! sparse files over 4 GiB.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;

use erofs_image::BuildOptions;
use erofs_image::tar::{Entry, EntryKind, TarWriter};

use crate::common::*;

/// More than 65535 inodes (nids past 16 bits), in a few wide directories.
#[test]
fn more_than_65535_inodes() {
    let t = tempfile::tempdir().unwrap();
    let tar = t.path().join("many.tar");
    let mut w = TarWriter::new(std::io::BufWriter::new(File::create(&tar).unwrap()));
    let per_dir = 7000;
    let total = 70_000;
    for d in 0..total / per_dir {
        w.append_bytes(&Entry::new(format!("d{d:02}"), EntryKind::Directory), &[])
            .unwrap();
    }
    for i in 0..total {
        let mut e = Entry::new(format!("d{:02}/f{i:06}", i / per_dir), EntryKind::Regular);
        e.mtime = 1_700_000_000 + (i % 3) as i64;
        w.append_bytes(&e, if i % 1000 == 0 { b"x" } else { b"" })
            .unwrap();
    }
    w.finish().unwrap();
    for (name, idx) in [("full", false), ("index", true)] {
        let img = t.path().join(format!("{name}.erofs"));
        if idx {
            build_index_file(&tar, &img, &BuildOptions::default());
        } else {
            build_full(&tar, &img, &BuildOptions::default());
        }
        fsck_all(&img, None);
        let m = mount_erofs(&img, &[]);
        let mut count = 0;
        let mut max_ino = 0;
        for d in fs::read_dir(m.path()).unwrap() {
            for f in fs::read_dir(d.unwrap().path()).unwrap() {
                let f = f.unwrap();
                max_ino = max_ino.max(f.metadata().unwrap().ino());
                count += 1;
            }
        }
        assert_eq!(count, total);
        assert!(max_ino > 65535, "nids should exceed 16 bits, max {max_ino}");
        assert_eq!(fs::read(m.path().join("d09/f063000")).unwrap(), b"x");
        assert_eq!(
            fs::metadata(m.path().join("d05/f035002")).unwrap().mtime(),
            1_700_000_001
        );
    }
}

/// A directory spanning many blocks, with names that sort before `.`; every name must be
/// reachable by lookup, not only listed.
#[test]
fn big_directory_and_names_before_dot() {
    let t = tempfile::tempdir().unwrap();
    let tar = t.path().join("big.tar");
    let mut w = TarWriter::new(File::create(&tar).unwrap());
    w.append_bytes(&Entry::new("dir", EntryKind::Directory), &[])
        .unwrap();
    let mut names: Vec<String> = (0..3000)
        .map(|i| format!("entry-with-a-longish-name-{i:05}"))
        .collect();
    for special in [
        "!bang",
        "#hash",
        "$dollar",
        "%pct",
        "&amp",
        "'q",
        "(p",
        ")p",
        "*star",
        "+plus",
        ",comma",
        "-dash",
        ".-",
        "..x",
        ".a",
        "~tilde",
        "\u{e9}t\u{e9}",
    ] {
        names.push(special.into());
    }
    names.push("n".repeat(255));
    for n in &names {
        w.append_bytes(
            &Entry::new(format!("dir/{n}"), EntryKind::Regular),
            n.as_bytes(),
        )
        .unwrap();
    }
    w.finish().unwrap();
    for bs in [4096u32, 512] {
        let img = t.path().join(format!("big{bs}.erofs"));
        build_full(
            &tar,
            &img,
            &BuildOptions {
                block_size: bs,
                ..Default::default()
            },
        );
        fsck_all(&img, None);
        let m = mount_erofs(&img, &[]);
        for n in &names {
            assert_eq!(
                fs::read(m.path().join("dir").join(n)).unwrap(),
                n.as_bytes(),
                "lookup of {n:?} (bs {bs})"
            );
        }
        assert_eq!(
            fs::read_dir(m.path().join("dir")).unwrap().count(),
            names.len()
        );
    }
}

/// Symlink targets of every length from 1 to 4095, inline or in blocks as they fit.
#[test]
fn symlinks_of_every_length() {
    let t = tempfile::tempdir().unwrap();
    let tar = t.path().join("links.tar");
    let mut w = TarWriter::new(std::io::BufWriter::new(File::create(&tar).unwrap()));
    for len in 1..=4095usize {
        let mut e = Entry::new(format!("l{len:04}"), EntryKind::Symlink);
        e.link = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        w.append_bytes(&e, &[]).unwrap();
    }
    w.finish().unwrap();
    for (name, idx) in [("full", false), ("index", true)] {
        let img = t.path().join(format!("{name}.erofs"));
        if idx {
            build_index_file(&tar, &img, &BuildOptions::default());
        } else {
            build_full(&tar, &img, &BuildOptions::default());
        }
        fsck_all(&img, None);
        let m = mount_erofs(&img, &[]);
        for len in 1..=4095usize {
            let target = fs::read_link(m.path().join(format!("l{len:04}"))).unwrap();
            let want: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            assert_eq!(
                std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()),
                &want[..],
                "length {len}"
            );
        }
    }
}

/// Many xattrs, large values (up to the kernel's 64 KiB), binary values, on all types.
#[test]
fn many_and_large_xattrs() {
    let t = tempfile::tempdir().unwrap();
    let tar = t.path().join("x.tar");
    let mut w = TarWriter::new(File::create(&tar).unwrap());
    let mut d = Entry::new("d", EntryKind::Directory);
    d.xattrs = (0..200)
        .map(|i| {
            (
                format!("user.attr{i:03}").into_bytes(),
                vec![i as u8; i * 7],
            )
        })
        .collect();
    w.append_bytes(&d, &[]).unwrap();
    let mut f = Entry::new("d/f", EntryKind::Regular);
    f.xattrs = vec![
        (
            b"user.huge".to_vec(),
            (0..65535u32).map(|i| (i * 7) as u8).collect(),
        ),
        (b"trusted.bin".to_vec(), vec![0, 0, 0, 1, 255]),
        (
            b"security.selinux".to_vec(),
            b"system_u:object_r:etc_t:s0\0".to_vec(),
        ),
        (
            b"system.posix_acl_access".to_vec(),
            vec![
                2, 0, 0, 0, 1, 0, 6, 0, 255, 255, 255, 255, 4, 0, 4, 0, 255, 255, 255, 255, 32, 0,
                4, 0, 255, 255, 255, 255,
            ],
        ),
    ];
    w.append_bytes(&f, b"some content that is inlined or not")
        .unwrap();
    let mut c = Entry::new("d/dev", EntryKind::Char);
    c.devmajor = 4;
    c.devminor = 64;
    c.xattrs = vec![(b"trusted.overlay.x".to_vec(), b"1".to_vec())];
    w.append_bytes(&c, &[]).unwrap();
    w.finish().unwrap();
    for (name, idx) in [("full", false), ("index", true)] {
        let img = t.path().join(format!("{name}.erofs"));
        if idx {
            build_index_file(&tar, &img, &BuildOptions::default());
        } else {
            build_full(&tar, &img, &BuildOptions::default());
        }
        fsck_all(&img, None);
        let m = mount_erofs(&img, &[]);
        let mut want_d = d.xattrs.clone();
        want_d.sort();
        assert_eq!(xattrs(&m.path().join("d")), want_d);
        let got_f = xattrs(&m.path().join("d/f"));
        let mut want_f = f.xattrs.clone();
        want_f.sort();
        assert_eq!(
            got_f.len(),
            want_f.len(),
            "{:?}",
            got_f
                .iter()
                .map(|x| String::from_utf8_lossy(&x.0).into_owned())
                .collect::<Vec<_>>()
        );
        for (g, w) in got_f.iter().zip(&want_f) {
            assert_eq!(g.0, w.0);
            if g.0 != b"system.posix_acl_access" {
                assert_eq!(g.1, w.1, "{}", String::from_utf8_lossy(&g.0));
            }
        }
        assert_eq!(xattrs(&m.path().join("d/dev")), c.xattrs);
    }
}

/// Sparse files (one over 4 GiB) through GNU tar's sparse formats and through directory
/// conversion: holes stay holes (chunk tables), data lands where it was.
#[test]
fn sparse_files_over_4gib() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sh(&format!(
        r#"mkdir -p {s} && cd {s}
truncate -s 5G huge
printf start | dd of=huge conv=notrunc status=none
printf middle | dd of=huge bs=1 seek=3000000000 conv=notrunc status=none
printf end | dd of=huge bs=1 seek=5368709117 conv=notrunc status=none
truncate -s 1M holes-only
truncate -s 100000 small-sparse && printf abc | dd of=small-sparse bs=1 seek=70000 conv=notrunc status=none"#,
        s = src.display()
    ));
    let want = snapshot(
        &src,
        Compare {
            ignore_root: true,
            ..Default::default()
        },
    );
    for format in ["posix", "gnu"] {
        let tar = t.path().join(format!("{format}.tar"));
        tar_dir(&src, &tar, format, &["--sparse"]);
        assert!(
            fs::metadata(&tar).unwrap().len() < 1 << 20,
            "tar should be sparse"
        );
        let img = t.path().join(format!("{format}.erofs"));
        build_full(&tar, &img, &BuildOptions::default());
        assert!(
            fs::metadata(&img).unwrap().len() < 16 << 20,
            "image should keep the holes"
        );
        fsck_all(&img, None);
        let m = mount_erofs(&img, &[]);
        let cmp = Compare {
            ignore_root: true,
            ignore_nsec: format == "gnu",
            ..Default::default()
        };
        let want = if format == "gnu" {
            snapshot(&src, cmp)
        } else {
            want.clone()
        };
        assert_same_tree(&want, &snapshot(m.path(), cmp));
        // Sparse entries cannot be indexed in place.
        let idx = t.path().join(format!("{format}.idx"));
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&idx)
            .unwrap();
        let err =
            erofs_image::tar_to_index_file(File::open(&tar).unwrap(), &f, &BuildOptions::default())
                .unwrap_err();
        assert!(err.to_string().contains("sparse"), "{err}");
    }
    let img = t.path().join("dir.erofs");
    erofs_image::dir_to_image(&src, File::create(&img).unwrap(), &BuildOptions::default()).unwrap();
    assert!(fs::metadata(&img).unwrap().len() < 16 << 20);
    fsck_all(&img, None);
    let m = mount_erofs(&img, &[]);
    assert_same_tree(
        &want,
        &snapshot(
            m.path(),
            Compare {
                ignore_root: true,
                ..Default::default()
            },
        ),
    );
}

/// A dense file over 4 GiB streamed from a generated tar (not sparse): extended inode,
/// 64-bit size, plain blocks.
#[test]
fn dense_file_over_4gib() {
    struct Pattern(u64);
    impl std::io::Read for Pattern {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((self.0 + i as u64) / 4096) as u8;
            }
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
    }
    let t = tempfile::tempdir().unwrap();
    let size = (4u64 << 30) + 12345;
    let (r, w) = std::io::pipe().unwrap();
    let writer = std::thread::spawn(move || {
        let mut tw = TarWriter::new(std::io::BufWriter::with_capacity(1 << 20, w));
        let mut e = Entry::new("big", EntryKind::Regular);
        e.size = size;
        tw.append(&e, &mut Pattern(0)).unwrap();
        tw.finish().unwrap();
    });
    let img = t.path().join("dense.erofs");
    build_full_from(r, &img);
    writer.join().unwrap();
    fsck_all(&img, None);
    let m = mount_erofs(&img, &[]);
    let p = m.path().join("big");
    assert_eq!(fs::metadata(&p).unwrap().len(), size);
    let f = File::open(&p).unwrap();
    for off in [0u64, 4095, 4096, 1 << 32, size - 1] {
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off).unwrap();
        assert_eq!(b[0], (off / 4096) as u8, "byte at {off}");
    }
}

fn build_full_from(r: impl std::io::Read, out: &std::path::Path) {
    erofs_image::tar_to_image(r, File::create(out).unwrap(), &BuildOptions::default()).unwrap();
}
