//! Test fixtures: images, multi-platform indexes, artifacts and signatures, described in
//! a line and pushed into a [`Registry`] in one call, for test harnesses and tool
//! authors who need a registry holding known content.
//!
//! ```
//! use registry_core::{Registry, RepoName, fixtures};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), registry_core::Error> {
//! let registry = Registry::in_memory();
//! let repo = RepoName::parse("demo/app")?;
//!
//! // Two layers of 1 KiB and 4 KiB, content drawn from seed 7: the same digests in
//! // every run.
//! let image = fixtures::image().layers([1024, 4096]).seed(7).push(&registry, &repo, "v1").await?;
//! assert_eq!(image.layers.len(), 2);
//!
//! // A multi-platform index, and a signature referring to it.
//! let index = fixtures::index()
//!     .platforms(["linux/amd64", "linux/arm64"])
//!     .push(&registry, &repo, "multi")
//!     .await?;
//! fixtures::signature(&index.index).push_untagged(&registry, &repo).await?;
//! let referrers = registry
//!     .referrers(&repo, &index.index.digest, None, &Default::default())
//!     .await?;
//! assert_eq!(referrers.items.len(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! Content is deterministic: the same description and seed give the same bytes, hence
//! the same digests, on every machine. Layer `i` of an image is drawn from `(seed, i)`,
//! so images described with the same seed share their first layers, as images built on
//! one base do. Layers are random bytes, not tar archives: clients that move content
//! (push, pull, copy, mount: oci-client, skopeo copy, oras, crane) handle them, a
//! runtime that unpacks layers does not; preload a real image with `registry-layout`
//! for that.
//!
//! Every fixture can also [`build`](ImageFixture::build) its bytes without a registry,
//! for pushing them through an HTTP client.
//!
//! No cargo feature gates this module: it needs no dependency beyond the core's own
//! and compiles in well under a second, and a test harness that forgets to enable a
//! feature is worse off than a library carrying a few unused functions.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{Descriptor, media_type};
use crate::names::{Reference, RepoName, Tag};
use crate::registry::{PutManifestOptions, Registry};
use crate::rng::{SplitMix64, derive};

/// Media type of fixture layers unless told otherwise: an uncompressed OCI layer.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of generated artifact blobs unless told otherwise.
pub const ARTIFACT_BLOB_MEDIA_TYPE: &str = "application/octet-stream";
/// Artifact type of [`signature`] fixtures: a Notary v2 signature.
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.cncf.notary.signature";
/// Media type of a [`signature`] fixture's blob (a JWS envelope, as Notation writes).
pub const SIGNATURE_MEDIA_TYPE: &str = "application/jose+json";

// Domains of derived seeds, so that layer 0 and artifact blob 0 of one seed differ.
const LAYER_STREAM: u64 = 1;
const CHILD_STREAM: u64 = 2;
const ARTIFACT_STREAM: u64 = 3;
const SIGNATURE_STREAM: u64 = 4;

/// Bytes and the descriptor that points at them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// Media type, digest (sha256) and size.
    pub descriptor: Descriptor,
    /// The bytes.
    pub bytes: Bytes,
}

impl Blob {
    /// A blob of `bytes` with media type `media_type`.
    pub fn new(media_type: &str, bytes: impl Into<Bytes>) -> Blob {
        let bytes = bytes.into();
        Blob {
            descriptor: descriptor(media_type, &bytes),
            bytes,
        }
    }
}

fn descriptor(media_type: &str, bytes: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest: Digest::sha256(bytes),
        size: bytes.len() as u64,
        artifact_type: None,
        annotations: BTreeMap::new(),
        urls: Vec::new(),
    }
}

/// `size` bytes drawn from `seed`.
fn random_bytes(seed: u64, size: usize) -> Bytes {
    let mut buf = vec![0u8; size];
    SplitMix64::new(seed).fill(&mut buf);
    Bytes::from(buf)
}

