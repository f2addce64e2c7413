//! `RemoteRegistry` against real registries: registry-http serving in-memory
//! registries on 127.0.0.1, without authentication, with Basic users and with its
//! token server. Transfers and syncs in both directions, every sink and source
//! operation, and the authentication flow.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::Request;
use axum::middleware::Next;
use bytes::Bytes;
use futures::StreamExt;
use registry_core::access::{Action, Grantee, PrefixRules};
use registry_core::promote::PromoteError;
use registry_core::{
    ByteStream, Digest, Error, ImageSink, ImageSource, ListOptions, PromoteOptions, Reference,
    Registry, Tag, fixtures, media_type, sync, transfer,
};
use registry_http::{Auth, HttpConfig, TokenIssuer, router, serve_local};
use registry_remote::{Credentials, RemoteRegistry};

use common::*;

#[tokio::test]
async fn transfer_copies_images_and_indexes_both_ways() {
    let origin = Registry::in_memory();
    let src = repo("ci/app");
    let image = fixtures::image()
        .layers([1024, 300_000])
        .seed(1)
        .push(&origin, &src, "v1")
        .await
        .unwrap();
    let index = fixtures::index()
        .platforms(["linux/amd64", "linux/arm64"])
        .seed(2)
        .push(&origin, &src, "multi")
        .await
        .unwrap();
    let signature = fixtures::signature(&index.index)
        .push_untagged(&origin, &src)
        .await
        .unwrap();

    let served = Registry::in_memory();
    let server = serve_local(served.clone(), HttpConfig::default())
        .await
        .unwrap();
    let remote = RemoteRegistry::new(server.url()).unwrap();
    let dst = repo("mirror/app");

    // Local to remote.
    let report = transfer(
        &origin,
        &src,
        &image.manifest.digest,
        &remote,
        &dst,
        &tagged("v1"),
    )
    .await
    .unwrap();
    assert_eq!((report.manifests_copied, report.blobs_streamed), (1, 3));
    assert_eq!(report.bytes_streamed, image.config.size + 1024 + 300_000);
    let report = transfer(
        &origin,
        &src,
        &index.index.digest,
        &remote,
        &dst,
        &tagged("multi"),
    )
    .await
    .unwrap();
    // The index, its two children and the signature.
    assert_eq!(report.manifests_copied, 4, "{report:?}");
    assert_same(&origin, &src, &served, &dst, &image.manifest.digest).await;
    assert_same(&origin, &src, &served, &dst, &index.index.digest).await;
    for (t, d) in [
        ("v1", &image.manifest.digest),
        ("multi", &index.index.digest),
    ] {
        let m = served
            .get_manifest(&dst, &Reference::Tag(tag(t)))
            .await
            .unwrap();
        assert_eq!(&m.meta.digest, d);
    }
    // Again: everything is there, nothing is written.
    for (t, d) in [
        ("v1", &image.manifest.digest),
        ("multi", &index.index.digest),
    ] {
        let again = transfer(&origin, &src, d, &remote, &dst, &tagged(t))
            .await
            .unwrap();
        assert_eq!(
            (
                again.manifests_copied,
                again.blobs_streamed,
                again.blobs_mounted
            ),
            (0, 0, 0),
            "{again:?}"
        );
        assert!(again.manifests_skipped >= 1);
    }

    // Remote to local.
    let local = Registry::in_memory();
    let back = repo("local/app");
    for (t, d, manifests) in [
        ("multi", &index.index.digest, 4),
        ("v1", &image.manifest.digest, 1),
    ] {
        let report = transfer(&remote, &dst, d, &local, &back, &tagged(t))
            .await
            .unwrap();
        assert_eq!(report.manifests_copied, manifests, "{report:?}");
        assert_same(&served, &dst, &local, &back, d).await;
        // The remote side read through the client too.
        assert_same(&remote, &dst, &local, &back, d).await;
        let again = transfer(&remote, &dst, d, &local, &back, &tagged(t))
            .await
            .unwrap();
        assert_eq!((again.manifests_copied, again.blobs_streamed), (0, 0));
    }
    let listed = local
        .referrers(&back, &index.index.digest, None, &ListOptions::default())
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].digest, signature.manifest.digest);
}

