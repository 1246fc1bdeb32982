//! A health probe of a running daemon, for service managers and Kubernetes probes
//! (`erofs-snapshotter health`): one Snapshots `Stat` of a key nobody uses, over the socket,
//! within a time limit. The daemon is healthy when it answers, `NotFound` being the expected
//! answer: the call went through the gRPC server, a blocking-pool thread and a read of the
//! store, which is what every containerd request needs too.

use std::path::Path;
use std::time::{Duration, Instant};

use containerd_api::containerd::services::snapshots::v1 as pb;
use containerd_api::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use tonic::Code;
use tonic::transport::{Endpoint, Uri};

/// The key probed (a `Stat` of it is read-only whatever it names).
pub const PROBE_KEY: &str = "erofs-snapshotter-health-probe";

/// Why the daemon is not healthy.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing accepted a connection on the socket.
    #[error("connecting to {socket}: {source}")]
    Connect {
        /// The socket.
        socket: String,
        /// The error.
        #[source]
        source: tonic::transport::Error,
    },
    /// It did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// It answered with an error other than `NotFound`.
    #[error("the daemon answered {code:?}: {message}")]
    Failed {
        /// The status code.
        code: Code,
        /// Its message.
        message: String,
    },
}

/// Probe the daemon on `socket`; on success, how long the answer took.
pub async fn probe(socket: &Path, timeout: Duration) -> Result<Duration, ProbeError> {
    let start = Instant::now();
    let path = socket.to_path_buf();
    let work = async {
        let ch = Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .map_err(|source| ProbeError::Connect {
                socket: socket.display().to_string(),
                source,
            })?;
        let req = tonic::Request::new(pb::StatSnapshotRequest {
            snapshotter: String::new(),
            key: PROBE_KEY.into(),
        });
        // No grpc-timeout: the timeout below drops the call, which cancels it in the daemon.
        match SnapshotsClient::new(ch).stat(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(ProbeError::Failed {
                code: s.code(),
                message: s.message().to_string(),
            }),
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r.map(|()| start.elapsed()),
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}
