//! A recording proxy snapshotter and differ for experiments: a deliberately
//! naive snapshotter (every snapshot is a full copy of its parent, mounted with
//! `bind`) and a differ that extracts layers from containerd's content store
//! into a bind mount. Every call is recorded with the `containerd-namespace`
//! gRPC header it arrived with.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use containerd_api::containerd::services::diff::v1::diff_server::{Diff, DiffServer};
use containerd_api::containerd::services::diff::v1::{
    ApplyRequest, ApplyResponse, DiffRequest, DiffResponse,
};
use containerd_api::containerd::services::snapshots::v1::snapshots_server::{
    Snapshots, SnapshotsServer,
};
use containerd_api::containerd::services::snapshots::v1::*;
use containerd_api::containerd::types::{Descriptor, Mount};
use containerd_api::prost_types::Timestamp;
use erofs_image::tar::{EntryKind, TarReader};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

/// One recorded gRPC call.
#[derive(Debug, Clone)]
pub struct Call {
    /// `Snapshots.Prepare`, `Diff.Apply`, ...
    pub method: String,
    /// Value of the `containerd-namespace` header, if any.
    pub namespace: Option<String>,
    /// All metadata keys of the request.
    pub metadata_keys: Vec<String>,
    /// Snapshot key or digest the call was about.
    pub subject: String,
}

type Calls = Arc<Mutex<Vec<Call>>>;

fn record<T>(calls: &Calls, method: &str, req: &Request<T>, subject: &str) {
    let md = req.metadata();
    let namespace = md
        .get("containerd-namespace")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let metadata_keys = md
        .keys()
        .map(|k| match k {
            tonic::metadata::KeyRef::Ascii(k) => k.as_str().to_owned(),
            tonic::metadata::KeyRef::Binary(k) => k.as_str().to_owned(),
        })
        .collect();
    calls.lock().unwrap().push(Call {
        method: method.to_owned(),
        namespace,
        metadata_keys,
        subject: subject.to_owned(),
    });
}

#[derive(Debug, Clone)]
struct Snap {
    id: u64,
    kind: Kind,
    parent: String,
    labels: HashMap<String, String>,
    created: SystemTime,
    updated: SystemTime,
    overlay: bool,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    snaps: HashMap<String, Snap>,
}

struct SnapshotService {
    root: PathBuf,
    state: Mutex<State>,
    calls: Calls,
    extra_lowers: Arc<Mutex<Vec<PathBuf>>>,
}

fn ts(t: SystemTime) -> Option<Timestamp> {
    Some(Timestamp::from(t))
}

impl SnapshotService {
    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn info(name: &str, s: &Snap) -> Info {
        Info {
            name: name.to_owned(),
            parent: s.parent.clone(),
            kind: s.kind as i32,
            created_at: ts(s.created),
            updated_at: ts(s.updated),
            labels: s.labels.clone(),
        }
    }

