//! End-to-end tests of the DIRECT providers (SPEC §5: APNs and FCM HTTP v1)
//! through the real `push-relay` binary.
//!
//! One relay serves several apps: `ios-prod` and `ios-beta` (APNs token auth,
//! each with its own `.p8` key, key id, team and bundle id), `ios-ent` (APNs
//! certificate auth) and `android` (FCM, its own service account). They talk
//! to the harness's protocol servers: [`MockApns`] (HTTP/2 over TLS, a test
//! CA given to the relay as `ca_file`; it verifies each app's JWT signature,
//! `kid`, `iss`, topic, or its client certificate) and [`MockFcm`] (OAuth2
//! JWT-bearer grant checked against the service account's key, bearer checked
//! on every send).
//!
//! What reaches the mocks is checked the way an app would: opaque bodies are
//! DECRYPTED with the keys the app got at registration.
//!
//! Build the binary first: `cargo build -p push-relay`.

use push_relay_e2e::credentials::Issued;
use push_relay_e2e::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Rate limits out of the way: these tests are about delivery.
const NO_LIMITS: &str = "per_instance = { per_second = 100000, burst = 100000 }\n\
                         per_registration = { per_second = 100000, burst = 100000 }\n\
                         registrations_per_ip = { per_minute = 100000, burst = 100000 }";

const INSTANCE: &str = "mastodon.example";
const ACCOUNT: &str = "@alice@example.social";

const PROD_TOPIC: &str = "org.example.app";
const BETA_TOPIC: &str = "org.example.app.beta";
const ENT_TOPIC: &str = "org.example.app.enterprise";
const PROJECT: &str = "demo-project";
const SA_EMAIL: &str = "relay@demo-project.iam.gserviceaccount.com";

/// Everything the relay's providers authenticate with, written to files.
struct Creds {
    dir: tempfile::TempDir,
    pki: Pki,
    prod: ApnsKey,
    beta: ApnsKey,
    ent: Issued,
    android: ServiceAccount,
}

impl Creds {
    fn new() -> Creds {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let prod = ApnsKey::generate("PRODKEY001", "TEAMPROD01");
        let beta = ApnsKey::generate("BETAKEY002", "TEAMBETA02");
        let ent = pki.client(&format!("Apple Push Services: {ENT_TOPIC}"));
        let android = ServiceAccount::generate(PROJECT, SA_EMAIL);
        pki.write_ca(&dir.path().join("test-ca.pem"));
        prod.write_p8(&dir.path().join("AuthKey_PRODKEY001.p8"));
        beta.write_p8(&dir.path().join("AuthKey_BETAKEY002.p8"));
        std::fs::write(dir.path().join("ent-cert.pem"), ent.cert_pem()).unwrap();
        std::fs::write(dir.path().join("ent-key.pem"), ent.key_pem()).unwrap();
        Creds { dir, pki, prod, beta, ent, android }
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// The apps a mock APNs accepts: the three iOS apps.
    fn apns_apps(&self) -> Vec<ApnsApp> {
        vec![
            ApnsApp::token("ios-prod", &self.prod, PROD_TOPIC),
            ApnsApp::token("ios-beta", &self.beta, BETA_TOPIC),
            ApnsApp::certificate("ios-ent", &self.ent, ENT_TOPIC),
        ]
    }

    fn ios_prod(&self, base_url: &str) -> String {
        format!(
            "[providers.ios-prod]\nkind = \"apns\"\nkey_file = \"{}\"\nkey_id = \"PRODKEY001\"\nteam_id = \"TEAMPROD01\"\n\
             topic = \"{PROD_TOPIC}\"\nbase_url = \"{base_url}\"\nca_file = \"{}\"\nplaceholder_title = \"New post\"\n\
             placeholder_body = \"Tap to read\"\ntimeout_secs = 2\n",
            self.path("AuthKey_PRODKEY001.p8"),
            self.path("test-ca.pem")
        )
    }

    fn ios_beta(&self, base_url: &str) -> String {
        format!(
            "[providers.ios-beta]\nkind = \"apns\"\nkey_file = \"{}\"\nkey_id = \"BETAKEY002\"\nteam_id = \"TEAMBETA02\"\n\
             topic = \"{BETA_TOPIC}\"\nenvironment = \"sandbox\"\nbase_url = \"{base_url}\"\nca_file = \"{}\"\ntimeout_secs = 2\n",
            self.path("AuthKey_BETAKEY002.p8"),
            self.path("test-ca.pem")
        )
    }

    fn ios_ent(&self, base_url: &str) -> String {
        format!(
            "[providers.ios-ent]\nkind = \"apns\"\ncert_file = \"{}\"\ncert_key_file = \"{}\"\ntopic = \"{ENT_TOPIC}\"\n\
             base_url = \"{base_url}\"\nca_file = \"{}\"\ntimeout_secs = 2\n",
            self.path("ent-cert.pem"),
            self.path("ent-key.pem"),
            self.path("test-ca.pem")
        )
    }

    /// The FCM provider; writes the service-account file pointing at `fcm`.
    fn android(&self, fcm: &MockFcm) -> String {
        self.android.write_json(&self.dir.path().join("service-account.json"), &fcm.token_uri());
        format!(
            "[providers.android]\nkind = \"fcm\"\nservice_account_file = \"{}\"\nbase_url = \"{}\"\n\
             placeholder_title = \"New post\"\ntimeout_secs = 2\n",
            self.path("service-account.json"),
            fcm.url()
        )
    }
}

struct Env {
    apns: MockApns,
    fcm: MockFcm,
    relay: Relay,
    app: AppClient,
    vapid: Vapid,
    http: reqwest::Client,
    _creds: Creds,
}

/// A relay with ios-prod, ios-beta, ios-ent (one mock APNs) and android (a
/// mock FCM).
async fn start() -> Env {
    start_with(|c| c).await
}

async fn start_with(tune: impl FnOnce(RelayConfig) -> RelayConfig) -> Env {
    let creds = Creds::new();
    let apns = MockApns::start(&creds.pki, creds.apns_apps()).await;
    let fcm = MockFcm::start(&[&creds.android]).await;
    let cfg = RelayConfig::new()
        .fast_queue()
        .limits(NO_LIMITS)
        .providers(&creds.ios_prod(&apns.base_url()))
        .providers(&creds.ios_beta(&apns.base_url()))
        .providers(&creds.ios_ent(&apns.base_url()))
        .providers(&creds.android(&fcm));
    let relay = Relay::start(tune(cfg)).await;
    let app = relay.app();
    Env { apns, fcm, relay, app, vapid: Vapid::generate(), http: reqwest::Client::new(), _creds: creds }
}

impl Env {
    async fn register(&self, provider: &str, token: &str, allow_decrypt: bool) -> Registration {
        register(&self.app, provider, token, &self.vapid, allow_decrypt).await
    }

