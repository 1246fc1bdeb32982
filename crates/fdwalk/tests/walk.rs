//! The walker on real trees, and the races of CVE-2018-15664 built deterministically: the
//! walk is driven step by step and the tree is changed between two steps, exactly where a
//! running container could change it. Some cases need root (trusted xattrs, device nodes,
//! bind mounts) and say so.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::Path;

use fdwalk::{Error, Kind, Tree};

const SECRET: &[u8] = b"HOST-SECRET-9b1f0c";

/// A tree, and next to it (outside it) a directory holding a secret file.
struct Fixture {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("upper");
    let outside = tmp.path().join("host");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("shadow"), SECRET).unwrap();
    Fixture {
        _tmp: tmp,
        root,
        outside,
    }
}

fn assert_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (trusted xattrs, device nodes or mounts)"
    );
}

fn paths(tree: &Tree) -> Vec<String> {
    tree.walk()
        .map(|e| String::from_utf8(e.unwrap().path().to_vec()).unwrap())
        .collect()
}

/// Each directory's entries in name order, then its subdirectories' (the order the image
/// builder lays file data out in); symlinks are reported as symlinks, never followed.
#[test]
fn walks_in_order_without_following() {
    let f = fixture();
    let r = &f.root;
    fs::create_dir_all(r.join("b/y")).unwrap();
    fs::create_dir_all(r.join("a")).unwrap();
    fs::write(r.join("a/2"), b"two").unwrap();
    fs::write(r.join("a/1"), b"one").unwrap();
    fs::write(r.join("b/y/z"), b"z").unwrap();
    fs::write(r.join("c"), b"c").unwrap();
    symlink(&f.outside, r.join("out")).unwrap();
    fs::hard_link(r.join("c"), r.join("a/c-link")).unwrap();

    let tree = Tree::open(r).unwrap();
    assert_eq!(
        paths(&tree),
        [
            "a", "b", "c", "out", "a/1", "a/2", "a/c-link", "b/y", "b/y/z"
        ]
    );
    let e = tree.walk().find(|e| e.as_ref().unwrap().name() == b"out");
    let e = e.unwrap().unwrap();
    assert_eq!(e.meta().kind(), Kind::Symlink);
    let node = e.open().unwrap();
    assert_eq!(
        node.read_link().unwrap(),
        f.outside.as_os_str().as_encoded_bytes()
    );
    // A symlink has no data to read: the walker refuses to reopen it.
    assert!(node.file().is_err());

    let metas: Vec<_> = tree.walk().map(|e| *e.unwrap().meta()).collect();
    let c = fs::symlink_metadata(r.join("c")).unwrap();
    assert_eq!(metas.iter().filter(|m| m.ino == c.ino()).count(), 2);
    assert_eq!(metas[2].nlink, 2);
    assert_eq!(metas[2].size, 1);
}

/// The file swap: `f` is listed as a regular file, then replaced by a symlink to a host file
/// before it is opened. The open refuses it, naming the path, and reads nothing.
#[test]
fn a_file_swapped_for_a_symlink_after_listing_is_refused() {
    let f = fixture();
    fs::write(f.root.join("f"), b"in the tree").unwrap();
    let tree = Tree::open(&f.root).unwrap();
    let mut walk = tree.walk();
    let e = walk.next().unwrap().unwrap();
    assert_eq!((e.path(), e.meta().kind()), (&b"f"[..], Kind::Regular));

    fs::remove_file(f.root.join("f")).unwrap();
    symlink(f.outside.join("shadow"), f.root.join("f")).unwrap();

    let err = e.open().unwrap_err();
    assert!(matches!(err, Error::Changed { .. }), "{err}");
    assert!(err.to_string().contains("upper/f"), "{err}");
}

