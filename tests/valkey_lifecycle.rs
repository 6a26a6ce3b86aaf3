//! The layer against an orchestrator on a real Valkey: losing every entry (FLUSHALL) is
//! healed by the next ping's 404, and the instance keeps its id.

mod support;

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use serde_json::Value;
use servicekit::protocol::Timestamp;
use support::valkey::ValkeyServer;
use support::*;

fn registered_at(entry: &Value) -> Timestamp {
    serde_json::from_value(entry["registered_at"].clone()).expect("registered_at is a timestamp")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_valkey_is_healed() {
    let valkey = ValkeyServer::new();
    let (orch, api) = orchestrator(3, Some(valkey.url())).await;
    let listener = listener().await;
    let port = listener.local_addr().expect("addr").port();
    let layer = builder(&orch.base_url(), port).build().expect("config");
    let app = Router::new()
        .route("/", get(|| async { "hi" }))
        .layer(layer.clone());
    let served = serve(listener, app, &layer);
    let url = format!("http://127.0.0.1:{port}");
    let first = registered(&api, &url, Duration::from_secs(15)).await;
    let first_at = registered_at(&first);

    assert_eq!(valkey.command(&["FLUSHALL"]), "+OK");
    // The next keepalive (every ttl/3 = 1 s) gets a 404 and registers again, possibly before
    // this test looks, so wait for the new entry rather than for the gap. Registering an
    // existing entry keeps its registered_at, so a later one proves the entry was lost and
    // created anew.
    let again = eventually(
        "the layer to register again after FLUSHALL",
        Duration::from_secs(20),
        || async {
            let entries = entries_for(&api, &url).await;
            assert!(entries.len() <= 1, "one URL, one entry: {entries:?}");
            entries
                .into_iter()
                .find(|entry| registered_at(entry) > first_at)
        },
    )
    .await;
    // The flush took the URL's binding to its id with it: nothing proves the old id was this
    // URL's any more, so the entry comes back under a fresh one (store/mod.rs docs).
    assert_ne!(again["id"], first["id"], "re-registered under a fresh id");

    served.shutdown().await;
    assert!(entries_for(&api, &url).await.is_empty());
    orch.shutdown().await;
}
