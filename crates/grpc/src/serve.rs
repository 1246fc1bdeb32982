//! The Unix-socket server.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use containerd_api::containerd::services::diff::v1::diff_server::DiffServer;
use containerd_api::containerd::services::snapshots::v1::snapshots_server::SnapshotsServer;
use snapshotter::Snapshotter;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::content::GrpcContent;
use crate::diff::DiffService;
use crate::snapshots::SnapshotsService;

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another process is serving on the socket.
    #[error("{0} is in use by another server")]
    InUse(String),
    /// Socket setup failed.
    #[error("socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The server failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

fn sock_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |source| ServeError::Socket {
        path: path.display().to_string(),
        source,
    }
}

/// Bind the socket: replace a stale one (nobody answering), refuse one in use, and give it
/// `mode` and group `gid` (root-only by default).
pub async fn bind(path: &Path, mode: u32, gid: u32) -> Result<UnixListener, ServeError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err(path))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServeError::InUse(path.display().to_string()));
        }
        tracing::info!(socket = %path.display(), "replacing stale socket");
        std::fs::remove_file(path).map_err(sock_err(path))?;
    }
    let listener = UnixListener::bind(path).map_err(sock_err(path))?;
    rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
        .map_err(|e| sock_err(path)(e.into()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(sock_err(path))?;
    Ok(listener)
}

/// Serve the Snapshots and Diff services on `listener` until `shutdown` resolves; in-flight
/// requests finish first.
pub async fn serve(
    core: Arc<Snapshotter>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let differ = &core.config().differ;
    let containerd = Arc::new(GrpcContent::new(
        differ.containerd_address.clone(),
        tokio::runtime::Handle::current(),
    ));
    let content = Arc::new(snapshotter::diff::Fallback {
        first: snapshotter::diff::DirContent::new(&differ.content_root),
        second: containerd.clone(),
    });
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(SnapshotsService::new(core.clone())))
        .add_service(DiffServer::new(DiffService::new(core, content, containerd)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
