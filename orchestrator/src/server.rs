//! Accepting connections, the middleware in front of the API, the background tasks (the
//! sweeper, the reaper that logs expiries for watchers, the watch hub, the health checker),
//! and graceful shutdown.
//!
//! The binary and the tests start the orchestrator the same way, through [`start`], so the
//! tests exercise the real accept loop over real sockets. Each request passes a tower stack
//! (request tracing, whole-request timeout, body size limit, body arrival timeout, all from
//! tower-http) before the hand-routed [`Api`]; [`ProblemLayer`] turns the middleware's own
//! answers into problem+json. The connection limit stays in the accept loop, where it pushes
//! back through the listen backlog instead of holding accepted sockets (tower's
//! `ConcurrencyLimit` counts requests, not connections). Shutdown stops accepting at once,
//! closes the watch hub (which ends every watch stream), lets in-flight requests finish, and
//! only then returns.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Body;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tower::{Service, ServiceBuilder};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tower_http::{BoxError, LatencyUnit};

use crate::api::Api;
use crate::config::Config;
use crate::connection::{self, AcceptErrors, PeerLimit};
use crate::logsafe::Untrusted;
use crate::metrics::MetricsLayer;
use crate::problem::ProblemLayer;
use crate::store::{MemoryStore, Store, StoreError, ValkeyStore, REAP_INTERVAL};

/// How long shutdown waits for in-flight requests before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request body may go without a byte arriving (408).
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound of a whole request, body and answer (408): a body trickled in byte by byte
/// stays under [`BODY_TIMEOUT`] between bytes but not under this. Longer than the longest
/// store bound (a listing, 10 s), which answers 503 itself before this fires.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the orchestrator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot use the Valkey store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// A running orchestrator.
pub struct Running {
    local_addr: SocketAddr,
    scheme: &'static str,
    store_kind: &'static str,
    checker: String,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Base URL for clients on this machine, e.g. `http://127.0.0.1:9000` (`https://…` when
    /// serving TLS).
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.local_addr)
    }

    /// `"memory"` or `"valkey"`.
    pub fn store_kind(&self) -> &'static str {
        self.store_kind
    }

    /// This replica's health checker id, as its checks send it in `x-servicekit-checker`.
    pub fn checker_id(&self) -> &str {
        &self.checker
    }

    /// Stops accepting, waits for in-flight requests, and returns when the server is done.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Waits until the server stops (after a shutdown signal given to [`start_with_signal`]).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Starts the orchestrator described by `config`; it runs until [`Running::shutdown`].
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with_signal(config, std::future::pending()).await
}

/// Starts the orchestrator; it shuts down gracefully when `signal` completes.
pub async fn start_with_signal(
    config: Config,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, StartError> {
    // Unusable certificate files fail the start before anything listens.
    let tls = crate::tls::from_config(&config)?;
    let listener = TcpListener::bind(config.bind)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.bind,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.bind,
        source,
    })?;
    let (shutdown, stop) = watch::channel(false);
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        signal.await;
        // Trigger first: nothing (not even a failing log write) may stand between a signal
        // and the shutdown it asks for.
        let _ = trigger.send(true);
        tracing::info!("orchestrator.shutdown_requested");
    });
    let ttl = config.ttl();
    // Unique per process: replicas on one store tell each other apart by it.
    let checker = ulid::Ulid::new().to_string().to_lowercase();
    let checks = crate::checks::CheckerConfig {
        replica: checker.clone(),
        concurrency: usize::try_from(config.check_concurrency).unwrap_or(usize::MAX),
        membership_ttl: config.checker_ttl(),
    };
    let (store_kind, task) = match &config.valkey_url {
        Some(url) => {
            let store = ValkeyStore::connect(url, &config.key_prefix, ttl).await?;
            log_start(&config, local_addr, "valkey");
            (
                "valkey",
                spawn_server(
                    &config,
                    local_addr,
                    listener,
                    store,
                    tls.clone(),
                    checks,
                    stop,
                ),
            )
        }
        None => {
            log_start(&config, local_addr, "memory");
            let store = MemoryStore::new(ttl);
            (
                "memory",
                spawn_server(
                    &config,
                    local_addr,
                    listener,
                    store,
                    tls.clone(),
                    checks,
                    stop,
                ),
            )
        }
    };
    Ok(Running {
        local_addr,
        scheme: if tls.is_some() { "https" } else { "http" },
        store_kind,
        checker,
        shutdown,
        task,
    })
}

