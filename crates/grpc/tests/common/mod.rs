//! What the health tests share: a stand-in for containerd's Content service (blobs by
//! namespace, streamed in small chunks), and the daemon's gRPC server over a core, each on a
//! runtime of its own, so that a stalled daemon runtime cannot stall the test's side.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use containerd_api::containerd::services::content::v1 as cpb;
use containerd_api::containerd::services::content::v1::content_server::{Content, ContentServer};
use containerd_api::containerd::services::snapshots::v1 as spb;
use containerd_api::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use futures::Stream;
use sha2::Digest;
use snapshotter::diff::Descriptor;
use snapshotter::mount::RecordingMounter;
use snapshotter::{Config, Snapshotter};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// Bytes per Read message (containerd sends 1 MiB; smaller makes the channel fill sooner).
pub const CHUNK: usize = 64 << 10;

/// Blobs by (namespace, digest), as containerd's metadata store scopes them; each Read
/// message is sent `pace` milliseconds after the one before (0: at once).
#[derive(Debug, Clone, Default)]
pub struct Blobs(
    pub Arc<Mutex<HashMap<NamespacedDigest, Vec<u8>>>>,
    pub Arc<std::sync::atomic::AtomicU64>,
);

/// (namespace, digest).
type NamespacedDigest = (String, String);

impl Blobs {
    /// Send each Read message `ms` milliseconds after the one before.
    pub fn pace(&self, ms: u64) {
        self.1.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Store `data` in `namespace`; returns its descriptor.
    pub fn add(&self, namespace: &str, media_type: &str, data: &[u8]) -> Descriptor {
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)));
        self.0
            .lock()
            .unwrap()
            .insert((namespace.into(), digest.clone()), data.to_vec());
        Descriptor {
            media_type: media_type.into(),
            digest,
            size: data.len() as i64,
            annotations: Default::default(),
        }
    }

    fn get<T>(&self, req: &Request<T>, digest: &str) -> Result<Vec<u8>, Status> {
        let ns = req
            .metadata()
            .get("containerd-namespace")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::failed_precondition("namespace is required"))?
            .to_string();
        self.0
            .lock()
            .unwrap()
            .get(&(ns.clone(), digest.to_string()))
            .cloned()
            .ok_or_else(|| Status::not_found(format!("content digest {digest}: not found in {ns}")))
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Content for Blobs {
    async fn info(
        &self,
        req: Request<cpb::InfoRequest>,
    ) -> Result<Response<cpb::InfoResponse>, Status> {
        let d = req.get_ref().digest.clone();
        let data = self.get(&req, &d)?;
        Ok(Response::new(cpb::InfoResponse {
            info: Some(cpb::Info {
                digest: d,
                size: data.len() as i64,
                ..Default::default()
            }),
        }))
    }
    async fn update(
        &self,
        _: Request<cpb::UpdateRequest>,
    ) -> Result<Response<cpb::UpdateResponse>, Status> {
        Err(Status::unimplemented("update"))
    }
    type ListStream = Boxed<cpb::ListContentResponse>;
    async fn list(
        &self,
        _: Request<cpb::ListContentRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        Err(Status::unimplemented("list"))
    }
    async fn delete(&self, _: Request<cpb::DeleteContentRequest>) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("delete"))
    }
    type ReadStream = Boxed<cpb::ReadContentResponse>;
    async fn read(
        &self,
        req: Request<cpb::ReadContentRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let d = req.get_ref().digest.clone();
        let data = self.get(&req, &d)?;
        let msgs: Vec<Result<cpb::ReadContentResponse, Status>> = data
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, c)| {
                Ok(cpb::ReadContentResponse {
                    offset: (i * CHUNK) as i64,
                    data: c.to_vec(),
                })
            })
            .collect();
        let pace =
            std::time::Duration::from_millis(self.1.load(std::sync::atomic::Ordering::Relaxed));
        let paced = futures::StreamExt::then(futures::stream::iter(msgs), move |m| async move {
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
            m
        });
        Ok(Response::new(Box::pin(paced)))
    }
    async fn status(
        &self,
        _: Request<cpb::StatusRequest>,
    ) -> Result<Response<cpb::StatusResponse>, Status> {
        Err(Status::unimplemented("status"))
    }
    async fn list_statuses(
        &self,
        _: Request<cpb::ListStatusesRequest>,
    ) -> Result<Response<cpb::ListStatusesResponse>, Status> {
        Err(Status::unimplemented("list_statuses"))
    }
    type WriteStream = Boxed<cpb::WriteContentResponse>;
    async fn write(
        &self,
        _: Request<tonic::Streaming<cpb::WriteContentRequest>>,
    ) -> Result<Response<Self::WriteStream>, Status> {
        Err(Status::unimplemented("write"))
    }
    async fn abort(&self, _: Request<cpb::AbortRequest>) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("abort"))
    }
}