    async fn push(&self, req: PushRequest) -> PushResponse {
        req.send(&self.http).await
    }

    async fn push_ok(&self, req: PushRequest) -> PushResponse {
        let r = self.push(req).await;
        assert_eq!(r.status, 201, "push answered {} {}", r.status, r.body);
        r
    }

    fn assert_no_problems(&self) {
        assert!(self.apns.problems().is_empty(), "mock APNs refused requests: {:?}", self.apns.problems());
        assert!(self.fcm.problems().is_empty(), "mock FCM refused requests: {:?}", self.fcm.problems());
    }
}

async fn register(app: &AppClient, provider: &str, token: &str, vapid: &Vapid, allow_decrypt: bool) -> Registration {
    let reg = app
        .register_ok(provider, token, INSTANCE, Some(&vapid.public_key_b64()), Some(allow_decrypt))
        .await;
    assert!(reg.confirmed, "{}", reg.raw);
    reg
}

/// A random 64-hex-character APNs device token.
fn apns_tok() -> String {
    apns_token(rand::random::<u64>() as usize)
}

/// A random FCM registration token (opaque, with the characters real ones have).
fn fcm_tok(tag: &str) -> String {
    format!("{tag}:APA91b{:016x}-_{:08x}", rand::random::<u64>(), rand::random::<u32>())
}

/// Decrypt opaque data (APNs: the payload's top-level keys; FCM: `data`)
/// with the registration's keys, as the app's extension would.
fn open(reg: &Registration, data: &Value) -> String {
    let s = |k: &str| data[k].as_str().unwrap_or_else(|| panic!("opaque data has no string {k:?}: {data}")).to_string();
    let body = b64decode_any(&s("body"));
    let device = reg.recipient();
    let plain = match s("enc").as_str() {
        "aes128gcm" => device.decrypt_aes128gcm(&body),
        "aesgcm" => device.decrypt_aesgcm(&body, &b64decode_any(&s("salt")), &b64decode_any(&s("dh"))),
        other => panic!("unknown enc {other:?} in {data}"),
    }
    .unwrap_or_else(|e| panic!("the device cannot decrypt what it received ({e}): {data}"));
    String::from_utf8(plain).expect("UTF-8 plaintext")
}

/// The registration's `state` as the app sees it.
async fn state(app: &AppClient, reg: &Registration) -> String {
    let (status, v) = app.get(&reg.id, &reg.secret).await;
    assert_eq!(status, 200, "GET registration: {v}");
    v["state"].as_str().unwrap_or_else(|| panic!("no state in {v}")).to_string()
}

async fn wait_state(app: &AppClient, reg: &Registration, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = state(app, reg).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "registration {} is {got:?}, not {want:?} after {timeout:?}", reg.id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// The SPEC §5 opaque data fields, checked for one app's message.
fn assert_opaque_data(data: &Value, reg: &Registration, enc: &str) {
    assert_eq!(data["registration"], json!(reg.id), "{data}");
    assert_eq!(data["instance"], INSTANCE, "{data}");
    assert_eq!(data["account"], ACCOUNT, "{data}");
    assert_eq!(data["enc"], enc, "{data}");
    if enc == "aesgcm" {
        assert_eq!(b64decode_any(data["salt"].as_str().expect("salt")).len(), 16, "{data}");
        assert_eq!(b64decode_any(data["dh"].as_str().expect("dh")).len(), 65, "{data}");
    } else {
        assert!(data.get("salt").is_none() && data.get("dh").is_none(), "aes128gcm carries no salt/dh: {data}");
    }
    assert!(data.get("fetch").is_none() && data.get("message_id").is_none(), "{data}");
    assert!(data.get("notification_id").is_none(), "opaque mode reveals nothing: {data}");
}

// ---------------------------------------------------------------------------
// What the device receives (SPEC §5)
// ---------------------------------------------------------------------------

/// Opaque pushes via each APNs app: `aps.alert` placeholder,
/// `mutable-content: 1`, SPEC §5 data keys beside `aps`, a body the device
/// decrypts; `apns-topic` of the app, `apns-priority` 10/5 from Urgency,
/// `apns-expiration` now + TTL (0 for TTL 0), `apns-collapse-id` from Topic,
/// `apns-push-type: alert`, `apns-id` a UUID.
#[tokio::test]
async fn apns_opaque_pushes_have_the_spec_shape_and_decrypt() {
    let env = start().await;
    for (provider, topic, title, body) in [
        ("ios-prod", PROD_TOPIC, "New post", Some("Tap to read")),
        ("ios-beta", BETA_TOPIC, "New notification", None),
        ("ios-ent", ENT_TOPIC, "New notification", None),
    ] {
        let tok = apns_tok();
        let reg = env.register(provider, &tok, false).await;
        // (style, urgency, topic, ttl, expected priority)
        let cases: [(Style, Option<&str>, Option<&str>, u64, &str); 4] = [
            (Style::Mastodon, Some("high"), Some("thread-1"), 600, "10"),
            (Style::MastodonAesgcm, Some("low"), None, 3600, "5"),
            (Style::Misskey, None, Some("abc_DEF-123"), 86400, "10"),
            (Style::PleromaAesgcm, Some("very-low"), None, 0, "5"),
        ];
        for (i, (style, urgency, collapse, ttl, priority)) in cases.into_iter().enumerate() {
            let plaintext = mastodon_payload(100 + i as u64, "instance-access-token");
            let mut req = reg.push(style, &env.vapid).payload(&plaintext).ttl(Some(ttl));
            if let Some(u) = urgency {
                req = req.urgency(u);
            }
            if let Some(t) = collapse {
                req = req.topic(t);
            }
            let before = unix_now();
            env.push_ok(req).await;
            let got = env.apns.wait_delivered(&tok, i + 1, Duration::from_secs(5)).await;
            let r = &got[i];
            let what = format!("{provider} {style:?}: {:?} {}", r.headers, r.body);
            assert_eq!(r.app, provider, "{what}");
            assert_eq!(r.header("apns-topic"), topic, "{what}");
            assert_eq!(r.header("apns-push-type"), "alert", "{what}");
            assert_eq!(r.header("apns-priority"), priority, "{what}");
            let expiration: u64 = r.header("apns-expiration").parse().unwrap();
            if ttl == 0 {
                assert_eq!(expiration, 0, "TTL 0 → apns-expiration 0: {what}");
            } else {
                assert!(
                    (before + ttl - 5..=unix_now() + ttl + 1).contains(&expiration),
                    "apns-expiration {expiration} for TTL {ttl} pushed at {before}: {what}"
                );
            }
            assert_eq!(r.headers.get("apns-collapse-id").map(String::as_str), collapse, "{what}");
            let mut alert = json!({"title": title});
            if let Some(b) = body {
                alert["body"] = json!(b);
            }
            assert_eq!(r.body["aps"]["alert"], alert, "placeholder alert: {what}");
            assert_eq!(r.body["aps"]["mutable-content"], 1, "{what}");
            assert_eq!(r.body["aps"]["thread-id"], ACCOUNT, "{what}");
            assert_opaque_data(&r.body, &reg, style.encoding());
            assert_eq!(open(&reg, &r.body), plaintext, "{what}");
            assert!(!r.body.to_string().contains("instance-access-token"));
        }
        let ids: HashSet<_> = env.apns.seen_for(&tok).iter().map(|r| r.header("apns-id").to_string()).collect();
        assert_eq!(ids.len(), 4, "one apns-id per message");
    }
    env.assert_no_problems();
}

/// Opaque pushes via FCM: data-only (no `notification`, so Android hands
/// them to the app), every data value a string, the body decrypts;
/// `android.priority` HIGH/NORMAL from Urgency, `android.ttl` the time left,
/// `android.collapse_key` from Topic; one access token for everything.
#[tokio::test]
async fn fcm_opaque_pushes_have_the_spec_shape_and_decrypt() {
    let env = start().await;
    let tok = fcm_tok("opaque");
    let reg = env.register("android", &tok, false).await;
    let cases: [(Style, Option<&str>, Option<&str>, u64, &str); 4] = [
        (Style::Mastodon, Some("high"), Some("thread-1"), 600, "HIGH"),
        (Style::MastodonAesgcm, Some("low"), None, 3600, "NORMAL"),
        (Style::Misskey, Some("normal"), Some("abc_DEF-123"), 86400, "HIGH"),
        (Style::PleromaAesgcm, Some("very-low"), None, 0, "NORMAL"),
    ];
    for (i, (style, urgency, collapse, ttl, priority)) in cases.into_iter().enumerate() {
        let plaintext = mastodon_payload(200 + i as u64, "instance-access-token");
        let mut req = reg.push(style, &env.vapid).payload(&plaintext).ttl(Some(ttl));
        if let Some(u) = urgency {
            req = req.urgency(u);
        }
        if let Some(t) = collapse {
            req = req.topic(t);
        }
        env.push_ok(req).await;
        let got = env.fcm.wait_delivered(&tok, i + 1, Duration::from_secs(5)).await;
        let m = &got[i].message;
        let what = format!("{style:?}: {m}");
        assert_eq!(got[i].project, PROJECT);
        assert!(m.get("notification").is_none(), "opaque FCM messages are data-only: {what}");
        assert_eq!(m["android"]["priority"], priority, "{what}");
        let sent_ttl: u64 = m["android"]["ttl"].as_str().unwrap().strip_suffix('s').unwrap().parse().unwrap();
        assert!(sent_ttl <= ttl && sent_ttl + 5 >= ttl, "android.ttl {sent_ttl}s for TTL {ttl}: {what}");
        assert_eq!(m["android"].get("collapse_key").and_then(Value::as_str), collapse, "{what}");
        let data = &m["data"];
        assert!(data.as_object().unwrap().values().all(Value::is_string), "{what}");
        assert_eq!(data["placeholder_title"], "New post", "{what}");
        assert_opaque_data(data, &reg, style.encoding());
        assert_eq!(open(&reg, data), plaintext, "{what}");
    }
    assert_eq!(env.fcm.token_requests(), 1, "one access token for every send");
    env.assert_no_problems();
}

/// Decrypted mode (`allow_decrypt: true`): APNs gets `aps.alert` title/body
/// (no `mutable-content`), FCM a `notification` with title/body, both the
/// data of SPEC §5; the Mastodon access token goes nowhere.
#[tokio::test]
async fn decrypted_mode_shows_title_and_body_and_never_the_access_token() {
    const SECRET: &str = "MASTODON-ACCESS-TOKEN-d1r3ct-7Hq";
    let env = start_with(|c| c.log_level("debug")).await;
    let ios = apns_tok();
    let android = fcm_tok("decrypted");
    let ios_reg = env.register("ios-prod", &ios, true).await;
    let android_reg = env.register("android", &android, true).await;
    for (i, style) in [Style::Mastodon, Style::MastodonAesgcm].into_iter().enumerate() {
        let id = 4200 + i as u64;
        let expected_data = |reg: &Registration| {
            json!({"registration": reg.id, "instance": INSTANCE, "account": ACCOUNT,
                   "notification_id": id.to_string(), "notification_type": "mention"})
        };
        env.push_ok(ios_reg.push(style, &env.vapid).payload(mastodon_payload(id, SECRET))).await;
        env.push_ok(android_reg.push(style, &env.vapid).payload(mastodon_payload(id, SECRET))).await;

        let r = &env.apns.wait_delivered(&ios, i + 1, Duration::from_secs(5)).await[i];
        let mut expected = expected_data(&ios_reg);
        expected["aps"] = json!({"alert": {"title": "Bob mentioned you",
            "body": format!("@alice hello there, this is notification {id}")},
            "sound": "default", "thread-id": ACCOUNT});
        assert_eq!(r.body, expected, "decrypted APNs payload");
        assert_eq!(r.header("apns-topic"), PROD_TOPIC);

        let m = &env.fcm.wait_delivered(&android, i + 1, Duration::from_secs(5)).await[i].message;
        assert_eq!(
            m["notification"],
            json!({"title": "Bob mentioned you", "body": format!("@alice hello there, this is notification {id}")}),
            "{m}"
        );
        assert_eq!(m["data"], expected_data(&android_reg), "{m}");
    }
    for r in env.apns.seen() {
        assert!(!r.body.to_string().contains(SECRET) && !r.body.to_string().contains("access_token"), "{}", r.body);
    }
    for r in env.fcm.seen() {
        assert!(!r.message.to_string().contains(SECRET) && !r.message.to_string().contains("access_token"), "{}", r.message);
    }
    assert!(!env.relay.log().contains(SECRET), "access token in the relay log");
    env.assert_no_problems();
}

/// A body too large for a 4 KB APNs/FCM payload goes the fetch path: the
/// device gets `{registration, message_id, fetch}` and the app fetches the
/// body from the relay and decrypts it.
#[tokio::test]
async fn large_bodies_are_fetched_by_the_app() {
    let env = start().await;
    let ios = apns_tok();
    let android = fcm_tok("large");
    let ios_reg = env.register("ios-beta", &ios, false).await;
    let android_reg = env.register("android", &android, false).await;
    let plaintext = format!("{{\"big\":\"{}\"}}", "x".repeat(3300));
    for (reg, style) in [(&ios_reg, Style::Mastodon), (&android_reg, Style::MastodonAesgcm)] {
        let r = env.push_ok(reg.push(style, &env.vapid).payload(&plaintext)).await;
        let message_id = r.header("location").unwrap().rsplit('/').next().unwrap().to_string();
        let data = if reg.id == ios_reg.id {
            let r = &env.apns.wait_delivered(&ios, 1, Duration::from_secs(5)).await[0];
            assert_eq!(r.body["aps"]["mutable-content"], 1, "{}", r.body);
            assert_eq!(r.body["fetch"], true, "{}", r.body);
            r.body.clone()
        } else {
            let m = env.fcm.wait_delivered(&android, 1, Duration::from_secs(5)).await[0].message.clone();
            assert!(m.get("notification").is_none(), "{m}");
            assert_eq!(m["data"]["fetch"], "true", "{m}");
            m["data"].clone()
        };
        assert_eq!(data["registration"], json!(reg.id), "{data}");
        assert_eq!(data["message_id"], json!(message_id), "{data}");
        assert!(data.get("body").is_none(), "{data}");
        let (status, headers, body) = env.app.fetch_message(&reg.id, &reg.secret, &message_id).await;
        assert_eq!(status, 200);
        let device = reg.recipient();
        let plain = if style == Style::Mastodon {
            device.decrypt_aes128gcm(&body).unwrap()
        } else {
            let h = |n: &str| headers.get(n).unwrap().to_str().unwrap().to_string();
            let (salt, dh) = push_relay_e2e::webpush::parse_aesgcm_headers(&h("encryption"), &h("crypto-key"));
            device.decrypt_aesgcm(&body, &salt.unwrap(), &dh.unwrap()).unwrap()
        };
        assert_eq!(String::from_utf8(plain).unwrap(), plaintext);
    }
    env.assert_no_problems();
}

// ---------------------------------------------------------------------------
// Gone devices
// ---------------------------------------------------------------------------

/// Each "dead token" answer marks the registration gone: GET shows
/// `state: gone` and the next push to its endpoint gets 410 (so Mastodon
/// drops the subscription). Nothing is retried.
#[tokio::test]
async fn dead_token_answers_make_the_endpoint_gone() {
    let env = start().await;
    let mut cases: Vec<(&str, String, Registration)> = Vec::new();
    for (provider, answer) in [
        ("ios-prod", (410, "Unregistered", None)),
        ("ios-prod", (400, "BadDeviceToken", None)),
        ("ios-beta", (400, "DeviceTokenNotForTopic", None)),
        ("ios-ent", (410, "Unregistered", None)),
    ] {
        let tok = apns_tok();
        env.apns.script(&tok, &[answer]);
        let reg = env.register(provider, &tok, false).await;
        cases.push((answer.1, tok, reg));
    }
    let invalid = fcm_error(
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
        Some("INVALID_ARGUMENT"),
    );
    for (what, answer) in [
        ("UNREGISTERED", (404, fcm_error(404, "NOT_FOUND", "Requested entity was not found.", Some("UNREGISTERED")), None)),
        ("INVALID_ARGUMENT", (400, invalid, None)),
    ] {
        let tok = fcm_tok("dead");
        env.fcm.script(&tok, vec![answer]);
        let reg = env.register("android", &tok, false).await;
        cases.push((what, tok, reg));
    }
    for (_, _, reg) in &cases {
        env.push_ok(reg.push(Style::Mastodon, &env.vapid).ttl(Some(3600))).await;
    }
    for (what, tok, reg) in &cases {
        wait_state(&env.app, reg, "gone", Duration::from_secs(5)).await;
        let again = env.push(reg.push(Style::Mastodon, &env.vapid)).await;
        assert_eq!(again.status, 410, "{what}: push after the provider said the token is dead: {} {}", again.status, again.body);
        let attempts = env.apns.seen_for(tok).len() + env.fcm.seen_for(tok).len();
        assert_eq!(attempts, 1, "{what}: one attempt, not retried");
    }
    env.assert_no_problems();
}

// ---------------------------------------------------------------------------
// Transient errors
// ---------------------------------------------------------------------------

/// APNs 429 (Retry-After) and 500/503, FCM 503 and 429 (Retry-After) are
/// retried and delivered later, never sooner than Retry-After; an APNs
/// retry carries the same apns-id.
#[tokio::test]
async fn transient_errors_are_retried_until_delivered() {
    let env = start().await;
    let t429 = apns_tok();
    let t5xx = apns_tok();
    let f503 = fcm_tok("unavailable");
    let f429 = fcm_tok("quota");
    env.apns.script(&t429, &[(429, "TooManyRequests", Some(1))]);
    env.apns.script(&t5xx, &[(500, "InternalServerError", None), (503, "ServiceUnavailable", None)]);
    env.fcm.script(&f503, vec![(503, fcm_error(503, "UNAVAILABLE", "busy", Some("UNAVAILABLE")), Some(1))]);
    env.fcm.script(&f429, vec![(429, fcm_error(429, "RESOURCE_EXHAUSTED", "quota", Some("QUOTA_EXCEEDED")), Some(1))]);
    let r429 = env.register("ios-prod", &t429, false).await;
    let r5xx = env.register("ios-ent", &t5xx, false).await;
    let rf503 = env.register("android", &f503, false).await;
    let rf429 = env.register("android", &f429, false).await;
    for reg in [&r429, &r5xx, &rf503, &rf429] {
        env.push_ok(reg.push(Style::Mastodon, &env.vapid).payload(format!("for {}", reg.id))).await;
    }
    let a = env.apns.wait_delivered(&t429, 1, Duration::from_secs(8)).await;
    let seen = env.apns.seen_for(&t429);
    assert_eq!(seen.iter().map(|r| r.status).collect::<Vec<_>>(), [429, 200]);
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(950), "APNs Retry-After: 1 honoured, retried after {gap:?}");
    assert_eq!(seen[0].header("apns-id"), seen[1].header("apns-id"), "the same message keeps its apns-id");
    assert_eq!(open(&r429, &a[0].body), format!("for {}", r429.id));

    env.apns.wait_delivered(&t5xx, 1, Duration::from_secs(8)).await;
    let seen = env.apns.seen_for(&t5xx);
    assert_eq!(seen.iter().map(|r| r.status).collect::<Vec<_>>(), [500, 503, 200]);

    for (tok, reg, status) in [(&f503, &rf503, 503), (&f429, &rf429, 429)] {
        let d = env.fcm.wait_delivered(tok, 1, Duration::from_secs(8)).await;
        let seen = env.fcm.seen_for(tok);
        assert_eq!(seen.iter().map(|r| r.status).collect::<Vec<_>>(), [status, 200]);
        let gap = seen[1].at - seen[0].at;
        assert!(gap >= Duration::from_millis(950), "FCM {status} Retry-After: 1 honoured, retried after {gap:?}");
        assert_eq!(open(reg, &d[0].message["data"]), format!("for {}", reg.id));
    }
    for reg in [&r429, &r5xx, &rf503, &rf429] {
        assert_eq!(state(&env.app, reg).await, "active");
    }
    env.assert_no_problems();
}

/// APNs `403 ExpiredProviderToken`: the relay mints a new provider JWT and
/// the message is delivered with it (and later ones use it too). FCM `401`:
/// the access token is renewed once and the message delivered.
#[tokio::test]
async fn expired_credentials_are_renewed_and_the_message_delivered() {
    let env = start().await;
    // Warm both up.
    let warm_ios = apns_tok();
    let warm_android = fcm_tok("warm");
    let warm_ios_reg = env.register("ios-beta", &warm_ios, false).await;
    let warm_android_reg = env.register("android", &warm_android, false).await;
    env.push_ok(warm_ios_reg.push(Style::Mastodon, &env.vapid)).await;
    env.push_ok(warm_android_reg.push(Style::Mastodon, &env.vapid)).await;
    env.apns.wait_delivered(&warm_ios, 1, Duration::from_secs(5)).await;
    env.fcm.wait_delivered(&warm_android, 1, Duration::from_secs(5)).await;
    let first_jwt = env.apns.seen_for(&warm_ios)[0].jwt.clone().unwrap();
    assert_eq!(env.fcm.token_requests(), 1);

    // APNs: the provider token is declared expired.
    let tok = apns_tok();
    env.apns.script(&tok, &[(403, "ExpiredProviderToken", None)]);
    let reg = env.register("ios-beta", &tok, false).await;
    env.push_ok(reg.push(Style::Mastodon, &env.vapid).payload("after renewal")).await;
    let d = env.apns.wait_delivered(&tok, 1, Duration::from_secs(5)).await;
    let seen = env.apns.seen_for(&tok);
    assert_eq!(seen.iter().map(|r| r.status).collect::<Vec<_>>(), [403, 200]);
    assert_eq!(seen[0].jwt.as_deref(), Some(first_jwt.as_str()));
    let fresh = seen[1].jwt.clone().unwrap();
    assert_ne!(fresh, first_jwt, "a new provider JWT");
    assert_eq!(open(&reg, &d[0].body), "after renewal");
    env.push_ok(warm_ios_reg.push(Style::Mastodon, &env.vapid)).await;
    let later = env.apns.wait_delivered(&warm_ios, 2, Duration::from_secs(5)).await;
    assert_eq!(later[1].jwt.as_deref(), Some(fresh.as_str()), "later pushes use the new JWT");
    let beta_jwts: HashSet<_> = env.apns.seen_by("ios-beta").into_iter().filter_map(|r| r.jwt).collect();
    assert_eq!(beta_jwts.len(), 2, "renewed once");

    // FCM: the access token is revoked.
    env.fcm.revoke_all();
    let tok = fcm_tok("renew");
    let reg = env.register("android", &tok, false).await;
    env.push_ok(reg.push(Style::Mastodon, &env.vapid).payload("after refresh")).await;
    let d = env.fcm.wait_delivered(&tok, 1, Duration::from_secs(5)).await;
    assert_eq!(env.fcm.token_requests(), 2, "one renewal");
    assert_eq!(d[0].bearer, "ya29.test-2");
    assert_eq!(open(&reg, &d[0].message["data"]), "after refresh");
    assert_eq!(env.fcm.seen_for(&tok).len(), 1, "the 401 was answered before the message was accepted");
    env.assert_no_problems();
}

// ---------------------------------------------------------------------------
// Several apps per relay
// ---------------------------------------------------------------------------

/// ios-prod and ios-beta sign with their own key (`kid`), team (`iss`) and
/// topic, ios-ent presents its client certificate and no JWT, android uses
/// its own service account: the mocks verify each. Each APNs app has its own
/// connection. Tokens are validated per kind at registration.
#[tokio::test]
async fn several_apps_use_their_own_credentials() {
    let env = start().await;
    let mut regs = Vec::new();
    for provider in ["ios-prod", "ios-beta", "ios-ent", "ios-prod", "ios-beta", "ios-ent"] {
        let tok = apns_tok();
        regs.push((provider, tok.clone(), env.register(provider, &tok, false).await));
    }
    let android = fcm_tok("multi");
    let android_reg = env.register("android", &android, false).await;
    for (_, _, reg) in &regs {
        env.push_ok(reg.push(Style::Mastodon, &env.vapid).payload(format!("to {}", reg.id))).await;
    }
    env.push_ok(android_reg.push(Style::Mastodon, &env.vapid).payload("to android")).await;
    let mut connections = std::collections::HashMap::new();
    for (provider, tok, reg) in &regs {
        let r = &env.apns.wait_delivered(tok, 1, Duration::from_secs(5)).await[0];
        assert_eq!(r.app, *provider, "authenticated as its own app");
        assert_eq!(open(reg, &r.body), format!("to {}", reg.id));
        let (kid, iss, topic) = match *provider {
            "ios-prod" => (Some("PRODKEY001"), Some("TEAMPROD01"), PROD_TOPIC),
            "ios-beta" => (Some("BETAKEY002"), Some("TEAMBETA02"), BETA_TOPIC),
            _ => (None, None, ENT_TOPIC),
        };
        assert_eq!(r.header("apns-topic"), topic);
        match &r.jwt {
            Some(jwt) => {
                let part = |i: usize| serde_json::from_slice::<Value>(&b64decode_any(jwt.split('.').nth(i).unwrap())).unwrap();
                assert_eq!(part(0)["kid"].as_str(), kid);
                assert_eq!(part(0)["alg"], "ES256");
                assert_eq!(part(1)["iss"].as_str(), iss);
            }
            None => assert!(kid.is_none() && !r.headers.contains_key("authorization"), "{provider}: certificate auth sends no JWT"),
        }
        connections.entry(*provider).or_insert_with(HashSet::new).insert(r.connection);
    }
    let all: Vec<usize> = connections.values().flatten().copied().collect();
    assert_eq!(all.len(), 3, "one connection per APNs app, not shared between apps: {connections:?}");
    let m = &env.fcm.wait_delivered(&android, 1, Duration::from_secs(5)).await[0];
    assert_eq!(open(&android_reg, &m.message["data"]), "to android");
    assert_eq!(m.project, PROJECT);

    // Tokens are checked by the provider named at registration.
    for (provider, token) in [
        ("ios-prod", "not-hex-at-all"),
        ("ios-beta", "abc123"),
        ("ios-prod", "ExponentPushToken[xxxxxxxxxxxxxxxxxxxxxx]"),
        ("android", "has whitespace inside"),
        ("android", ""),
    ] {
        let (status, body) = env.app.register(provider, token, INSTANCE, None, None, None).await;
        assert!(status == 400 || status == 422, "{provider} accepted token {token:?}: {status} {body}");
    }
    let (status, body) = env.app.register("ios-staging", &apns_tok(), INSTANCE, None, None, None).await;
    assert!(status == 400 || status == 422, "unknown provider: {status} {body}");
    env.assert_no_problems();
}

// ---------------------------------------------------------------------------
// Isolation
// ---------------------------------------------------------------------------

/// A TCP port that accepts connections and never answers a byte.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (url, task)
}

