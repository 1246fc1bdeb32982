//! Certificates for TLS tests, made with rcgen: a CA, a server certificate it signs for
//! `127.0.0.1` (an IP address SAN) and `localhost`, and a client CA with a client
//! certificate for mutual TLS. Written as PEM files into one directory.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The PEM files of a test PKI.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The server CA's certificate (what a client trusts).
    pub ca: PathBuf,
    /// The server certificate (leaf, then nothing: the CA is a root).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// The client CA's certificate (what the server trusts, `clientcas`).
    pub client_ca: PathBuf,
    /// A client certificate signed by the client CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Client certificate and key in one file.
    pub client_both: PathBuf,
    /// A client certificate signed by the *server* CA, which the server does not accept
    /// from clients.
    pub stranger_cert: PathBuf,
    /// Its key.
    pub stranger_key: PathBuf,
    /// A server certificate by the CA for `elsewhere.invalid` only (not this host).
    pub elsewhere_cert: PathBuf,
    /// Its key.
    pub elsewhere_key: PathBuf,
}

fn ca(name: &str) -> Result<(CertificateParams, KeyPair)> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok((p, KeyPair::generate()?))
}

fn leaf(name: &str, server: bool) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, name);
    if server {
        p.subject_alt_names = if name == "elsewhere.invalid" {
            vec![SanType::DnsName(name.try_into()?)]
        } else {
            vec![
                SanType::IpAddress("127.0.0.1".parse()?),
                SanType::DnsName("localhost".try_into()?),
            ]
        };
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

impl Pki {
    /// Generate everything into `dir` (created if missing).
    pub fn generate(dir: &Path) -> Result<Pki> {
        fs::create_dir_all(dir)?;
        let w = |name: &str, text: String| -> Result<PathBuf> {
            let p = dir.join(name);
            fs::write(&p, text)?;
            Ok(p)
        };
        let (ca_params, ca_key) = ca("erofs-snapshotter test CA")?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_issuer = Issuer::new(ca_params, &ca_key);
        let (cca_params, cca_key) = ca("erofs-snapshotter test client CA")?;
        let cca_cert = cca_params.self_signed(&cca_key)?;
        let cca_issuer = Issuer::new(cca_params, &cca_key);

        let server_key = KeyPair::generate()?;
        let server = leaf("registry", true)?.signed_by(&server_key, &ca_issuer)?;
        let client_key = KeyPair::generate()?;
        let client = leaf("node", false)?.signed_by(&client_key, &cca_issuer)?;
        let stranger_key = KeyPair::generate()?;
        let stranger = leaf("stranger", false)?.signed_by(&stranger_key, &ca_issuer)?;
        let elsewhere_key = KeyPair::generate()?;
        let elsewhere = leaf("elsewhere.invalid", true)?.signed_by(&elsewhere_key, &ca_issuer)?;
        Ok(Pki {
            ca: w("ca.pem", ca_cert.pem())?,
            server_cert: w("server.pem", server.pem())?,
            server_key: w("server.key", server_key.serialize_pem())?,
            client_ca: w("client-ca.pem", cca_cert.pem())?,
            client_cert: w("client.pem", client.pem())?,
            client_key: w("client.key", client_key.serialize_pem())?,
            client_both: w(
                "client-both.pem",
                format!("{}{}", client.pem(), client_key.serialize_pem()),
            )?,
            stranger_cert: w("stranger.pem", stranger.pem())?,
            stranger_key: w("stranger.key", stranger_key.serialize_pem())?,
            elsewhere_cert: w("elsewhere.pem", elsewhere.pem())?,
            elsewhere_key: w("elsewhere.key", elsewhere_key.serialize_pem())?,
        })
    }
}
