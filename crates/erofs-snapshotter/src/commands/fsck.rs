//! `fsck`: check an image with the library's checker.

use std::process::ExitCode;

use erofs_image::check::{Severity, check_image};

use super::inspect::open_devices;
use crate::cli::FsckArgs;

pub fn run(a: FsckArgs) -> anyhow::Result<ExitCode> {
    let (primary, devices) = open_devices(&a.image)?;
    let report = check_image(primary, devices);
    for f in &report.findings {
        if f.severity == Severity::Error || a.warnings {
            println!("{f}");
        }
    }
    let omitted = report.omitted_errors
        + if a.warnings {
            report.omitted_warnings
        } else {
            0
        };
    if omitted > 0 {
        println!("and {omitted} more");
    }
    let errors = report.errors();
    println!(
        "{}: {} inodes ({} directories, {} files, {} bytes), {} error(s)",
        a.image.image.display(),
        report.inodes,
        report.directories,
        report.files,
        report.file_bytes,
        errors
    );
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