/// A provider that fails never delays the others: with ios-beta's APNs and
/// android's FCM stalled, and ios-ent pointed at a port that accepts and
/// never answers, pushes to ios-prod are delivered within a second each;
/// once the stalled services recover, their messages are delivered too.
#[tokio::test]
async fn a_failing_provider_never_delays_the_others() {
    let creds = Creds::new();
    let healthy = MockApns::start(&creds.pki, creds.apns_apps()).await;
    let stalled = MockApns::start(&creds.pki, creds.apns_apps()).await;
    let fcm = MockFcm::start(&[&creds.android]).await;
    let (hole, _hole) = black_hole().await;
    stalled.stall(true);
    fcm.stall(true);
    let cfg = RelayConfig::new()
        .fast_queue()
        .limits(NO_LIMITS)
        .providers(&creds.ios_prod(&healthy.base_url()))
        .providers(&creds.ios_beta(&stalled.base_url()))
        .providers(&creds.ios_ent(&hole))
        .providers(&creds.android(&fcm));
    let relay = Relay::start(cfg).await;
    let app = relay.app();
    let vapid = Vapid::generate();
    let http = reqwest::Client::new();

    let mut slow = Vec::new();
    for provider in ["ios-beta", "ios-ent", "android"] {
        for _ in 0..5 {
            let tok = if provider == "android" { fcm_tok("stalled") } else { apns_tok() };
            let reg = register(&app, provider, &tok, &vapid, false).await;
            let r = reg.push(Style::Mastodon, &vapid).ttl(Some(600)).send(&http).await;
            assert_eq!(r.status, 201, "{}", r.body);
            slow.push((provider, tok));
        }
    }
    // Let the stuck providers get stuck.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tok = apns_tok();
    let reg = register(&app, "ios-prod", &tok, &vapid, false).await;
    for i in 0..8 {
        let r = reg.push(Style::Mastodon, &vapid).payload(format!("prompt {i}")).send(&http).await;
        assert_eq!(r.status, 201, "{}", r.body);
        let pushed = Instant::now();
        let got = healthy.wait_delivered(&tok, i + 1, Duration::from_secs(1)).await;
        assert_eq!(open(&reg, &got[i].body), format!("prompt {i}"));
        assert!(got[i].at - pushed < Duration::from_secs(1), "ios-prod delayed by {:?}", got[i].at - pushed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(stalled.delivered_to(&slow[0].1).is_empty() && fcm.delivered_to(&slow[10].1).is_empty());

    // Recovery.
    stalled.stall(false);
    fcm.stall(false);
    for (provider, tok) in &slow {
        match *provider {
            "ios-beta" => {
                stalled.wait_delivered(tok, 1, Duration::from_secs(15)).await;
            }
            "android" => {
                fcm.wait_delivered(tok, 1, Duration::from_secs(15)).await;
            }
            _ => {}
        }
    }
    // ios-prod still fine after all that.
    let r = reg.push(Style::Mastodon, &vapid).payload("after").send(&http).await;
    assert_eq!(r.status, 201);
    healthy.wait_delivered(&tok, 9, Duration::from_secs(1)).await;
    for m in [&healthy, &stalled] {
        assert!(m.problems().is_empty(), "{:?}", m.problems());
    }
    assert!(fcm.problems().is_empty(), "{:?}", fcm.problems());
}

// ---------------------------------------------------------------------------
// Volume
// ---------------------------------------------------------------------------

/// 1,000 pushes through the relay to one APNs app are all delivered, each
/// exactly once, over ONE HTTP/2 connection with ONE provider JWT.
#[tokio::test]
async fn a_thousand_pushes_share_one_connection_and_one_jwt() {
    const REGISTRATIONS: usize = 50;
    const PER_REGISTRATION: usize = 20;
    let creds = Creds::new();
    let apns = MockApns::start(&creds.pki, creds.apns_apps()).await;
    let cfg = RelayConfig::new()
        .fast_queue()
        .queue("batch_size = 1000")
        .limits(NO_LIMITS)
        .providers(&creds.ios_prod(&apns.base_url()));
    let relay = Relay::start(cfg).await;
    let app = relay.app();
    let vapid = Vapid::generate();
    let mut regs = Vec::new();
    for _ in 0..REGISTRATIONS {
        let tok = apns_tok();
        regs.push((tok.clone(), register(&app, "ios-prod", &tok, &vapid, false).await));
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (_, reg) in regs.clone() {
        let vapid = vapid.clone();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0..PER_REGISTRATION {
                let r = reg.push(Style::Mastodon, &vapid).payload(format!("{} #{i}", reg.id)).send(&http).await;
                assert_eq!(r.status, 201, "{}", r.body);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let pushed = started.elapsed();
    let total = REGISTRATIONS * PER_REGISTRATION;
    let delivered = apns.wait_delivered_total(total, Duration::from_secs(30)).await;
    let took = started.elapsed();
    assert_eq!(delivered.len(), total, "delivered {} of {total} in {took:?}; problems {:?}", delivered.len(), apns.problems());
    // Exactly once: give stragglers a moment, then count again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = apns.seen();
    assert_eq!(seen.len(), total, "no request sent twice");
    let ids: HashSet<_> = seen.iter().map(|r| r.header("apns-id").to_string()).collect();
    assert_eq!(ids.len(), total);
    // Every plaintext arrived (spot-check decryption on every 50th).
    for (tok, _) in &regs {
        let got = apns.seen_for(tok);
        assert_eq!(got.len(), PER_REGISTRATION);
    }
    let (tok0, reg0) = &regs[0];
    let mut plain: Vec<String> = apns.seen_for(tok0).iter().map(|r| open(reg0, &r.body)).collect();
    plain.sort();
    let mut want: Vec<String> = (0..PER_REGISTRATION).map(|i| format!("{} #{i}", reg0.id)).collect();
    want.sort();
    assert_eq!(plain, want);
    assert_eq!(apns.connections(), 1, "one TLS connection for all {total} pushes");
    assert_eq!(apns.distinct_jwts().len(), 1, "one provider JWT for all {total} pushes");
    assert!(apns.problems().is_empty(), "{:?}", apns.problems());
    eprintln!("1000 pushes: accepted in {pushed:?}, all delivered after {took:?}, max {} concurrent at the mock", apns.max_in_flight());
}

// ---------------------------------------------------------------------------
// A slow provider and the claim lease
// ---------------------------------------------------------------------------

/// A slow FCM (every answer takes 1.8 s, within the 2 s request timeout)
/// must not make the relay send the same message twice. The relay claims a
/// batch with a lease (`lease_secs`, 3 s here, longer than the request
/// timeout, like the defaults 60 s vs 30 s) and never extends it, while the
/// FCM provider sends a batch's first message alone and the rest after it:
/// a batch of several messages takes two answer times (3.6 s), outlives its
/// lease, and the second delivery worker of the same process claims and
/// sends the still-in-flight messages again. The device gets duplicates.
#[tokio::test]
async fn a_slow_provider_does_not_get_the_same_message_twice() {
    let creds = Creds::new();
    let fcm = MockFcm::start(&[&creds.android]).await;
    let cfg = RelayConfig::new()
        .queue("poll_interval_ms = 50\nretry_base_ms = 100\nretry_max_secs = 2\nlease_secs = 3\nworkers = 2")
        .limits(NO_LIMITS)
        .providers(&creds.android(&fcm));
    let relay = Relay::start(cfg).await;
    let app = relay.app();
    let vapid = Vapid::generate();
    let http = reqwest::Client::new();
    let mut regs = Vec::new();
    for i in 0..6 {
        let tok = fcm_tok(&format!("slow{i}"));
        regs.push((tok.clone(), register(&app, "android", &tok, &vapid, false).await));
    }
    // Warm up the access token, then slow down.
    let (tok0, reg0) = &regs[0];
    assert_eq!(reg0.push(Style::Mastodon, &vapid).send(&http).await.status, 201);
    fcm.wait_delivered(tok0, 1, Duration::from_secs(5)).await;
    fcm.set_latency(Duration::from_millis(1800));
    // One message keeps a worker busy; the next ones queue up behind it and
    // are claimed together.
    for (i, (_, reg)) in regs.iter().enumerate().skip(1) {
        let r = reg.push(Style::Mastodon, &vapid).payload(format!("slow {i}")).send(&http).await;
        assert_eq!(r.status, 201, "{}", r.body);
        if i <= 2 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    for (tok, _) in &regs[1..] {
        fcm.wait_delivered(tok, 1, Duration::from_secs(15)).await;
    }
    // Leave time for any second copy to arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts: Vec<(usize, usize)> =
        regs.iter().enumerate().map(|(i, (tok, _))| (i, fcm.delivered_to(tok).len())).collect();
    assert!(
        counts.iter().all(|(_, n)| *n == 1),
        "messages delivered more than once (message, deliveries): {counts:?}; relay log:\n{}",
        relay.log_tail(30)
    );
    assert!(fcm.problems().is_empty(), "{:?}", fcm.problems());
}
