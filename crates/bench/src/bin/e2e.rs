//! The end-to-end unpack benchmark behind `bench/e2e` (`bench-e2e --help`): one two-layer image (`debian.tar.gz` + `python.tar.gz` from `bench/datasets.sh`)
//! imported through containerd 2.1 with
//!
//! - (a) our proxy snapshotter + proxy differ (`erofs-rs`, `erofs-rs-diff`),
//! - (b) containerd's built-in `overlayfs` snapshotter with the walking differ,
//! - (c) containerd's built-in `erofs` snapshotter with the walking differ (it runs
//!   `mkfs.erofs` at Commit; `bench/e2e` puts erofs-utils 1.9 first on containerd's `PATH`),
//!
//! each on a fresh containerd (and daemon), page cache dropped before each import. Measured:
//! `ctr images import` (content ingestion + unpack), the same with `--no-unpack` (ingestion
//! only; the difference is the unpack), the first `ctr run --rm IMAGE ID /bin/true` after the
//! import and the following ones, and the disk space of the snapshotter root. Medians.
//!

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;

use clap::Parser;
use erofs_bench::{DAEMON_ENV, daemon_path, default_work_dir};
use testsuite::proxied_containerd::{self as env, Env, EnvOpts, SN};
use testsuite::{Containerd, ContainerdOpts, UnpackConfig, Version, unique_name};

const REPO: &str = "docker.io/bench/debian-python";
const IMAGE: &str = "docker.io/bench/debian-python:latest";

/// The image archive built from the datasets, and facts about it.
struct BenchImage {
    archive: PathBuf,
    compressed: u64,
    uncompressed: u64,
}

fn sha256_hex(path: &Path) -> Result<String> {
    env::sha256_file(path)
}

/// Builds (or reuses) `out/debian-python.tar`: an OCI image layout with the two gzip
/// datasets as layers, bottom first.
fn bench_image(work: &Path, out: &Path) -> Result<BenchImage> {
    let layers: Vec<(PathBuf, PathBuf)> = ["debian", "python"]
        .iter()
        .map(|n| {
            (
                work.join(format!("{n}.tar")),
                work.join(format!("{n}.tar.gz")),
            )
        })
        .collect();
    for (t, g) in &layers {
        ensure!(
            t.is_file() && g.is_file(),
            "{} or {} is missing: run bench/datasets.sh",
            t.display(),
            g.display()
        );
    }
    let compressed = layers
        .iter()
        .map(|(_, g)| g.metadata().map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    let uncompressed = layers
        .iter()
        .map(|(t, _)| t.metadata().map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    fs::create_dir_all(out)?;
    let archive = out.join("debian-python.tar");
    let newest_input = layers
        .iter()
        .flat_map(|(t, g)| [t, g])
        .map(|p| p.metadata().and_then(|m| m.modified()))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .max()
        .context("no inputs")?;
    if archive
        .metadata()
        .and_then(|m| m.modified())
        .is_ok_and(|t| t > newest_input)
    {
        return Ok(BenchImage {
            archive,
            compressed,
            uncompressed,
        });
    }
    println!("building {} ...", archive.display());
    let layout = out.join("debian-python.oci");
    if layout.exists() {
        fs::remove_dir_all(&layout)?;
    }
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, gz) in &layers {
        let digest = sha256_hex(gz)?;
        let dst = blobs.join(&digest);
        if fs::hard_link(gz, &dst).is_err() {
            fs::copy(gz, &dst)?;
        }
        descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{digest}"),
            "size": gz.metadata()?.len(),
        }));
        diff_ids.push(format!("sha256:{}", sha256_hex(tar)?));
    }
    let write_blob = |data: &[u8]| -> Result<serde_json::Value> {
        let digest = testsuite::oci::sha256_digest(data);
        fs::write(blobs.join(digest.trim_start_matches("sha256:")), data)?;
        Ok(json!({"digest": digest, "size": data.len()}))
    };
    let config = json!({
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let mut cdesc = write_blob(&serde_json::to_vec(&config)?)?;
    cdesc["mediaType"] = json!(testsuite::oci::MEDIA_TYPE_CONFIG);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": testsuite::oci::MEDIA_TYPE_MANIFEST,
        "config": cdesc,
        "layers": descs,
    });
    let mut mdesc = write_blob(&serde_json::to_vec(&manifest)?)?;
    mdesc["mediaType"] = json!(testsuite::oci::MEDIA_TYPE_MANIFEST);
    mdesc["platform"] = json!({"architecture": "amd64", "os": "linux"});
    mdesc["annotations"] = json!({
        testsuite::oci::ANNOTATION_REF_NAME: IMAGE,
        testsuite::oci::ANNOTATION_CONTAINERD_NAME: IMAGE,
    });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": testsuite::oci::MEDIA_TYPE_INDEX,
        "manifests": [mdesc],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let tmp = out.join("debian-python.tar.tmp");
    let st = Command::new("tar")
        .arg("--format=posix")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tmp)
        .args(["oci-layout", "index.json", "blobs"])
        .status()?;
    ensure!(st.success(), "tar of the image layout failed");
    fs::rename(&tmp, &archive)?;
    fs::remove_dir_all(&layout)?;
    Ok(BenchImage {
        archive,
        compressed,
        uncompressed,
    })
}

