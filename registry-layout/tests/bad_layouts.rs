//! Every kind of bad layout is refused with an error naming the file, and the registry
//! it was imported into is left exactly as it was: no tag, manifest, blob link,
//! referrer or repository added, and, once collected, no blob record either.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use registry_core::{Digest, GcOptions, Registry, TagPattern};
use registry_layout::{
    ExportOptions, ExportSelection, ImportOptions, LayoutError, export_layout, import,
};

/// A good layout of `demo/app` (index, two images, three referrers) in `dir/good`.
async fn good_layout(dir: &Path) -> (PathBuf, Fixture) {
    let src = Registry::in_memory();
    let f = populate(&src).await;
    let layout = dir.join("good");
    let sel = ExportSelection::repository(repo("demo/app"), vec![]);
    export_layout(&src, &sel, &layout, &ExportOptions::default())
        .await
        .unwrap();
    (layout, f)
}

fn blob_file(layout: &Path, d: &Digest) -> PathBuf {
    layout
        .join("blobs")
        .join(d.algorithm().name())
        .join(d.hex())
}

/// The layers of the arm64 image (pushed last of the images).
fn arm64_layer(layout: &Path, f: &Fixture) -> PathBuf {
    let bytes = std::fs::read(blob_file(layout, &f.arm64)).unwrap();
    let info = registry_core::ManifestInfo::inspect("", &bytes).unwrap();
    blob_file(layout, &info.layers[1].digest)
}

fn edit_index(layout: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = layout.join("index.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// The entry of `index.json` named `name`.
fn entry<'a>(v: &'a mut serde_json::Value, name: &str) -> &'a mut serde_json::Value {
    v["manifests"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|m| m["annotations"][registry_layout::REF_NAME] == name)
        .unwrap()
}

/// Writes `bytes` as a blob and points the `v1` entry at it.
fn point_v1_at(layout: &Path, bytes: &[u8]) -> Digest {
    let d = Digest::sha256(bytes);
    std::fs::write(blob_file(layout, &d), bytes).unwrap();
    edit_index(layout, |v| {
        let e = entry(v, "v1");
        e["digest"] = d.to_string().into();
        e["size"] = bytes.len().into();
    });
    d
}

type Breaker = Box<dyn Fn(&Path, &Fixture)>;
/// (name, how to break the layout, what the error must be, a file its message names)
type Case = (
    &'static str,
    Breaker,
    fn(&LayoutError) -> bool,
    &'static str,
);

