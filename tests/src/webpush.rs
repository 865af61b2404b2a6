//! An instance-side Web Push sender of our own, plus the app-side decryption
//! used to assert what a device finally receives.
//!
//! * [`Vapid`]: an RFC 8292 VAPID key (P-256) and ES256 JWTs.
//! * [`encrypt_aes128gcm`] / [`encrypt_aesgcm`]: RFC 8291 and draft `aesgcm`
//!   encryption through the `ece` crate (openssl backend).
//! * [`PushRequest`]: builds the HTTP request an instance would send, in the
//!   header styles of the real senders ([`Style`]), with knobs to produce every
//!   malformed variant a test needs (bad JWT, wrong key, expired `exp`, wrong
//!   `aud`, missing headers, raw bodies...).
//! * [`Recipient`], [`decrypt_aes128gcm`], [`decrypt_aesgcm`]: the device side.
//!
//! This sender is *ours*; an independent one lives in [`crate::pywebpush`].

use base64::Engine;
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint, PointConversionForm};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::{Private, Public};
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// base64url without padding (the form the relay and Web Push use on output).
pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Decode any base64 form: standard or URL alphabet, padded or not.
/// Panics (with the input) when it is not base64 at all.
pub fn b64decode_any(s: &str) -> Vec<u8> {
    try_b64decode_any(s).unwrap_or_else(|| panic!("not base64 (any alphabet): {s:?}"))
}

/// Like [`b64decode_any`] but returns `None` instead of panicking.
pub fn try_b64decode_any(s: &str) -> Option<Vec<u8>> {
    let cleaned: String = s
        .trim()
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cleaned.as_bytes())
        .ok()
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs()
}

fn p256() -> EcGroup {
    EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256 group")
}

/// The origin (`scheme://host[:port]`) of a URL, as VAPID's `aud` wants it.
/// The port is dropped when it is the scheme's default.
pub fn origin_of(url: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .unwrap_or_else(|| panic!("not an absolute URL: {url:?}"));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = match (scheme, authority.rsplit_once(':')) {
        ("http", Some((host, "80"))) | ("https", Some((host, "443"))) => host.to_string(),
        _ => authority.to_string(),
    };
    format!("{scheme}://{authority}")
}

// ---------------------------------------------------------------------------
// VAPID
// ---------------------------------------------------------------------------

/// A VAPID signing key (P-256) of an instance.
#[derive(Clone)]
pub struct Vapid {
    key: EcKey<Private>,
}

impl Vapid {
    /// A fresh random P-256 key.
    pub fn generate() -> Vapid {
        Vapid {
            key: EcKey::generate(&p256()).expect("generate P-256 key"),
        }
    }

    /// Load a key from PEM (SEC1 `EC PRIVATE KEY` or PKCS#8 `PRIVATE KEY`).
    pub fn from_pem(pem: &[u8]) -> Vapid {
        if let Ok(key) = EcKey::private_key_from_pem(pem) {
            return Vapid { key };
        }
        let pkey = openssl::pkey::PKey::private_key_from_pem(pem).expect("parse PEM private key");
        Vapid {
            key: pkey.ec_key().expect("PEM key is not an EC key"),
        }
    }

    /// The private key as SEC1 PEM (`-----BEGIN EC PRIVATE KEY-----`).
    pub fn private_pem(&self) -> Vec<u8> {
        self.key.private_key_to_pem().expect("PEM encode")
    }

