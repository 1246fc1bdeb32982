//! End to end with real containerd (Debian 12's 1.6, Debian 13's 1.7 and 2.1 from sid): our
//! daemon serves as containerd's proxy snapshotter `erofs-rs` (and on 1.7 and 2.1 its proxy
//! differ `erofs-rs-diff`), images are imported with `ctr images import --snapshotter
//! erofs-rs` and containers run with `ctr run --snapshotter erofs-rs`. Needs root, erofs and
//! overlayfs, and the three containerd versions (`scripts/setup`).
//!
//! On 1.6 (no proxy differ) layers are unpacked by containerd's walking differ into our
//! active snapshots and converted to `layer.erofs` at Commit; on 1.7 and 2.1 (imports through
//! the transfer service, whose `unpack_config` names our differ) our differ writes
//! `layer.erofs` straight from the layer blob.
//!
//! Each test runs on every version where the version allows it, on its own containerd and
//! daemon (module [`env`]), with images built in the test (module [`images`]):
//!
//! 1. `run_busybox_*`: `ctr run --rm ... /bin/sh -c 'echo hello; ls /'`, the layers on disk
//!    (`ROOT/snapshots/ID/layer.erofs`, `fs/` its read-only erofs mount, fsck.erofs clean).
//! 2. `whiteouts_and_opaque_dirs_*`, `local_import_*`: deletions, opaque directories, file/dir
//!    replacements, hard links, checked against a fixed listing and containerd's overlayfs.
//! 3. `container_writes_stay_in_upper_dir_*`: exactly the writes in the container's upper
//!    dir, the layers byte for byte unchanged, the snapshot gone after `ctr containers rm`.
//! 4. `ctr_snapshots_by_hand_*`: prepare, commit, view, mounts, usage, ls, info, rm.
//! 5. `daemon_kill_9_and_restart_*`: kill -9 and SIGTERM of the daemon under a running
//!    containerd and container; `parallel_imports_and_runs_*`.
//! 6. `deep_image_{40,130}_layers_*`.
//! 7. `manager_mode_mount_shapes_*`: upstream's mount-manager shapes as `--mounts` JSON.
//! 8. `kill_during_{import,remove}_*`: crash points in Apply/Commit/Remove, restart, the disk
//!    converging on containerd's snapshot list.
//! 9. `flattened_*` (module [`flatten`]): the same images with `max_unmerged_layers = 1`.
//!
//! The environment each test runs in is `testsuite::proxied_containerd`; the benchmark behind
//! `bench/e2e` is the `bench-e2e` binary of crates/bench.

#[path = "containerd_e2e/flatten.rs"]
mod flatten;
#[path = "containerd_e2e/images.rs"]
mod images;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use testsuite::proxied_containerd::{self as env, Env, MountMode, SN, mount_host, unmount};

/// The daemon binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_erofs-snapshotter");
use testsuite::oci::{self, OciArchive};
use testsuite::with_timeout;
use testsuite::{Version, unique_name};

/// Backstop for one test body.
const LIMIT: Duration = Duration::from_secs(900);

/// fsck.erofs of erofs-utils 1.9 (an independent check of our images), when installed.
const FSCK_EROFS: &str = "/opt/erofs-utils-new/bin/fsck.erofs";

fn e2e(f: fn() -> Result<()>) {
    with_timeout(LIMIT, move || {
        if let Err(e) = f() {
            panic!("{e:#}");
        }
    });
}

