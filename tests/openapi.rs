//! `GET /openapi.json` against the server that serves it: the document is valid OpenAPI 3.1,
//! and real answers of real orchestrators, over real sockets, to every documented path and
//! method (successes and errors) are what the document says: a documented status, a documented
//! media type, the required headers, a body that validates against the documented schema, and
//! each watch-feed event against its event schema. Coverage is asserted too, so an endpoint
//! added to the document (or to the router) without being exercised here fails.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::{self, Running};
use support::http::{Api, Reply};

/// The OpenAPI Initiative's schema of OpenAPI 3.1 documents (see fixtures/README.md).
const META_SCHEMA: &str = include_str!("fixtures/openapi-3.1-schema.json");

const BROWSER_ACCEPT: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
const REGISTRATION_KEY: &str = "s3cret-registration-key";
/// An id no entry has.
const UNKNOWN_ID: &str = "01JDQ9J4XWAZ3M5S1X2VQ7N8C4";

// ---------------------------------------------------------------------------------------------
// The document

/// The served document and what the test needs from it.
struct Spec {
    doc: Value,
}

impl Spec {
    fn new(doc: Value) -> Spec {
        Spec { doc }
    }

    fn paths(&self) -> &serde_json::Map<String, Value> {
        self.doc["paths"].as_object().expect("paths is an object")
    }

    /// Every documented (path, method), methods lower case.
    fn operations(&self) -> BTreeSet<(String, String)> {
        let mut ops = BTreeSet::new();
        for (path, item) in self.paths() {
            for method in item.as_object().expect("path item").keys() {
                if HTTP_METHODS.contains(&method.as_str()) {
                    ops.insert((path.clone(), method.clone()));
                }
            }
        }
        ops
    }

    fn operation(&self, path: &str, method: &str) -> Option<&Value> {
        self.doc["paths"].get(path)?.get(method)
    }

    /// `value`, or what its `$ref` (a local JSON pointer) names, followed to the end.
    fn resolve<'a>(&'a self, mut value: &'a Value) -> &'a Value {
        while let Some(reference) = value.get("$ref").and_then(Value::as_str) {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{reference}: only local references are used"));
            value = self
                .doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{reference} names nothing in the document"));
        }
        value
    }

    /// A validator for `schema`, a schema inside the document: its `#/components/...`
    /// references resolve against the document's components, which ride along under an
    /// unknown keyword (ignored by validation, reachable by JSON pointer).
    fn validator(&self, schema: &Value) -> jsonschema::Validator {
        let mut root = schema.clone();
        let Some(object) = root.as_object_mut() else {
            return jsonschema::draft202012::new(&root).expect("a boolean schema");
        };
        object.insert("components".into(), self.doc["components"].clone());
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
    }

    fn assert_valid(&self, schema: &Value, instance: &Value, what: &str) {
        let validator = self.validator(schema);
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{what}: the answer does not validate against the documented schema:\n  {}\n\
             answer: {instance}\nschema: {schema}",
            errors.join("\n  ")
        );
    }
}

const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The media type of a `Content-Type`, without parameters, lower case.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether `path` is an instance of the path template `template`.
fn instance_of(path: &str, template: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    let (a, b): (Vec<&str>, Vec<&str>) = (path.split('/').collect(), template.split('/').collect());
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .all(|(p, t)| p == t || (t.starts_with('{') && t.ends_with('}') && !p.is_empty()))
}

// ---------------------------------------------------------------------------------------------
// Checking answers

/// What the exchanges showed for one documented operation.
#[derive(Default, Debug)]
struct Seen {
    statuses: BTreeSet<u16>,
}

/// Checks answers against the document and keeps count of what was exercised.
struct Checker {
    spec: Spec,
    seen: BTreeMap<(String, String), Seen>,
    /// Per documented path: whether it answered a success and an error (a 405 for a method it
    /// does not take counts for the path).
    path_outcomes: BTreeMap<String, (bool, bool)>,
    /// (path, method, status, media type) of every success answer with content.
    media_seen: BTreeSet<(String, String, String, String)>,
    events_seen: BTreeSet<String>,
}

impl Checker {
    fn new(spec: Spec) -> Checker {
        Checker {
            spec,
            seen: BTreeMap::new(),
            path_outcomes: BTreeMap::new(),
            media_seen: BTreeSet::new(),
            events_seen: BTreeSet::new(),
        }
    }

    fn note_path(&mut self, path: &str, status: StatusCode) {
        let entry = self.path_outcomes.entry(path.to_owned()).or_default();
        if status.as_u16() < 400 {
            entry.0 = true;
        } else {
            entry.1 = true;
        }
    }

