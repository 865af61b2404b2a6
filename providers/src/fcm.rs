//! Firebase Cloud Messaging, HTTP v1 API, directly (no Expo in between).
//!
//! Protocol (firebase.google.com, "Send a message using FCM HTTP v1 API"):
//! - `POST {base}/v1/projects/{project_id}/messages:send` with
//!   `{"message": {"token", "android": {"priority", "ttl", "collapse_key"},
//!   "data": {...}, "notification": {...}}}`, one message per request;
//!   every `data` value must be a string. `200` answers `{"name": ...}`.
//! - Errors are google.rpc statuses: `{"error": {"code", "message",
//!   "status", "details": [{"@type":
//!   "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode"}]}}`.
//!   `UNREGISTERED` (404) and an `INVALID_ARGUMENT` about the registration
//!   token mean the token is dead; `QUOTA_EXCEEDED` (429), `UNAVAILABLE`
//!   (503) and `INTERNAL` (500) are transient, with an optional
//!   `Retry-After`.
//! - Requests carry an OAuth2 access token obtained with the service
//!   account's key (RFC 7523 JWT-bearer grant at its `token_uri`); it lasts
//!   about an hour. One token is shared by all requests and renewed shortly
//!   before it expires, or when FCM answers `401`, by one request at a time.
//!
//! Opaque messages are data-only: a `notification` block would be shown by
//! Android itself while the app is in the background, without the app
//! getting the chance to decrypt. Decrypted ones carry a `notification`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use crate::expo::{error_chain, retry_after, truncate};
use crate::jwt::{unix_now, JwtKey};
use crate::payload::{OpaqueData, DEFAULT_PAYLOAD_LIMIT};
use crate::{BuildError, Content, Notification, Outcome, Provider, TokenError};

