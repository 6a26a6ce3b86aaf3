//! The HTTP contract, through real sockets, against an in-process orchestrator on the
//! in-memory store. The store-facing tests also run as `cluster::<name>`: through three
//! orchestrator replicas on a real Valkey Cluster, each request to the next replica, so every
//! step reads what another replica wrote. The API over a single Valkey is in `valkey_http.rs`.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use servicekit::protocol::{problem_type as t, ServiceRecord, Timestamp};
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::{self, Running};
use support::http::Api;
use support::replicas::{Replicas, SEEDS};

async fn start(config: Config) -> (Running, Api) {
    let running = server::start(config).await.expect("orchestrator starts");
    let api = Api::new(running.base_url());
    (running, api)
}

async fn start_default() -> (Running, Api) {
    start(Config::for_tests()).await
}

/// Where the orchestrators under test keep their state.
trait Backend {
    /// What `/health` says the store is.
    const KIND: &'static str;
    /// Orchestrators on a fresh, empty store with `config`, and a client of them.
    async fn start(config: Config) -> (Replicas, Api);
}

/// One orchestrator on the in-memory store.
struct Memory;

impl Backend for Memory {
    const KIND: &'static str = "memory";
    async fn start(config: Config) -> (Replicas, Api) {
        Replicas::one(config).await
    }
}

/// Three replicas on the test binary's shared Valkey Cluster, each seeded by another master,
/// on a key prefix of the test's own; every request goes to the next replica in turn.
struct Cluster;

impl Backend for Cluster {
    const KIND: &'static str = "valkey";
    async fn start(config: Config) -> (Replicas, Api) {
        let cluster = support::cluster::shared_async().await;
        Replicas::on_cluster(cluster, &SEEDS, config).await
    }
}

/// Each test as `memory::<name>` and `cluster::<name>`.
macro_rules! api_tests {
    ($($name:ident),* $(,)?) => {
        api_tests!(@on memory, Memory, $($name),*);
        api_tests!(@on cluster, Cluster, $($name),*);
    };
    (@on $module:ident, $backend:ident, $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name::<super::$backend>().await
                }
            )*
        }
    };
}

api_tests!(
    register_creates_then_updates_the_same_id,
    record_has_the_reference_shape,
    presented_ids_are_kept_only_when_they_fit,
    ping_extends_and_reports_times,
    unknown_ids_are_404_problems,
    ids_that_are_not_canonical_ulids_are_404_and_touch_nothing,
    deregister_returns_the_record_and_removes_it,
    list_filters,
    list_pages_with_limit_and_cursor,
    a_long_list_streams_as_one_json_document,
    bad_limits_and_cursors_are_400_problems,
    limits_are_problems_but_never_refuse_a_known_url,
    health_reports_the_store,
    invalid_registrations_are_400_and_lose_nothing,
    non_json_bodies_are_415_and_bodiless_pings_need_no_type,
    registration_key_guards_writes_only,
    the_admin_key_may_do_any_write_and_stands_in_for_the_registration_key,
    require_lease_refuses_registrations_without_one,
    credentials_in_service_urls_are_refused,
    head_requests_answer_without_a_body,
    urls_come_from_public_url_or_host,
    ping_bodies_report_health,
    lists_filter_by_health,
    checks_are_validated_and_kept_with_the_record,
);

async fn register_creates_then_updates_the_same_id<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let base = api.base().to_owned();

    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "HTTP://SvcA:8000/", "info": {"display_name": "Service A", "version": "1.0.0", "team": "x"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let body: Value = r.json();
    let id = body["id"].as_str().expect("id").to_owned();
    assert!(ulid::Ulid::from_string(&id).is_ok());
    assert_eq!(body["status"], "registered");
    assert_eq!(body["service_url"], "http://svca:8000");
    assert_eq!(body["ttl_seconds"], 30);
    assert_eq!(body["message"], "Service A registered successfully");
    assert_eq!(body["ping_url"], format!("{base}/services/{id}/$ping"));
    assert_eq!(
        r.header("location"),
        Some(format!("{base}/services/{id}").as_str())
    );
    let first: ServiceRecord = api.get(&format!("/services/{id}")).await.json();

    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://svca:8000", "info": {"display_name": "Service A2"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let body: Value = r.json();
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["status"], "updated");

    let r = api.get(&format!("/services/{id}")).await;
    assert_eq!(r.status, 200);
    let record: ServiceRecord = r.json();
    assert_eq!(record.info.display_name, "Service A2");
    assert!(
        record.info.extra.is_empty(),
        "info was replaced, not merged"
    );
    assert_eq!(record.registered_at, first.registered_at);
    assert!(record.last_updated >= first.last_updated);
    assert_eq!(
        record.expires_at.as_millis() - record.last_ping_at.as_millis(),
        30_000
    );
    let list: Value = api.get("/services").await.json();
    assert_eq!(list["count"], 1, "no duplicate for one URL: {list}");
    running.shutdown().await;
}

async fn record_has_the_reference_shape<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let id = api.register("http://svca:8000", "A").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let v: Value = api.get(&format!("/services/{id}")).await.json();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    // The reference's fields, plus `health` (which its clients ignore).
    assert_eq!(
        keys,
        [
            "expires_at",
            "health",
            "id",
            "info",
            "last_ping_at",
            "last_updated",
            "registered_at",
            "url"
        ]
    );
    let stamp = v["registered_at"].as_str().unwrap();
    assert!(
        stamp.ends_with('Z') && stamp.len() == 24,
        "RFC 3339 UTC millis: {stamp}"
    );
    running.shutdown().await;
}

