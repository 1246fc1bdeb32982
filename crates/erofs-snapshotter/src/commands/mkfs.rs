//! `mkfs`: directory or tar stream to an EROFS image.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use erofs_image::compression::{BombGuard, Compression, Decompressed};
use erofs_image::{BuildOptions, Summary};
use indicatif::{ProgressBar, ProgressStyle};
use snapshotter::diff::{MkfsOption, MkfsOptions};

use crate::cli::{MkfsArgs, TarMode};
use crate::output::PendingFile;

/// The build options `a` asks for: mkfs.erofs's defaults (inline data, a random UUID), then
/// the options, through the same parser as the differ's `mkfs_options`.
fn options(a: &MkfsArgs) -> anyhow::Result<BuildOptions> {
    let mut mkfs = MkfsOptions::default();
    let given = [
        a.block_size.as_deref().map(MkfsOption::BlockSize),
        a.timestamp.as_deref().map(MkfsOption::Timestamp),
        // clap keeps only the last of the two.
        a.all_time.then_some(MkfsOption::AllTime),
        a.mkfs_time.then_some(MkfsOption::MkfsTime),
        a.uuid.as_deref().map(MkfsOption::Uuid),
        a.sort.as_deref().map(MkfsOption::Sort),
        a.aufs.then_some(MkfsOption::Aufs),
    ];
    let extended = a.extended.iter().map(|e| MkfsOption::Extended(e));
    for opt in given.into_iter().flatten().chain(extended) {
        mkfs.set(opt)?;
    }
    let mut opts = BuildOptions {
        uuid: *uuid::Uuid::new_v4().as_bytes(),
        max_image_size: a.max_size,
        ..Default::default()
    };
    mkfs.apply(&mut opts);
    opts.validate()?;
    Ok(opts)
}

/// Counts bytes into a progress bar.
struct Progress<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn progress_bar(total: Option<u64>, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    match total {
        Some(t) => ProgressBar::new(t).with_style(
            ProgressStyle::with_template(
                "{spinner} {bytes}/{total_bytes} read ({bytes_per_sec}, {eta} left) {wide_bar}",
            )
            .expect("valid template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} read ({bytes_per_sec})")
                .expect("valid template"),
        ),
    }
}

/// Whether `source` is a regular file that is not gzip or zstd.
fn plain_file(source: &Path) -> bool {
    let Ok(f) = File::open(source) else {
        return false;
    };
    if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return false;
    }
    let mut head = [0u8; 4];
    let n = f.read_at(&mut head, 0).unwrap_or(0);
    Compression::detect(&head[..n]) == Compression::None
}

/// Open a tar source (`-` = stdin), decompressing gzip or zstd.
fn open_tar(source: &Path, bar: &ProgressBar) -> anyhow::Result<snapshotter::diff::Pipeline> {
    let raw: Box<dyn Read + Send> = if source == Path::new("-") {
        Box::new(io::stdin())
    } else {
        let f = File::open(source).with_context(|| format!("opening {}", source.display()))?;
        if let Ok(md) = f.metadata()
            && md.is_file()
        {
            bar.set_length(md.len());
        }
        Box::new(f)
    };
    let dec = Decompressed::new(
        Progress {
            inner: raw,
            bar: bar.clone(),
        },
        BombGuard::default(),
    )
    .with_context(|| format!("reading {}", source.display()))?;
    // Decompress on its own thread: gunzip is the bottleneck and the tar walk overlaps it.
    Ok(snapshotter::diff::Pipeline::start(Box::new(dec)))
}

/// Write the image `a` asks for into `image`.
fn build(
    a: &MkfsArgs,
    opts: &BuildOptions,
    image: &mut PendingFile,
    bar: &ProgressBar,
) -> anyhow::Result<Summary> {
    Ok(match a.tar {
        None => {
            if a.source == Path::new("-") {
                bail!("a directory source cannot be `-`; use --tar to read a tar stream");
            }
            erofs_image::dir_to_image(&a.source, &mut image.file, opts).with_context(|| {
                format!("building {} from {}", a.image.display(), a.source.display())
            })?
        }
        Some(mode) if a.tar_out.is_none() && plain_file(&a.source) => {
            // An uncompressed tar file: data moves file to file in the kernel.
            let input =
                File::open(&a.source).with_context(|| format!("opening {}", a.source.display()))?;
            let out = erofs_output::FileOutput::new(&image.file);
            let r = if mode == TarMode::F {
                erofs_image::tar_file_to_image(&input, out, opts)
            } else {
                erofs_image::tar_file_to_index_file(&input, out, opts)
            };
            r.with_context(|| format!("converting {}", a.source.display()))?
        }
        Some(TarMode::F) => {
            let input = open_tar(&a.source, bar)?;
            // The data goes to disk with O_DIRECT (see erofs_output::DirectFile).
            erofs_image::tar_to_image(input, erofs_output::DirectFile::new(&image.file), opts)
                .with_context(|| format!("converting {}", a.source.display()))?
        }
        Some(TarMode::I) => {
            let input = open_tar(&a.source, bar)?;
            match &a.tar_out {
                Some(tar_out) => {
                    let tar = PendingFile::create(tar_out)
                        .with_context(|| format!("creating {}", tar_out.display()))?;
                    let idx = erofs_image::tar_to_index(
                        input,
                        BufWriter::with_capacity(1 << 20, &tar.file),
                        opts,
                    )
                    .with_context(|| format!("indexing {}", a.source.display()))?;
                    image
                        .file
                        .write_all_at(&idx.index, 0)
                        .context("writing the index")?;
                    tar.commit().context("saving the tar")?;
                    idx.summary
                }
                // The tar skips the page cache: the insert in front drops its pages anyway.
                None => erofs_image::tar_to_index_file(
                    input,
                    erofs_output::DirectFile::new(&image.file),
                    opts,
                )
                .with_context(|| format!("indexing {}", a.source.display()))?,
            }
        }
    })
}

pub fn run(a: MkfsArgs) -> anyhow::Result<ExitCode> {
    let opts = options(&a)?;
    let bar = progress_bar(None, a.quiet);
    let mut image =
        PendingFile::create(&a.image).with_context(|| format!("creating {}", a.image.display()))?;
    let out = image
        .file
        .try_clone()
        .context("duplicating the image descriptor")?;
    // The image goes to disk while it is built; the commit's fsync waits only for the tail.
    let summary = snapshotter::writeback::during(&out, || build(&a, &opts, &mut image, &bar))?;
    image.file.flush()?;
    image
        .commit()
        .with_context(|| format!("saving {}", a.image.display()))?;
    bar.finish_and_clear();
    if !a.quiet {
        eprintln!(
            "{}: {} inodes, {} blocks of {} bytes, uuid {}",
            a.image.display(),
            summary.inodes,
            summary.blocks,
            summary.block_size,
            uuid::Uuid::from_bytes(summary.uuid)
        );
    }
    Ok(ExitCode::SUCCESS)
}
