//! User namespaces and idmapped mounts on the real kernel (needs root).

mod common;

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use common::MountGuard;
use erofs_sys::idmap;
use rustix::process::{WaitId, WaitIdOptions, waitid};

/// No child is left behind, zombie or alive.
fn assert_no_children() {
    let r = waitid(WaitId::All, WaitIdOptions::EXITED | WaitIdOptions::NOHANG);
    assert_eq!(r.err(), Some(rustix::io::Errno::CHILD), "a child is left");
}

#[test]
fn create_userns_returns_a_new_user_namespace() {
    require_root!();
    let ns = idmap::create_userns(&[(0, 100000, 65536)], &[(0, 200000, 65536)]).unwrap();
    assert_no_children();
    let fd = rustix::fs::fstat(&ns).unwrap();
    let ours = fs::metadata("/proc/self/ns/user").unwrap();
    assert_ne!(fd.st_ino, ours.ino(), "must be another namespace");
    let link = fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&ns)
    ))
    .unwrap();
    assert!(
        link.to_string_lossy().starts_with("user:["),
        "{}",
        link.display()
    );
}

#[test]
fn create_userns_rejects_bad_maps_before_spawning() {
    assert!(idmap::create_userns(&[], &[(0, 1, 1)]).is_err());
    assert!(idmap::create_userns(&[(0, 1, 1)], &[(0, 1, 0)]).is_err());
}

#[test]
fn idmapped_bind_mount_shows_shifted_owners() {
    require_root!();
    let src = tempfile::tempdir().unwrap();
    let root_file = src.path().join("owned-by-root");
    fs::write(&root_file, b"hi").unwrap();
    rustix::fs::chown(
        &root_file,
        Some(rustix::fs::Uid::ROOT),
        Some(rustix::fs::Gid::ROOT),
    )
    .unwrap();
    let user_file = src.path().join("owned-by-1000");
    fs::write(&user_file, b"hi").unwrap();
    rustix::fs::chown(
        &user_file,
        Some(rustix::fs::Uid::from_raw(1000)),
        Some(rustix::fs::Gid::from_raw(2000)),
    )
    .unwrap();
    let unmapped = src.path().join("owned-by-70000");
    fs::write(&unmapped, b"hi").unwrap();
    rustix::fs::chown(
        &unmapped,
        Some(rustix::fs::Uid::from_raw(70000)),
        Some(rustix::fs::Gid::from_raw(70000)),
    )
    .unwrap();

    let uids = idmap::parse_id_mappings("0:100000:65536").unwrap();
    let gids = idmap::parse_id_mappings("0:100000:1000,1000:300000:64536").unwrap();
    let userns = idmap::create_userns(&uids, &gids).unwrap();

    let target = tempfile::tempdir().unwrap();
    let tree = idmap::idmapped_clone(src.path(), userns.as_fd()).unwrap();
    idmap::move_mount_to(tree.as_fd(), target.path()).unwrap();
    let mounted = MountGuard::new(target.path());
    drop(tree);
    let info = common::mountinfo(target.path()).expect("target is a mount point");
    assert!(info.contains("idmapped"), "{info}");

    let meta = fs::metadata(target.path().join("owned-by-root")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (100000, 100000));
    let meta = fs::metadata(target.path().join("owned-by-1000")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (101000, 301000));
    // IDs outside the mapping show as the overflow IDs.
    let meta = fs::metadata(target.path().join("owned-by-70000")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    // The source is unchanged.
    assert_eq!(fs::metadata(&root_file).unwrap().uid(), 0);

    // Files created through the mount by host uid 100000 would land as 0;
    // as host root (unmapped in the namespace), creating is refused.
    let err = fs::write(target.path().join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EOVERFLOW), "{err}");

    // The tree fd is closed, so a plain unmount is not busy.
    mounted.unmount().unwrap();
    assert!(common::mountinfo(target.path()).is_none());
}

#[test]
fn idmap_needs_a_detached_tree() {
    require_root!();
    let userns = idmap::create_userns(&[(0, 100000, 65536)], &[(0, 100000, 65536)]).unwrap();
    // A descriptor of an ordinary directory on an attached mount.
    let dir = fs::File::open("/tmp").unwrap();
    let err = idmap::mount_setattr_idmap(dir.as_fd(), userns.as_fd()).unwrap_err();
    match err {
        idmap::IdmapError::SetAttr(e) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}"),
        e => panic!("unexpected {e}"),
    }
}