fn log_start(config: &Config, local_addr: SocketAddr, store: &str) {
    tracing::info!(
        bind = %local_addr,
        store,
        ttl_seconds = config.ttl_seconds,
        public_url = %config
            .public_url
            .as_deref()
            .map_or_else(|| "(from Host header)".to_owned(), crate::redact::url),
        registration_key = config.required_key().is_some(),
        tls = config.tls_cert.is_some(),
        admin_key = config.admin_key.as_deref().is_some_and(|k| !k.is_empty()),
        require_lease = config.require_lease,
        "orchestrator.starting"
    );
    if store == "memory" {
        tracing::warn!(
            "registrations are kept in memory and lost on exit; set VALKEY_URL to share them"
        );
    }
}

fn spawn_server<S: Store>(
    config: &Config,
    local_addr: SocketAddr,
    listener: TcpListener,
    store: S,
    tls: Option<crate::tls::Acceptor>,
    checks: crate::checks::CheckerConfig,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let api = Arc::new(
        Api::new(
            store,
            config.public_url.clone(),
            config.required_key().map(str::to_owned),
            config.max_body_bytes,
            local_addr,
        )
        .with_tls(tls.is_some())
        .with_leases(config.admin_key.as_deref(), config.require_lease)
        .with_limits(config.limits())
        .with_watch(
            usize::try_from(config.max_watchers).unwrap_or(usize::MAX),
            config.watch_tuning,
        ),
    );
    let sweeper = tokio::spawn(sweep_forever(api.clone(), stop.clone()));
    let reaper = tokio::spawn(reap_forever(api.clone(), stop.clone()));
    let hub = {
        let (api, stop) = (api.clone(), stop.clone());
        tokio::spawn(async move {
            let hub = api.watch().hub();
            crate::watch::hub::run(api.store(), hub, api.metrics(), stop).await;
        })
    };
    let checker = tokio::spawn(crate::checks::run(api.clone(), checks, stop.clone()));
    let accept = Accept {
        max_connections: crate::fd_limit::fit_connection_cap(config.max_connections),
        peers: PeerLimit::new(config.max_connections_per_ip),
        limits: connection::Limits {
            header_timeout: config.header_timeout(),
            idle_timeout: config.idle_timeout(),
        },
    };
    tokio::spawn(async move {
        accept_loop(listener, api, accept, tls, stop).await;
        sweeper.abort();
        reaper.abort();
        // Ended by the stop signal already, its check tasks with it.
        checker.abort();
        // Ended by the stop signal already (it closed the hub first thing).
        hub.abort();
    })
}

/// Logs `Expired` for entries whose TTL passed, every [`REAP_INTERVAL`], so watchers hear of
/// an expiry within about that even when nothing reads the entry.
async fn reap_forever<S: Store>(api: Arc<Api<S>>, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(REAP_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        match api.store().reap().await {
            Ok(0) => {}
            Ok(n) => {
                api.metrics().swept(n);
                tracing::debug!(expired = n, "store.reaped");
            }
            // The error may quote what the store sent: escaped.
            Err(e) => tracing::debug!(error = %Untrusted(&e.to_string()), "store.reap_failed"),
        }
    }
}

/// Drops index entries of expired registrations every half TTL (at least every second).
async fn sweep_forever<S: Store>(api: Arc<Api<S>>, mut stop: watch::Receiver<bool>) {
    let period = (api.store().ttl() / 2).max(Duration::from_secs(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        match api.store().sweep().await {
            Ok(0) => {}
            Ok(n) => {
                api.metrics().swept(n);
                tracing::debug!(removed = n, "store.swept");
            }
            Err(e) => tracing::debug!(error = %Untrusted(&e.to_string()), "store.sweep_failed"),
        }
    }
}

/// The middleware stack of one connection around the API, outermost first. Built once per
/// connection and cloned per request (every layer is a copy or an `Arc`, no allocation).
fn stack<S, B>(
    api: Arc<Api<S>>,
    peer: SocketAddr,
) -> impl Service<
    Request<B>,
    Response = Response<impl Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
       + Send
       + 'static
where
    S: Store,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let max_body_bytes = api.max_body_bytes();
    let metrics = MetricsLayer::new(api.metrics().clone(), crate::api::route_label);
    ServiceBuilder::new()
        // One debug line per request. The span and its fields cost nothing when debug is off;
        // the path is untrusted, so it is logged escaped (`?`).
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(move |req: &Request<B>| {
                    tracing::debug_span!("request", %peer, method = %req.method(),
                        path = ?req.uri().path())
                })
                .on_request(())
                .on_response(
                    DefaultOnResponse::new()
                        .level(tracing::Level::DEBUG)
                        .latency_unit(LatencyUnit::Micros),
                )
                .on_body_chunk(())
                .on_eos(())
                // A 5xx is the store's trouble, logged by the store; not an error per request.
                .on_failure(()),
        )
        // Counts every answer, the middleware's own (408, 413) included.
        .layer(metrics)
        .layer(ProblemLayer {
            max_body_bytes,
            request_timeout: REQUEST_TIMEOUT,
        })
        .layer(RequestBodyLimitLayer::new(max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
        .service(tower::service_fn(move |req| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req).await) }
        }))
}

