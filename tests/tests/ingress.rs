//! End-to-end tests of the relay's front doors: the app API (SPEC §3), the Web
//! Push ingress and every answer of SPEC §4, the operations endpoints and
//! `check-config` (SPEC §8), and hostile input.
//!
//! Every test runs the real `push-relay` binary (build it first:
//! `cargo build -p push-relay`) with its Expo provider pointed at a
//! [`MockExpo`], so nothing leaves the machine.

use base64::Engine;
use openssl::bn::BigNumContext;
use openssl::ec::{EcGroup, EcKey, EcPoint, PointConversionForm};
use openssl::nid::Nid;
use openssl::pkey::PKey;
use push_relay_e2e::pywebpush::{self, VapidPem};
use push_relay_e2e::webpush::{origin_of, unix_now};
use push_relay_e2e::*;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Limits so high that they never get in the way of a test that is not about them.
const LOOSE: &str = "per_instance = { per_second = 1000, burst = 1000 }\n\
                     per_registration = { per_second = 1000, burst = 1000 }\n\
                     registrations_per_ip = { per_minute = 1000, burst = 1000 }";

const INSTANCE: &str = "mastodon.example";

/// A MockExpo and a relay whose `expo` provider points at it.
async fn start(limits: &str, server: &str) -> (MockExpo, Relay) {
    let expo = MockExpo::start().await;
    let mut config = RelayConfig::new().expo("expo", &expo.url(), None, "").fast_queue();
    if !limits.is_empty() {
        config = config.limits(limits);
    }
    if !server.is_empty() {
        config = config.server(server);
    }
    let relay = Relay::start(config).await;
    (expo, relay)
}

fn expo_token() -> String {
    format!("ExponentPushToken[{:016x}]", rand::random::<u64>())
}

/// One-step registration: confirmed at once with `vapid`'s key.
async fn confirmed(app: &AppClient, vapid: &Vapid, allow_decrypt: bool) -> Registration {
    let r = app
        .register_ok("expo", &expo_token(), INSTANCE, Some(&vapid.public_key_b64()), Some(allow_decrypt))
        .await;
    assert!(r.confirmed, "one-step registration must be confirmed: {}", r.raw);
    r
}

/// Asserts an error answer of the app API: status and JSON `error` code, and a
/// non-empty `message`.
#[track_caller]
fn assert_api_error(got: &(u16, Value), status: u16, code: &str) {
    let (s, body) = got;
    assert_eq!(*s, status, "expected {status} {code}, got {s}: {body}");
    assert_eq!(body["error"], code, "expected error code {code:?} with {status}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error answers carry a human message: {body}"
    );
}

/// Asserts an error answer of the push ingress: status and JSON `error` code.
#[track_caller]
fn assert_push_error(r: &PushResponse, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: expected {status} {code}, got {} {}", r.status, r.body);
    let v = r.json();
    assert_eq!(v["error"], code, "{what}: expected error code {code:?}: {}", r.body);
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: no message: {}", r.body);
}

/// Asserts a `201` with a `Location` for this registration and the `TTL` echoed.
#[track_caller]
fn assert_accepted(r: &PushResponse, base: &str, reg: &Registration, ttl: u64, what: &str) -> String {
    assert_eq!(r.status, 201, "{what}: expected 201, got {} {}", r.status, r.body);
    let location = r.header("location").unwrap_or_else(|| panic!("{what}: 201 without Location: {:?}", r.headers));
    let prefix = format!("{base}/v1/registrations/{}/messages/", reg.id);
    let message_id = location
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{what}: Location {location:?} is not under {prefix:?}"));
    assert!(
        !message_id.is_empty() && !message_id.contains('/') && !message_id.contains('?'),
        "{what}: bad message id in Location {location:?}"
    );
    assert_eq!(
        r.header("ttl"),
        Some(ttl.to_string().as_str()),
        "{what}: TTL echo; headers {:?}",
        r.headers
    );
    message_id.to_string()
}

#[track_caller]
fn retry_after(headers: &reqwest::header::HeaderMap) -> u64 {
    let v = headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After in {headers:?}"))
        .to_str()
        .unwrap();
    v.parse().unwrap_or_else(|_| panic!("Retry-After is not delta-seconds: {v:?}"))
}

/// The value of one sample line (`name{labels}`) in Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap()
}

/// Sends raw bytes over HTTP/1.1 and reads the answer until the server closes
/// the connection. Returns `(status, whole answer)`, or `None` if the server
/// closed without answering. Write errors are ignored (a server may answer
/// and close before reading a too-large body).
async fn raw_http(port: u16, request: &[u8]) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect to relay");
    let _ = stream.write_all(request).await;
    let _ = stream.flush().await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    // Stop once a complete answer with a Content-Length body is in.
                    if let Some(end) = complete_response(&buf) {
                        buf.truncate(end);
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "raw request: no complete answer within 5 s; got {:?}", String::from_utf8_lossy(&buf));
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((status, text))
}

fn complete_response(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())?;
    (buf.len() >= head_end + len).then_some(head_end + len)
}

/// The head of a raw `POST` (request line + headers + blank line).
fn raw_head(port: u16, path: &str, headers: &[(String, String)], extra: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n").into_bytes();
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    for line in extra {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn path_of(url: &str) -> String {
    let rest = url.split_once("://").unwrap().1;
    format!("/{}", rest.split_once('/').unwrap().1)
}

/// `body` as one HTTP/1.1 chunked body, in chunks of `size` bytes.
fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let pkey = PKey::hmac(key).unwrap();
    let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &pkey).unwrap();
    signer.update(data).unwrap();
    signer.sign_to_vec().unwrap()
}

/// RFC 8291 `aes128gcm` with a chosen record size and several records, the
/// way GoToSocial writes it (the harness's `ece` encoder always writes one
/// 4096-byte record). Written from the RFC with OpenSSL primitives; the test
/// checks it round-trips through `ece`'s decoder before using it.
fn encrypt_aes128gcm_rs(p256dh: &[u8], auth: &[u8], plaintext: &[u8], rs: u32) -> Vec<u8> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let mut ctx = BigNumContext::new().unwrap();
    let ephemeral = EcKey::generate(&group).unwrap();
    let as_public = ephemeral
        .public_key()
        .to_bytes(&group, PointConversionForm::UNCOMPRESSED, &mut ctx)
        .unwrap();
    let ua_point = EcPoint::from_bytes(&group, p256dh, &mut ctx).unwrap();
    let ua_key = PKey::from_ec_key(EcKey::from_public_key(&group, &ua_point).unwrap()).unwrap();
    let own = PKey::from_ec_key(ephemeral).unwrap();
    let mut deriver = openssl::derive::Deriver::new(&own).unwrap();
    deriver.set_peer(&ua_key).unwrap();
    let ecdh = deriver.derive_to_vec().unwrap();

    let mut salt = [0u8; 16];
    openssl::rand::rand_bytes(&mut salt).unwrap();
    // RFC 8291 §3.4.
    let prk_key = hmac_sha256(auth, &ecdh);
    let mut key_info = b"WebPush: info\0".to_vec();
    key_info.extend_from_slice(p256dh);
    key_info.extend_from_slice(&as_public);
    key_info.push(1);
    let ikm = hmac_sha256(&prk_key, &key_info);
    // RFC 8188 §2.2 / §2.3.
    let prk = hmac_sha256(&salt, &ikm);
    let cek = hmac_sha256(&prk, b"Content-Encoding: aes128gcm\0\x01")[..16].to_vec();
    let nonce = hmac_sha256(&prk, b"Content-Encoding: nonce\0\x01")[..12].to_vec();

    let mut out = salt.to_vec();
    out.extend_from_slice(&rs.to_be_bytes());
    out.push(65);
    out.extend_from_slice(&as_public);
    let per_record = rs as usize - 16 - 1;
    let pieces: Vec<&[u8]> = plaintext.chunks(per_record).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let mut record = piece.to_vec();
        record.push(if i + 1 == pieces.len() { 2 } else { 1 });
        let mut iv = nonce.clone();
        for (j, b) in (i as u64).to_be_bytes().iter().enumerate() {
            iv[4 + j] ^= b;
        }
        let mut tag = [0u8; 16];
        let ct = openssl::symm::encrypt_aead(openssl::symm::Cipher::aes_128_gcm(), &cek, Some(&iv), &[], &record, &mut tag)
            .unwrap();
        out.extend_from_slice(&ct);
        out.extend_from_slice(&tag);
    }
    out
}

/// A body whose `aes128gcm` framing is valid (65-byte P-256 keyid, rs 4096)
/// but whose records are random: the relay cannot tell it from a real one
/// without the keys.
fn framed_random_body(len: usize) -> Vec<u8> {
    let mut body = vec![0u8; 16];
    openssl::rand::rand_bytes(&mut body).unwrap();
    body.extend_from_slice(&4096u32.to_be_bytes());
    body.push(65);
    body.extend_from_slice(&Vapid::generate().public_key());
    let mut rest = vec![0u8; len - body.len()];
    openssl::rand::rand_bytes(&mut rest).unwrap();
    body.extend(rest);
    body
}

