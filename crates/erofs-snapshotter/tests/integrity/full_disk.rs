//! Full disk (issue 11): the root on a small tmpfs. Prepare, Apply, Commit and Compare refuse
//! to start below the free-space reserve (`daemon.min_free_space`) and stop when their writes
//! reach it or the filesystem fills, with RESOURCE_EXHAUSTED naming the root and the numbers;
//! they leave nothing partial, the daemon keeps serving, and the same request succeeds once
//! space is freed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use containerd_api::containerd::types::Descriptor;
use testsuite::client::expect_code;
use testsuite::oci::LayerBuilder;
use tonic::Code;

use crate::common::{BIN, Cfg, Env, gzip, run};

const MIB: u64 = 1 << 20;
/// The small filesystem under the root.
const TMPFS: &str = "mode=0700,size=96m";

/// Free bytes under `root`.
fn free(root: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(root)?;
    Ok(st.f_bavail * st.f_frsize)
}

/// Leave about `left` bytes free under `root`, with a filler file `root/filler`.
fn fill_to(root: &Path, left: u64) -> Result<()> {
    let path = root.join("filler");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)?;
    let chunk = vec![0x5au8; 64 << 10];
    while free(root)? > left + chunk.len() as u64 {
        f.write_all(&chunk)
            .with_context(|| format!("filling {}", root.display()))?;
    }
    f.sync_all()?;
    let now = free(root)?;
    ensure!(now <= left + (64 << 10), "{now} bytes free, wanted {left}");
    Ok(())
}

/// Give the filler's space back.
fn unfill(root: &Path) -> Result<()> {
    std::fs::remove_file(root.join("filler")).context("removing the filler")
}

/// Hard-to-compress bytes.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A gzip layer with one file of `size` hard-to-compress bytes, in the content directory
/// (not on the small filesystem).
fn layer_blob(env: &Env, size: usize, seed: u64) -> Result<Descriptor> {
    let mut l = LayerBuilder::new();
    l.file("data", 0o644, &noise(size, seed));
    env.add_blob(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        &gzip(&l.finish()?)?,
    )
}

fn cfg(reserve: &str) -> Cfg {
    Cfg::new().top(&format!("[daemon]\nmin_free_space = {reserve:?}"))
}

/// Nothing of a stopped Apply or Commit in snapshot `id`, nothing in ROOT/tmp.
fn nothing_partial(env: &Env, id: u64) -> Result<()> {
    for f in ["layer.erofs", "layer.erofs.tmp", "layer.erofs.pending"] {
        let p = env.snapshot_dir(id).join(f);
        ensure!(!p.exists(), "{} was left", p.display());
    }
    let tmp = env.root.join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "left in ROOT/tmp: {left:?}");
    Ok(())
}

/// The message names the root and says what the reserve is.
fn names_root_and_numbers(env: &Env, s: &tonic::Status) -> Result<()> {
    let m = s.message();
    ensure!(
        m.contains(&env.root.display().to_string()),
        "the message does not name the root: {m}"
    );
    ensure!(m.contains("free"), "no numbers: {m}");
    Ok(())
}

/// Below the reserve, Prepare and Apply refuse before doing anything; after freeing space the
/// same calls succeed.
#[test]
fn below_the_reserve_prepare_and_apply_refuse_to_start() {
    run(
        Env::on_fs_with(BIN, cfg("16MiB"), "tmpfs", TMPFS),
        async |env| {
            let desc = layer_blob(env, 24 << 20, 1)?;
            let m = env.c().prepare("a", "").await?;
            let id = env.id_of_mounts(&m)?;
            fill_to(&env.root, 10 * MIB)?;
            let s = expect_code(
                env.c().prepare("b", "").await,
                Code::ResourceExhausted,
                "Prepare below the reserve",
            )?;
            eprintln!("Prepare: {}", s.message());
            names_root_and_numbers(env, &s)?;
            ensure!(
                s.message().contains("daemon.min_free_space"),
                "{}",
                s.message()
            );
            let s = expect_code(
                env.c().apply(&desc, &m).await,
                Code::ResourceExhausted,
                "Apply below the reserve",
            )?;
            names_root_and_numbers(env, &s)?;
            nothing_partial(env, id)?;
            // Still serving.
            env.c().stat("a").await?;
            unfill(&env.root)?;
            env.c().prepare("b", "").await?;
            env.c().apply(&desc, &m).await?;
            env.c().commit("a-layer", "a").await?;
            Ok(())
        },
    )
}

/// An Apply of a 24 MiB layer with `left` bytes free under a `reserve`: RESOURCE_EXHAUSTED
/// (`what`, its message naming the root and the numbers, and holding `says`), nothing left,
/// the daemon still serving; once space is freed the same Apply succeeds.
fn apply_runs_out(reserve: &str, seed: u64, left: u64, what: &'static str, says: &'static str) {
    run(
        Env::on_fs_with(BIN, cfg(reserve), "tmpfs", TMPFS),
        async |env| {
            let desc = layer_blob(env, 24 << 20, seed)?;
            let m = env.c().prepare("a", "").await?;
            let id = env.id_of_mounts(&m)?;
            fill_to(&env.root, left)?;
            let s = expect_code(
                env.c().apply(&desc, &m).await,
                Code::ResourceExhausted,
                what,
            )?;
            eprintln!("{what}: {}", s.message());
            names_root_and_numbers(env, &s)?;
            ensure!(s.message().contains(says), "{}", s.message());
            nothing_partial(env, id)?;
            env.c().stat("a").await?;
            unfill(&env.root)?;
            env.c().apply(&desc, &m).await?;
            env.c().commit("a-layer", "a").await?;
            Ok(())
        },
    )
}

