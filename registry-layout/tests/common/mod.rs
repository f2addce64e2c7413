//! Shared by the integration tests: content pushed into a registry, snapshots of a
//! registry's state, layouts read back.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use registry_core::{
    AllowAll, Digest, ListOptions, PutManifestOptions, Reference, Registry, RepoName, Tag,
    media_type,
};

pub fn repo(s: &str) -> RepoName {
    RepoName::parse(s).unwrap()
}

pub fn tag(s: &str) -> Tag {
    Tag::parse(s).unwrap()
}

pub async fn blob(registry: &Registry, repo: &RepoName, bytes: &[u8]) -> (Digest, u64) {
    let d = Digest::sha256(bytes);
    let body = stream::iter([Ok(Bytes::copy_from_slice(bytes))]).boxed();
    registry
        .put_blob(repo, &d, Some(bytes.len() as u64), body)
        .await
        .unwrap();
    (d, bytes.len() as u64)
}

pub async fn manifest(
    registry: &Registry,
    repo: &RepoName,
    media_type: &str,
    json: String,
    tag: Option<&str>,
) -> (Digest, u64) {
    let d = Digest::sha256(json.as_bytes());
    let reference = match tag {
        Some(t) => Reference::Tag(Tag::parse(t).unwrap()),
        None => Reference::Digest(d.clone()),
    };
    let size = json.len() as u64;
    registry
        .put_manifest(
            repo,
            &reference,
            media_type,
            Bytes::from(json),
            PutManifestOptions::default(),
        )
        .await
        .unwrap();
    (d, size)
}

fn desc(media_type: &str, (d, size): &(Digest, u64)) -> String {
    format!(r#"{{"mediaType":"{media_type}","digest":"{d}","size":{size}}}"#)
}

/// An image manifest, optionally a referrer of `subject`.
pub fn image_json(
    config: &(Digest, u64),
    layers: &[(Digest, u64)],
    subject: Option<&(Digest, u64)>,
    artifact_type: Option<&str>,
) -> String {
    let layers: Vec<String> = layers
        .iter()
        .map(|l| desc("application/vnd.oci.image.layer.v1.tar", l))
        .collect();
    let mut extra = String::new();
    if let Some(s) = subject {
        extra.push_str(&format!(
            r#","subject":{}"#,
            desc(media_type::OCI_MANIFEST, s)
        ));
    }
    if let Some(a) = artifact_type {
        extra.push_str(&format!(r#","artifactType":"{a}""#));
    }
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{},"layers":[{}]{extra}}}"#,
        media_type::OCI_MANIFEST,
        desc("application/vnd.oci.image.config.v1+json", config),
        layers.join(",")
    )
}

/// What [`populate`] pushed.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub index: Digest,
    pub amd64: Digest,
    pub arm64: Digest,
    /// Referrer of the index.
    pub sbom: Digest,
    /// Referrer of the amd64 image.
    pub signature: Digest,
    /// Referrer of the sbom.
    pub sbom_signature: Digest,
    pub other: Digest,
}

