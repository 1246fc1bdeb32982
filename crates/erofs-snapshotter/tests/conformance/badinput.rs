//! Bad input: hostile keys (`/`, `..`, NUL, numbers that look like ids), oversized labels,
//! parents that are not committed, the `snapshotter` request field, races on one key,
//! Commit's rebase parent, and the gRPC codes containerd relies on.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use containerd_api::containerd::services::snapshots::v1 as pb;
use testsuite::client::{expect_code, labels};
use tonic::Code;

use crate::client::{Env, run};
use testsuite::snapshots::cases::{check_snapshot, create_snapshot, flat_with};
use testsuite::snapshots::fstest::{self, Op, file};
use testsuite::snapshots::{Mode, SnapshotterUnderTest, default_labels, kind, list_dir};

macro_rules! plain {
    ($($name:ident => $f:path;)*) => {$(
        #[test]
        fn $name() {
            run(Mode::Plain, $f)
        }
    )*};
}

macro_rules! both {
    ($($plain:ident, $quota:ident => $f:expr;)*) => {$(
        #[test]
        fn $plain() {
            run(Mode::Plain, $f)
        }
        #[test]
        fn $quota() {
            run(Mode::Quota, $f)
        }
    )*};
}

plain! {
    hostile_keys => hostile_keys_case;
    nul_and_empty_keys => nul_and_empty_keys_case;
    huge_label => huge_label_case;
    parent_not_committed => parent_not_committed_case;
    unknown_snapshotter_field => unknown_snapshotter_field_case;
    list_batches => list_batches_case;
}

#[test]
fn quota_limits_writable_layer() {
    run(Mode::Quota, quota_limits_writable_layer_case)
}

both! {
    grpc_error_codes, grpc_error_codes_quota => grpc_error_codes_case;
    concurrent_prepare_same_key, concurrent_prepare_same_key_quota => concurrent_prepare_case;
    concurrent_commit, concurrent_commit_quota => concurrent_commit_case;
    commit_rebase, commit_rebase_quota => commit_rebase_case;
    cleanup_races_lifecycle, cleanup_races_lifecycle_quota => cleanup_races_lifecycle_case;
    failed_commit_keeps_active_intact_no_parent, failed_commit_keeps_active_intact_no_parent_quota =>
        async |env: &mut Env| failed_commit_keeps_active_intact_case(env, false).await;
    failed_commit_keeps_active_intact_on_parent, failed_commit_keeps_active_intact_on_parent_quota =>
        async |env: &mut Env| failed_commit_keeps_active_intact_case(env, true).await;
}

/// Everything under `dir` (relative paths), not following symlinks or crossing into `skip`.
fn tree(dir: &Path, skip: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let p = e.path();
            if p.starts_with(skip) {
                continue;
            }
            out.insert(p.strip_prefix(dir).expect("under").display().to_string());
            if e.file_type()?.is_dir() {
                stack.push(p);
            }
        }
    }
    Ok(out)
}