/// Where an image runs, as an index entry's `platform` says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Platform {
    /// CPU architecture (`amd64`, `arm64`, ...).
    pub architecture: String,
    /// Operating system (`linux`, `windows`, ...).
    pub os: String,
    /// CPU variant (`v7` for `linux/arm/v7`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/architecture[/variant]`, as `docker --platform` takes it.
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &&str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        match parts[..] {
            [os, arch] if [os, arch].iter().all(ok) => Ok(Platform {
                architecture: arch.into(),
                os: os.into(),
                variant: None,
            }),
            [os, arch, variant] if [os, arch, variant].iter().all(ok) => Ok(Platform {
                architecture: arch.into(),
                os: os.into(),
                variant: Some(variant.into()),
            }),
            _ => Err(Error::ManifestInvalid {
                reason: format!("platform {s:?} is not os/architecture[/variant]"),
            }),
        }
    }
}

impl Default for Platform {
    fn default() -> Self {
        Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

// ----- JSON documents (structs, not maps: the field order, hence the digest, does not
// depend on serde_json's `preserve_order` feature being on somewhere in the build) -----

#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: &'a [Digest],
}

#[derive(Serialize)]
struct ImageConfig<'a> {
    architecture: &'a str,
    os: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    rootfs: RootFs<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ImageManifestDoc<'a> {
    schema_version: u32,
    media_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    artifact_type: Option<&'a str>,
    config: &'a Descriptor,
    layers: Vec<&'a Descriptor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a Descriptor>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry<'a> {
    media_type: &'a str,
    digest: &'a Digest,
    size: u64,
    platform: &'a Platform,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexDoc<'a> {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<IndexEntry<'a>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

fn to_json(doc: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(doc).expect("fixture documents serialise"))
}

/// A subject descriptor as manifests carry it: media type, digest and size only.
fn subject_of(d: &Descriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        artifact_type: None,
        annotations: BTreeMap::new(),
        urls: Vec::new(),
    }
}

/// Where a fixture's manifest goes: under a tag, or by digest only.
fn reference_for(tag: Option<&Tag>, digest: &Digest) -> Reference {
    match tag {
        Some(t) => Reference::Tag(t.clone()),
        None => Reference::Digest(digest.clone()),
    }
}

async fn push_blob(registry: &Registry, repo: &RepoName, blob: &Blob) -> Result<()> {
    let body = futures::stream::iter([Ok(blob.bytes.clone())]).boxed();
    registry
        .put_blob(
            repo,
            &blob.descriptor.digest,
            Some(blob.descriptor.size),
            body,
        )
        .await?;
    Ok(())
}

async fn push_manifest(
    registry: &Registry,
    repo: &RepoName,
    tag: Option<&Tag>,
    manifest: &Blob,
) -> Result<()> {
    registry
        .put_manifest(
            repo,
            &reference_for(tag, &manifest.descriptor.digest),
            &manifest.descriptor.media_type,
            manifest.bytes.clone(),
            PutManifestOptions::default(),
        )
        .await?;
    Ok(())
}

// ----- images -----

/// Describes an OCI image. Defaults: one layer of 1 KiB, seed 0, `linux/amd64`.
pub fn image() -> ImageFixture {
    ImageFixture {
        seed: 0,
        layers: vec![LayerSpec::Random(1024)],
        platform: Platform::default(),
        layer_media_type: LAYER_MEDIA_TYPE.into(),
        annotations: BTreeMap::new(),
    }
}

#[derive(Debug, Clone)]
enum LayerSpec {
    Random(usize),
    Given(Bytes),
}

/// An image description; see [`image`].
#[derive(Debug, Clone)]
pub struct ImageFixture {
    seed: u64,
    layers: Vec<LayerSpec>,
    platform: Platform,
    layer_media_type: String,
    annotations: BTreeMap<String, String>,
}

/// An image's bytes: config, layers and manifest ([`ImageFixture::build`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageContent {
    /// The config blob.
    pub config: Blob,
    /// The layers, in order.
    pub layers: Vec<Blob>,
    /// The manifest (an OCI image manifest).
    pub manifest: Blob,
    /// The platform its config names.
    pub platform: Platform,
}

/// An image pushed by [`ImageFixture::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedImage {
    /// Where it was pushed.
    pub repo: RepoName,
    /// The tag it was pushed under (`None`: by digest only).
    pub tag: Option<Tag>,
    /// The manifest's descriptor: use it as a referrer's subject, or as
    /// `Reference::Digest(manifest.digest)` to pull it.
    pub manifest: Descriptor,
    /// The manifest's exact bytes.
    pub manifest_bytes: Bytes,
    /// The config blob's descriptor.
    pub config: Descriptor,
    /// The layers' descriptors, in order.
    pub layers: Vec<Descriptor>,
    /// The platform its config names.
    pub platform: Platform,
}

