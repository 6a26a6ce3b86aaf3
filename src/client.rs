//! Talking to the orchestrator: register, ping, deregister.
//!
//! One small HTTP/1.1 client with keep-alive (a ping every few seconds should not open a new
//! connection each time). Every call is bounded by the configured timeout, and every failure
//! is classified here, once, into what the caller should do about it: retry, back off for a
//! while, re-register, or stop because the configuration is wrong.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use ulid::Ulid;

use crate::protocol::{
    PingResponse, Problem, RegisterRequest, RegisterResponse, ServiceInfo, SERVICE_KEY_HEADER,
};

/// Largest answer read from the orchestrator.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Why an orchestrator call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// No answer: connection refused or reset, DNS failure, or the timeout passed.
    #[error("orchestrator unreachable: {0}")]
    Network(String),
    /// The orchestrator answered with an error status.
    #[error("orchestrator answered {status}{}", detail(.problem))]
    Status {
        status: StatusCode,
        problem: Option<Problem>,
        /// `Retry-After` of a 429 or 503, in seconds.
        retry_after: Option<Duration>,
    },
    /// The orchestrator answered 2xx with a body this client does not understand.
    #[error("unexpected answer from the orchestrator: {0}")]
    Protocol(String),
}

fn detail(problem: &Option<Problem>) -> String {
    match problem {
        Some(p) => match &p.detail {
            Some(d) => format!(" ({}: {d})", p.title),
            None => format!(" ({})", p.title),
        },
        None => String::new(),
    }
}

impl ClientError {
    /// Whether trying the same request again may help. 4xx answers other than 408 and 429
    /// mean the request or the configuration is wrong (a 404 on registration is a wrong URL,
    /// e.g. the reference README's `…/register` instead of `…/services/$register`), and repeating it would only
    /// hide that. A 404 on ping and deregistration has its own meaning; callers check it first.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Network(_) | ClientError::Protocol(_) => true,
            ClientError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
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

/// A client for one orchestrator.
#[derive(Clone)]
pub struct OrchestratorClient {
    http: Client<HttpConnector, Full<Bytes>>,
    register_url: String,
    key: Option<HeaderValue>,
    timeout: Duration,
}

impl std::fmt::Debug for OrchestratorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrchestratorClient")
            .field("register_url", &self.register_url)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl OrchestratorClient {
    /// A client posting registrations to `register_url`, sending `key` as `X-Service-Key`.
    pub fn new(register_url: impl Into<String>, key: Option<&str>, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        OrchestratorClient {
            http,
            register_url: register_url.into(),
            key: key.and_then(|k| HeaderValue::from_str(k).ok()),
            timeout,
        }
    }

    /// `POST` the registration; `previous` is the id this instance had before, if any.
    pub async fn register(
        &self,
        url: &str,
        info: &ServiceInfo,
        previous: Option<Ulid>,
    ) -> Result<RegisterResponse, ClientError> {
        let body = RegisterRequest {
            id: previous.map(|id| id.to_string()),
            url: url.to_owned(),
            info: info.clone(),
        };
        let bytes = serde_json::to_vec(&body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call(Method::POST, &self.register_url, Some(bytes))
            .await
    }

    /// `PUT` a keepalive to the `ping_url` the orchestrator gave, bounded by `within` (at
    /// most the client's timeout): a ping stuck on a dead connection must not outlive the
    /// keepalive interval, or the next ping comes too late.
    pub async fn ping(
        &self,
        ping_url: &str,
        within: Duration,
    ) -> Result<PingResponse, ClientError> {
        self.call_within(Method::PUT, ping_url, None, within.min(self.timeout))
            .await
    }

    /// `DELETE` the entry at `service_url` (the ping URL without `/$ping`). A 404 means the
    /// entry is already gone, which is what deregistration wants: it is `Ok(false)`.
    pub async fn deregister(&self, entry_url: &str) -> Result<bool, ClientError> {
        match self
            .call::<serde_json::Value>(Method::DELETE, entry_url, None)
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
        url: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        self.call_within(method, url, body, self.timeout).await
    }

    async fn call_within<T: DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let mut req = Request::builder().method(method).uri(url);
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        if let Some(key) = &self.key {
            req = req.header(SERVICE_KEY_HEADER, key.clone());
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Protocol(format!("cannot build request for {url}: {e}")))?;
        let exchange = async {
            let res = self
                .http
                .request(req)
                .await
                .map_err(|e| ClientError::Network(error_chain(&e)))?;
            let (parts, body) = res.into_parts();
            let bytes = http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| ClientError::Network(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, ClientError>((parts, bytes))
        };
        let (parts, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Network(format!("no answer within {timeout:?}")))??;
        if parts.status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                ClientError::Protocol(format!("{e} in {}", String::from_utf8_lossy(&bytes)))
            });
        }
        let retry_after = parts
            .headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Err(ClientError::Status {
            status: parts.status,
            problem: serde_json::from_slice(&bytes).ok(),
            retry_after,
        })
    }
}

/// An error with its causes, since hyper's top-level message ("client error (Connect)") alone
/// does not say what went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> ClientError {
        ClientError::Status {
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
        assert!(ClientError::Network("x".into()).is_retryable());
    }

    #[test]
    fn messages_carry_the_problem_detail() {
        let e = ClientError::Status {
            status: StatusCode::UNAUTHORIZED,
            problem: Some(Problem {
                kind: "urn:servicekit:error:unauthorized".into(),
                title: "Unauthorized".into(),
                status: 401,
                detail: Some("key required".into()),
                instance: None,
            }),
            retry_after: None,
        };
        assert_eq!(
            e.to_string(),
            "orchestrator answered 401 Unauthorized (Unauthorized: key required)"
        );
    }
}
