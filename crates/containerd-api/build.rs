//! Compiles our containerd API .proto files into Rust with protox (pure
//! Rust; no protoc binary is needed) and tonic-prost-build, and the vendored
//! Kubernetes CRI API (`runtime.v1`, client only: the CRI end-to-end tests play kubelet).

use std::error::Error;

const ROOT: &str = "proto";
const PREFIX: &str = "github.com/containerd/containerd/api";
const FILES: &[&str] = &[
    "types/mount.proto",
    "types/descriptor.proto",
    "services/snapshots/v1/snapshots.proto",
    "services/diff/v1/diff.proto",
    "services/content/v1/content.proto",
    "services/leases/v1/leases.proto",
];
/// k8s.io/cri-api's `api.proto` (Apache-2.0, vendored; see its header).
const CRI: &str = "k8s.io/cri-api/pkg/apis/runtime/v1/api.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={ROOT}");
    let files: Vec<String> = FILES
        .iter()
        .map(|f| format!("{ROOT}/{PREFIX}/{f}"))
        .collect();
    let fds = protox::compile(&files, [ROOT])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    let cri = protox::compile([format!("{ROOT}/{CRI}")], [ROOT])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(cri)?;
    Ok(())
}
