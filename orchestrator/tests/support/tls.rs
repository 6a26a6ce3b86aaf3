//! TLS for tests: certificates made at test time (a self-signed CA and a server certificate
//! for 127.0.0.1 and localhost, as PEM files in a directory removed on drop) and a small
//! rustls client that says which protocol ALPN chose.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;

/// A CA and a server certificate signed by it, written to a fresh directory.
pub struct Pki {
    pub dir: PathBuf,
    /// The CA certificate, PEM (what `SSL_CERT_FILE` points at).
    pub ca_pem: String,
}

impl Pki {
    pub fn new() -> Pki {
        let name = format!("servicekit-tls-{}", ulid::Ulid::new());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("temp dir");

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            // Unique, so another test CA is a stranger, not an issuer of the same name.
            .push(DnType::CommonName, format!("{name} CA"));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");

        let mut params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "orchestrator");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");

        let pki = Pki {
            dir,
            ca_pem: ca.pem(),
        };
        std::fs::write(pki.cert_path(), cert.pem()).expect("write cert");
        std::fs::write(pki.key_path(), key.serialize_pem()).expect("write key");
        std::fs::write(pki.ca_path(), &pki.ca_pem).expect("write CA");
        pki
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A file in this directory with `content`.
    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, content).expect("write file");
        path
    }

    /// A rustls client trusting this CA (ring, as the server), offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        client_config(Path::new(&self.ca_path()), alpn)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A rustls client trusting the certificates in `ca_file`, offering `alpn`.
pub fn client_config(ca_file: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("CA file") {
        roots.add(cert.expect("CA cert")).expect("CA accepted");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// What one request over a fresh TLS connection got.
#[derive(Debug)]
pub struct Answer {
    /// The protocol ALPN chose (`None`: the server chose none).
    pub alpn: Option<Vec<u8>>,
    pub version: http::Version,
    pub status: StatusCode,
    pub body: Value,
}

/// One request to `addr` over TLS (server name `localhost`), speaking HTTP/2 when ALPN chose
/// `h2`, HTTP/1.1 otherwise. Errors (the handshake's among them) come back as text.
pub async fn request(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<Answer, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let server = ServerName::try_from("localhost").expect("server name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(server, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let io = TokioIo::new(tls);
    let mut req = Request::builder()
        .method(method)
        .uri(format!("https://localhost:{}{path}", addr.port()));
    let bytes = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            serde_json::to_vec(v).expect("json")
        }
        None => Vec::new(),
    };
    let req = req.body(Full::new(Bytes::from(bytes))).expect("request");
    let res = if alpn.as_deref() == Some(b"h2") {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        send.send_request(req).await
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("http1 handshake: {e}"))?;
        tokio::spawn(conn);
        let mut req = req;
        *req.uri_mut() = path.parse().map_err(|e| format!("path: {e}"))?;
        req.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_str(&format!("localhost:{}", addr.port())).expect("host"),
        );
        send.send_request(req).await
    }
    .map_err(|e| format!("request: {e}"))?;
    let version = res.version();
    let status = res.status();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).map_err(|e| format!("JSON: {e}"))?
    };
    Ok(Answer {
        alpn,
        version,
        status,
        body,
    })
}
