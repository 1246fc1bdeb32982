//! Flattened lowers (`snapshotter.max_unmerged_layers`), in process on the real kernel (root):
//! a chain of committed layers with whiteouts, opaque directories, renames, type changes,
//! hard links and xattrs shows through its `fsmeta.erofs` mount exactly what an overlay of the
//! same layers shows; fsmeta is built once per parent (also under concurrent Prepares), shared,
//! checked like a layer before it is mounted, static once a snapshot uses it, and goes with
//! its parent. Crashes while it is built are in `conformance` (`faults`), against the daemon.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshotter::mount::{MountEvent, Mounter, RecordingMounter, SystemMounter};
use snapshotter::{Cancel, Config, Mount, Snapshotter};

fn root_only() {
    assert!(rustix::process::geteuid().is_root(), "needs root (mounts)");
}

/// A snapshotter root in a temporary directory; whatever is mounted under it is detached when
/// it goes, even when the test fails.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Root {
        Root {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn cfg(&self, snapshotter: &str) -> Config {
        Config::parse(&format!(
            "root_path = {:?}\naddress = {:?}\n[snapshotter]\n{snapshotter}\n",
            self.dir.path().join("root").display().to_string(),
            self.dir.path().join("unused.sock").display().to_string(),
        ))
        .unwrap()
    }

    fn open(&self, snapshotter: &str, m: Arc<dyn Mounter>) -> Snapshotter {
        Snapshotter::open(self.cfg(snapshotter), m).unwrap()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let m = SystemMounter::default();
        for t in m.mounts_under(self.dir.path()).unwrap_or_default() {
            let _ = m.unmount(&t);
        }
    }
}

