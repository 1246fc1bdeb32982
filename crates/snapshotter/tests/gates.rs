//! The core's safety gates, in process with a recording mounter (no root): every read of a
//! layer image goes through the integrity check, and start-up sweeps what crashes leave.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshotter::error::ErrorKind;
use snapshotter::mount::RecordingMounter;
use snapshotter::{Config, Snapshotter};

struct Root {
    dir: tempfile::TempDir,
    cfg: Config,
}

impl Root {
    fn new(extra: &str) -> Root {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "root_path = {:?}\naddress = {:?}\n{extra}",
            dir.path().join("root").display().to_string(),
            dir.path().join("unused.sock").display().to_string(),
        );
        let cfg = Config::parse(&toml).unwrap();
        Root { dir, cfg }
    }

    fn open(&self) -> Snapshotter {
        self.open_with(Arc::new(RecordingMounter::new()))
    }

    fn open_with(&self, mounter: Arc<RecordingMounter>) -> Snapshotter {
        Snapshotter::open(self.cfg.clone(), mounter).unwrap()
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
}

/// Commit a layer holding `files` as `name` (on `parent`); returns its directory.
fn layer(s: &Snapshotter, name: &str, parent: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let key = format!("{name}-active");
    let mounts = s.prepare(&key, parent, BTreeMap::new()).unwrap();
    // Host mode: a bind of the upper dir (no parent) or an overlay naming it.
    let upper = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(&mounts[0].source));
    for (p, data) in files {
        let f = upper.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, data).unwrap();
    }
    s.commit(
        name,
        &key,
        BTreeMap::new(),
        "",
        &snapshotter::Cancel::never(),
    )
    .unwrap();
    upper.parent().unwrap().to_path_buf()
}

/// Compare reads committed layers through the same check as a mount: a layer swapped for
/// another valid image after its commit is refused, naming it, instead of being diffed.
#[test]
fn compare_refuses_a_replaced_layer() {
    let root = Root::new("[snapshotter]\nenable_fsverity = true\n");
    let s = root.open();
    let l1 = layer(&s, "l1", "", &[("etc/one", b"one\n")]);
    let l2 = layer(&s, "l2", "", &[("etc/two", b"something else\n")]);
    let view = s.view("v1", "l1", BTreeMap::new()).unwrap();
    let blob = s
        .compare(&[], &view, "", None, &snapshotter::Cancel::never())
        .unwrap();
    assert!(blob.size > 0);
    drop(blob);

    // The swap attack: l1's file replaced by l2's (a valid image, another digest).
    let victim: &Path = &l1.join("layer.erofs");
    std::fs::remove_file(victim).unwrap();
    std::fs::copy(l2.join("layer.erofs"), victim).unwrap();
    let e = s
        .compare(&[], &view, "", None, &snapshotter::Cancel::never())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("l1"), "names the layer: {e}");
    // Diffs that do not read it still work.
    let view2 = s.view("v2", "l2", BTreeMap::new()).unwrap();
    let lower = s.view("v3", "l2", BTreeMap::new()).unwrap();
    s.compare(&lower, &view2, "", None, &snapshotter::Cancel::never())
        .unwrap();
}

/// Diffs in `ROOT/tmp` exist only while a Compare runs: whatever a crash left there is
/// removed when the snapshotter opens.
#[test]
fn start_up_sweeps_leftover_diffs() {
    let root = Root::new("");
    drop(root.open());
    let tmp = root.root().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("diff-00000000deadbeef"), vec![7u8; 4096]).unwrap();
    let s = root.open();
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    drop(s);
}

