//! Authentication at the HTTP edge: Basic credentials and the Docker / OCI Bearer token
//! flow, feeding the core's [`Authorizer`].
//!
//! The flow every client speaks: a request without acceptable credentials gets
//! `401 UNAUTHORIZED` with `WWW-Authenticate: Bearer realm="…/token",service="…",
//! scope="repository:NAME:pull,push"`; the client asks the realm for a token (with
//! Basic credentials, or none for anonymous access) and repeats the request with
//! `Authorization: Bearer TOKEN`. The built-in [`TokenIssuer`] serves that realm at
//! `/token` and signs short-lived JWTs (ES256, see [`crate::jwt`]'s rules) carrying only
//! the scopes the policy grants; an external token server plugs in through
//! [`JwtVerifier`](crate::JwtVerifier) (or any [`TokenVerifier`]). Basic credentials are
//! accepted on every endpoint as well: users given in code and htpasswd files
//! ([`Htpasswd`]). Failed authentication is throttled per identity and per address
//! ([`ThrottleConfig`]).
//!
//! Every request is decided twice: by the token's scopes (what the client asked for
//! and was granted) and by the [`Authorizer`] as it stands now, so a policy change
//! takes effect at once even for tokens already issued.
//!
//! Secrets never reach logs: [`Auth`]'s `Debug` names users but not passwords or keys,
//! and error messages never echo credentials.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use registry_core::RepoName;
use registry_core::access::{Action, Authorizer, Identity};
use serde::Serialize;

use crate::error::ApiError;
use crate::htpasswd::{Htpasswd, Passwords};
use crate::jwt::TokenIssuer;
use crate::throttle::{Locked, Throttle, ThrottleConfig};

/// What a scope names: one repository, or the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// `repository:NAME`.
    Repository(String),
    /// `registry:catalog`.
    Catalog,
}

/// One scope of a token request or a token: `repository:NAME:pull,push` or
/// `registry:catalog:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// What the scope is about.
    pub resource: Resource,
    /// The actions it covers (for the catalog: empty means all).
    pub actions: Vec<Action>,
}

impl Scope {
    /// A repository scope.
    pub fn repository(name: &str, actions: &[Action]) -> Self {
        Scope {
            resource: Resource::Repository(name.to_owned()),
            actions: actions.to_vec(),
        }
    }

    /// Parses one scope string. Unknown actions are dropped (a client may ask for
    /// more than this registry knows); `*` means every action. `None` for scope types
    /// this registry does not serve.
    pub fn parse(s: &str) -> Option<Scope> {
        let (kind, rest) = s.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        match kind {
            "repository" if !name.is_empty() => {
                let mut list = Vec::new();
                for a in actions.split(',') {
                    if a == "*" {
                        list.extend_from_slice(Action::ALL);
                    } else if let Some(a) = Action::parse(a) {
                        list.push(a);
                    }
                }
                list.sort_by_key(|a| a.as_str());
                list.dedup();
                Some(Scope {
                    resource: Resource::Repository(name.to_owned()),
                    actions: list,
                })
            }
            "registry" if name == "catalog" => Some(Scope {
                resource: Resource::Catalog,
                actions: Vec::new(),
            }),
            _ => None,
        }
    }

    fn covers(&self, resource: &Resource, action: Option<Action>) -> bool {
        self.resource == *resource
            && match action {
                Some(a) => self.actions.contains(&a),
                None => true,
            }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.resource {
            Resource::Catalog => f.write_str("registry:catalog:*"),
            Resource::Repository(name) => {
                let actions: Vec<&str> = self.actions.iter().map(|a| a.as_str()).collect();
                write!(f, "repository:{name}:{}", actions.join(","))
            }
        }
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    /// Who the token was issued to.
    pub identity: Identity,
    /// What it grants.
    pub scopes: Vec<Scope>,
}

/// Why a token was refused. The message goes to the client, so it never contains the
/// token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token this verifier understands, or the signature does not match.
    Invalid,
    /// The token's lifetime is over.
    Expired,
    /// The token was issued for another service.
    WrongService,
    /// The token was issued by an issuer this registry does not trust.
    WrongIssuer,
}

