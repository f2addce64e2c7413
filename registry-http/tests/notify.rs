//! Webhook delivery (`registry_http::notify`) against a real HTTP receiver on
//! 127.0.0.1: once per change, signed, filtered, retried with the same ids, the backlog
//! after an outage in order, and one delivery per event when two processes share a
//! storage.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use registry_core::{Reference, Registry, RepoName, Tag, fixtures};
use registry_http::notify::{
    ATTEMPT_HEADER, DELIVERY_HEADER, DISTRIBUTION_EVENTS_V1, Endpoint, EndpointStatus, Notifier,
    NotifyConfig, SIGNATURE_HEADER, Secret,
};
use serde_json::Value;
use tokio::net::TcpListener;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
    status: StatusCode,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
    /// The events of a Distribution envelope or a CloudEvents batch or event.
    fn events(&self) -> Vec<Value> {
        match self.json() {
            Value::Object(mut o) if o.contains_key("events") => match o.remove("events") {
                Some(Value::Array(a)) => a,
                _ => panic!("events is not an array"),
            },
            Value::Array(a) => a,
            single => vec![single],
        }
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

#[derive(Default)]
struct ReceiverState {
    got: Vec<Received>,
    /// Statuses to answer next, then 200.
    script: VecDeque<StatusCode>,
}

#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
    stop: Arc<tokio::sync::Notify>,
}

