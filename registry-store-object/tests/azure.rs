//! The behaviour suite, the model test and the three-instance test against Azurite (Azure Blob),
//! a real emulator on loopback (see `common`).

mod common;

emulator_tests!(
    "Azurite (Azure Blob)",
    common::create_azure_container,
    common::azure_client,
    common::azure_signer
);
