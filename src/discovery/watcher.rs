//! [`Watcher`]: one background task following the orchestrator's watch feed into a cache.
//!
//! The task connects, applies the feed's events to the cache, and when the connection ends,
//! breaks or stays silent for longer than twice the feed's heartbeat, marks the cache stale and
//! reconnects after a jittered backoff (never sooner than the feed's `retry:`), sending
//! `Last-Event-ID` so the orchestrator can send only what was missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

use super::cache::Cache;
use super::sse::{SseEvent, SseItem, SseParser};
use super::{Changes, Error, Filter, Instance, WatchState};
use crate::client::{connector, Connector};
use crate::config::{orchestrator_base, process_env, ConfigError, Source, ORCHESTRATOR_URL_ENV};
use crate::error::ErrorChain;
use crate::protocol::{
    HealthStatus, ListResponse, RemovedService, ServiceRecord, WatchEventKind, EVENT_STREAM,
    LAST_EVENT_ID_HEADER, WATCH_HEARTBEAT, WATCH_PARAM,
};
use crate::schedule;

/// What the watcher's task and its handles share.
pub(crate) struct Shared {
    pub cache: Cache,
    pub filter: Filter,
    /// The health statuses an instance may have to be in the cache.
    pub health: Vec<HealthStatus>,
    state: watch::Sender<WatchState>,
    synced: watch::Sender<bool>,
}