/// Notifications one `send` takes.
const MAX_BATCH: usize = 1000;
/// Requests of one batch in flight at once (FCM has one message per request).
const IN_FLIGHT: usize = 100;
/// The OAuth2 scope of FCM sends.
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Lifetime asked for the assertion (Google's maximum).
const ASSERTION_LIFETIME_SECS: u64 = 3600;
/// How long a failed token request is remembered, so that a burst of sends
/// during an outage of the token endpoint does not queue up behind one
/// request after another.
const TOKEN_FAILURE_MEMORY: Duration = Duration::from_secs(5);

/// The FCM provider.
pub struct Fcm {
    name: String,
    client: reqwest::Client,
    send_url: String,
    placeholder_title: String,
    placeholder_body: String,
    credentials: Credentials,
}

impl Fcm {
    pub fn new(name: &str, config: &push_relay_config::Fcm) -> Result<Fcm, BuildError> {
        let fail = |message: String| BuildError { provider: name.to_string(), message };
        let account = &config.service_account;
        let key = JwtKey::rs256_from_pem(account.private_key.expose()).ok_or_else(|| {
            fail(format!(
                "service_account_file {}: private_key is not an RSA private key (PEM) of at least 2048 bits",
                account.path.display()
            ))
        })?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs))
            .user_agent(concat!("push-relay/", env!("CARGO_PKG_VERSION")))
            .http2_keep_alive_interval(Some(Duration::from_secs(60)))
            .build()
            .map_err(|e| fail(format!("cannot build the HTTP client: {}", error_chain(&e))))?;
        let base = config.base_url.as_str().trim_end_matches('/');
        let credentials = Credentials {
            client: client.clone(),
            key,
            client_email: account.client_email.clone(),
            token_uri: account.token_uri.to_string(),
            state: tokio::sync::Mutex::new(TokenState::default()),
        };
        // Signing fails now rather than at the first message.
        credentials.assertion().map_err(fail)?;
        Ok(Fcm {
            name: name.to_string(),
            client,
            send_url: format!("{base}/v1/projects/{}/messages:send", account.project_id),
            placeholder_title: config.placeholder_title.clone(),
            placeholder_body: config.placeholder_body.clone(),
            credentials,
        })
    }

    /// The `message` for one notification.
    fn message<'a>(&'a self, n: &'a Notification) -> FcmMessage<'a> {
        let notification = match &n.content {
            Content::Decrypted { title, body, .. } => Some(FcmNotification { title, body: (!body.is_empty()).then_some(body) }),
            Content::Opaque { .. } | Content::Fetch => None,
        };
        let mut data = string_map(&OpaqueData::of(n));
        if notification.is_none() {
            for (key, value) in [("placeholder_title", &self.placeholder_title), ("placeholder_body", &self.placeholder_body)] {
                if !value.is_empty() {
                    data.insert(key.to_string(), value.clone());
                }
            }
        }
        FcmMessage {
            token: &n.token,
            android: Android {
                priority: if n.urgency.is_immediate() { "HIGH" } else { "NORMAL" },
                ttl: format!("{}s", n.ttl.as_secs()),
                collapse_key: n.topic.as_deref().filter(|t| !t.is_empty()),
            },
            data,
            notification,
        }
    }

    async fn send_one(&self, n: &Notification) -> Outcome {
        let body = Envelope { message: self.message(n) };
        let mut token = match self.credentials.token(None).await {
            Ok(t) => t,
            Err(e) => return retry(None, e),
        };
        let mut renewed = false;
        loop {
            let response = match self.client.post(&self.send_url).bearer_auth(&token).json(&body).send().await {
                Ok(r) => r,
                Err(e) => return retry(None, format!("fcm request failed: {}", error_chain(&e))),
            };
            let status = response.status();
            if status.is_success() {
                return Outcome::Delivered { receipt: None };
            }
            // The access token was revoked or expired early: renew it
            // (once for all the requests that saw it fail) and try again.
            if status == StatusCode::UNAUTHORIZED && !renewed {
                renewed = true;
                match self.credentials.token(Some(&token)).await {
                    Ok(fresh) => token = fresh,
                    Err(e) => return retry(None, e),
                }
                continue;
            }
            let after = retry_after(response.headers());
            let text = response.text().await.unwrap_or_default();
            let outcome = classify(status, &text, after);
            if matches!(status.as_u16(), 401 | 403) {
                tracing::warn!(provider = %self.name, "fcm refused the credentials: {}", outcome_reason(&outcome));
            }
            return outcome;
        }
    }
}

/// The data fields as FCM wants them: every value a string (`fetch: true`
/// becomes `"true"`).
fn string_map(data: &OpaqueData<'_>) -> BTreeMap<String, String> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(data) else {
        return BTreeMap::new();
    };
    fields
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect()
}

/// A failed send's status and google.rpc error body → what to do with it.
fn classify(status: StatusCode, body: &str, after: Option<Duration>) -> Outcome {
    let error = serde_json::from_str::<ErrorEnvelope>(body).map(|e| e.error).unwrap_or_default();
    let code = error.fcm_error_code().unwrap_or(&error.status).to_string();
    let reason = format!("fcm answered {} {code} {}", status.as_u16(), truncate(&error.message, 200)).trim_end().to_string();
    let reason = if error.message.is_empty() && code.is_empty() {
        format!("fcm answered {} {}", status.as_u16(), truncate(body, 200)).trim_end().to_string()
    } else {
        reason
    };
    match (status.as_u16(), code.as_str()) {
        // A 404 counts only as FCM's own answer, so that a wrong base_url
        // (a web server's 404 page) cannot mark every registration gone.
        (_, "UNREGISTERED") | (404, "NOT_FOUND") => Outcome::Gone { reason },
        (400, "INVALID_ARGUMENT") if error.concerns_token() => Outcome::Gone { reason },
        (429, _) | (408, _) | (_, "QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL") => retry(after, reason),
        (s, _) if s >= 500 => retry(after, reason),
        // Refused credentials (still 401 after a renewal, or a service
        // account without the FCM permission): the operator's to fix; keep
        // the messages until their TTL rather than drop them all.
        (401, _) | (403, "PERMISSION_DENIED" | "THIRD_PARTY_AUTH_ERROR") => retry(after, reason),
        _ => Outcome::Failed { reason },
    }
}

