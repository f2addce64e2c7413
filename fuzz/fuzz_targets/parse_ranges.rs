//! `Range` and `Content-Range` header values: never a panic; what parses is consistent
//! (a content range's length fits in a u64 and its canonical form parses back the same;
//! a resolved read range lies inside the blob).
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_core::RangeRequest;
use registry_http::range::{parse_content_range, parse_range};

fuzz_target!(|input: (u64, &str)| {
    let (size, value) = input;
    if let Some((start, end)) = parse_content_range(value) {
        assert!(start <= end, "{value:?} gave {start}-{end}");
        let len = (end - start).checked_add(1);
        assert!(len.is_some(), "{value:?}: chunk length overflows");
        assert_eq!(
            parse_content_range(&format!("{start}-{end}")),
            Some((start, end))
        );
        assert_eq!(
            parse_content_range(&format!("bytes {start}-{end}/*")),
            Some((start, end))
        );
    }
    match parse_range(value) {
        Ok(Some(r)) => {
            let canonical = match r {
                RangeRequest::FromTo(a, b) => format!("bytes={a}-{b}"),
                RangeRequest::From(a) => format!("bytes={a}-"),
                RangeRequest::Suffix(n) => format!("bytes=-{n}"),
            };
            assert_eq!(parse_range(&canonical).ok(), Some(Some(r)));
            // Blob sizes near 0 are where off-by-one errors live; use the fuzzed size
            // too.
            for size in [0, 1, 2, size] {
                if let Ok(br) = r.resolve(size) {
                    assert!(
                        br.start <= br.end && br.end < size,
                        "{r:?} on {size}: {br:?}"
                    );
                    assert_eq!(br.len(), br.end - br.start + 1);
                }
            }
        }
        Ok(None) => {}
        Err(e) => {
            assert_eq!(e.status().as_u16(), 416);
            assert_eq!(e.code(), "SIZE_INVALID");
        }
    }
});
