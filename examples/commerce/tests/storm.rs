//! A restart storm: the four services run as separate processes under a steady stream of
//! orders while one of them is SIGKILLed and restarted every few seconds for a minute. The
//! consumer groups must settle on the real broker: every order reaches its terminal state
//! within a minute of the last restart, and nothing is lost or applied twice.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{user, Options, System, SERVICES, SKU};
use uuid::Uuid;

const STORM: Duration = Duration::from_secs(60);
const KILL_EVERY: Duration = Duration::from_secs(4);
const SETTLE: Duration = Duration::from_secs(60);
/// Clients posting at once, and the pause each takes between orders (~40 orders/s in all).
const CLIENTS: usize = 8;
const CLIENT_PAUSE: Duration = Duration::from_millis(200);
const STOCK: u64 = 100_000;

/// Places one order, retrying with the same `Idempotency-Key` until the order service
/// answers (it is down while it restarts); returns the order id, if it was placed.
async fn place(http: &reqwest::Client, url: &str, amount: i64) -> Option<Uuid> {
    let key = Uuid::new_v4().to_string();
    let body = json!([{ "userId": user(), "totalAmount": amount,
                        "items": [{ "sku": SKU, "quantity": 1 }] }]);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let answer = http
            .post(url)
            .header("Idempotency-Key", &key)
            .json(&body)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if let Ok(response) = answer {
            let status = response.status().as_u16();
            if status == 201 {
                let ids: Vec<Uuid> = response.json().await.unwrap();
                return ids.first().copied();
            }
            // 409: the first attempt of this key is still in flight; 5xx: retry as a
            // client would. Anything else is a bug.
            assert!(
                status == 409 || status >= 500,
                "POST /orders answered {status}: {:?}",
                response.text().await
            );
        }
        assert!(
            Instant::now() < deadline,
            "order service unreachable for 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serial_restart_storm_under_load_settles_within_a_minute() {
    let options = Options {
        partitions: 4,
        ..Options::default()
    };
    let mut system = System::start(&SERVICES, options).await;
    system.set_stock(SKU, STOCK).await;

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (http, url, stop) = (
                system.http.clone(),
                system.url("order", "/orders"),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut placed = Vec::new();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) && n < 10_000 {
                    // Every fifth order is above the payment limit and gets declined.
                    let amount = if (client + n).is_multiple_of(5) {
                        5_000
                    } else {
                        200
                    };
                    placed.extend(place(&http, &url, amount).await);
                    n += 1;
                    tokio::time::sleep(CLIENT_PAUSE).await;
                }
                placed
            })
        })
        .collect();

    // The storm: one service at a time, in rotation, killed and restarted.
    let started = Instant::now();
    let mut kills = Vec::new();
    let rotation = ["payment", "order", "shipping", "notification"];
    while started.elapsed() < STORM {
        tokio::time::sleep(KILL_EVERY).await;
        let service = rotation[kills.len() % rotation.len()];
        system.kill(service).await;
        system.spawn(service).await;
        kills.push(service);
    }
    let last_restart = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let mut created = Vec::new();
    for client in clients {
        created.extend(client.await.unwrap());
    }
    let posted_in = started.elapsed();

    let statuses = system.wait_terminal(&created, SETTLE).await;
    let settled_after = last_restart.elapsed();
    let shipped = statuses.values().filter(|s| *s == "SHIPPING").count() as i64;
    let canceled = statuses.values().filter(|s| *s == "ORDER_CANCELED").count() as i64;
    eprintln!(
        "restart storm: {} orders over {posted_in:.0?}, {} kills ({kills:?}), every order \
         terminal {settled_after:.1?} after the last restart ({shipped} shipped, {canceled} \
         canceled)",
        created.len(),
        kills.len()
    );
    assert!(
        created.len() > 1_000,
        "only {} orders placed",
        created.len()
    );
    assert_eq!(shipped + canceled, created.len() as i64, "{statuses:?}");

    // One payment per order, approved exactly for the shipped ones; one shipment each.
    let orders = created.len() as i64;
    assert_eq!(
        system
            .count("payment", "SELECT count(*) FROM payments")
            .await,
        orders
    );
    let approved = "SELECT count(*) FROM payments WHERE status = 'APPROVED'";
    assert_eq!(system.count("payment", approved).await, shipped);
    let shipments = "SELECT count(*) FROM shipments";
    assert_eq!(system.count("shipping", shipments).await, shipped);
    // Three notifications per order once the last ones arrive (unique per event: none twice).
    let notifications = "SELECT count(*) FROM notifications";
    support::wait_for_count(&system, "notification", notifications, 3 * orders, SETTLE).await;
    let dead = "SELECT count(*) FROM eventful_dead_letters";
    for service in SERVICES {
        assert_eq!(
            system.count(service, dead).await,
            0,
            "{service} dead letters"
        );
    }
    // Stock conserved: nothing held, sold exactly what shipped.
    let shipped = shipped as u64;
    assert_eq!(system.stock(SKU).await, (STOCK - shipped, 0, shipped));
}