/// The same swap after the walk, when a caller comes back for the data ([`Tree::open_at`]):
/// refused, whether the file itself or a directory above it became a symlink.
#[test]
fn a_deferred_open_of_a_swapped_path_is_refused() {
    let f = fixture();
    fs::create_dir(f.root.join("d")).unwrap();
    fs::write(f.root.join("d/f"), b"in the tree").unwrap();
    fs::write(f.root.join("g"), b"in the tree").unwrap();
    let tree = Tree::open(&f.root).unwrap();
    let walked: Vec<_> = tree
        .walk()
        .map(|e| {
            let e = e.unwrap();
            (e.path().to_vec(), *e.meta())
        })
        .collect();

    // Before any swap the data reads back.
    let mut s = String::new();
    tree.open_at(b"d/f", &walked[2].1)
        .unwrap()
        .into_file()
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "in the tree");

    fs::remove_file(f.root.join("g")).unwrap();
    symlink(f.outside.join("shadow"), f.root.join("g")).unwrap();
    fs::rename(f.root.join("d"), f.root.join("d.old")).unwrap();
    symlink(&f.outside, f.root.join("d")).unwrap();
    fs::rename(f.outside.join("shadow"), f.outside.join("f")).unwrap();

    for (path, meta) in &walked {
        if path == b"d" || path == b"d/f" || path == b"g" {
            let err = tree.open_at(path, meta).unwrap_err();
            assert!(matches!(err, Error::Changed { .. }), "{err}");
        }
    }
    // Another regular file of the tree at the same name is refused too: not the inode walked.
    fs::write(f.root.join("h"), b"new").unwrap();
    let err = tree.open_at(b"h", &walked[1].1).unwrap_err();
    assert!(matches!(err, Error::Changed { .. }), "{err}");
}

/// The directory swap: `d` is listed as a directory, then replaced by a symlink to a host
/// directory before the walk lists it. The walk stops with an error instead of listing the
/// host directory; with `skip_changed` it leaves `d`'s contents out. Either way nothing of
/// the host directory is reported.
#[test]
fn a_directory_swapped_for_a_symlink_is_not_entered() {
    for skip in [false, true] {
        let f = fixture();
        fs::create_dir(f.root.join("d")).unwrap();
        fs::write(f.root.join("d/inside"), b"x").unwrap();
        fs::write(f.root.join("e"), b"x").unwrap();
        let tree = Tree::open(&f.root).unwrap();
        let mut walk = tree.walk();
        if skip {
            walk = walk.skip_changed();
        }
        let first = walk.next().unwrap().unwrap();
        assert_eq!(first.path(), b"d");

        fs::rename(f.root.join("d"), f.root.join("d.old")).unwrap();
        symlink(&f.outside, f.root.join("d")).unwrap();

        let rest: Vec<_> = walk.collect();
        let names: Vec<_> = rest
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|e| String::from_utf8_lossy(e.path()).into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains("shadow")), "{names:?}");
        if skip {
            assert_eq!(names, ["e"]);
        } else {
            assert_eq!(names, ["e"]);
            let err = rest.last().unwrap().as_ref().unwrap_err();
            assert!(matches!(err, Error::Changed { .. }), "{err}");
            assert!(err.to_string().contains("upper/d "), "{err}");
        }
    }
}

