//! The load tool's engine: sends orders, waits for every one to end, measures, checks the
//! invariants.
//!
//! Three modes:
//! - **closed loop** (`--orders N --concurrency C`): C clients, each sending its next order
//!   when the previous POST answers. Simple, but it measures coordinated omission: when the
//!   system stalls the clients stop sending, so the stall hides from the latencies.
//! - **open loop** (`--rate R --duration D`): orders leave on a fixed schedule whatever the
//!   answers (each send is its own task), and latency counts from the *scheduled* send time,
//!   so a stall shows in full. Past `--max-outstanding` requests in flight a send is counted
//!   as a drop instead of blocking the schedule.
//! - **sweep** (`--sweep 50,100,200 --duration 20s`): the open loop at each rate in turn,
//!   draining the system between steps, with a CSV (`--csv`) and an SVG chart (`--chart`).
//!
//! Terminal times come from the order's history (server clock); POST → terminal is measured
//! from the client's send time (scheduled, in the open loop) to that server time. Both
//! clocks are this machine's when the load tool runs beside the services, as in the README's
//! figures; across machines their skew adds to the figure.

mod client;
mod lag;
mod mix;
mod schedule;
mod stats;
mod sweep;

pub use client::{place_order, post_order, Placed};
pub use lag::{consumer_lag, GroupLag, SERVICES};
pub use mix::{nth_order, run_skus, set_stock, stock_of, stock_violations};
pub use schedule::{parse_duration, schedule};
pub use stats::{achieved_rate, ms, stages, History, Latencies, Percentiles, StageSplit};
pub use sweep::{chart_svg, csv, SweepRow};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

/// What to send, and where.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "commerce-load",
    about = "Sends orders to a running commerce system (closed loop, open loop at a fixed \
             rate, or a sweep of rates), waits until every one is terminal, prints latency \
             percentiles and throughput, and checks the invariants."
)]
pub struct LoadOptions {
    /// Closed loop: orders to send (one per request).
    #[arg(long, default_value_t = 2_000)]
    pub orders: usize,
    /// Closed loop: requests in flight. Also bounds the polling and checking requests.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Open loop: orders per second, sent on schedule whatever the answers.
    #[arg(long, conflicts_with = "sweep")]
    pub rate: Option<f64>,
    /// Sweep: offered rates (orders/s), one open-loop step each, e.g. `50,100,200,400`.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub sweep: Vec<f64>,
    /// Open loop and sweep: how long each rate is offered (`30s`, `2m`, `500ms`, or seconds).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub duration: Duration,
    /// Open loop: requests in flight beyond which a scheduled send is dropped (and counted).
    #[arg(long, default_value_t = 10_000)]
    pub max_outstanding: usize,
    /// Sweep: write the results as CSV here.
    #[arg(long, requires = "sweep")]
    pub csv: Option<PathBuf>,
    /// Sweep: draw latency against throughput as SVG here.
    #[arg(long, requires = "sweep")]
    pub chart: Option<PathBuf>,
    /// SKUs to spread the orders over (each gets enough stock for its share).
    #[arg(long, default_value_t = 10)]
    pub skus: usize,
    /// Every n-th order is above the payment limit and must end `ORDER_CANCELED` (0: none).
    #[arg(long, default_value_t = 10)]
    pub decline_every: usize,
    /// The payment service's limit (`PAYMENT_LIMIT`).
    #[arg(long, env = "PAYMENT_LIMIT", default_value_t = 100_000)]
    pub payment_limit: i64,
    /// Give up waiting for terminal states after this many seconds (per run or sweep step).
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
    /// Kafka, for the consumer groups' lag.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// The services' event topic (`COMMERCE_TOPIC`).
    #[arg(long, env = "COMMERCE_TOPIC", default_value = "order-events")]
    pub topic: String,
    /// The services' consumer group prefix (`COMMERCE_GROUP_PREFIX`).
    #[arg(long, env = "COMMERCE_GROUP_PREFIX", default_value = "commerce")]
    pub group_prefix: String,
    /// Hide the progress bars (for logs).
    #[arg(long)]
    pub quiet: bool,
}

impl LoadOptions {
    /// The services' consumer groups, named as `Settings::group` names them.
    pub fn groups(&self) -> Vec<String> {
        SERVICES
            .iter()
            .map(|service| format!("{}-{service}", self.group_prefix))
            .collect()
    }
}

