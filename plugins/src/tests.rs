//! Host tests with real components: the example plugins and the hostile
//! one, built from `plugins/guest` by [`crate::guest::build`].

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

fn plugin(name: &str, path: &Path, config_json: &str) -> PluginConfig {
    let d = PluginLimits::default();
    PluginConfig {
        name: name.into(),
        path: path.to_path_buf(),
        instances: PluginInstances::All,
        config_json: config_json.into(),
        see_payload: true,
        on_error: OnError::Deliver,
        fuel: d.fuel,
        timeout_ms: d.timeout_ms,
        memory_mb: d.memory_mb,
    }
}

fn hostile(mode: &str) -> PluginConfig {
    plugin(mode, &guest::wasm("hostile"), &format!("{{\"mode\": \"{mode}\"}}"))
}

fn host(plugins: &[PluginConfig]) -> PluginHost {
    host_with(plugins, HostOptions::default())
}

fn host_with(plugins: &[PluginConfig], options: HostOptions) -> PluginHost {
    let limits = PluginLimits { fuel: u64::MAX / 4, timeout_ms: 10_000, memory_mb: 64, threads: 4 };
    PluginHost::new(plugins, &limits, options).unwrap_or_else(|e| panic!("host: {e:#}"))
}

fn input(title: &str, body: &str) -> Input {
    Input {
        instance: "mastodon.example".into(),
        registration: "reg-1".into(),
        provider: "expo".into(),
        urgency: Urgency::Normal,
        topic: None,
        ttl: 3600,
        body_size: 300,
        payload: Some(Payload { title: title.into(), body: body.into(), account: None, notification_type: "mention".into() }),
    }
}

fn failure(report: &CallReport) -> FailureKind {
    match &report.result {
        Err(f) => f.kind,
        Ok(v) => panic!("expected a failure, got {v:?}"),
    }
}

#[derive(Default)]
struct Counting {
    verdicts: Mutex<Vec<(String, String)>>,
    failures: Mutex<Vec<(String, String)>>,
}

impl Observer for Counting {
    fn verdict(&self, plugin: &str, verdict: &str) {
        self.verdicts.lock().unwrap().push((plugin.into(), verdict.into()));
    }
    fn failure(&self, plugin: &str, kind: &str) {
        self.failures.lock().unwrap().push((plugin.into(), kind.into()));
    }
}

