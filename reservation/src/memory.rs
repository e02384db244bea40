//! `InMemoryReservations`: the same semantics as Redis, in one process.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::model::{check_id, check_sku, check_ttl, from_unix_ms, normalize_items, unix_ms};
use crate::{
    Error, Reservation, ReservationState, ReservationStore, StockLevel, DEFAULT_RETENTION,
    MAX_STOCK,
};

/// An in-process [`ReservationStore`] (one mutex), for unit tests and embedded use.
///
/// Same semantics as the Redis backend and passes the same contract suite; nothing
/// survives the process. Deadlines use the local clock.
#[derive(Debug)]
pub struct InMemoryReservations {
    retention_ms: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    stock: HashMap<String, StockLevel>,
    reservations: HashMap<String, Record>,
    /// (deadline ms, id) of held reservations.
    expiries: BTreeSet<(u64, String)>,
    /// (purge time ms, id) of final reservations.
    purges: BTreeSet<(u64, String)>,
}

#[derive(Clone, Debug)]
struct Record {
    state: ReservationState,
    items: Vec<(String, u64)>,
    expires_at: u64,
}

impl Default for InMemoryReservations {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryReservations {
    /// Settles a held reservation as `target`, or as expired when its deadline has passed (the
    /// same rule the Redis scripts apply), and returns it as it is afterwards. A reservation
    /// that is already final is returned unchanged: confirm and release differ only in how
    /// they report that.
    fn settle_held(
        &self,
        reservation_id: &str,
        target: ReservationState,
    ) -> Result<Reservation, Error> {
        check_id(reservation_id)?;
        let now = now_ms();
        let mut state = self.lock();
        state.purge(now);
        let Some(record) = state.reservations.get(reservation_id) else {
            return Err(Error::ReservationNotFound {
                reservation_id: reservation_id.to_owned(),
            });
        };
        if record.state == ReservationState::Held {
            let to = if now >= record.expires_at {
                ReservationState::Expired
            } else {
                target
            };
            state.settle(reservation_id, to, now, self.retention_ms);
        }
        Ok(State::view(
            reservation_id,
            &state.reservations[reservation_id],
        ))
    }

    /// An empty store keeping final reservations for [`DEFAULT_RETENTION`].
    pub fn new() -> Self {
        Self::with_retention(DEFAULT_RETENTION)
    }

