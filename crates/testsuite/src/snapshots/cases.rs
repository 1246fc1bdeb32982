//! The cases of containerd's snapshotter conformance suite (`core/snapshots/testsuite`),
//! one function each, generic over the snapshotter under test.
//!
//! Each case runs twice: plain and with `default_size = "64MB"` (upstream's
//! `TestErofsWithQuota`). Keys look like containerd's backend keys (`testsuite/N/name`), so
//! they contain `/`. File content is written and checked only through real mounts
//! ([`SnapshotterUnderTest::mount`] answering `Some`); everything else runs everywhere.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use containerd_api::containerd::services::snapshots::v1 as pb;
use tonic::Code;

use super::fstest::{self, Op, dir, file, link, remove_all};
use super::{GC_ROOT, SnapshotterUnderTest, default_labels, is_writable, kind, time};
use crate::client::{expect_code, labels};
use crate::rootfs::parse_overlay;

/// Prepare on `parent`, mount, apply `ops`, unmount, commit; returns the committed name.
pub async fn create_snapshot<S: SnapshotterUnderTest>(
    env: &S,
    parent: &str,
    ops: &[Op],
) -> Result<String> {
    let name = env.key("layer");
    let prepare = format!("{name}-prepare");
    let m = env
        .prepare(&prepare, parent)
        .await
        .with_context(|| format!("prepare {prepare:?} on {parent:?}"))?;
    if let Some(mnt) = env.mount(&m, "prepare")? {
        fstest::apply(mnt.path(), ops)?;
        mnt.unmount()?;
    }
    env.commit(&name, &prepare)
        .await
        .with_context(|| format!("commit {prepare:?} as {name:?}"))?;
    Ok(name)
}

/// View `name`, mount it, compare with `flat`, unmount, remove the view.
pub async fn check_snapshot<S: SnapshotterUnderTest>(
    env: &S,
    name: &str,
    flat: &Path,
) -> Result<()> {
    let view = format!("{name}-view");
    let m = env
        .view(&view, name)
        .await
        .with_context(|| format!("view of {name:?}"))?;
    let r = match env.mount(&m, "check")? {
        Some(mnt) => {
            let r = fstest::check_equal(flat, mnt.path());
            mnt.unmount()?;
            r
        }
        None => Ok(()),
    };
    env.remove(&view)
        .await
        .with_context(|| format!("remove view {view:?}"))?;
    r
}

/// upstream's `checkSnapshots`: a chain of layers from `appliers`, each checked through a
/// fresh view against one flat directory with the same changes.
pub async fn check_snapshots<S: SnapshotterUnderTest>(
    env: &S,
    appliers: &[Vec<Op>],
) -> Result<Vec<String>> {
    let flat = env.new_dir("flat")?;
    let mut parent = String::new();
    let mut names = Vec::new();
    for (i, a) in appliers.iter().enumerate() {
        let s = create_snapshot(env, &parent, a)
            .await
            .with_context(|| format!("creating snapshot {}", i + 1))?;
        // The reference tree only serves content checks (and may need root: chown, mknod).
        if env.can_mount() {
            fstest::apply(&flat, a)?;
        }
        check_snapshot(env, &s, &flat)
            .await
            .with_context(|| format!("snapshot check failed on snapshot {}", i + 1))?;
        parent = s.clone();
        names.push(s);
    }
    Ok(names)
}

/// A flat directory with `ops` applied.
pub fn flat_with<S: SnapshotterUnderTest>(env: &S, ops: &[&[Op]]) -> Result<std::path::PathBuf> {
    let d = env.new_dir("flat")?;
    for o in ops {
        fstest::apply(&d, o)?;
    }
    Ok(d)
}

