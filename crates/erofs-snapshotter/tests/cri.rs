//! The CRI path end to end: containerd's CRI plugin (what kubelet talks to) on our proxy
//! snapshotter `erofs-rs` (and, where the version has proxy differs, our differ
//! `erofs-rs-diff`), on containerd 1.6 (Debian 12), 1.7 (Debian 13) and 2.1 (sid). The test
//! plays kubelet over the CRI gRPC API (`runtime.v1`, `testsuite::cri`); images come from a
//! local registry, pods run with host networking and a pause image the test builds. Needs
//! root, erofs, overlayfs and the three containerd versions (`scripts/setup`).
//!
//! 1. `pod_lifecycle_*`: Version, PullImage, ImageStatus, ListImages, ImageFsInfo (our root
//!    and the sum of our Usage), RunPodSandbox (which pulls the pause image itself),
//!    CreateContainer/StartContainer/ContainerStatus/ExecSync, ContainerStats (the writable
//!    layer's usage is our Usage of the container's snapshot), Stop/Remove container and pod,
//!    RemoveImage; then containerd's garbage collector removes our snapshots: nothing is left
//!    in our store, below our root, or in either mount table.
//!    `pod_lifecycle_transfer_service_containerd_2_1`: the same with snapshot annotations off,
//!    so that 2.1 pulls through the transfer service (with them on, every version's CRI
//!    plugin pulls in the client and unpacks through the diff service).
//! 2. `volumes_two_pods_and_restart_*`: an image with `VOLUME`s (containerd copies the
//!    image's content into each volume through our mounts), two pods of one image at once,
//!    and a pod restarted (a new sandbox attempt) on the image pulled before, with no second
//!    unpack.
//! 3. `image_volume_containerd_2_1`: a Kubernetes image volume (CRI `Mount.image`), an image
//!    mounted read-only in a container from our snapshots. containerd 1.6 and 1.7 do not
//!    know the field (1.7 fails CreateContainer with `mkdir ""`).
//! 4. `userns_pod_*`: a user-namespaced pod (CRI `userns_options`, mode POD,
//!    container ids 0-65535 on host ids 200000-265535) in a pod network namespace (a tap
//!    device with a fixed address, `CriConfig::pod_network`), run by sid's runc 1.3
//!    (`ContainerdOpts::sid_runc`: containerd 2.1 refuses user namespaces with Debian 12's
//!    runc 1.1.5, which has no idmapped mounts). With `remap-ids` in the proxy plugin's
//!    capabilities containerd hands the mapping to us as snapshot labels: inside, the image's
//!    files are root's (not the overflow id), a file root writes is the host's 200000 in the
//!    writable layer, and no layer is copied, re-applied or changed. (Without the capability
//!    the sandbox fails: runc cannot create `/etc/resolv.conf` on unmapped layers.)
//!    containerd 1.7 needs no idmapped mounts from runc, so Debian 12's runc serves there;
//!    containerd 1.6 ignores `userns_options` and runs the pod in the node's user namespace.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use containerd_api::containerd::services::snapshots::v1 as pb;
use containerd_api::runtime::v1 as cri;
use testsuite::client::{self, Client};
use testsuite::cri::{self as cri_mod, CriClient, CriConfig, container_config, pod_config};
use testsuite::mounts;
use testsuite::oci::{self, Compression, ImageSpec, LayerBuilder, OciArchive};
use testsuite::proxied_containerd::{Env, EnvOpts, SN};
use testsuite::{Registry, Version, with_timeout};

/// The daemon binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_erofs-snapshotter");

/// Backstop for one test body.
const LIMIT: Duration = Duration::from_secs(600);

/// How long to wait for the CRI plugin's stats (collected every second) to catch up.
const STATS_WAIT: Duration = Duration::from_secs(30);

fn e2e(f: fn() -> Result<()>) {
    with_timeout(LIMIT, move || {
        if let Err(e) = f() {
            panic!("{e:#}");
        }
    });
}

/// What the `motd` of the test images says.
const MOTD: &str = "hello from the CRI test\n";

/// A command that runs until SIGTERM and then exits 0 at once (as pid 1 a plain `sleep`
/// would ignore the signal, and every stop would wait for SIGKILL).
const SLEEP_UNTIL_TERM: &[&str] = &["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 86400 & wait"];

/// The pause image: busybox waiting for a signal.
fn pause_image() -> Result<ImageSpec> {
    Ok(ImageSpec::new("testsuite/pause:1")
        .layer(oci::busybox_base_layer()?, Compression::Gzip)
        .entrypoint(SLEEP_UNTIL_TERM))
}

/// The application image: busybox, a top layer with `/etc/motd`, waiting for a signal.
fn app_image(name: &str) -> Result<ImageSpec> {
    let mut top = LayerBuilder::new();
    top.file("etc/motd", 0o644, MOTD.as_bytes());
    Ok(ImageSpec::new(name)
        .layer(oci::busybox_base_layer()?, Compression::Gzip)
        .layer(top.finish()?, Compression::Zstd)
        .cmd(SLEEP_UNTIL_TERM))
}

