//! Model-based testing: random sequences of uploads, manifest pushes, tag moves, mounts,
//! deletes and collections run against a real store and against a trivial model (sets
//! and maps), compared after every step, reference counts included.
//!
//! Pushes are also refused, and the model predicts each refusal: a blob missing from
//! the repository, an immutable tag pointing elsewhere (`m/b:v*`), a quota (`m/c`), a
//! manifest over the size limit of a second registry on the same storage, a read-only
//! registry on the same storage. Refused pushes are of bytes other operations push
//! successfully, and [`Op::RacePushes`] runs two pushes of the same bytes at once,
//! interleaved at every storage call by a seeded schedule (issue 16: a refusal that
//! stored the bytes must not delete them from under the push acknowledged next to it).
//! After every step, every manifest the model holds must be readable, by digest and by
//! each of its tags, with every blob it references.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::interleave;
use super::*;
use crate::manifest::media_type::OCI_MANIFEST;
use crate::policy::TagPattern;

const REPOS: [&str; 3] = ["m/a", "m/b", "m/c/d"];
const TAGS: [&str; 3] = ["latest", "v1", "v2"];
const BLOBS: usize = 6;
/// Tags `v*` of `m/b` are immutable.
const IMMUTABLE: &str = "m/b:v*";
/// The quota on `m/c` (which holds `m/c/d`). Blobs are 13 bytes, manifests 288 (no
/// layer), 435 (one) or 583 (two): one manifest always fits, two may not.
const QUOTA_PREFIX: &str = "m/c";
const QUOTA_BYTES: u64 = 700;
/// The manifest size limit of the second registry ([`Via::SmallLimit`]): manifests with
/// two layers are over it.
const SMALL_LIMIT: u64 = 500;

/// While two pushes race, one storage call in this many sleeps a few times the store's
/// mean call duration (byte deletions 8 times as often, and longer; see
/// [`interleave`]): without that, on stores whose calls take real time (an fsync, a
/// spawned commit, a request), a few yields never let one push's whole commit fit
/// between two calls of the other.
const RACE_SLEEP_ONE_IN: u64 = 8;

fn blob_bytes(i: usize) -> Vec<u8> {
    format!("model blob #{i}").into_bytes()
}

fn immutable(repo: &str, tag: &str) -> bool {
    repo == "m/b" && tag.starts_with('v')
}

fn under_quota(repo: &str) -> bool {
    repo == QUOTA_PREFIX || repo.starts_with(&format!("{QUOTA_PREFIX}/"))
}

/// Which registry a push goes through; all share the one storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The main registry.
    Main,
    /// A registry with the same policies and a smaller manifest size limit.
    SmallLimit,
    /// A read-only registry.
    ReadOnly,
}

/// One manifest push of [`Op::RacePushes`].
#[derive(Debug, Clone)]
pub struct Push {
    /// Repository index.
    pub repo: usize,
    /// Tag index.
    pub tag: usize,
    /// Through which registry.
    pub via: Via,
}

/// One step of a sequence.
#[derive(Debug, Clone)]
pub enum Op {
    /// Upload blob `blob` into `repo` (monolithic, or in two chunks).
    Upload {
        /// Repository index.
        repo: usize,
        /// Blob index.
        blob: usize,
        /// Upload in two chunks.
        chunked: bool,
    },
    /// Push an image manifest with config `config` and `layers` under `tag`.
    PushImage {
        /// Repository index.
        repo: usize,
        /// Tag index.
        tag: usize,
        /// Config blob index.
        config: usize,
        /// Layer blob indexes.
        layers: Vec<usize>,
        /// Through which registry.
        via: Via,
    },
    /// Two pushes of the same image manifest (the same bytes) at once, their storage
    /// calls interleaved by a schedule drawn from `seed`.
    RacePushes {
        /// Config blob index.
        config: usize,
        /// Layer blob indexes.
        layers: Vec<usize>,
        /// The two pushes.
        pushes: [Push; 2],
        /// Seeds the interleaving.
        seed: u64,
    },
    /// Point `tag` at the `nth` manifest of `repo` (if any).
    MoveTag {
        /// Repository index.
        repo: usize,
        /// Tag index.
        tag: usize,
        /// Which manifest.
        nth: usize,
    },
    /// Delete a tag.
    DeleteTag {
        /// Repository index.
        repo: usize,
        /// Tag index.
        tag: usize,
    },
    /// Delete the `nth` manifest of `repo` by digest (or a random unknown digest).
    DeleteManifest {
        /// Repository index.
        repo: usize,
        /// Which manifest.
        nth: usize,
    },
    /// Delete a blob link.
    DeleteBlob {
        /// Repository index.
        repo: usize,
        /// Blob index.
        blob: usize,
    },
    /// Mount a blob from one repository into another.
    Mount {
        /// Source repository index.
        from: usize,
        /// Target repository index.
        to: usize,
        /// Blob index.
        blob: usize,
    },
    /// Collect with a zero window.
    Collect,
}

