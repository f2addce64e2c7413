//! Serves an OCI registry: `cargo run --release --example serve` listens on
//! 127.0.0.1:5000.
//!
//! Flags (kept stable, scripts use them): `--addr HOST:PORT`, `--data-dir DIR`,
//! `--storage memory|fs`, `--max-manifest-size BYTES`, `--gc-interval SECS`,
//! `--gc-window SECS`, `--read-only`, `--no-deletes`. Logs go through `tracing`
//! (`RUST_LOG=debug` for more).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use registry_core::{GcOptions, Registry, Storage};
use registry_http::HttpConfig;

#[derive(Parser, Debug)]
#[command(about = "Serve an OCI registry")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:5000")]
    addr: SocketAddr,
    /// Where the fs storage keeps its data.
    #[arg(long, default_value = "./registry-data")]
    data_dir: PathBuf,
    /// Storage backend.
    #[arg(long, value_enum, default_value_t = StorageKind::Memory)]
    storage: StorageKind,
    /// Largest manifest accepted, in bytes.
    #[arg(long, default_value_t = registry_core::registry::DEFAULT_MAX_MANIFEST_SIZE)]
    max_manifest_size: u64,
    /// Collect garbage every SECS seconds (0: never).
    #[arg(long, default_value_t = 0)]
    gc_interval: u64,
    /// Protection window of uploaded blobs, in seconds.
    #[arg(long, default_value_t = 600)]
    gc_window: u64,
    /// Refuse all writes.
    #[arg(long)]
    read_only: bool,
    /// Refuse deletes of manifests and blobs.
    #[arg(long)]
    no_deletes: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StorageKind {
    /// In memory: gone when the process exits.
    Memory,
    /// Files and redb under --data-dir.
    Fs,
}

fn open_storage(args: &Args) -> Result<Storage, String> {
    match args.storage {
        StorageKind::Memory => Ok(registry_core::MemoryStore::new().into_storage()),
        StorageKind::Fs => Err(format!(
            "fs storage is not available in this build yet (data dir {}); use --storage memory",
            args.data_dir.display()
        )),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let storage = open_storage(&args)?;
    let registry = Registry::builder(storage)
        .with_max_manifest_size(args.max_manifest_size)
        .with_protection_window(Duration::from_secs(args.gc_window))
        .build();
    let config = HttpConfig::default()
        .with_read_only(args.read_only)
        .with_deletes(!args.no_deletes);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if args.gc_interval > 0 {
        let registry = registry.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            registry
                .run_collector(
                    Duration::from_secs(args.gc_interval),
                    GcOptions::default(),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )
                .await;
        });
    }

    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let addr = listener.local_addr()?;
    let server = registry_http::serve_on(listener, registry, config).await?;
    println!("listening on http://{addr}");
    tracing::info!(%addr, storage = ?args.storage, "registry ready");
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
