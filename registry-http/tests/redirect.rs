//! Blob GETs answered with `307 Temporary Redirect` to a presigned storage URL
//! (`HttpConfig::redirect_blobs`), in process through `tower::ServiceExt::oneshot`, over
//! the in-memory store wrapped to presign like an object store would.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::http::{Method, StatusCode};
use base64::Engine as _;
use bytes::Bytes;
use futures::stream::BoxStream;
use registry_core::access::{Action, Grantee, PrefixRules};
use registry_core::store::{
    BlobRead, BlobStore, ByteRange, ByteStream, CommitOutcome, UploadId, UploadInfo,
};
use registry_core::testkit::{push_blob, repo};
use registry_core::{Digest, MemoryStore, Registry, RepoName, Result, Storage, Timestamp};
use registry_http::{Auth, HttpConfig, Metrics, instrument_storage, router};

mod common;
use common::Reply;

/// The in-memory blob store, presigning `https://bucket.test/<digest>?ttl=<seconds>`.
struct Presigning(Arc<dyn BlobStore>);

#[async_trait]
impl BlobStore for Presigning {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        self.0.stat(digest).await
    }
    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<BlobRead>> {
        self.0.read(digest, range).await
    }
    async fn delete(&self, digest: &Digest) -> Result<bool> {
        self.0.delete(digest).await
    }
    async fn list(&self) -> Result<BoxStream<'static, Result<Digest>>> {
        self.0.list().await
    }
    async fn create_upload(&self, id: &UploadId, repo: &RepoName, now: Timestamp) -> Result<()> {
        self.0.create_upload(id, repo, now).await
    }
    async fn upload_info(&self, id: &UploadId) -> Result<Option<UploadInfo>> {
        self.0.upload_info(id).await
    }
    async fn append_upload(
        &self,
        id: &UploadId,
        offset: u64,
        data: ByteStream,
        now: Timestamp,
    ) -> Result<u64> {
        self.0.append_upload(id, offset, data, now).await
    }
    async fn read_upload(&self, id: &UploadId) -> Result<ByteStream> {
        self.0.read_upload(id).await
    }
    async fn commit_upload(
        &self,
        id: &UploadId,
        digest: &Digest,
        len: u64,
    ) -> Result<CommitOutcome> {
        self.0.commit_upload(id, digest, len).await
    }
    async fn delete_upload(&self, id: &UploadId) -> Result<bool> {
        self.0.delete_upload(id).await
    }
    async fn put_bytes(
        &self,
        repo: &RepoName,
        digest: &Digest,
        bytes: Bytes,
        now: Timestamp,
    ) -> Result<CommitOutcome> {
        self.0.put_bytes(repo, digest, bytes, now).await
    }
    async fn list_uploads(&self) -> Result<Vec<UploadInfo>> {
        self.0.list_uploads().await
    }
    async fn presigned_get(&self, digest: &Digest, ttl: Duration) -> Result<Option<String>> {
        Ok(Some(format!(
            "https://bucket.test/{digest}?ttl={}",
            ttl.as_secs()
        )))
    }
}

fn presigning_storage() -> Storage {
    let memory = MemoryStore::new().into_storage();
    Storage {
        blobs: Arc::new(Presigning(memory.blobs)),
        metadata: memory.metadata,
    }
}

async fn get(app: &Router, uri: &str, headers: &[(&str, &str)]) -> Reply {
    common::send(app, Method::GET, uri, headers, Body::empty()).await
}

const TTL: Duration = Duration::from_secs(300);

/// A whole-blob GET of a blob the repository holds is a 307 to the presigned URL (with
/// the digest header); HEAD, Range GETs, a repository that does not hold the blob, the
/// option off, or a store that cannot presign are answered as without redirects. The
/// metrics wrapper of the storage keeps the store's presigning.
#[tokio::test]
async fn whole_blob_gets_redirect_to_presigned_urls() {
    let metrics = Metrics::new();
    let storage = instrument_storage(presigning_storage(), Some(&metrics), None);
    let registry = Registry::builder(storage).build();
    let data = b"layer bytes".to_vec();
    let digest = push_blob(&registry, &repo("app/one"), &data).await;
    push_blob(&registry, &repo("app/two"), b"another layer").await;
    let app = router(
        registry.clone(),
        HttpConfig::default().with_redirect_blobs(Some(TTL)),
    );
    let uri = format!("/v2/app/one/blobs/{digest}");

    let r = get(&app, &uri, &[]).await;
    assert_eq!(r.status, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        r.header("location"),
        Some(format!("https://bucket.test/{digest}?ttl=300").as_str())
    );
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert!(r.body.is_empty());

    let r = common::send(&app, Method::HEAD, &uri, &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("location"), None);
    assert_eq!(r.header("content-length"), Some("11"));

    let r = get(&app, &uri, &[("range", "bytes=0-4")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.body[..], b"layer");

    // app/two does not hold the blob: no URL for it, whatever the store could sign.
    let r = get(&app, &format!("/v2/app/two/blobs/{digest}"), &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "BLOB_UNKNOWN");
    assert_eq!(r.header("location"), None);

    let off = router(registry, HttpConfig::default());
    let r = get(&off, &uri, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], &data[..]);

    let plain = Registry::in_memory();
    let digest = push_blob(&plain, &repo("app/one"), &data).await;
    let app = router(plain, HttpConfig::default().with_redirect_blobs(Some(TTL)));
    let r = get(&app, &format!("/v2/app/one/blobs/{digest}"), &[]).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a store that cannot presign streams"
    );
    assert_eq!(&r.body[..], &data[..]);
}

/// Authentication and authorization come first: no URL for a caller without pull
/// rights on the repository.
#[tokio::test]
async fn redirects_only_after_authorization() {
    let registry = Registry::builder(presigning_storage()).build();
    let digest = push_blob(&registry, &repo("team/app"), b"private layer").await;
    let rules = PrefixRules::new()
        .grant(Grantee::user("ci"), "", Action::ALL)
        .grant(Grantee::user("other"), "elsewhere", Action::ALL);
    let auth = Auth::new(rules)
        .with_user("ci", "ci-pass")
        .with_user("other", "other-pass");
    let app = router(
        registry,
        HttpConfig::default()
            .with_auth(auth)
            .with_redirect_blobs(Some(TTL)),
    );
    let uri = format!("/v2/team/app/blobs/{digest}");
    let basic = |user: &str, pass: &str| {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        format!("Basic {encoded}")
    };

    let r = get(&app, &uri, &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.header("location"), None);
    let r = get(
        &app,
        &uri,
        &[("authorization", &basic("other", "other-pass"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.header("location"), None);
    let r = get(&app, &uri, &[("authorization", &basic("ci", "ci-pass"))]).await;
    assert_eq!(r.status, StatusCode::TEMPORARY_REDIRECT);
    assert!(r.header("location").is_some());
}