fn outcome_reason(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Retry { reason, .. } | Outcome::Gone { reason } | Outcome::Failed { reason } => reason,
        Outcome::Delivered { .. } => "",
    }
}

fn retry(after: Option<Duration>, reason: String) -> Outcome {
    Outcome::Retry { after, reason }
}

#[derive(Serialize)]
struct Envelope<'a> {
    message: FcmMessage<'a>,
}

#[derive(Serialize)]
struct FcmMessage<'a> {
    token: &'a str,
    android: Android<'a>,
    data: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification: Option<FcmNotification<'a>>,
}

#[derive(Serialize)]
struct Android<'a> {
    priority: &'static str,
    ttl: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    collapse_key: Option<&'a str>,
}

#[derive(Serialize)]
struct FcmNotification<'a> {
    title: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
}

#[derive(Deserialize, Default)]
struct ErrorEnvelope {
    #[serde(default)]
    error: RpcError,
}

#[derive(Deserialize, Default)]
struct RpcError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<serde_json::Value>,
}

impl RpcError {
    /// `errorCode` of the `FcmError` detail, the most precise code there is.
    fn fcm_error_code(&self) -> Option<&str> {
        self.details
            .iter()
            .filter(|d| d["@type"].as_str().is_some_and(|t| t.ends_with("google.firebase.fcm.v1.FcmError")))
            .find_map(|d| d["errorCode"].as_str())
    }

    /// Whether an INVALID_ARGUMENT is about the registration token (a dead
    /// or malformed token) rather than the rest of the message: its message
    /// says so, or a `BadRequest` field violation names `message.token`.
    fn concerns_token(&self) -> bool {
        let about_token = |text: &str| text.to_ascii_lowercase().contains("registration token");
        about_token(&self.message)
            || self.details.iter().any(|d| {
                d["fieldViolations"].as_array().is_some_and(|violations| {
                    violations.iter().any(|v| {
                        v["field"].as_str() == Some("message.token") || v["description"].as_str().is_some_and(about_token)
                    })
                })
            })
    }
}

/// The service account's OAuth2 access token, shared by every request.
struct Credentials {
    client: reqwest::Client,
    key: JwtKey,
    client_email: String,
    token_uri: String,
    /// A tokio mutex: held across the token request, so that one request
    /// renews the token while the others wait for it.
    state: tokio::sync::Mutex<TokenState>,
}

#[derive(Default)]
struct TokenState {
    token: Option<AccessToken>,
    /// The last failed renewal and when, see [`TOKEN_FAILURE_MEMORY`].
    failure: Option<(Instant, String)>,
}

struct AccessToken {
    value: Arc<str>,
    /// Renew after this (shortly before `expires_in` runs out).
    renew_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default = "default_expires_in")]
    expires_in: u64,
}

fn default_expires_in() -> u64 {
    ASSERTION_LIFETIME_SECS
}

