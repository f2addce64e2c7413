//! Policy hooks as typed configuration: immutable tags, storage quotas per repository
//! prefix, and retention rules for the collector.
//!
//! Policies that must hold under concurrency (immutability, quotas) are enforced by the
//! metadata store inside the same atomic change that moves a tag or creates a link, so
//! two concurrent requests cannot together break them (`docs/design.md`, section 10).

use std::time::Duration;

use wildmatch::WildMatch;

use crate::access::under_prefix;
use crate::error::{Error, InvalidInput, Result};
use crate::names::{RepoName, Tag};

/// A glob over tag names, optionally limited to the repositories under a prefix.
///
/// Syntax: `[REPO_PREFIX:]GLOB`, where `GLOB` holds tag characters
/// (`[A-Za-z0-9._-]`) and `*` (any run of characters, possibly empty), for example
/// `v*`, `release-*`, `*`, or `prod/app:v*`. Repository names cannot contain `:`, so the
/// split is unambiguous. Matching is case-sensitive and covers the whole tag. There is
/// no `?`, no character class and no escape; tags have no `/`, so `*` needs no path
/// rule. (The glob is matched by the `wildmatch` crate, whose only other
/// metacharacter, `?`, the parser refuses.)
#[derive(Debug, Clone)]
pub struct TagPattern {
    prefix: Option<RepoName>,
    glob: String,
    matcher: WildMatch,
}

impl PartialEq for TagPattern {
    fn eq(&self, other: &Self) -> bool {
        // The matcher is built from the glob: equal globs match alike.
        (&self.prefix, &self.glob) == (&other.prefix, &other.glob)
    }
}

impl Eq for TagPattern {}

impl TagPattern {
    /// Parses `[REPO_PREFIX:]GLOB`; anything else is [`InvalidInput::Policy`].
    pub fn parse(s: &str) -> Result<Self> {
        let invalid =
            |why: &str| Error::Invalid(InvalidInput::Policy(format!("tag pattern {s:?}: {why}")));
        let (prefix, glob) = match s.split_once(':') {
            Some((p, g)) => (
                Some(RepoName::parse(p).map_err(|_| invalid("invalid repository prefix"))?),
                g,
            ),
            None => (None, s),
        };
        if glob.is_empty() || glob.len() > 128 {
            return Err(invalid("the glob must hold 1 to 128 characters"));
        }
        if !glob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'*'))
        {
            return Err(invalid("only tag characters and `*` are allowed"));
        }
        Ok(TagPattern {
            prefix,
            glob: glob.to_owned(),
            matcher: WildMatch::new(glob),
        })
    }

    /// The same glob, limited to repositories under `prefix`.
    pub fn under(mut self, prefix: RepoName) -> Self {
        self.prefix = Some(prefix);
        self
    }

    /// The repository prefix, if the pattern is limited to one.
    pub fn prefix(&self) -> Option<&RepoName> {
        self.prefix.as_ref()
    }

    /// Whether tag `tag` of repository `repo` matches.
    pub fn matches(&self, repo: &RepoName, tag: &Tag) -> bool {
        self.prefix
            .as_ref()
            .is_none_or(|p| under_prefix(repo.as_str(), p.as_str()))
            && self.matcher.matches(tag.as_str())
    }
}

impl std::fmt::Display for TagPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.prefix {
            Some(p) => write!(f, "{p}:{}", self.glob),
            None => f.write_str(&self.glob),
        }
    }
}

impl std::str::FromStr for TagPattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TagPattern::parse(s)
    }
}

/// A storage quota: the distinct blobs (layers, configs, manifests) linked in the
/// repositories under `prefix` may hold at most `bytes` bytes together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    /// The repositories counted (`prefix` itself and everything below it).
    pub prefix: RepoName,
    /// The limit in bytes; reaching it exactly is allowed.
    pub bytes: u64,
}

/// The write policies the metadata store enforces inside its atomic changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Tags that, once they exist, never move to another manifest and are never deleted.
    pub immutable_tags: Vec<TagPattern>,
    /// Storage quotas per repository prefix.
    pub quotas: Vec<Quota>,
    /// Where sparse manifests are accepted: manifests that reference blobs or child
    /// manifests the repository does not hold (a mirror of one platform of a
    /// multi-platform image). `None` stands for every repository, `Some(prefix)` for
    /// the repositories under `prefix`. Empty: every reference must be present.
    pub sparse: Vec<Option<RepoName>>,
}

