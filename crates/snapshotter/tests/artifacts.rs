//! Apply with layer artifacts, in process: a core with tar index and dm-verity on (or, in the
//! `full_image_` tests, full images with dm-verity), whose artifact source serves what a
//! registry would (built here with the libraries the differ uses), good or tampered, fast or
//! slow. Each case checks the outcome counter and that the
//! layer is byte for byte the locally built one (or, where a signature is required and
//! missing, that the Apply fails and leaves nothing). The registry client and containerd are
//! exercised by the daemon's end-to-end tests (crates/erofs-snapshotter/tests/artifacts_node.rs).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::core;
use erofs_registry::signature::SecretKey;
use snapshotter::artifacts::{
    ArtifactSource, FetchError, Fetched, FetchedTree, ImageId, LABEL_IMAGE_REF,
    LABEL_MANIFEST_DIGEST, Outcome, Wanted,
};
use snapshotter::diff::{Descriptor, DirContent};
use snapshotter::{Cancel, Snapshotter};

const IMAGE: &str = "registry.example/app:1";
const MANIFEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// What the test registry serves per layer digest, and how long it takes.
#[derive(Debug, Default)]
struct Served {
    layers: Mutex<HashMap<String, Fetched>>,
    delay: Mutex<Duration>,
    asked: Mutex<Vec<(ImageId, Wanted)>>,
}

impl ArtifactSource for Served {
    fn fetch(&self, image: &ImageId, layer: &str, wanted: Wanted) -> Result<Fetched, FetchError> {
        self.asked.lock().unwrap().push((image.clone(), wanted));
        std::thread::sleep(*self.delay.lock().unwrap());
        self.layers
            .lock()
            .unwrap()
            .get(layer)
            .cloned()
            .ok_or_else(|| FetchError::Absent(format!("nothing for {layer}")))
    }
}

/// A tar layer in a content directory, and its artifacts as built locally.
struct Layer {
    desc: Descriptor,
    /// `[index][tar][tree]`, as the differ writes it.
    file: Vec<u8>,
    fetched: Fetched,
}

/// A small tar layer named `name`, stored in the content directory: its bytes and digest.
fn tar_layer(content: &Path, name: &str) -> (Vec<u8>, String) {
    let mut b = testsuite::oci::LayerBuilder::new();
    b.dir("etc", 0o755);
    b.file(&format!("etc/{name}"), 0o4755, name.as_bytes());
    b.file("etc/data", 0o644, &vec![9u8; 300_001]);
    b.symlink("etc/link", name);
    let tar = b.finish().unwrap();
    let digest = testsuite::oci::sha256_digest(&tar);
    let blob = content
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(&blob, &tar).unwrap();
    (tar, digest)
}

fn tar_desc(tar: &[u8], digest: String) -> Descriptor {
    Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest,
        size: tar.len() as i64,
        annotations: Default::default(),
    }
}

/// The full image of layer `name` as `artifacts build --full-image` makes it with the
/// producer's `mkfs` options, and what it pushes: the tree (no tar index) and its signature.
fn full_layer(content: &Path, scratch: &Path, name: &str, key: &SecretKey, mkfs: &[&str]) -> Layer {
    let (tar, digest) = tar_layer(content, name);
    let path = scratch.join(name);
    let out = std::fs::File::create(&path).unwrap();
    let mkfs: Vec<String> = mkfs.iter().map(|s| s.to_string()).collect();
    let opts = snapshotter::diff::MkfsOptions::parse(&mkfs)
        .unwrap()
        .build_options(&digest);
    erofs_image::tar_to_image(&tar[..], erofs_output::FileOutput::new(&out), &opts).unwrap();
    drop(out);
    signed_layer(&path, &tar, digest, false, key)
}

