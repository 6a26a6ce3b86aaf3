//! [`BalancedClient`]: HTTP requests spread over a watcher's instances.
//!
//! tower's power-of-two-choices `Balance` picks, for each request, the less loaded of two
//! random ready instances, by requests in flight (`PendingRequests`): a slow or overloaded
//! instance piles up requests and gets fewer new ones, equally loaded instances are chosen at
//! random, and a new instance (a rolling restart's replacement) gets its share at once.
//! Peak-EWMA was tried and rejected: a new instance starts with an assumed latency and, against
//! measured sub-millisecond peers, got no traffic at all at low concurrency. Neither measure
//! protects against an instance that fails fast (it looks idle): ejection does. The single-owner
//! balancer is shared behind an async mutex held only to pick an instance and start the
//! request (`tower::buffer::Buffer` did the same through a channel and a worker task, and cost a
//! cross-task hop per request: about 50 µs, half a direct call's time, in a loopback test).
//! Around it:
//!
//! - a bounded wait for a ready instance (`Balance` alone waits forever when there is none);
//! - retries of idempotent requests that failed before any answer (refused, reset, closed),
//!   and of any request whose connection could not be made (it never left), on another
//!   instance when there is one, within a retry budget;
//! - ejection: an endpoint reports itself failed to `Balance` (which drops it) on a refused
//!   connection at once, or after a run of other transport failures, unless it is the last
//!   one not ejected; it comes back when discovery inserts it again or with the first request
//!   after a cooldown.
//!
//! The Discover adapter between the watcher and `Balance` builds one endpoint per instance
//! and re-inserts ejected ones; all endpoints share one hyper-util connection pool whose idle
//! connections close after 4 s, so a drained instance's pooled connections go away.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tower::balance::p2c::Balance;
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Service, ServiceExt};
use ulid::Ulid;

use super::{Changes, Error, Instance, Watcher};
use crate::client::{connector, Connector};
use crate::error::ErrorChain;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type HttpClient = Client<Connector, Full<Bytes>>;
type PlainClient = Client<HttpConnector, Full<Bytes>>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Balancer = Balance<Adapter, Request<Full<Bytes>>>;

/// Which instance answered: in every response's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServedBy {
    /// The instance's registration id.
    pub id: Ulid,
    /// The instance's URL.
    pub url: String,
}

/// Calls the instances a [`Watcher`] knows, balanced, with retries and ejection (see the
/// module docs of `servicekit::discovery`).
///
/// Requests carry a path-and-query URI (`/orders?id=7`), which is joined to the chosen
/// instance's URL (after its path prefix, if it has one). Bodies are [`Full<Bytes>`]: whole
/// in memory, so a retry can send them again. As a `tower::Service` it answers
/// `Response<Incoming>` (stream the body yourself); [`get`](Self::get) collects it. Every
/// response has a [`ServedBy`] extension.
///
/// Created inside a tokio runtime (the balancer runs as a task there). Clones share one
/// balancer and pool; the watcher's task runs as long as a clone exists.
#[derive(Clone)]
pub struct BalancedClient {
    inner: Arc<Inner>,
    balancer: Arc<tokio::sync::Mutex<Balancer>>,
}

struct Inner {
    core: Arc<Core>,
    watcher: Watcher,
    settings: Settings,
    budget: TpsBudget,
}

impl std::fmt::Debug for BalancedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalancedClient")
            .field("watcher", &self.inner.watcher)
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
struct Settings {
    ready_timeout: Duration,
    request_timeout: Duration,
    max_attempts: u32,
    eject_after: u32,
    eject_cooldown: Duration,
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
}

/// Options of a [`BalancedClient`]; from [`BalancedClient::builder`].
#[derive(Debug)]
pub struct BalancedClientBuilder {
    watcher: Watcher,
    settings: Settings,
    budget: TpsBudget,
}

impl BalancedClientBuilder {
    /// How long a request waits for an instance to be ready before it fails with
    /// [`Error::NoInstance`]; default 5 s.
    pub fn ready_timeout(mut self, d: Duration) -> Self {
        self.settings.ready_timeout = d;
        self
    }

