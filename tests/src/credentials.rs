//! Test credentials for the direct providers, made with openssl at test time:
//! P-256 `.p8` keys (APNs token auth), RSA service-account keys (FCM), a
//! small PKI (a CA, server and client certificates), and a JWS checker the
//! mock servers use to verify what the relay signs.

use std::path::Path;

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

/// A fresh P-256 key (what Apple's `.p8` files hold).
pub fn p256_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

/// A fresh 2048-bit RSA key (what service accounts hold).
pub fn rsa_key() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
}

/// `-----BEGIN PRIVATE KEY-----` (PKCS#8) PEM of a key.
pub fn pkcs8_pem(key: &PKey<Private>) -> String {
    String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap()
}

/// The public half of a key.
pub fn public_of(key: &PKey<Private>) -> PKey<Public> {
    PKey::public_key_from_der(&key.public_key_to_der().unwrap()).unwrap()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// An APNs token-auth key: the `.p8` key, its key id and the team id.
#[derive(Clone)]
pub struct ApnsKey {
    pub key_id: String,
    pub team_id: String,
    pub key: PKey<Private>,
}

impl ApnsKey {
    /// A fresh P-256 key with these ids.
    pub fn generate(key_id: &str, team_id: &str) -> ApnsKey {
        ApnsKey { key_id: key_id.into(), team_id: team_id.into(), key: p256_key() }
    }

    /// The `.p8` file's contents (PKCS#8 PEM).
    pub fn p8_pem(&self) -> String {
        pkcs8_pem(&self.key)
    }

    /// Writes the `.p8` file to `path`.
    pub fn write_p8(&self, path: &Path) {
        write(path, &self.p8_pem());
    }

    pub fn public(&self) -> PKey<Public> {
        public_of(&self.key)
    }
}

/// An FCM service account: project, client email and RSA key.
#[derive(Clone)]
pub struct ServiceAccount {
    pub project_id: String,
    pub client_email: String,
    pub key: PKey<Private>,
}

impl ServiceAccount {
    /// A fresh RSA key for `client_email` in `project_id`.
    pub fn generate(project_id: &str, client_email: &str) -> ServiceAccount {
        ServiceAccount { project_id: project_id.into(), client_email: client_email.into(), key: rsa_key() }
    }

    pub fn public(&self) -> PKey<Public> {
        public_of(&self.key)
    }

    /// The service-account JSON file Google hands out, with `token_uri`
    /// pointing where the relay must get its access tokens (a
    /// [`crate::MockFcm`]'s [`token_uri`](crate::MockFcm::token_uri)).
    pub fn json(&self, token_uri: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": "0123456789abcdef",
            "private_key": pkcs8_pem(&self.key),
            "client_email": self.client_email,
            "client_id": "1234567890",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        })
        .to_string()
    }

    /// Writes the service-account JSON file to `path`.
    pub fn write_json(&self, path: &Path, token_uri: &str) {
        write(path, &self.json(token_uri));
    }
}

/// A decoded, signature-checked JWT.
pub struct Jwt {
    pub header: serde_json::Value,
    pub claims: serde_json::Value,
}

/// Checks a compact JWS against `public` (ES256 in JOSE `r‖s` form, or
/// RS256) and decodes it; `Err` says what is wrong.
pub fn verify_jws(jwt: &str, public: &PKey<Public>, alg: &str) -> Result<Jwt, String> {
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
    let mut verifier = Verifier::new(MessageDigest::sha256(), public).map_err(|e| e.to_string())?;
    verifier.update(format!("{header}.{claims}").as_bytes()).unwrap();
    if !verifier.verify(&signature).unwrap_or(false) {
        return Err("bad signature".into());
    }
    Ok(Jwt { header: header_json, claims: claims_json })
}

/// A test CA and the certificates it issues.
pub struct Pki {
    pub ca: X509,
    ca_key: PKey<Private>,
}

/// A certificate and its key.
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

    pub fn cert_der(&self) -> Vec<u8> {
        self.cert.to_der().unwrap()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    /// A fresh self-signed CA, valid two days.
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

    /// The CA certificate as PEM (what `ca_file` points at).
    pub fn ca_pem(&self) -> String {
        String::from_utf8(self.ca.to_pem().unwrap()).unwrap()
    }

    /// Writes the CA certificate PEM to `path`.
    pub fn write_ca(&self, path: &Path) {
        write(path, &self.ca_pem());
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
