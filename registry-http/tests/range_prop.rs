//! Property tests for the `Range` and `Content-Range` parsers (`registry_http::range`),
//! alone and through the router: never a panic, canonical forms round trip, and what a
//! blob read serves is exactly the bytes the range names.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use registry_core::{Digest, RangeRequest, Registry};
use registry_http::range::{parse_content_range, parse_range};
use registry_http::{HttpConfig, router};
use tower::ServiceExt;

/// Header values near both grammars: numbers at the edges of u64, separators, prefixes,
/// whitespace, multi-ranges; plus arbitrary text.
fn rangeish() -> impl Strategy<Value = String> {
    let num = prop_oneof![
        Just(String::new()),
        (0u64..2048).prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just((u64::MAX - 1).to_string()),
        Just("18446744073709551616".to_owned()),
        "[0-9]{1,25}",
        "-?[0-9a-f ]{1,4}",
    ];
    prop_oneof![
        (
            prop_oneof![
                Just("bytes="),
                Just("bytes "),
                Just(""),
                Just(" bytes= "),
                Just("items=")
            ],
            num.clone(),
            prop_oneof![Just("-"), Just("--"), Just(" - "), Just(""), Just(",")],
            num,
            prop_oneof![Just(""), Just("/10"), Just("/*"), Just(",0-1"), Just("/")],
        )
            .prop_map(|(p, a, s, b, t)| format!("{p}{a}{s}{b}{t}")),
        "\\PC{0,40}",
    ]
}

fn canonical(r: RangeRequest) -> String {
    match r {
        RangeRequest::FromTo(a, b) => format!("bytes={a}-{b}"),
        RangeRequest::From(a) => format!("bytes={a}-"),
        RangeRequest::Suffix(n) => format!("bytes=-{n}"),
    }
}

