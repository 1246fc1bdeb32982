//! The daemon under attack and the oracles: every request goes over the real socket with a
//! deadline, and after each one the daemon must still run and answer, the status must be one
//! containerd expects for a caller's mistake, the answer must agree with the model where the
//! model knows it, nothing may have panicked or logged an error, and nothing outside the root
//! may have changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use containerd_api::containerd::services::diff::v1 as dpb;
use containerd_api::containerd::services::snapshots::v1 as pb;
use containerd_api::containerd::types::{Descriptor, Mount};
use containerd_api::prost::Message;
use dpb::diff_client::DiffClient;
use pb::snapshots_client::SnapshotsClient;
use testsuite::daemon_env::{Cfg, Env};
use testsuite::mounts::self_mounts;
use testsuite::oci::{Compression, LayerBuilder, media_type};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::input::{Blob, Gen, KEY_MAX, LABEL_MAX, Model, Req, Snap};

/// The daemon binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_erofs-snapshotter");
/// The deadline of one request: every request of a run is small, so one that takes longer
/// is a hang.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// How long the liveness probe (a Stat) may take.
const PROBE_DEADLINE: Duration = Duration::from_secs(5);
/// The server's limit on a decoded request (tonic's default); larger requests are refused
/// by the transport, not by us.
const MAX_DECODED: usize = 4 << 20;

/// What a request returned.
#[derive(Debug)]
pub enum Answer {
    Mounts(Vec<Mount>),
    Info(pb::Info),
    Infos(Vec<pb::Info>),
    Usage,
    Empty,
    Descriptor(Descriptor),
    /// A test-side action that was done (or skipped: the snapshot is not a writable one).
    Done,
}

/// What the model says a request must return.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Ok,
    Code(Code),
}

/// Counts of a run.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: u64,
    pub ok: u64,
    pub by_code: BTreeMap<String, u64>,
    pub predicted: u64,
    pub probes: u64,
}

/// A file's identity and content stamp, for the outside-the-root watch.
type Stamp = (u32, u64, i64, i64, u64);

fn stamp(md: &fs::Metadata) -> Stamp {
    (md.mode(), md.len(), md.mtime(), md.mtime_nsec(), md.ino())
}

/// Every path below `dir` (not following symlinks, not below `skip`) with its stamp.
fn tree(dir: &Path, skip: &[PathBuf]) -> Result<BTreeMap<PathBuf, Stamp>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let p = e.path();
            if skip.contains(&p) {
                continue;
            }
            let md = fs::symlink_metadata(&p)?;
            if md.is_dir() {
                stack.push(p.clone());
            }
            out.insert(p, stamp(&md));
        }
    }
    Ok(out)
}

/// Whether a key or name passes the daemon's (and containerd's) rules.
fn key_ok(k: &str) -> bool {
    !k.is_empty() && k.len() <= KEY_MAX && !k.contains('\0')
}

/// Where the snapshotter's own labels (id mappings, max size) start.
const OWN_LABEL_PREFIX: &str = "containerd.io/snapshot/";

/// Label validity: `Some(true)` valid, `Some(false)` invalid by containerd's rules, `None`
/// when the snapshotter's own labels are present (their values have rules of their own).
fn labels_ok(l: &HashMap<String, String>) -> Option<bool> {
    let bad = l.iter().any(|(k, v)| {
        k.is_empty() || k.len() + v.len() > LABEL_MAX || k.contains('\0') || v.contains('\0')
    });
    if bad {
        return Some(false);
    }
    if l.keys().any(|k| k.starts_with(OWN_LABEL_PREFIX)) {
        return None;
    }
    Some(true)
}

/// The world of one run.
pub struct World {
    pub env: Env,
    pub input: Gen,
    pub model: Model,
    pub stats: Stats,
    sn: SnapshotsClient<Channel>,
    diff: DiffClient<Channel>,
    canary: PathBuf,
    canary_tree: BTreeMap<PathBuf, Stamp>,
    base_tree: BTreeMap<PathBuf, Stamp>,
    mounts_before: BTreeSet<PathBuf>,
    log_offset: u64,
    trace: VecDeque<String>,
    step: u64,
    verbose: bool,
}

