//! containerd's registry host configuration (`config_path`, e.g. `/etc/containerd/certs.d`):
//! `<dir>/<host[:port]>/hosts.toml`, falling back to `<dir>/_default/hosts.toml`, with
//!
//! ```toml
//! server = "https://registry.example.com"       # the registry itself (default https://<host>)
//! ca = "/etc/certs/ca.pem"                      # or a list
//! client = [["/etc/certs/c.pem", "/etc/certs/c.key"], ["/etc/certs/both.pem", ""]]
//! skip_verify = false
//! override_path = false
//! [header]
//!   x-token = "abc"                             # or a list
//! [host."http://mirror.local:5000"]             # tried first, in file order
//!   capabilities = ["pull", "resolve"]
//! ```
//!
//! Only what the node side needs is kept: the endpoints to ask, in order, for a pull (the
//! `pull` capability: artifacts are fetched by digest, never resolved by tag), with their
//! scheme, path override, headers and TLS keys (`ca`, `client`, `skip_verify`; relative paths
//! are relative to the `hosts.toml`, as containerd reads them). [`Endpoint::client_options`]
//! maps an endpoint to `erofs_registry` client options; that crate knows nothing of this file.
//! Not used: `capabilities` beyond `pull`, `dial_timeout` (`artifacts.fetch_timeout` bounds
//! every request instead), `proxy`, and Docker's `*.crt`/`*.cert`/`*.key` certificate
//! directories without a `hosts.toml`. The parser is bounded (file size, number of hosts and
//! headers) and never follows anything but the one file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Largest `hosts.toml` read.
const MAX_FILE: u64 = 256 << 10;
/// Most `[host."..."]` entries used from one file.
const MAX_HOSTS: usize = 32;
/// Most header values per endpoint.
const MAX_HEADERS: usize = 64;

/// What is wrong with a `hosts.toml`.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not what containerd accepts.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// One registry endpoint to ask, in order of preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`.
    pub host: String,
    /// The API path prefix: `/v2` unless `override_path` gave the full path.
    pub path: String,
    /// Extra request headers (`[header]`), name to values.
    pub headers: BTreeMap<String, Vec<String>>,
    /// Its TLS settings (relative paths resolved against the hosts.toml's directory).
    pub tls: Tls,
    /// Whether it is the registry itself (`server`, or the default) rather than a mirror.
    pub is_server: bool,
}

impl Endpoint {
    /// `scheme://host/path`, for logs and for a client.
    pub fn base_url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.host, self.path)
    }

    /// Whether the endpoint is plain HTTP.
    pub fn plain_http(&self) -> bool {
        self.scheme == "http"
    }

    /// `scheme://host[:port]`, what `erofs_registry::client::Client::new` takes.
    pub fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.host)
    }

    /// The client options this endpoint asks for: its TLS settings (used for `https`) and its
    /// headers (one header line per value, in file order of values), on top of `base`.
    pub fn client_options(
        &self,
        base: erofs_registry::client::ClientOptions,
    ) -> erofs_registry::client::ClientOptions {
        use erofs_registry::tls::{ClientCert, TlsOptions};
        let mut o = base;
        o.tls = TlsOptions {
            ca_files: self.tls.ca.clone(),
            client_certs: self
                .tls
                .client
                .iter()
                .map(|(cert, key)| ClientCert {
                    cert: cert.clone(),
                    key: key.clone(),
                })
                .collect(),
            skip_verify: self.tls.skip_verify,
        };
        o.headers = self
            .headers
            .iter()
            .flat_map(|(k, vs)| vs.iter().map(move |v| (k.clone(), v.clone())))
            .collect();
        o
    }
}

/// TLS keys of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// CA certificate files.
    pub ca: Vec<PathBuf>,
    /// Client certificate and key files (`[cert, key]`; no key: it is in the cert file).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// `skip_verify`.
    pub skip_verify: bool,
}

impl Tls {
    /// Whether any TLS setting is present.
    pub fn is_set(&self) -> bool {
        !self.ca.is_empty() || !self.client.is_empty() || self.skip_verify
    }
}

/// The endpoints for registry `host` (as in an image reference: `host[:port]`, with
/// `docker.io` for Docker Hub) under `dir`: the mirrors with the `pull` capability in file
/// order, then the server. Without a `hosts.toml` (or without `dir`): the registry itself over
/// HTTPS (plain HTTP for `localhost` and loopback addresses, as containerd does when the
/// scheme is not given).
pub fn endpoints(dir: Option<&Path>, host: &str) -> Result<Vec<Endpoint>, HostsError> {
    if let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty()) {
        // A host name is one path component: anything else cannot name a directory of ours.
        if !host.is_empty() && !host.contains('/') && host != "." && host != ".." {
            for name in [host, "_default"] {
                let file = dir.join(name).join("hosts.toml");
                match std::fs::symlink_metadata(&file) {
                    Ok(_) => return parse_file(&file, host),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(HostsError::Io { path: file, source }),
                }
            }
        }
    }
    Ok(vec![default_server(host)])
}

