//! Authentication and authorization at the HTTP edge, in process: the Basic and Bearer
//! flows, and hostile attempts (missing, expired, forged and wrongly scoped tokens,
//! scope escalation at the token endpoint, path tricks, mounts from unreadable
//! repositories). Every refusal is a 401 or 403 with an OCI error body, and the store
//! is compared before and after to prove nothing changed.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use registry_core::access::{Action, Grantee, Identity, PrefixRules};
use registry_core::{Digest, ListOptions, Registry, RepoName};
use registry_http::{Auth, HttpConfig, Scope, SigningKey, TokenIssuer, router};

mod common;
use common::{OCI_MANIFEST, Reply};

/// The registry's token signing key, shared by the tests that sign tokens themselves.
fn key() -> SigningKey {
    static KEY: std::sync::LazyLock<SigningKey> = std::sync::LazyLock::new(SigningKey::generate);
    KEY.clone()
}

/// Refusals as these tests expect them.
trait Refused {
    /// A refusal: 401 with a challenge, or 403 DENIED, always with an OCI error body.
    fn assert_refused(&self, status: StatusCode);
}

impl Refused for Reply {
    #[track_caller]
    fn assert_refused(&self, status: StatusCode) {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        match status {
            StatusCode::UNAUTHORIZED => {
                assert_eq!(self.code(), "UNAUTHORIZED");
                assert!(self.header("www-authenticate").is_some());
            }
            StatusCode::FORBIDDEN => assert_eq!(self.code(), "DENIED"),
            other => panic!("not a refusal status: {other}"),
        }
    }
}

/// A registry with three users: `ci` may do everything, `alice` may push and pull her
/// own prefix, `reader` may pull everything; anonymous callers may pull `public/`.
fn policy() -> PrefixRules {
    PrefixRules::new()
        .grant(Grantee::Anyone, "public", Action::READ)
        .grant(Grantee::user("ci"), "", Action::ALL)
        .grant(Grantee::user("alice"), "alice", Action::READ_WRITE)
        .grant(Grantee::user("reader"), "", Action::READ)
}

fn auth(issuer: TokenIssuer) -> Auth {
    Auth::new(policy())
        .with_user("ci", "ci-pass")
        .with_user("alice", "alice-pass")
        .with_user("reader", "reader-pass")
        .with_token_issuer(issuer)
}

