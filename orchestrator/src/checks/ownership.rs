//! Which checker replica checks which instance, and when a newly owned instance is first
//! checked.
//!
//! Every replica announces itself in the store and reads the list of live checkers
//! ([`crate::store::Store::checkers`]); the owner of an instance is the live checker with the
//! highest rendezvous (highest-random-weight) score for the pair. Every replica computes the
//! same owner from the same list without talking to the others, and when a checker joins or
//! leaves only the instances it wins or held move (about 1/n of them).

use std::time::Duration;

use ulid::Ulid;

/// The rendezvous score of `checker` for instance `id`: a well-mixed 64-bit hash of both.
pub fn score(id: Ulid, checker: &str) -> u64 {
    // FNV-1a over the checker id, mixed with the instance id, through the MurmurHash3
    // finaliser: FNV alone mixes its last bytes too little for fair rendezvous shares.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in checker.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let n = id.0;
    fmix64(fmix64(h ^ (n as u64)) ^ ((n >> 64) as u64))
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The owner of `id` among `checkers`; `None` when there is none.
pub fn owner(id: Ulid, checkers: &[String]) -> Option<&str> {
    checkers
        .iter()
        .max_by_key(|c| (score(id, c), c.as_str()))
        .map(String::as_str)
}

/// Why an instance is newly owned by this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Nobody checked it: a new registration, a changed check, or no previous owner.
    Fresh,
    /// Its previous owner is gone (died, or left the list): check soon.
    Orphaned,
    /// Its previous owner is alive and stops at its next announce, within one announce
    /// period: start after that, so two replicas never check it at the same time.
    Moved,
}

/// Classifies `id`, newly owned by `me` under `now`, by its owner under `before` (the
/// previous list; at start, the list without `me`).
pub fn start_of(id: Ulid, me: &str, before: &[String], now: &[String]) -> Start {
    match owner(id, before) {
        None => Start::Fresh,
        Some(prev) if prev == me => Start::Fresh,
        Some(prev) if now.iter().any(|c| c == prev) => Start::Moved,
        Some(_) => Start::Orphaned,
    }
}

/// When the first check of a newly owned instance is due, given a uniform random `r` in
/// [0, 1): a fresh one at a random point of its interval (so checks never come in waves); an
/// orphaned one soon, within the smaller of a quarter interval and one announce period (so
/// it is taken over within one interval of its owner's death); a moved one one announce
/// period later than that.
pub fn first_delay(start: Start, interval: Duration, announce: Duration, r: f64) -> Duration {
    let soon = (interval / 4).min(announce);
    match start {
        Start::Fresh => interval.mul_f64(r),
        Start::Orphaned => soon.mul_f64(r),
        Start::Moved => announce + soon.mul_f64(r),
    }
}

/// A uniform random number in [0, 1) from the OS; 0.5 if it has none to give.
pub fn random_unit() -> f64 {
    getrandom::u64().map_or(0.5, |n| (n >> 11) as f64 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Ulid> {
        (0..n as u128)
            .map(|i| Ulid((0x0193_0000_0000_0000_0000_0000_0000 + i * 7919) << 16))
            .collect()
    }

    fn list(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn every_instance_has_one_owner_and_shares_are_fair() {
        let all = list(&["a", "b", "c"]);
        let ids = ids(3000);
        let mut counts = [0usize; 3];
        for id in &ids {
            let o = owner(*id, &all).expect("an owner");
            counts[all.iter().position(|c| c == o).expect("listed")] += 1;
            // The same answer whatever the list's order.
            let reversed: Vec<String> = all.iter().rev().cloned().collect();
            assert_eq!(owner(*id, &reversed), Some(o));
        }
        assert!(counts.iter().all(|n| (800..1200).contains(n)), "{counts:?}");
        assert_eq!(owner(ids[0], &[]), None);
    }

    #[test]
    fn only_the_instances_of_a_leaving_checker_move() {
        let before = list(&["a", "b", "c"]);
        let after = list(&["a", "c"]);
        for id in ids(500) {
            let was = owner(id, &before).expect("owner");
            let is = owner(id, &after).expect("owner");
            if was != "b" {
                assert_eq!(was, is);
            } else {
                assert_eq!(start_of(id, is, &before, &after), Start::Orphaned);
            }
        }
    }

    #[test]
    fn a_joining_checker_waits_for_the_previous_owner_to_let_go() {
        let before = list(&["a"]);
        let after = list(&["a", "b"]);
        let moved = ids(200)
            .into_iter()
            .filter(|id| owner(*id, &after) == Some("b"))
            .collect::<Vec<_>>();
        assert!(!moved.is_empty());
        for id in moved {
            assert_eq!(start_of(id, "b", &before, &after), Start::Moved);
            assert_eq!(start_of(id, "b", &[], &after), Start::Fresh);
        }
    }

    #[test]
    fn first_delays_stay_in_their_windows() {
        let (interval, announce) = (Duration::from_secs(10), Duration::from_secs(1));
        for r in [0.0, 0.3, 0.999] {
            let fresh = first_delay(Start::Fresh, interval, announce, r);
            assert!(fresh < interval);
            let orphaned = first_delay(Start::Orphaned, interval, announce, r);
            assert!(orphaned < announce);
            let moved = first_delay(Start::Moved, interval, announce, r);
            assert!(moved >= announce && moved < announce * 2);
        }
        // A short interval bounds the takeover jitter to a quarter of it.
        let short = first_delay(Start::Orphaned, Duration::from_secs(2), announce, 0.999);
        assert!(short < Duration::from_millis(500));
        let r = random_unit();
        assert!((0.0..1.0).contains(&r));
    }
}
