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

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `toml` as push-relay.toml next to an (empty) filter.wasm and loads it.
    fn load(toml: &str) -> (tempfile::TempDir, std::result::Result<crate::Config, ConfigError>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("filter.wasm"), b"\0asm").unwrap();
        let path = dir.path().join("push-relay.toml");
        std::fs::write(&path, toml).unwrap();
        let r = crate::load(&path);
        (dir, r)
    }

    #[track_caller]
    fn err(toml: &str, line: usize, key: &str, needle: &str) {
        let (_dir, r) = load(toml);
        let e = r.expect_err("expected an error");
        let shown = e.to_string();
        assert_eq!(e.line(), Some(line), "{shown}");
        assert_eq!(e.key(), Some(key), "{shown}");
        assert!(shown.contains(needle), "{shown}");
    }

    #[test]
    fn full_plugin_and_defaults() {
        let (dir, r) = load(
            "[plugin_limits]\nfuel = 20_000_000\ntimeout_ms = 100\n\n\
             [[plugins]]\nname = \"kw\"\npath = \"filter.wasm\"\ninstances = [\"Mastodon.Social\", \"a.example\"]\n\
             config = { words = [\"casino\"], n = 3, nested = { ok = true } }\nsee_payload = true\non_error = \"drop\"\nfuel = 1000\n\n\
             [[plugins]]\nname = \"rate\"\npath = \"filter.wasm\"\n",
        );
        let c = r.unwrap();
        assert_eq!(c.plugin_limits, PluginLimits { fuel: 20_000_000, timeout_ms: 100, memory_mb: 16, threads: 4 });
        let kw = &c.plugins[0];
        assert_eq!(kw.path, dir.path().join("filter.wasm"));
        assert_eq!(kw.instances, PluginInstances::Only(vec!["mastodon.social".into(), "a.example".into()]));
        assert!(kw.instances.matches("MASTODON.social") && !kw.instances.matches("b.example"));
        let json: serde_json::Value = serde_json::from_str(&kw.config_json).unwrap();
        assert_eq!(json, serde_json::json!({"words": ["casino"], "n": 3, "nested": {"ok": true}}));
        assert!(kw.see_payload);
        assert_eq!(kw.on_error, OnError::Drop);
        assert_eq!((kw.fuel, kw.timeout_ms, kw.memory_mb), (1000, 100, 16));
        let rate = &c.plugins[1];
        assert_eq!(rate.instances, PluginInstances::All);
        assert_eq!(rate.config_json, "{}");
        assert!(!rate.see_payload);
        assert_eq!(rate.on_error, OnError::Deliver);
        assert_eq!(rate.fuel, 20_000_000);
        assert!(crate::Config::default().plugins.is_empty());
    }

    #[test]
    fn plugin_errors() {
        err("[[plugins]]\nname = \"kw\"\npath = \"missing.wasm\"\n", 3, "plugins[0].path", "missing.wasm");
        err("[[plugins]]\npath = \"filter.wasm\"\n", 1, "plugins[0].name", "missing");
        err("[[plugins]]\nname = \"a b\"\npath = \"filter.wasm\"\n", 2, "plugins[0].name", "invalid plugin name");
        err(
            "[[plugins]]\nname = \"a\"\npath = \"filter.wasm\"\n[[plugins]]\nname = \"a\"\npath = \"filter.wasm\"\n",
            5,
            "plugins[1].name",
            "already configured",
        );
        err("[[plugins]]\nname = \"a\"\npath = \"filter.wasm\"\non_error = \"ignore\"\n", 4, "plugins[0].on_error", "\"deliver\" or \"drop\"");
        err("[[plugins]]\nname = \"a\"\npath = \"filter.wasm\"\ninstances = [\"*\", \"x.example\"]\n", 4, "plugins[0].instances", "alone");
        err("[[plugins]]\nname = \"a\"\npath = \"filter.wasm\"\ninstances = [\"https://x.example/\"]\n", 4, "plugins[0].instances", "not an instance domain");
        err("[[plugins]]\nname = \"a\"\npath = \"filter.wasm\"\nfuel = 99_000_000\n", 4, "plugins[0].fuel", "at most plugin_limits.fuel");
        err("[[plugins]]\nname = \"a\"\npath = \"filter.wasm\"\nmemory_mb = 0\n", 4, "plugins[0].memory_mb", "between 1 and 16");
        err("[plugin_limits]\ntimeout_ms = 0\n", 2, "plugin_limits.timeout_ms", "between 1 and 10000");
        let (_d, r) = load("[[plugins]]\nname = \"a\"\npath = \"filter.wasm\"\nfule = 3\n");
        assert!(r.unwrap_err().to_string().contains("fule"));
    }
}