fn setup() -> (Registry, Router) {
    let registry = Registry::in_memory();
    let app = router(
        registry.clone(),
        HttpConfig::default().with_auth(auth(TokenIssuer::with_signing_key("registry", key()))),
    );
    (registry, app)
}

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{pass}")))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// One request as a client at `registry.test` sends it, with `auth` as its
/// `Authorization` header.
async fn send(
    app: &Router,
    method: Method,
    uri: &str,
    auth: Option<&str>,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> Reply {
    let mut all = vec![("host", "registry.test")];
    all.extend(auth.map(|a| ("authorization", a)));
    all.extend_from_slice(headers);
    common::send(app, method, uri, &all, body).await
}

async fn get(app: &Router, uri: &str, auth: Option<&str>) -> Reply {
    send(app, Method::GET, uri, auth, &[], Body::empty()).await
}

/// Asks the token endpoint for `scopes` with `auth` credentials.
async fn token(app: &Router, auth: Option<&str>, scopes: &[&str]) -> String {
    let mut uri = "/token?service=registry".to_owned();
    for s in scopes {
        uri.push_str(&format!("&scope={s}"));
    }
    let r = get(app, &uri, auth).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let v = r.json();
    assert_eq!(v["token"], v["access_token"]);
    assert!(v["expires_in"].as_u64().unwrap() > 0);
    v["token"].as_str().unwrap().to_owned()
}

/// The scopes a token of the built-in issuer carries (its payload is readable; only
/// its signature is secret).
fn token_scopes(token: &str) -> Vec<String> {
    let payload = token.split('.').nth(1).unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    v["access"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let actions: Vec<&str> = a["actions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap())
                .collect();
            format!(
                "{}:{}:{}",
                a["type"].as_str().unwrap(),
                a["name"].as_str().unwrap(),
                actions.join(",")
            )
        })
        .collect()
}

/// Pushes a blob and a manifest tagged `tag` into `repo` with `auth`; returns the
/// manifest digest.
async fn push_image(app: &Router, repo: &str, tag: &str, auth: &str) -> String {
    let layer = format!("layer of {repo}:{tag}").into_bytes();
    let config = b"{}".to_vec();
    for blob in [&layer, &config] {
        let d = Digest::sha256(blob).to_string();
        let r = send(
            app,
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
            Some(auth),
            &[("content-type", "application/octet-stream")],
            blob.clone(),
        )
        .await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let manifest = manifest_for(&config, &layer);
    let r = send(
        app,
        Method::PUT,
        &format!("/v2/{repo}/manifests/{tag}"),
        Some(auth),
        &[("content-type", OCI_MANIFEST)],
        manifest.clone(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    Digest::sha256(manifest.as_bytes()).to_string()
}

fn manifest_for(config: &[u8], layer: &[u8]) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        Digest::sha256(config),
        config.len(),
        Digest::sha256(layer),
        layer.len()
    )
}

/// Everything a client could observe: repositories, their tags and manifest digests.
async fn snapshot(registry: &Registry) -> Vec<(String, Vec<(String, String)>)> {
    let all = ListOptions {
        n: Some(10_000),
        last: None,
    };
    let repos = registry
        .list_repositories(&all, &registry_core::AllowAll)
        .await
        .unwrap();
    let mut out = Vec::new();
    for repo in repos.items {
        let tags = registry.list_tags(&repo, &all).await.unwrap();
        let mut entries = Vec::new();
        for tag in tags.items {
            let m = registry
                .stat_manifest(&repo, &registry_core::Reference::Tag(tag.clone()))
                .await
                .unwrap();
            entries.push((tag.to_string(), m.digest.to_string()));
        }
        out.push((repo.to_string(), entries));
    }
    out
}

#[tokio::test]
async fn base_challenges_anonymous_callers_with_the_token_realm() {
    let (_, app) = setup();
    let r = get(&app, "/v2/", None).await;
    r.assert_refused(StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.header("www-authenticate").unwrap_or_default(),
        r#"Bearer realm="http://registry.test/token",service="registry""#
    );
    let ok = get(&app, "/v2/", Some(&basic("reader", "reader-pass"))).await;
    assert_eq!(ok.status, StatusCode::OK);
    let t = token(&app, Some(&basic("reader", "reader-pass")), &[]).await;
    assert_eq!(
        get(&app, "/v2/", Some(&bearer(&t))).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn basic_credentials_push_and_pull() {
    let (_, app) = setup();
    let ci = basic("ci", "ci-pass");
    let digest = push_image(&app, "team/app", "v1", &ci).await;
    let r = get(&app, "/v2/team/app/manifests/v1", Some(&ci)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("docker-content-digest").unwrap_or_default(),
        digest
    );
    let r = get(
        &app,
        "/v2/team/app/manifests/v1",
        Some(&basic("reader", "reader-pass")),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn the_token_flow_follows_the_challenge() {
    let (registry, app) = setup();
    // The challenge names the scope the client must ask for.
    let r = send(
        &app,
        Method::POST,
        "/v2/team/app/blobs/uploads/",
        None,
        &[],
        Body::empty(),
    )
    .await;
    r.assert_refused(StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.header("www-authenticate").unwrap_or_default(),
        r#"Bearer realm="http://registry.test/token",service="registry",scope="repository:team/app:pull,push""#
    );
    let t = token(
        &app,
        Some(&basic("ci", "ci-pass")),
        &["repository:team/app:pull,push"],
    )
    .await;
    assert_eq!(token_scopes(&t), ["repository:team/app:pull,push"]);
    let digest = push_image(&app, "team/app", "v1", &bearer(&t)).await;
    let r = get(&app, "/v2/team/app/manifests/v1", Some(&bearer(&t))).await;
    assert_eq!(
        r.header("docker-content-digest").unwrap_or_default(),
        digest
    );
    assert_eq!(
        snapshot(&registry).await,
        [("team/app".to_owned(), vec![("v1".to_owned(), digest)])]
    );
    // The OAuth2 form variant (containerd) grants the same.
    let r = send(
        &app,
        Method::POST,
        "/token",
        None,
        &[("content-type", "application/x-www-form-urlencoded")],
        "grant_type=password&username=ci&password=ci-pass&service=registry&scope=repository%3Ateam%2Fapp%3Apull",
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let t = r.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(token_scopes(&t), ["repository:team/app:pull"]);
    let r = send(
        &app,
        Method::POST,
        "/token",
        None,
        &[("content-type", "application/x-www-form-urlencoded")],
        "grant_type=password&username=ci&password=wrong&service=registry",
    )
    .await;
    r.assert_refused(StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn anonymous_callers_read_only_what_the_policy_allows() {
    let (registry, app) = setup();
    let ci = basic("ci", "ci-pass");
    push_image(&app, "public/tool", "v1", &ci).await;
    push_image(&app, "private/tool", "v1", &ci).await;
    let before = snapshot(&registry).await;
    // Without any credentials: public reads pass, everything else asks for them.
    assert_eq!(
        get(&app, "/v2/public/tool/manifests/v1", None).await.status,
        StatusCode::OK
    );
    get(&app, "/v2/private/tool/manifests/v1", None)
        .await
        .assert_refused(StatusCode::UNAUTHORIZED);
    get(&app, "/v2/private/tool/tags/list", None)
        .await
        .assert_refused(StatusCode::UNAUTHORIZED);
    send(
        &app,
        Method::POST,
        "/v2/public/tool/blobs/uploads/",
        None,
        &[],
        Body::empty(),
    )
    .await
    .assert_refused(StatusCode::UNAUTHORIZED);
    send(
        &app,
        Method::DELETE,
        "/v2/public/tool/manifests/v1",
        None,
        &[],
        Body::empty(),
    )
    .await
    .assert_refused(StatusCode::UNAUTHORIZED);
    // An anonymous token gets only the public read, whatever it asks for.
    let t = token(
        &app,
        None,
        &[
            "repository:public/tool:pull,push,delete",
            "repository:private/tool:pull",
        ],
    )
    .await;
    assert_eq!(token_scopes(&t), ["repository:public/tool:pull"]);
    assert_eq!(
        get(&app, "/v2/public/tool/manifests/v1", Some(&bearer(&t)))
            .await
            .status,
        StatusCode::OK
    );
    get(&app, "/v2/private/tool/manifests/v1", Some(&bearer(&t)))
        .await
        .assert_refused(StatusCode::UNAUTHORIZED);
    send(
        &app,
        Method::PUT,
        "/v2/public/tool/manifests/v2",
        Some(&bearer(&t)),
        &[("content-type", OCI_MANIFEST)],
        "{}",
    )
    .await
    .assert_refused(StatusCode::UNAUTHORIZED);
    assert_eq!(snapshot(&registry).await, before);
}

#[tokio::test]
async fn wrong_credentials_are_refused_not_downgraded() {
    let (registry, app) = setup();
    push_image(&app, "public/tool", "v1", &basic("ci", "ci-pass")).await;
    let before = snapshot(&registry).await;
    // A wrong password must not fall back to anonymous, even where anonymous could read.
    for creds in [
        basic("ci", "wrong"),
        basic("nobody", "ci-pass"),
        basic("ci", ""),
        "Basic !!!not-base64".to_owned(),
        format!("Basic {}", STANDARD.encode("no-colon")),
        "Digest username=\"ci\"".to_owned(),
        "Bearer".to_owned(),
    ] {
        get(&app, "/v2/public/tool/manifests/v1", Some(&creds))
            .await
            .assert_refused(StatusCode::UNAUTHORIZED);
        get(
            &app,
            "/token?service=registry&scope=repository:public/tool:pull",
            Some(&creds),
        )
        .await
        .assert_refused(StatusCode::UNAUTHORIZED);
    }
    assert_eq!(snapshot(&registry).await, before);
}

#[tokio::test]
async fn expired_forged_and_foreign_tokens_are_refused() {
    let (registry, app) = setup();
    let ci = basic("ci", "ci-pass");
    push_image(&app, "team/app", "v1", &ci).await;
    let before = snapshot(&registry).await;
    let scope = [Scope::repository("team/app", Action::ALL)];
    // Expired ten minutes ago: beyond the minute of leeway for clock skew.
    let expired = TokenIssuer::with_signing_key("registry", key()).issue_at(
        &Identity::user("ci"),
        &scope,
        std::time::SystemTime::now() - std::time::Duration::from_secs(900),
        std::time::Duration::from_secs(300),
    );
    let foreign_key = TokenIssuer::with_signing_key("registry", SigningKey::generate()).issue(
        &Identity::user("ci"),
        &scope,
        std::time::Duration::from_secs(60),
    );
    let other_service = TokenIssuer::with_signing_key("elsewhere", key()).issue(
        &Identity::user("ci"),
        &scope,
        std::time::Duration::from_secs(60),
    );
    // A real token for reader, with its payload rewritten to claim ci's rights.
    let real = token(
        &app,
        Some(&basic("reader", "reader-pass")),
        &["repository:team/app:pull"],
    )
    .await;
    let mut parts = real.split('.');
    let (header, _, sig) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let forged_payload = URL_SAFE_NO_PAD.encode(
        serde_json::json!({"iss":"registry","aud":"registry","sub":"ci","exp":u64::MAX,"iat":0,
            "access":[{"type":"repository","name":"team/app","actions":["pull","push","delete"]}]})
        .to_string(),
    );
    let forged = format!("{header}.{forged_payload}.{sig}");
    let none = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let unsigned = format!("{none}.{forged_payload}.");
    for bad in [
        expired,
        foreign_key,
        other_service,
        forged,
        unsigned,
        "x.y.z".to_owned(),
    ] {
        let r = get(&app, "/v2/team/app/manifests/v1", Some(&bearer(&bad))).await;
        r.assert_refused(StatusCode::UNAUTHORIZED);
        assert!(
            r.header("www-authenticate")
                .unwrap_or_default()
                .contains("error=\"invalid_token\"")
        );
        send(
            &app,
            Method::DELETE,
            "/v2/team/app/manifests/v1",
            Some(&bearer(&bad)),
            &[],
            Body::empty(),
        )
        .await
        .assert_refused(StatusCode::UNAUTHORIZED);
        // A token cannot be traded for another token.
        get(
            &app,
            "/token?service=registry&scope=repository:team/app:pull",
            Some(&bearer(&bad)),
        )
        .await
        .assert_refused(StatusCode::UNAUTHORIZED);
    }
    assert_eq!(snapshot(&registry).await, before);
}

#[tokio::test]
async fn tokens_are_bound_to_their_scopes() {
    let (registry, app) = setup();
    let ci = basic("ci", "ci-pass");
    let digest = push_image(&app, "team/app", "v1", &ci).await;
    push_image(&app, "team/other", "v1", &ci).await;
    let before = snapshot(&registry).await;
    // ci may do anything, but this token was asked for a pull of one repository only.
    let t = token(&app, Some(&ci), &["repository:team/app:pull"]).await;
    assert_eq!(
        get(&app, "/v2/team/app/manifests/v1", Some(&bearer(&t)))
            .await
            .status,
        StatusCode::OK
    );
    let r = get(&app, "/v2/team/other/manifests/v1", Some(&bearer(&t))).await;
    r.assert_refused(StatusCode::FORBIDDEN);
    assert!(
        r.header("www-authenticate")
            .unwrap_or_default()
            .contains("error=\"insufficient_scope\"")
    );
    assert!(
        r.header("www-authenticate")
            .unwrap_or_default()
            .contains("scope=\"repository:team/other:pull\"")
    );
    send(
        &app,
        Method::POST,
        "/v2/team/app/blobs/uploads/",
        Some(&bearer(&t)),
        &[],
        Body::empty(),
    )
    .await
    .assert_refused(StatusCode::FORBIDDEN);
    send(
        &app,
        Method::DELETE,
        &format!("/v2/team/app/manifests/{digest}"),
        Some(&bearer(&t)),
        &[],
        Body::empty(),
    )
    .await
    .assert_refused(StatusCode::FORBIDDEN);
    // Push rights do not include deletes.
    let t = token(&app, Some(&ci), &["repository:team/app:pull,push"]).await;
    send(
        &app,
        Method::DELETE,
        &format!("/v2/team/app/manifests/{digest}"),
        Some(&bearer(&t)),
        &[],
        Body::empty(),
    )
    .await
    .assert_refused(StatusCode::FORBIDDEN);
    // The catalog needs its own scope.
    get(&app, "/v2/_catalog", Some(&bearer(&t)))
        .await
        .assert_refused(StatusCode::FORBIDDEN);
    assert_eq!(snapshot(&registry).await, before);
}

#[tokio::test]
async fn token_requests_cannot_escalate() {
    let (registry, app) = setup();
    let ci = basic("ci", "ci-pass");
    push_image(&app, "team/app", "v1", &ci).await;
    let before = snapshot(&registry).await;
    let reader = basic("reader", "reader-pass");
    // Asking for more than the policy allows yields a token with less, not an error.
    let t = token(
        &app,
        Some(&reader),
        &[
            "repository:team/app:pull,push,delete,*",
            "repository:alice/x:push",
            "repository:../etc:pull",
            "repository:team/app/../../secret:pull",
            "registry:catalog:*",
        ],
    )
    .await;
    assert_eq!(
        token_scopes(&t),
        ["repository:team/app:list,pull", "registry:catalog:*"]
    );
    // Using it to write: the policy refuses reader outright.
    send(
        &app,
        Method::POST,
        "/v2/team/app/blobs/uploads/",
        Some(&bearer(&t)),
        &[],
        Body::empty(),
    )
    .await
    .assert_refused(StatusCode::FORBIDDEN);
    send(
        &app,
        Method::DELETE,
        "/v2/team/app/manifests/v1",
        Some(&bearer(&t)),
        &[],
        Body::empty(),
    )
    .await
    .assert_refused(StatusCode::FORBIDDEN);
    // Scope strings with extra separators cannot smuggle a second repository in.
    let t = token(
        &app,
        Some(&basic("alice", "alice-pass")),
        &["repository:alice/x:pull,push:team/app:push"],
    )
    .await;
    assert!(
        token_scopes(&t).iter().all(|s| !s.contains("team/app")),
        "{:?}",
        token_scopes(&t)
    );
    // A service the registry does not serve gets nothing.
    let r = get(
        &app,
        "/token?service=elsewhere&scope=repository:team/app:pull",
        Some(&reader),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(snapshot(&registry).await, before);
}

#[tokio::test]
async fn users_are_denied_outside_their_grants() {
    let (registry, app) = setup();
    let ci = basic("ci", "ci-pass");
    push_image(&app, "team/app", "v1", &ci).await;
    let alice = basic("alice", "alice-pass");
    push_image(&app, "alice/app", "v1", &alice).await;
    let before = snapshot(&registry).await;
    get(&app, "/v2/team/app/manifests/v1", Some(&alice))
        .await
        .assert_refused(StatusCode::FORBIDDEN);
    get(&app, "/v2/team/app/tags/list", Some(&alice))
        .await
        .assert_refused(StatusCode::FORBIDDEN);
    let d = Digest::sha256(b"x");
    get(&app, &format!("/v2/team/app/referrers/{d}"), Some(&alice))
        .await
        .assert_refused(StatusCode::FORBIDDEN);
    send(
        &app,
        Method::POST,
        "/v2/alicex/app/blobs/uploads/",
        Some(&alice),
        &[],
        Body::empty(),
    )
    .await
    .assert_refused(StatusCode::FORBIDDEN);
    send(
        &app,
        Method::DELETE,
        "/v2/alice/app/manifests/v1",
        Some(&alice),
        &[],
        Body::empty(),
    )
    .await
    .assert_refused(StatusCode::FORBIDDEN);
    // An upload session of another user is not reachable through a readable repo.
    let r = send(
        &app,
        Method::POST,
        "/v2/team/app/blobs/uploads/",
        Some(&ci),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let location = r.header("location").unwrap_or_default().to_owned();
    let reader = basic("reader", "reader-pass");
    get(&app, &location, Some(&reader))
        .await
        .assert_refused(StatusCode::FORBIDDEN);
    send(&app, Method::PATCH, &location, Some(&reader), &[], "bytes")
        .await
        .assert_refused(StatusCode::FORBIDDEN);
    send(
        &app,
        Method::DELETE,
        &location,
        Some(&reader),
        &[],
        Body::empty(),
    )
    .await
    .assert_refused(StatusCode::FORBIDDEN);
    assert_eq!(snapshot(&registry).await, before);
}

#[tokio::test]
async fn path_tricks_never_reach_another_repository() {
    let (registry, app) = setup();
    let ci = basic("ci", "ci-pass");
    push_image(&app, "private/secret", "v1", &ci).await;
    push_image(&app, "public/tool", "v1", &ci).await;
    let before = snapshot(&registry).await;
    for path in [
        "/v2/public/../private/secret/manifests/v1",
        "/v2/public/tool/../../private/secret/manifests/v1",
        "/v2/public/%2e%2e/private/secret/manifests/v1",
        "/v2/public%2F..%2Fprivate/secret/manifests/v1",
        "/v2//private/secret/manifests/v1",
        "/v2/public/tool/manifests/../../private/secret/manifests/v1",
        "/v2/./private/secret/manifests/v1",
        "/v2/PUBLIC/../private/secret/manifests/v1",
    ] {
        let r = get(&app, path, None).await;
        eprintln!("{path}: {} {}", r.status, r.code());
        assert!(
            r.status.is_client_error() && r.status != StatusCode::NOT_ACCEPTABLE,
            "{path}: {}",
            r.status
        );
        assert!(!r.code().is_empty(), "{path}: an OCI error body");
        assert!(
            r.header("docker-content-digest")
                .unwrap_or_default()
                .is_empty(),
            "{path} served a manifest"
        );
    }
    // A public path that names a blob by a digest only the private repo holds.
    let secret_layer = Digest::sha256(b"layer of private/secret:v1");
    let r = get(&app, &format!("/v2/public/tool/blobs/{secret_layer}"), None).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "not linked to the public repository"
    );
    assert_eq!(r.code(), "BLOB_UNKNOWN");
    assert_eq!(snapshot(&registry).await, before);
}

#[tokio::test]
async fn mounts_never_cross_into_unreadable_repositories() {
    let (registry, app) = setup();
    let ci = basic("ci", "ci-pass");
    push_image(&app, "private/secret", "v1", &ci).await;
    let alice = basic("alice", "alice-pass");
    let secret_layer = Digest::sha256(b"layer of private/secret:v1");
    for query in [
        format!("mount={secret_layer}&from=private/secret"),
        format!("mount={secret_layer}"),
    ] {
        let r = send(
            &app,
            Method::POST,
            &format!("/v2/alice/app/blobs/uploads/?{query}"),
            Some(&alice),
            &[],
            Body::empty(),
        )
        .await;
        // Not mounted: the spec's fallback is a fresh upload session.
        assert_eq!(r.status, StatusCode::ACCEPTED, "{query}");
        let head = send(
            &app,
            Method::HEAD,
            &format!("/v2/alice/app/blobs/{secret_layer}"),
            Some(&alice),
            &[],
            Body::empty(),
        )
        .await;
        assert_eq!(head.status, StatusCode::NOT_FOUND, "{query}");
    }
    // ci may read the source, so the same mount works for ci.
    let r = send(
        &app,
        Method::POST,
        &format!("/v2/team/app/blobs/uploads/?mount={secret_layer}&from=private/secret"),
        Some(&ci),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    // With a token, the source needs pull scope in the token as well.
    let t = token(&app, Some(&ci), &["repository:team/other:pull,push"]).await;
    let r = send(
        &app,
        Method::POST,
        &format!("/v2/team/other/blobs/uploads/?mount={secret_layer}&from=private/secret"),
        Some(&bearer(&t)),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let repo = RepoName::parse("team/other").unwrap();
    assert!(registry.stat_blob(&repo, &secret_layer).await.is_err());
}

#[tokio::test]
async fn the_catalog_lists_only_readable_repositories() {
    let (_, app) = setup();
    let ci = basic("ci", "ci-pass");
    for repo in ["alice/a", "alice/b", "private/x", "public/y"] {
        push_image(&app, repo, "v1", &ci).await;
    }
    let names = |r: Reply| -> Vec<String> {
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let alice = basic("alice", "alice-pass");
    assert_eq!(
        names(get(&app, "/v2/_catalog", Some(&alice)).await),
        ["alice/a", "alice/b", "public/y"]
    );
    // Paging runs over the filtered list.
    let r = get(&app, "/v2/_catalog?n=1", Some(&alice)).await;
    assert!(
        r.header("link")
            .unwrap_or_default()
            .contains("last=alice/a"),
        "{}",
        r.header("link").unwrap_or_default()
    );
    assert_eq!(names(r), ["alice/a"]);
    assert_eq!(
        names(get(&app, "/v2/_catalog?n=5&last=alice/b", Some(&alice)).await),
        ["public/y"]
    );
    assert_eq!(names(get(&app, "/v2/_catalog", Some(&ci)).await).len(), 4);
    // Anonymous: sent for a token, which then shows the public repository only.
    get(&app, "/v2/_catalog", None)
        .await
        .assert_refused(StatusCode::UNAUTHORIZED);
    let t = token(&app, None, &["registry:catalog:*"]).await;
    assert_eq!(
        names(get(&app, "/v2/_catalog", Some(&bearer(&t))).await),
        ["public/y"]
    );
}

#[tokio::test]
async fn basic_only_registries_challenge_with_basic() {
    let registry = Registry::in_memory();
    let app = router(
        registry,
        HttpConfig::default().with_auth(Auth::new(policy()).with_user("ci", "ci-pass")),
    );
    let r = get(&app, "/v2/", None).await;
    r.assert_refused(StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.header("www-authenticate").unwrap_or_default(),
        "Basic realm=\"registry\""
    );
    // No token endpoint, and no bearer token is accepted.
    assert_eq!(
        get(&app, "/token", None).await.status,
        StatusCode::NOT_FOUND
    );
    let t = TokenIssuer::with_signing_key("registry", key()).issue(
        &Identity::user("ci"),
        &[Scope::repository("x", Action::ALL)],
        std::time::Duration::from_secs(60),
    );
    get(&app, "/v2/x/tags/list", Some(&bearer(&t)))
        .await
        .assert_refused(StatusCode::UNAUTHORIZED);
    push_image(&app, "x", "v1", &basic("ci", "ci-pass")).await;
}

/// Regression: upload sessions were not bound to the identity that opened them, so
/// anyone with push rights who learnt a session's URL could append to it, finish it
/// under another digest or cancel it. Now a session is unknown to everyone else.
#[tokio::test]
async fn upload_sessions_answer_only_to_their_creator() {
    let registry = Registry::in_memory();
    let app = router(
        registry.clone(),
        HttpConfig::default().with_auth(
            Auth::new(policy().grant(Grantee::user("ops"), "", Action::ALL))
                .with_user("ci", "ci-pass")
                .with_user("ops", "ops-pass"),
        ),
    );
    let (ci, ops) = (basic("ci", "ci-pass"), basic("ops", "ops-pass"));
    let r = send(
        &app,
        Method::POST,
        "/v2/shared/blobs/uploads/",
        Some(&ci),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let loc = r.header("location").unwrap().to_owned();
    let before = registry.storage().blobs.list_uploads().await.unwrap();
    let chunk = [("content-range", "0-1"), ("content-length", "2")];
    let d = Digest::sha256(b"ab");
    for (method, uri, headers, body) in [
        (Method::GET, loc.clone(), &[][..], Body::empty()),
        (Method::PATCH, loc.clone(), &chunk[..], Body::from("ab")),
        (
            Method::PUT,
            format!("{loc}?digest={d}"),
            &[][..],
            Body::empty(),
        ),
        (Method::DELETE, loc.clone(), &[][..], Body::empty()),
    ] {
        let r = send(&app, method.clone(), &uri, Some(&ops), headers, body).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{method} by another user");
        assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
    }
    assert_eq!(
        registry.storage().blobs.list_uploads().await.unwrap(),
        before
    );
    // Its creator carries on.
    let r = send(&app, Method::PATCH, &loc, Some(&ci), &chunk, "ab").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let loc = r.header("location").unwrap().to_owned();
    let r = send(
        &app,
        Method::PUT,
        &format!("{loc}?digest={d}"),
        Some(&ci),
        &[],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
}
