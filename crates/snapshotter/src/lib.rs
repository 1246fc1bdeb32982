//! containerd's EROFS snapshotter and differ, as a library: the snapshot lifecycle over an
//! ACID metadata store, upstream's on-disk layout, layer conversion with our own EROFS
//! builder, and the mounts containerd is handed. It knows nothing of gRPC; the `erofs-grpc`
//! crate adapts it.

pub mod artifacts;
pub mod cancel;
pub mod config;
pub mod diff;
pub mod error;
pub mod failpoint;
pub mod filter;
pub mod integrity;
pub mod layout;
pub mod mkfs;
pub mod mount;
pub mod snapshot;
pub mod stats;
pub mod store;
pub mod writeback;

pub use cancel::Cancel;
pub use config::Config;
pub use error::{Error, ErrorKind, Result};
pub use mount::Mount;
pub use snapshot::{Info, Snapshotter, Usage};
pub use store::Kind;
