//! Flattened chains (`max_unmerged_layers = 1`) keep the kernel's protection: `fsmeta.erofs`
//! is sealed and checked like a layer, and the layers it reads as its `device=` sources are
//! the same protected files (or their dm-verity devices) a stacked mount would use.
//!
//! - Kernel fs-verity: fsmeta gets it, its recorded digest is the kernel's measurement and
//!   `fsverity digest`'s; the layers stay verity files; a byte flipped underneath fsmeta (a
//!   directory entry) or a layer (file data), on the block device, fails reads through the
//!   flattened mount with EIO, and a flipped superblock fails the next mount of fsmeta.
//! - dm-verity on: fsmeta gets its own tree and device next to the layers' (unique names,
//!   kept across `kill -9` and restart, removed with the snapshot that owns them); a byte
//!   flipped in fsmeta or in a layer file fails reads through the flattened mount with EIO,
//!   which shows both are read through their dm-verity devices. The layers are also mounted
//!   on their own (the unpack mounts its parents): the flattened mount works next to that.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use containerd_api::containerd::types::Mount;
use testsuite::rootfs::parse_overlay;

use crate::common::{BIN, Env, flip_byte, gzip, run};
use crate::dmverity::{apply_on, check_named, names, wait_no_devices};
use crate::fsverity::{
    device_of, find, flip_on_device, kernel_measure, marked, physical_offset, utils_digest,
};
use crate::sys::{dm_devices, drop_caches, wait_no_loops};

/// A file name: fsmeta's directory entries hold it, so a flipped byte can be aimed at
/// fsmeta's own metadata.
const NAME: &str = "KERNEL-FLATTEN-NAME-MARKER";
/// Marks a big file's data block in a layer.
const BIG: &[u8] = b"KERNEL-FLATTEN-LAYER-MARKER";

/// `ROOT/snapshots/ID/fsmeta.erofs`.
fn fsmeta(env: &Env, id: u64) -> PathBuf {
    env.snapshot_dir(id).join("fsmeta.erofs")
}

/// The Prepare or View `mounts` have one lower, the flattened chain of snapshot `top`.
fn ensure_flattened(env: &Env, mounts: &[Mount], top: u64) -> Result<()> {
    let merged = env.snapshot_dir(top).join("merged");
    let lower = match mounts {
        [m] if m.r#type == "overlay" => parse_overlay(m)?.lowers,
        [m] if m.r#type == "bind" => vec![PathBuf::from(&m.source)],
        _ => bail!("unexpected mounts {mounts:?}"),
    };
    ensure!(
        lower == [merged.clone()],
        "not one flattened lower {}: {mounts:?}",
        merged.display()
    );
    Ok(())
}

/// Listing the directory `dir` fails with EIO (`what` says what was flipped).
fn expect_eio_listing(dir: &Path, what: &str) -> Result<()> {
    match fs::read_dir(dir).and_then(|d| d.collect::<std::io::Result<Vec<_>>>()) {
        Err(e) if e.raw_os_error() == Some(5) => Ok(()),
        other => bail!(
            "listing {} after flipping {what} gave {:?}, not EIO",
            dir.display(),
            other.map(|v| v.len())
        ),
    }
}

/// Reading `path` fails with EIO (`what` says what was flipped).
fn expect_eio(path: &Path, what: &str) -> Result<()> {
    match fs::read(path) {
        Err(e) if e.raw_os_error() == Some(5) => Ok(()),
        other => bail!(
            "reading {} after flipping {what} gave {:?}, not EIO",
            path.display(),
            other.map(|v| v.len())
        ),
    }
}

/// Detach the daemon's mount of snapshot `id`'s fsmeta, so the next use mounts it again.
fn unmount_merged(env: &Env, id: u64) -> Result<()> {
    let merged = env.snapshot_dir(id).join("merged");
    rustix::mount::unmount(&merged, rustix::mount::UnmountFlags::DETACH)
        .with_context(|| format!("umount -l {}", merged.display()))
}

