//! The relay under test: its config, its process, its store, its memory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The built-in relay config. Limits are raised far above anything the
/// bench sends so they never interfere; receipts are checked a day later
/// (never during a run). Placeholders: @PORT@, @STORE_URL@, @SINK_URL@, @DIR@.
pub fn default_config_template(queue_lines: &[String], log_level: &str) -> String {
    let mut queue = String::new();
    for l in queue_lines {
        queue += l;
        queue.push('\n');
    }
    format!(
        r#"[server]
listen = "127.0.0.1:@PORT@"
public_url = "http://127.0.0.1:@PORT@"
log_format = "text"
log_level = "{log_level}"

[store]
url = "@STORE_URL@"

[queue]
{queue}
[limits]
per_instance = {{ per_second = 1000000000, burst = 1000000000 }}
per_registration = {{ per_second = 1000000000, burst = 1000000000 }}
registrations_per_ip = {{ per_second = 1000000000, burst = 1000000000 }}

[providers.expo]
kind = "expo"
base_url = "@SINK_URL@"
receipt_delay_secs = 86400
"#
    )
}

/// The `push-relay` binary: `explicit`, else `$PUSH_RELAY_BIN`, else
/// `push-relay` next to the running executable (or one directory up, for
/// test executables in `target/<profile>/deps/`).
pub fn relay_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("--relay-bin {} does not exist", p.display());
        }
        return Ok(p.to_path_buf());
    }
    if let Ok(p) = std::env::var("PUSH_RELAY_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("PUSH_RELAY_BIN={} does not exist", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe.parent().context("exe dir")?;
    let candidates = [dir.join("push-relay"), dir.join("../push-relay")];
    for c in &candidates {
        if c.is_file() {
            return Ok(c.canonicalize().unwrap_or_else(|_| c.clone()));
        }
    }
    bail!(
        "push-relay binary not found at {} — build it first (cargo build --release -p push-relay), or pass --relay-bin",
        candidates[0].display()
    )
}

/// A `push-relay serve` child process with its own directory (config, log,
/// SQLite store). Stopped by [`stop`](Self::stop) or killed on drop.
pub struct RelayProcess {
    dir: Option<tempfile::TempDir>,
    kept_dir: Option<PathBuf>,
    port: u16,
    child: Option<Child>,
    pub store_url: String,
}

impl RelayProcess {
    pub async fn start(bin: &Path, template: &str, store_url: Option<&str>, sink_url: &str, keep_dir: bool) -> Result<RelayProcess> {
        let dir = tempfile::Builder::new().prefix("push-relay-bench-").tempdir()?;
        let port = push_relay_e2e::free_port();
        let dir_s = dir.path().to_str().context("utf-8 tempdir")?.to_string();
        let store_url = store_url.map(str::to_string).unwrap_or_else(|| format!("sqlite://{dir_s}/relay.db"));
        let text = template
            .replace("@PORT@", &port.to_string())
            .replace("@STORE_URL@", &store_url)
            .replace("@SINK_URL@", sink_url)
            .replace("@DIR@", &dir_s);
        let config = dir.path().join("push-relay.toml");
        std::fs::write(&config, text)?;
        let log = std::fs::File::create(dir.path().join("relay.log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let (dir, kept_dir) = if keep_dir { (None, Some(dir.keep())) } else { (Some(dir), None) };
        let mut r = RelayProcess { dir, kept_dir, port, child: Some(child), store_url };
        r.wait_healthy(Duration::from_secs(60)).await?;
        Ok(r)
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).or(self.kept_dir.as_deref()).unwrap()
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.dir().join("relay.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let url = format!("{}/healthz", self.base_url());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                bail!("push-relay exited at start ({st}); log:\n{}", self.log_tail(40));
            }
            if let Ok(r) = client.get(&url).send().await {
                if r.status().as_u16() == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!("push-relay not healthy after {timeout:?}; log:\n{}", self.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, up to 10 s, then SIGKILL.
    pub async fn stop(&mut self) {
        let Some(child) = self.child.as_mut() else { return };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        self.child = None;
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A fresh PostgreSQL database for one run.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
    admin: String,
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connect to PostgreSQL at {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

impl PgDatabase {
    pub async fn create(admin_url: &str) -> Result<PgDatabase> {
        let client = pg_connect(admin_url).await?;
        let name = format!("push_relay_bench_{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.with_context(|| format!("CREATE DATABASE {name}"))?;
        Ok(PgDatabase { url: push_relay_e2e::postgres::with_database(admin_url, &name), name, admin: admin_url.to_string() })
    }

    pub async fn drop_db(self) {
        if let Ok(client) = pg_connect(&self.admin).await {
            let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await;
        }
    }
}

/// Samples `/proc/<pid>/status` every 100 ms: the kernel's own peak
/// (`VmHWM`) and the largest `VmRSS` seen since the last reset (the load
/// phase alone, excluding registration and preload).
pub struct RssSampler {
    pid: u32,
    hwm: Arc<AtomicU64>,
    load_max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// `(VmHWM, VmRSS)` in kB.
pub fn read_rss(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let hwm = Arc::new(AtomicU64::new(0));
        let load_max = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, m, s) = (hwm.clone(), load_max.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Some((hw, rss)) = read_rss(pid) {
                    h.fetch_max(hw, Ordering::Relaxed);
                    m.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        RssSampler { pid, hwm, load_max, stop, task }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `(VmHWM, VmRSS)` now (0 when unreadable).
    pub fn current(&self) -> (u64, u64) {
        read_rss(self.pid).unwrap_or((0, 0))
    }

    pub fn reset_load_max(&self) {
        self.load_max.store(self.current().1, Ordering::Relaxed);
    }

    pub fn load_max(&self) -> u64 {
        self.load_max.load(Ordering::Relaxed).max(self.current().1)
    }

    /// Stop sampling; `(peak VmHWM, largest sampled VmRSS since reset)`.
    pub async fn stop(&self) -> (u64, u64) {
        if let Some((hw, rss)) = read_rss(self.pid) {
            self.hwm.fetch_max(hw, Ordering::Relaxed);
            self.load_max.fetch_max(rss, Ordering::Relaxed);
        }
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
        (self.hwm.load(Ordering::Relaxed), self.load_max.load(Ordering::Relaxed))
    }
}

/// CPU time (user + system) a process has used so far, in seconds
/// (`/proc/<pid>/stat` fields 14 and 15; `pid` 0 = this process).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let path = if pid == 0 { "/proc/self/stat".to_string() } else { format!("/proc/{pid}/stat") };
    let s = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces: split after its ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}
