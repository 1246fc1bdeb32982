//! Through Debian 12's containerd 1.6 (`testsuite::proxied_containerd`, our daemon as its
//! proxy snapshotter): a container from a five-layer image with whiteouts and opaque
//! directories, a container's snapshot committed and viewed, the daemon killed (`kill -9`)
//! and restarted, containerd restarted. The loop devices of the layers are counted all along:
//! on kernels without file-backed EROFS one read-only device per mounted layer and never a
//! second one for the same layer (none at all on 6.12+), and after everything is removed
//! none left, the guest's count back to what it was before.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, ensure};
use testsuite::proxied_containerd::{Env, MountMode, SN, mount_host, unmount};
use testsuite::{Version, unique_name, with_timeout};

use crate::common::BIN;
use crate::images;
use crate::sys::{Loop, erofs_file_backed, loops_under, wait_until};

/// Every loop device of the guest (any backing file).
fn all_loops() -> Result<Vec<Loop>> {
    loops_under(Path::new("/"))
}

/// The layers' loop devices, checked: read-only, one per backing file, each backing file a
/// `layer.erofs` of the daemon's root; none on a kernel with file-backed EROFS.
fn layer_loops(env: &Env) -> Result<BTreeSet<PathBuf>> {
    let loops = loops_under(&env.root)?;
    if erofs_file_backed() {
        ensure!(
            loops.is_empty(),
            "this kernel mounts EROFS from files, yet layers have loop devices: {loops:?}"
        );
        return Ok(BTreeSet::new());
    }
    let backing: BTreeSet<PathBuf> = loops.iter().map(|l| l.backing.clone()).collect();
    ensure!(
        backing.len() == loops.len(),
        "a layer has more than one loop device: {loops:?}"
    );
    ensure!(
        loops
            .iter()
            .all(|l| l.ro && l.backing.file_name().is_some_and(|n| n == "layer.erofs")),
        "a loop device is writable or not a layer's: {loops:?}"
    );
    Ok(backing)
}

#[test]
fn containerd_run_commit_restarts_and_loop_devices() {
    with_timeout(Duration::from_secs(900), || {
        if let Err(e) = body() {
            panic!("{e:#}");
        }
    });
}

fn body() -> Result<()> {
    let before = all_loops()?;
    {
        let mut env = Env::start(Path::new(BIN), Version::V1_6, MountMode::Host)?;
        let img = env.build(&images::whiteouts("kernel-whiteouts")?)?;
        env.import(&img)?;
        let out = env.run(&img.name, &["/bin/sh", "-c", images::WHITEOUT_SCRIPT])?;
        ensure!(
            out == images::WHITEOUT_EXPECTED,
            "the container saw:\n{out}"
        );
        let layers = layer_loops(&env)?;
        if !erofs_file_backed() {
            ensure!(
                layers.len() == img.layers.len(),
                "{} layers, loop devices for {layers:?}",
                img.layers.len()
            );
        }

        // A container writes a file; its snapshot is committed and viewed.
        let id = unique_name("kc");
        let mut o = testsuite::RunOpts::new(
            SN,
            &img.name,
            &["/bin/sh", "-c", "echo committed > /data/new"],
        );
        o.id = Some(id.clone());
        o.rm = false;
        env.ctd.check(&env.ctd.run_with(&o)?, "ctr run")?;
        let committed = unique_name("kc-committed");
        env.snap(&["commit", &committed, &id])?;
        env.ctd.ctr_ok(&["containers", "rm", &id])?;
        let view = unique_name("kc-view");
        let mounts = env.create_mounts("view", &view, &committed)?;
        let target = env.scratch.path().join("view");
        fs::create_dir_all(&target)?;
        ensure!(mounts.len() == 1, "{mounts:?}");
        mount_host(&mounts[0], &target)?;
        let read = fs::read_to_string(target.join("data/new"));
        let gone = fs::symlink_metadata(target.join("data/a/1")).is_err();
        unmount(&target)?;
        ensure!(
            read.as_deref().ok() == Some("committed\n") && gone,
            "the committed container reads {read:?} (whiteout of data/a/1 kept: {gone})"
        );
        let with_commit = layer_loops(&env)?;
        ensure!(
            with_commit.is_superset(&layers),
            "{with_commit:?} lost {layers:?}"
        );

        // kill -9 of the daemon and a restart: the same devices, no second one per layer.
        env.kill_daemon()?;
        env.restart_daemon()?;
        let out = env.run(&img.name, &["/bin/sh", "-c", images::WHITEOUT_SCRIPT])?;
        ensure!(out == images::WHITEOUT_EXPECTED, "after kill -9:\n{out}");
        ensure!(
            layer_loops(&env)? == with_commit,
            "the daemon's restart changed the loop devices"
        );

        // containerd restarted: the same again.
        env.restart_containerd()?;
        let out = env.run(&img.name, &["/bin/sh", "-c", images::WHITEOUT_SCRIPT])?;
        ensure!(
            out == images::WHITEOUT_EXPECTED,
            "after containerd's restart:\n{out}"
        );
        ensure!(
            layer_loops(&env)? == with_commit,
            "containerd's restart changed the loop devices"
        );

        // Everything removed (the daemon killed once more first): no device left.
        env.kill_daemon()?;
        env.restart_daemon()?;
        env.snap(&["rm", &view])?;
        env.snap(&["rm", &committed])?;
        env.ctd.ctr_ok(&["images", "rm", &img.name])?;
        env.wait_until("every snapshot removed", || {
            Ok(env.snapshot_list()?.is_empty())
        })?;
        wait_until(
            "the layers' loop devices released",
            Duration::from_secs(30),
            || {
                let l = loops_under(&env.root)?;
                Ok(if l.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{l:?}"))
                })
            },
        )?;
        env.ensure_daemon()?;
    }
    let after = all_loops()?;
    ensure!(
        after == before,
        "loop devices before the test {before:?}, after {after:?}"
    );
    Ok(())
}