/// An Apply whose writes would take free space below the reserve stops when they do.
#[test]
fn apply_stops_at_the_reserve() {
    apply_runs_out(
        "16MiB",
        2,
        30 * MIB,
        "Apply that reaches the reserve",
        "daemon.min_free_space",
    );
}

/// Without a reserve, an Apply that fills the filesystem (ENOSPC) says how full it is.
#[test]
fn apply_that_fills_the_disk() {
    apply_runs_out("0", 3, 10 * MIB, "Apply onto a full disk", "out of space");
}

/// A Commit that converts an upper directory: refused below the reserve, stopped when its
/// layer would take free space below it; the snapshot stays active with nothing left over,
/// and the same Commit succeeds after freeing space.
#[test]
fn commit_conversion_on_a_full_disk() {
    run(
        Env::on_fs_with(BIN, cfg("8MiB"), "tmpfs", TMPFS),
        async |env| {
            let m = env.c().prepare("c", "").await?;
            let id = env.id_of_mounts(&m)?;
            let mnt = env.mount(&m, "upper")?;
            std::fs::write(mnt.path().join("data"), noise(20 << 20, 4))?;
            mnt.unmount()?;
            for (left, what) in [
                (4 * MIB, "Commit below the reserve"),
                (16 * MIB, "Commit whose layer reaches the reserve"),
            ] {
                fill_to(&env.root, left)?;
                let s = expect_code(
                    env.c().commit("c-layer", "c").await,
                    Code::ResourceExhausted,
                    what,
                )?;
                eprintln!("{what}: {}", s.message());
                names_root_and_numbers(env, &s)?;
                nothing_partial(env, id)?;
                let info = env.c().stat("c").await?;
                ensure!(info.kind == 2, "the snapshot is no longer active: {info:?}");
                unfill(&env.root)?;
            }
            env.c().commit("c-layer", "c").await?;
            ensure!(env.layer(id).exists());
            Ok(())
        },
    )
}

/// A tmpfs of `size` at `dir`, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> Result<SmallFs> {
        std::fs::create_dir_all(dir)?;
        let data = std::ffi::CString::new(format!("mode=0700,size={size}"))?;
        rustix::mount::mount(
            c"tmpfs",
            dir,
            c"tmpfs",
            rustix::mount::MountFlags::empty(),
            data.as_c_str(),
        )
        .with_context(|| format!("mounting a tmpfs at {}", dir.display()))?;
        Ok(SmallFs(dir.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

/// Compare (in process: storing the diff needs containerd; the writing is the core's) on a
/// small filesystem: refused below the reserve, stopped when the diff takes free space below
/// it, nothing left in ROOT/tmp, and the same Compare succeeds after freeing space.
#[test]
fn compare_on_a_full_disk() {
    assert!(rustix::process::geteuid().is_root(), "this test mounts");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let _fs = SmallFs::mount(&root, "64m").unwrap();
    let cfg = snapshotter::Config::parse(&format!(
        "root_path = {:?}\naddress = {:?}\n[daemon]\nmin_free_space = \"8MiB\"\n",
        root.display().to_string(),
        dir.path().join("unused.sock").display().to_string()
    ))
    .unwrap();
    let sn =
        snapshotter::Snapshotter::open(cfg, Arc::new(snapshotter::mount::RecordingMounter::new()))
            .unwrap();
    let never = snapshotter::Cancel::never();
    let m = sn.prepare("d-a", "", BTreeMap::new()).unwrap();
    std::fs::write(Path::new(&m[0].source).join("data"), noise(20 << 20, 5)).unwrap();
    sn.commit("d", "d-a", BTreeMap::new(), "", &never).unwrap();
    let view = sn.view("d-view", "d", BTreeMap::new()).unwrap();
    let tmp = root.join("tmp");
    for left in [4 * MIB, 18 * MIB] {
        fill_to(&root, left).unwrap();
        let e = sn.compare(&[], &view, "", None, &never).unwrap_err();
        eprintln!("Compare with {} MiB free: {e}", left >> 20);
        assert_eq!(e.kind(), snapshotter::ErrorKind::ResourceExhausted, "{e}");
        assert!(e.to_string().contains(&root.display().to_string()), "{e}");
        let left_over: Vec<_> = std::fs::read_dir(&tmp)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left_over.is_empty(), "left in ROOT/tmp: {left_over:?}");
        unfill(&root).unwrap();
    }
    let blob = sn.compare(&[], &view, "", None, &never).unwrap();
    assert!(blob.size > 19 << 20, "{}", blob.size);
}
