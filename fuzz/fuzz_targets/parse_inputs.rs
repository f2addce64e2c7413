//! Names, tags, digests, references and upload ids: never a panic; what parses prints
//! back the same (Display, `as_str`, serde), and `FromStr` agrees with `parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_core::{Digest, Reference, RepoName, Tag, UploadId};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let json = serde_json::to_string(s).expect("a str serialises");
    match Digest::parse(s) {
        Ok(d) => {
            assert_eq!(d.as_str(), s);
            assert_eq!(d.to_string(), s);
            assert_eq!(d.hex().len(), d.algorithm().hex_len());
            assert_eq!(serde_json::from_str::<Digest>(&json).ok(), Some(d));
        }
        Err(_) => assert!(serde_json::from_str::<Digest>(&json).is_err()),
    }
    match RepoName::parse(s) {
        Ok(n) => {
            assert_eq!(n.as_str(), s);
            assert_eq!(n.to_string(), s);
            assert_eq!(s.parse::<RepoName>().ok(), Some(n.clone()));
            assert_eq!(serde_json::from_str::<RepoName>(&json).ok(), Some(n));
        }
        Err(_) => assert!(serde_json::from_str::<RepoName>(&json).is_err()),
    }
    match Tag::parse(s) {
        Ok(t) => {
            assert_eq!(t.as_str(), s);
            assert_eq!(t.to_string(), s);
            assert_eq!(serde_json::from_str::<Tag>(&json).ok(), Some(t));
        }
        Err(_) => assert!(serde_json::from_str::<Tag>(&json).is_err()),
    }
    if let Ok(r) = Reference::parse(s) {
        assert_eq!(r.to_string(), s);
        // A reference is exactly one of the two, chosen by the `:`.
        assert_eq!(r.as_digest().is_some(), s.contains(':'));
    }
    if let Some(id) = UploadId::parse(s) {
        assert_eq!(id.as_str(), s);
        assert_eq!(id.to_string(), s);
    }
});
