//! `containerd.services.diff.v1.Diff` over the core.

use std::sync::Arc;

use containerd_api::containerd::services::diff::v1 as pb;
use containerd_api::containerd::services::diff::v1::diff_server::Diff;
use containerd_api::containerd::types;
use snapshotter::Snapshotter;
use snapshotter::diff::{ContentSource, Descriptor};
use tonic::{Request, Response, Status};

use crate::content::GrpcContent;
use crate::convert;
use crate::deadline::{Budget, Weight, run};
use crate::request::{Method, traced};
use crate::status::{from_core, missing};

/// The service.
#[derive(Debug, Clone)]
pub struct DiffService {
    core: Arc<Snapshotter>,
    content: Arc<dyn ContentSource>,
    containerd: Arc<GrpcContent>,
}

impl DiffService {
    /// Serve `core`, reading blobs from `content` and storing diffs through containerd's
    /// Content service (`containerd`).
    pub fn new(
        core: Arc<Snapshotter>,
        content: Arc<dyn ContentSource>,
        containerd: Arc<GrpcContent>,
    ) -> Self {
        DiffService {
            core,
            content,
            containerd,
        }
    }

    fn namespace<T>(&self, req: &Request<T>) -> String {
        namespace(req).unwrap_or_else(|| self.core.config().differ.default_namespace.clone())
    }
}

/// The containerd namespace of a request, if it carries one.
pub fn namespace<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("containerd-namespace")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|s| !s.is_empty())
}

fn desc_from(d: types::Descriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type,
        digest: d.digest,
        size: d.size,
        annotations: d.annotations.into_iter().collect(),
    }
}

fn desc(d: Descriptor) -> types::Descriptor {
    types::Descriptor {
        media_type: d.media_type,
        digest: d.digest,
        size: d.size,
        annotations: d.annotations.into_iter().collect(),
    }
}

/// protobuf's Timestamp range (`google/protobuf/timestamp.proto`: 0001-01-01 to 9999-12-31).
const TIMESTAMP_SECS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_299_799;

/// `source_date_epoch` as the core takes it; a timestamp protobuf calls invalid (nanos
/// outside 0..1e9, seconds outside years 1 to 9999) is the caller's mistake, as Go's
/// `timestamppb.CheckValid` says.
fn epoch_from(t: prost_types::Timestamp) -> Result<snapshotter::store::Timestamp, Status> {
    if !(0..1_000_000_000).contains(&t.nanos) || !TIMESTAMP_SECS.contains(&t.seconds) {
        return Err(Status::invalid_argument(format!(
            "source_date_epoch {}s {}ns is not a valid timestamp",
            t.seconds, t.nanos
        )));
    }
    Ok(snapshotter::store::Timestamp {
        secs: t.seconds,
        nanos: t.nanos as u32,
    })
}

#[tonic::async_trait]
impl Diff for DiffService {
    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let ns = self.namespace(&req);
        let budget = Budget::of(req.metadata(), Weight::Heavy, self.core.config());
        let r = req.into_inner();
        let (digest, media_type) = r
            .diff
            .as_ref()
            .map(|d| (d.digest.as_str(), d.media_type.as_str()))
            .unwrap_or_default();
        // Which annotations containerd sent with the layer (remote snapshotters and our
        // artifact lookup identify the image by them): their keys only, values can be long.
        let annotations = r
            .diff
            .as_ref()
            .map(|d| {
                let mut k: Vec<&str> = d.annotations.keys().map(String::as_str).collect();
                k.sort_unstable();
                k.join(",")
            })
            .unwrap_or_default();
        let span = tracing::info_span!(
            "apply",
            digest = %digest,
            media_type = %media_type,
            namespace = %ns,
            annotations = %annotations
        );
        let (core, content) = (self.core.clone(), self.content.clone());
        traced(&self.core, "apply", span, Method::Change, async move {
            let d = desc_from(r.diff.ok_or_else(|| missing("diff"))?);
            let mounts: Vec<snapshotter::Mount> =
                r.mounts.into_iter().map(convert::mount_from).collect();
            let applied = run(budget, move |c| core.apply(&d, &mounts, &*content, &ns, c)).await?;
            Ok(Response::new(pb::ApplyResponse {
                applied: Some(desc(applied)),
            }))
        })
        .await
    }

    async fn diff(
        &self,
        req: Request<pb::DiffRequest>,
    ) -> Result<Response<pb::DiffResponse>, Status> {
        let ns = self.namespace(&req);
        let lease = req
            .metadata()
            .get("containerd-lease")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let budget = Budget::of(req.metadata(), Weight::Heavy, self.core.config());
        let r = req.into_inner();
        // The digest is known only at the end; it is recorded into the span then.
        let span = tracing::info_span!(
            "diff",
            media_type = %r.media_type,
            namespace = %ns,
            digest = tracing::field::Empty
        );
        let core = self.core.clone();
        let containerd = self.containerd.clone();
        traced(&self.core, "compare", span, Method::Change, async move {
            let lower: Vec<snapshotter::Mount> =
                r.left.into_iter().map(convert::mount_from).collect();
            let upper: Vec<snapshotter::Mount> =
                r.right.into_iter().map(convert::mount_from).collect();
            let epoch = r.source_date_epoch.map(epoch_from).transpose()?;
            let media_type = r.media_type.clone();
            let blob = run(budget, move |c| {
                core.compare(&lower, &upper, &media_type, epoch, c)
            })
            .await?;
            tracing::Span::current().record("digest", blob.digest.as_str());
            let reference = if r.r#ref.is_empty() {
                format!(
                    "erofs-diff-{:x}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_nanos()
                )
            } else {
                r.r#ref
            };
            // Storing the diff in containerd's content store is held to the same deadline.
            let store = async {
                let channel = containerd.channel().map_err(from_core)?;
                let lease = match lease {
                    Some(l) => l,
                    None => {
                        crate::lease::expiring(channel.clone(), &ns, crate::lease::DIFF_LEASE_TTL)
                            .await
                            .map_err(from_core)?
                    }
                };
                crate::content::upload(channel, &ns, Some(&lease), &reference, &blob, r.labels)
                    .await
                    .map_err(from_core)
            };
            tokio::time::timeout_at(budget.deadline.into(), store)
                .await
                .map_err(|_| budget.exceeded())??;
            Ok(Response::new(pb::DiffResponse {
                diff: Some(types::Descriptor {
                    media_type: blob.media_type.clone(),
                    digest: blob.digest.clone(),
                    size: blob.size as i64,
                    annotations: Default::default(),
                }),
            }))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_date_epoch_must_be_a_valid_timestamp() {
        let ts = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        for (s, n) in [
            (0, 0),
            (1_700_000_000, 999_999_999),
            (-1, 5),
            (253_402_299_799, 0),
        ] {
            let t = epoch_from(ts(s, n)).unwrap();
            assert_eq!((t.secs, t.nanos), (s, n as u32));
        }
        for (s, n) in [
            (0, i32::MAX),
            (0, 1_000_000_000),
            (0, -1),
            (i64::MIN, 0),
            (i64::MAX, 0),
            (-62_135_596_801, 0),
        ] {
            let e = epoch_from(ts(s, n)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{s} {n}");
        }
    }
}