/// One change to an upper directory, in overlayfs's format.
enum Op<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str, u32),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Whiteout(&'a str),
    Opaque(&'a str),
    Xattr(&'a str, &'a str, &'a [u8]),
    Chown(&'a str, u32, u32),
}

fn apply(upper: &Path, ops: &[Op<'_>]) {
    for op in ops {
        match *op {
            Op::File(p, data, mode) => {
                let f = upper.join(p);
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(&f, data).unwrap();
                std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .unwrap();
            }
            Op::Dir(p, mode) => {
                let d = upper.join(p);
                std::fs::create_dir_all(&d).unwrap();
                std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .unwrap();
            }
            Op::Symlink(p, target) => {
                std::os::unix::fs::symlink(target, upper.join(p)).unwrap();
            }
            Op::Hardlink(p, to) => std::fs::hard_link(upper.join(to), upper.join(p)).unwrap(),
            Op::Whiteout(p) => {
                let w = upper.join(p);
                std::fs::create_dir_all(w.parent().unwrap()).unwrap();
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &w,
                    rustix::fs::FileType::CharacterDevice,
                    rustix::fs::Mode::from_raw_mode(0o644),
                    0,
                )
                .unwrap();
            }
            Op::Opaque(p) => {
                let d = upper.join(p);
                std::fs::create_dir_all(&d).unwrap();
                rustix::fs::setxattr(
                    &d,
                    "trusted.overlay.opaque",
                    b"y",
                    rustix::fs::XattrFlags::empty(),
                )
                .unwrap();
            }
            Op::Xattr(p, name, value) => {
                rustix::fs::lsetxattr(upper.join(p), name, value, rustix::fs::XattrFlags::empty())
                    .unwrap();
            }
            Op::Chown(p, uid, gid) => {
                rustix::fs::chownat(
                    rustix::fs::CWD,
                    upper.join(p),
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )
                .unwrap();
            }
        }
    }
}

/// The upper directory of an active snapshot's mounts (host mode).
fn upper_of(m: &[Mount]) -> PathBuf {
    let m = m.last().unwrap();
    match m.kind.as_str() {
        "bind" => PathBuf::from(&m.source),
        _ => PathBuf::from(
            m.options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir="))
                .unwrap(),
        ),
    }
}

/// Commit `ops` on `parent` as `name`; returns its snapshot directory.
fn commit(s: &Snapshotter, name: &str, parent: &str, ops: &[Op<'_>]) -> PathBuf {
    let key = format!("extract-{name} chain");
    let m = s.prepare(&key, parent, BTreeMap::new()).unwrap();
    let upper = upper_of(&m);
    apply(&upper, ops);
    s.commit(name, &key, BTreeMap::new(), "", &Cancel::never())
        .unwrap();
    upper.parent().unwrap().to_path_buf()
}

/// Layers that exercise what merging must get right: whiteouts of files and directories, an
/// opaque directory, renames across layers, a file that becomes a directory and then a
/// symlink, hard links, xattrs, owners and modes.
fn tricky_chain(s: &Snapshotter) -> Vec<PathBuf> {
    let l0 = commit(
        s,
        "l0",
        "",
        &[
            Op::Dir("etc", 0o755),
            Op::File("etc/passwd", b"root:x:0:0\n", 0o644),
            Op::File("etc/shadow", b"secret\n", 0o600),
            Op::Chown("etc/shadow", 0, 42),
            Op::Dir("usr/lib", 0o755),
            Op::File("usr/lib/a.so", b"AAAA", 0o755),
            Op::Hardlink("usr/lib/a.so.1", "usr/lib/a.so"),
            Op::Dir("data/opq/sub", 0o700),
            Op::File("data/opq/sub/old", b"old", 0o644),
            Op::File("data/opq/gone", b"gone", 0o644),
            Op::File("kind", b"a file first", 0o644),
            Op::File("moved-from", b"payload", 0o640),
            Op::Xattr("etc/passwd", "user.origin", b"l0"),
        ],
    );
    let l1 = commit(
        s,
        "l1",
        "l0",
        &[
            Op::Whiteout("etc/shadow"),
            Op::Opaque("data/opq"),
            Op::File("data/opq/new", b"new", 0o644),
            Op::Dir("kind", 0o751),
            Op::File("kind/inside", b"dir now", 0o644),
            Op::Whiteout("moved-from"),
            Op::File("moved-to", b"payload", 0o640),
            Op::File("usr/lib/b.so", b"BBBB", 0o755),
            Op::Hardlink("usr/lib/b.so.1", "usr/lib/b.so"),
            Op::Chown("usr/lib/b.so", 1000, 1000),
        ],
    );
    let l2 = commit(
        s,
        "l2",
        "l1",
        &[
            Op::Symlink("kind", "etc/passwd"),
            Op::Whiteout("usr/lib/a.so.1"),
            Op::Dir("etc", 0o700),
            Op::File("etc/passwd", b"root:x:0:0\nuser:x:1000:1000\n", 0o644),
            Op::Xattr("etc/passwd", "user.origin", b"l2"),
            Op::Whiteout("data"),
        ],
    );
    let l3 = commit(
        s,
        "l3",
        "l2",
        &[
            Op::Dir("data", 0o755),
            Op::File("data/back", b"again", 0o644),
            Op::Symlink("dangling", "/nowhere"),
            Op::File("usr/lib/b.so", b"BBBB v2", 0o755),
        ],
    );
    vec![l0, l1, l2, l3]
}

/// Mount the layers of `chain` (bottom first) as one read-only overlay at `target`: what
/// containerd's overlay of the same layers shows.
fn stacked_overlay(root: &Root, chain: &[PathBuf], target: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for (i, dir) in chain.iter().enumerate().rev() {
        let layer = dir.join("layer.erofs");
        let d = root.dir.path().join(format!("ref-{i}"));
        std::fs::create_dir_all(&d).unwrap();
        erofs_sys::mount::mount_erofs_file(&layer, &d, &[]).unwrap();
        dirs.push(d);
    }
    let lowers: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    std::fs::create_dir_all(target).unwrap();
    erofs_sys::mount::mount_overlay(target, &lowers, None, &[]).unwrap();
    dirs
}

/// Write the disk a VMDK descriptor describes (`RW n FLAT "file" offset`, `RW n ZERO`) to
/// `out`, as qemu or libkrun would present it.
fn assemble_vmdk(desc: &Path, out: &Path) {
    use std::io::{Read, Seek, Write};
    let text = std::fs::read_to_string(desc).unwrap();
    let mut disk = std::fs::File::create(out).unwrap();
    for line in text.lines().filter(|l| l.starts_with("RW ")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let sectors: u64 = f[1].parse().unwrap();
        match f[2] {
            "ZERO" => disk
                .write_all(&vec![0u8; (sectors * 512) as usize])
                .unwrap(),
            "FLAT" => {
                let file = f[3].trim_matches('"');
                let offset: u64 = f[4].parse().unwrap();
                let mut src = std::fs::File::open(file).unwrap();
                src.seek(std::io::SeekFrom::Start(offset * 512)).unwrap();
                let mut buf = vec![0u8; (sectors * 512) as usize];
                // A layer's last block may end before the block: the rest reads as zeros.
                let mut got = 0;
                while got < buf.len() {
                    let n = src.read(&mut buf[got..]).unwrap();
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                disk.write_all(&buf).unwrap();
            }
            other => panic!("extent type {other} in {line:?}"),
        }
    }
}

#[test]
fn a_flattened_chain_shows_exactly_the_overlay_of_its_layers() {
    root_only();
    for loop_devices in [false, true] {
        let root = Root::new();
        let m: Arc<dyn Mounter> = if loop_devices {
            Arc::new(SystemMounter::with_loop_devices())
        } else {
            Arc::new(SystemMounter::default())
        };
        let s = root.open("max_unmerged_layers = 1", m);
        let chain = tricky_chain(&s);
        let reference = root.dir.path().join("reference");
        stacked_overlay(&root, &chain, &reference);

        // A view: the fsmeta mount itself, read-only.
        let v = s.view("v", "l3", BTreeMap::new()).unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].kind, "bind");
        let l3 = chain[3].clone();
        assert_eq!(PathBuf::from(&v[0].source), l3.join("merged"));
        testsuite::snapshots::fstest::check_equal(&reference, &l3.join("merged"))
            .unwrap_or_else(|e| panic!("loop devices {loop_devices}: {e:#}"));
        let table = testsuite::mounts::self_mounts().unwrap();
        let merged = table
            .iter()
            .find(|t| t.mount_point == l3.join("merged"))
            .expect("fsmeta is mounted");
        assert_eq!(merged.fs_type, "erofs");
        // The layers are its devices, not mounts of their own.
        // (The unpack's extract- Prepares mounted the lower layers on their own; the top one
        // never was: nothing stacks on it but the flattened snapshots.)
        assert!(
            !table.iter().any(|t| t.mount_point == l3.join("fs")),
            "the top layer is mounted on its own"
        );

        // For VM runtimes, the chain as one disk: the VMDK descriptor's extents, laid end to
        // end in one file, mount without any device= option and show the same tree.
        if !loop_devices {
            let disk = root.dir.path().join("disk.img");
            assemble_vmdk(&l3.join("fsmeta.vmdk"), &disk);
            let one = root.dir.path().join("one-disk");
            std::fs::create_dir_all(&one).unwrap();
            erofs_sys::mount::mount_erofs_file(&disk, &one, &[]).unwrap();
            testsuite::snapshots::fstest::check_equal(&reference, &one).unwrap();
        }

        // A container: an overlay whose only lower is the fsmeta mount.
        let a = s.prepare("c", "l3", BTreeMap::new()).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].kind, "overlay");
        let lowers: Vec<&String> = a[0]
            .options
            .iter()
            .filter(|o| o.starts_with("lowerdir="))
            .collect();
        assert_eq!(
            lowers,
            [&format!("lowerdir={}", l3.join("merged").display())]
        );
        let mnt = root.dir.path().join("container");
        std::fs::create_dir_all(&mnt).unwrap();
        let opts = a[0].options.join(",");
        rustix::mount::mount(
            "overlay",
            &mnt,
            "overlay",
            rustix::mount::MountFlags::empty(),
            std::ffi::CString::new(opts).unwrap().as_c_str(),
        )
        .unwrap();
        testsuite::snapshots::fstest::check_equal(&reference, &mnt).unwrap();
        std::fs::write(mnt.join("written"), b"by the container").unwrap();
        std::fs::remove_file(mnt.join("moved-to")).unwrap();
        rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::DETACH).unwrap();

        // It commits like any container (its upper dir holds only its changes), and the
        // committed layer flattens in turn.
        s.commit("l4", "c", BTreeMap::new(), "", &Cancel::never())
            .unwrap();
        let v4 = s.view("v4", "l4", BTreeMap::new()).unwrap();
        let top = PathBuf::from(&v4[0].source);
        assert!(top.ends_with("merged"), "{v4:?}");
        assert_eq!(
            std::fs::read(top.join("written")).unwrap(),
            b"by the container"
        );
        assert!(!top.join("moved-to").exists());
        assert!(top.join("etc/passwd").exists());
        assert_eq!(s.stats().fsmeta_built, 2);
        drop(s);
    }
}

