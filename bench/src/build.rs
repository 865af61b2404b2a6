//! Pre-building the Web Push requests, before the timed phase, on all cores.
//!
//! Each message is what a Mastodon instance sends:
//! * a Mastodon-shaped JSON payload (`access_token`, `preferred_locale`,
//!   `notification_id`, `notification_type`, `icon`, `title`, `body`), 300-500 bytes;
//! * encrypted to the registration's `p256dh`/`auth` with a fresh salt and a
//!   fresh sender key (`aes128gcm`, RFC 8291, or draft `aesgcm`);
//! * signed with a fresh VAPID JWT (ES256, `aud` = the endpoint's origin,
//!   `exp` = now + 12 h, `sub`), so no cache of verified tokens can help;
//! * with Mastodon's headers: `Content-Type: application/octet-stream`,
//!   `Content-Encoding`, `Ttl`, `Urgency: normal`,
//!   `Authorization: vapid t=…,k=…`, and for `aesgcm` `Encryption: salt=…`
//!   and `Crypto-Key: dh=…`.

use std::collections::HashMap;

use anyhow::{Context, Result};
use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use rayon::prelude::*;

use crate::sink::{key_decrypted, key_opaque, NOTIFICATION_ID_BASE};
use crate::{BenchRegistration, Encoding, Options};
use push_relay_e2e::webpush::{origin_of, unix_now};
use push_relay_e2e::{b64url, encrypt_aes128gcm, encrypt_aesgcm, Vapid};

/// One ready-to-send push.
pub struct Message {
    /// Origin-form request target (`/push/{id}`).
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// `"aes128gcm"` or `"aesgcm"`.
    pub encoding: &'static str,
    pub decrypted: bool,
}

pub struct MessageSet {
    pub messages: Vec<Message>,
    /// Sink key → message index (decrypted messages have two keys: their
    /// notification id, and their body in case the relay fell back to opaque).
    pub keys: HashMap<u64, usize>,
    pub payload_bytes_avg: f64,
    pub body_bytes_avg: f64,
    /// `Host` header value for the connections.
    pub host: String,
}

const NOTIFICATION_TYPES: [&str; 6] = ["mention", "favourite", "reblog", "follow", "status", "poll"];
const TITLES: [&str; 6] = [
    "Alice Liddell mentioned you",
    "Bob favourited your post",
    "Carol boosted your post",
    "Dave followed you",
    "Erin just posted",
    "A poll you voted in has ended",
];
const FILLER: &str = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt \
ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut \
aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore.";

/// The Mastodon-shaped plaintext of push `i` (between ~300 and ~500 bytes).
pub fn mastodon_payload(i: usize) -> String {
    let t = i % NOTIFICATION_TYPES.len();
    // 43-bytes access token like Mastodon's, varying body length.
    let token: String = {
        let mut b = [0u8; 32];
        openssl::rand::rand_bytes(&mut b).unwrap();
        b64url(&b)
    };
    let extra = (i * 7919) % 160;
    let body = format!("@alice {} (#{i})", &FILLER[..10 + extra]);
    serde_json::json!({
        "access_token": token,
        "preferred_locale": "en",
        "notification_id": (NOTIFICATION_ID_BASE + i as u64).to_string(),
        "notification_type": NOTIFICATION_TYPES[t],
        "icon": format!("https://files.bench{}.example.social/accounts/avatars/109/348/{:03}/{:03}/original/{:016x}.png", i % 20, i % 1000, (i / 1000) % 1000, i as u64 * 2654435761),
        "title": TITLES[t],
        "body": body,
    })
    .to_string()
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("header value")
}

