//! Integrity of layers: fs-verity digests, FS_IMMUTABLE_FL, dm-verity trees and devices, and
//! size-limited writable layers ([`quota`]).
//!
//! One value, [`Integrity`], is the policy: built once at start-up from the configuration and
//! the kernel's answers ([`crate::mount::probe`]), it decides how every layer is sealed when it
//! is written and checked before it is read. Its methods take paths and layer metadata; it
//! knows nothing of snapshots or the store. Every read of a committed or applied layer image
//! (mounting it, diffing it) opens it through [`Integrity::open_verified`], the one gate.

pub mod ahead;
pub mod dmverity;
pub mod quota;
pub mod verity;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::{Config, Toggle};
use crate::error::{Error, Result};
use crate::mount::{OpenImage, probe};
use crate::store::LayerMeta;

/// fs-verity block size used for layers (the page size on x86-64 and most arm64 hosts).
pub const FSVERITY_BLOCK: u32 = 4096;

/// How layers are protected by fs-verity digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerityMode {
    /// Not at all.
    Off,
    /// The kernel's fs-verity: enabled on every committed layer, checked on and measured
    /// before every mount.
    Kernel,
    /// No kernel support (`fsverity = "auto"`): the same digest is computed in userspace at
    /// commit and recomputed before a layer is mounted. Catches modified and replaced layers
    /// at mount time, not reads of a layer modified while mounted.
    Userspace,
}

/// What is known of a layer about to be read, to check it against.
#[derive(Debug, Clone, Copy)]
pub enum LayerState<'a> {
    /// A committed layer, with what its commit recorded (`None` for records without layer
    /// metadata).
    Committed(Option<&'a LayerMeta>),
    /// A layer the differ wrote into active snapshot `id`, not committed yet: fs-verity is
    /// enabled only at Commit, so the anchor is the digest Apply computed, when it did.
    Applied(u64),
}

/// A layer image opened through [`Integrity::open_verified`]: the file was checked on this
/// very handle, so reading through it reads what was checked.
#[derive(Debug)]
pub struct VerifiedLayer {
    file: File,
    path: PathBuf,
}

impl VerifiedLayer {
    /// The checked file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checked file, to read the image from.
    pub fn into_file(self) -> File {
        self.file
    }
}

/// What to mount for a layer: the file that was verified, or a dm-verity device over it.
#[derive(Debug)]
pub enum MountSource<'a> {
    /// The verified layer file itself.
    Layer(&'a VerifiedLayer),
    /// An open dm-verity device.
    Device {
        /// The device, open read-only.
        file: File,
        /// Its node.
        path: PathBuf,
    },
}

impl MountSource<'_> {
    /// The open image to hand the mounter.
    pub fn image(&self) -> OpenImage<'_> {
        match self {
            MountSource::Layer(l) => OpenImage {
                file: &l.file,
                path: &l.path,
            },
            MountSource::Device { file, path } => OpenImage { file, path },
        }
    }
}

/// The integrity policy in force.
#[derive(Debug)]
pub struct Integrity {
    verity: VerityMode,
    set_immutable: bool,
    /// `snapshotter.dmverity_mode`: whether layers are mounted through dm-verity devices.
    dmverity_mode: Toggle,
    /// Whether the kernel has dm-verity.
    dmverity_kernel: bool,
    /// `differ.enable_dmverity`: whether the differ appends dm-verity trees.
    dmverity_trees: bool,
    /// Root of the snapshotter, naming its dm-verity devices.
    root: PathBuf,
    /// Userspace fs-verity digests the differ computed for layers it wrote, by snapshot id,
    /// until their Commit records them.
    applied: Mutex<HashMap<u64, String>>,
}

impl Integrity {
    /// Decide, at start-up, how layers are protected: what the config asks for, refined by
    /// what the kernel and the filesystem under `root` support. Refuses to start where the
    /// config demands what is missing (`fsverity = "on"`, `dmverity_mode = "on"`).
    pub fn new(cfg: &Config, root: &Path) -> Result<Self> {
        let verity = fsverity_policy(cfg, root)?;
        let dmverity_kernel = probe::dmverity();
        dmverity::check_policy(cfg.snapshotter.dmverity_mode, dmverity_kernel)?;
        Ok(Integrity {
            verity,
            set_immutable: cfg.snapshotter.set_immutable,
            dmverity_mode: cfg.snapshotter.dmverity_mode,
            dmverity_kernel,
            dmverity_trees: cfg.differ.enable_dmverity,
            root: root.to_path_buf(),
            applied: Mutex::new(HashMap::new()),
        })
    }

    /// How fs-verity protects layers.
    pub fn verity_mode(&self) -> VerityMode {
        self.verity
    }

