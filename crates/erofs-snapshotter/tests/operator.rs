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

#[path = "operator/prom.rs"]
mod prom;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use snapshotter::Config;
use testsuite::daemon_env::{Cfg, Env};

const BIN: &str = env!("CARGO_BIN_EXE_erofs-snapshotter");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn contrib(rel: &str) -> PathBuf {
    repo().join("contrib").join(rel)
}

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

// ---- 2. systemd ----

/// Debian 12's systemd, unpacked by scripts/setup (never installed, never run as PID 1).
fn systemd_root() -> PathBuf {
    std::env::var_os("TESTSUITE_SYSTEMD_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/opt/systemd-bookworm/root".into())
}

fn systemd_analyze(args: &[&str]) -> Output {
    let root = systemd_root();
    let exe = root.join("usr/bin/systemd-analyze");
    assert!(
        exe.exists(),
        "{} is missing: run scripts/setup (it unpacks Debian 12's systemd there)",
        exe.display()
    );
    Command::new(&exe)
        .args(args)
        .env(
            "LD_LIBRARY_PATH",
            root.join("usr/lib/x86_64-linux-gnu/systemd"),
        )
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap()
}

/// Debian 12's containerd package, as scripts/setup unpacks it for the tests.
fn containerd_16_root() -> PathBuf {
    testsuite::Version::V1_6
        .containerd()
        .parent()
        .and_then(|p| p.parent())
        .and_then(|p| p.parent())
        .unwrap()
        .to_path_buf()
}

fn link_or_copy(from: &Path, to: &Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).unwrap();
    }
}

