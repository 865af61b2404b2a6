//! Identifiers, secrets and device keys.
//!
//! - Registration and message ids: 16 random bytes, base64url (22 chars):
//!   unguessable, so an endpoint URL cannot be found by enumeration.
//! - Management secrets: 32 random bytes, stored only as a SHA-256 hash
//!   and compared in constant time.
//! - Device keys ("the three tokens" of SPEC §2): a P-256 key pair and a
//!   16-byte auth secret, generated here so the app need not do crypto.

use p256::elliptic_curve::rand_core::{OsRng, RngCore};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::webpush::b64;

/// A random base64url identifier of `bytes` random bytes.
pub fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    OsRng.fill_bytes(&mut buf);
    b64::encode(&buf)
}

pub fn new_id() -> String {
    random_token(16)
}

pub fn new_secret() -> String {
    random_token(32)
}

pub fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Whether `presented` is the secret whose hash is `hash`, in constant time.
pub fn secret_matches(presented: &str, hash: &[u8]) -> bool {
    hash_secret(presented).ct_eq(hash).into()
}

/// A device's Web Push keys. The private key and auth secret are wiped
/// from memory when dropped.
pub struct DeviceKeys {
    pub private_key: Vec<u8>,
    pub public_key: Vec<u8>,
    pub auth: Vec<u8>,
}

impl DeviceKeys {
    pub fn generate() -> DeviceKeys {
        let secret = p256::SecretKey::random(&mut OsRng);
        let public_key = secret.public_key().to_encoded_point(false).as_bytes().to_vec();
        let mut auth = vec![0u8; 16];
        OsRng.fill_bytes(&mut auth);
        DeviceKeys { private_key: secret.to_bytes().to_vec(), public_key, auth }
    }
}

impl Drop for DeviceKeys {
    fn drop(&mut self) {
        self.private_key.iter_mut().for_each(|b| *b = 0);
        self.auth.iter_mut().for_each(|b| *b = 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_secrets() {
        let a = new_id();
        assert_eq!(a.len(), 22);
        assert_ne!(a, new_id());
        let secret = new_secret();
        assert_eq!(secret.len(), 43);
        let hash = hash_secret(&secret);
        assert!(secret_matches(&secret, &hash));
        assert!(!secret_matches("wrong", &hash));
        assert!(!secret_matches(&secret, &hash[..31]));
    }

    #[test]
    fn generated_keys_decrypt_what_is_encrypted_to_them() {
        let keys = DeviceKeys::generate();
        assert_eq!(keys.public_key.len(), 65);
        assert_eq!(keys.public_key[0], 4);
        assert_eq!(keys.private_key.len(), 32);
        let body = ece::encrypt(&keys.public_key, &keys.auth, b"hello").unwrap();
        let message = crate::webpush::crypto::check(Some("aes128gcm"), None, None, body).unwrap();
        let plain = crate::webpush::crypto::decrypt(&message, &keys.private_key, &keys.public_key, &keys.auth);
        assert_eq!(plain.as_deref(), Some(&b"hello"[..]));
    }
}
