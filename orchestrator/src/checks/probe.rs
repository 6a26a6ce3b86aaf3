//! One probe of a [`Probe`]: connect, ask, judge, within the check's timeout.
//!
//! Every probe connects afresh to the host [`Probe::resolve`] fixed at registration (nothing
//! here picks another one), follows no redirect, reads at most [`MAX_BODY_BYTES`] of a body
//! and then drops the connection, and is bounded as a whole by the timeout: a target that
//! accepts and never answers, or drips a byte a second, costs the orchestrator at most that.

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HOST, TE, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use servicekit::protocol::HealthStatus;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use url::Url;

use super::Probe;

/// The most of a response body a check reads (into its output); the rest is never read.
pub const MAX_BODY_BYTES: usize = 4096;
/// The largest response head (HTTP/1: buffer; HTTP/2: header list) a check accepts.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The header naming the orchestrator replica that runs a check.
pub const CHECKER_HEADER: &str = "x-servicekit-checker";
/// The path of the standard gRPC health check.
const GRPC_HEALTH_PATH: &str = "/grpc.health.v1.Health/Check";

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub status: HealthStatus,
    /// A short human text: `HTTP 200`, `HTTP 503: <body>`, `timed out after 2 s`, …
    pub output: String,
}

impl ProbeResult {
    fn new(status: HealthStatus, output: impl Into<String>) -> Self {
        ProbeResult {
            status,
            output: output.into(),
        }
    }

    fn critical(output: impl Into<String>) -> Self {
        Self::new(HealthStatus::Critical, output)
    }
}

/// Runs probes; one per orchestrator, shared by every check (its TLS configurations are
/// built on first use, so an orchestrator without https checks never reads trust roots).
pub struct Prober {
    user_agent: HeaderValue,
    checker: HeaderValue,
    #[cfg(feature = "tls")]
    tls: tls::Configs,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober")
            .field("checker", &self.checker)
            .finish_non_exhaustive()
    }
}

/// Why a probe failed before it had an answer to judge.
enum Failure {
    /// The deadline passed while connecting (`true`) or afterwards.
    TimedOut { connecting: bool },
    /// Anything else, said in a few words.
    Other(String),
}

impl Prober {
    /// A prober that names `replica` in [`CHECKER_HEADER`]. `replica` is the orchestrator's
    /// own id (ASCII); anything a header cannot carry is replaced.
    pub fn new(replica: &str) -> Self {
        let user_agent = concat!("servicekit-orchestrator/", env!("CARGO_PKG_VERSION"));
        Prober {
            user_agent: HeaderValue::from_static(user_agent),
            checker: HeaderValue::from_str(replica)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
            #[cfg(feature = "tls")]
            tls: tls::Configs::default(),
        }
    }

    /// Probes `probe` once, all of it within `timeout`.
    pub async fn probe(&self, probe: &Probe, timeout: Duration) -> ProbeResult {
        let deadline = Instant::now() + timeout;
        let result = match probe {
            Probe::Http(url) => self.http(url, deadline).await,
            Probe::Tcp { host, port } => connect(host, *port, deadline)
                .await
                .map(|_| ProbeResult::new(HealthStatus::Passing, "TCP connect ok")),
            Probe::Grpc { url, service } => self.grpc(url, service, deadline).await,
        };
        result.unwrap_or_else(|failure| match failure {
            Failure::TimedOut { connecting: true } => {
                ProbeResult::critical(format!("connect timed out after {}", secs(timeout)))
            }
            Failure::TimedOut { connecting: false } => {
                ProbeResult::critical(format!("timed out after {}", secs(timeout)))
            }
            Failure::Other(why) => ProbeResult::critical(why),
        })
    }