/// Upstream's `Basic` case.
pub async fn basic<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let initial = vec![
        file("/foo", b"foo\n", 0o777),
        dir("/a", 0o755),
        dir("/a/b", 0o755),
        dir("/a/b/c", 0o755),
    ];
    let diff = vec![
        file("/bar", b"bar\n", 0o777),
        file("/foo", b"bar\n", 0o777),
        remove_all("/a/b"),
    ];
    let sn = &*env;
    let preparing = env.key("preparing");
    let m = sn.prepare(&preparing, "").await?;
    ensure!(!m.is_empty(), "expected mounts to have entries");
    if let Some(mnt) = env.mount(&m, "preparing")? {
        fstest::apply(mnt.path(), &initial)?;
        mnt.unmount()?;
    }

    let committed = env.key("committed");
    sn.commit(&committed, &preparing).await?;
    let si = sn.stat(&committed).await?;
    ensure!(si.parent.is_empty(), "committed parent {:?}", si.parent);
    ensure!(kind(&si) == pb::Kind::Committed, "kind {:?}", kind(&si));
    expect_code(
        sn.stat(&preparing).await,
        Code::NotFound,
        "stat of the active key after commit",
    )?;

    let next = env.key("nextlayer");
    let m = sn.prepare(&next, &committed).await?;
    if let Some(mnt) = env.mount(&m, "next")? {
        fstest::check_equal(&flat_with(env, &[&initial])?, mnt.path())?;
        fstest::apply(mnt.path(), &diff)?;
        mnt.unmount()?;
    }

    let ni = sn.stat(&next).await?;
    ensure!(ni.parent == committed, "active parent {:?}", ni.parent);
    ensure!(kind(&ni) == pb::Kind::Active, "kind {:?}", kind(&ni));

    let next_committed = env.key("committed-next");
    sn.commit(&next_committed, &next).await?;
    let si2 = sn.stat(&next_committed).await?;
    ensure!(si2.parent == committed, "parent {:?}", si2.parent);
    ensure!(kind(&si2) == pb::Kind::Committed);
    expect_code(sn.stat(&next).await, Code::NotFound, "stat after commit")?;

    let walked: BTreeMap<String, pb::Info> = sn
        .list(&[])
        .await?
        .into_iter()
        .map(|i| (i.name.clone(), i))
        .collect();
    for expected in [&si, &si2] {
        let got = walked
            .get(&expected.name)
            .with_context(|| format!("missing {:?} in Walk", expected.name))?;
        ensure!(
            got == expected,
            "walk info {got:?} differs from stat {expected:?}"
        );
    }

    let nextnext = env.key("nextnextlayer");
    let m = sn.view(&nextnext, &next_committed).await?;
    if let Some(mnt) = env.mount(&m, "nextnext")? {
        fstest::check_equal(&flat_with(env, &[&initial, &diff])?, mnt.path())?;
        mnt.unmount()?;
    }
    sn.remove(&nextnext).await?;

    let st = expect_code(
        sn.remove(&committed).await,
        Code::FailedPrecondition,
        "remove of a snapshot with a child",
    )?;
    ensure!(
        st.message().contains("remove"),
        "error message {:?} does not contain \"remove\"",
        st.message()
    );
    sn.remove(&next_committed).await?;
    sn.remove(&committed).await?;
    ensure!(sn.list(&[]).await?.is_empty(), "snapshots left");
    let (ids, other) = env.snapshot_dirs()?;
    ensure!(
        ids.is_empty() && other.is_empty(),
        "directories left after removing everything: {ids:?} {other:?}"
    );
    Ok(())
}

/// Upstream's `StatActive` case.
pub async fn stat_active<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let preparing = env.key("preparing");
    let m = env.prepare(&preparing, "").await?;
    ensure!(!m.is_empty());
    let mnt = env.mount(&m, "preparing")?;
    if let Some(mnt) = &mnt {
        std::fs::write(mnt.path().join("foo"), "foo\n")?;
    }
    let si = env.stat(&preparing).await?;
    ensure!(si.name == preparing, "name {:?}", si.name);
    ensure!(kind(&si) == pb::Kind::Active, "kind {:?}", kind(&si));
    ensure!(si.parent.is_empty(), "parent {:?}", si.parent);
    mnt.map_or(Ok(()), |m| m.unmount())
}

/// Upstream's `StatCommitted` case.
pub async fn stat_committed<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let preparing = env.key("preparing");
    let m = env.prepare(&preparing, "").await?;
    if let Some(mnt) = env.mount(&m, "preparing")? {
        std::fs::write(mnt.path().join("foo"), "foo\n")?;
        mnt.unmount()?;
    }
    let committed = env.key("committed");
    env.commit(&committed, &preparing).await?;
    let si = env.stat(&committed).await?;
    ensure!(si.name == committed, "name {:?}", si.name);
    ensure!(kind(&si) == pb::Kind::Committed, "kind {:?}", kind(&si));
    ensure!(si.parent.is_empty(), "parent {:?}", si.parent);
    Ok(())
}

async fn prepare_mount_write<S: SnapshotterUnderTest>(
    env: &S,
    key: &str,
    parent: &str,
    content: &str,
) -> Result<()> {
    let m = env.prepare(key, parent).await?;
    ensure!(!m.is_empty(), "expected mounts to have entries");
    match env.mount(&m, "p")? {
        Some(mnt) => {
            std::fs::write(mnt.path().join("foo"), content)?;
            mnt.unmount()
        }
        None => Ok(()),
    }
}