impl World {
    /// A daemon with the default configuration, a canary tree next to its root, and the
    /// layer blobs the generator draws from in its content directory.
    pub async fn start(seed: u64) -> Result<World> {
        let mut env = Env::new(BIN, Cfg::new())?;
        let canary = env.base.join("canary");
        fs::create_dir_all(canary.join("sub"))?;
        fs::write(canary.join("a"), "canary a")?;
        fs::write(canary.join("sub/b"), "canary b")?;
        std::os::unix::fs::symlink("/etc", canary.join("link"))?;
        env.start().await?;
        let marker = format!("hostile-marker-{}-{seed:x}", std::process::id());
        let mut input = Gen::new(seed, marker, env.root.clone(), canary.clone());
        input.blobs = blobs(&env)?;
        let ch = testsuite::client::connect(&env.socket).await?;
        let log_offset = fs::metadata(&env.log).map(|m| m.len()).unwrap_or(0);
        let mut w = World {
            sn: SnapshotsClient::new(ch.clone()),
            diff: DiffClient::new(ch),
            canary_tree: tree(&canary, &[])?,
            base_tree: BTreeMap::new(),
            mounts_before: BTreeSet::new(),
            canary,
            input,
            model: Model::default(),
            stats: Stats::default(),
            env,
            log_offset,
            trace: VecDeque::new(),
            step: 0,
            verbose: std::env::var_os("HOSTILE_TRACE").is_some(),
        };
        w.base_tree = w.outside_tree()?;
        w.mounts_before = self_mounts()?.into_iter().map(|m| m.mount_point).collect();
        Ok(w)
    }

    /// The test's directory outside the root, the mount area and the daemon's own files
    /// (log, TMPDIR, socket).
    fn outside_tree(&self) -> Result<BTreeMap<PathBuf, Stamp>> {
        let e = &self.env;
        let mut t = tree(
            &e.base,
            &[
                e.root.clone(),
                e.work.clone(),
                e.log.clone(),
                e.base.join("tmp"),
            ],
        )?;
        // The socket's stamp changes with every connection on some kernels: only its
        // presence counts.
        if let Some(s) = t.get_mut(&e.socket) {
            *s = (s.0, 0, 0, 0, s.4);
        }
        Ok(t)
    }

