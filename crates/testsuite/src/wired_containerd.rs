//! A [`World`]: a private containerd 2.1 wired to our daemon (proxy snapshotter
//! `erofs-rs` and proxy differ `erofs-rs-diff` on one socket), a tokio runtime for direct gRPC
//! calls, and helpers that look at what the daemon did (its log, its snapshot directories).
//!
//! The daemon's root lives under containerd's base directory so the layer mounts it makes in
//! the host namespace propagate into containerd's private one. Dropping a `World` stops the
//! daemon first, then containerd (which unmounts and removes everything under its base).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::oci::OciArchive;
use crate::{Containerd, ContainerdOpts, Daemon, UnpackConfig, Version};
use anyhow::{Context, Result, bail, ensure};
use containerd_api::containerd::types::{Descriptor, Mount};

/// Our proxy snapshotter's name in containerd.
pub const SN: &str = "erofs-rs";
/// Our proxy differ's name in containerd.
pub const DIFFER: &str = "erofs-rs-diff";

/// How to set a world up.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// `[differ] enable_tar_index = true`.
    pub tar_index: bool,
    /// `[differ] enable_dmverity = true` (trees are built; without dm-verity in the kernel,
    /// layers are mounted without it).
    pub dmverity: bool,
    /// `[differ] content_root` (default: containerd's content store directory).
    pub content_root: Option<PathBuf>,
    /// `max_concurrent_unpacks` of containerd's transfer service.
    pub max_concurrent_unpacks: Option<u32>,
    /// Plain containerd without our plugins in the diff service and unpack config, plus this
    /// raw TOML (the benchmark's reference configurations).
    pub reference_toml: Option<String>,
    /// Deadline of each `ctr` call (default 300 s).
    pub ctr_timeout: Option<Duration>,
}

/// A running containerd + daemon.
pub struct World {
    /// Our daemon (dropped before containerd).
    pub daemon: Option<Daemon>,
    /// containerd 2.1.
    pub ctd: Containerd,
    /// The daemon's root (`ROOT/snapshots/ID/...`).
    pub root: PathBuf,
    /// The daemon's socket.
    pub sock: PathBuf,
    /// Scratch space under containerd's base directory (mount points, images).
    pub work: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World").field("root", &self.root).finish()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(d) = &self.daemon
        {
            eprintln!("--- daemon log tail ---\n{}", d.log_tail(40));
            eprintln!("--- containerd log tail ---\n{}", self.ctd.log_tail(40));
        }
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
    }
}

/// One "applied layer" line of the daemon log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Backend snapshot key.
    pub snapshot: String,
    /// Compressed layer digest.
    pub layer: String,
    /// What Apply returned.
    pub diff_id: String,
    /// Uncompressed bytes.
    pub bytes: u64,
}

impl World {
    /// Start containerd 2.1 with our daemon (the binary `bin`) configured as `setup` says.
    pub fn start(bin: &Path, setup: Setup) -> Result<World> {
        crate::require_root()?;
        let sock_rel = Path::new("erofs/erofs.sock");
        let mut o = match &setup.reference_toml {
            Some(extra) => ContainerdOpts::new(Version::V2_1).extra_toml(extra),
            None => ContainerdOpts::new(Version::V2_1)
                .proxy_snapshotter(SN, sock_rel)
                .proxy_differ(DIFFER, sock_rel)
                .diff_service_default(&[DIFFER, "walking"])
                .unpack(UnpackConfig::new(SN, Some(DIFFER))),
        };
        o.max_concurrent_unpacks = setup.max_concurrent_unpacks;
        o.ctr_timeout = setup.ctr_timeout.unwrap_or(Duration::from_secs(300));
        if setup.reference_toml.is_some() {
            o.log_level = "info".into();
        }
        let mut ctd = Containerd::prepare(o)?;
        let root = ctd.dir("erofs/root")?;
        let work = ctd.dir("work")?;
        let sock = ctd.base_dir().join(sock_rel);
        let daemon = if setup.reference_toml.is_none() {
            let toml = format!(
                "root_path = {:?}\naddress = {:?}\n[differ]\ncontent_root = {:?}\ncontainerd_address = {:?}\nenable_tar_index = {}\nenable_dmverity = {}\n",
                root.display().to_string(),
                sock.display().to_string(),
                setup
                    .content_root
                    .clone()
                    .unwrap_or_else(|| ctd.content_root())
                    .display()
                    .to_string(),
                ctd.address().display().to_string(),
                setup.tar_index,
                setup.dmverity,
            );
            Some(Daemon::start(bin, &toml, &sock)?)
        } else {
            None
        };
        ctd.launch()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(World {
            daemon,
            ctd,
            root,
            sock,
            work,
            rt,
        })
    }

