//! The FCM provider against a real FCM HTTP v1 server and OAuth2 token
//! endpoint (plain HTTP): the token endpoint checks the JWT-bearer
//! assertion's RS256 signature against the service account's public key,
//! its scope, audience and lifetime; the send endpoint checks the bearer
//! token and the message's shape, and can be scripted to answer each error.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{build, decrypted, opaque, pkcs8_pem, public_of, rsa_key, unix_now, verify_jwt};
use openssl::pkey::{PKey, Public};
use push_relay_providers::{Content, Outcome, Provider, Urgency};
use serde_json::{json, Value};
use warp::http::Response;
use warp::Filter;

const PROJECT: &str = "demo-project";
const EMAIL: &str = "relay@demo-project.iam.gserviceaccount.com";
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// A scripted answer: status, JSON body, `Retry-After`.
type Answer = (u16, Value, Option<u64>);

#[derive(Default)]
struct State {
    /// Messages accepted as well-formed, with the bearer token they came with.
    seen: Vec<(String, Value)>,
    problems: Vec<String>,
    script: HashMap<String, VecDeque<Answer>>,
    /// Access tokens issued and not revoked.
    valid: HashSet<String>,
    issued: usize,
    expires_in: u64,
    /// When set, the token endpoint refuses the grant.
    refuse_grant: bool,
    /// When set, every bearer token is refused (401).
    reject_bearers: bool,
}

struct FcmServer {
    addr: SocketAddr,
    public: PKey<Public>,
    token_requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    state: Mutex<State>,
}

