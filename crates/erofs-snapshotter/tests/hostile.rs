//! Hostile callers over the socket (issue 11): a seeded, replayable property test that sends
//! every Snapshots request (Prepare, View, Mounts, Commit, Remove, Stat, Update with field
//! paths, List with filters, Usage, Cleanup) and every Diff request (Apply, Diff) with
//! generated inputs to the real daemon (`erofs-snapshotter serve`) over its Unix socket:
//! keys, parents and labels at and past containerd's limits, with NUL, slashes, `..`,
//! escapes and unicode; filters in containerd's syntax and malformed; mounts of every type
//! whose sources and options point outside the root (`..`, `/proc/self/...`, a canary
//! directory) or are huge; descriptors whose digests are not digests, with negative and huge
//! sizes, unknown media types and payloads. Valid sequences (Prepare, a container's writes,
//! Apply, Commit, View) are mixed in, so hostile inputs meet every state.
//!
//! Oracles after every request ([`world`]): the daemon process runs and answers a Stat
//! within 5 s, no request hangs (30 s deadline), the status is one containerd expects for a
//! caller's mistake (never Unknown or Internal), the answer agrees with a model of the store
//! where the model can tell, the daemon logged no panic and no error, and nothing outside the
//! root was created, written or mounted (a canary tree next to the root, the test directory,
//! `/`, `/tmp`, the mount table). At the end: Cleanup, the store and the disk agree, and
//! removing everything leaves nothing.
//!
//! `HOSTILE_SEED` (default: from the clock, printed) and `HOSTILE_CASES` (requests, default
//! 15000) choose the run; `HOSTILE_TRACE=1` prints every request. The same seed and count
//! replay the same requests. [`regressions`] keeps the minimized inputs of the bugs found.
//! Needs root, erofs and overlayfs.

#[path = "hostile/input.rs"]
mod input;
#[path = "hostile/regressions.rs"]
mod regressions;
#[path = "hostile/world.rs"]
mod world;

use std::time::{Duration, Instant};

use world::World;

/// Requests of a default run (about 30 s on the test machine: 5000 take 10 s).
const DEFAULT_CASES: u64 = 15_000;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

/// A multi-threaded runtime for one test.
pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

#[test]
fn hostile_callers() {
    testsuite::require_root().unwrap();
    let seed = env_u64("HOSTILE_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let cases = env_u64("HOSTILE_CASES").unwrap_or(DEFAULT_CASES);
    eprintln!("hostile callers: HOSTILE_SEED={seed:#x} HOSTILE_CASES={cases}");
    // A generous backstop: a run of the default length takes well under a minute.
    let limit = Duration::from_secs(120 + cases / 5);
    testsuite::with_timeout(limit, move || {
        block_on(async move {
            let started = Instant::now();
            let mut w = World::start(seed).await.expect("starting the daemon");
            let r = async {
                for _ in 0..cases {
                    let req = w.input.next(&w.model);
                    // Errors the oracles accept are part of the run; only a broken
                    // oracle stops it.
                    let _answer = w.run(req).await?;
                    if w.stats.requests % 200 == 0 {
                        w.check_agreement(false).await?;
                    }
                }
                w.run(input::Req::Cleanup).await??;
                w.check_agreement(true).await?;
                w.remove_all().await?;
                w.env.stop()?;
                anyhow::Ok(())
            }
            .await;
            if let Err(e) = r {
                // A panic's message and location, wherever it is in the log.
                let log = w.env.log_text();
                let panics: Vec<&str> = log
                    .lines()
                    .skip_while(|l| !l.contains("panicked"))
                    .take(12)
                    .collect();
                eprintln!("daemon panic, if any:\n{}", panics.join("\n"));
                panic!(
                    "hostile callers failed (replay: HOSTILE_SEED={seed:#x} HOSTILE_CASES={cases}):\n\
                     {e:#}\nlast requests:\n{}\ndaemon log tail:\n{}",
                    w.trace(),
                    w.env.log_tail(30)
                );
            }
            let s = &w.stats;
            eprintln!(
                "hostile callers: seed {seed:#x}: {} requests ({} ok, {} predicted by the model, \
                 {} liveness probes) in {:.1} s",
                s.requests,
                s.ok,
                s.predicted,
                s.probes,
                started.elapsed().as_secs_f64()
            );
            for (k, n) in &s.by_code {
                eprintln!("  {k}: {n}");
            }
        })
    });
}
