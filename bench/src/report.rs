//! The numbers of one run: the JSON report and the human table.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::build::MessageSet;
use crate::ceiling::Ceiling;
use crate::drive::{histogram, Outcome};
use crate::sink::Sink;
use crate::{Encoding, Mode, Options, StoreKind};

#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kb: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory_gib: (mem_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PhaseRate {
    pub count: usize,
    pub seconds: f64,
    pub per_second: f64,
}

/// Percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    /// From a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub label: Option<String>,
    pub unix_time: u64,
    pub store: Option<StoreKind>,
    pub mode: Option<Mode>,
    pub encoding: Option<Encoding>,
    pub rate: String,
    pub connections: usize,
    pub pushes: usize,
    pub registrations: usize,
    pub preload_registrations: usize,
    pub sink_delay_ms: u64,
    pub machine: Machine,
    pub ceiling: Option<Ceiling>,
    pub relay_url: String,
    pub store_url: String,

    pub preload: Option<PhaseRate>,
    pub registration: Option<PhaseRate>,
    pub prebuild_seconds: f64,
    pub payload_bytes_avg: f64,
    pub body_bytes_avg: f64,

    /// Pushes that got an HTTP answer or failed trying.
    pub sent: usize,
    /// Pushes answered 201.
    pub accepted: usize,
    /// Seconds from the first send to the last answer.
    pub send_seconds: f64,
    pub accepted_per_second: f64,
    /// Every outcome: HTTP statuses ("201", "429"...) and failures
    /// ("timeout", "connection closed"...).
    pub answers: BTreeMap<String, u64>,
    /// `accepted` pushes that reached the sink (at least once).
    pub delivered: usize,
    /// Seconds from the first send to the last first arrival at the sink.
    pub delivery_seconds: f64,
    pub delivered_per_second: f64,
    /// Send → 201.
    pub latency_201: Latency,
    /// Due time → 201 (fixed rate only; includes waiting for a connection).
    pub latency_201_from_schedule: Option<Latency>,
    /// Largest delay of a send behind its due time (fixed rate), ms.
    pub max_schedule_lag_ms: f64,
    /// Send → first arrival at the sink.
    pub delivery_latency: Latency,

    /// 201 but never reached the sink.
    pub lost: usize,
    /// Extra copies received of 201 pushes (a message received 3 times counts 2).
    pub duplicates: u64,
    pub duplicated_messages: usize,
    /// Pushes delivered although they were not answered 201 (e.g. the
    /// answer timed out): not a loss, reported for completeness.
    pub delivered_without_201: usize,
    /// Messages at the sink that match no push of this run.
    pub unknown_at_sink: u64,
    /// Large-body `fetch: true` messages at the sink (should be 0).
    pub fetch_at_sink: u64,
    pub sink_messages: u64,
    /// Of which in decrypted form (title/body, `notification_id`).
    pub sink_decrypted: u64,
    pub sink_send_requests: u64,
    pub sink_avg_batch: f64,

    /// Relay's VmHWM at the end (the kernel's peak RSS over its lifetime), kB.
    pub relay_peak_rss_kb: u64,
    /// Largest VmRSS sampled (every 100 ms) during the push phase, kB.
    pub relay_max_rss_under_load_kb: u64,
    /// Same as above over the whole run, kB.
    pub relay_max_sampled_rss_kb: u64,
    /// VmRSS right after the preload, kB.
    pub relay_rss_after_preload_kb: u64,

    /// Selected counters from the relay's `/metrics` at the end of the run
    /// (name with labels → value): decrypt fallbacks, drops, rate limits,
    /// deliveries.
    pub relay_metrics: BTreeMap<String, f64>,

    /// CPU seconds (user + system) the relay used from the first push until
    /// every push was delivered (or the drain timed out).
    pub relay_cpu_seconds: Option<f64>,
    /// CPU seconds the bench itself (driver + sink) used in the same span: it
    /// shares the machine with the relay.
    pub bench_cpu_seconds: Option<f64>,
    /// Delivered pushes per relay CPU-second (what one core fully given to
    /// the relay would do, whatever the bench took).
    pub pushes_per_relay_cpu_second: Option<f64>,

    /// accepted_per_second ÷ (verify_per_second × cores).
    pub ratio: Option<f64>,
    /// Nothing lost, nothing duplicated.
    pub ok: bool,
}

