//! containerd's snapshotter conformance suite ([`testsuite::snapshots`]) in process: the core
//! [`Snapshotter`] with a [`RecordingMounter`], no daemon, no socket, no mounts, no root.
//!
//! What this tier checks beyond the cases' lifecycle, metadata and error-code checks: every
//! mount list is checked against what the recorder holds (each lower directory has its own
//! layer image mounted on it, bind sources and upper/work directories exist, quota uppers live
//! on their snapshot's ext4 image), no target is mounted twice without an unmount between,
//! and no recorded mount outlives its snapshot's directory (Remove and Cleanup unmount).
//! File content is checked by the same cases over the socket (`erofs-snapshotter`'s
//! `tests/conformance`), where mounts are real.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use containerd_api::containerd::services::snapshots::v1 as pb;
use containerd_api::containerd::types::Mount;
use erofs_grpc::{convert, status::from_core};
use snapshotter::mount::{MountEvent, Mounter, RecordingMounter};
use snapshotter::{Config, Snapshotter};
use testsuite::client::Labels;
use testsuite::rootfs::{Mounted, parse_overlay};
use testsuite::snapshots::{Mode, Scratch, SnapshotterUnderTest};
use tonic::Status;

testsuite::snapshotter_suite!(run);

/// The core on a fresh root under `$TMPDIR`, and the recorder it mounts with.
#[derive(Debug)]
struct InProcess {
    /// Held for its Drop, which deletes the root and the scratch directories.
    _base: tempfile::TempDir,
    mode: Mode,
    cfg: Config,
    sn: Option<Snapshotter>,
    rec: Arc<RecordingMounter>,
    scratch: Scratch,
}

/// Runs a case on a fresh [`InProcess`], then checks the recorder's log once more.
fn run<F>(mode: Mode, f: F)
where
    F: AsyncFnOnce(&mut InProcess) -> Result<()>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime");
    let r = rt.block_on(async move {
        let mut t = InProcess::new(mode).context("opening the snapshotter")?;
        f(&mut t).await?;
        t.check_log()?;
        t.check_no_stale_mounts()
    });
    if let Err(e) = r {
        panic!("{e:#}");
    }
}

impl InProcess {
    fn new(mode: Mode) -> Result<InProcess> {
        let base = tempfile::Builder::new()
            .prefix("snapshotter-suite-")
            .tempdir()?;
        std::fs::create_dir(base.path().join("work"))?;
        let toml = format!(
            "root_path = {:?}\naddress = {:?}\n{}",
            base.path().join("root").display().to_string(),
            base.path().join("unused.sock").display().to_string(),
            mode.config_toml()
        );
        let cfg = Config::parse(&toml)?;
        let rec = Arc::new(RecordingMounter::new());
        let sn = Snapshotter::open(cfg.clone(), rec.clone())?;
        let scratch = Scratch::new(base.path().join("work"));
        Ok(InProcess {
            _base: base,
            mode,
            cfg,
            sn: Some(sn),
            rec,
            scratch,
        })
    }

    fn sn(&self) -> &Snapshotter {
        self.sn.as_ref().expect("the snapshotter is open")
    }

    /// Layers are mounted once: no mount lands on a target that is already mounted.
    fn check_log(&self) -> Result<()> {
        let mut mounted = std::collections::BTreeSet::new();
        for e in self.rec.events() {
            let t = e.target().to_path_buf();
            if e.is_mount() {
                ensure!(mounted.insert(t), "mounted twice without an unmount: {e:?}");
            } else {
                mounted.remove(&t);
            }
        }
        Ok(())
    }

    /// Every recorded mount is on a directory that still exists.
    fn check_no_stale_mounts(&self) -> Result<()> {
        let stale: Vec<PathBuf> = self
            .rec
            .mounted()
            .into_keys()
            .filter(|t| !t.is_dir())
            .collect();
        ensure!(
            stale.is_empty(),
            "mounts left on removed directories: {stale:?}"
        );
        Ok(())
    }

    /// `dir` has snapshot `id`'s layer image mounted on it.
    fn expect_layer_mounted(&self, dir: &Path) -> Result<()> {
        let layout = self.sn().layout();
        let id = layout
            .id_of(dir)
            .with_context(|| format!("{} is not in a snapshot directory", dir.display()))?;
        ensure!(
            dir == layout.fs(id),
            "lower {} is not a fs directory",
            dir.display()
        );
        match self.rec.mounted().get(dir) {
            Some(MountEvent::Erofs { image, .. }) if *image == layout.layer(id) => Ok(()),
            other => bail!(
                "{}: expected layer {id} mounted, found {other:?}",
                dir.display()
            ),
        }
    }

    /// An upper directory: in quota mode on its snapshot's mounted ext4 image.
    fn expect_upper(&self, upper: &Path) -> Result<()> {
        ensure!(
            upper.is_dir(),
            "upper {} is not a directory",
            upper.display()
        );
        if self.mode == Mode::Quota {
            let layout = self.sn().layout();
            let id = layout.id_of(upper).context("upper outside the snapshots")?;
            let fs = layout.fs(id);
            ensure!(upper == fs.join("upper"), "quota upper {}", upper.display());
            match self.rec.mounted().get(&fs) {
                Some(MountEvent::Ext4 { image, .. }) if *image == layout.rwlayer(id) => {}
                other => bail!("{}: expected the ext4 image, found {other:?}", fs.display()),
            }
        }
        Ok(())
    }

