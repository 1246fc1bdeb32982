//! Kernel fs-verity (`enable_fsverity = true`, `fsverity = "on"`, so a kernel or filesystem
//! without it fails the start with the reason): every committed layer has fs-verity enabled
//! by the daemon, its recorded digest is the kernel's measurement and `fsverity digest`'s,
//! nobody can open it for writing, and a byte flipped underneath the filesystem (on the
//! block device, caches dropped) fails reads with EIO and the next mount of the layer.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::common::{BIN, Cfg, Env, gzip, run, run_ok};
use crate::sys::drop_caches;

pub fn cfg() -> Cfg {
    Cfg::new()
        .sn("enable_fsverity = true")
        .sn("fsverity = \"on\"")
}

/// `fsverity measure` (the kernel's FS_IOC_MEASURE_VERITY) of a file, hex.
pub fn kernel_measure(path: &Path) -> Result<String> {
    let out = run_ok(Command::new("fsverity").arg("measure").arg(path))
        .with_context(|| format!("fs-verity is not enabled on {}", path.display()))?;
    hex_of(&out)
}

/// `fsverity digest` (computed in userspace by fsverity-utils) of a file, hex.
pub fn utils_digest(path: &Path) -> Result<String> {
    hex_of(&run_ok(
        Command::new("fsverity")
            .args(["digest", "--hash-alg=sha256", "--block-size=4096"])
            .arg(path),
    )?)
}

fn hex_of(out: &str) -> Result<String> {
    Ok(out
        .split_whitespace()
        .next()
        .context("empty fsverity output")?
        .trim_start_matches("sha256:")
        .to_string())
}

/// A file body with a marker at `at` that can be found again in the layer image.
pub fn marked(len: usize, at: usize, marker: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8 + 1).collect();
    v[at..at + marker.len()].copy_from_slice(marker);
    v
}

/// The offset of `marker` in the file at `path`.
pub fn find(path: &Path, marker: &[u8]) -> Result<u64> {
    let data = fs::read(path)?;
    data.windows(marker.len())
        .position(|w| w == marker)
        .map(|p| p as u64)
        .with_context(|| format!("marker not found in {}", path.display()))
}

/// The block device holding `path`'s filesystem (`/dev/vda` in the guest).
pub fn device_of(path: &Path) -> Result<PathBuf> {
    let st = rustix::fs::stat(path)?;
    let (maj, min) = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev));
    let uevent = fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/uevent"))
        .with_context(|| format!("{} is not on a block device ({maj}:{min})", path.display()))?;
    let name = uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .context("no DEVNAME in uevent")?;
    Ok(PathBuf::from("/dev").join(name))
}

/// The byte offset on the device of byte `off` of `path` (`filefrag -v`'s extent map, in
/// 4 KiB blocks).
pub fn physical_offset(path: &Path, off: u64) -> Result<u64> {
    let out = run_ok(Command::new("filefrag").args(["-v", "-b4096"]).arg(path))?;
    let block = off / 4096;
    for line in out.lines() {
        // "   0:        0..       2:      34816..     34818:      3:   last,eof"
        let f: Vec<&str> = line.split(':').map(str::trim).collect();
        if f.len() < 4 || f[0].parse::<u64>().is_err() {
            continue;
        }
        let range = |s: &str| -> Option<(u64, u64)> {
            let (a, b) = s.split_once("..")?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        };
        let (Some((l0, l1)), Some((p0, _))) = (range(f[1]), range(f[2])) else {
            continue;
        };
        if (l0..=l1).contains(&block) {
            return Ok((p0 + block - l0) * 4096 + off % 4096);
        }
    }
    bail!("byte {off} of {} is in no extent:\n{out}", path.display())
}

/// Flips every bit of the byte at `off` on the block device `dev`, durably.
pub fn flip_on_device(dev: &Path, off: u64) -> Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .with_context(|| format!("opening {}", dev.display()))?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off)?;
    f.write_all_at(&[!b[0]], off)?;
    f.sync_all()?;
    Ok(())
}

