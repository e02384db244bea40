//! What must hold once a chaos run has settled, read from the services' own databases, the
//! order service's stock view and the topic itself.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use uuid::Uuid;

use super::{Invariant, Sending};
use crate::load::{consumer_lag, stock_of, stock_violations, SERVICES};

const TERMINAL: [&str; 3] = ["SHIPPING", "ORDER_CANCELED", "ORDER_EXPIRED"];
/// Customer-visible events of an order that ends shipped or declined: reserved, the payment's
/// outcome, shipped or canceled.
const NOTIFICATIONS_PER_ORDER: i64 = 3;

/// A small pool on each service's database.
pub(crate) struct Databases {
    pools: HashMap<&'static str, PgPool>,
}

impl Databases {
    /// Pools on `{service}_service` of the server at `admin_url` (lazy: nothing connects
    /// until a query runs, so a restarted server is simply reconnected to).
    pub(crate) fn new(admin_url: &str) -> anyhow::Result<Self> {
        let admin = PgConnectOptions::from_str(admin_url).context("PostgreSQL URL")?;
        let pools = SERVICES
            .iter()
            .map(|service| {
                let pool = PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_lazy_with(admin.clone().database(&format!("{service}_service")));
                (*service, pool)
            })
            .collect();
        Ok(Self { pools })
    }

    fn pool(&self, service: &str) -> anyhow::Result<&PgPool> {
        self.pools
            .get(service)
            .with_context(|| format!("no database for {service}"))
    }

    async fn count(&self, service: &str, sql: &str) -> anyhow::Result<i64> {
        sqlx::query_scalar(sql)
            .fetch_one(self.pool(service)?)
            .await
            .with_context(|| format!("{service}: {sql}"))
    }

    /// `(service, count)` of `sql` on each service's database.
    async fn count_each(&self, sql: &str) -> anyhow::Result<Vec<(&'static str, i64)>> {
        let mut counts = Vec::new();
        for service in SERVICES {
            counts.push((service, self.count(service, sql).await?));
        }
        Ok(counts)
    }
}

const UNPUBLISHED: &str = "SELECT count(*) FROM eventful_outbox WHERE published_at IS NULL";
const DEAD_LETTERS: &str = "SELECT count(*) FROM eventful_dead_letters";

/// Why the system has not settled yet (empty once it has): orders not terminal, events not
/// published, consumer groups behind.
pub(crate) async fn unsettled(
    databases: &Databases,
    brokers: &str,
    topic: &str,
    groups: &[String],
) -> Vec<String> {
    let mut reasons = Vec::new();
    match databases
        .count(
            "order",
            "SELECT count(*) FROM orders \
             WHERE status NOT IN ('SHIPPING', 'ORDER_CANCELED', 'ORDER_EXPIRED')",
        )
        .await
    {
        Ok(0) => {}
        Ok(n) => reasons.push(format!("{n} orders not terminal")),
        Err(error) => reasons.push(format!("{error:#}")),
    }
    match databases.count_each(UNPUBLISHED).await {
        Ok(counts) => reasons.extend(
            counts
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(service, n)| format!("{service}: {n} events not published")),
        ),
        Err(error) => reasons.push(format!("{error:#}")),
    }
    match consumer_lag(brokers, topic, groups).await {
        Ok(lags) => reasons.extend(
            lags.iter()
                .filter(|g| g.lag > 0)
                .map(|g| format!("group {g} behind")),
        ),
        Err(error) => reasons.push(format!("lag: {error:#}")),
    }
    reasons
}

/// Everything the checks read, once the system has settled.
pub(crate) struct Checked<'a> {
    pub(crate) sending: &'a Sending,
    pub(crate) databases: &'a Databases,
    pub(crate) http: &'a reqwest::Client,
    pub(crate) order_url: &'a str,
    /// Units set per SKU.
    pub(crate) stocked: &'a [(String, u64)],
    /// SKUs stocked below their share of the orders.
    pub(crate) short: usize,
    pub(crate) payment_limit: i64,
    pub(crate) brokers: &'a str,
    pub(crate) topic: &'a str,
}