    fn req<T>(m: T, ns: Option<&str>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.set_timeout(REQUEST_DEADLINE);
        if let Some(ns) = ns
            && let Ok(v) = ns.parse()
        {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        r
    }

    fn q<T>(m: T) -> tonic::Request<T> {
        Self::req(m, None)
    }

    async fn call(&mut self, req: &Req) -> Result<Answer, Status> {
        let mut sn = self.sn.clone();
        let mut diff = self.diff.clone();
        let s = "erofs-rs".to_string();
        match req.clone() {
            Req::Prepare(m) => Ok(Answer::Mounts(
                sn.prepare(Self::q(m)).await?.into_inner().mounts,
            )),
            Req::View(m) => Ok(Answer::Mounts(
                sn.view(Self::q(m)).await?.into_inner().mounts,
            )),
            Req::Mounts(key) => Ok(Answer::Mounts(
                sn.mounts(Self::q(pb::MountsRequest {
                    snapshotter: s,
                    key,
                }))
                .await?
                .into_inner()
                .mounts,
            )),
            Req::Commit(m) => {
                sn.commit(Self::q(m)).await?;
                Ok(Answer::Empty)
            }
            Req::Remove(key) => {
                sn.remove(Self::q(pb::RemoveSnapshotRequest {
                    snapshotter: s,
                    key,
                }))
                .await?;
                Ok(Answer::Empty)
            }
            Req::Stat(key) => Ok(Answer::Info(
                sn.stat(Self::q(pb::StatSnapshotRequest {
                    snapshotter: s,
                    key,
                }))
                .await?
                .into_inner()
                .info
                .unwrap_or_default(),
            )),
            Req::Update(m) => Ok(Answer::Info(
                sn.update(Self::q(m))
                    .await?
                    .into_inner()
                    .info
                    .unwrap_or_default(),
            )),
            Req::List(filters) => {
                let mut st = sn
                    .list(Self::q(pb::ListSnapshotsRequest {
                        snapshotter: s,
                        filters,
                    }))
                    .await?
                    .into_inner();
                let mut all = Vec::new();
                while let Some(b) = st.message().await? {
                    all.extend(b.info);
                }
                Ok(Answer::Infos(all))
            }
            Req::Usage(key) => {
                sn.usage(Self::q(pb::UsageRequest {
                    snapshotter: s,
                    key,
                }))
                .await?;
                Ok(Answer::Usage)
            }
            Req::Cleanup => {
                sn.cleanup(Self::q(pb::CleanupRequest { snapshotter: s }))
                    .await?;
                Ok(Answer::Empty)
            }
            Req::Apply(m, ns) => Ok(Answer::Descriptor(
                diff.apply(Self::req(m, ns.as_deref()))
                    .await?
                    .into_inner()
                    .applied
                    .unwrap_or_default(),
            )),
            Req::Diff(m, ns) => Ok(Answer::Descriptor(
                diff.diff(Self::req(m, ns.as_deref()))
                    .await?
                    .into_inner()
                    .diff
                    .unwrap_or_default(),
            )),
            Req::Fill(key) => {
                self.fill(&key).map_err(|e| {
                    Status::aborted(format!("test-side fill of {key:?} failed: {e:#}"))
                })?;
                Ok(Answer::Done)
            }
        }
    }

    /// Write a file into active snapshot `key`, as a container would.
    fn fill(&self, key: &str) -> Result<bool> {
        let Some(s) = self.model.snaps.get(key) else {
            return Ok(false);
        };
        // Once the differ wrote its layer, the snapshot's writable side is that read-only
        // layer until it is committed.
        if s.kind != pb::Kind::Active || s.applied {
            return Ok(false);
        }
        let m = self.env.mount(&s.mounts, "fill")?;
        let dir = m.path().join(format!("d{}", self.step));
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("f"), format!("written at step {}", self.step))?;
        std::os::unix::fs::symlink("/etc/shadow", dir.join("shadow"))?;
        m.unmount()?;
        Ok(true)
    }