impl PushedImage {
    /// A reference to the manifest by digest.
    pub fn reference(&self) -> Reference {
        Reference::Digest(self.manifest.digest.clone())
    }
}

impl ImageFixture {
    /// Replaces the layers with random ones of these sizes, in bytes (drawn from the
    /// seed: layer `i` from `(seed, i)`).
    pub fn layers(mut self, sizes: impl IntoIterator<Item = usize>) -> Self {
        self.layers = sizes.into_iter().map(LayerSpec::Random).collect();
        self
    }
    /// Adds a layer with exactly these bytes (after the ones described so far).
    pub fn layer_bytes(mut self, bytes: impl Into<Bytes>) -> Self {
        self.layers.push(LayerSpec::Given(bytes.into()));
        self
    }
    /// Sets the seed random layers are drawn from (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Sets the platform the config names (`os/architecture[/variant]`, default
    /// `linux/amd64`); an invalid one is reported by [`build`](Self::build) and `push`.
    pub fn platform(mut self, platform: &str) -> Self {
        self.platform = Platform::parse(platform).unwrap_or(Platform {
            architecture: String::new(),
            os: platform.to_owned(),
            variant: None,
        });
        self
    }
    /// Sets the layers' media type (default [`LAYER_MEDIA_TYPE`]).
    pub fn layer_media_type(mut self, media_type: &str) -> Self {
        self.layer_media_type = media_type.to_owned();
        self
    }
    /// Adds a manifest annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    /// The image's bytes, without pushing them anywhere.
    pub fn build(&self) -> Result<ImageContent> {
        if self.platform.architecture.is_empty() {
            return Err(Error::ManifestInvalid {
                reason: format!(
                    "platform {:?} is not os/architecture[/variant]",
                    self.platform.os
                ),
            });
        }
        let layers: Vec<Blob> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let bytes = match spec {
                    LayerSpec::Random(size) => {
                        random_bytes(derive(&[self.seed, LAYER_STREAM, i as u64]), *size)
                    }
                    LayerSpec::Given(b) => b.clone(),
                };
                Blob::new(&self.layer_media_type, bytes)
            })
            .collect();
        // Uncompressed layers: each one's diff id is its own digest.
        let diff_ids: Vec<Digest> = layers.iter().map(|l| l.descriptor.digest.clone()).collect();
        let config = Blob::new(
            "application/vnd.oci.image.config.v1+json",
            to_json(&ImageConfig {
                architecture: &self.platform.architecture,
                os: &self.platform.os,
                variant: self.platform.variant.as_deref(),
                rootfs: RootFs {
                    kind: "layers",
                    diff_ids: &diff_ids,
                },
            }),
        );
        let manifest = Blob::new(
            media_type::OCI_MANIFEST,
            to_json(&ImageManifestDoc {
                schema_version: 2,
                media_type: media_type::OCI_MANIFEST,
                artifact_type: None,
                config: &config.descriptor,
                layers: layers.iter().map(|l| &l.descriptor).collect(),
                subject: None,
                annotations: &self.annotations,
            }),
        );
        Ok(ImageContent {
            config,
            layers,
            manifest,
            platform: self.platform.clone(),
        })
    }

    /// Pushes the image (config, layers, then the manifest) into `repo` under `tag`.
    pub async fn push(
        &self,
        registry: &Registry,
        repo: &RepoName,
        tag: &str,
    ) -> Result<PushedImage> {
        let tag = Tag::parse(tag)?;
        self.push_as(registry, repo, Some(tag)).await
    }

    /// Pushes the image into `repo` by digest only (untagged).
    pub async fn push_untagged(&self, registry: &Registry, repo: &RepoName) -> Result<PushedImage> {
        self.push_as(registry, repo, None).await
    }

    async fn push_as(
        &self,
        registry: &Registry,
        repo: &RepoName,
        tag: Option<Tag>,
    ) -> Result<PushedImage> {
        let content = self.build()?;
        content.push_into(registry, repo, tag).await
    }
}