async fn presented_ids_are_kept_only_when_they_fit<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let id = api.register("http://svca:8000", "A").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(api.delete(&format!("/services/{id}")).await.status, 200);

    // The instance comes back after its entry is gone and keeps its identity.
    let r = api
        .post_json(
            "/services/$register",
            &json!({"id": id, "url": "http://svca:8000", "info": {"display_name": "A"}}),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json::<Value>()["id"], id.as_str());

    // The reference client's slug, a number, and another URL's id are ignored: each of
    // these is the first registration of its URL, so only the presented id could decide.
    for (url, presented) in [
        ("http://svcb:8000", json!("svc-b")),
        ("http://svcc:8000", json!(42)),
        ("http://svcd:8000", json!(id)),
    ] {
        let r = api
            .post_json(
                "/services/$register",
                &json!({"id": presented, "url": url, "info": {"display_name": "B"}}),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        let got = r.json::<Value>()["id"].as_str().unwrap().to_owned();
        assert_ne!(got, id);
        assert!(ulid::Ulid::from_string(&got).is_ok());
    }
    let list: Value = api.get("/services").await.json();
    assert_eq!(list["count"], 4);
    running.shutdown().await;
}

async fn ping_extends_and_reports_times<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let reg = api.register("http://svca:8000", "A").await;
    let id = reg["id"].as_str().unwrap();
    let ping_path = reg["ping_url"].as_str().unwrap().replace(api.base(), "");
    let r = api.put(&ping_path).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v: Value = r.json();
    assert_eq!(v["id"], id);
    assert_eq!(v["status"], "alive");
    let last: Timestamp = serde_json::from_value(v["last_ping_at"].clone()).unwrap();
    let expires: Timestamp = serde_json::from_value(v["expires_at"].clone()).unwrap();
    assert_eq!(expires.as_millis() - last.as_millis(), 30_000);
    // `$` may arrive percent-encoded.
    let r = api.put(&format!("/services/{id}/%24ping")).await;
    assert_eq!(r.status, 200);
    running.shutdown().await;
}

async fn unknown_ids_are_404_problems<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let missing = ulid::Ulid::new().to_string();
    for (method, path) in [
        (Method::GET, format!("/services/{missing}")),
        (Method::DELETE, format!("/services/{missing}")),
        (Method::PUT, format!("/services/{missing}/$ping")),
    ] {
        let r = api.send(method, &path, &[], None).await;
        let p = r.assert_problem(404, t::NOT_FOUND);
        assert_eq!(p["title"], "Resource Not Found");
        assert_eq!(p["detail"], format!("Service with ID {missing} not found"));
        assert_eq!(p["instance"], path);
    }
    running.shutdown().await;
}

/// Texts that `Ulid::from_string` reads as the id `id` (or as some id) but that are not its
/// canonical text, with what each one is.
fn non_canonical_spellings(id: &str) -> Vec<(String, &'static str)> {
    assert!(id.starts_with('0'), "ids minted today start with 0: {id}");
    let tail = &id[1..];
    let mut spellings = vec![
        ("nope".to_owned(), "not a ULID"),
        // The reference Python client deregisters by its slug.
        ("svc-a".to_owned(), "the Python client's slug"),
        (id.to_lowercase(), "lower case"),
        // 26 characters are 130 bits: a first character over 7 overflows into the same id.
        (format!("8{tail}"), "first character 8"),
        (format!("G{tail}"), "first character G"),
        (format!("R{tail}"), "first character R"),
        (format!("Z{}", &"Z".repeat(25)), "first character Z"),
        (format!("{id}0"), "27 characters"),
        (id[..25].to_owned(), "25 characters"),
        (format!("{}%3Cscript%3E", &id[..14]), "markup"),
    ];
    // Crockford's aliases: I and L read as 1, O as 0; U is not in the alphabet.
    for (from, to) in [('0', 'O'), ('1', 'I'), ('1', 'L')] {
        if let Some(at) = tail.find(from) {
            let mut alias = id.to_owned();
            alias.replace_range(at + 1..at + 2, &to.to_string());
            spellings.push((alias, "Crockford alias letter"));
        }
    }
    let mut with_u = id.to_owned();
    with_u.replace_range(25..26, "U");
    spellings.push((with_u, "the letter U"));
    spellings
}

