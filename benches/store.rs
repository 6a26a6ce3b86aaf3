//! Store operations — register (an update of a live URL), ping, get, list one display name,
//! list all — on the in-memory store and on a real `valkey-server`, at 1k, 10k and 100k live
//! registrations. 100 display names share the entries, so list-by-name returns 1 % of them.
//!
//! ```sh
//! cargo bench --bench store                 # full run (starts its own valkey-server)
//! cargo bench --bench store -- --test       # smoke: 1k only, every benchmark once
//! ```

#[allow(dead_code)]
#[path = "../orchestrator/tests/support/valkey.rs"]
mod valkey;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode};
use serde_json::json;
use servicekit::ServiceInfo;
use servicekit_orchestrator::store::{ListFilter, MemoryStore, Registration, Store, ValkeyStore};
use ulid::Ulid;

const NAMES: usize = 100;

/// A typical registration: ~200 bytes of info.
fn registration(i: usize) -> Registration {
    let info: ServiceInfo = serde_json::from_value(json!({
        "display_name": format!("service-{:03}", i % NAMES),
        "version": "1.4.2",
        "description": "Example workload used by the servicekit store benchmarks",
        "team": "platform",
        "deployment_env": "production",
        "capabilities": ["http", "grpc"],
        "priority": 5
    }))
    .expect("info");
    Registration {
        url: format!(
            "http://10.{}.{}.{}:8000",
            i / 65536 % 256,
            i / 256 % 256,
            i % 256
        ),
        info,
        requested_id: None,
        check: None,
    }
}

fn bench_store<S: Store + Clone>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    kind: &str,
    store: S,
    sizes: &[usize],
) {
    let mut group = c.benchmark_group(format!("store/{kind}"));
    group.sampling_mode(SamplingMode::Flat);
    let mut have = 0;
    let mut ids = Vec::new();
    for &n in sizes {
        // Grow the same store to the next size.
        let more = rt.block_on(populate_range(&store, have, n));
        ids.extend(more);
        have = n;
        let cursor = AtomicUsize::new(0);
        let pick = || ids[cursor.fetch_add(7919, Ordering::Relaxed) % ids.len()];
        group.bench_with_input(BenchmarkId::new("register_update", n), &n, |b, &n| {
            b.to_async(rt).iter(|| {
                let i = cursor.fetch_add(7919, Ordering::Relaxed) % n;
                let store = store.clone();
                async move { store.register(registration(i)).await.expect("register") }
            })
        });
        group.bench_with_input(BenchmarkId::new("ping", n), &n, |b, _| {
            b.to_async(rt).iter(|| {
                let id = pick();
                let store = store.clone();
                async move { store.ping(id).await.expect("ping").expect("live") }
            })
        });
        group.bench_with_input(BenchmarkId::new("get", n), &n, |b, _| {
            b.to_async(rt).iter(|| {
                let id = pick();
                let store = store.clone();
                async move { store.get(id).await.expect("get").expect("live") }
            })
        });
        group.bench_with_input(BenchmarkId::new("list_by_name", n), &n, |b, &n| {
            let filter = ListFilter {
                display_name: Some("service-042".into()),
                ..ListFilter::default()
            };
            b.to_async(rt).iter(|| {
                let (store, filter) = (store.clone(), filter.clone());
                async move {
                    let got = store.list(&filter).await.expect("list");
                    assert_eq!(got.len(), n / NAMES);
                }
            })
        });
        group.sample_size(10);
        group.bench_with_input(BenchmarkId::new("list_all", n), &n, |b, &n| {
            b.to_async(rt).iter(|| {
                let store = store.clone();
                async move {
                    let got = store.list(&ListFilter::default()).await.expect("list");
                    assert_eq!(got.len(), n);
                }
            })
        });
        group.sample_size(100);
    }
    group.finish();
}

/// Registers entries `from..to` with 64 concurrent writers; returns their ids.
async fn populate_range<S: Store + Clone>(store: &S, from: usize, to: usize) -> Vec<Ulid> {
    let next = Arc::new(AtomicUsize::new(from));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (store, next) = (store.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return ids;
                }
                ids.push(
                    store
                        .register(registration(i))
                        .await
                        .expect("register")
                        .record
                        .id,
                );
            }
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.expect("task"));
    }
    ids
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` (CI) does not: smoke mode.
    let quick = !std::env::args().any(|a| a == "--bench")
        || std::env::args().any(|a| a == "--test")
        || std::env::var_os("BENCH_QUICK").is_some();
    let sizes: &[usize] = if quick {
        &[1_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));

    // Entries must outlive the run: a long TTL.
    let ttl = Duration::from_secs(3600);
    bench_store(&mut c, &rt, "memory", MemoryStore::new(ttl), sizes);

    let server = valkey::ValkeyServer::new();
    let store = rt
        .block_on(ValkeyStore::connect(&server.url(), "bench:", ttl))
        .expect("valkey store");
    bench_store(&mut c, &rt, "valkey", store, sizes);
    c.final_summary();
}
