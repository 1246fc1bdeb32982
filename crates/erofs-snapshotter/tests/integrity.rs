//! Issue 5: data integrity, quota and idmapped mounts, against the real daemon
//! (`erofs-snapshotter serve --config FILE`) over its Unix socket, on this machine's kernel
//! (which has no fs-verity and no device-mapper): every returned mount is performed for real.
//! Needs root, erofs, overlayfs, ext4 and loop devices; the tools `lsattr`, `mkfs.ext4`,
//! `nsenter`, `fsverity` and `veritysetup`; the end-to-end test needs containerd 2.1
//! (`scripts/setup`).
//!
//! - [`immutable`]: FS_IMMUTABLE_FL on committed layers (ext4, tmpfs, and ramfs which has no
//!   inode flags).
//! - [`quota`]: `default_size` and the max-size label, with a real ext4 image and ENOSPC.
//! - [`idmap`]: idmapped lowers seen through `stat` on the host and in a user namespace.
//! - [`fsverity`]: userspace fs-verity digests (tampering refused at mount time, digests
//!   equal to `fsverity digest`), `fsverity = "on"` refusing to start.
//! - [`dmverity`]: dm-verity trees from the differ checked with `veritysetup verify`,
//!   `dmverity_mode`, manager-mode mount options.
//! - [`e2e`]: containers through containerd 2.1 on immutable, quota'd, idmapped layers.
//! - [`full_disk`]: a root on a small tmpfs: the free-space reserve and ENOSPC, for Prepare,
//!   Apply, Commit and Compare.
//! - [`lifecycle`]: a SIGTERM right after start-up stops the daemon gracefully.
//! - [`anchors`] (in process): what is mounted is what was verified.

#[path = "integrity/anchors.rs"]
mod anchors;
#[path = "integrity/common.rs"]
mod common;
#[path = "integrity/dmverity.rs"]
mod dmverity;
#[path = "integrity/e2e.rs"]
mod e2e;
#[path = "integrity/fsverity.rs"]
mod fsverity;
#[path = "integrity/full_disk.rs"]
mod full_disk;
#[path = "integrity/idmap.rs"]
mod idmap;
#[path = "integrity/immutable.rs"]
mod immutable;
#[path = "integrity/lifecycle.rs"]
mod lifecycle;
#[path = "integrity/quota.rs"]
mod quota;