/// Upstream's `Transitivity` case.
pub async fn transitivity<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let preparing = env.key("preparing");
    prepare_mount_write(env, &preparing, "", "foo\n").await?;
    let snap_a = env.key("snapA");
    env.commit(&snap_a, &preparing).await?;
    let next = env.key("next");
    prepare_mount_write(env, &next, &snap_a, "foo bar\n").await?;
    let snap_b = env.key("snapB");
    env.commit(&snap_b, &next).await?;
    let si_a = env.stat(&snap_a).await?;
    let si_b = env.stat(&snap_b).await?;
    let si_parent_b = env.stat(&si_b.parent).await?;
    ensure!(si_a.parent.is_empty());
    ensure!(si_b.parent == snap_a, "B's parent {:?}", si_b.parent);
    ensure!(si_parent_b.parent.is_empty());
    // The chain is also what B's view shows.
    let v = env.key("view");
    let m = env.view(&v, &snap_b).await?;
    if let Some(mnt) = env.mount(&m, "v")? {
        ensure!(std::fs::read_to_string(mnt.path().join("foo"))? == "foo bar\n");
        mnt.unmount()?;
    }
    Ok(())
}

/// Upstream's `PrepareViewFailing` case.
pub async fn prepare_view_failing<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let preparing = env.key("preparing");
    let m = env.prepare(&preparing, "").await?;
    if let Some(mnt) = env.mount(&m, "p")? {
        mnt.unmount()?;
    }
    let snap_a = env.key("snapA");
    env.commit(&snap_a, &preparing).await?;

    let new_layer = env.key("newlayer");
    env.prepare(&new_layer, &snap_a).await?;
    expect_code(
        env.view(&new_layer, &snap_a).await,
        Code::AlreadyExists,
        "view with the key of an active snapshot",
    )?;

    let prep_layer = env.key("prepLayer");
    env.prepare(&prep_layer, &snap_a).await?;
    expect_code(
        env.prepare(&prep_layer, &snap_a).await,
        Code::AlreadyExists,
        "second prepare with the same key",
    )?;

    let view_layer = env.key("viewLayer");
    env.view(&view_layer, &snap_a).await?;
    expect_code(
        env.view(&view_layer, &snap_a).await,
        Code::AlreadyExists,
        "second view with the same key",
    )?;
    // A committed name is taken too.
    expect_code(
        env.prepare(&snap_a, "").await,
        Code::AlreadyExists,
        "prepare with a committed name",
    )?;
    // And nothing extra was created by the failed calls.
    let (ids, other) = env.snapshot_dirs()?;
    ensure!(
        ids.len() == 4 && other.is_empty(),
        "expected 4 snapshot dirs, got {ids:?} {other:?}"
    );
    Ok(())
}

/// upstream's `baseTestSnapshots`: c1, c2(c1), a1(c2), a2, v1(c2), v2.
async fn base_test_snapshots<S: SnapshotterUnderTest>(sn: &S) -> Result<()> {
    sn.prepare("c1-a", "").await?;
    sn.commit("c1", "c1-a").await?;
    sn.prepare("c2-a", "c1").await?;
    sn.commit("c2", "c2-a").await?;
    sn.prepare("a1", "c2").await?;
    sn.prepare("a2", "").await?;
    sn.view("v1", "c2").await?;
    sn.view("v2", "").await?;
    Ok(())
}

fn assert_labels(
    actual: &std::collections::HashMap<String, String>,
    expected: &[(&str, &str)],
) -> Result<()> {
    let expected: BTreeMap<String, String> = expected
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let actual: BTreeMap<String, String> =
        actual.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    ensure!(
        actual == expected,
        "labels {actual:?}, expected {expected:?}"
    );
    Ok(())
}

