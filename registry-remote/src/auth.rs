//! Credentials, `WWW-Authenticate` challenges and the token cache.
//!
//! The flow (Docker / OCI token authentication): a request goes out anonymously; a 401
//! names the scheme. `Basic`: the request is sent again with the credentials, and every
//! later request carries them from the start. `Bearer realm=…,service=…,scope=…`: a
//! token is fetched from the realm for the scopes the request needs (with the Basic
//! credentials, if any) and cached per scope set until shortly before it expires, so
//! later requests on the same repository and actions reuse it without a 401 first.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hyper::header::{HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use registry_core::RepoName;

/// How to authenticate to a remote registry.
///
/// `Debug` never shows the password.
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Credentials {
    /// No credentials: anonymous access (and anonymous tokens, where the registry
    /// hands them out).
    #[default]
    Anonymous,
    /// A user name and password, sent as HTTP Basic credentials to the registry (when
    /// it asks for Basic) or to its token server (when it asks for a Bearer token).
    Basic {
        /// The user name.
        username: String,
        /// The password (or a personal access token standing in for one).
        password: String,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

impl Credentials {
    /// Basic credentials.
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials::Basic {
            username: username.into(),
            password: password.into(),
        }
    }

    /// Reads `USER:PASSWORD` from the first line of a file (`file:PATH`) or from an
    /// environment variable (`env:VAR`). A password is never taken from a command line,
    /// where other users of the machine can read it.
    ///
    /// Errors name the source, never its content.
    pub fn parse_source(source: &str) -> io::Result<Credentials> {
        let (text, origin) = if let Some(path) = source.strip_prefix("file:") {
            let text = std::fs::read_to_string(path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot read credentials file {path:?}: {e}"),
                )
            })?;
            (text, format!("file {path:?}"))
        } else if let Some(var) = source.strip_prefix("env:") {
            let text = std::env::var(var).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("cannot read credentials variable {var:?}: {e}"),
                )
            })?;
            (text, format!("variable {var:?}"))
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "credentials source must be file:PATH or env:VAR",
            ));
        };
        let line = text.lines().next().unwrap_or("");
        match line.split_once(':') {
            Some((user, password)) if !user.is_empty() => Ok(Credentials::basic(user, password)),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the first line of credentials {origin} is not USER:PASSWORD"),
            )),
        }
    }

    /// The `Authorization` value for Basic authentication, if there are credentials.
    pub(crate) fn basic_header(&self) -> Option<HeaderValue> {
        match self {
            Credentials::Anonymous => None,
            Credentials::Basic { username, password } => {
                let encoded = STANDARD.encode(format!("{username}:{password}"));
                let mut v = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
                v.set_sensitive(true);
                Some(v)
            }
        }
    }
}

/// What a request needs a token for. Source operations read (`pull`); sink operations
/// write (`pull,push`), so that the token fetched for a sink's first HEAD also serves
/// its uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Pull,
    Push,
}

/// The token scopes of a request on `repo` with `access`.
pub(crate) fn scopes(repo: &RepoName, access: Access) -> Vec<String> {
    let actions = match access {
        Access::Pull => "pull",
        Access::Push => "pull,push",
    };
    vec![format!("repository:{repo}:{actions}")]
}

/// One parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scopes: Vec<String>,
        error: Option<String>,
    },
    Other(String),
}

/// The challenges of a response, Bearer first (a registry that offers both prefers
/// tokens), then Basic.
pub(crate) fn challenges(headers: &HeaderMap) -> Vec<Challenge> {
    let mut out = Vec::new();
    for value in headers.get_all(WWW_AUTHENTICATE) {
        if let Ok(text) = value.to_str() {
            for (scheme, params) in parse_challenges(text) {
                let get = |k: &str| {
                    params
                        .iter()
                        .find(|(name, _)| name.eq_ignore_ascii_case(k))
                        .map(|(_, v)| v.clone())
                };
                if scheme.eq_ignore_ascii_case("basic") {
                    out.push(Challenge::Basic);
                } else if scheme.eq_ignore_ascii_case("bearer") {
                    match get("realm") {
                        Some(realm) => out.push(Challenge::Bearer {
                            realm,
                            service: get("service"),
                            scopes: get("scope")
                                .map(|s| s.split_ascii_whitespace().map(str::to_owned).collect())
                                .unwrap_or_default(),
                            error: get("error"),
                        }),
                        None => out.push(Challenge::Other("Bearer without a realm".into())),
                    }
                } else {
                    out.push(Challenge::Other(scheme));
                }
            }
        }
    }
    out.sort_by_key(|c| match c {
        Challenge::Bearer { .. } => 0,
        Challenge::Basic => 1,
        Challenge::Other(_) => 2,
    });
    out
}

