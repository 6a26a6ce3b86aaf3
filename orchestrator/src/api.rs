//! The HTTP API: routing, request validation and the JSON answers.
//!
//! Hand-routed on purpose: a dozen routes do not justify a framework, and owning the routing means
//! every miss (unknown path, wrong method, bad id) gets a problem+json answer instead of a
//! framework's default body. Handlers validate everything a client controls before the store
//! sees it, so a client mistake is a 4xx and never a 500. `GET /services?watch=true` goes to
//! the watch feed ([`crate::watch`]) with the list's own filters.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, LOCATION};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError};
use hyper::body::{Body, Frame};
use serde::Serialize;
use serde_json::{json, Map};
use servicekit::protocol::ServiceRecord;
use servicekit::protocol::{
    DeregisterResponse, Health, HealthReport, HealthResponse, HealthStatus, PingResponse,
    RegisterRequest, RegisterResponse, RegistrationStatus, ADMIN_KEY_HEADER, LAST_EVENT_ID_HEADER,
    LEASE_TOKEN_HEADER, SERVICE_KEY_HEADER, WATCH_PARAM,
};
use subtle::ConstantTimeEq;
use tower_http::timeout::TimeoutError;
use tower_http::BoxError;
use ulid::Ulid;
use url::Url;

use crate::assets::{self, Asset};
use crate::lease::{self, LeaseHash};
use crate::logsafe::Untrusted;
use crate::metrics::Metrics;
use crate::problem::ApiError;
use crate::store::{
    Access, Changes, ClusterHealth, Cursor, HealthSet, LeaseOutcome, ListFilter, Listing, Pinged,
    Registered, Registration, Store, StoreError, StoreHealth, LIST_BATCH,
};
use crate::{dashboard, openapi};

/// Upper bound for the health check, so `/health` answers even when the store hangs.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound of one store operation on behalf of a request. The Valkey store bounds each
/// command by 2 s; an operation of several commands could add those up during a stall.
const STORE_TIMEOUT: Duration = Duration::from_millis(2500);
/// Opening a listing (reading an index of 100k ids) or taking one page of it (which, with an
/// `info.` filter, may examine many entries) legitimately takes longer than a single-entry
/// operation.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// Watch feeds served at once unless configured (`--max-watchers`).
pub const DEFAULT_MAX_WATCHERS: usize = 10_000;
/// The largest `?limit=`.
pub const MAX_PAGE: usize = 1000;
/// Listings served at once. A Valkey listing keeps its index's ids (32 bytes per entry) until
/// its answer is sent; this bounds what slow readers can make the process hold.
pub const MAX_LISTINGS: usize = 64;
/// How long a listing waits for one of the [`MAX_LISTINGS`] places before a 429.
const LISTING_WAIT: Duration = Duration::from_secs(5);
/// One of the [`MAX_LISTINGS`] places, for a listing or a watch's first snapshot; a 429 when
/// none frees up within [`LISTING_WAIT`].
pub(crate) async fn listing_place(
    listings: &Arc<tokio::sync::Semaphore>,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    match tokio::time::timeout(LISTING_WAIT, listings.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        Ok(Err(_)) | Err(_) => Err(ApiError::TooManyListings {
            limit: MAX_LISTINGS,
        }),
    }
}

/// How long a streamed listing waits for the client to take its next part before giving up.
const STREAM_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of every answer: a whole JSON document, or a listing streamed part by part.
/// (Not `http_body_util::Either`: the timeout middleware needs a `Default` body.)
pub enum ApiBody {
    Whole(Full<Bytes>),
    Stream(ListBody),
}

impl Default for ApiBody {
    fn default() -> Self {
        ApiBody::Whole(Full::default())
    }
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Both variants are `Unpin`.
        match self.get_mut() {
            ApiBody::Whole(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(|never| match never {}))),
            ApiBody::Stream(stream) => Pin::new(stream).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ApiBody::Whole(full) => full.is_end_stream(),
            ApiBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ApiBody::Whole(full) => full.size_hint(),
            ApiBody::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

/// Limits on what clients may make the orchestrator hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Registrations counted by [`Store::count`] above which a new URL is refused (507).
    pub max_registrations: usize,
    /// Largest `info`, as the JSON the store keeps, in bytes (413).
    pub max_info_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_registrations: 100_000,
            max_info_bytes: 16_384,
        }
    }
}

/// A store whose every call is bounded in time: the one place where store deadlines are
/// applied, so no handler (and no future handler) can forget one. A call that runs out of
/// time is [`StoreError::Unavailable`], which the API answers with 503. Also the one place
/// where store calls are timed for `servicekit_store_operation_duration_seconds`.
pub struct Bounded<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S: Store> Bounded<S> {
    /// `inner`, with every call bounded, and fresh metrics (see [`Bounded::metrics`]).
    pub fn new(inner: S) -> Self {
        let metrics = Arc::new(Metrics::new(inner.reconnects()));
        Bounded { inner, metrics }
    }

    /// The metrics of the orchestrator this store serves.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs `op` within `limit`, timed as store operation `name`.
    async fn timed<T>(
        &self,
        name: &'static str,
        limit: Duration,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        timed(&self.metrics, name, limit, op).await
    }
}

