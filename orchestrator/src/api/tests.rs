use super::*;

const TTL_30: Duration = Duration::from_secs(30);

/// A store that never answers.
struct Hangs;

impl Listing for Hangs {
    fn next_page(
        &mut self,
        _: usize,
    ) -> impl Future<Output = Result<Vec<Arc<ServiceRecord>>, StoreError>> + Send {
        std::future::pending()
    }
}

impl Store for Hangs {
    type Listing = Hangs;

    fn kind(&self) -> &'static str {
        "hangs"
    }
    fn ttl(&self) -> Duration {
        Duration::from_secs(30)
    }
    fn register_as(
        &self,
        _: Registration,
        _: Access,
        _: Option<LeaseHash>,
    ) -> impl Future<Output = Result<Registered, StoreError>> + Send {
        std::future::pending()
    }
    fn ping_as(
        &self,
        _: Ulid,
        _: Access,
    ) -> impl Future<Output = Result<Option<Pinged>, StoreError>> + Send {
        std::future::pending()
    }
    fn get(
        &self,
        _: Ulid,
    ) -> impl Future<Output = Result<Option<ServiceRecord>, StoreError>> + Send {
        std::future::pending()
    }
    fn listing(
        &self,
        _: ListFilter,
        _: Option<Ulid>,
    ) -> impl Future<Output = Result<Hangs, StoreError>> + Send {
        std::future::pending()
    }
    fn deregister_as(
        &self,
        _: Ulid,
        _: Access,
    ) -> impl Future<Output = Result<Option<ServiceRecord>, StoreError>> + Send {
        std::future::pending()
    }
    fn set_health(
        &self,
        _: Ulid,
        _: Health,
        _: Access,
    ) -> impl Future<Output = Result<Option<HealthSet>, StoreError>> + Send {
        std::future::pending()
    }
    fn checkers(
        &self,
        _: &str,
        _: Duration,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        std::future::pending()
    }
    fn sweep(&self) -> impl Future<Output = Result<usize, StoreError>> + Send {
        std::future::pending()
    }
    fn health(&self) -> impl Future<Output = Result<StoreHealth, StoreError>> + Send {
        std::future::pending()
    }
    fn count(&self) -> impl Future<Output = Result<u64, StoreError>> + Send {
        std::future::pending()
    }
    fn change_head(&self) -> impl Future<Output = Result<Cursor, StoreError>> + Send {
        std::future::pending()
    }
    fn changes(
        &self,
        _: Cursor,
        _: usize,
        _: Duration,
    ) -> impl Future<Output = Result<Changes, StoreError>> + Send {
        std::future::pending()
    }
    fn reap(&self) -> impl Future<Output = Result<usize, StoreError>> + Send {
        std::future::pending()
    }
}

/// `op`'s outcome, failing the test when it is not bounded (a minute of paused time).
async fn settles<T>(what: &str, op: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), op)
        .await
        .unwrap_or_else(|_| panic!("{what} on a hung store is not bounded"))
}

fn unavailable<T: std::fmt::Debug>(what: &str, outcome: Result<T, StoreError>) {
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "{what}: {outcome:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn every_store_call_is_bounded() {
    let store = Bounded::new(Hangs);
    let id = Ulid::new();
    let registration = Registration {
        url: "http://svca:8000".into(),
        info: serde_json::from_value(json!({"display_name": "A"})).expect("info"),
        requested_id: None,
        check: None,
    };
    unavailable(
        "register",
        settles("register", store.register(registration)).await,
    );
    unavailable("ping", settles("ping", store.ping(id)).await);
    unavailable("get", settles("get", store.get(id)).await);
    let health = store.set_health(id, Health::default(), Access::default());
    unavailable("set_health", settles("set_health", health).await);
    unavailable(
        "checkers",
        settles("checkers", store.checkers("r", TTL_30)).await,
    );
    let filter = ListFilter::default();
    unavailable("list", settles("list", store.list(&filter)).await);
    unavailable("count", settles("count", store.count()).await);
    let mut listing = BoundedListing {
        inner: Hangs,
        metrics: store.metrics().clone(),
    };
    unavailable("page", settles("page", listing.next_page(1)).await);
    unavailable(
        "deregister",
        settles("deregister", store.deregister(id)).await,
    );
    unavailable("sweep", settles("sweep", store.sweep()).await);
    unavailable("health", settles("health", store.health()).await);
    unavailable("count", settles("count", store.count()).await);
}