/// Only `metadata.redb` and `snapshots/` in the root, only numeric directories in
/// `snapshots/`; returns their number.
fn root_is_clean(env: &Env) -> Result<usize> {
    let top: BTreeSet<String> = list_dir(&env.root)?.into_keys().collect();
    let allowed: BTreeSet<String> = ["metadata.redb", "snapshots"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    ensure!(
        top.is_subset(&allowed),
        "unexpected entries in the root: {top:?}"
    );
    let (ids, other) = env.snapshot_dirs()?;
    ensure!(
        other.is_empty(),
        "unexpected entries in snapshots/: {other:?}"
    );
    Ok(ids.len())
}

async fn hostile_keys_case(env: &mut Env) -> Result<()> {
    let marker = format!(
        "escape-{}-{}",
        std::process::id(),
        env.base.file_name().unwrap_or_default().to_string_lossy()
    );
    let keys: Vec<String> = vec![
        "default/1/base".into(),
        "..".into(),
        ".".into(),
        "/".into(),
        "//".into(),
        format!("../../../../../../../../tmp/{marker}-a"),
        format!("/tmp/{marker}-b"),
        format!("{marker}-c/../../.."),
        format!("../{marker}-d"),
        "a//b/./c/../d".into(),
        "trailing/".into(),
        "1".into(),
        "0".into(),
        "18446744073709551615".into(),
        "new-0000000000000001".into(),
        "rm-1-00000000".into(),
        "metadata.redb".into(),
        "../metadata.redb".into(),
        "../../root/snapshots/1".into(),
        "ünïcødé/ключ/键".into(),
        "with space\tand tab\nand newline".into(),
        "x".repeat(4096),
    ];
    let base_before = tree(&env.base, &env.work)?;
    let mut names = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let what = format!("key #{i} {:?}", if k.len() > 60 { &k[..60] } else { k });
        let m = env
            .sn
            .prepare(k, "")
            .await
            .with_context(|| format!("prepare {what}"))?;
        let mnt = env.mount(&m, "hostile")?;
        std::fs::write(mnt.path().join("owner"), k)?;
        mnt.unmount()?;
        let st = env
            .sn
            .stat(k)
            .await
            .with_context(|| format!("stat {what}"))?;
        ensure!(
            st.name == *k && kind(&st) == pb::Kind::Active,
            "{what}: {st:?}"
        );
        ensure!(
            env.sn.mounts(k).await? == m,
            "{what}: Mounts differs from Prepare"
        );
        // Names and view keys as hostile as the key (but within the length limit).
        let short = if k.len() > 100 { &k[..100] } else { k };
        let name = format!("{short}/../../committed-{i}");
        env.sn
            .commit(&name, k)
            .await
            .with_context(|| format!("commit {what}"))?;
        let v = format!("../view-{i}/{short}");
        let m = env
            .sn
            .view(&v, &name)
            .await
            .with_context(|| format!("view {what}"))?;
        let mnt = env.mount(&m, "hostile-view")?;
        let owner = std::fs::read_to_string(mnt.path().join("owner"))?;
        mnt.unmount()?;
        ensure!(
            owner == *k,
            "{what}: the view shows another snapshot's file"
        );
        names.push((name, v));
    }
    let listed: BTreeSet<String> = env
        .sn
        .list(&[])
        .await?
        .into_iter()
        .map(|i| i.name)
        .collect();
    let expected: BTreeSet<String> = names
        .iter()
        .flat_map(|(n, v)| [n.clone(), v.clone()])
        .collect();
    ensure!(listed == expected, "List {listed:?}, expected {expected:?}");
    ensure!(
        root_is_clean(env)? == 2 * keys.len(),
        "expected one directory per snapshot"
    );
    ensure!(
        tree(&env.base, &env.work)?
            .iter()
            .all(|p| !p.contains(&marker)),
        "a key made a path appear"
    );
    let base_after: BTreeSet<String> = tree(&env.base, &env.work)?
        .into_iter()
        .filter(|p| !p.starts_with("root/"))
        .collect();
    let base_before: BTreeSet<String> = base_before
        .into_iter()
        .filter(|p| !p.starts_with("root/"))
        .collect();
    ensure!(
        base_after == base_before,
        "paths appeared outside the root: {:?}",
        base_after.difference(&base_before).collect::<Vec<_>>()
    );
    for p in [
        format!("/tmp/{marker}-a"),
        format!("/tmp/{marker}-b"),
        format!("/{marker}-c"),
        format!("/tmp/{marker}-d"),
    ] {
        ensure!(!Path::new(&p).exists(), "{p} exists");
    }
    for (n, v) in &names {
        env.sn.remove(v).await?;
        env.sn.remove(n).await?;
    }
    ensure!(
        root_is_clean(env)? == 0,
        "directories left after removing everything"
    );
    // One byte over the longest key the daemon accepts.
    expect_code(
        env.sn.prepare(&"x".repeat(4097), "").await,
        Code::InvalidArgument,
        "a 4097-byte key",
    )?;
    Ok(())
}

