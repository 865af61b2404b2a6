//! Prometheus metrics (`GET /metrics`). Names are prefixed `push_relay_`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Pushes answered, by status code.
    pub pushes: IntCounterVec,
    /// Time to answer a push, by status code.
    pub push_seconds: HistogramVec,
    /// Provider outcomes, by provider and outcome (delivered, retry, gone, failed).
    pub deliveries: IntCounterVec,
    /// From acceptance to the provider's acceptance, by provider.
    pub delivery_seconds: HistogramVec,
    /// Messages removed without delivery, by reason (expired, failed,
    /// gone, inactive, ttl0).
    pub dropped: IntCounterVec,
    pub queue_depth: IntGauge,
    pub queue_oldest_seconds: IntGauge,
    /// Requests refused by a rate limit, by limit.
    pub rate_limited: IntCounterVec,
    /// Registration events (created, confirmed, deleted, gone).
    pub registrations: IntCounterVec,
    /// Decrypted-mode messages delivered opaque because they did not
    /// decrypt to JSON.
    pub decrypt_fallbacks: IntCounter,
    /// Plugin answers, by plugin and verdict (deliver, drop,
    /// deliver_with_changes, on_error_deliver, on_error_drop).
    pub plugin_verdicts: IntCounterVec,
    /// Plugin failures, by plugin and kind (fuel, timeout, memory, trap,
    /// invalid_output, instantiate, circuit_open, overloaded, reload).
    pub plugin_failures: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("push_relay".into()), None).unwrap_or_default();
        let latency = vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        let delivery = vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0];
        let m = Metrics {
            pushes: IntCounterVec::new(Opts::new("pushes_total", "Web Push requests answered, by status"), &["status"])
                .expect("static metric"),
            push_seconds: HistogramVec::new(
                HistogramOpts::new("push_duration_seconds", "Time to answer a Web Push request").buckets(latency),
                &["status"],
            )
            .expect("static metric"),
            deliveries: IntCounterVec::new(
                Opts::new("deliveries_total", "Provider answers per notification"),
                &["provider", "outcome"],
            )
            .expect("static metric"),
            delivery_seconds: HistogramVec::new(
                HistogramOpts::new("delivery_latency_seconds", "From acceptance to provider acceptance")
                    .buckets(delivery),
                &["provider"],
            )
            .expect("static metric"),
            dropped: IntCounterVec::new(
                Opts::new("messages_dropped_total", "Accepted messages removed without delivery, by reason"),
                &["reason"],
            )
            .expect("static metric"),
            queue_depth: IntGauge::new("queue_depth", "Messages waiting in the delivery queue").expect("static metric"),
            queue_oldest_seconds: IntGauge::new("queue_oldest_age_seconds", "Age of the oldest queued message")
                .expect("static metric"),
            rate_limited: IntCounterVec::new(
                Opts::new("rate_limited_total", "Requests refused by a rate limit"),
                &["limit"],
            )
            .expect("static metric"),
            registrations: IntCounterVec::new(
                Opts::new("registration_events_total", "Registration lifecycle events"),
                &["event"],
            )
            .expect("static metric"),
            decrypt_fallbacks: IntCounter::new(
                "decrypt_fallbacks_total",
                "Decrypted-mode messages sent opaque because they did not decrypt to JSON",
            )
            .expect("static metric"),
            plugin_verdicts: IntCounterVec::new(
                Opts::new("plugin_verdicts_total", "Plugin verdicts, by plugin and verdict"),
                &["plugin", "verdict"],
            )
            .expect("static metric"),
            plugin_failures: IntCounterVec::new(
                Opts::new("plugin_failures_total", "Plugin failures, by plugin and kind"),
                &["plugin", "kind"],
            )
            .expect("static metric"),
            registry,
        };
        for collector in [
            Box::new(m.pushes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.push_seconds.clone()),
            Box::new(m.deliveries.clone()),
            Box::new(m.delivery_seconds.clone()),
            Box::new(m.dropped.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.queue_oldest_seconds.clone()),
            Box::new(m.rate_limited.clone()),
            Box::new(m.registrations.clone()),
            Box::new(m.decrypt_fallbacks.clone()),
            Box::new(m.plugin_verdicts.clone()),
            Box::new(m.plugin_failures.clone()),
        ] {
            // Registration only fails on duplicate names, which are static here.
            let _ = m.registry.register(collector);
        }
        m
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl push_relay_plugins::Observer for Metrics {
    fn verdict(&self, plugin: &str, verdict: &str) {
        self.plugin_verdicts.with_label_values(&[plugin, verdict]).inc();
    }

    fn failure(&self, plugin: &str, kind: &str) {
        self.plugin_failures.with_label_values(&[plugin, kind]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
