//! The router with access control on, driven by arbitrary request sequences carrying
//! arbitrary credentials: right and wrong passwords, tokens for any identity and scope
//! (signed by the registry's key, so real), expired ones, ones for another service,
//! tampered ones, crafted JWTs (any `alg` including `none` and HMAC signed with the
//! public key, any `kid`, claims missing, of the wrong type or out of date, signed by
//! the right key, another key or not at all), and raw `Authorization` headers.
//!
//! The oracle is independent of the router's own bookkeeping: from the credentials the
//! input chose it knows who the caller provably is and what the policy and the token's
//! scopes allow, and checks after every response that
//! - bad credentials are 401 (never treated as anonymous), and nothing else succeeds;
//! - a request the caller may not make is 401 (anonymous: ask for credentials) or 403
//!   (authenticated), and changes nothing; one it may make is never refused as such;
//! - a mount from a repository the caller cannot pull never happens;
//! - the catalog lists exactly the repositories the caller may list;
//! - the token endpoint issues tokens only to the caller it authenticated, never
//!   granting more than the policy allows, and never to a token holder;
//! - no response is a 5xx.
#![no_main]

use std::cell::RefCell;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::Arbitrary;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use registry_core::access::{Action, Authorizer, Grantee, Identity, PrefixRules};
use registry_core::{AllowAll, Digest, ListOptions, Registry, testkit};
use registry_http::{
    Auth, HttpConfig, Resource, Scope, SigningKey, ThrottleConfig, TokenIssuer, TokenVerifier,
};
use tower::ServiceExt;

const SERVICE: &str = "registry";
/// The registry's signing key; the oracle signs tokens with it as well.
static KEY: LazyLock<SigningKey> = LazyLock::new(SigningKey::generate);
/// A key the registry does not trust.
static OTHER_KEY: LazyLock<SigningKey> = LazyLock::new(SigningKey::generate);

/// Every repository the sequence talks about; the first two hold an image from the start.
const REPOS: [&str; 5] = ["pub/app", "alice/app", "alice/app/sub", "bob/app", "other"];
const USERS: [(&str, &str); 2] = [("alice", "alice-pw"), ("bob", "bob-pw")];
const BLOBS: [&[u8]; 3] = [b"{}", b"layer one", b"layer two, longer"];

fn policy() -> PrefixRules {
    PrefixRules::new()
        .grant(Grantee::Anyone, "pub", Action::READ)
        .grant(Grantee::user("alice"), "alice", Action::ALL)
        .grant(Grantee::user("alice"), "pub", Action::ALL)
        .grant(Grantee::user("bob"), "alice", Action::READ)
}

