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
use axum::response::{IntoResponse, IntoResponseParts, Response, ResponseParts};
use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt as _;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use tower::{Layer, Service};
use uuid::Uuid;

use super::store::{self, Claim, ClaimPolicy};
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
    rerun_abandoned: bool,
    caller: Option<CallerFn>,
}

impl Config {
    fn claim_policy(&self) -> ClaimPolicy {
        ClaimPolicy {
            ttl: self.ttl,
            in_flight_timeout: self.in_flight_timeout,
            rerun_abandoned: self.rerun_abandoned,
        }
    }
}

/// Marks a response as "nothing was done, the client may retry": the layer deletes the key
/// instead of storing the response, so a retry with the same key runs the handler again.
///
/// Return it only when the handler made no change it would repeat (it failed before
/// writing, or rolled back), e.g. `(StatusCode::SERVICE_UNAVAILABLE, ReleaseKey, body)`.
/// Every other response (any status, `5xx` included) is stored and replayed, since the
/// handler may have committed before failing. `429` responses release the key without it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReleaseKey;

impl IntoResponseParts for ReleaseKey {
    type Error = Infallible;

    fn into_response_parts(self, mut parts: ResponseParts) -> Result<ResponseParts, Infallible> {
        parts.extensions_mut().insert(self);
        Ok(parts)
    }
}

