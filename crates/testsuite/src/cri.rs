//! containerd's CRI plugin in a private instance, and a client that plays kubelet.
//!
//! [`CriConfig`] in [`ContainerdOpts::cri`](crate::ContainerdOpts::cri) keeps the CRI plugins
//! enabled (the harness disables them otherwise) and configures them for the tests: a
//! snapshotter (ours), a sandbox ("pause") image the test built and pushed to a
//! [`Registry`](crate::Registry), plain-HTTP registries (a `hosts.toml` per registry below
//! the instance's base directory), a short stats period, and nothing that touches the host:
//! CNI directories below the base directory, no AppArmor profile loading, no CDI, and
//! `restrict_oom_score_adj` (a sandbox's `oom_score_adj` cannot be lowered on these
//! machines). Pods run with host networking, so no CNI plugin is needed, unless
//! [`CriConfig::pod_network`] gives them a network of their own.
//!
//! [`CriClient`] calls the `runtime.v1` `RuntimeService` and `ImageService` on containerd's
//! gRPC socket, blocking, with a deadline on every call, and builds the pod and container
//! configurations kubelet would send ([`pod_config`], [`container_config`]).
//!
//! Per version (the config schema changed in 2.0):
//! - 1.6 and 1.7 (`version = 2`): one plugin, `io.containerd.grpc.v1.cri`, with
//!   `[...containerd] snapshotter`; it pulls in the client (the diff service's differs unpack).
//! - 2.1 (`version = 3`): `io.containerd.cri.v1.images` (snapshotter, pinned sandbox image,
//!   registry), `io.containerd.cri.v1.runtime`, the `io.containerd.grpc.v1.cri` server and the
//!   pod sandbox controller; it pulls through the transfer service (its `unpack_config`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use containerd_api::runtime::v1 as cri;
use cri::image_service_client::ImageServiceClient;
use cri::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use crate::Version;

/// The containerd namespace the CRI plugin works in.
pub const NAMESPACE: &str = "k8s.io";

/// How containerd's CRI plugin is configured. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriConfig {
    /// The snapshotter for images and containers.
    pub snapshotter: String,
    /// The sandbox ("pause") image reference.
    pub sandbox_image: String,
    /// Registries (`host:port`) reached over plain HTTP.
    pub plain_http_registries: Vec<String>,
    /// `stats_collect_period` in seconds: how often the CRI plugin asks the snapshotter for
    /// the usage behind `ImageFsInfo` and `ContainerStats` (containerd's default is 10).
    pub stats_collect_period: u32,
    /// `disable_snapshot_annotations` (default false: the snapshotter gets the image
    /// reference and layer digest labels, as remote snapshotters need).
    pub disable_snapshot_annotations: bool,
    /// A pod network for pods that do not use the node's (user-namespaced pods cannot): the
    /// directory holding the CNI plugins `loopback`, `tap` and `static` (sid's
    /// `containernetworking-plugins` 1.9, for its `tap`; they need glibc 2.34, which Debian
    /// 12 has). containerd's namespace gets a private tmpfs on
    /// `/var/lib/cni` (libcni's result cache, which no config moves).
    /// The network gives each pod a tap device `eth0` with a fixed address ([`POD_ADDRESS`])
    /// inside the pod's own network namespace: containerd wants an address on `eth0`, and
    /// nothing on the node (no bridge, no veth, no IPAM state) is touched. A tap rather than
    /// a `dummy` device: the test machines' kernels have no dummy driver (`operation not
    /// supported`), and tun is everywhere.
    /// `None` (the default): pods run with host networking only.
    pub pod_network: Option<PathBuf>,
}

/// The address [`CriConfig::pod_network`] gives every pod.
pub const POD_ADDRESS: &str = "10.88.77.2/24";

impl CriConfig {
    /// CRI on `snapshotter` with `sandbox_image`, a 1 s stats period, snapshot annotations on.
    pub fn new(snapshotter: &str, sandbox_image: &str) -> Self {
        CriConfig {
            snapshotter: snapshotter.to_owned(),
            sandbox_image: sandbox_image.to_owned(),
            plain_http_registries: Vec::new(),
            stats_collect_period: 1,
            disable_snapshot_annotations: false,
            pod_network: None,
        }
    }