impl Credentials {
    /// A valid access token other than `stale` (the one a request just saw
    /// refused, if any): the cached one, or a new one.
    async fn token(&self, stale: Option<&str>) -> Result<Arc<str>, String> {
        let mut state = self.state.lock().await;
        if let Some(t) = &state.token {
            if Instant::now() < t.renew_at && stale != Some(&*t.value) {
                return Ok(t.value.clone());
            }
        }
        if let Some((at, error)) = &state.failure {
            if at.elapsed() < TOKEN_FAILURE_MEMORY {
                return Err(error.clone());
            }
        }
        match self.fetch().await {
            Ok(token) => {
                let value = token.value.clone();
                state.token = Some(token);
                state.failure = None;
                Ok(value)
            }
            Err(e) => {
                state.failure = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// The signed JWT-bearer assertion (RFC 7523).
    fn assertion(&self) -> Result<String, String> {
        let iat = unix_now();
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME_SECS,
        });
        self.key.sign(&serde_json::json!({}), &claims)
    }

    async fn fetch(&self) -> Result<AccessToken, String> {
        let assertion = self.assertion()?;
        let asked = Instant::now();
        let response = self
            .client
            .post(&self.token_uri)
            .form(&[("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", &assertion)])
            .send()
            .await
            .map_err(|e| format!("fcm token request failed: {}", error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(format!("fcm token endpoint answered {status}: {}", truncate(&text, 300)));
        }
        let token: TokenResponse = response
            .json()
            .await
            .map_err(|e| format!("fcm token endpoint answered an unreadable body: {e}"))?;
        let lifetime = Duration::from_secs(token.expires_in);
        // Renew 5 minutes before expiry (or halfway, for short-lived tokens).
        let margin = (lifetime / 2).min(Duration::from_secs(300));
        Ok(AccessToken { value: token.access_token.into(), renew_at: asked + lifetime - margin })
    }
}

#[async_trait]
impl Provider for Fcm {
    fn kind(&self) -> &'static str {
        "fcm"
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    fn validate_token(&self, token: &str) -> Result<(), TokenError> {
        if !token.is_empty() && token.len() <= 4096 && !token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Ok(())
        } else {
            Err(TokenError("an FCM registration token is a non-empty string without spaces".to_string()))
        }
    }

    fn fits(&self, notification: &Notification) -> bool {
        // FCM's 4096-byte limit is on the payload the device gets: `data`
        // and `notification`.
        let message = self.message(notification);
        let size = serde_json::to_vec(&(&message.data, &message.notification)).map_or(usize::MAX, |p| p.len());
        size <= DEFAULT_PAYLOAD_LIMIT
    }

    async fn send(&self, batch: &[Notification]) -> Vec<Outcome> {
        let Some((first, rest)) = batch.split_first() else {
            return Vec::new();
        };
        // The first request alone: it gets the access token and sets up the
        // connection (HTTP/2 when the server offers it), which the others
        // then share instead of each opening their own.
        let mut outcomes = Vec::with_capacity(batch.len());
        outcomes.push(self.send_one(first).await);
        // (Futures collected first: a closure inside the stream type trips
        // the `Send` check of `async_trait`.)
        let others: Vec<_> = rest.iter().map(|n| self.send_one(n)).collect();
        let others: Vec<Outcome> = futures::stream::iter(others).buffered(IN_FLIGHT).collect().await;
        outcomes.extend(others);
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Encoding, Urgency};
    use push_relay_config::{Secret, ServiceAccount};

    fn fcm() -> Fcm {
        let key = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        let config = push_relay_config::Fcm {
            service_account: ServiceAccount {
                path: "sa.json".into(),
                project_id: "demo".into(),
                client_email: "relay@demo.iam.gserviceaccount.com".into(),
                private_key: Secret::new(String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap()),
                token_uri: "https://oauth2.googleapis.com/token".parse().unwrap(),
            },
            base_url: "https://fcm.googleapis.com".parse().unwrap(),
            placeholder_title: "New notification".into(),
            placeholder_body: String::new(),
            timeout_secs: 30,
        };
        Fcm::new("android", &config).unwrap()
    }

    fn notification(content: Content) -> Notification {
        Notification {
            message_id: "m1".into(),
            registration: "r1".into(),
            token: "fcm-token:APA91b".into(),
            instance: "mastodon.social".into(),
            account: Some("@alice@mastodon.social".into()),
            urgency: Urgency::High,
            ttl: Duration::from_secs(60),
            topic: Some("t1".into()),
            content,
        }
    }

    #[test]
    fn message_shapes() {
        let f = fcm();
        assert_eq!(f.send_url, "https://fcm.googleapis.com/v1/projects/demo/messages:send");
        let opaque = notification(Content::Opaque { encoding: Encoding::Aes128gcm, body: vec![1, 2, 3], salt: None, dh: None });
        let json = serde_json::to_value(Envelope { message: f.message(&opaque) }).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"message": {"token": "fcm-token:APA91b",
                "android": {"priority": "HIGH", "ttl": "60s", "collapse_key": "t1"},
                "data": {"registration": "r1", "instance": "mastodon.social", "account": "@alice@mastodon.social",
                    "enc": "aes128gcm", "body": "AQID", "placeholder_title": "New notification"}}})
        );
        let fetch = serde_json::to_value(f.message(&notification(Content::Fetch))).unwrap();
        assert_eq!(fetch["data"]["fetch"], "true");
        let mut decrypted = notification(Content::Decrypted {
            title: "Alice".into(),
            body: "boosted".into(),
            notification_id: "7".into(),
            notification_type: "reblog".into(),
            icon: None,
        });
        decrypted.urgency = Urgency::VeryLow;
        decrypted.topic = None;
        let json = serde_json::to_value(f.message(&decrypted)).unwrap();
        assert_eq!(json["notification"], serde_json::json!({"title": "Alice", "body": "boosted"}));
        assert_eq!(json["android"], serde_json::json!({"priority": "NORMAL", "ttl": "60s"}));
        assert_eq!(json["data"]["notification_type"], "reblog");
        assert!(json["data"].get("placeholder_title").is_none());
    }

    #[test]
    fn tokens_and_fits() {
        let f = fcm();
        assert!(f.validate_token("dGVzdA:APA91bH-x_y").is_ok());
        assert!(f.validate_token("").is_err());
        assert!(f.validate_token("a b").is_err());
        assert!(f.validate_token(&"a".repeat(4097)).is_err());
        let body = |len| notification(Content::Opaque { encoding: Encoding::Aes128gcm, body: vec![0; len], salt: None, dh: None });
        assert!(f.fits(&body(2800)));
        assert!(!f.fits(&body(3100)));
    }

    #[test]
    fn outcomes() {
        let unregistered = r#"{"error": {"code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]}}"#;
        assert!(matches!(classify(StatusCode::NOT_FOUND, unregistered, None), Outcome::Gone { .. }));
        let bad_token = r#"{"error": {"code": 400, "message": "The registration token is not a valid FCM registration token",
            "status": "INVALID_ARGUMENT",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INVALID_ARGUMENT"}]}}"#;
        assert!(matches!(classify(StatusCode::BAD_REQUEST, bad_token, None), Outcome::Gone { .. }));
        let bad_ttl = r#"{"error": {"code": 400, "message": "Invalid value at 'message.android.ttl'", "status": "INVALID_ARGUMENT",
            "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": "message.android.ttl", "description": "Invalid value"}]}]}}"#;
        assert!(matches!(classify(StatusCode::BAD_REQUEST, bad_ttl, None), Outcome::Failed { .. }));
        let by_field = r#"{"error": {"code": 400, "message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT",
            "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "message.token"}]}]}}"#;
        assert!(matches!(classify(StatusCode::BAD_REQUEST, by_field, None), Outcome::Gone { .. }));
        let after = Some(Duration::from_secs(9));
        let quota = r#"{"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "QUOTA_EXCEEDED"}]}}"#;
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, quota, after),
            Outcome::Retry { after, reason: "fcm answered 429 QUOTA_EXCEEDED quota".into() }
        );
        assert!(matches!(classify(StatusCode::SERVICE_UNAVAILABLE, "", None), Outcome::Retry { .. }));
        assert!(matches!(classify(StatusCode::NOT_FOUND, "<h1>Not Found</h1>", None), Outcome::Failed { .. }));
        assert!(matches!(classify(StatusCode::INTERNAL_SERVER_ERROR, "<html>", None), Outcome::Retry { .. }));
        let mismatch = r#"{"error": {"code": 403, "status": "PERMISSION_DENIED",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "SENDER_ID_MISMATCH"}]}}"#;
        assert!(matches!(classify(StatusCode::FORBIDDEN, mismatch, None), Outcome::Failed { .. }));
    }
}
