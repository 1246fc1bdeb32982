//! Unpack with registry layer artifacts against computing them (issue 15's benchmark), run by
//! `bench/artifacts`: one gzip layer per dataset (python.tar.gz, >20k files; big.tar.gz, the
//! torch venv) pushed as a one-layer image to a local `docker-registry`, its artifacts built
//! and pushed by `erofs-snapshotter artifacts build|push`, then unpacked the way containerd's
//! unpacker does it (Prepare, Diff.Apply with the image named in the descriptor's
//! annotations, Commit) by three daemons: tar index alone, tar index + dm-verity tree
//! computed, and the same with `[artifacts]` on. Runs interleaved, page cache dropped before
//! each with the input read back in, medians.
//!
//! This host has no dm-verity, so the artifacts daemon runs with `dmverity_mode = "auto"`:
//! the fetched tree is checked in full (recomputed), which is no cheaper than building it;
//! the cheap check (`root-only`, with a signed root and `dmverity_mode = "on"`) needs a
//! kernel that then checks every read. The tree's part of Apply is therefore also timed
//! alone, on the layer file the differ wrote: computing the tree, installing a fetched tree
//! with the full check, and with the root-only check.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use containerd_api::containerd::types::Descriptor;
use erofs_bench::{
    DAEMON_ENV, daemon_path, default_work_dir, drop_caches, median, sha256_digest_of_file, warm,
};
use erofs_registry::artifacts::{ArtifactSet, MEDIA_TYPE_OCI_MANIFEST};
use erofs_registry::client::{Client, ClientOptions};
use snapshotter::integrity::dmverity::{FetchedTree, TreeBytes, TreeCheck};
use testsuite::Registry;
use testsuite::daemon_env::{Cfg, Env};

/// Unpack time with layer artifacts fetched from a registry against computing them.
///
/// Three daemons (tar index; tar index + dm-verity tree; the same with [artifacts] on) unpack
/// each dataset's gzip layer through the Diff service, runs interleaved, caches dropped
/// before each. Then the tree's part alone: compute, fetched with the full check, fetched
/// with the root-only check. Per-run times go to stderr, the tables to stdout. Needs root.
#[derive(Debug, Parser)]
#[command(name = "bench-artifacts", version)]
struct Args {
    /// The erofs-snapshotter binary to benchmark [default: the one next to this executable]
    #[arg(long, value_name = "PATH", env = DAEMON_ENV)]
    daemon: Option<PathBuf>,
    /// Directory with the datasets (bench/datasets.sh, bench/bigimage.sh) [default: bench/work]
    #[arg(long, value_name = "DIR", env = "BENCH_WORK")]
    work: Option<PathBuf>,
    /// Datasets (NAME.tar.gz in the work directory), comma-separated
    #[arg(
        long,
        value_name = "LIST",
        env = "BENCH_DATASETS",
        default_value = "python,big",
        value_delimiter = ','
    )]
    datasets: Vec<String>,
    /// Runs per daemon and dataset (medians and minimums are reported)
    #[arg(long, short = 'n', value_name = "N", env = "BENCH_RUNS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
}

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// One dataset as an image in the registry, with its artifacts.
struct Image {
    name: String,
    file: PathBuf,
    desc: Descriptor,
    set: ArtifactSet,
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let daemon = daemon_path(args.daemon)?;
    ensure!(
        rustix::process::geteuid().is_root(),
        "bench-artifacts needs root (it mounts)"
    );
    let work = args.work.unwrap_or_else(default_work_dir);
    let scratch = work.join("artifacts");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    let reg = Registry::start()?;
    let key = erofs_registry::signature::SecretKey::generate()?;
    let key_file = scratch.join("signing.key");
    let pub_file = scratch.join("trusted.pub");
    fs::write(&key_file, key.to_text())?;
    fs::write(&pub_file, key.public().to_text())?;
    let mut images = Vec::new();
    for name in &args.datasets {
        let file = work.join(format!("{name}.tar.gz"));
        ensure!(
            file.exists(),
            "{} is missing: run bench/datasets.sh and bench/bigimage.sh",
            file.display()
        );
        images.push(prepare(&daemon, &reg, &scratch, name, &file, &key_file)?);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(unpack(
        &daemon,
        &scratch,
        &pub_file,
        &images,
        args.runs as usize,
    ))?;
    tree_part(&images, args.runs as usize)
}

/// Push `file` as image `bench/NAME:1` (layer, config, manifest) and build and push its
/// artifacts with the CLI, signed with `key`.
fn prepare(
    daemon: &Path,
    reg: &Registry,
    scratch: &Path,
    name: &str,
    file: &Path,
    key: &Path,
) -> Result<Image> {
    let digest = sha256_digest_of_file(file)?;
    let size = fs::metadata(file)?.len();
    let diff_id = diff_id(file)?;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "config": {}
    }))?;
    let config_digest = testsuite::oci::sha256_digest(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": GZIP, "digest": digest, "size": size}]
    }))?;
    let manifest_digest = testsuite::oci::sha256_digest(&manifest);

    // An OCI layout for `artifacts build`, the layer hard-linked (or copied) in.
    let layout = scratch.join(name).join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
    let link = blobs.join(hex(&digest));
    if fs::hard_link(file, &link).is_err() {
        fs::copy(file, &link)?;
    }
    fs::write(blobs.join(hex(&config_digest)), &config)?;
    fs::write(blobs.join(hex(&manifest_digest)), &manifest)?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": manifest_digest,
                           "size": manifest.len()}]
        }))?,
    )?;

    let repo = format!("bench/{name}");
    let c = Client::new(
        &format!("http://{}", reg.host()),
        ClientOptions {
            io_timeout: Duration::from_secs(300),
            ..ClientOptions::default()
        },
    )?;
    c.put_blob_file(&repo, &digest, &fs::File::open(file)?, size)?;
    c.put_blob(&repo, &config_digest, &config)?;
    c.put_manifest(&repo, "1", MEDIA_TYPE_OCI_MANIFEST, &manifest)?;

    let out = scratch.join(name).join("out");
    let t = Instant::now();
    cli(
        daemon,
        &[
            "artifacts".as_ref(),
            "build".as_ref(),
            layout.as_os_str(),
            out.as_os_str(),
            "--sign-key".as_ref(),
            key.as_os_str(),
        ],
    )?;
    let built = t.elapsed();
    let reference = format!("{}/{repo}:1", reg.host());
    let t = Instant::now();
    cli(
        daemon,
        &[
            "artifacts".as_ref(),
            "push".as_ref(),
            "--plain-http".as_ref(),
            out.as_os_str(),
            reference.as_ref(),
        ],
    )?;
    eprintln!(
        "{name}: artifacts built in {:.2}s, pushed in {:.2}s",
        built.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    let set = ArtifactSet::parse(&fs::read(out.join("manifest.json"))?)?;
    let mut desc = Descriptor {
        media_type: GZIP.into(),
        digest,
        size: size as i64,
        annotations: Default::default(),
    };
    desc.annotations.insert(
        "containerd.io/snapshot/cri.image-ref".into(),
        reference.clone(),
    );
    desc.annotations.insert(
        "containerd.io/snapshot/cri.manifest-digest".into(),
        manifest_digest,
    );
    Ok(Image {
        name: name.into(),
        file: file.into(),
        desc,
        set,
        out,
    })
}

