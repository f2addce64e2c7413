//! `serve`'s flags for other registries: `--proxy` (pull-through cache), `--mirror`
//! (push-mirroring) and `serve sync` (a one-shot copy), over `registry-remote`.

use std::sync::Arc;
use std::time::Duration;

use registry_core::proxy::Upstream;
use registry_core::{Mirror, MirrorTarget, PromoteOptions, Registry, RegistryBuilder, RepoName};
use registry_remote::{Credentials, RemoteRegistry};

/// What `--proxy` and `--mirror` share: `PREFIX=URL`, the upstream's repository prefix
/// and where its credentials are.
#[derive(Debug, Clone)]
struct Remote {
    prefix: RepoName,
    url: String,
    remote_prefix: Option<RepoName>,
    credentials: Option<String>,
}

/// `--proxy PREFIX=URL[,remote=REPO_PREFIX][,credentials=file:PATH|env:VAR][,ttl=DURATION]
/// [,budget=BYTES][,push]`.
#[derive(Debug, Clone)]
pub(crate) struct ProxySpec {
    remote: Remote,
    ttl: Option<Duration>,
    budget: Option<u64>,
    push: bool,
}

/// `--mirror PREFIX=URL[,remote=REPO_PREFIX][,credentials=file:PATH|env:VAR][,deletes]
/// [,no-referrers]`.
#[derive(Debug, Clone)]
pub(crate) struct MirrorSpec {
    remote: Remote,
    deletes: bool,
    referrers: bool,
}

/// Splits `PREFIX=URL,OPTION...`; hands each option other than `remote=` and
/// `credentials=` to `option`.
fn parse_remote(
    s: &str,
    mut option: impl FnMut(&str, Option<&str>) -> Result<(), String>,
) -> Result<Remote, String> {
    let mut parts = s.split(',');
    let head = parts.next().unwrap_or_default();
    let (prefix, url) = head
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected PREFIX=URL[,OPTION...]"))?;
    let prefix = RepoName::parse(prefix).map_err(|e| format!("{prefix:?}: {e}"))?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "{url:?}: the URL must start with http:// or https://"
        ));
    }
    let mut remote = Remote {
        prefix,
        url: url.trim_end_matches('/').to_owned(),
        remote_prefix: None,
        credentials: None,
    };
    for part in parts {
        let (key, value) = match part.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (part, None),
        };
        match (key, value) {
            ("remote", Some(v)) => {
                remote.remote_prefix =
                    Some(RepoName::parse(v).map_err(|e| format!("remote={v:?}: {e}"))?);
            }
            ("credentials", Some(v)) => {
                if !(v.starts_with("file:") || v.starts_with("env:")) {
                    return Err(format!(
                        "credentials={v:?}: expected file:PATH or env:VAR (never the password itself)"
                    ));
                }
                remote.credentials = Some(v.to_owned());
            }
            (key, value) => option(key, value)?,
        }
    }
    Ok(remote)
}

impl Remote {
    fn describe(&self, arrow: &str) -> String {
        let remote = self
            .remote_prefix
            .as_ref()
            .map(|p| format!("/{p}"))
            .unwrap_or_default();
        format!("{}/ {arrow} {}{remote}/", self.prefix, self.url)
    }
}

impl ProxySpec {
    /// For the start-up lines: `PREFIX/ <- URL/`.
    pub(crate) fn describe(&self) -> String {
        self.remote.describe("<-")
    }
}

impl MirrorSpec {
    /// For the start-up lines: `PREFIX/ -> URL/`.
    pub(crate) fn describe(&self) -> String {
        self.remote.describe("->")
    }
}

pub(crate) fn parse_proxy(s: &str) -> Result<ProxySpec, String> {
    let (mut ttl, mut budget, mut push) = (None, None, false);
    let remote = parse_remote(s, |key, value| {
        match (key, value) {
            ("ttl", Some(v)) => ttl = Some(crate::parse_duration(v)?),
            ("budget", Some(v)) => {
                budget = Some(
                    v.parse()
                        .map_err(|_| format!("budget={v:?}: expected a number of bytes"))?,
                );
            }
            ("push", None) => push = true,
            _ => {
                return Err(format!(
                    "{key:?}: unknown --proxy option (remote=, credentials=, ttl=, budget=, push)"
                ));
            }
        }
        Ok(())
    })?;
    Ok(ProxySpec {
        remote,
        ttl,
        budget,
        push,
    })
}

pub(crate) fn parse_mirror(s: &str) -> Result<MirrorSpec, String> {
    let (mut deletes, mut referrers) = (false, true);
    let remote = parse_remote(s, |key, value| {
        match (key, value) {
            ("deletes", None) => deletes = true,
            ("no-referrers", None) => referrers = false,
            _ => {
                return Err(format!(
                    "{key:?}: unknown --mirror option (remote=, credentials=, deletes, no-referrers)"
                ));
            }
        }
        Ok(())
    })?;
    Ok(MirrorSpec {
        remote,
        deletes,
        referrers,
    })
}

fn credentials(source: Option<&str>) -> Result<Credentials, String> {
    match source {
        None => Ok(Credentials::Anonymous),
        Some(source) => Credentials::parse_source(source).map_err(|e| {
            format!(
                "cannot read credentials from {source}: {e}\n  the first line must be USER:PASSWORD"
            )
        }),
    }
}

