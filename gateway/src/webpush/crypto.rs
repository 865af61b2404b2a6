//! Web Push message encryption: checking that a body can be a valid
//! message (always), and decrypting it (only when the app allowed it).
//!
//! - `aes128gcm` (RFC 8188 + RFC 8291): the body starts with a header
//!   `salt(16) ‖ rs(4) ‖ idlen(1) ‖ keyid(idlen)`, where keyid is the sender's
//!   65-byte public key, followed by records of `rs` bytes (the last may be
//!   shorter), each with a 16-byte tag. GoToSocial, for one, writes
//!   several records.
//! - `aesgcm` (draft-ietf-webpush-encryption-04): salt in `Encryption: salt=…`,
//!   sender key in `Crypto-Key: dh=…`, records of `rs` (default 4096) + 16 bytes.

use push_relay_providers::Encoding;

use super::{b64, params};

const TAG: usize = 16;
const SALT: usize = 16;
const KEY: usize = 65;
/// RFC 8188 §2: a record must hold the tag and one delimiter octet.
const AES128GCM_MIN_RS: u32 = 18;
/// draft-04: the default record size, and the 2-octet padding length.
const AESGCM_DEFAULT_RS: u32 = 4096;
const AESGCM_PAD: usize = 2;

/// An encrypted message whose framing was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encrypted {
    pub encoding: Encoding,
    pub body: Vec<u8>,
    /// `aesgcm` only (for `aes128gcm` they are inside the body).
    pub salt: Option<Vec<u8>>,
    pub dh: Option<Vec<u8>>,
    pub rs: u32,
}

/// Checks the framing of a message: what the relay can check without the
/// keys. Errors are for a `400`.
pub fn check(
    content_encoding: Option<&str>,
    encryption: Option<&str>,
    crypto_key: Option<&str>,
    body: Vec<u8>,
) -> Result<Encrypted, String> {
    let Some(encoding) = content_encoding.and_then(Encoding::parse) else {
        return Err(match content_encoding {
            None => "missing Content-Encoding (expected aes128gcm or aesgcm)".to_string(),
            Some(other) => format!("unsupported Content-Encoding {other:?} (expected aes128gcm or aesgcm)"),
        });
    };
    match encoding {
        Encoding::Aes128gcm => check_aes128gcm(body),
        Encoding::Aesgcm => check_aesgcm(encryption, crypto_key, body),
    }
}

fn check_aes128gcm(body: Vec<u8>) -> Result<Encrypted, String> {
    if body.len() < SALT + 5 {
        return Err("aes128gcm body is shorter than its header".into());
    }
    let rs = u32::from_be_bytes([body[16], body[17], body[18], body[19]]);
    let idlen = body[20] as usize;
    if rs < AES128GCM_MIN_RS {
        return Err(format!("aes128gcm record size {rs} is below the minimum of 18"));
    }
    // RFC 8291 §4: the keyid is the sender's uncompressed P-256 key.
    if idlen != KEY || body[21] != 0x04 {
        return Err("aes128gcm keyid is not a 65-byte P-256 public key (RFC 8291 §4)".into());
    }
    let records = body.len() - (SALT + 5 + idlen);
    if records < TAG + 1 {
        return Err("aes128gcm body has no complete record".into());
    }
    Ok(Encrypted { encoding: Encoding::Aes128gcm, body, salt: None, dh: None, rs })
}

fn check_aesgcm(encryption: Option<&str>, crypto_key: Option<&str>, body: Vec<u8>) -> Result<Encrypted, String> {
    let encryption = encryption.ok_or("aesgcm needs an Encryption header with salt=")?;
    let salt = params::param(encryption, "salt").ok_or("Encryption header has no salt=")?;
    let salt = b64::decode(salt).filter(|s| s.len() == SALT).ok_or("Encryption salt is not 16 bytes of base64")?;
    let rs = match params::param(encryption, "rs") {
        None => AESGCM_DEFAULT_RS,
        Some(rs) => rs
            .parse::<u32>()
            .ok()
            .filter(|rs| *rs > AESGCM_PAD as u32)
            .ok_or("Encryption rs= is not a record size above 2")?,
    };
    let dh = crypto_key
        .and_then(|c| params::param(c, "dh"))
        .ok_or("aesgcm needs a Crypto-Key header with dh=")?;
    let dh = b64::decode(dh)
        .filter(|d| d.len() == KEY && d[0] == 0x04)
        .ok_or("Crypto-Key dh is not a 65-byte P-256 public key")?;
    if body.len() < TAG + AESGCM_PAD {
        return Err("aesgcm body is shorter than one record".into());
    }
    Ok(Encrypted { encoding: Encoding::Aesgcm, body, salt: Some(salt), dh: Some(dh), rs })
}

