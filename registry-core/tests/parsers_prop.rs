//! Property tests for every parser of hostile input in the core: digests, repository
//! names, tags, references, upload ids and manifest inspection.
//!
//! Each parser is checked three ways: it never panics on arbitrary text; what it accepts
//! agrees with an independent reading of the grammars of the OCI distribution and image
//! specs (a differential oracle, written differently from the parser on purpose); and
//! what it accepts prints back exactly as it came in (the registry stores and serves
//! these strings verbatim).

use proptest::prelude::*;
use registry_core::{
    Algorithm, Digest, ManifestInfo, ManifestKind, Reference, RepoName, Tag, UploadId, media_type,
};

/// Strings near the digest grammar: right and wrong algorithms, separators, lengths and
/// cases, so that the interesting boundaries are hit often.
fn digestish() -> impl Strategy<Value = String> {
    prop_oneof![
        "(sha256|sha512|md5|SHA256|sha256\\+b64|)(:|::|)[0-9a-fA-Fg]{0,130}",
        "sha256:[0-9a-f]{63,65}",
        "sha512:[0-9a-f]{127,129}",
        "\\PC{0,80}",
    ]
}

/// The digest grammar this registry accepts (`sha256:` and 64, or `sha512:` and 128,
/// lowercase hex digits), as an oracle.
fn digest_oracle(s: &str) -> bool {
    let Some((alg, hex)) = s.split_once(':') else {
        return false;
    };
    let want = match alg {
        "sha256" => 64,
        "sha512" => 128,
        _ => return false,
    };
    hex.len() == want && hex.chars().all(|c| "0123456789abcdef".contains(c))
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, read as "separators only between alphanumeric
/// runs": split at every separator character and check the pieces.
fn component_oracle(c: &str) -> bool {
    if c.is_empty()
        || !c
            .chars()
            .all(|x| matches!(x, 'a'..='z' | '0'..='9' | '.' | '_' | '-'))
    {
        return false;
    }
    let alnum = |x: char| x.is_ascii_lowercase() || x.is_ascii_digit();
    let starts_and_ends_alnum = c.starts_with(alnum) && c.ends_with(alnum);
    // Maximal runs of separator characters between the alphanumeric runs.
    let seps: Vec<&str> = c.split(alnum).filter(|s| !s.is_empty()).collect();
    starts_and_ends_alnum
        && seps
            .iter()
            .all(|s| *s == "." || *s == "_" || *s == "__" || s.chars().all(|x| x == '-'))
}

fn name_oracle(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.split('/').all(component_oracle)
}

fn tag_oracle(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() || c == '_' => {}
        _ => return false,
    }
    s.len() <= 128 && chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn nameish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._/-]{0,40}",
        "[a-z0-9]{1,6}((\\.|_|__|-{1,3})[a-z0-9]{1,6}){0,3}(/[a-z0-9]{1,6}((\\.|_|__|-{1,3})[a-z0-9]{1,6}){0,2}){0,3}",
        "[a-z]{250,260}",
        "\\PC{0,60}",
    ]
}

