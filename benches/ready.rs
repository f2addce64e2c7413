//! Startup time of a registry server: from the moment the new process runs (its
//! `exec` done) to its first `200` on `GET /v2/`, over many starts.
//!
//! ```text
//! ready [--runs N] [--max-seconds S] [--env KEY=VALUE]... -- PROGRAM ARG...
//! ```
//!
//! In `ARG`s and `--env` values, `{port}` is replaced by a free loopback port and
//! `{dir}` by a fresh empty directory (removed after the run), new for every start.
//! The clock starts when `spawn` returns: the standard library returns from it once the
//! child has called `exec` (it waits on a close-on-exec pipe), so forking and loading
//! the program are outside the figure, which is what the process itself costs: opening
//! its storage, binding, starting its runtime. The time including `spawn` is reported
//! too. `GET /v2/` is tried every 100 µs on a fresh connection; each server is killed
//! (SIGKILL: it is ours, and its shutdown is not measured) before the next start.
//!
//! Prints one JSON object: medians, minimum, 90th percentile and maximum in ms.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

struct Args {
    runs: usize,
    max_seconds: f64,
    env: Vec<(String, String)>,
    program: Vec<String>,
}

fn usage() -> String {
    "usage: ready [--runs N] [--max-seconds S] [--env KEY=VALUE]... -- PROGRAM ARG...\n  \
     {port} and {dir} in ARGs and --env values: a free port, a fresh directory"
        .to_owned()
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        runs: 20,
        max_seconds: 30.0,
        env: Vec::new(),
        program: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                args.runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--runs needs a positive number")?
            }
            "--max-seconds" => {
                args.max_seconds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--max-seconds needs a number")?
            }
            "--env" => {
                let kv = it.next().ok_or("--env needs KEY=VALUE")?;
                let (k, v) = kv.split_once('=').ok_or("--env needs KEY=VALUE")?;
                args.env.push((k.to_owned(), v.to_owned()));
            }
            "--" => {
                args.program = it.by_ref().collect();
                break;
            }
            "--help" | "-h" => return Err(usage()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    if args.program.is_empty() {
        return Err(usage());
    }
    Ok(args)
}

/// A port nobody listens on now (the kernel's pick; released before the server binds).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether `GET /v2/` on `port` answers 200 now.
fn answers_200(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut buf = [0u8; 12];
        let mut n = 0;
        while n < buf.len() {
            let k = s.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        Ok(buf[..n].starts_with(b"HTTP/1.1 200") || buf[..n].starts_with(b"HTTP/1.0 200"))
    };
    attempt().unwrap_or(false)
}

/// One start: (ms from spawn's return to the first 200, ms including spawn).
fn one_start(args: &Args, run: usize) -> Result<(f64, f64), String> {
    let port = free_port().map_err(|e| format!("no free port: {e}"))?;
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "registry-ready-{}-{run}-{port}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let fill = |s: &str| {
        s.replace("{port}", &port.to_string())
            .replace("{dir}", &dir.to_string_lossy())
    };
    let mut cmd = Command::new(&args.program[0]);
    cmd.args(args.program[1..].iter().map(|a| fill(a)))
        .envs(args.env.iter().map(|(k, v)| (k, fill(v))))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let before_spawn = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args.program[0]))?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.max_seconds);
    let result = loop {
        if answers_200(port) {
            let now = Instant::now();
            break Ok((
                (now - started).as_secs_f64() * 1e3,
                (now - before_spawn).as_secs_f64() * 1e3,
            ));
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("the server exited before answering ({status})"));
        }
        if Instant::now() > deadline {
            break Err(format!("no 200 on GET /v2/ within {} s", args.max_seconds));
        }
        std::thread::sleep(Duration::from_micros(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ready: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut ready = Vec::with_capacity(args.runs);
    let mut with_spawn = Vec::with_capacity(args.runs);
    for run in 0..args.runs {
        match one_start(&args, run) {
            Ok((r, s)) => {
                ready.push(r);
                with_spawn.push(s);
            }
            Err(e) => {
                eprintln!("ready: start {}: {e}", run + 1);
                return ExitCode::FAILURE;
            }
        }
    }
    ready.sort_by(f64::total_cmp);
    with_spawn.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "workload": "startup",
            "runs": args.runs,
            "ready_ms": round3(percentile(&ready, 0.5)),
            "min_ms": round3(ready[0]),
            "p90_ms": round3(percentile(&ready, 0.9)),
            "max_ms": round3(ready[ready.len() - 1]),
            "with_spawn_ms": round3(percentile(&with_spawn, 0.5)),
        })
    );
    ExitCode::SUCCESS
}
