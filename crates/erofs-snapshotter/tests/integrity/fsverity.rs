//! fs-verity on a kernel without it ("userspace mode"): each layer's fs-verity digest is
//! computed at Commit, recorded, and recomputed before the layer is mounted, for every layer
//! of a chain; a flipped byte or a replaced `layer.erofs` is refused with an error naming the
//! layer. `fsverity = "on"` refuses to start. The recorded digests equal `fsverity digest`.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use tonic::Code;

use testsuite::client::expect_code;

use crate::common::{BIN, Cfg, Env, flip_byte, gzip, is_immutable, run, run_ok};

fn cfg() -> Cfg {
    Cfg::new()
        .sn("enable_fsverity = true")
        .sn("set_immutable = true")
}

/// `fsverity digest` (Debian's fsverity-utils) of a file, hex.
fn fsverity_utils_digest(path: &std::path::Path) -> Result<String> {
    let out = run_ok(
        Command::new("fsverity")
            .args(["digest", "--hash-alg=sha256", "--block-size=4096"])
            .arg(path),
    )?;
    Ok(out
        .split_whitespace()
        .next()
        .context("empty fsverity output")?
        .trim_start_matches("sha256:")
        .to_string())
}

/// Replace `layer` (clearing its immutable flag first) by a copy of `with`, as a new file.
fn swap(layer: &std::path::Path, with: &std::path::Path) -> Result<()> {
    erofs_sys::flags::set_immutable_path(layer, false)?;
    let tmp = layer.with_extension("swap");
    fs::copy(with, &tmp)?;
    fs::rename(&tmp, layer)?;
    Ok(())
}

/// Whether a refusal names the layer and says why.
fn names(s: &tonic::Status, layer: &str) -> Result<()> {
    ensure!(
        s.message().contains(&format!("{layer:?}")) && s.message().contains("modified or replaced"),
        "the error does not name layer {layer:?} or the reason: {}",
        s.message()
    );
    Ok(())
}

#[test]
fn tampered_layers_are_refused_in_userspace_mode() {
    run(Env::new(BIN, cfg()), async |env| {
        let log = env.log_text();
        ensure!(
            log.contains("fs-verity is unsupported here") && log.contains("userspace"),
            "no start-up message about userspace fs-verity:\n{}",
            env.log_tail(10)
        );
        ensure!(log.contains("fsverity=Userspace"), "{}", env.log_tail(10));

        // A chain of three layers; l3 is never mounted before the tampering.
        let l1 = env
            .layer_with("fsv/1", "", "fsv/l1", &[("etc/one", b"one\n")])
            .await?;
        let l2 = env
            .layer_with("fsv/2", "fsv/l1", "fsv/l2", &[("etc/two", b"two\n")])
            .await?;
        let l3 = env
            .layer_with(
                "fsv/3",
                "fsv/l2",
                "fsv/l3",
                &[("etc/three", vec![3u8; 100_000].as_slice())],
            )
            .await?;
        for id in [l1, l2, l3] {
            ensure!(is_immutable(&env.layer(id))?);
        }

        // 1. One byte of the top layer flipped (it was never mounted).
        let layer3 = env.layer(l3);
        let pristine3 = env.work.join("l3.pristine");
        fs::copy(&layer3, &pristine3)?;
        erofs_sys::flags::set_immutable_path(&layer3, false)?;
        let mid = fs::metadata(&layer3)?.len() / 2;
        flip_byte(&layer3, mid)?;
        let s = expect_code(
            env.c().view("fsv/v1", "fsv/l3").await,
            Code::FailedPrecondition,
            "View on a layer with a flipped byte",
        )?;
        names(&s, "fsv/l3")?;
        let s = expect_code(
            env.c().prepare("fsv/p1", "fsv/l3").await,
            Code::FailedPrecondition,
            "Prepare on a layer with a flipped byte",
        )?;
        names(&s, "fsv/l3")?;
        // Flipped back: accepted again (the check is exact, not a blanket refusal).
        flip_byte(&layer3, mid)?;
        let mounts = env.c().view("fsv/v2", "fsv/l3").await?;
        let m = env.mount(&mounts, "v2")?;
        ensure!(fs::read(m.path().join("etc/one"))? == b"one\n");
        ensure!(fs::read(m.path().join("etc/three"))?.len() == 100_000);
        m.unmount()?;
        env.c().remove("fsv/v2").await?;

        // 2. The bottom layer replaced by another valid image (the swap attack): every layer
        // of the chain is checked, not only the one the snapshot sits on.
        for id in [l1, l2, l3] {
            env.unmount_layer(id)?;
        }
        let layer1 = env.layer(l1);
        let pristine1 = env.work.join("l1.pristine");
        fs::copy(&layer1, &pristine1)?;
        swap(&layer1, &env.layer(l2))?;
        erofs_image::Image::open(fs::File::open(&layer1)?)
            .context("the swapped-in image is valid")?;
        let s = expect_code(
            env.c().prepare("fsv/p2", "fsv/l3").await,
            Code::FailedPrecondition,
            "Prepare on a chain whose bottom layer was replaced",
        )?;
        names(&s, "fsv/l1")?;
        let s = expect_code(
            env.c().view("fsv/v3", "fsv/l1").await,
            Code::FailedPrecondition,
            "View of a replaced layer",
        )?;
        names(&s, "fsv/l1")?;
        swap(&layer1, &pristine1)?;
        let mounts = env.c().prepare("fsv/p3", "fsv/l3").await?;
        let m = env.mount(&mounts, "p3")?;
        ensure!(fs::read(m.path().join("etc/two"))? == b"two\n");
        m.unmount()?;
        env.c().remove("fsv/p3").await?;

        // 3. The digests survive a restart, and are what `fsverity digest` computes.
        for id in [l1, l2, l3] {
            env.unmount_layer(id)?;
        }
        env.stop()?;
        {
            let store = snapshotter::store::Store::open(&env.root.join("metadata.redb"))?;
            for (name, id) in [("fsv/l1", l1), ("fsv/l2", l2), ("fsv/l3", l3)] {
                let rec = store.read(|tx| tx.require(name))?;
                ensure!(rec.id == id);
                let recorded = rec
                    .layer
                    .as_ref()
                    .and_then(|l| l.fsverity_digest.clone())
                    .with_context(|| format!("no digest recorded for {name}"))?;
                let theirs = fsverity_utils_digest(&env.layer(id))?;
                ensure!(
                    recorded == theirs,
                    "{name}: recorded digest {recorded}, fsverity digest says {theirs}"
                );
            }
        }
        flip_byte(&layer3, 0)?;
        env.start().await?;
        let s = expect_code(
            env.c().view("fsv/v4", "fsv/l3").await,
            Code::FailedPrecondition,
            "View after a restart on a tampered layer",
        )?;
        names(&s, "fsv/l3")?;
        swap(&layer3, &pristine3)?;
        env.c().view("fsv/v5", "fsv/l3").await?;
        Ok(())
    });
}

