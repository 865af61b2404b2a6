//! `push-relay-bench`: a load benchmark of push-relay on one machine.
//!
//! One run:
//! 1. measures the machine's ES256 ceiling (`openssl speed ecdsap256`, one core);
//! 2. starts a local Expo-like sink ([`sink`]) and the relay ([`relay`]) with a
//!    fresh store (SQLite file or a new PostgreSQL database), or targets a
//!    running relay (`--target-url`);
//! 3. optionally preloads many registrations (`--preload`), then creates the
//!    registrations the pushes go to (confirmed in one step);
//! 4. pre-builds every Web Push request ([`build`]) on all cores: fresh
//!    encryption keys, salt and VAPID JWT per message, Mastodon's headers;
//! 5. sends them at a fixed rate or as fast as possible over keep-alive
//!    connections ([`drive`]), waits for the sink to receive them, and
//!    checks that every `201` was delivered exactly once.
//!
//! [`run`] is the whole thing; `main.rs` only parses the command line,
//! prints the table and writes the JSON.

pub mod build;
pub mod ceiling;
pub mod drive;
pub mod relay;
pub mod report;
pub mod sink;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use serde_json::json;

pub use report::Report;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `allow_decrypt=false`: the relay forwards the encrypted body.
    Opaque,
    /// `allow_decrypt=true`: the relay decrypts and sends title/body.
    Decrypted,
    /// Half the registrations of each.
    Mixed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Aes128gcm,
    Aesgcm,
    /// Alternate between the two, message by message.
    Mixed,
}

/// `--rate`: pushes per second, or `max` (closed loop, as fast as the
/// connections go).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rate {
    Max,
    PerSecond(f64),
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Rate, String> {
        if s.eq_ignore_ascii_case("max") {
            return Ok(Rate::Max);
        }
        match s.parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::PerSecond(r)),
            _ => Err(format!("expected a positive number of pushes per second or `max`, got {s:?}")),
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::Max => write!(f, "max"),
            Rate::PerSecond(r) => write!(f, "{r}"),
        }
    }
}

/// The command line (also the library's input: build it with
/// `Options::parse_from([...])`).
#[derive(Clone, Debug, Parser)]
#[command(name = "push-relay-bench", version, about = "Load benchmark of push-relay (see BENCHMARKS.md)")]
pub struct Options {
    /// Store of the relay the bench starts. PostgreSQL: a fresh database is
    /// created on `--pg-admin-url`'s server for the run and dropped after.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub store: StoreKind,

    /// Use this store URL instead of a fresh one (e.g. a store filled by an
    /// earlier `--registrations-only` run); it is neither created nor dropped.
    #[arg(long)]
    pub store_url: Option<String>,

    /// PostgreSQL server for `--store postgres` (trust auth; any database
    /// the user may connect to, used to CREATE/DROP DATABASE).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub pg_admin_url: String,

    /// Keep the fresh PostgreSQL database / SQLite directory after the run.
    #[arg(long)]
    pub keep_store: bool,

    /// Benchmark a relay that is already running at this URL (its
    /// `[providers.expo] base_url` must point at `--sink-listen`). Without
    /// it, the bench starts the relay itself.
    #[arg(long)]
    pub target_url: Option<String>,

    /// Process id of the `--target-url` relay, to sample its RSS.
    #[arg(long)]
    pub relay_pid: Option<u32>,

    /// The `push-relay` binary (default: `$PUSH_RELAY_BIN`, else
    /// `push-relay` next to this executable, i.e. target/release/push-relay).
    #[arg(long)]
    pub relay_bin: Option<std::path::PathBuf>,

    /// Relay config template instead of the built-in one (see
    /// `--print-config`); placeholders @PORT@, @STORE_URL@, @SINK_URL@, @DIR@.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,

    /// Extra lines for the built-in config's `[queue]` table, e.g.
    /// "workers = 4" (repeatable).
    #[arg(long = "queue", value_name = "LINE")]
    pub queue_lines: Vec<String>,

    /// `[server] log_level` of the relay the bench starts.
    #[arg(long, default_value = "warn")]
    pub relay_log_level: String,

    /// Print the built-in relay config template and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Address of the provider sink (default: 127.0.0.1, a free port).
    #[arg(long)]
    pub sink_listen: Option<String>,

    /// Milliseconds the sink waits before answering each send request
    /// (real Expo takes ~100-300 ms; 0 measures the relay alone).
    #[arg(long, default_value_t = 0)]
    pub sink_delay_ms: u64,