impl TokenError {
    /// The reason, as told to the client.
    pub fn as_str(&self) -> &'static str {
        match self {
            TokenError::Invalid => "invalid token",
            TokenError::Expired => "token expired",
            TokenError::WrongService => "token issued for another service",
            TokenError::WrongIssuer => "token from an untrusted issuer",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks bearer tokens: signature, lifetime and audience. Implement it to accept
/// tokens from an external token server (for example JWTs signed by its key).
pub trait TokenVerifier: Send + Sync {
    /// The claims of a valid token, or why it is not valid.
    fn verify(&self, token: &str) -> Result<TokenClaims, TokenError>;
}

/// The authentication and authorization of a router: users, tokens and the policy.
///
/// ```
/// use registry_core::access::{AnonymousRead, AuthenticatedOnly};
/// use registry_http::{Auth, HttpConfig, TokenIssuer};
///
/// // Users may do everything; anyone may pull; clients get tokens from /token.
/// let auth = Auth::new(AnonymousRead(AuthenticatedOnly))
///     .with_user("alice", "correct horse battery staple")
///     .with_token_issuer(TokenIssuer::new("my-registry"));
/// let config = HttpConfig::default().with_auth(auth);
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct Auth {
    authorizer: Arc<dyn Authorizer>,
    passwords: Arc<Passwords>,
    issuer: Option<TokenIssuer>,
    external: Option<(Arc<dyn TokenVerifier>, String, String)>,
    throttle: Arc<Throttle>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("users", &self.passwords.names())
            .field("htpasswd", &self.passwords.files())
            .field("throttle", self.throttle.config())
            .field("issuer", &self.issuer)
            .field("external_realm", &self.external.as_ref().map(|e| &e.1))
            .finish_non_exhaustive()
    }
}

/// How a request identified itself.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) identity: Identity,
    /// The token's scopes when the caller came with a bearer token; `None` for Basic
    /// credentials and anonymous requests, which the policy alone decides.
    scopes: Option<Vec<Scope>>,
}

impl Caller {
    /// A caller without credentials.
    pub(crate) fn anonymous() -> Self {
        Caller {
            identity: Identity::Anonymous,
            scopes: None,
        }
    }
}

impl Auth {
    /// Authentication deciding with `authorizer`; add users and tokens to it.
    pub fn new(authorizer: impl Authorizer + 'static) -> Self {
        Auth {
            authorizer: Arc::new(authorizer),
            passwords: Arc::new(Passwords::new()),
            issuer: None,
            external: None,
            throttle: Arc::new(Throttle::new(ThrottleConfig::default())),
        }
    }

    /// Adds a user with a password, accepted as Basic credentials and at the token
    /// endpoint. The password is kept only as a keyed hash.
    pub fn with_user(mut self, name: impl Into<String>, password: &str) -> Self {
        Arc::make_mut(&mut self.passwords).add_user(name.into(), password);
        self
    }

    /// Adds the users of an htpasswd file (bcrypt), re-read when it changes.
    pub fn with_htpasswd(mut self, file: Htpasswd) -> Self {
        Arc::make_mut(&mut self.passwords).add_file(file);
        self
    }

    /// Sets the limits on failed authentication (default: [`ThrottleConfig::default`]).
    pub fn with_throttle(mut self, config: ThrottleConfig) -> Self {
        self.throttle = Arc::new(Throttle::new(config));
        self
    }

    /// Serves the built-in token endpoint at `/token` and accepts its tokens;
    /// challenges become `Bearer` challenges pointing there.
    pub fn with_token_issuer(mut self, issuer: TokenIssuer) -> Self {
        self.issuer = Some(issuer);
        self
    }