/// The committed snapshots of `img` in our snapshotter are exactly its chain ids, each
/// with its parent; each one's directory holds `layer.erofs` (a valid EROFS image) with
/// `fs/` the read-only erofs mount of it. Returns the directories, top layer first.
fn check_image_layers(env: &Env, img: &OciArchive) -> Result<Vec<PathBuf>> {
    let diff_ids: Vec<String> = img.layers.iter().map(|l| l.diff_id.clone()).collect();
    let chain = oci::chain_ids(&diff_ids);
    let list = env.snapshot_list()?;
    for (i, c) in chain.iter().enumerate() {
        let (parent, kind) = list
            .get(c)
            .with_context(|| format!("layer {i} ({c}) is not a snapshot: {list:?}"))?;
        ensure!(kind == "Committed", "{c} is {kind}");
        let want = if i == 0 { "" } else { chain[i - 1].as_str() };
        ensure!(parent == want, "{c}: parent {parent:?}, want {want:?}");
    }
    let dirs = env.chain_dirs(img.chain_id().as_str())?;
    ensure!(
        dirs.len() == chain.len(),
        "{} layer directories for {} layers: {dirs:?}",
        dirs.len(),
        chain.len()
    );
    let unique: BTreeSet<&PathBuf> = dirs.iter().collect();
    ensure!(unique.len() == dirs.len(), "repeated layer dirs {dirs:?}");
    for d in &dirs {
        env.check_layer_dir(d)?;
        if Path::new(FSCK_EROFS).exists() {
            let out = Command::new(FSCK_EROFS)
                .arg(d.join("layer.erofs"))
                .output()?;
            ensure!(
                out.status.success(),
                "fsck.erofs {}: {}{}",
                d.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(dirs)
}

// ---------------------------------------------------------------------------------------
// 1. Run a container.

fn run_busybox(version: Version) -> Result<()> {
    let env = Env::start(Path::new(BIN), version, MountMode::Host)?;
    let img = env.build(&images::busybox("busybox")?)?;
    env.import(&img)?;
    let out = env.run(&img.name, &["/bin/sh", "-c", "echo hello; ls /"])?;
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hello"), "{out}");
    let root: BTreeSet<&str> = lines.collect();
    // runc creates the mount point of containerd's default /run tmpfs.
    let mut want: BTreeSet<&str> = images::BUSYBOX_ROOT.iter().copied().collect();
    want.insert("run");
    assert_eq!(root, want, "ls / in the container");

    // The same command on containerd's overlayfs snapshotter prints the same.
    oci::import(&env.ctd, &img, "overlayfs")?;
    let reference = env.run_on(
        "overlayfs",
        &img.name,
        &["/bin/sh", "-c", "echo hello; ls /"],
    )?;
    assert_eq!(out, reference, "erofs-rs and overlayfs disagree");

    let motd = env.run(&img.name, &["/bin/cat", "/etc/motd"])?;
    assert_eq!(motd, "hello from erofs\n");

    // Layers on disk: ROOT/snapshots/ID/layer.erofs mounted at fs/.
    let dirs = check_image_layers(&env, &img)?;
    let top = &dirs[0];
    let bottom = &dirs[1];
    assert_eq!(
        fs::read_to_string(top.join("fs/etc/motd"))?,
        "hello from erofs\n"
    );
    assert!(
        !top.join("fs/bin").exists(),
        "top layer has the base's /bin"
    );
    assert_eq!(
        env::sha256_file(&bottom.join("fs/bin/busybox"))?,
        env::sha256_file(Path::new("/bin/busybox"))?
    );
    for d in &dirs {
        assert!(
            d.join(".erofslayer").is_file(),
            "{}: the marker survives Commit",
            d.display()
        );
    }
    // No layer images outside the image's chain.
    let with_layer: BTreeSet<PathBuf> = env.layer_hashes()?.into_keys().collect();
    let chain: BTreeSet<PathBuf> = dirs.iter().cloned().collect();
    assert_eq!(
        with_layer, chain,
        "layer.erofs files outside the image's chain"
    );

    // A one-layer image runs too (an overlay with a single lower).
    let single = env.build(&images::busybox_single("single")?)?;
    env.import(&single)?;
    let out = env.run(
        &single.name,
        &["/bin/sh", "-c", "echo single; cat /etc/passwd"],
    )?;
    assert!(out.starts_with("single\nroot:x:0:0"), "{out}");
    check_image_layers(&env, &single)?;
    Ok(())
}

#[test]
fn run_busybox_containerd_1_6() {
    e2e(|| run_busybox(Version::V1_6));
}

#[test]
fn run_busybox_containerd_1_7() {
    e2e(|| run_busybox(Version::V1_7));
}

#[test]
fn run_busybox_containerd_2_1() {
    e2e(|| run_busybox(Version::V2_1));
}

// ---------------------------------------------------------------------------------------
// 2. Whiteouts and opaque directories.

fn whiteouts(version: Version) -> Result<()> {
    let env = Env::start(Path::new(BIN), version, MountMode::Host)?;
    let img = env.build(&images::whiteouts("whiteouts")?)?;
    env.import(&img)?;
    // 1.7, 2.1: our differ writes each layer.erofs; 1.6: the walking differ fills fs/ and our
    // Commit converts it.
    let applied = if version.proxy_diff() {
        img.layers.len()
    } else {
        0
    };
    assert_eq!(
        applied_layers(&env),
        applied,
        "layers applied by our differ"
    );
    let out = env.run(&img.name, &["/bin/sh", "-c", images::WHITEOUT_SCRIPT])?;
    assert_eq!(out, images::WHITEOUT_EXPECTED, "tree seen through erofs-rs");
    oci::import(&env.ctd, &img, "overlayfs")?;
    let reference = env.run_on(
        "overlayfs",
        &img.name,
        &["/bin/sh", "-c", images::WHITEOUT_SCRIPT],
    )?;
    assert_eq!(
        reference,
        images::WHITEOUT_EXPECTED,
        "tree seen through overlayfs"
    );
    check_image_layers(&env, &img)?;
    Ok(())
}

/// How many layers our differ applied (its log lines).
fn applied_layers(env: &Env) -> usize {
    env.daemon_log(100_000)
        .lines()
        .filter(|l| l.contains("applied layer"))
        .count()
}

/// containerd 1.7 or 2.1 unpacking in the client (`ctr images import --local`): through the
/// diff service, whose first differ is ours.
fn local_import(version: Version) -> Result<()> {
    let env = Env::start(Path::new(BIN), version, MountMode::Host)?;
    let img = env.build(&images::whiteouts("local")?)?;
    let mut o = oci::ImportOpts::new(SN);
    o.local = true;
    oci::import_with(&env.ctd, &img, &o)?;
    assert_eq!(
        applied_layers(&env),
        img.layers.len(),
        "layers applied by our differ"
    );
    let out = env.run(&img.name, &["/bin/sh", "-c", images::WHITEOUT_SCRIPT])?;
    assert_eq!(out, images::WHITEOUT_EXPECTED);
    check_image_layers(&env, &img)?;
    Ok(())
}

#[test]
fn local_import_through_diff_service_containerd_1_7() {
    e2e(|| local_import(Version::V1_7));
}

#[test]
fn local_import_through_diff_service_containerd_2_1() {
    e2e(|| local_import(Version::V2_1));
}

#[test]
fn whiteouts_and_opaque_dirs_containerd_1_6() {
    e2e(|| whiteouts(Version::V1_6));
}

#[test]
fn whiteouts_and_opaque_dirs_containerd_1_7() {
    e2e(|| whiteouts(Version::V1_7));
}

#[test]
fn whiteouts_and_opaque_dirs_containerd_2_1() {
    e2e(|| whiteouts(Version::V2_1));
}

// ---------------------------------------------------------------------------------------
// 3. A container's writes land in its upper dir.

/// The `upperdir=` of the mounts of snapshot `key` (`ctr snapshots mounts`).
fn upper_dir(env: &Env, key: &str) -> Result<PathBuf> {
    let out = env.snap(&["mounts", "/mnt-unused", key])?;
    let upper = out
        .split([',', ' ', '\n'])
        .find_map(|o| o.strip_prefix("upperdir="))
        .with_context(|| format!("no upperdir in {out:?}"))?;
    Ok(PathBuf::from(upper))
}

fn writes_stay_in_upper(version: Version) -> Result<()> {
    let env = Env::start(Path::new(BIN), version, MountMode::Host)?;
    let img = env.build(&images::whiteouts("writer")?)?;
    env.import(&img)?;
    let dirs = check_image_layers(&env, &img)?;
    let hashes = env.layer_hashes()?;
    let trees: Vec<Vec<String>> = dirs
        .iter()
        .map(|d| env::tree_listing(&d.join("fs")))
        .collect::<Result<_>>()?;

    let id = unique_name("writer");
    let script = "echo data > /newfile; echo more >> /etc/motd; rm /etc/passwd; \
                  rm -r /data/opq; mkdir -p /newdir; echo x > /newdir/f; \
                  echo bb > /data/b/y; rm /data/keep; sync; echo done";
    let out = env.run_keep(&img.name, &id, &["/bin/sh", "-c", script])?;
    // (An empty output is containerd losing a short-lived task's output under load.)
    assert!(out == "done\n" || out.is_empty(), "{out:?}");

    let upper = upper_dir(&env, &id)?;
    let snap_dir = upper.parent().context("upper dir")?;
    assert_eq!(upper.file_name().unwrap(), "fs");
    assert_eq!(
        snap_dir.parent(),
        Some(env.root.join("snapshots").as_path())
    );
    assert!(
        !dirs.iter().any(|d| d == snap_dir),
        "upper dir is a layer's dir"
    );
    assert!(snap_dir.join(".erofslayer").exists());
    assert!(!snap_dir.join("layer.erofs").exists());
    let listing = env::tree_listing(&upper)?;
    println!("upper dir of {id}:\n  {}", listing.join("\n  "));
    // Exactly the container's writes (and the mount point runc made for /run).
    let names: Vec<String> = listing
        .iter()
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        names,
        [
            "data d",
            "data/b d",
            "data/b/y f",
            "data/keep c",
            "data/opq c",
            "etc d",
            "etc/motd f",
            "etc/passwd c",
            "newdir d",
            "newdir/f f",
            "newfile f",
            "run d",
        ],
        "upper dir content"
    );
    assert_eq!(fs::read_to_string(upper.join("newfile"))?, "data\n");
    assert_eq!(fs::read_to_string(upper.join("etc/motd"))?, "v2more\n");
    assert_eq!(fs::read_to_string(upper.join("newdir/f"))?, "x\n");
    assert_eq!(fs::read_to_string(upper.join("data/b/y"))?, "bb\n");
    for gone in ["etc/passwd", "data/opq", "data/keep"] {
        let want = format!("{gone} c 0");
        assert!(
            listing.contains(&want),
            "{gone} should be an overlay whiteout in the upper dir: {listing:?}"
        );
    }

    // Nothing changed in the layers.
    assert_eq!(env.layer_hashes()?, hashes, "layer.erofs files changed");
    for (d, before) in dirs.iter().zip(&trees) {
        assert_eq!(
            &env::tree_listing(&d.join("fs"))?,
            before,
            "{}",
            d.display()
        );
    }
    // A new container sees the image, not the first container's writes.
    let out = env.run(
        &img.name,
        &[
            "/bin/sh",
            "-c",
            "cat /etc/motd; echo; ls /newfile /etc/passwd /data/opq 2>&1; cat /data/b/y",
        ],
    )?;
    assert!(out.starts_with("v2\n"), "{out}");
    assert!(out.contains("/newfile: No such file"), "{out}");
    assert!(out.contains("/etc/passwd\n"), "{out}");
    assert!(out.contains("new1"), "{out}");
    assert!(out.ends_with("by"), "{out}");

    // Removing the container removes its snapshot (when containerd's GC calls Remove).
    env.ctd.ctr_ok(&["containers", "rm", &id])?;
    let snap_dir = snap_dir.to_path_buf();
    env.wait_until("the container's snapshot directory to go", || {
        Ok(!snap_dir.exists())
    })?;
    assert_eq!(env.layer_hashes()?, hashes);
    Ok(())
}

#[test]
fn container_writes_stay_in_upper_dir_containerd_1_6() {
    e2e(|| writes_stay_in_upper(Version::V1_6));
}

#[test]
fn container_writes_stay_in_upper_dir_containerd_1_7() {
    e2e(|| writes_stay_in_upper(Version::V1_7));
}

#[test]
fn container_writes_stay_in_upper_dir_containerd_2_1() {
    e2e(|| writes_stay_in_upper(Version::V2_1));
}

// ---------------------------------------------------------------------------------------
// 4. `ctr snapshots` by hand.

fn snapshots_by_hand(version: Version) -> Result<()> {
    let env = Env::start(Path::new(BIN), version, MountMode::Host)?;
    let img = env.build(&images::busybox("hand")?)?;
    env.import(&img)?;
    let top = img.chain_id();
    let mnt = env.ctd.dir("hand-mnt")?;

    // prepare on top of the image: an overlay on the two layers.
    let m = env.create_mounts("prepare", "hand-active", &top)?;
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].kind, "overlay", "{m:?}");
    let lowers: Vec<&str> = m[0]
        .option("lowerdir")
        .context("lowerdir")?
        .split(':')
        .collect();
    assert_eq!(lowers.len(), 2, "{m:?}");
    let upper = PathBuf::from(m[0].option("upperdir").context("upperdir")?);
    assert!(m[0].option("workdir").is_some());
    let active_dir = upper.parent().unwrap().to_path_buf();
    assert!(active_dir.join(".erofslayer").is_file());
    assert!(active_dir.join("work").is_dir());

    mount_host(&m[0], &mnt)?;
    let body = (|| -> Result<()> {
        assert_eq!(
            fs::read_to_string(mnt.join("etc/motd"))?,
            "hello from erofs\n"
        );
        assert!(mnt.join("bin/busybox").is_file());
        fs::create_dir(mnt.join("hand"))?;
        fs::write(mnt.join("hand/made"), b"by hand\n")?;
        fs::write(mnt.join("hand/big"), vec![7u8; 256 << 10])?;
        fs::remove_file(mnt.join("etc/motd"))?;
        Ok(())
    })();
    unmount(&mnt)?;
    body?;
    let (size, inodes) = env.usage("hand-active")?;
    assert!(
        size >= 256 << 10 && inodes >= 3,
        "active usage {size} {inodes}"
    );

    // ls / info of the active snapshot.
    let list = env.snapshot_list()?;
    assert_eq!(
        list.get("hand-active"),
        Some(&(top.clone(), "Active".to_owned()))
    );
    let info = env.info("hand-active")?;
    assert_eq!(info["Kind"], "Active", "{info}");
    assert_eq!(info["Parent"], top.as_str(), "{info}");

    // commit: the upper dir becomes layer.erofs in the same directory.
    env.snap(&["commit", "hand-committed", "hand-active"])?;
    let list = env.snapshot_list()?;
    assert!(!list.contains_key("hand-active"), "{list:?}");
    assert_eq!(
        list.get("hand-committed"),
        Some(&(top.clone(), "Committed".to_owned()))
    );
    let info = env.info("hand-committed")?;
    assert_eq!(info["Kind"], "Committed", "{info}");
    assert!(
        active_dir.join("layer.erofs").is_file(),
        "no layer.erofs after commit"
    );
    let (size, inodes) = env.usage("hand-committed")?;
    assert!(
        size >= 256 << 10 && inodes > 0,
        "committed usage {size} {inodes}"
    );
    let (isize, iinodes) = env.usage(&top)?;
    assert!(
        isize > 0 && iinodes > 0,
        "image layer usage {isize} {iinodes}"
    );
    let base_chain = oci::chain_ids(&[img.layers[0].diff_id.clone()]);
    let (bsize, _) = env.usage(&base_chain[0])?;
    assert!(bsize >= 1 << 20, "busybox layer usage {bsize}");
    // A committed snapshot has no mounts.
    env.snap_err(&["mounts", "/x", "hand-committed"])?;

    // view on the new layer: an overlay of three lowers, read-only.
    let v = env.create_mounts("view", "hand-view", "hand-committed")?;
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, "overlay");
    assert!(v[0].option("upperdir").is_none(), "{v:?}");
    let vl: Vec<&str> = v[0].option("lowerdir").unwrap().split(':').collect();
    assert_eq!(vl.len(), 3);
    assert_eq!(Path::new(vl[0]), active_dir.join("fs"));
    env.check_layer_dir(&active_dir)?;
    let (vsize, _) = env.usage("hand-view")?;
    assert_eq!(vsize, 0, "a view uses nothing");
    let printed = env.snap(&["mounts", "/some/target", "hand-view"])?;
    assert!(
        printed.contains("overlay")
            && printed.contains(&format!("{}", active_dir.join("fs").display())),
        "{printed}"
    );
    mount_host(&v[0], &mnt)?;
    let body = (|| -> Result<()> {
        assert_eq!(fs::read_to_string(mnt.join("hand/made"))?, "by hand\n");
        assert!(!mnt.join("etc/motd").exists(), "whiteout lost");
        assert!(mnt.join("etc/passwd").is_file());
        assert!(mnt.join("bin/busybox").is_file());
        assert!(
            fs::write(mnt.join("nope"), b"x").is_err(),
            "view is writable"
        );
        Ok(())
    })();
    unmount(&mnt)?;
    body?;
    // The committed layer's own fs is the erofs mount, holding only what was written.
    let own = env::tree_listing(&active_dir.join("fs"))?;
    assert!(
        own.iter().any(|l| l.starts_with("hand/made f 8")),
        "{own:?}"
    );
    assert!(own.iter().any(|l| l == "etc/motd c 0"), "{own:?}");
    assert!(!own.iter().any(|l| l.starts_with("bin")), "{own:?}");

    // A parentless snapshot: a plain bind mount, committed and viewed.
    let p = env.create_mounts("prepare", "hand-base", "")?;
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].kind, "bind", "{p:?}");
    assert!(p[0].options.iter().any(|o| o == "rw"), "{p:?}");
    let base_dir = PathBuf::from(&p[0].source).parent().unwrap().to_path_buf();
    mount_host(&p[0], &mnt)?;
    let w = fs::write(mnt.join("base-file"), b"base\n");
    unmount(&mnt)?;
    w?;
    env.snap(&["commit", "hand-base-committed", "hand-base"])?;
    let bv = env.create_mounts("view", "hand-base-view", "hand-base-committed")?;
    assert_eq!(bv.len(), 1);
    assert_eq!(bv[0].kind, "bind", "{bv:?}");
    assert!(bv[0].options.iter().any(|o| o == "ro"), "{bv:?}");
    assert_eq!(Path::new(&bv[0].source), base_dir.join("fs"));
    env.check_layer_dir(&base_dir)?;
    assert_eq!(fs::read_to_string(base_dir.join("fs/base-file"))?, "base\n");

    // rm: refused while a child exists, then the directories go (after containerd's GC).
    env.snap_err(&["rm", "hand-committed"])?;
    env.snap(&["rm", "hand-view"])?;
    env.snap(&["rm", "hand-committed"])?;
    env.snap(&["rm", "hand-base-view", "hand-base-committed"])?;
    let list = env.snapshot_list()?;
    for k in [
        "hand-view",
        "hand-committed",
        "hand-base-view",
        "hand-base-committed",
    ] {
        assert!(!list.contains_key(k), "{k} still listed: {list:?}");
    }
    env.wait_until("removed snapshot directories to go", || {
        Ok(!active_dir.exists() && !base_dir.exists())
    })?;
    let table = testsuite::mounts::self_mounts()?;
    assert!(
        !table
            .iter()
            .any(|m| m.mount_point.starts_with(&active_dir) || m.mount_point.starts_with(&base_dir)),
        "mounts of removed snapshots survive"
    );
    // The image is intact.
    check_image_layers(&env, &img)?;
    let out = env.run(&img.name, &["/bin/cat", "/etc/motd"])?;
    assert_eq!(out, "hello from erofs\n");
    Ok(())
}

