//! The benchmark driver behind `bench/differ` (`bench-differ --help`), on the testsuite
//! harness: private containerd 2.1 instances, the local registry, our daemon, full cleanup.
//!
//! Besides the pull times it can also unpack all the images' layers as one stack through our
//! Diff and Snapshots services (`--stack`), sequentially (Prepare on the parent, Apply,
//! Commit: what containerd's unpacker does) and in parallel (parentless Prepares, concurrent
//! Applies, Commits that rebase in order: what containerd with `max_concurrent_unpacks > 1`
//! and the `rebase` capability does, which containerd 2.1 cannot be configured for).
//!
//! Each measurement gets a fresh containerd. Every image is first fetched without
//! unpacking (`ctr content fetch`: content and image record only), then the timed `ctr images pull --plain-http --snapshotter S` finds the content
//! local and only unpacks; `sync` afterwards is timed as well, since our differ makes each
//! layer durable before Apply returns and the others leave dirty pages behind.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use erofs_bench::{DAEMON_ENV, daemon_path, default_work_dir};
use serde_json::json;
use sha2::{Digest, Sha256};
use testsuite::Registry;
use testsuite::oci::{Blob, Compression, LayerBlob, OciArchive};

use testsuite::wired_containerd::{SN, Setup, World, descriptor};

const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A file's sha256 (of its gzip-decompressed content with `gunzip`), cached next to it in
/// `FILE.sha256` or `FILE.diffid` (keyed by size and mtime).
fn file_digest(p: &Path, gunzip: bool) -> Result<String> {
    let md = fs::metadata(p).with_context(|| p.display().to_string())?;
    let stamp = format!(
        "{} {}",
        md.len(),
        md.modified()?
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );
    let ext = if gunzip { "diffid" } else { "sha256" };
    let cache = PathBuf::from(format!("{}.{ext}", p.display()));
    if let Ok(c) = fs::read_to_string(&cache)
        && let Some((s, d)) = c.trim().rsplit_once(' ')
        && s == stamp
    {
        return Ok(d.to_string());
    }
    let file = std::io::BufReader::with_capacity(1 << 20, fs::File::open(p)?);
    let f: Box<dyn Read> = if gunzip {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let d = format!("sha256:{}", testsuite::oci::sha256_reader(f)?);
    fs::write(&cache, format!("{stamp} {d}\n"))?;
    Ok(d)
}

fn put(layout: &Path, data: &[u8], media_type: &str) -> Result<Blob> {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    fs::write(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
        data,
    )?;
    Ok(Blob {
        digest,
        size: data.len() as u64,
        media_type: media_type.into(),
    })
}

/// A single-layer image layout around an existing gzip layer (hard-linked, not copied).
fn image(work: &Path, name: &str, gz: &Path) -> Result<OciArchive> {
    let layout = work.join("layouts").join(name);
    if layout.exists() {
        fs::remove_dir_all(&layout)?;
    }
    fs::create_dir_all(layout.join("blobs/sha256"))?;
    let gz_digest = file_digest(gz, false)?;
    let diff_id = file_digest(gz, true)?;
    let dst = layout
        .join("blobs/sha256")
        .join(gz_digest.trim_start_matches("sha256:"));
    if fs::hard_link(gz, &dst).is_err() {
        fs::copy(gz, &dst)?;
    }
    let layer = LayerBlob {
        blob: Blob {
            digest: gz_digest,
            size: fs::metadata(gz)?.len(),
            media_type: GZ.into(),
        },
        diff_id: diff_id.clone(),
        compression: Compression::Gzip,
    };
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let config = put(
        &layout,
        &serde_json::to_vec(&config)?,
        testsuite::oci::MEDIA_TYPE_CONFIG,
    )?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": testsuite::oci::MEDIA_TYPE_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.blob.descriptor()],
    });
    let manifest = put(
        &layout,
        &serde_json::to_vec(&manifest)?,
        testsuite::oci::MEDIA_TYPE_MANIFEST,
    )?;
    let repo = format!("docker.io/testsuite/bench-{name}");
    Ok(OciArchive {
        path: layout.join("unused.tar"),
        layout_dir: layout,
        name: format!("{repo}:latest"),
        repo,
        tag: "latest".into(),
        manifest,
        config,
        layers: vec![layer],
    })
}

fn sync() {
    let _ = Command::new("sync").status();
}

/// containerd's built-in EROFS snapshotter and differ (mkfs.erofs found on containerd's
/// PATH: bench/differ puts erofs-utils 1.9 there).
const BUILTIN_EROFS: &str = r#"
[plugins."io.containerd.service.v1.diff-service"]
  default = ["erofs", "walking"]