    /// Adds a plain-HTTP registry (`host:port`, e.g. [`Registry::host`](crate::Registry::host)).
    pub fn plain_http(mut self, host: &str) -> Self {
        self.plain_http_registries.push(host.to_owned());
        self
    }
}

/// Whether the CRI plugin of `version` takes the image filesystem (`ImageFsInfo`'s
/// mountpoint, which kubelet stats for capacity) from the snapshotter plugin's
/// `exports.root`: 1.7 (Debian 13's 1.7.24) and 2.1 do, and without the export name
/// `<containerd root>/io.containerd.snapshotter.v1.<snapshotter>` (a directory a proxy
/// snapshotter does not have); 1.6 has no proxy plugin exports and always names that
/// directory, so there a proxy snapshotter's root must be it.
pub fn imagefs_from_exports(version: Version) -> bool {
    version != Version::V1_6
}

/// The CRI plugins of `version`, which the harness disables unless CRI is configured.
pub fn plugins(version: Version) -> &'static [&'static str] {
    match version {
        Version::V1_6 | Version::V1_7 => &["io.containerd.grpc.v1.cri"],
        Version::V2_1 => &[
            "io.containerd.grpc.v1.cri",
            "io.containerd.cri.v1.images",
            "io.containerd.cri.v1.runtime",
            "io.containerd.podsandbox.controller.v1.podsandbox",
            "io.containerd.grpc.v1.sandbox-controllers",
        ],
    }
}

/// Directory of the per-registry `hosts.toml` files below `base`.
fn certs_dir(base: &Path) -> PathBuf {
    base.join("cri/certs.d")
}

/// Writes the files the CRI config names (`hosts.toml` per registry, empty CNI directories)
/// below `base`.
pub fn write_files(cfg: &CriConfig, base: &Path) -> Result<()> {
    for d in ["cri/cni/bin", "cri/cni/conf"] {
        fs::create_dir_all(base.join(d))?;
    }
    if let Some(plugins) = &cfg.pod_network {
        for p in ["loopback", "tap", "static"] {
            if !plugins.join(p).is_file() {
                bail!(
                    "the CNI plugin {p} is not in {}; run scripts/setup",
                    plugins.display()
                );
            }
        }
        fs::write(
            base.join("cri/cni/conf/10-testsuite.conflist"),
            format!(
                r#"{{"cniVersion": "1.0.0", "name": "testsuite", "plugins": [{{"type": "tap", "ipam": {{"type": "static", "addresses": [{{"address": "{POD_ADDRESS}"}}]}}}}]}}"#
            ),
        )?;
    }
    for host in &cfg.plain_http_registries {
        if host.contains('/') || host.contains("..") || host.is_empty() {
            bail!("bad registry host {host:?}");
        }
        let dir = certs_dir(base).join(host);
        fs::create_dir_all(&dir)?;
        fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
    }
    Ok(())
}

