//! Bearer tokens as JWTs with the Docker token-auth claims, signed and verified with
//! `jsonwebtoken`.
//!
//! A token's header names its algorithm and key (`kid`); its claims are `iss` (who
//! issued it), `sub` (the user, empty for anonymous), `aud` (the service it is for),
//! `exp`, `nbf`, `iat`, `jti` and `access` (a list of `{type, name, actions}`).
//!
//! Verification accepts a token only when all of these hold:
//! - its header's `alg` is one the verifying key is for (ES256 for a P-256 key, ES384 for
//!   P-384, RS256/384/512 and PS256/384/512 for RSA, EdDSA for Ed25519). The algorithm
//!   comes from the key, never from the token: `none`, and HMAC signed with a public key
//!   (key confusion), are refused;
//! - its `kid` names a trusted key (without a `kid`, one of the trusted keys verifies it);
//! - the signature verifies with that key;
//! - `iss` is a trusted issuer and `aud` is this service;
//! - `exp` has not passed and `nbf` has (both with a minute of leeway for clock skew,
//!   as Distribution allows), both present as numbers.
//!
//! Key ids follow libtrust, the format Distribution uses: the SHA-256 of the key's DER
//! `SubjectPublicKeyInfo`, its first 240 bits in base32, in groups of four joined by
//! `:`. Distribution looks up a token's `kid` among the keys of its
//! `auth.token.rootcertbundle` by that id, so tokens from [`TokenIssuer`] are accepted by
//! a Distribution registry given the issuer's certificate.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use data_encoding::BASE32_NOPAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, EncodePublicKey as _};
use registry_core::access::Identity;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use x509_cert::der::{Decode as _, Encode as _};
use x509_cert::spki;

use crate::auth::{Resource, Scope, TokenClaims, TokenError, TokenVerifier};

/// Seconds of clock skew tolerated on `exp` and `nbf` (Distribution's leeway).
const LEEWAY_SECS: u64 = 60;

/// Why a key could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

fn key_error(what: impl Into<String>) -> KeyError {
    KeyError(what.into())
}

/// The libtrust key id of a public key given as DER `SubjectPublicKeyInfo`: base32 of
/// the first 240 bits of its SHA-256, in groups of four characters joined by `:`
/// (`ABCD:EFGH:...`, twelve groups). Distribution matches tokens' `kid` against it.
pub fn libtrust_key_id(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    let encoded = BASE32_NOPAD.encode(&digest[..30]);
    let groups: Vec<&str> = (0..encoded.len())
        .step_by(4)
        .map(|i| &encoded[i..(i + 4).min(encoded.len())])
        .collect();
    groups.join(":")
}

/// The private key a [`TokenIssuer`] signs with: ECDSA P-256 (ES256).
///
/// Read it from a PKCS#8 PEM file (`openssl genpkey -algorithm EC -pkeyopt
/// ec_paramgen_curve:P-256`), or generate one and write
/// [`to_pkcs8_pem`](Self::to_pkcs8_pem) to share it between processes. Its `Debug` never
/// shows the key.
#[derive(Clone)]
pub struct SigningKey {
    encoding: EncodingKey,
    pkcs8_der: Arc<[u8]>,
    spki_der: Arc<[u8]>,
    kid: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh random P-256 key.
    pub fn generate() -> Self {
        loop {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).expect("the operating system's random source failed");
            // Almost every 256-bit string is a valid scalar; retry the rare others.
            if let Ok(secret) = p256::SecretKey::from_slice(&bytes) {
                return Self::from_secret(&secret).expect("a generated key encodes");
            }
        }
    }

    /// Reads a P-256 private key from PEM: PKCS#8 (`PRIVATE KEY`) or SEC1 (`EC PRIVATE
    /// KEY`, what `openssl ecparam -genkey` writes).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let secret = p256::SecretKey::from_pkcs8_pem(pem)
            .or_else(|_| p256::SecretKey::from_sec1_pem(pem))
            .map_err(|_| {
                key_error("not a P-256 private key in PEM (PKCS#8 \"PRIVATE KEY\" or SEC1 \"EC PRIVATE KEY\")")
            })?;
        Self::from_secret(&secret)
    }

    fn from_secret(secret: &p256::SecretKey) -> Result<Self, KeyError> {
        let pkcs8 = secret
            .to_pkcs8_der()
            .map_err(|e| key_error(format!("cannot encode the key: {e}")))?;
        let spki = secret
            .public_key()
            .to_public_key_der()
            .map_err(|e| key_error(format!("cannot encode the public key: {e}")))?;
        Ok(SigningKey {
            encoding: EncodingKey::from_ec_der(pkcs8.as_bytes()),
            pkcs8_der: pkcs8.as_bytes().into(),
            kid: libtrust_key_id(spki.as_bytes()),
            spki_der: spki.as_bytes().into(),
        })
    }

    /// The key as PKCS#8 PEM, to write to a key file (keep it private).
    pub fn to_pkcs8_pem(&self) -> String {
        pem::encode(&pem::Pem::new("PRIVATE KEY", self.pkcs8_der.to_vec()))
    }

    /// The key as PKCS#8 DER (for certificate tools).
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8_der
    }

    /// The public key as PEM (`PUBLIC KEY`), for verifiers that take keys.
    pub fn public_key_pem(&self) -> String {
        pem::encode(&pem::Pem::new("PUBLIC KEY", self.spki_der.to_vec()))
    }

    /// The public key as DER `SubjectPublicKeyInfo`.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The key id tokens carry in their header (libtrust format, see
    /// [`libtrust_key_id`]).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The key that verifies this key's signatures.
    pub fn verification_key(&self) -> VerificationKey {
        VerificationKey::from_spki_der(&self.spki_der).expect("our own public key is valid")
    }
}