/// Splits a header value into challenges: `scheme param=value, param="quoted", scheme2`
/// (RFC 9110 §11.6.1; token68 forms, which no registry sends in a challenge, are read
/// as a parameterless scheme).
fn parse_challenges(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_ascii_whitespace());
        if rest.is_empty() {
            return out;
        }
        let end = rest
            .find(|c: char| c == '=' || c == ',' || c.is_ascii_whitespace())
            .unwrap_or(rest.len());
        let token = &rest[..end];
        rest = &rest[end..];
        let after = rest.trim_start_matches(|c: char| c.is_ascii_whitespace());
        if let Some(value_start) = after.strip_prefix('=') {
            let value_start = value_start.trim_start_matches(|c: char| c.is_ascii_whitespace());
            let (value, remaining) = match value_start.strip_prefix('"') {
                Some(quoted) => read_quoted(quoted),
                None => {
                    let end = value_start.find(',').unwrap_or(value_start.len());
                    (value_start[..end].trim().to_owned(), &value_start[end..])
                }
            };
            rest = remaining;
            match out.last_mut() {
                Some((_, params)) => params.push((token.to_owned(), value)),
                // A parameter before any scheme: not a challenge; skip it.
                None => continue,
            }
        } else if !token.is_empty() {
            out.push((token.to_owned(), Vec::new()));
        }
    }
}

/// A quoted string's value (after its opening quote) and what follows it.
fn read_quoted(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            }
            '"' => return (value, &s[i + 1..]),
            c => value.push(c),
        }
    }
    (value, "")
}

/// Where the registry sends clients for credentials, as learnt from its challenges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scheme {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

struct Token {
    value: HeaderValue,
    renew_at: Instant,
}

/// Tokens kept at most: one per repository and access used recently, so a sync of
/// many repositories does not grow the cache without bound.
const MAX_TOKENS: usize = 1024;

/// What the client knows about the registry's authentication. Behind a mutex, never
/// held across an await.
#[derive(Default)]
pub(crate) struct AuthState {
    scheme: Option<Scheme>,
    tokens: HashMap<String, Token>,
}

/// The credentials to send with a request, as far as the cache knows.
pub(crate) enum Cached {
    /// Send this `Authorization` value.
    Header(HeaderValue),
    /// The registry wants tokens and none is cached for these scopes: fetch one first.
    Fetch {
        realm: String,
        service: Option<String>,
    },
    /// Send the request anonymously.
    Nothing,
}

impl AuthState {
    pub(crate) fn set_scheme(&mut self, scheme: Scheme) {
        if self.scheme.as_ref() != Some(&scheme) {
            self.tokens.clear();
            self.scheme = Some(scheme);
        }
    }

    /// What to send for a request needing the scopes `key`.
    pub(crate) fn lookup(&self, key: &str, credentials: &Credentials) -> Cached {
        match &self.scheme {
            None => Cached::Nothing,
            Some(Scheme::Basic) => credentials
                .basic_header()
                .map_or(Cached::Nothing, Cached::Header),
            Some(Scheme::Bearer { realm, service }) => match self.tokens.get(key) {
                Some(t) if t.renew_at > Instant::now() => Cached::Header(t.value.clone()),
                _ => Cached::Fetch {
                    realm: realm.clone(),
                    service: service.clone(),
                },
            },
        }
    }

    /// Keeps a token for the scopes `key`, valid for `lifetime` from now.
    pub(crate) fn store(&mut self, key: String, token: &str, lifetime: Duration) -> Option<()> {
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        value.set_sensitive(true);
        let now = Instant::now();
        if self.tokens.len() >= MAX_TOKENS {
            self.tokens.retain(|_, t| t.renew_at > now);
            if self.tokens.len() >= MAX_TOKENS {
                self.tokens.clear();
            }
        }
        // Renewed a tenth of its lifetime early, so that a token does not expire
        // between the check and the registry's.
        let renew_at = now + lifetime - lifetime / 10;
        self.tokens.insert(key, Token { value, renew_at });
        Some(())
    }
}

