//! EROFS and overlay mounts through the new mount API (needs root).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{MountGuard, eventually, mountinfo};
use erofs_sys::loop_device;
use erofs_sys::mount::{self, FSCONFIG_MAX_STRING, MountError};

const MKFS_EROFS: &str = "mkfs.erofs";

/// Builds an EROFS image of a small tree with mkfs.erofs, if installed.
fn build_image(dir: &Path) -> Option<PathBuf> {
    let tree = dir.join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("hello.txt"), b"hello erofs\n").unwrap();
    fs::write(tree.join("sub/big.bin"), vec![0x5a; 100_000]).unwrap();
    let image = dir.join("image.erofs");
    match Command::new(MKFS_EROFS).arg(&image).arg(&tree).output() {
        Ok(out) if out.status.success() => Some(image),
        Ok(out) => panic!(
            "mkfs.erofs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => {
            eprintln!("skipping: {MKFS_EROFS} not runnable: {e}");
            None
        }
    }
}

fn check_tree(target: &Path) {
    assert_eq!(
        fs::read(target.join("hello.txt")).unwrap(),
        b"hello erofs\n"
    );
    assert_eq!(
        fs::read(target.join("sub/big.bin")).unwrap(),
        vec![0x5a; 100_000]
    );
}

#[test]
fn mount_erofs_image_file() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let Some(image) = build_image(dir.path()) else {
        return;
    };
    let target = dir.path().join("mnt");
    fs::create_dir(&target).unwrap();

    mount::mount_erofs_file(&image, &target, &[]).unwrap();
    let mounted = MountGuard::new(&target);
    check_tree(&target);
    let info = mountinfo(&target).expect("mounted");
    let fields: Vec<&str> = info.split(' ').collect();
    // Mount options: ro,nosuid,nodev; filesystem type after the separator.
    let mount_opts = fields[5];
    for opt in ["ro", "nosuid", "nodev"] {
        assert!(mount_opts.split(',').any(|o| o == opt), "{info}");
    }
    let sep = fields.iter().position(|f| *f == "-").unwrap();
    assert_eq!(fields[sep + 1], "erofs", "{info}");
    assert_eq!(fields[sep + 2], image.to_str().unwrap(), "{info}");
    // Writing is refused.
    let err = fs::write(target.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    // No descriptor keeps the mount busy: a plain umount works.
    mounted.unmount().unwrap();
    assert!(mountinfo(&target).is_none());
}

#[test]
fn mount_erofs_from_loop_device_then_autoclear() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let Some(image) = build_image(dir.path()) else {
        return;
    };
    let target = dir.path().join("mnt");
    fs::create_dir(&target).unwrap();

    let dev = loop_device::attach(&image, false).unwrap();
    let number = dev.number();
    mount::mount_erofs_file(dev.path(), &target, &[]).unwrap();
    let mounted = MountGuard::new(&target);
    // The mount keeps the device bound after our descriptor is closed.
    drop(dev);
    check_tree(&target);
    let backing = format!("/sys/block/loop{number}/loop/backing_file");
    assert!(Path::new(&backing).exists());

    mounted.unmount().unwrap();
    assert!(
        eventually(|| !Path::new(&backing).exists()),
        "loop{number} not freed after unmount"
    );
}

#[test]
fn erofs_bad_image_fails_at_create() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.img");
    fs::write(&garbage, vec![0u8; 64 * 1024]).unwrap();
    let target = dir.path().join("mnt");
    fs::create_dir(&target).unwrap();

    let err = mount::mount_erofs_file(&garbage, &target, &[]).unwrap_err();
    let _cleanup = MountGuard::new(&target);
    eprintln!("observed: {err}");
    match &err {
        MountError::Kernel {
            fstype,
            step,
            source,
            messages,
        } => {
            assert_eq!(fstype, "erofs");
            assert_eq!(step, "fsconfig_create");
            assert_eq!(source.raw_os_error(), Some(libc::EINVAL));
            // EROFS on Linux 6.18 reports superblock errors only to the
            // kernel log ("erofs (device erofs): cannot find valid erofs
            // superblock" in dmesg), not to the filesystem context.
            assert!(
                messages.iter().all(|m| m.starts_with("e erofs")),
                "{messages:?}"
            );
        }
        e => panic!("unexpected {e:?}"),
    }
    assert!(mountinfo(&target).is_none());
}