    /// Registrations the pushes go to.
    #[arg(long, default_value_t = 1000)]
    pub registrations: usize,

    /// Registrations created first and never pushed to (store size for the
    /// RSS target), through the app API.
    #[arg(long, default_value_t = 0)]
    pub preload: usize,

    /// Only create this many registrations (as --preload) and stop: fills a
    /// store given with --store-url (or a --target-url relay) for later runs.
    #[arg(long, value_name = "N")]
    pub registrations_only: Option<usize>,

    /// Concurrent app-API requests while registering.
    #[arg(long, default_value_t = 64)]
    pub reg_concurrency: usize,

    /// Distinct instance domains the registrations are spread over.
    #[arg(long, default_value_t = 20)]
    pub instances: usize,

    /// opaque | decrypted | mixed.
    #[arg(long, value_enum, default_value = "opaque")]
    pub mode: Mode,

    /// aes128gcm | aesgcm | mixed.
    #[arg(long, value_enum, default_value = "aes128gcm")]
    pub encoding: Encoding,

    /// Pushes to send (all pre-built before the timed phase).
    #[arg(long, default_value_t = 20_000)]
    pub pushes: usize,

    /// Pushes per second, or `max`.
    #[arg(long, default_value = "max")]
    pub rate: Rate,

    /// Keep-alive HTTP/1.1 connections to the relay.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,

    /// Seconds to wait, after the last push, for the sink to receive every
    /// accepted message.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout: u64,

    /// Milliseconds to keep listening after everything arrived, to catch
    /// late duplicates.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,

    /// Per-request timeout of a push, in seconds.
    #[arg(long, default_value_t = 30)]
    pub request_timeout: u64,

    /// `Ttl` header of the pushes (Mastodon: 48 h).
    #[arg(long, default_value_t = 172_800)]
    pub ttl: u64,

    /// Skip the `openssl speed ecdsap256` ceiling measurement.
    #[arg(long)]
    pub skip_ceiling: bool,

    /// Seconds of `openssl speed` (per operation: sign then verify).
    #[arg(long, default_value_t = 3)]
    pub ceiling_seconds: u32,

    /// Write every number as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,

    /// Free-form label stored in the report (e.g. "opaque-sqlite-max").
    #[arg(long)]
    pub label: Option<String>,

    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// One registration the bench pushes to.
#[derive(Clone, Debug)]
pub struct BenchRegistration {
    pub endpoint: String,
    pub p256dh: Vec<u8>,
    pub auth: Vec<u8>,
    pub decrypted: bool,
}

fn progress(opts: &Options, msg: impl AsRef<str>) {
    if !opts.quiet {
        eprintln!("[bench] {}", msg.as_ref());
    }
}

/// Run the benchmark described by `opts`. The error path is for setup
/// failures (relay does not start, registrations refused...); lost or
/// duplicated messages are in the report (`report.ok()` is false).
pub async fn run(opts: Options) -> Result<Report> {
    let mut report = Report::new(&opts);
    report.machine = report::Machine::detect();

    if opts.registrations_only.is_some() && opts.target_url.is_none() && opts.store_url.is_none() && !opts.keep_store {
        bail!("--registrations-only without --target-url, --store-url or --keep-store would fill a store that is deleted at the end");
    }

    // 1. The ceiling, first, while nothing else of ours runs.
    if !opts.skip_ceiling && opts.registrations_only.is_none() {
        progress(&opts, format!("measuring ES256 verify/s with openssl speed ({} s per op)...", opts.ceiling_seconds));
        match ceiling::openssl_speed(opts.ceiling_seconds) {
            Ok(c) => report.ceiling = Some(c),
            Err(e) => progress(&opts, format!("ceiling not measured: {e:#}")),
        }
    }

    // 2. Sink and relay.
    let sink = sink::Sink::start(opts.sink_listen.as_deref(), Duration::from_millis(opts.sink_delay_ms)).await?;
    progress(&opts, format!("sink listening on {}", sink.url()));
    let mut relay_proc = None;
    let mut pg_db: Option<relay::PgDatabase> = None;
    let (base_url, pid) = match &opts.target_url {
        Some(url) => (url.trim_end_matches('/').to_string(), opts.relay_pid),
        None => {
            let store_url = match (&opts.store_url, opts.store) {
                (Some(u), _) => Some(u.clone()),
                (None, StoreKind::Postgres) => {
                    let db = relay::PgDatabase::create(&opts.pg_admin_url).await?;
                    progress(&opts, format!("fresh PostgreSQL database {}", db.name));
                    let url = db.url.clone();
                    pg_db = Some(db);
                    Some(url)
                }
                (None, StoreKind::Sqlite) => None,
            };
            let template = match &opts.config {
                Some(p) => std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?,
                None => relay::default_config_template(&opts.queue_lines, &opts.relay_log_level),
            };
            let bin = relay::relay_bin(opts.relay_bin.as_deref())?;
            progress(&opts, format!("starting {}", bin.display()));
            let r = relay::RelayProcess::start(&bin, &template, store_url.as_deref(), &sink.url(), opts.keep_store).await?;
            let url = r.base_url();
            let pid = r.pid();
            report.store_url = r.store_url.clone();
            relay_proc = Some(r);
            (url, Some(pid))
        }
    };
    report.relay_url = base_url.clone();
    let rss = pid.map(relay::RssSampler::start);

    let result = run_phases(&opts, &mut report, &base_url, &sink, rss.as_ref()).await;

    if let Some(s) = &rss {
        let (hwm, max_rss) = s.stop().await;
        report.relay_peak_rss_kb = hwm;
        report.relay_max_sampled_rss_kb = max_rss;
    }
    if let Some(mut r) = relay_proc.take() {
        if result.is_err() {
            eprintln!("--- relay log tail ---\n{}", r.log_tail(30));
        }
        r.stop().await;
        if opts.keep_store {
            progress(&opts, format!("kept relay directory {}", r.dir().display()));
        }
    }
    if let Some(db) = pg_db {
        if opts.keep_store {
            progress(&opts, format!("kept database {}", db.url));
        } else {
            db.drop_db().await;
        }
    }
    result?;
    Ok(report)
}

async fn run_phases(
    opts: &Options,
    report: &mut Report,
    base_url: &str,
    sink: &sink::Sink,
    rss: Option<&relay::RssSampler>,
) -> Result<()> {
    let vapid = push_relay_e2e::Vapid::generate();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.reg_concurrency.max(1))
        .timeout(Duration::from_secs(60))
        .build()?;

