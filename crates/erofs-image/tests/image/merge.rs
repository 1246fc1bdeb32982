//! fsmeta against the kernel: for generated layer chains (seeded: whiteouts, opaque
//! directories, renames across layers, type changes, hardlinks, xattrs, sparse files, inline
//! tails, tar-index and full layers mixed), the fsmeta mount (`-o device=` per layer) must
//! show exactly the tree overlayfs shows for the same layer mounts stacked.
//!
//! `MERGE_CASES=N` runs N chains (default: a handful, seconds); `MERGE_SEED=S` starts at seed S.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use erofs_image::BuildOptions;
use erofs_image::merge::{MergeOptions, merge_layer_files, open_fsmeta};
use erofs_image::tar::{Entry, EntryKind, TarWriter};

use crate::common::*;

const T: i64 = 1_700_000_000;
const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const SIZES: [usize; 13] = [
    0, 1, 100, 511, 512, 3000, 4095, 4096, 4097, 8192, 12289, 70000, 300,
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Index,
    Full,
    FullNoInline,
}

/// One generated layer: the tar bytes and how to build it.
struct GenLayer {
    tar: Vec<u8>,
    kind: Kind,
}

fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + body.to_string().len();
    if len.to_string().len() != body.to_string().len() {
        len += 1;
    }
    let mut r = format!("{len} ").into_bytes();
    r.extend_from_slice(key);
    r.push(b'=');
    r.extend_from_slice(value);
    r.push(b'\n');
    assert_eq!(r.len(), len);
    r
}

fn padded(mut v: Vec<u8>) -> Vec<u8> {
    v.resize(v.len().next_multiple_of(512), 0);
    v
}

/// A GNU 0.1 sparse file (PAX map), written by hand: `TarWriter` writes no sparse files.
fn sparse_entry(path: &str, size: u64, segments: &[(u64, u64)], fill: u8) -> Vec<u8> {
    let map: Vec<String> = segments
        .iter()
        .flat_map(|&(o, l)| [o.to_string(), l.to_string()])
        .collect();
    let recs = [
        pax_record(b"GNU.sparse.major", b"0"),
        pax_record(b"GNU.sparse.minor", b"1"),
        pax_record(b"GNU.sparse.realsize", size.to_string().as_bytes()),
        pax_record(b"GNU.sparse.map", map.join(",").as_bytes()),
        pax_record(b"mtime", T.to_string().as_bytes()),
    ]
    .concat();
    let stored: u64 = segments.iter().map(|s| s.1).sum();
    let mut out = raw_header(b"PaxHeaders/sparse", b'x', recs.len() as u64, b"");
    out.extend(padded(recs));
    out.extend(raw_header(path.as_bytes(), b'0', stored, b""));
    out.extend(padded(vec![fill; stored as usize]));
    out
}

/// Paths of one layer being generated, with what they are in this layer.
#[derive(Default)]
struct LayerModel {
    kinds: BTreeMap<String, char>,
}

impl LayerModel {
    /// Whether `path` can be added as `kind` without contradicting this layer.
    fn fits(&self, path: &str, kind: char) -> bool {
        let mut prefix = String::new();
        for comp in path.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(comp);
            if matches!(self.kinds.get(&prefix), Some(k) if *k != 'd') {
                return false;
            }
        }
        match self.kinds.get(path) {
            None => true,
            Some('d') => kind == 'd',
            Some(_) => false,
        }
    }
    fn add(&mut self, path: &str, kind: char) {
        let comps: Vec<&str> = path.split('/').collect();
        for i in 1..comps.len() {
            self.kinds.entry(comps[..i].join("/")).or_insert('d');
        }
        self.kinds.insert(path.to_string(), kind);
    }
}

fn random_path(rng: &mut fastrand::Rng) -> String {
    let depth = rng.usize(1..=3);
    (0..depth)
        .map(|_| NAMES[rng.usize(..NAMES.len())])
        .collect::<Vec<_>>()
        .join("/")
}

fn entry(path: &str, kind: EntryKind, rng: &mut fastrand::Rng) -> Entry {
    let mut e = Entry::new(path, kind);
    e.mode = [0o755, 0o644, 0o700, 0o600, 0o1777, 0o4755][rng.usize(..6)];
    e.uid = [0, 1000, 70000][rng.usize(..3)];
    e.gid = [0, 100, 70001][rng.usize(..3)];
    e.mtime = T + rng.i64(0..1000);
    e.mtime_nsec = rng.u32(0..1_000_000_000);
    if rng.u8(..3) == 0 {
        let n = rng.usize(1..4);
        for i in 0..n {
            let len = if rng.u8(..8) == 0 {
                600
            } else {
                rng.usize(0..20)
            };
            let v: Vec<u8> = (0..len).map(|_| rng.u8(b'a'..=b'z')).collect();
            let name = if i == 0 && rng.bool() {
                "trusted.t".to_string()
            } else {
                format!("user.k{i}")
            };
            e.xattrs.push((name.into_bytes(), v));
        }
    }
    e
}

