//! Web Push ingress (SPEC §4): `POST /push/{id}` from instances.
//!
//! Checks run cheapest first, and each failure has exactly one answer:
//! registration (404, 410, 503) → size (413) → VAPID (401, 403) →
//! encryption framing (400) → rate limits (429) → durable enqueue (201, or
//! 503 if the store is down). Mastodon deletes a subscription on any 4xx
//! but 408/429, so anything a sender might merely write differently is
//! read leniently rather than refused.

use std::sync::Arc;
use std::time::Duration;

use push_relay_providers::{Content, Notification, Provider, Urgency};
use warp::http::{header, HeaderMap, StatusCode};
use warp::reply::Response;

use super::error::ApiError;
use super::App;
use crate::dispatch::now_ms;
use crate::keys;
use crate::limits::retry_after_secs;
use crate::store::{Claimed, QueuedMessage, Registration, RegistrationState, StoredBody};
use crate::webpush::{self, crypto, payload, vapid};

/// When a TTL-0 message must be fetched by the app, its body is kept this
/// long (the notification only says "fetch").
const TTL0_FETCH_MS: i64 = 30_000;
/// `Retry-After` when the relay is overloaded.
const OVERLOAD_RETRY_SECS: u64 = 5;
/// `Retry-After` for a registration that is not confirmed yet.
const PENDING_RETRY_SECS: u64 = 60;

fn text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Why a body could not be read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    TooLarge,
    /// The connection broke mid-body: never queue a truncated message.
    Unreadable,
}

