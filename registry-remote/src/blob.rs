//! Blob downloads: streamed chunk by chunk, hashed and counted as they arrive, resumed
//! with `Range` after a broken connection, and failing (never ending) when the bytes
//! are not the blob asked for.

use std::io;

use bytes::{Buf, Bytes};
use futures::StreamExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, StatusCode};
use registry_core::{BlobBody, Digest, Error, Hasher, RepoName, Result};

use crate::RemoteRegistry;
use crate::auth::{Access, scopes};
use crate::client::{Answer, Call, Subject, backoff, error_chain, upstream};

/// Starts a download: the first response decides the size (its `Content-Length`).
pub(crate) async fn get_blob(
    remote: RemoteRegistry,
    repo: RepoName,
    digest: Digest,
) -> Result<BlobBody> {
    let answer = open(&remote, &repo, &digest, 0).await?;
    if answer.status != StatusCode::OK {
        return Err(answer.fail(Subject::Blob(&repo, &digest)).await);
    }
    let what = answer.what.clone();
    let size = answer
        .content_length()
        .ok_or_else(|| upstream(format!("{what} answered without a Content-Length")))?;
    let hasher = Hasher::new(digest.algorithm());
    let download = Download {
        remote,
        path: format!("GET /v2/{repo}/blobs/{digest}"),
        repo,
        digest: digest.clone(),
        size,
        received: 0,
        hasher: Some(hasher),
        body: Some(answer.into_body()),
        skip: 0,
        resumptions: 0,
        last_break: String::new(),
        done: false,
    };
    let stream = futures::stream::unfold(download, |mut d| async move {
        let item = d.next().await?;
        Some((item, d))
    })
    .boxed();
    Ok(BlobBody {
        digest,
        size,
        range: None,
        stream,
    })
}

/// `GET` of a blob from `offset` (following redirects; credentials stay with the
/// registry's own host).
async fn open(
    remote: &RemoteRegistry,
    repo: &RepoName,
    digest: &Digest,
    offset: u64,
) -> Result<Answer> {
    let uri = remote.inner.url(&format!("/v2/{repo}/blobs/{digest}"))?;
    let mut call = Call::new(Method::GET, uri, scopes(repo, Access::Pull)).follow_redirects();
    if offset > 0 {
        let range = HeaderValue::from_str(&format!("bytes={offset}-"))
            .map_err(|e| upstream(format!("Range header: {e}")))?;
        call = call.header(header::RANGE, range);
    }
    remote.inner.send(call).await
}

struct Download {
    remote: RemoteRegistry,
    repo: RepoName,
    digest: Digest,
    /// For messages: method and path (the registry's, not a redirect's with its query).
    path: String,
    size: u64,
    received: u64,
    hasher: Option<Hasher>,
    /// The response being read; `None` after a break, until the next resumption.
    body: Option<Incoming>,
    /// Bytes still to drop from the start of the body: a registry that ignored
    /// `Range` sends the blob from its first byte again.
    skip: u64,
    resumptions: u32,
    /// Why the connection broke last, for the error when resumptions run out.
    last_break: String,
    done: bool,
}