    async fn http(&self, url: &Url, deadline: Instant) -> Result<ProbeResult, Failure> {
        let (host, port) = host_port(url)?;
        let stream = connect(&host, port, deadline).await?;
        let request = Request::get(path_and_query(url))
            .header(HOST, authority(url))
            .header(USER_AGENT, self.user_agent.clone())
            .header(CHECKER_HEADER, self.checker.clone())
            .body(Empty::<Bytes>::new())
            .map_err(|e| Failure::Other(format!("bad request: {e}")))?;
        let exchange = async {
            match url.scheme() {
                "https" => {
                    let io = self.tls_connect(&host, stream, false).await?;
                    http1(io, request).await
                }
                _ => http1(stream, request).await,
            }
        };
        let (status, body) = within(deadline, exchange).await?;
        let judged = if status.is_success() {
            HealthStatus::Passing
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            HealthStatus::Warning
        } else {
            // 3xx included: a check follows no redirect (it could point anywhere).
            HealthStatus::Critical
        };
        let mut output = format!("HTTP {}", status.as_u16());
        let text = body_text(&body);
        if !text.is_empty() {
            output.push_str(": ");
            output.push_str(&text);
        }
        Ok(ProbeResult::new(judged, output))
    }

    async fn grpc(
        &self,
        url: &Url,
        service: &str,
        deadline: Instant,
    ) -> Result<ProbeResult, Failure> {
        let (host, port) = host_port(url)?;
        let stream = connect(&host, port, deadline).await?;
        let uri = format!("{}://{}{GRPC_HEALTH_PATH}", url.scheme(), authority(url));
        let request = Request::post(uri)
            .header(CONTENT_TYPE, "application/grpc")
            .header(TE, "trailers")
            .header(USER_AGENT, self.user_agent.clone())
            .header(CHECKER_HEADER, self.checker.clone())
            .body(Full::new(grpc::request(service)))
            .map_err(|e| Failure::Other(format!("bad request: {e}")))?;
        let exchange = async {
            match url.scheme() {
                "https" => {
                    let io = self.tls_connect(&host, stream, true).await?;
                    http2(io, request).await
                }
                _ => http2(stream, request).await,
            }
        };
        let answer = within(deadline, exchange).await?;
        Ok(grpc::judge(answer))
    }

    #[cfg(feature = "tls")]
    async fn tls_connect(
        &self,
        host: &str,
        stream: TcpStream,
        h2: bool,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Failure> {
        self.tls
            .connect(host, stream, h2)
            .await
            .map_err(Failure::Other)
    }

    #[cfg(not(feature = "tls"))]
    async fn tls_connect(&self, _: &str, _: TcpStream, _: bool) -> Result<TcpStream, Failure> {
        Err(Failure::Other(
            "https checks need the orchestrator's `tls` feature".into(),
        ))
    }
}

/// `2 s`, `500 ms`.
fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Runs `f` until `deadline`; past it, the probe timed out (after connecting).
async fn within<T>(
    deadline: Instant,
    f: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout_at(deadline, f)
        .await
        .unwrap_or(Err(Failure::TimedOut { connecting: false }))
}

/// The host (IPv6 without brackets) and port of a probe URL.
fn host_port(url: &Url) -> Result<(String, u16), Failure> {
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(Failure::Other("no host".into())),
    };
    let port = url
        .port_or_known_default()
        .ok_or_else(|| Failure::Other("no port".into()))?;
    Ok((host, port))
}

/// `host[:port]` as the Host header (and HTTP/2 authority) carries it.
fn authority(url: &Url) -> &str {
    &url[url::Position::BeforeHost..url::Position::AfterPort]
}

fn path_and_query(url: &Url) -> &str {
    &url[url::Position::BeforePath..url::Position::AfterQuery]
}

/// Connects to `host:port` (a name is resolved; each address is tried in turn) by `deadline`.
async fn connect(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, Failure> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match tokio::time::timeout_at(deadline, TcpStream::connect((host, port))).await {
        Err(_) => Err(Failure::TimedOut { connecting: true }),
        Ok(Err(e)) => Err(Failure::Other(connect_error(&e))),
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

fn connect_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        _ => format!("connect failed: {e}"),
    }
}

/// Aborts the connection task it holds when dropped: the probe is done with the connection.
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One HTTP/1.1 exchange on `io`: the status and at most [`MAX_BODY_BYTES`] of the body.
async fn http1<IO>(io: IO, request: Request<Empty<Bytes>>) -> Result<(StatusCode, Bytes), Failure>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(100)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
        .map_err(|e| Failure::Other(format!("HTTP error: {e}")))?;
    let _conn = Abort(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Failure::Other(http_error(&e)))?;
    let status = response.status();
    let (body, _) = read_capped(response.into_body()).await?;
    Ok((status, body))
}

/// What an HTTP/2 exchange returned: status, head, capped body, trailers.
struct H2Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