async fn nul_and_empty_keys_case(env: &mut Env) -> Result<()> {
    let sn = &env.sn;
    let base = create_snapshot(env, "", &[file("f", b"f", 0o644)]).await?;
    let active = env.key("active");
    sn.prepare(&active, "").await?;
    let bad = "default/1/a\0b";
    let ia = Code::InvalidArgument;
    expect_code(sn.prepare(bad, "").await, ia, "Prepare with NUL")?;
    expect_code(sn.view(bad, &base).await, ia, "View with NUL")?;
    expect_code(
        sn.prepare("ok", "parent\0").await,
        ia,
        "Prepare with NUL parent",
    )?;
    expect_code(
        sn.commit(bad, &active).await,
        ia,
        "Commit to a name with NUL",
    )?;
    expect_code(sn.commit("fine", bad).await, ia, "Commit of a key with NUL")?;
    expect_code(sn.stat(bad).await, ia, "Stat with NUL")?;
    expect_code(sn.mounts(bad).await, ia, "Mounts with NUL")?;
    expect_code(sn.remove(bad).await, ia, "Remove with NUL")?;
    expect_code(sn.usage(bad).await, ia, "Usage with NUL")?;
    let mut info = sn.stat(&base).await?;
    info.name = bad.into();
    expect_code(sn.update(info, &[]).await, ia, "Update with NUL")?;
    expect_code(
        sn.prepare_with("ok2", "", labels(&[("k\0", "v")])).await,
        ia,
        "label key with NUL",
    )?;
    expect_code(
        sn.prepare_with("ok3", "", labels(&[("k", "v\0")])).await,
        ia,
        "label value with NUL",
    )?;
    expect_code(
        sn.prepare_with("ok4", "", labels(&[("", "v")])).await,
        ia,
        "empty label key",
    )?;
    expect_code(sn.prepare("", "").await, ia, "Prepare with an empty key")?;
    expect_code(sn.view("", &base).await, ia, "View with an empty key")?;
    expect_code(sn.commit("", &active).await, ia, "Commit to an empty name")?;
    let listed: BTreeSet<String> = sn.list(&[]).await?.into_iter().map(|i| i.name).collect();
    ensure!(
        listed == BTreeSet::from([base.clone(), active.clone()]),
        "something was stored: {listed:?}"
    );
    ensure!(root_is_clean(env)? == 2);
    let st = sn.stat(&active).await?;
    ensure!(
        kind(&st) == pb::Kind::Active,
        "the active snapshot changed: {st:?}"
    );
    Ok(())
}

async fn huge_label_case(env: &mut Env) -> Result<()> {
    let sn = &env.sn;
    let mib = "v".repeat(1 << 20);
    let huge = || labels(&[("containerd.io/huge", &mib)]);
    let ia = Code::InvalidArgument;
    expect_code(
        sn.prepare_with("huge", "", huge()).await,
        ia,
        "Prepare with a 1 MiB label",
    )?;
    ensure!(sn.list(&[]).await?.is_empty(), "a snapshot was stored");
    ensure!(root_is_clean(env)? == 0, "a directory was left behind");
    let base = create_snapshot(env, "", &[file("f", b"f", 0o644)]).await?;
    expect_code(
        sn.view_with("huge", &base, huge()).await,
        ia,
        "View with a 1 MiB label",
    )?;
    let active = env.key("active");
    sn.prepare(&active, &base).await?;
    expect_code(
        sn.commit_with("huge", &active, huge(), "").await,
        ia,
        "Commit with a 1 MiB label",
    )?;
    let st = sn.stat(&active).await?;
    ensure!(kind(&st) == pb::Kind::Active, "{st:?}");
    let mut info = st.clone();
    info.labels = huge();
    expect_code(
        sn.update(info.clone(), &[]).await,
        ia,
        "Update with a 1 MiB label",
    )?;
    expect_code(
        sn.update(info, &["labels.containerd.io/huge"]).await,
        ia,
        "Update of one 1 MiB label",
    )?;
    ensure!(
        sn.stat(&active).await? == st,
        "the failed Update changed the snapshot"
    );
    expect_code(
        sn.stat("huge").await,
        Code::NotFound,
        "the refused snapshot",
    )?;
    ensure!(root_is_clean(env)? == 2);
    // containerd's limit is 4096 bytes for key plus value.
    let k = "containerd.io/k";
    let ok = "v".repeat(4096 - k.len());
    sn.prepare_with("at-limit", "", labels(&[(k, &ok)])).await?;
    let over = "v".repeat(4097 - k.len());
    expect_code(
        sn.prepare_with("over-limit", "", labels(&[(k, &over)]))
            .await,
        ia,
        "a 4097-byte label",
    )?;
    Ok(())
}