#[tokio::test]
async fn sync_copies_every_tag_and_listings_page_through_link_headers() {
    let served = Registry::in_memory();
    let r = repo("lib/tool");
    let mut pushed = Vec::new();
    let mut images = Vec::new();
    for (i, t) in ["1.0", "1.1", "2.0", "latest"].iter().enumerate() {
        let img = fixtures::image()
            .seed(10 + i as u64)
            .push(&served, &r, t)
            .await
            .unwrap();
        pushed.push((tag(t), img.manifest.digest.clone()));
        images.push(img);
    }
    let subject = images[0].manifest.digest.clone();
    let mut signatures = Vec::new();
    for seed in 0..3 {
        let sig = fixtures::signature(&images[0].manifest)
            .seed(seed)
            .push_untagged(&served, &r)
            .await
            .unwrap();
        signatures.push(sig.manifest.digest);
    }
    signatures.sort();
    let server = serve_local(served.clone(), HttpConfig::default())
        .await
        .unwrap();
    let remote = RemoteRegistry::new(server.url()).unwrap();

    // One tag per page, following `Link`.
    let mut tags = Vec::new();
    let mut last = None;
    loop {
        let options = ListOptions {
            n: Some(1),
            last: last.take(),
        };
        let page = remote.list_tags(&r, &options).await.unwrap();
        assert!(page.items.len() <= 1);
        tags.extend(page.items);
        match page.next {
            Some(next) => last = Some(next),
            None => break,
        }
    }
    let expected: Vec<Tag> = pushed.iter().map(|(t, _)| t.clone()).collect();
    assert_eq!(tags, expected);
    // Referrers too.
    let mut listed = Vec::new();
    let mut last = None;
    loop {
        let options = ListOptions {
            n: Some(1),
            last: last.take(),
        };
        let page = remote.referrers(&r, &subject, &options).await.unwrap();
        listed.extend(page.items.into_iter().map(|d| d.digest));
        match page.next {
            Some(next) => last = Some(next),
            None => break,
        }
    }
    assert_eq!(listed, signatures);

    let local = Registry::in_memory();
    let report = sync(&remote, &r, &local, &r, &PromoteOptions::default())
        .await
        .unwrap();
    let mut copied = report.tags.clone();
    copied.sort();
    assert_eq!(copied, pushed);
    assert_eq!(report.totals.manifests_copied, 4 + 3);
    for (t, d) in &pushed {
        let m = local.get_manifest(&r, &Reference::Tag(t.clone())).await;
        assert_eq!(&m.unwrap().meta.digest, d);
        assert_same(&served, &r, &local, &r, d).await;
    }
    let again = sync(&remote, &r, &local, &r, &PromoteOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (again.totals.manifests_copied, again.totals.blobs_streamed),
        (0, 0)
    );
}

