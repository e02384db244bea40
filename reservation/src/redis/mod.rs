//! `RedisReservations`: every operation one atomic Lua script on Redis.

mod coalesce;
mod connection;
mod metrics;
mod scripts;

pub use connection::RedisConnection;
pub use scripts::{batch_script_source, reserve_script_source};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventful_core::Backoff;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::TcpSettings;
use redis::{IntoConnectionInfo, ScriptInvocation, Value};
use tracing::Instrument;

use self::metrics::Instruments;
use crate::error::is_retryable_redis;
use crate::model::{check_id, check_sku, check_ttl, from_unix_ms, normalize_items};
use crate::{
    Error, Reservation, ReservationState, ReservationStore, StockLevel, DEFAULT_RETENTION,
    MAX_STOCK,
};
use coalesce::{Coalescer, Entry};
use scripts::Scripts;

/// Default key prefix: keys look like `eventful:{default}:stock:<sku>`.
pub const DEFAULT_KEY_PREFIX: &str = "eventful:";
/// Default inventory namespace (the hash tag: one namespace lives in one cluster slot).
pub const DEFAULT_NAMESPACE: &str = "default";
/// Default time to wait for one reply before the call fails (and may be retried).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time to wait for a (re)connection.
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// Default number of attempts of one operation on retryable errors.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
/// Default largest number of calls coalesced into one script invocation.
pub const DEFAULT_MAX_BATCH: usize = 128;
/// Default number of coalesced batches a store keeps in flight at once.
pub const DEFAULT_BATCHES_IN_FLIGHT: usize = 4;

/// Rounds of `due` one `reap_expired` call makes at most, while rounds come back full of
/// holds already final (see `reap_expired`).
const REAP_ROUNDS: usize = 64;

/// Reads of a reservation before a settlement gives up with
/// [`Error::ReservationChanged`] (each retry means its id was forgotten and reused
/// between a read and the write that followed it).
const SETTLE_READS: usize = 3;

/// The Redis [`ReservationStore`].
///
/// Cheap to clone (the connections are shared and multiplexed). See the crate docs for
/// the key layout and the guarantees.
#[derive(Clone)]
pub struct RedisReservations {
    conns: Arc<[RedisConnection]>,
    inner: Arc<Inner>,
}

/// The keys of one namespace (see the key layout in `lua/common.lua`).
#[derive(Debug, Clone)]
pub(crate) struct KeyNames {
    /// `<prefix>{<namespace>}:stock:`, followed by a SKU.
    pub(crate) stock_prefix: String,
    /// `<prefix>{<namespace>}:res:`, followed by a reservation id.
    pub(crate) res_prefix: String,
    pub(crate) expiries_key: String,
    pub(crate) holds_key: String,
}

impl KeyNames {
    /// The keys under `base`, `<prefix>{<namespace>}:`.
    fn new(base: &str) -> Self {
        Self {
            stock_prefix: format!("{base}stock:"),
            res_prefix: format!("{base}res:"),
            expiries_key: format!("{base}expiries"),
            holds_key: format!("{base}holds"),
        }
    }
}

struct Inner {
    /// `None` with coalescing off: every call is its own script invocation.
    coalescer: Option<Coalescer>,
    next: std::sync::atomic::AtomicUsize,
    scripts: Scripts,
    keys: KeyNames,
    retention_ms: u64,
    max_attempts: u32,
    retry_backoff: Backoff,
    instruments: Instruments,
}

impl std::fmt::Debug for RedisReservations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisReservations")
            .field("stock_prefix", &self.inner.keys.stock_prefix)
            .finish_non_exhaustive()
    }
}

/// Configures and connects a [`RedisReservations`].
#[derive(Debug)]
#[must_use]
pub struct RedisReservationsBuilder {
    target: Target,
    key_prefix: String,
    namespace: String,
    retention: Duration,
    response_timeout: Duration,
    connection_timeout: Duration,
    connections: usize,
    max_attempts: u32,
    retry_backoff: Backoff,
    coalesce: bool,
    max_batch: usize,
    batches_in_flight: usize,
}