#[test]
fn kernel_fsverity_on_fsmeta_and_its_layers_eio_and_refused_mount() {
    let cfg = crate::fsverity::cfg().sn("max_unmerged_layers = 1");
    run(Env::new(BIN, cfg), async |env| {
        let body = marked(300_000, 200_000, BIG);
        let l1 = env
            .layer_with("ff/1", "", "ff/l1", &[("data/big", &body)])
            .await?;
        let l2 = env
            .layer_with(
                "ff/2",
                "ff/l1",
                "ff/l2",
                &[(&format!("etc/{NAME}"), b"x\n")],
            )
            .await?;
        let mounts = env.c().prepare("ff/c", "ff/l2").await?;
        ensure_flattened(env, &mounts, l2)?;
        let m = env.mount(&mounts, "c")?;
        ensure!(fs::read(m.path().join("data/big"))? == body);
        ensure!(fs::read(m.path().join("etc").join(NAME))? == b"x\n");
        let merged = env.snapshot_dir(l2).join("merged");

        // fsmeta: kernel fs-verity, as a layer; the layers it reads are still verity files.
        let meta = fsmeta(env, l2);
        let kernel = kernel_measure(&meta)?;
        let utils = utils_digest(&meta)?;
        ensure!(
            kernel == utils,
            "fsmeta: kernel measures {kernel}, fsverity digest computes {utils}"
        );
        let w = OpenOptions::new().write(true).open(&meta);
        ensure!(
            w.as_ref().err().and_then(|e| e.raw_os_error()) == Some(1),
            "opening fsmeta for writing gave {w:?}, not EPERM"
        );
        for id in [l1, l2] {
            let layer = env.layer(id);
            ensure!(kernel_measure(&layer)? == utils_digest(&layer)?);
        }

        // A layer's data block flipped underneath: reads through fsmeta fail.
        let layer = env.layer(l1);
        let dev = device_of(&layer)?;
        let big_at = physical_offset(&layer, find(&layer, BIG)?)?;
        flip_on_device(&dev, big_at)?;
        drop_caches()?;
        expect_eio(&merged.join("data/big"), "a layer's data block")?;
        expect_eio(&m.path().join("data/big"), "a layer's data block")?;
        flip_on_device(&dev, big_at)?;
        // fsmeta's directory entry flipped: listing the directory fails.
        let name_at = physical_offset(&meta, find(&meta, NAME.as_bytes())?)?;
        flip_on_device(&dev, name_at)?;
        drop_caches()?;
        expect_eio_listing(&merged.join("etc"), "fsmeta's directory entry")?;
        flip_on_device(&dev, name_at)?;
        drop_caches()?;
        ensure!(fs::read(m.path().join("data/big"))? == body);
        ensure!(fs::read(m.path().join("etc").join(NAME))? == b"x\n");
        m.unmount()?;
        env.c().remove("ff/c").await?;

        // The digest recorded for fsmeta is the kernel's.
        env.stop()?;
        {
            let store = snapshotter::store::Store::open(&env.root.join("metadata.redb"))?;
            let rec = store.read(|tx| tx.require("ff/l2"))?;
            let recorded = rec.fsmeta.and_then(|l| l.fsverity_digest);
            ensure!(
                recorded.as_deref() == Some(kernel.as_str()),
                "fsmeta: recorded {recorded:?}, measured {kernel}"
            );
        }
        env.start().await?;

        // fsmeta's superblock flipped: its next mount is refused, naming it.
        unmount_merged(env, l2)?;
        let sb_at = physical_offset(&meta, 1024)?;
        flip_on_device(&dev, sb_at)?;
        drop_caches()?;
        let s = match env.c().view("ff/v", "ff/l2").await {
            Ok(m) => bail!("a View on a chain whose fsmeta has a flipped superblock: {m:?}"),
            Err(s) => s,
        };
        ensure!(
            s.message().contains("fsmeta"),
            "the refusal does not name fsmeta: {s}"
        );
        flip_on_device(&dev, sb_at)?;
        drop_caches()?;
        let v = env.c().view("ff/v2", "ff/l2").await?;
        ensure_flattened(env, &v, l2)?;
        let vm = env.mount(&v, "v2")?;
        ensure!(fs::read(vm.path().join("data/big"))? == body);
        vm.unmount()?;
        Ok(())
    });
}

/// A layer blob with `files` (path, contents).
fn blob(
    env: &Env,
    files: &[(&str, &[u8])],
) -> Result<containerd_api::containerd::types::Descriptor> {
    let mut l = testsuite::oci::LayerBuilder::new();
    for (p, data) in files {
        l.file(p, 0o644, data);
    }
    env.add_blob(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        &gzip(&l.finish()?)?,
    )
}

