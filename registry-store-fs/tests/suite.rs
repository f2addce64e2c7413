//! The shared behaviour suite, the model-based test and the collection stress test on
//! a real redb file and real files in a temporary directory.

use registry_core::testkit::{Fixture, model, stress};
use registry_store_fs::FsStore;

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsStore::open(dir.path()).await.expect("open store");
    Fixture::new(store, dir)
}

registry_core::behaviour_suite!(fixture);

/// Random operation sequences against the store and a trivial model (fewer cases than
/// in memory: each case opens a fresh redb file and fsyncs every commit).
#[test]
fn model_based() {
    let cases = std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    model::run(cases, fixture);
}

/// Concurrent pushers, deleters, tag movers and a zero-window collector, every push
/// racing refused pushes of the same bytes (issue 16); prints the operation counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_collection_under_load() {
    let f = fixture().await;
    let report = stress::run(
        f.storage.clone(),
        stress::StressConfig {
            pushers: 4,
            images_per_pusher: 15,
            ..Default::default()
        },
    )
    .await;
    println!("stress (fs): {report:?}");
    assert!(report.pushes > 0 && report.collections > 0);
    assert!(report.refused_immutable + report.refused_quota > 0 && report.lost == 0);
}
