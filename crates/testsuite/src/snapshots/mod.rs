//! containerd's snapshotter conformance suite (`core/snapshots/testsuite`) as a library: the
//! cases are generic over a [`SnapshotterUnderTest`], and [`snapshotter_suite!`] turns the
//! case list into `#[test]` functions for one factory, as upstream's
//! `SnapshotterSuite(t, name, snapshotterFn)` does.
//!
//! Two factories exist: the daemon over its Unix socket with every returned mount performed
//! for real (`erofs-snapshotter`'s `tests/conformance`), and the core in process with a
//! recording mounter, without root and without mounts (`snapshotter`'s `tests/suite.rs`).
//! A factory that cannot mount answers [`SnapshotterUnderTest::mount`] with `None` after
//! checking what it can of the mount list (types, directories, what it has mounted where);
//! the cases then skip only the file-content checks and keep every lifecycle, metadata and
//! error-code check. The snapshotter's API speaks containerd's wire types (`Info`, `Mount`)
//! and gRPC status codes, which is what containerd's errdefs map errors to.
//!
//! - [`cases`]: the cases, and the helpers other suites build on ([`cases::create_snapshot`]...).
//! - [`fstest`]: appliers and tree comparison (in the spirit of continuity's `fstest`).

pub mod cases;
pub mod fstest;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use containerd_api::containerd::services::snapshots::v1 as pb;
use containerd_api::containerd::types::Mount;
use tonic::Status;

use crate::client::{Labels, labels};
use crate::rootfs::{Mounted, parse_overlay};

/// containerd's GC root label, set on everything like upstream's suite does.
pub const GC_ROOT: &str = "containerd.io/gc.root";

/// Snapshotter configuration flavour: the suite runs in both, like upstream's `TestErofs` and
/// `TestErofsWithQuota`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain upper directories.
    Plain,
    /// `[snapshotter] default_size = "64MB"`: an ext4 image per active snapshot.
    Quota,
}

impl Mode {
    /// The configuration lines of this flavour (appended to a config file).
    pub fn config_toml(self) -> &'static str {
        match self {
            Mode::Plain => "",
            Mode::Quota => "[snapshotter]\ndefault_size = \"64MB\"\n",
        }
    }
}

/// The default label set of the suite (a GC root, like upstream's `opt`).
pub fn default_labels() -> Labels {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    labels(&[(GC_ROOT, &now.to_string())])
}

/// The kind of an info.
pub fn kind(i: &pb::Info) -> pb::Kind {
    pb::Kind::try_from(i.kind).unwrap_or(pb::Kind::Unknown)
}

/// A prost timestamp as a `SystemTime`.
pub fn time(t: &Option<prost_types::Timestamp>) -> SystemTime {
    let t = t.unwrap_or_default();
    UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32)
}

/// The keys and scratch directories a [`SnapshotterUnderTest`] hands out, numbered from one
/// counter so every name in a case is unique.
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
    seq: AtomicU32,
}

impl Scratch {
    /// Scratch directories go below `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Scratch {
        Scratch {
            dir: dir.into(),
            seq: AtomicU32::new(0),
        }
    }

    /// See [`SnapshotterUnderTest::key`].
    pub fn key(&self, name: &str) -> String {
        format!(
            "testsuite/{}/{name}",
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// See [`SnapshotterUnderTest::new_dir`].
    pub fn new_dir(&self, prefix: &str) -> Result<PathBuf> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let d = self.dir.join(format!("{prefix}-{n}"));
        fs::create_dir_all(&d)?;
        Ok(d)
    }
}