/// Runs a store operation within `limit`, timed as store operation `name`. A refusal (a lease
/// the caller does not hold) is an answer, not a failure of the store.
async fn timed<T>(
    metrics: &Metrics,
    name: &'static str,
    limit: Duration,
    op: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = tokio::time::Instant::now();
    let result = within(limit, op).await;
    let failed = matches!(&result, Err(e) if !matches!(e, StoreError::Forbidden));
    metrics.store_op(name, started.elapsed(), !failed);
    result
}

/// Runs a store operation within `limit`.
async fn within<T>(
    limit: Duration,
    op: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, op).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Unavailable(format!(
            "no answer from the store within {limit:?}"
        ))),
    }
}

/// A listing whose every page is bounded in time and timed (`list_page`).
pub struct BoundedListing<L> {
    inner: L,
    metrics: Arc<Metrics>,
}

impl<L: Listing> Listing for BoundedListing<L> {
    fn next_page(
        &mut self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Arc<ServiceRecord>>, StoreError>> + Send {
        timed(
            &self.metrics,
            "list_page",
            LIST_TIMEOUT,
            self.inner.next_page(limit),
        )
    }
}

impl<S: Store> Store for Bounded<S> {
    type Listing = BoundedListing<S::Listing>;

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn ttl(&self) -> Duration {
        self.inner.ttl()
    }

    fn register_as(
        &self,
        reg: Registration,
        access: Access,
        new_lease: Option<LeaseHash>,
    ) -> impl Future<Output = Result<Registered, StoreError>> + Send {
        self.timed(
            "register",
            STORE_TIMEOUT,
            self.inner.register_as(reg, access, new_lease),
        )
    }

    fn ping_as(
        &self,
        id: Ulid,
        access: Access,
    ) -> impl Future<Output = Result<Option<Pinged>, StoreError>> + Send {
        self.timed("ping", STORE_TIMEOUT, self.inner.ping_as(id, access))
    }

    fn get(
        &self,
        id: Ulid,
    ) -> impl Future<Output = Result<Option<ServiceRecord>, StoreError>> + Send {
        self.timed("get", STORE_TIMEOUT, self.inner.get(id))
    }

    fn listing(
        &self,
        filter: ListFilter,
        after: Option<Ulid>,
    ) -> impl Future<Output = Result<BoundedListing<S::Listing>, StoreError>> + Send {
        let metrics = self.metrics.clone();
        let open = self.timed("list", LIST_TIMEOUT, self.inner.listing(filter, after));
        async move { open.await.map(|inner| BoundedListing { inner, metrics }) }
    }

    fn deregister_as(
        &self,
        id: Ulid,
        access: Access,
    ) -> impl Future<Output = Result<Option<ServiceRecord>, StoreError>> + Send {
        self.timed(
            "deregister",
            STORE_TIMEOUT,
            self.inner.deregister_as(id, access),
        )
    }

    fn set_health(
        &self,
        id: Ulid,
        health: Health,
        access: Access,
    ) -> impl Future<Output = Result<Option<HealthSet>, StoreError>> + Send {
        self.timed(
            "set_health",
            STORE_TIMEOUT,
            self.inner.set_health(id, health, access),
        )
    }

    fn checkers(
        &self,
        replica: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        self.timed("checkers", STORE_TIMEOUT, self.inner.checkers(replica, ttl))
    }

    fn sweep(&self) -> impl Future<Output = Result<usize, StoreError>> + Send {
        // Walks the indexes, like a listing.
        self.timed("sweep", LIST_TIMEOUT, self.inner.sweep())
    }

    fn health(&self) -> impl Future<Output = Result<StoreHealth, StoreError>> + Send {
        self.timed("health", HEALTH_TIMEOUT, self.inner.health())
    }

    fn count(&self) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.timed("count", HEALTH_TIMEOUT, self.inner.count())
    }

    fn change_head(&self) -> impl Future<Output = Result<Cursor, StoreError>> + Send {
        self.timed("change_head", STORE_TIMEOUT, self.inner.change_head())
    }

