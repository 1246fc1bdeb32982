//! `merge`: layer images to one fsmeta image (erofs_image::merge).

use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use erofs_image::builder::Interrupt;
use erofs_image::merge::{MergeOptions, merge_layer_files};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::MergeArgs;
use crate::output::PendingFile;

fn uuid(arg: Option<&str>) -> anyhow::Result<Option<[u8; 16]>> {
    Ok(match arg {
        None => None,
        Some("clear") => Some([0; 16]),
        Some("random") => Some(*uuid::Uuid::new_v4().as_bytes()),
        Some(u) => Some(
            *uuid::Uuid::parse_str(u)
                .with_context(|| format!("-U {u}: not a UUID, `clear` or `random`"))?
                .as_bytes(),
        ),
    })
}

pub fn run(a: MergeArgs) -> anyhow::Result<ExitCode> {
    if a.layers.iter().any(|l| l == &a.image) {
        bail!("{} is both the output and a layer", a.image.display());
    }
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {pos} directories merged ({per_sec})")
                .expect("valid template"),
        )
    };
    let start = Instant::now();
    // The merge asks between directories whether to stop: a cheap place to count them.
    let tick = bar.clone();
    let opts = MergeOptions {
        aufs: a.aufs,
        uuid: uuid(a.uuid.as_deref())?,
        interrupt: Interrupt::new(move || {
            tick.inc(1);
            false
        }),
        ..Default::default()
    };
    let image =
        PendingFile::create(&a.image).with_context(|| format!("creating {}", a.image.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, &image.file);
    let summary = merge_layer_files(&a.layers, &mut out, &opts).with_context(|| {
        format!(
            "merging {} layers into {}",
            a.layers.len(),
            a.image.display()
        )
    })?;
    out.flush()?;
    drop(out);
    image
        .commit()
        .with_context(|| format!("saving {}", a.image.display()))?;
    bar.finish_and_clear();
    if !a.quiet {
        eprintln!(
            "{}: {} layers, {} inodes ({} files, {} bytes in the layers, {} bytes copied), {} blocks of {} bytes, uuid {}, {:.0?}",
            a.image.display(),
            summary.device_blocks.len(),
            summary.inodes,
            summary.files,
            summary.file_bytes,
            summary.copied_bytes,
            summary.blocks,
            summary.block_size,
            uuid::Uuid::from_bytes(summary.uuid),
            start.elapsed()
        );
    }
    Ok(ExitCode::SUCCESS)
}
