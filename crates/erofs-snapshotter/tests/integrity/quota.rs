//! `default_size`: each active snapshot writes into its own sparse ext4 image
//! (`rwlayer.img`, mkfs.ext4), loop-mounted at `fs/`; writing past it is ENOSPC; Usage sees
//! what was written; Commit converts `fs/upper` and deletes the image; the
//! `containerd.io/snapshot/max-size` label sizes one snapshot.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use testsuite::mounts::{self_mounts_under, unmount_all_under};

use testsuite::client::labels;

use crate::common::{BIN, Cfg, ENOSPC, Env, LABEL_MAX_SIZE, run};

const MIB: u64 = 1 << 20;

/// Writes a recognisable pattern into `path` until the filesystem is full; returns the bytes
/// written. Fails unless the error that stops it is ENOSPC, or past `limit` bytes.
fn fill_until_enospc(path: &Path, limit: u64) -> Result<u64> {
    let mut f = File::create(path)?;
    let chunk: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let mut written = 0u64;
    let err = loop {
        match f.write(&chunk) {
            Ok(0) => bail!("write returned 0 after {written} bytes"),
            Ok(n) => written += n as u64,
            Err(e) => break e,
        }
        ensure!(
            written <= limit,
            "wrote {written} bytes into {} without ENOSPC (limit {limit})",
            path.display()
        );
    };
    ensure!(
        err.raw_os_error() == Some(ENOSPC),
        "writing {} stopped at {written} bytes with {err}, not ENOSPC",
        path.display()
    );
    f.sync_all()?;
    Ok(written)
}

/// The ext4 mount of snapshot `id`'s writable layer, if any.
fn ext4_mount(env: &Env, id: u64) -> Result<Option<String>> {
    let fs_dir = env.snapshot_dir(id).join("fs");
    Ok(self_mounts_under(&fs_dir)?
        .into_iter()
        .find(|m| m.mount_point == fs_dir && m.fs_type == "ext4")
        .map(|m| m.source))
}

fn rwlayer(env: &Env, id: u64) -> std::path::PathBuf {
    env.snapshot_dir(id).join("rwlayer.img")
}

