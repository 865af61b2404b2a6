//! VAPID (RFC 8292): who is sending, proven by an ES256-signed JWT.
//!
//! Two header forms are in use:
//! - RFC 8292: `Authorization: vapid t=<jwt>, k=<key>` (Mastodon writes it
//!   without the space after the comma);
//! - draft-01, still sent by Pleroma/Akkoma and older libraries:
//!   `Authorization: WebPush <jwt>` with `Crypto-Key: p256ecdsa=<key>`.
//!
//! The signature is checked with OpenSSL's ECDSA, several times faster than
//! the pure-Rust p256 crate, because it runs on every push.

use std::sync::OnceLock;

use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint, PointConversionForm};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::Public;
use serde::Deserialize;

use super::{b64, params};

/// Sender skew tolerated on `exp`, and beyond the 24 h maximum (RFC 8292 §2).
const SKEW_SECS: i64 = 60;
const MAX_LIFETIME_SECS: i64 = 24 * 3600;

/// A VAPID header that could be read, not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub jwt: String,
    /// The public key as sent (65 or 33 bytes).
    pub key: Vec<u8>,
}

/// Why VAPID failed: each maps to 401, except a key mismatch (403), which
/// the ingress decides by comparing [`Verified::key`] with the registration's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct VapidError(pub String);

fn fail<T>(why: impl Into<String>) -> Result<T, VapidError> {
    Err(VapidError(why.into()))
}

/// Reads the credentials from `Authorization` (and `Crypto-Key` for the
/// `WebPush` scheme).
pub fn credentials(authorization: Option<&str>, crypto_key: Option<&str>) -> Result<Credentials, VapidError> {
    let Some(authorization) = authorization.map(str::trim).filter(|a| !a.is_empty()) else {
        return fail("missing Authorization header (VAPID is required)");
    };
    let (scheme, rest) = authorization.split_once([' ', '\t']).unwrap_or((authorization, ""));
    let (jwt, key) = if scheme.eq_ignore_ascii_case("vapid") {
        (params::param(rest, "t"), params::param(rest, "k"))
    } else if scheme.eq_ignore_ascii_case("webpush") {
        (Some(rest.trim()), crypto_key.and_then(|c| params::param(c, "p256ecdsa")))
    } else {
        return fail(format!("unsupported Authorization scheme {scheme:?} (expected vapid or WebPush)"));
    };
    let jwt = match jwt {
        Some(jwt) if !jwt.is_empty() => jwt,
        _ => return fail("VAPID token (t=) missing"),
    };
    let Some(key) = key else {
        return fail("VAPID public key missing (k= or Crypto-Key: p256ecdsa=)");
    };
    let Some(key) = b64::decode(key) else {
        return fail("VAPID public key is not base64");
    };
    Ok(Credentials { jwt: jwt.to_string(), key })
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    aud: Option<String>,
    exp: Option<f64>,
}

/// A verified sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The sender's public key, as a 65-byte uncompressed point.
    pub key: Vec<u8>,
}

pub(super) fn group() -> Result<&'static EcGroup, VapidError> {
    static GROUP: OnceLock<Option<EcGroup>> = OnceLock::new();
    GROUP
        .get_or_init(|| EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).ok())
        .as_ref()
        .ok_or_else(|| VapidError("P-256 is not available in this OpenSSL".into()))
}

/// Verifies signature, `aud` (must be `origin`, e.g. `https://relay.example`;
/// a trailing slash is tolerated) and `exp` (in the future, at most 24 h
/// ahead, 60 s skew either way) at time `now` (Unix seconds).
pub fn verify(credentials: &Credentials, origin: &str, now: i64) -> Result<Verified, VapidError> {
    let mut parts = credentials.jwt.split('.');
    let (Some(header), Some(claims), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return fail("VAPID token is not a JWT (header.claims.signature)");
    };
    let header: Header = decode_json(header, "header")?;
    if header.alg != "ES256" {
        return fail(format!("VAPID token algorithm {:?} (expected ES256)", header.alg));
    }
    let claims_json: Claims = decode_json(claims, "claims")?;

    // Signature first: the claims mean nothing until we know who wrote them.
    let Some(signature) = b64::decode(signature) else {
        return fail("VAPID signature is not base64");
    };
    let signing_input = &credentials.jwt[..header_len(&credentials.jwt)];
    let key = verify_es256(&credentials.key, signing_input.as_bytes(), &signature)?;

    let Some(aud) = claims_json.aud else {
        return fail("VAPID token has no aud claim");
    };
    let aud = aud.trim_end_matches('/');
    if !aud.eq_ignore_ascii_case(origin) {
        return fail(format!("VAPID aud {aud:?} is not this relay ({origin:?})"));
    }
    let Some(exp) = claims_json.exp.filter(|e| e.is_finite()) else {
        return fail("VAPID token has no exp claim");
    };
    let exp = exp as i64;
    if exp <= now - SKEW_SECS {
        return fail("VAPID token expired");
    }
    if exp > now + MAX_LIFETIME_SECS + SKEW_SECS {
        return fail("VAPID token exp is more than 24 hours ahead");
    }
    Ok(Verified { key })
}

