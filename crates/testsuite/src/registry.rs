//! A throwaway OCI registry (Debian's `docker-registry`, distribution 2.8) on
//! 127.0.0.1, and a minimal push client for [`OciArchive`]s.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let archive: testsuite::oci::OciArchive = todo!();
//! let reg = testsuite::Registry::start()?;
//! let reference = reg.push_image(&archive)?; // 127.0.0.1:PORT/REPO:TAG
//! // ctr images pull --plain-http --snapshotter overlayfs <reference>
//! # Ok(())
//! # }
//! ```

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::oci::{Blob, OciArchive};
use crate::process::ProcessGroupGuard;

/// The registry binary.
pub const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";

/// A running registry with private storage. Drop stops it and removes its
/// directory.
#[derive(Debug)]
pub struct Registry {
    process: Option<ProcessGroupGuard>,
    dir: tempfile::TempDir,
    port: u16,
    tls: bool,
}

/// TLS settings of a registry (distribution's `http.tls`).
#[derive(Debug, Clone)]
pub struct RegistryTls {
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// CAs of the client certificates it requires (`clientcas`); none: no client
    /// certificate asked for.
    pub client_cas: Vec<PathBuf>,
}

impl Registry {
    /// Starts `docker-registry serve CONFIG` on a free port of 127.0.0.1 and
    /// waits until `GET /v2/` answers 200.
    pub fn start() -> Result<Registry> {
        Self::start_with(Path::new(REGISTRY_BINARY), Duration::from_secs(30))
    }

    /// [`start`](Self::start) with another binary and readiness timeout.
    pub fn start_with(binary: &Path, timeout: Duration) -> Result<Registry> {
        if !binary.is_file() {
            bail!("{} is not installed; run scripts/setup", binary.display());
        }
        let dir = tempfile::Builder::new().prefix("registry-").tempdir()?;
        let data = dir.path().join("data");
        Self::start_in(binary, dir, &data, None, timeout)
    }

    /// Another registry over the same storage, serving HTTPS with `tls`: what is pushed to
    /// either (through the plain one's helpers, say) is served by both. Stop it before
    /// `self`'s storage goes away.
    pub fn start_tls_twin(&self, tls: &RegistryTls) -> Result<Registry> {
        let dir = tempfile::Builder::new().prefix("registry-tls-").tempdir()?;
        Self::start_in(
            Path::new(REGISTRY_BINARY),
            dir,
            &self.dir.path().join("data"),
            Some(tls),
            Duration::from_secs(30),
        )
    }