/// A layer changed while no daemon ran is checked again at start-up, not trusted because it
/// is still mounted from before: it is unmounted, and the next mount of it is refused.
#[test]
fn start_up_rechecks_mounted_layers() {
    let root = Root::new("[snapshotter]\nenable_fsverity = true\n");
    // One recorder for both runs: the mounts outlive the daemon, as in the kernel.
    let mounts = Arc::new(RecordingMounter::new());
    let s = root.open_with(mounts.clone());
    let l1 = layer(&s, "l1", "", &[("etc/one", b"one\n")]);
    let l2 = layer(&s, "l2", "", &[("etc/two", b"two\n")]);
    s.view("v1", "l1", BTreeMap::new()).unwrap();
    s.view("v2", "l2", BTreeMap::new()).unwrap();
    drop(s);
    let fs1 = l1.join("fs");
    let fs2 = l2.join("fs");
    assert!(mounts.mounted().contains_key(&fs1) && mounts.mounted().contains_key(&fs2));

    // l1 swapped for another valid image while no daemon runs.
    let victim = l1.join("layer.erofs");
    std::fs::remove_file(&victim).unwrap();
    std::fs::copy(l2.join("layer.erofs"), &victim).unwrap();
    let s = root.open_with(mounts.clone());
    assert!(
        !mounts.mounted().contains_key(&fs1),
        "the changed layer is unmounted"
    );
    assert!(
        mounts.mounted().contains_key(&fs2),
        "the intact one stays mounted"
    );
    let e = s.view("v3", "l1", BTreeMap::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    s.view("v4", "l2", BTreeMap::new()).unwrap();
}

/// A flattened chain's fsmeta changed while no daemon ran is caught at start-up as a changed
/// layer is: its mount is detached and the next mount of it refused; an intact one on another
/// chain stays mounted and in use.
#[test]
fn start_up_rechecks_mounted_fsmeta() {
    let root = Root::new("[snapshotter]\nenable_fsverity = true\nmax_unmerged_layers = 1\n");
    let mounts = Arc::new(RecordingMounter::new());
    let s = root.open_with(mounts.clone());
    layer(&s, "a", "", &[("etc/a", b"a\n")]);
    let b = layer(&s, "b", "a", &[("etc/b", b"b\n")]);
    layer(&s, "c", "", &[("etc/c", b"c\n")]);
    let d = layer(&s, "d", "c", &[("etc/d", b"d\n")]);
    s.view("vb", "b", BTreeMap::new()).unwrap();
    s.view("vd", "d", BTreeMap::new()).unwrap();
    drop(s);
    let (mb, md) = (b.join("merged"), d.join("merged"));
    assert!(
        mounts.mounted().contains_key(&mb) && mounts.mounted().contains_key(&md),
        "both chains are flattened: {:?}",
        mounts.mounted()
    );

    // b's fsmeta changed (one byte of its superblock) while no daemon runs.
    let fsmeta = b.join("fsmeta.erofs");
    let mut bytes = std::fs::read(&fsmeta).unwrap();
    bytes[1024 + 12] ^= 0xff;
    std::fs::write(&fsmeta, &bytes).unwrap();
    let s = root.open_with(mounts.clone());
    assert!(
        !mounts.mounted().contains_key(&mb),
        "the changed fsmeta is unmounted"
    );
    assert!(
        mounts.mounted().contains_key(&md),
        "the intact one stays mounted"
    );
    let e = s.view("vb2", "b", BTreeMap::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(
        e.to_string().contains("fsmeta") && e.to_string().contains("modified or replaced"),
        "{e}"
    );
    let before = mounts.events().len();
    s.view("vd2", "d", BTreeMap::new()).unwrap();
    assert_eq!(
        mounts.events().len(),
        before,
        "the intact chain is used as mounted, not mounted again"
    );
}

/// With fs-verity on, a layer with no recorded digest is refused rather than used unchecked:
/// here, one committed while fs-verity was off. Nothing says what its content should be, so
/// it cannot be told from a replaced one. (The daemon used to warn and mount it.)
#[test]
fn layers_without_a_recorded_digest_are_refused() {
    let root = Root::new("");
    let mounts = Arc::new(RecordingMounter::new());
    let s = root.open_with(mounts.clone());
    layer(&s, "old", "", &[("etc/one", b"one\n")]);
    drop(s);
    let on = Config::parse(&format!(
        "root_path = {:?}\naddress = {:?}\n[snapshotter]\nenable_fsverity = true\n",
        root.root().display().to_string(),
        root.dir.path().join("unused.sock").display().to_string(),
    ))
    .unwrap();
    let s = Snapshotter::open(on, mounts.clone()).unwrap();
    let e = s.view("v1", "old", BTreeMap::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(
        e.to_string().contains("\"old\"") && e.to_string().contains("without an fs-verity digest"),
        "{e}"
    );
    assert!(mounts.mounted().is_empty(), "nothing was mounted");
    // New layers get a digest and are used.
    layer(&s, "new", "", &[("etc/two", b"two\n")]);
    s.view("v2", "new", BTreeMap::new()).unwrap();
}

#[test]
fn update_refuses_id_mapping_labels_that_mounts_cannot_use() {
    use snapshotter::Info;
    let root = Root::new("");
    let s = root.open();
    s.prepare("a", "", BTreeMap::new()).unwrap();
    let info = s.stat("a").unwrap();
    let with = |pairs: &[(&str, &str)]| Info {
        labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..info.clone()
    };
    let uid = "containerd.io/snapshot/uidmapping";
    let gid = "containerd.io/snapshot/gidmapping";
    // One of the pair alone, and a pair that does not parse: refused, nothing stored.
    for bad in [
        with(&[(uid, "0:1000:65536")]),
        with(&[(uid, "0:1000:65536"), (gid, "zero:1000:65536")]),
    ] {
        let e = s.update(bad, &["labels".into()]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(s.stat("a").unwrap().labels.is_empty());
        s.mounts("a").unwrap();
    }
    // A valid pair is stored and Mounts still works.
    let good = with(&[(uid, "0:1000:65536"), (gid, "0:1000:65536")]);
    let got = s.update(good, &["labels".into()]).unwrap();
    assert_eq!(got.labels.len(), 2);
    s.mounts("a").unwrap();
}