/// Length of `header.claims`, the signed part of a JWT.
fn header_len(jwt: &str) -> usize {
    jwt.rfind('.').unwrap_or(jwt.len())
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str, what: &str) -> Result<T, VapidError> {
    let bytes = b64::decode(part).ok_or_else(|| VapidError(format!("VAPID token {what} is not base64")))?;
    serde_json::from_slice(&bytes).map_err(|e| VapidError(format!("VAPID token {what} is not valid JSON: {e}")))
}

/// Checks an ES256 signature (JOSE form: 64 bytes r‖s; a DER signature, which
/// some old libraries sent, is accepted too) and returns the key as a
/// 65-byte uncompressed point.
fn verify_es256(key: &[u8], signed: &[u8], signature: &[u8]) -> Result<Vec<u8>, VapidError> {
    let (ec_key, uncompressed) = public_key(key)?;
    let sig = if signature.len() == 64 {
        let r = BigNum::from_slice(&signature[..32]);
        let s = BigNum::from_slice(&signature[32..]);
        match (r, s) {
            (Ok(r), Ok(s)) => EcdsaSig::from_private_components(r, s).ok(),
            _ => None,
        }
    } else {
        EcdsaSig::from_der(signature).ok()
    };
    let Some(sig) = sig else {
        return fail("VAPID signature is malformed (expected 64 bytes r||s)");
    };
    let digest = openssl::sha::sha256(signed);
    match sig.verify(&digest, &ec_key) {
        Ok(true) => Ok(uncompressed),
        _ => fail("VAPID signature does not verify"),
    }
}

/// Parsed sender keys, by their bytes as sent. An instance signs every push
/// with the same key, so decoding and validating the point once per key
/// (not per push) saves work; the signature itself is checked every time.
type KeyCache = std::sync::Mutex<std::collections::HashMap<Vec<u8>, (EcKey<Public>, Vec<u8>)>>;
const KEY_CACHE_MAX: usize = 10_000;

fn public_key(key: &[u8]) -> Result<(EcKey<Public>, Vec<u8>), VapidError> {
    static CACHE: OnceLock<KeyCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().ok().and_then(|c| c.get(key).cloned()) {
        return Ok(hit);
    }
    let group = group()?;
    let mut ctx = BigNumContext::new().map_err(|e| VapidError(format!("openssl: {e}")))?;
    let not_a_point = || VapidError("VAPID public key is not a P-256 point".into());
    let point = EcPoint::from_bytes(group, key, &mut ctx).map_err(|_| not_a_point())?;
    let ec_key = EcKey::from_public_key(group, &point).map_err(|_| not_a_point())?;
    let uncompressed = point
        .to_bytes(group, PointConversionForm::UNCOMPRESSED, &mut ctx)
        .map_err(|e| VapidError(format!("openssl: {e}")))?;
    if let Ok(mut c) = cache.lock() {
        if c.len() >= KEY_CACHE_MAX {
            c.clear();
        }
        c.insert(key.to_vec(), (ec_key.clone(), uncompressed.clone()));
    }
    Ok((ec_key, uncompressed))
}

