//! Connecting to Valkey and keeping the connection honest: the reconnect policy, replacing a
//! hung connection, and logging `valkey.connected` / `valkey.disconnected` once per change.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use fred::clients::Client;
use fred::error::{Error as FredError, ErrorKind};
use fred::interfaces::{ClientLike, ClusterInterface, EventInterface};
use fred::socket2::TcpKeepalive;
use fred::types::config::{
    ClusterDiscoveryPolicy, Config, ConnectionConfig, PerformanceConfig, ReconnectPolicy,
    TcpConfig, UnresponsiveConfig,
};
use fred::types::Builder;

use super::ValkeyStore;
use crate::store::{ClusterHealth, StoreError};

/// Upper bound of every command (and of the initial connection wait).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// URL schemes accepted: standalone and Cluster, plain TCP (TLS is not compiled in).
const SCHEMES: [&str; 4] = ["redis", "valkey", "redis-cluster", "valkey-cluster"];
/// Delay between reconnection attempts.
const RECONNECT_DELAY_MS: u32 = 250;
/// Commands timing out in a row before the connection is considered hung and replaced.
pub const TIMEOUTS_BEFORE_RECONNECT: u32 = 3;
/// How long a forced reconnection may block the next one (the client keeps trying anyway).
const FORCED_RECONNECT_WAIT: Duration = Duration::from_secs(30);
/// How long a cluster master may take to answer the health check's `CLUSTER INFO`: well
/// inside the API's 2 s bound on the whole check.
const MASTER_CHECK_TIMEOUT: Duration = Duration::from_millis(1_000);
/// How often a read refused by a Cluster redirection is sent in all, and the pause before its
/// first resend (doubling after each): about 1.6 s in all, for an ASK to outlast a slot moving.
const READ_ATTEMPTS: u32 = 7;
const READ_RESEND_PAUSE: Duration = Duration::from_millis(25);
/// Idle time before TCP keepalive probes start, and their interval.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Connection bookkeeping shared by all clones of a store and its event handlers.
#[derive(Debug, Default)]
pub(super) struct ConnState {
    /// Whether the client is connected, as last reported (to log once per outage).
    up: AtomicBool,
    /// Whether the current outage was already logged (also covers "down at startup").
    reported: AtomicBool,
    /// Commands that timed out in a row; any success resets it.
    timeouts: AtomicU32,
    /// Whether a forced reconnection is under way.
    forcing: AtomicBool,
    /// Whether the client was ever connected: later connections are reconnections.
    was_up: AtomicBool,
    /// Reconnections: `valkey.connected` after the first (`servicekit_valkey_reconnects_total`).
    pub(super) reconnects: prometheus_client::metrics::counter::Counter,
}

