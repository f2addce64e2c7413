//! Layouts made by real tools (umoci, buildah, skopeo) imported, served on a loopback
//! port and pulled back by skopeo, and exported by this crate: the manifests and blobs
//! that come out are byte for byte those that went in, and skopeo reads what this crate
//! writes. The tools are installed by `scripts/install-test-deps.sh`; a missing tool
//! fails the test rather than skipping it.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use registry_core::{Digest, Registry};
use registry_http::{HttpConfig, serve_local};
use registry_layout::{
    ExportOptions, ExportSelection, ImportOptions, export, export_layout, import, import_layout,
};

fn tool(name: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run scripts/install-test-deps.sh (or apt-get install -y {name})"
    );
    name.to_owned()
}

/// Runs a command off the async threads; panics with its output if it fails.
async fn run(program: &str, args: &[&str]) -> String {
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(&program).args(&args).output().expect("spawn");
        assert!(
            out.status.success(),
            "{program} {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn data(size: usize, seed: usize) -> Vec<u8> {
    (0..size)
        .map(|i| ((i * 7 + seed * 13) % 251) as u8)
        .collect()
}

/// A layout by umoci: `v1` and `v2`, sharing their first layer.
async fn umoci_layout(dir: &Path) -> std::path::PathBuf {
    let umoci = tool("umoci");
    let layout = dir.join("umoci");
    run(&umoci, &["init", "--layout", s(&layout)]).await;
    for (tag, files) in [
        ("v1", vec![("base.txt", 40_000), ("one.bin", 300_000)]),
        ("v2", vec![("base.txt", 40_000), ("two.bin", 200_000)]),
    ] {
        let image = format!("{}:{tag}", s(&layout));
        run(&umoci, &["new", "--image", &image]).await;
        for (name, size) in files {
            let path = dir.join(name);
            std::fs::write(&path, data(size, name.len())).unwrap();
            run(
                &umoci,
                &["insert", "--image", &image, s(&path), &format!("/{name}")],
            )
            .await;
        }
    }
    layout
}

/// The manifest digest an `index.json` names `name`.
fn named(layout: &Path, name: &str) -> String {
    index_entries(layout)
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{} has no entry {name}", layout.display()))
        .1
}

/// The manifest named `name` in `a` and in `b` is the same, and so are its config and
/// layer files, byte for byte.
fn same_image(a: &Path, b: &Path, name: &str, name_in_b: &str) {
    let digest = named(a, name);
    assert_eq!(digest, named(b, name_in_b), "{name}: digests differ");
    let d = Digest::parse(&digest).unwrap();
    let file =
        |root: &Path, d: &Digest| root.join("blobs").join(d.algorithm().name()).join(d.hex());
    let manifest = std::fs::read(file(a, &d)).unwrap();
    assert_eq!(manifest, std::fs::read(file(b, &d)).unwrap());
    let info = registry_core::ManifestInfo::inspect("", &manifest).unwrap();
    assert!(!info.blob_references().is_empty());
    for blob in info.blob_references() {
        assert_eq!(
            std::fs::read(file(a, &blob)).unwrap(),
            std::fs::read(file(b, &blob)).unwrap(),
            "{name}: blob {blob} differs"
        );
    }
}

/// Imports `layout` into `repo`, serves the registry, and checks that skopeo pulls each
/// of `tags` back unchanged and that this crate's export (directory and archive, the
/// archive read by skopeo) gives the same manifests.
async fn check_round_trip(layout: &Path, repo_name: &str, tags: &[&str], work: &Path) {
    let skopeo = tool("skopeo");
    let registry = Registry::in_memory();
    let report = import_layout(
        &registry,
        &repo(repo_name),
        layout,
        &ImportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(report.tagged.len(), tags.len(), "{report}");

    let server = serve_local(registry.clone(), HttpConfig::default())
        .await
        .unwrap();
    let host = server.url().trim_start_matches("http://").to_owned();
    let pulled = work.join(format!("{}-pulled", repo_name.replace('/', "-")));
    for tag in tags {
        // `--preserve-digests`: skopeo otherwise gzips uncompressed layers (buildah
        // writes them so), which changes the image, not the registry's bytes.
        run(
            &skopeo,
            &[
                "copy",
                "--quiet",
                "--preserve-digests",
                "--src-tls-verify=false",
                &format!("docker://{host}/{repo_name}:{tag}"),
                &format!("oci:{}:{tag}", s(&pulled)),
            ],
        )
        .await;
        same_image(layout, &pulled, tag, tag);
    }
    server.shutdown().await;

    let exported = work.join(format!("{}-exported", repo_name.replace('/', "-")));
    let sel = ExportSelection::repository(repo(repo_name), vec![]);
    export_layout(&registry, &sel, &exported, &ExportOptions::default())
        .await
        .unwrap();
    let archive = work.join(format!("{}.tar", repo_name.replace('/', "-")));
    export(&registry, &sel, &archive, &ExportOptions::default())
        .await
        .unwrap();
    for tag in tags {
        same_image(layout, &exported, tag, tag);
        // skopeo reads both: the digest it reports is the original one.
        for source in [
            format!("oci:{}:{tag}", s(&exported)),
            format!("oci-archive:{}:{tag}", s(&archive)),
        ] {
            let raw = run(&skopeo, &["inspect", &source]).await;
            let info: serde_json::Value = serde_json::from_str(&raw).unwrap();
            assert_eq!(info["Digest"], named(layout, tag), "{source}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn umoci_layout_imports_serves_and_exports_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let layout = umoci_layout(dir.path()).await;
    check_round_trip(&layout, "tools/umoci", &["v1", "v2"], dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_archive_imports() {
    let skopeo = tool("skopeo");
    let dir = tempfile::tempdir().unwrap();
    let layout = umoci_layout(dir.path()).await;
    // skopeo writes the archive (its own tar layout: entries, order, directories).
    let archive = dir.path().join("skopeo.tar");
    run(
        &skopeo,
        &[
            "copy",
            "--quiet",
            &format!("oci:{}:v2", s(&layout)),
            &format!("oci-archive:{}:v2", s(&archive)),
        ],
    )
    .await;
    let registry = Registry::in_memory();
    let report = import(
        &registry,
        &repo("from/archive"),
        &archive,
        &ImportOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(report.tagged.len(), 1, "{report}");
    assert_eq!(report.tagged[0].1.to_string(), named(&layout, "v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildah_layout_imports_serves_and_exports_unchanged() {
    let buildah = tool("buildah");
    let dir = tempfile::tempdir().unwrap();
    // Its own storage, vfs driver: no daemon, no overlay mount, nothing shared with the
    // machine's containers.
    let root = dir.path().join("buildah-root");
    let runroot = dir.path().join("buildah-runroot");
    let store = [
        "--storage-driver",
        "vfs",
        "--root",
        s(&root),
        "--runroot",
        s(&runroot),
    ];
    let with_store = |args: &[&str]| -> Vec<String> {
        store.iter().chain(args).map(|s| s.to_string()).collect()
    };
    let call = |args: Vec<String>| {
        let buildah = buildah.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&buildah, &args).await
        }
    };
    let container = call(with_store(&["from", "scratch"]))
        .await
        .trim()
        .to_owned();
    let file = dir.path().join("hello.bin");
    std::fs::write(&file, data(500_000, 3)).unwrap();
    call(with_store(&["copy", &container, s(&file), "/hello.bin"])).await;
    call(with_store(&["config", "--cmd", "/hello.bin", &container])).await;
    let layout = dir.path().join("buildah");
    call(with_store(&[
        "commit",
        "--quiet",
        &container,
        &format!("oci:{}:v1", s(&layout)),
    ]))
    .await;
    call(with_store(&["rm", &container])).await;
    check_round_trip(&layout, "tools/buildah", &["v1"], dir.path()).await;
}
