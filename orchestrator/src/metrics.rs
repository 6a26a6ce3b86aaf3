//! `GET /metrics`: what the orchestrator is doing, in the Prometheus text format.
//!
//! Every orchestrator owns its [`Metrics`] (an explicit registry, no global state), so several
//! of them in one process (the tests) count separately. Counters and histograms are updated
//! where things happen: [`MetricsLayer`] around each request, the store wrapper
//! ([`crate::api::Bounded`]) around each store call, the sweeper, the accept loop. The number
//! of registrations is not counted here at all but asked of the store at scrape time: a
//! Valkey registry is shared by several orchestrators, so no single process could keep it.
//! The families and their meaning are listed in the README ("Metrics").

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::time::Instant;

/// The `Content-Type` of `GET /metrics` (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Bucket bounds (seconds) of the duration histograms: 0.5 ms to 10 s. A ping takes about a
/// millisecond; the slowest bounded store call (a listing) gives up at 10 s.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The store operations timed by [`crate::api::Bounded`], one `op` label value each.
const STORE_OPS: [&str; 13] = [
    "set_health",
    "checkers",
    "register",
    "ping",
    "get",
    "list",
    "deregister",
    "sweep",
    "health",
    "count",
    "change_head",
    "changes",
    "reap",
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// One orchestrator's metrics. Shared (`Arc`) by the API, the store wrapper, the accept loop
/// and the sweeper.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    request_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    store_duration: Family<OpLabel, Histogram, fn() -> Histogram>,
    store_errors: Family<OpLabel, Counter>,
    expired: Counter,
    lease_rejections: Counter,
    connections: Gauge,
    watchers: Gauge,
    watch_events: Family<EventLabel, Counter>,
    watch_snapshots: Family<ReasonLabel, Counter>,
    watchers_dropped: Counter,
    watch_hub_changes: Counter,
    checks: Family<ResultLabel, Counter>,
    check_duration: Histogram,
    checks_owned: Gauge,
    checkers: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Fresh metrics. `valkey_reconnects` is the store's own counter of connections that came
    /// back (see [`crate::store::Store::reconnects`]); `None` (the memory store) exposes a
    /// counter that stays at 0, so dashboards see the same families whatever the store.
    pub fn new(valkey_reconnects: Option<Counter>) -> Metrics {
        let mut registry = Registry::with_prefix("servicekit");
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route pattern and status code",
            requests.clone(),
        );
        let request_duration =
            Family::<RouteLabel, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        registry.register_with_unit(
            "http_request_duration",
            "Time from a request's arrival to its response head, by route pattern",
            Unit::Seconds,
            request_duration.clone(),
        );
        let store_duration =
            Family::<OpLabel, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        registry.register_with_unit(
            "store_operation_duration",
            "Time of one store operation, including failed and timed-out ones, by operation",
            Unit::Seconds,
            store_duration.clone(),
        );
        let store_errors = Family::<OpLabel, Counter>::default();
        // Every operation's error count exists from the start (at 0), so a rate over it
        // is defined before the first error.
        for op in STORE_OPS {
            drop(store_errors.get_or_create(&OpLabel { op }));
        }
        registry.register(
            "store_operation_errors",
            "Store operations that failed or timed out (answered 503), by operation",
            store_errors.clone(),
        );
        let expired = Counter::default();
        registry.register(
            "registrations_expired",
            "Index entries of expired registrations dropped by the sweeper or the reaper",
            expired.clone(),
        );
        let lease_rejections = Counter::default();
        registry.register(
            "lease_rejections",
            "Writes refused with 403 for a missing or wrong lease token",
            lease_rejections.clone(),
        );
        registry.register(
            "valkey_reconnects",
            "Times the connection to Valkey came back after it was lost",
            valkey_reconnects.unwrap_or_default(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        let watchers = Gauge::default();
        registry.register(
            "watchers",
            "Open watch feeds (GET /services?watch=true)",
            watchers.clone(),
        );
        let watch_events = Family::<EventLabel, Counter>::default();
        for kind in servicekit::protocol::WatchEventKind::ALL {
            drop(watch_events.get_or_create(&EventLabel {
                event: kind.as_str(),
            }));
        }
        registry.register(
            "watch_events",
            "Events sent to watchers, by event",
            watch_events.clone(),
        );
        let watch_snapshots = Family::<ReasonLabel, Counter>::default();
        for reason in crate::watch::session::SnapshotReason::ALL {
            drop(watch_snapshots.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            }));
        }
        registry.register(
            "watch_snapshots",
            "Snapshots sent to watchers, by reason: start, resume_gap (Last-Event-ID unusable), \
             lagged (the watcher fell behind), store_gap (the change log lost changes), \
             resume_bound (a resumed watch had too much to remember)",
            watch_snapshots.clone(),
        );
        let watchers_dropped = Counter::default();
        registry.register(
            "watchers_dropped",
            "Watch feeds ended because the client took nothing within the send timeout",
            watchers_dropped.clone(),
        );
        let watch_hub_changes = Counter::default();
        registry.register(
            "watch_hub_changes",
            "Changes the watch hub read from the store's change log and fanned out",
            watch_hub_changes.clone(),
        );
        let checks = Family::<ResultLabel, Counter>::default();
        for status in servicekit::protocol::HealthStatus::ALL {
            drop(checks.get_or_create(&ResultLabel {
                result: status.as_str(),
            }));
        }
        registry.register(
            "checks",
            "Health checks (pull) this orchestrator ran, by result before flap damping",
            checks.clone(),
        );
        let check_duration = histogram();
        registry.register_with_unit(
            "check_duration",
            "Time of one health check probe, connecting included",
            Unit::Seconds,
            check_duration.clone(),
        );
        let checks_owned = Gauge::default();
        registry.register(
            "checks_owned",
            "Instances whose health checks this orchestrator replica runs",
            checks_owned.clone(),
        );
        let checkers = Gauge::default();
        registry.register(
            "checkers",
            "Live checker replicas sharing the health checks, as this replica saw last",
            checkers.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            store_duration,
            store_errors,
            expired,
            lease_rejections,
            connections,
            watchers,
            watch_events,
            watch_snapshots,
            watchers_dropped,
            watch_hub_changes,
            checks,
            check_duration,
            checks_owned,
            checkers,
        }
    }

    /// Counts one health check probe by its result (`passing`, `warning`, `critical`).
    pub fn check_done(&self, result: &'static str, elapsed: Duration) {
        self.checks.get_or_create(&ResultLabel { result }).inc();
        self.check_duration.observe(elapsed.as_secs_f64());
    }

    /// Sets how many instances this replica checks.
    pub fn checks_owned(&self, owned: usize) {
        self.checks_owned
            .set(i64::try_from(owned).unwrap_or(i64::MAX));
    }

    /// Sets how many checker replicas are alive.
    pub fn checkers(&self, live: usize) {
        self.checkers.set(i64::try_from(live).unwrap_or(i64::MAX));
    }

    /// Counts one answered request on `route` (a route pattern, never a raw path).
    pub fn request(&self, route: &'static str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RouteStatus { route, status })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabel { route })
            .observe(elapsed.as_secs_f64());
    }

    /// Records one store operation.
    pub fn store_op(&self, op: &'static str, elapsed: Duration, ok: bool) {
        let label = OpLabel { op };
        self.store_duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        if !ok {
            self.store_errors.get_or_create(&label).inc();
        }
    }

    /// Counts what one sweep or reap dropped.
    pub fn swept(&self, dropped: usize) {
        self.expired
            .inc_by(u64::try_from(dropped).unwrap_or(u64::MAX));
    }

    /// Counts an open watch feed until the returned guard is dropped.
    pub fn watcher_started(self: &Arc<Self>) -> WatcherGuard {
        self.watchers.inc();
        WatcherGuard {
            metrics: self.clone(),
        }
    }

    /// Counts one event sent to a watcher.
    pub fn watch_event(&self, kind: servicekit::protocol::WatchEventKind) {
        self.watch_events
            .get_or_create(&EventLabel {
                event: kind.as_str(),
            })
            .inc();
    }

    /// Counts one snapshot sent, by reason (a fixed label value).
    pub fn watch_snapshot(&self, reason: &'static str) {
        self.watch_snapshots
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a watcher dropped for not reading.
    pub fn watcher_dropped(&self) {
        self.watchers_dropped.inc();
    }

    /// Counts changes the hub read.
    pub fn watch_hub_read(&self, changes: usize) {
        self.watch_hub_changes
            .inc_by(u64::try_from(changes).unwrap_or(u64::MAX));
    }

    /// Counts a write refused with 403 for a missing or wrong lease token.
    pub fn lease_rejected(&self) {
        self.lease_rejections.inc();
    }

    /// Counts an open connection until the returned guard is dropped.
    pub fn connection_opened(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.inc();
        ConnectionGuard {
            metrics: self.clone(),
        }
    }

    /// The text exposition. `registrations` is the store's count of live entries, read just
    /// before; `None` (the store did not answer) leaves that family out rather than report a
    /// stale or made-up number.
    pub fn encode(&self, registrations: Option<u64>) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(8 * 1024);
        prometheus_text::encode(&mut text, &self.registry)?;
        if let Some(count) = registrations {
            // A registry of its own per scrape: the value is a reading, not a running count.
            let mut scrape = Registry::with_prefix("servicekit");
            let gauge: Gauge = Gauge::default();
            gauge.set(i64::try_from(count).unwrap_or(i64::MAX));
            scrape.register(
                "registrations",
                "Registrations in the store (approximate: expired ones count until swept)",
                gauge,
            );
            prometheus_text::encode(&mut text, &scrape)?;
        }
        Ok(text)
    }
}