fn gen_layer(rng: &mut fastrand::Rng, kind: Kind) -> GenLayer {
    let mut tar = Vec::new();
    let mut model = LayerModel::default();
    let mut files: Vec<String> = Vec::new();
    let ops = rng.usize(1..30);
    for _ in 0..ops {
        let path = random_path(rng);
        let op = rng.u8(..100);
        let mut w = TarWriter::new(&mut tar);
        match op {
            0..=29 => {
                if !model.fits(&path, 'f') {
                    continue;
                }
                let size = SIZES[rng.usize(..SIZES.len())];
                let data: Vec<u8> = (0..size).map(|_| rng.u8(..)).collect();
                let e = entry(&path, EntryKind::Regular, rng);
                w.append_bytes(&e, &data).unwrap();
                model.add(&path, 'f');
                files.push(path);
            }
            30..=44 => {
                if !model.fits(&path, 'd') {
                    continue;
                }
                let e = entry(&path, EntryKind::Directory, rng);
                w.append_bytes(&e, b"").unwrap();
                model.add(&path, 'd');
                if rng.u8(..3) == 0 {
                    let e = Entry::new(format!("{path}/.wh..wh..opq"), EntryKind::Regular);
                    w.append_bytes(&e, b"").unwrap();
                }
            }
            45..=64 => {
                // A whiteout (a rename across layers when the name reappears elsewhere).
                let (parent, name) = match path.rsplit_once('/') {
                    Some((p, n)) => (format!("{p}/"), n),
                    None => (String::new(), path.as_str()),
                };
                if !parent.is_empty() && !model.fits(parent.trim_end_matches('/'), 'd') {
                    continue;
                }
                let e = Entry::new(format!("{parent}.wh.{name}"), EntryKind::Regular);
                w.append_bytes(&e, b"").unwrap();
                if !parent.is_empty() {
                    model.add(parent.trim_end_matches('/'), 'd');
                }
            }
            65..=74 => {
                if !model.fits(&path, 'l') {
                    continue;
                }
                let mut e = entry(&path, EntryKind::Symlink, rng);
                e.link = if rng.bool() {
                    random_path(rng).into_bytes()
                } else {
                    vec![b't'; rng.usize(1..600)]
                };
                e.xattrs.retain(|(k, _)| !k.starts_with(b"user."));
                w.append_bytes(&e, b"").unwrap();
                model.add(&path, 'l');
            }
            75..=84 => {
                if files.is_empty() || !model.fits(&path, 'h') {
                    continue;
                }
                let target = files[rng.usize(..files.len())].clone();
                if target == path {
                    continue;
                }
                let mut e = Entry::new(path.as_str(), EntryKind::Hardlink);
                e.link = target.into_bytes();
                w.append_bytes(&e, b"").unwrap();
                model.add(&path, 'h');
            }
            85..=89 => {
                if !model.fits(&path, 'c') {
                    continue;
                }
                let k = if rng.bool() {
                    EntryKind::Fifo
                } else {
                    EntryKind::Char
                };
                let mut e = entry(&path, k, rng);
                e.devmajor = 1;
                e.devminor = 3;
                w.append_bytes(&e, b"").unwrap();
                model.add(&path, 'c');
            }
            90..=95 if kind != Kind::Index => {
                if !model.fits(&path, 'f') {
                    continue;
                }
                let size = [1u64 << 20, 3 << 20, 200_000][rng.usize(..3)];
                let segs: Vec<(u64, u64)> = match rng.u8(..3) {
                    0 => vec![(size, 0)],
                    1 => vec![(0, 4096), (size - 100, 100)],
                    _ => vec![(8192, 5000), (1 << 19, 4096)],
                };
                let segs: Vec<(u64, u64)> =
                    segs.into_iter().filter(|&(o, l)| o + l <= size).collect();
                tar.extend(sparse_entry(&path, size, &segs, rng.u8(1..)));
                model.add(&path, 'f');
                files.push(path);
            }
            96..=97 => {
                // The root made opaque (overlayfs ignores this on the root).
                let e = Entry::new(".wh..wh..opq", EntryKind::Regular);
                w.append_bytes(&e, b"").unwrap();
            }
            _ => {
                // The same path as another type than below: a file->dir->symlink churn.
                if model.kinds.contains_key(&path) || !model.fits(&path, 'f') {
                    continue;
                }
                let mut e = entry(&path, EntryKind::Regular, rng);
                e.mode = 0o444;
                w.append_bytes(&e, b"changed").unwrap();
                model.add(&path, 'f');
                files.push(path);
            }
        }
    }
    tar.extend_from_slice(&[0u8; 1024]);
    GenLayer { tar, kind }
}

