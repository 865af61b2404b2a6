//! `MockExpo`: an in-process HTTP server speaking Expo's documented push API
//! (`/--/api/v2/push/send` and `/--/api/v2/push/getReceipts`), with scriptable
//! failures per device token and per request, and a full record of what it got.
//!
//! Faithful points (per Expo's docs):
//! * the body is a JSON array of messages or a single message object; a
//!   message's `to` may be one token or an array of tokens (one ticket each);
//! * answer `200 {"data": [ticket, ...]}` in message order; a single object
//!   request gets `{"data": ticket}` like Expo does;
//! * more than 100 notifications → `400 {"errors":[{"code":"PUSH_TOO_MANY_NOTIFICATIONS"}]}`;
//! * a message whose JSON is over 4096 bytes gets a `MessageTooBig` error ticket;
//! * receipts: `{"data": {"<id>": receipt}}`, unknown ids are left out;
//! * request-level errors are `{"errors":[{"code","message"}]}`.
//!
//! `Content-Encoding: gzip` request bodies are not supported (answered 415),
//! so a relay sending them fails loudly here rather than silently.

use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use warp::http::{Response, StatusCode};
use warp::Filter;

/// One message Expo received (one per recipient token).
#[derive(Clone, Debug)]
pub struct Received {
    /// The recipient device token (the message's `to`, or one element of it).
    pub token: String,
    /// The message as sent (with `to` as the relay sent it).
    pub message: Value,
    /// The request's `Authorization` header, if any.
    pub authorization: Option<String>,
    /// When the request arrived.
    pub at: Instant,
    /// The ticket we answered for it.
    pub ticket: Value,
}

#[derive(Default)]
struct State {
    messages: Vec<Received>,
    batch_sizes: Vec<usize>,
    send_attempts: usize,
    receipt_requests: Vec<Vec<String>>,
    receipts: HashMap<String, Value>,
    dead: HashSet<String>,
    dead_in_receipt: HashSet<String>,
    fail_next: Vec<(u16, Option<u64>)>,
    required_token: Option<String>,
    hold_receipts: bool,
    next_id: u64,
}

/// The mock server. Dropping it shuts the server down.
pub struct MockExpo {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

fn json_response(status: u16, body: Value, retry_after: Option<u64>) -> Response<String> {
    let mut b = Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json; charset=utf-8");
    if let Some(secs) = retry_after {
        b = b.header("retry-after", secs.to_string());
    }
    b.body(body.to_string()).unwrap()
}

fn errors(code: &str, message: &str) -> Value {
    json!({"errors": [{"code": code, "message": message}]})
}

impl MockExpo {
    /// Start on `127.0.0.1:<random port>`. Must be called inside a tokio runtime.
    pub async fn start() -> MockExpo {
        let state: Arc<Mutex<State>> = Arc::default();
        let st = state.clone();
        let route = warp::method()
            .and(warp::path::full())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .map(move |method: warp::http::Method, path: warp::path::FullPath, headers: warp::http::HeaderMap, body: bytes::Bytes| {
                handle(&st, &method, path.as_str(), &headers, &body)
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind mock expo");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            warp::serve(route)
                .incoming(listener)
                .graceful(async move {
                    let _ = rx.await;
                })
                .run(),
        );
        MockExpo { addr, state, shutdown: Some(tx) }
    }

    /// Base URL (`http://127.0.0.1:PORT`), to put in the provider's `base_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, tickets for `token` are `DeviceNotRegistered` errors.
    pub fn dead(&self, token: &str) {
        self.st().dead.insert(token.to_string());
    }

    /// From now on, tickets for `token` are ok but their receipts say
    /// `DeviceNotRegistered`.
    pub fn dead_in_receipt(&self, token: &str) {
        self.st().dead_in_receipt.insert(token.to_string());
    }

    /// Undo [`dead`](Self::dead) / [`dead_in_receipt`](Self::dead_in_receipt).
    pub fn revive(&self, token: &str) {
        let mut s = self.st();
        s.dead.remove(token);
        s.dead_in_receipt.remove(token);
    }

    /// The next `n` send requests are answered with HTTP `status` (plus
    /// `Retry-After: secs` when given) and record no message.
    pub fn fail_next(&self, n: usize, status: u16, retry_after: Option<u64>) {
        let mut s = self.st();
        for _ in 0..n {
            s.fail_next.push((status, retry_after));
        }
    }

    /// Require `Authorization: Bearer <token>` on send requests (401 otherwise);
    /// `None` accepts anything.
    pub fn require_token(&self, token: Option<&str>) {
        self.st().required_token = token.map(str::to_string);
    }

    /// While true, `getReceipts` answers an empty `data` (receipts not ready yet).
    pub fn hold_receipts(&self, hold: bool) {
        self.st().hold_receipts = hold;
    }

    /// Every message received so far, in arrival order.
    pub fn messages(&self) -> Vec<Received> {
        self.st().messages.clone()
    }

    /// Messages received for one device token.
    pub fn messages_for(&self, token: &str) -> Vec<Received> {
        self.st().messages.iter().filter(|m| m.token == token).cloned().collect()
    }

    /// Wait until at least `count` messages arrived (all tokens); panics with
    /// what arrived on timeout.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<Received> {
        self.wait_until(timeout, &format!("{count} messages"), |m| m.len() >= count).await
    }

