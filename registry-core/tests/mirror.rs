//! Push-mirroring ([`registry_core::mirror`]) between two in-process registries, the
//! target seen through a wrapper that can fail on demand. (Remote targets, kill -9 of
//! the mirroring process: `scripts/e2e-proxy.sh`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use registry_core::fixtures;
use registry_core::{
    ByteStream, Digest, Error, HeldManifest, ImageSink, Mirror, MirrorTarget, Reference, Registry,
    RepoName, Result, Tag,
};

fn repo(s: &str) -> RepoName {
    RepoName::parse(s).unwrap()
}

/// A target registry that refuses everything while `down`.
struct Target {
    registry: Registry,
    down: AtomicBool,
    /// Refuse tag deletes, as CNCF Distribution does (400 DIGEST_INVALID).
    no_tag_deletes: AtomicBool,
}

impl Target {
    fn new() -> Arc<Target> {
        Arc::new(Target {
            registry: Registry::in_memory(),
            down: AtomicBool::new(false),
            no_tag_deletes: AtomicBool::new(false),
        })
    }
    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Upstream {
                reason: "target unreachable".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ImageSink for Target {
    async fn held_manifest(&self, r: &RepoName, d: &Digest) -> Result<Option<HeldManifest>> {
        self.check()?;
        ImageSink::held_manifest(&self.registry, r, d).await
    }
    async fn has_blob(&self, r: &RepoName, d: &Digest) -> Result<bool> {
        self.check()?;
        ImageSink::has_blob(&self.registry, r, d).await
    }
    async fn mount_blob(&self, r: &RepoName, d: &Digest, from: Option<&RepoName>) -> Result<bool> {
        self.check()?;
        ImageSink::mount_blob(&self.registry, r, d, from).await
    }
    async fn put_blob(&self, r: &RepoName, d: &Digest, size: u64, body: ByteStream) -> Result<u64> {
        self.check()?;
        ImageSink::put_blob(&self.registry, r, d, size, body).await
    }
    async fn put_manifest(&self, r: &RepoName, d: &Digest, mt: &str, bytes: Bytes) -> Result<()> {
        self.check()?;
        ImageSink::put_manifest(&self.registry, r, d, mt, bytes).await
    }
    async fn tagged(&self, r: &RepoName, t: &Tag) -> Result<Option<Digest>> {
        self.check()?;
        ImageSink::tagged(&self.registry, r, t).await
    }
    async fn tag_manifest(&self, r: &RepoName, t: &Tag, d: &Digest) -> Result<()> {
        self.check()?;
        ImageSink::tag_manifest(&self.registry, r, t, d).await
    }
    async fn delete_manifest(&self, r: &RepoName, reference: &Reference) -> Result<()> {
        self.check()?;
        if matches!(reference, Reference::Tag(_)) && self.no_tag_deletes.load(Ordering::SeqCst) {
            return Err(Error::ManifestInvalid {
                reason: "tags cannot be deleted".into(),
            });
        }
        ImageSink::delete_manifest(&self.registry, r, reference).await
    }
}

/// Waits until the mirror has gone through every event of the source's outbox.
async fn caught_up(source: &Registry, mirror: &Mirror) {
    for _ in 0..1000 {
        let head = source.events_head().await.unwrap();
        if mirror.status().cursor >= head {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("mirror did not catch up: {:?}", mirror.status());
}

async fn tag_of(r: &Registry, name: &str, tag: &str) -> Option<Digest> {
    r.stat_manifest(&repo(name), &Reference::Tag(Tag::parse(tag).unwrap()))
        .await
        .ok()
        .map(|m| m.digest)
}

#[tokio::test]
async fn pushes_under_the_prefix_are_copied_with_their_tags_and_referrers() {
    let source = Registry::in_memory();
    let target = Target::new();
    let mirror = Mirror::start(
        source.clone(),
        MirrorTarget::new(repo("prod"), "test-target", target.clone()),
        "instance-1",
    );
    // The consumer exists once the mirror claimed it; pushes before that are history.
    for _ in 0..100 {
        if mirror.status().active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let image = fixtures::image()
        .layers([10_000])
        .push(&source, &repo("prod/app"), "v1")
        .await
        .unwrap();
    let index = fixtures::index()
        .platforms(["linux/amd64", "linux/arm64"])
        .push(&source, &repo("prod/multi"), "latest")
        .await
        .unwrap();
    let signature = fixtures::signature(&index.index)
        .push_untagged(&source, &repo("prod/multi"))
        .await
        .unwrap();
    fixtures::image()
        .push(&source, &repo("dev/app"), "v1")
        .await
        .unwrap();
    caught_up(&source, &mirror).await;

    let t = &target.registry;
    assert_eq!(
        tag_of(t, "prod/app", "v1").await,
        Some(image.manifest.digest)
    );
    assert_eq!(
        tag_of(t, "prod/multi", "latest").await,
        Some(index.index.digest.clone())
    );
    for child in &index.images {
        t.get_manifest(&repo("prod/multi"), &child.reference())
            .await
            .unwrap();
    }
    t.get_manifest(
        &repo("prod/multi"),
        &Reference::Digest(signature.manifest.digest.clone()),
    )
    .await
    .unwrap();
    assert_eq!(tag_of(t, "dev/app", "v1").await, None, "outside the prefix");
    let status = mirror.status();
    assert!(status.copied >= 3, "{status:?}");
    assert_eq!(status.lag, 0);
    mirror.shutdown().await;
}

#[tokio::test]
async fn a_target_down_is_retried_and_a_restarted_mirror_resumes_from_its_cursor() {
    let source = Registry::in_memory();
    let target = Target::new();
    let make = |t: &Arc<Target>| {
        MirrorTarget::new(repo("prod"), "test-target", t.clone())
            .with_remote_prefix(repo("mirror/prod"))
            .with_deletes(true)
    };
    let first = Mirror::start(source.clone(), make(&target), "instance-1");
    for _ in 0..100 {
        if first.status().active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    target.down.store(true, Ordering::SeqCst);
    let mut pushed = Vec::new();
    for i in 0..5 {
        let name = format!("prod/app{i}");
        let image = fixtures::image()
            .seed(i)
            .push(&source, &repo(&name), "v1")
            .await
            .unwrap();
        pushed.push((name, image.manifest.digest));
    }
    // The target refuses: the mirror retries without passing any event.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stalled = first.status();
    assert!(stalled.failures >= 1, "{stalled:?}");
    assert!(stalled.lag > 0, "{stalled:?}");
    // The process stops: its cursor stays before the events it could not copy.
    drop(first);

    target.down.store(false, Ordering::SeqCst);
    // Another process takes over once the lease expires; here the same name claims it
    // again at once, as a restarted process does.
    let second = Mirror::start(source.clone(), make(&target), "instance-1");
    caught_up(&source, &second).await;
    for (name, digest) in &pushed {
        let remote = name.replace("prod/", "mirror/prod/");
        assert_eq!(
            tag_of(&target.registry, &remote, "v1").await.as_ref(),
            Some(digest)
        );
    }

    // Deletes follow.
    source
        .delete_manifest(
            &repo("prod/app0"),
            &Reference::Tag(Tag::parse("v1").unwrap()),
        )
        .await
        .unwrap();
    caught_up(&source, &second).await;
    assert_eq!(
        tag_of(&target.registry, "mirror/prod/app0", "v1").await,
        None
    );
    assert!(second.status().deleted >= 1);
    second.shutdown().await;
}

#[tokio::test]
async fn a_target_that_cannot_delete_tags_never_holds_later_pushes_back() {
    let source = Registry::in_memory();
    let target = Target::new();
    target.no_tag_deletes.store(true, Ordering::SeqCst);
    let mirror = Mirror::start(
        source.clone(),
        MirrorTarget::new(repo("prod"), "test-target", target.clone()).with_deletes(true),
        "instance-1",
    );
    for _ in 0..100 {
        if mirror.status().active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let v1 = Reference::Tag(Tag::parse("v1").unwrap());
    let untagged = fixtures::image()
        .seed(1)
        .push(&source, &repo("prod/a"), "v1")
        .await
        .unwrap();
    let still_tagged = fixtures::image()
        .seed(2)
        .push(&source, &repo("prod/b"), "v1")
        .await
        .unwrap();
    source
        .tag_manifest(
            &repo("prod/b"),
            &Tag::parse("stable").unwrap(),
            &still_tagged.manifest.digest,
        )
        .await
        .unwrap();
    caught_up(&source, &mirror).await;

    // prod/a:v1 was the manifest's only tag: the target deletes the manifest instead.
    source.delete_manifest(&repo("prod/a"), &v1).await.unwrap();
    // prod/b:v1 was not: the target keeps both tags (it cannot delete one).
    source.delete_manifest(&repo("prod/b"), &v1).await.unwrap();
    let later = fixtures::image()
        .seed(3)
        .push(&source, &repo("prod/c"), "v1")
        .await
        .unwrap();
    caught_up(&source, &mirror).await;

    let t = &target.registry;
    let held = |r: &'static str, d: &Digest| {
        let d = d.clone();
        async move {
            ImageSink::held_manifest(t, &repo(r), &d)
                .await
                .unwrap()
                .is_some()
        }
    };
    assert!(!held("prod/a", &untagged.manifest.digest).await);
    assert_eq!(
        tag_of(t, "prod/b", "stable").await,
        Some(still_tagged.manifest.digest)
    );
    assert_eq!(tag_of(t, "prod/c", "v1").await, Some(later.manifest.digest));
    let status = mirror.status();
    assert_eq!(status.lag, 0, "{status:?}");
    assert_eq!(
        status.failures, 1,
        "the refused tag delete of prod/b: {status:?}"
    );
    mirror.shutdown().await;
}
