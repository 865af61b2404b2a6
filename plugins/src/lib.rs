//! push-relay's WebAssembly filter plugins (SPEC §6): the host side.
//!
//! A plugin is a component of the `push-relay:filter@0.1.0` world
//! (`plugins/wit/filter.wit`). The [`PluginHost`] loads the configured
//! plugins at start, calls them for each notification of a matching
//! instance ([`PluginHost::filter`]) and reloads them when their file
//! changes ([`PluginHost::reload`]).
//!
//! Sandbox, per call: a fuel budget (instructions), an epoch deadline (wall
//! clock, checked every millisecond by a ticker thread) and a linear-memory
//! cap per store. Components are compiled once per content hash and
//! instantiated from an `InstancePre` into a pooling allocator. Warm
//! instances (already `configure`d) are reused call after call and thrown
//! away after any failure. Imports are limited to `push-relay:filter/host`
//! (bounded `log`, per-instance `count`): a component importing anything
//! else, WASI included, is refused at load.
//!
//! Calls run on a dedicated thread pool, never on the async runtime's
//! workers. A failure (trap, fuel, deadline, memory, garbage answer) applies
//! the plugin's `on_error` policy; five failures in a row open a circuit
//! breaker that skips the plugin (with `on_error`) for a backoff period that
//! doubles at each new trip.

mod breaker;
mod counters;
pub mod cli;
pub mod guest;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits, StoreLimitsBuilder, Trap};

pub use breaker::BreakerPolicy;
pub use push_relay_config::{OnError, Plugin as PluginConfig, PluginInstances, PluginLimits};

use counters::Counters;

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "push-relay:filter/filter@0.1.0",
    });
}

use bindings::push_relay::filter::host::Level;
use bindings::push_relay::filter::types as wit;

/// The WIT world plugins must implement.
pub const WORLD: &str = "push-relay:filter/filter@0.1.0";
/// The only interfaces a plugin may import.
pub const ALLOWED_IMPORTS: &[&str] = &["push-relay:filter/host@0.1.0", "push-relay:filter/types@0.1.0"];

/// Bounds of what a plugin may say.
const MAX_LOGS_PER_CALL: usize = 32;
const MAX_LOG_BYTES: usize = 1024;
const MAX_REASON_BYTES: usize = 256;
const MAX_TAGS: usize = 8;
const MAX_TAG_BYTES: usize = 64;
/// Epoch ticker period.
const TICK: Duration = Duration::from_millis(1);

/// The Web Push urgency, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Urgency {
    VeryLow,
    Low,
    Normal,
    High,
}

/// What a plugin is told about one notification (also the JSON input of
/// `push-relay plugin test`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    pub instance: String,
    #[serde(default)]
    pub registration: String,
    #[serde(default)]
    pub provider: String,
    #[serde(default = "normal")]
    pub urgency: Urgency,
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default)]
    pub ttl: u32,
    #[serde(default)]
    pub body_size: u32,
    /// The decrypted fields; handed only to plugins with `see_payload`.
    #[serde(default)]
    pub payload: Option<Payload>,
}

fn normal() -> Urgency {
    Urgency::Normal
}

/// Decrypted fields of a notification (never the access token).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    pub title: String,
    pub body: String,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub notification_type: String,
}

/// One plugin's answer, validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    Deliver,
    Drop { reason: String },
    DeliverWithChanges { urgency: Option<Urgency>, ttl: Option<u32>, tags: Vec<String> },
}

impl Verdict {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Deliver => "deliver",
            Verdict::Drop { .. } => "drop",
            Verdict::DeliverWithChanges { .. } => "deliver_with_changes",
        }
    }
}

/// Why a call failed (the `kind` label of the failure metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Ran out of fuel.
    Fuel,
    /// Passed its wall-clock deadline (epoch).
    Timeout,
    /// Tried to grow its memory past the cap.
    Memory,
    /// Any other trap (unreachable, panic, out-of-bounds...).
    Trap,
    /// Answered something the host refuses (bad UTF-8, too many tags...).
    InvalidOutput,
    /// Could not be instantiated or configured for this call.
    Instantiate,
    /// Skipped: its circuit breaker is open.
    CircuitOpen,
    /// No plugin thread picked the call up in time.
    Overloaded,
}

