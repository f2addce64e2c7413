//! The one place where registry errors become OCI error responses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use registry_core::{Error, InvalidInput};

use crate::metrics::Refusal;

/// An error response: status, OCI error code, message and optional extra headers.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    headers: Vec<(header::HeaderName, String)>,
    /// The policy or limit that refused the request, for `registry_refusals_total`:
    /// carried to the metrics layer in the response's extensions.
    refusal: Option<Refusal>,
}

impl ApiError {
    /// An error with the given status, OCI code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
            refusal: None,
        }
    }

    /// Marks the error as a refusal by a policy or limit.
    pub(crate) fn with_refusal(mut self, refusal: Refusal) -> Self {
        self.refusal = Some(refusal);
        self
    }

    /// 400 with an OCI code, for malformed requests the core never sees.
    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 405 UNSUPPORTED: the operation is switched off.
    pub(crate) fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", message)
    }

    pub(crate) fn with_header(mut self, name: header::HeaderName, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The OCI error code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The message told to the client (never credentials: see `auth.rs`).
    pub(crate) fn message(&self) -> &str {
        &self.message
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        use StatusCode as S;
        let message = e.to_string();
        let refusal = match &e {
            Error::ImmutableTag { .. } => Some(Refusal::ImmutableTag),
            Error::QuotaExceeded { .. } => Some(Refusal::Quota),
            Error::ReadOnly { .. } => Some(Refusal::ReadOnly),
            Error::TooLarge { .. } => Some(Refusal::SizeLimit),
            Error::ManifestBlobUnknown { .. } => Some(Refusal::MissingBlob),
            Error::TooManyRequests { .. } => Some(Refusal::TooManyRequests),
            _ => None,
        };
        let mut api = match e {
            Error::Invalid(InvalidInput::RepoName(_)) => {
                Self::new(S::BAD_REQUEST, "NAME_INVALID", message)
            }
            Error::Invalid(InvalidInput::Tag(_)) => {
                Self::new(S::BAD_REQUEST, "MANIFEST_INVALID", message)
            }
            Error::Invalid(InvalidInput::UnsupportedAlgorithm(_)) => {
                Self::new(S::BAD_REQUEST, "UNSUPPORTED", message)
            }
            Error::Invalid(_) => Self::new(S::BAD_REQUEST, "DIGEST_INVALID", message),
            Error::BlobUnknown { .. } => Self::new(S::NOT_FOUND, "BLOB_UNKNOWN", message),
            Error::UploadUnknown { .. } => Self::new(S::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN", message),
            Error::UploadOffset { expected, .. } => {
                Self::new(S::RANGE_NOT_SATISFIABLE, "BLOB_UPLOAD_INVALID", message)
                    .with_header(header::RANGE, upload_range(expected))
            }
            Error::DigestMismatch { .. } => Self::new(S::BAD_REQUEST, "DIGEST_INVALID", message),
            Error::BodyIncomplete { .. } => {
                Self::new(S::BAD_REQUEST, "BLOB_UPLOAD_INVALID", message)
            }
            Error::SizeMismatch { .. } => Self::new(S::BAD_REQUEST, "SIZE_INVALID", message),
            Error::TooLarge {
                what: "manifest", ..
            } => Self::new(S::PAYLOAD_TOO_LARGE, "MANIFEST_INVALID", message),
            Error::TooLarge { .. } => Self::new(S::PAYLOAD_TOO_LARGE, "SIZE_INVALID", message),
            Error::ManifestUnknown { .. } => Self::new(S::NOT_FOUND, "MANIFEST_UNKNOWN", message),
            Error::ManifestInvalid { .. } => Self::new(S::BAD_REQUEST, "MANIFEST_INVALID", message),
            Error::ManifestBlobUnknown { .. } => {
                Self::new(S::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN", message)
            }
            Error::NameUnknown { .. } => Self::new(S::NOT_FOUND, "NAME_UNKNOWN", message),
            Error::InUse { .. } => Self::new(S::CONFLICT, "DENIED", message),
            Error::RangeNotSatisfiable { size } => {
                Self::new(S::RANGE_NOT_SATISFIABLE, "SIZE_INVALID", message)
                    .with_header(header::CONTENT_RANGE, format!("bytes */{size}"))
            }
            Error::Unsupported { .. } => Self::new(S::METHOD_NOT_ALLOWED, "UNSUPPORTED", message),
            Error::Denied { .. } => Self::new(S::FORBIDDEN, "DENIED", message),
            // Policy refusals. DENIED is the spec's code for "not allowed", and 403 tells
            // clients that retrying the same request will not help (unlike 429), while
            // the message names the tag or the quota so that a user can act on it.
            Error::ImmutableTag { .. } => Self::new(S::FORBIDDEN, "DENIED", message),
            Error::QuotaExceeded { .. } => Self::new(S::FORBIDDEN, "DENIED", message),
            // As `HttpConfig::with_read_only` answers: the operation is switched off.
            Error::ReadOnly { .. } => Self::new(S::METHOD_NOT_ALLOWED, "UNSUPPORTED", message),
            Error::TooManyRequests { retry_after, .. } => {
                // Whole seconds, rounded up: a retry before the time would fail again.
                let secs = retry_after.map_or(1, |d| d.as_millis().div_ceil(1000).max(1));
                Self::new(S::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", message)
                    .with_header(header::RETRY_AFTER, secs.to_string())
            }
            // The upstream of a pull-through cache failed: a gateway error, so that the
            // client knows to retry, and the reason (which names no secret) for the user.
            Error::Upstream { .. } => {
                tracing::warn!(error = %message, "upstream registry failure");
                Self::new(S::BAD_GATEWAY, "UNKNOWN", message)
            }
            Error::Storage(source) => {
                tracing::error!(error = %source, "storage failure");
                Self::new(
                    S::INTERNAL_SERVER_ERROR,
                    "UNKNOWN",
                    "internal storage error",
                )
            }
            other => {
                tracing::error!(error = %other, "unexpected registry error");
                Self::new(S::INTERNAL_SERVER_ERROR, "UNKNOWN", "internal error")
            }
        };
        api.refusal = refusal;
        api
    }
}

/// The `Range` header of an upload holding `len` bytes (`0-0` when empty, as the
/// reference registry answers).
pub(crate) fn upload_range(len: u64) -> String {
    format!("0-{}", len.saturating_sub(1))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "errors": [{ "code": self.code, "message": self.message, "detail": null }]
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(refusal) = self.refusal {
            response.extensions_mut().insert(refusal);
        }
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, v);
            }
        }
        response
    }
}

/// The answer for a path outside the API, so that it too gets an OCI error body.
pub(crate) async fn no_such_endpoint() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "no such endpoint")
}

/// The answer for a method an endpoint does not serve, with an OCI error body.
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::unsupported("method not allowed on this endpoint")
}
