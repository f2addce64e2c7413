//! Serves an OCI registry: `cargo run --release --example serve` listens on
//! 127.0.0.1:5000.
//!
//! Flags (kept stable, scripts use them): `--addr HOST:PORT`, `--data-dir DIR`,
//! `--storage memory|fs|s3://BUCKET|az://CONTAINER|gs://BUCKET`, `--max-manifest-size BYTES`, `--gc-interval SECS`,
//! `--gc-window SECS`, `--scrub-every DURATION` and `--scrub-rate BYTES` (fs storage: a
//! background digest check of every blob file, by default daily at 32MiB/s),
//! `--read-only`, `--no-deletes`, `--base-url URL`,
//! `--auth-user NAME:file:PATH|NAME:env:VAR` (repeatable), `--htpasswd FILE`,
//! `--auth-rules FILE`, `--anonymous-read`, the `--token-*` flags, `--auth-max-failures
//! N`, `--auth-max-failures-per-address N`, `--auth-lockout DURATION`, `--tls-cert FILE
//! --tls-key FILE`, `--metrics-addr HOST:PORT`, `--no-access-log`, `--access-log FILE`, `--audit-log FILE`,
//! `--audit-log-fsync`, `--notify URL[,OPTION...]` (repeatable), `--notify-secret-file
//! FILE`, `--notify-retention DURATION`, `--notify-poll DURATION`, `--notify-linger
//! DURATION`, `--proxy
//! PREFIX=URL[,OPTION...]` (repeatable), `--proxy-spool DIR`, `--mirror
//! PREFIX=URL[,OPTION...]` (repeatable). Logs go through
//! `tracing` (`RUST_LOG=debug` for more, or per target: `RUST_LOG=registry_http=debug,info`);
//! credentials are never logged. On start it prints the URL, where the data is and how
//! to stop; a failure (port in use, data directory not writable, object storage not
//! configured) is a message saying what failed and what to try, and exit status 1.
//!
//! Authentication: with `--auth-user`, `--htpasswd`, `--token-realm`, `--auth-rules` or
//! `--anonymous-read` every request needs credentials, Basic or a bearer token (an ES256
//! JWT) from `/token`, or with `--token-realm` from an external token server (clients
//! follow the `WWW-Authenticate` challenge by themselves: `skopeo --creds
//! NAME:PASSWORD`, `oras login`). Without `--auth-rules` users may do everything and
//! anonymous clients only pull, and only with `--anonymous-read`. Passwords are never
//! taken from the command line. `serve token-key --token-key-file KEY --cert CERT` makes
//! the signing key and a certificate of it for registries that trust our tokens
//! (Distribution's `auth.token.rootcertbundle`).
//!
//! Object storage (`s3://`, `az://`, `gs://`, optionally with a path prefix after the
//! bucket) is configured through object_store's standard environment variables, for
//! example `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION` for S3 and `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`,
//! `AZURE_STORAGE_USE_EMULATOR` for Azure. Several serve processes can share one bucket.
//! With object storage, `--redirect-blobs[=TTL]` answers blob downloads with a redirect
//! to a presigned URL, and `--log-retention DURATION` trims the bucket's metadata log.
//! `--metadata postgres://...` (or `REGISTRY_METADATA_URL`) keeps the metadata in
//! PostgreSQL instead: any number of serve processes on one database and one bucket are
//! one registry.
//!
//! Maintenance:
//! - `serve check [--data-dir DIR | --storage URL] [--verify-digests] [--repair]` (an fs
//!   store while stopped; a bucket at any time, `--repair` when quiet) prints, as its
//!   last line, `check: N blobs, M manifests, R repositories, P problems`;
//! - `serve gc [--data-dir DIR | --storage URL] [--window SECS] [--dry-run] [--untagged]` collects and
//!   prints its report as the last line, starting with `gc:`;
//! - `serve import --repo NAME [--tag T]... PATH` and `serve export [--repo NAME [--tag
//!   T]...] PATH` (with the storage flags above; fs while stopped) move images in from
//!   and out to an OCI image layout directory, or an oci-archive when PATH ends in
//!   `.tar` (crate `registry-layout`); each prints its report as the last line;
//! - `serve sync --from SRC --to DST` copies every tag of a repository between this
//!   storage (`REPO`) and remote registries (`http(s)://HOST[:PORT]/REPO`); its last
//!   line starts with `sync:`.
//!
//! Policies: `--immutable-tags PATTERN` (repeatable; `[REPO_PREFIX:]GLOB` with `*`, for
//! example `v*` or `prod/app:release-*`; also honoured by `gc`), `--quota PREFIX=BYTES`
//! (repeatable). Retention, for `gc` only: `--keep-last N:PATTERN` and
//! `--keep-younger-than DURATION[:PATTERN]` (DURATION like `30d`, `12h`, `90m`, `45s`,
//! `1w`, `1d 12h`; PATTERN defaults to `*`), each repeatable; the removed tags are printed before the
//! report.

