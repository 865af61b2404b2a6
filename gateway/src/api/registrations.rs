//! The app API (SPEC §3): create, confirm, patch, get and delete
//! registrations, and fetch stored message bodies.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::{header, HeaderMap, StatusCode};
use warp::reply::Response;

use super::error::ApiError;
use super::{json_response, App};
use crate::dispatch::now_ms;
use crate::keys::{self, DeviceKeys};
use crate::limits::retry_after_secs;
use crate::store::{Registration, RegistrationState};
use crate::webpush::{b64, vapid};

#[derive(Deserialize)]
struct CreateRequest {
    provider: String,
    token: String,
    instance: String,
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    server_key: Option<String>,
    #[serde(default)]
    allow_decrypt: Option<bool>,
}

#[derive(Deserialize)]
struct ConfirmRequest {
    server_key: String,
    #[serde(default)]
    allow_decrypt: Option<bool>,
}

#[derive(Deserialize)]
struct PatchRequest {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    allow_decrypt: Option<bool>,
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request("invalid_json", format!("invalid request body: {e}")))
}

/// An instance domain as apps write it: `mastodon.social`, maybe with a
/// scheme, port or trailing slash, which are dropped (the port kept).
fn normalize_instance(instance: &str) -> Result<String, ApiError> {
    let trimmed = instance.trim();
    let host = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .unwrap_or(trimmed)
        .trim_end_matches('/')
        .to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    if valid {
        Ok(host)
    } else {
        Err(ApiError::unprocessable("invalid_instance", "instance must be a domain name such as mastodon.social"))
    }
}

fn parse_server_key(key: &str) -> Result<Vec<u8>, ApiError> {
    b64::decode(key)
        .and_then(|bytes| vapid::normalize_key(&bytes))
        .ok_or_else(|| ApiError::unprocessable("invalid_server_key", "server_key must be a base64 P-256 public key (the instance's VAPID key)"))
}

impl App {
    fn validate_token(&self, provider: &str, token: &str) -> Result<(), ApiError> {
        let Some(p) = self.providers.get(provider) else {
            let known: Vec<&str> = self.providers.keys().map(String::as_str).collect();
            return Err(ApiError::unprocessable(
                "unknown_provider",
                format!("unknown provider {provider:?}; this relay has: {}", known.join(", ")),
            ));
        };
        p.validate_token(token).map_err(|e| ApiError::unprocessable("invalid_token", e.0))
    }

    /// Finds a registration and checks its management secret.
    async fn authorized(&self, id: &str, headers: &HeaderMap) -> Result<Registration, ApiError> {
        let registration = self
            .store
            .registration(id)
            .await?
            .filter(|r| r.state != RegistrationState::Deleted)
            .ok_or_else(|| ApiError::not_found("no such registration"))?;
        let presented = bearer(headers).ok_or_else(|| ApiError::unauthorized("Authorization: Bearer <secret> required"))?;
        if keys::secret_matches(presented, &registration.secret_hash) {
            Ok(registration)
        } else {
            Err(ApiError::unauthorized("wrong secret"))
        }
    }