/// Decrypts with the registration's keys: `private_key` (32-byte scalar),
/// `public_key` (its 65-byte point) and `auth` (16 bytes). `None` when it
/// does not decrypt.
///
/// Written on OpenSSL primitives rather than through the `ece` crate: `ece`
/// imports the key pair through OpenSSL's checked `EC_KEY` path and converts
/// both keys to `EVP_PKEY`s on every message, which made decryption cost
/// three scalar multiplications and ~400 µs per push; here it is one ECDH
/// multiplication. The RFC vectors below and a cross-check against `ece`
/// keep the two in agreement.
pub fn decrypt(message: &Encrypted, private_key: &[u8], public_key: &[u8], auth: &[u8]) -> Option<Vec<u8>> {
    if private_key.len() != 32 || public_key.len() != KEY || auth.len() != 16 {
        return None;
    }
    match message.encoding {
        Encoding::Aes128gcm => decrypt_aes128gcm(&message.body, private_key, public_key, auth),
        Encoding::Aesgcm => decrypt_aesgcm(message, private_key, public_key, auth),
    }
}

/// RFC 8291 §3.4 key schedule and RFC 8188 records.
fn decrypt_aes128gcm(body: &[u8], private_key: &[u8], ua_public: &[u8], auth: &[u8]) -> Option<Vec<u8>> {
    let salt = body.get(..SALT)?;
    let rs = u32::from_be_bytes(body.get(16..20)?.try_into().ok()?) as usize;
    let idlen = *body.get(20)? as usize;
    let as_public = body.get(21..21 + idlen)?;
    let records = body.get(21 + idlen..)?;
    if rs < AES128GCM_MIN_RS as usize || idlen != KEY {
        return None;
    }
    let ecdh = ecdh(private_key, as_public)?;
    let mut key_info = Vec::with_capacity(14 + 2 * KEY);
    key_info.extend_from_slice(b"WebPush: info\0");
    key_info.extend_from_slice(ua_public);
    key_info.extend_from_slice(as_public);
    let ikm: [u8; 32] = hkdf(auth, &ecdh, &key_info)?;
    let cek: [u8; 16] = hkdf(salt, &ikm, b"Content-Encoding: aes128gcm\0")?;
    let nonce: [u8; 12] = hkdf(salt, &ikm, b"Content-Encoding: nonce\0")?;

    let mut plaintext = Vec::with_capacity(records.len());
    let count = records.len().div_ceil(rs);
    for (seq, record) in records.chunks(rs).enumerate() {
        let last = seq + 1 == count;
        let padded = open_record(&cek, &nonce, seq, record)?;
        // Padding: the data, one delimiter (2 in the last record, 1 before),
        // then zeros.
        let end = padded.iter().rposition(|b| *b != 0)?;
        if padded[end] != if last { 2 } else { 1 } {
            return None;
        }
        plaintext.extend_from_slice(&padded[..end]);
    }
    Some(plaintext)
}

/// draft-ietf-webpush-encryption-04 key schedule; records of `rs` + 16
/// bytes, each starting with a two-byte padding length.
fn decrypt_aesgcm(message: &Encrypted, private_key: &[u8], ua_public: &[u8], auth: &[u8]) -> Option<Vec<u8>> {
    let salt = message.salt.as_deref()?;
    let dh = message.dh.as_deref()?;
    let ecdh = ecdh(private_key, dh)?;
    let ikm: [u8; 32] = hkdf(auth, &ecdh, b"Content-Encoding: auth\0")?;
    let mut context = Vec::with_capacity(6 + 4 + 2 * KEY);
    context.extend_from_slice(b"P-256\0");
    for key in [ua_public, dh] {
        context.extend_from_slice(&(key.len() as u16).to_be_bytes());
        context.extend_from_slice(key);
    }
    let cek: [u8; 16] = hkdf(salt, &ikm, &[&b"Content-Encoding: aesgcm\0"[..], &context].concat())?;
    let nonce: [u8; 12] = hkdf(salt, &ikm, &[&b"Content-Encoding: nonce\0"[..], &context].concat())?;

    let mut plaintext = Vec::with_capacity(message.body.len());
    for (seq, record) in message.body.chunks(message.rs as usize + TAG).enumerate() {
        let padded = open_record(&cek, &nonce, seq, record)?;
        let pad = u16::from_be_bytes([*padded.first()?, *padded.get(1)?]) as usize;
        let data = padded.get(AESGCM_PAD + pad..)?;
        if padded[AESGCM_PAD..AESGCM_PAD + pad].iter().any(|b| *b != 0) {
            return None;
        }
        plaintext.extend_from_slice(data);
    }
    Some(plaintext)
}