fn via() -> impl Strategy<Value = Via> {
    prop_oneof![
        4 => Just(Via::Main),
        1 => Just(Via::SmallLimit),
        1 => Just(Via::ReadOnly),
    ]
}

/// Random operation sequences.
pub fn ops() -> impl Strategy<Value = Vec<Op>> {
    let r = 0..REPOS.len();
    let t = 0..TAGS.len();
    let b = 0..BLOBS;
    let push = || {
        (0..REPOS.len(), 0..TAGS.len(), via()).prop_map(|(repo, tag, via)| Push { repo, tag, via })
    };
    let op = prop_oneof![
        4 => (r.clone(), b.clone(), any::<bool>()).prop_map(|(repo, blob, chunked)| Op::Upload { repo, blob, chunked }),
        3 => (r.clone(), t.clone(), b.clone(), proptest::collection::vec(b.clone(), 0..3), via())
            .prop_map(|(repo, tag, config, layers, via)| Op::PushImage { repo, tag, config, layers, via }),
        2 => (b.clone(), proptest::collection::vec(b.clone(), 0..3), push(), push(), any::<u64>())
            .prop_map(|(config, layers, a, b, seed)| Op::RacePushes { config, layers, pushes: [a, b], seed }),
        1 => (r.clone(), t.clone(), 0..4usize).prop_map(|(repo, tag, nth)| Op::MoveTag { repo, tag, nth }),
        1 => (r.clone(), t.clone()).prop_map(|(repo, tag)| Op::DeleteTag { repo, tag }),
        1 => (r.clone(), 0..4usize).prop_map(|(repo, nth)| Op::DeleteManifest { repo, nth }),
        1 => (r.clone(), b.clone()).prop_map(|(repo, blob)| Op::DeleteBlob { repo, blob }),
        2 => (r.clone(), r.clone(), b.clone()).prop_map(|(from, to, blob)| Op::Mount { from, to, blob }),
        1 => Just(Op::Collect),
    ];
    proptest::collection::vec(op, 1..40)
}

/// Why the model expects a push to be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    ReadOnly,
    TooLarge,
    BlobUnknown,
    Quota,
    Immutable,
}

fn refusal_of(e: &Error) -> Option<Refusal> {
    Some(match e {
        Error::ReadOnly { .. } => Refusal::ReadOnly,
        Error::TooLarge { .. } => Refusal::TooLarge,
        Error::ManifestBlobUnknown { .. } => Refusal::BlobUnknown,
        Error::QuotaExceeded { .. } => Refusal::Quota,
        Error::ImmutableTag { .. } => Refusal::Immutable,
        _ => return None,
    })
}

#[derive(Debug, Default)]
struct Model {
    /// (repo, blob digest) links.
    links: BTreeSet<(String, Digest)>,
    /// (repo, manifest digest) → blobs it references.
    manifests: BTreeMap<(String, Digest), BTreeSet<Digest>>,
    /// (repo, tag) → manifest digest.
    tags: BTreeMap<(String, String), Digest>,
    /// Size of every digest seen (blobs and manifests).
    sizes: BTreeMap<Digest, u64>,
}