    fn endpoint(&self, id: &str) -> String {
        format!("{}/push/{id}", self.endpoint_base)
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The registration view of SPEC §3.
fn view(r: &Registration) -> Value {
    json!({
        "id": r.id,
        "provider": r.provider,
        "instance": r.instance,
        "account": r.account,
        "confirmed": r.server_key.is_some(),
        "allow_decrypt": r.allow_decrypt,
        "created_at": rfc3339(r.created_at),
        "last_delivery_at": r.last_delivery_at.map(rfc3339),
        "delivery_failures": r.delivery_failures,
        "unsubscribe_url": r.unsubscribe_url,
        "state": match r.state {
            RegistrationState::Pending => "pending",
            RegistrationState::Active => "active",
            RegistrationState::Gone | RegistrationState::Deleted => "gone",
        },
    })
}

pub async fn create(app: Arc<App>, headers: HeaderMap, client: Option<IpAddr>, body: Vec<u8>) -> Result<Response, ApiError> {
    if let Some(key) = &app.registration_key {
        let ok = bearer(&headers).is_some_and(|presented| {
            subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), key.expose().as_bytes()).into()
        });
        if !ok {
            return Err(ApiError::unauthorized("this relay requires its registration key: Authorization: Bearer <key>"));
        }
    }
    if let Some(ip) = client {
        if let Err(refused) = app.limits.register(ip) {
            app.metrics.rate_limited.with_label_values(&[refused.limit]).inc();
            return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many registrations from this address")
                .retry_after(retry_after_secs(refused.retry_after)));
        }
    }
    let request: CreateRequest = parse_json(&body)?;
    app.validate_token(&request.provider, &request.token)?;
    let instance = normalize_instance(&request.instance)?;
    if request.account.as_ref().is_some_and(|a| a.len() > 512) {
        return Err(ApiError::unprocessable("invalid_account", "account is longer than 512 bytes"));
    }
    let server_key = request.server_key.as_deref().map(parse_server_key).transpose()?;
    let allow_decrypt = request.allow_decrypt.unwrap_or(false);
    if request.allow_decrypt.is_some() && server_key.is_none() {
        // allow_decrypt is decided at confirmation in the two-step flow.
        return Err(ApiError::unprocessable("server_key_required", "allow_decrypt at creation needs server_key too (the one-step flow)"));
    }

    let device = DeviceKeys::generate();
    let secret = keys::new_secret();
    let now = now_ms();
    let confirmed = server_key.is_some();
    // Keep the private key and auth secret only while they may be needed:
    // until confirmation, or for good when decryption is allowed.
    // Until confirmation they are sealed under the management secret, so a
    // copy left in database files is useless once confirmation drops them.
    let sealed_keys = if confirmed {
        None
    } else {
        Some(keys::seal(&secret, &device.private_key, &device.auth).ok_or_else(|| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "cannot seal the registration keys")
        })?)
    };
    let keep_keys = confirmed && allow_decrypt;
    let registration = Registration {
        id: keys::new_id(),
        secret_hash: keys::hash_secret(&secret),
        provider: request.provider,
        token: request.token,
        instance,
        account: request.account,
        p256dh: device.public_key.clone(),
        private_key: keep_keys.then(|| device.private_key.clone()),
        auth: keep_keys.then(|| device.auth.clone()),
        server_key,
        allow_decrypt,
        state: if confirmed { RegistrationState::Active } else { RegistrationState::Pending },
        created_at: now,
        last_seen_at: now,
        last_delivery_at: None,
        delivery_failures: 0,
        unsubscribe_url: None,
        sealed_keys,
    };
    app.store.insert_registration(&registration).await?;
    app.metrics.registrations.with_label_values(&["created"]).inc();
    tracing::info!(registration = %registration.id, provider = %registration.provider, instance = %registration.instance, confirmed, "registration created");
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "id": registration.id,
            "secret": secret,
            "endpoint": app.endpoint(&registration.id),
            "keys": {
                "p256dh": b64::encode(&device.public_key),
                "auth": b64::encode(&device.auth),
                "private_key": b64::encode(&device.private_key),
            },
            "confirmed": confirmed,
            "allow_decrypt": allow_decrypt,
        }),
    ))
}

pub async fn confirm(app: Arc<App>, id: String, headers: HeaderMap, body: Vec<u8>) -> Result<Response, ApiError> {
    let mut registration = app.authorized(&id, &headers).await?;
    let request: ConfirmRequest = parse_json(&body)?;
    let server_key = parse_server_key(&request.server_key)?;
    let allow_decrypt = request.allow_decrypt.unwrap_or(false);
    let keys = match (&registration.sealed_keys, &registration.private_key, &registration.auth) {
        (Some(sealed), _, _) => bearer(&headers).and_then(|secret| keys::unseal(secret, sealed)),
        (None, Some(private_key), Some(auth)) => Some((private_key.clone(), auth.clone())),
        _ => None,
    };
    if allow_decrypt && keys.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "keys_erased",
            "the private key was erased when decryption was refused; decryption cannot be allowed again",
        ));
    }
    registration.server_key = Some(server_key);
    registration.allow_decrypt = allow_decrypt;
    registration.sealed_keys = None;
    (registration.private_key, registration.auth) = match keys.filter(|_| allow_decrypt) {
        Some((private_key, auth)) => (Some(private_key), Some(auth)),
        None => (None, None),
    };
    if registration.state == RegistrationState::Pending {
        registration.state = RegistrationState::Active;
    }
    registration.last_seen_at = now_ms();
    app.store.update_registration(&registration).await?;
    app.metrics.registrations.with_label_values(&["confirmed"]).inc();
    tracing::info!(registration = %registration.id, allow_decrypt, "registration confirmed");
    Ok(json_response(StatusCode::OK, &view(&registration)))
}

