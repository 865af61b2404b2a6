//! Apple Push Notification service, directly (no Expo in between).
//!
//! Protocol (developer.apple.com, "Sending notification requests to APNs"):
//! - HTTP/2 only: `POST {base}/3/device/{hex token}` with a JSON payload of
//!   at most 4096 bytes and the headers `apns-topic` (bundle id),
//!   `apns-push-type`, `apns-priority`, `apns-expiration`,
//!   `apns-collapse-id` and `apns-id` (a UUID). `200` means accepted; an
//!   error is answered with `{"reason": "..."}`.
//! - Authentication is either a provider token (`authorization: bearer
//!   <JWT>`, ES256 with the team's `.p8` key, claims `iss` = team id and
//!   `iat`, header `kid` = key id) or a TLS client certificate. Apple wants
//!   the token renewed no more often than every 20 minutes and refuses one
//!   older than 60 (`403 ExpiredProviderToken`): one token is minted per
//!   provider and renewed after 50 minutes, never per request.
//! - One HTTP/2 connection carries many concurrent streams, which is how
//!   Apple wants volume sent: a batch's notifications go out concurrently
//!   over the provider's single connection.
//!
//! Connection sharing: the client speaks HTTP/2 with prior knowledge, so its
//! pool knows before connecting that a connection can be shared. While one
//! connection to a host is being set up, every other request waits for it
//! instead of opening its own (with ALPN negotiation, the pool would only
//! learn after the TLS handshake, and a burst of requests on a cold client
//! would each open a connection).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::StatusCode;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::expo::{error_chain, retry_after, truncate};
use crate::jwt::{unix_now, JwtKey};
use crate::payload::{OpaqueData, DEFAULT_PAYLOAD_LIMIT};
use crate::{BuildError, Content, Notification, Outcome, Provider, TokenError};

/// Notifications one `send` takes; they share one HTTP/2 connection.
const MAX_BATCH: usize = 1000;
/// Age after which the provider token is renewed: within Apple's window of
/// 20 to 60 minutes, with room for clock skew.
const TOKEN_RENEW_AFTER: Duration = Duration::from_secs(50 * 60);

/// The APNs provider.
pub struct Apns {
    name: String,
    client: reqwest::Client,
    /// `{base_url}/3/device/`, the device token goes after it.
    device_url: String,
    topic: String,
    /// `None` with certificate auth (the client certificate is in `client`).
    tokens: Option<ProviderTokens>,
    placeholder_title: String,
    placeholder_body: String,
    sound: String,
}

