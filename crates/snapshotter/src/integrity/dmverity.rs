//! dm-verity for layers: hash trees appended to `layer.erofs` with a verity superblock, the
//! `layer.erofs.dmverity` sidecar (`{"roothash": ..., "hashoffset": ...}`, upstream's format),
//! and device activation on kernels that have dm-verity (through `veritysetup`).
//!
//! What a device is built from is the store's record of the tree ([`DmVerityRecord`], written
//! when the differ built it), never the sidecar alone: whoever can edit the layer can edit the
//! file next to it. Before use the sidecar must equal the record ([`anchor`]). Records from
//! before the record existed are migrated at the layer's first use: the sidecar is accepted
//! only if the tree recomputed from the (already verified) layer file has its root hash.
//!
//! Devices read the verified file itself: a read-only loop device is bound from its open
//! handle and the dm-verity table names that loop device, with every parameter given
//! explicitly (`--no-superblock`), so neither the on-disk verity superblock nor a rename over
//! the layer's path changes what the device checks.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::verity::{self, DMVERITY_SALT, DmVerityMeta};
use crate::config::Toggle;
use crate::error::{Error, Result};
use crate::store::DmVerityRecord;

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
/// Returns what the store records of the tree.
pub fn format_layer(
    tmp: &Path,
    tar_index: bool,
    known: Option<&verity::Leaves>,
) -> Result<DmVerityRecord> {
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
        .map_err(|e| Error::io(format!("fsync {}", side.display()), e))?;
    Ok(DmVerityRecord {
        roothash: meta.roothash,
        hashoffset: meta.hashoffset,
        data_block_size: block as u32,
        hash_block_size: block as u32,
    })
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

/// The dm-verity tree a layer is to be used with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The tree's parameters.
    pub record: DmVerityRecord,
    /// Established just now from an old record (to be written to the store).
    pub migrated: bool,
}

/// The tree of the layer at `layer` (snapshot directory `dir`) to use, from its record
/// `recorded` and its sidecar: the record when the sidecar equals it, or when there is no
/// sidecar and none is needed (`need_sidecar`: manager mode, where containerd reads it);
/// for an old record without one, the sidecar if the tree recomputed from the layer file has
/// its root hash (`file`: the layer, already verified, opened when `None`). A sidecar that
/// differs from the record is refused, naming the layer.
pub fn anchor(
    layer: &Path,
    file: Option<&File>,
    dir: &Path,
    recorded: Option<&DmVerityRecord>,
    name: &str,
    need_sidecar: bool,
) -> Result<Option<Anchor>> {
    let side_path = dir.join(SIDECAR);
    let sidecar = read_sidecar(dir)?;
    match (recorded, sidecar) {
        (None, None) => Ok(None),
        (Some(r), Some(s))
            if s.roothash.eq_ignore_ascii_case(&r.roothash) && s.hashoffset == r.hashoffset =>
        {
            Ok(Some(Anchor {
                record: r.clone(),
                migrated: false,
            }))
        }
        (Some(r), Some(s)) => Err(Error::failed_precondition(format!(
            "the dm-verity sidecar of layer {name:?} ({}) says root hash {} at offset {}, but the \
             layer was written with root hash {} at offset {}: it was modified; refusing to use the layer",
            side_path.display(),
            s.roothash,
            s.hashoffset,
            r.roothash,
            r.hashoffset
        ))),
        (Some(_), None) if need_sidecar => Err(Error::failed_precondition(format!(
            "layer {name:?} was written with a dm-verity tree but its sidecar {} is gone; \
             refusing to use the layer",
            side_path.display()
        ))),
        (Some(r), None) => Ok(Some(Anchor {
            record: r.clone(),
            migrated: false,
        })),
        (None, Some(s)) => {
            let opened;
            let f = match file {
                Some(f) => f,
                None => {
                    opened = File::open(layer)
                        .map_err(|e| Error::io(format!("opening {}", layer.display()), e))?;
                    &opened
                }
            };
            let record = migrate(f, layer, &s, name)?;
            tracing::warn!(
                layer = name,
                roothash = %record.roothash,
                "layer recorded before dm-verity trees were anchored in the store: its sidecar matches the tree recomputed from the layer, recording it"
            );
            Ok(Some(Anchor {
                record,
                migrated: true,
            }))
        }
    }
}

