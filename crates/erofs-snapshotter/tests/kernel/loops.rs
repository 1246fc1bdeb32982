//! Loop devices: on kernels before 6.12 (no file-backed EROFS mounts) every committed layer
//! is mounted through one read-only loop device, which goes away with the layer on Remove,
//! survives a `kill -9` of the daemon with its mount (no second device after the restart),
//! and goes on Remove after the restart. Writable ext4 layers (`default_size`) use read-write
//! loop devices, released the same way. On 6.12+ layers need none.

use std::collections::BTreeSet;
use std::fs;

use anyhow::{Result, ensure};

use crate::common::{BIN, Cfg, Env, run};
use crate::sys::{Loop, erofs_file_backed, loops_under, wait_no_loops};

/// The loop devices of `env`'s layers, checked: none on a kernel with file-backed mounts,
/// else exactly one read-only device per layer in `ids` and none for any other file.
fn layer_loops(env: &Env, ids: &[u64]) -> Result<Vec<Loop>> {
    let loops = loops_under(&env.base)?;
    if erofs_file_backed() {
        ensure!(
            loops.is_empty(),
            "this kernel mounts EROFS from files, yet layers have loop devices: {loops:?}"
        );
        return Ok(loops);
    }
    let want: BTreeSet<_> = ids.iter().map(|&id| env.layer(id)).collect();
    let got: Vec<_> = loops.iter().map(|l| l.backing.clone()).collect();
    let got_set: BTreeSet<_> = got.iter().cloned().collect();
    ensure!(
        got.len() == got_set.len() && got_set == want,
        "expected one loop device per layer {want:?}, got {loops:?}"
    );
    ensure!(
        loops.iter().all(|l| l.ro),
        "a layer's loop device is writable: {loops:?}"
    );
    Ok(loops)
}

#[test]
fn layers_use_one_read_only_loop_device_each_released_on_remove() {
    run(Env::new(BIN, Cfg::new()), async |env| {
        let l1 = env
            .layer_with("lp/1", "", "lp/l1", &[("etc/one", b"one\n")])
            .await?;
        let l2 = env
            .layer_with("lp/2", "lp/l1", "lp/l2", &[("etc/two", b"two\n")])
            .await?;
        let l3 = env
            .layer_with("lp/3", "lp/l2", "lp/l3", &[("etc/three", b"three\n")])
            .await?;
        if !erofs_file_backed() {
            ensure!(
                env.log_text().contains("using loop devices"),
                "the daemon did not say it falls back to loop devices on this kernel:\n{}",
                env.log_tail(20)
            );
        }
        let mounts = env.c().prepare("lp/c", "lp/l3").await?;
        let m = env.mount(&mounts, "c")?;
        for (f, want) in [
            ("etc/one", "one\n"),
            ("etc/two", "two\n"),
            ("etc/three", "three\n"),
        ] {
            ensure!(fs::read_to_string(m.path().join(f))? == want, "{f}");
        }
        let before = layer_loops(env, &[l1, l2, l3])?;
        // More users of the same layers attach no more devices.
        let v = env.c().view("lp/v", "lp/l2").await?;
        let vm = env.mount(&v, "v")?;
        ensure!(fs::read_to_string(vm.path().join("etc/two"))? == "two\n");
        ensure!(
            layer_loops(env, &[l1, l2, l3])? == before,
            "a View attached more loop devices"
        );
        vm.unmount()?;
        env.c().remove("lp/v").await?;
        m.unmount()?;
        env.c().remove("lp/c").await?;
        // Removing the top layer releases its device only.
        env.c().remove("lp/l3").await?;
        crate::sys::wait_until(
            "the top layer's loop device released",
            std::time::Duration::from_secs(15),
            || {
                let l = loops_under(&env.base)?;
                Ok(if l.iter().any(|l| l.backing == env.layer(l3)) {
                    Err(format!("{l:?}"))
                } else {
                    Ok(())
                })
            },
        )?;
        layer_loops(env, &[l1, l2])?;
        env.c().remove("lp/l2").await?;
        env.c().remove("lp/l1").await?;
        wait_no_loops(&env.base, "after Remove of every layer")?;
        Ok(())
    });
}

#[test]
fn loop_devices_survive_kill9_once_and_go_on_remove_after_restart() {
    run(Env::new(BIN, Cfg::new()), async |env| {
        let l1 = env
            .layer_with("k9/1", "", "k9/l1", &[("etc/one", b"one\n")])
            .await?;
        let l2 = env
            .layer_with("k9/2", "k9/l1", "k9/l2", &[("etc/two", b"two\n")])
            .await?;
        let mounts = env.c().prepare("k9/c", "k9/l2").await?;
        let m = env.mount(&mounts, "c")?;
        let before = layer_loops(env, &[l1, l2])?;
        ensure!(env.kill9().is_some(), "the daemon was not running");
        // The container keeps its layers (and their devices) while the daemon is down.
        ensure!(fs::read_to_string(m.path().join("etc/one"))? == "one\n");
        ensure!(
            loops_under(&env.base)? == before,
            "kill -9 changed the loop devices"
        );
        env.start().await?;
        ensure!(
            layer_loops(env, &[l1, l2])? == before,
            "the restart attached other loop devices"
        );
        let mounts2 = env.c().prepare("k9/c2", "k9/l2").await?;
        let m2 = env.mount(&mounts2, "c2")?;
        ensure!(fs::read_to_string(m2.path().join("etc/two"))? == "two\n");
        ensure!(
            layer_loops(env, &[l1, l2])? == before,
            "a Prepare after the restart attached more loop devices"
        );
        m2.unmount()?;
        m.unmount()?;
        // Killed again with everything mounted, then everything removed after the restart.
        ensure!(env.kill9().is_some());
        env.start().await?;
        for k in ["k9/c", "k9/c2", "k9/l2", "k9/l1"] {
            env.c().remove(k).await?;
        }
        env.c().cleanup().await?;
        wait_no_loops(&env.base, "after kill -9, restart and Remove")?;
        Ok(())
    });
}

#[test]
fn writable_ext4_layers_release_their_loop_devices() {
    run(
        Env::new(BIN, Cfg::new().sn("default_size = \"64MiB\"")),
        async |env| {
            let l1 = env
                .layer_with("rw/1", "", "rw/l1", &[("etc/one", b"one\n")])
                .await?;
            let mounts = env.c().prepare("rw/c", "rw/l1").await?;
            let m = env.mount(&mounts, "c")?;
            fs::write(m.path().join("new"), b"x")?;
            let loops = loops_under(&env.base)?;
            let rw: Vec<&Loop> = loops.iter().filter(|l| !l.ro).collect();
            ensure!(
                rw.len() == 1 && rw[0].backing.ends_with("rwlayer.img"),
                "expected one writable loop device on the container's rwlayer.img: {loops:?}"
            );
            if !erofs_file_backed() {
                ensure!(
                    loops.iter().any(|l| l.ro && l.backing == env.layer(l1)),
                    "{loops:?}"
                );
            }
            m.unmount()?;
            ensure!(env.kill9().is_some());
            env.start().await?;
            env.c().remove("rw/c").await?;
            env.c().remove("rw/l1").await?;
            wait_no_loops(&env.base, "after Remove of a writable layer")?;
            Ok(())
        },
    );
}