impl Apns {
    pub fn new(name: &str, config: &push_relay_config::Apns) -> Result<Apns, BuildError> {
        let fail = |message: String| BuildError { provider: name.to_string(), message };
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs))
            .user_agent(concat!("push-relay/", env!("CARGO_PKG_VERSION")))
            // See the module documentation: one shared connection, known
            // to be HTTP/2 before it is opened.
            .http2_prior_knowledge()
            // Apple keeps idle connections open and suggests pings to
            // check their health rather than reconnecting.
            .http2_keep_alive_interval(Some(Duration::from_secs(60)))
            .http2_keep_alive_while_idle(true)
            .pool_idle_timeout(Some(Duration::from_secs(3600)));
        if let Some(ca) = &config.ca_file {
            let certificates = reqwest::Certificate::from_pem_bundle(ca.contents.expose().as_bytes())
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| fail(format!("ca_file {} holds no PEM certificate", ca.path.display())))?;
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let tokens = match &config.auth {
            push_relay_config::ApnsAuth::Token { key, key_id, team_id } => {
                let signing_key = JwtKey::es256_from_pem(key.contents.expose()).ok_or_else(|| {
                    fail(format!(
                        "key_file {} is not a P-256 PKCS#8 private key (the .p8 file from Apple)",
                        key.path.display()
                    ))
                })?;
                let tokens = ProviderTokens {
                    key: signing_key,
                    key_id: key_id.clone(),
                    team_id: team_id.clone(),
                    current: Mutex::new(None),
                };
                // Mint the first token now: a key that cannot sign fails at start.
                tokens.get().map_err(fail)?;
                Some(tokens)
            }
            push_relay_config::ApnsAuth::Certificate { cert, key } => {
                if openssl::x509::X509::from_pem(cert.contents.expose().as_bytes()).is_err() {
                    return Err(fail(format!("cert_file {} is not a PEM certificate", cert.path.display())));
                }
                if openssl::pkey::PKey::private_key_from_pem(key.contents.expose().as_bytes()).is_err() {
                    return Err(fail(format!("cert_key_file {} is not a PEM private key", key.path.display())));
                }
                let pem = format!("{}\n{}", cert.contents.expose(), key.contents.expose());
                let identity = reqwest::Identity::from_pem(pem.as_bytes()).map_err(|e| {
                    fail(format!(
                        "cert_file {} and cert_key_file {} do not make a client identity: {}",
                        cert.path.display(),
                        key.path.display(),
                        error_chain(&e)
                    ))
                })?;
                builder = builder.identity(identity);
                None
            }
        };
        let client = builder
            .build()
            .map_err(|e| fail(format!("cannot build the HTTP client: {}", error_chain(&e))))?;
        let base = config.base_url.as_str().trim_end_matches('/');
        Ok(Apns {
            name: name.to_string(),
            client,
            device_url: format!("{base}/3/device/"),
            topic: config.topic.clone(),
            tokens,
            placeholder_title: config.placeholder_title.clone(),
            placeholder_body: config.placeholder_body.clone(),
            sound: config.sound.clone(),
        })
    }

    /// The JSON payload for one notification: `aps` plus the data fields of
    /// SPEC §5 as top-level custom keys.
    fn payload(&self, n: &Notification) -> serde_json::Value {
        let (title, body, opaque) = match &n.content {
            Content::Decrypted { title, body, .. } => (title.as_str(), body.as_str(), false),
            // Opaque: a placeholder that the app's notification service
            // extension (woken by mutable-content) decrypts and replaces.
            Content::Opaque { .. } | Content::Fetch => {
                (self.placeholder_title.as_str(), self.placeholder_body.as_str(), true)
            }
        };
        let mut alert = serde_json::Map::new();
        alert.insert("title".into(), title.into());
        if !body.is_empty() {
            alert.insert("body".into(), body.into());
        }
        let mut aps = serde_json::Map::new();
        aps.insert("alert".into(), alert.into());
        if !self.sound.is_empty() {
            aps.insert("sound".into(), self.sound.as_str().into());
        }
        if opaque {
            aps.insert("mutable-content".into(), 1.into());
        }
        // One thread per account, so that a device with several accounts
        // groups each account's notifications.
        if let Some(account) = &n.account {
            aps.insert("thread-id".into(), account.as_str().into());
        }
        let mut payload = match serde_json::to_value(OpaqueData::of(n)) {
            Ok(serde_json::Value::Object(data)) => data,
            _ => serde_json::Map::new(),
        };
        payload.insert("aps".into(), aps.into());
        payload.into()
    }

    async fn send_one(&self, n: &Notification) -> Outcome {
        let payload = match serde_json::to_vec(&self.payload(n)) {
            Ok(p) => p,
            Err(e) => return Outcome::Failed { reason: format!("cannot encode the apns payload: {e}") },
        };
        let mut jwt = match self.tokens.as_ref().map(ProviderTokens::get).transpose() {
            Ok(jwt) => jwt,
            Err(e) => return retry(None, e),
        };
        let mut renewed = false;
        loop {
            let response = match self.post(n, &payload, jwt.as_deref()).await {
                Ok(r) => r,
                Err(e) => return retry(None, format!("apns request failed: {}", error_chain(&e))),
            };
            let status = response.status();
            if status.is_success() {
                return Outcome::Delivered { receipt: None };
            }
            let after = retry_after(response.headers());
            let text = response.text().await.unwrap_or_default();
            let reason = serde_json::from_str::<ErrorBody>(&text).map(|b| b.reason).unwrap_or_default();
            // The token outlived Apple's hour (or the clocks disagree):
            // mint a new one, unless a concurrent request already did, and
            // try once more.
            if let (Some(tokens), Some(stale)) = (&self.tokens, &jwt) {
                if status == StatusCode::FORBIDDEN && reason == "ExpiredProviderToken" && !renewed {
                    renewed = true;
                    match tokens.renew(stale) {
                        Ok(fresh) => jwt = Some(fresh),
                        Err(e) => return retry(None, e),
                    }
                    continue;
                }
            }
            let reason = if reason.is_empty() { truncate(&text, 200).to_string() } else { reason };
            let outcome = classify(status, &reason, after);
            if let Outcome::Retry { .. } = outcome {
                if status == StatusCode::FORBIDDEN {
                    tracing::warn!(provider = %self.name, "apns refused the credentials: {reason}");
                }
            }
            return outcome;
        }
    }

    async fn post(&self, n: &Notification, payload: &[u8], jwt: Option<&str>) -> Result<reqwest::Response, reqwest::Error> {
        let expiration = if n.ttl.is_zero() { 0 } else { unix_now() + n.ttl.as_secs() };
        let mut request = self
            .client
            .post(format!("{}{}", self.device_url, n.token))
            .header("content-type", "application/json")
            .header("apns-topic", &self.topic)
            .header("apns-push-type", "alert")
            .header("apns-priority", if n.urgency.is_immediate() { "10" } else { "5" })
            .header("apns-expiration", expiration.to_string())
            .header("apns-id", apns_id(&n.message_id))
            .body(payload.to_vec());
        if let Some(topic) = n.topic.as_deref().filter(|t| !t.is_empty() && t.len() <= 64) {
            request = request.header("apns-collapse-id", topic);
        }
        if let Some(jwt) = jwt {
            request = request.header("authorization", format!("bearer {jwt}"));
        }
        request.send().await
    }
}