    /// Write the private key as PEM to `path` (for pywebpush).
    pub fn write_pem(&self, path: &std::path::Path) {
        std::fs::write(path, self.private_pem())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// The raw 32-byte private scalar.
    pub fn private_raw(&self) -> [u8; 32] {
        let v = self.key.private_key().to_vec_padded(32).expect("scalar");
        v.try_into().unwrap()
    }

    /// The 65-byte uncompressed public point.
    pub fn public_key(&self) -> Vec<u8> {
        let mut ctx = BigNumContext::new().unwrap();
        self.key
            .public_key()
            .to_bytes(&p256(), PointConversionForm::UNCOMPRESSED, &mut ctx)
            .expect("encode point")
    }

    /// The public key as base64url without padding (what instances publish
    /// and what the app passes as `server_key`).
    pub fn public_key_b64(&self) -> String {
        b64url(&self.public_key())
    }

    /// An ES256 JWT with claims `{"aud", "exp", "sub"?}`.
    pub fn jwt(&self, aud: &str, exp_unix: u64, sub: Option<&str>) -> String {
        let mut claims = json!({ "aud": aud, "exp": exp_unix });
        if let Some(sub) = sub {
            claims["sub"] = json!(sub);
        }
        self.jwt_with_claims(&claims)
    }

    /// An ES256 JWT over arbitrary claims (to build malformed tokens: missing
    /// `exp`, string `exp`, extra fields...). Header `{"typ":"JWT","alg":"ES256"}`.
    pub fn jwt_with_claims(&self, claims: &Value) -> String {
        self.jwt_with_header_and_claims(&json!({"typ": "JWT", "alg": "ES256"}), claims)
    }

    /// An ES256-signed JWT with an arbitrary header (e.g. `alg: none`, which
    /// the relay must still refuse because it is signed regardless).
    pub fn jwt_with_header_and_claims(&self, header: &Value, claims: &Value) -> String {
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = self.sign_es256(signing_input.as_bytes());
        format!("{signing_input}.{}", b64url(&sig))
    }

    /// ES256 signature in JOSE form: raw `r || s`, 64 bytes.
    pub fn sign_es256(&self, data: &[u8]) -> Vec<u8> {
        let digest = openssl::sha::sha256(data);
        let sig = EcdsaSig::sign(&digest, &self.key).expect("ECDSA sign");
        let mut out = sig.r().to_vec_padded(32).unwrap();
        out.extend(sig.s().to_vec_padded(32).unwrap());
        out
    }
}

/// Verify an ES256 JWT (JOSE `r||s` signature) against a 65-byte public key;
/// returns `(header, claims)` on success, a description of the failure otherwise.
/// Used to check what an independent sender (pywebpush) produced.
pub fn verify_jwt(jwt: &str, public_key: &[u8]) -> Result<(Value, Value), String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return Err(format!("JWT has {} parts, want 3", parts.len()));
    }
    let decode = |s: &str| try_b64decode_any(s).ok_or_else(|| format!("bad base64 in JWT: {s:?}"));
    let header: Value = serde_json::from_slice(&decode(parts[0])?).map_err(|e| e.to_string())?;
    let claims: Value = serde_json::from_slice(&decode(parts[1])?).map_err(|e| e.to_string())?;
    let sig = decode(parts[2])?;
    if sig.len() != 64 {
        return Err(format!("ES256 signature is {} bytes, want 64 (JOSE r||s)", sig.len()));
    }
    let group = p256();
    let mut ctx = BigNumContext::new().unwrap();
    let point = EcPoint::from_bytes(&group, public_key, &mut ctx).map_err(|e| e.to_string())?;
    let key: EcKey<Public> = EcKey::from_public_key(&group, &point).map_err(|e| e.to_string())?;
    let r = BigNum::from_slice(&sig[..32]).unwrap();
    let s = BigNum::from_slice(&sig[32..]).unwrap();
    let sig = EcdsaSig::from_private_components(r, s).unwrap();
    let signing_input = format!("{}.{}", parts[0], parts[1]);
    let digest = openssl::sha::sha256(signing_input.as_bytes());
    match sig.verify(&digest, &key) {
        Ok(true) => Ok((header, claims)),
        Ok(false) => Err("ES256 signature does not verify".into()),
        Err(e) => Err(format!("verify error: {e}")),
    }
}

// ---------------------------------------------------------------------------
// Encryption (sender side)
// ---------------------------------------------------------------------------

