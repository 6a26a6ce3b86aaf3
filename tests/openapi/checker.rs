//! The document side: the served OpenAPI document, and a checker that holds every answer
//! against it and counts what was exercised, so the cases in `main.rs` stay a list of requests.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};

use crate::feed::{Event, Feed, Message};
use crate::support::http::{Api, Reply};

/// Request headers.
pub type Headers<'a> = &'a [(&'a str, &'a str)];

/// One request and the status it must get: (method, target, headers, body, status).
pub type Case<'a, T> = (Method, T, Headers<'a>, Option<Vec<u8>>, u16);

/// The served document and what the test needs from it.
pub struct Spec {
    pub doc: Value,
}

impl Spec {
    pub fn new(doc: Value) -> Spec {
        Spec { doc }
    }

    pub fn paths(&self) -> &serde_json::Map<String, Value> {
        self.doc["paths"].as_object().expect("paths is an object")
    }

    /// Every documented (path, method), methods lower case.
    pub fn operations(&self) -> BTreeSet<(String, String)> {
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
    pub fn resolve<'a>(&'a self, mut value: &'a Value) -> &'a Value {
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
    pub fn validator(&self, schema: &Value) -> jsonschema::Validator {
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

/// What the exchanges showed for one documented operation.
#[derive(Default, Debug)]
struct Seen {
    statuses: BTreeSet<u16>,
}

/// Checks answers against the document and keeps count of what was exercised.
pub struct Checker {
    pub spec: Spec,
    seen: BTreeMap<(String, String), Seen>,
    /// Per documented path: whether it answered a success and an error (a 405 for a method it
    /// does not take counts for the path).
    path_outcomes: BTreeMap<String, (bool, bool)>,
    /// (path, method, status, media type) of every success answer with content.
    media_seen: BTreeSet<(String, String, String, String)>,
    events_seen: BTreeSet<String>,
}

impl Checker {
    pub fn new(spec: Spec) -> Checker {
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

    /// The documented path `target` (without its query) is an instance of; a literal segment
    /// wins over a parameter (`/services/$register` is not `/services/{id}`).
    fn template_of(&self, target: &str) -> String {
        let mut matches: Vec<&String> = self
            .spec
            .paths()
            .keys()
            .filter(|template| instance_of(target, template))
            .collect();
        matches.sort_by_key(|template| template.matches('{').count());
        let best = matches
            .first()
            .unwrap_or_else(|| panic!("{target} is not an instance of a documented path"));
        let params = best.matches('{').count();
        assert!(
            matches
                .get(1)
                .is_none_or(|t| t.matches('{').count() > params),
            "{target} is an instance of more than one documented path: {matches:?}"
        );
        best.to_string()
    }

    /// Sends `method target` to `api`, checks the answer against the document, and asserts
    /// it has `status`; returns it for the cases that read on.
    pub async fn expect(
        &mut self,
        api: &Api,
        method: Method,
        target: &str,
        headers: Headers<'_>,
        body: Option<Vec<u8>>,
        status: u16,
    ) -> Reply {
        let template = self.template_of(target);
        let reply = api.send(method.clone(), target, headers, body).await;
        self.check(&template, &method, target, &reply);
        assert_eq!(reply.status, status, "{method} {:.120}: {reply:?}", target);
        reply
    }

    /// [`Checker::expect`] for each case, in order.
    pub async fn expect_each<T: AsRef<str>, const N: usize>(
        &mut self,
        api: &Api,
        cases: [Case<'_, T>; N],
    ) {
        for (method, target, headers, body, status) in cases {
            self.expect(api, method, target.as_ref(), headers, body, status)
                .await;
        }
    }

    /// Opens the watch feed `/services?QUERY` and checks its head (status, headers, media
    /// type, as documented) and its first message, `retry:`, whose milliseconds it returns.
    pub async fn open_feed(&mut self, api: &Api, query: &str, headers: Headers<'_>) -> (Feed, u64) {
        let target = format!("/services?{query}");
        let mut feed = Feed::open(api.base(), query, headers).await;
        // The stream's body is read message by message, not as one document.
        let head = Reply {
            status: feed.status,
            headers: feed.headers.clone(),
            body: Bytes::new(),
        };
        self.check_stream_head("/services", &target, &head);
        match feed.next(Duration::from_secs(5)).await {
            Message::Retry(ms) => (feed, ms),
            other => panic!("{target}: the first message is retry:, not {other:?}"),
        }
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
    pub fn event_schema(&self, name: &str) -> Value {
        let events = &self.spec.doc["paths"]["/services"]["get"]["responses"]["200"]["content"]
            ["text/event-stream"]["x-events"];
        events
            .get(name)
            .unwrap_or_else(|| panic!("event {name:?} is not documented in x-events"))["data"]
            .clone()
    }

    /// Checks one watch-feed event against its documented schema.
    pub fn check_event(&mut self, event: &Event) {
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

    /// What was exercised is exactly what is documented: every operation, a success and an
    /// error on every path, a success for every operation, every media type documented for a
    /// success, every event kind. Prints what the document promises but nothing provoked.
    pub fn assert_coverage(&self) {
        let documented = self.spec.operations();
        let exercised: BTreeSet<(String, String)> = self.seen.keys().cloned().collect();
        assert_eq!(
            exercised, documented,
            "the operations exercised here must be exactly the documented ones"
        );
        for path in self.spec.paths().keys() {
            let (success, error) = self.path_outcomes.get(path).copied().unwrap_or_default();
            assert!(
                success && error,
                "{path}: success {success}, error {error}: each path needs both"
            );
        }
        for (key, seen) in &self.seen {
            assert!(
                seen.statuses.iter().any(|s| *s < 400),
                "{key:?} got no success answer: {:?}",
                seen.statuses
            );
        }
        // Every media type documented for a success was seen, and every event.
        for (path, method) in &documented {
            let responses = self.spec.doc["paths"][path][method]["responses"]
                .as_object()
                .expect("responses");
            for (status, response) in responses {
                if !status.starts_with('2') {
                    continue;
                }
                let response = self.spec.resolve(response);
                for media in response
                    .get("content")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flat_map(|m| m.keys())
                {
                    let key = (path.clone(), method.clone(), status.clone(), media.clone());
                    assert!(self.media_seen.contains(&key), "never saw {key:?}");
                }
            }
        }
        let events: BTreeSet<String> = servicekit::protocol::WatchEventKind::ALL
            .iter()
            .map(|k| k.as_str().to_owned())
            .collect();
        assert_eq!(self.events_seen, events, "every event kind was validated");
        // What the document promises but no exchange here could provoke.
        for ((path, method), seen) in &self.seen {
            let documented: BTreeSet<u16> = self.spec.doc["paths"][path][method]["responses"]
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
    }
}