/// Stops the task when the last handle goes.
struct TaskGuard(tokio::task::AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows the orchestrator's watch feed for a [`Filter`] and keeps the matching instances in
/// a local cache. Cheap to clone; the background task stops when the last clone (and the last
/// [`Changes`] stream or [`BalancedClient`](super::BalancedClient) made from it) is dropped.
///
/// Creating one needs a tokio runtime (it spawns its task there); without one it is
/// [`Error::NoRuntime`].
#[derive(Clone)]
pub struct Watcher {
    shared: Arc<Shared>,
    _task: Arc<TaskGuard>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("filter", &self.shared.filter)
            .field("health", &self.shared.health)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// Watches `filter` at the orchestrator `url`: its base URL (`http://orchestrator:9000`)
    /// or its registration URL (`…/services/$register`), as the layer accepts it.
    pub fn new(url: impl AsRef<str>, filter: Filter) -> Result<Watcher, Error> {
        Watcher::builder(filter).url(url.as_ref()).build()
    }

    /// Watches `filter` at the orchestrator named by `SERVICEKIT_ORCHESTRATOR_URL`. The
    /// registration key is not needed (reading the registry is open).
    pub fn from_env(filter: Filter) -> Result<Watcher, Error> {
        Watcher::builder(filter).build()
    }

    /// A builder, for the knobs.
    pub fn builder(filter: Filter) -> WatcherBuilder {
        WatcherBuilder {
            url: None,
            filter,
            health: DEFAULT_HEALTH.to_vec(),
            idle_timeout: WATCH_HEARTBEAT * 2,
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
            changes_capacity: 1024,
            max_message_bytes: 64 << 20,
        }
    }

    /// Waits until the first snapshot is in the cache. Wrap it in a timeout: it waits as long as
    /// the orchestrator cannot be reached.
    pub async fn synced(&self) {
        let mut rx = self.shared.synced.subscribe();
        // The sender lives in `shared`, which `self` holds: this cannot fail.
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// The instances in the cache, in id order.
    pub fn instances(&self) -> Vec<Instance> {
        self.shared.cache.instances()
    }

    /// How current the cache is.
    pub fn state(&self) -> WatchState {
        *self.shared.state.borrow()
    }

    /// The filter this watcher follows.
    pub fn filter(&self) -> &Filter {
        &self.shared.filter
    }

    /// The health statuses of the instances this watcher keeps (see
    /// [`WatcherBuilder::health`]).
    pub fn health(&self) -> &[HealthStatus] {
        &self.shared.health
    }

    /// A `tower::discover` stream of the cache: `Insert`s for the instances known now, then
    /// every change. Each call gives an independent stream.
    pub fn discover(&self) -> Changes {
        super::discover::changes(self)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// Options of a [`Watcher`]; from [`Watcher::builder`]. Its `Debug` hides any password in the
/// URL.
#[derive(Clone)]
pub struct WatcherBuilder {
    url: Option<String>,
    filter: Filter,
    health: Vec<HealthStatus>,
    idle_timeout: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    changes_capacity: usize,
    max_message_bytes: usize,
}

impl std::fmt::Debug for WatcherBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatcherBuilder")
            .field("url", &self.url.as_deref().map(crate::redact::url))
            .field("filter", &self.filter)
            .field("health", &self.health)
            .field("idle_timeout", &self.idle_timeout)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("changes_capacity", &self.changes_capacity)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish()
    }
}

impl WatcherBuilder {
    /// The orchestrator's URL (base or registration URL); default: `SERVICEKIT_ORCHESTRATOR_URL`.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// The health statuses an instance must have to be used; default `passing` and `warning`
    /// ([`DEFAULT_HEALTH`]): a `critical` instance leaves the cache (and a balancer's set)
    /// when its record says so, and comes back when it is passing or warning again. All three
    /// statuses: no health filtering. The watcher follows every instance of its filter and
    /// keeps these itself (it does not send `?health=`, which an orchestrator from before
    /// health refuses); a record without health (such an orchestrator's) reads as passing.
    /// An empty set is [`Error::Config`].
    pub fn health(mut self, statuses: impl IntoIterator<Item = HealthStatus>) -> Self {
        let mut health: Vec<HealthStatus> = statuses.into_iter().collect();
        health.sort();
        health.dedup();
        self.health = health;
        self
    }

    /// How long the feed may stay silent before the connection counts as dead; default twice
    /// the feed's heartbeat (30 s).
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// The reconnection backoff: full jitter, doubling from `min` up to `max`; the feed's
    /// `retry:` (and a 429's `Retry-After`) is a floor, up to 60 s. Default 250 ms to 10 s.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max;
        self
    }

    /// How many changes a [`Watcher::discover`] stream may fall behind before it re-reads the
    /// cache instead; default 1024.
    pub fn changes_capacity(mut self, n: usize) -> Self {
        self.changes_capacity = n;
        self
    }

    /// The largest feed message accepted (a snapshot is one message); default 64 MiB.
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }

    /// Starts the watcher's task (in the current tokio runtime).
    pub fn build(self) -> Result<Watcher, Error> {
        let (text, source) = match self.url {
            Some(u) => (u, Source::Parameter),
            None => match process_env(ORCHESTRATOR_URL_ENV).filter(|v| !v.trim().is_empty()) {
                Some(u) => (u, Source::Env(ORCHESTRATOR_URL_ENV.into())),
                None => {
                    return Err(Error::Config(ConfigError::MissingOrchestratorUrl {
                        var: ORCHESTRATOR_URL_ENV.into(),
                    }))
                }
            },
        };
        let base = orchestrator_base(&text, &source).map_err(Error::Config)?;
        if self.health.is_empty() {
            return Err(Error::Config(ConfigError::InvalidOption {
                name: "health",
                reason: "name at least one status (all three: no health filtering)".into(),
            }));
        }
        // Health is filtered here, not with `?health=`: an orchestrator from before health
        // refuses the parameter, and an `updated` to critical then reads as what it is.
        let query = self.filter.query();
        let sep = if query.is_empty() { "" } else { "&" };
        let feed: Uri = format!("{base}/services?{WATCH_PARAM}=true{sep}{query}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| {
                Error::Config(ConfigError::InvalidOrchestratorUrl {
                    value: crate::redact::url(&text),
                    origin: source.to_string(),
                    reason: format!("cannot add the watch query: {e}"),
                })
            })?;
        for (name, d) in [
            ("idle_timeout", self.idle_timeout),
            ("backoff", self.max_backoff),
        ] {
            if d.is_zero() || d > schedule::MAX_PAUSE {
                return Err(Error::Config(ConfigError::InvalidOption {
                    name,
                    reason: "must be positive and at most 24 h".into(),
                }));
            }
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let shared = Arc::new(Shared {
            cache: Cache::new(self.changes_capacity),
            filter: self.filter,
            health: self.health,
            state: watch::Sender::new(WatchState::Connecting),
            synced: watch::Sender::new(false),
        });
        let settings = Settings {
            feed,
            idle: self.idle_timeout,
            min_backoff: self.min_backoff.min(self.max_backoff),
            max_backoff: self.max_backoff,
            max_message: self.max_message_bytes.max(1024),
        };
        let task = runtime.spawn(run(shared.clone(), settings));
        Ok(Watcher {
            shared,
            _task: Arc::new(TaskGuard(task.abort_handle())),
        })
    }
}