/// One order as the load tool tracks it.
struct Tracked {
    id: Uuid,
    sku: String,
    declined: bool,
    /// Client clock: the scheduled send (open loop) or the actual send (closed loop).
    sent_at: DateTime<Utc>,
    done: Option<Terminal>,
}

/// An order in its final state, with its history as the server recorded it.
struct Terminal {
    status: String,
    created: DateTime<Utc>,
    /// Never empty.
    history: History,
}

impl Terminal {
    fn at(&self) -> DateTime<Utc> {
        self.history.last().map_or(self.created, |(_, at)| *at)
    }
}

impl Tracked {
    fn status(&self) -> &str {
        self.done.as_ref().map_or("", |d| d.status.as_str())
    }
}

/// `createdAt` and the history of an order as `GET /orders/{id}` shows it.
fn server_history(order: &Value) -> Option<(DateTime<Utc>, History)> {
    let parse = |v: &Value| v.as_str()?.parse::<DateTime<Utc>>().ok();
    let created = parse(&order["createdAt"])?;
    let history = order["history"]
        .as_array()?
        .iter()
        .map(|t| Some((t["toStatus"].as_str()?.to_owned(), parse(&t["at"])?)))
        .collect::<Option<Vec<_>>>()?;
    (!history.is_empty()).then_some((created, history))
}

/// Figures of one run (or one sweep step).
#[derive(Debug)]
pub struct Report {
    /// What was run, e.g. `open loop, 100 orders/s for 15s`.
    pub label: String,
    /// Orders per second offered (open loop).
    pub offered: Option<f64>,
    /// Sends planned.
    pub planned: usize,
    /// Orders created.
    pub created: usize,
    /// Orders left out for want of stock (should be 0: stock is sized for the run).
    pub left_out: usize,
    /// Scheduled sends dropped because `--max-outstanding` requests were in flight.
    pub dropped: u64,
    /// POSTs that failed (transport error, timeout, or not 201).
    pub errors: u64,
    /// The first failure, to say why.
    pub first_error: Option<String>,
    /// Client wall time from the first send until every order was seen terminal.
    pub elapsed: Duration,
    /// Terminal states per second between the first and the last (server clock).
    pub achieved: f64,
    /// Send (scheduled, in the open loop) → POST answered.
    pub post: Percentiles,
    /// Send (scheduled, in the open loop; client clock) → terminal state (server clock).
    pub to_terminal: Percentiles,
    /// Created → terminal state, both server clock.
    pub created_to_terminal: Percentiles,
    /// Per transition of the order history, in flow order.
    pub stages: Vec<(String, Percentiles)>,
    /// Each consumer group's lag a commit interval after every order was terminal, or why it
    /// is unknown.
    pub lag: Result<Vec<GroupLag>, String>,
    /// Orders per final status.
    pub statuses: HashMap<String, usize>,
    /// Invariant violations (empty when all hold).
    pub violations: Vec<String>,
}

impl Report {
    /// The sweep's row for this step.
    pub fn sweep_row(&self) -> SweepRow {
        SweepRow {
            offered: self.offered.unwrap_or_default(),
            achieved: self.achieved,
            terminal_p50: self.to_terminal.p50,
            terminal_p99: self.to_terminal.p99,
            terminal_p999: self.to_terminal.p999,
            post_p99: self.post.p99,
            drops: self.dropped,
            errors: self.errors,
            violations: self.violations.len(),
        }
    }
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

/// librdkafka's `auto.commit.interval.ms` (5 s) and a margin.
const LAG_SETTLE: Duration = Duration::from_secs(6);

const TERMINAL: [&str; 3] = ["SHIPPING", "ORDER_CANCELED", "ORDER_EXPIRED"];

/// Runs what `options` asks for (closed loop, open loop or sweep), prints the reports, writes
/// the sweep's CSV and chart; `Ok(false)` when an invariant was violated.
pub async fn execute(options: &LoadOptions) -> anyhow::Result<bool> {
    let http = client(options)?;
    if !options.sweep.is_empty() {
        return sweep(&http, options).await;
    }
    let report = match options.rate {
        Some(rate) => run_open(&http, options, rate).await?,
        None => run_closed(&http, options).await?,
    };
    print!("{report}");
    Ok(report.violations.is_empty())
}

fn client(options: &LoadOptions) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        // The open loop may have many requests in flight: keep their connections for reuse
        // rather than paying a new connection per request after a burst.
        .pool_max_idle_per_host(options.concurrency.max(1024))
        .timeout(Duration::from_secs(30))
        .build()?)
}