#[test]
fn ctr_snapshots_by_hand_containerd_1_6() {
    e2e(|| snapshots_by_hand(Version::V1_6));
}

#[test]
fn ctr_snapshots_by_hand_containerd_1_7() {
    e2e(|| snapshots_by_hand(Version::V1_7));
}

#[test]
fn ctr_snapshots_by_hand_containerd_2_1() {
    e2e(|| snapshots_by_hand(Version::V2_1));
}

// ---------------------------------------------------------------------------------------
// 5. kill -9 of the daemon while containerd runs.

fn restart(version: Version) -> Result<()> {
    let mut env = Env::start(Path::new(BIN), version, MountMode::Host)?;
    let img = env.build(&images::busybox("restart")?)?;
    env.import(&img)?;
    assert_eq!(env.run(&img.name, &["/bin/echo", "before"])?, "before\n");

    // A long-running container survives the daemon's death.
    let id = unique_name("long");
    let mut o = testsuite::RunOpts::new(SN, &img.name, &["/bin/sleep", "600"]);
    o.id = Some(id.clone());
    o.rm = false;
    o.flags = vec!["-d".into()];
    let out = env.ctd.run_with(&o)?;
    env.check(&out, "ctr run -d")?;

    let old = env.daemon_pid();
    env.kill_daemon()?;
    // While it is down, containerd cannot reach it.
    let out = env.ctd.snapshots(SN, &["ls"])?;
    assert!(
        !out.status.success(),
        "ctr snapshots ls worked with the daemon dead"
    );
    env.restart_daemon()?;
    assert_ne!(env.daemon_pid(), old);

    assert_eq!(env.run(&img.name, &["/bin/echo", "after"])?, "after\n");
    // (Retried like Env::run_on: containerd may lose a short-lived process's output.)
    let mut out = String::new();
    for i in 0..3 {
        let exec_id = format!("probe{i}");
        out = env.ctd.ctr_ok(&[
            "tasks",
            "exec",
            "--exec-id",
            &exec_id,
            &id,
            "/bin/cat",
            "/etc/motd",
        ])?;
        if !out.is_empty() {
            break;
        }
    }
    assert_eq!(out, "hello from erofs\n");
    check_image_layers(&env, &img)?;

    // New layers after the restart, then a second kill -9 and restart.
    let wimg = env.build(&images::whiteouts("restart-whiteouts")?)?;
    env.import(&wimg)?;
    env.kill_daemon()?;
    env.restart_daemon()?;
    let out = env.run(&wimg.name, &["/bin/sh", "-c", images::WHITEOUT_SCRIPT])?;
    assert_eq!(out, images::WHITEOUT_EXPECTED);
    check_image_layers(&env, &wimg)?;
    check_image_layers(&env, &img)?;

    // A clean stop (SIGTERM) and start: the layer mounts stay, and are not doubled.
    env.stop_daemon()?;
    env.restart_daemon()?;
    assert_eq!(env.run(&img.name, &["/bin/echo", "again"])?, "again\n");
    check_image_layers(&env, &img)?;
    check_image_layers(&env, &wimg)?;

    env.ctd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &id])?;
    env.wait_until("the task to stop", || {
        let out = env.ctd.ctr_ok(&["tasks", "ls"])?;
        Ok(!out
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("RUNNING")))
    })?;
    env.ctd.ctr_ok(&["tasks", "rm", &id])?;
    env.ctd.ctr_ok(&["containers", "rm", &id])?;
    env.ensure_daemon()?;
    Ok(())
}

