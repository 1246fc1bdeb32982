//! dm-verity for layers: hash trees appended to `layer.erofs` with a verity superblock, the
//! `layer.erofs.dmverity` sidecar (`{"roothash": ..., "hashoffset": ...}`, upstream's format),
//! and device activation on kernels that have dm-verity (through `veritysetup`).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::verity::{self, DmVerityMeta};
use crate::config::Toggle;
use crate::error::{Error, Result};

/// The sidecar's name next to the layer.
pub const SIDECAR: &str = crate::layout::DMVERITY_SIDECAR;

/// Check `dmverity_mode` against the kernel (`kernel`: whether it has dm-verity) at start-up.
pub fn check_policy(mode: Toggle, kernel: bool) -> Result<()> {
    if mode == Toggle::On && !kernel {
        return Err(Error::failed_precondition(
            "snapshotter.dmverity_mode = \"on\" but the kernel has no dm-verity (CONFIG_DM_VERITY; /sys/module/dm_verity is missing)",
        ));
    }
    if mode == Toggle::Auto && !kernel {
        tracing::info!(
            "dm-verity is not available in this kernel; layers with dm-verity trees are mounted without it"
        );
    }
    Ok(())
}

/// Append a tree to the layer at `tmp` (before it is put in place) and write the sidecar next
/// to it as `SIDECAR.tmp`, both fsynced. Tar-index layers use 512-byte blocks (EROFS with
/// 512-byte blocks cannot sit on a device with 4 KiB logical blocks), full images 4096.
pub fn format_layer(tmp: &Path, tar_index: bool, known: Option<&verity::Leaves>) -> Result<()> {
    let block = if tar_index { 512 } else { 4096 };
    let len = std::fs::metadata(tmp)
        .map_err(|e| Error::io("stat of the layer", e))?
        .len();
    let meta = verity::dmverity_format(tmp, len, block, *uuid::Uuid::new_v4().as_bytes(), known)
        .map_err(|e| {
            Error::io(
                format!("building the dm-verity tree of {}", tmp.display()),
                e,
            )
        })?;
    let side = sidecar_tmp(tmp);
    let json = serde_json::to_string_pretty(&meta).expect("sidecar serializes");
    std::fs::write(&side, json).map_err(|e| Error::io(format!("writing {}", side.display()), e))?;
    std::fs::File::open(&side)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", side.display()), e))
}

/// Where [`format_layer`] leaves the sidecar.
pub fn sidecar_tmp(layer_tmp: &Path) -> PathBuf {
    layer_tmp.with_file_name(format!("{SIDECAR}.tmp"))
}

/// Read a layer's sidecar, if it has one.
pub fn read_sidecar(dir: &Path) -> Result<Option<DmVerityMeta>> {
    let p = dir.join(SIDECAR);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::invalid_argument(format!("{}: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", p.display()), e)),
    }
}

/// The device-mapper name of a layer of the snapshotter rooted at `root`.
pub fn device_name(root: &Path, id: u64) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(root.as_os_str().as_encoded_bytes());
    format!("erofs-{}-{id}", hex::encode(&h[..4]))
}

fn veritysetup(args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new("veritysetup")
        .args(args)
        .output()
        .map_err(|e| Error::io("running veritysetup (install cryptsetup-bin)", e))?;
    if !out.status.success() {
        return Err(Error::internal(format!(
            "veritysetup {}: {}",
            args.first()
                .map(|a| a.to_string_lossy())
                .unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Open a read-only dm-verity device over `layer` and return its path.
pub fn activate(layer: &Path, meta: &DmVerityMeta, name: &str) -> Result<PathBuf> {
    if !crate::mount::probe::dmverity() {
        return Err(Error::failed_precondition(format!(
            "cannot verify {} with dm-verity: the kernel has no dm-verity (CONFIG_DM_VERITY)",
            layer.display()
        )));
    }
    let dev = PathBuf::from("/dev/mapper").join(name);
    if !dev.exists() {
        let off = format!("--hash-offset={}", meta.hashoffset);
        veritysetup(&[
            "open".as_ref(),
            layer.as_os_str(),
            name.as_ref(),
            layer.as_os_str(),
            meta.roothash.as_ref(),
            off.as_ref(),
        ])?;
    }
    Ok(dev)
}

/// Close a device opened by [`activate`], if it exists.
pub fn deactivate(name: &str) {
    if PathBuf::from("/dev/mapper").join(name).exists()
        && let Err(e) = veritysetup(&["close".as_ref(), name.as_ref()])
    {
        tracing::warn!(device = name, error = %e, "closing a dm-verity device");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's kernel has no dm-verity: activation fails with a message saying so, and
    /// "on" refuses to start.
    #[test]
    fn unsupported_kernel_is_explicit() {
        assert!(
            !crate::mount::probe::dmverity(),
            "this test documents a kernel without dm-verity; it has one now"
        );
        let meta = DmVerityMeta {
            roothash: "00".repeat(32),
            hashoffset: 4096,
        };
        let e = activate(Path::new("/nonexistent"), &meta, "x").unwrap_err();
        assert!(e.to_string().contains("kernel has no dm-verity"), "{e}");
        let e = check_policy(Toggle::On, false).unwrap_err();
        assert!(e.to_string().contains("dmverity_mode"), "{e}");
        check_policy(Toggle::Auto, false).unwrap();
    }
}