pub async fn push(app: Arc<App>, id: String, headers: HeaderMap, body: Result<Vec<u8>, BodyError>) -> Result<Response, ApiError> {
    let Ok(_inflight) = app.inflight.try_acquire() else {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "the relay is overloaded, try again later")
            .retry_after(OVERLOAD_RETRY_SECS));
    };
    let registration = match app.store.registration(&id).await? {
        None => return Err(ApiError::not_found("no such registration")),
        Some(r) => r,
    };
    match registration.state {
        RegistrationState::Active => {}
        RegistrationState::Deleted => {
            return Err(ApiError::new(StatusCode::GONE, "gone", "the registration was deleted"))
        }
        RegistrationState::Gone => {
            return Err(ApiError::new(StatusCode::GONE, "gone", "the device is no longer registered with its provider"))
        }
        RegistrationState::Pending => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_confirmed",
                "the registration is not confirmed yet",
            )
            .retry_after(PENDING_RETRY_SECS))
        }
    }
    let body = match body {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is over {} bytes", webpush::MAX_BODY),
            ))
        }
        Err(BodyError::Unreadable) => {
            return Err(ApiError::bad_request("unreadable_body", "the body could not be read to its end"))
        }
    };

    // VAPID: 401 for anything unreadable or unverifiable, 403 for a valid
    // token from another key than the one confirmed.
    let unauthorized = |e: vapid::VapidError| ApiError::new(StatusCode::UNAUTHORIZED, "vapid_invalid", e.0);
    let credentials = vapid::credentials(text(&headers, "authorization"), text(&headers, "crypto-key")).map_err(unauthorized)?;
    let verified = vapid::verify(&credentials, &app.origin, now_ms() / 1000).map_err(unauthorized)?;
    if registration.server_key.as_deref() != Some(verified.key.as_slice()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "vapid_key_mismatch",
            "the VAPID key is not the server key this registration was confirmed with",
        ));
    }

    let encrypted = crypto::check(
        text(&headers, "content-encoding"),
        text(&headers, "encryption"),
        text(&headers, "crypto-key"),
        body,
    )
    .map_err(|e| ApiError::bad_request("invalid_encryption", e))?;
    let delivery = webpush::delivery(text(&headers, "ttl"), text(&headers, "urgency"), text(&headers, "topic"));
    let mut ttl = delivery.ttl.unwrap_or(app.queue.default_ttl_secs).min(app.queue.max_ttl_secs);

    if let Err(refused) = app.limits.push(&registration.instance, &registration.id) {
        app.metrics.rate_limited.with_label_values(&[refused.limit]).inc();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many pushes for this {}", refused.limit),
        )
        .retry_after(retry_after_secs(refused.retry_after)));
    }

    // Keep the instance's Unsubscribe-URL for the app (written only when it changes).
    if let Some(url) = text(&headers, "unsubscribe-url").map(str::trim).filter(|u| !u.is_empty() && u.len() <= 2048) {
        if registration.unsubscribe_url.as_deref() != Some(url) {
            app.store.set_unsubscribe_url(&registration.id, url).await?;
        }
    }

    let body_size = u32::try_from(encrypted.body.len()).unwrap_or(u32::MAX);
    let content = content(&app, &registration, encrypted);
    let now = now_ms();
    let message_id = keys::new_id();
    let mut notification = Notification {
        message_id: message_id.clone(),
        registration: registration.id.clone(),
        token: registration.token.clone(),
        instance: registration.instance.clone(),
        account: registration.account.clone(),
        urgency: delivery.urgency,
        ttl: Duration::from_secs(u64::from(ttl)),
        topic: delivery.topic,
        content,
    };
    // Filter plugins (SPEC §6), after decryption and before anything is
    // stored. A drop still answers 201: the instance must keep the
    // subscription; nothing is stored or delivered, and the metrics say so.
    if let Some(plugins) = app.plugins.as_ref().filter(|p| p.applies_to(&registration.instance)) {
        let input = plugin_input(&notification, &registration.provider, ttl, body_size);
        let decision = plugins.filter(&input).await;
        if let Some((plugin, reason)) = decision.dropped {
            app.metrics.dropped.with_label_values(&["plugin"]).inc();
            tracing::debug!(registration = %registration.id, plugin = %plugin, reason = %reason, "push dropped by a plugin");
            return Ok(created(&app, &registration.id, &message_id, ttl));
        }
        // Changes can only make delivery less intrusive.
        if let Some(urgency) = decision.urgency.map(urgency_from_plugin) {
            if urgency < notification.urgency {
                notification.urgency = urgency;
            }
        }
        if let Some(shorter) = decision.ttl.filter(|t| *t < ttl) {
            ttl = shorter;
            notification.ttl = Duration::from_secs(u64::from(ttl));
        }
    }

    // Opaque bodies too large for the provider are stored for the app to
    // fetch, and the notification only says so (SPEC §5, large bodies).
    let provider = app.providers.get(&registration.provider);
    let needs_fetch = matches!(notification.content, Content::Opaque { .. })
        && provider.is_some_and(|p| !p.fits(&notification));
    // Decrypted text too long for the provider is shortened, not lost.
    if let Some(provider) = provider {
        shorten_to_fit(provider.as_ref(), &mut notification);
    }
    let lifetime = if ttl == 0 { TTL0_FETCH_MS } else { i64::from(ttl) * 1000 };
    let mut stored_body = None;
    if needs_fetch {
        if let Content::Opaque { encoding, body, salt, dh } = std::mem::replace(&mut notification.content, Content::Fetch) {
            stored_body = Some(StoredBody {
                message_id: message_id.clone(),
                registration: registration.id.clone(),
                encoding,
                body,
                salt,
                dh,
                expires_at: now + lifetime,
            });
        }
    }

    if ttl == 0 && stored_body.is_none() {
        // One immediate attempt, never stored (RFC 8030 §5.2).
        let dispatcher = app.dispatcher.clone();
        let provider_name = registration.provider.clone();
        tokio::spawn(async move { dispatcher.send_now(&provider_name, notification).await });
    } else {
        let message = QueuedMessage {
            id: message_id.clone(),
            registration: registration.id.clone(),
            provider: registration.provider.clone(),
            created_at: now,
            expires_at: now + lifetime,
            urgency: notification.urgency,
            topic: notification.topic,
            content: notification.content,
            attempts: 0,
            next_attempt_at: now,
        };
        // Straight to a worker when its lane has room (queued under a lease,
        // so no claim takes it too); otherwise queued for a claim.
        let reservation = app.dispatcher.reserve(&registration.provider);
        let lease_until = reservation.as_ref().map_or(0, |r| r.lease_until());
        app.store.enqueue(&message, stored_body.as_ref(), lease_until).await?;
        match reservation {
            Some(reservation) => reservation.hand_off(Claimed {
                provider: registration.provider,
                token: registration.token,
                instance: registration.instance,
                account: registration.account,
                state: RegistrationState::Active,
                message,
            }),
            None => app.dispatcher.wake(&registration.provider),
        }
    }

    Ok(created(&app, &id, &message_id, ttl))
}

