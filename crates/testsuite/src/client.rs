//! A gRPC client of a snapshotter daemon's Snapshots and Diff services on its
//! Unix socket, sending what containerd's proxy plugins send: the snapshotter
//! name in every Snapshots request, and a deadline on every call.
//!
//! ```no_run
//! use testsuite::client::{self, Client};
//!
//! # async fn f() -> anyhow::Result<()> {
//! let c = Client::new(client::connect("/run/erofs.sock".as_ref()).await?, "erofs-rs");
//! let mounts = c.prepare("k", "").await?;
//! c.commit("layer", "k").await?;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use containerd_api::containerd::services::diff::v1 as dpb;
use containerd_api::containerd::services::snapshots::v1 as pb;
use containerd_api::containerd::types::{Descriptor, Mount};
use dpb::diff_client::DiffClient;
use pb::snapshots_client::SnapshotsClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Labels as the API carries them.
pub type Labels = HashMap<String, String>;

/// Labels from pairs.
pub fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Fails unless `r` is an error with `code`; returns the status.
pub fn expect_code<T: std::fmt::Debug>(
    r: Result<T, Status>,
    code: Code,
    what: &str,
) -> Result<Status> {
    match r {
        Ok(v) => bail!("{what}: expected {code:?}, got success: {v:?}"),
        Err(s) if s.code() == code => Ok(s),
        Err(s) => bail!(
            "{what}: expected {code:?}, got {:?}: {}",
            s.code(),
            s.message()
        ),
    }
}

/// A channel to the gRPC server on `socket`, connected now.
pub async fn connect(socket: &Path) -> Result<Channel> {
    let ep = Endpoint::try_from("http://[::]:50051")?;
    let path = socket.to_path_buf();
    ep.connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
        let p = path.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(p).await?,
            ))
        }
    }))
    .await
    .with_context(|| format!("connecting to {}", socket.display()))
}

/// A client of the Snapshots and Diff services on one channel. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    sn: SnapshotsClient<Channel>,
    diff: DiffClient<Channel>,
    /// The `snapshotter` field of every Snapshots request (containerd puts the
    /// proxy plugin's name there).
    pub snapshotter: String,
    timeout: Duration,
    default_labels: fn() -> Labels,
}

impl Client {
    /// A client naming `snapshotter`, with a 600 s deadline per call and no
    /// default labels.
    pub fn new(ch: Channel, snapshotter: &str) -> Client {
        Client {
            sn: SnapshotsClient::new(ch.clone()),
            diff: DiffClient::new(ch),
            snapshotter: snapshotter.into(),
            timeout: Duration::from_secs(600),
            default_labels: Labels::new,
        }
    }

    /// This client with another deadline per call.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// This client with the labels [`prepare`](Self::prepare),
    /// [`view`](Self::view) and [`commit`](Self::commit) send (computed anew
    /// for every call).
    pub fn with_default_labels(mut self, labels: fn() -> Labels) -> Client {
        self.default_labels = labels;
        self
    }

    /// This client with another `snapshotter` field.
    pub fn named(&self, snapshotter: &str) -> Client {
        Client {
            snapshotter: snapshotter.into(),
            ..self.clone()
        }
    }

    fn req<T>(&self, m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.set_timeout(self.timeout);
        r
    }

    /// Prepare with the default labels.
    pub async fn prepare(&self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        self.prepare_with(key, parent, (self.default_labels)())
            .await
    }

    /// Prepare.
    pub async fn prepare_with(
        &self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, Status> {
        let r = self
            .sn
            .clone()
            .prepare(self.req(pb::PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.into(),
                parent: parent.into(),
                labels,
            }))
            .await?;
        Ok(r.into_inner().mounts)
    }

    /// View with the default labels.
    pub async fn view(&self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        self.view_with(key, parent, (self.default_labels)()).await
    }

    /// View.
    pub async fn view_with(
        &self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, Status> {
        let r = self
            .sn
            .clone()
            .view(self.req(pb::ViewSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.into(),
                parent: parent.into(),
                labels,
            }))
            .await?;
        Ok(r.into_inner().mounts)
    }

