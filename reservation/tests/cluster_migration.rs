//! Redis Cluster slot migration in the middle of the operations that settle a hold.
//!
//! Two private cluster nodes: A owns every slot, B joins. For each operation a hold on
//! two SKUs is made on A, then the namespace's slot starts migrating to B and the stock
//! hash of one SKU moves. Redis Cluster checks the keys a script *declares* before
//! running it (`TRYAGAIN` while some are missing mid-migration), but a key a script
//! builds itself is only checked when the script reaches it, after its earlier writes:
//! a script that touches undeclared keys then fails halfway and, Lua having no rollback,
//! leaves one SKU settled and the other held. With every key declared the call is
//! refused whole (a retryable error), and succeeds once the migration completes.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use eventful_reservation::{
    Error, RedisReservations, ReservationState, ReservationStore, StockLevel,
};
use eventful_test_support::{spare_port, wait_until};
use redis::aio::MultiplexedConnection;

/// A `redis-server --cluster-enabled yes` on a spare port, killed on drop.
struct ClusterNode {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ClusterNode {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = spare_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-config-file"])
            .arg(dir.path().join("nodes.conf"))
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let node = Self {
            child,
            port,
            _dir: dir,
        };
        wait_until("the cluster node listens", Duration::from_secs(20), || {
            let url = node.url();
            async move {
                match redis::Client::open(url) {
                    Ok(client) => client.get_multiplexed_async_connection().await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
        node
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn conn(&self) -> MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut self.conn().await)
            .await
            .unwrap_or_else(|e| panic!("{args:?} on :{}: {e}", self.port))
    }

    async fn id(&self) -> String {
        self.cmd(&["CLUSTER", "MYID"]).await
    }
}

/// Node A owning all 16384 slots, and an empty node B that knows A.
async fn two_node_cluster() -> (ClusterNode, ClusterNode) {
    let (a, b) = (ClusterNode::start().await, ClusterNode::start().await);
    let _: () = a.cmd(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]).await;
    let _: () = a
        .cmd(&["CLUSTER", "MEET", "127.0.0.1", &b.port.to_string()])
        .await;
    let a_id = a.id().await;
    wait_until("the nodes know each other", Duration::from_secs(20), || {
        let (a, b, a_id) = (&a, &b, a_id.clone());
        async move {
            let on_b: String = b.cmd(&["CLUSTER", "NODES"]).await;
            let info_a: String = a.cmd(&["CLUSTER", "INFO"]).await;
            let info_b: String = b.cmd(&["CLUSTER", "INFO"]).await;
            on_b.contains(&a_id)
                && info_a.contains("cluster_state:ok")
                && info_b.contains("cluster_state:ok")
        }
    })
    .await;
    (a, b)
}

/// Reads a stock hash wherever it lives during the migration (`ASKING` lets B answer for
/// a slot it is importing).
async fn stock_on(node: &ClusterNode, key: &str) -> Option<StockLevel> {
    let (_, level): ((), Vec<Option<u64>>) = redis::pipe()
        .cmd("ASKING")
        .cmd("HMGET")
        .arg(key)
        .arg(&["available", "held", "sold"])
        .query_async(&mut node.conn().await)
        .await
        .unwrap();
    match level.as_slice() {
        [Some(available), Some(held), Some(sold)] => {
            Some(StockLevel::new(*available, *held, *sold))
        }
        _ => None,
    }
}

async fn store_on(node: &ClusterNode, namespace: &str) -> RedisReservations {
    RedisReservations::builder(node.url().as_str())
        .namespace(namespace)
        .max_attempts(2)
        .backoff(eventful_reservation::Backoff::new(
            Duration::from_millis(5),
            Duration::from_millis(5),
        ))
        .connect()
        .await
        .unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Confirm,
    Release,
    Reap,
    /// The same items again: the script already declares their stock keys.
    ReserveRetryAfterDeadline,
    /// The same id with other items: the stored hold's keys are not the requested ones.
    ReserveConflictAfterDeadline,
}

impl Op {
    fn expires(self) -> bool {
        matches!(
            self,
            Op::Reap | Op::ReserveRetryAfterDeadline | Op::ReserveConflictAfterDeadline
        )
    }

    async fn run(self, store: &RedisReservations) -> Result<(), Error> {
        match self {
            Op::Confirm => store.confirm("r").await.map(drop),
            Op::Release => store.release("r").await.map(drop),
            Op::Reap => store.reap_expired(10).await.map(drop),
            Op::ReserveRetryAfterDeadline => store
                .reserve("r", &[("a", 1), ("b", 1)], Duration::from_millis(50))
                .await
                .map(drop),
            Op::ReserveConflictAfterDeadline => store
                .reserve("r", &[("a", 2)], Duration::from_millis(50))
                .await
                .map(drop),
        }
    }

