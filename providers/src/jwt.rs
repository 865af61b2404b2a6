//! The two JWTs the direct providers sign, with `openssl`:
//! - APNs provider tokens: ES256 (RFC 7518 §3.4: the signature is the JOSE
//!   form `r ‖ s`, 32 bytes each, not the DER that OpenSSL produces);
//! - Google OAuth2 JWT-bearer assertions (RFC 7523): RS256.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private};
use openssl::sign::Signer;
use serde::Serialize;

/// A private key and the JWS algorithm it signs with.
pub(crate) struct JwtKey {
    key: PKey<Private>,
    alg: Alg,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Alg {
    Es256,
    Rs256,
}

impl JwtKey {
    /// A P-256 key (an APNs `.p8` file, PKCS#8 PEM); `None` for anything else.
    pub(crate) fn es256_from_pem(pem: &str) -> Option<JwtKey> {
        let key = PKey::private_key_from_pem(pem.as_bytes()).ok()?;
        let curve = key.ec_key().ok()?.group().curve_name();
        (key.id() == Id::EC && curve == Some(Nid::X9_62_PRIME256V1)).then_some(JwtKey { key, alg: Alg::Es256 })
    }

    /// An RSA key (a service account's `private_key`, PEM); `None` for anything else.
    pub(crate) fn rs256_from_pem(pem: &str) -> Option<JwtKey> {
        let key = PKey::private_key_from_pem(pem.as_bytes()).ok()?;
        (key.id() == Id::RSA && key.bits() >= 2048).then_some(JwtKey { key, alg: Alg::Rs256 })
    }

    /// `header.claims.signature`, each base64url without padding. `header`
    /// gets `alg` (and `typ` for RS256) added.
    pub(crate) fn sign(&self, header: &serde_json::Value, claims: &impl Serialize) -> Result<String, String> {
        let mut header = header.clone();
        if let Some(h) = header.as_object_mut() {
            h.insert("alg".into(), (if self.alg == Alg::Es256 { "ES256" } else { "RS256" }).into());
            if self.alg == Alg::Rs256 {
                h.insert("typ".into(), "JWT".into());
            }
        }
        let input = format!("{}.{}", b64_json(&header)?, b64_json(claims)?);
        let signature = self.signature(input.as_bytes()).map_err(|e| format!("cannot sign a JWT: {e}"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }

    fn signature(&self, input: &[u8]) -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let mut signer = Signer::new(MessageDigest::sha256(), &self.key)?;
        signer.update(input)?;
        let der = signer.sign_to_vec()?;
        match self.alg {
            Alg::Rs256 => Ok(der),
            Alg::Es256 => {
                let sig = EcdsaSig::from_der(&der)?;
                let mut jose = sig.r().to_vec_padded(32)?;
                jose.extend(sig.s().to_vec_padded(32)?);
                Ok(jose)
            }
        }
    }

    /// The public key, DER (SubjectPublicKeyInfo).
    #[cfg(test)]
    fn public_der(&self) -> Vec<u8> {
        self.key.public_key_to_der().unwrap_or_default()
    }
}

fn b64_json<T: Serialize + ?Sized>(value: &T) -> Result<String, String> {
    serde_json::to_vec(value)
        .map(|bytes| URL_SAFE_NO_PAD.encode(bytes))
        .map_err(|e| format!("cannot encode a JWT: {e}"))
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::rsa::Rsa;
    use openssl::sign::Verifier;

    fn split(jwt: &str) -> (serde_json::Value, serde_json::Value, Vec<u8>, String) {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let json = |s: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap();
        (json(parts[0]), json(parts[1]), URL_SAFE_NO_PAD.decode(parts[2]).unwrap(), format!("{}.{}", parts[0], parts[1]))
    }

    #[test]
    fn es256_is_jose_and_verifies() {
        let ec = EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap();
        let pem = String::from_utf8(PKey::from_ec_key(ec.clone()).unwrap().private_key_to_pem_pkcs8().unwrap()).unwrap();
        let key = JwtKey::es256_from_pem(&pem).unwrap();
        let jwt = key.sign(&serde_json::json!({"kid": "K"}), &serde_json::json!({"iss": "T", "iat": 1})).unwrap();
        let (header, claims, sig, input) = split(&jwt);
        assert_eq!(header, serde_json::json!({"alg": "ES256", "kid": "K"}));
        assert_eq!(claims["iss"], "T");
        assert_eq!(sig.len(), 64);
        let r = openssl::bn::BigNum::from_slice(&sig[..32]).unwrap();
        let s = openssl::bn::BigNum::from_slice(&sig[32..]).unwrap();
        let der = EcdsaSig::from_private_components(r, s).unwrap().to_der().unwrap();
        let public = PKey::public_key_from_der(&key.public_der()).unwrap();
        let mut verifier = Verifier::new(MessageDigest::sha256(), &public).unwrap();
        verifier.update(input.as_bytes()).unwrap();
        assert!(verifier.verify(&der).unwrap());
    }

    #[test]
    fn rs256_verifies() {
        let pem = String::from_utf8(
            PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap().private_key_to_pem_pkcs8().unwrap(),
        )
        .unwrap();
        let key = JwtKey::rs256_from_pem(&pem).unwrap();
        let jwt = key.sign(&serde_json::json!({}), &serde_json::json!({"iss": "a"})).unwrap();
        let (header, _, sig, input) = split(&jwt);
        assert_eq!(header, serde_json::json!({"alg": "RS256", "typ": "JWT"}));
        let public = PKey::public_key_from_der(&key.public_der()).unwrap();
        let mut verifier = Verifier::new(MessageDigest::sha256(), &public).unwrap();
        verifier.update(input.as_bytes()).unwrap();
        assert!(verifier.verify(&sig).unwrap());
    }

    #[test]
    fn wrong_keys_are_refused() {
        let p384 = EcKey::generate(&EcGroup::from_curve_name(Nid::SECP384R1).unwrap()).unwrap();
        let p384 = String::from_utf8(PKey::from_ec_key(p384).unwrap().private_key_to_pem_pkcs8().unwrap()).unwrap();
        assert!(JwtKey::es256_from_pem(&p384).is_none());
        assert!(JwtKey::rs256_from_pem(&p384).is_none());
        assert!(JwtKey::es256_from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_none());
        assert!(JwtKey::es256_from_pem("").is_none());
    }
}
