//! Talking to the orchestrator: register, ping, deregister.
//!
//! One small HTTP/1.1 client with keep-alive (a ping every few seconds should not open a new
//! connection each time). Every call is bounded, and every failure is classified here, once,
//! into what the caller should do about it: retry, back off for a while, re-register, or stop
//! because the configuration is wrong.
//!
//! With the `tls` feature, `https` orchestrators are reached through rustls (on ring) trusting
//! the system's roots, or only the certificates in `SSL_CERT_FILE` / `SSL_CERT_DIR` when set
//! (OpenSSL's convention, read by rustls-native-certs); the roots are read once per client and
//! only for an https registration URL.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use ulid::Ulid;

use crate::config::RegistrationKey;
use crate::protocol::{
    CheckSpec, HealthReport, LeaseToken, PingResponse, Problem, RegisterRequest, RegisterResponse,
    ServiceInfo, LEASE_TOKEN_HEADER, REGISTER_PATH, SERVICE_KEY_HEADER,
};

/// Largest answer read from the orchestrator.
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Longest excerpt of an unreadable answer quoted in an error.
const EXCERPT_CHARS: usize = 200;

/// Why an orchestrator call failed. Texts from the orchestrator are quoted (escaped), never
/// printed raw.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No connection, or it broke: refused, reset, DNS failure.
    #[error("cannot reach the orchestrator ({method} {url})")]
    Unreachable {
        /// The request's method.
        method: Method,
        /// The request's URL.
        url: String,
        /// What the HTTP client reported.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// No complete answer within the bound.
    #[error("no answer from the orchestrator within {after:?} ({method} {url})")]
    Timeout {
        /// The request's method.
        method: Method,
        /// The request's URL.
        url: String,
        /// The bound that passed.
        after: Duration,
    },
    /// The orchestrator answered with an error status.
    #[error("the orchestrator answered {status} to {method} {url}{}", detail(.problem))]
    Status {
        /// The request's method.
        method: Method,
        /// The request's URL.
        url: String,
        /// The answer's status.
        status: StatusCode,
        /// The answer's problem details, when it had some.
        problem: Option<Problem>,
        /// `Retry-After` of a 429 or 503.
        retry_after: Option<Duration>,
    },
    /// The orchestrator answered 2xx with a body this client does not understand.
    #[error("unexpected answer from the orchestrator to {method} {url}: {reason}")]
    Protocol {
        /// The request's method.
        method: Method,
        /// The request's URL.
        url: String,
        /// What was wrong with it (quoted).
        reason: String,
    },
}

fn detail(problem: &Option<Problem>) -> String {
    match problem {
        Some(p) => match &p.detail {
            Some(d) => format!(" ({:?}: {:?})", p.title, d),
            None => format!(" ({:?})", p.title),
        },
        None => String::new(),
    }
}

impl ClientError {
    /// Whether trying the same request again may help. 4xx answers other than 408 and 429
    /// mean the request or the configuration is wrong (a 404 on registration is a wrong URL),
    /// and repeating it would only hide that. A 404 on ping and deregistration has its own
    /// meaning; callers check it first.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => true,
        }
    }

    /// The HTTP status, when there was an answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's requested pause before the next attempt.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// What a successful registration told the client.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Registered {
    /// The answer as sent (with the lenient defaults of [`RegisterResponse`]).
    pub answer: RegisterResponse,
    /// Where to send pings: the answer's `ping_url`, or derived from the id.
    pub ping_url: Uri,
    /// The entry itself, for `DELETE`.
    pub entry_url: Uri,
}

#[cfg(feature = "tls")]
pub(crate) type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "tls"))]
pub(crate) type Connector = HttpConnector;

/// The connector under the client: plain TCP, or with the `tls` feature TCP plus rustls for
/// `https` URLs.
#[cfg(not(feature = "tls"))]
pub(crate) fn connector(http: HttpConnector, _register_url: &Uri) -> Connector {
    http
}