impl FailureKind {
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Fuel => "fuel",
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::Trap => "trap",
            FailureKind::InvalidOutput => "invalid_output",
            FailureKind::Instantiate => "instantiate",
            FailureKind::CircuitOpen => "circuit_open",
            FailureKind::Overloaded => "overloaded",
        }
    }
}

/// A failed call.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// The result of one call, with what `plugin test` prints.
#[derive(Debug, Clone)]
pub struct CallReport {
    pub result: Result<Verdict, Failure>,
    pub fuel_used: u64,
    pub elapsed: Duration,
    pub logs: Vec<(String, String)>,
}

/// What the gateway does with a notification after every plugin ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// `Some((plugin, reason))`: drop it (the first drop wins).
    pub dropped: Option<(String, String)>,
    /// A lower urgency asked for (the lowest asked).
    pub urgency: Option<Urgency>,
    /// A shorter TTL asked for (the shortest asked).
    pub ttl: Option<u32>,
    pub tags: Vec<String>,
}

/// Where verdicts and failures are counted (the gateway's Prometheus metrics).
pub trait Observer: Send + Sync {
    fn verdict(&self, plugin: &str, verdict: &str);
    fn failure(&self, plugin: &str, kind: &str);
}

/// An [`Observer`] that counts nothing.
pub struct NoObserver;

impl Observer for NoObserver {
    fn verdict(&self, _: &str, _: &str) {}
    fn failure(&self, _: &str, _: &str) {}
}

/// Per-store state: the memory limiter, the current call's logs and the
/// shared counters.
struct State {
    limits: StoreLimits,
    plugin: Arc<str>,
    instance: String,
    logs: Vec<(String, String)>,
    dropped_logs: usize,
    counters: Arc<Counters>,
}

impl bindings::push_relay::filter::types::Host for State {}

