//! [`Watcher::discover`](super::Watcher::discover): the cache as a `tower::discover` stream.
//!
//! Each subscriber keeps its own view (what it has told its consumer) and a broadcast
//! receiver. One that falls too far behind does not buffer: it takes the cache as it is now
//! and sends the difference to its view, so it converges with bounded memory.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::broadcast::{self, error::RecvError};
use tower::discover::Change;
use ulid::Ulid;

use super::cache::{diff, Update};
use super::{Instance, Watcher};

/// The item of [`Changes`]: a `tower::discover` change keyed by the registration id. Never an
/// error (an error would end tower's `Balance`).
pub type ChangeItem = Result<Change<Ulid, Instance>, Infallible>;

/// The stream returned by [`Watcher::discover`]: `Insert`s for the instances known when it
/// was created, then every change. It never ends while it exists, and keeps its watcher's
/// background task alive.
pub struct Changes {
    inner: Pin<Box<dyn Stream<Item = ChangeItem> + Send>>,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes").finish_non_exhaustive()
    }
}

impl Stream for Changes {
    type Item = ChangeItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ChangeItem>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct Subscriber {
    watcher: Watcher,
    rx: broadcast::Receiver<Update>,
    view: HashMap<Ulid, Instance>,
    pending: VecDeque<Update>,
}

impl Subscriber {
    /// Applies one update to the view; the change to report, if it changed anything.
    fn apply(&mut self, update: Update) -> Option<Change<Ulid, Instance>> {
        match update {
            Update::Upsert(instance) => {
                if let Some(known) = self.view.get_mut(&instance.id) {
                    if known.same_registration(&instance) {
                        *known = instance;
                        return None;
                    }
                }
                self.view.insert(instance.id, instance.clone());
                Some(Change::Insert(instance.id, instance))
            }
            Update::Remove(id) => self.view.remove(&id).map(|_| Change::Remove(id)),
        }
    }

    async fn next(mut self) -> Option<(ChangeItem, Self)> {
        loop {
            if let Some(update) = self.pending.pop_front() {
                if let Some(change) = self.apply(update) {
                    return Some((Ok(change), self));
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(update) => self.pending.push_back(update),
                Err(RecvError::Lagged(skipped)) => {
                    let (now, rx) = self.watcher.shared().cache.subscribe();
                    self.rx = rx;
                    self.pending = diff(&self.view, &now).into();
                    tracing::debug!(skipped, "discovery.subscriber_resynced");
                }
                // The sender lives as long as the watcher this stream holds.
                Err(RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    }
}

pub(crate) fn changes(watcher: &Watcher) -> Changes {
    let (now, rx) = watcher.shared().cache.subscribe();
    let sub = Subscriber {
        watcher: watcher.clone(),
        rx,
        view: HashMap::new(),
        pending: diff(&HashMap::new(), &now).into(),
    };
    Changes {
        inner: Box::pin(futures_util::stream::unfold(sub, Subscriber::next)),
    }
}
