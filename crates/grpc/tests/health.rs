//! Daemon health over the socket: slow or stalled work on one request does not hold up the
//! others.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{Blobs, channel, daemon, list, noise, runtime, serve_content, stat};
use erofs_grpc::content::GrpcContent;
use snapshotter::diff::ContentSource;

/// Two Applies whose blobs come over containerd's Content service and whose readers stall
/// (nothing drains them) leave the daemon's runtime free: Stat and List still answer at once.
/// The stream tasks used to push into a synchronous channel with a blocking send, which held
/// a runtime worker per stalled reader; with two workers every RPC froze.
#[test]
fn stalled_content_readers_do_not_stall_other_requests() {
    let dir = tempfile::tempdir().unwrap();
    let ctd_sock = dir.path().join("containerd.sock");
    let blobs = Blobs::default();
    // 64 messages each: far more than the reader's channel holds.
    let data = noise(64 * common::CHUNK, 7);
    let desc = blobs.add("default", "application/vnd.oci.image.layer.v1.tar", &data);
    let _ctd = serve_content(&ctd_sock, blobs);
    let d = daemon(dir.path(), &ctd_sock, "");

    // Opened as Apply opens them (from a blocking thread), and then not read.
    let content = GrpcContent::new(ctd_sock.clone(), d.rt.handle().clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let opener = desc.clone();
    std::thread::spawn(move || {
        for _ in 0..2 {
            let _ = tx.send(
                content
                    .open(&opener, "default", &snapshotter::Cancel::never())
                    .expect("open"),
            );
        }
    });
    let mut stalled: Vec<_> = (0..2)
        .map(|i| {
            rx.recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("opening blob {i} did not finish within 5 s"))
        })
        .collect();
    // Time for both stream tasks to fill their channels and wait on them.
    std::thread::sleep(Duration::from_millis(500));

    let client = runtime(1);
    client.block_on(async {
        let ch = tokio::time::timeout(Duration::from_secs(2), channel(&d.socket))
            .await
            .expect("the daemon did not accept a connection within 2 s");
        for round in 0..3 {
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(2), stat(ch.clone(), "missing"))
                .await
                .unwrap_or_else(|_| panic!("Stat {round} did not answer within 2 s"));
            assert_eq!(r.unwrap_err().code(), tonic::Code::NotFound);
            let n = tokio::time::timeout(Duration::from_secs(2), list(ch.clone()))
                .await
                .unwrap_or_else(|_| panic!("List {round} did not answer within 2 s"))
                .unwrap();
            assert_eq!(n, 0);
            eprintln!("round {round}: Stat + List in {:?}", t.elapsed());
        }
    });

    // The stalled readers were only waiting: they read their whole, verified blob.
    for b in &mut stalled {
        let mut got = Vec::new();
        b.reader.read_to_end(&mut got).expect("reading the blob");
        assert!(got == data, "the blob read back differs");
    }
}

