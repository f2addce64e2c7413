//! Model-based testing: random sequences of uploads, manifest pushes, tag moves, mounts,
//! deletes and collections run against a real store and against a trivial model (sets
//! and maps), compared after every step, reference counts included.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::*;
use crate::manifest::media_type::OCI_MANIFEST;

const REPOS: [&str; 3] = ["m/a", "m/b", "m/c/d"];
const TAGS: [&str; 3] = ["latest", "v1", "v2"];
const BLOBS: usize = 6;

fn blob_bytes(i: usize) -> Vec<u8> {
    format!("model blob #{i}").into_bytes()
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

/// Random operation sequences.
pub fn ops() -> impl Strategy<Value = Vec<Op>> {
    let r = 0..REPOS.len();
    let t = 0..TAGS.len();
    let b = 0..BLOBS;
    let op = prop_oneof![
        4 => (r.clone(), b.clone(), any::<bool>()).prop_map(|(repo, blob, chunked)| Op::Upload { repo, blob, chunked }),
        3 => (r.clone(), t.clone(), b.clone(), proptest::collection::vec(b.clone(), 0..3))
            .prop_map(|(repo, tag, config, layers)| Op::PushImage { repo, tag, config, layers }),
        1 => (r.clone(), t.clone(), 0..4usize).prop_map(|(repo, tag, nth)| Op::MoveTag { repo, tag, nth }),
        1 => (r.clone(), t.clone()).prop_map(|(repo, tag)| Op::DeleteTag { repo, tag }),
        1 => (r.clone(), 0..4usize).prop_map(|(repo, nth)| Op::DeleteManifest { repo, nth }),
        1 => (r.clone(), b.clone()).prop_map(|(repo, blob)| Op::DeleteBlob { repo, blob }),
        2 => (r.clone(), r.clone(), b.clone()).prop_map(|(from, to, blob)| Op::Mount { from, to, blob }),
        1 => Just(Op::Collect),
    ];
    proptest::collection::vec(op, 1..40)
}

#[derive(Debug, Default)]
struct Model {
    /// (repo, blob digest) links.
    links: BTreeSet<(String, Digest)>,
    /// (repo, manifest digest) → blobs it references.
    manifests: BTreeMap<(String, Digest), BTreeSet<Digest>>,
    /// (repo, tag) → manifest digest.
    tags: BTreeMap<(String, String), Digest>,
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
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(msg()))
    }
}

