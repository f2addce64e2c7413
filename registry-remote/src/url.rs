//! The little URL handling a registry client needs, on `http::Uri`: origins (who may
//! see our credentials), resolving `Location` and `Link` targets, query values, and
//! URL text for error messages that never carries a query (presigned URLs and upload
//! states hide secrets there).

use hyper::Uri;
use hyper::header::HeaderMap;

/// Scheme, host and port: credentials are only ever sent to the origin they are for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// The origin of an absolute URL; `None` for a relative one or another scheme.
    pub(crate) fn of(uri: &Uri) -> Option<Origin> {
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let host = uri.host()?.to_ascii_lowercase();
        Some(Origin {
            port: uri.port_u16().unwrap_or(default_port),
            scheme,
            host,
        })
    }

    /// Whether `uri` is on this origin.
    pub(crate) fn contains(&self, uri: &Uri) -> bool {
        Origin::of(uri).as_ref() == Some(self)
    }
}

/// `reference` (a `Location` or `Link` target, or a token realm) resolved against
/// `base`, the URL it was received from (RFC 3986 §5.2, without dot segments, which
/// registries do not send).
pub(crate) fn resolve(base: &Uri, reference: &str) -> Result<Uri, String> {
    let reference = reference.trim();
    // RFC 3986 §3.1: a scheme is a letter, then letters, digits, `+`, `-` or `.`,
    // before a `:` that comes before any `/`, `?` or `#`.
    let has_scheme = reference.split_once(':').is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    let absolute = if has_scheme {
        reference.to_owned()
    } else {
        let scheme = base.scheme_str().ok_or("relative base URL")?;
        let authority = base.authority().ok_or("relative base URL")?;
        if let Some(rest) = reference.strip_prefix("//") {
            format!("{scheme}://{rest}")
        } else if reference.starts_with('/') {
            format!("{scheme}://{authority}{reference}")
        } else if let Some(query) = reference.strip_prefix('?') {
            format!("{scheme}://{authority}{}?{query}", base.path())
        } else {
            let path = base.path();
            let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
            let dir = if dir.is_empty() { "/" } else { dir };
            format!("{scheme}://{authority}{dir}{reference}")
        }
    };
    let uri: Uri = absolute.parse().map_err(|_| "not a valid URL".to_owned())?;
    if Origin::of(&uri).is_none() {
        return Err("not an http:// or https:// URL".to_owned());
    }
    Ok(uri)
}

/// `uri` with `name=value` added to its query.
pub(crate) fn with_query(uri: &Uri, name: &str, value: &str) -> Result<Uri, String> {
    let text = uri.to_string();
    let sep = match uri.query() {
        None => "?",
        Some("") => "",
        Some(_) => "&",
    };
    format!("{text}{sep}{name}={}", encode(value))
        .parse()
        .map_err(|_| "not a valid URL".to_owned())
}

/// Percent-encodes a query value: everything but RFC 3986's unreserved characters.
pub(crate) fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes a query value as HTML forms (and Go's `url.Values`) encode them.
fn decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first value of query parameter `name` of `uri`.
pub(crate) fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

/// The target of the `Link: <...>; rel="next"` header, if any (RFC 8288; several links
/// may share one header or come in several).
pub(crate) fn next_link(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(hyper::header::LINK) {
        let Ok(mut rest) = value.to_str() else {
            continue;
        };
        while let Some(open) = rest.find('<') {
            let after = &rest[open + 1..];
            let Some(close) = after.find('>') else {
                break;
            };
            let target = &after[..close];
            let params_end = after[close..].find('<').map_or(after.len(), |i| close + i);
            let params = &after[close + 1..params_end];
            let is_next = params.split(';').any(|p| {
                let Some((k, v)) = p.split_once('=') else {
                    return false;
                };
                k.trim().eq_ignore_ascii_case("rel")
                    && v.trim()
                        .trim_matches('"')
                        .split_ascii_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
            });
            if is_next {
                return Some(target.to_owned());
            }
            rest = &after[params_end..];
        }
    }
    None
}

/// How a request shows in messages: method and path, never the query.
pub(crate) fn describe(method: &hyper::Method, uri: &Uri) -> String {
    format!("{method} {}", uri.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn locations_resolve_against_the_request() {
        let base = uri("http://reg:5000/v2/a/blobs/uploads/");
        assert_eq!(
            resolve(&base, "/v2/a/blobs/uploads/x?_state=s").unwrap(),
            uri("http://reg:5000/v2/a/blobs/uploads/x?_state=s")
        );
        assert_eq!(
            resolve(&base, "https://other/y").unwrap(),
            uri("https://other/y")
        );
        assert_eq!(
            resolve(&base, "//cdn:81/z").unwrap(),
            uri("http://cdn:81/z")
        );
        assert_eq!(
            resolve(&base, "id").unwrap(),
            uri("http://reg:5000/v2/a/blobs/uploads/id")
        );
        assert!(resolve(&base, "ftp://x/y").is_err());
    }

    #[test]
    fn origins_compare_default_ports() {
        let o = Origin::of(&uri("https://Reg.example/v2/")).unwrap();
        assert!(o.contains(&uri("https://reg.example:443/x")));
        assert!(!o.contains(&uri("http://reg.example/x")));
        assert!(!o.contains(&uri("https://reg.example:444/x")));
    }

    #[test]
    fn queries_are_built_and_read() {
        let u = with_query(&uri("http://r/v2/a/blobs/uploads/x"), "digest", "sha256:ab").unwrap();
        assert_eq!(u.query(), Some("digest=sha256%3Aab"));
        let u = with_query(&uri("http://r/x?_state=a%2Bb"), "digest", "d").unwrap();
        assert_eq!(u.query(), Some("_state=a%2Bb&digest=d"));
        assert_eq!(query_param(&u, "_state").as_deref(), Some("a+b"));
        assert_eq!(query_param(&u, "nope"), None);
        assert_eq!(decode("a%3ab+c%zz%4"), "a:b c%zz%4");
    }

    #[test]
    fn next_links_are_found() {
        let mut h = HeaderMap::new();
        h.append(
            hyper::header::LINK,
            "</v2/a/tags/list?n=1&last=b>; rel=\"prev\", </v2/a/tags/list?n=1&last=c>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        assert_eq!(next_link(&h).as_deref(), Some("/v2/a/tags/list?n=1&last=c"));
        assert_eq!(next_link(&HeaderMap::new()), None);
    }
}
