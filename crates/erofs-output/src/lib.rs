//! Linux outputs for [`erofs_image`]'s builders: the same bytes as a plain file, written
//! faster.
//!
//! * [`FileOutput`]: ordinary writes, with ranges of an input file copied in the kernel
//!   (`copy_file_range`: no userspace copy, a reflink where the filesystem can) and room made
//!   in front of a file without moving its data (`FALLOC_FL_INSERT_RANGE`).
//! * [`DirectFile`]: the same, with the data area of a full image (or a streamed tar)
//!   written with `O_DIRECT` from a helper thread.
//!
//! Both fall back to ordinary reads and writes wherever the kernel or the filesystem refuses
//! the faster way, so they work on any file.
#![forbid(unsafe_code)]

mod direct;
mod file;

pub use direct::DirectFile;
pub use file::{FileOutput, copy_file_range_at, insert_range};