impl bindings::push_relay::filter::host::Host for State {
    fn log(&mut self, level: Level, message: String) {
        if self.logs.len() >= MAX_LOGS_PER_CALL {
            self.dropped_logs += 1;
            return;
        }
        let mut message = message;
        if message.len() > MAX_LOG_BYTES {
            let mut cut = MAX_LOG_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let level = match level {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        self.logs.push((level.to_owned(), message));
    }

    fn count(&mut self, key: String, window_seconds: u32) -> u64 {
        self.counters.count(&self.instance, &key, window_seconds)
    }
}

/// A configured instance, ready for calls.
struct Warm {
    store: Store<State>,
    filter: bindings::Filter,
}

/// One loaded version of a plugin's file.
struct Version {
    hash: [u8; 32],
    info: (String, String),
    pre: bindings::FilterPre<State>,
    idle: Mutex<Vec<Warm>>,
}

/// The file state last seen by the reloader.
#[derive(Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

struct Slot {
    config: PluginConfig,
    name: Arc<str>,
    current: RwLock<Arc<Version>>,
    breaker: Mutex<breaker::Breaker>,
    counters: Arc<Counters>,
    stamp: Mutex<Option<FileStamp>>,
    /// Hash of the last content that failed to load (not retried until it changes).
    failed: Mutex<Option<[u8; 32]>>,
}

impl Slot {
    fn version(&self) -> Arc<Version> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Options of a [`PluginHost`] beyond the configuration file.
#[derive(Clone)]
pub struct HostOptions {
    pub breaker: BreakerPolicy,
    pub observer: Arc<dyn Observer>,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions { breaker: BreakerPolicy::default(), observer: Arc::new(NoObserver) }
    }
}

type Job = Box<dyn FnOnce() + Send>;

struct Shared {
    engine: Engine,
    linker: Linker<State>,
    limits: PluginLimits,
    cache: Mutex<HashMap<[u8; 32], Component>>,
    compiles: AtomicU64,
    options: HostOptions,
    stop: AtomicBool,
}

/// The plugins of one gateway.
pub struct PluginHost {
    shared: Arc<Shared>,
    slots: Vec<Arc<Slot>>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl PluginHost {
    /// Loads, checks and configures every plugin of `plugins`, with the
    /// engine sized by `limits`. Any plugin that cannot be loaded refuses the
    /// whole host (the gateway then does not start).
    pub fn new(plugins: &[PluginConfig], limits: &PluginLimits, options: HostOptions) -> anyhow::Result<PluginHost> {
        let shared = Arc::new(Shared::new(limits, options, plugins.len())?);
        let mut slots = Vec::new();
        for config in plugins {
            let bytes = std::fs::read(&config.path)
                .with_context(|| format!("plugin `{}`: cannot read {}", config.name, config.path.display()))?;
            let stamp = stamp_of(&config.path);
            let version = shared
                .load(config, &bytes)
                .with_context(|| format!("plugin `{}` ({})", config.name, config.path.display()))?;
            tracing::info!(
                plugin = %config.name,
                path = %config.path.display(),
                reports = %format!("{} {}", version.info.0, version.info.1),
                "plugin loaded"
            );
            slots.push(Arc::new(Slot {
                name: Arc::from(config.name.as_str()),
                config: config.clone(),
                current: RwLock::new(Arc::new(version)),
                breaker: Mutex::new(breaker::Breaker::new(shared.options.breaker.clone())),
                counters: Arc::new(Counters::new()),
                stamp: Mutex::new(stamp),
                failed: Mutex::new(None),
            }));
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        let count = if plugins.is_empty() { 0 } else { limits.threads.max(1) };
        for i in 0..count {
            let rx = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("plugin-{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    })
                    .context("cannot start a plugin thread")?,
            );
        }
        Ok(PluginHost { shared, slots, jobs: Mutex::new(Some(tx)), threads })
    }

    /// Whether no plugin is configured.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether any plugin applies to notifications from `instance`.
    pub fn applies_to(&self, instance: &str) -> bool {
        self.slots.iter().any(|s| s.config.instances.matches(instance))
    }

    /// The names of the configured plugins, in order.
    pub fn names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.config.name.clone()).collect()
    }

    /// How many components were compiled so far (cache misses).
    pub fn compiles(&self) -> u64 {
        self.shared.compiles.load(Ordering::Relaxed)
    }

    /// `(name, version)` as reported by the loaded version of plugin `name`.
    pub fn info(&self, name: &str) -> Option<(String, String)> {
        self.slots.iter().find(|s| s.config.name == name).map(|s| s.version().info.clone())
    }

    /// Runs every plugin configured for `input.instance`, in order, until
    /// one drops the notification. `payload` is removed from what plugins
    /// without `see_payload` get. Calls run on the plugin threads.
    pub async fn filter(&self, input: &Input) -> Decision {
        let slots: Vec<Arc<Slot>> =
            self.slots.iter().filter(|s| s.config.instances.matches(&input.instance)).cloned().collect();
        if slots.is_empty() {
            return Decision::default();
        }
        // One hop to a plugin thread per push, however many plugins run:
        // handing a call to a thread and back costs more than a call on a
        // warm instance, so the whole chain runs there in one job.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = self.shared.clone();
        let job_slots = slots.clone();
        let job_input = input.clone();
        let job: Job = Box::new(move || {
            if tx.is_closed() {
                return; // the caller gave up waiting
            }
            let mut decision = Decision::default();
            for slot in &job_slots {
                let report = if slot.config.see_payload {
                    guarded_call(&shared, slot, &job_input)
                } else {
                    guarded_call(&shared, slot, &Input { payload: None, ..job_input.clone() })
                };
                if apply(slot, &report, &mut decision, &*shared.options.observer) {
                    break;
                }
            }
            let _ = tx.send(decision);
        });
        let sent = match self.jobs.lock() {
            Ok(jobs) => jobs.as_ref().is_some_and(|j| j.send(job).is_ok()),
            Err(_) => false,
        };
        if !sent {
            return self.overloaded(&slots, "the plugin threads are stopped");
        }
        let wait = slots
            .iter()
            .map(|s| Duration::from_millis(s.config.timeout_ms.saturating_mul(4).max(250)))
            .sum();
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(decision)) => decision,
            Ok(Err(_)) => self.overloaded(&slots, "the plugin thread dropped the call"),
            Err(_) => self.overloaded(&slots, "no plugin thread was free in time"),
        }
    }

    /// When the chain could not run: every plugin's `on_error` applies.
    fn overloaded(&self, slots: &[Arc<Slot>], message: &str) -> Decision {
        let mut decision = Decision::default();
        for slot in slots {
            let report = CallReport {
                result: Err(Failure { kind: FailureKind::Overloaded, message: message.to_owned() }),
                fuel_used: 0,
                elapsed: Duration::ZERO,
                logs: Vec::new(),
            };
            if apply(slot, &report, &mut decision, &*self.shared.options.observer) {
                break;
            }
        }
        decision
    }

