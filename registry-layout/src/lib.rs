//! # registry-layout
//!
//! OCI image layouts in and out of a [`registry_core::Registry`]: the `oci:` layout
//! directories that skopeo, umoci and buildah write (`oci-layout`, `index.json`,
//! `blobs/<algorithm>/<hex>`), and `oci-archive` tar files of them.
//!
//! - [`import_layout`] / [`import_archive`] (or [`import`], which picks by the path)
//!   push a layout's images into one repository: all tags or chosen ones, with index
//!   children and the referrers `index.json` lists, blobs streamed, every blob before
//!   any manifest, children before parents and tags last; a failure leaves only complete
//!   images and never deletes anything (see [`import_layout`]).
//! - [`export_layout`] / [`export_archive`] (or [`export`]) write repositories, chosen
//!   tags or the whole registry into a layout, with their referrers; an existing
//!   layout is added to.
//!
//! Preloading a registry for a test, in a few lines:
//!
//! ```
//! # use std::path::Path;
//! # fn make_layout(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
//! #     use registry_core::Digest;
//! #     let blobs = dir.join("blobs/sha256");
//! #     std::fs::create_dir_all(&blobs)?;
//! #     let config = br#"{"architecture":"amd64","os":"linux"}"#;
//! #     std::fs::write(blobs.join(Digest::sha256(config).hex()), config)?;
//! #     let manifest = format!(
//! #         r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[]}}"#,
//! #         Digest::sha256(config), config.len());
//! #     let digest = Digest::sha256(manifest.as_bytes());
//! #     std::fs::write(blobs.join(digest.hex()), &manifest)?;
//! #     std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
//! #     std::fs::write(dir.join("index.json"), format!(
//! #         r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"v1"}}}}]}}"#,
//! #         manifest.len()))?;
//! #     Ok(())
//! # }
//! use registry_core::{Reference, Registry, RepoName, Tag};
//! use registry_layout::{ImportOptions, import_layout};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let tmp = tempfile::tempdir()?;
//! # let layout = tmp.path().join("layout"); // made by `umoci`, `skopeo copy ... oci:DIR:v1`, ...
//! # make_layout(&layout)?;
//! let registry = Registry::in_memory();
//! let repo = RepoName::parse("demo/app")?;
//! let report = import_layout(&registry, &repo, &layout, &ImportOptions::default()).await?;
//! assert_eq!(report.tagged.len(), 1);
//!
//! let v1 = registry.get_manifest(&repo, &Reference::Tag(Tag::parse("v1")?)).await?;
//! assert_eq!(v1.meta.digest, report.tagged[0].1);
//! # Ok(())
//! # }
//! ```
//!
//! An integration test that preloads a layout into a registry on a loopback port and
//! pulls the image with an OCI client (here `oci-client`); the setup is the first five
//! lines:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // A layout to preload; a test keeps one beside its code (made by skopeo, umoci...).
//! # let tmp = tempfile::tempdir()?;
//! # let source = registry_core::Registry::in_memory();
//! # let app = registry_core::RepoName::parse("fixtures/app")?;
//! # registry_core::fixtures::image().layers([1024, 4096]).push(&source, &app, "v1").await?;
//! # let selection = registry_layout::ExportSelection::repository(app, Vec::new());
//! # registry_layout::export(&source, &selection, tmp.path(), &Default::default()).await?;
//! # let layout = tmp.path();
//! let registry = registry_core::Registry::in_memory();
//! let repo = registry_core::RepoName::parse("fixtures/app")?;
//! registry_layout::import(&registry, &repo, layout, &Default::default()).await?;
//! let server = registry_http::serve_local(registry, Default::default()).await?;
//! let image: oci_client::Reference = format!("{}/fixtures/app:v1", server.addr()).parse()?;
//!
//! let client = oci_client::Client::new(oci_client::client::ClientConfig {
//!     protocol: oci_client::client::ClientProtocol::Http,
//!     ..Default::default()
//! });
//! let anonymous = oci_client::secrets::RegistryAuth::Anonymous;
//! let layers = vec![oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE];
//! let pulled = client.pull(&image, &anonymous, layers).await?;
//! assert_eq!(pulled.layers.len(), 2);
//! # Ok(())
//! # }
//! ```
//!
//! Errors are [`LayoutError`]s naming the file at fault. Memory stays flat whatever the
//! blobs' sizes: blobs move a chunk at a time (manifests, bounded by the registry's
//! manifest limit, are read whole).

#![forbid(unsafe_code)]

mod archive;
mod error;
mod export;
mod format;
mod import;
mod plan;
mod sink;
mod stream;

use std::path::Path;

use registry_core::{Registry, RepoName};

pub use error::LayoutError;
pub use export::{
    ExportOptions, ExportReport, ExportSelection, RefNames, RepoSelection, export_archive,
    export_layout,
};
pub use format::REF_NAME;
pub use import::{ImportOptions, ImportReport, import_layout};

/// Whether `path` names an `oci-archive` (it ends in `.tar`) rather than a layout
/// directory.
pub fn is_archive(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "tar")
}

/// Imports the `oci-archive` `archive` into `repo`, like [`import_layout`].
///
/// The archive's layout files are first unpacked into a staging directory (under
/// [`ImportOptions::staging_dir`], removed afterwards): a tar's entries come in the
/// writer's order, and an import needs to check the whole layout first and then push
/// children before parents. Links, `..` and absolute names in the archive are refused.
pub async fn import_archive(
    registry: &Registry,
    repo: &RepoName,
    archive: impl AsRef<Path>,
    options: &ImportOptions,
) -> Result<ImportReport, LayoutError> {
    let archive = archive.as_ref().to_owned();
    let staging = match &options.staging_dir {
        Some(dir) => tempfile::Builder::new()
            .prefix(".oci-archive-")
            .tempdir_in(dir),
        None => tempfile::Builder::new().prefix("oci-archive-").tempdir(),
    }
    .map_err(|e| {
        let dir = options
            .staging_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        LayoutError::io(dir, e)
    })?;
    let into = staging.path().to_owned();
    let from = archive.clone();
    tokio::task::spawn_blocking(move || archive::extract(&from, &into))
        .await
        .map_err(|e| LayoutError::io(&archive, std::io::Error::other(e)))??;
    let result = import_layout(registry, repo, staging.path(), options).await;
    // Errors name files in the staging directory, which is gone once this returns:
    // name the archive instead.
    result.map_err(|e| {
        e.map_paths(|p| match p.strip_prefix(staging.path()) {
            Ok(rel) => format!("{}:{}", archive.display(), rel.display()).into(),
            Err(_) => p,
        })
    })
}

/// Imports a layout directory, or an `oci-archive` if `path` ends in `.tar`.
pub async fn import(
    registry: &Registry,
    repo: &RepoName,
    path: impl AsRef<Path>,
    options: &ImportOptions,
) -> Result<ImportReport, LayoutError> {
    let path = path.as_ref();
    match is_archive(path) {
        true => import_archive(registry, repo, path, options).await,
        false => import_layout(registry, repo, path, options).await,
    }
}

/// Exports into a layout directory, or an `oci-archive` if `path` ends in `.tar`.
pub async fn export(
    registry: &Registry,
    selection: &ExportSelection,
    path: impl AsRef<Path>,
    options: &ExportOptions,
) -> Result<ExportReport, LayoutError> {
    let path = path.as_ref();
    match is_archive(path) {
        true => export_archive(registry, selection, path, options).await,
        false => export_layout(registry, selection, path, options).await,
    }
}