    fn check_mounts(&self, mounts: &[Mount]) -> Result<()> {
        let [m] = mounts else {
            bail!("host mode returns one mount, got {mounts:?}");
        };
        match m.r#type.as_str() {
            "bind" => {
                let ro = m.options.iter().any(|o| o == "ro");
                let rw = m.options.iter().any(|o| o == "rw");
                ensure!(ro != rw, "bind options {:?}", m.options);
                ensure!(m.options.iter().any(|o| o == "rbind"), "{:?}", m.options);
                let src = Path::new(&m.source);
                if rw {
                    self.expect_upper(src)
                } else if self.rec.is_mountpoint(src)? {
                    self.expect_layer_mounted(src)
                } else {
                    // A view of nothing: an empty directory.
                    ensure!(src.is_dir(), "bind source {} missing", src.display());
                    Ok(())
                }
            }
            "overlay" => {
                let o = parse_overlay(m)?;
                ensure!(!o.lowers.is_empty(), "overlay without lowers: {m:?}");
                for l in &o.lowers {
                    self.expect_layer_mounted(l)?;
                }
                match (&o.upper, &o.work) {
                    (Some(u), Some(w)) => {
                        self.expect_upper(u)?;
                        ensure!(w.is_dir(), "workdir {} missing", w.display());
                    }
                    (None, None) => {}
                    _ => bail!("upperdir without workdir or the reverse: {m:?}"),
                }
                Ok(())
            }
            t => bail!("unexpected host-mode mount type {t:?}"),
        }
    }
}

fn mounts(m: snapshotter::Result<Vec<snapshotter::Mount>>) -> Result<Vec<Mount>, Status> {
    Ok(m.map_err(from_core)?
        .into_iter()
        .map(convert::mount)
        .collect())
}

fn labels(l: Labels) -> std::collections::BTreeMap<String, String> {
    l.into_iter().collect()
}

impl SnapshotterUnderTest for InProcess {
    async fn prepare_with(&self, key: &str, parent: &str, l: Labels) -> Result<Vec<Mount>, Status> {
        mounts(self.sn().prepare(key, parent, labels(l)))
    }

    async fn view_with(&self, key: &str, parent: &str, l: Labels) -> Result<Vec<Mount>, Status> {
        mounts(self.sn().view(key, parent, labels(l)))
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>, Status> {
        mounts(self.sn().mounts(key))
    }

    async fn commit_with(
        &self,
        name: &str,
        key: &str,
        l: Labels,
        parent: &str,
    ) -> Result<(), Status> {
        self.sn()
            .commit(name, key, labels(l), parent, &snapshotter::Cancel::never())
            .map_err(from_core)
    }

    async fn remove(&self, key: &str) -> Result<(), Status> {
        self.sn().remove(key).map_err(from_core)?;
        self.check_no_stale_mounts()
            .map_err(|e| Status::internal(format!("after removing {key:?}: {e:#}")))
    }

    async fn stat(&self, key: &str) -> Result<pb::Info, Status> {
        self.sn().stat(key).map(convert::info).map_err(from_core)
    }

    async fn update(&self, info: pb::Info, paths: &[&str]) -> Result<pb::Info, Status> {
        let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        self.sn()
            .update(convert::info_from(info), &paths)
            .map(convert::info)
            .map_err(from_core)
    }

    async fn list(&self, filters: &[&str]) -> Result<Vec<pb::Info>, Status> {
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        let infos = self.sn().list(&filters).map_err(from_core)?;
        Ok(infos.into_iter().map(convert::info).collect())
    }

    async fn walk(
        &self,
        filters: &[&str],
        mut f: impl AsyncFnMut(pb::Info) -> Result<()>,
    ) -> Result<Option<usize>> {
        for i in self.list(filters).await? {
            f(i).await?;
        }
        Ok(None)
    }

    async fn usage(&self, key: &str) -> Result<(i64, i64), Status> {
        let u = self.sn().usage(key).map_err(from_core)?;
        Ok((u.size as i64, u.inodes as i64))
    }

    async fn cleanup(&self) -> Result<(), Status> {
        self.sn().cleanup().map_err(from_core)?;
        self.check_no_stale_mounts()
            .map_err(|e| Status::internal(format!("after cleanup: {e:#}")))
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.sn().layout().snapshots()
    }

    fn key(&self, name: &str) -> String {
        self.scratch.key(name)
    }

    fn new_dir(&self, prefix: &str) -> Result<PathBuf> {
        self.scratch.new_dir(prefix)
    }

    /// Close and reopen on the same root; the recorder keeps its mounts, as the kernel keeps
    /// a daemon's mounts across its restarts.
    async fn restart(&mut self) -> Result<()> {
        drop(self.sn.take());
        self.sn = Some(Snapshotter::open(self.cfg.clone(), self.rec.clone())?);
        Ok(())
    }

    fn can_mount(&self) -> bool {
        false
    }

    fn mount(&self, mounts: &[Mount], _prefix: &str) -> Result<Option<Mounted>> {
        self.check_mounts(mounts)
            .with_context(|| format!("mount list {mounts:?}"))?;
        self.check_log()?;
        Ok(None)
    }
}
