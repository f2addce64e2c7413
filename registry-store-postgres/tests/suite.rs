//! The shared behaviour suite, the model-based test and the collection stress test with
//! the metadata in a real PostgreSQL (blobs in memory: this crate stores only metadata).

use std::sync::Arc;

use registry_core::testkit::{Fixture, model, stress};
use registry_core::{MemoryBlobStore, Storage};

mod common;

async fn fixture() -> Fixture {
    let url = common::fresh_database().await;
    let metadata = registry_store_postgres::connect(&url)
        .await
        .expect("connect");
    let storage = Storage {
        blobs: Arc::new(MemoryBlobStore::default()),
        metadata: Arc::new(metadata),
    };
    Fixture::new(storage, url)
}

registry_core::behaviour_suite!(fixture);

/// Random operation sequences against the store and a trivial model (fewer cases than
/// in memory: each case creates a database).
#[test]
fn model_based() {
    let cases = std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    model::run(cases, fixture);
}

/// Concurrent pushers, deleters, tag movers and a zero-window collector on one
/// database, every push racing refused pushes of the same bytes; prints the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_collection_under_load() {
    let f = fixture().await;
    let report = stress::run(
        f.storage.clone(),
        stress::StressConfig {
            pushers: 4,
            images_per_pusher: 10,
            ..Default::default()
        },
    )
    .await;
    println!("stress (PostgreSQL): {report:?}");
    assert!(report.pushes > 0 && report.collections > 0);
    assert!(report.refused_immutable + report.refused_quota > 0 && report.lost == 0);
}

/// Two processes' worth of stores (two pools) on one database see each other's
/// changes at once: nothing is cached in the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_database_share_everything() {
    use registry_core::testkit::{push_image, repo, tag_ref};
    let url = common::fresh_database().await;
    let blobs: Arc<MemoryBlobStore> = Arc::default();
    let open = || async {
        let storage = Storage {
            blobs: blobs.clone(),
            metadata: Arc::new(registry_store_postgres::connect(&url).await.unwrap()),
        };
        registry_core::Registry::builder(storage).build()
    };
    let (a, b) = (open().await, open().await);
    let r = repo("shared/app");
    let (digest, _) = push_image(&a, &r, "v1", b"{\"a\":1}", &[b"layer"]).await;
    let got = b.get_manifest(&r, &tag_ref("v1")).await.unwrap();
    assert_eq!(got.meta.digest, digest);
    b.delete_manifest(&r, &tag_ref("v1")).await.unwrap();
    assert!(a.get_manifest(&r, &tag_ref("v1")).await.is_err());
}
