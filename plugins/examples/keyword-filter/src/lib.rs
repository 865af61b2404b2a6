//! `keyword-filter`: drops a notification whose title, body or account
//! contains one of `words` (case-insensitive) or matches one of `regex`.
//!
//! ```toml
//! [[plugins]]
//! name = "keyword-filter"
//! path = "plugins/keyword_filter.wasm"
//! see_payload = true          # it needs the decrypted fields
//! config = { words = ["casino", "free money"], regex = ["(?i)crypto\\s*airdrop"] }
//! ```
//!
//! Without the payload (opaque mode, or `see_payload = false`) it has nothing
//! to look at and delivers.
#![cfg_attr(target_arch = "wasm32", no_std)]
extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use push_relay_plugin_sdk::{export_filter, log, Filter, Level, Notification, Verdict};
use regex_automata::meta::Regex;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    words: Vec<String>,
    #[serde(default)]
    regex: Vec<String>,
}

pub struct KeywordFilter {
    words: Vec<String>,
    regexes: Vec<(String, Regex)>,
}

impl Filter for KeywordFilter {
    const NAME: &'static str = "keyword-filter";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn configure(config_json: &str) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config_json)
            .map_err(|e| format!("bad config: {e} (expected {{\"words\": [...], \"regex\": [...]}})"))?;
        let mut regexes = Vec::new();
        for pattern in config.regex {
            let re = Regex::new(&pattern).map_err(|e| format!("bad regex {pattern:?}: {e}"))?;
            regexes.push((pattern, re));
        }
        let words: Vec<String> = config.words.iter().map(|w| w.to_lowercase()).filter(|w| !w.is_empty()).collect();
        log(Level::Info, &format!("{} word(s), {} regex(es)", words.len(), regexes.len()));
        Ok(KeywordFilter { words, regexes })
    }

    fn check(&mut self, n: &Notification) -> Verdict {
        let Some(p) = &n.payload else { return Verdict::Deliver };
        let fields = [("title", p.title.as_str()), ("body", p.body.as_str()), ("account", p.account.as_deref().unwrap_or(""))];
        for (field, text) in fields {
            if text.is_empty() {
                continue;
            }
            let lower = text.to_lowercase();
            if let Some(word) = self.words.iter().find(|w| lower.contains(w.as_str())) {
                return Verdict::Drop(format!("{field} contains {word:?}"));
            }
            if let Some((pattern, _)) = self.regexes.iter().find(|(_, re)| re.is_match(text)) {
                return Verdict::Drop(format!("{field} matches /{pattern}/"));
            }
        }
        Verdict::Deliver
    }
}

export_filter!(KeywordFilter);

#[cfg(test)]
mod tests {
    use super::*;
    use push_relay_plugin_sdk::testing::{notification, with_payload};

    #[test]
    fn drops_words_and_regexes_delivers_the_rest() {
        let mut f = KeywordFilter::configure(r#"{"words": ["Casino"], "regex": ["(?i)crypto\\s*airdrop"]}"#).unwrap();
        assert_eq!(f.check(&with_payload("Win at the CASINO", "now")), Verdict::Drop("title contains \"casino\"".into()));
        assert!(matches!(f.check(&with_payload("hi", "free Crypto  Airdrop")), Verdict::Drop(r) if r.starts_with("body matches")));
        assert_eq!(f.check(&with_payload("Alice mentioned you", "lunch?")), Verdict::Deliver);
        assert_eq!(f.check(&notification()), Verdict::Deliver, "no payload, nothing to look at");
    }

    #[test]
    fn refuses_bad_config() {
        assert!(KeywordFilter::configure(r#"{"regex": ["("]}"#).is_err());
        assert!(KeywordFilter::configure(r#"{"wordz": []}"#).is_err());
    }
}
