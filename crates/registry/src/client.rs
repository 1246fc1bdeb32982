//! A blocking OCI distribution client for one registry host: manifests and blobs (GET, HEAD,
//! PUT), and referrers through the Referrers API or, on registries without it, the OCI 1.1
//! referrers tag schema (`sha256-<hex>` holding an OCI index).
//!
//! Supported: HTTPS (the default; [`crate::tls`]: system roots plus CA files, client
//! certificates, `skip_verify`) and plain HTTP; extra headers sent on every request to the
//! registry host ([`ClientOptions::headers`]); no credentials, HTTP basic credentials, or a
//! fixed bearer token; and the registry token flow (`401` with `WWW-Authenticate: Bearer
//! realm=…,service=…,scope=…`: a token is fetched from the realm, over HTTP or HTTPS as it
//! says, with the basic credentials if any, and cached). Every
//! request has a connect timeout, a per-read timeout and an overall deadline
//! ([`ClientOptions`]); manifests are bounded to [`MAX_MANIFEST_BYTES`] and blobs to the
//! caller's limit; every manifest and blob read by digest is checked against it.

use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::artifacts::{
    self, Descriptor, EMPTY_BLOB, EMPTY_DIGEST, Index, MAX_MANIFEST_BYTES, MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST, Manifest,
    check_digest,
};
use crate::error::{Error, Result};
use crate::http::{self, Limits, Response, Scheme, Url};
use crate::reference::check_repository;
use crate::tls::{TlsConfig, TlsError, TlsOptions};

/// Credentials for a registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// HTTP basic (also sent to the token realm).
    Basic {
        /// User name.
        username: String,
        /// Password or identity token.
        password: String,
    },
    /// A bearer token sent as is.
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credentials::Bearer(_) => write!(f, "Bearer(***)"),
        }
    }
}

/// How a [`Client`] talks to its registry.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for any single read or write.
    pub io_timeout: Duration,
    /// Longest a whole request may take, body included (`None`: only the per-read timeout).
    pub request_timeout: Option<Duration>,
    /// Credentials, if any.
    pub credentials: Option<Credentials>,
    /// TLS settings for `https` (the registry, and any token realm or redirect over https).
    pub tls: TlsOptions,
    /// Headers added to every request to the registry host and to its token realm (as
    /// containerd does), not to other hosts it redirects to; names and values without line
    /// breaks.
    pub headers: Vec<(String, String)>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            request_timeout: None,
            credentials: None,
            tls: TlsOptions::default(),
            headers: Vec::new(),
        }
    }
}

/// A manifest as fetched.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// The exact bytes (their digest is the manifest's).
    pub bytes: Vec<u8>,
    /// `Content-Type` of the answer (or the manifest's own `mediaType`).
    pub media_type: String,
    /// `sha256:` of the bytes.
    pub digest: String,
}

impl FetchedManifest {
    /// Its descriptor.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.bytes.len() as u64,
            artifact_type: None,
            annotations: Default::default(),
        }
    }
}

/// How referrers were found or recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferrersVia {
    /// The registry's Referrers API (`GET /v2/<name>/referrers/<digest>`, or a manifest PUT
    /// answered with `OCI-Subject`).
    Api,
    /// The referrers tag `sha256-<hex>`.
    Tag,
}

/// The result of pushing a referrer manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedReferrer {
    /// Digest of the referrer manifest.
    pub digest: String,
    /// How it was made findable.
    pub via: ReferrersVia,
}

