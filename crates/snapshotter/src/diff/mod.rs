//! The differ: OCI layers straight into `layer.erofs` (Apply), and layer diffs (Compare).

mod mkfs;

pub use mkfs::{MkfsOptions, UuidChoice};
