//! The pull-through cache ([`registry_core::proxy`]) over an upstream that is another
//! in-process `Registry`, seen through a wrapper that counts requests and can fail on
//! demand. (Real remote upstreams, real clients: `scripts/e2e-proxy.sh`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use registry_core::fixtures;
use registry_core::manifest::Descriptor;
use registry_core::registry::{ManifestMeta, Page};
use registry_core::{
    BlobBody, BlobInfo, Digest, Error, ImageSource, ListOptions, Manifest, Reference, Registry,
    RepoName, Result, Tag, Upstream,
};

fn repo(s: &str) -> RepoName {
    RepoName::parse(s).unwrap()
}

fn tag(s: &str) -> Reference {
    Reference::Tag(Tag::parse(s).unwrap())
}

/// An upstream: a registry, with counts of what was asked of it and switches to fail.
struct Remote {
    registry: Registry,
    manifest_gets: AtomicU64,
    manifest_stats: AtomicU64,
    blob_gets: AtomicU64,
    /// Refuse every request as an unreachable upstream would.
    down: AtomicBool,
    /// Cut the next blob stream after this many bytes (0: do not).
    cut_after: AtomicU64,
    /// Serve blob streams slowly, so that concurrent readers overlap the fetch.
    slow: AtomicBool,
}

impl Default for Remote {
    fn default() -> Self {
        Remote {
            registry: Registry::in_memory(),
            manifest_gets: AtomicU64::new(0),
            manifest_stats: AtomicU64::new(0),
            blob_gets: AtomicU64::new(0),
            down: AtomicBool::new(false),
            cut_after: AtomicU64::new(0),
            slow: AtomicBool::new(false),
        }
    }
}

