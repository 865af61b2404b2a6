//! The APNs provider against a real HTTP/2-over-TLS server that checks
//! what Apple checks: the provider JWT (ES256 signature, `kid`, `iss`,
//! `iat`) or the client certificate, every header and the JSON payload. It
//! can be scripted to answer each error APNs has. The server is the e2e
//! harness's [`MockApns`], which the end-to-end tests of the relay binary use
//! too.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{build, decrypted, opaque, p256_key, pkcs8_pem, unix_now, Pki};
use push_relay_e2e::{apns_token as token, ApnsApp, ApnsKey, MockApns};
use push_relay_providers::{Outcome, Provider, Urgency};

const TOPIC: &str = "org.example.app";
const KEY_ID: &str = "ABC123DEFG";
const TEAM_ID: &str = "TEAM123456";

/// A token-auth APNs provider talking to a fresh test server.
struct TokenSetup {
    server: MockApns,
    provider: std::sync::Arc<dyn Provider>,
    _dir: tempfile::TempDir,
}

async fn token_setup() -> TokenSetup {
    let pki = Pki::new();
    let key = ApnsKey::generate(KEY_ID, TEAM_ID);
    let server = MockApns::start(&pki, vec![ApnsApp::token("ios", &key, TOPIC)]).await;
    let dir = tempfile::tempdir().unwrap();
    key.write_p8(&dir.path().join("AuthKey_ABC123DEFG.p8"));
    pki.write_ca(&dir.path().join("test-ca.pem"));
    let toml = format!(
        "[providers.ios]\nkind = \"apns\"\nkey_file = \"AuthKey_ABC123DEFG.p8\"\nkey_id = \"{KEY_ID}\"\n\
         team_id = \"{TEAM_ID}\"\ntopic = \"{TOPIC}\"\nenvironment = \"sandbox\"\nbase_url = \"{}\"\n\
         ca_file = \"test-ca.pem\"\nplaceholder_title = \"New post\"\nplaceholder_body = \"Tap to read\"\n\
         timeout_secs = 20\n",
        server.base_url()
    );
    let provider = build(dir.path(), &toml, "ios").unwrap();
    TokenSetup { server, provider, _dir: dir }
}

#[tokio::test]
async fn opaque_and_decrypted_payloads_and_headers() {
    let s = token_setup().await;
    let mut o = opaque(&token(1), "msg-opaque");
    o.topic = Some("t".repeat(32));
    let d = decrypted(&token(2), "msg-decrypted");
    let mut fetch = opaque(&token(3), "msg-fetch");
    fetch.content = push_relay_providers::Content::Fetch;
    fetch.urgency = Urgency::VeryLow;
    let before = unix_now();
    let outcomes = s.provider.send(&[o.clone(), d, fetch]).await;
    assert_eq!(outcomes, vec![Outcome::Delivered { receipt: None }; 3], "problems: {:?}", s.server.problems());
    assert!(s.server.problems().is_empty(), "{:?}", s.server.problems());
    let seen = s.server.seen();
    let by_token = |t: usize| seen.iter().find(|r| r.token == token(t)).unwrap().clone();

    let opaque_seen = by_token(1);
    assert_eq!(opaque_seen.headers["apns-priority"], "10");
    assert_eq!(opaque_seen.headers["apns-push-type"], "alert");
    assert_eq!(opaque_seen.headers["apns-topic"], TOPIC);
    assert_eq!(opaque_seen.headers["apns-collapse-id"], "t".repeat(32));
    let expiration: u64 = opaque_seen.headers["apns-expiration"].parse().unwrap();
    assert!((before + 3600..=unix_now() + 3600).contains(&expiration), "{expiration}");
    assert_eq!(
        opaque_seen.body,
        serde_json::json!({
            "aps": {"alert": {"title": "New post", "body": "Tap to read"}, "sound": "default",
                    "mutable-content": 1, "thread-id": "@alice@mastodon.social"},
            "registration": "reg-msg-opaque", "instance": "mastodon.social", "account": "@alice@mastodon.social",
            "enc": "aesgcm", "body": "BwcH".to_string() + &"BwcH".repeat(32) + "Bw",
            "salt": "AQEBAQEBAQEBAQEBAQEBAQ", "dh": opaque_seen.body["dh"].clone(),
        })
    );
    assert_eq!(opaque_seen.body["dh"].as_str().unwrap().len(), 87);

    let decrypted_seen = by_token(2);
    assert_eq!(decrypted_seen.headers["apns-priority"], "5");
    assert_eq!(decrypted_seen.headers["apns-collapse-id"], "thread-42");
    let expiration: u64 = decrypted_seen.headers["apns-expiration"].parse().unwrap();
    assert!((before + 120..=unix_now() + 120).contains(&expiration));
    assert_eq!(
        decrypted_seen.body,
        serde_json::json!({
            "aps": {"alert": {"title": "Alice boosted your post", "body": "Hello world"}, "sound": "default",
                    "thread-id": "@alice@mastodon.social"},
            "registration": "reg-msg-decrypted", "instance": "mastodon.social", "account": "@alice@mastodon.social",
            "notification_id": "1234", "notification_type": "reblog",
        })
    );

    let fetch_seen = by_token(3);
    assert_eq!(fetch_seen.headers["apns-priority"], "5");
    assert!(!fetch_seen.headers.contains_key("apns-collapse-id"));
    assert_eq!(fetch_seen.body["fetch"], true);
    assert_eq!(fetch_seen.body["message_id"], "msg-fetch");
    assert_eq!(fetch_seen.body["aps"]["mutable-content"], 1);

    // apns-id: a UUID derived from the message id, stable across retries.
    let ids: HashSet<&String> = seen.iter().map(|r| &r.headers["apns-id"]).collect();
    assert_eq!(ids.len(), 3);
    s.provider.send(&[o]).await;
    let again = s.server.seen();
    assert_eq!(again[3].headers["apns-id"], opaque_seen.headers["apns-id"]);
    // And one provider token for all of it.
    assert_eq!(s.server.distinct_jwts().len(), 1);
}