#[tokio::test(start_paused = true)]
async fn a_hung_store_is_a_503_for_every_route_that_uses_it() {
    let api = Api::new(
        Hangs,
        None,
        None,
        1024,
        SocketAddr::from(([127, 0, 0, 1], 9)),
    );
    let id = Ulid::new();
    let register = br#"{"url":"http://svca:8000","info":{"display_name":"A"}}"#;
    for (method, path, body) in [
        (Method::DELETE, format!("/services/{id}"), &b""[..]),
        (Method::GET, format!("/services/{id}"), b""),
        (Method::PUT, format!("/services/{id}/$ping"), b""),
        (Method::GET, "/services".to_owned(), b""),
        (Method::POST, "/services/$register".to_owned(), register),
    ] {
        let req = Request::builder()
            .method(method.clone())
            .uri(&path)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(body)))
            .expect("request");
        let what = format!("{method} {path}");
        let response = settles(&what, api.handle(req)).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{what}");
        assert_eq!(
            response
                .headers()
                .get(CONTENT_TYPE)
                .map(HeaderValue::as_bytes),
            Some(servicekit::protocol::PROBLEM_JSON.as_bytes()),
            "{what}"
        );
    }
    let req = Request::get("/health")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = settles("GET /health", api.handle(req)).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The metrics still answer, without the count the store could not give.
    let req = Request::get("/metrics")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = settles("GET /metrics", api.handle(req)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    // Two failed counts: the direct call above and the scrape's own.
    assert!(
        text.contains("servicekit_store_operation_errors_total{op=\"count\"} 2"),
        "{text}"
    );
    assert!(!text.contains("servicekit_registrations "), "{text}");
}

