//! Reading: [`ImageSource`] for [`RemoteRegistry`], and the manifest requests the sink
//! shares.

use async_trait::async_trait;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, StatusCode, Uri};
use registry_core::manifest::{ManifestInfo, essence, media_type};
use registry_core::{
    BlobBody, BlobInfo, Descriptor, Digest, Error, ImageSource, ListOptions, Manifest,
    ManifestMeta, Page, Reference, RepoName, Result, Tag,
};

use crate::RemoteRegistry;
use crate::auth::{Access, scopes};
use crate::client::{Answer, Call, Subject, upstream};
use crate::url::{next_link, query_param};

/// The manifest types this client reads, OCI first; `*/*` last so that a registry
/// still answers with what it has (an artifact type, say) rather than 404.
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
                      application/vnd.oci.image.index.v1+json, \
                      application/vnd.docker.distribution.manifest.v2+json, \
                      application/vnd.docker.distribution.manifest.list.v2+json, \
                      */*";

const DIGEST_HEADER: HeaderName = HeaderName::from_static("docker-content-digest");

/// A listing body (tags, referrers) is refused beyond this size.
const LISTING_LIMIT: u64 = 16 * 1024 * 1024;

impl RemoteRegistry {
    fn manifest_call(
        &self,
        method: Method,
        repo: &RepoName,
        reference: &Reference,
        access: Access,
    ) -> Result<Call> {
        let uri = self
            .inner
            .url(&format!("/v2/{repo}/manifests/{reference}"))?;
        Ok(Call::new(method, uri, scopes(repo, access))
            .header(header::ACCEPT, HeaderValue::from_static(ACCEPT)))
    }

    /// `HEAD` of a manifest: `None` when the registry does not have it.
    pub(crate) async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        access: Access,
    ) -> Result<Option<Answer>> {
        let call = self.manifest_call(Method::HEAD, repo, reference, access)?;
        let answer = self.inner.send(call).await?;
        match answer.status {
            StatusCode::OK => Ok(Some(answer)),
            StatusCode::NOT_FOUND => {
                answer.discard().await;
                Ok(None)
            }
            _ => Err(answer.fail(Subject::Manifest(repo, reference)).await),
        }
    }

    /// A manifest's metadata from a `HEAD`, falling back to a `GET` when the registry
    /// does not say its digest (for a tag) or size.
    pub(crate) async fn manifest_meta(
        &self,
        repo: &RepoName,
        reference: &Reference,
        access: Access,
    ) -> Result<ManifestMeta> {
        let Some(answer) = self.head_manifest(repo, reference, access).await? else {
            return Err(Error::ManifestUnknown {
                reference: reference.to_string(),
            });
        };
        let said = answer
            .header(DIGEST_HEADER)
            .and_then(|d| Digest::parse(d.trim()).ok());
        let digest = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => said,
        };
        let media_type = answer
            .header(header::CONTENT_TYPE)
            .map(|t| essence(t).to_owned())
            .filter(|t| !t.is_empty());
        let size = answer.content_length();
        answer.discard().await;
        match (digest, media_type, size) {
            (Some(digest), Some(media_type), Some(size)) => {
                if size > self.inner.config.max_manifest_size {
                    return Err(Error::TooLarge {
                        what: "manifest",
                        limit: self.inner.config.max_manifest_size,
                    });
                }
                Ok(ManifestMeta {
                    digest,
                    media_type,
                    size,
                })
            }
            _ => Ok(self.fetch_manifest(repo, reference, access).await?.meta),
        }
    }

    /// A manifest's exact bytes, bounded in size and verified: against the reference
    /// when it is a digest, else against the registry's `Docker-Content-Digest` when it
    /// sends one.
    pub(crate) async fn fetch_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        access: Access,
    ) -> Result<Manifest> {
        let call = self.manifest_call(Method::GET, repo, reference, access)?;
        let answer = self.inner.send(call).await?;
        if answer.status != StatusCode::OK {
            return Err(answer.fail(Subject::Manifest(repo, reference)).await);
        }
        let what = answer.what.clone();
        let said = answer.header(DIGEST_HEADER).map(str::to_owned);
        let content_type = answer
            .header(header::CONTENT_TYPE)
            .map(|t| essence(t).to_owned())
            .unwrap_or_default();
        let bytes = answer
            .read(self.inner.config.max_manifest_size, "manifest")
            .await?;
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => match said {
                Some(s) => Some(Digest::parse(s.trim()).map_err(|_| {
                    upstream(format!("{what}: invalid Docker-Content-Digest {s:?}"))
                })?),
                None => None,
            },
        };
        let digest = match expected {
            Some(expected) => {
                let actual = Digest::compute(expected.algorithm(), &bytes);
                if actual != expected {
                    return Err(upstream(format!(
                        "{what}: the manifest served hashes to {actual}, not {expected}"
                    )));
                }
                expected
            }
            None => Digest::sha256(&bytes),
        };
        // Without a Content-Type the document says what it is (as a registry reads a
        // push without one).
        let media_type = if content_type.is_empty() || content_type == "application/octet-stream" {
            ManifestInfo::inspect("", &bytes)
                .map(|info| info.media_type)
                .map_err(|e| upstream(format!("{what}: manifest without a media type: {e}")))?
        } else {
            content_type
        };
        Ok(Manifest {
            meta: ManifestMeta {
                digest,
                media_type,
                size: bytes.len() as u64,
            },
            bytes,
        })
    }

    /// `HEAD` of a blob: its size, or `None` when the registry does not have it.
    pub(crate) async fn head_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        access: Access,
    ) -> Result<Option<u64>> {
        let uri = self.inner.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        let call = Call::new(Method::HEAD, uri, scopes(repo, access)).follow_redirects();
        let answer = self.inner.send(call).await?;
        match answer.status {
            StatusCode::OK => {
                let size = answer.content_length();
                let what = answer.what.clone();
                answer.discard().await;
                size.map(Some)
                    .ok_or_else(|| upstream(format!("{what} answered without a Content-Length")))
            }
            StatusCode::NOT_FOUND => {
                answer.discard().await;
                Ok(None)
            }
            _ => Err(answer.fail(Subject::Blob(repo, digest)).await),
        }
    }

    /// A listing URL: the first page from `path` with `n` and `last`, or a later page
    /// from the `Link` target a previous page ended with (kept in `last`, see
    /// [`page_of`]).
    fn listing_url(&self, path: &str, options: &ListOptions) -> Result<Uri> {
        if let Some(last) = &options.last
            && is_link(last)
        {
            let uri = crate::url::resolve(&self.inner.config.base, last)
                .map_err(|e| upstream(format!("next page {e}")))?;
            if !self.inner.config.origin.contains(&uri) {
                return Err(upstream("a next page on another host is not followed"));
            }
            return Ok(uri);
        }
        let mut uri = self.inner.url(path)?;
        if let Some(n) = options.n {
            uri = crate::url::with_query(&uri, "n", &n.to_string()).map_err(upstream)?;
        }
        if let Some(last) = &options.last {
            uri = crate::url::with_query(&uri, "last", last).map_err(upstream)?;
        }
        Ok(uri)
    }
}

/// Whether a `last` is a next-page link kept by [`page_of`]: tags and digests never
/// contain `/`, so never start with it or with a scheme.
fn is_link(last: &str) -> bool {
    last.starts_with('/') || last.starts_with("http://") || last.starts_with("https://")
}

/// Where the next page starts, from the `Link` header: its `last` parameter, or, for a
/// registry paging with an opaque cursor instead, the link itself (see [`is_link`]).
fn page_of(answer: &Answer) -> Option<String> {
    let link = next_link(&answer.headers)?;
    let target = crate::url::resolve(&answer.uri, &link).ok()?;
    Some(query_param(&target, "last").unwrap_or_else(|| {
        target
            .path_and_query()
            .map_or_else(|| link.clone(), |p| p.as_str().to_owned())
    }))
}

#[derive(serde::Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

#[derive(serde::Deserialize)]
struct ReferrersIndex {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[async_trait]
impl ImageSource for RemoteRegistry {
    async fn stat_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<ManifestMeta> {
        self.manifest_meta(repo, reference, Access::Pull).await
    }

    async fn get_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Manifest> {
        self.fetch_manifest(repo, reference, Access::Pull).await
    }

    async fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<BlobInfo> {
        match self.head_blob(repo, digest, Access::Pull).await? {
            Some(size) => Ok(BlobInfo {
                digest: digest.clone(),
                size,
            }),
            None => Err(Error::BlobUnknown {
                digest: digest.clone(),
            }),
        }
    }

    async fn get_blob(&self, repo: &RepoName, digest: &Digest) -> Result<BlobBody> {
        crate::blob::get_blob(self.clone(), repo.clone(), digest.clone()).await
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        options: &ListOptions,
    ) -> Result<Page<Descriptor>> {
        let uri = self.listing_url(&format!("/v2/{repo}/referrers/{subject}"), options)?;
        let call = Call::new(Method::GET, uri, scopes(repo, Access::Pull)).header(
            header::ACCEPT,
            HeaderValue::from_static(media_type::OCI_INDEX),
        );
        let answer = self.inner.send(call).await?;
        match answer.status {
            StatusCode::OK => {}
            // A registry without the referrers API (or without the repository) has no
            // referrers to give.
            StatusCode::NOT_FOUND => {
                answer.discard().await;
                return Ok(Page {
                    items: Vec::new(),
                    next: None,
                });
            }
            _ => return Err(answer.fail(Subject::Repo(repo)).await),
        }
        let next = page_of(&answer);
        let what = answer.what.clone();
        let body = answer.read(LISTING_LIMIT, "referrers index").await?;
        let index: ReferrersIndex = serde_json::from_slice(&body)
            .map_err(|e| upstream(format!("{what}: not a referrers index: {e}")))?;
        Ok(Page {
            items: index.manifests,
            next,
        })
    }

    async fn list_tags(&self, repo: &RepoName, options: &ListOptions) -> Result<Page<Tag>> {
        let uri = self.listing_url(&format!("/v2/{repo}/tags/list"), options)?;
        let call = Call::new(Method::GET, uri, scopes(repo, Access::Pull));
        let answer = self.inner.send(call).await?;
        if answer.status != StatusCode::OK {
            return Err(answer.fail(Subject::Repo(repo)).await);
        }
        let next = page_of(&answer);
        let what = answer.what.clone();
        let body = answer.read(LISTING_LIMIT, "tag list").await?;
        let list: TagList = serde_json::from_slice(&body)
            .map_err(|e| upstream(format!("{what}: not a tag list: {e}")))?;
        let items = list
            .tags
            .unwrap_or_default()
            .iter()
            .map(|t| Tag::parse(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| upstream(format!("{what}: {e}")))?;
        Ok(Page { items, next })
    }
}