fn tagish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_.:/-]{0,20}",
        "[a-zA-Z0-9_][a-zA-Z0-9._-]{120,130}",
        "\\PC{0,40}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn digest_parse_agrees_with_the_grammar_and_round_trips(s in digestish()) {
        let parsed = Digest::parse(&s);
        prop_assert_eq!(parsed.is_ok(), digest_oracle(&s), "{:?}: {:?}", s, parsed);
        if let Ok(d) = parsed {
            prop_assert_eq!(d.to_string(), s.clone());
            prop_assert_eq!(d.hex().len(), d.algorithm().hex_len());
            prop_assert_eq!(format!("{}:{}", d.algorithm(), d.hex()), s.clone());
            prop_assert_eq!(s.parse::<Digest>().unwrap(), d.clone());
            let json = serde_json::to_string(&d).unwrap();
            prop_assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        } else {
            // serde refuses what parse refuses: no back door through JSON.
            let json = serde_json::to_string(&s).unwrap();
            prop_assert!(serde_json::from_str::<Digest>(&json).is_err());
        }
    }

    #[test]
    fn computed_digests_parse_back(data in proptest::collection::vec(any::<u8>(), 0..256), sha512 in any::<bool>()) {
        let alg = if sha512 { Algorithm::Sha512 } else { Algorithm::Sha256 };
        let d = Digest::compute(alg, &data);
        prop_assert!(d.verify(&data));
        prop_assert_eq!(Digest::parse(d.as_str()).unwrap(), d.clone());
        // Upper-case hex names the same hash but is not the canonical form: refused.
        let upper = format!("{}:{}", alg, d.hex().to_uppercase());
        prop_assert_eq!(Digest::parse(&upper).is_ok(), !d.hex().chars().any(|c| c.is_ascii_alphabetic()));
    }

    #[test]
    fn repo_name_parse_agrees_with_the_grammar_and_round_trips(s in nameish()) {
        let parsed = RepoName::parse(&s);
        prop_assert_eq!(parsed.is_ok(), name_oracle(&s), "{:?}: {:?}", s, parsed);
        if let Ok(n) = parsed {
            prop_assert_eq!(n.to_string(), s.clone());
            prop_assert_eq!(n.as_str(), s.as_str());
            let json = serde_json::to_string(&n).unwrap();
            prop_assert_eq!(serde_json::from_str::<RepoName>(&json).unwrap(), n);
        }
    }

    #[test]
    fn valid_names_compose(a in nameish(), b in nameish()) {
        let joined = format!("{a}/{b}");
        if RepoName::parse(&a).is_ok() && RepoName::parse(&b).is_ok() {
            prop_assert_eq!(RepoName::parse(&joined).is_ok(), joined.len() <= 255);
        }
    }

    #[test]
    fn tag_parse_agrees_with_the_grammar_and_round_trips(s in tagish()) {
        let parsed = Tag::parse(&s);
        prop_assert_eq!(parsed.is_ok(), tag_oracle(&s), "{:?}: {:?}", s, parsed);
        if let Ok(t) = parsed {
            prop_assert_eq!(t.to_string(), s.clone());
            let json = serde_json::to_string(&t).unwrap();
            prop_assert_eq!(serde_json::from_str::<Tag>(&json).unwrap(), t);
        }
    }

    #[test]
    fn references_are_exactly_tags_or_digests(s in prop_oneof![tagish(), digestish()]) {
        match Reference::parse(&s) {
            Ok(r) => {
                prop_assert_eq!(r.to_string(), s.clone());
                match &r {
                    Reference::Tag(t) => prop_assert_eq!(t.as_str(), s.as_str()),
                    Reference::Digest(d) => prop_assert_eq!(d.as_str(), s.as_str()),
                }
                prop_assert_eq!(r.as_digest().is_some(), s.contains(':'));
            }
            Err(_) => {
                prop_assert!(!tag_oracle(&s) && !digest_oracle(&s), "{:?} refused", s);
            }
        }
    }

    #[test]
    fn upload_ids_round_trip(s in "\\PC{0,70}") {
        match UploadId::parse(&s) {
            Some(id) => {
                prop_assert_eq!(id.as_str(), s.as_str());
                prop_assert!(s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            }
            None => prop_assert!(s.is_empty() || s.len() > 64 || s.bytes().any(|b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))),
        }
    }
}

const CONTENT_TYPES: [&str; 8] = [
    "",
    media_type::OCI_MANIFEST,
    media_type::OCI_INDEX,
    media_type::DOCKER_MANIFEST,
    media_type::DOCKER_MANIFEST_LIST,
    media_type::OCI_ARTIFACT_MANIFEST,
    "application/vnd.example+json",
    "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
];

fn descriptor(d: &Digest, size: u64) -> String {
    format!(
        r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{size}}}"#
    )
}

