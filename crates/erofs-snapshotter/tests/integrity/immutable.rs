//! `set_immutable`: FS_IMMUTABLE_FL on every committed layer, cleared by Remove; Remove also
//! works where the filesystem has no inode flags at all.

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail, ensure};

use crate::common::{BIN, Cfg, EPERM, Env, is_immutable, run, run_ok};

fn cfg() -> Cfg {
    Cfg::new().sn("set_immutable = true")
}

/// The directories left in `ROOT/snapshots` (numeric ids and anything else).
fn leftovers(env: &Env) -> Result<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(env.snapshots_dir())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    v.sort();
    Ok(v)
}

/// A parentless layer and a layer on top of it, both flagged; the layers still mount and
/// read; Remove of both leaves nothing behind.
async fn lifecycle(env: &mut Env, check_flag: bool) -> Result<()> {
    let base = env
        .layer_with("imm/a", "", "imm/base", &[("etc/motd", b"base\n")])
        .await?;
    let top = env
        .layer_with("imm/b", "imm/base", "imm/top", &[("etc/top", b"top\n")])
        .await?;
    for id in [base, top] {
        let layer = env.layer(id);
        ensure!(layer.exists(), "{} is missing", layer.display());
        if !check_flag {
            continue;
        }
        ensure!(
            is_immutable(&layer)?,
            "{} has no FS_IMMUTABLE_FL after Commit",
            layer.display()
        );
        let lsattr = run_ok(Command::new("lsattr").arg(&layer))?;
        let attrs = lsattr.split_whitespace().next().unwrap_or_default();
        ensure!(attrs.contains('i'), "lsattr {}: {lsattr}", layer.display());
        match OpenOptions::new().write(true).open(&layer) {
            Ok(_) => bail!("{} could be opened for writing", layer.display()),
            Err(e) => ensure!(
                e.raw_os_error() == Some(EPERM),
                "opening {} for writing: expected EPERM, got {e}",
                layer.display()
            ),
        }
        match fs::remove_file(&layer) {
            Ok(()) => bail!("{} could be unlinked", layer.display()),
            Err(e) => ensure!(e.raw_os_error() == Some(EPERM), "unlink: {e}"),
        }
    }
    // The immutable layers mount and read as usual (read-only file or loop device).
    let mounts = env.c().view("imm/view", "imm/top").await?;
    let m = env.mount(&mounts, "view")?;
    ensure!(fs::read(m.path().join("etc/motd"))? == b"base\n");
    ensure!(fs::read(m.path().join("etc/top"))? == b"top\n");
    m.unmount()?;
    env.c().remove("imm/view").await?;
    // Remove clears the flag before deleting: the directories go away entirely.
    env.c().remove("imm/top").await?;
    ensure!(
        !env.snapshot_dir(top).exists(),
        "{} survived Remove",
        env.snapshot_dir(top).display()
    );
    env.c().remove("imm/base").await?;
    ensure!(
        !env.snapshot_dir(base).exists(),
        "{} survived Remove",
        env.snapshot_dir(base).display()
    );
    let left = leftovers(env)?;
    ensure!(
        left.is_empty(),
        "ROOT/snapshots still holds {left:?} after removing everything"
    );
    Ok(())
}

/// On the root's usual filesystem (ext4 here).
#[test]
fn immutable_layers_on_ext4() {
    run(Env::new(BIN, cfg()), async |env| lifecycle(env, true).await);
}

/// On a tmpfs root (tmpfs has had FS_IOC_SETFLAGS with the immutable flag since Linux 6.0).
/// Its size is set (a limit, nothing is allocated): the default, half the RAM, is below the
/// daemon's 1 GiB free-space reserve on a small machine (the kernel matrix's 1.5 GiB guests).
#[test]
fn immutable_layers_on_tmpfs() {
    run(
        Env::on_fs_with(BIN, cfg(), "tmpfs", "mode=0700,size=4g"),
        async |env| {
            ensure!(
                testsuite::mounts::self_mounts_under(&env.root)?
                    .iter()
                    .any(|m| m.mount_point == env.root && m.fs_type == "tmpfs"),
                "the root is not a tmpfs"
            );
            lifecycle(env, true).await
        },
    );
}

/// On ramfs, which has no inode-flag ioctls at all (FS_IOC_GETFLAGS gives ENOTTY; this kernel
/// has no vfat): Commit goes on with a warning and Remove does not fail.
#[test]
fn immutable_on_a_filesystem_without_flags() {
    run(Env::on_fs(BIN, cfg(), "ramfs"), async |env| {
        let probe = env.root.join("flags-probe");
        fs::write(&probe, b"x")?;
        match erofs_sys::flags::get_flags(fs::File::open(&probe)?) {
            Err(erofs_sys::flags::FlagsError::Unsupported(_)) => {}
            other => bail!("ramfs was expected to lack FS_IOC_GETFLAGS, got {other:?}"),
        }
        fs::remove_file(&probe)?;
        lifecycle(env, false).await?;
        ensure!(
            env.log_text().contains("could not set the immutable flag"),
            "no warning about the missing immutable flag in the daemon log"
        );
        Ok(())
    });
}

