//! [`ArtifactSource`] over the image's registry, through `erofs_registry::client`: the
//! endpoints `hosts.toml` gives for the image's host (mirrors first), the referrers of the
//! image manifest with our artifact type, the referrer manifest that has the layer, and its
//! blobs, every request held to `artifacts.fetch_timeout` and every blob to
//! `artifacts.max_blob_size`.
//!
//! Each endpoint is asked with its own `hosts.toml` settings ([`Endpoint::client_options`]):
//! `https` with the system roots plus its `ca` files, its `client` certificates and
//! `skip_verify`; its `[header]` values on every request. An endpoint whose TLS fails
//! (certificate refused either way, TLS files that cannot be read) is reported as
//! [`FetchError::Tls`] (counter outcome `tls`) and the next endpoint is tried; if none gives
//! the artifacts the layer is computed locally. Endpoints with a path (`override_path`, or a
//! mirror URL with a path) are skipped: the client talks to `/v2` at the host's root only.

use std::path::PathBuf;
use std::time::Duration;

use erofs_registry::artifacts::{ARTIFACT_TYPE, ArtifactSet, Manifest};
use erofs_registry::client::{Client, ClientOptions};

use super::hosts::{self, Endpoint};
use super::{ArtifactSource, FetchError, Fetched, FetchedTree, ImageId, TreeBytes, Wanted};

/// Most referrer manifests of our type looked at for one image.
const MAX_REFERRERS: usize = 8;

/// The registry source the daemon installs.
#[derive(Debug, Clone)]
pub struct RegistrySource {
    hosts_dir: Option<PathBuf>,
    timeout: Duration,
    max_blob: u64,
    /// Where fetched trees are held (unnamed files: they vanish with their last handle).
    scratch: PathBuf,
}

impl RegistrySource {
    /// From `[artifacts]`.
    pub fn new(cfg: &crate::config::Config) -> Self {
        let dir = &cfg.artifacts.hosts_dir;
        RegistrySource {
            hosts_dir: (!dir.as_os_str().is_empty()).then(|| dir.clone()),
            timeout: cfg.artifact_fetch_timeout(),
            max_blob: cfg.artifact_max_blob(),
            scratch: cfg.root_path.clone(),
        }
    }
}

/// What a client error means for the fallback.
fn classify(e: &erofs_registry::Error) -> FetchError {
    use erofs_registry::Error as E;
    match e {
        _ if e.is_not_found() => FetchError::Absent(e.to_string()),
        E::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) =>
        {
            FetchError::Unreachable(format!("timed out: {e}"))
        }
        E::Tls { .. } => FetchError::Tls(e.to_string()),
        E::Io { .. } | E::Status { .. } | E::Unsupported(_) => {
            FetchError::Unreachable(e.to_string())
        }
        _ => FetchError::Invalid(e.to_string()),
    }
}

impl RegistrySource {
    /// Why `ep` cannot be used by this client, if it cannot.
    fn unusable(ep: &Endpoint) -> Option<String> {
        if ep.path != "/v2" {
            return Some(format!(
                "path {:?} (override_path) is not supported",
                ep.path
            ));
        }
        None
    }

    fn fetch_from(
        &self,
        ep: &Endpoint,
        repo: &str,
        image: &ImageId,
        layer: &str,
        wanted: Wanted,
    ) -> Result<Fetched, FetchError> {
        if ep.plain_http() && ep.tls.is_set() {
            tracing::debug!(endpoint = %ep.base_url(), "TLS settings of a plain-http endpoint are not used");
        }
        let client = Client::new(
            &ep.origin(),
            ep.client_options(ClientOptions {
                connect_timeout: self.timeout,
                io_timeout: self.timeout,
                request_timeout: Some(self.timeout),
                ..ClientOptions::default()
            }),
        )
        .map_err(|e| classify(&e))?;
        let (index, _via) = client
            .referrers(repo, &image.manifest_digest, Some(ARTIFACT_TYPE))
            .map_err(|e| classify(&e))?;
        if index.manifests.is_empty() {
            return Err(FetchError::Absent(format!(
                "no referrers of type {ARTIFACT_TYPE} for {}",
                image.manifest_digest
            )));
        }
        // The newest push is listed last (the referrers tag appends); look there first.
        for d in index.manifests.iter().rev().take(MAX_REFERRERS) {
            let m = client
                .get_manifest(repo, &d.digest)
                .map_err(|e| classify(&e))?;
            let set = Manifest::parse(&m.bytes)
                .and_then(|m| ArtifactSet::from_manifest(&m))
                .map_err(|e| FetchError::Invalid(format!("referrer {}: {e}", d.digest)))?;
            if set.subject.digest != image.manifest_digest {
                return Err(FetchError::Invalid(format!(
                    "referrer {} has subject {}, not {}",
                    d.digest, set.subject.digest, image.manifest_digest
                )));
            }
            // A full-image node needs a push with `--full-image`; an older one may have it.
            let Some(l) = set
                .layer(layer)
                .filter(|l| wanted == Wanted::TarIndex || l.image_dmverity.is_some())
            else {
                continue;
            };
            let blob = |desc| {
                client
                    .get_blob(repo, desc, self.max_blob)
                    .map_err(|e| classify(&e))
            };
            // Only what the node's layer needs: a full image has no index, and each tree is
            // a sixteenth or more of its layer.
            let (tar_index, tree, signature) = match wanted {
                Wanted::TarIndex => (
                    Some(blob(&l.tar_index.descriptor)?),
                    &l.dmverity,
                    &l.signature,
                ),
                Wanted::FullImage => (None, &l.image_dmverity, &l.image_signature),
            };
            let tree = match tree {
                Some(t) => Some(FetchedTree {
                    bytes: self.blob_to_file(&client, repo, &t.descriptor)?,
                    roothash: t.root_digest.clone(),
                    block_size: t.block_size,
                    hash_offset: t.hash_offset,
                }),
                None => None,
            };
            let signature = match signature {
                Some(s) => Some((s.scheme.clone(), blob(&s.descriptor)?)),
                None => None,
            };
            return Ok(Fetched {
                tar_index,
                diff_id: l.diff_id.clone(),
                tree,
                signature,
            });
        }
        Err(FetchError::Absent(match wanted {
            Wanted::TarIndex => format!(
                "the referrers of {} have no artifacts for layer {layer}",
                image.manifest_digest
            ),
            Wanted::FullImage => format!(
                "the referrers of {} have no full-image dm-verity tree for layer {layer} (artifacts build --full-image)",
                image.manifest_digest
            ),
        }))
    }
}

