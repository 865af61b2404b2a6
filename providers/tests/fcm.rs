//! The FCM provider against a real FCM HTTP v1 server and OAuth2 token
//! endpoint (plain HTTP): the token endpoint checks the JWT-bearer
//! assertion's RS256 signature against the service account's public key,
//! its scope, audience and lifetime; the send endpoint checks the bearer
//! token and the message's shape, and can be scripted to answer each error.
//! The server is the e2e harness's [`MockFcm`], which the end-to-end tests of
//! the relay binary use too.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{build, decrypted, opaque, pkcs8_pem};
use push_relay_e2e::{fcm_error, MockFcm, ServiceAccount};
use push_relay_providers::{Content, Outcome, Provider, Urgency};
use serde_json::json;

const PROJECT: &str = "demo-project";
const EMAIL: &str = "relay@demo-project.iam.gserviceaccount.com";

struct Setup {
    server: MockFcm,
    provider: std::sync::Arc<dyn Provider>,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let account = ServiceAccount::generate(PROJECT, EMAIL);
    let server = MockFcm::start(&[&account]).await;
    let dir = tempfile::tempdir().unwrap();
    account.write_json(&dir.path().join("service-account.json"), &server.token_uri());
    let toml = format!(
        "[providers.android]\nkind = \"fcm\"\nservice_account_file = \"service-account.json\"\nbase_url = \"{}\"\n\
         placeholder_title = \"New post\"\ntimeout_secs = 20\n",
        server.url()
    );
    let provider = build(dir.path(), &toml, "android").unwrap();
    Setup { server, provider, _dir: dir }
}

const DELIVERED: Outcome = Outcome::Delivered { receipt: None };

#[tokio::test]
async fn message_shapes() {
    let s = setup().await;
    let mut o = opaque("tok-opaque", "m1");
    o.topic = Some("thread-1".into());
    let d = decrypted("tok-decrypted", "m2");
    let mut fetch = opaque("tok-fetch", "m3");
    fetch.content = Content::Fetch;
    fetch.urgency = Urgency::VeryLow;
    fetch.ttl = Duration::from_secs(0);
    let outcomes = s.provider.send(&[o, d, fetch]).await;
    assert_eq!(outcomes, vec![DELIVERED; 3], "{:?}", s.server.problems());
    assert!(s.server.problems().is_empty(), "{:?}", s.server.problems());
    let seen = s.server.seen();
    let message = |token: &str| seen.iter().find(|r| r.token() == token).unwrap().message.clone();
    assert_eq!(
        message("tok-opaque"),
        json!({"token": "tok-opaque",
            "android": {"priority": "HIGH", "ttl": "3600s", "collapse_key": "thread-1"},
            "data": {"registration": "reg-m1", "instance": "mastodon.social", "account": "@alice@mastodon.social",
                "enc": "aesgcm", "body": "BwcH".repeat(33) + "Bw", "salt": "AQEBAQEBAQEBAQEBAQEBAQ",
                "dh": message("tok-opaque")["data"]["dh"].clone(), "placeholder_title": "New post"}})
    );
    assert_eq!(
        message("tok-decrypted"),
        json!({"token": "tok-decrypted",
            "android": {"priority": "NORMAL", "ttl": "120s", "collapse_key": "thread-42"},
            "data": {"registration": "reg-m2", "instance": "mastodon.social", "account": "@alice@mastodon.social",
                "notification_id": "1234", "notification_type": "reblog"},
            "notification": {"title": "Alice boosted your post", "body": "Hello world"}})
    );
    assert_eq!(
        message("tok-fetch"),
        json!({"token": "tok-fetch", "android": {"priority": "NORMAL", "ttl": "0s"},
            "data": {"registration": "reg-m3", "message_id": "m3", "fetch": "true", "placeholder_title": "New post"}})
    );
    assert_eq!(s.server.token_requests(), 1);
}

#[tokio::test]
async fn one_access_token_for_a_hundred_concurrent_sends() {
    let s = setup().await;
    let batch: Vec<_> = (0..100).map(|i| opaque(&format!("tok-{i}"), &format!("m{i}"))).collect();
    let outcomes = s.provider.send(&batch).await;
    assert!(s.server.problems().is_empty(), "{:?}", s.server.problems());
    assert_eq!(outcomes, vec![DELIVERED; 100]);
    assert_eq!(s.server.token_requests(), 1, "one token request");
    assert!(s.server.max_in_flight() > 10, "sends were concurrent");
    let bearers: HashSet<String> = s.server.seen().into_iter().map(|r| r.bearer).collect();
    assert_eq!(bearers.len(), 1);
    // Reused by the next batch too.
    s.provider.send(&batch[..10]).await;
    assert_eq!(s.server.token_requests(), 1);
}

#[tokio::test]
async fn token_is_renewed_after_a_401_once_for_everyone() {
    let s = setup().await;
    assert_eq!(s.provider.send(&[opaque("tok-0", "m0")]).await, vec![DELIVERED]);
    s.server.revoke_all();
    let batch: Vec<_> = (1..=30).map(|i| opaque(&format!("tok-{i}"), &format!("m{i}"))).collect();
    let outcomes = s.provider.send(&batch).await;
    assert_eq!(outcomes, vec![DELIVERED; 30], "{:?}", s.server.problems());
    assert_eq!(s.server.token_requests(), 2, "one renewal");
    let bearers: HashSet<String> = s.server.seen().into_iter().map(|r| r.bearer).collect();
    assert_eq!(bearers, HashSet::from(["ya29.test-1".to_string(), "ya29.test-2".to_string()]));
    // A 401 that persists after the renewal is retried later, not looped on.
    s.server.reject_bearers(true);
    let outcomes = s.provider.send(&[opaque("tok-x", "mx")]).await;
    assert!(matches!(&outcomes[0], Outcome::Retry { reason, .. } if reason.contains("401")), "{outcomes:?}");
    assert_eq!(s.server.token_requests(), 3, "renewed once more, then given up");
}

