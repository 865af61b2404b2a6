//! Expo's push service.
//!
//! Protocol (docs.expo.dev, "Sending notifications with Expo's Push API"):
//! - `POST {base}/--/api/v2/push/send` takes a JSON array of up to 100
//!   messages and answers `{"data": [ticket, ...]}`, one ticket per message in
//!   order: `{"status": "ok", "id": "..."}` or `{"status": "error",
//!   "message": "...", "details": {"error": "DeviceNotRegistered"}}`.
//! - `POST {base}/--/api/v2/push/getReceipts` with `{"ids": [...]}` (up to
//!   1000) answers `{"data": {"<id>": receipt}}`; a receipt is shaped like a
//!   ticket. Expo advises checking receipts about 15 minutes after sending.
//! - A whole request may fail: 429 / 5xx are transient, and 400 can mean one
//!   bad message spoils its batch (e.g. `PUSH_TOO_MANY_EXPERIENCE_IDS` when
//!   tokens of several Expo projects share a request), so a refused batch is
//!   split and its messages sent one by one.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use crate::payload::{OpaqueData, DEFAULT_PAYLOAD_LIMIT};
use crate::{BuildError, Content, Notification, Outcome, Provider, Receipt, ReceiptOutcome, TokenError};

/// Expo takes at most 100 messages per send request.
const MAX_BATCH: usize = 100;
/// ... and at most 1000 ids per receipts request.
const MAX_RECEIPTS: usize = 1000;

/// The Expo provider.
pub struct Expo {
    name: String,
    client: reqwest::Client,
    send_url: String,
    receipts_url: String,
    access_token: Option<String>,
    placeholder_title: String,
    placeholder_body: String,
    receipt_delay: Duration,
}

impl Expo {
    pub fn new(name: &str, config: &push_relay_config::Expo) -> Result<Expo, BuildError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs))
            .user_agent(concat!("push-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BuildError {
                provider: name.to_string(),
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        let base = config.base_url.as_str().trim_end_matches('/');
        Ok(Expo {
            name: name.to_string(),
            client,
            send_url: format!("{base}/--/api/v2/push/send"),
            receipts_url: format!("{base}/--/api/v2/push/getReceipts"),
            access_token: config.access_token.as_ref().map(|t| t.expose().to_string()),
            placeholder_title: config.placeholder_title.clone(),
            placeholder_body: config.placeholder_body.clone(),
            receipt_delay: Duration::from_secs(config.receipt_delay_secs),
        })
    }

    /// The Expo message for one notification.
    fn message<'a>(&'a self, n: &'a Notification) -> ExpoMessage<'a> {
        let (title, body, sound, mutable_content) = match &n.content {
            Content::Decrypted { title, body, .. } => (title.as_str(), body.as_str(), Some("default"), None),
            // Opaque: a placeholder the app's notification service extension
            // replaces once it has decrypted the body.
            Content::Opaque { .. } | Content::Fetch => (
                self.placeholder_title.as_str(),
                self.placeholder_body.as_str(),
                Some("default"),
                Some(true),
            ),
        };
        ExpoMessage {
            to: &n.token,
            title,
            body: (!body.is_empty()).then_some(body),
            data: OpaqueData::of(n),
            // Expo's `high` maps to APNs priority 10 and FCM high priority.
            priority: if n.urgency.is_immediate() { "high" } else { "normal" },
            ttl: n.ttl.as_secs(),
            sound,
            mutable_content,
        }
    }

    async fn post<T: Serialize + ?Sized>(&self, url: &str, body: &T) -> Result<reqwest::Response, reqwest::Error> {
        let mut request = self.client.post(url).json(body).header("accept", "application/json");
        if let Some(token) = &self.access_token {
            request = request.bearer_auth(token);
        }
        request.send().await
    }

    /// Sends one request; on a batch-level 400 retries the messages alone.
    async fn send_chunk(&self, batch: &[Notification]) -> Vec<Outcome> {
        let messages: Vec<ExpoMessage<'_>> = batch.iter().map(|n| self.message(n)).collect();
        let response = match self.post(&self.send_url, &messages).await {
            Ok(response) => response,
            Err(e) => return all(batch, retry(None, format!("expo request failed: {}", error_chain(&e)))),
        };
        let status = response.status();
        if status == StatusCode::BAD_REQUEST && batch.len() > 1 {
            tracing::warn!(provider = %self.name, "expo refused a batch of {}; sending its messages one by one", batch.len());
            let mut outcomes = Vec::with_capacity(batch.len());
            for one in batch.chunks(1) {
                outcomes.extend(Box::pin(self.send_chunk(one)).await);
            }
            return outcomes;
        }
        if !status.is_success() {
            let after = retry_after(response.headers());
            let text = response.text().await.unwrap_or_default();
            let reason = format!("expo answered {status}: {}", truncate(&text, 300));
            return all(batch, classify_status(status, after, reason));
        }
        let tickets: TicketsResponse = match response.json().await {
            Ok(t) => t,
            Err(e) => return all(batch, retry(None, format!("expo answered an unreadable body: {e}"))),
        };
        if tickets.data.len() != batch.len() {
            // Expo promises one ticket per message; without that we cannot
            // tell which were accepted, and a retry is safer than a loss.
            return all(
                batch,
                retry(None, format!("expo answered {} tickets for {} messages", tickets.data.len(), batch.len())),
            );
        }
        tickets.data.into_iter().map(Ticket::outcome).collect()
    }
}