#[test]
fn keyword_filter_drops_and_delivers() {
    let h = host(&[plugin("kw", &guest::wasm("keyword_filter"), r#"{"words": ["casino"], "regex": ["(?i)free\\s+money"]}"#)]);
    assert_eq!(h.info("kw"), Some(("keyword-filter".into(), "0.1.0".into())));
    let r = h.call_blocking("kw", &input("Best CASINO in town", "")).unwrap();
    assert_eq!(r.result.unwrap(), Verdict::Drop { reason: "title contains \"casino\"".into() });
    let r = h.call_blocking("kw", &input("hi", "get FREE   money")).unwrap();
    assert!(matches!(r.result.unwrap(), Verdict::Drop { reason } if reason.starts_with("body matches")));
    let r = h.call_blocking("kw", &input("Alice mentioned you", "lunch?")).unwrap();
    assert_eq!(r.result.unwrap(), Verdict::Deliver);
    assert!(r.fuel_used > 0);
}

#[test]
fn payload_only_with_see_payload() {
    let mut p = plugin("kw", &guest::wasm("keyword_filter"), r#"{"words": ["casino"]}"#);
    p.see_payload = false;
    let h = host(&[p]);
    let r = h.call_blocking("kw", &input("casino", "casino")).unwrap();
    assert_eq!(r.result.unwrap(), Verdict::Deliver, "the plugin must not have seen the payload");
}

#[test]
fn bad_configuration_refuses_load() {
    let e = PluginHost::new(
        &[plugin("kw", &guest::wasm("keyword_filter"), r#"{"regex": ["("]}"#)],
        &PluginLimits::default(),
        HostOptions::default(),
    )
    .err()
    .expect("must refuse");
    let msg = format!("{e:#}");
    assert!(msg.contains("plugin `kw`") && msg.contains("bad regex"), "{msg}");
}

#[test]
fn forbidden_wasi_import_refused_at_load() {
    let wat = guest::plugins_dir().join("guest/hostile/forbidden-import.wat");
    let e = PluginHost::new(&[plugin("fs", &wat, "{}")], &PluginLimits::default(), HostOptions::default())
        .err()
        .expect("must refuse");
    let msg = format!("{e:#}");
    assert!(msg.contains("imports `wasi:filesystem/preopens@0.2.0`") && msg.contains("no WASI"), "{msg}");
}

#[test]
fn invalid_files_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"definitely not wasm").unwrap();
    let msg = format!("{:#}", PluginHost::new(&[plugin("j", &junk, "{}")], &PluginLimits::default(), HostOptions::default()).err().unwrap());
    assert!(msg.contains("not a valid WebAssembly component"), "{msg}");
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, [0u8, b'a', b's', b'm', 1, 0, 0, 0]).unwrap();
    let msg = format!("{:#}", PluginHost::new(&[plugin("c", &core, "{}")], &PluginLimits::default(), HostOptions::default()).err().unwrap());
    assert!(msg.contains("core WebAssembly module, not a component"), "{msg}");
}

#[test]
fn fuel_exhaustion() {
    let mut p = hostile("loop");
    p.fuel = 2_000_000;
    p.timeout_ms = 5_000;
    let h = host(&[p]);
    let r = h.call_blocking("loop", &input("", "")).unwrap();
    assert_eq!(failure(&r), FailureKind::Fuel);
    assert!(r.fuel_used >= 2_000_000 - 10);
    assert!(r.elapsed < Duration::from_secs(2));
}

#[test]
fn epoch_deadline() {
    let mut p = hostile("loop");
    p.fuel = u64::MAX / 4; // fuel would take hours: the deadline must stop it
    p.timeout_ms = 20;
    let h = host(&[p]);
    let r = h.call_blocking("loop", &input("", "")).unwrap();
    assert_eq!(failure(&r), FailureKind::Timeout);
    assert!(r.elapsed >= Duration::from_millis(15) && r.elapsed < Duration::from_secs(1), "{:?}", r.elapsed);
}

#[test]
fn memory_cap() {
    let mut p = hostile("memory");
    p.memory_mb = 8;
    let h = host(&[p]);
    let r = h.call_blocking("memory", &input("", "")).unwrap();
    assert_eq!(failure(&r), FailureKind::Memory, "{:?}", r.result);
}

#[test]
fn traps_panics_and_garbage() {
    let h = host(&[hostile("trap"), hostile("panic"), hostile("bad-utf8"), hostile("too-many-tags")]);
    assert_eq!(failure(&h.call_blocking("trap", &input("", "")).unwrap()), FailureKind::Trap);
    let r = h.call_blocking("panic", &input("", "")).unwrap();
    assert_eq!(failure(&r), FailureKind::Trap);
    assert!(r.logs.iter().any(|(l, m)| l == "error" && m.contains("panic: hostile plugin panics on purpose")), "{:?}", r.logs);
    assert_eq!(failure(&h.call_blocking("bad-utf8", &input("", "")).unwrap()), FailureKind::InvalidOutput);
    assert_eq!(failure(&h.call_blocking("too-many-tags", &input("", "")).unwrap()), FailureKind::InvalidOutput);
    // After a failure the instance is thrown away and the next call gets a fresh one.
    assert_eq!(failure(&h.call_blocking("trap", &input("", "")).unwrap()), FailureKind::Trap);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_policy_applies() {
    let mut drop = hostile("trap");
    drop.name = "strict".into();
    drop.on_error = OnError::Drop;
    let observer = Arc::new(Counting::default());
    let h = host_with(&[hostile("trap")], HostOptions { observer: observer.clone(), ..Default::default() });
    assert_eq!(h.filter(&input("", "")).await, Decision::default(), "on_error = deliver");
    let h = host_with(&[drop], HostOptions { observer: observer.clone(), ..Default::default() });
    let d = h.filter(&input("", "")).await;
    assert_eq!(d.dropped, Some(("strict".into(), "plugin failed (trap)".into())));
    let f = observer.failures.lock().unwrap().clone();
    assert_eq!(f, vec![("trap".into(), "trap".into()), ("strict".into(), "trap".into())]);
    let v = observer.verdicts.lock().unwrap().clone();
    assert_eq!(v, vec![("trap".into(), "on_error_deliver".into()), ("strict".into(), "on_error_drop".into())]);
}

#[test]
fn circuit_breaker_trips_and_retries() {
    let policy = BreakerPolicy { threshold: 5, initial_backoff: Duration::from_millis(300), max_backoff: Duration::from_secs(10) };
    let h = host_with(&[hostile("trap")], HostOptions { breaker: policy, ..Default::default() });
    for _ in 0..5 {
        assert_eq!(failure(&h.call_blocking("trap", &input("", "")).unwrap()), FailureKind::Trap);
    }
    let t = Instant::now();
    let r = h.call_blocking("trap", &input("", "")).unwrap();
    assert_eq!(failure(&r), FailureKind::CircuitOpen);
    assert!(t.elapsed() < Duration::from_millis(50), "an open breaker answers at once");
    std::thread::sleep(Duration::from_millis(350));
    // Half-open: one trial call reaches the plugin, fails, reopens for 600 ms.
    assert_eq!(failure(&h.call_blocking("trap", &input("", "")).unwrap()), FailureKind::Trap);
    assert_eq!(failure(&h.call_blocking("trap", &input("", "")).unwrap()), FailureKind::CircuitOpen);
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(failure(&h.call_blocking("trap", &input("", "")).unwrap()), FailureKind::CircuitOpen, "backoff doubled");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(failure(&h.call_blocking("trap", &input("", "")).unwrap()), FailureKind::Trap);
}

#[test]
fn compiled_once_per_content_hash() {
    let wasm = guest::wasm("keyword_filter");
    let h = host(&[plugin("a", &wasm, "{}"), plugin("b", &wasm, r#"{"words": ["x"]}"#)]);
    assert_eq!(h.compiles(), 1, "same bytes, one compilation");
    // A copy under another name is still the same content.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.wasm");
    std::fs::copy(&wasm, &copy).unwrap();
    let h2 = host(&[plugin("a", &wasm, "{}"), plugin("c", &copy, "{}"), plugin("d", &guest::wasm("rate_filter"), "{}")]);
    assert_eq!(h2.compiles(), 2);
    // Touching the file without changing it reloads nothing.
    assert!(h2.reload(true).is_empty());
    assert_eq!(h2.compiles(), 2);
}

/// Replaces `path` atomically (write + rename), as a deploy should.
fn replace(path: &Path, with: &Path) {
    let tmp = path.with_extension("tmp");
    std::fs::copy(with, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn hot_reload_swaps_and_keeps_old_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("filter.wasm");
    std::fs::copy(guest::wasm("rate_filter"), &path).unwrap();
    // One config both versions accept (hostile ignores `per_minute`, its mode defaults to ok).
    let h = host(&[plugin("f", &path, r#"{"per_minute": 1}"#)]);
    assert_eq!(h.info("f").unwrap().0, "rate-filter");
    assert!(h.reload(false).is_empty(), "nothing changed");

    // Garbage: refused, the old version keeps running (and its counters).
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"\0asm garbage").unwrap();
    replace(&path, &junk);
    assert!(h.reload(false).is_empty());
    assert_eq!(h.info("f").unwrap().0, "rate-filter");
    assert_eq!(h.call_blocking("f", &input("", "")).unwrap().result.unwrap(), Verdict::Deliver);
    assert!(matches!(h.call_blocking("f", &input("", "")).unwrap().result, Ok(Verdict::Drop { .. })));
    // The same garbage is not retried every second; a fixed file is picked up.
    assert!(h.reload(false).is_empty());
    replace(&path, &guest::wasm("hostile"));
    assert_eq!(h.reload(false), vec!["f".to_string()]);
    assert_eq!(h.info("f").unwrap().0, "hostile");
    assert_eq!(h.call_blocking("f", &input("", "")).unwrap().result.unwrap(), Verdict::Deliver);
}

#[test]
fn reload_refuses_failing_configure() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("filter.wasm");
    std::fs::copy(guest::wasm("hostile"), &path).unwrap();
    // hostile accepts {"words": ...} (mode defaults to ok); keyword-filter refuses `mode`.
    let h = host(&[plugin("f", &path, r#"{"mode": "ok"}"#)]);
    replace(&path, &guest::wasm("keyword_filter"));
    assert!(h.reload(false).is_empty());
    assert_eq!(h.info("f").unwrap().0, "hostile", "the old version stays");
    assert_eq!(h.call_blocking("f", &input("", "")).unwrap().result.unwrap(), Verdict::Deliver);
}

/// Failure isolation under load: a plugin that loops until its deadline is
/// called over and over while 200 calls to a good plugin go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_calls_flow_while_a_bad_plugin_is_called() {
    let mut bad = hostile("loop");
    bad.instances = PluginInstances::Only(vec!["bad.example".into()]);
    bad.fuel = u64::MAX / 4;
    bad.timeout_ms = 30;
    let mut good = plugin("kw", &guest::wasm("keyword_filter"), r#"{"words": ["casino"]}"#);
    good.instances = PluginInstances::Only(vec!["good.example".into()]);
    let policy = BreakerPolicy { threshold: 1_000_000, ..Default::default() }; // keep calling the bad one
    let h = Arc::new(host_with(&[bad, good], HostOptions { breaker: policy, ..Default::default() }));
    let stop = Arc::new(AtomicBool::new(false));
    let bad_calls = Arc::new(AtomicU64::new(0));
    let mut hammer = Vec::new();
    for _ in 0..2 {
        let (h, stop, bad_calls) = (h.clone(), stop.clone(), bad_calls.clone());
        hammer.push(tokio::spawn(async move {
            let mut n = Input { instance: "bad.example".into(), ..input("", "") };
            n.payload = None;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                assert_eq!(h.filter(&n).await, Decision::default(), "on_error = deliver");
                assert!(t.elapsed() < Duration::from_secs(2), "bad call took {:?}", t.elapsed());
                bad_calls.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let mut good_calls = Vec::new();
    for i in 0..200 {
        let h = h.clone();
        good_calls.push(tokio::spawn(async move {
            let n = Input { instance: "good.example".into(), ..input(if i % 2 == 0 { "casino" } else { "hello" }, "") };
            (i, h.filter(&n).await)
        }));
    }
    for c in good_calls {
        let (i, d) = c.await.unwrap();
        assert_eq!(d.dropped.is_some(), i % 2 == 0, "call {i}: {d:?}");
    }
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in hammer {
        t.await.unwrap();
    }
    let bad = bad_calls.load(Ordering::Relaxed);
    println!("200 good calls in {took:?} while {bad} bad calls timed out");
    assert!(bad >= 2, "the bad plugin was being called meanwhile");
    assert!(took < Duration::from_secs(5), "good calls took {took:?}");
}

/// Call overhead on a warm instance (printed; run with --nocapture to see it).
#[test]
fn warm_call_overhead() {
    let h = host(&[plugin("kw", &guest::wasm("keyword_filter"), r#"{"words": ["casino", "crypto"]}"#), hostile("ok")]);
    let n = input("Alice mentioned you", "Are we still on for lunch tomorrow?");
    let bare = Input { payload: None, ..n.clone() };
    for (name, input) in [("ok", &bare), ("kw", &n)] {
        for _ in 0..100 {
            h.call_blocking(name, input).unwrap();
        }
        let calls = 5_000u32;
        let start = Instant::now();
        let mut in_call = Duration::ZERO;
        for _ in 0..calls {
            let r = h.call_blocking(name, input).unwrap();
            assert!(r.result.is_ok());
            in_call += r.elapsed;
        }
        let per_call = start.elapsed() / calls;
        println!(
            "warm call overhead ({name}, {} build): {:.2} µs/call end to end, {:.2} µs inside the host call",
            if cfg!(debug_assertions) { "debug" } else { "release" },
            per_call.as_secs_f64() * 1e6,
            (in_call / calls).as_secs_f64() * 1e6
        );
        let bound = if cfg!(debug_assertions) { 500.0 } else { 20.0 };
        assert!(per_call.as_secs_f64() * 1e6 < bound, "{per_call:?} per call");
    }
}
