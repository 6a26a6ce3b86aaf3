//! Accepting connections, the background sweeper, and graceful shutdown.
//!
//! The binary and the tests start the orchestrator the same way, through [`start`], so the
//! tests exercise the real accept loop over real sockets. Shutdown stops accepting at once,
//! lets in-flight requests finish, and only then returns.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::api::Api;
use crate::config::Config;
use crate::store::{MemoryStore, Store, StoreError, ValkeyStore};

/// How long shutdown waits for in-flight requests before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send request headers (HTTP/1).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// A running orchestrator.
pub struct Running {
    local_addr: SocketAddr,
    store_kind: &'static str,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Base URL for clients on this machine, e.g. `http://127.0.0.1:9000`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// `"memory"` or `"valkey"`.
    pub fn store_kind(&self) -> &'static str {
        self.store_kind
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
    let (store_kind, task) = match &config.valkey_url {
        Some(url) => {
            let store = ValkeyStore::connect(url, &config.key_prefix, ttl).await?;
            log_start(&config, local_addr, "valkey");
            (
                "valkey",
                spawn_server(&config, local_addr, listener, store, stop),
            )
        }
        None => {
            log_start(&config, local_addr, "memory");
            let store = MemoryStore::new(ttl);
            (
                "memory",
                spawn_server(&config, local_addr, listener, store, stop),
            )
        }
    };
    Ok(Running {
        local_addr,
        store_kind,
        shutdown,
        task,
    })
}

fn log_start(config: &Config, local_addr: SocketAddr, store: &str) {
    tracing::info!(
        bind = %local_addr,
        store,
        ttl_seconds = config.ttl_seconds,
        public_url = config.public_url.as_deref().unwrap_or("(from Host header)"),
        registration_key = config.required_key().is_some(),
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
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let api = Arc::new(Api::new(
        store,
        config.public_url.clone(),
        config.required_key().map(str::to_owned),
        config.max_body_bytes,
        local_addr,
    ));
    let sweeper = tokio::spawn(sweep_forever(api.clone(), stop.clone()));
    let connections = Arc::new(Semaphore::new(config.max_connections as usize));
    tokio::spawn(async move {
        accept_loop(listener, api, connections, stop).await;
        sweeper.abort();
    })
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
            Ok(n) => tracing::debug!(removed = n, "store.swept"),
            Err(e) => tracing::debug!(error = %e, "store.sweep_failed"),
        }
    }
}

async fn accept_loop<S: Store>(
    listener: TcpListener,
    api: Arc<Api<S>>,
    connections: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
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
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let api = api.clone();
            async move {
                // The per-request line is debug-level; skip its allocations when it is off.
                if !tracing::enabled!(tracing::Level::DEBUG) {
                    return Ok::<_, Infallible>(api.handle(req).await);
                }
                let started = Instant::now();
                let method = req.method().clone();
                let path = req.uri().path().to_owned();
                let response = api.handle(req).await;
                tracing::debug!(%peer, %method, %path, status = response.status().as_u16(),
                    micros = started.elapsed().as_micros() as u64, "request");
                Ok(response)
            }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("orchestrator.draining");
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?DRAIN_TIMEOUT, "in-flight requests did not finish; closing");
    }
    tracing::info!("orchestrator.stopped");
}