fn client(url: &str, credentials_source: Option<&str>) -> Result<RemoteRegistry, String> {
    let client = RemoteRegistry::new(url).map_err(|e| format!("{url}: {e}"))?;
    Ok(client.with_credentials(credentials(credentials_source)?))
}

/// Adds the `--proxy` upstreams to a registry being built.
pub(crate) fn with_upstreams(
    mut builder: RegistryBuilder,
    specs: &[ProxySpec],
    spool: Option<&std::path::Path>,
) -> Result<RegistryBuilder, String> {
    for spec in specs {
        let r = &spec.remote;
        let source = client(&r.url, r.credentials.as_deref())?;
        let mut upstream =
            Upstream::new(r.prefix.clone(), r.url.clone(), Arc::new(source)).allow_push(spec.push);
        if let Some(p) = &r.remote_prefix {
            upstream = upstream.with_remote_prefix(p.clone());
        }
        if let Some(ttl) = spec.ttl {
            upstream = upstream.with_tag_ttl(ttl);
        }
        if let Some(budget) = spec.budget {
            upstream = upstream.with_cache_budget(budget);
        }
        builder = builder.with_upstream(upstream);
    }
    if let Some(dir) = spool {
        builder = builder.with_spool_dir(dir);
    }
    Ok(builder)
}

/// Whether any upstream has a budget to enforce.
pub(crate) fn any_budget(specs: &[ProxySpec]) -> bool {
    specs.iter().any(|s| s.budget.is_some())
}

/// Starts the `--mirror` targets.
pub(crate) fn start_mirrors(
    registry: &Registry,
    specs: &[MirrorSpec],
    instance: &str,
) -> Result<Vec<Mirror>, String> {
    let mut mirrors = Vec::new();
    for spec in specs {
        let r = &spec.remote;
        let sink = client(&r.url, r.credentials.as_deref())?;
        let mut target = MirrorTarget::new(r.prefix.clone(), r.url.clone(), Arc::new(sink))
            .with_deletes(spec.deletes)
            .with_referrers(spec.referrers);
        if let Some(p) = &r.remote_prefix {
            target = target.with_remote_prefix(p.clone());
        }
        mirrors.push(Mirror::start(registry.clone(), target, instance));
    }
    Ok(mirrors)
}

/// `--from`/`--to` of `serve sync`: `http(s)://HOST[:PORT]/REPO`, or `REPO` in this
/// serve's storage.
#[derive(Debug, Clone)]
pub(crate) enum SyncEnd {
    Remote { url: String, repo: RepoName },
    Local(RepoName),
}

pub(crate) fn parse_sync_end(s: &str) -> Result<SyncEnd, String> {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = s.strip_prefix(scheme) {
            let (host, repo) = rest
                .split_once('/')
                .ok_or_else(|| format!("{s:?}: expected {scheme}HOST[:PORT]/REPO"))?;
            let repo = RepoName::parse(repo).map_err(|e| format!("{repo:?}: {e}"))?;
            return Ok(SyncEnd::Remote {
                url: format!("{scheme}{host}"),
                repo,
            });
        }
    }
    Ok(SyncEnd::Local(RepoName::parse(s).map_err(|e| {
        format!("{s:?}: {e} (or a URL http://HOST/REPO)")
    })?))
}

/// `serve sync`: copies every tag of one repository into another; `local` is this
/// serve's registry, opened only if one side needs it.
pub(crate) async fn sync(
    from: &SyncEnd,
    from_credentials: Option<&str>,
    to: &SyncEnd,
    to_credentials: Option<&str>,
    referrers: bool,
    local: impl AsyncFnOnce() -> Result<Registry, String>,
) -> Result<String, String> {
    let needs_local = matches!(from, SyncEnd::Local(_)) || matches!(to, SyncEnd::Local(_));
    let local = if needs_local {
        Some(local().await?)
    } else {
        None
    };
    let (from_remote, from_repo) = match from {
        SyncEnd::Remote { url, repo } => (Some(client(url, from_credentials)?), repo),
        SyncEnd::Local(repo) => (None, repo),
    };
    let (to_remote, to_repo) = match to {
        SyncEnd::Remote { url, repo } => (Some(client(url, to_credentials)?), repo),
        SyncEnd::Local(repo) => (None, repo),
    };
    let source: &dyn registry_core::ImageSource = match (&from_remote, &local) {
        (Some(r), _) => r,
        (None, Some(l)) => l,
        (None, None) => unreachable!("a local end opens the local registry"),
    };
    let sink: &dyn registry_core::ImageSink = match (&to_remote, &local) {
        (Some(r), _) => r,
        (None, Some(l)) => l,
        (None, None) => unreachable!("a local end opens the local registry"),
    };
    let options = PromoteOptions::default().with_referrers(referrers);
    let report = registry_core::sync(source, from_repo, sink, to_repo, &options)
        .await
        .map_err(|e| format!("sync failed: {e}"))?;
    for (tag, digest) in &report.tags {
        println!("synced {to_repo}:{tag} ({digest})");
    }
    let t = &report.totals;
    Ok(format!(
        "sync: {} tags, {} manifests copied, {} skipped, {} blobs streamed ({} bytes), {} mounted, {} skipped",
        report.tags.len(),
        t.manifests_copied,
        t.manifests_skipped,
        t.blobs_streamed,
        t.bytes_streamed,
        t.blobs_mounted,
        t.blobs_skipped
    ))
}
