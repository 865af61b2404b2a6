//! The timed phase: sending the pre-built pushes over `--connections`
//! keep-alive HTTP/1.1 connections (one hyper client connection each, one
//! request in flight per connection).
//!
//! * `--rate max`: closed loop, each connection sends its next push as soon
//!   as the previous one is answered.
//! * `--rate N`: open loop, push `i` is due at `start + i/N`; a connection
//!   takes the next push, waits for its due time and sends it. The 201
//!   latency is recorded both from the actual send (`latency_201`) and from
//!   the due time (`latency_201_from_schedule`, which includes any time the
//!   push waited for a free connection: no coordinated omission).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::build::MessageSet;
use crate::sink::{now_ns, Sink};
use crate::{Options, Rate};

/// What happened to each push.
pub struct Outcome {
    /// Per push: when it was sent (ns on the sink's time base), 0 = never.
    pub sent_ns: Vec<AtomicU64>,
    /// Per push: the HTTP status, 0 = no answer (connection error, timeout).
    pub status: Vec<AtomicU16>,
    /// Microseconds, send → 201.
    pub latency_201: Histogram<u64>,
    /// Microseconds, due time → 201 (fixed rate only).
    pub latency_201_sched: Option<Histogram<u64>>,
    /// Non-HTTP failures by kind.
    pub failures: BTreeMap<String, u64>,
    pub start_ns: u64,
    /// When the last answer came.
    pub end_ns: u64,
    /// Largest lag of a send behind its due time (fixed rate), µs.
    pub max_schedule_lag_us: u64,
}

impl Outcome {
    pub fn accepted(&self) -> usize {
        self.status.iter().filter(|s| s.load(Ordering::Relaxed) == 201).count()
    }

