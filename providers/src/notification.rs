//! The outgoing notification: what the gateway hands a provider.

use std::time::Duration;

/// RFC 8030 §5.3 message urgency. A missing `Urgency` header means `Normal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Urgency {
    VeryLow,
    Low,
    #[default]
    Normal,
    High,
}

impl Urgency {
    /// Parses the header value (case-insensitive). Unknown values are `None`.
    pub fn parse(value: &str) -> Option<Urgency> {
        let value = value.trim();
        [Urgency::VeryLow, Urgency::Low, Urgency::Normal, Urgency::High]
            .into_iter()
            .find(|u| u.as_str().eq_ignore_ascii_case(value))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Urgency::VeryLow => "very-low",
            Urgency::Low => "low",
            Urgency::Normal => "normal",
            Urgency::High => "high",
        }
    }

    /// Whether providers should wake the device now (APNs priority 10, FCM
    /// HIGH, Expo `high`): `normal` and `high` do; `low` and `very-low` don't.
    pub fn is_immediate(self) -> bool {
        self >= Urgency::Normal
    }
}

/// Web Push content encodings (RFC 8188 `aes128gcm`, draft-04 `aesgcm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Aes128gcm,
    Aesgcm,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Aes128gcm => "aes128gcm",
            Encoding::Aesgcm => "aesgcm",
        }
    }

    pub fn parse(value: &str) -> Option<Encoding> {
        let value = value.trim();
        if value.eq_ignore_ascii_case("aes128gcm") {
            Some(Encoding::Aes128gcm)
        } else if value.eq_ignore_ascii_case("aesgcm") {
            Some(Encoding::Aesgcm)
        } else {
            None
        }
    }
}

/// What the device is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Decrypted mode: the fields of a Mastodon-shaped payload. The access
    /// token is not here: it was dropped when the payload was decrypted.
    Decrypted {
        title: String,
        body: String,
        notification_id: String,
        notification_type: String,
        icon: Option<String>,
    },
    /// Opaque mode: the encrypted body as the instance sent it, plus what
    /// the app needs to decrypt it (`salt` and `dh` for `aesgcm`).
    Opaque {
        encoding: Encoding,
        body: Vec<u8>,
        salt: Option<Vec<u8>>,
        dh: Option<Vec<u8>>,
    },
    /// Opaque mode, body too large for the provider: the app fetches it from
    /// `GET /v1/registrations/{id}/messages/{message_id}`.
    Fetch,
}

/// One notification for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The relay's message id (also the APNs `apns-id` and the fetch handle).
    pub message_id: String,
    pub registration: String,
    /// The provider's device token.
    pub token: String,
    pub instance: String,
    pub account: Option<String>,
    pub urgency: Urgency,
    /// Time left before the message expires.
    pub ttl: Duration,
    pub topic: Option<String>,
    pub content: Content,
}
