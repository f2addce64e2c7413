//! Writing: [`ImageSink`] for [`RemoteRegistry`].

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, StatusCode, Uri};
use registry_core::{
    ByteStream, Digest, Error, Hasher, HeldManifest, ImageSink, ManifestInfo, Reference, RepoName,
    Result, Tag,
};
use tokio::sync::oneshot;

use crate::RemoteRegistry;
use crate::auth::{Access, scopes};
use crate::client::{Body, Call, Subject, error_for, oci_error, upstream};
use crate::url::with_query;

const DIGEST_HEADER: HeaderName = HeaderName::from_static("docker-content-digest");

impl RemoteRegistry {
    /// Cancels an upload session nobody will finish, so that it does not hold space on
    /// the registry until it expires. Best effort: one try, errors ignored.
    async fn cancel_upload(&self, repo: &RepoName, location: Uri) {
        let call = Call::new(Method::DELETE, location, scopes(repo, Access::Push)).no_retries();
        if let Ok(answer) = self.inner.send(call).await {
            answer.discard().await;
        }
    }

    async fn put_manifest_bytes(
        &self,
        repo: &RepoName,
        reference: &Reference,
        expected: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<()> {
        let uri = self
            .inner
            .url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let content_type =
            HeaderValue::from_str(media_type).map_err(|_| Error::ManifestInvalid {
                reason: format!("media type {media_type:?} is not a header value"),
            })?;
        let call = Call::new(Method::PUT, uri, scopes(repo, Access::Push))
            .header(header::CONTENT_TYPE, content_type)
            .bytes(bytes);
        let answer = self.inner.send(call).await?;
        if !answer.status.is_success() {
            return Err(answer.fail(Subject::Manifest(repo, reference)).await);
        }
        // A registry that stored other bytes than sent (a proxy re-encoding JSON) would
        // break every digest reference to them.
        let stored = answer
            .header(DIGEST_HEADER)
            .and_then(|d| Digest::parse(d.trim()).ok());
        let what = answer.what.clone();
        answer.discard().await;
        match stored {
            Some(stored) if stored.algorithm() == expected.algorithm() && stored != *expected => {
                Err(upstream(format!(
                    "{what}: the registry stored {stored}, not {expected}"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// What the streamed body of an upload saw: the bytes sent, their digest once the
/// body ended, and why it failed, if it did.
#[derive(Default)]
struct Sent {
    bytes: u64,
    digest: Option<Digest>,
    failure: Option<Error>,
}

/// Wraps a blob's stream as a request body that hashes and counts what it sends and
/// refuses to send more or fewer bytes than `size` (the request declares
/// `Content-Length: size`; ending short would leave the registry waiting).
fn upload_body(
    body: ByteStream,
    size: u64,
    algorithm: registry_core::Algorithm,
) -> (Body, Arc<Mutex<Sent>>, oneshot::Receiver<()>) {
    let sent = Arc::new(Mutex::new(Sent::default()));
    let (done_tx, done_rx) = oneshot::channel();
    struct State {
        inner: ByteStream,
        hasher: Option<Hasher>,
        count: u64,
        done: Option<oneshot::Sender<()>>,
        sent: Arc<Mutex<Sent>>,
        finished: bool,
    }
    let mut state = State {
        inner: body,
        hasher: Some(Hasher::new(algorithm)),
        count: 0,
        done: Some(done_tx),
        sent: sent.clone(),
        finished: false,
    };
    let record = |s: &State, failure: Option<Error>| {
        let mut slot = s.sent.lock().unwrap_or_else(|p| p.into_inner());
        slot.bytes = s.count;
        if failure.is_some() {
            slot.failure = failure;
        }
    };
    let complete = move |s: &mut State| {
        record(s, None);
        if let Some(h) = s.hasher.take() {
            s.sent.lock().unwrap_or_else(|p| p.into_inner()).digest = Some(h.finish());
        }
        if let Some(tx) = s.done.take() {
            let _ = tx.send(());
        }
    };
    // An empty blob's body may never be polled at all.
    if size == 0 {
        complete(&mut state);
    }
    let stream = futures::stream::unfold(state, move |mut s| async move {
        if s.finished {
            return None;
        }
        let fail = |s: &mut State, e: Error| {
            let io = std::io::Error::other(e.to_string());
            record(s, Some(e));
            s.finished = true;
            io
        };
        match s.inner.next().await {
            Some(Ok(chunk)) => {
                s.count += chunk.len() as u64;
                if s.count > size {
                    let e = Error::SizeMismatch {
                        expected: size,
                        actual: s.count,
                    };
                    let io = fail(&mut s, e);
                    return Some((Err(io), s));
                }
                if let Some(h) = s.hasher.as_mut() {
                    h.update(&chunk);
                }
                // hyper stops polling a body once it has sent `Content-Length` bytes,
                // so the end is recorded here, not when the source ends.
                if s.count == size {
                    complete(&mut s);
                }
                Some((Ok(Frame::data(chunk)), s))
            }
            Some(Err(e)) => {
                let error = Error::BodyIncomplete {
                    reason: e.to_string(),
                };
                let io = fail(&mut s, error);
                Some((Err(io), s))
            }
            None if s.count != size => {
                let e = Error::SizeMismatch {
                    expected: size,
                    actual: s.count,
                };
                let io = fail(&mut s, e);
                Some((Err(io), s))
            }
            None => {
                complete(&mut s);
                None
            }
        }
    });
    let body = StreamBody::new(stream)
        .map_err(|e: std::io::Error| -> crate::client::BoxError { Box::new(e) })
        .boxed_unsync();
    (body, sent, done_rx)
}

#[async_trait]
impl ImageSink for RemoteRegistry {
    async fn held_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<HeldManifest>> {
        let reference = Reference::Digest(digest.clone());
        // HEAD first: registries count manifest GETs against pull limits, HEADs not.
        match self.head_manifest(repo, &reference, Access::Push).await? {
            None => return Ok(None),
            Some(answer) => answer.discard().await,
        }
        let manifest = match self.fetch_manifest(repo, &reference, Access::Push).await {
            Ok(m) => m,
            // Deleted between the two requests.
            Err(Error::ManifestUnknown { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let info = ManifestInfo::inspect(&manifest.meta.media_type, &manifest.bytes)?;
        Ok(Some(HeldManifest {
            blobs: info.blob_references(),
            children: info.manifest_references(),
        }))
    }

    async fn has_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        Ok(self.head_blob(repo, digest, Access::Push).await?.is_some())
    }

    async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
    ) -> Result<bool> {
        // Without a source repository there is nothing to name in the request.
        let Some(from) = from else {
            return Ok(false);
        };
        let uri = self.inner.url(&format!("/v2/{repo}/blobs/uploads/"))?;
        let uri = with_query(&uri, "mount", digest.as_str())
            .and_then(|u| with_query(&u, "from", from.as_str()))
            .map_err(upstream)?;
        let mut wanted = scopes(repo, Access::Push);
        if from != repo {
            wanted.extend(scopes(from, Access::Pull));
        }
        let answer = self
            .inner
            .send(Call::new(Method::POST, uri, wanted))
            .await?;
        match answer.status {
            StatusCode::CREATED => {
                answer.discard().await;
                Ok(true)
            }
            // Not mounted: the registry opened an upload session instead.
            StatusCode::ACCEPTED => {
                let location = answer.location();
                answer.discard().await;
                if let Ok(location) = location {
                    self.cancel_upload(repo, location).await;
                }
                Ok(false)
            }
            _ => Err(answer.fail(Subject::Repo(repo)).await),
        }
    }

    async fn put_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        body: ByteStream,
    ) -> Result<u64> {
        let uri = self.inner.url(&format!("/v2/{repo}/blobs/uploads/"))?;
        let answer = self
            .inner
            .send(Call::new(Method::POST, uri, scopes(repo, Access::Push)))
            .await?;
        if answer.status != StatusCode::ACCEPTED {
            return Err(answer.fail(Subject::Repo(repo)).await);
        }
        let location = answer.location()?;
        answer.discard().await;

        // One PUT with the whole body: a monolithic upload, streamed.
        let target = with_query(&location, "digest", digest.as_str()).map_err(upstream)?;
        let (body, sent, done) = upload_body(body, size, digest.algorithm());
        let call = Call::new(Method::PUT, target, scopes(repo, Access::Push))
            .header(header::CONTENT_LENGTH, HeaderValue::from(size))
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            )
            .stream(body, done);
        let result = self.inner.send(call).await;
        let (failure, digest_sent, bytes_sent) = {
            let mut s = sent.lock().unwrap_or_else(|p| p.into_inner());
            (s.failure.take(), s.digest.clone(), s.bytes)
        };
        // The source failing is the source's error, whatever the registry made of it.
        if let Some(failure) = failure {
            self.cancel_upload(repo, location).await;
            return Err(failure);
        }
        let answer = match result {
            Ok(answer) => answer,
            Err(e) => {
                self.cancel_upload(repo, location).await;
                return Err(e);
            }
        };
        if answer.status == StatusCode::CREATED {
            answer.discard().await;
            return Ok(bytes_sent);
        }
        let (status, headers, what) = (answer.status, answer.headers.clone(), answer.what.clone());
        let body = answer
            .read(64 * 1024, "error body")
            .await
            .unwrap_or_default();
        self.cancel_upload(repo, location).await;
        let (code, _) = oci_error(&body);
        // The registry hashed other bytes than `digest`: say which, from our own count.
        if code == "DIGEST_INVALID"
            && let Some(actual) = digest_sent.filter(|d| d != digest)
        {
            return Err(Error::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        Err(error_for(
            status,
            &headers,
            &body,
            &what,
            Subject::Blob(repo, digest),
            1,
        ))
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<()> {
        if !digest.verify(&bytes) {
            return Err(Error::DigestMismatch {
                expected: digest.clone(),
                actual: Digest::compute(digest.algorithm(), &bytes),
            });
        }
        self.put_manifest_bytes(
            repo,
            &Reference::Digest(digest.clone()),
            digest,
            media_type,
            bytes,
        )
        .await
    }

    async fn tagged(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        let reference = Reference::Tag(tag.clone());
        let Some(answer) = self.head_manifest(repo, &reference, Access::Push).await? else {
            return Ok(None);
        };
        let said = answer
            .header(DIGEST_HEADER)
            .and_then(|d| Digest::parse(d.trim()).ok());
        answer.discard().await;
        match said {
            Some(d) => Ok(Some(d)),
            // The registry does not say: hash what it serves.
            None => match self.fetch_manifest(repo, &reference, Access::Push).await {
                Ok(m) => Ok(Some(m.meta.digest)),
                Err(Error::ManifestUnknown { .. }) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    async fn tag_manifest(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> Result<()> {
        // The API tags by pushing the manifest's bytes under the tag.
        let manifest = self
            .fetch_manifest(repo, &Reference::Digest(digest.clone()), Access::Push)
            .await?;
        self.put_manifest_bytes(
            repo,
            &Reference::Tag(tag.clone()),
            digest,
            &manifest.meta.media_type,
            manifest.bytes,
        )
        .await
    }

    async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        let uri = self
            .inner
            .url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let answer = self
            .inner
            .send(Call::new(Method::DELETE, uri, scopes(repo, Access::Push)))
            .await?;
        if answer.status.is_success() {
            answer.discard().await;
            return Ok(());
        }
        Err(answer.fail(Subject::Manifest(repo, reference)).await)
    }
}
