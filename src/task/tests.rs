//! The lifecycle's timing on tokio's paused clock, against a fake orchestrator: no sockets,
//! no real waiting, and no dependence on how busy the machine is.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use http::Method;

use super::*;
use crate::config::{Overrides, Tunables};
use crate::handle::Phase;
use crate::protocol::{LeaseToken, RegisterResponse, Timestamp};

const ID: &str = "01JDQ9J4XWAZ3M5S1X2VQ7N8C4";

/// What the fake answers; `Hang` never answers.
#[derive(Clone)]
enum Answer {
    Ok,
    Status(u16),
    /// The status after a while.
    Later(Duration, u16),
    Hang,
}

#[derive(Default)]
struct Script {
    register: VecDeque<Answer>,
    ping: VecDeque<Answer>,
    deregister: VecDeque<Answer>,
    /// The lease token each successful registration grants, in order; none when empty (an
    /// orchestrator without leases, as the reference).
    grant: VecDeque<&'static str>,
    /// (what, when, presented id, presented lease token) of every call.
    calls: Vec<(&'static str, Instant, Option<Ulid>, Option<String>)>,
    /// The health report of every ping, in order.
    reports: Vec<Option<HealthReport>>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Script>>);

impl Fake {
    fn next(
        &self,
        what: &'static str,
        previous: Option<Ulid>,
        lease: Option<&LeaseToken>,
    ) -> Answer {
        let mut s = self.0.lock().unwrap();
        let token = lease.map(|t| t.expose().to_owned());
        s.calls.push((what, Instant::now(), previous, token));
        let queue = match what {
            "register" => &mut s.register,
            "ping" => &mut s.ping,
            _ => &mut s.deregister,
        };
        queue.pop_front().unwrap_or(Answer::Ok)
    }

    fn calls(&self, what: &str) -> Vec<(Instant, Option<Ulid>)> {
        let s = self.0.lock().unwrap();
        s.calls
            .iter()
            .filter(|c| c.0 == what)
            .map(|c| (c.1, c.2))
            .collect()
    }

    /// The lease token each call of `what` presented.
    fn presented(&self, what: &str) -> Vec<Option<String>> {
        let s = self.0.lock().unwrap();
        s.calls
            .iter()
            .filter(|c| c.0 == what)
            .map(|c| c.3.clone())
            .collect()
    }

    async fn answer<T>(answer: Answer, ok: T) -> Result<T, ClientError> {
        match answer {
            Answer::Ok => Ok(ok),
            Answer::Status(code) => Err(ClientError::Status {
                method: Method::POST,
                url: "http://o:9000/services/$register".into(),
                status: StatusCode::from_u16(code).unwrap(),
                problem: None,
                retry_after: None,
            }),
            Answer::Later(after, code) => {
                tokio::time::sleep(after).await;
                Box::pin(Fake::answer(Answer::Status(code), ok)).await
            }
            Answer::Hang => std::future::pending().await,
        }
    }
}

impl Orchestrator for Fake {
    async fn register(
        &self,
        _url: &str,
        _info: &ServiceInfo,
        previous: Option<Ulid>,
        lease: Option<&LeaseToken>,
    ) -> Result<Registered, ClientError> {
        let answer = self.next("register", previous, lease);
        let granted = match answer {
            Answer::Ok => self.0.lock().unwrap().grant.pop_front(),
            _ => None,
        };
        let r = RegisterResponse {
            id: Ulid::from_string(ID).unwrap(),
            status: RegistrationStatus::Registered,
            service_url: "http://svc:8000".into(),
            message: String::new(),
            ttl_seconds: 30,
            ping_url: format!("http://o:9000/services/{ID}/$ping"),
            lease_token: granted.map(LeaseToken::new),
        };
        let ok = Registered {
            ping_url: r.ping_url.parse().unwrap(),
            entry_url: format!("http://o:9000/services/{ID}").parse().unwrap(),
            answer: r,
        };
        Fake::answer(answer, ok).await
    }

