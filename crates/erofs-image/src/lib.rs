//! EROFS images without erofs-utils: build them from tar streams (full images and tar
//! indexes) and from directories, read them in userspace, and check them.
//!
//! This crate knows nothing of containerd or snapshots, and does no I/O of its own: it reads
//! and writes bytes through the readers and [`output::ImageOutput`]s it is given (reading a
//! source directory with `fdwalk`, for [`builder::dir_to_image`], and opening layer files by
//! path, for [`merge::merge_layer_files`], aside). Faster ways of writing images to
//! files (`copy_file_range`, `FALLOC_FL_INSERT_RANGE`, `O_DIRECT`) are outputs that live in
//! other crates.
//!
//! * [`tar`]: a streaming tar reader (ustar, GNU, PAX) and writer.
//! * [`compression`]: gzip/zstd detection and decompression with a bomb guard.
//! * [`builder`]: tar or directory to EROFS; OCI whiteouts become overlayfs whiteouts.
//! * [`reader`]: stat, readdir, read, xattrs and path lookup on an image.
//! * [`merge`]: fsmeta, one metadata-only image over a chain of layers (their devices, or
//!   the chain laid end to end as one disk).
//! * [`check`]: verify every invariant the kernel relies on, reporting each problem.
//! * [`format`](mod@format): the on-disk structures.
//! * [`output`]: where images are written.
//! * [`verify`]: a tar-index layer against its diffID (the tar inside, hashed).
#![forbid(unsafe_code)]

pub mod builder;
pub mod check;
pub mod compression;
pub mod debug;
pub mod error;
pub mod format;
pub mod merge;
pub mod output;
pub mod reader;
pub mod tar;
pub mod tree;
pub mod verify;

pub use builder::{
    BuildOptions, Interrupt, Limits, Summary, dir_to_image, tar_file_to_image,
    tar_file_to_index_file, tar_to_image, tar_to_index, tar_to_index_file,
};
pub use error::{Error, Result};
pub use merge::{MergeOptions, MergeSummary, merge_layer_files, merge_layers};
pub use output::{ImageOutput, PlainOutput};
pub use reader::{Image, Inode, ReadAt};