    /// Each SKU's level once the hold is settled (both SKUs start at 10, hold 1 each).
    fn settled(self) -> StockLevel {
        match self {
            Op::Confirm => StockLevel::new(9, 0, 1),
            _ => StockLevel::new(10, 0, 0),
        }
    }
}

async fn settle_during_migration(op: Op) {
    let (node_a, node_b) = two_node_cluster().await;
    let namespace = format!("mig-{op:?}");
    let store = store_on(&node_a, &namespace).await;
    store.set_stock("a", 10).await.unwrap();
    store.set_stock("b", 10).await.unwrap();
    let ttl = if op.expires() {
        Duration::from_millis(50)
    } else {
        Duration::from_secs(3600)
    };
    store
        .reserve("r", &[("a", 1), ("b", 1)], ttl)
        .await
        .unwrap();
    if op.expires() {
        wait_until(
            "the hold is past its deadline",
            Duration::from_secs(10),
            || async {
                store.reservation("r").await.unwrap().unwrap().state == ReservationState::Expired
            },
        )
        .await;
    }

    // Start migrating the namespace's slot to B and move the stock hash of `b` first.
    let (key_a, key_b) = (store.stock_key("a"), store.stock_key("b"));
    let slot: i64 = node_a.cmd(&["CLUSTER", "KEYSLOT", &key_b]).await;
    let slot = slot.to_string();
    let (id_a, id_b) = (node_a.id().await, node_b.id().await);
    let _: () = node_b
        .cmd(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &id_a])
        .await;
    let _: () = node_a
        .cmd(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &id_b])
        .await;
    let port_b = node_b.port.to_string();
    let _: () = node_a
        .cmd(&["MIGRATE", "127.0.0.1", &port_b, &key_b, "0", "5000"])
        .await;

    let during = op.run(&store).await;
    let (a, b) = (
        stock_on(&node_a, &key_a).await.unwrap(),
        stock_on(&node_b, &key_b).await.unwrap(),
    );
    assert_eq!(
        a, b,
        "{op:?} mid-migration ({during:?}) settled one SKU of the hold and not the other"
    );
    match &during {
        Err(Error::IdConflict { .. }) => {
            assert!(matches!(op, Op::ReserveConflictAfterDeadline), "{op:?}")
        }
        Err(e) => assert!(e.is_retryable(), "{op:?} mid-migration: {e}"),
        Ok(()) => {}
    }

    // Finish the migration: the remaining keys of the slot, then the slot itself.
    let keys: Vec<String> = node_a
        .cmd(&["CLUSTER", "GETKEYSINSLOT", &slot, "1000"])
        .await;
    for key in &keys {
        let _: () = node_a
            .cmd(&["MIGRATE", "127.0.0.1", &port_b, key, "0", "5000"])
            .await;
    }
    for node in [&node_b, &node_a] {
        let _: () = node
            .cmd(&["CLUSTER", "SETSLOT", &slot, "NODE", &id_b])
            .await;
    }
    // The owner now completes (or reports) the settlement, all keys declared and local.
    let store_b = store_on(&node_b, &namespace).await;
    let after = op.run(&store_b).await;
    if op.expires() {
        // Reap and reserve may have nothing left to do (or conflict); release settles it.
        store_b.release("r").await.unwrap();
    } else {
        after.unwrap();
    }
    for sku in ["a", "b"] {
        assert_eq!(
            store_b.stock(sku).await.unwrap(),
            op.settled(),
            "{op:?}: {sku} after the migration"
        );
    }
}

#[tokio::test]
async fn confirm_during_slot_migration_is_all_or_nothing() {
    settle_during_migration(Op::Confirm).await;
}

#[tokio::test]
async fn release_during_slot_migration_is_all_or_nothing() {
    settle_during_migration(Op::Release).await;
}

#[tokio::test]
async fn reap_during_slot_migration_is_all_or_nothing() {
    settle_during_migration(Op::Reap).await;
}

#[tokio::test]
async fn reserve_retry_during_slot_migration_is_all_or_nothing() {
    settle_during_migration(Op::ReserveRetryAfterDeadline).await;
}

#[tokio::test]
async fn reserve_conflict_during_slot_migration_is_all_or_nothing() {
    settle_during_migration(Op::ReserveConflictAfterDeadline).await;
}
