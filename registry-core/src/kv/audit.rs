//! The mark-and-sweep audit behind [`MetadataStore::audit`]: the links are the truth, and
//! every count, reverse index, candidate entry and quota usage derived from them is
//! recomputed, compared and (on request) repaired, in one transaction.
//!
//! [`MetadataStore::audit`]: crate::store::MetadataStore::audit

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;

use super::quota::{QuotaRef, quota_compute, quota_track};
use super::{KvRead, KvWrite, PendingRefs, Table, decode, key, last_part, parts, prefix, put};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::store::{AuditReport, BlobLink, BlobRecord, BlobState, ManifestRecord, RepoRecord};
use crate::time::Timestamp;

/// The mark-and-sweep audit, in one transaction: the links (blob links, manifest links
/// with their references, tags) are the truth; every count, reverse index and candidate
/// entry is recomputed from them and compared.
pub(super) fn audit_txn(t: &mut dyn KvWrite, repair: bool) -> Result<AuditReport> {
    fn load<T: DeserializeOwned>(t: &dyn KvRead, table: Table) -> Result<BTreeMap<Vec<u8>, T>> {
        t.scan(table, b"", None, usize::MAX)?
            .into_iter()
            .map(|(k, v)| Ok((k, decode(&v)?)))
            .collect()
    }
    fn keys(t: &dyn KvRead, table: Table) -> Result<BTreeSet<Vec<u8>>> {
        Ok(t.scan(table, b"", None, usize::MAX)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }
    fn show(k: &[u8]) -> String {
        String::from_utf8_lossy(k).replace('\0', " ")
    }
    /// Makes the keys of `table` exactly `expected` (values empty).
    fn sync_index(
        t: &mut dyn KvWrite,
        table: Table,
        expected: &BTreeSet<Vec<u8>>,
        repair: bool,
        report: &mut AuditReport,
    ) -> Result<()> {
        let actual = keys(t, table)?;
        for k in expected.difference(&actual) {
            report
                .problems
                .push(format!("{} lacks {}", table.name(), show(k)));
            if repair {
                t.put(table, k, b"")?;
                report.repaired += 1;
            }
        }
        for k in actual.difference(expected) {
            report
                .problems
                .push(format!("{} has stale {}", table.name(), show(k)));
            if repair {
                t.delete(table, k)?;
                report.repaired += 1;
            }
        }
        Ok(())
    }

    let mut report = AuditReport::default();
    let links: BTreeMap<Vec<u8>, BlobLink> = load(t, Table::BlobLinks)?;
    let manifests: BTreeMap<Vec<u8>, ManifestRecord> = load(t, Table::Manifests)?;
    let mut tags: BTreeMap<Vec<u8>, Digest> = load(t, Table::Tags)?;
    let blobs: BTreeMap<Vec<u8>, BlobRecord> = load(t, Table::Blobs)?;
    report.blobs = blobs.len() as u64;
    report.manifests = manifests.len() as u64;

    // Tags pointing at a missing manifest are dropped: nothing can be served for them.
    for (k, d) in tags.clone() {
        let p = parts(&k)?;
        if !manifests.contains_key(&key(&[p[0], d.as_str()])) {
            report
                .problems
                .push(format!("tag {} points at missing manifest {d}", show(&k)));
            if repair {
                t.delete(Table::Tags, &k)?;
                report.repaired += 1;
            }
            tags.remove(&k);
        }
    }

    let mut manifest_refs: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let mut parents: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let mut tag_counts: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let mut blob_links: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut repos: BTreeMap<String, RepoRecord> = BTreeMap::new();
    let mut referrers = BTreeSet::new();
    let mut manifest_tags = BTreeSet::new();
    let mut pending: BTreeMap<Vec<u8>, PendingRefs> = BTreeMap::new();
    for (k, rec) in &manifests {
        let repo = parts(k)?[0].to_owned();
        for b in &rec.blobs {
            let lk = key(&[&repo, b.as_str()]);
            if !links.contains_key(&lk) && rec.sparse {
                pending.entry(lk.clone()).or_default().blobs += 1;
            } else if !links.contains_key(&lk) {
                report.problems.push(format!(
                    "manifest {} in {repo} references blob {b}, which the repository does not link (invariant 2)",
                    rec.digest
                ));
            }
            *manifest_refs.entry(lk).or_default() += 1;
        }
        for c in &rec.children {
            let ck = key(&[&repo, c.as_str()]);
            if !manifests.contains_key(&ck) && rec.sparse {
                pending.entry(ck.clone()).or_default().children += 1;
            } else if !manifests.contains_key(&ck) {
                report.problems.push(format!(
                    "index {} in {repo} lists missing child {c} (invariant 2)",
                    rec.digest
                ));
            }
            *parents.entry(ck).or_default() += 1;
        }
        if let Some(s) = &rec.subject {
            referrers.insert(key(&[&repo, s.as_str(), rec.digest.as_str()]));
        }
        blob_links.entry(rec.digest.to_string()).or_default().1 = rec.size;
        blob_links.entry(rec.digest.to_string()).or_default().0 += 1;
        repos.entry(repo).or_default().manifests += 1;
    }
    for (k, d) in &tags {
        let p = parts(k)?;
        *tag_counts.entry(key(&[p[0], d.as_str()])).or_default() += 1;
        manifest_tags.insert(key(&[p[0], d.as_str(), p[1]]));
    }
    let mut blob_repos = BTreeSet::new();
    let mut link_candidates = BTreeSet::new();
    for (k, link) in &links {
        let p = parts(k)?;
        let (repo, d) = (p[0], p[1]);
        let entry = blob_links.entry(d.to_owned()).or_default();
        entry.0 += 1;
        entry.1 = link.size;
        blob_repos.insert(key(&[d, repo]));
        repos.entry(repo.to_owned()).or_default().blobs += 1;
        let expected = manifest_refs.get(k).copied().unwrap_or(0);
        if expected == 0 {
            link_candidates.insert(k.clone());
        }
        if link.manifest_refs != expected {
            report.problems.push(format!(
                "blob link {} counts {} manifest references, links say {expected}",
                show(k),
                link.manifest_refs
            ));
            if repair {
                let fixed = BlobLink {
                    manifest_refs: expected,
                    ..link.clone()
                };
                put(t, Table::BlobLinks, k, &fixed)?;
                report.repaired += 1;
            }
        }
    }
    for (k, rec) in &manifests {
        let tags_expected = tag_counts.get(k).copied().unwrap_or(0);
        let parents_expected = parents.get(k).copied().unwrap_or(0);
        if rec.tags != tags_expected || rec.parents != parents_expected {
            report.problems.push(format!(
                "manifest {} counts {} tags and {} parents, links say {tags_expected} and {parents_expected}",
                show(k),
                rec.tags,
                rec.parents
            ));
            if repair {
                let fixed = ManifestRecord {
                    tags: tags_expected,
                    parents: parents_expected,
                    ..rec.clone()
                };
                put(t, Table::Manifests, k, &fixed)?;
                report.repaired += 1;
            }
        }
    }
    let mut blob_candidates = BTreeSet::new();
    for (d, (expected, size)) in &blob_links {
        let k = key(&[d]);
        match blobs.get(&k) {
            None => {
                report
                    .problems
                    .push(format!("blob {d} is linked but has no record"));
                if repair {
                    let rec = BlobRecord {
                        size: *size,
                        links: *expected,
                        state: BlobState::Live,
                        created_at: Timestamp(0),
                    };
                    put(t, Table::Blobs, &k, &rec)?;
                    report.repaired += 1;
                }
            }
            Some(rec) if rec.state.is_deleting() => {
                report.problems.push(format!(
                    "blob {d} is linked {expected} times but being deleted"
                ));
            }
            Some(rec) if rec.links != *expected => {
                report.problems.push(format!(
                    "blob {d} counts {} links, links say {expected}",
                    rec.links
                ));
                if repair {
                    let fixed = BlobRecord {
                        links: *expected,
                        ..rec.clone()
                    };
                    put(t, Table::Blobs, &k, &fixed)?;
                    report.repaired += 1;
                }
            }
            Some(_) => {}
        }
    }
    for (k, rec) in &blobs {
        let d = std::str::from_utf8(k).map_err(Error::storage)?;
        let expected = blob_links.get(d).map_or(0, |(n, _)| *n);
        if expected == 0 {
            blob_candidates.insert(k.clone());
            if rec.links != 0 && !rec.state.is_deleting() {
                report
                    .problems
                    .push(format!("blob {d} counts {} links, links say 0", rec.links));
                if repair {
                    let fixed = BlobRecord {
                        links: 0,
                        ..rec.clone()
                    };
                    put(t, Table::Blobs, k, &fixed)?;
                    report.repaired += 1;
                }
            }
        }
    }
    sync_index(t, Table::BlobRepos, &blob_repos, repair, &mut report)?;
    sync_index(t, Table::ManifestTags, &manifest_tags, repair, &mut report)?;
    sync_index(
        t,
        Table::LinkCandidates,
        &link_candidates,
        repair,
        &mut report,
    )?;
    sync_index(
        t,
        Table::BlobCandidates,
        &blob_candidates,
        repair,
        &mut report,
    )?;
    // References of sparse manifests to what their repository still lacks.
    let stored_pending: BTreeMap<Vec<u8>, PendingRefs> = load(t, Table::PendingRefs)?;
    for (k, expected) in &pending {
        if stored_pending.get(k) != Some(expected) {
            report.problems.push(format!(
                "pending references {} are {:?}, sparse manifests say {expected:?}",
                show(k),
                stored_pending.get(k)
            ));
            if repair {
                put(t, Table::PendingRefs, k, expected)?;
                report.repaired += 1;
            }
        }
    }
    for k in stored_pending.keys() {
        if !pending.contains_key(k) {
            report
                .problems
                .push(format!("pending references {} are stale", show(k)));
            if repair {
                t.delete(Table::PendingRefs, k)?;
                report.repaired += 1;
            }
        }
    }
    // Referrer entries can be removed when stale but not rebuilt (their descriptors
    // carry annotations only the manifest bytes have): report missing ones.
    let actual_referrers = keys(t, Table::Referrers)?;
    for k in referrers.difference(&actual_referrers) {
        report
            .problems
            .push(format!("referrers index lacks {}", show(k)));
    }
    for k in actual_referrers.difference(&referrers) {
        report
            .problems
            .push(format!("referrers index has stale {}", show(k)));
        if repair {
            t.delete(Table::Referrers, k)?;
            report.repaired += 1;
        }
    }
    let stored_repos: BTreeMap<Vec<u8>, RepoRecord> = load(t, Table::Repos)?;
    for (repo, expected) in &repos {
        let k = key(&[repo]);
        if stored_repos.get(&k) != Some(expected) {
            report.problems.push(format!(
                "repository {repo} record {:?}, links say {expected:?}",
                stored_repos.get(&k)
            ));
            if repair {
                put(t, Table::Repos, &k, expected)?;
                report.repaired += 1;
            }
        }
    }
    for k in stored_repos.keys() {
        let name = std::str::from_utf8(k).map_err(Error::storage)?;
        if !repos.contains_key(name) {
            report
                .problems
                .push(format!("repository {name} has a record but no links"));
            if repair {
                t.delete(Table::Repos, k)?;
                report.repaired += 1;
            }
        }
    }
    report.repositories = repos.len() as u64;
    audit_quotas(t, repair, &mut report)?;
    Ok(report)
}

/// The quota part of the audit: every tracked prefix's per-digest counts and usage are
/// recomputed from the links; counts of untracked prefixes are stale.
fn audit_quotas(t: &mut dyn KvWrite, repair: bool, report: &mut AuditReport) -> Result<()> {
    let mut tracked = Vec::new();
    for (k, v) in t.scan(Table::QuotaUsage, b"", None, usize::MAX)? {
        let p = std::str::from_utf8(&k).map_err(Error::storage)?.to_owned();
        tracked.push((p, decode::<u64>(&v)?));
    }
    for (k, _) in t.scan(Table::QuotaRefs, b"", None, usize::MAX)? {
        let p = parts(&k)?;
        if !tracked.iter().any(|(q, _)| q == p[0]) {
            report.problems.push(format!(
                "quota count of untracked prefix {}",
                String::from_utf8_lossy(&k).replace('\0', " ")
            ));
            if repair {
                t.delete(Table::QuotaRefs, &k)?;
                report.repaired += 1;
            }
        }
    }
    for (p, used) in tracked {
        let expected = quota_compute(t, &p)?;
        let actual: BTreeMap<String, QuotaRef> = t
            .scan(Table::QuotaRefs, &prefix(&[&p]), None, usize::MAX)?
            .into_iter()
            .map(|(k, v)| Ok((last_part(&k)?.to_owned(), decode(&v)?)))
            .collect::<Result<_>>()?;
        let expected_used: u64 = expected.values().map(|r| r.size).sum();
        if expected != actual || expected_used != used {
            report.problems.push(format!(
                "quota of {p} counts {used} bytes in {} digests, links say {expected_used} in {}",
                actual.len(),
                expected.len()
            ));
            if repair {
                for d in actual.keys() {
                    t.delete(Table::QuotaRefs, &key(&[&p, d]))?;
                }
                if expected.is_empty() {
                    t.delete(Table::QuotaUsage, &key(&[&p]))?;
                } else {
                    quota_track(t, &p)?;
                }
                report.repaired += 1;
            }
        } else if expected.is_empty() {
            report
                .problems
                .push(format!("quota of {p} is tracked with nothing under it"));
            if repair {
                t.delete(Table::QuotaUsage, &key(&[&p]))?;
                report.repaired += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{KvEngine, KvMetadata, encode, get};
    use super::*;
    use crate::memory::MemoryKv;
    use crate::store::MetadataStore;
    use crate::testkit::{push_image, repo};
    use crate::{MemoryBlobStore, Reference, Registry, Storage};

    /// Drift written behind the registry's back is found, repaired, and gone after.
    #[tokio::test]
    async fn audit_finds_and_repairs_drift() {
        let meta = Arc::new(KvMetadata::new(MemoryKv::default()));
        let storage = Storage {
            blobs: Arc::new(MemoryBlobStore::default()),
            metadata: meta.clone(),
        };
        let r = Registry::builder(storage).build();
        let repo = repo("audit/x");
        let (m, _) = push_image(&r, &repo, "v1", b"{}", &[b"layer"]).await;
        assert!(meta.audit(false).await.unwrap().problems.is_empty());

        let layer = Digest::sha256(b"layer");
        meta.engine()
            .write(move |t| {
                let lk = key(&["audit/x", layer.as_str()]);
                let mut link: BlobLink = get(t, Table::BlobLinks, &lk)?.unwrap();
                link.manifest_refs = 7;
                put(t, Table::BlobLinks, &lk, &link)?;
                let bk = key(&[layer.as_str()]);
                let mut rec: BlobRecord = get(t, Table::Blobs, &bk)?.unwrap();
                rec.links = 0;
                put(t, Table::Blobs, &bk, &rec)?;
                t.put(Table::BlobCandidates, &bk, b"")?;
                t.put(
                    Table::Tags,
                    &key(&["audit/x", "ghost"]),
                    &encode(&Digest::sha256(b"none"))?,
                )?;
                Ok(())
            })
            .await
            .unwrap();
        let found = meta.audit(false).await.unwrap();
        assert_eq!(found.problems.len(), 4, "{:?}", found.problems);
        assert_eq!(found.repaired, 0);
        assert_eq!(
            meta.audit(false).await.unwrap().problems.len(),
            4,
            "reporting changes nothing"
        );
        let fixed = meta.audit(true).await.unwrap();
        assert_eq!(fixed.repaired, 4, "{:?}", fixed.problems);
        assert!(meta.audit(false).await.unwrap().problems.is_empty());
        let link = meta
            .blob_link(&repo, &Digest::sha256(b"layer"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(link.manifest_refs, 1);
        assert!(r.get_manifest(&repo, &Reference::Digest(m)).await.is_ok());
    }
}