/// Upstream's `Update` case.
pub async fn update<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let sn = &*env;
    let t1 = SystemTime::now();
    base_test_snapshots(env).await?;
    let t2 = SystemTime::now();
    let cases = [
        ("c1", pb::Kind::Committed, ""),
        ("c2", pb::Kind::Committed, "c1"),
        ("a1", pb::Kind::Active, "c2"),
        ("a2", pb::Kind::Active, ""),
        ("v1", pb::Kind::View, "c2"),
        ("v2", pb::Kind::View, ""),
    ];
    for (name, k, parent) in cases {
        let st = sn.stat(name).await?;
        let created = time(&st.created_at);
        ensure!(
            created >= t1 && created <= t2,
            "({name}) created {created:?} not within {t1:?}..{t2:?}"
        );
        ensure!(
            st.created_at == st.updated_at,
            "({name}) updated != created"
        );
        ensure!(kind(&st) == k, "({name}) kind {:?}", kind(&st));
        ensure!(st.parent == parent, "({name}) parent {:?}", st.parent);
        ensure!(st.name == name);

        let root_time = format!("{:?}", SystemTime::now());
        let mut st2 = st.clone();
        st2.parent = "doesnotexist".into();
        st2.labels = labels(&[
            ("l1", "v1"),
            ("l2", "v2"),
            ("l3", "v3"),
            (GC_ROOT, &root_time),
        ]);
        let u1 = SystemTime::now();
        let st3 = sn.update(st2, &[]).await?;
        let u2 = SystemTime::now();
        ensure!(st3.created_at == st.created_at, "({name}) created changed");
        let updated = time(&st3.updated_at);
        ensure!(
            updated >= u1 && updated <= u2,
            "({name}) updated {updated:?} not within {u1:?}..{u2:?}"
        );
        ensure!(kind(&st3) == k, "({name}) kind changed to {:?}", kind(&st3));
        ensure!(
            st3.parent == parent,
            "({name}) parent changed to {:?}",
            st3.parent
        );
        ensure!(st3.name == name);
        assert_labels(
            &st3.labels,
            &[
                ("l1", "v1"),
                ("l2", "v2"),
                ("l3", "v3"),
                (GC_ROOT, &root_time),
            ],
        )?;

        let mut st4 = st3.clone();
        st4.labels = labels(&[("l1", "updated"), ("l4", "v4")]);
        let st5 = sn.update(st4, &["labels.l1", "labels.l2"]).await?;
        assert_labels(
            &st5.labels,
            &[("l1", "updated"), ("l3", "v3"), (GC_ROOT, &root_time)],
        )?;

        let mut st6 = st5.clone();
        st6.labels = labels(&[("l4", "v4"), (GC_ROOT, &root_time)]);
        let st7 = sn.update(st6, &["labels"]).await?;
        assert_labels(&st7.labels, &[("l4", "v4"), (GC_ROOT, &root_time)])?;
        // Stat agrees with what Update returned.
        ensure!(
            sn.stat(name).await? == st7,
            "({name}) stat differs from update"
        );

        let mut st8 = st7.clone();
        st8.parent = "doesnotexist".into();
        expect_code(
            sn.update(st8, &["parent"]).await,
            Code::InvalidArgument,
            "update of the parent field",
        )?;
    }
    let mut missing = sn.stat("c1").await?;
    missing.name = "does-not-exist".into();
    expect_code(
        sn.update(missing, &[]).await,
        Code::NotFound,
        "update of a missing snapshot",
    )?;
    Ok(())
}

/// Upstream's `Remove` case.
pub async fn remove<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let sn = &*env;
    sn.prepare("committed-a", "").await?;
    sn.commit("committed-1", "committed-a").await?;
    sn.prepare("reuse-1", "committed-1").await?;
    sn.remove("reuse-1").await?;
    sn.view("reuse-1", "committed-1").await?;
    sn.remove("reuse-1").await?;
    sn.prepare("reuse-1", "").await?;
    sn.remove("committed-1").await?;
    sn.commit("committed-1", "reuse-1").await?;
    let si = sn.stat("committed-1").await?;
    ensure!(kind(&si) == pb::Kind::Committed && si.parent.is_empty());
    // Removing a missing key is fine (containerd's GC may retry).
    sn.remove("never-existed").await?;
    let (ids, other) = env.snapshot_dirs()?;
    ensure!(
        ids.len() == 1 && other.is_empty(),
        "expected one snapshot dir, got {ids:?} {other:?}"
    );
    Ok(())
}

