//! The store: registrations, the durable delivery queue, stored bodies and
//! provider receipts, behind one trait with two implementations:
//! embedded SQLite ([`sqlite`], the default) and PostgreSQL ([`postgres`]).
//!
//! The store is the only hand-off between ingress and dispatch: a push is
//! answered `201` only after [`Store::enqueue`] returned, and dispatchers
//! only read messages back through [`Store::claim`]. Claims are leases: a
//! claimed message is invisible to other claimers until its lease ends, so
//! several processes sharing one PostgreSQL database never deliver one
//! message at the same time, and a message whose claimer died is picked up
//! again when the lease runs out.

mod migrations;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod suite;

use std::sync::Arc;

use async_trait::async_trait;
use push_relay_providers::{Content, Encoding, Urgency};

pub use self::migrations::SCHEMA_VERSION;

/// Milliseconds since the Unix epoch; every timestamp in the store is one.
pub type Millis = i64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the operation.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A row that cannot be read back (a bug or a hand-edited database).
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Where a registration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationState {
    /// Created, waiting for the instance's server key.
    Pending,
    /// Confirmed: pushes are accepted.
    Active,
    /// The provider said the device token is dead.
    Gone,
    /// Deleted by the app; kept as a tombstone so its endpoint answers 410.
    Deleted,
}

impl RegistrationState {
    pub fn as_str(self) -> &'static str {
        match self {
            RegistrationState::Pending => "pending",
            RegistrationState::Active => "active",
            RegistrationState::Gone => "gone",
            RegistrationState::Deleted => "deleted",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "pending" => RegistrationState::Pending,
            "active" => RegistrationState::Active,
            "gone" => RegistrationState::Gone,
            "deleted" => RegistrationState::Deleted,
            other => return Err(StoreError::Corrupt(format!("unknown registration state {other:?}"))),
        })
    }
}

/// A device registration. Keys are raw bytes: `p256dh` the 65-byte
/// uncompressed public key, `private_key` the 32-byte scalar and `auth` the
/// 16-byte secret (both `None` once erased), `server_key` the instance's
/// VAPID public key (65 bytes, uncompressed) once confirmed.
///
/// While a registration waits for confirmation, its private key and auth
/// secret are kept only in `sealed_keys`, encrypted under a key derived
/// from the management secret (which is stored only as a hash): confirming
/// without decryption drops the blob, and any copy left in database files
/// is useless without the secret the app holds.
#[derive(Clone, PartialEq, Eq)]
pub struct Registration {
    pub id: String,
    pub secret_hash: Vec<u8>,
    pub provider: String,
    pub token: String,
    pub instance: String,
    pub account: Option<String>,
    pub p256dh: Vec<u8>,
    pub private_key: Option<Vec<u8>>,
    pub auth: Option<Vec<u8>>,
    pub server_key: Option<Vec<u8>>,
    pub allow_decrypt: bool,
    pub state: RegistrationState,
    pub created_at: Millis,
    pub last_seen_at: Millis,
    pub last_delivery_at: Option<Millis>,
    pub delivery_failures: i64,
    /// The last `Unsubscribe-URL` its instance sent (RFC 8030 draft header), kept for the app.
    pub unsubscribe_url: Option<String>,
    pub sealed_keys: Option<Vec<u8>>,
}

impl std::fmt::Debug for Registration {
    // Never print keys, secrets or the device token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id)
            .field("provider", &self.provider)
            .field("instance", &self.instance)
            .field("state", &self.state)
            .field("allow_decrypt", &self.allow_decrypt)
            .finish_non_exhaustive()
    }
}

/// A message in the delivery queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub id: String,
    pub registration: String,
    /// The registration's provider: each provider's workers claim only
    /// its messages, so one slow provider never holds up another.
    pub provider: String,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub urgency: Urgency,
    pub topic: Option<String>,
    pub content: Content,
    pub attempts: u32,
    pub next_attempt_at: Millis,
}

/// An encrypted body kept for the app to fetch (SPEC §5, large bodies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBody {
    pub message_id: String,
    pub registration: String,
    pub encoding: Encoding,
    pub body: Vec<u8>,
    pub salt: Option<Vec<u8>>,
    pub dh: Option<Vec<u8>>,
    pub expires_at: Millis,
}