impl ImageContent {
    async fn push_into(
        self,
        registry: &Registry,
        repo: &RepoName,
        tag: Option<Tag>,
    ) -> Result<PushedImage> {
        push_blob(registry, repo, &self.config).await?;
        for layer in &self.layers {
            push_blob(registry, repo, layer).await?;
        }
        push_manifest(registry, repo, tag.as_ref(), &self.manifest).await?;
        Ok(PushedImage {
            repo: repo.clone(),
            tag,
            manifest: self.manifest.descriptor,
            manifest_bytes: self.manifest.bytes,
            config: self.config.descriptor,
            layers: self.layers.into_iter().map(|l| l.descriptor).collect(),
            platform: self.platform,
        })
    }
}

// ----- indexes -----

/// Describes a multi-platform OCI image index. Defaults: `linux/amd64` and
/// `linux/arm64`, each an image of one 1 KiB layer, seed 0.
pub fn index() -> IndexFixture {
    IndexFixture {
        seed: 0,
        platforms: Vec::new(),
        images: Vec::new(),
        layers: vec![1024],
        annotations: BTreeMap::new(),
    }
}

/// An index description; see [`index`].
#[derive(Debug, Clone)]
pub struct IndexFixture {
    seed: u64,
    platforms: Vec<String>,
    images: Vec<ImageFixture>,
    layers: Vec<usize>,
    annotations: BTreeMap<String, String>,
}

/// An index's bytes and its children's ([`IndexFixture::build`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexContent {
    /// The child images, in index order.
    pub images: Vec<ImageContent>,
    /// The index manifest.
    pub index: Blob,
}

/// An index pushed by [`IndexFixture::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedIndex {
    /// Where it was pushed.
    pub repo: RepoName,
    /// The tag it was pushed under (`None`: by digest only).
    pub tag: Option<Tag>,
    /// The index's descriptor.
    pub index: Descriptor,
    /// The index's exact bytes.
    pub index_bytes: Bytes,
    /// The child images (pushed by digest, before the index), in index order.
    pub images: Vec<PushedImage>,
}

impl IndexFixture {
    /// Adds a generated child image for `platform` (`os/architecture[/variant]`), with
    /// the layer sizes of [`layers`](Self::layers) and content drawn from the index's
    /// seed and the child's position: every platform has its own layers.
    pub fn platform(mut self, platform: &str) -> Self {
        self.platforms.push(platform.to_owned());
        self
    }
    /// [`platform`](Self::platform) for each of `platforms`.
    pub fn platforms<'a>(mut self, platforms: impl IntoIterator<Item = &'a str>) -> Self {
        self.platforms
            .extend(platforms.into_iter().map(str::to_owned));
        self
    }
    /// Adds a child described in full (its platform is the image's). Children added
    /// this way come after the generated ones.
    pub fn image(mut self, image: ImageFixture) -> Self {
        self.images.push(image);
        self
    }
    /// Layer sizes of the generated children (default one layer of 1 KiB).
    pub fn layers(mut self, sizes: impl IntoIterator<Item = usize>) -> Self {
        self.layers = sizes.into_iter().collect();
        self
    }
    /// Sets the seed of the generated children (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Adds an annotation to the index.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    fn children(&self) -> Vec<ImageFixture> {
        let platforms: Vec<&str> = if self.platforms.is_empty() && self.images.is_empty() {
            vec!["linux/amd64", "linux/arm64"]
        } else {
            self.platforms.iter().map(String::as_str).collect()
        };
        let generated = platforms.into_iter().enumerate().map(|(i, p)| {
            image()
                .platform(p)
                .layers(self.layers.iter().copied())
                .seed(derive(&[self.seed, CHILD_STREAM, i as u64]))
        });
        generated.chain(self.images.iter().cloned()).collect()
    }

    /// The index's bytes and its children's, without pushing them anywhere.
    pub fn build(&self) -> Result<IndexContent> {
        let images = self
            .children()
            .iter()
            .map(ImageFixture::build)
            .collect::<Result<Vec<_>>>()?;
        let index = Blob::new(
            media_type::OCI_INDEX,
            to_json(&IndexDoc {
                schema_version: 2,
                media_type: media_type::OCI_INDEX,
                manifests: images
                    .iter()
                    .map(|c| IndexEntry {
                        media_type: &c.manifest.descriptor.media_type,
                        digest: &c.manifest.descriptor.digest,
                        size: c.manifest.descriptor.size,
                        platform: &c.platform,
                    })
                    .collect(),
                annotations: &self.annotations,
            }),
        );
        Ok(IndexContent { images, index })
    }

    /// Pushes the children (by digest), then the index under `tag`.
    pub async fn push(
        &self,
        registry: &Registry,
        repo: &RepoName,
        tag: &str,
    ) -> Result<PushedIndex> {
        let tag = Tag::parse(tag)?;
        self.push_as(registry, repo, Some(tag)).await
    }

    /// Pushes the children, then the index by digest only.
    pub async fn push_untagged(&self, registry: &Registry, repo: &RepoName) -> Result<PushedIndex> {
        self.push_as(registry, repo, None).await
    }

    async fn push_as(
        &self,
        registry: &Registry,
        repo: &RepoName,
        tag: Option<Tag>,
    ) -> Result<PushedIndex> {
        let content = self.build()?;
        let mut images = Vec::with_capacity(content.images.len());
        for child in content.images {
            images.push(child.push_into(registry, repo, None).await?);
        }
        push_manifest(registry, repo, tag.as_ref(), &content.index).await?;
        Ok(PushedIndex {
            repo: repo.clone(),
            tag,
            index: content.index.descriptor,
            index_bytes: content.index.bytes,
            images,
        })
    }
}