/// AES-128-GCM-decrypts record `seq` (its nonce is the base nonce XOR the
/// sequence number, RFC 8188 §2.3).
fn open_record(cek: &[u8; 16], nonce: &[u8; 12], seq: usize, record: &[u8]) -> Option<Vec<u8>> {
    if record.len() <= TAG {
        return None;
    }
    let mut iv = *nonce;
    for (byte, seq_byte) in iv[4..].iter_mut().zip((seq as u64).to_be_bytes()) {
        *byte ^= seq_byte;
    }
    let (ciphertext, tag) = record.split_at(record.len() - TAG);
    openssl::symm::decrypt_aead(openssl::symm::Cipher::aes_128_gcm(), cek, Some(&iv), &[], ciphertext, tag).ok()
}

/// The x coordinate of `private_key` × `peer` (P-256 ECDH); `None` when the
/// peer key is not a point on the curve.
fn ecdh(private_key: &[u8], peer: &[u8]) -> Option<[u8; 32]> {
    use openssl::bn::{BigNum, BigNumContext};
    use openssl::ec::EcPoint;
    let group = super::vapid::group().ok()?;
    let mut ctx = BigNumContext::new().ok()?;
    let scalar = BigNum::from_slice(private_key).ok()?;
    let peer = EcPoint::from_bytes(group, peer, &mut ctx).ok()?;
    let mut shared = EcPoint::new(group).ok()?;
    shared.mul2(group, &peer, &scalar, &mut ctx).ok()?;
    let (mut x, mut y) = (BigNum::new().ok()?, BigNum::new().ok()?);
    shared.affine_coordinates(group, &mut x, &mut y, &mut ctx).ok()?;
    x.to_vec_padded(32).ok()?.try_into().ok()
}