fn build_layer(l: &GenLayer, dir: &Path, i: usize) -> PathBuf {
    let tar = dir.join(format!("{i}.tar"));
    fs::write(&tar, &l.tar).unwrap();
    let img = dir.join(format!("{i}"));
    let opts = BuildOptions {
        inline_data: l.kind != Kind::FullNoInline,
        ..oci_opts()
    };
    match l.kind {
        Kind::Index => build_index_file(&tar, &img, &opts),
        _ => build_full(&tar, &img, &opts),
    }
    fs::remove_file(&tar).unwrap();
    img
}

/// Groups of paths naming one inode (non-directories), by `(st_dev, st_ino)`.
fn link_groups(root: &Path) -> BTreeSet<BTreeSet<Vec<u8>>> {
    let mut by: BTreeMap<(u64, u64), BTreeSet<Vec<u8>>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let md = fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        } else {
            by.entry((md.dev(), md.ino()))
                .or_default()
                .insert(rel.as_os_str().as_bytes().to_vec());
        }
    }
    by.into_values().filter(|g| g.len() > 1).collect()
}

fn tree(root: &Path) -> BTreeMap<Vec<u8>, Info> {
    let mut t = snapshot(
        root,
        Compare {
            ignore_dir_nlink: true,
            ..Default::default()
        },
    );
    // overlayfs reports a lower file's own link count, which counts names that upper
    // layers hide; the groups are compared instead.
    for i in t.values_mut() {
        i.nlink = 0;
    }
    t
}

/// One chain; returns the number of paths compared.
fn run_case(seed: u64, max_layers: usize) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = rng.usize(1..=max_layers);
    let work = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    let mut kinds = Vec::new();
    for i in 0..n {
        let kind = [Kind::Index, Kind::Full, Kind::FullNoInline][rng.usize(..3)];
        kinds.push(kind);
        let l = gen_layer(&mut rng, kind);
        paths.push(build_layer(&l, work.path(), i));
    }
    let ctx = format!("seed {seed}: {n} layers {kinds:?}");
    let fsmeta = work.path().join("m");
    let summary = merge_layer_files(
        &paths,
        File::create(&fsmeta).unwrap(),
        &MergeOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{ctx}: merge: {e}"));
    let want_bs = if kinds.contains(&Kind::Index) {
        512
    } else {
        4096
    };
    assert_eq!(summary.block_size, want_bs, "{ctx}");
    assert_eq!(summary.device_blocks.len(), n, "{ctx}");
    // Same inputs, same bytes.
    let again = work.path().join("m2");
    merge_layer_files(
        &paths,
        File::create(&again).unwrap(),
        &MergeOptions::default(),
    )
    .unwrap();
    assert!(
        fs::read(&fsmeta).unwrap() == fs::read(&again).unwrap(),
        "{ctx}: not deterministic"
    );
    fs::remove_file(&again).unwrap();

    let devices: Vec<Box<dyn erofs_image::ReadAt>> = paths
        .iter()
        .map(|p| Box::new(File::open(p).unwrap()) as Box<dyn erofs_image::ReadAt>)
        .collect();
    let report = erofs_image::check::check_image(File::open(&fsmeta).unwrap(), devices);
    assert!(report.is_ok(), "{ctx}: checker: {}", report.summary(20));
    open_fsmeta(&fsmeta, &paths).unwrap();

    let layer_mounts: Vec<Mount> = paths.iter().map(|p| mount_erofs(p, &[])).collect();
    let mut lowers: Vec<&Path> = layer_mounts.iter().rev().map(|m| m.path()).collect();
    // overlayfs wants two lowers at least; an empty one at the bottom changes nothing.
    let empty = work.path().join("empty");
    fs::create_dir(&empty).unwrap();
    lowers.push(&empty);
    let ov = mount_overlay(&lowers);
    let devs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let fm = mount_erofs(&fsmeta, &devs);
    let (want, got) = (tree(ov.path()), tree(fm.path()));
    eprintln!(
        "{ctx}: {} paths, {} inodes, {} bytes copied",
        want.len(),
        summary.inodes,
        summary.copied_bytes
    );
    let diff = std::panic::catch_unwind(|| assert_same_tree(&want, &got));
    if let Err(e) = diff {
        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
        if let Some(keep) = std::env::var_os("MERGE_KEEP") {
            for (i, p) in paths.iter().enumerate() {
                fs::copy(p, Path::new(&keep).join(format!("{i}"))).unwrap();
            }
            fs::copy(&fsmeta, Path::new(&keep).join("m")).unwrap();
        }
        panic!("{ctx}: fsmeta differs from the overlay (MERGE_KEEP=DIR keeps the images):\n{msg}");
    }
    let groups = link_groups(ov.path());
    assert_eq!(groups, link_groups(fm.path()), "{ctx}: hardlink groups");
    want.len() + groups.len()
}