    /// An empty store keeping final reservations for `retention`.
    pub fn with_retention(retention: Duration) -> Self {
        Self {
            retention_ms: u64::try_from(retention.as_millis()).unwrap_or(u64::MAX),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change: every
        // operation validates before it writes.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Refuses a change that would take the SKU's total above [`MAX_STOCK`], as the Redis
/// scripts do (there, to keep every number exact in Lua and in `HINCRBY`).
fn within_limit(sku: &str, available: u64, current: StockLevel) -> Result<(), Error> {
    let others = current.held.saturating_add(current.sold);
    if available > MAX_STOCK.saturating_sub(others) {
        return Err(Error::StockLimit {
            sku: sku.to_owned(),
            available,
            held: current.held,
            sold: current.sold,
        });
    }
    Ok(())
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

impl State {
    fn view(id: &str, record: &Record) -> Reservation {
        Reservation {
            id: id.to_owned(),
            state: record.state,
            items: record.items.clone(),
            expires_at: from_unix_ms(record.expires_at),
        }
    }

    /// Moves a held reservation to a final state, moving its stock from `held`.
    fn settle(&mut self, id: &str, to: ReservationState, now: u64, retention_ms: u64) {
        let Some(record) = self.reservations.get_mut(id) else {
            return;
        };
        if record.state != ReservationState::Held {
            return;
        }
        for (sku, qty) in &record.items {
            let level = self.stock.entry(sku.clone()).or_default();
            // Totals stay within MAX_STOCK, so nothing saturates; saturating all the same
            // so that no path can panic halfway through a settlement.
            level.held = level.held.saturating_sub(*qty);
            if to == ReservationState::Confirmed {
                level.sold = level.sold.saturating_add(*qty);
            } else {
                level.available = level.available.saturating_add(*qty);
            }
        }
        record.state = to;
        self.expiries.remove(&(record.expires_at, id.to_owned()));
        self.purges
            .insert((now.saturating_add(retention_ms), id.to_owned()));
    }

    /// Expires the reservation if it is held past its deadline.
    fn expire_if_due(&mut self, id: &str, now: u64, retention_ms: u64) {
        if let Some(record) = self.reservations.get(id) {
            if record.state == ReservationState::Held && now >= record.expires_at {
                self.settle(id, ReservationState::Expired, now, retention_ms);
            }
        }
    }

    fn purge(&mut self, now: u64) {
        while let Some((at, id)) = self.purges.first().cloned() {
            if at > now {
                break;
            }
            self.purges.pop_first();
            self.reservations.remove(&id);
        }
    }
}

#[async_trait]
impl ReservationStore for InMemoryReservations {
    async fn set_stock(&self, sku: &str, available: u64) -> Result<StockLevel, Error> {
        check_sku(sku)?;
        let mut state = self.lock();
        let current = state.stock.get(sku).copied().unwrap_or_default();
        within_limit(sku, available, current)?;
        let level = state.stock.entry(sku.to_owned()).or_default();
        level.available = available;
        Ok(*level)
    }

    async fn adjust_stock(&self, sku: &str, delta: i64) -> Result<StockLevel, Error> {
        check_sku(sku)?;
        let mut state = self.lock();
        let Some(level) = state.stock.get_mut(sku) else {
            return Err(Error::UnknownSku {
                sku: sku.to_owned(),
            });
        };
        let available = i128::from(level.available) + i128::from(delta);
        if available < 0 {
            return Err(Error::InsufficientStock {
                sku: sku.to_owned(),
                requested: delta.unsigned_abs(),
                available: level.available,
            });
        }
        let available = u64::try_from(available).unwrap_or(u64::MAX);
        within_limit(sku, available, *level)?;
        level.available = available;
        Ok(*level)
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
        let now = now_ms();
        let mut state = self.lock();
        state.purge(now);
        if state.reservations.contains_key(reservation_id) {
            state.expire_if_due(reservation_id, now, self.retention_ms);
            let record = &state.reservations[reservation_id];
            if record.items != items {
                return Err(Error::IdConflict {
                    reservation_id: reservation_id.to_owned(),
                });
            }
            return Ok(State::view(reservation_id, record));
        }
        // Validate every item first ...
        for (sku, qty) in &items {
            let Some(level) = state.stock.get(sku) else {
                return Err(Error::UnknownSku { sku: sku.clone() });
            };
            if level.available < *qty {
                return Err(Error::InsufficientStock {
                    sku: sku.clone(),
                    requested: *qty,
                    available: level.available,
                });
            }
        }
        // ... then write.
        for (sku, qty) in &items {
            if let Some(level) = state.stock.get_mut(sku) {
                level.available -= qty;
                level.held += qty;
            }
        }
        let expires_at = now.saturating_add(ttl_ms);
        let record = Record {
            state: ReservationState::Held,
            items,
            expires_at,
        };
        let view = State::view(reservation_id, &record);
        state
            .expiries
            .insert((expires_at, reservation_id.to_owned()));
        state.reservations.insert(reservation_id.to_owned(), record);
        Ok(view)
    }

    async fn confirm(&self, reservation_id: &str) -> Result<Reservation, Error> {
        let view = self.settle_held(reservation_id, ReservationState::Confirmed)?;
        let id = reservation_id.to_owned();
        match view.state {
            ReservationState::Confirmed => Ok(view),
            ReservationState::Released => Err(Error::AlreadyReleased { reservation_id: id }),
            _ => Err(Error::Expired { reservation_id: id }),
        }
    }

    async fn release(&self, reservation_id: &str) -> Result<Reservation, Error> {
        let view = self.settle_held(reservation_id, ReservationState::Released)?;
        match view.state {
            ReservationState::Confirmed => Err(Error::AlreadyConfirmed {
                reservation_id: reservation_id.to_owned(),
            }),
            _ => Ok(view),
        }
    }

    async fn stock(&self, sku: &str) -> Result<StockLevel, Error> {
        check_sku(sku)?;
        self.lock()
            .stock
            .get(sku)
            .copied()
            .ok_or_else(|| Error::UnknownSku {
                sku: sku.to_owned(),
            })
    }

    async fn reservation(&self, reservation_id: &str) -> Result<Option<Reservation>, Error> {
        check_id(reservation_id)?;
        let now = now_ms();
        let mut state = self.lock();
        state.purge(now);
        Ok(state.reservations.get(reservation_id).map(|record| {
            let mut view = State::view(reservation_id, record);
            if view.state == ReservationState::Held && now >= record.expires_at {
                view.state = ReservationState::Expired;
            }
            view
        }))
    }

    async fn reap_expired(&self, batch: usize) -> Result<usize, Error> {
        let now = now_ms();
        let mut state = self.lock();
        state.purge(now);
        let due: Vec<String> = state
            .expiries
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(batch)
            .map(|(_, id)| id.clone())
            .collect();
        for id in &due {
            state.settle(id, ReservationState::Expired, now, self.retention_ms);
        }
        Ok(due.len())
    }
}
