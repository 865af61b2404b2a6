//! The circuit breaker: `threshold` failures in a row open it for a backoff
//! period; after it, one call is let through (half-open): a success closes
//! the breaker and resets the backoff, a failure reopens it for twice as long
//! (up to `max_backoff`).

use std::time::{Duration, Instant};

/// When the breaker trips and for how long.
#[derive(Debug, Clone)]
pub struct BreakerPolicy {
    /// Failures in a row that open the breaker. Default 5.
    pub threshold: u32,
    /// The first open period. Default 1 s.
    pub initial_backoff: Duration,
    /// The longest open period. Default 5 min.
    pub max_backoff: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy { threshold: 5, initial_backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(300) }
    }
}

#[derive(Debug)]
pub(crate) struct Breaker {
    policy: BreakerPolicy,
    failures: u32,
    /// Open until this instant.
    open_until: Option<Instant>,
    /// The next open period.
    backoff: Duration,
    /// A trial call is in flight (half-open).
    trial: bool,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Breaker {
        let backoff = policy.initial_backoff;
        Breaker { policy, failures: 0, open_until: None, backoff, trial: false }
    }

    /// Whether a call may go to the plugin now.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.open_until {
            None => true,
            Some(until) if now < until => false,
            Some(_) if self.trial => false,
            Some(_) => {
                self.trial = true;
                true
            }
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.trial = false;
        self.backoff = self.policy.initial_backoff;
    }

    /// Records a failure; returns the open period when it (re)opens.
    pub fn failure(&mut self, now: Instant) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        if self.trial || (self.open_until.is_none() && self.failures >= self.policy.threshold) {
            let period = self.backoff;
            self.open_until = Some(now + period);
            self.backoff = (self.backoff * 2).min(self.policy.max_backoff);
            self.trial = false;
            return Some(period);
        }
        None
    }

    /// Back to closed (a new version was loaded).
    pub fn reset(&mut self) {
        self.success();
    }

    #[cfg(test)]
    pub fn is_open(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|u| now < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_after_threshold_and_doubles() {
        let policy = BreakerPolicy { threshold: 5, initial_backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(3) };
        let mut b = Breaker::new(policy);
        let t0 = Instant::now();
        for i in 0..4 {
            assert!(b.allow(t0));
            assert_eq!(b.failure(t0), None, "failure {i} must not trip");
        }
        assert!(b.allow(t0));
        assert_eq!(b.failure(t0), Some(Duration::from_secs(1)));
        assert!(b.is_open(t0));
        assert!(!b.allow(t0 + Duration::from_millis(999)));
        // Half-open: one trial, others still refused.
        let t1 = t0 + Duration::from_secs(1);
        assert!(b.allow(t1));
        assert!(!b.allow(t1));
        assert_eq!(b.failure(t1), Some(Duration::from_secs(2)));
        let t2 = t1 + Duration::from_secs(2);
        assert!(b.allow(t2));
        assert_eq!(b.failure(t2), Some(Duration::from_secs(3)), "capped at max_backoff");
        let t3 = t2 + Duration::from_secs(3);
        assert!(b.allow(t3));
        b.success();
        assert!(b.allow(t3));
        // Closed again, with the backoff reset.
        for _ in 0..4 {
            assert_eq!(b.failure(t3), None);
        }
        assert_eq!(b.failure(t3), Some(Duration::from_secs(1)));
    }
}