fn cases() -> (u64, u64) {
    let n = std::env::var("MERGE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let s = std::env::var("MERGE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    (s, n)
}

/// Short chains, many cases.
#[test]
fn fsmeta_mount_matches_overlay() {
    let (start, n) = cases();
    let compared: usize = (start..start + n).map(|seed| run_case(seed, 8)).sum();
    // The generator makes non-trivial trees (a guard against comparing empty mounts).
    assert!(compared >= 5 * n as usize, "{compared} paths in {n} cases");
}

/// Deep chains (up to 40 layers).
#[test]
fn fsmeta_mount_matches_overlay_deep() {
    let (start, n) = cases();
    let k = n.div_ceil(4);
    let compared: usize = (start..start + k)
        .map(|seed| run_case(1_000_000 + seed, 40))
        .sum();
    assert!(compared >= 20 * k as usize, "{compared} paths in {k} cases");
}

/// fsck.erofs 1.9 reads fsmeta with its devices too.
#[test]
fn fsck_erofs_accepts_fsmeta() {
    let mut rng = fastrand::Rng::with_seed(7);
    let work = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (i, kind) in [Kind::Full, Kind::FullNoInline, Kind::Full]
        .into_iter()
        .enumerate()
    {
        let l = gen_layer(&mut rng, kind);
        paths.push(build_layer(&l, work.path(), i));
    }
    let fsmeta = work.path().join("m");
    merge_layer_files(
        &paths,
        File::create(&fsmeta).unwrap(),
        &MergeOptions::default(),
    )
    .unwrap();
    let mut c = Command::new(fsck_new());
    for p in &paths {
        c.arg(format!("--device={}", p.display()));
    }
    run(c.arg(&fsmeta));
}

/// Merge one generated layer over a generated base: both may be hostile (the generator's
/// twists: overlapping metadata, bad ids, chunk indexes naming devices out of range, flipped
/// bytes). The merge answers in bounded time with an fsmeta or an error, never a panic, and
/// what it writes passes the checker with its devices; clean generated layers always merge.
pub fn merge_generated(data: &[u8]) -> Option<bool> {
    use erofs_image::merge::merge_layers;
    let (a, b) = data.split_at(data.len() / 2);
    let base = crate::imagegen::image(&mut crate::imagegen::Src::new(a));
    let top = crate::imagegen::image(&mut crate::imagegen::Src::new(b));
    let layers = [base.image, top.image];
    let images: Vec<erofs_image::Image> = layers
        .iter()
        .map(|l| erofs_image::Image::open(l.clone()))
        .collect::<Result<_, _>>()
        .ok()?;
    let mut out = Vec::new();
    match merge_layers(&images, &mut out, &MergeOptions::default()) {
        Ok(_) => {
            let devices = layers
                .iter()
                .map(|l| Box::new(l.clone()) as Box<dyn erofs_image::ReadAt>)
                .collect();
            let r = erofs_image::check::check_image(out, devices);
            assert!(r.is_ok(), "fsmeta of generated layers: {}", r.summary(5));
            Some(true)
        }
        Err(e) => {
            assert!(
                !(base.clean && top.clean),
                "clean generated layers refused: {e}"
            );
            Some(false)
        }
    }
}

#[test]
fn generated_hostile_layers() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut merged, mut refused) = (0, 0);
    for round in 0..2000 {
        let bytes: Vec<u8> = (0..4096).map(|_| next() as u8).collect();
        let started = std::time::Instant::now();
        match merge_generated(&bytes) {
            Some(true) => merged += 1,
            Some(false) => refused += 1,
            None => {}
        }
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(2),
            "round {round}: {took:?}"
        );
    }
    assert!(
        merged > 50 && refused > 50,
        "{merged} merged, {refused} refused"
    );
}
