//! Memory stays flat whatever a blob's size: a layout with a 512 MiB layer is imported
//! into an fs-backed registry, exported to a directory and to an archive, and the
//! archive imported again, while the process's peak resident memory is watched.
//!
//! How it is measured: before each step the kernel's peak-RSS mark is reset
//! (`echo 5 > /proc/self/clear_refs`), after it `VmHWM` in `/proc/self/status` is the
//! highest RSS reached during the step; the growth over the RSS at the reset must stay
//! under 200 MiB (a buffered blob would add 512 MiB). Its own test binary, so that no
//! other test's allocations land in the measurement. `LAYOUT_MEMORY_TEST_MIB` changes
//! the size (512 to 2048 are sensible); the figures are printed (`--nocapture`).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use common::*;
use registry_core::{Digest, Hasher, Registry, media_type};
use registry_layout::{
    ExportOptions, ExportSelection, ImportOptions, export_archive, export_layout, import_archive,
    import_layout,
};

const MAX_GROWTH: u64 = 200 * 1024 * 1024;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Resets the peak mark; returns the RSS it starts from, in bytes.
fn reset_peak() -> u64 {
    // Linux only; without it the mark is the process's whole-life peak, which only makes
    // the check stricter.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_kib("VmRSS:") * 1024
}

fn peak() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// Runs one step, prints its time and memory growth, and checks the growth.
async fn measured<T>(what: &str, size: u64, step: impl std::future::Future<Output = T>) -> T {
    let start_rss = reset_peak();
    let started = Instant::now();
    let out = step.await;
    let secs = started.elapsed().as_secs_f64();
    let growth = peak().saturating_sub(start_rss);
    eprintln!(
        "{what}: {:.1} s ({:.0} MiB/s), peak RSS {} MiB, growth {} MiB",
        secs,
        size as f64 / 1048576.0 / secs,
        peak() / 1048576,
        growth / 1048576
    );
    assert!(
        growth < MAX_GROWTH,
        "{what}: peak RSS grew by {} MiB: something buffers a blob",
        growth / 1048576
    );
    out
}

/// A layout with one image whose only layer is `size` bytes: a little random data and
/// then zeros (a sparse file: quick to make, as slow to hash and copy as any other).
fn big_layout(dir: &Path, size: u64) -> Digest {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let tmp = blobs.join("layer.tmp");
    let mut file = std::fs::File::create(&tmp).unwrap();
    let head: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    file.write_all(&head).unwrap();
    file.set_len(size).unwrap();
    drop(file);
    let mut hasher = Hasher::new(registry_core::Algorithm::Sha256);
    let mut file = std::fs::File::open(&tmp).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let layer = (hasher.finish(), size);
    std::fs::rename(&tmp, blobs.join(layer.0.hex())).unwrap();
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let config_d = (Digest::sha256(config), config.len() as u64);
    std::fs::write(blobs.join(config_d.0.hex()), config).unwrap();
    let manifest = image_json(&config_d, &[layer], None, None);
    let m = Digest::sha256(manifest.as_bytes());
    std::fs::write(blobs.join(m.hex()), &manifest).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{m}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"big"}}}}]}}"#,
        media_type::OCI_MANIFEST,
        manifest.len()
    );
    std::fs::write(dir.join("index.json"), index).unwrap();
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_layer_moves_in_flat_memory() {
    let mib: u64 = std::env::var("LAYOUT_MEMORY_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let size = mib * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let manifest = big_layout(&layout, size);
    let storage = registry_store_fs::FsStore::open(dir.path().join("store"))
        .await
        .unwrap()
        .into_storage();
    let registry = Registry::builder(storage).build();
    let r = repo("big/image");

    let report = measured(
        "import (layout directory)",
        size,
        import_layout(&registry, &r, &layout, &ImportOptions::default()),
    )
    .await
    .unwrap();
    assert_eq!(report.tagged, vec![(tag("big"), manifest.clone())]);
    assert_eq!(report.bytes_uploaded, size + 37);

    let sel = ExportSelection::repository(r.clone(), vec![]);
    let out = dir.path().join("exported");
    measured(
        "export (layout directory)",
        size,
        export_layout(&registry, &sel, &out, &ExportOptions::default()),
    )
    .await
    .unwrap();
    assert_eq!(
        index_entries(&out),
        vec![("big".to_owned(), manifest.to_string())]
    );
    std::fs::remove_dir_all(&out).unwrap();

    let archive = dir.path().join("exported.tar");
    measured(
        "export (archive)",
        size,
        export_archive(&registry, &sel, &archive, &ExportOptions::default()),
    )
    .await
    .unwrap();
    std::fs::remove_dir_all(&layout).unwrap();

    let other = Registry::builder(
        registry_store_fs::FsStore::open(dir.path().join("store2"))
            .await
            .unwrap()
            .into_storage(),
    )
    .build();
    drop(registry);
    let options = ImportOptions::default().with_staging_dir(dir.path());
    let report = measured(
        "import (archive, staged)",
        size,
        import_archive(&other, &r, &archive, &options),
    )
    .await
    .unwrap();
    assert_eq!(report.tagged, vec![(tag("big"), manifest)]);
}
