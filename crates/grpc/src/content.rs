//! A client of containerd's Content service, for blobs the differ cannot read from the content
//! store directory. Bytes are verified against the descriptor's digest and size as they are
//! read: a short or altered blob fails the read at its end.
//!
//! The stream is pulled by a task on the async runtime and handed to the (synchronous)
//! reader through a bounded tokio channel: when the reader is slow, the task waits without
//! holding a runtime thread, so stalled Applies cannot stall other requests.

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::OnceLock;

use containerd_api::containerd::services::content::v1 as pb;
use containerd_api::containerd::services::content::v1::content_client::ContentClient;
use sha2::{Digest, Sha256, Sha384, Sha512};
use snapshotter::diff::{Blob, ContentSource, Descriptor, parse_digest};
use snapshotter::{Cancel, Error, Result};
use tonic::transport::{Channel, Endpoint, Uri};

/// Content service client over containerd's socket.
#[derive(Debug)]
pub struct GrpcContent {
    address: PathBuf,
    rt: tokio::runtime::Handle,
    channel: OnceLock<Channel>,
}

impl GrpcContent {
    /// A client for the containerd socket at `address`, running on `rt`.
    pub fn new(address: PathBuf, rt: tokio::runtime::Handle) -> Self {
        GrpcContent {
            address,
            rt,
            channel: OnceLock::new(),
        }
    }

    /// A channel to containerd, connected lazily.
    pub fn channel(&self) -> Result<Channel> {
        if let Some(c) = self.channel.get() {
            return Ok(c.clone());
        }
        let path = self.address.clone();
        let _enter = self.rt.enter();
        let ch = Endpoint::try_from("http://[::]:50051")
            .map_err(|e| Error::internal(e.to_string()))?
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let p = path.clone();
                async move {
                    Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }));
        Ok(self.channel.get_or_init(|| ch).clone())
    }
}

/// A request carrying containerd's namespace header.
pub fn with_namespace<T>(msg: T, namespace: &str) -> Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "containerd-namespace",
        namespace
            .parse()
            .map_err(|_| Error::invalid_argument(format!("invalid namespace {namespace:?}")))?,
    );
    Ok(req)
}

enum Hasher {
    S256(Sha256),
    S384(Sha384),
    S512(Sha512),
}

impl Hasher {
    fn new(alg: &str) -> Self {
        match alg {
            "sha384" => Hasher::S384(Sha384::new()),
            "sha512" => Hasher::S512(Sha512::new()),
            _ => Hasher::S256(Sha256::new()),
        }
    }
    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::S256(h) => h.update(b),
            Hasher::S384(h) => h.update(b),
            Hasher::S512(h) => h.update(b),
        }
    }
    fn hex(self) -> String {
        match self {
            Hasher::S256(h) => hex::encode(h.finalize()),
            Hasher::S384(h) => hex::encode(h.finalize()),
            Hasher::S512(h) => hex::encode(h.finalize()),
        }
    }
}

/// Chunks of a blob in flight between the stream task and the reader.
const DEPTH: usize = 8;

struct Verifying {
    rx: tokio::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
    hasher: Option<Hasher>,
    want_hex: String,
    want_size: i64,
    got: u64,
    digest: String,
}

impl Read for Verifying {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            // The reader runs on a blocking thread (Apply's), never on the runtime.
            match self.rx.blocking_recv() {
                Some(Ok(b)) => {
                    if let Some(h) = &mut self.hasher {
                        h.update(&b);
                    }
                    self.got += b.len() as u64;
                    self.cur = b;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => {
                    let Some(h) = self.hasher.take() else {
                        return Ok(0);
                    };
                    if self.want_size >= 0 && self.got != self.want_size as u64 {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "blob {} from containerd is {} bytes, expected {}",
                                self.digest, self.got, self.want_size
                            ),
                        ));
                    }
                    if h.hex() != self.want_hex {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "blob read from containerd does not match its digest {}",
                                self.digest
                            ),
                        ));
                    }
                    return Ok(0);
                }
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Resolves once `cancel` trips (looked at every 100 ms).
async fn tripped(cancel: &Cancel) -> snapshotter::Error {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tick.tick().await;
        if let Err(e) = cancel.check() {
            return e;
        }
    }
}

