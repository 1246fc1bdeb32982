//! Manager mode hands containerd the paths of layer files to mount itself: each layer is
//! checked against its recorded fs-verity digest before its path goes out (as host mode checks
//! before it mounts), and re-checked only when the file changed. In process, unprivileged.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use snapshotter::ErrorKind;

/// The layer files named by `mounts` (erofs sources and `device=` options).
fn layer_paths(mounts: &[snapshotter::Mount]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for m in mounts {
        if m.source.ends_with("layer.erofs") {
            out.push(PathBuf::from(&m.source));
        }
        for o in &m.options {
            if let Some(d) = o.strip_prefix("device=") {
                out.push(PathBuf::from(d));
            }
        }
    }
    out
}

#[test]
fn layers_are_checked_before_their_paths_go_out() {
    let dir = tempfile::tempdir().unwrap();
    let (sn, _rec) = common::core(
        dir.path(),
        "mount_mode = \"manager\"\n[snapshotter]\nenable_fsverity = true\n[daemon]\nmin_free_space = \"0\"",
    );
    common::layer(&sn, "layer", 16 << 20);

    let v = sn.view("v", "layer", BTreeMap::new()).unwrap();
    let layers = layer_paths(&v);
    assert_eq!(layers.len(), 1, "{v:?}");
    let layer = &layers[0];

    // Unchanged since its check: not hashed again (16 MiB would show in rchar).
    let before = common::read_bytes();
    sn.mounts("v").unwrap();
    sn.view("v2", "layer", BTreeMap::new()).unwrap();
    let read = common::read_bytes() - before;
    assert!(
        read < 4 << 20,
        "an unchanged layer was re-hashed ({read} bytes read)"
    );

    // One flipped byte: refused, naming the layer, by Mounts and by a new View.
    let f = std::fs::OpenOptions::new().write(true).open(layer).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"\x5a", 8 << 20).unwrap();
    drop(f);
    for e in [
        sn.mounts("v").unwrap_err(),
        sn.view("v3", "layer", BTreeMap::new()).unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
        assert!(e.to_string().contains("\"layer\""), "{e}");
        assert!(e.to_string().contains("fs-verity digest"), "{e}");
    }
}
