//! The crash-and-load soak: concurrent clients drive the real daemon over its socket
//! (Prepare, Apply, writes through the returned mounts, Commit, View, Mounts, Remove, Usage,
//! List) while it is killed with SIGKILL at random moments and restarted. After every restart
//! an invariant checker proves:
//!
//! - **nothing acknowledged is lost**: every snapshot whose creation returned success (and
//!   whose removal did not) is there with its kind and parent; every acknowledged removal
//!   stays removed; requests in flight at the kill may have happened or not, nothing else;
//! - **store and disk agree**: one `ROOT/snapshots/ID` directory per record, no staging or
//!   half-removed directory, nothing in `ROOT/tmp`;
//! - **layers are whole**: every committed layer passes `erofs-snapshotter fsck`, and mounting
//!   it (a View over it) passes the fs-verity check against the recorded digest;
//! - **nothing leaks**: every mount under the root belongs to a live snapshot, no loop device
//!   reads a file of the root that is gone.
//!
//! Seeded and replayable: `SOAK_SEED` (default: from the clock, printed), `SOAK_ROUNDS`
//! (default 4 in the suite), `SOAK_WORKERS` (3). A run prints its counts (rounds, kills,
//! operations by result, violations). A failing run names its seed: run it again with that
//! seed (the interleaving with the kill differs, the operations and their order per client do
//! not).
//!
//! Violations are collected, not panicked on at once, so a run reports all it found.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testsuite::client::Client;
use testsuite::daemon_env::{Cfg, Env};
use tonic::Code;

/// Set when this round's SIGKILL has been sent.
static KILLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

const BIN: &str = env!("CARGO_BIN_EXE_erofs-snapshotter");
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TGZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the clients were told, which the daemon must keep across kills.
#[derive(Debug, Default)]
struct Model {
    /// Committed name -> parent name ("" for none).
    committed: BTreeMap<String, String>,
    /// Active key -> parent.
    active: BTreeMap<String, String>,
    /// View key -> parent.
    views: BTreeMap<String, String>,
    /// Removed with success: must stay gone.
    removed: BTreeSet<String>,
    /// A creation or removal was in flight when the daemon died: either outcome is fine, and
    /// the checker learns which from the daemon.
    uncertain: BTreeSet<String>,
}

impl Model {
    fn children_of(&self, name: &str) -> bool {
        self.committed.values().any(|p| p == name)
            || self.active.values().any(|p| p == name)
            || self.views.values().any(|p| p == name)
    }
}

#[derive(Debug, Default)]
struct Counts {
    ops: BTreeMap<String, u64>,
    kills: u64,
    rounds: u64,
    violations: Vec<String>,
}

impl Counts {
    fn op(&mut self, what: &str, r: &str) {
        *self.ops.entry(format!("{what}:{r}")).or_default() += 1;
    }
}

/// An error a request may meet because of the kill (the daemon went away under it); only
/// once the kill was sent (before it, these codes are violations).
fn is_kill(s: &tonic::Status) -> bool {
    KILLED.load(std::sync::atomic::Ordering::SeqCst)
        && matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        )
        && !s.message().contains("panicked")
}

/// An error a request may meet because another client changed the same snapshots (a parent
/// removed meanwhile, a child created meanwhile).
fn is_race(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::NotFound | Code::FailedPrecondition)
}

/// A tar of `n` files of seeded content, optionally gzipped.
fn layer_blob(rng: &mut fastrand::Rng, gzip: bool) -> (Vec<u8>, &'static str) {
    use erofs_image::tar::{Entry, EntryKind, TarWriter};
    let mut w = TarWriter::new(Vec::new());
    let mut d = Entry::new(b"dir".to_vec(), EntryKind::Directory);
    d.mode = 0o755;
    w.append_bytes(&d, b"").unwrap();
    for i in 0..rng.usize(1..20) {
        let mut e = Entry::new(format!("dir/f{i}").into_bytes(), EntryKind::Regular);
        e.mode = 0o644;
        let len = rng.usize(0..40_000);
        let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        w.append_bytes(&e, &data).unwrap();
    }
    let tar = w.finish().unwrap();
    if gzip {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        (e.finish().unwrap(), TGZ)
    } else {
        (tar, TAR)
    }
}

