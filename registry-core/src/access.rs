//! Authorization: who may do what to which repository.
//!
//! Authentication (proving who the caller is) belongs to the transport, for example
//! registry-http's Basic and Bearer token support; it ends with an [`Identity`]. This
//! module decides what that identity may do, as a plain Rust trait ([`Authorizer`]) so
//! that an embedder can express any policy in code, with two built-in policies for the
//! common layouts:
//!
//! - [`PrefixRules`]: grants per repository prefix and per caller (anyone, anonymous,
//!   any authenticated user, or one named user);
//! - [`AnonymousRead`]: wraps any policy and lets everyone pull and list.
//!
//! ```
//! use registry_core::access::{Action, Authorizer, Grantee, Identity, PrefixRules};
//! use registry_core::RepoName;
//!
//! // A CI pool: only the `ci` user writes, everyone reads.
//! let policy = PrefixRules::new()
//!     .grant(Grantee::Anyone, "", Action::READ)
//!     .grant(Grantee::user("ci"), "", Action::ALL);
//! let repo = RepoName::parse("team/app").unwrap();
//! assert!(policy.allows(&Identity::Anonymous, &repo, Action::Pull));
//! assert!(!policy.allows(&Identity::Anonymous, &repo, Action::Push));
//! assert!(policy.allows(&Identity::user("ci"), &repo, Action::Push));
//! ```

use std::fmt;
use std::sync::Arc;

use crate::names::RepoName;
use crate::registry::ReadAccess;

/// Who is calling, as established by the transport.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// No credentials were presented.
    Anonymous,
    /// An authenticated user (by password, or by a token naming them).
    User(String),
}

impl Identity {
    /// A named, authenticated user.
    pub fn user(name: impl Into<String>) -> Self {
        Identity::User(name.into())
    }

    /// The user's name, `None` when anonymous.
    pub fn name(&self) -> Option<&str> {
        match self {
            Identity::Anonymous => None,
            Identity::User(n) => Some(n),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Anonymous => f.write_str("anonymous"),
            Identity::User(n) => f.write_str(n),
        }
    }
}

/// What a caller wants to do to a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Read manifests, blobs, tags and referrers (also needed as the source of a mount).
    Pull,
    /// Upload blobs, push manifests and tags.
    Push,
    /// Delete manifests, tags and blobs.
    Delete,
    /// See the repository's name in the catalog.
    List,
}

impl Action {
    /// Every action.
    pub const ALL: &'static [Action] = &[Action::Pull, Action::Push, Action::Delete, Action::List];
    /// Reading: pull and list.
    pub const READ: &'static [Action] = &[Action::Pull, Action::List];
    /// Reading and pushing, without deletes.
    pub const READ_WRITE: &'static [Action] = &[Action::Pull, Action::Push, Action::List];

    /// The name used in token scopes (`pull`, `push`, `delete`, `list`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
            Action::List => "list",
        }
    }

    /// Parses a scope action name; `None` for names this registry does not know.
    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "pull" => Action::Pull,
            "push" => Action::Push,
            "delete" => Action::Delete,
            "list" => Action::List,
            _ => return None,
        })
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decides whether an identity may perform an action on a repository.
///
/// Called on every request, so implementations should answer from memory. It must be
/// a pure decision: the same question gets the same answer while the policy is
/// unchanged (a token issued under one answer is checked again under the current one).
pub trait Authorizer: Send + Sync {
    /// Whether `who` may perform `action` on `repo`.
    fn allows(&self, who: &Identity, repo: &RepoName, action: Action) -> bool;
}

impl<A: Authorizer + ?Sized> Authorizer for Arc<A> {
    fn allows(&self, who: &Identity, repo: &RepoName, action: Action) -> bool {
        (**self).allows(who, repo, action)
    }
}

impl Authorizer for crate::registry::AllowAll {
    fn allows(&self, _: &Identity, _: &RepoName, _: Action) -> bool {
        true
    }
}

/// Who a [`PrefixRules`] grant applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grantee {
    /// Every caller, authenticated or not.
    Anyone,
    /// Only callers without credentials.
    Anonymous,
    /// Every authenticated user.
    Authenticated,
    /// One named user.
    User(String),
}

impl Grantee {
    /// One named user.
    pub fn user(name: impl Into<String>) -> Self {
        Grantee::User(name.into())
    }

