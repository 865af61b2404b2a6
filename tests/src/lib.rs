//! End-to-end test harness for `push-relay`.
//!
//! * [`relay`]: run the real binary ([`Relay`], [`RelayConfig`]).
//! * [`postgres`]: throw-away PostgreSQL databases.
//! * [`expo`]: [`MockExpo`], a faithful Expo push API server.
//! * [`apns`]: [`MockApns`], an HTTP/2-over-TLS APNs server checking provider
//!   JWTs or client certificates per app.
//! * [`fcm`]: [`MockFcm`], an FCM HTTP v1 server with its OAuth2 token endpoint.
//! * [`credentials`]: `.p8` keys, service accounts, a test PKI, JWS checks.
//! * [`webpush`]: our own instance-side sender ([`PushRequest`], [`Vapid`])
//!   and device-side decryption.
//! * [`pywebpush`]: an independent sender (the PyPI `pywebpush` package).
//! * [`AppClient`] / [`Registration`]: the relay's app API.

pub mod apns;
pub mod credentials;
pub mod expo;
pub mod fcm;
pub mod postgres;
pub mod pywebpush;
pub mod relay;
pub mod webpush;

pub use apns::{apns_token, ApnsAnswer, ApnsApp, ApnsAuth, ApnsRequest, MockApns};
pub use credentials::{ApnsKey, Pki, ServiceAccount};
pub use expo::{MockExpo, Received};
pub use fcm::{fcm_error, FcmAnswer, FcmRequest, MockFcm};
pub use relay::{expo_provider_toml, free_port, push_relay_bin, run_cli, Relay, RelayConfig};
pub use webpush::{
    b64decode_any, b64url, decrypt_aes128gcm, decrypt_aesgcm, encrypt_aes128gcm, encrypt_aesgcm,
    mastodon_payload, PushRequest, PushResponse, Recipient, Style, Vapid,
};

use serde_json::{json, Value};

/// A client of the relay's app API (`/v1/registrations...`).
///
/// Every call returns the HTTP status and the body as JSON (`Value::Null`
/// for an empty body, `Value::String` for a body that is not JSON), so tests
/// can assert on error answers as easily as on successes.
#[derive(Clone)]
pub struct AppClient {
    base: String,
    http: reqwest::Client,
}

async fn read_json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, v)
}

impl AppClient {
    /// A client for the relay at `base_url` (`http://127.0.0.1:PORT`).
    pub fn new(base_url: &str) -> AppClient {
        AppClient {
            base: base_url.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// The underlying HTTP client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = rb.send().await.unwrap_or_else(|e| panic!("app API request to {} failed: {e}", self.base));
        read_json(resp).await
    }

    /// `POST /v1/registrations` with the given fields (optional ones left out
    /// when `None`).
    pub async fn register(
        &self,
        provider: &str,
        token: &str,
        instance: &str,
        account: Option<&str>,
        server_key: Option<&str>,
        allow_decrypt: Option<bool>,
    ) -> (u16, Value) {
        let mut body = json!({"provider": provider, "token": token, "instance": instance});
        if let Some(a) = account {
            body["account"] = json!(a);
        }
        if let Some(k) = server_key {
            body["server_key"] = json!(k);
        }
        if let Some(d) = allow_decrypt {
            body["allow_decrypt"] = json!(d);
        }
        self.register_raw(&body).await
    }

    /// `POST /v1/registrations` with an arbitrary JSON body.
    pub async fn register_raw(&self, body: &Value) -> (u16, Value) {
        self.send(self.http.post(self.url("/v1/registrations")).json(body)).await
    }

    /// `POST /v1/registrations/{id}/confirm`.
    pub async fn confirm(&self, id: &str, secret: &str, server_key: &str, allow_decrypt: Option<bool>) -> (u16, Value) {
        let mut body = json!({"server_key": server_key});
        if let Some(d) = allow_decrypt {
            body["allow_decrypt"] = json!(d);
        }
        self.send(
            self.http
                .post(self.url(&format!("/v1/registrations/{id}/confirm")))
                .bearer_auth(secret)
                .json(&body),
        )
        .await
    }

    /// `PATCH /v1/registrations/{id}` with a JSON body (`{"token": ...}`, `{"allow_decrypt": false}`).
    pub async fn patch(&self, id: &str, secret: &str, body: &Value) -> (u16, Value) {
        self.send(
            self.http
                .patch(self.url(&format!("/v1/registrations/{id}")))
                .bearer_auth(secret)
                .json(body),
        )
        .await
    }

    /// `GET /v1/registrations/{id}`.
    pub async fn get(&self, id: &str, secret: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(&format!("/v1/registrations/{id}"))).bearer_auth(secret))
            .await
    }

    /// `DELETE /v1/registrations/{id}`.
    pub async fn delete(&self, id: &str, secret: &str) -> (u16, Value) {
        self.send(self.http.delete(self.url(&format!("/v1/registrations/{id}"))).bearer_auth(secret))
            .await
    }

    /// `GET /v1/registrations/{id}/messages/{message_id}`: status, headers, raw body.
    pub async fn fetch_message(
        &self,
        id: &str,
        secret: &str,
        message_id: &str,
    ) -> (u16, reqwest::header::HeaderMap, bytes::Bytes) {
        self.fetch_url(&self.url(&format!("/v1/registrations/{id}/messages/{message_id}")), secret)
            .await
    }

    /// GET an absolute or relative URL (e.g. a push's `Location`) with the
    /// registration secret: status, headers, raw body.
    pub async fn fetch_url(&self, url: &str, secret: &str) -> (u16, reqwest::header::HeaderMap, bytes::Bytes) {
        let url = if url.starts_with("http") { url.to_string() } else { self.url(url) };
        let resp = self
            .http
            .get(&url)
            .bearer_auth(secret)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url} failed: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.unwrap_or_default();
        (status, headers, body)
    }

    /// Register and assert `201`; returns the parsed [`Registration`].
    pub async fn register_ok(
        &self,
        provider: &str,
        token: &str,
        instance: &str,
        server_key: Option<&str>,
        allow_decrypt: Option<bool>,
    ) -> Registration {
        let (status, body) = self
            .register(provider, token, instance, Some("@alice@example.social"), server_key, allow_decrypt)
            .await;
        assert_eq!(status, 201, "register failed: {body}");
        Registration::from_json(&body)
    }
}