/// Keeps one watch feed counted in `servicekit_watchers`.
#[derive(Debug)]
pub struct WatcherGuard {
    metrics: Arc<Metrics>,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.metrics.watchers.dec();
    }
}

/// Keeps one connection counted in `servicekit_connections`.
#[derive(Debug)]
pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}

/// Tower layer counting each request in `servicekit_http_requests_total` and
/// `servicekit_http_request_duration_seconds`. Outermost in the stack (inside tracing), so the
/// middleware's own answers (408, 413) are counted too. `route_of` maps a path to its route
/// pattern.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
    route_of: fn(&str) -> &'static str,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<Metrics>, route_of: fn(&str) -> &'static str) -> Self {
        MetricsLayer { metrics, route_of }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
            route_of: self.route_of,
        }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
    route_of: fn(&str) -> &'static str,
}

impl<S, B, R> tower::Service<Request<B>> for MetricsService<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = (self.route_of)(req.uri().path());
        MetricsFuture {
            inner: self.inner.call(req),
            metrics: self.metrics.clone(),
            route,
            started: Instant::now(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`MetricsService`].
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        metrics: Arc<Metrics>,
        route: &'static str,
        started: Instant,
    }
}

impl<F, R, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            this.metrics.request(
                this.route,
                response.status().as_u16(),
                this.started.elapsed(),
            );
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_labels_are_exposed() {
        let reconnects = Counter::default();
        let m = Arc::new(Metrics::new(Some(reconnects.clone())));
        m.request("/services/{id}/$ping", 200, Duration::from_millis(2));
        m.request("/services/{id}/$ping", 404, Duration::from_millis(1));
        m.store_op("ping", Duration::from_millis(1), true);
        m.store_op("register", Duration::from_millis(1), false);
        m.swept(3);
        m.lease_rejected();
        reconnects.inc();
        let guard = m.connection_opened();
        let watcher = m.watcher_started();
        m.watch_event(servicekit::protocol::WatchEventKind::Expired);
        m.watch_snapshot("lagged");
        m.watcher_dropped();
        m.watch_hub_read(5);
        m.check_done("warning", Duration::from_millis(3));
        m.checks_owned(7);
        m.checkers(2);
        let text = m.encode(Some(42)).expect("encode");
        for line in [
            "servicekit_http_requests_total{route=\"/services/{id}/$ping\",status=\"200\"} 1",
            "servicekit_http_requests_total{route=\"/services/{id}/$ping\",status=\"404\"} 1",
            "servicekit_http_request_duration_seconds_count{route=\"/services/{id}/$ping\"} 2",
            "servicekit_store_operation_duration_seconds_count{op=\"ping\"} 1",
            "servicekit_store_operation_errors_total{op=\"register\"} 1",
            "servicekit_registrations_expired_total 3",
            "servicekit_lease_rejections_total 1",
            "servicekit_valkey_reconnects_total 1",
            "servicekit_connections 1",
            "servicekit_registrations 42",
            "servicekit_watchers 1",
            "servicekit_watch_events_total{event=\"expired\"} 1",
            "servicekit_watch_events_total{event=\"snapshot\"} 0",
            "servicekit_watch_snapshots_total{reason=\"lagged\"} 1",
            "servicekit_watch_snapshots_total{reason=\"start\"} 0",
            "servicekit_watchers_dropped_total 1",
            "servicekit_watch_hub_changes_total 5",
            "servicekit_checks_total{result=\"warning\"} 1",
            "servicekit_checks_total{result=\"critical\"} 0",
            "servicekit_check_duration_seconds_count 1",
            "servicekit_checks_owned 7",
            "servicekit_checkers 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        drop((guard, watcher));
        let text = m.encode(None).expect("encode");
        assert!(
            text.lines().any(|l| l == "servicekit_connections 0")
                && text.lines().any(|l| l == "servicekit_watchers 0"),
            "{text}"
        );
        assert!(!text.contains("servicekit_registrations "), "{text}");
    }
}