/// Every invariant, with its figure.
pub(crate) async fn check(c: &Checked<'_>) -> anyhow::Result<Vec<Invariant>> {
    let mut invariants = Vec::new();
    let s = c.sending;

    let answered = s.placed.len() + s.left_out;
    invariants.push(Invariant::new(
        "every client got an answer",
        format!(
            "{} orders sent, {answered} answered 201 ({} placed, {} left out for want of \
             stock), {} refused, {} unanswered; {} needed a retry ({} tries in all)",
            s.sent,
            s.placed.len(),
            s.left_out,
            s.refused.len(),
            s.gave_up.len(),
            s.retried,
            s.tries
        ),
        s.refused.iter().chain(&s.gave_up).cloned().collect(),
    ));

    // The orders as the order service stored them.
    let rows: Vec<(Uuid, String, i64, serde_json::Value)> =
        sqlx::query_as("SELECT id, status, total_amount, items FROM orders")
            .fetch_all(c.databases.pool("order")?)
            .await
            .context("reading the orders")?;
    let orders: HashMap<Uuid, (String, i64, serde_json::Value)> = rows
        .into_iter()
        .map(|(id, status, amount, items)| (id, (status, amount, items)))
        .collect();
    let placed: HashSet<Uuid> = s.placed.iter().map(|p| p.id).collect();
    let mut problems = Vec::new();
    let mut per_status: HashMap<&str, usize> = HashMap::new();
    for id in &placed {
        match orders.get(id) {
            None => problems.push(format!("order {id}: answered to a client, not stored")),
            Some((status, _, _)) if !TERMINAL.contains(&status.as_str()) => {
                problems.push(format!("order {id}: still {status}"))
            }
            Some((status, _, _)) => *per_status.entry(status.as_str()).or_insert(0) += 1,
        }
    }
    let exist = placed.iter().filter(|id| orders.contains_key(id)).count();
    let mut statuses: Vec<_> = per_status.iter().collect();
    statuses.sort();
    invariants.push(Invariant::new(
        "every order the clients were answered for exists and is terminal",
        format!(
            "{} answered with an id, {exist} exist, {} terminal {statuses:?}",
            placed.len(),
            per_status.values().sum::<usize>()
        ),
        problems,
    ));

    let unanswered: Vec<String> = orders
        .keys()
        .filter(|id| !placed.contains(id))
        .map(|id| format!("order {id}: no client was answered for it"))
        .collect();
    invariants.push(Invariant::new(
        "no order exists that no client was answered for",
        format!(
            "{} orders in the database, {} answered for, {} not",
            orders.len(),
            orders.len() - unanswered.len(),
            unanswered.len()
        ),
        unanswered,
    ));

    let shipped: HashSet<Uuid> = orders
        .iter()
        .filter(|(_, (status, _, _))| status == "SHIPPING")
        .map(|(id, _)| *id)
        .collect();
    let mut problems = Vec::new();
    for answered in &s.placed {
        let Some((status, amount, _)) = orders.get(&answered.id) else {
            continue;
        };
        let expected = if *amount > c.payment_limit {
            "ORDER_CANCELED"
        } else {
            "SHIPPING"
        };
        if status != expected || answered.declined != (*amount > c.payment_limit) {
            problems.push(format!(
                "order {}: amount {amount}, {status}; expected {expected}",
                answered.id
            ));
        }
    }
    invariants.push(Invariant::new(
        "every order ends as its amount dictates",
        format!(
            "{} shipped (amount <= {}), {} canceled (above it), {} otherwise",
            shipped.len(),
            c.payment_limit,
            per_status.get("ORDER_CANCELED").copied().unwrap_or(0),
            problems.len()
        ),
        problems,
    ));

    let payments: Vec<(Uuid, String)> = sqlx::query_as("SELECT order_id, status FROM payments")
        .fetch_all(c.databases.pool("payment")?)
        .await
        .context("reading the payments")?;
    let mut problems = Vec::new();
    let paid: HashSet<Uuid> = payments.iter().map(|(id, _)| *id).collect();
    let approved: HashSet<Uuid> = payments
        .iter()
        .filter(|(_, status)| status == "APPROVED")
        .map(|(id, _)| *id)
        .collect();
    for id in orders.keys().filter(|id| !paid.contains(id)) {
        problems.push(format!("order {id}: no payment"));
    }
    for id in paid.iter().filter(|id| !orders.contains_key(id)) {
        problems.push(format!("payment for unknown order {id}"));
    }
    for id in approved.symmetric_difference(&shipped) {
        problems.push(format!(
            "order {id}: approved {}, shipped {}",
            approved.contains(id),
            shipped.contains(id)
        ));
    }
    invariants.push(Invariant::new(
        "one payment per order, approved exactly for the shipped ones",
        format!(
            "{} payments for {} orders ({} approved, {} shipped, {} without a payment, {} \
             approved xor shipped)",
            payments.len(),
            orders.len(),
            approved.len(),
            shipped.len(),
            orders.keys().filter(|id| !paid.contains(id)).count(),
            approved.symmetric_difference(&shipped).count()
        ),
        problems,
    ));

    let shipments: Vec<Uuid> = sqlx::query_scalar("SELECT order_id FROM shipments")
        .fetch_all(c.databases.pool("shipping")?)
        .await
        .context("reading the shipments")?;
    let shipment_set: HashSet<Uuid> = shipments.iter().copied().collect();
    let problems: Vec<String> = shipment_set
        .symmetric_difference(&shipped)
        .map(|id| {
            format!(
                "order {id}: shipment {}, status SHIPPING {}",
                shipment_set.contains(id),
                shipped.contains(id)
            )
        })
        .collect();
    invariants.push(Invariant::new(
        "one shipment per shipped order",
        format!(
            "{} shipments, {} orders shipped, {} mismatched",
            shipments.len(),
            shipped.len(),
            problems.len()
        ),
        problems,
    ));

    let notified: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT order_id, kind, count(*) FROM notifications GROUP BY order_id, kind",
    )
    .fetch_all(c.databases.pool("notification")?)
    .await
    .context("reading the notifications")?;
    let mut per_order: HashMap<Uuid, i64> = HashMap::new();
    let mut problems = Vec::new();
    let mut total = 0;
    for (order, kind, count) in &notified {
        total += count;
        *per_order.entry(*order).or_insert(0) += count;
        if *count > 1 {
            problems.push(format!("order {order}: {kind} notified {count} times"));
        }
    }
    let duplicated = problems.len();
    for id in orders.keys() {
        let count = per_order.get(id).copied().unwrap_or(0);
        if count != NOTIFICATIONS_PER_ORDER {
            problems.push(format!(
                "order {id}: {count} notifications, expected {NOTIFICATIONS_PER_ORDER}"
            ));
        }
    }
    invariants.push(Invariant::new(
        "no duplicated notification",
        format!(
            "{total} notifications for {} orders, {duplicated} (order, kind) duplicated, {} \
             orders without exactly {NOTIFICATIONS_PER_ORDER}",
            orders.len(),
            problems.len() - duplicated
        ),
        problems,
    ));

    let mut shipped_per_sku: HashMap<String, u64> = HashMap::new();
    for id in &shipped {
        if let Some((_, _, items)) = orders.get(id) {
            for item in items.as_array().into_iter().flatten() {
                let sku = item["sku"].as_str().unwrap_or_default().to_owned();
                *shipped_per_sku.entry(sku).or_insert(0) += item["quantity"].as_u64().unwrap_or(0);
            }
        }
    }
    let mut problems = Vec::new();
    let (mut stocked, mut available, mut held, mut sold) = (0, 0, 0, 0);
    for (sku, units) in c.stocked {
        let stock = stock_of(c.http, c.order_url, sku).await?;
        stocked += units;
        available += stock.0;
        held += stock.1;
        sold += stock.2;
        let shipped = shipped_per_sku.get(sku).copied().unwrap_or(0);
        problems.extend(stock_violations(sku, stock, *units, shipped));
    }
    invariants.push(Invariant::new(
        "stock conserved per SKU with nothing left held",
        format!(
            "{} SKUs ({} short of demand): stocked {stocked} = available {available} + held \
             {held} + sold {sold}; {} orders left out for want of stock",
            c.stocked.len(),
            c.short,
            s.left_out
        ),
        problems,
    ));

    let dead = c.databases.count_each(DEAD_LETTERS).await?;
    invariants.push(Invariant::new(
        "zero dead letters",
        figure_each(&dead),
        dead.iter()
            .filter(|(_, n)| *n > 0)
            .map(|(service, n)| format!("{service}: {n} dead letters"))
            .collect(),
    ));

    let unpublished = c.databases.count_each(UNPUBLISHED).await?;
    let mut committed = HashSet::new();
    for service in SERVICES {
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM eventful_outbox")
            .fetch_all(c.databases.pool(service)?)
            .await
            .with_context(|| format!("{service}: reading the outbox"))?;
        committed.extend(ids);
    }
    let (brokers, topic) = (c.brokers.to_owned(), c.topic.to_owned());
    let (messages, on_topic) =
        tokio::task::spawn_blocking(move || topic_event_ids(&brokers, &topic)).await??;
    let mut problems: Vec<String> = unpublished
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(service, n)| format!("{service}: {n} events not marked published"))
        .collect();
    let missing: Vec<&Uuid> = committed.difference(&on_topic).collect();
    problems.extend(
        missing
            .iter()
            .map(|id| format!("event {id}: committed, not on the topic")),
    );
    invariants.push(Invariant::new(
        "every committed outbox event published",
        format!(
            "{} events committed, unpublished {}, {} missing from the topic ({messages} \
             messages on it, {} redeliveries)",
            committed.len(),
            figure_each(&unpublished),
            missing.len(),
            messages.saturating_sub(on_topic.len())
        ),
        problems,
    ));
    Ok(invariants)
}

fn figure_each(counts: &[(&str, i64)]) -> String {
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    let each: Vec<String> = counts
        .iter()
        .map(|(service, n)| format!("{service} {n}"))
        .collect();
    format!("{total} ({})", each.join(", "))
}

/// Reads `topic` from its start to its current end: the number of messages and the set of
/// their `event-id` headers. Assigns partitions (no group join), commits nothing.
fn topic_event_ids(brokers: &str, topic: &str) -> anyhow::Result<(usize, HashSet<Uuid>)> {
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("commerce-chaos-reader-{}", Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .context("topic reader")?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len()) as i32;
    let mut list = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for partition in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
        if high > low {
            list.add_partition_offset(topic, partition, Offset::Offset(low))?;
            ends.insert(partition, high);
        }
    }
    consumer.assign(&list)?;
    let (mut messages, mut ids) = (0, HashSet::new());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("reading {topic} took over 2 minutes; {ends:?} left");
        }
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message?;
        messages += 1;
        let id = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == "event-id")
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| Uuid::parse_str(v).ok())
        });
        ids.extend(id);
        if ends
            .get(&message.partition())
            .is_some_and(|end| message.offset() + 1 >= *end)
        {
            ends.remove(&message.partition());
        }
    }
    Ok((messages, ids))
}