    fn start_in(
        binary: &Path,
        dir: tempfile::TempDir,
        data: &Path,
        tls: Option<&RegistryTls>,
        timeout: Duration,
    ) -> Result<Registry> {
        // The port is free when probed; another process may take it before the
        // registry binds it, so retry a few times.
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            match Self::try_start(binary, dir.path(), data, port, tls, timeout) {
                Ok(process) => {
                    return Ok(Registry {
                        process: Some(process),
                        dir,
                        port,
                        tls: tls.is_some(),
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn try_start(
        binary: &Path,
        dir: &Path,
        data: &Path,
        port: u16,
        tls: Option<&RegistryTls>,
        timeout: Duration,
    ) -> Result<ProcessGroupGuard> {
        fs::create_dir_all(data)?;
        let config = dir.join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            data.display()
        );
        if let Some(t) = tls {
            text.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                t.cert.display(),
                t.key.display()
            ));
            if !t.client_cas.is_empty() {
                text.push_str("    clientcas:\n");
                for c in &t.client_cas {
                    text.push_str(&format!("      - {}\n", c.display()));
                }
            }
        }
        fs::write(&config, text)?;
        let log = dir.join("registry.log");
        let mut cmd = Command::new(binary);
        cmd.arg("serve")
            .arg(&config)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir(dir);
        let mut p = ProcessGroupGuard::spawn(&mut cmd, "docker-registry", Some(&log))?;
        p.set_stop_timeout(Duration::from_secs(5));
        let deadline = Instant::now() + timeout;
        loop {
            p.ensure_running()?;
            // A TLS registry answers plain HTTP with 400 ("client sent an HTTP request to
            // an HTTPS server") once it listens, client certificates required or not.
            if let Ok(r) = request(port, "GET", "/v2/", &[], &[])
                && r.status == if tls.is_some() { 400 } else { 200 }
            {
                return Ok(p);
            }
            if Instant::now() >= deadline {
                bail!(
                    "registry not ready on port {port} after {timeout:?}; log tail:\n{}",
                    p.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `https://127.0.0.1:PORT` or `http://127.0.0.1:PORT`.
    pub fn origin(&self) -> String {
        format!(
            "{}://127.0.0.1:{}",
            if self.tls { "https" } else { "http" },
            self.port
        )
    }

    /// The registry's directory (config, `data/`, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The registry log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Pushes `archive` as `127.0.0.1:PORT/<repository path of archive.repo>:<tag>`
    /// (the host part of `archive.repo`, e.g. `docker.io/`, is dropped) and
    /// returns that reference.
    pub fn push_image(&self, archive: &OciArchive) -> Result<String> {
        let path = repo_path(&archive.repo);
        self.push_as(archive, &path, &archive.tag)
    }

    /// Pushes `archive` as `127.0.0.1:PORT/REPO:TAG`: every blob (config and
    /// layers) by `POST /v2/REPO/blobs/uploads/` then a monolithic `PUT
    /// <location>?digest=...` unless `HEAD` finds it, then `PUT
    /// /v2/REPO/manifests/TAG` with the manifest's media type.
    pub fn push_as(&self, archive: &OciArchive, repo: &str, tag: &str) -> Result<String> {
        let blobs: Vec<&Blob> = std::iter::once(&archive.config)
            .chain(archive.layers.iter().map(|l| &l.blob))
            .collect();
        for blob in blobs {
            let data = fs::read(archive.blob_path(&blob.digest))?;
            self.push_blob(repo, &blob.digest, &data)
                .with_context(|| format!("push blob {} to {repo}", blob.digest))?;
        }
        let manifest = fs::read(archive.blob_path(&archive.manifest.digest))?;
        let r = request(
            self.port,
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", &archive.manifest.media_type)],
            &manifest,
        )?;
        if r.status != 201 {
            bail!("PUT manifest {repo}:{tag}: {} {}", r.status, r.body_text());
        }
        if let Some(d) = r.header("docker-content-digest")
            && d != archive.manifest.digest
        {
            bail!(
                "registry says the manifest is {d}, we computed {}",
                archive.manifest.digest
            );
        }
        Ok(format!("{}/{repo}:{tag}", self.host()))
    }

    /// `PUT /v2/REPO/manifests/REFERENCE` (a tag or a digest) of `bytes` as `media_type`.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<()> {
        let r = request(
            self.port,
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Content-Type", media_type)],
            bytes,
        )?;
        if r.status != 201 {
            bail!(
                "PUT manifest {repo}:{reference}: {} {}",
                r.status,
                r.body_text()
            );
        }
        Ok(())
    }

    /// Uploads blob `digest` (`data`) to `repo` unless it is there.
    pub fn push_blob(&self, repo: &str, digest: &str, data: &[u8]) -> Result<()> {
        let head = request(
            self.port,
            "HEAD",
            &format!("/v2/{repo}/blobs/{digest}"),
            &[],
            &[],
        )?;
        if head.status == 200 {
            return Ok(());
        }
        let r = request(
            self.port,
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            &[],
        )?;
        if r.status != 202 {
            bail!("POST upload: {} {}", r.status, r.body_text());
        }
        let location = r.header("location").context("upload without Location")?;
        let mut target = strip_origin(location).to_owned();
        target.push(if target.contains('?') { '&' } else { '?' });
        target.push_str("digest=");
        target.push_str(&digest.replace(':', "%3A"));
        let r = request(
            self.port,
            "PUT",
            &target,
            &[("Content-Type", "application/octet-stream")],
            data,
        )?;
        if r.status != 201 {
            bail!("PUT upload: {} {}", r.status, r.body_text());
        }
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop();
        }
    }
}

/// `docker.io/testsuite/foo` → `testsuite/foo`; `foo/bar` stays.
fn repo_path(repo: &str) -> String {
    match repo.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            rest.to_owned()
        }
        _ => repo.to_owned(),
    }
}

/// `http://host:port/path?q` → `/path?q`.
fn strip_origin(location: &str) -> &str {
    if let Some(rest) = location
        .strip_prefix("http://")
        .or_else(|| location.strip_prefix("https://"))
    {
        rest.find('/').map(|i| &rest[i..]).unwrap_or("/")
    } else {
        location
    }
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body (de-chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// First header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as lossy UTF-8.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port` over a fresh connection
/// (`Connection: close`), with a 30 s I/O timeout.
pub fn request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nUser-Agent: testsuite\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw, method == "HEAD")
}

fn parse_response(raw: &[u8], head_only: bool) -> Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of HTTP headers")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().context("empty response")?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .context("no status code")?
        .parse()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if head_only {
        Vec::new()
    } else if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_str = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let r = parse_response(raw, false).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"abcde");
        assert_eq!(r.header("x-a"), Some("b"));
    }

    #[test]
    fn repo_paths() {
        assert_eq!(repo_path("docker.io/testsuite/foo"), "testsuite/foo");
        assert_eq!(repo_path("testsuite/foo"), "testsuite/foo");
        assert_eq!(repo_path("127.0.0.1:5000/a"), "a");
        assert_eq!(strip_origin("http://127.0.0.1:5/v2/x?y=1"), "/v2/x?y=1");
        assert_eq!(strip_origin("/v2/x"), "/v2/x");
    }
}