async fn ids_that_are_not_canonical_ulids_are_404_and_touch_nothing<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let id = api.register("http://svca:8000", "A").await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let spellings = non_canonical_spellings(&id);
    assert!(
        spellings
            .iter()
            .any(|(_, what)| *what == "Crockford alias letter"),
        "{id} has no 0 or 1 to alias"
    );
    for (text, what) in &spellings {
        for (method, path) in [
            (Method::GET, format!("/services/{text}")),
            (Method::PUT, format!("/services/{text}/$ping")),
            (Method::DELETE, format!("/services/{text}")),
        ] {
            let r = api.send(method.clone(), &path, &[], None).await;
            let p = r.assert_problem(404, t::NOT_FOUND);
            assert_eq!(p["instance"], path, "{what}");
            let detail = p["detail"].as_str().unwrap_or_default();
            assert!(
                !detail.contains(text.as_str()) && !detail.contains('<'),
                "{what}: the detail repeats the untrusted id: {p}"
            );
            // HEAD answers the same status, without a body.
            if method == Method::GET {
                let r = api.send(Method::HEAD, &path, &[], None).await;
                assert_eq!(r.status, 404, "{what}: HEAD {path}");
                assert!(r.body.is_empty(), "{what}: HEAD {path}");
            }
        }
    }
    // No alias reached the real entry: it is still there, and was not deleted.
    let record: ServiceRecord = api.get(&format!("/services/{id}")).await.json();
    assert_eq!(record.id.to_string(), id);
    // A wrong method is still a 405 for any id text.
    let r = api.send(Method::PATCH, "/services/nope", &[], None).await;
    r.assert_problem(405, t::METHOD_NOT_ALLOWED);
    running.shutdown().await;
}

async fn deregister_returns_the_record_and_removes_it<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let id = api.register("http://svca:8000", "A").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let keep = api.register("http://svcb:8000", "B").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = api.delete(&format!("/services/{id}")).await;
    assert_eq!(r.status, 200);
    let v: Value = r.json();
    assert_eq!(v["status"], "deregistered");
    assert_eq!(v["service"]["id"], id.as_str());
    assert_eq!(v["service"]["url"], "http://svca:8000");
    api.get(&format!("/services/{id}"))
        .await
        .assert_problem(404, t::NOT_FOUND);
    api.put(&format!("/services/{id}/$ping"))
        .await
        .assert_problem(404, t::NOT_FOUND);
    api.delete(&format!("/services/{id}"))
        .await
        .assert_problem(404, t::NOT_FOUND);
    let list: Value = api.get("/services").await.json();
    assert_eq!(list["count"], 1);
    assert_eq!(list["services"][0]["id"], keep.as_str());
    running.shutdown().await;
}

async fn list_filters<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let reg = |url: &'static str, info: Value| {
        let api = api.clone();
        async move {
            let r = api
                .post_json("/services/$register", &json!({"url": url, "info": info}))
                .await;
            assert_eq!(r.status, 201, "{r:?}");
        }
    };
    reg("http://a1:8000", json!({"display_name": "A", "team": "data", "priority": 5, "gpu": true, "capabilities": ["ml", "etl"]})).await;
    reg("http://a2:8000", json!({"display_name": "A", "team": "web", "priority": 1, "gpu": false, "capabilities": ["web"]})).await;
    reg(
        "http://b1:8000",
        json!({"display_name": "B B", "team": "data"}),
    )
    .await;

    let urls = |q: &'static str| {
        let api = api.clone();
        async move {
            let r = api.get(&format!("/services{q}")).await;
            assert_eq!(r.status, 200, "{q}: {r:?}");
            let v: Value = r.json();
            let mut urls: Vec<String> = v["services"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["url"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(v["count"], urls.len());
            urls.sort();
            urls
        }
    };
    assert_eq!(
        urls("").await,
        ["http://a1:8000", "http://a2:8000", "http://b1:8000"]
    );
    assert_eq!(
        urls("?display_name=A").await,
        ["http://a1:8000", "http://a2:8000"]
    );
    assert_eq!(urls("?display_name=B%20B").await, ["http://b1:8000"]);
    assert_eq!(urls("?display_name=C").await, Vec::<String>::new());
    assert_eq!(urls("?url=http://A2:8000/").await, ["http://a2:8000"]);
    assert_eq!(
        urls("?info.team=data").await,
        ["http://a1:8000", "http://b1:8000"]
    );
    assert_eq!(urls("?info.priority=5").await, ["http://a1:8000"]);
    assert_eq!(urls("?info.gpu=false").await, ["http://a2:8000"]);
    assert_eq!(urls("?info.capabilities=etl").await, ["http://a1:8000"]);
    assert_eq!(
        urls("?display_name=A&info.team=data").await,
        ["http://a1:8000"]
    );
    assert_eq!(
        urls("?display_name=B%20B&info.team=web").await,
        Vec::<String>::new()
    );

    api.get("/services?colour=red")
        .await
        .assert_problem(400, t::BAD_REQUEST);
    api.get("/services?url=notaurl")
        .await
        .assert_problem(400, t::BAD_REQUEST);
    running.shutdown().await;
}

