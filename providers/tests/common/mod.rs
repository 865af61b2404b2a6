//! Helpers shared by the provider protocol tests: notifications and building
//! a provider from TOML. The protocol servers and test credentials live in
//! the e2e harness (`push_relay_e2e::{apns, fcm, credentials}`), shared with
//! the end-to-end tests of the relay binary.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use push_relay_providers::{Content, Encoding, Notification, Provider, Urgency};

pub fn opaque(token: &str, message_id: &str) -> Notification {
    Notification {
        message_id: message_id.into(),
        registration: format!("reg-{message_id}"),
        token: token.into(),
        instance: "mastodon.social".into(),
        account: Some("@alice@mastodon.social".into()),
        urgency: Urgency::Normal,
        ttl: Duration::from_secs(3600),
        topic: None,
        content: Content::Opaque {
            encoding: Encoding::Aesgcm,
            body: vec![7; 100],
            salt: Some(vec![1; 16]),
            dh: Some(vec![4; 65]),
        },
    }
}

pub fn decrypted(token: &str, message_id: &str) -> Notification {
    Notification {
        urgency: Urgency::Low,
        topic: Some("thread-42".into()),
        ttl: Duration::from_secs(120),
        content: Content::Decrypted {
            title: "Alice boosted your post".into(),
            body: "Hello world".into(),
            notification_id: "1234".into(),
            notification_type: "reblog".into(),
            icon: None,
        },
        ..opaque(token, message_id)
    }
}

/// Builds the provider `name` from a TOML snippet, parsed as a config file
/// living in `dir` (so relative `*_file` paths resolve there).
pub fn build(dir: &Path, toml: &str, name: &str) -> Result<Arc<dyn Provider>, String> {
    let origin = dir.join("push-relay.toml");
    let config = push_relay_config::parse(toml, origin.to_str().unwrap()).map_err(|e| e.to_string())?;
    push_relay_providers::build(name, &config.providers[name]).map_err(|e| e.to_string())
}

#[allow(unused_imports)]
pub use push_relay_e2e::credentials::{p256_key, pkcs8_pem, rsa_key, unix_now, Pki};