/// Builds the client for `url`, starts connecting and waits at most [`COMMAND_TIMEOUT`] for the
/// first connection. Only errors that can never heal fail; an unreachable server is logged and
/// connected to in the background.
pub(super) async fn open(url: &str) -> Result<(Client, Arc<ConnState>), StoreError> {
    let scheme = url.split("://").next().unwrap_or("");
    if !SCHEMES.contains(&scheme) || !url.contains("://") {
        return Err(StoreError::Config(format!(
            "invalid Valkey URL {:?}: the scheme must be one of {}",
            crate::redact::url(url),
            SCHEMES.join(", ")
        )));
    }
    let seeded = seeds_as_query(url)?;
    let mut config = Config::from_url(&seeded).map_err(|e| {
        StoreError::Config(format!(
            "invalid Valkey URL {:?}: {e}",
            crate::redact::url(url)
        ))
    })?;
    // Find the topology through any node last seen serving slots, not only the seeds: a
    // client whose seed nodes died would otherwise never reconnect (issue 11).
    if config.server.is_clustered() {
        config
            .server
            .set_cluster_discovery_policy(ClusterDiscoveryPolicy::UseCache)
            .map_err(|e| StoreError::Config(format!("invalid Valkey configuration: {e}")))?;
    }
    // Retry the first connection like any later one instead of failing at once.
    config.fail_fast = false;
    let connection = ConnectionConfig {
        connection_timeout: COMMAND_TIMEOUT,
        internal_command_timeout: COMMAND_TIMEOUT,
        // Never re-send a command after a reconnection: scripts are not idempotent, and a
        // caller that got an error must not see the write happen twice.
        max_command_attempts: 1,
        // Never follow a MOVED or ASK redirection inside the client: the command fails (503,
        // which callers retry) and a MOVED refreshes the slot map first, so the retry goes to
        // the right master. fred 10.1 follows an ASK by writing ASKING on a connection with
        // other commands in flight and taking the next reply as ASKING's: another command
        // gets "OK" and its own reply goes to the wrong caller (seen while a slot migrated
        // under load). With no attempt to spare it also ends its router task for good.
        max_redirections: 0,
        unresponsive: UnresponsiveConfig {
            max_timeout: Some(COMMAND_TIMEOUT * 2),
            interval: Duration::from_millis(500),
        },
        tcp: TcpConfig {
            keepalive: Some(keepalive()),
            ..TcpConfig::default()
        },
        ..ConnectionConfig::default()
    };
    let performance = PerformanceConfig {
        default_command_timeout: COMMAND_TIMEOUT,
        ..PerformanceConfig::default()
    };
    let client = Builder::from_config(config)
        .set_connection_config(connection)
        .set_performance_config(performance)
        .set_policy(ReconnectPolicy::new_constant(0, RECONNECT_DELAY_MS))
        .build()
        .map_err(|e| StoreError::Config(format!("invalid Valkey configuration: {e}")))?;

    let conn = Arc::new(ConnState::default());
    watch_connection(&client, &conn);
    let _task = client.connect();
    match tokio::time::timeout(COMMAND_TIMEOUT, client.wait_for_connect()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if matches!(e.kind(), ErrorKind::Config | ErrorKind::Url) => {
            let _ = client.quit().await;
            return Err(StoreError::Config(format!(
                "cannot use Valkey at {}: {e}",
                crate::redact::url(url)
            )));
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, detail = "Valkey not reachable yet; retrying in the background", "valkey.disconnected");
        }
        Err(_) => {
            tracing::warn!(
                detail = "Valkey not reachable yet; retrying in the background",
                "valkey.disconnected"
            );
        }
    }
    Ok((client, conn))
}
/// Rewrites the comma-separated seed list of a cluster URL
/// (`redis-cluster://[auth@]h1:p1,h2:p2/...`) into the `node=` query form fred reads
/// (`redis-cluster://[auth@]h1:p1/...?node=h2:p2`). Other URLs pass unchanged.
fn seeds_as_query(url: &str) -> Result<String, StoreError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(url.to_owned());
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (auth, hosts) = match authority.rsplit_once('@') {
        Some((auth, hosts)) => (Some(auth), hosts),
        None => (None, authority),
    };
    if !hosts.contains(',') {
        return Ok(url.to_owned());
    }
    if !scheme.ends_with("-cluster") {
        return Err(StoreError::Config(format!(
            "invalid Valkey URL {:?}: several hosts need a cluster scheme (redis-cluster://)",
            crate::redact::url(url)
        )));
    }
    let mut hosts = hosts.split(',');
    let first = hosts.next().unwrap_or_default();
    let others: Vec<&str> = hosts.collect();
    if std::iter::once(first)
        .chain(others.iter().copied())
        .any(|h| h.is_empty() || !h.contains(':'))
    {
        return Err(StoreError::Config(format!(
            "invalid Valkey URL {:?}: every seed node needs host:port",
            crate::redact::url(url)
        )));
    }
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (tail, None),
    };
    let mut out = format!("{scheme}://");
    if let Some(auth) = auth {
        out.push_str(auth);
        out.push('@');
    }
    out.push_str(first);
    out.push_str(path);
    out.push('?');
    let nodes: Vec<String> = others.iter().map(|h| format!("node={h}")).collect();
    out.push_str(&nodes.join("&"));
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        out.push('&');
        out.push_str(query);
    }
    Ok(out)
}