/// What is benchmarked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// Content ingestion only (`--no-unpack`), on a plain containerd.
    ContentOnly,
    /// Our proxy snapshotter and differ.
    Ours,
    /// Built-in overlayfs + walking.
    Overlayfs,
    /// Built-in erofs + walking.
    BuiltinErofs,
}

impl Setup {
    fn label(self) -> &'static str {
        match self {
            Setup::ContentOnly => "content only (--no-unpack)",
            Setup::Ours => "(a) erofs-rs proxy + differ",
            Setup::Overlayfs => "(b) overlayfs + walking",
            Setup::BuiltinErofs => "(c) built-in erofs + walking",
        }
    }

    fn snapshotter(self) -> &'static str {
        match self {
            Setup::Ours => SN,
            Setup::BuiltinErofs => "erofs",
            Setup::ContentOnly | Setup::Overlayfs => "overlayfs",
        }
    }
}

/// One containerd (with our daemon for [`Setup::Ours`]).
enum Instance {
    Ours(Box<Env>),
    Plain(Box<Containerd>),
}

impl Instance {
    fn start(setup: Setup, daemon: &Path) -> Result<Instance> {
        Ok(match setup {
            Setup::Ours => Instance::Ours(Box::new(Env::start_opts(
                daemon,
                Version::V2_1,
                EnvOpts {
                    containerd_log_level: Some("info".into()),
                    ctr_timeout: Some(Duration::from_secs(1800)),
                    ..EnvOpts::default()
                },
            )?)),
            _ => {
                let mut o = ContainerdOpts::new(Version::V2_1);
                // Debug logging costs time on the paths measured here.
                o.log_level = "info".into();
                if setup == Setup::BuiltinErofs {
                    o = o.unpack(UnpackConfig::new("erofs", Some("walking")));
                }
                o.ctr_timeout = Duration::from_secs(1800);
                Instance::Plain(Box::new(Containerd::start(o)?))
            }
        })
    }

    fn ctd(&self) -> &Containerd {
        match self {
            Instance::Ours(e) => &e.ctd,
            Instance::Plain(c) => c,
        }
    }

    /// The snapshotter's root directory.
    fn snapshot_root(&self, setup: Setup) -> PathBuf {
        match self {
            Instance::Ours(e) => e.root.clone(),
            Instance::Plain(c) => c.root().join(format!(
                "io.containerd.snapshotter.v1.{}",
                setup.snapshotter()
            )),
        }
    }
}

