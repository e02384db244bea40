//! One order is one trace: the four services run in this process (their own binary, since
//! it installs the global subscriber) against the real PostgreSQL, Redis and Kafka, with
//! spans collected in memory. The spans of `POST /orders`, the order's outbox record, the
//! payment handler, the shipping handler, the order service's handlers of their replies and
//! the notification share one trace id, and their parent links form one tree rooted at the
//! `POST /orders` span. The tree is printed to stdout.

use std::collections::HashMap;
use std::time::Duration;

use clap::Parser as _;
use commerce::config::Settings;
use eventful_test_support::otel::{SpanCapture, SpanData};
use eventful_test_support::{kafka, spare_port, wait_until, TestDatabase, TestRedis};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SKU: &str = "SKU-TRACE";

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn text(span: &SpanData, key: &str) -> String {
    attribute(span, key)
        .map(|v| v.as_str().into_owned())
        .unwrap_or_default()
}

/// The exported spans of one trace, by span id.
struct Trace {
    spans: HashMap<SpanId, SpanData>,
}

impl Trace {
    fn of(spans: &[SpanData], trace: TraceId) -> Self {
        Self {
            spans: spans
                .iter()
                .filter(|s| s.span_context.trace_id() == trace)
                .map(|s| (s.span_context.span_id(), s.clone()))
                .collect(),
        }
    }

    /// The handler span of `consumer` for events of `event_type` that ran the handler.
    fn handler(&self, consumer: &str, event_type: &str) -> Option<&SpanData> {
        self.spans.values().find(|s| {
            s.name == "inbox.message"
                && text(s, "consumer") == consumer
                && text(s, "event_type") == event_type
                && text(s, "outcome") != "skipped"
        })
    }

    /// Span ids from `span` up to the root.
    fn ancestors(&self, span: &SpanData) -> Vec<SpanId> {
        let mut chain = Vec::new();
        let mut parent = span.parent_span_id;
        while let Some(next) = self.spans.get(&parent) {
            chain.push(parent);
            parent = next.parent_span_id;
        }
        chain
    }

    /// Spans whose parent is not in the trace (only the root should be).
    fn roots(&self) -> Vec<&SpanData> {
        self.spans
            .values()
            .filter(|s| !self.spans.contains_key(&s.parent_span_id))
            .collect()
    }

    /// The service a span ran in: its consumer, else its parent's; the HTTP root is order's.
    fn service(&self, span: &SpanData) -> String {
        let own = text(span, "consumer");
        if !own.is_empty() {
            return own;
        }
        match self.spans.get(&span.parent_span_id) {
            Some(parent) => self.service(parent),
            None => "order".to_owned(),
        }
    }

