//! The orchestrator on a real local Valkey Cluster (six nodes: three masters, three replicas):
//! replicas sharing it (whatever one writes, the others read), surviving the loss of any
//! node, seeds included, slots moving between masters under load, and the first reads of a
//! moved slot.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;

use serde_json::Value;
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::store::LIST_BATCH;
use support::cluster::ValkeyCluster;
use support::http::{Api, Reply};
use support::replicas::{Replicas, SEEDS};

/// The id in a registration answer or a record.
fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id").to_owned()
}

async fn register_via(api: &Api, url: &str, name: &str, id: Option<&str>) -> (u16, String) {
    let mut body = serde_json::json!({"url": url, "info": {"display_name": name}});
    if let Some(id) = id {
        body["id"] = id.into();
    }
    let r = api.post_json("/services/$register", &body).await;
    assert!(r.status.is_success(), "register {url}: {r:?}");
    (r.status.as_u16(), id_of(&r.json()))
}

/// Every id `GET /services?{query}` lists through `api`, streamed.
async fn listed(api: &Api, query: &str) -> Vec<String> {
    let mut ids = api.list_streamed(query).await;
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_agree_on_every_write_whichever_replica_took_it() {
    let cluster = support::cluster::shared_async().await;
    let (replicas, _) = Replicas::on_cluster(cluster, &SEEDS, Config::for_tests()).await;
    let [a, b, c] = [0, 1, 2].map(|i| replicas.api(i));

    // Register through A; B and C see it, re-registering through them keeps the id.
    let url = "http://moving:8000";
    let (status, id) = register_via(&a, url, "M", None).await;
    assert_eq!(status, 201);
    for api in [&b, &c] {
        let record: Value = api.get(&format!("/services/{id}")).await.json();
        assert_eq!(record["url"], url);
        assert_eq!(register_via(api, url, "M", None).await, (200, id.clone()));
    }
    assert_eq!(
        register_via(&c, url, "M", Some(&id)).await,
        (200, id.clone())
    );
    for api in [&a, &b, &c] {
        assert_eq!(api.put(&format!("/services/{id}/$ping")).await.status, 200);
        assert_eq!(
            listed(api, "display_name=M").await,
            std::slice::from_ref(&id)
        );
    }

    // Deregistered through B: gone through A and C, a second DELETE anywhere is a 404.
    assert_eq!(b.delete(&format!("/services/{id}")).await.status, 200);
    for api in [&a, &c, &b] {
        assert_eq!(api.get(&format!("/services/{id}")).await.status, 404);
        assert_eq!(api.put(&format!("/services/{id}/$ping")).await.status, 404);
        assert_eq!(api.delete(&format!("/services/{id}")).await.status, 404);
        assert!(listed(api, "display_name=M").await.is_empty());
    }
    // Back through C with its id: the same identity, seen by A.
    assert_eq!(
        register_via(&c, url, "M", Some(&id)).await,
        (201, id.clone())
    );
    assert_eq!(a.get(&format!("/services/{id}")).await.status, 200);

    // Many URLs (their records on every master), registered through all three at once and
    // each URL through all three concurrently: one id per URL, nothing lost, one listing.
    let urls: Vec<String> = (0..90).map(|i| format!("http://spread-{i}:80")).collect();
    let mut tasks = Vec::new();
    for url in &urls {
        for api in [&a, &b, &c] {
            let (api, url) = (api.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                (url.clone(), register_via(&api, &url, "S", None).await.1)
            }));
        }
    }
    let mut ids = std::collections::BTreeMap::<String, String>::new();
    for task in tasks {
        let (url, id) = task.await.expect("register task");
        let first = ids.entry(url.clone()).or_insert_with(|| id.clone());
        assert_eq!(*first, id, "{url} got two ids");
    }
    let masters: std::collections::BTreeSet<usize> = ids
        .values()
        .map(|id| cluster.master_of_key(&format!("{{{}}}", &id[23..])))
        .collect();
    assert_eq!(masters.len(), 3, "records on every master");
    let mut wanted: Vec<String> = ids.values().cloned().collect();
    wanted.sort();
    for api in [&a, &b, &c] {
        assert_eq!(listed(api, "display_name=S").await, wanted);
        assert_eq!(api.walk_pages("display_name=S", 7).await, wanted);
    }
    replicas.shutdown().await;
}