/// The answer of `POST /v1/registrations`, with the keys decoded.
#[derive(Clone, Debug)]
pub struct Registration {
    pub id: String,
    pub secret: String,
    pub endpoint: String,
    /// 65-byte public key (`keys.p256dh`).
    pub p256dh: Vec<u8>,
    /// 16-byte auth secret (`keys.auth`).
    pub auth: Vec<u8>,
    /// 32-byte private key (`keys.private_key`), when returned.
    pub private_key: Option<Vec<u8>>,
    pub confirmed: bool,
    pub allow_decrypt: bool,
    /// The whole JSON answer.
    pub raw: Value,
}

impl Registration {
    /// Parse a `201` answer; panics with the JSON when a field is missing.
    pub fn from_json(v: &Value) -> Registration {
        let s = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("registration answer has no string {k:?}: {v}"))
                .to_string()
        };
        let key = |k: &str| {
            v["keys"][k]
                .as_str()
                .map(b64decode_any)
                .unwrap_or_else(|| panic!("registration answer has no keys.{k}: {v}"))
        };
        Registration {
            id: s("id"),
            secret: s("secret"),
            endpoint: s("endpoint"),
            p256dh: key("p256dh"),
            auth: key("auth"),
            private_key: v["keys"]["private_key"].as_str().map(b64decode_any),
            confirmed: v["confirmed"].as_bool().unwrap_or(false),
            allow_decrypt: v["allow_decrypt"].as_bool().unwrap_or(false),
            raw: v.clone(),
        }
    }

    /// `keys.p256dh` as base64url.
    pub fn p256dh_b64(&self) -> String {
        b64url(&self.p256dh)
    }

    /// `keys.auth` as base64url.
    pub fn auth_b64(&self) -> String {
        b64url(&self.auth)
    }

    /// The device's view: its key pair and auth secret (panics when the
    /// relay did not return the private key).
    pub fn recipient(&self) -> Recipient {
        Recipient {
            private_key: self.private_key.clone().expect("registration answer had no private_key"),
            public_key: self.p256dh.clone(),
            auth: self.auth.clone(),
        }
    }

    /// A [`PushRequest`] to this registration's endpoint.
    pub fn push(&self, style: Style, vapid: &Vapid) -> PushRequest {
        PushRequest::new(&self.endpoint, style, vapid, &self.p256dh, &self.auth)
    }
}

/// Polls `probe` every 20 ms until it returns `Some`; after `timeout`, panics
/// with what `explain` says (what was expected and what was seen).
pub async fn poll_until<T>(
    timeout: std::time::Duration,
    mut probe: impl FnMut() -> Option<T>,
    explain: impl FnOnce() -> String,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(done) = probe() {
            return done;
        }
        if std::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?}: {}", explain());
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Sum of the Prometheus samples of `name` whose labels include all of
/// `labels` (0 when none), from a `/metrics` text.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            if n != name || !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
                return None;
            }
            value.trim().parse::<f64>().ok()
        })
        .sum()
}
