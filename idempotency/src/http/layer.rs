//! The tower layer and service.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::MatchedPath;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt as _;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use tower::{Layer, Service};
use uuid::Uuid;

use super::store::{self, Claim};
use crate::Error;

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Response header set to `true` on replayed responses.
pub const REPLAYED_HEADER: &str = "idempotency-replayed";

type CallerFn = Arc<dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync>;

struct Config {
    pool: PgPool,
    ttl: Duration,
    in_flight_timeout: Duration,
    max_body_bytes: usize,
    require_key: bool,
    caller: Option<CallerFn>,
}

/// A tower [`Layer`] honouring `Idempotency-Key` headers (see the [module docs](super)).
///
/// Defaults: keys live 24 h, an in-flight key is considered abandoned after 5 min, request
/// and response bodies up to 1 MiB are hashed/stored, requests without a key pass through,
/// every caller shares one scope until a caller source is configured.
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("ttl", &self.config.ttl)
            .field("in_flight_timeout", &self.config.in_flight_timeout)
            .field("max_body_bytes", &self.config.max_body_bytes)
            .field("require_key", &self.config.require_key)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// A layer storing keys in `pool` (run [`crate::migrate`] first).
    pub fn new(pool: PgPool) -> IdempotencyLayer {
        IdempotencyLayer {
            config: Arc::new(Config {
                pool,
                ttl: Duration::from_secs(24 * 3600),
                in_flight_timeout: Duration::from_secs(300),
                max_body_bytes: 1024 * 1024,
                require_key: false,
                caller: None,
            }),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        if let Some(config) = Arc::get_mut(&mut self.config) {
            change(config);
        } else {
            let old = &self.config;
            let mut config = Config {
                pool: old.pool.clone(),
                ttl: old.ttl,
                in_flight_timeout: old.in_flight_timeout,
                max_body_bytes: old.max_body_bytes,
                require_key: old.require_key,
                caller: old.caller.clone(),
            };
            change(&mut config);
            self.config = Arc::new(config);
        }
        self
    }

    /// How long a key (and its stored response) lives; afterwards the key may be reused
    /// (default 24 h).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|c| c.ttl = ttl)
    }

    /// After this long an in-flight key whose request never finished (crashed process) may
    /// be claimed by a retry (default 5 min). Keep it above your longest request.
    pub fn in_flight_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.in_flight_timeout = timeout)
    }

    /// Largest request body hashed and response body stored (default 1 MiB). Larger requests
    /// get `413`; larger responses are returned but not stored (the key is released).
    pub fn max_body_bytes(self, bytes: usize) -> Self {
        self.with(|c| c.max_body_bytes = bytes)
    }

    /// Reject requests without an `Idempotency-Key` with `400` (default: pass them through).
    pub fn require_key(self, require: bool) -> Self {
        self.with(|c| c.require_key = require)
    }

    /// Scope keys by the value of request header `name` (e.g. an API-key or tenant header
    /// set by an authenticating proxy). Requests without it share the anonymous scope.
    pub fn caller_header(self, name: impl Into<String>) -> Self {
        let name: String = name.into();
        self.caller_fn(move |parts| {
            parts
                .headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
    }

    /// Scope keys by what `caller` returns for the request head (e.g. the authenticated user
    /// id from an extension inserted by an auth layer that runs before this one).
    pub fn caller_fn<F>(self, caller: F) -> Self
    where
        F: Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.with(|c| c.caller = Some(Arc::new(caller)))
    }

    /// Deletes expired keys, `batch_size` rows per statement; returns how many.
    pub async fn purge_expired(&self, batch_size: u32) -> Result<u64, Error> {
        store::purge_expired(&self.config.pool, batch_size).await
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service produced by [`IdempotencyLayer`].
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService").finish_non_exhaustive()
    }
}

impl<S> Service<Request<Body>> for IdempotencyService<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The clone is ready-polled; keep it for this call and leave a fresh clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        Box::pin(async move { Ok(handle(config, inner, request).await) })
    }
}

fn problem(status: StatusCode, error: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "error": error, "message": message })),
    )
        .into_response()
}

/// Releases a claimed key if the request does not finish (future dropped).
struct ClaimGuard {
    pool: PgPool,
    scope: String,
    key: String,
    token: Uuid,
    armed: bool,
}