enum Target {
    Info(redis::RedisResult<redis::ConnectionInfo>),
    Connection(ConnectionManager),
    Cluster(redis::RedisResult<Vec<redis::ConnectionInfo>>),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Info(info) => f.debug_tuple("Info").field(info).finish(),
            Target::Connection(_) => f.write_str("Connection(..)"),
            Target::Cluster(nodes) => f.debug_tuple("Cluster").field(nodes).finish(),
        }
    }
}

impl RedisReservations {
    /// Starts configuring a store on the Redis at `url` (e.g. `redis://127.0.0.1:6379`).
    ///
    /// Defaults: key prefix [`DEFAULT_KEY_PREFIX`], namespace [`DEFAULT_NAMESPACE`],
    /// retention [`DEFAULT_RETENTION`], response timeout [`DEFAULT_RESPONSE_TIMEOUT`],
    /// connection timeout [`DEFAULT_CONNECTION_TIMEOUT`], [`DEFAULT_MAX_ATTEMPTS`]
    /// attempts with backoff from 20 ms to 1 s, `TCP_NODELAY` on, request coalescing on
    /// ([`coalesce`](RedisReservationsBuilder::coalesce)) with [`DEFAULT_MAX_BATCH`] and
    /// [`DEFAULT_BATCHES_IN_FLIGHT`].
    pub fn builder(url: impl IntoConnectionInfo) -> RedisReservationsBuilder {
        RedisReservationsBuilder::new(Target::Info(url.into_connection_info()))
    }

    /// Starts configuring a store on a connection you made (you choose its timeouts and
    /// TCP settings; redis-rs leaves `TCP_NODELAY` off by default).
    pub fn builder_with_connection(conn: ConnectionManager) -> RedisReservationsBuilder {
        RedisReservationsBuilder::new(Target::Connection(conn))
    }

    /// Starts configuring a store on a Redis Cluster, given one or more of its nodes
    /// (`redis://host:port`); the other nodes are discovered. Every call is routed to the
    /// node owning the namespace's slot and follows `MOVED`/`ASK` redirects, so the
    /// namespace may move between nodes. Spread load over the masters by giving each
    /// store (namespace) of an application its own namespace: one namespace is one slot.
    pub fn builder_cluster<I, T>(nodes: I) -> RedisReservationsBuilder
    where
        I: IntoIterator<Item = T>,
        T: IntoConnectionInfo,
    {
        let nodes = nodes
            .into_iter()
            .map(IntoConnectionInfo::into_connection_info)
            .collect();
        RedisReservationsBuilder::new(Target::Cluster(nodes))
    }

    /// The key of a SKU's stock hash (`<prefix>{<namespace>}:stock:<sku>`).
    pub fn stock_key(&self, sku: &str) -> String {
        format!("{}{sku}", self.inner.keys.stock_prefix)
    }

    /// The key of a reservation's record, a string (`<prefix>{<namespace>}:res:<id>`).
    pub fn reservation_key(&self, reservation_id: &str) -> String {
        format!("{}{reservation_id}", self.inner.keys.res_prefix)
    }

    /// The key of the sorted set of deadlines (`<prefix>{<namespace>}:expiries`).
    pub fn expiries_key(&self) -> &str {
        &self.inner.keys.expiries_key
    }

    /// The key of the number of holds not yet final (`<prefix>{<namespace>}:holds`).
    pub fn holds_key(&self) -> &str {
        &self.inner.keys.holds_key
    }

    /// The connection the next call will use (round-robin over
    /// [`connections`](RedisReservationsBuilder::connections)).
    pub fn connection(&self) -> RedisConnection {
        let i = self
            .inner
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conns[i % self.conns.len()].clone()
    }

