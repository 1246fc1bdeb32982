//! fs-verity on this machine's kernel, which is built without it.

mod common;

use std::fs::{self, File};

use erofs_sys::fsverity::{self, VerityError};

#[test]
fn enable_and_measure_report_unsupported_on_this_kernel() {
    let dir = match common::ext4_tmp() {
        Some(tmp) => tempfile::tempdir_in(tmp).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let path = dir.path().join("blob");
    fs::write(&path, vec![7u8; 3 * 4096 + 5]).unwrap();
    let file = File::open(&path).unwrap();

    // This kernel has no CONFIG_FS_VERITY: enable must say "unsupported",
    // not fail in some other way.
    match fsverity::enable(&file, 4096) {
        Err(VerityError::Unsupported(source)) => {
            let errno = source.raw_os_error();
            assert!(
                errno == Some(libc::EOPNOTSUPP) || errno == Some(libc::ENOTTY),
                "{source}"
            );
        }
        other => panic!("expected VerityError::Unsupported, got {other:?}"),
    }
    match fsverity::measure(&file) {
        Err(VerityError::Unsupported(_)) => {}
        other => panic!("expected VerityError::Unsupported, got {other:?}"),
    }
    assert!(!fsverity::is_enabled(&file).unwrap());
}