impl Model {
    fn manifest_refs(&self, repo: &str, d: &Digest) -> u64 {
        self.manifests
            .iter()
            .filter(|((r, _), blobs)| r == repo && blobs.contains(d))
            .count() as u64
    }

    fn manifests_of(&self, repo: &str) -> Vec<Digest> {
        self.manifests
            .keys()
            .filter(|(r, _)| r == repo)
            .map(|(_, d)| d.clone())
            .collect()
    }

    /// The distinct digests linked (blob or manifest links) under the quota prefix.
    fn quota_digests(&self) -> BTreeSet<&Digest> {
        self.links
            .iter()
            .chain(self.manifests.keys())
            .filter(|(r, _)| under_quota(r))
            .map(|(_, d)| d)
            .collect()
    }

    fn quota_usage(&self) -> u64 {
        self.quota_digests().iter().map(|d| self.sizes[*d]).sum()
    }

    /// Whether a new link of `d` (of `size` bytes) into `repo` passes the quota.
    fn quota_refuses(&self, repo: &str, d: &Digest, size: u64) -> bool {
        under_quota(repo)
            && !self.quota_digests().contains(d)
            && self.quota_usage() + size > QUOTA_BYTES
    }

    /// A tag of `repo` that may not move to `d`.
    fn tag_refuses(&self, repo: &str, tag: &str, d: &Digest) -> bool {
        immutable(repo, tag)
            && self
                .tags
                .get(&(repo.into(), tag.into()))
                .is_some_and(|cur| cur != d)
    }

    /// What a push of manifest `md` (of `size` bytes, referencing `refs`) into
    /// `repo:tag` through `via` does, in the order the registry checks.
    fn predict_push(
        &self,
        repo: &str,
        tag: &str,
        via: Via,
        md: &Digest,
        size: u64,
        refs: &BTreeSet<Digest>,
    ) -> Result<(), Refusal> {
        if via == Via::ReadOnly {
            return Err(Refusal::ReadOnly);
        }
        if via == Via::SmallLimit && size > SMALL_LIMIT {
            return Err(Refusal::TooLarge);
        }
        if !self.manifests.contains_key(&(repo.into(), md.clone())) {
            if !refs
                .iter()
                .all(|d| self.links.contains(&(repo.into(), d.clone())))
            {
                return Err(Refusal::BlobUnknown);
            }
            if self.quota_refuses(repo, md, size) {
                return Err(Refusal::Quota);
            }
        }
        if self.tag_refuses(repo, tag, md) {
            return Err(Refusal::Immutable);
        }
        Ok(())
    }

    fn apply_push(&mut self, repo: &str, tag: &str, md: &Digest, refs: &BTreeSet<Digest>) {
        self.manifests
            .entry((repo.into(), md.clone()))
            .or_insert_with(|| refs.clone());
        self.tags.insert((repo.into(), tag.into()), md.clone());
    }
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(msg()))
    }
}

/// The registries of a sequence, all on one (interleaving) storage.
struct Registries {
    main: Registry,
    small: Registry,
    read_only: Registry,
    schedule: interleave::Schedule,
}

impl Registries {
    fn via(&self, via: Via) -> &Registry {
        match via {
            Via::Main => &self.main,
            Via::SmallLimit => &self.small,
            Via::ReadOnly => &self.read_only,
        }
    }
}

/// An image manifest of blobs `config` and `layers`: its bytes, digest and references.
fn image(config: usize, layers: &[usize]) -> (String, Digest, BTreeSet<Digest>) {
    let cfg = blob_bytes(config);
    let layer_bytes: Vec<Vec<u8>> = layers.iter().map(|l| blob_bytes(*l)).collect();
    let layer_refs: Vec<&[u8]> = layer_bytes.iter().map(|l| l.as_slice()).collect();
    let m = image_manifest(&cfg, &layer_refs);
    let md = Digest::sha256(m.as_bytes());
    let mut refs: BTreeSet<Digest> = layer_bytes.iter().map(|l| Digest::sha256(l)).collect();
    refs.insert(Digest::sha256(&cfg));
    (m, md, refs)
}