/// A Remove of a flagged layer the daemon has mounted (its `fs` mount is busy with a
/// child's view) still clears the flag and deletes everything once the children are gone.
#[test]
fn remove_mounted_immutable_layer() {
    run(Env::new(BIN, cfg()), async |env| {
        let id = env
            .layer_with("busy/a", "", "busy/base", &[("f", b"1")])
            .await?;
        let mounts = env.c().view("busy/view", "busy/base").await?;
        let m = env.mount(&mounts, "busy")?;
        ensure!(is_immutable(&env.layer(id))?);
        // Children first: Remove of the parent is refused while the view exists.
        testsuite::client::expect_code(
            env.c().remove("busy/base").await,
            tonic::Code::FailedPrecondition,
            "Remove of a parent",
        )?;
        ensure!(
            is_immutable(&env.layer(id))?,
            "a refused Remove cleared the flag"
        );
        drop(m);
        env.c().remove("busy/view").await?;
        env.c().remove("busy/base").await?;
        ensure!(!env.snapshot_dir(id).exists());
        ensure!(!Path::new(&env.layer(id)).exists());
        Ok(())
    });
}

/// Crashes around the flag: a commit recorded but not finished gets its layer put in place
/// and flagged at start-up; a removal recorded but not finished leaves a flagged layer that
/// the start-up sweep still deletes.
#[test]
fn immutable_across_crashes() {
    run(Env::new(BIN, cfg()), async |env| {
        env.stop()?;
        env.start_with(Some("commit:after-db-commit")).await?;
        let mounts = env.c().prepare("crash/a", "").await?;
        let id = env.id_of_mounts(&mounts)?;
        let m = env.mount(&mounts, "crash")?;
        fs::write(m.path().join("f"), b"crash\n")?;
        m.unmount()?;
        let _ = env.c().commit("crash/l", "crash/a").await;
        env.expect_abort("commit:after-db-commit").await?;
        env.start().await?;
        let layer = env.layer(id);
        ensure!(
            layer.exists(),
            "recovery did not put {} in place",
            layer.display()
        );
        ensure!(
            is_immutable(&layer)?,
            "the recovered layer is not immutable"
        );
        let mounts = env.c().view("crash/v", "crash/l").await?;
        let m = env.mount(&mounts, "crash-view")?;
        ensure!(fs::read(m.path().join("f"))? == b"crash\n");
        m.unmount()?;
        env.c().remove("crash/v").await?;

        env.stop()?;
        env.start_with(Some("remove:after-db-commit")).await?;
        let _ = env.c().remove("crash/l").await;
        env.expect_abort("remove:after-db-commit").await?;
        ensure!(
            is_immutable(&layer)?,
            "the flag went before the crash point"
        );
        env.start().await?;
        ensure!(
            !env.snapshot_dir(id).exists(),
            "the start-up sweep left {}",
            env.snapshot_dir(id).display()
        );
        let left = leftovers(env)?;
        ensure!(left.is_empty(), "left behind: {left:?}");
        testsuite::client::expect_code(
            env.c().stat("crash/l").await,
            tonic::Code::NotFound,
            "Stat of the removed snapshot",
        )?;
        Ok(())
    });
}

/// A flattened chain's `fsmeta.erofs` (`max_unmerged_layers = 1`) is flagged like a layer:
/// nobody writes or unlinks it; it mounts and reads; Remove of the snapshot it belongs to
/// clears the flag and deletes it with the directory.
#[test]
fn fsmeta_of_a_flattened_chain_is_immutable() {
    run(
        Env::new(BIN, cfg().sn("max_unmerged_layers = 1")),
        async |env| {
            let base = env
                .layer_with("imf/a", "", "imf/base", &[("etc/motd", b"base\n")])
                .await?;
            let top = env
                .layer_with("imf/b", "imf/base", "imf/top", &[("etc/top", b"top\n")])
                .await?;
            let mounts = env.c().view("imf/view", "imf/top").await?;
            let merged = env.snapshot_dir(top).join("merged");
            ensure!(
                mounts.len() == 1 && mounts[0].source == merged.display().to_string(),
                "the view is not of the flattened chain: {mounts:?}"
            );
            let fsmeta = env.snapshot_dir(top).join("fsmeta.erofs");
            ensure!(
                is_immutable(&fsmeta)?,
                "{} has no FS_IMMUTABLE_FL",
                fsmeta.display()
            );
            for id in [base, top] {
                ensure!(is_immutable(&env.layer(id))?);
            }
            match OpenOptions::new().write(true).open(&fsmeta) {
                Ok(_) => bail!("{} could be opened for writing", fsmeta.display()),
                Err(e) => ensure!(e.raw_os_error() == Some(EPERM), "open for writing: {e}"),
            }
            match fs::remove_file(&fsmeta) {
                Ok(()) => bail!("{} could be unlinked", fsmeta.display()),
                Err(e) => ensure!(e.raw_os_error() == Some(EPERM), "unlink: {e}"),
            }
            let m = env.mount(&mounts, "view")?;
            ensure!(fs::read(m.path().join("etc/motd"))? == b"base\n");
            ensure!(fs::read(m.path().join("etc/top"))? == b"top\n");
            m.unmount()?;
            for k in ["imf/view", "imf/top", "imf/base"] {
                env.c().remove(k).await?;
            }
            ensure!(
                !env.snapshot_dir(top).exists(),
                "{} survived Remove",
                env.snapshot_dir(top).display()
            );
            let left = leftovers(env)?;
            ensure!(left.is_empty(), "left behind: {left:?}");
            Ok(())
        },
    );
}