    // 3a. Preload: registrations nobody pushes to.
    let preload = opts.registrations_only.unwrap_or(opts.preload);
    if preload > 0 {
        progress(opts, format!("preloading {preload} registrations ({} concurrent)...", opts.reg_concurrency));
        let t = Instant::now();
        let made = register_many(opts, &http, base_url, &vapid, preload, true).await?;
        let secs = t.elapsed().as_secs_f64();
        report.preload = Some(report::PhaseRate { count: made.len().max(preload), seconds: secs, per_second: preload as f64 / secs });
        progress(opts, format!("preloaded {preload} in {secs:.1} s ({:.0}/s)", preload as f64 / secs));
        if let Some(s) = rss {
            report.relay_rss_after_preload_kb = s.current().0;
        }
    }
    if opts.registrations_only.is_some() {
        return Ok(());
    }

    // 3b. The registrations pushed to.
    progress(opts, format!("creating {} registrations ({:?})...", opts.registrations, opts.mode));
    let t = Instant::now();
    let regs = register_many(opts, &http, base_url, &vapid, opts.registrations, false).await?;
    let secs = t.elapsed().as_secs_f64();
    report.registration = Some(report::PhaseRate { count: regs.len(), seconds: secs, per_second: regs.len() as f64 / secs });
    if regs.is_empty() {
        bail!("no registrations to push to");
    }

    // 4. Pre-build.
    progress(opts, format!("pre-building {} pushes on {} threads...", opts.pushes, rayon::current_num_threads()));
    let t = Instant::now();
    let set = build::build_all(opts, &regs, &vapid, base_url)?;
    let secs = t.elapsed().as_secs_f64();
    report.prebuild_seconds = secs;
    report.payload_bytes_avg = set.payload_bytes_avg;
    report.body_bytes_avg = set.body_bytes_avg;
    progress(opts, format!("pre-built in {secs:.1} s (payload {:.0} B, body {:.0} B on average)", set.payload_bytes_avg, set.body_bytes_avg));
    let set = Arc::new(set);
    sink.reset();

    // 5. Drive.
    if let Some(s) = rss {
        s.reset_load_max();
    }
    let relay_pid = rss.map(|r| r.pid());
    let cpu0 = (relay_pid.and_then(relay::cpu_seconds), relay::cpu_seconds(0));
    let outcome = drive::drive(opts, base_url, set.clone(), sink).await?;

