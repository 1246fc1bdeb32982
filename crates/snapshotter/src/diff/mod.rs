//! The differ: OCI layers straight into `layer.erofs` (Apply), and layer diffs (Compare).

mod apply;
mod compare;
mod content;
mod media_type;
mod mkfs;
mod pipeline;

pub use apply::is_unimplemented;
pub use compare::DiffBlob;
pub use content::{Blob, ContentSource, Descriptor, DirContent, Fallback, parse_digest};
pub use media_type::{
    LayerType, MEDIA_TYPE_EROFS, MEDIA_TYPE_TAR, diff_compression, layer_type, oci_tar,
};
pub use mkfs::{MkfsOption, MkfsOptionError, MkfsOptions, UuidChoice};
pub use pipeline::{Pipeline, StreamSummary};