#[test]
fn concurrent_prepares_on_one_parent_build_fsmeta_once() {
    let root = Root::new();
    let rec = Arc::new(RecordingMounter::new());
    let s = Arc::new(root.open("max_unmerged_layers = 1", rec.clone()));
    let dirs = [
        commit(&s, "a", "", &[Op::File("a", b"a", 0o644)]),
        commit(&s, "b", "a", &[Op::File("b", b"b", 0o644)]),
        commit(&s, "c", "b", &[Op::File("c", b"c", 0o644)]),
    ];
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                if i % 2 == 0 {
                    s.prepare(&format!("k{i}"), "c", BTreeMap::new()).unwrap()
                } else {
                    s.view(&format!("k{i}"), "c", BTreeMap::new()).unwrap()
                }
            })
        })
        .collect();
    let mounts: Vec<Vec<Mount>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(s.stats().fsmeta_built, 1);
    let cdir = dirs[2].clone();
    for m in &mounts {
        let text = format!("{m:?}");
        assert!(
            text.contains(&cdir.join("merged").display().to_string()),
            "{text}"
        );
    }
    let layers: Vec<PathBuf> = dirs.iter().map(|d| d.join("layer.erofs")).collect();
    let fsmeta_mounts: Vec<MountEvent> = rec
        .events()
        .into_iter()
        .filter(|e| matches!(e, MountEvent::ErofsDevices { .. }))
        .collect();
    assert_eq!(
        fsmeta_mounts,
        [MountEvent::ErofsDevices {
            image: cdir.join("fsmeta.erofs"),
            devices: layers,
            target: cdir.join("merged"),
        }],
        "mounted once, bottom layer first"
    );
    let vmdk = std::fs::read_to_string(cdir.join("fsmeta.vmdk")).unwrap();
    assert!(vmdk.starts_with("# Disk DescriptorFile\n"), "{vmdk}");
    assert_eq!(vmdk.matches(" FLAT ").count(), 4, "{vmdk}");
}

