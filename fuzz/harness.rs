//! One fuzz case: bytes in, one request to the orchestrator's handler, its answer checked.
//!
//! Shared by the libFuzzer target (`fuzz_targets/handler.rs`, run by hand with cargo-fuzz)
//! and the property test `tests/properties.rs`, which runs it on every CI build. The bytes
//! choose a method, a route (known, unknown, with a live id, a random id or junk), a query,
//! headers and a body (junk or a registration shaped like the real thing), so most cases
//! get past routing and parsing into the handlers.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use arbitrary::{Result as ArbResult, Unstructured};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use servicekit::protocol::{Problem, RegisterRequest, ServiceInfo, PROBLEM_JSON};
use servicekit_orchestrator::api::{validate_registration, Api};
use servicekit_orchestrator::store::{MemoryStore, Store};

/// Sends the request the bytes describe; `Err` says what about the answer was wrong.
pub async fn check(data: &[u8]) -> Result<(), String> {
    let store = MemoryStore::new(Duration::from_secs(30));
    let seed = validate_registration(RegisterRequest {
        id: None,
        url: "http://seed.example:8000".into(),
        info: ServiceInfo::new("seed"),
        lease: None,
        check: None,
    })
    .map_err(|e| format!("seed registration rejected: {e:?}"))?;
    let live = store
        .register(seed)
        .await
        .map_err(|e| format!("seed registration failed: {e}"))?
        .record
        .id;
    let api = Api::new(
        store,
        None,
        None,
        64 * 1024,
        SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
    );
    let Ok(req) = request(&mut Unstructured::new(data), &live.to_string()) else {
        return Ok(());
    };
    let method = req.method().clone();
    let path = req.uri().to_string();
    let response = api.handle(req).await;
    let status = response.status();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{method} {path}: body failed: {e}"))?
        .to_bytes();
    let what = || {
        format!(
            "{method} {path} -> {status} {}",
            String::from_utf8_lossy(&body)
        )
    };
    if status.is_server_error() {
        return Err(format!("server error: {}", what()));
    }
    if method == Method::HEAD {
        return if body.is_empty() {
            Ok(())
        } else {
            Err(format!("HEAD with a body: {}", what()))
        };
    }
    if status.is_client_error() {
        if content_type != PROBLEM_JSON {
            return Err(format!(
                "error without problem+json ({content_type:?}): {}",
                what()
            ));
        }
        let problem: Problem = serde_json::from_slice(&body)
            .map_err(|e| format!("unreadable problem ({e}): {}", what()))?;
        if problem.status != status.as_u16() {
            return Err(format!("problem status differs: {}", what()));
        }
    } else if status != StatusCode::NO_CONTENT {
        serde_json::from_slice::<serde_json::Value>(&body)
            .map_err(|e| format!("success that is not JSON ({e}): {}", what()))?;
    }
    Ok(())
}

fn request(u: &mut Unstructured<'_>, live: &str) -> ArbResult<Request<Full<Bytes>>> {
    let id = match u.int_in_range(0..=2)? {
        0 => live.to_owned(),
        1 => ulid::Ulid(u.arbitrary()?).to_string(),
        _ => escape(u.arbitrary::<&str>()?),
    };
    // A route, and the method it is meant for: most cases use that method, so they get past
    // routing into the handlers; the rest try any method on any route.
    let (mut path, natural) = match u.int_in_range(0..=5)? {
        0 => ("/health".to_owned(), Method::GET),
        1 => ("/services".to_owned(), Method::GET),
        2 => ("/services/$register".to_owned(), Method::POST),
        3 => (format!("/services/{id}"), Method::DELETE),
        4 => (format!("/services/{id}/$ping"), Method::PUT),
        _ => (format!("/{}", escape(u.arbitrary::<&str>()?)), Method::GET),
    };
    let method = match u.int_in_range(0..=11)? {
        0 => Method::GET,
        1 => Method::HEAD,
        2 => Method::POST,
        3 => Method::PUT,
        4 => Method::DELETE,
        5 => Method::PATCH,
        6 => Method::from_bytes(u.arbitrary::<&str>()?.as_bytes())
            .map_err(|_| arbitrary::Error::IncorrectFormat)?,
        _ => natural,
    };
    if u.ratio(1, 3)? {
        let key = match u.int_in_range(0..=4)? {
            0 => "display_name".to_owned(),
            1 => "url".to_owned(),
            2 => format!("info.{}", escape(u.arbitrary::<&str>()?)),
            _ => escape(u.arbitrary::<&str>()?),
        };
        path = format!("{path}?{key}={}", escape(u.arbitrary::<&str>()?));
    }
    let mut builder = Request::builder().method(method).uri(path);
    let content_type = match u.int_in_range(0..=5)? {
        0 => None,
        1 => Some("text/plain"),
        2 => Some(u.arbitrary::<&str>()?),
        3 => Some("application/json; charset=utf-8"),
        _ => Some("application/json"),
    };
    if let Some(content_type) = content_type {
        builder = builder.header(http::header::CONTENT_TYPE, content_type);
    }
    let body = if u.ratio(3, 4)? {
        let mut info = serde_json::Map::new();
        let name = match u.int_in_range(0..=2)? {
            0 => "svc".to_owned(),
            _ => u.arbitrary::<String>()?,
        };
        info.insert("display_name".into(), name.into());
        if u.arbitrary()? {
            info.insert(u.arbitrary::<String>()?, u.arbitrary::<String>()?.into());
        }
        let mut body = serde_json::Map::new();
        let url = match u.int_in_range(0..=3)? {
            0 => "http://seed.example:8000".to_owned(),
            1 => u.arbitrary::<String>()?,
            _ => format!("http://{}.example", escape(u.arbitrary::<&str>()?)),
        };
        body.insert("url".into(), url.into());
        body.insert("info".into(), info.into());
        if u.arbitrary()? {
            body.insert("id".into(), id.into());
        }
        serde_json::Value::Object(body).to_string().into_bytes()
    } else {
        u.arbitrary::<&[u8]>()?.to_vec()
    };
    builder
        .body(Full::new(Bytes::from(body)))
        .map_err(|_| arbitrary::Error::IncorrectFormat)
}

/// Percent-encodes everything outside the unreserved set, so any text fits in a URI.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