/// A failed request's status and reason → what to do with its message.
fn classify(status: StatusCode, reason: &str, after: Option<Duration>) -> Outcome {
    let text = format!("apns answered {} {reason}", status.as_u16()).trim_end().to_string();
    match (status.as_u16(), reason) {
        // The device token is no longer valid for the topic (app removed).
        (410, _) => Outcome::Gone { reason: text },
        (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => Outcome::Gone { reason: text },
        // The relay's credentials are refused: the operator's to fix, so keep
        // the messages until their TTL in case it is fixed meanwhile (as for
        // Expo's InvalidCredentials) rather than drop everything.
        (
            403,
            "ExpiredProviderToken" | "InvalidProviderToken" | "MissingProviderToken" | "BadCertificate"
            | "BadCertificateEnvironment",
        ) => retry(after, text),
        // TooManyRequests (one device too often), TooManyProviderTokenUpdates.
        (429, _) | (408, _) => retry(after, text),
        (s, _) if s >= 500 => retry(after, text),
        _ => Outcome::Failed { reason: text },
    }
}

fn retry(after: Option<Duration>, reason: String) -> Outcome {
    Outcome::Retry { after, reason }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    reason: String,
}

/// `apns-id` must be a UUID; the relay's message ids are not, so one is
/// derived: the first 16 bytes of the id's SHA-256, marked as an RFC 9562
/// version 8 (custom) UUID. The same message always gets the same apns-id.
fn apns_id(message_id: &str) -> String {
    let digest = Sha256::digest(message_id.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80; // version 8
    b[8] = (b[8] & 0x3f) | 0x80; // variant 10
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// The provider token of one team: minted once, shared by every request,
/// renewed after [`TOKEN_RENEW_AFTER`] or when APNs calls it expired.
struct ProviderTokens {
    key: JwtKey,
    key_id: String,
    team_id: String,
    current: Mutex<Option<ProviderToken>>,
}

struct ProviderToken {
    jwt: Arc<str>,
    minted: Instant,
}

impl ProviderTokens {
    /// The current token, minting one when there is none or it is due.
    fn get(&self) -> Result<Arc<str>, String> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        match &*current {
            Some(t) if t.minted.elapsed() < TOKEN_RENEW_AFTER => Ok(t.jwt.clone()),
            _ => self.mint(&mut current),
        }
    }

    /// A token other than `stale`: the current one if another request
    /// already renewed it, else a new one. So a burst of requests that all
    /// got `ExpiredProviderToken` renews the token once, not once each.
    fn renew(&self, stale: &str) -> Result<Arc<str>, String> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        match &*current {
            Some(t) if &*t.jwt != stale && t.minted.elapsed() < TOKEN_RENEW_AFTER => Ok(t.jwt.clone()),
            _ => self.mint(&mut current),
        }
    }

    fn mint(&self, current: &mut Option<ProviderToken>) -> Result<Arc<str>, String> {
        let header = serde_json::json!({ "kid": self.key_id });
        let claims = serde_json::json!({ "iss": self.team_id, "iat": unix_now() });
        let jwt: Arc<str> = self.key.sign(&header, &claims)?.into();
        *current = Some(ProviderToken { jwt: jwt.clone(), minted: Instant::now() });
        Ok(jwt)
    }
}

/// APNs device tokens: 32 bytes in hex today (64 characters); longer ones
/// are allowed for the future, up to 100 bytes.
fn is_device_token(token: &str) -> bool {
    (64..=200).contains(&token.len()) && token.len() & 1 == 0 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

#[async_trait]
impl Provider for Apns {
    fn kind(&self) -> &'static str {
        "apns"
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    fn validate_token(&self, token: &str) -> Result<(), TokenError> {
        if is_device_token(token) {
            Ok(())
        } else {
            Err(TokenError(
                "an APNs device token is hexadecimal, 64 characters for today's 32-byte tokens".to_string(),
            ))
        }
    }

    fn fits(&self, notification: &Notification) -> bool {
        serde_json::to_vec(&self.payload(notification)).is_ok_and(|p| p.len() <= DEFAULT_PAYLOAD_LIMIT)
    }

    async fn send(&self, batch: &[Notification]) -> Vec<Outcome> {
        futures::future::join_all(batch.iter().map(|n| self.send_one(n))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Encoding, Urgency};
    use push_relay_config::{ApnsAuth, ApnsEnvironment, PemFile, Secret};

    fn p8() -> String {
        let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
        let key = openssl::pkey::PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap()).unwrap();
        String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap()
    }

    fn config(key: String) -> push_relay_config::Apns {
        push_relay_config::Apns {
            auth: ApnsAuth::Token {
                key: PemFile { path: "AuthKey.p8".into(), contents: Secret::new(key) },
                key_id: "KEY1234567".into(),
                team_id: "TEAM123456".into(),
            },
            topic: "org.example.app".into(),
            environment: ApnsEnvironment::Production,
            base_url: ApnsEnvironment::Production.base_url(),
            ca_file: None,
            placeholder_title: "New notification".into(),
            placeholder_body: String::new(),
            sound: "default".into(),
            timeout_secs: 30,
        }
    }

    fn notification(content: Content) -> Notification {
        Notification {
            message_id: "m1".into(),
            registration: "r1".into(),
            token: "ab".repeat(32),
            instance: "mastodon.social".into(),
            account: Some("@alice@mastodon.social".into()),
            urgency: Urgency::Low,
            ttl: Duration::from_secs(60),
            topic: None,
            content,
        }
    }

    #[test]
    fn tokens() {
        let a = Apns::new("ios", &config(p8())).unwrap();
        assert!(a.validate_token(&"0f".repeat(32)).is_ok());
        assert!(a.validate_token(&"0F".repeat(50)).is_ok());
        assert!(a.validate_token(&"0f".repeat(101)).is_err());
        assert!(a.validate_token(&format!("{}0", "0f".repeat(32))).is_err());
        assert!(a.validate_token(&"zz".repeat(32)).is_err());
        assert!(a.validate_token("ExponentPushToken[x]").is_err());
    }

    #[test]
    fn key_must_be_p256_pkcs8() {
        let rsa = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        let rsa = String::from_utf8(rsa.private_key_to_pem_pkcs8().unwrap()).unwrap();
        let Err(e) = Apns::new("ios", &config(rsa)) else { panic!("an RSA key was accepted") };
        assert_eq!(
            e.to_string(),
            "provider `ios`: key_file AuthKey.p8 is not a P-256 PKCS#8 private key (the .p8 file from Apple)"
        );
    }

    #[test]
    fn payload_shapes() {
        let a = Apns::new("ios", &config(p8())).unwrap();
        let opaque = notification(Content::Opaque {
            encoding: Encoding::Aesgcm,
            body: vec![1, 2, 3],
            salt: Some(vec![4; 16]),
            dh: Some(vec![5; 65]),
        });
        let json = a.payload(&opaque);
        assert_eq!(
            json["aps"],
            serde_json::json!({"alert": {"title": "New notification"}, "sound": "default",
                "mutable-content": 1, "thread-id": "@alice@mastodon.social"})
        );
        assert_eq!(json["enc"], "aesgcm");
        assert_eq!(json["body"], "AQID");
        assert_eq!(json["registration"], "r1");
        assert_eq!(json["salt"].as_str().unwrap().len(), 22);
        let decrypted = notification(Content::Decrypted {
            title: "Alice".into(),
            body: "boosted".into(),
            notification_id: "7".into(),
            notification_type: "reblog".into(),
            icon: None,
        });
        let json = a.payload(&decrypted);
        assert_eq!(
            json,
            serde_json::json!({"aps": {"alert": {"title": "Alice", "body": "boosted"}, "sound": "default",
                "thread-id": "@alice@mastodon.social"},
                "registration": "r1", "instance": "mastodon.social", "account": "@alice@mastodon.social",
                "notification_id": "7", "notification_type": "reblog"})
        );
        let fetch = a.payload(&notification(Content::Fetch));
        assert_eq!(fetch["fetch"], true);
        assert_eq!(fetch["message_id"], "m1");
    }

    #[test]
    fn fits() {
        let a = Apns::new("ios", &config(p8())).unwrap();
        let body = |len| notification(Content::Opaque { encoding: Encoding::Aes128gcm, body: vec![0; len], salt: None, dh: None });
        assert!(a.fits(&body(2500)));
        assert!(!a.fits(&body(3200)));
    }

    #[test]
    fn apns_ids_are_uuids() {
        let id = apns_id("m1");
        assert_eq!(id, apns_id("m1"));
        assert_ne!(id, apns_id("m2"));
        let groups: Vec<&str> = id.split('-').collect();
        assert_eq!(groups.iter().map(|g| g.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12]);
        assert!(groups[2].starts_with('8'));
        assert!(id.bytes().all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }

    #[test]
    fn provider_token_is_reused_and_renewed_once() {
        let a = Apns::new("ios", &config(p8())).unwrap();
        let tokens = a.tokens.as_ref().unwrap();
        let first = tokens.get().unwrap();
        assert_eq!(first, tokens.get().unwrap());
        let second = tokens.renew(&first).unwrap();
        assert_ne!(first, second);
        // A second request that saw the first token expire gets the new one.
        assert_eq!(tokens.renew(&first).unwrap(), second);
        assert_eq!(tokens.get().unwrap(), second);
    }

    #[test]
    fn outcomes() {
        let gone = |s: u16, r: &str| matches!(classify(StatusCode::from_u16(s).unwrap(), r, None), Outcome::Gone { .. });
        assert!(gone(410, "Unregistered"));
        assert!(gone(400, "BadDeviceToken"));
        assert!(gone(400, "DeviceTokenNotForTopic"));
        assert!(!gone(400, "BadTopic"));
        let after = Some(Duration::from_secs(7));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", after),
            Outcome::Retry { after, reason: "apns answered 429 TooManyRequests".into() }
        );
        assert!(matches!(classify(StatusCode::SERVICE_UNAVAILABLE, "", None), Outcome::Retry { .. }));
        assert!(matches!(classify(StatusCode::FORBIDDEN, "InvalidProviderToken", None), Outcome::Retry { .. }));
        assert!(matches!(classify(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge", None), Outcome::Failed { .. }));
        assert!(matches!(classify(StatusCode::BAD_REQUEST, "BadTopic", None), Outcome::Failed { .. }));
    }
}
