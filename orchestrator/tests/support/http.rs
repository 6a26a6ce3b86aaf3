//! A small HTTP client for the tests: real sockets, raw status, headers and body.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// What came back.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON, panicking with the body text when it is not.
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not the expected JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts a problem+json answer with `status` and `type`, and returns the problem.
    pub fn assert_problem(&self, status: u16, kind: &str) -> Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(
            self.headers
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/problem+json")
        );
        let p: Value = self.json();
        assert_eq!(p["type"], kind, "problem: {p}");
        assert_eq!(p["status"], status, "problem: {p}");
        assert!(
            p["title"].as_str().is_some_and(|t| !t.is_empty()),
            "problem: {p}"
        );
        assert!(
            p["detail"].as_str().is_some_and(|t| !t.is_empty()),
            "problem: {p}"
        );
        p
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A client bound to one base URL, or spreading its requests over several replicas in turn.
#[derive(Clone)]
pub struct Api {
    base: String,
    /// Where requests go, in turn (just `base` unless [`Api::balanced`]).
    targets: Arc<[String]>,
    next: Arc<AtomicUsize>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    pub fn new(base: impl Into<String>) -> Self {
        let base = base.into();
        Api {
            targets: Arc::from(vec![base.clone()]),
            base,
            next: Arc::default(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// A load balancer in front of `bases` (orchestrator replicas): each request goes to the
    /// next one in turn, with the first one's `Host` (unless the request names its own), so
    /// the URLs in the answers are the same whichever replica answered. `base()` is the first.
    pub fn balanced(bases: Vec<String>) -> Self {
        let mut api = Api::new(bases.first().cloned().expect("at least one replica"));
        api.targets = Arc::from(bases);
        api
    }

    /// A client that opens a fresh connection for every request and keeps none, for tests
    /// that count the server's connections.
    pub fn unpooled(base: impl Into<String>) -> Self {
        Api {
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http(),
            ..Api::new(base)
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request with optional body and headers.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Reply {
        self.try_send(method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A GET whose failure to get an answer is the caller's to judge.
    pub async fn try_get(&self, path: &str) -> Result<Reply, String> {
        self.try_send(Method::GET, path, &[], None).await
    }

    /// Like `send`, but a request that got no (whole) answer is an error, not a panic.
    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Reply, String> {
        let target = &self.targets[self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len()];
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{target}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if self.targets.len() > 1 && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            let host = self.base.split("://").nth(1).unwrap_or(&self.base);
            req = req.header("host", host.trim_end_matches('/'));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("valid request");
        let res = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("request sent: {e:?}"))?;
        let (parts, body) = res.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body read: {e:?}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, &[], None).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(Method::DELETE, path, &[], None).await
    }

    pub async fn put(&self, path: &str) -> Reply {
        self.send(Method::PUT, path, &[], None).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        let bytes = serde_json::to_vec(body).expect("json");
        self.send(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            Some(bytes),
        )
        .await
    }

    /// Registers `url` as `name` and returns the answer's JSON (any 2xx).
    pub async fn register(&self, url: &str, name: &str) -> Value {
        let r = self
            .post_json(
                "/services/$register",
                &serde_json::json!({"url": url, "info": {"display_name": name}}),
            )
            .await;
        assert!(r.status.is_success(), "register failed: {r:?}");
        r.json()
    }
}

impl Api {
    /// Every id of `GET /services?{query}`, read in pages of `limit` through `next_cursor`.
    /// Checks each page's shape on the way: `count` is the page's length, at most `limit`,
    /// and `next_cursor` is there exactly while more remain.
    pub async fn walk_pages(&self, query: &str, limit: usize) -> Vec<String> {
        let mut ids = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/services?limit={limit}");
            if !query.is_empty() {
                path.push('&');
                path.push_str(query);
            }
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let r = self.get(&path).await;
            assert_eq!(r.status, 200, "{path}: {r:?}");
            let page: Value = r.json();
            let services = page["services"].as_array().expect("services");
            assert_eq!(page["count"], services.len(), "{path}: {page}");
            assert!(services.len() <= limit, "{path}: {page}");
            ids.extend(
                services
                    .iter()
                    .map(|s| s["id"].as_str().expect("id").to_owned()),
            );
            match page.get("next_cursor") {
                Some(next) => {
                    assert_eq!(services.len(), limit, "a short page with a cursor: {page}");
                    cursor = Some(next.as_str().expect("cursor text").to_owned());
                }
                None => return ids,
            }
        }
    }

    /// The ids of the streamed `GET /services?{query}`, checking it is one JSON document
    /// whose `count` matches and that it came without a `Content-Length` (streamed).
    pub async fn list_streamed(&self, query: &str) -> Vec<String> {
        let r = self.get(&format!("/services?{query}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("content-length"), None, "not streamed");
        let list: servicekit::protocol::ListResponse = r.json();
        assert_eq!(list.count, list.services.len());
        assert_eq!(list.next_cursor, None);
        list.services.iter().map(|s| s.id.to_string()).collect()
    }
}
