//! A real PostgreSQL server for the tests: Debian's package (installed by
//! `scripts/install-test-deps.sh`), a cluster created in a temporary directory, started
//! once per test binary on a free loopback port, with a fresh database per test.
//!
//! The server runs under a small shell guard that stops it (SIGQUIT, the immediate
//! shutdown, then SIGKILL, by PID) and removes its directory when the test binary exits,
//! since statics are never dropped. As root
//! (CI), the cluster runs as the `postgres` user the package creates: PostgreSQL refuses
//! to run as root.
//!
//! Commits are not flushed before they are acknowledged (`synchronous_commit = off`):
//! these tests check the metadata rules and their isolation, not the disk, and a flush
//! per transaction would make the suite several times slower.

#![allow(dead_code, unreachable_pub)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The newest installed PostgreSQL's binaries.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect(
            "PostgreSQL is not installed (/usr/lib/postgresql): run scripts/install-test-deps.sh",
        )
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort();
    let v = versions
        .last()
        .expect("no PostgreSQL version under /usr/lib/postgresql");
    PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The server's port (started on first use).
pub fn port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let port = free_port();
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("registry-pg-")
            .tempdir()
            .expect("tempdir")
            .keep();
        let data = dir.join("data");
        // As root, everything runs as `postgres`, which must own the directory.
        let run_as = if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown")
                .success();
            assert!(ok, "chown of the cluster directory to postgres failed");
            // setpriv execs (runuser forks and waits), so the guard's PID is the server's.
            "setpriv --reuid=postgres --regid=postgres --init-groups "
        } else {
            ""
        };
        let script = format!(
            "set -e; \
             {run_as}'{bin}/initdb' -D '{data}' -U registry --auth=trust --no-sync -E UTF8 >'{dir}/initdb.log' 2>&1; \
             {run_as}'{bin}/postgres' -D '{data}' -p {port} -k '{dir}' \
               -c listen_addresses=127.0.0.1 -c synchronous_commit=off -c max_connections=300 \
               >'{dir}/server.log' 2>&1 & child=$!; \
             while kill -0 {parent} 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 0.5; done; \
             kill -QUIT $child 2>/dev/null || true; sleep 1; kill -9 $child 2>/dev/null || true; rm -rf '{dir}'",
            bin = bin.display(),
            data = data.display(),
            dir = dir.display(),
            parent = std::process::id(),
        );
        let mut guard = Command::new("bash")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting PostgreSQL");
        std::thread::spawn(move || guard.wait());
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start on port {port}; see {}/initdb.log and server.log",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        port
    })
}

/// The URL of a new, empty database that no other test uses.
pub async fn fresh_database() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let port = port();
    let name = format!(
        "t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let admin = format!("postgres://registry@127.0.0.1:{port}/postgres");
    // The server accepts connections a moment before it accepts logins.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (client, connection) = loop {
        match tokio_postgres::connect(&admin, tokio_postgres::NoTls).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("connecting to PostgreSQL: {e}"),
        }
    };
    let task = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    drop(client);
    let _ = task.await;
    format!("postgres://registry@127.0.0.1:{port}/{name}")
}
