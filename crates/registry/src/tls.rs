//! TLS for `https://` registries: rustls with the ring provider (no C toolchain beyond what
//! ring's few assembly files need; aws-lc-rs would need cmake).
//!
//! * Roots: the system's trust store, through `rustls-native-certs` (which honours
//!   `SSL_CERT_FILE`/`SSL_CERT_DIR` and finds the bundle of each distribution, Debian's
//!   `/etc/ssl/certs/ca-certificates.crt` among them, so CAs an administrator added with
//!   `update-ca-certificates` are trusted, unlike with a compiled-in list), plus the
//!   [`TlsOptions::ca_files`]. The system store is read once per process.
//! * Client certificates (mutual TLS): each a certificate chain file and a key file, or one PEM
//!   file holding both (containerd's `client = [["cert", "key"]]` and `["both.pem", ""]`).
//!   With several, the first whose key can sign with a scheme the server offers is sent.
//! * [`TlsOptions::skip_verify`]: any server certificate is accepted (chain, expiry and name are
//!   not checked; the handshake signatures still are, so the peer must hold the key of the
//!   certificate it shows). Anyone on the path can then impersonate the registry: what is
//!   fetched is only as trustworthy as its digests, and credentials sent to it are exposed.
//!   A warning is logged once per endpoint and process.
//!
//! The server name checked (and sent as SNI) is the URL's host; an IP address is checked
//! against the certificate's IP address SANs.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};

use crate::error::{Error, Result};

/// Largest certificate or key file read.
const MAX_PEM_FILE: u64 = 1 << 20;

/// TLS settings of a client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM files of CA certificates trusted in addition to the system's.
    pub ca_files: Vec<PathBuf>,
    /// Client certificates offered for mutual TLS.
    pub client_certs: Vec<ClientCert>,
    /// Accept any server certificate (see the module docs: dangerous).
    pub skip_verify: bool,
}

/// One client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// PEM file with the certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM file with its private key (PKCS#8, PKCS#1 or SEC1); `None`: in `cert`.
    pub key: Option<PathBuf>,
}

/// What is wrong with TLS settings or a TLS connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file cannot be read or holds nothing usable.
    #[error("{}: {message}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The system's trust store holds no certificate and no CA file was given.
    #[error("no trusted root certificates: the system store is empty or unreadable ({0})")]
    NoRoots(String),
    /// The server's certificate is not signed by a trusted CA.
    #[error(
        "the server certificate is signed by an unknown issuer (not in the system roots nor the CA files)"
    )]
    UnknownIssuer,
    /// The server's certificate is not for the host asked for.
    #[error("the server certificate is not valid for {0}")]
    WrongName(String),
    /// The server's certificate is expired or not yet valid.
    #[error("the server certificate is expired or not yet valid")]
    Expired,
    /// The server's certificate was refused for another reason.
    #[error("the server certificate is refused: {0}")]
    BadCertificate(String),
    /// The server refused our client certificate, or asked for one we did not have.
    #[error("the server refused the client certificate (or requires one): alert {0}")]
    ClientCertRefused(String),
    /// The handshake failed otherwise.
    #[error("{0}")]
    Handshake(String),
}

impl TlsError {
    fn file(path: &Path, message: impl Into<String>) -> TlsError {
        TlsError::File {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    /// Map a rustls error seen on a connection to `host`.
    pub(crate) fn from_rustls(e: &rustls::Error, host: &str) -> TlsError {
        use rustls::Error as R;
        match e {
            R::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => TlsError::UnknownIssuer,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    TlsError::WrongName(host.to_string())
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => TlsError::Expired,
                other => TlsError::BadCertificate(format!("{other:?}")),
            },
            R::AlertReceived(
                a @ (AlertDescription::CertificateRequired
                | AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::AccessDenied),
            ) => TlsError::ClientCertRefused(format!("{a:?}")),
            other => TlsError::Handshake(other.to_string()),
        }
    }
}

/// The rustls error inside an I/O error from a TLS stream, if that is what it is.
pub(crate) fn rustls_cause(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The system's roots, read once (a few ms for a full bundle).
fn system_roots() -> &'static (RootCertStore, String) {
    static R: OnceLock<(RootCertStore, String)> = OnceLock::new();
    R.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let mut store = RootCertStore::empty();
        let (added, ignored) = store.add_parsable_certificates(found.certs);
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        if !errors.is_empty() {
            tracing::warn!(errors = %errors.join("; "), "reading the system's root certificates");
        }
        tracing::debug!(added, ignored, "system root certificates");
        (store, errors.join("; "))
    })
}

/// Read a PEM file, bounded.
fn read_pem(path: &Path) -> std::result::Result<Vec<u8>, TlsError> {
    let f = std::fs::File::open(path).map_err(|e| TlsError::file(path, e.to_string()))?;
    let mut b = Vec::new();
    f.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut b)
        .map_err(|e| TlsError::file(path, e.to_string()))?;
    if b.len() as u64 > MAX_PEM_FILE {
        return Err(TlsError::file(
            path,
            format!("larger than {MAX_PEM_FILE} bytes"),
        ));
    }
    Ok(b)
}

fn certs_of(
    path: &Path,
    pem: &[u8],
) -> std::result::Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| TlsError::file(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::file(path, "no CERTIFICATE in the PEM file"));
    }
    Ok(certs)
}

