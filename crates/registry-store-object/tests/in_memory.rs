//! The shared behaviour suite and the model test against object_store's `InMemory`
//! (the same adapter code as against S3 and Azure; see `emulators.rs` for those).

use std::sync::Arc;

use object_store::memory::InMemory;
use registry_core::testkit::{Fixture, model, stress};
use registry_store_object::BucketStore;

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
/// instance; see `registry_core::testkit::stress::run_shared` for what is checked.
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
}