/// A public key trusted to sign tokens, with its key id and the algorithms it may be
/// used with (fixed by the key's type).
#[derive(Clone)]
pub struct VerificationKey {
    kid: String,
    key: Arc<DecodingKey>,
    algorithms: Vec<Algorithm>,
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

const OID_EC: &str = "1.2.840.10045.2.1";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_ED25519: &str = "1.3.101.112";
const RSA_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

impl VerificationKey {
    /// A key from its DER `SubjectPublicKeyInfo` (EC P-256 or P-384, RSA, Ed25519), with
    /// its libtrust key id.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let spki = spki::SubjectPublicKeyInfoRef::from_der(der)
            .map_err(|e| key_error(format!("not a public key: {e}")))?;
        let bits = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| key_error("a public key with unused bits"))?;
        let (key, algorithms) = match spki.algorithm.oid.to_string().as_str() {
            OID_EC => match bits.len() {
                65 => (DecodingKey::from_ec_der(bits), vec![Algorithm::ES256]),
                97 => (DecodingKey::from_ec_der(bits), vec![Algorithm::ES384]),
                n => {
                    return Err(key_error(format!(
                        "an EC key of {n} bytes: only P-256 and P-384 are supported"
                    )));
                }
            },
            OID_RSA => (DecodingKey::from_rsa_der(bits), RSA_ALGORITHMS.to_vec()),
            OID_ED25519 => (DecodingKey::from_ed_der(bits), vec![Algorithm::EdDSA]),
            oid => return Err(key_error(format!("unsupported public key algorithm {oid}"))),
        };
        Ok(VerificationKey {
            kid: libtrust_key_id(der),
            key: Arc::new(key),
            algorithms,
        })
    }

    /// Every key in a PEM file: certificates (a root certificate bundle, as
    /// Distribution's `auth.token.rootcertbundle`) and public keys (`PUBLIC KEY`). Other
    /// blocks are an error, and so is a file without any key.
    pub fn from_pem_bundle(pem: &[u8]) -> Result<Vec<Self>, KeyError> {
        let blocks = pem::parse_many(pem).map_err(|e| key_error(format!("not PEM: {e}")))?;
        let mut keys = Vec::new();
        for block in blocks {
            let spki = match block.tag() {
                "CERTIFICATE" => {
                    let cert = x509_cert::Certificate::from_der(block.contents())
                        .map_err(|e| key_error(format!("not an X.509 certificate: {e}")))?;
                    cert.tbs_certificate
                        .subject_public_key_info
                        .to_der()
                        .map_err(|e| key_error(format!("a certificate's key: {e}")))?
                }
                "PUBLIC KEY" => block.contents().to_vec(),
                other => {
                    return Err(key_error(format!(
                        "a {other:?} block: expected CERTIFICATE or PUBLIC KEY"
                    )));
                }
            };
            keys.push(Self::from_spki_der(&spki)?);
        }
        if keys.is_empty() {
            return Err(key_error("no certificate or public key in the file"));
        }
        Ok(keys)
    }

    /// Every key of a JWKS document (`{"keys": [...]}`), under the `kid` each names (or
    /// its libtrust id when it names none). Symmetric (`oct`) keys are refused: a
    /// registry must never accept tokens signed with a secret it can read.
    pub fn from_jwks(json: &[u8]) -> Result<Vec<Self>, KeyError> {
        let set: JwkSet = serde_json::from_slice(json)
            .map_err(|e| key_error(format!("not a JWKS document: {e}")))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let algorithms = match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    EllipticCurve::P256 => vec![Algorithm::ES256],
                    EllipticCurve::P384 => vec![Algorithm::ES384],
                    _ => return Err(key_error("an EC key on an unsupported curve")),
                },
                AlgorithmParameters::RSA(_) => RSA_ALGORITHMS.to_vec(),
                AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
                AlgorithmParameters::OctetKey(_) => {
                    return Err(key_error(
                        "a symmetric (oct) key: only public keys are trusted",
                    ));
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| key_error(format!("a JWK: {e}")))?;
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            keys.push(VerificationKey {
                kid,
                key: Arc::new(key),
                algorithms,
            });
        }
        if keys.is_empty() {
            return Err(key_error("no key in the JWKS document"));
        }
        Ok(keys)
    }

    /// The key id tokens signed by this key name.
    pub fn kid(&self) -> &str {
        &self.kid
    }
}

