//! The client against a small in-process registry: the branches Debian's docker-registry 2.8
//! (used by the suite's end-to-end tests) cannot exercise: a registry with the Referrers API
//! (manifest PUTs answered with `OCI-Subject`, `GET /v2/<name>/referrers/<digest>`), the
//! bearer-token flow, chunked bodies, a registry that corrupts a blob, and one that hangs.
//! The server implements just what these requests need, following the distribution spec.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use erofs_registry::Error;
use erofs_registry::artifacts::{
    self, ARTIFACT_TYPE, ArtifactSet, Descriptor, Index, LayerArtifacts, MEDIA_TYPE_OCI_MANIFEST,
    TarIndexBlob, TreeBlob,
};
use erofs_registry::client::{Client, ClientOptions, Credentials, ReferrersVia};

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Referrers API and OCI-Subject.
    #[default]
    Api,
    /// No Referrers API (404), like distribution 2.8.
    NoApi,
}

#[derive(Default)]
struct State {
    mode: Mode,
    /// Require `Bearer tok` (token from /token with basic u:p).
    auth: bool,
    /// Flip a byte of every blob served.
    corrupt: bool,
    /// Never answer.
    hang: bool,
    blobs: HashMap<String, Vec<u8>>,
    /// (repo, reference) → (media type, bytes).
    manifests: HashMap<(String, String), (String, Vec<u8>)>,
    /// Every "METHOD target" served.
    log: Vec<String>,
    /// The `X-Mirror-Token` header of each request served, in order.
    mirror_tokens: Vec<Option<String>>,
    uploads: u32,
}

struct Server {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl Server {
    fn start(configure: impl FnOnce(&mut State)) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut st = State::default();
        configure(&mut st);
        let state = Arc::new(Mutex::new(st));
        let s2 = state.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let s = s2.clone();
                std::thread::spawn(move || serve(c, &s, port));
            }
        });
        Server { port, state }
    }

    fn client(&self, credentials: Option<Credentials>) -> Client {
        self.client_with(credentials, Vec::new())
    }

    fn client_with(
        &self,
        credentials: Option<Credentials>,
        headers: Vec<(String, String)>,
    ) -> Client {
        Client::new(
            &format!("http://127.0.0.1:{}", self.port),
            ClientOptions {
                credentials,
                headers,
                request_timeout: Some(Duration::from_secs(2)),
                io_timeout: Duration::from_secs(2),
                ..ClientOptions::default()
            },
        )
        .unwrap()
    }

    fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

fn respond(c: &mut TcpStream, status: u16, headers: &[(&str, String)], body: &[u8], chunked: bool) {
    let mut h = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    if chunked {
        h.push_str("Transfer-Encoding: chunked\r\n\r\n");
        let _ = c.write_all(h.as_bytes());
        for part in body.chunks(1000) {
            let _ = c.write_all(format!("{:x}\r\n", part.len()).as_bytes());
            let _ = c.write_all(part);
            let _ = c.write_all(b"\r\n");
        }
        let _ = c.write_all(b"0\r\n\r\n");
    } else {
        h.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let _ = c.write_all(h.as_bytes());
        let _ = c.write_all(body);
    }
}