impl ValkeyStore {
    /// Maps a command's outcome to the store's, tracking timeouts in a row to replace a hung
    /// connection: fred's own unresponsiveness check measures from the last write, so steady
    /// traffic to a stopped or black-holed server would keep it from ever firing.
    pub(super) fn note<T>(&self, r: Result<T, FredError>) -> Result<T, StoreError> {
        match &r {
            Ok(_) => self.conn.timeouts.store(0, AtomicOrdering::SeqCst),
            Err(e) if matches!(e.kind(), ErrorKind::Timeout) => self.timed_out(),
            Err(_) => {}
        }
        r.map_err(map_err)
    }

    /// [`Self::note`] for a command that only reads, sent again while a Cluster redirection
    /// refuses it (up to [`READ_ATTEMPTS`]). The client follows none itself
    /// (`max_redirections = 0`), so a refused command did not run; a MOVED has already
    /// refreshed the slot map, and an ASK lasts until its slot has moved. Without this, the
    /// first read of a moved slot fails, and a streamed listing is cut off mid-body.
    pub(super) async fn read<T, F, Fut>(&self, mut send: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, FredError>>,
    {
        let mut pause = READ_RESEND_PAUSE;
        for _ in 1..READ_ATTEMPTS {
            match send().await {
                Err(e) if redirected(&e) => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                outcome => return self.note(outcome),
            }
        }
        self.note(send().await)
    }

    fn timed_out(&self) {
        let n = self.conn.timeouts.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        // Only a connection the client believes healthy needs forcing; otherwise it is
        // already reconnecting.
        if n < TIMEOUTS_BEFORE_RECONNECT
            || !self.client.is_connected()
            || self.conn.forcing.swap(true, AtomicOrdering::SeqCst)
        {
            return;
        }
        if self.conn.up.swap(false, AtomicOrdering::SeqCst) {
            self.conn.reported.store(true, AtomicOrdering::SeqCst);
            tracing::warn!(
                timeouts = n,
                detail = "Valkey commands keep timing out; replacing the connection",
                "valkey.disconnected"
            );
        }
        let client = self.client.clone();
        let conn = self.conn.clone();
        tokio::spawn(async move {
            // The outcome does not matter: the client keeps reconnecting on its own.
            let _ = tokio::time::timeout(FORCED_RECONNECT_WAIT, client.force_reconnection()).await;
            conn.timeouts.store(0, AtomicOrdering::SeqCst);
            conn.forcing.store(false, AtomicOrdering::SeqCst);
        });
    }
}

impl ValkeyStore {
    /// Asks every master in the client's slot map for `CLUSTER INFO`, side by side, each
    /// within [`MASTER_CHECK_TIMEOUT`]: a master that does not answer is unreachable, and the
    /// least healthy of the answers is the cluster's state. A master the client has no
    /// connection to counts as unreachable without a command: routing one to it would make
    /// fred reconnect everything.
    pub(super) async fn cluster_health(&self) -> ClusterHealth {
        let masters: Vec<fred::types::config::Server> = self
            .client
            .cached_cluster_state()
            .map(|state| state.unique_primary_nodes())
            .unwrap_or_default();
        let connected = self.client.active_connections();
        let asks: Vec<_> = masters
            .iter()
            .map(|server| {
                let connected = connected.contains(server);
                let client = self.client.clone();
                let server = server.clone();
                tokio::spawn(async move {
                    if !connected {
                        return None;
                    }
                    let node = client.with_cluster_node(server);
                    let info = node.cluster_info::<String>();
                    match tokio::time::timeout(MASTER_CHECK_TIMEOUT, info).await {
                        Ok(Ok(text)) => Some(parse_cluster_info(&text)),
                        _ => None,
                    }
                })
            })
            .collect();
        let mut views = Vec::with_capacity(asks.len());
        for ask in asks {
            views.push(ask.await.ok().flatten());
        }
        let unreachable: Vec<String> = masters
            .iter()
            .zip(&views)
            .filter(|(_, view)| view.is_none())
            .map(|(server, _)| server.to_string())
            .collect();
        let mut health = views
            .into_iter()
            .flatten()
            .min_by_key(|v| {
                (
                    v.state == "ok",
                    u32::MAX - v.slots_fail,
                    v.slots_assigned,
                    v.slots_ok,
                )
            })
            .unwrap_or_else(|| ClusterHealth {
                state: "unknown".to_owned(),
                error: Some("no master answered CLUSTER INFO".to_owned()),
                ..ClusterHealth::default()
            });
        health.masters = masters.iter().map(ToString::to_string).collect();
        health.unreachable = unreachable;
        health
    }
}

/// A second client like `client` (same configuration, policy and timeouts), for the change
/// log's blocking reads. On a cluster its seeds are the masters `client` knows now besides the
/// configured ones: the configured seeds may all have died since start, and a new client has no
/// slot map of its own to fall back on.
pub(super) fn second_client(client: &Client) -> Client {
    let mut config = client.client_config();
    if let fred::types::config::ServerConfig::Clustered { hosts, .. } = &mut config.server {
        let known = client
            .cached_cluster_state()
            .map(|state| state.unique_primary_nodes())
            .unwrap_or_default();
        for server in known {
            if !hosts.contains(&server) {
                hosts.push(server);
            }
        }
    }
    Client::new(
        config,
        Some(client.perf_config()),
        Some(client.connection_config().clone()),
        Some(ReconnectPolicy::new_constant(0, RECONNECT_DELAY_MS)),
    )
}

/// The fields of a `CLUSTER INFO` answer that `/health` reports.
fn parse_cluster_info(text: &str) -> ClusterHealth {
    let mut health = ClusterHealth {
        state: "unknown".to_owned(),
        ..ClusterHealth::default()
    };
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        let number = || value.parse::<u32>().unwrap_or(0);
        match key {
            "cluster_state" => health.state = value.to_owned(),
            "cluster_slots_assigned" => health.slots_assigned = number(),
            "cluster_slots_ok" => health.slots_ok = number(),
            "cluster_slots_pfail" => health.slots_pfail = number(),
            "cluster_slots_fail" => health.slots_fail = number(),
            "cluster_known_nodes" => health.known_nodes = number(),
            "cluster_size" => health.size = number(),
            _ => {}
        }
    }
    health
}