/// Build every message of the run.
pub fn build_all(opts: &Options, regs: &[BenchRegistration], vapid: &Vapid, base_url: &str) -> Result<MessageSet> {
    let host = url::Url::parse(base_url).context("relay URL")?;
    let host = match host.port() {
        Some(p) => format!("{}:{p}", host.host_str().unwrap_or("127.0.0.1")),
        None => host.host_str().unwrap_or("127.0.0.1").to_string(),
    };
    let key_b64 = vapid.public_key_b64();
    let exp = unix_now() + 12 * 3600;
    let ttl = opts.ttl.to_string();
    let built: Vec<(Message, usize, Vec<u64>)> = (0..opts.pushes)
        .into_par_iter()
        .map(|i| {
            let reg = &regs[i % regs.len()];
            let encoding = match opts.encoding {
                Encoding::Aes128gcm => "aes128gcm",
                Encoding::Aesgcm => "aesgcm",
                Encoding::Mixed => {
                    if (i / regs.len()) & 1 == 0 {
                        "aes128gcm"
                    } else {
                        "aesgcm"
                    }
                }
            };
            let payload = mastodon_payload(i);
            let jwt = vapid.jwt(&origin_of(&reg.endpoint), exp, Some("mailto:admin@bench.example.social"));
            let mut headers = HeaderMap::with_capacity(8);
            headers.insert(hyper::header::HOST, hv(&host));
            headers.insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            headers.insert(HeaderName::from_static("ttl"), hv(&ttl));
            headers.insert(HeaderName::from_static("urgency"), HeaderValue::from_static("normal"));
            let body = if encoding == "aes128gcm" {
                headers.insert(hyper::header::CONTENT_ENCODING, HeaderValue::from_static("aes128gcm"));
                encrypt_aes128gcm(&reg.p256dh, &reg.auth, payload.as_bytes())
            } else {
                let (body, salt, dh) = encrypt_aesgcm(&reg.p256dh, &reg.auth, payload.as_bytes());
                headers.insert(hyper::header::CONTENT_ENCODING, HeaderValue::from_static("aesgcm"));
                headers.insert(HeaderName::from_static("encryption"), hv(&format!("salt={}", b64url(&salt))));
                headers.insert(HeaderName::from_static("crypto-key"), hv(&format!("dh={}", b64url(&dh))));
                body
            };
            headers.insert(hyper::header::AUTHORIZATION, hv(&format!("vapid t={jwt},k={key_b64}")));
            headers.insert(hyper::header::CONTENT_LENGTH, hv(&body.len().to_string()));
            let mut keys = vec![key_opaque(&b64url(&body))];
            if reg.decrypted {
                keys.push(key_decrypted(&(NOTIFICATION_ID_BASE + i as u64).to_string()).unwrap());
            }
            let path = match url::Url::parse(&reg.endpoint) {
                Ok(u) => match u.query() {
                    Some(q) => format!("{}?{q}", u.path()),
                    None => u.path().to_string(),
                },
                Err(_) => reg.endpoint.clone(),
            };
            let plen = payload.len();
            (
                Message { path, headers, body: Bytes::from(body), encoding, decrypted: reg.decrypted },
                plen,
                keys,
            )
        })
        .collect();
    let n = built.len().max(1) as f64;
    let payload_bytes_avg = built.iter().map(|b| b.1 as f64).sum::<f64>() / n;
    let body_bytes_avg = built.iter().map(|b| b.0.body.len() as f64).sum::<f64>() / n;
    let mut keys = HashMap::with_capacity(built.len() * 2);
    let mut messages = Vec::with_capacity(built.len());
    for (i, (m, _, ks)) in built.into_iter().enumerate() {
        for k in ks {
            if keys.insert(k, i).is_some() {
                anyhow::bail!("two pre-built messages share a sink key (hash collision?)");
            }
        }
        messages.push(m);
    }
    Ok(MessageSet { messages, keys, payload_bytes_avg, body_bytes_avg, host })
}

#[cfg(test)]
mod tests {
    #[test]
    fn payload_size_is_mastodon_like() {
        for i in 0..1000 {
            let p = super::mastodon_payload(i);
            assert!((300..=500).contains(&p.len()), "payload {i} is {} bytes: {p}", p.len());
        }
    }
}