/// The CRI part of the containerd config for `version`, with its paths below `base`.
pub fn render(version: Version, cfg: &CriConfig, base: &Path) -> Result<String> {
    let q = |s: &str| format!("{s:?}");
    let qp = |p: PathBuf| format!("{:?}", p.to_string_lossy());
    let certs = qp(certs_dir(base));
    let cni_bin = qp(cfg
        .pod_network
        .clone()
        .unwrap_or_else(|| base.join("cri/cni/bin")));
    let cni_conf = qp(base.join("cri/cni/conf"));
    let mut t = String::new();
    match version {
        Version::V1_6 | Version::V1_7 => {
            let p = "[plugins.\"io.containerd.grpc.v1.cri\"";
            writeln!(t, "{p}]")?;
            writeln!(t, "  sandbox_image = {}", q(&cfg.sandbox_image))?;
            writeln!(t, "  stats_collect_period = {}", cfg.stats_collect_period)?;
            writeln!(t, "  restrict_oom_score_adj = true")?;
            writeln!(t, "  disable_apparmor = true")?;
            writeln!(t, "  enable_selinux = false")?;
            writeln!(t, "  disable_tcp_service = true")?;
            writeln!(t, "  stream_server_address = \"127.0.0.1\"")?;
            writeln!(t, "  stream_server_port = \"0\"")?;
            if version == Version::V1_7 {
                writeln!(t, "  enable_cdi = false")?;
            }
            writeln!(t, "{p}.containerd]")?;
            writeln!(t, "  snapshotter = {}", q(&cfg.snapshotter))?;
            writeln!(
                t,
                "  disable_snapshot_annotations = {}",
                cfg.disable_snapshot_annotations
            )?;
            writeln!(t, "  default_runtime_name = \"runc\"")?;
            writeln!(t, "{p}.containerd.runtimes.runc]")?;
            writeln!(t, "  runtime_type = \"io.containerd.runc.v2\"")?;
            writeln!(t, "{p}.cni]")?;
            writeln!(t, "  bin_dir = {cni_bin}\n  conf_dir = {cni_conf}")?;
            writeln!(t, "{p}.registry]")?;
            writeln!(t, "  config_path = {certs}")?;
        }
        Version::V2_1 => {
            let i = "[plugins.\"io.containerd.cri.v1.images\"";
            writeln!(t, "{i}]")?;
            writeln!(t, "  snapshotter = {}", q(&cfg.snapshotter))?;
            writeln!(
                t,
                "  disable_snapshot_annotations = {}",
                cfg.disable_snapshot_annotations
            )?;
            writeln!(t, "  stats_collect_period = {}", cfg.stats_collect_period)?;
            writeln!(t, "{i}.pinned_images]")?;
            writeln!(t, "  sandbox = {}", q(&cfg.sandbox_image))?;
            writeln!(t, "{i}.registry]")?;
            writeln!(t, "  config_path = {certs}")?;
            let r = "[plugins.\"io.containerd.cri.v1.runtime\"";
            writeln!(t, "{r}]")?;
            writeln!(t, "  restrict_oom_score_adj = true")?;
            writeln!(t, "  disable_apparmor = true")?;
            writeln!(t, "  enable_selinux = false")?;
            writeln!(t, "  enable_cdi = false")?;
            writeln!(t, "{r}.containerd]")?;
            writeln!(t, "  default_runtime_name = \"runc\"")?;
            writeln!(t, "{r}.containerd.runtimes.runc]")?;
            writeln!(t, "  runtime_type = \"io.containerd.runc.v2\"")?;
            writeln!(t, "{r}.cni]")?;
            writeln!(t, "  bin_dirs = [{cni_bin}]\n  conf_dir = {cni_conf}")?;
            writeln!(t, "[plugins.\"io.containerd.grpc.v1.cri\"]")?;
            writeln!(t, "  disable_tcp_service = true")?;
            writeln!(t, "  stream_server_address = \"127.0.0.1\"")?;
            writeln!(t, "  stream_server_port = \"0\"")?;
        }
    }
    Ok(t)
}

/// `NamespaceMode` values.
pub use cri::NamespaceMode;

/// A pod sandbox config as kubelet sends it for a host-network pod `name` (namespace
/// `default`, uid derived from the name, attempt `attempt`) whose cgroups go below
/// `cgroup_parent` and whose container logs go below `log_directory`.
pub fn pod_config(
    name: &str,
    attempt: u32,
    cgroup_parent: &str,
    log_directory: &Path,
) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            namespace: "default".to_owned(),
            attempt,
        }),
        hostname: String::new(),
        log_directory: log_directory.to_string_lossy().into_owned(),
        labels: HashMap::from([("app".to_owned(), name.to_owned())]),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.to_owned(),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container config for container `name` of `image` (the image's own entrypoint and
/// command unless `command` is given), logging to `NAME/0.log` below the pod's log directory.
pub fn container_config(name: &str, image: &str, command: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn image_spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

/// A blocking client of containerd's CRI services (what kubelet calls), with its own tokio
/// runtime and a deadline on every call.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    timeout: Duration,
}

impl std::fmt::Debug for CriClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriClient").finish_non_exhaustive()
    }
}

