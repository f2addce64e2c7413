//! The shared behaviour suite every storage adapter must pass, and the model-based test.
//!
//! An adapter runs the whole suite with one line in an integration test:
//!
//! ```ignore
//! async fn fixture() -> registry_core::testkit::Fixture {
//!     let dir = tempfile::tempdir().unwrap();
//!     let store = my_store::open(dir.path()).await.unwrap();
//!     registry_core::testkit::Fixture::new(store.into_storage(), dir)
//! }
//! registry_core::behaviour_suite!(fixture);
//! ```
//!
//! The macro expands to one `#[tokio::test]` per behaviour (the caller needs `tokio`
//! with the `macros` and `rt-multi-thread` features as a dev-dependency). Every test
//! gets a fresh store from the fixture, and ends by deleting everything it made,
//! collecting with a zero window and asserting that the store is empty: no records, no
//! blobs, no upload sessions.

use std::any::Any;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream;

use crate::digest::Digest;
use crate::error::Error;
use crate::gc::GcOptions;
use crate::names::{Reference, RepoName, Tag};
use crate::registry::{ListOptions, PutManifestOptions, Registry, RegistryBuilder};
use crate::store::{ByteStream, MetaStats, Storage};
use crate::time::{ManualClock, Timestamp};

pub mod blob_suite;
pub mod collection_suite;
pub mod hooks;
pub(crate) mod interleave;
pub mod model;
pub mod outbox_suite;
pub mod policy_suite;
pub mod refusal_suite;
pub mod repo_suite;
pub mod stress;
pub mod suite;

/// A fresh, empty store for one test, and whatever must live as long as it (a temporary
/// directory, an emulator's bucket prefix...).
pub struct Fixture {
    /// The store under test.
    pub storage: Storage,
    /// Dropped after the test.
    pub guard: Box<dyn Any + Send>,
}

impl Fixture {
    /// A fixture over `storage`, keeping `guard` alive for the test's duration.
    pub fn new(storage: impl Into<Storage>, guard: impl Any + Send) -> Self {
        Fixture {
            storage: storage.into(),
            guard: Box::new(guard),
        }
    }

    /// A builder over this fixture's storage with a manual clock, so tests control time.
    pub fn builder(&self) -> (RegistryBuilder, ManualClock) {
        let clock = ManualClock::new(Timestamp(1_700_000_000_000));
        let builder = Registry::builder(self.storage.clone()).with_clock(Arc::new(clock.clone()));
        (builder, clock)
    }

    /// A registry with default settings and a manual clock.
    pub fn registry(&self) -> (Registry, ManualClock) {
        let (b, c) = self.builder();
        (b.build(), c)
    }
}

/// Parses a repository name (test helper; panics on invalid input).
pub fn repo(s: &str) -> RepoName {
    RepoName::parse(s).expect("valid repository name")
}

/// Parses a tag (test helper).
pub fn tag(s: &str) -> Tag {
    Tag::parse(s).expect("valid tag")
}

/// A tag reference (test helper).
pub fn tag_ref(s: &str) -> Reference {
    Reference::Tag(tag(s))
}

/// A body of the given chunks.
pub fn body(chunks: &[&[u8]]) -> ByteStream {
    let chunks: Vec<std::io::Result<Bytes>> = chunks
        .iter()
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    stream::iter(chunks).boxed()
}

/// Uploads `data` monolithically into `repo`; returns its digest.
pub async fn push_blob(registry: &Registry, repo: &RepoName, data: &[u8]) -> Digest {
    let d = Digest::sha256(data);
    registry
        .put_blob(repo, &d, Some(data.len() as u64), body(&[data]))
        .await
        .expect("blob push");
    d
}

/// Reads a whole blob of `repo`.
pub async fn read_blob(registry: &Registry, repo: &RepoName, d: &Digest) -> Result<Vec<u8>, Error> {
    let mut b = registry.get_blob(repo, d, None).await?;
    let mut out = Vec::new();
    while let Some(chunk) = b.stream.next().await {
        out.extend_from_slice(&chunk.map_err(Error::storage)?);
    }
    Ok(out)
}

/// An OCI image manifest referencing `config` and `layers` (given as their bytes).
pub fn image_manifest(config: &[u8], layers: &[&[u8]]) -> String {
    image_manifest_with(config, layers, None, None)
}

/// An OCI image manifest with an optional subject and artifact type.
pub fn image_manifest_with(
    config: &[u8],
    layers: &[&[u8]],
    subject: Option<(&Digest, u64)>,
    artifact_type: Option<&str>,
) -> String {
    let layers: Vec<String> = layers
        .iter()
        .map(|l| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}"#,
                Digest::sha256(l),
                l.len()
            )
        })
        .collect();
    let subject = subject
        .map(|(d, size)| {
            format!(
                r#","subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":{size}}}"#
            )
        })
        .unwrap_or_default();
    let artifact_type = artifact_type
        .map(|a| format!(r#","artifactType":"{a}""#))
        .unwrap_or_default();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]{}{},"annotations":{{"org.example.test":"yes"}}}}"#,
        Digest::sha256(config),
        config.len(),
        layers.join(","),
        subject,
        artifact_type
    )
}

/// An OCI image index listing `children` (digest, size).
pub fn index_manifest(children: &[(&Digest, u64)]) -> String {
    let children: Vec<String> = children
        .iter()
        .map(|(d, s)| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":{s}}}"#
            )
        })
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
        children.join(",")
    )
}