/// Our daemon and a containerd whose CRI plugin uses it, a registry holding the pause image,
/// and a CRI client.
struct World {
    env: Env,
    reg: Registry,
    cri: CriClient,
    sn: Client,
    pause_ref: String,
    logs: PathBuf,
}

impl World {
    fn start(version: Version) -> Result<World> {
        Self::start_with(version, false)
    }

    /// [`start`](Self::start), with the CRI plugin's `disable_snapshot_annotations` set to
    /// `disable_annotations` (containerd 2.x pulls through the transfer service only then).
    fn start_with(version: Version, disable_annotations: bool) -> Result<World> {
        Self::start_custom(version, |cfg, _| {
            cfg.disable_snapshot_annotations = disable_annotations
        })
    }

    /// [`start`](Self::start), with the CRI config and the environment's options changed by
    /// `custom` first.
    fn start_custom(
        version: Version,
        custom: impl FnOnce(&mut CriConfig, &mut EnvOpts),
    ) -> Result<World> {
        let reg = Registry::start()?;
        let scratch = tempfile::tempdir()?;
        let pause = oci::build_archive(&pause_image()?, scratch.path())?;
        let pause_ref = reg.push_as(&pause, "testsuite/pause", "1")?;
        let mut cfg = CriConfig::new(SN, &pause_ref).plain_http(&reg.host());
        let mut opts = EnvOpts {
            // Where containerd 1.6 looks for a snapshotter's files (see `imagefs_root`).
            root_rel: (!cri_mod::imagefs_from_exports(version))
                .then(|| format!("root/io.containerd.snapshotter.v1.{SN}")),
            ..EnvOpts::default()
        };
        custom(&mut cfg, &mut opts);
        opts.cri = Some(cfg);
        let env = Env::start_opts(Path::new(BIN), version, opts)?;
        let cri = CriClient::connect(env.ctd.address())?;
        let sn = Client::new(cri.block_on(client::connect(&env.sock))?, SN);
        let logs = env.ctd.dir("pod-logs")?;
        let w = World {
            env,
            reg,
            cri,
            sn,
            pause_ref,
            logs,
        };
        w.cri.wait_ready(Duration::from_secs(30))?;
        Ok(w)
    }

    /// Builds `spec` and pushes it to the registry: (archive, reference).
    fn push(&self, spec: &ImageSpec, repo: &str) -> Result<(OciArchive, String)> {
        let archive = self.env.build(spec)?;
        let reference = self.reg.push_as(&archive, repo, "1")?;
        Ok((archive, reference))
    }

    /// Everything in our store (all namespaces), over our socket.
    fn snapshots(&self) -> Result<Vec<pb::Info>> {
        Ok(self.cri.block_on(self.sn.list(&[]))?)
    }

    /// Our key of containerd's snapshot `name` (containerd names it `NS/N/NAME` to us).
    fn key_of(&self, name: &str) -> Result<Option<pb::Info>> {
        let suffix = format!("/{name}");
        let mut found: Vec<pb::Info> = self
            .snapshots()?
            .into_iter()
            .filter(|i| i.name.ends_with(&suffix))
            .collect();
        ensure!(found.len() <= 1, "{name} is in our store twice: {found:?}");
        Ok(found.pop())
    }

    /// Our Usage of snapshot `key`: (bytes, inodes).
    fn usage(&self, key: &str) -> Result<(u64, u64)> {
        let (b, i) = self.cri.block_on(self.sn.usage(key))?;
        Ok((b as u64, i as u64))
    }

    /// The sum of our Usage over our whole store.
    fn total_usage(&self) -> Result<(u64, u64)> {
        let mut sum = (0, 0);
        for i in self.snapshots()? {
            let (b, n) = self.usage(&i.name)?;
            sum.0 += b;
            sum.1 += n;
        }
        Ok(sum)
    }

    /// How many layers our differ applied (its log lines).
    fn applied_layers(&self) -> usize {
        self.env
            .daemon_log(100_000)
            .lines()
            .filter(|l| l.contains("applied layer"))
            .count()
    }

    /// What `ImageFsInfo`'s image filesystem must be: our root, taken from the proxy
    /// plugin's `exports.root` (1.7, 2.1), or (1.6) the directory containerd derives from its
    /// own root and the snapshotter name, where [`World::start`] put our root.
    fn imagefs_root(&self) -> PathBuf {
        self.env.root.clone()
    }

    /// A host-network pod `name` (attempt `attempt`): its config and sandbox id.
    fn run_pod(&self, name: &str, attempt: u32) -> Result<(cri::PodSandboxConfig, String)> {
        let log_dir = self.logs.join(format!("{name}-{attempt}"));
        fs::create_dir_all(&log_dir)?;
        let cgroup = format!("{}/{name}-{attempt}", self.env.ctd.cgroup_parent());
        let pod = pod_config(name, attempt, &cgroup, &log_dir);
        let id = self.cri.run_pod(&pod)?;
        let st = self.cri.pod_status(&id)?;
        ensure!(
            st.state == cri::PodSandboxState::SandboxReady as i32,
            "pod {name}: state {}",
            st.state
        );
        Ok((pod, id))
    }