/// A root for `systemd-analyze --root`: systemd's own units, Debian's containerd.service and
/// binary, our unit, drop-in and binary, at the paths the README installs them to.
fn unit_root(unit_text: &str) -> tempfile::TempDir {
    let root = tempfile::Builder::new()
        .prefix("units-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let r = root.path();
    let sd = systemd_root();
    let units = r.join("usr/lib/systemd/system");
    fs::create_dir_all(&units).unwrap();
    for dir in ["lib/systemd/system", "usr/lib/systemd/system"] {
        let Ok(rd) = fs::read_dir(sd.join(dir)) else {
            continue;
        };
        for e in rd {
            let e = e.unwrap();
            let t = units.join(e.file_name());
            if e.file_type().unwrap().is_file() && !t.exists() {
                fs::copy(e.path(), t).unwrap();
            }
        }
    }
    let ctd = containerd_16_root();
    let service = ["lib/systemd/system", "usr/lib/systemd/system"]
        .iter()
        .map(|d| ctd.join(d).join("containerd.service"))
        .find(|p| p.exists())
        .expect("containerd.service of Debian's containerd: run scripts/setup");
    fs::copy(service, units.join("containerd.service")).unwrap();
    link_or_copy(
        &testsuite::Version::V1_6.containerd(),
        &r.join("usr/bin/containerd"),
    );
    // containerd.service's `ExecStartPre=-/sbin/modprobe overlay`.
    link_or_copy(
        Path::new("/usr/sbin/modprobe"),
        &r.join("usr/sbin/modprobe"),
    );
    std::os::unix::fs::symlink("usr/sbin", r.join("sbin")).unwrap();
    link_or_copy(Path::new(BIN), &r.join("usr/local/bin/erofs-snapshotter"));
    let etc = r.join("etc/systemd/system");
    fs::create_dir_all(etc.join("containerd.service.d")).unwrap();
    fs::write(etc.join("erofs-snapshotter.service"), unit_text).unwrap();
    fs::copy(
        contrib("systemd/containerd.service.d/erofs-snapshotter.conf"),
        etc.join("containerd.service.d/erofs-snapshotter.conf"),
    )
    .unwrap();
    root
}

fn verify(root: &Path) -> Output {
    systemd_analyze(&[
        "verify",
        &format!("--root={}", root.display()),
        "--man=no",
        "--generators=no",
        "erofs-snapshotter.service",
        "containerd.service",
    ])
}

/// `KEY=value` lines of one `[section]` of a unit file.
fn unit_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut cur = String::new();
    let mut out = Vec::new();
    for l in text.lines().map(str::trim) {
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            cur = s.to_string();
        } else if cur == section {
            let (k, v) = l.split_once('=').expect("KEY=value");
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

#[test]
fn systemd_units_verify() {
    let unit = fs::read_to_string(contrib("systemd/erofs-snapshotter.service")).unwrap();
    let root = unit_root(&unit);
    let o = verify(root.path());
    // verify reports unknown keys and bad values only as messages, with status 0: both
    // must be clean.
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "systemd-analyze verify: {:?}\n{}",
        o.status,
        text(&o)
    );
    // The verifier is not blind: a typo, a bad value and a missing binary each show up.
    for (bad, needle) in [
        (
            unit.replace("Restart=always", "Restart=sometimes"),
            "restart",
        ),
        (
            unit.replace("Type=notify", "Type=notify\nPrivateMount=yes"),
            "PrivateMount",
        ),
        (
            unit.replace("/usr/local/bin/erofs-snapshotter", "/usr/local/bin/nope"),
            "/usr/local/bin/nope",
        ),
    ] {
        let root = unit_root(&bad);
        let t = text(&verify(root.path()));
        assert!(t.contains(needle), "{needle}: {t}");
    }

    // What the README promises about it.
    let u = unit_section(&unit, "Unit");
    let s = unit_section(&unit, "Service");
    let has = |sec: &[(String, String)], k: &str, v: &str| {
        sec.iter()
            .any(|(a, b)| a == k && b.split_whitespace().any(|w| w == v))
    };
    assert!(has(&u, "Before", "containerd.service"), "{u:?}");
    assert!(has(&s, "Type", "notify"), "{s:?}");
    assert!(has(&s, "Restart", "always"), "{s:?}");
    let cfg = Config::default();
    assert!(
        has(
            &s,
            "RuntimeDirectory",
            cfg.address
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
        ),
        "the runtime directory is the default socket's: {s:?}"
    );
    assert!(s.iter().any(|(k, v)| k == "ExecStart"
        && v.starts_with(
            "/usr/local/bin/erofs-snapshotter serve --config /etc/erofs-snapshotter/config.toml"
        )));
    for k in [
        "PrivateMounts",
        "MountFlags",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
    ] {
        assert!(
            !s.iter().any(|(a, _)| a == k),
            "{k} would give the daemon its own mount namespace"
        );
    }
    let dropin = fs::read_to_string(contrib(
        "systemd/containerd.service.d/erofs-snapshotter.conf",
    ))
    .unwrap();
    let d = unit_section(&dropin, "Unit");
    assert!(has(&d, "After", "erofs-snapshotter.service"), "{d:?}");
    assert!(has(&d, "Wants", "erofs-snapshotter.service"), "{d:?}");
    assert!(
        !d.iter().any(|(k, _)| k == "Requires" || k == "BindsTo"),
        "{d:?}"
    );
}

// ---- 3. containerd snippets ----

/// containerd 1.7 (Debian 13's), unpacked by scripts/setup.
fn containerd_17() -> PathBuf {
    std::env::var_os("TESTSUITE_CONTAINERD_1_7_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/opt/containerd-1.7/root".into())
        .join("usr/bin/containerd")
}

/// `containerd --config FILE config dump`: what that containerd makes of the file.
fn dump(containerd: &Path, file: &Path) -> (toml::Table, String) {
    assert!(
        containerd.exists(),
        "{} is missing: run scripts/setup",
        containerd.display()
    );
    let o = Command::new(containerd)
        .arg("--config")
        .arg(file)
        .args(["config", "dump"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{} on {}: {}",
        containerd.display(),
        file.display(),
        text(&o)
    );
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let t = toml::from_str(&String::from_utf8_lossy(&o.stdout)).expect("a TOML dump");
    (t, stderr)
}

fn at<'a>(t: &'a toml::Table, path: &[&str]) -> &'a toml::Value {
    let mut v = t.get(path[0]).unwrap_or_else(|| panic!("no {}", path[0]));
    for p in &path[1..] {
        v = v.get(p).unwrap_or_else(|| panic!("no {p} in {path:?}"));
    }
    v
}

fn s<'a>(t: &'a toml::Table, path: &[&str]) -> &'a str {
    at(t, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string"))
}