/// The statuses a watcher keeps unless told otherwise: an instance under strain still serves,
/// one that says it cannot does not get traffic.
pub const DEFAULT_HEALTH: [HealthStatus; 2] = [HealthStatus::Passing, HealthStatus::Warning];

/// The longest pause a server's `retry:` or `Retry-After` can impose (a broken or hostile
/// server must not stop the watcher for good).
const MAX_HINT: Duration = Duration::from_secs(60);

struct Settings {
    feed: Uri,
    idle: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    max_message: usize,
}

/// What one connection leaves for the next.
struct Resume {
    last_id: Option<String>,
    retry: Option<Duration>,
    failures: u32,
}

async fn run(shared: Arc<Shared>, settings: Settings) {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let client: Client<Connector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(4))
        .build(connector(http, &settings.feed));
    let mut resume = Resume {
        last_id: None,
        retry: None,
        failures: 0,
    };
    loop {
        let reason = session(&shared, &client, &settings, &mut resume).await;
        let synced = *shared.synced.borrow();
        shared.state.send_replace(if synced {
            WatchState::Stale
        } else {
            WatchState::Connecting
        });
        let pause = schedule::backoff(
            settings.min_backoff,
            resume.failures,
            settings.max_backoff,
            None,
            schedule::random(),
        )
        .max(resume.retry.unwrap_or_default());
        // The first failure in a row at warn, then one in ten: an outage is not a flood.
        if resume.failures % 10 == 0 {
            tracing::warn!(
                feed = %settings.feed,
                reason = ?reason,
                failures = resume.failures + 1,
                retry_in_ms = pause.as_millis() as u64,
                stale = synced,
                "discovery.disconnected"
            );
        } else {
            tracing::debug!(feed = %settings.feed, reason = ?reason, failures = resume.failures + 1, "discovery.disconnected");
        }
        resume.failures = resume.failures.saturating_add(1);
        tokio::time::sleep(pause).await;
    }
}