    fn changes(
        &self,
        after: Cursor,
        limit: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Changes, StoreError>> + Send {
        self.timed(
            "changes",
            wait + STORE_TIMEOUT,
            self.inner.changes(after, limit, wait),
        )
    }

    fn reap(&self) -> impl Future<Output = Result<usize, StoreError>> + Send {
        // Walks the due part of an index, like a sweep.
        self.timed("reap", LIST_TIMEOUT, self.inner.reap())
    }

    fn reconnects(&self) -> Option<prometheus_client::metrics::counter::Counter> {
        self.inner.reconnects()
    }
}

/// The API over one store. Shared by every connection.
pub struct Api<S> {
    /// Shared with the watch sessions, which outlive the request that started them.
    store: Arc<Bounded<S>>,
    public_url: Option<String>,
    registration_key: Option<Vec<u8>>,
    /// The SHA-256 of the admin key: compared as digests, so neither its content nor its
    /// length shows in the timing.
    admin_key: Option<LeaseHash>,
    require_lease: bool,
    max_body_bytes: usize,
    local_addr: SocketAddr,
    /// `https` when the server speaks TLS: the scheme of base URLs built from the Host header.
    scheme: &'static str,
    limits: Limits,
    listings: Arc<tokio::sync::Semaphore>,
    watch: crate::watch::Watch,
}

/// The routes, as matched from a path. A service id that is not the canonical text of a ULID
/// is `None`: no service has it, so it is a 404 (and a wrong method still a 405).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Health,
    Metrics,
    Services,
    Register,
    Service(Option<Ulid>),
    Ping(Option<Ulid>),
    /// `/`: a browser is sent to the dashboard; anything else gets a 404 as before.
    Root,
    /// An embedded page or file (the dashboard, the OpenAPI document, Swagger UI) and its
    /// route pattern; `None`: a file name under `/ui/` or `/docs/` that is not one (a 404).
    Asset(Option<&'static Asset>, &'static str),
    /// `/ui/` and `/docs/`: redirected to the page (this relative location) and its pattern.
    Slash(&'static str, &'static str),
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let rest = match path {
            "/health" => return Some(Route::Health),
            "/metrics" => return Some(Route::Metrics),
            "/services" | "/services/" => return Some(Route::Services),
            "/" => return Some(Route::Root),
            "/ui" => return Some(Route::Asset(Some(&dashboard::PAGE), "/ui")),
            "/ui/" => return Some(Route::Slash("../ui", "/ui")),
            "/docs" => return Some(Route::Asset(Some(&openapi::PAGE), "/docs")),
            "/docs/" => return Some(Route::Slash("../docs", "/docs")),
            "/openapi.json" => {
                return Some(Route::Asset(Some(openapi::document()), "/openapi.json"))
            }
            // The registry's routes first: pings are the hot path.
            p => match p.strip_prefix("/services/") {
                Some(rest) => rest,
                None => {
                    if let Some(name) = p.strip_prefix("/ui/") {
                        return Some(Route::Asset(dashboard::file(name), "/ui/{file}"));
                    }
                    let name = p.strip_prefix("/docs/")?;
                    return Some(Route::Asset(openapi::file(name), "/docs/{file}"));
                }
            },
        };
        let mut parts = rest.split('/');
        let first = parts.next()?;
        let second = parts.next();
        if parts.next().is_some() || first.is_empty() {
            return None;
        }
        match (first, second) {
            ("$register" | "%24register", None) => Some(Route::Register),
            (id, None) => Some(Route::Service(parse_id(id))),
            (id, Some("$ping" | "%24ping")) => Some(Route::Ping(parse_id(id))),
            _ => None,
        }
    }

    fn allow(&self) -> &'static str {
        match self {
            Route::Health
            | Route::Metrics
            | Route::Services
            | Route::Root
            | Route::Asset(..)
            | Route::Slash(..) => "GET, HEAD",
            Route::Register => "POST",
            Route::Service(_) => "GET, HEAD, DELETE",
            Route::Ping(_) => "PUT",
        }
    }

    /// The route's pattern: the `route` label of the HTTP metrics.
    fn pattern(&self) -> &'static str {
        match self {
            Route::Health => "/health",
            Route::Metrics => "/metrics",
            Route::Services => "/services",
            Route::Register => "/services/$register",
            Route::Service(_) => "/services/{id}",
            Route::Ping(_) => "/services/{id}/$ping",
            Route::Root => "/",
            Route::Asset(_, pattern) | Route::Slash(_, pattern) => pattern,
        }
    }
}

/// The route pattern `path` matches, or `unmatched`: the metrics' `route` label, whose values
/// are this short fixed list whatever clients send.
pub fn route_label(path: &str) -> &'static str {
    Route::parse(path).map_or("unmatched", |r| r.pattern())
}

impl<S: Store> Api<S> {
    /// An API over `store`, every call to it bounded in time. `local_addr` is the fallback
    /// base URL for requests without a Host; `max_body_bytes` is enforced by the server's
    /// middleware ([`crate::server`]) and quoted in 413 answers.
    pub fn new(
        store: S,
        public_url: Option<String>,
        registration_key: Option<String>,
        max_body_bytes: usize,
        local_addr: SocketAddr,
    ) -> Self {
        Api {
            store: Arc::new(Bounded::new(store)),
            public_url,
            registration_key: registration_key.map(String::into_bytes),
            admin_key: None,
            require_lease: false,
            max_body_bytes,
            local_addr,
            scheme: "http",
            limits: Limits::default(),
            listings: Arc::new(tokio::sync::Semaphore::new(MAX_LISTINGS)),
            watch: crate::watch::Watch::new(
                DEFAULT_MAX_WATCHERS,
                crate::watch::WatchTuning::default(),
            ),
        }
    }

    /// The same API with at most `max_watchers` watch feeds at once, tuned by `tuning`.
    pub fn with_watch(mut self, max_watchers: usize, tuning: crate::watch::WatchTuning) -> Self {
        self.watch = crate::watch::Watch::new(max_watchers, tuning);
        self
    }

    /// The watch feed: its hub is run by the server.
    pub fn watch(&self) -> &crate::watch::Watch {
        &self.watch
    }

