//! The usual process metrics, with the names every Prometheus client library uses
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...), read from
//! `/proc/self` when scraped. Linux only: elsewhere nothing is emitted (rather than
//! zeros that would read as facts).
//!
//! Read without `libc` (the workspace forbids `unsafe`): CPU times in `/proc` are in
//! `USER_HZ` ticks, which the kernel fixes at 100 per second for user space on every
//! architecture, and memory comes from `/proc/self/status` in kB, so neither the clock
//! tick nor the page size has to be asked for.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// `USER_HZ`: the unit of the CPU times in `/proc/self/stat`.
const TICKS_PER_SECOND: f64 = 100.0;

/// Emits the process metrics when scraped.
#[derive(Debug)]
pub(crate) struct ProcessCollector;

/// One reading of `/proc/self`.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct ProcessStats {
    pub(crate) cpu_seconds: Option<f64>,
    pub(crate) start_time_seconds: Option<f64>,
    pub(crate) threads: Option<i64>,
    pub(crate) resident_bytes: Option<i64>,
    pub(crate) virtual_bytes: Option<i64>,
    pub(crate) open_fds: Option<i64>,
    pub(crate) max_fds: Option<i64>,
}

impl ProcessStats {
    /// Reads `/proc/self`; a field that cannot be read stays `None`.
    pub(crate) fn read() -> ProcessStats {
        let mut s = ProcessStats::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            let boot = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|t| parse_boot_time(&t));
            s.parse_stat(&stat, boot);
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            s.resident_bytes = status_kib(&status, "VmRSS:").map(|k| k * 1024);
            s.virtual_bytes = status_kib(&status, "VmSize:").map(|k| k * 1024);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory's own handle, open while it is read, is one of the entries.
            s.open_fds = Some(dir.count() as i64 - 1);
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            s.max_fds = parse_max_open_files(&limits);
        }
        s
    }

    /// `/proc/self/stat`: the command name is in parentheses and may hold spaces or
    /// parentheses itself, so fields are counted from the last `)`.
    fn parse_stat(&mut self, stat: &str, boot_time: Option<f64>) {
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return;
        };
        // Fields from the 3rd (state) on; utime is the 14th, stime the 15th,
        // num_threads the 20th, starttime the 22nd.
        let fields: Vec<&str> = after.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        if let (Some(utime), Some(stime)) = (field(14), field(15)) {
            self.cpu_seconds = Some((utime + stime) as f64 / TICKS_PER_SECOND);
        }
        self.threads = field(20).map(|t| t as i64);
        if let (Some(start), Some(boot)) = (field(22), boot_time) {
            self.start_time_seconds = Some(boot + start as f64 / TICKS_PER_SECOND);
        }
    }
}

/// `btime` of `/proc/stat`: when the machine booted, in Unix seconds.
fn parse_boot_time(stat: &str) -> Option<f64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// A `Key:   1234 kB` line of `/proc/self/status`, in kB.
fn status_kib(status: &str, key: &str) -> Option<i64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn parse_max_open_files(limits: &str) -> Option<i64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    // "unlimited" has no number to report.
    soft.parse().ok()
}

fn counter(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: f64) -> fmt::Result {
    let metric = ConstCounter::new(v);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge<N>(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: N) -> fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let metric = ConstGauge::new(v);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        if !cfg!(target_os = "linux") {
            return Ok(());
        }
        let s = ProcessStats::read();
        let e = &mut encoder;
        if let Some(v) = s.cpu_seconds {
            // Registered without `_total`: the encoders add it to counters.
            counter(
                e,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                v,
            )?;
        }
        if let Some(v) = s.resident_bytes {
            gauge(
                e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                v,
            )?;
        }
        if let Some(v) = s.virtual_bytes {
            gauge(
                e,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                v,
            )?;
        }
        if let Some(v) = s.open_fds {
            gauge(e, "process_open_fds", "Number of open file descriptors", v)?;
        }
        if let Some(v) = s.max_fds {
            gauge(
                e,
                "process_max_fds",
                "Maximum number of open file descriptors",
                v,
            )?;
        }
        if let Some(v) = s.threads {
            gauge(
                e,
                "process_threads",
                "Number of OS threads in the process",
                v,
            )?;
        }
        if let Some(v) = s.start_time_seconds {
            gauge(
                e,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                v,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_parsed_from_the_last_parenthesis() {
        let stat = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 1000 0 0 0 250 50 0 0 \
                    20 0 7 0 10000 123456789 2000 18446744073709551615";
        let mut s = ProcessStats::default();
        s.parse_stat(stat, Some(1_700_000_000.0));
        assert_eq!(s.cpu_seconds, Some(3.0));
        assert_eq!(s.threads, Some(7));
        assert_eq!(s.start_time_seconds, Some(1_700_000_100.0));
    }

    #[test]
    fn status_limits_and_boot_time() {
        let status = "Name:\tserve\nVmSize:\t  123456 kB\nVmRSS:\t    2048 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(2048));
        assert_eq!(status_kib(status, "VmSize:"), Some(123456));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 1048576              files\n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        assert_eq!(
            parse_boot_time("cpu 1 2 3\nbtime 1700000000\n"),
            Some(1_700_000_000.0)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reads() {
        let s = ProcessStats::read();
        assert!(s.cpu_seconds.is_some());
        assert!(s.resident_bytes.is_some_and(|r| r > 0));
        assert!(s.open_fds.is_some_and(|n| n > 0));
        assert!(s.start_time_seconds.is_some_and(|t| t > 1_000_000_000.0));
    }
}