/// What the load saw: requests, 503s (each retried), and anything else that went wrong.
#[derive(Default)]
struct Seen {
    requests: AtomicU64,
    unavailable: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

impl Seen {
    fn fail(&self, what: String) {
        self.failures.lock().expect("failures").push(what);
    }
}

/// Sends a request, retrying 503s (counted) for up to a minute; the first other answer, and
/// whether a 503 came before it. `None` (a failure is recorded) if no other answer came.
async fn retried(
    seen: &Seen,
    api: &Api,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Option<(Reply, bool)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after_503 = false;
    loop {
        let headers: &[(&str, &str)] = match body {
            Some(_) => &[("content-type", "application/json")],
            None => &[],
        };
        let bytes = body.map(|b| serde_json::to_vec(b).expect("json"));
        seen.requests.fetch_add(1, Ordering::Relaxed);
        match api.try_send(method.clone(), path, headers, bytes).await {
            Ok(r) if r.status == 503 => {
                seen.unavailable.fetch_add(1, Ordering::Relaxed);
                after_503 = true;
                if Instant::now() > deadline {
                    seen.fail(format!(
                        "{method} {path}: still 503 after a minute of retries"
                    ));
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(r) => return Some((r, after_503)),
            Err(e) => {
                seen.fail(format!("{method} {path}: no answer: {e}"));
                return None;
            }
        }
    }
}

/// One load worker: registers new URLs, pings, reads, lists and deletes what it registered,
/// each request through the next replica, until `stop`. Returns the ids it left registered
/// and those it deleted.
async fn load_worker(
    worker: usize,
    api: Api,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
) -> (Vec<String>, Vec<String>) {
    let (mut live, mut deleted) = (Vec::<String>::new(), Vec::new());
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let url = format!("http://w{worker}-{i}.load:80");
        let body =
            serde_json::json!({"url": url, "info": {"display_name": format!("load-{}", i % 4)}});
        if let Some((r, after_503)) = retried(
            &seen,
            &api,
            Method::POST,
            "/services/$register",
            Some(&body),
        )
        .await
        {
            // After a 503 the first attempt may have been done: then this one updated it.
            if r.status == 201 || (after_503 && r.status == 200) {
                live.push(id_of(&r.json()));
            } else {
                seen.fail(format!("register {url}: {} {:?}", r.status, r.body));
            }
        }
        if let Some(id) = live.get(i * 7 % live.len().max(1)).cloned() {
            let path = format!("/services/{id}/$ping");
            if let Some((r, _)) = retried(&seen, &api, Method::PUT, &path, None).await {
                if r.status != 200 {
                    seen.fail(format!("PUT {path}: {} {:?}", r.status, r.body));
                }
            }
            let path = format!("/services/{id}");
            if let Some((r, _)) = retried(&seen, &api, Method::GET, &path, None).await {
                if r.status != 200 {
                    seen.fail(format!("GET {path}: {} {:?}", r.status, r.body));
                }
            }
        }
        if i % 3 == 0 && !live.is_empty() {
            let id = live.swap_remove(i % live.len());
            let path = format!("/services/{id}");
            if let Some((r, after_503)) = retried(&seen, &api, Method::DELETE, &path, None).await {
                // After a 503 the first attempt may have deleted it.
                if !(r.status == 200 || (after_503 && r.status == 404)) {
                    seen.fail(format!("DELETE {path}: {} {:?}", r.status, r.body));
                }
            }
            deleted.push(id);
        }
        if i % 5 == 0 {
            let path = format!("/services?display_name=load-{}&limit=50", i % 4);
            if let Some((r, _)) = retried(&seen, &api, Method::GET, &path, None).await {
                if r.status != 200 {
                    seen.fail(format!("GET {path}: {} {:?}", r.status, r.body));
                }
            }
        }
    }
    (live, deleted)
}

// Red with fred following redirections itself (`max_redirections` > 0): its ASK handling reads
// "the next reply" as ASKING's on a connection with other commands in flight, and a ping got
// 500 "expected an array, got String(OK)" about once per 10k requests
// (docs/valkey-store.md, "Connection behaviour").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_move_between_masters_under_load_without_a_lost_request() {
    let cluster = ValkeyCluster::new();
    let mut config = Config::for_tests();
    // Nothing expires while the load runs (a loaded machine may take minutes to reshard):
    // every 404 is a lost record.
    config.ttl_seconds = 3_600;
    let (replicas, _) = Replicas::on_cluster(&cluster, &SEEDS, config).await;
    let bases: Vec<String> = (0..replicas.len())
        .map(|i| replicas.api(i).base().to_owned())
        .collect();
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            // Each worker starts at another replica and goes round all three.
            let mut mine = bases.clone();
            mine.rotate_left(w % bases.len());
            let api = Api::balanced(mine);
            tokio::spawn(load_worker(w, api, seen.clone(), stop.clone()))
        })
        .collect();
    // Let records spread over every master first.
    load_reaches(&seen, &workers, 300).await;

    // The slot of every `{all}` key, to another master, a few keys per MIGRATE; then a
    // thousand slots (records) from a second master to the third with valkey-cli.
    let all_slot: u16 = cluster
        .cli_on(0, &["CLUSTER", "KEYSLOT", "{all}"])
        .trim()
        .parse()
        .expect("slot");
    let from = cluster.master_of_slot(all_slot);
    let masters = cluster.masters();
    let others: Vec<usize> = masters.iter().copied().filter(|&m| m != from).collect();
    let started = Instant::now();
    let moved = tokio::task::block_in_place(|| {
        cluster.migrate_slot(all_slot, from, others[0], 2, Duration::from_millis(200))
    });
    eprintln!(
        "moved slot {all_slot} ({moved} keys) in {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let out = tokio::task::block_in_place(|| {
        cluster.cluster_cli(
            others[0],
            "reshard",
            &[
                "--cluster-from",
                &cluster.id_of(others[1]),
                "--cluster-to",
                &cluster.id_of(from),
                "--cluster-slots",
                "300",
                "--cluster-pipeline",
                "2",
                "--cluster-yes",
            ],
        )
    });
    assert!(!out.contains("[ERR]"), "reshard failed:\n{out}");
    eprintln!("resharded 300 slots in {:?}", started.elapsed());
    // And some more load on the new layout.
    let after = seen.requests.load(Ordering::Relaxed) + 300;
    load_reaches(&seen, &workers, after).await;
    stop.store(true, Ordering::Relaxed);
    let (mut live, mut deleted) = (Vec::new(), Vec::new());
    for worker in workers {
        let (l, d) = worker.await.expect("load worker");
        live.extend(l);
        deleted.extend(d);
    }
    cluster.wait_ok();
    assert_eq!(cluster.master_of_slot(all_slot), others[0]);
    eprintln!(
        "load: {} requests, {} answered 503 and were retried, {} registrations left, {} deleted",
        seen.requests.load(Ordering::Relaxed),
        seen.unavailable.load(Ordering::Relaxed),
        live.len(),
        deleted.len()
    );
    let failures = seen.failures.lock().expect("failures").clone();
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Nothing lost: every registration left is listed (all, and by name) through every
    // replica; nothing deleted is.
    live.sort();
    for i in 0..replicas.len() {
        let api = replicas.api(i);
        let mut all = api.list_streamed("").await;
        all.sort();
        assert_eq!(all, live, "listed through replica {i}");
        let mut named = Vec::new();
        for n in 0..4 {
            named.extend(api.list_streamed(&format!("display_name=load-{n}")).await);
        }
        named.sort();
        assert_eq!(named, live, "listed by name through replica {i}");
        for id in deleted.iter().take(20) {
            assert_eq!(api.get(&format!("/services/{id}")).await.status, 404);
        }
    }
    replicas.shutdown().await;
}