pub async fn patch(app: Arc<App>, id: String, headers: HeaderMap, body: Vec<u8>) -> Result<Response, ApiError> {
    let mut registration = app.authorized(&id, &headers).await?;
    let request: PatchRequest = parse_json(&body)?;
    if let Some(token) = request.token {
        app.validate_token(&registration.provider, &token)?;
        registration.token = token;
        // A new token brings a registration whose old token died back.
        if registration.state == RegistrationState::Gone {
            registration.state = if registration.server_key.is_some() {
                RegistrationState::Active
            } else {
                RegistrationState::Pending
            };
        }
    }
    match request.allow_decrypt {
        Some(true) if !registration.allow_decrypt => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "decrypt_cannot_be_enabled",
                "allow_decrypt can only change from true to false",
            ))
        }
        Some(false) => {
            registration.allow_decrypt = false;
            registration.private_key = None;
            registration.auth = None;
        }
        _ => {}
    }
    registration.last_seen_at = now_ms();
    app.store.update_registration(&registration).await?;
    Ok(json_response(StatusCode::OK, &view(&registration)))
}

pub async fn get(app: Arc<App>, id: String, headers: HeaderMap) -> Result<Response, ApiError> {
    let mut registration = app.authorized(&id, &headers).await?;
    registration.last_seen_at = now_ms();
    app.store.touch_registration(&registration.id, registration.last_seen_at).await?;
    Ok(json_response(StatusCode::OK, &view(&registration)))
}

pub async fn delete(app: Arc<App>, id: String, headers: HeaderMap) -> Result<Response, ApiError> {
    let mut registration = app.authorized(&id, &headers).await?;
    registration.state = RegistrationState::Deleted;
    registration.token = String::new();
    registration.private_key = None;
    registration.auth = None;
    registration.sealed_keys = None;
    registration.last_seen_at = now_ms();
    app.store.update_registration(&registration).await?;
    app.metrics.registrations.with_label_values(&["deleted"]).inc();
    tracing::info!(registration = %registration.id, "registration deleted");
    Ok(warp::http::Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Vec::new().into())
        .unwrap_or_default())
}

pub async fn fetch_message(app: Arc<App>, id: String, message_id: String, headers: HeaderMap) -> Result<Response, ApiError> {
    let registration = app.authorized(&id, &headers).await?;
    let body = app
        .store
        .take_body(&registration.id, &message_id, now_ms())
        .await?
        .ok_or_else(|| ApiError::not_found("no such message (already fetched, or expired)"))?;
    let mut response = warp::http::Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_ENCODING, body.encoding.as_str());
    if let Some(salt) = &body.salt {
        response = response.header("encryption", format!("salt={}", b64::encode(salt)));
    }
    if let Some(dh) = &body.dh {
        response = response.header("crypto-key", format!("dh={}", b64::encode(dh)));
    }
    Ok(response.body(body.body.into()).unwrap_or_default())
}

/// RFC 3339 UTC time of a Unix millisecond timestamp.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn instances() {
        assert_eq!(normalize_instance("Mastodon.Social").unwrap(), "mastodon.social");
        assert_eq!(normalize_instance("https://example.org:8443/").unwrap(), "example.org:8443");
        assert!(normalize_instance("").is_err());
        assert!(normalize_instance("a b").is_err());
        assert!(normalize_instance("evil.example/path").is_err());
    }

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