/// What the accept loop enforces.
struct Accept {
    /// Connections served at once (after [`crate::fd_limit::fit_connection_cap`]).
    max_connections: u32,
    peers: Arc<PeerLimit>,
    limits: connection::Limits,
}

async fn accept_loop<S: Store>(
    listener: TcpListener,
    api: Arc<Api<S>>,
    accept: Accept,
    tls: Option<crate::tls::Acceptor>,
    mut stop: watch::Receiver<bool>,
) {
    let connections = Arc::new(Semaphore::new(accept.max_connections as usize));
    let builder = Arc::new(connection::builder(accept.limits));
    let mut accept_errors = AcceptErrors::default();
    let mut refused_peers = AcceptErrors::default();
    loop {
        // At the connection limit, stop accepting until a connection ends (backpressure
        // through the listen backlog instead of accepting and dropping).
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stop.wait_for(|stopped| *stopped) => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stopped| *stopped) => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => {
                accept_errors.succeeded();
                conn
            }
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning, and
                // say so once in a while rather than on every attempt.
                let (pause, report) = accept_errors.failed(tokio::time::Instant::now());
                if let Some(failures) = report {
                    tracing::warn!(error = %e, failures, "accept failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = stop.wait_for(|stopped| *stopped) => break,
                }
            }
        };
        let Ok(peer_slot) = accept.peers.admit(peer.ip()) else {
            if let (_, Some(refused)) = refused_peers.failed(tokio::time::Instant::now()) {
                tracing::warn!(%peer, refused, "too many connections from one peer; closing");
            }
            continue;
        };
        let accepted_at = tokio::time::Instant::now();
        let _ = stream.set_nodelay(true);
        let counted = api.metrics().connection_opened();
        let service = TowerToHyperService::new(stack(api.clone(), peer));
        let (builder, tls, stop, limits) =
            (builder.clone(), tls.clone(), stop.clone(), accept.limits);
        tokio::spawn(async move {
            // The TLS handshake (when on) runs here, not in the loop, and counts against the
            // connection's first-request deadline as well as its own.
            let deadline = accepted_at + limits.header_timeout;
            let handshake = crate::tls::accept(tls.as_ref(), stream);
            let stream = match tokio::time::timeout_at(deadline, handshake).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "tls.handshake_failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "tls.handshake_failed: no handshake before the deadline");
                    return;
                }
            };
            let conn = connection::serve(
                builder,
                TokioIo::new(stream),
                service,
                limits,
                accepted_at,
                stop,
                DRAIN_TIMEOUT,
            );
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection closed");
            }
            drop((permit, peer_slot, counted));
        });
    }
    drop(listener);
    tracing::info!("orchestrator.draining");
    // Every connection holds a permit until it is done: all permits back means drained.
    let all = accept.max_connections;
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?DRAIN_TIMEOUT, "in-flight requests did not finish; closing");
    }
    tracing::info!("orchestrator.stopped");
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{ready, Context, Poll};

    use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    use http::Method;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Frame;
    use servicekit::protocol::{problem_type as t, PROBLEM_JSON};
    use tower::ServiceExt;

    use super::*;

    const LIMIT: usize = 1024;

    fn api() -> Arc<Api<MemoryStore>> {
        Arc::new(Api::new(
            MemoryStore::new(Duration::from_secs(30)),
            None,
            None,
            LIMIT,
            SocketAddr::from(([127, 0, 0, 1], 9)),
        ))
    }

    /// A request body that sends one byte every `every`, `left` times.
    struct Trickle {
        next: Pin<Box<tokio::time::Sleep>>,
        every: Duration,
        left: usize,
    }

    impl Trickle {
        fn new(every: Duration, left: usize) -> Self {
            Trickle {
                next: Box::pin(tokio::time::sleep(every)),
                every,
                left,
            }
        }
    }

    impl Body for Trickle {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            ready!(self.next.as_mut().poll(cx));
            let next = tokio::time::Instant::now() + self.every;
            self.next.as_mut().reset(next);
            self.left -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b" ")))))
        }
    }

    /// Sends `req` through the whole stack; returns the status, content type and JSON body.
    async fn send<B>(req: Request<B>) -> (StatusCode, Option<String>, serde_json::Value)
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let Ok(response) = stack(api(), peer).oneshot(req).await;
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match response.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => panic!("response body: {}", e.into()),
        };
        let json = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).expect("a JSON body")
        };
        (status, content_type, json)
    }

    fn register<B>(body: B) -> Request<B> {
        Request::post("/services/$register")
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .expect("request")
    }

    fn assert_problem(
        got: &(StatusCode, Option<String>, serde_json::Value),
        status: StatusCode,
        kind: &str,
        detail: &str,
    ) {
        let (code, content_type, p) = got;
        assert_eq!(*code, status, "{p}");
        assert_eq!(content_type.as_deref(), Some(PROBLEM_JSON), "{p}");
        assert_eq!(p["type"], kind, "{p}");
        assert_eq!(p["status"], status.as_u16(), "{p}");
        assert_eq!(p["instance"], "/services/$register", "{p}");
        let text = p["detail"].as_str().unwrap_or_default();
        assert!(text.contains(detail), "detail should say {detail:?}: {p}");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_a_413_problem() {
        let req = Request::post("/services/$register")
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, LIMIT + 1)
            .body(Full::new(Bytes::from(vec![b' '; LIMIT + 1])))
            .expect("request");
        let got = send(req).await;
        let limit = format!("{LIMIT} bytes");
        assert_problem(
            &got,
            StatusCode::PAYLOAD_TOO_LARGE,
            t::PAYLOAD_TOO_LARGE,
            &limit,
        );
        // A HEAD gets the status without the body.
        let req = Request::head("/services/$register")
            .header(CONTENT_LENGTH, LIMIT + 1)
            .body(Full::new(Bytes::from(vec![b' '; LIMIT + 1])))
            .expect("request");
        let (status, content_type, body) = send(req).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(content_type.as_deref(), Some(PROBLEM_JSON));
        assert!(body.is_null(), "{body}");
    }

    #[tokio::test]
    async fn a_streamed_body_over_the_limit_is_a_413_problem() {
        // No Content-Length: the limit holds while the body is read.
        let got = send(register(Trickle::new(Duration::ZERO, LIMIT + 1))).await;
        let limit = format!("{LIMIT} bytes");
        assert_problem(
            &got,
            StatusCode::PAYLOAD_TOO_LARGE,
            t::PAYLOAD_TOO_LARGE,
            &limit,
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_is_a_408_problem() {
        let got = send(register(Trickle::new(Duration::from_secs(3600), 1))).await;
        assert_problem(
            &got,
            StatusCode::REQUEST_TIMEOUT,
            t::REQUEST_TIMEOUT,
            "no part of the request body arrived for 10s",
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_body_is_a_408_problem_at_the_request_timeout() {
        // A byte every 5 s never stalls for 10 s, but the whole request is bounded.
        let started = tokio::time::Instant::now();
        let got = send(register(Trickle::new(Duration::from_secs(5), 100))).await;
        assert_problem(
            &got,
            StatusCode::REQUEST_TIMEOUT,
            t::REQUEST_TIMEOUT,
            "within 15s",
        );
        // Paused time: this is the timer that fired, not a measurement.
        assert_eq!(started.elapsed(), REQUEST_TIMEOUT);
    }

    #[tokio::test]
    async fn answers_of_the_api_pass_through_unchanged() {
        let body = br#"{"url":"http://svca:8000","info":{"display_name":"A"}}"#;
        let (status, content_type, v) = send(register(Full::new(Bytes::from_static(body)))).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        assert_eq!(content_type.as_deref(), Some("application/json"));
        assert_eq!(v["status"], "registered");
        let req = Request::builder()
            .method(Method::GET)
            .uri("/nope")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let (status, content_type, p) = send(req).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(content_type.as_deref(), Some(PROBLEM_JSON));
        assert_eq!(p["type"], t::NOT_FOUND);
    }
}
