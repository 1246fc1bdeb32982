//! A container that swaps files and directories of its upper directory for symlinks to host
//! paths while the daemon reads that directory (the CVE-2018-15664 class): Compare, Commit's
//! conversion and Usage must never read through the swapped names. In process, unprivileged
//! (the recording mounter: a parentless active snapshot's mount is a bind of its upper
//! directory, which is all these three read).
//!
//! The attacker exchanges each victim with a symlink to a host path with `renameat2(
//! RENAME_EXCHANGE)`, as fast as it can, so every moment of the walk (list, stat, open, read)
//! meets both states. What the daemon produces may hold the victim as a file, as a symlink
//! entry or not at all, or the request may fail with FailedPrecondition ("changed under
//! us"): what it must never hold is a byte of the host files, and Usage must never count
//! them.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use snapshotter::{Cancel, ErrorKind, Snapshotter};

/// What the host files hold; never to be found in a diff or a layer.
const SECRET: &[u8] = b"HOST-SECRET-7f3a9c1e-never-in-a-layer";
/// Size of the host file (so that counting it in Usage would show).
const SECRET_SIZE: usize = 8 << 20;

/// A host-mode core with no free-space reserve (the temporary directory may be small).
fn core(dir: &Path) -> Arc<Snapshotter> {
    common::core(dir, "[daemon]\nmin_free_space = \"0\"").0
}

/// The host side: `secret` (a big file of the marker) and `sdir/inner`, outside the root.
fn host_files(dir: &Path) -> (PathBuf, PathBuf) {
    let host = dir.join("host");
    std::fs::create_dir_all(host.join("sdir")).unwrap();
    let secret: Vec<u8> = SECRET.iter().copied().cycle().take(SECRET_SIZE).collect();
    std::fs::write(host.join("secret"), &secret).unwrap();
    std::fs::write(host.join("sdir/inner"), SECRET).unwrap();
    (host.join("secret"), host.join("sdir"))
}

/// The container's tree: `f`, `d/inner`, `d/sub/deep`, and beside each victim a symlink
/// to its host counterpart (`f.x`, `d.x`, `d/inner.x`) to exchange it with.
fn container_files(upper: &Path, secret: &Path, sdir: &Path) {
    std::fs::write(upper.join("f"), b"container file").unwrap();
    std::fs::create_dir_all(upper.join("d/sub")).unwrap();
    std::fs::write(upper.join("d/inner"), b"container inner").unwrap();
    std::fs::write(upper.join("d/sub/deep"), b"container deep").unwrap();
    std::os::unix::fs::symlink(secret, upper.join("f.x")).unwrap();
    std::os::unix::fs::symlink(sdir, upper.join("d.x")).unwrap();
    std::os::unix::fs::symlink(secret, upper.join("d/inner.x")).unwrap();
}

