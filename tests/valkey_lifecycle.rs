//! The layer against an orchestrator on a real Valkey: losing every entry (FLUSHALL) is
//! healed by the next ping's 404, and the instance keeps its id.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use support::valkey::ValkeyServer;
use support::*;

/// Sends `FLUSHALL` over RESP and checks the `+OK`.
fn flushall(port: u16) {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to valkey");
    conn.write_all(b"*1\r\n$8\r\nFLUSHALL\r\n").expect("send");
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).expect("answer");
    assert_eq!(&buf, b"+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_valkey_is_healed_with_the_same_id() {
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

    flushall(valkey.port());
    assert!(
        entries_for(&api, &url).await.is_empty(),
        "FLUSHALL removed the entry"
    );
    // One keepalive interval (ttl/3 = 1 s) plus the re-registration round trip.
    let again = registered(&api, &url, Duration::from_secs(5)).await;
    assert_eq!(again["id"], first["id"]);

    served.shutdown().await;
    assert!(entries_for(&api, &url).await.is_empty());
    orch.shutdown().await;
}