/// HTTP status of a whole failed request → what to do with its messages.
fn classify_status(status: StatusCode, after: Option<Duration>, reason: String) -> Outcome {
    match status.as_u16() {
        // 401/403: a missing or wrong access token is the operator's to fix;
        // keep the messages until their TTL in case it is fixed meanwhile.
        401 | 403 | 408 | 429 => retry(after, reason),
        s if s >= 500 => retry(after, reason),
        _ => Outcome::Failed { reason },
    }
}

fn retry(after: Option<Duration>, reason: String) -> Outcome {
    Outcome::Retry { after, reason }
}

fn all(batch: &[Notification], outcome: Outcome) -> Vec<Outcome> {
    vec![outcome; batch.len()]
}

/// `Retry-After` in seconds (the HTTP-date form is rare for APIs; treated as absent).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

pub(crate) fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// The error and its sources, for a log line that says why (e.g. "connection refused").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExpoMessage<'a> {
    to: &'a str,
    title: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
    data: OpaqueData<'a>,
    priority: &'static str,
    ttl: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sound: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mutable_content: Option<bool>,
}

#[derive(Deserialize)]
struct TicketsResponse {
    data: Vec<Ticket>,
}

/// A push ticket, or a push receipt (same shape, receipts have no `id`).
#[derive(Deserialize)]
struct Ticket {
    status: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    error: Option<String>,
}

impl Ticket {
    fn error_code(&self) -> &str {
        self.details.as_ref().and_then(|d| d.error.as_deref()).unwrap_or("")
    }

    fn reason(&self) -> String {
        format!("{} {}", self.error_code(), self.message.as_deref().unwrap_or("")).trim().to_string()
    }

    fn outcome(self) -> Outcome {
        if self.status == "ok" {
            return Outcome::Delivered { receipt: self.id };
        }
        let reason = self.reason();
        match self.error_code() {
            "DeviceNotRegistered" => Outcome::Gone { reason },
            "MessageRateExceeded" => retry(None, reason),
            // The project's FCM/APNs credentials at Expo are missing or
            // wrong: the operator's to fix, so keep trying until the TTL.
            "InvalidCredentials" => retry(None, reason),
            _ => Outcome::Failed { reason },
        }
    }
}

#[derive(Deserialize)]
struct ReceiptsResponse {
    data: std::collections::HashMap<String, Ticket>,
}

/// The shapes Expo's SDKs accept as push tokens.
fn is_expo_token(token: &str) -> bool {
    let bracketed = ["ExponentPushToken[", "ExpoPushToken["]
        .iter()
        .any(|prefix| token.starts_with(prefix) && token.ends_with(']') && token.len() > prefix.len() + 1);
    bracketed || is_uuid(token)
}

fn is_uuid(token: &str) -> bool {
    let groups: Vec<&str> = token.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_alphanumeric()))
}

#[async_trait]
impl Provider for Expo {
    fn kind(&self) -> &'static str {
        "expo"
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    fn validate_token(&self, token: &str) -> Result<(), TokenError> {
        if token.len() <= 256 && is_expo_token(token) {
            Ok(())
        } else {
            Err(TokenError(
                "an Expo push token looks like ExponentPushToken[...] or ExpoPushToken[...]".to_string(),
            ))
        }
    }

    fn fits(&self, notification: &Notification) -> bool {
        serde_json::to_vec(&self.message(notification)).map_or(false, |m| m.len() <= DEFAULT_PAYLOAD_LIMIT)
    }