/// Upstream's `Walk` case.
pub async fn walk<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let sn = &*env;
    let opt = || labels(&[(GC_ROOT, "check-walk")]);
    let with_l = |l: &str| labels(&[("l", l), (GC_ROOT, "check-walk")]);
    sn.prepare_with("a-np", "", opt()).await?;
    sn.prepare_with("p-tmp", "", opt()).await?;
    sn.commit_with("p", "p-tmp", opt(), "").await?;
    sn.prepare_with("a", "p", opt()).await?;
    sn.view_with("v", "p", opt()).await?;
    sn.prepare_with("p-wl-tmp", "", opt()).await?;
    sn.commit_with("p-wl", "p-wl-tmp", with_l("1"), "").await?;
    sn.prepare_with("a-wl", "p-wl", with_l("2")).await?;
    sn.view_with("v-wl", "p-wl", with_l("3")).await?;
    sn.prepare_with("a-np-wl", "", with_l("2")).await?;

    let cases: &[(&[&str], &[&str])] = &[
        (
            &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            &[r#"labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["a-np", "a", "a-wl", "a-np-wl"],
            &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["v", "v-wl"],
            &[r#"kind==view,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["p", "p-wl"],
            &[r#"kind==committed,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (&["p", "a-np-wl"], &["name==p", "name==a-np-wl"]),
        (&["a-wl"], &["name==a-wl,labels.l"]),
        (&["a", "v"], &["parent==p"]),
        (
            &["a", "v", "a-wl", "v-wl"],
            &[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#],
        ),
        (&["p-wl", "a-wl", "v-wl", "a-np-wl"], &["labels.l"]),
        (&["a-wl", "a-np-wl"], &["labels.l==2"]),
    ];
    let mut failures = Vec::new();
    for (i, (matches, filters)) in cases.iter().enumerate() {
        let mut actual: Vec<String> = sn
            .list(filters)
            .await
            .with_context(|| format!("[{i}] list {filters:?}"))?
            .into_iter()
            .map(|i| i.name)
            .collect();
        actual.sort();
        let mut expected: Vec<String> = matches.iter().map(|s| s.to_string()).collect();
        expected.sort();
        if actual != expected {
            failures.push(format!(
                "[{i}] filters {filters:?}: got {actual:?}, expected {expected:?}"
            ));
        }
    }
    // A malformed filter is an InvalidArgument, not a silent match-all.
    if let Err(e) = expect_code(
        sn.list(&[r#"labels."unterminated"#]).await,
        Code::InvalidArgument,
        "list with a malformed filter",
    ) {
        failures.push(format!("{e:#}"));
    }
    if !failures.is_empty() {
        bail!("walk filter failures:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// Upstream's `LayerFileUpdate` case.
pub async fn layer_file_update<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let l1 = vec![
        dir("/etc", 0o700),
        file("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
        file("/etc/profile", b"PATH=/usr/bin", 0o644),
    ];
    let l2 = vec![
        file("/etc/hosts", b"mydomain 10.0.0.2", 0o644),
        file("/etc/profile", b"PATH=/usr/bin", 0o666),
        dir("/root", 0o700),
        file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644),
    ];
    let mut sleep = Duration::ZERO;
    for i in 0..5 {
        tokio::time::sleep(sleep).await;
        check_snapshots(env, &[l1.clone(), l2.clone()])
            .await
            .with_context(|| format!("round {i}"))?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        sleep = Duration::from_secs(now.as_secs() + 1) - now;
    }
    Ok(())
}

/// Upstream's `RemoveDirectoryInLowerLayer` case.
pub async fn remove_directory_in_lower_layer<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let l1 = vec![dir("/lib", 0o700), file("/lib/hidden", b"", 0o644)];
    let l2 = vec![
        remove_all("/lib"),
        dir("/lib", 0o700),
        file("/lib/not-hidden", b"", 0o644),
    ];
    let l3 = vec![file("/lib/newfile", b"", 0o644)];
    check_snapshots(env, &[l1, l2, l3]).await.map(|_| ())
}

/// Upstream's `Chown` case.
pub async fn chown<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let l1 = vec![
        dir("/opt", 0o700),
        dir("/opt/a", 0o700),
        dir("/opt/a/b", 0o700),
        file("/opt/a/b/file.txt", b"hello", 0o644),
    ];
    let l2 = vec![
        fstest::chown("/opt", 1, 1),
        fstest::chown("/opt/a", 1, 1),
        fstest::chown("/opt/a/b", 1, 1),
        fstest::chown("/opt/a/b/file.txt", 1, 1),
    ];
    check_snapshots(env, &[l1, l2]).await.map(|_| ())
}

/// Upstream's `DirectoryPermissionOnCommit` case.
pub async fn directory_permission_on_commit<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let l1 = vec![
        dir("/dir1", 0o700),
        dir("/dir2", 0o700),
        dir("/dir3", 0o700),
        dir("/dir4", 0o700),
        file("/dir4/f1", b"...", 0o644),
        dir("/dir5", 0o700),
        file("/dir5/f1", b"...", 0o644),
        fstest::chown("/dir1", 1, 1),
        fstest::chown("/dir2", 1, 1),
        fstest::chown("/dir3", 1, 1),
        fstest::chown("/dir5", 1, 1),
        fstest::chown("/dir5/f1", 1, 1),
    ];
    let l2 = vec![
        fstest::chown("/dir2", 0, 0),
        remove_all("/dir3"),
        fstest::chown("/dir4", 1, 1),
        fstest::chown("/dir4/f1", 1, 1),
    ];
    let l3 = vec![
        dir("/dir3", 0o700),
        fstest::chown("/dir3", 1, 1),
        remove_all("/dir5"),
        dir("/dir5", 0o700),
        fstest::chown("/dir5", 1, 1),
    ];
    check_snapshots(env, &[l1, l2, l3]).await.map(|_| ())
}

/// Upstream's `RemoveIntermediateSnapshot` case.
pub async fn remove_intermediate_snapshot<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let sn = &*env;
    let base = env.key("base");
    let m = sn.prepare(&base, "").await?;
    if let Some(mnt) = env.mount(&m, "base")? {
        mnt.unmount()?;
    }
    let committed_base = env.key("committed-base");
    sn.commit(&committed_base, &base).await?;
    let intermediate = env.key("intermediate");
    sn.prepare(&intermediate, &committed_base).await?;
    let committed_inter = env.key("committed-inter");
    sn.commit(&committed_inter, &intermediate).await?;
    let top = env.key("toplayer");
    sn.prepare(&top, &committed_inter).await?;
    expect_code(
        sn.remove(&committed_inter).await,
        Code::FailedPrecondition,
        "removal of the intermediate layer",
    )?;
    expect_code(
        sn.remove(&committed_base).await,
        Code::FailedPrecondition,
        "removal of the base layer",
    )?;
    sn.remove(&top).await?;
    sn.remove(&committed_inter).await?;
    sn.remove(&committed_base).await?;
    let (ids, other) = env.snapshot_dirs()?;
    ensure!(
        ids.is_empty() && other.is_empty(),
        "left: {ids:?} {other:?}"
    );
    Ok(())
}

/// Upstream's `DeletedFilesInChildSnapshot` case.
pub async fn deleted_files_in_child_snapshot<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let l1 = vec![
        file("/foo", b"foo\n", 0o777),
        file("/foobar", b"foobar\n", 0o777),
    ];
    let l2 = vec![remove_all("/foobar")];
    let l3 = vec![];
    check_snapshots(env, &[l1, l2, l3]).await.map(|_| ())
}

/// Upstream's `MoveFileFromLowerLayer` case.
pub async fn move_file_from_lower_layer<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let l1 = vec![
        dir("/dir1", 0o700),
        file("/dir1/f1", b"Hello", 0o644),
        dir("dir2", 0o700),
        file("dir2/f2", b"...", 0o644),
    ];
    let l2 = vec![
        dir("/dir3", 0o700),
        file("/dir3/f1", b"Hello", 0o644),
        remove_all("/dir1"),
        link("dir2/f2", "dir3/f2"),
        remove_all("dir2/f2"),
    ];
    check_snapshots(env, &[l1, l2]).await.map(|_| ())
}

/// A view's mounts are read-only by their options and, mounted, by a failing write.
fn expect_read_only<S: SnapshotterUnderTest>(
    env: &S,
    m: &[containerd_api::containerd::types::Mount],
    what: &str,
) -> Result<()> {
    ensure!(!is_writable(m), "{what}: writable mounts {m:?}");
    let Some(mnt) = env.mount(m, "view")? else {
        return Ok(());
    };
    let r = expect_write_fails(mnt.path(), what);
    mnt.unmount()?;
    r
}

fn expect_write_fails(root: &Path, what: &str) -> Result<()> {
    let testfile = root.join("testfile");
    match std::fs::write(&testfile, "testcontent") {
        Ok(()) => bail!(
            "{what}: write to {} should fail (EROFS) but did not",
            testfile.display()
        ),
        Err(e) => {
            eprintln!("{what}: write failed as expected: {e}");
            Ok(())
        }
    }
}

/// Upstream's `ViewReadonly` case.
pub async fn view_readonly<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let sn = &*env;
    let preparing = env.key("preparing");
    sn.prepare(&preparing, "").await?;
    let committed = env.key("committed");
    sn.commit(&committed, &preparing).await?;
    let view = env.key("view");
    let m = sn.view(&view, &committed).await?;
    // Checking the options is not enough (containerd#1368): mount for real where possible.
    expect_read_only(env, &m, "view of one layer")?;
    sn.remove(&view).await?;

    // A view of two layers (an overlay without upper) and a view of nothing.
    let second = create_snapshot(env, &committed, &[file("f", b"x", 0o644)]).await?;
    for (parent, what) in [
        (second.as_str(), "view of two layers"),
        ("", "view of no parent"),
    ] {
        let v = env.key("view2");
        let m = sn.view(&v, parent).await?;
        expect_read_only(env, &m, what)?;
        sn.remove(&v).await?;
    }
    sn.remove(&second).await?;
    sn.remove(&committed).await?;
    Ok(())
}

/// Upstream's `StatInWalk` case.
pub async fn stat_in_walk<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let sn = &*env;
    let prefix = "stats-in-walk-";
    let c1 = format!("{prefix}c1");
    let c2 = format!("{prefix}c2");
    sn.prepare(&format!("{c1}-a"), "").await?;
    sn.commit(&c1, &format!("{c1}-a")).await?;
    sn.prepare(&format!("{c2}-a"), &c1).await?;
    sn.commit(&c2, &format!("{c2}-a")).await?;
    sn.prepare(&format!("{prefix}a1"), &c2).await?;
    sn.view(&format!("{prefix}v1"), &c2).await?;
    // Enough snapshots for the stream to come in several batches.
    for i in 0..150 {
        sn.view_with(&format!("other-{i:03}"), "", default_labels())
            .await?;
    }
    let mut checked = 0;
    let batches = sn
        .walk(&[], async |si| {
            if !si.name.starts_with(prefix) {
                return Ok(());
            }
            let si2 = sn.stat(&si.name).await?;
            ensure!(si == si2, "walk {si:?} != stat {si2:?}");
            checked += 1;
            Ok(())
        })
        .await?;
    ensure!(checked == 4, "checked {checked} snapshots, expected 4");
    if let Some(batches) = batches {
        ensure!(batches >= 2, "expected several List batches, got {batches}");
    }
    Ok(())
}

