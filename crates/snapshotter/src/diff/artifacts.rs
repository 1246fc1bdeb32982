//! Apply's use of layer artifacts from the registry (see [`crate::artifacts`]): the fetch
//! beside the layer's stream, the checks, the policy, the log line and the counter.

use std::fs::File;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use super::content::Descriptor;
use crate::artifacts::{ArtifactSource, FetchError, Fetched, ImageId, Outcome, TreeCheck, Wanted};
use crate::config::Toggle;
use crate::error::{Error, Result};
use crate::snapshot::Snapshotter;
use crate::snapshot::layers::{TreePlan, TreeUse};

/// Where to fetch a layer's artifacts from, decided before the layer is written.
pub(super) struct Lookup {
    source: Arc<dyn ArtifactSource>,
    image: Option<ImageId>,
    wanted: Wanted,
}

/// A fetch running beside the layer's stream.
pub(super) struct Pending {
    rx: mpsc::Receiver<std::result::Result<Fetched, FetchError>>,
    deadline: std::time::Instant,
    timeout: Duration,
}

/// What the checks before the tree decided.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Not used: why.
    Skip(Outcome, String),
    /// The tar index passed (full images: there is none); the tree (if any) is checked with
    /// the layer's integrity.
    Passed {
        /// How the tree that came along (and is in the plan) is checked; `None`: no tree.
        tree: Option<TreeCheck>,
    },
}

impl Lookup {
    /// Start fetching `layer`'s artifacts on a thread of its own; [`Pending::wait`] waits at
    /// most `timeout` from now. The thread is not joined: a registry that accepts and hangs
    /// holds only that thread (the client's own timeouts end it), never the Apply.
    pub(super) fn start(self, layer: &str, timeout: Duration) -> Pending {
        let (tx, rx) = mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + timeout;
        match self.image {
            None => {
                let _ = tx.send(Err(FetchError::Absent(
                    "containerd passed no image reference and manifest digest (snapshot labels containerd.io/snapshot/cri.image-ref and cri.manifest-digest)".into(),
                )));
            }
            Some(image) => {
                let layer = layer.to_string();
                let source = self.source;
                let wanted = self.wanted;
                let spawned = std::thread::Builder::new()
                    .name("artifact-fetch".into())
                    .spawn(move || {
                        let _ = tx.send(source.fetch(&image, &layer, wanted));
                    });
                if let Err(e) = spawned {
                    tracing::debug!(error = %e, "no thread for the artifact fetch");
                }
            }
        }
        Pending {
            rx,
            deadline,
            timeout,
        }
    }
}

impl Pending {
    /// The fetch's result, or a timeout once its time is up.
    pub(super) fn wait(self) -> std::result::Result<Fetched, FetchError> {
        let left = self
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(FetchError::Timeout(self.timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(FetchError::Unreachable(
                "the fetch thread ended without a result".into(),
            )),
        }
    }
}

impl Snapshotter {
    /// Whether to look for artifacts for tar layer `desc` applied onto `mounts` (as a tar
    /// index, or as a full image when `wanted` says so), and for which image (`None` when
    /// artifacts are off).
    pub(super) fn artifact_lookup(
        &self,
        desc: &Descriptor,
        mounts: &[crate::mount::Mount],
        wanted: Wanted,
    ) -> Option<Lookup> {
        let source = self.artifact_source()?.clone();
        let labels = self.apply_labels(mounts);
        let image = crate::artifacts::identify(
            |k| desc.annotations.get(k).map(String::as_str),
            |k| labels.get(k).map(String::as_str),
        );
        if let Some(i) = &image {
            tracing::debug!(layer = %desc.digest, image = %i.reference, manifest = %i.manifest_digest, from = i.from, "looking for layer artifacts");
        }
        Some(Lookup {
            source,
            image,
            wanted,
        })
    }