/// The claims of an issued token (the Docker token-auth format).
#[derive(Serialize)]
struct IssuedClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: Vec<WireAccess>,
}

/// The claims read from a verified token; `iss`, `aud`, `exp` and `nbf` are checked by
/// `jsonwebtoken` before these are looked at.
#[derive(Deserialize)]
struct ReadClaims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    access: Option<Vec<WireAccess>>,
}

/// One `access` entry: `{"type": "repository", "name": "a/b", "actions": ["pull"]}`.
#[derive(Serialize, Deserialize)]
struct WireAccess {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    #[serde(default)]
    actions: Vec<String>,
}

impl WireAccess {
    fn of(scope: &Scope) -> Self {
        match &scope.resource {
            Resource::Catalog => WireAccess {
                kind: "registry".into(),
                name: "catalog".into(),
                actions: vec!["*".into()],
            },
            Resource::Repository(name) => WireAccess {
                kind: "repository".into(),
                name: name.clone(),
                actions: scope
                    .actions
                    .iter()
                    .map(|a| a.as_str().to_owned())
                    .collect(),
            },
        }
    }

    fn scope(&self) -> Option<Scope> {
        // The parts are rejoined and parsed as a scope string: one parser for both.
        if self.kind.contains(':') || self.actions.iter().any(|a| a.contains([',', ':'])) {
            return None;
        }
        Scope::parse(&format!(
            "{}:{}:{}",
            self.kind,
            self.name,
            self.actions.join(",")
        ))
    }
}

/// Verifies JWTs: trusted keys, trusted issuers, one service (audience). The verifier
/// for an external token server (Distribution's `auth.token`: `issuer`, `service`,
/// `rootcertbundle` or `jwks`).
///
/// ```
/// use registry_http::{JwtVerifier, SigningKey, TokenIssuer, TokenVerifier};
/// use registry_core::access::Identity;
///
/// let key = SigningKey::generate();
/// let server = TokenIssuer::with_signing_key("registry.example", key.clone())
///     .with_issuer("auth.example");
/// let verifier = JwtVerifier::new("registry.example", ["auth.example"])
///     .with_keys([key.verification_key()]);
/// let token = server.issue(&Identity::user("ci"), &[], std::time::Duration::from_secs(60));
/// assert_eq!(verifier.verify(&token).unwrap().identity, Identity::user("ci"));
/// ```
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    service: String,
    issuers: Vec<String>,
    keys: Vec<VerificationKey>,
}

impl JwtVerifier {
    /// A verifier for tokens whose `aud` is `service` and whose `iss` is one of
    /// `issuers`; add the keys it trusts with [`with_keys`](Self::with_keys).
    pub fn new(
        service: impl Into<String>,
        issuers: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        JwtVerifier {
            service: service.into(),
            issuers: issuers.into_iter().map(Into::into).collect(),
            keys: Vec::new(),
        }
    }

    /// Also trusts `keys` (several at once: rotation keeps the old key trusted until the
    /// tokens it signed have expired).
    pub fn with_keys(mut self, keys: impl IntoIterator<Item = VerificationKey>) -> Self {
        self.keys.extend(keys);
        self
    }

    /// The service tokens must be for.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The trusted keys.
    pub fn keys(&self) -> &[VerificationKey] {
        &self.keys
    }
}

