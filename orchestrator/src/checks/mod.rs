//! Health checks the orchestrator runs itself (pull), for registrations that declare a
//! `check`. See the README's "Health" section for the rules and `docs/health-checks.md` for
//! the design.
//!
//! One checker task per orchestrator ([`run`]) knows every live record that declares a check:
//! it lists them all at start, follows the watch hub's change feed (the one reader of the
//! store's change log in this process, so checks add no second reader), and lists everything
//! again when the feed says it lost changes (a store gap, or this task lagging) and every
//! [`RELIST_EVERY`] as a safety net. Of those records it checks the ones it owns
//! ([`ownership`]: rendezvous hashing over the live checker replicas, announced in the store
//! every third of `--checker-ttl-seconds`), one small task per owned instance: first check at
//! a random point of its interval (or soon, when taken over from a dead replica), then every
//! interval, at most `--check-concurrency` probes in flight. A result passes the flap damper
//! ([`damping`]) and is written only when the shown status or output changes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use servicekit::protocol::{
    CheckSpec, Health, HealthReport, HealthStatus, ServiceRecord, Timestamp,
};
use tokio::sync::{broadcast, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use ulid::Ulid;

use crate::api::Api;
use crate::logsafe::Untrusted;
use crate::store::{Access, Change, ListFilter, Listing, Store, Subject, LIST_BATCH};
use crate::watch::hub::HubMessage;

pub mod damping;
pub mod ownership;
pub mod probe;
pub mod spec;

pub use probe::{ProbeResult, Prober, CHECKER_HEADER};
pub use spec::Probe;

use damping::Damper;
use ownership::{first_delay, owner, random_unit, start_of, Start};

/// How often the checker lists every record again, in case it missed a change.
pub const RELIST_EVERY: Duration = Duration::from_secs(60);
/// Default of `--checker-ttl-seconds`: how long a checker replica counts as alive after its
/// last announce (it announces every third of it).
pub const DEFAULT_CHECKER_TTL_SECONDS: u64 = 3;
/// Default of `--check-concurrency`.
pub const DEFAULT_CHECK_CONCURRENCY: u32 = 64;

/// What the orchestrator's own checks present to the store: they may write any entry.
const ADMIN: Access = Access {
    token: None,
    admin: true,
};

/// How the checker runs.
#[derive(Debug, Clone)]
pub struct CheckerConfig {
    /// This replica's checker id (unique per process), sent in [`CHECKER_HEADER`].
    pub replica: String,
    /// Most probes in flight at once.
    pub concurrency: usize,
    /// How long this replica counts as alive after announcing itself.
    pub membership_ttl: Duration,
}

impl CheckerConfig {
    /// How often the replica announces itself: a third of the TTL, so two announces may fail
    /// before the others drop it.
    pub fn announce_every(&self) -> Duration {
        (self.membership_ttl / 3).max(Duration::from_millis(100))
    }
}

/// What every check task shares.
struct Ctx<S: Store> {
    api: Arc<Api<S>>,
    prober: Prober,
    permits: Semaphore,
    announce: Duration,
}

impl<S: Store> Ctx<S> {
    /// One probe under the concurrency limit, counted and timed.
    async fn probe(&self, instance: &Instance) -> ProbeResult {
        // Never closed: the semaphore lives as long as the context.
        let _permit = self.permits.acquire().await.ok();
        let started = Instant::now();
        let result = self
            .prober
            .probe(&instance.probe, spec::timeout(&instance.spec))
            .await;
        self.api
            .metrics()
            .check_done(result.status.as_str(), started.elapsed());
        result
    }
}

/// A record with a check, as the checker saw it last.
struct Instance {
    id: Ulid,
    url: String,
    spec: CheckSpec,
    probe: Probe,
    /// The record's health when the check task started: the damper's starting point.
    health: Health,
}

/// A check task, aborted when dropped.
struct Task(JoinHandle<()>);

impl Task {
    /// Whether the task still runs. One that ended by itself (its record was gone when it
    /// wrote, or it deregistered the instance) checks nothing: the same id may come back
    /// (re-registered before this replica saw the removal) and then needs a new task.
    fn running(&self) -> bool {
        !self.0.is_finished()
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Known {
    instance: Arc<Instance>,
    /// The check task; present exactly while this replica owns the instance (it may have
    /// ended by itself: see [`Task::running`]).
    task: Option<Task>,
}

impl Known {
    fn running(&self) -> bool {
        self.task.as_ref().is_some_and(Task::running)
    }
}

/// The checker's state: every record with a check, and the live checker replicas.
struct Scheduler<S: Store> {
    ctx: Arc<Ctx<S>>,
    me: String,
    membership_ttl: Duration,
    members: Vec<String>,
    known: HashMap<Ulid, Known>,
    /// Instances with a task (running or ended by itself), as `servicekit_checks_owned`.
    owned: usize,
}

/// Runs the checker until `stop` turns true; every check task ends with it.
pub async fn run<S: Store>(
    api: Arc<Api<S>>,
    config: CheckerConfig,
    mut stop: watch::Receiver<bool>,
) {
    let work = async {
        let hub = api.watch().hub().clone();
        let mut scheduler = Scheduler {
            ctx: Arc::new(Ctx {
                prober: Prober::new(&config.replica, config.concurrency.max(1)),
                permits: Semaphore::new(config.concurrency.max(1)),
                announce: config.announce_every(),
                api,
            }),
            me: config.replica.clone(),
            membership_ttl: config.membership_ttl,
            members: Vec::new(),
            known: HashMap::new(),
            owned: 0,
        };
        // Subscribe before listing: a change made meanwhile is in the feed, not lost.
        let mut feed = loop {
            if let Some((_, feed)) = hub.subscribe_within(Duration::from_secs(1)).await {
                break feed;
            }
            if *hub.closed().borrow() {
                return;
            }
        };
        scheduler.announce().await;
        scheduler.relist().await;
        let mut announce = tokio::time::interval(config.announce_every());
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        announce.reset();
        let mut relist = tokio::time::interval(RELIST_EVERY);
        relist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        relist.reset();
        loop {
            tokio::select! {
                message = feed.recv() => match message {
                    Ok(HubMessage::Change(encoded)) => scheduler.apply(&encoded.change),
                    Ok(HubMessage::Gap) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        scheduler.relist().await;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = announce.tick() => scheduler.announce().await,
                _ = relist.tick() => scheduler.relist().await,
            }
        }
    };
    tokio::select! {
        () = work => {}
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
}

impl<S: Store> Scheduler<S> {
    fn store(&self) -> &crate::api::Bounded<S> {
        self.ctx.api.store()
    }

    fn mine(&self, id: Ulid) -> bool {
        owner(id, &self.members) == Some(self.me.as_str())
    }

    fn set_owned(&mut self, delta: isize) {
        self.owned = self.owned.saturating_add_signed(delta);
        self.ctx.api.metrics().checks_owned(self.owned);
    }

    /// Announces this replica and, when the list of live checkers changed, moves ownership.
    async fn announce(&mut self) {
        match self.store().checkers(&self.me, self.membership_ttl).await {
            Ok(mut list) => {
                if !list.contains(&self.me) {
                    list.push(self.me.clone());
                }
                list.sort();
                list.dedup();
                if list != self.members {
                    tracing::info!(checkers = list.len(), "check.checkers_changed");
                    self.ctx.api.metrics().checkers(list.len());
                    let before = std::mem::replace(&mut self.members, list);
                    self.reconcile(&before);
                }
            }
            Err(e) => {
                tracing::warn!(error = %Untrusted(&e.to_string()), "check.announce_failed");
            }
        }
    }

    /// Starts the tasks of instances this replica now owns, stops those it no longer owns.
    fn reconcile(&mut self, before: &[String]) {
        let ids: Vec<Ulid> = self.known.keys().copied().collect();
        for id in ids {
            let mine = self.mine(id);
            let start = start_of(id, &self.me, before, &self.members);
            let Some(known) = self.known.get_mut(&id) else {
                continue;
            };
            // A finished task counts as none: an owned instance gets a new one.
            let had = known.task.is_some();
            match (mine, known.running()) {
                (true, false) => {
                    known.task = Some(spawn(&self.ctx, known.instance.clone(), start));
                    if !had {
                        self.set_owned(1);
                    }
                }
                (false, _) if had => {
                    known.task = None;
                    self.set_owned(-1);
                }
                _ => {}
            }
        }
    }

    /// Follows one change of the feed.
    fn apply(&mut self, change: &Change) {
        if change.kind.is_removal() {
            self.remove(change.subject.id());
        } else if let Subject::Record(record) = &change.subject {
            self.upsert(record, Start::Fresh);
        }
    }

    fn remove(&mut self, id: Ulid) {
        if let Some(known) = self.known.remove(&id) {
            if known.task.is_some() {
                self.set_owned(-1);
            }
        }
    }

    /// Takes a record as it is now: a new or changed check (re)starts its task (when owned),
    /// and so does an owned one whose task ended by itself (the record expired or was
    /// deregistered and came back with the same id before this replica saw the removal);
    /// anything else about it leaves the running task alone.
    fn upsert(&mut self, record: &ServiceRecord, start: Start) {
        let Some(spec) = &record.check else {
            self.remove(record.id);
            return;
        };
        if let Some(known) = self.known.get(&record.id) {
            let same = known.instance.spec == *spec && known.instance.url == record.url;
            // Unchanged and as it should be: running when owned, no task when not.
            if same && known.running() == self.mine(record.id) {
                return;
            }
        }
        self.remove(record.id);
        let probe = match Probe::resolve(spec, &record.url) {
            Ok(probe) => probe,
            Err(why) => {
                // Validated at registration; only a record written by something else gets here.
                tracing::warn!(id = %record.id, why = %Untrusted(&why), "check.invalid_spec");
                return;
            }
        };
        let instance = Arc::new(Instance {
            id: record.id,
            url: record.url.clone(),
            spec: spec.clone(),
            probe,
            health: record.health.clone(),
        });
        let task = self
            .mine(record.id)
            .then(|| spawn(&self.ctx, instance.clone(), start));
        if task.is_some() {
            self.set_owned(1);
        }
        self.known.insert(record.id, Known { instance, task });
    }

    /// Lists every record and takes each as it is; forgets what the listing did not return.
    async fn relist(&mut self) {
        let mut listing = match self.store().listing(ListFilter::default(), None).await {
            Ok(listing) => listing,
            Err(e) => {
                tracing::warn!(error = %Untrusted(&e.to_string()), "check.list_failed");
                return;
            }
        };
        let others: Vec<String> = self
            .members
            .iter()
            .filter(|m| **m != self.me)
            .cloned()
            .collect();
        let mut seen = HashSet::new();
        loop {
            let page = match listing.next_page(LIST_BATCH).await {
                Ok(page) => page,
                Err(e) => {
                    // Keep what is known: a partial listing proves nothing gone.
                    tracing::warn!(error = %Untrusted(&e.to_string()), "check.list_failed");
                    return;
                }
            };
            if page.is_empty() {
                break;
            }
            for record in page {
                if record.check.is_some() {
                    seen.insert(record.id);
                    // Unknown here yet: checked before by whoever owned it without this replica.
                    let start = start_of(record.id, &self.me, &others, &self.members);
                    self.upsert(&record, start);
                }
            }
        }
        let gone: Vec<Ulid> = self
            .known
            .keys()
            .filter(|id| !seen.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.remove(id);
        }
    }
}

fn spawn<S: Store>(ctx: &Arc<Ctx<S>>, instance: Arc<Instance>, start: Start) -> Task {
    let interval = spec::interval(&instance.spec);
    let first = first_delay(start, interval, ctx.announce, random_unit());
    Task(tokio::spawn(check_forever(
        ctx.clone(),
        instance,
        first,
        start != Start::Fresh,
    )))
}

/// When an instance that is critical now turned critical, as far as its record tells: the
/// record's `checked_at` (set when its status or output last changed, so never earlier than
/// the turn), else now.
fn critical_since(health: &Health) -> Instant {
    let now = Instant::now();
    let Some(at) = health.checked_at else {
        return now;
    };
    let ago = Timestamp::now().as_millis().saturating_sub(at.as_millis());
    now.checked_sub(Duration::from_millis(ago)).unwrap_or(now)
}

/// Checks one owned instance: after `first`, then every interval (with `respread`, the
/// second check comes at a random point of the interval after the first, so instances taken
/// over together do not stay in step).
async fn check_forever<S: Store>(
    ctx: Arc<Ctx<S>>,
    instance: Arc<Instance>,
    first: Duration,
    respread: bool,
) {
    let id = instance.id;
    let interval = spec::interval(&instance.spec);
    let deregister_after = instance
        .spec
        .deregister_critical_after_seconds
        .map(Duration::from_secs);
    let mut damper = Damper::new(instance.health.status, &instance.spec);
    let mut shown = instance.health.clone();
    let mut critical = (shown.status == HealthStatus::Critical).then(|| critical_since(&shown));
    let mut respread = respread;
    tokio::time::sleep(first).await;
    let mut next = Instant::now();
    loop {
        let result = ctx.probe(&instance).await;
        let failed = result.status != HealthStatus::Passing;
        if let Some(status) = damper.feed(result.status) {
            let health = HealthReport::new(status, result.output).into_health(Timestamp::now());
            if health.status != shown.status || health.output != shown.output {
                match ctx.api.store().set_health(id, health.clone(), ADMIN).await {
                    Ok(Some(_)) => {
                        if health.status != shown.status {
                            tracing::info!(id = %id, url = %Untrusted(&instance.url),
                                status = %health.status, output = %Untrusted(&health.output),
                                source = "pull", "service.health");
                        }
                        shown = health;
                    }
                    // Deregistered or expired: the feed removes it; nothing left to check.
                    Ok(None) => return,
                    Err(e) => tracing::debug!(id = %id, error = %Untrusted(&e.to_string()),
                        "check.write_failed"),
                }
            }
        }
        if damper.status() == HealthStatus::Critical {
            let since = *critical.get_or_insert_with(Instant::now);
            // Only while the latest probe failed too: a damped status still critical (it
            // needs `successes_before_passing` passes to leave) says nothing against an
            // instance that answers well again, and `since` may come from an old record.
            let due = |after: &Duration| failed && since.elapsed() >= *after;
            if let Some(after) = deregister_after.filter(due) {
                match ctx.api.store().deregister_as(id, ADMIN).await {
                    Ok(Some(record)) => {
                        tracing::info!(id = %id, url = %Untrusted(&record.url),
                            reason = %format!("critical for {} s (deregister_critical_after_seconds {})",
                                since.elapsed().as_secs(), after.as_secs()),
                            "service.deregistered");
                        return;
                    }
                    Ok(None) => return,
                    Err(e) => tracing::debug!(id = %id, error = %Untrusted(&e.to_string()),
                        "check.deregister_failed"),
                }
            }
        } else {
            critical = None;
        }
        let now = Instant::now();
        if respread {
            respread = false;
            next = now + interval.mul_f64(1.0 - random_unit());
        } else {
            // Slots missed while waiting for a permit are skipped, not made up in a burst.
            while next <= now {
                next += interval;
            }
        }
        tokio::time::sleep_until(next).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn scheduler() -> Scheduler<MemoryStore> {
        let api = Api::new(
            MemoryStore::new(Duration::from_secs(30)),
            None,
            None,
            1 << 20,
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        );
        Scheduler {
            ctx: Arc::new(Ctx {
                prober: Prober::new("me", 4),
                permits: Semaphore::new(4),
                announce: Duration::from_secs(1),
                api: Arc::new(api),
            }),
            me: "me".into(),
            membership_ttl: Duration::from_secs(3),
            members: vec!["me".into()],
            known: HashMap::new(),
            owned: 0,
        }
    }

    /// A record with a TCP check of a port nobody listens on, not in the store: its check
    /// fails at once and its write finds no record, so its task ends by itself.
    fn record(port: u16) -> ServiceRecord {
        let mut check = CheckSpec::tcp();
        check.interval_seconds = 1;
        check.timeout_seconds = 1;
        check.failures_before_critical = 1;
        let now = Timestamp::now();
        ServiceRecord {
            id: Ulid::new(),
            url: format!("http://127.0.0.1:{port}"),
            info: serde_json::from_value(serde_json::json!({"display_name": "x"})).expect("info"),
            registered_at: now,
            last_updated: now,
            last_ping_at: now,
            expires_at: now,
            health: Health::default(),
            check: Some(check),
        }
    }

    async fn until_ended(s: &Scheduler<MemoryStore>, id: Ulid) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.known[&id].running() {
            assert!(Instant::now() < deadline, "the check task never ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_task_that_ended_by_itself_is_restarted_by_the_same_record() {
        // A port that was free a moment ago: connecting is refused.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let mut s = scheduler();
        let record = record(port);
        s.upsert(&record, Start::Orphaned);
        assert!(s.known[&record.id].running());
        assert_eq!(s.owned, 1);
        until_ended(&s, record.id).await;
        assert!(s.known[&record.id].task.is_some());

        // The same id comes back with the same check (no removal seen in between).
        s.upsert(&record, Start::Fresh);
        assert!(s.known[&record.id].running(), "not restarted by upsert");
        assert_eq!(s.owned, 1);
        until_ended(&s, record.id).await;

        // A membership change that keeps it here restarts it too.
        let before = s.members.clone();
        s.reconcile(&before);
        assert!(s.known[&record.id].running(), "not restarted by reconcile");
        assert_eq!(s.owned, 1);
        until_ended(&s, record.id).await;

        // Not owned any more: no task, not counted.
        s.members = vec!["other".into()];
        s.reconcile(&before);
        assert!(s.known[&record.id].task.is_none());
        assert_eq!(s.owned, 0);
        s.remove(record.id);
        assert_eq!(s.owned, 0);
    }
}