/// Upstream's `CloseTwice` case.
pub async fn close_twice<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    // Upstream closes the snapshotter twice. A daemon's close is its shutdown: stop it
    // gracefully twice (a restart in between) and check the state is intact each time.
    let n = env.key("closeTwice");
    let prepare = format!("{n}-prepare");
    env.prepare(&prepare, "").await?;
    env.commit(&n, &prepare).await?;
    env.remove(&n).await?;
    let kept = create_snapshot(env, "", &[file("kept", b"still here\n", 0o640)]).await?;
    let active = env.key("active");
    env.prepare(&active, &kept).await?;
    let before = env.list(&[]).await?;
    for round in 0..2 {
        env.restart()
            .await
            .with_context(|| format!("restart {round}"))?;
        let after = env.list(&[]).await?;
        ensure!(
            after == before,
            "round {round}: state changed: {before:?} -> {after:?}"
        );
    }
    let flat = flat_with(env, &[&[file("kept", b"still here\n", 0o640)]])?;
    check_snapshot(env, &kept, &flat).await?;
    let m = env.mounts(&active).await?;
    if let Some(mnt) = env.mount(&m, "active")? {
        fstest::check_equal(&flat, mnt.path())?;
        mnt.unmount()?;
    }
    Ok(())
}

/// Upstream's `RootPermission` case.
pub async fn root_permission<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let preparing = env.key("preparing");
    let m = env.prepare(&preparing, "").await?;
    let mode = match env.mount(&m, "preparing")? {
        Some(mnt) => {
            let mode = std::fs::metadata(mnt.path())?.permissions().mode() & 0o777;
            mnt.unmount()?;
            mode
        }
        // Without mounting: the directory a parentless active snapshot binds.
        None => {
            let (Some(own), _) = super::mount_dirs(&m)? else {
                bail!("no writable directory in {m:?}");
            };
            std::fs::metadata(own)?.permissions().mode() & 0o777
        }
    };
    ensure!(mode == 0o755, "expected 0755, got {mode:o}");
    Ok(())
}