#[test]
fn daemon_kill_9_and_restart_containerd_1_6() {
    e2e(|| restart(Version::V1_6));
}

#[test]
fn daemon_kill_9_and_restart_containerd_1_7() {
    e2e(|| restart(Version::V1_7));
}

#[test]
fn daemon_kill_9_and_restart_containerd_2_1() {
    e2e(|| restart(Version::V2_1));
}

// ---------------------------------------------------------------------------------------
// 5b. Concurrency: imports sharing a base layer, and containers started together before
// any layer is mounted.

fn parallel(version: Version) -> Result<()> {
    let env = Env::start(Path::new(BIN), version, MountMode::Host)?;
    let specs = [
        images::whiteouts("par-whiteouts")?,
        images::busybox("par-busybox")?,
        images::deep("par-deep", 8)?,
    ];
    let imgs: Vec<OciArchive> = specs.iter().map(|s| env.build(s)).collect::<Result<_>>()?;
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = imgs.iter().map(|img| s.spawn(|| env.import(img))).collect();
        for h in handles {
            h.join().expect("import thread")?;
        }
        Ok(())
    })?;
    let jobs: Vec<(&OciArchive, &str, String)> = (0..2)
        .flat_map(|_| {
            [
                (
                    &imgs[0],
                    images::WHITEOUT_SCRIPT,
                    images::WHITEOUT_EXPECTED.to_owned(),
                ),
                (
                    &imgs[1],
                    "echo begin; cat /etc/motd; echo end",
                    "begin\nhello from erofs\nend\n".to_owned(),
                ),
                (&imgs[2], images::DEEP_SCRIPT, images::deep_expected(8)),
            ]
        })
        .collect();
    let env = &env;
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(img, script, want)| {
                s.spawn(move || -> Result<()> {
                    let out = env.run(&img.name, &["/bin/sh", "-c", script])?;
                    ensure!(&out == want, "{}: got {out:?}, want {want:?}", img.name);
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().expect("run thread")?;
        }
        Ok(())
    })?;
    for img in &imgs {
        check_image_layers(env, img)?;
    }
    Ok(())
}

