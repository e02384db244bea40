//! The values a reservation store hands out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::Error;

/// The largest quantity of one item (2^53 − 1: Lua numbers are doubles, exact up to here).
pub const MAX_QUANTITY: u64 = (1 << 53) - 1;

/// The largest total stock of one SKU, `available + held + sold` (2^53 − 1).
///
/// Every quantity a script handles is then an integer a Lua double holds exactly and
/// every sum of them fits an `i64` (`HINCRBY`) and a `u64`, so no operation can overflow
/// halfway through. `set_stock` and `adjust_stock` refuse to go above it
/// ([`Error::StockLimit`](crate::Error::StockLimit)); reservations only move stock
/// between the three fields, so they cannot.
pub const MAX_STOCK: u64 = (1 << 53) - 1;

/// Default time a reservation record is kept after reaching a final state (7 days).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest reservation time-to-live accepted (30 days).
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where a reservation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReservationState {
    /// The stock is held until the reservation's deadline.
    Held,
    /// The hold became a sale (final).
    Confirmed,
    /// The hold was released and its stock returned (final).
    Released,
    /// The deadline passed before a confirm; the stock returned (final).
    Expired,
}

impl ReservationState {
    /// The name stored in Redis (`held`, `confirmed`, `released`, `expired`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationState::Held => "held",
            ReservationState::Confirmed => "confirmed",
            ReservationState::Released => "released",
            ReservationState::Expired => "expired",
        }
    }

    /// Parses a stored state name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "held" => ReservationState::Held,
            "confirmed" => ReservationState::Confirmed,
            "released" => ReservationState::Released,
            "expired" => ReservationState::Expired,
            _ => return None,
        })
    }

    /// `true` once the reservation can no longer change.
    pub fn is_final(self) -> bool {
        !matches!(self, ReservationState::Held)
    }
}

impl std::fmt::Display for ReservationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reservation as the store knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reservation {
    /// The caller's reservation id (the idempotency key).
    pub id: String,
    /// The state after the call that returned it.
    pub state: ReservationState,
    /// The items, merged per SKU and sorted by SKU.
    pub items: Vec<(String, u64)>,
    /// The hold's deadline (server time for Redis).
    pub expires_at: SystemTime,
}

/// The quantities of one SKU. `available + held + sold` only changes through
/// `set_stock` / `adjust_stock`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct StockLevel {
    /// Free to reserve.
    pub available: u64,
    /// Held by live reservations.
    pub held: u64,
    /// Confirmed (sold).
    pub sold: u64,
}

impl StockLevel {
    /// A stock level with these quantities.
    pub fn new(available: u64, held: u64, sold: u64) -> Self {
        Self {
            available,
            held,
            sold,
        }
    }

    /// `available + held + sold`.
    pub fn total(&self) -> u64 {
        self.available + self.held + self.sold
    }
}

/// Validates a reservation id.
pub(crate) fn check_id(reservation_id: &str) -> Result<(), Error> {
    if reservation_id.is_empty() {
        return Err(Error::InvalidId("empty reservation id".into()));
    }
    // The Redis expiry index separates the ids of a group with NUL.
    if reservation_id.contains('\0') {
        return Err(Error::InvalidId("a reservation id with a NUL byte".into()));
    }
    Ok(())
}

/// Validates a SKU.
pub(crate) fn check_sku(sku: &str) -> Result<(), Error> {
    if sku.is_empty() {
        return Err(Error::InvalidId("empty SKU".into()));
    }
    Ok(())
}

/// Validates a time-to-live.
pub(crate) fn check_ttl(ttl: Duration) -> Result<u64, Error> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 || ttl > MAX_TTL {
        return Err(Error::InvalidTtl(ttl));
    }
    Ok(ms)
}

/// Validates and canonicalises items: quantities merged per SKU, sorted by SKU, so a
/// retry listing the same items in another order is the same reservation.
pub(crate) fn normalize_items(items: &[(&str, u64)]) -> Result<Vec<(String, u64)>, Error> {
    if items.is_empty() {
        return Err(Error::NoItems);
    }
    let mut merged: Vec<(String, u64)> = Vec::with_capacity(items.len());
    for &(sku, quantity) in items {
        check_sku(sku)?;
        if quantity == 0 || quantity > MAX_QUANTITY {
            return Err(Error::InvalidQuantity {
                sku: sku.to_owned(),
                quantity,
            });
        }
        match merged.iter_mut().find(|(s, _)| s == sku) {
            Some((_, q)) => {
                *q += quantity;
                if *q > MAX_QUANTITY {
                    return Err(Error::InvalidQuantity {
                        sku: sku.to_owned(),
                        quantity: *q,
                    });
                }
            }
            None => merged.push((sku.to_owned(), quantity)),
        }
    }
    merged.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(merged)
}

/// Unix milliseconds of a time (0 before the epoch).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The time `ms` unix milliseconds denote.
pub(crate) fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_merged_and_sorted() {
        let items = normalize_items(&[("b", 1), ("a", 2), ("b", 3)]).unwrap();
        assert_eq!(items, vec![("a".to_owned(), 2), ("b".to_owned(), 4)]);
    }

    #[test]
    fn bad_items_are_refused() {
        assert!(matches!(normalize_items(&[]), Err(Error::NoItems)));
        assert!(matches!(
            normalize_items(&[("a", 0)]),
            Err(Error::InvalidQuantity { quantity: 0, .. })
        ));
        assert!(matches!(
            normalize_items(&[("a", MAX_QUANTITY), ("a", 1)]),
            Err(Error::InvalidQuantity { .. })
        ));
        assert!(matches!(
            normalize_items(&[("", 1)]),
            Err(Error::InvalidId(_))
        ));
    }

    #[test]
    fn ttl_bounds() {
        assert!(check_ttl(Duration::ZERO).is_err());
        assert!(check_ttl(Duration::from_micros(10)).is_err());
        assert_eq!(check_ttl(Duration::from_millis(1500)).unwrap(), 1500);
        assert!(check_ttl(MAX_TTL + Duration::from_secs(1)).is_err());
    }
}