    /// Creates and starts container `name` of `image` in pod `pod_id`; waits until it runs.
    fn start_container(
        &self,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        name: &str,
        image: &str,
    ) -> Result<String> {
        let cfg = container_config(name, image, &[]);
        fs::create_dir_all(Path::new(&pod.log_directory).join(name))?;
        let id = self.cri.create_container(pod_id, &cfg, pod)?;
        self.cri.start_container(&id)?;
        let st = self.cri.container_status(&id)?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "container {name}: state {} ({} {})",
            st.state,
            st.reason,
            st.message
        );
        Ok(id)
    }

    /// Stops and removes container `id`, then pod `pod_id`.
    fn tear_down(&self, pod_id: &str, containers: &[&str]) -> Result<()> {
        for c in containers {
            self.cri.stop_container(c, 10)?;
            self.cri.remove_container(c)?;
        }
        self.cri.stop_pod(pod_id)?;
        self.cri.remove_pod(pod_id)
    }

    /// Mounts below our root, in the host's and in containerd's mount namespace.
    fn mounts_under_root(&self) -> Result<Vec<String>> {
        let mut out: Vec<String> = mounts::self_mounts_under(&self.env.root)?
            .iter()
            .map(|m| format!("host: {}", m.mount_point.display()))
            .collect();
        for m in self.env.ctd.mountinfo()? {
            if m.mount_point.starts_with(&self.env.root) {
                out.push(format!("containerd: {}", m.mount_point.display()));
            }
        }
        Ok(out)
    }

    /// Runs containerd's garbage collector until our store, our snapshot directories and
    /// the mount tables below our root are empty.
    fn wait_all_gone(&self) -> Result<()> {
        self.env
            .wait_until("our snapshots to be collected", || {
                Ok(self.snapshots()?.is_empty()
                    && self.env.snapshot_dirs()?.is_empty()
                    && self.mounts_under_root()?.is_empty())
            })
            .with_context(|| {
                format!(
                    "left: store {:?}, dirs {:?}, mounts {:?}",
                    self.snapshots()
                        .map(|v| v.into_iter().map(|i| i.name).collect::<Vec<_>>()),
                    self.env.snapshot_dirs(),
                    self.mounts_under_root()
                )
            })
    }
}