impl ContentSource for GrpcContent {
    fn open(&self, desc: &Descriptor, namespace: &str, cancel: &Cancel) -> Result<Blob> {
        let (alg, hex) = parse_digest(&desc.digest)?;
        let mut client = ContentClient::new(self.channel()?);
        let req = with_namespace(
            pb::ReadContentRequest {
                digest: desc.digest.clone(),
                offset: 0,
                size: 0,
            },
            namespace,
        )?;
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Vec<u8>>>(DEPTH);
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Result<()>>();
        let cancel = cancel.clone();
        // The task also watches the request's token: the reader may be waiting for bytes
        // containerd does not send, and must be told to stop.
        self.rt.spawn(async move {
            let mut stream = tokio::select! {
                r = client.read(req) => match r {
                    Ok(r) => r.into_inner(),
                    Err(s) => {
                        let _ = first_tx.send(Err(status_to_core(s)));
                        return;
                    }
                },
                e = tripped(&cancel) => {
                    let _ = first_tx.send(Err(e));
                    return;
                }
            };
            let _ = first_tx.send(Ok(()));
            loop {
                let next = tokio::select! {
                    m = stream.message() => m,
                    e = tripped(&cancel) => {
                        let _ = tx.send(Err(io::Error::other(e))).await;
                        return;
                    }
                };
                match next {
                    Ok(Some(m)) => {
                        // Waits (without blocking a runtime thread) while the reader is
                        // behind; fails once the reader is gone.
                        if tx.send(Ok(m.data)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(s) => {
                        let _ = tx
                            .send(Err(io::Error::other(format!(
                                "reading content from containerd: {s}"
                            ))))
                            .await;
                        return;
                    }
                }
            }
        });
        first_rx
            .blocking_recv()
            .map_err(|_| Error::unavailable("containerd content read was cancelled"))??;
        Ok(Blob {
            reader: Box::new(Verifying {
                rx,
                cur: Vec::new(),
                pos: 0,
                hasher: Some(Hasher::new(alg)),
                want_hex: hex.to_string(),
                want_size: desc.size,
                got: 0,
                digest: desc.digest.clone(),
            }),
            file: None,
        })
    }
}

/// containerd's content store directory, read only for blobs containerd's Content service
/// says are in the request's namespace.
///
/// The directory holds the blobs of every namespace: containerd scopes them in its metadata
/// store, so a client of namespace `b` gets NotFound for a blob only `a` has. Reading the
/// directory without asking would hand `b` whatever `a` pulled, given only its digest. The
/// question costs one Info round trip per blob; the bytes still come from the file.
#[derive(Debug)]
pub struct NamespacedDir {
    dir: snapshotter::diff::DirContent,
    containerd: std::sync::Arc<GrpcContent>,
}

impl NamespacedDir {
    /// The directory `dir`, gated by `containerd`'s Content service.
    pub fn new(
        dir: snapshotter::diff::DirContent,
        containerd: std::sync::Arc<GrpcContent>,
    ) -> Self {
        NamespacedDir { dir, containerd }
    }
}

impl ContentSource for NamespacedDir {
    fn open(&self, desc: &Descriptor, namespace: &str, cancel: &Cancel) -> Result<Blob> {
        parse_digest(&desc.digest)?;
        let mut client = ContentClient::new(self.containerd.channel()?);
        let req = with_namespace(
            pb::InfoRequest {
                digest: desc.digest.clone(),
            },
            namespace,
        )?;
        let cancel2 = cancel.clone();
        // Apply calls this on a blocking thread, never from the runtime itself.
        let info = self.containerd.rt.block_on(async move {
            tokio::select! {
                r = client.info(req) => r.map_err(status_to_core),
                e = tripped(&cancel2) => Err(e),
            }
        });
        match info {
            Ok(r) => {
                let size = r.into_inner().info.map_or(-1, |i| i.size);
                if desc.size >= 0 && size >= 0 && size != desc.size {
                    return Err(Error::failed_precondition(format!(
                        "blob {} is {size} bytes in namespace {namespace:?}, descriptor says {}",
                        desc.digest, desc.size
                    )));
                }
            }
            Err(e) if e.kind() == snapshotter::ErrorKind::NotFound => {
                return Err(Error::not_found(format!(
                    "blob {} is not in namespace {namespace:?} ({e})",
                    desc.digest
                )));
            }
            Err(e) => {
                return Err(e.context(format!(
                    "asking containerd whether {} is in namespace {namespace:?}",
                    desc.digest
                )));
            }
        }
        self.dir.open(desc, namespace, cancel)
    }
}

/// A status from containerd as a core error.
pub fn status_to_core(s: tonic::Status) -> Error {
    use tonic::Code;
    let m = format!("containerd: {}", s.message());
    match s.code() {
        Code::NotFound => Error::not_found(m),
        Code::AlreadyExists => Error::already_exists(m),
        Code::InvalidArgument => Error::invalid_argument(m),
        Code::FailedPrecondition => Error::failed_precondition(m),
        Code::Unavailable => Error::unavailable(format!(
            "cannot reach containerd's content service: {}",
            s.message()
        )),
        _ => Error::internal(m),
    }
}

/// Store a finished diff in containerd's content store (Content.Write: STAT, WRITE..., COMMIT)
/// with the uncompressed-digest label. Content that already exists is fine, whichever step
/// containerd reports it at (when the writer opens, for an expected digest it has, or at
/// COMMIT); the labels are then added to it.
pub async fn upload(
    channel: Channel,
    namespace: &str,
    lease: Option<&str>,
    reference: &str,
    blob: &snapshotter::diff::DiffBlob,
    mut labels: std::collections::HashMap<String, String>,
) -> Result<()> {
    if blob.uncompressed != blob.digest {
        labels.insert(
            "containerd.io/uncompressed".into(),
            blob.uncompressed.clone(),
        );
    }
    match write_blob(channel.clone(), namespace, lease, reference, blob, &labels).await {
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            label(channel, namespace, &blob.digest, labels).await
        }
        Err(s) => Err(status_to_core(s)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) => Ok(()),
    }
}

/// Set `labels` on existing content.
async fn label(
    channel: Channel,
    namespace: &str,
    digest: &str,
    labels: std::collections::HashMap<String, String>,
) -> Result<()> {
    let paths: Vec<String> = labels.keys().map(|k| format!("labels.{k}")).collect();
    let req = with_namespace(
        pb::UpdateRequest {
            info: Some(pb::Info {
                digest: digest.to_string(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        },
        namespace,
    )?;
    ContentClient::new(channel)
        .update(req)
        .await
        .map_err(status_to_core)?;
    Ok(())
}

/// The Content.Write exchange. containerd's statuses are returned as they are (the outer
/// `Err`), so that the caller can tell AlreadyExists apart; our own failures are the inner one.
async fn write_blob(
    channel: Channel,
    namespace: &str,
    lease: Option<&str>,
    reference: &str,
    blob: &snapshotter::diff::DiffBlob,
    labels: &std::collections::HashMap<String, String>,
) -> std::result::Result<Result<()>, tonic::Status> {
    use pb::WriteAction;
    let mut client = ContentClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::WriteContentRequest>(4);
    let mut req = match with_namespace(tokio_stream::wrappers::ReceiverStream::new(rx), namespace) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    if let Some(l) = lease {
        let Ok(v) = l.parse() else {
            return Ok(Err(Error::invalid_argument("invalid lease")));
        };
        req.metadata_mut().insert("containerd-lease", v);
    }
    // A send fails only when containerd has ended the stream; its status then comes with the
    // next reply.
    let send = |m: pb::WriteContentRequest| {
        let tx = tx.clone();
        async move { tx.send(m).await.is_ok() }
    };
    send(pb::WriteContentRequest {
        action: WriteAction::Stat as i32,
        r#ref: reference.to_string(),
        total: blob.size as i64,
        expected: blob.digest.clone(),
        ..Default::default()
    })
    .await;
    let mut resp = client.write(req).await?.into_inner();
    let Some(first) = resp.message().await? else {
        return Ok(Err(Error::unavailable("no reply to content STAT")));
    };
    if first.offset != 0 {
        return Ok(Err(Error::already_exists(format!(
            "an ingest named {reference:?} is already in progress"
        ))));
    }
    let mut f = match tokio::fs::File::open(&blob.path).await {
        Ok(f) => f,
        Err(e) => return Ok(Err(Error::io("opening the diff", e))),
    };
    let mut offset = 0i64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        use tokio::io::AsyncReadExt;
        let n = match f.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => return Ok(Err(Error::io("reading the diff", e))),
        };
        if n == 0 {
            break;
        }
        send(pb::WriteContentRequest {
            action: WriteAction::Write as i32,
            offset,
            data: buf[..n].to_vec(),
            ..Default::default()
        })
        .await;
        let Some(r) = resp.message().await? else {
            return Ok(Err(Error::unavailable("content write stream ended")));
        };
        offset += n as i64;
        if r.offset != offset {
            return Ok(Err(Error::internal(format!(
                "containerd acknowledged offset {} after writing {offset}",
                r.offset
            ))));
        }
    }
    send(pb::WriteContentRequest {
        action: WriteAction::Commit as i32,
        offset,
        total: blob.size as i64,
        expected: blob.digest.clone(),
        labels: labels.clone(),
        ..Default::default()
    })
    .await;
    drop(tx);
    Ok(match resp.message().await? {
        Some(r) if r.digest == blob.digest || r.digest.is_empty() => Ok(()),
        Some(r) => Err(Error::internal(format!(
            "containerd committed {} instead of {}",
            r.digest, blob.digest
        ))),
        None => Err(Error::unavailable("content commit got no reply")),
    })
}
