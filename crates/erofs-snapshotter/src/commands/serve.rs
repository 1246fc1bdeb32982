//! `serve`: the daemon.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use snapshotter::mount::SystemMounter;
use snapshotter::{Config, Snapshotter};

use crate::cli::ServeArgs;
use crate::metrics::{self, Metrics};

/// Tell a service manager that started us with `Type=notify` (systemd's `$NOTIFY_SOCKET`) how
/// we are: `READY=1` once the sockets accept connections, so containerd, ordered after us,
/// never starts before them. Without the variable, nothing to do; a failure only loses the
/// notification (systemd then times the start out, which the log explains).
fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| {
        use std::os::unix::ffi::OsStrExt;
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket (systemd's default is a path under /run/systemd).
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)
            }
            None => sock.send_to(state.as_bytes(), &path),
        }
    })();
    if let Err(e) = sent {
        tracing::warn!(socket = ?path, error = %e, state, "notifying the service manager");
    }
}

/// Install SIGTERM/SIGINT handlers now (before the socket exists, so no signal can arrive
/// unhandled) and return a future that resolves on the first of them.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
            _ = int.recv() => tracing::info!("SIGINT: finishing in-flight requests"),
        }
    })
}

/// `shutdown`, telling the service manager when it comes.
async fn notify_stopping(shutdown: impl std::future::Future<Output = ()>) {
    shutdown.await;
    notify("STOPPING=1");
}

pub fn run(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let cfg = match &a.config {
        Some(p) => Config::load(p)?,
        None => {
            let c = Config::default();
            c.validate()?;
            c
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("erofs-snapshotter")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let shutdown = shutdown_signal().context("installing signal handlers")?;
        let open_cfg = cfg.clone();
        let core = tokio::task::spawn_blocking(move || {
            Snapshotter::open(open_cfg, Arc::new(SystemMounter::default()))
        })
        .await?
        .with_context(|| format!("opening the snapshotter at {}", cfg.root_path.display()))?;
        let core = Arc::new(core);
        if cfg.artifacts.enabled {
            core.set_artifact_source(Arc::new(
                snapshotter::artifacts::registry::RegistrySource::new(&cfg),
            ));
            tracing::info!(
                hosts_dir = %cfg.artifacts.hosts_dir.display(),
                fetch_timeout = %cfg.artifacts.fetch_timeout,
                require_signed_root_hash = cfg.artifacts.require_signed_root_hash,
                "layer artifacts are fetched from the registry"
            );
        }
        // The metrics endpoint first: its observer sees every request from the first on.
        let scrapes = match cfg.metrics_address() {
            Some(addr) => {
                let m = Metrics::new(&core);
                let l = metrics::bind(&addr, cfg.socket_mode_bits(), cfg.socket_gid).await?;
                tracing::info!(metrics = %cfg.metrics.address, "serving metrics (GET /metrics)");
                Some((tokio::spawn(metrics::serve(l, m)), addr))
            }
            None => None,
        };
        let listener =
            erofs_grpc::serve::bind(&cfg.address, cfg.socket_mode_bits(), cfg.socket_gid).await?;
        tracing::info!(
            socket = %cfg.address.display(),
            root = %cfg.root_path.display(),
            mount_mode = ?cfg.mount_mode,
            fsverity = ?core.verity_mode(),
            capabilities = ?core.capabilities(),
            "serving containerd.services.snapshots.v1.Snapshots"
        );
        notify("READY=1");
        let served = erofs_grpc::serve(core.clone(), listener, notify_stopping(shutdown)).await;
        if let Some((task, addr)) = scrapes {
            task.abort();
            let _ = task.await;
            if let snapshotter::config::MetricsAddress::Unix(p) = addr {
                let _ = std::fs::remove_file(p);
            }
        }
        served?;
        let _ = std::fs::remove_file(&cfg.address);
        // Dropping the last reference closes the store.
        drop(core);
        tracing::info!("stopped");
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
