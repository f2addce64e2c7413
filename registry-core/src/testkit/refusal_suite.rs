//! Races between a refused push and an accepted push of the same bytes, run by every
//! store as part of the shared suite (re-exported from [`super::suite`]).
//!
//! A manifest push stores its bytes before its atomic change decides; a refusal then
//! removes the bytes it stored. Another push of identical bytes may be accepted at the
//! same moment, and its bytes are the same blob. The invariant defended here: **an
//! acknowledged manifest is always readable with all its bytes**, whatever the refusal
//! (missing blob, immutable tag, quota, read-only, size) and wherever the two pushes
//! interleave. Each interleaving stops one push at a pause point, runs the other as far
//! as it can go, then lets the first one finish.

use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::manifest::media_type::OCI_MANIFEST;
use crate::policy::TagPattern;
use crate::registry::PutManifestResult;
use crate::testkit::hooks::{Hooks, Pause};

/// Why the refused push is refused.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// Its repository lacks a layer the manifest references.
    MissingBlob,
    /// Its tag is immutable and points at another manifest.
    ImmutableTag,
    /// Its repository is under a quota the manifest would exceed.
    Quota,
    /// It goes through a read-only registry over the same storage.
    ReadOnly,
    /// It goes through a registry with a smaller manifest size limit.
    TooLarge,
}

impl Refusal {
    fn matches(self, e: &Error) -> bool {
        match self {
            Refusal::MissingBlob => matches!(e, Error::ManifestBlobUnknown { .. }),
            Refusal::ImmutableTag => matches!(e, Error::ImmutableTag { .. }),
            Refusal::Quota => matches!(e, Error::QuotaExceeded { .. }),
            Refusal::ReadOnly => matches!(e, Error::ReadOnly { .. }),
            Refusal::TooLarge => matches!(e, Error::TooLarge { .. }),
        }
    }
}

/// Which push stops at the pause point first.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Refused,
    Accepted,
}

/// Every interleaving: the push that stops, and where.
const INTERLEAVINGS: &[(Side, &str)] = &[
    // The refusal is about to delete its bytes while the accepted push links them: the
    // bug of a check-then-delete clean-up.
    (Side::Refused, "blobs.delete"),
    // The refusal is about to take the deletion lease; the accepted push links first.
    (Side::Refused, "meta.begin_blob_deletion"),
    // The refusal stored its bytes and is about to be refused; the accepted push finds
    // the bytes present and links them.
    (Side::Refused, "meta.put_manifest"),
    // The accepted push is about to store its bytes; the refusal stores and removes its
    // own meanwhile.
    (Side::Accepted, "blobs.put_bytes"),
    // The accepted push stored its bytes and is about to link them; the refusal runs
    // its whole course meanwhile.
    (Side::Accepted, "meta.put_manifest"),
];

/// The two registries (they may be the same) and what each pushes in one round.
struct Round {
    accepting: Registry,
    refusing: Registry,
    accepted_repo: RepoName,
    accepted_ref: Reference,
    refused_repo: RepoName,
    refused_ref: Reference,
    /// What `refused_ref` resolves to before and after (the immutable tag's manifest).
    refused_ref_before: Option<Digest>,
    manifest: String,
}

const LAYER: &[u8] = b"a layer shared by both pushes";

fn registry_over(storage: Storage, clock: &ManualClock) -> RegistryBuilder {
    Registry::builder(storage)
        .with_clock(Arc::new(clock.clone()))
        .with_protection_window(Duration::ZERO)
}

