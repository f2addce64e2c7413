//! Media types, descriptors, and inspection of raw manifest bytes.
//!
//! The raw bytes are the manifest: they are stored and served exactly as received and
//! only read here to learn what they reference. Nothing is ever re-serialised.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::Error;

/// Well-known media types.
pub mod media_type {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// The OCI empty descriptor's media type (`{}`), used as an artifact's config.
    pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
    /// The short-lived OCI artifact manifest (image-spec 1.1 release candidates).
    pub const OCI_ARTIFACT_MANIFEST: &str = "application/vnd.oci.artifact.manifest.v1+json";
    /// Docker image manifest, schema 2.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image manifest, schema 1 (signed and unsigned): refused, see
    /// [`ManifestInfo::inspect`](super::ManifestInfo::inspect).
    pub const DOCKER_SCHEMA1: [&str; 2] = [
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    ];
    /// Docker foreign layer: lives at its `urls`, never in the registry.
    pub const DOCKER_FOREIGN_LAYER: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
}

/// A content descriptor as it appears in manifests and in the referrers index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Size in bytes of the referenced content.
    pub size: u64,
    /// Artifact type, on referrer descriptors and artifact manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Where non-distributable content may be fetched from instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

impl Descriptor {
    /// Whether the content lives outside the registry (a foreign layer with URLs), so
    /// the registry must not require it to be present.
    pub fn is_external(&self) -> bool {
        !self.urls.is_empty()
            && (self.media_type == media_type::DOCKER_FOREIGN_LAYER
                || self.media_type.contains(".nondistributable."))
    }
}

/// What kind of document a manifest is, as far as references are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestKind {
    /// References a config blob and layer blobs.
    Image,
    /// References child manifests.
    Index,
    /// A JSON document of a media type the registry does not interpret.
    Opaque,
}

/// What a manifest references and says about itself, learnt from its raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestInfo {
    /// The media type the manifest was pushed with (parameters removed).
    pub media_type: String,
    /// Image, index or opaque.
    pub kind: ManifestKind,
    /// The config descriptor of an image manifest.
    pub config: Option<Descriptor>,
    /// Layer (or artifact blob) descriptors.
    pub layers: Vec<Descriptor>,
    /// Child manifest descriptors of an index.
    pub manifests: Vec<Descriptor>,
    /// The manifest this one refers to (referrers API); it need not exist.
    pub subject: Option<Descriptor>,
    /// The manifest's `artifactType` field.
    pub artifact_type: Option<String>,
    /// The manifest's annotations.
    pub annotations: BTreeMap<String, String>,
}

/// The fields of any manifest-like JSON document we look at; unknown fields are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<serde_json::Value>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    blobs: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    artifact_type: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Strips parameters and whitespace from a `Content-Type` value.
pub fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// Visits every value of a JSON document without keeping any, so that numbers are
/// parsed (and out-of-range ones refused), which `serde::de::IgnoredAny` skips.
struct JsonCheck;