    /// The tree, indented by parent, children in start order; deliveries a service skipped
    /// (no handler for the type) are left out and counted.
    fn render(&self, root: &SpanData) -> String {
        let mut children: HashMap<SpanId, Vec<&SpanData>> = HashMap::new();
        for span in self.spans.values() {
            children.entry(span.parent_span_id).or_default().push(span);
        }
        for list in children.values_mut() {
            list.sort_by_key(|s| s.start_time);
        }
        let mut out = String::new();
        let mut skipped = 0;
        let mut stack = vec![(root, 0usize)];
        while let Some((span, depth)) = stack.pop() {
            if text(span, "outcome") == "skipped" {
                skipped += 1;
                continue;
            }
            let mut detail = String::new();
            for key in ["event_type", "outcome", "http.response.status_code"] {
                if let Some(value) = attribute(span, key) {
                    detail.push_str(&format!(" {key}={value}"));
                }
            }
            out.push_str(&format!(
                "{:indent$}{} [service={}] span={}{detail}\n",
                "",
                span.name,
                self.service(span),
                span.span_context.span_id(),
                indent = depth * 2
            ));
            if let Some(list) = children.get(&span.span_context.span_id()) {
                for child in list.iter().rev() {
                    stack.push((child, depth + 1));
                }
            }
        }
        out.push_str(&format!(
            "({skipped} skipped deliveries hidden: events a service has no handler for)\n"
        ));
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serial_one_order_is_one_trace_from_post_orders_to_shipping() {
    let SpanCapture { exporter, provider } = SpanCapture::new();
    tracing::subscriber::set_global_default(commerce::telemetry::subscriber(Some(&provider)))
        .unwrap();

    let _ = TestRedis::connect().await;
    let brokers = kafka::brokers();
    kafka::require_broker(&brokers).await;
    let id = Uuid::new_v4().simple().to_string();
    let topic = format!("test-commerce-trace-{id}");
    kafka::create_topic_on(&brokers, &topic, 1).await;
    let order_addr = format!("127.0.0.1:{}", spare_port());
    let (admin_url, database_prefix, group, inventory) = (
        TestDatabase::admin_url(),
        format!("eventful_test_{}_", &id[..12]),
        format!("test-{id}"),
        format!("test-{id}"),
    );
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", spare_port()))
        .collect();
    let mut args = vec![
        "commerce",
        "--database-url",
        &admin_url,
        "--kafka-brokers",
        &brokers,
        "--topic",
        &topic,
        "--topic-partitions",
        "1",
        "--database-prefix",
        &database_prefix,
        "--group-prefix",
        &group,
        "--inventory",
        &inventory,
        "--order-addr",
        &order_addr,
        "--payment-addr",
        &addrs[0],
        "--shipping-addr",
        &addrs[1],
        "--notification-addr",
        &addrs[2],
    ];
    let redis_url = std::env::var("REDIS_URL").ok();
    if let Some(url) = &redis_url {
        args.extend(["--redis-url", url.as_str()]);
    }
    let settings = Settings::try_parse_from(args).unwrap();

    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    commerce::order::start(&settings, &mut tasks, &cancel)
        .await
        .unwrap();
    commerce::payment::start(&settings, &mut tasks, &cancel)
        .await
        .unwrap();
    commerce::shipping::start(&settings, &mut tasks, &cancel)
        .await
        .unwrap();
    commerce::notification::start(&settings, &mut tasks, &cancel)
        .await
        .unwrap();

    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://{order_addr}{path}");
    let stock = http
        .put(url(&format!("/stock/{SKU}")))
        .json(&serde_json::json!({ "available": 5 }))
        .send()
        .await
        .unwrap();
    assert_eq!(stock.status(), 200);
    let created = http
        .post(url("/orders"))
        .json(&serde_json::json!([{
            "userId": Uuid::new_v4(), "totalAmount": 500,
            "items": [{ "sku": SKU, "quantity": 1 }]
        }]))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let ids: Vec<Uuid> = created.json().await.unwrap();
    let order = ids[0];
    wait_until(
        &format!("order {order} is SHIPPING"),
        Duration::from_secs(60),
        || async {
            let body: serde_json::Value = http
                .get(url(&format!("/orders/{order}")))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body["status"] == "SHIPPING"
        },
    )
    .await;

    // The handlers' spans end after their transactions commit (a moment after the order
    // shows SHIPPING): wait until the whole causal chain is exported and the trace has no
    // dangling parent.
    let spans = || {
        provider.force_flush().unwrap();
        exporter.get_finished_spans().unwrap()
    };
    let post = |spans: &[SpanData]| spans.iter().find(|s| s.name == "POST /orders").cloned();
    let wanted = [
        ("payment", "ORDER_RESERVED"),
        ("order", "PAYMENT_APPROVED"),
        ("shipping", "ORDER_PAID"),
        ("order", "SHIPPING_STARTED"),
        ("notification", "SHIPPING_STARTED"),
    ];
    wait_until(
        "the order's trace is complete",
        Duration::from_secs(30),
        || {
            let spans = spans();
            let done = post(&spans).is_some_and(|root| {
                let trace = Trace::of(&spans, root.span_context.trace_id());
                wanted.iter().all(|(c, t)| trace.handler(c, t).is_some())
                    && trace.roots().len() == 1
            });
            async move { done }
        },
    )
    .await;
    cancel.cancel();
    while tasks.join_next().await.is_some() {}

    let spans = spans();
    let root = post(&spans).unwrap();
    let trace = Trace::of(&spans, root.span_context.trace_id());
    println!(
        "trace {} of order {order}:\n{}",
        root.span_context.trace_id(),
        trace.render(&root)
    );

    // One tree, rooted at POST /orders (no caller traceparent: the POST span is a root).
    assert_eq!(root.parent_span_id, SpanId::INVALID);
    let roots = trace.roots();
    assert_eq!(roots.len(), 1, "{roots:#?}");
    assert_eq!(roots[0].span_context.span_id(), root.span_context.span_id());
    // The order's outbox record is the POST's child. (The order service records again later,
    // under its PAYMENT_APPROVED handler, also a descendant of the POST: only the direct
    // child is the record this chain starts from.)
    let root_id = root.span_context.span_id();
    let record = trace
        .spans
        .values()
        .find(|s| {
            s.name == "record_all" && trace.service(s) == "order" && s.parent_span_id == root_id
        })
        .expect("the order's outbox record under POST /orders");
    // The causal chain: each hop's handler descends from the previous one.
    let handler = |c, t| trace.handler(c, t).unwrap();
    let payment = handler("payment", "ORDER_RESERVED");
    assert!(trace
        .ancestors(payment)
        .contains(&record.span_context.span_id()));
    let paid = handler("order", "PAYMENT_APPROVED");
    assert!(trace
        .ancestors(paid)
        .contains(&payment.span_context.span_id()));
    let shipping = handler("shipping", "ORDER_PAID");
    assert!(trace
        .ancestors(shipping)
        .contains(&paid.span_context.span_id()));
    for (c, t) in [
        ("order", "SHIPPING_STARTED"),
        ("notification", "SHIPPING_STARTED"),
    ] {
        assert!(
            trace
                .ancestors(handler(c, t))
                .contains(&shipping.span_context.span_id()),
            "{c} handling {t} descends from the shipping handler"
        );
    }
    // No handler of this run ran outside the order's trace (it was the only order).
    let strays: Vec<_> = spans
        .iter()
        .filter(|s| {
            s.name == "inbox.message" && s.span_context.trace_id() != root.span_context.trace_id()
        })
        .collect();
    assert!(
        strays.is_empty(),
        "handler spans outside the trace: {strays:#?}"
    );
}