/// A claimed message with what delivery needs from its registration.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub message: QueuedMessage,
    pub provider: String,
    pub token: String,
    pub instance: String,
    pub account: Option<String>,
    pub state: RegistrationState,
}

/// Provider receipts to check later: the tickets of one provider request,
/// kept as one row (one write per request instead of one per message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingReceipt {
    pub id: String,
    pub provider: String,
    pub check_at: Millis,
    /// How many times it was checked and found not ready.
    pub checks: u32,
    pub tickets: Vec<ReceiptTicket>,
}

/// One message's receipt handle.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceiptTicket {
    /// The provider's ticket id.
    pub id: String,
    pub registration: String,
    /// The device token the message went to: a receipt saying it is dead
    /// must not kill a registration whose token was rotated since.
    pub token: String,
}

fn tickets_json(tickets: &[ReceiptTicket]) -> String {
    // Serializing plain strings cannot fail.
    serde_json::to_string(tickets).unwrap_or_default()
}

fn tickets_from_json(json: &str) -> Result<Vec<ReceiptTicket>> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("receipt tickets: {e}")))
}

/// One change that dispatch makes after talking to a provider. Applied in
/// batches, in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// Delivered: remove the message.
    Delivered { message: String },
    /// Note the registration's latest delivery (an earlier `at` than the one
    /// kept changes nothing). Dispatch sends these once a second for all the
    /// registrations delivered to meanwhile, not once per message: each is
    /// a write to the registration's row.
    LastDelivery { registration: String, at: Millis },
    /// Try again at `next_attempt_at`; the lease is released.
    Retry { message: String, attempts: u32, next_attempt_at: Millis },
    /// Remove the message (failed permanently, expired, or its registration
    /// is no longer active); `failed` counts a delivery failure.
    Drop { message: String, registration: String, failed: bool },
    /// The device token is dead: the registration is gone and its queued
    /// messages are dropped — unless its token changed since (the app
    /// rotated it), in which case nothing happens.
    Gone { registration: String, token: String },
    /// Remember a receipt to check later.
    AddReceipt(PendingReceipt),
    /// A receipt was checked and needs nothing more.
    ReceiptDone { id: String },
    /// Some receipts were not ready: check `tickets` (those left) again at `check_at`.
    ReceiptLater { id: String, check_at: Millis, checks: u32, tickets: Vec<ReceiptTicket> },
}

/// Queue depth and the age of its oldest message, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub depth: u64,
    pub oldest_created_at: Option<Millis>,
}

#[async_trait]
pub trait Store: Send + Sync {
    /// A cheap round trip, for `/readyz`.
    async fn ping(&self) -> Result<()>;

    async fn insert_registration(&self, registration: &Registration) -> Result<()>;
    async fn registration(&self, id: &str) -> Result<Option<Registration>>;
    /// Writes every mutable field of the registration (token, keys,
    /// server key, allow_decrypt, state, last_seen_at, unsubscribe_url). When the new state
    /// is `Deleted` or `Gone`, the registration's queued messages, stored
    /// bodies and receipts are removed in the same transaction.
    async fn update_registration(&self, registration: &Registration) -> Result<()>;
    /// Notes that the app was seen (`GET`), touching nothing else.
    async fn touch_registration(&self, id: &str, at: Millis) -> Result<()>;
    /// Keeps the instance's latest `Unsubscribe-URL`, touching nothing else.
    async fn set_unsubscribe_url(&self, id: &str, url: &str) -> Result<()>;

    /// Queues a message durably. A message with a topic replaces a queued,
    /// unclaimed one of the same registration and topic. `body` is stored
    /// for fetching when the content is [`Content::Fetch`].
    ///
    /// `lease_until` is 0 for a message any claimer may take, or the end of
    /// a lease the caller takes on it at once: ingress hands a fresh message
    /// straight to a delivery worker of its process, and the lease keeps
    /// every claimer away from it meanwhile (a claim would only read back
    /// what that worker already holds).
    async fn enqueue(&self, message: &QueuedMessage, body: Option<&StoredBody>, lease_until: Millis) -> Result<()>;

