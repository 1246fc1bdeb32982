//! The registry side of erofs-snapshotter's layer artifacts (tar index, dm-verity tree, root-hash
//! signature), with no containerd knowledge:
//!
//! * [`artifacts`]: the format: media types, annotation keys and the referrer manifest that
//!   attaches a set of artifacts to an image manifest (OCI 1.1 `subject`), with strict parsing
//!   of what a registry returns;
//! * [`client`]: a small blocking OCI distribution client (HTTP and HTTPS, basic and
//!   bearer-token auth, extra headers): blobs and manifests, and referrers through the Referrers API or the referrers tag
//!   schema (`sha256-<hex>`) for registries without it ([`http`] underneath);
//! * [`signature`]: ed25519 signatures of root hashes and their key files;
//! * [`tls`]: TLS settings (roots, client certificates, `skip_verify`) for `https://`;

pub mod artifacts;
pub mod client;
pub mod error;
pub mod http;
pub mod reference;
pub mod signature;
pub mod tls;

pub use error::{Error, Result};
pub use reference::Reference;