/// An old record's sidecar, accepted only if the layer's own tree agrees with it: the verity
/// superblock describes our format, and the tree recomputed over the data (and every stored
/// level) has the sidecar's root hash.
fn migrate(f: &File, layer: &Path, s: &DmVerityMeta, name: &str) -> Result<DmVerityRecord> {
    let bad = |why: String| {
        Error::failed_precondition(format!(
            "layer {name:?} ({}) has a dm-verity sidecar but no recorded tree, and {why}; refusing to use it",
            layer.display()
        ))
    };
    let sb = verity::read_verity_superblock(f, s.hashoffset)
        .map_err(|e| {
            Error::io(
                format!("reading the verity superblock of {}", layer.display()),
                e,
            )
        })?
        .ok_or_else(|| {
            bad(format!(
                "there is no verity superblock at offset {}",
                s.hashoffset
            ))
        })?;
    let bs = sb.data_block_size;
    if !sb.ours
        || sb.hash_type != 1
        || sb.hash_block_size != bs
        || !matches!(bs, 512 | 4096)
        || sb.data_blocks.checked_mul(bs as u64) != Some(s.hashoffset)
    {
        return Err(bad(format!(
            "its verity superblock is not one the differ writes ({sb:?})"
        )));
    }
    let ok = verity::dmverity_verify_file(f, s, bs as usize).map_err(|e| {
        Error::io(
            format!("checking the dm-verity tree of {}", layer.display()),
            e,
        )
    })?;
    if !ok {
        return Err(bad("its tree does not have the sidecar's root hash".into()));
    }
    Ok(DmVerityRecord {
        roothash: s.roothash.to_ascii_lowercase(),
        hashoffset: s.hashoffset,
        data_block_size: bs,
        hash_block_size: bs,
    })
}

/// The device-mapper name of a layer of the snapshotter rooted at `root`.
pub fn device_name(root: &Path, id: u64) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(root.as_os_str().as_encoded_bytes());
    format!("erofs-{}-{id}", hex::encode(&h[..4]))
}

/// The table a device over a layer with tree `rec` must have (devices aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTable {
    /// Length of the device in 512-byte sectors.
    pub sectors: u64,
    /// Data block size.
    pub data_block_size: u32,
    /// Hash block size.
    pub hash_block_size: u32,
    /// Data blocks.
    pub data_blocks: u64,
    /// Hash block where the tree starts (after the verity superblock's block).
    pub hash_start: u64,
    /// Root hash, lower-case hex.
    pub roothash: String,
    /// Salt, lower-case hex.
    pub salt: String,
}

impl ExpectedTable {
    /// From a recorded tree; an impossible record is an error.
    pub fn for_record(rec: &DmVerityRecord) -> Result<Self> {
        let (dbs, hbs) = (rec.data_block_size, rec.hash_block_size);
        let pow2 = |b: u32| (512..=65536).contains(&b) && b.is_power_of_two();
        if !pow2(dbs)
            || !pow2(hbs)
            || !rec.hashoffset.is_multiple_of(dbs as u64)
            || !rec.hashoffset.is_multiple_of(hbs as u64)
            || rec.hashoffset == 0
            || rec.roothash.len() != 64
            || !rec.roothash.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(Error::failed_precondition(format!(
                "the recorded dm-verity tree {rec:?} is not valid"
            )));
        }
        let sb_area = 512u64.next_multiple_of(hbs as u64);
        Ok(ExpectedTable {
            sectors: rec.hashoffset / 512,
            data_block_size: dbs,
            hash_block_size: hbs,
            data_blocks: rec.hashoffset / dbs as u64,
            hash_start: (rec.hashoffset + sb_area) / hbs as u64,
            roothash: rec.roothash.to_ascii_lowercase(),
            salt: hex::encode(DMVERITY_SALT),
        })
    }
}

