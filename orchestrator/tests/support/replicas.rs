//! Orchestrator replicas in this process sharing one store: on a Valkey Cluster, each seeded
//! by a different node, behind a client that spreads requests over them ([`Api::balanced`]).

use servicekit_orchestrator::config::Config;
use servicekit_orchestrator::server::{self, Running};

use super::cluster::ValkeyCluster;
use super::http::Api;

/// Nodes the replicas are seeded by, one each: different masters of a fresh cluster.
pub const SEEDS: [usize; 3] = [0, 1, 2];

/// Running orchestrators that share a store.
pub struct Replicas {
    running: Vec<Running>,
}

impl Replicas {
    /// One orchestrator with `config` as it is (the memory store, unless it names Valkey).
    pub async fn one(config: Config) -> (Replicas, Api) {
        let running = server::start(config).await.expect("orchestrator starts");
        let api = Api::new(running.base_url());
        (
            Replicas {
                running: vec![running],
            },
            api,
        )
    }

    /// One orchestrator per node of `seeds`, each with that node as its only seed and
    /// otherwise `config`, all on one fresh key prefix; a client spreading requests over them.
    pub async fn on_cluster(
        cluster: &ValkeyCluster,
        seeds: &[usize],
        config: Config,
    ) -> (Replicas, Api) {
        let prefix = format!("test:{}:", ulid::Ulid::new());
        let mut running = Vec::new();
        for &seed in seeds {
            let mut config = config.clone();
            config.valkey_url = Some(cluster.url_seeded_by(seed));
            config.key_prefix = prefix.clone();
            let replica = server::start(config).await.expect("orchestrator starts");
            assert_eq!(replica.store_kind(), "valkey");
            running.push(replica);
        }
        let api = Api::balanced(running.iter().map(Running::base_url).collect());
        (Replicas { running }, api)
    }

    /// A client of replica `i` alone.
    pub fn api(&self, i: usize) -> Api {
        Api::new(self.running[i].base_url())
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub async fn shutdown(self) {
        for running in self.running {
            running.shutdown().await;
        }
    }
}

/// One orchestrator on the Valkey at `url` (test settings otherwise), keyed under `prefix`.
pub async fn start(url: String, prefix: &str) -> (Running, Api) {
    start_with(Config::for_tests(), url, prefix).await
}

/// One orchestrator with `config`, on the Valkey at `url`, keyed under `prefix`.
pub async fn start_with(mut config: Config, url: String, prefix: &str) -> (Running, Api) {
    config.valkey_url = Some(url);
    config.key_prefix = prefix.to_owned();
    let running = server::start(config).await.expect("orchestrator starts");
    assert_eq!(running.store_kind(), "valkey");
    let api = Api::new(running.base_url());
    (running, api)
}
