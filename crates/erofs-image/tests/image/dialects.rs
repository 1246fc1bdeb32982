//! The same rich tree through every tar dialect and every output mode, compared with the
//! source after a real mount, and checked by fsck.erofs.

use std::path::Path;

use erofs_image::BuildOptions;

use crate::common::*;

fn source() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    rich_fixture(&src);
    (t, src)
}

fn check_modes(tar: &Path, src: &Path, work: &Path, cmp: Compare) {
    let want = snapshot(src, cmp);
    let variants: [(&str, BuildOptions); 3] = [
        (
            "inline",
            BuildOptions {
                uuid: [1; 16],
                ..Default::default()
            },
        ),
        (
            "noinline",
            BuildOptions {
                inline_data: false,
                uuid: [2; 16],
                ..Default::default()
            },
        ),
        (
            "bs1024",
            BuildOptions {
                block_size: 1024,
                uuid: [3; 16],
                ..Default::default()
            },
        ),
    ];
    for (name, opts) in variants {
        let img = work.join(format!("{name}.erofs"));
        build_full(tar, &img, &opts);
        fsck_all(&img, None);
        let m = mount_erofs(&img, &[]);
        assert_same_tree(&want, &snapshot(m.path(), cmp));
    }
    // The same, from the tar as a file: data moves with copy_file_range, the index is built
    // from headers only.
    let direct = work.join("direct.erofs");
    erofs_image::tar_file_to_image(
        &std::fs::File::open(tar).unwrap(),
        &std::fs::File::create(&direct).unwrap(),
        &BuildOptions {
            uuid: [4; 16],
            ..Default::default()
        },
    )
    .unwrap();
    fsck_all(&direct, None);
    {
        let m = mount_erofs(&direct, &[]);
        assert_same_tree(&want, &snapshot(m.path(), cmp));
    }
    let direct_idx = work.join("direct-index.erofs");
    erofs_image::tar_file_to_index_file(
        &std::fs::File::open(tar).unwrap(),
        &std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&direct_idx)
            .unwrap(),
        &BuildOptions::default(),
    )
    .unwrap();
    fsck_all(&direct_idx, None);
    {
        let m = mount_erofs(&direct_idx, &[]);
        assert_same_tree(&want, &snapshot(m.path(), cmp));
    }
    // Tar index, one file.
    let idx = work.join("index.erofs");
    build_index_file(tar, &idx, &BuildOptions::default());
    fsck_all(&idx, None);
    {
        let m = mount_erofs(&idx, &[]);
        assert_same_tree(&want, &snapshot(m.path(), cmp));
    }
    // Tar index, two files: the index alone plus the tar as its device.
    let split = work.join("split.erofs");
    let tar_copy = work.join("split.tar");
    let t = erofs_image::tar_to_index(
        std::fs::File::open(tar).unwrap(),
        std::fs::File::create(&tar_copy).unwrap(),
        &BuildOptions::default(),
    )
    .unwrap();
    std::fs::write(&split, &t.index).unwrap();
    assert_eq!(
        std::fs::read(&tar_copy).unwrap(),
        std::fs::read(tar).unwrap()
    );
    fsck_all(&split, Some(&tar_copy));
    let m = mount_erofs(&split, &[&tar_copy]);
    assert_same_tree(&want, &snapshot(m.path(), cmp));
}

#[test]
fn posix_pax_tar() {
    let (t, src) = source();
    let tar = t.path().join("posix.tar");
    tar_dir(&src, &tar, "posix", &["--xattrs", "--xattrs-include=*"]);
    check_modes(
        &tar,
        &src,
        t.path(),
        Compare {
            ignore_root: true,
            ..Default::default()
        },
    );
}

#[test]
fn gnu_tar() {
    let (t, src) = source();
    let tar = t.path().join("gnu.tar");
    tar_dir(&src, &tar, "gnu", &[]);
    // GNU format has whole-second mtimes and no xattrs; long names use 'L'/'K' headers and
    // big ids and negative times use base-256.
    check_modes(
        &tar,
        &src,
        t.path(),
        Compare {
            ignore_root: true,
            ignore_nsec: true,
            ignore_xattrs: true,
            ..Default::default()
        },
    );
}

#[test]
fn ustar_prefix_names() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let deep = format!("{}/{}", "p".repeat(90), "q".repeat(60));
    sh(&format!(
        "mkdir -p {src}/{deep} && printf data > {src}/{deep}/file && ln -s file {src}/{deep}/l && chmod 750 {src}/{deep}",
        src = src.display()
    ));
    let tar = t.path().join("ustar.tar");
    tar_dir(&src, &tar, "ustar", &[]);
    check_modes(
        &tar,
        &src,
        t.path(),
        Compare {
            ignore_root: true,
            ignore_nsec: true,
            ignore_xattrs: true,
            ..Default::default()
        },
    );
}