#[test]
fn containerd_snippets_are_read_as_intended() {
    let cfg = Config::default();
    let sock = cfg.address.to_str().unwrap();
    let root = cfg.root_path.to_str().unwrap();
    let cri1 = ["plugins", "io.containerd.grpc.v1.cri", "containerd"];

    let (d, _) = dump(
        &testsuite::Version::V1_6.containerd(),
        &contrib("containerd/config-1.6.toml"),
    );
    assert_eq!(s(&d, &["proxy_plugins", "erofs-rs", "address"]), sock);
    assert_eq!(s(&d, &["proxy_plugins", "erofs-rs", "type"]), "snapshot");
    assert_eq!(s(&d, &[&cri1[..], &["snapshotter"]].concat()), "erofs-rs");

    let (d, _) = dump(&containerd_17(), &contrib("containerd/config-1.7.toml"));
    assert_eq!(s(&d, &["proxy_plugins", "erofs-rs", "address"]), sock);
    assert_eq!(
        s(&d, &["proxy_plugins", "erofs-rs", "exports", "root"]),
        root
    );
    assert_eq!(s(&d, &["proxy_plugins", "erofs-rs-diff", "type"]), "diff");
    assert_eq!(s(&d, &["proxy_plugins", "erofs-rs-diff", "address"]), sock);
    assert_eq!(s(&d, &[&cri1[..], &["snapshotter"]].concat()), "erofs-rs");
    let diff = at(
        &d,
        &[
            "plugins",
            "io.containerd.service.v1.diff-service",
            "default",
        ],
    );
    assert_eq!(diff.as_array().unwrap()[0].as_str(), Some("erofs-rs-diff"));
    assert_eq!(
        s(
            &d,
            &[&cri1[..], &["runtimes", "runc-overlayfs", "snapshotter"]].concat()
        ),
        "overlayfs"
    );

    let (d, warnings) = dump(
        &testsuite::Version::V2_1.containerd(),
        &contrib("containerd/config-2.x.toml"),
    );
    // 2.x reads plugin sections strictly and says which keys it ignored.
    assert!(!warnings.contains("nknown"), "{warnings}");
    assert_eq!(s(&d, &["proxy_plugins", "erofs-rs", "address"]), sock);
    assert_eq!(
        s(&d, &["proxy_plugins", "erofs-rs", "exports", "root"]),
        root
    );
    let caps: BTreeSet<&str> = at(&d, &["proxy_plugins", "erofs-rs", "capabilities"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(caps, BTreeSet::from(["rebase", "remap-ids"]));
    assert_eq!(s(&d, &["proxy_plugins", "erofs-rs-diff", "address"]), sock);
    assert_eq!(
        s(
            &d,
            &["plugins", "io.containerd.cri.v1.images", "snapshotter"]
        ),
        "erofs-rs"
    );
    let unpack = at(
        &d,
        &[
            "plugins",
            "io.containerd.transfer.v1.local",
            "unpack_config",
        ],
    )
    .as_array()
    .unwrap();
    assert!(
        unpack.iter().any(
            |e| e.get("snapshotter").and_then(|v| v.as_str()) == Some("erofs-rs")
                && e.get("differ").and_then(|v| v.as_str()) == Some("erofs-rs-diff")
        ),
        "{unpack:?}"
    );
    assert!(
        unpack
            .iter()
            .any(|e| e.get("snapshotter").and_then(|v| v.as_str()) == Some("overlayfs")),
        "the overlayfs entry must stay: {unpack:?}"
    );
    assert_eq!(
        s(
            &d,
            &[
                "plugins",
                "io.containerd.cri.v1.runtime",
                "containerd",
                "runtimes",
                "runc-overlayfs",
                "snapshotter"
            ]
        ),
        "overlayfs"
    );
    // The strict reading has teeth: a misspelt key is reported.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    fs::write(
        &bad,
        fs::read_to_string(contrib("containerd/config-2.x.toml"))
            .unwrap()
            .replace(
                "  snapshotter = \"erofs-rs\"\n\n",
                "  snapshoter = \"erofs-rs\"\n\n",
            ),
    )
    .unwrap();
    let (_, w) = dump(&testsuite::Version::V2_1.containerd(), &bad);
    assert!(w.contains("nknown key") && w.contains("snapshoter"), "{w}");
}

// ---- 4. Kubernetes ----

#[test]
fn daemonset_manifest_is_consistent() {
    use yaml_rust2::{Yaml, YamlLoader};
    let manifest = fs::read_to_string(contrib("kubernetes/daemonset.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&manifest).expect("valid YAML");
    let kind = |k: &str| -> &Yaml {
        let found: Vec<&Yaml> = docs
            .iter()
            .filter(|d| d["kind"].as_str() == Some(k))
            .collect();
        assert_eq!(found.len(), 1, "one {k}");
        found[0]
    };
    for d in &docs {
        assert!(d["apiVersion"].as_str().is_some(), "{d:?}");
        assert!(d["metadata"]["name"].as_str().is_some(), "{d:?}");
    }
    let ns = kind("Namespace")["metadata"]["name"].as_str().unwrap();
    let rc = kind("RuntimeClass");
    assert_eq!(rc["apiVersion"].as_str(), Some("node.k8s.io/v1"));
    // The handler the containerd snippets define for the daemon's own pods.
    let handler = rc["handler"].as_str().unwrap();
    for v in ["1.7", "2.x"] {
        let snippet = fs::read_to_string(contrib(&format!("containerd/config-{v}.toml"))).unwrap();
        assert!(snippet.contains(&format!("runtimes.{handler}]")), "{v}");
    }

    // The ConfigMap's config is one the daemon accepts.
    let cm = kind("ConfigMap");
    assert_eq!(cm["metadata"]["namespace"].as_str(), Some(ns));
    let cfg = Config::check(cm["data"]["config.toml"].as_str().unwrap()).expect("config.toml");

    let ds = kind("DaemonSet");
    assert_eq!(ds["apiVersion"].as_str(), Some("apps/v1"));
    assert_eq!(ds["metadata"]["namespace"].as_str(), Some(ns));
    let spec = &ds["spec"];
    let pod = &spec["template"]["spec"];
    for (k, v) in spec["selector"]["matchLabels"].as_hash().unwrap() {
        assert_eq!(
            &spec["template"]["metadata"]["labels"][k.as_str().unwrap()],
            v
        );
    }
    assert_eq!(
        pod["runtimeClassName"].as_str(),
        rc["metadata"]["name"].as_str()
    );
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(
        spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"].as_i64(),
        Some(1)
    );
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"].as_bool(), Some(true));

    // Volumes: hostPath where the config says, the root propagating both ways.
    let host_path = |vol: &str| -> String {
        let v = pod["volumes"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|v| v["name"].as_str() == Some(vol))
            .unwrap_or_else(|| panic!("volume {vol}"));
        v["hostPath"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{vol} is not a hostPath"))
            .into()
    };
    let mount = |path: &Path| -> &Yaml {
        c["volumeMounts"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"].as_str() == path.to_str())
            .unwrap_or_else(|| panic!("nothing mounted at {}", path.display()))
    };
    let root = mount(&cfg.root_path);
    assert_eq!(root["mountPropagation"].as_str(), Some("Bidirectional"));
    assert_eq!(
        host_path(root["name"].as_str().unwrap()),
        cfg.root_path.to_str().unwrap()
    );
    let sock_dir = cfg.address.parent().unwrap();
    assert_eq!(
        host_path(mount(sock_dir)["name"].as_str().unwrap()),
        sock_dir.to_str().unwrap()
    );
    let content = mount(&cfg.differ.content_root);
    assert_eq!(
        host_path(content["name"].as_str().unwrap()),
        cfg.differ.content_root.to_str().unwrap()
    );
    let ctd_dir = cfg.differ.containerd_address.parent().unwrap();
    assert_eq!(
        host_path(mount(ctd_dir)["name"].as_str().unwrap()),
        ctd_dir.to_str().unwrap()
    );
    assert_eq!(
        host_path(mount(Path::new("/dev"))["name"].as_str().unwrap()),
        "/dev"
    );

    // The container runs the daemon on the ConfigMap's file.
    let cm_mount =
        c["volumeMounts"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|m| {
                pod["volumes"].as_vec().unwrap().iter().any(|v| {
                    v["name"] == m["name"] && v["configMap"]["name"] == cm["metadata"]["name"]
                })
            })
            .expect("the ConfigMap is mounted");
    let args: Vec<&str> = c["args"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(args[0], "serve");
    let file = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    assert_eq!(
        Path::new(file),
        Path::new(cm_mount["mountPath"].as_str().unwrap()).join("config.toml")
    );

    // Every probe runs `health` on the configured socket, and that command line parses.
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let cmd: Vec<&str> = c[probe]["exec"]["command"]
            .as_vec()
            .unwrap_or_else(|| panic!("{probe}"))
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        assert_eq!(cmd[1], "health", "{probe}");
        let socket = cmd[cmd.iter().position(|a| *a == "--socket").unwrap() + 1];
        assert_eq!(Path::new(socket), cfg.address, "{probe}");
        assert!(c[probe]["timeoutSeconds"].as_i64().unwrap() >= 5, "{probe}");
        // Against a socket nobody serves: the command runs and says unhealthy.
        let mut args: Vec<&str> = cmd[1..].to_vec();
        let i = args.iter().position(|a| *a == "--socket").unwrap();
        args[i + 1] = "/nonexistent/s.sock";
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{probe}: {}", text(&o));
    }
    assert!(
        pod["terminationGracePeriodSeconds"].as_i64().unwrap() >= 60,
        "Applies must get to finish"
    );
}

// ---- 5. against a daemon ----

/// A daemon config in `dir`, with extra top-level lines.
fn daemon_config(dir: &Path, extra: &str) -> (String, PathBuf) {
    let socket = dir.join("s.sock");
    let cfg = format!(
        "root_path = {:?}\naddress = {:?}\n{extra}\n[differ]\ncontent_root = {:?}\ncontainerd_address = {:?}\n",
        dir.join("root").to_str().unwrap(),
        socket.to_str().unwrap(),
        dir.join("content").to_str().unwrap(),
        dir.join("no-containerd.sock").to_str().unwrap(),
    );
    (cfg, socket)
}

#[test]
fn notify_ready_and_health() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (cfg, socket) = daemon_config(dir.path(), "");
    let mut opts = testsuite::daemon::DaemonOpts::new(Path::new(BIN), &cfg, &socket);
    opts.env
        .push(("NOTIFY_SOCKET".into(), notify.clone().into()));
    let mut d = testsuite::Daemon::start_with(opts).unwrap();
    let mut buf = [0u8; 256];
    let n = rx.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
    assert_eq!(&buf[..n], b"READY=1");

    let o = run(&[
        "health",
        "--socket",
        socket.to_str().unwrap(),
        "--timeout",
        "10s",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).starts_with("ok: "), "{}", text(&o));

    d.stop();
    let n = rx.recv(&mut buf).expect("STOPPING=1 on NOTIFY_SOCKET");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let o = run(&["health", "--socket", socket.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).starts_with("unhealthy: "), "{}", text(&o));

    // A socket that accepts but never answers: unhealthy within the timeout.
    let stuck = dir.path().join("stuck.sock");
    let _l = std::os::unix::net::UnixListener::bind(&stuck).unwrap();
    let t = Instant::now();
    let o = run(&[
        "health",
        "--socket",
        stuck.to_str().unwrap(),
        "--timeout",
        "1s",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no answer within"), "{}", text(&o));
    assert!(t.elapsed() < Duration::from_secs(10));
}

/// One HTTP/1.1 request on `stream`; the status line and the body.
fn http(mut stream: impl Read + Write, request: &str) -> (String, String) {
    stream.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("a response head");
    let status = head.lines().next().unwrap().to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(body.len(), len, "{head}");
    (status, body.to_string())
}

fn scrape_unix(sock: &Path) -> prom::Scrape {
    let (status, body) = http(
        UnixStream::connect(sock).unwrap(),
        "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    prom::parse(&body).unwrap_or_else(|e| panic!("{e:#}\n{body}"))
}

const DUR: &str = "erofs_snapshotter_request_duration_seconds";

fn count(s: &prom::Scrape, op: &str, code: &str) -> f64 {
    s.get0(&format!("{DUR}_count"), &[("op", op), ("code", code)])
}

fn code_name(c: tonic::Code) -> String {
    match c {
        tonic::Code::Ok => "OK".into(),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_layers_and_bytes() {
    let base = tempfile::Builder::new()
        .prefix("eit-metrics-")
        .tempdir_in("/tmp")
        .unwrap();
    let msock = base.path().join("metrics.sock");
    let mut env = Env::in_dir(
        BIN,
        base.path().join("env"),
        Cfg::new()
            .top(&format!("metrics.address = \"unix:{}\"", msock.display()))
            // Applied layers get a dm-verity tree: mounted without dm-verity where the
            // kernel has none (a fallback counted).
            .df("enable_dmverity = true"),
        true,
    )
    .unwrap();
    env.start().await.unwrap();
    let before = scrape_unix(&msock);
    assert_eq!(before.types.get(DUR).map(String::as_str), Some("histogram"));
    assert_eq!(
        before.get("erofs_snapshotter_snapshots", &[("kind", "committed")]),
        Some(0.0)
    );

    // A layer committed from an upper directory, a view of it, mounts, a removal.
    let base_id = env
        .layer_with(
            "k1",
            "",
            "L1",
            &[("etc/motd", b"hello\n"), ("bin/x", &[7u8; 70000])],
        )
        .await
        .unwrap();
    env.c().view("v1", "L1").await.unwrap();
    env.c().mounts("v1").await.unwrap();
    env.c().remove("v1").await.unwrap();
    // A layer the differ applies from a tar blob.
    let mut tar = testsuite::oci::LayerBuilder::new();
    tar.dir("a", 0o755).file("a/b.txt", 0o644, b"applied\n");
    let tar = tar.finish().unwrap();
    let desc = env
        .add_blob("application/vnd.oci.image.layer.v1.tar", &tar)
        .unwrap();
    let (applied_id, _) = env.apply_layer("k2", "L2", &desc).await.unwrap();
    env.c().view("v3", "L2").await.unwrap();
    // Refused and failed requests count under their codes.
    let missing = env.c().prepare("k3", "no-such-parent").await.unwrap_err();
    let mounts = env.c().prepare("k4", "L1").await.unwrap();
    let compare = env
        .c()
        .compare(
            &env.c().view("v2", "L1").await.unwrap(),
            &mounts,
            "application/vnd.oci.image.layer.v1.tar",
            None,
        )
        .await;

    let after = scrape_unix(&msock);
    let moved = |op: &str, code: &str| count(&after, op, code) - count(&before, op, code);
    assert_eq!(moved("prepare", "OK"), 3.0); // k1, k2, k4
    assert_eq!(moved("view", "OK"), 3.0);
    assert_eq!(moved("mounts", "OK"), 1.0);
    assert_eq!(moved("commit", "OK"), 2.0);
    assert_eq!(moved("remove", "OK"), 1.0);
    assert_eq!(moved("apply", "OK"), 1.0);
    assert_eq!(moved("prepare", &code_name(missing.code())), 1.0);
    let compare_code = match &compare {
        Ok(_) => "OK".to_string(),
        Err(s) => code_name(s.code()),
    };
    assert_eq!(moved("compare", &compare_code), 1.0, "{compare:?}");
    // Durations were recorded with them.
    assert!(after.get0(&format!("{DUR}_sum"), &[("op", "apply"), ("code", "OK")]) > 0.0);

    let conv = |s: &prom::Scrape, op: &str| {
        (
            s.get0("erofs_snapshotter_layers_converted_total", &[("op", op)]),
            s.get0("erofs_snapshotter_converted_bytes_total", &[("op", op)]),
        )
    };
    let len = |id: u64| fs::metadata(env.layer(id)).unwrap().len() as f64;
    assert_eq!(conv(&after, "commit").0 - conv(&before, "commit").0, 1.0);
    assert_eq!(
        conv(&after, "commit").1 - conv(&before, "commit").1,
        len(base_id)
    );
    assert_eq!(conv(&after, "apply").0 - conv(&before, "apply").0, 1.0);
    assert_eq!(
        conv(&after, "apply").1 - conv(&before, "apply").1,
        len(applied_id)
    );
    assert_eq!(
        after.get("erofs_snapshotter_snapshots", &[("kind", "committed")]),
        Some(2.0)
    );
    assert_eq!(
        after.get("erofs_snapshotter_snapshots", &[("kind", "active")]),
        Some(1.0)
    );
    assert!(
        after
            .get("erofs_snapshotter_layer_disk_bytes", &[])
            .unwrap()
            >= len(base_id)
    );
    // The view of L2 mounted a layer with a tree: through dm-verity where the kernel has it.
    let dm_kernel = Path::new("/sys/module/dm_verity").exists();
    assert_eq!(
        after.get(
            "erofs_snapshotter_fallbacks_total",
            &[("kind", "dmverity_skipped")]
        ),
        Some(if dm_kernel { 0.0 } else { 1.0 })
    );
    for kind in ["loop_device", "fsverity_userspace", "dmverity_skipped"] {
        assert!(
            after
                .get("erofs_snapshotter_fallbacks_total", &[("kind", kind)])
                .is_some(),
            "{kind}"
        );
    }
    assert!(
        after
            .get("erofs_snapshotter_heavy_requests_limit", &[])
            .unwrap()
            >= 1.0
    );

    // Only GET /metrics.
    let (st, _) = http(
        UnixStream::connect(&msock).unwrap(),
        "GET / HTTP/1.1\r\n\r\n",
    );
    assert_eq!(st, "HTTP/1.1 404 Not Found");
    let (st, _) = http(
        UnixStream::connect(&msock).unwrap(),
        "POST /metrics HTTP/1.1\r\n\r\n",
    );
    assert_eq!(st, "HTTP/1.1 405 Method Not Allowed");
    // A client that sends an endless head is cut off.
    let mut s = UnixStream::connect(&msock).unwrap();
    let junk = vec![b'x'; 64 << 10];
    let _ = s.write_all(&junk);
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(
        resp.is_empty() || resp.starts_with("HTTP/1.1 400"),
        "{resp}"
    );

    env.stop().unwrap();
    assert!(!msock.exists(), "the metrics socket goes with the daemon");
}

#[test]
fn metrics_on_loopback_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (cfg, socket) = daemon_config(
        dir.path(),
        &format!("metrics.address = \"127.0.0.1:{port}\""),
    );
    let _d = testsuite::Daemon::start(Path::new(BIN), &cfg, &socket).unwrap();
    let o = run(&["health", "--socket", socket.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let (status, body) = http(
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap(),
        "GET /metrics HTTP/1.0\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    let s = prom::parse(&body).unwrap();
    // The health probe's Stat is counted.
    assert_eq!(count(&s, "stat", "NotFound"), 1.0, "{body}");
}

/// The core's counters behind the endpoint, in process with the real kernel: conversions and
/// their bytes, loop-device mounts (a mounter told to use them, as on kernels before 6.12),
/// and layers sealed without kernel fs-verity where it is wanted but missing.
#[test]
fn core_counts_conversions_and_fallbacks() {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use snapshotter::mount::SystemMounter;
    use snapshotter::{Cancel, Snapshotter};
    assert!(rustix::process::geteuid().is_root(), "needs root (mounts)");
    /// The layer mounts go before the directory, also when the test fails.
    struct Unmount(tempfile::TempDir);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = testsuite::mounts::unmount_all_under(self.0.path());
        }
    }
    let dir = Unmount(tempfile::tempdir().unwrap());
    let dir = &dir.0;
    let cfg = Config::check(&format!(
        "root_path = {:?}\n[snapshotter]\nenable_fsverity = true\n",
        dir.path().join("root").to_str().unwrap()
    ))
    .unwrap();
    let s = Snapshotter::open(cfg, Arc::new(SystemMounter::with_loop_devices())).unwrap();
    assert_eq!(s.stats(), Default::default());
    let mut sizes = 0;
    for (name, parent) in [("l1", ""), ("l2", "l1")] {
        let key = format!("{name}-active");
        let mounts = s.prepare(&key, parent, BTreeMap::new()).unwrap();
        // The upper directory: the bind source, or the overlay's upperdir.
        let upper = match mounts[0].kind.as_str() {
            "bind" => PathBuf::from(&mounts[0].source),
            _ => PathBuf::from(
                mounts[0]
                    .options
                    .iter()
                    .find_map(|o| o.strip_prefix("upperdir="))
                    .unwrap(),
            ),
        };
        fs::write(upper.join(name), vec![1u8; 50_000]).unwrap();
        s.commit(name, &key, BTreeMap::new(), "", &Cancel::never())
            .unwrap();
        sizes += fs::metadata(upper.parent().unwrap().join("layer.erofs"))
            .unwrap()
            .len();
    }
    s.view("v", "l2", BTreeMap::new()).unwrap();
    let st = s.stats();
    assert_eq!((st.commit_layers, st.commit_bytes), (2, sizes));
    assert_eq!((st.apply_layers, st.apply_bytes), (0, 0));
    // The view mounted both layers (l2's Prepare already mounted l1).
    assert_eq!(st.loop_mounts, 2, "{st:?}");
    let userspace = s.verity_mode() == snapshotter::integrity::VerityMode::Userspace;
    assert_eq!(
        st.fsverity_userspace,
        if userspace { 2 } else { 0 },
        "{:?}",
        s.verity_mode()
    );
    let store = s.store_stats().unwrap();
    assert_eq!((store.committed, store.views, store.active), (2, 1, 0));
    assert!(store.layer_bytes >= sizes, "{store:?}");
    s.remove("v").unwrap();
    drop(s);
}
