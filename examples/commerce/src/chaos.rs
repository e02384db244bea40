//! Chaos at scale: the four services as separate processes on private PostgreSQL, Redis and
//! Kafka servers, orders flowing at a steady rate, and while they flow a random service
//! SIGKILLed and restarted every few seconds, the Kafka broker restarted once, Redis
//! restarted once (from its append-only file) and PostgreSQL crashed and restarted once.
//! Then, once the system has settled, every invariant is checked and printed with its
//! figure.
//!
//! The tool owns every server it restarts: it starts private instances on spare ports
//! (`eventful-test-support`'s `KafkaBroker`, `RedisServer`, `PostgresServer`), never
//! touching a shared one. Every loop is bounded, in count and in time.
//!
//! Clients behave as careful clients do: each order is sent with an `Idempotency-Key` and
//! retried with the same key while the order service is down or answers `5xx`/`409`.

mod invariants;
mod services;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use eventful_test_support::{spare_port, KafkaBroker, PostgresServer, RedisServer};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::load::{
    ms, nth_order, parse_duration, place_order, run_skus, set_stock, Placed, SERVICES,
};
use invariants::{Checked, Databases};
use services::Services;

/// What to run.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "commerce-chaos",
    about = "Runs the four commerce services as separate processes on private PostgreSQL, \
             Redis and Kafka servers, sends orders while killing and restarting services and \
             restarting each server once, waits until the system settles, and checks every \
             invariant. Exits non-zero when one fails or the system does not settle."
)]
pub struct ChaosOptions {
    /// Orders to send (one per request, each with its own `Idempotency-Key`).
    #[arg(long, default_value_t = 10_000)]
    pub orders: usize,
    /// Orders per second, sent on schedule whatever the answers (open loop).
    #[arg(long, default_value_t = 40.0)]
    pub rate: f64,
    /// SIGKILL a random service (and restart it) this often while orders are sent.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub kill_every: Duration,
    /// SKUs to spread the orders over.
    #[arg(long, default_value_t = 10)]
    pub skus: usize,
    /// SKUs stocked with half their share of the orders: demand above supply, so some
    /// orders are left out.
    #[arg(long, default_value_t = 2)]
    pub short_skus: usize,
    /// Every n-th order is above the payment limit and must end `ORDER_CANCELED` (0: none).
    #[arg(long, default_value_t = 10)]
    pub decline_every: usize,
    /// The payment service's limit (`PAYMENT_LIMIT`).
    #[arg(long, default_value_t = 100_000)]
    pub payment_limit: i64,
    /// A client gives up on an order after retrying it this long.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub give_up_after: Duration,
    /// How long the system may take to settle once the faults are over (every order
    /// terminal, every event published, every consumer group caught up).
    #[arg(long, value_parser = parse_duration, default_value = "300s")]
    pub settle_timeout: Duration,
    /// Partitions of the event topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Where the `order`, `payment`, `shipping` and `notification` binaries are (default:
    /// beside this one).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Where the services' logs go (default: a new folder in the temporary directory).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Seed of the choice of services to kill (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print only the summary.
    #[arg(long)]
    pub quiet: bool,
}

/// One invariant, its figure, and what broke it.
#[derive(Debug, Clone)]
pub struct Invariant {
    /// What must hold.
    pub name: &'static str,
    /// The counts behind it.
    pub figure: String,
    /// Violations (empty when it holds).
    pub violations: Vec<String>,
}

impl Invariant {
    fn new(name: &'static str, figure: String, violations: Vec<String>) -> Self {
        Self {
            name,
            figure,
            violations,
        }
    }

    /// Whether it holds.
    pub fn holds(&self) -> bool {
        self.violations.is_empty()
    }
}

/// A fault the run injected and how long the system took to be back.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Since the first order was sent.
    pub at: Duration,
    /// `kill order`, `restart Kafka`, …
    pub what: String,
    /// Until the service answered `/health` again, or the server accepted connections.
    pub back_in: Duration,
}

