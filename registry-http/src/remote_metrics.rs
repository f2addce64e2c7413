//! Metrics of the registries this one talks to: the pull-through cache
//! (`registry_proxy_*`) and push mirrors (`registry_mirror_*`), as encoders for
//! [`Metrics::register_encoder`](crate::Metrics::register_encoder).

use prometheus_client::encoding::EncodeMetric;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use registry_core::proxy::ProxyStats;
use registry_core::{MirrorStatus, MirrorWatch, Registry};

use crate::MetricsEncoder;

/// The pull-through cache's counters of `registry` (nothing without upstreams):
/// hits and fetches of manifests and blobs, tag checks, bytes fetched, failed fetches
/// and tags served stale.
pub fn proxy_metrics(registry: Registry) -> MetricsEncoder {
    type Read = fn(&ProxyStats) -> u64;
    let counters: [(&str, &str, Read); 9] = [
        (
            "registry_proxy_manifest_hits",
            "Manifest reads of the pull-through cache answered without a fetch",
            |s| s.manifest_hits,
        ),
        (
            "registry_proxy_manifest_fetches",
            "Manifests fetched from upstreams",
            |s| s.manifest_fetches,
        ),
        (
            "registry_proxy_tag_checks",
            "Tags checked with their upstream after their TTL",
            |s| s.tag_checks,
        ),
        (
            "registry_proxy_blob_hits",
            "Blob reads of the pull-through cache answered from storage",
            |s| s.blob_hits,
        ),
        (
            "registry_proxy_blob_fetches",
            "Blob fetches started from upstreams",
            |s| s.blob_fetches,
        ),
        (
            "registry_proxy_blob_joins",
            "Blob reads that joined a fetch in flight",
            |s| s.blob_joins,
        ),
        (
            "registry_proxy_upstream_bytes",
            "Bytes of blobs received from upstreams",
            |s| s.upstream_bytes,
        ),
        (
            "registry_proxy_failed_fetches",
            "Blob fetches from upstreams that failed (nothing stored)",
            |s| s.failed_fetches,
        ),
        (
            "registry_proxy_stale_served",
            "Tags served from the cache while their upstream was unreachable",
            |s| s.stale_served,
        ),
    ];
    Box::new(move |encoder| {
        let Some(stats) = registry.proxy_stats() else {
            return Ok(());
        };
        for (name, help, read) in counters {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(read(&stats)).encode(m)?;
        }
        Ok(())
    })
}

/// Each mirror's progress, labelled `target`: its lag in outbox events, whether this
/// process holds its lease, and its copies, deletes and failures.
pub fn mirror_metrics(mirrors: Vec<MirrorWatch>) -> MetricsEncoder {
    type Read = fn(&MirrorStatus) -> u64;
    let gauges: [(&str, &str, Read); 2] = [
        (
            "registry_mirror_lag_events",
            "Outbox events not copied to the mirror yet (in the copying process)",
            |s| s.lag,
        ),
        (
            "registry_mirror_active",
            "Whether this process holds the mirror's lease",
            |s| u64::from(s.active),
        ),
    ];
    let counters: [(&str, &str, Read); 4] = [
        (
            "registry_mirror_copied_images",
            "Images copied to the mirror",
            |s| s.copied,
        ),
        (
            "registry_mirror_deletes",
            "Tags and manifests deleted in the mirror",
            |s| s.deleted,
        ),
        (
            "registry_mirror_failures",
            "Copies or deletes that failed (retried, or passed over when refused for good)",
            |s| s.failures,
        ),
        (
            "registry_mirror_missed_events",
            "Outbox events trimmed before the mirror read them",
            |s| s.missed,
        ),
    ];
    Box::new(move |encoder| {
        let statuses: Vec<MirrorStatus> = mirrors.iter().map(MirrorWatch::status).collect();
        for (name, help, read) in gauges {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in &statuses {
                let labels = [("target", s.name.as_str())];
                ConstGauge::new(read(s) as i64).encode(m.encode_family(&labels)?)?;
            }
        }
        for (name, help, read) in counters {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &statuses {
                let labels = [("target", s.name.as_str())];
                ConstCounter::new(read(s)).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    })
}