/// The layer at `path` (its data: `[index][tar]` if `tar_index`, else a full image) with a dm-verity tree
/// appended, and what a registry would serve for it: that tree, signed with `key`.
fn signed_layer(
    path: &Path,
    tar: &[u8],
    digest: String,
    tar_index: bool,
    key: &SecretKey,
) -> Layer {
    let data_len = std::fs::metadata(path).unwrap().len() as usize;
    let meta = snapshotter::integrity::dmverity::append_tree(path, tar_index, None).unwrap();
    let file = std::fs::read(path).unwrap();
    let fetched = Fetched {
        tar_index: tar_index.then(|| file[..data_len - tar.len()].to_vec()),
        diff_id: digest.clone(),
        tree: Some(FetchedTree {
            bytes: file[meta.hashoffset as usize..].to_vec().into(),
            roothash: meta.roothash.clone(),
            block_size: if tar_index { 512 } else { 4096 },
            hash_offset: meta.hashoffset,
        }),
        signature: Some(("ed25519".into(), key.sign_root(&meta.roothash).to_vec())),
    };
    Layer {
        desc: tar_desc(tar, digest),
        file,
        fetched,
    }
}

fn layer(content: &Path, scratch: &Path, name: &str, key: &SecretKey) -> Layer {
    let (tar, digest) = tar_layer(content, name);
    let path = scratch.join(name);
    let out = std::fs::File::create(&path).unwrap();
    let opts = snapshotter::diff::MkfsOptions::parse(&[])
        .unwrap()
        .build_options(&digest);
    erofs_image::tar_to_index_file(&tar[..], erofs_output::FileOutput::new(&out), &opts).unwrap();
    drop(out);
    signed_layer(&path, &tar, digest, true, key)
}

/// Flip a bit in the lowest level of `f`'s tree.
fn tamper_tree(f: &mut Fetched) {
    let t = f.tree.as_mut().unwrap();
    let snapshotter::artifacts::TreeBytes::Mem(v) = &mut t.bytes else {
        unreachable!("built in memory")
    };
    let n = v.len();
    v[n - 7] ^= 1;
}

struct World {
    dir: tempfile::TempDir,
    sn: Arc<Snapshotter>,
    served: Arc<Served>,
    key: SecretKey,
    content: PathBuf,
}

impl World {
    fn new(extra: &str) -> World {
        World::with("enable_tar_index = true\n", extra)
    }

    /// A node that builds full images with dm-verity (`differ` lines of its own).
    fn full(differ: &str, extra: &str) -> World {
        World::with(&format!("enable_tar_index = false\n{differ}"), extra)
    }

    fn with(differ: &str, extra: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        let pubkey = dir.path().join("trusted.pub");
        std::fs::write(&pubkey, key.public().to_text()).unwrap();
        let (sn, _) = core(
            dir.path(),
            &format!(
                "[differ]\n{differ}enable_dmverity = true\n\
                 [artifacts]\nenabled = true\nfetch_timeout = \"500ms\"\ntrusted_keys = [{pubkey:?}]\n{extra}"
            ),
        );
        let served = Arc::new(Served::default());
        sn.set_artifact_source(served.clone());
        let content = dir.path().join("content");
        World {
            dir,
            sn,
            served,
            key,
            content,
        }
    }

    fn layer(&self, name: &str) -> Layer {
        let scratch = self.dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        layer(&self.content, &scratch, name, &self.key)
    }

    /// The full-image layer `name`, built by a producer with `mkfs` options.
    fn full_layer(&self, name: &str, mkfs: &[&str]) -> Layer {
        let scratch = self.dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        full_layer(&self.content, &scratch, name, &self.key, mkfs)
    }

    fn serve(&self, l: &Layer, f: Fetched) {
        self.served
            .layers
            .lock()
            .unwrap()
            .insert(l.desc.digest.clone(), f);
    }