#[test]
fn erofs_file_backed_mount_wants_a_file_or_block_device() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("mnt");
    fs::create_dir(&target).unwrap();
    let err = mount::mount_erofs_file(dir.path(), &target, &[]).unwrap_err();
    let _cleanup = MountGuard::new(&target);
    match &err {
        MountError::Kernel { source, .. } => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOTBLK), "{err}")
        }
        e => panic!("unexpected {e:?}"),
    }
    let err = mount::mount_erofs_file(&dir.path().join("missing"), &target, &[]).unwrap_err();
    match &err {
        MountError::Kernel { source, .. } => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{err}")
        }
        e => panic!("unexpected {e:?}"),
    }
}

#[test]
fn overlay_refuses_more_than_500_lowers() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let lowers: Vec<PathBuf> = (0..501).map(|i| dir.path().join(format!("l{i}"))).collect();
    for l in &lowers {
        fs::create_dir(l).unwrap();
    }
    let target = dir.path().join("merged");
    fs::create_dir(&target).unwrap();
    let refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();

    mount::mount_overlay(&target, &refs[..500], None, &[]).unwrap();
    MountGuard::new(&target).unmount().unwrap();

    let err = mount::mount_overlay(&target, &refs, None, &[]).unwrap_err();
    let _cleanup = MountGuard::new(&target);
    match &err {
        MountError::Kernel { step, messages, .. } => {
            assert!(step.ends_with("/l500)"), "{step}");
            assert_eq!(
                messages,
                &vec!["e overlay: too many lower directories, limit is 500".to_owned()]
            );
        }
        e => panic!("unexpected {e:?}"),
    }
}

/// Makes `n` lower layers whose paths add up to more than 4096 bytes. Layer
/// `i` holds `only-i` and a `common` file with content `i`.
fn make_lowers(root: &Path, n: usize) -> Vec<PathBuf> {
    let lowers: Vec<PathBuf> = (0..n)
        .map(|i| root.join(format!("lower-layer-with-a-fairly-long-name-{i:03}")))
        .collect();
    for (i, lower) in lowers.iter().enumerate() {
        fs::create_dir(lower).unwrap();
        fs::write(lower.join(format!("only-{i}")), i.to_string()).unwrap();
        fs::write(lower.join("common"), i.to_string()).unwrap();
    }
    lowers
}

#[test]
fn overlay_with_130_lowers_beyond_the_option_page() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let lowers = make_lowers(dir.path(), 130);
    let total: usize = lowers.iter().map(|p| p.as_os_str().len() + 1).sum();
    assert!(total > 4096, "paths total only {total} bytes");
    let target = dir.path().join("merged");
    fs::create_dir(&target).unwrap();

    let refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    mount::mount_overlay(&target, &refs, None, &[]).unwrap();
    let mounted = MountGuard::new(&target);

    for i in 0..130 {
        assert_eq!(
            fs::read_to_string(target.join(format!("only-{i}"))).unwrap(),
            i.to_string()
        );
    }
    // Lowers are given top-first: the first one wins.
    assert_eq!(fs::read_to_string(target.join("common")).unwrap(), "0");
    assert_eq!(fs::read_dir(&target).unwrap().count(), 131);
    // Without an upper layer the overlay is read-only.
    let err = fs::write(target.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let info = mountinfo(&target).unwrap();
    assert!(info.contains(" - overlay overlay "), "{info}");

    mounted.unmount().unwrap();
}