fn pick<T: Copy>(items: &[T], i: u8) -> T {
    items[i as usize % items.len()]
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Who {
    Anonymous,
    Alice,
    Bob,
    /// Not a user: tokens for it are signed, but the policy grants it only what it
    /// grants anyone.
    Mallory,
}

impl Who {
    fn identity(self) -> Identity {
        match self {
            Who::Anonymous => Identity::Anonymous,
            Who::Alice => Identity::user("alice"),
            Who::Bob => Identity::user("bob"),
            Who::Mallory => Identity::user("mallory"),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct TokenSpec {
    who: Who,
    /// Repository index and action bits (pull, push, delete, list).
    scopes: Vec<(u8, u8)>,
    catalog: bool,
    /// What is wrong with the token, if anything (most are sound, so that the
    /// fuzzer spends its time on what sound tokens may and may not do).
    flaw: u8,
    /// Position and xor mask of the byte to change, for a tampered token.
    tamper: (u16, u8),
}

impl TokenSpec {
    fn expired(&self) -> bool {
        self.flaw % 8 == 1
    }

    fn other_service(&self) -> bool {
        self.flaw % 8 == 2
    }

    fn tampered(&self) -> bool {
        self.flaw % 8 == 3
    }
}

/// A JWT built field by field; the oracle knows which combinations are sound.
#[derive(Arbitrary, Debug)]
struct Crafted {
    /// ES256 (sound), ES384, RS256, HS256, none, EdDSA, or an arbitrary string.
    alg: u8,
    alg_text: String,
    /// Our key's id (sound), none (sound), another key's id, an arbitrary string.
    kid: u8,
    kid_text: String,
    /// Missing, ours (sound), another issuer, a number.
    iss: u8,
    /// Missing, ours (sound), another service, a list with ours (sound), a number.
    aud: u8,
    /// Missing, in 10 min (sound), 10 min ago, a string, a float in 10 min.
    exp: u8,
    /// Missing (sound), a minute ago (sound), in 10 min, a string.
    nbf: u8,
    who: Who,
    scopes: Vec<(u8, u8)>,
    /// An extra claim, which changes nothing.
    extra: Option<(String, String)>,
    /// ES256 by our key (sound), ES256 by another key, HS256 with our public key as the
    /// secret, no signature, arbitrary bytes.
    sign: u8,
    junk: Vec<u8>,
}

impl Crafted {
    fn alg(&self) -> &str {
        match self.alg % 7 {
            0 => "ES256",
            1 => "ES384",
            2 => "RS256",
            3 => "HS256",
            4 => "none",
            5 => "EdDSA",
            _ => self.alg_text.as_str(),
        }
    }

    fn sound(&self) -> bool {
        self.sound_but_exp() && self.exp % 5 == 1
    }

    /// Sound but for an `exp` with a fraction of a second: RFC 7519 allows
    /// non-integer NumericDates, and whether one is accepted is the JWT library's
    /// choice (jsonwebtoken 10.4 accepts it), so the oracle does not judge it.
    fn fractional_exp(&self) -> bool {
        self.sound_but_exp() && self.exp % 5 == 4
    }

    fn sound_but_exp(&self) -> bool {
        // An arbitrary `alg` or `kid` text may happen to spell the sound value.
        self.alg() == "ES256"
            && (self.kid % 4 < 2 || (self.kid % 4 == 3 && self.kid_text == KEY.kid()))
            && self.iss % 4 == 1
            && matches!(self.aud % 5, 1 | 3)
            && self.nbf % 4 < 2
            && self.sign % 5 == 0
    }

    fn token(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let mut header = serde_json::json!({ "typ": "JWT", "alg": self.alg() });
        match self.kid % 4 {
            0 => header["kid"] = KEY.kid().into(),
            1 => {}
            2 => header["kid"] = OTHER_KEY.kid().into(),
            _ => header["kid"] = self.kid_text.as_str().into(),
        }
        let mut claims = serde_json::json!({
            "sub": self.who.identity().name().unwrap_or(""),
            "iat": now,
            "access": scopes(&self.scopes, false)
                .iter()
                .map(|s| match &s.resource {
                    Resource::Repository(name) => serde_json::json!({
                        "type": "repository",
                        "name": name,
                        "actions": s.actions.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
                    }),
                    Resource::Catalog => serde_json::json!({}),
                })
                .collect::<Vec<_>>(),
        });
        let set = |c: &mut serde_json::Value, k: &str, v: serde_json::Value| c[k] = v;
        match self.iss % 4 {
            0 => {}
            1 => set(&mut claims, "iss", SERVICE.into()),
            2 => set(&mut claims, "iss", "mallory".into()),
            _ => set(&mut claims, "iss", 7.into()),
        }
        match self.aud % 5 {
            0 => {}
            1 => set(&mut claims, "aud", SERVICE.into()),
            2 => set(&mut claims, "aud", "another-service".into()),
            3 => set(&mut claims, "aud", serde_json::json!(["x", SERVICE])),
            _ => set(&mut claims, "aud", 7.into()),
        }
        match self.exp % 5 {
            0 => {}
            1 => set(&mut claims, "exp", (now + 600).into()),
            2 => set(&mut claims, "exp", (now - 600).into()),
            3 => set(&mut claims, "exp", "tomorrow".into()),
            _ => set(&mut claims, "exp", ((now + 600) as f64 + 0.5).into()),
        }
        match self.nbf % 4 {
            0 => {}
            1 => set(&mut claims, "nbf", (now - 60).into()),
            2 => set(&mut claims, "nbf", (now + 600).into()),
            _ => set(&mut claims, "nbf", "later".into()),
        }
        if let Some((k, v)) = &self.extra
            && !["sub", "iat", "access", "iss", "aud", "exp", "nbf"].contains(&k.as_str())
        {
            claims[k.as_str()] = v.as_str().into();
        }
        let b64 = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let message = format!("{}.{}", b64(&header), b64(&claims));
        let es256 = |key: &SigningKey| {
            let key = EncodingKey::from_ec_pem(key.to_pkcs8_pem().as_bytes()).expect("key");
            jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::ES256).expect("sign")
        };
        let signature = match self.sign % 5 {
            0 => es256(&KEY),
            1 => es256(&OTHER_KEY),
            2 => {
                let secret = EncodingKey::from_secret(KEY.public_key_pem().as_bytes());
                jsonwebtoken::crypto::sign(message.as_bytes(), &secret, Algorithm::HS256)
                    .expect("sign")
            }
            3 => String::new(),
            _ => URL_SAFE_NO_PAD.encode(&self.junk),
        };
        format!("{message}.{signature}")
    }
}

#[derive(Arbitrary, Debug)]
enum Cred {
    None,
    Basic { who: Who, right_password: bool },
    Bearer(TokenSpec),
    Crafted(Crafted),
    Raw(String),
}

#[derive(Arbitrary, Debug, PartialEq)]
enum MethodSel {
    Get,
    Head,
    Put,
    Post,
    Patch,
    Delete,
}

#[derive(Arbitrary, Debug)]
enum Route {
    Base,
    Catalog,
    Token {
        scopes: Vec<(u8, u8)>,
        catalog: bool,
        other_service: bool,
    },
    TokenForm {
        who: Who,
        right_password: bool,
        scopes: Vec<(u8, u8)>,
    },
    Blob(u8, u8),
    Manifest(u8, bool),
    Tags(u8),
    Referrers(u8),
    Uploads(u8, Option<(u8, u8)>),
    Upload(u8, u8, u8),
}

#[derive(Arbitrary, Debug)]
struct Req {
    method: MethodSel,
    route: Route,
    cred: Cred,
}

#[derive(Arbitrary, Debug)]
struct Input {
    requests: Vec<Req>,
}

/// Who the credentials prove the caller to be, as the oracle reads them.
enum Proven {
    /// Valid: the identity, and the token's scopes if it came with one.
    Caller(Identity, Option<Vec<Scope>>),
    /// Wrong password, unknown user, bad, expired or foreign token.
    Invalid,
    /// A raw header: the oracle does not guess what it proves.
    Unknown,
}

fn actions(bits: u8) -> Vec<Action> {
    Action::ALL
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, a)| *a)
        .collect()
}

fn scopes(list: &[(u8, u8)], catalog: bool) -> Vec<Scope> {
    let mut out: Vec<Scope> = list
        .iter()
        .take(4)
        .map(|(r, bits)| Scope::repository(pick(&REPOS, *r), &actions(*bits)))
        .collect();
    if catalog {
        out.push(Scope {
            resource: Resource::Catalog,
            actions: Vec::new(),
        });
    }
    out
}

fn scope_query(list: &[(u8, u8)], catalog: bool) -> String {
    let mut q: Vec<String> = scopes(list, catalog)
        .iter()
        .map(|s| format!("scope={}", s.to_string().replace(',', "%2C")))
        .collect();
    if q.is_empty() {
        q.push("scope=".to_owned());
    }
    q.join("&")
}

fn password(who: Who, right: bool) -> (&'static str, &'static str) {
    match who {
        Who::Alice if right => USERS[0],
        Who::Bob if right => USERS[1],
        Who::Alice => ("alice", "bob-pw"),
        Who::Bob => ("bob", "wrong"),
        Who::Anonymous => ("", ""),
        Who::Mallory => ("mallory", "mallory-pw"),
    }
}

fn basic_valid(who: Who, right: bool) -> Option<Identity> {
    matches!((who, right), (Who::Alice | Who::Bob, true)).then(|| who.identity())
}

/// The `Authorization` header and what it proves.
fn credentials(cred: &Cred, issuer: &TokenIssuer) -> (Option<String>, Proven) {
    match cred {
        Cred::None => (None, Proven::Caller(Identity::Anonymous, None)),
        Cred::Basic {
            who,
            right_password,
        } => {
            let (user, pw) = password(*who, *right_password);
            let header = format!("Basic {}", STANDARD.encode(format!("{user}:{pw}")));
            let proven = match basic_valid(*who, *right_password) {
                Some(id) => Proven::Caller(id, None),
                None => Proven::Invalid,
            };
            (Some(header), proven)
        }
        Cred::Bearer(spec) => {
            let granted = scopes(&spec.scopes, spec.catalog);
            // Expired: beyond the minute of leeway for clock skew.
            let at = if spec.expired() {
                SystemTime::now() - Duration::from_secs(1200)
            } else {
                SystemTime::now()
            };
            let signer = if spec.other_service() {
                TokenIssuer::with_signing_key("another-service", KEY.clone())
            } else {
                issuer.clone()
            };
            let token =
                signer.issue_at(&spec.who.identity(), &granted, at, Duration::from_secs(600));
            let mut bytes = token.clone().into_bytes();
            if spec.tampered() {
                let (at, mask) = spec.tamper;
                let i = at as usize % bytes.len();
                bytes[i] ^= mask;
            }
            let sent = String::from_utf8_lossy(&bytes).into_owned();
            let valid = sent == token && !spec.expired() && !spec.other_service();
            let proven = if valid {
                // The oracle reads the scopes back as the registry would: through the
                // token's own wire form.
                let claims = issuer.verify(&token).expect("a fresh token verifies");
                Proven::Caller(spec.who.identity(), Some(claims.scopes))
            } else {
                Proven::Invalid
            };
            (Some(format!("Bearer {sent}")), proven)
        }
        Cred::Crafted(c) => {
            let token = c.token();
            let proven = if c.sound() {
                let claims = issuer
                    .verify(&token)
                    .expect("a sound crafted token verifies");
                Proven::Caller(c.who.identity(), Some(claims.scopes))
            } else if c.fractional_exp() {
                Proven::Unknown
            } else {
                Proven::Invalid
            };
            (Some(format!("Bearer {token}")), proven)
        }
        Cred::Raw(s) => (Some(s.clone()), Proven::Unknown),
    }
}

fn covers(scopes: &Option<Vec<Scope>>, repo: &str, action: Action) -> bool {
    scopes.as_ref().is_none_or(|list| {
        list.iter().any(|s| {
            s.resource == Resource::Repository(repo.to_owned()) && s.actions.contains(&action)
        })
    })
}

fn allowed(id: &Identity, scopes: &Option<Vec<Scope>>, repo: &str, action: Action) -> bool {
    let name = registry_core::RepoName::parse(repo).expect("known repository");
    policy().allows(id, &name, action) && covers(scopes, repo, action)
}

#[derive(Default)]
struct World {
    /// Upload sessions from `Location` headers: repository and path.
    sessions: Vec<(String, String)>,
}

struct Built {
    request: Request<Body>,
    /// The repository and the action the request needs, for repository routes.
    needs: Option<(&'static str, Action)>,
    /// A mount's source repository.
    mount_from: Option<&'static str>,
    token_endpoint: bool,
}

fn build(world: &World, r: &Req, header: Option<&str>) -> Option<Built> {
    let method = match (&r.route, &r.method) {
        // The token endpoint's two forms: GET with a query, POST with a form.
        (Route::Token { .. }, _) => Method::GET,
        (Route::TokenForm { .. }, _) => Method::POST,
        (_, MethodSel::Get) => Method::GET,
        (_, MethodSel::Head) => Method::HEAD,
        (_, MethodSel::Put) => Method::PUT,
        (_, MethodSel::Post) => Method::POST,
        (_, MethodSel::Patch) => Method::PATCH,
        (_, MethodSel::Delete) => Method::DELETE,
    };
    let read = method == Method::GET || method == Method::HEAD;
    let mut needs = None;
    let mut mount_from = None;
    let mut token_endpoint = false;
    let mut body = Bytes::new();
    let mut content_type = None;
    let uri = match &r.route {
        Route::Base => "/v2/".to_owned(),
        Route::Catalog => "/v2/_catalog".to_owned(),
        Route::Token {
            scopes,
            catalog,
            other_service,
        } => {
            token_endpoint = true;
            let service = if *other_service { "elsewhere" } else { SERVICE };
            format!("/token?service={service}&{}", scope_query(scopes, *catalog))
        }
        Route::TokenForm {
            who,
            right_password,
            scopes,
        } => {
            token_endpoint = true;
            let (user, pw) = password(*who, *right_password);
            content_type = Some("application/x-www-form-urlencoded");
            body = Bytes::from(format!(
                "grant_type=password&username={user}&password={pw}&service={SERVICE}&{}",
                scope_query(scopes, false)
            ));
            "/token".to_owned()
        }
        Route::Blob(repo, blob) => {
            let repo = pick(&REPOS, *repo);
            needs = if read {
                Some((repo, Action::Pull))
            } else if method == Method::DELETE {
                Some((repo, Action::Delete))
            } else {
                None
            };
            format!("/v2/{repo}/blobs/{}", Digest::sha256(pick(&BLOBS, *blob)))
        }
        Route::Manifest(repo, by_tag) => {
            let repo = pick(&REPOS, *repo);
            needs = if read {
                Some((repo, Action::Pull))
            } else if method == Method::DELETE {
                Some((repo, Action::Delete))
            } else if method == Method::PUT {
                body = Bytes::from(testkit::image_manifest(BLOBS[0], &[BLOBS[1]]));
                content_type = Some(registry_core::media_type::OCI_MANIFEST);
                Some((repo, Action::Push))
            } else {
                None
            };
            let reference = if *by_tag {
                "v1".to_owned()
            } else {
                Digest::sha256(testkit::image_manifest(BLOBS[0], &[BLOBS[1]]).as_bytes())
                    .to_string()
            };
            format!("/v2/{repo}/manifests/{reference}")
        }
        Route::Tags(repo) => {
            let repo = pick(&REPOS, *repo);
            needs = (method == Method::GET).then_some((repo, Action::Pull));
            format!("/v2/{repo}/tags/list")
        }
        Route::Referrers(repo) => {
            let repo = pick(&REPOS, *repo);
            needs = (method == Method::GET).then_some((repo, Action::Pull));
            format!(
                "/v2/{repo}/referrers/{}",
                Digest::sha256(testkit::image_manifest(BLOBS[0], &[BLOBS[1]]).as_bytes())
            )
        }
        Route::Uploads(repo, mount) => {
            let repo = pick(&REPOS, *repo);
            needs = (method == Method::POST).then_some((repo, Action::Push));
            match mount {
                Some((blob, from)) => {
                    let from = pick(&REPOS, *from);
                    mount_from = Some(from);
                    format!(
                        "/v2/{repo}/blobs/uploads/?mount={}&from={from}",
                        Digest::sha256(pick(&BLOBS, *blob))
                    )
                }
                None => format!("/v2/{repo}/blobs/uploads/"),
            }
        }
        Route::Upload(repo, session, blob) => {
            let (repo, path) = if world.sessions.is_empty() {
                let repo = pick(&REPOS, *repo);
                (repo.to_owned(), format!("/v2/{repo}/blobs/uploads/none"))
            } else {
                world.sessions[*session as usize % world.sessions.len()].clone()
            };
            let repo = REPOS.iter().copied().find(|r| *r == repo)?;
            needs = (read || [Method::PATCH, Method::PUT, Method::DELETE].contains(&method))
                .then_some((repo, Action::Push));
            let data = pick(&BLOBS, *blob);
            body = Bytes::from_static(data);
            if method == Method::PUT {
                format!("{path}?digest={}", Digest::sha256(data))
            } else {
                path
            }
        }
    };
    // An HTTP/1.1 request without Host is refused before it reaches any endpoint.
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "localhost");
    if let Some(h) = header {
        b = b.header("authorization", h);
    }
    if let Some(t) = content_type {
        b = b.header("content-type", t);
    }
    let request = b.body(Body::from(body)).ok()?;
    Some(Built {
        request,
        needs,
        mount_from,
        token_endpoint,
    })
}

async fn catalog(registry: &Registry) -> Vec<String> {
    registry
        .list_repositories(&ListOptions::default(), &AllowAll)
        .await
        .expect("catalog")
        .items
        .iter()
        .map(|r| r.to_string())
        .collect()
}

async fn run(input: &Input) {
    let registry = Registry::in_memory();
    for repo in &REPOS[..2] {
        testkit::push_image(&registry, &testkit::repo(repo), "v1", BLOBS[0], &[BLOBS[1]]).await;
    }
    let issuer = TokenIssuer::with_signing_key(SERVICE, KEY.clone());
    // No throttling: the oracle does not model lockouts (tests/jwt.rs and the unit
    // tests of the throttle cover them), and 16 wrong passwords would trigger one.
    let mut auth = Auth::new(policy())
        .with_token_issuer(issuer.clone())
        .with_throttle(ThrottleConfig {
            max_failures_per_identity: 0,
            max_failures_per_address: 0,
            ..ThrottleConfig::default()
        });
    for (user, pw) in USERS {
        auth = auth.with_user(user, pw);
    }
    let app = registry_http::router(registry.clone(), HttpConfig::default().with_auth(auth));
    let meta = registry.storage().metadata;
    let mut world = World::default();

    for r in input.requests.iter().take(16) {
        let (header, proven) = credentials(&r.cred, &issuer);
        let Some(built) = build(&world, r, header.as_deref()) else {
            continue;
        };
        let described = format!(
            "{} {} with {:?}",
            built.request.method(),
            built.request.uri(),
            r.cred
        );
        let before = meta.stats().await.expect("stats");
        let resp = app
            .clone()
            .oneshot(built.request)
            .await
            .expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(!status.is_server_error(), "{described}: {status}");
        if !status.is_success() {
            let after = meta.stats().await.expect("stats");
            assert_eq!(
                before, after,
                "{described}: refused with {status} but changed metadata"
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            assert!(
                headers.contains_key("www-authenticate") || built.token_endpoint,
                "{described}: 401 without a challenge"
            );
        }

        let (id, scopes) = match proven {
            Proven::Unknown => continue,
            Proven::Invalid => {
                if built.token_endpoint && matches!(r.route, Route::TokenForm { .. }) {
                    // The form carries its own credentials; the header is ignored or
                    // refused, and the form's password decides.
                    assert!(
                        status != StatusCode::OK || form_valid(&r.route),
                        "{described}: {status}"
                    );
                } else {
                    assert!(
                        status == StatusCode::UNAUTHORIZED
                            || status == StatusCode::METHOD_NOT_ALLOWED,
                        "{described}: bad credentials answered {status}"
                    );
                }
                continue;
            }
            Proven::Caller(id, scopes) => (id, scopes),
        };

        if built.token_endpoint {
            check_token(&described, &r.route, &id, &scopes, status, &body, &issuer);
            continue;
        }
        match (&r.route, built.needs) {
            (Route::Base, _) => {
                let expect = if id == Identity::Anonymous && scopes.is_none() {
                    StatusCode::UNAUTHORIZED
                } else {
                    StatusCode::OK
                };
                if matches!(r.method, MethodSel::Get | MethodSel::Head) {
                    assert_eq!(status, expect, "{described}");
                }
            }
            (Route::Catalog, _) if r.method == MethodSel::Get => {
                let refused = match &scopes {
                    None => id == Identity::Anonymous,
                    Some(list) => !list.iter().any(|s| s.resource == Resource::Catalog),
                };
                if refused {
                    assert!(
                        status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN,
                        "{described}: catalog answered {status}"
                    );
                    continue;
                }
                assert_eq!(status, StatusCode::OK, "{described}");
                let v: serde_json::Value = serde_json::from_slice(&body).expect("catalog JSON");
                let listed: Vec<String> = v["repositories"]
                    .as_array()
                    .expect("repositories")
                    .iter()
                    .map(|r| r.as_str().expect("name").to_owned())
                    .collect();
                let visible: Vec<String> = catalog(&registry)
                    .await
                    .into_iter()
                    .filter(|r| {
                        let name = registry_core::RepoName::parse(r).expect("name");
                        policy().allows(&id, &name, Action::List)
                    })
                    .collect();
                assert_eq!(listed, visible, "{described}: catalog shows another set");
            }
            (_, Some((repo, action))) => {
                if allowed(&id, &scopes, repo, action) {
                    assert!(
                        status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                        "{described}: allowed, but refused with {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                } else {
                    let expect = if !policy().allows(
                        &id,
                        &registry_core::RepoName::parse(repo).expect("name"),
                        action,
                    ) && id == Identity::Anonymous
                    {
                        StatusCode::UNAUTHORIZED
                    } else {
                        StatusCode::FORBIDDEN
                    };
                    assert_eq!(status, expect, "{described}: not allowed");
                }
                if let Some(from) = built.mount_from
                    && status == StatusCode::CREATED
                {
                    assert!(
                        allowed(&id, &scopes, from, Action::Pull),
                        "{described}: mounted from a repository the caller cannot pull"
                    );
                }
                if status == StatusCode::ACCEPTED
                    && let Some(loc) = headers.get("location").and_then(|v| v.to_str().ok())
                    && let Some(p) = loc.split('?').next()
                    && !world.sessions.iter().any(|(_, s)| s == p)
                {
                    world.sessions.push((repo.to_owned(), p.to_owned()));
                }
            }
            _ => {}
        }
    }
}

fn form_valid(route: &Route) -> bool {
    matches!(route, Route::TokenForm { who, right_password, .. } if basic_valid(*who, *right_password).is_some())
}

/// The token endpoint: who gets a token, and what it grants.
fn check_token(
    described: &str,
    route: &Route,
    id: &Identity,
    scopes: &Option<Vec<Scope>>,
    status: StatusCode,
    body: &[u8],
    issuer: &TokenIssuer,
) {
    // Who the token endpoint should see: the header's caller for GET, the form's for POST.
    let (caller, other_service) = match route {
        Route::Token { other_service, .. } => (Some(id.clone()), *other_service),
        Route::TokenForm {
            who,
            right_password,
            ..
        } => (basic_valid(*who, *right_password), false),
        _ => unreachable!("not the token endpoint"),
    };
    let get = matches!(route, Route::Token { .. });
    if status != StatusCode::OK {
        return;
    }
    assert!(!other_service, "{described}: a token for another service");
    assert!(
        !(get && scopes.is_some()),
        "{described}: a token minted a token"
    );
    let caller = caller.unwrap_or_else(|| panic!("{described}: a token for bad credentials"));
    let v: serde_json::Value = serde_json::from_slice(body).expect("token JSON");
    let token = v["token"].as_str().expect("token");
    let claims = issuer.verify(token).expect("the issued token verifies");
    assert_eq!(
        claims.identity, caller,
        "{described}: a token for someone else"
    );
    for s in &claims.scopes {
        if let Resource::Repository(repo) = &s.resource {
            let name = registry_core::RepoName::parse(repo).expect("granted names are valid");
            for a in &s.actions {
                assert!(
                    policy().allows(&caller, &name, *a),
                    "{described}: granted {a:?} on {repo} beyond the policy"
                );
            }
        }
    }
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

fuzz_target!(|input: Input| {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime")
        });
        rt.block_on(run(&input));
    });
});
