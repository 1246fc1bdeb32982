//! Proof that the harness works: real containers on containerd 1.6 and 2.1
//! with the built-in overlayfs snapshotter, images imported from archives and
//! pulled from a local registry. Needs root; run with `--test-threads=1`.

use std::path::Path;
use std::time::Duration;

use testsuite::containerd::render_config;
use testsuite::oci::{self, Compression, ImageSpec, LayerBuilder, OciArchive};
use testsuite::process::check_output;
use testsuite::{Containerd, ContainerdOpts, Daemon, Registry, RunOpts, Version, unique_name};

use testsuite::with_timeout;

const MOTD: &str = "Hello from layer 2\n";

/// Layer 1: busybox plus `/etc/deleteme`, `/etc/keep`, `/var/cache/old`.
/// Layer 2: deletes `/etc/deleteme` (whiteout), hides `/var/cache`'s old
/// contents (opaque), adds `/etc/motd` and `/var/cache/new`.
fn two_layer_image(dir: &Path, c1: Compression, c2: Compression) -> OciArchive {
    let mut base = LayerBuilder::new();
    base.file("etc/deleteme", 0o644, b"I should be gone\n")
        .file("etc/keep", 0o644, b"kept\n")
        .dir("var/cache", 0o755)
        .file("var/cache/old", 0o644, b"old\n");
    let busybox = oci::busybox_base_layer().unwrap();
    let extra = base.finish().unwrap();
    let mut top = LayerBuilder::new();
    top.whiteout("etc/deleteme")
        .file("etc/motd", 0o644, MOTD.as_bytes())
        .dir("var/cache", 0o755)
        .opaque("var/cache")
        .file("var/cache/new", 0o644, b"new\n");
    let spec = ImageSpec::new(&unique_name("two-layers"))
        .layer(concat_tars(&busybox, &extra), c1)
        .layer(top.finish().unwrap(), c2)
        .cmd(&["/bin/echo", "image cmd ran"]);
    oci::build_archive(&spec, dir).unwrap()
}

/// Joins two tars into one layer (drops the first's end-of-archive blocks).
fn concat_tars(a: &[u8], b: &[u8]) -> Vec<u8> {
    // An end-of-archive marker is two zero blocks; TarWriter writes exactly that.
    let mut v = a[..a.len() - 1024].to_vec();
    v.extend_from_slice(b);
    v
}

const SCRIPT: &str = "echo hello; cat /etc/motd; ls /; \
     if [ -e /etc/deleteme ]; then echo deleteme present; else echo deleteme deleted; fi; \
     cat /etc/keep; ls /var/cache";

fn check_run_output(stdout: &str) {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"hello"), "output:\n{stdout}");
    assert_eq!(lines.get(1), Some(&MOTD.trim_end()), "output:\n{stdout}");
    for d in [
        "bin", "dev", "etc", "proc", "root", "sys", "tmp", "usr", "var",
    ] {
        assert!(
            stdout.split_whitespace().any(|w| w == d),
            "ls / lacks {d}:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("deleteme deleted"),
        "whiteout ignored:\n{stdout}"
    );
    assert!(stdout.contains("kept\n"), "{stdout}");
    assert!(stdout.contains("new"), "{stdout}");
    assert!(
        !stdout.contains("old"),
        "opaque directory ignored:\n{stdout}"
    );
}

