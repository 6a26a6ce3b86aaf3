//! One probe of a [`Probe`]: connect, ask, judge, within the check's timeout.
//!
//! Every probe connects afresh to the host [`Probe::resolve`] fixed at registration (nothing
//! here picks another one), follows no redirect, reads an HTTP check's status line and head
//! but never its body (a gRPC check reads at most [`MAX_BODY_BYTES`]) and then drops the
//! connection, and is bounded as a whole by the timeout: a target that accepts and never
//! answers, or drips a byte a second, costs the orchestrator at most that. A name lookup
//! cannot be stopped at the deadline (getaddrinfo blocks a thread), so lookups in flight are
//! bounded separately ([`resolve`]).
//!
//! An HTTP check's output is its status line only. The registrant picks the URL, and the
//! output is public in the record: quoting the body would let anyone who can register read
//! the first bytes of any page the orchestrator can reach (see the README's threat model).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
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
use tokio::sync::Semaphore;
use tokio::time::Instant;
use url::Url;

use super::Probe;

/// The most of a gRPC response body a check reads; the rest is never read.
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
    /// A short human text: `HTTP 200 OK`, `HTTP 503 Service Unavailable`, `timed out after
    /// 2 s`, `connection refused`, …
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
    /// Name lookups in flight, each held until the lookup itself ends (see [`resolve`]).
    lookups: Arc<Semaphore>,
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
    /// A prober that names `replica` in [`CHECKER_HEADER`] and runs at most `lookups` name
    /// lookups at once. `replica` is the orchestrator's own id (ASCII); anything a header
    /// cannot carry is replaced.
    pub fn new(replica: &str, lookups: usize) -> Self {
        let user_agent = concat!("servicekit-orchestrator/", env!("CARGO_PKG_VERSION"));
        Prober {
            user_agent: HeaderValue::from_static(user_agent),
            checker: HeaderValue::from_str(replica)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
            lookups: Arc::new(Semaphore::new(lookups.max(1))),
            #[cfg(feature = "tls")]
            tls: tls::Configs::default(),
        }
    }

    /// Probes `probe` once, all of it within `timeout`.
    pub async fn probe(&self, probe: &Probe, timeout: Duration) -> ProbeResult {
        let deadline = Instant::now() + timeout;
        let result = match probe {
            Probe::Http(url) => self.http(url, deadline).await,
            Probe::Tcp { host, port } => self
                .connect(host, *port, deadline)
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
        let stream = self.connect(&host, port, deadline).await?;
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
        let status = within(deadline, exchange).await?;
        let judged = if status.is_success() {
            HealthStatus::Passing
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            HealthStatus::Warning
        } else {
            // 3xx included: a check follows no redirect (it could point anywhere).
            HealthStatus::Critical
        };
        let output = match status.canonical_reason() {
            Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
            None => format!("HTTP {}", status.as_u16()),
        };
        Ok(ProbeResult::new(judged, output))
    }

    async fn grpc(
        &self,
        url: &Url,
        service: &str,
        deadline: Instant,
    ) -> Result<ProbeResult, Failure> {
        let (host, port) = host_port(url)?;
        let stream = self.connect(&host, port, deadline).await?;
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

impl Prober {
    /// Connects to `host:port` by `deadline`: a name is resolved first ([`resolve`]), then
    /// each address is tried in turn.
    async fn connect(
        &self,
        host: &str,
        port: u16,
        deadline: Instant,
    ) -> Result<TcpStream, Failure> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addrs = resolve(&self.lookups, host, port, deadline, system_lookup).await?;
        let attempt = async {
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::other("the name has no address")))
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Err(_) => Err(Failure::TimedOut { connecting: true }),
            Ok(Err(e)) => Err(Failure::Other(connect_error(&e))),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
        }
    }
}

/// The system resolver (getaddrinfo, on tokio's blocking pool).
async fn system_lookup(name: String) -> io::Result<Vec<SocketAddr>> {
    Ok(tokio::net::lookup_host(name).await?.collect())
}

