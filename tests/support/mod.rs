//! Helpers for the layer's integration tests: a real orchestrator from the workspace started
//! in-process, real services on loopback sockets, and the orchestrator tests' HTTP client and
//! Valkey process helpers (shared, not copied).

#![allow(dead_code)]

#[path = "../../orchestrator/tests/support/cluster.rs"]
pub mod cluster;
#[path = "../../orchestrator/tests/support/http.rs"]
pub mod http;
pub mod process;
#[path = "../../orchestrator/tests/support/replicas.rs"]
pub mod replicas;
#[path = "../../orchestrator/tests/support/tls.rs"]
pub mod tls;
#[path = "../../orchestrator/tests/support/valkey.rs"]
pub mod valkey;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use serde_json::Value;
use servicekit::RegistrationLayerBuilder;
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::{self, Running};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The admin key of the orchestrators the tests start.
pub const ADMIN_KEY: &str = "test-admin-key";

/// An in-process orchestrator on the in-memory store (or Valkey when `valkey_url` is given),
/// with [`ADMIN_KEY`] as its admin key.
pub async fn orchestrator(ttl_seconds: u64, valkey_url: Option<String>) -> (Running, http::Api) {
    orchestrator_on(
        "127.0.0.1:0".parse().expect("addr"),
        ttl_seconds,
        valkey_url,
    )
    .await
}

/// Like [`orchestrator`], on a given address.
pub async fn orchestrator_on(
    bind: SocketAddr,
    ttl_seconds: u64,
    valkey_url: Option<String>,
) -> (Running, http::Api) {
    let mut config = Config::for_tests();
    config.bind = bind;
    config.ttl_seconds = ttl_seconds;
    config.key_prefix = format!("test:{}:", ulid::Ulid::new());
    config.valkey_url = valkey_url;
    config.admin_key = Some(ADMIN_KEY.to_owned());
    let running = server::start(config).await.expect("orchestrator starts");
    let api = http::Api::new(running.base_url());
    (running, api)
}

/// The registration endpoint of an orchestrator at `base`.
pub fn register_url(base: &str) -> String {
    format!("{base}/services/$register")
}

/// A builder aimed at `orchestrator_base` for a service on `127.0.0.1:port`, with short
/// retry delays so tests do not wait on production backoff.
pub fn builder(orchestrator_base: &str, port: u16) -> RegistrationLayerBuilder {
    servicekit::RegistrationLayer::builder()
        .orchestrator_url(register_url(orchestrator_base))
        .host("127.0.0.1")
        .port(port)
        .info(&servicekit::ServiceInfo::new("test-service"))
        .retry_delay(Duration::from_millis(50))
        .timeout(Duration::from_secs(2))
}

/// A loopback port held by this test but not listening: connections to it are refused, and
/// no other test can take it meanwhile (unlike a port found free and released). `listen()`
/// turns it into a listener later.
pub struct ReservedPort {
    socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl ReservedPort {
    pub fn new() -> ReservedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let port = socket.local_addr().expect("address").port();
        ReservedPort { socket, port }
    }

    /// `http://127.0.0.1:<port>`: an address where nothing answers.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn listen(self) -> TcpListener {
        self.socket.listen(1024).expect("listen")
    }
}

/// A free loopback port: bound, then released. Only for a server that must come back on the
/// same address after a restart; anything else uses [`ReservedPort`].
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A served axum app; `stop` triggers the user's shutdown signal.
pub struct Served {
    pub port: u16,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<std::io::Result<()>>,
}

impl Served {
    /// Fires the shutdown signal.
    pub fn signal(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Fires the shutdown signal and waits for the server to finish.
    pub async fn shutdown(mut self) {
        self.signal();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("server stops")
            .expect("server task")
            .expect("server ran");
    }
}

/// Serves `app` (already layered) on `listener`, with the layer's shutdown hook wired to a
/// oneshot signal.
pub fn serve(listener: TcpListener, app: Router, layer: &servicekit::RegistrationLayer) -> Served {
    let port = listener.local_addr().expect("addr").port();
    let (stop, stopped) = oneshot::channel::<()>();
    let hook = layer.shutdown_on(async move {
        let _ = stopped.await;
    });
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(hook)
            .await
    });
    Served {
        port,
        stop: Some(stop),
        task,
    }
}

/// The plain test app (`GET /`) served on a free port with a registration layer from
/// `builder(base, port)` adjusted by `configure`; returns the layer, the server and its URL.
pub async fn serve_app(
    base: &str,
    configure: impl FnOnce(RegistrationLayerBuilder) -> RegistrationLayerBuilder,
) -> (servicekit::RegistrationLayer, Served, String) {
    let listener = listener().await;
    let port = listener.local_addr().expect("addr").port();
    let layer = configure(builder(base, port)).build().expect("config");
    let app = Router::new()
        .route("/", axum::routing::get(|| async { "hello" }))
        .layer(layer.clone());
    let served = serve(listener, app, &layer);
    (layer, served, format!("http://127.0.0.1:{port}"))
}

/// Binds a loopback listener on a free port.
pub async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

/// Polls `check` until it returns `Some`, failing with `what` after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The orchestrator's records for `url`.
pub async fn entries_for(api: &http::Api, url: &str) -> Vec<Value> {
    let r = api.get(&format!("/services?url={url}")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v: Value = r.json();
    v["services"].as_array().cloned().unwrap_or_default()
}

/// Waits until exactly one entry for `url` exists and returns it.
pub async fn registered(api: &http::Api, url: &str, within: Duration) -> Value {
    eventually(&format!("{url} to be registered"), within, || async {
        let entries = entries_for(api, url).await;
        assert!(entries.len() <= 1, "one URL, one entry: {entries:?}");
        entries.into_iter().next()
    })
    .await
}

/// A forwarding proxy in front of a real orchestrator that delays requests of one method,
/// to hold a registration call open on the wire while a test looks at the service.
pub struct DelayProxy {
    pub base: String,
    task: JoinHandle<()>,
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DelayProxy {
    pub async fn start(target: &str, method: axum::http::Method, delay: Duration) -> DelayProxy {
        use http_body_util::{BodyExt, Full};
        use hyper::service::service_fn;
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::{TokioExecutor, TokioIo};

        let listener = listener().await;
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let target = target.to_owned();
        let client: Client<_, Full<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (client, target, method) = (client.clone(), target.clone(), method.clone());
                let service = service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
                    let (client, target, method) = (client.clone(), target.clone(), method.clone());
                    async move {
                        if req.method() == method {
                            tokio::time::sleep(delay).await;
                        }
                        let (mut parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let path = parts
                            .uri
                            .path_and_query()
                            .map(|p| p.as_str())
                            .unwrap_or("/");
                        parts.uri = format!("{target}{path}").parse().expect("uri");
                        let res = client
                            .request(axum::http::Request::from_parts(parts, Full::new(body)))
                            .await
                            .expect("orchestrator answers");
                        let (parts, body) = res.into_parts();
                        let body = body.collect().await.expect("body").to_bytes();
                        Ok::<_, hyper::Error>(axum::http::Response::from_parts(
                            parts,
                            Full::new(body),
                        ))
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        DelayProxy { base, task }
    }
}