/// A token endpoint's answer (Docker token spec: `token`, or OAuth2's `access_token`).
#[derive(serde::Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token and its lifetime (60 s when not given, as the token spec says).
    pub(crate) fn token(&self) -> Option<(&str, Duration)> {
        let token = self
            .token
            .as_deref()
            .filter(|t| !t.is_empty())
            .or(self.access_token.as_deref().filter(|t| !t.is_empty()))?;
        let secs = self.expires_in.filter(|s| *s > 0).unwrap_or(60);
        Some((token, Duration::from_secs(secs)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let c = Credentials::basic("alice", "s3cret-pass");
        let shown = format!("{c:?} {c:#?}");
        assert!(shown.contains("alice"));
        assert!(!shown.contains("s3cret"));
    }

    #[test]
    fn credentials_come_from_files_and_variables() {
        let dir = std::env::temp_dir().join(format!("registry-remote-cred-{}", std::process::id()));
        std::fs::write(&dir, "bob:pa:ss word\r\nignored\n").unwrap();
        let c = Credentials::parse_source(&format!("file:{}", dir.display())).unwrap();
        assert_eq!(c, Credentials::basic("bob", "pa:ss word"));
        std::fs::write(&dir, "no-colon-secret\n").unwrap();
        let e = Credentials::parse_source(&format!("file:{}", dir.display())).unwrap_err();
        assert!(!e.to_string().contains("no-colon-secret"));
        std::fs::remove_file(&dir).unwrap();
        assert!(Credentials::parse_source("file:/nonexistent/creds").is_err());
        assert!(Credentials::parse_source("env:REGISTRY_REMOTE_TEST_SURELY_UNSET").is_err());
        // Never from the command line itself.
        assert!(Credentials::parse_source("alice:pw").is_err());
    }

    #[test]
    fn challenges_parse() {
        let mut h = HeaderMap::new();
        h.append(
            WWW_AUTHENTICATE,
            r#"Bearer realm="https://auth.example/token",service="reg, example",scope="repository:a/b:pull repository:c:pull,push",error="insufficient_scope""#
                .parse()
                .unwrap(),
        );
        h.append(WWW_AUTHENTICATE, "Basic realm=\"x\"".parse().unwrap());
        let c = challenges(&h);
        assert_eq!(
            c[0],
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg, example".into()),
                scopes: vec![
                    "repository:a/b:pull".into(),
                    "repository:c:pull,push".into()
                ],
                error: Some("insufficient_scope".into()),
            }
        );
        assert_eq!(c[1], Challenge::Basic);

        let mut h = HeaderMap::new();
        h.append(
            WWW_AUTHENTICATE,
            r#"Basic realm="a\"b", Bearer realm=http://t/token"#
                .parse()
                .unwrap(),
        );
        let c = challenges(&h);
        assert!(
            matches!(&c[0], Challenge::Bearer { realm, service: None, .. } if realm == "http://t/token")
        );
        assert_eq!(c[1], Challenge::Basic);
    }

    #[test]
    fn tokens_are_cached_per_scope() {
        let mut s = AuthState::default();
        let creds = Credentials::basic("u", "p");
        assert!(matches!(s.lookup("k", &creds), Cached::Nothing));
        s.set_scheme(Scheme::Bearer {
            realm: "r".into(),
            service: None,
        });
        assert!(matches!(s.lookup("k", &creds), Cached::Fetch { .. }));
        s.store("k".into(), "tok", Duration::from_secs(60)).unwrap();
        assert!(matches!(s.lookup("k", &creds), Cached::Header(v) if v == "Bearer tok"));
        assert!(matches!(s.lookup("other", &creds), Cached::Fetch { .. }));
        s.store("old".into(), "t", Duration::ZERO).unwrap();
        assert!(matches!(s.lookup("old", &creds), Cached::Fetch { .. }));
        s.set_scheme(Scheme::Basic);
        assert!(
            matches!(s.lookup("k", &creds), Cached::Header(v) if v.to_str().unwrap().starts_with("Basic "))
        );
        assert!(matches!(
            s.lookup("k", &Credentials::Anonymous),
            Cached::Nothing
        ));
    }

    #[test]
    fn token_responses() {
        let r: TokenResponse = serde_json::from_str(r#"{"access_token":"a"}"#).unwrap();
        assert_eq!(r.token(), Some(("a", Duration::from_secs(60))));
        let r: TokenResponse =
            serde_json::from_str(r#"{"token":"t","access_token":"a","expires_in":300}"#).unwrap();
        assert_eq!(r.token(), Some(("t", Duration::from_secs(300))));
        let r: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert_eq!(r.token(), None);
    }
}
