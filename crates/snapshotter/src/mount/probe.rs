//! "Can this kernel do X" checks, kept apart from policy.

use std::path::Path;

use crate::error::{Error, Result};

/// Whether `/proc/filesystems` lists `fstype` (loading its module first if possible).
pub fn filesystem_supported(fstype: &str) -> bool {
    let listed = || {
        std::fs::read_to_string("/proc/filesystems")
            .map(|t| {
                t.lines()
                    .any(|l| l.split_whitespace().last() == Some(fstype))
            })
            .unwrap_or(false)
    };
    if listed() {
        return true;
    }
    for modprobe in ["/sbin/modprobe", "/usr/sbin/modprobe"] {
        if Path::new(modprobe).exists() {
            let _ = std::process::Command::new(modprobe)
                .arg(fstype)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            break;
        }
    }
    listed()
}

/// The checks the daemon runs before serving: EROFS and overlayfs in the kernel, and a root
/// filesystem that reports file types in directory entries (overlayfs needs d_type).
pub fn check_host(root: &Path) -> Result<()> {
    if !filesystem_supported("erofs") {
        return Err(Error::failed_precondition(
            "the kernel has no EROFS support (CONFIG_EROFS_FS); try `modprobe erofs`",
        ));
    }
    if !filesystem_supported("overlay") {
        return Err(Error::failed_precondition(
            "the kernel has no overlayfs support; try `modprobe overlay`",
        ));
    }
    check_dtype(root)
}

fn check_dtype(root: &Path) -> Result<()> {
    let dir = tempfile_dir(root)?;
    let probe = dir.join("probe");
    let r = (|| -> std::io::Result<bool> {
        std::fs::write(&probe, b"")?;
        let fd = rustix::fs::open(
            &dir,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )?;
        let d = rustix::fs::Dir::read_from(&fd)?;
        for e in d {
            let e = e?;
            if e.file_name().to_bytes() == b"probe" {
                return Ok(e.file_type() != rustix::fs::FileType::Unknown);
            }
        }
        Ok(false)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::failed_precondition(format!(
            "{} does not report file types in directory entries (d_type); overlayfs needs it (xfs: ftype=1)",
            root.display()
        ))),
        Err(e) => Err(Error::io(format!("probing {}", root.display()), e)),
    }
}

fn tempfile_dir(root: &Path) -> Result<std::path::PathBuf> {
    let dir = root.join(format!(".probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

/// Whether the kernel and the filesystem under `root` can enable fs-verity, found by enabling
/// it on a scratch file there; `Err` says why not.
pub fn fsverity(root: &Path, block_size: u32) -> std::result::Result<(), String> {
    let probe = root.join(format!(".fsverity-check-{}", std::process::id()));
    let r = (|| -> std::io::Result<std::result::Result<(), erofs_sys::fsverity::VerityError>> {
        std::fs::write(&probe, vec![0u8; 8192])?;
        let f = std::fs::File::open(&probe)?;
        Ok(erofs_sys::fsverity::enable(&f, block_size))
    })();
    let _ = std::fs::remove_file(&probe);
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether the kernel mounts EROFS images with 512-byte blocks, which every tar-index layer
/// has (tar data is 512-byte aligned): Linux 6.4 and later; 6.1 (Debian 12) refuses them at
/// mount time with EINVAL. Found by mounting a tiny tar index (of an empty tar) through
/// `mounter` on a scratch directory under `root`; `Err` says why not.
pub fn small_blocks(root: &Path, mounter: &dyn super::Mounter) -> std::result::Result<(), String> {
    let dir = tempfile_dir(root).map_err(|e| e.to_string())?;
    let image = dir.join("blocks-512.erofs");
    let target = dir.join("mnt");
    let r = (|| -> std::result::Result<(), String> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&image)
            .map_err(|e| format!("creating {}: {e}", image.display()))?;
        let opts = erofs_image::BuildOptions::default();
        erofs_image::tar_to_index_file(&[0u8; 1024][..], erofs_output::FileOutput::new(&f), &opts)
            .map_err(|e| format!("building a 512-byte-block image: {e}"))?;
        std::fs::create_dir(&target).map_err(|e| e.to_string())?;
        let img = super::mounter::OpenImage {
            file: &f,
            path: &image,
        };
        mounter
            .mount_erofs(img, &target)
            .map_err(|e| e.to_string())?;
        mounter.unmount(&target).map_err(|e| e.to_string())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Whether the kernel has dm-verity loaded (what containerd checks too).
pub fn dmverity() -> bool {
    Path::new("/sys/module/dm_verity").exists()
}

/// Whether idmapped mounts can be made here (Linux 5.12+ with mount_setattr), probed once on
/// a private directory under `root` (so unrelated mounts elsewhere cannot spoil the answer).
pub fn idmapped_mounts(root: &Path) -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        use std::os::fd::AsFd;
        let dir = root.join(format!(".idmap-check-{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_err() {
            return false;
        }
        let ok = erofs_sys::idmap::create_userns(&[(0, 100000, 65536)], &[(0, 100000, 65536)])
            .ok()
            .is_some_and(|userns| erofs_sys::idmap::idmapped_clone(&dir, userns.as_fd()).is_ok());
        let _ = std::fs::remove_dir(&dir);
        ok
    })
}