/// [`TlsOptions`] made into what connections use: certificates and keys read and checked.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    config: Arc<ClientConfig>,
    skip_verify: bool,
}

impl TlsConfig {
    /// Read the files `opts` names (and the system roots, once per process).
    pub fn new(opts: &TlsOptions) -> std::result::Result<TlsConfig, TlsError> {
        Ok(TlsConfig {
            config: client_config(opts)?,
            skip_verify: opts.skip_verify,
        })
    }

    pub(crate) fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    pub(crate) fn skip_verify(&self) -> bool {
        self.skip_verify
    }
}

fn client_config(opts: &TlsOptions) -> std::result::Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    let builder = if opts.skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider.clone())))
    } else {
        let (system, why) = system_roots();
        let mut roots = system.clone();
        for path in &opts.ca_files {
            let certs = certs_of(path, &read_pem(path)?)?;
            for c in certs {
                roots.add(c).map_err(|e| {
                    TlsError::file(path, format!("not a usable CA certificate: {e}"))
                })?;
            }
        }
        if roots.is_empty() {
            return Err(TlsError::NoRoots(if why.is_empty() {
                "none found".into()
            } else {
                why.clone()
            }));
        }
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| {
                    TlsError::Handshake(format!("building the certificate verifier: {e}"))
                })?;
        builder.with_webpki_verifier(verifier)
    };
    let mut keys = Vec::new();
    for c in &opts.client_certs {
        let pem = read_pem(&c.cert)?;
        let chain = certs_of(&c.cert, &pem)?;
        let (key_path, key_pem) = match &c.key {
            Some(k) => (k.as_path(), read_pem(k)?),
            None => (c.cert.as_path(), pem),
        };
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            TlsError::file(
                key_path,
                format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
            )
        })?;
        let ck = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            TlsError::file(
                key_path,
                format!("key for client certificate {}: {e}", c.cert.display()),
            )
        })?;
        keys.push(Arc::new(ck));
    }
    let config = if keys.is_empty() {
        builder.with_no_client_auth()
    } else {
        builder.with_client_cert_resolver(Arc::new(ClientCerts(keys)))
    };
    Ok(Arc::new(config))
}

/// The server name to check for `host` (`name`, `1.2.3.4`, `[::1]`, without the port).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>> {
    let h = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(h.to_string())
        .map_err(|e| Error::Protocol(format!("{host:?} is not a TLS server name: {e}")))
}

/// Log the `skip_verify` warning for `authority` once per process.
pub(crate) fn warn_skip_verify(authority: &str) {
    static WARNED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut w = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if w.get_or_insert_with(HashSet::new)
        .insert(authority.to_string())
    {
        tracing::warn!(
            endpoint = authority,
            "TLS certificate verification is off (skip_verify): anyone on the network path can impersonate this registry"
        );
    }
}

/// Client certificates: the first whose key can sign with a scheme the server offers.
#[derive(Debug)]
struct ClientCerts(Vec<Arc<CertifiedKey>>);

impl ResolvesClientCert for ClientCerts {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0
            .iter()
            .find(|k| k.key.choose_scheme(sigschemes).is_some())
            .cloned()
    }

    fn has_certs(&self) -> bool {
        !self.0.is_empty()
    }
}

/// `skip_verify`: every certificate is accepted, handshake signatures are still verified
/// (with the certificate's key), so the session is at least with whoever holds that key.
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_say_which_and_why() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("missing.pem");
        let e = client_config(&TlsOptions {
            ca_files: vec![missing.clone()],
            ..TlsOptions::default()
        })
        .unwrap_err();
        assert!(
            matches!(&e, TlsError::File { path, .. } if *path == missing),
            "{e}"
        );
        let junk = d.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = client_config(&TlsOptions {
            ca_files: vec![junk.clone()],
            ..TlsOptions::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
        let big = d.path().join("big.pem");
        std::fs::write(&big, vec![b'#'; MAX_PEM_FILE as usize + 1]).unwrap();
        let e = client_config(&TlsOptions {
            ca_files: vec![big],
            ..TlsOptions::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        // A client certificate whose file holds no key.
        let ca = rcgen::generate_simple_self_signed(vec!["c".into()]).unwrap();
        let cert = d.path().join("c.pem");
        std::fs::write(&cert, ca.cert.pem()).unwrap();
        let e = client_config(&TlsOptions {
            client_certs: vec![ClientCert {
                cert: cert.clone(),
                key: None,
            }],
            ..TlsOptions::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("no usable private key"), "{e}");
        // A key that is not the certificate's.
        let other = rcgen::KeyPair::generate().unwrap();
        let key = d.path().join("other.key");
        std::fs::write(&key, other.serialize_pem()).unwrap();
        let e = client_config(&TlsOptions {
            client_certs: vec![ClientCert {
                cert: cert.clone(),
                key: Some(key),
            }],
            ..TlsOptions::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("key for client certificate"), "{e}");
        // Certificate and key in one file.
        std::fs::write(
            &cert,
            format!("{}{}", ca.cert.pem(), ca.signing_key.serialize_pem()),
        )
        .unwrap();
        client_config(&TlsOptions {
            client_certs: vec![ClientCert { cert, key: None }],
            skip_verify: true,
            ..TlsOptions::default()
        })
        .unwrap();
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("r.example").unwrap(),
            ServerName::DnsName(_)
        ));
    }
}
