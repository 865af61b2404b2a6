//! `MockFcm`: an FCM HTTP v1 server and the OAuth2 token endpoint of its
//! service accounts (plain HTTP, warp).
//!
//! * `POST /token`: the RFC 7523 JWT-bearer grant. The assertion's RS256
//!   signature must verify under the service account named in `iss`, with
//!   `typ: JWT`, the FCM scope, `aud` = this endpoint, `iat` now and `exp` =
//!   `iat` + 3600. Answers a fresh `ya29.test-N` access token.
//! * `POST /v1/projects/{project}/messages:send`: the bearer must be a token
//!   issued (and not revoked) for that project's account; the message must
//!   have a token, `android.priority` HIGH/NORMAL, `android.ttl` `"<n>s"`,
//!   `data` with only string values, and no unknown fields.
//!
//! Answers can be scripted per registration token (FCM's google.rpc error
//! bodies: [`fcm_error`]); the server counts token requests, records every
//! well-formed message with the bearer it came with, and can be stalled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warp::http::Response;
use warp::Filter;

use crate::credentials::{unix_now, verify_jws, ServiceAccount};

/// The OAuth2 scope of FCM sends.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// A scripted answer: status, JSON body, `Retry-After` seconds.
pub type FcmAnswer = (u16, Value, Option<u64>);

/// One message the server accepted as well-formed (whatever it answered).
#[derive(Clone, Debug)]
pub struct FcmRequest {
    /// The project from the path.
    pub project: String,
    /// The bearer access token it came with.
    pub bearer: String,
    /// The `message` object.
    pub message: Value,
    pub at: Instant,
    /// The status the server answered.
    pub status: u16,
}

impl FcmRequest {
    /// `message.token`.
    pub fn token(&self) -> &str {
        self.message["token"].as_str().unwrap_or("")
    }
}

struct State {
    seen: Vec<FcmRequest>,
    problems: Vec<String>,
    script: HashMap<String, VecDeque<FcmAnswer>>,
    /// Access tokens issued and not revoked → their project.
    valid: HashMap<String, String>,
    issued: usize,
    expires_in: u64,
    /// When set, the token endpoint refuses the grant.
    refuse_grant: bool,
    /// When set, every bearer token is refused (401).
    reject_bearers: bool,
}

struct Inner {
    addr: SocketAddr,
    /// Service accounts by client email.
    accounts: HashMap<String, ServiceAccount>,
    token_requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    stalled: AtomicBool,
    latency_ms: AtomicU64,
    state: Mutex<State>,
}