async fn parent_not_committed_case(env: &mut Env) -> Result<()> {
    let sn = &env.sn;
    let base = create_snapshot(env, "", &[file("f", b"f", 0o644)]).await?;
    let active = env.key("active");
    sn.prepare(&active, &base).await?;
    let view = env.key("view");
    sn.view(&view, &base).await?;
    for (parent, code, what) in [
        (active.as_str(), Code::InvalidArgument, "an active parent"),
        (view.as_str(), Code::InvalidArgument, "a view parent"),
        ("missing", Code::NotFound, "a missing parent"),
    ] {
        expect_code(
            sn.prepare("child", parent).await,
            code,
            &format!("Prepare on {what}"),
        )?;
        expect_code(
            sn.view("child", parent).await,
            code,
            &format!("View on {what}"),
        )?;
    }
    expect_code(sn.stat("child").await, Code::NotFound, "the refused child")?;
    ensure!(
        root_is_clean(env)? == 3,
        "a refused snapshot left a directory"
    );
    Ok(())
}

/// containerd puts the proxy plugin's name in every request's `snapshotter` field; a proxy
/// serves one snapshotter and ignores it. So a request naming a snapshotter that does not
/// exist is served as if it named this one (containerd's own snapshots service would refuse
/// it before it reached a backend).
async fn unknown_snapshotter_field_case(env: &mut Env) -> Result<()> {
    let other = env.sn.named("no-such-snapshotter");
    let key = env.key("k");
    let m = other
        .prepare(&key, "")
        .await
        .context("Prepare naming another snapshotter")?;
    let mnt = env.mount(&m, "k")?;
    std::fs::write(mnt.path().join("x"), "x")?;
    mnt.unmount()?;
    let a = env.sn.stat(&key).await?;
    let b = env.sn.named("").stat(&key).await?;
    ensure!(a == b && kind(&a) == pb::Kind::Active, "{a:?} {b:?}");
    env.sn
        .named("yet-another")
        .commit("committed", &key)
        .await?;
    ensure!(env.sn.list(&[]).await?.len() == 1);
    Ok(())
}

async fn list_batches_case(env: &mut Env) -> Result<()> {
    for i in 0..250 {
        env.sn.view(&format!("v/{i:03}"), "").await?;
    }
    let batches = env.sn.list_batches(&[]).await?;
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    ensure!(
        sizes.iter().sum::<usize>() == 250 && sizes.iter().all(|&n| n <= 100) && sizes.len() == 3,
        "List batches {sizes:?}, expected 250 snapshots in batches of at most 100"
    );
    let names: BTreeSet<String> = batches.into_iter().flatten().map(|i| i.name).collect();
    ensure!(names.len() == 250, "duplicates in List");
    let some = env.sn.list_batches(&["name==v/007", "name==v/249"]).await?;
    ensure!(some.len() == 1 && some[0].len() == 2, "{some:?}");
    ensure!(
        env.sn
            .list_batches(&["name==none"])
            .await?
            .iter()
            .all(Vec::is_empty)
    );
    Ok(())
}

