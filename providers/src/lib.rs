//! Delivery providers for push-relay.
//!
//! A provider knows nothing of Web Push or of the store: it gets ready-made
//! [`Notification`]s and returns exactly one [`Outcome`] per notification, in
//! order. The gateway's dispatcher turns outcomes into store updates (delete,
//! reschedule, mark the registration gone).
//!
//! Providers:
//! - [`expo::Expo`]: Expo's push service (batches, tickets, receipts).
//! - [`apns::Apns`]: Apple's APNs over HTTP/2 (token or certificate auth).
//! - [`fcm::Fcm`]: Firebase Cloud Messaging HTTP v1 (service-account OAuth2).
//!
//! Each configured provider is built on its own: its own HTTP client (so its
//! own connections), credentials and tokens. Several providers of one kind
//! (e.g. two iOS apps) share nothing.

mod jwt;
mod notification;
mod payload;

pub mod apns;
pub mod expo;
pub mod fcm;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use notification::{Content, Encoding, Notification, Urgency};
pub use payload::{OpaqueData, DEFAULT_PAYLOAD_LIMIT};

/// What became of one notification handed to a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider accepted it. `receipt` is a provider handle to check later
    /// (Expo's ticket id), if the provider has such a thing.
    Delivered { receipt: Option<String> },
    /// A transient failure (429, 5xx, timeout): try again, not before `after`
    /// when the provider said so (`Retry-After`).
    Retry { after: Option<Duration>, reason: String },
    /// The device token is dead: the registration is gone for good.
    Gone { reason: String },
    /// A permanent failure for this one message (e.g. too big, rejected):
    /// dropped and counted, never retried.
    Failed { reason: String },
}

impl Outcome {
    /// A short label for metrics: `delivered`, `retry`, `gone`, `failed`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Retry { .. } => "retry",
            Outcome::Gone { .. } => "gone",
            Outcome::Failed { .. } => "failed",
        }
    }
}

/// A receipt to check with the provider some time after delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub id: String,
    pub registration: String,
}

/// What the provider said of a receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptOutcome {
    /// Delivered to the device's push service, or failed in a way that needs no action.
    Done,
    /// The device token is dead: mark the registration gone.
    Gone { reason: String },
    /// Not known yet (or the check failed transiently): ask again later.
    Pending,
}

/// Why a device token was refused at registration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(pub String);

/// One configured delivery provider.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The provider's kind (`expo`, `apns`, `fcm`), for logs and metrics.
    fn kind(&self) -> &'static str;

    /// Most notifications one [`Provider::send`] call takes.
    fn max_batch(&self) -> usize;

    /// Checks a device token's shape when an app registers or rotates it.
    fn validate_token(&self, token: &str) -> Result<(), TokenError>;

    /// Whether the notification, as this provider would send it, stays
    /// within the provider's payload limit. The gateway asks this for opaque
    /// messages and stores the body for fetching when it does not fit.
    fn fits(&self, notification: &Notification) -> bool;

    /// Sends a batch (at most [`Provider::max_batch`]); one outcome per
    /// notification, in order.
    async fn send(&self, batch: &[Notification]) -> Vec<Outcome>;

    /// How long after delivery receipts should be checked (`None`: this
    /// provider has no receipts).
    fn receipt_delay(&self) -> Option<Duration> {
        None
    }

    /// Checks receipts; one outcome per receipt, in order.
    async fn check_receipts(&self, receipts: &[Receipt]) -> Vec<ReceiptOutcome> {
        receipts.iter().map(|_| ReceiptOutcome::Done).collect()
    }
}

/// Builds the provider a config entry describes.
pub fn build(
    name: &str,
    config: &push_relay_config::Provider,
) -> Result<Arc<dyn Provider>, BuildError> {
    match config {
        push_relay_config::Provider::Expo(expo) => Ok(Arc::new(expo::Expo::new(name, expo)?)),
        push_relay_config::Provider::Apns(apns) => Ok(Arc::new(apns::Apns::new(name, apns)?)),
        push_relay_config::Provider::Fcm(fcm) => Ok(Arc::new(fcm::Fcm::new(name, fcm)?)),
    }
}

/// A provider that cannot be built from its configuration.
#[derive(Debug, thiserror::Error)]
#[error("provider `{provider}`: {message}")]
pub struct BuildError {
    pub provider: String,
    pub message: String,
}