#[tokio::test]
async fn dead_tokens_are_gone_and_other_errors_classified() {
    let s = token_setup().await;
    s.server.script(&token(1), &[(410, "Unregistered", None)]);
    s.server.script(&token(2), &[(400, "BadDeviceToken", None)]);
    s.server.script(&token(3), &[(400, "DeviceTokenNotForTopic", None)]);
    s.server.script(&token(4), &[(429, "TooManyRequests", Some(30))]);
    s.server.script(&token(5), &[(500, "InternalServerError", Some(5))]);
    s.server.script(&token(6), &[(503, "ServiceUnavailable", None)]);
    s.server.script(&token(7), &[(413, "PayloadTooLarge", None)]);
    s.server.script(&token(8), &[(400, "BadCollapseId", None)]);
    let batch: Vec<_> = (1..=9).map(|i| opaque(&token(i), &format!("m{i}"))).collect();
    let outcomes = s.provider.send(&batch).await;
    assert!(s.server.problems().is_empty(), "{:?}", s.server.problems());
    let gone = |reason: &str| Outcome::Gone { reason: reason.to_string() };
    assert_eq!(outcomes[0], gone("apns answered 410 Unregistered"));
    assert_eq!(outcomes[1], gone("apns answered 400 BadDeviceToken"));
    assert_eq!(outcomes[2], gone("apns answered 400 DeviceTokenNotForTopic"));
    assert_eq!(
        outcomes[3],
        Outcome::Retry { after: Some(Duration::from_secs(30)), reason: "apns answered 429 TooManyRequests".into() }
    );
    assert_eq!(
        outcomes[4],
        Outcome::Retry { after: Some(Duration::from_secs(5)), reason: "apns answered 500 InternalServerError".into() }
    );
    assert_eq!(outcomes[5], Outcome::Retry { after: None, reason: "apns answered 503 ServiceUnavailable".into() });
    assert_eq!(outcomes[6], Outcome::Failed { reason: "apns answered 413 PayloadTooLarge".into() });
    assert_eq!(outcomes[7], Outcome::Failed { reason: "apns answered 400 BadCollapseId".into() });
    assert_eq!(outcomes[8], Outcome::Delivered { receipt: None });
}

