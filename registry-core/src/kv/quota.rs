//! Quota accounting: how many bytes the distinct blobs linked under each quota prefix
//! hold, maintained inside the same transaction as the links it counts (see
//! [`Policy::quotas`]).
//!
//! A prefix is *tracked* once a link is created under a quota of the policy in force:
//! [`Table::QuotaUsage`] holds its usage and [`Table::QuotaRefs`] how many links under it
//! hold each digest (a digest counts once, however many links it has there). Tracking
//! follows the data, not the policy, so removals are counted by every registry.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{KvRead, KvWrite, Table, decode, get, key, parts, prefix, put};
use crate::access::under_prefix;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::names::RepoName;
use crate::policy::Policy;
use crate::store::{BlobLink, ManifestRecord};

/// How many links (blob and manifest links) under one quota prefix hold a digest, and
/// its size: a digest counts against the quota once, however many links it has there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(super) struct QuotaRef {
    pub(super) links: u64,
    pub(super) size: u64,
}

/// What the quota of `prefix` counts, recomputed from the links (blob links and manifest
/// links of the repositories under it). Scans the links of those repositories only.
pub(super) fn quota_compute(t: &dyn KvRead, prefix: &str) -> Result<BTreeMap<String, QuotaRef>> {
    let mut out: BTreeMap<String, QuotaRef> = Default::default();
    for table in [Table::BlobLinks, Table::Manifests] {
        // Keys are `repo NUL digest`: every repository under `prefix` starts with its
        // bytes (so do a few siblings like `prefixx`, filtered below).
        for (k, v) in t.scan(table, prefix.as_bytes(), None, usize::MAX)? {
            let p = parts(&k)?;
            let [repo, d] = p[..] else {
                return Err(Error::storage("corrupt link key"));
            };
            if !under_prefix(repo, prefix) {
                continue;
            }
            let size = if table == Table::BlobLinks {
                decode::<BlobLink>(&v)?.size
            } else {
                decode::<ManifestRecord>(&v)?.size
            };
            let e = out.entry(d.to_owned()).or_default();
            e.links += 1;
            e.size = size;
        }
    }
    Ok(out)
}

/// Starts maintaining the usage of `prefix` from the links that exist now.
pub(super) fn quota_track(t: &mut dyn KvWrite, prefix: &str) -> Result<()> {
    let refs = quota_compute(t, prefix)?;
    let used: u64 = refs.values().map(|r| r.size).sum();
    for (d, r) in &refs {
        put(t, Table::QuotaRefs, &key(&[prefix, d]), r)?;
    }
    put(t, Table::QuotaUsage, &key(&[prefix]), &used)
}

/// The prefixes whose usage is maintained and that cover `repo`, with their usage.
pub(super) fn tracked_quotas(t: &dyn KvRead, repo: &RepoName) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for (k, v) in t.scan(Table::QuotaUsage, b"", None, usize::MAX)? {
        let p = std::str::from_utf8(&k).map_err(Error::storage)?;
        if under_prefix(repo.as_str(), p) {
            out.push((p.to_owned(), decode(&v)?));
        }
    }
    Ok(out)
}

/// Counts a link just created (`repo` → `d`) against every quota covering `repo`, and
/// fails the change with [`Error::QuotaExceeded`] if a quota of `policy` is passed.
/// Being part of the link's own atomic change, two concurrent pushes are counted one
/// after the other and cannot together pass the limit. `visible`: the link is already
/// written (so a first scan of a prefix counts it).
pub(super) fn quota_add(
    t: &mut dyn KvWrite,
    repo: &RepoName,
    d: &Digest,
    size: u64,
    policy: &Policy,
    visible: bool,
) -> Result<()> {
    let mut fresh = Vec::new();
    for q in policy.quotas_for(repo) {
        let p = q.prefix.as_str();
        if t.get(Table::QuotaUsage, &key(&[p]))?.is_none() && !fresh.iter().any(|f| f == p) {
            // First link under this quota: count what is there, this link included.
            quota_track(t, p)?;
            fresh.push(p.to_owned());
        }
    }
    for (p, mut used) in tracked_quotas(t, repo)? {
        let rk = key(&[&p, d.as_str()]);
        let mut r: QuotaRef = get(t, Table::QuotaRefs, &rk)?.unwrap_or_default();
        let counted_by_scan = visible && fresh.contains(&p);
        if !counted_by_scan {
            r.links += 1;
            r.size = size;
            put(t, Table::QuotaRefs, &rk, &r)?;
            if r.links == 1 {
                used = used.saturating_add(size);
                put(t, Table::QuotaUsage, &key(&[&p]), &used)?;
            }
        }
        // New bytes for this prefix: only then can the push pass the limit. (A digest
        // already counted here costs nothing, even if a lowered quota is already passed.)
        if r.links == 1 {
            for q in policy.quotas.iter().filter(|q| q.prefix.as_str() == p) {
                if used > q.bytes {
                    return Err(Error::QuotaExceeded {
                        prefix: q.prefix.clone(),
                        limit: q.bytes,
                        used: used - size,
                        digest: d.clone(),
                        size,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Releases a link just removed (`repo` → `d`) from every quota covering `repo`. Quotas
/// are tracked by data, not by the policy in force, so a removal is counted even by a
/// registry configured without that quota.
pub(super) fn quota_release(t: &mut dyn KvWrite, repo: &RepoName, d: &Digest) -> Result<()> {
    for (p, mut used) in tracked_quotas(t, repo)? {
        let rk = key(&[&p, d.as_str()]);
        let Some(mut r) = get::<QuotaRef>(t, Table::QuotaRefs, &rk)? else {
            continue;
        };
        r.links = r.links.saturating_sub(1);
        if r.links == 0 {
            t.delete(Table::QuotaRefs, &rk)?;
            used = used.saturating_sub(r.size);
        } else {
            put(t, Table::QuotaRefs, &rk, &r)?;
        }
        let uk = key(&[&p]);
        if used == 0
            && t.scan(Table::QuotaRefs, &prefix(&[&p]), None, 1)?
                .is_empty()
        {
            // Nothing left under the prefix: stop tracking (an empty store stays empty;
            // the next link under a quota starts counting again from a scan).
            t.delete(Table::QuotaUsage, &uk)?;
        } else {
            put(t, Table::QuotaUsage, &uk, &used)?;
        }
    }
    Ok(())
}
