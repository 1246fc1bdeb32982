//! Flattened against stacked lowers (`max_unmerged_layers`), behind `bench/flatten`: one deep
//! image (busybox plus `--layers` - 1 small layers of `--files` files each, every fifth one
//! deleting a file of the layer below) imported through containerd 2.1 into our snapshotter
//! twice, on fresh containerds: with `max_unmerged_layers = 1` (one lower: the chain's
//! fsmeta.erofs) and with 0 (one overlay lower per layer). Measured, medians of `--runs`:
//! the first container (for the flattened one, with the fsmeta build), then container start
//! (`ctr run --rm IMAGE ID /bin/true`), `find / -xdev` and `stat` of every file (each minus
//! the start time, so the walk itself), with ratios stacked/flattened (above 1: flattening
//! is faster).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use clap::Parser;
use erofs_bench::{DAEMON_ENV, daemon_path, median};
use testsuite::Version;
use testsuite::oci::{self, Compression, ImageSpec, LayerBuilder};
use testsuite::proxied_containerd::{Env, EnvOpts};

#[derive(Parser)]
#[command(about = "container start, find and stat on a deep image: flattened against stacked")]
struct Args {
    /// Layers of the image (the busybox base included).
    #[arg(long, default_value_t = 128)]
    layers: usize,
    /// Files each small layer adds.
    #[arg(long, default_value_t = 20)]
    files: usize,
    /// Timed runs of each command (medians).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// The daemon binary (default: next to this one, or $BENCH_DAEMON).
    #[arg(long, env = DAEMON_ENV)]
    daemon: Option<PathBuf>,
}

fn image(layers: usize, files: usize) -> Result<ImageSpec> {
    let mut spec =
        ImageSpec::new("docker.io/bench/deep").layer(oci::busybox_base_layer()?, Compression::Gzip);
    for i in 1..layers {
        let mut l = LayerBuilder::new();
        l.dir("data", 0o755).dir(&format!("data/l{i}"), 0o755);
        for f in 0..files {
            l.file(
                &format!("data/l{i}/f{f}"),
                0o644,
                format!("{i}.{f}").as_bytes(),
            );
        }
        l.file("data/count", 0o644, i.to_string().as_bytes());
        if i % 5 == 0 {
            l.whiteout(&format!("data/l{}/f0", i - 1));
        }
        spec = spec.layer(l.finish()?, Compression::Gzip);
    }
    Ok(spec)
}

struct Numbers {
    first: Duration,
    start: Duration,
    find: Duration,
    stat: Duration,
    entries: usize,
}

fn measure(env: &Env, name: &str, runs: usize) -> Result<Numbers> {
    let time = |args: &[&str]| -> Result<(Duration, String)> {
        let t = Instant::now();
        let out = env.run(name, &[&["/bin/sh", "-c"][..], args].concat())?;
        Ok((t.elapsed(), out))
    };
    let (first, _) = time(&["true"])?;
    let (_, count) = time(&["find / -xdev | wc -l"])?;
    let entries: usize = count.trim().parse().unwrap_or(0);
    ensure!(entries > 0, "find printed {count:?}");
    let mut start = Vec::new();
    let mut find = Vec::new();
    let mut stat = Vec::new();
    for _ in 0..runs {
        start.push(time(&["true"])?.0);
        find.push(time(&["find / -xdev >/dev/null"])?.0);
        stat.push(time(&["find / -xdev | xargs stat >/dev/null"])?.0);
    }
    let start = median(&mut start);
    Ok(Numbers {
        first,
        start,
        find: median(&mut find).saturating_sub(start),
        stat: median(&mut stat).saturating_sub(start),
        entries,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let daemon = daemon_path(args.daemon.clone())?;
    let spec = image(args.layers, args.files)?;
    let mut results = Vec::new();
    for (label, toml) in [
        (
            "flattened (max_unmerged_layers = 1)",
            "max_unmerged_layers = 1",
        ),
        (
            "stacked (max_unmerged_layers = 0)",
            "max_unmerged_layers = 0",
        ),
    ] {
        let env = Env::start_opts(
            &daemon,
            Version::V2_1,
            EnvOpts {
                containerd_log_level: Some("info".into()),
                ctr_timeout: Some(Duration::from_secs(1800)),
                snapshotter_toml: toml.into(),
                ..EnvOpts::default()
            },
        )?;
        let img = env.build(&spec)?;
        env.import(&img)?;
        let n = measure(&env, &img.name, args.runs)?;
        println!(
            "{label}: first container {:?}, start {:?}, find {:?}, stat {:?} ({} entries)",
            n.first, n.start, n.find, n.stat, n.entries
        );
        results.push((label, n));
    }
    let (f, s) = (&results[0].1, &results[1].1);
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!(
        "\n{} layers, {} files each, medians of {} runs",
        args.layers, args.files, args.runs
    );
    println!("| | flattened | stacked | stacked/flattened |");
    println!("|---|---|---|---|");
    for (what, a, b) in [
        (
            "first container (flattened: + fsmeta build)",
            f.first,
            s.first,
        ),
        (
            "container start (`ctr run --rm ... true`)",
            f.start,
            s.start,
        ),
        ("`find / -xdev` (minus start)", f.find, s.find),
        ("`stat` of every entry (minus start)", f.stat, s.stat),
    ] {
        println!(
            "| {what} | {:.0} ms | {:.0} ms | {:.2} |",
            a.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3,
            ratio(b, a)
        );
    }
    Ok(())
}