#[path = "serve_remote.rs"]
mod remote;
#[path = "serve_scrub.rs"]
mod scrub;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use registry_core::access::{Action, Grantee, PrefixRules};
use registry_core::{
    GcOptions, Registry, RepoName, RetentionRule, Storage, Tag, TagPattern, UntaggedPolicy,
};
use registry_http::{
    AccessLog, AuditLog, Auth, Htpasswd, HttpConfig, JwtVerifier, Metrics, ServerLimits,
    SigningKey, ThrottleConfig, TlsFiles, TokenIssuer, VerificationKey,
};
use registry_store_fs::{CheckOptions, FsStore};
use registry_store_object::{BucketOptions, BucketStore, CheckOptions as BucketCheckOptions};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

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
    /// Keep the metadata (tags, manifests, links, counts) in PostgreSQL instead of
    /// beside the blobs: `postgres://USER:PASSWORD@HOST:PORT/DB`. With object storage
    /// for the blobs, any number of serve processes on one database are one registry.
    /// Also from the environment (keeps a password out of the process list).
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "REGISTRY_METADATA_URL",
        hide_env_values = true
    )]
    metadata: Option<String>,
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
    /// With fs storage, hash every full blob read, even of a file this process already
    /// read whole and verified and that has not changed since (by default such reads
    /// are not hashed again: see the README).
    #[arg(long, conflicts_with = "no_verify_reads")]
    verify_every_read: bool,
    /// With fs storage, hash every blob file in the background once per DURATION (from
    /// the start of one pass to the next; the first pass after 10 minutes, or DURATION if
    /// shorter), to find bytes that rot on disk while serve runs; a file that does not
    /// match is logged and refused by reads until its blob is pushed again. `0`: off.
    /// Ignored with other storages.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    scrub_every: Duration,
    /// The scrub's most bytes read per second (`32MiB`, `512KiB`, or a number of bytes).
    /// Ignored with other storages.
    #[arg(long, value_name = "BYTES", default_value = "32MiB", value_parser = scrub::parse_rate)]
    scrub_rate: u64,
    /// Prefix of `Location` and `Link` headers when clients reach the registry through
    /// a proxy under another address (default: relative URLs).
    #[arg(long)]
    base_url: Option<String>,
    /// With object storage: answer whole-blob downloads with 307 to a presigned bucket
    /// URL valid for TTL (`--redirect-blobs` alone: 10m), after the usual checks, so
    /// the bytes flow from the bucket; clients must be able to reach it.
    #[arg(long, value_name = "TTL", num_args = 0..=1, require_equals = true,
          default_missing_value = "10m", value_parser = parse_duration)]
    redirect_blobs: Option<Duration>,
    /// With the metadata in the bucket: delete log entries and checkpoints behind a
    /// checkpoint older than this (at least 90 s). Every process of the bucket must
    /// run a version that checks the trim watermark (this one or newer).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    log_retention: Option<Duration>,
    /// Make tags matching `[REPO_PREFIX:]GLOB` immutable (repeatable).
    #[arg(long = "immutable-tags", global = true, value_parser = parse_tag_pattern)]
    immutable_tags: Vec<TagPattern>,
    /// Limit the bytes stored under a repository prefix: `PREFIX=BYTES` (repeatable).
    #[arg(long = "quota", value_parser = parse_quota)]
    quotas: Vec<(RepoName, u64)>,
    /// A user, with the password read from a file (`NAME:file:PATH`, its first line) or
    /// an environment variable (`NAME:env:VAR`), never from the command line, where
    /// every process could read it (repeatable). Without --auth-rules, users may pull,
    /// push and delete everywhere. With any user, htpasswd file, external token server
    /// or --anonymous-read, clients must authenticate: Basic, or a bearer token.
    #[arg(long = "auth-user", value_name = "NAME:file:PATH|NAME:env:VAR", value_parser = parse_user)]
    auth_users: Vec<(String, String)>,
    /// Users from an htpasswd file with bcrypt hashes (`htpasswd -B`), re-read when it
    /// changes (repeatable).
    #[arg(long, value_name = "FILE")]
    htpasswd: Vec<PathBuf>,
    /// Who may do what under which repository prefix, from a TOML file (default: users
    /// everything, anonymous callers nothing, or pull and list with --anonymous-read).
    /// See the README for the format.
    #[arg(long, value_name = "FILE")]
    auth_rules: Option<PathBuf>,
    /// With authentication on, let anonymous clients pull and list everything.
    #[arg(long)]
    anonymous_read: bool,
    /// Sign bearer tokens (ES256 JWTs) with the P-256 private key in FILE (PEM; `serve
    /// token-key` makes one), so that processes serving one registry accept each
    /// other's tokens and other registries can trust them (default: a random key per
    /// process).
    #[arg(long, global = true, value_name = "FILE")]
    token_key_file: Option<PathBuf>,
    /// Also accept tokens signed by the keys in FILE (PEM certificates or public keys;
    /// the previous key while rotating; repeatable).
    #[arg(long, value_name = "FILE")]
    token_trust_key: Vec<PathBuf>,
    /// The service name of tokens: their `aud`, and the `service` of challenges.
    #[arg(long, default_value = "registry")]
    token_service: String,
    /// The issuer of tokens (`iss`): what this server signs as, or with --token-realm
    /// the external token server's issuer name (default: the service name).
    #[arg(long, value_name = "NAME")]
    token_issuer: Option<String>,
    /// How long issued tokens stay valid.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    token_ttl: Duration,
    /// Trust an external token server at URL instead of issuing tokens (as
    /// Distribution's auth.token.realm); its keys come from --token-root-cert-bundle
    /// and/or --token-jwks.
    #[arg(long, value_name = "URL", requires = "token_issuer")]
    token_realm: Option<String>,
    /// The external token server's signing certificates (PEM bundle; Distribution's
    /// auth.token.rootcertbundle).
    #[arg(long, value_name = "FILE", requires = "token_realm")]
    token_root_cert_bundle: Option<PathBuf>,
    /// The external token server's public keys as a JWKS document.
    #[arg(long, value_name = "FILE", requires = "token_realm")]
    token_jwks: Option<PathBuf>,
    /// Failed authentications of one user name before it is locked out for a while
    /// (429 with Retry-After; 0: no limit).
    #[arg(long, default_value_t = ThrottleConfig::default().max_failures_per_identity)]
    auth_max_failures: u32,
    /// Failed authentications from one address (an IPv6 /64) before it is locked out
    /// (0: no limit).
    #[arg(long, default_value_t = ThrottleConfig::default().max_failures_per_address)]
    auth_max_failures_per_address: u32,
    /// The first lockout; each further failure doubles it, up to 15 minutes.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    auth_lockout: Duration,
    /// Serve HTTPS with the certificate chain in FILE (PEM, leaf first); needs
    /// --tls-key. Both files are re-read when they change.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Most connections served at once; when all are taken, the oldest connection is
    /// closed (after the request it is serving) to make room.
    #[arg(long, default_value_t = ServerLimits::default().max_connections)]
    max_connections: usize,
    /// Time a client has to send a request's headers, after connecting or after the
    /// previous response (so also how long an idle kept-alive connection stays open).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    header_read_timeout: Duration,
    /// A request body that sends nothing for this long fails.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    body_idle_timeout: Duration,
    /// Bytes of manifest bodies buffered at once over all requests; a push that does
    /// not fit within a second gets 429.
    #[arg(long, default_value_t = HttpConfig::default().manifest_buffer_budget)]
    manifest_buffer_budget: u64,
    /// Time to receive a whole manifest body.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    manifest_body_deadline: Duration,
    /// Largest blob accepted, in bytes (default: no limit).
    #[arg(long)]
    max_blob_size: Option<u64>,
    /// Upload sessions open at once, in total.
    #[arg(long, default_value_t = registry_core::registry::DEFAULT_MAX_OPEN_UPLOADS)]
    max_uploads: u64,
    /// Upload sessions open at once in one repository.
    #[arg(long, default_value_t = registry_core::registry::DEFAULT_MAX_OPEN_UPLOADS_PER_REPO)]
    max_uploads_per_repo: u64,
    /// Upload sessions open at once for one client: a user, or an address (an IPv6
    /// /64) when anonymous.
    #[arg(long, default_value_t = registry_core::registry::DEFAULT_MAX_OPEN_UPLOADS_PER_OWNER)]
    max_uploads_per_client: u64,
    /// An upload session idle this long is forgotten.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    upload_expiry: Duration,
    /// An upload session that received nothing, idle this long, is reclaimed when the
    /// session limits are reached.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    empty_upload_expiry: Duration,
    /// Largest page of tag, catalog and referrer listings (also the default page).
    #[arg(long, default_value_t = registry_core::registry::DEFAULT_MAX_PAGE_SIZE)]
    max_page_size: usize,
    /// Accept sparse manifests (an index whose child manifests, or an image whose
    /// layers, the repository does not hold, as a mirror of some platforms has) in
    /// every repository, or with `=PREFIX` under PREFIX (repeatable).
    #[arg(
        long = "allow-sparse",
        value_name = "PREFIX",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "",
        value_parser = parse_sparse_prefix
    )]
    allow_sparse: Vec<SparsePrefix>,
    /// Serve Prometheus metrics (`/metrics`), `/healthz` and `/readyz` on this address:
    /// a listener of its own, without authentication, so bind it where only the
    /// scraper reaches it (default: no metrics).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<SocketAddr>,
    /// Do not log a line per request (by default one to stdout, among the other log
    /// lines, when `RUST_LOG` lets the target `registry_http::access` log at info).
    #[arg(long)]
    no_access_log: bool,
    /// Append the access log to FILE instead of stdout (written whatever `RUST_LOG`
    /// says).
    #[arg(long, value_name = "FILE", conflicts_with = "no_access_log")]
    access_log: Option<PathBuf>,
    /// Append the audit log to FILE: a JSON line per change (pushes, tag moves,
    /// deletes, uploads, mounts, the collector's removals) and per refused credential
    /// or access, written before the change is acknowledged (default: none).
    #[arg(long, global = true, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    /// Also sync each audit line to disk before the acknowledgement (a disk flush per
    /// change; without it, a line survives a crash of serve but not of the machine).
    #[arg(long, global = true, requires = "audit_log")]
    audit_log_fsync: bool,
    /// POST every change to this webhook, at least once, in order, from the storage's
    /// outbox (several serve processes on one storage share one cursor per URL):
    /// `URL[,prefix=REPO_PREFIX][,actions=push+delete+mount][,media=MEDIA_TYPE]
    /// [,format=distribution|distribution-v2|cloudevents|cloudevents-batch][,batch=N]
    /// [,timeout=DURATION]` (repeatable; options repeatable).
    #[arg(long = "notify", value_name = "URL[,OPTION...]", value_parser = registry_http::notify::Endpoint::parse)]
    notify: Vec<registry_http::notify::Endpoint>,
    /// Sign webhook requests with the secret in FILE (`X-Registry-Signature: sha256=HEX`,
    /// HMAC-SHA256 of the body).
    #[arg(long, value_name = "FILE", requires = "notify")]
    notify_secret_file: Option<PathBuf>,
    /// Keep outbox events this long once every webhook has them (default 24h; the
    /// collector and the webhook processes trim).
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    notify_retention: Option<Duration>,
    /// How often to look for other processes' changes to deliver (this process's own
    /// wake delivery at once).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    notify_poll: Duration,
    /// How long a caught-up webhook waits before its next read, so that the changes of
    /// a burst travel in one request: more delay per event, fewer requests (0 sends
    /// each change as soon as it commits).
    #[arg(long, value_name = "DURATION", default_value = "25ms", value_parser = parse_duration)]
    notify_linger: Duration,
    /// Make the repositories under PREFIX a pull-through cache of the registry at URL
    /// (`PREFIX/library/app` is its `library/app`):
    /// `PREFIX=URL[,remote=REPO_PREFIX][,credentials=file:PATH|env:VAR][,ttl=DURATION]
    /// [,budget=BYTES][,push]` (repeatable). The credentials' first line is
    /// `USER:PASSWORD`. Tags are re-checked after `ttl` (default 60s) and served from
    /// the cache while the upstream is down; pushes there are refused unless `push`;
    /// past `budget` bytes, the least recently pulled images are evicted (reclaimed by
    /// the collector: set --gc-interval).
    #[arg(long = "proxy", value_name = "PREFIX=URL[,OPTION...]", value_parser = remote::parse_proxy)]
    proxy: Vec<remote::ProxySpec>,
    /// Where blobs being fetched by the pull-through cache are spooled (default: the
    /// system's temporary directory).
    #[arg(long, value_name = "DIR")]
    proxy_spool: Option<PathBuf>,
    /// Copy every image pushed under PREFIX to the registry at URL, at least once, in
    /// order, through restarts (from the outbox; several serve processes share one
    /// cursor per prefix and URL): `PREFIX=URL[,remote=REPO_PREFIX][,credentials=file:PATH|env:VAR]
    /// [,deletes][,no-referrers]` (repeatable). Starts with what is pushed from then on;
    /// `serve sync` copies what was there before.
    #[arg(long = "mirror", value_name = "PREFIX=URL[,OPTION...]", value_parser = remote::parse_mirror)]
    mirror: Vec<remote::MirrorSpec>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Verify a store: an fs store while stopped (`--data-dir`), or a bucket
    /// (`--storage s3://...`): counts, records against bytes, digests.
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
    /// Import an OCI image layout directory, or an oci-archive (PATH ending in .tar),
    /// into a repository: every tag of the layout, or the --tag's given.
    Import {
        /// Repository to import into.
        #[arg(long)]
        repo: RepoName,
        /// Import this tag of the layout (repeatable; default: all).
        #[arg(long = "tag")]
        tags: Vec<Tag>,
        /// The layout directory or .tar archive.
        path: PathBuf,
    },
    /// Export the registry, or --repo (all its tags, or the --tag's given), into an OCI
    /// image layout directory, or an oci-archive if PATH ends in .tar.
    Export {
        /// Repository to export (default: every repository, named `repo:tag`).
        #[arg(long)]
        repo: Option<RepoName>,
        /// Export this tag of --repo (repeatable; default: all).
        #[arg(long = "tag", requires = "repo")]
        tags: Vec<Tag>,
        /// The layout directory or .tar archive (created, or added to).
        path: PathBuf,
    },
    /// Copy every tag of a repository (with what the images reference and their
    /// referrers) from --from to --to: each `http(s)://HOST[:PORT]/REPO` (a remote
    /// registry) or `REPO` (this storage: --data-dir/--storage; fs while stopped).
    Sync {
        /// Where to copy from.
        #[arg(long, value_parser = remote::parse_sync_end)]
        from: remote::SyncEnd,
        /// Where to copy to.
        #[arg(long, value_parser = remote::parse_sync_end)]
        to: remote::SyncEnd,
        /// Credentials for a remote --from: `file:PATH` or `env:VAR` holding
        /// `USER:PASSWORD`.
        #[arg(long, value_name = "file:PATH|env:VAR")]
        from_credentials: Option<String>,
        /// Credentials for a remote --to.
        #[arg(long, value_name = "file:PATH|env:VAR")]
        to_credentials: Option<String>,
        /// Leave referrers (signatures, SBOMs) behind.
        #[arg(long)]
        no_referrers: bool,
    },
    /// Make the token signing key (--token-key-file; kept if it exists) and write a
    /// self-signed certificate of it, for registries that trust our tokens (for
    /// Distribution: auth.token.rootcertbundle). Prints the key id tokens carry.
    TokenKey {
        /// Where to write the certificate (PEM).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
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

/// `30d`, `12h`, `90m`, `45s`, or any other duration humantime reads (`1w`, `1h 30m`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: {e}; expected a duration like 30d, 12h, 90m or 45s"))
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
    for SparsePrefix(prefix) in &args.allow_sparse {
        builder = builder.with_sparse_manifests(prefix.clone());
    }
    if let Some(retention) = args.notify_retention {
        let max_events = registry_core::RegistryConfig::default().max_events;
        builder = builder.with_event_retention(retention, max_events);
    }
    builder
}