    /// Accepts tokens from an external token server at `realm` (an absolute URL) for
    /// `service`; challenges point clients there.
    pub fn with_token_verifier(
        mut self,
        verifier: impl TokenVerifier + 'static,
        realm: impl Into<String>,
        service: impl Into<String>,
    ) -> Self {
        self.external = Some((Arc::new(verifier), realm.into(), service.into()));
        self
    }

    /// The policy deciding every request.
    pub fn authorizer(&self) -> &dyn Authorizer {
        &*self.authorizer
    }

    /// The built-in token issuer, if any.
    pub fn token_issuer(&self) -> Option<&TokenIssuer> {
        self.issuer.as_ref()
    }

    /// The caller a password grant authenticates, if the credentials are right.
    pub(crate) async fn password_caller(&self, name: &str, password: &str) -> Option<Caller> {
        self.passwords.check(name, password).await.then(|| Caller {
            identity: Identity::user(name),
            scopes: None,
        })
    }

    /// Whether credentials claiming `identity` from `addr` are held back, and for how
    /// long.
    pub(crate) fn throttled(&self, identity: Option<&str>, addr: Option<IpAddr>) -> Option<Locked> {
        self.throttle.check(identity, addr)
    }

    /// Counts refused credentials against the identity they claimed and the address.
    pub(crate) fn auth_failed(&self, identity: Option<&str>, addr: Option<IpAddr>) {
        self.throttle.failed(identity, addr);
    }

    /// Clears the failures of an identity that authenticated.
    pub(crate) fn auth_succeeded(&self, identity: &Identity) {
        self.throttle.succeeded(identity.name());
    }

    fn verify_token(&self, token: &str) -> Result<TokenClaims, TokenError> {
        if let Some((verifier, _, _)) = &self.external {
            return verifier.verify(token);
        }
        match &self.issuer {
            Some(issuer) => issuer.verify(token),
            None => Err(TokenError::Invalid),
        }
    }