/// One connection to the feed, until it ends; why it ended.
async fn session(
    shared: &Shared,
    client: &Client<Connector, Full<Bytes>>,
    settings: &Settings,
    resume: &mut Resume,
) -> String {
    let mut req = Request::get(settings.feed.clone())
        .header(ACCEPT, EVENT_STREAM)
        .header(CACHE_CONTROL, "no-cache");
    if let Some(id) = resume
        .last_id
        .as_deref()
        .and_then(|id| http::HeaderValue::from_str(id).ok())
    {
        req = req.header(LAST_EVENT_ID_HEADER, id);
    }
    let req = match req.body(Full::new(Bytes::new())) {
        Ok(r) => r,
        Err(e) => return format!("cannot build the request: {e}"),
    };
    let res = match tokio::time::timeout(settings.idle, client.request(req)).await {
        Err(_) => return format!("no answer within {:?}", settings.idle),
        Ok(Err(e)) => return format!("cannot connect: {}", ErrorChain(&e)),
        Ok(Ok(res)) => res,
    };
    let status = res.status();
    if status != StatusCode::OK {
        // A 429 (too many watchers) or 503 says when to come back.
        let retry_after = res
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if let Some(ra) = retry_after {
            resume.retry = Some(resume.retry.unwrap_or_default().max(ra).min(MAX_HINT));
        }
        return format!("the orchestrator answered {status}");
    }
    let content_type = res
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with(EVENT_STREAM) {
        return format!("the answer is {content_type:?}, not an event stream (an orchestrator without the watch feed?)");
    }
    // The backoff starts over only once an event was applied: a feed that answers and then
    // fails (a snapshot too large, unreadable data, a proxy closing at once) keeps backing off.
    let mut healthy = false;
    if *shared.synced.borrow() {
        // Resumed (or about to get a snapshot): either way what follows is in order from the
        // cache's state.
        shared.state.send_replace(WatchState::Live);
    }
    tracing::info!(feed = %settings.feed, resumed_from = ?resume.last_id, "discovery.connected");
    let mut body = res.into_body();
    let mut parser = SseParser::new(resume.last_id.clone(), settings.max_message);
    let mut items = Vec::new();
    loop {
        let frame = match tokio::time::timeout(settings.idle, body.frame()).await {
            Err(_) => return format!("silent for {:?}", settings.idle),
            Ok(None) => return "the orchestrator ended the stream".into(),
            Ok(Some(Err(e))) => return format!("the stream broke: {}", ErrorChain(&e)),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if let Err(e) = parser.push(&data, &mut items) {
            resume.last_id = None;
            return e.to_string();
        }
        for item in items.drain(..) {
            match item {
                SseItem::Retry(d) => resume.retry = Some(d.min(MAX_HINT)),
                SseItem::Event(event) => {
                    let id = event.id.clone();
                    if let Err(reason) = apply(shared, event) {
                        // The cache may have missed something: start over with a snapshot.
                        resume.last_id = None;
                        return reason;
                    }
                    resume.last_id = id;
                    if !healthy {
                        healthy = true;
                        resume.failures = 0;
                    }
                }
            }
        }
    }
}

/// Applies one event to the cache; a description of the problem when its data is unreadable.
fn apply(shared: &Shared, event: SseEvent) -> Result<(), String> {
    let Some(kind) = WatchEventKind::parse(&event.event) else {
        tracing::debug!(event = ?event.event, "discovery.unknown_event");
        return Ok(());
    };
    let bad = |e: serde_json::Error| format!("unreadable {kind} event: {e}");
    match kind {
        WatchEventKind::Snapshot => {
            let list: ListResponse = serde_json::from_str(&event.data).map_err(bad)?;
            let map: HashMap<_, _> = list
                .services
                .into_iter()
                .filter(|r| shared.health.contains(&r.health.status))
                .map(|r| (r.id, Instance::from(r)))
                .collect();
            let count = map.len();
            let diff = shared.cache.replace(map);
            let first = !shared.synced.send_replace(true);
            shared.state.send_replace(WatchState::Live);
            if first {
                tracing::info!(filter = %shared.filter, count, "discovery.synced");
            } else {
                tracing::info!(
                    filter = %shared.filter,
                    count,
                    added = diff.added,
                    changed = diff.changed,
                    removed = diff.removed,
                    "discovery.resynced"
                );
            }
        }
        WatchEventKind::Registered | WatchEventKind::Updated => {
            let record: ServiceRecord = serde_json::from_str(&event.data).map_err(bad)?;
            let (id, url, health) = (record.id, record.url.clone(), record.health.status);
            if !shared.health.contains(&health) {
                // Still registered, but not usable: out of the set until it recovers.
                if shared.cache.remove(id) {
                    tracing::info!(%id, url = ?url, %health, "discovery.instance_unhealthy");
                }
            } else if shared.cache.upsert(Instance::from(record)) {
                tracing::debug!(%id, url = ?url, event = %kind, %health, "discovery.instance_up");
            }
        }
        WatchEventKind::Deregistered | WatchEventKind::Expired => {
            let removed: RemovedService = serde_json::from_str(&event.data).map_err(bad)?;
            if shared.cache.remove(removed.id) {
                tracing::debug!(id = %removed.id, url = ?removed.url, event = %kind, "discovery.instance_down");
            }
        }
    }
    Ok(())
}
