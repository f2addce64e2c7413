//! Real OCI clients against the registry on a loopback port: umoci builds images,
//! skopeo pushes, inspects, lists, copies back (every blob verified), copies between
//! repositories (cross-repository mount) and deletes. The tools are installed by
//! `scripts/install-test-deps.sh` (run by the test command); a missing tool fails the
//! test rather than skipping it.

use std::path::Path;
use std::process::Command;

use registry_core::{Digest, Event, Registry};
use registry_http::{HttpConfig, serve_local};

fn tool(name: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run scripts/install-test-deps.sh"
    );
    name.to_owned()
}

/// Runs a command off the async threads; panics with its output if it fails.
async fn run(program: &str, args: &[&str]) -> String {
    let (program, args): (String, Vec<String>) = (
        program.to_owned(),
        args.iter().map(|s| s.to_string()).collect(),
    );
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

/// Builds an OCI layout with two images sharing their first layer.
async fn build_layout(dir: &Path) -> String {
    let umoci = tool("umoci");
    let layout = dir.join("layout");
    let l = layout.to_str().unwrap().to_owned();
    run(&umoci, &["init", "--layout", &l]).await;
    for (tag, files) in [
        ("v1", vec![("base.txt", 40_000), ("one.bin", 300_000)]),
        ("v2", vec![("base.txt", 40_000), ("two.bin", 200_000)]),
    ] {
        run(&umoci, &["new", "--image", &format!("{l}:{tag}")]).await;
        for (name, size) in files {
            let path = dir.join(name);
            // Deterministic for the shared layer, distinct for the others.
            let data: Vec<u8> = (0..size)
                .map(|i| ((i * 7 + name.len() * 13) % 251) as u8)
                .collect();
            std::fs::write(&path, data).unwrap();
            run(
                &umoci,
                &[
                    "insert",
                    "--image",
                    &format!("{l}:{tag}"),
                    path.to_str().unwrap(),
                    &format!("/{name}"),
                ],
            )
            .await;
        }
    }
    l
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_push_inspect_list_pull_copy_delete() {
    let skopeo = tool("skopeo");
    let dir = tempfile::tempdir().unwrap();
    let layout = build_layout(dir.path()).await;
    let registry = Registry::in_memory();
    let mut events = registry.subscribe();
    let server = serve_local(registry, HttpConfig::default()).await.unwrap();
    let host = server.url().trim_start_matches("http://").to_owned();
    let no_tls = ["--src-tls-verify=false", "--dest-tls-verify=false"];

    // Push both images (skopeo: POST, one streamed PATCH, PUT; HEAD first for blobs).
    for tag in ["v1", "v2"] {
        let dest = format!("docker://{host}/e2e/img:{tag}");
        run(
            &skopeo,
            &[
                &["copy", "--quiet"],
                &no_tls[..],
                &[&format!("oci:{layout}:{tag}"), &dest],
            ]
            .concat(),
        )
        .await;
    }

    // Inspect: digest and layers as pushed.
    let raw = run(
        &skopeo,
        &[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{host}/e2e/img:v1"),
        ],
    )
    .await;
    let info: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(info["Layers"].as_array().unwrap().len(), 2);
    let digest = info["Digest"].as_str().unwrap().to_owned();
    let raw_manifest = run(
        &skopeo,
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{host}/e2e/img:v1"),
        ],
    )
    .await;
    assert_eq!(
        Digest::sha256(raw_manifest.as_bytes()).to_string(),
        digest,
        "exact bytes served"
    );

    // List tags.
    let tags = run(
        &skopeo,
        &[
            "list-tags",
            "--tls-verify=false",
            &format!("docker://{host}/e2e/img"),
        ],
    )
    .await;
    let tags: serde_json::Value = serde_json::from_str(&tags).unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["v1", "v2"]));

    // Copy back and verify every blob file against its name.
    let out = dir.path().join("back");
    run(
        &skopeo,
        &[
            &["copy", "--quiet"],
            &no_tls[..],
            &[
                &format!("docker://{host}/e2e/img:v1"),
                &format!("oci:{}:v1", out.display()),
            ],
        ]
        .concat(),
    )
    .await;
    let mut verified = 0;
    for entry in std::fs::read_dir(out.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        let data = std::fs::read(entry.path()).unwrap();
        let name = entry.file_name().into_string().unwrap();
        assert_eq!(Digest::sha256(&data).hex(), name, "blob {name} verifies");
        verified += 1;
    }
    assert!(verified >= 4, "manifest, config and two layers: {verified}");

    // Registry to registry: the layers are mounted, not uploaded again.
    while events.try_recv().is_ok() {}
    run(
        &skopeo,
        &[
            &["copy", "--quiet"],
            &no_tls[..],
            &[
                &format!("docker://{host}/e2e/img:v1"),
                &format!("docker://{host}/e2e/copy:v1"),
            ],
        ]
        .concat(),
    )
    .await;
    let mut mounted = 0;
    while let Ok(e) = events.try_recv() {
        if let Event::BlobMounted { repo, .. } = e {
            assert_eq!(repo.as_str(), "e2e/copy");
            mounted += 1;
        }
    }
    assert!(mounted >= 2, "cross-repository mounts: {mounted}");
    let copied = run(
        &skopeo,
        &[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{host}/e2e/copy:v1"),
        ],
    )
    .await;
    let copied: serde_json::Value = serde_json::from_str(&copied).unwrap();
    assert_eq!(copied["Digest"].as_str(), Some(digest.as_str()));

    // Delete, then the manifest is gone.
    run(
        &skopeo,
        &[
            "delete",
            "--tls-verify=false",
            &format!("docker://{host}/e2e/img:v1"),
        ],
    )
    .await;
    let gone = Command::new(&skopeo)
        .args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{host}/e2e/img:v1"),
        ])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "deleted manifest still inspectable");
    // v2 still pulls.
    run(
        &skopeo,
        &[
            &["copy", "--quiet"],
            &no_tls[..],
            &[
                &format!("docker://{host}/e2e/img:v2"),
                &format!("oci:{}:v2", out.display()),
            ],
        ]
        .concat(),
    )
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oras_push_pull_and_referrers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".test-deps/venv/bin/python");
    assert!(
        python.exists(),
        "the oras venv is missing: run scripts/install-test-deps.sh"
    );
    let script = root.join("scripts/e2e/oras_flow.py");
    let work = tempfile::tempdir().unwrap();
    let server = serve_local(Registry::in_memory(), HttpConfig::default())
        .await
        .unwrap();
    let host = server.url().trim_start_matches("http://").to_owned();
    let out = run(
        python.to_str().unwrap(),
        &[
            script.to_str().unwrap(),
            &host,
            work.path().to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.contains("referrer found, filter applied"), "{out}");
    server.shutdown().await;
}