/// Exchange each victim with its symlink until `stop`; returns the number of exchanges.
fn attacker(upper: PathBuf, stop: Arc<AtomicBool>, swaps: Arc<AtomicU64>) {
    let pairs = [("f", "f.x"), ("d", "d.x"), ("d/inner", "d/inner.x")];
    while !stop.load(Ordering::Relaxed) {
        for (a, b) in pairs {
            // Fails harmlessly while `d` is the symlink (`d/inner` is then a host path the
            // attacker does not touch: it must not write the host either).
            if !upper.join(a).parent().unwrap().is_symlink() {
                let _ = rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    upper.join(a),
                    rustix::fs::CWD,
                    upper.join(b),
                    rustix::fs::RenameFlags::EXCHANGE,
                );
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir` (the snapshotter root), read whole: none may hold the marker.
fn assert_no_secret_under(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap().flatten() {
            let md = e.path().symlink_metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                let data = std::fs::read(e.path()).unwrap();
                assert!(
                    !contains(&data, SECRET),
                    "{} holds bytes of a host file",
                    e.path().display()
                );
            }
        }
    }
}

/// The attacker against `f` for `dur`, with `victim` called in a loop meanwhile.
fn race(upper: &Path, dur: Duration, mut victim: impl FnMut()) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let t = {
        let (u, s, n) = (upper.to_path_buf(), stop.clone(), swaps.clone());
        std::thread::spawn(move || attacker(u, s, n))
    };
    let end = Instant::now() + dur;
    while Instant::now() < end {
        victim();
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    swaps.load(Ordering::Relaxed)
}

/// Compare of the racing upper: each diff is read back whole (uncompressed tar) and must not
/// hold a host byte; a refusal must say the tree changed.
#[test]
fn compare_of_a_racing_upper_never_reads_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, sdir) = host_files(dir.path());
    let sn = core(dir.path());
    let m = sn.prepare("racer", "", BTreeMap::new()).unwrap();
    let upper = common::upper(&m);
    container_files(&upper, &secret, &sdir);
    let (mut ok, mut refused) = (0, 0);
    let swaps = race(&upper, Duration::from_secs(3), || {
        match sn.compare(
            &[],
            &m,
            "application/vnd.oci.image.layer.v1.tar",
            None,
            &Cancel::never(),
        ) {
            Ok(blob) => {
                let tar = std::fs::read(&blob.path).unwrap();
                assert!(!contains(&tar, SECRET), "a diff holds bytes of a host file");
                ok += 1;
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
                refused += 1;
            }
        }
    });
    eprintln!("Compare: {ok} diffs, {refused} refused, {swaps} exchanges");
    assert!(ok + refused > 10 && swaps > 1000, "the race did not run");
    assert_no_secret_under(&dir.path().join("root"));
}

/// Usage of the racing upper never counts the 8 MiB host file.
#[test]
fn usage_of_a_racing_upper_never_counts_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, sdir) = host_files(dir.path());
    let sn = core(dir.path());
    let m = sn.prepare("racer", "", BTreeMap::new()).unwrap();
    let upper = common::upper(&m);
    container_files(&upper, &secret, &sdir);
    let mut calls = 0;
    let swaps = race(&upper, Duration::from_secs(2), || {
        let u = sn.usage("racer").unwrap();
        assert!(
            u.size < (SECRET_SIZE as u64) / 2,
            "Usage counted a host file: {u:?}"
        );
        calls += 1;
    });
    eprintln!("Usage: {calls} calls, {swaps} exchanges");
    assert!(calls > 10 && swaps > 1000, "the race did not run");
}

/// Commit's conversion of a racing upper: the layers it makes hold no host byte; a refused
/// Commit leaves the snapshot active.
#[test]
fn commit_of_a_racing_upper_never_reads_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, sdir) = host_files(dir.path());
    let sn = core(dir.path());
    let (mut ok, mut refused, mut swaps) = (0, 0, 0);
    let end = Instant::now() + Duration::from_secs(4);
    let mut round = 0;
    while Instant::now() < end || ok + refused < 10 {
        let key = format!("racer-{round}");
        let m = sn.prepare(&key, "", BTreeMap::new()).unwrap();
        let upper = common::upper(&m);
        container_files(&upper, &secret, &sdir);
        let mut done = false;
        swaps += race(&upper, Duration::from_millis(100), || {
            if done {
                return;
            }
            match sn.commit(
                &format!("layer-{round}"),
                &key,
                BTreeMap::new(),
                "",
                &Cancel::never(),
            ) {
                Ok(()) => {
                    ok += 1;
                    done = true;
                }
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
                    sn.stat(&key).expect("a refused Commit leaves the snapshot");
                    refused += 1;
                }
            }
        });
        if !done {
            sn.remove(&key).unwrap();
        }
        round += 1;
    }
    eprintln!("Commit: {ok} layers, {refused} refused, {swaps} exchanges");
    assert!(ok > 0, "no Commit ever succeeded: the test proves nothing");
    assert_no_secret_under(&dir.path().join("root"));
}