/// RFC 8291 `aes128gcm` encryption to a subscription (`p256dh`, `auth`).
/// Salt and the sender's ephemeral key are inside the returned body.
pub fn encrypt_aes128gcm(p256dh: &[u8], auth: &[u8], plaintext: &[u8]) -> Vec<u8> {
    ece::encrypt(p256dh, auth, plaintext).expect("ece aes128gcm encrypt")
}

/// Draft `aesgcm` encryption. Returns `(body, salt, dh)` where `salt` (16
/// bytes) goes into `Encryption: salt=…` and `dh` (the 65-byte ephemeral
/// sender key) into `Crypto-Key: dh=…`.
pub fn encrypt_aesgcm(p256dh: &[u8], auth: &[u8], plaintext: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let block = ece::legacy::encrypt_aesgcm(p256dh, auth, plaintext).expect("ece aesgcm encrypt");
    // The block's fields are crate-private; read them back through its
    // header/body encoders.
    let body = b64decode_any(&block.body());
    let mut salt = None;
    let mut dh = None;
    for (name, value) in block.headers(None) {
        for part in value.split(';') {
            let part = part.trim();
            match (name, part.split_once('=')) {
                ("Crypto-Key", Some(("dh", v))) => dh = Some(b64decode_any(v)),
                ("Encryption", Some(("salt", v))) => salt = Some(b64decode_any(v)),
                _ => {}
            }
        }
    }
    (
        body,
        salt.expect("ece gave no salt"),
        dh.expect("ece gave no dh"),
    )
}

// ---------------------------------------------------------------------------
// Decryption (device side)
// ---------------------------------------------------------------------------

/// Decrypt an `aes128gcm` body with the recipient's key pair and auth secret.
pub fn decrypt_aes128gcm(
    private_key: &[u8],
    public_key: &[u8],
    auth: &[u8],
    body: &[u8],
) -> Result<Vec<u8>, String> {
    let components = ece::EcKeyComponents::new(private_key.to_vec(), public_key.to_vec());
    ece::decrypt(&components, auth, body).map_err(|e| format!("aes128gcm decrypt: {e}"))
}

/// Decrypt an `aesgcm` body given the `salt` and `dh` from its headers
/// (record size 4096, the only one Web Push uses).
pub fn decrypt_aesgcm(
    private_key: &[u8],
    public_key: &[u8],
    auth: &[u8],
    body: &[u8],
    salt: &[u8],
    dh: &[u8],
) -> Result<Vec<u8>, String> {
    let components = ece::EcKeyComponents::new(private_key.to_vec(), public_key.to_vec());
    let block = ece::legacy::AesGcmEncryptedBlock::new(dh, salt, 4096, body.to_vec())
        .map_err(|e| format!("aesgcm block: {e}"))?;
    ece::legacy::decrypt_aesgcm(&components, auth, &block).map_err(|e| format!("aesgcm decrypt: {e}"))
}

/// A device-side subscription key set: what a browser (or the relay, for a
/// registration) would generate. Handy when a test plays the device itself.
#[derive(Clone, Debug)]
pub struct Recipient {
    /// Raw 32-byte private scalar.
    pub private_key: Vec<u8>,
    /// 65-byte uncompressed public point (`keys.p256dh`).
    pub public_key: Vec<u8>,
    /// 16-byte auth secret (`keys.auth`).
    pub auth: Vec<u8>,
}

impl Recipient {
    /// Fresh random keys.
    pub fn generate() -> Recipient {
        let key = EcKey::generate(&p256()).expect("generate P-256 key");
        let mut ctx = BigNumContext::new().unwrap();
        let public_key = key
            .public_key()
            .to_bytes(&p256(), PointConversionForm::UNCOMPRESSED, &mut ctx)
            .unwrap();
        let mut auth = vec![0u8; 16];
        openssl::rand::rand_bytes(&mut auth).unwrap();
        Recipient {
            private_key: key.private_key().to_vec_padded(32).unwrap(),
            public_key,
            auth,
        }
    }

    /// Decrypt an `aes128gcm` body.
    pub fn decrypt_aes128gcm(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        decrypt_aes128gcm(&self.private_key, &self.public_key, &self.auth, body)
    }