/// A slot moved behind the replicas' backs (by valkey-cli, so every replica's slot map is
/// stale): the first read of it through each replica is answered in full. Red without the
/// store's resend of redirected reads: the record answered 503 "Too many redirections", the
/// page too, and the streamed list was cut off after its first part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_reads_of_a_moved_slot_are_answered_in_full() {
    let cluster = ValkeyCluster::new();
    let (replicas, _) = Replicas::on_cluster(&cluster, &SEEDS, Config::for_tests()).await;
    // More records than the first part of a streamed list, all registered through replica 0.
    let mut ids = Vec::new();
    for n in 0..LIST_BATCH + 100 {
        let url = format!("http://stale-{n}:8000");
        ids.push(register_via(&replicas.api(0), &url, "stale", None).await.1);
    }
    ids.sort();
    // A record's slot is its id's hash tag's: the last three characters (keys.rs).
    let slot_of = |id: &str| fred::util::redis_keyslot(format!("{{{}}}", &id[23..]).as_bytes());
    let all_slot = fred::util::redis_keyslot(b"{all}");
    let first_part: HashSet<u16> = ids[..LIST_BATCH].iter().map(|id| slot_of(id)).collect();
    let moved = ids
        .iter()
        .rev()
        .find(|id| !first_part.contains(&slot_of(id)) && slot_of(id) != all_slot)
        .expect("an id after the first part, alone in its slot");
    let slot = slot_of(moved);
    let from = cluster.master_of_slot(slot);
    let to = cluster
        .masters()
        .into_iter()
        .find(|&m| m != from)
        .expect("another master");
    let keys =
        tokio::task::block_in_place(|| cluster.migrate_slot(slot, from, to, 1_000, Duration::ZERO));
    assert!(keys > 0, "slot {slot} held no key");

    // Each replica's first read of the slot: a record, a page, a streamed list.
    let record = replicas.api(0).get(&format!("/services/{moved}")).await;
    assert_eq!(record.status, 200, "{record:?}");
    assert_eq!(id_of(&record.json()), *moved);
    let page = replicas.api(1).get("/services?limit=1000").await;
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(page.json::<Value>()["count"], ids.len());
    let streamed = replicas
        .api(2)
        .try_get("/services")
        .await
        .unwrap_or_else(|e| panic!("the streamed list was cut off: {e}"));
    assert_eq!(streamed.status, 200, "{streamed:?}");
    let streamed: servicekit::protocol::ListResponse = streamed.json();
    let mut listed: Vec<String> = streamed.services.iter().map(|s| s.id.to_string()).collect();
    listed.sort();
    assert_eq!(listed, ids);
    replicas.shutdown().await;
}

/// Waits until the load has sent `n` requests in all, failing when a worker ended (it
/// panicked) or a minute passed.
async fn load_reaches(
    seen: &Seen,
    workers: &[tokio::task::JoinHandle<(Vec<String>, Vec<String>)>],
    n: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.requests.load(Ordering::Relaxed) < n {
        assert!(
            workers.iter().all(|w| !w.is_finished()),
            "a load worker ended early"
        );
        assert!(
            Instant::now() < deadline,
            "the load never reached {n} requests"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