async fn grpc_error_codes_case(env: &mut Env) -> Result<()> {
    let sn = &env.sn;
    let nf = Code::NotFound;
    expect_code(sn.stat("missing").await, nf, "Stat of a missing key")?;
    expect_code(sn.mounts("missing").await, nf, "Mounts of a missing key")?;
    expect_code(
        sn.commit("name", "missing").await,
        nf,
        "Commit of a missing key",
    )?;
    expect_code(sn.usage("missing").await, nf, "Usage of a missing key")?;
    let mut info = pb::Info {
        name: "missing".into(),
        ..Default::default()
    };
    expect_code(
        sn.update(info.clone(), &[]).await,
        nf,
        "Update of a missing key",
    )?;
    sn.remove("missing")
        .await
        .context("Remove of a missing key is OK")?;
    expect_code(
        sn.prepare("k", "missing").await,
        nf,
        "Prepare on a missing parent",
    )?;

    let base = create_snapshot(env, "", &[file("f", b"f", 0o644)]).await?;
    let active = env.key("active");
    let m = sn.prepare(&active, &base).await?;
    let view = env.key("view");
    sn.view(&view, &base).await?;
    let ae = Code::AlreadyExists;
    expect_code(
        sn.prepare(&active, &base).await,
        ae,
        "Prepare of an existing key",
    )?;
    expect_code(
        sn.prepare(&base, "").await,
        ae,
        "Prepare of an existing committed name",
    )?;
    expect_code(sn.view(&view, &base).await, ae, "View of an existing key")?;
    let ia = Code::InvalidArgument;
    expect_code(
        sn.prepare("k", &active).await,
        ia,
        "Prepare on an active parent",
    )?;
    expect_code(sn.prepare("k", &view).await, ia, "Prepare on a view parent")?;
    let fp = Code::FailedPrecondition;
    let st = expect_code(
        sn.remove(&base).await,
        fp,
        "Remove of a snapshot with children",
    )?;
    ensure!(
        st.message().contains("remove"),
        "message {:?}",
        st.message()
    );
    expect_code(sn.mounts(&base).await, fp, "Mounts of a committed snapshot")?;
    expect_code(sn.commit("from-view", &view).await, fp, "Commit of a view")?;
    expect_code(
        sn.commit(&base, &active).await,
        ae,
        "Commit to an existing name",
    )?;
    expect_code(
        sn.commit(&view, &active).await,
        ae,
        "Commit to the name of a view",
    )?;
    // The refused Commits left the active snapshot as it was.
    ensure!(
        sn.mounts(&active).await? == m,
        "the active snapshot's mounts changed"
    );
    info = sn.stat(&active).await?;
    for path in ["parent", "kind", "name", "created_at", "labelsx", ""] {
        expect_code(
            sn.update(info.clone(), &[path]).await,
            ia,
            &format!("Update with mask path {path:?}"),
        )?;
    }
    let (size, inodes) = sn.usage(&base).await?;
    ensure!(
        size > 0 && inodes > 0,
        "usage of a committed layer: {size} {inodes}"
    );
    Ok(())
}

async fn concurrent_prepare_case(env: &mut Env) -> Result<()> {
    let base = create_snapshot(env, "", &[file("f", b"f", 0o644)]).await?;
    let key = env.key("raced");
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (sn, key, base, barrier) = (env.sn.clone(), key.clone(), base.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            sn.prepare(&key, &base).await
        }));
    }
    let mut ok = Vec::new();
    let mut other = Vec::new();
    for t in tasks {
        match t.await? {
            Ok(m) => ok.push(m),
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => other.push(format!("{:?}: {}", s.code(), s.message())),
        }
    }
    ensure!(other.is_empty(), "unexpected errors: {other:?}");
    ensure!(
        ok.len() == 1,
        "{} of 16 concurrent Prepares succeeded",
        ok.len()
    );
    ensure!(
        root_is_clean(env)? == 2,
        "expected exactly one new directory"
    );
    let mnt = env.mount(&ok[0], "raced")?;
    ensure!(std::fs::read(mnt.path().join("f"))? == b"f");
    mnt.unmount()?;
    // 16 different keys at once all succeed, each with its own directory.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (sn, key, base) = (env.sn.clone(), env.key(&format!("k{i}")), base.clone());
        tasks.push(tokio::spawn(async move { sn.prepare(&key, &base).await }));
    }
    let mut uppers = BTreeSet::new();
    for t in tasks {
        let m = t.await?.context("concurrent Prepare of distinct keys")?;
        uppers.insert(testsuite::snapshots::mount_dirs(&m)?.0);
    }
    ensure!(uppers.len() == 16, "distinct keys share upper directories");
    ensure!(root_is_clean(env)? == 18);
    Ok(())
}

