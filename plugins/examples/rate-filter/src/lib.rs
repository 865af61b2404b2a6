//! `rate-filter`: drops an instance's pushes to one registration beyond
//! `per_minute` (default 10) in a minute, using the host's `count` import
//! (counters are per instance, shared by all the plugin's warm instances).
//!
//! ```toml
//! [[plugins]]
//! name = "rate-filter"
//! path = "plugins/rate_filter.wasm"
//! config = { per_minute = 10 }
//! ```
#![cfg_attr(target_arch = "wasm32", no_std)]
extern crate alloc;

use alloc::format;
use alloc::string::String;

use push_relay_plugin_sdk::{count, export_filter, Filter, Notification, Verdict};

/// Unknown keys are ignored, so one config can serve this and another plugin.
#[derive(serde::Deserialize)]
struct Config {
    #[serde(default = "ten")]
    per_minute: u64,
}

fn ten() -> u64 {
    10
}

pub struct RateFilter {
    per_minute: u64,
}

impl Filter for RateFilter {
    const NAME: &'static str = "rate-filter";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config_json: &str) -> Result<Self, String> {
        let config: Config =
            serde_json::from_str(config_json).map_err(|e| format!("bad config: {e} (expected {{\"per_minute\": N}})"))?;
        if config.per_minute == 0 {
            return Err("per_minute must be at least 1".into());
        }
        Ok(RateFilter { per_minute: config.per_minute })
    }

    fn check(&mut self, n: &Notification) -> Verdict {
        let seen = count(&format!("registration:{}", n.registration), 60);
        if seen > self.per_minute {
            Verdict::Drop(format!("more than {} pushes in a minute to this registration", self.per_minute))
        } else {
            Verdict::Deliver
        }
    }
}

export_filter!(RateFilter);

#[cfg(test)]
mod tests {
    use super::*;
    use push_relay_plugin_sdk::testing::{advance, notification, reset};

    #[test]
    fn drops_beyond_the_limit_until_the_minute_is_over() {
        reset();
        let mut f = RateFilter::configure(r#"{"per_minute": 3}"#).unwrap();
        let n = notification();
        for _ in 0..3 {
            assert_eq!(f.check(&n), Verdict::Deliver);
        }
        assert!(matches!(f.check(&n), Verdict::Drop(_)));
        let other = Notification { registration: "reg-2".into(), ..notification() };
        assert_eq!(f.check(&other), Verdict::Deliver, "another registration has its own count");
        advance(60);
        assert_eq!(f.check(&n), Verdict::Deliver, "a new minute");
    }
}