fn run(tool: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = Command::new(tool).args(args).output().map_err(|e| {
        Error::io(
            format!("running {tool} (install cryptsetup-bin and dmsetup)"),
            e,
        )
    })?;
    if !out.status.success() {
        return Err(Error::internal(format!(
            "{tool} {}: {}",
            args.first()
                .map(|a| a.to_string_lossy())
                .unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Open (or reuse) a read-only dm-verity device named `name` over the verified layer `layer`
/// (opened from `path`) with the recorded tree `rec`; returns the device's path.
pub fn activate(layer: &File, path: &Path, rec: &DmVerityRecord, name: &str) -> Result<PathBuf> {
    if !crate::mount::probe::dmverity() {
        return Err(Error::failed_precondition(format!(
            "cannot verify {} with dm-verity: the kernel has no dm-verity (CONFIG_DM_VERITY)",
            path.display()
        )));
    }
    let want = ExpectedTable::for_record(rec)?;
    let dev = PathBuf::from("/dev/mapper").join(name);
    if dev.exists() {
        return Ok(dev);
    }
    // The device reads the verified file through a loop device bound from its handle.
    let lo = erofs_sys::loop_device::attach_fd(layer.as_fd(), false).map_err(|e| {
        Error::internal(format!(
            "attaching a loop device to {}: {e}",
            path.display()
        ))
    })?;
    let lo_path = lo.path.clone();
    let args = [
        format!("--data-block-size={}", want.data_block_size),
        format!("--hash-block-size={}", want.hash_block_size),
        format!("--data-blocks={}", want.data_blocks),
        format!(
            "--hash-offset={}",
            want.hash_start * want.hash_block_size as u64
        ),
        format!("--salt={}", want.salt),
    ];
    let mut argv: Vec<&std::ffi::OsStr> = vec![
        "open".as_ref(),
        "--no-superblock".as_ref(),
        "--format=1".as_ref(),
        "--hash=sha256".as_ref(),
    ];
    argv.extend(args.iter().map(std::ffi::OsStr::new));
    argv.extend([
        lo_path.as_os_str(),
        name.as_ref(),
        lo_path.as_os_str(),
        want.roothash.as_ref(),
    ]);
    run("veritysetup", &argv)?;
    // The device holds the loop device now; autoclear frees it when the device goes.
    drop(lo);
    Ok(dev)
}

/// Close a device opened by [`activate`], if it exists.
pub fn deactivate(name: &str) {
    if PathBuf::from("/dev/mapper").join(name).exists()
        && let Err(e) = run("veritysetup", &["close".as_ref(), name.as_ref()])
    {
        tracing::warn!(device = name, error = %e, "closing a dm-verity device");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> DmVerityRecord {
        DmVerityRecord {
            roothash: "4392712ba01368efdf14b05c76f9e4df0d53664630b5d48632ed17a137f39076".into(),
            hashoffset: 262144 * 4096,
            data_block_size: 4096,
            hash_block_size: 4096,
        }
    }

    /// Impossible records are refused before any device is built.
    #[test]
    fn records_are_validated() {
        let want = ExpectedTable::for_record(&rec()).unwrap();
        // The verity superblock takes the block after the data: the tree starts one later.
        assert_eq!(
            (want.sectors, want.data_blocks, want.hash_start),
            (2097152, 262144, 262145)
        );
        for r in [
            DmVerityRecord {
                hashoffset: 4095,
                ..rec()
            },
            DmVerityRecord {
                data_block_size: 1000,
                ..rec()
            },
            DmVerityRecord {
                roothash: "zz".into(),
                ..rec()
            },
        ] {
            assert!(ExpectedTable::for_record(&r).is_err(), "{r:?}");
        }
    }

    /// A layer with a tree and its sidecar, in its snapshot directory.
    fn layer_with_tree(data: &[u8]) -> (tempfile::TempDir, PathBuf, DmVerityRecord) {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join("layer.erofs.tmp");
        std::fs::write(&tmp, data).unwrap();
        let rec = format_layer(&tmp, false, None).unwrap();
        let layer = d.path().join("layer.erofs");
        std::fs::rename(&tmp, &layer).unwrap();
        std::fs::rename(sidecar_tmp(&tmp), d.path().join(SIDECAR)).unwrap();
        (d, layer, rec)
    }

    /// The record decides; the sidecar must agree with it (host mode can do without one,
    /// manager mode cannot).
    #[test]
    fn sidecars_are_checked_against_the_record() {
        let (d, layer, rec) = layer_with_tree(&vec![3u8; 5 * 4096 + 7]);
        let a = anchor(&layer, None, d.path(), Some(&rec), "l", false)
            .unwrap()
            .unwrap();
        assert_eq!(
            a,
            Anchor {
                record: rec.clone(),
                migrated: false
            }
        );
        let side = d.path().join(SIDECAR);
        let other = DmVerityMeta {
            roothash: "ab".repeat(32),
            hashoffset: rec.hashoffset,
        };
        std::fs::write(&side, serde_json::to_string(&other).unwrap()).unwrap();
        for manager in [false, true] {
            let e = anchor(&layer, None, d.path(), Some(&rec), "l", manager).unwrap_err();
            assert!(e.to_string().contains("sidecar of layer \"l\""), "{e}");
        }
        let moved = DmVerityMeta {
            roothash: rec.roothash.clone(),
            hashoffset: rec.hashoffset + 4096,
        };
        std::fs::write(&side, serde_json::to_string(&moved).unwrap()).unwrap();
        assert!(anchor(&layer, None, d.path(), Some(&rec), "l", false).is_err());
        std::fs::remove_file(&side).unwrap();
        assert_eq!(
            anchor(&layer, None, d.path(), Some(&rec), "l", false)
                .unwrap()
                .unwrap()
                .record,
            rec
        );
        assert!(anchor(&layer, None, d.path(), Some(&rec), "l", true).is_err());
        assert_eq!(
            anchor(&layer, None, d.path(), None, "l", true).unwrap(),
            None
        );
    }

    /// Records from before the tree was recorded: the sidecar is taken only if the tree
    /// recomputed from the layer has its root hash, then marked to be recorded.
    #[test]
    fn old_records_are_migrated_from_the_layer_itself() {
        let (d, layer, rec) = layer_with_tree(&vec![9u8; 40 * 4096]);
        let f = File::open(&layer).unwrap();
        let a = anchor(&layer, Some(&f), d.path(), None, "l", false)
            .unwrap()
            .unwrap();
        assert_eq!(
            a,
            Anchor {
                record: rec.clone(),
                migrated: true
            }
        );
        // A sidecar of another tree: refused.
        let side = d.path().join(SIDECAR);
        let original = std::fs::read(&side).unwrap();
        let other = DmVerityMeta {
            roothash: "ab".repeat(32),
            hashoffset: rec.hashoffset,
        };
        std::fs::write(&side, serde_json::to_string(&other).unwrap()).unwrap();
        let e = anchor(&layer, Some(&f), d.path(), None, "l", false).unwrap_err();
        assert!(
            e.to_string()
                .contains("does not have the sidecar's root hash"),
            "{e}"
        );
        // The sidecar back, the data changed under the tree: refused.
        std::fs::write(&side, original).unwrap();
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&layer)
            .unwrap()
            .write_all_at(b"x", 100)
            .unwrap();
        assert!(anchor(&layer, Some(&f), d.path(), None, "l", false).is_err());
    }

    /// This machine's kernel has no dm-verity: activation fails with a message saying so, and
    /// "on" refuses to start. (Activation, table checks on real devices and replacement of a
    /// wrong device run on kernels with dm-verity: the VM matrix of issue 12.)
    #[test]
    fn unsupported_kernel_is_explicit() {
        assert!(
            !crate::mount::probe::dmverity(),
            "this test documents a kernel without dm-verity; it has one now"
        );
        let f = File::open("/dev/null").unwrap();
        let e = activate(&f, Path::new("/nonexistent"), &rec(), "x").unwrap_err();
        assert!(e.to_string().contains("kernel has no dm-verity"), "{e}");
        let e = check_policy(Toggle::On, false).unwrap_err();
        assert!(e.to_string().contains("dmverity_mode"), "{e}");
        check_policy(Toggle::Auto, false).unwrap();
    }
}