/// HKDF-SHA256 (RFC 5869) of `N` bytes.
fn hkdf<const N: usize>(salt: &[u8], ikm: &[u8], info: &[u8]) -> Option<[u8; N]> {
    let mut okm = [0u8; N];
    hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), ikm).expand(info, &mut okm).ok()?;
    Some(okm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// RFC 8291 Appendix A.
    #[test]
    fn rfc8291_vector() {
        let body = b64::decode(
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN",
        )
        .unwrap();
        let ua_private = b64::decode("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94").unwrap();
        let ua_public = b64::decode(
            "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
        )
        .unwrap();
        let auth = b64::decode("BTBZMqHH6r4Tts7J_aSIgg").unwrap();
        let message = check(Some("aes128gcm"), None, None, body).unwrap();
        assert_eq!(message.rs, 4096);
        let plain = decrypt(&message, &ua_private, &ua_public, &auth).unwrap();
        assert_eq!(plain, b"When I grow up, I want to be a watermelon");
        // A wrong auth secret does not decrypt.
        assert_eq!(decrypt(&message, &ua_private, &ua_public, &[0; 16]), None);
    }

    /// draft-ietf-webpush-encryption-04 §5 (the `aesgcm` example), with the
    /// headers written as Mastodon and Pleroma write them.
    #[test]
    fn draft04_aesgcm_vector() {
        let private = hex("f455a5d79fd05100160da0f7937979d19059409e1abb6ec5d55e05d2e2d20ff3");
        let public = hex("042124063ccbf19dc2fa88b643ba04e6dd8da7ea7ba2c8c62e0f77a943f4c2fa914f6d44116c9fd1c40341c6a440cab3e2140a60e4378a5da735972de078005105");
        let auth = hex("476f6f20676f6f206727206a6f6f6221");
        let salt = b64::encode(&hex("96781aadbc8a7cca22f59ef9c585e692"));
        let dh = b64::encode(&hex("04da110db6fce091a6f20e59e42171bab4aab17589d7522d7d71166152c4f3963b0989038d7b0811ce1aab161a4351bc06a917089e833e90eb5ad7568ff9ae8075"));
        let body = hex("ea7a80414304f2136ac39277925f1ca55549ca55ca62a64e7ac7991bc52e78aa40");
        for (encryption, crypto_key) in [
            (format!("salt={salt}"), format!("dh={dh};p256ecdsa=BAAA")),
            (format!("keyid=p256dh;salt=\"{salt}\";rs=4096"), format!("keyid=p256dh;dh={dh}, p256ecdsa=BAAA")),
        ] {
            let message = check(Some("aesgcm"), Some(&encryption), Some(&crypto_key), body.clone()).unwrap();
            assert_eq!(decrypt(&message, &private, &public, &auth).unwrap(), b"I am the walrus");
        }
    }

    #[test]
    fn refuses_bad_framing() {
        let good_header = {
            let mut h = vec![1u8; 16];
            h.extend(4096u32.to_be_bytes());
            h.push(65);
            h.push(4);
            h.extend([7u8; 64]);
            h
        };
        let with = |tail: usize| {
            let mut b = good_header.clone();
            b.extend(vec![0u8; tail]);
            b
        };
        assert!(check(Some("aes128gcm"), None, None, with(17)).is_ok());
        assert!(check(Some("aes128gcm"), None, None, with(16)).is_err(), "no complete record");
        assert!(check(Some("aes128gcm"), None, None, vec![0; 10]).is_err(), "short header");
        let mut small_rs = with(40);
        small_rs[16..20].copy_from_slice(&17u32.to_be_bytes());
        assert!(check(Some("aes128gcm"), None, None, small_rs).is_err());
        let mut bad_idlen = with(40);
        bad_idlen[20] = 0;
        assert!(check(Some("aes128gcm"), None, None, bad_idlen).is_err());

        assert!(check(None, None, None, with(40)).is_err());
        assert!(check(Some("gzip"), None, None, with(40)).is_err());

        let salt = format!("salt={}", b64::encode(&[1; 16]));
        let dh = format!("dh={}", b64::encode(&[4; 65]));
        assert!(check(Some("aesgcm"), Some(&salt), Some(&dh), vec![0; 18]).is_ok());
        assert!(check(Some("aesgcm"), None, Some(&dh), vec![0; 18]).is_err(), "no Encryption");
        assert!(check(Some("aesgcm"), Some(&salt), None, vec![0; 18]).is_err(), "no Crypto-Key");
        assert!(check(Some("aesgcm"), Some("salt=AAAA"), Some(&dh), vec![0; 18]).is_err(), "short salt");
        assert!(check(Some("aesgcm"), Some(&salt), Some("dh=BAAA"), vec![0; 18]).is_err(), "short dh");
        assert!(check(Some("aesgcm"), Some(&salt), Some(&dh), vec![0; 17]).is_err(), "short body");
        assert!(check(Some("aesgcm"), Some(&format!("{salt};rs=x")), Some(&dh), vec![0; 18]).is_err());
    }

    /// Our decryption agrees with `ece`'s encryption, in both encodings and
    /// across record boundaries and payload sizes.
    #[test]
    fn agrees_with_ece() {
        for size in [1usize, 15, 16, 17, 100, 1000, 2900, 3900] {
            let keys = crate::keys::DeviceKeys::generate();
            let plain: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
            let body = ece::encrypt(&keys.public_key, &keys.auth, &plain).unwrap();
            let m = check(Some("aes128gcm"), None, None, body).unwrap();
            assert_eq!(decrypt(&m, &keys.private_key, &keys.public_key, &keys.auth), Some(plain.clone()), "aes128gcm {size}");
            let block = ece::legacy::encrypt_aesgcm(&keys.public_key, &keys.auth, &plain).unwrap();
            let headers = block.headers(None);
            let header = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone()).unwrap();
            let body = b64::decode(&block.body()).unwrap();
            let m = check(Some("aesgcm"), Some(&header("Encryption")), Some(&header("Crypto-Key")), body).unwrap();
            assert_eq!(decrypt(&m, &keys.private_key, &keys.public_key, &keys.auth), Some(plain), "aesgcm {size}");
        }
    }

    #[test]
    fn decrypt_never_panics_on_garbage() {
        let salt = format!("salt={}", b64::encode(&[1; 16]));
        let dh = format!("dh={}", b64::encode(&[4; 65]));
        let m = check(Some("aesgcm"), Some(&salt), Some(&dh), vec![0; 40]).unwrap();
        assert_eq!(decrypt(&m, &[1; 32], &[4; 65], &[0; 16]), None);
        let mut body = vec![1u8; 16];
        body.extend(4096u32.to_be_bytes());
        body.push(65);
        body.push(4);
        body.extend([7u8; 64]);
        body.extend([0u8; 40]);
        let m = check(Some("aes128gcm"), None, None, body).unwrap();
        assert_eq!(decrypt(&m, &[1; 32], &[4; 65], &[0; 16]), None);
    }
}