/// What the clients of a round share.
struct Shared<'a> {
    env: &'a Env,
    stop: &'a std::sync::atomic::AtomicBool,
    model: &'a Mutex<Model>,
    counts: &'a Mutex<Counts>,
    /// Operation numbers (unique keys across clients and rounds).
    seq: &'a std::sync::atomic::AtomicU64,
}

/// One client's round: operations until `stop`.
async fn worker(sh: &Shared<'_>, client: Client, wid: usize, seed: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let Shared {
        env,
        stop,
        model,
        counts,
        seq,
    } = *sh;
    let mut rng = fastrand::Rng::with_seed(seed);
    while !stop.load(Relaxed) {
        let n = seq.fetch_add(1, Relaxed);
        let pick_committed = |rng: &mut fastrand::Rng| {
            let m = model.lock().unwrap();
            let c: Vec<&String> = m.committed.keys().collect();
            if c.is_empty() || rng.u8(..4) == 0 {
                String::new()
            } else {
                c[rng.usize(..c.len())].clone()
            }
        };
        let choice = rng.u8(..100);
        let outcome: std::result::Result<(), tonic::Status> = match choice {
            // A layer: Prepare, then Apply a blob (parentless) or write files through the
            // mounts (on a parent), then Commit.
            0..=39 => {
                let parent = pick_committed(&mut rng);
                let key = format!("w{wid}-a{n}");
                let name = format!("w{wid}-l{n}");
                model.lock().unwrap().uncertain.insert(key.clone());
                let r = async {
                    let mounts = client.prepare(&key, &parent).await?;
                    {
                        let mut m = model.lock().unwrap();
                        m.uncertain.remove(&key);
                        m.active.insert(key.clone(), parent.clone());
                    }
                    counts.lock().unwrap().op("prepare", "ok");
                    if parent.is_empty() {
                        let gz = rng.bool();
                        let (blob, mt) = layer_blob(&mut rng, gz);
                        let desc = env.add_blob(mt, &blob).expect("storing a blob");
                        client.apply(&desc, &mounts).await?;
                        counts.lock().unwrap().op("apply", "ok");
                    } else {
                        let m = env
                            .mount(&mounts, "w")
                            .expect("mounting an active snapshot");
                        std::fs::write(m.path().join(format!("w{wid}-{n}")), n.to_le_bytes())
                            .expect("writing into a snapshot");
                        m.unmount().expect("unmounting");
                    }
                    model.lock().unwrap().uncertain.insert(name.clone());
                    model.lock().unwrap().uncertain.insert(key.clone());
                    client.commit(&name, &key).await?;
                    let mut m = model.lock().unwrap();
                    m.uncertain.remove(&name);
                    m.uncertain.remove(&key);
                    m.active.remove(&key);
                    m.committed.insert(name.clone(), parent.clone());
                    Ok(())
                }
                .await;
                if let Err(s) = &r
                    && !is_kill(s)
                {
                    // A refused Prepare creates nothing; a refused Apply or Commit leaves the
                    // active snapshot as it was (acknowledged in the model).
                    let mut m = model.lock().unwrap();
                    m.uncertain.remove(&key);
                    m.uncertain.remove(&name);
                }
                r
            }
            40..=54 => {
                let parent = pick_committed(&mut rng);
                if parent.is_empty() {
                    continue;
                }
                let key = format!("w{wid}-v{n}");
                model.lock().unwrap().uncertain.insert(key.clone());
                let r = client.view(&key, &parent).await.map(|_| ());
                let mut m = model.lock().unwrap();
                match &r {
                    Ok(()) => {
                        m.uncertain.remove(&key);
                        m.views.insert(key, parent);
                    }
                    Err(s) if !is_kill(s) => {
                        m.uncertain.remove(&key);
                    }
                    _ => {}
                }
                r
            }
            // Remove a leaf of this client's own (others' may be parents of anything).
            55..=74 => {
                let victim = {
                    let m = model.lock().unwrap();
                    let mine = format!("w{wid}-");
                    let leaves: Vec<String> = m
                        .views
                        .keys()
                        .chain(m.active.keys())
                        .chain(m.committed.keys())
                        .filter(|k| k.starts_with(&mine) && !m.children_of(k))
                        .cloned()
                        .collect();
                    if leaves.is_empty() {
                        continue;
                    }
                    leaves[rng.usize(..leaves.len())].clone()
                };
                model.lock().unwrap().uncertain.insert(victim.clone());
                let r = client.remove(&victim).await;
                let mut m = model.lock().unwrap();
                match &r {
                    Ok(()) => {
                        m.uncertain.remove(&victim);
                        m.views.remove(&victim);
                        m.active.remove(&victim);
                        m.committed.remove(&victim);
                        m.removed.insert(victim);
                    }
                    // Another client made it a parent meanwhile.
                    Err(s) if !is_kill(s) => {
                        m.uncertain.remove(&victim);
                    }
                    _ => {}
                }
                r
            }
            75..=84 => {
                let key = {
                    let m = model.lock().unwrap();
                    let k: Vec<&String> = m.active.keys().chain(m.views.keys()).collect();
                    if k.is_empty() {
                        continue;
                    }
                    k[rng.usize(..k.len())].clone()
                };
                client.mounts(&key).await.map(|_| ())
            }
            85..=92 => {
                let key = {
                    let m = model.lock().unwrap();
                    let k: Vec<&String> = m.active.keys().chain(m.committed.keys()).collect();
                    if k.is_empty() {
                        continue;
                    }
                    k[rng.usize(..k.len())].clone()
                };
                client.usage(&key).await.map(|_| ())
            }
            _ => client.list(&[]).await.map(|_| ()),
        };
        let what = match choice {
            0..=39 => "layer",
            40..=54 => "view",
            55..=74 => "remove",
            75..=84 => "mounts",
            85..=92 => "usage",
            _ => "list",
        };
        let mut c = counts.lock().unwrap();
        match outcome {
            Ok(()) => c.op(what, "ok"),
            Err(s) if is_kill(&s) => {
                // The daemon is gone: this client's round is over.
                c.op(what, "cut by the kill");
                break;
            }
            Err(s) if is_race(&s) => c.op(what, "raced"),
            Err(s) => {
                c.op(what, "error");
                c.violations.push(format!(
                    "{what} (client {wid}, op {n}): {:?}: {}",
                    s.code(),
                    s.message()
                ));
            }
        }
    }
}

