//! dm-verity devices (`enable_dmverity = true`, `dmverity_mode = "on"`, so a kernel without
//! dm-verity fails the start with the reason): every layer in use is mounted through its own
//! dm-verity device (a unique name per layer, checked by `veritysetup status`), kept across a
//! `kill -9` and restart without duplicates, removed with the layer; a byte flipped in a
//! layer makes reads of it fail with EIO.

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;

use anyhow::{Result, bail, ensure};
use containerd_api::containerd::types::Descriptor;

use crate::common::{BIN, Cfg, Env, flip_byte, gzip, run, run_ok};
use crate::fsverity::{find, marked};
use crate::sys::{dm_devices, drop_caches, wait_no_loops, wait_until};

const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MARK: &[u8] = b"KERNEL-DMVERITY-MARKER";

pub fn cfg() -> Cfg {
    Cfg::new()
        .sn("dmverity_mode = \"on\"")
        .df("enable_dmverity = true")
}

pub fn layer_blob(env: &Env, i: usize, body: &[u8]) -> Result<Descriptor> {
    let mut l = testsuite::oci::LayerBuilder::new();
    l.dir("etc", 0o755)
        .file(&format!("etc/l{i}"), 0o644, format!("{i}\n").as_bytes())
        .file(&format!("data/big{i}"), 0o644, body);
    env.add_blob(TAR_GZ, &gzip(&l.finish()?)?)
}

/// Prepare `key` on `parent`, Apply `desc`, commit as `name`; the snapshot id.
pub async fn apply_on(
    env: &Env,
    key: &str,
    parent: &str,
    name: &str,
    desc: &Descriptor,
) -> Result<u64> {
    let mounts = env.c().prepare(key, parent).await?;
    let id = env.id_of_mounts(&mounts)?;
    env.c().apply(desc, &mounts).await?;
    env.c().commit(name, key).await?;
    Ok(id)
}

/// The daemon's dm device names for layers `ids`, and the prefix all of its names share.
pub fn names(env: &Env, ids: &[u64]) -> (BTreeSet<String>, String) {
    let all: BTreeSet<String> = ids
        .iter()
        .map(|&id| snapshotter::integrity::dmverity::device_name(&env.root, id))
        .collect();
    let one = snapshotter::integrity::dmverity::device_name(&env.root, 0);
    (all, one.trim_end_matches('0').to_string())
}

/// The daemon's dm devices are exactly those of `ids`, each an active, verified dm-verity
/// device.
pub fn check_devices(env: &Env, ids: &[u64]) -> Result<Vec<crate::sys::Dm>> {
    check_named(env, &names(env, ids).0)
}

/// The daemon's dm devices are exactly the ones named `want`, each an active, verified
/// dm-verity device.
pub fn check_named(env: &Env, want: &BTreeSet<String>) -> Result<Vec<crate::sys::Dm>> {
    let (_, prefix) = names(env, &[]);
    let devs = dm_devices(&prefix)?;
    let got: BTreeSet<String> = devs.iter().map(|d| d.name.clone()).collect();
    ensure!(
        &got == want && devs.len() == want.len(),
        "expected the dm-verity devices {want:?}, got {devs:?}"
    );
    for d in &devs {
        let st = run_ok(Command::new("veritysetup").arg("status").arg(&d.name))?;
        ensure!(
            st.contains("type:") && st.contains("VERITY") && st.contains("verified"),
            "{}: veritysetup status:\n{st}",
            d.name
        );
    }
    Ok(devs)
}

pub fn wait_no_devices(env: &Env, when: &str) -> Result<()> {
    let (_, prefix) = names(env, &[]);
    wait_until(
        &format!("dm-verity devices removed {when}"),
        std::time::Duration::from_secs(15),
        || {
            let d = dm_devices(&prefix)?;
            Ok(if d.is_empty() {
                Ok(())
            } else {
                Err(format!("{d:?}"))
            })
        },
    )
}

#[test]
fn one_dmverity_device_per_layer_removed_on_remove_and_after_kill9() {
    run(Env::new(BIN, cfg()), async |env| {
        let body = marked(200_000, 100_000, MARK);
        let mut ids = Vec::new();
        let mut parent = String::new();
        for i in 0..3 {
            let desc = layer_blob(env, i, &body)?;
            let name = format!("dv/l{i}");
            ids.push(apply_on(env, &format!("dv/a{i}"), &parent, &name, &desc).await?);
            parent = name;
        }
        let mounts = env.c().prepare("dv/c", "dv/l2").await?;
        let m = env.mount(&mounts, "c")?;
        for i in 0..3 {
            ensure!(fs::read_to_string(m.path().join(format!("etc/l{i}")))? == format!("{i}\n"));
        }
        let before = check_devices(env, &ids)?;

        ensure!(env.kill9().is_some(), "the daemon was not running");
        env.start().await?;
        let v = env.c().view("dv/v", "dv/l1").await?;
        let vm = env.mount(&v, "v")?;
        ensure!(fs::read(vm.path().join("data/big1"))? == body);
        ensure!(
            check_devices(env, &ids)? == before,
            "the restart or a View made other dm devices"
        );
        vm.unmount()?;
        m.unmount()?;
        for k in ["dv/v", "dv/c", "dv/l2"] {
            env.c().remove(k).await?;
        }
        check_devices(env, &ids[..2])?;
        ensure!(env.kill9().is_some());
        env.start().await?;
        for k in ["dv/l1", "dv/l0"] {
            env.c().remove(k).await?;
        }
        wait_no_devices(env, "after Remove (and kill -9 + restart)")?;
        wait_no_loops(&env.base, "after the dm-verity devices went")?;
        Ok(())
    });
}

#[test]
fn flipped_byte_fails_reads_through_dmverity_with_eio() {
    run(Env::new(BIN, cfg()), async |env| {
        let body = marked(200_000, 100_000, MARK);
        let desc = layer_blob(env, 0, &body)?;
        let id = apply_on(env, "df/a", "", "df/l", &desc).await?;
        let mounts = env.c().view("df/v", "df/l").await?;
        let m = env.mount(&mounts, "v")?;
        ensure!(fs::read(m.path().join("data/big0"))? == body);
        check_devices(env, &[id])?;
        let layer = env.layer(id);
        let at = find(&layer, MARK)?;
        flip_byte(&layer, at)?;
        drop_caches()?;
        match fs::read(m.path().join("data/big0")) {
            Err(e) if e.raw_os_error() == Some(5) => {}
            other => bail!(
                "reading a flipped block through dm-verity gave {:?}, not EIO",
                other.map(|v| v == body)
            ),
        }
        flip_byte(&layer, at)?;
        drop_caches()?;
        ensure!(
            fs::read(m.path().join("data/big0"))? == body,
            "the restored block does not read back"
        );
        m.unmount()?;
        env.c().remove("df/v").await?;
        env.c().remove("df/l").await?;
        wait_no_devices(env, "after Remove")?;
        Ok(())
    });
}