/// The addresses of `host:port`, by `deadline`. An IP literal needs no lookup. A name is
/// looked up by `lookup` in a task of its own that holds a permit of `lookups` until the
/// lookup itself ends, not just until the deadline: getaddrinfo runs on a blocking thread
/// that no timeout stops, so without this a registrant with names under a DNS server that
/// never answers could pile up blocking threads (and starve every other user of the pool).
/// With it, at most `lookups` such threads exist; further probes wait for a permit, within
/// their own deadline.
async fn resolve<F, Fut>(
    lookups: &Arc<Semaphore>,
    host: &str,
    port: u16,
    deadline: Instant,
    lookup: F,
) -> Result<Vec<SocketAddr>, Failure>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'static,
{
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let permit = match tokio::time::timeout_at(deadline, lookups.clone().acquire_owned()).await {
        Err(_) => return Err(Failure::TimedOut { connecting: true }),
        // Never closed: the semaphore lives as long as the prober.
        Ok(Err(_)) => return Err(Failure::Other("name lookups closed".into())),
        Ok(Ok(permit)) => permit,
    };
    let pending = lookup(format!("{host}:{port}"));
    // Not aborted at the deadline: the task ends (and frees its permit) with the lookup.
    let task = tokio::spawn(async move {
        let found = pending.await;
        drop(permit);
        found
    });
    match tokio::time::timeout_at(deadline, task).await {
        Err(_) => Err(Failure::TimedOut { connecting: true }),
        Ok(Err(e)) => Err(Failure::Other(format!("name lookup failed: {e}"))),
        Ok(Ok(Err(e))) => Err(Failure::Other(format!("name lookup failed: {e}"))),
        Ok(Ok(Ok(addrs))) if addrs.is_empty() => {
            Err(Failure::Other("name lookup found no address".into()))
        }
        Ok(Ok(Ok(addrs))) => Ok(addrs),
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

/// One HTTP/1.1 exchange on `io` up to the response head: its status. The body is never read;
/// dropping the connection discards it.
async fn http1<IO>(io: IO, request: Request<Empty<Bytes>>) -> Result<StatusCode, Failure>
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
    Ok(response.status())
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

    #[tokio::test(start_paused = true)]
    async fn a_lookup_past_the_deadline_keeps_its_permit_until_it_ends() {
        let lookups = Arc::new(Semaphore::new(1));
        let timeout = Duration::from_secs(1);
        // A lookup that answers only when the test says so (a DNS server that never answers).
        let (answer, answered) = tokio::sync::oneshot::channel::<()>();
        let slow = |_: String| async move {
            let _ = answered.await;
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], 1))])
        };
        let result = resolve(&lookups, "slow.test", 80, Instant::now() + timeout, slow).await;
        assert!(matches!(
            result,
            Err(Failure::TimedOut { connecting: true })
        ));
        // The probe gave up; the lookup did not, and still holds the one permit.
        assert_eq!(lookups.available_permits(), 0);

        // So the next name waits for a permit (within its own deadline) and starts no lookup.
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = started.clone();
        let next = move |_: String| {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            async { Ok(vec![SocketAddr::from(([127, 0, 0, 1], 2))]) }
        };
        let result = resolve(&lookups, "next.test", 80, Instant::now() + timeout, next).await;
        assert!(matches!(
            result,
            Err(Failure::TimedOut { connecting: true })
        ));
        assert!(!started.load(std::sync::atomic::Ordering::SeqCst));

        // The slow lookup ends: its permit comes back, and names resolve again.
        let _ = answer.send(());
        while lookups.available_permits() == 0 {
            tokio::task::yield_now().await;
        }
        let fast = |_: String| async { Ok(vec![SocketAddr::from(([127, 0, 0, 1], 3))]) };
        let found = resolve(&lookups, "fast.test", 80, Instant::now() + timeout, fast).await;
        assert_eq!(
            found.ok(),
            Some(vec![SocketAddr::from(([127, 0, 0, 1], 3))])
        );
        assert_eq!(lookups.available_permits(), 1);
    }

    #[tokio::test]
    async fn an_ip_literal_needs_no_lookup() {
        let lookups = Arc::new(Semaphore::new(1));
        let deadline = Instant::now() + Duration::from_secs(1);
        let never = |_: String| async { Err(io::Error::other("looked up")) };
        for (host, ip) in [("127.0.0.1", "127.0.0.1"), ("::1", "::1")] {
            let found = resolve(&lookups, host, 8080, deadline, never).await.ok();
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(found, Some(vec![SocketAddr::new(ip, 8080)]));
        }
    }

    #[test]
    fn timeouts_read_as_people_write_them() {
        assert_eq!(secs(Duration::from_secs(2)), "2 s");
        assert_eq!(secs(Duration::from_millis(500)), "500 ms");
    }
}