    /// How long an instance may take to answer (to send the response head) once a request is
    /// sent to it: [`Error::Timeout`], not retried; default 30 s.
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.settings.request_timeout = d;
        self
    }

    /// Attempts per idempotent request (GET, HEAD, PUT, DELETE, OPTIONS, TRACE) that fails
    /// before any answer, the first included; default 3. Other methods are sent once.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.settings.max_attempts = n.max(1);
        self
    }

    /// The retry budget; default tower's `TpsBudget::default()`: retries up to 20 % of the
    /// requests of the last 10 s, plus 10 per second.
    pub fn retry_budget(mut self, budget: TpsBudget) -> Self {
        self.budget = budget;
        self
    }

    /// Transport failures in a row (other than a refused connection, which ejects at once)
    /// after which an instance is ejected; default 3.
    pub fn eject_after(mut self, n: u32) -> Self {
        self.settings.eject_after = n.max(1);
        self
    }

    /// How long an ejected instance stays out unless discovery inserts it again; default 10 s.
    pub fn eject_cooldown(mut self, d: Duration) -> Self {
        self.settings.eject_cooldown = d;
        self
    }

    /// The bound on opening a connection; default 2 s.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.settings.connect_timeout = d;
        self
    }

    /// How long an idle pooled connection is kept; default 4 s (below common servers' 5 s
    /// keep-alive, and short so a drained instance's connections go away).
    pub fn pool_idle_timeout(mut self, d: Duration) -> Self {
        self.settings.pool_idle_timeout = d;
        self
    }

    /// Starts the balancer (in the current tokio runtime).
    pub fn build(self) -> Result<BalancedClient, Error> {
        tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let settings = self.settings;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        // Instances may be https (with the `tls` feature): load the trust roots.
        let tls_probe = Uri::from_static("https://instance");
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_idle_timeout(settings.pool_idle_timeout);
        // http instances get a client without the TLS wrapper: the wrapper is cloned and
        // dropped on every request and its stream type checked on every read and write.
        let plain: PlainClient = builder.build(http.clone());
        let client: HttpClient = builder.build(connector(http, &tls_probe));
        let (eject_tx, eject_rx) = mpsc::unbounded_channel();
        let core = Arc::new(Core {
            client,
            plain,
            request_timeout: settings.request_timeout,
            registry: Mutex::new(HashMap::new()),
            eject_tx,
            eject_after: settings.eject_after,
        });
        let adapter = Adapter {
            changes: self.watcher.discover(),
            core: core.clone(),
            eject_rx,
            cooldown: settings.eject_cooldown,
            cooldowns: VecDeque::new(),
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
        };
        let balancer = Arc::new(tokio::sync::Mutex::new(Balance::new(adapter)));
        Ok(BalancedClient {
            inner: Arc::new(Inner {
                core,
                watcher: self.watcher,
                settings,
                budget: self.budget,
            }),
            balancer,
        })
    }
}

impl BalancedClient {
    /// A client over `watcher`'s instances with the default knobs. Panics outside a tokio
    /// runtime; [`builder`](Self::builder)`(watcher).build()` returns an error instead.
    pub fn new(watcher: Watcher) -> Self {
        match Self::builder(watcher).build() {
            Ok(c) => c,
            Err(e) => panic!("BalancedClient::new: {e}"),
        }
    }

    /// A builder, for the knobs.
    pub fn builder(watcher: Watcher) -> BalancedClientBuilder {
        BalancedClientBuilder {
            watcher,
            settings: Settings {
                ready_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(30),
                max_attempts: 3,
                eject_after: 3,
                eject_cooldown: Duration::from_secs(10),
                connect_timeout: Duration::from_secs(2),
                pool_idle_timeout: Duration::from_secs(4),
            },
            budget: TpsBudget::default(),
        }
    }

    /// The watcher this client follows.
    pub fn watcher(&self) -> &Watcher {
        &self.inner.watcher
    }

    /// Whether the instance at `url` is ejected now.
    #[cfg(test)]
    pub(crate) fn is_ejected(&self, url: &str) -> bool {
        let registry = self
            .inner
            .core
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        registry
            .values()
            .any(|s| s.url == url && s.ejected.load(Ordering::SeqCst))
    }

