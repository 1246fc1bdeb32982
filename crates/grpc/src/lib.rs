//! gRPC adapters: containerd's `Snapshots` and `Diff` services over [`snapshotter`], served on
//! a Unix socket, and clients of containerd's `Content` and `Leases` services for the differ.
//!
//! Every method converts the request, calls the core on a blocking thread with a
//! cancellation token for its deadline ([`deadline`]), maps the error to the status code
//! containerd expects, and converts the reply, inside one tracing span per request
//! ([`request`]). There is no logic here.

pub mod content;
pub mod convert;
pub mod deadline;
pub mod diff;
pub mod lease;
pub mod probe;
pub mod request;
pub mod serve;
pub mod snapshots;
pub mod status;

pub use serve::{ServeError, serve};
