//! Rate limits (SPEC §7), with governor's keyed GCRA limiters: per sending
//! instance, per registration, and per client IP on registration.
//!
//! Keyed limiters remember every key they saw; a housekeeping task calls
//! [`Limits::forget_idle`] so that memory stays bounded by recent traffic.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

pub struct Limits {
    per_instance: DefaultKeyedRateLimiter<String>,
    per_registration: DefaultKeyedRateLimiter<String>,
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

/// Which limit refused a request, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub limit: &'static str,
    pub retry_after: Duration,
}

fn quota(rate: &push_relay_config::Rate) -> Quota {
    Quota::with_period(rate.replenish_interval().max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(rate.burst)
}

impl Limits {
    pub fn new(config: &push_relay_config::Limits) -> Limits {
        Limits {
            per_instance: DefaultKeyedRateLimiter::keyed(quota(&config.per_instance)),
            per_registration: DefaultKeyedRateLimiter::keyed(quota(&config.per_registration)),
            per_ip: DefaultKeyedRateLimiter::keyed(quota(&config.registrations_per_ip)),
            clock: DefaultClock::default(),
        }
    }

    /// A push from `instance` to `registration`: both limits must allow it.
    pub fn push(&self, instance: &str, registration: &str) -> Result<(), Refused> {
        // Check the narrower limit first, so that one noisy registration
        // does not use up its instance's allowance.
        if let Err(not_until) = self.per_registration.check_key(&registration.to_string()) {
            return Err(Refused { limit: "registration", retry_after: not_until.wait_time_from(self.clock.now()) });
        }
        if let Err(not_until) = self.per_instance.check_key(&instance.to_string()) {
            return Err(Refused { limit: "instance", retry_after: not_until.wait_time_from(self.clock.now()) });
        }
        Ok(())
    }

    /// A registration request from `ip`.
    pub fn register(&self, ip: IpAddr) -> Result<(), Refused> {
        self.per_ip
            .check_key(&ip)
            .map_err(|not_until| Refused { limit: "ip", retry_after: not_until.wait_time_from(self.clock.now()) })
    }

    pub fn forget_idle(&self) {
        for limiter in [&self.per_instance, &self.per_registration] {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        self.per_ip.retain_recent();
        self.per_ip.shrink_to_fit();
    }
}

/// `Retry-After` in whole seconds, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refused() {
        let nz = |n| NonZeroU32::new(n).unwrap();
        let config = push_relay_config::Limits {
            per_instance: push_relay_config::Rate::per_second(nz(100), nz(100)),
            per_registration: push_relay_config::Rate::per_second(nz(1), nz(3)),
            registrations_per_ip: push_relay_config::Rate::per_minute(nz(1), nz(2)),
        };
        let limits = Limits::new(&config);
        for _ in 0..3 {
            assert!(limits.push("a.example", "r1").is_ok());
        }
        let refused = limits.push("a.example", "r1").unwrap_err();
        assert_eq!(refused.limit, "registration");
        assert!(refused.retry_after <= Duration::from_secs(1));
        assert!(limits.push("a.example", "r2").is_ok(), "other registrations unaffected");

        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(limits.register(ip).is_ok());
        assert!(limits.register(ip).is_ok());
        let refused = limits.register(ip).unwrap_err();
        assert_eq!(refused.limit, "ip");
        assert!(retry_after_secs(refused.retry_after) >= 1);
        assert!(limits.register("192.0.2.2".parse().unwrap()).is_ok());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2000)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }
}
