//! A minimal blocking HTTP/1.1 client: one request per connection (`Connection: close`),
//! plain HTTP or HTTPS ([`crate::tls`]), bounded in time (connect timeout, which also bounds the
//! TLS handshake, per-read timeout, overall deadline) and in size (headers, and bodies read
//! into memory).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::tls::{TlsConfig, TlsError, rustls_cause};

/// Largest response head accepted.
const MAX_HEAD: usize = 64 << 10;

/// Time limits of one request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// To establish the TCP connection, and again for the TLS handshake.
    pub connect: Duration,
    /// Longest wait for any single read or write.
    pub io: Duration,
    /// The whole request, response body included (`None`: no overall limit).
    pub total: Option<Duration>,
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A parsed `http[s]://host[:port]/path?query` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// The scheme.
    pub scheme: Scheme,
    /// `host[:port]` as given (Host header).
    pub authority: String,
    /// Path and query, starting with `/`.
    pub target: String,
}

impl Url {
    /// Parse an absolute `http://` or `https://` URL.
    pub fn parse(s: &str) -> Result<Url> {
        let (scheme, rest) = if let Some(r) = s.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (Scheme::Http, r)
        } else {
            return Err(Error::Protocol(format!(
                "{s:?} is not an http:// or https:// URL"
            )));
        };
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty()
            || !authority
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        {
            return Err(Error::Protocol(format!("bad host in URL {s:?}")));
        }
        Ok(Url {
            scheme,
            authority: authority.to_string(),
            target,
        })
    }

    /// `scheme://authority/target`.
    pub fn to_url_string(&self) -> String {
        format!(
            "{}://{}{}",
            self.scheme.as_str(),
            self.authority,
            self.target
        )
    }

    /// The host without the port (`name`, `1.2.3.4`, `[::1]`).
    pub fn host(&self) -> &str {
        split_port(&self.authority).0
    }
}

/// `host[:port]` → (host, port if given).
fn split_port(authority: &str) -> (&str, Option<&str>) {
    match authority.rsplit_once(':') {
        Some((h, p))
            if !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']')) =>
        {
            (h, Some(p))
        }
        _ => (authority, None),
    }
}

/// A connection: TCP, or TLS over TCP.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// A response whose body has not been read yet.
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    body: Body,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl Response {
    /// First header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as a reader (de-chunked, ending where the body ends).
    pub fn reader(&mut self) -> &mut dyn Read {
        &mut self.body
    }

    /// Read the whole body, refusing more than `max` bytes.
    pub fn read_body(&mut self, max: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let n = (&mut self.body)
            .take(max as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| Error::io("reading the response body", e))?;
        if n > max {
            return Err(Error::Protocol(format!(
                "response body larger than {max} bytes"
            )));
        }
        Ok(out)
    }

    /// Up to 512 bytes of body as text, for error messages.
    pub fn body_snippet(&mut self) -> String {
        let mut b = Vec::new();
        let _ = (&mut self.body).take(512).read_to_end(&mut b);
        String::from_utf8_lossy(&b).trim().to_string()
    }
}

struct Conn {
    r: BufReader<Stream>,
    deadline: Option<Instant>,
    io: Duration,
}

impl Conn {
    /// Set the socket's read timeout to what is left (at most the per-read limit).
    fn arm(&mut self) -> io::Result<()> {
        let t = match self.deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request deadline passed",
                    ));
                }
                left.min(self.io)
            }
            None => self.io,
        };
        self.r.get_ref().tcp().set_read_timeout(Some(t))
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.r.read(buf)
    }
}

