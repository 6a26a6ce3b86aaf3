//! Issue 11's failover requirement on a real local Valkey Cluster (three masters, three
//! replicas): three orchestrator replicas, each seeded by a different node, and real `service`
//! processes pinging through all of them. Each master is killed in turn (each replica's seed
//! among them) and started again before the next kill. After every kill each orchestrator must
//! serve again within 10 s, and every live service must be listed again through every replica
//! within one keepalive interval after that. The first failover certainly loses a live
//! service's registration (its master's replica is cut off first), which the service's next
//! ping must repair. The measured figures are printed.
//!
//! Also `/health` on a cluster: degraded while a master it routes to does not answer, although
//! the node it talks to does.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::Running;
use servicekit_orchestrator::store::url_tag;
use servicekit_orchestrator::store::valkey::tag_text;
use support::cluster::ValkeyCluster;
use support::http::Api;
use support::process::{example, Process};
use support::{free_port, registered, ADMIN_KEY};

/// Every orchestrator serves again within this of a kill (the bound).
const RECOVERY: Duration = Duration::from_secs(10);
/// The orchestrators' TTL; the layer pings every third of it. Long enough that no entry expires
/// during a failover (about 5 s of stalled pings), so a missing record is a lost write.
const TTL_SECONDS: u64 = 12;
const KEEPALIVE: Duration = Duration::from_secs(TTL_SECONDS / 3);
/// "Listed again within one keepalive interval": the layer's next ping comes within one
/// interval, which it jitters by up to 10 % so a fleet does not ping in step; a lost entry then
/// costs a 404 and a re-registration, two round trips on a loaded machine.
const RELISTED: Duration = Duration::from_millis(TTL_SECONDS * 1000 / 3 * 11 / 10 + 500);
/// Services per orchestrator replica.
const SERVICES_PER_REPLICA: usize = 2;

/// Both tests start a six-node cluster: one at a time on a small machine.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An in-process orchestrator on the cluster, seeded by `url`, sharing `prefix` with the other
/// replicas.
async fn replica(url: String, prefix: &str) -> (Running, Api) {
    let mut config = Config::for_tests();
    config.ttl_seconds = TTL_SECONDS;
    config.admin_key = Some(ADMIN_KEY.to_owned());
    support::replicas::start_with(config, url, prefix).await
}

/// A real `service` process registering and pinging through `api`.
fn service(api: &Api, name: &str) -> (Process, String) {
    service_on(api, name, free_port())
}

/// A real `service` process on `port`, registering and pinging through `api`.
fn service_on(api: &Api, name: &str, port: u16) -> (Process, String) {
    let mut cmd = example("service");
    cmd.env("SERVICEKIT_ORCHESTRATOR_URL", api.base())
        .env("SERVICEKIT_HOST", "127.0.0.1")
        .env("SERVICEKIT_PORT", port.to_string())
        .env("SERVICEKIT_RETRY_DELAY_MS", "100")
        .env("SERVICE_DISPLAY_NAME", name)
        .env("RUST_LOG", "warn");
    (Process::spawn(cmd), format!("http://127.0.0.1:{port}"))
}

/// A free loopback port whose service URL's records land on master `master`.
fn port_on_master(cluster: &ValkeyCluster, master: usize) -> u16 {
    for _ in 0..500 {
        let port = free_port();
        let tag = tag_text(url_tag(&format!("http://127.0.0.1:{port}")));
        if cluster.master_of_key(&format!("{{{tag}}}")) == master {
            return port;
        }
    }
    panic!("no port found whose URL's records land on node {master}")
}

/// What one replica did after a kill.
struct Recovery {
    /// From the kill to `/health` 200 and a registration that went through.
    serving: Duration,
    /// The first answer of `/health` that was not 200, if any was seen.
    unhealthy: Option<String>,
}