fn import_and_run(version: Version) {
    let ctd = Containerd::start(ContainerdOpts::new(version)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = two_layer_image(dir.path(), Compression::Gzip, Compression::Zstd);
    oci::import(&ctd, &image, "overlayfs").unwrap();
    let out = ctd
        .run("overlayfs", &image.name, &["/bin/sh", "-c", SCRIPT])
        .unwrap();
    let stdout = ctd.check(&out, "ctr run").unwrap();
    check_run_output(&stdout);
    // The image's own Cmd runs when no command is given.
    let out = ctd
        .run_with(&RunOpts {
            flags: vec!["--env".into(), "X=1".into()],
            ..RunOpts::new("overlayfs", &image.name, &[])
        })
        .unwrap();
    let stdout = ctd.check(&out, "ctr run (image Cmd)").unwrap();
    assert_eq!(stdout, "image cmd ran\n");
    // Unpacked snapshots are visible through ctr snapshots.
    let snaps = ctd
        .ctr_ok(&["snapshots", "--snapshotter", "overlayfs", "ls"])
        .unwrap();
    assert!(snaps.contains(&image.chain_id()), "{snaps}");
}

#[test]
fn containerd_1_6_import_and_run() {
    with_timeout(Duration::from_secs(300), || import_and_run(Version::V1_6));
}

#[test]
fn containerd_2_1_import_and_run() {
    with_timeout(Duration::from_secs(300), || import_and_run(Version::V2_1));
}

#[test]
fn uncompressed_layers_import_and_run() {
    with_timeout(Duration::from_secs(300), || {
        for version in Version::ALL {
            let ctd = Containerd::start(ContainerdOpts::new(version)).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let image = two_layer_image(dir.path(), Compression::None, Compression::Gzip);
            oci::import(&ctd, &image, "overlayfs").unwrap();
            let out = ctd
                .run("overlayfs", &image.name, &["/bin/sh", "-c", SCRIPT])
                .unwrap();
            check_run_output(&ctd.check(&out, "ctr run").unwrap());
        }
    });
}

fn registry_pull_and_run(version: Version) {
    let reg = Registry::start().unwrap();
    let ctd = Containerd::start(ContainerdOpts::new(version)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = two_layer_image(dir.path(), Compression::Gzip, Compression::Zstd);
    let reference = reg.push_image(&image).unwrap();
    assert!(reference.starts_with(&reg.host()), "{reference}");
    ctd.pull_plain_http(&reference, "overlayfs").unwrap();
    assert!(ctd.images().unwrap().contains(&reference));
    let out = ctd
        .run("overlayfs", &reference, &["/bin/sh", "-c", SCRIPT])
        .unwrap();
    check_run_output(&ctd.check(&out, "ctr run").unwrap());
}

#[test]
fn containerd_2_1_registry_pull_and_run() {
    with_timeout(Duration::from_secs(300), || {
        registry_pull_and_run(Version::V2_1)
    });
}

#[test]
fn containerd_1_6_registry_pull_and_run() {
    with_timeout(Duration::from_secs(300), || {
        registry_pull_and_run(Version::V1_6)
    });
}

/// The shim that runs is the version's own, and Drop kills a running
/// container, its shim and cgroups, and removes the base directory.
#[test]
fn shim_binary_and_cleanup() {
    with_timeout(Duration::from_secs(300), || {
        for version in Version::ALL {
            let ctd = Containerd::start(ContainerdOpts::new(version)).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let image = two_layer_image(dir.path(), Compression::Gzip, Compression::Gzip);
            oci::import(&ctd, &image, "overlayfs").unwrap();
            let id = unique_name("sleeper");
            let out = ctd
                .run_with(&RunOpts {
                    id: Some(id.clone()),
                    rm: false,
                    flags: vec!["-d".into()],
                    ..RunOpts::new("overlayfs", &image.name, &["sleep", "600"])
                })
                .unwrap();
            ctd.check(&out, "ctr run -d").unwrap();
            let shims = ctd.shims();
            assert_eq!(shims.len(), 1, "{shims:?}");
            assert_eq!(
                shims[0].exe.as_deref(),
                Some(version.shim().as_path()),
                "{version}"
            );
            let tasks = ctd.ctr_ok(&["tasks", "ls"]).unwrap();
            assert!(tasks.contains(&id) && tasks.contains("RUNNING"), "{tasks}");
            // The container's rootfs is an overlay in containerd's namespace only.
            let rootfs = ctd
                .state()
                .join(format!("io.containerd.runtime.v2.task/default/{id}/rootfs"));
            let inner = ctd.mountinfo().unwrap();
            assert!(
                inner
                    .iter()
                    .any(|m| m.mount_point == rootfs && m.fs_type == "overlay"),
                "no overlay at {}",
                rootfs.display()
            );
            let host = testsuite::mounts::self_mounts().unwrap();
            assert!(!host.iter().any(|m| m.mount_point == rootfs));
            // runc's state and the shim socket live in containerd's private /run.
            let runc_state = format!("run/containerd/runc/default/{id}");
            let inner_root = Path::new("/proc")
                .join(ctd.pid().unwrap().to_string())
                .join("root");
            assert!(
                inner_root.join(&runc_state).is_dir(),
                "no runc state in the private /run"
            );
            assert!(
                !Path::new("/").join(&runc_state).exists(),
                "runc state on the host"
            );

            let base = ctd.base_dir().to_path_buf();
            let cgroup = ctd.cgroup_parent().to_owned();
            let pids = ctd.processes();
            assert!(pids.len() >= 3, "containerd, shim and sleep: {pids:?}");
            drop(ctd);
            for pid in &pids {
                assert!(
                    !Path::new(&format!("/proc/{pid}")).exists()
                        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                            .map(|s| s.contains(") Z"))
                            .unwrap_or(true),
                    "pid {pid} survived"
                );
            }
            assert!(!base.exists(), "{} left behind", base.display());
            let cg = Path::new("/sys/fs/cgroup/memory").join(cgroup.trim_start_matches('/'));
            assert!(!cg.exists(), "{} left behind", cg.display());
            assert!(
                testsuite::mounts::mounts_under(&testsuite::mounts::self_mounts().unwrap(), &base)
                    .is_empty()
            );
        }
    });
}

/// `ctr snapshots` on the built-in overlayfs snapshotter: prepare, mounts,
/// commit, view, usage, ls, rm.
#[test]
fn ctr_snapshots_commands() {
    with_timeout(Duration::from_secs(120), || {
        for version in Version::ALL {
            let ctd = Containerd::start(ContainerdOpts::new(version)).unwrap();
            let s = |args: &[&str]| {
                let out = ctd.snapshots("overlayfs", args).unwrap();
                ctd.check(&out, &format!("ctr snapshots {args:?}")).unwrap()
            };
            let mounts = s(&["prepare", "active-1"]);
            assert!(mounts.is_empty(), "prepare prints nothing: {mounts}");
            let mounts = s(&["mounts", "/tmp/target", "active-1"]);
            assert!(mounts.starts_with("mount -t bind"), "{mounts}");
            s(&["commit", "committed-1", "active-1"]);
            s(&["prepare", "active-2", "committed-1"]);
            let mounts = s(&["mounts", "/tmp/target", "active-2"]);
            assert!(mounts.contains("-t overlay"), "{mounts}");
            let view = s(&["view", "view-1", "committed-1"]);
            assert!(view.is_empty() || view.contains("mount"), "{view}");
            let usage = s(&["usage"]);
            assert!(usage.contains("committed-1"), "{usage}");
            let ls = s(&["ls"]);
            for k in ["active-2", "committed-1", "view-1"] {
                assert!(ls.contains(k), "{ls}");
            }
            let info = s(&["info", "active-2"]);
            assert!(info.contains("\"Parent\": \"committed-1\""), "{info}");
            s(&["rm", "view-1"]);
            s(&["rm", "active-2"]);
            s(&["rm", "committed-1"]);
            assert!(!s(&["ls"]).contains("committed-1"));
        }
    });
}

#[test]
fn daemon_waits_for_socket_and_stops() {
    with_timeout(Duration::from_secs(60), || {
        let bin = Path::new(env!("CARGO_BIN_EXE_testsuite-fake-daemon"));
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let mut d = Daemon::start(
            bin,
            &format!("socket = \"{}\"\n", socket.display()),
            &socket,
        )
        .unwrap();
        d.ensure_running().unwrap();
        assert!(std::os::unix::net::UnixStream::connect(d.socket()).is_ok());
        assert!(d.log_tail(10).contains("listening"));
        let pid = d.pid().unwrap();
        drop(d);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());

        // A daemon that exits before listening: the error carries its log.
        let err =
            Daemon::start(bin, "exit_after_ms = 50\n", &dir.path().join("never.sock")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("exiting as configured"), "{msg}");
    });
}

#[test]
fn print_generated_configs() {
    let sock = Path::new("/tmp/ctd-XXXX/erofs/erofs.sock");
    for version in Version::ALL {
        let mut opts = ContainerdOpts::new(version).proxy_snapshotter("erofs-rs", sock);
        if version.proxy_diff() {
            opts = opts
                .proxy_differ("erofs-rs-diff", sock)
                .diff_service_default(&["erofs-rs-diff", "walking"])
                .unpack(testsuite::UnpackConfig::new(
                    "erofs-rs",
                    Some("erofs-rs-diff"),
                ));
            opts.proxy_plugins[0].capabilities = vec!["rebase".into()];
            opts.proxy_plugins[0].platform = Some("linux/amd64".into());
        }
        let toml = render_config(&opts, Path::new("/tmp/ctd-XXXX")).unwrap();
        println!("===== {version}\n{toml}");
        assert!(toml.contains(&format!("version = {}", version.config_version())));
    }
}

#[test]
fn ctr_output_of_failed_command_is_reported() {
    with_timeout(Duration::from_secs(60), || {
        let ctd = Containerd::start(ContainerdOpts::new(Version::V2_1)).unwrap();
        let out = ctd.ctr(&["images", "rm", "no-such-image"]).unwrap();
        // ctr images rm of a missing image only warns.
        let _ = check_output(&out, "ctr images rm");
        let err = ctd
            .ctr_ok(&["snapshots", "--snapshotter", "overlayfs", "rm", "nope"])
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("not found"), "{msg}");
        assert!(msg.contains("containerd log tail"), "{msg}");
    });
}

