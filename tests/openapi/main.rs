//! `GET /openapi.json` against the server that serves it: the document is valid OpenAPI 3.1,
//! and real answers of real orchestrators, over real sockets, to every documented path and
//! method (successes and errors) are what the document says: a documented status, a documented
//! media type, the required headers, a body that validates against the documented schema, and
//! each watch-feed event against its event schema. Coverage is asserted too, so an endpoint
//! added to the document (or to the router) without being exercised here fails.
//!
//! `checker.rs` holds the document side (what an answer must be), `feed.rs` reads the watch
//! feed; this file is the cases: which requests, in which order, and the status each must get.

#[path = "../support/mod.rs"]
mod support;

mod checker;
mod feed;

use std::collections::BTreeSet;
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::{self, Running};
use support::http::Api;

use checker::{Checker, Headers, Spec};
use feed::Message;

/// The OpenAPI Initiative's schema of OpenAPI 3.1 documents (see fixtures/README.md).
const META_SCHEMA: &str = include_str!("../fixtures/openapi-3.1-schema.json");

const BROWSER_ACCEPT: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
const REGISTRATION_KEY: &str = "s3cret-registration-key";
/// An id no entry has.
const UNKNOWN_ID: &str = "01JDQ9J4XWAZ3M5S1X2VQ7N8C4";

const JSON: (&str, &str) = ("content-type", "application/json");
const TEXT: (&str, &str) = ("content-type", "text/plain");

const GET: Method = Method::GET;
const HEAD: Method = Method::HEAD;
const PUT: Method = Method::PUT;
const POST: Method = Method::POST;
const DELETE: Method = Method::DELETE;

// ---------------------------------------------------------------------------------------------
// Orchestrators

async fn start(config: Config) -> (Running, Api) {
    let running = server::start(config).await.expect("orchestrator starts");
    let api = Api::new(running.base_url());
    (running, api)
}

async fn served_spec(api: &Api) -> Spec {
    let r = api.get("/openapi.json").await;
    assert_eq!(r.status, 200, "{r:?}");
    Spec::new(r.json())
}

/// `value` as a request body.
fn body(value: Value) -> Option<Vec<u8>> {
    Some(serde_json::to_vec(&value).expect("json"))
}

/// `bytes` as a request body.
fn raw(bytes: &[u8]) -> Option<Vec<u8>> {
    Some(bytes.to_vec())
}