/// `demo/app`: a two-platform index tagged `v1` and `latest`, its amd64 image tagged
/// `amd64`, an SBOM of the index, a signature of the amd64 image and a signature of the
/// SBOM (untagged referrers). `demo/other`: one image tagged `v2` sharing a layer.
pub async fn populate(registry: &Registry) -> Fixture {
    let app = repo("demo/app");
    let base = blob(registry, &app, &vec![7u8; 70_000]).await;
    let mut images = Vec::new();
    for arch in ["amd64", "arm64"] {
        let config = format!(r#"{{"architecture":"{arch}","os":"linux"}}"#);
        let config = blob(registry, &app, config.as_bytes()).await;
        let layer = blob(
            registry,
            &app,
            format!("layer for {arch}").repeat(5000).as_bytes(),
        )
        .await;
        let json = image_json(&config, &[base.clone(), layer], None, None);
        let tag = (arch == "amd64").then_some("amd64");
        images.push(manifest(registry, &app, media_type::OCI_MANIFEST, json, tag).await);
    }
    let children: Vec<String> = images
        .iter()
        .zip(["amd64", "arm64"])
        .map(|((d, size), arch)| {
            format!(
                r#"{{"mediaType":"{}","digest":"{d}","size":{size},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#,
                media_type::OCI_MANIFEST
            )
        })
        .collect();
    let index_json = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{}]}}"#,
        media_type::OCI_INDEX,
        children.join(",")
    );
    let index = manifest(
        registry,
        &app,
        media_type::OCI_INDEX,
        index_json,
        Some("v1"),
    )
    .await;
    registry
        .tag_manifest(&app, &tag("latest"), &index.0)
        .await
        .unwrap();

    let empty = blob(registry, &app, b"{}").await;
    let referrer = |subject: &(Digest, u64), kind: &str, body: &str| {
        let (registry, app, empty) = (registry.clone(), app.clone(), empty.clone());
        let (subject, kind, body) = (subject.clone(), kind.to_owned(), body.to_owned());
        async move {
            let payload = blob(&registry, &app, body.as_bytes()).await;
            let mut json = image_json(&empty, &[payload], Some(&subject), Some(&kind));
            json = json.replace(
                r#""mediaType":"application/vnd.oci.image.config.v1+json""#,
                &format!(r#""mediaType":"{}""#, media_type::OCI_EMPTY),
            );
            manifest(&registry, &app, media_type::OCI_MANIFEST, json, None).await
        }
    };
    let sbom = referrer(&index, "application/vnd.example.sbom", "sbom of the index").await;
    let signature = referrer(&images[0], "application/vnd.example.sig", "sig of amd64").await;
    let sbom_signature = referrer(&sbom, "application/vnd.example.sig", "sig of the sbom").await;

    let other = repo("demo/other");
    let base2 = blob(registry, &other, &vec![7u8; 70_000]).await;
    let config = blob(registry, &other, br#"{"os":"linux"}"#).await;
    let json = image_json(&config, &[base2], None, None);
    let other_image = manifest(registry, &other, media_type::OCI_MANIFEST, json, Some("v2")).await;
    Fixture {
        index: index.0,
        amd64: images[0].0.clone(),
        arm64: images[1].0.clone(),
        sbom: sbom.0,
        signature: signature.0,
        sbom_signature: sbom_signature.0,
        other: other_image.0,
    }
}

/// Everything observable about a registry's content: its counts, and every tag of
/// every repository with its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub stats: registry_core::store::MetaStats,
    pub tags: BTreeMap<String, Digest>,
}

pub async fn snapshot(registry: &Registry) -> Snapshot {
    let stats = registry.storage().metadata.stats().await.unwrap();
    let mut tags = BTreeMap::new();
    let repos = registry
        .list_repositories(&ListOptions::default(), &AllowAll)
        .await
        .unwrap();
    for r in repos.items {
        let page = registry
            .list_tags(&r, &ListOptions::default())
            .await
            .unwrap();
        for t in page.items {
            let m = registry
                .stat_manifest(&r, &Reference::Tag(t.clone()))
                .await
                .unwrap();
            tags.insert(format!("{r}:{t}"), m.digest);
        }
    }
    Snapshot { stats, tags }
}

/// Referrer digests of `subject` in `repo`, sorted.
pub async fn referrers(registry: &Registry, repo: &RepoName, subject: &Digest) -> Vec<Digest> {
    let page = registry
        .referrers(repo, subject, None, &ListOptions::default())
        .await
        .unwrap();
    let mut out: Vec<Digest> = page.items.into_iter().map(|d| d.digest).collect();
    out.sort();
    out
}

/// `index.json` of a layout: (ref name or "", digest) for each entry.
pub fn index_entries(layout: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(layout.join("index.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["annotations"][registry_layout::REF_NAME]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
                m["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Copies a directory tree (files and directories only).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