impl Receiver {
    async fn start() -> Receiver {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    fn start_on(listener: TcpListener) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let stop = Arc::new(tokio::sync::Notify::new());
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(state.clone());
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.notified().await })
                .await
                .unwrap();
        });
        Receiver { addr, state, stop }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn fail_next(&self, statuses: &[StatusCode]) {
        self.state.lock().unwrap().script.extend(statuses);
    }

    fn got(&self) -> Vec<Received> {
        self.state.lock().unwrap().got.clone()
    }

    /// The events of the requests to `path` answered 2xx.
    fn delivered(&self, path: &str) -> Vec<Value> {
        self.got()
            .iter()
            .filter(|r| r.path == path && r.status.is_success())
            .flat_map(Received::events)
            .collect()
    }

    /// Waits until `path` got `n` events answered 2xx.
    async fn wait_for(&self, path: &str, n: usize) -> Vec<Value> {
        for _ in 0..400 {
            let got = self.delivered(path);
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{path}: wanted {n} events, got {:#?}", self.delivered(path));
    }
}

async fn receive(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mut s = state.lock().unwrap();
    let status = s.script.pop_front().unwrap_or(StatusCode::OK);
    s.got.push(Received {
        path: uri.path().to_owned(),
        headers,
        body,
        status,
    });
    status
}

fn repo(s: &str) -> RepoName {
    RepoName::parse(s).unwrap()
}

fn config() -> NotifyConfig {
    NotifyConfig::default()
        .with_poll(Duration::from_millis(50))
        .with_backoff(Duration::from_millis(50), Duration::from_millis(400))
        .with_source("127.0.0.1:5000", "http://127.0.0.1:5000")
}

/// Waits until some endpoint task of `notifiers` claimed each endpoint's lease: a new
/// consumer starts at the head, so changes before that are not sent.
async fn claimed(notifiers: &[&Notifier]) {
    for _ in 0..400 {
        let n = notifiers[0].status().len();
        let all = (0..n).all(|i| notifiers.iter().any(|x| x.status()[i].delivering));
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no lease claimed");
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

fn seq_of(id: &str) -> u64 {
    id.split('-').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn each_change_arrives_once_signed() {
    let receiver = Receiver::start().await;
    let registry = Registry::in_memory();
    let secret = Secret::new("s3cret");
    let endpoint = Endpoint::new(&receiver.url("/hook"))
        .unwrap()
        .with_secret(Some(secret.clone()));
    let notifier = Notifier::start(registry.clone(), config().with_endpoint(endpoint));
    claimed(&[&notifier]).await;

    let image = fixtures::image().layers([10, 20]);
    let pushed = image
        .push(&registry, &repo("team/app"), "v1")
        .await
        .unwrap();
    // Config, two layers, and the manifest with its tag (one event, as Distribution).
    let events = receiver.wait_for("/hook", 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events_now = receiver.delivered("/hook");
    assert_eq!(events_now.len(), 4, "once per change: {events_now:#?}");
    assert_eq!(events, events_now);

    let unique: HashSet<_> = ids(&events).into_iter().collect();
    assert_eq!(unique.len(), 4);
    let seqs: Vec<u64> = ids(&events).iter().map(|i| seq_of(i)).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");

    let manifest = &events[3];
    assert_eq!(manifest["action"], "push");
    assert_eq!(
        manifest["target"]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["target"]["digest"],
        pushed.manifest.digest.to_string()
    );
    assert_eq!(manifest["target"]["size"], pushed.manifest.size);
    assert_eq!(manifest["target"]["repository"], "team/app");
    assert_eq!(manifest["target"]["tag"], "v1");
    assert_eq!(
        manifest["target"]["url"],
        format!(
            "http://127.0.0.1:5000/v2/team/app/manifests/{}",
            pushed.manifest.digest
        )
    );
    for e in &events[..3] {
        assert_eq!(e["action"], "push");
        assert_eq!(e["target"]["mediaType"], "application/octet-stream");
    }

    for r in receiver.got() {
        assert_eq!(r.header("content-type"), DISTRIBUTION_EVENTS_V1);
        assert!(secret.verify(&r.body, r.header(SIGNATURE_HEADER)));
        assert!(!Secret::new("other").verify(&r.body, r.header(SIGNATURE_HEADER)));
        assert!(!r.header(DELIVERY_HEADER).is_empty());
        assert_eq!(r.header(ATTEMPT_HEADER), "1");
    }
    let status: Vec<EndpointStatus> = notifier.status();
    assert_eq!(status[0].delivered_events, 4);
    assert_eq!(status[0].failed_requests, 0);
    assert_eq!(status[0].lag, 0);
    assert_eq!(status[0].cursor, registry.events_head().await.unwrap());
    notifier.shutdown().await;
}

#[tokio::test]
async fn filters_and_formats_per_endpoint() {
    let receiver = Receiver::start().await;
    let registry = Registry::in_memory();
    let team_a = Endpoint::parse(&format!("{},prefix=team-a/", receiver.url("/a"))).unwrap();
    let deletes = Endpoint::parse(&format!("{},actions=delete", receiver.url("/del"))).unwrap();
    let manifests = Endpoint::parse(&format!(
        "{},media=application/vnd.oci.image.manifest.v1+json,format=cloudevents-batch",
        receiver.url("/ce")
    ))
    .unwrap();
    let notifier = Notifier::start(
        registry.clone(),
        config()
            .with_endpoint(team_a)
            .with_endpoint(deletes)
            .with_endpoint(manifests),
    );
    claimed(&[&notifier]).await;

    let a = fixtures::image().seed(1).layers([5]);
    let b = fixtures::image().seed(2).layers([5]);
    a.push(&registry, &repo("team-a/app"), "v1").await.unwrap();
    b.push(&registry, &repo("team-ab/app"), "v1").await.unwrap();
    registry
        .delete_manifest(
            &repo("team-ab/app"),
            &Reference::Tag(Tag::parse("v1").unwrap()),
        )
        .await
        .unwrap();

    // team-a: config, layer, manifest.
    let got = receiver.wait_for("/a", 3).await;
    assert!(
        got.iter()
            .all(|e| e["target"]["repository"] == "team-a/app")
    );
    // Deletes only: the tag.
    let got = receiver.wait_for("/del", 1).await;
    assert_eq!(got[0]["action"], "delete");
    assert_eq!(got[0]["target"]["repository"], "team-ab/app");
    assert_eq!(got[0]["target"]["tag"], "v1");
    // Image manifests only, as CloudEvents: both manifest pushes and both tag moves.
    let got = receiver.wait_for("/ce", 4).await;
    let types: Vec<&str> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "oci.registry.manifest_put",
            "oci.registry.tag_moved",
            "oci.registry.manifest_put",
            "oci.registry.tag_moved"
        ]
    );
    assert!(got.iter().all(|e| e["specversion"] == "1.0"));
    let ce = receiver
        .got()
        .into_iter()
        .find(|r| r.path == "/ce")
        .unwrap();
    assert_eq!(
        ce.header("content-type"),
        "application/cloudevents-batch+json"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.delivered("/a").len(), 3);
    assert_eq!(receiver.delivered("/del").len(), 1);
    assert_eq!(receiver.delivered("/ce").len(), 4);
    notifier.shutdown().await;
}

#[tokio::test]
async fn a_failed_delivery_is_retried_with_the_same_ids() {
    let receiver = Receiver::start().await;
    receiver.fail_next(&[
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::SERVICE_UNAVAILABLE,
    ]);
    let registry = Registry::in_memory();
    let endpoint = Endpoint::new(&receiver.url("/hook")).unwrap();
    let notifier = Notifier::start(registry.clone(), config().with_endpoint(endpoint));
    claimed(&[&notifier]).await;

    fixtures::image()
        .layers([3])
        .push(&registry, &repo("r"), "v1")
        .await
        .unwrap();
    let delivered = receiver.wait_for("/hook", 3).await;
    let got = receiver.got();
    assert!(got.len() >= 3, "{got:#?}");
    assert_eq!(got[0].status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(got[1].status, StatusCode::SERVICE_UNAVAILABLE);
    // The retries carry exactly the same body: same ids, same delivery id.
    assert_eq!(got[0].body, got[1].body);
    assert_eq!(got[1].body, got[2].body);
    assert_eq!(
        got[0].header(DELIVERY_HEADER),
        got[2].header(DELIVERY_HEADER)
    );
    assert_eq!(
        [
            got[0].header(ATTEMPT_HEADER),
            got[1].header(ATTEMPT_HEADER),
            got[2].header(ATTEMPT_HEADER)
        ],
        ["1", "2", "3"]
    );
    assert_eq!(ids(&got[0].events()), ids(&delivered));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        receiver.delivered("/hook").len(),
        3,
        "nothing after the 2xx"
    );
    let status = &notifier.status()[0];
    assert_eq!(status.failed_requests, 2);
    assert_eq!(status.delivered_requests, 1);
    assert_eq!(status.last_error, None);
    notifier.shutdown().await;
}

#[tokio::test]
async fn the_backlog_arrives_in_order_when_the_receiver_comes_back() {
    // A port nobody listens on (yet).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let registry = Registry::in_memory();
    let endpoint = Endpoint::new(&format!("http://{addr}/hook"))
        .unwrap()
        .with_max_batch(2);
    let notifier = Notifier::start(registry.clone(), config().with_endpoint(endpoint));
    claimed(&[&notifier]).await;

    for i in 0..4u64 {
        fixtures::image()
            .seed(i)
            .layers([4])
            .push(&registry, &repo(&format!("r{}", i % 2)), "v1")
            .await
            .unwrap();
    }
    // Failing meanwhile.
    for _ in 0..200 {
        if notifier.status()[0].failed_requests >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = &notifier.status()[0];
    assert!(status.failed_requests >= 2, "{status:?}");
    assert!(status.last_error.is_some());
    assert!(status.lag > 0);
    assert_eq!(status.delivered_events, 0);

    let receiver = Receiver::start_on(TcpListener::bind(addr).await.unwrap());
    // Each image: config, layer, manifest with tag.
    let got = receiver.wait_for("/hook", 12).await;
    let seqs: Vec<u64> = ids(&got).iter().map(|i| seq_of(i)).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "strictly in order, once: {seqs:?}"
    );
    assert!(receiver.got().iter().all(|r| r.events().len() <= 2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.delivered("/hook").len(), 12);
    assert_eq!(notifier.status()[0].lag, 0);
    notifier.shutdown().await;
    receiver.stop.notify_one();
}

#[tokio::test]
async fn two_processes_on_one_storage_deliver_each_event_once() {
    let receiver = Receiver::start().await;
    // Two registries over one storage: two processes as far as the outbox goes (each
    // sees the other's events only by polling).
    let one = Registry::in_memory();
    let two = Registry::builder(one.storage()).build();
    let endpoint = Endpoint::new(&receiver.url("/hook")).unwrap();
    let n1 = Notifier::start(one.clone(), config().with_endpoint(endpoint.clone()));
    let n2 = Notifier::start(two.clone(), config().with_endpoint(endpoint));
    claimed(&[&n1, &n2]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let holders = [&n1, &n2]
        .iter()
        .filter(|n| n.status()[0].delivering)
        .count();
    assert_eq!(holders, 1, "one lease holder");

    for i in 0..6u64 {
        let registry = if i % 2 == 0 { &one } else { &two };
        fixtures::image()
            .seed(i)
            .layers([3])
            .push(registry, &repo(&format!("p/r{i}")), "v1")
            .await
            .unwrap();
    }
    let got = receiver.wait_for("/hook", 18).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.delivered("/hook").len(), 18);
    let unique: HashSet<_> = ids(&got).into_iter().collect();
    assert_eq!(unique.len(), 18, "each event once");

    // The holder stops: it gives the lease up, the other takes over at once.
    let (stopping, staying, staying_registry) = if n1.status()[0].delivering {
        (n1, n2, two)
    } else {
        (n2, n1, one)
    };
    stopping.shutdown().await;
    fixtures::image()
        .seed(99)
        .layers([3])
        .push(&staying_registry, &repo("p/late"), "v1")
        .await
        .unwrap();
    let got = receiver.wait_for("/hook", 21).await;
    let unique: HashSet<_> = ids(&got).into_iter().collect();
    assert_eq!(unique.len(), 21);
    assert!(staying.status()[0].delivering);
    staying.shutdown().await;
}