// ----- artifacts and signatures -----

/// Describes an OCI artifact of `artifact_type` (an image manifest with
/// `artifactType`, the empty config, and its blobs as layers), with no blob unless
/// told otherwise (it then carries the empty descriptor as its one layer, as
/// image-spec 1.1 recommends).
pub fn artifact(artifact_type: &str) -> ArtifactFixture {
    ArtifactFixture {
        artifact_type: artifact_type.to_owned(),
        seed: 0,
        blobs: Vec::new(),
        subject: None,
        annotations: BTreeMap::new(),
        stream: ARTIFACT_STREAM,
    }
}

/// Describes a signature of `subject` as registries see one: a Notary v2 signature
/// artifact ([`SIGNATURE_ARTIFACT_TYPE`]) whose subject is `subject`, holding one
/// [`SIGNATURE_MEDIA_TYPE`] blob. The blob names the subject's digest but is not a
/// real signature: verifiers will reject it, registries and copy tools carry it.
pub fn signature(subject: &Descriptor) -> ArtifactFixture {
    let mut a = artifact(SIGNATURE_ARTIFACT_TYPE);
    a.stream = SIGNATURE_STREAM;
    a.blobs.push(ArtifactBlob::Signature);
    a.subject(subject)
}

#[derive(Debug, Clone)]
enum ArtifactBlob {
    Random {
        media_type: String,
        size: usize,
    },
    Given(Blob),
    /// The signature envelope: made at build time from the subject and the seed.
    Signature,
}

/// An artifact description; see [`artifact`] and [`signature`].
#[derive(Debug, Clone)]
pub struct ArtifactFixture {
    artifact_type: String,
    seed: u64,
    blobs: Vec<ArtifactBlob>,
    subject: Option<Descriptor>,
    annotations: BTreeMap<String, String>,
    stream: u64,
}

/// An artifact's bytes ([`ArtifactFixture::build`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactContent {
    /// The empty config (`{}`).
    pub config: Blob,
    /// Its blobs (the manifest's layers).
    pub blobs: Vec<Blob>,
    /// The manifest.
    pub manifest: Blob,
}

/// An artifact pushed by [`ArtifactFixture::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedArtifact {
    /// Where it was pushed.
    pub repo: RepoName,
    /// The tag it was pushed under (`None`: by digest only, as referrers usually are).
    pub tag: Option<Tag>,
    /// The manifest's descriptor, with its artifact type.
    pub manifest: Descriptor,
    /// The manifest's exact bytes.
    pub manifest_bytes: Bytes,
    /// The blobs' descriptors.
    pub blobs: Vec<Descriptor>,
    /// The subject's digest, if it is a referrer.
    pub subject: Option<Digest>,
}