    /// Run a future on this world's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The daemon.
    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("a world with our daemon")
    }

    /// Fails if the daemon has exited.
    pub fn ensure_daemon_running(&mut self) -> Result<()> {
        self.daemon.as_mut().context("no daemon")?.ensure_running()
    }

    /// The daemon log.
    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.daemon().log_path()).unwrap_or_default()
    }

    /// Every "applied layer" line of the daemon log, in order.
    pub fn applied(&self) -> Vec<Applied> {
        self.daemon_log()
            .lines()
            .filter(|l| l.contains("applied layer"))
            .filter_map(|l| {
                let field = |k: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(&format!("{k}=")))
                        .map(str::to_string)
                };
                Some(Applied {
                    snapshot: field("snapshot")?,
                    layer: field("layer")?,
                    diff_id: field("diff_id")?,
                    bytes: field("bytes")?.parse().ok()?,
                })
            })
            .collect()
    }

    /// `ROOT/snapshots`.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Numeric snapshot directories, and every other entry of `ROOT/snapshots`.
    pub fn snapshot_dirs(&self) -> Result<(Vec<u64>, Vec<String>)> {
        let mut ids = Vec::new();
        let mut other = Vec::new();
        let dir = self.snapshots_dir();
        if !dir.exists() {
            return Ok((ids, other));
        }
        for e in fs::read_dir(&dir)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            match name.parse::<u64>() {
                Ok(id) => ids.push(id),
                Err(_) => other.push(name),
            }
        }
        ids.sort_unstable();
        Ok((ids, other))
    }

    /// `ROOT/snapshots/ID`.
    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// Files named `layer.erofs.tmp` (or other temporary layer names) anywhere in the
    /// snapshot directories.
    pub fn temp_layers(&self) -> Result<Vec<PathBuf>> {
        let (ids, _) = self.snapshot_dirs()?;
        let mut out = Vec::new();
        for id in ids {
            for e in fs::read_dir(self.snapshot_dir(id))? {
                let e = e?;
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("layer.erofs.") && n != "layer.erofs.dmverity" {
                    out.push(e.path());
                }
            }
        }
        Ok(out)
    }

    /// The superblock UUID our differ gives the layer with compressed digest `digest`
    /// (upstream's rule: uuid5(URL, "erofs:blobs/" + digest)).
    pub fn differ_uuid(digest: &str) -> [u8; 16] {
        *uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_URL,
            format!("erofs:blobs/{digest}").as_bytes(),
        )
        .as_bytes()
    }

    /// The committed layer images by superblock UUID.
    pub fn layers_by_uuid(&self) -> Result<BTreeMap<[u8; 16], PathBuf>> {
        let (ids, _) = self.snapshot_dirs()?;
        let mut out = BTreeMap::new();
        for id in ids {
            let p = self.snapshot_dir(id).join("layer.erofs");
            if let Ok(f) = fs::File::open(&p)
                && let Ok(img) = erofs_image::Image::open(f)
            {
                out.insert(img.superblock().uuid, p);
            }
        }
        Ok(out)
    }

    /// Proof that every layer of `img` went through our differ: an "applied layer" line
    /// with the layer's digest and the right diffID, a layer image written by the differ
    /// (its UUID derives from the compressed digest; a walking-differ unpack would have been
    /// converted at commit with another UUID) for tar layers, and every snapshot directory
    /// holds a `layer.erofs` (nothing is left active).
    pub fn assert_unpacked_by_us(&self, img: &OciArchive) -> Result<()> {
        let applied = self.applied();
        let by_uuid = self.layers_by_uuid()?;
        for l in &img.layers {
            let a = applied
                .iter()
                .find(|a| a.layer == l.blob.digest)
                .with_context(|| {
                    format!(
                        "no \"applied layer\" line for {} ({}) in the daemon log",
                        l.blob.digest, l.blob.media_type
                    )
                })?;
            ensure!(
                a.diff_id == l.diff_id,
                "layer {}: our differ returned {}, the image says {}",
                l.blob.digest,
                a.diff_id,
                l.diff_id
            );
            if !l.blob.media_type.starts_with("application/vnd.erofs.layer") {
                ensure!(
                    by_uuid.contains_key(&Self::differ_uuid(&l.blob.digest)),
                    "no committed layer.erofs has the UUID our differ derives from {}",
                    l.blob.digest
                );
            }
        }
        // Active snapshots (containers that ran with --rm stay in the daemon until
        // containerd's garbage collector removes them) have no layer yet.
        let g = self.grpc()?;
        let mut active = std::collections::BTreeSet::new();
        for i in self.block_on(g.list(&[]))? {
            if i.kind == 2 {
                active.insert(active_dir(&self.block_on(g.mounts(&i.name))?)?);
            }
        }
        let (ids, other) = self.snapshot_dirs()?;
        ensure!(other.is_empty(), "stray entries in snapshots/: {other:?}");
        for id in ids {
            let d = self.snapshot_dir(id);
            if !active.contains(&d) && !d.join("layer.erofs").is_file() {
                let entries: Vec<String> = fs::read_dir(&d)?
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                bail!(
                    "{} is not an active snapshot and has no layer.erofs (it holds {entries:?})",
                    d.display(),
                );
            }
        }
        ensure!(self.temp_layers()?.is_empty(), "temporary layers left");
        Ok(())
    }

    /// `ctr snapshots --snapshotter erofs-rs ls`: (name, parent, kind).
    pub fn ctr_snapshots(&self) -> Result<Vec<(String, String, String)>> {
        let out = self.ctd.snapshots(SN, &["ls"])?;
        let text = self.ctd.check(&out, "ctr snapshots ls")?;
        Ok(text
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.len() {
                    3 => Some((f[0].into(), f[1].into(), f[2].into())),
                    2 => Some((f[0].into(), String::new(), f[1].into())),
                    _ => None,
                }
            })
            .collect())
    }

    /// A gRPC client of our daemon (Snapshots and Diff), naming [`SN`].
    pub fn grpc(&self) -> Result<Client> {
        let ch = self.block_on(crate::client::connect(&self.sock))?;
        Ok(Client::new(ch, SN))
    }

    /// Wait until `f` holds (polling every 200 ms), or fail with `what`.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if f()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The snapshot directory a Prepare'd snapshot's mounts point into (`ROOT/snapshots/ID`).
pub fn active_dir(mounts: &[Mount]) -> Result<PathBuf> {
    let m = mounts.last().context("no mounts")?;
    let p = if m.r#type == "bind" {
        PathBuf::from(&m.source)
    } else {
        PathBuf::from(
            m.options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir="))
                .context("overlay without upperdir")?,
        )
    };
    // ROOT/snapshots/ID/fs
    Ok(p.parent()
        .context("mount source without parent")?
        .to_path_buf())
}

/// A descriptor for a layer of an archive.
pub fn descriptor(media_type: &str, digest: &str, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: digest.into(),
        size: size as i64,
        annotations: Default::default(),
    }
}
