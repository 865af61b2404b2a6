//! HTTP routes: the app API, Web Push ingress and operations endpoints.
//!
//! | route | handler |
//! |---|---|
//! | `POST /v1/registrations` | [`registrations::create`] |
//! | `POST /v1/registrations/{id}/confirm` | [`registrations::confirm`] |
//! | `GET, PATCH, DELETE /v1/registrations/{id}` | [`registrations::get`], `patch`, `delete` |
//! | `GET /v1/registrations/{id}/messages/{message_id}` | [`registrations::fetch_message`] |
//! | `POST /push/{id}` | [`ingress::push`] |
//! | `GET /healthz`, `/readyz`, `/metrics` | operations |

pub mod error;
pub mod ingress;
pub mod registrations;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use push_relay_providers::Provider;
use warp::http::{header, HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Buf, Filter, Rejection};

use self::error::ApiError;
use crate::dispatch::Dispatcher;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::store::Store;

/// Everything a request handler needs, shared by all of them.
pub struct App {
    pub store: Arc<dyn Store>,
    pub providers: HashMap<String, Arc<dyn Provider>>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub dispatcher: Arc<Dispatcher>,
    /// `public_url` without a trailing slash: endpoints are `{this}/push/{id}`.
    pub endpoint_base: String,
    /// The origin VAPID tokens must name in `aud`.
    pub origin: String,
    pub queue: push_relay_config::Queue,
    pub registration_key: Option<push_relay_config::Secret>,
    pub trust_forwarded_for: bool,
    /// Pushes being handled at once; past [`MAX_INFLIGHT_PUSHES`] the relay
    /// is overloaded and answers 503 + Retry-After (SPEC §4).
    pub inflight: tokio::sync::Semaphore,
    /// The WebAssembly filter plugins (`[[plugins]]`); `None` when none is configured.
    pub plugins: Option<Arc<push_relay_plugins::PluginHost>>,
}

/// Pushes handled at once before the relay answers 503 (the store is
/// falling behind: better a retry later than an ever longer wait).
pub const MAX_INFLIGHT_PUSHES: usize = 4096;

/// Largest app API request body.
const MAX_API_BODY: usize = 16 * 1024;

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    warp::http::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(value.to_string().into())
        .unwrap_or_default()
}

/// Reads a body up to `max` bytes; an error if it is longer (the rest is
/// not read) or the connection broke before its end.
async fn read_body<S, B>(stream: S, max: usize) -> Result<Vec<u8>, ingress::BodyError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut stream = std::pin::pin!(stream);
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let Ok(mut chunk) = chunk else { return Err(ingress::BodyError::Unreadable) };
        if body.len() + chunk.remaining() > max {
            return Err(ingress::BodyError::TooLarge);
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            body.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(body)
}

fn body(max: usize) -> impl Filter<Extract = (Result<Vec<u8>, ingress::BodyError>,), Error = Rejection> + Clone {
    warp::body::stream().then(move |stream| read_body(stream, max))
}

fn api_body() -> impl Filter<Extract = (Vec<u8>,), Error = Rejection> + Clone {
    body(MAX_API_BODY).and_then(|b: Result<Vec<u8>, ingress::BodyError>| async move {
        b.map_err(|e| warp::reject::custom(BadBody(e)))
    })
}

#[derive(Debug)]
struct BadBody(ingress::BodyError);
impl warp::reject::Reject for BadBody {}

fn respond(result: Result<Response, ApiError>) -> Result<Response, Infallible> {
    Ok(result.unwrap_or_else(ApiError::into_response))
}

/// The client address for per-IP limits: the peer, or behind a trusted
/// reverse proxy the last `X-Forwarded-For` entry (the one it added).
fn client_ip(app: &App, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<IpAddr> {
    if app.trust_forwarded_for {
        let forwarded = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|ip| ip.trim().parse().ok());
        if forwarded.is_some() {
            return forwarded;
        }
    }
    peer.map(|p| p.ip())
}

pub fn routes(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };

    let create = warp::path!("v1" / "registrations")
        .and(warp::post())
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and(warp::addr::remote())
        .and(api_body())
        .and_then(|app: Arc<App>, headers: HeaderMap, peer: Option<SocketAddr>, body: Vec<u8>| async move {
            let ip = client_ip(&app, peer, &headers);
            respond(registrations::create(app, headers, ip, body).await)
        });
    let confirm = warp::path!("v1" / "registrations" / String / "confirm")
        .and(warp::post())
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and(api_body())
        .and_then(|id, app, headers, body| async move { respond(registrations::confirm(app, id, headers, body).await) });
    let get = warp::path!("v1" / "registrations" / String)
        .and(warp::get())
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and_then(|id, app, headers| async move { respond(registrations::get(app, id, headers).await) });
    let patch = warp::path!("v1" / "registrations" / String)
        .and(warp::patch())
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and(api_body())
        .and_then(|id, app, headers, body| async move { respond(registrations::patch(app, id, headers, body).await) });
    let delete = warp::path!("v1" / "registrations" / String)
        .and(warp::delete())
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and_then(|id, app, headers| async move { respond(registrations::delete(app, id, headers).await) });
    let fetch = warp::path!("v1" / "registrations" / String / "messages" / String)
        .and(warp::get())
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and_then(|id, message_id, app, headers| async move {
            respond(registrations::fetch_message(app, id, message_id, headers).await)
        });
    let push = warp::path!("push" / String)
        .and(warp::post())
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and(body(crate::webpush::MAX_BODY))
        .and_then(|id, app: Arc<App>, headers, body| async move {
            let started = Instant::now();
            let metrics = app.metrics.clone();
            let response = respond(ingress::push(app, id, headers, body).await)?;
            let status = response.status();
            metrics.pushes.with_label_values(&[status.as_str()]).inc();
            metrics.push_seconds.with_label_values(&[status.as_str()]).observe(started.elapsed().as_secs_f64());
            Ok::<_, Infallible>(response)
        });

    let healthz = warp::path!("healthz").and(warp::get()).map(|| json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})));
    let readyz = warp::path!("readyz").and(warp::get()).and(with_app.clone()).and_then(|app: Arc<App>| async move {
        Ok::<_, Infallible>(match app.store.ping().await {
            Ok(()) => json_response(StatusCode::OK, &serde_json::json!({"status": "ready"})),
            Err(e) => ApiError::from(e).into_response(),
        })
    });
    let metrics = warp::path!("metrics").and(warp::get()).and(with_app).map(|app: Arc<App>| {
        warp::http::Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(app.metrics.render().into())
            .unwrap_or_default()
    });

    // Pushes first: they are nearly all the traffic, and each route before
    // them would be tried (and rejected) on every push.
    push.or(create)
        .unify()
        .or(confirm)
        .unify()
        .or(get)
        .unify()
        .or(patch)
        .unify()
        .or(delete)
        .unify()
        .or(fetch)
        .unify()
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .recover(rejection)
        .unify()
}

/// Requests no route took: unknown paths, wrong methods, oversize API bodies.
async fn rejection(rejection: Rejection) -> Result<Response, Infallible> {
    let error = if let Some(BadBody(e)) = rejection.find::<BadBody>() {
        match e {
            ingress::BodyError::TooLarge => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body over {MAX_API_BODY} bytes"),
            ),
            ingress::BodyError::Unreadable => ApiError::bad_request("unreadable_body", "the request body could not be read"),
        }
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this path")
    } else if rejection.is_not_found() {
        ApiError::not_found("no such endpoint")
    } else {
        ApiError::bad_request("bad_request", format!("{rejection:?}"))
    };
    Ok(error.into_response())
}
