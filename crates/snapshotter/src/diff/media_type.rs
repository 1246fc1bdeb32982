//! Layer media types and the [`Compression`] they name: what Apply accepts and what Compare
//! produces.

use erofs_image::compression::Compression;

use crate::error::{Error, Result};

/// The media type of an uncompressed OCI layer (what Apply returns for tar layers).
pub const MEDIA_TYPE_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Native EROFS layers.
pub const MEDIA_TYPE_EROFS: &str = "application/vnd.erofs.layer.v1";

/// The tar layer types Apply takes, before their compression suffix.
const TAR_TYPES: [&str; 4] = [
    MEDIA_TYPE_TAR,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar",
];

/// What a layer blob is, by its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// A tar layer. Apply detects the compression from the stream itself; this is what the
    /// media type claims.
    Tar(Compression),
    /// A ready EROFS image, plain or zstd-compressed.
    Erofs(Compression),
}

/// The compression a suffix names: none, `+NAME` (OCI) or `.NAME` (Docker; both spellings are
/// taken for both families, as containerd does).
fn suffix(rest: &str) -> Option<Compression> {
    if rest.is_empty() {
        return Some(Compression::None);
    }
    let name = rest.strip_prefix('+').or_else(|| rest.strip_prefix('.'))?;
    Compression::from_name(name)
}

/// Classify a layer media type. Encrypted layers and unknown types are Unimplemented (containerd
/// then tries the next differ, which may have the stream processors they need); an EROFS layer
/// with a compression we cannot read is InvalidArgument.
pub fn layer_type(media_type: &str) -> Result<LayerType> {
    if let Some(rest) = media_type.strip_prefix(MEDIA_TYPE_EROFS) {
        return match rest.strip_prefix('+').and_then(Compression::from_name) {
            _ if rest.is_empty() => Ok(LayerType::Erofs(Compression::None)),
            Some(Compression::Zstd) => Ok(LayerType::Erofs(Compression::Zstd)),
            _ => Err(Error::invalid_argument(format!(
                "unsupported erofs layer suffix {rest:?}"
            ))),
        };
    }
    for t in TAR_TYPES {
        if let Some(c) = media_type.strip_prefix(t).and_then(suffix) {
            return Ok(LayerType::Tar(c));
        }
    }
    Err(Error::unimplemented(format!(
        "media type {media_type:?} is not handled by the EROFS differ"
    )))
}

/// The OCI media type of a tar layer with compression `c`.
pub fn oci_tar(c: Compression) -> String {
    match c.name() {
        None => MEDIA_TYPE_TAR.to_string(),
        Some(name) => format!("{MEDIA_TYPE_TAR}+{name}"),
    }
}

/// The compression Compare writes for a requested media type (empty: gzip, containerd's
/// default) and the media type of the result. Only OCI tar types are produced; others are
/// Unimplemented (containerd's rule, so the next differ may try).
pub fn diff_compression(media_type: &str) -> Result<(Compression, String)> {
    if media_type.is_empty() {
        return Ok((Compression::Gzip, oci_tar(Compression::Gzip)));
    }
    Compression::ALL
        .into_iter()
        .find(|&c| oci_tar(c) == media_type)
        .map(|c| (c, media_type.to_string()))
        .ok_or_else(|| {
            Error::unimplemented(format!("diff media type {media_type:?} is not supported"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn layer_types() {
        for (t, c) in [
            ("application/vnd.oci.image.layer.v1.tar", Compression::None),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Compression::Zstd,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar",
                Compression::None,
            ),
        ] {
            assert_eq!(layer_type(t).unwrap(), LayerType::Tar(c), "{t}");
        }
        assert_eq!(
            layer_type("application/vnd.erofs.layer.v1").unwrap(),
            LayerType::Erofs(Compression::None)
        );
        assert_eq!(
            layer_type("application/vnd.erofs.layer.v1+zstd").unwrap(),
            LayerType::Erofs(Compression::Zstd)
        );
        for bad in ["+lz4", "+gzip", ".zstd", "zstd"] {
            let t = format!("application/vnd.erofs.layer.v1{bad}");
            assert_eq!(
                layer_type(&t).unwrap_err().kind(),
                ErrorKind::InvalidArgument,
                "{t}"
            );
        }
        for other in [
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
            "application/vnd.oci.image.layer.v1.tar+xz",
            "application/vnd.oci.image.layer.v1.targzip",
            "application/json",
        ] {
            assert_eq!(
                layer_type(other).unwrap_err().kind(),
                ErrorKind::Unimplemented,
                "{other}"
            );
        }
    }

    #[test]
    fn diff_media_types() {
        assert_eq!(
            diff_compression("").unwrap(),
            (
                Compression::Gzip,
                "application/vnd.oci.image.layer.v1.tar+gzip".to_string()
            )
        );
        for c in Compression::ALL {
            assert_eq!(diff_compression(&oci_tar(c)).unwrap().0, c);
        }
        assert_eq!(
            diff_compression("application/vnd.docker.image.rootfs.diff.tar.gzip")
                .unwrap_err()
                .kind(),
            ErrorKind::Unimplemented
        );
    }
}