#[tokio::test]
async fn token_is_renewed_shortly_before_it_expires() {
    let s = setup().await;
    s.server.set_expires_in(2);
    assert_eq!(s.provider.send(&[opaque("tok-0", "m0")]).await, vec![DELIVERED]);
    assert_eq!(s.provider.send(&[opaque("tok-1", "m1")]).await, vec![DELIVERED]);
    assert_eq!(s.server.token_requests(), 1);
    // Renewed once half of a short lifetime is gone (5 minutes before
    // expiry for real, hour-long tokens).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(s.provider.send(&[opaque("tok-2", "m2")]).await, vec![DELIVERED]);
    assert_eq!(s.server.token_requests(), 2);
}

#[tokio::test]
async fn errors_are_classified() {
    let s = setup().await;
    let invalid_token = fcm_error(
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
        Some("INVALID_ARGUMENT"),
    );
    let invalid_other = json!({"error": {"code": 400, "message": "Invalid value at 'message.data[0].value'",
        "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [{"field": "message.data[0].value", "description": "Invalid value"}]}]}});
    s.server.script("t-unregistered", vec![(404, fcm_error(404, "NOT_FOUND", "Requested entity was not found.", Some("UNREGISTERED")), None)]);
    s.server.script("t-invalid", vec![(400, invalid_token, None)]);
    s.server.script("t-quota", vec![(429, fcm_error(429, "RESOURCE_EXHAUSTED", "quota", Some("QUOTA_EXCEEDED")), Some(30))]);
    s.server.script("t-unavailable", vec![(503, fcm_error(503, "UNAVAILABLE", "busy", Some("UNAVAILABLE")), Some(10))]);
    s.server.script("t-internal", vec![(500, fcm_error(500, "INTERNAL", "oops", Some("INTERNAL")), None)]);
    s.server.script("t-bad-message", vec![(400, invalid_other, None)]);
    s.server.script(
        "t-mismatch",
        vec![(403, fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", Some("SENDER_ID_MISMATCH")), None)],
    );
    let tokens = ["t-unregistered", "t-invalid", "t-quota", "t-unavailable", "t-internal", "t-bad-message", "t-mismatch", "t-ok"];
    let batch: Vec<_> = tokens.iter().map(|t| opaque(t, t)).collect();
    let outcomes = s.provider.send(&batch).await;
    assert!(s.server.problems().is_empty(), "{:?}", s.server.problems());
    assert_eq!(outcomes[0], Outcome::Gone { reason: "fcm answered 404 UNREGISTERED Requested entity was not found.".into() });
    assert!(matches!(&outcomes[1], Outcome::Gone { reason } if reason.contains("INVALID_ARGUMENT")), "{:?}", outcomes[1]);
    assert_eq!(
        outcomes[2],
        Outcome::Retry { after: Some(Duration::from_secs(30)), reason: "fcm answered 429 QUOTA_EXCEEDED quota".into() }
    );
    assert_eq!(
        outcomes[3],
        Outcome::Retry { after: Some(Duration::from_secs(10)), reason: "fcm answered 503 UNAVAILABLE busy".into() }
    );
    assert_eq!(outcomes[4], Outcome::Retry { after: None, reason: "fcm answered 500 INTERNAL oops".into() });
    assert!(matches!(&outcomes[5], Outcome::Failed { reason } if reason.contains("message.data")), "{:?}", outcomes[5]);
    assert!(matches!(&outcomes[6], Outcome::Failed { reason } if reason.contains("SENDER_ID_MISMATCH")), "{:?}", outcomes[6]);
    assert_eq!(outcomes[7], DELIVERED);
}

#[tokio::test]
async fn a_refused_grant_is_a_retry_and_not_asked_again_per_message() {
    let s = setup().await;
    s.server.refuse_grant(true);
    let batch: Vec<_> = (0..20).map(|i| opaque(&format!("tok-{i}"), &format!("m{i}"))).collect();
    let outcomes = s.provider.send(&batch).await;
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Retry { reason, .. } if reason.contains("token endpoint answered 400"))),
        "{outcomes:?}"
    );
    assert_eq!(s.server.token_requests(), 1);
    assert!(s.server.seen().is_empty());
}

#[test]
fn build_errors() {
    let dir = tempfile::tempdir().unwrap();
    let account = json!({
        "type": "service_account", "project_id": PROJECT, "client_email": EMAIL,
        "private_key": pkcs8_pem(&common::p256_key()), "token_uri": "https://oauth2.googleapis.com/token",
    });
    std::fs::write(dir.path().join("sa.json"), account.to_string()).unwrap();
    let toml = "[providers.android]\nkind = \"fcm\"\nservice_account_file = \"sa.json\"\n";
    let Err(e) = build(dir.path(), toml, "android") else { panic!("an EC key was accepted") };
    assert_eq!(
        e,
        format!(
            "provider `android`: service_account_file {}: private_key is not an RSA private key (PEM) of at least 2048 bits",
            dir.path().join("sa.json").display()
        )
    );
}
