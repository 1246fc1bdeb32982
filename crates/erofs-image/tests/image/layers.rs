//! Layers stacked with overlayfs: OCI whiteouts and opaque directories from tar layers, and
//! overlayfs upper directories converted to lower layers.

use std::fs::{self, File};
use std::path::Path;

use erofs_image::BuildOptions;
use erofs_image::tar::{Entry, EntryKind, TarWriter};

use crate::common::*;

const T: i64 = 1_000_000;

fn layer(path: &Path, entries: &[(&str, char, &str)]) {
    let mut w = TarWriter::new(File::create(path).unwrap());
    for &(name, kind, content) in entries {
        let k = match kind {
            'd' => EntryKind::Directory,
            'f' => EntryKind::Regular,
            'l' => EntryKind::Symlink,
            'h' => EntryKind::Hardlink,
            _ => unreachable!(),
        };
        let mut e = Entry::new(name, k);
        e.mtime = T;
        if matches!(kind, 'l' | 'h') {
            e.link = content.into();
        }
        w.append_bytes(&e, if kind == 'f' { content.as_bytes() } else { b"" })
            .unwrap();
    }
    w.finish().unwrap();
}

fn stack(work: &Path, index: bool) -> Vec<Mount> {
    let l1 = work.join("l1.tar");
    layer(
        &l1,
        &[
            ("etc", 'd', ""),
            ("etc/keep", 'f', "keep"),
            ("etc/remove-me", 'f', "old"),
            ("etc/both", 'f', "lower"),
            ("lib", 'd', ""),
            ("lib/a", 'f', "a"),
            ("lib/b", 'f', "b"),
            ("lib/sub", 'd', ""),
            ("lib/sub/c", 'f', "c"),
            ("opt", 'd', ""),
            ("opt/x", 'd', ""),
            ("opt/x/y", 'f', "y"),
            ("usr", 'd', ""),
            ("usr/bin", 'd', ""),
            ("usr/bin/sh", 'f', "shell"),
            ("usr/bin/link", 'h', "usr/bin/sh"),
        ],
    );
    let l2 = work.join("l2.tar");
    layer(
        &l2,
        &[
            ("etc", 'd', ""),
            ("etc/.wh.remove-me", 'f', ""),
            ("lib", 'd', ""),
            ("lib/.wh..wh..opq", 'f', ""),
            ("lib/new", 'f', "new"),
            ("usr", 'd', ""),
            ("usr/bin", 'd', ""),
            ("usr/bin/tool", 'f', "tool"),
            ("opt", 'd', ""),
            ("opt/.wh.x", 'f', ""),
            ("etc/.wh.never-existed", 'f', ""),
        ],
    );
    let l3 = work.join("l3.tar");
    layer(
        &l3,
        &[
            ("etc", 'd', ""),
            ("etc/remove-me", 'f', "again"),
            // A whiteout and a real file of the same name in one layer: the file wins, in either order.
            ("etc/.wh.both", 'f', ""),
            ("etc/both", 'f', "upper"),
            ("etc/three", 'f', "3"),
            ("etc/.wh.three", 'f', ""),
            ("lib", 'd', ""),
            ("lib/.wh.new", 'f', ""),
            ("lib/newer", 'f', "newer"),
            ("opt", 'd', ""),
            ("opt/x", 'd', ""),
            ("opt/x/z", 'f', "z"),
            ("usr", 'd', ""),
            ("usr/bin", 'd', ""),
            ("usr/bin/.wh.tool", 'f', ""),
        ],
    );
    let mut mounts = Vec::new();
    for (i, tar) in [l1, l2, l3].iter().enumerate() {
        let img = work.join(format!(
            "l{}.{}",
            i + 1,
            if index { "idx" } else { "erofs" }
        ));
        if index {
            build_index_file(tar, &img, &oci_opts());
        } else {
            build_full(tar, &img, &oci_opts());
        }
        fsck_all(&img, None);
        mounts.push(mount_erofs(&img, &[]));
    }
    mounts
}

fn expected(work: &Path) -> std::path::PathBuf {
    let e = work.join("expected");
    sh(&format!(
        r#"mkdir -p {e} && cd {e}
mkdir -p etc lib opt/x usr/bin
printf keep > etc/keep; printf again > etc/remove-me; printf upper > etc/both; printf 3 > etc/three
printf newer > lib/newer
printf z > opt/x/z
printf shell > usr/bin/sh; ln usr/bin/sh usr/bin/link
find . -mindepth 1 -exec touch -h -d @{T} {{}} +"#,
        e = e.display()
    ));
    e
}