    /// Base URLs built from the Host header say `https` when `tls` (the server speaks TLS).
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.scheme = if tls { "https" } else { "http" };
        self
    }

    /// The same API with an admin key (`X-Admin-Key`, may do any write; `None` or empty: no
    /// admin) and, with `require_lease`, refusing registrations that ask for no lease.
    pub fn with_leases(mut self, admin_key: Option<&str>, require_lease: bool) -> Self {
        self.admin_key = admin_key
            .filter(|k| !k.is_empty())
            .map(|k| LeaseHash::of(k.as_bytes()));
        self.require_lease = require_lease;
        self
    }

    /// The same API with `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The largest request body.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// The store behind the API, with every call bounded.
    pub fn store(&self) -> &Bounded<S> {
        &self.store
    }

    /// This orchestrator's metrics, served on `GET /metrics`.
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.store.metrics()
    }

    /// Answers one request. Never fails: every error becomes a problem+json response.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ApiBody>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        // Cloning the `Uri` shares its bytes, cheaper than copying the path for every request.
        let uri = req.uri().clone();
        let head = req.method() == Method::HEAD;
        let mut response = match self.route(req).await {
            Ok(response) => response,
            Err(e) => {
                if matches!(e, ApiError::Forbidden) {
                    self.store.metrics().lease_rejected();
                }
                e.into_response(uri.path()).map(ApiBody::Whole)
            }
        };
        if head {
            *response.body_mut() = ApiBody::default();
        }
        response
    }

    async fn route<B>(&self, req: Request<B>) -> Result<Response<ApiBody>, ApiError>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let Some(route) = Route::parse(req.uri().path()) else {
            return Err(no_route(req.uri().path()));
        };
        let method = req.method();
        let read = method == Method::GET || method == Method::HEAD;
        match (route, method) {
            (Route::Health, _) if read => self.health().await,
            (Route::Metrics, _) if read => self.scrape().await.map(|r| r.map(ApiBody::Whole)),
            (Route::Services, _) if read => {
                let last_event_id = req.headers().get(LAST_EVENT_ID_HEADER);
                self.list(req.uri().query(), last_event_id).await
            }
            (Route::Service(id), _) if read => self.get(id.ok_or_else(no_such_id)?).await,
            (Route::Root, _) if read && assets::accepts_html(req.headers()) => {
                Ok(assets::redirect("ui").map(ApiBody::Whole))
            }
            (Route::Root, _) if read => {
                // The answer depends on `Accept` (a browser gets the redirect): a cache must not
                // keep this 404 (heuristically cacheable) and hand it to a browser.
                let path = req.uri().path();
                let mut response = no_route(path).into_response(path);
                response
                    .headers_mut()
                    .insert(http::header::VARY, HeaderValue::from_static("accept"));
                Ok(response.map(ApiBody::Whole))
            }
            (Route::Slash(location, _), _) if read => {
                Ok(assets::redirect(location).map(ApiBody::Whole))
            }
            (Route::Asset(Some(asset), _), _) if read => {
                Ok(asset.respond(req.headers()).map(ApiBody::Whole))
            }
            (Route::Asset(None, _), _) if read => Err(no_route(req.uri().path())),
            (Route::Service(id), &Method::DELETE) => {
                let access = self.authorize(&req)?;
                self.deregister(id.ok_or_else(no_such_id)?, access).await
            }
            (Route::Register, &Method::POST) => {
                let access = self.authorize(&req)?;
                self.register(req, access).await
            }
            (Route::Ping(id), &Method::PUT) => {
                let access = self.authorize(&req)?;
                let id = id.ok_or_else(no_such_id)?;
                let report = self.health_report(req).await?;
                self.ping(id, access, report).await
            }
            (route, method) => Err(ApiError::MethodNotAllowed {
                method: method.to_string(),
                allow: route.allow(),
            }),
        }
    }

    /// Checks the registration key of a write (the admin key passes too) and says what the
    /// request presents for leased entries: the hash of its `X-Lease-Token`, and whether it
    /// carries the admin key.
    fn authorize<B>(&self, req: &Request<B>) -> Result<Access, ApiError> {
        let headers = req.headers();
        let admin = match (&self.admin_key, headers.get(ADMIN_KEY_HEADER)) {
            (Some(expected), Some(presented)) => {
                LeaseHash::of(presented.as_bytes()).matches(expected)
            }
            _ => false,
        };
        let access = Access {
            token: headers
                .get(LEASE_TOKEN_HEADER)
                .map(|t| LeaseHash::of(t.as_bytes())),
            admin,
        };
        let Some(expected) = &self.registration_key else {
            return Ok(access);
        };
        if admin {
            return Ok(access);
        }
        // The scheme name is case-insensitive (RFC 9110 11.1).
        let bearer = headers.get(AUTHORIZATION).and_then(|v| {
            let v = v.as_bytes();
            (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..])
        });
        let presented = headers
            .get(SERVICE_KEY_HEADER)
            .map(HeaderValue::as_bytes)
            .into_iter()
            .chain(bearer);
        let mut ok = false;
        for key in presented {
            ok |= bool::from(key.ct_eq(expected));
        }
        if ok {
            Ok(access)
        } else {
            Err(ApiError::Unauthorized)
        }
    }

    async fn register<B>(
        &self,
        req: Request<B>,
        access: Access,
    ) -> Result<Response<ApiBody>, ApiError>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let base = self.base_url(&req);
        // Echoed when it still holds the lease: it is the token this orchestrator minted.
        let presented = req
            .headers()
            .get(LEASE_TOKEN_HEADER)
            .and_then(|t| t.to_str().ok())
            .map(servicekit::protocol::LeaseToken::new);
        let body = self.json_body(req).await?;
        let mut request: RegisterRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("invalid registration body: {e}")))?;
        if let Some(check) = request.check.as_mut() {
            /// The `check` object again, as JSON, for what the typed one cannot say.
            #[derive(serde::Deserialize)]
            struct Raw {
                check: serde_json::Map<String, serde_json::Value>,
            }
            let raw: Raw = serde_json::from_slice(&body)
                .map_err(|e| ApiError::BadRequest(format!("invalid registration body: {e}")))?;
            crate::checks::spec::settle(check, &raw.check).map_err(ApiError::BadRequest)?;
        }
        let wants_lease = request.lease == Some(true);
        if self.require_lease && !wants_lease {
            return Err(ApiError::BadRequest(
                "this orchestrator only accepts leased registrations: send \"lease\": true \
                 and present the lease_token of the answer in X-Lease-Token on later writes"
                    .into(),
            ));
        }
        let registration = validate_registration(request)?;
        self.check_limits(&registration).await?;
        let minted =
            if wants_lease {
                Some(lease::mint().map_err(|e| {
                    ApiError::Internal(format!("no randomness for a lease token: {e}"))
                })?)
            } else {
                None
            };
        let registered = self
            .store
            .register_as(registration, access, minted.as_ref().map(|(_, h)| *h))
            .await?;
        let lease_token = match registered.lease {
            LeaseOutcome::New => minted.map(|(token, _)| token),
            LeaseOutcome::Kept => presented,
            LeaseOutcome::None | LeaseOutcome::Held => None,
        };
        let record = registered.record;
        let name = &record.info.display_name;
        // Client text, escaped in the log line even though validation already refused control
        // characters: the record may come from a store written by something else.
        let (status, code, message) = if registered.created {
            tracing::info!(id = %record.id, url = %Untrusted(&record.url), name = %Untrusted(name), "service.registered");
            let message = format!("{name} registered successfully");
            (RegistrationStatus::Registered, StatusCode::CREATED, message)
        } else {
            tracing::info!(id = %record.id, url = %Untrusted(&record.url), name = %Untrusted(name), "service.updated");
            let message = format!("{name} registration updated");
            (RegistrationStatus::Updated, StatusCode::OK, message)
        };
        let location = format!("{base}/services/{}", record.id);
        let answer = RegisterResponse {
            id: record.id,
            status,
            service_url: record.url,
            message,
            ttl_seconds: self.store.ttl().as_secs(),
            ping_url: format!("{location}/$ping"),
            lease_token,
        };
        let mut response = json_response(code, &answer)?;
        if registered.created {
            let value = HeaderValue::try_from(location)
                .map_err(|e| ApiError::Internal(format!("location header: {e}")))?;
            response.headers_mut().insert(LOCATION, value);
        }
        Ok(response)
    }

    /// The health a ping's body reports: none for an empty body (the reference client's
    /// ping) or `null`.
    async fn health_report<B>(&self, req: Request<B>) -> Result<Option<HealthReport>, ApiError>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        // An empty ping is the reference's, whatever type a client library puts on it (curl
        // says form-urlencoded, fetch() says text/plain): only a body must be JSON.
        let typed = json_type(&req);
        let body = self.body(req).await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        typed?;
        serde_json::from_slice::<Option<HealthReport>>(&body).map_err(|e| {
            ApiError::BadRequest(format!(
                "invalid ping body: {e}; send nothing, or {{\"status\": \"passing\" | \
                 \"warning\" | \"critical\", \"output\": \"...\"}}"
            ))
        })
    }

    async fn ping(
        &self,
        id: Ulid,
        access: Access,
        report: Option<HealthReport>,
    ) -> Result<Response<ApiBody>, ApiError> {
        let pinged = self
            .store
            .ping_as(id, access)
            .await?
            .ok_or_else(|| not_found(id))?;
        tracing::debug!(id = %id, "service.pinged");
        if let Some(report) = report {
            let health = report.into_health(pinged.last_ping_at);
            let set = self
                .store
                .set_health(id, health, access)
                .await?
                .ok_or_else(|| not_found(id))?;
            if set.changed {
                let h = &set.record.health;
                tracing::info!(id = %id, status = %h.status, output = %Untrusted(&h.output), source = "push", "service.health");
            }
        }
        json_response(
            StatusCode::OK,
            &PingResponse {
                id,
                status: "alive".into(),
                last_ping_at: pinged.last_ping_at,
                expires_at: pinged.expires_at,
            },
        )
    }

    async fn get(&self, id: Ulid) -> Result<Response<ApiBody>, ApiError> {
        let record = self.store.get(id).await?.ok_or_else(|| not_found(id))?;
        json_response(StatusCode::OK, &record)
    }

    async fn deregister(&self, id: Ulid, access: Access) -> Result<Response<ApiBody>, ApiError> {
        let record = self
            .store
            .deregister_as(id, access)
            .await?
            .ok_or_else(|| not_found(id))?;
        tracing::info!(id = %id, url = %Untrusted(&record.url), "service.deregistered");
        json_response(
            StatusCode::OK,
            &DeregisterResponse {
                status: "deregistered".into(),
                service: record,
            },
        )
    }

    /// Refuses an `info` over its size limit, and a new URL while the registry is full. A URL
    /// that is registered already is never refused for the count: its renewal adds nothing.
    async fn check_limits(&self, registration: &Registration) -> Result<(), ApiError> {
        let size = serde_json::to_vec(&registration.info)
            .map_err(|e| ApiError::Internal(format!("cannot encode info: {e}")))?
            .len();
        let limit = self.limits.max_info_bytes;
        if size > limit {
            return Err(ApiError::InfoTooLarge { size, limit });
        }
        let limit = self.limits.max_registrations;
        if self.store.count().await? < u64::try_from(limit).unwrap_or(u64::MAX) {
            return Ok(());
        }
        let known = ListFilter {
            url: Some(registration.url.clone()),
            ..ListFilter::default()
        };
        let mut listing = self.store.listing(known, None).await?;
        if listing.next_page(1).await?.is_empty() {
            return Err(ApiError::RegistryFull { limit });
        }
        Ok(())
    }

    /// `GET /services`: one page with `?limit=`, else every match, streamed.
    async fn list(
        &self,
        query: Option<&str>,
        last_event_id: Option<&HeaderValue>,
    ) -> Result<Response<ApiBody>, ApiError> {
        let query = parse_list_query(query.unwrap_or(""))?;
        if query.watch {
            return self
                .watch
                .answer(
                    &self.store,
                    &self.listings,
                    self.metrics(),
                    query.filter,
                    last_event_id,
                )
                .await;
        }
        let permit = listing_place(&self.listings).await?;
        let mut listing = self.store.listing(query.filter, query.cursor).await?;
        let Some(limit) = query.limit else {
            // The first part is read before answering, so a store that fails at once is still
            // a problem+json answer and not a cut-off 200.
            let first = listing.next_page(LIST_BATCH).await?;
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                stream_listing(listing, first, tx).await;
                drop(permit);
            });
            let mut response = Response::new(ApiBody::Stream(ListBody { rx }));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return Ok(response);
        };
        let mut page = listing.next_page(limit + 1).await?;
        drop(permit);
        let next_cursor = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|r| r.id.to_string())
        } else {
            None
        };
        let services: Vec<&ServiceRecord> = page.iter().map(|r| &**r).collect();
        json_response(
            StatusCode::OK,
            &ListPage {
                count: services.len(),
                services,
                next_cursor,
            },
        )
    }

    /// `healthy` (200) when the store answers and takes a write (and, for a Valkey Cluster,
    /// serves every slot through masters this orchestrator reaches), `degraded` (503) when it
    /// answers but refuses the write (every register and ping would fail too) or part of the
    /// cluster is down, `unhealthy` (503) when it does not answer.
    async fn health(&self) -> Result<Response<ApiBody>, ApiError> {
        let (status, check) = match self.store.health().await {
            Ok(h) => {
                let latency_ms = h.latency.as_secs_f64() * 1000.0;
                let cluster_problem = h.cluster.as_ref().and_then(|c| c.problem());
                let mut check = match (h.write_refused, cluster_problem) {
                    (None, None) => {
                        json!({"status": "healthy", "kind": h.kind, "latency_ms": latency_ms})
                    }
                    (Some(error), _) => json!({
                        "status": "degraded",
                        "kind": h.kind,
                        "latency_ms": latency_ms,
                        "writable": false,
                        "error": error,
                    }),
                    (None, Some(error)) => json!({
                        "status": "degraded",
                        "kind": h.kind,
                        "latency_ms": latency_ms,
                        "error": error,
                    }),
                };
                if let (Some(c), Some(fields)) = (&h.cluster, check.as_object_mut()) {
                    fields.insert("cluster".into(), cluster_json(c));
                }
                let status = if check["status"] == "healthy" {
                    "healthy"
                } else {
                    "degraded"
                };
                (status, check)
            }
            Err(e) => (
                "unhealthy",
                json!({"status": "unhealthy", "kind": self.store.kind(), "error": e.to_string()}),
            ),
        };
        let healthy = status == "healthy";
        let mut checks = Map::new();
        checks.insert("store".into(), check);
        let body = HealthResponse {
            status: status.into(),
            checks,
        };
        let code = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let mut response = json_response(code, &body)?;
        if !healthy {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        Ok(response)
    }

    /// `GET /metrics`: the text exposition. The store is asked for its entry count first; a
    /// store that does not answer leaves `servicekit_registrations` out, not the whole page.
    async fn scrape(&self) -> Result<Response<Full<Bytes>>, ApiError> {
        let live = self.store.count().await.ok();
        let text = self
            .metrics()
            .encode(live)
            .map_err(|e| ApiError::Internal(format!("encoding metrics: {e}")))?;
        let mut response = Response::new(Full::new(Bytes::from(text)));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        );
        Ok(response)
    }

    /// Reads a JSON request body. Its size and arrival time are bounded by the server's
    /// middleware, whose errors surface here while reading and become 413 and 408.
    async fn json_body<B>(&self, req: Request<B>) -> Result<Bytes, ApiError>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        json_type(&req)?;
        self.body(req).await
    }

    /// Reads a request body, whatever its type; bounded as [`Api::json_body`] is.
    async fn body<B>(&self, req: Request<B>) -> Result<Bytes, ApiError>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        match req.into_body().collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) => Err(body_error(e.into(), self.max_body_bytes)),
        }
    }

    /// Where clients reach this orchestrator: the configured public URL, else the request's
    /// authority (HTTP/2) or Host header, else the listening address.
    fn base_url<B>(&self, req: &Request<B>) -> String {
        if let Some(public) = &self.public_url {
            return public.clone();
        }
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .filter(|h| h.parse::<http::uri::Authority>().is_ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| {
                // No Host (HTTP/1.0): the listening address, which is only useful when it is
                // a concrete one. --public-url is the real answer here.
                if self.local_addr.ip().is_unspecified() {
                    format!("localhost:{}", self.local_addr.port())
                } else {
                    self.local_addr.to_string()
                }
            });
        format!("{}://{host}", self.scheme)
    }
}