impl FcmServer {
    async fn start(public: PKey<Public>) -> Arc<FcmServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Arc::new(FcmServer {
            addr: listener.local_addr().unwrap(),
            public,
            token_requests: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            state: Mutex::new(State { expires_in: 3599, ..State::default() }),
        });
        let token_server = server.clone();
        let token = warp::post()
            .and(warp::path("token"))
            .and(warp::path::end())
            .and(warp::body::form::<HashMap<String, String>>())
            .map(move |form: HashMap<String, String>| token_server.token(form));
        let send_server = server.clone();
        let send = warp::post()
            .and(warp::path!("v1" / "projects" / String / String))
            .and(warp::header::optional::<String>("authorization"))
            .and(warp::body::bytes())
            .then(move |project: String, method: String, auth: Option<String>, body: bytes::Bytes| {
                let server = send_server.clone();
                async move { server.send(&project, &method, auth, &body).await }
            });
        tokio::spawn(warp::serve(token.or(send)).incoming(listener).run());
        server
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn token_uri(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn problems(&self) -> Vec<String> {
        self.state.lock().unwrap().problems.clone()
    }

    fn seen(&self) -> Vec<(String, Value)> {
        self.state.lock().unwrap().seen.clone()
    }

    fn script(&self, token: &str, answers: Vec<Answer>) {
        self.state.lock().unwrap().script.insert(token.into(), answers.into());
    }

    /// Revokes every access token issued so far.
    fn revoke_all(&self) {
        self.state.lock().unwrap().valid.clear();
    }

    fn token(&self, form: HashMap<String, String>) -> Response<String> {
        self.token_requests.fetch_add(1, Ordering::SeqCst);
        let mut state = self.state.lock().unwrap();
        let checked = (|| {
            if form.get("grant_type").map(String::as_str) != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
                return Err(format!("grant_type {:?}", form.get("grant_type")));
            }
            let assertion = form.get("assertion").ok_or("no assertion")?;
            let jwt = verify_jwt(assertion, &self.public, "RS256")?;
            let c = &jwt.claims;
            let iat = c["iat"].as_u64().unwrap_or(0);
            if jwt.header["typ"] != "JWT" {
                Err(format!("typ {}", jwt.header["typ"]))
            } else if c["iss"] != EMAIL {
                Err(format!("iss {}", c["iss"]))
            } else if c["scope"] != SCOPE {
                Err(format!("scope {}", c["scope"]))
            } else if c["aud"] != self.token_uri().as_str() {
                Err(format!("aud {}", c["aud"]))
            } else if iat.abs_diff(unix_now()) > 60 || c["exp"].as_u64() != Some(iat + 3600) {
                Err(format!("iat {iat} exp {}", c["exp"]))
            } else {
                Ok(())
            }
        })();
        if let Err(why) = checked {
            state.problems.push(format!("token request: {why}"));
            return json_response(400, json!({"error": "invalid_grant", "error_description": why}), None);
        }
        if state.refuse_grant {
            return json_response(400, json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}), None);
        }
        state.issued += 1;
        let token = format!("ya29.test-{}", state.issued);
        state.valid.insert(token.clone());
        json_response(200, json!({"access_token": token, "expires_in": state.expires_in, "token_type": "Bearer"}), None)
    }

    async fn send(&self, project: &str, method: &str, auth: Option<String>, body: &[u8]) -> Response<String> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let answer = self.answer(project, method, auth, body);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        answer
    }

    fn answer(&self, project: &str, method: &str, auth: Option<String>, body: &[u8]) -> Response<String> {
        let mut state = self.state.lock().unwrap();
        let refuse = |state: &mut State, status: u16, rpc: &str, why: String| {
            state.problems.push(why.clone());
            json_response(status, json!({"error": {"code": status, "message": why, "status": rpc}}), None)
        };
        if project != PROJECT || method != "messages:send" {
            return refuse(&mut state, 404, "NOT_FOUND", format!("path {project}/{method}"));
        }
        let bearer = auth.as_deref().and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("").to_string();
        let valid = state.valid.contains(&bearer) && !state.reject_bearers;
        if !valid {
            // Not a problem of the provider's making when it was revoked.
            return json_response(
                401,
                json!({"error": {"code": 401, "message": "Request had invalid authentication credentials.",
                    "status": "UNAUTHENTICATED"}}),
                None,
            );
        }
        let Ok(body) = serde_json::from_slice::<Value>(body) else {
            return refuse(&mut state, 400, "INVALID_ARGUMENT", "not JSON".into());
        };
        let message = &body["message"];
        let problem = (|| {
            let token = message["token"].as_str().filter(|t| !t.is_empty()).ok_or("no token")?;
            let android = &message["android"];
            if !["HIGH", "NORMAL"].contains(&android["priority"].as_str().unwrap_or("")) {
                return Err(format!("android.priority {}", android["priority"]));
            }
            let ttl = android["ttl"].as_str().unwrap_or("");
            if !ttl.strip_suffix('s').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
                return Err(format!("android.ttl {ttl:?}"));
            }
            let data = message["data"].as_object().ok_or("no data")?;
            if let Some((k, v)) = data.iter().find(|(_, v)| !v.is_string()) {
                return Err(format!("data.{k} is {v}, not a string"));
            }
            let allowed = ["token", "android", "data", "notification"];
            if let Some(k) = message.as_object().unwrap().keys().find(|k| !allowed.contains(&k.as_str())) {
                return Err(format!("unknown field message.{k}"));
            }
            Ok(token.to_string())
        })();
        let token = match problem {
            Ok(token) => token,
            Err(why) => return refuse(&mut state, 400, "INVALID_ARGUMENT", why),
        };
        state.seen.push((bearer, message.clone()));
        match state.script.get_mut(&token).and_then(VecDeque::pop_front) {
            Some((status, body, after)) => json_response(status, body, after),
            None => json_response(200, json!({"name": format!("projects/{PROJECT}/messages/0:1234")}), None),
        }
    }
}

fn json_response(status: u16, body: Value, retry_after: Option<u64>) -> Response<String> {
    let mut response = Response::builder().status(status).header("content-type", "application/json");
    if let Some(after) = retry_after {
        response = response.header("retry-after", after.to_string());
    }
    response.body(body.to_string()).unwrap()
}