enum Body {
    Empty,
    Length(io::Take<Conn>),
    Chunked { c: Conn, left: u64, done: bool },
    Close(Conn),
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Body::Empty => Ok(0),
            Body::Length(t) => {
                let want = t.limit();
                let n = t.read(buf)?;
                if n == 0 && want > 0 && !buf.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before the end of the body",
                    ));
                }
                Ok(n)
            }
            Body::Close(c) => c.read(buf),
            Body::Chunked { c, left, done } => {
                if *done || buf.is_empty() {
                    return Ok(0);
                }
                if *left == 0 {
                    let line = read_line(c)?;
                    let size = line.split(';').next().unwrap_or("").trim();
                    *left = u64::from_str_radix(size, 16).map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "bad chunk size")
                    })?;
                    if *left == 0 {
                        // Trailers up to the empty line.
                        while !read_line(c)?.is_empty() {}
                        *done = true;
                        return Ok(0);
                    }
                }
                let k = (*left).min(buf.len() as u64) as usize;
                let n = c.read(&mut buf[..k])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a chunk",
                    ));
                }
                *left -= n as u64;
                if *left == 0 {
                    let crlf = read_line(c)?;
                    if !crlf.is_empty() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "chunk not followed by CRLF",
                        ));
                    }
                }
                Ok(n)
            }
        }
    }
}

/// One line without its CRLF, at most 4 KiB.
fn read_line(c: &mut Conn) -> io::Result<String> {
    let mut line = Vec::new();
    c.arm()?;
    let n = (&mut c.r).take(4096).read_until(b'\n', &mut line)?;
    if n == 0 || line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "truncated or overlong line",
        ));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn connect(url: &Url, limits: &Limits) -> Result<TcpStream> {
    let authority = url.authority.as_str();
    let with_port = match split_port(authority) {
        (_, Some(_)) => authority.to_string(),
        (h, None) => format!(
            "{h}:{}",
            match url.scheme {
                Scheme::Http => 80,
                Scheme::Https => 443,
            }
        ),
    };
    let addrs = with_port
        .to_socket_addrs()
        .map_err(|e| Error::io(format!("resolving {authority}"), e))?;
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, limits.connect) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(Error::io(
        format!("connecting to {authority}"),
        last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")),
    ))
}

/// TCP, then for `https` the TLS handshake, within `limits.connect` (and the deadline).
fn open(
    url: &Url,
    limits: &Limits,
    deadline: Option<Instant>,
    tls: Option<&TlsConfig>,
) -> Result<Stream> {
    let s = connect(url, limits)?;
    let io_err = |e| Error::io(format!("connecting to {}", url.authority), e);
    s.set_write_timeout(Some(limits.io)).map_err(io_err)?;
    if url.scheme == Scheme::Http {
        return Ok(Stream::Plain(s));
    }
    let tls = tls.ok_or_else(|| {
        Error::Unsupported(format!(
            "{}: https without TLS settings",
            url.to_url_string()
        ))
    })?;
    if tls.skip_verify() {
        crate::tls::warn_skip_verify(&url.authority);
    }
    let tls_err = |reason| Error::Tls {
        host: url.authority.clone(),
        reason,
    };
    let name = crate::tls::server_name(url.host())?;
    let mut conn = rustls::ClientConnection::new(Arc::clone(tls.config()), name)
        .map_err(|e| tls_err(TlsError::Handshake(e.to_string())))?;
    let hs_deadline = {
        let d = Instant::now() + limits.connect;
        deadline.map_or(d, |t| t.min(d))
    };
    let mut sock = s;
    while conn.is_handshaking() {
        let left = hs_deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::io(
                format!("TLS handshake with {}", url.authority),
                io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"),
            ));
        }
        sock.set_read_timeout(Some(left.min(limits.io)))
            .map_err(io_err)?;
        sock.set_write_timeout(Some(left.min(limits.io)))
            .map_err(io_err)?;
        if let Err(e) = conn.complete_io(&mut sock) {
            return Err(match rustls_cause(&e) {
                Some(r) => tls_err(TlsError::from_rustls(r, url.host())),
                None => Error::io(format!("TLS handshake with {}", url.authority), e),
            });
        }
    }
    sock.set_write_timeout(Some(limits.io)).map_err(io_err)?;
    Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, sock))))
}

/// Send one request and read the response head (`tls` is needed for `https` URLs).
pub fn send(
    method: &str,
    url: &Url,
    headers: &[(&str, &str)],
    body: &[u8],
    limits: &Limits,
    tls: Option<&TlsConfig>,
) -> Result<Response> {
    send_body(
        method,
        url,
        headers,
        &mut &body[..],
        body.len() as u64,
        limits,
        tls,
    )
}