/// A test process that dies leaves its instance behind; the next
/// `Containerd::start` (here: `sweep_stale`) removes it.
#[test]
fn stale_instances_are_swept() {
    with_timeout(Duration::from_secs(300), || {
        for version in ["1.6", "2.1"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_testsuite-leak-instance"))
                .arg(version)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let base = std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
            assert!(base.is_dir());
            let needle = format!("{}/", base.display());
            let alive = || {
                testsuite::process::list_processes()
                    .into_iter()
                    .filter(|p| p.cmdline_contains(&needle))
                    .count()
            };
            assert!(alive() >= 2, "containerd and its shim should still run");
            testsuite::containerd::sweep_stale(base.parent().unwrap());
            assert_eq!(alive(), 0);
            assert!(!base.exists(), "{} not removed", base.display());
            assert!(
                testsuite::mounts::mounts_under(&testsuite::mounts::self_mounts().unwrap(), &base)
                    .is_empty()
            );
        }
    });
}

/// `emergency_cleanup` (what a timed-out test runs) cleans a live instance
/// from another thread; the owner's Drop then has nothing left to do.
#[test]
fn emergency_cleanup_kills_live_instances() {
    with_timeout(Duration::from_secs(300), || {
        let mut ctd = Containerd::start(ContainerdOpts::new(Version::V2_1)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let image = two_layer_image(dir.path(), Compression::Gzip, Compression::Gzip);
        oci::import(&ctd, &image, "overlayfs").unwrap();
        let out = ctd
            .run_with(&RunOpts {
                rm: false,
                flags: vec!["-d".into()],
                ..RunOpts::new("overlayfs", &image.name, &["sleep", "600"])
            })
            .unwrap();
        ctd.check(&out, "ctr run -d").unwrap();
        let pids = ctd.processes();
        let base = ctd.base_dir().to_path_buf();
        let me = std::thread::current().id();
        std::thread::spawn(move || testsuite::emergency_cleanup(Some(me)))
            .join()
            .unwrap();
        assert!(!base.exists());
        for pid in pids {
            assert!(
                !Path::new(&format!("/proc/{pid}/cmdline")).exists()
                    || std::fs::read(format!("/proc/{pid}/cmdline"))
                        .unwrap_or_default()
                        .is_empty(),
                "pid {pid} survived"
            );
        }
        ctd.stop().unwrap();
    });
}