/// `--allow-sparse` (everywhere) or `--allow-sparse=PREFIX`.
#[derive(Debug, Clone)]
struct SparsePrefix(Option<RepoName>);

fn parse_sparse_prefix(s: &str) -> Result<SparsePrefix, String> {
    if s.is_empty() {
        return Ok(SparsePrefix(None));
    }
    RepoName::parse(s)
        .map(|p| SparsePrefix(Some(p)))
        .map_err(|e| format!("{s:?} is not a repository prefix: {e}"))
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

/// `NAME:file:PATH` or `NAME:env:VAR`: the user and the password read from there.
fn parse_user(s: &str) -> Result<(String, String), String> {
    let usage = "expected NAME:file:PATH or NAME:env:VAR (a password on the command \
                 line is visible to every process: put it in a file or a variable)";
    let (name, rest) = s.split_once(':').ok_or(usage)?;
    if name.is_empty() {
        return Err(usage.to_owned());
    }
    let password = match rest.split_once(':') {
        Some(("file", path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the password of {name} from {path}: {e}"))?;
            text.lines().next().unwrap_or("").to_owned()
        }
        Some(("env", var)) => {
            std::env::var(var).map_err(|_| format!("the password of {name}: ${var} is not set"))?
        }
        _ => return Err(usage.to_owned()),
    };
    if password.is_empty() {
        return Err(format!("the password of {name} is empty"));
    }
    Ok((name.to_owned(), password))
}

/// The `--auth-rules` file: groups of users, and rules granting actions under
/// repository prefixes.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    groups: std::collections::BTreeMap<String, Vec<String>>,
    #[serde(default)]
    allow: Vec<RuleEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    /// User names, `group:NAME`, `anonymous`, `authenticated`, `anyone`.
    who: Vec<String>,
    /// A repository prefix by whole path components (`team-a` or `team-a/*`); `*` or
    /// empty: every repository.
    prefix: String,
    /// `pull`, `push`, `delete`, `list`, or `*` for all.
    actions: Vec<String>,
}

fn read_rules(path: &Path) -> Result<PrefixRules, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the rules {}: {e}", shown(path)))?;
    rules_from_toml(&text).map_err(|e| format!("the rules {}: {e}", shown(path)))
}

