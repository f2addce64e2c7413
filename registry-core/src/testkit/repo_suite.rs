//! Behaviours of repository-level operations (deleting a repository, listing its
//! manifests and blobs, the registry's counts) and of the registry over misbehaving
//! storage (torn writes), run by every store as part of the shared suite
//! (re-exported from [`super::suite`]).

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::*;
use crate::digest::Algorithm;
use crate::events::Event;
use crate::fault::{Faults, InjectedFault, Rule};
use crate::fixtures;
use crate::manifest::media_type::OCI_MANIFEST;
use crate::policy::TagPattern;

fn one_chunk(b: &Bytes) -> ByteStream {
    stream::iter([Ok(b.clone())]).boxed()
}

/// Every event received so far.
fn drain(rx: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

/// Deleting a repository removes every tag, manifest (an index before its children,
/// referrers included) and blob link, emits one event per removal and then
/// `RepositoryDeleted`, and touches no other repository: a blob shared with another
/// repository stays readable there, and the collector frees only what nothing links.
pub async fn delete_repository_removes_everything(f: Fixture) {
    let (r, _) = f.registry();
    let (a, b) = (repo("suite/delrepo/a"), repo("suite/delrepo/b"));
    // Same seed in both repositories: the layer is shared.
    let shared = fixtures::image().layers([2048]).seed(5);
    let img = shared.push(&r, &a, "v1").await.unwrap();
    let kept = shared.push(&r, &b, "v1").await.unwrap();
    let index = fixtures::index()
        .layers([512])
        .seed(6)
        .push(&r, &a, "multi")
        .await
        .unwrap();
    fixtures::signature(&img.manifest)
        .push_untagged(&r, &a)
        .await
        .unwrap();
    let loose = push_blob(&r, &a, b"a loose blob").await;
    let before = r.stats().await.unwrap().metadata;
    let mut events = r.subscribe();

    let done = r.delete_repository(&a).await.unwrap();
    // v1, the index and its two children, the signature.
    assert_eq!(done.manifests, 5);
    assert_eq!(done.tags, 2);
    // v1's config and layer, two children's configs and layers, the signature's empty
    // config and blob, the loose blob.
    assert_eq!(done.blob_links, 2 + 4 + 2 + 1);
    let events = drain(&mut events);
    let deleted: Vec<&Digest> = events
        .iter()
        .filter_map(|e| match e {
            Event::ManifestDeleted { digest, .. } => Some(digest),
            _ => None,
        })
        .collect();
    assert_eq!(deleted.len(), 5);
    let at = |d: &Digest| deleted.iter().position(|x| *x == d).unwrap();
    for child in &index.images {
        assert!(
            at(&index.index.digest) < at(&child.manifest.digest),
            "an index goes before its children"
        );
    }
    assert!(events.iter().any(
        |e| matches!(e, Event::BlobDeleted { repo, digest } if repo == &a && digest == &loose)
    ));
    assert_eq!(
        events.last(),
        Some(&Event::RepositoryDeleted { repo: a.clone() })
    );

    // Gone: listings, reads, a second delete.
    assert!(matches!(
        r.list_tags(&a, &ListOptions::default()).await,
        Err(Error::NameUnknown { .. })
    ));
    assert!(matches!(
        r.get_manifest(&a, &tag_ref("v1")).await,
        Err(Error::ManifestUnknown { .. })
    ));
    assert!(matches!(
        r.stat_blob(&a, &img.layers[0].digest).await,
        Err(Error::BlobUnknown { .. })
    ));
    assert!(matches!(
        r.delete_repository(&a).await,
        Err(Error::NameUnknown { .. })
    ));
    let repos = r
        .list_repositories(&ListOptions::default(), &crate::AllowAll)
        .await
        .unwrap();
    assert_eq!(repos.items, std::slice::from_ref(&b));
    let after = r.stats().await.unwrap().metadata;
    assert_eq!(after.repositories, before.repositories - 1);
    assert_eq!(after.manifests, before.manifests - 5);
    assert_eq!(after.tags, before.tags - 2);
    let audit = r.storage().metadata.audit(false).await.unwrap();
    assert!(audit.problems.is_empty(), "{:?}", audit.problems);

    // The collector frees what only `a` held; the shared layer stays for `b`.
    let report = r
        .collect_garbage(&GcOptions {
            window: Some(Duration::ZERO),
            ..GcOptions::default()
        })
        .await
        .unwrap();
    assert!(report.blobs_deleted >= 7, "{report}");
    let layer = read_blob(&r, &b, &kept.layers[0].digest).await.unwrap();
    assert_eq!(layer.len(), 2048);
    assert!(kept.layers[0].digest.verify(&layer));
    assert_eq!(
        r.get_manifest(&b, &tag_ref("v1")).await.unwrap().bytes,
        kept.manifest_bytes
    );
    assert_cleans_up(&r).await;
}

/// A repository with an immutable tag cannot be deleted: `ImmutableTag`, and nothing
/// at all changes (checked before the first delete, not discovered halfway).
pub async fn delete_repository_refuses_immutable_tags(f: Fixture) {
    let (b, _) = f.builder();
    let r = b
        .with_immutable_tags(TagPattern::parse("release-*").unwrap())
        .build();
    let repo = repo("suite/delrepo/immutable");
    // Digest order decides which manifest a careless deletion would reach first: make
    // several, so that some sort before the protected one.
    for seed in 0..4 {
        fixtures::image()
            .seed(seed)
            .push(&r, &repo, &format!("dev-{seed}"))
            .await
            .unwrap();
    }
    fixtures::image()
        .seed(9)
        .push(&r, &repo, "release-1")
        .await
        .unwrap();
    push_blob(&r, &repo, b"loose").await;
    let before = super::policy_suite::snapshot(&r).await;
    match r.delete_repository(&repo).await {
        Err(Error::ImmutableTag { tag, .. }) => assert_eq!(tag.as_str(), "release-1"),
        other => panic!("expected ImmutableTag, got {other:?}"),
    }
    assert_eq!(
        super::policy_suite::snapshot(&r).await,
        before,
        "a refused repository delete changes nothing"
    );
    // Without the policy it goes.
    let (plain, _) = f.registry();
    plain.delete_repository(&repo).await.unwrap();
    assert_cleans_up(&plain).await;
}

/// Pushes racing repository deletes: every step is an ordinary atomic change, so the
/// metadata stays consistent (audit clean) throughout; every image the repository
/// still lists reads back whole; a final delete after the pushes leaves nothing.
pub async fn delete_repository_races_pushes(f: Fixture) {
    // Seeded yields and short sleeps around storage calls, so that the pushes land
    // between the deletion's steps on fast stores too (as the stress test does).
    let jitter = super::interleave::Schedule::jitter(24, 16);
    let (_, clock) = f.builder();
    let r = Registry::builder(jitter.wrap(f.storage.clone()))
        .with_clock(Arc::new(clock))
        .build();
    let repo = repo("suite/delrepo/race");
    let pushing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let pusher = {
        let (r, repo, pushing) = (r.clone(), repo.clone(), pushing.clone());
        tokio::spawn(async move {
            let (mut ok, mut refused) = (0, 0);
            for seed in 0..24u64 {
                let image = fixtures::image().layers([700, 300]).seed(seed % 6);
                // Refusals are expected (a layer unlinked under the push): the client
                // would push again.
                match image.push(&r, &repo, &format!("t{}", seed % 4)).await {
                    Ok(_) => ok += 1,
                    Err(Error::ManifestBlobUnknown { .. }) => refused += 1,
                    Err(e) => panic!("push: {e}"),
                }
                tokio::task::yield_now().await;
            }
            pushing.store(false, std::sync::atomic::Ordering::SeqCst);
            (ok, refused)
        })
    };
    // Deletes for as long as the pushes go on (most attempts find no repository).
    let deleter = {
        let (r, repo, pushing) = (r.clone(), repo.clone(), pushing.clone());
        tokio::spawn(async move {
            let mut deleted = 0;
            for _ in 0..100_000 {
                if !pushing.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                match r.delete_repository(&repo).await {
                    Ok(_) => deleted += 1,
                    Err(Error::NameUnknown { .. }) | Err(Error::TooManyRequests { .. }) => {}
                    Err(e) => panic!("delete_repository: {e}"),
                }
                tokio::task::yield_now().await;
            }
            deleted
        })
    };
    let (pushed, refused) = pusher.await.unwrap();
    let deleted = deleter.await.unwrap();
    tracing::info!(pushed, refused, deleted, "pushes racing repository deletes");
    // How the race goes depends on the store's speed: on a fast one most pushes land
    // between deletions, on a slow one the deleter unlinks layers under most of them
    // (refused, as documented). Either way the deletions happened while pushing.
    assert_eq!(pushed + refused, 24);
    assert!(deleted > 0, "the deleter found the repository to delete");
    jitter.set(0, 0);
    // After the race, the repository is an ordinary one: a push lands and reads back.
    let last = fixtures::image()
        .layers([700, 300])
        .seed(99)
        .push(&r, &repo, "after")
        .await
        .unwrap();
    assert_eq!(
        read_blob(&r, &repo, &last.layers[0].digest)
            .await
            .unwrap()
            .len(),
        700
    );
    let audit = r.storage().metadata.audit(false).await.unwrap();
    assert!(audit.problems.is_empty(), "{:?}", audit.problems);
    // Whatever survived is whole.
    if let Ok(page) = r.list_manifests(&repo, &ListOptions::default()).await {
        for m in page.items {
            let got = r
                .get_manifest(&repo, &Reference::Digest(m.digest.clone()))
                .await
                .unwrap();
            let info = crate::ManifestInfo::inspect(OCI_MANIFEST, &got.bytes).unwrap();
            for d in info.config.iter().chain(&info.layers) {
                let bytes = read_blob(&r, &repo, &d.digest).await.unwrap();
                assert!(d.digest.verify(&bytes), "{} is whole", d.digest);
            }
        }
        r.delete_repository(&repo).await.unwrap();
    }
    assert!(matches!(
        r.list_manifests(&repo, &ListOptions::default()).await,
        Err(Error::NameUnknown { .. })
    ));
    assert_cleans_up(&r).await;
}

/// `list_manifests` and `list_blobs` page through a repository in digest order, every
/// item once; both answer `NameUnknown` for an unknown repository; `stats` counts
/// match what was pushed.
pub async fn repository_listings(f: Fixture) {
    let (r, _) = f.registry();
    let repo = repo("suite/listings");
    let img = fixtures::image()
        .layers([10, 20, 30])
        .seed(1)
        .push(&r, &repo, "v1")
        .await
        .unwrap();
    let index = fixtures::index()
        .seed(2)
        .push(&r, &repo, "multi")
        .await
        .unwrap();
    let mut want_manifests: Vec<String> = [&img.manifest, &index.index]
        .into_iter()
        .chain(index.images.iter().map(|i| &i.manifest))
        .map(|d| d.digest.to_string())
        .collect();
    want_manifests.sort();
    let mut want_blobs: Vec<String> = img
        .layers
        .iter()
        .chain([&img.config])
        .chain(
            index
                .images
                .iter()
                .flat_map(|i| i.layers.iter().chain([&i.config])),
        )
        .map(|d| d.digest.to_string())
        .collect();
    want_blobs.sort();
    want_blobs.dedup();

    let mut got = Vec::new();
    let mut options = ListOptions {
        n: Some(2),
        last: None,
    };
    loop {
        let page = r.list_manifests(&repo, &options).await.unwrap();
        assert!(page.items.len() <= 2);
        got.extend(page.items.iter().map(|m| m.digest.to_string()));
        match page.next {
            Some(next) => options.last = Some(next),
            None => break,
        }
    }
    assert_eq!(got, want_manifests);
    let all = r
        .list_manifests(&repo, &ListOptions::default())
        .await
        .unwrap();
    let entry = |d: &Digest| all.items.iter().find(|m| &m.digest == d).unwrap().clone();
    assert_eq!(entry(&img.manifest.digest).tags, 1);
    assert_eq!(entry(&img.manifest.digest).size, img.manifest.size);
    assert_eq!(entry(&index.images[0].manifest.digest).tags, 0);
    assert_eq!(entry(&index.images[0].manifest.digest).parents, 1);

    let mut got = Vec::new();
    let mut options = ListOptions {
        n: Some(3),
        last: None,
    };
    loop {
        let page = r.list_blobs(&repo, &options).await.unwrap();
        for b in &page.items {
            let size = r.stat_blob(&repo, &b.digest).await.unwrap().size;
            assert_eq!(size, b.size);
        }
        got.extend(page.items.iter().map(|b| b.digest.to_string()));
        match page.next {
            Some(next) => options.last = Some(next),
            None => break,
        }
    }
    assert_eq!(got, want_blobs);

    let unknown = RepoName::parse("suite/listings-none").unwrap();
    assert!(matches!(
        r.list_manifests(&unknown, &ListOptions::default()).await,
        Err(Error::NameUnknown { .. })
    ));
    assert!(matches!(
        r.list_blobs(&unknown, &ListOptions::default()).await,
        Err(Error::NameUnknown { .. })
    ));

    let stats = r.stats().await.unwrap();
    assert_eq!(stats.metadata.repositories, 1);
    assert_eq!(stats.metadata.manifests, want_manifests.len() as u64);
    assert_eq!(stats.metadata.tags, 2);
    assert_eq!(stats.metadata.blob_links, want_blobs.len() as u64);
    assert_eq!(stats.event_subscribers, 0);
    let _rx = r.subscribe();
    assert_eq!(r.stats().await.unwrap().event_subscribers, 1);
    assert_cleans_up(&r).await;
}

/// Pushes through storage that tears writes (appends keep a prefix and fail, one-call
/// manifest writes leave a partial session and fail) and refuses some commits and
/// links: every acknowledged blob and manifest reads back whole, every refused one is
/// absent, and every blob the repository lists hashes to its digest. Then the
/// collector clears what the torn writes left behind.
pub async fn torn_writes_serve_nothing_partial(f: Fixture) {
    let faults = Faults::new(2024)
        .with(Rule::torn("blobs.append_upload").probability(0.3))
        .with(Rule::torn("blobs.put_bytes").probability(0.3))
        .with(Rule::error("blobs.commit_upload").probability(0.1))
        .with(Rule::error("meta.link_blob").probability(0.1))
        .with(Rule::error("meta.put_manifest").probability(0.1));
    let (b, clock) = f.builder();
    let r = b.build();
    let faulty = Registry::builder(faults.wrap(f.storage.clone()))
        .with_clock(Arc::new(clock.clone()))
        .build();
    let repo = repo("suite/torn");
    let (mut blobs_ok, mut blobs_refused) = (Vec::new(), Vec::new());
    let (mut manifests_ok, mut manifests_refused) = (Vec::new(), Vec::new());
    for seed in 0..24u64 {
        // Each push its own content, so that a refused blob cannot be present because
        // another push of the same bytes was acknowledged.
        let image = fixtures::image()
            .layers([3000, 70_000])
            .seed(1000 + seed)
            .build()
            .unwrap();
        let mut all_blobs = true;
        for (i, blob) in [&image.config].into_iter().chain(&image.layers).enumerate() {
            let d = &blob.descriptor.digest;
            let pushed = if (seed + i as u64).is_multiple_of(2) {
                faulty
                    .put_blob(
                        &repo,
                        d,
                        Some(blob.bytes.len() as u64),
                        one_chunk(&blob.bytes),
                    )
                    .await
                    .map(|_| ())
            } else {
                chunked_push(&faulty, &repo, d, &blob.bytes).await
            };
            match pushed {
                Ok(()) => blobs_ok.push(blob.clone()),
                Err(e) => {
                    assert!(
                        InjectedFault::find(&e).is_some() || is_consequence(&e),
                        "{e}"
                    );
                    all_blobs = false;
                    blobs_refused.push(blob.clone());
                }
            }
        }
        let m = &image.manifest;
        let pushed = faulty
            .put_manifest(
                &repo,
                &tag_ref(&format!("t{seed}")),
                OCI_MANIFEST,
                m.bytes.clone(),
                PutManifestOptions::default(),
            )
            .await;
        match pushed {
            Ok(_) => {
                assert!(all_blobs, "a manifest with a refused blob was accepted");
                manifests_ok.push(m.clone());
            }
            Err(e) => {
                assert!(
                    InjectedFault::find(&e).is_some() || is_consequence(&e),
                    "{e}"
                );
                manifests_refused.push(m.clone());
            }
        }
    }
    assert!(
        !faults.injected().is_empty() && !blobs_ok.is_empty() && !manifests_ok.is_empty(),
        "the scenario exercises both outcomes: {} faults, {} blobs and {} manifests acknowledged",
        faults.injected().len(),
        blobs_ok.len(),
        manifests_ok.len()
    );

    // Checked through a registry without faults, on the same storage.
    for blob in &blobs_ok {
        let got = read_blob(&r, &repo, &blob.descriptor.digest).await.unwrap();
        assert_eq!(got, blob.bytes, "acknowledged blob reads back whole");
    }
    for blob in &blobs_refused {
        assert!(
            matches!(
                r.stat_blob(&repo, &blob.descriptor.digest).await,
                Err(Error::BlobUnknown { .. })
            ),
            "refused blob {} is absent",
            blob.descriptor.digest
        );
    }
    for m in &manifests_ok {
        let got = r
            .get_manifest(&repo, &Reference::Digest(m.descriptor.digest.clone()))
            .await
            .unwrap();
        assert_eq!(got.bytes, m.bytes, "acknowledged manifest reads back whole");
    }
    for m in &manifests_refused {
        assert!(
            matches!(
                r.get_manifest(&repo, &Reference::Digest(m.descriptor.digest.clone()))
                    .await,
                Err(Error::ManifestUnknown { .. })
            ),
            "refused manifest {} is absent",
            m.descriptor.digest
        );
    }
    let storage = r.storage();
    let mut page = ListOptions::default();
    loop {
        let listed = r.list_blobs(&repo, &page).await.unwrap();
        for b in &listed.items {
            assert!(
                crate::store::stored_bytes_match(storage.blobs.as_ref(), &b.digest)
                    .await
                    .unwrap(),
                "listed blob {} hashes to its digest",
                b.digest
            );
        }
        match listed.next {
            Some(next) => page.last = Some(next),
            None => break,
        }
    }
    let audit = storage.metadata.audit(false).await.unwrap();
    assert!(audit.problems.is_empty(), "{:?}", audit.problems);

    // Torn writes left sessions behind; the collector expires them like any other.
    clock.advance(r.config().upload_expiry + Duration::from_secs(1));
    r.collect_garbage(&GcOptions::default()).await.unwrap();
    assert!(storage.blobs.list_uploads().await.unwrap().is_empty());
    assert_cleans_up(&r).await;
}

/// Errors a client sees as the result of an injected fault earlier in its push: the
/// blob a manifest needs was refused, or a session a fault broke is gone.
fn is_consequence(e: &Error) -> bool {
    matches!(
        e,
        Error::ManifestBlobUnknown { .. }
            | Error::DigestMismatch { .. }
            | Error::UploadUnknown { .. }
            | Error::UploadOffset { .. }
    )
}

/// A client's chunked upload in two chunks; on any failure it cancels the session
/// (which may fail too) and reports the first error.
async fn chunked_push(
    r: &Registry,
    repo: &RepoName,
    d: &Digest,
    bytes: &Bytes,
) -> Result<(), Error> {
    let status = r.start_upload(repo, Algorithm::Sha256).await?;
    let half = bytes.len() / 2;
    let result = async {
        r.append_upload(
            repo,
            &status.id,
            Some(0),
            None,
            one_chunk(&bytes.slice(..half)),
        )
        .await?;
        r.finish_upload(
            repo,
            &status.id,
            d,
            Some((one_chunk(&bytes.slice(half..)), None)),
        )
        .await
        .map(|_| ())
    }
    .await;
    if result.is_err() {
        let _ = r.cancel_upload(repo, &status.id).await;
    }
    result
}