impl Policy {
    /// Whether tag `tag` of `repo` is immutable.
    pub fn is_immutable(&self, repo: &RepoName, tag: &Tag) -> bool {
        self.immutable_tags.iter().any(|p| p.matches(repo, tag))
    }

    /// Whether manifests pushed to `repo` may reference what it does not hold.
    pub fn allows_sparse(&self, repo: &RepoName) -> bool {
        self.sparse.iter().any(|p| {
            p.as_ref()
                .is_none_or(|p| under_prefix(repo.as_str(), p.as_str()))
        })
    }

    /// The quotas that apply to `repo`.
    pub fn quotas_for<'a>(&'a self, repo: &'a RepoName) -> impl Iterator<Item = &'a Quota> + 'a {
        self.quotas
            .iter()
            .filter(move |q| under_prefix(repo.as_str(), q.prefix.as_str()))
    }
}

/// What a retention rule keeps among the tags it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The `n` most recently tagged, per repository.
    Last(usize),
    /// Those tagged less than this long ago.
    YoungerThan(Duration),
}

/// A retention rule applied by the collector: among the tags matching `tags` (per
/// repository, limited to the pattern's prefix if it has one), remove those `keep` does
/// not keep. A tag is removed only if at least one rule matches it and no matching rule
/// keeps it; immutable tags are never removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionRule {
    /// The tags the rule governs.
    pub tags: TagPattern,
    /// Which of them it keeps.
    pub keep: Keep,
}

impl RetentionRule {
    /// Keeps the `n` most recently tagged matches of `tags` in each repository.
    pub fn keep_last(n: usize, tags: TagPattern) -> Self {
        RetentionRule {
            tags,
            keep: Keep::Last(n),
        }
    }

    /// Keeps the matches of `tags` tagged less than `age` ago.
    pub fn keep_younger_than(age: Duration, tags: TagPattern) -> Self {
        RetentionRule {
            tags,
            keep: Keep::YoungerThan(age),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, repo: &str, tag: &str) -> bool {
        TagPattern::parse(p)
            .unwrap()
            .matches(&RepoName::parse(repo).unwrap(), &Tag::parse(tag).unwrap())
    }

    #[test]
    fn globs() {
        assert!(m("v*", "a", "v1.2"));
        assert!(m("v*", "a", "v"));
        assert!(!m("v*", "a", "latest"));
        assert!(m("*", "a", "anything"));
        assert!(m("release-*-final", "a", "release-1-2-final"));
        assert!(!m("release-*-final", "a", "release-1-final-x"));
        assert!(m("*-rc*", "a", "1.0-rc2"));
        assert!(m("latest", "a", "latest"));
        assert!(!m("latest", "a", "latest2"));
        assert!(m("prod/app:v*", "prod/app", "v1"));
        assert!(m("prod:v*", "prod/app/x", "v1"));
        assert!(!m("prod:v*", "production", "v1"));
        assert!(!m("prod/app:v*", "dev/app", "v1"));
        // Stars in a row, stars at both ends, backtracking past a partial match.
        assert!(m("v**1", "a", "v1"));
        assert!(m("*a*b*", "a", "xaxbx"));
        assert!(!m("*a*b", "a", "xaxbx"));
        assert!(m("*ab", "a", "aab"));
        assert!(m("a*a*a", "a", "aaa"));
        assert!(!m("a*a*a", "a", "aa"));
        // Case-sensitive, whole-tag matching.
        assert!(!m("V*", "a", "v1"));
        assert!(!m("v1", "a", "xv1"));
    }

    #[test]
    fn equality_is_by_prefix_and_glob() {
        let p = |s: &str| TagPattern::parse(s).unwrap();
        assert_eq!(p("v*"), p("v*"));
        assert_ne!(p("v*"), p("v**"));
        assert_ne!(p("a:v*"), p("v*"));
        assert_eq!(p("v*").under(RepoName::parse("a").unwrap()), p("a:v*"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "v?", "a b", "UPPER/x:v*", "x:", &"a".repeat(129)] {
            assert!(
                matches!(
                    TagPattern::parse(bad),
                    Err(Error::Invalid(InvalidInput::Policy(_)))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(TagPattern::parse("p/q:v*").unwrap().to_string(), "p/q:v*");
    }
}
