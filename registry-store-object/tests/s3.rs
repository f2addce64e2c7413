//! The behaviour suite, the model test and the three-instance test against moto (S3),
//! a real emulator on loopback (see `common`).

mod common;

emulator_tests!(
    "moto (S3)",
    common::create_s3_bucket,
    common::s3_client,
    common::s3_signer
);
