//! Manifest inspection of arbitrary bytes under each known media type: never a panic,
//! and every reference it reports is a valid digest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_core::{ManifestInfo, media_type};

fuzz_target!(|data: &[u8]| {
    for ct in [
        "",
        media_type::OCI_MANIFEST,
        media_type::OCI_INDEX,
        media_type::DOCKER_MANIFEST,
        media_type::DOCKER_MANIFEST_LIST,
        media_type::OCI_ARTIFACT_MANIFEST,
        "application/x-unknown+json",
    ] {
        if let Ok(info) = ManifestInfo::inspect(ct, data) {
            for d in info.blob_references().iter().chain(&info.manifest_references()) {
                assert!(registry_core::Digest::parse(d.as_str()).is_ok());
            }
        }
    }
});