async fn http2<IO>(io: IO, request: Request<Full<Bytes>>) -> Result<H2Answer, Failure>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .handshake::<_, Full<Bytes>>(TokioIo::new(io))
        .await
        .map_err(|e| Failure::Other(format!("HTTP/2 error: {e}")))?;
    let _conn = Abort(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Failure::Other(http_error(&e)))?;
    let (parts, body) = response.into_parts();
    let (body, trailers) = read_capped(body).await?;
    Ok(H2Answer {
        status: parts.status,
        headers: parts.headers,
        body,
        trailers,
    })
}

fn http_error(e: &hyper::Error) -> String {
    // hyper's own words ("message head is too large", "connection closed before message
    // completed") name the problem well enough; its source adds the I/O detail.
    match std::error::Error::source(e) {
        Some(source) => format!("HTTP error: {e}: {source}"),
        None => format!("HTTP error: {e}"),
    }
}

/// Reads a body until its end, its trailers or [`MAX_BODY_BYTES`], whichever comes first.
async fn read_capped(mut body: Incoming) -> Result<(Bytes, Option<HeaderMap>), Failure> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::Other(http_error(&e)))?;
        match frame.into_data() {
            Ok(data) => {
                let room = MAX_BODY_BYTES - buf.len();
                buf.extend_from_slice(&data[..data.len().min(room)]);
                if buf.len() >= MAX_BODY_BYTES {
                    break;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return Ok((buf.freeze(), Some(trailers)));
                }
            }
        }
    }
    Ok((buf.freeze(), None))
}

/// A body as one line of text: invalid UTF-8 replaced, control characters and runs of
/// whitespace turned into one space, trimmed. (The record's output is cut further to
/// `MAX_HEALTH_OUTPUT`; logs escape it again.)
fn body_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.chars() {
        if c.is_whitespace() || crate::logsafe::is_forbidden_in_names(c) {
            space = true;
        } else {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.push(c);
        }
    }
    out
}

/// The gRPC health protocol's two tiny messages, by hand: a protobuf crate and its code
/// generation would outweigh them many times over.
mod grpc {
    use super::*;

    /// `grpc.health.v1.HealthCheckResponse.ServingStatus` names.
    fn serving_status(n: u64) -> &'static str {
        match n {
            0 => "UNKNOWN",
            1 => "SERVING",
            2 => "NOT_SERVING",
            3 => "SERVICE_UNKNOWN",
            _ => "unknown status",
        }
    }

    /// The framed `HealthCheckRequest { service }` (field 1, a string; omitted when empty).
    pub(super) fn request(service: &str) -> Bytes {
        let mut message = Vec::with_capacity(service.len() + 4);
        if !service.is_empty() {
            message.push(0x0a);
            varint(&mut message, service.len() as u64);
            message.extend_from_slice(service.as_bytes());
        }
        let mut framed = Vec::with_capacity(message.len() + 5);
        framed.push(0); // not compressed
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        Bytes::from(framed)
    }

    fn varint(out: &mut Vec<u8>, mut n: u64) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }

    fn read_varint(buf: &mut &[u8]) -> Option<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first()?;
            *buf = rest;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    /// The `status` (field 1, an enum) of a `HealthCheckResponse`; 0 when absent, `None`
    /// when the message does not parse.
    pub(super) fn status_of(mut msg: &[u8]) -> Option<u64> {
        let mut status = 0;
        while !msg.is_empty() {
            let key = read_varint(&mut msg)?;
            match (key >> 3, key & 7) {
                (1, 0) => status = read_varint(&mut msg)?,
                (_, 0) => {
                    read_varint(&mut msg)?;
                }
                (_, 1) => msg = msg.get(8..)?,
                (_, 2) => {
                    let len = usize::try_from(read_varint(&mut msg)?).ok()?;
                    msg = msg.get(len..)?;
                }
                (_, 5) => msg = msg.get(4..)?,
                _ => return None,
            }
        }
        Some(status)
    }

    fn grpc_status(headers: &HeaderMap) -> Option<(u32, String)> {
        let code = headers
            .get("grpc-status")?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let message = headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        Some((code, message.to_owned()))
    }

    pub(super) fn judge(answer: H2Answer) -> ProbeResult {
        if answer.status != StatusCode::OK {
            return ProbeResult::critical(format!("gRPC: HTTP {}", answer.status.as_u16()));
        }
        // The status is in the trailers, or in the head of a trailers-only answer.
        let status = answer
            .trailers
            .as_ref()
            .and_then(grpc_status)
            .or_else(|| grpc_status(&answer.headers));
        match status {
            Some((0, _)) => {}
            Some((code, message)) => {
                let mut output = format!("grpc-status {code}");
                let message = body_text(message.as_bytes());
                if !message.is_empty() {
                    output.push_str(": ");
                    output.push_str(&message);
                }
                return ProbeResult::critical(output);
            }
            None => return ProbeResult::critical("gRPC: no grpc-status in the answer"),
        }
        let body = &answer.body[..];
        let message = match body {
            [0, a, b, c, d, rest @ ..] => {
                let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
                rest.get(..len)
            }
            _ => None,
        };
        match message.and_then(status_of) {
            Some(1) => ProbeResult::new(HealthStatus::Passing, "gRPC SERVING"),
            Some(n) => ProbeResult::critical(format!("gRPC {}", serving_status(n))),
            None => ProbeResult::critical("gRPC: unreadable health response"),
        }
    }
}