impl Report {
    pub fn new(opts: &Options) -> Report {
        Report {
            label: opts.label.clone(),
            unix_time: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            store: Some(opts.store),
            mode: Some(opts.mode),
            encoding: Some(opts.encoding),
            rate: opts.rate.to_string(),
            connections: opts.connections,
            pushes: if opts.registrations_only.is_some() { 0 } else { opts.pushes },
            registrations: if opts.registrations_only.is_some() { 0 } else { opts.registrations },
            preload_registrations: opts.registrations_only.unwrap_or(opts.preload),
            sink_delay_ms: opts.sink_delay_ms,
            ok: true,
            ..Report::default()
        }
    }

    /// Whether every 201 reached the sink exactly once.
    pub fn ok(&self) -> bool {
        self.ok
    }

    pub(crate) fn fill_from(&mut self, out: &Outcome, set: &MessageSet, sink: &Sink) {
        let n = set.messages.len();
        let mut count = vec![0u32; n];
        let mut first = vec![u64::MAX; n];
        let mut unknown = 0u64;
        for (k, a) in sink.arrivals() {
            match set.keys.get(&k) {
                Some(&i) => {
                    count[i] += a.count;
                    first[i] = first[i].min(a.first_ns);
                }
                None => unknown += a.count as u64,
            }
        }
        let mut e2e = histogram();
        let (mut lost, mut dups, mut dup_msgs, mut delivered, mut without) = (0, 0u64, 0, 0, 0);
        let mut last_arrival = out.start_ns;
        for i in 0..n {
            let st = out.status[i].load(Ordering::Relaxed);
            if st == 201 {
                if count[i] == 0 {
                    lost += 1;
                    continue;
                }
                delivered += 1;
                if count[i] > 1 {
                    dups += (count[i] - 1) as u64;
                    dup_msgs += 1;
                }
                let sent = out.sent_ns[i].load(Ordering::Relaxed);
                let _ = e2e.record((first[i].saturating_sub(sent) / 1000).max(1));
                last_arrival = last_arrival.max(first[i]);
            } else if count[i] > 0 {
                without += 1;
            }
        }
        let counts = sink.counts();
        self.sent = n;
        self.accepted = out.accepted();
        self.send_seconds = (out.end_ns.saturating_sub(out.start_ns)) as f64 / 1e9;
        self.accepted_per_second = if self.send_seconds > 0.0 { self.accepted as f64 / self.send_seconds } else { 0.0 };
        let mut answers = BTreeMap::new();
        for (st, c) in out.by_status() {
            if st != 0 {
                answers.insert(st.to_string(), c);
            }
        }
        for (k, v) in &out.failures {
            answers.insert(k.clone(), *v);
        }
        self.answers = answers;
        self.delivered = delivered;
        self.delivery_seconds = last_arrival.saturating_sub(out.start_ns) as f64 / 1e9;
        self.delivered_per_second = if self.delivery_seconds > 0.0 { delivered as f64 / self.delivery_seconds } else { 0.0 };
        self.latency_201 = Latency::of(&out.latency_201);
        self.latency_201_from_schedule = out.latency_201_sched.as_ref().map(Latency::of);
        self.max_schedule_lag_ms = out.max_schedule_lag_us as f64 / 1000.0;
        self.delivery_latency = Latency::of(&e2e);
        self.lost = lost;
        self.duplicates = dups;
        self.duplicated_messages = dup_msgs;
        self.delivered_without_201 = without;
        self.unknown_at_sink = unknown + counts.unknown;
        self.fetch_at_sink = counts.fetch;
        self.sink_messages = counts.messages;
        self.sink_decrypted = counts.decrypted;
        self.sink_send_requests = counts.send_requests;
        self.sink_avg_batch = if counts.send_requests > 0 { counts.messages as f64 / counts.send_requests as f64 } else { 0.0 };
        self.ok = lost == 0 && dups == 0;
    }

