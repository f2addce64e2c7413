//! The shared behaviour suite and the model test against object_store's `InMemory`
//! (the same adapter code as against S3 and Azure; see `s3.rs` and `azure.rs` for those).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use registry_core::testkit::{Fixture, model, stress};
use registry_store_object::BucketStore;

mod common;

async fn fixture() -> Fixture {
    let bucket = Arc::new(InMemory::new());
    let store = BucketStore::open(bucket.clone()).await.expect("open store");
    Fixture::new(store, bucket)
}

registry_core::behaviour_suite!(fixture);

#[test]
fn model_based() {
    let cases = std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    model::run(cases, fixture);
}

/// Three adapters sharing nothing but the bucket (each its own metadata cache), under
/// concurrent pushes of images sharing layers, deletes, tag moves and a collector per
/// instance, every push racing refused pushes of the same bytes through the other
/// instances (issue 16); see `registry_core::testkit::stress::run_shared` for what is
/// checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_bucket() {
    let bucket = Arc::new(InMemory::new());
    let mut storages = Vec::new();
    for _ in 0..3 {
        let store = BucketStore::open(bucket.clone()).await.expect("open store");
        storages.push(store.into_storage());
    }
    let report = stress::run_shared(
        storages,
        stress::StressConfig {
            pushers: 6,
            images_per_pusher: 10,
            ..Default::default()
        },
    )
    .await;
    println!("three instances (InMemory): {report:?}");
    assert_eq!(report.pushes, 60);
    assert!(report.collections > 0 && report.deletes > 0);
    assert!(report.refused_immutable + report.refused_quota > 0 && report.lost == 0);
}

/// `check` reports records whose bytes were deleted straight from the bucket; see
/// `common::check_reports_records_without_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_records_without_bytes() {
    let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    common::check_reports_records_without_bytes(bucket.clone(), bucket).await;
}

/// Processes behind a trim of the metadata log reload; see
/// `common::trim_fences_processes_behind`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_fences_processes_behind() {
    let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    common::trim_fences_processes_behind(|| bucket.clone()).await;
}

/// The behaviour suite again with the log trimmed as it goes: a checkpoint every three
/// versions, each followed by a trim pass, and no lease (every check reads the trim
/// watermark).
mod trimmed {
    use super::*;
    use registry_store_object::BucketOptions;

    async fn fixture() -> Fixture {
        let bucket = Arc::new(InMemory::new());
        let options = BucketOptions {
            checkpoint_interval: 3,
            lease: std::time::Duration::ZERO,
            log_retention: Some(std::time::Duration::ZERO),
            ..BucketOptions::default()
        };
        let store = BucketStore::open_with(bucket.clone(), options)
            .await
            .expect("open store");
        Fixture::new(store, bucket)
    }

    registry_core::behaviour_suite!(fixture);
}

/// Counts object-store requests by kind, to report what a push and a pull cost.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn ObjectStore>,
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counting {
    fn count(&self, kind: &'static str) {
        *self.counts.lock().unwrap().entry(kind).or_default() += 1;
    }
    fn take(&self) -> BTreeMap<&'static str, u64> {
        std::mem::take(&mut *self.counts.lock().unwrap())
    }
}

impl std::fmt::Display for Counting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Counting {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.count(match opts.mode {
            PutMode::Overwrite => "PUT",
            _ => "PUT (conditional)",
        });
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.count("multipart upload");
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.count(if options.head { "HEAD" } else { "GET" });
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.count("DELETE");
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.count("LIST");
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.count("LIST");
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.count("COPY");
        self.inner.copy_opts(from, to, options).await
    }
}

/// What one image push and pull cost in object-store requests (the figures in
/// docs/design.md): a config and two layers pushed monolithically (POST then PUT, as
/// skopeo does), a 12 MiB layer pushed in three chunks, then the manifest; a pull reads
/// the manifest by tag and every blob. Bounds here catch regressions in request counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_push_and_pull() {
    use registry_core::testkit::{body, push_blob, repo};
    use registry_core::{Digest, PutManifestOptions, Reference, Registry};

    let counting = Arc::new(Counting {
        inner: Arc::new(InMemory::new()),
        counts: Mutex::default(),
    });
    let store = BucketStore::open(counting.clone()).await.expect("open");
    let r = Registry::builder(store).build();
    let repo = repo("cost/app");
    counting.take();

    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layers = [b"layer one".to_vec(), b"layer two".to_vec()];
    let mut blobs = vec![];
    for data in std::iter::once(&config).chain(&layers) {
        push_blob(&r, &repo, data).await;
        blobs.push((Digest::sha256(data), data.len()));
    }
    let monolithic = counting.take();
    let big = vec![7u8; 12 << 20];
    let status = r
        .start_upload(&repo, registry_core::Algorithm::Sha256)
        .await
        .unwrap();
    for (i, chunk) in big.chunks(4 << 20).enumerate() {
        r.append_upload(
            &repo,
            &status.id,
            Some((i * (4 << 20)) as u64),
            None,
            body(&[chunk]),
        )
        .await
        .unwrap();
    }
    let big_digest = Digest::sha256(&big);
    r.finish_upload(&repo, &status.id, &big_digest, None)
        .await
        .unwrap();
    blobs.push((big_digest, big.len()));
    let chunked = counting.take();

    let layer_json: Vec<String> = blobs[1..]
        .iter()
        .map(|(d, n)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{n}}}"#))
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
        blobs[0].0,
        blobs[0].1,
        layer_json.join(",")
    );
    r.put_manifest(
        &repo,
        &Reference::Tag(registry_core::testkit::tag("v1")),
        "application/vnd.oci.image.manifest.v1+json",
        bytes::Bytes::from(manifest),
        PutManifestOptions::default(),
    )
    .await
    .unwrap();
    let manifest_put = counting.take();

    let got = r
        .get_manifest(&repo, &Reference::Tag(registry_core::testkit::tag("v1")))
        .await
        .unwrap();
    let manifest_get = counting.take();
    for (d, _) in &blobs {
        let mut s = r.get_blob(&repo, d, None).await.unwrap().stream;
        while let Some(chunk) = futures::StreamExt::next(&mut s).await {
            chunk.unwrap();
        }
    }
    let pull_blobs = counting.take();
    drop(got);

    let total = |m: &BTreeMap<&str, u64>| m.values().sum::<u64>();
    println!(
        "3 monolithic blobs: {monolithic:?} ({} requests)",
        total(&monolithic)
    );
    println!(
        "12 MiB in 3 chunks: {chunked:?} ({} requests)",
        total(&chunked)
    );
    println!(
        "manifest PUT: {manifest_put:?} ({} requests)",
        total(&manifest_put)
    );
    println!(
        "manifest GET: {manifest_get:?} ({} requests)",
        total(&manifest_get)
    );
    println!(
        "4 blob GETs: {pull_blobs:?} ({} requests)",
        total(&pull_blobs)
    );
    assert!(total(&monolithic) <= 3 * 14, "{monolithic:?}");
    assert!(total(&manifest_get) <= 3, "{manifest_get:?}");
    assert!(total(&pull_blobs) <= 4 * 4, "{pull_blobs:?}");
}