impl TokenVerifier for JwtVerifier {
    fn verify(&self, token: &str) -> Result<TokenClaims, TokenError> {
        // The header is only read to pick the key; the algorithm accepted is the key's.
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        let candidates: Vec<&VerificationKey> = match &header.kid {
            Some(kid) => self.keys.iter().filter(|k| k.kid == *kid).collect(),
            None => self.keys.iter().collect(),
        };
        let mut last = TokenError::Invalid;
        for key in candidates {
            if !key.algorithms.contains(&header.alg) {
                continue;
            }
            let mut validation = Validation::new(header.alg);
            validation.algorithms = key.algorithms.clone();
            validation.leeway = LEEWAY_SECS;
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.set_audience(&[&self.service]);
            validation.set_issuer(&self.issuers);
            validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            match jsonwebtoken::decode::<ReadClaims>(token, &key.key, &validation) {
                Ok(data) => return Ok(claims_of(data.claims)),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::ExpiredSignature | K::ImmatureSignature => TokenError::Expired,
                        K::InvalidAudience => TokenError::WrongService,
                        K::InvalidIssuer => TokenError::WrongIssuer,
                        _ => TokenError::Invalid,
                    };
                    // A signature that verified with this key settles it.
                    if last != TokenError::Invalid {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

fn claims_of(claims: ReadClaims) -> TokenClaims {
    let identity = match claims.sub {
        Some(sub) if !sub.is_empty() => Identity::User(sub),
        _ => Identity::Anonymous,
    };
    let scopes = claims
        .access
        .unwrap_or_default()
        .iter()
        .filter_map(WireAccess::scope)
        .collect();
    TokenClaims { identity, scopes }
}

/// The built-in token server's signer: issues ES256 JWTs for one service, and verifies
/// them (with its own key and any older keys still trusted).
///
/// Several processes serving one registry accept each other's tokens when they share
/// the signing key ([`TokenIssuer::with_signing_key`], from one key file); a key is
/// rotated by signing with the new key while still trusting the old one
/// ([`TokenIssuer::with_trusted_key`]) until the last token it signed has expired.
#[derive(Clone)]
pub struct TokenIssuer {
    issuer: String,
    key: SigningKey,
    verifier: JwtVerifier,
    ttl: Duration,
}

impl fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("service", &self.verifier.service)
            .field("issuer", &self.issuer)
            .field("kid", &self.key.kid)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// An issuer for `service` with a fresh random key and tokens valid for five
    /// minutes; its `iss` is the service name.
    pub fn new(service: impl Into<String>) -> Self {
        Self::with_signing_key(service, SigningKey::generate())
    }

    /// An issuer signing with `key` (share it between processes that serve one store).
    pub fn with_signing_key(service: impl Into<String>, key: SigningKey) -> Self {
        let service = service.into();
        TokenIssuer {
            issuer: service.clone(),
            verifier: JwtVerifier::new(service.clone(), [service])
                .with_keys([key.verification_key()]),
            key,
            ttl: Duration::from_secs(300),
        }
    }

    /// Sets the `iss` claim of issued tokens (what verifiers configure as the trusted
    /// issuer, Distribution's `auth.token.issuer`).
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = issuer.into();
        self.verifier.issuers = vec![self.issuer.clone()];
        self
    }

    /// Also accepts tokens signed by `key` (the previous key, during a rotation).
    pub fn with_trusted_key(mut self, key: VerificationKey) -> Self {
        self.verifier.keys.push(key);
        self
    }

    /// Sets how long issued tokens stay valid.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The service name tokens are issued for (`aud`, and the `service` of challenges).
    pub fn service(&self) -> &str {
        &self.verifier.service
    }

    /// The `iss` of issued tokens.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// How long issued tokens stay valid.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Signs a token for `identity` granting exactly `scopes`, valid for `ttl` from now.
    /// The caller decides the scopes: the token endpoint grants only what the policy
    /// allows.
    pub fn issue(&self, identity: &Identity, scopes: &[Scope], ttl: Duration) -> String {
        self.issue_at(identity, scopes, SystemTime::now(), ttl)
    }

    /// [`issue`](Self::issue) as if the time were `at` (`iat` and `nbf`; `exp` is `at +
    /// ttl`): tokens that are already expired or not yet valid, for tests.
    pub fn issue_at(
        &self,
        identity: &Identity,
        scopes: &[Scope],
        at: SystemTime,
        ttl: Duration,
    ) -> String {
        let now = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut jti = [0u8; 16];
        getrandom::fill(&mut jti).expect("the operating system's random source failed");
        let claims = IssuedClaims {
            iss: &self.issuer,
            sub: identity.name().unwrap_or(""),
            aud: &self.verifier.service,
            exp: now.saturating_add(ttl.as_secs()),
            nbf: now,
            iat: now,
            jti: data_encoding::HEXLOWER.encode(&jti),
            access: scopes.iter().map(WireAccess::of).collect(),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key.encoding)
            .expect("ES256 signing cannot fail")
    }
}

impl TokenVerifier for TokenIssuer {
    fn verify(&self, token: &str) -> Result<TokenClaims, TokenError> {
        self.verifier.verify(token)
    }
}