/// Runs one sequence against a fresh store and the model.
pub async fn run_sequence(f: Fixture, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let (b, clock) = f.builder();
    // Quotas that never refuse: the audit after every step then also checks that the
    // quota counters (nested prefixes, one repository outside `m/c`) follow every
    // link change.
    let r = b
        .with_protection_window(Duration::ZERO)
        .with_quota(super::repo("m"), u64::MAX)
        .with_quota(super::repo("m/c"), u64::MAX)
        .build();
    let mut model = Model::default();
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
                if *chunked {
                    let s = r.start_upload(&rn, crate::Algorithm::Sha256).await.unwrap();
                    let (a, b) = data.split_at(data.len() / 2);
                    r.append_upload(&rn, &s.id, Some(0), None, body(&[a]))
                        .await
                        .unwrap();
                    r.finish_upload(&rn, &s.id, &d, Some((body(&[b]), None)))
                        .await
                        .unwrap();
                } else {
                    r.put_blob(&rn, &d, Some(data.len() as u64), body(&[&data]))
                        .await
                        .unwrap();
                }
                model.links.insert((name.into(), d));
            }
            Op::PushImage {
                repo,
                tag: t,
                config,
                layers,
            } => {
                let name = REPOS[*repo];
                let cfg = blob_bytes(*config);
                let layer_bytes: Vec<Vec<u8>> = layers.iter().map(|l| blob_bytes(*l)).collect();
                let layer_refs: Vec<&[u8]> = layer_bytes.iter().map(|l| l.as_slice()).collect();
                let m = image_manifest(&cfg, &layer_refs);
                let md = Digest::sha256(m.as_bytes());
                let mut refs: BTreeSet<Digest> =
                    layer_bytes.iter().map(|l| Digest::sha256(l)).collect();
                refs.insert(Digest::sha256(&cfg));
                let expect_ok = refs
                    .iter()
                    .all(|d| model.links.contains(&(name.into(), d.clone())));
                let result = r
                    .put_manifest(
                        &super::repo(name),
                        &tag_ref(TAGS[*t]),
                        OCI_MANIFEST,
                        Bytes::from(m),
                        PutManifestOptions::default(),
                    )
                    .await;
                match result {
                    Ok(res) => {
                        check(expect_ok, || {
                            format!("{}: accepted a manifest with missing blobs", ctx())
                        })?;
                        check(res.digest == md, ctx)?;
                        model.manifests.insert((name.into(), md.clone()), refs);
                        model.tags.insert((name.into(), TAGS[*t].into()), md);
                    }
                    Err(Error::ManifestBlobUnknown { .. }) => check(!expect_ok, || {
                        format!("{}: refused a valid manifest", ctx())
                    })?,
                    Err(e) => return Err(TestCaseError::fail(format!("{}: {e}", ctx()))),
                }
            }
            Op::MoveTag { repo, tag: t, nth } => {
                let name = REPOS[*repo];
                let ms = model.manifests_of(name);
                if let Some(d) = ms.get(nth % ms.len().max(1)) {
                    r.tag_manifest(&super::repo(name), &tag(TAGS[*t]), d)
                        .await
                        .unwrap();
                    model.tags.insert((name.into(), TAGS[*t].into()), d.clone());
                }
            }
            Op::DeleteTag { repo, tag: t } => {
                let name = REPOS[*repo];
                let result = r
                    .delete_manifest(&super::repo(name), &tag_ref(TAGS[*t]))
                    .await;
                let expected = model.tags.remove(&(name.into(), TAGS[*t].into()));
                match (result, expected) {
                    (Ok(()), Some(_)) | (Err(Error::ManifestUnknown { .. }), None) => {}
                    (res, exp) => {
                        return Err(TestCaseError::fail(format!(
                            "{}: got {res:?}, model {exp:?}",
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
                let existed = model.manifests.remove(&(name.into(), d.clone())).is_some();
                model.tags.retain(|(r, _), m| !(r == name && *m == d));
                match (result, existed) {
                    (Ok(()), true) | (Err(Error::ManifestUnknown { .. }), false) => {}
                    (res, exp) => {
                        return Err(TestCaseError::fail(format!(
                            "{}: got {res:?}, model existed={exp}",
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
                let mounted = r
                    .mount_blob(
                        &super::repo(t_name),
                        &d,
                        Some(&super::repo(f_name)),
                        &crate::AllowAll,
                    )
                    .await
                    .unwrap();
                let expected = model.links.contains(&(f_name.into(), d.clone()));
                check(mounted == expected, || {
                    format!("{}: mounted={mounted}", ctx())
                })?;
                if mounted {
                    model.links.insert((t_name.into(), d));
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
        compare(&r, &model, step).await?;
    }
    Ok(())
}

/// Compares the store with the model, reference counts included.
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
            format!("step {step}: blob {repo_name} {d} unreadable")
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
    for (repo_name, d) in model.manifests.keys() {
        let rn = super::repo(repo_name);
        let rec = meta.manifest(&rn, d).await.unwrap();
        let tags = model
            .tags
            .iter()
            .filter(|((r, _), m)| r == repo_name && *m == d)
            .count() as u64;
        check(rec.as_ref().map(|r| r.tags) == Some(tags), || {
            format!("step {step}: manifest {d}: {rec:?}, model tags {tags}")
        })?;
        let m = r.get_manifest(&rn, &Reference::Digest(d.clone())).await;
        check(m.is_ok(), || {
            format!("step {step}: manifest {repo_name} {d} unreadable")
        })?;
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
