//! Schema migrations, applied in order at start. Each backend has the same
//! list; an entry is never edited once released, only new ones appended.
//! The applied version is kept in `schema_version`.

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 1;

/// SQLite migrations: index i brings the schema to version i + 1.
pub(super) const SQLITE: &[&str] = &[r#"
CREATE TABLE registrations (
    id                TEXT PRIMARY KEY,
    secret_hash       BLOB NOT NULL,
    provider          TEXT NOT NULL,
    token             TEXT NOT NULL,
    instance          TEXT NOT NULL,
    account           TEXT,
    p256dh            BLOB NOT NULL,
    private_key       BLOB,
    auth              BLOB,
    server_key        BLOB,
    allow_decrypt     INTEGER NOT NULL,
    state             TEXT NOT NULL,
    created_at        INTEGER NOT NULL,
    last_seen_at      INTEGER NOT NULL,
    last_delivery_at  INTEGER,
    delivery_failures INTEGER NOT NULL DEFAULT 0,
    unsubscribe_url   TEXT,
    sealed_keys       BLOB
);
CREATE TABLE queue (
    id              TEXT PRIMARY KEY,
    registration    TEXT NOT NULL,
    provider        TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    urgency         TEXT NOT NULL,
    topic           TEXT,
    content_kind    TEXT NOT NULL,
    encoding        TEXT,
    body            BLOB,
    salt            BLOB,
    dh              BLOB,
    fields          TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX queue_due ON queue (provider, next_attempt_at);
CREATE INDEX queue_registration_topic ON queue (registration, topic);
CREATE INDEX queue_expires ON queue (expires_at);
CREATE TABLE stored_bodies (
    id           TEXT PRIMARY KEY,
    registration TEXT NOT NULL,
    encoding     TEXT NOT NULL,
    body         BLOB NOT NULL,
    salt         BLOB,
    dh           BLOB,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX stored_bodies_registration ON stored_bodies (registration);
CREATE INDEX stored_bodies_expires ON stored_bodies (expires_at);
CREATE TABLE receipts (
    id           TEXT PRIMARY KEY,
    provider     TEXT NOT NULL,
    check_at     INTEGER NOT NULL,
    checks       INTEGER NOT NULL DEFAULT 0,
    lease_until  INTEGER NOT NULL DEFAULT 0,
    tickets      TEXT NOT NULL
);
CREATE INDEX receipts_due ON receipts (check_at);
"#];

/// PostgreSQL migrations, in step with [`SQLITE`].
pub(super) const POSTGRES: &[&str] = &[r#"
CREATE TABLE registrations (
    id                TEXT PRIMARY KEY,
    secret_hash       BYTEA NOT NULL,
    provider          TEXT NOT NULL,
    token             TEXT NOT NULL,
    instance          TEXT NOT NULL,
    account           TEXT,
    p256dh            BYTEA NOT NULL,
    private_key       BYTEA,
    auth              BYTEA,
    server_key        BYTEA,
    allow_decrypt     BOOLEAN NOT NULL,
    state             TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    last_seen_at      BIGINT NOT NULL,
    last_delivery_at  BIGINT,
    delivery_failures BIGINT NOT NULL DEFAULT 0,
    unsubscribe_url   TEXT,
    sealed_keys       BYTEA
);
CREATE TABLE queue (
    id              TEXT PRIMARY KEY,
    registration    TEXT NOT NULL,
    provider        TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    urgency         TEXT NOT NULL,
    topic           TEXT,
    content_kind    TEXT NOT NULL,
    encoding        TEXT,
    body            BYTEA,
    salt            BYTEA,
    dh              BYTEA,
    fields          TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until     BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX queue_due ON queue (provider, next_attempt_at);
CREATE INDEX queue_registration_topic ON queue (registration, topic);
CREATE INDEX queue_expires ON queue (expires_at);
CREATE TABLE stored_bodies (
    id           TEXT PRIMARY KEY,
    registration TEXT NOT NULL,
    encoding     TEXT NOT NULL,
    body         BYTEA NOT NULL,
    salt         BYTEA,
    dh           BYTEA,
    expires_at   BIGINT NOT NULL
);
CREATE INDEX stored_bodies_registration ON stored_bodies (registration);
CREATE INDEX stored_bodies_expires ON stored_bodies (expires_at);
CREATE TABLE receipts (
    id           TEXT PRIMARY KEY,
    provider     TEXT NOT NULL,
    check_at     BIGINT NOT NULL,
    checks       INTEGER NOT NULL DEFAULT 0,
    lease_until  BIGINT NOT NULL DEFAULT 0,
    tickets      TEXT NOT NULL
);
CREATE INDEX receipts_due ON receipts (check_at);
"#];

#[cfg(test)]
mod tests {
    #[test]
    fn backends_in_step() {
        assert_eq!(super::SQLITE.len(), super::POSTGRES.len());
        assert_eq!(super::SQLITE.len() as i64, super::SCHEMA_VERSION);
    }
}
