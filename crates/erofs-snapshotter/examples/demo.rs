//! The main job, end to end: a private containerd 2.1 (or 1.6 when 2.1 is not installed)
//! with erofs-snapshotter as its proxy snapshotter (and, on 2.1, its proxy differ) runs a
//! container from a small two-layer image. Run through `scripts/demo`.
//!
//! Usage: `demo PATH_TO_erofs-snapshotter`

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use testsuite::oci::{self, Compression, ImageSpec, LayerBuilder};
use testsuite::{Containerd, ContainerdOpts, Daemon, UnpackConfig, Version};

fn main() -> anyhow::Result<()> {
    let bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: demo PATH_TO_erofs-snapshotter")?,
    );
    testsuite::require_root()?;
    let version = if Version::V2_1.available() {
        Version::V2_1
    } else {
        Version::V1_6
    };
    let sock = Path::new("erofs/erofs.sock");
    let mut opts = ContainerdOpts::new(version).proxy_snapshotter("erofs-rs", sock);
    if version == Version::V2_1 {
        opts = opts
            .proxy_differ("erofs-rs-diff", sock)
            .diff_service_default(&["erofs-rs-diff", "walking"])
            .unpack(UnpackConfig::new("erofs-rs", Some("erofs-rs-diff")));
    }
    let mut ctd = Containerd::prepare(opts)?;
    let root = ctd.dir("erofs/root")?;
    let socket = ctd.proxy_address("erofs-rs").context("proxy socket")?;
    let config = format!(
        "root_path = {:?}\naddress = {:?}\n[differ]\ncontent_root = {:?}\ncontainerd_address = {:?}\n",
        root,
        socket,
        ctd.content_root(),
        ctd.address()
    );
    let daemon = Daemon::start(&bin, &config, &socket)?;
    ctd.launch()?;
    println!(
        "containerd {version:?} is running with erofs-snapshotter as proxy plugin \"erofs-rs\""
    );

    let work = tempfile::tempdir()?;
    let mut top = LayerBuilder::new();
    top.file("etc/motd", 0o644, b"hello from an EROFS layer\n")
        .whiteout("etc/group");
    let image = ImageSpec::new(&testsuite::unique_name("demo"))
        .layer(oci::busybox_base_layer()?, Compression::Gzip)
        .layer(top.finish()?, Compression::Gzip);
    let archive = oci::build_archive(&image, work.path())?;
    oci::import(&ctd, &archive, "erofs-rs")?;
    println!(
        "imported {} (2 layers) with --snapshotter erofs-rs",
        archive.name
    );

    let out = ctd.run(
        "erofs-rs",
        &archive.name,
        &[
            "/bin/sh",
            "-c",
            "echo hello from a container; cat /etc/motd; ls /; ls /etc/group 2>&1 || true",
        ],
    )?;
    if !out.status.success() {
        bail!(
            "ctr run failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            ctd.log_tail(20)
        );
    }
    println!("--- container output:");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("--- layers on disk:");
    let mut layers: Vec<_> = std::fs::read_dir(root.join("snapshots"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("layer.erofs"))
        .filter(|p| p.exists())
        .collect();
    layers.sort();
    for l in layers {
        println!("{} ({} bytes)", l.display(), std::fs::metadata(&l)?.len());
    }
    let applied = daemon
        .log_tail(200)
        .lines()
        .filter(|l| l.contains("applied layer"))
        .count();
    if version == Version::V2_1 {
        println!("layers converted by the erofs-snapshotter differ: {applied}");
    }
    Ok(())
}
