//! The provider sink: a minimal server speaking Expo's push API
//! (`POST /--/api/v2/push/send` with a JSON array → `{"data":[{"status":"ok","id":…}…]}`,
//! `POST /--/api/v2/push/getReceipts` → every receipt `ok`) that records when
//! each message arrived and how many times.
//!
//! A message is identified by what the bench put in it:
//! * opaque: `data.body`, the base64url encrypted body (unique per push:
//!   fresh salt and sender key) — hashed to a `u64` with the top bit set;
//! * decrypted: `data.notification_id` (the bench numbers them) — top bit clear;
//! * large-body `fetch` messages and anything else unrecognised are counted
//!   as `unknown` (the bench's payloads are sized to never need the fetch path).

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// The common time base of the driver and the sink (nanoseconds since the
/// first call).
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

const OPAQUE_BIT: u64 = 1 << 63;

/// Key of an opaque message: a hash of its `data.body` (base64url text).
pub fn key_opaque(body_b64: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write(body_b64.as_bytes());
    h.finish() | OPAQUE_BIT
}

/// Offset of the bench's `notification_id`s (Mastodon ids are large numbers
/// sent as strings).
pub const NOTIFICATION_ID_BASE: u64 = 113_000_000_000_000_000;

/// Key of a decrypted message: its `notification_id` minus the base.
pub fn key_decrypted(notification_id: &str) -> Option<u64> {
    let n: u64 = notification_id.parse().ok()?;
    n.checked_sub(NOTIFICATION_ID_BASE).filter(|k| k & OPAQUE_BIT == 0)
}

#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub first_ns: u64,
    pub last_ns: u64,
    pub count: u32,
}

#[derive(Default)]
struct Inner {
    arrivals: HashMap<u64, Arrival>,
}

struct Shared {
    inner: Mutex<Inner>,
    distinct: Arc<AtomicUsize>,
    messages: AtomicU64,
    unknown: AtomicU64,
    fetch: AtomicU64,
    decrypted: AtomicU64,
    send_requests: AtomicU64,
    receipt_requests: AtomicU64,
    bad_requests: AtomicU64,
    next_id: AtomicU64,
    delay: Duration,
}

pub struct Sink {
    url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Deserialize)]