/// rustls on ring with the system's trust roots (or `SSL_CERT_FILE`), as the library's
/// client does; one configuration for HTTP/1.1, one offering only `h2` for gRPC.
#[cfg(feature = "tls")]
mod tls {
    use std::sync::{Arc, OnceLock};

    use rustls::pki_types::ServerName;
    use tokio::net::TcpStream;
    use tokio_rustls::client::TlsStream;

    #[derive(Default)]
    pub(super) struct Configs {
        http1: OnceLock<Arc<rustls::ClientConfig>>,
        h2: OnceLock<Arc<rustls::ClientConfig>>,
    }

    fn roots() -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "check.tls_roots_unreadable");
        }
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!(
                "check.tls_no_roots: no trusted root certificate; https checks will fail"
            );
        }
        roots
    }

    fn config(alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots())
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }

    impl Configs {
        fn get(&self, h2: bool) -> Result<Arc<rustls::ClientConfig>, String> {
            let (cell, alpn): (_, &[u8]) = if h2 {
                (&self.h2, b"h2")
            } else {
                (&self.http1, b"http/1.1")
            };
            if let Some(c) = cell.get() {
                return Ok(c.clone());
            }
            let made = config(alpn)?;
            Ok(cell.get_or_init(|| made).clone())
        }

        pub(super) async fn connect(
            &self,
            host: &str,
            stream: TcpStream,
            h2: bool,
        ) -> Result<TlsStream<TcpStream>, String> {
            let name = ServerName::try_from(host.to_owned())
                .map_err(|_| "TLS: the host is not a valid server name".to_owned())?;
            tokio_rustls::TlsConnector::from(self.get(h2)?)
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_round_trip_by_hand() {
        assert_eq!(&grpc::request("")[..], &[0, 0, 0, 0, 0]);
        let framed = grpc::request("svc.v1.Echo");
        assert_eq!(&framed[..7], &[0, 0, 0, 0, 13, 0x0a, 11]);
        assert_eq!(&framed[7..], b"svc.v1.Echo");
        // status SERVING, with an unknown field of each wire type around it.
        let msg = [
            0x10, 0x05, 0x1a, 0x02, b'h', b'i', 0x08, 0x01, 0x25, 1, 2, 3, 4,
        ];
        assert_eq!(grpc::status_of(&msg), Some(1));
        assert_eq!(grpc::status_of(&[]), Some(0));
        assert_eq!(grpc::status_of(&[0x08, 0x02]), Some(2));
        assert_eq!(grpc::status_of(&[0x08]), None);
        assert_eq!(grpc::status_of(&[0x1a, 0x09, 1]), None);
    }

    #[test]
    fn body_text_is_one_trimmed_line() {
        assert_eq!(
            body_text(b"  ok\r\n\tfine\x1b[31m \xff "),
            "ok fine [31m \u{fffd}"
        );
        assert_eq!(body_text(b"\n\n"), "");
    }

    #[test]
    fn timeouts_read_as_people_write_them() {
        assert_eq!(secs(Duration::from_secs(2)), "2 s");
        assert_eq!(secs(Duration::from_millis(500)), "500 ms");
    }
}
