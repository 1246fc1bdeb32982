//! Size-limited writable layers: a sparse ext4 image per active snapshot, formatted with
//! e2fsprogs' mkfs.ext4, loop-mounted at `fs` with `upper/` and `work/` inside.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};

/// Create a sparse ext4 image of `size` bytes at `path`.
pub fn create_image(path: &Path, size: u64) -> Result<()> {
    const MIN: u64 = 1 << 20;
    if size < MIN {
        return Err(Error::invalid_argument(format!(
            "writable layer size {size} is below 1 MiB"
        )));
    }
    let f = std::fs::File::create(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    f.set_len(size)
        .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ])
        .arg(path)
        .output()
        .map_err(|e| Error::io("running mkfs.ext4 (install e2fsprogs)", e))?;
    if !out.status.success() {
        return Err(Error::internal(format!(
            "mkfs.ext4 {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Make `upper/` and `work/` on a freshly mounted writable layer.
pub fn prepare_dirs(fs: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    for (name, mode) in [("upper", 0o755), ("work", 0o711)] {
        let d = fs.join(name);
        match std::fs::create_dir(&d) {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| Error::io(format!("chmod {}", d.display()), e))?;
                if let (Some((uid, gid)), "upper") = (owner, name) {
                    rustix::fs::chown(
                        &d,
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                    )
                    .map_err(|e| Error::io(format!("chown {}", d.display()), e.into()))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("creating {}", d.display()), e)),
        }
    }
    Ok(())
}
