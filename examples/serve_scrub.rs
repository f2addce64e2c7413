//! `serve`'s background scrub of the fs store (`--scrub-every`, `--scrub-rate`): every
//! blob file hashed at a bounded rate, so that bytes rotting below the file system are
//! found while the process runs (verified reads skip files already verified and
//! unchanged, which would otherwise keep serving them). See `docs/design.md` §5.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeMetric;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use registry_http::{Metrics, MetricsEncoder};
use registry_store_fs::{FsStore, ScrubOptions, ScrubStats, Scrubber};
use tokio::sync::watch;

/// The scrubber of the fs store `open_blob_storage` opened for serving: taken there,
/// before the store becomes a `Storage`, and started by `start` once the server runs.
/// One fs store per process, so one slot.
static SCRUBBER: OnceLock<Scrubber> = OnceLock::new();

/// The first pass waits at most this long after start: benchmarks and tests that start
/// a server and use it at once are not disturbed.
const FIRST_PASS_AFTER: Duration = Duration::from_secs(10 * 60);

/// Keeps `store`'s scrubber for [`start`] (the first store opened wins).
pub(crate) fn keep(store: &FsStore) {
    let _ = SCRUBBER.set(store.scrubber());
}

/// `--scrub-rate`: a number of bytes, or one with a binary unit (`512KiB`, `32MiB`,
/// `1GiB`).
pub(crate) fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "kib" | "k" => 10,
        "mib" | "m" => 20,
        "gib" | "g" => 30,
        _ => {
            return Err(format!(
                "{s:?}: expected bytes per second like 32MiB, 512KiB or 1048576"
            ));
        }
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected bytes per second like 32MiB, 512KiB or 1048576"))?;
    match n.checked_mul(1 << shift) {
        Some(0) | None => Err(format!("{s:?}: expected a rate above 0 (and below 16 EiB)")),
        Some(rate) => Ok(rate),
    }
}

/// Runs a pass every `every` (from the start of one to the start of the next; the first
/// one after the smaller of `every` and 10 minutes), at `rate` bytes per second, until
/// `stop` says stop (a pass in progress ends early). Nothing without an fs store or
/// with `every` zero. Each pass's report is logged at info; each corrupt file is logged
/// at error by the store as the pass finds it. With `metrics`, the scrub's counters are
/// in every scrape.
pub(crate) fn start(
    every: Duration,
    rate: u64,
    mut stop: watch::Receiver<bool>,
    metrics: Option<&Metrics>,
) {
    let Some(scrubber) = SCRUBBER.get().cloned() else {
        return;
    };
    if every.is_zero() {
        tracing::info!("scrub: off (--scrub-every 0)");
        return;
    }
    if let Some(metrics) = metrics {
        metrics.register_encoder(scrub_metrics(scrubber.clone()));
    }
    let options = ScrubOptions::default()
        .with_max_bytes_per_sec(rate)
        .with_stop(stop.clone());
    tokio::spawn(async move {
        let mut next = tokio::time::Instant::now() + every.min(FIRST_PASS_AFTER);
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep_until(next) => {}
            }
            next = tokio::time::Instant::now() + every;
            match scrubber.run_pass(&options).await {
                Ok(report) => tracing::info!("scrub: {report}"),
                Err(e) => {
                    tracing::warn!(error = %e, "scrub: the pass failed; the next one retries")
                }
            }
        }
    });
}

/// The scrub's counters (`registry_scrub_passes`, `_files`, `_bytes`, `_errors`) and
/// gauges (`registry_scrub_corrupt_files`, `registry_scrub_last_pass_end_seconds`), read
/// at each scrape: alert on corrupt files above 0, or on a last pass older than two
/// intervals (a scrub that stopped running).
fn scrub_metrics(scrubber: Scrubber) -> MetricsEncoder {
    type Read = fn(&ScrubStats) -> u64;
    let counters: [(&str, &str, Read); 4] = [
        (
            "registry_scrub_passes",
            "Scrub passes over the fs store's blob files that reached their end",
            |s| s.passes,
        ),
        (
            "registry_scrub_files",
            "Blob files hashed by the scrub",
            |s| s.files,
        ),
        (
            "registry_scrub_bytes",
            "Bytes of blob files hashed by the scrub",
            |s| s.bytes,
        ),
        (
            "registry_scrub_errors",
            "Blob files or directories the scrub could not read",
            |s| s.read_errors,
        ),
    ];
    let gauges: [(&str, &str, Read); 2] = [
        (
            "registry_scrub_corrupt_files",
            "Blob files the scrub found not matching their digest: refused by reads until the blob is pushed again",
            |s| s.corrupt_files,
        ),
        (
            "registry_scrub_last_pass_end_seconds",
            "When the last complete scrub pass ended, in seconds since the Unix epoch (0: none yet)",
            |s| s.last_pass_end,
        ),
    ];
    Box::new(move |encoder| {
        let stats = scrubber.stats();
        for (name, help, read) in counters {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(read(&stats)).encode(metric)?;
        }
        for (name, help, read) in gauges {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(read(&stats) as i64).encode(metric)?;
        }
        Ok(())
    })
}
