//! Smoke tests of the harness itself (no relay needed): the mock Expo server
//! answers like Expo, our encoder round-trips, and pywebpush's output decrypts
//! with our decryption and carries a valid VAPID JWT.

use push_relay_e2e::webpush::{origin_of, parse_aesgcm_headers, unix_now, verify_jwt};
use push_relay_e2e::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use warp::Filter;

async fn post_json(url: &str, body: &Value, bearer: Option<&str>) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut rb = reqwest::Client::new().post(url).json(body);
    if let Some(t) = bearer {
        rb = rb.bearer_auth(t);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap())
}

#[tokio::test]
async fn mock_expo_speaks_the_push_api() {
    let expo = MockExpo::start().await;
    let send = format!("{}/--/api/v2/push/send", expo.url());
    let receipts = format!("{}/--/api/v2/push/getReceipts", expo.url());
    expo.dead("ExponentPushToken[dead]");
    expo.dead_in_receipt("ExponentPushToken[later]");

    // A batch of three: ok, dead in ticket, dead in receipt.
    let batch = json!([
        {"to": "ExponentPushToken[ok]", "title": "t1", "body": "b1", "priority": "high"},
        {"to": "ExponentPushToken[dead]", "title": "t2"},
        {"to": "ExponentPushToken[later]", "title": "t3", "ttl": 60},
    ]);
    let (status, _, v) = post_json(&send, &batch, Some("tok")).await;
    assert_eq!(status, 200, "{v}");
    let tickets = v["data"].as_array().expect("data array");
    assert_eq!(tickets.len(), 3);
    assert_eq!(tickets[0]["status"], "ok");
    let ok_id = tickets[0]["id"].as_str().unwrap().to_string();
    assert_eq!(ok_id.len(), 36, "uuid-like id: {ok_id}");
    assert_eq!(tickets[1]["status"], "error");
    assert_eq!(tickets[1]["details"]["error"], "DeviceNotRegistered");
    assert!(tickets[1].get("id").is_none());
    assert_eq!(tickets[2]["status"], "ok");
    let later_id = tickets[2]["id"].as_str().unwrap().to_string();

    // Recorded: all three, in order, with the Authorization header.
    let msgs = expo.wait_for(3, Duration::from_secs(1)).await;
    assert_eq!(msgs.iter().map(|m| m.token.as_str()).collect::<Vec<_>>(), [
        "ExponentPushToken[ok]",
        "ExponentPushToken[dead]",
        "ExponentPushToken[later]"
    ]);
    assert_eq!(msgs[0].message["title"], "t1");
    assert_eq!(msgs[0].authorization.as_deref(), Some("Bearer tok"));
    assert_eq!(expo.messages_for("ExponentPushToken[later]").len(), 1);
    assert_eq!(expo.batch_sizes(), vec![3]);

    // Receipts: ok / DeviceNotRegistered; unknown ids are left out.
    let (status, _, v) = post_json(&receipts, &json!({"ids": [ok_id, later_id, "nope"]}), None).await;
    assert_eq!(status, 200);
    assert_eq!(v["data"][&ok_id], json!({"status": "ok"}));
    assert_eq!(v["data"][&later_id]["status"], "error");
    assert_eq!(v["data"][&later_id]["details"]["error"], "DeviceNotRegistered");
    assert!(v["data"].get("nope").is_none());
    assert_eq!(expo.receipt_requests(), vec![vec![ok_id.clone(), later_id.clone(), "nope".to_string()]]);

    // Scripted failures: 429 with Retry-After, then 500; nothing recorded.
    expo.fail_next(1, 429, Some(7));
    expo.fail_next(1, 500, None);
    let one = json!([{"to": "ExponentPushToken[ok]", "title": "again"}]);
    let (status, headers, v) = post_json(&send, &one, None).await;
    assert_eq!(status, 429);
    assert_eq!(headers.get("retry-after").unwrap(), "7");
    assert_eq!(v["errors"][0]["code"], "TOO_MANY_REQUESTS");
    let (status, headers, _) = post_json(&send, &one, None).await;
    assert_eq!(status, 500);
    assert!(headers.get("retry-after").is_none());
    assert_eq!(expo.messages().len(), 3, "failed requests record nothing");
    let (status, _, _) = post_json(&send, &one, None).await;
    assert_eq!(status, 200);
    assert_eq!(expo.messages().len(), 4);
    assert_eq!(expo.send_attempts(), 4);

    // Too many notifications: 101 → 400, nothing recorded.
    let many: Vec<Value> = (0..101).map(|i| json!({"to": format!("ExponentPushToken[{i}]")})).collect();
    let (status, _, v) = post_json(&send, &Value::Array(many), None).await;
    assert_eq!(status, 400);
    assert_eq!(v["errors"][0]["code"], "PUSH_TOO_MANY_NOTIFICATIONS");
    assert_eq!(expo.messages().len(), 4);
    // Exactly 100 is fine.
    let hundred: Vec<Value> = (0..100).map(|i| json!({"to": format!("ExponentPushToken[{i}]")})).collect();
    let (status, _, v) = post_json(&send, &Value::Array(hundred), None).await;
    assert_eq!(status, 200);
    assert_eq!(v["data"].as_array().unwrap().len(), 100);
    assert_eq!(expo.batch_sizes(), vec![3, 1, 100]);

    // A single object gets a single ticket; `to` arrays fan out.
    let (status, _, v) = post_json(&send, &json!({"to": "ExponentPushToken[solo]"}), None).await;
    assert_eq!(status, 200);
    assert_eq!(v["data"]["status"], "ok");
    let (_, _, v) = post_json(&send, &json!([{"to": ["ExponentPushToken[a]", "ExponentPushToken[b]"]}]), None).await;
    assert_eq!(v["data"].as_array().unwrap().len(), 2);

    // Oversized message → MessageTooBig ticket.
    let (_, _, v) = post_json(&send, &json!([{"to": "ExponentPushToken[big]", "data": {"x": "y".repeat(5000)}}]), None).await;
    assert_eq!(v["data"][0]["details"]["error"], "MessageTooBig");

    // Missing `to` → 400 validation error.
    let (status, _, v) = post_json(&send, &json!([{"title": "no to"}]), None).await;
    assert_eq!(status, 400);
    assert_eq!(v["errors"][0]["code"], "VALIDATION_ERROR");

    // Access token enforcement.
    expo.require_token(Some("secret"));
    let (status, _, _) = post_json(&send, &one, None).await;
    assert_eq!(status, 401);
    let (status, _, _) = post_json(&send, &one, Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, _, _) = post_json(&send, &one, Some("secret")).await;
    assert_eq!(status, 200);
    assert_eq!(expo.messages().last().unwrap().authorization.as_deref(), Some("Bearer secret"));

    // Receipts can be held back (not ready yet).
    expo.hold_receipts(true);
    let (_, _, v) = post_json(&receipts, &json!({"ids": [ok_id]}), None).await;
    assert_eq!(v["data"], json!({}));
}