/// Upstream's `Rename` case.
pub async fn rename<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let l1 = vec![
        dir("/dir1", 0o700),
        dir("/somefiles", 0o700),
        file("/somefiles/f1", b"was here first!", 0o644),
        file("/somefiles/f2", b"nothing interesting", 0o644),
    ];
    // Like upstream for overlayfs (and erofs): renaming a lower *directory* needs
    // redirect_dir, which is not configured, so it is skipped.
    let l2 = vec![
        file("/somefiles/f1-overwrite", b"new content 1", 0o644),
        fstest::rename("/somefiles/f1-overwrite", "/somefiles/f1"),
        fstest::rename("/somefiles/f2", "/somefiles/f3"),
    ];
    check_snapshots(env, &[l1, l2]).await.map(|_| ())
}

/// Upstream's `Layers128Mount` case.
pub async fn layers_128_mount<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let sn = &*env;
    let mut appliers = vec![vec![
        file("/bottom", b"way at the bottom\n", 0o777),
        file("/overwriteme", b"FIRST!\n", 0o777),
        dir("/addhere", 0o755),
        dir("/onlyme", 0o755),
        file("/onlyme/bottom", b"bye!\n", 0o777),
    ]];
    for i in 1..=127 {
        appliers.push(vec![
            file("/overwriteme", format!("{i} WAS HERE!\n").as_bytes(), 0o777),
            file(&format!("/addhere/file-{i}"), b"same\n", 0o755),
            remove_all("/onlyme"),
            dir("/onlyme", 0o755),
            file(&format!("/onlyme/file-{i}"), b"only me!\n", 0o777),
        ]);
    }
    let flat = env.new_dir("flat")?;
    let mut parent = String::new();
    for (i, a) in appliers.iter().enumerate() {
        let preparing = env.key(&format!("prepare-layer-{i}"));
        let m = sn
            .prepare(&preparing, &parent)
            .await
            .with_context(|| format!("[layer {i}] prepare"))?;
        let n = env.max_unmerged_layers();
        let lowers = if n > 0 && i > n { 1 } else { i };
        ensure!(
            super::mount_dirs(&m)?.1.len() == lowers,
            "[layer {i}] {} lower dirs, want {lowers}",
            super::mount_dirs(&m)?.1.len()
        );
        if let Some(mnt) = env.mount(&m, "prepare")? {
            fstest::check_equal(&flat, mnt.path())
                .with_context(|| format!("[layer {i}] preparing differs from flat before apply"))?;
            fstest::apply(&flat, a)?;
            fstest::apply(mnt.path(), a)?;
            fstest::check_equal(&flat, mnt.path())
                .with_context(|| format!("[layer {i}] preparing differs from flat after apply"))?;
            mnt.unmount()?;
        }
        let committed = env.key(&format!("committed-{i}"));
        sn.commit(&committed, &preparing)
            .await
            .with_context(|| format!("[layer {i}] commit"))?;
        check_snapshot(env, &committed, &flat)
            .await
            .with_context(|| format!("[layer {i}] view of the committed layer"))?;
        parent = committed;
    }
    let view = env.key("fullview");
    let m = sn.view(&view, &parent).await?;
    if let [m0] = m.as_slice() {
        if env.max_unmerged_layers() > 0 {
            // One read-only mount of the flattened chain.
            ensure!(
                m0.r#type == "bind" || m0.r#type == "erofs",
                "a flattened view: {m0:?}"
            );
        } else {
            let o = parse_overlay(m0)?;
            ensure!(o.lowers.len() == 128, "{} lowers", o.lowers.len());
        }
    }
    if let Some(mnt) = env.mount(&m, "fullview")? {
        fstest::check_equal(&flat, mnt.path()).context("fullview should equal flat")?;
        mnt.unmount()?;
    }
    Ok(())
}

