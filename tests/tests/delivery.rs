//! End-to-end DELIVERY tests (SPEC §4 "a 201 is never lost", §5 "what the
//! device receives"): the real `push-relay` binary, a mock Expo, our own and
//! an independent (pywebpush) Web Push sender, SQLite and PostgreSQL stores.
//!
//! What reaches the mock Expo is checked the way an app would: opaque bodies
//! are DECRYPTED with the keys the app got at registration and compared to
//! what the instance encrypted.
//!
//! Build the binary first: `cargo build -p push-relay`.

use push_relay_e2e::metric_sum as metric;
use push_relay_e2e::webpush::parse_aesgcm_headers;
use push_relay_e2e::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Rate limits out of the way: these tests are about delivery.
const NO_LIMITS: &str = "per_instance = { per_second = 100000, burst = 100000 }\n\
                         per_registration = { per_second = 100000, burst = 100000 }\n\
                         registrations_per_ip = { per_minute = 100000, burst = 100000 }";

const INSTANCE: &str = "mastodon.example";
const ACCOUNT: &str = "@alice@example.social";

fn token(tag: &str) -> String {
    format!("ExponentPushToken[{tag}-{:08x}]", rand::random::<u32>())
}

/// A fast-queue relay config with one Expo provider named `expo` at
/// `expo_url` (receipts checked 1 s after delivery) plus `extra` lines.
fn config(expo_url: &str, access_token: Option<&str>, extra: &str) -> RelayConfig {
    RelayConfig::new()
        .fast_queue()
        .limits(NO_LIMITS)
        .expo("expo", expo_url, access_token, &format!("receipt_delay_secs = 1\n{extra}"))
}

struct Ctx {
    expo: MockExpo,
    relay: Relay,
    app: AppClient,
    vapid: Vapid,
    http: reqwest::Client,
}

async fn start() -> Ctx {
    let expo = MockExpo::start().await;
    let cfg = config(&expo.url(), None, "");
    start_with(expo, cfg).await
}

async fn start_with(expo: MockExpo, cfg: RelayConfig) -> Ctx {
    let relay = Relay::start(cfg).await;
    let app = relay.app();
    Ctx { expo, relay, app, vapid: Vapid::generate(), http: reqwest::Client::new() }
}

impl Ctx {
    /// An opaque-mode registration, confirmed at once with our VAPID key.
    async fn register(&self, token: &str) -> Registration {
        register(&self.app, token, &self.vapid, false).await
    }

    async fn push(&self, req: PushRequest) -> PushResponse {
        req.send(&self.http).await
    }

    /// Push `plaintext` and assert 201.
    async fn push_ok(&self, reg: &Registration, style: Style, plaintext: &str) -> PushResponse {
        let r = self.push(reg.push(style, &self.vapid).payload(plaintext)).await;
        assert_eq!(r.status, 201, "push answered {} {}", r.status, r.body);
        r
    }

    async fn metrics(&self) -> String {
        self.relay.metrics().await
    }