/// A snapshotter and the world it lives in (a root directory, a scratch area), as the cases
/// need it. The API methods are containerd's Snapshotter interface.
// The cases await one call at a time on one task, so the futures need no `Send` bound.
#[allow(async_fn_in_trait)]
pub trait SnapshotterUnderTest {
    /// Prepare with labels.
    async fn prepare_with(
        &self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, Status>;
    /// View with labels.
    async fn view_with(
        &self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, Status>;
    /// Mounts.
    async fn mounts(&self, key: &str) -> Result<Vec<Mount>, Status>;
    /// Commit with labels and an expected parent (empty: any).
    async fn commit_with(
        &self,
        name: &str,
        key: &str,
        labels: Labels,
        parent: &str,
    ) -> Result<(), Status>;
    /// Remove.
    async fn remove(&self, key: &str) -> Result<(), Status>;
    /// Stat.
    async fn stat(&self, key: &str) -> Result<pb::Info, Status>;
    /// Update with a field mask.
    async fn update(&self, info: pb::Info, paths: &[&str]) -> Result<pb::Info, Status>;
    /// List (Walk) with containerd filters, flattened.
    async fn list(&self, filters: &[&str]) -> Result<Vec<pb::Info>, Status>;
    /// Walk calling `f` for every info; returns how many stream batches the infos came in,
    /// or `None` where there is no stream (in process).
    async fn walk(
        &self,
        filters: &[&str],
        f: impl AsyncFnMut(pb::Info) -> Result<()>,
    ) -> Result<Option<usize>>;
    /// Usage: (bytes, inodes).
    async fn usage(&self, key: &str) -> Result<(i64, i64), Status>;
    /// Cleanup.
    async fn cleanup(&self) -> Result<(), Status>;

    /// The configuration flavour.
    fn mode(&self) -> Mode;
    /// `ROOT/snapshots`.
    fn snapshots_dir(&self) -> PathBuf;
    /// A containerd-like backend key (`testsuite/N/name`: namespace, sequence, user key).
    fn key(&self, name: &str) -> String;
    /// A fresh scratch directory named after `prefix`.
    fn new_dir(&self, prefix: &str) -> Result<PathBuf>;
    /// Close the snapshotter gracefully and open it again on the same root.
    async fn restart(&mut self) -> Result<()>;
    /// Whether [`mount`](Self::mount) performs mounts (so file content can be checked).
    fn can_mount(&self) -> bool;
    /// `max_unmerged_layers` of the snapshotter (0: never flattens): a snapshot on more
    /// layers than this has one lower, its flattened chain.
    fn max_unmerged_layers(&self) -> usize {
        0
    }
    /// Perform `mounts` on a fresh directory (`Some`, when [`can_mount`](Self::can_mount)),
    /// or check the list as far as possible without mounting and answer `None`.
    fn mount(&self, mounts: &[Mount], prefix: &str) -> Result<Option<Mounted>>;

    /// Prepare with [`default_labels`].
    async fn prepare(&self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        self.prepare_with(key, parent, default_labels()).await
    }
    /// View with [`default_labels`].
    async fn view(&self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        self.view_with(key, parent, default_labels()).await
    }
    /// Commit with [`default_labels`].
    async fn commit(&self, name: &str, key: &str) -> Result<(), Status> {
        self.commit_with(name, key, default_labels(), "").await
    }

    /// The numeric snapshot directories and the other entries of `ROOT/snapshots`.
    fn snapshot_dirs(&self) -> Result<(BTreeSet<u64>, Vec<String>)> {
        let mut ids = BTreeSet::new();
        let mut other = Vec::new();
        for e in fs::read_dir(self.snapshots_dir())? {
            let name = e?.file_name().to_string_lossy().into_owned();
            match name.parse::<u64>() {
                Ok(id) => {
                    ids.insert(id);
                }
                Err(_) => other.push(name),
            }
        }
        Ok((ids, other))
    }

    /// `ROOT/snapshots/ID`.
    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// The snapshot id a path under `ROOT/snapshots/ID/...` belongs to.
    fn id_of(&self, path: &Path) -> Option<u64> {
        let rest = path.strip_prefix(self.snapshots_dir()).ok()?;
        rest.components().next()?.as_os_str().to_str()?.parse().ok()
    }
}

/// Whether a mount list gives a writable root.
pub fn is_writable(mounts: &[Mount]) -> bool {
    mounts.last().is_some_and(|m| match m.r#type.as_str() {
        "bind" => m.options.iter().any(|o| o == "rw") && !m.options.iter().any(|o| o == "ro"),
        "overlay" => m.options.iter().any(|o| o.starts_with("upperdir=")),
        _ => false,
    })
}

/// Where a mount list's snapshot dirs are: for a bind, its source; for an overlay, its upper
/// (if any) and lowers. Returns (own/upper dir, lower dirs).
pub fn mount_dirs(mounts: &[Mount]) -> Result<(Option<PathBuf>, Vec<PathBuf>)> {
    ensure!(mounts.len() == 1, "expected one mount, got {mounts:?}");
    let m = &mounts[0];
    match m.r#type.as_str() {
        "bind" => Ok((Some(PathBuf::from(&m.source)), Vec::new())),
        "overlay" => {
            let o = parse_overlay(m)?;
            Ok((o.upper, o.lowers))
        }
        t => bail!("unexpected mount type {t}"),
    }
}