impl Remote {
    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Upstream {
                reason: "connection refused".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ImageSource for Remote {
    async fn stat_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<ManifestMeta> {
        self.check()?;
        self.manifest_stats.fetch_add(1, Ordering::SeqCst);
        self.registry.stat_manifest(repo, reference).await
    }
    async fn get_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Manifest> {
        self.check()?;
        self.manifest_gets.fetch_add(1, Ordering::SeqCst);
        self.registry.get_manifest(repo, reference).await
    }
    async fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<BlobInfo> {
        self.check()?;
        self.registry.stat_blob(repo, digest).await
    }
    async fn get_blob(&self, repo: &RepoName, digest: &Digest) -> Result<BlobBody> {
        self.check()?;
        self.blob_gets.fetch_add(1, Ordering::SeqCst);
        let mut body = self.registry.get_blob(repo, digest, None).await?;
        let cut = self.cut_after.swap(0, Ordering::SeqCst);
        let slow = self.slow.load(Ordering::SeqCst);
        let chunks = body.stream.flat_map(|chunk| {
            // Small pieces, so that a cut or a pause falls mid-blob.
            let pieces: Vec<std::io::Result<Bytes>> = match chunk {
                Ok(b) => (0..b.len())
                    .step_by(64 * 1024)
                    .map(|i| Ok(b.slice(i..(i + 64 * 1024).min(b.len()))))
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(pieces)
        });
        let mut sent = 0u64;
        body.stream = chunks
            .then(move |piece| async move {
                if slow {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                piece
            })
            .map(move |piece| {
                let piece = piece?;
                sent += piece.len() as u64;
                if cut > 0 && sent > cut {
                    return Err(std::io::Error::other("upstream killed mid-blob"));
                }
                Ok(piece)
            })
            .boxed();
        Ok(body)
    }
    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        options: &ListOptions,
    ) -> Result<Page<Descriptor>> {
        self.check()?;
        self.registry.referrers(repo, subject, None, options).await
    }
    async fn list_tags(&self, repo: &RepoName, options: &ListOptions) -> Result<Page<Tag>> {
        self.check()?;
        self.registry.list_tags(repo, options).await
    }
}

fn cache_of(remote: &Arc<Remote>, configure: impl FnOnce(Upstream) -> Upstream) -> Registry {
    let upstream = configure(Upstream::new(repo("hub"), "test-upstream", remote.clone()));
    Registry::builder(registry_core::MemoryStore::new())
        .with_upstream(upstream)
        .build()
}

async fn read_all(body: BlobBody) -> std::io::Result<Bytes> {
    let mut out = BytesMut::new();
    let mut stream = body.stream;
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out.freeze())
}

/// Waits until the cache holds the blob (its store task runs after the last reader).
async fn wait_stored(cache: &Registry, r: &RepoName, d: &Digest) -> bool {
    for _ in 0..500 {
        let held = cache
            .list_blobs(r, &ListOptions::default())
            .await
            .map(|p| p.items.iter().any(|b| &b.digest == d))
            .unwrap_or(false);
        if held {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn a_pull_fetches_once_and_the_second_pull_is_served_from_the_cache() {
    let remote = Arc::new(Remote::default());
    let image = fixtures::image()
        .layers([300_000, 1000])
        .push(&remote.registry, &repo("library/app"), "v1")
        .await
        .unwrap();
    let cache = cache_of(&remote, |u| u);
    let local = repo("hub/library/app");

    for round in 0..2 {
        let m = cache.get_manifest(&local, &tag("v1")).await.unwrap();
        assert_eq!(m.bytes, image.manifest_bytes, "round {round}");
        for blob in image.layers.iter().chain([&image.config]) {
            let info = cache.stat_blob(&local, &blob.digest).await.unwrap();
            assert_eq!(info.size, blob.size);
            let body = cache.get_blob(&local, &blob.digest, None).await.unwrap();
            let bytes = read_all(body).await.unwrap();
            assert_eq!(Digest::sha256(&bytes), blob.digest);
            assert!(wait_stored(&cache, &local, &blob.digest).await);
        }
    }
    assert_eq!(remote.manifest_gets.load(Ordering::SeqCst), 1);
    assert_eq!(
        remote.blob_gets.load(Ordering::SeqCst),
        3,
        "one fetch per blob"
    );
    let stats = cache.proxy_stats().unwrap();
    assert_eq!((stats.blob_fetches, stats.blob_hits), (3, 3));
    assert!(stats.upstream_bytes >= 301_000);
    // A pull by digest of what is cached asks nothing.
    cache
        .get_manifest(&local, &image.reference())
        .await
        .unwrap();
    assert_eq!(remote.manifest_gets.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_pulls_of_one_uncached_blob_share_one_fetch() {
    let remote = Arc::new(Remote::default());
    let image = fixtures::image()
        .layers([8 << 20])
        .push(&remote.registry, &repo("big"), "v1")
        .await
        .unwrap();
    remote.slow.store(true, Ordering::SeqCst);
    let cache = cache_of(&remote, |u| u);
    let local = repo("hub/big");
    let layer = image.layers[0].digest.clone();

    let pulls = (0..20).map(|_| {
        let (cache, local, layer) = (cache.clone(), local.clone(), layer.clone());
        tokio::spawn(async move {
            let body = cache.get_blob(&local, &layer, None).await.unwrap();
            read_all(body).await.unwrap()
        })
    });
    for pull in futures::future::join_all(pulls).await {
        assert_eq!(Digest::sha256(&pull.unwrap()), layer);
    }
    assert_eq!(remote.blob_gets.load(Ordering::SeqCst), 1);
    assert!(wait_stored(&cache, &local, &layer).await);
    let stats = cache.proxy_stats().unwrap();
    assert_eq!(stats.blob_fetches, 1);
    assert_eq!(stats.blob_joins + stats.blob_hits, 19);
}

#[tokio::test]
async fn an_upstream_failing_mid_blob_fails_the_client_and_stores_nothing() {
    let remote = Arc::new(Remote::default());
    let image = fixtures::image()
        .layers([1 << 20])
        .push(&remote.registry, &repo("app"), "v1")
        .await
        .unwrap();
    let cache = cache_of(&remote, |u| u);
    let local = repo("hub/app");
    let layer = image.layers[0].digest.clone();

    remote.cut_after.store(300_000, Ordering::SeqCst);
    let body = cache.get_blob(&local, &layer, None).await.unwrap();
    assert_eq!(body.size, 1 << 20);
    let err = read_all(body).await.unwrap_err();
    assert!(err.to_string().contains("killed mid-blob"), "{err}");
    // Give the store task time to fail, then look: nothing is linked or stored.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let blobs = cache
        .list_blobs(&local, &ListOptions::default())
        .await
        .map(|p| p.items)
        .unwrap_or_default();
    assert!(
        blobs.iter().all(|b| b.digest != layer),
        "partial blob linked"
    );
    assert_eq!(cache.proxy_stats().unwrap().failed_fetches, 1);

    let body = cache.get_blob(&local, &layer, None).await.unwrap();
    assert_eq!(Digest::sha256(&read_all(body).await.unwrap()), layer);
    assert!(wait_stored(&cache, &local, &layer).await);
    assert_eq!(remote.blob_gets.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_range_of_an_uncached_blob_is_served_from_the_fetch() {
    let remote = Arc::new(Remote::default());
    let image = fixtures::image()
        .layers([500_000])
        .push(&remote.registry, &repo("app"), "v1")
        .await
        .unwrap();
    let cache = cache_of(&remote, |u| u);
    let local = repo("hub/app");
    let layer = &image.layers[0].digest;
    let whole = read_all(
        remote
            .registry
            .get_blob(&repo("app"), layer, None)
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    let body = cache
        .get_blob(
            &local,
            layer,
            Some(registry_core::RangeRequest::FromTo(1000, 1999)),
        )
        .await
        .unwrap();
    assert_eq!(read_all(body).await.unwrap(), whole.slice(1000..2000));
    assert!(wait_stored(&cache, &local, layer).await);
}

#[tokio::test]
async fn tags_are_checked_after_their_ttl_and_served_stale_when_the_upstream_is_down() {
    let remote = Arc::new(Remote::default());
    let upstream_repo = repo("app");
    let first = fixtures::image()
        .seed(1)
        .push(&remote.registry, &upstream_repo, "latest")
        .await
        .unwrap();
    let cache = cache_of(&remote, |u| u.with_tag_ttl(Duration::from_millis(200)));
    let local = repo("hub/app");
    let got = cache.get_manifest(&local, &tag("latest")).await.unwrap();
    assert_eq!(got.meta.digest, first.manifest.digest);

    // The upstream moves the tag: within the TTL the cache still serves the old one.
    let second = fixtures::image()
        .seed(2)
        .push(&remote.registry, &upstream_repo, "latest")
        .await
        .unwrap();
    let got = cache.get_manifest(&local, &tag("latest")).await.unwrap();
    assert_eq!(got.meta.digest, first.manifest.digest);
    assert_eq!(remote.manifest_stats.load(Ordering::SeqCst), 1);

    tokio::time::sleep(Duration::from_millis(250)).await;
    let got = cache.get_manifest(&local, &tag("latest")).await.unwrap();
    assert_eq!(got.meta.digest, second.manifest.digest);

    // Down: the cached tag is served; an uncached one fails with the upstream's error.
    remote.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let got = cache.get_manifest(&local, &tag("latest")).await.unwrap();
    assert_eq!(got.meta.digest, second.manifest.digest);
    assert_eq!(cache.proxy_stats().unwrap().stale_served, 1);
    let err = cache.get_manifest(&local, &tag("other")).await.unwrap_err();
    assert!(matches!(err, Error::Upstream { .. }), "{err:?}");

    // Back up, and the tag deleted upstream: the cache says so too.
    remote.down.store(false, Ordering::SeqCst);
    remote
        .registry
        .delete_manifest(&upstream_repo, &tag("latest"))
        .await
        .unwrap();
    let err = cache
        .get_manifest(&local, &tag("latest"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ManifestUnknown { .. }), "{err:?}");
}

#[tokio::test]
async fn pushes_to_a_cache_are_refused_unless_allowed() {
    let remote = Arc::new(Remote::default());
    let cache = cache_of(&remote, |u| u);
    let err = fixtures::image()
        .push(&cache, &repo("hub/mine"), "v1")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied { .. }), "{err:?}");
    // Outside the prefix, pushes are as usual.
    fixtures::image()
        .push(&cache, &repo("local/mine"), "v1")
        .await
        .unwrap();

    let open = cache_of(&remote, |u| u.allow_push(true));
    fixtures::image()
        .push(&open, &repo("hub/mine"), "v1")
        .await
        .unwrap();
}

#[tokio::test]
async fn an_index_is_cached_with_only_the_platform_pulled() {
    let remote = Arc::new(Remote::default());
    let index = fixtures::index()
        .platforms(["linux/amd64", "linux/arm64"])
        .layers([1000])
        .push(&remote.registry, &repo("multi"), "v1")
        .await
        .unwrap();
    let cache = cache_of(&remote, |u| u);
    let local = repo("hub/multi");
    cache.get_manifest(&local, &tag("v1")).await.unwrap();
    let amd = &index.images[0];
    cache.get_manifest(&local, &amd.reference()).await.unwrap();
    let body = cache
        .get_blob(&local, &amd.layers[0].digest, None)
        .await
        .unwrap();
    read_all(body).await.unwrap();
    assert!(wait_stored(&cache, &local, &amd.layers[0].digest).await);

    let held: Vec<Digest> = cache
        .list_manifests(&local, &ListOptions::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|m| m.digest)
        .collect();
    assert!(held.contains(&index.index.digest));
    assert!(held.contains(&amd.manifest.digest));
    assert!(
        !held.contains(&index.images[1].manifest.digest),
        "arm64 cached"
    );
    let blobs = cache
        .list_blobs(&local, &ListOptions::default())
        .await
        .unwrap();
    assert!(
        blobs
            .items
            .iter()
            .all(|b| b.digest != index.images[1].layers[0].digest)
    );
}

#[tokio::test]
async fn prune_evicts_the_least_recently_pulled_over_the_budget() {
    let remote = Arc::new(Remote::default());
    let mut images = Vec::new();
    for i in 0..3 {
        let name = format!("app{i}");
        images.push(
            fixtures::image()
                .seed(i)
                .layers([100_000])
                .push(&remote.registry, &repo(&name), "v1")
                .await
                .unwrap(),
        );
    }
    let clock = registry_core::ManualClock::new(registry_core::Timestamp::from_system_time(
        std::time::SystemTime::now(),
    ));
    let upstream =
        Upstream::new(repo("hub"), "test-upstream", remote.clone()).with_cache_budget(250_000);
    let cache = Registry::builder(registry_core::MemoryStore::new())
        .with_upstream(upstream)
        .with_clock(Arc::new(clock.clone()))
        .build();
    for (i, image) in images.iter().enumerate() {
        let local = repo(&format!("hub/app{i}"));
        cache.get_manifest(&local, &tag("v1")).await.unwrap();
        for blob in image.layers.iter().chain([&image.config]) {
            read_all(cache.get_blob(&local, &blob.digest, None).await.unwrap())
                .await
                .unwrap();
            assert!(wait_stored(&cache, &local, &blob.digest).await);
        }
        clock.advance(Duration::from_secs(60));
    }
    // app0 is pulled again: app1 is now the least recently pulled.
    cache
        .get_manifest(&repo("hub/app0"), &tag("v1"))
        .await
        .unwrap();

    let report = cache.prune_cache().await.unwrap();
    assert_eq!(report.manifests_removed, 1, "{report:?}");
    assert!(report.bytes_released >= 100_000, "{report:?}");
    for (i, expected) in [(0, 1), (1, 0), (2, 1)] {
        let held = cache
            .list_manifests(&repo(&format!("hub/app{i}")), &ListOptions::default())
            .await
            .map(|p| p.items.len())
            .unwrap_or(0);
        assert_eq!(held, expected, "hub/app{i}");
    }
    // Evicted content is fetched again on the next pull.
    let got = cache
        .get_manifest(&repo("hub/app1"), &images[1].reference())
        .await
        .unwrap();
    assert_eq!(got.meta.digest, images[1].manifest.digest);
    assert_eq!(remote.manifest_gets.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn tags_are_listed_from_the_upstream_or_from_the_cache_when_it_is_down() {
    let remote = Arc::new(Remote::default());
    for (i, t) in ["v1", "v2", "v3"].into_iter().enumerate() {
        fixtures::image()
            .seed(i as u64)
            .push(&remote.registry, &repo("app"), t)
            .await
            .unwrap();
    }
    let cache = cache_of(&remote, |u| u);
    let local = repo("hub/app");
    let names = |p: registry_core::registry::Page<Tag>| {
        p.items.iter().map(ToString::to_string).collect::<Vec<_>>()
    };
    let listed = cache
        .list_tags(&local, &ListOptions::default())
        .await
        .unwrap();
    assert_eq!(names(listed), ["v1", "v2", "v3"]);
    cache.get_manifest(&local, &tag("v2")).await.unwrap();
    remote.down.store(true, Ordering::SeqCst);
    let listed = cache
        .list_tags(&local, &ListOptions::default())
        .await
        .unwrap();
    assert_eq!(names(listed), ["v2"]);
}

#[tokio::test]
async fn the_spool_directory_is_created_and_left_empty() {
    let remote = Arc::new(Remote::default());
    let image = fixtures::image()
        .layers([200_000])
        .push(&remote.registry, &repo("app"), "v1")
        .await
        .unwrap();
    let spool =
        std::env::temp_dir().join(format!("registry-proxy-test-{}/nested", std::process::id()));
    let _ = std::fs::remove_dir_all(&spool);
    let cache = Registry::builder(registry_core::MemoryStore::new())
        .with_upstream(Upstream::new(repo("hub"), "test-upstream", remote.clone()))
        .with_spool_dir(&spool)
        .build();
    let local = repo("hub/app");
    let layer = &image.layers[0].digest;
    let body = cache.get_blob(&local, layer, None).await.unwrap();
    assert_eq!(Digest::sha256(&read_all(body).await.unwrap()), *layer);
    assert!(wait_stored(&cache, &local, layer).await);
    // The spool file goes with the fill's last reader (the store task).
    let mut left = usize::MAX;
    for _ in 0..100 {
        left = std::fs::read_dir(&spool).unwrap().count();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(left, 0, "spool files left behind");
    let _ = std::fs::remove_dir_all(spool.parent().unwrap());
}

#[tokio::test]
async fn a_blob_held_elsewhere_is_linked_only_if_the_upstream_repository_has_it() {
    let remote = Arc::new(Remote::default());
    let image = fixtures::image()
        .layers([100_000])
        .push(&remote.registry, &repo("public"), "v1")
        .await
        .unwrap();
    // The same layer, in another upstream repository.
    let layer_bytes = read_all(
        remote
            .registry
            .get_blob(&repo("public"), &image.layers[0].digest, None)
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    registry_core::testkit::push_blob(&remote.registry, &repo("other"), &layer_bytes).await;
    let cache = cache_of(&remote, |u| u);
    let layer = &image.layers[0].digest;
    read_all(
        cache
            .get_blob(&repo("hub/public"), layer, None)
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert!(wait_stored(&cache, &repo("hub/public"), layer).await);
    assert_eq!(remote.blob_gets.load(Ordering::SeqCst), 1);

    // hub/other: the upstream has it there too, so it is linked without a fetch.
    let body = cache
        .get_blob(&repo("hub/other"), layer, None)
        .await
        .unwrap();
    assert_eq!(Digest::sha256(&read_all(body).await.unwrap()), *layer);
    assert_eq!(remote.blob_gets.load(Ordering::SeqCst), 1);

    // hub/private: the upstream does not have it there; the cached copy is not served.
    remote
        .registry
        .put_blob(
            &repo("private"),
            &Digest::sha256(b"x"),
            Some(1),
            futures::stream::iter([Ok(Bytes::from_static(b"x"))]).boxed(),
        )
        .await
        .unwrap();
    let err = cache
        .get_blob(&repo("hub/private"), layer, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BlobUnknown { .. }), "{err:?}");
}
