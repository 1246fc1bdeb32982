//! Blobs are containerd-namespaced: the content store directory holds every namespace's
//! blobs, and the differ must not hand one namespace a blob only another has (given nothing
//! but its digest). Over the socket, against a stand-in for containerd's Content service that
//! scopes blobs by namespace as containerd's metadata store does.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{Blobs, channel, daemon_with_content, runtime, serve_content};

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// A tar holding one small file.
fn tar() -> Vec<u8> {
    use erofs_image::tar::{Entry, EntryKind, TarWriter};
    let mut w = TarWriter::new(Vec::new());
    let mut e = Entry::new(b"secret-of-a".to_vec(), EntryKind::Regular);
    e.mode = 0o644;
    w.append_bytes(&e, b"only namespace a pulled this").unwrap();
    w.finish().unwrap()
}

/// Write `data` where containerd's content store keeps the blob `digest`.
fn store_in_dir(content: &Path, digest: &str, data: &[u8]) {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let dir = content.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(hex), data).unwrap();
}

/// A daemon whose content directory and Content stand-in hold one blob, in namespace `a`
/// only; `differ` lines for its `[differ]` table.
struct World {
    daemon: common::Daemon,
    desc: snapshotter::diff::Descriptor,
    client: common::Runtime,
    ch: tonic::transport::Channel,
    _ctd: common::Runtime,
    _dir: tempfile::TempDir,
}

impl World {
    fn new(differ: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        let ctd_sock = dir.path().join("containerd.sock");
        let content = dir.path().join("content");
        let blobs = Blobs::default();
        let data = tar();
        let desc = blobs.add("a", TAR, &data);
        store_in_dir(&content, &desc.digest, &data);
        let ctd = serve_content(&ctd_sock, blobs);
        let daemon = daemon_with_content(dir.path(), &ctd_sock, &content, "", differ);
        let client = runtime(1);
        let ch = client.block_on(channel(&daemon.socket));
        World {
            daemon,
            desc,
            client,
            ch,
            _ctd: ctd,
            _dir: dir,
        }
    }
}

/// A blob in the directory and in namespace `a` only: an Apply in namespace `b` is NotFound
/// (naming the namespace) and writes no layer; the same Apply in `a` succeeds.
#[test]
fn a_blob_of_another_namespace_is_not_found() {
    let w = World::new("");
    let (d, desc, client, ch) = (&w.daemon, &w.desc, &w.client, w.ch.clone());

    let m = d.core.prepare("in-b", "", BTreeMap::new()).unwrap();
    let e = client
        .block_on(common::apply(ch.clone(), Some("b"), desc, &m, None))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains("not found in b"), "{e:?}");
    // The mount is a bind of ROOT/snapshots/ID/fs.
    let layer = Path::new(&m[0].source)
        .parent()
        .unwrap()
        .join("layer.erofs");
    assert!(layer.parent().unwrap().starts_with(&d.root), "{m:?}");
    assert!(
        !layer.exists(),
        "a layer was written from another namespace's blob"
    );

    let m = d.core.prepare("in-a", "", BTreeMap::new()).unwrap();
    client
        .block_on(common::apply(ch.clone(), Some("a"), desc, &m, None))
        .expect("Apply in the blob's own namespace");
}

/// With `verify_content_namespace = false` the directory is trusted for every namespace (the
/// single-tenant setting): the same Apply in `b` succeeds, so the refusal above is the check's.
#[test]
fn without_the_check_the_directory_serves_every_namespace() {
    let w = World::new("verify_content_namespace = false");
    let (d, desc, client, ch) = (&w.daemon, &w.desc, &w.client, w.ch.clone());
    let m = d.core.prepare("in-b", "", BTreeMap::new()).unwrap();
    client
        .block_on(common::apply(ch, Some("b"), desc, &m, None))
        .expect("the directory, unchecked");
}