fn default_server(host: &str) -> Endpoint {
    let (scheme, host) = if host == "docker.io" {
        ("https", "registry-1.docker.io".to_string())
    } else if is_local(host) {
        ("http", host.to_string())
    } else {
        ("https", host.to_string())
    };
    Endpoint {
        scheme: scheme.into(),
        host,
        path: "/v2".into(),
        headers: BTreeMap::new(),
        tls: Tls::default(),
        is_server: true,
    }
}

/// `localhost[:port]` or a loopback IP: containerd's docker resolver talks plain HTTP to
/// those by default.
fn is_local(host: &str) -> bool {
    let name = host
        .strip_prefix('[')
        .and_then(|h| h.split_once(']').map(|(a, _)| a))
        .unwrap_or_else(|| host.rsplit_once(':').map_or(host, |(h, _)| h));
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn parse_file(path: &Path, host: &str) -> Result<Vec<Endpoint>, HostsError> {
    use std::io::Read;
    let io = |source| HostsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    f.take(MAX_FILE + 1).read_to_string(&mut text).map_err(io)?;
    if text.len() as u64 > MAX_FILE {
        return Err(HostsError::Invalid {
            path: path.to_path_buf(),
            message: format!("larger than {MAX_FILE} bytes"),
        });
    }
    let mut eps = parse(&text, host).map_err(|message| HostsError::Invalid {
        path: path.to_path_buf(),
        message,
    })?;
    // containerd: "All paths specified in the hosts.toml file may be absolute or relative to
    // the hosts.toml file."
    let base = path.parent().unwrap_or(Path::new("/"));
    for ep in &mut eps {
        let tls = &mut ep.tls;
        for p in tls.ca.iter_mut().chain(
            tls.client
                .iter_mut()
                .flat_map(|(c, k)| std::iter::once(c).chain(k)),
        ) {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
    Ok(eps)
}

/// Parse the text of `host`'s `hosts.toml` (see [`endpoints`]).
pub fn parse(text: &str, host: &str) -> Result<Vec<Endpoint>, String> {
    let doc = toml::de::DeTable::parse(text).map_err(|e| e.to_string())?;
    let top = doc.get_ref();
    let value = |t: &toml::de::DeTable<'_>, k: &str| -> Option<toml::Value> {
        t.iter()
            .find(|(key, _)| key.get_ref().as_ref() == k)
            .map(|(_, v)| plain(v.get_ref()))
    };
    let mut out = Vec::new();
    // Mirrors, in the order the file lists them (containerd keeps that order).
    if let Some((_, hosts)) = top.iter().find(|(k, _)| k.get_ref().as_ref() == "host") {
        let hosts = hosts
            .get_ref()
            .as_table()
            .ok_or("`host` must be a table of [host.\"URL\"] entries")?;
        let mut entries: Vec<_> = hosts.iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        if entries.len() > MAX_HOSTS {
            return Err(format!("more than {MAX_HOSTS} [host] entries"));
        }
        for (url, v) in entries {
            let t = v
                .get_ref()
                .as_table()
                .ok_or_else(|| format!("host {:?} must be a table", url.get_ref()))?;
            let caps = match value(t, "capabilities") {
                None => vec!["pull".to_string(), "resolve".to_string()],
                Some(v) => strings(&v).ok_or_else(|| {
                    format!("host {:?}: capabilities must be a list", url.get_ref())
                })?,
            };
            if !caps.iter().any(|c| c == "pull") {
                tracing::debug!(host = %url.get_ref(), "hosts.toml mirror without the pull capability: not asked for artifacts");
                continue;
            }
            out.push(endpoint(url.get_ref(), t, &value, false)?);
        }
    }
    let server = match value(top, "server") {
        Some(toml::Value::String(s)) => s,
        Some(_) => return Err("server must be a string".into()),
        None => default_server(host)
            .base_url()
            .trim_end_matches("/v2")
            .to_string(),
    };
    out.push(endpoint(&server, top, &value, true)?);
    Ok(out)
}

/// A value without its spans.
fn plain(v: &toml::de::DeValue<'_>) -> toml::Value {
    use toml::de::DeValue;
    match v {
        DeValue::String(s) => toml::Value::String(s.to_string()),
        DeValue::Boolean(b) => toml::Value::Boolean(*b),
        DeValue::Array(a) => toml::Value::Array(a.iter().map(|x| plain(x.get_ref())).collect()),
        DeValue::Table(t) => toml::Value::Table(
            t.iter()
                .map(|(k, v)| (k.get_ref().to_string(), plain(v.get_ref())))
                .collect(),
        ),
        // No hosts.toml key takes a number or a date: only their type is looked at (and
        // refused), never their value.
        _ => toml::Value::Integer(0),
    }
}

fn strings(v: &toml::Value) -> Option<Vec<String>> {
    match v {
        toml::Value::String(s) => Some(vec![s.clone()]),
        toml::Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

fn endpoint(
    url: &str,
    t: &toml::de::DeTable<'_>,
    value: &dyn Fn(&toml::de::DeTable<'_>, &str) -> Option<toml::Value>,
    is_server: bool,
) -> Result<Endpoint, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?}: a host needs a scheme (http:// or https://)"))?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("{url:?}: scheme must be http or https"));
    }
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if hostport.is_empty() || hostport.contains(['@', '?', '#', ' ']) {
        return Err(format!("{url:?}: not a host[:port]"));
    }
    let override_path = match value(t, "override_path") {
        None => false,
        Some(toml::Value::Boolean(b)) => b,
        Some(_) => return Err(format!("{url:?}: override_path must be true or false")),
    };
    // containerd appends /v2 unless the path is given in full.
    let path = if override_path {
        path.to_string()
    } else {
        format!("{path}/v2")
    };
    let mut headers = BTreeMap::new();
    if let Some(h) = value(t, "header") {
        let h = h
            .as_table()
            .ok_or_else(|| format!("{url:?}: header must be a table"))?;
        let mut n = 0;
        for (k, v) in h {
            let vals =
                strings(v).ok_or_else(|| format!("{url:?}: header {k:?} must be strings"))?;
            n += vals.len();
            if n > MAX_HEADERS {
                return Err(format!("{url:?}: more than {MAX_HEADERS} header values"));
            }
            if k.is_empty()
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
                || vals.iter().any(|v| v.contains(['\r', '\n']))
            {
                return Err(format!("{url:?}: header {k:?} is not a valid HTTP header"));
            }
            headers.insert(k.clone(), vals);
        }
    }
    let mut tls = Tls::default();
    if let Some(ca) = value(t, "ca") {
        tls.ca = strings(&ca)
            .ok_or_else(|| format!("{url:?}: ca must be a path or a list of paths"))?
            .into_iter()
            .map(PathBuf::from)
            .collect();
    }
    if let Some(client) = value(t, "client") {
        tls.client = client_pairs(&client).ok_or_else(|| {
            format!("{url:?}: client must be a path, [cert, key] or a list of those")
        })?;
    }
    match value(t, "skip_verify") {
        None => {}
        Some(toml::Value::Boolean(b)) => tls.skip_verify = b,
        Some(_) => return Err(format!("{url:?}: skip_verify must be true or false")),
    }
    Ok(Endpoint {
        scheme: scheme.into(),
        host: hostport.into(),
        path,
        headers,
        tls,
        is_server,
    })
}

/// `client`, as containerd reads it: "both.pem" | ["both-1.pem", "both-2.pem"] (each file
/// holds certificate and key) | [["cert", "key"], ["both.pem", ""], ...] (an empty or missing
/// key: in the certificate file).
fn client_pairs(v: &toml::Value) -> Option<Vec<(PathBuf, Option<PathBuf>)>> {
    let one = |cert: &str, key: Option<&str>| {
        (!cert.is_empty()).then(|| {
            (
                PathBuf::from(cert),
                key.filter(|k| !k.is_empty()).map(PathBuf::from),
            )
        })
    };
    match v {
        toml::Value::String(s) => Some(vec![one(s, None)?]),
        toml::Value::Array(a) => a
            .iter()
            .map(|x| match x {
                toml::Value::String(s) => one(s, None),
                toml::Value::Array(p) if (1..=2).contains(&p.len()) => {
                    let key = match p.get(1) {
                        Some(k) => Some(k.as_str()?),
                        None => None,
                    };
                    one(p[0].as_str()?, key)
                }
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_in_file_order_then_the_server() {
        let text = r#"
server = "https://registry.example.com"
ca = "/etc/certs/ca.pem"

[host."http://zeta.local:5000"]
  capabilities = ["pull", "resolve"]
  [host."http://zeta.local:5000".header]
    x-token = ["a", "b"]

[host."https://resolver-only.local"]
  capabilities = ["resolve"]

[host."https://alpha.local/mirror/v2/ns"]
  override_path = true
  skip_verify = true
  client = [["/c.pem", "/c.key"], "/both.pem"]
"#;
        let e = parse(text, "registry.example.com").unwrap();
        let urls: Vec<String> = e.iter().map(Endpoint::base_url).collect();
        assert_eq!(
            urls,
            [
                "http://zeta.local:5000/v2",
                "https://alpha.local/mirror/v2/ns",
                "https://registry.example.com/v2"
            ]
        );
        assert!(e[0].plain_http() && !e[0].is_server);
        assert_eq!(e[0].headers["x-token"], ["a", "b"]);
        assert!(e[1].tls.skip_verify);
        assert_eq!(
            e[1].tls.client,
            [
                ("/c.pem".into(), Some("/c.key".into())),
                ("/both.pem".into(), None)
            ]
        );
        assert!(e[2].is_server);
        assert_eq!(e[2].tls.ca, [PathBuf::from("/etc/certs/ca.pem")]);
        // The header values become one header line each.
        let o = e[0].client_options(Default::default());
        assert_eq!(
            o.headers,
            [
                ("x-token".to_string(), "a".to_string()),
                ("x-token".into(), "b".into())
            ]
        );
        assert_eq!(
            e[1].client_options(Default::default())
                .tls
                .client_certs
                .len(),
            2
        );
    }

    #[test]
    fn client_certificates_as_containerd_reads_them() {
        let pairs = |text: &str| parse(text, "r").unwrap().pop().unwrap().tls.client;
        // Two paths are two files holding certificate and key, not a [cert, key] pair.
        assert_eq!(
            pairs(r#"client = ["/a.pem", "/b.pem"]"#),
            [("/a.pem".into(), None), ("/b.pem".into(), None)]
        );
        assert_eq!(
            pairs(r#"client = [["/c.pem", "/c.key"], ["/both.pem", ""]]"#),
            [
                ("/c.pem".into(), Some("/c.key".into())),
                ("/both.pem".into(), None)
            ]
        );
        assert_eq!(pairs(r#"client = "/x.pem""#), [("/x.pem".into(), None)]);
        assert!(parse(r#"client = [["/a", "/b", "/c"]]"#, "r").is_err());
        assert!(parse(r#"client = 1"#, "r").is_err());
        // Relative paths are relative to the file.
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("r.example")).unwrap();
        std::fs::write(
            d.path().join("r.example/hosts.toml"),
            "ca = \"ca.pem\"\nclient = [[\"c.pem\", \"/abs/c.key\"]]\n",
        )
        .unwrap();
        let e = endpoints(Some(d.path()), "r.example").unwrap();
        let dir = d.path().join("r.example");
        assert_eq!(e[0].tls.ca, [dir.join("ca.pem")]);
        assert_eq!(
            e[0].tls.client,
            [(dir.join("c.pem"), Some(PathBuf::from("/abs/c.key")))]
        );
    }

    #[test]
    fn defaults_without_a_file() {
        let d = tempfile::tempdir().unwrap();
        let e = endpoints(Some(d.path()), "registry.example.com").unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].base_url(), "https://registry.example.com/v2");
        assert_eq!(
            endpoints(None, "docker.io").unwrap()[0].base_url(),
            "https://registry-1.docker.io/v2"
        );
        for local in ["127.0.0.1:5000", "localhost:5000", "[::1]:5000"] {
            assert!(endpoints(None, local).unwrap()[0].plain_http(), "{local}");
        }
        // _default applies to every host without its own file.
        std::fs::create_dir(d.path().join("_default")).unwrap();
        std::fs::write(
            d.path().join("_default/hosts.toml"),
            "[host.\"http://cache.local\"]\n",
        )
        .unwrap();
        let e = endpoints(Some(d.path()), "other.example").unwrap();
        assert_eq!(e[0].base_url(), "http://cache.local/v2");
        assert_eq!(e[1].base_url(), "https://other.example/v2");
        // A host name that is not one path component never names a file.
        assert_eq!(endpoints(Some(d.path()), "../x").unwrap().len(), 1);
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        for (text, want) in [
            ("server = 5", "server must be a string"),
            ("[host.\"mirror.local\"]", "needs a scheme"),
            ("[host.\"ftp://m\"]", "scheme must be http or https"),
            ("[host.\"http://m\"]\ncapabilities = 1", "capabilities"),
            (
                "[header]\n\"bad header\" = \"x\"",
                "not a valid HTTP header",
            ),
            (
                "[header]\nx = \"a\\r\\nInjected: 1\"",
                "not a valid HTTP header",
            ),
            ("skip_verify = \"yes\"", "skip_verify"),
            ("server = \"https://a\"\n[[", ""),
        ] {
            let e = parse(text, "r.example").unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let many: String = (0..=MAX_HOSTS)
            .map(|i| format!("[host.\"http://m{i}\"]\n"))
            .collect();
        assert!(parse(&many, "r").unwrap_err().contains("more than"));
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("r.example")).unwrap();
        std::fs::write(
            d.path().join("r.example/hosts.toml"),
            "#".repeat(MAX_FILE as usize + 1),
        )
        .unwrap();
        let e = endpoints(Some(d.path()), "r.example").unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }
}