fn check_stack(index: bool) {
    let t = tempfile::tempdir().unwrap();
    let mounts = stack(t.path(), index);
    let (l1, l2, l3) = (mounts[0].path(), mounts[1].path(), mounts[2].path());
    // Whiteouts are real 0:0 char devices in the layer; opaque dirs and whiteout parents carry
    // the overlay xattrs.
    let wh = fs::symlink_metadata(l2.join("etc/remove-me")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &wh.file_type()
    ));
    assert_eq!(std::os::unix::fs::MetadataExt::rdev(&wh), 0);
    assert!(xattrs(&l2.join("lib")).contains(&(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())));
    assert!(xattrs(&l2.join("etc")).contains(&(b"trusted.overlay.origin".to_vec(), Vec::new())));
    let ov = mount_overlay(&[l3, l2, l1]);
    let cmp = Compare {
        ignore_root: true,
        ignore_dir_nlink: true,
        ..Default::default()
    };
    assert_same_tree(
        &snapshot(&expected(t.path()), cmp),
        &snapshot(ov.path(), cmp),
    );
    // The layer alone as the only lower of a writable overlay (an active snapshot on a
    // one-layer parent) hides its whiteouts too, thanks to the origin xattr.
    let (up, wk) = (t.path().join("up"), t.path().join("wk"));
    fs::create_dir(&up).unwrap();
    fs::create_dir(&wk).unwrap();
    let single = mount_overlay_rw(&[l2], &up, &wk);
    let names: Vec<_> = fs::read_dir(single.path().join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names.is_empty(),
        "whiteouts visible in a single-layer overlay: {names:?}"
    );
}

#[test]
fn three_tar_layers_full() {
    check_stack(false);
}

#[test]
fn three_tar_layers_index() {
    check_stack(true);
}

/// An overlayfs upper directory, converted to EROFS and used as a lower layer, shows the same
/// merged tree as the live overlay did.
#[test]
fn upper_dir_becomes_lower_layer() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base");
    fs::create_dir(&base).unwrap();
    rich_fixture(&base);
    let base_img = t.path().join("base.erofs");
    erofs_image::dir_to_image(
        &base,
        File::create(&base_img).unwrap(),
        &BuildOptions::default(),
    )
    .unwrap();
    let base_m = mount_erofs(&base_img, &[]);
    let (upper, work, merged) = (
        t.path().join("upper"),
        t.path().join("work"),
        t.path().join("merged"),
    );
    for d in [&upper, &work, &merged] {
        fs::create_dir(d).unwrap();
    }
    sh(&format!(
        "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={} {}",
        base_m.path().display(),
        upper.display(),
        work.display(),
        merged.display()
    ));
    let changes = format!(
        r#"cd {m}
rm a/hello a/b/random
rm -rf a/b/c && mkdir a/b/c && printf fresh > a/b/c/new
printf changed >> a/exact4096
chmod 0600 a/over4096; chown 12:34 a/empty
mv a/empty a/moved
mkdir -p newdir/sub && printf n > newdir/sub/n && ln newdir/sub/n newdir/hl1 && ln newdir/sub/n newdir/hl2
truncate -s 3G newdir/sparse && printf tail | dd of=newdir/sparse bs=1 seek=3000000000 conv=notrunc status=none
mkfifo newdir/fifo; mknod newdir/dev c 10 200
setfattr -n user.added -v yes a/link 2>/dev/null || true
setfattr -n trusted.added -v yes a/exact4096
ln -s newdir/sub a/newlink
rm -rf deep-directory-level-00"#,
        m = merged.display()
    );
    let result = std::panic::catch_unwind(|| {
        sh(&changes);
        snapshot(
            &merged,
            Compare {
                ignore_root: true,
                ignore_dir_nlink: true,
                ..Default::default()
            },
        )
    });
    sh(&format!("umount {}", merged.display()));
    let want = result.unwrap();
    let upper_img = t.path().join("upper.erofs");
    erofs_image::dir_to_image(
        &upper,
        File::create(&upper_img).unwrap(),
        &BuildOptions::default(),
    )
    .unwrap();
    fsck_all(&upper_img, None);
    let up = mount_erofs(&upper_img, &[]);
    let ov = mount_overlay(&[up.path(), base_m.path()]);
    assert_same_tree(
        &want,
        &snapshot(
            ov.path(),
            Compare {
                ignore_root: true,
                ignore_dir_nlink: true,
                ..Default::default()
            },
        ),
    );
}