    /// Runs a script, retrying retryable failures with exponential backoff. Every script
    /// is idempotent, so repeating one that timed out after running is safe.
    async fn invoke(
        &self,
        op: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<Value, Error> {
        self.invoke_with(op, invocation, self.inner.max_attempts)
            .await
    }

    /// Runs a read-only command, retrying retryable failures like [`invoke`](Self::invoke).
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, Error> {
        let mut attempt = 1;
        loop {
            let mut conn = self.connection();
            match cmd.query_async(&mut conn).await {
                Ok(value) => return Ok(value),
                Err(e) if attempt < self.inner.max_attempts && is_retryable_redis(&e) => {
                    tokio::time::sleep(self.inner.retry_backoff.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The stored `state`, `expires_at` and `items` of a reservation (a plain read: a
    /// write that follows re-checks them atomically), as the scripts reply them.
    async fn read_record(&self, reservation_id: &str) -> Result<Option<Vec<Value>>, Error> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.reservation_key(reservation_id));
        let record: Option<String> = self.query(&cmd).await?;
        record.map(|record| decode_record(&record)).transpose()
    }

    /// Confirms, releases or expires a hold with the `settle` script, every key declared:
    /// reads the reservation's items, then settles with their stock keys, again if the
    /// record changed in between. Returns the reservation after the call and whether this
    /// call ended the hold, or `None` if the id is unknown.
    async fn settle(
        &self,
        reservation_id: &str,
        action: &'static str,
    ) -> Result<Option<(Reservation, bool)>, Error> {
        for _ in 0..SETTLE_READS {
            let record = self.read_record(reservation_id).await?;
            let items = match (record, action) {
                (Some(fields), _) if text(fields.first())? == "held" => text(fields.get(2))?,
                // Settled meanwhile: the script drops a deadline left in the index.
                (Some(fields), "expire") => text(fields.get(2))?,
                (None, "expire") => String::new(),
                // A final state never changes: report it, no write needed.
                (Some(fields), _) => {
                    let found = parse_reservation(reservation_id, &fields, 0)?;
                    return Ok(found.map(|r| (r, false)));
                }
                (None, _) => return Ok(None),
            };
            let skus = if items.is_empty() {
                Vec::new()
            } else {
                parse_items(&items)?
            };
            let mut keys = Vec::with_capacity(skus.len() + 1);
            keys.push(self.reservation_key(reservation_id));
            keys.extend(skus.iter().map(|(sku, _)| self.stock_key(sku)));
            let entry = Entry {
                op: action,
                id: reservation_id.to_owned(),
                ttl_ms: 0,
                items_json: items,
                keys,
                qtys: Vec::new(),
            };
            let reply = array(self.execute(entry).await?)?;
            match text(reply.first())?.as_str() {
                "items_changed" => continue,
                "corrupt" => return Err(corrupt(&reply)?),
                _ => {}
            }
            return Ok(parse_reservation(reservation_id, &reply, 0)?
                .map(|r| (r, matches!(reply.get(3), Some(Value::Int(1))))));
        }
        Err(Error::ReservationChanged {
            reservation_id: reservation_id.to_owned(),
        })
    }

    /// Runs a reserve or a settlement: through the batch task when coalescing is on, else
    /// as its own script; retryable failures are retried with backoff (same id), each
    /// caller on its own.
    async fn execute(&self, entry: Entry) -> Result<Value, Error> {
        let entry = Arc::new(entry);
        let mut attempt = 1;
        loop {
            let result = match &self.inner.coalescer {
                Some(coalescer) => match coalescer.submit(entry.clone()).await {
                    Some(result) => result,
                    None => self.invoke_single(&entry).await,
                },
                None => self.invoke_single(&entry).await,
            };
            match result {
                Err(e) if attempt < self.inner.max_attempts && e.is_retryable() => {
                    tracing::warn!(op = entry.op, attempt, error = %e, "redis call failed, retrying");
                    tokio::time::sleep(self.inner.retry_backoff.delay(attempt)).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// One call as its own `reserve` / `settle` script invocation (no retry).
    async fn invoke_single(&self, entry: &Entry) -> Result<Value, Error> {
        let inv = entry.single(
            &self.inner.scripts.reserve,
            &self.inner.scripts.settle,
            &self.inner.keys,
            self.inner.retention_ms,
        )?;
        self.invoke_with(entry.op, &inv, 1).await
    }

    async fn invoke_with(
        &self,
        op: &'static str,
        invocation: &ScriptInvocation<'_>,
        max_attempts: u32,
    ) -> Result<Value, Error> {
        let mut attempt = 1;
        loop {
            let mut conn = self.connection();
            let invoked = invocation.invoke_async::<Value>(&mut conn);
            match self.inner.instruments.timed(op, invoked).await {
                Ok(value) => return Ok(value),
                Err(e) if attempt < max_attempts && is_retryable_redis(&e) => {
                    tracing::warn!(op, attempt, error = %e, "redis call failed, retrying");
                    tokio::time::sleep(self.inner.retry_backoff.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl RedisReservationsBuilder {
    fn new(target: Target) -> Self {
        Self {
            target,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            retention: DEFAULT_RETENTION,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            connections: 1,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_backoff: Backoff::new(Duration::from_millis(20), Duration::from_secs(1)),
            coalesce: true,
            max_batch: DEFAULT_MAX_BATCH,
            batches_in_flight: DEFAULT_BATCHES_IN_FLIGHT,
        }
    }

    /// Prefix of every key (default [`DEFAULT_KEY_PREFIX`]); must not contain `{` or `}`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The inventory namespace (warehouse, tenant…), used as the hash tag (default
    /// [`DEFAULT_NAMESPACE`]). Multi-item reservations are all-or-nothing within one
    /// namespace; one namespace is one Redis Cluster slot.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How long a reservation record stays readable after its final state, so retries
    /// still see the outcome (default [`DEFAULT_RETENTION`]).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Time to wait for a reply (default [`DEFAULT_RESPONSE_TIMEOUT`]); ignored with
    /// [`RedisReservations::builder_with_connection`].
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Time to wait for a connection (default [`DEFAULT_CONNECTION_TIMEOUT`]); ignored
    /// with [`RedisReservations::builder_with_connection`].
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Number of multiplexed connections, used round-robin (default 1: one connection
    /// already pipelines every concurrent call; more can help a client on many cores).
    /// Ignored with [`RedisReservations::builder_with_connection`].
    pub fn connections(mut self, connections: usize) -> Self {
        self.connections = connections.max(1);
        self
    }

    /// Attempts per operation on retryable errors (default [`DEFAULT_MAX_ATTEMPTS`];
    /// 1 disables retries).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Backoff between attempts: starts at `base`, doubles up to `max`, with equal jitter
    /// ([`Backoff`]; default 20 ms → 1 s; a `max` below `base` is raised to it).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.retry_backoff = backoff.with_max(backoff.max.max(backoff.base));
        self
    }

    /// Coalesce concurrent reserve / confirm / release / expire calls of this store into
    /// one script invocation per batch (default on: on the 2-core development VM it is
    /// 2.8–3.0× one script per call at 64 calls in flight on one namespace, 1.1–1.25× at
    /// 16, and costs a caller that is alone up to about a fifth, the hop through the batch
    /// task; see the crate README). Each call keeps
    /// its own semantics and its own result; a lone call is sent at once (no timer) as the
    /// single-call script, concurrent calls go together in the next batch. Off, every call
    /// is its own script invocation.
    pub fn coalesce(mut self, on: bool) -> Self {
        self.coalesce = on;
        self
    }

    /// The most calls in one coalesced batch (default [`DEFAULT_MAX_BATCH`]): bounds the
    /// batch script's run time on the server, and so the wait of the calls queued behind
    /// it. A batch also never declares more than 4,096 keys.
    pub fn max_batch(mut self, calls: usize) -> Self {
        self.max_batch = calls.max(1);
        self
    }

    /// Coalesced batches in flight at once (default [`DEFAULT_BATCHES_IN_FLIGHT`]). Each
    /// batch aims at an even share of the calls in flight and queued (at least 32), so a
    /// closed loop of 64 callers goes as overlapping batches of about 32: Redis runs one
    /// while the client answers the other's callers. 1 sends one batch at a time.
    pub fn batches_in_flight(mut self, batches: usize) -> Self {
        self.batches_in_flight = batches.max(1);
        self
    }

    /// Connects (with `TCP_NODELAY` on) and returns the store.
    pub async fn connect(self) -> Result<RedisReservations, Error> {
        for (what, value) in [
            ("key prefix", &self.key_prefix),
            ("namespace", &self.namespace),
        ] {
            if value.contains(['{', '}']) {
                return Err(Error::Config(format!(
                    "the {what} {value:?} contains a brace"
                )));
            }
        }
        if self.namespace.is_empty() {
            return Err(Error::Config("the namespace is empty".into()));
        }
        let conns: Vec<RedisConnection> = match self.target {
            Target::Connection(conn) => vec![RedisConnection::Single(conn)],
            Target::Cluster(nodes) => {
                let tcp = TcpSettings::default().set_nodelay(true);
                let nodes: Vec<redis::ConnectionInfo> = nodes?
                    .into_iter()
                    .map(|info| info.set_tcp_settings(tcp.clone()))
                    .collect();
                let client = redis::cluster::ClusterClientBuilder::new(nodes)
                    .response_timeout(self.response_timeout)
                    .connection_timeout(self.connection_timeout)
                    .retries(self.max_attempts)
                    .build()?;
                let mut conns = Vec::with_capacity(self.connections);
                for _ in 0..self.connections {
                    conns.push(RedisConnection::Cluster(
                        client.get_async_connection().await?,
                    ));
                }
                conns
            }
            Target::Info(info) => {
                let info = info?;
                let tcp = TcpSettings::default().set_nodelay(true);
                let client = redis::Client::open(info.set_tcp_settings(tcp))?;
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(self.response_timeout))
                    .set_connection_timeout(Some(self.connection_timeout))
                    .set_min_delay(Duration::from_millis(25))
                    .set_max_delay(Duration::from_millis(500))
                    .set_number_of_retries(4);
                let mut conns = Vec::with_capacity(self.connections);
                for _ in 0..self.connections {
                    conns.push(RedisConnection::Single(
                        ConnectionManager::new_with_config(client.clone(), config.clone()).await?,
                    ));
                }
                conns
            }
        };
        let base = format!("{}{{{}}}:", self.key_prefix, self.namespace);
        let conns: Arc<[RedisConnection]> = conns.into();
        let retention_ms = u64::try_from(self.retention.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let scripts = Scripts::new();
        let keys = KeyNames::new(&base);
        let instruments = Instruments::new(&self.namespace);
        let coalescer = self.coalesce.then(|| {
            Coalescer::spawn(
                coalesce::Context::new(
                    conns.clone(),
                    &scripts,
                    keys.clone(),
                    retention_ms,
                    instruments.clone(),
                ),
                self.max_batch,
                self.batches_in_flight,
            )
        });
        Ok(RedisReservations {
            conns,
            inner: Arc::new(Inner {
                coalescer,
                next: std::sync::atomic::AtomicUsize::new(0),
                scripts,
                keys,
                retention_ms,
                max_attempts: self.max_attempts,
                retry_backoff: self.retry_backoff,
                instruments,
            }),
        })
    }
}

// ---- reply parsing -------------------------------------------------------------------

fn protocol(what: impl std::fmt::Display) -> Error {
    Error::Protocol(what.to_string())
}

fn array(value: Value) -> Result<Vec<Value>, Error> {
    match value {
        Value::Array(items) => Ok(items),
        other => Err(protocol(format!("expected an array, got {other:?}"))),
    }
}

fn text(value: Option<&Value>) -> Result<String, Error> {
    match value {
        Some(Value::BulkString(bytes)) => String::from_utf8(bytes.clone()).map_err(protocol),
        Some(Value::SimpleString(s)) => Ok(s.clone()),
        Some(Value::Int(i)) => Ok(i.to_string()),
        other => Err(protocol(format!("expected a string, got {other:?}"))),
    }
}

fn int(value: Option<&Value>) -> Result<u64, Error> {
    match value {
        Some(Value::Int(i)) => u64::try_from(*i).map_err(protocol),
        Some(Value::BulkString(bytes)) => std::str::from_utf8(bytes)
            .map_err(protocol)?
            .parse()
            .map_err(protocol),
        other => Err(protocol(format!("expected an integer, got {other:?}"))),
    }
}

/// A stored record, `<state>:<expires_at>:<items JSON>` (see `lua/common.lua`), as the
/// fields `{state, expires_at, items}` the scripts reply.
fn decode_record(record: &str) -> Result<Vec<Value>, Error> {
    let mut fields = record.splitn(3, ':');
    match (fields.next(), fields.next(), fields.next()) {
        (Some(state), Some(expires_at), Some(items)) => Ok(vec![
            Value::BulkString(state.as_bytes().to_vec()),
            Value::Int(expires_at.parse().map_err(protocol)?),
            Value::BulkString(items.as_bytes().to_vec()),
        ]),
        _ => Err(protocol(format!("not a reservation record: {record:?}"))),
    }
}

fn parse_items(json: &str) -> Result<Vec<(String, u64)>, Error> {
    let flat: Vec<String> = serde_json::from_str(json).map_err(protocol)?;
    flat.chunks(2)
        .map(|pair| match pair {
            [sku, qty] => Ok((sku.clone(), qty.parse().map_err(protocol)?)),
            _ => Err(protocol("odd items list")),
        })
        .collect()
}

fn encode_items(items: &[(String, u64)]) -> Result<String, Error> {
    let flat: Vec<String> = items
        .iter()
        .flat_map(|(sku, qty)| [sku.clone(), qty.to_string()])
        .collect();
    serde_json::to_string(&flat).map_err(protocol)
}

/// Parses `{state, expires_at, items}` (from index `at`), or `None` for `{'not_found'}`.
fn parse_reservation(id: &str, reply: &[Value], at: usize) -> Result<Option<Reservation>, Error> {
    let state = text(reply.get(at))?;
    if state == "not_found" {
        return Ok(None);
    }
    let state =
        ReservationState::parse(&state).ok_or_else(|| protocol(format!("state {state:?}")))?;
    Ok(Some(Reservation {
        id: id.to_owned(),
        state,
        expires_at: from_unix_ms(int(reply.get(at + 1))?),
        items: parse_items(&text(reply.get(at + 2))?)?,
    }))
}

fn parse_level(reply: &[Value], at: usize) -> Result<StockLevel, Error> {
    Ok(StockLevel::new(
        int(reply.get(at))?,
        int(reply.get(at + 1))?,
        int(reply.get(at + 2))?,
    ))
}

/// The error for `{'corrupt', sku, available, held, sold}`: a stored level outside the
/// limits (written before [`MAX_STOCK`] existed, or by hand), which the scripts refuse to
/// touch.
fn corrupt(reply: &[Value]) -> Result<Error, Error> {
    let sku = text(reply.get(1))?;
    let fields = [
        text(reply.get(2))?,
        text(reply.get(3))?,
        text(reply.get(4))?,
    ];
    match fields.each_ref().map(|f| f.parse::<u64>()) {
        [Ok(available), Ok(held), Ok(sold)] => Ok(Error::StockLimit {
            sku,
            available,
            held,
            sold,
        }),
        _ => Ok(protocol(format!(
            "the stock of SKU {sku:?} is not valid: available {:?}, held {:?}, sold {:?}",
            fields[0], fields[1], fields[2]
        ))),
    }
}

fn not_found(reservation_id: &str) -> Error {
    Error::ReservationNotFound {
        reservation_id: reservation_id.to_owned(),
    }
}

#[async_trait]
impl ReservationStore for RedisReservations {
    async fn set_stock(&self, sku: &str, available: u64) -> Result<StockLevel, Error> {
        check_sku(sku)?;
        let mut inv = self.inner.scripts.set_stock.key(self.stock_key(sku));
        inv.arg(available).arg(sku);
        let span = tracing::debug_span!("reservation.set_stock", sku, available);
        let reply = array(self.invoke("set_stock", &inv).instrument(span).await?)?;
        match text(reply.first())?.as_str() {
            "ok" => parse_level(&reply, 1),
            "limit" => Err(Error::StockLimit {
                sku: sku.to_owned(),
                available,
                held: int(reply.get(1))?,
                sold: int(reply.get(2))?,
            }),
            "corrupt" => Err(corrupt(&reply)?),
            other => Err(protocol(format!("set_stock replied {other:?}"))),
        }
    }

    async fn adjust_stock(&self, sku: &str, delta: i64) -> Result<StockLevel, Error> {
        check_sku(sku)?;
        // Beyond +-2^53 the answer is the same (over the limit, or short), and the script
        // then only handles numbers a Lua double holds exactly.
        let bound = i64::try_from(MAX_STOCK).unwrap_or(i64::MAX) + 1;
        let mut inv = self.inner.scripts.adjust_stock.key(self.stock_key(sku));
        inv.arg(delta.clamp(-bound, bound)).arg(sku);
        let span = tracing::debug_span!("reservation.adjust_stock", sku, delta);
        // A delta is not idempotent: a call that timed out may have applied, so it is
        // never repeated automatically.
        let reply = array(
            self.invoke_with("adjust_stock", &inv, 1)
                .instrument(span)
                .await?,
        )?;
        match text(reply.first())?.as_str() {
            "ok" => parse_level(&reply, 1),
            "unknown_sku" => Err(Error::UnknownSku {
                sku: sku.to_owned(),
            }),
            "insufficient" => Err(Error::InsufficientStock {
                sku: sku.to_owned(),
                requested: delta.unsigned_abs(),
                available: int(reply.get(1))?,
            }),
            "limit" => {
                let current = int(reply.get(1))?;
                Err(Error::StockLimit {
                    sku: sku.to_owned(),
                    available: current.saturating_add_signed(delta),
                    held: int(reply.get(2))?,
                    sold: int(reply.get(3))?,
                })
            }
            "corrupt" => Err(corrupt(&reply)?),
            other => Err(protocol(format!("adjust_stock replied {other:?}"))),
        }
    }

    async fn reserve(
        &self,
        reservation_id: &str,
        items: &[(&str, u64)],
        ttl: Duration,
    ) -> Result<Reservation, Error> {
        check_id(reservation_id)?;
        let ttl_ms = check_ttl(ttl)?;
        let items = normalize_items(items)?;
        let items_json = encode_items(&items)?;
        let mut keys = Vec::with_capacity(items.len() + 1);
        keys.push(self.reservation_key(reservation_id));
        keys.extend(items.iter().map(|(sku, _)| self.stock_key(sku)));
        let entry = Entry {
            op: "reserve",
            id: reservation_id.to_owned(),
            ttl_ms,
            items_json,
            keys,
            qtys: items.iter().map(|(_, qty)| *qty).collect(),
        };
        let span = tracing::debug_span!("reservation.reserve", reservation_id, items = items.len());
        let reply = match self.execute(entry).instrument(span).await? {
            // Created: the reply is only the deadline (the caller knows the rest).
            Value::Int(expires_at) => {
                self.inner.instruments.hold("held");
                return Ok(Reservation {
                    id: reservation_id.to_owned(),
                    state: ReservationState::Held,
                    expires_at: from_unix_ms(u64::try_from(expires_at).map_err(protocol)?),
                    items,
                });
            }
            reply => array(reply)?,
        };
        let outcome = text(reply.first())?;
        match outcome.as_str() {
            "existing" => self.inner.instruments.hold("existing"),
            "conflict" => self.inner.instruments.hold("conflict"),
            "unknown_sku" => self.inner.instruments.hold("unknown_sku"),
            "insufficient" => self.inner.instruments.hold("insufficient"),
            _ => {}
        }
        match outcome.as_str() {
            "existing" => parse_reservation(reservation_id, &reply, 1)?
                .ok_or_else(|| not_found(reservation_id)),
            "conflict" => Err(Error::IdConflict {
                reservation_id: reservation_id.to_owned(),
            }),
            "unknown_sku" => Err(Error::UnknownSku {
                sku: text(reply.get(1))?,
            }),
            "insufficient" => Err(Error::InsufficientStock {
                sku: text(reply.get(1))?,
                requested: int(reply.get(2))?,
                available: int(reply.get(3))?,
            }),
            "corrupt" => Err(corrupt(&reply)?),
            other => Err(protocol(format!("reserve replied {other:?}"))),
        }
    }

    async fn confirm(&self, reservation_id: &str) -> Result<Reservation, Error> {
        check_id(reservation_id)?;
        let span = tracing::debug_span!("reservation.confirm", reservation_id);
        let (reservation, _) = self
            .settle(reservation_id, "confirm")
            .instrument(span)
            .await?
            .ok_or_else(|| not_found(reservation_id))?;
        let reservation_id = reservation_id.to_owned();
        match reservation.state {
            ReservationState::Confirmed => Ok(reservation),
            ReservationState::Released => Err(Error::AlreadyReleased { reservation_id }),
            _ => Err(Error::Expired { reservation_id }),
        }
    }

    async fn release(&self, reservation_id: &str) -> Result<Reservation, Error> {
        check_id(reservation_id)?;
        let span = tracing::debug_span!("reservation.release", reservation_id);
        let (reservation, _) = self
            .settle(reservation_id, "release")
            .instrument(span)
            .await?
            .ok_or_else(|| not_found(reservation_id))?;
        match reservation.state {
            ReservationState::Confirmed => Err(Error::AlreadyConfirmed {
                reservation_id: reservation_id.to_owned(),
            }),
            _ => Ok(reservation),
        }
    }

    async fn stock(&self, sku: &str) -> Result<StockLevel, Error> {
        check_sku(sku)?;
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.stock_key(sku))
            .arg(&["available", "held", "sold"]);
        let level: Vec<Option<u64>> = self.query(&cmd).await?;
        match level.as_slice() {
            [Some(available), held, sold] => Ok(StockLevel::new(
                *available,
                held.unwrap_or(0),
                sold.unwrap_or(0),
            )),
            _ => Err(Error::UnknownSku {
                sku: sku.to_owned(),
            }),
        }
    }

    async fn reservation(&self, reservation_id: &str) -> Result<Option<Reservation>, Error> {
        check_id(reservation_id)?;
        let inv = self
            .inner
            .scripts
            .reservation
            .key(self.reservation_key(reservation_id));
        let reply = array(self.invoke("reservation", &inv).await?)?;
        parse_reservation(reservation_id, &reply, 0)
    }

    async fn reap_expired(&self, batch: usize) -> Result<usize, Error> {
        if batch == 0 {
            return Ok(0);
        }
        let span = tracing::debug_span!("reservation.reap_expired", batch);
        async {
            // Due ids, then each hold expired by its own settlement with its keys declared
            // (concurrently: coalesced, or pipelined on the multiplexed connection). A
            // group's ids stay indexed until its deadline even once confirmed or released,
            // so a round may expire few of the ids it looks at: look on while `due` comes
            // back full, up to `batch` expired holds in all (and at most REAP_ROUNDS rounds,
            // which bounds one call's work).
            let mut reaped = 0;
            let mut first_error = None;
            for _ in 0..REAP_ROUNDS {
                let wanted = batch - reaped;
                let mut inv = self.inner.scripts.due.key(&self.inner.keys.expiries_key);
                inv.arg(wanted);
                let due = array(self.invoke("due", &inv).await?)?;
                let ids = (0..due.len())
                    .map(|i| text(due.get(i)))
                    .collect::<Result<Vec<_>, _>>()?;
                let results =
                    futures::future::join_all(ids.iter().map(|id| self.settle(id, "expire"))).await;
                for (id, result) in ids.iter().zip(results) {
                    match result {
                        Ok(Some((_, true))) => reaped += 1,
                        Ok(_) => {}
                        // One bad hold must not stop the others; it is tried again next sweep.
                        Err(e) => {
                            tracing::warn!(reservation_id = %id, error = %e, "cannot expire hold");
                            first_error.get_or_insert(e);
                        }
                    }
                }
                if ids.len() < wanted || reaped >= batch || first_error.is_some() {
                    break;
                }
            }
            self.inner.instruments.expired(reaped);
            if self.inner.instruments.wants_active_holds() {
                // One GET per sweep keeps the gauge as fresh as the reaper's interval.
                let mut cmd = redis::cmd("GET");
                cmd.arg(&self.inner.keys.holds_key);
                match self.query::<Option<u64>>(&cmd).await {
                    Ok(holds) => self.inner.instruments.active_holds(holds.unwrap_or(0)),
                    Err(e) => tracing::debug!(error = %e, "counting active holds failed"),
                }
            }
            match first_error {
                Some(e) if reaped == 0 => Err(e),
                _ => Ok(reaped),
            }
        }
        .instrument(span)
        .await
    }
}
