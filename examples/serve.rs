//! Serves an OCI registry: `cargo run --release --example serve` listens on
//! 127.0.0.1:5000.
//!
//! Flags (kept stable, scripts use them): `--addr HOST:PORT`, `--data-dir DIR`,
//! `--storage memory|fs|s3://BUCKET|az://CONTAINER|gs://BUCKET`, `--max-manifest-size BYTES`, `--gc-interval SECS`,
//! `--gc-window SECS`, `--read-only`, `--no-deletes`, `--base-url URL`,
//! `--auth-user NAME:PASSWORD` (repeatable), `--anonymous-read`. Logs go through
//! `tracing` (`RUST_LOG=debug` for more); credentials are never logged.
//!
//! Authentication: with `--auth-user` (or `--anonymous-read`) every request needs
//! credentials, Basic or a bearer token from `/token` (clients follow the
//! `WWW-Authenticate` challenge by themselves: `skopeo --creds NAME:PASSWORD`,
//! `oras login`); anonymous clients may only pull, and only with `--anonymous-read`.
//!
//! Object storage (`s3://`, `az://`, `gs://`, optionally with a path prefix after the
//! bucket) is configured through object_store's standard environment variables, for
//! example `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION` for S3 and `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`,
//! `AZURE_STORAGE_USE_EMULATOR` for Azure. Several serve processes can share one bucket.
//!
//! Maintenance of a stopped fs store:
//! - `serve check --data-dir DIR [--verify-digests] [--repair]` prints, as its last line,
//!   `check: N blobs, M manifests, R repositories, P problems`;
//! - `serve gc [--data-dir DIR | --storage URL] [--window SECS] [--dry-run] [--untagged]` collects and
//!   prints its report as the last line, starting with `gc:`.
//!
//! Policies: `--immutable-tags PATTERN` (repeatable; `[REPO_PREFIX:]GLOB` with `*`, for
//! example `v*` or `prod/app:release-*`; also honoured by `gc`), `--quota PREFIX=BYTES`
//! (repeatable). Retention, for `gc` only: `--keep-last N:PATTERN` and
//! `--keep-younger-than DURATION[:PATTERN]` (DURATION like `30d`, `12h`, `90m`, `45s`;
//! PATTERN defaults to `*`), each repeatable; the removed tags are printed before the
//! report.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use registry_core::access::{Action, Grantee, PrefixRules};
use registry_core::{
    GcOptions, Registry, RepoName, RetentionRule, Storage, TagPattern, UntaggedPolicy,
};
use registry_http::{Auth, HttpConfig, TokenIssuer};
use registry_store_fs::{CheckOptions, FsStore};
use registry_store_object::{BucketOptions, BucketStore};

