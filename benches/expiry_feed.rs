//! Expiry reaching the change log: N entries on Valkey expire together while two orchestrator
//! replicas (two `ValkeyStore`s) each call `Store::reap` every `REAP_INTERVAL` (500 ms), as the
//! orchestrator does; a reader on one replica follows `Store::changes` and notes, for each
//! `expired` entry, how long after the entry's `expires_at` it arrived. The issue's target: an
//! `expired` event within 2 s of `expires_at`, p99 at 10k entries.
//!
//! ```sh
//! cargo bench --bench expiry_feed                  # 10,000 entries (starts its own valkey-server)
//! EXPIRY_N=50000 cargo bench --bench expiry_feed
//! cargo bench --bench expiry_feed -- --test        # smoke: 500 entries
//! ```
//!
//! Entries are registered over 64 concurrent tasks with a TTL long enough that all are in
//! before the first expires (so they expire within the time registering took, about one
//! second apart at most). Latencies compare the reader's wall clock with `expires_at` (the
//! server's clock; same machine).

#[allow(dead_code)]
mod common;
#[allow(dead_code)]
#[path = "../orchestrator/tests/support/valkey.rs"]
mod valkey;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{env_num, quick};
use servicekit::protocol::{ServiceInfo, Timestamp};
use servicekit_orchestrator::store::{
    ChangeKind, Changes, Registration, Store, ValkeyStore, REAP_INTERVAL,
};
use tokio::sync::Semaphore;
use ulid::Ulid;

const REGISTER_TASKS: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = if quick(&args) {
        500
    } else {
        env_num("EXPIRY_N", 10_000)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(n));
}

async fn run(n: usize) {
    let server = valkey::ValkeyServer::new();
    // Long enough to register everything before the first entry expires.
    let ttl = Duration::from_millis(2_000 + n as u64 / 4);
    let prefix = format!("bench:{}:", Ulid::new());
    let connect = || async {
        ValkeyStore::connect(&server.url(), &prefix, ttl)
            .await
            .expect("connect to valkey-server")
    };
    let (a, b) = (connect().await, connect().await);

    let started = std::time::Instant::now();
    let gate = Arc::new(Semaphore::new(REGISTER_TASKS));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (store, gate) = (a.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            let reg = Registration {
                url: format!(
                    "http://10.{}.{}.{}:8000",
                    i / 65536 % 256,
                    i / 256 % 256,
                    i % 256
                ),
                info: ServiceInfo::new(format!("service-{:03}", i % 100)),
                requested_id: None,
                check: None,
            };
            let r = store.register(reg).await.expect("register").record;
            (r.id, r.expires_at.as_millis())
        }));
    }
    let mut expiries: HashMap<Ulid, u64> = HashMap::with_capacity(n);
    for t in tasks {
        let (id, at) = t.await.expect("register task");
        expiries.insert(id, at);
    }
    let spread = expiries.values().max().copied().unwrap_or(0)
        - expiries.values().min().copied().unwrap_or(0);
    println!(
        "registered {n} entries in {:.2?} (ttl {ttl:?}; expiries spread over {spread} ms)",
        started.elapsed()
    );

    let head = a.change_head().await.expect("head");
    let reapers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|store| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(REAP_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = store.reap().await {
                        eprintln!("reap failed: {e}");
                    }
                }
            })
        })
        .collect();

    let mut cursor = head;
    let mut latencies = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + ttl * 2 + Duration::from_secs(30);
    while latencies.len() < n && tokio::time::Instant::now() < deadline {
        match a
            .changes(cursor, 1000, Duration::from_secs(1))
            .await
            .expect("changes")
        {
            Changes::Changes(batch) => {
                let now = Timestamp::now().as_millis();
                for c in batch {
                    cursor = c.cursor;
                    if c.kind == ChangeKind::Expired {
                        if let Some(at) = expiries.get(&c.subject.id()) {
                            latencies.push(now.saturating_sub(*at));
                        }
                    }
                }
            }
            Changes::Gap => panic!("gap while reading the log"),
        }
    }
    for r in reapers {
        r.abort();
    }
    assert_eq!(
        latencies.len(),
        n,
        "not every expiry reached the log in time"
    );
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "expired events after expires_at, n = {n}, reap every {REAP_INTERVAL:?} by 2 replicas: \
         p50 {} ms, p99 {} ms, max {} ms",
        pct(0.50),
        pct(0.99),
        latencies[latencies.len() - 1]
    );
    a.close().await;
    b.close().await;
}