/// One page of `GET /services?limit=`: [`servicekit::protocol::ListResponse`] over shared
/// records.
#[derive(Serialize)]
struct ListPage<'a> {
    count: usize,
    services: Vec<&'a ServiceRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// The body of a streamed listing: the parts [`stream_listing`] produces, as they come. The
/// channel holds one part, so at most two pages of JSON exist at a time and a slow reader
/// slows the listing down instead of making it pile up.
pub struct ListBody {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl ListBody {
    /// The body of the parts `rx` receives; it ends when every sender is gone.
    pub(crate) fn new(rx: tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>) -> Self {
        ListBody { rx }
    }
}

impl Body for ListBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx
            .poll_recv(cx)
            .map(|part| part.map(|part| part.map(Frame::data)))
    }
}

/// Writes `{"services":[…],"count":N}` page by page into `tx`. `count` comes last because it
/// is known only at the end (JSON object members have no order; ours and the reference
/// client read them by name). A store error after the first page can no longer become a
/// problem answer: the body ends with an error, so the client sees a cut-off answer and
/// never a short list that looks complete.
async fn stream_listing<L: Listing>(
    mut listing: L,
    first: Vec<Arc<ServiceRecord>>,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, BoxError>>,
) {
    let send = |part: Result<Bytes, BoxError>| {
        let tx = tx.clone();
        async move {
            matches!(
                tokio::time::timeout(STREAM_SEND_TIMEOUT, tx.send(part)).await,
                Ok(Ok(()))
            )
        }
    };
    let mut count = 0usize;
    let mut part = b"{\"services\":[".to_vec();
    let mut page = first;
    while !page.is_empty() {
        for record in &page {
            if count > 0 {
                part.push(b',');
            }
            if let Err(e) = serde_json::to_writer(&mut part, &**record) {
                send(Err(e.into())).await;
                return;
            }
            count += 1;
        }
        drop(page);
        if !send(Ok(Bytes::from(std::mem::take(&mut part)))).await {
            return; // the client went away or stopped reading
        }
        page = match listing.next_page(LIST_BATCH).await {
            Ok(page) => page,
            Err(e) => {
                tracing::debug!(error = %e, "listing cut off by a store error");
                send(Err(e.into())).await;
                return;
            }
        };
    }
    part.extend_from_slice(format!("],\"count\":{count}}}").as_bytes());
    send(Ok(Bytes::from(part))).await;
}