fn cases() -> Vec<Case> {
    vec![
        (
            "no oci-layout",
            Box::new(|l, _| std::fs::remove_file(l.join("oci-layout")).unwrap()),
            |e| matches!(e, LayoutError::MissingFile { .. }),
            "oci-layout",
        ),
        (
            "layout version 2.0.0",
            Box::new(|l, _| {
                std::fs::write(l.join("oci-layout"), r#"{"imageLayoutVersion":"2.0.0"}"#).unwrap()
            }),
            |e| matches!(e, LayoutError::UnsupportedVersion { .. }),
            "oci-layout",
        ),
        (
            "no index.json",
            Box::new(|l, _| std::fs::remove_file(l.join("index.json")).unwrap()),
            |e| matches!(e, LayoutError::MissingFile { .. }),
            "index.json",
        ),
        (
            "index.json is not JSON",
            Box::new(|l, _| std::fs::write(l.join("index.json"), "{\"schemaVersion\":2,").unwrap()),
            |e| matches!(e, LayoutError::BadJson { .. }),
            "index.json",
        ),
        (
            "a layer is missing",
            Box::new(|l, f| std::fs::remove_file(arm64_layer(l, f)).unwrap()),
            |e| {
                matches!(
                    e,
                    LayoutError::MissingFile {
                        referenced_by: Some(_),
                        ..
                    }
                )
            },
            "blobs/sha256/",
        ),
        (
            // Same size, other bytes: only hashing finds it, during the upload, after
            // the amd64 image was pushed: the import must take that back out.
            "a layer does not match its digest",
            Box::new(|l, f| {
                let path = arm64_layer(l, f);
                let mut bytes = std::fs::read(&path).unwrap();
                bytes[10] ^= 1;
                std::fs::write(path, bytes).unwrap();
            }),
            |e| matches!(e, LayoutError::DigestMismatch { .. }),
            "blobs/sha256/",
        ),
        (
            "a manifest does not match its digest",
            Box::new(|l, f| {
                let path = blob_file(l, &f.arm64);
                let text = std::fs::read_to_string(&path).unwrap();
                std::fs::write(path, text.replace("\"layers\"", "\"layerz\"")).unwrap();
            }),
            |e| matches!(e, LayoutError::DigestMismatch { .. }),
            "blobs/sha256/",
        ),
        (
            "a layer is longer than its descriptor says",
            Box::new(|l, f| {
                let path = arm64_layer(l, f);
                let mut bytes = std::fs::read(&path).unwrap();
                bytes.push(0);
                std::fs::write(path, bytes).unwrap();
            }),
            |e| matches!(e, LayoutError::SizeMismatch { .. }),
            "blobs/sha256/",
        ),
        (
            "an index.json size is wrong",
            Box::new(|l, _| {
                edit_index(l, |v| {
                    let e = entry(v, "v1");
                    e["size"] = (e["size"].as_u64().unwrap() + 1).into();
                })
            }),
            |e| matches!(e, LayoutError::SizeMismatch { .. }),
            "blobs/sha256/",
        ),
        (
            "a digest in index.json is a path",
            Box::new(|l, _| {
                edit_index(l, |v| {
                    entry(v, "v1")["digest"] = "sha256:../../../etc/passwd".into()
                })
            }),
            |e| matches!(e, LayoutError::InvalidDigest { .. }),
            "index.json",
        ),
        (
            "a digest in a manifest is a path",
            Box::new(|l, f| {
                let text = std::fs::read_to_string(blob_file(l, &f.arm64)).unwrap();
                let layer = arm64_layer(l, f);
                let hex = layer.file_name().unwrap().to_str().unwrap();
                point_v1_at(l, text.replace(hex, "../../../../etc/passwd").as_bytes());
            }),
            |e| matches!(e, LayoutError::InvalidDigest { .. }),
            "blobs/sha256/",
        ),
        (
            "a layer is a link out of the layout",
            Box::new(|l, f| {
                let path = arm64_layer(l, f);
                let outside = l.parent().unwrap().join("outside");
                std::fs::write(&outside, std::fs::read(&path).unwrap()).unwrap();
                std::fs::remove_file(&path).unwrap();
                std::os::unix::fs::symlink(&outside, &path).unwrap();
            }),
            |e| matches!(e, LayoutError::UnsafePath { .. }),
            "blobs/sha256/",
        ),
        (
            "a manifest is not JSON",
            Box::new(|l, _| {
                point_v1_at(l, b"{\"schemaVersion\":2,\"mediaType\":");
            }),
            |e| matches!(e, LayoutError::BadManifest { .. }),
            "blobs/sha256/",
        ),
        (
            "a manifest lacks its layers",
            Box::new(|l, _| {
                point_v1_at(
                    l,
                    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#,
                );
            }),
            |e| matches!(e, LayoutError::BadManifest { .. }),
            "blobs/sha256/",
        ),
        (
            "a ref name is no tag",
            Box::new(|l, _| {
                edit_index(l, |v| {
                    entry(v, "v1")["annotations"][registry_layout::REF_NAME] = "a b".into()
                })
            }),
            |e| matches!(e, LayoutError::InvalidRefName { .. }),
            "index.json",
        ),
    ]
}

/// A registry that already holds something in the repository imported into.
async fn registry_with_content() -> Registry {
    let registry = Registry::builder(registry_core::MemoryStore::new())
        .with_protection_window(Duration::ZERO)
        .build();
    let r = repo("target");
    let config = blob(&registry, &r, br#"{"os":"plan9"}"#).await;
    let json = image_json(&config, &[], None, None);
    manifest(
        &registry,
        &r,
        registry_core::media_type::OCI_MANIFEST,
        json,
        Some("v1"),
    )
    .await;
    registry
}

/// The registry holds what it held before: same tags and manifests; after a
/// collection, not even a blob link or record more.
async fn assert_unchanged(registry: &Registry, before: &Snapshot, case: &str) {
    let now = snapshot(registry).await;
    assert_eq!(now.tags, before.tags, "{case}");
    let (mut a, mut b) = (now.stats.clone(), before.stats.clone());
    // Blobs uploaded before a blob failed its digest stay as unreferenced links (never
    // taken back: a client may have pushed the same blob meanwhile), for the collector.
    (a.blobs, a.blob_links, a.repositories) = (0, 0, 0);
    (b.blobs, b.blob_links, b.repositories) = (0, 0, 0);
    assert_eq!(a, b, "{case}");
    let gc = GcOptions {
        window: Some(Duration::ZERO),
        ..GcOptions::default()
    };
    registry.collect_garbage(&gc).await.unwrap();
    assert_eq!(
        snapshot(registry).await,
        *before,
        "{case}: after a collection"
    );
}

#[tokio::test]
async fn bad_layouts_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (good, f) = good_layout(dir.path()).await;
    let registry = registry_with_content().await;
    let before = snapshot(&registry).await;
    for (i, (case, breaker, expected, names)) in cases().into_iter().enumerate() {
        let case_dir = dir.path().join(format!("case{i}"));
        let layout = case_dir.join("layout");
        copy_dir(&good, &layout);
        breaker(&layout, &f);
        let mut events = registry.subscribe();
        let e = import(
            &registry,
            &repo("target"),
            &layout,
            &ImportOptions::default(),
        )
        .await
        .expect_err(case);
        let mut pushed = 0;
        while let Ok(event) = events.try_recv() {
            pushed += matches!(event, registry_core::Event::ManifestPut { .. }) as usize;
        }
        // Even a layer that does not match its digest, which only hashing during its
        // upload finds, fails the import before any manifest: blobs go first.
        assert_eq!(pushed, 0, "{case}: refused only after pushing a manifest");
        assert!(expected(&e), "{case}: wrong error {e:?}");
        let message = e.to_string();
        assert!(
            message.contains(names),
            "{case}: {message} does not name {names}"
        );
        assert!(
            message.contains(&case_dir.display().to_string()),
            "{case}: {message}"
        );
        assert_unchanged(&registry, &before, case).await;
    }
    // The good layout itself imports (so the cases above failed for their reason).
    import(
        &registry,
        &repo("target"),
        &good,
        &ImportOptions::default().with_tags([tag("amd64")]),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_tag_the_policy_would_refuse_fails_the_import_before_any_push() {
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = good_layout(dir.path()).await;
    let registry = Registry::builder(registry_core::MemoryStore::new())
        .with_protection_window(Duration::ZERO)
        .with_immutable_tags(TagPattern::parse("v*").unwrap())
        .build();
    let r = repo("target");
    let config = blob(&registry, &r, br#"{"os":"plan9"}"#).await;
    let json = image_json(&config, &[], None, None);
    manifest(
        &registry,
        &r,
        registry_core::media_type::OCI_MANIFEST,
        json,
        Some("v1"),
    )
    .await;
    let before = snapshot(&registry).await;
    // `v1` would have to move: refused before a blob, manifest or tag is pushed.
    let e = import(&registry, &r, &good, &ImportOptions::default())
        .await
        .unwrap_err();
    match &e {
        LayoutError::Registry { source, .. } => {
            assert!(
                matches!(source, registry_core::Error::ImmutableTag { .. }),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_unchanged(&registry, &before, "immutable tag").await;
}

#[tokio::test]
async fn bad_archives_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (good, f) = good_layout(dir.path()).await;
    let registry = registry_with_content().await;
    let before = snapshot(&registry).await;
    let tar = |name: &str, build: &dyn Fn(&mut tar::Builder<std::fs::File>)| {
        let path = dir.path().join(name);
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        b.append_dir_all(".", &good).unwrap();
        build(&mut b);
        b.finish().unwrap();
        path
    };
    let file = |b: &mut tar::Builder<std::fs::File>, name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // `append_data` refuses `..`; write the name the way a hostile tool would.
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, bytes).unwrap();
    };
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            tar("dotdot.tar", &|b| file(b, "../escaped", b"x")),
            "../escaped",
        ),
        (
            tar("absolute.tar", &|b| file(b, "/tmp/escaped", b"x")),
            "/tmp/escaped",
        ),
        (
            tar("link.tar", &|b| {
                let name = format!("blobs/sha256/{}", f.arm64.hex());
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, name, "/etc/passwd").unwrap();
            }),
            "blobs/sha256/",
        ),
    ];
    for (archive, names) in cases {
        let e = import(
            &registry,
            &repo("target"),
            &archive,
            &ImportOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, LayoutError::UnsafePath { .. }), "{e:?}");
        let message = e.to_string();
        assert!(
            message.contains(names) && message.contains(".tar"),
            "{message}"
        );
        assert_unchanged(&registry, &before, names).await;
    }
    assert!(!dir.path().parent().unwrap().join("escaped").exists());

    // A broken layout inside an archive is named as the archive's entry.
    let broken = dir.path().join("broken");
    copy_dir(&good, &broken);
    std::fs::remove_file(arm64_layer(&broken, &f)).unwrap();
    let path = dir.path().join("broken.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    b.append_dir_all(".", &broken).unwrap();
    b.finish().unwrap();
    drop(b);
    let e = import(&registry, &repo("target"), &path, &ImportOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, LayoutError::MissingFile { .. }), "{e:?}");
    assert!(e.to_string().contains("broken.tar:blobs/sha256/"), "{e}");
    assert_unchanged(&registry, &before, "broken.tar").await;
}
