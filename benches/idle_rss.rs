//! Resident memory per idle in-memory registry: builds 1,000 `Registry::in_memory()` and
//! keeps them alive, reading `VmRSS` from `/proc/self/status` before and after.
//! `cargo bench -p registry-benches --bench idle_rss` (Linux only; prints one line).
//!
//! A separate bench target, not a criterion group, so that the figure is taken in a
//! fresh process: after other benchmarks, freed heap pages would be reused and hide the
//! growth.

use registry_core::Registry;

const REGISTRIES: usize = 1_000;

/// `VmRSS` of this process in KiB, from `/proc/self/status`.
fn vm_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn main() {
    // `cargo bench` passes `--bench` (and filters); nothing here takes arguments.
    let Some(before) = vm_rss_kib() else {
        println!("idle_rss: /proc/self/status unavailable; nothing measured");
        return;
    };
    let registries: Vec<Registry> = (0..REGISTRIES).map(|_| Registry::in_memory()).collect();
    let after = vm_rss_kib().unwrap_or(before);
    let per = (after.saturating_sub(before) as f64) * 1024.0 / REGISTRIES as f64;
    println!(
        "idle_rss: {REGISTRIES} idle in-memory registries: VmRSS {before} KiB -> {after} KiB, \
         {:.1} KiB per registry",
        per / 1024.0
    );
    // One subscriber on each: what a registry costs once somebody listens to its events.
    let receivers: Vec<_> = registries.iter().map(Registry::subscribe).collect();
    let subscribed = vm_rss_kib().unwrap_or(after);
    println!(
        "idle_rss: with one event subscriber each: VmRSS {subscribed} KiB, {:.1} KiB more per registry",
        subscribed.saturating_sub(after) as f64 / REGISTRIES as f64
    );
    drop(receivers);
    drop(registries);
}
