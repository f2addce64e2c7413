//! The shared behaviour suite and the model-based test on the in-memory store.

use registry_core::MemoryStore;
use registry_core::testkit::{Fixture, model};

async fn fixture() -> Fixture {
    Fixture::new(MemoryStore::new(), ())
}

registry_core::behaviour_suite!(fixture);

/// Random operation sequences against the store and a trivial model. `MODEL_CASES`
/// raises the number of cases for longer local runs.
#[test]
fn model_based() {
    let cases = std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    model::run(cases, fixture);
}

/// Concurrent pushers, deleters, tag movers and a zero-window collector, every push
/// racing refused pushes of the same bytes (issue 16); prints the operation counts.
/// Nothing acknowledged may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_collection_under_load() {
    let report = registry_core::testkit::stress::run(
        MemoryStore::new().into_storage(),
        registry_core::testkit::stress::StressConfig::default(),
    )
    .await;
    println!("stress (memory): {report:?}");
    assert!(report.pushes > 0 && report.collections > 0);
    assert!(report.refused_immutable + report.refused_quota > 0 && report.lost == 0);
}