/// A plain tar holding one file of `size` bytes (varied by `seed`).
fn tar(size: usize, seed: u8) -> Vec<u8> {
    use erofs_image::tar::{Entry, EntryKind, TarWriter};
    let mut w = TarWriter::new(Vec::new());
    let mut e = Entry::new(b"data".to_vec(), EntryKind::Regular);
    e.mode = 0o644;
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect();
    w.append_bytes(&e, &data).unwrap();
    w.finish().unwrap()
}

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// Files left under `dir` (recursively).
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Waits (at most `bound`) until the work of a stopped Apply into snapshot directory `snap`
/// has ended and left nothing: no heavy request running, no temporary layer, no layer, and
/// nothing under ROOT/tmp. Returns how long that took.
fn wait_stopped(d: &common::Daemon, snap: &std::path::Path, bound: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let leftovers: Vec<_> = ["layer.erofs.tmp", "layer.erofs"]
            .iter()
            .map(|n| snap.join(n))
            .filter(|p| p.exists())
            .chain(files_under(&d.root.join("tmp")))
            .collect();
        let running = d.core.heavy_stats().running;
        if running == 0 && leftovers.is_empty() {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < bound,
            "{:?} after the request ended: {running} heavy requests still running, left: {leftovers:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The snapshot directory an active snapshot's mounts write to.
fn snap_dir(mounts: &[snapshotter::Mount]) -> std::path::PathBuf {
    std::path::Path::new(&mounts[0].source)
        .parent()
        .unwrap()
        .to_path_buf()
}

/// An Apply whose caller gives up (drops the call) or whose deadline passes stops within a
/// second and leaves nothing: no temporary file, no layer, no slot taken, the snapshot still
/// active; the same Apply then succeeds. Also a server-side maximum (`daemon.heavy_timeout`)
/// stops an Apply whose caller set no deadline, with DEADLINE_EXCEEDED.
#[test]
fn cancelled_and_late_applies_stop_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ctd_sock = dir.path().join("containerd.sock");
    let blobs = Blobs::default();
    // 8 MiB at one 64 KiB message per 50 ms: about 6 s to stream.
    let data = tar(8 << 20, 1);
    let desc = blobs.add("default", TAR, &data);
    blobs.pace(50);
    let _ctd = serve_content(&ctd_sock, blobs.clone());
    let d = daemon(
        dir.path(),
        &ctd_sock,
        "[daemon]\nheavy_timeout = \"1500ms\"",
    );
    let m = d
        .core
        .prepare("victim", "", Default::default())
        .expect("prepare");
    let snap = snap_dir(&m);
    let client = runtime(1);
    let ch = client.block_on(channel(&d.socket));

    // 1. The caller drops the call.
    let dropped = client.block_on(async {
        tokio::time::timeout(
            Duration::from_millis(700),
            common::apply(ch.clone(), None, &desc, &m, None),
        )
        .await
    });
    assert!(
        dropped.is_err(),
        "the Apply finished before it was dropped: {dropped:?}"
    );
    let took = wait_stopped(&d, &snap, Duration::from_secs(1));
    eprintln!("dropped Apply: its work stopped {took:?} after the call was dropped");

    // 2. The caller's deadline passes (tonic drops the call at the grpc-timeout).
    let t = Instant::now();
    let r = client.block_on(common::apply(
        ch.clone(),
        None,
        &desc,
        &m,
        Some(Duration::from_millis(600)),
    ));
    let code = r.unwrap_err().code();
    assert!(
        matches!(code, tonic::Code::Cancelled | tonic::Code::DeadlineExceeded),
        "{code:?}"
    );
    let took = wait_stopped(&d, &snap, Duration::from_secs(1));
    eprintln!(
        "Apply with a 600 ms deadline: answered {code:?} after {:?}, work stopped {took:?} later",
        t.elapsed() - took
    );

    // 3. No deadline from the caller: the server's maximum (1.5 s here) applies.
    let t = Instant::now();
    let s = client
        .block_on(common::apply(ch.clone(), None, &desc, &m, None))
        .unwrap_err();
    let answered = t.elapsed();
    assert_eq!(s.code(), tonic::Code::DeadlineExceeded, "{s:?}");
    assert!(
        answered < Duration::from_millis(1500) + Duration::from_secs(1),
        "{answered:?}"
    );
    let took = wait_stopped(&d, &snap, Duration::from_secs(1));
    eprintln!(
        "Apply past heavy_timeout: DEADLINE_EXCEEDED after {answered:?} ({}); work stopped {took:?} later",
        s.message()
    );

    // Nothing half-recorded: the snapshot is still active, and the same Apply succeeds.
    let info = d.core.stat("victim").unwrap();
    assert_eq!(info.kind, snapshotter::Kind::Active);
    blobs.pace(0);
    client
        .block_on(common::apply(ch.clone(), None, &desc, &m, None))
        .expect("the same Apply, unhurried");
    assert!(snap.join("layer.erofs").exists());
    d.core
        .commit(
            "victim-layer",
            "victim",
            Default::default(),
            "",
            &snapshotter::Cancel::never(),
        )
        .expect("commit");
}