async fn concurrent_commit_case(env: &mut Env) -> Result<()> {
    let base = create_snapshot(env, "", &[file("f", b"f", 0o644)]).await?;
    // One active committed under two names at once: one wins, the other finds no key.
    let key = env.key("a");
    let m = env.sn.prepare(&key, &base).await?;
    let mnt = env.mount(&m, "a")?;
    fstest::apply(mnt.path(), &[file("g", b"g", 0o644)])?;
    mnt.unmount()?;
    let (n1, n2) = (env.key("n1"), env.key("n2"));
    let (s1, s2) = (env.sn.clone(), env.sn.clone());
    let (k1, k2, c1, c2) = (key.clone(), key.clone(), n1.clone(), n2.clone());
    let (r1, r2) = tokio::join!(
        tokio::spawn(async move { s1.commit(&c1, &k1).await }),
        tokio::spawn(async move { s2.commit(&c2, &k2).await })
    );
    let (r1, r2) = (r1?, r2?);
    ensure!(
        r1.is_ok() != r2.is_ok(),
        "both or neither Commit succeeded: {r1:?} {r2:?}"
    );
    let (won, lost) = if r1.is_ok() { (&n1, r2) } else { (&n2, r1) };
    expect_code(lost, Code::NotFound, "the losing Commit")?;
    let flat = flat_with(env, &[&[file("f", b"f", 0o644), file("g", b"g", 0o644)]])?;
    check_snapshot(env, won, &flat).await?;
    // Two actives committed to one name at once: one wins, the other stays active.
    let (a, b) = (env.key("a"), env.key("b"));
    env.sn.prepare(&a, &base).await?;
    let mb = env.sn.prepare(&b, &base).await?;
    let name = env.key("same-name");
    let (s1, s2) = (env.sn.clone(), env.sn.clone());
    let (ka, kb, c1, c2) = (a.clone(), b.clone(), name.clone(), name.clone());
    let (ra, rb) = tokio::join!(
        tokio::spawn(async move { s1.commit(&c1, &ka).await }),
        tokio::spawn(async move { s2.commit(&c2, &kb).await })
    );
    let (ra, rb) = (ra?, rb?);
    ensure!(
        ra.is_ok() != rb.is_ok(),
        "both or neither Commit succeeded: {ra:?} {rb:?}"
    );
    let (loser, lost) = if ra.is_ok() { (&b, rb) } else { (&a, ra) };
    expect_code(lost, Code::AlreadyExists, "the losing Commit")?;
    let st = env.sn.stat(loser).await?;
    ensure!(
        kind(&st) == pb::Kind::Active,
        "the loser is no longer active: {st:?}"
    );
    if loser == &b {
        ensure!(env.sn.mounts(&b).await? == mb, "the loser's mounts changed");
    }
    Ok(())
}

/// The layers of the rebase tests.
fn p_ops() -> Vec<Op> {
    vec![
        file("p.txt", b"from P\n", 0o644),
        file("shared", b"P\n", 0o644),
    ]
}

