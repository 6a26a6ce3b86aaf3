//! The pages served from the binary (the dashboard, the OpenAPI document, Swagger UI), through
//! real sockets: what a browser gets, what tools get, and that every file a page loads is there.
//! What the pages do in a browser is `tests/dashboard_browser.rs` (servicekit-tests).

mod support;

use http::Method;
use serde_json::Value;
use servicekit::protocol::problem_type as t;
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::{self, Running};
use support::http::{Api, Reply};

const BROWSER_ACCEPT: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";

async fn start(config: Config) -> (Running, Api) {
    let running = server::start(config).await.expect("orchestrator starts");
    let api = Api::new(running.base_url());
    (running, api)
}

async fn get_as_browser(api: &Api, path: &str) -> Reply {
    api.send(Method::GET, path, &[("accept", BROWSER_ACCEPT)], None)
        .await
}

/// The `src`/`href` values of a page's `<script>` and `<link>` elements (not its `<a>` links,
/// which lead to other pages and endpoints).
fn loaded_files(html: &str) -> Vec<String> {
    let mut files = Vec::new();
    for tag in html.split('<').skip(1) {
        if !(tag.starts_with("script ") || tag.starts_with("link ")) {
            continue;
        }
        let tag = tag.split('>').next().unwrap_or_default();
        for attr in ["src=\"", "href=\""] {
            if let Some(at) = tag.find(attr) {
                let rest = &tag[at + attr.len()..];
                let end = rest.find('"').unwrap_or(rest.len());
                files.push(rest[..end].to_owned());
            }
        }
    }
    files
}

/// `relative` resolved against a page at `/{page}`, as a browser does.
fn resolve(relative: &str) -> String {
    assert!(
        !relative.starts_with('/') && !relative.contains("://"),
        "{relative:?} is not relative: the pages must work under a path prefix"
    );
    format!("/{relative}")
}

#[tokio::test]
async fn a_browser_at_the_root_is_sent_to_the_dashboard_and_everything_else_gets_a_404() {
    let (running, api) = start(Config::for_tests()).await;
    let r = get_as_browser(&api, "/").await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("ui"));
    assert_eq!(r.header("vary"), Some("accept"));
    for accept in ["*/*", "application/json", "text/html;q=0"] {
        let r = api
            .send(Method::GET, "/", &[("accept", accept)], None)
            .await;
        // The same URL answers a browser differently: a shared cache must key on Accept.
        assert_eq!(r.header("vary"), Some("accept"), "{accept}");
        r.assert_problem(404, t::NOT_FOUND);
    }
    api.get("/").await.assert_problem(404, t::NOT_FOUND);
    for (path, location) in [("/ui/", "../ui"), ("/docs/", "../docs")] {
        let r = api.get(path).await;
        assert_eq!(r.status, 302, "{path}");
        assert_eq!(r.header("location"), Some(location), "{path}");
    }
    running.shutdown().await;
}

#[tokio::test]
async fn each_page_and_every_file_it_loads_is_served_with_its_type() {
    // A registration key guards writes only: the pages, like every read, need none.
    let mut config = Config::for_tests();
    config.registration_key = Some("s3cret".into());
    let (running, api) = start(config).await;
    for (page, at_least) in [("/ui", 2), ("/docs", 3)] {
        let r = get_as_browser(&api, page).await;
        assert_eq!(r.status, 200, "{page}");
        assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
        let policy = r.header("content-security-policy").unwrap_or_default();
        assert!(policy.contains("script-src 'self'"), "{page}: {policy}");
        assert!(
            policy.contains("frame-ancestors 'none'"),
            "{page}: {policy}"
        );
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        let html = String::from_utf8(r.body.to_vec()).expect("UTF-8 page");
        let files = loaded_files(&html);
        assert!(files.len() >= at_least, "{page} loads {files:?}");
        for file in files {
            let path = resolve(&file);
            let r = api.get(&path).await;
            assert_eq!(r.status, 200, "{page} loads {path}");
            let content_type = r.header("content-type").unwrap_or_default();
            let expected = match path.rsplit('.').next() {
                Some("js") => "text/javascript",
                Some("css") => "text/css",
                Some("png") => "image/png",
                Some("svg") => "image/svg+xml",
                other => panic!("{page} loads {path}, of an unexpected kind {other:?}"),
            };
            assert!(content_type.starts_with(expected), "{path}: {content_type}");
            assert!(!r.body.is_empty(), "{path} is empty");
        }
    }
    let r = api.get("/openapi.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let doc: Value = r.json();
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    running.shutdown().await;
}

#[tokio::test]
async fn pages_are_revalidated_answer_head_and_refuse_writes() {
    let (running, api) = start(Config::for_tests()).await;
    let first = api.get("/ui/dashboard.js").await;
    assert_eq!(first.header("cache-control"), Some("no-cache"));
    let etag = first.header("etag").expect("an ETag").to_owned();
    let again = api
        .send(
            Method::GET,
            "/ui/dashboard.js",
            &[("if-none-match", &etag)],
            None,
        )
        .await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    assert_eq!(again.header("etag"), Some(etag.as_str()));

    let head = api.send(Method::HEAD, "/openapi.json", &[], None).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    for path in [
        "/",
        "/ui",
        "/ui/dashboard.js",
        "/openapi.json",
        "/docs",
        "/docs/",
    ] {
        let r = api
            .send(Method::POST, path, &[], Some(b"{}".to_vec()))
            .await;
        r.assert_problem(405, t::METHOD_NOT_ALLOWED);
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{path}");
    }
    for path in [
        "/ui/nope.js",
        "/docs/index.html",
        "/ui/../openapi.json",
        "/docs/x/y",
    ] {
        api.get(path).await.assert_problem(404, t::NOT_FOUND);
    }
    running.shutdown().await;
}
