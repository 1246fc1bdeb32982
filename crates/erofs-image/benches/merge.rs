//! fsmeta build time against the number of layers and files: `merge_layer_files` against
//! `mkfs.erofs --aufs --ovlfs-strip=1 --quiet OUT LAYER...` of erofs-utils 1.9 (upstream's
//! removed generator), on the same layer files, medians of several runs.
//!
//! `cargo bench -p erofs-image --bench merge` prints one table row per case. Layers are full
//! images without inline data (mkfs.erofs refuses inline layouts in rebuild mode). Each chain
//! has FILES files in all, spread over the layers in directories of 100, and every layer above
//! the first also whites out and rewrites a few of the files below, as real images do.
//! `MKFS_EROFS` overrides the path of mkfs.erofs (default /opt/erofs-utils-new/bin/mkfs.erofs,
//! from ../shared/tools/erofs-utils-new); `MERGE_BENCH_CASES=LAYERSxFILES,...` picks cases.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use erofs_image::merge::{MergeOptions, merge_layer_files};
use erofs_image::tar::{Entry, EntryKind, TarWriter};
use erofs_image::{BuildOptions, tar_to_image};

fn layer_tar(layer: usize, layers: usize, files: usize) -> Vec<u8> {
    let mut w = TarWriter::new(Vec::new());
    let per = files.div_ceil(layers).max(1);
    let first = layer * per;
    let data = vec![0x5au8; 8192];
    for i in first..(first + per).min(files.max(1)) {
        let mut e = Entry::new(format!("d{}/f{i}", i / 100), EntryKind::Regular);
        e.mode = 0o644;
        e.mtime = 1_700_000_000;
        w.append_bytes(&e, &data[..(i * 131) % 8192]).unwrap();
    }
    if layer > 0 {
        // A few changes to what is below: whiteouts and rewrites.
        for k in 0..3usize {
            let i = (layer * 7919 + k * 104_729) % first.max(1);
            let name = if k == 0 {
                format!("d{}/.wh.f{i}", i / 100)
            } else {
                format!("d{}/f{i}", i / 100)
            };
            let mut e = Entry::new(name, EntryKind::Regular);
            e.mode = 0o644;
            w.append_bytes(&e, b"changed").unwrap();
        }
    }
    w.finish().unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn case(dir: &Path, layers: usize, files: usize, mkfs: &Path) {
    let opts = BuildOptions {
        inline_data: false,
        oci_whiteouts: true,
        ..Default::default()
    };
    let paths: Vec<PathBuf> = (0..layers)
        .map(|l| {
            let p = dir.join(format!("l{l}"));
            tar_to_image(
                &layer_tar(l, layers, files)[..],
                File::create(&p).unwrap(),
                &opts,
            )
            .unwrap();
            p
        })
        .collect();
    let runs = if layers * files.max(1000) > 10_000_000 {
        3
    } else {
        7
    };
    let out = dir.join("fsmeta");
    let mut ours = Vec::new();
    let mut inodes = 0;
    for _ in 0..runs {
        let _ = fs::remove_file(&out);
        let t = Instant::now();
        let s = merge_layer_files(
            &paths,
            File::create(&out).unwrap(),
            &MergeOptions::default(),
        )
        .unwrap();
        ours.push(t.elapsed());
        inodes = s.inodes;
    }
    let ours_size = fs::metadata(&out).unwrap().len();
    let mut theirs = Vec::new();
    let mut theirs_size = 0;
    for _ in 0..runs {
        let _ = fs::remove_file(&out);
        let t = Instant::now();
        let st = Command::new(mkfs)
            .args(["--aufs", "--ovlfs-strip=1", "--quiet"])
            .arg(&out)
            .args(&paths)
            .status()
            .unwrap();
        theirs.push(t.elapsed());
        assert!(st.success(), "mkfs.erofs failed for {layers} layers");
        theirs_size = fs::metadata(&out).unwrap().len();
    }
    let (o, t) = (median(ours), median(theirs));
    println!(
        "| {layers:>6} | {files:>6} | {inodes:>6} | {:>9.1} | {:>10.1} | {:>5.1}x | {ours_size:>9} | {theirs_size:>9} |",
        o.as_secs_f64() * 1e3,
        t.as_secs_f64() * 1e3,
        t.as_secs_f64() / o.as_secs_f64()
    );
    for p in paths {
        fs::remove_file(p).unwrap();
    }
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: build only.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let mkfs = std::env::var_os("MKFS_EROFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/erofs-utils-new/bin/mkfs.erofs"));
    assert!(
        mkfs.exists(),
        "{} not found (../shared/tools/erofs-utils-new installs it)",
        mkfs.display()
    );
    let cases: Vec<(usize, usize)> = match std::env::var("MERGE_BENCH_CASES") {
        Ok(v) => v
            .split(',')
            .map(|c| {
                let (l, f) = c.split_once('x').expect("LAYERSxFILES");
                (l.parse().unwrap(), f.parse().unwrap())
            })
            .collect(),
        Err(_) => [1, 10, 128, 1000]
            .into_iter()
            .flat_map(|l| [(l, 1000), (l, 20_000)])
            .collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    println!(
        "| layers |  files | inodes |  ours ms | mkfs.erofs ms | ratio | ours bytes | mkfs bytes |"
    );
    println!(
        "|-------:|-------:|-------:|---------:|--------------:|------:|-----------:|-----------:|"
    );
    for (l, f) in cases {
        case(dir.path(), l, f, &mkfs);
    }
}