    /// Wait until a metric (summed over the series matching `labels`) is at
    /// least `min`; returns its value.
    async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], min: f64, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics().await;
            let v = metric(&text, name, labels);
            if v >= min {
                return v;
            }
            if Instant::now() >= deadline {
                panic!("metric {name}{labels:?} = {v}, wanted >= {min} within {timeout:?}\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn register(app: &AppClient, token: &str, vapid: &Vapid, allow_decrypt: bool) -> Registration {
    let reg = app
        .register_ok("expo", token, INSTANCE, Some(&vapid.public_key_b64()), Some(allow_decrypt))
        .await;
    assert!(reg.confirmed, "registration with server_key must be confirmed at once: {}", reg.raw);
    reg
}


/// Decrypt the opaque `data` of an Expo message with the registration's keys.
fn open(reg: &Registration, data: &Value) -> Vec<u8> {
    let s = |k: &str| {
        data[k]
            .as_str()
            .unwrap_or_else(|| panic!("opaque data has no string {k:?}: {data}"))
            .to_string()
    };
    let body = b64decode_any(&s("body"));
    let device = reg.recipient();
    match s("enc").as_str() {
        "aes128gcm" => device.decrypt_aes128gcm(&body),
        "aesgcm" => device.decrypt_aesgcm(&body, &b64decode_any(&s("salt")), &b64decode_any(&s("dh"))),
        other => panic!("unknown enc {other:?} in {data}"),
    }
    .unwrap_or_else(|e| panic!("the device cannot decrypt what it received ({e}): {data}"))
}

fn open_str(reg: &Registration, data: &Value) -> String {
    String::from_utf8(open(reg, data)).expect("plaintext is UTF-8")
}

/// The message id at the end of a 201's `Location`.
fn location_id(r: &PushResponse) -> String {
    let loc = r.header("location").unwrap_or_else(|| panic!("201 without Location: {r:?}"));
    loc.rsplit('/').next().unwrap().to_string()
}

/// The registration's `state` as the app sees it.
async fn state(app: &AppClient, reg: &Registration) -> String {
    let (status, v) = app.get(&reg.id, &reg.secret).await;
    assert_eq!(status, 200, "GET registration: {v}");
    v["state"].as_str().unwrap_or_else(|| panic!("no state in {v}")).to_string()
}

/// Wait until `count` messages for `token` arrived, then a little longer,
/// and assert that no more than `count` arrived (exactly-once).
async fn exactly(expo: &MockExpo, token: &str, count: usize, timeout: Duration) -> Vec<Received> {
    expo.wait_for_token(token, count, timeout).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let msgs = expo.messages_for(token);
    assert_eq!(
        msgs.len(),
        count,
        "expected exactly {count} messages for {token}, got {}: {:#?}",
        msgs.len(),
        msgs.iter().map(|m| &m.message).collect::<Vec<_>>()
    );
    msgs
}

/// Common checks of an opaque-mode Expo message.
fn assert_opaque_shape(m: &Received, reg: &Registration, enc: &str) {
    let msg = &m.message;
    assert_eq!(msg["to"], json!(m.token), "{msg}");
    assert_eq!(msg["title"], "New notification", "placeholder title: {msg}");
    assert_eq!(msg["mutableContent"], true, "{msg}");
    assert_eq!(msg["sound"], "default", "{msg}");
    let data = &msg["data"];
    assert_eq!(data["registration"], json!(reg.id), "{msg}");
    assert_eq!(data["instance"], INSTANCE, "{msg}");
    assert_eq!(data["account"], ACCOUNT, "{msg}");
    assert_eq!(data["enc"], enc, "{msg}");
    if enc == "aesgcm" {
        assert_eq!(b64decode_any(data["salt"].as_str().expect("salt")).len(), 16, "{msg}");
        assert_eq!(b64decode_any(data["dh"].as_str().expect("dh")).len(), 65, "{msg}");
    } else {
        assert!(data.get("salt").is_none() && data.get("dh").is_none(), "aes128gcm carries no salt/dh: {msg}");
    }
    assert!(data.get("fetch").is_none(), "{msg}");
}

// ---------------------------------------------------------------------------
// What the device receives (SPEC §5)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn opaque_aes128gcm_and_aesgcm_decrypt_on_the_device() {
    let ctx = start().await;
    let tok = token("opaque");
    let reg = ctx.register(&tok).await;
    assert!(reg.private_key.is_some(), "shortcut registration returns the private key once");

    let cases = [
        (Style::Mastodon, "aes128gcm"),
        (Style::Misskey, "aes128gcm"),
        (Style::MastodonAesgcm, "aesgcm"),
        (Style::PleromaAesgcm, "aesgcm"),
    ];
    for (i, (style, enc)) in cases.iter().enumerate() {
        let plaintext = mastodon_payload(1000 + i as u64, "instance-access-token");
        // Pleroma's default TTL is 0: make it a queued message here.
        let r = ctx.push(reg.push(*style, &ctx.vapid).payload(&plaintext).ttl(Some(300))).await;
        assert_eq!(r.status, 201, "{style:?}: {} {}", r.status, r.body);
        let msgs = ctx.expo.wait_for_token(&tok, i + 1, Duration::from_secs(5)).await;
        let m = &msgs[i];
        assert_opaque_shape(m, &reg, enc);
        assert_eq!(open_str(&reg, &m.message["data"]), plaintext, "{style:?}: decrypted body differs");
    }
    exactly(&ctx.expo, &tok, cases.len(), Duration::from_secs(1)).await;
    ctx.wait_metric(
        "push_relay_deliveries_total",
        &[("provider", "expo"), ("outcome", "delivered")],
        cases.len() as f64,
        Duration::from_secs(3),
    )
    .await;

    // The registration view shows the latest delivery (written once a second).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (status, view) = ctx.app.get(&reg.id, &reg.secret).await;
        assert_eq!(status, 200, "{view}");
        if let Some(at) = view["last_delivery_at"].as_str() {
            assert!(at.len() >= 20 && at.starts_with("20"), "RFC 3339 time: {view}");
            break;
        }
        assert!(Instant::now() < deadline, "last_delivery_at still empty: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn opaque_from_pywebpush_is_delivered_and_decrypts() {
    let ctx = start().await;
    let dir = tempfile::tempdir().unwrap();
    let vapid = pywebpush::VapidPem::generate(dir.path(), "vapid.pem");
    let tok = token("py");
    let reg = register(&ctx.app, &tok, &vapid.vapid, false).await;

    for (i, enc) in ["aes128gcm", "aesgcm"].into_iter().enumerate() {
        let plaintext = format!("{{\"from\":\"pywebpush\",\"enc\":\"{enc}\",\"n\":{i}}}");
        let (status, out) =
            pywebpush::send(&reg.endpoint, &reg.p256dh_b64(), &reg.auth_b64(), &plaintext, enc, 120, &vapid.path).await;
        assert_eq!(status, 201, "pywebpush {enc}: {out}");
        let msgs = ctx.expo.wait_for_token(&tok, i + 1, Duration::from_secs(5)).await;
        assert_opaque_shape(&msgs[i], &reg, enc);
        assert_eq!(open_str(&reg, &msgs[i].message["data"]), plaintext, "pywebpush {enc}");
        let ttl = msgs[i].message["ttl"].as_u64().expect("ttl");
        assert!(ttl <= 120 && ttl >= 110, "ttl from pywebpush's TTL 120: {ttl}");
    }
    exactly(&ctx.expo, &tok, 2, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn decrypted_mode_never_leaks_the_access_token() {
    const SECRET: &str = "MASTODON-ACCESS-TOKEN-zq9XkLw3";
    let expo = MockExpo::start().await;
    // Debug logs: an operator may run with them and still must not see it.
    let cfg = config(&expo.url(), None, "").log_level("debug");
    let ctx = start_with(expo, cfg).await;
    let tok = token("decrypt");
    let reg = register(&ctx.app, &tok, &ctx.vapid, true).await;
    assert!(reg.allow_decrypt, "{}", reg.raw);

    for (i, style) in [Style::Mastodon, Style::MastodonAesgcm].into_iter().enumerate() {
        let id = 4242 + i as u64;
        ctx.push_ok(&reg, style, &mastodon_payload(id, SECRET)).await;
        let msgs = ctx.expo.wait_for_token(&tok, i + 1, Duration::from_secs(5)).await;
        let msg = &msgs[i].message;
        assert_eq!(msg["title"], "Bob mentioned you", "{msg}");
        assert_eq!(msg["body"], format!("@alice hello there, this is notification {id}"), "{msg}");
        let data = &msg["data"];
        assert_eq!(
            data,
            &json!({
                "registration": reg.id,
                "instance": INSTANCE,
                "account": ACCOUNT,
                "notification_id": id.to_string(),
                "notification_type": "mention",
            }),
            "decrypted-mode data: {msg}"
        );
        assert!(msg.get("mutableContent").is_none(), "a visible notification needs no extension: {msg}");
        assert!(!msg.to_string().contains(SECRET), "access token sent to Expo: {msg}");
        assert!(!msg.to_string().contains("access_token"), "{msg}");
    }
    // A payload that is not JSON is delivered opaque, and the app decrypts it.
    ctx.push_ok(&reg, Style::Mastodon, "plain text, not JSON").await;
    let msgs = exactly(&ctx.expo, &tok, 3, Duration::from_secs(5)).await;
    assert_opaque_shape(&msgs[2], &reg, "aes128gcm");
    assert_eq!(open_str(&reg, &msgs[2].message["data"]), "plain text, not JSON");

    assert_secret_nowhere(&ctx.relay, SECRET, "running");
    let mut ctx = ctx;
    ctx.relay.stop().await;
    assert_secret_nowhere(&ctx.relay, SECRET, "after a graceful stop");
}

/// `secret` is neither in the relay's log nor in any `relay.db*` file.
fn assert_secret_nowhere(relay: &Relay, secret: &str, when: &str) {
    assert!(!relay.log().contains(secret), "access token in the relay log ({when})");
    let mut files = 0;
    for entry in std::fs::read_dir(relay.dir()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("relay.db") {
            files += 1;
            let bytes = std::fs::read(entry.path()).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "access token stored in {name} ({when})"
            );
        }
    }
    assert!(files >= 1, "no relay.db* file in {}", relay.dir().display());
}

/// Decrypted mode with a long post: the payload was a valid Web Push body
/// (under 4096 bytes encrypted), but title + body + data as an Expo message
/// exceed Expo's 4096-byte limit. Expo refuses such a message
/// (`MessageTooBig`), so unless the relay shortens it (or falls back to a
/// fetch handle, as it does for opaque bodies) the accepted message is lost.
#[tokio::test]
async fn decrypted_mode_long_body_still_reaches_the_device() {
    let ctx = start().await;
    let tok = token("long");
    let reg = register(&ctx.app, &tok, &ctx.vapid, true).await;
    // About as long as fits in a 4096-byte aes128gcm body (the ece sender pads).
    let payload_for = |n: usize| {
        json!({
            "access_token": "tok",
            "notification_id": 77,
            "notification_type": "status",
            "title": "Bob posted",
            "body": "w".repeat(n),
        })
        .to_string()
    };
    let overhead = payload_for(0).len();
    let payload = payload_for(3950 - overhead);
    assert_eq!(payload.len(), 3950);
    ctx.push_ok(&reg, Style::Mastodon, &payload).await;
    ctx.expo.wait_for_token(&tok, 1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let msgs = ctx.expo.messages_for(&tok);
    assert!(
        msgs.iter().any(|m| m.ticket["status"] == "ok"),
        "Expo refused every message for this accepted push (lost): {:?}",
        msgs.iter().map(|m| (&m.ticket, m.message.to_string().len())).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn large_bodies_are_fetched_by_the_app_for_both_encodings() {
    let ctx = start().await;
    let tok = token("large");
    let reg = ctx.register(&tok).await;

    for (i, (style, enc)) in [(Style::Mastodon, "aes128gcm"), (Style::MastodonAesgcm, "aesgcm")].into_iter().enumerate() {
        let plaintext = format!("{{\"big\":\"{}\",\"enc\":\"{enc}\"}}", "x".repeat(3000));
        let r = ctx.push_ok(&reg, style, &plaintext).await;
        let message_id = location_id(&r);
        let msgs = ctx.expo.wait_for_token(&tok, i + 1, Duration::from_secs(5)).await;
        let msg = &msgs[i].message;
        assert_eq!(
            msg["data"],
            json!({"registration": reg.id, "message_id": message_id, "fetch": true}),
            "a body too large for Expo is replaced by a fetch handle: {msg}"
        );
        assert!(msg.to_string().len() <= 4096, "the Expo message itself fits: {} bytes", msg.to_string().len());
        assert_eq!(msgs[i].ticket["status"], "ok", "{}", msgs[i].ticket);

        // Wrong secret: refused, body kept.
        let (status, _, _) = ctx.app.fetch_message(&reg.id, "not-the-secret", &message_id).await;
        assert_eq!(status, 401);

        let (status, headers, body) = ctx.app.fetch_message(&reg.id, &reg.secret, &message_id).await;
        assert_eq!(status, 200, "fetch {enc}: {}", String::from_utf8_lossy(&body));
        let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        assert_eq!(h("content-encoding").as_deref(), Some(enc));
        let device = reg.recipient();
        let plain = if enc == "aesgcm" {
            let (salt, dh) = parse_aesgcm_headers(
                &h("encryption").expect("Encryption header on an aesgcm body"),
                &h("crypto-key").expect("Crypto-Key header on an aesgcm body"),
            );
            device.decrypt_aesgcm(&body, &salt.expect("salt="), &dh.expect("dh=")).unwrap()
        } else {
            device.decrypt_aes128gcm(&body).unwrap()
        };
        assert_eq!(String::from_utf8(plain).unwrap(), plaintext, "fetched {enc} body decrypts to what was sent");

        // Kept until fetched: a second fetch finds nothing.
        let (status, _, _) = ctx.app.fetch_message(&reg.id, &reg.secret, &message_id).await;
        assert_eq!(status, 404, "second fetch of {enc} body");
    }
    exactly(&ctx.expo, &tok, 2, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn urgency_maps_to_priority_and_ttl_is_sent() {
    let ctx = start().await;
    let tok = token("urgency");
    let reg = ctx.register(&tok).await;
    let cases: [(Option<&str>, &str, u64); 5] = [
        (Some("very-low"), "normal", 3600),
        (Some("low"), "normal", 7200),
        (Some("normal"), "high", 600),
        (Some("high"), "high", 86_400),
        (None, "high", 1800),
    ];
    for (i, (urgency, _, ttl)) in cases.iter().enumerate() {
        let mut req = reg.push(Style::Mastodon, &ctx.vapid).payload(format!("urgency-{i}")).ttl(Some(*ttl));
        if let Some(u) = urgency {
            req = req.urgency(u);
        }
        let r = ctx.push(req).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let msgs = exactly(&ctx.expo, &tok, cases.len(), Duration::from_secs(5)).await;
    let by_marker: HashMap<String, &Value> =
        msgs.iter().map(|m| (open_str(&reg, &m.message["data"]), &m.message)).collect();
    for (i, (urgency, priority, ttl)) in cases.iter().enumerate() {
        let msg = by_marker.get(&format!("urgency-{i}")).unwrap_or_else(|| panic!("urgency-{i} not delivered"));
        assert_eq!(msg["priority"], *priority, "Urgency {urgency:?}: {msg}");
        let sent = msg["ttl"].as_u64().unwrap_or_else(|| panic!("no ttl: {msg}"));
        assert!(sent <= *ttl && sent + 10 >= *ttl, "TTL {ttl} → expo ttl {sent}: {msg}");
    }
}

// ---------------------------------------------------------------------------
// Device tokens: rotation, gone, revival
// ---------------------------------------------------------------------------

#[tokio::test]
async fn token_rotation_by_patch_moves_delivery_to_the_new_token() {
    let ctx = start().await;
    let (old, new) = (token("old"), token("new"));
    let reg = ctx.register(&old).await;
    ctx.push_ok(&reg, Style::Mastodon, "before rotation").await;
    let msgs = ctx.expo.wait_for_token(&old, 1, Duration::from_secs(5)).await;
    assert_eq!(open_str(&reg, &msgs[0].message["data"]), "before rotation");

    let (status, v) = ctx.app.patch(&reg.id, &reg.secret, &json!({"token": new})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "active", "{v}");

    ctx.push_ok(&reg, Style::MastodonAesgcm, "after rotation").await;
    let msgs = exactly(&ctx.expo, &new, 1, Duration::from_secs(5)).await;
    assert_eq!(open_str(&reg, &msgs[0].message["data"]), "after rotation");
    assert_eq!(ctx.expo.messages_for(&old).len(), 1, "nothing more goes to the old token");
}

#[tokio::test]
async fn device_not_registered_ticket_makes_the_endpoint_gone() {
    let ctx = start().await;
    let tok = token("dead");
    let reg = ctx.register(&tok).await;
    ctx.expo.dead(&tok);

    ctx.push_ok(&reg, Style::Mastodon, "to a dead device").await;
    let msgs = ctx.expo.wait_for_token(&tok, 1, Duration::from_secs(5)).await;
    assert_eq!(msgs[0].ticket["details"]["error"], "DeviceNotRegistered");
    ctx.wait_metric("push_relay_registration_events_total", &[("event", "gone")], 1.0, Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let r = ctx.push(reg.push(Style::Mastodon, &ctx.vapid).payload("after gone")).await;
    assert_eq!(r.status, 410, "a push to a gone device: {} {}", r.status, r.body);
    assert_eq!(state(&ctx.app, &reg).await, "gone");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ctx.expo.messages_for(&tok).len(), 1, "a Gone message is not retried");
}

#[tokio::test]
async fn device_not_registered_receipt_makes_the_endpoint_gone() {
    let ctx = start().await;
    let tok = token("dead-later");
    let reg = ctx.register(&tok).await;
    ctx.expo.dead_in_receipt(&tok);

    ctx.push_ok(&reg, Style::Mastodon, "receipt will say dead").await;
    let msgs = ctx.expo.wait_for_token(&tok, 1, Duration::from_secs(5)).await;
    assert_eq!(msgs[0].ticket["status"], "ok", "the ticket is fine: {}", msgs[0].ticket);
    let ticket_id = msgs[0].ticket["id"].as_str().unwrap().to_string();
    // Still active right after the ticket.
    let r = ctx.push(reg.push(Style::Mastodon, &ctx.vapid).payload("second, before the receipt")).await;
    assert_eq!(r.status, 201, "{}", r.body);

    // receipt_delay_secs = 1: the receipt is polled about a second later.
    ctx.wait_metric("push_relay_registration_events_total", &[("event", "gone")], 1.0, Duration::from_secs(6)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        ctx.expo.receipt_requests().iter().any(|ids| ids.contains(&ticket_id)),
        "the receipt of ticket {ticket_id} was asked for: {:?}",
        ctx.expo.receipt_requests()
    );
    let r = ctx.push(reg.push(Style::Mastodon, &ctx.vapid).payload("after gone")).await;
    assert_eq!(r.status, 410, "a push after a DeviceNotRegistered receipt: {} {}", r.status, r.body);
    assert_eq!(state(&ctx.app, &reg).await, "gone");
}

#[tokio::test]
async fn gone_registration_is_revived_by_patching_a_new_token() {
    let ctx = start().await;
    let (dead, fresh) = (token("dead"), token("fresh"));
    let reg = ctx.register(&dead).await;
    ctx.expo.dead(&dead);
    ctx.push_ok(&reg, Style::Mastodon, "lost").await;
    ctx.wait_metric("push_relay_registration_events_total", &[("event", "gone")], 1.0, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = ctx.push(reg.push(Style::Mastodon, &ctx.vapid).payload("x")).await;
    assert_eq!(r.status, 410);

    let (status, v) = ctx.app.patch(&reg.id, &reg.secret, &json!({"token": fresh})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "active", "a new token revives a gone registration: {v}");
    assert_eq!(state(&ctx.app, &reg).await, "active");

    for (i, style) in [Style::Mastodon, Style::MastodonAesgcm].into_iter().enumerate() {
        let text = format!("revived {i}");
        ctx.push_ok(&reg, style, &text).await;
        let msgs = ctx.expo.wait_for_token(&fresh, i + 1, Duration::from_secs(5)).await;
        assert_eq!(open_str(&reg, &msgs[i].message["data"]), text);
    }
    exactly(&ctx.expo, &fresh, 2, Duration::from_secs(1)).await;
    assert_eq!(ctx.expo.messages_for(&dead).len(), 1);
}

/// The OS rotates the device token: the app PATCHes the new one, and a
/// moment later Expo's receipt for a message sent to the OLD token says
/// DeviceNotRegistered (which is exactly what happens to a rotated token).
/// That verdict is about the old token; the registration, now on a good
/// token, must stay active — otherwise the instance gets 410 and deletes the
/// subscription, and the user silently stops getting notifications.
#[tokio::test]
async fn receipt_for_the_old_token_does_not_kill_a_rotated_registration() {
    let expo = MockExpo::start().await;
    // Receipts 2 s after delivery: ample time to rotate first.
    let cfg = RelayConfig::new().fast_queue().limits(NO_LIMITS).expo("expo", &expo.url(), None, "receipt_delay_secs = 2\n");
    let ctx = start_with(expo, cfg).await;
    let (old, new) = (token("rotated-away"), token("rotated-to"));
    let reg = ctx.register(&old).await;
    ctx.expo.dead_in_receipt(&old);

    ctx.push_ok(&reg, Style::Mastodon, "sent to the old token").await;
    ctx.expo.wait_for_token(&old, 1, Duration::from_secs(5)).await;
    let (status, v) = ctx.app.patch(&reg.id, &reg.secret, &json!({"token": new})).await;
    assert_eq!(status, 200, "{v}");

    // Wait for the receipt check of the old token's message.
    let deadline = Instant::now() + Duration::from_secs(6);
    while ctx.expo.receipt_requests().is_empty() {
        assert!(Instant::now() < deadline, "receipts were never checked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let r = ctx.push(reg.push(Style::Mastodon, &ctx.vapid).payload("to the new token")).await;
    assert_eq!(
        r.status, 201,
        "a DeviceNotRegistered receipt for the OLD token made the rotated registration gone ({} {})",
        r.status, r.body
    );
    let msgs = ctx.expo.wait_for_token(&new, 1, Duration::from_secs(5)).await;
    assert_eq!(open_str(&reg, &msgs[0].message["data"]), "to the new token");
}

/// Same as above on the ticket side: the send to the old token is in flight
/// (held at a gate) when the app PATCHes the new token; Expo's ticket then
/// says DeviceNotRegistered — for the old token.
#[tokio::test]
async fn ticket_for_the_old_token_does_not_kill_a_rotated_registration() {
    let expo = MockExpo::start().await;
    let gate = gate(expo.url()).await;
    let ctx = start_with(expo, config(&gate.url, None, "")).await;
    let (old, new) = (token("rotated-away"), token("rotated-to"));
    let reg = ctx.register(&old).await;
    ctx.expo.dead(&old);

    ctx.push_ok(&reg, Style::Mastodon, "in flight to the old token").await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the worker is waiting at the gate
    let (status, v) = ctx.app.patch(&reg.id, &reg.secret, &json!({"token": new})).await;
    assert_eq!(status, 200, "{v}");
    gate.open.send(true).unwrap();
    let msgs = ctx.expo.wait_for_token(&old, 1, Duration::from_secs(5)).await;
    assert_eq!(msgs[0].ticket["details"]["error"], "DeviceNotRegistered");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let r = ctx.push(reg.push(Style::Mastodon, &ctx.vapid).payload("to the new token")).await;
    assert_eq!(
        r.status, 201,
        "a DeviceNotRegistered ticket for the OLD token made the rotated registration gone ({} {})",
        r.status, r.body
    );
    let msgs = ctx.expo.wait_for_token(&new, 1, Duration::from_secs(5)).await;
    assert_eq!(open_str(&reg, &msgs[0].message["data"]), "to the new token");
}

// ---------------------------------------------------------------------------
// Queue semantics: Topic, TTL
// ---------------------------------------------------------------------------

#[tokio::test]
async fn topic_replaces_a_still_queued_message() {
    let ctx = start().await;
    let tok = token("topic");
    let other = token("topic-other");
    let reg = ctx.register(&tok).await;
    let reg2 = ctx.register(&other).await;

    // The first attempt fails and Expo asks for 2 s of patience: the first
    // message sits in the queue.
    ctx.expo.fail_next(1, 503, Some(2));
    let r = ctx.push(reg.push(Style::Mastodon, &ctx.vapid).payload("old version").topic("status-42")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let deadline = Instant::now() + Duration::from_secs(3);
    while ctx.expo.send_attempts() < 1 {
        assert!(Instant::now() < deadline, "the first message was never attempted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // its retry is recorded

    // Same topic on another registration: not affected by the replacement.
    let r = ctx.push(reg2.push(Style::Mastodon, &ctx.vapid).payload("other registration").topic("status-42")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = ctx.push(reg.push(Style::Mastodon, &ctx.vapid).payload("new version").topic("status-42")).await;
    assert_eq!(r.status, 201, "{}", r.body);

    // Well past the first message's retry time.
    tokio::time::sleep(Duration::from_millis(2800)).await;
    let msgs = ctx.expo.messages_for(&tok);
    let texts: Vec<String> = msgs.iter().map(|m| open_str(&reg, &m.message["data"])).collect();
    assert_eq!(texts, vec!["new version".to_string()], "only the newer message with the topic is delivered");
    let msgs2 = ctx.expo.messages_for(&other);
    assert_eq!(msgs2.len(), 1, "the same topic on another registration is independent");
    assert_eq!(open_str(&reg2, &msgs2[0].message["data"]), "other registration");
}

#[tokio::test]
async fn ttl_expiry_drops_a_message_that_cannot_be_delivered() {
    let ctx = start().await;
    let tok = token("expiring");
    let reg = ctx.register(&tok).await;
    // Expo refuses every send (401: the relay keeps retrying until the TTL).
    ctx.expo.require_token(Some("nobody-has-this"));

    let r = ctx.push(reg.push(Style::Mastodon, &ctx.vapid).payload("short-lived").ttl(Some(2))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.header("ttl"), Some("2"));
    ctx.wait_metric("push_relay_messages_dropped_total", &[("reason", "expired")], 1.0, Duration::from_secs(5)).await;
    assert!(ctx.expo.send_attempts() >= 2, "it was retried while alive: {} attempts", ctx.expo.send_attempts());

    // Expo recovers: the expired message never shows up.
    ctx.expo.require_token(None);
    let attempts = ctx.expo.send_attempts();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(ctx.expo.messages_for(&tok).len(), 0, "an expired message was delivered");
    assert_eq!(ctx.expo.send_attempts(), attempts, "an expired message was still attempted");
    let m = ctx.metrics().await;
    assert_eq!(metric(&m, "push_relay_queue_depth", &[]), 0.0, "{m}");
}

#[tokio::test]
async fn ttl_zero_gets_one_immediate_attempt_only() {
    let ctx = start().await;
    let tok = token("ttl0");
    let reg = ctx.register(&tok).await;

    // Expo up: delivered.
    let r = ctx.push(reg.push(Style::Mastodon, &ctx.vapid).payload("now or never").ttl(Some(0))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.header("ttl"), Some("0"));
    let msgs = ctx.expo.wait_for_token(&tok, 1, Duration::from_secs(5)).await;
    assert_eq!(open_str(&reg, &msgs[0].message["data"]), "now or never");

    // Expo down at that moment: one attempt, then nothing (the next send
    // would succeed, so a retry would show up as a delivery).
    let before = ctx.expo.send_attempts();
    ctx.expo.fail_next(1, 500, None);
    let r = ctx
        .push(reg.push(Style::PleromaAesgcm, &ctx.vapid).payload("missed").ttl(Some(0)))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let deadline = Instant::now() + Duration::from_secs(3);
    while ctx.expo.send_attempts() < before + 1 {
        assert!(Instant::now() < deadline, "the TTL 0 message was never attempted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(ctx.expo.send_attempts(), before + 1, "a TTL 0 message was retried");
    assert_eq!(ctx.expo.messages_for(&tok).len(), 1, "a TTL 0 message was delivered late");
    ctx.wait_metric("push_relay_messages_dropped_total", &[("reason", "ttl0")], 1.0, Duration::from_secs(2)).await;
}

// ---------------------------------------------------------------------------
// Provider errors, auth, batching
// ---------------------------------------------------------------------------

#[tokio::test]
async fn expo_500_is_retried_until_delivered_once() {
    let ctx = start().await;
    let tok = token("retry500");
    let reg = ctx.register(&tok).await;
    ctx.expo.fail_next(3, 500, None);
    ctx.push_ok(&reg, Style::MastodonAesgcm, "after three 500s").await;
    let msgs = exactly(&ctx.expo, &tok, 1, Duration::from_secs(6)).await;
    assert_eq!(open_str(&reg, &msgs[0].message["data"]), "after three 500s");
    assert_eq!(ctx.expo.send_attempts(), 4, "3 failures + 1 success");
    ctx.wait_metric("push_relay_deliveries_total", &[("provider", "expo"), ("outcome", "retry")], 3.0, Duration::from_secs(2))
        .await;
    ctx.wait_metric(
        "push_relay_deliveries_total",
        &[("provider", "expo"), ("outcome", "delivered")],
        1.0,
        Duration::from_secs(2),
    )
    .await;
}

#[tokio::test]
async fn expo_429_retry_after_is_honoured() {
    let ctx = start().await;
    let tok = token("retry429");
    let reg = ctx.register(&tok).await;
    ctx.expo.fail_next(1, 429, Some(2));
    ctx.push_ok(&reg, Style::Mastodon, "patience").await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while ctx.expo.send_attempts() < 1 {
        assert!(Instant::now() < deadline, "never attempted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Observed at or after the refused attempt.
    let refused_at = Instant::now();
    let msgs = exactly(&ctx.expo, &tok, 1, Duration::from_secs(6)).await;
    assert_eq!(open_str(&reg, &msgs[0].message["data"]), "patience");
    let waited = msgs[0].at.duration_since(refused_at);
    assert!(waited >= Duration::from_millis(1950), "retried {waited:?} after a 429 with Retry-After: 2");
    assert!(waited <= Duration::from_millis(4000), "retry took too long: {waited:?}");
    assert_eq!(ctx.expo.send_attempts(), 2);
}

#[tokio::test]
async fn access_token_is_sent_as_bearer_and_not_logged() {
    const EXPO_TOKEN: &str = "expo-access-token-Qw7Zr2";
    let expo = MockExpo::start().await;
    expo.require_token(Some(EXPO_TOKEN));
    let cfg = config(&expo.url(), Some(EXPO_TOKEN), "");
    let ctx = start_with(expo, cfg).await;
    let tok = token("bearer");
    let reg = ctx.register(&tok).await;
    ctx.push_ok(&reg, Style::Mastodon, "authorized").await;
    let msgs = exactly(&ctx.expo, &tok, 1, Duration::from_secs(5)).await;
    assert_eq!(msgs[0].authorization.as_deref(), Some(format!("Bearer {EXPO_TOKEN}").as_str()));
    assert_eq!(open_str(&reg, &msgs[0].message["data"]), "authorized");
    assert_eq!(ctx.expo.send_attempts(), 1, "no 401 on the way");
    assert!(!ctx.relay.log().contains(EXPO_TOKEN), "the Expo access token is in the log");
}

/// A transparent proxy in front of the mock Expo that holds every request
/// until opened (so that messages pile up in the relay's queue).
struct Gate {
    url: String,
    open: tokio::sync::watch::Sender<bool>,
}

async fn gate(target: String) -> Gate {
    use warp::Filter;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let client = reqwest::Client::new();
    let route = warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .and_then(
            move |method: warp::http::Method, path: warp::path::FullPath, headers: warp::http::HeaderMap, body: bytes::Bytes| {
                let mut rx = rx.clone();
                let client = client.clone();
                let url = format!("{target}{}", path.as_str());
                async move {
                    while !*rx.borrow_and_update() {
                        if rx.changed().await.is_err() {
                            break;
                        }
                    }
                    let mut rb = client.request(method, url).body(body.to_vec());
                    for (k, v) in headers.iter() {
                        if k != "host" && k != "content-length" {
                            rb = rb.header(k, v);
                        }
                    }
                    let resp = rb.send().await.expect("gate: forward to MockExpo");
                    let mut out = warp::http::Response::builder().status(resp.status());
                    for (k, v) in resp.headers() {
                        if k != "content-length" && k != "transfer-encoding" {
                            out = out.header(k, v);
                        }
                    }
                    let bytes = resp.bytes().await.unwrap_or_default();
                    Ok::<_, warp::Rejection>(out.body(bytes.to_vec()).unwrap())
                }
            },
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(route).incoming(listener).run());
    Gate { url: format!("http://{addr}"), open: tx }
}

#[tokio::test]
async fn queued_messages_go_out_in_batches_of_at_most_100() {
    let expo = MockExpo::start().await;
    let gate = gate(expo.url()).await;
    let cfg = config(&gate.url, None, "");
    let ctx = start_with(expo, cfg).await;
    let tok = token("batch");
    let reg = ctx.register(&tok).await;

    // Expo "hangs": the workers' first requests wait at the gate while 150
    // messages pile up in the queue.
    for i in 0..150 {
        let r = ctx.push(reg.push(Style::Mastodon, &ctx.vapid).payload(format!("batch-{i}"))).await;
        assert_eq!(r.status, 201, "push {i}: {}", r.body);
    }
    gate.open.send(true).unwrap();

    let msgs = exactly(&ctx.expo, &tok, 150, Duration::from_secs(8)).await;
    let sizes = ctx.expo.batch_sizes();
    assert!(sizes.iter().all(|&n| n <= 100), "batch over 100: {sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 150, "{sizes:?}");
    assert_eq!(sizes.iter().max(), Some(&100), "the piled-up messages go out 100 at a time: {sizes:?}");
    assert_eq!(ctx.expo.send_attempts(), sizes.len(), "no refused request (e.g. over 100): {sizes:?}");
    let texts: HashSet<String> = msgs.iter().map(|m| open_str(&reg, &m.message["data"])).collect();
    let want: HashSet<String> = (0..150).map(|i| format!("batch-{i}")).collect();
    assert_eq!(texts, want);
}

/// Fresh pushes go straight to a worker through a hand-off of
/// `workers × batch_size` places (here 1 × 5); the ones that find it full
/// are queued for a claim. Both paths together deliver every push once.
#[tokio::test]
async fn pushes_beyond_the_hand_off_are_claimed_from_the_queue() {
    let expo = MockExpo::start().await;
    let gate = gate(expo.url()).await;
    let cfg = config(&gate.url, None, "").queue("workers = 1\nbatch_size = 5");
    let ctx = start_with(expo, cfg).await;
    let tok = token("handoff");
    let reg = ctx.register(&tok).await;

    // The only worker's first request waits at the gate: the hand-off
    // fills up and the rest wait in the store.
    for i in 0..40 {
        let r = ctx.push(reg.push(Style::Mastodon, &ctx.vapid).payload(format!("handoff-{i}"))).await;
        assert_eq!(r.status, 201, "push {i}: {}", r.body);
    }
    gate.open.send(true).unwrap();

    let msgs = exactly(&ctx.expo, &tok, 40, Duration::from_secs(8)).await;
    let sizes = ctx.expo.batch_sizes();
    assert!(sizes.iter().all(|&n| n <= 5), "batches follow batch_size: {sizes:?}");
    let texts: HashSet<String> = msgs.iter().map(|m| open_str(&reg, &m.message["data"])).collect();
    let want: HashSet<String> = (0..40).map(|i| format!("handoff-{i}")).collect();
    assert_eq!(texts, want);
    // Nothing comes twice, even well after the 5 s leases of the handed-off ones.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert_eq!(ctx.expo.messages_for(&tok).len(), 40, "a handed-off message was delivered again");
}

// ---------------------------------------------------------------------------
// Durability: crash, PostgreSQL, scale-out
// ---------------------------------------------------------------------------

/// Push `count` messages (payload `"{prefix}-{i}"`) with up to 8 in flight,
/// alternating between `endpoints` (all the same registration). Returns the
/// markers answered 201; connection errors (a dead relay) are not 201s.
async fn push_many(endpoints: Vec<String>, reg: Registration, vapid: Vapid, prefix: String, count: usize) -> Vec<String> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let endpoint = endpoints[i % endpoints.len()].clone();
        let (reg, vapid, http, accepted) = (reg.clone(), vapid.clone(), http.clone(), accepted.clone());
        let marker = format!("{prefix}-{i}");
        tasks.spawn(async move {
            let _permit = permit;
            let style = if i % 2 == 0 { Style::Mastodon } else { Style::MastodonAesgcm };
            let req = PushRequest::new(&endpoint, style, &vapid, &reg.p256dh, &reg.auth).payload(&marker);
            if let Ok(resp) = req.build(&http).send().await {
                if resp.status().as_u16() == 201 {
                    accepted.lock().unwrap().push(marker);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let v = accepted.lock().unwrap().clone();
    v
}

/// Decrypted markers of everything Expo got for `token`, with counts.
fn delivered_markers(expo: &MockExpo, reg: &Registration, token: &str) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for m in expo.messages_for(token) {
        *seen.entry(open_str(reg, &m.message["data"])).or_insert(0) += 1;
    }
    seen
}

/// Wait until every marker in `want` was delivered; panics with the missing ones.
async fn wait_all_delivered(expo: &MockExpo, reg: &Registration, token: &str, want: &[String], timeout: Duration) -> HashMap<String, usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = delivered_markers(expo, reg, token);
        let missing: Vec<&String> = want.iter().filter(|m| !seen.contains_key(*m)).collect();
        if missing.is_empty() {
            return seen;
        }
        if Instant::now() >= deadline {
            panic!(
                "{} of {} accepted (201) messages were never delivered, e.g. {:?}",
                missing.len(),
                want.len(),
                &missing[..missing.len().min(10)]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn crash_test(store_url: Option<&str>) {
    let expo = MockExpo::start().await;
    let mut cfg = config(&expo.url(), None, "");
    if let Some(url) = store_url {
        cfg = cfg.store(url);
    }
    let mut ctx = start_with(expo, cfg).await;
    let tok = token("crash");
    let reg = ctx.register(&tok).await;
    // Expo refuses everything: accepted messages sit in the queue.
    ctx.expo.require_token(Some("locked"));

    let pusher = tokio::spawn(push_many(vec![reg.endpoint.clone()], reg.clone(), ctx.vapid.clone(), "crash".into(), 400));
    // Kill -9 once some pushes were accepted and while more are coming.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pushed = metric(&ctx.metrics().await, "push_relay_pushes_total", &[("status", "201")]);
        if pushed >= 100.0 {
            break;
        }
        assert!(Instant::now() < deadline, "only {pushed} pushes accepted in 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ctx.relay.kill9();
    let accepted = pusher.await.unwrap();
    eprintln!("crash test: {} pushes answered 201 before/around the kill", accepted.len());
    assert!(accepted.len() >= 100 && accepted.len() < 400, "the kill should land mid-way: {} accepted", accepted.len());
    assert!(ctx.expo.messages_for(&tok).is_empty(), "Expo accepted nothing before the crash");

    ctx.relay.restart().await;
    ctx.expo.require_token(None);
    // Messages leased at the kill come back when their lease (5 s) ends.
    let seen = wait_all_delivered(&ctx.expo, &reg, &tok, &accepted, Duration::from_secs(12)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen_after = delivered_markers(&ctx.expo, &reg, &tok);
    let dups: Vec<(&String, &usize)> = seen_after.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicates although Expo accepted nothing before the crash: {dups:?}");
    assert!(seen.len() >= accepted.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_no_accepted_message_sqlite() {
    crash_test(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_no_accepted_message_postgres() {
    let url = postgres::fresh_database().await;
    crash_test(Some(&url)).await;
    postgres::drop_database(&url).await;
}

#[tokio::test]
async fn postgres_store_delivers_opaque_large_retried_and_gone() {
    let url = postgres::fresh_database().await;
    let expo = MockExpo::start().await;
    let cfg = config(&expo.url(), None, "").store(&url);
    let ctx = start_with(expo, cfg).await;
    let tok = token("pg");
    let reg = ctx.register(&tok).await;

    // Opaque, both encodings, the second after two 500s.
    ctx.push_ok(&reg, Style::Mastodon, "pg aes128gcm").await;
    let msgs = ctx.expo.wait_for_token(&tok, 1, Duration::from_secs(5)).await;
    assert_opaque_shape(&msgs[0], &reg, "aes128gcm");
    assert_eq!(open_str(&reg, &msgs[0].message["data"]), "pg aes128gcm");
    ctx.expo.fail_next(2, 500, None);
    ctx.push_ok(&reg, Style::MastodonAesgcm, "pg aesgcm").await;
    let msgs = ctx.expo.wait_for_token(&tok, 2, Duration::from_secs(5)).await;
    assert_opaque_shape(&msgs[1], &reg, "aesgcm");
    assert_eq!(open_str(&reg, &msgs[1].message["data"]), "pg aesgcm");

    // Large body: fetched once.
    let big = format!("{{\"big\":\"{}\"}}", "y".repeat(3000));
    let r = ctx.push_ok(&reg, Style::MastodonAesgcm, &big).await;
    let message_id = location_id(&r);
    let msgs = ctx.expo.wait_for_token(&tok, 3, Duration::from_secs(5)).await;
    assert_eq!(msgs[2].message["data"], json!({"registration": reg.id, "message_id": message_id, "fetch": true}));
    let (status, headers, body) = ctx.app.fetch_message(&reg.id, &reg.secret, &message_id).await;
    assert_eq!(status, 200);
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert_eq!(h("content-encoding"), "aesgcm");
    let (salt, dh) = parse_aesgcm_headers(&h("encryption"), &h("crypto-key"));
    let plain = reg.recipient().decrypt_aesgcm(&body, &salt.expect("salt"), &dh.expect("dh")).unwrap();
    assert_eq!(String::from_utf8(plain).unwrap(), big);
    let (status, _, _) = ctx.app.fetch_message(&reg.id, &reg.secret, &message_id).await;
    assert_eq!(status, 404);
    exactly(&ctx.expo, &tok, 3, Duration::from_secs(1)).await;

    // Gone, then revived.
    ctx.expo.dead(&tok);
    ctx.push_ok(&reg, Style::Mastodon, "to the dead").await;
    ctx.wait_metric("push_relay_registration_events_total", &[("event", "gone")], 1.0, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = ctx.push(reg.push(Style::Mastodon, &ctx.vapid).payload("x")).await;
    assert_eq!(r.status, 410, "{}", r.body);
    let fresh = token("pg-fresh");
    let (status, v) = ctx.app.patch(&reg.id, &reg.secret, &json!({"token": fresh})).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("active")), "{v}");
    ctx.push_ok(&reg, Style::Mastodon, "revived on pg").await;
    let msgs = exactly(&ctx.expo, &fresh, 1, Duration::from_secs(5)).await;
    assert_eq!(open_str(&reg, &msgs[0].message["data"]), "revived on pg");

    drop(ctx);
    postgres::drop_database(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_sharing_postgres_deliver_each_message_exactly_once() {
    let url = postgres::fresh_database().await;
    let expo = MockExpo::start().await;
    let a = Relay::start(config(&expo.url(), None, "").store(&url)).await;
    let b = Relay::start(config(&expo.url(), None, "").store(&url)).await;
    let vapid = Vapid::generate();
    let tok = token("scale");
    let reg = register(&a.app(), &tok, &vapid, false).await;
    let endpoint_b = reg.endpoint.replace(&a.base_url(), &b.base_url());
    assert_ne!(endpoint_b, reg.endpoint, "endpoint {} is not under {}", reg.endpoint, a.base_url());
    let endpoints = vec![reg.endpoint.clone(), endpoint_b];

    // Half while Expo refuses (both relays keep retrying the same queue),
    // half while it accepts.
    expo.require_token(Some("locked"));
    let mut accepted = push_many(endpoints.clone(), reg.clone(), vapid.clone(), "locked".into(), 100).await;
    assert_eq!(accepted.len(), 100);
    tokio::time::sleep(Duration::from_millis(500)).await;
    expo.require_token(None);
    let open = push_many(endpoints, reg.clone(), vapid.clone(), "open".into(), 100).await;
    assert_eq!(open.len(), 100);
    accepted.extend(open);

    wait_all_delivered(&expo, &reg, &tok, &accepted, Duration::from_secs(8)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let seen = delivered_markers(&expo, &reg, &tok);
    let dups: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "delivered by both relays: {dups:?}");
    assert_eq!(seen.len(), 200);
    // Both processes did deliver.
    let da = metric(&a.metrics().await, "push_relay_deliveries_total", &[("outcome", "delivered")]);
    let db = metric(&b.metrics().await, "push_relay_deliveries_total", &[("outcome", "delivered")]);
    eprintln!("two relays: A delivered {da}, B delivered {db}");
    assert_eq!(da + db, 200.0, "A {da} + B {db}");

    drop((a, b));
    postgres::drop_database(&url).await;
}
