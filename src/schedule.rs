//! When to try again: registration backoff and the keepalive ping schedule.
//!
//! Pure functions of what happened and a random number, so every rule is unit-tested without
//! a clock or a network; the lifecycle task only sleeps for what they return.

use std::time::Duration;

/// Shortest pause between pings when the orchestrator does not answer.
pub(crate) const MIN_PING_RETRY: Duration = Duration::from_millis(250);
/// Longest pause ever taken; also bounds user-given durations in arithmetic.
pub(crate) const MAX_PAUSE: Duration = Duration::from_secs(24 * 3600);
/// Longest TTL taken from an orchestrator's answer (the orchestrator allows one day).
pub(crate) const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// A uniform random number in `[0, 1)` for the functions below.
pub(crate) fn random() -> f64 {
    fastrand::f64()
}

/// The full-jitter exponential backoff after failed attempt number `attempt` (0-based): `r`
/// times `base * 2^attempt`, capped at `cap`. A server's `Retry-After` wins when longer (up to
/// `cap`).
pub(crate) fn backoff(
    base: Duration,
    attempt: u32,
    cap: Duration,
    retry_after: Option<Duration>,
    r: f64,
) -> Duration {
    let cap = cap.min(MAX_PAUSE);
    let ceiling = base
        .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .min(cap);
    let jittered = ceiling.mul_f64(r.clamp(0.0, 1.0));
    match retry_after {
        Some(ra) => jittered.max(ra.min(cap)),
        None => jittered,
    }
}

/// `d` ± 10 % (at most [`MAX_PAUSE`]), so a fleet started together does not ping in step.
pub(crate) fn jitter(d: Duration, r: f64) -> Duration {
    d.min(MAX_PAUSE).mul_f64(0.9 + 0.2 * r.clamp(0.0, 1.0))
}

/// The keepalive interval: the fixed one when configured, else a third of the TTL, so two
/// pings in a row may be lost before the entry expires.
pub(crate) fn keepalive_interval(fixed: Option<Duration>, ttl: Duration) -> Duration {
    // At least MIN_PING_RETRY, so the "ping sooner" range below is never empty.
    fixed.unwrap_or(ttl / 3).clamp(MIN_PING_RETRY, MAX_PAUSE)
}

/// How the last ping ended, as far as the schedule cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PingOutcome {
    /// The orchestrator confirmed the entry (or a re-registration succeeded).
    Alive,
    /// A 401/403-like answer: a configuration problem that pinging faster will not fix.
    Rejected,
    /// No usable answer. `left` is the time until the entry expires by our clock, `took` how
    /// long the failed ping itself waited, `retry_after` the server's requested pause.
    Unanswered {
        left: Duration,
        took: Duration,
        retry_after: Option<Duration>,
    },
}

/// The pause before the next ping.
pub(crate) fn next_ping(interval: Duration, outcome: PingOutcome, r: f64) -> Duration {
    match outcome {
        PingOutcome::Alive | PingOutcome::Rejected => jitter(interval, r),
        // Ping sooner as expiry nears, so a short outage does not cost the entry.
        PingOutcome::Unanswered { left, .. } if !left.is_zero() => {
            (left / 3).clamp(MIN_PING_RETRY, interval)
        }
        // Expired by our clock: no reason to hurry any more, but come back within an interval
        // (the entry must reappear within one once the orchestrator answers), jittered so a
        // fleet does not retry in step, and no sooner than a Retry-After asks. The failed
        // ping's own wait (up to an interval) counts towards it.
        PingOutcome::Unanswered {
            took, retry_after, ..
        } => jitter(interval, r)
            .saturating_sub(took)
            .max(MIN_PING_RETRY)
            .max(retry_after.unwrap_or_default().min(MAX_PAUSE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn backoff_is_exponential_with_full_jitter_and_capped() {
        let base = MS(100);
        for attempt in 0..10 {
            let ceiling = (base * 2u32.pow(attempt)).min(S(30));
            assert_eq!(backoff(base, attempt, S(30), None, 0.0), Duration::ZERO);
            assert_eq!(backoff(base, attempt, S(30), None, 1.0), ceiling);
            assert_eq!(backoff(base, attempt, S(30), None, 0.5), ceiling / 2);
        }
        // Huge attempt counts and bases do not overflow.
        assert_eq!(backoff(base, 400, S(30), None, 1.0), S(30));
        assert_eq!(backoff(S(u64::MAX / 4), 40, S(30), None, 1.0), S(30));
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        assert_eq!(backoff(MS(1), 0, S(30), Some(S(5)), 0.0), S(5));
        assert_eq!(backoff(MS(1), 0, S(30), Some(S(500)), 0.0), S(30));
        // A longer jittered pause wins over a short Retry-After.
        assert_eq!(backoff(S(10), 0, S(30), Some(S(1)), 1.0), S(10));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        assert_eq!(jitter(S(10), 0.0), S(9));
        assert_eq!(jitter(S(10), 0.5), S(10));
        assert_eq!(jitter(S(10), 1.0), S(11));
        assert_eq!(jitter(Duration::MAX, 0.5), MAX_PAUSE);
    }

    #[test]
    fn the_interval_is_a_third_of_the_ttl_unless_fixed() {
        assert_eq!(keepalive_interval(None, S(30)), S(10));
        assert_eq!(keepalive_interval(Some(S(4)), S(30)), S(4));
        assert_eq!(keepalive_interval(None, MS(300)), MIN_PING_RETRY);
        assert_eq!(keepalive_interval(Some(Duration::MAX), S(30)), MAX_PAUSE);
    }

    #[test]
    fn a_good_ping_schedules_the_next_one_an_interval_later() {
        assert_eq!(next_ping(S(10), PingOutcome::Alive, 0.5), S(10));
        assert_eq!(next_ping(S(10), PingOutcome::Rejected, 0.0), S(9));
    }

    #[test]
    fn failed_pings_come_sooner_as_expiry_nears() {
        let unanswered = |left| PingOutcome::Unanswered {
            left,
            took: MS(10),
            retry_after: None,
        };
        // 27 s left: no faster than the interval.
        assert_eq!(next_ping(S(10), unanswered(S(27)), 0.5), S(9));
        // 6 s left: a third of it.
        assert_eq!(next_ping(S(10), unanswered(S(6)), 0.5), S(2));
        // Almost expired: never below the floor.
        assert_eq!(next_ping(S(10), unanswered(MS(30)), 0.5), MIN_PING_RETRY);
    }

    #[test]
    fn after_expiry_it_tries_once_per_interval_counting_the_failed_wait() {
        let expired = |took, retry_after| PingOutcome::Unanswered {
            left: Duration::ZERO,
            took,
            retry_after,
        };
        assert_eq!(next_ping(S(10), expired(S(4), None), 0.5), S(6));
        // A ping that waited a whole interval is followed at once (after the floor).
        assert_eq!(next_ping(S(10), expired(S(10), None), 0.5), MIN_PING_RETRY);
        // Retry-After is a lower bound.
        assert_eq!(next_ping(S(10), expired(S(1), Some(S(60))), 0.5), S(60));
    }
}