/// The mock FCM server. Dropping it shuts it down.
pub struct MockFcm {
    inner: Arc<Inner>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for MockFcm {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl MockFcm {
    /// Start on `127.0.0.1:<random port>`, trusting these service accounts
    /// (write their JSON with [`ServiceAccount::write_json`] and this
    /// server's [`token_uri`](Self::token_uri)). Inside a tokio runtime.
    pub async fn start(accounts: &[&ServiceAccount]) -> MockFcm {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inner = Arc::new(Inner {
            addr: listener.local_addr().unwrap(),
            accounts: accounts.iter().map(|a| (a.client_email.clone(), (*a).clone())).collect(),
            token_requests: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            stalled: AtomicBool::new(false),
            latency_ms: AtomicU64::new(5),
            state: Mutex::new(State {
                seen: vec![],
                problems: vec![],
                script: HashMap::new(),
                valid: HashMap::new(),
                issued: 0,
                expires_in: 3599,
                refuse_grant: false,
                reject_bearers: false,
            }),
        });
        let token_inner = inner.clone();
        let token = warp::post()
            .and(warp::path("token"))
            .and(warp::path::end())
            .and(warp::body::form::<HashMap<String, String>>())
            .map(move |form: HashMap<String, String>| token_inner.token(form));
        let send_inner = inner.clone();
        let send = warp::post()
            .and(warp::path!("v1" / "projects" / String / String))
            .and(warp::header::optional::<String>("authorization"))
            .and(warp::body::bytes())
            .then(move |project: String, method: String, auth: Option<String>, body: bytes::Bytes| {
                let inner = send_inner.clone();
                async move { inner.send(&project, &method, auth, &body).await }
            });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            warp::serve(token.or(send))
                .incoming(listener)
                .graceful(async move {
                    let _ = rx.await;
                })
                .run(),
        );
        MockFcm { inner, shutdown: Some(tx) }
    }

    /// `http://127.0.0.1:PORT`, for the provider's `base_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The token endpoint, for the service account's `token_uri`.
    pub fn token_uri(&self) -> String {
        self.inner.token_uri()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// What was wrong with requests that were not well-formed.
    pub fn problems(&self) -> Vec<String> {
        self.lock().problems.clone()
    }

    /// Every well-formed message so far.
    pub fn seen(&self) -> Vec<FcmRequest> {
        self.lock().seen.clone()
    }

    /// Well-formed messages to one registration token.
    pub fn seen_for(&self, token: &str) -> Vec<FcmRequest> {
        self.seen().into_iter().filter(|r| r.token() == token).collect()
    }

    /// Messages to `token` answered 200.
    pub fn delivered_to(&self, token: &str) -> Vec<FcmRequest> {
        self.seen_for(token).into_iter().filter(|r| r.status == 200).collect()
    }

    /// Answers for `token`'s next messages, in order; then 200 again.
    pub fn script(&self, token: &str, answers: Vec<FcmAnswer>) {
        self.lock().script.insert(token.into(), answers.into());
    }

    /// Revokes every access token issued so far (the next send gets 401).
    pub fn revoke_all(&self) {
        self.lock().valid.clear();
    }

    /// `expires_in` of the tokens issued from now on (default 3599).
    pub fn set_expires_in(&self, secs: u64) {
        self.lock().expires_in = secs;
    }

    /// While set, the token endpoint refuses every grant (400 invalid_grant).
    pub fn refuse_grant(&self, refuse: bool) {
        self.lock().refuse_grant = refuse;
    }

    /// While set, every bearer is refused (401), even fresh ones.
    pub fn reject_bearers(&self, reject: bool) {
        self.lock().reject_bearers = reject;
    }

    /// Token requests received so far (good or bad).
    pub fn token_requests(&self) -> usize {
        self.inner.token_requests.load(Ordering::SeqCst)
    }

    /// The most sends handled at once so far.
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }

    /// While stalled, sends are held unanswered (token requests are not).
    pub fn stall(&self, stalled: bool) {
        self.inner.stalled.store(stalled, Ordering::SeqCst);
    }

    /// Latency of every send's answer (default 5 ms).
    pub fn set_latency(&self, latency: Duration) {
        self.inner.latency_ms.store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    /// Wait until `token` got `count` answers of 200; returns them.
    pub async fn wait_delivered(&self, token: &str, count: usize, timeout: Duration) -> Vec<FcmRequest> {
        crate::poll_until(
            timeout,
            || Some(self.delivered_to(token)).filter(|got| got.len() >= count),
            || {
                format!(
                    "mock FCM: {} of {count} deliveries to {token}; messages to it: {:#?}; problems: {:?}",
                    self.delivered_to(token).len(),
                    self.seen_for(token).iter().map(|r| (r.status, &r.message)).collect::<Vec<_>>(),
                    self.problems()
                )
            },
        )
        .await
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn token_uri(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn token(&self, form: HashMap<String, String>) -> Response<String> {
        self.token_requests.fetch_add(1, Ordering::SeqCst);
        let checked = (|| {
            if form.get("grant_type").map(String::as_str) != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
                return Err(format!("grant_type {:?}", form.get("grant_type")));
            }
            let assertion = form.get("assertion").ok_or("no assertion")?;
            let iss = assertion
                .split('.')
                .nth(1)
                .and_then(crate::webpush::try_b64decode_any)
                .and_then(|c| serde_json::from_slice::<Value>(&c).ok())
                .map(|c| c["iss"].as_str().unwrap_or("").to_string())
                .unwrap_or_default();
            let account = self.accounts.get(&iss).ok_or_else(|| format!("no service account {iss:?}"))?;
            let jwt = verify_jws(assertion, &account.public(), "RS256")?;
            let c = &jwt.claims;
            let iat = c["iat"].as_u64().unwrap_or(0);
            if jwt.header["typ"] != "JWT" {
                Err(format!("typ {}", jwt.header["typ"]))
            } else if c["scope"] != FCM_SCOPE {
                Err(format!("scope {}", c["scope"]))
            } else if c["aud"] != self.token_uri().as_str() {
                Err(format!("aud {}", c["aud"]))
            } else if iat.abs_diff(unix_now()) > 60 || c["exp"].as_u64() != Some(iat + 3600) {
                Err(format!("iat {iat} exp {}", c["exp"]))
            } else {
                Ok(account.project_id.clone())
            }
        })();
        let mut state = self.lock();
        let project = match checked {
            Ok(project) => project,
            Err(why) => {
                state.problems.push(format!("token request: {why}"));
                return json_response(400, json!({"error": "invalid_grant", "error_description": why}), None);
            }
        };
        if state.refuse_grant {
            return json_response(400, json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}), None);
        }
        state.issued += 1;
        let token = format!("ya29.test-{}", state.issued);
        state.valid.insert(token.clone(), project);
        json_response(200, json!({"access_token": token, "expires_in": state.expires_in, "token_type": "Bearer"}), None)
    }

    async fn send(&self, project: &str, method: &str, auth: Option<String>, body: &[u8]) -> Response<String> {
        let at = Instant::now();
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        struct Leave<'a>(&'a AtomicUsize);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _leave = Leave(&self.in_flight);
        while self.stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(self.latency_ms.load(Ordering::SeqCst))).await;
        self.answer(project, method, auth, body, at)
    }

    fn answer(&self, project: &str, method: &str, auth: Option<String>, body: &[u8], at: Instant) -> Response<String> {
        let mut state = self.lock();
        let refuse = |state: &mut State, status: u16, rpc: &str, why: String| {
            state.problems.push(why.clone());
            json_response(status, json!({"error": {"code": status, "message": why, "status": rpc}}), None)
        };
        if !self.accounts.values().any(|a| a.project_id == project) || method != "messages:send" {
            return refuse(&mut state, 404, "NOT_FOUND", format!("path {project}/{method}"));
        }
        let bearer = auth.as_deref().and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("").to_string();
        let valid = state.valid.get(&bearer).is_some_and(|p| p == project) && !state.reject_bearers;
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
        let (status, body, after) = match state.script.get_mut(&token).and_then(VecDeque::pop_front) {
            Some(answer) => answer,
            None => (200, json!({"name": format!("projects/{project}/messages/0:1234")}), None),
        };
        state.seen.push(FcmRequest { project: project.into(), bearer, message: message.clone(), at, status });
        json_response(status, body, after)
    }
}

fn json_response(status: u16, body: Value, retry_after: Option<u64>) -> Response<String> {
    let mut response = Response::builder().status(status).header("content-type", "application/json");
    if let Some(after) = retry_after {
        response = response.header("retry-after", after.to_string());
    }
    response.body(body.to_string()).unwrap()
}

/// A google.rpc error body as FCM sends it, with an `FcmError` detail
/// carrying `error_code` when given.
pub fn fcm_error(code: u16, status: &str, message: &str, error_code: Option<&str>) -> Value {
    let mut details = Vec::new();
    if let Some(e) = error_code {
        details.push(json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": e}));
    }
    json!({"error": {"code": code, "message": message, "status": status, "details": details}})
}

/// The set of bearers seen.
pub fn bearers(seen: &[FcmRequest]) -> HashSet<String> {
    seen.iter().map(|r| r.bearer.clone()).collect()
}
