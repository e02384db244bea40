//! The load tool's engine: sends orders, waits for every one to end, checks the invariants.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use uuid::Uuid;

/// What to send, and where.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "commerce-load",
    about = "Sends orders to a running commerce system, waits until every one is terminal, \
             prints throughput and latency, and checks the invariants."
)]
pub struct LoadOptions {
    /// Orders to send (one per request).
    #[arg(long, default_value_t = 2_000)]
    pub orders: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// SKUs to spread the orders over (each gets enough stock for its share).
    #[arg(long, default_value_t = 10)]
    pub skus: usize,
    /// Every n-th order is above the payment limit and must end `ORDER_CANCELED` (0: none).
    #[arg(long, default_value_t = 10)]
    pub decline_every: usize,
    /// The payment service's limit (`PAYMENT_LIMIT`).
    #[arg(long, env = "PAYMENT_LIMIT", default_value_t = 100_000)]
    pub payment_limit: i64,
    /// Give up waiting for terminal states after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Order service.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub order_url: String,
    /// Payment service.
    #[arg(long, default_value = "http://127.0.0.1:8082")]
    pub payment_url: String,
    /// Shipping service.
    #[arg(long, default_value = "http://127.0.0.1:8083")]
    pub shipping_url: String,
    /// Notification service.
    #[arg(long, default_value = "http://127.0.0.1:8084")]
    pub notification_url: String,
    /// Hide the progress bars (for logs).
    #[arg(long)]
    pub quiet: bool,
}

/// One order as the load tool tracks it.
struct Tracked {
    id: Uuid,
    sku: String,
    declined: bool,
    /// Final status with the server's times of creation and of the last transition.
    done: Option<(String, DateTime<Utc>, DateTime<Utc>)>,
}

impl Tracked {
    fn status(&self) -> &str {
        self.done.as_ref().map(|(s, _, _)| s.as_str()).unwrap_or("")
    }
}

/// `(createdAt, time of the last transition)` of an order as `GET /orders/{id}` shows it.
fn server_times(order: &Value) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let parse = |v: &Value| v.as_str()?.parse::<DateTime<Utc>>().ok();
    let created = parse(&order["createdAt"])?;
    let last = parse(&order["history"].as_array()?.last()?["at"])?;
    Some((created, last))
}

/// Figures of one run.
#[derive(Debug)]
pub struct Report {
    /// Orders created.
    pub created: usize,
    /// Orders left out for want of stock (should be 0: stock is sized for the run).
    pub left_out: usize,
    /// Client wall time from the first POST until every order was seen terminal.
    pub elapsed: Duration,
    /// Server time from the first order's creation to the last order's final transition.
    pub server_span: Duration,
    /// Orders per second over `server_span`.
    pub orders_per_second: f64,
    /// POST latency, p50 and p99.
    pub post_p50: Duration,
    /// POST latency p99.
    pub post_p99: Duration,
    /// Creation → final transition (server clock), p50.
    pub terminal_p50: Duration,
    /// Creation → final transition (server clock), p99.
    pub terminal_p99: Duration,
    /// Orders per final status.
    pub statuses: HashMap<String, usize>,
    /// Invariant violations (empty when all hold).
    pub violations: Vec<String>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn progress(quiet: bool, len: usize, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

const TERMINAL: [&str; 3] = ["SHIPPING", "ORDER_CANCELED", "ORDER_EXPIRED"];

/// Runs the load described by `options` and checks the invariants.
pub async fn run(options: &LoadOptions) -> anyhow::Result<Report> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.concurrency)
        .timeout(Duration::from_secs(30))
        .build()?;
    let run_id = &Uuid::new_v4().simple().to_string()[..8];
    let skus: Vec<String> = (0..options.skus.max(1))
        .map(|i| format!("LOAD-{run_id}-{i}"))
        .collect();
    let per_sku = options.orders.div_ceil(skus.len()) as u64;
    for sku in &skus {
        let response = http
            .put(format!("{}/stock/{sku}", options.order_url))
            .json(&json!({ "available": per_sku }))
            .send()
            .await
            .with_context(|| format!("setting stock at {}", options.order_url))?;
        if !response.status().is_success() {
            bail!("PUT /stock/{sku}: {}", response.text().await?);
        }
    }