fn not_found(id: Ulid) -> ApiError {
    ApiError::NotFound(format!("Service with ID {id} not found"))
}

/// A path no route has: `path` is quoted escaped, as it is the client's.
fn no_route(path: &str) -> ApiError {
    ApiError::NotFound(format!("no route for {path:?}"))
}

/// The answer for a path id that is no ULID's canonical text. It does not repeat the id: that
/// is untrusted text, and the problem's `instance` already holds the (JSON-escaped) path.
fn no_such_id() -> ApiError {
    ApiError::NotFound(
        "no service has this id; service ids are ULIDs in canonical form (26 characters of \
         0-9 and upper-case A-Z without I, L, O, U, the first one 0-7)"
            .into(),
    )
}

/// The ULID whose canonical text `text` is, else `None`. Canonical means exactly what
/// [`Ulid`]'s `Display` writes: 26 upper-case Crockford base-32 characters, the first 0-7.
/// `Ulid::from_string` is more lenient (lower case, the aliases I, L, O, U, and a first
/// character that overflows 128 bits), which would let one registration answer to several
/// ids; none of those is an id this registry hands out.
fn parse_id(text: &str) -> Option<Ulid> {
    const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    /// Each byte's digit value, or `NO_DIGIT`.
    const DIGITS: [u8; 256] = {
        let mut table = [NO_DIGIT; 256];
        let mut i = 0;
        while i < CROCKFORD.len() {
            table[CROCKFORD[i] as usize] = i as u8;
            i += 1;
        }
        table
    };
    const NO_DIGIT: u8 = u8::MAX;
    let bytes = text.as_bytes();
    if bytes.len() != ulid::ULID_LEN || !(b'0'..=b'7').contains(&bytes[0]) {
        return None;
    }
    let mut value: u128 = 0;
    for &b in bytes {
        let digit = DIGITS[usize::from(b)];
        if digit == NO_DIGIT {
            return None;
        }
        value = (value << 5) | u128::from(digit);
    }
    Some(Ulid(value))
}