/// Pushes an image (config, layers, manifest) under `tag`; returns the manifest digest
/// and size.
pub async fn push_image(
    registry: &Registry,
    repo: &RepoName,
    tag_name: &str,
    config: &[u8],
    layers: &[&[u8]],
) -> (Digest, u64) {
    push_blob(registry, repo, config).await;
    for l in layers {
        push_blob(registry, repo, l).await;
    }
    let m = image_manifest(config, layers);
    let r = registry
        .put_manifest(
            repo,
            &tag_ref(tag_name),
            crate::manifest::media_type::OCI_MANIFEST,
            Bytes::from(m.clone()),
            PutManifestOptions::default(),
        )
        .await
        .expect("manifest push");
    (r.digest, m.len() as u64)
}

/// Deletes every manifest of every repository (indexes before their children), every
/// blob link, collects with a zero window, and asserts that storage is empty.
pub async fn assert_cleans_up(registry: &Registry) {
    let storage = registry.storage();
    for _round in 0..16 {
        let repos = registry
            .list_repositories(&ListOptions::default(), &crate::AllowAll)
            .await
            .expect("catalog");
        for r in &repos.items {
            let manifests = storage
                .metadata
                .list_manifests(r, None, usize::MAX)
                .await
                .expect("list manifests");
            for m in manifests {
                match registry
                    .delete_manifest(r, &Reference::Digest(m.digest.clone()))
                    .await
                {
                    // Children of an index go in a later round, after the index.
                    Ok(()) | Err(Error::InUse { .. }) | Err(Error::ManifestUnknown { .. }) => {}
                    Err(e) => panic!("deleting {} from {r}: {e}", m.digest),
                }
            }
        }
        let report = registry
            .collect_garbage(&GcOptions {
                window: Some(std::time::Duration::ZERO),
                orphans: true,
                ..GcOptions::default()
            })
            .await
            .expect("collect");
        if repos.items.is_empty()
            && report.blobs_deleted == 0
            && report.links_removed == 0
            && report.orphans_deleted == 0
        {
            break;
        }
    }
    for upload in storage.blobs.list_uploads().await.expect("list uploads") {
        storage
            .blobs
            .delete_upload(&upload.id)
            .await
            .expect("delete upload");
    }
    let audit = storage.metadata.audit(false).await.expect("audit");
    assert!(audit.problems.is_empty(), "audit: {:?}", audit.problems);
    let stats = storage.metadata.stats().await.expect("stats");
    assert_eq!(stats, MetaStats::default(), "metadata left behind");
    let blobs: Vec<_> = storage
        .blobs
        .list()
        .await
        .expect("list blobs")
        .collect()
        .await;
    assert!(blobs.is_empty(), "blob bytes left behind: {blobs:?}");
    assert!(
        storage
            .blobs
            .list_uploads()
            .await
            .expect("uploads")
            .is_empty(),
        "upload sessions left behind"
    );
}

/// Expands to one `#[tokio::test]` per behaviour of the shared suite, each calling
/// `$fixture().await` for a fresh store. See the [module docs](crate::testkit).
#[macro_export]
macro_rules! behaviour_suite {
    ($fixture:path) => {
        $crate::behaviour_suite!(@tests $fixture;
            blob_monolithic_round_trip,
            blob_chunked_upload,
            blob_sha512_upload,
            blob_range_reads,
            upload_offset_checks,
            upload_digest_mismatch_changes_nothing,
            upload_size_mismatch_changes_nothing,
            upload_unknown_and_wrong_repo,
            upload_cancel,
            upload_expiry,
            upload_resumes_without_hash_state,
            upload_session_limits,
            empty_upload_sessions_are_reclaimed_under_pressure,
            upload_sessions_are_limited_per_owner,
            blob_size_limit,
            blob_isolation_between_repositories,
            blob_delete_semantics,
            mount_with_and_without_source,
            manifest_round_trip,
            manifest_missing_blob_changes_nothing,
            manifest_too_large,
            manifest_content_type_mismatch,
            manifest_digest_reference_must_match,
            manifest_invalid_json,
            manifest_opaque_media_type,
            manifest_repush_is_idempotent,
            manifest_repush_restores_missing_bytes,
            manifest_descriptor_size_must_match,
            manifest_multi_tag_push,
            index_requires_children,
            delete_semantics,
            tag_listing_pagination,
            tag_lists_follow_every_change,
            catalog_pagination,
            referrers_and_filter,
            reference_counts,
            events_are_emitted,
            outbox_records_every_change,
            outbox_refused_change_records_nothing,
            outbox_concurrent_changes_are_numbered_once,
            outbox_consumers_and_trimming,
            collection_respects_protection,
            collection_policies,
            collection_finds_orphans,
            commit_refuses_a_session_that_grew,
            put_bytes_commits_in_one_call,
            race_upload_during_sweep,
            race_manifest_put_vs_link_collection,
            race_mount_vs_source_delete,
            race_tag_move_during_collection,
            race_two_collectors,
            race_collector_crash_mid_sweep,
            cleanup_leaves_store_empty,
            policy_immutable_tags,
            policy_read_only,
            policy_quota_boundary,
            policy_quota_concurrent,
            retention_keep_last_and_younger,
            retention_spares_immutable_tags,
            policy_sparse_manifests,
            race_refused_missing_blob_vs_accepted,
            race_refused_immutable_tag_vs_accepted,
            race_refused_quota_vs_accepted,
            race_refused_read_only_vs_accepted,
            race_refused_size_vs_accepted,
            delete_repository_removes_everything,
            delete_repository_refuses_immutable_tags,
            delete_repository_races_pushes,
            repository_listings,
            torn_writes_serve_nothing_partial,
        );
    };
    (@tests $fixture:path; $($name:ident),* $(,)?) => {
        mod behaviour_suite {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::testkit::suite::$name($fixture().await).await;
                }
            )*
        }
    };
}