/// A client for one registry host.
#[derive(Debug)]
pub struct Client {
    scheme: Scheme,
    authority: String,
    opts: ClientOptions,
    /// Built from `opts.tls` on first use (at once for an https registry).
    tls: OnceLock<std::result::Result<TlsConfig, TlsError>>,
    /// Token from the realm, reused until a 401 asks for a new one.
    token: Mutex<Option<String>>,
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

impl Client {
    /// A client for `https://host[:port]` or `http://host[:port]`; a bare `host[:port]` is
    /// https. For https the TLS settings are read here, so a bad CA or key file fails now.
    pub fn new(host: &str, opts: ClientOptions) -> Result<Client> {
        let url = if host.contains("://") {
            host.to_string()
        } else {
            format!("https://{host}")
        };
        let u = Url::parse(&url)?;
        if u.target != "/" {
            return Err(Error::Unsupported(format!(
                "{host}: a registry endpoint with a path"
            )));
        }
        for (k, v) in &opts.headers {
            if k.is_empty() || k.contains([':', '\r', '\n']) || v.contains(['\r', '\n']) {
                return Err(Error::Protocol(format!(
                    "header {k:?} is not a valid header"
                )));
            }
        }
        let c = Client {
            scheme: u.scheme,
            authority: u.authority,
            opts,
            tls: OnceLock::new(),
            token: Mutex::new(None),
        };
        if c.scheme == Scheme::Https {
            c.tls_config()?;
        }
        Ok(c)
    }

    /// `host[:port]`.
    pub fn host(&self) -> &str {
        &self.authority
    }

    /// `https` or `http`.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    fn tls_config(&self) -> Result<&TlsConfig> {
        self.tls
            .get_or_init(|| TlsConfig::new(&self.opts.tls))
            .as_ref()
            .map_err(|e| Error::Tls {
                host: self.authority.clone(),
                reason: e.clone(),
            })
    }

    /// The TLS settings if `url` needs them.
    fn tls_for(&self, url: &Url) -> Result<Option<&TlsConfig>> {
        match url.scheme {
            Scheme::Https => self.tls_config().map(Some),
            Scheme::Http => Ok(None),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            connect: self.opts.connect_timeout,
            io: self.opts.io_timeout,
            total: self.opts.request_timeout,
        }
    }

    fn url(&self, target: &str) -> Url {
        Url {
            scheme: self.scheme,
            authority: self.authority.clone(),
            target: target.to_string(),
        }
    }