#[test]
fn parallel_imports_and_runs_containerd_1_6() {
    e2e(|| parallel(Version::V1_6));
}

#[test]
fn parallel_imports_and_runs_containerd_1_7() {
    e2e(|| parallel(Version::V1_7));
}

#[test]
fn parallel_imports_and_runs_containerd_2_1() {
    e2e(|| parallel(Version::V2_1));
}

// ---------------------------------------------------------------------------------------
// 6. Deep images.

fn deep(version: Version, n: usize) -> Result<()> {
    let env = Env::start(Path::new(BIN), version, MountMode::Host)?;
    let img = env.build(&images::deep(&format!("deep{n}"), n)?)?;
    env.import(&img)?;
    let out = env.run(&img.name, &["/bin/sh", "-c", images::DEEP_SCRIPT])?;
    assert_eq!(out, images::deep_expected(n));
    let dirs = check_image_layers(&env, &img)?;
    assert_eq!(dirs.len(), n + 1);
    Ok(())
}

#[test]
fn deep_image_40_layers_containerd_1_6() {
    e2e(|| deep(Version::V1_6, 40));
}

#[test]
fn deep_image_40_layers_containerd_1_7() {
    e2e(|| deep(Version::V1_7, 40));
}

#[test]
fn deep_image_40_layers_containerd_2_1() {
    e2e(|| deep(Version::V2_1, 40));
}

