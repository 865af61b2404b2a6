//! Helpers shared by the provider protocol tests: notifications, test keys,
//! a small PKI, JWT checks.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private, Public};
use openssl::rsa::Rsa;
use openssl::sign::Verifier;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509NameBuilder, X509};
use push_relay_providers::{Content, Encoding, Notification, Provider, Urgency};

pub fn opaque(token: &str, message_id: &str) -> Notification {
    Notification {
        message_id: message_id.into(),
        registration: format!("reg-{message_id}"),
        token: token.into(),
        instance: "mastodon.social".into(),
        account: Some("@alice@mastodon.social".into()),
        urgency: Urgency::Normal,
        ttl: Duration::from_secs(3600),
        topic: None,
        content: Content::Opaque {
            encoding: Encoding::Aesgcm,
            body: vec![7; 100],
            salt: Some(vec![1; 16]),
            dh: Some(vec![4; 65]),
        },
    }
}

pub fn decrypted(token: &str, message_id: &str) -> Notification {
    Notification {
        urgency: Urgency::Low,
        topic: Some("thread-42".into()),
        ttl: Duration::from_secs(120),
        content: Content::Decrypted {
            title: "Alice boosted your post".into(),
            body: "Hello world".into(),
            notification_id: "1234".into(),
            notification_type: "reblog".into(),
            icon: None,
        },
        ..opaque(token, message_id)
    }
}

/// Builds the provider `name` from a TOML snippet, parsed as a config file
/// living in `dir` (so relative `*_file` paths resolve there).
pub fn build(dir: &Path, toml: &str, name: &str) -> Result<Arc<dyn Provider>, String> {
    let origin = dir.join("push-relay.toml");
    let config = push_relay_config::parse(toml, origin.to_str().unwrap()).map_err(|e| e.to_string())?;
    push_relay_providers::build(name, &config.providers[name]).map_err(|e| e.to_string())
}

pub fn p256_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

pub fn rsa_key() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
}

pub fn pkcs8_pem(key: &PKey<Private>) -> String {
    String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap()
}

pub fn public_of(key: &PKey<Private>) -> PKey<Public> {
    PKey::public_key_from_der(&key.public_key_to_der().unwrap()).unwrap()
}

/// A decoded, signature-checked JWT.
pub struct Jwt {
    pub header: serde_json::Value,
    pub claims: serde_json::Value,
}

/// Checks a compact JWS against `public` (ES256 in JOSE `r‖s` form, or
/// RS256) and decodes it; `Err` says what is wrong.
pub fn verify_jwt(jwt: &str, public: &PKey<Public>, alg: &str) -> Result<Jwt, String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else { return Err(format!("not a JWS: {jwt}")) };
    let decode = |s: &str| URL_SAFE_NO_PAD.decode(s).map_err(|e| format!("bad base64url: {e}"));
    let json = |s: &str| -> Result<serde_json::Value, String> {
        serde_json::from_slice(&decode(s)?).map_err(|e| format!("bad JSON: {e}"))
    };
    let (header_json, claims_json, signature) = (json(header)?, json(claims)?, decode(signature)?);
    if header_json["alg"] != alg {
        return Err(format!("alg is {} not {alg}", header_json["alg"]));
    }
    let signature = if alg == "ES256" {
        if signature.len() != 64 {
            return Err(format!("ES256 signature of {} bytes, not 64 (r‖s)", signature.len()));
        }
        let r = BigNum::from_slice(&signature[..32]).unwrap();
        let s = BigNum::from_slice(&signature[32..]).unwrap();
        EcdsaSig::from_private_components(r, s).unwrap().to_der().unwrap()
    } else {
        signature
    };
    let mut verifier = Verifier::new(MessageDigest::sha256(), public).unwrap();
    verifier.update(format!("{header}.{claims}").as_bytes()).unwrap();
    if !verifier.verify(&signature).unwrap_or(false) {
        return Err("bad signature".into());
    }
    Ok(Jwt { header: header_json, claims: claims_json })
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A test CA and certificates it issues, made with openssl at test time.
pub struct Pki {
    pub ca: X509,
    ca_key: PKey<Private>,
}

pub struct Issued {
    pub cert: X509,
    pub key: PKey<Private>,
}

impl Issued {
    pub fn cert_pem(&self) -> String {
        String::from_utf8(self.cert.to_pem().unwrap()).unwrap()
    }

    pub fn key_pem(&self) -> String {
        pkcs8_pem(&self.key)
    }
}

impl Pki {
    pub fn new() -> Pki {
        let key = p256_key();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "push-relay test CA").unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(2).unwrap()).unwrap();
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
        b.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build().unwrap()).unwrap();
        let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None)).unwrap();
        b.append_extension(ski).unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        Pki { ca: b.build(), ca_key: key }
    }

    pub fn ca_pem(&self) -> String {
        String::from_utf8(self.ca.to_pem().unwrap()).unwrap()
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self) -> Issued {
        self.issue("127.0.0.1", p256_key(), true)
    }

    /// A client certificate (RSA, like Apple's push certificates).
    pub fn client(&self, cn: &str) -> Issued {
        self.issue(cn, rsa_key(), false)
    }

    fn issue(&self, cn: &str, key: PKey<Private>, server: bool) -> Issued {
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", cn).unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(self.ca.subject_name()).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(2).unwrap()).unwrap();
        b.append_extension(BasicConstraints::new().build().unwrap()).unwrap();
        b.append_extension(KeyUsage::new().critical().digital_signature().key_encipherment().build().unwrap())
            .unwrap();
        let eku = if server { ExtendedKeyUsage::new().server_auth().build() } else { ExtendedKeyUsage::new().client_auth().build() };
        b.append_extension(eku.unwrap()).unwrap();
        if server {
            let san = SubjectAlternativeName::new()
                .ip("127.0.0.1")
                .dns("localhost")
                .build(&b.x509v3_context(Some(&self.ca), None))
                .unwrap();
            b.append_extension(san).unwrap();
        }
        let aki = AuthorityKeyIdentifier::new().keyid(true).build(&b.x509v3_context(Some(&self.ca), None)).unwrap();
        b.append_extension(aki).unwrap();
        b.sign(&self.ca_key, MessageDigest::sha256()).unwrap();
        Issued { cert: b.build(), key }
    }
}

fn serial() -> openssl::asn1::Asn1Integer {
    let mut n = BigNum::new().unwrap();
    n.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    n.to_asn1_integer().unwrap()
}