    /// `base`, then `Authorization: auth` if given, then the endpoint's configured headers:
    /// what a request to this registry (or its token realm) carries.
    fn own_headers<'a>(
        &'a self,
        base: &[(&'a str, &'a str)],
        auth: Option<&'a str>,
    ) -> Vec<(&'a str, &'a str)> {
        let mut h = base.to_vec();
        h.extend(auth.map(|a| ("Authorization", a)));
        h.extend(
            self.opts
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        h
    }

    fn auth_header(&self) -> Option<String> {
        if let Some(t) = self.token.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(format!("Bearer {t}"));
        }
        match &self.opts.credentials {
            Some(Credentials::Bearer(t)) => Some(format!("Bearer {t}")),
            Some(Credentials::Basic { username, password }) => Some(basic(username, password)),
            None => None,
        }
    }

    /// One request with authentication: on a 401 that names a token realm, fetch a token
    /// and try once more. Follows up to 5 redirects (blob storage), without credentials to
    /// other hosts.
    fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response> {
        let mut url = self.url(target);
        let mut retried_auth = false;
        for _ in 0..6 {
            let own = url.authority == self.authority && url.scheme == self.scheme;
            let auth = own.then(|| self.auth_header()).flatten();
            let h = if own {
                self.own_headers(headers, auth.as_deref())
            } else {
                headers.to_vec()
            };
            let r = http::send(method, &url, &h, body, &self.limits(), self.tls_for(&url)?)?;
            tracing::trace!(method, url = %url.to_url_string(), status = r.status, "registry request");
            match r.status {
                401 if !retried_auth && own => {
                    let challenge = r.header("www-authenticate").unwrap_or("").to_string();
                    retried_auth = true;
                    if let Some(b) = challenge
                        .strip_prefix("Bearer ")
                        .or_else(|| challenge.strip_prefix("bearer "))
                    {
                        let token = self.fetch_token(b)?;
                        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
                        continue;
                    }
                    return Ok(r);
                }
                301 | 302 | 303 | 307 | 308 if matches!(method, "GET" | "HEAD") => {
                    let loc = r.header("location").ok_or_else(|| {
                        Error::Protocol(format!("redirect from {target} without Location"))
                    })?;
                    url = if loc.starts_with('/') {
                        Url {
                            scheme: url.scheme,
                            authority: url.authority.clone(),
                            target: loc.to_string(),
                        }
                    } else {
                        Url::parse(loc)?
                    };
                }
                _ => return Ok(r),
            }
        }
        Err(Error::Protocol(format!(
            "{method} {target}: too many redirects"
        )))
    }

    /// Get a token for the challenge parameters `realm="…",service="…",scope="…"`.
    fn fetch_token(&self, params: &str) -> Result<String> {
        let p = parse_challenge(params);
        let realm = p
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| Error::Protocol("bearer challenge without realm".into()))?;
        let mut url = Url::parse(&realm)?;
        let mut q = Vec::new();
        for key in ["service", "scope"] {
            if let Some((_, v)) = p.iter().find(|(k, _)| k == key) {
                q.push(format!("{key}={}", percent_encode(v)));
            }
        }
        if !q.is_empty() {
            url.target
                .push(if url.target.contains('?') { '&' } else { '?' });
            url.target.push_str(&q.join("&"));
        }
        let auth = match &self.opts.credentials {
            Some(Credentials::Basic { username, password }) => Some(basic(username, password)),
            _ => None,
        };
        // containerd sends the host's headers to the token realm too (WithAuthHeader).
        let h = self.own_headers(&[], auth.as_deref());
        let mut r = http::send("GET", &url, &h, &[], &self.limits(), self.tls_for(&url)?)?;
        if r.status != 200 {
            return Err(status_error("GET", &url.to_url_string(), &mut r));
        }
        let body = r.read_body(1 << 20)?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Error::Protocol(format!("token response: {e}")))?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .ok_or_else(|| Error::Protocol("token response without token".into()))
    }

    /// `GET /v2/`: whether the registry answers 200 (after authentication).
    pub fn ping(&self) -> Result<()> {
        let mut r = self.request("GET", "/v2/", &[], &[])?;
        match r.status {
            200 => Ok(()),
            _ => Err(status_error("GET", &self.full("/v2/"), &mut r)),
        }
    }

    fn full(&self, target: &str) -> String {
        self.url(target).to_url_string()
    }

    /// Fetch manifest `reference` (tag or digest) of `repo`. A digest reference is checked.
    pub fn get_manifest(&self, repo: &str, reference: &str) -> Result<FetchedManifest> {
        check_repository(repo)?;
        self.get_manifest_accept(repo, reference, MANIFEST_ACCEPT)
    }

    fn get_manifest_accept(
        &self,
        repo: &str,
        reference: &str,
        accept: &str,
    ) -> Result<FetchedManifest> {
        check_reference(reference)?;
        let target = format!("/v2/{repo}/manifests/{reference}");
        let mut r = self.request("GET", &target, &[("Accept", accept)], &[])?;
        if r.status != 200 {
            return Err(status_error("GET", &self.full(&target), &mut r));
        }
        let bytes = r.read_body(MAX_MANIFEST_BYTES)?;
        let digest = digest_of(&bytes);
        if reference.starts_with("sha256:") && digest != reference {
            return Err(Error::DigestMismatch {
                what: format!("manifest {repo}@{reference}"),
                expected: reference.into(),
                actual: digest,
            });
        }
        let media_type = match r.header("content-type") {
            Some(ct) if ct != "application/json" && !ct.is_empty() => {
                ct.split(';').next().unwrap_or(ct).trim().to_string()
            }
            _ => serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
                .unwrap_or_else(|| MEDIA_TYPE_OCI_MANIFEST.to_string()),
        };
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// `HEAD` a manifest: its descriptor, or `None` if the registry does not have it.
    pub fn head_manifest(&self, repo: &str, reference: &str) -> Result<Option<Descriptor>> {
        check_repository(repo)?;
        check_reference(reference)?;
        let target = format!("/v2/{repo}/manifests/{reference}");
        let mut r = self.request("HEAD", &target, &[("Accept", MANIFEST_ACCEPT)], &[])?;
        match r.status {
            200 => {
                let digest = r
                    .header("docker-content-digest")
                    .map(str::to_string)
                    .ok_or_else(|| Error::Protocol(format!("HEAD {target}: no digest header")))?;
                check_digest(&digest)?;
                Ok(Some(Descriptor {
                    media_type: r
                        .header("content-type")
                        .unwrap_or(MEDIA_TYPE_OCI_MANIFEST)
                        .to_string(),
                    digest,
                    size: r
                        .header("content-length")
                        .and_then(|l| l.parse().ok())
                        .unwrap_or(0),
                    artifact_type: None,
                    annotations: Default::default(),
                }))
            }
            404 => Ok(None),
            _ => Err(status_error("HEAD", &self.full(&target), &mut r)),
        }
    }

    /// `PUT` a manifest under `reference` (tag or its digest); returns the answer's
    /// `OCI-Subject` header (set by registries with the Referrers API when the manifest has a
    /// subject).
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Option<String>> {
        check_repository(repo)?;
        check_reference(reference)?;
        let digest = digest_of(bytes);
        if reference.starts_with("sha256:") && reference != digest {
            return Err(Error::DigestMismatch {
                what: "manifest to push".into(),
                expected: reference.into(),
                actual: digest,
            });
        }
        let target = format!("/v2/{repo}/manifests/{reference}");
        let mut r = self.request("PUT", &target, &[("Content-Type", media_type)], bytes)?;
        if r.status != 201 {
            return Err(status_error("PUT", &self.full(&target), &mut r));
        }
        if let Some(d) = r.header("docker-content-digest")
            && d != digest
        {
            return Err(Error::DigestMismatch {
                what: format!("manifest pushed to {repo}:{reference}"),
                expected: digest,
                actual: d.into(),
            });
        }
        Ok(r.header("oci-subject").map(str::to_string))
    }

    /// Whether the registry has blob `digest` in `repo`.
    pub fn has_blob(&self, repo: &str, digest: &str) -> Result<bool> {
        check_repository(repo)?;
        check_digest(digest)?;
        let target = format!("/v2/{repo}/blobs/{digest}");
        let mut r = self.request("HEAD", &target, &[], &[])?;
        match r.status {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(status_error("HEAD", &self.full(&target), &mut r)),
        }
    }

    /// Stream blob `digest` into `out`, refusing more than `max` bytes, and check its digest
    /// (and `expected_size` if given). Returns its size. On error `out` may hold part of it.
    pub fn get_blob_to(
        &self,
        repo: &str,
        digest: &str,
        expected_size: Option<u64>,
        max: u64,
        out: &mut dyn Write,
    ) -> Result<u64> {
        check_repository(repo)?;
        check_digest(digest)?;
        if let Some(s) = expected_size
            && s > max
        {
            return Err(Error::Protocol(format!(
                "blob {digest} of {s} bytes is larger than the limit of {max}"
            )));
        }
        let target = format!("/v2/{repo}/blobs/{digest}");
        let mut r = self.request("GET", &target, &[], &[])?;
        if r.status != 200 {
            return Err(status_error("GET", &self.full(&target), &mut r));
        }
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        let limit = expected_size.unwrap_or(max);
        loop {
            let k = r
                .reader()
                .read(&mut buf)
                .map_err(|e| Error::io(format!("reading blob {digest}"), e))?;
            if k == 0 {
                break;
            }
            n += k as u64;
            if n > limit {
                return Err(Error::Protocol(format!(
                    "blob {digest} is larger than {limit} bytes"
                )));
            }
            h.update(&buf[..k]);
            out.write_all(&buf[..k])
                .map_err(|e| Error::io(format!("writing blob {digest}"), e))?;
        }
        if let Some(s) = expected_size
            && s != n
        {
            return Err(Error::Protocol(format!(
                "blob {digest} has {n} bytes, its descriptor says {s}"
            )));
        }
        let actual = format!("sha256:{}", hex::encode(h.finalize()));
        if actual != digest {
            return Err(Error::DigestMismatch {
                what: format!("blob {repo}@{digest}"),
                expected: digest.into(),
                actual,
            });
        }
        Ok(n)
    }

    /// Fetch blob `d` into memory (size and digest checked), refusing more than `max` bytes.
    pub fn get_blob(&self, repo: &str, d: &Descriptor, max: u64) -> Result<Vec<u8>> {
        check_repository(repo)?;
        let mut out = Vec::new();
        self.get_blob_to(repo, &d.digest, Some(d.size), max, &mut out)?;
        Ok(out)
    }

    /// Upload `data` as blob `digest` unless the registry has it (`POST` then monolithic
    /// `PUT`).
    pub fn put_blob(&self, repo: &str, digest: &str, data: &[u8]) -> Result<()> {
        check_repository(repo)?;
        check_digest(digest)?;
        let actual = digest_of(data);
        if actual != digest {
            return Err(Error::DigestMismatch {
                what: "blob to push".into(),
                expected: digest.into(),
                actual,
            });
        }
        self.upload(repo, digest, &mut &data[..], data.len() as u64)
    }

    /// [`put_blob`](Self::put_blob) streaming the first `len` bytes of `file` (read once to
    /// check the digest, once to send), for blobs too large to hold in memory.
    pub fn put_blob_file(&self, repo: &str, digest: &str, file: &File, len: u64) -> Result<()> {
        use std::io::{Read, Seek};
        check_repository(repo)?;
        check_digest(digest)?;
        let mut f = file;
        f.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| Error::io("seeking the blob", e))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut r = f.take(len);
        let mut n = 0u64;
        loop {
            let k = r
                .read(&mut buf)
                .map_err(|e| Error::io("reading the blob", e))?;
            if k == 0 {
                break;
            }
            n += k as u64;
            h.update(&buf[..k]);
        }
        let actual = format!("sha256:{}", hex::encode(h.finalize()));
        if n != len || actual != digest {
            return Err(Error::DigestMismatch {
                what: format!("blob to push ({n} of {len} bytes)"),
                expected: digest.into(),
                actual,
            });
        }
        f.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| Error::io("seeking the blob", e))?;
        self.upload(repo, digest, &mut f, len)
    }

    fn upload(
        &self,
        repo: &str,
        digest: &str,
        body: &mut dyn std::io::Read,
        len: u64,
    ) -> Result<()> {
        if self.has_blob(repo, digest)? {
            return Ok(());
        }
        let target = format!("/v2/{repo}/blobs/uploads/");
        // The POST goes through the auth flow; the PUT reuses what it established.
        let mut r = self.request("POST", &target, &[], &[])?;
        if r.status != 202 {
            return Err(status_error("POST", &self.full(&target), &mut r));
        }
        let loc = r
            .header("location")
            .ok_or_else(|| Error::Protocol("upload without Location".into()))?
            .to_string();
        let mut put = if loc.starts_with('/') {
            loc
        } else {
            let u = Url::parse(&loc)?;
            if u.authority != self.authority || u.scheme != self.scheme {
                return Err(Error::Unsupported(format!(
                    "upload location on another host: {loc}"
                )));
            }
            u.target
        };
        put.push(if put.contains('?') { '&' } else { '?' });
        put.push_str("digest=");
        put.push_str(&digest.replace(':', "%3A"));
        let auth = self.auth_header();
        let h = self.own_headers(
            &[("Content-Type", "application/octet-stream")],
            auth.as_deref(),
        );
        let url = self.url(&put);
        let mut r = http::send_body(
            "PUT",
            &url,
            &h,
            body,
            len,
            &self.limits(),
            self.tls_for(&url)?,
        )?;
        if r.status != 201 {
            return Err(status_error("PUT", &self.full(&put), &mut r));
        }
        Ok(())
    }

    /// The referrers of manifest `subject` in `repo` with artifact type `artifact_type` (all
    /// if `None`): from the Referrers API when the registry has it, else from the referrers
    /// tag; an empty index when there are none.
    pub fn referrers(
        &self,
        repo: &str,
        subject: &str,
        artifact_type: Option<&str>,
    ) -> Result<(Index, ReferrersVia)> {
        check_repository(repo)?;
        check_digest(subject)?;
        let mut target = format!("/v2/{repo}/referrers/{subject}");
        if let Some(t) = artifact_type {
            target.push_str("?artifactType=");
            target.push_str(&percent_encode(t));
        }
        let mut r = self.request("GET", &target, &[("Accept", MEDIA_TYPE_OCI_INDEX)], &[])?;
        let (mut index, via) = match r.status {
            200 => {
                let b = r.read_body(MAX_MANIFEST_BYTES)?;
                (Index::parse(&b)?, ReferrersVia::Api)
            }
            // The distribution spec: a registry without the API answers 404.
            404 => {
                let tag = artifacts::referrers_tag(subject)?;
                match self.get_manifest_accept(repo, &tag, MEDIA_TYPE_OCI_INDEX) {
                    Ok(m) => (Index::parse(&m.bytes)?, ReferrersVia::Tag),
                    Err(e) if e.is_not_found() => (Index::empty(), ReferrersVia::Tag),
                    Err(e) => return Err(e),
                }
            }
            _ => return Err(status_error("GET", &self.full(&target), &mut r)),
        };
        // A registry may ignore the filter (OCI-Filters-Applied), and a tag index is never
        // filtered.
        if let Some(t) = artifact_type {
            index
                .manifests
                .retain(|d| d.artifact_type.as_deref() == Some(t));
        }
        index.manifests.retain(|d| check_digest(&d.digest).is_ok());
        Ok((index, via))
    }

    /// Push `manifest` (which has a subject) as a referrer: the empty config blob, the
    /// manifest by digest, and unless the registry answers with `OCI-Subject` (it has the
    /// Referrers API), an updated referrers tag: the existing index (or a new one) with this
    /// manifest added and, when `replace` is set, earlier entries of the same artifact type
    /// removed. The tag update is read-modify-write: two pushers racing on one subject can
    /// lose an entry.
    pub fn push_referrer(
        &self,
        repo: &str,
        manifest: &Manifest,
        replace: bool,
    ) -> Result<PushedReferrer> {
        check_repository(repo)?;
        let subject = manifest
            .subject
            .as_ref()
            .ok_or_else(|| Error::Format("a referrer manifest needs a subject".into()))?;
        check_digest(&subject.digest)?;
        if manifest.config.digest == EMPTY_DIGEST {
            self.put_blob(repo, EMPTY_DIGEST, EMPTY_BLOB)?;
        }
        let bytes = manifest.to_bytes();
        let digest = digest_of(&bytes);
        let media_type = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| MEDIA_TYPE_OCI_MANIFEST.into());
        let oci_subject = self.put_manifest(repo, &digest, &media_type, &bytes)?;
        if oci_subject.as_deref() == Some(subject.digest.as_str()) {
            return Ok(PushedReferrer {
                digest,
                via: ReferrersVia::Api,
            });
        }
        let tag = artifacts::referrers_tag(&subject.digest)?;
        let mut index = match self.get_manifest_accept(repo, &tag, MEDIA_TYPE_OCI_INDEX) {
            Ok(m) => Index::parse(&m.bytes)?,
            Err(e) if e.is_not_found() => Index::empty(),
            Err(e) => return Err(e),
        };
        index.manifests.retain(|d| {
            d.digest != digest
                && !(replace
                    && d.artifact_type.is_some()
                    && d.artifact_type == manifest.artifact_type)
        });
        index.manifests.push(Descriptor {
            media_type: media_type.clone(),
            digest: digest.clone(),
            size: bytes.len() as u64,
            artifact_type: manifest.artifact_type.clone(),
            annotations: manifest.annotations.clone(),
        });
        index.media_type = Some(MEDIA_TYPE_OCI_INDEX.into());
        index.schema_version = 2;
        self.put_manifest(repo, &tag, MEDIA_TYPE_OCI_INDEX, &index.to_bytes())?;
        Ok(PushedReferrer {
            digest,
            via: ReferrersVia::Tag,
        })
    }

    /// Resolve `reference` of `repo` to an image manifest: an index (OCI or Docker list) is
    /// resolved to the entry for `os`/`architecture`. Returns the manifest and its parsed
    /// form.
    pub fn resolve_image(
        &self,
        repo: &str,
        reference: &str,
        os: &str,
        architecture: &str,
    ) -> Result<(FetchedManifest, Manifest)> {
        check_repository(repo)?;
        let mut m = self.get_manifest(repo, reference)?;
        if m.media_type == MEDIA_TYPE_OCI_INDEX || m.media_type == MEDIA_TYPE_DOCKER_LIST {
            let idx: serde_json::Value = serde_json::from_slice(&m.bytes)
                .map_err(|e| Error::Format(format!("image index: {e}")))?;
            let pick = idx
                .get("manifests")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .find(|d| {
                    let p = &d["platform"];
                    p["os"] == os && p["architecture"] == architecture
                })
                .and_then(|d| d["digest"].as_str().map(str::to_string))
                .ok_or_else(|| {
                    Error::Format(format!(
                        "{repo}:{reference} is an index without a {os}/{architecture} manifest"
                    ))
                })?;
            m = self.get_manifest(repo, &pick)?;
        }
        if m.media_type != MEDIA_TYPE_OCI_MANIFEST && m.media_type != MEDIA_TYPE_DOCKER_MANIFEST {
            return Err(Error::Format(format!(
                "{repo}@{} is a {}, not an image manifest",
                m.digest, m.media_type
            )));
        }
        let parsed = Manifest::parse(&m.bytes)?;
        Ok((m, parsed))
    }
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A tag or a digest, safe in a URL path.
fn check_reference(r: &str) -> Result<()> {
    if r.starts_with("sha256:") {
        return check_digest(r);
    }
    if r.is_empty()
        || r.len() > 128
        || !r
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(Error::Format(format!("{r:?} is not a tag or digest")));
    }
    Ok(())
}