impl RegistrySource {
    /// Fetch a (possibly large: 1/16 of its layer) tree blob into an unnamed file under the
    /// root instead of memory.
    fn blob_to_file(
        &self,
        client: &Client,
        repo: &str,
        d: &erofs_registry::artifacts::Descriptor,
    ) -> Result<TreeBytes, FetchError> {
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::open(
            &self.scratch,
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| {
            FetchError::Invalid(format!(
                "no scratch file for the tree under {}: {e}",
                self.scratch.display()
            ))
        })?;
        let mut f = std::fs::File::from(fd);
        client
            .get_blob_to(repo, &d.digest, Some(d.size), self.max_blob, &mut f)
            .map_err(|e| classify(&e))?;
        Ok(TreeBytes::File(std::sync::Arc::new(f)))
    }
}

impl ArtifactSource for RegistrySource {
    fn fetch(&self, image: &ImageId, layer: &str, wanted: Wanted) -> Result<Fetched, FetchError> {
        let r = erofs_registry::Reference::parse(&image.reference)
            .map_err(|e| FetchError::Invalid(e.to_string()))?;
        let endpoints = hosts::endpoints(self.hosts_dir.as_deref(), &r.host)
            .map_err(|e| FetchError::Invalid(format!("hosts.toml: {e}")))?;
        let mut last = None;
        for ep in &endpoints {
            if let Some(why) = Self::unusable(ep) {
                tracing::info!(endpoint = %ep.base_url(), reason = %why, "registry endpoint skipped for artifacts");
                last = Some(FetchError::Unreachable(format!("{}: {why}", ep.base_url())));
                continue;
            }
            match self.fetch_from(ep, &r.repository, image, layer, wanted) {
                Ok(f) => return Ok(f),
                Err(e) => {
                    tracing::debug!(endpoint = %ep.base_url(), error = %e, "no artifacts from this endpoint");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| FetchError::Unreachable("no registry endpoint".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(hosts_dir: Option<PathBuf>) -> RegistrySource {
        RegistrySource {
            hosts_dir,
            timeout: Duration::from_millis(300),
            max_blob: 1 << 20,
            scratch: std::env::temp_dir(),
        }
    }

    fn image(reference: &str) -> ImageId {
        ImageId {
            reference: reference.into(),
            manifest_digest: format!("sha256:{}", "a".repeat(64)),
            from: "labels",
        }
    }

    #[test]
    fn endpoints_the_client_cannot_use_are_skipped_not_fatal() {
        // An https endpoint whose CA file is missing: a TLS failure naming the file.
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("r.example")).unwrap();
        std::fs::write(
            d.path().join("r.example/hosts.toml"),
            "server = \"https://127.0.0.1:9\"\nca = \"missing-ca.pem\"\n",
        )
        .unwrap();
        let e = source(Some(d.path().into()))
            .fetch(&image("r.example/app:1"), "sha256:00", Wanted::TarIndex)
            .unwrap_err();
        assert!(
            matches!(&e, FetchError::Tls(m) if m.contains("missing-ca.pem")),
            "{e}"
        );
        // A mirror with a path override, then a refused connection: both reported, the
        // last one wins.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            d.path().join("r.example/hosts.toml"),
            format!(
                "server = \"http://127.0.0.1:{port}\"\n[host.\"http://m.local/x\"]\noverride_path = true\n"
            ),
        )
        .unwrap();
        let e = source(Some(d.path().into()))
            .fetch(&image("r.example/app:1"), "sha256:00", Wanted::TarIndex)
            .unwrap_err();
        assert!(matches!(e, FetchError::Unreachable(_)), "{e}");
        // A reference that does not parse.
        let e = source(None)
            .fetch(&image("UPPER/case"), "x", Wanted::FullImage)
            .unwrap_err();
        assert!(matches!(e, FetchError::Invalid(_)), "{e}");
    }
}