async fn list_pages_with_limit_and_cursor<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let mut registered = Vec::new();
    let mut only_a = Vec::new();
    for i in 0..9 {
        let name = if i % 3 == 0 { "A" } else { "B" };
        let id = api.register(&format!("http://p{i}:8000"), name).await["id"]
            .as_str()
            .expect("id")
            .to_owned();
        if name == "A" {
            only_a.push(id.clone());
        }
        registered.push(id);
    }
    registered.sort();
    only_a.sort();
    let all = api.list_streamed("").await;
    assert_eq!(all, registered, "streamed: every entry, in id order");
    for limit in [1, 2, 3, 4, 8, 9, 10, 1000] {
        assert_eq!(api.walk_pages("", limit).await, all, "limit {limit}");
    }
    assert_eq!(api.list_streamed("display_name=A").await, only_a);
    assert_eq!(api.walk_pages("display_name=A", 1).await, only_a);
    assert_eq!(api.walk_pages("display_name=A", 2).await, only_a);
    assert_eq!(
        api.walk_pages("info.display_name=B", 4).await,
        api.list_streamed("info.display_name=B").await
    );
    assert_eq!(
        api.walk_pages("url=http://p4:8000", 1).await,
        [registered_of(&api, "http://p4:8000").await]
    );
    // Exactly a page left: the last full page has no cursor.
    let r: Value = api.get("/services?limit=9").await.json();
    assert_eq!(r["count"], 9);
    assert!(r.get("next_cursor").is_none(), "{r}");
    // The answer keeps the reference's shape: count first, then services.
    let text = api.get("/services?limit=1").await.body;
    assert!(text.starts_with(br#"{"count":1,"services":["#), "{text:?}");
    // HEAD: the status and headers, no body.
    let r = api.send(Method::HEAD, "/services", &[], None).await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    running.shutdown().await;
}

async fn registered_of(api: &Api, url: &str) -> String {
    let list: Value = api.get(&format!("/services?url={url}")).await.json();
    list["services"][0]["id"].as_str().expect("id").to_owned()
}

async fn a_long_list_streams_as_one_json_document<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    // More than two of the listing's 500-record parts.
    const N: usize = 1203;
    let mut ids = Vec::with_capacity(N);
    for i in 0..N {
        let answer = api.register(&format!("http://s{i}:8000"), "S").await;
        ids.push(answer["id"].as_str().expect("id").to_owned());
    }
    ids.sort();
    let streamed = api.list_streamed("").await;
    assert_eq!(streamed.len(), N);
    assert_eq!(streamed, ids);
    assert_eq!(api.walk_pages("", 1000).await, ids);
    let body = api.get("/services").await.body;
    assert!(body.ends_with(format!(r#"],"count":{N}}}"#).as_bytes()));
    running.shutdown().await;
}

async fn bad_limits_and_cursors_are_400_problems<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    api.register("http://svca:8000", "A").await;
    for query in [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=ten",
        "limit=",
        "cursor=nope",
        "limit=5&cursor=01jdq9j4xwaz3m5s1x2vq7n8c4",
        "cursor=",
    ] {
        let p = api
            .get(&format!("/services?{query}"))
            .await
            .assert_problem(400, t::BAD_REQUEST);
        let detail = p["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("limit") || detail.contains("cursor"),
            "{query}: {p}"
        );
    }
    running.shutdown().await;
}

async fn limits_are_problems_but_never_refuse_a_known_url<B: Backend>() {
    let mut config = Config::for_tests();
    config.max_registrations = 2;
    config.max_info_bytes = 100;
    let (running, api) = B::start(config).await;
    let a = api.register("http://a:8000", "A").await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    api.register("http://b:8000", "B").await;
    let p = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://c:8000", "info": {"display_name": "C"}}),
        )
        .await
        .assert_problem(507, t::LIMIT_EXCEEDED);
    assert!(
        p["detail"].as_str().unwrap_or_default().contains('2'),
        "{p}"
    );
    // Known URLs renew and ping as before.
    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://a:8000", "info": {"display_name": "A2"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(api.put(&format!("/services/{a}/$ping")).await.status, 200);
    // An info over the limit, on a known URL too.
    let big = "x".repeat(100);
    let p = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://a:8000", "info": {"display_name": "A", "blob": big}}),
        )
        .await
        .assert_problem(413, t::LIMIT_EXCEEDED);
    assert!(
        p["detail"].as_str().unwrap_or_default().contains("100"),
        "{p}"
    );
    // Room again after a deregistration.
    assert_eq!(api.delete(&format!("/services/{a}")).await.status, 200);
    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://c:8000", "info": {"display_name": "C"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    running.shutdown().await;
}

async fn health_reports_the_store<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let r = api.get("/health").await;
    assert_eq!(r.status, 200);
    let v: Value = r.json();
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["checks"]["store"]["status"], "healthy");
    assert_eq!(v["checks"]["store"]["kind"], B::KIND);
    running.shutdown().await;
}

async fn invalid_registrations_are_400_and_lose_nothing<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let id = api.register("http://svca:8000", "A").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "malformed JSON",
            b"{\"url\": ".to_vec(),
            "invalid registration body",
        ),
        (
            "not an object",
            b"[1,2]".to_vec(),
            "invalid registration body",
        ),
        (
            "missing url",
            br#"{"info":{"display_name":"A"}}"#.to_vec(),
            "url",
        ),
        (
            "url not a string",
            br#"{"url":5,"info":{"display_name":"A"}}"#.to_vec(),
            "invalid type",
        ),
        (
            "relative url",
            br#"{"url":"svca:8000","info":{"display_name":"A"}}"#.to_vec(),
            "invalid url",
        ),
        (
            "ftp url",
            br#"{"url":"ftp://svca","info":{"display_name":"A"}}"#.to_vec(),
            "http or https",
        ),
        (
            "no host",
            br#"{"url":"http://","info":{"display_name":"A"}}"#.to_vec(),
            "invalid url",
        ),
        (
            "missing info",
            br#"{"url":"http://svca:8000"}"#.to_vec(),
            "info",
        ),
        (
            "missing display_name",
            br#"{"url":"http://svca:8000","info":{}}"#.to_vec(),
            "display_name",
        ),
        (
            "blank display_name",
            br#"{"url":"http://svca:8000","info":{"display_name":"  "}}"#.to_vec(),
            "display_name",
        ),
        (
            "display_name not a string",
            br#"{"url":"http://svca:8000","info":{"display_name":3}}"#.to_vec(),
            "invalid type",
        ),
    ];
    for (what, body, needle) in cases {
        let r = api
            .send(
                Method::POST,
                "/services/$register",
                &[("content-type", "application/json")],
                Some(body),
            )
            .await;
        let p = r.assert_problem(400, t::BAD_REQUEST);
        assert!(
            p["detail"].as_str().unwrap().contains(needle),
            "{what}: detail should mention {needle:?}: {p}"
        );
        assert_eq!(p["instance"], "/services/$register");
    }
    // The earlier registration is untouched and the server still answers.
    let record: ServiceRecord = api.get(&format!("/services/{id}")).await.json();
    assert_eq!(record.url, "http://svca:8000");
    assert_eq!(api.get("/health").await.status, 200);
    running.shutdown().await;
}