/// Not in upstream's list: the metadata a layer must keep that the cases above do not
/// exercise (setuid/setgid/sticky, symlinks, devices, fifos, xattrs, hard links), changed
/// again in a second layer.
pub async fn special_files<S: SnapshotterUnderTest>(env: &mut S) -> Result<()> {
    let l1 = vec![
        dir("/bin", 0o755),
        file("/bin/su", b"#!/bin/true\n", 0o4755),
        file("/bin/wall", b"#!/bin/true\n", 0o2755),
        dir("/tmp", 0o1777),
        fstest::symlink("../bin/su", "/tmp/su-link"),
        Op::Symlink("/does/not/exist".into(), "/dangling".into()),
        Op::CharDev("/null".into(), 1, 3, 0o666),
        Op::Fifo("/fifo".into(), 0o600),
        Op::Xattr("/bin/su".into(), "user.comment".into(), b"setuid".to_vec()),
        Op::Xattr("/tmp".into(), "user.dir".into(), b"sticky".to_vec()),
        file("/data", &vec![0xa5u8; 3 * 4096 + 17], 0o600),
        link("/data", "/data-link"),
        dir("/deep/a/b/c/d/e", 0o750),
        file("/deep/a/b/c/d/e/f", b"deep\n", 0o400),
        fstest::chown("/deep/a/b/c/d/e/f", 1234, 5678),
    ];
    let l2 = vec![
        fstest::chmod("/bin/su", 0o755),
        Op::Xattr("/bin/wall".into(), "user.new".into(), b"2".to_vec()),
        remove_all("/tmp/su-link"),
        Op::Symlink("/bin/wall".into(), "/tmp/su-link".into()),
        remove_all("/null"),
        Op::CharDev("/zero".into(), 1, 5, 0o666),
        link("/deep/a/b/c/d/e/f", "/f-link"),
    ];
    check_snapshots(env, &[l1, l2]).await.map(|_| ())
}