/// [`send`] with a body of `len` bytes streamed from `body` (uploads of large blobs).
pub fn send_body(
    method: &str,
    url: &Url,
    headers: &[(&str, &str)],
    body: &mut dyn Read,
    len: u64,
    limits: &Limits,
    tls: Option<&TlsConfig>,
) -> Result<Response> {
    let what = || format!("{method} {}", url.to_url_string());
    // A TLS failure after the handshake (a server refusing our client certificate sends
    // its alert then) is still reported as TLS.
    let fail = |context: String, e: io::Error| match rustls_cause(&e) {
        Some(r) => Error::Tls {
            host: url.authority.clone(),
            reason: TlsError::from_rustls(r, url.host()),
        },
        None => Error::io(context, e),
    };
    let deadline = limits.total.map(|t| Instant::now() + t);
    let mut s = open(url, limits, deadline, tls)?;
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: erofs-snapshotter\r\n",
        url.target, url.authority
    );
    if len > 0 || matches!(method, "PUT" | "POST") {
        head.push_str(&format!("Content-Length: {len}\r\n"));
    }
    for (k, v) in headers {
        if k.contains(['\r', '\n']) || v.contains(['\r', '\n']) {
            return Err(Error::Protocol(format!("header {k:?} has a line break")));
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let w = &mut s;
    w.write_all(head.as_bytes())
        .and_then(|()| {
            let n = io::copy(&mut body.take(len), w)?;
            if n != len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("request body ended after {n} of {len} bytes"),
                ));
            }
            Ok(())
        })
        .and_then(|()| w.flush())
        .map_err(|e| fail(what(), e))?;
    let mut c = Conn {
        r: BufReader::new(s),
        deadline,
        io: limits.io,
    };
    // Status line and headers.
    let mut total = 0usize;
    let mut next_line = |c: &mut Conn| -> Result<String> {
        let l = read_line(c).map_err(|e| fail(format!("{}: response", what()), e))?;
        total += l.len() + 2;
        if total > MAX_HEAD {
            return Err(Error::Protocol(format!(
                "{}: response head larger than {MAX_HEAD} bytes",
                what()
            )));
        }
        Ok(l)
    };
    let status_line = next_line(&mut c)?;
    let status: u16 = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Protocol(format!("{}: bad status line {status_line:?}", what())))?;
    let mut hdrs = Vec::new();
    loop {
        let l = next_line(&mut c)?;
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            hdrs.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let get = |n: &str| hdrs.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    let chunked =
        get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status)
    {
        Body::Empty
    } else if chunked {
        Body::Chunked {
            c,
            left: 0,
            done: false,
        }
    } else if let Some(len) = get("content-length") {
        let len: u64 = len
            .parse()
            .map_err(|_| Error::Protocol(format!("{}: bad Content-Length {len:?}", what())))?;
        Body::Length(c.take(len))
    } else {
        Body::Close(c)
    };
    Ok(Response {
        status,
        headers: hdrs,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://127.0.0.1:5000/token?service=x").unwrap();
        assert_eq!(u.authority, "127.0.0.1:5000");
        assert_eq!(u.target, "/token?service=x");
        assert_eq!(u.host(), "127.0.0.1");
        assert_eq!(Url::parse("http://h").unwrap().target, "/");
        assert_eq!(Url::parse("http://h?a=b").unwrap().target, "/?a=b");
        let u = Url::parse("https://[::1]:5000/v2/").unwrap();
        assert_eq!((u.scheme, u.host()), (Scheme::Https, "[::1]"));
        assert_eq!(u.to_url_string(), "https://[::1]:5000/v2/");
        assert_eq!(Url::parse("https://[::1]").unwrap().host(), "[::1]");
        assert!(Url::parse("ftp://h/").is_err());
        assert!(Url::parse("http://h\r\n/").is_err());
    }
}
