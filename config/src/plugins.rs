//! `[[plugins]]` and `[plugin_limits]` (SPEC §6, §7): WebAssembly filter
//! plugins, run by the `push-relay-plugins` crate.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use crate::error::ConfigError;
use crate::expand::expand;
use crate::raw::Str;
use crate::resolve::Resolver;

/// `[[plugins]]`: one filter plugin. Plugins run in the order they are
/// written; the first one that drops a notification wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plugin {
    /// `name`: how logs and metrics call the plugin; unique, 1 to 64 of
    /// `a-z A-Z 0-9 _ -`. Required.
    pub name: String,
    /// `path`: the `.wasm` component, relative to the config file's
    /// directory. Required; the file must exist.
    pub path: PathBuf,
    /// `instances`: `["*"]` (default: every instance) or a list of instance
    /// domains the plugin applies to.
    pub instances: PluginInstances,
    /// `config`: an inline table handed to the plugin's `configure` as JSON.
    /// Default `{}`.
    pub config_json: String,
    /// `see_payload`: give the plugin the decrypted title, body, account and
    /// notification type (only ever in decrypted mode). Default `false`.
    pub see_payload: bool,
    /// `on_error`: what happens to a notification when the plugin fails
    /// (traps, runs out of fuel or time, answers garbage, is tripped by its
    /// circuit breaker). Default `deliver`.
    pub on_error: OnError,
    /// `fuel`: instruction budget per call. Default and maximum:
    /// `plugin_limits.fuel`.
    pub fuel: u64,
    /// `timeout_ms`: wall-clock deadline per call. Default and maximum:
    /// `plugin_limits.timeout_ms`.
    pub timeout_ms: u64,
    /// `memory_mb`: linear memory cap. Default and maximum:
    /// `plugin_limits.memory_mb`.
    pub memory_mb: u32,
}

/// `plugins.instances`
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginInstances {
    /// `["*"]`
    All,
    /// Instance domains, lowercased.
    Only(Vec<String>),
}

impl PluginInstances {
    /// Whether a notification from `instance` goes through the plugin.
    pub fn matches(&self, instance: &str) -> bool {
        match self {
            PluginInstances::All => true,
            PluginInstances::Only(domains) => domains.iter().any(|d| d.eq_ignore_ascii_case(instance)),
        }
    }
}

/// `plugins.on_error`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// `"deliver"`: deliver as if the plugin had said deliver.
    #[default]
    Deliver,
    /// `"drop"`: drop the notification.
    Drop,
}