struct Msg {
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    notification_id: Option<String>,
    #[serde(default)]
    fetch: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SendBody {
    Many(Vec<Msg>),
    One(Msg),
}

#[derive(Deserialize)]
struct ReceiptsBody {
    ids: Vec<String>,
}

/// Counts at the end of a run.
#[derive(Clone, Debug, Default)]
pub struct SinkCounts {
    pub messages: u64,
    pub unknown: u64,
    pub fetch: u64,
    /// Messages that came in decrypted form (with `notification_id`).
    pub decrypted: u64,
    pub send_requests: u64,
    pub receipt_requests: u64,
    pub bad_requests: u64,
}

impl Sink {
    /// Listen on `listen` (default `127.0.0.1:0`).
    pub async fn start(listen: Option<&str>, delay: Duration) -> Result<Sink> {
        let listener = tokio::net::TcpListener::bind(listen.unwrap_or("127.0.0.1:0"))
            .await
            .context("bind the sink")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            distinct: Arc::new(AtomicUsize::new(0)),
            messages: AtomicU64::new(0),
            unknown: AtomicU64::new(0),
            fetch: AtomicU64::new(0),
            decrypted: AtomicU64::new(0),
            send_requests: AtomicU64::new(0),
            receipt_requests: AtomicU64::new(0),
            bad_requests: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            delay,
        });
        let sh = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let sh = sh.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let sh = sh.clone();
                        async move { Ok::<_, Infallible>(handle(&sh, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Sink { url: format!("http://{addr}"), shared, task })
    }

    /// `http://127.0.0.1:PORT`, for `[providers.expo] base_url`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Forget everything received so far (after the registrations, before
    /// the timed phase).
    pub fn reset(&self) {
        let mut inner = self.shared.inner.lock().unwrap();
        inner.arrivals.clear();
        self.shared.distinct.store(0, Ordering::Relaxed);
        for c in [
            &self.shared.messages,
            &self.shared.unknown,
            &self.shared.fetch,
            &self.shared.decrypted,
            &self.shared.send_requests,
            &self.shared.receipt_requests,
            &self.shared.bad_requests,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Distinct messages received.
    pub fn distinct(&self) -> usize {
        self.shared.distinct.load(Ordering::Relaxed)
    }

    /// The distinct-message counter itself (for a progress task).
    pub fn distinct_counter(&self) -> Arc<AtomicUsize> {
        self.shared.distinct.clone()
    }

    /// Messages received, duplicates included.
    pub fn messages(&self) -> u64 {
        self.shared.messages.load(Ordering::Relaxed)
    }

    /// Every arrival, by key.
    pub fn arrivals(&self) -> HashMap<u64, Arrival> {
        self.shared.inner.lock().unwrap().arrivals.clone()
    }

    pub fn counts(&self) -> SinkCounts {
        let s = &self.shared;
        SinkCounts {
            messages: s.messages.load(Ordering::Relaxed),
            unknown: s.unknown.load(Ordering::Relaxed),
            fetch: s.fetch.load(Ordering::Relaxed),
            decrypted: s.decrypted.load(Ordering::Relaxed),
            send_requests: s.send_requests.load(Ordering::Relaxed),
            receipt_requests: s.receipt_requests.load(Ordering::Relaxed),
            bad_requests: s.bad_requests.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json(status: u16, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn ticket_id(n: u64) -> String {
    format!("b3e7c0de-0000-4000-8000-{n:012x}")
}

async fn handle(sh: &Shared, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let at = now_ns();
    let path = req.uri().path().to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return json(400, r#"{"errors":[{"code":"BAD_BODY","message":"unreadable body"}]}"#.into()),
    };
    match path.as_str() {
        "/--/api/v2/push/send" => {
            sh.send_requests.fetch_add(1, Ordering::Relaxed);
            let msgs = match serde_json::from_slice::<SendBody>(&body) {
                Ok(SendBody::Many(v)) => v,
                Ok(SendBody::One(m)) => vec![m],
                Err(e) => {
                    sh.bad_requests.fetch_add(1, Ordering::Relaxed);
                    return json(400, serde_json::json!({"errors":[{"code":"VALIDATION_ERROR","message": e.to_string()}]}).to_string());
                }
            };
            let mut keys = Vec::with_capacity(msgs.len());
            for m in &msgs {
                let key = m.data.as_ref().and_then(|d| {
                    if d.fetch == Some(true) {
                        sh.fetch.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    match (&d.notification_id, &d.body) {
                        (Some(id), _) => {
                            sh.decrypted.fetch_add(1, Ordering::Relaxed);
                            key_decrypted(id)
                        }
                        (None, Some(b)) => Some(key_opaque(b)),
                        _ => None,
                    }
                });
                match key {
                    Some(k) => keys.push(k),
                    None => {
                        sh.unknown.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            {
                let mut inner = sh.inner.lock().unwrap();
                let mut new = 0;
                for k in keys {
                    inner
                        .arrivals
                        .entry(k)
                        .and_modify(|a| {
                            a.count += 1;
                            a.last_ns = at;
                        })
                        .or_insert_with(|| {
                            new += 1;
                            Arrival { first_ns: at, last_ns: at, count: 1 }
                        });
                }
                sh.distinct.fetch_add(new, Ordering::Relaxed);
            }
            sh.messages.fetch_add(msgs.len() as u64, Ordering::Relaxed);
            let first = sh.next_id.fetch_add(msgs.len() as u64, Ordering::Relaxed);
            let mut out = String::with_capacity(16 + msgs.len() * 64);
            out.push_str(r#"{"data":["#);
            for i in 0..msgs.len() as u64 {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(r#"{"status":"ok","id":""#);
                out.push_str(&ticket_id(first + i));
                out.push_str(r#""}"#);
            }
            out.push_str("]}");
            if !sh.delay.is_zero() {
                tokio::time::sleep(sh.delay).await;
            }
            json(200, out)
        }
        "/--/api/v2/push/getReceipts" => {
            sh.receipt_requests.fetch_add(1, Ordering::Relaxed);
            let ids = serde_json::from_slice::<ReceiptsBody>(&body).map(|b| b.ids).unwrap_or_default();
            let data: serde_json::Map<String, serde_json::Value> =
                ids.into_iter().map(|id| (id, serde_json::json!({"status": "ok"}))).collect();
            json(200, serde_json::json!({ "data": data }).to_string())
        }
        _ => json(404, format!(r#"{{"errors":[{{"code":"NOT_FOUND","message":"no route {path}"}}]}}"#)),
    }
}
