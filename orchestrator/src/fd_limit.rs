//! The connection cap checked against the open-file limit at start.
//!
//! Every connection is a file descriptor. With `--max-connections` above the soft
//! `RLIMIT_NOFILE`, `accept` fails with EMFILE long before the cap is reached, and every other
//! descriptor the process needs (a Valkey reconnect, a log file) fails with it. So at start the
//! soft limit is raised toward the hard limit when the cap needs it, and when even that is not
//! enough the cap is lowered to what fits, with a warning: a cap that holds beats one that
//! cannot.

/// Descriptors kept for everything that is not a client connection: the listener, stdio,
/// the runtime's epoll and wakers, Valkey connections (one per node of a cluster, plus
/// reconnects in flight), log files.
pub const HEADROOM: u64 = 64;

/// The soft limit to ask for when `soft` cannot hold `cap` connections plus [`HEADROOM`]:
/// enough for both, but never above `hard`. `None` (infinite) limits are `u64::MAX`.
pub fn soft_limit_wanted(cap: u32, soft: u64, hard: u64) -> Option<u64> {
    let needed = u64::from(cap).saturating_add(HEADROOM);
    (soft < needed && soft < hard).then(|| needed.min(hard))
}

/// The connection cap that fits under the soft limit `soft`: `cap`, or less (at least 1).
pub fn cap_within(cap: u32, soft: u64) -> u32 {
    let room = soft.saturating_sub(HEADROOM).max(1);
    u32::try_from(room).map_or(cap, |room| cap.min(room))
}

/// Raises the soft open-file limit as far as `cap` needs and the hard limit allows, and
/// returns the cap that fits; logs when it raised the limit or had to lower the cap.
#[cfg(unix)]
pub fn fit_connection_cap(cap: u32) -> u32 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

    let limit = getrlimit(Resource::Nofile);
    let mut soft = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if let Some(wanted) = soft_limit_wanted(cap, soft, hard) {
        let raised = Rlimit {
            current: Some(wanted),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::info!(
                    from = soft,
                    to = wanted,
                    "raised the open-file limit for --max-connections"
                );
                soft = wanted;
            }
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
    }
    let fitted = cap_within(cap, soft);
    if fitted < cap {
        tracing::warn!(
            max_connections = cap,
            lowered_to = fitted,
            open_file_limit = soft,
            hard_limit = hard,
            headroom = HEADROOM,
            "the open-file limit cannot hold --max-connections; serving fewer connections at \
             once (raise `ulimit -n` / LimitNOFILE to serve more)"
        );
    }
    fitted
}

/// Without `RLIMIT_NOFILE` the cap is taken as given.
#[cfg(not(unix))]
pub fn fit_connection_cap(cap: u32) -> u32 {
    cap
}

#[cfg(test)]
mod tests {
    use super::*;

    const INF: u64 = u64::MAX;

    #[test]
    fn a_limit_that_holds_the_cap_is_left_alone() {
        assert_eq!(soft_limit_wanted(10_000, 20_000, 20_000), None);
        assert_eq!(soft_limit_wanted(10_000, 10_064, 10_064), None);
        assert_eq!(soft_limit_wanted(10_000, INF, INF), None);
        assert_eq!(cap_within(10_000, 20_000), 10_000);
        assert_eq!(cap_within(10_000, 10_064), 10_000);
        assert_eq!(cap_within(10_000, INF), 10_000);
    }

    #[test]
    fn the_soft_limit_is_raised_as_far_as_needed_and_allowed() {
        // The common Linux default: soft 1024, hard 524288.
        assert_eq!(soft_limit_wanted(10_000, 1024, 524_288), Some(10_064));
        assert_eq!(soft_limit_wanted(10_000, 1024, INF), Some(10_064));
        // The hard limit is the ceiling.
        assert_eq!(soft_limit_wanted(10_000, 1024, 4096), Some(4096));
        // Already at the hard limit: nothing to ask for.
        assert_eq!(soft_limit_wanted(10_000, 4096, 4096), None);
    }

    #[test]
    fn the_cap_is_lowered_to_what_the_limit_holds() {
        // soft = hard = 1024 (a container default): 960 connections, 64 descriptors spare.
        assert_eq!(cap_within(10_000, 1024), 960);
        assert_eq!(cap_within(200, 1024), 200);
        // Absurdly low limits still serve one connection rather than none.
        assert_eq!(cap_within(10_000, 10), 1);
        assert_eq!(cap_within(10_000, 0), 1);
    }
}
