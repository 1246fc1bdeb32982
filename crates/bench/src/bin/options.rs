//! The unpack cost of each integrity option (issue 5's benchmark), run by `bench/options`:
//! one daemon per option, the same layer blobs unpacked the way containerd's unpacker does it
//! (Prepare, Diff.Apply, Commit, over the sockets), median wall time of N runs, as ratios
//! against no option. Inputs in the page cache, output cold (caches dropped before each
//! run), runs interleaved across options so drift hits them all alike. Also reports the
//! first View of each committed layer (where userspace fs-verity re-checks the digest).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use containerd_api::containerd::types::Descriptor;
use erofs_bench::{
    DAEMON_ENV, daemon_path, default_work_dir, drop_caches, median, sha256_digest_of_file, warm,
};
use testsuite::daemon_env::{Cfg, Env};

/// Unpack cost of each integrity option (none, set_immutable, userspace fs-verity,
/// dm-verity) through the daemon's Diff service, as ratios against none.
///
/// One daemon per option, each fed python.tar.gz (gzip) and debian.tar (plain) from
/// bench/datasets.sh the way containerd's unpacker does it (Prepare, Apply, Commit). Runs are
/// interleaved across options, with the page cache dropped and the input read back in before
/// each. Per-run times go to stderr, the table to stdout. Needs root (it mounts).
#[derive(Debug, Parser)]
#[command(name = "bench-options", version)]
struct Args {
    /// The erofs-snapshotter binary to benchmark [default: the one next to this executable]
    #[arg(long, value_name = "PATH", env = DAEMON_ENV)]
    daemon: Option<PathBuf>,
    /// Directory with python.tar.gz and debian.tar (bench/datasets.sh) [default: bench/work]
    #[arg(long, value_name = "DIR", env = "BENCH_WORK")]
    work: Option<PathBuf>,
    /// Runs per option and dataset (medians and minimums are reported)
    #[arg(long, short = 'n', value_name = "N", env = "BENCH_RUNS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
}

struct Dataset {
    name: &'static str,
    file: PathBuf,
    media_type: &'static str,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let daemon = daemon_path(args.daemon)?;
    ensure!(
        rustix::process::geteuid().is_root(),
        "bench-options needs root (it mounts)"
    );
    let work = args.work.unwrap_or_else(default_work_dir);
    bench(&daemon, &work, args.runs as usize).await
}

async fn bench(daemon: &Path, work: &Path, runs: usize) -> Result<()> {
    let datasets = [
        Dataset {
            name: "python",
            file: work.join("python.tar.gz"),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        },
        Dataset {
            name: "debian",
            file: work.join("debian.tar"),
            media_type: "application/vnd.oci.image.layer.v1.tar",
        },
    ];
    let options: [(&str, Cfg); 4] = [
        ("none", Cfg::new()),
        ("set_immutable", Cfg::new().sn("set_immutable = true")),
        (
            "fs-verity (userspace)",
            Cfg::new().sn("enable_fsverity = true"),
        ),
        ("dm-verity", Cfg::new().df("enable_dmverity = true")),
    ];
    let mut descs = Vec::new();
    for d in &datasets {
        ensure!(
            d.file.exists(),
            "{} is missing: run bench/datasets.sh",
            d.file.display()
        );
        let size = std::fs::metadata(&d.file)?.len();
        descs.push(Descriptor {
            media_type: d.media_type.into(),
            digest: sha256_digest_of_file(&d.file)?,
            size: size as i64,
            annotations: Default::default(),
        });
    }
    let mut envs = Vec::new();
    for (name, cfg) in &options {
        let mut env = Env::new(daemon, cfg.clone())?;
        env.start()
            .await
            .with_context(|| format!("daemon for {name}"))?;
        for (d, desc) in datasets.iter().zip(&descs) {
            let link = env
                .content
                .join("blobs/sha256")
                .join(desc.digest.trim_start_matches("sha256:"));
            std::os::unix::fs::symlink(std::fs::canonicalize(&d.file)?, link)?;
        }
        envs.push(env);
    }
    // times[option][dataset], first-view times likewise.
    let mut unpack = vec![vec![Vec::new(); datasets.len()]; options.len()];
    let mut view = vec![vec![Vec::new(); datasets.len()]; options.len()];
    for run in 0..runs {
        for (di, d) in datasets.iter().enumerate() {
            for (oi, env) in envs.iter().enumerate() {
                let key = format!("bench/{run}/{}/active", d.name);
                let name = format!("bench/{run}/{}", d.name);
                drop_caches();
                warm(&d.file)?;
                let t0 = Instant::now();
                let mounts = env.c().prepare(&key, "").await?;
                env.c().apply(&descs[di], &mounts).await?;
                env.c().commit(&name, &key).await?;
                let dt = t0.elapsed();
                unpack[oi][di].push(dt);
                let vkey = format!("{name}/view");
                let t1 = Instant::now();
                env.c().view(&vkey, &name).await?;
                view[oi][di].push(t1.elapsed());
                env.c().remove(&vkey).await?;
                env.c().remove(&name).await?;
                eprintln!(
                    "run {run} {:<7} {:<22} unpack {:>7.3}s",
                    d.name,
                    options[oi].0,
                    dt.as_secs_f64()
                );
            }
        }
    }
    println!(
        "\nUnpack through the Diff service (Prepare + Apply + Commit), {runs} runs per cell; \
         overhead against none, from medians and from minimums (the minimum is the run \
         least disturbed by other load on the machine)\n"
    );
    println!(
        "{:<12} {:<22} {:>9} {:>9} {:>7} {:>9} {:>9} {:>11}  goal <25%",
        "dataset", "option", "median", "min", "ratio", "overhead", "(by min)", "first View"
    );
    for (di, d) in datasets.iter().enumerate() {
        let base = median(&mut unpack[0][di]).as_secs_f64();
        let base_min = unpack[0][di]
            .iter()
            .min()
            .copied()
            .unwrap_or_default()
            .as_secs_f64();
        for (oi, (name, _)) in options.iter().enumerate() {
            let t = median(&mut unpack[oi][di]).as_secs_f64();
            let tmin = unpack[oi][di]
                .iter()
                .min()
                .copied()
                .unwrap_or_default()
                .as_secs_f64();
            let v = median(&mut view[oi][di]).as_secs_f64();
            let ratio = t / base;
            let over = (ratio - 1.0) * 100.0;
            let over_min = (tmin / base_min - 1.0) * 100.0;
            let kind = if d.media_type.ends_with("gzip") {
                "gz"
            } else {
                "tar"
            };
            println!(
                "{:<12} {:<22} {:>8.3}s {:>8.3}s {:>6.2}x {:>8.1}% {:>8.1}% {:>9.1}ms  {}",
                format!("{} ({kind})", d.name),
                name,
                t,
                tmin,
                ratio,
                over,
                over_min,
                v * 1000.0,
                if oi == 0 {
                    "-"
                } else if over < 25.0 && over_min < 25.0 {
                    "ok"
                } else if over < 25.0 || over_min < 25.0 {
                    "borderline"
                } else {
                    "OVER"
                }
            );
        }
    }
    for mut env in envs {
        env.stop()?;
    }
    Ok(())
}