    /// Sends a request and checks its answer against `template`'s `method` operation.
    async fn exchange(
        &mut self,
        api: &Api,
        method: Method,
        template: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Reply {
        let reply = api.send(method.clone(), target, headers, body).await;
        self.check(template, &method, target, &reply);
        reply
    }

    /// Checks one whole answer to `method target`, an instance of the documented `template`.
    fn check(&mut self, template: &str, method: &Method, target: &str, reply: &Reply) {
        assert!(
            instance_of(target, template),
            "{target} is not an instance of {template}"
        );
        let what = format!("{method} {target} -> {}", reply.status);
        assert!(
            self.spec.paths().contains_key(template),
            "{what}: {template} is not a documented path"
        );
        let lower = method.as_str().to_ascii_lowercase();
        self.note_path(template, reply.status);
        let Some(operation) = self.spec.operation(template, &lower).cloned() else {
            self.check_method_not_allowed(template, method, reply, &what);
            // Documented on each operation of the path as "any other method".
            for (path, method) in self.spec.operations() {
                if path == template {
                    self.seen
                        .entry((path, method))
                        .or_default()
                        .statuses
                        .insert(405);
                }
            }
            return;
        };
        let status = reply.status.as_u16();
        let responses = &operation["responses"];
        let response = responses
            .get(status.to_string())
            .or_else(|| responses.get("default"))
            .unwrap_or_else(|| {
                panic!(
                    "{what}: status {status} is not documented for {lower} {template} \
                     (documented: {:?}); body: {}",
                    responses.as_object().map(|r| r.keys().collect::<Vec<_>>()),
                    String::from_utf8_lossy(&reply.body)
                )
            });
        let response = self.spec.resolve(response).clone();
        self.check_headers(&response, &reply.headers, &what);
        let media = self.check_content(&response, method, reply, &what);
        if let Some(media) = media {
            if status < 300 {
                self.media_seen.insert((
                    template.to_owned(),
                    lower.clone(),
                    status.to_string(),
                    media,
                ));
            }
        }
        self.seen
            .entry((template.to_owned(), lower))
            .or_default()
            .statuses
            .insert(status);
    }

    /// A method `template` does not document: a 405 whose `Allow` lists exactly the
    /// documented methods (and `HEAD` with `GET`).
    fn check_method_not_allowed(
        &mut self,
        template: &str,
        method: &Method,
        reply: &Reply,
        what: &str,
    ) {
        assert_eq!(
            reply.status,
            405,
            "{what}: {method} is not documented for {template}, so it must be a 405; body: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let response = self
            .spec
            .resolve(&json!({"$ref": "#/components/responses/MethodNotAllowed"}))
            .clone();
        self.check_headers(&response, &reply.headers, what);
        self.check_content(&response, method, reply, what);
        let mut documented: BTreeSet<String> = self.spec.paths()[template]
            .as_object()
            .expect("path item")
            .keys()
            .filter(|m| HTTP_METHODS.contains(&m.as_str()))
            .map(|m| m.to_ascii_uppercase())
            .collect();
        if documented.contains("GET") {
            documented.insert("HEAD".into());
        }
        let allowed: BTreeSet<String> = reply
            .header("allow")
            .unwrap_or_default()
            .split(',')
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty())
            .collect();
        assert_eq!(
            allowed, documented,
            "{what}: Allow must list the documented methods of {template}"
        );
    }

    fn check_headers(&self, response: &Value, headers: &HeaderMap, what: &str) {
        let Some(documented) = response.get("headers").and_then(Value::as_object) else {
            return;
        };
        for (name, header) in documented {
            let header = self.spec.resolve(header);
            let value = headers.get(name.as_str()).and_then(|v| v.to_str().ok());
            let Some(value) = value else {
                assert!(
                    header.get("required") != Some(&Value::Bool(true)),
                    "{what}: the documented header {name} is missing"
                );
                continue;
            };
            let schema = &header["schema"];
            let instance = match self.spec.resolve(schema).get("type") {
                Some(t) if t == "integer" => json!(value
                    .parse::<i64>()
                    .unwrap_or_else(|_| panic!("{what}: header {name}: {value:?} is no integer"))),
                _ => json!(value),
            };
            self.spec
                .assert_valid(schema, &instance, &format!("{what}: header {name}"));
        }
    }

    /// Checks the body against the response's content; returns the media type it matched.
    fn check_content(
        &self,
        response: &Value,
        method: &Method,
        reply: &Reply,
        what: &str,
    ) -> Option<String> {
        let content = response.get("content").and_then(Value::as_object);
        let Some(content) = content.filter(|c| !c.is_empty()) else {
            assert!(
                reply.body.is_empty(),
                "{what}: no content is documented, but the body is {:?}",
                String::from_utf8_lossy(&reply.body)
            );
            return None;
        };
        let content_type = reply
            .header("content-type")
            .unwrap_or_else(|| panic!("{what}: an answer with content needs a Content-Type"));
        let media = essence(content_type);
        let Some(media_type) = content.get(&media) else {
            panic!(
                "{what}: Content-Type {content_type:?} is not documented ({:?})",
                content.keys().collect::<Vec<_>>()
            );
        };
        if method == Method::HEAD {
            assert!(reply.body.is_empty(), "{what}: a HEAD answer has no body");
            return Some(media);
        }
        if let Some(schema) = media_type.get("schema") {
            let instance = if media == "application/json" || media.ends_with("+json") {
                serde_json::from_slice(&reply.body).unwrap_or_else(|e| {
                    panic!(
                        "{what}: the body is not JSON ({e}): {}",
                        String::from_utf8_lossy(&reply.body)
                    )
                })
            } else {
                Value::String(
                    String::from_utf8(reply.body.to_vec())
                        .unwrap_or_else(|_| panic!("{what}: a text body that is not UTF-8")),
                )
            };
            self.spec.assert_valid(schema, &instance, what);
        }
        Some(media)
    }

    /// The documented schema of watch-feed event `name`.
    fn event_schema(&self, name: &str) -> Value {
        let events = &self.spec.doc["paths"]["/services"]["get"]["responses"]["200"]["content"]
            ["text/event-stream"]["x-events"];
        events
            .get(name)
            .unwrap_or_else(|| panic!("event {name:?} is not documented in x-events"))["data"]
            .clone()
    }

    /// Checks one watch-feed event against its documented schema.
    fn check_event(&mut self, event: &Event) {
        let schema = self.event_schema(&event.name);
        assert!(
            event.id.split_once('-').is_some_and(|(ms, seq)| {
                !ms.is_empty()
                    && !seq.is_empty()
                    && ms.bytes().chain(seq.bytes()).all(|b| b.is_ascii_digit())
            }),
            "event id {:?} is not MS-SEQ",
            event.id
        );
        let data: Value = serde_json::from_str(&event.data)
            .unwrap_or_else(|e| panic!("{} data is not JSON ({e}): {}", event.name, event.data));
        self.spec
            .assert_valid(&schema, &data, &format!("event {}", event.name));
        self.events_seen.insert(event.name.clone());
    }
}

// ---------------------------------------------------------------------------------------------
// The watch feed, read as it arrives

/// One message of the feed.
#[derive(Debug)]
enum Message {
    Retry(u64),
    Heartbeat,
    Event(Event),
}

#[derive(Debug, Clone)]
struct Event {
    id: String,
    name: String,
    data: String,
}

/// An open watch feed.
struct Feed {
    status: StatusCode,
    headers: HeaderMap,
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
}

impl Feed {
    async fn open(base: &str, query: &str, headers: &[(&str, &str)]) -> Feed {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut request = Request::get(format!("{base}/services?{query}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::default()).expect("request");
        let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
            .await
            .expect("the feed answers within 10 s")
            .expect("the feed answers");
        let (parts, body) = response.into_parts();
        Feed {
            status: parts.status,
            headers: parts.headers,
            body,
            buffer: Vec::new(),
        }
    }

    /// The next message, within `within`.
    async fn next(&mut self, within: Duration) -> Message {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("UTF-8 feed");
                return parse_message(block.trim_end_matches('\n'));
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .unwrap_or_else(|_| panic!("no whole message within {within:?}"))
                .expect("the feed goes on")
                .expect("the feed reads");
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }

    /// Events until one of each of `names` arrived (checking each), within `within`.
    async fn events_until(
        &mut self,
        checker: &mut Checker,
        names: &[&str],
        within: Duration,
    ) -> Vec<Event> {
        let deadline = Instant::now() + within;
        let mut missing: BTreeSet<&str> = names.iter().copied().collect();
        let mut events = Vec::new();
        while !missing.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {missing:?} event within {within:?}");
            match self.next(left).await {
                Message::Event(event) => {
                    checker.check_event(&event);
                    missing.remove(event.name.as_str());
                    events.push(event);
                }
                Message::Heartbeat => {}
                Message::Retry(_) => panic!("retry: comes only first"),
            }
        }
        events
    }
}

fn parse_message(block: &str) -> Message {
    if block.starts_with(':') {
        assert_eq!(block, ": heartbeat", "the only comment is the heartbeat");
        return Message::Heartbeat;
    }
    if let Some(ms) = block.strip_prefix("retry: ") {
        return Message::Retry(ms.parse().expect("retry: milliseconds"));
    }
    let mut fields = BTreeMap::new();
    for line in block.lines() {
        let (name, value) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("a field line: {line:?}"));
        assert!(
            fields.insert(name, value.to_owned()).is_none(),
            "one {name} per event (data is one line): {block}"
        );
    }
    let take = |name: &str| {
        fields
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("an event has {name}: {block}"))
    };
    assert_eq!(fields.len(), 3, "id, event and data: {block}");
    Message::Event(Event {
        id: take("id"),
        name: take("event"),
        data: take("data"),
    })
}

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