// ---------------------------------------------------------------------------
// 1. Registration flows
// ---------------------------------------------------------------------------

#[tokio::test]
async fn two_step_and_one_step_registration_flows() {
    let (_expo, relay) = start(LOOSE, "").await;
    let app = relay.app();
    let base = relay.base_url();
    let http = client();
    let vapid = Vapid::generate();

    // --- Two steps: register, push too early, confirm, push.
    let token = expo_token();
    let (status, body) = app
        .register("expo", &token, "https://Mastodon.Example/", Some("@alice@mastodon.example"), None, None)
        .await;
    assert_eq!(status, 201, "{body}");
    let reg = Registration::from_json(&body);
    assert!(!reg.confirmed && !reg.allow_decrypt, "{body}");
    assert_eq!(reg.endpoint, format!("{base}/push/{}", reg.id));
    assert_eq!(reg.p256dh.len(), 65);
    assert_eq!(reg.p256dh[0], 4);
    assert_eq!(reg.auth.len(), 16);
    assert_eq!(reg.private_key.as_ref().map(Vec::len), Some(32), "{body}");
    assert!(reg.secret.len() >= 16, "management secret looks guessable: {:?}", reg.secret);
    // Keys are base64url without padding on output.
    for k in ["p256dh", "auth", "private_key"] {
        let s = body["keys"][k].as_str().unwrap();
        assert!(!s.contains(['=', '+', '/']), "keys.{k} is not unpadded base64url: {s}");
    }

    let r = reg.push(Style::Mastodon, &vapid).send(&http).await;
    assert_push_error(&r, 503, "not_confirmed", "push before confirmation");
    assert!(retry_after(&r.headers) >= 1);

    let (status, view) = app.get(&reg.id, &reg.secret).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["state"], "pending");
    assert_eq!(view["confirmed"], false);

    let (status, view) = app.confirm(&reg.id, &reg.secret, &vapid.public_key_b64(), Some(false)).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["id"], reg.id.as_str());
    assert_eq!(view["provider"], "expo");
    assert_eq!(view["instance"], "mastodon.example", "instance normalised: {view}");
    assert_eq!(view["account"], "@alice@mastodon.example");
    assert_eq!(view["confirmed"], true);
    assert_eq!(view["allow_decrypt"], false);
    assert_eq!(view["state"], "active");
    assert_eq!(view["delivery_failures"], 0);
    assert!(view["last_delivery_at"].is_null(), "{view}");
    let created = view["created_at"].as_str().expect("created_at string");
    let b = created.as_bytes();
    assert!(
        created.len() >= 20
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && (created.ends_with('Z') || created.contains('+')),
        "created_at is not RFC 3339: {created}"
    );
    let year: u32 = created[..4].parse().unwrap();
    assert!(year >= 2024, "{created}");

    let r = reg.push(Style::Mastodon, &vapid).send(&http).await;
    assert_accepted(&r, &base, &reg, 48 * 3600, "push after confirmation");

    // --- One step: server_key at creation (given in the standard, padded
    // base64 alphabet: every form is accepted on input).
    let std_key = base64::engine::general_purpose::STANDARD.encode(vapid.public_key());
    let (status, body) = app.register("expo", &expo_token(), INSTANCE, None, Some(&std_key), Some(false)).await;
    assert_eq!(status, 201, "{body}");
    let one = Registration::from_json(&body);
    assert!(one.confirmed, "{body}");
    assert!(!one.allow_decrypt, "{body}");
    assert_eq!(one.private_key.as_ref().map(Vec::len), Some(32), "returned once: {body}");
    let r = one.push(Style::Misskey, &vapid).send(&http).await;
    assert_accepted(&r, &base, &one, 28 * 24 * 3600, "one-step push");
    let (status, view) = app.get(&one.id, &one.secret).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["allow_decrypt"], false);
    assert_eq!(view["confirmed"], true);
    assert_eq!(view["state"], "active");
    assert!(view["account"].is_null(), "{view}");

    // One step with allow_decrypt=true.
    let dec = confirmed(&app, &vapid, true).await;
    assert!(dec.allow_decrypt);
    let (_, view) = app.get(&dec.id, &dec.secret).await;
    assert_eq!(view["allow_decrypt"], true, "{view}");
    let r = dec.push(Style::MastodonAesgcm, &vapid).send(&http).await;
    assert_accepted(&r, &base, &dec, 48 * 3600, "one-step allow_decrypt push");

    // Two-step with allow_decrypt=true at confirmation.
    let two = app.register_ok("expo", &expo_token(), INSTANCE, None, None).await;
    let (status, view) = app.confirm(&two.id, &two.secret, &vapid.public_key_b64(), Some(true)).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["allow_decrypt"], true);
}

// ---------------------------------------------------------------------------
// 2. App API errors
// ---------------------------------------------------------------------------

#[tokio::test]
async fn app_api_errors() {
    let (_expo, relay) = start(LOOSE, "").await;
    let app = relay.app();
    let base = relay.base_url();
    let http = client();
    let vapid = Vapid::generate();
    let key = vapid.public_key_b64();

    // Bad JSON, and JSON of the wrong shape.
    let resp = http
        .post(format!("{base}/v1/registrations"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let got = (resp.status().as_u16(), resp.json::<Value>().await.unwrap());
    assert_api_error(&got, 400, "invalid_json");
    assert_api_error(&app.register_raw(&json!({"provider": "expo"})).await, 400, "invalid_json");
    assert_api_error(&app.register_raw(&json!([1, 2])).await, 400, "invalid_json");

    // Unknown provider, malformed token, instance, server key.
    assert_api_error(&app.register("apns", &expo_token(), INSTANCE, None, None, None).await, 422, "unknown_provider");
    for bad in ["not-a-token", "ExponentPushToken[]", "ExponentPushToken[abc", ""] {
        assert_api_error(&app.register("expo", bad, INSTANCE, None, None, None).await, 422, "invalid_token");
    }
    for bad in ["a b", "", "evil.example/path"] {
        assert_api_error(&app.register("expo", &expo_token(), bad, None, None, None).await, 422, "invalid_instance");
    }
    let not_a_point = b64url(&[4u8; 65]);
    for bad in ["not base64!", "AAAA", not_a_point.as_str()] {
        assert_api_error(
            &app.register("expo", &expo_token(), INSTANCE, None, Some(bad), None).await,
            422,
            "invalid_server_key",
        );
    }
    let long_account = "a".repeat(600);
    assert_api_error(
        &app.register("expo", &expo_token(), INSTANCE, Some(&long_account), None, None).await,
        422,
        "invalid_account",
    );
    // allow_decrypt without server_key at creation.
    let got = app.register("expo", &expo_token(), INSTANCE, None, None, Some(true)).await;
    assert_eq!(got.0, 422, "{}", got.1);
    assert!(got.1["error"].is_string(), "{}", got.1);

    // Management calls: wrong / missing secret, unknown id.
    let reg = app.register_ok("expo", &expo_token(), INSTANCE, None, None).await;
    assert_api_error(&app.confirm(&reg.id, "wrong-secret", &key, None).await, 401, "unauthorized");
    let resp = http
        .post(format!("{base}/v1/registrations/{}/confirm", reg.id))
        .json(&json!({"server_key": key}))
        .send()
        .await
        .unwrap();
    let got = (resp.status().as_u16(), resp.json::<Value>().await.unwrap());
    assert_api_error(&got, 401, "unauthorized");
    let resp = http
        .get(format!("{base}/v1/registrations/{}", reg.id))
        .header("authorization", format!("Basic {}", reg.secret))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401, "a Basic credential is not the Bearer secret");
    assert_api_error(&app.get(&reg.id, "wrong-secret").await, 401, "unauthorized");
    assert_api_error(&app.patch(&reg.id, "wrong-secret", &json!({"allow_decrypt": false})).await, 401, "unauthorized");
    assert_api_error(&app.delete(&reg.id, "wrong-secret").await, 401, "unauthorized");
    assert_api_error(&app.confirm("no-such-id", &reg.secret, &key, None).await, 404, "not_found");
    assert_api_error(&app.get("no-such-id", &reg.secret).await, 404, "not_found");
    assert_api_error(&app.patch("no-such-id", &reg.secret, &json!({})).await, 404, "not_found");
    assert_api_error(&app.delete("no-such-id", &reg.secret).await, 404, "not_found");
    // Another registration's secret does not open this one.
    let other = app.register_ok("expo", &expo_token(), INSTANCE, None, None).await;
    assert_api_error(&app.get(&reg.id, &other.secret).await, 401, "unauthorized");

    // Confirm with bad input.
    let resp = http
        .post(format!("{base}/v1/registrations/{}/confirm", reg.id))
        .bearer_auth(&reg.secret)
        .header("content-type", "application/json")
        .body("{\"server_key\":")
        .send()
        .await
        .unwrap();
    let got = (resp.status().as_u16(), resp.json::<Value>().await.unwrap());
    assert_api_error(&got, 400, "invalid_json");
    assert_api_error(&app.confirm(&reg.id, &reg.secret, "not base64!", None).await, 422, "invalid_server_key");

    // Confirm without decryption erases the keys: decryption cannot come back.
    let (status, view) = app.confirm(&reg.id, &reg.secret, &key, Some(false)).await;
    assert_eq!(status, 200, "{view}");
    assert_api_error(&app.confirm(&reg.id, &reg.secret, &key, Some(true)).await, 409, "keys_erased");
    // Re-confirming without decryption is fine (e.g. a retried request).
    assert_eq!(app.confirm(&reg.id, &reg.secret, &key, Some(false)).await.0, 200);

    // PATCH: allow_decrypt only goes true → false; tokens are validated.
    assert_api_error(&app.patch(&reg.id, &reg.secret, &json!({"allow_decrypt": true})).await, 409, "decrypt_cannot_be_enabled");
    assert_api_error(&app.patch(&reg.id, &reg.secret, &json!({"token": "garbage"})).await, 422, "invalid_token");
    let new_token = expo_token();
    let (status, view) = app.patch(&reg.id, &reg.secret, &json!({"token": new_token})).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["allow_decrypt"], false);
    let dec = confirmed(&app, &vapid, true).await;
    let (status, view) = app.patch(&dec.id, &dec.secret, &json!({"allow_decrypt": false})).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["allow_decrypt"], false);
    assert_api_error(&app.patch(&dec.id, &dec.secret, &json!({"allow_decrypt": true})).await, 409, "decrypt_cannot_be_enabled");

    // DELETE: 204, then the registration is gone for the app (404) and for
    // instances (410).
    let r = reg.push(Style::Mastodon, &vapid).send(&http).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let (status, body) = app.delete(&reg.id, &reg.secret).await;
    assert_eq!(status, 204, "{body}");
    assert!(body.is_null(), "204 has no body: {body}");
    assert_api_error(&app.get(&reg.id, &reg.secret).await, 404, "not_found");
    assert_api_error(&app.delete(&reg.id, &reg.secret).await, 404, "not_found");
    let r = reg.push(Style::Mastodon, &vapid).send(&http).await;
    assert_push_error(&r, 410, "gone", "push after DELETE");

    // Unknown paths and wrong methods.
    let resp = http.get(format!("{base}/no/such/path")).send().await.unwrap();
    let got = (resp.status().as_u16(), resp.json::<Value>().await.unwrap());
    assert_api_error(&got, 404, "not_found");
    let resp = http.put(format!("{base}/v1/registrations")).body("{}").send().await.unwrap();
    let got = (resp.status().as_u16(), resp.json::<Value>().await.unwrap());
    assert_api_error(&got, 405, "method_not_allowed");
    let resp = http.get(format!("{base}/push/{}", dec.id)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 405, "GET on a push endpoint");

    // Oversized API body.
    let resp = http
        .post(format!("{base}/v1/registrations"))
        .header("content-type", "application/json")
        .body(format!("{{\"provider\":\"expo\",\"token\":\"{}\",\"instance\":\"x\"}}", "x".repeat(20_000)))
        .send()
        .await
        .unwrap();
    let got = (resp.status().as_u16(), resp.json::<Value>().await.unwrap());
    assert_api_error(&got, 413, "too_large");
}