    /// One call of plugin `name`, on the calling thread (for tests and the CLI).
    pub fn call_blocking(&self, name: &str, input: &Input) -> anyhow::Result<CallReport> {
        let slot = self.slots.iter().find(|s| s.config.name == name).ok_or_else(|| anyhow!("no plugin named `{name}`"))?;
        let mut seen = input.clone();
        if !slot.config.see_payload {
            seen.payload = None;
        }
        let report = guarded_call(&self.shared, slot, &seen);
        let mut decision = Decision::default();
        apply(slot, &report, &mut decision, &*self.shared.options.observer);
        Ok(report)
    }

    /// Reloads every plugin whose file content changed since it was loaded
    /// (`force`: look at the content even when size and mtime are the same,
    /// as on `SIGHUP`). A version that fails to load or configure leaves the
    /// running one in place. Returns the names of the plugins reloaded.
    pub fn reload(&self, force: bool) -> Vec<String> {
        let mut reloaded = Vec::new();
        for slot in &self.slots {
            match self.reload_slot(slot, force) {
                Ok(true) => reloaded.push(slot.config.name.clone()),
                Ok(false) => {}
                Err(e) => {
                    self.shared.options.observer.failure(&slot.name, "reload");
                    tracing::error!(plugin = %slot.name, "plugin reload failed, the previous version keeps running: {e:#}");
                }
            }
        }
        reloaded
    }

    fn reload_slot(&self, slot: &Slot, force: bool) -> anyhow::Result<bool> {
        let stamp = stamp_of(&slot.config.path);
        {
            let mut last = slot.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if !force && *last == stamp {
                return Ok(false);
            }
            *last = stamp;
        }
        let bytes = std::fs::read(&slot.config.path).with_context(|| format!("cannot read {}", slot.config.path.display()))?;
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if slot.version().hash == hash {
            return Ok(false);
        }
        {
            let failed = slot.failed.lock().unwrap_or_else(|e| e.into_inner());
            if !force && *failed == Some(hash) {
                return Ok(false);
            }
        }
        match self.shared.load(&slot.config, &bytes) {
            Ok(version) => {
                tracing::info!(
                    plugin = %slot.name,
                    reports = %format!("{} {}", version.info.0, version.info.1),
                    "plugin reloaded"
                );
                *slot.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(version);
                slot.breaker.lock().unwrap_or_else(|e| e.into_inner()).reset();
                *slot.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Ok(true)
            }
            Err(e) => {
                *slot.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(hash);
                Err(e)
            }
        }
    }
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn stamp_of(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp { modified: m.modified().ok(), len: m.len() })
}

/// Records a call's outcome in `decision`; true when the notification is dropped.
fn apply(slot: &Slot, report: &CallReport, decision: &mut Decision, observer: &dyn Observer) -> bool {
    for (level, line) in &report.logs {
        match level.as_str() {
            "error" => tracing::error!(plugin = %slot.name, "{line}"),
            "warn" => tracing::warn!(plugin = %slot.name, "{line}"),
            "info" => tracing::info!(plugin = %slot.name, "{line}"),
            _ => tracing::debug!(plugin = %slot.name, "{line}"),
        }
    }
    match &report.result {
        Ok(verdict) => {
            observer.verdict(&slot.name, verdict.label());
            match verdict {
                Verdict::Deliver => false,
                Verdict::Drop { reason } => {
                    tracing::debug!(plugin = %slot.name, reason = %reason, "plugin dropped a notification");
                    decision.dropped = Some((slot.config.name.clone(), reason.clone()));
                    true
                }
                Verdict::DeliverWithChanges { urgency, ttl, tags } => {
                    if let Some(u) = urgency {
                        decision.urgency = Some(decision.urgency.map_or(*u, |d| d.min(*u)));
                    }
                    if let Some(t) = ttl {
                        decision.ttl = Some(decision.ttl.map_or(*t, |d| d.min(*t)));
                    }
                    decision.tags.extend(tags.iter().cloned());
                    false
                }
            }
        }
        Err(failure) => {
            observer.failure(&slot.name, failure.kind.label());
            if failure.kind != FailureKind::CircuitOpen {
                tracing::warn!(plugin = %slot.name, kind = failure.kind.label(), "plugin call failed, applying on_error: {}", failure.message);
            }
            match slot.config.on_error {
                OnError::Deliver => {
                    observer.verdict(&slot.name, "on_error_deliver");
                    false
                }
                OnError::Drop => {
                    observer.verdict(&slot.name, "on_error_drop");
                    decision.dropped = Some((slot.config.name.clone(), format!("plugin failed ({})", failure.kind.label())));
                    true
                }
            }
        }
    }
}