impl Download {
    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        if self.done {
            return None;
        }
        let timeout = self.remote.inner.config.timeout;
        loop {
            let Some(body) = self.body.as_mut() else {
                if let Err(e) = self.resume().await {
                    self.done = true;
                    return Some(Err(e));
                }
                continue;
            };
            let frame = match tokio::time::timeout(timeout, body.frame()).await {
                Err(_) => Err(format!("no data for {timeout:?}")),
                Ok(None) => Err("the response ended early".to_owned()),
                Ok(Some(Err(e))) => Err(error_chain(&e)),
                Ok(Some(Ok(frame))) => Ok(frame),
            };
            let frame = match frame {
                // Whole: an end, or a failure after the last byte, is the end.
                Err(_) if self.received == self.size => {
                    self.done = true;
                    self.body = None;
                    return self.verify();
                }
                Err(why) => {
                    tracing::debug!(
                        request = %self.path,
                        received = self.received,
                        size = self.size,
                        reason = %why,
                        "blob download broke off"
                    );
                    self.body = None;
                    self.last_break = why;
                    continue;
                }
                Ok(frame) => frame,
            };
            let Ok(mut data) = frame.into_data() else {
                continue; // trailers
            };
            if self.skip > 0 {
                let n = usize::try_from(self.skip)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                data.advance(n);
                self.skip -= n as u64;
            }
            if data.is_empty() {
                continue;
            }
            let len = data.len() as u64;
            if self.received + len > self.size {
                self.done = true;
                return Some(Err(self.failure(format!(
                    "the registry sent more than the {} bytes it announced",
                    self.size
                ))));
            }
            self.received += len;
            if let Some(h) = self.hasher.as_mut() {
                h.update(&data);
            }
            return Some(Ok(data));
        }
    }
}

impl Download {
    /// Opens the blob again where the bytes stopped, within the retry budget.
    async fn resume(&mut self) -> io::Result<()> {
        let retries = self.remote.inner.config.retries;
        if self.resumptions >= retries {
            return Err(self.failure(format!(
                "the connection broke after {} of {} bytes ({}), {} resumptions allowed",
                self.received, self.size, self.last_break, retries
            )));
        }
        tokio::time::sleep(backoff(self.resumptions)).await;
        self.resumptions += 1;
        let offset = self.received;
        let answer = open(&self.remote, &self.repo, &self.digest, offset)
            .await
            .map_err(|e| self.failure(format!("resuming at byte {offset}: {e}")))?;
        match answer.status {
            StatusCode::PARTIAL_CONTENT => {
                let range = answer
                    .header(header::CONTENT_RANGE)
                    .and_then(parse_content_range);
                match range {
                    Some((start, total))
                        if start == offset && total.is_none_or(|t| t == self.size) =>
                    {
                        self.skip = 0;
                    }
                    _ => {
                        let what = answer.what.clone();
                        answer.discard().await;
                        return Err(self.failure(format!(
                            "{what}: a Content-Range that does not continue at byte {offset} of {}",
                            self.size
                        )));
                    }
                }
            }
            // The whole blob again: its first `offset` bytes were already passed on.
            StatusCode::OK if answer.content_length().is_none_or(|len| len == self.size) => {
                self.skip = offset;
            }
            StatusCode::OK => {
                let what = answer.what.clone();
                answer.discard().await;
                return Err(self.failure(format!("{what}: the blob changed size")));
            }
            _ => {
                let e = answer.fail(Subject::Blob(&self.repo, &self.digest)).await;
                return Err(self.failure(format!("resuming at byte {offset}: {e}")));
            }
        }
        tracing::debug!(request = %self.path, offset, resumption = self.resumptions, "blob download resumed");
        self.body = Some(answer.into_body());
        Ok(())
    }

    /// The end of the stream: nothing when the bytes are the blob, else the error.
    fn verify(&mut self) -> Option<io::Result<Bytes>> {
        let actual = self.hasher.take()?.finish();
        if actual == self.digest {
            return None;
        }
        let error = Error::Upstream {
            reason: format!(
                "{}: the blob served hashes to {actual}, not {}",
                self.path, self.digest
            ),
        };
        Some(Err(io::Error::new(io::ErrorKind::InvalidData, error)))
    }

    fn failure(&self, why: String) -> io::Error {
        let error = Error::Upstream {
            reason: format!("{}: {why}", self.path),
        };
        io::Error::other(error)
    }
}

/// `bytes START-END/TOTAL` (or `/*`): the start and, when known, the total size.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.trim().parse().ok()?, total))
}

#[cfg(test)]
mod tests {
    use super::parse_content_range;

    #[test]
    fn content_ranges_parse() {
        assert_eq!(parse_content_range("bytes 5-9/10"), Some((5, Some(10))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("bytes */10"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }
}
