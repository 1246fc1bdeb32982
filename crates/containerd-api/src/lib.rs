//! Generated Rust code for the parts of containerd's gRPC API that
//! erofs-snapshotter serves or calls: the snapshots and diff services (served
//! by the proxy plugin) and the content and leases services (called by the differ), plus
//! the shared `containerd.types` messages; and a client of the Kubernetes CRI API
//! ([`runtime::v1`]) for the tests that play kubelet.
//!
//! This crate holds generated code only. The containerd `.proto` files under `proto/`
//! are our own, written to match containerd's wire API (package, message,
//! field and enum names, field numbers and types); the CRI one is k8s.io/cri-api's,
//! vendored with its licence header; `build.rs` compiles them
//! with `protox` and `tonic-prost-build`. The module tree mirrors the
//! protobuf packages so that generated cross-package references resolve, e.g.
//! [`containerd::services::snapshots::v1::snapshots_server::Snapshots`].
//!
//! `tonic`, `prost` and `prost_types` are re-exported so dependents build
//! against the exact versions the generated code uses.

pub use prost;
pub use prost_types;
pub use tonic;

/// Protobuf package `containerd`.
pub mod containerd {
    /// Protobuf package `containerd.types`: `Mount`, `Descriptor`.
    pub mod types {
        // Generated code: prost/tonic emit no docs for undocumented items.
        #![allow(missing_docs)]
        tonic::include_proto!("containerd.types");
    }

    /// Protobuf packages `containerd.services.*`.
    pub mod services {
        /// Snapshots service.
        pub mod snapshots {
            /// Protobuf package `containerd.services.snapshots.v1`.
            pub mod v1 {
                // Generated code: prost/tonic emit no docs for undocumented items.
                #![allow(missing_docs)]
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }

        /// Diff service.
        pub mod diff {
            /// Protobuf package `containerd.services.diff.v1`.
            pub mod v1 {
                // Generated code: prost/tonic emit no docs for undocumented items.
                #![allow(missing_docs)]
                tonic::include_proto!("containerd.services.diff.v1");
            }
        }

        /// Leases service.
        pub mod leases {
            /// Protobuf package `containerd.services.leases.v1`.
            pub mod v1 {
                // Generated code: prost/tonic emit no docs for undocumented items.
                #![allow(missing_docs)]
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }

        /// Content service.
        pub mod content {
            /// Protobuf package `containerd.services.content.v1`.
            pub mod v1 {
                // Generated code: prost/tonic emit no docs for undocumented items.
                #![allow(missing_docs)]
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
    }
}

/// Protobuf package `runtime.v1`: the Kubernetes Container Runtime Interface (clients of
/// `RuntimeService` and `ImageService`), from k8s.io/cri-api.
pub mod runtime {
    /// Protobuf package `runtime.v1`.
    pub mod v1 {
        // Generated code: prost/tonic emit no docs for undocumented items.
        #![allow(missing_docs)]
        #![allow(clippy::doc_lazy_continuation, clippy::doc_overindented_list_items)]
        tonic::include_proto!("runtime.v1");
    }
}