/// The `mount(2)` path older kernels get (Linux before 6.8 has no `lowerdir+`): 130 lowers
/// beyond the option page still mount, through their open common parent, top-first, with an
/// upper layer; lowers that cannot be shortened enough, or with a comma in a path, are
/// refused with a message before the kernel sees them.
#[test]
fn overlay_legacy_with_130_lowers_beyond_the_option_page() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    // Laid out as the snapshotter's: ROOT/snapshots/N/fs, 130 of them past the page.
    let snaps = dir
        .path()
        .join("a-snapshotter-root-with-a-long-name/snapshots");
    let lowers: Vec<PathBuf> = (0..130).map(|i| snaps.join(format!("{i}/fs"))).collect();
    for (i, l) in lowers.iter().enumerate() {
        fs::create_dir_all(l).unwrap();
        fs::write(l.join(format!("only-{i}")), i.to_string()).unwrap();
        fs::write(l.join("common"), i.to_string()).unwrap();
    }
    let total: usize = lowers.iter().map(|p| p.as_os_str().len() + 1).sum();
    assert!(total > 4096, "paths total only {total} bytes");
    let target = dir.path().join("merged");
    let (upper, work) = (dir.path().join("upper"), dir.path().join("work"));
    for d in [&target, &upper, &work] {
        fs::create_dir(d).unwrap();
    }
    let refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    mount::mount_overlay_legacy(&target, &refs, Some((&upper, &work)), &["index=off".into()])
        .unwrap();
    let mounted = MountGuard::new(&target);
    for i in [0, 64, 129] {
        assert_eq!(
            fs::read_to_string(target.join(format!("only-{i}"))).unwrap(),
            i.to_string()
        );
    }
    assert_eq!(fs::read_to_string(target.join("common")).unwrap(), "0");
    fs::write(target.join("new"), b"x").unwrap();
    assert_eq!(fs::read(upper.join("new")).unwrap(), b"x");
    mounted.unmount().unwrap();

    let long = make_lowers(dir.path(), 130);
    let refs: Vec<&Path> = long.iter().map(PathBuf::as_path).collect();
    let err = mount::mount_overlay_legacy(&target, &refs, None, &[]).unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
    let comma = dir.path().join("a,b");
    fs::create_dir(&comma).unwrap();
    assert!(matches!(
        mount::mount_overlay_legacy(&target, &[&comma], None, &[]),
        Err(MountError::InvalidOption(_))
    ));
}

#[test]
fn overlay_with_upper_and_extra_options() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let lowers = make_lowers(dir.path(), 2);
    let upper = dir.path().join("upper");
    let work = dir.path().join("work");
    let target = dir.path().join("merged");
    for d in [&upper, &work, &target] {
        fs::create_dir(d).unwrap();
    }
    let refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    mount::mount_overlay(
        &target,
        &refs,
        Some((&upper, &work)),
        &[
            "index=off".to_owned(),
            "uuid=off".to_owned(),
            "volatile".to_owned(),
        ],
    )
    .unwrap();
    let mounted = MountGuard::new(&target);

    fs::write(target.join("new"), b"written").unwrap();
    fs::write(target.join("common"), b"changed").unwrap();
    assert_eq!(fs::read(upper.join("new")).unwrap(), b"written");
    assert_eq!(fs::read(upper.join("common")).unwrap(), b"changed");
    assert_eq!(fs::read(lowers[0].join("common")).unwrap(), b"0");
    let info = mountinfo(&target).unwrap();
    // Options at their default (index=off here) are not shown.
    assert!(info.contains(",uuid=off"), "{info}");
    assert!(info.contains(",fsync=volatile"), "{info}");

    mounted.unmount().unwrap();
}

#[test]
fn overlay_bad_option_carries_the_kernel_message() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let lowers = make_lowers(dir.path(), 1);
    let target = dir.path().join("merged");
    fs::create_dir(&target).unwrap();
    let err = mount::mount_overlay(
        &target,
        &[&lowers[0]],
        None,
        &["no_such_option=1".to_owned()],
    )
    .unwrap_err();
    let _cleanup = MountGuard::new(&target);
    eprintln!("observed: {err}");
    match &err {
        MountError::Kernel { step, messages, .. } => {
            assert_eq!(step, "fsconfig_set_string(no_such_option=1)");
            assert_eq!(
                messages,
                &vec!["e overlay: Unknown parameter 'no_such_option'".to_owned()]
            );
        }
        e => panic!("unexpected {e:?}"),
    }
    assert!(
        err.to_string()
            .ends_with(" (kernel: e overlay: Unknown parameter 'no_such_option')"),
        "{err}"
    );
    assert!(matches!(
        mount::mount_overlay(&target, &[&lowers[0]], None, &["=x".to_owned()]),
        Err(MountError::InvalidOption(_))
    ));
}

