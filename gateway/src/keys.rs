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

/// Seals a pending registration's private key and auth secret under a key
/// derived from its management secret (AES-256-GCM; the key is
/// SHA-256 of a domain label and the secret, which is itself 32 random
/// bytes, so no slower KDF is needed). Output: nonce ‖ ciphertext ‖ tag.
pub fn seal(secret: &str, private_key: &[u8], auth: &[u8]) -> Option<Vec<u8>> {
    let key = sealing_key(secret);
    let mut nonce = [0u8; 12];
    OsRng.fill_bytes(&mut nonce);
    let mut plain = [private_key, auth].concat();
    let mut tag = [0u8; 16];
    let sealed = openssl::symm::encrypt_aead(openssl::symm::Cipher::aes_256_gcm(), &key, Some(&nonce), b"", &plain, &mut tag);
    plain.iter_mut().for_each(|b| *b = 0);
    let sealed = sealed.ok()?;
    Some([&nonce[..], &sealed, &tag].concat())
}

/// Opens what [`seal`] sealed: `(private_key, auth)`, or `None` with the
/// wrong secret or a damaged blob.
pub fn unseal(secret: &str, blob: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    if blob.len() != 12 + 32 + 16 + 16 {
        return None;
    }
    let (nonce, rest) = blob.split_at(12);
    let (ciphertext, tag) = rest.split_at(rest.len() - 16);
    let key = sealing_key(secret);
    let mut plain =
        openssl::symm::decrypt_aead(openssl::symm::Cipher::aes_256_gcm(), &key, Some(nonce), b"", ciphertext, tag).ok()?;
    let auth = plain.split_off(32);
    Some((plain, auth))
}

fn sealing_key(secret: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"push-relay sealed keys v1\0");
    hasher.update(secret.as_bytes());
    hasher.finalize().into()
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
    fn sealed_keys_open_only_with_the_secret() {
        let keys = DeviceKeys::generate();
        let secret = new_secret();
        let blob = seal(&secret, &keys.private_key, &keys.auth).unwrap();
        assert!(blob.windows(32).all(|w| w != keys.private_key.as_slice()));
        assert_eq!(unseal(&secret, &blob), Some((keys.private_key.clone(), keys.auth.clone())));
        assert_eq!(unseal(&new_secret(), &blob), None);
        let mut damaged = blob.clone();
        damaged[20] ^= 1;
        assert_eq!(unseal(&secret, &damaged), None);
        assert_eq!(unseal(&secret, &blob[1..]), None);
        // The stored hash of the secret is not the sealing key.
        assert_ne!(hash_secret(&secret), sealing_key(&secret).to_vec());
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
