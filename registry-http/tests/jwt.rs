//! JWT bearer tokens: what the verifier refuses (forged, expired, not yet valid, wrong
//! audience, wrong issuer, `alg: none`, key confusion, unknown keys, claims of the wrong
//! type), what it accepts (its own tokens, a token server's keys from a certificate
//! bundle or a JWKS document, rotated keys), and an external token server plugged into
//! the router. Also htpasswd users and the failed-authentication throttle through the
//! router.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use registry_core::Registry;
use registry_core::access::{Action, AuthenticatedOnly, Grantee, Identity, PrefixRules};
use registry_http::jwt::libtrust_key_id;
use registry_http::{
    Auth, Htpasswd, HttpConfig, JwtVerifier, Scope, SigningKey, ThrottleConfig, TokenError,
    TokenIssuer, TokenVerifier, VerificationKey, router,
};
use tower::ServiceExt;

const SERVICE: &str = "registry.test";
const ISSUER: &str = "auth.test";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims as a token server would send them, valid for a minute.
fn claims() -> serde_json::Value {
    serde_json::json!({
        "iss": ISSUER,
        "sub": "ci",
        "aud": SERVICE,
        "exp": now() + 60,
        "nbf": now() - 1,
        "iat": now() - 1,
        "jti": "x",
        "access": [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}],
    })
}

fn sign(key: &SigningKey, claims: &serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid().to_owned());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_ec_pem(key.to_pkcs8_pem().as_bytes()).unwrap(),
    )
    .unwrap()
}