#[cfg(feature = "tls")]
pub(crate) fn connector(mut http: HttpConnector, register_url: &Uri) -> Connector {
    // The TLS connector wraps this one and hands it https URLs too.
    http.enforce_http(false);
    let https = register_url.scheme_str() == Some("https");
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(https))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// rustls on ring, named explicitly (a process where another crate enables aws-lc-rs as well
/// would otherwise have no default provider). `load_roots`: read the system's trust roots, or
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` instead when set; what cannot be read is logged here,
/// once, since every https call would then fail with an unknown-issuer error.
#[cfg(feature = "tls")]
fn tls_config(load_roots: bool) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    if load_roots {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %crate::error::ErrorChain(e), "tls.roots_unreadable");
        }
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!(
                "tls.no_roots: no trusted root certificate found; https calls to the orchestrator will fail (install the system's CA certificates or set SSL_CERT_FILE)"
            );
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // Fails only for a provider without TLS 1.2 and 1.3; ring has both.
        .expect("ring supports rustls's default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A client for one orchestrator.
#[derive(Clone)]
pub struct OrchestratorClient {
    http: Client<Connector, Full<Bytes>>,
    register_url: Uri,
    key: Option<HeaderValue>,
    timeout: Duration,
    check: Option<CheckSpec>,
}

impl std::fmt::Debug for OrchestratorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrchestratorClient")
            .field("register_url", &self.register_url)
            .field("key", &self.key.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .field("check", &self.check)
            .finish()
    }
}

impl OrchestratorClient {
    /// A client posting registrations to `register_url` (the orchestrator's
    /// `…/services/$register`), sending `key` as `X-Service-Key`, bounding every call by
    /// `timeout`.
    pub fn new(register_url: Uri, key: Option<&RegistrationKey>, timeout: Duration) -> Self {
        let mut http_connector = HttpConnector::new();
        http_connector.set_nodelay(true);
        http_connector.set_connect_timeout(Some(timeout));
        // Below the servers' own keep-alive limits (5 s for ours and for uvicorn, which serves
        // the reference), so a ping never picks a connection the server is just closing.
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(4))
            .build(connector(http_connector, &register_url));
        let key = key
            .and_then(|k| HeaderValue::from_str(k.expose()).ok())
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        OrchestratorClient {
            http,
            register_url,
            key,
            timeout,
            check: None,
        }
    }

    /// The same client, declaring `check` (the orchestrator's pull check of the instance) in
    /// every registration.
    pub fn with_check(mut self, check: Option<CheckSpec>) -> Self {
        self.check = check;
        self
    }

    /// `POST` the registration, asking for a lease; `previous` is the id this instance had
    /// before, if any, and `lease` the token of its lease (sent as `X-Lease-Token`).
    pub async fn register(
        &self,
        url: &str,
        info: &ServiceInfo,
        previous: Option<Ulid>,
        lease: Option<&LeaseToken>,
    ) -> Result<Registered, ClientError> {
        let body = RegisterRequest {
            id: previous.map(|id| id.to_string()),
            url: url.to_owned(),
            info: info.clone(),
            lease: Some(true),
            check: self.check.clone(),
        };
        let target = self.register_url.clone();
        let bytes = serde_json::to_vec(&body).map_err(|e| ClientError::Protocol {
            method: Method::POST,
            url: target.to_string(),
            reason: e.to_string(),
        })?;
        let answer: RegisterResponse = self
            .call(
                Method::POST,
                target.clone(),
                Some(bytes),
                self.timeout,
                lease,
            )
            .await?;
        let (ping_url, entry_url) =
            self.urls_of(answer.id, &answer.ping_url)
                .ok_or_else(|| ClientError::Protocol {
                    method: Method::POST,
                    url: target.to_string(),
                    reason: "cannot derive the entry's URLs".into(),
                })?;
        Ok(Registered {
            answer,
            ping_url,
            entry_url,
        })
    }

    /// Where to ping and what to `DELETE`: the answer's `ping_url` when it points where the
    /// registration went (the key is sent with every ping, and a URL this client cannot
    /// reach, another host or https, would let the entry expire), else the orchestrator's own
    /// path layout under the registration URL's base.
    fn urls_of(&self, id: Ulid, ping_url: &str) -> Option<(Uri, Uri)> {
        let text = self.register_url.to_string();
        let base = text
            .strip_suffix(REGISTER_PATH)
            .or_else(|| text.strip_suffix("/services/%24register"))
            .unwrap_or(&text);
        let derived: Uri = format!("{base}/services/{id}").parse().ok()?;
        let given = ping_url.parse::<Uri>().ok().filter(|u| {
            u.scheme() == self.register_url.scheme()
                && u.authority() == self.register_url.authority()
        });
        let Some(ping) = given else {
            return Some((format!("{derived}/$ping").parse().ok()?, derived));
        };
        let ping_text = ping.to_string();
        let entry = ping_text
            .strip_suffix("/$ping")
            .or_else(|| ping_text.strip_suffix("/%24ping"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(derived);
        Some((ping, entry))
    }

    /// `PUT` a keepalive to `ping_url`, bounded by `within` (at most the client's timeout): a
    /// ping stuck on a dead connection must not outlive the keepalive interval. Any 2xx is a
    /// success; the answer's details when it has the usual shape. `lease` is sent as
    /// `X-Lease-Token`.
    pub async fn ping(
        &self,
        ping_url: &Uri,
        within: Duration,
        lease: Option<&LeaseToken>,
    ) -> Result<Option<PingResponse>, ClientError> {
        self.ping_reporting(ping_url, within, lease, None).await
    }

    /// [`ping`](Self::ping) carrying the service's own health as its JSON body (`None`: no
    /// body, which leaves the recorded health as it is).
    pub async fn ping_reporting(
        &self,
        ping_url: &Uri,
        within: Duration,
        lease: Option<&LeaseToken>,
        report: Option<&HealthReport>,
    ) -> Result<Option<PingResponse>, ClientError> {
        let body = match report {
            Some(r) => Some(serde_json::to_vec(r).map_err(|e| ClientError::Protocol {
                method: Method::PUT,
                url: ping_url.to_string(),
                reason: e.to_string(),
            })?),
            None => None,
        };
        let answer: serde_json::Value = self
            .call(
                Method::PUT,
                ping_url.clone(),
                body,
                within.min(self.timeout),
                lease,
            )
            .await?;
        Ok(serde_json::from_value(answer).ok())
    }

    /// `DELETE` the entry, bounded by `within` (at most the client's timeout). A 404 means
    /// the entry is already gone, which is what deregistration wants: it is `Ok(false)`.
    /// `lease` is sent as `X-Lease-Token`.
    pub async fn deregister(
        &self,
        entry_url: &Uri,
        within: Duration,
        lease: Option<&LeaseToken>,
    ) -> Result<bool, ClientError> {
        match self
            .call::<serde_json::Value>(
                Method::DELETE,
                entry_url.clone(),
                None,
                within.min(self.timeout),
                lease,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Uri,
        body: Option<Vec<u8>>,
        timeout: Duration,
        lease: Option<&LeaseToken>,
    ) -> Result<T, ClientError> {
        let url_text = url.to_string();
        let mut req = Request::builder().method(method.clone()).uri(url);
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        if let Some(key) = &self.key {
            req = req.header(SERVICE_KEY_HEADER, key.clone());
        }
        // A token that is no valid header value cannot have come from an orchestrator's
        // answer intact; leaving it out gets a 403, which the caller reports.
        if let Some(mut token) = lease.and_then(|t| HeaderValue::from_str(t.expose()).ok()) {
            token.set_sensitive(true);
            req = req.header(LEASE_TOKEN_HEADER, token);
        }
        let protocol = |reason: String| ClientError::Protocol {
            method: method.clone(),
            url: url_text.clone(),
            reason,
        };
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| protocol(format!("cannot build the request: {e}")))?;
        let unreachable =
            |source: Arc<dyn std::error::Error + Send + Sync>| ClientError::Unreachable {
                method: method.clone(),
                url: url_text.clone(),
                source,
            };
        let exchange = async {
            let res = self
                .http
                .request(req)
                .await
                .map_err(|e| unreachable(Arc::new(e)))?;
            let (parts, body) = res.into_parts();
            let bytes = http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(Arc::from(e)))?
                .to_bytes();
            Ok::<_, ClientError>((parts, bytes))
        };
        let (parts, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                method: method.clone(),
                url: url_text.clone(),
                after: timeout,
            })??;
        if parts.status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                let excerpt: String = String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(EXCERPT_CHARS)
                    .collect();
                protocol(format!("{e} in {excerpt:?}"))
            });
        }
        let retry_after = parts
            .headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Err(ClientError::Status {
            method,
            url: url_text,
            status: parts.status,
            problem: serde_json::from_slice(&bytes).ok(),
            retry_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> ClientError {
        ClientError::Status {
            method: Method::POST,
            url: "http://o/services/$register".into(),
            status: StatusCode::from_u16(code).unwrap(),
            problem: None,
            retry_after: None,
        }
    }

    #[test]
    fn client_mistakes_are_not_retried() {
        for code in [400, 401, 403, 404, 405, 413, 415, 422] {
            assert!(!status(code).is_retryable(), "{code}");
        }
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(status(code).is_retryable(), "{code}");
        }
        let timeout = ClientError::Timeout {
            method: Method::PUT,
            url: "u".into(),
            after: Duration::from_secs(1),
        };
        assert!(timeout.is_retryable());
    }

    #[test]
    fn messages_quote_the_problem_detail() {
        let e = ClientError::Status {
            method: Method::POST,
            url: "http://o:9000/services/$register".into(),
            status: StatusCode::UNAUTHORIZED,
            problem: Some(Problem {
                kind: "urn:servicekit:error:unauthorized".into(),
                title: "Unauthorized".into(),
                status: 401,
                detail: Some("key required\nFAKE log line".into()),
                instance: None,
            }),
            retry_after: None,
        };
        assert_eq!(
            e.to_string(),
            r#"the orchestrator answered 401 Unauthorized to POST http://o:9000/services/$register ("Unauthorized": "key required\nFAKE log line")"#
        );
    }

    #[test]
    fn the_entry_url_follows_the_registration_url() {
        let client =
            |url: &str| OrchestratorClient::new(url.parse().unwrap(), None, Duration::from_secs(1));
        let id = Ulid::from_string("01JDQ9J4XWAZ3M5S1X2VQ7N8C4").unwrap();
        let entry = |c: OrchestratorClient| c.urls_of(id, "").map(|(_, e)| e.to_string());
        assert_eq!(
            entry(client("http://o:9000/services/$register")).as_deref(),
            Some("http://o:9000/services/01JDQ9J4XWAZ3M5S1X2VQ7N8C4")
        );
        assert_eq!(
            entry(client("http://gw/registry/services/%24register")).as_deref(),
            Some("http://gw/registry/services/01JDQ9J4XWAZ3M5S1X2VQ7N8C4")
        );
    }

    #[tokio::test]
    async fn a_ping_url_elsewhere_is_not_trusted() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let id = "01JDQ9J4XWAZ3M5S1X2VQ7N8C4";
        let server = tokio::spawn(async move {
            for ping_url in [
                format!("http://evil.example:9000/services/{id}/$ping"),
                format!("https://{addr}/services/{id}/$ping"),
                format!("http://{addr}/prefix/services/{id}/$ping"),
            ] {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await.unwrap();
                let body = format!(r#"{{"id":"{id}","ttl_seconds":9,"ping_url":"{ping_url}"}}"#);
                let answer = format!(
                    "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let client = OrchestratorClient::new(
            format!("http://{addr}/services/$register").parse().unwrap(),
            None,
            Duration::from_secs(5),
        );
        let info = ServiceInfo::new("a");
        let mut got = Vec::new();
        for _ in 0..3 {
            let r = client
                .register("http://svc:1", &info, None, None)
                .await
                .unwrap();
            got.push((r.ping_url.to_string(), r.entry_url.to_string()));
        }
        server.await.unwrap();
        let derived = (
            format!("http://{addr}/services/{id}/$ping"),
            format!("http://{addr}/services/{id}"),
        );
        assert_eq!(got[0], derived, "another host");
        assert_eq!(got[1], derived, "https");
        assert_eq!(
            got[2],
            (
                format!("http://{addr}/prefix/services/{id}/$ping"),
                format!("http://{addr}/prefix/services/{id}")
            ),
            "the same orchestrator under a path prefix is trusted"
        );
    }

    /// Reads one request (head and a content-length body) and answers `answer` (JSON, 200).
    async fn one_request(listener: &tokio::net::TcpListener, answer: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if got.len() >= end + 4 + length || n == 0 {
                    break;
                }
            }
        }
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
            answer.len()
        );
        conn.write_all(reply.as_bytes()).await.unwrap();
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn the_check_and_health_reports_go_on_the_wire_and_a_plain_ping_stays_bodyless() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let id = "01JDQ9J4XWAZ3M5S1X2VQ7N8C4";
        let client = OrchestratorClient::new(
            format!("http://{addr}/services/$register").parse().unwrap(),
            None,
            Duration::from_secs(5),
        )
        .with_check(Some(CheckSpec::http("/health")));
        let registered = format!(r#"{{"id":"{id}","ttl_seconds":9,"ping_url":""}}"#);
        let pong = format!(
            r#"{{"id":"{id}","status":"alive","last_ping_at":"2026-01-01T00:00:00Z","expires_at":"2026-01-01T00:00:09Z"}}"#
        );
        let info = ServiceInfo::new("a");
        let (request, r) = tokio::join!(
            one_request(&listener, &registered),
            client.register("http://svc:1", &info, None, None)
        );
        let r = r.unwrap();
        let body = request.split("\r\n\r\n").nth(1).unwrap();
        let sent: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            sent["check"],
            serde_json::json!({"http": "/health", "interval_seconds": 10, "timeout_seconds": 2,
                "failures_before_critical": 2, "successes_before_passing": 2})
        );

        let report = HealthReport::critical("db down");
        let (request, pinged) = tokio::join!(
            one_request(&listener, &pong),
            client.ping_reporting(&r.ping_url, Duration::from_secs(5), None, Some(&report))
        );
        pinged.unwrap();
        assert!(
            request.starts_with(&format!("PUT /services/{id}/$ping ")),
            "{request}"
        );
        assert!(
            request
                .to_lowercase()
                .contains("content-type: application/json"),
            "{request}"
        );
        assert!(
            request.ends_with(r#"{"status":"critical","output":"db down"}"#),
            "{request}"
        );

        // Without a report: the reference client's ping, no body and no content type.
        let (request, pinged) = tokio::join!(
            one_request(&listener, &pong),
            client.ping(&r.ping_url, Duration::from_secs(5), None)
        );
        pinged.unwrap();
        let lower = request.to_lowercase();
        assert!(!lower.contains("content-type"), "{request}");
        assert!(request.ends_with("\r\n\r\n"), "{request}");
        assert!(
            !lower.contains("content-length: ") || lower.contains("content-length: 0"),
            "{request}"
        );
    }

    #[test]
    fn the_key_never_shows_in_debug() {
        let key = RegistrationKey::from("hunter2".to_owned());
        let c = OrchestratorClient::new(
            "http://o/".parse().unwrap(),
            Some(&key),
            Duration::from_secs(1),
        );
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