fn rules_from_toml(text: &str) -> Result<PrefixRules, String> {
    let file: RulesFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut rules = PrefixRules::new();
    for rule in &file.allow {
        let mut actions = Vec::new();
        for a in &rule.actions {
            match a.as_str() {
                "*" => actions.extend_from_slice(Action::ALL),
                a => actions.push(Action::parse(a).ok_or_else(|| {
                    format!("unknown action {a:?}: expected pull, push, delete, list or *")
                })?),
            }
        }
        let prefix = rule.prefix.trim_end_matches('*').trim_end_matches('/');
        if !prefix.is_empty() {
            RepoName::parse(prefix).map_err(|e| format!("prefix {:?}: {e}", rule.prefix))?;
        }
        for who in &rule.who {
            let grantees = match who.as_str() {
                "anyone" => vec![Grantee::Anyone],
                "anonymous" => vec![Grantee::Anonymous],
                "authenticated" => vec![Grantee::Authenticated],
                g if g.starts_with("group:") => file
                    .groups
                    .get(&g["group:".len()..])
                    .ok_or_else(|| format!("unknown group {g:?}"))?
                    .iter()
                    .map(Grantee::user)
                    .collect(),
                user => vec![Grantee::user(user)],
            };
            for grantee in grantees {
                rules = rules.grant(grantee, prefix, &actions);
            }
        }
    }
    Ok(rules)
}

/// The token signing key of --token-key-file, or a random one.
fn signing_key(args: &Args) -> Result<SigningKey, String> {
    let Some(path) = &args.token_key_file else {
        return Ok(SigningKey::generate());
    };
    let pem = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the token key {}: {e}", shown(path)))?;
    SigningKey::from_pem(&pem).map_err(|e| {
        format!(
            "the token key {}: {e}\n  make one with: serve token-key --token-key-file {} --cert CERT",
            shown(path),
            shown(path)
        )
    })
}

fn read_keys(path: &Path, jwks: bool) -> Result<Vec<VerificationKey>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", shown(path)))?;
    let keys = if jwks {
        VerificationKey::from_jwks(&bytes)
    } else {
        VerificationKey::from_pem_bundle(&bytes)
    };
    keys.map_err(|e| format!("{}: {e}", shown(path)))
}