/// Beyond one page of `lowerdir=` with full paths: containerd has to shorten the option.
#[test]
fn deep_image_130_layers_containerd_1_6() {
    e2e(|| deep(Version::V1_6, 130));
}

#[test]
fn deep_image_130_layers_containerd_1_7() {
    e2e(|| deep(Version::V1_7, 130));
}

#[test]
fn deep_image_130_layers_containerd_2_1() {
    e2e(|| deep(Version::V2_1, 130));
}

// ---------------------------------------------------------------------------------------
// 7. mount_mode = "manager": upstream's shapes, as data.

fn manager_shapes(version: Version) -> Result<()> {
    let env = Env::start(Path::new(BIN), version, MountMode::Manager)?;
    // containerd 1.6 unpacks with the walking differ, which must mount what we return: only
    // a one-layer image can be unpacked there (a parentless snapshot is a plain bind).
    let spec = if version == Version::V1_6 {
        images::busybox_single("managed")?
    } else {
        images::whiteouts("managed")?
    };
    let img = env.build(&spec)?;
    env.import(&img)?;
    let diff_ids: Vec<String> = img.layers.iter().map(|l| l.diff_id.clone()).collect();
    let chain = oci::chain_ids(&diff_ids);
    let n = chain.len();
    let snapshots = env.root.join("snapshots");
    let is_blob = |src: &str| -> bool {
        let p = Path::new(src);
        p.file_name().is_some_and(|f| f == "layer.erofs")
            && p.parent().and_then(Path::parent) == Some(snapshots.as_path())
            && p.is_file()
    };
    let erofs_ok =
        |m: &env::JsonMount| m.kind == "erofs" && is_blob(&m.source) && m.options == ["ro", "loop"];

    // View on the bottom layer (shape D): one erofs mount.
    let v1 = env.create_mounts("view", "m-view-1", &chain[0])?;
    assert_eq!(v1.len(), 1, "{v1:?}");
    assert!(erofs_ok(&v1[0]), "{v1:?}");
    let bottom_blob = v1[0].source.clone();

    // Active on the bottom layer (shape F, one lower).
    let a1 = env.create_mounts("prepare", "m-active-1", &chain[0])?;
    assert_eq!(a1.len(), 2, "{a1:?}");
    assert!(erofs_ok(&a1[0]) && a1[0].source == bottom_blob, "{a1:?}");
    assert_eq!(a1[1].kind, "format/mkdir/overlay", "{a1:?}");
    assert_eq!(a1[1].source, "overlay");
    let o = &a1[1].options;
    assert_eq!(o.len(), 3, "{o:?}");
    let work = o[0].strip_prefix("workdir=").context("workdir first")?;
    let upper = o[1].strip_prefix("upperdir=").context("upperdir second")?;
    assert_eq!(o[2], "lowerdir={{ mount 0 }}");
    let dir = Path::new(upper).parent().unwrap();
    assert_eq!(Path::new(upper), dir.join("fs"));
    assert_eq!(Path::new(work), dir.join("work"));
    assert_eq!(dir.parent(), Some(snapshots.as_path()));
    assert!(dir.join(".erofslayer").is_file() && dir.join("work").is_dir());

    // Parentless active and view (shape B): binds of fs.
    let b = env.create_mounts("prepare", "m-base", "")?;
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(b[0].kind, "bind");
    assert_eq!(b[0].options, ["rw", "rbind"]);
    assert!(b[0].source.ends_with("/fs") && b[0].source.starts_with(&*snapshots.to_string_lossy()));
    let bv = env.create_mounts("view", "m-base-view", "")?;
    assert_eq!(bv.len(), 1, "{bv:?}");
    assert_eq!(
        (bv[0].kind.as_str(), &bv[0].options[..]),
        ("bind", &["ro".to_string(), "rbind".to_string()][..])
    );

    if n >= 2 {
        // Active on the whole image (shape F): every layer, immediate parent first.
        let a = env.create_mounts("prepare", "m-active", &chain[n - 1])?;
        assert_eq!(a.len(), n + 1, "{a:?}");
        for m in &a[..n] {
            assert!(erofs_ok(m), "{m:?}");
        }
        assert_eq!(a[n - 1].source, bottom_blob, "bottom layer last: {a:?}");
        let blobs: BTreeSet<&str> = a[..n].iter().map(|m| m.source.as_str()).collect();
        assert_eq!(blobs.len(), n, "repeated layers {a:?}");
        let last = &a[n];
        assert_eq!(last.kind, "format/mkdir/overlay");
        assert_eq!(last.options.len(), 3, "{last:?}");
        assert!(last.options[0].starts_with("workdir="));
        assert!(last.options[1].starts_with("upperdir="));
        assert_eq!(
            last.options[2],
            format!("lowerdir={{{{ overlay 0 {} }}}}", n - 1)
        );

        // View on the whole image (shape E): the same lowers, no upper.
        let v = env.create_mounts("view", "m-view", &chain[n - 1])?;
        assert_eq!(v.len(), n + 1, "{v:?}");
        assert_eq!(v[..n], a[..n], "view and active lowers differ");
        assert_eq!(v[n].kind, "format/mkdir/overlay");
        assert_eq!(
            v[n].options,
            [format!("lowerdir={{{{ overlay 0 {} }}}}", n - 1)]
        );

        // Each shorter chain's lowers are a suffix of the longer one's.
        for k in 2..n {
            let vk = env.create_mounts("view", &format!("m-view-{k}"), &chain[k - 1])?;
            assert_eq!(vk.len(), k + 1);
            assert_eq!(vk[..k], a[n - k..n], "view of layer {k}");
        }
        // Mounts(key) returns the same as Prepare did (`mount -t TYPE SOURCE TARGET -o OPTS`
        // lines; the templates hold spaces, the options no commas).
        let printed = env.snap(&["mounts", "/t", "m-active"])?;
        let again: Vec<env::JsonMount> = printed
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.splitn(5, ' ').collect();
                let (_, opts) = f[4].split_once(" -o ").expect("-o");
                env::JsonMount {
                    kind: f[2].to_owned(),
                    source: f[3].to_owned(),
                    options: opts.split(',').map(str::to_owned).collect(),
                }
            })
            .collect();
        assert_eq!(again, a, "Mounts differs from Prepare:\n{printed}");
    }
    // In manager mode the daemon mounts nothing itself.
    let table = testsuite::mounts::self_mounts()?;
    let ours = testsuite::mounts::mounts_under(&table, &env.root);
    assert!(ours.is_empty(), "manager mode mounted {ours:?}");
    Ok(())
}

