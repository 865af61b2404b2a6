//! `Relay`: runs the real `push-relay` binary as a child process.
//!
//! The binary is `$PUSH_RELAY_BIN` if set, else `<dir of the test exe>/../push-relay`
//! (test executables live in `target/<profile>/deps/`). Build it first:
//! `cargo build -p push-relay`.
//!
//! Each `Relay` owns a temporary directory holding its config
//! (`push-relay.toml`), its log (`relay.log`, stdout and stderr appended) and,
//! by default, its SQLite store (`relay.db`). Placeholders in any config text:
//! `@DIR@` → that directory, `@PORT@` → the listen port.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the `push-relay` binary under test (panics when it is missing).
pub fn push_relay_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PUSH_RELAY_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "PUSH_RELAY_BIN={} does not exist; build it first: cargo build -p push-relay", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    // target/debug/deps/<test> → target/debug/push-relay
    let candidates = [dir.join("../push-relay"), dir.join("push-relay")];
    for c in &candidates {
        if c.is_file() {
            return c.canonicalize().unwrap_or_else(|_| c.clone());
        }
    }
    panic!(
        "push-relay binary not found at {} — build it first: cargo build -p push-relay (or set PUSH_RELAY_BIN)",
        candidates[0].display()
    );
}

/// Run the binary with arguments to completion (e.g. `check-config`,
/// `plugin test`) and return its output. Blocking; fine for short commands.
pub fn run_cli(args: &[&str]) -> std::process::Output {
    Command::new(push_relay_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run push-relay")
}

/// A free TCP port on 127.0.0.1 (bind to :0, read it, drop the socket).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// The TOML config of one relay, built from parts. The `[server]` table
/// (listen address, public URL, log settings) is generated.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// `[store] url`; `None` → `sqlite://@DIR@/relay.db`.
    pub store_url: Option<String>,
    /// Extra lines inside `[server]` (e.g. an operator key).
    pub server_toml: String,
    /// Lines inside `[queue]` (table omitted when empty).
    pub queue_toml: String,
    /// Lines inside `[limits]` (table omitted when empty).
    pub limits_toml: String,
    /// Full `[providers.NAME]` tables.
    pub providers_toml: String,
    /// Anything else, appended verbatim (full tables, e.g. `[[plugins]]`).
    pub extra_toml: String,
    /// `[server] log_format`, default `"text"`.
    pub log_format: String,
    /// `[server] log_level`, default `"info"`.
    pub log_level: String,
    /// Environment variables for the process (for `${VAR}` in the config).
    pub env: Vec<(String, String)>,
    /// Fixed port; `None` picks a free one at start.
    pub port: Option<u16>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            store_url: None,
            server_toml: String::new(),
            queue_toml: String::new(),
            limits_toml: String::new(),
            providers_toml: String::new(),
            extra_toml: String::new(),
            log_format: "text".into(),
            log_level: "info".into(),
            env: vec![],
            port: None,
        }
    }
}

/// A `[providers.NAME]` table of kind `expo` pointing at `base_url`
/// (usually a [`crate::MockExpo`]'s `url()`), with optional access token and
/// extra lines such as `receipt_delay_secs = 1`.
pub fn expo_provider_toml(name: &str, base_url: &str, access_token: Option<&str>, extra_lines: &str) -> String {
    let mut s = format!("[providers.{name}]\nkind = \"expo\"\nbase_url = \"{base_url}\"\n");
    if let Some(t) = access_token {
        s += &format!("access_token = \"{t}\"\n");
    }
    s += extra_lines;
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

impl RelayConfig {
    /// Defaults: SQLite store in the relay's dir, no providers.
    pub fn new() -> Self {
        Self::default()
    }
    /// Use this store URL (e.g. from [`crate::postgres::fresh_database`]).
    pub fn store(mut self, url: &str) -> Self {
        self.store_url = Some(url.into());
        self
    }
    /// Append provider tables.
    pub fn providers(mut self, toml: &str) -> Self {
        self.providers_toml += toml;
        self.providers_toml += "\n";
        self
    }
    /// Add an Expo provider `name` pointing at `base_url` (see [`expo_provider_toml`]).
    pub fn expo(self, name: &str, base_url: &str, access_token: Option<&str>, extra_lines: &str) -> Self {
        let t = expo_provider_toml(name, base_url, access_token, extra_lines);
        self.providers(&t)
    }
    /// Lines for `[queue]`.
    pub fn queue(mut self, lines: &str) -> Self {
        self.queue_toml += lines;
        self.queue_toml += "\n";
        self
    }
    /// A fast queue for tests: 50 ms polling, 100 ms base retry, 2 s max retry, 5 s lease.
    pub fn fast_queue(self) -> Self {
        self.queue("poll_interval_ms = 50\nretry_base_ms = 100\nretry_max_secs = 2\nlease_secs = 5")
    }
    /// Lines for `[limits]`.
    pub fn limits(mut self, lines: &str) -> Self {
        self.limits_toml += lines;
        self.limits_toml += "\n";
        self
    }
    /// Extra lines inside `[server]`.
    pub fn server(mut self, lines: &str) -> Self {
        self.server_toml += lines;
        self.server_toml += "\n";
        self
    }
    /// Append any TOML verbatim.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra_toml += toml;
        self.extra_toml += "\n";
        self
    }
    /// `log_format = "json"`.
    pub fn json_logs(mut self) -> Self {
        self.log_format = "json".into();
        self
    }
    /// `[server] log_level`.
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.into();
        self
    }
    /// Set an environment variable for the process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    /// Listen on this port instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The config text, with `@PORT@` and `@DIR@` still unresolved.
    pub fn render(&self) -> String {
        let mut s = format!(
            "[server]\nlisten = \"127.0.0.1:@PORT@\"\npublic_url = \"http://127.0.0.1:@PORT@\"\nlog_format = \"{}\"\nlog_level = \"{}\"\n{}\n",
            self.log_format, self.log_level, self.server_toml
        );
        let store = self.store_url.clone().unwrap_or_else(|| "sqlite://@DIR@/relay.db".into());
        s += &format!("[store]\nurl = \"{store}\"\n\n");
        if !self.queue_toml.trim().is_empty() {
            s += &format!("[queue]\n{}\n", self.queue_toml);
        }
        if !self.limits_toml.trim().is_empty() {
            s += &format!("[limits]\n{}\n", self.limits_toml);
        }
        s += &self.providers_toml;
        s += "\n";
        s += &self.extra_toml;
        s
    }
}

