//! Flap damping: one odd result does not flip an instance.
//!
//! Results are *failing* (warning or critical) or *passing*. A passing instance turns
//! failing only after `failures_before_critical` failing results in a row, and a failing one
//! passing only after `successes_before_passing` passing results in a row. Between two
//! failing statuses (warning and critical) there is no damping: once failing is established,
//! the latest failing result says which. A result that does not (yet) move the status is not
//! *adopted*: the record keeps the output of the result that set its status, so what it shows
//! always explains the status it has.

use servicekit::protocol::{CheckSpec, HealthStatus};

/// The damped status of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damper {
    status: HealthStatus,
    /// Results in a row that disagree with `status` (pass vs fail).
    streak: u32,
    failures_before_critical: u32,
    successes_before_passing: u32,
}

fn failing(s: HealthStatus) -> bool {
    s != HealthStatus::Passing
}

impl Damper {
    /// Starts at `current` (the record's status) with the thresholds of `spec`.
    pub fn new(current: HealthStatus, spec: &CheckSpec) -> Self {
        Damper {
            status: current,
            streak: 0,
            failures_before_critical: spec.failures_before_critical.max(1),
            successes_before_passing: spec.successes_before_passing.max(1),
        }
    }

    /// The damped status.
    pub fn status(&self) -> HealthStatus {
        self.status
    }

    /// Takes one result. `Some(status)`: the result is adopted (the record shows its output)
    /// and the damped status is now `status` (changed or not); `None`: it is counted but the
    /// status stays.
    pub fn feed(&mut self, result: HealthStatus) -> Option<HealthStatus> {
        if failing(result) == failing(self.status) {
            self.streak = 0;
            self.status = result;
            return Some(result);
        }
        self.streak += 1;
        let needed = if failing(result) {
            self.failures_before_critical
        } else {
            self.successes_before_passing
        };
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.status = result;
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HealthStatus::{Critical as C, Passing as P, Warning as W};

    fn damper(start: HealthStatus, fails: u32, passes: u32) -> Damper {
        let mut spec = CheckSpec::tcp();
        spec.failures_before_critical = fails;
        spec.successes_before_passing = passes;
        Damper::new(start, &spec)
    }

    fn run(d: &mut Damper, results: &[HealthStatus]) -> Vec<Option<HealthStatus>> {
        results.iter().map(|r| d.feed(*r)).collect()
    }

    #[test]
    fn a_status_changes_only_after_enough_results_in_a_row() {
        let mut d = damper(P, 2, 3);
        assert_eq!(run(&mut d, &[P, C]), [Some(P), None]);
        assert_eq!(d.status(), P);
        assert_eq!(run(&mut d, &[C]), [Some(C)]);
        // Back needs three passes in a row; a failure in between starts over.
        assert_eq!(
            run(&mut d, &[P, P, C, P, P, P]),
            [None, None, Some(C), None, None, Some(P)]
        );
        assert_eq!(d.status(), P);
    }

    #[test]
    fn warnings_count_as_failures_and_switch_freely_once_failing() {
        let mut d = damper(P, 2, 2);
        // A warning and a critical in a row are two failures: the latest one wins.
        assert_eq!(run(&mut d, &[W, C]), [None, Some(C)]);
        assert_eq!(run(&mut d, &[W]), [Some(W)]);
        assert_eq!(run(&mut d, &[C, P, W]), [Some(C), None, Some(W)]);
    }

    #[test]
    fn one_result_is_enough_with_thresholds_of_one() {
        let mut d = damper(C, 1, 1);
        assert_eq!(run(&mut d, &[P, C, P]), [Some(P), Some(C), Some(P)]);
    }

    #[test]
    fn an_odd_result_never_flips_a_steady_instance() {
        let mut d = damper(P, 2, 2);
        let flapping = [C, P, C, P, C, P, W, P];
        assert!(run(&mut d, &flapping)
            .iter()
            .all(|v| *v != Some(C) && *v != Some(W)));
        assert_eq!(d.status(), P);
    }
}
