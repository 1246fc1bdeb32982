//! Where layer blobs come from: containerd's content store directory, or its Content service
//! (implemented by the gRPC crate), tried in that order.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use crate::cancel::Cancel;
use crate::error::{Error, ErrorKind, Result};

/// An OCI descriptor as containerd passes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// `algorithm:hex`.
    pub digest: String,
    /// Size in bytes.
    pub size: i64,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
}

/// A source of blob bytes.
pub trait ContentSource: Send + Sync + std::fmt::Debug {
    /// Open the blob `desc` for reading, in containerd namespace `namespace`. Reads stop
    /// (fail) once `cancel` trips, also while waiting for bytes that do not come.
    fn open(&self, desc: &Descriptor, namespace: &str, cancel: &Cancel) -> Result<Blob>;
}

impl<T: ContentSource + ?Sized> ContentSource for std::sync::Arc<T> {
    fn open(&self, desc: &Descriptor, namespace: &str, cancel: &Cancel) -> Result<Blob> {
        (**self).open(desc, namespace, cancel)
    }
}

impl<T: ContentSource + ?Sized> ContentSource for Box<T> {
    fn open(&self, desc: &Descriptor, namespace: &str, cancel: &Cancel) -> Result<Blob> {
        (**self).open(desc, namespace, cancel)
    }
}

/// An open blob: a stream, and the file behind it when there is one (for copy_file_range).
pub struct Blob {
    /// The bytes.
    pub reader: Box<dyn Read + Send>,
    /// The file, when read from the content store directory.
    pub file: Option<File>,
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob").field("file", &self.file).finish()
    }
}

/// Split and check a digest: `sha256:` followed by 64 lowercase hex digits.
pub fn parse_digest(d: &str) -> Result<(&str, &str)> {
    let (alg, hex) = d
        .split_once(':')
        .ok_or_else(|| Error::invalid_argument(format!("invalid digest {d:?}")))?;
    let ok = match alg {
        "sha256" => hex.len() == 64,
        "sha384" => hex.len() == 96,
        "sha512" => hex.len() == 128,
        _ => false,
    } && hex
        .bytes()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    if !ok {
        return Err(Error::invalid_argument(format!("invalid digest {d:?}")));
    }
    Ok((alg, hex))
}

/// containerd's content store directory (`ROOT/blobs/ALG/HEX`).
#[derive(Debug, Clone)]
pub struct DirContent {
    root: PathBuf,
}

impl DirContent {
    /// A store rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirContent { root: root.into() }
    }
}

impl ContentSource for DirContent {
    fn open(&self, desc: &Descriptor, _namespace: &str, cancel: &Cancel) -> Result<Blob> {
        let (alg, hex) = parse_digest(&desc.digest)?;
        let path = self.root.join("blobs").join(alg).join(hex);
        let f = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::not_found(format!("blob {} not in {}", desc.digest, path.display()))
            }
            _ => Error::io(format!("opening {}", path.display()), e),
        })?;
        let len = f
            .metadata()
            .map_err(|e| Error::io("stat of a blob", e))?
            .len();
        if desc.size >= 0 && len != desc.size as u64 {
            return Err(Error::failed_precondition(format!(
                "blob {} is {len} bytes, descriptor says {}",
                desc.digest, desc.size
            )));
        }
        Ok(Blob {
            reader: Box::new(
                cancel.reader(f.try_clone().map_err(|e| Error::io("opening a blob", e))?),
            ),
            file: Some(f),
        })
    }
}

/// Try `first`, and on anything but success ask `second` (for example: the local directory
/// is not readable from this mount namespace, or the blob is not there yet).
#[derive(Debug)]
pub struct Fallback<A, B> {
    /// Tried first.
    pub first: A,
    /// Tried when `first` fails.
    pub second: B,
}

impl<A: ContentSource, B: ContentSource> ContentSource for Fallback<A, B> {
    fn open(&self, desc: &Descriptor, namespace: &str, cancel: &Cancel) -> Result<Blob> {
        match self.first.open(desc, namespace, cancel) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == ErrorKind::InvalidArgument => Err(e),
            Err(e) => {
                tracing::debug!(digest = %desc.digest, error = %e, "content store directory unavailable; reading over gRPC");
                self.second.open(desc, namespace, cancel)
            }
        }
    }
}
