//! How containerd mounts an overlay whose options exceed one page: an image
//! of 128 layers on the built-in overlayfs snapshotter, whose `lowerdir=`
//! option alone is about 10 KiB of absolute paths. containerd's
//! `compactLowerdirOption` (mount/mount_linux.go in 1.6,
//! core/mount/mount_linux.go in 2.x) then mounts from the lowerdirs' common
//! parent with relative paths. Needs root; run with `--test-threads=1`.

mod common;

use std::time::Duration;

use std::path::{Path, PathBuf};

use common::fake_proxy::{ApplyMode, FakeProxy};
use testsuite::oci::{self, Compression, ImageSpec, LayerBuilder};
use testsuite::with_timeout;
use testsuite::{Containerd, ContainerdOpts, RunOpts, UnpackConfig, Version, unique_name};

const LAYERS: usize = 128;

fn many_layers(version: Version) {
    let ctd = Containerd::start(ContainerdOpts::new(version)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ImageSpec::new(&unique_name("many-layers"))
        .layer(oci::busybox_base_layer().unwrap(), Compression::Gzip);
    for i in 1..LAYERS {
        let mut l = LayerBuilder::new();
        l.dir("layers", 0o755).file(
            &format!("layers/{i:03}"),
            0o644,
            format!("{i}\n").as_bytes(),
        );
        if i == LAYERS - 1 {
            l.file("layers/top", 0o644, b"top\n");
        }
        spec = spec.layer(l.finish().unwrap(), Compression::Gzip);
    }
    let image = oci::build_archive(&spec, dir.path()).unwrap();
    oci::import(&ctd, &image, "overlayfs").unwrap();

    // What the snapshotter returns for a container on top of the image.
    let key = unique_name("probe");
    ctd.snapshots("overlayfs", &["prepare", &key, &image.chain_id()])
        .map(|o| ctd.check(&o, "prepare").unwrap())
        .unwrap();
    let mount_cmd = ctd
        .snapshots("overlayfs", &["mounts", "/target", &key])
        .map(|o| ctd.check(&o, "mounts").unwrap())
        .unwrap();
    let lowerdir = mount_cmd
        .split([' ', ','])
        .find_map(|w| w.strip_prefix("lowerdir="))
        .unwrap()
        .to_owned();
    let n_lower = lowerdir.split(':').count();
    println!(
        "{version}: {n_lower} lowerdirs, lowerdir option {} bytes, e.g. {}",
        lowerdir.len(),
        lowerdir.split(':').next().unwrap()
    );
    assert_eq!(n_lower, LAYERS);
    assert!(lowerdir.len() > 4096, "the option must exceed a page");

    // A container on the image mounts and sees the bottom and top layers.
    let id = unique_name("many");
    let out = ctd
        .run_with(&RunOpts {
            id: Some(id.clone()),
            rm: false,
            flags: vec!["-d".into()],
            ..RunOpts::new("overlayfs", &image.name, &["sleep", "600"])
        })
        .unwrap();
    ctd.check(&out, "ctr run -d").unwrap();
    let rootfs = ctd
        .state()
        .join(format!("io.containerd.runtime.v2.task/default/{id}/rootfs"));
    let table = ctd.mountinfo().unwrap();
    let m = table
        .iter()
        .find(|m| m.mount_point == rootfs)
        .expect("rootfs mount");
    let shown = m.super_option("lowerdir").unwrap_or("");
    println!(
        "{version}: mounted {} with lowerdir as the kernel shows it ({} bytes): {}...",
        m.fs_type,
        shown.len(),
        &shown[..shown.len().min(120)]
    );
    let out = ctd
        .ctr(&[
            "tasks",
            "exec",
            "--exec-id",
            "probe",
            &id,
            "/bin/sh",
            "-c",
            "cat /layers/001 /layers/127 /layers/top; ls /layers | wc -l; ls /bin/busybox",
        ])
        .unwrap();
    let stdout = ctd.check(&out, "ctr tasks exec").unwrap();
    assert_eq!(stdout, "1\n127\ntop\n128\n/bin/busybox\n");
    ctd.ctr_ok(&["tasks", "kill", "-s", "KILL", &id]).unwrap();
}

#[test]
fn containerd_1_6_overlay_with_128_lowerdirs() {
    with_timeout(Duration::from_secs(600), || many_layers(Version::V1_6));
}

#[test]
fn containerd_2_1_overlay_with_128_lowerdirs() {
    with_timeout(Duration::from_secs(600), || many_layers(Version::V2_1));
}

/// What happens to a proxy snapshotter's overlay mount of 128 lowerdirs
/// (options of ~30 KiB), by the shape of the lowerdir paths. The fake proxy
/// returns the image's unpacked root first, then 127 empty directories.
fn proxy_lowerdir_shapes(version: Version) {
    let dir = tempfile::tempdir().unwrap();
    // A deep, long root: every absolute lowerdir is over 200 bytes.
    let root = dir
        .path()
        .join("a".repeat(100))
        .join("b".repeat(100))
        .join("root");
    std::fs::create_dir_all(&root).unwrap();
    let sock = dir.path().join("fake.sock");
    let mut opts = ContainerdOpts::new(version).proxy_snapshotter("fake", &sock);
    if version.transfer_service() {
        opts = opts.unpack(UnpackConfig::new("fake", Some("walking")));
    }
    let mut ctd = Containerd::prepare(opts).unwrap();
    let proxy = FakeProxy::start(&sock, &root, &ctd.content_root(), ApplyMode::Unimplemented);
    ctd.launch().unwrap();
    let spec = ImageSpec::new(&unique_name("shapes"))
        .layer(oci::busybox_base_layer().unwrap(), Compression::Gzip);
    let image = oci::build_archive(&spec, dir.path()).unwrap();
    oci::import(&ctd, &image, "fake").unwrap();

    let make = |base: &Path, name: &dyn Fn(usize) -> String| -> Vec<PathBuf> {
        (0..LAYERS - 1)
            .map(|i| {
                let p = base.join(name(i));
                std::fs::create_dir_all(&p).unwrap();
                p
            })
            .collect()
    };
    let run = |what: &str, lowers: Vec<PathBuf>| -> std::process::Output {
        let total: usize = lowers.iter().map(|p| p.as_os_str().len() + 1).sum();
        proxy.set_extra_lowers(lowers);
        let out = ctd
            .run("fake", &image.name, &["/bin/sh", "-c", "ls /bin/busybox"])
            .unwrap();
        println!(
            "{version}: {what}: extra lowerdirs {total} bytes: {} {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        out
    };

    // 1. All below one deep parent with short names: compacted, mounts.
    let short = make(&root.join("x"), &|i| format!("l{i:03}"));
    let out = run("common parent, short relative paths", short);
    assert!(out.status.success());

    // 2. Common parent, but the relative paths alone exceed a page: refused.
    let long_names = make(&root.join("y"), &|i| format!("{}-{i:03}", "n".repeat(60)));
    let out = run("common parent, long relative paths", long_names);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mount options is too long"));

    // 3. Nothing in common but `/` (half of them in /var/tmp): not compacted, refused.
    let other = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut split = make(&root.join("x"), &|i| format!("l{i:03}"));
    split.truncate(64);
    let deep_other = other.path().join("c".repeat(150));
    split.extend(
        make(&deep_other, &|i| format!("l{i:03}"))
            .into_iter()
            .take(63),
    );
    let out = run("only / in common", split);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mount options is too long"));
}

#[test]
fn containerd_1_6_proxy_overlay_lowerdir_shapes() {
    with_timeout(Duration::from_secs(300), || {
        proxy_lowerdir_shapes(Version::V1_6)
    });
}

#[test]
fn containerd_2_1_proxy_overlay_lowerdir_shapes() {
    with_timeout(Duration::from_secs(300), || {
        proxy_lowerdir_shapes(Version::V2_1)
    });
}