async fn non_json_bodies_are_415_and_bodiless_pings_need_no_type<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let body = br#"{"url":"http://svca:8000","info":{"display_name":"A"}}"#.to_vec();
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
    ] {
        let r = api
            .send(
                Method::POST,
                "/services/$register",
                &[("content-type", ct)],
                Some(body.clone()),
            )
            .await;
        r.assert_problem(415, t::UNSUPPORTED_MEDIA_TYPE);
    }
    let r = api
        .send(
            Method::POST,
            "/services/$register",
            &[("content-type", "application/json; charset=utf-8")],
            Some(body),
        )
        .await;
    assert_eq!(r.status, 201);
    let id = r.json::<Value>()["id"].as_str().unwrap().to_owned();
    let r = api
        .send(Method::PUT, &format!("/services/{id}/$ping"), &[], None)
        .await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    // An empty ping is a ping whatever type a client puts on it (curl -d '' says
    // form-urlencoded, fetch() text/plain); a health report in another type is a 415.
    let ping = format!("/services/{id}/$ping");
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let r = api
            .send(
                Method::PUT,
                &ping,
                &[("content-type", ct)],
                Some(Vec::new()),
            )
            .await;
        assert_eq!(r.status, 200, "{ct}: {r:?}");
        let report = br#"{"status":"critical"}"#.to_vec();
        api.send(Method::PUT, &ping, &[("content-type", ct)], Some(report))
            .await
            .assert_problem(415, t::UNSUPPORTED_MEDIA_TYPE);
    }
    let record: Value = api.get(&format!("/services/{id}")).await.json();
    assert_eq!(record["health"]["status"], "passing");
    running.shutdown().await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let mut config = Config::for_tests();
    config.max_body_bytes = 1024;
    let (running, api) = start(config).await;
    let big =
        json!({"url": "http://svca:8000", "info": {"display_name": "A", "pad": "x".repeat(2000)}});
    let r = api.post_json("/services/$register", &big).await;
    r.assert_problem(413, t::PAYLOAD_TOO_LARGE);

    // Without a Content-Length (chunked), the limit holds while streaming.
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..8)
        .map(|_| Ok(Frame::data(Bytes::from(vec![b' '; 400]))))
        .collect();
    let body = StreamBody::new(futures_lite_stream(chunks));
    let client = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::post(format!("{}/services/$register", api.base()))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let res = client.request(req).await.expect("sent");
    assert_eq!(res.status(), 413);

    // Just under the limit is fine.
    let ok =
        json!({"url": "http://svca:8000", "info": {"display_name": "A", "pad": "x".repeat(900)}});
    assert_eq!(api.post_json("/services/$register", &ok).await.status, 201);
    running.shutdown().await;
}

/// A stream over a vector, without pulling in a stream crate.
fn futures_lite_stream<T: Unpin>(items: Vec<T>) -> impl futures_core::Stream<Item = T> + Unpin {
    struct Iter<T>(std::vec::IntoIter<T>);
    impl<T: Unpin> futures_core::Stream for Iter<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Iter(items.into_iter())
}

#[tokio::test]
async fn wrong_methods_are_405_with_allow_and_unknown_routes_404() {
    let (running, api) = start_default().await;
    let id = ulid::Ulid::new();
    let cases = [
        (Method::GET, "/services/$register".to_owned(), "POST"),
        (Method::POST, "/services".to_owned(), "GET, HEAD"),
        (
            Method::PATCH,
            format!("/services/{id}"),
            "GET, HEAD, DELETE",
        ),
        (Method::GET, format!("/services/{id}/$ping"), "PUT"),
        (Method::POST, "/health".to_owned(), "GET, HEAD"),
    ];
    for (method, path, allow) in cases {
        let r = api.send(method, &path, &[], None).await;
        r.assert_problem(405, t::METHOD_NOT_ALLOWED);
        assert_eq!(r.header("allow"), Some(allow), "{path}");
    }
    for path in ["/", "/nope", "/services/a/b/c", "/services/x/$pong"] {
        api.get(path).await.assert_problem(404, t::NOT_FOUND);
    }
    running.shutdown().await;
}