impl ArtifactFixture {
    /// Makes it a referrer of `subject` (listed by the referrers API under
    /// `subject.digest`; the subject need not be pushed first).
    pub fn subject(mut self, subject: &Descriptor) -> Self {
        self.subject = Some(subject_of(subject));
        self
    }
    /// Adds a blob with exactly these bytes.
    pub fn blob(mut self, media_type: &str, bytes: impl Into<Bytes>) -> Self {
        self.blobs
            .push(ArtifactBlob::Given(Blob::new(media_type, bytes)));
        self
    }
    /// Adds random blobs of these sizes ([`ARTIFACT_BLOB_MEDIA_TYPE`]), drawn from the
    /// seed.
    pub fn blobs(mut self, sizes: impl IntoIterator<Item = usize>) -> Self {
        self.blobs
            .extend(sizes.into_iter().map(|size| ArtifactBlob::Random {
                media_type: ARTIFACT_BLOB_MEDIA_TYPE.into(),
                size,
            }));
        self
    }
    /// Sets the seed random blobs are drawn from (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Adds a manifest annotation (shown in the referrers listing).
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    /// The artifact's bytes, without pushing them anywhere.
    pub fn build(&self) -> Result<ArtifactContent> {
        let config = Blob::new(media_type::OCI_EMPTY, Bytes::from_static(b"{}"));
        let blobs: Vec<Blob> = self
            .blobs
            .iter()
            .enumerate()
            .map(|(i, b)| match b {
                ArtifactBlob::Random { media_type, size } => Blob::new(
                    media_type,
                    random_bytes(derive(&[self.seed, self.stream, i as u64]), *size),
                ),
                ArtifactBlob::Given(blob) => blob.clone(),
                ArtifactBlob::Signature => {
                    let mut rng = SplitMix64::new(derive(&[self.seed, self.stream, i as u64]));
                    let sig: String = (0..4).map(|_| format!("{:016x}", rng.next_u64())).collect();
                    let subject = self
                        .subject
                        .as_ref()
                        .map(|s| s.digest.to_string())
                        .unwrap_or_default();
                    Blob::new(
                        SIGNATURE_MEDIA_TYPE,
                        format!(
                            r#"{{"payload":"{subject}","protected":"fixture","signature":"{sig}"}}"#
                        ),
                    )
                }
            })
            .collect();
        let layers = if blobs.is_empty() {
            vec![&config.descriptor]
        } else {
            blobs.iter().map(|b| &b.descriptor).collect()
        };
        let manifest = Blob::new(
            media_type::OCI_MANIFEST,
            to_json(&ImageManifestDoc {
                schema_version: 2,
                media_type: media_type::OCI_MANIFEST,
                artifact_type: Some(&self.artifact_type),
                config: &config.descriptor,
                layers,
                subject: self.subject.as_ref(),
                annotations: &self.annotations,
            }),
        );
        Ok(ArtifactContent {
            config,
            blobs,
            manifest,
        })
    }

    /// Pushes the artifact (blobs, then the manifest) into `repo` under `tag`.
    pub async fn push(
        &self,
        registry: &Registry,
        repo: &RepoName,
        tag: &str,
    ) -> Result<PushedArtifact> {
        let tag = Tag::parse(tag)?;
        self.push_as(registry, repo, Some(tag)).await
    }

    /// Pushes the artifact into `repo` by digest only, as referrers usually are.
    pub async fn push_untagged(
        &self,
        registry: &Registry,
        repo: &RepoName,
    ) -> Result<PushedArtifact> {
        self.push_as(registry, repo, None).await
    }

