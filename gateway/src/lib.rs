//! push-relay's gateway: the server that takes Web Push from Fediverse
//! instances and delivers it to phones through Expo (and, later, APNs and
//! FCM).
//!
//! ```text
//! instance ──POST /push/{id}──▶ api::ingress ──▶ store (queue) ──▶ dispatch ──▶ provider ──▶ phone
//!                               parse, VAPID,     durable, 201      claim,        Expo
//!                               limits, decrypt?  after commit      batch, retry
//! ```
//!
//! Modules: [`api`] (HTTP routes), [`webpush`] (header parsing, VAPID,
//! encryption), [`store`] (SQLite and PostgreSQL), [`dispatch`] (delivery
//! workers), [`limits`], [`metrics`], [`keys`].

pub mod api;
pub mod dispatch;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod store;
pub mod webpush;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use push_relay_config::Config;

/// Sets up `tracing` as configured: text or JSON lines on stderr, filtered
/// by `log_level` (or `RUST_LOG` when set).
pub fn init_logging(server: &push_relay_config::Server) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&server.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match server.log_format {
        push_relay_config::LogFormat::Json => builder.json().try_init(),
        push_relay_config::LogFormat::Text => builder.try_init(),
    };
}

/// Runs the relay until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    // Providers first: a bad key file is reported before anything is opened.
    let providers = build_providers(&config)?;
    let store = store::open(&config.store).await.context("cannot open the store")?;
    let metrics = Arc::new(metrics::Metrics::new());
    let dispatcher = dispatch::Dispatcher::new(store.clone(), providers.clone(), metrics.clone(), config.queue.clone());
    dispatcher.spawn();

    let plugins = start_plugins(&config, metrics.clone()).await?;

    let endpoint_base = config.server.endpoint_base();
    let origin = config.server.public_url.origin().ascii_serialization();
    let app = Arc::new(api::App {
        store,
        providers,
        limits: limits::Limits::new(&config.limits),
        metrics,
        dispatcher: dispatcher.clone(),
        endpoint_base,
        origin,
        queue: config.queue.clone(),
        registration_key: config.server.registration_key.clone(),
        trust_forwarded_for: config.server.trust_forwarded_for,
        inflight: tokio::sync::Semaphore::new(api::MAX_INFLIGHT_PUSHES),
        plugins,
    });
    {
        let app = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                app.limits.forget_idle();
            }
        });
    }

    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    tracing::info!(
        listen = %config.server.listen,
        public_url = %config.server.public_url,
        store = store_kind(&config.store.url),
        providers = ?config.providers.keys().collect::<Vec<_>>(),
        "push-relay is listening"
    );
    warp::serve(api::routes(app)).incoming(listener).graceful(shutdown_signal()).run().await;
    dispatcher.shutdown().await;
    tracing::info!("push-relay stopped");
    Ok(())
}

/// Builds every configured provider; the first that cannot be built (an
/// unreadable or wrong key, say) is the error. `check-config` uses this too.
pub fn build_providers(config: &Config) -> anyhow::Result<HashMap<String, Arc<dyn push_relay_providers::Provider>>> {
    let mut providers = HashMap::new();
    for (name, provider) in &config.providers {
        providers.insert(name.clone(), push_relay_providers::build(name, provider)?);
    }
    Ok(providers)
}

/// Loads the `[[plugins]]` (compiling them off the runtime's workers) and
/// starts their reloader: every second the files are checked for changes,
/// and `SIGHUP` reloads whatever changed at once. A plugin that cannot be
/// loaded refuses the start; a new version that cannot be loaded leaves the
/// old one running.
async fn start_plugins(
    config: &Config,
    metrics: Arc<metrics::Metrics>,
) -> anyhow::Result<Option<Arc<push_relay_plugins::PluginHost>>> {
    if config.plugins.is_empty() {
        return Ok(None);
    }
    let (plugins, limits) = (config.plugins.clone(), config.plugin_limits.clone());
    let options = push_relay_plugins::HostOptions { observer: metrics, ..Default::default() };
    let host = tokio::task::spawn_blocking(move || push_relay_plugins::PluginHost::new(&plugins, &limits, options))
        .await
        .context("plugin loading panicked")?
        .context("cannot load the plugins")?;
    let host = Arc::new(host);
    tracing::info!(plugins = ?host.names(), "plugins loaded");
    let reloader = host.clone();
    tokio::spawn(async move {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading plugins");
                    true
                }
            };
            let host = reloader.clone();
            let _ = tokio::task::spawn_blocking(move || host.reload(force)).await;
        }
    });
    Ok(Some(host))
}

fn store_kind(url: &push_relay_config::StoreUrl) -> &'static str {
    match url {
        push_relay_config::StoreUrl::Sqlite(_) => "sqlite",
        push_relay_config::StoreUrl::Postgres(_) => "postgres",
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}