async fn registration_key_guards_writes_only<B: Backend>() {
    let mut config = Config::for_tests();
    config.registration_key = Some("s3cret".into());
    let (running, api) = B::start(config).await;
    let body =
        serde_json::to_vec(&json!({"url": "http://svca:8000", "info": {"display_name": "A"}}))
            .unwrap();
    let json_ct = ("content-type", "application/json");

    for headers in [
        vec![json_ct],
        vec![json_ct, ("x-service-key", "wrong")],
        vec![json_ct, ("x-service-key", "s3cre")],
        vec![json_ct, ("authorization", "Bearer wrong")],
        vec![json_ct, ("authorization", "Basic s3cret")],
    ] {
        let r = api
            .send(
                Method::POST,
                "/services/$register",
                &headers,
                Some(body.clone()),
            )
            .await;
        let p = r.assert_problem(401, t::UNAUTHORIZED);
        assert!(p["detail"].as_str().unwrap().contains("X-Service-Key"));
    }
    let r = api
        .send(
            Method::POST,
            "/services/$register",
            &[json_ct, ("x-service-key", "s3cret")],
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status, 201);
    let id = r.json::<Value>()["id"].as_str().unwrap().to_owned();
    let r = api
        .send(
            Method::POST,
            "/services/$register",
            &[json_ct, ("authorization", "Bearer s3cret")],
            Some(body),
        )
        .await;
    assert_eq!(r.status, 200);

    let ping = format!("/services/{id}/$ping");
    api.put(&ping).await.assert_problem(401, t::UNAUTHORIZED);
    let r = api
        .send(Method::PUT, &ping, &[("x-service-key", "s3cret")], None)
        .await;
    assert_eq!(r.status, 200);

    // Reads stay open.
    assert_eq!(api.get("/services").await.status, 200);
    assert_eq!(api.get(&format!("/services/{id}")).await.status, 200);
    assert_eq!(api.get("/health").await.status, 200);

    let path = format!("/services/{id}");
    api.delete(&path).await.assert_problem(401, t::UNAUTHORIZED);
    assert_eq!(
        api.get(&path).await.status,
        200,
        "a refused delete deletes nothing"
    );
    let r = api
        .send(
            Method::DELETE,
            &path,
            &[("authorization", "Bearer s3cret")],
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    running.shutdown().await;
}

#[tokio::test]
async fn leased_entries_refuse_strangers() {
    let (running, api) = start_default().await;
    support::lease::leased_entries_refuse_strangers(&api, None).await;
    // Three strangers, each refused on ping, DELETE and at least one re-registration.
    let metrics = api.get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    let rejections = text
        .lines()
        .find_map(|l| l.strip_prefix("servicekit_lease_rejections_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(
        rejections.is_some_and(|n| n >= 9.0),
        "lease rejections counted: {rejections:?}\n{text}"
    );
    running.shutdown().await;
}

async fn the_admin_key_may_do_any_write_and_stands_in_for_the_registration_key<B: Backend>() {
    let mut config = Config::for_tests();
    config.admin_key = Some("adm1n".into());
    let (running, api) = B::start(config).await;
    support::lease::leased_entries_refuse_strangers(&api, Some("adm1n")).await;
    running.shutdown().await;

    let mut config = Config::for_tests();
    config.admin_key = Some("adm1n".into());
    config.registration_key = Some("s3cret".into());
    let (running, api) = B::start(config).await;
    let body =
        serde_json::to_vec(&json!({"url": "http://svca:8000", "info": {"display_name": "A"}}))
            .unwrap();
    let json_ct = ("content-type", "application/json");
    for (headers, status) in [
        (vec![json_ct, ("x-admin-key", "adm1n")], 201),
        (vec![json_ct, ("x-admin-key", "wrong")], 401),
        (vec![json_ct, ("x-lease-token", "adm1n")], 401),
    ] {
        let r = api
            .send(
                Method::POST,
                "/services/$register",
                &headers,
                Some(body.clone()),
            )
            .await;
        assert_eq!(r.status, status, "{headers:?}: {r:?}");
    }
    running.shutdown().await;
}

async fn require_lease_refuses_registrations_without_one<B: Backend>() {
    let mut config = Config::for_tests();
    config.require_lease = true;
    let (running, api) = B::start(config).await;
    for body in [
        json!({"url": "http://svca:8000", "info": {"display_name": "A"}}),
        json!({"url": "http://svca:8000", "info": {"display_name": "A"}, "lease": false}),
    ] {
        let r = api.post_json("/services/$register", &body).await;
        let p = r.assert_problem(400, t::BAD_REQUEST);
        assert!(p["detail"].as_str().unwrap().contains("lease"), "{p}");
    }
    assert_eq!(api.get("/services").await.json::<Value>()["count"], 0);
    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://svca:8000", "info": {"display_name": "A"}, "lease": true}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert!(r.json::<Value>()["lease_token"].is_string());
    running.shutdown().await;
}

#[tokio::test]
async fn an_empty_registration_key_means_none() {
    let mut config = Config::for_tests();
    config.registration_key = Some(String::new());
    let (running, api) = start(config).await;
    // Not "send an empty key": no key at all is required.
    api.register("http://svca:8000", "A").await;
    running.shutdown().await;
}

async fn credentials_in_service_urls_are_refused<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://user:pw@svca:8000", "info": {"display_name": "A"}}),
        )
        .await;
    let p = r.assert_problem(400, t::BAD_REQUEST);
    assert!(p["detail"].as_str().unwrap().contains("password"), "{p}");
    let list: Value = api.get("/services").await.json();
    assert_eq!(list["count"], 0);
    running.shutdown().await;
}

