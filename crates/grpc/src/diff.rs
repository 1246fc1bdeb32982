//! `containerd.services.diff.v1.Diff` over the core.

use std::sync::Arc;

use containerd_api::containerd::services::diff::v1 as pb;
use containerd_api::containerd::services::diff::v1::diff_server::Diff;
use containerd_api::containerd::types;
use snapshotter::Snapshotter;
use snapshotter::diff::{ContentSource, Descriptor};
use tonic::{Request, Response, Status};

use crate::convert;
use crate::status::{blocking, missing};

/// The service.
#[derive(Debug, Clone)]
pub struct DiffService {
    core: Arc<Snapshotter>,
    content: Arc<dyn ContentSource>,
}

impl DiffService {
    /// Serve `core`, reading blobs from `content`.
    pub fn new(core: Arc<Snapshotter>, content: Arc<dyn ContentSource>) -> Self {
        DiffService { core, content }
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

#[tonic::async_trait]
impl Diff for DiffService {
    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let ns =
            namespace(&req).unwrap_or_else(|| self.core.config().differ.default_namespace.clone());
        let r = req.into_inner();
        let d = desc_from(r.diff.ok_or_else(|| missing("diff"))?);
        let mounts: Vec<snapshotter::Mount> =
            r.mounts.into_iter().map(convert::mount_from).collect();
        let (core, content) = (self.core.clone(), self.content.clone());
        let applied = blocking(move || core.apply(&d, &mounts, &*content, &ns)).await?;
        Ok(Response::new(pb::ApplyResponse {
            applied: Some(desc(applied)),
        }))
    }

    async fn diff(
        &self,
        _req: Request<pb::DiffRequest>,
    ) -> Result<Response<pb::DiffResponse>, Status> {
        Err(Status::unimplemented(
            "layer diffs are not produced by this differ yet; containerd falls back to the walking differ",
        ))
    }
}