/// A `BTreeMap` of a directory's entries: name → is_dir.
pub fn list_dir(dir: &Path) -> Result<BTreeMap<String, bool>> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            e.file_type()?.is_dir(),
        );
    }
    Ok(out)
}

/// The `#[test]` functions of the suite for one factory: `$run` is called as
/// `$run(mode, case)` with `mode` a [`Mode`] and `case` an `async fn(&mut S) -> Result<()>`,
/// and must create the snapshotter, run the case and tear everything down. Every case runs
/// plain (`NAME`) and with quota (`NAME_quota`). Cases marked `content` check file content
/// through mounts where the factory can mount; `metadata` cases never mount.
#[macro_export]
macro_rules! snapshotter_suite {
    ($run:path) => {
        $crate::snapshotter_suite!(@cases $run;
            content basic, basic_quota => basic;
            content stat_active, stat_active_quota => stat_active;
            content stat_committed, stat_committed_quota => stat_committed;
            content transitivity, transitivity_quota => transitivity;
            content prepare_view_failing, prepare_view_failing_quota => prepare_view_failing;
            metadata update, update_quota => update;
            metadata remove, remove_quota => remove;
            metadata walk, walk_quota => walk;
            content layer_file_update, layer_file_update_quota => layer_file_update;
            content remove_directory_in_lower_layer, remove_directory_in_lower_layer_quota => remove_directory_in_lower_layer;
            content chown, chown_quota => chown;
            content directory_permission_on_commit, directory_permission_on_commit_quota => directory_permission_on_commit;
            content remove_intermediate_snapshot, remove_intermediate_snapshot_quota => remove_intermediate_snapshot;
            content deleted_files_in_child_snapshot, deleted_files_in_child_snapshot_quota => deleted_files_in_child_snapshot;
            content move_file_from_lower_layer, move_file_from_lower_layer_quota => move_file_from_lower_layer;
            content view_readonly, view_readonly_quota => view_readonly;
            metadata stat_in_walk, stat_in_walk_quota => stat_in_walk;
            content close_twice, close_twice_quota => close_twice;
            content root_permission, root_permission_quota => root_permission;
            content rename, rename_quota => rename;
            content layers_128_mount, layers_128_mount_quota => layers_128_mount;
            content special_files, special_files_quota => special_files;
        );
    };
    (@cases $run:path; $($needs:ident $plain:ident, $quota:ident => $case:ident;)*) => {$(
        #[test]
        fn $plain() {
            $run($crate::snapshots::Mode::Plain, $crate::snapshots::cases::$case)
        }
        #[test]
        fn $quota() {
            $run($crate::snapshots::Mode::Quota, $crate::snapshots::cases::$case)
        }
    )*};
}