fn verifier(key: &SigningKey) -> JwtVerifier {
    JwtVerifier::new(SERVICE, [ISSUER]).with_keys([key.verification_key()])
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

#[test]
fn a_sound_token_verifies_with_its_claims() {
    let key = SigningKey::generate();
    let claims = verifier(&key).verify(&sign(&key, &claims())).unwrap();
    assert_eq!(claims.identity, Identity::user("ci"));
    assert_eq!(
        claims.scopes,
        [Scope::repository("team/app", &[Action::Pull, Action::Push])]
    );
    // An empty `sub` is an anonymous token.
    let mut anonymous = claims_with("sub", serde_json::json!(""));
    anonymous["access"] = serde_json::json!([]);
    let claims = verifier(&key).verify(&sign(&key, &anonymous)).unwrap();
    assert_eq!(claims.identity, Identity::Anonymous);
    assert!(claims.scopes.is_empty());
}

fn claims_with(field: &str, value: serde_json::Value) -> serde_json::Value {
    let mut c = claims();
    c[field] = value;
    c
}

fn without(field: &str) -> serde_json::Value {
    let mut c = claims();
    c.as_object_mut().unwrap().remove(field);
    c
}

#[test]
fn expired_early_wrong_audience_and_wrong_issuer_tokens_are_refused() {
    let key = SigningKey::generate();
    let v = verifier(&key);
    let refused = |c: serde_json::Value| v.verify(&sign(&key, &c)).unwrap_err();
    // Past the minute of leeway for clock skew.
    assert_eq!(
        refused(claims_with("exp", (now() - 120).into())),
        TokenError::Expired
    );
    assert_eq!(
        refused(claims_with("nbf", (now() + 600).into())),
        TokenError::Expired
    );
    assert_eq!(
        refused(claims_with("aud", "elsewhere".into())),
        TokenError::WrongService
    );
    assert_eq!(
        refused(claims_with("aud", serde_json::json!(["a", "b"]))),
        TokenError::WrongService
    );
    assert_eq!(
        refused(claims_with("iss", "mallory".into())),
        TokenError::WrongIssuer
    );
    // Required claims, and claims of the wrong type (never read as absent).
    assert_eq!(refused(without("exp")), TokenError::Invalid);
    assert_eq!(refused(without("iss")), TokenError::Invalid);
    assert_eq!(refused(without("aud")), TokenError::Invalid);
    assert_eq!(
        refused(claims_with("exp", "soon".into())),
        TokenError::Invalid
    );
    assert_eq!(
        refused(claims_with("nbf", "later".into())),
        TokenError::Invalid
    );
    // Within the leeway: still accepted (Distribution allows a minute as well).
    assert!(
        v.verify(&sign(&key, &claims_with("exp", (now() - 10).into())))
            .is_ok()
    );
    // An audience list naming the service is accepted.
    let listed = claims_with("aud", serde_json::json!(["other", SERVICE]));
    assert!(v.verify(&sign(&key, &listed)).is_ok());
}

#[test]
fn forged_and_unsigned_tokens_are_refused() {
    let key = SigningKey::generate();
    let v = verifier(&key);
    let token = sign(&key, &claims());
    let parts: Vec<&str> = token.split('.').collect();
    // The claims rewritten (more rights) under the original signature.
    let mut more = claims();
    more["access"][0]["actions"] = serde_json::json!(["pull", "push", "delete"]);
    let forged = format!("{}.{}.{}", parts[0], b64(&more), parts[2]);
    assert_eq!(v.verify(&forged), Err(TokenError::Invalid));
    // Another key claiming our key's id.
    let other = SigningKey::generate();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid().to_owned());
    let impostor = jsonwebtoken::encode(
        &header,
        &claims(),
        &EncodingKey::from_ec_pem(other.to_pkcs8_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(v.verify(&impostor), Err(TokenError::Invalid));
    // A key nobody trusts, under its own id, or without any id.
    assert_eq!(v.verify(&sign(&other, &claims())), Err(TokenError::Invalid));
    let mut anonymous_header = Header::new(Algorithm::ES256);
    anonymous_header.kid = None;
    let unnamed = jsonwebtoken::encode(
        &anonymous_header,
        &claims(),
        &EncodingKey::from_ec_pem(other.to_pkcs8_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(v.verify(&unnamed), Err(TokenError::Invalid));
    // alg none, with and without the signature part, in any spelling.
    for alg in ["none", "None", "NONE"] {
        let none = b64(&serde_json::json!({"alg": alg, "typ": "JWT", "kid": key.kid()}));
        let body = b64(&claims());
        assert_eq!(
            v.verify(&format!("{none}.{body}.")),
            Err(TokenError::Invalid)
        );
        assert_eq!(
            v.verify(&format!("{none}.{body}")),
            Err(TokenError::Invalid)
        );
        assert_eq!(
            v.verify(&format!("{none}.{body}.{}", parts[2])),
            Err(TokenError::Invalid)
        );
    }
    // Garbage.
    for bad in ["", ".", "..", "a.b.c", "x", &token[..token.len() - 3]] {
        assert_eq!(v.verify(bad), Err(TokenError::Invalid), "{bad:?}");
    }
}

#[test]
fn key_confusion_is_refused() {
    // HS256 with the public key (PEM, DER, its libtrust id) as the HMAC secret: a
    // verifier that took the algorithm from the token would accept these.
    let key = SigningKey::generate();
    let v = verifier(&key);
    let pem = key.public_key_pem();
    for secret in [
        pem.as_bytes(),
        pem.trim_end().as_bytes(),
        key.public_key_der(),
        key.kid().as_bytes(),
    ] {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let mut header = Header::new(alg);
            header.kid = Some(key.kid().to_owned());
            let t = jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(secret))
                .unwrap();
            assert_eq!(v.verify(&t), Err(TokenError::Invalid), "{alg:?}");
        }
    }
    // An ES256 signature relabelled as ES384 or RS256 (another algorithm, same key).
    let token = sign(&key, &claims());
    let parts: Vec<&str> = token.split('.').collect();
    for alg in ["ES384", "RS256", "PS256", "EdDSA"] {
        let h = b64(&serde_json::json!({"alg": alg, "typ": "JWT", "kid": key.kid()}));
        let t = format!("{h}.{}.{}", parts[1], parts[2]);
        assert_eq!(v.verify(&t), Err(TokenError::Invalid), "{alg}");
    }
    // A JWKS carrying a symmetric key is refused when read.
    let jwks = serde_json::json!({"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]});
    assert!(VerificationKey::from_jwks(jwks.to_string().as_bytes()).is_err());
}

#[test]
fn keys_come_from_certificates_public_keys_and_jwks() {
    let key = SigningKey::generate();
    let token = sign(&key, &claims());
    // A PEM public key block, as a bundle.
    let keys = VerificationKey::from_pem_bundle(key.public_key_pem().as_bytes()).unwrap();
    assert_eq!(keys[0].kid(), key.kid());
    assert!(
        JwtVerifier::new(SERVICE, [ISSUER])
            .with_keys(keys)
            .verify(&token)
            .is_ok()
    );
    // A JWKS document with the key's coordinates under its kid.
    let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(
        &EncodingKey::from_ec_pem(key.to_pkcs8_pem().as_bytes()).unwrap(),
        Algorithm::ES256,
    )
    .unwrap();
    let mut jwk = serde_json::to_value(jwk).unwrap();
    jwk["kid"] = key.kid().into();
    let jwks = serde_json::json!({ "keys": [jwk] }).to_string();
    let keys = VerificationKey::from_jwks(jwks.as_bytes()).unwrap();
    assert!(
        JwtVerifier::new(SERVICE, [ISSUER])
            .with_keys(keys)
            .verify(&token)
            .is_ok()
    );
    // Not keys.
    assert!(VerificationKey::from_pem_bundle(b"").is_err());
    assert!(VerificationKey::from_pem_bundle(key.to_pkcs8_pem().as_bytes()).is_err());
    assert!(VerificationKey::from_jwks(b"{\"keys\": []}").is_err());
    assert!(VerificationKey::from_jwks(b"not json").is_err());
}

#[test]
fn key_ids_are_libtrust_fingerprints() {
    let key = SigningKey::generate();
    let kid = key.kid();
    // Twelve groups of four base32 characters: 240 bits of SHA-256 of the DER key.
    let groups: Vec<&str> = kid.split(':').collect();
    assert_eq!(groups.len(), 12, "{kid}");
    assert!(groups.iter().all(|g| {
        g.len() == 4
            && g.bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
    }));
    assert_eq!(libtrust_key_id(key.public_key_der()), kid);
    // A known value: the SHA-256 of the empty input starts e3b0c442 98fc1c14 ...
    assert!(libtrust_key_id(b"").starts_with("4OYM:IQUY:7QOB:JGX3"));
    // Keys survive a round trip through PEM.
    let again = SigningKey::from_pem(&key.to_pkcs8_pem()).unwrap();
    assert_eq!(again.kid(), kid);
    assert!(SigningKey::from_pem("not a key").is_err());
}

#[test]
fn rotation_keeps_the_old_key_trusted() {
    let old = TokenIssuer::with_signing_key(SERVICE, SigningKey::generate());
    let new = TokenIssuer::with_signing_key(SERVICE, SigningKey::generate())
        .with_trusted_key(old.signing_key().verification_key());
    let t = old.issue(&Identity::user("ci"), &[], Duration::from_secs(60));
    assert!(new.verify(&t).is_ok(), "the old key's tokens stay valid");
    let t = new.issue(&Identity::user("ci"), &[], Duration::from_secs(60));
    assert_eq!(
        old.verify(&t),
        Err(TokenError::Invalid),
        "the old issuer never knew the new key"
    );
    // The issuer's own name is checked too.
    let other =
        TokenIssuer::with_signing_key(SERVICE, new.signing_key().clone()).with_issuer("elsewhere");
    let t = other.issue(&Identity::user("ci"), &[], Duration::from_secs(60));
    assert_eq!(new.verify(&t), Err(TokenError::WrongIssuer));
}

// ---------------------------------------------------------------- through the router

async fn call(
    app: &Router,
    uri: &str,
    auth: Option<&str>,
    from: &str,
) -> (StatusCode, axum::http::HeaderMap) {
    let mut req = Request::builder().uri(uri).header("host", "localhost");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let mut req = req.body(Body::empty()).unwrap();
    let peer: SocketAddr = from.parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(peer));
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let _ = resp.into_body().collect().await;
    (status, headers)
}

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{pass}")))
}

#[tokio::test]
async fn an_external_token_server_is_trusted_for_its_service() {
    // The token server: another process in real life (scripts/e2e-auth.sh); here its
    // issuer, with a key the registry trusts through its certificate-less public key.
    let server_key = SigningKey::generate();
    let server = TokenIssuer::with_signing_key(SERVICE, server_key.clone()).with_issuer(ISSUER);
    let registry = Registry::in_memory();
    let verifier = JwtVerifier::new(SERVICE, [ISSUER]).with_keys(
        VerificationKey::from_pem_bundle(server_key.public_key_pem().as_bytes()).unwrap(),
    );
    let auth = Auth::new(PrefixRules::new().grant(Grantee::Authenticated, "", Action::ALL))
        .with_token_verifier(verifier, "https://auth.test/token", SERVICE);
    let app = router(registry, HttpConfig::default().with_auth(auth));

    // The challenge sends clients to the external realm.
    let (status, headers) = call(&app, "/v2/", None, "192.0.2.1:1").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        headers["www-authenticate"],
        format!("Bearer realm=\"https://auth.test/token\",service=\"{SERVICE}\"")
    );
    // No token endpoint of our own.
    assert_eq!(
        call(&app, "/token", None, "192.0.2.1:1").await.0,
        StatusCode::NOT_FOUND
    );

    let scopes = [Scope::repository("team/app", &[Action::Pull])];
    let good = server.issue(&Identity::user("ci"), &scopes, Duration::from_secs(60));
    let bearer = |t: &str| format!("Bearer {t}");
    assert_eq!(
        call(
            &app,
            "/v2/team/app/tags/list",
            Some(&bearer(&good)),
            "192.0.2.1:1"
        )
        .await
        .0,
        StatusCode::NOT_FOUND,
        "authorized (the repository is simply empty)"
    );
    // Outside the token's scope: 403 with a challenge for more scope.
    let (status, headers) = call(
        &app,
        "/v2/other/tags/list",
        Some(&bearer(&good)),
        "192.0.2.1:1",
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("insufficient_scope")
    );
    // Tokens for another service, from another issuer name, or by another key.
    let elsewhere = TokenIssuer::with_signing_key("elsewhere", server_key.clone())
        .with_issuer(ISSUER)
        .issue(&Identity::user("ci"), &scopes, Duration::from_secs(60));
    let renamed = TokenIssuer::with_signing_key(SERVICE, server_key.clone())
        .with_issuer("mallory")
        .issue(&Identity::user("ci"), &scopes, Duration::from_secs(60));
    let foreign = TokenIssuer::with_signing_key(SERVICE, SigningKey::generate())
        .with_issuer(ISSUER)
        .issue(&Identity::user("ci"), &scopes, Duration::from_secs(60));
    for bad in [elsewhere, renamed, foreign] {
        let (status, headers) = call(
            &app,
            "/v2/team/app/tags/list",
            Some(&bearer(&bad)),
            "192.0.2.1:1",
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token")
        );
    }
}

#[tokio::test]
async fn htpasswd_users_and_throttled_guessing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("htpasswd");
    std::fs::write(
        &path,
        format!("alice:{}\n", bcrypt::hash("alice-pw", 4).unwrap()),
    )
    .unwrap();
    let auth = Auth::new(AuthenticatedOnly)
        .with_htpasswd(Htpasswd::open(&path).unwrap())
        .with_throttle(ThrottleConfig {
            max_failures_per_identity: 3,
            max_failures_per_address: 5,
            window: Duration::from_secs(3600),
            lockout: Duration::from_secs(3600),
            max_lockout: Duration::from_secs(3600),
        });
    let app = router(Registry::in_memory(), HttpConfig::default().with_auth(auth));
    let a = "192.0.2.1:1";
    assert_eq!(
        call(&app, "/v2/", Some(&basic("alice", "alice-pw")), a)
            .await
            .0,
        StatusCode::OK
    );
    for _ in 0..3 {
        assert_eq!(
            call(&app, "/v2/", Some(&basic("alice", "guess")), a)
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
    }
    // Locked: even the right password waits, and says for how long.
    let (status, headers) = call(&app, "/v2/", Some(&basic("alice", "alice-pw")), a).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((3500..=3600).contains(&retry), "{retry}");
    // The same name from another address is locked too (the identity is).
    let (status, _) = call(
        &app,
        "/v2/",
        Some(&basic("alice", "alice-pw")),
        "192.0.2.2:1",
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Another name from the first address is not, until the address reaches its limit.
    for _ in 0..2 {
        assert_eq!(
            call(&app, "/v2/", Some(&basic("bob", "guess")), a).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        call(&app, "/v2/", Some(&basic("carol", "guess")), a)
            .await
            .0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Bad tokens count against the address as well.
    let b = "192.0.2.3:1";
    for _ in 0..5 {
        assert_eq!(
            call(&app, "/v2/", Some("Bearer x.y.z"), b).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        call(&app, "/v2/", Some("Bearer x.y.z"), b).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Requests without credentials are never throttled: they are only challenged.
    assert_eq!(
        call(&app, "/v2/", None, b).await.0,
        StatusCode::UNAUTHORIZED
    );
}