    /// Who is calling, from the `Authorization` header. Wrong credentials are an error
    /// (never silently anonymous), so a typo does not look like missing permissions.
    pub(crate) async fn identify(
        &self,
        headers: &HeaderMap,
        realm_base: &str,
    ) -> Result<Caller, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(Caller::anonymous());
        };
        let value = value.to_str().unwrap_or("");
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = STANDARD
                .decode(rest.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            if let Some((user, password)) = decoded.as_deref().and_then(|d| d.split_once(':'))
                && let Some(caller) = self.password_caller(user, password).await
            {
                return Ok(caller);
            }
            return Err(self.challenge(
                realm_base,
                None,
                Refusal::InvalidCredentials("invalid credentials"),
            ));
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            return match self.verify_token(rest.trim()) {
                Ok(claims) => Ok(Caller {
                    identity: claims.identity,
                    scopes: Some(claims.scopes),
                }),
                Err(e) => {
                    Err(self.challenge(realm_base, None, Refusal::InvalidCredentials(e.as_str())))
                }
            };
        }
        Err(self.challenge(
            realm_base,
            None,
            Refusal::InvalidCredentials("unsupported authorization scheme"),
        ))
    }

    /// Whether `caller` may perform `action` on `repo` (the policy, and the token's
    /// scopes when there is a token), or the response that refuses it.
    pub(crate) fn check(
        &self,
        caller: &Caller,
        repo: &RepoName,
        action: Action,
        realm_base: &str,
    ) -> Result<(), ApiError> {
        if !self.authorizer.allows(&caller.identity, repo, action) {
            return Err(match caller.identity {
                // Credentials might change the answer: ask for them.
                Identity::Anonymous => self.challenge(
                    realm_base,
                    Some(&Scope::repository(repo.as_str(), &scope_actions(action))),
                    Refusal::Unauthenticated,
                ),
                Identity::User(_) => denied(),
            });
        }
        if let Some(scopes) = &caller.scopes {
            let resource = Resource::Repository(repo.as_str().to_owned());
            if !scopes.iter().any(|s| s.covers(&resource, Some(action))) {
                // The policy would allow it: the client needs a token with more scope.
                return Err(self.challenge(
                    realm_base,
                    Some(&Scope::repository(repo.as_str(), &scope_actions(action))),
                    Refusal::InsufficientScope,
                ));
            }
        }
        Ok(())
    }

    /// Whether `caller` may read `repo` without asking again: the source side of a
    /// mount, which falls back to an upload rather than failing.
    pub(crate) fn may(&self, caller: &Caller, repo: &RepoName, action: Action) -> bool {
        self.authorizer.allows(&caller.identity, repo, action)
            && caller.scopes.as_ref().is_none_or(|scopes| {
                let resource = Resource::Repository(repo.as_str().to_owned());
                scopes.iter().any(|s| s.covers(&resource, Some(action)))
            })
    }

    /// Whether `caller` may ask for the catalog (the listing is filtered per
    /// repository); a token must carry `registry:catalog:*`.
    pub(crate) fn check_catalog(&self, caller: &Caller, realm_base: &str) -> Result<(), ApiError> {
        match &caller.scopes {
            // Anonymous and tokenless: send the client for a token first when there is a
            // token server (it may come back with one carrying the catalog scope).
            None if caller.identity == Identity::Anonymous && self.bearer() => Err(self.challenge(
                realm_base,
                Some(&Scope {
                    resource: Resource::Catalog,
                    actions: Vec::new(),
                }),
                Refusal::Unauthenticated,
            )),
            Some(scopes) if !scopes.iter().any(|s| s.covers(&Resource::Catalog, None)) => Err(self
                .challenge(
                    realm_base,
                    Some(&Scope {
                        resource: Resource::Catalog,
                        actions: Vec::new(),
                    }),
                    Refusal::InsufficientScope,
                )),
            _ => Ok(()),
        }
    }

    /// `/v2/` answers 200 only to callers with valid credentials; clients probe it to
    /// learn how to authenticate.
    pub(crate) fn check_base(&self, caller: &Caller, realm_base: &str) -> Result<(), ApiError> {
        match caller.identity {
            Identity::Anonymous if caller.scopes.is_none() => {
                Err(self.challenge(realm_base, None, Refusal::Unauthenticated))
            }
            _ => Ok(()),
        }
    }

    /// Whether clients are sent to a token server (otherwise to Basic credentials).
    fn bearer(&self) -> bool {
        self.external.is_some() || self.issuer.is_some()
    }

    /// A 401 with the `WWW-Authenticate` challenge that tells the client how to
    /// authenticate for `scope`.
    fn challenge(&self, realm_base: &str, scope: Option<&Scope>, error: Refusal<'_>) -> ApiError {
        let bearer = match (&self.external, &self.issuer) {
            (Some((_, realm, service)), _) => Some((realm.clone(), service.clone())),
            (None, Some(issuer)) => {
                Some((format!("{realm_base}/token"), issuer.service().to_owned()))
            }
            (None, None) => None,
        };
        let value = match bearer {
            Some((realm, service)) => {
                let mut v = format!(
                    "Bearer realm={},service={}",
                    quoted(&realm),
                    quoted(&service)
                );
                if let Some(scope) = scope {
                    v.push_str(&format!(",scope={}", quoted(&scope.to_string())));
                }
                match error {
                    Refusal::InsufficientScope => v.push_str(",error=\"insufficient_scope\""),
                    Refusal::InvalidCredentials(_) => v.push_str(",error=\"invalid_token\""),
                    Refusal::Unauthenticated => {}
                }
                v
            }
            None => "Basic realm=\"registry\"".to_owned(),
        };
        let e = match error {
            // RFC 6750: a valid token without the needed scope is 403, with the
            // challenge naming the scope, so clients fetch a wider token and retry.
            Refusal::InsufficientScope => ApiError::new(
                StatusCode::FORBIDDEN,
                "DENIED",
                "the token does not grant this access",
            ),
            Refusal::InvalidCredentials(why) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", why)
            }
            Refusal::Unauthenticated => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "authentication required",
            ),
        };
        e.with_header(header::WWW_AUTHENTICATE, value)
    }

    /// The token endpoint: authenticates the client (Basic, or anonymous) and grants
    /// the requested scopes cut down to what the policy allows. Asking for more never
    /// fails: the token simply carries less, as the token spec says.
    pub(crate) fn grant(
        &self,
        caller: &Caller,
        service: Option<&str>,
        requested: &[String],
    ) -> Result<TokenResponse, ApiError> {
        let issuer = self.issuer.as_ref().ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "UNSUPPORTED", "no token endpoint")
        })?;
        if caller.scopes.is_some() {
            // A token cannot mint a token: refresh would let a stolen token live forever.
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "authenticate with a password to get a token",
            ));
        }
        if let Some(s) = service
            && s != issuer.service()
        {
            return Err(ApiError::bad_request(
                "UNSUPPORTED",
                format!("unknown service {s:?}"),
            ));
        }
        let mut granted = Vec::new();
        for scope in requested
            .iter()
            .flat_map(|s| s.split(' '))
            .filter_map(Scope::parse)
        {
            match &scope.resource {
                Resource::Catalog => granted.push(scope),
                Resource::Repository(name) => {
                    // A name the registry would refuse gets no access at all.
                    let Ok(repo) = RepoName::parse(name) else {
                        continue;
                    };
                    let actions: Vec<Action> = scope
                        .actions
                        .iter()
                        .copied()
                        .filter(|a| self.authorizer.allows(&caller.identity, &repo, *a))
                        .collect();
                    if !actions.is_empty() {
                        granted.push(Scope::repository(name, &actions));
                    }
                }
            }
        }
        let ttl = issuer.ttl();
        let token = issuer.issue(&caller.identity, &granted, ttl);
        Ok(TokenResponse {
            access_token: token.clone(),
            token,
            expires_in: ttl.as_secs(),
            issued_at: rfc3339(SystemTime::now()),
        })
    }
}