    async fn send(&self, batch: &[Notification]) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(MAX_BATCH) {
            outcomes.extend(self.send_chunk(chunk).await);
        }
        outcomes
    }

    fn receipt_delay(&self) -> Option<Duration> {
        Some(self.receipt_delay)
    }

    async fn check_receipts(&self, receipts: &[Receipt]) -> Vec<ReceiptOutcome> {
        let mut outcomes = Vec::with_capacity(receipts.len());
        for chunk in receipts.chunks(MAX_RECEIPTS) {
            let ids: Vec<&str> = chunk.iter().map(|r| r.id.as_str()).collect();
            let answer = match self.post(&self.receipts_url, &serde_json::json!({ "ids": ids })).await {
                Ok(r) if r.status().is_success() => r.json::<ReceiptsResponse>().await.ok(),
                Ok(r) => {
                    tracing::warn!(provider = %self.name, status = %r.status(), "expo receipts request failed");
                    None
                }
                Err(e) => {
                    tracing::warn!(provider = %self.name, "expo receipts request failed: {}", error_chain(&e));
                    None
                }
            };
            let Some(mut answer) = answer else {
                outcomes.extend(chunk.iter().map(|_| ReceiptOutcome::Pending));
                continue;
            };
            for receipt in chunk {
                outcomes.push(match answer.data.remove(&receipt.id) {
                    None => ReceiptOutcome::Pending,
                    Some(t) if t.status == "ok" => ReceiptOutcome::Done,
                    Some(t) if t.error_code() == "DeviceNotRegistered" => ReceiptOutcome::Gone { reason: t.reason() },
                    Some(t) => {
                        tracing::warn!(provider = %self.name, registration = %receipt.registration, "expo receipt error: {}", t.reason());
                        ReceiptOutcome::Done
                    }
                });
            }
        }
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Encoding, Urgency};

    fn notification(content: Content) -> Notification {
        Notification {
            message_id: "m1".into(),
            registration: "r1".into(),
            token: "ExponentPushToken[abc]".into(),
            instance: "mastodon.social".into(),
            account: Some("@alice@mastodon.social".into()),
            urgency: Urgency::Low,
            ttl: Duration::from_secs(60),
            topic: None,
            content,
        }
    }

    fn expo() -> Expo {
        Expo::new("expo", &push_relay_config::Expo::default()).expect("default expo config builds")
    }

    #[test]
    fn tokens() {
        let e = expo();
        assert!(e.validate_token("ExponentPushToken[xxxxxxxxxxxxxxxxxxxxxx]").is_ok());
        assert!(e.validate_token("ExpoPushToken[y]").is_ok());
        assert!(e.validate_token("0c5ab3e1-7a4c-4f2e-9d3b-1234567890ab").is_ok());
        assert!(e.validate_token("ExponentPushToken[]").is_err());
        assert!(e.validate_token("hello").is_err());
        assert!(e.validate_token("").is_err());
    }

    #[test]
    fn opaque_message_shape() {
        let e = expo();
        let n = notification(Content::Opaque {
            encoding: Encoding::Aesgcm,
            body: vec![1, 2, 3],
            salt: Some(vec![4; 16]),
            dh: Some(vec![5; 65]),
        });
        let json = serde_json::to_value(e.message(&n)).unwrap();
        assert_eq!(json["to"], "ExponentPushToken[abc]");
        assert_eq!(json["title"], "New notification");
        assert_eq!(json["priority"], "normal");
        assert_eq!(json["ttl"], 60);
        assert_eq!(json["mutableContent"], true);
        assert_eq!(json["data"]["enc"], "aesgcm");
        assert_eq!(json["data"]["body"], "AQID");
        assert_eq!(json["data"]["registration"], "r1");
        assert_eq!(json["data"]["instance"], "mastodon.social");
        assert_eq!(json["data"]["account"], "@alice@mastodon.social");
        assert_eq!(json["data"]["salt"].as_str().unwrap().len(), 22);
        assert!(json.get("body").is_none());
    }

    #[test]
    fn fetch_and_fits() {
        let e = expo();
        let small = notification(Content::Opaque { encoding: Encoding::Aes128gcm, body: vec![0; 2000], salt: None, dh: None });
        assert!(e.fits(&small));
        let big = notification(Content::Opaque { encoding: Encoding::Aes128gcm, body: vec![0; 4000], salt: None, dh: None });
        assert!(!e.fits(&big));
        let fetch = notification(Content::Fetch);
        let json = serde_json::to_value(e.message(&fetch)).unwrap();
        assert_eq!(json["data"], serde_json::json!({"registration": "r1", "message_id": "m1", "fetch": true}));
    }

    #[test]
    fn ticket_outcomes() {
        let t: Ticket = serde_json::from_str(r#"{"status":"error","message":"x","details":{"error":"DeviceNotRegistered"}}"#).unwrap();
        assert!(matches!(t.outcome(), Outcome::Gone { .. }));
        let t: Ticket = serde_json::from_str(r#"{"status":"ok","id":"abc"}"#).unwrap();
        assert_eq!(t.outcome(), Outcome::Delivered { receipt: Some("abc".into()) });
        let t: Ticket = serde_json::from_str(r#"{"status":"error","message":"big","details":{"error":"MessageTooBig"}}"#).unwrap();
        assert!(matches!(t.outcome(), Outcome::Failed { .. }));
        assert!(matches!(classify_status(StatusCode::TOO_MANY_REQUESTS, None, String::new()), Outcome::Retry { .. }));
        assert!(matches!(classify_status(StatusCode::BAD_GATEWAY, None, String::new()), Outcome::Retry { .. }));
        assert!(matches!(classify_status(StatusCode::NOT_FOUND, None, String::new()), Outcome::Failed { .. }));
    }
}