#[derive(Parser, Debug)]
#[command(about = "Serve an OCI registry")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:5000")]
    addr: SocketAddr,
    /// Where the fs storage keeps its data.
    #[arg(long, global = true, default_value = "./registry-data")]
    data_dir: PathBuf,
    /// Storage: `fs` (files and redb under --data-dir), `memory` (gone on exit), or an
    /// object store URL: `s3://BUCKET[/PREFIX]`, `az://CONTAINER[/PREFIX]`,
    /// `gs://BUCKET[/PREFIX]`, configured from the environment.
    #[arg(long, global = true, default_value = "fs", value_parser = parse_storage)]
    storage: StorageKind,
    /// Largest manifest accepted, in bytes.
    #[arg(long, default_value_t = registry_core::registry::DEFAULT_MAX_MANIFEST_SIZE)]
    max_manifest_size: u64,
    /// Collect garbage every SECS seconds (0: never).
    #[arg(long, default_value_t = 0)]
    gc_interval: u64,
    /// Protection window of uploaded blobs, in seconds.
    #[arg(long, global = true, default_value_t = 600)]
    gc_window: u64,
    /// Refuse all writes.
    #[arg(long)]
    read_only: bool,
    /// Refuse deletes of manifests and blobs.
    #[arg(long)]
    no_deletes: bool,
    /// Serve full blob reads without hashing them on the way out (faster pulls; a
    /// file corrupted on disk is then served as it is, until `check --verify-digests`).
    #[arg(long)]
    no_verify_reads: bool,
    /// Prefix of `Location` and `Link` headers when clients reach the registry through
    /// a proxy under another address (default: relative URLs).
    #[arg(long)]
    base_url: Option<String>,
    /// Make tags matching `[REPO_PREFIX:]GLOB` immutable (repeatable).
    #[arg(long = "immutable-tags", global = true, value_parser = parse_tag_pattern)]
    immutable_tags: Vec<TagPattern>,
    /// Limit the bytes stored under a repository prefix: `PREFIX=BYTES` (repeatable).
    #[arg(long = "quota", value_parser = parse_quota)]
    quotas: Vec<(RepoName, u64)>,
    /// A user who may pull, push and delete everywhere, as NAME:PASSWORD (repeatable).
    /// With any user (or --anonymous-read) clients must authenticate: Basic, or a
    /// bearer token from this server's /token endpoint.
    #[arg(long = "auth-user", value_name = "NAME:PASSWORD", value_parser = parse_user)]
    auth_users: Vec<(String, String)>,
    /// With authentication on, let anonymous clients pull and list everything.
    #[arg(long)]
    anonymous_read: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Verify a stopped fs store (counts, records against files, digests).
    Check {
        /// Re-hash every blob file.
        #[arg(long)]
        verify_digests: bool,
        /// Repair count drift and remove orphan files.
        #[arg(long)]
        repair: bool,
    },
    /// Collect garbage in a stopped fs store.
    Gc {
        /// Protection window in seconds (default: --gc-window).
        #[arg(long)]
        window: Option<u64>,
        /// Report what would be freed without freeing it.
        #[arg(long)]
        dry_run: bool,
        /// Also collect untagged manifests (referrers of live subjects are kept).
        #[arg(long)]
        untagged: bool,
        /// Retention: keep the N most recently tagged matches of PATTERN per
        /// repository, remove the other matches: `N:PATTERN` (repeatable).
        #[arg(long = "keep-last", value_parser = parse_keep_last)]
        keep_last: Vec<RetentionRule>,
        /// Retention: keep matches of PATTERN tagged less than DURATION ago, remove the
        /// other matches: `DURATION[:PATTERN]` (repeatable).
        #[arg(long = "keep-younger-than", value_parser = parse_keep_younger)]
        keep_younger_than: Vec<RetentionRule>,
    },
}

#[derive(Clone, Debug)]
enum StorageKind {
    /// In memory: gone when the process exits.
    Memory,
    /// Files and redb under --data-dir.
    Fs,
    /// An object store, by URL.
    Object(String),
}

fn parse_tag_pattern(s: &str) -> Result<TagPattern, String> {
    TagPattern::parse(s).map_err(|e| e.to_string())
}

fn parse_quota(s: &str) -> Result<(RepoName, u64), String> {
    let (prefix, bytes) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected PREFIX=BYTES"))?;
    let prefix = RepoName::parse(prefix).map_err(|e| e.to_string())?;
    let bytes = bytes
        .parse()
        .map_err(|_| format!("{s:?}: BYTES must be a whole number of bytes"))?;
    Ok((prefix, bytes))
}

fn parse_keep_last(s: &str) -> Result<RetentionRule, String> {
    let (n, pattern) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected N:PATTERN"))?;
    let n = n
        .parse()
        .map_err(|_| format!("{s:?}: N must be a whole number"))?;
    Ok(RetentionRule::keep_last(n, parse_tag_pattern(pattern)?))
}

fn parse_keep_younger(s: &str) -> Result<RetentionRule, String> {
    let (age, pattern) = s.split_once(':').unwrap_or((s, "*"));
    Ok(RetentionRule::keep_younger_than(
        parse_duration(age)?,
        parse_tag_pattern(pattern)?,
    ))
}

/// `30d`, `12h`, `90m`, `45s`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: expected a duration like 30d, 12h, 90m or 45s");
    let unit = s.chars().last().ok_or_else(bad)?;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let secs = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(bad)
}

/// A registry builder with the policy flags applied.
fn with_policies(
    mut builder: registry_core::RegistryBuilder,
    args: &Args,
) -> registry_core::RegistryBuilder {
    for pattern in &args.immutable_tags {
        builder = builder.with_immutable_tags(pattern.clone());
    }
    for (prefix, bytes) in &args.quotas {
        builder = builder.with_quota(prefix.clone(), *bytes);
    }
    builder
}

