//! The `ReservationStore` seam every backend implements.

use std::time::Duration;

use async_trait::async_trait;

use crate::{Error, Reservation, StockLevel};

/// Inventory reservations: stock per SKU, and holds on it that become sales or return.
///
/// Every method is atomic, and every method that changes something is idempotent, so a
/// call that failed with a retryable error (or timed out after running) can be repeated
/// with the same arguments:
///
/// - [`reserve`](Self::reserve) with a known reservation id returns the existing
///   reservation and holds nothing more (the same id with *different* items is
///   [`Error::IdConflict`]);
/// - [`confirm`](Self::confirm) / [`release`](Self::release) of a reservation already in
///   that state report it again.
///
/// Both backends ([`InMemoryReservations`](crate::InMemoryReservations) and, with the
/// `redis` feature, `RedisReservations`) pass the same contract suite
/// (`eventful_reservation::contract`, feature `test-utils`).
#[async_trait]
pub trait ReservationStore: Send + Sync {
    /// Sets the available quantity of `sku` (creating the SKU); held and sold are kept.
    ///
    /// Refused with [`Error::StockLimit`], changing nothing, if `available + held + sold`
    /// would exceed [`MAX_STOCK`](crate::MAX_STOCK).
    async fn set_stock(&self, sku: &str, available: u64) -> Result<StockLevel, Error>;

    /// Adds `delta` (negative to remove) to the available quantity of a known SKU.
    ///
    /// Fails with [`Error::InsufficientStock`] rather than going below zero, with
    /// [`Error::StockLimit`] rather than taking the total above
    /// [`MAX_STOCK`](crate::MAX_STOCK), and with [`Error::UnknownSku`] for a SKU never set. Unlike the other operations a delta is
    /// **not idempotent**: it is never retried automatically, and after a retryable
    /// error it may or may not have applied (read [`stock`](Self::stock), or prefer
    /// [`set_stock`](Self::set_stock), which is idempotent).
    async fn adjust_stock(&self, sku: &str, delta: i64) -> Result<StockLevel, Error>;

    /// Holds every item for `ttl`, all or nothing.
    ///
    /// If any item is short, nothing is held and the error is
    /// [`Error::InsufficientStock`] naming the first short SKU (in SKU order). Items are
    /// merged per SKU. Reserving a known `reservation_id` again returns that reservation
    /// in its current state (`Held`, or final) and holds nothing more.
    async fn reserve(
        &self,
        reservation_id: &str,
        items: &[(&str, u64)],
        ttl: Duration,
    ) -> Result<Reservation, Error>;

    /// Turns the hold into a sale and returns the reservation (state `Confirmed`).
    ///
    /// Confirming twice is harmless. Refused with [`Error::AlreadyReleased`] after a
    /// release and [`Error::Expired`] once the deadline has passed: a confirm racing
    /// the expiry resolves to exactly one of the two, atomically.
    async fn confirm(&self, reservation_id: &str) -> Result<Reservation, Error>;

    /// Returns the held stock and reports the reservation (state `Released`, or
    /// `Expired` if the deadline had passed — the stock is back either way).
    ///
    /// Releasing twice, or after expiry, is harmless. Refused with
    /// [`Error::AlreadyConfirmed`] after a confirm.
    async fn release(&self, reservation_id: &str) -> Result<Reservation, Error>;

    /// The quantities of `sku` ([`Error::UnknownSku`] if never set).
    async fn stock(&self, sku: &str) -> Result<StockLevel, Error>;

    /// A reservation, if known (records are kept for the store's retention period after
    /// reaching a final state). A hold past its deadline is reported `Expired` even if
    /// its stock has not been returned yet.
    async fn reservation(&self, reservation_id: &str) -> Result<Option<Reservation>, Error>;

    /// Expires up to `batch` holds whose deadline has passed, returning their stock;
    /// returns how many it expired. Safe to call from many processes at once.
    async fn reap_expired(&self, batch: usize) -> Result<usize, Error>;
}
