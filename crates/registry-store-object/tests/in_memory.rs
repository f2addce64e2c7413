//! The shared behaviour suite and the model test against object_store's `InMemory`
//! (the same adapter code as against S3 and Azure; see `emulators.rs` for those).

use std::sync::Arc;

use object_store::memory::InMemory;
use registry_core::testkit::{Fixture, model};
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
