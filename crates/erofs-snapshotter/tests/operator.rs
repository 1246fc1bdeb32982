//! What an operator installs and runs, checked with the tools that will read it:
//!
//! 1. `config default` / `config check`: the printed defaults parse back to the daemon's
//!    defaults; problems are reported with file, line and key, and exit statuses 0/1/2.
//! 2. `contrib/systemd`: `systemd-analyze verify` (Debian 12's systemd, unpacked privately by
//!    scripts/setup; it needs no running systemd) on a root holding our unit, the containerd
//!    drop-in, Debian's containerd.service and the binaries, plus the properties the README
//!    promises (notify, ordering before containerd, restart, no private mounts).
//! 3. `contrib/containerd`: each snippet read by the containerd version it is for
//!    (`containerd --config F config dump`), and what that containerd understood checked.
//! 4. `contrib/kubernetes/daemonset.yaml`: parsed, and its paths, privileges, propagation,
//!    probes and config checked against the daemon's own defaults.
//! 5. `health` and `Type=notify` against a real daemon; the metrics endpoint (Unix socket
//!    and loopback TCP) scraped before and after real requests, the text parsed strictly.
//!
//! 5 needs root (the daemon mounts); 2 and 3 need scripts/setup's private packages.

use std::fs;
use std::io::Write;
use std::process::{Command, Output, Stdio};

use snapshotter::Config;

const BIN: &str = env!("CARGO_BIN_EXE_erofs-snapshotter");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("running the binary")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// ---- 1. config default / check ----

#[test]
fn config_default_checks_clean_and_is_the_default() {
    let o = run(&["config", "default"]);
    assert!(o.status.success(), "{}", text(&o));
    let printed = String::from_utf8(o.stdout).unwrap();
    assert_eq!(Config::check(&printed).unwrap(), Config::default());
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("config.toml");
    fs::write(&f, &printed).unwrap();
    let o = run(&["config", "check", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("ok"), "{}", text(&o));
    // From standard input too.
    let mut child = Command::new(BIN)
        .args(["config", "check", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(printed.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn config_check_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    for (body, want) in [
        (
            "root_path = \"/var/lib/x\"\n[snapshotter]\nset_immutable = true\nbogus_key = 1\n",
            ":4: unknown field `bogus_key`",
        ),
        (
            "[differ]\nmax_layer_size = \"12 parsecs\"\n",
            ":2: differ.max_layer_size: invalid size",
        ),
        (
            "address = \"/run/x.sock\"\n\n[daemon]\nheavy_timeout = \"soon\"\n",
            ":4: daemon.heavy_timeout: invalid duration",
        ),
        (
            "[snapshotter]\ndefault_size = 10\n",
            ":2: snapshotter.default_size: invalid type: integer `10`, expected a string",
        ),
        (
            "root_path = \"relative/root\"\n",
            ":1: root_path: relative/root is not an absolute path",
        ),
        (
            "[metrics]\naddress = \"0.0.0.0:9464\"\n",
            ":2: metrics.address: \"0.0.0.0:9464\" is not a loopback address",
        ),
    ] {
        let f = dir.path().join("c.toml");
        fs::write(&f, body).unwrap();
        let o = run(&["config", "check", f.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{body:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.starts_with(&format!("{}{want}", f.display())),
            "{body:?}: {err}"
        );
    }
    let o = run(&["config", "check", "/nonexistent/config.toml"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("/nonexistent/config.toml"),
        "{}",
        text(&o)
    );
}
