//! A tonic `Channel` over a [`Watcher`]'s instances (cargo feature `tonic`).
//!
//! tonic balances itself (`Channel::balance_channel`, tower's p2c inside); this adapter only
//! feeds it (tonic 0.14 has its own `Change` type): each `Insert` becomes an [`Endpoint`] from the instance's URL, each `Remove` a
//! `Remove`. Retries and ejection are not the adapter's: gRPC has its own status semantics.

use futures_util::StreamExt;
use tonic::transport::channel::Change as TonicChange;
use tonic::transport::{Channel, Endpoint};
use tower::discover::Change;

use super::Watcher;

/// How many changes may wait for the channel's balancer.
const CAPACITY: usize = 64;

/// A channel balanced over `watcher`'s instances, each an [`Endpoint`] with tonic's defaults.
/// Call it inside a tokio runtime (it spawns the feeding task, and tonic its balancer); the
/// task ends when the channel (and every clone) is dropped, and keeps the watcher running
/// until then.
pub fn balance_channel(watcher: &Watcher) -> Channel {
    balance_channel_with(watcher, |endpoint| endpoint)
}

/// [`balance_channel`], with each endpoint configured by `configure` (timeouts, TLS, ...).
/// servicekit turns on only tonic's `channel` feature: `https` instances need one of tonic's TLS
/// features in your own tonic dependency and a `tls_config` here.
pub fn balance_channel_with<F>(watcher: &Watcher, configure: F) -> Channel
where
    F: Fn(Endpoint) -> Endpoint + Send + 'static,
{
    let (channel, tx) = Channel::balance_channel(CAPACITY);
    let mut changes = watcher.discover();
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                _ = tx.closed() => return,
                change = changes.next() => change,
            };
            let change = match change {
                Some(Ok(Change::Insert(id, instance))) => {
                    match Endpoint::from_shared(instance.url.clone()) {
                        Ok(endpoint) => TonicChange::Insert(id, configure(endpoint)),
                        Err(e) => {
                            tracing::warn!(%id, url = ?instance.url, error = %e, "discovery.instance_unusable");
                            TonicChange::Remove(id)
                        }
                    }
                }
                Some(Ok(Change::Remove(id))) => TonicChange::Remove(id),
                Some(Err(never)) => match never {},
                None => return,
            };
            if tx.send(change).await.is_err() {
                return;
            }
        }
    });
    channel
}