/// `s` as an RFC 9110 quoted-string: `"` and `\\` escaped, control characters (which no
/// header may carry) dropped, so a value can never end the string or the header.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The actions a client should ask for to be allowed `action` (Docker clients ask for
/// pull alongside push).
fn scope_actions(action: Action) -> Vec<Action> {
    match action {
        Action::Push => vec![Action::Pull, Action::Push],
        a => vec![a],
    }
}

/// Why a request is sent back with a challenge.
#[derive(Clone, Copy)]
enum Refusal<'a> {
    /// No credentials: 401, authenticate.
    Unauthenticated,
    /// Credentials that do not verify: 401, with the reason (never the credentials).
    InvalidCredentials(&'a str),
    /// A valid token without the needed scope: 403, fetch a wider token.
    InsufficientScope,
}

/// The 429 of credentials held back by the throttle, with `Retry-After` in whole
/// seconds, rounded up.
pub(crate) fn throttled_error(locked: &Locked) -> ApiError {
    let secs = locked.retry_after.as_millis().div_ceil(1000).max(1);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
        format!("too many failed authentication attempts; retry in {secs} s"),
    )
    .with_header(header::RETRY_AFTER, secs.to_string())
}

fn denied() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "DENIED",
        "requested access to the resource is denied",
    )
}

/// The token endpoint's answer (both field names: older clients read `token`, OAuth2
/// clients `access_token`).
#[derive(Debug, Serialize)]
pub(crate) struct TokenResponse {
    token: String,
    access_token: String,
    expires_in: u64,
    issued_at: String,
}