fn serve(mut c: TcpStream, state: &Mutex<State>, port: u16) {
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = HashMap::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = r.read_exact(&mut body);
    let mut st = state.lock().unwrap();
    st.log.push(format!("{method} {target}"));
    st.mirror_tokens
        .push(headers.get("x-mirror-token").cloned());
    if st.hang {
        drop(st);
        std::thread::sleep(Duration::from_secs(30));
        return;
    }
    if target.starts_with("/token") {
        let ok = headers.get("authorization").map(String::as_str) == Some("Basic dTpw")
            && target.contains("service=test")
            && target.contains("scope=repository%3A");
        drop(st);
        if ok {
            respond(&mut c, 200, &[], br#"{"token":"tok"}"#, false);
        } else {
            respond(&mut c, 401, &[], b"bad credentials", false);
        }
        return;
    }
    if st.auth && headers.get("authorization").map(String::as_str) != Some("Bearer tok") {
        drop(st);
        let h = format!(
            r#"Bearer realm="http://127.0.0.1:{port}/token",service="test",scope="repository:r:pull,push""#
        );
        respond(&mut c, 401, &[("WWW-Authenticate", h)], b"", false);
        return;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let digest_of = |b: &[u8]| artifacts::sha256_digest(b);
    if path == "/v2/" {
        drop(st);
        return respond(&mut c, 200, &[], b"{}", false);
    }
    if let Some(n) = path.strip_prefix("/upload/") {
        let d = query
            .strip_prefix("digest=")
            .unwrap_or("")
            .replace("%3A", ":");
        assert_eq!(digest_of(&body), d, "upload {n}");
        st.blobs.insert(d, body);
        drop(st);
        return respond(&mut c, 201, &[], b"", false);
    }
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    for kind in ["/blobs/uploads/", "/blobs/", "/manifests/", "/referrers/"] {
        let Some(i) = rest.find(kind) else { continue };
        let (repo, reference) = (rest[..i].to_string(), rest[i + kind.len()..].to_string());
        match (method.as_str(), kind) {
            ("POST", "/blobs/uploads/") => {
                st.uploads += 1;
                let loc = format!("/upload/{}", st.uploads);
                drop(st);
                return respond(&mut c, 202, &[("Location", loc)], b"", false);
            }
            ("HEAD" | "GET", "/blobs/") => {
                let Some(mut b) = st.blobs.get(&reference).cloned() else {
                    drop(st);
                    return respond(&mut c, 404, &[], b"", false);
                };
                if st.corrupt {
                    b[0] ^= 1;
                }
                drop(st);
                if method == "HEAD" {
                    let h = format!("HTTP/1.1 200 X\r\nContent-Length: {}\r\n\r\n", b.len());
                    let _ = c.write_all(h.as_bytes());
                    return;
                }
                return respond(&mut c, 200, &[], &b, true);
            }
            ("PUT", "/manifests/") => {
                let mt = headers.get("content-type").cloned().unwrap_or_default();
                let d = digest_of(&body);
                st.manifests.insert(
                    (repo.clone(), reference.clone()),
                    (mt.clone(), body.clone()),
                );
                st.manifests.insert((repo, d.clone()), (mt, body.clone()));
                let mut h = vec![("Docker-Content-Digest", d)];
                if st.mode == Mode::Api {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    if let Some(s) = v["subject"]["digest"].as_str() {
                        h.push(("OCI-Subject", s.to_string()));
                    }
                }
                drop(st);
                return respond(&mut c, 201, &h, b"", false);
            }
            ("GET" | "HEAD", "/manifests/") => {
                let Some((mt, b)) = st.manifests.get(&(repo, reference)).cloned() else {
                    drop(st);
                    return respond(&mut c, 404, &[], b"manifest unknown", false);
                };
                drop(st);
                let h = [
                    ("Content-Type", mt),
                    ("Docker-Content-Digest", digest_of(&b)),
                ];
                if method == "HEAD" {
                    let _ = c.write_all(
                        format!(
                            "HTTP/1.1 200 X\r\nContent-Type: {}\r\nDocker-Content-Digest: {}\r\nContent-Length: {}\r\n\r\n",
                            h[0].1, h[1].1, b.len()
                        )
                        .as_bytes(),
                    );
                    return;
                }
                return respond(&mut c, 200, &h, &b, false);
            }
            ("GET", "/referrers/") if st.mode == Mode::Api => {
                let mut idx = Index::empty();
                let mut seen = std::collections::HashSet::new();
                for ((r, _), (mt, b)) in &st.manifests {
                    let v: serde_json::Value = serde_json::from_slice(b).unwrap();
                    let d = digest_of(b);
                    if *r == repo
                        && v["subject"]["digest"] == reference.as_str()
                        && seen.insert(d.clone())
                    {
                        idx.manifests.push(Descriptor {
                            media_type: mt.clone(),
                            digest: d,
                            size: b.len() as u64,
                            artifact_type: v["artifactType"].as_str().map(str::to_string),
                            annotations: Default::default(),
                        });
                    }
                }
                // Deliberately unfiltered: the client must filter by artifactType itself.
                drop(st);
                let h = [("Content-Type", artifacts::MEDIA_TYPE_OCI_INDEX.to_string())];
                return respond(&mut c, 200, &h, &idx.to_bytes(), false);
            }
            _ => {}
        }
    }
    drop(st);
    respond(&mut c, 404, &[], b"404 page not found", false);
}

/// An image manifest in `repo`, and a referrer manifest of our type for it.
fn setup(c: &Client, repo: &str) -> (Descriptor, ArtifactSet) {
    let image = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let d = artifacts::sha256_digest(image);
    c.put_manifest(repo, "v1", MEDIA_TYPE_OCI_MANIFEST, image)
        .unwrap();
    let subject = c.head_manifest(repo, "v1").unwrap().unwrap();
    assert_eq!(subject.digest, d);
    let index = vec![7u8; 4096];
    let tree = vec![8u8; 512];
    for b in [&index, &tree] {
        c.put_blob(repo, &artifacts::sha256_digest(b), b).unwrap();
    }
    let layer = format!("sha256:{}", "1".repeat(64));
    let set = ArtifactSet {
        subject: Descriptor::of(MEDIA_TYPE_OCI_MANIFEST, image),
        created: None,
        layers: vec![LayerArtifacts {
            layer_digest: layer.clone(),
            diff_id: layer,
            tar_index: TarIndexBlob {
                descriptor: Descriptor::of(artifacts::MEDIA_TYPE_TAR_INDEX, &index),
                tar_size: 1024,
                mkfs_options: None,
            },
            dmverity: Some(TreeBlob {
                descriptor: Descriptor::of(artifacts::MEDIA_TYPE_DMVERITY_TREE, &tree),
                root_digest: "ab".repeat(32),
                block_size: 512,
                hash_offset: 5120,
            }),
            signature: None,
            image_dmverity: None,
            image_signature: None,
        }],
    };
    // As read back: with the annotations the typed fields imply.
    let set = ArtifactSet::parse(&set.to_manifest().to_bytes()).unwrap();
    (subject, set)
}

#[test]
fn referrers_api_is_used_when_the_registry_has_it() {
    let s = Server::start(|_| {});
    let c = s.client(None);
    c.ping().unwrap();
    let (subject, set) = setup(&c, "r");
    let pushed = c.push_referrer("r", &set.to_manifest(), true).unwrap();
    assert_eq!(pushed.via, ReferrersVia::Api);
    // Another artifact type for the same subject: listed unfiltered by the server.
    let mut other = set.to_manifest();
    other.artifact_type = Some("application/vnd.example".into());
    assert_eq!(
        c.push_referrer("r", &other, true).unwrap().via,
        ReferrersVia::Api
    );
    let (idx, via) = c
        .referrers("r", &subject.digest, Some(ARTIFACT_TYPE))
        .unwrap();
    assert_eq!(via, ReferrersVia::Api);
    assert_eq!(idx.manifests.len(), 1);
    assert_eq!(idx.manifests[0].digest, pushed.digest);
    let (all, _) = c.referrers("r", &subject.digest, None).unwrap();
    assert_eq!(all.manifests.len(), 2);
    // No referrers tag was written.
    let tag = artifacts::referrers_tag(&subject.digest).unwrap();
    assert!(!s.log().iter().any(|l| l.contains(&tag)), "{:?}", s.log());
    let m = c.get_manifest("r", &pushed.digest).unwrap();
    assert_eq!(ArtifactSet::parse(&m.bytes).unwrap(), set);
    let l = &set.layers[0];
    assert_eq!(
        c.get_blob("r", &l.tar_index.descriptor, 1 << 20).unwrap(),
        vec![7u8; 4096]
    );
    // Size limits hold.
    assert!(c.get_blob("r", &l.tar_index.descriptor, 100).is_err());
}

#[test]
fn referrers_tag_without_the_api() {
    let s = Server::start(|st| st.mode = Mode::NoApi);
    let c = s.client(None);
    let (subject, set) = setup(&c, "r");
    let tag = artifacts::referrers_tag(&subject.digest).unwrap();
    let (idx, via) = c
        .referrers("r", &subject.digest, Some(ARTIFACT_TYPE))
        .unwrap();
    assert_eq!((idx.manifests.len(), via), (0, ReferrersVia::Tag));
    let first = c.push_referrer("r", &set.to_manifest(), true).unwrap();
    assert_eq!(first.via, ReferrersVia::Tag);
    let mut other = set.to_manifest();
    other.artifact_type = Some("application/vnd.example".into());
    c.push_referrer("r", &other, true).unwrap();
    // A newer build replaces ours, keeps the other type.
    let mut newer = set.clone();
    newer.created = Some("2026-12-03T11:00:00Z".into());
    let second = c.push_referrer("r", &newer.to_manifest(), true).unwrap();
    let tagged = Index::parse(&c.get_manifest("r", &tag).unwrap().bytes).unwrap();
    assert_eq!(tagged.manifests.len(), 2, "{tagged:?}");
    let (idx, via) = c
        .referrers("r", &subject.digest, Some(ARTIFACT_TYPE))
        .unwrap();
    assert_eq!(via, ReferrersVia::Tag);
    assert_eq!(idx.manifests.len(), 1);
    assert_eq!(idx.manifests[0].digest, second.digest);
    assert_eq!(
        idx.manifests[0]
            .annotations
            .get(artifacts::ANN_CREATED)
            .map(String::as_str),
        Some("2026-12-03T11:00:00Z")
    );
    // Keeping old ones.
    c.push_referrer("r", &set.to_manifest(), false).unwrap();
    let (idx, _) = c
        .referrers("r", &subject.digest, Some(ARTIFACT_TYPE))
        .unwrap();
    let mut ds: Vec<_> = idx.manifests.iter().map(|d| d.digest.clone()).collect();
    ds.sort();
    let mut want = vec![first.digest, second.digest];
    want.sort();
    assert_eq!(ds, want);
}

#[test]
fn bearer_token_flow() {
    let s = Server::start(|st| st.auth = true);
    let creds = Credentials::Basic {
        username: "u".into(),
        password: "p".into(),
    };
    let c = s.client(Some(creds));
    c.ping().unwrap();
    let (subject, _) = setup(&c, "r");
    assert!(c.head_manifest("r", &subject.digest).unwrap().is_some());
    // The token was fetched once and reused.
    assert_eq!(
        s.log()
            .iter()
            .filter(|l| l.starts_with("GET /token"))
            .count(),
        1,
        "{:?}",
        s.log()
    );
    // Without credentials the realm refuses: a clear status error.
    let e = s.client(None).ping().unwrap_err();
    assert!(matches!(e, Error::Status { status: 401, .. }), "{e}");
    let wrong = Credentials::Basic {
        username: "u".into(),
        password: "x".into(),
    };
    assert!(s.client(Some(wrong)).ping().is_err());
}

#[test]
fn configured_headers_go_with_every_request() {
    // hosts.toml's [header] becomes ClientOptions::headers on the node: every request to
    // the registry carries them, the token fetch, uploads and their PUT included.
    let s = Server::start(|st| {
        st.mode = Mode::NoApi;
        st.auth = true;
    });
    let creds = Credentials::Basic {
        username: "u".into(),
        password: "p".into(),
    };
    let c = s.client_with(
        Some(creds),
        vec![("X-Mirror-Token".into(), "secret-1".into())],
    );
    let (subject, set) = setup(&c, "r");
    c.push_referrer("r", &set.to_manifest(), true).unwrap();
    let (index, via) = c
        .referrers("r", &subject.digest, Some(ARTIFACT_TYPE))
        .unwrap();
    assert_eq!((index.manifests.len(), via), (1, ReferrersVia::Tag));
    let st = s.state.lock().unwrap();
    assert!(st.log.iter().any(|l| l.starts_with("GET /token")));
    assert!(st.log.iter().any(|l| l.starts_with("PUT /upload/")));
    assert_eq!(st.mirror_tokens.len(), st.log.len());
    for (l, t) in st.log.iter().zip(&st.mirror_tokens) {
        assert_eq!(t.as_deref(), Some("secret-1"), "{l}");
    }
    drop(st);
    // And a client without them sends none.
    s.client(None).ping().ok();
    assert_eq!(s.state.lock().unwrap().mirror_tokens.last(), Some(&None));
}

#[test]
fn corrupt_blobs_are_refused() {
    let s = Server::start(|_| {});
    let c = s.client(None);
    let (_, set) = setup(&c, "r");
    s.state.lock().unwrap().corrupt = true;
    let e = c
        .get_blob("r", &set.layers[0].tar_index.descriptor, 1 << 20)
        .unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
    // A manifest fetched by digest is checked too.
    let d = format!("sha256:{}", "2".repeat(64));
    s.state.lock().unwrap().manifests.insert(
        ("r".into(), d.clone()),
        (MEDIA_TYPE_OCI_MANIFEST.into(), b"{}".to_vec()),
    );
    let e = c.get_manifest("r", &d).unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
    let e = c
        .get_manifest("r", &format!("sha256:{}", "3".repeat(64)))
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[test]
fn a_hanging_registry_times_out() {
    let s = Server::start(|st| st.hang = true);
    let c = s.client(None);
    let t = Instant::now();
    let e = c.ping().unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Nothing listens: a connection error, quickly.
    let port = s.port;
    drop(s);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = l.local_addr().unwrap().port();
    drop(l);
    assert_ne!(port, closed);
    let c = Client::new(
        &format!("http://127.0.0.1:{closed}"),
        ClientOptions::default(),
    )
    .unwrap();
    assert!(matches!(c.ping(), Err(Error::Io { .. })));
}

#[test]
fn tls_handshakes_are_bounded() {
    // A server that accepts and never says a word: the handshake is held to the connect
    // timeout, though reads may wait 30 s and the request has no deadline.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming() {
            held.push(c);
        }
    });
    let c = Client::new(
        &format!("https://127.0.0.1:{port}"),
        ClientOptions {
            connect_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(30),
            request_timeout: None,
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let t = Instant::now();
    let e = c.ping().unwrap_err();
    assert!(
        matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut || source.kind() == std::io::ErrorKind::WouldBlock),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A plain HTTP server behind an https URL: a failed handshake at once, not a hang (a
    // TLS error, or the end of file of a server that gave up on the ClientHello).
    let s = Server::start(|_| {});
    let c = Client::new(
        &format!("https://127.0.0.1:{}", s.port),
        ClientOptions::default(),
    )
    .unwrap();
    let t = Instant::now();
    let e = c.ping().unwrap_err();
    assert!(
        matches!(e, Error::Tls { .. } | Error::Io { .. }) && e.to_string().contains("TLS"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}