/// Runs a command that must fail; returns its stderr.
async fn run_fails(program: &str, args: &[&str]) -> String {
    let (program, args): (String, Vec<String>) = (
        program.to_owned(),
        args.iter().map(|s| s.to_string()).collect(),
    );
    tokio::task::spawn_blocking(move || {
        let out = Command::new(&program).args(&args).output().expect("spawn");
        assert!(
            !out.status.success(),
            "{program} {args:?} succeeded but must be refused:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    })
    .await
    .unwrap()
}

/// A registry where `ci` may do everything and anonymous callers may pull `public/`,
/// with the built-in token endpoint: the layout of a CI pool.
fn authenticated_config() -> HttpConfig {
    use registry_core::access::{Action, Grantee, PrefixRules};
    let policy = PrefixRules::new()
        .grant(Grantee::user("ci"), "", Action::ALL)
        .grant(Grantee::Anyone, "public", Action::READ);
    HttpConfig::default().with_auth(
        registry_http::Auth::new(policy)
            .with_user("ci", "ci-secret")
            .with_token_issuer(registry_http::TokenIssuer::new("registry")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_authenticates_with_credentials_and_is_refused_without() {
    let skopeo = tool("skopeo");
    let dir = tempfile::tempdir().unwrap();
    let layout = build_layout(dir.path()).await;
    let registry = Registry::in_memory();
    let server = serve_local(registry.clone(), authenticated_config())
        .await
        .unwrap();
    let host = server.url().trim_start_matches("http://").to_owned();
    // An empty auth file: no credentials from the machine's own configuration.
    let auth_file = dir.path().join("auth.json");
    std::fs::write(&auth_file, "{}").unwrap();
    let auth_file = auth_file.to_str().unwrap();
    let src = format!("oci:{layout}:v1");

    // Without credentials, and with a wrong password: refused, nothing stored.
    for creds in [None, Some("ci:wrong"), Some("intruder:ci-secret")] {
        let mut args = vec![
            "copy",
            "--quiet",
            "--authfile",
            auth_file,
            "--dest-tls-verify=false",
        ];
        if let Some(c) = creds {
            args.extend(["--dest-creds", c]);
        }
        let dest = format!("docker://{host}/private/img:v1");
        args.extend([src.as_str(), dest.as_str()]);
        let err = run_fails(&skopeo, &args).await;
        assert!(
            err.to_lowercase().contains("unauthorized") || err.contains("401"),
            "{creds:?}: {err}"
        );
    }
    assert!(
        registry
            .list_repositories(&Default::default(), &registry_core::AllowAll)
            .await
            .unwrap()
            .items
            .is_empty(),
        "refused pushes stored nothing"
    );

    // With credentials: push (token flow), inspect, copy back with every blob verified.
    for repo in ["private/img", "public/img"] {
        run(
            &skopeo,
            &[
                "copy",
                "--quiet",
                "--authfile",
                auth_file,
                "--dest-tls-verify=false",
                "--dest-creds",
                "ci:ci-secret",
                &src,
                &format!("docker://{host}/{repo}:v1"),
            ],
        )
        .await;
    }
    let raw = run(
        &skopeo,
        &[
            "inspect",
            "--authfile",
            auth_file,
            "--tls-verify=false",
            "--creds",
            "ci:ci-secret",
            &format!("docker://{host}/private/img:v1"),
        ],
    )
    .await;
    let info: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(info["Layers"].as_array().unwrap().len(), 2);
    let back = dir.path().join("back");
    run(
        &skopeo,
        &[
            "copy",
            "--quiet",
            "--authfile",
            auth_file,
            "--src-tls-verify=false",
            "--src-creds",
            "ci:ci-secret",
            &format!("docker://{host}/private/img:v1"),
            &format!("oci:{}:v1", back.display()),
        ],
    )
    .await;

    // Anonymous: the public repository reads through an anonymous token, the private
    // one is refused.
    let anon = run(
        &skopeo,
        &[
            "inspect",
            "--authfile",
            auth_file,
            "--tls-verify=false",
            "--no-creds",
            &format!("docker://{host}/public/img:v1"),
        ],
    )
    .await;
    let anon: serde_json::Value = serde_json::from_str(&anon).unwrap();
    assert_eq!(anon["Digest"], info["Digest"]);
    let err = run_fails(
        &skopeo,
        &[
            "inspect",
            "--authfile",
            auth_file,
            "--tls-verify=false",
            "--no-creds",
            &format!("docker://{host}/private/img:v1"),
        ],
    )
    .await;
    assert!(
        err.to_lowercase().contains("unauthorized") || err.contains("401"),
        "{err}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oras_authenticates_with_basic_credentials() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".test-deps/venv/bin/python");
    assert!(
        python.exists(),
        "the oras venv is missing: run scripts/install-test-deps.sh"
    );
    let script = root.join("scripts/e2e/oras_auth.py");
    let work = tempfile::tempdir().unwrap();
    let server = serve_local(Registry::in_memory(), authenticated_config())
        .await
        .unwrap();
    let host = server.url().trim_start_matches("http://").to_owned();
    let out = run(
        python.to_str().unwrap(),
        &[
            script.to_str().unwrap(),
            &host,
            "ci",
            "ci-secret",
            work.path().to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.contains("oras auth ok"), "{out}");
    server.shutdown().await;
}