/// TCP keepalive for the Valkey sockets, so an idle connection to a vanished peer is noticed.
fn keepalive() -> TcpKeepalive {
    let keepalive = TcpKeepalive::new().with_time(KEEPALIVE_IDLE);
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "freebsd",
        target_os = "windows"
    ))]
    let keepalive = keepalive.with_interval(KEEPALIVE_INTERVAL);
    keepalive
}

/// Logs connection changes: `valkey.connected` once per (re)connection and `valkey.disconnected`
/// once per outage (not for every failed reconnection attempt).
fn watch_connection(client: &Client, conn: &Arc<ConnState>) {
    {
        let conn = conn.clone();
        client.on_reconnect(move |server| {
            if !conn.up.swap(true, AtomicOrdering::SeqCst) {
                conn.reported.store(false, AtomicOrdering::SeqCst);
                if conn.was_up.swap(true, AtomicOrdering::SeqCst) {
                    conn.reconnects.inc();
                }
                tracing::info!(server = %server, detail = "connected to Valkey", "valkey.connected");
            }
            async { Ok(()) }
        });
    }
    {
        let conn = conn.clone();
        client.on_error(move |(error, server)| {
            let was_up = conn.up.swap(false, AtomicOrdering::SeqCst);
            if was_up || !conn.reported.swap(true, AtomicOrdering::SeqCst) {
                conn.reported.store(true, AtomicOrdering::SeqCst);
                let server = server.map(|s| s.to_string()).unwrap_or_default();
                tracing::warn!(server, error = %error, detail = "lost the connection to Valkey; reconnecting", "valkey.disconnected");
            } else {
                tracing::debug!(error = %error, "Valkey reconnection attempt failed");
            }
            async { Ok(()) }
        });
    }
    let conn = conn.clone();
    client.on_unresponsive(move |server| {
        if conn.up.swap(false, AtomicOrdering::SeqCst) {
            conn.reported.store(true, AtomicOrdering::SeqCst);
            tracing::warn!(server = %server, detail = "Valkey connection unresponsive; reconnecting", "valkey.disconnected");
        }
        async { Ok(()) }
    });
}