impl Fault {
    fn line(&self, answered: &AtomicUsize, orders: usize) -> String {
        format!(
            "{:>8} {:<22} back in {:>8}  ({} of {orders} orders answered)",
            ms(self.at),
            self.what,
            ms(self.back_in),
            answered.load(Ordering::Relaxed)
        )
    }
}

/// What a chaos run did and found.
#[derive(Debug)]
pub struct ChaosReport {
    /// Orders sent.
    pub orders: usize,
    /// First send to last answer.
    pub sending: Duration,
    /// Services SIGKILLed and restarted.
    pub kills: Vec<Fault>,
    /// Kafka, Redis, PostgreSQL restarts.
    pub restarts: Vec<Fault>,
    /// Services that exited on their own (and were restarted), per service.
    pub crashes: HashMap<&'static str, usize>,
    /// Last answer → settled (every order terminal, every event published, lag 0); `None`
    /// when it did not settle within the bound.
    pub settled_after: Option<Duration>,
    /// Last fault → settled.
    pub settled_after_last_fault: Option<Duration>,
    /// What was still unsettled at the bound.
    pub unsettled: Vec<String>,
    /// Every invariant with its figure.
    pub invariants: Vec<Invariant>,
    /// The services' logs.
    pub log_dir: PathBuf,
    /// The seed of the kills.
    pub seed: u64,
}

impl ChaosReport {
    /// Settled within the bound and every invariant holds.
    pub fn passed(&self) -> bool {
        self.settled_after.is_some() && self.invariants.iter().all(Invariant::holds)
    }
}

/// One placed order as its client knows it.
#[derive(Debug, Clone)]
pub(crate) struct Answered {
    pub(crate) id: Uuid,
    pub(crate) declined: bool,
}

/// What the clients saw.
#[derive(Debug, Default)]
pub(crate) struct Sending {
    pub(crate) sent: usize,
    pub(crate) placed: Vec<Answered>,
    pub(crate) left_out: usize,
    pub(crate) refused: Vec<String>,
    pub(crate) gave_up: Vec<String>,
    pub(crate) retried: usize,
    pub(crate) tries: u64,
    /// First send → last answer.
    pub(crate) answered_in: Duration,
}

/// Picks the services to kill: a seeded generator (splitmix64), so the sequence is
/// reproducible from the seed, drawing from a bag that holds each service once, so every
/// four kills take down every service (the order service among them: its clients retry).
struct Dice {
    state: u64,
    bag: Vec<&'static str>,
}

impl Dice {
    fn new(seed: u64) -> Self {
        Self {
            state: seed,
            bag: Vec::new(),
        }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn pick(&mut self) -> &'static str {
        if self.bag.is_empty() {
            self.bag = SERVICES.to_vec();
        }
        let at = (self.next() % self.bag.len() as u64) as usize;
        self.bag.swap_remove(at)
    }
}

/// The servers the run owns, so it may restart them.
struct Servers {
    postgres: PostgresServer,
    redis: RedisServer,
    kafka: KafkaBroker,
}

/// The three server restarts, in order, and when each is due (a fraction of the sending
/// schedule).
const RESTARTS: [(&str, f64); 3] = [("Kafka", 0.2), ("Redis", 0.45), ("PostgreSQL", 0.7)];

impl Servers {
    async fn restart(&mut self, which: &str) {
        match which {
            "Kafka" => self.kafka.restart().await,
            "Redis" => self.redis.restart().await,
            _ => self.postgres.restart().await,
        }
    }
}