async fn sweep(http: &reqwest::Client, options: &LoadOptions) -> anyhow::Result<bool> {
    let mut rows = Vec::new();
    let mut all_hold = true;
    for (step, rate) in options.sweep.iter().enumerate() {
        if step > 0 {
            drain(options).await;
        }
        let report = run_open(http, options, *rate).await?;
        print!("{report}");
        println!();
        all_hold &= report.violations.is_empty();
        rows.push(report.sweep_row());
    }
    println!(
        "{:>8} {:>9} {:>10} {:>10} {:>10} {:>9} {:>6} {:>6}",
        "offered", "achieved", "p50", "p99", "p99.9", "POST p99", "drops", "errors"
    );
    for row in &rows {
        println!(
            "{:>8} {:>9.1} {:>10} {:>10} {:>10} {:>9} {:>6} {:>6}",
            row.offered,
            row.achieved,
            ms(row.terminal_p50),
            ms(row.terminal_p99),
            ms(row.terminal_p999),
            ms(row.post_p99),
            row.drops,
            row.errors
        );
    }
    if let Some(path) = &options.csv {
        std::fs::write(path, csv(&rows)).with_context(|| format!("writing {}", path.display()))?;
        println!("CSV written to {}", path.display());
    }
    if let Some(path) = &options.chart {
        let title = format!(
            "commerce: latency vs throughput ({} per step)",
            ms(options.duration)
        );
        std::fs::write(path, chart_svg(&rows, &title)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("chart written to {}", path.display());
    }
    Ok(all_hold)
}

/// Between sweep steps: waits (up to a minute) until every group has committed past the
/// previous step's events, so the next step starts on an idle system. Lag is only read, so
/// an unreachable Kafka costs the wait, not the sweep.
async fn drain(options: &LoadOptions) {
    let started = Instant::now();
    let groups = options.groups();
    loop {
        let lag = consumer_lag(&options.kafka_brokers, &options.topic, &groups).await;
        let pending: i64 = lag
            .as_ref()
            .map_or(i64::MAX, |groups| groups.iter().map(|g| g.lag).sum());
        if pending == 0 {
            println!("drained in {}", ms(started.elapsed()));
            return;
        }
        if started.elapsed() > Duration::from_secs(60) {
            println!("not drained after 60s (lag {lag:?}); going on");
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Sets the stock of this run's own SKUs, enough for `planned` orders.
async fn stock_up(
    http: &reqwest::Client,
    options: &LoadOptions,
    planned: usize,
) -> anyhow::Result<(Vec<String>, u64)> {
    let skus = run_skus(options.skus);
    let per_sku = planned.div_ceil(skus.len()) as u64;
    for sku in &skus {
        set_stock(http, &options.order_url, sku, per_sku).await?;
    }
    Ok((skus, per_sku))
}

/// What the sending phase produced.
struct Sent {
    orders: Vec<Tracked>,
    post: Latencies,
    left_out: usize,
    dropped: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Sent {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            orders: Vec::new(),
            post: Latencies::new()?,
            left_out: 0,
            dropped: 0,
            errors: 0,
            first_error: None,
        })
    }

    fn add(
        &mut self,
        (sku, declined, sent_at): (String, bool, DateTime<Utc>),
        latency: Duration,
        posted: anyhow::Result<Option<Uuid>>,
    ) {
        self.post.record(latency);
        match posted {
            Ok(Some(id)) => self.orders.push(Tracked {
                id,
                sku,
                declined,
                sent_at,
                done: None,
            }),
            Ok(None) => self.left_out += 1,
            Err(error) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{error:#}"));
            }
        }
    }
}

/// The closed loop: `--concurrency` clients sending `--orders` orders back to back.
pub async fn run_closed(http: &reqwest::Client, options: &LoadOptions) -> anyhow::Result<Report> {
    let (skus, per_sku) = stock_up(http, options, options.orders).await?;
    let started = Instant::now();
    let bar = progress(options.quiet, options.orders, "posting");
    let url = format!("{}/orders", options.order_url);
    let posts = stream::iter(0..options.orders)
        .map(|i| {
            let (sku, declined, body) =
                nth_order(i, options.decline_every, options.payment_limit, &skus);
            let (http, bar, url) = (http.clone(), bar.clone(), url.clone());
            async move {
                let (sent_at, posted_at) = (Utc::now(), Instant::now());
                let posted = post_order(&http, &url, &body).await;
                bar.inc(1);
                ((sku, declined, sent_at), posted_at.elapsed(), posted)
            }
        })
        .buffer_unordered(options.concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    bar.finish();
    let mut sent = Sent::new()?;
    for (order, latency, posted) in posts {
        // The closed loop has always stopped at the first failed POST: it has no schedule
        // whose misses it could count.
        if let Err(error) = &posted {
            bail!("{error:#}");
        }
        sent.add(order, latency, posted);
    }
    let label = format!(
        "closed loop, {} orders, {} in flight",
        options.orders, options.concurrency
    );
    finish(
        http,
        options,
        label,
        None,
        options.orders,
        (skus, per_sku),
        sent,
        started,
    )
    .await
}

/// The open loop: `rate` orders per second for `--duration`, each on its own schedule slot.
pub async fn run_open(
    http: &reqwest::Client,
    options: &LoadOptions,
    rate: f64,
) -> anyhow::Result<Report> {
    let slots = schedule(rate, options.duration);
    if slots.is_empty() {
        bail!(
            "--rate {rate} for {:?} schedules no order",
            options.duration
        );
    }
    let (skus, per_sku) = stock_up(http, options, slots.len()).await?;
    let bar = progress(options.quiet, slots.len(), "posting");
    let url = format!("{}/orders", options.order_url);
    let in_flight = Arc::new(Semaphore::new(options.max_outstanding.max(1)));
    let mut sent = Sent::new()?;
    let mut tasks = JoinSet::new();
    let (started, started_utc) = (Instant::now(), Utc::now());
    for (i, offset) in slots.iter().enumerate() {
        let due = started + *offset;
        tokio::time::sleep_until(due).await;
        // Never wait for a permit: waiting would delay every later send, the very
        // coordination the open loop exists to avoid.
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            sent.dropped += 1;
            bar.inc(1);
            continue;
        };
        let (sku, declined, body) =
            nth_order(i, options.decline_every, options.payment_limit, &skus);
        let sent_at = started_utc + chrono::Duration::from_std(*offset)?;
        let (http, bar, url) = (http.clone(), bar.clone(), url.clone());
        tasks.spawn(async move {
            let posted = post_order(&http, &url, &body).await;
            // From the scheduled time: a send that left late (a busy client) counts its delay.
            let latency = due.elapsed();
            drop(permit);
            bar.inc(1);
            ((sku, declined, sent_at), latency, posted)
        });
        // Collect finished sends as we go, so results do not pile up in the set.
        while let Some(done) = tasks.try_join_next() {
            let (order, latency, posted) = done?;
            sent.add(order, latency, posted);
        }
    }
    while let Some(done) = tasks.join_next().await {
        let (order, latency, posted) = done?;
        sent.add(order, latency, posted);
    }
    bar.finish();
    // The poller walks the orders oldest first.
    sent.orders.sort_by_key(|o| o.sent_at);
    let label = format!(
        "open loop, {rate} orders/s for {} ({} scheduled)",
        ms(options.duration),
        slots.len()
    );
    finish(
        http,
        options,
        label,
        Some(rate),
        slots.len(),
        (skus, per_sku),
        sent,
        started,
    )
    .await
}

/// Waits until every order is terminal, reads the lag, checks the invariants, computes the
/// figures.
#[allow(clippy::too_many_arguments)]
async fn finish(
    http: &reqwest::Client,
    options: &LoadOptions,
    label: String,
    offered: Option<f64>,
    planned: usize,
    (skus, per_sku): (Vec<String>, u64),
    mut sent: Sent,
    started: Instant,
) -> anyhow::Result<Report> {
    wait_terminal(http, options, &mut sent.orders).await?;
    let elapsed = started.elapsed();
    let violations = check_invariants(http, options, &skus, per_sku, &sent.orders).await?;
    // Offsets are committed every 5 s after processing: read the lag once a commit interval
    // has passed since the last order ended, so what shows is a consumer behind, not a
    // commit not yet due.
    tokio::time::sleep_until(started + elapsed + LAG_SETTLE).await;
    let lag = consumer_lag(&options.kafka_brokers, &options.topic, &options.groups())
        .await
        .map_err(|e| format!("{e:#}"));

    let mut to_terminal = Latencies::new()?;
    let mut created_to_terminal = Latencies::new()?;
    let mut split = StageSplit::new();
    let mut terminal_times = Vec::with_capacity(sent.orders.len());
    let mut statuses = HashMap::new();
    for order in &sent.orders {
        *statuses.entry(order.status().to_owned()).or_insert(0) += 1;
        let Some(done) = &order.done else { continue };
        to_terminal.record_between(order.sent_at, done.at());
        created_to_terminal.record_between(done.created, done.at());
        split.add(stages(done.created, &done.history))?;
        terminal_times.push(done.at());
    }
    Ok(Report {
        label,
        offered,
        planned,
        created: sent.orders.len(),
        left_out: sent.left_out,
        dropped: sent.dropped,
        errors: sent.errors,
        first_error: sent.first_error,
        elapsed,
        achieved: achieved_rate(&terminal_times),
        post: sent.post.percentiles(),
        to_terminal: to_terminal.percentiles(),
        created_to_terminal: created_to_terminal.percentiles(),
        stages: split.percentiles(),
        lag,
        statuses,
        violations,
    })
}

/// Polls `GET /orders/{id}` until every order is terminal. The orders are walked oldest first
/// a window at a time, and a round ends at the first window with an order still in flight:
/// later orders are mostly in flight too, so polling them would only load the system under
/// test. Latencies come from server timestamps, so polling late costs no precision.
async fn wait_terminal(
    http: &reqwest::Client,
    options: &LoadOptions,
    orders: &mut [Tracked],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(options.timeout_secs);
    let bar = progress(options.quiet, orders.len(), "terminal");
    let window = options.concurrency.max(1) * 4;
    loop {
        let pending: Vec<usize> = (0..orders.len())
            .filter(|i| orders[*i].done.is_none())
            .take(window)
            .collect();
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let left = orders.iter().filter(|o| o.done.is_none()).count();
            bail!(
                "{left} orders still not terminal after {}s",
                options.timeout_secs
            );
        }
        let checks = stream::iter(pending)
            .map(|i| {
                let url = format!("{}/orders/{}", options.order_url, orders[i].id);
                async move {
                    let order: Value = http.get(url).send().await?.json().await?;
                    anyhow::Ok((i, order))
                }
            })
            .buffer_unordered(options.concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        let mut all_done = true;
        for check in checks {
            let (i, order) = check?;
            let status = order["status"].as_str().unwrap_or_default();
            if TERMINAL.contains(&status) {
                let (created, history) = server_history(&order).with_context(|| {
                    format!("order {} has no timestamps: {order}", orders[i].id)
                })?;
                orders[i].done = Some(Terminal {
                    status: status.to_owned(),
                    created,
                    history,
                });
                bar.inc(1);
            } else {
                all_done = false;
            }
        }
        if !all_done {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    bar.finish();
    Ok(())
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
        let stock = stock_of(http, &options.order_url, sku).await?;
        let shipped = sold_per_sku.get(sku.as_str()).copied().unwrap_or(0);
        violations.extend(stock_violations(sku, stock, per_sku, shipped));
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
        writeln!(f, "== {}", self.label)?;
        writeln!(
            f,
            "orders              {} created of {} planned ({} left out for want of stock, {} \
             dropped at the in-flight cap, {} failed)",
            self.created, self.planned, self.left_out, self.dropped, self.errors
        )?;
        if let Some(error) = &self.first_error {
            writeln!(f, "first failure       {error}")?;
        }
        writeln!(
            f,
            "elapsed             {} client wall time, first send to all terminal",
            ms(self.elapsed)
        )?;
        match self.offered {
            Some(offered) => writeln!(
                f,
                "throughput          {:.1} terminal orders/s achieved, {offered} offered",
                self.achieved
            )?,
            None => writeln!(
                f,
                "throughput          {:.1} terminal orders/s (first to last terminal, server clock)",
                self.achieved
            )?,
        }
        let from = if self.offered.is_some() {
            "scheduled send"
        } else {
            "send"
        };
        writeln!(f, "POST                {}  ({from} → answer)", self.post)?;
        writeln!(
            f,
            "POST → terminal     {}  ({from}, client clock → last history entry, server clock)",
            self.to_terminal
        )?;
        writeln!(
            f,
            "created → terminal  {}  (server clock)",
            self.created_to_terminal
        )?;
        writeln!(f, "stages (server clock, p50 / p99)")?;
        for (stage, p) in &self.stages {
            writeln!(
                f,
                "  {stage:<32} {:>9} / {:>9}  ({} orders)",
                ms(p.p50),
                ms(p.p99),
                p.count
            )?;
        }
        match &self.lag {
            Ok(groups) => writeln!(
                f,
                "consumer lag        {}  (committed offsets vs high watermarks, 6 s after \
                 the last order ended: offsets commit every 5 s)",
                groups
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )?,
            Err(error) => writeln!(f, "consumer lag        unknown: {error}")?,
        }
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