impl ClaimGuard {
    async fn release(mut self) {
        self.armed = false;
        if let Err(e) = store::release(&self.pool, &self.scope, &self.key, self.token).await {
            tracing::warn!(error = %e, "releasing the idempotency key failed");
        }
    }

    async fn complete(mut self, status: u16, content_type: Option<&str>, body: &[u8]) {
        self.armed = false;
        let result = store::complete(
            &self.pool,
            &self.scope,
            &self.key,
            self.token,
            status,
            content_type,
            body,
        )
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "storing the idempotent response failed");
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (pool, scope, key, token) = (
            self.pool.clone(),
            std::mem::take(&mut self.scope),
            std::mem::take(&mut self.key),
            self.token,
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = store::release(&pool, &scope, &key, token).await {
                    tracing::warn!(error = %e, "releasing an abandoned idempotency key failed");
                }
            });
        }
    }
}

#[tracing::instrument(level = "debug", skip_all, fields(key))]
async fn handle<S>(config: Arc<Config>, mut inner: S, request: Request<Body>) -> Response
where
    S: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    let key = match request.headers().get(IDEMPOTENCY_KEY) {
        None if config.require_key => {
            return problem(
                StatusCode::BAD_REQUEST,
                "idempotency_key_missing",
                "this endpoint requires an Idempotency-Key header",
            )
        }
        None => return run(&mut inner, request).await,
        Some(value) => match value.to_str() {
            Ok(key) if !key.is_empty() && key.len() <= 255 => key.to_owned(),
            _ => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "idempotency_key_invalid",
                    "the Idempotency-Key must be 1 to 255 visible ASCII characters",
                )
            }
        },
    };
    tracing::Span::current().record("key", key.as_str());

    let (parts, body) = request.into_parts();
    let bytes = match http_body_util::Limited::new(body, config.max_body_bytes)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "the request body is too large for an idempotent request",
            )
        }
    };
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| parts.uri.path().to_owned());
    let caller = config
        .caller
        .as_ref()
        .and_then(|caller| caller(&parts))
        .unwrap_or_default();
    let scope = format!("{} {}\n{}", parts.method, route, caller);
    let mut hasher = Sha256::new();
    hasher.update(parts.method.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .as_bytes(),
    );
    hasher.update([0]);
    hasher.update(&bytes);
    let fingerprint: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    let claim = store::claim(
        &config.pool,
        &scope,
        &key,
        &fingerprint,
        config.ttl,
        config.in_flight_timeout,
    )
    .await;
    let token = match claim {
        Ok(Claim::Owned { token }) => token,
        Ok(Claim::Mismatch) => {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_mismatch",
                "this Idempotency-Key was used with a different request",
            )
        }
        Ok(Claim::InFlight) => {
            return problem(
                StatusCode::CONFLICT,
                "idempotency_request_in_progress",
                "a request with this Idempotency-Key is still being processed; retry later",
            )
        }
        Ok(Claim::Completed {
            status,
            content_type,
            body,
        }) => return replay(status, content_type, body),
        Err(e) => {
            tracing::error!(error = %e, "idempotency store unavailable");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "idempotency_store_unavailable",
                "the idempotency store is unavailable; retry later",
            );
        }
    };
    let guard = ClaimGuard {
        pool: config.pool.clone(),
        scope,
        key,
        token,
        armed: true,
    };
    let response = run(&mut inner, Request::from_parts(parts, Body::from(bytes))).await;
    if response.status().is_server_error() {
        guard.release().await;
        return response;
    }
    let (head, body) = response.into_parts();
    let body = match http_body_util::Limited::new(body, config.max_body_bytes)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::warn!(error = %e, "response not stored (too large or failed)");
            guard.release().await;
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "response_not_stored",
                "the response body could not be read",
            );
        }
    };
    let content_type = head
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    guard
        .complete(head.status.as_u16(), content_type, &body)
        .await;
    Response::from_parts(head, Body::from(body))
}

async fn run<S>(inner: &mut S, request: Request<Body>) -> Response
where
    S: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    match inner.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

fn replay(status: u16, content_type: Option<String>, body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    if let Some(content_type) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}
