//! Micro-benchmarks of the hot core paths on each store (memory, fs, bucket) and of an
//! ephemeral registry on a loopback port: `cargo bench -p registry-benches --bench core`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use futures::stream;
use registry_core::{
    Digest, ManifestInfo, PutManifestOptions, Reference, Registry, RepoName, Tag, media_type,
};

const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824","size":5},{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:486ea46224d1bb4fb680f34f7c9ad96a8f24ec88be73ea8e5a6c65260e9cb8a7","size":5}],"annotations":{"org.opencontainers.image.created":"2026-11-23T00:00:00Z"}}"#;

fn parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    let d = Digest::sha256(b"x").to_string();
    g.bench_function("digest", |b| {
        b.iter(|| Digest::parse(black_box(&d)).unwrap())
    });
    g.bench_function("repo_name", |b| {
        b.iter(|| RepoName::parse(black_box("my-org/team.x/app_name")).unwrap())
    });
    g.bench_function("reference_tag", |b| {
        b.iter(|| Reference::parse(black_box("v1.2.3-rc.1")).unwrap())
    });
    g.finish();
}

fn inspection(c: &mut Criterion) {
    let mut g = c.benchmark_group("manifest");
    g.throughput(Throughput::Bytes(MANIFEST.len() as u64));
    g.bench_function("inspect_image", |b| {
        b.iter(|| {
            ManifestInfo::inspect(media_type::OCI_MANIFEST, black_box(MANIFEST.as_bytes())).unwrap()
        })
    });
    g.finish();
    let mut g = c.benchmark_group("hash");
    let mib = vec![7u8; 1 << 20];
    g.throughput(Throughput::Bytes(mib.len() as u64));
    g.bench_function("sha256_1MiB", |b| {
        b.iter(|| Digest::sha256(black_box(&mib)))
    });
    g.finish();
}

fn body(data: &Bytes) -> registry_core::ByteStream {
    stream::iter([Ok(data.clone())]).boxed()
}

fn memory_store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("memory_store");
    // Built and dropped, then each half alone: `iter_with_large_drop` leaves the drop
    // out of the timing, `iter_batched` builds outside it and times the drop only.
    g.bench_function("registry_ready_and_dropped", |b| {
        b.iter(|| drop(black_box(Registry::in_memory())))
    });
    g.bench_function("registry_ready", |b| {
        b.iter_with_large_drop(|| black_box(Registry::in_memory()))
    });
    g.bench_function("registry_dropped", |b| {
        b.iter_batched(Registry::in_memory, drop, BatchSize::SmallInput)
    });
    g.finish();
    hot_paths(c, "memory_store", &rt, &Registry::in_memory());
}

/// What an integration test harness pays for an ephemeral registry over HTTP: an
/// in-memory registry served on a loopback port, one `GET /v2/` answered 200 over a
/// fresh connection, then a graceful shutdown that waits for the server task.
fn loopback(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("loopback");
    // One block_on around all iterations, as a test harness's runtime would run them.
    g.bench_function("serve_local_first_200_and_shutdown", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    serve_answer_and_shut_down().await;
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

async fn serve_answer_and_shut_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server =
        registry_http::serve_local(Registry::in_memory(), registry_http::HttpConfig::default())
            .await
            .unwrap();
    let mut conn = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    conn.write_all(b"GET /v2/ HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    while !is_complete_response(&reply) {
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before the whole response");
        reply.extend_from_slice(&chunk[..n]);
    }
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "GET /v2/ did not answer 200"
    );
    // Reset instead of a FIN handshake: a closed connection leaves a socket in
    // TIME_WAIT for a minute, and tens of thousands of iterations would exhaust the
    // ephemeral ports and time the kernel's port search instead of the registry.
    conn.set_zero_linger().unwrap();
    drop(conn);
    server.shutdown().await;
}

/// Whether `reply` holds a whole response: the head and `Content-Length` bytes of body.
fn is_complete_response(reply: &[u8]) -> bool {
    let Some(head_end) = reply.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&reply[..head_end]).to_ascii_lowercase();
    let body_len: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    reply.len() >= head_end + 4 + body_len
}

/// The same hot paths on the fs store (files and redb in a temp dir): every write pays
/// its fsyncs, so these show the durable cost per operation.
fn fs_store(c: &mut Criterion) {
    // Blocking file work goes to the runtime's blocking pool, which needs `rt`.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = rt
        .block_on(registry_store_fs::FsStore::open(dir.path()))
        .unwrap();
    let registry = Registry::builder(store).build();
    hot_paths(c, "fs_store", &rt, &registry);
}