async fn head_requests_answer_without_a_body<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let id = api.register("http://svca:8000", "A").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for path in [
        "/health".to_owned(),
        "/services".to_owned(),
        format!("/services/{id}"),
    ] {
        let r = api.send(Method::HEAD, &path, &[], None).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.body.is_empty(), "{path}");
    }
    running.shutdown().await;
}

async fn urls_come_from_public_url_or_host<B: Backend>() {
    let mut config = Config::for_tests();
    config.public_url = Some("https://registry.example:443/base".into());
    let (running, api) = B::start(config).await;
    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": "http://svca:8000", "info": {"display_name": "A"}}),
        )
        .await;
    let v: Value = r.json();
    let id = v["id"].as_str().unwrap();
    assert_eq!(
        v["ping_url"],
        format!("https://registry.example:443/base/services/{id}/$ping")
    );
    assert_eq!(
        r.header("location"),
        Some(format!("https://registry.example:443/base/services/{id}").as_str())
    );
    running.shutdown().await;

    let (running, api) = B::start(Config::for_tests()).await;
    let body =
        serde_json::to_vec(&json!({"url": "http://svcb:8000", "info": {"display_name": "B"}}))
            .unwrap();
    let r = api
        .send(
            Method::POST,
            "/services/$register",
            &[
                ("content-type", "application/json"),
                ("host", "orchestrator:9000"),
            ],
            Some(body),
        )
        .await;
    let v: Value = r.json();
    let id = v["id"].as_str().unwrap();
    assert_eq!(
        v["ping_url"],
        format!("http://orchestrator:9000/services/{id}/$ping")
    );
    running.shutdown().await;
}