/// `serve token-key`: the key file (made when missing, mode 0600) and a self-signed
/// certificate of its public key.
fn token_key(args: &Args, cert: &Path, days: u32) -> Result<(), String> {
    let path = args
        .token_key_file
        .as_ref()
        .ok_or("serve token-key needs --token-key-file FILE (the key to use, made when missing)")?;
    let key = if path.exists() {
        signing_key(args)?
    } else {
        let key = SigningKey::generate();
        write_private(path, key.to_pkcs8_pem().as_bytes())
            .map_err(|e| format!("cannot write the token key {}: {e}", shown(path)))?;
        println!("token key: made {}", shown(path));
        key
    };
    let pair = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(
        &key.to_pkcs8_pem(),
        &rcgen::PKCS_ECDSA_P256_SHA256,
    )
    .map_err(|e| format!("the token key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| format!("certificate: {e}"))?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("{} token signer", args.token_service),
    );
    let now = std::time::SystemTime::now();
    params.not_before = now.into();
    params.not_after = (now + Duration::from_secs(u64::from(days) * 86_400)).into();
    let certificate = params
        .self_signed(&pair)
        .map_err(|e| format!("certificate: {e}"))?;
    std::fs::write(cert, certificate.pem())
        .map_err(|e| format!("cannot write {}: {e}", shown(cert)))?;
    println!("certificate: {}", shown(cert));
    println!("token-key: kid {}", key.kid());
    Ok(())
}

/// Writes a new file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

/// The authentication from the flags: `None` (open) unless users, an htpasswd file, an
/// external token server or anonymous reads are configured. The policy is the rules
/// file, or else: users everything, anonymous callers only what --anonymous-read allows.
fn auth_from_args(args: &Args) -> Result<Option<Auth>, String> {
    if args.auth_users.is_empty()
        && args.htpasswd.is_empty()
        && args.token_realm.is_none()
        && !args.anonymous_read
        && args.auth_rules.is_none()
    {
        return Ok(None);
    }
    let rules = match &args.auth_rules {
        Some(path) => read_rules(path)?,
        None => PrefixRules::new().grant(Grantee::Authenticated, "", Action::ALL),
    };
    let rules = if args.anonymous_read {
        rules.grant(Grantee::Anonymous, "", Action::READ)
    } else {
        rules
    };
    let mut auth = Auth::new(rules).with_throttle(ThrottleConfig {
        max_failures_per_identity: args.auth_max_failures,
        max_failures_per_address: args.auth_max_failures_per_address,
        lockout: args.auth_lockout,
        ..ThrottleConfig::default()
    });
    match &args.token_realm {
        Some(realm) => {
            let issuer = args.token_issuer.clone().unwrap_or_default();
            let mut keys = Vec::new();
            if let Some(path) = &args.token_root_cert_bundle {
                keys.extend(read_keys(path, false)?);
            }
            if let Some(path) = &args.token_jwks {
                keys.extend(read_keys(path, true)?);
            }
            for path in &args.token_trust_key {
                keys.extend(read_keys(path, false)?);
            }
            if keys.is_empty() {
                return Err("--token-realm needs the token server's keys: \
                     --token-root-cert-bundle FILE or --token-jwks FILE"
                    .to_owned());
            }
            let verifier = JwtVerifier::new(&args.token_service, [issuer]).with_keys(keys);
            auth = auth.with_token_verifier(verifier, realm, &args.token_service);
        }
        None => {
            // Processes serving one registry share the key file: a token one issues is
            // then accepted by all. Without it each process signs with a random key.
            let mut issuer = TokenIssuer::with_signing_key(&args.token_service, signing_key(args)?)
                .with_ttl(args.token_ttl);
            if let Some(name) = &args.token_issuer {
                issuer = issuer.with_issuer(name);
            }
            for path in &args.token_trust_key {
                for key in read_keys(path, false)? {
                    issuer = issuer.with_trusted_key(key);
                }
            }
            auth = auth.with_token_issuer(issuer);
        }
    }
    for (name, password) in &args.auth_users {
        auth = auth.with_user(name, password);
    }
    for path in &args.htpasswd {
        let file = Htpasswd::open(path)
            .map_err(|e| format!("cannot read the htpasswd file {}: {e}", shown(path)))?;
        auth = auth.with_htpasswd(file);
    }
    Ok(Some(auth))
}

/// The data directory as an absolute path, for messages.
fn shown(dir: &Path) -> String {
    std::path::absolute(dir)
        .unwrap_or_else(|_| dir.to_owned())
        .display()
        .to_string()
}

/// One line saying where the data lives.
fn storage_line(args: &Args) -> String {
    let blobs = match &args.storage {
        StorageKind::Memory => "storage: memory (everything is gone when serve exits)".to_owned(),
        StorageKind::Fs => format!("storage: fs, data in {}", shown(&args.data_dir)),
        StorageKind::Object(url) => {
            format!("storage: object store {url} (configured from the environment)")
        }
    };
    match &args.metadata {
        // Host and database only: the URL may hold a password.
        Some(url) => format!(
            "{blobs}; metadata in PostgreSQL {}",
            registry_store_postgres::describe_url(url)
        ),
        None => blobs,
    }
}

/// The first I/O error in the chain of `e`, if any.
fn io_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    std::iter::successors(Some(e), |e| e.source()).find_map(|e| e.downcast_ref())
}

/// Why the fs store in `dir` could not be opened, and what to try.
fn fs_failure(dir: &Path, e: &registry_core::Error) -> String {
    use std::io::ErrorKind;
    let dir = shown(dir);
    let elsewhere = "pick a directory you can write with --data-dir DIR, or keep nothing \
                     with --storage memory";
    match io_cause(e).map(|io| io.kind()) {
        Some(ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem) => format!(
            "cannot create or write the data directory {dir}: permission denied\n  {elsewhere}"
        ),
        Some(ErrorKind::AlreadyExists | ErrorKind::NotADirectory) => format!(
            "cannot use {dir} as the data directory: a file (not a directory) is in the \
             way\n  {elsewhere}"
        ),
        Some(ErrorKind::StorageFull) => {
            format!("cannot write the data directory {dir}: no space left\n  {elsewhere}")
        }
        _ if e.to_string().contains("already open") => format!(
            "the data directory {dir} is in use by another process (a serve already \
             running on it?)\n  \
             stop that process, or pick another directory with --data-dir DIR (one \
             process per fs data directory; several can share object storage)"
        ),
        _ => format!(
            "cannot open the data directory {dir}: {}\n  {elsewhere}",
            cause(e)
        ),
    }
}