    async fn ping(
        &self,
        _url: &Uri,
        within: Duration,
        lease: Option<&LeaseToken>,
        report: Option<&HealthReport>,
    ) -> Result<Option<PingResponse>, ClientError> {
        self.0.lock().unwrap().reports.push(report.cloned());
        let answer = self.next("ping", None, lease);
        let pong = PingResponse {
            id: Ulid::from_string(ID).unwrap(),
            status: "alive".into(),
            last_ping_at: Timestamp::from_millis(0),
            expires_at: Timestamp::from_millis(0),
        };
        match tokio::time::timeout(within, Fake::answer(answer, Some(pong))).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                method: Method::PUT,
                url: "ping".into(),
                after: within,
            }),
        }
    }

    async fn deregister(
        &self,
        _url: &Uri,
        within: Duration,
        lease: Option<&LeaseToken>,
    ) -> Result<bool, ClientError> {
        let answer = self.next("deregister", None, lease);
        match tokio::time::timeout(within, Fake::answer(answer, true)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                method: Method::DELETE,
                url: "entry".into(),
                after: within,
            }),
        }
    }
}

struct Running {
    fake: Fake,
    status: StatusWriter,
    stop: watch::Sender<Option<Instant>>,
    health_now: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn request_stop(&self) -> Instant {
        let now = Instant::now();
        self.stop.send_replace(Some(now));
        now
    }

    async fn wait_phase(&self, phase: Phase) {
        let mut rx = self.status.subscribe();
        rx.wait_for(|s| s.phase == phase).await.unwrap();
    }
}

fn start(fake: Fake, tunables: Tunables, fail_on_error: bool) -> Running {
    let map = |k: &str| (k == "SERVICEKIT_ORCHESTRATOR_URL").then(|| "http://o:9000".to_owned());
    let config = Overrides::default()
        .resolve(&tunables, &map, &|| Ok("svc".into()))
        .unwrap();
    let status = StatusWriter::new(fail_on_error);
    let (stop, rx) = watch::channel(None);
    let health_now = Arc::new(Notify::new());
    let task = Task {
        config,
        orchestrator: fake.clone(),
        probe: Probe::always_ready(),
        status: status.clone(),
        stop: rx,
        health_now: health_now.clone(),
    };
    Running {
        fake,
        status,
        stop,
        health_now,
        task: tokio::spawn(task.run()),
    }
}

fn with_script(f: impl FnOnce(&mut Script)) -> Fake {
    let fake = Fake::default();
    f(&mut fake.0.lock().unwrap());
    fake
}

