//! The crate's error type.

/// Everything that can go wrong with a reservation.
///
/// [`Error::is_retryable`] tells transient infrastructure failures (retry the same call
/// with the same reservation id) from permanent answers about the stock or the
/// reservation (retrying changes nothing).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An item asked for more than is available; nothing was held.
    #[error("insufficient stock for SKU {sku:?}: requested {requested}, available {available}")]
    InsufficientStock {
        /// The first SKU found short.
        sku: String,
        /// The quantity asked for.
        requested: u64,
        /// The quantity available when the request was evaluated.
        available: u64,
    },
    /// The SKU has no stock record (set it with `set_stock` first); nothing was held.
    #[error("unknown SKU {sku:?}")]
    UnknownSku {
        /// The SKU.
        sku: String,
    },
    /// A quantity was zero or above [`MAX_QUANTITY`](crate::MAX_QUANTITY).
    #[error("invalid quantity {quantity} for SKU {sku:?}")]
    InvalidQuantity {
        /// The SKU.
        sku: String,
        /// The rejected quantity.
        quantity: u64,
    },
    /// `set_stock` / `adjust_stock` would take the SKU's total (`available + held +
    /// sold`) above [`MAX_STOCK`](crate::MAX_STOCK); nothing was changed.
    #[error(
        "stock limit for SKU {sku:?}: available {available} + held {held} + sold {sold} would exceed {max}",
        max = crate::MAX_STOCK
    )]
    StockLimit {
        /// The SKU.
        sku: String,
        /// The available quantity the refused call asked for.
        available: u64,
        /// The held quantity when the call was evaluated.
        held: u64,
        /// The sold quantity when the call was evaluated.
        sold: u64,
    },
    /// A reservation needs at least one item.
    #[error("a reservation needs at least one item")]
    NoItems,
    /// The reservation id is empty or contains NUL, or a SKU is empty.
    #[error("invalid identifier: {0}")]
    InvalidId(String),
    /// The time-to-live is zero or longer than [`MAX_TTL`](crate::MAX_TTL).
    #[error("invalid reservation TTL {0:?}")]
    InvalidTtl(std::time::Duration),
    /// No reservation with this id (never made, or its record's retention has passed).
    #[error("reservation {reservation_id:?} not found")]
    ReservationNotFound {
        /// The reservation id.
        reservation_id: String,
    },
    /// Confirm refused: the reservation was released and its stock returned.
    #[error("reservation {reservation_id:?} was released")]
    AlreadyReleased {
        /// The reservation id.
        reservation_id: String,
    },
    /// Confirm refused: the reservation expired and its stock returned.
    #[error("reservation {reservation_id:?} expired")]
    Expired {
        /// The reservation id.
        reservation_id: String,
    },
    /// Release refused: the reservation was confirmed (the stock is sold).
    #[error("reservation {reservation_id:?} was already confirmed")]
    AlreadyConfirmed {
        /// The reservation id.
        reservation_id: String,
    },
    /// The reservation id is already used by a reservation with different items.
    #[error("reservation {reservation_id:?} already exists with different items")]
    IdConflict {
        /// The reservation id.
        reservation_id: String,
    },
    /// The reservation's record changed between the read of its items and the write
    /// that settles it, on every attempt (its id was forgotten after its retention and
    /// reused meanwhile). Retryable.
    #[error("reservation {reservation_id:?} changed while being settled; retry")]
    ReservationChanged {
        /// The reservation id.
        reservation_id: String,
    },
    /// Invalid configuration (e.g. a namespace containing `{` or `}`).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Redis failed or could not be reached (see [`Error::is_retryable`]).
    #[cfg(feature = "redis")]
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis answered something the scripts never return (a bug, or foreign data under
    /// the key prefix).
    #[error("unexpected reply from the store: {0}")]
    Protocol(String),
}

impl Error {
    /// `true` for transient failures: the same call (same reservation id) may succeed
    /// later, and is safe to repeat because every operation is idempotent.
    pub fn is_retryable(&self) -> bool {
        match self {
            #[cfg(feature = "redis")]
            Error::Redis(e) => is_retryable_redis(e),
            Error::ReservationChanged { .. } => true,
            _ => false,
        }
    }
}

/// Connection loss, timeouts, a server loading its data or busy running a script, cluster
/// reconfiguration.
#[cfg(feature = "redis")]
pub(crate) fn is_retryable_redis(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, RetryMethod, ServerErrorKind};
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_cluster_error() {
        return true;
    }
    // Another script is running past the busy threshold: this call did not run, and will
    // once that script ends or is killed (redis-rs has no kind for `BUSY`).
    if e.code() == Some("BUSY") {
        return true;
    }
    if matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::ClusterDown
        )
    ) {
        return true;
    }
    !matches!(e.retry_method(), RetryMethod::NoRetry)
}