/// The same hot paths on the bucket store over object_store's in-memory backend: the
/// cost of our side of object storage (the metadata log with its freshness reads,
/// session objects, conditional writes) without a network. Against S3 or Azure each of
/// those requests is a round trip; the emulator tests show them, not time them.
fn bucket_store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bucket = std::sync::Arc::new(registry_store_object::object_store::memory::InMemory::new());
    let store = rt
        .block_on(registry_store_object::BucketStore::open(bucket))
        .unwrap();
    let registry = Registry::builder(store).build();
    hot_paths(c, "bucket_store", &rt, &registry);
}

/// Blob push and pull, manifest push, get and stat, on `registry`.
fn hot_paths(c: &mut Criterion, name: &str, rt: &tokio::runtime::Runtime, registry: &Registry) {
    let mut g = c.benchmark_group(name);
    let repo = RepoName::parse("bench/app").unwrap();
    let blob = Bytes::from(vec![1u8; 64 * 1024]);
    let blob_digest = Digest::sha256(&blob);
    g.throughput(Throughput::Bytes(blob.len() as u64));
    g.bench_function("put_blob_64KiB", |b| {
        b.iter(|| {
            rt.block_on(registry.put_blob(
                &repo,
                &blob_digest,
                Some(blob.len() as u64),
                body(&blob),
            ))
            .unwrap()
        })
    });
    g.bench_function("get_blob_64KiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut s = registry
                    .get_blob(&repo, &blob_digest, None)
                    .await
                    .unwrap()
                    .stream;
                while let Some(c) = s.next().await {
                    black_box(c.unwrap());
                }
            })
        })
    });

    // A manifest referencing two small blobs, pushed under a fresh tag each time.
    for data in [&b"{}"[..], b"hello", b"world"] {
        let data = Bytes::copy_from_slice(data);
        rt.block_on(registry.put_blob(&repo, &Digest::sha256(&data), None, body(&data)))
            .unwrap();
    }
    let manifest = Bytes::from_static(MANIFEST.as_bytes());
    g.throughput(Throughput::Elements(1));
    let mut n = 0u64;
    g.bench_function("put_manifest_new_tag", |b| {
        b.iter(|| {
            n += 1;
            let tag = Reference::Tag(Tag::parse(&format!("t{n}")).unwrap());
            rt.block_on(registry.put_manifest(
                &repo,
                &tag,
                media_type::OCI_MANIFEST,
                manifest.clone(),
                PutManifestOptions::default(),
            ))
            .unwrap()
        })
    });
    let by_tag = Reference::Tag(Tag::parse("t1").unwrap());
    g.bench_function("get_manifest_by_tag", |b| {
        b.iter(|| rt.block_on(registry.get_manifest(&repo, &by_tag)).unwrap())
    });
    g.bench_function("stat_manifest_by_tag", |b| {
        b.iter(|| rt.block_on(registry.stat_manifest(&repo, &by_tag)).unwrap())
    });
    g.finish();
}

/// What a test harness pays for a registry holding a known image: an in-memory
/// registry built, then a 3-layer image (1, 4 and 16 KiB, seeded) described with
/// `registry_core::fixtures` and pushed (config, layers, manifest: 5 hashes of the
/// content, 4 blob commits, one manifest commit), then dropped. Also the fixture's
/// bytes alone, to show what of that is generating and hashing them.
fn fixtures_preload(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let repo = RepoName::parse("bench/fixture").unwrap();
    let image = registry_core::fixtures::image()
        .layers([1024, 4096, 16384])
        .seed(7);
    let mut g = c.benchmark_group("fixtures");
    g.bench_function("build_3_layer_image", |b| {
        b.iter(|| black_box(image.build().unwrap()))
    });
    g.bench_function("registry_build_and_preload_3_layer_image", |b| {
        b.iter(|| {
            rt.block_on(async {
                let registry = Registry::in_memory();
                let pushed = image.push(&registry, &repo, "v1").await.unwrap();
                black_box((registry, pushed))
            })
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    parsing,
    inspection,
    fixtures_preload,
    memory_store,
    loopback,
    fs_store,
    bucket_store
);
criterion_main!(benches);