/// The checker, after a restart. Also settles uncertain keys from what the daemon has.
async fn check(env: &Env, model: &Mutex<Model>, counts: &Mutex<Counts>) -> Result<()> {
    let c = env.c();
    let mut v: Vec<String> = Vec::new();
    let infos = c.list(&[]).await.context("List")?;
    let have: BTreeMap<String, (i32, String)> = infos
        .iter()
        .map(|i| (i.name.clone(), (i.kind, i.parent.clone())))
        .collect();
    {
        let mut m = model.lock().unwrap();
        // Settle what was in flight at the kill.
        let uncertain: Vec<String> = std::mem::take(&mut m.uncertain).into_iter().collect();
        for k in uncertain {
            m.committed.remove(&k);
            m.active.remove(&k);
            m.views.remove(&k);
            match have.get(&k) {
                Some((kind, parent)) => {
                    let map = match *kind {
                        3 => &mut m.committed,
                        2 => &mut m.active,
                        _ => &mut m.views,
                    };
                    map.insert(k, parent.clone());
                }
                None => {
                    m.removed.insert(k);
                }
            }
        }
        let expect = m
            .committed
            .iter()
            .map(|(k, p)| (k, 3, p))
            .chain(m.active.iter().map(|(k, p)| (k, 2, p)))
            .chain(m.views.iter().map(|(k, p)| (k, 1, p)));
        for (k, kind, parent) in expect {
            match have.get(k) {
                None => v.push(format!("lost: {k} (kind {kind}) was acknowledged")),
                Some((got, p)) if *got != kind || p != parent => v.push(format!(
                    "{k}: kind {got} parent {p:?}, acknowledged kind {kind} parent {parent:?}"
                )),
                _ => {}
            }
        }
        for k in &m.removed {
            if have.contains_key(k) {
                v.push(format!("{k} came back after its removal was acknowledged"));
            }
        }
        for k in have.keys() {
            let known =
                m.committed.contains_key(k) || m.active.contains_key(k) || m.views.contains_key(k);
            if !known {
                v.push(format!("{k} is in the store but no client created it"));
            }
        }
    }

    // Store and disk.
    let snaps = env.snapshots_dir();
    let mut ids = BTreeSet::new();
    for e in std::fs::read_dir(&snaps).context("reading ROOT/snapshots")? {
        let name = e?.file_name().to_string_lossy().into_owned();
        match name.parse::<u64>() {
            Ok(id) => {
                ids.insert(id);
            }
            Err(_) => v.push(format!("ROOT/snapshots/{name} left after start-up")),
        }
    }
    if ids.len() != have.len() {
        v.push(format!(
            "{} snapshot directories for {} records",
            ids.len(),
            have.len()
        ));
    }
    let tmp = env.root.join("tmp");
    if let Ok(d) = std::fs::read_dir(&tmp) {
        for e in d.flatten() {
            v.push(format!(
                "ROOT/tmp/{} left after start-up",
                e.file_name().to_string_lossy()
            ));
        }
    }
    // Mounts: each under ROOT belongs to a live snapshot.
    for mi in testsuite::mounts::self_mounts_under(&env.root)? {
        match env.id_of(&mi.mount_point) {
            Some(id) if ids.contains(&id) => {}
            _ => v.push(format!(
                "mount {} belongs to no snapshot",
                mi.mount_point.display()
            )),
        }
    }
    // Loop devices reading files of the root that are gone.
    for e in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let bf = e.path().join("loop/backing_file");
        if let Ok(f) = std::fs::read_to_string(&bf) {
            let f = f.trim();
            if Path::new(f).starts_with(&env.root) && !Path::new(f).exists() {
                v.push(format!(
                    "{} reads {f}, which is gone",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    // Layers: every committed one passes fsck, and a View over it (mounting the whole chain,
    // each layer checked against its recorded digest) works.
    let committed: Vec<String> = model.lock().unwrap().committed.keys().cloned().collect();
    for id in &ids {
        let layer = env.layer(*id);
        if layer.exists() {
            let out = std::process::Command::new(BIN)
                .arg("fsck")
                .arg(&layer)
                .output()
                .context("running fsck")?;
            if !out.status.success() {
                v.push(format!(
                    "fsck of {}: {} {}",
                    layer.display(),
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
    }
    for (i, name) in committed.iter().enumerate() {
        let key = format!("check-{}-{i}", counts.lock().unwrap().rounds);
        match c.view(&key, name).await {
            Ok(_) => {
                if let Err(e) = c.remove(&key).await {
                    v.push(format!("removing the check view of {name}: {e}"));
                }
            }
            Err(e) => v.push(format!(
                "a View of {name} fails: {:?}: {}",
                e.code(),
                e.message()
            )),
        }
    }
    counts.lock().unwrap().violations.extend(v);
    Ok(())
}

/// `tamper`, when given, changes the root while the daemon is down before the last check
/// (the checker's own test).
fn soak(rounds: u64, workers: usize, seed: u64, tamper: Option<fn(&Env)>) -> Counts {
    let cfg = Cfg::new().sn("enable_fsverity = true");
    let mut env = Env::new(BIN, cfg).expect("environment");
    let model = Mutex::new(Model::default());
    let counts = Mutex::new(Counts::default());
    let seq = std::sync::atomic::AtomicU64::new(0);
    let mut rng = fastrand::Rng::with_seed(seed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let r: Result<()> = rt.block_on(async {
        for round in 0..rounds {
            env.start().await.context("starting the daemon")?;
            counts.lock().unwrap().rounds = round;
            check(&env, &model, &counts).await?;
            let stop = std::sync::atomic::AtomicBool::new(false);
            let pid = env.daemon_pid().context("daemon pid")?;
            let kill_after = Duration::from_millis(rng.u64(300..2500));
            let seeds: Vec<u64> = (0..workers).map(|_| rng.u64(..)).collect();
            let envr = &env;
            KILLED.store(false, std::sync::atomic::Ordering::SeqCst);
            let killer = async {
                tokio::time::sleep(kill_after).await;
                KILLED.store(true, std::sync::atomic::Ordering::SeqCst);
                // Our own daemon's pid, nothing else.
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid as i32).expect("pid"),
                    rustix::process::Signal::KILL,
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            };
            let shared = Shared {
                env: envr,
                stop: &stop,
                model: &model,
                counts: &counts,
                seq: &seq,
            };
            let clients: Vec<_> = (0..workers)
                .map(|w| worker(&shared, envr.c().clone(), w, seeds[w]))
                .collect();
            let all = futures_join(clients);
            tokio::join!(killer, all);
            env.kill9();
            counts.lock().unwrap().kills += 1;
        }
        if let Some(t) = tamper {
            t(&env);
        }
        env.start().await?;
        counts.lock().unwrap().rounds = rounds;
        check(&env, &model, &counts).await?;
        if env.log_text().contains("panicked") {
            counts
                .lock()
                .unwrap()
                .violations
                .push("the daemon log shows a panic".into());
        }
        env.stop()?;
        Ok(())
    });
    if let Err(e) = r {
        panic!("soak (seed {seed}): {e:#}\n{}", env.log_tail(40));
    }
    counts.into_inner().unwrap()
}

/// All of `futs` at once on this task.
async fn futures_join<F: std::future::Future<Output = ()>>(futs: Vec<F>) {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        futs.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if futs.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// The bounded run of the suite (`SOAK_ROUNDS`, `SOAK_SEED`, `SOAK_WORKERS` for long ones).
#[test]
fn crash_and_load_soak() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the soak needs root (it mounts)"
    );
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let rounds = env_u64("SOAK_ROUNDS", 4);
    let workers = env_u64("SOAK_WORKERS", 3) as usize;
    eprintln!("soak: seed {seed}, {rounds} rounds, {workers} clients (SOAK_SEED={seed} replays)");
    let t = Instant::now();
    let c = soak(rounds, workers, seed, None);
    let total: u64 = c.ops.values().sum();
    eprintln!(
        "soak: {} rounds, {} kills, {total} operations in {:.1} s, {} violations",
        c.rounds,
        c.kills,
        t.elapsed().as_secs_f64(),
        c.violations.len()
    );
    for (k, n) in &c.ops {
        eprintln!("  {k}: {n}");
    }
    if !c.violations.is_empty() {
        for v in &c.violations {
            eprintln!("VIOLATION: {v}");
        }
        panic!("soak (seed {seed}): {} violations", c.violations.len());
    }
    let done = c
        .ops
        .iter()
        .filter(|(k, _)| k.ends_with(":ok"))
        .map(|(_, n)| n)
        .sum::<u64>();
    assert!(done > 20, "too little work to prove anything: {:?}", c.ops);
    if let Err(e) = bail_if_empty(&c) {
        panic!("{e:#}");
    }
}

fn bail_if_empty(c: &Counts) -> Result<()> {
    if !c.ops.keys().any(|k| k.starts_with("layer:ok")) {
        bail!("no layer was ever committed: {:?}", c.ops);
    }
    Ok(())
}

/// The checker can fail: one flipped byte in a committed layer (found by fsck or by the
/// digest check of the View over it) and one snapshot directory removed behind the daemon's
/// back are reported as violations.
#[test]
fn the_checker_sees_damage() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the soak needs root (it mounts)"
    );
    fn tamper(env: &Env) {
        let mut layers: Vec<_> = std::fs::read_dir(env.snapshots_dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("layer.erofs").exists())
            .collect();
        layers.sort();
        assert!(
            layers.len() >= 2,
            "the round committed too few layers: {layers:?}"
        );
        // Layers may be immutable or mounted: detach and clear as the tests' cleanup does.
        testsuite::mounts::unmount_all_under(&env.root).unwrap();
        testsuite::daemon_env::clear_immutable_under(&env.root);
        let l = layers[0].join("layer.erofs");
        let f = std::fs::OpenOptions::new().write(true).open(&l).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"\xff\xfe", 1100).unwrap();
        std::fs::remove_dir_all(&layers[1]).unwrap();
    }
    let seed = 42;
    let c = soak(1, 2, seed, Some(tamper));
    for v in &c.violations {
        eprintln!("found: {v}");
    }
    assert!(
        c.violations.iter().any(|v| v.contains("directories for")),
        "the removed directory went unnoticed: {:?}",
        c.violations
    );
    assert!(
        c.violations
            .iter()
            .any(|v| v.contains("fsck of") || v.contains("a View of")),
        "the flipped layer went unnoticed: {:?}",
        c.violations
    );
}
