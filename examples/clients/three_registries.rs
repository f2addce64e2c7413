//! Three registries in one process, each with its own policy, and a promotion between
//! them: `cargo run -p registry-examples-clients --example three_registries` (add
//! `-- --serve` to keep them running for your own clients).
//!
//! - **sandbox**: anyone may push, pull and delete; scratch space.
//! - **ci**: only the `ci` user pushes; everyone pulls.
//! - **prod**: read-only for everyone over HTTP; fed only by promotion from ci (in
//!   process, through the core API, which the HTTP read-only switch does not cover).
//!
//! The walk-through pushes with a real OCI client (oci-client) over loopback HTTP and
//! prints what each registry accepts and refuses; it exits non-zero if any policy
//! answer is not the expected one, so it doubles as a smoke test (the test command runs
//! it).

use std::time::Duration;

use clap::Parser;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use registry_core::access::{Action, AnonymousRead, Grantee, PrefixRules};
use registry_core::promote::{PromoteOptions, promote};
use registry_core::{Registry, RepoName, Tag};
use registry_http::{Auth, HttpConfig, LocalServer, TokenIssuer, serve_local};

#[derive(Parser, Debug)]
#[command(about = "Three registries (sandbox, ci, prod) with their policies and a promotion")]
struct Args {
    /// Keep serving after the walk-through until Ctrl-C.
    #[arg(long)]
    serve: bool,
}

const CI_PASSWORD: &str = "ci-password-for-this-example";

fn client() -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    })
}

fn reference(server: &LocalServer, name: &str) -> Reference {
    let host = server.url().trim_start_matches("http://");
    format!("{host}/{name}").parse().expect("a valid reference")
}

/// Pushes a one-layer image; `Ok(digest)` or the client's error message.
async fn push(server: &LocalServer, name: &str, auth: &RegistryAuth) -> Result<String, String> {
    let layers = vec![ImageLayer::oci_v1(
        format!("contents of {name}").into_bytes(),
        None,
    )];
    let config = Config::oci_v1(
        b"{\"architecture\":\"amd64\",\"os\":\"linux\"}".to_vec(),
        None,
    );
    client()
        .push(&reference(server, name), &layers, config, auth, None)
        .await
        .map(|r| r.manifest_url)
        .map_err(|e| e.to_string())
}

async fn pull(server: &LocalServer, name: &str, auth: &RegistryAuth) -> Result<String, String> {
    client()
        .pull(&reference(server, name), auth, vec![IMAGE_LAYER_MEDIA_TYPE])
        .await
        .map(|image| image.digest.unwrap_or_default())
        .map_err(|e| e.to_string())
}

/// Prints one step and checks that its outcome is the expected one.
fn expect<T>(step: &str, result: Result<T, String>, allowed: bool, failures: &mut Vec<String>) {
    let outcome = match &result {
        Ok(_) => "allowed".to_owned(),
        Err(e) => format!("refused ({})", e.lines().next().unwrap_or("")),
    };
    let ok = result.is_ok() == allowed;
    println!(
        "  [{}] {step}: {outcome}",
        if ok { "ok" } else { "UNEXPECTED" }
    );
    if !ok {
        failures.push(step.to_owned());
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let anonymous = RegistryAuth::Anonymous;
    let ci_user = RegistryAuth::Basic("ci".into(), CI_PASSWORD.into());

    // sandbox: open to everyone, no authentication at all.
    let sandbox = Registry::in_memory();
    let sandbox_server = serve_local(sandbox.clone(), HttpConfig::default()).await?;

    // ci: the `ci` user does everything, everyone else reads.
    let ci = Registry::in_memory();
    let ci_policy = PrefixRules::new()
        .grant(Grantee::Anyone, "", Action::READ)
        .grant(Grantee::user("ci"), "", Action::ALL);
    let ci_auth = Auth::new(ci_policy)
        .with_user("ci", CI_PASSWORD)
        .with_token_issuer(TokenIssuer::new("ci"));
    let ci_server = serve_local(ci.clone(), HttpConfig::default().with_auth(ci_auth)).await?;

    // prod: anonymous reads, no writes over HTTP at all.
    let prod = Registry::in_memory();
    let prod_auth =
        Auth::new(AnonymousRead(PrefixRules::new())).with_token_issuer(TokenIssuer::new("prod"));
    let prod_config = HttpConfig::default()
        .with_auth(prod_auth)
        .with_read_only(true);
    let prod_server = serve_local(prod.clone(), prod_config).await?;

    println!("sandbox {}  (anyone writes)", sandbox_server.url());
    println!(
        "ci      {}  (user ci writes, everyone reads)",
        ci_server.url()
    );
    println!(
        "prod    {}  (read-only; fed by promotion)",
        prod_server.url()
    );

    let mut failures = Vec::new();
    println!("\nsandbox:");
    expect(
        "anonymous push",
        push(&sandbox_server, "scratch/app:try", &anonymous).await,
        true,
        &mut failures,
    );

    println!("ci:");
    expect(
        "anonymous push",
        push(&ci_server, "team/app:build-1", &anonymous).await,
        false,
        &mut failures,
    );
    expect(
        "push as ci with a wrong password",
        push(
            &ci_server,
            "team/app:build-1",
            &RegistryAuth::Basic("ci".into(), "guess".into()),
        )
        .await,
        false,
        &mut failures,
    );
    expect(
        "push as ci",
        push(&ci_server, "team/app:build-1", &ci_user).await,
        true,
        &mut failures,
    );
    expect(
        "anonymous pull",
        pull(&ci_server, "team/app:build-1", &anonymous).await,
        true,
        &mut failures,
    );

    println!("promotion ci -> prod (team/app:build-1 as v1.0):");
    let repo = RepoName::parse("team/app")?;
    let digest = ci
        .stat_manifest(
            &repo,
            &registry_core::Reference::Tag(Tag::parse("build-1")?),
        )
        .await?
        .digest;
    let report = promote(
        &ci,
        &repo,
        &digest,
        &prod,
        &repo,
        &PromoteOptions::default().with_tag(Tag::parse("v1.0")?),
    )
    .await?;
    println!(
        "  {} manifest(s) copied, {} blob(s) streamed ({} bytes), {} mounted",
        report.manifests_copied, report.blobs_streamed, report.bytes_streamed, report.blobs_mounted
    );

    println!("prod:");
    let pulled = pull(&prod_server, "team/app:v1.0", &anonymous).await;
    let same = pulled.as_deref() == Ok(digest.to_string().as_str());
    expect(
        "anonymous pull of the promoted image",
        pulled,
        true,
        &mut failures,
    );
    if !same {
        failures.push("the promoted digest differs".into());
    }
    expect(
        "anonymous push",
        push(&prod_server, "team/app:v2.0", &anonymous).await,
        false,
        &mut failures,
    );
    let again = promote(
        &ci,
        &repo,
        &digest,
        &prod,
        &repo,
        &PromoteOptions::default(),
    )
    .await?;
    println!(
        "  promoting again: {} manifest(s) skipped, {} copied",
        again.manifests_skipped, again.manifests_copied
    );

    if !failures.is_empty() {
        eprintln!("\nunexpected outcomes: {failures:?}");
        std::process::exit(1);
    }
    println!("\nevery policy answered as expected");
    if args.serve {
        println!("serving until Ctrl-C");
        tokio::signal::ctrl_c().await?;
    }
    for server in [sandbox_server, ci_server, prod_server] {
        tokio::time::timeout(Duration::from_secs(5), server.shutdown()).await?;
    }
    Ok(())
}