#[tokio::test]
async fn registration_key_is_required_when_configured() {
    let expo = MockExpo::start().await;
    let relay = Relay::start(
        RelayConfig::new()
            .expo("expo", &expo.url(), None, "")
            .limits(LOOSE)
            .server("registration_key = \"${OPERATOR_KEY}\"")
            .env("OPERATOR_KEY", "s3cret-operator-key"),
    )
    .await;
    let base = relay.base_url();
    let http = client();
    let body = json!({"provider": "expo", "token": expo_token(), "instance": INSTANCE});
    let post = |auth: Option<&str>| {
        let mut rb = http.post(format!("{base}/v1/registrations")).json(&body);
        if let Some(a) = auth {
            rb = rb.header("authorization", a);
        }
        async move {
            let resp = rb.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_api_error(&post(None).await, 401, "unauthorized");
    assert_api_error(&post(Some("Bearer wrong-key")).await, 401, "unauthorized");
    assert_api_error(&post(Some("Bearer s3cret-operator-ke")).await, 401, "unauthorized");
    assert_api_error(&post(Some("Basic s3cret-operator-key")).await, 401, "unauthorized");
    let (status, v) = post(Some("Bearer s3cret-operator-key")).await;
    assert_eq!(status, 201, "{v}");
    Registration::from_json(&v);
}

#[tokio::test]
async fn registrations_per_ip_are_limited() {
    let (_expo, relay) = start("registrations_per_ip = { per_minute = 1, burst = 2 }", "").await;
    let app = relay.app();
    for i in 0..2 {
        let (status, v) = app.register("expo", &expo_token(), INSTANCE, None, None, None).await;
        assert_eq!(status, 201, "registration {i}: {v}");
    }
    let resp = app
        .http()
        .post(format!("{}/v1/registrations", relay.base_url()))
        .json(&json!({"provider": "expo", "token": expo_token(), "instance": INSTANCE}))
        .send()
        .await
        .unwrap();
    let headers = resp.headers().clone();
    let got = (resp.status().as_u16(), resp.json::<Value>().await.unwrap());
    assert_api_error(&got, 429, "rate_limited");
    let wait = retry_after(&headers);
    assert!((1..=60).contains(&wait), "one registration a minute: Retry-After {wait}");
    let metrics = relay.metrics().await;
    assert_eq!(metric(&metrics, "push_relay_rate_limited_total{limit=\"ip\"}"), Some(1.0), "{metrics}");
}

// ---------------------------------------------------------------------------
// 3. Every answer of SPEC §4
// ---------------------------------------------------------------------------

#[tokio::test]
async fn accepted_in_every_sender_style() {
    let (_expo, relay) = start(LOOSE, "").await;
    let app = relay.app();
    let base = relay.base_url();
    let http = client();
    let vapid = Vapid::generate();
    let reg = confirmed(&app, &vapid, false).await;

    for (style, ttl) in [
        (Style::Mastodon, 48 * 3600),
        (Style::Misskey, 28 * 24 * 3600),
        (Style::PleromaAesgcm, 0),
        (Style::MastodonAesgcm, 48 * 3600),
    ] {
        let req = reg.push(style, &vapid).payload(mastodon_payload(1, "TOKEN"));
        assert_accepted(&req.send(&http).await, &base, &reg, ttl, &format!("{style:?}"));
    }

    // Variants real senders write.
    let p = reg.push(Style::MastodonAesgcm, &vapid).prepare();
    let dh = b64url(&p.dh);
    let cases: Vec<(&str, PushRequest)> = vec![
        (
            "Crypto-Key with ',' separator",
            reg.push(Style::MastodonAesgcm, &vapid)
                .header("Crypto-Key", &format!("dh={dh}, p256ecdsa={}", vapid.public_key_b64())),
        ),
        (
            "quoted, padded, keyid'd aesgcm parameters",
            reg.push(Style::MastodonAesgcm, &vapid)
                .header("Crypto-Key", &format!("keyid=p256dh;dh=\"{dh}\";p256ecdsa=\"{}=\"", vapid.public_key_b64()))
                .header("Encryption", &format!("keyid=p256dh;salt=\"{}\";rs=4096", b64url(&p.salt))),
        ),
        (
            "vapid with k= in standard padded base64",
            reg.push(Style::Misskey, &vapid)
                .vapid_key(&base64::engine::general_purpose::STANDARD.encode(vapid.public_key())),
        ),
        ("vapid with k= the compressed form of the key", reg.push(Style::Mastodon, &vapid).vapid_key(&b64url(&compressed(&vapid)))),
        ("Content-Encoding in capitals", reg.push(Style::Mastodon, &vapid).header("Content-Encoding", "AES128GCM")),
        ("aud with trailing slash", reg.push(Style::Mastodon, &vapid).aud(&format!("{base}/"))),
        ("no sub claim", reg.push(Style::Mastodon, &vapid).sub(None)),
        ("exp 24 h ahead", reg.push(Style::Mastodon, &vapid).exp(unix_now() + 24 * 3600)),
        ("exp 30 s ago (skew)", reg.push(Style::Mastodon, &vapid).exp(unix_now() - 30)),
        ("lowercase scheme", {
            let jwt = vapid.jwt(&origin_of(&reg.endpoint), unix_now() + 3600, None);
            reg.push(Style::Mastodon, &vapid)
                .header("Authorization", &format!("VAPID t={jwt}, k={}", vapid.public_key_b64()))
        }),
        ("no Content-Type", reg.push(Style::Mastodon, &vapid).without_header("Content-Type")),
        ("odd Content-Type", reg.push(Style::Mastodon, &vapid).header("Content-Type", "text/plain; charset=latin1")),
        ("Urgency high + Topic", reg.push(Style::Mastodon, &vapid).urgency("high").topic("timeline-1")),
        ("invalid Urgency", reg.push(Style::Mastodon, &vapid).urgency("whenever")),
        ("invalid Topic (space)", reg.push(Style::Mastodon, &vapid).topic("has space")),
        ("invalid Topic (too long)", reg.push(Style::Mastodon, &vapid).topic(&"a".repeat(40))),
        ("Unsubscribe-URL", reg.push(Style::Misskey, &vapid).header("Unsubscribe-URL", "https://x.example/unsub")),
    ];
    for (what, req) in cases {
        let r = req.send(&http).await;
        assert_eq!(r.status, 201, "{what}: {} {}", r.status, r.body);
    }

    // Every status on this relay so far was 201.
    let metrics = relay.metrics().await;
    assert_eq!(metric(&metrics, "push_relay_pushes_total{status=\"201\"}"), Some(21.0), "{metrics}");

    // A registration confirmed with the compressed form of the key accepts
    // tokens that carry the uncompressed one.
    let (status, v) = app
        .register("expo", &expo_token(), INSTANCE, None, Some(&b64url(&compressed(&vapid))), Some(false))
        .await;
    assert_eq!(status, 201, "{v}");
    let short = Registration::from_json(&v);
    let r = short.push(Style::Misskey, &vapid).send(&http).await;
    assert_eq!(r.status, 201, "compressed server_key: {}", r.body);
}

/// The 33-byte compressed form of a VAPID public key.
fn compressed(vapid: &Vapid) -> Vec<u8> {
    let key = EcKey::private_key_from_pem(&vapid.private_pem()).unwrap();
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let mut ctx = BigNumContext::new().unwrap();
    key.public_key().to_bytes(&group, PointConversionForm::COMPRESSED, &mut ctx).unwrap()
}

#[tokio::test]
async fn vapid_aud_is_the_public_url_origin() {
    // The relay behind a reverse proxy: public_url is not where it listens,
    // has the default port spelled out and a path prefix the proxy strips.
    let expo = MockExpo::start().await;
    let config = RelayConfig::new().expo("expo", &expo.url(), None, "").limits(LOOSE);
    let text = config.render().replace(
        "public_url = \"http://127.0.0.1:@PORT@\"",
        "public_url = \"https://Relay.Example:443/relay/\"",
    );
    assert!(text.contains("Relay.Example"), "{text}");
    let relay = Relay::try_start_toml(&text, free_port(), vec![]).await.unwrap();
    let app = relay.app();
    let http = client();
    let vapid = Vapid::generate();
    let reg = confirmed(&app, &vapid, false).await;
    let public = "https://relay.example/relay";
    assert_eq!(reg.endpoint, format!("{public}/push/{}", reg.id), "endpoint built from public_url");

    // What the proxy forwards: the same path without the prefix.
    let local = format!("{}/push/{}", relay.base_url(), reg.id);
    let push = |aud: &str| PushRequest::new(&local, Style::Mastodon, &vapid, &reg.p256dh, &reg.auth).aud(aud);
    let r = push("https://relay.example").send(&http).await;
    assert_accepted(&r, public, &reg, 48 * 3600, "aud = public origin");
    let r = push("https://relay.example/").send(&http).await;
    assert_eq!(r.status, 201, "trailing slash: {}", r.body);
    for bad in [&relay.base_url(), "http://relay.example", "https://relay.example/relay", "https://relay.example.evil"] {
        assert_push_error(&push(bad).send(&http).await, 401, "vapid_invalid", &format!("aud {bad}"));
    }
    // What a sender computes from the endpoint it was given.
    assert_eq!(origin_of(&reg.endpoint), "https://relay.example");
}

#[tokio::test]
async fn gotosocial_multi_record_aes128gcm() {
    let (expo, relay) = start(LOOSE, "").await;
    let app = relay.app();
    let http = client();
    let vapid = Vapid::generate();
    let reg = confirmed(&app, &vapid, true).await;

    // GoToSocial-like: string notification id, a long body, 2048-byte records.
    let payload = json!({
        "access_token": "GTS-SECRET-ACCESS-TOKEN",
        "preferred_locale": "en",
        "notification_id": "01HXYZ",
        "notification_type": "mention",
        "icon": "https://gts.example/avatar.png",
        "title": "Carol mentioned you",
        "body": "x".repeat(2300),
    })
    .to_string();
    let body = encrypt_aes128gcm_rs(&reg.p256dh, &reg.auth, payload.as_bytes(), 2048);
    assert!(body.len() > 86 + 2048 && body.len() <= 4096, "two records: {} bytes", body.len());
    assert_eq!(&body[16..20], &2048u32.to_be_bytes());
    // The encoder is right: ece's decoder reads it back.
    let recipient = reg.recipient();
    assert_eq!(recipient.decrypt_aes128gcm(&body).expect("round trip"), payload.as_bytes());

    let r = reg.push(Style::Mastodon, &vapid).raw_body(&body).ttl(Some(600)).send(&http).await;
    assert_accepted(&r, &relay.base_url(), &reg, 600, "GoToSocial multi-record body");

    // The relay read both records: the device gets the decrypted title, and
    // never the access token.
    let msgs = expo.wait_for(1, Duration::from_secs(4)).await;
    let m = &msgs[0].message;
    assert_eq!(m["title"], "Carol mentioned you", "multi-record body decrypted: {m}");
    assert!(!m.to_string().contains("GTS-SECRET-ACCESS-TOKEN"), "{m}");
    let metrics = relay.metrics().await;
    assert_eq!(metric(&metrics, "push_relay_decrypt_fallbacks_total"), Some(0.0), "{metrics}");
}

#[tokio::test]
async fn undecodable_encryption_is_400() {
    let (_expo, relay) = start(LOOSE, "").await;
    let app = relay.app();
    let http = client();
    let vapid = Vapid::generate();
    let reg = confirmed(&app, &vapid, false).await;
    let key = vapid.public_key_b64();

    let good = reg.push(Style::Mastodon, &vapid).prepare().body;
    let mut bad_idlen = good.clone();
    bad_idlen[20] = 0;
    let mut bad_keyid = good.clone();
    bad_keyid[21] = 0x02;
    let mut small_rs = good.clone();
    small_rs[16..20].copy_from_slice(&17u32.to_be_bytes());
    let mut zero_rs = good.clone();
    zero_rs[16..20].copy_from_slice(&0u32.to_be_bytes());
    let no_record = good[..86 + 16].to_vec();

    let aesgcm = || reg.push(Style::PleromaAesgcm, &vapid);
    let salt = b64url(&aesgcm().prepare().salt);
    let cases: Vec<(&str, PushRequest)> = vec![
        ("no Content-Encoding", reg.push(Style::Mastodon, &vapid).without_header("Content-Encoding")),
        ("Content-Encoding gzip", reg.push(Style::Mastodon, &vapid).header("Content-Encoding", "gzip")),
        ("Content-Encoding empty", reg.push(Style::Mastodon, &vapid).header("Content-Encoding", "")),
        ("aes128gcm empty body", reg.push(Style::Mastodon, &vapid).raw_body(b"")),
        ("aes128gcm 10-byte body", reg.push(Style::Mastodon, &vapid).raw_body([7u8; 10])),
        ("aes128gcm idlen 0", reg.push(Style::Mastodon, &vapid).raw_body(&bad_idlen)),
        ("aes128gcm keyid not an uncompressed point", reg.push(Style::Mastodon, &vapid).raw_body(&bad_keyid)),
        ("aes128gcm rs 17", reg.push(Style::Mastodon, &vapid).raw_body(&small_rs)),
        ("aes128gcm rs 0", reg.push(Style::Mastodon, &vapid).raw_body(&zero_rs)),
        ("aes128gcm header only, no complete record", reg.push(Style::Mastodon, &vapid).raw_body(&no_record)),
        ("aesgcm without Encryption", aesgcm().without_header("Encryption")),
        ("aesgcm Encryption without salt", aesgcm().header("Encryption", "rs=4096")),
        ("aesgcm short salt", aesgcm().header("Encryption", "salt=AAAA")),
        ("aesgcm salt not base64", aesgcm().header("Encryption", "salt=!!!!!!!!!!!!!!!!!!!!!!")),
        ("aesgcm rs 1", aesgcm().header("Encryption", &format!("salt={salt};rs=1"))),
        ("aesgcm rs not a number", aesgcm().header("Encryption", &format!("salt={salt};rs=big"))),
        ("aesgcm Crypto-Key without dh", aesgcm().header("Crypto-Key", &format!("p256ecdsa={key}"))),
        ("aesgcm dh too short", aesgcm().header("Crypto-Key", &format!("dh=BAAA;p256ecdsa={key}"))),
        ("aesgcm empty body", aesgcm().raw_body(b"")),
        ("aesgcm 17-byte body", aesgcm().raw_body([1u8; 17])),
        ("aesgcm with a vapid Authorization and no Crypto-Key", {
            let jwt = vapid.jwt(&origin_of(&reg.endpoint), unix_now() + 3600, None);
            aesgcm().without_header("Crypto-Key").header("Authorization", &format!("vapid t={jwt},k={key}"))
        }),
    ];
    for (what, req) in cases {
        assert_push_error(&req.send(&http).await, 400, "invalid_encryption", what);
    }
}

#[tokio::test]
async fn vapid_failures_are_401_and_a_foreign_key_is_403() {
    let (_expo, relay) = start(LOOSE, "").await;
    let app = relay.app();
    let base = relay.base_url();
    let http = client();
    let vapid = Vapid::generate();
    let other = Vapid::generate();
    let reg = confirmed(&app, &vapid, false).await;
    let key = vapid.public_key_b64();
    let aud = origin_of(&reg.endpoint);
    let now = unix_now();

    // A valid token with its claims swapped (signature no longer matches).
    let genuine = vapid.jwt(&aud, now + 3600, None);
    let parts: Vec<&str> = genuine.split('.').collect();
    let forged_claims = b64url(json!({"aud": aud, "exp": now + 7200}).to_string().as_bytes());
    let tampered = format!("{}.{forged_claims}.{}", parts[0], parts[2]);

    let cases: Vec<(&str, PushRequest)> = vec![
        ("no VAPID at all (vapid form)", reg.push(Style::Mastodon, &vapid).no_vapid()),
        ("no VAPID at all (WebPush form)", reg.push(Style::PleromaAesgcm, &vapid).no_vapid()),
        ("Bearer scheme", reg.push(Style::Mastodon, &vapid).header("Authorization", "Bearer abc")),
        ("empty Authorization", reg.push(Style::Mastodon, &vapid).header("Authorization", "")),
        ("vapid without t=", reg.push(Style::Mastodon, &vapid).header("Authorization", &format!("vapid k={key}"))),
        ("vapid without k=", reg.push(Style::Mastodon, &vapid).header("Authorization", &format!("vapid t={genuine}"))),
        ("WebPush without p256ecdsa", reg.push(Style::PleromaAesgcm, &vapid).header(
            "Crypto-Key",
            &format!("dh={}", b64url(&reg.push(Style::PleromaAesgcm, &vapid).prepare().dh)),
        )),
        ("k not base64", reg.push(Style::Mastodon, &vapid).vapid_key("!!not-base64!!")),
        ("k not a P-256 point", reg.push(Style::Mastodon, &vapid).vapid_key(&b64url(&[4u8; 65]))),
        ("JWT not a JWT", reg.push(Style::Mastodon, &vapid).jwt("not-a-jwt")),
        ("JWT with 4 parts", reg.push(Style::Mastodon, &vapid).jwt(&format!("{genuine}.AAAA"))),
        ("JWT with garbage parts", reg.push(Style::Mastodon, &vapid).jwt("e30.e30.AAAA")),
        ("bad signature (tampered claims)", reg.push(Style::Mastodon, &vapid).jwt(&tampered)),
        ("signed by another key, k = the confirmed key", reg.push(Style::Mastodon, &vapid).jwt(&other.jwt(&aud, now + 3600, None))),
        ("signature all zeros", reg.push(Style::Mastodon, &vapid).jwt(&format!("{}.{}.{}", parts[0], parts[1], b64url(&[0u8; 64])))),
        ("wrong aud", reg.push(Style::Mastodon, &vapid).aud("https://other.example")),
        ("aud with another port", reg.push(Style::Mastodon, &vapid).aud(&format!("http://127.0.0.1:{}", relay.port() + 1))),
        ("aud with https scheme", reg.push(Style::Mastodon, &vapid).aud(&base.replace("http://", "https://"))),
        ("aud with a path", reg.push(Style::Mastodon, &vapid).aud(&format!("{base}/push"))),
        ("missing aud", reg.push(Style::Mastodon, &vapid).jwt(&vapid.jwt_with_claims(&json!({"exp": now + 3600})))),
        ("expired exp", reg.push(Style::Mastodon, &vapid).exp(now - 3600)),
        ("exp 2 minutes ago", reg.push(Style::Mastodon, &vapid).exp(now - 120)),
        ("exp more than 24 h + 60 s ahead", reg.push(Style::Mastodon, &vapid).exp(now + 24 * 3600 + 300)),
        ("exp a year ahead", reg.push(Style::Mastodon, &vapid).exp(now + 365 * 24 * 3600)),
        ("missing exp", reg.push(Style::Mastodon, &vapid).jwt(&vapid.jwt_with_claims(&json!({"aud": aud})))),
        ("exp as a string", reg.push(Style::Mastodon, &vapid).jwt(&vapid.jwt_with_claims(&json!({"aud": aud, "exp": (now + 3600).to_string()})))),
        ("alg HS256", reg.push(Style::Mastodon, &vapid).jwt(&vapid.jwt_with_header_and_claims(
            &json!({"typ": "JWT", "alg": "HS256"}),
            &json!({"aud": aud, "exp": now + 3600}),
        ))),
        ("alg none", reg.push(Style::Mastodon, &vapid).jwt(&vapid.jwt_with_header_and_claims(
            &json!({"typ": "JWT", "alg": "none"}),
            &json!({"aud": aud, "exp": now + 3600}),
        ))),
        ("no alg", reg.push(Style::Mastodon, &vapid).jwt(&vapid.jwt_with_header_and_claims(
            &json!({"typ": "JWT"}),
            &json!({"aud": aud, "exp": now + 3600}),
        ))),
        ("WebPush with empty token", reg.push(Style::PleromaAesgcm, &vapid).header("Authorization", "WebPush ")),
    ];
    for (what, req) in cases {
        assert_push_error(&req.send(&http).await, 401, "vapid_invalid", what);
    }
    // ES256 header with extra fields is still fine (sanity: the cases above
    // fail for the reason named, not because our tokens are odd).
    let ok = vapid.jwt_with_header_and_claims(&json!({"typ": "JWT", "alg": "ES256", "kid": "x"}), &json!({"aud": aud, "exp": now + 3600}));
    let r = reg.push(Style::Mastodon, &vapid).jwt(&ok).send(&http).await;
    assert_eq!(r.status, 201, "{}", r.body);

    // 403: a valid token from a key that is not the confirmed server key, in
    // both header forms.
    for style in [Style::Mastodon, Style::Misskey, Style::PleromaAesgcm, Style::MastodonAesgcm] {
        let r = reg.push(style, &other).send(&http).await;
        assert_push_error(&r, 403, "vapid_key_mismatch", &format!("{style:?} signed by another instance"));
    }
    // VAPID failures come before encryption problems (an unsigned garbage
    // request is a 401, not a 400).
    let r = reg.push(Style::Mastodon, &vapid).no_vapid().raw_body(b"xx").send(&http).await;
    assert_push_error(&r, 401, "vapid_invalid", "unsigned garbage");
}

#[tokio::test]
async fn not_found_gone_pending_and_too_large() {
    let (_expo, relay) = start(LOOSE, "").await;
    let app = relay.app();
    let base = relay.base_url();
    let http = client();
    let vapid = Vapid::generate();
    let reg = confirmed(&app, &vapid, false).await;

    // 404: no such registration (even with a perfect request).
    let ghost = PushRequest::new(&format!("{base}/push/no-such-registration"), Style::Mastodon, &vapid, &reg.p256dh, &reg.auth);
    assert_push_error(&ghost.send(&http).await, 404, "not_found", "unknown registration");
    let ghost = PushRequest::new(&format!("{base}/push/{}", "z".repeat(2000)), Style::Misskey, &vapid, &reg.p256dh, &reg.auth);
    assert_push_error(&ghost.send(&http).await, 404, "not_found", "long unknown id");

    // 503: pending.
    let pending = app.register_ok("expo", &expo_token(), INSTANCE, None, None).await;
    let r = pending.push(Style::Misskey, &vapid).send(&http).await;
    assert_push_error(&r, 503, "not_confirmed", "pending registration");
    assert!(retry_after(&r.headers) >= 1);

    // 413: a 4097-byte body; exactly 4096 is accepted.
    let r = reg.push(Style::Mastodon, &vapid).raw_body(framed_random_body(4097)).send(&http).await;
    assert_push_error(&r, 413, "too_large", "4097-byte body");
    let r = reg.push(Style::Mastodon, &vapid).raw_body(framed_random_body(4096)).send(&http).await;
    assert_accepted(&r, &base, &reg, 48 * 3600, "4096-byte body");
    // Way over (64 KB): still a clean 413.
    let r = reg.push(Style::Mastodon, &vapid).raw_body(vec![0u8; 64 * 1024]).send(&http).await;
    assert_push_error(&r, 413, "too_large", "64 KB body");

    // Chunked bodies (no Content-Length): the limit holds too, and a small
    // chunked body is accepted.
    let port = relay.port();
    let p = reg.push(Style::Mastodon, &vapid).prepare();
    let path = path_of(&reg.endpoint);
    let mut req = raw_head(port, &path, &p.headers, &[b"Transfer-Encoding: chunked"]);
    req.extend(chunked(&p.body, 50));
    let (status, text) = raw_http(port, &req).await.expect("answer to a chunked push");
    assert_eq!(status, 201, "small chunked push: {text}");
    let p = reg.push(Style::Mastodon, &vapid).raw_body(framed_random_body(4000)).prepare();
    let mut big = p.body.clone();
    big.extend([0u8; 1000]);
    let mut req = raw_head(port, &path, &p.headers, &[b"Transfer-Encoding: chunked"]);
    req.extend(chunked(&big, 1000));
    let (status, text) = raw_http(port, &req).await.expect("answer to an oversized chunked push");
    assert_eq!(status, 413, "chunked 5000-byte push: {text}");
    assert!(text.contains("\"too_large\""), "{text}");

    // 410: deleted by the app.
    let (status, _) = app.delete(&reg.id, &reg.secret).await;
    assert_eq!(status, 204);
    for style in [Style::Mastodon, Style::PleromaAesgcm] {
        assert_push_error(&reg.push(style, &vapid).send(&http).await, 410, "gone", "deleted registration");
    }
}

#[tokio::test]
async fn truncated_bodies_are_refused_not_accepted() {
    let (expo, relay) = start(LOOSE, "").await;
    let app = relay.app();
    let vapid = Vapid::generate();
    let reg = confirmed(&app, &vapid, false).await;
    let port = relay.port();
    let path = path_of(&reg.endpoint);
    // A well-framed 3000-byte body of which only 500 bytes arrive: the first
    // 500 bytes alone would pass the framing check, so a relay that took the
    // partial body as the whole would accept (201) a message it never got.
    let p = reg.push(Style::Mastodon, &vapid).raw_body(framed_random_body(3000)).prepare();

    // Content-Length: 3000, 500 bytes, then the sender closes its side.
    let mut req = raw_head(port, &path, &p.headers, &[b"Content-Length: 3000"]);
    req.extend(&p.body[..500]);
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(&req).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 400"), "truncated Content-Length body: {text}");

    // Chunked: one good 500-byte chunk, then a broken chunk header.
    let mut req = raw_head(port, &path, &p.headers, &[b"Transfer-Encoding: chunked"]);
    req.extend(b"1f4\r\n");
    req.extend(&p.body[..500]);
    req.extend(b"\r\nzz-not-hex\r\n\r\n");
    let (status, text) = raw_http(port, &req).await.expect("an answer");
    assert_eq!(status, 400, "broken chunked body: {text}");

    // Nothing was queued or delivered for them.
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "push_relay_pushes_total{status=\"201\"}"), None, "{m}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(expo.messages().is_empty(), "{:?}", expo.messages());
    assert!(relay.log().lines().all(|l| !l.contains("panicked")));
}

#[tokio::test]
async fn erased_keys_and_secrets_are_not_left_on_disk_or_in_logs() {
    // SPEC §2: unless allow_decrypt is true the relay erases the private key
    // and the auth secret "for good"; in the one-step flow they are "never
    // stored at all". §3: secrets are stored only as hashes. §8: no secrets
    // or tokens in logs. Checked on the SQLite files and the log.
    let (_expo, relay) = start(LOOSE, "").await;
    let app = relay.app();
    let vapid = Vapid::generate();

    // Two steps, decryption refused at confirmation.
    let two_token = expo_token();
    let two = app.register_ok("expo", &two_token, INSTANCE, None, None).await;
    let (status, v) = app.confirm(&two.id, &two.secret, &vapid.public_key_b64(), Some(false)).await;
    assert_eq!(status, 200, "{v}");
    // One step, decryption refused.
    let one = confirmed(&app, &vapid, false).await;
    // One step with decryption, then withdrawn (true → false).
    let patched = confirmed(&app, &vapid, true).await;
    let (status, v) = app.patch(&patched.id, &patched.secret, &json!({"allow_decrypt": false})).await;
    assert_eq!(status, 200, "{v}");

    let mut disk = Vec::new();
    for entry in std::fs::read_dir(relay.dir()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().to_string_lossy().starts_with("relay.db") {
            disk.extend(std::fs::read(entry.path()).unwrap());
        }
    }
    assert!(disk.len() > 1000, "found the store files");
    let on_disk = |needle: &[u8]| disk.windows(needle.len()).any(|w| w == needle);
    let log = relay.log();
    let mut problems = Vec::new();
    for (name, reg) in [("two-step", &two), ("one-step", &one), ("patched to false", &patched)] {
        let private_key = reg.private_key.clone().unwrap();
        if on_disk(&private_key) {
            problems.push(format!("{name}: the erased private key is still in relay.db / relay.db-wal"));
        }
        if on_disk(&reg.auth) {
            problems.push(format!("{name}: the erased auth secret is still in relay.db / relay.db-wal"));
        }
        if on_disk(reg.secret.as_bytes()) {
            problems.push(format!("{name}: the management secret is stored in clear"));
        }
        for (what, needle) in [
            ("management secret", reg.secret.clone()),
            ("private key", b64url(&private_key)),
            ("auth secret", reg.auth_b64()),
        ] {
            if log.contains(&needle) {
                problems.push(format!("{name}: the {what} is in the log"));
            }
        }
    }
    if log.contains(&two_token) {
        problems.push("the device token is in the log".into());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let (_expo, relay) = start(
        "per_registration = { per_second = 1, burst = 2 }\n\
         per_instance = { per_second = 1, burst = 3 }\n\
         registrations_per_ip = { per_minute = 1000, burst = 1000 }",
        "",
    )
    .await;
    let app = relay.app();
    let base = relay.base_url();
    let http = client();
    let vapid = Vapid::generate();
    let a1 = confirmed(&app, &vapid, false).await;
    let a2 = confirmed(&app, &vapid, false).await;
    let b1 = app
        .register_ok("expo", &expo_token(), "other.example", Some(&vapid.public_key_b64()), Some(false))
        .await;

    // Prepare everything first so the pushes go out back to back.
    let reqs: Vec<PushRequest> = (0..3).map(|_| a1.push(Style::Mastodon, &vapid).ttl(Some(60))).collect();
    let mut answers = Vec::new();
    for r in &reqs {
        answers.push(r.send(&http).await);
    }
    assert_accepted(&answers[0], &base, &a1, 60, "1st push");
    assert_accepted(&answers[1], &base, &a1, 60, "2nd push");
    assert_push_error(&answers[2], 429, "rate_limited", "3rd push to one registration");
    let wait = retry_after(&answers[2].headers);
    assert!((1..=2).contains(&wait), "one push a second: Retry-After {wait}");

    // Another registration of the same instance: the instance allows one more.
    let r = a2.push(Style::Mastodon, &vapid).send(&http).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = a2.push(Style::Mastodon, &vapid).send(&http).await;
    assert_push_error(&r, 429, "rate_limited", "instance limit");
    assert!(retry_after(&r.headers) >= 1);
    // Another instance is not affected.
    let r = b1.push(Style::Mastodon, &vapid).send(&http).await;
    assert_eq!(r.status, 201, "another instance: {}", r.body);

    let metrics = relay.metrics().await;
    assert_eq!(metric(&metrics, "push_relay_pushes_total{status=\"429\"}"), Some(2.0), "{metrics}");
    assert_eq!(metric(&metrics, "push_relay_rate_limited_total{limit=\"registration\"}"), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, "push_relay_rate_limited_total{limit=\"instance\"}"), Some(1.0), "{metrics}");

    // After the Retry-After, the registration is served again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = a1.push(Style::Mastodon, &vapid).send(&http).await;
    assert_eq!(r.status, 201, "after waiting: {}", r.body);
}

#[tokio::test]
async fn ttl_edge_cases() {
    let (_expo, relay) = start(LOOSE, "").await;
    let app = relay.app();
    let base = relay.base_url();
    let http = client();
    let vapid = Vapid::generate();
    let reg = confirmed(&app, &vapid, false).await;

    let ttl = |v: &str| reg.push(Style::Misskey, &vapid).ttl(None).header("TTL", v);
    let cases: Vec<(&str, PushRequest, u64)> = vec![
        ("TTL 0", reg.push(Style::Misskey, &vapid).ttl(Some(0)), 0),
        ("no TTL", reg.push(Style::Misskey, &vapid).ttl(None), 86400),
        ("TTL 99999999", reg.push(Style::Misskey, &vapid).ttl(Some(99_999_999)), 2_419_200),
        ("TTL exactly max", reg.push(Style::Misskey, &vapid).ttl(Some(2_419_200)), 2_419_200),
        ("TTL 60", reg.push(Style::Misskey, &vapid).ttl(Some(60)), 60),
        ("TTL unparsable", ttl("soon"), 86400),
        ("TTL negative", ttl("-5"), 0),
        ("TTL with spaces", ttl(" 120 "), 120),
        ("TTL over u64", ttl("99999999999999999999999"), 2_419_200),
        ("TTL empty", ttl(""), 86400),
    ];
    for (what, req, want) in cases {
        assert_accepted(&req.send(&http).await, &base, &reg, want, what);
    }

    // Header names are case-insensitive; hyper lowercases what reqwest sends,
    // so write the exact spellings on the wire ourselves.
    let port = relay.port();
    let path = path_of(&reg.endpoint);
    for spelling in ["ttl", "TTL", "Ttl", "tTl"] {
        let p = reg.push(Style::Misskey, &vapid).ttl(None).prepare();
        let line = format!("{spelling}: 77");
        let mut req = raw_head(port, &path, &p.headers, &[line.as_bytes(), format!("Content-Length: {}", p.body.len()).as_bytes()]);
        req.extend(&p.body);
        let (status, text) = raw_http(port, &req).await.expect("answer");
        assert_eq!(status, 201, "{spelling}: {text}");
        assert!(text.to_ascii_lowercase().contains("\r\nttl: 77\r\n"), "{spelling} echoed as 77: {text}");
    }
}

// ---------------------------------------------------------------------------
// 4. An independent sender
// ---------------------------------------------------------------------------

#[tokio::test]
async fn pywebpush_both_encodings_accepted_and_decrypted() {
    let (expo, relay) = start(LOOSE, "").await;
    let app = relay.app();
    let base = relay.base_url();
    let dir = tempfile::tempdir().unwrap();
    let pem = VapidPem::generate(dir.path(), "vapid.pem");
    // Decryption allowed, so the relay has to read pywebpush's encryption to
    // deliver the title: a 201 alone would not prove it understood the body.
    let reg = app
        .register_ok("expo", &expo_token(), INSTANCE, Some(&pem.public_key_b64), Some(true))
        .await;

    for (i, encoding) in ["aes128gcm", "aesgcm"].into_iter().enumerate() {
        let payload = mastodon_payload(100 + i as u64, "PY-SECRET-TOKEN");
        let (status, out) = pywebpush::send(&reg.endpoint, &reg.p256dh_b64(), &reg.auth_b64(), &payload, encoding, 90, &pem.path).await;
        assert_eq!(status, 201, "pywebpush {encoding}: {out}");
        let location = out["headers"]["Location"]
            .as_str()
            .or_else(|| out["headers"]["location"].as_str())
            .unwrap_or_else(|| panic!("no Location: {out}"));
        assert!(location.starts_with(&format!("{base}/v1/registrations/{}/messages/", reg.id)), "{location}");
        let ttl = out["headers"]["TTL"].as_str().or_else(|| out["headers"]["ttl"].as_str());
        assert_eq!(ttl, Some("90"), "{out}");
        let auth = out["request_headers"]
            .as_object()
            .and_then(|h| h.iter().find(|(k, _)| k.eq_ignore_ascii_case("authorization")))
            .and_then(|(_, v)| v.as_str())
            .unwrap_or("");
        assert!(auth.starts_with("vapid t="), "pywebpush sends the vapid form: {out}");
    }
    let msgs = expo.wait_for(2, Duration::from_secs(4)).await;
    let mut titles: Vec<String> = msgs.iter().map(|m| m.message["title"].as_str().unwrap_or("").to_string()).collect();
    titles.sort();
    assert_eq!(titles, vec!["Bob mentioned you", "Bob mentioned you"], "{msgs:#?}");
    for m in &msgs {
        assert!(!m.message.to_string().contains("PY-SECRET-TOKEN"), "access token leaked: {}", m.message);
    }
    let metrics = relay.metrics().await;
    assert_eq!(metric(&metrics, "push_relay_decrypt_fallbacks_total"), Some(0.0), "{metrics}");

    // And opaque mode: a registration without decryption, same sender.
    let opaque = app
        .register_ok("expo", &expo_token(), INSTANCE, Some(&pem.public_key_b64), Some(false))
        .await;
    for encoding in ["aes128gcm", "aesgcm"] {
        let (status, out) =
            pywebpush::send(&opaque.endpoint, &opaque.p256dh_b64(), &opaque.auth_b64(), "{}", encoding, 60, &pem.path).await;
        assert_eq!(status, 201, "pywebpush {encoding} opaque: {out}");
    }
    // A pywebpush sender with another key is refused with 403.
    let stranger = VapidPem::generate(dir.path(), "stranger.pem");
    let (status, out) = pywebpush::send(&opaque.endpoint, &opaque.p256dh_b64(), &opaque.auth_b64(), "{}", "aes128gcm", 60, &stranger.path).await;
    assert_eq!(status, 403, "{out}");
    let body: Value = serde_json::from_str(out["body"].as_str().unwrap_or("")).unwrap_or(Value::Null);
    assert_eq!(body["error"], "vapid_key_mismatch", "{out}");
}

// ---------------------------------------------------------------------------
// 5. Metrics and operations endpoints
// ---------------------------------------------------------------------------

#[tokio::test]
async fn metrics_count_pushes_by_answer() {
    let (_expo, relay) = start(LOOSE, "").await;
    let app = relay.app();
    let base = relay.base_url();
    let http = client();
    let vapid = Vapid::generate();
    let reg = confirmed(&app, &vapid, false).await;

    for _ in 0..3 {
        assert_eq!(reg.push(Style::Mastodon, &vapid).send(&http).await.status, 201);
    }
    for _ in 0..2 {
        assert_eq!(reg.push(Style::Mastodon, &vapid).no_vapid().send(&http).await.status, 401);
    }
    assert_eq!(reg.push(Style::Mastodon, &Vapid::generate()).send(&http).await.status, 403);
    let ghost = PushRequest::new(&format!("{base}/push/nope"), Style::Mastodon, &vapid, &reg.p256dh, &reg.auth);
    assert_eq!(ghost.send(&http).await.status, 404);
    // App API calls are not pushes.
    app.register_ok("expo", &expo_token(), INSTANCE, None, None).await;

    let m = relay.metrics().await;
    assert_eq!(metric(&m, "push_relay_pushes_total{status=\"201\"}"), Some(3.0), "{m}");
    assert_eq!(metric(&m, "push_relay_pushes_total{status=\"401\"}"), Some(2.0), "{m}");
    assert_eq!(metric(&m, "push_relay_pushes_total{status=\"403\"}"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "push_relay_pushes_total{status=\"404\"}"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "push_relay_pushes_total{status=\"400\"}"), None, "{m}");
    assert!(m.contains("# TYPE push_relay_pushes_total counter"), "{m}");
    assert!(m.contains("push_relay_push_duration_seconds_bucket{"), "latency histogram: {m}");

    for path in ["/healthz", "/readyz"] {
        let resp = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
    }
    let resp = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
}

// ---------------------------------------------------------------------------
// 6. check-config
// ---------------------------------------------------------------------------

#[test]
fn check_config_points_at_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("unknown-key.toml", "[server]\nlisten = \"127.0.0.1:8080\"\nlistn = \"127.0.0.1:9\"\n", 3, "server.listn"),
        ("bad-listen.toml", "[server]\n\nlisten = \"not an address\"\n", 3, "server.listen"),
        (
            "missing-var.toml",
            "[server]\nlisten = \"127.0.0.1:8080\"\n\n[providers.expo]\nkind = \"expo\"\naccess_token = \"${PUSH_RELAY_E2E_SURELY_UNSET}\"\n",
            6,
            "providers.expo.access_token",
        ),
        ("bad-limit.toml", "[limits]\nper_registration = { per_second = 0, burst = 2 }\n", 2, "limits.per_registration"),
        ("unknown-table.toml", "[server]\nlisten = \"127.0.0.1:8080\"\n\n[servr]\nx = 1\n", 4, "servr"),
    ];
    for (name, text, line, key) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let p = path.to_str().unwrap();
        let out = run_cli(&["check-config", "--config", p]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: exit code; stderr: {stderr}");
        assert!(stderr.contains(&format!("{p}:{line}:")), "{name}: names file and line {line}: {stderr}");
        assert!(
            stderr.contains(&format!("`{key}`")) || stderr.contains(&format!("`{key}.")),
            "{name}: names key {key}: {stderr}"
        );
    }
    assert!(
        String::from_utf8_lossy(&run_cli(&["check-config", "--config", dir.path().join("missing-var.toml").to_str().unwrap()]).stderr)
            .contains("PUSH_RELAY_E2E_SURELY_UNSET"),
        "names the variable"
    );

    // The shipped example is valid.
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/push-relay.example.toml");
    let out = run_cli(&["check-config", "--config", example.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "example config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A missing file is an error too, not a silent default.
    let out = run_cli(&["check-config", "--config", dir.path().join("nope.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

// ---------------------------------------------------------------------------
// 7. Hostile input
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hostile_input_never_kills_the_relay() {
    let (_expo, mut relay) = start(LOOSE, "").await;
    let app = relay.app();
    let base = relay.base_url();
    let port = relay.port();
    let http = client();
    let vapid = Vapid::generate();
    let reg = confirmed(&app, &vapid, false).await;
    let dec = confirmed(&app, &vapid, true).await;
    let path = path_of(&reg.endpoint);
    let key = vapid.public_key_b64();
    let aud = origin_of(&reg.endpoint);
    let now = unix_now();

    // Garbage Authorization headers (all must be 401).
    let garbage = [
        "vapid".to_string(),
        "vapid ".to_string(),
        "vapid t=,k=".to_string(),
        "vapid t=a.b.c,k=!!!".to_string(),
        "vapid t=a.b.c,k=".to_string(),
        "vapid ,,,;;;===".to_string(),
        "vapid t==,k==".to_string(),
        format!("vapid t={}.{}.{},k={key}", "e30", "e30", "e30"),
        format!("vapid t=..,k={key}"),
        format!("vapid t=....,k={key}"),
        "WebPush".to_string(),
        "WebPush ....".to_string(),
        format!("vapid t={},k={key}", "A".repeat(20_000)),
        format!("vapid t=x.y.z,k={}", "B".repeat(20_000)),
        format!("webpush {}", "x.".repeat(5000)),
        // JWT parts that decode but are not what they should be.
        format!("vapid t={}.{}.{},k={key}", b64url(b"[]"), b64url(b"{}"), b64url(&[1; 64])),
        format!("vapid t={}.{}.{},k={key}", b64url(br#"{"alg":"ES256"}"#), b64url(b"null"), b64url(&[1; 64])),
        format!("vapid t={}.{}.{},k={key}", b64url(br#"{"alg":"ES256"}"#), b64url(br#"{"aud":5,"exp":"x"}"#), b64url(&[0xff; 64])),
        format!("vapid t={}.{}.{},k={key}", b64url(br#"{"alg":"ES256"}"#), b64url(&[0xff, 0xfe]), b64url(&[1; 64])),
        format!("vapid t={}.{}.{},k={key}", b64url(br#"{"alg":"ES256"}"#), b64url(br#"{"aud":"x","exp":1e400}"#), b64url(&[1; 64])),
        format!("vapid t={}.{}.{},k={key}", b64url(br#"{"alg":"ES256"}"#), b64url(br#"{"aud":"x","exp":1}"#), b64url(&[1; 71])),
        format!("vapid t={}.{}.{},k={key}", b64url(br#"{"alg":"ES256"}"#), b64url(br#"{"aud":"x","exp":1}"#), b64url(&[0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x00])),
        format!("vapid t={},k={}", vapid.jwt_with_claims(&json!({"aud": aud, "exp": 1e300})), key),
        format!("vapid t={},k={}", vapid.jwt_with_claims(&json!({"aud": aud, "exp": -1e300})), key),
        format!("vapid t={},k={}", vapid.jwt_with_claims(&json!({"aud": aud, "exp": i64::MIN})), key),
        format!("vapid t={},k={}", vapid.jwt_with_claims(&json!({"aud": [aud], "exp": now + 60})), key),
        format!("vapid t={},k={}", vapid.jwt(&aud, now + 60, None), b64url(&[0u8; 33])),
        format!("vapid t={},k={}", vapid.jwt(&aud, now + 60, None), b64url(&[2u8; 1])),
    ];
    for (i, auth) in garbage.iter().enumerate() {
        let r = reg.push(Style::Mastodon, &vapid).header("Authorization", auth).send(&http).await;
        assert_push_error(&r, 401, "vapid_invalid", &format!("garbage Authorization #{i} {:.60}", auth));
    }

    // Non-UTF-8 bytes in header values, on the wire.
    let p = reg.push(Style::Mastodon, &vapid).prepare();
    let cl = format!("Content-Length: {}", p.body.len());
    let without = |names: &[&str]| -> Vec<(String, String)> {
        p.headers.iter().filter(|(k, _)| !names.iter().any(|n| k.eq_ignore_ascii_case(n))).cloned().collect()
    };
    let bin_cases: Vec<(&str, Vec<(String, String)>, Vec<Vec<u8>>, u16)> = vec![
        ("Authorization with 0xff bytes", without(&["authorization"]), vec![b"Authorization: vapid t=\xff\xfe\xfd,k=\x80\x81".to_vec()], 401),
        ("Content-Encoding with 0xff bytes", without(&["content-encoding"]), vec![b"Content-Encoding: aes\xff128gcm".to_vec()], 400),
        ("Crypto-Key with 0xff bytes (aes128gcm ignores it)", p.headers.clone(), vec![b"Crypto-Key: dh=\xff\xff".to_vec()], 201),
        ("TTL with 0xff bytes", without(&["ttl"]), vec![b"TTL: \xff\xff".to_vec()], 201),
        ("Topic and Urgency with 0xff bytes", p.headers.clone(), vec![b"Topic: \xe9t\xe9".to_vec(), b"Urgency: h\xefgh".to_vec()], 201),
    ];
    for (what, headers, extra, want) in bin_cases {
        let mut lines: Vec<&[u8]> = extra.iter().map(Vec::as_slice).collect();
        lines.push(cl.as_bytes());
        let mut req = raw_head(port, &path, &headers, &lines);
        req.extend(&p.body);
        let (status, text) = raw_http(port, &req).await.unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(status, want, "{what}: {text}");
    }

    // Huge header values: refused with a 4xx, not a crash.
    for size in [64 * 1024, 1024 * 1024] {
        let huge = format!("Authorization: vapid t={},k={key}", "A".repeat(size));
        let headers = without(&["authorization"]);
        let mut req = raw_head(port, &path, &headers, &[huge.as_bytes(), cl.as_bytes()]);
        req.extend(&p.body);
        match raw_http(port, &req).await {
            Some((status, text)) => assert!((400..500).contains(&status), "{size}-byte header: {status} {:.300}", text),
            None => panic!("{size}-byte header: connection closed without an answer"),
        }
    }
    let many: Vec<String> = (0..200).map(|i| format!("X-Junk-{i}: {}", "j".repeat(100))).collect();
    let many_refs: Vec<&[u8]> = many.iter().map(|s| s.as_bytes()).chain([cl.as_bytes()]).collect();
    let mut req = raw_head(port, &path, &p.headers, &many_refs);
    req.extend(&p.body);
    let answer = raw_http(port, &req).await;
    assert!(
        answer.as_ref().is_some_and(|(s, _)| *s == 201 || (400..500).contains(s)),
        "200 junk headers: {answer:?}"
    );

    // Empty and random bodies.
    for style in [Style::Mastodon, Style::PleromaAesgcm] {
        let r = reg.push(style, &vapid).raw_body(b"").send(&http).await;
        assert_push_error(&r, 400, "invalid_encryption", &format!("{style:?} empty body"));
    }
    for i in 0..20 {
        let mut random = vec![0u8; 1 + (rand::random::<usize>() % 4000)];
        openssl::rand::rand_bytes(&mut random).unwrap();
        // Make sure the framing is wrong (so 400 is the one right answer).
        if random.len() > 20 {
            random[20] = 7;
        }
        let r = reg.push(Style::Mastodon, &vapid).raw_body(&random).send(&http).await;
        assert_push_error(&r, 400, "invalid_encryption", &format!("random body #{i} ({} bytes)", random.len()));
    }

    // Well-framed but undecryptable bodies to a registration that allows
    // decryption: accepted (the relay cannot know before trying), delivered
    // opaque, and decryption never panics — whatever the record size says.
    let mut expected_fallbacks = 0;
    for rs in [18u32, 19, 100, 4096, 65_535, u32::MAX] {
        let mut body = framed_random_body(300);
        body[16..20].copy_from_slice(&rs.to_be_bytes());
        let r = dec.push(Style::Mastodon, &vapid).raw_body(&body).send(&http).await;
        assert_eq!(r.status, 201, "framed random body, rs {rs}: {}", r.body);
        expected_fallbacks += 1;
    }
    let salt = format!("salt={}", b64url(&[9u8; 16]));
    for (rs, len) in [(3u32, 40usize), (4, 18), (17, 100), (18, 18), (4096, 3000), (u32::MAX, 100)] {
        let mut body = vec![0u8; len];
        openssl::rand::rand_bytes(&mut body).unwrap();
        let r = dec
            .push(Style::PleromaAesgcm, &vapid)
            .header("Encryption", &format!("{salt};rs={rs}"))
            .raw_body(&body)
            .send(&http)
            .await;
        assert_eq!(r.status, 201, "random aesgcm body, rs {rs}, {len} bytes: {}", r.body);
        expected_fallbacks += 1;
    }
    // A dh that is a valid encoding but not on the curve (decryption must fail cleanly).
    let mut off_curve = vec![4u8];
    off_curve.extend([1u8; 64]);
    let r = dec
        .push(Style::PleromaAesgcm, &vapid)
        .header("Crypto-Key", &format!("dh={};p256ecdsa={key}", b64url(&off_curve)))
        .raw_body([5u8; 40])
        .send(&http)
        .await;
    assert!(r.status == 201 || r.status == 400, "off-curve dh: {} {}", r.status, r.body);
    if r.status == 201 {
        expected_fallbacks += 1;
    }

    // Odd paths.
    for p in ["/push/", "/push/%ff%fe", "/push/..%2f..%2fetc%2fpasswd", "/push/a/b", "/push/%00"] {
        let r = http.post(format!("{base}{p}")).body("x").send().await.unwrap();
        let s = r.status().as_u16();
        assert!((400..500).contains(&s), "{p}: {s}");
    }

    // Still alive and well.
    assert!(relay.is_running(), "relay died; log:\n{}", relay.log_tail(40));
    let resp = http.get(format!("{base}/healthz")).send().await.expect("healthz after hostile input");
    assert_eq!(resp.status().as_u16(), 200);
    let r = reg.push(Style::Mastodon, &vapid).send(&http).await;
    assert_eq!(r.status, 201, "a good push still works: {}", r.body);
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "push_relay_decrypt_fallbacks_total"), Some(expected_fallbacks as f64), "{m}");
    assert!(!relay.log().contains("panicked"), "a panic was logged:\n{}", relay.log_tail(60));
}
