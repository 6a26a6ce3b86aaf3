//! Serving HTTPS: the certificate chain and private key from PEM files (`--tls-cert`,
//! `--tls-key`), rustls on ring (it builds with a C compiler alone; aws-lc-rs needs cmake),
//! HTTP/2 and HTTP/1.1 offered through ALPN.
//!
//! The handshake runs inside each connection's own task under [`HANDSHAKE_TIMEOUT`], never in
//! the accept loop: a peer that opens a connection and sends no ClientHello stalls nobody else
//! and gives its connection permit back within seconds.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::Config;

/// How long a client has to complete the TLS handshake after connecting.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS cannot be served as configured. Each message names the file (never its content).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert (ORCHESTRATOR_TLS_CERT) and --tls-key (ORCHESTRATOR_TLS_KEY) go together: {given} is set, {missing} is not")]
    Incomplete {
        given: &'static str,
        missing: &'static str,
    },
    #[error("cannot use the TLS certificate file {}: {reason}", path.display())]
    Cert { path: PathBuf, reason: String },
    #[error("cannot use the TLS key file {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("the TLS certificate {} and key {} cannot serve together: {reason}", cert.display(), key.display())]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("--tls-cert/--tls-key are set, but this orchestrator was built without TLS: build it with the `tls` feature (on by default)")]
    NotBuilt,
}

/// Accepts TLS connections; cheap to clone (an `Arc` inside).
#[cfg(feature = "tls")]
#[derive(Clone)]
pub struct Acceptor(tokio_rustls::TlsAcceptor);

/// Without the `tls` feature there is nothing to accept with.
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub enum Acceptor {}

/// The acceptor `config` asks for: `None` for cleartext, an error for half a configuration or
/// unusable files.
pub fn from_config(config: &Config) -> Result<Option<Acceptor>, TlsError> {
    match (&config.tls_cert, &config.tls_key) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(TlsError::Incomplete {
            given: "--tls-cert",
            missing: "--tls-key",
        }),
        (None, Some(_)) => Err(TlsError::Incomplete {
            given: "--tls-key",
            missing: "--tls-cert",
        }),
        (Some(cert), Some(key)) => acceptor(cert, key).map(Some),
    }
}

#[cfg(not(feature = "tls"))]
fn acceptor(_cert: &Path, _key: &Path) -> Result<Acceptor, TlsError> {
    Err(TlsError::NotBuilt)
}

#[cfg(feature = "tls")]
fn acceptor(cert: &Path, key: &Path) -> Result<Acceptor, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;

    let cert_error = |reason: String| TlsError::Cert {
        path: cert.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_error(pem_reason(e, "certificate")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(pem_reason(e, "certificate")))?;
    if chain.is_empty() {
        return Err(cert_error(pem_reason(
            rustls::pki_types::pem::Error::NoItemsFound,
            "certificate",
        )));
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        reason: pem_reason(e, "private key (PKCS#8, PKCS#1 or SEC1)"),
    })?;
    let pair = |reason: String| TlsError::Pair {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| pair(e.to_string()))?
        .with_no_client_auth()
        // Also checks that the key belongs to the first certificate.
        .with_single_cert(chain, private_key)
        .map_err(|e| pair(e.to_string()))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Acceptor(tokio_rustls::TlsAcceptor::from(Arc::new(server))))
}

/// A PEM reading error in words: the standard library's I/O message, or what is missing.
#[cfg(feature = "tls")]
fn pem_reason(e: rustls::pki_types::pem::Error, what: &str) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(e) => e.to_string(),
        Error::NoItemsFound => format!("no PEM {what} in it"),
        Error::MissingSectionEnd { .. } => "a PEM section has no END line".into(),
        Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".into(),
        other => format!("not valid PEM ({other})"),
    }
}

/// One accepted connection, cleartext or TLS.
pub enum Stream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// `stream` as served: as it is without TLS, else after a handshake bounded by
/// [`HANDSHAKE_TIMEOUT`]. Call it inside the connection's task.
pub async fn accept(tls: Option<&Acceptor>, stream: TcpStream) -> io::Result<Stream> {
    let Some(acceptor) = tls else {
        return Ok(Stream::Plain(stream));
    };
    #[cfg(feature = "tls")]
    {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.0.accept(stream)).await {
            Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
            )),
        }
    }
    #[cfg(not(feature = "tls"))]
    match *acceptor {}
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => $e,
            #[cfg(feature = "tls")]
            Stream::Tls($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}
