//! From [`RawConfig`] (the file as written) to [`Config`] (validated values,
//! defaults filled in, `${VAR}` expanded, secret files read).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use url::Url;

use crate::error::{ConfigError, Source};
use crate::expand::expand;
use crate::raw::{RawConfig, RawLimits, RawProvider, RawQueue, RawRate, RawServer, RawStore, Str};
use crate::{
    Apns, ApnsAuth, ApnsEnvironment, Config, Expo, Fcm, Limits, LogFormat, PemFile, Provider,
    Queue, Rate, Secret, Server, ServiceAccount, Store, StoreUrl,
};

/// The keys each provider kind takes (besides `kind`).
const EXPO_KEYS: &[&str] = &[
    "access_token",
    "access_token_file",
    "base_url",
    "placeholder_title",
    "placeholder_body",
    "receipt_delay_secs",
    "timeout_secs",
];
const APNS_KEYS: &[&str] = &[
    "key_file",
    "key_id",
    "team_id",
    "cert_file",
    "cert_key_file",
    "topic",
    "environment",
    "base_url",
    "ca_file",
    "placeholder_title",
    "placeholder_body",
    "sound",
    "timeout_secs",
];
const FCM_KEYS: &[&str] = &[
    "service_account_file",
    "base_url",
    "placeholder_title",
    "placeholder_body",
    "timeout_secs",
];

/// Google's OAuth2 token endpoint, for service-account files without `token_uri`.
const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

pub(crate) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub(crate) struct Resolver<'a> {
    pub src: Source<'a>,
    pub env: Env<'a>,
    /// Directory relative `*_file` paths are resolved against.
    pub base_dir: PathBuf,
}

type Result<T> = std::result::Result<T, ConfigError>;