    pub fn by_status(&self) -> BTreeMap<u16, u64> {
        let mut m = BTreeMap::new();
        for s in &self.status {
            *m.entry(s.load(Ordering::Relaxed)).or_insert(0) += 1;
        }
        m
    }
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

struct Worker {
    lat: Histogram<u64>,
    lat_sched: Histogram<u64>,
    failures: BTreeMap<String, u64>,
    max_lag_us: u64,
    last_ns: u64,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: &str) -> Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

pub async fn drive(opts: &Options, base_url: &str, set: Arc<MessageSet>, sink: &Sink) -> Result<Outcome> {
    let n = set.messages.len();
    let addr = {
        let u = url::Url::parse(base_url)?;
        format!("{}:{}", u.host_str().unwrap_or("127.0.0.1"), u.port_or_known_default().unwrap_or(80))
    };
    let sent_ns: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let status: Arc<Vec<AtomicU16>> = Arc::new((0..n).map(|_| AtomicU16::new(0)).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let timeout = Duration::from_secs(opts.request_timeout.max(1));
    let rate = opts.rate;

    // Open the connections before the clock starts.
    let mut senders = Vec::with_capacity(opts.connections);
    for _ in 0..opts.connections.max(1) {
        senders.push(connect(&addr).await?);
    }

    let start_ns = now_ns();
    let mut tasks = Vec::new();
    for mut sender in senders {
        let (set, sent_ns, status, next, done, accepted, addr) =
            (set.clone(), sent_ns.clone(), status.clone(), next.clone(), done.clone(), accepted.clone(), addr.clone());
        tasks.push(tokio::spawn(async move {
            let mut w = Worker { lat: histogram(), lat_sched: histogram(), failures: BTreeMap::new(), max_lag_us: 0, last_ns: 0 };
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= set.messages.len() {
                    break;
                }
                let due_ns = match rate {
                    Rate::Max => None,
                    Rate::PerSecond(r) => Some(start_ns + (i as f64 * 1e9 / r) as u64),
                };
                if let Some(due) = due_ns {
                    let now = now_ns();
                    if due > now {
                        tokio::time::sleep(Duration::from_nanos(due - now)).await;
                    }
                }
                // A connection the relay closed (or that failed) is reopened.
                if sender.ready().await.is_err() {
                    match connect(&addr).await {
                        Ok(s) => sender = s,
                        Err(_) => {
                            *w.failures.entry("connect".into()).or_insert(0) += 1;
                            done.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
                let m = &set.messages[i];
                let mut req = hyper::Request::post(m.path.as_str()).body(Full::new(m.body.clone())).unwrap();
                *req.headers_mut() = m.headers.clone();
                let t0 = now_ns();
                if let Some(due) = due_ns {
                    w.max_lag_us = w.max_lag_us.max(t0.saturating_sub(due) / 1000);
                }
                sent_ns[i].store(t0, Ordering::Relaxed);
                let res = tokio::time::timeout(timeout, async {
                    let resp = sender.send_request(req).await?;
                    let st = resp.status().as_u16();
                    resp.into_body().collect().await?;
                    Ok::<u16, hyper::Error>(st)
                })
                .await;
                let t1 = now_ns();
                w.last_ns = w.last_ns.max(t1);
                match res {
                    Ok(Ok(st)) => {
                        status[i].store(st, Ordering::Relaxed);
                        if st == 201 {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            let _ = w.lat.record(((t1 - t0) / 1000).max(1));
                            if let Some(due) = due_ns {
                                let _ = w.lat_sched.record(((t1 - due.min(t0)) / 1000).max(1));
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        let kind = if e.is_canceled() || e.is_closed() { "connection closed" } else { "http error" };
                        *w.failures.entry(kind.into()).or_insert(0) += 1;
                    }
                    Err(_) => {
                        *w.failures.entry("timeout".into()).or_insert(0) += 1;
                        // The connection still has the request in flight: replace it.
                        if let Ok(s) = connect(&addr).await {
                            sender = s;
                        }
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            w
        }));
    }

    // Progress, once a second.
    let quiet = opts.quiet;
    let progress = {
        let (done, accepted) = (done.clone(), accepted.clone());
        let sink_distinct = sink_counter(sink);
        tokio::spawn(async move {
            let mut last = (0usize, 0usize);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let d = done.load(Ordering::Relaxed);
                let a = accepted.load(Ordering::Relaxed);
                let s = sink_distinct();
                if !quiet {
                    eprintln!(
                        "[bench]   {:>6.1} s: sent {d}/{n} ({}/s), 201 {a}, delivered {s} ({}/s)",
                        (now_ns() - start_ns) as f64 / 1e9,
                        d - last.0,
                        s.saturating_sub(last.1)
                    );
                }
                last = (d, s);
            }
        })
    };

    let mut out = Outcome {
        sent_ns: Vec::new(),
        status: Vec::new(),
        latency_201: histogram(),
        latency_201_sched: matches!(rate, Rate::PerSecond(_)).then(histogram),
        failures: BTreeMap::new(),
        start_ns,
        end_ns: start_ns,
        max_schedule_lag_us: 0,
    };
    for t in tasks {
        let w = t.await.context("worker task")?;
        out.latency_201.add(&w.lat).ok();
        if let Some(h) = out.latency_201_sched.as_mut() {
            h.add(&w.lat_sched).ok();
        }
        for (k, v) in w.failures {
            *out.failures.entry(k).or_insert(0) += v;
        }
        out.max_schedule_lag_us = out.max_schedule_lag_us.max(w.max_lag_us);
        out.end_ns = out.end_ns.max(w.last_ns);
    }
    progress.abort();
    out.sent_ns = Arc::try_unwrap(sent_ns).map_err(|_| anyhow::anyhow!("sent_ns still shared"))?;
    out.status = Arc::try_unwrap(status).map_err(|_| anyhow::anyhow!("status still shared"))?;
    Ok(out)
}

/// A `'static` reader of the sink's distinct-message counter.
fn sink_counter(sink: &Sink) -> impl Fn() -> usize + Send + 'static {
    let c = sink.distinct_counter();
    move || c.load(Ordering::Relaxed)
}
