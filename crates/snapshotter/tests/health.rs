//! Daemon health in process (no root: the recording mounter): what one heavy request may hold
//! up of the others.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use common::{core, layer, read_bytes, upper};
use snapshotter::integrity::VerityMode;
use snapshotter::mount::MountEvent;
use snapshotter::{Cancel, ErrorKind, Snapshotter};

/// In userspace fs-verity mode a layer is re-hashed whole before it is mounted. That used to
/// happen under the global mount lock, so a View of a small layer waited for the hashing of
/// any large one. Here a View of a small layer is made while a View of a 512 MiB layer is
/// hashing it, and must be done before that hashing has read most of the layer. Told by bytes
/// read (`rchar`), not by time: the small View waiting for the lock would return only once the
/// whole large layer had been read.
#[test]
fn hashing_a_large_layer_does_not_hold_up_other_mounts() {
    const BIG: u64 = 512 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (sn, rec) = core(dir.path(), "[snapshotter]\nenable_fsverity = true");
    assert_eq!(
        sn.verity_mode(),
        VerityMode::Userspace,
        "this test needs a root without kernel fs-verity (userspace digests); {} has it",
        dir.path().display()
    );
    layer(&sn, "big", BIG as usize);
    layer(&sn, "small", 4096);

    let base = read_bytes();
    let big = {
        let sn = sn.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            sn.view("big-view", "big", BTreeMap::new())
                .expect("view of big");
            t.elapsed()
        })
    };
    // The big View is hashing once it has read 32 MiB (nothing else reads in this process).
    let t = Instant::now();
    while read_bytes() - base < 32 << 20 {
        assert!(
            !big.is_finished(),
            "the big View ended before it had read 32 MiB"
        );
        assert!(
            t.elapsed().as_secs() < 60,
            "the big View does not read its layer"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let t = Instant::now();
    let m = sn
        .view("small-view", "small", BTreeMap::new())
        .expect("view of small");
    let small_took = t.elapsed();
    let read_meanwhile = read_bytes() - base;
    let big_took = big.join().unwrap();
    eprintln!(
        "small View: {small_took:?}, done after {} MiB of the big layer were read; big View: {big_took:?}",
        read_meanwhile >> 20
    );
    assert!(
        read_meanwhile < BIG - (64 << 20),
        "the small View returned only after {} MiB of the {} MiB layer had been hashed: it waited for the big one",
        read_meanwhile >> 20,
        BIG >> 20
    );
    // Both layers are mounted, once each.
    assert_eq!(m.len(), 1);
    let erofs: Vec<_> = rec
        .events()
        .into_iter()
        .filter(|e| matches!(e, MountEvent::Erofs { .. }))
        .collect();
    assert_eq!(erofs.len(), 2, "{erofs:#?}");
}

/// Verifying a layer outside the mount lock must not let a mount land on a snapshot being
/// removed: Mounts of an active snapshot whose (applied) layer is being verified races Remove
/// of that snapshot, round after round; no recorded mount may outlive its directory.
#[test]
fn a_layer_verified_while_its_snapshot_is_removed_is_not_left_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let (sn, rec) = core(dir.path(), "[snapshotter]\nenable_fsverity = true");
    let content = dir.path().join("content");
    std::fs::create_dir_all(content.join("blobs/sha256")).unwrap();
    let mut tar = testsuite::oci::LayerBuilder::new();
    tar.file("data", 0o644, &vec![7u8; 2 << 20]);
    let tar = tar.finish().unwrap();
    let digest = testsuite::oci::sha256_digest(&tar);
    std::fs::write(
        content
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
        &tar,
    )
    .unwrap();
    let desc = snapshotter::diff::Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest,
        size: tar.len() as i64,
        annotations: Default::default(),
    };
    let store = snapshotter::diff::DirContent::new(&content);
    let mut removed_first = 0;
    for round in 0..400u32 {
        let key = format!("race-{round}");
        let m = sn.prepare(&key, "", BTreeMap::new()).unwrap();
        sn.apply(&desc, &m, &store, "default", &Cancel::never())
            .unwrap();
        let mounter = {
            let (sn, key) = (sn.clone(), key.clone());
            std::thread::spawn(move || sn.mounts(&key).is_ok())
        };
        // Remove at varying moments of the mount's verification.
        std::thread::sleep(std::time::Duration::from_micros(
            u64::from(round % 20) * 100,
        ));
        sn.remove(&key).unwrap();
        if !mounter.join().unwrap() {
            removed_first += 1;
        }
        let stale: Vec<PathBuf> = rec.mounted().into_keys().filter(|t| !t.is_dir()).collect();
        assert!(
            stale.is_empty(),
            "round {round}: mounts left on removed directories: {stale:?}"
        );
    }
    eprintln!("{removed_first} of 400 Mounts lost the race to Remove");
}

/// A plain tar blob holding one file of `size` bytes (`seed` varies it), stored in the
/// content directory `content`; returns its descriptor.
fn tar_blob(content: &Path, size: usize, seed: u8) -> snapshotter::diff::Descriptor {
    let mut tar = testsuite::oci::LayerBuilder::new();
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed)
        .collect();
    tar.file("data", 0o644, &data);
    let tar = tar.finish().unwrap();
    let digest = testsuite::oci::sha256_digest(&tar);
    let dir = content.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(digest.trim_start_matches("sha256:")), &tar).unwrap();
    snapshotter::diff::Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest,
        size: tar.len() as i64,
        annotations: Default::default(),
    }
}

/// The layers being written right now (`layer.erofs.tmp` files under the snapshots).
fn layers_in_progress(sn: &Snapshotter) -> usize {
    std::fs::read_dir(sn.layout().snapshots())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().join("layer.erofs.tmp").exists())
                .count()
        })
        .unwrap_or(0)
}