#[tokio::test]
#[should_panic(expected = "timed out")]
async fn mock_expo_wait_for_times_out_loudly() {
    let expo = MockExpo::start().await;
    expo.wait_for(1, Duration::from_millis(200)).await;
}

#[test]
fn encoder_round_trip() {
    let device = Recipient::generate();
    assert_eq!(device.public_key.len(), 65);
    let plaintext = mastodon_payload(42, "secret-access-token");

    let body = encrypt_aes128gcm(&device.public_key, &device.auth, plaintext.as_bytes());
    assert_eq!(device.decrypt_aes128gcm(&body).unwrap(), plaintext.as_bytes());

    let (body, salt, dh) = encrypt_aesgcm(&device.public_key, &device.auth, plaintext.as_bytes());
    assert_eq!(salt.len(), 16);
    assert_eq!(dh.len(), 65);
    assert_eq!(device.decrypt_aesgcm(&body, &salt, &dh).unwrap(), plaintext.as_bytes());

    // Wrong auth secret fails.
    let other = Recipient::generate();
    assert!(decrypt_aesgcm(&device.private_key, &device.public_key, &other.auth, &body, &salt, &dh).is_err());

    // The request builder: headers per style, and the body decrypts.
    let vapid = Vapid::generate();
    let endpoint = "http://127.0.0.1:8080/push/abc";
    for style in [Style::Mastodon, Style::Misskey, Style::PleromaAesgcm, Style::MastodonAesgcm] {
        let p = PushRequest::new(endpoint, style, &vapid, &device.public_key, &device.auth)
            .payload(&plaintext)
            .urgency("high")
            .topic("t1")
            .prepare();
        assert_eq!(p.header("content-encoding"), Some(style.encoding()));
        assert_eq!(p.header("urgency"), Some("high"));
        assert_eq!(p.header("topic"), Some("t1"));
        let auth = p.header("authorization").unwrap();
        let jwt = match style {
            Style::Mastodon => {
                let rest = auth.strip_prefix("vapid t=").unwrap();
                let (jwt, k) = rest.split_once(",k=").unwrap();
                assert_eq!(k, vapid.public_key_b64());
                jwt.to_string()
            }
            Style::Misskey => {
                let rest = auth.strip_prefix("vapid t=").unwrap();
                let (jwt, k) = rest.split_once(", k=").unwrap();
                assert_eq!(k, vapid.public_key_b64());
                jwt.to_string()
            }
            _ => {
                let ck = p.header("crypto-key").unwrap();
                assert!(ck.contains(&format!("p256ecdsa={}", vapid.public_key_b64())), "{ck}");
                auth.strip_prefix("WebPush ").unwrap().to_string()
            }
        };
        let (header, claims) = verify_jwt(&jwt, &vapid.public_key()).unwrap();
        assert_eq!(header, json!({"typ": "JWT", "alg": "ES256"}));
        assert_eq!(claims["aud"], "http://127.0.0.1:8080");
        assert_eq!(claims["sub"], "mailto:test@example.org");
        assert!(claims["exp"].as_u64().unwrap() > unix_now());
        let plain = if style.encoding() == "aes128gcm" {
            device.decrypt_aes128gcm(&p.body).unwrap()
        } else {
            let (salt, dh) = parse_aesgcm_headers(p.header("encryption").unwrap(), p.header("crypto-key").unwrap());
            device.decrypt_aesgcm(&p.body, &salt.unwrap(), &dh.unwrap()).unwrap()
        };
        assert_eq!(plain, plaintext.as_bytes());
    }
    // TTL header spelling and overrides.
    let p = PushRequest::new(endpoint, Style::PleromaAesgcm, &vapid, &device.public_key, &device.auth).prepare();
    assert_eq!(p.header("ttl"), Some("0"));
    let p = PushRequest::new(endpoint, Style::Mastodon, &vapid, &device.public_key, &device.auth)
        .ttl(None)
        .without_header("content-type")
        .header("Encryption", "garbage")
        .raw_body(b"xyz")
        .prepare();
    assert!(p.header("ttl").is_none() && p.header("content-type").is_none());
    assert_eq!(p.header("encryption"), Some("garbage"));
    assert_eq!(p.body, b"xyz");
    // A JWT signed by one key does not verify under another.
    let other = Vapid::generate();
    assert!(verify_jwt(&vapid.jwt("http://x", 1, None), &other.public_key()).is_err());

    assert_eq!(origin_of("https://relay.example:443/push/x"), "https://relay.example");
    assert_eq!(origin_of("http://127.0.0.1:9/push/x?y"), "http://127.0.0.1:9");
    assert_eq!(b64decode_any("+/+/"), b64decode_any("-_-_"));
    assert_eq!(b64decode_any("YQ=="), b"a");
    assert_eq!(b64decode_any("YQ"), b"a");
}