/// What reading a request body failed with: the middleware's size limit (413), its arrival
/// timeout (408), or the connection itself (400).
fn body_error(e: BoxError, limit: usize) -> ApiError {
    if e.is::<LengthLimitError>() {
        ApiError::PayloadTooLarge { limit }
    } else if e.is::<TimeoutError>() {
        ApiError::BodyStalled(crate::server::BODY_TIMEOUT)
    } else {
        ApiError::BadRequest(format!("could not read request body: {e}"))
    }
}

/// Refuses a request whose `Content-Type`, when it has one, is not JSON (`application/json` or
/// any `+json`).
fn json_type<B>(req: &Request<B>) -> Result<(), ApiError> {
    if let Some(ct) = req.headers().get(CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::UnsupportedMediaType(ct.to_owned()));
        }
    }
    Ok(())
}

fn json_response<T: Serialize>(code: StatusCode, body: &T) -> Result<Response<ApiBody>, ApiError> {
    let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut response = Response::new(ApiBody::Whole(Full::new(Bytes::from(bytes))));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Checks a registration body and brings its URL into canonical form.
pub fn validate_registration(request: RegisterRequest) -> Result<Registration, ApiError> {
    let url = canonical_url(&request.url)
        .map_err(|why| ApiError::BadRequest(format!("invalid url {:?}: {why}", request.url)))?;
    let mut info = request.info;
    let name = info.display_name.trim();
    if name.is_empty() {
        return Err(ApiError::BadRequest(
            "info.display_name must be a non-empty string".into(),
        ));
    }
    // Names end up in logs, terminals and dashboards: no line breaks, escape sequences or
    // reordering of what follows. The detail says where, not what (the name is untrusted).
    let forbidden = name
        .chars()
        .enumerate()
        .find(|(_, c)| crate::logsafe::is_forbidden_in_names(*c));
    if let Some((at, c)) = forbidden {
        return Err(ApiError::BadRequest(format!(
            "info.display_name must not contain control characters (C0, DEL, C1) or \
             bidirectional controls (U+202A-U+202E, U+2066-U+2069); found U+{:04X} at \
             character {at}",
            u32::from(c)
        )));
    }
    if name.len() != info.display_name.len() {
        info.display_name = name.to_owned();
    }
    if let Some(check) = &request.check {
        crate::checks::Probe::resolve(check, &url).map_err(ApiError::BadRequest)?;
    }
    Ok(Registration {
        url,
        info,
        requested_id: request.id.as_deref().and_then(parse_id),
        check: request.check,
    })
}

/// The canonical form of a service URL: parsed, scheme and host lower-cased, default port
/// dropped, and no trailing slash on an empty path, so `HTTP://SvcA:80/` and `http://svca`
/// are one registration.
pub fn canonical_url(text: &str) -> Result<String, &'static str> {
    let url = Url::parse(text.trim()).map_err(|_| "must be an absolute http or https URL")?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("scheme must be http or https");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must have a host");
    }
    if url.fragment().is_some() {
        return Err("must not have a fragment");
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Every registration is readable by anyone who can list: no credentials in there.
        return Err("must not contain a user name or password");
    }
    let mut s = String::from(url);
    if s.ends_with('/') && !s.contains('?') && s.matches('/').count() == 3 {
        s.pop();
    }
    Ok(s)
}