[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "erofs"
    differ = "erofs"
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "overlayfs"
    differ = "walking"
"#;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// One timed unpack of `img` in a fresh containerd set up as `config`: (pull, pull + sync).
fn measure(config: &str, bin: &Path, img: &OciArchive, reference: &str) -> Result<(f64, f64)> {
    let (setup, snapshotter) = match config {
        "ours" | "ours-index" => (
            Setup {
                tar_index: config == "ours-index",
                ..Default::default()
            },
            SN,
        ),
        "erofs" => (
            Setup {
                reference_toml: Some(BUILTIN_EROFS.into()),
                ..Default::default()
            },
            "erofs",
        ),
        "overlayfs" => (
            Setup {
                reference_toml: Some(String::new()),
                ..Default::default()
            },
            "overlayfs",
        ),
        other => bail!("unknown configuration {other:?}"),
    };
    let w = World::start(
        bin,
        Setup {
            ctr_timeout: Some(Duration::from_secs(3600)),
            ..setup
        },
    )?;
    // Content and image record only (client.Fetch, no unpack).
    w.ctd
        .ctr_ok(&["content", "fetch", "--plain-http", reference])?;
    sync();
    let t = Instant::now();
    w.ctd.pull_plain_http_unchecked(reference, snapshotter)?;
    let pull = t.elapsed().as_secs_f64();
    sync();
    let all = t.elapsed().as_secs_f64();
    // It really unpacked, with the differ we meant.
    let chain = &img.layers[0].diff_id;
    let listed = w.ctd.snapshots(snapshotter, &["ls"])?;
    ensure!(
        String::from_utf8_lossy(&listed.stdout).contains(chain.as_str()),
        "{config}: {chain} not unpacked"
    );
    match config {
        "erofs" => {
            let root = w.ctd.root().join("io.containerd.snapshotter.v1.erofs");
            let found = Command::new("find")
                .arg(&root)
                .args(["-name", "layer.erofs"])
                .output()?;
            ensure!(
                !found.stdout.is_empty(),
                "the built-in erofs snapshotter has no layer.erofs: walking differ?"
            );
        }
        "ours" | "ours-index" => {
            ensure!(
                w.applied().iter().any(|a| &a.diff_id == chain),
                "our differ did not apply {chain}"
            );
        }
        _ => {}
    }
    Ok((pull, all))
}

/// One timed unpack of every image's layer as one stack through our daemon's gRPC services,
/// in a fresh world: (unpack, unpack + sync).
fn measure_stack(
    bin: &Path,
    images: &[OciArchive],
    refs: &[String],
    parallel: bool,
) -> Result<(f64, f64)> {
    let w = World::start(
        bin,
        Setup {
            ctr_timeout: Some(Duration::from_secs(3600)),
            ..Default::default()
        },
    )?;
    for reference in refs {
        w.ctd
            .ctr_ok(&["content", "fetch", "--plain-http", reference])?;
    }
    let layers: Vec<&testsuite::oci::LayerBlob> =
        images.iter().flat_map(|i| i.layers.iter()).collect();
    let chains =
        testsuite::oci::chain_ids(&layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>());
    let g = w.grpc()?;
    let mode = if parallel { "par" } else { "seq" };
    sync();
    let t = Instant::now();
    w.block_on(async {
        let mut parent = String::new();
        if parallel {
            let mut tasks = Vec::new();
            for (i, l) in layers.iter().enumerate() {
                let g = g.clone();
                let key = format!("bench/{mode}/extract-{i}");
                let desc = descriptor(&l.blob.media_type, &l.blob.digest, l.blob.size);
                tasks.push(tokio::spawn(async move {
                    let m = g.prepare(&key, "").await?;
                    let d = g.apply(&desc, &m).await?;
                    Ok::<_, tonic::Status>((key, d))
                }));
            }
            for (i, task) in tasks.into_iter().enumerate() {
                let (key, d) = task.await.context("apply task")??;
                ensure!(
                    d.digest == layers[i].diff_id,
                    "layer {i}: diffID {}",
                    d.digest
                );
                let name = format!("bench/{mode}/{}", chains[i]);
                g.commit_with(&name, &key, Default::default(), &parent)
                    .await?;
                parent = name;
            }
        } else {
            for (i, l) in layers.iter().enumerate() {
                let key = format!("bench/{mode}/extract-{i}");
                let desc = descriptor(&l.blob.media_type, &l.blob.digest, l.blob.size);
                let m = g.prepare(&key, &parent).await?;
                let d = g.apply(&desc, &m).await?;
                ensure!(d.digest == l.diff_id, "layer {i}: diffID {}", d.digest);
                let name = format!("bench/{mode}/{}", chains[i]);
                g.commit(&name, &key).await?;
                parent = name;
            }
        }
        Ok(())
    })?;
    let unpack = t.elapsed().as_secs_f64();
    sync();
    Ok((unpack, t.elapsed().as_secs_f64()))
}

/// Unpack time of single-layer gzip images pulled from a local registry by containerd 2.1,
/// with our proxy snapshotter and differ (full layers, and `enable_tar_index`) against
/// containerd's built-in erofs and overlayfs setups.
///
/// Each measurement is a fresh containerd: the image's content is fetched first (untimed),
/// then `ctr images pull` only unpacks; `sync` afterwards is timed too. Runs are interleaved
/// across configurations. Results go to --out, one line per image and configuration:
/// `image config pull pull+sync min_pull min_pull+sync` (seconds; medians, then minimums),
/// and with --stack the lines `stack ours-seq ...` and `stack ours-par ...`. Progress goes
/// to stderr. Needs root; bench/differ runs it and prints the tables.
#[derive(Debug, Parser)]
#[command(name = "bench-differ", version)]
struct Args {
    /// Images as NAME=LAYER.tar.gz, comma-separated (the diffID is computed from the blob and
    /// cached next to it)
    #[arg(long, value_name = "LIST", env = "BENCH_IMAGES", required = true)]
    images: String,
    /// The erofs-snapshotter binary to benchmark [default: the one next to this executable]
    #[arg(long, value_name = "PATH", env = DAEMON_ENV)]
    daemon: Option<PathBuf>,
    /// File the result lines are appended to
    #[arg(long, value_name = "FILE", env = "BENCH_OUT")]
    out: PathBuf,
    /// Configurations, comma-separated: a subset of ours,ours-index,erofs,overlayfs
    #[arg(
        long,
        value_name = "LIST",
        env = "BENCH_CONFIGS",
        default_value = "ours,ours-index,erofs,overlayfs"
    )]
    configs: String,
    /// Timed pulls per image and configuration
    #[arg(long, short = 'n', value_name = "N", env = "BENCH_RUNS", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Scratch directory for the images' OCI layouts [default: bench/work]
    #[arg(long, value_name = "DIR", env = "BENCH_WORK")]
    work: Option<PathBuf>,
    /// Also unpack all the images' layers as one stack through our daemon, sequentially and
    /// in parallel (needs two images or more)
    #[arg(long)]
    stack: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = daemon_path(args.daemon)?;
    let spec = args.images;
    let out_path = args.out;
    let configs = args.configs;
    let runs = args.runs as usize;
    let work = args.work.unwrap_or_else(default_work_dir);
    let mut images = Vec::new();
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        let (name, gz) = item.split_once('=').context("name=LAYER.tar.gz")?;
        let t = Instant::now();
        images.push(image(&work, name, Path::new(gz))?);
        eprintln!("{name}: digests in {:.1?}", t.elapsed());
    }
    let reg = Registry::start()?;
    let mut refs = Vec::new();
    for img in &images {
        let t = Instant::now();
        refs.push(reg.push_image(img)?);
        eprintln!("pushed {} in {:.1?}", img.name, t.elapsed());
    }
    let mut out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out_path)?;
    let configs: Vec<&str> = configs.split(',').filter(|s| !s.is_empty()).collect();
    // Runs are interleaved (each run measures every image in every configuration) so that
    // load from elsewhere on the machine spreads over all configurations.
    let mut results: std::collections::BTreeMap<(usize, usize), (Vec<f64>, Vec<f64>)> =
        Default::default();
    for run in 0..runs {
        for (ii, (img, reference)) in images.iter().zip(&refs).enumerate() {
            for (ci, config) in configs.iter().enumerate() {
                let (pull, all) = measure(config, &bin, img, reference)?;
                let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
                eprintln!(
                    "run {run}: {config} {}: pull {pull:.2}s, pull+sync {all:.2}s (loadavg {})",
                    img.name,
                    load.split_whitespace()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                let e = results.entry((ii, ci)).or_default();
                e.0.push(pull);
                e.1.push(all);
            }
        }
    }
    let stack = args.stack && images.len() > 1;
    let mut stacked: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    if stack {
        for run in 0..runs {
            for (k, parallel) in [false, true].into_iter().enumerate() {
                let (unpack, all) = measure_stack(&bin, &images, &refs, parallel)?;
                eprintln!(
                    "run {run}: stack of {} layers, {}: unpack {unpack:.2}s, unpack+sync {all:.2}s",
                    images.len(),
                    if parallel { "parallel" } else { "sequential" }
                );
                stacked[k].0.push(unpack);
                stacked[k].1.push(all);
            }
        }
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    if stack {
        for (k, (unpack, durable)) in stacked.iter().enumerate() {
            writeln!(
                out,
                "stack {} {:.3} {:.3} {:.3} {:.3}",
                ["ours-seq", "ours-par"][k],
                median(unpack.clone()),
                median(durable.clone()),
                min(unpack),
                min(durable)
            )?;
        }
    }
    for ((ii, ci), (pulls, durable)) in results {
        let name = images[ii].repo.rsplit('/').next().unwrap_or_default();
        let name = name.trim_start_matches("bench-");
        writeln!(
            out,
            "{name} {} {:.3} {:.3} {:.3} {:.3}",
            configs[ci],
            median(pulls.clone()),
            median(durable.clone()),
            min(&pulls),
            min(&durable)
        )?;
    }
    out.flush()?;
    Ok(())
}