    /// Check what was fetched for layer `desc` against the layer just written (`layer`,
    /// `[index][tar]` or the full image as `wanted` says, `applied` the tar's digest and
    /// size), under the signature policy. An error fails the Apply (only
    /// `require_signed_root_hash` does that).
    pub(super) fn judge_artifacts(
        &self,
        desc: &Descriptor,
        applied: &Descriptor,
        layer: &File,
        wanted: Wanted,
        fetched: std::result::Result<Fetched, FetchError>,
    ) -> Result<(Verdict, Option<TreePlan>)> {
        let require = self.config().artifacts.require_signed_root_hash;
        let refuse = |why: &str| {
            Err(Error::failed_precondition(format!(
                "artifacts.require_signed_root_hash: layer {} has no valid root-hash signature: {why}",
                desc.digest
            )))
        };
        let f = match fetched {
            Ok(f) => f,
            Err(e) => {
                if require {
                    return refuse(&e.to_string());
                }
                let o = match &e {
                    FetchError::Absent(w) if w.starts_with("containerd passed no image") => {
                        Outcome::NoImage
                    }
                    e => crate::artifacts::outcome_of(e),
                };
                return Ok((Verdict::Skip(o, e.to_string()), None));
            }
        };
        if f.diff_id != applied.digest {
            let why = format!(
                "artifacts are for diffID {}, the layer's is {}",
                f.diff_id, applied.digest
            );
            if require {
                return refuse(&why);
            }
            return Ok((Verdict::Skip(Outcome::Invalid, why), None));
        }
        if wanted == Wanted::TarIndex {
            let size = u64::try_from(applied.size).unwrap_or(0);
            let checked = match &f.tar_index {
                Some(index) => crate::artifacts::check_index(index, layer, size)
                    .map_err(|e| Error::io("reading the layer's index", e))?,
                None => Err("the artifacts have no tar index".into()),
            };
            if let Err(why) = checked {
                if require {
                    return refuse(&why);
                }
                return Ok((Verdict::Skip(Outcome::BadIndex, why), None));
            }
        }
        let Some(tree) = f.tree else {
            if require {
                return refuse("the registry holds no dm-verity tree for it");
            }
            if wanted == Wanted::FullImage {
                // The tree is all a full image could use.
                return Ok((
                    Verdict::Skip(
                        Outcome::Absent,
                        "the registry holds no full-image dm-verity tree for it".into(),
                    ),
                    None,
                ));
            }
            return Ok((Verdict::Passed { tree: None }, None));
        };
        let signed = match &f.signature {
            None => Err("the registry holds no signature for it".to_string()),
            Some((scheme, sig)) if scheme == erofs_registry::artifacts::SCHEME_ED25519 => {
                erofs_registry::signature::verify_any(self.trusted_keys(), &tree.roothash, sig)
                    .map_err(|e| e.to_string())
            }
            Some((scheme, _)) => Err(format!("signature scheme {scheme:?} is not supported")),
        };
        if let Err(why) = &signed {
            if require {
                return refuse(why);
            }
            if f.signature.is_some() {
                // A signature that does not verify is a bad artifact, even where signatures
                // are optional: the tree it came with is not used either.
                return Ok((Verdict::Skip(Outcome::BadSignature, why.clone()), None));
            }
        }
        // See the module docs of crate::artifacts: the data is left to the kernel only when a
        // trusted root is known and every mount goes through dm-verity, and never for a full
        // image, whose data only the node's mkfs options determine (and whose blocks the node
        // hashed while writing them, so the full check costs little more).
        let check = if wanted == Wanted::TarIndex
            && signed.is_ok()
            && self.config().snapshotter.dmverity_mode == Toggle::On
        {
            TreeCheck::TreeOnly
        } else {
            TreeCheck::Full
        };
        Ok((
            Verdict::Passed { tree: Some(check) },
            Some(TreePlan {
                tree,
                check,
                required: require,
            }),
        ))
    }

    /// One log line and one count per layer looked up.
    pub(super) fn count_artifacts(&self, desc: &Descriptor, verdict: Verdict, tree: TreeUse) {
        let builds_trees = self.config().differ.enable_dmverity;
        let checked = match verdict {
            Verdict::Passed { tree: Some(c) } => c.name(),
            _ => "none",
        };
        let (outcome, why) = match verdict {
            Verdict::Skip(o, why) => (o, why),
            Verdict::Passed { tree: None } if builds_trees => (
                Outcome::Absent,
                "the registry holds a tar index but no dm-verity tree: tree computed".into(),
            ),
            Verdict::Passed { .. } => match tree {
                Some(Err(why)) => (Outcome::BadTree, why),
                _ => (Outcome::Used, String::new()),
            },
        };
        self.counters.artifacts.add(outcome);
        if outcome == Outcome::Used {
            // tree_check: how the fetched tree was checked (`root-only` leaves the data to
            // the kernel's dm-verity on every read).
            tracing::info!(layer = %desc.digest, tree_check = checked, "used layer artifacts from the registry");
        } else {
            tracing::warn!(layer = %desc.digest, outcome = %outcome.name(), reason = %why, "layer artifacts not used; computed locally");
        }
    }
}
