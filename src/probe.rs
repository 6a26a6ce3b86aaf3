//! The readiness probe: is the local server answering yet?
//!
//! A service registers only once it can be called, so the orchestrator never hands out an
//! address that refuses connections. Without a health path, an accepted TCP connection on
//! loopback is enough (the choice for gRPC servers); with one, a 2xx to an HTTP/1.1 `GET`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// Bound of one probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Probes `127.0.0.1:<port>`, or `GET`s `<health_path>` there.
pub(crate) struct Probe {
    target: String,
    http: Option<Client<HttpConnector, Empty<Bytes>>>,
}

impl Probe {
    pub(crate) fn new(port: u16, health_path: Option<&str>) -> Probe {
        match health_path {
            // One client for all probes: it keeps its connection across polls.
            Some(path) => Probe {
                target: format!("http://127.0.0.1:{port}{path}"),
                http: Some(Client::builder(TokioExecutor::new()).build_http()),
            },
            None => Probe {
                target: format!("127.0.0.1:{port}"),
                http: None,
            },
        }
    }

    /// A probe that always answers yes, for the lifecycle's unit tests (which run on paused
    /// time, where a real connection could race the clock).
    #[cfg(test)]
    pub(crate) fn always_ready() -> Probe {
        Probe {
            target: String::new(),
            http: None,
        }
    }

    /// What is probed, for messages.
    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// Whether the server answers now.
    pub(crate) async fn answers(&self) -> bool {
        #[cfg(test)]
        if self.target.is_empty() {
            return true;
        }
        match &self.http {
            None => matches!(
                tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&self.target))
                    .await,
                Ok(Ok(_))
            ),
            Some(client) => {
                let Ok(uri) = self.target.parse::<http::Uri>() else {
                    return false;
                };
                matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, client.get(uri)).await,
                    Ok(Ok(res)) if res.status().is_success()
                )
            }
        }
    }
}
