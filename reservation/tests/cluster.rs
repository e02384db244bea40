//! `RedisReservations` on a real 3-master Redis Cluster (private `redis-server`s in cluster
//! mode): namespaces spread over the masters, each namespace's keys on one slot by its hash
//! tag, reserve / confirm / release coalesced per namespace, and the reaper returning
//! expired holds per namespace.

use std::sync::Arc;
use std::time::Duration;

use eventful_reservation::{
    Error, Reaper, RedisReservations, ReservationState, ReservationStore, StockLevel,
};
use eventful_test_support::{init_tracing, wait_until, RedisCluster};
use tokio_util::sync::CancellationToken;

const HOUR: Duration = Duration::from_secs(3600);

/// Two namespaces per master, found by asking the cluster where `{namespace}` lives.
async fn namespaces_per_master(cluster: &RedisCluster, masters: usize) -> Vec<(String, usize)> {
    let mut found: Vec<(String, usize)> = Vec::new();
    for n in 0.. {
        let namespace = format!("ns-{n}");
        let node = cluster.node_of(&format!("{{{namespace}}}")).await;
        if found.iter().filter(|(_, at)| *at == node).count() < 2 {
            found.push((namespace, node));
        }
        if found.len() == 2 * masters {
            break;
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_cluster_namespaces_spread_over_three_masters() {
    init_tracing();
    let cluster = RedisCluster::start().await;
    let namespaces = namespaces_per_master(&cluster, 3).await;
    let cancel = CancellationToken::new();
    let runs = namespaces.iter().map(|(namespace, node)| {
        let (cluster, cancel) = (&cluster, cancel.clone());
        async move {
            let store = RedisReservations::builder_cluster(cluster.urls())
                .coalesce(true)
                .namespace(namespace.clone())
                .connect()
                .await
                .unwrap();
            // The namespace's keys live on the master owning its hash tag's slot.
            store.set_stock("hot", 50).await.unwrap();
            store.set_stock("cold", 50).await.unwrap();
            let stock_key = store.stock_key("hot");
            assert_eq!(cluster.node_of(&stock_key).await, *node, "{namespace}");
            let exists: i64 = cluster.command(*node, &["EXISTS", &stock_key]).await;
            assert_eq!(
                exists, 1,
                "{namespace}: {stock_key} is not on master {node}"
            );

            // 60 calls at once on 50 units (coalesced): 50 held, 10 refused.
            let calls = (0..60).map(|i| {
                let store = store.clone();
                async move {
                    let id = format!("r{i}");
                    match store.reserve(&id, &[("hot", 1), ("cold", 1)], HOUR).await {
                        Ok(r) => Some((id, r)),
                        Err(Error::InsufficientStock { .. }) => None,
                        Err(e) => panic!("{id}: {e}"),
                    }
                }
            });
            let held: Vec<_> = futures::future::join_all(calls)
                .await
                .into_iter()
                .flatten()
                .collect();
            assert_eq!(held.len(), 50, "{namespace}");
            let settle = held.iter().enumerate().map(|(i, (id, _))| {
                let store = store.clone();
                async move {
                    if i % 2 == 0 {
                        store.confirm(id).await.unwrap().state
                    } else {
                        store.release(id).await.unwrap().state
                    }
                }
            });
            let states = futures::future::join_all(settle).await;
            assert_eq!(
                states
                    .iter()
                    .filter(|s| **s == ReservationState::Confirmed)
                    .count(),
                25
            );
            assert_eq!(
                store.stock("hot").await.unwrap(),
                StockLevel::new(25, 0, 25),
                "{namespace}"
            );

            // Expiry per namespace: short holds, returned by this namespace's reaper.
            let reaper = Reaper::new(Arc::new(store.clone()))
                .interval(Duration::from_millis(20))
                .spawn(cancel.clone());
            for i in 0..10 {
                store
                    .reserve(
                        &format!("short{i}"),
                        &[("hot", 1)],
                        Duration::from_millis(50),
                    )
                    .await
                    .unwrap();
            }
            wait_until(
                "the reaper returned the expired holds",
                Duration::from_secs(20),
                || {
                    let store = store.clone();
                    async move { store.stock("hot").await.unwrap() == StockLevel::new(25, 0, 25) }
                },
            )
            .await;
            for i in 0..10 {
                let r = store
                    .reservation(&format!("short{i}"))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(r.state, ReservationState::Expired, "{namespace}");
            }
            (reaper, namespace.clone())
        }
    });
    let reapers = futures::future::join_all(runs).await;
    cancel.cancel();
    for (reaper, namespace) in reapers {
        reaper
            .await
            .unwrap_or_else(|e| panic!("{namespace}: reaper: {e}"));
    }
    // Every master held some namespace's keys.
    for node in 0..3 {
        let keys: i64 = cluster.command(node, &["DBSIZE"]).await;
        assert!(keys > 0, "master {node} holds no key");
    }
}
