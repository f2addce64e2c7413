//! Export from one in-memory registry, import into another: same manifests (by digest
//! and bytes), same tags, same referrers; exports into an existing layout add to it;
//! archives and multi-repository exports round-trip too.

mod common;

use common::*;
use registry_core::{Digest, ListOptions, Reference, Registry};
use registry_layout::{
    ExportOptions, ExportSelection, ImportOptions, RefNames, export, export_layout, import,
    import_layout,
};

async fn manifest_bytes(registry: &Registry, repo: &str, d: &Digest) -> bytes::Bytes {
    registry
        .get_manifest(&common::repo(repo), &Reference::Digest(d.clone()))
        .await
        .unwrap()
        .bytes
}

async fn blob_bytes(registry: &Registry, repo: &str, d: &Digest) -> Vec<u8> {
    use futures::StreamExt;
    let mut body = registry
        .get_blob(&common::repo(repo), d, None)
        .await
        .unwrap()
        .stream;
    let mut out = Vec::new();
    while let Some(c) = body.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

#[tokio::test]
async fn one_repository_round_trips_with_index_children_and_referrers() {
    let src = Registry::in_memory();
    let f = populate(&src).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");

    let sel = ExportSelection::repository(repo("demo/app"), vec![]);
    let report = export_layout(&src, &sel, &layout, &ExportOptions::default())
        .await
        .unwrap();
    // index, 2 images, 3 referrers; blobs: base, 2 configs, 2 layers, {}, 3 payloads.
    assert_eq!(report.manifests_written, 6, "{report}");
    assert_eq!(report.blobs_written, 9, "{report}");
    assert_eq!(report.referrers, 3);
    let mut entries = index_entries(&layout);
    entries.sort();
    let mut expected = vec![
        ("".to_owned(), f.sbom.to_string()),
        ("".to_owned(), f.signature.to_string()),
        ("".to_owned(), f.sbom_signature.to_string()),
        ("amd64".to_owned(), f.amd64.to_string()),
        ("latest".to_owned(), f.index.to_string()),
        ("v1".to_owned(), f.index.to_string()),
    ];
    expected.sort();
    assert_eq!(entries, expected);
    assert_eq!(
        std::fs::read_to_string(layout.join("oci-layout")).unwrap(),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );

    let dst = Registry::in_memory();
    let report = import_layout(&dst, &repo("copy/app"), &layout, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(report.manifests_pushed, 6, "{report}");
    assert_eq!(report.blobs_uploaded, 9, "{report}");
    assert_eq!(report.referrers.len(), 3);
    assert!(report.untagged.is_empty());
    let mut tags: Vec<(String, Digest)> = report
        .tagged
        .iter()
        .map(|(t, d)| (t.to_string(), d.clone()))
        .collect();
    tags.sort();
    assert_eq!(
        tags,
        vec![
            ("amd64".into(), f.amd64.clone()),
            ("latest".into(), f.index.clone()),
            ("v1".into(), f.index.clone())
        ]
    );
    // Same bytes, same referrers, same blobs.
    for d in [
        &f.index,
        &f.amd64,
        &f.arm64,
        &f.sbom,
        &f.signature,
        &f.sbom_signature,
    ] {
        assert_eq!(
            manifest_bytes(&src, "demo/app", d).await,
            manifest_bytes(&dst, "copy/app", d).await
        );
    }
    for subject in [&f.index, &f.amd64, &f.sbom] {
        let a = referrers(&src, &repo("demo/app"), subject).await;
        let b = referrers(&dst, &repo("copy/app"), subject).await;
        assert_eq!(a, b);
        assert_eq!(a.len(), 1);
    }
    let amd64 = manifest_bytes(&src, "demo/app", &f.amd64).await;
    let info = registry_core::ManifestInfo::inspect("", &amd64).unwrap();
    for d in info.blob_references() {
        assert_eq!(
            blob_bytes(&src, "demo/app", &d).await,
            blob_bytes(&dst, "copy/app", &d).await
        );
    }

    // Again: nothing to push, nothing to write.
    let again = import_layout(&dst, &repo("copy/app"), &layout, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((again.manifests_pushed, again.blobs_uploaded), (0, 0));
    assert_eq!(again.manifests_present, 6);
    let again = export_layout(&src, &sel, &layout, &ExportOptions::default())
        .await
        .unwrap();
    assert_eq!((again.manifests_written, again.blobs_written), (0, 0));
    assert_eq!(index_entries(&layout).len(), 6);
}

#[tokio::test]
async fn chosen_tags_bring_their_children_and_referrers_only() {
    let src = Registry::in_memory();
    let f = populate(&src).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let sel = ExportSelection::repository(repo("demo/app"), vec![]);
    export_layout(&src, &sel, &layout, &ExportOptions::default())
        .await
        .unwrap();

    let dst = Registry::in_memory();
    let target = repo("one");
    let options = ImportOptions::default().with_tags([tag("amd64")]);
    let report = import_layout(&dst, &target, &layout, &options)
        .await
        .unwrap();
    assert_eq!(report.tagged, vec![(tag("amd64"), f.amd64.clone())]);
    assert_eq!(report.referrers, vec![f.signature.clone()]);
    assert_eq!(report.manifests_pushed, 2);
    let tags = dst
        .list_tags(&target, &ListOptions::default())
        .await
        .unwrap();
    assert_eq!(tags.items, vec![tag("amd64")]);
    assert!(
        dst.stat_manifest(&target, &Reference::Digest(f.index.clone()))
            .await
            .is_err()
    );

    // Without referrers.
    let dst = Registry::in_memory();
    let options = ImportOptions::default()
        .with_tags([tag("v1")])
        .with_referrers(false);
    let report = import_layout(&dst, &target, &layout, &options)
        .await
        .unwrap();
    assert_eq!(report.manifests_pushed, 3);
    assert!(referrers(&dst, &target, &f.index).await.is_empty());

    // A tag the layout does not have.
    let options = ImportOptions::default().with_tags([tag("nope")]);
    let e = import_layout(&dst, &target, &layout, &options)
        .await
        .unwrap_err();
    assert!(
        matches!(e, registry_layout::LayoutError::TagNotFound { .. }),
        "{e}"
    );
}

#[tokio::test]
async fn whole_registry_archive_names_entries_repo_colon_tag() {
    let src = Registry::in_memory();
    let f = populate(&src).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("all.tar");
    let report = export(
        &src,
        &ExportSelection::Registry,
        &archive,
        &ExportOptions::default(),
    )
    .await
    .unwrap();
    let mut names: Vec<&str> = report.entries.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "demo/app:amd64",
            "demo/app:latest",
            "demo/app:v1",
            "demo/other:v2"
        ]
    );
    // The shared base layer is in the archive once.
    assert_eq!(report.blobs_written, 10, "{report}");

    // Plain tar can read it, and it is a layout.
    let unpacked = dir.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    let status = std::process::Command::new("tar")
        .args([
            "-xf",
            archive.to_str().unwrap(),
            "-C",
            unpacked.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(index_entries(&unpacked).len(), 7);

    let dst = Registry::in_memory();
    let options = ImportOptions::default().with_source_repo("demo/other");
    let report = import(&dst, &repo("other"), &archive, &options)
        .await
        .unwrap();
    assert_eq!(report.tagged, vec![(tag("v2"), f.other.clone())]);
    assert!(report.referrers.is_empty());

    let options = ImportOptions::default()
        .with_source_repo("demo/app")
        .with_tags([tag("v1")]);
    let report = import(&dst, &repo("app"), &archive, &options)
        .await
        .unwrap();
    assert_eq!(report.tagged, vec![(tag("v1"), f.index.clone())]);
    assert_eq!(report.referrers.len(), 3);
    // Mounted from `other` where the registry already had it, not read again.
    assert_eq!(report.blobs_mounted, 1, "{report}");

    // Without a source repository, `v1` is found whatever the repository part says.
    let dst = Registry::in_memory();
    let options = ImportOptions::default().with_tags([tag("v2")]);
    let report = import(&dst, &repo("x"), &archive, &options).await.unwrap();
    assert_eq!(report.tagged, vec![(tag("v2"), f.other.clone())]);
}

#[tokio::test]
async fn exports_add_to_existing_layouts_and_archives() {
    let src = Registry::in_memory();
    let f = populate(&src).await;
    let dir = tempfile::tempdir().unwrap();
    for path in [dir.path().join("layout"), dir.path().join("layout.tar")] {
        let app = ExportSelection::repository(repo("demo/app"), vec![tag("amd64")]);
        export(&src, &app, &path, &ExportOptions::default())
            .await
            .unwrap();
        let other = ExportSelection::repository(repo("demo/other"), vec![]);
        let options = ExportOptions::default().with_ref_names(RefNames::RepoTag);
        let report = export(&src, &other, &path, &options).await.unwrap();
        // The base layer was written by the first export.
        assert_eq!(report.blobs_written, 1, "{}: {report}", path.display());
        assert!(report.present >= 1);

        let dst = Registry::in_memory();
        let report = import(&dst, &repo("all"), &path, &ImportOptions::default())
            .await
            .unwrap();
        let mut tagged = report.tagged.clone();
        tagged.sort();
        assert_eq!(
            tagged,
            vec![
                (tag("amd64"), f.amd64.clone()),
                (tag("v2"), f.other.clone())
            ],
            "{}",
            path.display()
        );
        assert_eq!(report.referrers, vec![f.signature.clone()]);

        // Moving a name replaces its entry.
        let moved = ExportSelection::repository(repo("demo/app"), vec![tag("v1")]);
        export(
            &src,
            &moved,
            &path,
            &ExportOptions::default().with_ref_names(RefNames::Tag),
        )
        .await
        .unwrap();
        let report = import(
            &dst,
            &repo("all"),
            &path,
            &ImportOptions::default().with_tags([tag("v1")]),
        )
        .await
        .unwrap();
        assert_eq!(report.tagged, vec![(tag("v1"), f.index.clone())]);
    }
}