async fn put(
    r: &Registry,
    repo: &str,
    tag: &str,
    manifest: &str,
) -> Result<crate::registry::PutManifestResult, Error> {
    r.put_manifest(
        &super::repo(repo),
        &tag_ref(tag),
        OCI_MANIFEST,
        Bytes::from(manifest.to_owned()),
        PutManifestOptions::default(),
    )
    .await
}

/// Checks a push's outcome against the model's prediction.
fn check_push(
    ctx: &str,
    result: &Result<crate::registry::PutManifestResult, Error>,
    expected: Result<(), Refusal>,
    md: &Digest,
) -> Result<(), TestCaseError> {
    match (result, expected) {
        (Ok(res), Ok(())) => check(res.digest == *md, || {
            format!("{ctx}: pushed as {}, expected {md}", res.digest)
        }),
        (Err(e), Err(why)) if refusal_of(e) == Some(why) => Ok(()),
        (Ok(_), Err(why)) => Err(TestCaseError::fail(format!(
            "{ctx}: accepted, model expected a refusal ({why:?})"
        ))),
        (Err(e), exp) => Err(TestCaseError::fail(format!(
            "{ctx}: refused with {e}, model expected {exp:?}"
        ))),
    }
}

/// Runs one sequence against a fresh store and the model.
pub async fn run_sequence(f: Fixture, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let schedule = interleave::Schedule::default();
    let storage = schedule.wrap(f.storage.clone());
    let clock = ManualClock::new(Timestamp(1_700_000_000_000));
    // The quota on `m` never refuses: the audit after every step then also checks that
    // the quota counters (nested prefixes, one repository outside `m/c`) follow every
    // link change. The one on `m/c` refuses.
    let builder = || {
        Registry::builder(storage.clone())
            .with_clock(Arc::new(clock.clone()))
            .with_protection_window(Duration::ZERO)
            .with_quota(super::repo("m"), u64::MAX)
            .with_quota(super::repo(QUOTA_PREFIX), QUOTA_BYTES)
            .with_immutable_tags(TagPattern::parse(IMMUTABLE).expect("pattern"))
    };
    let regs = Registries {
        main: builder().build(),
        small: builder().with_max_manifest_size(SMALL_LIMIT).build(),
        read_only: builder().read_only(true).build(),
        schedule,
    };
    let r = &regs.main;
    let mut model = Model::default();
    for i in 0..BLOBS {
        model
            .sizes
            .insert(Digest::sha256(&blob_bytes(i)), blob_bytes(i).len() as u64);
    }
    for (step, op) in ops.into_iter().enumerate() {
        clock.advance(Duration::from_millis(1));
        let ctx = || format!("step {step}: {op:?}");
        match &op {
            Op::Upload {
                repo,
                blob,
                chunked,
            } => {
                let name = REPOS[*repo];
                let data = blob_bytes(*blob);
                let d = Digest::sha256(&data);
                let rn = super::repo(name);
                let expect_ok = model.links.contains(&(name.into(), d.clone()))
                    || !model.quota_refuses(name, &d, data.len() as u64);
                let result = if *chunked {
                    let s = r.start_upload(&rn, crate::Algorithm::Sha256).await.unwrap();
                    let (a, b) = data.split_at(data.len() / 2);
                    r.append_upload(&rn, &s.id, Some(0), None, body(&[a]))
                        .await
                        .unwrap();
                    r.finish_upload(&rn, &s.id, &d, Some((body(&[b]), None)))
                        .await
                } else {
                    r.put_blob(&rn, &d, Some(data.len() as u64), body(&[&data]))
                        .await
                };
                match (result, expect_ok) {
                    (Ok(_), true) => {
                        model.links.insert((name.into(), d));
                    }
                    (Err(Error::QuotaExceeded { .. }), false) => {}
                    (res, exp) => {
                        return Err(TestCaseError::fail(format!(
                            "{}: got {:?}, model expected success={exp}",
                            ctx(),
                            res.map(|_| ())
                        )));
                    }
                }
            }
            Op::PushImage {
                repo,
                tag: t,
                config,
                layers,
                via,
            } => {
                let (name, tag_name) = (REPOS[*repo], TAGS[*t]);
                let (m, md, refs) = image(*config, layers);
                model.sizes.insert(md.clone(), m.len() as u64);
                let expected = model.predict_push(name, tag_name, *via, &md, m.len() as u64, &refs);
                let result = put(regs.via(*via), name, tag_name, &m).await;
                check_push(&ctx(), &result, expected, &md)?;
                if result.is_ok() {
                    model.apply_push(name, tag_name, &md, &refs);
                }
            }
            Op::RacePushes {
                config,
                layers,
                pushes,
                seed,
            } => {
                let (m, md, refs) = image(*config, layers);
                model.sizes.insert(md.clone(), m.len() as u64);
                // Both predicted from the state before: two pushes of the same bytes do
                // not change each other's outcome (a refusal changes nothing, and an
                // accepted one cannot make the other's blobs, quota or tag refuse).
                let expected: Vec<_> = pushes
                    .iter()
                    .map(|p| {
                        model.predict_push(
                            REPOS[p.repo],
                            TAGS[p.tag],
                            p.via,
                            &md,
                            m.len() as u64,
                            &refs,
                        )
                    })
                    .collect();
                let [a, b] = pushes;
                regs.schedule.set(*seed, RACE_SLEEP_ONE_IN);
                let (ra, rb) = futures::join!(
                    put(regs.via(a.via), REPOS[a.repo], TAGS[a.tag], &m),
                    put(regs.via(b.via), REPOS[b.repo], TAGS[b.tag], &m),
                );
                regs.schedule.set(0, 0);
                for (i, (p, result)) in [(a, ra), (b, rb)].into_iter().enumerate() {
                    check_push(&format!("{} (push {i})", ctx()), &result, expected[i], &md)?;
                    if result.is_ok() {
                        model.apply_push(REPOS[p.repo], TAGS[p.tag], &md, &refs);
                    }
                }
            }
            Op::MoveTag { repo, tag: t, nth } => {
                let name = REPOS[*repo];
                let ms = model.manifests_of(name);
                if let Some(d) = ms.get(nth % ms.len().max(1)) {
                    let result = r.tag_manifest(&super::repo(name), &tag(TAGS[*t]), d).await;
                    match (result, model.tag_refuses(name, TAGS[*t], d)) {
                        (Ok(()), false) => {
                            model.tags.insert((name.into(), TAGS[*t].into()), d.clone());
                        }
                        (Err(Error::ImmutableTag { .. }), true) => {}
                        (res, refuses) => {
                            return Err(TestCaseError::fail(format!(
                                "{}: got {res:?}, model immutable={refuses}",
                                ctx()
                            )));
                        }
                    }
                }
            }
            Op::DeleteTag { repo, tag: t } => {
                let name = REPOS[*repo];
                let result = r
                    .delete_manifest(&super::repo(name), &tag_ref(TAGS[*t]))
                    .await;
                let key = (name.to_owned(), TAGS[*t].to_owned());
                let exists = model.tags.contains_key(&key);
                match (result, exists, immutable(name, TAGS[*t])) {
                    (Ok(()), true, false) => {
                        model.tags.remove(&key);
                    }
                    (Err(Error::ManifestUnknown { .. }), false, _)
                    | (Err(Error::ImmutableTag { .. }), true, true) => {}
                    (res, exists, imm) => {
                        return Err(TestCaseError::fail(format!(
                            "{}: got {res:?}, model exists={exists} immutable={imm}",
                            ctx()
                        )));
                    }
                }
            }
            Op::DeleteManifest { repo, nth } => {
                let name = REPOS[*repo];
                let ms = model.manifests_of(name);
                let d = ms
                    .get(nth % ms.len().max(1))
                    .cloned()
                    .unwrap_or_else(|| Digest::sha256(b"unknown"));
                let result = r
                    .delete_manifest(&super::repo(name), &Reference::Digest(d.clone()))
                    .await;
                let existed = model.manifests.contains_key(&(name.into(), d.clone()));
                let pinned = model
                    .tags
                    .iter()
                    .any(|((r, t), m)| r == name && *m == d && immutable(r, t));
                match (result, existed, pinned) {
                    (Ok(()), true, false) => {
                        model.manifests.remove(&(name.into(), d.clone()));
                        model.tags.retain(|(r, _), m| !(r == name && *m == d));
                    }
                    (Err(Error::ManifestUnknown { .. }), false, _)
                    | (Err(Error::ImmutableTag { .. }), true, true) => {}
                    (res, exp, pinned) => {
                        return Err(TestCaseError::fail(format!(
                            "{}: got {res:?}, model existed={exp} immutable tag={pinned}",
                            ctx()
                        )));
                    }
                }
            }
            Op::DeleteBlob { repo, blob } => {
                let name = REPOS[*repo];
                let d = Digest::sha256(&blob_bytes(*blob));
                let linked = model.links.contains(&(name.into(), d.clone()));
                let in_use = model.manifest_refs(name, &d) > 0;
                let result = r.delete_blob(&super::repo(name), &d).await;
                match (result, linked, in_use) {
                    (Ok(()), true, false) => {
                        model.links.remove(&(name.into(), d));
                    }
                    (Err(Error::InUse { .. }), true, true)
                    | (Err(Error::BlobUnknown { .. }), false, _) => {}
                    (res, l, u) => {
                        return Err(TestCaseError::fail(format!(
                            "{}: got {res:?}, model linked={l} in_use={u}",
                            ctx()
                        )));
                    }
                }
            }
            Op::Mount { from, to, blob } => {
                let d = Digest::sha256(&blob_bytes(*blob));
                let (f_name, t_name) = (REPOS[*from], REPOS[*to]);
                let result = r
                    .mount_blob(
                        &super::repo(t_name),
                        &d,
                        Some(&super::repo(f_name)),
                        &crate::AllowAll,
                    )
                    .await;
                let source = model.links.contains(&(f_name.into(), d.clone()));
                let target = model.links.contains(&(t_name.into(), d.clone()));
                let over = !target && model.quota_refuses(t_name, &d, model.sizes[&d]);
                match (result, source, over) {
                    (Ok(true), true, false) => {
                        model.links.insert((t_name.into(), d));
                    }
                    (Ok(false), false, _) | (Err(Error::QuotaExceeded { .. }), true, true) => {}
                    (res, source, over) => {
                        return Err(TestCaseError::fail(format!(
                            "{}: got {res:?}, model source linked={source} over quota={over}",
                            ctx()
                        )));
                    }
                }
            }
            Op::Collect => {
                r.collect_garbage(&GcOptions::default()).await.unwrap();
                let unreferenced: Vec<_> = model
                    .links
                    .iter()
                    .filter(|(repo, d)| model.manifest_refs(repo, d) == 0)
                    .cloned()
                    .collect();
                for l in unreferenced {
                    model.links.remove(&l);
                }
            }
        }
        compare(r, &model, step).await?;
    }
    Ok(())
}

