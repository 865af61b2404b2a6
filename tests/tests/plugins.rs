//! End-to-end PLUGIN tests (SPEC §6): the real `push-relay` binary with
//! `[[plugins]]` built from `plugins/examples` (compiled to wasm by the
//! test itself, see `push_relay_plugins::guest`), a mock Expo, our own Web
//! Push sender.
//!
//! Build the binary first: `cargo build -p push-relay`.

use push_relay_e2e::metric_sum as metric;
use push_relay_e2e::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NO_LIMITS: &str = "per_instance = { per_second = 100000, burst = 100000 }\n\
                         per_registration = { per_second = 100000, burst = 100000 }\n\
                         registrations_per_ip = { per_minute = 100000, burst = 100000 }";

fn token(tag: &str) -> String {
    format!("ExponentPushToken[{tag}-{:08x}]", rand::random::<u32>())
}

fn wasm(name: &str) -> PathBuf {
    push_relay_plugins::guest::wasm(name)
}


/// A Mastodon-shaped payload with this title and body.
fn payload(title: &str, body: &str) -> String {
    json!({
        "access_token": "SECRET-ACCESS-TOKEN",
        "notification_id": 7,
        "notification_type": "mention",
        "preferred_locale": "en",
        "title": title,
        "body": body,
    })
    .to_string()
}

async fn start(expo: &MockExpo, plugins_toml: &str) -> (Relay, AppClient, Vapid, reqwest::Client) {
    let cfg = RelayConfig::new()
        .fast_queue()
        .limits(NO_LIMITS)
        .expo("expo", &expo.url(), None, "")
        .extra(plugins_toml);
    let relay = Relay::start(cfg).await;
    let app = relay.app();
    (relay, app, Vapid::generate(), reqwest::Client::new())
}

async fn register(app: &AppClient, tok: &str, instance: &str, vapid: &Vapid, allow_decrypt: bool) -> Registration {
    let reg = app.register_ok("expo", tok, instance, Some(&vapid.public_key_b64()), Some(allow_decrypt)).await;
    assert!(reg.confirmed, "{}", reg.raw);
    reg
}

fn toml_path(p: &Path) -> String {
    p.display().to_string().replace('\\', "\\\\")
}

#[tokio::test]
async fn spam_is_dropped_and_the_rest_delivered() {
    let expo = MockExpo::start().await;
    let plugins = format!(
        "[[plugins]]\nname = \"keywords\"\npath = \"{}\"\nsee_payload = true\nconfig = {{ words = [\"casino\"] }}\n",
        toml_path(&wasm("keyword_filter"))
    );
    let (relay, app, vapid, http) = start(&expo, &plugins).await;
    let tok = token("kw");
    let reg = register(&app, &tok, "mastodon.example", &vapid, true).await;

    let spam = reg.push(Style::Mastodon, &vapid).payload(payload("Win big at the Casino", "click here")).send(&http).await;
    assert_eq!(spam.status, 201, "a dropped push still answers 201 (the instance must keep the subscription): {}", spam.body);
    let normal = reg.push(Style::Mastodon, &vapid).payload(payload("Bob mentioned you", "lunch?")).send(&http).await;
    assert_eq!(normal.status, 201, "{}", normal.body);

    let msgs = expo.wait_for_token(&tok, 1, Duration::from_secs(10)).await;
    assert_eq!(msgs[0].message["title"], "Bob mentioned you");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(expo.messages_for(&tok).len(), 1, "the spam must not reach the provider");

    let m = relay.metrics().await;
    assert_eq!(metric(&m, "push_relay_plugin_verdicts_total", &[("plugin", "keywords"), ("verdict", "drop")]), 1.0, "{m}");
    assert_eq!(metric(&m, "push_relay_plugin_verdicts_total", &[("plugin", "keywords"), ("verdict", "deliver")]), 1.0);
    assert_eq!(metric(&m, "push_relay_messages_dropped_total", &[("reason", "plugin")]), 1.0);
    assert!(!relay.log().contains("SECRET-ACCESS-TOKEN"));
}

