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
            let _ = tx.send(content.open(&opener, "default").expect("open"));
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
