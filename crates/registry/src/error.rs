//! Errors of this crate.

/// What can go wrong talking to a registry or reading what it returned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A connection or transfer failed (including timeouts).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The registry answered with an unexpected status.
    #[error("{method} {url}: HTTP {status}{}", if .body.is_empty() { String::new() } else { format!(": {}", .body) })]
    Status {
        /// Request method.
        method: String,
        /// Request URL.
        url: String,
        /// Status code.
        status: u16,
        /// Start of the response body, for the message.
        body: String,
    },
    /// The registry's answer is not valid HTTP, or bigger than allowed.
    #[error("{0}")]
    Protocol(String),
    /// Content does not have the digest it was asked for or announced with.
    #[error("{what}: content has digest {actual}, expected {expected}")]
    DigestMismatch {
        /// What was read.
        what: String,
        /// The expected digest.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// A manifest, index or artifact description is not what the format says.
    #[error("{0}")]
    Format(String),
    /// A reference (`host/repo:tag@digest`) that cannot be parsed.
    #[error("invalid reference {0:?}: {1}")]
    Reference(String, String),
    /// A key file or signature is malformed, or the signature does not verify.
    #[error("{0}")]
    Signature(String),
    /// TLS settings that cannot be used, or a TLS connection that failed (certificate
    /// refused either way, handshake failed).
    #[error("TLS with {host}: {reason}")]
    Tls {
        /// `host[:port]` of the connection (or of the client the settings were for).
        host: String,
        /// What failed (in the message, not as a separate source: it would say it twice).
        reason: crate::tls::TlsError,
    },
    /// Something this client does not do (e.g. a registry path prefix).
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether this is an HTTP 404 answer.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Status { status: 404, .. })
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