fn fcm_error(code: u16, status: &str, message: &str, error_code: Option<&str>) -> Value {
    let mut details = Vec::new();
    if let Some(e) = error_code {
        details.push(json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": e}));
    }
    json!({"error": {"code": code, "message": message, "status": status, "details": details}})
}

struct Setup {
    server: Arc<FcmServer>,
    provider: Arc<dyn Provider>,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let key = rsa_key();
    let server = FcmServer::start(public_of(&key)).await;
    let dir = tempfile::tempdir().unwrap();
    let account = json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "0123456789abcdef",
        "private_key": pkcs8_pem(&key),
        "client_email": EMAIL,
        "client_id": "1234567890",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": server.token_uri(),
    });
    std::fs::write(dir.path().join("service-account.json"), account.to_string()).unwrap();
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
    let message = |token: &str| seen.iter().find(|(_, m)| m["token"] == token).unwrap().1.clone();
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
    assert_eq!(s.server.token_requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn one_access_token_for_a_hundred_concurrent_sends() {
    let s = setup().await;
    let batch: Vec<_> = (0..100).map(|i| opaque(&format!("tok-{i}"), &format!("m{i}"))).collect();
    let outcomes = s.provider.send(&batch).await;
    assert!(s.server.problems().is_empty(), "{:?}", s.server.problems());
    assert_eq!(outcomes, vec![DELIVERED; 100]);
    assert_eq!(s.server.token_requests.load(Ordering::SeqCst), 1, "one token request");
    assert!(s.server.max_in_flight.load(Ordering::SeqCst) > 10, "sends were concurrent");
    let bearers: HashSet<String> = s.server.seen().into_iter().map(|(b, _)| b).collect();
    assert_eq!(bearers.len(), 1);
    // Reused by the next batch too.
    s.provider.send(&batch[..10]).await;
    assert_eq!(s.server.token_requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn token_is_renewed_after_a_401_once_for_everyone() {
    let s = setup().await;
    assert_eq!(s.provider.send(&[opaque("tok-0", "m0")]).await, vec![DELIVERED]);
    s.server.revoke_all();
    let batch: Vec<_> = (1..=30).map(|i| opaque(&format!("tok-{i}"), &format!("m{i}"))).collect();
    let outcomes = s.provider.send(&batch).await;
    assert_eq!(outcomes, vec![DELIVERED; 30], "{:?}", s.server.problems());
    assert_eq!(s.server.token_requests.load(Ordering::SeqCst), 2, "one renewal");
    let bearers: HashSet<String> = s.server.seen().into_iter().map(|(b, _)| b).collect();
    assert_eq!(bearers, HashSet::from(["ya29.test-1".to_string(), "ya29.test-2".to_string()]));
    // A 401 that persists after the renewal is retried later, not looped on.
    s.server.state.lock().unwrap().reject_bearers = true;
    let outcomes = s.provider.send(&[opaque("tok-x", "mx")]).await;
    assert!(matches!(&outcomes[0], Outcome::Retry { reason, .. } if reason.contains("401")), "{outcomes:?}");
    assert_eq!(s.server.token_requests.load(Ordering::SeqCst), 3, "renewed once more, then given up");
}

#[tokio::test]
async fn token_is_renewed_shortly_before_it_expires() {
    let s = setup().await;
    s.server.state.lock().unwrap().expires_in = 2;
    assert_eq!(s.provider.send(&[opaque("tok-0", "m0")]).await, vec![DELIVERED]);
    assert_eq!(s.provider.send(&[opaque("tok-1", "m1")]).await, vec![DELIVERED]);
    assert_eq!(s.server.token_requests.load(Ordering::SeqCst), 1);
    // Renewed once half of a short lifetime is gone (5 minutes before
    // expiry for real, hour-long tokens).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(s.provider.send(&[opaque("tok-2", "m2")]).await, vec![DELIVERED]);
    assert_eq!(s.server.token_requests.load(Ordering::SeqCst), 2);
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
    s.server.state.lock().unwrap().refuse_grant = true;
    let batch: Vec<_> = (0..20).map(|i| opaque(&format!("tok-{i}"), &format!("m{i}"))).collect();
    let outcomes = s.provider.send(&batch).await;
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Retry { reason, .. } if reason.contains("token endpoint answered 400"))),
        "{outcomes:?}"
    );
    assert_eq!(s.server.token_requests.load(Ordering::SeqCst), 1);
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
