//! Every error the orchestrator answers with, as RFC 9457 problem details.
//!
//! Handlers return [`ApiError`]; this module is the one place that decides its status, its
//! stable `type` URN and its headers, so clients can branch on `type` and never on prose.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use servicekit::protocol::{problem_type, Problem, PROBLEM_JSON};

use crate::store::StoreError;

/// A request that cannot be answered with success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("a valid registration key is required in X-Service-Key or Authorization: Bearer")]
    Unauthorized,
    #[error("the entry is leased: present its lease token in X-Lease-Token, or the admin key in X-Admin-Key")]
    Forbidden,
    #[error("{0}")]
    NotFound(String),
    #[error("method {method} is not allowed here; allowed: {allow}")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("no part of the request body arrived for {0:?}")]
    BodyStalled(std::time::Duration),
    #[error("the request was not received and answered within {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request target exceeds the limit of {limit} bytes")]
    UriTooLong { limit: usize },
    #[error("the request header section exceeds the limit of {limit} bytes")]
    HeaderFieldsTooLarge { limit: usize },
    #[error("info is {size} bytes as JSON; the limit is {limit}")]
    InfoTooLarge { size: usize, limit: usize },
    #[error("the registry holds its limit of {limit} registrations; only known URLs may renew")]
    RegistryFull { limit: usize },
    #[error("{limit} listings are in progress; try again shortly")]
    TooManyListings { limit: usize },
    #[error("{limit} watchers are connected, the limit of this orchestrator; try again shortly")]
    TooManyWatchers { limit: usize },
    #[error("content type {0:?} is not supported; send application/json")]
    UnsupportedMediaType(String),
    #[error("the registry store is unavailable: {0}")]
    StoreUnavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(msg) => ApiError::StoreUnavailable(msg),
            StoreError::Config(msg) | StoreError::Corrupt(msg) => ApiError::Internal(msg),
            StoreError::Forbidden => ApiError::Forbidden,
        }
    }
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use problem_type as t;
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, t::BAD_REQUEST, "Bad Request"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, t::UNAUTHORIZED, "Unauthorized"),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, t::FORBIDDEN, "Forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, t::NOT_FOUND, "Resource Not Found"),
            ApiError::MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                t::METHOD_NOT_ALLOWED,
                "Method Not Allowed",
            ),
            ApiError::BodyStalled(_) | ApiError::RequestTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                t::REQUEST_TIMEOUT,
                "Request Timeout",
            ),
            ApiError::PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                t::PAYLOAD_TOO_LARGE,
                "Payload Too Large",
            ),
            ApiError::UriTooLong { .. } => {
                (StatusCode::URI_TOO_LONG, t::URI_TOO_LONG, "URI Too Long")
            }
            ApiError::HeaderFieldsTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                t::HEADER_FIELDS_TOO_LARGE,
                "Request Header Fields Too Large",
            ),
            ApiError::InfoTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                t::LIMIT_EXCEEDED,
                "Limit Exceeded",
            ),
            ApiError::RegistryFull { .. } => (
                StatusCode::INSUFFICIENT_STORAGE,
                t::LIMIT_EXCEEDED,
                "Limit Exceeded",
            ),
            ApiError::TooManyListings { .. } | ApiError::TooManyWatchers { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                t::LIMIT_EXCEEDED,
                "Limit Exceeded",
            ),
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                t::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported Media Type",
            ),
            ApiError::StoreUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                t::STORE_UNAVAILABLE,
                "Store Unavailable",
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                t::INTERNAL,
                "Internal Server Error",
            ),
        }
    }

    /// The problem+json response for this error; `instance` is the request path.
    pub fn into_response(self, instance: &str) -> Response<Full<Bytes>> {
        let (status, kind, title) = self.parts();
        let problem = Problem {
            kind: kind.to_owned(),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: Some(self.to_string()),
            instance: Some(instance.to_owned()),
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match &self {
            ApiError::MethodNotAllowed { allow, .. } => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::StoreUnavailable(_)
            | ApiError::TooManyListings { .. }
            | ApiError::TooManyWatchers { .. } => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

/// Turns the bare error answers of the tower-http middleware in front of the API (a 413 from
/// the body limit when `Content-Length` is over it, a 408 from the request timeout) into
/// problem+json with the same `type` URNs the handlers use. Every other answer passes as is.
#[derive(Debug, Clone, Copy)]
pub struct ProblemLayer {
    /// The body limit, quoted in the 413's detail.
    pub max_body_bytes: usize,
    /// The whole-request timeout, quoted in the 408's detail.
    pub request_timeout: std::time::Duration,
}

impl<S> tower::Layer<S> for ProblemLayer {
    type Service = Problems<S>;

    fn layer(&self, inner: S) -> Problems<S> {
        Problems {
            inner,
            layer: *self,
        }
    }
}

/// The service of [`ProblemLayer`].
#[derive(Debug, Clone)]
pub struct Problems<S> {
    inner: S,
    layer: ProblemLayer,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Problems<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<Either<ResBody, Full<Bytes>>>;
    type Error = S::Error;
    type Future = ProblemsFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        // Cloning the `Uri` shares its bytes: no allocation on the way through.
        let uri = req.uri().clone();
        let head = req.method() == http::Method::HEAD;
        ProblemsFuture {
            inner: self.inner.call(req),
            uri,
            head,
            layer: self.layer,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Problems`].
    pub struct ProblemsFuture<F> {
        #[pin]
        inner: F,
        uri: http::Uri,
        head: bool,
        layer: ProblemLayer,
    }
}

impl<F, ResBody, E> std::future::Future for ProblemsFuture<F>
where
    F: std::future::Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<Either<ResBody, Full<Bytes>>>, E>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        let is_problem = response
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes() == PROBLEM_JSON.as_bytes());
        let error = match response.status() {
            _ if is_problem => None,
            StatusCode::PAYLOAD_TOO_LARGE => Some(ApiError::PayloadTooLarge {
                limit: this.layer.max_body_bytes,
            }),
            StatusCode::REQUEST_TIMEOUT => {
                Some(ApiError::RequestTimeout(this.layer.request_timeout))
            }
            _ => None,
        };
        std::task::Poll::Ready(Ok(match error {
            None => response.map(Either::Left),
            Some(error) => {
                let mut problem = error.into_response(this.uri.path());
                if *this.head {
                    *problem.body_mut() = Full::new(Bytes::new());
                }
                problem.map(Either::Right)
            }
        }))
    }
}