/// Polls `/health` and a probe registration until both succeed.
async fn serving_again(api: &Api, killed: Instant, probe: String) -> Recovery {
    let deadline = killed + RECOVERY + Duration::from_secs(50);
    let mut unhealthy = None;
    let mut n = 0u32;
    loop {
        let health = api.get("/health").await;
        let last = if health.status == 200 {
            n += 1;
            let url = format!("http://{probe}.probe:{n}");
            let r = api
                .post_json(
                    "/services/$register",
                    &serde_json::json!({"url": url, "info": {"display_name": "probe"}}),
                )
                .await;
            if r.status.is_success() {
                return Recovery {
                    serving: killed.elapsed(),
                    unhealthy,
                };
            }
            format!(
                "register {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            )
        } else {
            let text = format!(
                "/health {}: {}",
                health.status,
                String::from_utf8_lossy(&health.body)
            );
            unhealthy.get_or_insert_with(|| text.clone());
            text
        };
        assert!(
            Instant::now() < deadline,
            "{} never served again; last {last}",
            api.base()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The URLs `GET /services` lists through `api` (an empty list while it fails).
async fn listed(api: &Api) -> Vec<String> {
    let r = api.get("/services").await;
    if r.status != 200 {
        return Vec::new();
    }
    let v: Value = r.json();
    v["services"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|e| e["url"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `api` lists every URL of `urls`; when, and which were missing on the way.
async fn all_listed(api: &Api, urls: &[String], within: Duration) -> (Instant, Vec<String>) {
    let deadline = Instant::now() + within;
    let mut ever_missing: Vec<String> = Vec::new();
    loop {
        let now = listed(api).await;
        let missing: Vec<&String> = urls.iter().filter(|u| !now.contains(u)).collect();
        if missing.is_empty() {
            return (Instant::now(), ever_missing);
        }
        for m in missing.iter() {
            if !ever_missing.contains(m) {
                ever_missing.push((*m).clone());
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} does not list {missing:?}",
            api.base()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_serves_again_after_each_master_dies_and_services_come_back() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let started = Instant::now();
    let mut cluster = tokio::task::block_in_place(ValkeyCluster::new);
    let prefix = format!("failover:{}:", ulid::Ulid::new());
    // Each replica is seeded by a different master; killing the masters in turn kills every
    // replica's seed.
    let seeds = cluster.masters();
    assert_eq!(seeds.len(), 3, "{:?}", cluster.topology());
    let mut replicas = Vec::new();
    for &seed in &seeds {
        replicas.push(replica(cluster.url_seeded_by(seed), &prefix).await);
    }
    let names = ["A", "B", "C"];
    let mut services = Vec::new();
    for (r, (_, api)) in replicas.iter().enumerate() {
        for i in 0..SERVICES_PER_REPLICA {
            services.push(service(api, &format!("failover-{}{i}", names[r])));
        }
    }
    let mut urls: Vec<String> = services.iter().map(|(_, url)| url.clone()).collect();
    for (_, api) in &replicas {
        for url in &urls {
            registered(api, url, Duration::from_secs(30)).await;
        }
    }
    eprintln!(
        "cluster, {} replicas and {} services up after {:?}",
        replicas.len(),
        urls.len(),
        started.elapsed()
    );

    let mut report = Vec::new();
    for (k, &victim) in seeds.iter().enumerate() {
        assert!(
            cluster.masters().contains(&victim),
            "node {victim} should still be a master: {:?}",
            cluster.topology()
        );
        // The first failover certainly loses a live service's registration: the victim's
        // replica is cut off its replication link, then a service registers whose record
        // lands on the victim. Its next ping after the failover must bring it back.
        let lost = if k == 0 {
            let cut = tokio::task::block_in_place(|| cluster.cut_replication(victim));
            let port = port_on_master(&cluster, victim);
            let (process, url) = service_on(&replicas[1].1, "failover-lost", port);
            let entry = registered(&replicas[0].1, &url, Duration::from_secs(30)).await;
            let key = format!(
                "{prefix}{{{}}}:svc:{}",
                tag_text(url_tag(&url)),
                entry["id"].as_str().expect("an id")
            );
            let there = tokio::task::block_in_place(|| cluster.cli_on(victim, &["EXISTS", &key]));
            assert_eq!(
                there.trim(),
                "1",
                "{key} is not the record's key on node {victim}"
            );
            Some((cut, process, url, key))
        } else {
            None
        };
        tokio::task::block_in_place(|| cluster.kill(victim));
        let killed = Instant::now();
        let probe = format!("k{k}");
        let recoveries: Vec<Recovery> = {
            let waits = replicas
                .iter()
                .enumerate()
                .map(|(r, (_, api))| serving_again(api, killed, format!("{probe}r{r}")));
            join_all(waits).await
        };
        let back = recoveries
            .iter()
            .map(|r| r.serving)
            .max()
            .unwrap_or_default();
        if let Some((cut, _, url, key)) = &lost {
            let exists = tokio::task::block_in_place(|| cluster.cli_on(*cut, &["EXISTS", key]));
            assert_eq!(
                exists.trim(),
                "0",
                "{url}'s record should be lost with the failover ({key} on node {cut})"
            );
            urls.push(url.clone());
        }
        let mut listed_after = Vec::new();
        for (_, api) in &replicas {
            let (at, missing) = all_listed(api, &urls, RECOVERY + KEEPALIVE * 5).await;
            listed_after.push((at.saturating_duration_since(killed + back), missing));
        }
        for (r, rec) in recoveries.iter().enumerate() {
            let line = format!(
                "kill {k} (node {victim}, seed of replica {}): replica {} served again after \
                 {:.2} s; every service listed {:.2} s after all replicas served (missing on \
                 the way: {:?}); /health while down: {}",
                names[k],
                names[r],
                rec.serving.as_secs_f64(),
                listed_after[r].0.as_secs_f64(),
                listed_after[r].1,
                rec.unhealthy.as_deref().unwrap_or("(never seen unhealthy)")
            );
            eprintln!("{line}");
            report.push(line);
        }
        for (r, rec) in recoveries.iter().enumerate() {
            assert!(
                rec.serving <= RECOVERY,
                "replica {} took {:?} to serve again after kill {k}",
                names[r],
                rec.serving
            );
            assert!(
                rec.unhealthy.is_some(),
                "replica {}'s /health never left healthy after kill {k}",
                names[r]
            );
            assert!(
                listed_after[r].0 <= RELISTED,
                "replica {} listed every service only {:?} after all served again (kill {k})",
                names[r],
                listed_after[r].0
            );
        }
        // Kept running: it must stay listed through the next failovers too.
        if let Some((_, process, url, _)) = lost {
            services.push((process, url));
        }
        tokio::task::block_in_place(|| {
            cluster.restart(victim);
            cluster.wait_ok();
        });
        // Healthy again with the whole cluster back (the restarted node is a replica now).
        for (r, (_, api)) in replicas.iter().enumerate() {
            let deadline = Instant::now() + RECOVERY;
            loop {
                let health = api.get("/health").await;
                if health.status == 200 {
                    let body: Value = health.json();
                    assert_eq!(body["checks"]["store"]["cluster"]["state"], "ok", "{body}");
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica {} not healthy with the cluster whole again: {:?}",
                    names[r],
                    String::from_utf8_lossy(&health.body)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    eprintln!("failover summary:\n{}", report.join("\n"));

    for (process, _) in services {
        let (status, out) = process.terminate(Duration::from_secs(10)).await;
        assert!(status.success(), "service exited with {status}: {out:?}");
    }
    for (running, _) in replicas {
        running.shutdown().await;
    }
    eprintln!("whole test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_degraded_while_a_master_does_not_answer() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = tokio::task::block_in_place(ValkeyCluster::new);
    let prefix = format!("health:{}:", ulid::Ulid::new());
    let (running, api) = replica(cluster.url(), &prefix).await;
    let health = api.get("/health").await;
    assert_eq!(health.status, 200, "{health:?}");
    let body: Value = health.json();
    let c = &body["checks"]["store"]["cluster"];
    assert_eq!(c["state"], "ok", "{body}");
    assert_eq!(c["slots_ok"], 16384, "{body}");
    assert_eq!(c["masters"], 3, "{body}");
    assert_eq!(c["masters_reachable"], 3, "{body}");
    assert_eq!(c["known_nodes"], 6, "{body}");

    // A master that owns neither the health key's slot nor, possibly, the node fred asks for
    // CLUSTER INFO: PING and the test write still succeed, so only the cluster check can tell.
    let all_slot = cluster.master_of_key(&format!("{prefix}{{all}}:health:x"));
    let victim = *cluster
        .masters()
        .iter()
        .find(|&&m| m != all_slot)
        .expect("another master");
    let port = cluster.port(victim);
    tokio::task::block_in_place(|| cluster.pause(victim));
    let paused = Instant::now();
    let seen = loop {
        let health = api.get("/health").await;
        if health.status == 503 {
            break health;
        }
        assert!(
            paused.elapsed() < RECOVERY,
            "still {} {:?} {:?} after the master on {port} froze",
            health.status,
            String::from_utf8_lossy(&health.body),
            paused.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let body: Value = seen.json();
    eprintln!(
        "/health {:?} after freezing the master on {port}: {body}",
        paused.elapsed()
    );
    assert_eq!(body["status"], "degraded", "{body}");
    let c = &body["checks"]["store"]["cluster"];
    assert!(
        c["unreachable"].as_array().is_some_and(|u| u
            .iter()
            .any(|s| s.as_str() == Some(&format!("127.0.0.1:{port}")))),
        "{body}"
    );
    assert!(
        body["checks"]["store"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(&port.to_string())),
        "{body}"
    );

    tokio::task::block_in_place(|| {
        cluster.resume(victim);
        cluster.wait_ok();
    });
    let deadline = Instant::now() + RECOVERY * 2;
    loop {
        let health = api.get("/health").await;
        if health.status == 200 {
            let body: Value = health.json();
            assert_eq!(body["checks"]["store"]["cluster"]["masters_reachable"], 3);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not healthy again: {:?}",
            String::from_utf8_lossy(&health.body)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown().await;
}

/// Awaits every future side by side (tokio has no `join_all`).
async fn join_all<F, T>(futures: impl IntoIterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T>,
{
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<T>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in pinned.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