#[test]
fn quota_with_a_real_ext4_image() {
    run(
        Env::new(BIN, Cfg::new().sn("default_size = \"16MB\"")),
        async |env| {
            let mounts = env.c().prepare("q/a", "").await?;
            let id = env.id_of_mounts(&mounts)?;
            let img = rwlayer(env, id);
            let md = fs::metadata(&img).with_context(|| format!("{}", img.display()))?;
            ensure!(md.len() == 16 * MIB, "rwlayer.img is {} bytes", md.len());
            ensure!(
                md.blocks() * 512 < 8 * MIB,
                "rwlayer.img is not sparse: {} bytes allocated",
                md.blocks() * 512
            );
            let dev = ext4_mount(env, id)?.context("no ext4 mount at fs/")?;
            ensure!(
                dev.starts_with("/dev/loop"),
                "ext4 writable layer mounted from {dev}"
            );
            // The bind mount shows fs/upper.
            ensure!(mounts[0].source.ends_with("/fs/upper"), "mounts {mounts:?}");
            let m = env.mount(&mounts, "quota")?;
            fs::create_dir_all(m.path().join("etc"))?;
            fs::write(m.path().join("etc/motd"), b"quota\n")?;
            let written = fill_until_enospc(&m.path().join("big"), 32 * MIB)?;
            eprintln!("16MB writable layer: ENOSPC after {written} bytes");
            ensure!(
                (8 * MIB..16 * MIB).contains(&written),
                "ENOSPC after {written} bytes on a 16 MiB layer"
            );
            // Another file hits ENOSPC at once too (what the flush of the first file gave back
            // from its reservations, at most).
            let more = fill_until_enospc(&m.path().join("more"), MIB)?;
            fs::remove_file(m.path().join("more"))?;
            eprintln!("then {more} bytes more");
            m.unmount()?;

            let (size, inodes) = env.c().usage("q/a").await?;
            eprintln!("usage: {size} bytes, {inodes} inodes");
            ensure!(
                size as u64 >= written && (size as u64) < written + MIB,
                "Usage says {size} bytes; {written} bytes were written"
            );
            ensure!(inodes >= 3, "Usage says {inodes} inodes");

            env.c().commit("q/c", "q/a").await?;
            ensure!(
                !img.exists(),
                "{} is still there after Commit",
                img.display()
            );
            ensure!(
                ext4_mount(env, id)?.is_none(),
                "the ext4 layer is still mounted after Commit"
            );
            let layer = env.layer(id);
            ensure!(layer.exists(), "Commit wrote no {}", layer.display());

            // The committed layer holds what was written.
            let mounts = env.c().view("q/v", "q/c").await?;
            let v = env.mount(&mounts, "view")?;
            ensure!(fs::read(v.path().join("etc/motd"))? == b"quota\n");
            let big = fs::read(v.path().join("big"))?;
            ensure!(
                big.len() as u64 == written,
                "big is {} bytes in the layer, {written} were written",
                big.len()
            );
            ensure!(
                big.iter()
                    .enumerate()
                    .all(|(i, b)| *b == ((i % (256 * 1024)) % 251) as u8)
            );
            ensure!(!v.path().join("upper").exists() && !v.path().join("work").exists());
            v.unmount()?;
            env.c().remove("q/v").await?;

            // max-size smaller than default_size, on top of a parent (overlay upper in the
            // ext4 image).
            let small = (8 * MIB).to_string();
            let mounts = env
                .c()
                .prepare_with("q/small", "q/c", labels(&[(LABEL_MAX_SIZE, &small)]))
                .await?;
            let sid = env.id_of_mounts(&mounts)?;
            ensure!(fs::metadata(rwlayer(env, sid))?.len() == 8 * MIB);
            ensure!(mounts[0].r#type == "overlay", "{mounts:?}");
            let m = env.mount(&mounts, "small")?;
            ensure!(fs::read(m.path().join("etc/motd"))? == b"quota\n");
            let w = fill_until_enospc(&m.path().join("big2"), 16 * MIB)?;
            eprintln!("8MB max-size label: ENOSPC after {w} bytes");
            ensure!(w < 8 * MIB && w > 2 * MIB, "ENOSPC after {w} bytes");
            m.unmount()?;
            env.c().remove("q/small").await?;
            ensure!(!env.snapshot_dir(sid).exists());

            // max-size larger than default_size.
            let large = (48 * MIB).to_string();
            let mounts = env
                .c()
                .prepare_with("q/large", "", labels(&[(LABEL_MAX_SIZE, &large)]))
                .await?;
            let lid = env.id_of_mounts(&mounts)?;
            ensure!(fs::metadata(rwlayer(env, lid))?.len() == 48 * MIB);
            let m = env.mount(&mounts, "large")?;
            fs::write(m.path().join("twenty"), vec![7u8; 20 * MIB as usize])?;
            let w = fill_until_enospc(&m.path().join("rest"), 64 * MIB)?;
            ensure!(
                20 * MIB + w > 32 * MIB && 20 * MIB + w < 48 * MIB,
                "48MB layer full after {} bytes",
                20 * MIB + w
            );
            m.unmount()?;
            env.c().remove("q/large").await?;

            // Views get no writable layer at all.
            env.c().view("q/v2", "q/c").await?;
            for e in fs::read_dir(env.snapshots_dir())? {
                let img = e?.path().join("rwlayer.img");
                ensure!(!img.exists(), "{} exists with only a view", img.display());
            }
            env.c().remove("q/v2").await?;
            env.c().remove("q/c").await?;
            ensure!(!env.snapshot_dir(id).exists());
            Ok(())
        },
    );
}

/// After a reboot (no mounts left; simulated by stopping the daemon and detaching everything
/// under its root), an active size-limited snapshot still reports what was written to it,
/// mounts again with its data, and commits it.
#[test]
fn quota_after_a_reboot() {
    run(
        Env::new(BIN, Cfg::new().sn("default_size = \"16MB\"")),
        async |env| {
            let mounts = env.c().prepare("qr/a", "").await?;
            let id = env.id_of_mounts(&mounts)?;
            let m = env.mount(&mounts, "before")?;
            fs::write(m.path().join("four-mib"), vec![4u8; 4 * MIB as usize])?;
            File::open(m.path().join("four-mib"))?.sync_all()?;
            m.unmount()?;
            let (before, _) = env.c().usage("qr/a").await?;
            ensure!(before as u64 >= 4 * MIB, "usage {before} before the reboot");

            env.stop()?;
            unmount_all_under(&env.root)?;
            env.start().await?;
            ensure!(
                ext4_mount(env, id)?.is_none(),
                "the ext4 layer came back by itself"
            );
            // (Checked at the end, so the rest of the sequence is exercised either way.)
            let (after, _) = env.c().usage("qr/a").await?;
            let mounts = env.c().mounts("qr/a").await?;
            let m = env.mount(&mounts, "after")?;
            ensure!(fs::metadata(m.path().join("four-mib"))?.len() == 4 * MIB);
            m.unmount()?;
            env.stop()?;
            unmount_all_under(&env.root)?;
            env.start().await?;
            env.c().commit("qr/c", "qr/a").await?;
            ensure!(!rwlayer(env, id).exists());
            let mounts = env.c().view("qr/v", "qr/c").await?;
            let m = env.mount(&mounts, "view")?;
            ensure!(fs::metadata(m.path().join("four-mib"))?.len() == 4 * MIB);
            m.unmount()?;
            ensure!(
                after == before,
                "Usage of the active snapshot after a reboot: {after} bytes (before: {before})"
            );
            Ok(())
        },
    );
}