/// Normalises a P-256 public key (65-byte uncompressed or 33-byte compressed)
/// to its 65-byte uncompressed form; `None` if it is not a point on the curve.
pub fn normalize_key(key: &[u8]) -> Option<Vec<u8>> {
    let group = group().ok()?;
    let mut ctx = BigNumContext::new().ok()?;
    let point = EcPoint::from_bytes(group, key, &mut ctx).ok()?;
    point.to_bytes(group, PointConversionForm::UNCOMPRESSED, &mut ctx).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::ecdsa::EcdsaSig;

    struct Signer {
        key: EcKey<openssl::pkey::Private>,
    }

    impl Signer {
        fn new() -> Signer {
            Signer { key: EcKey::generate(group().unwrap()).unwrap() }
        }

        fn public(&self) -> Vec<u8> {
            let mut ctx = BigNumContext::new().unwrap();
            self.key.public_key().to_bytes(group().unwrap(), PointConversionForm::UNCOMPRESSED, &mut ctx).unwrap()
        }

        fn jwt(&self, claims: serde_json::Value) -> String {
            let input = format!(
                "{}.{}",
                b64::encode(br#"{"typ":"JWT","alg":"ES256"}"#),
                b64::encode(claims.to_string().as_bytes())
            );
            let sig = EcdsaSig::sign(&openssl::sha::sha256(input.as_bytes()), &self.key).unwrap();
            let mut raw = sig.r().to_vec_padded(32).unwrap();
            raw.extend(sig.s().to_vec_padded(32).unwrap());
            format!("{input}.{}", b64::encode(&raw))
        }
    }

    const ORIGIN: &str = "https://relay.example";
    const NOW: i64 = 1_700_000_000;

    fn creds(signer: &Signer, claims: serde_json::Value) -> Credentials {
        Credentials { jwt: signer.jwt(claims), key: signer.public() }
    }

    #[test]
    fn header_forms() {
        let mastodon = credentials(Some("vapid t=a.b.c,k=BAAA"), None).unwrap();
        assert_eq!(mastodon, Credentials { jwt: "a.b.c".into(), key: vec![4, 0, 0] });
        let misskey = credentials(Some("vapid t=a.b.c, k=BAAA"), None).unwrap();
        assert_eq!(misskey, mastodon);
        let webpush = credentials(Some("WebPush a.b.c"), Some("dh=xyz;p256ecdsa=BAAA")).unwrap();
        assert_eq!(webpush, mastodon);
        let webpush_comma = credentials(Some("webpush a.b.c"), Some("dh=xyz, p256ecdsa=\"BAAA\"")).unwrap();
        assert_eq!(webpush_comma, mastodon);
        assert!(credentials(None, None).is_err());
        assert!(credentials(Some("Bearer x"), None).is_err());
        assert!(credentials(Some("WebPush a.b.c"), Some("dh=xyz")).is_err());
        assert!(credentials(Some("vapid k=BAAA"), None).is_err());
    }

    #[test]
    fn verifies_good_tokens() {
        let s = Signer::new();
        let c = creds(&s, serde_json::json!({"aud": ORIGIN, "exp": NOW + 3600, "sub": "mailto:a@b.c"}));
        assert_eq!(verify(&c, ORIGIN, NOW).unwrap().key, s.public());
        // Trailing slash, no sub, exp at the 24 h + skew edge.
        let c = creds(&s, serde_json::json!({"aud": "https://relay.example/", "exp": NOW + 86_460}));
        assert!(verify(&c, ORIGIN, NOW).is_ok());
        // Skew tolerated on the past side.
        let c = creds(&s, serde_json::json!({"aud": ORIGIN, "exp": NOW - 30}));
        assert!(verify(&c, ORIGIN, NOW).is_ok());
    }

    #[test]
    fn refuses_bad_tokens() {
        let s = Signer::new();
        let bad = |claims, why: &str| {
            let err = verify(&creds(&s, claims), ORIGIN, NOW).unwrap_err();
            assert!(err.0.contains(why), "{} should mention {why}", err.0);
        };
        bad(serde_json::json!({"aud": "https://other.example", "exp": NOW + 60}), "aud");
        bad(serde_json::json!({"aud": "https://relay.example:8443", "exp": NOW + 60}), "aud");
        bad(serde_json::json!({"exp": NOW + 60}), "aud");
        bad(serde_json::json!({"aud": ORIGIN, "exp": NOW - 61}), "expired");
        bad(serde_json::json!({"aud": ORIGIN, "exp": NOW + 86_461}), "24 hours");
        bad(serde_json::json!({"aud": ORIGIN}), "exp");

        // Signed by another key than the one in k=.
        let other = Signer::new();
        let mut c = creds(&s, serde_json::json!({"aud": ORIGIN, "exp": NOW + 60}));
        c.key = other.public();
        assert!(verify(&c, ORIGIN, NOW).unwrap_err().0.contains("does not verify"));

        // Tampered claims.
        let c = creds(&s, serde_json::json!({"aud": ORIGIN, "exp": NOW + 60}));
        let parts: Vec<&str> = c.jwt.split('.').collect();
        let forged = b64::encode(serde_json::json!({"aud": ORIGIN, "exp": NOW + 600}).to_string().as_bytes());
        let tampered = Credentials { jwt: format!("{}.{}.{}", parts[0], forged, parts[2]), key: c.key.clone() };
        assert!(verify(&tampered, ORIGIN, NOW).is_err());

        // Garbage of every shape: an error, never a panic.
        for jwt in ["", "a", "a.b", "a.b.c.d", "....", "eyJhbGciOiJIUzI1NiJ9.e30.AAAA"] {
            assert!(verify(&Credentials { jwt: jwt.into(), key: s.public() }, ORIGIN, NOW).is_err());
        }
        assert!(verify(&Credentials { jwt: c.jwt.clone(), key: vec![4; 65] }, ORIGIN, NOW).is_err());
    }

    #[test]
    fn compressed_keys_normalise() {
        let s = Signer::new();
        let public = s.public();
        let mut ctx = BigNumContext::new().unwrap();
        let compressed = s.key.public_key().to_bytes(group().unwrap(), PointConversionForm::COMPRESSED, &mut ctx).unwrap();
        assert_eq!(normalize_key(&compressed), Some(public.clone()));
        assert_eq!(normalize_key(&public), Some(public));
        assert_eq!(normalize_key(&[4; 65]), None);
    }
}
