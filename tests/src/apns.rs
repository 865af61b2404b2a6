//! `MockApns`: an HTTP/2-over-TLS server that checks what Apple's APNs
//! checks: the provider JWT (ES256 signature under the app's `.p8` key,
//! `kid`, `iss`, `iat`) or the TLS client certificate, every header
//! (`apns-topic` of the app, `apns-push-type`, `apns-priority`,
//! `apns-expiration`, `apns-id`, `apns-collapse-id`) and the JSON payload.
//!
//! One server accepts several apps ([`ApnsApp`]), like the real one: a
//! token-auth app is recognised by its JWT's `kid` and must sign with its own
//! key, name its own team in `iss` and send its own topic; a
//! certificate-auth app by the client certificate its connection presented.
//!
//! It records every well-formed request ([`ApnsRequest`], with the app, the
//! JWT and the TLS connection it came on), counts connections, can be
//! scripted to answer each APNs error per device token, and can be stalled
//! (requests wait, unanswered, until released). Requests that are not
//! well-formed are answered with the error APNs would give and listed in
//! [`problems`](MockApns::problems).

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use openssl::pkey::{PKey, Public};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::credentials::{unix_now, verify_jws, ApnsKey, Issued, Pki};

/// A scripted answer: status, `reason`, `Retry-After` seconds.
pub type ApnsAnswer = (u16, &'static str, Option<u64>);

/// How an app authenticates.
pub enum ApnsAuth {
    /// Token auth: the `.p8` key's public half, its key id and the team id.
    Token { key_id: String, team_id: String, public: PKey<Public> },
    /// Certificate auth: the client certificate (DER) its connections present.
    Certificate(Vec<u8>),
}

/// One app the server accepts pushes for.
pub struct ApnsApp {
    /// A label for the app, recorded in [`ApnsRequest::app`].
    pub name: String,
    pub auth: ApnsAuth,
    /// The bundle id its requests must carry in `apns-topic`.
    pub topic: String,
}

impl ApnsApp {
    /// A token-auth app signing with `key`.
    pub fn token(name: &str, key: &ApnsKey, topic: &str) -> ApnsApp {
        ApnsApp {
            name: name.into(),
            auth: ApnsAuth::Token { key_id: key.key_id.clone(), team_id: key.team_id.clone(), public: key.public() },
            topic: topic.into(),
        }
    }

    /// A certificate-auth app presenting `cert` (issued by the server's [`Pki`]).
    pub fn certificate(name: &str, cert: &Issued, topic: &str) -> ApnsApp {
        ApnsApp { name: name.into(), auth: ApnsAuth::Certificate(cert.cert_der()), topic: topic.into() }
    }
}

/// One request the server accepted as well-formed (whatever it answered).
#[derive(Clone, Debug)]
pub struct ApnsRequest {
    /// The [`ApnsApp::name`] it authenticated as.
    pub app: String,
    /// The device token from the path.
    pub token: String,
    /// Request headers, names in lower case.
    pub headers: HashMap<String, String>,
    /// The JSON payload.
    pub body: serde_json::Value,
    /// The provider JWT (token auth).
    pub jwt: Option<String>,
    /// Which TLS connection (numbered from 1 in accept order) carried it.
    pub connection: usize,
    /// When it arrived.
    pub at: Instant,
    /// The status the server answered.
    pub status: u16,
}

impl ApnsRequest {
    /// A header's value, or `""`.
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

#[derive(Default)]
struct State {
    seen: Vec<ApnsRequest>,
    problems: Vec<String>,
    /// Answers for a device token, used up in order; 200 when none is left.
    script: HashMap<String, VecDeque<ApnsAnswer>>,
    /// Provider tokens the server has declared expired.
    expired: HashSet<String>,
}

struct Inner {
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    stalled: AtomicBool,
    latency_ms: AtomicU64,
    apps: Vec<ApnsApp>,
    state: Mutex<State>,
}

/// The mock APNs server. Dropping it stops accepting connections.
pub struct MockApns {
    addr: SocketAddr,
    inner: Arc<Inner>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for MockApns {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl MockApns {
    /// Start on `127.0.0.1:<random port>` with a server certificate from
    /// `pki` (clients must trust `pki.ca_pem()`), accepting `apps`. Client
    /// certificates chaining to `pki`'s CA are asked for, and required when
    /// every app uses certificate auth. Must run inside a tokio runtime.
    pub async fn start(pki: &Pki, apps: Vec<ApnsApp>) -> MockApns {
        let server_cert = pki.server();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let any_certificate = apps.iter().any(|a| matches!(a.auth, ApnsAuth::Certificate(_)));
        let only_certificates = apps.iter().all(|a| matches!(a.auth, ApnsAuth::Certificate(_)));
        let builder = if any_certificate {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from(pki.ca.to_der().unwrap())).unwrap();
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if !only_certificates {
                verifier = verifier.allow_unauthenticated();
            }
            builder.with_client_cert_verifier(verifier.build().unwrap())
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(
                vec![CertificateDer::from(server_cert.cert.to_der().unwrap())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_cert.key.private_key_to_pkcs8().unwrap())),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            connections: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            stalled: AtomicBool::new(false),
            latency_ms: AtomicU64::new(5),
            apps,
            state: Mutex::new(State::default()),
        });
        let accepting = inner.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let connection = accepting.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let (acceptor, inner) = (acceptor.clone(), accepting.clone());
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            inner.lock().problems.push(format!("TLS handshake failed: {e}"));
                            return;
                        }
                    };
                    let peer = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
                    let service = hyper::service::service_fn(move |request| {
                        let (inner, peer) = (inner.clone(), peer.clone());
                        async move { Ok::<_, Infallible>(inner.handle(request, peer, connection).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(1000)
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        MockApns { addr, inner, accept }
    }

    /// `https://127.0.0.1:PORT`, for the provider's `base_url`.
    pub fn base_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Answers for `token`'s next requests, in order; then 200 again.
    /// `(403, "ExpiredProviderToken", _)` also marks the JWT that request
    /// carried as expired for good, as APNs would.
    pub fn script(&self, token: &str, answers: &[ApnsAnswer]) {
        self.inner.lock().script.insert(token.into(), answers.iter().copied().collect());
    }

    /// Every well-formed request so far.
    pub fn seen(&self) -> Vec<ApnsRequest> {
        self.inner.lock().seen.clone()
    }

    /// Well-formed requests for one device token.
    pub fn seen_for(&self, token: &str) -> Vec<ApnsRequest> {
        self.seen().into_iter().filter(|r| r.token == token).collect()
    }

    /// Well-formed requests of one app.
    pub fn seen_by(&self, app: &str) -> Vec<ApnsRequest> {
        self.seen().into_iter().filter(|r| r.app == app).collect()
    }

    /// Requests answered 200 for `token`.
    pub fn delivered_to(&self, token: &str) -> Vec<ApnsRequest> {
        self.seen_for(token).into_iter().filter(|r| r.status == 200).collect()
    }

    /// What was wrong with the requests that were not well-formed.
    pub fn problems(&self) -> Vec<String> {
        self.inner.lock().problems.clone()
    }

    /// Distinct provider JWTs seen (of every app).
    pub fn distinct_jwts(&self) -> HashSet<String> {
        self.seen().into_iter().filter_map(|s| s.jwt).collect()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// The most requests handled at once so far.
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }

    /// While stalled, requests are held unanswered (and recorded only once
    /// released, if the client still waits).
    pub fn stall(&self, stalled: bool) {
        self.inner.stalled.store(stalled, Ordering::SeqCst);
    }

    /// Latency added to every answer (default 5 ms, so that concurrent
    /// requests really overlap).
    pub fn set_latency(&self, latency: Duration) {
        self.inner.latency_ms.store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    /// Wait until `token` got `count` answers of 200; returns them.
    pub async fn wait_delivered(&self, token: &str, count: usize, timeout: Duration) -> Vec<ApnsRequest> {
        crate::poll_until(
            timeout,
            || Some(self.delivered_to(token)).filter(|got| got.len() >= count),
            || {
                format!(
                    "mock APNs: {} of {count} deliveries to {token}; requests for it: {:#?}; problems: {:?}",
                    self.delivered_to(token).len(),
                    self.seen_for(token).iter().map(|r| (r.status, &r.body)).collect::<Vec<_>>(),
                    self.problems()
                )
            },
        )
        .await
    }

    /// Wait until `count` requests in all were answered 200.
    pub async fn wait_delivered_total(&self, count: usize, timeout: Duration) -> Vec<ApnsRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: Vec<_> = self.seen().into_iter().filter(|r| r.status == 200).collect();
            if got.len() >= count || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn handle(&self, request: Request<hyper::body::Incoming>, peer: Option<Vec<u8>>, connection: usize) -> Response<Full<Bytes>> {
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
        self.answer(request, peer, connection, at).await
    }

    async fn answer(&self, request: Request<hyper::body::Incoming>, peer: Option<Vec<u8>>, connection: usize, at: Instant) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let headers: HashMap<String, String> = parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let header = |name: &str| headers.get(name).map(String::as_str).unwrap_or("");
        let refuse = |status: u16, reason: &str, problem: String| {
            self.lock().problems.push(problem);
            reply(status, reason, None)
        };
        // What APNs itself checks, in its terms.
        if parts.version != hyper::Version::HTTP_2 || parts.method != hyper::Method::POST {
            return refuse(405, "MethodNotAllowed", format!("{:?} {}", parts.version, parts.method));
        }
        let Some(token) = parts.uri.path().strip_prefix("/3/device/").map(str::to_string) else {
            return refuse(404, "BadPath", format!("path {}", parts.uri.path()));
        };
        if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return refuse(400, "BadDeviceToken", format!("token {token}"));
        }
        // Which app: the client certificate, else the JWT's kid.
        let by_certificate = peer.as_ref().and_then(|der| {
            self.apps.iter().find(|a| matches!(&a.auth, ApnsAuth::Certificate(c) if c == der))
        });
        let (app, jwt) = if let Some(app) = by_certificate {
            if headers.contains_key("authorization") {
                return refuse(403, "InvalidProviderToken", format!("{}: a token with certificate auth", app.name));
            }
            (app, None)
        } else {
            let Some(jwt) = header("authorization").strip_prefix("bearer ") else {
                return refuse(403, "MissingProviderToken", format!("authorization {:?}", header("authorization")));
            };
            let kid = jwt
                .split('.')
                .next()
                .and_then(|h| crate::webpush::try_b64decode_any(h))
                .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
                .map(|h| h["kid"].as_str().unwrap_or("").to_string())
                .unwrap_or_default();
            let found = self.apps.iter().find(|a| matches!(&a.auth, ApnsAuth::Token { key_id, .. } if *key_id == kid));
            let Some(app) = found else {
                return refuse(403, "InvalidProviderToken", format!("no app with kid {kid:?}"));
            };
            let ApnsAuth::Token { team_id, public, .. } = &app.auth else { unreachable!() };
            let checked = verify_jws(jwt, public, "ES256").and_then(|t| {
                let iat = t.claims["iat"].as_u64().unwrap_or(0);
                if t.claims["iss"] != team_id.as_str() {
                    Err(format!("{}: iss {} not {team_id}", app.name, t.claims["iss"]))
                } else if iat + 3600 < unix_now() || iat > unix_now() + 60 {
                    Err(format!("{}: iat {iat}", app.name))
                } else {
                    Ok(())
                }
            });
            if let Err(why) = checked {
                return refuse(403, "InvalidProviderToken", format!("{}: {why}", app.name));
            }
            if self.lock().expired.contains(jwt) {
                return reply(403, "ExpiredProviderToken", None);
            }
            (app, Some(jwt.to_string()))
        };
        if header("apns-topic") != app.topic {
            return refuse(400, "TopicDisallowed", format!("{}: apns-topic {:?} not {:?}", app.name, header("apns-topic"), app.topic));
        }
        if header("apns-push-type") != "alert" {
            return refuse(400, "InvalidPushType", format!("apns-push-type {:?}", header("apns-push-type")));
        }
        if !["5", "10"].contains(&header("apns-priority")) {
            return refuse(400, "BadPriority", format!("apns-priority {:?}", header("apns-priority")));
        }
        if header("apns-expiration").parse::<u64>().is_err() {
            return refuse(400, "BadExpirationDate", format!("apns-expiration {:?}", header("apns-expiration")));
        }
        if !is_uuid(header("apns-id")) {
            return refuse(400, "BadMessageId", format!("apns-id {:?}", header("apns-id")));
        }
        if headers.get("apns-collapse-id").is_some_and(|c| c.len() > 64) {
            return refuse(400, "BadCollapseId", "apns-collapse-id over 64 bytes".into());
        }
        if body.len() > 4096 {
            return refuse(413, "PayloadTooLarge", format!("{} bytes", body.len()));
        }
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return refuse(400, "BadPayload", "not JSON".into());
        };
        if !json["aps"]["alert"].is_object() {
            return refuse(400, "PayloadEmpty", format!("no aps.alert in {json}"));
        }
        let mut state = self.lock();
        let scripted = state.script.get_mut(&token).and_then(VecDeque::pop_front);
        let (status, response) = match scripted {
            Some((403, "ExpiredProviderToken", _)) => {
                state.expired.extend(jwt.clone());
                (403, reply(403, "ExpiredProviderToken", None))
            }
            Some((status, reason, after)) => (status, reply(status, reason, after)),
            None => {
                let mut ok = Response::new(Full::new(Bytes::new()));
                ok.headers_mut().insert("apns-id", header("apns-id").parse().unwrap());
                (200, ok)
            }
        };
        state.seen.push(ApnsRequest { app: app.name.clone(), token, headers: headers.clone(), body: json, jwt, connection, at, status });
        response
    }
}

fn reply(status: u16, reason: &str, retry_after: Option<u64>) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "reason": reason }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    if let Some(after) = retry_after {
        response.headers_mut().insert("retry-after", after.to_string().parse().unwrap());
    }
    response
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A 64-hex-character device token made from `i`.
pub fn apns_token(i: usize) -> String {
    format!("{i:064x}")
}
