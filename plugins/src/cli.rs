//! `push-relay plugin test <file.wasm> --input <notification.json> [--config <json>]`:
//! runs one plugin on one notification, the way the gateway would, and
//! prints the verdict, the fuel used, the time taken and the plugin's logs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{HostOptions, Input, OnError, PluginConfig, PluginHost, PluginInstances, PluginLimits, Verdict};

/// What `plugin test` was asked.
#[derive(Debug, Clone)]
pub struct TestOptions {
    pub wasm: PathBuf,
    /// A JSON file with an [`Input`] (`-` for standard input).
    pub input: PathBuf,
    /// The plugin's configuration, as JSON (default `{}`).
    pub config: Option<String>,
    /// Also time this many warm calls after the first one.
    pub repeat: u32,
    pub fuel: u64,
    pub timeout_ms: u64,
    pub memory_mb: u32,
}

impl TestOptions {
    pub fn new(wasm: PathBuf, input: PathBuf) -> TestOptions {
        let d = PluginLimits::default();
        TestOptions { wasm, input, config: None, repeat: 0, fuel: d.fuel, timeout_ms: d.timeout_ms, memory_mb: d.memory_mb }
    }
}

/// Runs `plugin test` and returns what it prints. Errors: the plugin could
/// not be loaded, or the input is not a notification.
pub fn run(options: &TestOptions) -> anyhow::Result<String> {
    let text = if options.input.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read the notification from standard input")?
    } else {
        std::fs::read_to_string(&options.input).with_context(|| format!("cannot read {}", options.input.display()))?
    };
    let input: Input = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a notification (expected e.g. {{\"instance\": \"mastodon.social\", \"urgency\": \"normal\", \"ttl\": 3600, \
             \"body_size\": 200, \"payload\": {{\"title\": \"...\", \"body\": \"...\", \"notification_type\": \"mention\"}}}})",
            options.input.display()
        )
    })?;
    let config_json = options.config.clone().unwrap_or_else(|| "{}".into());
    if let Err(e) = serde_json::from_str::<serde_json::Value>(&config_json) {
        bail!("--config is not JSON: {e}");
    }
    let config = PluginConfig {
        name: "test".into(),
        path: options.wasm.clone(),
        instances: PluginInstances::All,
        config_json,
        see_payload: true,
        on_error: OnError::Deliver,
        fuel: options.fuel,
        timeout_ms: options.timeout_ms,
        memory_mb: options.memory_mb,
    };
    let limits = PluginLimits { fuel: options.fuel, timeout_ms: options.timeout_ms, memory_mb: options.memory_mb, threads: 1 };
    let host = PluginHost::new(&[config], &limits, HostOptions::default())
        .with_context(|| format!("cannot load {}", options.wasm.display()))?;
    let (name, version) = host.info("test").unwrap_or_default();
    let report = host.call_blocking("test", &input)?;
    let mut out = format!("plugin: {name} {version} ({})\n", options.wasm.display());
    match &report.result {
        Ok(Verdict::Deliver) => out += "verdict: deliver\n",
        Ok(Verdict::Drop { reason }) => out += &format!("verdict: drop ({reason:?})\n"),
        Ok(Verdict::DeliverWithChanges { urgency, ttl, tags }) => {
            out += "verdict: deliver with changes";
            if let Some(u) = urgency {
                out += &format!(", urgency {}", serde_json::to_string(u).unwrap_or_default().trim_matches('"'));
            }
            if let Some(t) = ttl {
                out += &format!(", ttl {t}");
            }
            if !tags.is_empty() {
                out += &format!(", tags {}", tags.join(","));
            }
            out += "\n";
        }
        Err(f) => out += &format!("verdict: error ({}): {}\n  (the gateway would apply the plugin's on_error policy)\n", f.kind.label(), f.message),
    }
    out += &format!("fuel used: {} of {}\n", report.fuel_used, options.fuel);
    out += &format!("time: {} µs\n", report.elapsed.as_micros());
    if report.logs.is_empty() {
        out += "logs: (none)\n";
    } else {
        out += "logs:\n";
        for (level, line) in &report.logs {
            out += &format!("  [{level}] {line}\n");
        }
    }
    if options.repeat > 0 {
        let mut times: Vec<Duration> = Vec::with_capacity(options.repeat as usize);
        let start = Instant::now();
        for _ in 0..options.repeat {
            let r = host.call_blocking("test", &input)?;
            times.push(r.elapsed);
        }
        let total = start.elapsed();
        times.sort();
        let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
        out += &format!(
            "warm calls: {} in {:.1} ms: {:.2} µs/call mean (end to end), p50 {:.2} µs, p99 {:.2} µs (call only)\n",
            options.repeat,
            total.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e6 / f64::from(options.repeat),
            pct(0.5),
            pct(0.99)
        );
    }
    Ok(out)
}