/// A registration of `url` under the display name `name`.
fn registration(url: &str, name: &str) -> Option<Vec<u8>> {
    body(json!({"url": url, "info": {"display_name": name}}))
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn the_served_document_is_valid_openapi_3_1_and_every_schema_compiles() {
    let (running, api) = start(Config::for_tests()).await;
    let spec = served_spec(&api).await;
    running.shutdown().await;

    let meta: Value = serde_json::from_str(META_SCHEMA).expect("the meta-schema is JSON");
    let validator = jsonschema::draft202012::new(&meta).expect("the meta-schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(&spec.doc)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "/openapi.json is not a valid OpenAPI 3.1 document:\n  {}",
        errors.join("\n  ")
    );
    assert_eq!(spec.doc["openapi"], "3.1.0");

    // Every schema under components is a draft 2020-12 schema and compiles with its references.
    let schemas = spec.doc["components"]["schemas"]
        .as_object()
        .expect("components.schemas");
    for (name, schema) in schemas {
        if let Err(e) = jsonschema::draft202012::meta::validate(schema) {
            panic!("components.schemas.{name} is not a draft 2020-12 schema: {e}");
        }
        spec.validator(&json!({ "$ref": format!("#/components/schemas/{name}") }));
    }
    // Every reference anywhere names something, and operation ids are unique.
    let mut references = Vec::new();
    collect_refs(&spec.doc, &mut references);
    for reference in &references {
        spec.resolve(&json!({ "$ref": reference }));
    }
    let mut ids = BTreeSet::new();
    for (path, method) in spec.operations() {
        let id = spec.doc["paths"][&path][&method]["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path} has an operationId"));
        assert!(ids.insert(id.to_owned()), "operationId {id} twice");
    }
    // Every problem type the library knows is documented, and nothing else.
    let documented: BTreeSet<&str> = schemas["ProblemType"]["enum"]
        .as_array()
        .expect("ProblemType enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    use servicekit::protocol::problem_type as t;
    let known: BTreeSet<&str> = [
        t::BAD_REQUEST,
        t::UNAUTHORIZED,
        t::FORBIDDEN,
        t::NOT_FOUND,
        t::METHOD_NOT_ALLOWED,
        t::REQUEST_TIMEOUT,
        t::PAYLOAD_TOO_LARGE,
        t::URI_TOO_LONG,
        t::HEADER_FIELDS_TOO_LARGE,
        t::UNSUPPORTED_MEDIA_TYPE,
        t::LIMIT_EXCEEDED,
        t::STORE_UNAVAILABLE,
        t::INTERNAL,
    ]
    .into();
    assert_eq!(documented, known);
    println!(
        "{} operations, {} component schemas, {} references checked",
        spec.operations().len(),
        schemas.len(),
        references.len()
    );
    // Every event the feed can send has a documented data schema.
    let checker = Checker::new(spec);
    for kind in servicekit::protocol::WatchEventKind::ALL {
        checker.event_schema(kind.as_str());
    }
}

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                out.push(r.clone());
            }
            map.values().for_each(|v| collect_refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// The route patterns the router has: the `route` labels of `Route::pattern` and the page
/// routes in `Route::parse` (read from the source, which has no public list of them).
fn router_patterns() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../orchestrator/src/api.rs");
    let source = std::fs::read_to_string(path).expect("read orchestrator/src/api.rs");
    let mut patterns = BTreeSet::new();
    let body = |start: &str| -> String {
        let from = source
            .find(start)
            .unwrap_or_else(|| panic!("api.rs has {start:?}"));
        // Up to the end of the method (`    }`: both are methods of `impl Route`).
        source[from..]
            .lines()
            .take_while(|l| *l != "    }")
            .collect::<Vec<_>>()
            .join("\n")
    };
    // `Route::Health => "/health",` ...
    for line in body("fn pattern(&self)").lines() {
        if let Some((_, rest)) = line.split_once("=> \"") {
            patterns.insert(rest.split('"').next().unwrap_or_default().to_owned());
        }
    }
    // `Route::Asset(Some(&dashboard::PAGE), "/ui")`, `Route::Slash("../ui", "/ui")` ...
    for line in body("fn parse(path: &str)").lines() {
        for start in ["Route::Asset(", "Route::Slash("] {
            if let Some((_, rest)) = line.split_once(start) {
                if let Some(at) = rest.rfind(", \"/") {
                    let literal = &rest[at + 3..];
                    patterns.insert(literal.split('"').next().unwrap_or_default().to_owned());
                }
            }
        }
    }
    patterns
}

