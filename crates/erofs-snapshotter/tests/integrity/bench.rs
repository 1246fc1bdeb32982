//! The unpack cost of each integrity option (issue 5's benchmark), run by `bench/options`:
//! one daemon per option, the same layer blobs unpacked the way containerd's unpacker does it
//! (Prepare, Diff.Apply, Commit, over the sockets), median wall time of N runs, as ratios
//! against no option. Inputs in the page cache, output cold (caches dropped before each
//! run), runs interleaved across options so drift hits them all alike. Also reports the
//! first View of each committed layer (where userspace fs-verity re-checks the digest).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use containerd_api::containerd::types::Descriptor;
use sha2::{Digest, Sha256};

use crate::common::{Cfg, Env, block_on};

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

fn warm(path: &std::path::Path) -> Result<()> {
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

fn sha256_file(path: &std::path::Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

struct Dataset {
    name: &'static str,
    file: PathBuf,
    media_type: &'static str,
}

#[test]
#[ignore = "benchmark (minutes, needs bench/datasets.sh): run bench/options"]
fn options() {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::var_os("BENCH_WORK")
        .map(PathBuf::from)
        .unwrap_or_else(|| here.join("../../bench/work"));
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    block_on(async {
        if let Err(e) = bench(&work, runs).await {
            panic!("{e:#}");
        }
    });
}

async fn bench(work: &std::path::Path, runs: usize) -> Result<()> {
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
            digest: sha256_file(&d.file)?,
            size: size as i64,
            annotations: Default::default(),
        });
    }
    let mut envs = Vec::new();
    for (name, cfg) in &options {
        let mut env = Env::new(cfg.clone())?;
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
