//! The snapshotter conformance suite, bad-input tests and crash/fault tests, run against the
//! real daemon (`erofs-snapshotter serve --config FILE`) over its Unix socket, with every
//! returned mount performed for real. Needs root, erofs and overlayfs.
//!
//! - `cases`: containerd's `core/snapshots/testsuite` cases ([`testsuite::snapshots`]), plain
//!   and with quota, over the socket; the same list runs in process in `snapshotter`'s
//!   `tests/suite.rs`.
//! - [`badinput`]: hostile keys and labels, races, rebase, gRPC error codes.
//! - [`faults`]: crash points (`EROFS_SNAPSHOTTER_CRASH_AT`) and `kill -9` during Commit.

#[path = "conformance/badinput.rs"]
mod badinput;
mod cases {
    testsuite::snapshotter_suite!(crate::client::run);
}
/// The same cases with flattening on (`max_unmerged_layers = 1`).
mod cases_flattened {
    testsuite::snapshotter_suite!(crate::client::run_flattened);
}
#[path = "conformance/client.rs"]
mod client;
#[path = "conformance/faults.rs"]
mod faults;
