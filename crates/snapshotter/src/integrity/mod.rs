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

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::config::{Config, Toggle};
use crate::error::{Error, Result};
use crate::mount::{OpenImage, probe};
use crate::store::{DmVerityRecord, LayerMeta};

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
    /// A layer the differ wrote into an active snapshot, not committed yet, with what Apply
    /// recorded of it. fs-verity is enabled only at Commit, so in both fs-verity modes the
    /// anchor is the digest Apply computed in userspace.
    Applied(Option<&'a LayerMeta>),
}

impl<'a> LayerState<'a> {
    /// What was recorded of the layer.
    pub fn meta(&self) -> Option<&'a LayerMeta> {
        match *self {
            LayerState::Committed(m) | LayerState::Applied(m) => m,
        }
    }
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
        })
    }

    /// A policy with the given fs-verity mode and no dm-verity, whatever the kernel has: to
    /// test the decisions of modes this kernel lacks (the calls into the kernel itself are
    /// exercised on kernels that have them).
    #[doc(hidden)]
    pub fn with_verity_mode(verity: VerityMode, root: &Path) -> Self {
        Integrity {
            verity,
            set_immutable: false,
            dmverity_mode: Toggle::Off,
            dmverity_kernel: false,
            dmverity_trees: false,
            root: root.to_path_buf(),
        }
    }

    /// How fs-verity protects layers.
    pub fn verity_mode(&self) -> VerityMode {
        self.verity
    }

    /// Whether dm-verity is wanted at all (`dmverity_mode` is not "off").
    pub fn dmverity_enabled(&self) -> bool {
        self.dmverity_mode != Toggle::Off
    }

    /// After a layer is durable: enable fs-verity and record its digest, note the immutable
    /// flag. `applied` is what Apply recorded of this very file (its userspace digest and
    /// dm-verity tree), if the differ wrote it: in kernel mode the measurement must equal that
    /// digest (the file did not change between Apply and Commit), in userspace mode it is the
    /// digest recorded.
    pub fn seal(
        &self,
        layer: &Path,
        meta: &mut LayerMeta,
        applied: Option<&LayerMeta>,
    ) -> Result<()> {
        let applied_digest = applied.and_then(|a| a.fsverity_digest.clone());
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
                let measured = measure(&f, layer)?;
                if let Some(want) = applied_digest
                    && want != measured
                {
                    return Err(Error::failed_precondition(format!(
                        "{} changed between Apply and Commit (fs-verity digest {measured}, Apply computed {want}): refusing to commit it",
                        layer.display()
                    )));
                }
                meta.fsverity_digest = Some(measured);
            }
            VerityMode::Userspace => {
                meta.fsverity_digest = Some(match applied_digest {
                    Some(d) => d,
                    None => userspace_digest(&open(layer)?, layer, None)?,
                })
            }
        }
        meta.dmverity = applied.and_then(|a| a.dmverity.clone());
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
    /// it, so a modified or replaced file is refused. With kernel fs-verity a committed layer
    /// is measured; otherwise (userspace mode, and layers Apply wrote that Commit has not
    /// sealed yet) the digest is recomputed, from the same handle that is returned. With
    /// fs-verity on, a layer with no recorded digest is refused: nothing says what it should
    /// be (layers committed while fs-verity was off, or written by a daemon that lost the
    /// digest), so it cannot be told from a replaced one.
    pub fn open_verified(
        &self,
        layer: &Path,
        state: LayerState<'_>,
        name: &str,
    ) -> Result<VerifiedLayer> {
        let file = open(layer)?;
        if self.verity == VerityMode::Off {
            return Ok(VerifiedLayer {
                file,
                path: layer.to_path_buf(),
            });
        }
        let Some(want) = state.meta().and_then(|m| m.fsverity_digest.clone()) else {
            let what = match state {
                LayerState::Committed(_) => {
                    "was committed without an fs-verity digest (before fs-verity was enabled?)"
                }
                LayerState::Applied(_) => "was applied but no fs-verity digest was recorded",
            };
            return Err(Error::failed_precondition(format!(
                "layer {name:?} ({}) {what}: nothing anchors its content, refusing to use it \
                 (remove the snapshot and unpack the image again)",
                layer.display()
            )));
        };
        let got = match (self.verity, state) {
            (VerityMode::Kernel, LayerState::Committed(_)) => {
                if !erofs_sys::fsverity::is_enabled(&file).unwrap_or(false) {
                    return Err(Error::failed_precondition(format!(
                        "fs-verity is not enabled on layer {name:?} ({}): refusing to use it",
                        layer.display()
                    )));
                }
                measure(&file, layer)?
            }
            // Userspace mode, and Applied layers in kernel mode (fs-verity is enabled at
            // Commit): the same digest, computed here.
            _ => userspace_digest(&file, layer, None)?,
        };
        if want != got {
            return Err(Error::failed_precondition(format!(
                "layer {name:?} ({}) does not match the fs-verity digest recorded when it was written: it was modified or replaced; refusing to use it",
                layer.display()
            )));
        }
        Ok(VerifiedLayer {
            file,
            path: layer.to_path_buf(),
        })
    }

    /// The trees [`Self::after_apply`] builds whose block hashes can be taken while the layer
    /// is written: full images only (see [`ahead`]).
    pub fn ahead_trees(&self, tar_index: bool) -> ahead::Trees {
        ahead::Trees {
            fsverity: !tar_index && self.verity != VerityMode::Off,
            dmverity: !tar_index && self.dmverity_trees,
        }
    }

    /// After the differ wrote a layer (temporary name `tmp`, not yet in place): append the
    /// dm-verity tree and write the sidecar, when configured, and compute the layer's
    /// fs-verity digest in userspace when fs-verity is on (in kernel mode too: fs-verity is
    /// enabled only at Commit, and until then this digest is what the layer is checked
    /// against; Commit then requires the kernel's measurement to equal it). Done here
    /// (during unpack) rather than in Commit, which containerd runs inside its global
    /// transaction. `ahead` holds the block hashes taken while the layer was written
    /// ([`Self::ahead_trees`]). Returns what the store is to record of the layer.
    ///
    /// `fetched`: a tree fetched for this layer (`[index][tar]` or the full image), installed
    /// instead of computed if it passes its check (full images: with the hashes taken ahead);
    /// the second value says whether it did (`None`: nothing fetched).
    pub fn after_apply(
        &self,
        tmp: &Path,
        tar_index: bool,
        ahead: &ahead::Hashed,
        fetched: Option<(&dmverity::FetchedTree, dmverity::TreeCheck)>,
    ) -> Result<(LayerMeta, Option<std::result::Result<(), String>>)> {
        let mut meta = LayerMeta::default();
        let mut used = None;
        if self.dmverity_trees {
            let installed = match fetched {
                Some((tree, check)) => match dmverity::install_fetched(
                    tmp,
                    tree,
                    check,
                    tar_index,
                    ahead.dmverity.as_ref(),
                )? {
                    Ok(rec) => {
                        used = Some(Ok(()));
                        Some(rec)
                    }
                    Err(why) => {
                        used = Some(Err(why));
                        None
                    }
                },
                None => None,
            };
            meta.dmverity = Some(match installed {
                Some(rec) => rec,
                None => dmverity::format_layer(tmp, tar_index, ahead.dmverity.as_ref())?,
            });
        } else if fetched.is_some() {
            used = Some(Err(
                "the differ builds no dm-verity trees (differ.enable_dmverity = false)".into(),
            ));
        }
        if self.verity != VerityMode::Off {
            meta.fsverity_digest =
                Some(userspace_digest(&open(tmp)?, tmp, ahead.fsverity.as_ref())?);
        }
        meta.size = std::fs::metadata(tmp)
            .map_err(|e| Error::io("stat of the layer", e))?
            .len();
        Ok((meta, used))
    }

    /// The dm-verity tree to use a layer with (see [`dmverity::anchor`]): `None` when
    /// dm-verity is off or the layer has none. `file` is the layer, when already opened
    /// (verified); `manager`: containerd reads the sidecar itself, so it must be there.
    pub fn dmverity_anchor(
        &self,
        layer: &Path,
        file: Option<&File>,
        dir: &Path,
        recorded: Option<&DmVerityRecord>,
        name: &str,
        manager: bool,
    ) -> Result<Option<dmverity::Anchor>> {
        if self.dmverity_mode == Toggle::Off {
            return Ok(None);
        }
        dmverity::anchor(layer, file, dir, recorded, name, manager)
    }

    /// What to mount for a verified layer of snapshot `id` whose dm-verity tree is `tree`
    /// ([`Self::dmverity_anchor`]): a dm-verity device over the verified file when it has a
    /// tree and the kernel can verify it, the verified file itself otherwise (refused when
    /// `dmverity_mode = "on"`).
    pub fn mount_source<'a>(
        &self,
        layer: &'a VerifiedLayer,
        tree: Option<&DmVerityRecord>,
        id: u64,
        name: &str,
    ) -> Result<MountSource<'a>> {
        self.mount_source_as(layer, tree, &self.device_name(id), name)
    }

    /// [`Self::mount_source`] for snapshot `id`'s `fsmeta.erofs` (its own dm-verity device).
    pub fn fsmeta_mount_source<'a>(
        &self,
        fsmeta: &'a VerifiedLayer,
        tree: Option<&DmVerityRecord>,
        id: u64,
        name: &str,
    ) -> Result<MountSource<'a>> {
        self.mount_source_as(fsmeta, tree, &self.fsmeta_device_name(id), name)
    }

    fn mount_source_as<'a>(
        &self,
        layer: &'a VerifiedLayer,
        tree: Option<&DmVerityRecord>,
        device: &str,
        name: &str,
    ) -> Result<MountSource<'a>> {
        if self.dmverity_mode == Toggle::Off {
            return Ok(MountSource::Layer(layer));
        }
        match tree {
            Some(rec) if self.dmverity_kernel => {
                let path = dmverity::activate(&layer.file, &layer.path, rec, device)?;
                let file = open(&path)?;
                Ok(MountSource::Device { file, path })
            }
            Some(_) => Ok(MountSource::Layer(layer)),
            None if self.dmverity_mode == Toggle::On => Err(Error::failed_precondition(format!(
                "dmverity_mode is \"on\" but layer {name:?} has no dm-verity tree ({})",
                layer.path.display()
            ))),
            None => Ok(MountSource::Layer(layer)),
        }
    }

    /// The sidecar at `sidecar` of a layer whose tree is `tree` ([`Self::dmverity_anchor`],
    /// which checked the sidecar against the record), for manager-mode mounts
    /// (`X-containerd.dmverity=`): `None` when dm-verity is off or (in auto mode) the layer
    /// has none.
    pub fn sidecar_for(
        &self,
        sidecar: &Path,
        tree: Option<&DmVerityRecord>,
        name: &str,
    ) -> Result<Option<PathBuf>> {
        match self.dmverity_mode {
            Toggle::Off => Ok(None),
            _ if tree.is_some() => Ok(Some(sidecar.to_path_buf())),
            Toggle::On => Err(Error::failed_precondition(format!(
                "dm-verity mode is 'on' but .dmverity metadata not found for layer {name:?} ({})",
                sidecar.display()
            ))),
            Toggle::Auto => Ok(None),
        }
    }

    /// Before snapshot `id`'s directory goes: close its dm-verity device, clear the immutable
    /// flag of its layer (filesystems without the flag are fine).
    pub fn release(&self, id: u64, layer: &Path) {
        dmverity::deactivate(&self.device_name(id));
        clear_immutable(layer);
    }

    /// Before snapshot `id`'s flattened chain goes: close fsmeta's dm-verity device, clear its
    /// immutable flag.
    pub fn release_fsmeta(&self, id: u64, fsmeta: &Path) {
        dmverity::deactivate(&self.fsmeta_device_name(id));
        clear_immutable(fsmeta);
    }

    /// Whether `fsmeta.erofs` images get a dm-verity tree: when layers get one (the differ
    /// appends them), or when every mount must go through dm-verity.
    pub fn fsmeta_trees(&self) -> bool {
        self.dmverity_trees || self.dmverity_mode == Toggle::On
    }

    /// Whether layers with dm-verity trees are mounted through dm-verity here.
    pub fn dmverity_required(&self) -> bool {
        self.dmverity_mode == Toggle::On
    }

    /// Append a dm-verity tree to fsmeta at `tmp` (not in place yet), when
    /// [`Self::fsmeta_trees`]; fsynced. Its data blocks are the image's own block size.
    pub fn fsmeta_tree(&self, tmp: &Path, block: u32) -> Result<Option<DmVerityRecord>> {
        if !self.fsmeta_trees() {
            return Ok(None);
        }
        dmverity::format_image(tmp, block).map(Some)
    }

    fn device_name(&self, id: u64) -> String {
        dmverity::device_name(&self.root, id)
    }

    fn fsmeta_device_name(&self, id: u64) -> String {
        dmverity::fsmeta_device_name(&self.root, id)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(dir: &Path, data: &[u8]) -> PathBuf {
        let p = dir.join("layer.erofs");
        std::fs::write(&p, data).unwrap();
        p
    }

    /// Kernel fs-verity mode, a layer Apply wrote (fs-verity is enabled only at Commit): it is
    /// checked against the digest Apply computed in userspace, so Mounts after Apply works
    /// and a replaced file is refused. (The kernel calls themselves, enabling and measuring
    /// at Commit, run on kernels with fs-verity: the VM matrix of issue 12.)
    #[test]
    fn kernel_mode_checks_applied_layers_against_their_apply_digest() {
        let d = tempfile::tempdir().unwrap();
        let i = Integrity::with_verity_mode(VerityMode::Kernel, d.path());
        let p = layer(d.path(), &vec![7u8; 3 * 4096 + 5]);
        let meta = i
            .after_apply(&p, false, &ahead::Hashed::default(), None)
            .unwrap()
            .0;
        let digest = meta
            .fsverity_digest
            .clone()
            .expect("a digest in kernel mode");
        assert_eq!(
            digest,
            hex::encode(
                verity::fsverity_digest(&File::open(&p).unwrap(), 3 * 4096 + 5, 4096).unwrap()
            )
        );
        let v = i
            .open_verified(&p, LayerState::Applied(Some(&meta)), "a")
            .unwrap();
        assert_eq!(v.path(), p);
        // Replaced after Apply: refused.
        std::fs::remove_file(&p).unwrap();
        layer(d.path(), &vec![8u8; 3 * 4096 + 5]);
        let e = i
            .open_verified(&p, LayerState::Applied(Some(&meta)), "a")
            .unwrap_err();
        assert!(e.to_string().contains("modified or replaced"), "{e}");
        // Nothing recorded: refused, not used unchecked.
        let e = i
            .open_verified(&p, LayerState::Applied(None), "a")
            .unwrap_err();
        assert!(e.to_string().contains("no fs-verity digest"), "{e}");
    }

    /// Userspace mode: the same, and committed layers without a digest are refused too.
    #[test]
    fn userspace_mode_needs_a_recorded_digest() {
        let d = tempfile::tempdir().unwrap();
        let i = Integrity::with_verity_mode(VerityMode::Userspace, d.path());
        let p = layer(d.path(), b"layer");
        let meta = i
            .after_apply(&p, false, &ahead::Hashed::default(), None)
            .unwrap()
            .0;
        i.open_verified(&p, LayerState::Committed(Some(&meta)), "c")
            .unwrap();
        let bare = LayerMeta::default();
        for state in [
            LayerState::Committed(None),
            LayerState::Committed(Some(&bare)),
            LayerState::Applied(Some(&bare)),
        ] {
            let e = i.open_verified(&p, state, "c").unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::FailedPrecondition, "{e}");
        }
        // fs-verity off: nothing to check.
        let off = Integrity::with_verity_mode(VerityMode::Off, d.path());
        off.open_verified(&p, LayerState::Committed(None), "c")
            .unwrap();
    }

    /// Commit in userspace mode records the digest Apply computed, and the tree Apply built.
    #[test]
    fn seal_keeps_what_apply_recorded() {
        let d = tempfile::tempdir().unwrap();
        let i = Integrity::with_verity_mode(VerityMode::Userspace, d.path());
        let p = layer(d.path(), b"layer");
        let applied = LayerMeta {
            fsverity_digest: Some("ab".repeat(32)),
            dmverity: Some(DmVerityRecord {
                roothash: "cd".repeat(32),
                hashoffset: 4096,
                data_block_size: 4096,
                hash_block_size: 4096,
            }),
            ..Default::default()
        };
        let mut meta = LayerMeta::default();
        i.seal(&p, &mut meta, Some(&applied)).unwrap();
        assert_eq!(meta.fsverity_digest, applied.fsverity_digest);
        assert_eq!(meta.dmverity, applied.dmverity);
        // A converted layer (nothing applied): computed here, no tree.
        let mut meta = LayerMeta::default();
        i.seal(&p, &mut meta, None).unwrap();
        assert!(meta.fsverity_digest.is_some() && meta.dmverity.is_none());
    }
}