#[tokio::test]
async fn expired_provider_token_is_renewed_once_and_retried() {
    let s = token_setup().await;
    let warm = s.provider.send(&[opaque(&token(100), "warm")]).await;
    assert_eq!(warm, vec![Outcome::Delivered { receipt: None }]);
    let first = s.server.distinct_jwts();
    assert_eq!(first.len(), 1);
    // The server declares the current token expired while a batch of 50 is
    // in flight: every request that then sees ExpiredProviderToken asks for
    // a renewal, and exactly one new token results.
    s.server.script(&token(1), &[(403, "ExpiredProviderToken", None)]);
    let batch: Vec<_> = (1..51).map(|i| opaque(&token(i), &format!("m{i}"))).collect();
    let outcomes = s.provider.send(&batch).await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Delivered { receipt: None }), "{outcomes:?} {:?}", s.server.problems());
    let jwts = s.server.distinct_jwts();
    assert_eq!(jwts.len(), 2, "one renewal for the whole batch");
    let seen = s.server.seen();
    let for_token1: Vec<_> = seen.iter().filter(|r| r.token == token(1)).collect();
    assert_eq!(for_token1.len(), 2, "the expired attempt and the retry");
    assert!(first.contains(for_token1[0].jwt.as_ref().unwrap()));
    let fresh = for_token1[1].jwt.clone();
    assert_ne!(for_token1[0].jwt, fresh);
    // Later sends use the new token.
    s.provider.send(&[opaque(&token(51), "m51")]).await;
    assert_eq!(s.server.seen().last().unwrap().jwt, fresh);
    // An answer of ExpiredProviderToken to the fresh token too: renewed once
    // more, and if that fails again, a retry for later rather than a loop.
    let stubborn = token(60);
    s.server.script(&stubborn, &[(403, "ExpiredProviderToken", None), (403, "ExpiredProviderToken", None)]);
    let outcomes = s.provider.send(&[opaque(&stubborn, "m60")]).await;
    assert!(matches!(&outcomes[0], Outcome::Retry { reason, .. } if reason.contains("ExpiredProviderToken")), "{outcomes:?}");
    assert_eq!(s.server.seen().iter().filter(|r| r.token == stubborn).count(), 2);
}

#[tokio::test]
async fn a_thousand_concurrent_pushes_share_one_connection_and_one_token() {
    let s = token_setup().await;
    let batch: Vec<_> = (0..1000).map(|i| opaque(&token(i), &format!("m{i}"))).collect();
    assert!(s.provider.max_batch() >= 1000);
    let started = std::time::Instant::now();
    let outcomes = s.provider.send(&batch).await;
    let took = started.elapsed();
    assert!(s.server.problems().is_empty(), "{:?}", &s.server.problems()[..1]);
    assert_eq!(outcomes.len(), 1000);
    assert!(outcomes.iter().all(|o| *o == Outcome::Delivered { receipt: None }), "{:?}", outcomes.iter().find(|o| !matches!(o, Outcome::Delivered { .. })));
    assert_eq!(s.server.connections(), 1, "one TLS connection");
    assert_eq!(s.server.distinct_jwts().len(), 1, "one provider token");
    let overlap = s.server.max_in_flight();
    assert!(overlap >= 50, "requests were concurrent (at most {overlap} at once)");
    // 1000 × 5 ms one after the other would take 5 s.
    assert!(took < Duration::from_secs(4), "took {took:?}");
    // A second batch reuses the same connection.
    let outcomes = s.provider.send(&batch[..100]).await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Delivered { receipt: None }));
    assert_eq!(s.server.connections(), 1);
}

#[tokio::test]
async fn certificate_auth_presents_the_client_certificate() {
    let pki = Pki::new();
    let client = pki.client("Apple Push Services: org.example.app");
    let server = MockApns::start(&pki, vec![ApnsApp::certificate("ios-cert", &client, TOPIC)]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("apns-cert.pem"), client.cert_pem()).unwrap();
    std::fs::write(dir.path().join("apns-key.pem"), client.key_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), pki.ca_pem()).unwrap();
    let toml = format!(
        "[providers.ios-cert]\nkind = \"apns\"\ncert_file = \"apns-cert.pem\"\ncert_key_file = \"apns-key.pem\"\n\
         topic = \"{TOPIC}\"\nbase_url = \"{}\"\nca_file = \"ca.pem\"\n",
        server.base_url()
    );
    let provider = build(dir.path(), &toml, "ios-cert").unwrap();
    let batch: Vec<_> = (0..20).map(|i| decrypted(&token(i), &format!("m{i}"))).collect();
    let outcomes = provider.send(&batch).await;
    assert!(server.problems().is_empty(), "{:?}", server.problems());
    assert!(outcomes.iter().all(|o| *o == Outcome::Delivered { receipt: None }), "{outcomes:?}");
    assert!(server.seen().iter().all(|r| r.jwt.is_none() && !r.headers.contains_key("authorization")));
    assert_eq!(server.connections(), 1);

    // Without a client certificate the server refuses the handshake: the
    // provider reports a retry, not a delivery.
    let key = p256_key();
    std::fs::write(dir.path().join("k.p8"), pkcs8_pem(&key)).unwrap();
    let toml = format!(
        "[providers.ios]\nkind = \"apns\"\nkey_file = \"k.p8\"\nkey_id = \"{KEY_ID}\"\nteam_id = \"{TEAM_ID}\"\n\
         topic = \"{TOPIC}\"\nbase_url = \"{}\"\nca_file = \"ca.pem\"\n",
        server.base_url()
    );
    let without = build(dir.path(), &toml, "ios").unwrap();
    let outcomes = without.send(&[decrypted(&token(1), "x")]).await;
    assert!(matches!(outcomes[0], Outcome::Retry { .. }), "{outcomes:?}");
}

