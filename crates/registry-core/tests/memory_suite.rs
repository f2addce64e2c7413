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