#[test]
fn fsmeta_goes_with_its_parent_and_not_before() {
    let root = Root::new();
    let rec = Arc::new(RecordingMounter::new());
    let s = root.open("max_unmerged_layers = 1", rec.clone());
    commit(&s, "a", "", &[Op::File("a", b"a", 0o644)]);
    let bdir = commit(&s, "b", "a", &[Op::File("b", b"b", 0o644)]);
    s.prepare("x", "b", BTreeMap::new()).unwrap();
    s.view("y", "b", BTreeMap::new()).unwrap();
    let fsmeta = bdir.join("fsmeta.erofs");
    let built = std::fs::read(&fsmeta).unwrap();
    let e = s.remove("b").unwrap_err();
    assert_eq!(e.kind(), snapshotter::ErrorKind::FailedPrecondition, "{e}");
    s.remove("x").unwrap();
    // Still in use by y, and shared: a new snapshot gets the very same file, not a rebuild.
    let ino = std::fs::metadata(&fsmeta).unwrap().ino();
    s.prepare("z", "b", BTreeMap::new()).unwrap();
    assert_eq!(std::fs::metadata(&fsmeta).unwrap().ino(), ino);
    assert_eq!(std::fs::read(&fsmeta).unwrap(), built);
    assert_eq!(s.stats().fsmeta_built, 1);
    for k in ["y", "z"] {
        s.remove(k).unwrap();
    }
    assert!(fsmeta.exists(), "fsmeta stays while its parent does");
    s.remove("b").unwrap();
    assert!(!bdir.exists());
    assert!(
        rec.mounted().keys().all(|t| !t.starts_with(&bdir)),
        "{:?}",
        rec.mounted()
    );
}