    /// Decrypt an `aesgcm` body.
    pub fn decrypt_aesgcm(&self, body: &[u8], salt: &[u8], dh: &[u8]) -> Result<Vec<u8>, String> {
        decrypt_aesgcm(&self.private_key, &self.public_key, &self.auth, body, salt, dh)
    }
}

/// Parse an `aesgcm` pair of headers: returns `(salt, dh)` from
/// `Encryption: salt=…` and `Crypto-Key: dh=…` (`;` or `,` separated,
/// optional quotes, any base64 form).
pub fn parse_aesgcm_headers(encryption: &str, crypto_key: &str) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    fn param(header: &str, name: &str) -> Option<Vec<u8>> {
        header.split([';', ',']).find_map(|p| {
            let (k, v) = p.trim().split_once('=')?;
            if k.trim().eq_ignore_ascii_case(name) {
                try_b64decode_any(v.trim().trim_matches('"'))
            } else {
                None
            }
        })
    }
    (param(encryption, "salt"), param(crypto_key, "dh"))
}

// ---------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------

/// A Mastodon-shaped Web Push payload (what Mastodon encrypts), including the
/// access token that must never leave the relay.
pub fn mastodon_payload(notification_id: u64, access_token: &str) -> String {
    json!({
        "access_token": access_token,
        "preferred_locale": "en",
        "notification_id": notification_id,
        "notification_type": "mention",
        "icon": "https://files.example.social/accounts/avatars/000/000/001/original/avatar.png",
        "title": "Bob mentioned you",
        "body": format!("@alice hello there, this is notification {notification_id}"),
    })
    .to_string()
}

// ---------------------------------------------------------------------------
// Request builder
// ---------------------------------------------------------------------------

/// How a real sender formats its request. The header spellings mirror each
/// implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Mastodon ≥ 4.3: `aes128gcm`, `Authorization: vapid t=JWT,k=KEY`,
    /// `Ttl`, `Content-Type: application/octet-stream`. Default TTL 48 h.
    Mastodon,
    /// Misskey (npm `web-push`): `aes128gcm`, `Authorization: vapid t=JWT, k=KEY`,
    /// `TTL`, `Content-Type: application/octet-stream`. Default TTL 4 weeks.
    Misskey,
    /// Pleroma/Akkoma (`web_push_encryption`): `aesgcm`, `Authorization: WebPush JWT`,
    /// `Crypto-Key: dh=…;p256ecdsa=…`, `Encryption: salt=…`, `TTL: 0` by default.
    PleromaAesgcm,
    /// Mastodon < 4.3 (webpush gem): `aesgcm`, `Crypto-Key: dh=…;p256ecdsa=…`,
    /// `Encryption: salt=…`, `Authorization: WebPush JWT`, `Ttl`,
    /// `Content-Type: application/octet-stream`. Default TTL 48 h.
    MastodonAesgcm,
}

impl Style {
    /// `"aes128gcm"` or `"aesgcm"`.
    pub fn encoding(self) -> &'static str {
        match self {
            Style::Mastodon | Style::Misskey => "aes128gcm",
            Style::PleromaAesgcm | Style::MastodonAesgcm => "aesgcm",
        }
    }

    fn default_ttl(self) -> Option<u64> {
        match self {
            Style::Mastodon | Style::MastodonAesgcm => Some(48 * 3600),
            Style::Misskey => Some(28 * 24 * 3600),
            Style::PleromaAesgcm => Some(0),
        }
    }
}

/// The request, fully prepared: headers in order and the body bytes.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// For `aesgcm`: the salt and sender key used (empty for `aes128gcm`).
    pub salt: Vec<u8>,
    pub dh: Vec<u8>,
}