#[tokio::test]
async fn http2_prior_knowledge_works() {
    let (running, api) = start_default().await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = http::Request::get(format!("{}/health", api.base()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = client.request(req).await.expect("h2 request");
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    running.shutdown().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests() {
    let (running, api) = start_default().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<StreamBody<_>>();
    // Warm up: the server has accepted this client's (kept-alive) connection before the
    // request under test starts, so shutdown cannot race the accept.
    let (warm_tx, warm_rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    drop(warm_tx);
    let warm = http::Request::get(format!("{}/health", api.base()))
        .body(StreamBody::new(tokio_stream_from(warm_rx)))
        .unwrap();
    let warm = client.request(warm).await.expect("warm-up");
    assert_eq!(warm.status(), 200);
    warm.into_body().collect().await.expect("warm-up body");
    // A registration whose body arrives in two parts, with the shutdown in between.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
    let body = StreamBody::new(tokio_stream_from(rx));
    let req = http::Request::post(format!("{}/services/$register", api.base()))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let in_flight = tokio::spawn(async move { client.request(req).await });
    tx.send(Ok(Frame::data(Bytes::from_static(
        br#"{"url":"http://svca:8000","#,
    ))))
    .await
    .unwrap();
    // Wait until the server holds the request (the first chunk was consumed).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tx.capacity() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server did not take the first body chunk within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopping = tokio::spawn(running.shutdown());
    // New connections are refused once shutdown began.
    let refused_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(api.base().trim_start_matches("http://"))
            .await
            .is_err()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < refused_deadline,
            "still accepting after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !stopping.is_finished(),
        "shutdown must wait for the in-flight request"
    );
    tx.send(Ok(Frame::data(Bytes::from_static(
        br#""info":{"display_name":"A"}}"#,
    ))))
    .await
    .unwrap();
    drop(tx);
    let res = in_flight
        .await
        .unwrap()
        .expect("in-flight request answered");
    assert_eq!(res.status(), 201);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(serde_json::from_slice::<Value>(&body).unwrap()["id"].is_string());
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown completes after the request")
        .unwrap();
}

fn tokio_stream_from<T>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_core::Stream<Item = T> {
    struct Rx<T>(tokio::sync::mpsc::Receiver<T>);
    impl<T> futures_core::Stream for Rx<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
    Rx(rx)
}

/// A ping carrying `body` (JSON) for the entry `id`.
async fn ping_with(api: &Api, id: &str, body: &str) -> support::http::Reply {
    api.send(
        Method::PUT,
        &format!("/services/{id}/$ping"),
        &[("content-type", "application/json")],
        Some(body.as_bytes().to_vec()),
    )
    .await
}

async fn health_of(api: &Api, id: &str) -> Value {
    let r = api.get(&format!("/services/{id}")).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.json::<Value>()["health"].clone()
}

async fn ping_bodies_report_health<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let id = api.register("http://svca:8000", "A").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        health_of(&api, &id).await,
        json!({"status": "passing", "output": ""}),
        "a new entry is passing, never checked"
    );
    let r = ping_with(&api, &id, r#"{"status":"critical","output":"db down"}"#).await;
    assert_eq!(r.status, 200, "{r:?}");
    let pinged: Value = r.json();
    let h = health_of(&api, &id).await;
    assert_eq!(
        (&h["status"], &h["output"]),
        (&json!("critical"), &json!("db down"))
    );
    assert_eq!(h["checked_at"], pinged["last_ping_at"], "{h}");

    // A ping without a body (the reference client's), or with `null`, keeps the health.
    assert_eq!(api.put(&format!("/services/{id}/$ping")).await.status, 200);
    assert_eq!(ping_with(&api, &id, "null").await.status, 200);
    assert_eq!(health_of(&api, &id).await["status"], "critical");

    // Bad reports are 400 problems and change nothing, not even the TTL's clock.
    for bad in [
        r#"{"status":"sick"}"#,
        r#"{"output":"no status"}"#,
        r#"[1]"#,
        r#"{"status":"passing""#,
    ] {
        let p = ping_with(&api, &id, bad)
            .await
            .assert_problem(400, t::BAD_REQUEST);
        assert!(
            p["detail"].as_str().unwrap().contains("ping body"),
            "{bad}: {p}"
        );
    }
    assert_eq!(health_of(&api, &id).await["output"], "db down");
    // A field this version does not know (a newer client's) is ignored.
    let r = ping_with(
        &api,
        &id,
        r#"{"status":"critical","output":"db down","later":1}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");

    // Output is cut to 1 KiB; a report of passing brings the entry back.
    let long = "x".repeat(5000);
    let r = ping_with(
        &api,
        &id,
        &json!({"status": "passing", "output": long}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
    let h = health_of(&api, &id).await;
    assert_eq!(h["status"], "passing");
    assert_eq!(h["output"].as_str().unwrap().len(), 1024);

    // An unknown entry is 404, body or not.
    let unknown = ulid::Ulid::new();
    ping_with(&api, &unknown.to_string(), r#"{"status":"passing"}"#)
        .await
        .assert_problem(404, t::NOT_FOUND);
    running.shutdown().await;
}

async fn lists_filter_by_health<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    let mut ids = Vec::new();
    for (port, status) in [(1, "passing"), (2, "warning"), (3, "critical")] {
        let id = api.register(&format!("http://svc:{port}"), "svc").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let body = json!({"status": status}).to_string();
        assert_eq!(ping_with(&api, &id, &body).await.status, 200);
        ids.push(id);
    }
    let listed = |query: &'static str| {
        let api = &api;
        async move {
            let r = api.get(&format!("/services?{query}")).await;
            assert_eq!(r.status, 200, "{query}: {r:?}");
            let v: Value = r.json();
            v["services"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed("health=passing").await, ids[..1]);
    assert_eq!(listed("health=passing,warning").await, ids[..2]);
    assert_eq!(listed("health=critical&display_name=svc").await, ids[2..]);
    assert_eq!(listed("health=warning,critical&limit=1").await, ids[1..2]);
    assert_eq!(listed("display_name=svc").await, ids);
    let p = api
        .get("/services?health=passing,sick")
        .await
        .assert_problem(400, t::BAD_REQUEST);
    assert!(p["detail"].as_str().unwrap().contains("sick"), "{p}");
    running.shutdown().await;
}

async fn checks_are_validated_and_kept_with_the_record<B: Backend>() {
    let (running, api) = B::start(Config::for_tests()).await;
    // Port 9 (discard) refuses at once: the orchestrator's own checks of it stay harmless.
    let url = "http://127.0.0.1:9";
    let register = |check: Value| {
        let api = &api;
        async move {
            api.post_json(
                "/services/$register",
                &json!({"url": url, "info": {"display_name": "A"}, "check": check}),
            )
            .await
        }
    };
    let r = register(json!({"http": "/health", "interval_seconds": 30})).await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.json::<Value>()["id"].as_str().unwrap().to_owned();
    let record: Value = api.get(&format!("/services/{id}")).await.json();
    assert_eq!(
        record["check"],
        json!({"http": "/health", "interval_seconds": 30, "timeout_seconds": 2,
               "failures_before_critical": 2, "successes_before_passing": 2})
    );

    let bad = [
        (json!({"http": "http://other.example:9/health"}), "own host"),
        (json!({"http": "/health", "tcp": true}), "only one"),
        (json!({}), "one of http, tcp or grpc"),
        (
            json!({"tcp": true, "interval_seconds": 0}),
            "interval_seconds",
        ),
        (
            json!({"tcp": true, "interval_seconds": 5, "timeout_seconds": 6}),
            "timeout_seconds",
        ),
        (
            json!({"tcp": true, "failures_before_critical": 0}),
            "failures_before_critical",
        ),
        (
            json!({"tcp": true, "deregister_critical_after_seconds": 0}),
            "deregister",
        ),
        (json!({"htp": "/health"}), "unknown field"),
        (json!({"http": "gopher://127.0.0.1:9/"}), "scheme"),
    ];
    for (check, says) in bad {
        let p = register(check.clone())
            .await
            .assert_problem(400, t::BAD_REQUEST);
        assert!(p["detail"].as_str().unwrap().contains(says), "{check}: {p}");
    }
    // None of that touched the entry; a registration without a check removes it.
    let record: Value = api.get(&format!("/services/{id}")).await.json();
    assert_eq!(record["check"]["interval_seconds"], 30);
    let r = api
        .post_json(
            "/services/$register",
            &json!({"url": url, "info": {"display_name": "A"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let record: Value = api.get(&format!("/services/{id}")).await.json();
    assert!(record.get("check").is_none(), "{record}");
    running.shutdown().await;
}