async fn commit_rebase_case(env: &mut Env) -> Result<()> {
    let sn = &env.sn;
    let p = create_snapshot(env, "", &p_ops()).await?;
    // A parentless active (parallel unpack) committed with parent P.
    let c_ops = vec![
        file("c.txt", b"from C\n", 0o644),
        file("shared", b"C\n", 0o644),
    ];
    let ca = env.key("c-active");
    let m = sn.prepare(&ca, "").await?;
    let mnt = env.mount(&m, "c")?;
    fstest::apply(mnt.path(), &c_ops)?;
    mnt.unmount()?;
    let c = env.key("C");
    sn.commit_with(&c, &ca, default_labels(), &p)
        .await
        .context("rebase commit")?;
    let st = sn.stat(&c).await?;
    ensure!(st.parent == p && kind(&st) == pb::Kind::Committed, "{st:?}");
    let flat = flat_with(env, &[&p_ops(), &c_ops])?;
    check_snapshot(env, &c, &flat)
        .await
        .context("a view of the rebased layer")?;
    let st = expect_code(sn.remove(&p).await, Code::FailedPrecondition, "Remove of P")?;
    ensure!(st.message().contains("remove"));
    let child = env.key("child");
    let m = sn.prepare(&child, &c).await?;
    let mnt = env.mount(&m, "child")?;
    fstest::check_equal(&flat, mnt.path())?;
    mnt.unmount()?;
    sn.remove(&child).await?;
    // Naming the parent it already has is fine.
    let da = env.key("d-active");
    sn.prepare(&da, &p).await?;
    let d = env.key("D");
    sn.commit_with(&d, &da, default_labels(), &p).await?;
    ensure!(sn.stat(&d).await?.parent == p);
    // Another parent than it has: InvalidArgument, nothing changes, a plain Commit works.
    let ea = env.key("e-active");
    let me = sn.prepare(&ea, &p).await?;
    let e = env.key("E");
    expect_code(
        sn.commit_with(&e, &ea, default_labels(), &c).await,
        Code::InvalidArgument,
        "rebase onto a different parent",
    )?;
    expect_code(sn.stat(&e).await, Code::NotFound, "the refused name")?;
    let st = sn.stat(&ea).await?;
    ensure!(kind(&st) == pb::Kind::Active && st.parent == p, "{st:?}");
    ensure!(sn.mounts(&ea).await? == me);
    sn.commit(&e, &ea).await?;
    // An active or view parent: InvalidArgument.
    let ga = env.key("g-active");
    sn.prepare(&ga, "").await?;
    let ha = env.key("h-active");
    sn.prepare(&ha, "").await?;
    let g = env.key("G");
    expect_code(
        sn.commit_with(&g, &ga, default_labels(), &ha).await,
        Code::InvalidArgument,
        "rebase onto an active snapshot",
    )?;
    ensure!(kind(&sn.stat(&ga).await?) == pb::Kind::Active);
    // Missing parent: NotFound, still active.
    expect_code(
        sn.commit_with(&g, &ga, default_labels(), "missing-parent")
            .await,
        Code::NotFound,
        "rebase onto a missing parent",
    )?;
    ensure!(kind(&sn.stat(&ga).await?) == pb::Kind::Active);
    expect_code(sn.stat(&g).await, Code::NotFound, "the refused name")?;
    // The rebased layer is a child of P like the others: once they are gone, P can go.
    for k in [&c, &d, &e] {
        sn.remove(k).await?;
    }
    sn.remove(&p)
        .await
        .context("P after its children (one rebased) are gone")?;
    Ok(())
}

/// Cleanup running all the time while snapshots are created, committed and removed must
/// never take a directory that is being recorded.
async fn cleanup_races_lifecycle_case(env: &mut Env) -> Result<()> {
    let base = create_snapshot(env, "", &[file("f", b"f", 0o644)]).await?;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sweeper = {
        let (sn, done) = (env.sn.clone(), done.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                sn.cleanup().await?;
                n += 1;
            }
            Ok::<u32, tonic::Status>(n)
        })
    };
    let mut kept = Vec::new();
    for i in 0..30 {
        let key = env.key(&format!("race-{i}"));
        let m = env.sn.prepare(&key, &base).await?;
        let mnt = env.mount(&m, "race")?;
        std::fs::write(mnt.path().join("i"), i.to_string())?;
        mnt.unmount()?;
        match i % 3 {
            0 => {
                let name = format!("{key}-committed");
                env.sn.commit(&name, &key).await?;
                kept.push((name, i));
            }
            1 => env.sn.remove(&key).await?,
            _ => kept.push((key, i)),
        }
        env.sn.view(&env.key("race-view"), &base).await?;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let sweeps = sweeper.await??;
    eprintln!("{sweeps} Cleanups ran during the lifecycle calls");
    crate::faults::check_consistent(env).await?;
    for (k, i) in kept {
        let flat = flat_with(
            env,
            &[&[
                file("f", b"f", 0o644),
                file("i", i.to_string().as_bytes(), 0o644),
            ]],
        )?;
        let st = env.sn.stat(&k).await?;
        let m = if kind(&st) == pb::Kind::Active {
            env.sn.mounts(&k).await?
        } else {
            check_snapshot(env, &k, &flat).await?;
            continue;
        };
        let mnt = env.mount(&m, "race-check")?;
        let r = fstest::check_equal(&flat, mnt.path());
        mnt.unmount()?;
        r?;
    }
    Ok(())
}