/// `daemon.max_concurrent_heavy = 2`: of 6 concurrent Applies at most 2 write a layer at
/// once (seen from outside, by their temporary files, and by the core's own count), the
/// others wait for a slot, and all succeed.
#[test]
fn at_most_max_concurrent_heavy_applies_run_at_once() {
    const N: usize = 2;
    const APPLIES: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let (sn, _rec) = core(dir.path(), &format!("[daemon]\nmax_concurrent_heavy = {N}"));
    let content = dir.path().join("content");
    let store = Arc::new(snapshotter::diff::DirContent::new(&content));
    let mut jobs = Vec::new();
    for i in 0..APPLIES {
        let desc = tar_blob(&content, 48 << 20, i as u8);
        let m = sn
            .prepare(&format!("cap-{i}"), "", BTreeMap::new())
            .unwrap();
        jobs.push((desc, m));
    }
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|(desc, m)| {
            let (sn, store, done) = (sn.clone(), store.clone(), done.clone());
            std::thread::spawn(move || {
                let r = sn.apply(&desc, &m, &*store, "default", &Cancel::never());
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                r
            })
        })
        .collect();
    let mut most = 0;
    while done.load(std::sync::atomic::Ordering::SeqCst) < APPLIES {
        most = most.max(layers_in_progress(&sn));
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    for h in handles {
        h.join().unwrap().expect("apply");
    }
    let st = sn.heavy_stats();
    eprintln!("most layers in progress at once: {most}; core: {st:?}");
    assert!(
        most <= N,
        "{most} layers were written at once with a cap of {N}"
    );
    assert_eq!(st.peak, N, "{st:?}");
    assert!(st.waited >= (APPLIES - N) as u64 / 2, "{st:?}");
    assert_eq!(st.running, 0);
    assert_eq!(layers_in_progress(&sn), 0);
}

/// Fill the upper directory of a new active snapshot `key` with `files` files of `size`
/// bytes of hard-to-compress data.
fn fill(sn: &Snapshotter, key: &str, files: usize, size: usize) {
    let m = sn.prepare(key, "", BTreeMap::new()).expect("prepare");
    let up = upper(&m);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..files {
        let data: Vec<u8> = (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(up.join(format!("f{i:05}")), data).unwrap();
    }
}

/// Trip `c` after `ms` milliseconds, from another thread.
fn trip_after(c: &Cancel, ms: u64) {
    let c = c.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        c.cancel();
    });
}

/// A converting Commit that is cancelled, or whose deadline passes, stops within a second,
/// leaves the active snapshot as it was (no temporary or pending layer) and gives its slot
/// back; the same Commit then succeeds.
#[test]
fn a_cancelled_commit_leaves_the_snapshot_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (sn, _rec) = core(dir.path(), "");
    fill(&sn, "c-active", 400, 256 << 10);
    let snapdir = |sn: &Snapshotter| {
        let id: Vec<_> = std::fs::read_dir(sn.layout().snapshots())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("fs").is_dir())
            .collect();
        assert_eq!(id.len(), 1, "{id:?}");
        id[0].clone()
    };
    let d = snapdir(&sn);
    for label in ["cancelled", "past its deadline"] {
        let cancel = if label == "cancelled" {
            let c = Cancel::never();
            trip_after(&c, 30);
            c
        } else {
            Cancel::until(Instant::now() + std::time::Duration::from_millis(30))
        };
        let t = Instant::now();
        let e = sn
            .commit("c", "c-active", BTreeMap::new(), "", &cancel)
            .unwrap_err();
        let took = t.elapsed();
        eprintln!("Commit {label}: {:?} after {took:?}: {e}", e.kind());
        let want = if label == "cancelled" {
            ErrorKind::Cancelled
        } else {
            ErrorKind::DeadlineExceeded
        };
        assert_eq!(e.kind(), want, "{e}");
        assert!(took < std::time::Duration::from_secs(1), "{took:?}");
        for f in ["layer.erofs", "layer.erofs.tmp", "layer.erofs.pending"] {
            assert!(!d.join(f).exists(), "{label}: {f} left");
        }
        assert_eq!(sn.stat("c-active").unwrap().kind, snapshotter::Kind::Active);
        assert_eq!(sn.heavy_stats().running, 0);
    }
    sn.commit("c", "c-active", BTreeMap::new(), "", &Cancel::never())
        .expect("the same Commit, not cancelled");
    assert!(d.join("layer.erofs").exists());
}

/// A cancelled Compare stops within a second and removes its diff from ROOT/tmp.
#[test]
fn a_cancelled_compare_leaves_no_diff() {
    let dir = tempfile::tempdir().unwrap();
    let (sn, _rec) = core(dir.path(), "");
    fill(&sn, "d-active", 400, 256 << 10);
    sn.commit("d", "d-active", BTreeMap::new(), "", &Cancel::never())
        .unwrap();
    let view = sn.view("d-view", "d", BTreeMap::new()).unwrap();
    let tmp = dir.path().join("root/tmp");
    let c = Cancel::never();
    trip_after(&c, 100);
    let t = Instant::now();
    let e = sn.compare(&[], &view, "", None, &c).unwrap_err();
    let took = t.elapsed();
    eprintln!("Compare: {:?} after {took:?}: {e}", e.kind());
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    assert!(took < std::time::Duration::from_millis(1100), "{took:?}");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in ROOT/tmp: {left:?}");
    let blob = sn
        .compare(&[], &view, "", None, &Cancel::never())
        .expect("the same Compare");
    assert!(blob.size > 100 << 20, "{}", blob.size);
}