fn parse_storage(s: &str) -> Result<StorageKind, String> {
    match s {
        "memory" => Ok(StorageKind::Memory),
        "fs" => Ok(StorageKind::Fs),
        url if url.contains("://") => Ok(StorageKind::Object(url.to_owned())),
        other => Err(format!(
            "unknown storage {other:?}: expected fs, memory, s3://BUCKET, az://CONTAINER or gs://BUCKET"
        )),
    }
}

fn parse_user(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((name, password)) if !name.is_empty() && !password.is_empty() => {
            Ok((name.to_owned(), password.to_owned()))
        }
        _ => Err("expected NAME:PASSWORD with both parts non-empty".to_owned()),
    }
}

/// The access policy from the flags: `None` (open) unless a user or anonymous reads
/// are configured; then users may do everything and anonymous callers only what
/// --anonymous-read allows.
fn auth_from_args(args: &Args) -> Option<Auth> {
    if args.auth_users.is_empty() && !args.anonymous_read {
        return None;
    }
    let mut rules = PrefixRules::new().grant(Grantee::Authenticated, "", Action::ALL);
    if args.anonymous_read {
        rules = rules.grant(Grantee::Anonymous, "", Action::READ);
    }
    let mut auth = Auth::new(rules).with_token_issuer(TokenIssuer::new("registry"));
    for (name, password) in &args.auth_users {
        auth = auth.with_user(name, password);
    }
    Some(auth)
}

async fn open_storage(args: &Args) -> Result<Storage, Box<dyn std::error::Error>> {
    Ok(match &args.storage {
        StorageKind::Memory => registry_core::MemoryStore::new().into_storage(),
        StorageKind::Fs => FsStore::open(&args.data_dir).await?.into_storage(),
        StorageKind::Object(url) => {
            let (store, prefix) = registry_store_object::from_url(url)?;
            let options = BucketOptions {
                prefix,
                ..BucketOptions::default()
            };
            BucketStore::open_with(store, options).await?.into_storage()
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    match &args.command {
        Some(Command::Check {
            verify_digests,
            repair,
        }) => {
            let store = FsStore::open(&args.data_dir).await?;
            let report = store
                .check(CheckOptions {
                    verify_digests: *verify_digests,
                    repair: *repair,
                })
                .await?;
            for p in &report.problems {
                println!("problem: {p}");
            }
            if report.orphans > 0 {
                println!("orphan files (harmless): {}", report.orphans);
            }
            println!("check: {report}");
            return Ok(());
        }
        Some(Command::Gc {
            window,
            dry_run,
            untagged,
            keep_last,
            keep_younger_than,
        }) => {
            let registry =
                with_policies(Registry::builder(open_storage(&args).await?), &args).build();
            let report = registry
                .collect_garbage(&GcOptions {
                    window: Some(Duration::from_secs(window.unwrap_or(args.gc_window))),
                    untagged: if *untagged {
                        UntaggedPolicy::Collect
                    } else {
                        UntaggedPolicy::Keep
                    },
                    orphans: true,
                    audit: true,
                    dry_run: *dry_run,
                    retention: keep_last.iter().chain(keep_younger_than).cloned().collect(),
                })
                .await?;
            for r in &report.retention {
                println!(
                    "retention: {}{}:{} ({}){}",
                    if report.dry_run {
                        "would remove "
                    } else {
                        "removed "
                    },
                    r.repo,
                    r.tag,
                    r.digest,
                    if r.manifest_removed {
                        " with its manifest"
                    } else {
                        ""
                    }
                );
            }
            println!("gc: {report}");
            return Ok(());
        }
        None => {}
    }
    let storage = open_storage(&args).await?;
    let registry = with_policies(Registry::builder(storage), &args)
        .with_max_manifest_size(args.max_manifest_size)
        .with_protection_window(Duration::from_secs(args.gc_window))
        .with_verify_reads(!args.no_verify_reads)
        .build();
    let config = HttpConfig::default()
        .with_read_only(args.read_only)
        .with_deletes(!args.no_deletes)
        .with_base_url(args.base_url.clone());
    let config = match auth_from_args(&args) {
        Some(auth) => {
            tracing::info!(
                users = args.auth_users.len(),
                anonymous_read = args.anonymous_read,
                "authentication required"
            );
            config.with_auth(auth)
        }
        None => config,
    };

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