/// `[plugin_limits]`: the defaults of every plugin's limits, which are also
/// the maxima a plugin's own `fuel`, `timeout_ms` and `memory_mb` may set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginLimits {
    /// `fuel`: instructions per call, at least 1000. Default 10_000_000.
    pub fuel: u64,
    /// `timeout_ms`: wall-clock deadline per call, 1 to 10000. Default 50.
    pub timeout_ms: u64,
    /// `memory_mb`: linear memory per plugin instance, 1 to 4096. Default 16.
    pub memory_mb: u32,
    /// `threads`: threads that run plugin calls (off the async runtime),
    /// 1 to 64. Default 4.
    pub threads: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits { fuel: 10_000_000, timeout_ms: 50, memory_mb: 16, threads: 4 }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPluginLimits {
    pub fuel: Option<Spanned<u64>>,
    pub timeout_ms: Option<Spanned<u64>>,
    pub memory_mb: Option<Spanned<u32>>,
    pub threads: Option<Spanned<usize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPlugin {
    pub name: Option<Str>,
    pub path: Option<Str>,
    pub instances: Option<Spanned<Vec<Str>>>,
    pub config: Option<Spanned<toml::Table>>,
    pub see_payload: Option<bool>,
    pub on_error: Option<Str>,
    pub fuel: Option<Spanned<u64>>,
    pub timeout_ms: Option<Spanned<u64>>,
    pub memory_mb: Option<Spanned<u32>>,
}

type Result<T> = std::result::Result<T, ConfigError>;

/// A number within `min..=max`, or its default.
fn within<T>(r: &Resolver<'_>, key: &str, value: Option<&Spanned<T>>, min: T, max: T, default: T, why_max: &str) -> Result<T>
where
    T: Copy + PartialOrd + std::fmt::Display,
{
    match value {
        None => Ok(default),
        Some(v) if *v.get_ref() < min || *v.get_ref() > max => Err(ConfigError::at(
            &r.src,
            Some(v.span()),
            key,
            format!("must be between {min} and {max}{why_max}, got {}", v.get_ref()),
        )),
        Some(v) => Ok(*v.get_ref()),
    }
}

fn string(r: &Resolver<'_>, key: &str, value: &Str) -> Result<String> {
    expand(value.get_ref(), r.env).map_err(|e| ConfigError::at(&r.src, Some(value.span()), key, e.message()))
}

fn is_plugin_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// TOML to JSON (datetimes become their TOML text).
fn to_json(value: &toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f).map(J::Number).unwrap_or(J::Null),
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(a.iter().map(to_json).collect()),
        toml::Value::Table(t) => J::Object(t.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
    }
}

pub(crate) fn plugin_limits(r: &Resolver<'_>, raw: Option<&Spanned<RawPluginLimits>>) -> Result<PluginLimits> {
    let d = PluginLimits::default();
    let Some(raw) = raw.map(Spanned::get_ref) else { return Ok(d) };
    Ok(PluginLimits {
        fuel: within(r, "plugin_limits.fuel", raw.fuel.as_ref(), 1000, u64::MAX / 2, d.fuel, "")?,
        timeout_ms: within(r, "plugin_limits.timeout_ms", raw.timeout_ms.as_ref(), 1, 10_000, d.timeout_ms, "")?,
        memory_mb: within(r, "plugin_limits.memory_mb", raw.memory_mb.as_ref(), 1, 4096, d.memory_mb, "")?,
        threads: within(r, "plugin_limits.threads", raw.threads.as_ref(), 1, 64, d.threads, "")?,
    })
}

pub(crate) fn plugins(r: &Resolver<'_>, raw: &[Spanned<RawPlugin>], limits: &PluginLimits) -> Result<Vec<Plugin>> {
    let mut out: Vec<Plugin> = Vec::new();
    for (i, table) in raw.iter().enumerate() {
        let p = table.get_ref();
        let key = |field: &str| format!("plugins[{i}].{field}");
        let err = |span: std::ops::Range<usize>, field: &str, message: String| ConfigError::at(&r.src, Some(span), key(field), message);
        let name = match &p.name {
            None => return Err(err(table.span(), "name", "missing (expected e.g. name = \"keyword-filter\")".into())),
            Some(v) => {
                let s = string(r, &key("name"), v)?;
                if !is_plugin_name(&s) {
                    return Err(err(v.span(), "name", format!("invalid plugin name {s:?} (expected 1 to 64 of a-z, A-Z, 0-9, `_`, `-`)")));
                }
                if out.iter().any(|o| o.name == s) {
                    return Err(err(v.span(), "name", format!("a plugin named {s:?} is already configured (names must be unique)")));
                }
                s
            }
        };
        let path = match &p.path {
            None => return Err(err(table.span(), "path", "missing (expected the plugin's .wasm file, e.g. path = \"plugins/keyword_filter.wasm\")".into())),
            Some(v) => {
                let written = string(r, &key("path"), v)?;
                if written.is_empty() {
                    return Err(err(v.span(), "path", "must not be empty (expected a .wasm file)".into()));
                }
                let path = r.base_dir.join(&written);
                match std::fs::metadata(&path) {
                    Ok(m) if m.is_file() => path,
                    Ok(_) => return Err(err(v.span(), "path", format!("{} is not a file (expected a .wasm component)", path.display()))),
                    Err(e) => return Err(err(v.span(), "path", format!("cannot read plugin {}: {e}", path.display()))),
                }
            }
        };
        let instances = match &p.instances {
            None => PluginInstances::All,
            Some(list) => {
                let mut domains = Vec::new();
                let mut all = false;
                for d in list.get_ref() {
                    let s = string(r, &key("instances"), d)?.trim().to_ascii_lowercase();
                    if s == "*" {
                        all = true;
                    } else if is_domain(&s) {
                        domains.push(s);
                    } else {
                        return Err(err(d.span(), "instances", format!("{s:?} is not an instance domain (expected \"*\" or domains such as \"mastodon.social\")")));
                    }
                }
                if all && !domains.is_empty() {
                    return Err(err(list.span(), "instances", "\"*\" already means every instance: use [\"*\"] alone or a list of domains".into()));
                }
                if !all && domains.is_empty() {
                    return Err(err(list.span(), "instances", "empty list (expected [\"*\"] or at least one instance domain; remove the plugin to disable it)".into()));
                }
                if all { PluginInstances::All } else { PluginInstances::Only(domains) }
            }
        };
        let config_json = match &p.config {
            None => "{}".to_owned(),
            Some(t) => to_json(&toml::Value::Table(t.get_ref().clone())).to_string(),
        };
        let on_error = match &p.on_error {
            None => OnError::Deliver,
            Some(v) => match string(r, &key("on_error"), v)?.as_str() {
                "deliver" => OnError::Deliver,
                "drop" => OnError::Drop,
                other => return Err(err(v.span(), "on_error", format!("unknown policy {other:?} (expected \"deliver\" or \"drop\")"))),
            },
        };
        let max = " (at most plugin_limits";
        out.push(Plugin {
            name,
            path,
            instances,
            config_json,
            see_payload: p.see_payload.unwrap_or(false),
            on_error,
            fuel: within(r, &key("fuel"), p.fuel.as_ref(), 1000, limits.fuel, limits.fuel, &format!("{max}.fuel)"))?,
            timeout_ms: within(r, &key("timeout_ms"), p.timeout_ms.as_ref(), 1, limits.timeout_ms, limits.timeout_ms, &format!("{max}.timeout_ms)"))?,
            memory_mb: within(r, &key("memory_mb"), p.memory_mb.as_ref(), 1, limits.memory_mb, limits.memory_mb, &format!("{max}.memory_mb)"))?,
        });
    }
    Ok(out)
}