#[test]
fn libarchive_xattrs() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sh(&format!(
        "mkdir -p {s}/d && printf v > {s}/d/f && setfattr -n user.weird=name -v 0x00ff00 {s}/d/f && setfattr -n trusted.x -v y {s}/d",
        s = src.display()
    ));
    let tar = t.path().join("bsd.tar");
    run(std::process::Command::new("bsdtar")
        .args(["--format=pax", "--xattrs", "--numeric-owner", "-C"])
        .arg(&src)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    let text = std::fs::read(&tar).unwrap();
    assert!(
        text.windows(17).any(|w| w == b"LIBARCHIVE.xattr."),
        "bsdtar wrote no LIBARCHIVE.xattr records"
    );
    check_modes(
        &tar,
        &src,
        t.path(),
        Compare {
            ignore_root: true,
            ..Default::default()
        },
    );
}

#[test]
fn compressed_inputs_give_identical_images() {
    let (t, src) = source();
    let tar = t.path().join("c.tar");
    tar_dir(&src, &tar, "posix", &["--xattrs", "--xattrs-include=*"]);
    sh(&format!(
        "cd {} && gzip -k c.tar && zstd -q c.tar",
        t.path().display()
    ));
    let opts = BuildOptions {
        uuid: [9; 16],
        timestamp: Some(0),
        ..Default::default()
    };
    let mut images = Vec::new();
    for name in ["c.tar", "c.tar.gz", "c.tar.zst"] {
        let input = erofs_image::compression::Decompressed::new(
            std::fs::File::open(t.path().join(name)).unwrap(),
            Default::default(),
        )
        .unwrap();
        let mut out = std::io::Cursor::new(Vec::new());
        erofs_image::tar_to_image(input, &mut out, &opts).unwrap();
        images.push(out.into_inner());
    }
    assert!(
        images[0] == images[1] && images[1] == images[2],
        "decompressed inputs must give the same image"
    );
}

#[test]
fn reproducible_output() {
    let (t, src) = source();
    let tar = t.path().join("r.tar");
    tar_dir(&src, &tar, "posix", &["--xattrs", "--xattrs-include=*"]);
    let opts = BuildOptions {
        uuid: [0; 16],
        timestamp: Some(1_600_000_000),
        ..oci_opts()
    };
    let build = |name: &str| {
        let p = t.path().join(name);
        build_full(&tar, &p, &opts);
        std::fs::read(p).unwrap()
    };
    assert_eq!(build("r1.erofs"), build("r2.erofs"));
    let idx = |name: &str| {
        let p = t.path().join(name);
        build_index_file(&tar, &p, &opts);
        std::fs::read(p).unwrap()
    };
    assert_eq!(idx("i1.erofs"), idx("i2.erofs"));
    // Directory conversion is reproducible too.
    let d = |name: &str| {
        let p = t.path().join(name);
        erofs_image::dir_to_image(&src, std::fs::File::create(&p).unwrap(), &opts).unwrap();
        std::fs::read(p).unwrap()
    };
    assert_eq!(d("d1.erofs"), d("d2.erofs"));
}

#[test]
fn directory_source() {
    let (t, src) = source();
    let img = t.path().join("dir.erofs");
    erofs_image::dir_to_image(
        &src,
        std::fs::File::create(&img).unwrap(),
        &BuildOptions::default(),
    )
    .unwrap();
    fsck_all(&img, None);
    let m = mount_erofs(&img, &[]);
    assert_same_tree(
        &snapshot(&src, Compare::default()),
        &snapshot(m.path(), Compare::default()),
    );
}

/// The same tar converted by mkfs.erofs 1.9 (`--tar=f --aufs`) mounts to the same tree.
#[test]
fn same_tree_as_mkfs_erofs() {
    let (t, src) = source();
    // Add OCI whiteouts so --aufs handling is compared too.
    sh(&format!(
        "cd {} && mkdir -p wh/dir && : > wh/.wh.gone && : > wh/dir/.wh..wh..opq && printf k > wh/dir/kept",
        src.display()
    ));
    let tar = t.path().join("m.tar");
    tar_dir(&src, &tar, "posix", &["--xattrs", "--xattrs-include=*"]);
    let theirs = t.path().join("theirs.erofs");
    run(std::process::Command::new(mkfs_new())
        .args([
            "--tar=f",
            "--aufs",
            "--quiet",
            "-Enoinline_data",
            "-T0",
            "--mkfs-time",
            "-Uclear",
        ])
        .arg(&theirs)
        .arg(&tar));
    let ours = t.path().join("ours.erofs");
    build_full(
        &tar,
        &ours,
        &BuildOptions {
            inline_data: false,
            ..oci_opts()
        },
    );
    fsck_all(&ours, None);
    let cmp = Compare {
        ignore_root: true,
        ..Default::default()
    };
    let a = mount_erofs(&theirs, &[]);
    let b = mount_erofs(&ours, &[]);
    let (want, got) = (snapshot(a.path(), cmp), snapshot(b.path(), cmp));
    assert!(
        got.get(&b"wh/gone"[..])
            .is_some_and(|i| i.kind == 'c' && i.rdev == 0),
        "whiteout missing"
    );
    assert_same_tree(&want, &got);
}
