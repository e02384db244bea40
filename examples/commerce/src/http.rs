//! What every service's HTTP side shares: JSON errors, `/health`, and the layers.

use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::middleware::map_response;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use eventful_idempotency::http::ReleaseKey;
use serde_json::json;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

/// An error answered as `{"error": {"code": …, "message": …}}` with a 4xx/5xx status.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `invalid_body`.
    pub code: &'static str,
    /// What was wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// 400: the body is not the JSON the endpoint takes.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_body", message)
    }

    /// 422: well-formed, but a value is not acceptable.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 404: no such resource.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 500/503: our fault; the message is logged, not leaked.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        if self.status.is_server_error() {
            // A handler answers 5xx only when it changed nothing (`POST /orders` rolls back
            // and releases its holds), so a retry with the same Idempotency-Key may run it.
            return (self.status, ReleaseKey, Json(body)).into_response();
        }
        (self.status, Json(body)).into_response()
    }
}

/// How long a request may run before the service answers `504` and drops it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request body a service reads.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// The layers every service wraps its routes in, plus `/health`.
pub fn with_common_layers(routes: Router) -> Router {
    routes
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(map_response(json_errors))
        .layer(crate::telemetry::http_trace_layer())
}

/// Gives the errors axum and tower-http answer on their own (405, 413, 504, …) the
/// same JSON body as the handlers' [`ApiError`]s, keeping their status and headers
/// (such as `Allow`).
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::GATEWAY_TIMEOUT => "timeout",
        _ if status.is_client_error() => "bad_request",
        _ => "internal",
    };
    let (mut parts, body) = response.into_parts();
    // The framework's own text says what was wrong (e.g. the body limit); keep it.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        text => text.to_owned(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    let json = ApiError::new(status, code, message).into_response();
    let (json_parts, json_body) = json.into_parts();
    parts.headers.extend(json_parts.headers);
    Response::from_parts(parts, json_body)
}

/// Serves `app` on `listener` until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    cancel: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}
