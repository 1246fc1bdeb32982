//! Loop devices on the real kernel (needs root).

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use common::eventually;
use erofs_sys::loop_device::{self, LoopError};

fn sysfs(number: u32, attr: &str) -> Option<String> {
    fs::read_to_string(format!("/sys/block/loop{number}/loop/{attr}"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// The device is free when it has no backing file any more.
fn is_free(number: u32) -> bool {
    sysfs(number, "backing_file").is_none()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn attach_reads_back_is_read_only_and_autoclears() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    let data = pattern(64 * 1024);
    fs::write(&backing, &data).unwrap();

    let dev = loop_device::attach(&backing, false).unwrap();
    let number = dev.number();
    assert_eq!(dev.path(), Path::new(&format!("/dev/loop{number}")));
    assert_eq!(
        dev.sysfs_dir(),
        Path::new(&format!("/sys/block/loop{number}"))
    );

    // Same bytes through the block device.
    let mut back = Vec::new();
    File::open(dev.path())
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, data);

    // Bound to our file, read-only, autoclear.
    let canonical = backing.canonicalize().unwrap();
    assert_eq!(sysfs(number, "backing_file").as_deref(), canonical.to_str());
    assert_eq!(
        fs::read_to_string(format!("/sys/block/loop{number}/ro"))
            .unwrap()
            .trim(),
        "1"
    );
    assert_eq!(sysfs(number, "autoclear").as_deref(), Some("1"));
    assert_eq!(sysfs(number, "dio").as_deref(), Some("0"));

    // Linux 6.18 lets the read-only device be opened for writing, but
    // every write fails with EPERM.
    let mut writer = OpenOptions::new().write(true).open(dev.path()).unwrap();
    let err = writer.write(&[0u8; 4096]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    drop(writer);

    // Dropping the last user frees the device.
    drop(dev);
    assert!(eventually(|| is_free(number)), "loop{number} still bound");
}

#[test]
fn attach_with_direct_io() {
    require_root!();
    // Direct I/O needs a filesystem that supports O_DIRECT (not tmpfs).
    let Some(tmp) = common::ext4_tmp() else {
        eprintln!("skipping: no ext4 temporary directory");
        return;
    };
    let dir = tempfile::tempdir_in(tmp).unwrap();
    let backing = dir.path().join("backing.img");
    let data = pattern(256 * 1024);
    fs::write(&backing, &data).unwrap();

    let dev = loop_device::attach(&backing, true).unwrap();
    let number = dev.number();
    assert_eq!(sysfs(number, "dio").as_deref(), Some("1"));
    let mut back = Vec::new();
    File::open(dev.path())
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, data);
    drop(dev);
    assert!(eventually(|| is_free(number)), "loop{number} still bound");
}

#[test]
fn detach_unbinds_and_reports_unbound_devices() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    fs::write(&backing, pattern(4096)).unwrap();

    let dev = loop_device::attach(&backing, false).unwrap();
    let number = dev.number();
    let path = dev.path().to_owned();
    // While our descriptor is open, LOOP_CLR_FD only defers the clear.
    loop_device::detach(&path).unwrap();
    drop(dev);
    assert!(eventually(|| is_free(number)), "loop{number} still bound");

    // Detaching a free device says so. (Another process could grab the
    // device in between; accept that too rather than fail spuriously.)
    match loop_device::detach(&path) {
        Err(LoopError::NotBound { path: p }) => assert_eq!(p, path),
        Ok(()) => eprintln!("loop{number} was taken by someone else meanwhile"),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn attach_missing_file_fails_with_open_error() {
    let err = loop_device::attach(Path::new("/nonexistent/backing.img"), false).unwrap_err();
    assert!(matches!(err, LoopError::Open { .. }), "{err}");
}
