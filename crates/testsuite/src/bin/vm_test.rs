//! `testsuite-vm`: runs test binaries inside guests booted from Debian kernels
//! ([`testsuite::vm`]), one guest per kernel, and prints one `N passed, M failed` line per
//! kernel. `scripts/vm-test` builds the test binaries and calls it.
//!
//! ```text
//! testsuite-vm --out DIR [--kernel SPEC]... [--cpus N] [--memory MIB] [--timeout SECS]
//!              --run 'NAME=PATH [ARG...]'...
//! ```
//!
//! SPEC is `SUITE` (its `linux-image-amd64`) or `SUITE:PACKAGE`; the default is `bookworm` and `sid`.
//! Each `--run` is a libtest binary run in the guest, in order, with its output in
//! `DIR/SUITE-RELEASE/NAME.log` next to the guest's `console.log`. Exits 1 if any test failed
//! or a guest did not finish.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use testsuite::vm::{self, Kernel, KernelSpec, Tally, VmOpts};

struct Args {
    out: PathBuf,
    kernels: Vec<KernelSpec>,
    runs: Vec<(String, Vec<String>)>,
    opts: VmOpts,
}

fn parse_args() -> Result<Args> {
    let mut out = None;
    let mut kernels = Vec::new();
    let mut runs = Vec::new();
    let mut opts = VmOpts::default();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(val()?)),
            "--kernel" => kernels.push(val()?.parse()?),
            "--cpus" => opts.cpus = val()?.parse()?,
            "--memory" => opts.memory_mib = val()?.parse()?,
            "--timeout" => opts.timeout = Duration::from_secs(val()?.parse()?),
            "--run" => {
                let v = val()?;
                let (name, cmd) = v
                    .split_once('=')
                    .context("--run takes NAME=PATH [ARG...]")?;
                ensure!(
                    !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                    "bad run name {name:?}"
                );
                let words: Vec<String> = cmd.split_whitespace().map(String::from).collect();
                ensure!(!words.is_empty(), "--run {name}= names no binary");
                runs.push((name.to_string(), words));
            }
            "-h" | "--help" => {
                println!(
                    "usage: testsuite-vm --out DIR [--kernel SUITE[:PACKAGE]]... [--cpus N] [--memory MIB] [--timeout SECS] --run 'NAME=PATH [ARG...]'..."
                );
                std::process::exit(0);
            }
            _ => bail!("unknown argument {a:?} (see --help)"),
        }
    }
    if kernels.is_empty() {
        kernels.push("bookworm".parse()?);
        kernels.push("sid".parse()?);
    }
    ensure!(!runs.is_empty(), "nothing to run (--run)");
    Ok(Args {
        out: out.context("--out DIR is required")?,
        kernels,
        runs,
        opts,
    })
}

/// Single-quoted for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The guest's `run.sh`: each binary in turn, output to `$VM_OUT/NAME.log`, its summary
/// and failures echoed on the console.
fn script(runs: &[(String, Vec<String>)]) -> String {
    let mut s = String::from(
        "#!/bin/sh\ncd /tmp\necho \"vm-test: kernel $(uname -r)\"\n\
         up() { cut -d' ' -f1 /proc/uptime; }\n",
    );
    for (name, cmd) in runs {
        let cmd: Vec<String> = cmd.iter().map(|w| sh_quote(w)).collect();
        writeln!(
            s,
            "echo \"vm-test: {name}: start at $(up)s\"\n\
             {} > \"$VM_OUT/{name}.log\" 2>&1\nst=$?\n\
             echo \"vm-test: {name}: exit $st at $(up)s\"\n\
             grep -E '^test .* FAILED$|^test result:' \"$VM_OUT/{name}.log\"",
            cmd.join(" ")
        )
        .unwrap();
    }
    s.push_str("exit 0\n");
    s
}

/// How long run `name` took in the guest, from the script's `start at` and `exit ... at`
/// lines on the console (guest uptime, seconds).
fn run_seconds(console: &str, name: &str) -> Option<f64> {
    let at = |l: &str| -> Option<f64> { l.rsplit(" at ").next()?.strip_suffix('s')?.parse().ok() };
    let start = format!("vm-test: {name}: start at ");
    let exit = format!("vm-test: {name}: exit ");
    let t0 = console
        .lines()
        .find(|l| l.starts_with(&start))
        .and_then(at)?;
    let t1 = console
        .lines()
        .find(|l| l.starts_with(&exit))
        .and_then(at)?;
    Some(t1 - t0)
}