impl CriClient {
    /// Connects to containerd's gRPC socket; calls get a 120 s deadline.
    pub fn connect(socket: &Path) -> Result<CriClient> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ch = rt.block_on(crate::client::connect(socket))?;
        Ok(CriClient {
            rt,
            runtime: RuntimeServiceClient::new(ch.clone()),
            images: ImageServiceClient::new(ch),
            timeout: Duration::from_secs(120),
        })
    }

    /// Runs `f` on the client's runtime (e.g. calls of a [`crate::client::Client`]).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn req<T>(&self, m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.set_timeout(self.timeout);
        r
    }

    /// `Version`.
    pub fn version(&self) -> Result<cri::VersionResponse> {
        let r = self.req(cri::VersionRequest {
            version: "v1".into(),
        });
        Ok(self
            .rt
            .block_on(self.runtime.clone().version(r))
            .context("CRI Version")?
            .into_inner())
    }

    /// `Status` (verbose: the CRI plugin's config in `info`).
    pub fn status(&self) -> Result<cri::StatusResponse> {
        let r = self.req(cri::StatusRequest { verbose: true });
        Ok(self
            .rt
            .block_on(self.runtime.clone().status(r))
            .context("CRI Status")?
            .into_inner())
    }

    /// `PullImage`: the image reference containerd returns (the image id, `sha256:` of the
    /// config).
    pub fn pull_image(&self, image: &str) -> Result<String> {
        let r = self.req(cri::PullImageRequest {
            image: image_spec(image),
            ..Default::default()
        });
        Ok(self
            .rt
            .block_on(self.images.clone().pull_image(r))
            .with_context(|| format!("CRI PullImage {image}"))?
            .into_inner()
            .image_ref)
    }

    /// `ImageStatus`: `None` if containerd does not know the image.
    pub fn image_status(&self, image: &str) -> Result<Option<cri::Image>> {
        let r = self.req(cri::ImageStatusRequest {
            image: image_spec(image),
            verbose: false,
        });
        Ok(self
            .rt
            .block_on(self.images.clone().image_status(r))
            .with_context(|| format!("CRI ImageStatus {image}"))?
            .into_inner()
            .image)
    }

    /// `ListImages`.
    pub fn list_images(&self) -> Result<Vec<cri::Image>> {
        let r = self.req(cri::ListImagesRequest { filter: None });
        Ok(self
            .rt
            .block_on(self.images.clone().list_images(r))
            .context("CRI ListImages")?
            .into_inner()
            .images)
    }

    /// `ImageFsInfo`.
    pub fn image_fs_info(&self) -> Result<cri::ImageFsInfoResponse> {
        let r = self.req(cri::ImageFsInfoRequest {});
        Ok(self
            .rt
            .block_on(self.images.clone().image_fs_info(r))
            .context("CRI ImageFsInfo")?
            .into_inner())
    }

    /// `RemoveImage`.
    pub fn remove_image(&self, image: &str) -> Result<()> {
        let r = self.req(cri::RemoveImageRequest {
            image: image_spec(image),
        });
        self.rt
            .block_on(self.images.clone().remove_image(r))
            .with_context(|| format!("CRI RemoveImage {image}"))?;
        Ok(())
    }

    /// `RunPodSandbox` (default runtime handler): the sandbox id.
    pub fn run_pod(&self, config: &cri::PodSandboxConfig) -> Result<String> {
        let r = self.req(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        });
        Ok(self
            .rt
            .block_on(self.runtime.clone().run_pod_sandbox(r))
            .context("CRI RunPodSandbox")?
            .into_inner()
            .pod_sandbox_id)
    }

    /// `PodSandboxStatus`.
    pub fn pod_status(&self, id: &str) -> Result<cri::PodSandboxStatus> {
        let r = self.req(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: false,
        });
        self.rt
            .block_on(self.runtime.clone().pod_sandbox_status(r))
            .with_context(|| format!("CRI PodSandboxStatus {id}"))?
            .into_inner()
            .status
            .context("PodSandboxStatus without a status")
    }

    /// `StopPodSandbox`.
    pub fn stop_pod(&self, id: &str) -> Result<()> {
        let r = self.req(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        });
        self.rt
            .block_on(self.runtime.clone().stop_pod_sandbox(r))
            .with_context(|| format!("CRI StopPodSandbox {id}"))?;
        Ok(())
    }

    /// `RemovePodSandbox`.
    pub fn remove_pod(&self, id: &str) -> Result<()> {
        let r = self.req(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        });
        self.rt
            .block_on(self.runtime.clone().remove_pod_sandbox(r))
            .with_context(|| format!("CRI RemovePodSandbox {id}"))?;
        Ok(())
    }

    /// `CreateContainer` in pod `pod_id` (created from `pod`): the container id.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: &cri::ContainerConfig,
        pod: &cri::PodSandboxConfig,
    ) -> Result<String> {
        let r = self.req(cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_owned(),
            config: Some(config.clone()),
            sandbox_config: Some(pod.clone()),
        });
        Ok(self
            .rt
            .block_on(self.runtime.clone().create_container(r))
            .context("CRI CreateContainer")?
            .into_inner()
            .container_id)
    }

    /// `StartContainer`.
    pub fn start_container(&self, id: &str) -> Result<()> {
        let r = self.req(cri::StartContainerRequest {
            container_id: id.to_owned(),
        });
        self.rt
            .block_on(self.runtime.clone().start_container(r))
            .with_context(|| format!("CRI StartContainer {id}"))?;
        Ok(())
    }

    /// `ContainerStatus`.
    pub fn container_status(&self, id: &str) -> Result<cri::ContainerStatus> {
        let r = self.req(cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        });
        self.rt
            .block_on(self.runtime.clone().container_status(r))
            .with_context(|| format!("CRI ContainerStatus {id}"))?
            .into_inner()
            .status
            .context("ContainerStatus without a status")
    }

    /// `ExecSync` of `cmd` in container `id` (10 s timeout inside containerd).
    pub fn exec_sync(&self, id: &str, cmd: &[&str]) -> Result<cri::ExecSyncResponse> {
        let r = self.req(cri::ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 10,
        });
        Ok(self
            .rt
            .block_on(self.runtime.clone().exec_sync(r))
            .with_context(|| format!("CRI ExecSync {id} {cmd:?}"))?
            .into_inner())
    }

    /// [`exec_sync`](Self::exec_sync) that must exit 0: its stdout.
    pub fn exec_ok(&self, id: &str, cmd: &[&str]) -> Result<String> {
        let r = self.exec_sync(id, cmd)?;
        if r.exit_code != 0 {
            bail!(
                "ExecSync {cmd:?} in {id}: exit {}: {}{}",
                r.exit_code,
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&r.stdout).into_owned())
    }

    /// `ContainerStats`.
    pub fn container_stats(&self, id: &str) -> Result<cri::ContainerStats> {
        let r = self.req(cri::ContainerStatsRequest {
            container_id: id.to_owned(),
        });
        self.rt
            .block_on(self.runtime.clone().container_stats(r))
            .with_context(|| format!("CRI ContainerStats {id}"))?
            .into_inner()
            .stats
            .context("ContainerStats without stats")
    }

    /// `StopContainer` with `timeout` seconds between the stop signal and SIGKILL.
    pub fn stop_container(&self, id: &str, timeout: i64) -> Result<()> {
        let r = self.req(cri::StopContainerRequest {
            container_id: id.to_owned(),
            timeout,
        });
        self.rt
            .block_on(self.runtime.clone().stop_container(r))
            .with_context(|| format!("CRI StopContainer {id}"))?;
        Ok(())
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        let r = self.req(cri::RemoveContainerRequest {
            container_id: id.to_owned(),
        });
        self.rt
            .block_on(self.runtime.clone().remove_container(r))
            .with_context(|| format!("CRI RemoveContainer {id}"))?;
        Ok(())
    }

    /// Waits until `Version` answers (the CRI plugin serves once it has initialised).
    pub fn wait_ready(&self, timeout: Duration) -> Result<cri::VersionResponse> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.version() {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}