#[tokio::test]
async fn every_route_of_the_router_is_a_documented_path() {
    let (running, api) = start(Config::for_tests()).await;
    let spec = served_spec(&api).await;
    running.shutdown().await;
    let documented: BTreeSet<String> = spec.paths().keys().cloned().collect();
    let patterns = router_patterns();
    assert!(
        patterns.len() >= 12,
        "read too few route patterns from api.rs: {patterns:?}"
    );
    let undocumented: Vec<&String> = patterns.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "routes of the router missing from openapi.json: {undocumented:?}"
    );
    // And the other way round: every documented path is routed, under its own pattern (the
    // slash forms `/ui/` and `/docs/` count under their page's).
    for path in &documented {
        let instance = path.replace("{id}", UNKNOWN_ID).replace("{file}", "x.js");
        let label = servicekit_orchestrator::api::route_label(&instance);
        let expected = match path.strip_suffix('/') {
            Some(page) if !page.is_empty() => page,
            _ => path.as_str(),
        };
        assert_eq!(label, expected, "{path} ({instance}) is routed as {label}");
    }
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    // The orchestrators: one open (an admin key, no registration key), one guarded (a
    // registration key, leases required, tiny limits), one with a short TTL and a fast
    // heartbeat for the watch feed.
    let mut open_config = Config::for_tests();
    open_config.admin_key = Some(support::ADMIN_KEY.into());
    let (open, api) = start(open_config).await;
    let mut guarded_config = Config::for_tests();
    guarded_config.registration_key = Some(REGISTRATION_KEY.into());
    guarded_config.require_lease = true;
    guarded_config.admin_key = Some(support::ADMIN_KEY.into());
    guarded_config.max_watchers = 1;
    guarded_config.max_registrations = 1;
    guarded_config.max_info_bytes = 64;
    guarded_config.max_body_bytes = 2048;
    let (guarded, gapi) = start(guarded_config).await;
    let mut short_config = Config::for_tests();
    short_config.ttl_seconds = 2;
    short_config.watch_tuning.heartbeat = Duration::from_millis(300);
    let (short, sapi) = start(short_config).await;

    let mut c = Checker::new(served_spec(&api).await);

    // ---- /openapi.json
    let r = c.expect(&api, GET, "/openapi.json", &[], None, 200).await;
    let etag = r.header("etag").expect("etag").to_owned();
    c.expect_each(
        &api,
        [
            (GET, "/openapi.json", &[("if-none-match", &etag)], None, 304),
            (POST, "/openapi.json", &[], raw(b"{}"), 405),
        ],
    )
    .await;

    // ---- POST /services/$register
    const REGISTER: &str = "/services/$register";
    let nobody = support::ReservedPort::new();
    let url_a = nobody.url();
    let a = json!({
        "url": format!("{url_a}/"),
        "info": {"display_name": "  Service A ", "version": "1.0.0", "team": "data",
                 "tags": ["x", "y"], "priority": 5},
        "check": {"tcp": true, "interval_seconds": 60, "deregister_critical_after_seconds": 600}
    });
    let r = c.expect(&api, POST, REGISTER, &[JSON], body(a), 201).await;
    let id_a = r.json::<Value>()["id"].as_str().expect("id").to_owned();
    // The known URL again: 200; nulls for absent optional fields, a `+json` type: 201.
    let a_again = json!({"id": id_a, "url": url_a,
        "info": {"display_name": "Service A", "team": "data"},
        "check": {"tcp": true, "interval_seconds": 60}});
    let nulls = json!({"id": 7, "url": "http://127.0.0.1:9/nulls",
        "info": {"display_name": "Nulls", "version": null, "description": null},
        "lease": null, "check": null, "later": true});
    let vnd_json = ("content-type", "application/vnd.x+json");
    c.expect_each(
        &api,
        [
            (POST, REGISTER, &[JSON], body(a_again), 200),
            (POST, REGISTER, &[vnd_json], body(nulls), 201),
        ],
    )
    .await;
    let leased_url = "http://127.0.0.1:9/leased";
    let leased = |url: &str, name: &str| {
        body(json!({"url": url, "info": {"display_name": name}, "lease": true}))
    };
    let new_lease = leased(leased_url, "Leased");
    let r = c.expect(&api, POST, REGISTER, &[], new_lease, 201).await;
    let entry: Value = r.json();
    let id_leased = entry["id"].as_str().expect("id").to_owned();
    let token = entry["lease_token"]
        .as_str()
        .expect("a lease token")
        .to_owned();
    let with_token = ("x-lease-token", token.as_str());
    // Re-registered with its token: 200, and the token is repeated.
    let again = || registration(leased_url, "Leased");
    let r = c
        .expect(&api, POST, REGISTER, &[JSON, with_token], again(), 200)
        .await;
    assert_eq!(
        r.json::<Value>()["lease_token"],
        token.as_str(),
        "the token is repeated"
    );
    c.expect(&api, POST, REGISTER, &[JSON], again(), 403).await; // without the token
    let info = json!({"display_name": "A"});
    let invalid = [
        raw(b"{not json"),
        raw(b"[]"),
        registration("ftp://a", "A"),
        registration("http://user:pw@a", "A"),
        registration("http://a#f", "A"),
        registration("http://a", "   "),
        registration("http://a", "a\u{7}b"),
        registration("http://a", "a\u{202e}b"),
        body(json!({"url": "http://a"})),
        body(json!({"url": "http://a", "info": {"display_name": "A", "version": 5}})),
        body(json!({"url": "http://a", "info": info, "check": {"http": "/h", "bogus": 1}})),
        body(json!({"url": "http://a", "info": info, "check": {"tcp": true, "grpc": ""}})),
        body(json!({"url": "http://a", "info": info, "check": {"http": "http://elsewhere/h"}})),
        body(json!({"url": "http://a", "info": info,
                    "check": {"tcp": true, "interval_seconds": 0}})),
    ];
    c.expect_each(&api, invalid.map(|b| (POST, REGISTER, &[JSON][..], b, 400)))
        .await;
    c.expect_each(
        &api,
        [
            (POST, REGISTER, &[TEXT], registration("http://a", "A"), 415),
            (POST, REGISTER, &[JSON], Some(vec![b' '; 70_000]), 413),
            (GET, REGISTER, &[], None, 405),
            (PUT, REGISTER, &[], None, 405),
            (DELETE, REGISTER, &[], None, 405),
        ],
    )
    .await;
    // Guarded: the registration key, required leases, the limits.
    let key = ("x-service-key", REGISTRATION_KEY);
    let bearer = format!("Bearer {REGISTRATION_KEY}");
    let bearer = ("authorization", bearer.as_str());
    let keyed: Headers = &[JSON, key];
    c.expect_each(
        &gapi,
        [
            (POST, REGISTER, &[JSON], registration("http://g", "G"), 401),
            // A lease is required.
            (POST, REGISTER, keyed, registration("http://g", "G"), 400),
        ],
    )
    .await;
    let g = leased("http://g", "G");
    let r = c
        .expect(&gapi, POST, REGISTER, &[JSON, bearer], g, 201)
        .await;
    let entry: Value = r.json();
    let id_g = entry["id"].as_str().expect("id").to_owned();
    let token_g = entry["lease_token"].as_str().expect("token").to_owned();
    let with_token_g = ("x-lease-token", token_g.as_str());
    let big_name = "G".repeat(100);
    c.expect_each(
        &gapi,
        [
            // Info over --max-info-bytes.
            (POST, REGISTER, keyed, leased("http://g", &big_name), 413),
            // A new URL in a full registry.
            (POST, REGISTER, keyed, leased("http://h", "H"), 507),
            // A body over --max-body-bytes.
            (POST, REGISTER, keyed, Some(vec![b' '; 3000]), 413),
        ],
    )
    .await;

    // ---- PUT /services/{id}/$ping
    let ping = |id: &str| format!("/services/{id}/$ping");
    let (ping_a, ping_leased) = (ping(&id_a), ping(&id_leased));
    let as_admin = ("x-admin-key", support::ADMIN_KEY);
    let form = ("content-type", "application/x-www-form-urlencoded");
    let report = br#"{"status":"warning","output":"slow","later":1}"#;
    c.expect_each(
        &api,
        [
            (PUT, ping_a.as_str(), &[], None, 200),
            // curl's empty ping.
            (PUT, &ping_a, &[form], Some(Vec::new()), 200),
            (PUT, &ping_a, &[JSON], raw(b"null"), 200),
            (PUT, &ping_a, &[JSON], raw(report), 200),
            (PUT, &ping_a, &[JSON], raw(br#"{"status":"healthy"}"#), 400),
            (PUT, &ping_a, &[JSON], raw(b"[1]"), 400),
            (PUT, &ping_a, &[JSON], raw(b"{"), 400),
            (PUT, &ping_a, &[JSON], raw(br#"{"output":"x"}"#), 400),
            (PUT, &ping_a, &[TEXT], raw(b"alive"), 415),
            (PUT, &ping_a, &[JSON], Some(vec![b' '; 70_000]), 413),
            (PUT, &ping(UNKNOWN_ID), &[], None, 404),
            (PUT, &ping("not-a-ulid"), &[], None, 404),
            (PUT, &ping("01jdq9j4xwaz3m5s1x2vq7n8c4"), &[], None, 404),
            (PUT, &ping_leased, &[], None, 403),
            (PUT, &ping_leased, &[with_token], None, 200),
            (PUT, &ping_leased, &[as_admin], None, 200),
        ],
    )
    .await;
    c.expect_each(
        &gapi,
        [
            (PUT, ping(&id_g), &[], None, 401),
            (PUT, ping(&id_g), &[key, with_token_g], None, 200),
        ],
    )
    .await;
    c.expect_each(
        &api,
        [
            (GET, &ping_a, &[], None, 405),
            (POST, &ping_a, &[], None, 405),
        ],
    )
    .await;

    // ---- GET /services
    let listings = [
        "",
        "?display_name=Service%20A",
        &format!("?url={url_a}/"),
        "?info.team=data",
        "?info.tags=x&info.priority=5",
        "?health=passing,warning",
        "?health=critical&health=warning",
        "?watch=false",
    ];
    c.expect_each(
        &api,
        listings.map(|q| (GET, format!("/services{q}"), &[][..], None, 200)),
    )
    .await;
    let r = c
        .expect(&api, GET, "/services?limit=1", &[], None, 200)
        .await;
    let page: Value = r.json();
    let cursor = page["next_cursor"]
        .as_str()
        .expect("more than one entry: a cursor")
        .to_owned();
    let next_page = format!("/services?limit=1&cursor={cursor}");
    c.expect(&api, GET, &next_page, &[], None, 200).await;
    let invalid = [
        "bogus=1",
        "limit=0",
        "limit=1001",
        "limit=x",
        "cursor=nope",
        "health=healthy",
        "watch=maybe",
        "watch=true&limit=5",
        "url=ftp://a",
        "info.=x",
    ];
    c.expect_each(
        &api,
        invalid.map(|q| (GET, format!("/services?{q}"), &[][..], None, 400)),
    )
    .await;
    let long = format!("/services?display_name={}", "a".repeat(9000));
    c.expect_each(
        &api,
        [
            (GET, long.as_str(), &[], None, 414),
            (POST, "/services", &[], None, 405),
            (PUT, "/services", &[], None, 405),
            (DELETE, "/services", &[], None, 405),
        ],
    )
    .await;
    // The watch feed: its answer, then its events.
    let within = Duration::from_secs(5);
    let (mut feed, retry) = c.open_feed(&gapi, "watch=true", &[]).await;
    assert_eq!(retry, 2000);
    feed.events_until(&mut c, &["snapshot"], within).await;
    // Over --max-watchers.
    c.expect(&gapi, GET, "/services?watch=true", &[], None, 429)
        .await;
    drop(feed);

    let url_s = "http://127.0.0.1:9/short-a";
    sapi.register(url_s, "short").await; // expires while the feed is open
    let query = "watch=true&display_name=short";
    let (mut feed, _) = c.open_feed(&sapi, query, &[]).await;
    let snapshot = feed.events_until(&mut c, &["snapshot"], within).await;
    assert!(snapshot[0].data.contains(url_s), "{snapshot:?}");
    let b = sapi.register("http://127.0.0.1:9/short-b", "short").await;
    feed.events_until(&mut c, &["registered"], within).await;
    sapi.register("http://127.0.0.1:9/short-b", "short").await;
    feed.events_until(&mut c, &["updated"], within).await;
    let r = sapi
        .delete(&format!("/services/{}", b["id"].as_str().expect("id")))
        .await;
    assert_eq!(r.status, 200);
    let gone = ["deregistered", "expired"];
    let events = feed
        .events_until(&mut c, &gone, Duration::from_secs(10))
        .await;
    let last_id = events.last().expect("events").id.clone();
    // A heartbeat after 300 ms of silence.
    assert!(matches!(feed.next(within).await, Message::Heartbeat));
    drop(feed);
    // Resuming after the last event sends only what came after; an unusable id a snapshot.
    let (mut resumed, _) = c
        .open_feed(&sapi, query, &[("last-event-id", &last_id)])
        .await;
    sapi.register("http://127.0.0.1:9/short-c", "short").await;
    let events = resumed.events_until(&mut c, &["registered"], within).await;
    assert_eq!(
        events.len(),
        1,
        "a resumed feed starts without a snapshot: {events:?}"
    );
    drop(resumed);
    let (mut fresh, _) = c
        .open_feed(&sapi, "watch=true", &[("last-event-id", "junk")])
        .await;
    fresh.events_until(&mut c, &["snapshot"], within).await;
    drop(fresh);

    // ---- GET, HEAD, DELETE /services/{id}
    let one = |id: &str| format!("/services/{id}");
    let (one_a, one_leased, one_g) = (one(&id_a), one(&id_leased), one(&id_g));
    let r = c.expect(&api, GET, &one_a, &[], None, 200).await;
    assert!(
        r.json::<Value>().get("check").is_some(),
        "a record with a check: {r:?}"
    );
    c.expect(&api, HEAD, &one_a, &[], None, 200).await;
    for id in [UNKNOWN_ID, "not-a-ulid", "81JDQ9J4XWAZ3M5S1X2VQ7N8C4"] {
        c.expect_each(
            &api,
            [GET, HEAD, DELETE].map(|m| (m, one(id), &[][..], None, 404)),
        )
        .await;
    }
    c.expect_each(
        &api,
        [
            (DELETE, one_leased.as_str(), &[], None, 403),
            (DELETE, &one_leased, &[with_token], None, 200),
            (DELETE, &one_a, &[], None, 200),
            // Already gone.
            (DELETE, &one_a, &[], None, 404),
        ],
    )
    .await;
    c.expect_each(
        &gapi,
        [
            (DELETE, one_g.as_str(), &[], None, 401),
            (DELETE, &one_g, &[key], None, 403),
            (DELETE, &one_g, &[bearer, with_token_g], None, 200),
        ],
    )
    .await;
    let unknown = one(UNKNOWN_ID);
    c.expect_each(
        &api,
        [
            (POST, unknown.as_str(), &[], None, 405),
            (PUT, &unknown, &[], None, 405),
        ],
    )
    .await;

    // ---- /health, /metrics
    let big = "x".repeat(17 * 1024);
    c.expect_each(
        &api,
        [
            (GET, "/health", &[], None, 200),
            (GET, "/health", &[("x-padding", &big)], None, 431),
            (POST, "/health", &[], None, 405),
            (GET, "/metrics", &[], None, 200),
            (DELETE, "/metrics", &[], None, 405),
        ],
    )
    .await;

    // ---- The pages and their files
    let browser = ("accept", BROWSER_ACCEPT);
    c.expect_each(
        &api,
        [
            (GET, "/", &[browser], None, 302),
            (GET, "/", &[("accept", "application/json")], None, 404),
            (POST, "/", &[], None, 405),
        ],
    )
    .await;
    for (page, folder) in [("/ui", "ui/"), ("/docs", "docs/")] {
        let r = c.expect(&api, GET, page, &[browser], None, 200).await;
        let html = String::from_utf8(r.body.to_vec()).expect("UTF-8");
        let etag = r.header("etag").expect("etag").to_owned();
        let slash = format!("{page}/");
        c.expect_each(
            &api,
            [
                (GET, page, &[("if-none-match", &etag)], None, 304),
                (DELETE, page, &[], None, 405),
                (GET, &slash, &[], None, 302),
                (PUT, &slash, &[], None, 405),
            ],
        )
        .await;
        let files: Vec<String> = loaded_files(&html)
            .into_iter()
            .filter(|f| f.starts_with(folder))
            .collect();
        assert!(!files.is_empty(), "{page} loads files from {folder}");
        for file in files {
            let path = format!("/{file}");
            let r = c.expect(&api, GET, &path, &[], None, 200).await;
            let etag = r.header("etag").expect("etag").to_owned();
            c.expect(&api, GET, &path, &[("if-none-match", &etag)], None, 304)
                .await;
        }
        let missing = format!("/{folder}missing.js");
        c.expect_each(
            &api,
            [
                (GET, missing.as_str(), &[], None, 404),
                (POST, &missing, &[], None, 405),
            ],
        )
        .await;
    }

    // ---- Every GET path also answers HEAD: the same status, headers and no body.
    for path in [
        "/health",
        "/metrics",
        "/services",
        "/",
        "/ui",
        "/ui/",
        "/openapi.json",
        "/docs",
        "/docs/",
        "/docs/swagger-ui.css",
    ] {
        let get_reply = api.send(GET, path, &[], None).await;
        let head_reply = api.send(HEAD, path, &[], None).await;
        assert_eq!(get_reply.status, head_reply.status, "HEAD {path}");
        assert!(head_reply.body.is_empty(), "HEAD {path} has no body");
        assert_eq!(
            get_reply.header("content-type"),
            head_reply.header("content-type"),
            "HEAD {path}"
        );
    }

    c.assert_coverage();

    // Every route the server counted in its metrics is a documented path.
    let metrics = api.get("/metrics").await;
    let text = String::from_utf8(metrics.body.to_vec()).expect("UTF-8");
    let documented_paths: BTreeSet<&str> = c.spec.paths().keys().map(String::as_str).collect();
    let mut labels = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("servicekit_http_requests_total{"))
    {
        if let Some((_, rest)) = line.split_once("route=\"") {
            labels.insert(rest.split('"').next().unwrap_or_default().to_owned());
        }
    }
    assert!(labels.len() >= 10, "{labels:?}");
    for label in &labels {
        assert!(
            label == "unmatched" || documented_paths.contains(label.as_str()),
            "the server counted requests for route {label}, which is not a documented path"
        );
    }

    open.shutdown().await;
    guarded.shutdown().await;
    short.shutdown().await;
    drop(nobody);
}

/// The `src`/`href` values of a page's elements.
fn loaded_files(html: &str) -> Vec<String> {
    let mut files = Vec::new();
    for attr in ["src=\"", "href=\""] {
        let mut rest = html;
        while let Some(at) = rest.find(attr) {
            rest = &rest[at + attr.len()..];
            let end = rest.find('"').unwrap_or(rest.len());
            files.push(rest[..end].to_owned());
        }
    }
    files
}