    /// `GET path` (a path and query, e.g. `/health`) with the body collected in memory.
    pub async fn get(&self, path: &str) -> Result<Response<Bytes>, Error> {
        let req = Request::get(path)
            .body(Full::new(Bytes::new()))
            .map_err(|e| Error::InvalidRequest(format!("{path:?}: {e}")))?;
        let (parts, body) = self.send(req).await?.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| Error::Body {
                instance: parts
                    .extensions
                    .get::<ServedBy>()
                    .map(|s| s.url.clone())
                    .unwrap_or_default(),
                source: Error::cause(e),
            })?
            .to_bytes();
        Ok(Response::from_parts(parts, bytes))
    }

    /// Sends one request (what `tower::Service::call` does).
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, Error> {
        let (parts, body) = req.into_parts();
        let path = match (&parts.uri.scheme(), parts.uri.path_and_query()) {
            (None, Some(pq)) if parts.uri.authority().is_none() && pq.as_str().starts_with('/') => {
                pq.clone()
            }
            _ => {
                return Err(Error::InvalidRequest(format!(
                    "the URI must be a path and query like /x?y, not {:?}",
                    parts.uri.to_string()
                )))
            }
        };
        let idempotent = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::PUT
                | Method::DELETE
                | Method::OPTIONS
                | Method::TRACE
        );
        let inner = &self.inner;
        inner.budget.deposit();
        let mut tried: Vec<Ulid> = Vec::new();
        let mut attempt = 1;
        loop {
            let req = Request::from_parts(parts.clone(), body.clone());
            let other = if attempt == 1 {
                None
            } else {
                inner.core.pick_other(&tried)
            };
            let outcome = match other {
                Some(state) => self.direct(state, req).await,
                None => self.via_balancer(req).await,
            };
            match outcome {
                Ok(res) => return Ok(res),
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::TimedOut { url }) => {
                    return Err(Error::Timeout {
                        method: parts.method.clone(),
                        path: path.as_str().to_owned(),
                        instance: url,
                        after: inner.settings.request_timeout,
                    })
                }
                Err(Failure::Transport {
                    id,
                    url,
                    unsent,
                    source,
                }) => {
                    tried.push(id);
                    if (idempotent || unsent)
                        && attempt < inner.settings.max_attempts
                        && inner.budget.withdraw()
                    {
                        tracing::debug!(
                            method = %parts.method,
                            path = ?path.as_str(),
                            instance = ?url,
                            attempt,
                            error = %ErrorChain(&*source),
                            "discovery.retry"
                        );
                        attempt += 1;
                        continue;
                    }
                    return Err(Error::Transport {
                        method: parts.method.clone(),
                        path: path.as_str().to_owned(),
                        attempts: attempt,
                        instance: url,
                        source,
                    });
                }
            }
        }
    }

    /// One attempt through the balancer: waits up to `ready_timeout` for it to hand the
    /// request to an instance (the endpoint bounds the answer by `request_timeout`).
    async fn via_balancer(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, Failure> {
        let start = async {
            let mut balancer = self.balancer.lock().await;
            // Balance's readiness fails only when discovery does, and ours never fails.
            balancer.ready().await?;
            Ok::<_, BoxError>(balancer.call(req))
        };
        let mut start = std::pin::pin!(start);
        // Usually an instance is ready at once: no timer for the wait then (arming one costs
        // a lock on the timer wheel, twice).
        let first = std::future::poll_fn(|cx| Poll::Ready(start.as_mut().poll(cx))).await;
        let started = match first {
            Poll::Ready(started) => started,
            Poll::Pending => {
                let wait = self.inner.settings.ready_timeout;
                match tokio::time::timeout(wait, start).await {
                    Ok(started) => started,
                    Err(_) => {
                        return Err(Failure::Final(Error::NoInstance {
                            filter: self.inner.watcher.filter().to_string(),
                            waited: wait,
                        }))
                    }
                }
            }
        };
        started
            .map_err(Failure::from_box)?
            .await
            .map_err(Failure::from_box)
    }

    /// A retry straight to the given instance (the balancer cannot be told to avoid one).
    async fn direct(
        &self,
        state: Arc<EndpointState>,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, Failure> {
        self.inner
            .core
            .send_inner(&state, &mut req)
            .await
            .map_err(Failure::from_attempt)
    }
}

impl Service<Request<Full<Bytes>>> for BalancedClient {
    type Response = Response<Incoming>;
    type Error = Error;
    type Future = BoxFuture<Result<Response<Incoming>, Error>>;

    /// Always ready: waiting for an instance happens, bounded, inside the call.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.send(req).await })
    }
}

/// How one attempt failed.
enum Failure {
    /// No answer from this instance: worth a retry elsewhere, if the method allows (any
    /// method when the request was never sent: the connection could not be made).
    Transport {
        id: Ulid,
        url: String,
        unsent: bool,
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The instance at `url` did not answer within the request timeout: not retried.
    TimedOut { url: String },
    /// Anything else: returned as it is.
    Final(Error),
}

impl Failure {
    fn from_box(e: BoxError) -> Failure {
        match e.downcast::<Attempt>() {
            Ok(attempt) => Failure::from_attempt(*attempt),
            Err(other) => Failure::Final(Error::Closed(ErrorChain(&*other).to_string())),
        }
    }