    // Send.
    let started = Instant::now();
    let bar = progress(options.quiet, options.orders, "posting");
    let posts = stream::iter(0..options.orders)
        .map(|i| {
            let (http, bar) = (http.clone(), bar.clone());
            let sku = skus[i % skus.len()].clone();
            let declined = options.decline_every > 0 && i % options.decline_every == 0;
            let amount = if declined {
                options.payment_limit + 1
            } else {
                1 + (i as i64 % options.payment_limit.max(1))
            };
            let url = format!("{}/orders", options.order_url);
            async move {
                let body = json!([{ "userId": Uuid::new_v4(), "totalAmount": amount,
                                    "items": [{ "sku": sku, "quantity": 1 }] }]);
                let posted_at = Instant::now();
                let response = http.post(url).json(&body).send().await?;
                let latency = posted_at.elapsed();
                let status = response.status();
                let ids: Value = response.json().await?;
                bar.inc(1);
                if status.as_u16() != 201 {
                    bail!("POST /orders answered {status}: {ids}");
                }
                let id = ids
                    .as_array()
                    .and_then(|ids| ids.first())
                    .and_then(Value::as_str)
                    .map(Uuid::parse_str)
                    .transpose()?;
                anyhow::Ok((
                    id.map(|id| Tracked {
                        id,
                        sku,
                        declined,
                        done: None,
                    }),
                    latency,
                ))
            }
        })
        .buffer_unordered(options.concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    bar.finish();
    let mut orders = Vec::new();
    let mut post_latencies = Vec::new();
    let mut left_out = 0;
    for post in posts {
        let (tracked, latency) = post?;
        post_latencies.push(latency);
        match tracked {
            Some(tracked) => orders.push(tracked),
            None => left_out += 1,
        }
    }

    // Wait until every order is terminal.
    let deadline = Instant::now() + Duration::from_secs(options.timeout_secs);
    let bar = progress(options.quiet, orders.len(), "terminal");
    let http = Arc::new(http);
    loop {
        let pending: Vec<usize> = (0..orders.len())
            .filter(|i| orders[*i].done.is_none())
            .collect();
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{} orders still not terminal after {}s",
                pending.len(),
                options.timeout_secs
            );
        }
        let checks = stream::iter(pending)
            .map(|i| {
                let http = http.clone();
                let url = format!("{}/orders/{}", options.order_url, orders[i].id);
                async move {
                    let order: Value = http.get(url).send().await?.json().await?;
                    anyhow::Ok((i, order))
                }
            })
            .buffer_unordered(options.concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        for check in checks {
            let (i, order) = check?;
            let status = order["status"].as_str().unwrap_or_default();
            if TERMINAL.contains(&status) {
                let (created, last) = server_times(&order).with_context(|| {
                    format!("order {} has no timestamps: {order}", orders[i].id)
                })?;
                orders[i].done = Some((status.to_owned(), created, last));
                bar.inc(1);
            }
        }
        // Latencies come from server timestamps, so polling slowly costs no precision and
        // leaves the 2 cores to the system under test.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bar.finish();
    let elapsed = started.elapsed();

    let violations = check_invariants(&http, options, &skus, per_sku, &orders).await?;
    // Latencies from the server's own timestamps: the client's polling rounds would add
    // their length to every figure.
    let mut terminal: Vec<Duration> = orders
        .iter()
        .filter_map(|o| o.done.as_ref())
        .map(|(_, created, last)| (*last - *created).to_std().unwrap_or_default())
        .collect();
    terminal.sort();
    post_latencies.sort();
    let first_created = orders
        .iter()
        .filter_map(|o| o.done.as_ref().map(|d| d.1))
        .min();
    let last_settled = orders
        .iter()
        .filter_map(|o| o.done.as_ref().map(|d| d.2))
        .max();
    let server_span = match (first_created, last_settled) {
        (Some(first), Some(last)) => (last - first).to_std().unwrap_or_default(),
        _ => Duration::ZERO,
    };
    let mut statuses = HashMap::new();
    for order in &orders {
        *statuses.entry(order.status().to_owned()).or_insert(0) += 1;
    }
    Ok(Report {
        created: orders.len(),
        left_out,
        elapsed,
        server_span,
        orders_per_second: orders.len() as f64 / server_span.as_secs_f64().max(1e-9),
        post_p50: percentile(&post_latencies, 0.50),
        post_p99: percentile(&post_latencies, 0.99),
        terminal_p50: percentile(&terminal, 0.50),
        terminal_p99: percentile(&terminal, 0.99),
        statuses,
        violations,
    })
}

/// Stock conservation per SKU, one payment per order, no shipment without an approved
/// payment, every order terminal in the state its amount dictates.
async fn check_invariants(
    http: &reqwest::Client,
    options: &LoadOptions,
    skus: &[String],
    per_sku: u64,
    orders: &[Tracked],
) -> anyhow::Result<Vec<String>> {
    let mut violations = Vec::new();
    let mut sold_per_sku: HashMap<&str, u64> = HashMap::new();
    for order in orders {
        if order.status() == "SHIPPING" {
            *sold_per_sku.entry(order.sku.as_str()).or_insert(0) += 1;
        }
    }
    for sku in skus {
        let stock: Value = http
            .get(format!("{}/stock/{sku}", options.order_url))
            .send()
            .await?
            .json()
            .await?;
        let field = |name: &str| stock[name].as_u64().unwrap_or(u64::MAX);
        let (available, held, sold) = (field("available"), field("held"), field("sold"));
        if available.saturating_add(held).saturating_add(sold) != per_sku {
            violations.push(format!(
                "{sku}: available {available} + held {held} + sold {sold} != {per_sku}"
            ));
        }
        if held != 0 {
            violations.push(format!("{sku}: {held} units still held"));
        }
        let shipped = sold_per_sku.get(sku.as_str()).copied().unwrap_or(0);
        if sold != shipped {
            violations.push(format!("{sku}: sold {sold} but {shipped} orders shipped"));
        }
    }
    let checks = stream::iter(orders)
        .map(|order| async move {
            let payment = http
                .get(format!("{}/payments/{}", options.payment_url, order.id))
                .send()
                .await?;
            let payment_status = if payment.status().is_success() {
                payment.json::<Value>().await?["status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            } else {
                "NONE".to_owned()
            };
            let shipped = http
                .get(format!("{}/shipments/{}", options.shipping_url, order.id))
                .send()
                .await?
                .status()
                .is_success();
            // The payments table cannot hold two rows per order; the events can show two.
            // The notification service may lag the order a little: give it 10 s.
            let mut payment_events = 0;
            for _ in 0..50 {
                let notifications: Value = http
                    .get(format!(
                        "{}/notifications?orderId={}",
                        options.notification_url, order.id
                    ))
                    .send()
                    .await?
                    .json()
                    .await?;
                payment_events = notifications.as_array().map_or(0, |list| {
                    list.iter()
                        .filter(|n| {
                            matches!(
                                n["kind"].as_str(),
                                Some("PAYMENT_APPROVED" | "PAYMENT_FAILED")
                            )
                        })
                        .count()
                });
                if payment_events > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            anyhow::Ok((order, payment_status, shipped, payment_events))
        })
        .buffer_unordered(options.concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    for check in checks {
        let (order, payment, shipped, payment_events) = check?;
        if payment_events != 1 {
            violations.push(format!(
                "order {}: {payment_events} payment outcomes notified",
                order.id
            ));
        }
        let status = order.status();
        let expected = if order.declined {
            ("ORDER_CANCELED", "DECLINED", false)
        } else {
            ("SHIPPING", "APPROVED", true)
        };
        if (status, payment.as_str(), shipped) != expected {
            violations.push(format!(
                "order {}: status {status}, payment {payment}, shipped {shipped}; expected {expected:?}",
                order.id
            ));
        }
        if shipped && payment != "APPROVED" {
            violations.push(format!(
                "order {}: shipped without an approved payment",
                order.id
            ));
        }
    }
    Ok(violations)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "orders created      {} ({} left out for want of stock)",
            self.created, self.left_out
        )?;
        writeln!(
            f,
            "elapsed             {:.2?} client wall time; {:.2?} from first order created to last settled",
            self.elapsed, self.server_span
        )?;
        writeln!(
            f,
            "throughput          {:.1} orders/s (created to settled, server clock)",
            self.orders_per_second
        )?;
        writeln!(
            f,
            "POST latency        p50 {:.1?}  p99 {:.1?}",
            self.post_p50, self.post_p99
        )?;
        writeln!(
            f,
            "created -> terminal p50 {:.1?}  p99 {:.1?}  (server timestamps)",
            self.terminal_p50, self.terminal_p99
        )?;
        let mut statuses: Vec<_> = self.statuses.iter().collect();
        statuses.sort();
        writeln!(f, "final states        {statuses:?}")?;
        if self.violations.is_empty() {
            writeln!(
                f,
                "invariants          OK (stock conserved per SKU, nothing held, one payment per \
                 order, shipments only for approved payments, every order terminal)"
            )
        } else {
            writeln!(f, "invariants          {} VIOLATED:", self.violations.len())?;
            for violation in self.violations.iter().take(20) {
                writeln!(f, "  - {violation}")?;
            }
            Ok(())
        }
    }
}
