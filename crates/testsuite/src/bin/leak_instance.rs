//! Starts a containerd instance (`testsuite-leak-instance 1.6|1.7|2.1`), runs a
//! detached container on a busybox image, prints the base directory and exits
//! without cleaning up: the situation `containerd::sweep_stale` handles after
//! a test process dies.

use std::process::ExitCode;

use testsuite::oci::{self, Compression, ImageSpec};
use testsuite::{Containerd, ContainerdOpts, RunOpts, Version};

fn main() -> ExitCode {
    let version = match std::env::args().nth(1).as_deref() {
        Some("1.6") => Version::V1_6,
        Some("1.7") => Version::V1_7,
        Some("2.1") => Version::V2_1,
        _ => {
            eprintln!("usage: testsuite-leak-instance 1.6|1.7|2.1");
            return ExitCode::from(2);
        }
    };
    let run = || -> anyhow::Result<()> {
        let ctd = Containerd::start(ContainerdOpts::new(version))?;
        let dir = ctd.dir("image")?;
        let spec = ImageSpec::new(&testsuite::unique_name("leak"))
            .layer(oci::busybox_base_layer()?, Compression::Gzip);
        let image = oci::build_archive(&spec, &dir)?;
        oci::import(&ctd, &image, "overlayfs")?;
        let out = ctd.run_with(&RunOpts {
            rm: false,
            flags: vec!["-d".into()],
            ..RunOpts::new("overlayfs", &image.name, &["sleep", "600"])
        })?;
        ctd.check(&out, "ctr run -d")?;
        println!("{}", ctd.base_dir().display());
        // Leave everything behind, as a crashed test would.
        std::process::exit(0);
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