fn range_request() -> impl Strategy<Value = RangeRequest> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| RangeRequest::FromTo(a, b)),
        (0u64..64, 0u64..64).prop_map(|(a, b)| RangeRequest::FromTo(a, b)),
        any::<u64>().prop_map(RangeRequest::From),
        (0u64..64).prop_map(RangeRequest::From),
        any::<u64>().prop_map(RangeRequest::Suffix),
        (0u64..64).prop_map(RangeRequest::Suffix),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn content_range_never_panics_and_its_length_fits(v in rangeish()) {
        if let Some((a, b)) = parse_content_range(&v) {
            prop_assert!(a <= b);
            prop_assert!((b - a).checked_add(1).is_some(), "{:?} gives an overflowing length", v);
        }
    }

    #[test]
    fn content_range_round_trips(a in any::<u64>(), b in any::<u64>(), total in any::<u64>()) {
        let want = (a <= b && b < u64::MAX).then_some((a, b));
        prop_assert_eq!(parse_content_range(&format!("{a}-{b}")), want);
        prop_assert_eq!(parse_content_range(&format!("bytes {a}-{b}/{total}")), want);
        prop_assert_eq!(parse_content_range(&format!("bytes {a}-{b}/*")), want);
        prop_assert_eq!(parse_content_range(&format!(" {a} - {b} ")), want);
    }

    #[test]
    fn range_never_panics_and_errors_are_416(v in rangeish()) {
        match parse_range(&v) {
            Ok(Some(r)) => prop_assert_eq!(parse_range(&canonical(r)).unwrap(), Some(r)),
            Ok(None) => {}
            Err(e) => {
                prop_assert_eq!(e.status(), StatusCode::RANGE_NOT_SATISFIABLE);
                prop_assert_eq!(e.code(), "SIZE_INVALID");
            }
        }
    }

    #[test]
    fn range_round_trips(r in range_request()) {
        prop_assert_eq!(parse_range(&canonical(r)).unwrap(), Some(r));
    }

    /// RFC 9110 semantics of a resolved range, for any range and blob size.
    #[test]
    fn resolved_ranges_lie_inside_the_blob(r in range_request(), size in prop_oneof![0u64..80, any::<u64>()]) {
        match r.resolve(size) {
            Ok(br) => {
                prop_assert!(br.start <= br.end && br.end < size);
                match r {
                    RangeRequest::FromTo(a, b) => {
                        prop_assert_eq!(br.start, a);
                        prop_assert_eq!(br.end, b.min(size - 1));
                    }
                    RangeRequest::From(a) => prop_assert_eq!((br.start, br.end), (a, size - 1)),
                    RangeRequest::Suffix(n) => {
                        prop_assert_eq!(br.end, size - 1);
                        prop_assert_eq!(br.len(), n.min(size));
                    }
                }
            }
            Err(_) => {
                let satisfiable = size > 0
                    && match r {
                        RangeRequest::FromTo(a, b) => a <= b && a < size,
                        RangeRequest::From(a) => a < size,
                        RangeRequest::Suffix(n) => n > 0,
                    };
                prop_assert!(!satisfiable, "{:?} on {} refused", r, size);
            }
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(f)
}

async fn call(
    app: &Router,
    mut req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    // An HTTP/1.1 request needs a Host header.
    req.headers_mut()
        .insert("host", axum::http::HeaderValue::from_static("localhost"));
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Through the router: a 206 carries exactly the named bytes and a matching
    /// Content-Range; otherwise the whole blob (200) or 416; never anything else.
    #[test]
    fn blob_reads_serve_exactly_the_range(
        blob in proptest::collection::vec(any::<u8>(), 0..64),
        header in prop_oneof![rangeish(), range_request().prop_map(canonical)],
    ) {
        block_on(async {
            let app = router(Registry::in_memory(), HttpConfig::default());
            let d = Digest::sha256(&blob);
            let (s, _, _) = call(&app, Request::post(format!("/v2/r/blobs/uploads/?digest={d}"))
                .body(Body::from(blob.clone())).unwrap()).await;
            prop_assert_eq!(s, StatusCode::CREATED);
            let Ok(req) = Request::get(format!("/v2/r/blobs/{d}")).header("range", header.as_str()).body(Body::empty()) else {
                return Ok(()); // not a valid header value at all
            };
            let (status, headers, body) = call(&app, req).await;
            match status.as_u16() {
                200 => prop_assert_eq!(body, blob),
                206 => {
                    let cr = headers["content-range"].to_str().unwrap().to_owned();
                    let (range, total) = cr.strip_prefix("bytes ").unwrap().split_once('/').unwrap();
                    let (a, b) = range.split_once('-').unwrap();
                    let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
                    prop_assert_eq!(total.parse::<usize>().unwrap(), blob.len());
                    prop_assert_eq!(&body[..], &blob[a..=b]);
                    prop_assert_eq!(headers["content-length"].to_str().unwrap(), (b - a + 1).to_string());
                }
                416 => {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    prop_assert_eq!(v["errors"][0]["code"].as_str(), Some("SIZE_INVALID"));
                    let want = format!("bytes */{}", blob.len());
                    prop_assert_eq!(headers.get("content-range").and_then(|v| v.to_str().ok()), Some(want.as_str()));
                }
                other => prop_assert!(false, "{} for Range {:?}", other, header),
            }
            Ok(())
        })?;
    }

    /// Through the router: any Content-Range on a chunk either appends exactly that
    /// chunk at the session's end (202) or is refused and changes nothing.
    #[test]
    fn chunk_content_ranges_append_or_change_nothing(
        first in proptest::collection::vec(any::<u8>(), 1..16),
        chunk in proptest::collection::vec(any::<u8>(), 0..16),
        header in prop_oneof![rangeish(), (0u64..40, 0u64..40).prop_map(|(a, b)| format!("{a}-{b}"))],
    ) {
        block_on(async {
            let app = router(Registry::in_memory(), HttpConfig::default());
            let (_, h, _) = call(&app, Request::post("/v2/r/blobs/uploads/").body(Body::empty()).unwrap()).await;
            let loc = h["location"].to_str().unwrap().to_owned();
            let (s, _, _) = call(&app, Request::patch(&loc)
                .header("content-range", format!("0-{}", first.len() - 1))
                .body(Body::from(first.clone())).unwrap()).await;
            prop_assert_eq!(s, StatusCode::ACCEPTED);
            let Ok(req) = Request::builder().method(Method::PATCH).uri(&loc)
                .header("content-range", header.as_str()).body(Body::from(chunk.clone())) else {
                return Ok(());
            };
            let (status, _, body) = call(&app, req).await;
            prop_assert!(!status.is_server_error(), "{} for {:?}", status, header);
            let mut want = first.clone();
            if status == StatusCode::ACCEPTED {
                want.extend_from_slice(&chunk);
            } else {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                prop_assert!(v["errors"][0]["code"].is_string());
            }
            let d = Digest::sha256(&want);
            let (s, _, _) = call(&app, Request::put(format!("{loc}?digest={d}")).body(Body::empty()).unwrap()).await;
            prop_assert_eq!(s, StatusCode::CREATED, "the upload holds exactly what was accepted");
            Ok(())
        })?;
    }
}