fn registration(url: &str, name: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"url": url, "info": {"display_name": name}})).expect("json")
}

const JSON: (&str, &str) = ("content-type", "application/json");

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
    let (get, put, post, delete, head) = (
        Method::GET,
        Method::PUT,
        Method::POST,
        Method::DELETE,
        Method::HEAD,
    );

    // ---- /openapi.json
    let r = c
        .exchange(
            &api,
            get.clone(),
            "/openapi.json",
            "/openapi.json",
            &[],
            None,
        )
        .await;
    let etag = r.header("etag").expect("etag").to_owned();
    c.exchange(
        &api,
        get.clone(),
        "/openapi.json",
        "/openapi.json",
        &[("if-none-match", &etag)],
        None,
    )
    .await;
    c.exchange(
        &api,
        post.clone(),
        "/openapi.json",
        "/openapi.json",
        &[],
        Some(b"{}".to_vec()),
    )
    .await;

    // ---- POST /services/$register
    let nobody = support::ReservedPort::new();
    let url_a = nobody.url();
    let r = c
        .exchange(&api, post.clone(), "/services/$register", "/services/$register", &[JSON],
            Some(serde_json::to_vec(&json!({
                "url": format!("{url_a}/"),
                "info": {"display_name": "  Service A ", "version": "1.0.0", "team": "data", "tags": ["x", "y"], "priority": 5},
                "check": {"tcp": true, "interval_seconds": 60, "deregister_critical_after_seconds": 600}
            })).expect("json")))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let id_a = r.json::<Value>()["id"].as_str().expect("id").to_owned();
    let r = c
        .exchange(&api, post.clone(), "/services/$register", "/services/$register", &[JSON],
            Some(serde_json::to_vec(&json!({"id": id_a, "url": url_a, "info": {"display_name": "Service A", "team": "data"}, "check": {"tcp": true, "interval_seconds": 60}})).expect("json")))
        .await;
    assert_eq!(r.status, 200, "a known URL: {r:?}");
    let r = c
        .exchange(&api, post.clone(), "/services/$register", "/services/$register", &[("content-type", "application/vnd.x+json")],
            Some(serde_json::to_vec(&json!({"id": 7, "url": "http://127.0.0.1:9/nulls", "info": {"display_name": "Nulls", "version": null, "description": null}, "lease": null, "check": null, "later": true})).expect("json")))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let leased_url = "http://127.0.0.1:9/leased";
    let r = c
        .exchange(
            &api,
            post.clone(),
            "/services/$register",
            "/services/$register",
            &[],
            Some(
                serde_json::to_vec(
                    &json!({"url": leased_url, "info": {"display_name": "Leased"}, "lease": true}),
                )
                .expect("json"),
            ),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let leased: Value = r.json();
    let id_leased = leased["id"].as_str().expect("id").to_owned();
    let token = leased["lease_token"]
        .as_str()
        .expect("a lease token")
        .to_owned();
    let r = c
        .exchange(
            &api,
            post.clone(),
            "/services/$register",
            "/services/$register",
            &[JSON, ("x-lease-token", &token)],
            Some(registration(leased_url, "Leased")),
        )
        .await;
    assert_eq!(r.status, 200, "re-registered with its token: {r:?}");
    assert_eq!(
        r.json::<Value>()["lease_token"],
        token.as_str(),
        "the token is repeated"
    );
    let r = c
        .exchange(
            &api,
            post.clone(),
            "/services/$register",
            "/services/$register",
            &[JSON],
            Some(registration(leased_url, "Leased")),
        )
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    for bad in [
        b"{not json".to_vec(),
        b"[]".to_vec(),
        registration("ftp://a", "A"),
        registration("http://user:pw@a", "A"),
        registration("http://a#f", "A"),
        registration("http://a", "   "),
        registration("http://a", "a\u{7}b"),
        registration("http://a", "a\u{202e}b"),
        serde_json::to_vec(&json!({"url": "http://a"})).expect("json"),
        serde_json::to_vec(&json!({"url": "http://a", "info": {"display_name": "A", "version": 5}})).expect("json"),
        serde_json::to_vec(&json!({"url": "http://a", "info": {"display_name": "A"}, "check": {"http": "/h", "bogus": 1}})).expect("json"),
        serde_json::to_vec(&json!({"url": "http://a", "info": {"display_name": "A"}, "check": {"tcp": true, "grpc": ""}})).expect("json"),
        serde_json::to_vec(&json!({"url": "http://a", "info": {"display_name": "A"}, "check": {"http": "http://elsewhere/h"}})).expect("json"),
        serde_json::to_vec(&json!({"url": "http://a", "info": {"display_name": "A"}, "check": {"tcp": true, "interval_seconds": 0}})).expect("json"),
    ] {
        let r = c.exchange(&api, post.clone(), "/services/$register", "/services/$register", &[JSON], Some(bad)).await;
        assert_eq!(r.status, 400, "{r:?}");
    }
    let r = c
        .exchange(
            &api,
            post.clone(),
            "/services/$register",
            "/services/$register",
            &[("content-type", "text/plain")],
            Some(registration("http://a", "A")),
        )
        .await;
    assert_eq!(r.status, 415, "{r:?}");
    let r = c
        .exchange(
            &api,
            post.clone(),
            "/services/$register",
            "/services/$register",
            &[JSON],
            Some(vec![b' '; 70_000]),
        )
        .await;
    assert_eq!(r.status, 413, "{r:?}");
    for method in [get.clone(), put.clone(), delete.clone()] {
        c.exchange(
            &api,
            method,
            "/services/$register",
            "/services/$register",
            &[],
            None,
        )
        .await;
    }
    // Guarded: the registration key, required leases, the limits.
    let r = c
        .exchange(
            &gapi,
            post.clone(),
            "/services/$register",
            "/services/$register",
            &[JSON],
            Some(registration("http://g", "G")),
        )
        .await;
    assert_eq!(r.status, 401, "{r:?}");
    let key = ("x-service-key", REGISTRATION_KEY);
    let bearer = format!("Bearer {REGISTRATION_KEY}");
    let r = c
        .exchange(
            &gapi,
            post.clone(),
            "/services/$register",
            "/services/$register",
            &[JSON, key],
            Some(registration("http://g", "G")),
        )
        .await;
    assert_eq!(r.status, 400, "a lease is required: {r:?}");
    let leased_body = |url: &str, name: &str| {
        serde_json::to_vec(&json!({"url": url, "info": {"display_name": name}, "lease": true}))
            .expect("json")
    };
    let r = c
        .exchange(
            &gapi,
            post.clone(),
            "/services/$register",
            "/services/$register",
            &[JSON, ("authorization", &bearer)],
            Some(leased_body("http://g", "G")),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let guarded_entry: Value = r.json();
    let id_g = guarded_entry["id"].as_str().expect("id").to_owned();
    let token_g = guarded_entry["lease_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let r = c
        .exchange(
            &gapi,
            post.clone(),
            "/services/$register",
            "/services/$register",
            &[JSON, key],
            Some(leased_body("http://g", &"G".repeat(100))),
        )
        .await;
    assert_eq!(r.status, 413, "info over --max-info-bytes: {r:?}");
    let r = c
        .exchange(
            &gapi,
            post.clone(),
            "/services/$register",
            "/services/$register",
            &[JSON, key],
            Some(leased_body("http://h", "H")),
        )
        .await;
    assert_eq!(r.status, 507, "a new URL in a full registry: {r:?}");
    let r = c
        .exchange(
            &gapi,
            post.clone(),
            "/services/$register",
            "/services/$register",
            &[JSON, key],
            Some(vec![b' '; 3000]),
        )
        .await;
    assert_eq!(r.status, 413, "a body over --max-body-bytes: {r:?}");

    // ---- PUT /services/{id}/$ping
    let ping = |id: &str| format!("/services/{id}/$ping");
    let t_ping = "/services/{id}/$ping";
    let r = c
        .exchange(&api, put.clone(), t_ping, &ping(&id_a), &[], None)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = c
        .exchange(
            &api,
            put.clone(),
            t_ping,
            &ping(&id_a),
            &[("content-type", "application/x-www-form-urlencoded")],
            Some(Vec::new()),
        )
        .await;
    assert_eq!(r.status, 200, "curl's empty ping: {r:?}");
    let r = c
        .exchange(
            &api,
            put.clone(),
            t_ping,
            &ping(&id_a),
            &[JSON],
            Some(b"null".to_vec()),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = c
        .exchange(
            &api,
            put.clone(),
            t_ping,
            &ping(&id_a),
            &[JSON],
            Some(br#"{"status":"warning","output":"slow","later":1}"#.to_vec()),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    for bad in [
        &br#"{"status":"healthy"}"#[..],
        b"[1]",
        b"{",
        br#"{"output":"x"}"#,
    ] {
        let r = c
            .exchange(
                &api,
                put.clone(),
                t_ping,
                &ping(&id_a),
                &[JSON],
                Some(bad.to_vec()),
            )
            .await;
        assert_eq!(r.status, 400, "{r:?}");
    }
    let r = c
        .exchange(
            &api,
            put.clone(),
            t_ping,
            &ping(&id_a),
            &[("content-type", "text/plain")],
            Some(b"alive".to_vec()),
        )
        .await;
    assert_eq!(r.status, 415, "{r:?}");
    let r = c
        .exchange(
            &api,
            put.clone(),
            t_ping,
            &ping(&id_a),
            &[JSON],
            Some(vec![b' '; 70_000]),
        )
        .await;
    assert_eq!(r.status, 413, "{r:?}");
    for id in [UNKNOWN_ID, "not-a-ulid", "01jdq9j4xwaz3m5s1x2vq7n8c4"] {
        let r = c
            .exchange(&api, put.clone(), t_ping, &ping(id), &[], None)
            .await;
        assert_eq!(r.status, 404, "{r:?}");
    }
    let r = c
        .exchange(&api, put.clone(), t_ping, &ping(&id_leased), &[], None)
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = c
        .exchange(
            &api,
            put.clone(),
            t_ping,
            &ping(&id_leased),
            &[("x-lease-token", &token)],
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = c
        .exchange(
            &api,
            put.clone(),
            t_ping,
            &ping(&id_leased),
            &[("x-admin-key", support::ADMIN_KEY)],
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = c
        .exchange(&gapi, put.clone(), t_ping, &ping(&id_g), &[], None)
        .await;
    assert_eq!(r.status, 401, "{r:?}");
    let r = c
        .exchange(
            &gapi,
            put.clone(),
            t_ping,
            &ping(&id_g),
            &[key, ("x-lease-token", &token_g)],
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    for method in [get.clone(), post.clone()] {
        c.exchange(&api, method, t_ping, &ping(&id_a), &[], None)
            .await;
    }

    // ---- GET /services
    let t_list = "/services";
    for query in [
        "",
        "?display_name=Service%20A",
        &format!("?url={url_a}/"),
        "?info.team=data",
        "?info.tags=x&info.priority=5",
        "?health=passing,warning",
        "?health=critical&health=warning",
        "?watch=false",
    ] {
        let r = c
            .exchange(
                &api,
                get.clone(),
                t_list,
                &format!("/services{query}"),
                &[],
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{query}: {r:?}");
    }
    let r = c
        .exchange(&api, get.clone(), t_list, "/services?limit=1", &[], None)
        .await;
    let page: Value = r.json();
    let cursor = page["next_cursor"]
        .as_str()
        .expect("more than one entry: a cursor")
        .to_owned();
    c.exchange(
        &api,
        get.clone(),
        t_list,
        &format!("/services?limit=1&cursor={cursor}"),
        &[],
        None,
    )
    .await;
    for query in [
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
    ] {
        let r = c
            .exchange(
                &api,
                get.clone(),
                t_list,
                &format!("/services?{query}"),
                &[],
                None,
            )
            .await;
        assert_eq!(r.status, 400, "{query}: {r:?}");
    }
    let long = format!("/services?display_name={}", "a".repeat(9000));
    let r = c
        .exchange(&api, get.clone(), t_list, &long, &[], None)
        .await;
    assert_eq!(r.status, 414, "{:?}", r.status);
    for method in [post.clone(), put.clone(), delete.clone()] {
        c.exchange(&api, method, t_list, "/services", &[], None)
            .await;
    }
    // The watch feed: its answer, then its events.
    let mut feed = Feed::open(gapi.base(), "watch=true", &[]).await;
    let feed_reply = Reply {
        status: feed.status,
        headers: feed.headers.clone(),
        body: Bytes::new(),
    };
    // (The stream's body is read below, message by message, not as one document.)
    c.check_stream_head(t_list, "/services?watch=true", &feed_reply);
    assert!(matches!(
        feed.next(Duration::from_secs(5)).await,
        Message::Retry(2000)
    ));
    feed.events_until(&mut c, &["snapshot"], Duration::from_secs(5))
        .await;
    let r = c
        .exchange(
            &gapi,
            get.clone(),
            t_list,
            "/services?watch=true",
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 429, "over --max-watchers: {r:?}");
    drop(feed);

    let url_s = "http://127.0.0.1:9/short-a";
    sapi.register(url_s, "short").await; // expires while the feed is open
    let mut feed = Feed::open(sapi.base(), "watch=true&display_name=short", &[]).await;
    let feed_reply = Reply {
        status: feed.status,
        headers: feed.headers.clone(),
        body: Bytes::new(),
    };
    c.check_stream_head(
        t_list,
        "/services?watch=true&display_name=short",
        &feed_reply,
    );
    assert!(matches!(
        feed.next(Duration::from_secs(5)).await,
        Message::Retry(_)
    ));
    let snapshot = feed
        .events_until(&mut c, &["snapshot"], Duration::from_secs(5))
        .await;
    assert!(snapshot[0].data.contains(url_s), "{snapshot:?}");
    let b = sapi.register("http://127.0.0.1:9/short-b", "short").await;
    feed.events_until(&mut c, &["registered"], Duration::from_secs(5))
        .await;
    sapi.register("http://127.0.0.1:9/short-b", "short").await;
    feed.events_until(&mut c, &["updated"], Duration::from_secs(5))
        .await;
    let r = sapi
        .delete(&format!("/services/{}", b["id"].as_str().expect("id")))
        .await;
    assert_eq!(r.status, 200);
    let events = feed
        .events_until(
            &mut c,
            &["deregistered", "expired"],
            Duration::from_secs(10),
        )
        .await;
    let last_id = events.last().expect("events").id.clone();
    // A heartbeat after 300 ms of silence.
    assert!(matches!(
        feed.next(Duration::from_secs(5)).await,
        Message::Heartbeat
    ));
    drop(feed);
    // Resuming after the last event sends only what came after; an unusable id a snapshot.
    let mut resumed = Feed::open(
        sapi.base(),
        "watch=true&display_name=short",
        &[("last-event-id", &last_id)],
    )
    .await;
    let feed_reply = Reply {
        status: resumed.status,
        headers: resumed.headers.clone(),
        body: Bytes::new(),
    };
    c.check_stream_head(
        t_list,
        "/services?watch=true&display_name=short",
        &feed_reply,
    );
    assert!(matches!(
        resumed.next(Duration::from_secs(5)).await,
        Message::Retry(_)
    ));
    sapi.register("http://127.0.0.1:9/short-c", "short").await;
    let events = resumed
        .events_until(&mut c, &["registered"], Duration::from_secs(5))
        .await;
    assert_eq!(
        events.len(),
        1,
        "a resumed feed starts without a snapshot: {events:?}"
    );
    drop(resumed);
    let mut fresh = Feed::open(sapi.base(), "watch=true", &[("last-event-id", "junk")]).await;
    assert!(matches!(
        fresh.next(Duration::from_secs(5)).await,
        Message::Retry(_)
    ));
    fresh
        .events_until(&mut c, &["snapshot"], Duration::from_secs(5))
        .await;
    drop(fresh);

    // ---- GET, HEAD, DELETE /services/{id}
    let t_one = "/services/{id}";
    let one = |id: &str| format!("/services/{id}");
    let r = c
        .exchange(&api, get.clone(), t_one, &one(&id_a), &[], None)
        .await;
    assert_eq!(r.status, 200);
    assert!(
        r.json::<Value>().get("check").is_some(),
        "a record with a check: {r:?}"
    );
    c.exchange(&api, head.clone(), t_one, &one(&id_a), &[], None)
        .await;
    for id in [UNKNOWN_ID, "not-a-ulid", "81JDQ9J4XWAZ3M5S1X2VQ7N8C4"] {
        for method in [get.clone(), head.clone(), delete.clone()] {
            let r = c.exchange(&api, method, t_one, &one(id), &[], None).await;
            assert_eq!(r.status, 404, "{r:?}");
        }
    }
    let r = c
        .exchange(&api, delete.clone(), t_one, &one(&id_leased), &[], None)
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = c
        .exchange(
            &api,
            delete.clone(),
            t_one,
            &one(&id_leased),
            &[("x-lease-token", &token)],
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = c
        .exchange(&api, delete.clone(), t_one, &one(&id_a), &[], None)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = c
        .exchange(&api, delete.clone(), t_one, &one(&id_a), &[], None)
        .await;
    assert_eq!(r.status, 404, "already gone: {r:?}");
    let r = c
        .exchange(&gapi, delete.clone(), t_one, &one(&id_g), &[], None)
        .await;
    assert_eq!(r.status, 401, "{r:?}");
    let r = c
        .exchange(&gapi, delete.clone(), t_one, &one(&id_g), &[key], None)
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = c
        .exchange(
            &gapi,
            delete.clone(),
            t_one,
            &one(&id_g),
            &[("authorization", &bearer), ("x-lease-token", &token_g)],
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    for method in [post.clone(), put.clone()] {
        c.exchange(&api, method, t_one, &one(UNKNOWN_ID), &[], None)
            .await;
    }

    // ---- /health, /metrics
    c.exchange(&api, get.clone(), "/health", "/health", &[], None)
        .await;
    let big = "x".repeat(17 * 1024);
    let r = c
        .exchange(
            &api,
            get.clone(),
            "/health",
            "/health",
            &[("x-padding", &big)],
            None,
        )
        .await;
    assert_eq!(r.status, 431, "{:?}", r.status);
    c.exchange(&api, post.clone(), "/health", "/health", &[], None)
        .await;
    c.exchange(&api, get.clone(), "/metrics", "/metrics", &[], None)
        .await;
    c.exchange(&api, delete.clone(), "/metrics", "/metrics", &[], None)
        .await;

    // ---- The pages and their files
    let browser = ("accept", BROWSER_ACCEPT);
    let r = c
        .exchange(&api, get.clone(), "/", "/", &[browser], None)
        .await;
    assert_eq!(r.status, 302);
    let r = c
        .exchange(
            &api,
            get.clone(),
            "/",
            "/",
            &[("accept", "application/json")],
            None,
        )
        .await;
    assert_eq!(r.status, 404);
    c.exchange(&api, post.clone(), "/", "/", &[], None).await;
    for (page, folder) in [("/ui", "ui/"), ("/docs", "docs/")] {
        let r = c
            .exchange(&api, get.clone(), page, page, &[browser], None)
            .await;
        assert_eq!(r.status, 200);
        let html = String::from_utf8(r.body.to_vec()).expect("UTF-8");
        let etag = r.header("etag").expect("etag").to_owned();
        c.exchange(
            &api,
            get.clone(),
            page,
            page,
            &[("if-none-match", &etag)],
            None,
        )
        .await;
        c.exchange(&api, delete.clone(), page, page, &[], None)
            .await;
        let slash = format!("{page}/");
        c.exchange(&api, get.clone(), &slash, &slash, &[], None)
            .await;
        c.exchange(&api, put.clone(), &slash, &slash, &[], None)
            .await;
        let template = format!("{page}/{{file}}");
        let files: Vec<String> = loaded_files(&html)
            .into_iter()
            .filter(|f| f.starts_with(folder))
            .collect();
        assert!(!files.is_empty(), "{page} loads files from {folder}");
        for file in files {
            let path = format!("/{file}");
            let r = c
                .exchange(&api, get.clone(), &template, &path, &[], None)
                .await;
            assert_eq!(r.status, 200, "{path}");
            let etag = r.header("etag").expect("etag").to_owned();
            c.exchange(
                &api,
                get.clone(),
                &template,
                &path,
                &[("if-none-match", &etag)],
                None,
            )
            .await;
        }
        let missing = format!("/{folder}missing.js");
        c.exchange(&api, get.clone(), &template, &missing, &[], None)
            .await;
        c.exchange(&api, post.clone(), &template, &missing, &[], None)
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
        let get_reply = api.send(get.clone(), path, &[], None).await;
        let head_reply = api.send(head.clone(), path, &[], None).await;
        assert_eq!(get_reply.status, head_reply.status, "HEAD {path}");
        assert!(head_reply.body.is_empty(), "HEAD {path} has no body");
        assert_eq!(
            get_reply.header("content-type"),
            head_reply.header("content-type"),
            "HEAD {path}"
        );
    }

    // ---- Coverage
    let documented = c.spec.operations();
    let exercised: BTreeSet<(String, String)> = c.seen.keys().cloned().collect();
    assert_eq!(
        exercised, documented,
        "the operations exercised here must be exactly the documented ones"
    );
    for path in c.spec.paths().keys() {
        let (success, error) = c.path_outcomes.get(path).copied().unwrap_or_default();
        assert!(
            success && error,
            "{path}: success {success}, error {error}: each path needs both"
        );
    }
    for (key, seen) in &c.seen {
        assert!(
            seen.statuses.iter().any(|s| *s < 400),
            "{key:?} got no success answer: {:?}",
            seen.statuses
        );
    }
    // Every media type documented for a success was seen, and every event.
    for (path, method) in &documented {
        let responses = c.spec.doc["paths"][path][method]["responses"]
            .as_object()
            .expect("responses");
        for (status, response) in responses {
            if !status.starts_with('2') {
                continue;
            }
            let response = c.spec.resolve(response);
            for media in response
                .get("content")
                .and_then(Value::as_object)
                .into_iter()
                .flat_map(|m| m.keys())
            {
                let key = (path.clone(), method.clone(), status.clone(), media.clone());
                assert!(c.media_seen.contains(&key), "never saw {key:?}");
            }
        }
    }
    let events: BTreeSet<String> = servicekit::protocol::WatchEventKind::ALL
        .iter()
        .map(|k| k.as_str().to_owned())
        .collect();
    assert_eq!(c.events_seen, events, "every event kind was validated");
    // What the document promises but no exchange here could provoke.
    for ((path, method), seen) in &c.seen {
        let documented: BTreeSet<u16> = c.spec.doc["paths"][path][method]["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .filter_map(|s| s.parse().ok())
            .collect();
        let missing: Vec<&u16> = documented.difference(&seen.statuses).collect();
        println!(
            "{method:>6} {path:<22} seen {:?}; documented, not provoked: {missing:?}",
            seen.statuses
        );
    }

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

impl Checker {
    /// Checks the head of a streamed answer (the watch feed): its status, headers and media type.
    fn check_stream_head(&mut self, template: &str, target: &str, head: &Reply) {
        let what = format!("GET {target} -> {}", head.status);
        assert_eq!(head.status, 200, "{what}");
        self.note_path(template, head.status);
        let operation = self
            .spec
            .operation(template, "get")
            .expect("documented")
            .clone();
        let response = self.spec.resolve(&operation["responses"]["200"]).clone();
        self.check_headers(&response, &head.headers, &what);
        let content_type = head.header("content-type").expect("content type");
        assert_eq!(essence(content_type), "text/event-stream", "{what}");
        assert!(
            response["content"].get("text/event-stream").is_some(),
            "{what}: documented"
        );
        assert_eq!(head.header("cache-control"), Some("no-store"), "{what}");
        assert_eq!(head.header("x-accel-buffering"), Some("no"), "{what}");
        self.media_seen.insert((
            template.to_owned(),
            "get".into(),
            "200".into(),
            "text/event-stream".into(),
        ));
        self.seen
            .entry((template.to_owned(), "get".into()))
            .or_default()
            .statuses
            .insert(200);
    }
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
