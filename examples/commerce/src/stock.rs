//! The stock the default SKU starts with, so that the reference request (an order without
//! `items` takes one unit of `DEFAULT-SKU`) works on a fresh system without a stock step.

use anyhow::Context;
use eventful_reservation::{Error, RedisReservations, ReservationStore};

use crate::config::Settings;
use crate::order::request::RequestLimits;

/// Gives `sku` `available` units when it has no stock record yet; returns whether it did.
///
/// Stock that exists, even 0 available, is never overwritten: a restart keeps what was sold,
/// held or set by hand. The check and the set are two calls, so two order services starting
/// at the same moment on an empty inventory may both set it; that is the same value, and
/// only an order placed between the two calls would see its unit counted twice.
pub async fn seed(store: &dyn ReservationStore, sku: &str, available: u64) -> Result<bool, Error> {
    match store.stock(sku).await {
        Ok(_) => Ok(false),
        Err(Error::UnknownSku { .. }) => {
            store.set_stock(sku, available).await?;
            Ok(true)
        }
        Err(error) => Err(error),
    }
}

/// Seeds the default SKU with `ORDER_DEFAULT_SKU_STOCK` units before the order service
/// serves its first request.
pub async fn seed_default_sku(settings: &Settings) -> anyhow::Result<()> {
    let sku = RequestLimits::default().default_sku;
    let store = RedisReservations::builder(settings.redis_url.as_str())
        .namespace(&settings.inventory)
        .connect()
        .await
        .context("connecting to Redis")?;
    if seed(&store, &sku, settings.default_sku_stock)
        .await
        .with_context(|| format!("seeding the stock of {sku}"))?
    {
        tracing::info!(%sku, available = settings.default_sku_stock, "default SKU stocked");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use eventful_reservation::InMemoryReservations;

    use super::*;

    #[tokio::test]
    async fn a_sku_without_stock_gets_the_starting_stock() {
        let store = InMemoryReservations::new();
        assert!(seed(&store, "DEFAULT-SKU", 1_000).await.unwrap());
        assert_eq!(store.stock("DEFAULT-SKU").await.unwrap().available, 1_000);
    }

    #[tokio::test]
    async fn existing_stock_is_never_overwritten() {
        let store = InMemoryReservations::new();
        store.set_stock("DEFAULT-SKU", 0).await.unwrap();
        assert!(!seed(&store, "DEFAULT-SKU", 1_000).await.unwrap());
        assert_eq!(store.stock("DEFAULT-SKU").await.unwrap().available, 0);
    }
}
