//! Privileged integration tests: images built from real tars and directories, mounted by the
//! kernel, compared with their source, and checked by fsck.erofs 1.9 and 1.5.
//!
//! These run as root with erofs and overlayfs (this project's machines and CI). The oracle
//! tools come from `scripts/setup`; a missing tool fails the test with a message saying so.

#[path = "image/common.rs"]
mod common;

#[path = "image/bombs.rs"]
mod bombs;
#[path = "image/checker.rs"]
mod checker;
#[path = "image/dialects.rs"]
mod dialects;
#[path = "image/differential.rs"]
mod differential;
#[path = "image/edge_cases.rs"]
mod edge_cases;
#[path = "image/hostile.rs"]
mod hostile;
#[path = "image/imagegen.rs"]
mod imagegen;
#[path = "image/layers.rs"]
mod layers;
#[path = "image/merge.rs"]
mod merge;