/// A regular file swapped for a FIFO between listing and opening: refused, and the walker
/// does not block opening it (an `O_PATH` handle opens nothing).
#[test]
fn a_file_swapped_for_a_fifo_is_refused_without_blocking() {
    let f = fixture();
    fs::write(f.root.join("f"), b"x").unwrap();
    let tree = Tree::open(&f.root).unwrap();
    let mut walk = tree.walk();
    let e = walk.next().unwrap().unwrap();
    fs::remove_file(f.root.join("f")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        f.root.join("f"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let err = e.open().unwrap_err();
    assert!(matches!(err, Error::Changed { .. }), "{err}");
}

/// A listed entry gone before it is stat'ed is left out; the walk goes on.
#[test]
fn entries_removed_before_they_are_looked_at_are_left_out() {
    let f = fixture();
    for n in ["a", "b", "c"] {
        fs::write(f.root.join(n), b"x").unwrap();
    }
    let tree = Tree::open(&f.root).unwrap();
    let mut walk = tree.walk();
    assert_eq!(walk.next().unwrap().unwrap().path(), b"a");
    fs::remove_file(f.root.join("b")).unwrap();
    let rest: Vec<_> = walk.map(|e| e.unwrap().path().to_vec()).collect();
    assert_eq!(rest, [b"c".to_vec()]);
}

/// The attributes of a symlink are the link's own, not its target's, and those of a device
/// node are read without opening it.
#[test]
fn xattrs_of_links_and_devices_are_their_own() {
    assert_root();
    let f = fixture();
    let target = f.outside.join("shadow");
    rustix::fs::setxattr(
        &target,
        "trusted.who",
        b"target",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    symlink(&target, f.root.join("l")).unwrap();
    rustix::fs::lsetxattr(
        f.root.join("l"),
        "trusted.who",
        b"link",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    // A whiteout (0:0) and a real device (/dev/null's numbers): opening either would fail or
    // do something; reading their attributes must not open them.
    for (name, dev) in [
        ("wh", rustix::fs::makedev(0, 0)),
        ("null", rustix::fs::makedev(1, 3)),
    ] {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            f.root.join(name),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            dev,
        )
        .unwrap();
        rustix::fs::lsetxattr(
            f.root.join(name),
            "trusted.who",
            name.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
    fs::create_dir(f.root.join("dir")).unwrap();
    rustix::fs::setxattr(
        f.root.join("dir"),
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();

    let tree = Tree::open(&f.root).unwrap();
    let mut got = Vec::new();
    for e in tree.walk() {
        let e = e.unwrap();
        let x = e.open().unwrap().xattrs().unwrap();
        got.push((String::from_utf8(e.path().to_vec()).unwrap(), x));
    }
    let want = |n: &str, k: &str, v: &str| (n.to_string(), vec![(k.into(), v.into())]);
    assert_eq!(
        got,
        vec![
            want("dir", "trusted.overlay.opaque", "y"),
            want("l", "trusted.who", "link"),
            want("null", "trusted.who", "null"),
            want("wh", "trusted.who", "wh"),
        ]
    );
}

/// A bind mount inside the tree (host data, not the tree's): refused by default, left out
/// with `skip_mounts`.
#[test]
fn mounts_inside_the_tree_are_not_entered() {
    assert_root();
    let f = fixture();
    fs::create_dir(f.root.join("m")).unwrap();
    fs::write(f.root.join("z"), b"x").unwrap();
    rustix::mount::mount_bind(&f.outside, f.root.join("m")).unwrap();
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(self.0, rustix::mount::UnmountFlags::DETACH);
        }
    }
    let m = f.root.join("m");
    let _u = Unmount(&m);

    let tree = Tree::open(&f.root).unwrap();
    let err = tree.walk().find_map(|e| e.err()).unwrap();
    assert!(matches!(err, Error::CrossesMount { .. }), "{err}");
    assert!(err.to_string().contains("upper/m"), "{err}");
    let names: Vec<_> = tree
        .walk()
        .skip_mounts()
        .map(|e| e.unwrap().path().to_vec())
        .collect();
    assert_eq!(names, [b"z".to_vec()]);
}

/// Paths longer than one lookup may take (PATH_MAX) are resolved in steps.
#[test]
fn deep_trees_are_walked_and_reopened() {
    let f = fixture();
    let name = "n".repeat(200);
    let mut depth = 0;
    // About 6 KB of relative path: more than PATH_MAX. Built with *at calls from the
    // deepest directory held open, since no absolute path could reach it.
    let mut dir = rustix::fs::open(
        &f.root,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    while depth < 30 {
        rustix::fs::mkdirat(&dir, name.as_str(), rustix::fs::Mode::from_raw_mode(0o755)).unwrap();
        dir = rustix::fs::openat(
            &dir,
            name.as_str(),
            rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        depth += 1;
    }
    let file = rustix::fs::openat(
        &dir,
        "leaf",
        rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&file, b"deep").unwrap();

    let tree = Tree::open(&f.root).unwrap();
    let entries: Vec<_> = tree
        .walk()
        .map(|e| {
            let e = e.unwrap();
            (e.path().to_vec(), *e.meta())
        })
        .collect();
    assert_eq!(entries.len(), 31);
    let (leaf, meta) = entries.last().unwrap();
    assert!(leaf.len() > 6000);
    let mut s = String::new();
    tree.open_at(leaf, meta)
        .unwrap()
        .into_file()
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "deep");
}