#[test]
fn kernel_fsverity_on_every_committed_layer() {
    run(Env::new(BIN, cfg()), async |env| {
        ensure!(
            env.log_text().contains("fsverity=Kernel"),
            "the daemon does not use kernel fs-verity:\n{}",
            env.log_tail(10)
        );
        let l1 = env
            .layer_with("kv/1", "", "kv/l1", &[("etc/one", b"one\n")])
            .await?;
        let l2 = env
            .layer_with("kv/2", "kv/l1", "kv/l2", &[("etc/two", &[2u8; 50_000])])
            .await?;
        let tar = testsuite::oci::busybox_base_layer()?;
        let desc = env.add_blob("application/vnd.oci.image.layer.v1.tar+gzip", &gzip(&tar)?)?;
        let (l3, _) = env.apply_layer("kv/a", "kv/busybox", &desc).await?;
        let mut measured = Vec::new();
        for (name, id) in [("kv/l1", l1), ("kv/l2", l2), ("kv/busybox", l3)] {
            let layer = env.layer(id);
            let kernel = kernel_measure(&layer)?;
            let utils = utils_digest(&layer)?;
            ensure!(
                kernel == utils,
                "{name}: kernel measures {kernel}, fsverity digest computes {utils}"
            );
            // fs-verity files are read-only for everyone, root included.
            let w = OpenOptions::new().write(true).open(&layer);
            ensure!(
                w.as_ref().err().and_then(|e| e.raw_os_error()) == Some(1),
                "{name}: opening a verity layer for writing gave {w:?}, not EPERM"
            );
            measured.push((name, kernel));
        }
        let mounts = env.c().prepare("kv/c", "kv/l2").await?;
        let m = env.mount(&mounts, "c")?;
        ensure!(fs::read(m.path().join("etc/two"))? == [2u8; 50_000]);
        m.unmount()?;
        env.c().remove("kv/c").await?;
        env.stop()?;
        {
            let store = snapshotter::store::Store::open(&env.root.join("metadata.redb"))?;
            for (name, kernel) in &measured {
                let rec = store.read(|tx| tx.require(name))?;
                let recorded = rec.layer.and_then(|l| l.fsverity_digest);
                ensure!(
                    recorded.as_deref() == Some(kernel.as_str()),
                    "{name}: recorded {recorded:?}, measured {kernel}"
                );
            }
        }
        env.start().await?;
        Ok(())
    });
}

#[test]
fn byte_flipped_underneath_fails_reads_with_eio_and_the_next_mount() {
    run(Env::new(BIN, cfg()), async |env| {
        const MARK: &[u8] = b"KERNEL-FSVERITY-MARKER";
        let body = marked(300_000, 200_000, MARK);
        let l1 = env
            .layer_with("fl/1", "", "fl/l1", &[("data/big", &body)])
            .await?;
        env.layer_with("fl/2", "fl/l1", "fl/l2", &[("etc/two", b"two\n")])
            .await?;
        let mounts = env.c().prepare("fl/c", "fl/l2").await?;
        let m = env.mount(&mounts, "c")?;
        ensure!(fs::read(m.path().join("data/big"))? == body);

        let layer = env.layer(l1);
        let dev = device_of(&layer)?;
        let data_at = physical_offset(&layer, find(&layer, MARK)?)?;
        flip_on_device(&dev, data_at)?;
        drop_caches()?;
        match fs::read(m.path().join("data/big")) {
            Err(e) if e.raw_os_error() == Some(5) => {}
            other => bail!(
                "reading a layer file whose block was flipped on {} gave {:?}, not EIO",
                dev.display(),
                other.map(|v| v == body)
            ),
        }
        m.unmount()?;
        env.c().remove("fl/c").await?;

        // The layer's superblock flipped too: the next mount of the layer is refused.
        env.unmount_layer(l1)?;
        let sb_at = physical_offset(&layer, 1024)?;
        flip_on_device(&dev, sb_at)?;
        drop_caches()?;
        let r = env.c().view("fl/v", "fl/l1").await;
        let s = match r {
            Ok(m) => bail!("a View of a layer with a flipped superblock was allowed: {m:?}"),
            Err(s) => s,
        };
        let path = layer.display().to_string();
        let fs_dir = env.snapshot_dir(l1).join("fs").display().to_string();
        ensure!(
            s.message().contains("fl/l1")
                || s.message().contains(&path)
                || s.message().contains(&fs_dir),
            "the refusal does not name the layer: {s}"
        );

        // Both bytes put back: the layer is whole again.
        flip_on_device(&dev, data_at)?;
        flip_on_device(&dev, sb_at)?;
        drop_caches()?;
        let v = env.c().view("fl/v2", "fl/l1").await?;
        let vm = env.mount(&v, "v2")?;
        ensure!(fs::read(vm.path().join("data/big"))? == body);
        vm.unmount()?;
        Ok(())
    });
}