    /// Prepare (with the image labels, or none) and Apply `l`; the layer file's bytes.
    fn apply(&self, l: &Layer, key: &str, labelled: bool) -> snapshotter::Result<Vec<u8>> {
        let labels = if labelled {
            BTreeMap::from([
                (LABEL_IMAGE_REF.to_string(), IMAGE.to_string()),
                (LABEL_MANIFEST_DIGEST.to_string(), MANIFEST.to_string()),
            ])
        } else {
            BTreeMap::new()
        };
        let m = self.sn.prepare(key, "", labels).unwrap();
        self.sn.apply(
            &l.desc,
            &m,
            &DirContent::new(&self.content),
            "default",
            &Cancel::never(),
        )?;
        let dir = Path::new(&m[0].source).parent().unwrap().to_path_buf();
        Ok(std::fs::read(dir.join("layer.erofs")).unwrap())
    }

    fn count(&self, o: Outcome) -> u64 {
        self.sn
            .stats()
            .artifacts
            .iter()
            .find(|(x, _)| *x == o)
            .unwrap()
            .1
    }
}

#[test]
fn fetched_artifacts_are_used_and_tampered_ones_are_not() {
    let w = World::new("");
    let good = w.layer("good");
    w.serve(&good, good.fetched.clone());
    assert_eq!(w.apply(&good, "good", true).unwrap(), good.file);
    assert_eq!(w.count(Outcome::Used), 1);
    let asked = w.served.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1);
    assert_eq!(
        (
            asked[0].0.reference.as_str(),
            asked[0].0.manifest_digest.as_str(),
            asked[0].0.from,
            asked[0].1
        ),
        (IMAGE, MANIFEST, "labels", Wanted::TarIndex)
    );

    type Tamper = fn(&mut Fetched, &SecretKey);
    let cases: [(&str, Tamper, Outcome); 6] = [
        (
            "index",
            |f, _| f.tar_index.as_mut().unwrap()[100] ^= 1,
            Outcome::BadIndex,
        ),
        (
            "index-len",
            |f, _| {
                f.tar_index.as_mut().unwrap().push(0);
            },
            Outcome::BadIndex,
        ),
        ("tree", |f, _| tamper_tree(f), Outcome::BadTree),
        (
            "signature",
            |f, _| {
                let other = SecretKey::generate().unwrap();
                let root = f.tree.as_ref().unwrap().roothash.clone();
                f.signature = Some(("ed25519".into(), other.sign_root(&root).to_vec()));
            },
            Outcome::BadSignature,
        ),
        (
            "scheme",
            |f, _| f.signature.as_mut().unwrap().0 = "pkcs7".into(),
            Outcome::BadSignature,
        ),
        (
            "diff-id",
            |f, _| f.diff_id = MANIFEST.into(),
            Outcome::Invalid,
        ),
    ];
    for (name, tamper, outcome) in cases {
        let l = w.layer(name);
        let mut f = l.fetched.clone();
        tamper(&mut f, &w.key);
        w.serve(&l, f);
        let before = w.count(outcome);
        let got = w.apply(&l, name, true).unwrap();
        assert!(got == l.file, "{name}: the layer is not the local one");
        assert_eq!(w.count(outcome), before + 1, "{name}");
    }
    // Unsigned but valid: used, the tree checked in full.
    let unsigned = w.layer("unsigned");
    let mut f = unsigned.fetched.clone();
    f.signature = None;
    w.serve(&unsigned, f);
    assert_eq!(w.apply(&unsigned, "unsigned", true).unwrap(), unsigned.file);
    assert_eq!(w.count(Outcome::Used), 2);
    // Nothing stored, and nothing naming the image.
    let absent = w.layer("absent");
    assert_eq!(w.apply(&absent, "absent", true).unwrap(), absent.file);
    assert_eq!(w.count(Outcome::Absent), 1);
    let anon = w.layer("anon");
    w.serve(&anon, anon.fetched.clone());
    assert_eq!(w.apply(&anon, "anon", false).unwrap(), anon.file);
    assert_eq!(w.count(Outcome::NoImage), 1);
    assert_eq!(w.count(Outcome::Used), 2);
}