/// Runs the chaos: starts the servers and services, sends the orders under faults, waits
/// until the system settles, checks the invariants.
pub async fn run(options: &ChaosOptions) -> anyhow::Result<ChaosReport> {
    let say = |line: String| {
        if !options.quiet {
            println!("{line}");
        }
    };
    let bin_dir = match &options.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary's folder")?
            .to_owned(),
    };
    let run_id = Uuid::new_v4().simple().to_string();
    let log_dir = options
        .log_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("commerce-chaos-{}", &run_id[..8])));
    std::fs::create_dir_all(&log_dir).with_context(|| format!("{}", log_dir.display()))?;
    let seed = options.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });

    say("starting private PostgreSQL, Redis (append-only file) and Apache Kafka…".to_owned());
    let mut servers = Servers {
        postgres: PostgresServer::start().await,
        redis: RedisServer::start().await,
        kafka: KafkaBroker::start().await,
    };
    let (database_url, brokers) = (servers.postgres.url(), servers.kafka.brokers());
    let topic = "order-events".to_owned();
    let group_prefix = "commerce".to_owned();
    say(format!(
        "PostgreSQL {database_url}, Redis {}, Kafka {brokers}; service logs in {}",
        servers.redis.url(),
        log_dir.display()
    ));
    let ports: HashMap<&'static str, u16> = SERVICES.iter().map(|s| (*s, spare_port())).collect();
    let mut env = vec![
        ("DATABASE_URL".to_owned(), database_url.clone()),
        ("REDIS_URL".to_owned(), servers.redis.url()),
        ("KAFKA_BROKERS".to_owned(), brokers.clone()),
        ("COMMERCE_TOPIC".to_owned(), topic.clone()),
        (
            "COMMERCE_TOPIC_PARTITIONS".to_owned(),
            options.partitions.to_string(),
        ),
        ("COMMERCE_GROUP_PREFIX".to_owned(), group_prefix.clone()),
        (
            "PAYMENT_LIMIT".to_owned(),
            options.payment_limit.to_string(),
        ),
        // No order may expire during the run: an outcome decided by the amount alone is
        // what the checks can state exactly.
        ("ORDER_RESERVATION_TTL_MS".to_owned(), "3600000".to_owned()),
        // A SIGKILLed member keeps its partitions until its session times out.
        ("COMMERCE_SESSION_TIMEOUT_MS".to_owned(), "6000".to_owned()),
        (
            "RUST_LOG".to_owned(),
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        ),
    ];
    for service in SERVICES {
        env.push((
            format!("{}_ADDR", service.to_uppercase()),
            format!("127.0.0.1:{}", ports[service]),
        ));
    }
    let mut services = Services::new(&bin_dir, &log_dir, env, ports)?;
    for service in SERVICES {
        services.start(service).await?;
    }
    let order_url = services.url("order");
    say(format!("services up; order service at {order_url}"));

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(30))
        .build()?;
    // Stock: each SKU its share of the orders, the short ones half of it.
    let skus = run_skus(options.skus);
    let share = options.orders.div_ceil(skus.len()) as u64;
    let mut stocked = Vec::new();
    for (i, sku) in skus.iter().enumerate() {
        let units = if i < options.short_skus {
            share / 2
        } else {
            share
        };
        set_stock(&http, &order_url, sku, units).await?;
        stocked.push((sku.clone(), units));
    }

    anyhow::ensure!(
        options.rate.is_finite() && options.rate > 0.0,
        "--rate must be a positive number"
    );
    // Evenly spaced, as the load tool's open loop sends.
    let slots: Vec<Duration> = (0..options.orders)
        .map(|i| Duration::from_secs_f64(i as f64 / options.rate))
        .collect();
    let span = slots.last().copied().unwrap_or_default();
    say(format!(
        "sending {} orders at {}/s over {}; a kill every {}, seed {seed}",
        slots.len(),
        options.rate,
        ms(span),
        ms(options.kill_every)
    ));
    let answered = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut sender = tokio::spawn(send(
        http.clone(),
        format!("{order_url}/orders"),
        slots,
        skus.clone(),
        options.clone(),
        answered.clone(),
    ));

    // Two fault loops run beside the clients: the server restarts, each at its point of the
    // schedule, and the kills, one per tick, until the last order is answered and the last
    // server restart is done. Both are bounded in count (three restarts; one kill per tick)
    // and in time (the schedule plus the clients' patience).
    let sending_done = CancellationToken::new();
    let restarts_done = CancellationToken::new();
    let chaos_until = started + span + options.give_up_after;
    let clients = async {
        let sending = (&mut sender).await;
        sending_done.cancel();
        anyhow::Ok(sending??)
    };
    let restart_loop = async {
        let mut restarts = Vec::new();
        for (server, due) in RESTARTS {
            tokio::time::sleep_until(started + span.mul_f64(due)).await;
            let (at, began) = (started.elapsed(), Instant::now());
            servers.restart(server).await;
            let fault = Fault {
                at,
                what: format!("restart {server}"),
                back_in: began.elapsed(),
            };
            say(fault.line(&answered, options.orders));
            restarts.push(fault);
        }
        restarts_done.cancel();
        restarts
    };
    let kill_loop = async {
        let mut dice = Dice::new(seed);
        let mut kills = Vec::new();
        loop {
            tokio::select! {
                () = async { sending_done.cancelled().await; restarts_done.cancelled().await } => break,
                () = tokio::time::sleep(options.kill_every) => {}
            }
            if Instant::now() > chaos_until {
                say("chaos window over".to_owned());
                break;
            }
            for service in services.revive().await? {
                say(format!(
                    "{:>8} {service} had exited on its own: restarted",
                    ms(started.elapsed())
                ));
            }
            let at = started.elapsed();
            let service = dice.pick();
            services.kill(service).await?;
            let back_in = services.start(service).await?;
            let fault = Fault {
                at,
                what: format!("kill {service}"),
                back_in,
            };
            say(fault.line(&answered, options.orders));
            kills.push(fault);
        }
        anyhow::Ok(kills)
    };
    let (sending, restarts, kills) = tokio::join!(clients, restart_loop, kill_loop);
    let (sending, kills) = (sending?, kills?);
    let sent_in = sending.answered_in;
    let last_fault = Instant::now();
    say(format!(
        "all {} orders answered in {}; waiting for the system to settle (at most {})",
        sending.sent,
        ms(sent_in),
        ms(options.settle_timeout)
    ));

    let databases = Databases::new(&database_url)?;
    let groups: Vec<String> = SERVICES
        .iter()
        .map(|s| format!("{group_prefix}-{s}"))
        .collect();
    let settle_deadline = Instant::now() + options.settle_timeout;
    let mut unsettled;
    let mut last_said = Instant::now();
    loop {
        for service in services.revive().await? {
            say(format!(
                "{:>7} {service} had exited on its own: restarted",
                ms(started.elapsed())
            ));
        }
        unsettled = invariants::unsettled(&databases, &brokers, &topic, &groups).await;
        if unsettled.is_empty() || Instant::now() > settle_deadline {
            break;
        }
        if last_said.elapsed() > Duration::from_secs(10) {
            say(format!("  settling: {}", unsettled.join("; ")));
            last_said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settled = unsettled.is_empty();
    let (settled_after, settled_after_last_fault) = if settled {
        (
            Some((started + sent_in).elapsed()),
            Some(last_fault.elapsed()),
        )
    } else {
        (None, None)
    };
    say(match settled_after {
        Some(after) => format!("settled {} after the last answer; checking", ms(after)),
        None => format!(
            "NOT settled after {}: {}",
            ms(options.settle_timeout),
            unsettled.join("; ")
        ),
    });

    let checked = Checked {
        sending: &sending,
        databases: &databases,
        http: &http,
        order_url: &order_url,
        stocked: &stocked,
        short: options.short_skus.min(skus.len()),
        payment_limit: options.payment_limit,
        brokers: &brokers,
        topic: &topic,
    };
    let invariants = invariants::check(&checked).await;
    services.stop_all().await;
    let crashes = std::mem::take(&mut services.crashes);
    drop(servers);
    Ok(ChaosReport {
        orders: sending.sent,
        sending: sent_in,
        kills,
        restarts,
        crashes,
        settled_after,
        settled_after_last_fault,
        unsettled,
        invariants: invariants?,
        log_dir,
        seed,
    })
}

/// Sends one order per slot, each retried with its own `Idempotency-Key` until answered.
async fn send(
    http: reqwest::Client,
    url: String,
    slots: Vec<Duration>,
    skus: Vec<String>,
    options: ChaosOptions,
    answered: Arc<AtomicUsize>,
) -> anyhow::Result<Sending> {
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    let mut sending = Sending {
        sent: slots.len(),
        ..Sending::default()
    };
    let collect = |sending: &mut Sending, (declined, (placed, tries)): (bool, (Placed, u32))| {
        sending.tries += u64::from(tries);
        if tries > 1 {
            sending.retried += 1;
        }
        match placed {
            Placed::Answered(Some(id)) => sending.placed.push(Answered { id, declined }),
            Placed::Answered(None) => sending.left_out += 1,
            Placed::Refused(why) => sending.refused.push(why),
            Placed::GaveUp(why) => sending.gave_up.push(why),
        }
    };
    for (i, offset) in slots.iter().enumerate() {
        tokio::time::sleep_until(started + *offset).await;
        let (_, declined, body) = nth_order(i, options.decline_every, options.payment_limit, &skus);
        let (http, url, answered) = (http.clone(), url.clone(), answered.clone());
        let give_up_after = options.give_up_after;
        tasks.spawn(async move {
            let key = Uuid::new_v4().to_string();
            let outcome = place_order(&http, &url, &body, &key, give_up_after).await;
            if matches!(outcome.0, Placed::Answered(_)) {
                answered.fetch_add(1, Ordering::Relaxed);
            }
            (declined, outcome)
        });
        while let Some(done) = tasks.try_join_next() {
            collect(&mut sending, done?);
        }
    }
    while let Some(done) = tasks.join_next().await {
        collect(&mut sending, done?);
    }
    sending.answered_in = started.elapsed();
    Ok(sending)
}

impl std::fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "== chaos: {} orders, seed {}", self.orders, self.seed)?;
        writeln!(
            f,
            "sending             {} (first send to last answer)",
            ms(self.sending)
        )?;
        let mut per_service: Vec<(String, usize)> = Vec::new();
        for kill in &self.kills {
            let name = kill.what.trim_start_matches("kill ").to_owned();
            match per_service.iter_mut().find(|(s, _)| *s == name) {
                Some((_, n)) => *n += 1,
                None => per_service.push((name, 1)),
            }
        }
        let back: Vec<Duration> = self.kills.iter().map(|k| k.back_in).collect();
        writeln!(
            f,
            "kills               {} SIGKILL + restart {per_service:?}, healthy again in {} max",
            self.kills.len(),
            ms(back.iter().max().copied().unwrap_or_default())
        )?;
        for restart in &self.restarts {
            writeln!(
                f,
                "restart             {:<10} at {:>7}, back in {}",
                restart.what.trim_start_matches("restart "),
                ms(restart.at),
                ms(restart.back_in)
            )?;
        }
        let mut crashes: Vec<_> = self.crashes.iter().collect();
        crashes.sort();
        writeln!(f, "exits on their own  {crashes:?} (restarted by the tool)")?;
        match (self.settled_after, self.settled_after_last_fault) {
            (Some(after), Some(fault)) => writeln!(
                f,
                "settled             {} after the last answer, {} after the last fault",
                ms(after),
                ms(fault)
            )?,
            _ => writeln!(f, "settled             NO: {}", self.unsettled.join("; "))?,
        }
        for invariant in &self.invariants {
            let verdict = if invariant.holds() { "OK  " } else { "FAIL" };
            writeln!(f, "{verdict} {}: {}", invariant.name, invariant.figure)?;
            for violation in invariant.violations.iter().take(10) {
                writeln!(f, "       - {violation}")?;
            }
            if invariant.violations.len() > 10 {
                writeln!(f, "       … {} more", invariant.violations.len() - 10)?;
            }
        }
        writeln!(f, "service logs        {}", self.log_dir.display())?;
        writeln!(
            f,
            "result              {}",
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}
