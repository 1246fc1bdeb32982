//! idmapped lowers: with the `uidmapping`/`gidmapping` labels, host mode presents each lower
//! layer through an idmapped clone of its mount (`ROOT/snapshots/ID/idmap-TAG`) and gives the
//! upper dir to the mapped root, so the host sees shifted owners and the container's user
//! namespace sees the image's own.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use testsuite::mounts::self_mounts;
use testsuite::rootfs::parse_overlay;

use testsuite::client::labels;

use crate::common::{BIN, Cfg, Env, LABEL_GIDMAPPING, LABEL_UIDMAPPING, MAP, run, run_ok};

/// `(uid, gid)` of `p` as this process sees it.
fn owner(p: &Path) -> Result<(u32, u32)> {
    let md = fs::symlink_metadata(p).with_context(|| format!("stat {}", p.display()))?;
    Ok((md.uid(), md.gid()))
}

/// Runs `sh -c script` inside the user namespace `userns` (as its root, through `nsenter`
/// on this process's descriptor of it), staying in this mount namespace.
fn in_userns(userns: &std::os::fd::OwnedFd, script: &str) -> Result<String> {
    let ns = format!(
        "--user=/proc/{}/fd/{}",
        std::process::id(),
        userns.as_raw_fd()
    );
    run_ok(
        Command::new("nsenter")
            .arg(ns)
            .args(["--", "sh", "-c", script]),
    )
}

/// A parent layer with root-owned and uid/gid-1000-owned files.
async fn base_layer(env: &Env) -> Result<u64> {
    let mounts = env.c().prepare("idm/a", "").await?;
    let id = env.id_of_mounts(&mounts)?;
    let m = env.mount(&mounts, "fill")?;
    let p = m.path();
    fs::create_dir_all(p.join("etc"))?;
    fs::write(p.join("etc/root-file"), b"root\n")?;
    fs::create_dir_all(p.join("home/user"))?;
    fs::write(p.join("home/user/file"), b"user\n")?;
    for q in ["home/user", "home/user/file"] {
        rustix::fs::chown(
            p.join(q),
            Some(rustix::fs::Uid::from_raw(1000)),
            Some(rustix::fs::Gid::from_raw(1000)),
        )?;
    }
    m.unmount()?;
    env.c().commit("idm/base", "idm/a").await?;
    Ok(id)
}

/// `idm/top` on `idm/base`, with a uid/gid-1000 file of its own; without the labels, the
/// base layer below it shows its real owners. Returns its id.
async fn top_layer(env: &Env) -> Result<u64> {
    let mounts = env.c().prepare("idm/plain", "idm/base").await?;
    let id = env.id_of_mounts(&mounts)?;
    let m = env.mount(&mounts, "plain")?;
    ensure!(owner(&m.path().join("home/user/file"))? == (1000, 1000));
    ensure!(owner(&m.path().join("etc/root-file"))? == (0, 0));
    fs::write(m.path().join("home/user/top-file"), b"top\n")?;
    rustix::fs::chown(
        m.path().join("home/user/top-file"),
        Some(rustix::fs::Uid::from_raw(1000)),
        Some(rustix::fs::Gid::from_raw(1000)),
    )?;
    m.unmount()?;
    env.c().commit("idm/top", "idm/plain").await?;
    Ok(id)
}

/// Owner, group and mode of everything below `dir`, by path relative to it.
/// Remove `keys` (children first) and check that no mount is left under the snapshots.
async fn remove_all(env: &Env, keys: &[&str]) -> Result<()> {
    for k in keys {
        env.c().remove(k).await?;
    }
    ensure!(
        !self_mounts()?
            .iter()
            .any(|m| m.mount_point.starts_with(env.snapshots_dir())),
        "mounts left under the root after removing everything"
    );
    Ok(())
}

fn owners_below(dir: &Path) -> Result<BTreeMap<PathBuf, (u32, u32, u32)>> {
    let mut all = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let md = fs::symlink_metadata(dir.join(&rel))
            .with_context(|| format!("stat {}", dir.join(&rel).display()))?;
        if md.is_dir() {
            for e in fs::read_dir(dir.join(&rel))? {
                stack.push(rel.join(e?.file_name()));
            }
        }
        all.insert(rel, (md.uid(), md.gid(), md.mode()));
    }
    Ok(all)
}

