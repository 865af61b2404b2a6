//! push-relay's configuration file, `push-relay.toml`.
//!
//! ```no_run
//! let config = push_relay_config::load(std::path::Path::new("push-relay.toml"))?;
//! println!("listening on {}", config.server.listen);
//! # Ok::<(), push_relay_config::ConfigError>(())
//! ```
//!
//! Every key is optional: an empty file gives [`Config::default()`], which is
//! also what `serve` runs with when no file is given. [`example()`] is a
//! commented file showing every key with its default.
//!
//! # What loading does
//!
//! 1. **Parse** the TOML. Unknown keys are errors, listing the keys that
//!    are accepted there, so a typo never silently falls back to a default.
//! 2. **Expand** `${NAME}` in every string *value* (never in keys) from the
//!    process environment; `$$` is a literal `$`. An unset variable is an
//!    error. Expansion happens value by value, so positions in errors still
//!    refer to the file as written.
//! 3. **Validate** each value (socket addresses, URLs, ranges) and fill in
//!    defaults. Secrets named by `*_file` keys are read now, relative to the
//!    directory of the configuration file.
//!
//! # Errors
//!
//! A refused file yields one [`ConfigError`] whose `Display` is a single
//! compiler-style line: file, line, column, the dotted key at fault and what
//! was expected:
//!
//! ```text
//! push-relay.toml:12:10: key `server.listen`: invalid socket address syntax "localhost" (expected e.g. "127.0.0.1:8080" or "[::]:8080")
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

mod error;
mod expand;
mod plugins;
mod raw;
mod resolve;

pub use error::ConfigError;
pub use plugins::{OnError, Plugin, PluginInstances, PluginLimits};

use error::Source;
use resolve::{base_dir_of, Env, Resolver};

/// Reads and validates the configuration file at `path`.
///
/// `${NAME}` references are expanded from the process environment, and
/// relative `*_file` paths are resolved against the directory of `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::whole_file(&origin, format!("cannot read configuration file: {e}"))
    })?;
    parse_inner(&text, &origin, base_dir_of(path), &process_env)
}

/// Parses and validates configuration text.
///
/// `origin` is the file name shown in error messages; relative `*_file`
/// paths are resolved against its directory (the current directory when it
/// has none).
pub fn parse(source: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_with_env(source, origin, &process_env)
}

/// The commented example configuration (`push-relay.example.toml`): every
/// key, its meaning and its default. It parses as is, to the defaults
/// (apart from values it sets explicitly to illustrate a form).
pub fn example() -> &'static str {
    include_str!("../push-relay.example.toml")
}

/// [`parse`] with an injected environment, so tests need not touch the
/// process environment.
pub(crate) fn parse_with_env(
    source: &str,
    origin: &str,
    env: Env<'_>,
) -> Result<Config, ConfigError> {
    parse_inner(source, origin, base_dir_of(Path::new(origin)), env)
}

fn parse_inner(
    source: &str,
    origin: &str,
    base_dir: PathBuf,
    env: Env<'_>,
) -> Result<Config, ConfigError> {
    let src = Source {
        text: source,
        origin,
    };
    let raw: raw::RawConfig =
        toml::from_str(source).map_err(|e| ConfigError::from_toml(&src, &e))?;
    Resolver { src, env, base_dir }.config(raw)
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The whole configuration. See the crate documentation for how it is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `[server]`: the HTTP listener and logging.
    pub server: Server,
    /// `[store]`: where registrations and queued messages live.
    pub store: Store,
    /// `[queue]`: delivery of queued messages to providers.
    pub queue: Queue,
    /// `[limits]`: rate limits.
    pub limits: Limits,
    /// `[providers.NAME]`: the push services messages are delivered to, by
    /// name. Without a `[providers]` table: one Expo provider named `expo`.
    pub providers: BTreeMap<String, Provider>,
    /// `[[plugins]]`: WebAssembly filter plugins, in the order they run.
    /// Default: none.
    pub plugins: Vec<Plugin>,
    /// `[plugin_limits]`: defaults and maxima of the plugins' limits.
    pub plugin_limits: PluginLimits,
}

impl Default for Config {
    /// The built-in defaults; equal to parsing an empty file.
    fn default() -> Self {
        Config {
            server: Server::default(),
            store: Store::default(),
            queue: Queue::default(),
            limits: Limits::default(),
            providers: default_providers(),
            plugins: Vec::new(),
            plugin_limits: PluginLimits::default(),
        }
    }
}