    /// Wait until at least `count` messages for `token` arrived.
    pub async fn wait_for_token(&self, token: &str, count: usize, timeout: Duration) -> Vec<Received> {
        let msgs = self
            .wait_until(timeout, &format!("{count} messages for {token}"), |m| {
                m.iter().filter(|r| r.token == token).count() >= count
            })
            .await;
        msgs.into_iter().filter(|m| m.token == token).collect()
    }

    async fn wait_until(&self, timeout: Duration, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        crate::poll_until(
            timeout,
            || Some(self.messages()).filter(|msgs| done(msgs)),
            || {
                let msgs = self.messages();
                format!(
                    "MockExpo: waiting for {what}; got {} messages: {:#?}",
                    msgs.len(),
                    msgs.iter().map(|m| (&m.token, &m.message)).collect::<Vec<_>>()
                )
            },
        )
        .await
    }

    /// Number of messages per successfully answered (200) send request.
    pub fn batch_sizes(&self) -> Vec<usize> {
        self.st().batch_sizes.clone()
    }

    /// Number of send requests that reached the server, whatever the answer
    /// (scripted failures and 401s included).
    pub fn send_attempts(&self) -> usize {
        self.st().send_attempts
    }

    /// The ids asked for by each `getReceipts` request.
    pub fn receipt_requests(&self) -> Vec<Vec<String>> {
        self.st().receipt_requests.clone()
    }
}

impl Drop for MockExpo {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn handle(
    state: &Mutex<State>,
    method: &warp::http::Method,
    path: &str,
    headers: &warp::http::HeaderMap,
    body: &[u8],
) -> Response<String> {
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if method != warp::http::Method::POST {
        return json_response(405, errors("METHOD_NOT_ALLOWED", "use POST"), None);
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    match path {
        "/--/api/v2/push/send" => {
            s.send_attempts += 1;
            if !s.fail_next.is_empty() {
                let (status, retry_after) = s.fail_next.remove(0);
                let code = match status {
                    429 => "TOO_MANY_REQUESTS",
                    s if s >= 500 => "INTERNAL_SERVER_ERROR",
                    _ => "SCRIPTED_FAILURE",
                };
                return json_response(status, errors(code, "scripted failure (MockExpo::fail_next)"), retry_after);
            }
            let authorization = header("authorization");
            if let Some(required) = &s.required_token {
                if authorization.as_deref() != Some(format!("Bearer {required}").as_str()) {
                    return json_response(
                        401,
                        errors("UNAUTHORIZED", "The bearer token is invalid; enhanced push security requires a valid access token."),
                        None,
                    );
                }
            }
            if header("content-encoding").is_some_and(|e| !e.eq_ignore_ascii_case("identity")) {
                return json_response(415, errors("UNSUPPORTED_ENCODING", "MockExpo does not decode compressed bodies"), None);
            }
            let parsed: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return json_response(400, errors("VALIDATION_ERROR", &format!("body is not JSON: {e}")), None),
            };
            let single = parsed.is_object();
            let list = match parsed {
                Value::Array(a) => a,
                o @ Value::Object(_) => vec![o],
                _ => return json_response(400, errors("VALIDATION_ERROR", "\"value\" must be an array or an object"), None),
            };
            // Expand `to` arrays: one notification per recipient token.
            let mut notes: Vec<(String, Value)> = Vec::new();
            for m in &list {
                match m.get("to") {
                    Some(Value::String(t)) => notes.push((t.clone(), m.clone())),
                    Some(Value::Array(ts)) if !ts.is_empty() && ts.iter().all(Value::is_string) => {
                        for t in ts {
                            notes.push((t.as_str().unwrap().to_string(), m.clone()));
                        }
                    }
                    _ => {
                        return json_response(
                            400,
                            errors("VALIDATION_ERROR", &format!("\"to\" must be a push token string or a non-empty array of them: {m}")),
                            None,
                        )
                    }
                }
            }
            if notes.len() > 100 {
                return json_response(
                    400,
                    errors(
                        "PUSH_TOO_MANY_NOTIFICATIONS",
                        &format!("You are trying to send more than 100 push notifications in one request ({}).", notes.len()),
                    ),
                    None,
                );
            }
            let mut tickets = Vec::new();
            for (token, message) in notes {
                s.next_id += 1;
                let ticket = if s.dead.contains(&token) {
                    json!({
                        "status": "error",
                        "message": format!("\"{token}\" is not a registered push notification recipient"),
                        "details": {"error": "DeviceNotRegistered", "expoPushToken": token},
                    })
                } else if message.to_string().len() > 4096 {
                    json!({
                        "status": "error",
                        "message": "Message too big: the total notification payload must be at most 4096 bytes.",
                        "details": {"error": "MessageTooBig"},
                    })
                } else {
                    let id = format!(
                        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                        rand::random::<u32>(),
                        rand::random::<u16>(),
                        rand::random::<u16>() & 0xfff,
                        rand::random::<u16>() & 0xfff,
                        s.next_id
                    );
                    let receipt = if s.dead_in_receipt.contains(&token) {
                        json!({
                            "status": "error",
                            "message": format!("\"{token}\" is not a registered push notification recipient"),
                            "details": {"error": "DeviceNotRegistered"},
                        })
                    } else {
                        json!({"status": "ok"})
                    };
                    s.receipts.insert(id.clone(), receipt);
                    json!({"status": "ok", "id": id})
                };
                s.messages.push(Received {
                    token,
                    message,
                    authorization: authorization.clone(),
                    at: now,
                    ticket: ticket.clone(),
                });
                tickets.push(ticket);
            }
            s.batch_sizes.push(tickets.len());
            let data = if single && tickets.len() == 1 { tickets.remove(0) } else { Value::Array(tickets) };
            json_response(200, json!({ "data": data }), None)
        }
        "/--/api/v2/push/getReceipts" => {
            let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let Some(ids) = parsed.get("ids").and_then(Value::as_array) else {
                return json_response(400, errors("VALIDATION_ERROR", "\"ids\" is required and must be an array"), None);
            };
            let ids: Vec<String> = ids.iter().filter_map(|v| v.as_str().map(str::to_string)).collect();
            if ids.len() > 1000 {
                return json_response(400, errors("VALIDATION_ERROR", "\"ids\" must contain at most 1000 items"), None);
            }
            s.receipt_requests.push(ids.clone());
            let mut data = serde_json::Map::new();
            if !s.hold_receipts {
                for id in ids {
                    if let Some(r) = s.receipts.get(&id) {
                        data.insert(id, r.clone());
                    }
                }
            }
            json_response(200, json!({ "data": data }), None)
        }
        _ => json_response(404, errors("NOT_FOUND", &format!("no route {path}")), None),
    }
}