/// A multi-threaded runtime with `workers` worker threads, shut down without waiting for
/// its threads when dropped.
pub fn runtime(workers: usize) -> Runtime {
    Runtime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .expect("tokio runtime"),
    ))
}

/// A runtime that does not wait for its (possibly stuck) threads when dropped.
pub struct Runtime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for Runtime {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("running")
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The Content stand-in serving `blobs` on `socket`, on its own runtime (kept alive by the
/// returned value).
pub fn serve_content(socket: &Path, blobs: Blobs) -> Runtime {
    let rt = runtime(1);
    let listener = rt
        .block_on(async { tokio::net::UnixListener::bind(socket) })
        .expect("binding the content socket");
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(ContentServer::new(blobs))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    rt
}

/// A daemon under test: the core and its gRPC server on `rt`.
pub struct Daemon {
    /// The daemon's runtime (2 worker threads, as on a 2-CPU node); shut down without
    /// waiting on drop, so a test that found it stalled fails instead of hanging.
    pub rt: Runtime,
    /// The core.
    pub core: Arc<Snapshotter>,
    /// Its socket.
    pub socket: PathBuf,
    /// Its root.
    pub root: PathBuf,
}

/// Start a daemon in `dir` whose differ asks `containerd` for blobs (no content directory),
/// with `extra` TOML lines appended to its config.
pub fn daemon(dir: &Path, containerd: &Path, extra: &str) -> Daemon {
    daemon_with_content(dir, containerd, &dir.join("no-content"), extra, "")
}

/// [`daemon`] with the content store directory `content` and `differ` lines for `[differ]`.
pub fn daemon_with_content(
    dir: &Path,
    containerd: &Path,
    content: &Path,
    extra: &str,
    differ: &str,
) -> Daemon {
    let root = dir.join("root");
    let socket = dir.join("daemon.sock");
    let cfg = Config::parse(&format!(
        "root_path = {:?}\naddress = {:?}\n{extra}\n[differ]\ncontent_root = {:?}\ncontainerd_address = {:?}\n{differ}\n",
        root.display().to_string(),
        socket.display().to_string(),
        content.display().to_string(),
        containerd.display().to_string(),
    ))
    .expect("config");
    let core = Arc::new(Snapshotter::open(cfg, Arc::new(RecordingMounter::new())).expect("core"));
    let rt = runtime(2);
    let listener = rt
        .block_on(erofs_grpc::serve::bind(&socket, 0o600, 0))
        .expect("binding the daemon socket");
    rt.spawn(erofs_grpc::serve(
        core.clone(),
        listener,
        std::future::pending::<()>(),
    ));
    Daemon {
        rt,
        core,
        socket,
        root,
    }
}

/// A channel to a Unix socket.
pub async fn channel(socket: &Path) -> Channel {
    let p = socket.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .expect("connecting")
}

/// A Stat of `key` over `ch`.
pub async fn stat(ch: Channel, key: &str) -> Result<spb::StatSnapshotResponse, Status> {
    SnapshotsClient::new(ch)
        .stat(spb::StatSnapshotRequest {
            snapshotter: String::new(),
            key: key.into(),
        })
        .await
        .map(Response::into_inner)
}

/// A List over `ch`, all batches.
pub async fn list(ch: Channel) -> Result<usize, Status> {
    let mut s = SnapshotsClient::new(ch)
        .list(spb::ListSnapshotsRequest::default())
        .await?
        .into_inner();
    let mut n = 0;
    while let Some(b) = s.message().await? {
        n += b.info.len();
    }
    Ok(n)
}

/// Deterministic incompressible bytes.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Apply `desc` onto `mounts` over `ch`, in containerd namespace `ns` (none: the daemon's
/// default), with a grpc-timeout when given.
pub async fn apply(
    ch: tonic::transport::Channel,
    ns: Option<&str>,
    desc: &snapshotter::diff::Descriptor,
    mounts: &[snapshotter::Mount],
    timeout: Option<std::time::Duration>,
) -> Result<(), tonic::Status> {
    use containerd_api::containerd::services::diff::v1 as dpb;
    use containerd_api::containerd::types;
    let mut req = tonic::Request::new(dpb::ApplyRequest {
        diff: Some(types::Descriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: desc.size,
            annotations: Default::default(),
        }),
        mounts: mounts
            .iter()
            .cloned()
            .map(erofs_grpc::convert::mount)
            .collect(),
        payloads: Default::default(),
        sync_fs: false,
    });
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    if let Some(ns) = ns {
        req.metadata_mut()
            .insert("containerd-namespace", ns.parse().expect("a namespace"));
    }
    dpb::diff_client::DiffClient::new(ch)
        .apply(req)
        .await
        .map(drop)
}