    fn matches(&self, who: &Identity) -> bool {
        match (self, who) {
            (Grantee::Anyone, _) => true,
            (Grantee::Anonymous, Identity::Anonymous) => true,
            (Grantee::Authenticated, Identity::User(_)) => true,
            (Grantee::User(want), Identity::User(have)) => want == have,
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Grant {
    grantee: Grantee,
    prefix: String,
    actions: Vec<Action>,
}

/// A policy of grants by repository prefix: an action is allowed when any grant covers
/// the caller, the repository and the action; everything else is denied.
///
/// A prefix matches whole path components: `team` covers `team` and `team/app`, never
/// `teammate`; the empty prefix covers every repository.
#[derive(Debug, Clone, Default)]
pub struct PrefixRules {
    grants: Vec<Grant>,
}

impl PrefixRules {
    /// A policy that denies everything until grants are added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a grant of `actions` on repositories under `prefix` to `grantee`.
    /// A trailing `/` on the prefix is ignored.
    pub fn grant(mut self, grantee: Grantee, prefix: &str, actions: &[Action]) -> Self {
        self.grants.push(Grant {
            grantee,
            prefix: prefix.trim_end_matches('/').to_owned(),
            actions: actions.to_vec(),
        });
        self
    }
}

/// Whether `repo` is `prefix` or lies below it: prefixes are whole path components
/// (`team` covers `team` and `team/app`, not `teamx`), and the empty prefix covers every
/// repository. Access rules, quotas, immutable-tag patterns and retention rules all
/// scope repositories this way.
pub fn under_prefix(repo: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || repo == prefix
        || (repo.starts_with(prefix) && repo.as_bytes().get(prefix.len()) == Some(&b'/'))
}

impl Authorizer for PrefixRules {
    fn allows(&self, who: &Identity, repo: &RepoName, action: Action) -> bool {
        self.grants.iter().any(|g| {
            g.actions.contains(&action)
                && g.grantee.matches(who)
                && under_prefix(repo.as_str(), &g.prefix)
        })
    }
}

/// Lets everyone pull and list every repository; everything else is decided by the
/// inner policy.
#[derive(Debug, Clone)]
pub struct AnonymousRead<A>(pub A);

impl<A: Authorizer> Authorizer for AnonymousRead<A> {
    fn allows(&self, who: &Identity, repo: &RepoName, action: Action) -> bool {
        matches!(action, Action::Pull | Action::List) || self.0.allows(who, repo, action)
    }
}

/// Every authenticated user may do everything; anonymous callers nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthenticatedOnly;

impl Authorizer for AuthenticatedOnly {
    fn allows(&self, who: &Identity, _: &RepoName, _: Action) -> bool {
        matches!(who, Identity::User(_))
    }
}

/// The [`ReadAccess`] of one caller under a policy: what mounts may take from and what
/// listings may show.
pub struct CallerReads<'a> {
    authorizer: &'a dyn Authorizer,
    identity: &'a Identity,
    action: Action,
}

impl<'a> CallerReads<'a> {
    /// Repositories `identity` may pull from (the source side of a mount).
    pub fn pull(authorizer: &'a dyn Authorizer, identity: &'a Identity) -> Self {
        CallerReads {
            authorizer,
            identity,
            action: Action::Pull,
        }
    }

    /// Repositories `identity` may see in the catalog.
    pub fn list(authorizer: &'a dyn Authorizer, identity: &'a Identity) -> Self {
        CallerReads {
            authorizer,
            identity,
            action: Action::List,
        }
    }
}

impl ReadAccess for CallerReads<'_> {
    fn can_read(&self, repo: &RepoName) -> bool {
        self.authorizer.allows(self.identity, repo, self.action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    #[test]
    fn prefixes_match_whole_components() {
        assert!(under_prefix("team/app", "team"));
        assert!(under_prefix("team", "team"));
        assert!(!under_prefix("teammate/app", "team"));
        assert!(!under_prefix("tea", "team"));
        assert!(under_prefix("anything", ""));
        assert!(under_prefix("a/b/c", "a/b"));
        assert!(!under_prefix("a/bc", "a/b"));
    }

    #[test]
    fn prefix_rules_grant_only_what_is_listed() {
        let p = PrefixRules::new()
            .grant(Grantee::Anyone, "public/", Action::READ)
            .grant(Grantee::Authenticated, "", &[Action::Pull])
            .grant(Grantee::user("ci"), "ci", Action::ALL)
            .grant(Grantee::Anonymous, "drop", &[Action::Push]);
        let anon = Identity::Anonymous;
        let ci = Identity::user("ci");
        let bob = Identity::user("bob");
        assert!(p.allows(&anon, &repo("public/x"), Action::Pull));
        assert!(!p.allows(&anon, &repo("public/x"), Action::Push));
        assert!(!p.allows(&anon, &repo("ci/x"), Action::Pull));
        assert!(p.allows(&bob, &repo("ci/x"), Action::Pull));
        assert!(!p.allows(&bob, &repo("ci/x"), Action::Push));
        assert!(p.allows(&ci, &repo("ci/x"), Action::Delete));
        assert!(!p.allows(&ci, &repo("cix"), Action::Push));
        assert!(p.allows(&anon, &repo("drop"), Action::Push));
        assert!(
            !p.allows(&bob, &repo("drop"), Action::Push),
            "anonymous only"
        );
        assert!(!PrefixRules::new().allows(&ci, &repo("x"), Action::Pull));
    }

    #[test]
    fn anonymous_read_adds_reads_only() {
        let p = AnonymousRead(AuthenticatedOnly);
        assert!(p.allows(&Identity::Anonymous, &repo("x"), Action::Pull));
        assert!(p.allows(&Identity::Anonymous, &repo("x"), Action::List));
        assert!(!p.allows(&Identity::Anonymous, &repo("x"), Action::Push));
        assert!(!p.allows(&Identity::Anonymous, &repo("x"), Action::Delete));
        assert!(p.allows(&Identity::user("u"), &repo("x"), Action::Delete));
    }

    #[test]
    fn actions_round_trip_through_their_names() {
        for a in Action::ALL {
            assert_eq!(Action::parse(a.as_str()), Some(*a));
        }
        assert_eq!(Action::parse("*"), None);
        assert_eq!(Action::parse("PULL"), None);
    }
}
