//! Idmapped lowers: the user-namespace id mappings containerd asks for in snapshot labels, and
//! the idmapped clone of a mounted layer that host mode stacks instead of the layer itself.

use std::os::fd::AsFd;
use std::path::Path;

use erofs_sys::idmap::IdMapping;

use crate::error::{Error, Result};

/// User-namespace id mappings from the snapshot labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMap {
    uid_label: String,
    gid_label: String,
    uids: Vec<IdMapping>,
    gids: Vec<IdMapping>,
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
        let host = |m: &[IdMapping]| {
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

    /// The id mappings (uids, gids).
    pub fn maps(&self) -> (&[IdMapping], &[IdMapping]) {
        (&self.uids, &self.gids)
    }
}

/// Attach an idmapped clone of the mount at `source` to `target` (an existing directory).
pub fn mount_clone(source: &Path, target: &Path, map: &IdMap) -> Result<()> {
    let (u, g) = map.maps();
    let userns = erofs_sys::idmap::create_userns(u, g)
        .map_err(|e| Error::internal(format!("creating a user namespace: {e}")))?;
    let tree = erofs_sys::idmap::idmapped_clone(source, userns.as_fd())
        .map_err(|e| Error::internal(format!("idmapping {}: {e}", source.display())))?;
    erofs_sys::mount::move_mount_to(tree.as_fd(), target).map_err(|e| {
        Error::internal(format!(
            "idmapped mount of {} on {}: {e}",
            source.display(),
            target.display()
        ))
    })
}