/// `t` as an RFC 3339 UTC timestamp with whole seconds (`2023-11-14T22:13:20Z`), the
/// token response's `issued_at`. Clamped to what `humantime` formats (1970 to 9999)
/// instead of panicking on a clock outside it.
fn rfc3339(t: SystemTime) -> String {
    let last = UNIX_EPOCH + Duration::from_secs(253_402_300_799); // 9999-12-31T23:59:59Z
    humantime::format_rfc3339_seconds(t.clamp(UNIX_EPOCH, last)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry_core::access::{AuthenticatedOnly, Grantee, PrefixRules};

    fn auth() -> Auth {
        Auth::new(
            PrefixRules::new()
                .grant(Grantee::Anyone, "public", Action::READ)
                .grant(Grantee::user("ci"), "", Action::ALL),
        )
        .with_user("ci", "s3cret")
        .with_token_issuer(TokenIssuer::new("test"))
    }

    fn basic(user: &str, pass: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = format!("Basic {}", STANDARD.encode(format!("{user}:{pass}")));
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn scopes_parse_and_print() {
        let s = Scope::parse("repository:a/b:push,pull,bogus").unwrap();
        assert_eq!(s.to_string(), "repository:a/b:pull,push");
        assert_eq!(
            Scope::parse("repository:a:*").unwrap().actions.len(),
            Action::ALL.len()
        );
        assert_eq!(
            Scope::parse("registry:catalog:*").unwrap().resource,
            Resource::Catalog
        );
        assert_eq!(Scope::parse("repository::pull"), None);
        assert_eq!(Scope::parse("registry:other:*"), None);
        assert_eq!(Scope::parse("nonsense"), None);
    }

    #[tokio::test]
    async fn passwords_are_checked() {
        let a = auth();
        assert!(a.identify(&basic("ci", "s3cret"), "http://h").await.is_ok());
        let e = a
            .identify(&basic("ci", "wrong"), "http://h")
            .await
            .unwrap_err();
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        assert!(
            a.identify(&basic("nobody", "s3cret"), "http://h")
                .await
                .is_err()
        );
        assert!(a.identify(&basic("ci", ""), "http://h").await.is_err());
        assert!(!format!("{a:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn token_requests_are_cut_to_the_policy() {
        let a = auth();
        let anon = a.identify(&HeaderMap::new(), "http://h").await.unwrap();
        let r = a
            .grant(
                &anon,
                Some("test"),
                &[
                    "repository:public:pull,push".into(),
                    "repository:private:pull".into(),
                ],
            )
            .unwrap();
        let claims = a.issuer.as_ref().unwrap().verify(&r.token).unwrap();
        assert_eq!(
            claims.scopes,
            [Scope::repository("public", &[Action::Pull])]
        );
        assert!(a.grant(&anon, Some("elsewhere"), &[]).is_err());
        let ci = a
            .identify(&basic("ci", "s3cret"), "http://h")
            .await
            .unwrap();
        let r = a.grant(&ci, None, &["repository:x:push".into()]).unwrap();
        let claims = a.issuer.as_ref().unwrap().verify(&r.token).unwrap();
        assert_eq!(claims.scopes, [Scope::repository("x", &[Action::Push])]);
    }

    #[tokio::test]
    async fn anonymous_refusals_challenge_and_users_are_denied() {
        let a = Auth::new(AuthenticatedOnly).with_user("u", "p");
        let repo = RepoName::parse("r").unwrap();
        let anon = a.identify(&HeaderMap::new(), "http://h").await.unwrap();
        let e = a.check(&anon, &repo, Action::Pull, "http://h").unwrap_err();
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        let u = a.identify(&basic("u", "p"), "http://h").await.unwrap();
        assert!(a.check(&u, &repo, Action::Push, "http://h").is_ok());
        let denying = Auth::new(PrefixRules::new()).with_user("u", "p");
        let u = denying
            .identify(&basic("u", "p"), "http://h")
            .await
            .unwrap();
        let e = denying
            .check(&u, &repo, Action::Pull, "http://h")
            .unwrap_err();
        assert_eq!((e.status(), e.code()), (StatusCode::FORBIDDEN, "DENIED"));
    }

    #[test]
    fn dates_format_as_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        // Outside what the format holds: clamped, never a panic.
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(300_000_000_000)),
            "9999-12-31T23:59:59Z"
        );
    }
}