#[test]
fn whether_a_snapshot_is_flattened_never_changes() {
    let root = Root::new();
    let rec: Arc<dyn Mounter> = Arc::new(RecordingMounter::new());
    let s = root.open("max_unmerged_layers = 2", rec.clone());
    commit(&s, "a", "", &[Op::File("a", b"a", 0o644)]);
    commit(&s, "b", "a", &[Op::File("b", b"b", 0o644)]);
    commit(&s, "c", "b", &[Op::File("c", b"c", 0o644)]);
    let lowerdirs = |m: &[Mount]| {
        m.iter()
            .flat_map(|m| m.options.iter())
            .find_map(|o| o.strip_prefix("lowerdir=").map(str::to_owned))
            .unwrap_or_default()
    };
    // Two layers: not more than 2, stacked.
    let two = s.prepare("two", "b", BTreeMap::new()).unwrap();
    assert_eq!(lowerdirs(&two).split(':').count(), 2, "{two:?}");
    // Three: flattened; an unpack's Prepare never is.
    let three = s.prepare("three", "c", BTreeMap::new()).unwrap();
    assert!(lowerdirs(&three).ends_with("/merged"), "{three:?}");
    let unpack = s
        .prepare("extract-1 sha256:x", "c", BTreeMap::new())
        .unwrap();
    assert_eq!(lowerdirs(&unpack).split(':').count(), 3, "{unpack:?}");
    drop(s);
    // Reopened with flattening off, and then on for everything: each keeps its mounts.
    for cfg in ["max_unmerged_layers = 0", "max_unmerged_layers = 1"] {
        let s = root.open(cfg, rec.clone());
        assert_eq!(s.mounts("two").unwrap(), two, "{cfg}");
        assert_eq!(s.mounts("three").unwrap(), three, "{cfg}");
        assert_eq!(s.mounts("extract-1 sha256:x").unwrap(), unpack, "{cfg}");
    }
    // Off: new snapshots are stacked.
    let s = root.open("max_unmerged_layers = 0", rec.clone());
    let off = s.prepare("off", "c", BTreeMap::new()).unwrap();
    assert_eq!(lowerdirs(&off).split(':').count(), 3, "{off:?}");
}

