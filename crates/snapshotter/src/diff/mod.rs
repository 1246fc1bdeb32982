//! The differ: OCI layers straight into `layer.erofs` (Apply), and layer diffs (Compare).

mod apply;
mod compare;
mod content;
mod mkfs;
mod pipeline;

pub use apply::{MEDIA_TYPE_EROFS, MEDIA_TYPE_TAR, is_unimplemented};
pub use compare::{DiffBlob, DiffCompression};
pub use content::{Blob, ContentSource, Descriptor, DirContent, Fallback, parse_digest};
pub use mkfs::{MkfsOptions, UuidChoice};
pub use pipeline::{Pipeline, StreamSummary};