/// A call through the circuit breaker.
fn guarded_call(shared: &Shared, slot: &Slot, input: &Input) -> CallReport {
    if !slot.breaker.lock().unwrap_or_else(|e| e.into_inner()).allow(Instant::now()) {
        return CallReport {
            result: Err(Failure { kind: FailureKind::CircuitOpen, message: "circuit breaker open".into() }),
            fuel_used: 0,
            elapsed: Duration::ZERO,
            logs: Vec::new(),
        };
    }
    let version = slot.version();
    let report = shared.call(slot, &version, input);
    let mut breaker = slot.breaker.lock().unwrap_or_else(|e| e.into_inner());
    match &report.result {
        Ok(_) => breaker.success(),
        Err(_) => {
            if let Some(backoff) = breaker.failure(Instant::now()) {
                tracing::error!(
                    plugin = %slot.name,
                    backoff_ms = backoff.as_millis() as u64,
                    "plugin failed repeatedly: circuit breaker open, on_error applies until it is retried"
                );
            }
        }
    }
    report
}

impl Shared {
    fn new(limits: &PluginLimits, options: HostOptions, plugins: usize) -> anyhow::Result<Shared> {
        let max_memory = u64::from(limits.memory_mb) << 20;
        // Warm instances: at most one per thread per plugin version, with room
        // for versions being replaced and instances being rebuilt.
        let slots = ((plugins.max(1) * (limits.threads.max(1) + 2) * 3) as u32).clamp(16, 1000);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(slots)
            .total_core_instances(slots * 8)
            .total_memories(slots * 2)
            .total_tables(slots * 4)
            .max_memory_size(max_memory as usize);
        let mut config = wasmtime::Config::new();
        config
            .wasm_component_model(true)
            .consume_fuel(true)
            .epoch_interruption(true)
            .memory_reservation(max_memory)
            .memory_reservation_for_growth(0)
            .memory_guard_size(64 << 10)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| anyhow!("cannot start the WebAssembly engine: {e:#}"))?;
        let mut linker = Linker::new(&engine);
        bindings::Filter::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
        // The epoch ticker: deadlines are counted in ticks of TICK.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            })
            .context("cannot start the plugin epoch thread")?;
        Ok(Shared {
            engine,
            linker,
            limits: limits.clone(),
            cache: Mutex::new(HashMap::new()),
            compiles: AtomicU64::new(0),
            options,
            stop: AtomicBool::new(false),
        })
    }

    /// The component for `bytes`, compiled once per content hash.
    fn component(&self, bytes: &[u8]) -> anyhow::Result<([u8; 32], Component)> {
        let hash: [u8; 32] = Sha256::digest(bytes).into();
        if let Some(c) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&hash) {
            return Ok((hash, c.clone()));
        }
        if bytes.starts_with(b"\0asm") && bytes.len() >= 8 && bytes[4..8] == [1, 0, 0, 0] {
            bail!("this is a core WebAssembly module, not a component: build the plugin for wasm32-wasip2 (cargo build --target wasm32-wasip2 --release)");
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| anyhow!("not a valid WebAssembly component: {e:#}"))?;
        self.compiles.fetch_add(1, Ordering::Relaxed);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= 64 {
            cache.clear(); // old versions; they recompile if they come back
        }
        cache.insert(hash, component.clone());
        Ok((hash, component))
    }

    /// Compiles, checks the imports, instantiates and configures one version.
    fn load(&self, config: &PluginConfig, bytes: &[u8]) -> anyhow::Result<Version> {
        let (hash, component) = self.component(bytes)?;
        let ty = component.component_type();
        for (name, _) in ty.imports(&self.engine) {
            if !ALLOWED_IMPORTS.contains(&name) {
                let why = if name.starts_with("wasi:") {
                    "plugins get no WASI at all (no files, network, clock, randomness or environment)"
                } else {
                    "it is not part of the plugin world"
                };
                bail!(
                    "the component imports `{name}`, which push-relay does not provide: {why}; a plugin may import only {} \
                     (see plugins/README.md; Rust plugins: build with push-relay-plugin-sdk, which is no_std on wasm32)",
                    ALLOWED_IMPORTS.join(" and ")
                );
            }
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| anyhow!("the component does not fit the world {WORLD}: {e:#}"))?;
        let pre = bindings::FilterPre::new(pre).map_err(|e| anyhow!("the component does not export the world {WORLD}: {e:#}"))?;
        let version = Version { hash, info: (String::new(), String::new()), pre, idle: Mutex::new(Vec::new()) };
        let counters = Arc::new(Counters::new());
        let (mut warm, _) = self.instantiate(config, &version, counters)?;
        let info = warm
            .filter
            .call_info(&mut warm.store)
            .map_err(|e| anyhow!("`info` failed: {}", describe(&e)))?;
        let version = Version { info: (info.name, info.version), ..version };
        version.idle.lock().unwrap_or_else(|e| e.into_inner()).push(warm);
        Ok(version)
    }

    fn store(&self, config: &PluginConfig, plugin: Arc<str>, counters: Arc<Counters>) -> Store<State> {
        let limits = StoreLimitsBuilder::new()
            .memory_size((config.memory_mb as usize) << 20)
            .instances(32)
            .tables(32)
            .memories(4)
            .trap_on_grow_failure(true)
            .build();
        let state = State { limits, plugin, instance: String::new(), logs: Vec::new(), dropped_logs: 0, counters };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store
    }

    fn arm(&self, config: &PluginConfig, store: &mut Store<State>) {
        let _ = store.set_fuel(config.fuel);
        store.set_epoch_deadline(config.timeout_ms.div_ceil(TICK.as_millis() as u64).max(1) + 1);
    }

    /// A new instance of `version`, configured. Returns the fuel `configure` used.
    fn instantiate(&self, config: &PluginConfig, version: &Version, counters: Arc<Counters>) -> anyhow::Result<(Warm, u64)> {
        let mut store = self.store(config, Arc::from(config.name.as_str()), counters);
        self.arm(config, &mut store);
        let filter = version.pre.instantiate(&mut store).map_err(|e| anyhow!("cannot instantiate: {}", describe(&e)))?;
        match filter.call_configure(&mut store, &config.config_json) {
            Ok(Ok(())) => {}
            Ok(Err(message)) => bail!("`configure` refused the configuration: {message}"),
            Err(e) => bail!("`configure` failed: {}", describe(&e)),
        }
        let used = config.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        for (level, line) in std::mem::take(&mut store.data_mut().logs) {
            tracing::info!(plugin = %config.name, level = %level, "configure: {line}");
        }
        Ok((Warm { store, filter }, used))
    }

    /// One call on a warm instance (a new one when none is idle).
    fn call(&self, slot: &Slot, version: &Version, input: &Input) -> CallReport {
        let start = Instant::now();
        let config = &slot.config;
        let warm = version.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut warm = match warm {
            Some(w) => w,
            None => match self.instantiate(config, version, slot.counters.clone()) {
                Ok((w, _)) => w,
                Err(e) => {
                    return CallReport {
                        result: Err(Failure { kind: FailureKind::Instantiate, message: format!("{e:#}") }),
                        fuel_used: 0,
                        elapsed: start.elapsed(),
                        logs: Vec::new(),
                    }
                }
            },
        };
        // The first warm instance was built at load time with throw-away counters.
        if !Arc::ptr_eq(&warm.store.data().counters, &slot.counters) {
            warm.store.data_mut().counters = slot.counters.clone();
        }
        warm.store.data_mut().plugin = slot.name.clone();
        warm.store.data_mut().instance.clone_from(&input.instance);
        warm.store.data_mut().logs.clear();
        warm.store.data_mut().dropped_logs = 0;
        self.arm(config, &mut warm.store);
        let n = to_wit(input);
        let outcome = warm.filter.call_check(&mut warm.store, &n);
        let fuel_used = config.fuel.saturating_sub(warm.store.get_fuel().unwrap_or(0));
        let mut logs = std::mem::take(&mut warm.store.data_mut().logs);
        if warm.store.data().dropped_logs > 0 {
            logs.push(("warn".into(), format!("({} more log lines dropped)", warm.store.data().dropped_logs)));
        }
        let result = match outcome {
            Ok(v) => match validate(v) {
                Ok(v) => {
                    if !self.stop.load(Ordering::Relaxed) {
                        let mut idle = version.idle.lock().unwrap_or_else(|e| e.into_inner());
                        if idle.len() < self.limits.threads + 1 {
                            idle.push(warm);
                        }
                    }
                    Ok(v)
                }
                // A garbage answer: the instance is not trusted again.
                Err(message) => Err(Failure { kind: FailureKind::InvalidOutput, message }),
            },
            Err(e) => Err(classify(&e)),
        };
        CallReport { result, fuel_used, elapsed: start.elapsed(), logs }
    }
}