#[test]
fn manager_mode_mount_shapes_containerd_1_6() {
    e2e(|| manager_shapes(Version::V1_6));
}

#[test]
fn manager_mode_mount_shapes_containerd_1_7() {
    e2e(|| manager_shapes(Version::V1_7));
}

#[test]
fn manager_mode_mount_shapes_containerd_2_1() {
    e2e(|| manager_shapes(Version::V2_1));
}

// ---------------------------------------------------------------------------------------
// 8. Crashes during an import (Apply/Commit) and during a Remove, then a restart.

/// Whether the disk agrees with containerd's view: one directory per snapshot containerd
/// lists for us, no staging or removal leftovers, no mounts on directories that are gone.
fn disk_agrees(env: &Env) -> Result<bool> {
    let list = env.snapshot_list()?;
    let dirs = env.snapshot_dirs()?;
    let names: Vec<String> = dirs
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    if names.iter().any(|n| n.parse::<u64>().is_err()) || dirs.len() != list.len() {
        return Ok(false);
    }
    let snapshots = env.root.join("snapshots");
    let table = testsuite::mounts::self_mounts()?;
    for m in testsuite::mounts::mounts_under(&table, &snapshots) {
        let rel = m.mount_point.strip_prefix(&snapshots)?;
        let first = rel.components().next().context("mount on snapshots/")?;
        if !snapshots.join(first).is_dir() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Waits for [`disk_agrees`], nudging containerd's garbage collector (which calls Remove
/// and Cleanup on us) with a container run.
fn converge(env: &Env, image: &str) -> Result<()> {
    let mut last_nudge = std::time::Instant::now() - Duration::from_secs(60);
    env.wait_until("the disk to agree with containerd's snapshot list", || {
        if disk_agrees(env)? {
            return Ok(true);
        }
        if last_nudge.elapsed() > Duration::from_secs(5) {
            let out = env.ctd.run(SN, image, &["/bin/true"])?;
            env.check(&out, "ctr run /bin/true")?;
            last_nudge = std::time::Instant::now();
        }
        Ok(false)
    })
    .map_err(|e| {
        let dirs = env.snapshot_dirs().unwrap_or_default();
        let list = env.snapshot_list().unwrap_or_default();
        e.context(format!("disk {dirs:?}\ncontainerd {list:?}"))
    })
}

fn wait_for_abort(env: &mut Env, what: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !env.daemon_exited() {
        ensure!(
            std::time::Instant::now() < deadline,
            "the daemon did not reach crash point {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = env.daemon_log(5);
    ensure!(
        log.contains(&format!("crash point {what} reached")),
        "{log}"
    );
    env.kill_daemon()
}

fn crash_during_import(version: Version, point: &str) -> Result<()> {
    let mut env = Env::start_crashing_at(Path::new(BIN), version, point)?;
    let img = env.build(&images::whiteouts("crash-import")?)?;
    let r = env.import(&img);
    ensure!(
        r.is_err(),
        "import succeeded with the daemon aborting at {point}"
    );
    wait_for_abort(&mut env, point)?;
    env.restart_daemon()?;
    env.import(&img)?;
    let out = env.run(&img.name, &["/bin/sh", "-c", images::WHITEOUT_SCRIPT])?;
    assert_eq!(out, images::WHITEOUT_EXPECTED, "after a crash at {point}");
    check_image_layers(&env, &img)?;
    converge(&env, &img.name)?;
    check_image_layers(&env, &img)?;
    Ok(())
}

fn crash_during_remove(version: Version, point: &str) -> Result<()> {
    let mut env = Env::start(Path::new(BIN), version, MountMode::Host)?;
    let img = env.build(&images::busybox("crash-remove")?)?;
    env.import(&img)?;
    // A stopped container whose snapshot is removed below.
    let id = unique_name("doomed");
    env.run_keep(&img.name, &id, &["/bin/sh", "-c", "echo x > /written"])?;
    let upper = upper_dir(&env, &id)?;
    env.kill_daemon()?;
    env.restart_daemon_crashing_at(point)?;
    // Until containerd's channel has reconnected its garbage collector gives up on us.
    env.wait_reachable()?;
    // containerd removes the snapshot from its metadata at once, and from us when its
    // garbage collector runs: that Remove aborts the daemon.
    env.ctd.ctr_ok(&["containers", "rm", &id])?;
    wait_for_abort(&mut env, point)?;
    env.restart_daemon()?;
    let out = env.run(
        &img.name,
        &["/bin/sh", "-c", "cat /etc/motd; ls /written 2>&1; true"],
    )?;
    assert!(out.starts_with("hello from erofs\n"), "{out}");
    assert!(out.contains("No such file"), "{out}");
    converge(&env, &img.name)?;
    assert!(
        !upper.exists(),
        "the removed container's upper dir survives"
    );
    check_image_layers(&env, &img)?;
    Ok(())
}

fn crash_points(version: Version) -> Vec<&'static str> {
    let mut v = vec!["commit:after-layer", "commit:after-db-commit"];
    if version.proxy_diff() {
        v.push("apply:before-rename");
    }
    v
}

#[test]
fn kill_during_import_containerd_1_6() {
    e2e(|| {
        for p in crash_points(Version::V1_6) {
            crash_during_import(Version::V1_6, p).with_context(|| format!("crash at {p}"))?;
        }
        Ok(())
    });
}

#[test]
fn kill_during_import_containerd_1_7() {
    e2e(|| {
        for p in crash_points(Version::V1_7) {
            crash_during_import(Version::V1_7, p).with_context(|| format!("crash at {p}"))?;
        }
        Ok(())
    });
}

#[test]
fn kill_during_import_containerd_2_1() {
    e2e(|| {
        for p in crash_points(Version::V2_1) {
            crash_during_import(Version::V2_1, p).with_context(|| format!("crash at {p}"))?;
        }
        Ok(())
    });
}

#[test]
fn kill_during_remove_containerd_1_6() {
    e2e(|| {
        for p in ["remove:after-db-commit", "remove:after-rename"] {
            crash_during_remove(Version::V1_6, p).with_context(|| format!("crash at {p}"))?;
        }
        Ok(())
    });
}

#[test]
fn kill_during_remove_containerd_1_7() {
    e2e(|| {
        for p in ["remove:after-db-commit", "remove:after-rename"] {
            crash_during_remove(Version::V1_7, p).with_context(|| format!("crash at {p}"))?;
        }
        Ok(())
    });
}

#[test]
fn kill_during_remove_containerd_2_1() {
    e2e(|| {
        for p in ["remove:after-db-commit", "remove:after-rename"] {
            crash_during_remove(Version::V2_1, p).with_context(|| format!("crash at {p}"))?;
        }
        Ok(())
    });
}