    /// Mounts.
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, Status> {
        let r = self
            .sn
            .clone()
            .mounts(self.req(pb::MountsRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.into(),
            }))
            .await?;
        Ok(r.into_inner().mounts)
    }

    /// Commit with the default labels and no rebase.
    pub async fn commit(&self, name: &str, key: &str) -> Result<(), Status> {
        self.commit_with(name, key, (self.default_labels)(), "")
            .await
    }

    /// Commit; `parent`, when not empty, is the parent to rebase onto
    /// (CommitSnapshotRequest field 5).
    pub async fn commit_with(
        &self,
        name: &str,
        key: &str,
        labels: Labels,
        parent: &str,
    ) -> Result<(), Status> {
        self.sn
            .clone()
            .commit(self.req(pb::CommitSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                name: name.into(),
                key: key.into(),
                labels,
                parent: parent.into(),
            }))
            .await?;
        Ok(())
    }

    /// Remove.
    pub async fn remove(&self, key: &str) -> Result<(), Status> {
        self.sn
            .clone()
            .remove(self.req(pb::RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.into(),
            }))
            .await?;
        Ok(())
    }

    /// Stat.
    pub async fn stat(&self, key: &str) -> Result<pb::Info, Status> {
        let r = self
            .sn
            .clone()
            .stat(self.req(pb::StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.into(),
            }))
            .await?;
        r.into_inner()
            .info
            .ok_or_else(|| Status::internal("StatSnapshotResponse without info"))
    }

    /// Update with field-mask `paths`.
    pub async fn update(&self, info: pb::Info, paths: &[&str]) -> Result<pb::Info, Status> {
        let r = self
            .sn
            .clone()
            .update(self.req(pb::UpdateSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                info: Some(info),
                update_mask: Some(containerd_api::prost_types::FieldMask {
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                }),
            }))
            .await?;
        r.into_inner()
            .info
            .ok_or_else(|| Status::internal("UpdateSnapshotResponse without info"))
    }

    async fn list_stream(
        &self,
        filters: &[&str],
    ) -> Result<tonic::Streaming<pb::ListSnapshotsResponse>, Status> {
        Ok(self
            .sn
            .clone()
            .list(self.req(pb::ListSnapshotsRequest {
                snapshotter: self.snapshotter.clone(),
                filters: filters.iter().map(|f| f.to_string()).collect(),
            }))
            .await?
            .into_inner())
    }

    /// List (Walk): every batch of the stream.
    pub async fn list_batches(&self, filters: &[&str]) -> Result<Vec<Vec<pb::Info>>, Status> {
        let mut s = self.list_stream(filters).await?;
        let mut out = Vec::new();
        while let Some(batch) = s.message().await? {
            out.push(batch.info);
        }
        Ok(out)
    }

    /// List (Walk) calling `f` for every info as it arrives, while the stream
    /// is open; returns the number of batches.
    pub async fn walk(
        &self,
        filters: &[&str],
        mut f: impl AsyncFnMut(pb::Info) -> Result<()>,
    ) -> Result<usize> {
        let mut s = self.list_stream(filters).await?;
        let mut batches = 0;
        while let Some(batch) = s.message().await? {
            batches += 1;
            for i in batch.info {
                f(i).await?;
            }
        }
        Ok(batches)
    }

    /// List (Walk), flattened.
    pub async fn list(&self, filters: &[&str]) -> Result<Vec<pb::Info>, Status> {
        Ok(self
            .list_batches(filters)
            .await?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Usage: (bytes, inodes).
    pub async fn usage(&self, key: &str) -> Result<(i64, i64), Status> {
        let r = self
            .sn
            .clone()
            .usage(self.req(pb::UsageRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.into(),
            }))
            .await?
            .into_inner();
        Ok((r.size, r.inodes))
    }

    /// Cleanup.
    pub async fn cleanup(&self) -> Result<(), Status> {
        self.sn
            .clone()
            .cleanup(self.req(pb::CleanupRequest {
                snapshotter: self.snapshotter.clone(),
            }))
            .await?;
        Ok(())
    }

    /// Diff.Apply of `desc` onto `mounts`; returns the applied (uncompressed)
    /// descriptor.
    pub async fn apply(&self, desc: &Descriptor, mounts: &[Mount]) -> Result<Descriptor, Status> {
        self.diff
            .clone()
            .apply(self.req(dpb::ApplyRequest {
                diff: Some(desc.clone()),
                mounts: mounts.to_vec(),
                payloads: Default::default(),
                sync_fs: false,
            }))
            .await?
            .into_inner()
            .applied
            .ok_or_else(|| Status::internal("ApplyResponse without a descriptor"))
    }

    /// Diff.Diff (Compare) between `lower` and `upper` as `media_type`, in
    /// containerd namespace "default", under `lease` when given.
    pub async fn compare(
        &self,
        lower: &[Mount],
        upper: &[Mount],
        media_type: &str,
        lease: Option<&str>,
    ) -> Result<Descriptor, Status> {
        let mut r = self.req(dpb::DiffRequest {
            left: lower.to_vec(),
            right: upper.to_vec(),
            media_type: media_type.into(),
            r#ref: String::new(),
            labels: Default::default(),
            source_date_epoch: None,
        });
        r.metadata_mut()
            .insert("containerd-namespace", "default".parse().expect("ascii"));
        if let Some(l) = lease {
            r.metadata_mut()
                .insert("containerd-lease", l.parse().expect("ascii"));
        }
        self.diff
            .clone()
            .diff(r)
            .await?
            .into_inner()
            .diff
            .ok_or_else(|| Status::internal("DiffResponse without a descriptor"))
    }
}
