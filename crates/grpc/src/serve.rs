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
    // Bound under a temporary name, given its owner and mode, then renamed into place: at no
    // moment does the socket exist at `path` with the process's default mode, where anyone
    // could connect before the chmod.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(sock_err(path))?;
    let placed = rustix::fs::chown(&tmp, None, Some(rustix::fs::Gid::from_raw(gid)))
        .map_err(std::io::Error::from)
        .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(sock_err(path)(e));
    }
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
    let dir = snapshotter::diff::DirContent::new(&differ.content_root);
    let first: Box<dyn snapshotter::diff::ContentSource> = if differ.verify_content_namespace {
        Box::new(crate::content::NamespacedDir::new(dir, containerd.clone()))
    } else {
        Box::new(dir)
    };
    let content = Arc::new(snapshotter::diff::Fallback {
        first,
        second: containerd.clone(),
    });
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(SnapshotsService::new(core.clone())))
        .add_service(DiffServer::new(DiffService::new(core, content, containerd)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use super::*;

    /// The socket appears at its path already with its mode and group, nothing else is left
    /// in the directory, it answers, and a second bind while it is served is refused.
    #[tokio::test]
    async fn socket_is_placed_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/s.sock");
        let gid = rustix::process::getgid().as_raw();
        let listener = bind(&path, 0o600, gid).await.unwrap();
        let md = std::fs::symlink_metadata(&path).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.mode() & 0o7777, 0o600);
        assert_eq!(md.gid(), gid);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("s.sock")]);
        let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        tokio::net::UnixStream::connect(&path).await.unwrap();
        accept.await.unwrap().unwrap();
        // The listener is gone now: the socket is stale and gets replaced.
        let again = bind(&path, 0o660, gid).await.unwrap();
        let md = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o660);
        let e = bind(&path, 0o660, gid).await.unwrap_err();
        assert!(matches!(e, ServeError::InUse(_)), "{e}");
        drop(again);
    }
}