    /// The `Machine:` line of BENCHMARKS.md.
    pub fn machine_line(&self) -> String {
        let m = &self.machine;
        let ssl = self.ceiling.as_ref().map(|c| format!(", {}", c.openssl_version.split(" (").next().unwrap_or(""))).unwrap_or_default();
        format!("Machine: {}, {} cores, {} GiB RAM, Linux {}{ssl}", m.cpu_model, m.cores, m.memory_gib, m.kernel)
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| s.push_str(&format!("  {k:<37} {v}\n"));
        row("", String::new());
        if let Some(l) = &self.label {
            row("label", l.clone());
        }
        row("machine", self.machine_line().trim_start_matches("Machine: ").to_string());
        row(
            "run",
            format!(
                "store {:?}, mode {:?}, encoding {:?}, rate {}, {} connections, sink delay {} ms",
                self.store.unwrap_or(StoreKind::Sqlite),
                self.mode.unwrap_or(Mode::Opaque),
                self.encoding.unwrap_or(Encoding::Aes128gcm),
                self.rate,
                self.connections,
                self.sink_delay_ms
            ),
        );
        if let Some(p) = &self.preload {
            row("preload (registrations)", format!("{} in {:.1} s = {:.0}/s", p.count, p.seconds, p.per_second));
        }
        if let Some(p) = &self.registration {
            row("registrations pushed to", format!("{} in {:.1} s = {:.0}/s", p.count, p.seconds, p.per_second));
        }
        if self.pushes == 0 {
            row("relay RSS now / peak (VmHWM)", format!("{:.1} / {:.1} MB", self.relay_rss_after_preload_kb as f64 / 1024.0, self.relay_peak_rss_kb as f64 / 1024.0));
            return s;
        }
        row("pre-built pushes", format!("{} in {:.1} s (payload {:.0} B, body {:.0} B avg)", self.sent, self.prebuild_seconds, self.payload_bytes_avg, self.body_bytes_avg));
        row("accepted (201)", format!("{} of {} in {:.2} s", self.accepted, self.sent, self.send_seconds));
        row("accepted pushes/s", format!("{:.0}", self.accepted_per_second));
        row("delivered to sink", format!("{} in {:.2} s", self.delivered, self.delivery_seconds));
        row("delivered pushes/s", format!("{:.0}", self.delivered_per_second));
        let lat = |l: &Latency| format!("p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} ms", l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms);
        row("201 latency (send → 201)", lat(&self.latency_201));
        if let Some(l) = &self.latency_201_from_schedule {
            row("201 latency (due time → 201)", lat(l));
            row("max lag behind schedule", format!("{:.1} ms", self.max_schedule_lag_ms));
        }
        row("delivery latency (send → sink)", lat(&self.delivery_latency));
        row("answers", self.answers.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", "));
        row("sink", format!(
                "{} messages ({} decrypted) in {} requests ({:.1}/request)",
                self.sink_messages, self.sink_decrypted, self.sink_send_requests, self.sink_avg_batch
            ));
        if !self.relay_metrics.is_empty() {
            row(
                "relay metrics",
                self.relay_metrics.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
            );
        }
        if let (Some(r), Some(b)) = (self.relay_cpu_seconds, self.bench_cpu_seconds) {
            row(
                "CPU seconds relay / bench",
                format!(
                    "{r:.2} / {b:.2}  ({:.0} pushes per relay CPU-second)",
                    self.pushes_per_relay_cpu_second.unwrap_or(0.0)
                ),
            );
        }
        row("relay peak RSS (VmHWM)", format!("{:.1} MB", self.relay_peak_rss_kb as f64 / 1024.0));
        row("relay max RSS during pushes", format!("{:.1} MB", self.relay_max_rss_under_load_kb as f64 / 1024.0));
        if self.preload.is_some() {
            row("relay RSS after preload", format!("{:.1} MB", self.relay_rss_after_preload_kb as f64 / 1024.0));
        }
        match &self.ceiling {
            Some(c) => {
                row("ES256 verify/s (1 core, openssl)", format!("{:.0}", c.verify_per_second));
                row(
                    "ratio pushes/s ÷ (verify/s × cores)",
                    format!("{:.3}  ({:.0} ÷ ({:.0} × {}))", self.ratio.unwrap_or(0.0), self.accepted_per_second, c.verify_per_second, self.machine.cores),
                );
            }
            None => row("ceiling", "not measured (--skip-ceiling)".into()),
        }
        row(
            "exactly once",
            format!(
                "{}: lost {}, duplicates {} (in {} messages), delivered without 201 {}, unknown at sink {}",
                if self.ok { "OK" } else { "FAILED" },
                self.lost,
                self.duplicates,
                self.duplicated_messages,
                self.delivered_without_201,
                self.unknown_at_sink
            ),
        );
        s
    }
}

/// The counters worth reporting from a Prometheus text page: every sample of
/// `decrypt_fallbacks_total`, `messages_dropped_total`, `rate_limited_total`
/// and `deliveries_total` (prefix `push_relay_` removed).
pub fn pick_metrics(text: &str) -> BTreeMap<String, f64> {
    const WANTED: [&str; 4] = ["decrypt_fallbacks_total", "messages_dropped_total", "rate_limited_total", "deliveries_total"];
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.rsplit_once(' ') else { continue };
        let short = name.trim_start_matches("push_relay_");
        let base = short.split('{').next().unwrap_or("");
        if WANTED.contains(&base) {
            if let Ok(v) = value.trim().parse::<f64>() {
                out.insert(short.to_string(), v);
            }
        }
    }
    out
}