#[test]
fn a_slow_registry_costs_at_most_the_fetch_timeout() {
    let w = World::new("");
    let l = w.layer("slow");
    w.serve(&l, l.fetched.clone());
    *w.served.delay.lock().unwrap() = Duration::from_secs(5);
    let t = Instant::now();
    assert_eq!(w.apply(&l, "slow", true).unwrap(), l.file);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "Apply took {took:?}");
    assert_eq!(w.count(Outcome::Timeout), 1);
}

#[test]
fn required_signatures_refuse_layers_without_one() {
    let w = World::new("require_signed_root_hash = true\n");
    let cases: [(&str, Option<Case>); 4] = [
        ("none", None),
        ("unsigned", Some(|f, _| f.signature = None)),
        ("untrusted", Some(sign_with)),
        ("tree", Some(|f, _| tamper_tree(f))),
    ];
    only_signed_layers_apply(&w, |name| w.layer(name), &cases);
}

type Case = fn(&mut Fetched, &SecretKey);

/// Sign the served root with key `k` (one the node does not trust).
fn sign_with(f: &mut Fetched, k: &SecretKey) {
    let root = f.tree.as_ref().unwrap().roothash.clone();
    f.signature = Some(("ed25519".into(), k.sign_root(&root).to_vec()));
}