    /// After a layer is durable: enable fs-verity and record its digest, note the immutable
    /// flag. `digest` is the userspace digest Apply already computed for this file, if any.
    pub fn seal(&self, layer: &Path, meta: &mut LayerMeta, digest: Option<String>) -> Result<()> {
        match self.verity {
            VerityMode::Off => {}
            VerityMode::Kernel => {
                let f = open(layer)?;
                match erofs_sys::fsverity::enable(&f, FSVERITY_BLOCK) {
                    Ok(()) | Err(erofs_sys::fsverity::VerityError::AlreadyEnabled) => {}
                    Err(e) => {
                        return Err(Error::internal(format!(
                            "enabling fs-verity on {}: {e}",
                            layer.display()
                        )));
                    }
                }
                meta.fsverity_digest = Some(measure(&f, layer)?);
            }
            VerityMode::Userspace => {
                meta.fsverity_digest = Some(match digest {
                    Some(d) => d,
                    None => userspace_digest(&open(layer)?, layer, None)?,
                })
            }
        }
        meta.immutable = self.set_immutable;
        Ok(())
    }

    /// Once a committed layer is in place: FS_IMMUTABLE_FL, when configured (a warning where
    /// the filesystem has no such flag).
    pub fn set_immutable(&self, layer: &Path) {
        if self.set_immutable
            && let Err(e) = erofs_sys::flags::set_immutable_path(layer, true)
        {
            tracing::warn!(layer = %layer.display(), error = %e, "could not set the immutable flag");
        }
    }

    /// The one way to open a layer image for reading: its digest must be the one recorded for
    /// it, so a modified or replaced file is refused. With kernel fs-verity the check is a
    /// measurement; in userspace mode the digest is recomputed, from the same handle that is
    /// returned.
    pub fn open_verified(
        &self,
        layer: &Path,
        state: LayerState<'_>,
        name: &str,
    ) -> Result<VerifiedLayer> {
        let file = open(layer)?;
        let want = match state {
            LayerState::Committed(meta) => meta.and_then(|m| m.fsverity_digest.clone()),
            LayerState::Applied(id) => self
                .applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .cloned(),
        };
        let got = match (self.verity, state) {
            (VerityMode::Off, _) => None,
            // Not enabled before Commit; in kernel mode Apply records no digest either.
            (VerityMode::Kernel, LayerState::Applied(_)) => None,
            (VerityMode::Kernel, LayerState::Committed(_)) => {
                if !erofs_sys::fsverity::is_enabled(&file).unwrap_or(false) {
                    return Err(Error::failed_precondition(format!(
                        "fs-verity is not enabled on layer {name:?} ({}): refusing to use it",
                        layer.display()
                    )));
                }
                Some(measure(&file, layer)?)
            }
            (VerityMode::Userspace, _) if want.is_none() => {
                if matches!(state, LayerState::Committed(_)) {
                    tracing::warn!(
                        layer = name,
                        "layer has no recorded fs-verity digest (committed before fs-verity was enabled); using it unchecked"
                    );
                }
                None
            }
            (VerityMode::Userspace, _) => Some(userspace_digest(&file, layer, None)?),
        };
        match (want, got) {
            (Some(w), Some(g)) if w != g => Err(Error::failed_precondition(format!(
                "layer {name:?} ({}) does not match the fs-verity digest recorded when it was written: it was modified or replaced; refusing to use it",
                layer.display()
            ))),
            _ => Ok(VerifiedLayer {
                file,
                path: layer.to_path_buf(),
            }),
        }
    }

    /// The trees [`Self::after_apply`] builds whose block hashes can be taken while the layer
    /// is written: full images only (see [`ahead`]).
    pub fn ahead_trees(&self, tar_index: bool) -> ahead::Trees {
        ahead::Trees {
            fsverity: !tar_index && self.verity == VerityMode::Userspace,
            dmverity: !tar_index && self.dmverity_trees,
        }
    }

    /// After the differ wrote a layer (temporary name `tmp`, not yet in place): append the
    /// dm-verity tree and write the sidecar, when configured. Returns the layer's userspace
    /// fs-verity digest in userspace mode, computed here (during unpack) rather than in
    /// Commit, which containerd runs inside its global transaction. `ahead` holds the block
    /// hashes taken while the layer was written ([`Self::ahead_trees`]).
    pub fn after_apply(
        &self,
        tmp: &Path,
        tar_index: bool,
        ahead: &ahead::Hashed,
    ) -> Result<Option<String>> {
        if self.dmverity_trees {
            dmverity::format_layer(tmp, tar_index, ahead.dmverity.as_ref())?;
        }
        if self.verity == VerityMode::Userspace {
            return userspace_digest(&open(tmp)?, tmp, ahead.fsverity.as_ref()).map(Some);
        }
        Ok(None)
    }

