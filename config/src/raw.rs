//! The file as written: every field optional and wrapped in [`Spanned`] so
//! that validation done *after* deserialization can still point at the line.
//!
//! Serde does the structural checks here (unknown keys, wrong types); the
//! semantic checks (ranges, URL syntax, `${VAR}` expansion) live in
//! `resolve.rs` and use the spans kept here.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

/// A string exactly as written, before `${VAR}` expansion.
pub(crate) type Str = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub queue: RawQueue,
    #[serde(default)]
    pub limits: RawLimits,
    /// `None` when the file has no `[providers]` table at all (which means
    /// "the default `expo` provider"), `Some(empty)` when it has one with
    /// nothing in it.
    pub providers: Option<Spanned<BTreeMap<Str, Spanned<RawProvider>>>>,
    /// `[[plugins]]`, in order.
    #[serde(default)]
    pub plugins: Vec<Spanned<crate::plugins::RawPlugin>>,
    pub plugin_limits: Option<Spanned<crate::plugins::RawPluginLimits>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub listen: Option<Str>,
    pub public_url: Option<Str>,
    pub log_format: Option<Str>,
    pub log_level: Option<Str>,
    pub registration_key: Option<Str>,
    pub trust_forwarded_for: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub url: Option<Str>,
    pub pool_size: Option<Spanned<usize>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQueue {
    pub default_ttl_secs: Option<Spanned<u32>>,
    pub max_ttl_secs: Option<Spanned<u32>>,
    pub workers: Option<Spanned<usize>>,
    pub batch_size: Option<Spanned<usize>>,
    pub lease_secs: Option<Spanned<u32>>,
    pub poll_interval_ms: Option<Spanned<u64>>,
    pub retry_base_ms: Option<Spanned<u64>>,
    pub retry_max_secs: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub per_instance: Option<Spanned<RawRate>>,
    pub per_registration: Option<Spanned<RawRate>>,
    pub registrations_per_ip: Option<Spanned<RawRate>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRate {
    pub per_second: Option<Spanned<u32>>,
    pub per_minute: Option<Spanned<u32>>,
    pub burst: Option<Spanned<u32>>,
}

/// One `[providers.NAME]` table.
///
/// This is the union of the keys of every provider kind: serde rejects keys
/// no kind knows, and `resolve.rs` rejects keys that belong to another kind
/// than the one named by `kind` (see [`RawProvider::set_keys`]). Adding a
/// kind means adding its keys here and to `set_keys`, and a branch in
/// `resolve_provider`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProvider {
    pub kind: Str,
    // --- several kinds ---
    pub base_url: Option<Str>,
    pub placeholder_title: Option<Str>,
    pub placeholder_body: Option<Str>,
    pub timeout_secs: Option<Spanned<u64>>,
    // --- kind = "expo" ---
    pub access_token: Option<Str>,
    pub access_token_file: Option<Str>,
    pub receipt_delay_secs: Option<Spanned<u64>>,
    // --- kind = "apns" ---
    pub key_file: Option<Str>,
    pub key_id: Option<Str>,
    pub team_id: Option<Str>,
    pub cert_file: Option<Str>,
    pub cert_key_file: Option<Str>,
    pub topic: Option<Str>,
    pub environment: Option<Str>,
    pub ca_file: Option<Str>,
    pub sound: Option<Str>,
    // --- kind = "fcm" ---
    pub service_account_file: Option<Str>,
}

impl RawProvider {
    /// The keys present in the table (but `kind`), with their spans, in the
    /// order they are declared above.
    pub fn set_keys(&self) -> Vec<(&'static str, Range<usize>)> {
        fn s<T>(name: &'static str, v: &Option<Spanned<T>>) -> Option<(&'static str, Range<usize>)> {
            v.as_ref().map(|v| (name, v.span()))
        }
        [
            s("base_url", &self.base_url),
            s("placeholder_title", &self.placeholder_title),
            s("placeholder_body", &self.placeholder_body),
            s("timeout_secs", &self.timeout_secs),
            s("access_token", &self.access_token),
            s("access_token_file", &self.access_token_file),
            s("receipt_delay_secs", &self.receipt_delay_secs),
            s("key_file", &self.key_file),
            s("key_id", &self.key_id),
            s("team_id", &self.team_id),
            s("cert_file", &self.cert_file),
            s("cert_key_file", &self.cert_key_file),
            s("topic", &self.topic),
            s("environment", &self.environment),
            s("ca_file", &self.ca_file),
            s("sound", &self.sound),
            s("service_account_file", &self.service_account_file),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}