pub(crate) fn default_providers() -> BTreeMap<String, Provider> {
    BTreeMap::from([("expo".to_owned(), Provider::Expo(Expo::default()))])
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// `listen`: address the HTTP server binds. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// `public_url`: how clients reach this relay, used to build the push
    /// endpoints handed out at registration. `http`/`https` with a host; a
    /// path prefix is allowed, query and fragment are not. Default
    /// `http://127.0.0.1:8080`. Use [`Server::endpoint_base`] to build URLs.
    pub public_url: Url,
    /// `log_format`: `"text"` (default) or `"json"`.
    pub log_format: LogFormat,
    /// `log_level`: a `tracing` EnvFilter directive. Default `"info"`.
    pub log_level: String,
    /// `registration_key`: when set, creating a registration requires
    /// `Authorization: Bearer <key>`. Default: unset (open registration).
    pub registration_key: Option<Secret>,
    /// `trust_forwarded_for`: take the client IP from `X-Forwarded-For`
    /// (only behind a reverse proxy that sets it). Default `false`.
    pub trust_forwarded_for: bool,
}

impl Server {
    /// [`public_url`](Self::public_url) without a trailing `/`, ready for
    /// `format!("{}/push/{id}", server.endpoint_base())`: e.g.
    /// `"https://relay.example"` or `"https://example.org/relay"`.
    pub fn endpoint_base(&self) -> String {
        self.public_url.as_str().trim_end_matches('/').to_owned()
    }
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            public_url: static_url("http://127.0.0.1:8080"),
            log_format: LogFormat::Text,
            log_level: "info".to_owned(),
            registration_key: None,
            trust_forwarded_for: false,
        }
    }
}

/// Parses one of this file's built-in default URLs. These are constants,
/// never user input; `defaults_equal_empty_file` checks that they parse.
fn static_url(s: &'static str) -> Url {
    #[allow(clippy::expect_used)]
    Url::parse(s).expect("built-in default URL is valid")
}

/// `server.log_format`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (`"text"`).
    Text,
    /// One JSON object per line (`"json"`).
    Json,
}

/// `[store]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    /// `url`: `"sqlite://PATH"` or `"postgres://..."`. Default
    /// `"sqlite://push-relay.db"` (relative to the working directory).
    pub url: StoreUrl,
    /// `pool_size`: database connections per process, at least 1. Default 16.
    pub pool_size: usize,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            url: StoreUrl::Sqlite(PathBuf::from("push-relay.db")),
            pool_size: 16,
        }
    }
}

/// `store.url`, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://push-relay.db` → `push-relay.db`; `sqlite:///var/lib/x.db`
    /// → `/var/lib/x.db`; `sqlite://:memory:` → `:memory:`.
    Sqlite(PathBuf),
    /// `postgres://...` or `postgresql://...`, kept whole as a libpq URL.
    Postgres(String),
}

/// `[queue]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// `default_ttl_secs`: TTL of a push without a `TTL` header. Default
    /// 86400 (one day). Must not exceed `max_ttl_secs`.
    pub default_ttl_secs: u32,
    /// `max_ttl_secs`: longer TTLs are capped to this. Default 2419200
    /// (28 days).
    pub max_ttl_secs: u32,
    /// `workers`: concurrent delivery loops per provider and process, at
    /// least 1. Default 8.
    pub workers: usize,
    /// `batch_size`: messages claimed per round, 1 to 1000. Default 100.
    pub batch_size: usize,
    /// `lease_secs`: how long a claimed message is reserved before another
    /// process may retry it, at least 1. Default 60.
    pub lease_secs: u32,
    /// `poll_interval_ms`: pause between rounds when the queue is empty, at
    /// least 10. Default 500.
    pub poll_interval_ms: u64,
    /// `retry_base_ms`: first retry backoff, at least 1. Default 1000.
    pub retry_base_ms: u64,
    /// `retry_max_secs`: backoff ceiling, at least 1. Default 600.
    pub retry_max_secs: u64,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            default_ttl_secs: 86_400,
            max_ttl_secs: 2_419_200,
            workers: 8,
            batch_size: 100,
            lease_secs: 60,
            poll_interval_ms: 500,
            retry_base_ms: 1000,
            retry_max_secs: 600,
        }
    }
}