#[test]
fn idmapped_lowers_seen_through_stat() {
    run(Env::new(BIN, Cfg::new()), async |env| {
        let log = env.log_text();
        let caps = log
            .lines()
            .find_map(|l| l.split_once("capabilities=").map(|(_, c)| c.to_string()))
            .context("no capabilities in the start-up log")?;
        ensure!(
            caps.contains("\"remap-ids\""),
            "the daemon does not advertise remap-ids: {caps}"
        );
        let base = base_layer(env).await?;
        let map = labels(&[(LABEL_UIDMAPPING, MAP), (LABEL_GIDMAPPING, MAP)]);
        let mounts = env.c().prepare_with("idm/c", "idm/base", map).await?;
        ensure!(
            mounts.len() == 1 && mounts[0].r#type == "overlay",
            "{mounts:?}"
        );
        let o = parse_overlay(&mounts[0])?;
        let lower: &PathBuf = &o.lowers[0];
        ensure!(
            lower.starts_with(env.snapshot_dir(base))
                && lower
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("idmap-")),
            "the lower is not an idmapped clone of the layer: {lower:?}"
        );
        let entry = self_mounts()?
            .into_iter()
            .find(|m| &m.mount_point == lower)
            .context("the idmapped lower is not a mount point")?;
        ensure!(
            entry.mount_options.iter().any(|o| o == "idmapped"),
            "{} is not an idmapped mount: {entry:?}",
            lower.display()
        );
        // The layer's own mount is untouched.
        let plain = env.snapshot_dir(base).join("fs");
        ensure!(owner(&plain.join("home/user/file"))? == (1000, 1000));

        let m = env.mount(&mounts, "idmapped")?;
        let p = m.path().to_path_buf();
        // The host view: shifted by 100000.
        ensure!(owner(&p)? == (100000, 100000), "root dir {:?}", owner(&p)?);
        ensure!(owner(&p.join("etc"))? == (100000, 100000));
        ensure!(owner(&p.join("etc/root-file"))? == (100000, 100000));
        ensure!(owner(&p.join("home/user"))? == (101000, 101000));
        ensure!(owner(&p.join("home/user/file"))? == (101000, 101000));

        // Inside a user namespace with the same mapping: the image's owners.
        let userns = erofs_sys::idmap::create_userns(&[(0, 100000, 65536)], &[(0, 100000, 65536)])?;
        let script = format!(
            "cd {} && stat -c '%n %u:%g' . etc/root-file home/user/file && id -u && \
             echo new > created-inside && mkdir -p home/user/sub && cat home/user/file",
            p.display()
        );
        let out = in_userns(&userns, &script)?;
        let want = ". 0:0\netc/root-file 0:0\nhome/user/file 1000:1000\n0\nuser\n";
        ensure!(
            out == want,
            "inside the user namespace:\n{out}\nwanted:\n{want}"
        );
        // What the namespace's root created belongs to the mapped root on the host, in the
        // upper dir.
        ensure!(owner(&p.join("created-inside"))? == (100000, 100000));
        let upper = o.upper.clone().context("no upper dir")?;
        ensure!(
            owner(&upper)? == (100000, 100000),
            "upper {:?}",
            owner(&upper)?
        );
        ensure!(owner(&upper.join("created-inside"))? == (100000, 100000));
        m.unmount()?;

        // A layer committed from it (with a uid-1000 file of its own) is idmapped too when it
        // is one of several lowers.
        top_layer(env).await?;
        let mounts = env
            .c()
            .prepare_with(
                "idm/d",
                "idm/top",
                labels(&[(LABEL_UIDMAPPING, MAP), (LABEL_GIDMAPPING, MAP)]),
            )
            .await?;
        let o = parse_overlay(&mounts[0])?;
        ensure!(o.lowers.len() == 2, "{mounts:?}");
        for l in &o.lowers {
            ensure!(
                l.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("idmap-")),
                "lower {l:?} is not idmapped"
            );
        }
        let m = env.mount(&mounts, "two-lowers")?;
        ensure!(owner(&m.path().join("home/user/top-file"))? == (101000, 101000));
        ensure!(owner(&m.path().join("home/user/file"))? == (101000, 101000));
        ensure!(owner(&m.path().join("etc/root-file"))? == (100000, 100000));
        let out = in_userns(
            &userns,
            &format!(
                "cd {} && stat -c '%u:%g' home/user/top-file home/user/file etc/root-file",
                m.path().display()
            ),
        )?;
        ensure!(out == "1000:1000\n1000:1000\n0:0\n", "inside: {out}");
        m.unmount()?;

        remove_all(env, &["idm/c", "idm/d", "idm/top", "idm/base"]).await
    });
}