impl Prepared {
    /// The value of a header (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Builder of one Web Push request to an endpoint, as an instance would send it.
///
/// Defaults: a valid request in the chosen [`Style`] — JWT with `aud` = the
/// endpoint's origin, `exp` = now + 12 h, `sub` = `mailto:test@example.org`,
/// the style's default TTL, no `Urgency`/`Topic`, payload `{"hello":"world"}`.
/// Every part can be overridden to build invalid requests.
#[derive(Clone)]
pub struct PushRequest {
    endpoint: String,
    style: Style,
    vapid: Option<Vapid>,
    p256dh: Vec<u8>,
    auth: Vec<u8>,
    payload: Vec<u8>,
    ttl: Option<u64>,
    urgency: Option<String>,
    topic: Option<String>,
    aud: Option<String>,
    exp: Option<u64>,
    sub: Option<String>,
    jwt: Option<String>,
    key: Option<String>,
    body: Option<Vec<u8>>,
    set_headers: Vec<(String, String)>,
    remove_headers: Vec<String>,
}

impl PushRequest {
    /// A valid request to `endpoint` for a subscription with keys
    /// `p256dh`/`auth`, signed by `vapid`.
    pub fn new(endpoint: &str, style: Style, vapid: &Vapid, p256dh: &[u8], auth: &[u8]) -> PushRequest {
        PushRequest {
            endpoint: endpoint.to_string(),
            style,
            vapid: Some(vapid.clone()),
            p256dh: p256dh.to_vec(),
            auth: auth.to_vec(),
            payload: br#"{"hello":"world"}"#.to_vec(),
            ttl: style.default_ttl(),
            urgency: None,
            topic: None,
            aud: None,
            exp: None,
            sub: Some("mailto:test@example.org".into()),
            jwt: None,
            key: None,
            body: None,
            set_headers: vec![],
            remove_headers: vec![],
        }
    }

    /// The plaintext to encrypt.
    pub fn payload(mut self, plaintext: impl AsRef<[u8]>) -> Self {
        self.payload = plaintext.as_ref().to_vec();
        self
    }
    /// `TTL` header value; `None` omits the header.
    pub fn ttl(mut self, ttl: Option<u64>) -> Self {
        self.ttl = ttl;
        self
    }
    /// `Urgency` header.
    pub fn urgency(mut self, urgency: &str) -> Self {
        self.urgency = Some(urgency.into());
        self
    }
    /// `Topic` header.
    pub fn topic(mut self, topic: &str) -> Self {
        self.topic = Some(topic.into());
        self
    }
    /// JWT `aud` (default: the endpoint's origin).
    pub fn aud(mut self, aud: &str) -> Self {
        self.aud = Some(aud.into());
        self
    }
    /// JWT `exp` as Unix seconds (default: now + 12 h).
    pub fn exp(mut self, exp_unix: u64) -> Self {
        self.exp = Some(exp_unix);
        self
    }
    /// JWT `sub` (`None` leaves it out).
    #[allow(clippy::should_implement_trait)]
    pub fn sub(mut self, sub: Option<&str>) -> Self {
        self.sub = sub.map(str::to_string);
        self
    }
    /// Use this exact JWT string instead of signing one.
    pub fn jwt(mut self, jwt: &str) -> Self {
        self.jwt = Some(jwt.into());
        self
    }
    /// Advertise this (base64) VAPID key instead of the signer's.
    pub fn vapid_key(mut self, key_b64: &str) -> Self {
        self.key = Some(key_b64.into());
        self
    }
    /// Send no VAPID at all (no `Authorization`, no `p256ecdsa`).
    pub fn no_vapid(mut self) -> Self {
        self.vapid = None;
        self
    }
    /// Send these bytes as the body instead of the encrypted payload (the
    /// encryption headers are still computed from a real encryption).
    pub fn raw_body(mut self, body: impl AsRef<[u8]>) -> Self {
        self.body = Some(body.as_ref().to_vec());
        self
    }
    /// Set (replace or add) a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.remove_headers.retain(|h| !h.eq_ignore_ascii_case(name));
        self.set_headers.retain(|(h, _)| !h.eq_ignore_ascii_case(name));
        self.set_headers.push((name.into(), value.into()));
        self
    }
    /// Remove a header the style would send (e.g. `Encryption`).
    pub fn without_header(mut self, name: &str) -> Self {
        self.set_headers.retain(|(h, _)| !h.eq_ignore_ascii_case(name));
        self.remove_headers.push(name.into());
        self
    }