/// Sets up round `i` of `refusal` over `storage`: the blobs each repository needs, and a
/// manifest whose bytes no earlier round used.
async fn round(refusal: Refusal, storage: &Storage, clock: &ManualClock, i: usize) -> Round {
    let config = format!(r#"{{"round":{i}}}"#);
    let manifest = image_manifest(config.as_bytes(), &[LAYER]);
    let plain = registry_over(storage.clone(), clock).build();
    let accepted_repo = repo("suite/refusal/accepted");
    push_blob(&plain, &accepted_repo, config.as_bytes()).await;
    push_blob(&plain, &accepted_repo, LAYER).await;
    let accepted_ref = tag_ref(&format!("accepted-{i}"));
    let mut refused_ref_before = None;
    let (refusing, refused_repo, refused_ref) = match refusal {
        Refusal::MissingBlob => {
            let lacking = repo("suite/refusal/lacking");
            push_blob(&plain, &lacking, config.as_bytes()).await;
            (plain.clone(), lacking, tag_ref(&format!("refused-{i}")))
        }
        Refusal::ImmutableTag => {
            let r = registry_over(storage.clone(), clock)
                .with_immutable_tags(TagPattern::parse("fixed-*").expect("pattern"))
                .build();
            let fixed = format!("fixed-{i}");
            let other = format!(r#"{{"other":{i}}}"#);
            let (d, _) = push_image(&r, &accepted_repo, &fixed, other.as_bytes(), &[LAYER]).await;
            refused_ref_before = Some(d);
            (r, accepted_repo.clone(), tag_ref(&fixed))
        }
        Refusal::Quota => {
            // A prefix per round: its quota holds the blobs exactly, not the manifest.
            let prefix = repo(&format!("suite/refusal/quota{i}"));
            let inside = repo(&format!("suite/refusal/quota{i}/app"));
            push_blob(&plain, &inside, config.as_bytes()).await;
            push_blob(&plain, &inside, LAYER).await;
            let limit = (config.len() + LAYER.len()) as u64;
            let r = registry_over(storage.clone(), clock)
                .with_quota(prefix, limit)
                .build();
            (r, inside, tag_ref(&format!("refused-{i}")))
        }
        Refusal::ReadOnly => {
            let r = registry_over(storage.clone(), clock)
                .read_only(true)
                .build();
            (r, accepted_repo.clone(), tag_ref(&format!("refused-{i}")))
        }
        Refusal::TooLarge => {
            let r = registry_over(storage.clone(), clock)
                .with_max_manifest_size(manifest.len() as u64 - 1)
                .build();
            (r, accepted_repo.clone(), tag_ref(&format!("refused-{i}")))
        }
    };
    Round {
        accepting: plain,
        refusing,
        accepted_repo,
        accepted_ref,
        refused_repo,
        refused_ref,
        refused_ref_before,
        manifest,
    }
}

type Push = tokio::task::JoinHandle<Result<PutManifestResult, Error>>;

fn spawn_push(r: &Registry, repo: &RepoName, reference: &Reference, manifest: &str) -> Push {
    let (r, repo, reference) = (r.clone(), repo.clone(), reference.clone());
    let bytes = Bytes::from(manifest.to_owned());
    tokio::spawn(async move {
        r.put_manifest(
            &repo,
            &reference,
            OCI_MANIFEST,
            bytes,
            PutManifestOptions::default(),
        )
        .await
    })
}

/// Runs `first` until it reaches `pause` (or ends without reaching it), then starts
/// `second` and gives it a moment to run as far as it can (it may be waiting for the
/// paused push, by design), then releases the pause. Returns both results.
async fn interleave(
    mut pause: Pause,
    first: impl FnOnce() -> Push,
    second: impl FnOnce() -> Push,
) -> (
    Result<PutManifestResult, Error>,
    Result<PutManifestResult, Error>,
) {
    let mut first = first();
    let ended = tokio::select! {
        _ = pause.reached() => None,
        done = &mut first => Some(done.expect("push task")),
    };
    if let Some(done) = ended {
        // Ended without reaching the point (a refusal before any storage call).
        drop(pause);
        let second = second().await.expect("push task");
        return (done, second);
    }
    let mut second = second();
    // Not a timing assertion: whether `second` is done or still waiting after this, the
    // checks after the release must hold.
    let early = tokio::time::timeout(Duration::from_millis(100), &mut second)
        .await
        .ok();
    pause.release();
    let first = first.await.expect("push task");
    let second = match early {
        Some(done) => done,
        None => second.await,
    }
    .expect("push task");
    (first, second)
}

async fn race_refusal(f: Fixture, refusal: Refusal) {
    let hooks = Hooks::new();
    let clock = ManualClock::new(Timestamp(1_700_000_000_000));
    let storage = hooks.wrap(f.storage.clone());
    let mut acknowledged = Vec::new();
    for (i, &(side, point)) in INTERLEAVINGS.iter().enumerate() {
        let round = round(refusal, &storage, &clock, i).await;
        let what = format!("{refusal:?}, {side:?} push paused at {point}");
        let accepted = || {
            spawn_push(
                &round.accepting,
                &round.accepted_repo,
                &round.accepted_ref,
                &round.manifest,
            )
        };
        let refused = || {
            spawn_push(
                &round.refusing,
                &round.refused_repo,
                &round.refused_ref,
                &round.manifest,
            )
        };
        let pause = hooks.arm(point);
        let (accepted, refused) = match side {
            Side::Refused => {
                let (r, a) = interleave(pause, refused, accepted).await;
                (a, r)
            }
            Side::Accepted => interleave(pause, accepted, refused).await,
        };
        let accepted = accepted.unwrap_or_else(|e| panic!("{what}: accepted push failed: {e:?}"));
        match refused {
            Err(e) if refusal.matches(&e) => {}
            other => panic!("{what}: expected a {refusal:?} refusal, got {other:?}"),
        }
        acknowledged.push((
            round.accepted_repo.clone(),
            round.accepted_ref.clone(),
            accepted.digest.clone(),
        ));
        // Every manifest acknowledged so far, this round's and earlier ones, is readable
        // with all its bytes, by tag and by digest, and so are its blobs.
        for (repo, reference, digest) in &acknowledged {
            for by in [reference.clone(), Reference::Digest(digest.clone())] {
                let m = round
                    .accepting
                    .get_manifest(repo, &by)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: acknowledged {repo}:{by} lost: {e:?}"));
                assert_eq!(&m.meta.digest, digest, "{what}");
            }
        }
        assert_eq!(
            read_blob(
                &round.accepting,
                &round.accepted_repo,
                &Digest::sha256(LAYER)
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: layer lost: {e:?}")),
            LAYER
        );
        // The refusal changed nothing where it was refused.
        let now = round
            .accepting
            .stat_manifest(&round.refused_repo, &round.refused_ref)
            .await
            .ok()
            .map(|m| m.digest);
        assert_eq!(now, round.refused_ref_before, "{what}: refused reference");
        // Storage agrees with itself: counts, and no record without bytes.
        let storage = round.accepting.storage();
        let audit = storage.metadata.audit(false).await.expect("audit");
        assert!(
            audit.problems.is_empty(),
            "{what}: audit: {:?}",
            audit.problems
        );
        assert!(
            storage
                .blobs
                .stat(&accepted.digest)
                .await
                .unwrap()
                .is_some(),
            "{what}: manifest record without bytes"
        );
    }
    let (r, _) = f.registry();
    assert_cleans_up(&r).await;
}

/// A push refused for a blob its repository lacks, racing an accepted push of the same
/// manifest bytes in another repository, in every interleaving: the accepted manifest
/// stays readable with all its bytes.
pub async fn race_refused_missing_blob_vs_accepted(f: Fixture) {
    race_refusal(f, Refusal::MissingBlob).await;
}

/// A push refused by an immutable tag racing an accepted push of the same bytes under a
/// mutable tag of the same repository.
pub async fn race_refused_immutable_tag_vs_accepted(f: Fixture) {
    race_refusal(f, Refusal::ImmutableTag).await;
}

/// A push refused by a quota racing an accepted push of the same bytes outside it.
pub async fn race_refused_quota_vs_accepted(f: Fixture) {
    race_refusal(f, Refusal::Quota).await;
}

/// A push refused by a read-only registry racing an accepted push of the same bytes
/// through a writable registry on the same storage.
pub async fn race_refused_read_only_vs_accepted(f: Fixture) {
    race_refusal(f, Refusal::ReadOnly).await;
}

/// A push refused for its size (a registry with a smaller limit on the same storage)
/// racing an accepted push of the same bytes.
pub async fn race_refused_size_vs_accepted(f: Fixture) {
    race_refusal(f, Refusal::TooLarge).await;
}