fn drop_caches(warm: &Path) -> Result<()> {
    rustix::fs::sync();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    // The archive in the page cache, the snapshotter's output cold: what an unpack sees
    // after a pull.
    let mut f = fs::File::open(warm)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

fn timed(ctd: &Containerd, args: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    let out = ctd.ctr(args)?;
    let d = t.elapsed();
    ctd.check(&out, &format!("ctr {}", args.join(" ")))?;
    Ok(d)
}

/// Allocated bytes below `dir` on its own filesystem (`du -sx`: layer mounts not entered).
fn disk_usage(dir: &Path) -> Result<u64> {
    let out = Command::new("du").arg("-sxk").arg(dir).output()?;
    ensure!(out.status.success(), "du {}", dir.display());
    let s = String::from_utf8_lossy(&out.stdout);
    let kb: u64 = s.split_whitespace().next().context("du output")?.parse()?;
    Ok(kb * 1024)
}

#[derive(Debug, Default, Clone)]
struct Samples {
    import: Vec<f64>,
    first: Vec<f64>,
    warm: Vec<f64>,
    disk: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn measure(
    setup: Setup,
    img: &BenchImage,
    runs: usize,
    starts: usize,
    daemon: &Path,
) -> Result<Samples> {
    let mut s = Samples::default();
    for r in 0..runs {
        let inst = Instance::start(setup, daemon)?;
        let ctd = inst.ctd();
        let archive = img.archive.to_string_lossy().into_owned();
        let mut args = vec![
            "images",
            "import",
            "--base-name",
            REPO,
            "--snapshotter",
            setup.snapshotter(),
        ];
        if setup == Setup::ContentOnly {
            args.push("--no-unpack");
        }
        args.push(&archive);
        drop_caches(&img.archive)?;
        let d = timed(ctd, &args)?;
        s.import.push(d.as_secs_f64());
        if setup == Setup::ContentOnly {
            println!(
                "  {:<30} run {}: import {:.2}s",
                setup.label(),
                r + 1,
                d.as_secs_f64()
            );
            continue;
        }
        rustix::fs::sync();
        s.disk.push(disk_usage(&inst.snapshot_root(setup))? as f64);
        let run = |ctd: &Containerd| -> Result<Duration> {
            let id = unique_name("bench");
            let cgroup = format!("{}/{id}", ctd.cgroup_parent());
            timed(
                ctd,
                &[
                    "run",
                    "--rm",
                    "--snapshotter",
                    setup.snapshotter(),
                    "--cgroup",
                    &cgroup,
                    IMAGE,
                    &id,
                    "/bin/true",
                ],
            )
        };
        let first = run(ctd)?;
        s.first.push(first.as_secs_f64());
        let mut warm = Vec::new();
        for _ in 0..starts {
            warm.push(run(ctd)?.as_secs_f64());
        }
        println!(
            "  {:<30} run {}: import {:.2}s, first start {:.3}s, warm starts {:.3}s (median of {})",
            setup.label(),
            r + 1,
            d.as_secs_f64(),
            first.as_secs_f64(),
            median(&warm),
            warm.len()
        );
        s.warm.extend(warm);
        if let Instance::Ours(e) = &inst {
            let ok = e.run(
                IMAGE,
                &[
                    "/bin/sh",
                    "-c",
                    "test -d /venv/lib && test -f /etc/debian_version && echo ok",
                ],
            )?;
            ensure!(
                ok == "ok\n",
                "the image does not look right through erofs-rs: {ok}"
            );
        }
    }
    Ok(s)
}

/// Import time of one two-layer image (debian.tar.gz + python.tar.gz from bench/datasets.sh,
/// gzip) through containerd 2.1 with our proxy snapshotter and differ, against containerd's
/// built-in overlayfs and erofs snapshotters (walking differ).
///
/// Each import runs on a fresh containerd (and daemon), page cache dropped first. Reports
/// medians of import+unpack time (and the unpack part: minus a --no-unpack import), the first
/// and the following `ctr run --rm IMAGE ID /bin/true` times, the snapshotter's disk use, and
/// ratios reference/ours. Needs root and containerd 2.1 (scripts/setup); bench/e2e runs it.
#[derive(Debug, Parser)]
#[command(name = "bench-e2e", version)]
struct Args {
    /// The erofs-snapshotter binary to benchmark [default: the one next to this executable]
    #[arg(long, value_name = "PATH", env = DAEMON_ENV)]
    daemon: Option<PathBuf>,
    /// Directory with debian.tar.gz and python.tar.gz (bench/datasets.sh); the image archive
    /// is built in its e2e/ subdirectory [default: bench/work]
    #[arg(long, value_name = "DIR", env = "BENCH_WORK")]
    work: Option<PathBuf>,
    /// Imports per setup
    #[arg(long, short = 'n', value_name = "N", env = "BENCH_RUNS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Warm `ctr run`s after each import
    #[arg(long, value_name = "N", env = "BENCH_STARTS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    starts: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let daemon = daemon_path(args.daemon)?;
    let work = args.work.unwrap_or_else(default_work_dir);
    let work = fs::canonicalize(&work).with_context(|| work.display().to_string())?;
    let runs = args.runs as usize;
    let starts = args.starts as usize;
    if !Version::V2_1.available() {
        bail!("containerd 2.1 is not installed (scripts/setup)");
    }
    let mkfs = Version::V2_1.bin_dir().join("mkfs.erofs");
    let img = bench_image(&work, &work.join("e2e"))?;
    println!(
        "image: debian + python, 2 gzip layers, {} MB compressed, {} MB uncompressed; {} imports per setup, {} warm starts each",
        img.compressed >> 20,
        img.uncompressed >> 20,
        runs,
        starts
    );
    println!(
        "containerd 2.1 ({}), daemon {}, built-in erofs uses {}",
        Version::V2_1.containerd().display(),
        daemon.display(),
        if mkfs.exists() {
            mkfs.display().to_string()
        } else {
            "mkfs.erofs from PATH".into()
        }
    );
    let setups = [
        Setup::ContentOnly,
        Setup::Ours,
        Setup::Overlayfs,
        Setup::BuiltinErofs,
    ];
    let mut results = Vec::new();
    for s in setups {
        results.push((s, measure(s, &img, runs, starts, &daemon)?));
    }
    let content = median(&results[0].1.import);
    println!();
    println!(
        "{:<30} {:>14} {:>10} {:>12} {:>12} {:>10}",
        "setup (containerd 2.1)", "import+unpack", "unpack*", "first start", "warm start", "disk"
    );
    for (s, r) in &results {
        if *s == Setup::ContentOnly {
            println!("{:<30} {:>13.2}s", s.label(), content);
            continue;
        }
        let imp = median(&r.import);
        println!(
            "{:<30} {:>13.2}s {:>9.2}s {:>11.3}s {:>11.3}s {:>8}MB",
            s.label(),
            imp,
            imp - content,
            median(&r.first),
            median(&r.warm),
            (median(&r.disk) as u64) >> 20
        );
    }
    println!("* unpack = import+unpack - content only (medians)");
    println!();
    println!("ratios, reference / ours (above 1: erofs-rs is faster):");
    println!(
        "{:<30} {:>14} {:>10} {:>12} {:>12}",
        "reference", "import+unpack", "unpack", "first start", "warm start"
    );
    let ours = &results[1].1;
    let o = (
        median(&ours.import),
        median(&ours.import) - content,
        median(&ours.first),
        median(&ours.warm),
    );
    for (s, r) in &results[2..] {
        let t = (
            median(&r.import),
            median(&r.import) - content,
            median(&r.first),
            median(&r.warm),
        );
        println!(
            "{:<30} {:>13.2}x {:>9.2}x {:>11.2}x {:>11.2}x",
            s.label(),
            t.0 / o.0,
            t.1 / o.1,
            t.2 / o.2,
            t.3 / o.3
        );
    }
    Ok(())
}
