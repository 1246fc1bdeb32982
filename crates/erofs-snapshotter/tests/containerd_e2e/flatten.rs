//! 9. `flattened_*`: `max_unmerged_layers = 1`, containerd 1.6 (walking differ, Commit
//!    converts) and 2.1 (our differ): the whiteouts image shows exactly the overlayfs tree,
//!    a 130-layer image runs, a container's snapshot commits and diffs (Compare on flattened
//!    mounts), and removing the image leaves nothing behind (store, disk, mounts, loop
//!    devices). A 1000-layer image runs flattened (stacked, it cannot: see its test).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use testsuite::Version;
use testsuite::oci;
use testsuite::proxied_containerd::{self as env, Env, EnvOpts};

use super::{BIN, check_image_layers, e2e, images};

fn flat_env(version: Version) -> Result<Env> {
    Env::start_opts(
        Path::new(BIN),
        version,
        EnvOpts {
            snapshotter_toml: "max_unmerged_layers = 1".into(),
            ..EnvOpts::default()
        },
    )
}

/// The flattened chain's mount of the image's top layer, checked against an overlay of the
/// layers' own mounts (what containerd's overlay of them shows): types, modes, owners,
/// sizes, content, xattrs, link targets, hard links.
fn check_merged_tree(env: &Env, dirs: &[PathBuf]) -> Result<()> {
    let top = &dirs[0];
    ensure!(
        top.join("fsmeta.erofs").is_file(),
        "no fsmeta in {}",
        top.display()
    );
    let stacked = env.scratch.path().join("stacked");
    std::fs::create_dir_all(&stacked)?;
    let lowers: Vec<PathBuf> = dirs.iter().map(|d| d.join("fs")).collect();
    let lowers: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    erofs_sys::mount::mount_overlay(&stacked, &lowers, None, &[])
        .map_err(|e| anyhow::anyhow!("overlay of the layers: {e}"))?;
    let r = testsuite::snapshots::fstest::check_equal(&stacked, &top.join("merged"));
    env::unmount(&stacked)?;
    r
}

/// Remove the image (and whatever containerd still holds of it): every snapshot directory,
/// mount and loop device of ours goes.
fn remove_all(env: &Env, names: &[&str]) -> Result<()> {
    for n in names {
        env.ctd.ctr_ok(&["images", "rm", n])?;
    }
    env.wait_until("every snapshot to go", || {
        Ok(env.snapshot_dirs()?.is_empty())
    })?;
    ensure!(
        env.snapshot_list()?.is_empty(),
        "{:?}",
        env.snapshot_list()?
    );
    let mounts = testsuite::mounts::self_mounts_under(&env.root)?;
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
    for e in std::fs::read_dir("/sys/block")? {
        let f = e?.path().join("loop/backing_file");
        if let Ok(b) = std::fs::read_to_string(&f) {
            ensure!(
                !b.trim().starts_with(&*env.root.to_string_lossy()),
                "loop device {} still backed by {}",
                f.display(),
                b.trim()
            );
        }
    }
    Ok(())
}

fn flattened_whiteouts(version: Version) -> Result<()> {
    let env = flat_env(version)?;
    let img = env.build(&images::whiteouts("flatwh")?)?;
    env.import(&img)?;
    let out = env.run(&img.name, &["/bin/sh", "-c", images::WHITEOUT_SCRIPT])?;
    assert_eq!(out, images::WHITEOUT_EXPECTED, "tree seen through fsmeta");
    oci::import(&env.ctd, &img, "overlayfs")?;
    let reference = env.run_on(
        "overlayfs",
        &img.name,
        &["/bin/sh", "-c", images::WHITEOUT_SCRIPT],
    )?;
    assert_eq!(reference, out, "containerd's overlayfs snapshotter");
    let dirs = check_image_layers(&env, &img)?;
    check_merged_tree(&env, &dirs)?;
    ensure!(
        env.daemon_log(100_000).contains("built fsmeta.erofs"),
        "no fsmeta was built"
    );

    // A container's snapshot commits, and Compare (ctr snapshots diff) reads flattened
    // mounts: the diff of the committed layer is exactly what the container wrote.
    let chain = oci::chain_ids(
        &img.layers
            .iter()
            .map(|l| l.diff_id.clone())
            .collect::<Vec<_>>(),
    );
    let top = chain.last().context("layers")?;
    let m = env.create_mounts("prepare", "flat-c", top)?;
    ensure!(m.len() == 1 && m[0].kind == "overlay", "{m:?}");
    ensure!(
        m[0].option("lowerdir") == Some(&*dirs[0].join("merged").to_string_lossy()),
        "{m:?}"
    );
    let target = env.scratch.path().join("c");
    std::fs::create_dir_all(&target)?;
    env::mount_host(&m[0], &target)?;
    std::fs::write(target.join("newfile"), "written in a flattened container\n")?;
    std::fs::remove_file(target.join("etc/motd"))?;
    env::unmount(&target)?;
    env.snap(&["commit", "flat-c-committed", "flat-c"])?;
    // ctr writes the diff (gzipped tar) to stdout.
    let out = env.ctd.snapshots(env::SN, &["diff", "flat-c-committed"])?;
    ensure!(out.status.success(), "ctr snapshots diff: {out:?}");
    let blob = env.scratch.path().join("diff.tgz");
    std::fs::write(&blob, &out.stdout)?;
    let list = std::process::Command::new("tar")
        .arg("-tzf")
        .arg(&blob)
        .output()?;
    let mut names: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["etc", "etc/.wh.motd", "newfile"], "the diff");
    env.snap(&["rm", "flat-c-committed"])?;

    remove_all(&env, &[&img.name])
}

#[test]
fn flattened_whiteouts_commit_and_remove_containerd_1_6() {
    e2e(|| flattened_whiteouts(Version::V1_6));
}

#[test]
fn flattened_whiteouts_commit_and_remove_containerd_2_1() {
    e2e(|| flattened_whiteouts(Version::V2_1));
}

fn flattened_deep(version: Version, n: usize) -> Result<()> {
    let env = flat_env(version)?;
    let img = env.build(&images::deep(&format!("flatdeep{n}"), n)?)?;
    env.import(&img)?;
    let t0 = std::time::Instant::now();
    let out = env.run(&img.name, &["/bin/sh", "-c", images::DEEP_SCRIPT])?;
    println!(
        "{n} layers: first container (with the fsmeta build) took {:?}",
        t0.elapsed()
    );
    assert_eq!(out, images::deep_expected(n));
    let dirs = env.chain_dirs(img.chain_id().as_str())?;
    assert_eq!(dirs.len(), n + 1);
    // The reference is an overlay of the layers, which overlayfs refuses past 500 lowers
    // ("too many lower directories, limit is 500"): deeper chains are checked by the script.
    if dirs.len() <= 500 {
        check_merged_tree(&env, &dirs)?;
    }
    remove_all(&env, &[&img.name])
}

#[test]
fn flattened_deep_image_130_layers_containerd_2_1() {
    e2e(|| flattened_deep(Version::V2_1, 130));
}

/// 1000 layers: past overlayfs's 500 lowers ("too many lower directories, limit is 500") and
/// past the page-size limit of the mount options containerd 2.1 builds for a stacked chain
/// (`ctr run` fails with "mount options is too long"), neither of which a flattened chain meets.
#[test]
fn flattened_deep_image_1000_layers_containerd_2_1() {
    e2e(|| flattened_deep(Version::V2_1, 1000));
}