/// What `GET /services` asks for.
#[derive(Debug, Default)]
struct ListQuery {
    filter: ListFilter,
    /// `?limit=N`: one page of at most N; `None`: everything, streamed.
    limit: Option<usize>,
    /// `?cursor=C`: continue after the page that handed out C.
    cursor: Option<Ulid>,
    /// `?watch=true`: the watch feed instead of a list.
    watch: bool,
}

/// Parses `GET /services` query parameters.
fn parse_list_query(query: &str) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery::default();
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "display_name" => q.filter.display_name = Some(value.into_owned()),
            "url" => {
                let url = canonical_url(&value).map_err(|why| {
                    ApiError::BadRequest(format!("invalid url filter {value:?}: {why}"))
                })?;
                q.filter.url = Some(url);
            }
            "limit" => match value.parse::<usize>() {
                Ok(n @ 1..=MAX_PAGE) => q.limit = Some(n),
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "invalid limit {value:?}: a whole number from 1 to {MAX_PAGE}"
                    )))
                }
            },
            // The cursor is the last id of the previous page, but clients treat it as opaque.
            "cursor" => match parse_id(&value) {
                Some(id) => q.cursor = Some(id),
                None => {
                    return Err(ApiError::BadRequest(format!(
                        "invalid cursor {value:?}: pass the next_cursor of a previous answer"
                    )))
                }
            },
            "health" => {
                for status in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let status = status
                        .parse::<HealthStatus>()
                        .map_err(|e| ApiError::BadRequest(format!("invalid health filter: {e}")))?;
                    if !q.filter.health.contains(&status) {
                        q.filter.health.push(status);
                    }
                }
            }
            WATCH_PARAM => match value.as_ref() {
                "true" => q.watch = true,
                "false" => q.watch = false,
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "invalid watch {value:?}: true or false"
                    )))
                }
            },
            k => match k.strip_prefix("info.") {
                Some(field) if !field.is_empty() => {
                    q.filter.info.push((field.to_owned(), value.into_owned()));
                }
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown query parameter {k:?}; use display_name, url, info.FIELD, \
                         health, limit, cursor or watch"
                    )))
                }
            },
        }
    }
    if q.watch && (q.limit.is_some() || q.cursor.is_some()) {
        return Err(ApiError::BadRequest(
            "limit and cursor page a list; a watch (watch=true) always starts with the whole \
             list for its filter"
                .into(),
        ));
    }
    Ok(q)
}

#[cfg(test)]
mod tests;

/// `checks.store.cluster` of `GET /health` (README, "GET /health").
fn cluster_json(c: &ClusterHealth) -> serde_json::Value {
    json!({
        "state": c.state,
        "slots_assigned": c.slots_assigned,
        "slots_ok": c.slots_ok,
        "slots_pfail": c.slots_pfail,
        "slots_fail": c.slots_fail,
        "known_nodes": c.known_nodes,
        "size": c.size,
        "masters": c.masters.len(),
        "masters_reachable": c.masters.len().saturating_sub(c.unreachable.len()),
        "unreachable": c.unreachable,
    })
}