#[tokio::test]
async fn payload_hidden_without_see_payload_and_in_opaque_mode() {
    let expo = MockExpo::start().await;
    let plugins = format!(
        "[[plugins]]\nname = \"keywords\"\npath = \"{}\"\nconfig = {{ words = [\"casino\"] }}\n",
        toml_path(&wasm("keyword_filter"))
    );
    let (_relay, app, vapid, http) = start(&expo, &plugins).await;
    let tok = token("hidden");
    let reg = register(&app, &tok, "mastodon.example", &vapid, true).await;
    let r = reg.push(Style::Mastodon, &vapid).payload(payload("casino", "casino")).send(&http).await;
    assert_eq!(r.status, 201);
    expo.wait_for_token(&tok, 1, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn plugins_apply_only_to_their_instances() {
    let expo = MockExpo::start().await;
    let plugins = format!(
        "[[plugins]]\nname = \"keywords\"\npath = \"{}\"\ninstances = [\"spam.example\"]\nsee_payload = true\n\
         config = {{ words = [\"casino\"] }}\n",
        toml_path(&wasm("keyword_filter"))
    );
    let (relay, app, vapid, http) = start(&expo, &plugins).await;
    let (tok_spam, tok_ok) = (token("spamhost"), token("okhost"));
    let on_spam = register(&app, &tok_spam, "spam.example", &vapid, true).await;
    let on_ok = register(&app, &tok_ok, "mastodon.example", &vapid, true).await;
    for reg in [&on_spam, &on_ok] {
        let r = reg.push(Style::Mastodon, &vapid).payload(payload("casino night", "")).send(&http).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    expo.wait_for_token(&tok_ok, 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(expo.messages_for(&tok_spam).is_empty(), "spam.example's push is filtered");
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "push_relay_plugin_verdicts_total", &[("plugin", "keywords")]), 1.0, "only spam.example went through it");
}

#[tokio::test]
async fn missing_plugin_file_refuses_start() {
    let out = {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("push-relay.toml");
        std::fs::write(&cfg, "[[plugins]]\nname = \"x\"\npath = \"nope.wasm\"\n").unwrap();
        run_cli(&["check-config", "--config", cfg.to_str().unwrap()])
    };
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("push-relay.toml:3") && err.contains("plugins[0].path") && err.contains("nope.wasm"), "{err}");
}

#[tokio::test]
async fn invalid_wasm_refuses_start() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm at all").unwrap();
    let cfg = dir.path().join("push-relay.toml");
    let port = free_port();
    std::fs::write(
        &cfg,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[store]\nurl = \"sqlite://{}/r.db\"\n[[plugins]]\nname = \"junk\"\npath = \"junk.wasm\"\n", toml_path(dir.path())),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || run_cli(&["serve", "--config", cfg.to_str().unwrap()])).await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("plugin `junk`") && err.contains("not a valid WebAssembly component"), "{err}");
}

#[tokio::test]
async fn plugin_test_cli() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("n.json");
    std::fs::write(
        &input,
        r#"{"instance": "mastodon.social", "urgency": "high", "ttl": 60, "body_size": 100,
            "payload": {"title": "casino", "body": "", "notification_type": "mention"}}"#,
    )
    .unwrap();
    let wasm = wasm("keyword_filter");
    let out = run_cli(&["plugin", "test", wasm.to_str().unwrap(), "--input", input.to_str().unwrap(), "--config", r#"{"words":["casino"]}"#, "--repeat", "500"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("verdict: drop (\"title contains \\\"casino\\\"\")"), "{stdout}");
    assert!(stdout.contains("fuel used: ") && stdout.contains("time: ") && stdout.contains("logs:"), "{stdout}");
    assert!(stdout.contains("warm calls: 500"), "{stdout}");
}

/// Replace the plugin's file with a different version while pushes flow:
/// every push is answered 201, every one is either delivered or counted as
/// dropped by the plugin, and the new behaviour takes over.
#[tokio::test]
async fn hot_reload_under_traffic() {
    let expo = MockExpo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("filter.wasm");
    // v1: hostile in its well-behaved mode (delivers everything; ignores per_minute).
    std::fs::copy(wasm("hostile"), &path).unwrap();
    let plugins = format!("[[plugins]]\nname = \"swap\"\npath = \"{}\"\nconfig = {{ per_minute = 3 }}\n", toml_path(&path));
    let (relay, app, vapid, http) = start(&expo, &plugins).await;
    let tok = token("reload");
    let reg = register(&app, &tok, "mastodon.example", &vapid, false).await;

    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (reg, vapid, http, stop) = (reg.clone(), vapid.clone(), http.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let r = reg.push(Style::Mastodon, &vapid).payload(format!("message {sent}")).send(&http).await;
                assert_eq!(r.status, 201, "push {sent} answered {} {}", r.status, r.body);
                sent += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    // v2: rate-filter, at most 3 pushes a minute to one registration. Atomic replace.
    let tmp = dir.path().join("filter.wasm.new");
    std::fs::copy(wasm("rate_filter"), &tmp).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = relay.metrics().await;
        if metric(&m, "push_relay_plugin_verdicts_total", &[("plugin", "swap"), ("verdict", "drop")]) >= 10.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the new version never took over: {}", relay.log_tail(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sender.await.unwrap();

    let m = relay.metrics().await;
    let dropped = metric(&m, "push_relay_messages_dropped_total", &[("reason", "plugin")]) as usize;
    let delivered = sent as usize - dropped;
    expo.wait_for_token(&tok, delivered, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(expo.messages_for(&tok).len(), delivered, "sent {sent}, dropped {dropped}: none lost, none extra");
    assert!(relay.log().contains("plugin reloaded"), "{}", relay.log_tail(30));
    assert_eq!(metric(&m, "push_relay_plugin_failures_total", &[]), 0.0, "{m}");
    println!("hot reload under traffic: {sent} pushes, {delivered} delivered, {dropped} dropped by the new version");
}