/// `sha256:` of the decompressed layer (cached next to it).
fn diff_id(file: &Path) -> Result<String> {
    let cache = file.with_extension("gz.diffid");
    let meta = fs::metadata(file)?;
    if let Ok(t) = fs::read_to_string(&cache)
        && let Some((len, id)) = t.trim().split_once(' ')
        && len == meta.len().to_string()
    {
        return Ok(id.to_string());
    }
    let mut d = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(fs::File::open(file)?));
    let id = format!(
        "sha256:{}",
        testsuite::oci::sha256_reader(&mut d as &mut dyn Read)?
    );
    fs::write(&cache, format!("{} {id}\n", meta.len()))?;
    Ok(id)
}

fn cli(daemon: &Path, args: &[&std::ffi::OsStr]) -> Result<()> {
    let o = Command::new(daemon).args(args).output()?;
    ensure!(
        o.status.success(),
        "{} {args:?}: {}{}",
        daemon.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

async fn unpack(
    daemon: &Path,
    scratch: &Path,
    trusted: &Path,
    images: &[Image],
    runs: usize,
) -> Result<()> {
    let hosts = scratch.join("certs.d");
    fs::create_dir_all(&hosts)?;
    let index = Cfg::new().df("enable_tar_index = true");
    let tree = index.clone().df("enable_dmverity = true");
    let fetched = tree
        .clone()
        .section("artifacts", "enabled = true")
        .section("artifacts", &format!("hosts_dir = {hosts:?}"))
        .section("artifacts", "fetch_timeout = \"300s\"")
        .section("artifacts", "max_blob_size = \"2GiB\"")
        .section("artifacts", &format!("trusted_keys = [{trusted:?}]"));
    let configs = [
        ("tar index", index),
        ("index + tree computed", tree),
        ("index + tree fetched", fetched),
    ];
    let mut envs = Vec::new();
    for (name, cfg) in &configs {
        let mut env = Env::new(daemon, cfg.clone())?;
        env.start()
            .await
            .with_context(|| format!("daemon for {name}"))?;
        for im in images {
            let link = env
                .content
                .join("blobs/sha256")
                .join(im.desc.digest.trim_start_matches("sha256:"));
            std::os::unix::fs::symlink(fs::canonicalize(&im.file)?, link)?;
        }
        envs.push(env);
    }
    // times[config][image]
    let mut times = vec![vec![Vec::new(); images.len()]; configs.len()];
    for run in 0..runs {
        for (ii, im) in images.iter().enumerate() {
            for (ci, env) in envs.iter().enumerate() {
                let key = format!("bench/{run}/{}/active", im.name);
                let name = format!("bench/{run}/{}", im.name);
                drop_caches();
                warm(&im.file)?;
                let t0 = Instant::now();
                let mounts = env.c().prepare(&key, "").await?;
                env.c().apply(&im.desc, &mounts).await?;
                env.c().commit(&name, &key).await?;
                let dt = t0.elapsed();
                times[ci][ii].push(dt);
                if ci == 0 && run == 0 {
                    // The differ's [index][tar], for the tree's part alone.
                    let id = env.id_of_mounts(&mounts)?;
                    let data = scratch.join(&im.name).join("layer.data");
                    fs::copy(env.layer(id), &data)?;
                }
                env.c().remove(&name).await?;
                eprintln!(
                    "run {run} {:<7} {:<22} unpack {:>7.3}s",
                    im.name,
                    configs[ci].0,
                    dt.as_secs_f64()
                );
            }
        }
    }
    // Every unpack of the artifacts daemon used them.
    let log = envs[2].log_text();
    for im in images {
        let used = log
            .lines()
            .filter(|l| l.contains(&im.desc.digest) && l.contains("used layer artifacts"))
            .count();
        if used != runs {
            bail!(
                "{}: {used} of {runs} unpacks used the fetched artifacts:\n{}",
                im.name,
                envs[2].log_tail(30)
            );
        }
    }
    println!(
        "\nUnpack through the Diff service (Prepare + Apply + Commit), {runs} runs per cell, \
         artifacts used in every fetched run (full tree check: this host has no dm-verity)\n"
    );
    println!(
        "{:<8} {:<24} {:>9} {:>9} {:>12}",
        "dataset", "daemon", "median", "min", "vs computed"
    );
    for (ii, im) in images.iter().enumerate() {
        let base = median(&mut times[1][ii]).as_secs_f64();
        for (ci, (name, _)) in configs.iter().enumerate() {
            let t = median(&mut times[ci][ii]).as_secs_f64();
            let tmin = times[ci][ii].iter().min().copied().unwrap_or_default();
            println!(
                "{:<8} {:<24} {:>8.3}s {:>8.3}s {:>11.2}x",
                im.name,
                name,
                t,
                tmin.as_secs_f64(),
                base / t
            );
        }
    }
    for mut env in envs {
        env.stop()?;
    }
    Ok(())
}

/// The tree's part of Apply alone, on the differ's `[index][tar]`: compute the tree, or
/// install the fetched one with the full or the root-only check.
fn tree_part(images: &[Image], runs: usize) -> Result<()> {
    println!(
        "\nThe dm-verity tree's part of Apply alone (on the layer file the differ wrote, \
         page cache warm), {runs} runs\n"
    );
    println!(
        "{:<8} {:>10} {:>14} {:>10} {:>14} {:>16}",
        "dataset", "layer MB", "compute", "full check", "root-only", "compute/root-only"
    );
    for im in images {
        let data = im.out.parent().context("no dir")?.join("layer.data");
        let len = fs::metadata(&data)?.len();
        let l = &im.set.layers[0];
        let t = l.dmverity.as_ref().context("no tree in the artifacts")?;
        let tree = FetchedTree {
            bytes: TreeBytes::Mem(fs::read(
                im.out
                    .join("blobs/sha256")
                    .join(t.descriptor.digest.trim_start_matches("sha256:")),
            )?),
            roothash: t.root_digest.clone(),
            block_size: t.block_size,
            hash_offset: t.hash_offset,
        };
        let reset = || -> Result<()> {
            fs::OpenOptions::new()
                .write(true)
                .open(&data)?
                .set_len(len)?;
            Ok(())
        };
        warm(&data)?;
        let (mut compute, mut full, mut root) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            reset()?;
            let t0 = Instant::now();
            let m = snapshotter::integrity::dmverity::append_tree(&data, true, None)?;
            compute.push(t0.elapsed());
            ensure!(m.roothash == tree.roothash, "the computed root differs");
            for (check, v) in [
                (TreeCheck::Full, &mut full),
                (TreeCheck::TreeOnly, &mut root),
            ] {
                reset()?;
                let t0 = Instant::now();
                let r = snapshotter::integrity::dmverity::install_fetched(
                    &data, &tree, check, true, None,
                )?;
                v.push(t0.elapsed());
                if let Err(why) = r {
                    bail!(
                        "{}: the fetched tree failed the {check:?} check: {why}",
                        im.name
                    );
                }
            }
        }
        reset()?;
        let (c, f, r) = (median(&mut compute), median(&mut full), median(&mut root));
        println!(
            "{:<8} {:>10} {:>13.3}s {:>9.3}s {:>13.3}s {:>15.1}x",
            im.name,
            len >> 20,
            c.as_secs_f64(),
            f.as_secs_f64(),
            r.as_secs_f64(),
            c.as_secs_f64() / r.as_secs_f64().max(1e-9)
        );
    }
    Ok(())
}