    /// Send `req`, check every oracle, update the model.
    pub async fn run(&mut self, req: Req) -> Result<Result<Answer, Status>> {
        self.step += 1;
        let line = format!("#{} {}", self.step, req.describe());
        if self.verbose {
            eprintln!("{line}");
        }
        self.trace.push_back(line);
        if self.trace.len() > 25 {
            self.trace.pop_front();
        }
        let expect = self.predict(&req);
        let started = Instant::now();
        let out =
            match tokio::time::timeout(REQUEST_DEADLINE + Duration::from_secs(5), self.call(&req))
                .await
            {
                Ok(r) => r,
                Err(_) => bail!(
                    "{} hung: no answer after {:?}",
                    req.method(),
                    started.elapsed()
                ),
            };
        if !matches!(req, Req::Fill(_)) {
            self.stats.requests += 1;
        }
        let code = match &out {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        *self
            .stats
            .by_code
            .entry(format!("{}:{code:?}", req.method()))
            .or_default() += 1;
        if out.is_ok() {
            self.stats.ok += 1;
        }
        let msg = out
            .as_ref()
            .err()
            .map(|s| s.message().to_string())
            .unwrap_or_default();
        self.check_code(&req, &out)
            .with_context(|| format!("{}: {code:?}: {msg}", req.describe()))?;
        if let Some(e) = expect {
            self.stats.predicted += 1;
            let got = if out.is_ok() {
                Expect::Ok
            } else {
                Expect::Code(code)
            };
            ensure!(
                got == e,
                "{}: the model expects {e:?}, the daemon answered {code:?}: {msg}",
                req.describe()
            );
        }
        self.check_answer(&req, &out)
            .with_context(|| format!("the answer to {}", req.describe()))?;
        self.learn(&req, &out);
        self.check_health()
            .await
            .with_context(|| format!("after {}", req.describe()))?;
        Ok(out)
    }

    /// The trace of the last requests, oldest first.
    pub fn trace(&self) -> String {
        self.trace.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The status must be one containerd expects for a caller's mistake.
    fn check_code(&self, req: &Req, out: &Result<Answer, Status>) -> Result<()> {
        let Err(s) = out else { return Ok(()) };
        let c = s.code();
        if let Req::Fill(_) = req {
            bail!("{}", s.message());
        }
        let size = match req {
            Req::Prepare(m) => m.encoded_len(),
            Req::View(m) => m.encoded_len(),
            Req::Commit(m) => m.encoded_len(),
            Req::Update(m) => m.encoded_len(),
            Req::Apply(m, _) => m.encoded_len(),
            Req::Diff(m, _) => m.encoded_len(),
            Req::List(f) => f.iter().map(|f| f.len() + 8).sum(),
            Req::Mounts(k) | Req::Remove(k) | Req::Stat(k) | Req::Usage(k) => k.len(),
            _ => 0,
        };
        if size > MAX_DECODED && matches!(c, Code::OutOfRange | Code::ResourceExhausted) {
            return Ok(());
        }
        let caller = matches!(
            c,
            Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::FailedPrecondition
        );
        let ok = match req {
            // The Env's daemon has no containerd: an Apply whose blob the content directory
            // cannot serve (absent, or of another size) asks containerd's Content service
            // next, and a Compare that got as far as storing its diff does too; both then
            // fail with Unavailable, naming it.
            Req::Apply(..) | Req::Diff(..) => {
                caller
                    || c == Code::Unimplemented
                    || (c == Code::Unavailable && s.message().contains("containerd"))
            }
            _ => caller,
        };
        ensure!(ok, "{c:?} is not a code for a caller's bad input");
        Ok(())
    }

    /// What the model knows the answer must be, for requests whose inputs it can judge.
    fn predict(&self, req: &Req) -> Option<Expect> {
        let m = &self.model.snaps;
        let ia = Some(Expect::Code(Code::InvalidArgument));
        let nf = Some(Expect::Code(Code::NotFound));
        match req {
            Req::Stat(k) | Req::Usage(k) => {
                if !key_ok(k) {
                    ia
                } else if m.contains_key(k) {
                    Some(Expect::Ok)
                } else {
                    nf
                }
            }
            Req::Mounts(k) => {
                if !key_ok(k) {
                    ia
                } else {
                    match m.get(k) {
                        None => nf,
                        Some(s) if s.kind != pb::Kind::Committed && !s.own_labels => {
                            Some(Expect::Ok)
                        }
                        Some(_) => None,
                    }
                }
            }
            Req::Remove(k) => {
                if !key_ok(k) {
                    ia
                } else if !m.contains_key(k) {
                    // The daemon's documented choice: containerd's GC may retry a Remove.
                    Some(Expect::Ok)
                } else if self.model.has_children(k) {
                    Some(Expect::Code(Code::FailedPrecondition))
                } else {
                    Some(Expect::Ok)
                }
            }
            Req::Prepare(pb::PrepareSnapshotRequest {
                key,
                parent,
                labels,
                ..
            })
            | Req::View(pb::ViewSnapshotRequest {
                key,
                parent,
                labels,
                ..
            }) => {
                if !key_ok(key) {
                    return ia;
                }
                if labels_ok(labels) == Some(false) {
                    return ia;
                }
                labels_ok(labels)?;
                if !parent.is_empty() && !key_ok(parent) {
                    return ia;
                }
                let parent_state = if parent.is_empty() {
                    Some(pb::Kind::Committed)
                } else {
                    m.get(parent).map(|s| s.kind)
                };
                match (m.contains_key(key), parent_state) {
                    (true, Some(pb::Kind::Committed)) => Some(Expect::Code(Code::AlreadyExists)),
                    (false, None) => nf,
                    (false, Some(pb::Kind::Committed)) => Some(Expect::Ok),
                    (false, Some(_)) => ia,
                    _ => None,
                }
            }
            Req::Commit(c) => {
                if !key_ok(&c.name) || !key_ok(&c.key) || labels_ok(&c.labels) == Some(false) {
                    return ia;
                }
                if labels_ok(&c.labels).is_none() || !c.parent.is_empty() {
                    return None;
                }
                match (m.get(&c.key).map(|s| s.kind), m.contains_key(&c.name)) {
                    (None, false) => nf,
                    (Some(pb::Kind::Active), true) => Some(Expect::Code(Code::AlreadyExists)),
                    (Some(pb::Kind::Active), false) => Some(Expect::Ok),
                    _ => None,
                }
            }
            Req::Update(u) => {
                let i = u.info.as_ref()?;
                if !key_ok(&i.name) || labels_ok(&i.labels) == Some(false) {
                    return ia;
                }
                let paths = u
                    .update_mask
                    .as_ref()
                    .map(|m| m.paths.clone())
                    .unwrap_or_default();
                if paths
                    .iter()
                    .any(|p| p != "labels" && !p.starts_with("labels."))
                {
                    return ia;
                }
                let Some(snap) = m.get(&i.name) else {
                    return nf;
                };
                // The snapshotter's own labels (given now, named by a path, or already on
                // the snapshot) have rules of their own: the id-mapping pair must still parse
                // after the merge, which the model does not follow.
                let own = OWN_LABEL_PREFIX;
                if labels_ok(&i.labels).is_none()
                    || paths
                        .iter()
                        .any(|p| p.starts_with(&format!("labels.{own}")))
                    || snap.own_labels
                {
                    return None;
                }
                // A label named by a path may still be over the limit when the value is
                // merged; every single label here is valid, so the merge is too.
                Some(Expect::Ok)
            }
            Req::List(f) if f.is_empty() => Some(Expect::Ok),
            Req::Cleanup => Some(Expect::Ok),
            Req::Apply(a, _) => {
                // A stored, well-formed layer onto an active snapshot exactly as Prepare
                // returned it: it must apply.
                let d = a.diff.as_ref()?;
                let blob = self.input.blobs.iter().find(|b| b.desc == *d)?;
                let target = m
                    .values()
                    .find(|s| s.kind == pb::Kind::Active && s.mounts == a.mounts)?;
                (blob.valid && !target.mounts.is_empty()).then_some(Expect::Ok)
            }
            _ => None,
        }
    }

    /// What a successful answer must say, where the model knows it.
    fn check_answer(&self, req: &Req, out: &Result<Answer, Status>) -> Result<()> {
        let Ok(a) = out else { return Ok(()) };
        match (req, a) {
            (Req::Stat(k), Answer::Info(i)) => {
                let s = self
                    .model
                    .snaps
                    .get(k)
                    .context("Stat found a snapshot the model lacks")?;
                ensure!(i.name == *k, "Stat names {:?}", i.name);
                ensure!(
                    i.kind == s.kind as i32,
                    "kind {} where the model has {:?}",
                    i.kind,
                    s.kind
                );
                ensure!(
                    i.parent == s.parent,
                    "parent {:?} where the model has {:?}",
                    i.parent,
                    s.parent
                );
            }
            (Req::Mounts(k), Answer::Mounts(got)) => {
                if let Some(s) = self.model.snaps.get(k)
                    && s.kind != pb::Kind::Committed
                {
                    // Once the differ filled an active snapshot its layer is part of the
                    // mounts; until then they are what Prepare returned.
                    ensure!(
                        s.applied || *got == s.mounts,
                        "Mounts {got:?} differs from what Prepare/View returned: {:?}",
                        s.mounts
                    );
                }
            }
            (Req::List(_), Answer::Infos(infos)) => {
                for i in infos {
                    ensure!(
                        self.model.snaps.contains_key(&i.name),
                        "List shows {:?}, which the model lacks",
                        i.name
                    );
                }
                if let Req::List(f) = req
                    && f.is_empty()
                {
                    let got: BTreeSet<&String> = infos.iter().map(|i| &i.name).collect();
                    let want: BTreeSet<&String> = self.model.snaps.keys().collect();
                    ensure!(got == want, "List {got:?}, the model {want:?}");
                }
            }
            (Req::Apply(..), Answer::Descriptor(d)) => {
                let hex = d.digest.strip_prefix("sha256:").unwrap_or_default();
                ensure!(
                    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) && d.size >= 0,
                    "Apply answered {d:?}"
                );
            }
            (Req::Prepare(_) | Req::View(_), Answer::Mounts(m)) => {
                let id = self.env.id_of_mounts(m)?;
                ensure!(
                    self.env.snapshot_dir(id).is_dir(),
                    "snapshot {id} has no directory"
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// Update the model from a successful answer.
    fn learn(&mut self, req: &Req, out: &Result<Answer, Status>) {
        let Ok(a) = out else { return };
        let snaps = &mut self.model.snaps;
        match (req, a) {
            (Req::Prepare(p), Answer::Mounts(m)) => {
                snaps.insert(
                    p.key.clone(),
                    Snap {
                        kind: pb::Kind::Active,
                        parent: p.parent.clone(),
                        mounts: m.clone(),
                        applied: false,
                        own_labels: labels_ok(&p.labels).is_none(),
                    },
                );
            }
            (Req::View(v), Answer::Mounts(m)) => {
                snaps.insert(
                    v.key.clone(),
                    Snap {
                        kind: pb::Kind::View,
                        parent: v.parent.clone(),
                        mounts: m.clone(),
                        applied: false,
                        own_labels: labels_ok(&v.labels).is_none(),
                    },
                );
            }
            (Req::Commit(c), _) => {
                if let Some(s) = snaps.remove(&c.key) {
                    let parent = if c.parent.is_empty() {
                        s.parent
                    } else {
                        c.parent.clone()
                    };
                    snaps.insert(
                        c.name.clone(),
                        Snap {
                            kind: pb::Kind::Committed,
                            parent,
                            mounts: Vec::new(),
                            applied: false,
                            own_labels: s.own_labels || labels_ok(&c.labels).is_none(),
                        },
                    );
                }
            }
            (Req::Remove(k), _) => {
                snaps.remove(k);
            }
            (Req::Update(u), _) => {
                if let Some(i) = &u.info
                    && i.labels.keys().any(|k| k.starts_with(OWN_LABEL_PREFIX))
                    && let Some(s) = snaps.get_mut(&i.name)
                {
                    s.own_labels = true;
                }
            }
            (Req::Apply(..), _) => {
                // Which snapshot a (possibly mangled) mount list names is the daemon's call:
                // the one whose layer is there now.
                for s in snaps.values_mut() {
                    if s.kind == pb::Kind::Active
                        && let Ok(id) = self.env.id_of_mounts(&s.mounts)
                        && self.env.layer(id).exists()
                    {
                        s.applied = true;
                    }
                }
            }
            _ => {}
        }
    }

    /// The daemon runs and answers, logged no panic and no error, and nothing outside its
    /// root changed.
    async fn check_health(&mut self) -> Result<()> {
        self.env.ensure_running()?;
        let pid = self.env.daemon_pid().context("no daemon pid")?;
        let stat =
            fs::read_to_string(format!("/proc/{pid}/stat")).context("the daemon's /proc entry")?;
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .chars()
            .next();
        ensure!(
            !matches!(state, Some('Z' | 'X')),
            "the daemon is a zombie: {stat}"
        );
        let probe = async {
            self.sn
                .clone()
                .stat(Self::req(
                    pb::StatSnapshotRequest {
                        snapshotter: "erofs-rs".into(),
                        key: "hostile-liveness-probe".into(),
                    },
                    None,
                ))
                .await
        };
        match tokio::time::timeout(PROBE_DEADLINE, probe).await {
            Err(_) => bail!("the daemon does not answer a Stat within {PROBE_DEADLINE:?}"),
            Ok(Err(s)) if s.code() == Code::NotFound => {}
            Ok(r) => bail!("the liveness Stat answered {r:?}"),
        }
        self.stats.probes += 1;
        self.check_log()?;
        self.check_outside()?;
        Ok(())
    }

    /// No panic, no error line in what the daemon logged since the last check.
    fn check_log(&mut self) -> Result<()> {
        let mut f = fs::File::open(&self.env.log)?;
        f.seek(SeekFrom::Start(self.log_offset))?;
        let mut new = Vec::new();
        f.read_to_end(&mut new)?;
        self.log_offset += new.len() as u64;
        let text = String::from_utf8_lossy(&new);
        for l in text.lines() {
            ensure!(
                !l.contains("panicked") && !l.contains(" ERROR ") && !l.contains("RUST_BACKTRACE"),
                "the daemon logged: {l}"
            );
        }
        Ok(())
    }

    /// Nothing outside the root was created, written or mounted on.
    fn check_outside(&self) -> Result<()> {
        ensure!(
            tree(&self.canary, &[])? == self.canary_tree,
            "the canary tree {} changed",
            self.canary.display()
        );
        let now = self.outside_tree()?;
        if now != self.base_tree {
            let added: Vec<_> = now
                .keys()
                .filter(|k| !self.base_tree.contains_key(*k))
                .collect();
            let gone: Vec<_> = self
                .base_tree
                .keys()
                .filter(|k| !now.contains_key(*k))
                .collect();
            let changed: Vec<_> = now
                .iter()
                .filter(|(k, v)| self.base_tree.get(*k).is_some_and(|o| o != *v))
                .map(|(k, _)| k)
                .collect();
            bail!("outside the root: added {added:?}, removed {gone:?}, changed {changed:?}");
        }
        let m = &self.input.marker;
        for dir in ["/", "/tmp", "/proc/1/root/tmp"] {
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    ensure!(
                        !e.file_name().to_string_lossy().contains(m.as_str()),
                        "{} appeared",
                        e.path().display()
                    );
                }
            }
        }
        // Other tests on this machine mount too: a new mount counts when it is in this
        // test's directory outside the root and the mount area, or names the canary or the
        // marker anywhere.
        let canary = self.canary.display().to_string();
        for mi in self_mounts()? {
            let p = &mi.mount_point;
            if self.mounts_before.contains(p)
                || p.starts_with(&self.env.root)
                || p.starts_with(&self.env.work)
            {
                continue;
            }
            let text = format!("{} {} {:?}", p.display(), mi.source, mi.super_options);
            ensure!(
                !p.starts_with(&self.env.base)
                    && !text.contains(&canary)
                    && !text.contains(m.as_str()),
                "a mount appeared outside the root: {mi:?}"
            );
        }
        Ok(())
    }

    /// The store and the disk agree: List is the model, every snapshot has a directory and
    /// every directory a snapshot, nothing is half-created or half-removed (`settled`: after
    /// a Cleanup), and no diff is left in `ROOT/tmp`.
    pub async fn check_agreement(&mut self, settled: bool) -> Result<()> {
        let infos = match self.run(Req::List(Vec::new())).await? {
            Ok(Answer::Infos(i)) => i,
            other => bail!("List: {other:?}"),
        };
        let mut ids = BTreeSet::new();
        let mut other = Vec::new();
        let dir = self.env.snapshots_dir();
        if dir.exists() {
            for e in fs::read_dir(&dir)? {
                let name = e?.file_name().to_string_lossy().into_owned();
                match name.parse::<u64>() {
                    Ok(id) => {
                        ids.insert(id);
                    }
                    Err(_) => other.push(name),
                }
            }
        }
        ensure!(
            ids.len() == infos.len(),
            "{} snapshot directories for {} snapshots",
            ids.len(),
            infos.len()
        );
        for (k, s) in &self.model.snaps {
            if s.kind != pb::Kind::Committed {
                let id = self.env.id_of_mounts(&s.mounts)?;
                ensure!(ids.contains(&id), "{k:?}: directory {id} is gone");
            }
        }
        if settled {
            ensure!(
                other.is_empty(),
                "left in snapshots/ after Cleanup: {other:?}"
            );
            let tmp = self.env.root.join("tmp");
            if tmp.exists() {
                let left: Vec<_> = fs::read_dir(&tmp)?
                    .flatten()
                    .map(|e| e.file_name())
                    .collect();
                ensure!(left.is_empty(), "left in ROOT/tmp: {left:?}");
            }
        }
        Ok(())
    }

    /// Remove every snapshot, children first; then nothing is left on disk or mounted.
    pub async fn remove_all(&mut self) -> Result<()> {
        while !self.model.snaps.is_empty() {
            let leaf = self
                .model
                .snaps
                .keys()
                .find(|k| !self.model.has_children(k))
                .cloned()
                .context("a parent loop in the model")?;
            if let Err(s) = self.run(Req::Remove(leaf.clone())).await? {
                bail!("Remove of {leaf:?}: {s:?}");
            }
        }
        self.run(Req::Cleanup).await??;
        self.check_agreement(true).await?;
        let dir = self.env.snapshots_dir();
        if dir.exists() {
            let left: Vec<_> = fs::read_dir(&dir)?
                .flatten()
                .map(|e| e.file_name())
                .collect();
            ensure!(left.is_empty(), "left after removing everything: {left:?}");
        }
        let mounted: Vec<_> = self_mounts()?
            .into_iter()
            .filter(|m| m.mount_point.starts_with(&self.env.root))
            .map(|m| m.mount_point)
            .collect();
        ensure!(
            mounted.is_empty(),
            "still mounted after removing everything: {mounted:?}"
        );
        Ok(())
    }
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data)?;
    Ok(e.finish()?)
}

/// The layer blobs of a run: well-formed layers in every compression, and malformed ones
/// (garbage, truncated, a tar that names paths outside itself).
fn blobs(env: &Env) -> Result<Vec<Blob>> {
    let mut l = LayerBuilder::new();
    l.dir("etc", 0o755)
        .file("etc/motd", 0o644, b"hello\n")
        .symlink("etc/shadow-link", "/etc/shadow")
        .whiteout("etc/gone")
        .file("bin/tool", 0o755, &[0x7f; 9000]);
    let tar = l.finish()?;
    let mut out = Vec::new();
    let mut add = |mt: &str, data: &[u8], valid: bool| -> Result<()> {
        out.push(Blob {
            desc: env.add_blob(mt, data)?,
            valid,
        });
        Ok(())
    };
    add(media_type(Compression::None), &tar, true)?;
    add(media_type(Compression::Gzip), &gzip(&tar)?, true)?;
    add(
        media_type(Compression::Zstd),
        &zstd::encode_all(&tar[..], 3)?,
        true,
    )?;
    add(media_type(Compression::Gzip), b"\x1f\x8b\x08garbage", false)?;
    let gz = gzip(&tar)?;
    add(media_type(Compression::Gzip), &gz[..gz.len() / 2], false)?;
    add(media_type(Compression::None), &tar[..700], false)?;
    add("application/vnd.erofs", &[0u8; 8192], false)?;
    let mut esc = LayerBuilder::new();
    esc.file("../../../escape", 0o644, b"x")
        .symlink("up", "../../../../")
        .file("up/through-link", 0o644, b"y")
        .hardlink("hl", "/etc/passwd");
    add(media_type(Compression::None), &esc.finish()?, false)?;
    Ok(out)
}