fn to_wit(input: &Input) -> wit::Notification {
    wit::Notification {
        instance: input.instance.clone(),
        registration: input.registration.clone(),
        provider: input.provider.clone(),
        urgency: urgency_to_wit(input.urgency),
        topic: input.topic.clone(),
        ttl: input.ttl,
        body_size: input.body_size,
        payload: input.payload.as_ref().map(|p| wit::Payload {
            title: p.title.clone(),
            body: p.body.clone(),
            account: p.account.clone(),
            notification_type: p.notification_type.clone(),
        }),
    }
}

fn urgency_to_wit(u: Urgency) -> wit::Urgency {
    match u {
        Urgency::VeryLow => wit::Urgency::VeryLow,
        Urgency::Low => wit::Urgency::Low,
        Urgency::Normal => wit::Urgency::Normal,
        Urgency::High => wit::Urgency::High,
    }
}

fn urgency_from_wit(u: wit::Urgency) -> Urgency {
    match u {
        wit::Urgency::VeryLow => Urgency::VeryLow,
        wit::Urgency::Low => Urgency::Low,
        wit::Urgency::Normal => Urgency::Normal,
        wit::Urgency::High => Urgency::High,
    }
}

/// Checks an answer against the documented bounds.
fn validate(v: wit::Verdict) -> Result<Verdict, String> {
    Ok(match v {
        wit::Verdict::Deliver => Verdict::Deliver,
        wit::Verdict::Drop(reason) => {
            if reason.len() > MAX_REASON_BYTES * 4 {
                return Err(format!("drop reason of {} bytes (at most {MAX_REASON_BYTES})", reason.len()));
            }
            let mut reason = reason;
            if reason.len() > MAX_REASON_BYTES {
                let mut cut = MAX_REASON_BYTES;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
            }
            Verdict::Drop { reason }
        }
        wit::Verdict::DeliverWithChanges(c) => {
            if c.tags.len() > MAX_TAGS {
                return Err(format!("{} tags (at most {MAX_TAGS})", c.tags.len()));
            }
            if let Some(t) = c.tags.iter().find(|t| t.len() > MAX_TAG_BYTES) {
                return Err(format!("a tag of {} bytes (at most {MAX_TAG_BYTES})", t.len()));
            }
            Verdict::DeliverWithChanges { urgency: c.urgency.map(urgency_from_wit), ttl: c.ttl, tags: c.tags }
        }
    })
}

fn describe(e: &wasmtime::Error) -> String {
    let f = classify(e);
    format!("{} ({})", f.message, f.kind.label())
}

/// Sorts a call error into a failure kind.
fn classify(e: &wasmtime::Error) -> Failure {
    let message = format!("{e:#}");
    let kind = match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => FailureKind::Fuel,
        Some(Trap::Interrupt) => FailureKind::Timeout,
        Some(_) => FailureKind::Trap,
        None if message.contains("memory") && (message.contains("limit") || message.contains("grow")) => FailureKind::Memory,
        None if message.contains("utf-8") || message.contains("UTF-8") || message.contains("invalid") => FailureKind::InvalidOutput,
        None => FailureKind::Trap,
    };
    Failure { kind, message }
}

/// Where `plugin test` and the tests find `plugins/wit`.
pub fn wit_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("wit")
}

#[cfg(test)]
mod tests;