impl<'de> Deserialize<'de> for JsonCheck {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = JsonCheck;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<JsonCheck, E> {
                Ok(JsonCheck)
            }
            fn visit_i64<E>(self, _: i64) -> Result<JsonCheck, E> {
                Ok(JsonCheck)
            }
            fn visit_u64<E>(self, _: u64) -> Result<JsonCheck, E> {
                Ok(JsonCheck)
            }
            fn visit_f64<E>(self, _: f64) -> Result<JsonCheck, E> {
                Ok(JsonCheck)
            }
            fn visit_str<E>(self, _: &str) -> Result<JsonCheck, E> {
                Ok(JsonCheck)
            }
            fn visit_unit<E>(self) -> Result<JsonCheck, E> {
                Ok(JsonCheck)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<JsonCheck, A::Error> {
                while a.next_element::<JsonCheck>()?.is_some() {}
                Ok(JsonCheck)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<JsonCheck, A::Error> {
                while a.next_entry::<JsonCheck, JsonCheck>()?.is_some() {}
                Ok(JsonCheck)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Just enough of an unknown document to check that it is JSON and its media type.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    media_type: Option<String>,
}

fn kind_of(media_type: &str) -> ManifestKind {
    match media_type {
        media_type::OCI_MANIFEST
        | media_type::DOCKER_MANIFEST
        | media_type::OCI_ARTIFACT_MANIFEST => ManifestKind::Image,
        media_type::OCI_INDEX | media_type::DOCKER_MANIFEST_LIST => ManifestKind::Index,
        _ => ManifestKind::Opaque,
    }
}

/// Refuses what may not be stored as a manifest we do not understand: Docker schema 1
/// (its layers would be unprotected from collection, since we cannot read them; the
/// reference registry dropped it too) and any media type other than a well-formed
/// `application/` type whose subtype is JSON. Manifests are served back with the type
/// they were pushed with, so `text/html` or `image/svg+xml` would be stored XSS.
fn check_opaque(media_type: &str) -> Result<(), Error> {
    if media_type::DOCKER_SCHEMA1.contains(&media_type) {
        return Err(schema1_refused());
    }
    // RFC 6838 restricted names: a letter or digit, then up to 126 more of these.
    fn restricted_name(s: &str) -> bool {
        (1..=127).contains(&s.len())
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    }
    let json_application = match media_type.split_once('/') {
        Some((kind, subtype)) => {
            kind.eq_ignore_ascii_case("application")
                && restricted_name(subtype)
                && (subtype.eq_ignore_ascii_case("json")
                    || subtype.to_ascii_lowercase().ends_with("+json"))
        }
        None => false,
    };
    if !json_application {
        return Err(invalid(format!(
            "unsupported manifest media type {media_type:?}: expected an OCI or Docker \
             manifest type, or another application/...+json type"
        )));
    }
    Ok(())
}

fn schema1_refused() -> Error {
    invalid(
        "Docker schema 1 manifests are not supported; push schema 2 or OCI \
         (for example with `skopeo copy --format v2s2`)",
    )
}

fn check_agreement(declared: &str, inner: Option<&str>) -> Result<(), Error> {
    match inner {
        Some(inner) if inner != declared => Err(invalid(format!(
            "mediaType {inner:?} does not match Content-Type {declared:?}"
        ))),
        _ => Ok(()),
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::ManifestInvalid {
        reason: reason.into(),
    }
}

impl ManifestInfo {
    /// Inspects raw manifest bytes pushed with `content_type` (which may be empty).
    ///
    /// Known media types must have the fields their spec requires; unknown media types
    /// only need to be a JSON object. The media type inside the document, when present,
    /// must agree with the content type.
    pub fn inspect(content_type: &str, bytes: &[u8]) -> Result<Self, Error> {
        // serde derives also accept a JSON array for a struct; a manifest is an object.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(invalid("manifest is not a JSON object"));
        }
        // JSON is UTF-8 (RFC 8259), and serde_json does not check the strings it skips
        // (fields we ignore, whole documents of unknown types): check them all here.
        if std::str::from_utf8(bytes).is_err() {
            return Err(invalid("manifest is not UTF-8"));
        }
        // Also what serde skips unread (fields we ignore, opaque documents): a number
        // out of range (`1e999`) is JSON by grammar, but clients' parsers refuse it, so
        // such a manifest could be stored and never read back by anyone.
        serde_json::from_slice::<JsonCheck>(bytes)
            .map_err(|e| invalid(format!("manifest is not valid JSON: {e}")))?;
        let declared = essence(content_type);
        if !declared.is_empty() && kind_of(declared) == ManifestKind::Opaque {
            check_opaque(declared)?;
            let probe: Probe = serde_json::from_slice(bytes)
                .map_err(|e| invalid(format!("manifest is not valid JSON: {e}")))?;
            check_agreement(declared, probe.media_type.as_deref())?;
            return Ok(ManifestInfo::empty(
                declared.to_owned(),
                ManifestKind::Opaque,
            ));
        }
        let raw: RawManifest = match serde_json::from_slice(bytes) {
            Ok(raw) => raw,
            Err(e) if e.is_data() && declared.is_empty() => {
                // Without a Content-Type, an unknown document may still be stored opaquely.
                let probe: Probe = serde_json::from_slice(bytes)
                    .map_err(|e| invalid(format!("manifest is not valid JSON: {e}")))?;
                return match probe.media_type {
                    Some(mt) if kind_of(&mt) == ManifestKind::Opaque => {
                        check_opaque(&mt)?;
                        Ok(ManifestInfo::empty(mt, ManifestKind::Opaque))
                    }
                    _ => Err(invalid(format!("malformed manifest: {e}"))),
                };
            }
            Err(e) => return Err(invalid(format!("malformed manifest: {e}"))),
        };
        if !declared.is_empty() {
            check_agreement(declared, raw.media_type.as_deref())?;
        }
        let media_type = match (declared.is_empty(), &raw.media_type) {
            (false, _) => declared.to_owned(),
            (true, Some(inner)) => inner.clone(),
            (true, None) if raw.manifests.is_some() => media_type::OCI_INDEX.to_owned(),
            (true, None) if raw.config.is_some() => media_type::OCI_MANIFEST.to_owned(),
            (true, None) if raw.schema_version.as_ref().and_then(|v| v.as_u64()) == Some(1) => {
                return Err(schema1_refused());
            }
            (true, None) => return Err(invalid("no media type in Content-Type or manifest")),
        };
        let kind = kind_of(&media_type);
        if kind == ManifestKind::Opaque {
            check_opaque(&media_type)?;
        }
        let mut info = ManifestInfo::empty(media_type, kind);
        if kind == ManifestKind::Opaque {
            return Ok(info);
        }
        let artifact_manifest = info.media_type == media_type::OCI_ARTIFACT_MANIFEST;
        if !artifact_manifest {
            match &raw.schema_version {
                Some(v) if v.as_u64() == Some(2) => {}
                _ => return Err(invalid("schemaVersion must be 2")),
            }
        }
        match kind {
            ManifestKind::Image if artifact_manifest => {
                info.layers = raw.blobs.unwrap_or_default();
            }
            ManifestKind::Image => {
                info.config = Some(raw.config.ok_or_else(|| invalid("missing config"))?);
                info.layers = raw.layers.ok_or_else(|| invalid("missing layers"))?;
            }
            ManifestKind::Index => {
                info.manifests = raw.manifests.ok_or_else(|| invalid("missing manifests"))?;
            }
            ManifestKind::Opaque => unreachable!("returned above"),
        }
        info.subject = raw.subject;
        info.artifact_type = raw.artifact_type;
        info.annotations = raw.annotations;
        Ok(info)
    }

    fn empty(media_type: String, kind: ManifestKind) -> Self {
        ManifestInfo {
            media_type,
            kind,
            config: None,
            layers: Vec::new(),
            manifests: Vec::new(),
            subject: None,
            artifact_type: None,
            annotations: BTreeMap::new(),
        }
    }

    /// Blobs (config and layers) the registry must hold for this manifest, without
    /// duplicates and without external (foreign) layers.
    pub fn blob_references(&self) -> Vec<Digest> {
        let mut out: Vec<Digest> = self
            .config
            .iter()
            .chain(&self.layers)
            .filter(|d| !d.is_external())
            .map(|d| d.digest.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Child manifests the registry must hold for this index, without duplicates.
    pub fn manifest_references(&self) -> Vec<Digest> {
        let mut out: Vec<Digest> = self.manifests.iter().map(|d| d.digest.clone()).collect();
        out.sort();
        out.dedup();
        out
    }

    /// The artifact type reported in the referrers API: `artifactType`, else the
    /// config's media type.
    pub fn effective_artifact_type(&self) -> Option<&str> {
        self.artifact_type
            .as_deref()
            .or_else(|| self.config.as_ref().map(|c| c.media_type.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_types_are_json_application_types_only() {
        let body = br#"{"anything":1}"#;
        for ok in [
            "application/json",
            "application/vnd.example.thing+json",
            "application/vnd.example.thing+JSON; charset=utf-8",
        ] {
            assert!(ManifestInfo::inspect(ok, body).is_ok(), "{ok}");
        }
        // What a browser renders or runs, and what is not a media type at all.
        for refused in [
            "text/html",
            "text/html; charset=utf-8",
            "image/svg+xml",
            "application/xhtml+xml",
            "application/octet-stream",
            "application/vnd.x+json<script>",
            "application/+json",
            "json",
            "application/",
        ] {
            let e = ManifestInfo::inspect(refused, body).unwrap_err();
            assert!(
                matches!(e, Error::ManifestInvalid { .. }),
                "{refused}: {e:?}"
            );
        }
        // Named only inside the document, without a Content-Type: the same rule.
        let inner = br#"{"mediaType":"text/html","x":1}"#;
        assert!(ManifestInfo::inspect("", inner).is_err());
    }

    #[test]
    fn docker_schema1_is_refused_clearly() {
        let signed = br#"{"schemaVersion":1,"name":"a/b","tag":"v1","fsLayers":[],"history":[]}"#;
        for ct in [
            media_type::DOCKER_SCHEMA1[0],
            media_type::DOCKER_SCHEMA1[1],
            "",
        ] {
            match ManifestInfo::inspect(ct, signed) {
                Err(Error::ManifestInvalid { reason }) => {
                    assert!(reason.contains("schema 1"), "{ct}: {reason}")
                }
                other => panic!("{ct}: {other:?}"),
            }
        }
    }

    fn d(s: &str) -> Digest {
        Digest::sha256(s.as_bytes())
    }

    fn image(layers: &[&str]) -> String {
        let layers: Vec<_> = layers
            .iter()
            .map(|l| {
                format!(
                    r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":1}}"#,
                    d(l)
                )
            })
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{}],"annotations":{{"a":"b"}}}}"#,
            media_type::OCI_MANIFEST,
            d("config"),
            layers.join(",")
        )
    }

    #[test]
    fn inspects_image_manifest() {
        let m = image(&["l1", "l2", "l1"]);
        let info = ManifestInfo::inspect(
            "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
            m.as_bytes(),
        )
        .unwrap();
        assert_eq!(info.kind, ManifestKind::Image);
        assert_eq!(info.media_type, media_type::OCI_MANIFEST);
        let mut expected = vec![d("config"), d("l1"), d("l2")];
        expected.sort();
        assert_eq!(info.blob_references(), expected);
        assert_eq!(
            info.effective_artifact_type(),
            Some("application/vnd.oci.image.config.v1+json")
        );
        assert_eq!(info.annotations.get("a").map(String::as_str), Some("b"));
    }

    #[test]
    fn inspects_index_and_subject() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{}","size":3}}],"subject":{{"mediaType":"{}","digest":"{}","size":4}},"artifactType":"x/y"}}"#,
            media_type::OCI_INDEX,
            media_type::OCI_MANIFEST,
            d("child"),
            media_type::OCI_MANIFEST,
            d("subject")
        );
        let info = ManifestInfo::inspect(media_type::OCI_INDEX, m.as_bytes()).unwrap();
        assert_eq!(info.kind, ManifestKind::Index);
        assert_eq!(info.manifest_references(), vec![d("child")]);
        assert_eq!(info.subject.unwrap().digest, d("subject"));
        assert_eq!(info.artifact_type.as_deref(), Some("x/y"));
    }

    #[test]
    fn media_type_must_agree() {
        let m = image(&[]);
        let err = ManifestInfo::inspect(media_type::DOCKER_MANIFEST, m.as_bytes()).unwrap_err();
        assert!(matches!(err, Error::ManifestInvalid { .. }));
        // Without a Content-Type, the document's own media type is used.
        let info = ManifestInfo::inspect("", m.as_bytes()).unwrap();
        assert_eq!(info.media_type, media_type::OCI_MANIFEST);
    }

    #[test]
    fn rejects_malformed_known_types() {
        for (ct, body) in [
            (media_type::OCI_MANIFEST, "not json"),
            (media_type::OCI_MANIFEST, "[]"),
            (media_type::OCI_MANIFEST, r#"{"schemaVersion":2}"#),
            (
                media_type::OCI_MANIFEST,
                r#"{"schemaVersion":1,"config":{},"layers":[]}"#,
            ),
            (media_type::OCI_INDEX, r#"{"schemaVersion":2}"#),
            (
                media_type::OCI_INDEX,
                r#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"md5:00","size":1}]}"#,
            ),
            (
                media_type::OCI_INDEX,
                r#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:00","size":-1}]}"#,
            ),
            ("", r#"{"schemaVersion":2}"#),
        ] {
            assert!(
                ManifestInfo::inspect(ct, body.as_bytes()).is_err(),
                "{ct} {body} should be rejected"
            );
        }
    }

    #[test]
    fn unknown_media_types_are_opaque() {
        let info = ManifestInfo::inspect("application/x-custom+json", br#"{"layers":"whatever"}"#)
            .unwrap();
        assert_eq!(info.kind, ManifestKind::Opaque);
        assert!(info.blob_references().is_empty());
        assert!(ManifestInfo::inspect("application/x-custom+json", b"{").is_err());
    }

    #[test]
    fn foreign_layers_are_not_required() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"c","digest":"{}","size":1}},"layers":[{{"mediaType":"{}","digest":"{}","size":1,"urls":["https://example.invalid/l"]}}]}}"#,
            media_type::DOCKER_MANIFEST,
            d("c"),
            media_type::DOCKER_FOREIGN_LAYER,
            d("foreign")
        );
        let info = ManifestInfo::inspect(media_type::DOCKER_MANIFEST, m.as_bytes()).unwrap();
        assert_eq!(info.blob_references(), vec![d("c")]);
    }