    fn from_attempt(attempt: Attempt) -> Failure {
        match attempt {
            Attempt::Transport {
                id,
                url,
                unsent,
                source,
            } => Failure::Transport {
                id,
                url,
                unsent,
                source,
            },
            Attempt::TimedOut { url } => Failure::TimedOut { url },
            Attempt::Invalid(reason) => Failure::Final(Error::InvalidRequest(reason)),
        }
    }
}

/// The error an endpoint's call returns through the balancer.
#[derive(Debug, thiserror::Error)]
enum Attempt {
    #[error("{url}: no answer")]
    Transport {
        id: Ulid,
        url: String,
        /// The connection could not be made, so the request never left.
        unsent: bool,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    #[error("{url}: no answer in time")]
    TimedOut { url: String },
    #[error("{0}")]
    Invalid(String),
}

/// The error an ejected endpoint's `poll_ready` returns, so that `Balance` drops it.
#[derive(Debug, thiserror::Error)]
#[error("instance ejected")]
struct Ejected;

/// What the client's endpoints share.
struct Core {
    /// For https instances (TLS with the `tls` feature).
    client: HttpClient,
    /// For http instances.
    plain: PlainClient,
    request_timeout: Duration,
    registry: Mutex<HashMap<Ulid, Arc<EndpointState>>>,
    eject_tx: mpsc::UnboundedSender<Ulid>,
    eject_after: u32,
}

/// One instance as the client sees it.
struct EndpointState {
    id: Ulid,
    url: String,
    scheme: Scheme,
    authority: Authority,
    prefix: String,
    ejected: AtomicBool,
    failures: AtomicU32,
    in_flight: AtomicUsize,
}

impl EndpointState {
    fn new(instance: &Instance) -> Result<Self, String> {
        let uri: Uri = instance
            .url
            .parse()
            .map_err(|e| format!("not a URL ({e})"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") if cfg!(feature = "tls") => Scheme::HTTPS,
            Some("https") => return Err("https needs servicekit's `tls` feature".into()),
            _ => return Err("the scheme is not http or https".into()),
        };
        let authority = uri.authority().cloned().ok_or("it has no host")?;
        Ok(EndpointState {
            id: instance.id,
            url: instance.url.clone(),
            scheme,
            authority,
            prefix: uri.path().trim_end_matches('/').to_owned(),
            ejected: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn target(&self, path: &Uri) -> Result<Uri, String> {
        let pq = match path.path_and_query() {
            // Without a prefix the path is used as it is: no text to format and parse again.
            Some(pq) if self.prefix.is_empty() => pq.clone(),
            pq => {
                let pq = pq.map(PathAndQuery::as_str).unwrap_or("/");
                PathAndQuery::try_from(format!("{}{}", self.prefix, pq))
                    .map_err(|e| format!("cannot join {:?} and {pq:?}: {e}", self.url))?
            }
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(pq);
        Uri::from_parts(parts).map_err(|e| format!("cannot join {:?} and the path: {e}", self.url))
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Core {
    /// Sends to one instance, keeping its failure count and ejecting it when it keeps failing;
    /// the answer's head must come within the request timeout.
    async fn send_inner(
        &self,
        state: &EndpointState,
        req: &mut Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, Attempt> {
        let target = state.target(req.uri()).map_err(Attempt::Invalid)?;
        *req.uri_mut() = target;
        let req = std::mem::take(req);
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        let _guard = InFlight(&state.in_flight);
        let answer = if state.scheme == Scheme::HTTP {
            tokio::time::timeout(self.request_timeout, self.plain.request(req)).await
        } else {
            tokio::time::timeout(self.request_timeout, self.client.request(req)).await
        };
        let Ok(answer) = answer else {
            return Err(Attempt::TimedOut {
                url: state.url.clone(),
            });
        };
        match answer {
            Ok(mut res) => {
                state.failures.store(0, Ordering::Relaxed);
                res.extensions_mut().insert(ServedBy {
                    id: state.id,
                    url: state.url.clone(),
                });
                Ok(res)
            }
            Err(e) => {
                let failures = state.failures.fetch_add(1, Ordering::Relaxed) + 1;
                let refused = is_refused(&e);
                if refused || failures >= self.eject_after {
                    self.eject(state, &e, refused);
                }
                Err(Attempt::Transport {
                    id: state.id,
                    url: state.url.clone(),
                    unsent: e.is_connect(),
                    source: Arc::new(e),
                })
            }
        }
    }

    fn eject(&self, state: &EndpointState, e: &hyper_util::client::legacy::Error, refused: bool) {
        {
            // Never the last instance standing: when every instance fails at once the fault
            // is more likely the caller's (its network, its ports) than theirs, and ejecting
            // them all would fail every request until the cooldown even once it is over.
            let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
            let others = registry
                .values()
                .filter(|s| s.id != state.id && !s.ejected.load(Ordering::Acquire))
                .count();
            if others == 0 {
                tracing::debug!(id = %state.id, url = ?state.url, "discovery.ejection_skipped: the last instance left");
                return;
            }
        }
        if state.ejected.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(
            id = %state.id,
            url = ?state.url,
            refused,
            failures = state.failures.load(Ordering::Relaxed),
            error = %ErrorChain(e),
            "discovery.instance_ejected"
        );
        let _ = self.eject_tx.send(state.id);
    }

    /// The least busy instance not tried yet and not ejected.
    fn pick_other(&self, tried: &[Ulid]) -> Option<Arc<EndpointState>> {
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let candidates: Vec<&Arc<EndpointState>> = registry
            .values()
            .filter(|s| !tried.contains(&s.id) && !s.ejected.load(Ordering::Acquire))
            .collect();
        let least = candidates
            .iter()
            .map(|s| s.in_flight.load(Ordering::Relaxed))
            .min()?;
        let best: Vec<_> = candidates
            .into_iter()
            .filter(|s| s.in_flight.load(Ordering::Relaxed) == least)
            .collect();
        best.get(fastrand::usize(..best.len().max(1)))
            .map(|s| Arc::clone(s))
    }
}

/// Whether the connection was refused: nobody listens there (any more).
fn is_refused(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = s.source();
    }
    false
}

/// One instance as `Balance` holds it.
struct Endpoint {
    core: Arc<Core>,
    state: Arc<EndpointState>,
}

impl Service<Request<Full<Bytes>>> for Endpoint {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Incoming>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.state.ejected.load(Ordering::Acquire) {
            return Poll::Ready(Err(Box::new(Ejected)));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Full<Bytes>>) -> Self::Future {
        let (core, state) = (self.core.clone(), self.state.clone());
        Box::pin(async move {
            core.send_inner(&state, &mut req)
                .await
                .map_err(|e| Box::new(e) as BoxError)
        })
    }
}

type Balanced = PendingRequests<Endpoint, CompleteOnResponse>;

/// The watcher's changes as `Balance` wants them, plus re-insertion of ejected instances.
struct Adapter {
    changes: Changes,
    core: Arc<Core>,
    eject_rx: mpsc::UnboundedReceiver<Ulid>,
    cooldown: Duration,
    cooldowns: VecDeque<(Instant, Ulid)>,
    sleep: Pin<Box<Sleep>>,
}

impl Adapter {
    fn endpoint(&self, state: Arc<EndpointState>) -> Balanced {
        let endpoint = Endpoint {
            core: self.core.clone(),
            state,
        };
        PendingRequests::new(endpoint, CompleteOnResponse::default())
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<Ulid, Arc<EndpointState>>> {
        self.core.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Stream for Adapter {
    type Item = Result<Change<Ulid, Balanced>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            while let Poll::Ready(Some(change)) = Pin::new(&mut this.changes).poll_next(cx) {
                match change {
                    Ok(Change::Insert(id, instance)) => match EndpointState::new(&instance) {
                        Ok(state) => {
                            let state = Arc::new(state);
                            this.registry().insert(id, state.clone());
                            return Poll::Ready(Some(Ok(Change::Insert(id, this.endpoint(state)))));
                        }
                        Err(reason) => {
                            tracing::warn!(%id, url = ?instance.url, reason = %reason, "discovery.instance_unusable");
                            if this.registry().remove(&id).is_some() {
                                return Poll::Ready(Some(Ok(Change::Remove(id))));
                            }
                        }
                    },
                    Ok(Change::Remove(id)) => {
                        this.registry().remove(&id);
                        return Poll::Ready(Some(Ok(Change::Remove(id))));
                    }
                    Err(never) => match never {},
                }
            }
            while let Poll::Ready(Some(id)) = this.eject_rx.poll_recv(cx) {
                this.cooldowns
                    .push_back((Instant::now() + this.cooldown, id));
            }
            let Some(&(deadline, id)) = this.cooldowns.front() else {
                return Poll::Pending;
            };
            if deadline <= Instant::now() {
                this.cooldowns.pop_front();
                let state = this.registry().get(&id).cloned();
                if let Some(state) = state.filter(|s| s.ejected.load(Ordering::Acquire)) {
                    state.failures.store(0, Ordering::Relaxed);
                    state.ejected.store(false, Ordering::Release);
                    tracing::info!(%id, url = ?state.url, "discovery.instance_readmitted");
                    return Poll::Ready(Some(Ok(Change::Insert(id, this.endpoint(state)))));
                }
                continue;
            }
            this.sleep.as_mut().reset(deadline);
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}