#[tokio::test]
async fn unknown_ca_is_refused() {
    // Without ca_file the test server's certificate is not trusted.
    let pki = Pki::new();
    let key = ApnsKey::generate(KEY_ID, TEAM_ID);
    let server = MockApns::start(&pki, vec![ApnsApp::token("ios", &key, TOPIC)]).await;
    let dir = tempfile::tempdir().unwrap();
    key.write_p8(&dir.path().join("k.p8"));
    let toml = format!(
        "[providers.ios]\nkind = \"apns\"\nkey_file = \"k.p8\"\nkey_id = \"{KEY_ID}\"\nteam_id = \"{TEAM_ID}\"\n\
         topic = \"{TOPIC}\"\nbase_url = \"{}\"\n",
        server.base_url()
    );
    let provider = build(dir.path(), &toml, "ios").unwrap();
    let outcomes = provider.send(&[opaque(&token(1), "m")]).await;
    assert!(matches!(&outcomes[0], Outcome::Retry { reason, .. } if reason.contains("apns request failed")), "{outcomes:?}");
    assert!(server.seen().is_empty());
}

#[test]
fn build_errors_name_the_provider_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // An RSA key where the .p8 should be.
    std::fs::write(dir.path().join("AuthKey.p8"), pkcs8_pem(&common::rsa_key())).unwrap();
    let toml = format!(
        "[providers.ios]\nkind = \"apns\"\nkey_file = \"AuthKey.p8\"\nkey_id = \"{KEY_ID}\"\nteam_id = \"{TEAM_ID}\"\n\
         topic = \"{TOPIC}\"\n"
    );
    let Err(e) = build(dir.path(), &toml, "ios") else { panic!("an RSA key was accepted") };
    assert_eq!(
        e,
        format!(
            "provider `ios`: key_file {} is not a P-256 PKCS#8 private key (the .p8 file from Apple)",
            dir.path().join("AuthKey.p8").display()
        )
    );
    // A certificate that is not one.
    std::fs::write(dir.path().join("cert.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    std::fs::write(dir.path().join("key.pem"), pkcs8_pem(&p256_key())).unwrap();
    let toml = format!("[providers.ios]\nkind = \"apns\"\ncert_file = \"cert.pem\"\ncert_key_file = \"key.pem\"\ntopic = \"{TOPIC}\"\n");
    let Err(e) = build(dir.path(), &toml, "ios") else { panic!("a broken certificate was accepted") };
    assert!(e.starts_with("provider `ios`: cert_file ") && e.ends_with("is not a PEM certificate"), "{e}");
    // A CA file without a certificate.
    std::fs::write(dir.path().join("k.p8"), pkcs8_pem(&p256_key())).unwrap();
    std::fs::write(dir.path().join("ca.pem"), "-----BEGIN NOTHING-----\n-----END NOTHING-----\n").unwrap();
    let toml = format!(
        "[providers.ios]\nkind = \"apns\"\nkey_file = \"k.p8\"\nkey_id = \"{KEY_ID}\"\nteam_id = \"{TEAM_ID}\"\n\
         topic = \"{TOPIC}\"\nca_file = \"ca.pem\"\n"
    );
    let Err(e) = build(dir.path(), &toml, "ios") else { panic!("an empty CA file was accepted") };
    assert!(e.contains("ca_file") && e.contains("holds no PEM certificate"), "{e}");
}