#[tokio::test(start_paused = true)]
async fn pings_come_every_third_of_the_ttl_within_ten_percent() {
    let r = start(Fake::default(), Tunables::default(), false);
    r.wait_phase(Phase::Registered).await;
    let registered = Instant::now();
    tokio::time::sleep(Duration::from_secs(65)).await;
    let pings = r.fake.calls("ping");
    // TTL 30 s: an interval of 10 s ± 1 s, so 5 or 6 pings in 65 s.
    assert!((5..=7).contains(&pings.len()), "{} pings", pings.len());
    let mut last = registered;
    for (at, _) in pings {
        let gap = at - last;
        assert!(
            gap >= Duration::from_secs(9) && gap <= Duration::from_secs(11),
            "{gap:?}"
        );
        last = at;
    }
    r.request_stop();
    r.task.await.unwrap();
    assert_eq!(r.fake.calls("deregister").len(), 1);
    assert_eq!(r.status.snapshot().phase, Phase::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_forgotten_entry_is_registered_again_presenting_its_id() {
    let fake = with_script(|s| s.ping = [Answer::Ok, Answer::Status(404)].into());
    let r = start(fake, Tunables::default(), false);
    tokio::time::sleep(Duration::from_secs(25)).await;
    let registers = r.fake.calls("register");
    assert_eq!(registers.len(), 2, "registered again after the 404");
    assert_eq!(registers[0].1, None);
    assert_eq!(registers[1].1, Some(Ulid::from_string(ID).unwrap()));
    assert_eq!(r.status.snapshot().phase, Phase::Registered);
}

#[tokio::test(start_paused = true)]
async fn the_lease_token_is_kept_and_presented_on_every_write() {
    let fake = with_script(|s| s.grant = ["t0k3n-1"].into());
    let r = start(fake, Tunables::default(), false);
    r.wait_phase(Phase::Registered).await;
    tokio::time::sleep(Duration::from_secs(25)).await;
    r.request_stop();
    r.task.await.unwrap();
    let token = Some("t0k3n-1".to_owned());
    assert_eq!(
        r.fake.presented("register"),
        vec![None],
        "none to present yet"
    );
    let pings = r.fake.presented("ping");
    assert!(pings.len() >= 2, "{} pings", pings.len());
    assert!(pings.iter().all(|t| *t == token), "{pings:?}");
    assert_eq!(r.fake.presented("deregister"), vec![token]);
}

#[tokio::test(start_paused = true)]
async fn a_re_registration_after_a_404_presents_the_lease_and_keeps_the_new_one() {
    let fake = with_script(|s| {
        s.grant = ["first", "second"].into();
        s.ping = [Answer::Ok, Answer::Status(404)].into();
    });
    let r = start(fake, Tunables::default(), false);
    tokio::time::sleep(Duration::from_secs(35)).await;
    r.request_stop();
    r.task.await.unwrap();
    let presented = r.fake.presented("register");
    assert_eq!(presented, vec![None, Some("first".to_owned())]);
    let pings = r.fake.presented("ping");
    assert_eq!(pings[..2], [Some("first".into()), Some("first".into())]);
    assert!(pings.len() >= 3, "pinged again after re-registering");
    assert!(
        pings[2..].iter().all(|t| t.as_deref() == Some("second")),
        "{pings:?}"
    );
    assert_eq!(r.fake.presented("deregister"), vec![Some("second".into())]);
}

#[tokio::test(start_paused = true)]
async fn without_a_token_from_the_orchestrator_none_is_presented() {
    let fake = with_script(|s| s.ping = [Answer::Ok, Answer::Status(404)].into());
    let r = start(fake, Tunables::default(), false);
    tokio::time::sleep(Duration::from_secs(35)).await;
    r.request_stop();
    r.task.await.unwrap();
    for what in ["register", "ping", "deregister"] {
        let presented = r.fake.presented(what);
        assert!(!presented.is_empty(), "no {what} call");
        assert!(
            presented.iter().all(Option::is_none),
            "{what}: {presented:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn failed_pings_come_sooner_as_expiry_nears_and_report_unregistered_after_it() {
    let fake = with_script(|s| s.ping = std::iter::repeat_n(Answer::Status(503), 50).collect());
    let r = start(fake, Tunables::default(), false);
    r.wait_phase(Phase::Registered).await;
    let registered = Instant::now();
    tokio::time::sleep(Duration::from_secs(29)).await;
    let pings = r.fake.calls("ping");
    // First ping after ~10 s, then a third of the time left: more pings than the interval
    // alone would give, all before the entry expires.
    assert!(pings.len() >= 4, "{} pings before expiry", pings.len());
    let gaps: Vec<_> = pings.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(
        gaps.windows(2).all(|g| g[1] <= g[0]),
        "gaps shrink: {gaps:?}"
    );
    assert_eq!(r.status.snapshot().ping_failures as usize, pings.len());
    assert_eq!(r.status.snapshot().phase, Phase::Registered);
    tokio::time::sleep_until(registered + Duration::from_secs(45)).await;
    assert_eq!(
        r.status.snapshot().phase,
        Phase::Registering,
        "expired by now"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_with_a_hung_orchestrator_is_bounded_by_the_budget() {
    // A registration in flight at the signal.
    let fake = with_script(|s| s.register = [Answer::Hang].into());
    let r = start(fake, Tunables::default(), false);
    r.wait_phase(Phase::Registering).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = r.request_stop();
    r.task.await.unwrap();
    assert_eq!(
        Instant::now() - asked,
        Duration::from_secs(2),
        "the default 2 s budget"
    );
    assert_eq!(r.status.snapshot().phase, Phase::Stopped);

    // A deregistration that hangs gets what is left of the budget.
    let fake = with_script(|s| s.deregister = [Answer::Hang].into());
    let tunables = Tunables {
        shutdown_timeout: Duration::from_millis(700),
        ..Tunables::default()
    };
    let r = start(fake, tunables, false);
    r.wait_phase(Phase::Registered).await;
    let asked = r.request_stop();
    r.task.await.unwrap();
    assert_eq!(Instant::now() - asked, Duration::from_millis(700));
    assert_eq!(r.fake.calls("deregister").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn exhausted_attempts_fail_for_good_only_with_fail_on_error() {
    let failing =
        || with_script(|s| s.register = std::iter::repeat_n(Answer::Status(503), 20).collect());
    let tunables = Tunables {
        max_attempts: 3,
        ..Tunables::default()
    };
    let r = start(failing(), tunables.clone(), true);
    r.task.await.unwrap();
    let s = r.status.snapshot();
    assert_eq!(s.phase, Phase::Failed);
    assert!(
        matches!(
            s.error,
            Some(RegistrationError::Exhausted { attempts: 3, .. })
        ),
        "{:?}",
        s.error
    );
    assert_eq!(r.fake.calls("register").len(), 3);

    // Without it: background retries every max_retry_delay, and the error is shown.
    let r = start(failing(), tunables, false);
    tokio::time::sleep(Duration::from_secs(120)).await;
    let s = r.status.snapshot();
    assert_eq!(s.phase, Phase::Registering);
    assert!(matches!(
        s.error,
        Some(RegistrationError::Exhausted { attempts: 3, .. })
    ));
    let calls = r.fake.calls("register");
    let background: Vec<_> = calls[3..].windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(!background.is_empty());
    for gap in background {
        assert!(
            gap >= Duration::from_secs(27) && gap <= Duration::from_secs(33),
            "{gap:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_lease_held_by_a_previous_process_is_waited_out() {
    // Restarted within the TTL: the previous process's entry is still live under its lease,
    // so the orchestrator refuses (403) until that entry expires, then registers.
    let fake = with_script(|s| {
        s.register = std::iter::repeat_n(Answer::Status(403), 4)
            .chain(std::iter::once(Answer::Ok))
            .collect();
    });
    let r = start(fake, Tunables::default(), true);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let s = r.status.snapshot();
    assert_eq!(s.phase, Phase::Registered, "{:?}", s.error);
    assert_eq!(r.fake.calls("register").len(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_404_on_register_is_a_wrong_url_with_a_hint_and_not_retried() {
    let fake = with_script(|s| s.register = [Answer::Status(404)].into());
    let r = start(fake, Tunables::default(), false);
    r.task.await.unwrap();
    let s = r.status.snapshot();
    assert_eq!(s.phase, Phase::Unregistered);
    match s.error {
        Some(RegistrationError::Rejected {
            hint: Some(hint), ..
        }) => {
            assert!(hint.contains("http://o:9000/services/$register"), "{hint}");
            assert!(
                hint.contains("set SERVICEKIT_ORCHESTRATOR_URL=http://o:9000"),
                "{hint}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.fake.calls("register").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_re_registration_is_shown_and_with_fail_on_error_ends_it() {
    let script = || {
        with_script(|s| {
            s.ping = std::iter::repeat_n(Answer::Status(404), 20).collect();
            s.register = std::iter::once(Answer::Ok)
                .chain(std::iter::repeat_n(Answer::Status(401), 20))
                .collect();
        })
    };
    let r = start(script(), Tunables::default(), true);
    r.task.await.unwrap();
    let s = r.status.snapshot();
    assert_eq!(s.phase, Phase::Failed);
    assert!(
        matches!(s.error, Some(RegistrationError::Rejected { .. })),
        "{:?}",
        s.error
    );

    let r = start(script(), Tunables::default(), false);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let s = r.status.snapshot();
    assert_eq!(
        s.phase,
        Phase::Registering,
        "still trying in the background"
    );
    assert!(r.fake.calls("register").len() > 2, "and retrying");
    assert!(
        matches!(s.error, Some(RegistrationError::Rejected { .. })),
        "{:?}",
        s.error
    );
}

#[tokio::test(start_paused = true)]
async fn a_failure_after_the_signal_is_not_a_registration_failure() {
    // The last allowed attempt fails only after shutdown was requested.
    let fake = with_script(|s| {
        s.register = [Answer::Later(Duration::from_secs(1), 503)].into();
    });
    let tunables = Tunables {
        max_attempts: 1,
        ..Tunables::default()
    };
    let r = start(fake, tunables, true);
    r.wait_phase(Phase::Registering).await;
    r.request_stop();
    r.task.await.unwrap();
    let s = r.status.snapshot();
    assert_eq!(s.phase, Phase::Stopped, "{:?}", s.error);
    assert!(s.error.is_none());
}

// --- Health reports on the pings ---

/// Tunables whose health function answers what `state` holds (after `delay`).
fn reporting(state: Arc<Mutex<HealthReport>>, delay: Duration) -> Tunables {
    let health = move || {
        let state = state.clone();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            state.lock().unwrap().clone()
        }) as std::pin::Pin<Box<dyn Future<Output = HealthReport> + Send>>
    };
    Tunables {
        health: Some(crate::config::HealthFn(Arc::new(health))),
        ..Tunables::default()
    }
}

impl Fake {
    fn reports(&self) -> Vec<Option<HealthReport>> {
        self.0.lock().unwrap().reports.clone()
    }
}

#[tokio::test(start_paused = true)]
async fn without_a_health_function_pings_have_no_body() {
    let r = start(Fake::default(), Tunables::default(), false);
    r.wait_phase(Phase::Registered).await;
    tokio::time::sleep(Duration::from_secs(25)).await;
    let reports = r.fake.reports();
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert!(reports.iter().all(Option::is_none), "{reports:?}");
}

#[tokio::test(start_paused = true)]
async fn every_ping_carries_the_health_of_the_moment_the_first_right_after_registering() {
    let state = Arc::new(Mutex::new(HealthReport::passing()));
    let r = start(
        Fake::default(),
        reporting(state.clone(), Duration::from_millis(10)),
        false,
    );
    r.wait_phase(Phase::Registered).await;
    let registered = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pings = r.fake.calls("ping");
    assert_eq!(pings.len(), 1, "one report right after registering");
    assert!(pings[0].0 - registered <= Duration::from_millis(20));
    *state.lock().unwrap() = HealthReport::critical("db down");
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        r.fake.reports(),
        [
            Some(HealthReport::passing()),
            Some(HealthReport::critical("db down"))
        ]
    );
    // One report per ping: the interval is still a third of the TTL.
    let pings = r.fake.calls("ping");
    let gap = pings[1].0 - pings[0].0;
    assert!(
        gap >= Duration::from_secs(9) && gap <= Duration::from_secs(11),
        "{gap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hung_health_function_reports_critical_and_never_stalls_the_keepalive() {
    let state = Arc::new(Mutex::new(HealthReport::passing()));
    let r = start(
        Fake::default(),
        reporting(state, Duration::from_secs(3600)),
        false,
    );
    r.wait_phase(Phase::Registered).await;
    let registered = Instant::now();
    tokio::time::sleep(Duration::from_secs(25)).await;
    let pings = r.fake.calls("ping");
    assert!(pings.len() >= 3, "{} pings", pings.len());
    // The default health timeout: 2 s, then the ping goes out anyway.
    let first = pings[0].0 - registered;
    assert_eq!(first, Duration::from_secs(2), "{first:?}");
    let timed_out = HealthReport::critical("health check timed out");
    assert!(
        r.fake
            .reports()
            .iter()
            .all(|x| x.as_ref() == Some(&timed_out)),
        "{:?}",
        r.fake.reports()
    );
    assert_eq!(r.status.snapshot().phase, Phase::Registered);
    r.request_stop();
    within_budget(r).await;
}

async fn within_budget(r: Running) {
    tokio::time::timeout(Duration::from_secs(3), r.task)
        .await
        .expect("the task stops within the shutdown budget")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn report_health_now_brings_the_next_ping_forward() {
    let state = Arc::new(Mutex::new(HealthReport::passing()));
    let r = start(
        Fake::default(),
        reporting(state.clone(), Duration::ZERO),
        false,
    );
    r.wait_phase(Phase::Registered).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(r.fake.calls("ping").len(), 1);
    *state.lock().unwrap() = HealthReport::critical("db down");
    let asked = Instant::now();
    r.health_now.notify_one();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let pings = r.fake.calls("ping");
    assert_eq!(pings.len(), 2, "pinged at once");
    assert!(pings[1].0 - asked < Duration::from_millis(1));
    assert_eq!(r.fake.reports()[1], Some(HealthReport::critical("db down")));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_health_function_reports_critical_and_the_keepalive_goes_on() {
    let health = || {
        Box::pin(async { panic!("the health function broke") as HealthReport })
            as std::pin::Pin<Box<dyn Future<Output = HealthReport> + Send>>
    };
    let t = Tunables {
        health: Some(crate::config::HealthFn(Arc::new(health))),
        ..Tunables::default()
    };
    let r = start(Fake::default(), t, false);
    r.wait_phase(Phase::Registered).await;
    tokio::time::sleep(Duration::from_secs(25)).await;
    let reports = r.fake.reports();
    assert!(reports.len() >= 3, "{reports:?}");
    let panicked = HealthReport::critical("health check panicked");
    assert!(
        reports.iter().all(|x| x.as_ref() == Some(&panicked)),
        "{reports:?}"
    );
    assert_eq!(r.status.snapshot().phase, Phase::Registered);
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_a_slow_health_call_deregisters_at_once() {
    let state = Arc::new(Mutex::new(HealthReport::passing()));
    let mut t = reporting(state, Duration::from_secs(3600));
    t.health_timeout = Duration::from_secs(4);
    let r = start(Fake::default(), t, false);
    r.wait_phase(Phase::Registered).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = r.request_stop();
    r.wait_phase(Phase::Stopped).await;
    assert!(
        asked.elapsed() < Duration::from_millis(10),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(r.fake.calls("deregister").len(), 1);
    assert!(r.fake.calls("ping").is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_health_call_hung_at_shutdown_is_abandoned_not_left_running() {
    /// Says when the health call's future is dropped (its task aborted).
    struct Dropped(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = dropped.clone();
    let health = move || {
        let guard = Dropped(flag.clone());
        Box::pin(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            HealthReport::passing()
        }) as std::pin::Pin<Box<dyn Future<Output = HealthReport> + Send>>
    };
    let mut t = Tunables {
        health: Some(crate::config::HealthFn(Arc::new(health))),
        ..Tunables::default()
    };
    t.health_timeout = Duration::from_secs(4);
    let r = start(Fake::default(), t, false);
    r.wait_phase(Phase::Registered).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !dropped.load(std::sync::atomic::Ordering::SeqCst),
        "still in its call"
    );
    r.request_stop();
    r.wait_phase(Phase::Stopped).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        "the hung health call outlived the keepalive"
    );
}

#[tokio::test(start_paused = true)]
async fn a_re_registration_reports_the_health_at_once() {
    let fake = with_script(|s| s.ping = [Answer::Ok, Answer::Status(404)].into());
    let state = Arc::new(Mutex::new(HealthReport::critical("db down")));
    let r = start(fake, reporting(state, Duration::ZERO), false);
    r.wait_phase(Phase::Registered).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    // Registered, report, (interval) 404, re-registered, report at once.
    let registers = r.fake.calls("register");
    let pings = r.fake.calls("ping");
    assert_eq!((registers.len(), pings.len()), (2, 3), "{pings:?}");
    assert_eq!(pings[2].0, registers[1].0);
}