/// A View or Prepare refused because a layer was tampered with leaves no snapshot behind: the
/// same key can be used again once the layer is restored, and no directory is left.
#[test]
fn refused_view_leaves_no_snapshot() {
    run(Env::new(BIN, cfg()), async |env| {
        let id = env
            .layer_with("ref/1", "", "ref/l", &[("etc/one", b"one\n")])
            .await?;
        let layer = env.layer(id);
        erofs_sys::flags::set_immutable_path(&layer, false)?;
        flip_byte(&layer, 4096)?;
        let dirs_before = fs::read_dir(env.snapshots_dir())?.count();
        for (kind, r) in [
            ("View", env.c().view("ref/v", "ref/l").await),
            ("Prepare", env.c().prepare("ref/p", "ref/l").await),
        ] {
            let s = expect_code(r, Code::FailedPrecondition, kind)?;
            names(&s, "ref/l")?;
        }
        let dirs_after = fs::read_dir(env.snapshots_dir())?.count();
        let mut left = Vec::new();
        for k in ["ref/v", "ref/p"] {
            match env.c().stat(k).await {
                Err(s) if s.code() == Code::NotFound => {}
                Ok(i) => left.push(format!("{k} ({:?})", i.kind)),
                Err(s) => left.push(format!("{k}: Stat failed with {s}")),
            }
        }
        ensure!(
            left.is_empty() && dirs_after == dirs_before,
            "refused creations left snapshots behind: {left:?}; snapshot directories {dirs_before} -> {dirs_after}"
        );
        flip_byte(&layer, 4096)?;
        env.c().view("ref/v", "ref/l").await?;
        Ok(())
    });
}

/// The recorded digest of a real layer (busybox, applied through the Diff service) equals
/// `fsverity digest`, and so does our library's digest of a multi-level tree.
#[test]
fn digest_of_a_real_layer_equals_fsverity_utils() {
    run(Env::new(BIN, cfg()), async |env| {
        let tar = testsuite::oci::busybox_base_layer()?;
        let desc = env.add_blob("application/vnd.oci.image.layer.v1.tar+gzip", &gzip(&tar)?)?;
        let (id, _) = env.apply_layer("dig/a", "dig/busybox", &desc).await?;
        let layer = env.layer(id);
        let len = fs::metadata(&layer)?.len();
        ensure!(len > 1 << 20, "busybox layer is only {len} bytes");
        let theirs = fsverity_utils_digest(&layer)?;
        let ours = hex::encode(snapshotter::integrity::verity::fsverity_digest(
            &fs::File::open(&layer)?,
            len,
            4096,
        )?);
        ensure!(ours == theirs, "ours {ours}, fsverity digest {theirs}");
        env.stop()?;
        let store = snapshotter::store::Store::open(&env.root.join("metadata.redb"))?;
        let rec = store.read(|tx| tx.require("dig/busybox"))?;
        let recorded = rec.layer.and_then(|l| l.fsverity_digest);
        ensure!(
            recorded.as_deref() == Some(theirs.as_str()),
            "recorded {recorded:?}, fsverity digest {theirs}"
        );
        drop(store);
        env.start().await?;
        Ok(())
    });
}

/// `fsverity = "on"` on a kernel without fs-verity: the daemon refuses to start and says why.
#[test]
fn fsverity_on_refuses_to_start() {
    let mut env = Env::new(
        BIN,
        Cfg::new()
            .sn("enable_fsverity = true")
            .sn("fsverity = \"on\""),
    )
    .unwrap();
    let (st, log) = env.start_expecting_refusal().unwrap();
    assert!(!st.success(), "exit status {st}");
    assert!(
        log.contains("fs-verity is required") && log.contains("fsverity = \"on\""),
        "unclear refusal:\n{log}"
    );
    assert!(!env.socket.exists(), "a socket was left behind");
}