#[test]
fn urls_are_canonical() {
    assert_eq!(
        canonical_url("http://svca:8000").unwrap(),
        "http://svca:8000"
    );
    assert_eq!(
        canonical_url("HTTP://SvcA:8000/").unwrap(),
        "http://svca:8000"
    );
    assert_eq!(canonical_url("http://svca:80/").unwrap(), "http://svca");
    assert_eq!(
        canonical_url("http://[::1]:8000").unwrap(),
        "http://[::1]:8000"
    );
    assert_eq!(canonical_url("https://a/b/").unwrap(), "https://a/b/");
    for bad in [
        "svca:8000",
        "ftp://a",
        "http://",
        "/relative",
        "",
        "http://a#x",
        "mailto:a@b",
    ] {
        assert!(canonical_url(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn routes_parse() {
    assert!(matches!(
        Route::parse("/services/$register"),
        Some(Route::Register)
    ));
    assert!(matches!(
        Route::parse("/services/%24register"),
        Some(Route::Register)
    ));
    let id = Ulid::new();
    assert_eq!(
        Route::parse(&format!("/services/{id}/$ping")),
        Some(Route::Ping(Some(id)))
    );
    assert_eq!(
        Route::parse(&format!("/services/{id}")),
        Some(Route::Service(Some(id)))
    );
    assert_eq!(Route::parse("/services/X"), Some(Route::Service(None)));
    assert_eq!(Route::parse("/services/X/$ping"), Some(Route::Ping(None)));
    assert!(Route::parse("/services/X/other").is_none());
    assert!(Route::parse("/services/X/$ping/y").is_none());
    assert!(Route::parse("/nope").is_none());
    assert_eq!(Route::parse("/metrics"), Some(Route::Metrics));
}

#[test]
fn route_labels_are_patterns_never_paths() {
    let id = Ulid::new();
    for (path, label) in [
        ("/health".to_owned(), "/health"),
        ("/metrics".to_owned(), "/metrics"),
        ("/services".to_owned(), "/services"),
        ("/services/".to_owned(), "/services"),
        ("/services/$register".to_owned(), "/services/$register"),
        ("/services/%24register".to_owned(), "/services/$register"),
        (format!("/services/{id}"), "/services/{id}"),
        ("/services/not-an-id".to_owned(), "/services/{id}"),
        (format!("/services/{id}/$ping"), "/services/{id}/$ping"),
        (format!("/services/{id}/%24ping"), "/services/{id}/$ping"),
        ("/".to_owned(), "/"),
        ("/ui".to_owned(), "/ui"),
        ("/ui/".to_owned(), "/ui"),
        ("/ui/dashboard.js".to_owned(), "/ui/{file}"),
        ("/ui/no-such-file".to_owned(), "/ui/{file}"),
        ("/openapi.json".to_owned(), "/openapi.json"),
        ("/docs".to_owned(), "/docs"),
        ("/docs/".to_owned(), "/docs"),
        ("/docs/swagger-ui.css".to_owned(), "/docs/{file}"),
        ("/nope".to_owned(), "unmatched"),
        ("/services/a/b/c".to_owned(), "unmatched"),
        ("/\u{1b}[31m".to_owned(), "unmatched"),
    ] {
        assert_eq!(route_label(&path), label, "{path:?}");
    }
}

#[test]
fn display_names_with_control_or_bidi_characters_are_refused() {
    let reg = |name: &str| {
        validate_registration(
            serde_json::from_value(
                json!({"url": "http://svca:8000", "info": {"display_name": name}}),
            )
            .expect("request"),
        )
    };
    for bad in [
        "x\n2026-01-01T00:00:00Z INFO service.deregistered id=forged",
        "red \u{1b}[31m",
        "a\rb",
        "tab\there",
        "nul\0",
        "del\u{7f}",
        "c1\u{9b}31m",
        "evil\u{202e}gnp.exe",
        "iso\u{2066}late",
    ] {
        match reg(bad) {
            Err(ApiError::BadRequest(detail)) => {
                assert!(detail.contains("control characters"), "{detail}");
                assert!(
                    !detail.contains(bad),
                    "the detail repeats the name: {detail}"
                );
            }
            other => panic!("{bad:?} accepted: {other:?}"),
        }
    }
    // Surrounding whitespace (newlines included) is trimmed, not refused; letters of any
    // script, emoji and joiners are fine.
    for good in ["A", "  A\n", "Zürich 日本 👩‍💻", "a\u{200d}b"] {
        assert!(reg(good).is_ok(), "{good:?} refused");
    }
}

#[test]
fn only_canonical_ulid_text_is_an_id() {
    for id in [Ulid::new(), Ulid(0), Ulid(u128::MAX), Ulid(1 << 127)] {
        assert_eq!(parse_id(&id.to_string()), Some(id), "{id}");
    }
    let id = Ulid::new().to_string();
    let tail = &id[1..];
    for bad in [
        String::new(),
        "nope".into(),
        id.to_lowercase(),
        format!("8{tail}"),
        format!("G{tail}"),
        format!("R{tail}"),
        format!("Z{tail}"),
        format!("{}I", &id[..25]),
        format!("{}L", &id[..25]),
        format!("{}O", &id[..25]),
        format!("{}U", &id[..25]),
        format!("{id}0"),
        id[..25].to_owned(),
        format!("{}é", &id[..24]),
    ] {
        assert_eq!(parse_id(&bad), None, "{bad:?} accepted");
    }
}

#[test]
fn filters_parse() {
    let q = parse_list_query("display_name=A%20B&info.team=data&url=http://x:1/").unwrap();
    let f = q.filter;
    assert_eq!(f.display_name.as_deref(), Some("A B"));
    assert_eq!(f.url.as_deref(), Some("http://x:1"));
    assert_eq!(f.info, vec![("team".to_owned(), "data".to_owned())]);
    assert_eq!((q.limit, q.cursor), (None, None));
    assert!(parse_list_query("colour=red").is_err());
    assert!(parse_list_query("info.=x").is_err());
}

#[test]
fn limit_and_cursor_parse() {
    let id = Ulid::new();
    let q = parse_list_query(&format!("limit=10&cursor={id}&display_name=A")).unwrap();
    assert_eq!((q.limit, q.cursor), (Some(10), Some(id)));
    let q = parse_list_query(&format!("limit={MAX_PAGE}")).unwrap();
    assert_eq!(q.limit, Some(MAX_PAGE));
    let over = (MAX_PAGE + 1).to_string();
    for bad in ["0", "-1", "x", "", "1.5", over.as_str()] {
        assert!(parse_list_query(&format!("limit={bad}")).is_err(), "{bad}");
    }
    let lower = id.to_string().to_lowercase();
    for bad in ["", "nope", lower.as_str()] {
        assert!(parse_list_query(&format!("cursor={bad}")).is_err(), "{bad}");
    }
}