/// `[limits]`: token-bucket rate limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `per_instance`: pushes from one sending instance. Default
    /// `{ per_second = 50, burst = 200 }`.
    pub per_instance: Rate,
    /// `per_registration`: pushes to one registration. Default
    /// `{ per_second = 2, burst = 20 }`.
    pub per_registration: Rate,
    /// `registrations_per_ip`: registrations created by one client IP.
    /// Default `{ per_minute = 30, burst = 30 }`.
    pub registrations_per_ip: Rate,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_instance: Rate::per_second(nz(50), nz(200)),
            per_registration: Rate::per_second(nz(2), nz(20)),
            registrations_per_ip: Rate::per_minute(nz(30), nz(30)),
        }
    }
}

/// Non-zero constant; `1` for `0` (never used with 0).
const fn nz(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => NonZeroU32::MIN,
    }
}

/// A rate: `count` events per `period`, with bursts of up to `burst`.
///
/// Written `{ per_second = 50, burst = 200 }` or
/// `{ per_minute = 30 }` (exactly one of `per_second`/`per_minute`, each at
/// least 1; `burst` defaults to the count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed per `period` in the long run.
    pub count: NonZeroU32,
    /// One second (`per_second`) or one minute (`per_minute`).
    pub period: Duration,
    /// Events allowed at once (bucket size).
    pub burst: NonZeroU32,
}

impl Rate {
    /// `count` per second, bursts of `burst`.
    pub const fn per_second(count: NonZeroU32, burst: NonZeroU32) -> Rate {
        Rate {
            count,
            period: Duration::from_secs(1),
            burst,
        }
    }

    /// `count` per minute, bursts of `burst`.
    pub const fn per_minute(count: NonZeroU32, burst: NonZeroU32) -> Rate {
        Rate {
            count,
            period: Duration::from_secs(60),
            burst,
        }
    }

    /// The time in which one event's allowance is replenished
    /// (`period / count`), as a token-bucket limiter wants it.
    pub fn replenish_interval(&self) -> Duration {
        self.period / self.count.get()
    }
}

/// `[providers.NAME]`: one push service, chosen by its `kind` key. Any
/// number of providers of each kind may be configured (e.g. `ios-prod`,
/// `ios-beta` and `android`), each with its own credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    /// `kind = "expo"`: Expo's push service.
    Expo(Expo),
    /// `kind = "apns"`: Apple Push Notification service, directly.
    Apns(Apns),
    /// `kind = "fcm"`: Firebase Cloud Messaging HTTP v1, directly.
    Fcm(Fcm),
}

impl Provider {
    /// The `kind` values this build understands.
    pub const KINDS: &'static [&'static str] = &["expo", "apns", "fcm"];

    /// The `kind` this provider was configured with, e.g. `"expo"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Provider::Expo(_) => "expo",
            Provider::Apns(_) => "apns",
            Provider::Fcm(_) => "fcm",
        }
    }
}

/// `[providers.NAME]` with `kind = "expo"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expo {
    /// `access_token = "${EXPO_ACCESS_TOKEN}"` or `access_token_file =
    /// "path"` (read at load time and trimmed; relative to the config file's
    /// directory). Needed only when the Expo project enforces push security.
    pub access_token: Option<Secret>,
    /// `base_url`: Expo's API root. Default `https://exp.host`.
    pub base_url: Url,
    /// `placeholder_title`: notification title shown on the device, since
    /// Web Push payloads are end-to-end encrypted and cannot be shown.
    /// Default `"New notification"`.
    pub placeholder_title: String,
    /// `placeholder_body`: notification body. Default `""`.
    pub placeholder_body: String,
    /// `receipt_delay_secs`: how long after sending to fetch push receipts.
    /// Default 900 (Expo recommends about 15 minutes).
    pub receipt_delay_secs: u64,
    /// `timeout_secs`: HTTP timeout per request to Expo, at least 1.
    /// Default 30.
    pub timeout_secs: u64,
}

impl Default for Expo {
    fn default() -> Self {
        Expo {
            access_token: None,
            base_url: static_url("https://exp.host"),
            placeholder_title: "New notification".to_owned(),
            placeholder_body: String::new(),
            receipt_delay_secs: 900,
            timeout_secs: 30,
        }
    }
}

