//! Integrity and isolation around layers: fs-verity, FS_IMMUTABLE_FL, idmapped lowers and
//! size-limited writable layers.

pub mod ahead;
pub mod dmverity;
pub mod quota;
pub mod verity;

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::config::{Config, Toggle};
use crate::error::{Error, Result};
use crate::snapshot::Snapshotter;
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

/// Decide at start-up how fs-verity is used: wanted by the config, and supported by the kernel
/// and the filesystem under `root` (probed by enabling it on a scratch file).
pub fn fsverity_policy(cfg: &Config, root: &Path) -> Result<VerityMode> {
    if !cfg.fsverity_wanted() {
        return Ok(VerityMode::Off);
    }
    let probe = root.join(format!(".fsverity-check-{}", std::process::id()));
    let r = (|| -> std::io::Result<std::result::Result<(), erofs_sys::fsverity::VerityError>> {
        std::fs::write(&probe, vec![0u8; 8192])?;
        let f = File::open(&probe)?;
        Ok(erofs_sys::fsverity::enable(&f, FSVERITY_BLOCK))
    })();
    let _ = std::fs::remove_file(&probe);
    let why = match r {
        Ok(Ok(())) => return Ok(VerityMode::Kernel),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
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

fn userspace_digest(layer: &Path, known: Option<&verity::Leaves>) -> Result<String> {
    let f = File::open(layer).map_err(|e| Error::io(format!("opening {}", layer.display()), e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io("stat of a layer", e))?
        .len();
    let d = verity::fsverity_digest_with(&f, len, FSVERITY_BLOCK as usize, known)
        .map_err(|e| Error::io(format!("hashing {}", layer.display()), e))?;
    Ok(hex::encode(d))
}

/// After a layer is durable: enable fs-verity and record its digest, set the immutable flag.
/// `digest` is the userspace digest the differ already computed for this file, if any.
pub(crate) fn seal(
    s: &Snapshotter,
    layer: &Path,
    meta: &mut LayerMeta,
    digest: Option<String>,
) -> Result<()> {
    match s.verity {
        VerityMode::Off => {}
        VerityMode::Kernel => {
            let f = File::open(layer)
                .map_err(|e| Error::io(format!("opening {}", layer.display()), e))?;
            match erofs_sys::fsverity::enable(&f, FSVERITY_BLOCK) {
                Ok(()) | Err(erofs_sys::fsverity::VerityError::AlreadyEnabled) => {}
                Err(e) => {
                    return Err(Error::internal(format!(
                        "enabling fs-verity on {}: {e}",
                        layer.display()
                    )));
                }
            }
            let d = erofs_sys::fsverity::measure(&f)
                .map_err(|e| Error::internal(format!("measuring {}: {e}", layer.display())))?;
            meta.fsverity_digest = Some(hex::encode(d));
        }
        VerityMode::Userspace => {
            meta.fsverity_digest = Some(match digest {
                Some(d) => d,
                None => userspace_digest(layer, None)?,
            })
        }
    }
    meta.immutable = s.cfg.snapshotter.set_immutable;
    Ok(())
}

/// Once a committed layer is in place: FS_IMMUTABLE_FL, when configured (a warning where the
/// filesystem has no such flag).
pub(crate) fn set_immutable(s: &Snapshotter, layer: &Path) {
    if s.cfg.snapshotter.set_immutable
        && let Err(e) = erofs_sys::flags::set_immutable_path(layer, true)
    {
        tracing::warn!(layer = %layer.display(), error = %e, "could not set the immutable flag");
    }
}

/// Before a layer is mounted: its digest must be the one recorded at commit, so a modified or
/// a replaced file is refused. With kernel fs-verity the check is a measurement; in userspace
/// mode the digest is recomputed.
pub(crate) fn verify_before_mount(
    s: &Snapshotter,
    id: u64,
    meta: Option<&LayerMeta>,
    name: &str,
) -> Result<()> {
    let layer = s.layout.layer(id);
    let want = meta.and_then(|m| m.fsverity_digest.as_deref());
    let got = match s.verity {
        VerityMode::Off => return Ok(()),
        VerityMode::Kernel => {
            let f = File::open(&layer)
                .map_err(|e| Error::io(format!("opening {}", layer.display()), e))?;
            if !erofs_sys::fsverity::is_enabled(&f).unwrap_or(false) {
                return Err(Error::failed_precondition(format!(
                    "fs-verity is not enabled on layer {name:?} ({}): refusing to mount it",
                    layer.display()
                )));
            }
            let d = erofs_sys::fsverity::measure(&f)
                .map_err(|e| Error::internal(format!("measuring {}: {e}", layer.display())))?;
            hex::encode(d)
        }
        VerityMode::Userspace if want.is_none() => {
            tracing::warn!(
                layer = name,
                "layer has no recorded fs-verity digest (committed before fs-verity was enabled); mounting it unchecked"
            );
            return Ok(());
        }
        VerityMode::Userspace => userspace_digest(&layer, None)?,
    };
    match want {
        Some(w) if w != got => Err(Error::failed_precondition(format!(
            "layer {name:?} ({}) does not match the fs-verity digest recorded when it was committed: it was modified or replaced; refusing to mount it",
            layer.display()
        ))),
        _ => Ok(()),
    }
}

/// After the differ wrote a layer into an active snapshot (temporary name `tmp`, not yet in
/// place): append the dm-verity tree and write the sidecar, when configured.
/// Returns the layer's userspace fs-verity digest in userspace mode, computed here (during
/// unpack) rather than in Commit, which containerd runs inside its global transaction.
/// `ahead` holds the block hashes taken while the layer was written ([`ahead_trees`]).
pub(crate) fn after_apply(
    s: &Snapshotter,
    tmp: &Path,
    tar_index: bool,
    ahead: &ahead::Hashed,
) -> Result<Option<String>> {
    if s.cfg.differ.enable_dmverity {
        dmverity::format_layer(tmp, tar_index, ahead.dmverity.as_ref())?;
    }
    if s.verity == VerityMode::Userspace {
        return userspace_digest(tmp, ahead.fsverity.as_ref()).map(Some);
    }
    Ok(None)
}

/// The trees [`after_apply`] builds whose block hashes can be taken while the layer is
/// written: full images only (see [`ahead`]).
pub(crate) fn ahead_trees(s: &Snapshotter, tar_index: bool) -> ahead::Trees {
    ahead::Trees {
        fsverity: !tar_index && s.verity == VerityMode::Userspace,
        dmverity: !tar_index && s.cfg.differ.enable_dmverity,
    }
}

/// Before a layer is deleted: clear the immutable flag (filesystems without the flag are fine).
pub(crate) fn release(layer: &Path) {
    match erofs_sys::flags::set_immutable_path(layer, false) {
        Ok(_) | Err(erofs_sys::flags::FlagsError::Unsupported(_)) => {}
        Err(erofs_sys::flags::FlagsError::Open { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(layer = %layer.display(), error = %e, "clearing the immutable flag")
        }
    }
}

/// Whether idmapped mounts can be made here (Linux 5.12+ with mount_setattr), probed once on
/// a private directory under `root` (so unrelated mounts elsewhere cannot spoil the answer).
pub fn idmap_supported(root: &Path) -> bool {
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

/// User-namespace id mappings from the snapshot labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMap {
    uid_label: String,
    gid_label: String,
    uids: Vec<erofs_sys::idmap::IdMapping>,
    gids: Vec<erofs_sys::idmap::IdMapping>,
}

impl IdMap {
    /// Parse the `uidmapping`/`gidmapping` labels; `None` when neither is set.
    pub fn from_labels(uid: Option<&String>, gid: Option<&String>) -> Result<Option<Self>> {
        if uid.is_none() && gid.is_none() {
            return Ok(None);
        }
        let (Some(u), Some(g)) = (uid, gid) else {
            return Err(Error::invalid_argument(
                "uidmapping and gidmapping labels must be given together",
            ));
        };
        let parse = |s: &str, what: &str| {
            erofs_sys::idmap::parse_id_mappings(s)
                .map_err(|e| Error::invalid_argument(format!("{what} label: {e}")))
        };
        Ok(Some(IdMap {
            uids: parse(u, "uidmapping")?,
            gids: parse(g, "gidmapping")?,
            uid_label: u.clone(),
            gid_label: g.clone(),
        }))
    }

    /// Host uid and gid of the container's root.
    pub fn root_pair(&self) -> (u32, u32) {
        let host = |m: &[erofs_sys::idmap::IdMapping]| {
            m.iter()
                .find(|(c, _, n)| *c == 0 && *n > 0)
                .map(|(_, h, _)| *h)
                .unwrap_or(0)
        };
        (host(&self.uids), host(&self.gids))
    }

    /// Overlay options for the mount manager (`uidmap=`, `gidmap=`).
    pub fn overlay_options(&self) -> Vec<String> {
        vec![
            format!("uidmap={}", self.uid_label),
            format!("gidmap={}", self.gid_label),
        ]
    }

    /// A stable short name for mount points.
    pub fn tag(&self) -> String {
        use sha2::Digest;
        let h = sha2::Sha256::digest(format!("{}|{}", self.uid_label, self.gid_label));
        hex::encode(&h[..8])
    }

    /// The id mappings.
    pub fn maps(
        &self,
    ) -> (
        &[erofs_sys::idmap::IdMapping],
        &[erofs_sys::idmap::IdMapping],
    ) {
        (&self.uids, &self.gids)
    }
}

impl Snapshotter {
    /// Host mode with id mappings: an idmapped clone of layer `id`'s mount, at
    /// `snapshots/ID/idmap-TAG` (gone with the snapshot directory).
    pub(crate) fn ensure_idmapped(&self, id: u64, map: &IdMap) -> Result<PathBuf> {
        use std::os::fd::AsFd;
        let target = self.layout.dir(id).join(format!("idmap-{}", map.tag()));
        let _g = self.mount_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.mounter.is_mountpoint(&target)? {
            return Ok(target);
        }
        std::fs::create_dir_all(&target)
            .map_err(|e| Error::io(format!("creating {}", target.display()), e))?;
        let (u, g) = map.maps();
        let userns = erofs_sys::idmap::create_userns(u, g)
            .map_err(|e| Error::internal(format!("creating a user namespace: {e}")))?;
        let tree = erofs_sys::idmap::idmapped_clone(&self.layout.fs(id), userns.as_fd())
            .map_err(|e| Error::internal(format!("idmapping layer {id}: {e}")))?;
        erofs_sys::mount::move_mount_to(tree.as_fd(), &target)
            .map_err(|e| Error::internal(format!("idmapped mount of layer {id}: {e}")))?;
        Ok(target)
    }
}