/// A tower [`Layer`] honouring `Idempotency-Key` headers (see the [module docs](super)).
///
/// Defaults: keys live 24 h, an in-flight key is considered abandoned after 60 s, request
/// and response bodies up to 1 MiB are hashed/stored, requests without a key pass through,
/// an interrupted request's key is never run again, every caller shares one scope until a
/// caller source is configured.
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
                in_flight_timeout: Duration::from_secs(60),
                max_body_bytes: 1024 * 1024,
                require_key: false,
                rerun_abandoned: false,
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
                rerun_abandoned: old.rerun_abandoned,
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

    /// How long a request may run holding its key (default 60 s). Until then a retry gets
    /// `409 idempotency_key_in_use`; afterwards the key counts as abandoned (its process
    /// crashed, or it hangs) and a retry gets `409 idempotency_key_abandoned` (or runs
    /// again with [`rerun_abandoned`](Self::rerun_abandoned)). Keep it above your longest
    /// request (and above any timeout layer around this one). A request that finishes
    /// late still stores its response, which retries then get.
    pub fn in_flight_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.in_flight_timeout = timeout)
    }

    /// Largest request body hashed and response body stored (default 1 MiB). Larger requests
    /// get `413` (the handler does not run). Larger responses are returned to the client
    /// whole but not stored: the key records the status only, and a retry gets
    /// `409 idempotency_response_not_stored` (the handler does not run again).
    pub fn max_body_bytes(self, bytes: usize) -> Self {
        self.with(|c| c.max_body_bytes = bytes)
    }

    /// Reject requests without an `Idempotency-Key` with `400` (default: pass them through).
    pub fn require_key(self, require: bool) -> Self {
        self.with(|c| c.require_key = require)
    }

    /// Declares the handler safe to run again for a request that was interrupted (default
    /// `false`): a retry of an abandoned key (request future dropped or panicked, process
    /// gone, or in flight longer than [`in_flight_timeout`](Self::in_flight_timeout)) then
    /// takes the key over and runs the handler instead of getting
    /// `409 idempotency_key_abandoned`. Only for handlers that are idempotent on their own
    /// (e.g. ids derived from the key, so a second run finds the first run's rows).
    pub fn rerun_abandoned(self, rerun: bool) -> Self {
        self.with(|c| c.rerun_abandoned = rerun)
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
    pub async fn purge_expired(&self, batch_size: usize) -> Result<u64, Error> {
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

/// Holds a key from its claim until its outcome is recorded. Dropped while armed (the
/// request future was dropped, or the handler panicked): before the handler started it
/// releases the key (nothing was done); afterwards it marks the key abandoned, since the
/// handler may have committed: such a key is never simply released.
struct ClaimGuard {
    pool: PgPool,
    scope: String,
    key: String,
    token: Uuid,
    armed: bool,
    started: bool,
}

impl ClaimGuard {
    /// The response said nothing was done: forget the key so a retry runs the handler.
    async fn release(mut self) {
        match store::release(&self.pool, &self.scope, &self.key, self.token).await {
            Ok(()) => self.armed = false,
            Err(e) => tracing::warn!(error = %e, "releasing the idempotency key failed"),
        }
    }

    /// Records the outcome (`body` `None`: completed, response not stored). Retried a few
    /// times: the handler's effects are committed, and a key left unrecorded ends up
    /// abandoned, which tells retries less than the truth.
    async fn complete(mut self, status: u16, content_type: Option<&str>, body: Option<&[u8]>) {
        let mut pause = Duration::from_millis(50);
        for attempt in 1..=3 {
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
            match result {
                Ok(()) => {
                    self.armed = false;
                    return;
                }
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "recording the idempotent response failed");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
        // Still armed: the drop marks the key abandoned (if the database lets it).
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (pool, scope, key, token, started) = (
            self.pool.clone(),
            std::mem::take(&mut self.scope),
            std::mem::take(&mut self.key),
            self.token,
            self.started,
        );
        // Without a runtime (or if the statement fails, or overtakes a claim still running
        // on the server) the key stays in flight and counts as abandoned once its in-flight
        // timeout passes: never released while the handler may have run.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let result = if started {
                    store::abandon(&pool, &scope, &key, token).await
                } else {
                    store::release(&pool, &scope, &key, token).await
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "settling an interrupted idempotency key failed");
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

    // Armed before the claim: a request dropped while claiming releases what it may have
    // claimed (the handler has not run).
    let mut guard = ClaimGuard {
        pool: config.pool.clone(),
        scope,
        key,
        token: Uuid::new_v4(),
        armed: true,
        started: false,
    };
    let claim = store::claim(
        &config.pool,
        &guard.scope,
        &guard.key,
        guard.token,
        &fingerprint,
        config.claim_policy(),
    )
    .await;
    if matches!(&claim, Ok(found) if !matches!(found, Claim::Owned)) {
        // Someone else's key: nothing of ours to settle. (After an error the guard stays
        // armed and releases whatever the failed claim may have inserted.)
        guard.armed = false;
    }
    match claim {
        Ok(Claim::Owned) => {}
        Ok(Claim::Mismatch) => {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_mismatch",
                "this Idempotency-Key was used with a different request",
            )
        }
        Ok(Claim::InFlight) => {
            let mut response = problem(
                StatusCode::CONFLICT,
                "idempotency_key_in_use",
                "a request with this Idempotency-Key is still being processed; retry later",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        Ok(Claim::Abandoned) => {
            return problem(
                StatusCode::CONFLICT,
                "idempotency_key_abandoned",
                "an earlier request with this Idempotency-Key was interrupted before it \
                 answered; whether it took effect is unknown and it will not run again. \
                 Check the resource's state, then use a new key",
            )
        }
        Ok(Claim::NotStored { status }) => {
            return (
                StatusCode::CONFLICT,
                axum::Json(serde_json::json!({
                    "error": "idempotency_response_not_stored",
                    "message": "the request with this Idempotency-Key completed, but its \
                                response was too large to store; it will not run again",
                    "status": status,
                })),
            )
                .into_response()
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
    }
    // From here on the handler may commit: an interruption marks the key abandoned.
    guard.started = true;
    let response = run(&mut inner, Request::from_parts(parts, Body::from(bytes))).await;
    let nothing_done = response.status() == StatusCode::TOO_MANY_REQUESTS
        || response.extensions().get::<ReleaseKey>().is_some();
    if nothing_done {
        guard.release().await;
        return response;
    }
    let (head, body) = response.into_parts();
    let content_type = head
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match read_limited(body, config.max_body_bytes).await {
        Read::Whole(body) => {
            guard
                .complete(head.status.as_u16(), content_type.as_deref(), Some(&body))
                .await;
            Response::from_parts(head, Body::from(body))
        }
        Read::Partial { prefix, rest } => {
            // Too large (or failed while streaming): the client still gets it as is; the
            // key keeps the status so a retry learns the request completed.
            tracing::warn!(
                limit = config.max_body_bytes,
                "response not stored (too large or failed)"
            );
            guard.complete(head.status.as_u16(), None, None).await;
            let body = futures::stream::once(async move { Ok(prefix) }).chain(rest);
            Response::from_parts(head, Body::from_stream(body))
        }
    }
}

/// A response body read up to the storage limit.
enum Read {
    /// The whole body, within the limit.
    Whole(Bytes),
    /// What was read before the limit was passed (or the body failed), and the rest.
    Partial {
        prefix: Bytes,
        rest: futures::stream::BoxStream<'static, Result<Bytes, axum::Error>>,
    },
}

async fn read_limited(mut body: Body, limit: usize) -> Read {
    let mut buffer = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Read::Whole(buffer.freeze()),
            // Trailers are not stored (nor are headers other than content-type).
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buffer.extend_from_slice(&data);
                    if buffer.len() > limit {
                        return Read::Partial {
                            prefix: buffer.freeze(),
                            rest: futures::StreamExt::boxed(body.into_data_stream()),
                        };
                    }
                }
            }
            Some(Err(e)) => {
                return Read::Partial {
                    prefix: buffer.freeze(),
                    rest: futures::stream::once(async move { Err(e) }).boxed(),
                }
            }
        }
    }
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