    /// The layer of active snapshot `id` is in place with this digest from [`Self::after_apply`]
    /// (or none): what later reads of it are checked against, and what Commit records.
    pub fn record_applied(&self, id: u64, digest: Option<String>) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        match digest {
            Some(d) => applied.insert(id, d),
            None => applied.remove(&id),
        };
    }

    /// Commit of snapshot `id`: the digest Apply computed for its layer, handed over to the
    /// commit's record.
    pub fn take_applied(&self, id: u64) -> Option<String> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
    }

    /// What to mount for a verified layer of snapshot `id` (whose directory `dir` holds its
    /// dm-verity sidecar): a dm-verity device over it when it has a tree and the kernel can
    /// verify it, the verified file itself otherwise (refused when `dmverity_mode = "on"`).
    pub fn mount_source<'a>(
        &self,
        layer: &'a VerifiedLayer,
        dir: &Path,
        id: u64,
        name: &str,
    ) -> Result<MountSource<'a>> {
        if self.dmverity_mode == Toggle::Off {
            return Ok(MountSource::Layer(layer));
        }
        match dmverity::read_sidecar(dir)? {
            Some(meta) if self.dmverity_kernel => {
                let path = dmverity::activate(&layer.path, &meta, &self.device_name(id))?;
                let file = open(&path)?;
                Ok(MountSource::Device { file, path })
            }
            Some(_) => Ok(MountSource::Layer(layer)),
            None if self.dmverity_mode == Toggle::On => Err(Error::failed_precondition(format!(
                "dmverity_mode is \"on\" but layer {name:?} has no dm-verity metadata ({})",
                dir.join(dmverity::SIDECAR).display()
            ))),
            None => Ok(MountSource::Layer(layer)),
        }
    }

    /// The sidecar at `sidecar` of a layer, for manager-mode mounts (`X-containerd.dmverity=`):
    /// `None` when dm-verity is off or (in auto mode) the layer has none.
    pub fn sidecar_for(&self, sidecar: &Path, name: &str) -> Result<Option<PathBuf>> {
        match self.dmverity_mode {
            Toggle::Off => Ok(None),
            _ if sidecar.exists() => Ok(Some(sidecar.to_path_buf())),
            Toggle::On => Err(Error::failed_precondition(format!(
                "dm-verity mode is 'on' but .dmverity metadata not found for layer {name:?} ({})",
                sidecar.display()
            ))),
            Toggle::Auto => Ok(None),
        }
    }

    /// Before snapshot `id`'s directory goes: close its dm-verity device, clear the immutable
    /// flag of its layer (filesystems without the flag are fine), forget its applied digest.
    pub fn release(&self, id: u64, layer: &Path) {
        dmverity::deactivate(&self.device_name(id));
        self.take_applied(id);
        clear_immutable(layer);
    }

    fn device_name(&self, id: u64) -> String {
        dmverity::device_name(&self.root, id)
    }
}

/// How fs-verity is used: wanted by the config, and supported by the kernel and the
/// filesystem under `root`.
fn fsverity_policy(cfg: &Config, root: &Path) -> Result<VerityMode> {
    if !cfg.fsverity_wanted() {
        return Ok(VerityMode::Off);
    }
    let why = match probe::fsverity(root, FSVERITY_BLOCK) {
        Ok(()) => return Ok(VerityMode::Kernel),
        Err(why) => why,
    };
    if cfg.snapshotter.fsverity == Toggle::On {
        return Err(Error::failed_precondition(format!(
            "fs-verity is required (snapshotter.fsverity = \"on\") but the kernel or the filesystem of {} lacks it: {why}",
            root.display()
        )));
    }
    tracing::warn!(
        root = %root.display(),
        reason = %why,
        "fs-verity is unsupported here: layers get no kernel fs-verity; their digests are recorded and re-checked in userspace before each mount instead (set snapshotter.fsverity = \"on\" to refuse to start)"
    );
    Ok(VerityMode::Userspace)
}

/// Clear the immutable flag of a layer about to be deleted (filesystems without the flag, and
/// layers already gone, are fine).
pub fn clear_immutable(layer: &Path) {
    match erofs_sys::flags::set_immutable_path(layer, false) {
        Ok(_) | Err(erofs_sys::flags::FlagsError::Unsupported(_)) => {}
        Err(erofs_sys::flags::FlagsError::Open { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(layer = %layer.display(), error = %e, "clearing the immutable flag")
        }
    }
}

fn open(layer: &Path) -> Result<File> {
    File::open(layer).map_err(|e| Error::io(format!("opening {}", layer.display()), e))
}

fn measure(f: &File, layer: &Path) -> Result<String> {
    erofs_sys::fsverity::measure(f)
        .map(hex::encode)
        .map_err(|e| Error::internal(format!("measuring {}: {e}", layer.display())))
}

fn userspace_digest(f: &File, layer: &Path, known: Option<&verity::Leaves>) -> Result<String> {
    let len = f
        .metadata()
        .map_err(|e| Error::io("stat of a layer", e))?
        .len();
    let d = verity::fsverity_digest_with(f, len, FSVERITY_BLOCK as usize, known)
        .map_err(|e| Error::io(format!("hashing {}", layer.display()), e))?;
    Ok(hex::encode(d))
}