fn created(app: &App, registration: &str, message_id: &str, ttl: u32) -> Response {
    warp::http::Response::builder()
        .status(StatusCode::CREATED)
        .header(
            header::LOCATION,
            format!("{}/v1/registrations/{registration}/messages/{message_id}", app.endpoint_base),
        )
        .header("ttl", ttl)
        .body(Vec::new().into())
        .unwrap_or_default()
}

/// What a plugin is told. The payload fields are there only in decrypted
/// mode; the host hands them on only to plugins with `see_payload = true`.
fn plugin_input(n: &Notification, provider: &str, ttl: u32, body_size: u32) -> push_relay_plugins::Input {
    use push_relay_plugins::{Input, Payload};
    Input {
        instance: n.instance.clone(),
        registration: n.registration.clone(),
        provider: provider.to_owned(),
        urgency: urgency_to_plugin(n.urgency),
        topic: n.topic.clone(),
        ttl,
        body_size,
        payload: match &n.content {
            Content::Decrypted { title, body, notification_type, .. } => Some(Payload {
                title: title.clone(),
                body: body.clone(),
                account: n.account.clone(),
                notification_type: notification_type.clone(),
            }),
            _ => None,
        },
    }
}

fn urgency_to_plugin(u: Urgency) -> push_relay_plugins::Urgency {
    match u {
        Urgency::VeryLow => push_relay_plugins::Urgency::VeryLow,
        Urgency::Low => push_relay_plugins::Urgency::Low,
        Urgency::Normal => push_relay_plugins::Urgency::Normal,
        Urgency::High => push_relay_plugins::Urgency::High,
    }
}

fn urgency_from_plugin(u: push_relay_plugins::Urgency) -> Urgency {
    match u {
        push_relay_plugins::Urgency::VeryLow => Urgency::VeryLow,
        push_relay_plugins::Urgency::Low => Urgency::Low,
        push_relay_plugins::Urgency::Normal => Urgency::Normal,
        push_relay_plugins::Urgency::High => Urgency::High,
    }
}

/// Shortens a decrypted notification's body, then its title, to the
/// longest prefix (ending in "…") the provider takes.
fn shorten_to_fit(provider: &dyn Provider, notification: &mut Notification) {
    for field in [Field::Body, Field::Title] {
        if provider.fits(notification) {
            return;
        }
        let Some(text) = field.get(notification) else { return };
        let original: Vec<char> = text.chars().collect();
        // Binary search for the longest prefix that fits.
        let (mut fits, mut too_long) = (0usize, original.len());
        while too_long - fits > 1 {
            let mid = (fits + too_long) / 2;
            field.set(notification, original[..mid].iter().collect::<String>() + "…");
            if provider.fits(notification) {
                fits = mid;
            } else {
                too_long = mid;
            }
        }
        let shortened = if fits == 0 { String::new() } else { original[..fits].iter().collect::<String>() + "…" };
        field.set(notification, shortened);
    }
}

#[derive(Clone, Copy)]
enum Field {
    Title,
    Body,
}

impl Field {
    fn get(self, n: &Notification) -> Option<&str> {
        match (&n.content, self) {
            (Content::Decrypted { title, .. }, Field::Title) => Some(title),
            (Content::Decrypted { body, .. }, Field::Body) => Some(body),
            _ => None,
        }
    }

    fn set(self, n: &mut Notification, value: String) {
        match (&mut n.content, self) {
            (Content::Decrypted { title, .. }, Field::Title) => *title = value,
            (Content::Decrypted { body, .. }, Field::Body) => *body = value,
            _ => {}
        }
    }
}

/// What the device gets: the decrypted fields when the app allowed it and
/// the payload decrypts to JSON, the encrypted body otherwise.
fn content(app: &App, registration: &Registration, encrypted: crypto::Encrypted) -> Content {
    if registration.allow_decrypt {
        if let (Some(private_key), Some(auth)) = (&registration.private_key, &registration.auth) {
            let decrypted = crypto::decrypt(&encrypted, private_key, &registration.p256dh, auth).and_then(payload::parse);
            match decrypted {
                Some(content) => return content,
                None => {
                    app.metrics.decrypt_fallbacks.inc();
                    tracing::info!(registration = %registration.id, "payload did not decrypt to JSON; delivering it opaque");
                }
            }
        }
    }
    Content::Opaque { encoding: encrypted.encoding, body: encrypted.body, salt: encrypted.salt, dh: encrypted.dh }
}
