//! Parsers for the two byte-range headers of the distribution API: `Range` on blob
//! reads (RFC 9110 `bytes=` ranges) and `Content-Range` on upload chunks (the
//! registry-specific `start-end` form).
//!
//! Both take hostile text straight from a request header. They never panic, and what
//! they return is safe to do arithmetic on (see [`parse_content_range`]).
//!
//! They are hand-written on purpose: the range crates (`headers`' typed `Range` and
//! `ContentRange`, `http-range-header`) know only RFC 9110 forms, so none reads the
//! upload's unitless `Content-Range: start-end`; and for `Range` they accept
//! multi-ranges and refuse other units or stray spaces as errors, where the rules here
//! ignore a multi-range or another unit (the whole blob is sent), tolerate spaces, and
//! leave satisfiability (416 with `Content-Range: bytes */LEN`) to
//! [`RangeRequest::resolve`].

use axum::http::StatusCode;
use registry_core::RangeRequest;

use crate::error::ApiError;

/// Parses the `Content-Range: start-end` header of an upload chunk (`PATCH` or the
/// closing `PUT`): both ends inclusive, `start <= end`.
///
/// An optional `bytes ` prefix and a `/total` suffix (the RFC 9110 form some clients
/// send) are tolerated; the total is ignored. Returns `None` for anything else.
///
/// The chunk length `end - start + 1` always fits in a `u64`: a range ending at
/// `u64::MAX` is refused, since no chunk can be that long.
pub fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let v = value.trim();
    let v = v.strip_prefix("bytes ").unwrap_or(v);
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b && b < u64::MAX).then_some((a, b))
}

/// Parses a blob read's `Range: bytes=...` header.
///
/// `Ok(None)` means "send the whole blob": the value is not a `bytes=` range or is a
/// multi-range, which RFC 9110 allows a server to ignore. A `bytes=` value that is
/// malformed (`bytes=-`, `bytes=a-b`, anything but digits) is an error: 416 with the
/// OCI code `SIZE_INVALID` (the router adds `Content-Range: bytes */LEN`). Positions
/// too large for a `u64` saturate to `u64::MAX`: RFC 9110 clamps such an end to the
/// blob's last byte. A well-formed range may still be unsatisfiable for a given
/// blob; [`RangeRequest::resolve`] decides that against the blob's size.
pub fn parse_range(value: &str) -> Result<Option<RangeRequest>, ApiError> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let bad = || {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "SIZE_INVALID",
            "invalid range",
        )
    };
    let (a, b) = spec.trim().split_once('-').ok_or_else(bad)?;
    // Digits too many for a u64 are a position past any blob: an end is clamped to the
    // blob's last byte, a start is unsatisfiable, a suffix covers the whole blob.
    let num = |s: &str| {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(s.parse::<u64>().unwrap_or(u64::MAX))
        } else {
            Err(bad())
        }
    };
    Ok(Some(match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, false) => RangeRequest::Suffix(num(b)?),
        (false, true) => RangeRequest::From(num(a)?),
        (false, false) => RangeRequest::FromTo(num(a)?, num(b)?),
        (true, true) => return Err(bad()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse() {
        assert_eq!(parse_content_range("0-9"), Some((0, 9)));
        assert_eq!(parse_content_range("bytes 5-9/10"), Some((5, 9)));
        assert_eq!(parse_content_range("9-5"), None);
        assert_eq!(parse_content_range("x"), None);
    }

    /// Regression: `0-18446744073709551615` parsed, and the chunk length computed from
    /// it (`end - start + 1`) overflowed, a panic in debug builds.
    #[test]
    fn content_range_length_never_overflows() {
        assert_eq!(parse_content_range(&format!("0-{}", u64::MAX)), None);
        assert_eq!(parse_content_range(&format!("5-{}", u64::MAX)), None);
        let max = u64::MAX - 1;
        assert_eq!(parse_content_range(&format!("0-{max}")), Some((0, max)));
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(
            parse_range("bytes=1-2").unwrap(),
            Some(RangeRequest::FromTo(1, 2))
        );
        assert_eq!(
            parse_range("bytes=-5").unwrap(),
            Some(RangeRequest::Suffix(5))
        );
        assert_eq!(
            parse_range("bytes=5-").unwrap(),
            Some(RangeRequest::From(5))
        );
        assert_eq!(parse_range("bytes=1-2,4-5").unwrap(), None);
        assert_eq!(parse_range("items=1-2").unwrap(), None);
        assert!(parse_range("bytes=-").is_err());
        assert!(parse_range("bytes=a-b").is_err());
        let err = parse_range("bytes=+1-2").unwrap_err();
        assert_eq!(err.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(err.code(), "SIZE_INVALID");
        // Overflowing positions saturate; resolving decides.
        assert_eq!(
            parse_range("bytes=99999999999999999999-").unwrap(),
            Some(RangeRequest::From(u64::MAX))
        );
        assert_eq!(
            parse_range("bytes=0-99999999999999999999").unwrap(),
            Some(RangeRequest::FromTo(0, u64::MAX))
        );
    }
}