    fn mounts(&self, state: &State, s: &Snap) -> Vec<Mount> {
        let fs_dir = self.dir(s.id).join("fs");
        if s.overlay {
            let parent = &state.snaps[&s.parent];
            let mut lowers = vec![self.dir(parent.id).join("fs")];
            lowers.extend(self.extra_lowers.lock().unwrap().iter().cloned());
            let lowers: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
            return vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![
                    "index=off".into(),
                    format!("workdir={}", self.dir(s.id).join("work").display()),
                    format!("upperdir={}", fs_dir.display()),
                    format!("lowerdir={}", lowers.join(":")),
                ],
            }];
        }
        let rw = if s.kind == Kind::View { "ro" } else { "rw" };
        vec![Mount {
            r#type: "bind".into(),
            source: fs_dir.display().to_string(),
            target: String::new(),
            options: vec!["rbind".into(), rw.into()],
        }]
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        let mut state = self.state.lock().unwrap();
        if state.snaps.contains_key(key) {
            return Err(Status::already_exists(format!(
                "snapshot {key} already exists"
            )));
        }
        if !parent.is_empty() {
            match state.snaps.get(parent) {
                Some(p) if p.kind == Kind::Committed => {}
                Some(_) => return Err(Status::failed_precondition("parent is not committed")),
                None => return Err(Status::not_found(format!("parent {parent} does not exist"))),
            }
        }
        state.next_id += 1;
        let id = state.next_id;
        let dir = self.dir(id);
        fs::create_dir_all(dir.join("fs")).map_err(internal)?;
        // A container (not an unpack, whose keys start with "extract-") on a
        // parent gets an overlay when extra lowerdirs are configured.
        let overlay = kind == Kind::Active
            && !parent.is_empty()
            && !key.contains("extract-")
            && !self.extra_lowers.lock().unwrap().is_empty();
        if overlay {
            fs::create_dir_all(dir.join("work")).map_err(internal)?;
        } else if !parent.is_empty() {
            let pdir = self.dir(state.snaps[parent].id).join("fs");
            let st = Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", pdir.display()))
                .arg(dir.join("fs"))
                .status()
                .map_err(internal)?;
            if !st.success() {
                return Err(Status::internal("cp -a failed"));
            }
        }
        let now = SystemTime::now();
        let snap = Snap {
            id,
            kind,
            parent: parent.to_owned(),
            labels,
            created: now,
            updated: now,
            overlay,
        };
        let mounts = self.mounts(&state, &snap);
        state.snaps.insert(key.to_owned(), snap);
        Ok(mounts)
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotService {
    async fn prepare(
        &self,
        req: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        record(&self.calls, "Snapshots.Prepare", &req, &req.get_ref().key);
        let r = req.into_inner();
        let mounts = self.create(Kind::Active, &r.key, &r.parent, r.labels)?;
        Ok(Response::new(PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        req: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        record(&self.calls, "Snapshots.View", &req, &req.get_ref().key);
        let r = req.into_inner();
        let mounts = self.create(Kind::View, &r.key, &r.parent, r.labels)?;
        Ok(Response::new(ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        req: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        record(&self.calls, "Snapshots.Mounts", &req, &req.get_ref().key);
        let state = self.state.lock().unwrap();
        let s = state
            .snaps
            .get(&req.get_ref().key)
            .ok_or_else(|| Status::not_found("no such snapshot"))?;
        Ok(Response::new(MountsResponse {
            mounts: self.mounts(&state, s),
        }))
    }

    async fn commit(&self, req: Request<CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        record(&self.calls, "Snapshots.Commit", &req, &req.get_ref().key);
        let r = req.into_inner();
        let mut state = self.state.lock().unwrap();
        if state.snaps.contains_key(&r.name) {
            return Err(Status::already_exists(format!(
                "snapshot {} already exists",
                r.name
            )));
        }
        let mut s = state
            .snaps
            .remove(&r.key)
            .ok_or_else(|| Status::not_found(format!("snapshot {} does not exist", r.key)))?;
        s.kind = Kind::Committed;
        s.labels.extend(r.labels);
        s.updated = SystemTime::now();
        state.snaps.insert(r.name, s);
        Ok(Response::new(()))
    }

    async fn remove(&self, req: Request<RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        record(&self.calls, "Snapshots.Remove", &req, &req.get_ref().key);
        let mut state = self.state.lock().unwrap();
        let s = state
            .snaps
            .remove(&req.get_ref().key)
            .ok_or_else(|| Status::not_found("no such snapshot"))?;
        let _ = fs::remove_dir_all(self.dir(s.id));
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        record(&self.calls, "Snapshots.Stat", &req, &req.get_ref().key);
        let state = self.state.lock().unwrap();
        let key = &req.get_ref().key;
        let s = state
            .snaps
            .get(key)
            .ok_or_else(|| Status::not_found(format!("snapshot {key} does not exist")))?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(Self::info(key, s)),
        }))
    }

    async fn update(
        &self,
        req: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let name = req
            .get_ref()
            .info
            .as_ref()
            .map(|i| i.name.clone())
            .unwrap_or_default();
        record(&self.calls, "Snapshots.Update", &req, &name);
        let r = req.into_inner();
        let info = r.info.unwrap_or_default();
        let mut state = self.state.lock().unwrap();
        let s = state
            .snaps
            .get_mut(&info.name)
            .ok_or_else(|| Status::not_found("no such snapshot"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            s.labels = info.labels.clone();
        } else {
            for p in paths {
                if let Some(k) = p.strip_prefix("labels.") {
                    match info.labels.get(k) {
                        Some(v) => s.labels.insert(k.to_owned(), v.clone()),
                        None => s.labels.remove(k),
                    };
                }
            }
        }
        s.updated = SystemTime::now();
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(Self::info(&info.name, s)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        record(&self.calls, "Snapshots.List", &req, "");
        let state = self.state.lock().unwrap();
        let info: Vec<Info> = state.snaps.iter().map(|(k, s)| Self::info(k, s)).collect();
        let stream = tokio_stream::iter(vec![Ok(ListSnapshotsResponse { info })]);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn usage(&self, req: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        record(&self.calls, "Snapshots.Usage", &req, &req.get_ref().key);
        Ok(Response::new(UsageResponse { size: 0, inodes: 0 }))
    }

    async fn cleanup(&self, req: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        record(&self.calls, "Snapshots.Cleanup", &req, "");
        Ok(Response::new(()))
    }
}

/// How the fake differ answers `Apply`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyMode {
    /// `Unimplemented`: the diff service falls through to the next differ.
    Unimplemented,
    /// Extract the layer from containerd's content store into the bind mount.
    Extract,
}

struct DiffService {
    content_root: PathBuf,
    mode: ApplyMode,
    calls: Calls,
}

#[tonic::async_trait]
impl Diff for DiffService {
    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let digest = req
            .get_ref()
            .diff
            .as_ref()
            .map(|d| d.digest.clone())
            .unwrap_or_default();
        record(&self.calls, "Diff.Apply", &req, &digest);
        if self.mode == ApplyMode::Unimplemented {
            return Err(Status::unimplemented("fake differ: fall through"));
        }
        let r = req.into_inner();
        let desc = r
            .diff
            .ok_or_else(|| Status::invalid_argument("no descriptor"))?;
        let [m] = &r.mounts[..] else {
            return Err(Status::unimplemented(
                "fake differ: needs exactly one bind mount",
            ));
        };
        if m.r#type != "bind" {
            return Err(Status::unimplemented("fake differ: needs a bind mount"));
        }
        let blob = self
            .content_root
            .join("blobs/sha256")
            .join(desc.digest.trim_start_matches("sha256:"));
        let dest = PathBuf::from(&m.source);
        let media_type = desc.media_type.clone();
        let applied = tokio::task::spawn_blocking(move || extract(&blob, &media_type, &dest))
            .await
            .map_err(internal)?
            .map_err(|e| Status::internal(format!("fake differ: {e:#}")))?;
        Ok(Response::new(ApplyResponse {
            applied: Some(applied),
        }))
    }

    async fn diff(&self, req: Request<DiffRequest>) -> Result<Response<DiffResponse>, Status> {
        record(&self.calls, "Diff.Diff", &req, "");
        Err(Status::unimplemented("fake differ: no Diff"))
    }
}

/// Counts and hashes what is read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    n: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.hasher.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
}

