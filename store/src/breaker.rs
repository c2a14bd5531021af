//! A circuit breaker for one remote service (an upstream registry, a shared
//! store): after a few failures in a row (no answer, a timeout, a
//! 502/503/504) it is taken to be away for a cool-down, and requests fail at
//! once instead of each waiting for a timeout, so cached tags are served
//! stale in milliseconds and a bucket that is away costs no latency. After the
//! cool-down one request goes through as a probe: its success closes the
//! breaker, its failure opens it again. A `429` with `Retry-After` holds
//! requests back the same way until that time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Whether a request may go upstream now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    Go,
    /// Refused for `retry_after` more: the upstream is taken to be away, or
    /// (`rate_limited`) it asked to be left alone with `Retry-After`.
    Refuse {
        retry_after: Duration,
        reason: String,
        rate_limited: bool,
    },
}

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        reason: String,
        rate_limited: bool,
    },
    /// One request is probing; others wait for its result (a probe that
    /// never reports back, its caller gone, expires after `probe_limit`).
    Probing {
        since: Instant,
        reason: String,
    },
}

pub struct Breaker {
    failures_to_open: u32,
    cooldown: Duration,
    probe_limit: Duration,
    state: Mutex<State>,
}

impl Breaker {
    /// Opens after `failures_to_open` failures in a row (0: never), for
    /// `cooldown`; a probe gets `probe_limit` to report.
    pub fn new(failures_to_open: u32, cooldown: Duration, probe_limit: Duration) -> Breaker {
        Breaker {
            failures_to_open,
            cooldown,
            probe_limit,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    pub fn admit(&self) -> Admit {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Admit {
        let mut state = self.state.lock().unwrap();
        match &*state {
            State::Closed { .. } => Admit::Go,
            State::Open {
                until,
                reason,
                rate_limited,
            } if now < *until => Admit::Refuse {
                retry_after: *until - now,
                reason: reason.clone(),
                rate_limited: *rate_limited,
            },
            State::Open { reason, .. } => {
                *state = State::Probing {
                    since: now,
                    reason: reason.clone(),
                };
                Admit::Go
            }
            State::Probing { since, reason } if now < *since + self.probe_limit => Admit::Refuse {
                retry_after: Duration::from_secs(1),
                reason: reason.clone(),
                rate_limited: false,
            },
            State::Probing { reason, .. } => {
                *state = State::Probing {
                    since: now,
                    reason: reason.clone(),
                };
                Admit::Go
            }
        }
    }

    /// The upstream answered (whatever the status, unless it is a failure).
    pub fn success(&self) {
        *self.state.lock().unwrap() = State::Closed { failures: 0 };
    }

    /// The upstream did not answer, or answered 502/503/504.
    pub fn failure(&self, reason: &str) {
        self.failure_at(Instant::now(), reason)
    }

    fn failure_at(&self, now: Instant, reason: &str) {
        let mut state = self.state.lock().unwrap();
        let failures = match &*state {
            State::Closed { failures } => failures + 1,
            // A failed probe, or a late failure while open: open (again).
            _ => self.failures_to_open,
        };
        *state = if self.failures_to_open > 0 && failures >= self.failures_to_open {
            if !matches!(*state, State::Open { .. }) {
                tracing::warn!(
                    reason,
                    cooldown_s = self.cooldown.as_secs_f64(),
                    "upstream taken to be away: failing fast until it answers again"
                );
            }
            State::Open {
                until: now + self.cooldown,
                reason: reason.to_owned(),
                rate_limited: false,
            }
        } else {
            State::Closed { failures }
        };
    }

    /// Holds every request back until `until` (a `429` with `Retry-After`).
    pub fn hold(&self, until: Instant, reason: &str) {
        *self.state.lock().unwrap() = State::Open {
            until,
            reason: reason.to_owned(),
            rate_limited: true,
        };
    }

    /// Is the upstream taken to be away right now?
    pub fn is_open(&self) -> bool {
        !matches!(*self.state.lock().unwrap(), State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn opens_after_failures_in_a_row_and_probes_after_the_cooldown() {
        let b = Breaker::new(3, secs(10), secs(5));
        let t0 = Instant::now();
        b.failure_at(t0, "timeout");
        b.failure_at(t0, "timeout");
        b.success();
        b.failure_at(t0, "timeout");
        b.failure_at(t0, "timeout");
        assert_eq!(
            b.admit_at(t0),
            Admit::Go,
            "a success in between resets the count"
        );
        b.failure_at(t0, "timeout");
        assert!(
            matches!(b.admit_at(t0 + secs(1)), Admit::Refuse { retry_after, .. } if retry_after == secs(9))
        );
        assert!(b.is_open());
        // After the cool-down: one probe, the others wait for it.
        assert_eq!(b.admit_at(t0 + secs(11)), Admit::Go);
        assert!(matches!(b.admit_at(t0 + secs(11)), Admit::Refuse { .. }));
        b.failure_at(t0 + secs(12), "timeout");
        assert!(
            matches!(b.admit_at(t0 + secs(13)), Admit::Refuse { .. }),
            "a failed probe opens again"
        );
        assert_eq!(b.admit_at(t0 + secs(23)), Admit::Go);
        b.success();
        assert_eq!(b.admit_at(t0 + secs(23)), Admit::Go);
        assert!(!b.is_open());
    }

    #[test]
    fn a_probe_that_never_reports_expires() {
        let b = Breaker::new(1, secs(10), secs(5));
        let t0 = Instant::now();
        b.failure_at(t0, "reset");
        assert_eq!(b.admit_at(t0 + secs(10)), Admit::Go);
        assert!(matches!(b.admit_at(t0 + secs(14)), Admit::Refuse { .. }));
        assert_eq!(
            b.admit_at(t0 + secs(16)),
            Admit::Go,
            "the lost probe's slot is given again"
        );
    }

    #[test]
    fn zero_never_opens_and_hold_refuses_until_the_time() {
        let never = Breaker::new(0, secs(10), secs(5));
        let t0 = Instant::now();
        for _ in 0..100 {
            never.failure_at(t0, "x");
        }
        assert_eq!(never.admit_at(t0), Admit::Go);
        never.hold(t0 + secs(3), "429");
        assert!(
            matches!(never.admit_at(t0 + secs(1)), Admit::Refuse { retry_after, .. } if retry_after == secs(2))
        );
    }
}