/// What went wrong, without the "storage error: " every storage failure starts with.
fn cause(e: &registry_core::Error) -> String {
    match e {
        registry_core::Error::Storage(inner) => inner.to_string(),
        other => other.to_string(),
    }
}

/// `" (neither is set)"`, `" (B is not set)"` or nothing, for two variables.
fn unset(vars: [&str; 2]) -> String {
    let missing: Vec<&str> = vars
        .into_iter()
        .filter(|v| std::env::var_os(v).is_none())
        .collect();
    match missing[..] {
        [] => String::new(),
        [one] => format!(" ({one} is not set)"),
        _ => " (neither is set)".to_owned(),
    }
}

/// Why the object store at `url` could not be used, and what to try.
fn object_failure(url: &str, what: &str, e: &registry_core::Error) -> String {
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    let hint = match scheme {
        "s3" => format!(
            "S3 is configured from the environment: AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY{}, AWS_REGION, and for an S3-compatible server \
             AWS_ENDPOINT (plus AWS_ALLOW_HTTP=true for http://)",
            unset(["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
        ),
        "az" | "azure" if std::env::var_os("AZURE_STORAGE_USE_EMULATOR").is_none() => format!(
            "Azure is configured from the environment: AZURE_STORAGE_ACCOUNT_NAME and \
             AZURE_STORAGE_ACCOUNT_KEY{} (or AZURE_STORAGE_USE_EMULATOR=true for Azurite)",
            unset(["AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY"])
        ),
        "az" | "azure" => "Azure is configured from the environment; with \
                           AZURE_STORAGE_USE_EMULATOR=true, Azurite is expected at \
                           127.0.0.1:10000 (or AZURITE_BLOB_STORAGE_URL)"
            .to_owned(),
        "gs" => "GCS is configured from the environment: GOOGLE_SERVICE_ACCOUNT (the path \
                 of a service account key file) or GOOGLE_APPLICATION_CREDENTIALS"
            .to_owned(),
        _ => "expected s3://BUCKET[/PREFIX], az://CONTAINER[/PREFIX] or gs://BUCKET[/PREFIX]"
            .to_owned(),
    };
    format!("{what} {url}: {}\n  {hint}", cause(e))
}

async fn open_storage(args: &Args) -> Result<Storage, String> {
    let storage = open_blob_storage(args).await?;
    let Some(url) = &args.metadata else {
        return Ok(storage);
    };
    let metadata = registry_store_postgres::connect(url)
        .await
        .map_err(|e| format!("cannot use the metadata database: {e}"))?;
    Ok(Storage {
        blobs: storage.blobs,
        metadata: std::sync::Arc::new(metadata),
    })
}

/// The storage `--storage` names (blobs and, unless `--metadata` says otherwise, the
/// metadata beside them).
async fn open_blob_storage(args: &Args) -> Result<Storage, String> {
    Ok(match &args.storage {
        StorageKind::Memory => registry_core::MemoryStore::new().into_storage(),
        StorageKind::Fs => {
            let store = FsStore::open(&args.data_dir)
                .await
                .map_err(|e| fs_failure(&args.data_dir, &e))?
                .remember_verified(!args.verify_every_read);
            // Runs only if `run` starts it (serving, not the one-shot commands).
            scrub::keep(&store);
            store.into_storage()
        }
        StorageKind::Object(url) => {
            let (store, signer, prefix) = registry_store_object::from_url_with_signer(url)
                .map_err(|e| object_failure(url, "cannot configure object storage", &e))?;
            let options = BucketOptions {
                prefix,
                log_retention: args.log_retention,
                ..BucketOptions::default()
            };
            let bucket = BucketStore::open_with(store, options)
                .await
                .map_err(|e| object_failure(url, "cannot open object storage", &e))?;
            match signer.filter(|_| args.redirect_blobs.is_some()) {
                Some(signer) => bucket.with_signer(signer),
                None => bucket,
            }
            .into_storage()
        }
    })
}

/// `serve check --storage s3://...`: the bucket store's check, printed like the fs one.
async fn check_bucket(url: &str, verify_digests: bool, repair: bool) -> Result<(), String> {
    let (store, prefix) = registry_store_object::from_url(url)
        .map_err(|e| object_failure(url, "cannot configure object storage", &e))?;
    let options = BucketOptions {
        prefix,
        ..BucketOptions::default()
    };
    let store = BucketStore::open_with(store, options)
        .await
        .map_err(|e| object_failure(url, "cannot open object storage", &e))?;
    let report = store
        .check(BucketCheckOptions {
            verify_digests,
            repair,
        })
        .await
        .map_err(|e| format!("check of {url} failed: {e}"))?;
    for p in &report.problems {
        println!("problem: {p}");
    }
    if report.orphans > 0 {
        println!("orphan objects (harmless): {}", report.orphans);
    }
    println!("check: {report}");
    Ok(())
}

/// Why listening on `addr` failed, and what to try.
fn bind_failure(addr: SocketAddr, e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    let next = SocketAddr::new(addr.ip(), addr.port().wrapping_add(1).max(1024));
    match e.kind() {
        ErrorKind::AddrInUse => format!(
            "cannot listen on {addr}: address already in use\n  \
             another registry (or another program) may be running there: stop it, or \
             pick another port with --addr {next}"
        ),
        ErrorKind::PermissionDenied => format!(
            "cannot listen on {addr}: permission denied\n  \
             ports below 1024 need privileges: pick another port with --addr {}",
            SocketAddr::new(addr.ip(), 5000)
        ),
        ErrorKind::AddrNotAvailable => format!(
            "cannot listen on {addr}: {} is not an address of this machine\n  \
             use --addr 127.0.0.1:{port} (this machine only) or --addr 0.0.0.0:{port} \
             (every interface)",
            addr.ip(),
            port = addr.port()
        ),
        _ => format!("cannot listen on {addr}: {e}\n  pick another address with --addr HOST:PORT"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // `RUST_LOG=debug`, `RUST_LOG=registry_http=debug,info`: levels per target (no
    // `env-filter` feature: it brings a regex engine into the build).
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) => directives.parse().unwrap_or_else(|e| {
            eprintln!("serve: RUST_LOG={directives:?} not understood ({e}); logging at info");
            Targets::new().with_default(tracing::Level::INFO)
        }),
        Err(_) => Targets::new().with_default(tracing::Level::INFO),
    };
    // registry-http writes the access log lines itself (through the fmt layer each
    // cost ~20,000 instructions, more than the request), but on stdout `RUST_LOG`
    // still decides whether they are written, as for any other target.
    let access_log_on = filter.would_enable("registry_http::access", &tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer())
        .with(filter)
        .init();
    let mut args = Args::parse();
    args.no_access_log |= !access_log_on && args.access_log.is_none();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("serve: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; `Err` is the message for the user.
async fn run(args: &Args) -> Result<(), String> {
    match &args.command {
        Some(Command::Check {
            verify_digests,
            repair,
        }) => {
            if let StorageKind::Object(url) = &args.storage {
                return check_bucket(url, *verify_digests, *repair).await;
            }
            if !args.data_dir.is_dir() {
                return Err(format!(
                    "no store to check: {} is not a directory\n  \
                     pass the store's directory with --data-dir DIR",
                    shown(&args.data_dir)
                ));
            }
            let store = FsStore::open(&args.data_dir)
                .await
                .map_err(|e| fs_failure(&args.data_dir, &e))?;
            let report = store
                .check(CheckOptions {
                    verify_digests: *verify_digests,
                    repair: *repair,
                })
                .await
                .map_err(|e| format!("check of {} failed: {e}", shown(&args.data_dir)))?;
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
            let audit = open_audit(args)?;
            let storage =
                registry_http::instrument_storage(open_storage(args).await?, None, audit.as_ref());
            let registry = with_policies(Registry::builder(storage), args).build();
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
                .await
                .map_err(|e| format!("gc failed: {e}"))?;
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
        Some(Command::TokenKey { cert, days }) => return token_key(args, cert, *days),
        Some(Command::Sync {
            from,
            to,
            from_credentials,
            to_credentials,
            no_referrers,
        }) => {
            let line = remote::sync(
                from,
                from_credentials.as_deref(),
                to,
                to_credentials.as_deref(),
                !no_referrers,
                async || {
                    Ok(
                        with_policies(Registry::builder(open_storage(args).await?), args)
                            .with_max_manifest_size(args.max_manifest_size)
                            .build(),
                    )
                },
            )
            .await?;
            println!("{line}");
            return Ok(());
        }
        Some(Command::Import { repo, tags, path }) => {
            let registry = with_policies(Registry::builder(open_storage(args).await?), args)
                .with_max_manifest_size(args.max_manifest_size)
                .build();
            let options = registry_layout::ImportOptions::default().with_tags(tags.clone());
            let report = registry_layout::import(&registry, repo, path, &options)
                .await
                .map_err(|e| format!("import of {} failed: {e}", path.display()))?;
            println!("import: {report}");
            return Ok(());
        }
        Some(Command::Export { repo, tags, path }) => {
            // Read-only: an export only reads, and must not even refresh blob protection.
            let registry = Registry::builder(open_storage(args).await?)
                .read_only(true)
                .build();
            let selection = match repo {
                Some(repo) => {
                    registry_layout::ExportSelection::repository(repo.clone(), tags.clone())
                }
                None => registry_layout::ExportSelection::Registry,
            };
            let options = registry_layout::ExportOptions::default();
            let report = registry_layout::export(&registry, &selection, path, &options)
                .await
                .map_err(|e| format!("export to {} failed: {e}", path.display()))?;
            println!("export: {report}");
            return Ok(());
        }
        None => {}
    }
    // Listen first: a port in use is the most common failure, and says the most.
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| bind_failure(args.addr, &e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
    let metrics_listener = match args.metrics_addr {
        Some(at) => Some(
            tokio::net::TcpListener::bind(at)
                .await
                .map_err(|e| bind_failure(at, &e).replace("--addr", "--metrics-addr"))?,
        ),
        None => None,
    };
    let metrics = metrics_listener.as_ref().map(|_| Metrics::new());
    let audit = open_audit(args)?;
    let storage = registry_http::instrument_storage(
        open_storage(args).await?,
        metrics.as_ref(),
        audit.as_ref(),
    );
    let builder = remote::with_upstreams(
        Registry::builder(storage),
        &args.proxy,
        args.proxy_spool.as_deref(),
    )?;
    let registry = with_policies(builder, args)
        .with_max_manifest_size(args.max_manifest_size)
        .with_max_blob_size(args.max_blob_size.unwrap_or(u64::MAX))
        .with_max_open_uploads(args.max_uploads, args.max_uploads_per_repo)
        .with_max_open_uploads_per_owner(args.max_uploads_per_client)
        .with_upload_expiry(args.upload_expiry)
        .with_empty_upload_expiry(args.empty_upload_expiry)
        .with_max_page_size(args.max_page_size)
        .with_protection_window(Duration::from_secs(args.gc_window))
        .with_verify_reads(!args.no_verify_reads)
        .build();
    let config = HttpConfig::default()
        .with_server_limits(ServerLimits {
            header_read_timeout: args.header_read_timeout,
            max_connections: args.max_connections,
        })
        .with_body_idle_timeout(args.body_idle_timeout)
        .with_manifest_buffer_budget(args.manifest_buffer_budget)
        .with_manifest_body_deadline(args.manifest_body_deadline)
        .with_read_only(args.read_only)
        .with_deletes(!args.no_deletes)
        .with_base_url(args.base_url.clone())
        .with_redirect_blobs(args.redirect_blobs)
        .with_access_log(open_access_log(args)?);
    // Metrics are served by their own listener only: no credentials needed there, and
    // nothing extra on the registry's.
    let config = match &metrics {
        Some(m) => config.with_metrics(m.clone()).with_metrics_route(false),
        None => config,
    };
    let config = match &audit {
        Some(a) => config.with_audit(a.clone()),
        None => config,
    };
    let config = match auth_from_args(args)? {
        Some(auth) => {
            tracing::info!(
                users = args.auth_users.len(),
                htpasswd = args.htpasswd.len(),
                external_token_server = args.token_realm.as_deref(),
                anonymous_read = args.anonymous_read,
                "authentication required"
            );
            config.with_auth(auth)
        }
        None => config,
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    scrub::start(
        args.scrub_every,
        args.scrub_rate,
        stop_rx.clone(),
        metrics.as_ref(),
    );
    if args.gc_interval > 0 {
        let registry = registry.clone();
        let mut stop = stop_rx.clone();
        let interval = Duration::from_secs(args.gc_interval);
        let metrics = metrics.clone();
        // `Registry::run_collector`, plus each run's report into the metrics.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let result = registry.collect_garbage(&GcOptions::default()).await;
                if let Some(m) = &metrics {
                    m.record_gc(&result);
                }
                match result {
                    Ok(report) => tracing::debug!(%report, "garbage collection"),
                    Err(e) => tracing::warn!(error = %e, "garbage collection failed; will retry"),
                }
            }
        });
    }

    if remote::any_budget(&args.proxy) {
        let registry = registry.clone();
        let mut stop = stop_rx.clone();
        // Eviction deletes manifests; the collector (--gc-interval) frees their bytes.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
                match registry.prune_cache().await {
                    Ok(report) if report.manifests_removed > 0 => {
                        tracing::info!(?report, "pull-through cache over budget: evicted")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cache eviction failed; will retry"),
                }
            }
        });
    }

    let metrics_server = match (metrics_listener, &metrics) {
        (Some(listener), Some(m)) => {
            let at = listener
                .local_addr()
                .map_err(|e| format!("cannot listen for metrics: {e}"))?;
            let server = registry_http::serve_metrics_on(listener, registry.clone(), m.clone())
                .await
                .map_err(|e| format!("cannot serve metrics on {at}: {e}"))?;
            Some(server)
        }
        _ => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles::open(cert, key).map_err(|e| {
            format!("cannot use the TLS certificate and key: {e}\n  pass PEM files with --tls-cert and --tls-key")
        })?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let notifier = start_notifier(args, &registry, scheme, addr)?;
    let mirrors = remote::start_mirrors(&registry, &args.mirror, &instance_name(args, addr))?;
    if let Some(metrics) = &metrics {
        if !args.proxy.is_empty() {
            metrics.register_encoder(registry_http::proxy_metrics(registry.clone()));
        }
        if !mirrors.is_empty() {
            let watches = mirrors.iter().map(registry_core::Mirror::watch).collect();
            metrics.register_encoder(registry_http::mirror_metrics(watches));
        }
    }
    if let (Some(notifier), Some(metrics)) = (&notifier, &metrics) {
        let collector = notifier.collector();
        metrics.register_encoder(Box::new(move |e| collector.encode_to(e)));
    }
    let server = match tls {
        Some(tls) => registry_http::serve_tls_on(listener, registry, config, tls).await,
        None => registry_http::serve_on(listener, registry, config).await,
    }
    .map_err(|e| format!("cannot serve on {addr}: {e}"))?;
    let everywhere = if addr.ip().is_unspecified() {
        " (every interface)"
    } else {
        ""
    };
    println!("listening on {scheme}://{addr}{everywhere}");
    println!("{}", storage_line(args));
    if let Some(m) = &metrics_server {
        println!("metrics on {}/metrics (also /healthz, /readyz)", m.url());
    }
    if let Some(path) = &args.audit_log {
        println!("audit log: {}", shown(path));
    }
    for endpoint in &args.notify {
        println!("webhook: {} ({})", endpoint.url(), endpoint.format.as_str());
    }
    for spec in &args.proxy {
        println!("pull-through cache: {}", spec.describe());
    }
    for spec in &args.mirror {
        println!("mirror: {}", spec.describe());
    }
    println!("Ctrl-C to stop");
    tracing::info!(%addr, "registry ready");
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    server.shutdown().await;
    if let Some(m) = metrics_server {
        m.shutdown().await;
    }
    if let Some(n) = notifier {
        n.shutdown().await;
    }
    for mirror in mirrors {
        mirror.shutdown().await;
    }
    Ok(())
}

/// This process's name among those sharing a storage, for the mirrors' leases. Stable
/// across restarts, so a restarted process takes its lease back at once instead of
/// waiting for it to expire: with fs or memory storage only one process can use the
/// storage; otherwise the host and listening address tell processes apart.
fn instance_name(args: &Args, addr: SocketAddr) -> String {
    if matches!(args.storage, StorageKind::Fs | StorageKind::Memory) && args.metadata.is_none() {
        return "local".to_owned();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("pid-{}", std::process::id()));
    format!("{host}/{addr}")
}

/// The webhook deliveries of `--notify`, if any.
fn start_notifier(
    args: &Args,
    registry: &Registry,
    scheme: &str,
    addr: SocketAddr,
) -> Result<Option<registry_http::Notifier>, String> {
    if args.notify.is_empty() {
        return Ok(None);
    }
    let secret = match &args.notify_secret_file {
        Some(path) => Some(registry_http::notify::Secret::from_file(path).map_err(|e| {
            format!(
                "cannot read the webhook secret {}: {e}
  pass a readable, non-empty file with --notify-secret-file FILE",
                shown(path)
            )
        })?),
        None => None,
    };
    let base_url = args
        .base_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{addr}"));
    let mut config = registry_http::NotifyConfig::default()
        .with_poll(args.notify_poll)
        .with_linger(args.notify_linger)
        .with_source(addr.to_string(), base_url);
    for endpoint in &args.notify {
        config = config.with_endpoint(endpoint.clone().with_secret(secret.clone()));
    }
    Ok(Some(registry_http::Notifier::start(
        registry.clone(),
        config,
    )))
}

/// The audit log of `--audit-log`, if any.
fn open_audit(args: &Args) -> Result<Option<AuditLog>, String> {
    let Some(path) = &args.audit_log else {
        return Ok(None);
    };
    let log = AuditLog::open(path).map_err(|e| {
        format!(
            "cannot open the audit log {}: {e}
  pick a file you can write with --audit-log FILE",
            shown(path)
        )
    })?;
    Ok(Some(log.with_fsync(args.audit_log_fsync)))
}

fn open_access_log(args: &Args) -> Result<Option<AccessLog>, String> {
    if args.no_access_log {
        return Ok(None);
    }
    let Some(path) = &args.access_log else {
        return Ok(Some(AccessLog::stdout()));
    };
    let log = AccessLog::open(path).map_err(|e| {
        format!(
            "cannot open the access log {}: {e}
  pick a file you can write with --access-log FILE",
            shown(path)
        )
    })?;
    Ok(Some(log))
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
