//! The differ: OCI layers straight into `layer.erofs` (Apply), and layer diffs (Compare).

mod apply;
mod artifacts;
mod compare;
mod content;
mod media_type;
mod pipeline;

/// The differ's `mkfs_options` (also validated with the config, hence a module of its own).
pub use crate::mkfs::{MkfsOption, MkfsOptionError, MkfsOptions, UuidChoice};
pub use apply::is_unimplemented;
pub use compare::DiffBlob;
pub use content::{Blob, ContentSource, Descriptor, DirContent, Fallback, parse_digest};
pub use media_type::{
    LayerType, MEDIA_TYPE_EROFS, MEDIA_TYPE_TAR, diff_compression, layer_type, oci_tar,
};
pub use pipeline::{Pipeline, StreamSummary};
