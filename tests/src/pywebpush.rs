//! An INDEPENDENT Web Push sender: `tests/py/send.py`, built on the PyPI
//! package `pywebpush` (install: `pip install -r tests/py/requirements.txt`).
//!
//! What pywebpush 2.x sends (read from its source, py_vapid `Vapid02`):
//! * `aes128gcm`: `Content-Encoding: aes128gcm`, `ttl: N`,
//!   `Authorization: vapid t=<jwt>,k=<key>` (no space after the comma),
//!   no `Content-Type`; salt and sender key inside the body.
//! * `aesgcm`: `Content-Encoding: aesgcm`, `encryption: salt=<b64url>`,
//!   `crypto-key: dh=<b64url>` (no `p256ecdsa` there: Vapid02 puts the key in
//!   `Authorization: vapid t=…,k=…`), `ttl: N`.
//! * JWT: ES256 with JOSE `r||s` signature, `aud` = `scheme://netloc` of the
//!   endpoint (so the port is kept when present), `exp` = now + 12 h, `sub`
//!   from the claims (`mailto:test@example.org`).
//!
//! A missing `python3` or `pywebpush` is a loud failure, never a skip.
//! `$PUSH_RELAY_PYTHON` overrides the interpreter.

use crate::webpush::{b64url, Vapid};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Path of `tests/py/send.py`.
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join("send.py")
}

fn python() -> String {
    std::env::var("PUSH_RELAY_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A VAPID key saved as a PEM file for pywebpush, with its public key.
pub struct VapidPem {
    /// The PEM file (SEC1 `EC PRIVATE KEY`).
    pub path: PathBuf,
    /// The 65-byte public key, base64url (what the instance publishes; the
    /// app confirms its registration with it).
    pub public_key_b64: String,
    /// The same key, for signing with our own sender too.
    pub vapid: Vapid,
}

impl VapidPem {
    /// Generate a key and write it to `dir/<file_name>`.
    pub fn generate(dir: &Path, file_name: &str) -> VapidPem {
        let vapid = Vapid::generate();
        let path = dir.join(file_name);
        vapid.write_pem(&path);
        let public_key_b64 = pem_public_key_b64(&path);
        assert_eq!(public_key_b64, vapid.public_key_b64());
        VapidPem { path, public_key_b64, vapid }
    }
}

/// The 65-byte uncompressed public key of a PEM private key file, as base64url
/// (computed with openssl from the file).
pub fn pem_public_key_b64(pem_path: &Path) -> String {
    let pem = std::fs::read(pem_path).unwrap_or_else(|e| panic!("read {}: {e}", pem_path.display()));
    b64url(&Vapid::from_pem(&pem).public_key())
}

/// Send one push with pywebpush. `encoding` is `"aes128gcm"` or `"aesgcm"`;
/// `p256dh`/`auth` in any base64 form. Returns the HTTP status and the
/// script's JSON: `{"status", "headers", "body", "request_headers"}`.
///
/// Async (runs the script with tokio) so that a server in the same runtime
/// can answer it.
pub async fn send(
    endpoint: &str,
    p256dh: &str,
    auth: &str,
    payload: &str,
    encoding: &str,
    ttl: u64,
    vapid_pem_path: &Path,
) -> (u16, Value) {
    send_with_headers(endpoint, p256dh, auth, payload, encoding, ttl, vapid_pem_path, &[]).await
}

/// [`send`] with extra request headers (`("Urgency", "high")`, `("Topic", "x")`).
#[allow(clippy::too_many_arguments)]
pub async fn send_with_headers(
    endpoint: &str,
    p256dh: &str,
    auth: &str,
    payload: &str,
    encoding: &str,
    ttl: u64,
    vapid_pem_path: &Path,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let script = script_path();
    let mut cmd = tokio::process::Command::new(python());
    // `--name=value`: a base64url value may begin with `-`, which argparse
    // would otherwise take for an option.
    cmd.arg(&script)
        .arg(format!("--endpoint={endpoint}"))
        .arg(format!("--p256dh={p256dh}"))
        .arg(format!("--auth={auth}"))
        .arg(format!("--payload={payload}"))
        .arg(format!("--encoding={encoding}"))
        .arg(format!("--ttl={ttl}"))
        .arg(format!("--vapid-key={}", vapid_pem_path.display()));
    for (k, v) in headers {
        cmd.arg(format!("--header={k}: {v}"));
    }
    let out = match cmd.stdin(std::process::Stdio::null()).output().await {
        Ok(o) => o,
        Err(e) => panic!("cannot run {} {}: {e} — install Python 3 and `pip install pywebpush`", python(), script.display()),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(0) => {}
        Some(3) => panic!("pywebpush is missing: {stderr}\nInstall it: pip install -r tests/py/requirements.txt"),
        code => panic!("send.py failed ({code:?}) for {endpoint}\nstdout: {stdout}\nstderr: {stderr}"),
    }
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("send.py printed no JSON ({e}):\nstdout: {stdout}\nstderr: {stderr}"));
    let status = v["status"].as_u64().unwrap_or_else(|| panic!("send.py JSON has no status: {v}")) as u16;
    (status, v)
}