fn status_error(method: &str, url: &str, r: &mut Response) -> Error {
    Error::Status {
        method: method.into(),
        url: url.into(),
        status: r.status,
        body: r.body_snippet(),
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `k1="v1",k2=v2` → pairs (quoted values may hold commas).
fn parse_challenge(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        rest = &rest[eq + 1..];
        let value;
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            value = r[..end].to_string();
            rest = r.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest.trim_start_matches([',', ' ']);
        out.push((key, value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_and_encoding() {
        let p = parse_challenge(
            r#"realm="http://127.0.0.1:1/token",service="reg",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(
            p,
            vec![
                ("realm".into(), "http://127.0.0.1:1/token".into()),
                ("service".into(), "reg".into()),
                ("scope".into(), "repository:a/b:pull,push".into()),
            ]
        );
        assert_eq!(percent_encode("a b:+/"), "a%20b%3A%2B%2F");
        assert_eq!(basic("u", "p"), "Basic dTpw");
        assert!(check_reference("v1.0_a-b").is_ok());
        for bad in ["", "../x", "a/b", "sha256:00", "a b"] {
            assert!(check_reference(bad).is_err(), "{bad}");
        }
        let c = Client::new("http://127.0.0.1:5000", ClientOptions::default()).unwrap();
        assert_eq!((c.host(), c.scheme()), ("127.0.0.1:5000", Scheme::Http));
        // A bare host is https; its TLS settings are read at once.
        let c = Client::new("r.example", ClientOptions::default()).unwrap();
        assert_eq!((c.host(), c.scheme()), ("r.example", Scheme::Https));
        let e = Client::new(
            "r.example",
            ClientOptions {
                tls: TlsOptions {
                    ca_files: vec!["/nonexistent/ca.pem".into()],
                    ..TlsOptions::default()
                },
                ..ClientOptions::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                &e,
                Error::Tls {
                    reason: TlsError::File { .. },
                    ..
                }
            ) && e.to_string().contains("/nonexistent/ca.pem"),
            "{e}"
        );
        assert!(
            Client::new(
                "http://h",
                ClientOptions {
                    headers: vec![("x".into(), "a\r\nb: c".into())],
                    ..ClientOptions::default()
                }
            )
            .is_err()
        );
    }
}
