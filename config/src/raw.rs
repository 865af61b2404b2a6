//! The file as written: every field optional and wrapped in [`Spanned`] so
//! that validation done *after* deserialization can still point at the line.
//!
//! Serde does the structural checks here (unknown keys, wrong types); the
//! semantic checks (ranges, URL syntax, `${VAR}` expansion) live in
//! `resolve.rs` and use the spans kept here.

use std::collections::BTreeMap;

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
/// than the one named by `kind`. Adding a kind (APNs, FCM) means adding its
/// keys here and a branch in `resolve_provider`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProvider {
    pub kind: Str,
    // --- kind = "expo" ---
    pub access_token: Option<Str>,
    pub access_token_file: Option<Str>,
    pub base_url: Option<Str>,
    pub placeholder_title: Option<Str>,
    pub placeholder_body: Option<Str>,
    pub receipt_delay_secs: Option<Spanned<u64>>,
    pub timeout_secs: Option<Spanned<u64>>,
}