/// A flattened chain (`max_unmerged_layers = 1`) with the mapping labels: the container's one
/// lower is an idmapped clone of the chain's fsmeta mount (`ROOT/snapshots/P/merged-idmap-TAG`),
/// and it shows exactly what the stacked idmapped lowers of the same chain show, on the host
/// and inside the user namespace; removing everything leaves no mount behind.
#[test]
fn idmapped_flattened_lowers_show_what_stacked_ones_show() {
    run(
        Env::new(BIN, Cfg::new().sn("max_unmerged_layers = 1")),
        async |env| {
            base_layer(env).await?;
            let top = top_layer(env).await?;
            let map = || labels(&[(LABEL_UIDMAPPING, MAP), (LABEL_GIDMAPPING, MAP)]);
            let flat = env.c().prepare_with("idm/flat", "idm/top", map()).await?;
            ensure!(flat.len() == 1 && flat[0].r#type == "overlay", "{flat:?}");
            let lower = match parse_overlay(&flat[0])?.lowers.as_slice() {
                [l] => l.clone(),
                more => bail!("a flattened chain has one lower, not {more:?}"),
            };
            ensure!(
                lower.parent() == Some(env.snapshot_dir(top).as_path())
                    && lower
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("merged-idmap-")),
                "the lower is not an idmapped clone of the fsmeta mount: {lower:?}"
            );
            let entry = self_mounts()?
                .into_iter()
                .find(|m| m.mount_point == lower)
                .context("the idmapped fsmeta lower is not a mount point")?;
            ensure!(
                entry.fs_type == "erofs" && entry.mount_options.iter().any(|o| o == "idmapped"),
                "{} is not an idmapped EROFS mount: {entry:?}",
                lower.display()
            );

            // The same chain stacked: flattening is decided when a snapshot is created.
            env.stop()?;
            env.set_config(Cfg::new())?;
            env.start().await?;
            let stacked = env
                .c()
                .prepare_with("idm/stacked", "idm/top", map())
                .await?;
            ensure!(
                parse_overlay(&stacked[0])?.lowers.len() == 2,
                "not stacked: {stacked:?}"
            );
            let mf = env.mount(&flat, "flat")?;
            let ms = env.mount(&stacked, "stacked")?;
            let (f, s) = (owners_below(mf.path())?, owners_below(ms.path())?);
            ensure!(f == s, "flattened:\n{f:?}\nstacked:\n{s:?}");
            ensure!(owner(&mf.path().join("home/user/top-file"))? == (101000, 101000));
            ensure!(owner(&mf.path().join("home/user/file"))? == (101000, 101000));
            ensure!(owner(&mf.path().join("etc/root-file"))? == (100000, 100000));
            let userns =
                erofs_sys::idmap::create_userns(&[(0, 100000, 65536)], &[(0, 100000, 65536)])?;
            for m in [&mf, &ms] {
                let out = in_userns(
                    &userns,
                    &format!(
                        "cd {} && stat -c '%u:%g' . home/user/top-file home/user/file etc/root-file",
                        m.path().display()
                    ),
                )?;
                ensure!(
                    out == "0:0\n1000:1000\n1000:1000\n0:0\n",
                    "inside, {}: {out}",
                    m.path().display()
                );
            }
            mf.unmount()?;
            ms.unmount()?;
            remove_all(env, &["idm/flat", "idm/stacked", "idm/top", "idm/base"]).await
        },
    );
}

/// The start-up probe behind the `remap-ids` capability answers for this kernel, whatever
/// else is mounted below the daemon's TMPDIR (here a ramfs, which cannot be idmapped).
#[test]
fn remap_ids_capability_ignores_unrelated_mounts() {
    let env = Env::new(BIN, Cfg::new()).unwrap();
    let unrelated = env.base.join("tmp/unrelated-ramfs");
    fs::create_dir_all(&unrelated).unwrap();
    rustix::mount::mount(
        c"ramfs",
        &unrelated,
        c"ramfs",
        rustix::mount::MountFlags::empty(),
        c"",
    )
    .unwrap();
    run(Ok(env), async |env| {
        let log = env.log_text();
        let caps = log
            .lines()
            .find_map(|l| l.split_once("capabilities=").map(|(_, c)| c.to_string()))
            .context("no capabilities in the start-up log")?;
        ensure!(
            caps.contains("\"remap-ids\""),
            "with a ramfs mounted below TMPDIR the daemon does not advertise remap-ids: {caps}"
        );
        Ok(())
    });
}

/// Mapping labels must come in pairs and parse; a view with them is an idmapped bind.
#[test]
fn idmap_labels_are_checked_and_views_are_idmapped() {
    run(Env::new(BIN, Cfg::new()), async |env| {
        base_layer(env).await?;
        for (what, l) in [
            ("uidmapping alone", labels(&[(LABEL_UIDMAPPING, MAP)])),
            ("gidmapping alone", labels(&[(LABEL_GIDMAPPING, MAP)])),
            (
                "a malformed mapping",
                labels(&[(LABEL_UIDMAPPING, "0:100000"), (LABEL_GIDMAPPING, MAP)]),
            ),
        ] {
            testsuite::client::expect_code(
                env.c().prepare_with("idm/bad", "idm/base", l).await,
                tonic::Code::InvalidArgument,
                what,
            )?;
        }
        let mounts = env
            .c()
            .prepare_with(
                "idm/view-src",
                "idm/base",
                labels(&[(LABEL_UIDMAPPING, MAP), (LABEL_GIDMAPPING, MAP)]),
            )
            .await?;
        drop(mounts);
        env.c().remove("idm/view-src").await?;
        // View (one parent: a bind of the idmapped clone).
        let r = env
            .c()
            .view_with(
                "idm/v",
                "idm/base",
                labels(&[(LABEL_UIDMAPPING, MAP), (LABEL_GIDMAPPING, MAP)]),
            )
            .await?;
        ensure!(r.len() == 1 && r[0].r#type == "bind", "{r:?}");
        ensure!(r[0].source.contains("/idmap-"), "view not idmapped: {r:?}");
        let m = env.mount(&r, "view")?;
        ensure!(owner(&m.path().join("home/user/file"))? == (101000, 101000));
        ensure!(owner(&m.path().join("etc/root-file"))? == (100000, 100000));
        m.unmount()?;
        Ok(())
    });
}
