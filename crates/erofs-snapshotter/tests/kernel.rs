//! Issue 12: what the host's kernel cannot show, proven on the kernels operators run, inside
//! the guests `scripts/vm-test` boots ([`testsuite::vm`]): the daemon over its socket, every
//! mount for real, the snapshotter root on the guest's scratch disk (ext4 with the `verity`
//! feature, on `/tmp`).
//!
//! Not part of `cargo test` (`test = false`): these tests need kernel features the host lacks
//! (loop-device fallback before Linux 6.12, kernel fs-verity, dm-verity). Where the guest's
//! kernel lacks one, the test fails and names it: nothing here skips.
//!
//! - [`loops`]: EROFS layers through loop devices (Linux < 6.12), one per layer, read-only,
//!   released on Remove and after `kill -9` + restart; writable ext4 layers likewise.
//! - [`fsverity`]: kernel fs-verity on every committed layer, digests equal to `fsverity
//!   measure` and `fsverity digest`, a byte flipped underneath (on the block device) fails
//!   reads with EIO and the next mount.
//! - [`dmverity`]: a dm-verity device per layer (`dmverity_mode = "on"`), unique names,
//!   removed on Remove and after `kill -9` + restart; a flipped byte fails reads with EIO.
//! - [`artifacts`]: registry artifacts with a signed root and `dmverity_mode = "on"`: the
//!   tree is checked against its root only, and dm-verity refuses data it does not describe.
//! - [`flatten`]: a flattened chain (`max_unmerged_layers`) under kernel fs-verity and under
//!   dm-verity: fsmeta protected as a layer, its `device=` layers as when stacked.
//! - [`containerd`]: a container from a multi-layer image with whiteouts through containerd
//!   1.6, a container committed, the daemon killed and restarted, containerd restarted, the
//!   layers' loop devices counted all along and none left at the end.

#[path = "kernel/artifacts.rs"]
mod artifacts;
#[path = "integrity/common.rs"]
#[allow(dead_code)]
mod common;
#[path = "kernel/containerd.rs"]
mod containerd;
#[path = "kernel/dmverity.rs"]
mod dmverity;
#[path = "kernel/flatten.rs"]
mod flatten;
#[path = "kernel/fsverity.rs"]
mod fsverity;
#[path = "containerd_e2e/images.rs"]
#[allow(dead_code)]
mod images;
#[path = "kernel/loops.rs"]
mod loops;
// Only some of the ways to spoil artifacts are used here.
#[allow(dead_code)]
#[path = "artifacts_node/producer.rs"]
mod producer;
#[path = "kernel/sys.rs"]
mod sys;