/// fsconfig string values are capped at 255 bytes; longer layer paths go in
/// as directory descriptors.
#[test]
fn overlay_lower_with_a_path_over_255_bytes() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut long = dir.path().to_owned();
    while long.as_os_str().len() <= 300 {
        long.push("a-directory-name-of-some-length");
    }
    fs::create_dir_all(&long).unwrap();
    fs::write(long.join("deep"), b"deep").unwrap();
    assert!(long.as_os_str().len() > FSCONFIG_MAX_STRING);

    // The kernel limit itself.
    let fs_fd =
        rustix::mount::fsopen("overlay", rustix::mount::FsOpenFlags::FSOPEN_CLOEXEC).unwrap();
    let err = rustix::mount::fsconfig_set_string(&fs_fd, "lowerdir+", &long).unwrap_err();
    assert_eq!(err, rustix::io::Errno::INVAL);
    let exact: PathBuf = {
        let mut p = dir.path().to_owned();
        let room = FSCONFIG_MAX_STRING - p.as_os_str().len() - 1;
        p.push("b".repeat(room));
        p
    };
    assert_eq!(exact.as_os_str().len(), FSCONFIG_MAX_STRING);
    fs::create_dir(&exact).unwrap();
    rustix::mount::fsconfig_set_string(&fs_fd, "lowerdir+", &exact).unwrap();
    drop(fs_fd);

    let target = dir.path().join("merged");
    fs::create_dir(&target).unwrap();
    mount::mount_overlay(&target, &[&long, &exact], None, &[]).unwrap();
    let mounted = MountGuard::new(&target);
    assert_eq!(fs::read(target.join("deep")).unwrap(), b"deep");
    mounted.unmount().unwrap();
}

/// Two images of different trees: `a` (the one checked) and `b` (the replacement).
fn two_images(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let a = build_image(dir)?;
    let tree = dir.join("tree-b");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("hello.txt"), b"replaced\n").unwrap();
    let b = dir.join("b.erofs");
    let out = Command::new(MKFS_EROFS)
        .arg(&b)
        .arg(&tree)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some((a, b))
}

/// A file checked through one handle and then renamed over: mounting by path mounts the
/// replacement (what the daemon used to do), mounting the handle (`/proc/self/fd/N`, file-backed,
/// or a loop device bound from the handle) mounts the file that was checked.
#[test]
fn mounts_from_an_open_file_ignore_a_rename_over_its_path() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let Some((a, b)) = two_images(dir.path()) else {
        return;
    };
    let checked = fs::File::open(&a).unwrap();
    fs::rename(&b, &a).unwrap();
    let target = dir.path().join("mnt");
    fs::create_dir(&target).unwrap();

    // By path: the replacement.
    mount::mount_erofs_file(&a, &target, &[]).unwrap();
    let by_path = MountGuard::new(&target);
    assert_eq!(fs::read(target.join("hello.txt")).unwrap(), b"replaced\n");
    by_path.unmount().unwrap();

    // By the open file: what was checked.
    use std::os::fd::AsFd;
    mount::mount_erofs_fd(checked.as_fd(), &target, &[]).unwrap();
    let by_fd = MountGuard::new(&target);
    check_tree(&target);
    let info = mountinfo(&target).expect("mounted");
    eprintln!("mountinfo: {info}");
    by_fd.unmount().unwrap();

    // A loop device bound from the open file: what was checked.
    let dev = loop_device::attach_fd(checked.as_fd(), false).unwrap();
    let backing = format!("/sys/block/loop{}/loop/backing_file", dev.number());
    mount::mount_erofs_fd(dev.file.as_fd(), &target, &[]).unwrap();
    let by_loop = MountGuard::new(&target);
    drop(dev);
    check_tree(&target);
    // The kernel names the backing file by its path now: the one renamed over is gone.
    let named = fs::read_to_string(&backing).unwrap();
    assert!(named.contains("(deleted)"), "{named}");
    by_loop.unmount().unwrap();
}