    proptest::proptest! {
        #[test]
        fn inspect_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            ct in proptest::sample::select(vec![
                "", media_type::OCI_MANIFEST, media_type::OCI_INDEX, media_type::DOCKER_MANIFEST,
                media_type::DOCKER_MANIFEST_LIST, media_type::OCI_ARTIFACT_MANIFEST, "x/y",
            ]),
        ) {
            let _ = ManifestInfo::inspect(ct, &bytes);
        }

        #[test]
        fn inspect_json_shaped_input_never_panics(
            body in r#"\{("(schemaVersion|mediaType|config|layers|manifests|subject|artifactType|annotations|digest|size)":(2|"[a-z0-9:./+]{0,70}"|\[\]|\{\}|null|-1|1e400),?){0,8}\}"#,
        ) {
            let _ = ManifestInfo::inspect("", body.as_bytes());
            let _ = ManifestInfo::inspect(media_type::OCI_MANIFEST, body.as_bytes());
        }
    }

    #[test]
    fn numbers_out_of_range_are_refused_even_where_unread() {
        // Found by the inspect_manifest fuzz target: accepted, yet not JSON to a parser.
        for ct in ["", "application/vnd.example+json", media_type::OCI_MANIFEST] {
            let e = ManifestInfo::inspect(ct, br#"{"creatze":4e4025}"#).unwrap_err();
            assert!(matches!(e, Error::ManifestInvalid { .. }), "{ct}: {e:?}");
        }
        assert!(ManifestInfo::inspect("application/vnd.example+json", br#"{"n":4e40}"#).is_ok());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let body = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(ManifestInfo::inspect(media_type::OCI_MANIFEST, body.as_bytes()).is_err());
    }
}
