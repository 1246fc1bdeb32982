//! What the in-process tests share: a core on a fresh root with the recording mounter, and
//! small probes. (Each test binary uses some of it.)
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshotter::mount::RecordingMounter;
use snapshotter::{Cancel, Config, Snapshotter};

/// A core on a fresh root under `dir`, with `extra` config lines (`[section]` lines allowed).
pub fn core(dir: &Path, extra: &str) -> (Arc<Snapshotter>, Arc<RecordingMounter>) {
    let cfg = Config::parse(&format!(
        "root_path = {:?}\naddress = {:?}\n{extra}\n",
        dir.join("root").display().to_string(),
        dir.join("unused.sock").display().to_string(),
    ))
    .expect("config");
    let rec = Arc::new(RecordingMounter::new());
    let sn = Snapshotter::open(cfg, rec.clone()).expect("opening the core");
    (Arc::new(sn), rec)
}

/// The upper directory of a parentless active snapshot (host mode: a bind of it).
pub fn upper(mounts: &[snapshotter::Mount]) -> PathBuf {
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    PathBuf::from(&mounts[0].source)
}

/// Commit a layer holding `file` of `size` bytes (non-zero data, written in 1 MiB pieces).
pub fn layer(sn: &Snapshotter, name: &str, size: usize) {
    let key = format!("{name}-active");
    let m = sn.prepare(&key, "", BTreeMap::new()).expect("prepare");
    let mut f = std::fs::File::create(upper(&m).join("file")).unwrap();
    let piece: Vec<u8> = (0..1usize << 20).map(|i| (i * 31 + 7) as u8).collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(piece.len());
        f.write_all(&piece[..n]).unwrap();
        left -= n;
    }
    drop(f);
    sn.commit(name, &key, BTreeMap::new(), "", &Cancel::never())
        .expect("commit");
}

/// Bytes this process has read with read(2)-family calls (`/proc/self/io`, `rchar`).
pub fn read_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("/proc/self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("rchar in /proc/self/io")
}