/// `[providers.NAME]` with `kind = "apns"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Apns {
    /// How the relay authenticates to APNs: `key_file` + `key_id` +
    /// `team_id` (token auth), or `cert_file` + `cert_key_file`
    /// (certificate auth). Exactly one of the two.
    pub auth: ApnsAuth,
    /// `topic`: the app's bundle id, sent as `apns-topic`. Required.
    pub topic: String,
    /// `environment`: `"production"` (default) or `"sandbox"`.
    pub environment: ApnsEnvironment,
    /// `base_url`: APNs' API root. Default: the environment's
    /// (`https://api.push.apple.com` or `https://api.sandbox.push.apple.com`);
    /// when set, it overrides `environment`.
    pub base_url: Url,
    /// `ca_file`: an extra trusted CA certificate (PEM), read at load time;
    /// for tests and TLS-intercepting proxies. Default: none.
    pub ca_file: Option<PemFile>,
    /// `placeholder_title`: the alert title in opaque mode, replaced by the
    /// app's notification service extension. Default `"New notification"`.
    pub placeholder_title: String,
    /// `placeholder_body`: the alert body in opaque mode. Default `""`.
    pub placeholder_body: String,
    /// `sound`: `aps.sound`. Default `"default"`.
    pub sound: String,
    /// `timeout_secs`: HTTP timeout per request to APNs, at least 1.
    /// Default 30.
    pub timeout_secs: u64,
}

/// `providers.NAME.environment` of an APNs provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApnsEnvironment {
    /// `"production"`: `https://api.push.apple.com`.
    #[default]
    Production,
    /// `"sandbox"`: `https://api.sandbox.push.apple.com` (development builds).
    Sandbox,
}

impl ApnsEnvironment {
    /// The environment's API root.
    pub fn base_url(self) -> Url {
        match self {
            ApnsEnvironment::Production => static_url("https://api.push.apple.com"),
            ApnsEnvironment::Sandbox => static_url("https://api.sandbox.push.apple.com"),
        }
    }
}

/// How an APNs provider authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApnsAuth {
    /// Token auth: an ES256 provider JWT signed with the `.p8` key.
    Token {
        /// `key_file`: the `.p8` key from Apple (PKCS#8 PEM, P-256).
        key: PemFile,
        /// `key_id`: the key's id (the JWT's `kid`), e.g. `"ABC123DEFG"`.
        key_id: String,
        /// `team_id`: the developer team id (the JWT's `iss`).
        team_id: String,
    },
    /// Certificate auth: a TLS client certificate.
    Certificate {
        /// `cert_file`: the client certificate (PEM).
        cert: PemFile,
        /// `cert_key_file`: its private key (PEM).
        key: PemFile,
    },
}

/// A PEM file named by a `*_file` key, read at load time. The contents are
/// a [`Secret`] since most such files hold private keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemFile {
    /// The path, resolved against the config file's directory.
    pub path: PathBuf,
    /// The file's contents.
    pub contents: Secret,
}

/// `[providers.NAME]` with `kind = "fcm"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fcm {
    /// `service_account_file`: the service account's JSON key (Firebase
    /// console → Project settings → Service accounts). Required.
    pub service_account: ServiceAccount,
    /// `base_url`: FCM's API root. Default `https://fcm.googleapis.com`.
    pub base_url: Url,
    /// `placeholder_title`: in opaque mode (a data-only message, so that the
    /// app can decrypt) sent as data `placeholder_title`, for the app to show
    /// if it cannot decrypt. Default `"New notification"`.
    pub placeholder_title: String,
    /// `placeholder_body`: likewise, data `placeholder_body` (left out when
    /// empty). Default `""`.
    pub placeholder_body: String,
    /// `timeout_secs`: HTTP timeout per request to FCM and to the token
    /// endpoint, at least 1. Default 30.
    pub timeout_secs: u64,
}

/// The fields push-relay uses of a Google service-account JSON key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    /// The file it was read from, resolved against the config file's directory.
    pub path: PathBuf,
    /// `project_id`: the Firebase project messages are sent through.
    pub project_id: String,
    /// `client_email`: the service account (the OAuth2 assertion's `iss`).
    pub client_email: String,
    /// `private_key`: RSA private key (PEM) that signs the assertion.
    pub private_key: Secret,
    /// `token_uri`: the OAuth2 token endpoint. Default
    /// `https://oauth2.googleapis.com/token` when the file has none.
    pub token_uri: Url,
}

/// A secret string (token, key). `Debug` and `Display` print `***`, so it
/// cannot leak into logs by accident; call [`expose`](Secret::expose) where
/// the value is really needed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value (e.g. one obtained outside the config file).
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests;