    /// Encrypt, sign and lay out headers and body.
    pub fn prepare(&self) -> Prepared {
        let mut headers: Vec<(String, String)> = Vec::new();
        let mut push = |k: &str, v: String| headers.push((k.to_string(), v));
        let (body, salt, dh) = match self.style.encoding() {
            "aes128gcm" => (encrypt_aes128gcm(&self.p256dh, &self.auth, &self.payload), vec![], vec![]),
            _ => encrypt_aesgcm(&self.p256dh, &self.auth, &self.payload),
        };
        let vapid = self.vapid.as_ref().map(|v| {
            let jwt = self.jwt.clone().unwrap_or_else(|| {
                let aud = self.aud.clone().unwrap_or_else(|| origin_of(&self.endpoint));
                v.jwt(&aud, self.exp.unwrap_or(unix_now() + 12 * 3600), self.sub.as_deref())
            });
            let key = self.key.clone().unwrap_or_else(|| v.public_key_b64());
            (jwt, key)
        });
        let ttl_name = match self.style {
            Style::Mastodon | Style::MastodonAesgcm => "Ttl",
            Style::Misskey | Style::PleromaAesgcm => "TTL",
        };
        match self.style {
            Style::Mastodon | Style::Misskey => {
                push("Content-Type", "application/octet-stream".into());
                push("Content-Encoding", "aes128gcm".into());
                if let Some((jwt, key)) = &vapid {
                    let sep = if self.style == Style::Mastodon { "," } else { ", " };
                    push("Authorization", format!("vapid t={jwt}{sep}k={key}"));
                }
            }
            Style::PleromaAesgcm | Style::MastodonAesgcm => {
                if self.style == Style::MastodonAesgcm {
                    push("Content-Type", "application/octet-stream".into());
                }
                push("Content-Encoding", "aesgcm".into());
                push("Encryption", format!("salt={}", b64url(&salt)));
                match &vapid {
                    Some((jwt, key)) => {
                        push("Crypto-Key", format!("dh={};p256ecdsa={key}", b64url(&dh)));
                        push("Authorization", format!("WebPush {jwt}"));
                    }
                    None => push("Crypto-Key", format!("dh={}", b64url(&dh))),
                }
            }
        }
        if let Some(ttl) = self.ttl {
            push(ttl_name, ttl.to_string());
        }
        if let Some(u) = &self.urgency {
            push("Urgency", u.clone());
        }
        if let Some(t) = &self.topic {
            push("Topic", t.clone());
        }
        headers.retain(|(k, _)| !self.remove_headers.iter().any(|r| r.eq_ignore_ascii_case(k)));
        for (k, v) in &self.set_headers {
            headers.retain(|(h, _)| !h.eq_ignore_ascii_case(k));
            headers.push((k.clone(), v.clone()));
        }
        Prepared {
            url: self.endpoint.clone(),
            headers,
            body: self.body.clone().unwrap_or(body),
            salt,
            dh,
        }
    }

    /// The reqwest request, ready to send.
    pub fn build(&self, client: &reqwest::Client) -> reqwest::RequestBuilder {
        let p = self.prepare();
        let mut rb = client.post(&p.url);
        for (k, v) in &p.headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        rb.body(p.body)
    }

    /// Send it; returns the status, the response headers and the body text.
    pub async fn send(&self, client: &reqwest::Client) -> PushResponse {
        let resp = self
            .build(client)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {} failed: {e}", self.endpoint));
        PushResponse::read(resp).await
    }
}

/// What the push service (the relay) answered.
#[derive(Clone, Debug)]
pub struct PushResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl PushResponse {
    async fn read(resp: reqwest::Response) -> PushResponse {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap_or_default();
        PushResponse { status, headers, body }
    }

    /// A response header as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON (`Value::Null` when empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}
