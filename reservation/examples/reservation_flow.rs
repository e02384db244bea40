//! A reservation's life on the in-memory store: reserve, a retry, confirm, release, and an
//! expiry that returns the stock. Needs no server.
//!
//! Run with `cargo run -p eventful-reservation --example reservation_flow`.
//!
//! Semantics (the same on Redis): every call is atomic and idempotent by reservation id;
//! `available + held + sold` per SKU only changes through `set_stock` / `adjust_stock`.

use std::sync::Arc;
use std::time::Duration;

use eventful_reservation::{
    CancellationToken, Error, InMemoryReservations, Reaper, ReservationStore,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = Arc::new(InMemoryReservations::new());
    store.set_stock("mug", 5).await?;
    let show = |when: &str, level: eventful_reservation::StockLevel| {
        println!(
            "{when:<28} available {} held {} sold {}",
            level.available, level.held, level.sold
        );
    };
    show("start", store.stock("mug").await?);

    // A checkout holds 2 mugs for 15 minutes; the retry (same id) holds nothing more.
    let hold = store
        .reserve("order-1", &[("mug", 2)], Duration::from_secs(900))
        .await?;
    store
        .reserve("order-1", &[("mug", 2)], Duration::from_secs(900))
        .await?;
    show("order-1 reserved (twice)", store.stock("mug").await?);
    store.confirm(&hold.id).await?;
    show("order-1 confirmed", store.stock("mug").await?);

    // A second checkout is abandoned: releasing returns the stock.
    store
        .reserve("order-2", &[("mug", 1)], Duration::from_secs(900))
        .await?;
    store.release("order-2").await?;
    show("order-2 released", store.stock("mug").await?);

    // Asking for more than is there holds nothing.
    match store
        .reserve("order-3", &[("mug", 9)], Duration::from_secs(900))
        .await
    {
        Err(Error::InsufficientStock {
            requested,
            available,
            ..
        }) => {
            println!("order-3 refused: requested {requested}, available {available}")
        }
        other => anyhow::bail!("expected InsufficientStock, got {other:?}"),
    }

    // A hold nobody confirms expires; the reaper returns its stock.
    let cancel = CancellationToken::new();
    let reaper = Reaper::new(store.clone())
        .interval(Duration::from_millis(20))
        .spawn(cancel.clone());
    store
        .reserve("order-4", &[("mug", 3)], Duration::from_millis(100))
        .await?;
    show("order-4 reserved (100 ms)", store.stock("mug").await?);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.stock("mug").await?.held > 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the hold never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    show("order-4 expired", store.stock("mug").await?);
    cancel.cancel();
    reaper.await?;
    Ok(())
}