    /// Leases up to `limit` of `provider`'s messages due at `now` until `lease_until`.
    async fn claim(&self, provider: &str, now: Millis, limit: usize, lease_until: Millis) -> Result<Vec<Claimed>>;

    /// Keeps claimed messages reserved until `lease_until`: a claimer still
    /// talking to a slow provider renews its lease so that no other claimer
    /// sends the same messages meanwhile.
    async fn extend_lease(&self, ids: &[String], lease_until: Millis) -> Result<()>;

    /// Applies dispatch results in one transaction.
    async fn apply(&self, updates: &[Update]) -> Result<()>;

    /// Takes (returns and removes) a stored body, unless expired.
    async fn take_body(&self, registration: &str, message_id: &str, now: Millis) -> Result<Option<StoredBody>>;

    /// Removes queued messages and stored bodies expired at `now`; returns
    /// how many queued messages expired.
    async fn expire(&self, now: Millis) -> Result<u64>;

    /// Leases up to `limit` receipts due at `now` until `lease_until`.
    async fn claim_receipts(&self, now: Millis, limit: usize, lease_until: Millis) -> Result<Vec<PendingReceipt>>;

    async fn queue_stats(&self) -> Result<QueueStats>;
}

/// Opens the store the configuration names and applies migrations.
pub async fn open(config: &push_relay_config::Store) -> Result<Arc<dyn Store>> {
    match &config.url {
        push_relay_config::StoreUrl::Sqlite(path) => Ok(Arc::new(sqlite::SqliteStore::open(path, config.pool_size)?)),
        push_relay_config::StoreUrl::Postgres(url) => {
            Ok(Arc::new(postgres::PostgresStore::open(url, config.pool_size).await?))
        }
    }
}

/// Decrypted-mode fields as kept in the queue (JSON; never the access token).
#[derive(serde::Serialize, serde::Deserialize)]
struct DecryptedFields {
    title: String,
    body: String,
    notification_id: String,
    notification_type: String,
    #[serde(default)]
    icon: Option<String>,
}

/// The queue's columns for a message's content:
/// (kind, encoding, body, salt, dh, fields).
type ContentColumns = (&'static str, Option<&'static str>, Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>, Option<String>);

fn content_columns(content: &Content) -> ContentColumns {
    match content {
        Content::Opaque { encoding, body, salt, dh } => {
            ("opaque", Some(encoding.as_str()), Some(body.clone()), salt.clone(), dh.clone(), None)
        }
        Content::Fetch => ("fetch", None, None, None, None, None),
        Content::Decrypted { title, body, notification_id, notification_type, icon } => {
            let fields = DecryptedFields {
                title: title.clone(),
                body: body.clone(),
                notification_id: notification_id.clone(),
                notification_type: notification_type.clone(),
                icon: icon.clone(),
            };
            // Serializing plain strings cannot fail.
            let json = serde_json::to_string(&fields).unwrap_or_default();
            ("decrypted", None, None, None, None, Some(json))
        }
    }
}

fn content_from_columns(
    kind: &str,
    encoding: Option<String>,
    body: Option<Vec<u8>>,
    salt: Option<Vec<u8>>,
    dh: Option<Vec<u8>>,
    fields: Option<String>,
) -> Result<Content> {
    match kind {
        "opaque" => Ok(Content::Opaque {
            encoding: parse_encoding(encoding.as_deref())?,
            body: body.ok_or_else(|| StoreError::Corrupt("opaque message without body".into()))?,
            salt,
            dh,
        }),
        "fetch" => Ok(Content::Fetch),
        "decrypted" => {
            let fields: DecryptedFields = serde_json::from_str(fields.as_deref().unwrap_or(""))
                .map_err(|e| StoreError::Corrupt(format!("decrypted fields: {e}")))?;
            Ok(Content::Decrypted {
                title: fields.title,
                body: fields.body,
                notification_id: fields.notification_id,
                notification_type: fields.notification_type,
                icon: fields.icon,
            })
        }
        other => Err(StoreError::Corrupt(format!("unknown content kind {other:?}"))),
    }
}

fn parse_encoding(s: Option<&str>) -> Result<Encoding> {
    s.and_then(Encoding::parse)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown encoding {s:?}")))
}

fn parse_urgency(s: &str) -> Result<Urgency> {
    Urgency::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown urgency {s:?}")))
}