/// Maps a client error: anything about reaching the server is `Unavailable`, anything about
/// what it answered is `Corrupt`.
pub(super) fn map_err(e: FredError) -> StoreError {
    match e.kind() {
        ErrorKind::Parse | ErrorKind::Protocol | ErrorKind::NotFound => {
            StoreError::Corrupt(e.to_string())
        }
        ErrorKind::InvalidArgument if e.details().starts_with("WRONGTYPE") => {
            StoreError::Corrupt(e.to_string())
        }
        // A script's verdict on a record that does not follow the layout.
        _ if e.details().starts_with("CORRUPT") => StoreError::Corrupt(e.to_string()),
        // A script's verdict on a write of a leased record without its lease.
        _ if e.details().starts_with("FORBIDDEN") => StoreError::Forbidden,
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// Whether `e` means the server did not answer (as opposed to answering with a refusal).
pub(super) fn no_answer(e: &FredError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Timeout | ErrorKind::IO | ErrorKind::Canceled
    )
}

/// Whether `e` is a Cluster redirection (MOVED or ASK) the client refused to follow: the
/// command did not run. fred reports it as a routing error ("Too many redirections."); its
/// other routing errors (no connection for the slot) also come before anything was sent.
fn redirected(e: &FredError) -> bool {
    matches!(e.kind(), ErrorKind::Routing)
}

/// Checks that a command was queued in a pipeline.
pub(super) fn queue(r: Result<(), FredError>) -> Result<(), StoreError> {
    r.map_err(map_err)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn comma_separated_seeds_become_node_parameters() {
        for (given, wanted) in [
            (
                "redis-cluster://10.0.0.1:7000,10.0.0.2:7001,h3:7002",
                "redis-cluster://10.0.0.1:7000?node=10.0.0.2:7001&node=h3:7002",
            ),
            (
                "valkey-cluster://u:p%40ss@a:1,b:2/?foo=bar",
                "valkey-cluster://u:p%40ss@a:1/?node=b:2&foo=bar",
            ),
            ("redis-cluster://a:1", "redis-cluster://a:1"),
            ("redis://a:1/0", "redis://a:1/0"),
            (
                "redis-cluster://a:1?node=b:2",
                "redis-cluster://a:1?node=b:2",
            ),
        ] {
            assert_eq!(seeds_as_query(given).expect(given), wanted);
        }
        for bad in [
            "redis://a:1,b:2",
            "redis-cluster://a:1,,b:2",
            "redis-cluster://a:1,b",
            "redis-cluster://a,b:2",
            "redis-cluster://:hunter2@a:1,b",
        ] {
            let err = seeds_as_query(bad).expect_err(bad).to_string();
            assert!(!err.contains(SECRET), "{err}");
        }
    }

    const SECRET: &str = "hunter2";

    /// Every way `connect` can fail on a URL, with a password in it: the error names the URL
    /// but never the password.
    #[tokio::test]
    async fn connect_errors_never_show_the_password() {
        for url in [
            // Not an accepted scheme (TLS is not compiled in, sentinel is not supported).
            "rediss://:hunter2@127.0.0.1:6379",
            "redis-sentinel://:hunter2@127.0.0.1:1?sentinelPassword=hunter2",
            // fred rejects it: no port number.
            "redis://user:hunter2@127.0.0.1:notaport",
            "redis-cluster://:hunter2@/0",
        ] {
            let err = ValkeyStore::connect(url, "p:", Duration::from_secs(60))
                .await
                .expect_err(url)
                .to_string();
            assert!(!err.contains(SECRET), "{url}: {err}");
            assert!(
                err.contains("***"),
                "{url}: the error should name the URL: {err}"
            );
        }
    }
}