fn extract(blob: &Path, media_type: &str, dest: &Path) -> anyhow::Result<Descriptor> {
    let f = io::BufReader::new(fs::File::open(blob)?);
    let plain: Box<dyn Read> = if media_type.ends_with("gzip") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else if media_type.ends_with("zstd") {
        Box::new(zstd::Decoder::new(f)?)
    } else {
        Box::new(f)
    };
    let mut r = TarReader::new(Hashing {
        inner: plain,
        hasher: Sha256::new(),
        n: 0,
    });
    let mut seen: HashSet<PathBuf> = HashSet::new();
    while let Some(e) = r.next_entry()? {
        let rel = PathBuf::from(OsStr::from_bytes(&e.path));
        let name = rel
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == ".wh..wh..opq" {
            if let Ok(rd) = fs::read_dir(dest.join(&parent)) {
                for c in rd.flatten() {
                    if !seen.contains(&parent.join(c.file_name())) {
                        remove_any(&c.path())?;
                    }
                }
            }
            continue;
        }
        if let Some(victim) = name.strip_prefix(".wh.") {
            remove_any(&dest.join(&parent).join(victim))?;
            continue;
        }
        let p = dest.join(&rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d)?;
        }
        let existing = fs::symlink_metadata(&p).ok();
        match e.kind {
            EntryKind::Directory => {
                if existing.as_ref().is_some_and(|m| !m.is_dir()) {
                    remove_any(&p)?;
                }
                if !p.is_dir() {
                    fs::create_dir(&p)?;
                }
            }
            _ => {
                if existing.is_some() {
                    remove_any(&p)?;
                }
            }
        }
        match e.kind {
            EntryKind::Directory => {}
            EntryKind::Regular => {
                let mut out = fs::File::create(&p)?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let k = r.read_data(&mut buf)?;
                    if k == 0 {
                        break;
                    }
                    io::Write::write_all(&mut out, &buf[..k])?;
                }
            }
            EntryKind::Symlink => {
                std::os::unix::fs::symlink(OsStr::from_bytes(&e.link), &p)?;
            }
            EntryKind::Hardlink => {
                fs::hard_link(dest.join(OsStr::from_bytes(&e.link)), &p)?;
            }
            other => anyhow::bail!("fake differ: {other:?} entries are not supported"),
        }
        std::os::unix::fs::lchown(&p, Some(e.uid), Some(e.gid))?;
        if !matches!(e.kind, EntryKind::Symlink | EntryKind::Hardlink) {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&p, fs::Permissions::from_mode(e.mode & 0o7777))?;
        }
        seen.insert(rel);
    }
    r.drain()?;
    let h = r.get_mut();
    let mut rest = Vec::new();
    h.read_to_end(&mut rest)?;
    Ok(Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest: format!("sha256:{}", hex::encode(h.hasher.clone().finalize())),
        size: h.n as i64,
        annotations: HashMap::new(),
    })
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The running fake proxy (both services on one socket).
pub struct FakeProxy {
    socket: PathBuf,
    calls: Calls,
    extra_lowers: Arc<Mutex<Vec<PathBuf>>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeProxy {
    /// Serves on `socket`, keeps snapshots below `root`, reads blobs from
    /// `content_root` (containerd's `io.containerd.content.v1.content`).
    pub fn start(socket: &Path, root: &Path, content_root: &Path, mode: ApplyMode) -> FakeProxy {
        let calls: Calls = Arc::default();
        let extra_lowers: Arc<Mutex<Vec<PathBuf>>> = Arc::default();
        let snap = SnapshotService {
            root: root.to_path_buf(),
            state: Mutex::default(),
            calls: calls.clone(),
            extra_lowers: extra_lowers.clone(),
        };
        let diff = DiffService {
            content_root: content_root.to_path_buf(),
            mode,
            calls: calls.clone(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sock = socket.to_path_buf();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let _ = fs::remove_file(&sock);
                let listener = tokio::net::UnixListener::bind(&sock).unwrap();
                ready_tx.send(()).unwrap();
                tonic::transport::Server::builder()
                    .add_service(SnapshotsServer::new(snap))
                    .add_service(DiffServer::new(diff))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::UnixListenerStream::new(listener),
                        async {
                            let _ = rx.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        });
        ready_rx.recv().expect("fake proxy failed to start");
        FakeProxy {
            socket: socket.to_path_buf(),
            calls,
            extra_lowers,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Takes the calls recorded so far.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    /// Lowerdirs appended (below the parent) to the overlay mounts of new
    /// container snapshots; empty means containers get bind mounts.
    pub fn set_extra_lowers(&self, dirs: Vec<PathBuf>) {
        *self.extra_lowers.lock().unwrap() = dirs;
    }
}

impl Drop for FakeProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `method -> namespaces seen` (`None` printed as `-`), for reports.
pub fn summarize(calls: &[Call]) -> Vec<(String, Vec<String>)> {
    let mut m: Vec<(String, Vec<String>)> = Vec::new();
    for c in calls {
        let ns = c.namespace.clone().unwrap_or_else(|| "-".into());
        match m.iter_mut().find(|(k, _)| *k == c.method) {
            Some((_, v)) => {
                if !v.contains(&ns) {
                    v.push(ns)
                }
            }
            None => m.push((c.method.clone(), vec![ns])),
        }
    }
    m
}