#[tokio::test]
async fn sink_and_source_operations_map_to_the_api() {
    let served = Registry::in_memory();
    let server = serve_local(served.clone(), HttpConfig::default())
        .await
        .unwrap();
    let remote = RemoteRegistry::new(server.url()).unwrap();
    remote.ping().await.unwrap();
    let r = repo("team/app");
    let image = fixtures::image().push(&served, &r, "v1").await.unwrap();

    // What is not there.
    let nope = Digest::sha256(b"not there");
    let e = remote
        .get_manifest(&r, &Reference::Tag(tag("nope")))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ManifestUnknown { reference } if reference == "nope"),
        "{e:?}"
    );
    let e = remote
        .stat_manifest(&r, &Reference::Digest(nope.clone()))
        .await;
    assert!(matches!(e, Err(Error::ManifestUnknown { .. })), "{e:?}");
    let e = remote.get_blob(&r, &nope).await.unwrap_err();
    assert!(
        matches!(&e, Error::BlobUnknown { digest } if *digest == nope),
        "{e:?}"
    );
    assert!(matches!(
        remote.stat_blob(&r, &nope).await,
        Err(Error::BlobUnknown { .. })
    ));
    assert!(!remote.has_blob(&r, &nope).await.unwrap());
    assert_eq!(remote.held_manifest(&r, &nope).await.unwrap(), None);
    assert_eq!(remote.tagged(&r, &tag("nope")).await.unwrap(), None);
    let e = remote
        .list_tags(&repo("no/such"), &ListOptions::default())
        .await;
    assert!(matches!(e, Err(Error::NameUnknown { .. })), "{e:?}");

    // What is.
    let meta = remote.stat_manifest(&r, &image.reference()).await.unwrap();
    assert_eq!(
        (meta.digest.clone(), meta.media_type.as_str(), meta.size),
        (
            image.manifest.digest.clone(),
            media_type::OCI_MANIFEST,
            image.manifest_bytes.len() as u64
        )
    );
    let by_tag = remote
        .stat_manifest(&r, &Reference::Tag(tag("v1")))
        .await
        .unwrap();
    assert_eq!(by_tag, meta);
    let held = remote
        .held_manifest(&r, &image.manifest.digest)
        .await
        .unwrap()
        .unwrap();
    let mut blobs: Vec<Digest> = std::iter::once(image.config.digest.clone())
        .chain(image.layers.iter().map(|l| l.digest.clone()))
        .collect();
    blobs.sort();
    assert_eq!((held.blobs, held.children), (blobs, vec![]));
    assert_eq!(
        remote.tagged(&r, &tag("v1")).await.unwrap(),
        Some(image.manifest.digest.clone())
    );
    let info = remote.stat_blob(&r, &image.layers[0].digest).await.unwrap();
    assert_eq!(info.size, image.layers[0].size);

    // Uploads: verified by the registry, and by us for the message.
    let hello = Digest::sha256(b"hello");
    let wrong = Digest::sha256(b"other");
    let e = remote
        .put_blob(&r, &wrong, 5, body_of(b"hello"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::DigestMismatch { expected, actual } if *expected == wrong && *actual == hello),
        "{e:?}"
    );
    let e = remote
        .put_blob(&r, &hello, 6, body_of(b"hello"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::SizeMismatch {
                expected: 6,
                actual: 5
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        remote
            .put_blob(&r, &hello, 5, body_of(b"hello"))
            .await
            .unwrap(),
        5
    );
    assert!(remote.has_blob(&r, &hello).await.unwrap());
    let stored = served.get_blob(&r, &hello, None).await.unwrap();
    assert_eq!(read_all(stored.stream).await.unwrap(), b"hello");

    // An empty blob, both ways.
    let empty = Digest::sha256(b"");
    assert_eq!(
        remote.put_blob(&r, &empty, 0, body_of(b"")).await.unwrap(),
        0
    );
    let blob = remote.get_blob(&r, &empty).await.unwrap();
    assert_eq!(
        (blob.size, read_all(blob.stream).await.unwrap().len()),
        (0, 0)
    );

    // Mounts: from a repository that has the blob, or not at all.
    let other = repo("team/other");
    assert!(remote.mount_blob(&other, &hello, Some(&r)).await.unwrap());
    assert!(served.stat_blob(&other, &hello).await.is_ok());
    assert!(!remote.mount_blob(&other, &nope, Some(&r)).await.unwrap());
    assert!(
        !remote
            .mount_blob(&other, &image.config.digest, None)
            .await
            .unwrap()
    );

    // Manifests: put by digest (verified first), tag, delete.
    let e = remote
        .put_manifest(
            &other,
            &nope,
            media_type::OCI_MANIFEST,
            image.manifest_bytes.clone(),
        )
        .await;
    assert!(matches!(e, Err(Error::DigestMismatch { .. })), "{e:?}");
    let e = remote
        .put_manifest(
            &other,
            &image.manifest.digest,
            media_type::OCI_MANIFEST,
            image.manifest_bytes.clone(),
        )
        .await;
    // Its blobs are not in `other`.
    assert!(matches!(e, Err(Error::ManifestBlobUnknown { .. })), "{e:?}");
    remote
        .tag_manifest(&r, &tag("v2"), &image.manifest.digest)
        .await
        .unwrap();
    let m = served
        .get_manifest(&r, &Reference::Tag(tag("v2")))
        .await
        .unwrap();
    assert_eq!(m.bytes, image.manifest_bytes);
    let v2 = Reference::Tag(tag("v2"));
    remote.delete_manifest(&r, &v2).await.unwrap();
    assert!(matches!(
        remote.delete_manifest(&r, &v2).await,
        Err(Error::ManifestUnknown { .. })
    ));
    assert_eq!(
        remote.tagged(&r, &tag("v1")).await.unwrap(),
        Some(image.manifest.digest.clone())
    );

    // Manifests are bounded.
    let small = remote.clone().with_max_manifest_size(64);
    let e = small.get_manifest(&r, &image.reference()).await;
    assert!(
        matches!(
            e,
            Err(Error::TooLarge {
                what: "manifest",
                limit: 64
            })
        ),
        "{e:?}"
    );
}

#[test]
fn base_urls_are_checked_and_debug_hides_the_password() {
    for bad in [
        "ftp://registry.example",
        "http://registry.example/v2/",
        "http://registry.example/team",
        "http://alice:secret@registry.example",
        "http://registry.example?x=1",
        "registry.example",
        "",
    ] {
        match RemoteRegistry::new(bad) {
            Err(Error::Upstream { reason }) => assert!(!reason.contains("secret"), "{reason}"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    let r = RemoteRegistry::new("HTTP://Registry.Example:5000/").unwrap();
    assert_eq!(r.base_url(), "http://registry.example:5000");
    let r = r.with_credentials(Credentials::basic("alice", "secret"));
    let shown = format!("{r:?}");
    assert!(
        shown.contains("alice") && !shown.contains("secret"),
        "{shown}"
    );
}

// ------------------------------------------------------------ authentication

fn users() -> Auth {
    Auth::new(PrefixRules::new().grant(Grantee::user(ALICE.0), "", Action::ALL))
        .with_user(ALICE.0, ALICE.1)
}

#[tokio::test]
async fn basic_credentials_are_sent_when_asked_for() {
    let served = Registry::in_memory();
    let r = repo("team/app");
    let image = fixtures::image().push(&served, &r, "v1").await.unwrap();
    let server = serve_local(served.clone(), HttpConfig::default().with_auth(users()))
        .await
        .unwrap();

    let anonymous = RemoteRegistry::new(server.url()).unwrap();
    assert!(matches!(anonymous.ping().await, Err(Error::Denied { .. })));
    let e = anonymous.get_manifest(&r, &image.reference()).await;
    assert!(matches!(e, Err(Error::Denied { .. })), "{e:?}");

    let remote = anonymous.clone().with_credentials(alice());
    remote.ping().await.unwrap();
    let m = remote.get_manifest(&r, &image.reference()).await.unwrap();
    assert_eq!(m.bytes, image.manifest_bytes);
    // Writes too: a transfer into another repository.
    let local = Registry::in_memory();
    let other = fixtures::image()
        .seed(3)
        .push(&local, &r, "x")
        .await
        .unwrap();
    let copy = repo("team/copy");
    transfer(
        &local,
        &r,
        &other.manifest.digest,
        &remote,
        &copy,
        &tagged("v1"),
    )
    .await
    .unwrap();
    assert_same(&local, &r, &served, &copy, &other.manifest.digest).await;

    let wrong = anonymous.with_credentials(Credentials::basic(ALICE.0, "not-her-password"));
    let e = wrong
        .get_manifest(&r, &image.reference())
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::Denied { .. }), "{e:?}");
    assert!(!e.to_string().contains("not-her-password"));
}

#[tokio::test]
async fn bearer_tokens_are_fetched_once_per_repository_and_access() {
    let served = Registry::in_memory();
    let r = repo("team/app");
    let image = fixtures::image().push(&served, &r, "v1").await.unwrap();
    let auth = users().with_token_issuer(TokenIssuer::new("registry.test"));
    let token_requests = Arc::new(AtomicUsize::new(0));
    let counter = token_requests.clone();
    let app = router(served.clone(), HttpConfig::default().with_auth(auth)).layer(
        axum::middleware::from_fn(move |req: Request, next: Next| {
            let counter = counter.clone();
            async move {
                if req.uri().path() == "/token" {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                next.run(req).await
            }
        }),
    );
    let url = serve(app).await;
    let tokens = || token_requests.load(Ordering::SeqCst);

    let remote = RemoteRegistry::new(&url).unwrap().with_credentials(alice());
    // Reads on one repository: one token (`pull`), reused.
    let m = remote.get_manifest(&r, &image.reference()).await.unwrap();
    assert_eq!(m.bytes, image.manifest_bytes);
    remote
        .stat_manifest(&r, &Reference::Tag(tag("v1")))
        .await
        .unwrap();
    remote.stat_blob(&r, &image.layers[0].digest).await.unwrap();
    let blob = remote.get_blob(&r, &image.layers[0].digest).await.unwrap();
    assert_eq!(
        read_all(blob.stream).await.unwrap().len() as u64,
        image.layers[0].size
    );
    remote.list_tags(&r, &ListOptions::default()).await.unwrap();
    assert_eq!(tokens(), 1);

    // Writes: one more token (`pull,push`), for every request of the transfer.
    let local = Registry::in_memory();
    let first = fixtures::image()
        .seed(4)
        .push(&local, &r, "a")
        .await
        .unwrap();
    let second = fixtures::image()
        .seed(5)
        .push(&local, &r, "b")
        .await
        .unwrap();
    transfer(
        &local,
        &r,
        &first.manifest.digest,
        &remote,
        &r,
        &tagged("a"),
    )
    .await
    .unwrap();
    assert_eq!(tokens(), 2);
    transfer(
        &local,
        &r,
        &second.manifest.digest,
        &remote,
        &r,
        &tagged("b"),
    )
    .await
    .unwrap();
    assert_eq!(tokens(), 2);
    assert_same(&local, &r, &served, &r, &second.manifest.digest).await;

    // A mount asks for two scopes at once (push here, pull there): one more token.
    let copy = repo("team/copy");
    let layer = &image.layers[0].digest;
    assert!(remote.mount_blob(&copy, layer, Some(&r)).await.unwrap());
    assert!(served.stat_blob(&copy, layer).await.is_ok());
    assert_eq!(tokens(), 3);

    // An anonymous token does not open the repository; a wrong password gets none.
    let anonymous = RemoteRegistry::new(&url).unwrap();
    let e = anonymous.get_manifest(&r, &image.reference()).await;
    assert!(matches!(e, Err(Error::Denied { .. })), "{e:?}");
    let wrong = anonymous.with_credentials(Credentials::basic(ALICE.0, "guess"));
    let e = wrong.get_manifest(&r, &image.reference()).await;
    assert!(matches!(e, Err(Error::Denied { .. })), "{e:?}");
}

#[tokio::test]
async fn a_failing_source_stream_is_reported_as_such() {
    let served = Registry::in_memory();
    let server = serve_local(served.clone(), HttpConfig::default())
        .await
        .unwrap();
    let remote = RemoteRegistry::new(server.url()).unwrap();
    let r = repo("team/app");
    let failing: ByteStream = futures::stream::iter([
        Ok(Bytes::from_static(b"hel")),
        Err(std::io::Error::other("source went away")),
    ])
    .boxed();
    let e = remote
        .put_blob(&r, &Digest::sha256(b"hello"), 5, failing)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::BodyIncomplete { reason } if reason.contains("source went away")),
        "{e:?}"
    );
    assert!(
        !remote
            .has_blob(&r, &Digest::sha256(b"hello"))
            .await
            .unwrap()
    );

    // And a promotion from a failing remote source names the source.
    let local = Registry::in_memory();
    let image = fixtures::image().push(&served, &r, "v1").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let broken = RemoteRegistry::new(&closed).unwrap().with_retries(0);
    let e = transfer(
        &broken,
        &r,
        &image.manifest.digest,
        &local,
        &r,
        &tagged("v1"),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, PromoteError::Source { .. }), "{e:?}");
}
