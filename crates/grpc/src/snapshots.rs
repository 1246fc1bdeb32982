//! `containerd.services.snapshots.v1.Snapshots` over the core.

use std::pin::Pin;
use std::sync::Arc;

use containerd_api::containerd::services::snapshots::v1 as pb;
use containerd_api::containerd::services::snapshots::v1::snapshots_server::Snapshots;
use futures::Stream;
use snapshotter::Snapshotter;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::deadline::{Budget, Weight, run};
use crate::request::{Method, traced};
use crate::status::missing;

/// containerd's reference server streams List in batches of this many.
const LIST_BATCH: usize = 100;

/// The service.
#[derive(Debug, Clone)]
pub struct SnapshotsService {
    core: Arc<Snapshotter>,
}

impl SnapshotsService {
    /// Serve `core`.
    pub fn new(core: Arc<Snapshotter>) -> Self {
        SnapshotsService { core }
    }
}

fn mounts(m: Vec<snapshotter::Mount>) -> Vec<containerd_api::containerd::types::Mount> {
    m.into_iter().map(convert::mount).collect()
}

#[tonic::async_trait]
impl Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let budget = Budget::of(req.metadata(), Weight::Light, self.core.config());
        let r = req.into_inner();
        let span = tracing::info_span!("prepare", key = %r.key, parent = %r.parent);
        let core = self.core.clone();
        traced(&self.core, "prepare", span, Method::Change, async move {
            let m = run(budget, move |_| {
                core.prepare(&r.key, &r.parent, r.labels.into_iter().collect())
            })
            .await?;
            Ok(Response::new(pb::PrepareSnapshotResponse {
                mounts: mounts(m),
            }))
        })
        .await
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let budget = Budget::of(req.metadata(), Weight::Light, self.core.config());
        let r = req.into_inner();
        let span = tracing::info_span!("view", key = %r.key, parent = %r.parent);
        let core = self.core.clone();
        traced(&self.core, "view", span, Method::Change, async move {
            let m = run(budget, move |_| {
                core.view(&r.key, &r.parent, r.labels.into_iter().collect())
            })
            .await?;
            Ok(Response::new(pb::ViewSnapshotResponse {
                mounts: mounts(m),
            }))
        })
        .await
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let budget = Budget::of(req.metadata(), Weight::Light, self.core.config());
        let r = req.into_inner();
        let span = tracing::debug_span!("mounts", key = %r.key);
        let core = self.core.clone();
        traced(&self.core, "mounts", span, Method::Query, async move {
            let m = run(budget, move |_| core.mounts(&r.key)).await?;
            Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
        })
        .await
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let budget = Budget::of(req.metadata(), Weight::Heavy, self.core.config());
        let r = req.into_inner();
        let span = tracing::info_span!("commit", name = %r.name, key = %r.key);
        let core = self.core.clone();
        traced(&self.core, "commit", span, Method::Change, async move {
            run(budget, move |c| {
                core.commit(
                    &r.name,
                    &r.key,
                    r.labels.into_iter().collect(),
                    &r.parent,
                    c,
                )
            })
            .await?;
            Ok(Response::new(()))
        })
        .await
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let budget = Budget::of(req.metadata(), Weight::Light, self.core.config());
        let r = req.into_inner();
        let span = tracing::info_span!("remove", key = %r.key);
        let core = self.core.clone();
        traced(&self.core, "remove", span, Method::Change, async move {
            run(budget, move |_| core.remove(&r.key)).await?;
            Ok(Response::new(()))
        })
        .await
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let budget = Budget::of(req.metadata(), Weight::Light, self.core.config());
        let r = req.into_inner();
        let span = tracing::debug_span!("stat", key = %r.key);
        let core = self.core.clone();
        traced(&self.core, "stat", span, Method::Query, async move {
            let i = run(budget, move |_| core.stat(&r.key)).await?;
            Ok(Response::new(pb::StatSnapshotResponse {
                info: Some(convert::info(i)),
            }))
        })
        .await
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let budget = Budget::of(req.metadata(), Weight::Light, self.core.config());
        let r = req.into_inner();
        let key = r.info.as_ref().map(|i| i.name.as_str()).unwrap_or_default();
        let span = tracing::info_span!("update", key = %key);
        let core = self.core.clone();
        traced(&self.core, "update", span, Method::Change, async move {
            let info = r.info.ok_or_else(|| missing("info"))?;
            let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
            let i = run(budget, move |_| {
                core.update(convert::info_from(info), &paths)
            })
            .await?;
            Ok(Response::new(pb::UpdateSnapshotResponse {
                info: Some(convert::info(i)),
            }))
        })
        .await
    }

    type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let budget = Budget::of(req.metadata(), Weight::Light, self.core.config());
        let r = req.into_inner();
        let span = tracing::debug_span!("list", filters = ?r.filters);
        let core = self.core.clone();
        traced(&self.core, "list", span, Method::Query, async move {
            let infos = run(budget, move |_| core.list(&r.filters)).await?;
            let mut batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = Vec::new();
            let mut it = infos.into_iter().map(convert::info).peekable();
            while it.peek().is_some() {
                batches.push(Ok(pb::ListSnapshotsResponse {
                    info: it.by_ref().take(LIST_BATCH).collect(),
                }));
            }
            let stream: Self::ListStream = Box::pin(futures::stream::iter(batches));
            Ok(Response::new(stream))
        })
        .await
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let budget = Budget::of(req.metadata(), Weight::Light, self.core.config());
        let r = req.into_inner();
        let span = tracing::debug_span!("usage", key = %r.key);
        let core = self.core.clone();
        traced(&self.core, "usage", span, Method::Query, async move {
            let u = run(budget, move |_| core.usage(&r.key)).await?;
            Ok(Response::new(pb::UsageResponse {
                size: u.size as i64,
                inodes: u.inodes as i64,
            }))
        })
        .await
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let budget = Budget::of(_req.metadata(), Weight::Light, self.core.config());
        let span = tracing::info_span!("cleanup");
        let core = self.core.clone();
        traced(&self.core, "cleanup", span, Method::Change, async move {
            run(budget, move |_| core.cleanup()).await?;
            Ok(Response::new(()))
        })
        .await
    }
}
