//! Manifest inspection of arbitrary bytes under each known media type: never a panic;
//! what is accepted is a JSON object, every reference it reports is a valid digest, and
//! the media type it reports is the Content-Type's essence when one was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_core::manifest::essence;
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
        "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
    ] {
        if let Ok(info) = ManifestInfo::inspect(ct, data) {
            let v: serde_json::Value = serde_json::from_slice(data).expect("accepted, so JSON");
            assert!(v.is_object());
            if !ct.is_empty() {
                assert_eq!(info.media_type, essence(ct));
            }
            for d in info
                .blob_references()
                .iter()
                .chain(&info.manifest_references())
            {
                assert!(registry_core::Digest::parse(d.as_str()).is_ok());
            }
        }
    }
});