/// Under `require_signed_root_hash`: a layer (from `make`) served as built is used, and each
/// of `cases` (a change to what is served; `None`: nothing served) fails its Apply with
/// FailedPrecondition, leaving no layer file behind.
fn only_signed_layers_apply(
    w: &World,
    make: impl Fn(&str) -> Layer,
    cases: &[(&str, Option<Case>)],
) {
    let good = make("good");
    w.serve(&good, good.fetched.clone());
    assert_eq!(w.apply(&good, "good", true).unwrap(), good.file);
    assert_eq!(w.count(Outcome::Used), 1);
    let other = SecretKey::generate().unwrap();
    for &(name, change) in cases {
        let l = make(name);
        if let Some(change) = change {
            let mut f = l.fetched.clone();
            change(&mut f, &other);
            w.serve(&l, f);
        }
        let e = w.apply(&l, name, true).unwrap_err();
        assert_eq!(
            e.kind(),
            snapshotter::error::ErrorKind::FailedPrecondition,
            "{name}: {e}"
        );
        assert!(
            e.to_string().contains("require_signed_root_hash"),
            "{name}: {e}"
        );
    }
    // Nothing of the refused layers is left: only the good one has a layer file.
    let layers: Vec<_> = std::fs::read_dir(w.dir.path().join("root/snapshots"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("layer.erofs").exists())
        .collect();
    assert_eq!(layers.len(), 1);
}

/// Full images with dm-verity: the registry's full-image tree is used when it is this
/// image's, and the layer is byte for byte the local one whatever was served.
#[test]
fn full_image_trees_are_used_and_bad_ones_are_not() {
    let w = World::full("", "");
    let good = w.full_layer("good", &[]);
    w.serve(&good, good.fetched.clone());
    assert_eq!(w.apply(&good, "good", true).unwrap(), good.file);
    assert_eq!(w.count(Outcome::Used), 1);
    assert_eq!(w.served.asked.lock().unwrap()[0].1, Wanted::FullImage);

    type Tamper = fn(&mut Fetched);
    let cases: [(&str, Tamper, Outcome); 4] = [
        ("tree", tamper_tree, Outcome::BadTree),
        (
            "signature",
            |f| {
                let other = SecretKey::generate().unwrap();
                let root = f.tree.as_ref().unwrap().roothash.clone();
                f.signature = Some(("ed25519".into(), other.sign_root(&root).to_vec()));
            },
            Outcome::BadSignature,
        ),
        ("diff-id", |f| f.diff_id = MANIFEST.into(), Outcome::Invalid),
        ("no-tree", |f| f.tree = None, Outcome::Absent),
    ];
    for (name, tamper, outcome) in cases {
        let l = w.full_layer(name, &[]);
        let mut f = l.fetched.clone();
        tamper(&mut f);
        w.serve(&l, f);
        let before = w.count(outcome);
        let got = w.apply(&l, name, true).unwrap();
        assert!(got == l.file, "{name}: the layer is not the local one");
        assert_eq!(w.count(outcome), before + 1, "{name}");
    }
    // Unsigned but valid: used (checked in full).
    let unsigned = w.full_layer("unsigned", &[]);
    let mut f = unsigned.fetched.clone();
    f.signature = None;
    w.serve(&unsigned, f);
    assert_eq!(w.apply(&unsigned, "unsigned", true).unwrap(), unsigned.file);
    assert_eq!(w.count(Outcome::Used), 2);
    // Nothing stored.
    let absent = w.full_layer("absent", &[]);
    assert_eq!(w.apply(&absent, "absent", true).unwrap(), absent.file);
    assert_eq!(w.count(Outcome::Absent), 2);
}

/// A producer whose mkfs options are not the node's built another image: its tree fails
/// (same size, other bytes: `-T`; another size: `-b`) and the node computes its own.
#[test]
fn full_image_trees_of_other_mkfs_options_are_not_used() {
    let w = World::full("mkfs_options = [\"-T0\"]\n", "");
    for (name, producer) in [("default", &[][..]), ("blocks", &["-T0", "-b512"][..])] {
        let theirs = w.full_layer(name, producer);
        let ours = w.full_layer(name, &["-T0"]);
        assert!(theirs.file != ours.file, "{name}");
        w.serve(&ours, theirs.fetched.clone());
        let before = w.count(Outcome::BadTree);
        assert!(w.apply(&ours, name, true).unwrap() == ours.file, "{name}");
        assert_eq!(w.count(Outcome::BadTree), before + 1, "{name}");
    }
    // The same options: used.
    let same = w.full_layer("same", &["-T0"]);
    w.serve(&same, same.fetched.clone());
    assert_eq!(w.apply(&same, "same", true).unwrap(), same.file);
    assert_eq!(w.count(Outcome::Used), 1);
}

#[test]
fn full_image_required_signatures_refuse_layers_without_one() {
    let w = World::full("", "require_signed_root_hash = true\n");
    let cases: [(&str, Option<Case>); 5] = [
        ("none", None),
        ("unsigned", Some(|f, _| f.signature = None)),
        ("no-tree", Some(|f, _| f.tree = None)),
        ("untrusted", Some(sign_with)),
        ("tree", Some(|f, _| tamper_tree(f))),
    ];
    only_signed_layers_apply(&w, |name| w.full_layer(name, &[]), &cases);
}

/// A full-image node without dm-verity trees has nothing to fetch: no lookup at all.
#[test]
fn full_images_without_dmverity_look_nothing_up() {
    let dir = tempfile::tempdir().unwrap();
    let (sn, _) = core(
        dir.path(),
        "[differ]\nenable_tar_index = false\nenable_dmverity = false\n[artifacts]\nenabled = true\n",
    );
    let served = Arc::new(Served::default());
    sn.set_artifact_source(served.clone());
    let content = dir.path().join("content");
    let (tar, digest) = tar_layer(&content, "plain");
    let m = sn
        .prepare(
            "plain",
            "",
            BTreeMap::from([
                (LABEL_IMAGE_REF.to_string(), IMAGE.to_string()),
                (LABEL_MANIFEST_DIGEST.to_string(), MANIFEST.to_string()),
            ]),
        )
        .unwrap();
    sn.apply(
        &tar_desc(&tar, digest),
        &m,
        &DirContent::new(&content),
        "default",
        &Cancel::never(),
    )
    .unwrap();
    assert!(served.asked.lock().unwrap().is_empty());
    assert!(sn.stats().artifacts.iter().all(|(_, n)| *n == 0));
}
