//! The behaviour suite, the model test and the three-instance test against Azurite (Azure Blob),
//! a real emulator on loopback (see `common`).

mod common;

use registry_core::testkit::{Fixture, model, stress};
use registry_store_object::BucketStore;

async fn fixture() -> Fixture {
    let bucket = common::unique_name();
    common::create_azure_container(&bucket);
    let store = BucketStore::open(common::azure_client(&bucket))
        .await
        .expect("open store");
    Fixture::new(store, bucket)
}

registry_core::behaviour_suite!(fixture);

#[test]
fn model_based() {
    let cases = std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    model::run(cases, fixture);
}

/// Three adapters, each with its own client, sharing nothing but the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_bucket() {
    let bucket = common::unique_name();
    common::create_azure_container(&bucket);
    let mut storages = Vec::new();
    for _ in 0..3 {
        let store = BucketStore::open(common::azure_client(&bucket))
            .await
            .expect("open store");
        storages.push(store.into_storage());
    }
    let report = stress::run_shared(
        storages,
        stress::StressConfig {
            pushers: 3,
            images_per_pusher: 3,
            collector_pause: std::time::Duration::from_millis(200),
            // A push to an emulator takes seconds; see `StressConfig::protection_window`.
            protection_window: std::time::Duration::from_secs(30),
            ..Default::default()
        },
    )
    .await;
    println!("three instances (Azurite (Azure Blob)): {report:?}");
    assert_eq!(report.pushes, 9);
    assert!(report.collections > 0);
}
