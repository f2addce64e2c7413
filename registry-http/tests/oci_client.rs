//! The `oci-client` crate (a real Rust OCI client) against the loopback server:
//! monolithic and chunked uploads, pull, cross-repository mount, tag listing with
//! pagination, and referrers with an artifactType filter.

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{IMAGE_LAYER_MEDIA_TYPE, OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use registry_core::{Digest, Registry};
use registry_http::{HttpConfig, serve_local};

fn client(monolithic: bool) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        use_monolithic_push: monolithic,
        ..Default::default()
    })
}

fn reference(host: &str, name: &str) -> Reference {
    format!("{host}/{name}").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_client_push_pull_mount_tags_referrers() {
    let server = serve_local(Registry::in_memory(), HttpConfig::default())
        .await
        .unwrap();
    let host = server.url().trim_start_matches("http://").to_owned();
    let anon = RegistryAuth::Anonymous;

    // One-shot (monolithic) and chunked pushes of whole images.
    for (monolithic, tag) in [(true, "mono"), (false, "chunked")] {
        let layers = vec![
            ImageLayer::oci_v1(vec![7u8; 300_000], None),
            ImageLayer::oci_v1(format!("layer of {tag}").into_bytes(), None),
        ];
        let config = Config::oci_v1(format!("{{\"tag\":\"{tag}\"}}").into_bytes(), None);
        client(monolithic)
            .push(
                &reference(&host, &format!("oc/img:{tag}")),
                &layers,
                config,
                &anon,
                None,
            )
            .await
            .unwrap();
        let image = client(false)
            .pull(
                &reference(&host, &format!("oc/img:{tag}")),
                &anon,
                vec![IMAGE_LAYER_MEDIA_TYPE],
            )
            .await
            .unwrap();
        // Layers download concurrently: compare regardless of order.
        let mut got: Vec<Vec<u8>> = image.layers.iter().map(|l| l.data.to_vec()).collect();
        let mut expected: Vec<Vec<u8>> = layers.iter().map(|l| l.data.to_vec()).collect();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
    }

    // A blob streamed in several PATCH chunks.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<oci_client::errors::Result<bytes::Bytes>> = big
        .chunks(700_000)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let pushed = client(false)
        .push_blob_stream_chunked(
            &reference(&host, "oc/stream:x"),
            futures::stream::iter(chunks),
        )
        .await
        .unwrap();
    assert_eq!(pushed.blob_digest, Digest::sha256(&big).to_string());
    assert_eq!(pushed.size, big.len() as u64);

    // Cross-repository mount, then the blob is readable in the target.
    let digest = pushed.blob_digest.clone();
    client(false)
        .mount_blob(
            &reference(&host, "oc/mounted:x"),
            &reference(&host, "oc/stream:x"),
            &digest,
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    let digest_ref: Reference = format!("{host}/oc/mounted@{digest}").parse().unwrap();
    client(false)
        .pull_blob(&digest_ref, digest.as_str(), &mut out)
        .await
        .unwrap();
    assert_eq!(out, big);

    // Tags with pagination.
    let c = client(false);
    let image = reference(&host, "oc/img:mono");
    let all = c.list_tags(&image, &anon, None, None).await.unwrap();
    assert_eq!(all.tags, ["chunked", "mono"]);
    let first = c.list_tags(&image, &anon, Some(1), None).await.unwrap();
    assert_eq!(first.tags, ["chunked"]);
    let second = c
        .list_tags(&image, &anon, Some(1), Some("chunked"))
        .await
        .unwrap();
    assert_eq!(second.tags, ["mono"]);

    // Referrers: a signature manifest whose subject is the "mono" image.
    let (_, subject_digest) = c.pull_manifest(&image, &anon).await.unwrap();
    let raw_subject = c
        .pull_manifest_raw(&image, &anon, &[oci_client::manifest::OCI_IMAGE_MEDIA_TYPE])
        .await
        .unwrap();
    let sig_layers = vec![ImageLayer::oci_v1(b"signature".to_vec(), None)];
    let sig_config = Config::oci_v1(b"{}".to_vec(), None);
    let mut sig = OciImageManifest::build(&sig_layers, &sig_config, None);
    sig.artifact_type = Some("application/vnd.example.sig".into());
    sig.subject = Some(OciDescriptor {
        media_type: oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.into(),
        digest: subject_digest.clone(),
        size: raw_subject.0.len() as i64,
        ..Default::default()
    });
    c.push(
        &reference(&host, "oc/img:sig"),
        &sig_layers,
        sig_config,
        &anon,
        Some(sig),
    )
    .await
    .unwrap();
    let by_digest: Reference = format!("{host}/oc/img@{subject_digest}").parse().unwrap();
    let referrers = c.pull_referrers(&by_digest, None).await.unwrap();
    assert_eq!(referrers.manifests.len(), 1);
    assert_eq!(
        referrers.manifests[0].artifact_type.as_deref(),
        Some("application/vnd.example.sig")
    );
    let filtered = c
        .pull_referrers(&by_digest, Some("application/other"))
        .await
        .unwrap();
    assert!(filtered.manifests.is_empty());
    server.shutdown().await;
}

/// oci-client with its own auth: Basic credentials through the token flow, anonymous
/// access where the policy allows it, refusals where it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_client_authenticates() {
    use registry_core::access::{Action, Grantee, PrefixRules};
    let policy = PrefixRules::new()
        .grant(Grantee::user("ci"), "", Action::ALL)
        .grant(Grantee::Anyone, "public", Action::READ);
    let auth = registry_http::Auth::new(policy)
        .with_user("ci", "ci-secret")
        .with_token_issuer(registry_http::TokenIssuer::new("registry"));
    let registry = Registry::in_memory();
    let server = serve_local(registry.clone(), HttpConfig::default().with_auth(auth))
        .await
        .unwrap();
    let host = server.url().trim_start_matches("http://").to_owned();
    let ci = RegistryAuth::Basic("ci".into(), "ci-secret".into());
    let layers = vec![ImageLayer::oci_v1(b"authenticated layer".to_vec(), None)];
    let config = || Config::oci_v1(b"{}".to_vec(), None);

    // Refused: anonymous and wrong-password pushes; nothing is stored.
    for auth in [
        RegistryAuth::Anonymous,
        RegistryAuth::Basic("ci".into(), "nope".into()),
    ] {
        let err = client(true)
            .push(
                &reference(&host, "private/img:v1"),
                &layers,
                config(),
                &auth,
                None,
            )
            .await
            .err()
            .expect("push must be refused");
        let msg = err.to_string().to_lowercase();
        assert!(
            msg.contains("401") || msg.contains("unauthorized") || msg.contains("auth"),
            "{msg}"
        );
    }
    assert!(
        registry
            .list_repositories(&Default::default(), &registry_core::AllowAll)
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // With credentials: push to both repositories and pull back.
    for repo in ["private/img:v1", "public/img:v1"] {
        client(false)
            .push(&reference(&host, repo), &layers, config(), &ci, None)
            .await
            .unwrap();
        let image = client(false)
            .pull(&reference(&host, repo), &ci, vec![IMAGE_LAYER_MEDIA_TYPE])
            .await
            .unwrap();
        assert_eq!(image.layers[0].data.to_vec(), layers[0].data.to_vec());
    }

    // Anonymous pulls: the public repository through an anonymous token, never the
    // private one.
    let image = client(false)
        .pull(
            &reference(&host, "public/img:v1"),
            &RegistryAuth::Anonymous,
            vec![IMAGE_LAYER_MEDIA_TYPE],
        )
        .await
        .unwrap();
    assert_eq!(image.layers[0].data.to_vec(), layers[0].data.to_vec());
    client(false)
        .pull(
            &reference(&host, "private/img:v1"),
            &RegistryAuth::Anonymous,
            vec![IMAGE_LAYER_MEDIA_TYPE],
        )
        .await
        .err()
        .expect("anonymous pull of a private repository must be refused");
    server.shutdown().await;
}