/// Compares the store with the model, reference counts included, and checks that
/// every manifest the model holds is readable with all its bytes.
async fn compare(r: &Registry, model: &Model, step: usize) -> Result<(), TestCaseError> {
    let meta = r.storage().metadata;
    let stats = meta.stats().await.unwrap();
    check(stats.blob_links == model.links.len() as u64, || {
        format!(
            "step {step}: {} blob links, model {}",
            stats.blob_links,
            model.links.len()
        )
    })?;
    check(stats.manifests == model.manifests.len() as u64, || {
        format!("step {step}: manifests {stats:?}")
    })?;
    check(stats.tags == model.tags.len() as u64, || {
        format!("step {step}: tags {stats:?}")
    })?;
    let repos: BTreeSet<&str> = model
        .links
        .iter()
        .map(|(r, _)| r.as_str())
        .chain(model.manifests.keys().map(|(r, _)| r.as_str()))
        .collect();
    check(stats.repositories == repos.len() as u64, || {
        format!("step {step}: repositories {stats:?}")
    })?;
    for (repo_name, d) in &model.links {
        let rn = super::repo(repo_name);
        let link = meta.blob_link(&rn, d).await.unwrap();
        let expected = model.manifest_refs(repo_name, d);
        check(
            link.as_ref().map(|l| l.manifest_refs) == Some(expected),
            || format!("step {step}: link {repo_name} {d}: {link:?}, model refs {expected}"),
        )?;
        let data = read_blob(r, &rn, d).await;
        check(data.as_ref().is_ok_and(|b| d.verify(b)), || {
            format!("step {step}: blob {repo_name} {d} unreadable: {data:?}")
        })?;
    }
    // Registry-wide: every blob record counts its blob links and manifest links.
    let mut expected_links: BTreeMap<&Digest, u64> = BTreeMap::new();
    for (_, d) in &model.links {
        *expected_links.entry(d).or_default() += 1;
    }
    for (_, d) in model.manifests.keys() {
        *expected_links.entry(d).or_default() += 1;
    }
    for (d, n) in &expected_links {
        let rec = meta.blob(d).await.unwrap();
        check(rec.as_ref().map(|r| r.links) == Some(*n), || {
            format!("step {step}: blob {d}: {rec:?}, model {n}")
        })?;
    }
    for ((repo_name, d), blobs) in &model.manifests {
        let rn = super::repo(repo_name);
        let rec = meta.manifest(&rn, d).await.unwrap();
        let tags: Vec<&str> = model
            .tags
            .iter()
            .filter(|((r, _), m)| r == repo_name && *m == d)
            .map(|((_, t), _)| t.as_str())
            .collect();
        check(
            rec.as_ref().map(|r| r.tags) == Some(tags.len() as u64),
            || {
                format!(
                    "step {step}: manifest {d}: {rec:?}, model tags {}",
                    tags.len()
                )
            },
        )?;
        // Acknowledged, not deleted: readable (the registry re-hashes the bytes it
        // serves) by digest and by every tag, with every blob it references.
        let m = r.get_manifest(&rn, &Reference::Digest(d.clone())).await;
        check(m.is_ok(), || {
            format!(
                "step {step}: manifest {repo_name} {d} unreadable: {:?}",
                m.err()
            )
        })?;
        for t in tags {
            let m = r.get_manifest(&rn, &tag_ref(t)).await;
            check(m.as_ref().is_ok_and(|m| m.meta.digest == *d), || {
                format!(
                    "step {step}: manifest {repo_name}:{t} ({d}) unreadable: {:?}",
                    m.map(|m| m.meta)
                )
            })?;
        }
        for b in blobs {
            let data = read_blob(r, &rn, b).await;
            check(data.as_ref().is_ok_and(|bytes| b.verify(bytes)), || {
                format!("step {step}: blob {b} of manifest {repo_name} {d} unreadable")
            })?;
        }
    }
    let audit = meta.audit(false).await.unwrap();
    check(audit.problems.is_empty(), || {
        format!("step {step}: audit found {:?}", audit.problems)
    })?;
    for ((repo_name, t), d) in &model.tags {
        let got = meta.tag(&super::repo(repo_name), &tag(t)).await.unwrap();
        check(got.as_ref() == Some(d), || {
            format!("step {step}: tag {repo_name}:{t} → {got:?}, model {d}")
        })?;
    }
    let usage = meta
        .quota_usage(&super::repo(QUOTA_PREFIX))
        .await
        .unwrap()
        .unwrap_or(0);
    check(usage == model.quota_usage(), || {
        format!(
            "step {step}: quota usage of {QUOTA_PREFIX} {usage}, model {}",
            model.quota_usage()
        )
    })?;
    Ok(())
}

/// Runs `cases` random sequences, each on a fresh fixture from `make`, then deletes
/// everything and checks that the store ends empty.
pub fn run<F, Fut>(cases: u32, make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Fixture>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    let result = runner.run(&ops(), |ops| {
        rt.block_on(async {
            // The guard (a temporary directory, say) must outlive the final cleanup.
            let Fixture { storage, guard } = make().await;
            run_sequence(Fixture::new(storage.clone(), ()), ops).await?;
            assert_cleans_up(&Registry::builder(storage).build()).await;
            drop(guard);
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("model test failed: {e}");
    }
}