/// One request the capture server got.
#[derive(Clone, Debug)]
struct Captured {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Captured {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A tiny push service that records requests and answers 201.
async fn capture_server() -> (SocketAddr, Arc<Mutex<Vec<Captured>>>) {
    let store: Arc<Mutex<Vec<Captured>>> = Arc::default();
    let s = store.clone();
    let route = warp::post()
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .map(move |headers: warp::http::HeaderMap, body: bytes::Bytes| {
            let headers = headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            s.lock().unwrap().push(Captured { headers, body: body.to_vec() });
            warp::reply::with_status(warp::reply::with_header("", "location", "/m/1"), warp::http::StatusCode::CREATED)
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(route).incoming(listener).run());
    (addr, store)
}

#[tokio::test]
async fn pywebpush_output_decrypts_with_our_decrypt() {
    let (addr, captured) = capture_server().await;
    let dir = tempfile::tempdir().unwrap();
    let vapid = pywebpush::VapidPem::generate(dir.path(), "vapid.pem");
    assert_eq!(vapid.public_key_b64, pywebpush::pem_public_key_b64(&vapid.path));
    let device = Recipient::generate();
    let endpoint = format!("http://{addr}/push/reg123");
    let payload = mastodon_payload(7, "tok-123");

    for (i, encoding) in ["aes128gcm", "aesgcm"].into_iter().enumerate() {
        // Hand the keys over in standard base64 with padding, to exercise decoding.
        use base64::Engine;
        let p256dh = base64::engine::general_purpose::STANDARD.encode(&device.public_key);
        let auth = base64::engine::general_purpose::STANDARD.encode(&device.auth);
        let (status, out) = pywebpush::send(&endpoint, &p256dh, &auth, &payload, encoding, 120, &vapid.path).await;
        assert_eq!(status, 201, "{out}");
        assert_eq!(out["headers"]["location"], "/m/1", "{out}");

        let req = captured.lock().unwrap()[i].clone();
        assert_eq!(req.header("content-encoding"), Some(encoding));
        assert_eq!(req.header("ttl"), Some("120"));

        // VAPID: `vapid t=<jwt>,k=<key>`, signature valid under the PEM's public key.
        let authz = req.header("authorization").expect("Authorization header");
        let rest = authz.strip_prefix("vapid t=").unwrap_or_else(|| panic!("unexpected Authorization: {authz}"));
        let (jwt, k) = rest.split_once(",k=").unwrap_or_else(|| panic!("unexpected Authorization: {authz}"));
        assert_eq!(b64decode_any(k), b64decode_any(&vapid.public_key_b64));
        let (header, claims) = verify_jwt(jwt, &b64decode_any(&vapid.public_key_b64)).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(claims["aud"], origin_of(&endpoint));
        assert_eq!(claims["sub"], "mailto:test@example.org");
        let exp = claims["exp"].as_u64().unwrap();
        assert!(exp > unix_now() && exp <= unix_now() + 24 * 3600 + 60, "exp {exp}");

        // The body decrypts with the device keys.
        let plain = if encoding == "aes128gcm" {
            device.decrypt_aes128gcm(&req.body).unwrap()
        } else {
            let (salt, dh) = parse_aesgcm_headers(
                req.header("encryption").expect("Encryption header"),
                req.header("crypto-key").expect("Crypto-Key header"),
            );
            device.decrypt_aesgcm(&req.body, &salt.expect("salt"), &dh.expect("dh")).unwrap()
        };
        assert_eq!(String::from_utf8(plain).unwrap(), payload);
    }
    assert_eq!(captured.lock().unwrap().len(), 2);
}