/// A Commit refused after the layer was built (rebase onto a missing parent) must leave the
/// active snapshot exactly as it was: same mounts, still writable, and what is written
/// afterwards must be in the layer of the next, successful Commit.
async fn failed_commit_keeps_active_intact_case(env: &mut Env, on_parent: bool) -> Result<()> {
    let sn = &env.sn;
    let p = create_snapshot(env, "", &p_ops()).await?;
    {
        let parent = if on_parent { p.clone() } else { String::new() };
        let key = env.key("active");
        let before = sn.prepare(&key, &parent).await?;
        let mnt = env.mount(&before, "a")?;
        let first = [file("first", b"1\n", 0o644)];
        fstest::apply(mnt.path(), &first)?;
        mnt.unmount()?;
        let name = env.key("committed");
        // Refused in the store transaction, after the layer was built.
        let code = if parent.is_empty() {
            Code::NotFound
        } else {
            Code::InvalidArgument
        };
        expect_code(
            sn.commit_with(&name, &key, default_labels(), "missing-parent")
                .await,
            code,
            "the refused Commit",
        )?;
        let after = sn.mounts(&key).await?;
        ensure!(
            after == before,
            "parent {parent:?}: a refused Commit changed the active snapshot's mounts:\n  \
             before: {before:?}\n  after:  {after:?}"
        );
        let mnt = env.mount(&after, "a")?;
        let second = [file("second", b"2\n", 0o644)];
        let w = fstest::apply(mnt.path(), &second);
        mnt.unmount()?;
        w.context("writing after a refused Commit")?;
        sn.commit_with(
            &name,
            &key,
            default_labels(),
            if parent.is_empty() { &p } else { "" },
        )
        .await?;
        let flat = flat_with(env, &[&p_ops(), &first, &second])?;
        check_snapshot(env, &name, &flat)
            .await
            .with_context(|| format!("parent {parent:?}: the layer after a refused Commit"))?;
    }
    Ok(())
}

/// Writes `mib` MiB to `path`; the OS error number if it fails.
fn write_mib(path: &Path, mib: usize) -> Result<Option<i32>> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        if let Err(e) = f.write_all(&chunk) {
            return Ok(Some(e.raw_os_error().unwrap_or(-1)));
        }
    }
    Ok(f.sync_all().err().map(|e| e.raw_os_error().unwrap_or(-1)))
}

/// `default_size = "64MB"` limits each writable layer (with or without a parent), and the
/// `containerd.io/snapshot/max-size` label overrides it per snapshot.
async fn quota_limits_writable_layer_case(env: &mut Env) -> Result<()> {
    let base = create_snapshot(env, "", &[file("f", b"f", 0o644)]).await?;
    for parent in ["", base.as_str()] {
        let k = env.key("limited");
        let m = env.sn.prepare(&k, parent).await?;
        let mnt = env.mount(&m, "limited")?;
        let r = write_mib(&mnt.path().join("big"), 80);
        mnt.unmount()?;
        ensure!(
            r? == Some(28),
            "parent {parent:?}: writing 80 MiB into a 64 MiB writable layer should fail with ENOSPC"
        );
    }
    let k = env.key("larger");
    let l = labels(&[(
        "containerd.io/snapshot/max-size",
        &(128u64 << 20).to_string(),
    )]);
    let m = env.sn.prepare_with(&k, &base, l).await?;
    let mnt = env.mount(&m, "larger")?;
    let r = write_mib(&mnt.path().join("big"), 80);
    mnt.unmount()?;
    ensure!(r?.is_none(), "80 MiB should fit a 128 MiB writable layer");
    let name = env.key("larger-committed");
    env.sn.commit(&name, &k).await?;
    let (size, _) = env.sn.usage(&name).await?;
    ensure!(size >= 80 << 20, "usage of an 80 MiB layer: {size}");
    Ok(())
}