    async fn push_as(
        &self,
        registry: &Registry,
        repo: &RepoName,
        tag: Option<Tag>,
    ) -> Result<PushedArtifact> {
        let content = self.build()?;
        push_blob(registry, repo, &content.config).await?;
        for blob in &content.blobs {
            push_blob(registry, repo, blob).await?;
        }
        push_manifest(registry, repo, tag.as_ref(), &content.manifest).await?;
        let mut manifest = content.manifest.descriptor;
        manifest.artifact_type = Some(self.artifact_type.clone());
        Ok(PushedArtifact {
            repo: repo.clone(),
            tag,
            manifest,
            manifest_bytes: content.manifest.bytes,
            blobs: content.blobs.into_iter().map(|b| b.descriptor).collect(),
            subject: self.subject.as_ref().map(|s| s.digest.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ListOptions;

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    #[test]
    fn same_description_same_bytes() {
        let a = image().layers([10, 2000]).seed(7).build().unwrap();
        let b = image().layers([10, 2000]).seed(7).build().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.layers[0].bytes.len(), 10);
        assert_eq!(a.layers[1].descriptor.size, 2000);
        // Another seed: other layers. Same seed, more layers: the first ones shared.
        let c = image().layers([10, 2000]).seed(8).build().unwrap();
        assert_ne!(a.layers[0], c.layers[0]);
        let d = image().layers([10, 2000, 5]).seed(7).build().unwrap();
        assert_eq!(a.layers[..2], d.layers[..2]);
        assert_ne!(a.manifest, d.manifest);
        // The manifest is what the registry itself would accept and inspect.
        let info =
            crate::ManifestInfo::inspect(media_type::OCI_MANIFEST, &a.manifest.bytes).unwrap();
        assert_eq!(info.layers.len(), 2);
        assert!(Platform::parse("linux").is_err());
        assert!(image().platform("nope").build().is_err());
        assert_eq!(
            Platform::parse("linux/arm/v7").unwrap().to_string(),
            "linux/arm/v7"
        );
    }

    #[tokio::test]
    async fn push_image_index_artifact_and_signature() {
        let registry = Registry::in_memory();
        let r = repo("fixtures/all");
        let img = image()
            .layers([1024, 4096])
            .seed(7)
            .push(&registry, &r, "v1")
            .await
            .unwrap();
        let got = registry
            .get_manifest(&r, &Reference::Tag(Tag::parse("v1").unwrap()))
            .await
            .unwrap();
        assert_eq!(got.bytes, img.manifest_bytes);
        assert_eq!(got.meta.digest, img.manifest.digest);
        for layer in img.layers.iter().chain([&img.config]) {
            assert_eq!(
                registry.stat_blob(&r, &layer.digest).await.unwrap().size,
                layer.size
            );
        }

        let idx = index()
            .platforms(["linux/amd64", "linux/arm/v7"])
            .layers([100, 200])
            .seed(3)
            .push(&registry, &r, "multi")
            .await
            .unwrap();
        assert_eq!(idx.images.len(), 2);
        assert_ne!(idx.images[0].layers, idx.images[1].layers);
        assert_eq!(idx.images[1].platform.variant.as_deref(), Some("v7"));
        let info = crate::ManifestInfo::inspect(media_type::OCI_INDEX, &idx.index_bytes).unwrap();
        assert_eq!(info.manifests.len(), 2);
        // Children are untagged: only the two tags exist.
        let tags = registry
            .list_tags(&r, &ListOptions::default())
            .await
            .unwrap();
        assert_eq!(tags.items.len(), 2);

        let sbom = artifact("application/spdx+json")
            .blob(
                "application/spdx+json",
                &b"{\"spdxVersion\":\"SPDX-2.3\"}"[..],
            )
            .subject(&img.manifest)
            .annotation("org.example.kind", "sbom")
            .push_untagged(&registry, &r)
            .await
            .unwrap();
        let sig = signature(&img.manifest)
            .push_untagged(&registry, &r)
            .await
            .unwrap();
        assert_eq!(sig.blobs.len(), 1);
        assert_eq!(sig.subject.as_ref(), Some(&img.manifest.digest));
        let refs = registry
            .referrers(&r, &img.manifest.digest, None, &ListOptions::default())
            .await
            .unwrap();
        let mut want = vec![sbom.manifest.digest.clone(), sig.manifest.digest.clone()];
        want.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        assert_eq!(
            refs.items
                .iter()
                .map(|d| d.digest.clone())
                .collect::<Vec<_>>(),
            want
        );
        let sigs = registry
            .referrers(
                &r,
                &img.manifest.digest,
                Some(SIGNATURE_ARTIFACT_TYPE),
                &ListOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(sigs.items.len(), 1);
        assert_eq!(
            sigs.items[0].artifact_type.as_deref(),
            Some(SIGNATURE_ARTIFACT_TYPE)
        );

        // An artifact without blobs carries the empty descriptor as its layer.
        let bare = artifact("application/vnd.example.marker").build().unwrap();
        let info =
            crate::ManifestInfo::inspect(media_type::OCI_MANIFEST, &bare.manifest.bytes).unwrap();
        assert_eq!(info.layers[0].media_type, media_type::OCI_EMPTY);
        // Bad tags are refused before anything is pushed.
        assert!(image().push(&registry, &r, "not a tag").await.is_err());
    }
}