    // 6. Drain.
    let accepted = outcome.accepted();
    progress(opts, format!("sent {}; {} accepted; waiting up to {} s for delivery...", set.messages.len(), accepted, opts.drain_timeout));
    let deadline = Instant::now() + Duration::from_secs(opts.drain_timeout);
    loop {
        let got = sink.distinct();
        if got >= accepted || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu1 = (relay_pid.and_then(relay::cpu_seconds), relay::cpu_seconds(0));
    if let (Some(a), Some(b)) = (cpu0.0, cpu1.0) {
        report.relay_cpu_seconds = Some(b - a);
    }
    if let (Some(a), Some(b)) = (cpu0.1, cpu1.1) {
        report.bench_cpu_seconds = Some(b - a);
    }
    tokio::time::sleep(Duration::from_millis(opts.settle_ms)).await;
    if let Some(s) = rss {
        report.relay_max_rss_under_load_kb = s.load_max();
    }
    report.fill_from(&outcome, &set, sink);
    if let Ok(r) = http.get(format!("{base_url}/metrics")).send().await {
        if let Ok(text) = r.text().await {
            report.relay_metrics = report::pick_metrics(&text);
        }
    }
    if let Some(cpu) = report.relay_cpu_seconds.filter(|c| *c > 0.0) {
        report.pushes_per_relay_cpu_second = Some(report.delivered as f64 / cpu);
    }
    if let Some(c) = &report.ceiling {
        if report.accepted_per_second > 0.0 {
            report.ratio = Some(report.accepted_per_second / (c.verify_per_second * report.machine.cores as f64));
        }
    }
    Ok(())
}

/// Create `n` registrations through `POST /v1/registrations`, confirmed in
/// one step with `server_key`. `discard` keeps nothing (preload).
async fn register_many(
    opts: &Options,
    http: &reqwest::Client,
    base_url: &str,
    vapid: &push_relay_e2e::Vapid,
    n: usize,
    discard: bool,
) -> Result<Vec<BenchRegistration>> {
    let server_key = vapid.public_key_b64();
    let url = format!("{base_url}/v1/registrations");
    let run_tag: u32 = rand::random();
    let instances = opts.instances.max(1);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let last_print = std::sync::Mutex::new(Instant::now());
    let results: Vec<Result<Option<BenchRegistration>>> = futures::stream::iter(0..n)
        .map(|i| {
            let decrypted = match opts.mode {
                Mode::Opaque => false,
                Mode::Decrypted => true,
                Mode::Mixed => i % 2 == 1,
            } && !discard;
            let body = json!({
                "provider": "expo",
                "token": format!("ExponentPushToken[bench{}{run_tag:08x}x{i:08}]", if discard { "p" } else { "r" }),
                "instance": format!("bench{}.example.social", i % instances),
                "account": format!("@user{i}@bench{}.example.social", i % instances),
                "server_key": server_key,
                "allow_decrypt": decrypted,
            });
            let req = http.post(&url).json(&body);
            let done = &done;
            let last_print = &last_print;
            async move {
                let mut attempt = 0;
                let resp = loop {
                    attempt += 1;
                    match req.try_clone().unwrap().send().await {
                        Ok(r) if r.status().as_u16() == 201 => break r,
                        Ok(r) if (r.status().as_u16() == 429 || r.status().as_u16() == 503) && attempt < 20 => {
                            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                        }
                        Ok(r) => {
                            let st = r.status();
                            bail!("POST /v1/registrations answered {st}: {}", r.text().await.unwrap_or_default())
                        }
                        Err(e) if attempt < 5 => {
                            let _ = e;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(anyhow::Error::new(e).context("POST /v1/registrations")),
                    }
                };
                let c = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if !opts.quiet && c & 1023 == 0 {
                    let mut lp = last_print.lock().unwrap();
                    if lp.elapsed() >= Duration::from_secs(5) {
                        *lp = Instant::now();
                        eprintln!("[bench]   {c}/{n} registrations");
                    }
                }
                if discard {
                    drop(resp);
                    return Ok(None);
                }
                let v: serde_json::Value = resp.json().await.context("registration answer is not JSON")?;
                let reg = push_relay_e2e::Registration::from_json(&v);
                if !reg.confirmed {
                    bail!("registration was not confirmed in one step: {v}");
                }
                Ok(Some(BenchRegistration { endpoint: reg.endpoint, p256dh: reg.p256dh, auth: reg.auth, decrypted }))
            }
        })
        .buffer_unordered(opts.reg_concurrency.max(1))
        .collect()
        .await;
    let mut out = Vec::with_capacity(if discard { 0 } else { n });
    for r in results {
        if let Some(reg) = r? {
            out.push(reg);
        }
    }
    Ok(out)
}