#[test]
fn dmverity_devices_for_fsmeta_and_every_layer_device() {
    let cfg = crate::dmverity::cfg().sn("max_unmerged_layers = 1");
    run(Env::new(BIN, cfg), async |env| {
        // A marked file of its own in every layer.
        let marks: Vec<Vec<u8>> = (0..3)
            .map(|i| format!("{}-{i}", String::from_utf8_lossy(BIG)).into_bytes())
            .collect();
        let bodies: Vec<Vec<u8>> = marks.iter().map(|m| marked(200_000, 100_000, m)).collect();
        let name = format!("etc/{NAME}");
        let layers: [&[(&str, &[u8])]; 3] = [
            &[("data/big0", &bodies[0])],
            &[(&name, b"x\n"), ("data/big1", &bodies[1])],
            &[("data/big2", &bodies[2]), ("etc/top", b"top\n")],
        ];
        let mut ids = Vec::new();
        let mut parent = String::new();
        for (i, files) in layers.iter().enumerate() {
            let desc = blob(env, files)?;
            let name = format!("fd/l{i}");
            // Unpack keys, as containerd's: never flattened themselves.
            let key = format!("extract-{i} fd");
            ids.push(apply_on(env, &key, &parent, &name, &desc).await?);
            parent = name;
        }
        let top = ids[2];
        let mounts = env.c().prepare("fd/c", "fd/l2").await?;
        ensure_flattened(env, &mounts, top)?;
        let m = env.mount(&mounts, "c")?;
        for (i, body) in bodies.iter().enumerate() {
            ensure!(fs::read(m.path().join(format!("data/big{i}")))? == *body);
        }
        ensure!(fs::read(m.path().join(&name))? == b"x\n");
        let merged = env.snapshot_dir(top).join("merged");

        // One device per layer and one for fsmeta, each verified by the kernel; kill -9 and
        // restart: the same devices serve a new View, none duplicated.
        let fsmeta_dev = snapshotter::integrity::dmverity::fsmeta_device_name(&env.root, top);
        let mut all: BTreeSet<String> = names(env, &ids).0;
        ensure!(all.insert(fsmeta_dev), "fsmeta's device name is a layer's");
        let before = check_named(env, &all)?;
        ensure!(env.kill9().is_some(), "the daemon was not running");
        env.start().await?;
        let v = env.c().view("fd/v", "fd/l2").await?;
        ensure_flattened(env, &v, top)?;
        let vm = env.mount(&v, "v")?;
        ensure!(fs::read(vm.path().join("etc/top"))? == b"top\n");
        ensure!(
            check_named(env, &all)? == before,
            "the restart or a View made other dm devices"
        );

        // A byte flipped in each layer's file, and in fsmeta's directory entry: the
        // flattened mount reads them all through dm-verity (no file has fs-verity). (The
        // kernel then reports the devices as corrupted until they go.)
        for (i, &id) in ids.iter().enumerate() {
            let layer = env.layer(id);
            let at = find(&layer, &marks[i])?;
            flip_byte(&layer, at)?;
            drop_caches()?;
            let what = format!("layer {i}'s data block");
            expect_eio(&merged.join(format!("data/big{i}")), &what)?;
            expect_eio(&m.path().join(format!("data/big{i}")), &what)?;
            flip_byte(&layer, at)?;
        }
        let meta = fsmeta(env, top);
        let at = find(&meta, NAME.as_bytes())?;
        flip_byte(&meta, at)?;
        drop_caches()?;
        expect_eio_listing(&merged.join("etc"), "fsmeta's directory entry")?;
        flip_byte(&meta, at)?;
        drop_caches()?;
        for (i, body) in bodies.iter().enumerate() {
            ensure!(fs::read(m.path().join(format!("data/big{i}")))? == *body);
        }
        ensure!(fs::read(m.path().join(&name))? == b"x\n");
        vm.unmount()?;
        m.unmount()?;
        for k in ["fd/v", "fd/c"] {
            env.c().remove(k).await?;
        }

        // fsmeta's device stays while its snapshot does, and goes with it.
        let (_, prefix) = names(env, &[]);
        let dm_names = || -> Result<BTreeSet<String>> {
            Ok(dm_devices(&prefix)?.into_iter().map(|d| d.name).collect())
        };
        let left = dm_names()?;
        ensure!(
            left == all,
            "after removing the container and view: {left:?}"
        );
        env.c().remove("fd/l2").await?;
        let left = dm_names()?;
        ensure!(
            left == names(env, &ids[..2]).0,
            "after removing fd/l2: {left:?}"
        );
        ensure!(env.kill9().is_some());
        env.start().await?;
        for k in ["fd/l1", "fd/l0"] {
            env.c().remove(k).await?;
        }
        wait_no_devices(env, "after Remove (and kill -9 + restart)")?;
        wait_no_loops(&env.base, "after the dm-verity devices went")?;
        Ok(())
    });
}