impl Resolver<'_> {
    fn err(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::at(&self.src, Some(span), key, message)
    }

    /// The value of a string key after `${VAR}` expansion.
    fn string(&self, key: &str, value: &Str) -> Result<String> {
        expand(value.get_ref(), self.env).map_err(|e| self.err(value.span(), key, e.message()))
    }

    fn opt_string(&self, key: &str, value: Option<&Str>, default: &str) -> Result<String> {
        match value {
            Some(v) => self.string(key, v),
            None => Ok(default.to_owned()),
        }
    }

    /// A number with a lower bound, or its default.
    fn at_least<T>(&self, key: &str, value: Option<&Spanned<T>>, min: T, default: T) -> Result<T>
    where
        T: Copy + PartialOrd + std::fmt::Display,
    {
        match value {
            None => Ok(default),
            Some(v) if *v.get_ref() < min => Err(self.err(
                v.span(),
                key,
                format!("must be at least {min}, got {}", v.get_ref()),
            )),
            Some(v) => Ok(*v.get_ref()),
        }
    }

    fn secret(&self, key: &str, value: &Str) -> Result<Secret> {
        let s = self.string(key, value)?;
        if s.is_empty() {
            return Err(self.err(
                value.span(),
                key,
                "must not be empty (remove the key instead to leave it unset)",
            ));
        }
        Ok(Secret(s))
    }

    pub(crate) fn config(&self, raw: RawConfig) -> Result<Config> {
        Ok(Config {
            server: self.server(&raw.server)?,
            store: self.store(&raw.store)?,
            queue: self.queue(&raw.queue)?,
            limits: self.limits(&raw.limits)?,
            providers: match &raw.providers {
                None => crate::default_providers(),
                Some(table) => self.providers(table)?,
            },
            plugin_limits: crate::plugins::plugin_limits(self, raw.plugin_limits.as_ref())?,
            plugins: crate::plugins::plugins(
                self,
                &raw.plugins,
                &crate::plugins::plugin_limits(self, raw.plugin_limits.as_ref())?,
            )?,
        })
    }

    fn server(&self, raw: &RawServer) -> Result<Server> {
        let d = Server::default();
        let listen = match &raw.listen {
            None => d.listen,
            Some(v) => {
                let s = self.string("server.listen", v)?;
                s.parse::<SocketAddr>().map_err(|_| {
                    self.err(
                        v.span(),
                        "server.listen",
                        format!(
                            "invalid socket address syntax {s:?} (expected e.g. \"127.0.0.1:8080\" or \"[::]:8080\")"
                        ),
                    )
                })?
            }
        };
        let public_url = match &raw.public_url {
            None => d.public_url,
            Some(v) => self.http_url("server.public_url", v, "\"https://relay.example.org\"")?,
        };
        let log_format = match &raw.log_format {
            None => d.log_format,
            Some(v) => match self.string("server.log_format", v)?.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(self.err(
                        v.span(),
                        "server.log_format",
                        format!("unknown log format {other:?} (expected \"text\" or \"json\")"),
                    ))
                }
            },
        };
        let log_level = match &raw.log_level {
            None => d.log_level,
            Some(v) => {
                let s = self.string("server.log_level", v)?;
                if s.trim().is_empty() {
                    return Err(self.err(
                        v.span(),
                        "server.log_level",
                        "must not be empty (expected a tracing filter such as \"info\" or \"info,push_relay=debug\")",
                    ));
                }
                s
            }
        };
        let registration_key = match &raw.registration_key {
            None => None,
            Some(v) => Some(self.secret("server.registration_key", v)?),
        };
        Ok(Server {
            listen,
            public_url,
            log_format,
            log_level,
            registration_key,
            trust_forwarded_for: raw.trust_forwarded_for.unwrap_or(d.trust_forwarded_for),
        })
    }

    /// An absolute `http`/`https` URL with a host and neither query,
    /// fragment nor credentials; a path prefix is allowed.
    fn http_url(&self, key: &str, value: &Str, example: &str) -> Result<Url> {
        let s = self.string(key, value)?;
        let fail = |what: String| {
            self.err(
                value.span(),
                key,
                format!("{what} (expected e.g. {example})"),
            )
        };
        let url = Url::parse(&s).map_err(|e| fail(format!("invalid URL {s:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(fail(format!(
                "URL scheme must be http or https, got {:?}",
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(fail(format!("URL {s:?} has no host")));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(fail(format!(
                "URL {s:?} must not have a query (`?`) or fragment (`#`)"
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(fail(format!("URL {s:?} must not contain credentials")));
        }
        Ok(url)
    }

    fn store(&self, raw: &RawStore) -> Result<Store> {
        let d = Store::default();
        let url = match &raw.url {
            None => d.url,
            Some(v) => {
                let s = self.string("store.url", v)?;
                parse_store_url(&s).ok_or_else(|| {
                    self.err(
                        v.span(),
                        "store.url",
                        format!(
                            "unsupported store URL {:?} (expected \"sqlite://PATH\", e.g. \"sqlite://push-relay.db\", \
                             or \"postgres://USER:PASSWORD@HOST/DB\")",
                            redact_url(&s)
                        ),
                    )
                })?
            }
        };
        Ok(Store {
            url,
            pool_size: self.at_least("store.pool_size", raw.pool_size.as_ref(), 1, d.pool_size)?,
        })
    }

    fn queue(&self, raw: &RawQueue) -> Result<Queue> {
        let d = Queue::default();
        let q = Queue {
            default_ttl_secs: self.at_least(
                "queue.default_ttl_secs",
                raw.default_ttl_secs.as_ref(),
                0,
                d.default_ttl_secs,
            )?,
            max_ttl_secs: self.at_least(
                "queue.max_ttl_secs",
                raw.max_ttl_secs.as_ref(),
                1,
                d.max_ttl_secs,
            )?,
            workers: self.at_least("queue.workers", raw.workers.as_ref(), 1, d.workers)?,
            batch_size: self.at_least(
                "queue.batch_size",
                raw.batch_size.as_ref(),
                1,
                d.batch_size,
            )?,
            lease_secs: self.at_least(
                "queue.lease_secs",
                raw.lease_secs.as_ref(),
                1,
                d.lease_secs,
            )?,
            poll_interval_ms: self.at_least(
                "queue.poll_interval_ms",
                raw.poll_interval_ms.as_ref(),
                10,
                d.poll_interval_ms,
            )?,
            retry_base_ms: self.at_least(
                "queue.retry_base_ms",
                raw.retry_base_ms.as_ref(),
                1,
                d.retry_base_ms,
            )?,
            retry_max_secs: self.at_least(
                "queue.retry_max_secs",
                raw.retry_max_secs.as_ref(),
                1,
                d.retry_max_secs,
            )?,
        };
        if let Some(v) = &raw.batch_size {
            if q.batch_size > 1000 {
                return Err(self.err(
                    v.span(),
                    "queue.batch_size",
                    format!("must be at most 1000, got {}", q.batch_size),
                ));
            }
        }
        if q.default_ttl_secs > q.max_ttl_secs {
            // Point at whichever of the two the file actually sets.
            let (key, span) = match (&raw.default_ttl_secs, &raw.max_ttl_secs) {
                (Some(v), _) => ("queue.default_ttl_secs", v.span()),
                (None, Some(v)) => ("queue.max_ttl_secs", v.span()),
                (None, None) => ("queue.default_ttl_secs", 0..0),
            };
            return Err(self.err(
                span,
                key,
                format!(
                    "default_ttl_secs ({}) must not exceed max_ttl_secs ({})",
                    q.default_ttl_secs, q.max_ttl_secs
                ),
            ));
        }
        Ok(q)
    }

    fn limits(&self, raw: &RawLimits) -> Result<Limits> {
        let d = Limits::default();
        let rate = |key: &str, value: &Option<Spanned<RawRate>>, default: Rate| match value {
            None => Ok(default),
            Some(v) => self.rate(key, v),
        };
        Ok(Limits {
            per_instance: rate("limits.per_instance", &raw.per_instance, d.per_instance)?,
            per_registration: rate(
                "limits.per_registration",
                &raw.per_registration,
                d.per_registration,
            )?,
            registrations_per_ip: rate(
                "limits.registrations_per_ip",
                &raw.registrations_per_ip,
                d.registrations_per_ip,
            )?,
        })
    }

    fn rate(&self, key: &str, value: &Spanned<RawRate>) -> Result<Rate> {
        let raw = value.get_ref();
        let nonzero = |name: &str, v: &Spanned<u32>| {
            NonZeroU32::new(*v.get_ref())
                .ok_or_else(|| self.err(v.span(), &format!("{key}.{name}"), "must be at least 1"))
        };
        let (count, period) = match (&raw.per_second, &raw.per_minute) {
            (Some(s), None) => (nonzero("per_second", s)?, Duration::from_secs(1)),
            (None, Some(m)) => (nonzero("per_minute", m)?, Duration::from_secs(60)),
            (Some(_), Some(m)) => {
                return Err(self.err(
                    m.span(),
                    &format!("{key}.per_minute"),
                    "set either per_second or per_minute, not both",
                ))
            }
            (None, None) => {
                return Err(self.err(
                    value.span(),
                    key,
                    "expected exactly one of per_second or per_minute, e.g. { per_second = 50, burst = 200 }",
                ))
            }
        };
        let burst = match &raw.burst {
            None => count,
            Some(b) => nonzero("burst", b)?,
        };
        Ok(Rate {
            count,
            period,
            burst,
        })
    }

    fn providers(
        &self,
        table: &Spanned<BTreeMap<Str, Spanned<RawProvider>>>,
    ) -> Result<BTreeMap<String, Provider>> {
        if table.get_ref().is_empty() {
            return Err(self.err(
                table.span(),
                "providers",
                "no provider configured: add a [providers.NAME] table with a `kind`, \
                 or remove [providers] to get the default `expo` provider",
            ));
        }
        let mut out = BTreeMap::new();
        for (name, provider) in table.get_ref() {
            if !is_provider_name(name.get_ref()) {
                return Err(self.err(
                    name.span(),
                    &format!("providers.{}", name.get_ref()),
                    format!(
                        "invalid provider name {:?} (expected 1 to 64 of a-z, 0-9, `_`, `-`, starting with a letter or digit)",
                        name.get_ref()
                    ),
                ));
            }
            let resolved = self.provider(name.get_ref(), provider)?;
            out.insert(name.get_ref().clone(), resolved);
        }
        Ok(out)
    }

    fn provider(&self, name: &str, table: &Spanned<RawProvider>) -> Result<Provider> {
        let raw = table.get_ref();
        let key = |field: &str| format!("providers.{name}.{field}");
        let kind = self.string(&key("kind"), &raw.kind)?;
        let allowed = match kind.as_str() {
            "expo" => EXPO_KEYS,
            "apns" => APNS_KEYS,
            "fcm" => FCM_KEYS,
            other => {
                return Err(self.err(
                    raw.kind.span(),
                    &key("kind"),
                    format!(
                        "unknown provider kind {other:?} (expected one of: {})",
                        Provider::KINDS.join(", ")
                    ),
                ))
            }
        };
        // Keys of another kind are mistakes (e.g. `topic` on an FCM provider).
        if let Some((field, span)) = raw.set_keys().into_iter().find(|(k, _)| !allowed.contains(k)) {
            return Err(self.err(
                span,
                &key(field),
                format!(
                    "`{field}` is not a key of kind {kind:?} (its keys: kind, {})",
                    allowed.join(", ")
                ),
            ));
        }
        match kind.as_str() {
            "apns" => Ok(Provider::Apns(self.apns(name, table)?)),
            "fcm" => Ok(Provider::Fcm(self.fcm(name, table)?)),
            _ => Ok(Provider::Expo(self.expo(name, raw)?)),
        }
    }

    fn apns(&self, name: &str, table: &Spanned<RawProvider>) -> Result<Apns> {
        let raw = table.get_ref();
        let key = |field: &str| format!("providers.{name}.{field}");
        let token_keys = [&raw.key_file, &raw.key_id, &raw.team_id];
        let cert_keys = [&raw.cert_file, &raw.cert_key_file];
        let uses_token = token_keys.iter().any(|k| k.is_some());
        let uses_cert = cert_keys.iter().any(|k| k.is_some());
        let auth = if uses_token && uses_cert {
            let (field, v) = [("cert_file", &raw.cert_file), ("cert_key_file", &raw.cert_key_file)]
                .into_iter()
                .find_map(|(f, v)| v.as_ref().map(|v| (f, v)))
                .ok_or_else(|| self.err(table.span(), &key("cert_file"), "internal: no cert key"))?;
            return Err(self.err(
                v.span(),
                &key(field),
                "set either token auth (key_file, key_id, team_id) or certificate auth \
                 (cert_file, cert_key_file), not both",
            ));
        } else if uses_token {
            let why = "token auth needs key_file, key_id and team_id \
                       (the .p8 key from Apple, its Key ID and your Team ID)";
            let required = |field: &str, v| self.required(table, &key(field), field, v, why);
            let key_file = required("key_file", &raw.key_file)?;
            let key_id = required("key_id", &raw.key_id)?;
            let team_id = required("team_id", &raw.team_id)?;
            ApnsAuth::Token {
                key: self.pem_file(&key("key_file"), key_file)?,
                key_id: self.apple_id(&key("key_id"), key_id, "the Key ID shown with the key, e.g. \"ABC123DEFG\"")?,
                team_id: self.apple_id(&key("team_id"), team_id, "your Team ID, e.g. \"DEF123GHIJ\"")?,
            }
        } else if uses_cert {
            let why = "certificate auth needs cert_file and cert_key_file \
                       (the client certificate and its private key, PEM)";
            let required = |field: &str, v| self.required(table, &key(field), field, v, why);
            let cert_file = required("cert_file", &raw.cert_file)?;
            let cert_key_file = required("cert_key_file", &raw.cert_key_file)?;
            ApnsAuth::Certificate {
                cert: self.pem_file(&key("cert_file"), cert_file)?,
                key: self.pem_file(&key("cert_key_file"), cert_key_file)?,
            }
        } else {
            return Err(self.err(
                table.span(),
                &key("key_file"),
                "no APNs credentials: set key_file, key_id and team_id (token auth, with the .p8 key \
                 from Apple) or cert_file and cert_key_file (certificate auth)",
            ));
        };
        let topic = match &raw.topic {
            None => {
                return Err(self.err(
                    table.span(),
                    &key("topic"),
                    "missing key `topic`: the app's bundle id, e.g. \"org.example.app\"",
                ))
            }
            Some(v) => {
                let t = self.string(&key("topic"), v)?;
                if t.is_empty() || t.contains(char::is_whitespace) {
                    return Err(self.err(
                        v.span(),
                        &key("topic"),
                        format!("invalid topic {t:?} (expected the app's bundle id, e.g. \"org.example.app\")"),
                    ));
                }
                t
            }
        };
        let environment = match &raw.environment {
            None => ApnsEnvironment::default(),
            Some(v) => match self.string(&key("environment"), v)?.as_str() {
                "production" => ApnsEnvironment::Production,
                "sandbox" => ApnsEnvironment::Sandbox,
                other => {
                    return Err(self.err(
                        v.span(),
                        &key("environment"),
                        format!("unknown APNs environment {other:?} (expected \"production\" or \"sandbox\")"),
                    ))
                }
            },
        };
        let base_url = match &raw.base_url {
            None => environment.base_url(),
            Some(v) => self.http_url(&key("base_url"), v, "\"https://api.push.apple.com\"")?,
        };
        let ca_file = match &raw.ca_file {
            None => None,
            Some(v) => Some(self.pem_file(&key("ca_file"), v)?),
        };
        Ok(Apns {
            auth,
            topic,
            environment,
            base_url,
            ca_file,
            placeholder_title: self.opt_string(
                &key("placeholder_title"),
                raw.placeholder_title.as_ref(),
                "New notification",
            )?,
            placeholder_body: self.opt_string(&key("placeholder_body"), raw.placeholder_body.as_ref(), "")?,
            sound: self.opt_string(&key("sound"), raw.sound.as_ref(), "default")?,
            timeout_secs: self.at_least(&key("timeout_secs"), raw.timeout_secs.as_ref(), 1, 30)?,
        })
    }

    /// The value of a key the table must have, or an error at the table.
    fn required<'v, T>(
        &self,
        table: &Spanned<T>,
        key: &str,
        field: &str,
        value: &'v Option<Str>,
        why: &str,
    ) -> Result<&'v Str> {
        value
            .as_ref()
            .ok_or_else(|| self.err(table.span(), key, format!("missing key `{field}`: {why}")))
    }

    /// An Apple key or team id: letters and digits.
    fn apple_id(&self, key: &str, value: &Str, what: &str) -> Result<String> {
        let s = self.string(key, value)?;
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(self.err(
                value.span(),
                key,
                format!("invalid id {s:?} (expected {what})"),
            ));
        }
        Ok(s)
    }

    fn fcm(&self, name: &str, table: &Spanned<RawProvider>) -> Result<Fcm> {
        let raw = table.get_ref();
        let key = |field: &str| format!("providers.{name}.{field}");
        let Some(file) = &raw.service_account_file else {
            return Err(self.err(
                table.span(),
                &key("service_account_file"),
                "missing key `service_account_file`: the service account's JSON key \
                 (Firebase console → Project settings → Service accounts → Generate new private key)",
            ));
        };
        let service_account = self.service_account(&key("service_account_file"), file)?;
        let base_url = match &raw.base_url {
            None => crate::static_url("https://fcm.googleapis.com"),
            Some(v) => self.http_url(&key("base_url"), v, "\"https://fcm.googleapis.com\"")?,
        };
        Ok(Fcm {
            service_account,
            base_url,
            placeholder_title: self.opt_string(
                &key("placeholder_title"),
                raw.placeholder_title.as_ref(),
                "New notification",
            )?,
            placeholder_body: self.opt_string(&key("placeholder_body"), raw.placeholder_body.as_ref(), "")?,
            timeout_secs: self.at_least(&key("timeout_secs"), raw.timeout_secs.as_ref(), 1, 30)?,
        })
    }

    /// Reads and checks a service-account JSON key.
    fn service_account(&self, key: &str, value: &Str) -> Result<ServiceAccount> {
        let (path, text) = self.read_file(key, value)?;
        let shown = path.display();
        let fail = |message: String| self.err(value.span(), key, message);
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| fail(format!("{shown} is not JSON ({e}); expected a service account's JSON key")))?;
        let Some(object) = json.as_object() else {
            return Err(fail(format!("{shown} is not a JSON object; expected a service account's JSON key")));
        };
        if object.contains_key("project_info") {
            return Err(fail(format!(
                "{shown} is the app's google-services.json, not a service-account key \
                 (Firebase console → Project settings → Service accounts → Generate new private key)"
            )));
        }
        if let Some(kind) = object.get("type").and_then(|t| t.as_str()) {
            if kind != "service_account" {
                return Err(fail(format!(
                    "{shown} holds a {kind:?} credential, not a service-account key (\"type\": \"service_account\")"
                )));
            }
        }
        let field = |name: &str| {
            object
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let missing: Vec<&str> = ["project_id", "client_email", "private_key"]
            .into_iter()
            .filter(|f| field(f).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(fail(format!(
                "{shown} lacks {} (expected a service account's JSON key, with project_id, \
                 client_email, private_key and token_uri)",
                missing.join(", ")
            )));
        }
        let token_uri = match field("token_uri") {
            None => crate::static_url(GOOGLE_TOKEN_URI),
            Some(uri) => match Url::parse(&uri) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => url,
                _ => return Err(fail(format!("{shown}: token_uri {uri:?} is not an http(s) URL"))),
            },
        };
        Ok(ServiceAccount {
            project_id: field("project_id").unwrap_or_default(),
            client_email: field("client_email").unwrap_or_default(),
            private_key: Secret(field("private_key").unwrap_or_default()),
            token_uri,
            path,
        })
    }

    /// Reads a PEM file (key or certificate) named by `value`.
    fn pem_file(&self, key: &str, value: &Str) -> Result<PemFile> {
        let (path, text) = self.read_file(key, value)?;
        if !text.contains("-----BEGIN ") {
            return Err(self.err(
                value.span(),
                key,
                format!("{} is not a PEM file (expected a \"-----BEGIN ...\" block)", path.display()),
            ));
        }
        Ok(PemFile { path, contents: Secret(text) })
    }

    /// Reads the non-empty file named by `value`, relative to the config
    /// file's directory.
    fn read_file(&self, key: &str, value: &Str) -> Result<(PathBuf, String)> {
        let written = self.string(key, value)?;
        if written.is_empty() {
            return Err(self.err(value.span(), key, "must not be empty (expected a file path)"));
        }
        let path = self.base_dir.join(&written);
        let contents = std::fs::read_to_string(&path)
            .map_err(|e| self.err(value.span(), key, format!("cannot read {}: {e}", path.display())))?;
        if contents.trim().is_empty() {
            return Err(self.err(value.span(), key, format!("file {} is empty", path.display())));
        }
        Ok((path, contents))
    }

    fn expo(&self, name: &str, raw: &RawProvider) -> Result<Expo> {
        let key = |field: &str| format!("providers.{name}.{field}");
        let d = Expo::default();
        let access_token = match (&raw.access_token, &raw.access_token_file) {
            (Some(_), Some(f)) => {
                return Err(self.err(
                    f.span(),
                    &key("access_token_file"),
                    "set either access_token or access_token_file, not both",
                ))
            }
            (Some(t), None) => Some(self.secret(&key("access_token"), t)?),
            (None, Some(f)) => Some(self.secret_file(&key("access_token_file"), f)?),
            (None, None) => None,
        };
        let base_url = match &raw.base_url {
            None => d.base_url,
            Some(v) => self.http_url(&key("base_url"), v, "\"https://exp.host\"")?,
        };
        Ok(Expo {
            access_token,
            base_url,
            placeholder_title: self.opt_string(
                &key("placeholder_title"),
                raw.placeholder_title.as_ref(),
                &d.placeholder_title,
            )?,
            placeholder_body: self.opt_string(
                &key("placeholder_body"),
                raw.placeholder_body.as_ref(),
                &d.placeholder_body,
            )?,
            receipt_delay_secs: raw
                .receipt_delay_secs
                .as_ref()
                .map_or(d.receipt_delay_secs, |v| *v.get_ref()),
            timeout_secs: self.at_least(
                &key("timeout_secs"),
                raw.timeout_secs.as_ref(),
                1,
                d.timeout_secs,
            )?,
        })
    }

    /// Reads a secret from the file named by `value` (relative to the config
    /// file's directory), trimming surrounding whitespace.
    fn secret_file(&self, key: &str, value: &Str) -> Result<Secret> {
        let written = self.string(key, value)?;
        if written.is_empty() {
            return Err(self.err(
                value.span(),
                key,
                "must not be empty (expected a file path)",
            ));
        }
        let path = self.base_dir.join(&written);
        let contents = std::fs::read_to_string(&path).map_err(|e| {
            self.err(
                value.span(),
                key,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let token = contents.trim();
        if token.is_empty() {
            return Err(self.err(
                value.span(),
                key,
                format!("file {} is empty", path.display()),
            ));
        }
        Ok(Secret(token.to_owned()))
    }
}

/// `sqlite://PATH` or `postgres[ql]://...`; `None` for anything else.
pub(crate) fn parse_store_url(s: &str) -> Option<StoreUrl> {
    if let Some(path) = s.strip_prefix("sqlite://") {
        return (!path.is_empty()).then(|| StoreUrl::Sqlite(PathBuf::from(path)));
    }
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        return Some(StoreUrl::Postgres(s.to_owned()));
    }
    None
}

/// Hides a password in `scheme://user:password@host` before echoing a URL.
fn redact_url(s: &str) -> String {
    if let Some((scheme, rest)) = s.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    s.to_owned()
}

/// `^[a-z0-9][a-z0-9_-]{0,63}$`
fn is_provider_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=64).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

/// The directory relative paths in a file named `origin` are resolved against.
pub(crate) fn base_dir_of(origin: &Path) -> PathBuf {
    match origin.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