fn run_kernel(args: &Args, spec: &KernelSpec, busybox: &Path) -> Result<(Kernel, Tally)> {
    let t0 = Instant::now();
    let kernel = Kernel::fetch(spec, &vm::cache_dir(), &vm::shared_tools()?)?;
    let initrd = vm::initramfs(&kernel, busybox)?;
    eprintln!(
        "vm-test: {spec}: {} {} (release {}) ready in {:.1?}",
        kernel.package,
        kernel.version,
        kernel.release,
        t0.elapsed()
    );
    let out = args
        .out
        .join(format!("{}-{}", kernel.spec.suite, kernel.release));
    let script = script(&args.runs);
    // A guest that hangs before userspace (rare, under software emulation) is booted once
    // more; a second hang fails the kernel.
    let run = match vm::run(&kernel, &initrd, &out, &script, &args.opts) {
        Err(e) if e.downcast_ref::<vm::BootHang>().is_some() => {
            eprintln!("vm-test: {}: {e:#}; booting once more", kernel.release);
            vm::run(&kernel, &initrd, &out, &script, &args.opts)?
        }
        r => r?,
    };
    let mut total = Tally::default();
    let console = vm::read_text(&run.console);
    for (name, _) in &args.runs {
        let log = out.join(format!("{name}.log"));
        let text = vm::read_text(&log);
        let mut t = vm::tally(&text);
        // A filter that matches nothing (a renamed test) must not pass as "0 failed".
        let empty = t.passed == 0 && t.failed == 0;
        if empty {
            t.failed += 1;
        }
        let failures: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("test ") && l.ends_with(" FAILED"))
            .collect();
        let took = run_seconds(&console, name)
            .map(|s| format!("{s:.0}s"))
            .unwrap_or_else(|| "?".into());
        eprintln!(
            "vm-test: {}: {name}: {} passed, {} failed, {} ignored in {took}{} ({})",
            kernel.release,
            t.passed,
            t.failed,
            t.ignored,
            if empty {
                " (no test ran: counted as a failure)"
            } else {
                ""
            },
            log.display()
        );
        for f in failures {
            eprintln!("vm-test:   {f}");
        }
        total += t;
    }
    eprintln!(
        "vm-test: {}: boot to userspace {}, whole run {:.1?} (console: {})",
        kernel.release,
        run.boot_seconds
            .map(|s| format!("{s:.1}s"))
            .unwrap_or_else(|| "?".into()),
        run.elapsed,
        run.console.display()
    );
    Ok((kernel, total))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    testsuite::require_root()?;
    let busybox = PathBuf::from(std::env::var_os("VM_BUSYBOX").unwrap_or("/bin/busybox".into()));
    let mut lines = Vec::new();
    let mut ok = true;
    for spec in &args.kernels {
        match run_kernel(&args, spec, &busybox) {
            Ok((k, t)) => {
                ok &= t.failed == 0;
                lines.push(format!(
                    "{spec} ({} {}, {}): {} passed, {} failed",
                    k.package, k.version, k.release, t.passed, t.failed
                ));
            }
            Err(e) => {
                ok = false;
                eprintln!("vm-test: {spec}: {e:#}");
                lines.push(format!(
                    "{spec}: 0 passed, 1 failed (the guest did not run)"
                ));
            }
        }
    }
    for l in lines {
        println!("{l}");
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn run_seconds_from_the_console() {
        let c = "vm: 4.41s: running x\nvm-test: kernel: start at 5.31s\nvm-test: kernel: exit 0 at 29.01s\n\
                 vm-test: conformance: start at 29.27s\n";
        let k = super::run_seconds(c, "kernel").unwrap();
        assert!((k - 23.7).abs() < 0.01, "{k}");
        assert_eq!(super::run_seconds(c, "conformance"), None);
        assert_eq!(super::run_seconds(c, "e2e"), None);
    }
}