/// Polls `f` until it returns `Some`, for up to [`STATS_WAIT`]; the last value is in the
/// error.
fn poll<T: std::fmt::Debug>(
    what: &str,
    mut f: impl FnMut() -> Result<(Option<T>, String)>,
) -> Result<T> {
    let deadline = Instant::now() + STATS_WAIT;
    loop {
        let (v, last) = f()?;
        if let Some(v) = v {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not after {STATS_WAIT:?}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------------------
// 1. One pod, one container, from pull to garbage collection.

fn lifecycle(version: Version) -> Result<()> {
    lifecycle_with(World::start(version)?)
}

fn lifecycle_with(w: World) -> Result<()> {
    let version = w.env.version;
    let (app, app_ref) = w.push(&app_image("cri-app")?, "testsuite/cri-app")?;

    let v = w.cri.version()?;
    ensure!(v.runtime_name == "containerd", "runtime {v:?}");
    ensure!(v.runtime_api_version == "v1", "CRI API {v:?}");

    // PullImage: the image id is the config digest, and the layers are ours.
    let image_id = w.cri.pull_image(&app_ref)?;
    ensure!(
        image_id == app.config.digest,
        "PullImage returned {image_id}, config is {}",
        app.config.digest
    );
    let chain = oci::chain_ids(
        &app.layers
            .iter()
            .map(|l| l.diff_id.clone())
            .collect::<Vec<_>>(),
    );
    for c in &chain {
        let info = w
            .key_of(c)?
            .with_context(|| format!("layer {c} is not in our store"))?;
        ensure!(
            info.kind == pb::Kind::Committed as i32,
            "{c}: kind {}",
            info.kind
        );
    }
    let applied = w.applied_layers();
    if version.proxy_diff() {
        ensure!(
            applied == app.layers.len(),
            "our differ applied {applied} layers of {}",
            app.layers.len()
        );
    } else {
        ensure!(
            applied == 0,
            "{version} has no proxy differ, yet ours applied {applied} layers"
        );
    }

    // ImageStatus and ListImages.
    let img = w
        .cri
        .image_status(&app_ref)?
        .context("ImageStatus: no image")?;
    ensure!(img.id == image_id, "ImageStatus id {}", img.id);
    ensure!(
        img.repo_tags.contains(&app_ref),
        "repo tags {:?}",
        img.repo_tags
    );
    ensure!(img.size > 0, "image size 0");
    let listed = w.cri.list_images()?;
    ensure!(
        listed.iter().any(|i| i.id == image_id),
        "ListImages: {listed:?}"
    );

    // ImageFsInfo: our root, and what our Usage says of every layer in it.
    let want_root = w.imagefs_root();
    let (want_bytes, want_inodes) = w.total_usage()?;
    ensure!(
        want_bytes > 0 && want_inodes > 0,
        "our Usage of the image's layers is 0"
    );
    poll("ImageFsInfo to report our usage", || {
        let r = w.cri.image_fs_info()?;
        let fs = r
            .image_filesystems
            .first()
            .context("ImageFsInfo: no image filesystem")?;
        let mp = fs
            .fs_id
            .as_ref()
            .map(|f| f.mountpoint.clone())
            .unwrap_or_default();
        ensure!(
            Path::new(&mp) == want_root,
            "ImageFsInfo mountpoint {mp:?}, our root is {}",
            want_root.display()
        );
        let got = (
            fs.used_bytes.as_ref().map(|u| u.value),
            fs.inodes_used.as_ref().map(|u| u.value),
        );
        Ok((
            (got == (Some(want_bytes), Some(want_inodes))).then_some(()),
            format!("{got:?}, want {want_bytes} bytes {want_inodes} inodes"),
        ))
    })?;

    // A pod (RunPodSandbox pulls the pause image through the CRI plugin) and a container.
    let (pod, pod_id) = w.run_pod("lifecycle", 0)?;
    ensure!(
        w.cri.image_status(&w.pause_ref)?.is_some(),
        "the pause image was not pulled"
    );
    ensure!(
        w.key_of(&pod_id)?.is_some(),
        "the sandbox's snapshot {pod_id} is not ours"
    );
    let ctr_id = w.start_container(&pod_id, &pod, "app", &app_ref)?;
    let st = w.cri.container_status(&ctr_id)?;
    ensure!(
        st.image_ref == image_id || st.image_ref.ends_with(&app.manifest.digest),
        "ContainerStatus image_ref {}",
        st.image_ref
    );
    let key = w
        .key_of(&ctr_id)?
        .with_context(|| format!("the container's snapshot {ctr_id} is not ours"))?;
    ensure!(
        key.kind == pb::Kind::Active as i32,
        "container snapshot kind {}",
        key.kind
    );
    ensure!(
        key.parent.ends_with(&format!("/{}", chain.last().unwrap())),
        "container snapshot parent {}",
        key.parent
    );

    // The container sees the image through our layers.
    ensure!(
        w.cri.exec_ok(&ctr_id, &["cat", "/etc/motd"])? == MOTD,
        "motd"
    );
    let ls: BTreeSet<String> = w
        .cri
        .exec_ok(&ctr_id, &["ls", "/"])?
        .lines()
        .map(str::to_owned)
        .collect();
    for d in ["bin", "etc", "usr", "tmp"] {
        ensure!(ls.contains(d), "ls / in the container: {ls:?}");
    }
    let rootfs = w
        .env
        .ctd
        .mountinfo()?
        .into_iter()
        .find(|m| m.mount_point.ends_with(format!("{ctr_id}/rootfs")))
        .context("no rootfs mount of the container in containerd's namespace")?;
    ensure!(
        rootfs.fs_type == "overlay",
        "container rootfs is {}",
        rootfs.fs_type
    );
    let lower = rootfs
        .super_option("lowerdir")
        .unwrap_or_default()
        .to_owned();
    ensure!(
        lower.contains(&w.env.root.join("snapshots").to_string_lossy().into_owned()),
        "rootfs lowerdir {lower} is not below our root"
    );

    // ContainerStats: the writable layer is what our Usage says of the container's snapshot.
    w.cri.exec_ok(
        &ctr_id,
        &["dd", "if=/dev/zero", "of=/written", "bs=65536", "count=64"],
    )?;
    let written = poll("ContainerStats to report the writable layer", || {
        let (bytes, inodes) = w.usage(&key.name)?;
        let s = w.cri.container_stats(&ctr_id)?;
        let wl = s
            .writable_layer
            .context("ContainerStats without writable_layer")?;
        let got = (
            wl.used_bytes.map(|u| u.value),
            wl.inodes_used.map(|u| u.value),
        );
        let ok = bytes >= 4 << 20 && got == (Some(bytes), Some(inodes));
        Ok((
            ok.then_some(bytes),
            format!("{got:?}, ours {bytes} bytes {inodes} inodes"),
        ))
    })?;
    ensure!(
        written < 8 << 20,
        "writable layer {written} bytes after writing 4 MiB"
    );

    // Stop and remove; then the images; then containerd collects our snapshots.
    w.tear_down(&pod_id, &[&ctr_id])?;
    // containerd drops the snapshot from its metadata at once and from us when it collects.
    w.env
        .wait_until("the container's snapshot to be removed", || {
            Ok(w.key_of(&ctr_id)?.is_none() && w.key_of(&pod_id)?.is_none())
        })?;
    w.cri.remove_image(&app_ref)?;
    w.cri.remove_image(&w.pause_ref)?;
    ensure!(
        w.cri.image_status(&app_ref)?.is_none(),
        "image still known after RemoveImage"
    );
    w.wait_all_gone()?;
    poll("ImageFsInfo to report nothing used", || {
        let r = w.cri.image_fs_info()?;
        let used = r
            .image_filesystems
            .first()
            .and_then(|f| f.used_bytes.as_ref())
            .map(|u| u.value);
        Ok(((used == Some(0)).then_some(()), format!("{used:?}")))
    })?;
    Ok(())
}

#[test]
fn pod_lifecycle_containerd_1_6() {
    e2e(|| lifecycle(Version::V1_6));
}

#[test]
fn pod_lifecycle_containerd_1_7() {
    e2e(|| lifecycle(Version::V1_7));
}

#[test]
fn pod_lifecycle_containerd_2_1() {
    e2e(|| lifecycle(Version::V2_1));
}

/// With snapshot annotations off (its default), containerd 2.1's CRI plugin pulls through
/// the transfer service, whose `unpack_config` names our differ; with them on (the other
/// tests) it pulls in the client, through the diff service's `default` list.
#[test]
fn pod_lifecycle_transfer_service_containerd_2_1() {
    e2e(|| lifecycle_with(World::start_with(Version::V2_1, true)?));
}

// ---------------------------------------------------------------------------------------
// 2. VOLUME images, two pods of one image at once, a pod restarted.

/// Snapshots in our store that are committed layers.
fn committed(w: &World) -> Result<BTreeSet<String>> {
    Ok(w.snapshots()?
        .into_iter()
        .filter(|i| i.kind == pb::Kind::Committed as i32)
        .map(|i| i.name)
        .collect())
}

/// Whether `path` is a mount point in container `id` (its `/proc/self/mountinfo`).
fn is_mount_point(w: &World, id: &str, path: &str) -> Result<bool> {
    let table = w.cri.exec_ok(id, &["cat", "/proc/self/mountinfo"])?;
    Ok(table.lines().any(|l| l.split(' ').nth(4) == Some(path)))
}

fn volumes_pods_restart(version: Version) -> Result<()> {
    let w = World::start(version)?;
    let mut top = LayerBuilder::new();
    top.file("etc/motd", 0o644, MOTD.as_bytes())
        .dir("data", 0o755)
        .file("data/seed", 0o644, b"seeded by the image\n");
    let spec = ImageSpec::new("cri-volumes")
        .layer(oci::busybox_base_layer()?, Compression::Gzip)
        .layer(top.finish()?, Compression::Zstd)
        .cmd(SLEEP_UNTIL_TERM)
        .volume("/data")
        .volume("/scratch");
    let (img, img_ref) = w.push(&spec, "testsuite/cri-volumes")?;
    let image_id = w.cri.pull_image(&img_ref)?;
    ensure!(
        image_id == img.config.digest,
        "PullImage returned {image_id}"
    );

    // Two pods of the image at once.
    let (pod_a, a) = w.run_pod("twin-a", 0)?;
    let (pod_b, b) = w.run_pod("twin-b", 0)?;
    let ca = w.start_container(&a, &pod_a, "app", &img_ref)?;
    let cb = w.start_container(&b, &pod_b, "app", &img_ref)?;
    let layers = committed(&w)?;
    let applied = w.applied_layers();
    for c in [&ca, &cb] {
        // containerd copied the image's /data into the volume, reading it through our mounts.
        let seed = w.cri.exec_ok(c, &["cat", "/data/seed"])?;
        ensure!(
            seed == "seeded by the image\n",
            "/data/seed in {c}: {seed:?}"
        );
        for v in ["/data", "/scratch"] {
            ensure!(
                is_mount_point(&w, c, v)?,
                "{v} is not a volume mount in {c}"
            );
        }
        ensure!(
            w.cri.exec_ok(c, &["cat", "/etc/motd"])? == MOTD,
            "motd in {c}"
        );
    }
    let (ka, kb) = (
        w.key_of(&ca)?.context("container a's snapshot")?,
        w.key_of(&cb)?.context("container b's snapshot")?,
    );
    ensure!(ka.name != kb.name, "both containers on one snapshot");
    ensure!(
        ka.parent == kb.parent,
        "parents {} and {}",
        ka.parent,
        kb.parent
    );
    // Writes stay in each pod's own volume and writable layer.
    w.cri.exec_ok(
        &ca,
        &["/bin/sh", "-c", "echo a > /data/who && echo a > /who"],
    )?;
    let other = w.cri.exec_sync(
        &cb,
        &["/bin/sh", "-c", "test ! -e /data/who && test ! -e /who"],
    )?;
    ensure!(other.exit_code == 0, "pod b sees pod a's writes");

    // Pod a restarted (kubelet's next sandbox attempt) on the image pulled before: nothing
    // is unpacked again, the container starts on a fresh writable layer.
    w.tear_down(&a, &[&ca])?;
    let (pod_a1, a1) = w.run_pod("twin-a", 1)?;
    let ca1 = w.start_container(&a1, &pod_a1, "app", &img_ref)?;
    ensure!(
        w.cri.exec_ok(&ca1, &["cat", "/data/seed"])? == "seeded by the image\n",
        "seed after restart"
    );
    let fresh = w.cri.exec_sync(
        &ca1,
        &["/bin/sh", "-c", "test ! -e /who && test ! -e /data/who"],
    )?;
    ensure!(
        fresh.exit_code == 0,
        "the restarted pod sees the old pod's writes"
    );
    ensure!(
        w.applied_layers() == applied,
        "layers applied again for the restarted pod"
    );
    ensure!(
        committed(&w)? == layers,
        "committed layers changed by the restart"
    );

    w.tear_down(&a1, &[&ca1])?;
    w.tear_down(&b, &[&cb])?;
    w.cri.remove_image(&img_ref)?;
    w.cri.remove_image(&w.pause_ref)?;
    w.wait_all_gone()
}

#[test]
fn volumes_two_pods_and_restart_containerd_1_6() {
    e2e(|| volumes_pods_restart(Version::V1_6));
}

#[test]
fn volumes_two_pods_and_restart_containerd_1_7() {
    e2e(|| volumes_pods_restart(Version::V1_7));
}

#[test]
fn volumes_two_pods_and_restart_containerd_2_1() {
    e2e(|| volumes_pods_restart(Version::V2_1));
}

// ---------------------------------------------------------------------------------------
// 3. Kubernetes image volumes (CRI `Mount.image`, containerd 2.1).

fn image_volume(version: Version) -> Result<()> {
    let w = World::start(version)?;
    let (_, app_ref) = w.push(&app_image("cri-app")?, "testsuite/cri-app")?;
    let mut content = LayerBuilder::new();
    content
        .dir("models", 0o755)
        .file("models/weights", 0o644, b"an image mounted as a volume\n");
    let vol_spec = ImageSpec::new("cri-image-volume").layer(content.finish()?, Compression::Gzip);
    let (_, vol_ref) = w.push(&vol_spec, "testsuite/cri-image-volume")?;
    w.cri.pull_image(&app_ref)?;
    // kubelet pulls an image volume's image like any other, then names it in the mount.
    let vol_id = w.cri.pull_image(&vol_ref)?;

    let (pod, pod_id) = w.run_pod("imgvol", 0)?;
    let mut cfg = container_config("app", &app_ref, &[]);
    cfg.mounts.push(cri::Mount {
        container_path: "/img".to_owned(),
        readonly: true,
        image: Some(cri::ImageSpec {
            image: vol_id.clone(),
            ..Default::default()
        }),
        ..Default::default()
    });
    fs::create_dir_all(Path::new(&pod.log_directory).join("app"))?;
    let id = w.cri.create_container(&pod_id, &cfg, &pod)?;
    w.cri.start_container(&id)?;
    let seen = w.cri.exec_ok(&id, &["cat", "/img/models/weights"])?;
    ensure!(
        seen == "an image mounted as a volume\n",
        "/img/models/weights: {seen:?}"
    );
    let write = w
        .cri
        .exec_sync(&id, &["/bin/sh", "-c", "echo x > /img/new"])?;
    ensure!(write.exit_code != 0, "the image volume is writable");

    w.tear_down(&pod_id, &[&id])?;
    w.cri.remove_image(&vol_ref)?;
    w.cri.remove_image(&app_ref)?;
    w.cri.remove_image(&w.pause_ref)?;
    w.wait_all_gone()
}

#[test]
fn image_volume_containerd_2_1() {
    e2e(|| image_volume(Version::V2_1));
}

// ---------------------------------------------------------------------------------------
// 4. A user-namespaced pod (CRI `userns_options`, containerd 2.1 with sid's runc).

/// The pod's user namespace: container ids 0..65536 are host ids 200000..265536.
const USERNS_HOST_ID: u32 = 200_000;
const USERNS_LENGTH: u32 = 65_536;

/// The user namespace kubelet asks for (`hostUsers: false`): mode POD, one range each.
fn userns() -> cri::UserNamespace {
    let m = cri::IdMapping {
        host_id: USERNS_HOST_ID,
        container_id: 0,
        length: USERNS_LENGTH,
    };
    cri::UserNamespace {
        mode: cri::NamespaceMode::Pod as i32,
        uids: vec![m],
        gids: vec![m],
    }
}

/// `options` with a pod network namespace and the user namespace of [`userns`] (kubelet
/// sends both in the pod's and in each container's config).
fn set_userns(options: &mut Option<cri::NamespaceOption>) {
    let o = options.get_or_insert_with(Default::default);
    o.network = cri::NamespaceMode::Pod as i32;
    o.userns_options = Some(userns());
}

/// A user-namespaced pod on `version` (with sid's runc if `sid_runc`): see the module docs.
fn userns_pod(version: Version, sid_runc: bool) -> Result<()> {
    let w = World::start_custom(version, |cfg, opts| {
        cfg.pod_network = Some(testsuite::containerd::sid_userspace().join("usr/lib/cni"));
        // containerd passes the mapping to a snapshotter as labels only if its config says
        // the plugin can remap; otherwise it makes a chowned copy of the image's layers.
        if version.proxy_plugin_extras() {
            opts.capabilities = vec!["rebase".into(), "remap-ids".into()];
        }
        opts.sid_runc = sid_runc;
    })?;
    let (app, app_ref) = w.push(&app_image("cri-userns")?, "testsuite/cri-userns")?;
    w.cri.pull_image(&app_ref)?;
    let layers = committed(&w)?;
    let hashes = w.env.layer_hashes()?;
    ensure!(
        hashes.len() == app.layers.len(),
        "{} layer files for {} layers",
        hashes.len(),
        app.layers.len()
    );
    let applied = w.applied_layers();

    let log_dir = w.logs.join("userns-0");
    fs::create_dir_all(log_dir.join("app"))?;
    let cgroup = format!("{}/userns-0", w.env.ctd.cgroup_parent());
    let mut pod = pod_config("userns", 0, &cgroup, &log_dir);
    set_userns(
        &mut pod
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .context("pod security context")?
            .namespace_options,
    );
    let pod_id = w.cri.run_pod(&pod)?;
    let mut cfg = container_config("app", &app_ref, &[]);
    set_userns(
        &mut cfg
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .context("container security context")?
            .namespace_options,
    );
    let id = w.cri.create_container(&pod_id, &cfg, &pod)?;
    w.cri.start_container(&id)?;

    // Inside: the pod's user namespace, and the image's root-owned files owned by root.
    // Without the mapping on the mounts they would show as the overflow id (65534).
    let map = w.cri.exec_ok(&id, &["cat", "/proc/self/uid_map"])?;
    let fields: Vec<&str> = map.split_whitespace().collect();
    if version == Version::V1_6 {
        // containerd 1.6 does not know `userns_options` and runs the pod in the node's
        // user namespace, without a word: what an operator must know.
        ensure!(
            fields == ["0", "0", "4294967295"],
            "containerd 1.6 gave the pod a user namespace: uid_map {map:?}"
        );
        w.tear_down(&pod_id, &[&id])?;
        w.cri.remove_image(&app_ref)?;
        w.cri.remove_image(&w.pause_ref)?;
        return w.wait_all_gone();
    }
    let want = [
        "0".to_string(),
        USERNS_HOST_ID.to_string(),
        USERNS_LENGTH.to_string(),
    ];
    ensure!(fields == want, "uid_map in the container: {map:?}");
    let owners = w.cri.exec_ok(
        &id,
        &["stat", "-c", "%u:%g %n", "/etc/motd", "/bin/busybox", "/"],
    )?;
    for l in owners.lines() {
        ensure!(l.starts_with("0:0 "), "owners in the container: {owners}");
    }
    ensure!(owners.lines().count() == 3, "stat printed {owners:?}");
    ensure!(w.cri.exec_ok(&id, &["cat", "/etc/motd"])? == MOTD, "motd");
    w.cri
        .exec_ok(&id, &["/bin/sh", "-c", "echo x > /made-inside"])?;

    // Outside: the container's root is the host's 200000, in its writable layer too, and
    // the rootfs is our overlay on the layers themselves (no chowned copy: no new layer, no
    // layer applied again, every layer file unchanged).
    let rootfs = w
        .env
        .ctd
        .mountinfo()?
        .into_iter()
        .find(|m| m.mount_point.ends_with(format!("{id}/rootfs")))
        .context("no rootfs mount of the container in containerd's namespace")?;
    ensure!(rootfs.fs_type == "overlay", "rootfs is {}", rootfs.fs_type);
    let upper = PathBuf::from(rootfs.super_option("upperdir").unwrap_or_default());
    ensure!(
        upper.starts_with(&w.env.root),
        "upperdir {} is not below our root",
        upper.display()
    );
    let made = fs::metadata(upper.join("made-inside"))
        .context("the file written in the container is not in its writable layer")?;
    use std::os::unix::fs::MetadataExt as _;
    ensure!(
        (made.uid(), made.gid()) == (USERNS_HOST_ID, USERNS_HOST_ID),
        "a file root made in the container is {}:{} on the host",
        made.uid(),
        made.gid()
    );
    ensure!(
        committed(&w)? == layers,
        "the pod added committed snapshots (a chowned copy): {:?}",
        committed(&w)?.difference(&layers).collect::<Vec<_>>()
    );
    ensure!(w.applied_layers() == applied, "layers applied again");
    ensure!(
        w.env.layer_hashes()? == hashes,
        "layer files changed under the pod"
    );

    w.tear_down(&pod_id, &[&id])?;
    w.cri.remove_image(&app_ref)?;
    w.cri.remove_image(&w.pause_ref)?;
    w.wait_all_gone()
}

/// containerd 2.1 starts the container only with a runc that lists `mountExtensions.idmap`
/// in `runc features` (1.2 or later): with Debian 12's 1.1.5, StartContainer fails with
/// "idmap mounts not supported".
#[test]
fn userns_pod_containerd_2_1() {
    e2e(|| userns_pod(Version::V2_1, true));
}

/// containerd 1.7 asks no idmapped mounts of runc (the snapshotter maps the layers), so
/// Debian 12's runc 1.1.5 runs the pod.
#[test]
fn userns_pod_containerd_1_7() {
    e2e(|| userns_pod(Version::V1_7, false));
}

/// containerd 1.6 ignores the user namespace options (see [`userns_pod`]).
#[test]
fn userns_options_ignored_containerd_1_6() {
    e2e(|| userns_pod(Version::V1_6, false));
}

// ---------------------------------------------------------------------------------------
// 5. What identifies the image when a layer is unpacked (for registry artifacts).

/// The labels remote snapshotters (and our artifact lookup) identify an image by.
const IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
const MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
const LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";

/// Pull an image through CRI and record what reached our daemon: the labels Prepare gave
/// each layer's snapshot (kept on the committed snapshot), and the annotation keys of each
/// Apply's descriptor (the `annotations` field of the daemon's `apply` span). Returns
/// whether Apply's descriptors carried the image reference.
fn image_identity(w: World, labels_expected: bool) -> Result<bool> {
    let (app, app_ref) = w.push(&app_image("cri-ident")?, "testsuite/cri-ident")?;
    w.cri.pull_image(&app_ref)?;
    let chain = oci::chain_ids(
        &app.layers
            .iter()
            .map(|l| l.diff_id.clone())
            .collect::<Vec<_>>(),
    );
    for (c, layer) in chain.iter().zip(&app.layers) {
        let info = w
            .key_of(c)?
            .with_context(|| format!("layer {c} is not in our store"))?;
        let got = |k: &str| info.labels.get(k).cloned();
        eprintln!(
            "{:?}: layer {} snapshot labels: {:?}",
            w.env.version,
            layer.blob.digest,
            info.labels.keys().collect::<Vec<_>>()
        );
        if labels_expected {
            ensure!(
                got(IMAGE_REF).as_deref() == Some(app_ref.as_str()),
                "{c}: {info:?}"
            );
            ensure!(
                got(MANIFEST_DIGEST).as_deref() == Some(app.manifest.digest.as_str()),
                "{c}: {info:?}"
            );
            ensure!(
                got(LAYER_DIGEST).as_deref() == Some(layer.blob.digest.as_str()),
                "{c}: {info:?}"
            );
        } else {
            ensure!(got(IMAGE_REF).is_none(), "{c}: {info:?}");
        }
    }
    let log = w.env.daemon_log(100_000);
    let applies: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("applied layer"))
        .collect();
    eprintln!("{:?}: apply lines: {applies:#?}", w.env.version);
    ensure!(
        applies.len() == app.layers.len() || !w.env.version.proxy_diff(),
        "expected one Apply per layer through our differ: {applies:?}"
    );
    Ok(!applies.is_empty() && applies.iter().all(|l| l.contains(IMAGE_REF)))
}

/// containerd 1.6: CRI gives the labels to Prepare; it has no proxy differs (its own differ
/// unpacks through our mounts), so the labels are all a differ of ours could go by.
#[test]
fn image_identity_containerd_1_6() {
    e2e(|| {
        let apply = image_identity(World::start(Version::V1_6)?, true)?;
        ensure!(!apply, "1.6 has no proxy differ");
        Ok(())
    });
}

/// containerd 1.7: the labels reach Prepare, and Apply's descriptor carries them too.
#[test]
fn image_identity_containerd_1_7() {
    e2e(|| {
        let apply = image_identity(World::start(Version::V1_7)?, true)?;
        ensure!(apply, "Apply's descriptor has no image reference");
        Ok(())
    });
}

/// containerd 2.1 with snapshot annotations on (CRI pulls in the client): as 1.7.
#[test]
fn image_identity_containerd_2_1() {
    e2e(|| {
        let apply = image_identity(World::start(Version::V2_1)?, true)?;
        ensure!(apply, "Apply's descriptor has no image reference");
        Ok(())
    });
}

/// containerd 2.1 with snapshot annotations off (its default; CRI pulls through the transfer
/// service): nothing identifies the image, so artifacts cannot be looked up.
#[test]
fn image_identity_transfer_service_containerd_2_1() {
    e2e(|| {
        let apply = image_identity(World::start_with(Version::V2_1, true)?, false)?;
        ensure!(!apply, "Apply's descriptor has an image reference");
        Ok(())
    });
}