/// An image manifest over `config` and `layers` (blob contents), and the digests it
/// references.
fn image(config: &[u8], layers: &[Vec<u8>]) -> (String, Vec<Digest>) {
    let mut refs: Vec<Digest> = layers.iter().map(|l| Digest::sha256(l)).collect();
    refs.push(Digest::sha256(config));
    let layers: Vec<String> = layers
        .iter()
        .map(|l| descriptor(&Digest::sha256(l), l.len() as u64))
        .collect();
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
        media_type::OCI_MANIFEST,
        Digest::sha256(config),
        config.len(),
        layers.join(",")
    );
    refs.sort();
    refs.dedup();
    (m, refs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn inspection_never_panics_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        ct in 0usize..CONTENT_TYPES.len(),
    ) {
        if let Ok(info) = ManifestInfo::inspect(CONTENT_TYPES[ct], &bytes) {
            // Whatever it accepts is a JSON object.
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            prop_assert!(v.is_object());
            let _ = info.blob_references();
        }
    }

    #[test]
    fn inspection_finds_exactly_the_references_of_an_image(
        config in proptest::collection::vec(any::<u8>(), 0..16),
        layers in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), 0..6),
    ) {
        let (m, refs) = image(&config, &layers);
        for ct in ["", media_type::OCI_MANIFEST, "application/vnd.oci.image.manifest.v1+json ; x=y"] {
            let info = ManifestInfo::inspect(ct, m.as_bytes()).unwrap();
            prop_assert_eq!(info.kind, ManifestKind::Image);
            prop_assert_eq!(info.media_type.as_str(), media_type::OCI_MANIFEST);
            prop_assert_eq!(info.blob_references(), refs.clone());
            prop_assert!(info.manifest_references().is_empty());
        }
        // The document disagrees with any other known Content-Type.
        prop_assert!(ManifestInfo::inspect(media_type::OCI_INDEX, m.as_bytes()).is_err());
        prop_assert!(ManifestInfo::inspect(media_type::DOCKER_MANIFEST, m.as_bytes()).is_err());
    }

    #[test]
    fn inspection_finds_exactly_the_children_of_an_index(
        children in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), 0..6),
    ) {
        let mut want: Vec<Digest> = children.iter().map(|c| Digest::sha256(c)).collect();
        let entries: Vec<String> = children
            .iter()
            .map(|c| descriptor(&Digest::sha256(c), c.len() as u64))
            .collect();
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{}]}}"#,
            media_type::OCI_INDEX,
            entries.join(",")
        );
        want.sort();
        want.dedup();
        let info = ManifestInfo::inspect(media_type::OCI_INDEX, m.as_bytes()).unwrap();
        prop_assert_eq!(info.kind, ManifestKind::Index);
        prop_assert_eq!(info.manifest_references(), want);
        prop_assert!(info.blob_references().is_empty());
    }

    #[test]
    fn damaged_manifests_are_refused_not_panicked_on(
        config in proptest::collection::vec(any::<u8>(), 0..8),
        layers in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), 1..4),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let (m, _) = image(&config, &layers);
        // A truncated manifest is never valid JSON, so never accepted.
        let short = &m.as_bytes()[..cut.index(m.len())];
        prop_assert!(ManifestInfo::inspect(media_type::OCI_MANIFEST, short).is_err());
        // One byte changed anywhere: accepted or refused, never a panic; if accepted,
        // every reference is still a valid digest.
        let mut damaged = m.clone().into_bytes();
        let at = flip.index(damaged.len());
        damaged[at] = byte;
        if let Ok(info) = ManifestInfo::inspect(media_type::OCI_MANIFEST, &damaged) {
            for d in info.blob_references() {
                prop_assert!(Digest::parse(d.as_str()).is_ok());
            }
        }
    }
}

/// Regression (fuzzing, `inspect_manifest`): invalid UTF-8 inside a string that serde
/// skips (an ignored field, or any field of an unknown media type) was accepted, so a
/// manifest that is not JSON could be stored and served.
#[test]
fn manifests_with_invalid_utf8_are_refused() {
    let (m, _) = image(b"{}", &[b"layer".to_vec()]);
    let ignored = m.replacen('{', "{\"x-ignored\":\"\u{1}\",", 1);
    let mut bad = ignored.into_bytes();
    let at = bad.iter().position(|&b| b == 1).unwrap();
    bad[at] = 0xff;
    for ct in CONTENT_TYPES {
        assert!(
            ManifestInfo::inspect(ct, &bad).is_err(),
            "accepted invalid UTF-8 as {ct:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes inside a string value of an otherwise valid manifest: accepted
    /// only if the whole document is still valid JSON.
    #[test]
    fn accepted_manifests_are_json_whatever_their_strings_hold(
        junk in proptest::collection::vec(any::<u8>(), 0..12),
        ct in 0usize..CONTENT_TYPES.len(),
    ) {
        let (m, _) = image(b"{}", &[b"layer".to_vec()]);
        let mut doc = b"{\"x-ignored\":\"".to_vec();
        doc.extend_from_slice(&junk);
        doc.extend_from_slice(b"\",");
        doc.extend_from_slice(&m.as_bytes()[1..]);
        if ManifestInfo::inspect(CONTENT_TYPES[ct], &doc).is_ok() {
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&doc).is_ok());
        }
    }
}