/// A running `push-relay serve` process. Dropping it kills the process
/// (SIGKILL) and removes its directory.
pub struct Relay {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Relay {
    /// Write the config, start the process and wait until `GET /healthz` is 200
    /// (20 s max). Panics with the log's tail when it does not come up.
    pub async fn start(config: RelayConfig) -> Relay {
        match Self::try_start(config).await {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`start`](Self::start) but returns the failure (with the log's
    /// tail) instead of panicking — for tests of configs the relay must refuse.
    pub async fn try_start(config: RelayConfig) -> Result<Relay, String> {
        let port = config.port.unwrap_or_else(free_port);
        Self::try_start_toml(&config.render(), port, config.env.clone()).await
    }

    /// Start with a hand-written config (`@PORT@`/`@DIR@` substituted).
    pub async fn try_start_toml(toml: &str, port: u16, env: Vec<(String, String)>) -> Result<Relay, String> {
        let dir = tempfile::Builder::new().prefix("push-relay-e2e-").tempdir().expect("tempdir");
        let text = toml
            .replace("@PORT@", &port.to_string())
            .replace("@DIR@", dir.path().to_str().expect("utf-8 tempdir"));
        let config_path = dir.path().join("push-relay.toml");
        std::fs::write(&config_path, text).expect("write config");
        let mut relay = Relay { dir, config_path, port, env, child: None };
        relay.spawn()?;
        relay.wait_healthy(Duration::from_secs(20)).await?;
        Ok(relay)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open relay.log");
        let mut cmd = Command::new(push_relay_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(|e| format!("spawn {}: {e}", push_relay_bin().display()))?;
        self.child = Some(child);
        Ok(())
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let url = format!("{}/healthz", self.base_url());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "push-relay exited before becoming healthy ({status}); log tail:\n{}",
                        self.log_tail(60)
                    ));
                }
            }
            if let Ok(resp) = client.get(&url).send().await {
                if resp.status().as_u16() == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let _ = self.kill_child();
                return Err(format!(
                    "push-relay not healthy at {url} after {timeout:?}; log tail:\n{}",
                    self.log_tail(60)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kill_child(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill(); // SIGKILL on Unix
        child.wait().ok()
    }

    /// `http://127.0.0.1:PORT` (also the configured `public_url`).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The listen port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The relay's own directory (config, log, SQLite store).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file path.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("relay.log")
    }

    /// The whole log so far (stdout + stderr of every run of this relay).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Kill the process with SIGKILL (no shutdown path runs) and wait for it.
    pub fn kill9(&mut self) {
        assert!(self.child.is_some(), "kill9: relay is not running");
        self.kill_child();
    }

    /// Send a signal by name (`"TERM"`, `"HUP"`, ...) via `kill(1)`.
    pub fn signal(&self, name: &str) {
        let pid = self.pid().expect("signal: relay is not running");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -{name} {pid} failed");
    }

    /// Graceful stop: SIGTERM, wait up to 10 s, then SIGKILL. Returns the exit
    /// status (None if it had to be killed).
    pub async fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_ref()?;
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                self.child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill_child();
        None
    }

    /// Start again with the same config, directory and port (after
    /// [`kill9`](Self::kill9) or [`stop`](Self::stop); kills a running one
    /// first) and wait until healthy.
    pub async fn restart(&mut self) {
        self.kill_child();
        // The port was ours a moment ago; retry briefly in case the OS holds it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpListener::bind(("127.0.0.1", self.port)).is_err() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Err(e) = self.spawn() {
            panic!("restart: {e}");
        }
        if let Err(e) = self.wait_healthy(Duration::from_secs(20)).await {
            panic!("restart: {e}");
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `GET /metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.base_url()))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .unwrap_or_default()
    }

    /// An [`crate::AppClient`] for this relay.
    pub fn app(&self) -> crate::AppClient {
        crate::AppClient::new(&self.base_url())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill_child();
        if std::thread::panicking() {
            eprintln!("--- push-relay log tail ({}) ---\n{}", self.dir.path().display(), self.log_tail(40));
        }
    }
}