#[test]
fn fsmeta_is_checked_like_a_layer_and_an_unrecorded_one_is_never_used() {
    let root = Root::new();
    let rec = Arc::new(RecordingMounter::new());
    // fs-verity without kernel support here: digests recorded and re-checked in userspace.
    let cfg = "max_unmerged_layers = 1\nenable_fsverity = true";
    let s = root.open(cfg, rec.clone());
    commit(&s, "a", "", &[Op::File("a", b"a", 0o644)]);
    let bdir = commit(&s, "b", "a", &[Op::File("b", b"b", 0o644)]);
    let cdir = commit(&s, "c", "b", &[Op::File("c", b"c", 0o644)]);
    s.view("v", "b", BTreeMap::new()).unwrap();
    let fsmeta = bdir.join("fsmeta.erofs");
    // Modified after it was recorded: the next mount of it is refused.
    let mut bytes = std::fs::read(&fsmeta).unwrap();
    let at = bytes.len() - 1;
    bytes[at] ^= 0xff;
    std::fs::write(&fsmeta, &bytes).unwrap();
    rec.unmount(&bdir.join("merged")).unwrap();
    let e = s.view("v2", "b", BTreeMap::new()).unwrap_err();
    assert!(e.to_string().contains("modified or replaced"), "{e}");
    assert!(s.stat("v2").is_err(), "a refused View is not left behind");
    drop(s);

    // A file where no fsmeta is recorded (a build a crash cut short) goes at start-up and is
    // never mounted.
    std::fs::write(cdir.join("fsmeta.erofs"), b"half-made").unwrap();
    std::fs::write(cdir.join("fsmeta.erofs.tmp"), b"half-made").unwrap();
    let s = root.open(cfg, rec.clone());
    assert!(!cdir.join("fsmeta.erofs").exists());
    assert!(!cdir.join("fsmeta.erofs.tmp").exists());
    s.view("w", "c", BTreeMap::new()).unwrap();
    let img =
        erofs_image::Image::open(std::fs::File::open(cdir.join("fsmeta.erofs")).unwrap()).unwrap();
    assert_eq!(img.device_slots().len(), 3);
}

#[test]
fn manager_mode_hands_out_fsmeta_with_one_device_per_layer() {
    let root = Root::new();
    let rec = Arc::new(RecordingMounter::new());
    let cfg = Config::parse(&format!(
        "root_path = {:?}\naddress = {:?}\nmount_mode = \"manager\"\n[snapshotter]\nmax_unmerged_layers = 1\n",
        root.dir.path().join("root").display().to_string(),
        root.dir.path().join("unused.sock").display().to_string(),
    ))
    .unwrap();
    let s = Snapshotter::open(cfg, rec.clone()).unwrap();
    // Parentless snapshots are plain binds in manager mode too: commit through them.
    let dirs: Vec<PathBuf> = [("a", ""), ("b", "a"), ("c", "b")]
        .iter()
        .map(|(n, p)| {
            let key = format!("{n}-active");
            let m = s.prepare(&key, p, BTreeMap::new()).unwrap();
            let upper = match m.last().unwrap().kind.as_str() {
                "bind" => PathBuf::from(&m[0].source),
                _ => PathBuf::from(
                    m.last()
                        .unwrap()
                        .options
                        .iter()
                        .find_map(|o| o.strip_prefix("upperdir="))
                        .unwrap(),
                ),
            };
            std::fs::write(upper.join(n), n.as_bytes()).unwrap();
            s.commit(n, &key, BTreeMap::new(), "", &Cancel::never())
                .unwrap();
            upper.parent().unwrap().to_path_buf()
        })
        .collect();
    let fsmeta = Mount {
        kind: "erofs".into(),
        source: dirs[2].join("fsmeta.erofs").display().to_string(),
        target: String::new(),
        options: ["ro".to_string(), "loop".to_string()]
            .into_iter()
            .chain(
                dirs.iter()
                    .map(|d| format!("device={}", d.join("layer.erofs").display())),
            )
            .collect(),
    };
    let v = s.view("v", "c", BTreeMap::new()).unwrap();
    assert_eq!(v, std::slice::from_ref(&fsmeta));
    let a = s.prepare("x", "c", BTreeMap::new()).unwrap();
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[0], fsmeta);
    assert_eq!(a[1].kind, "format/mkdir/overlay");
    assert_eq!(a[1].options.last().unwrap(), "lowerdir={{ mount 0 }}");
    assert_eq!(s.mounts("x").unwrap(), a, "Mounts is what Prepare returned");
    // containerd mounts it; the daemon mounted nothing.
    assert!(rec.mounted().is_empty(), "{:?}", rec.mounted());
    assert!(dirs[2].join("fsmeta.vmdk").is_file());
}
