//! Chaos at scale, shortened: 1,000 orders (25 per second, so about 40 s of sending) through the four services as separate processes
//! on private PostgreSQL, Redis and Kafka servers, a random service SIGKILLed and restarted
//! every 3 s, and Kafka, Redis and PostgreSQL each restarted once while the orders flow.
//! Every invariant `commerce-chaos` checks must hold, and the system must settle.

use std::path::Path;

use clap::Parser;
use commerce::chaos::{run, ChaosOptions};

#[tokio::test(flavor = "multi_thread")]
async fn serial_chaos_1000_orders_keeps_every_invariant() {
    eventful_test_support::init_tracing();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_order"))
        .parent()
        .unwrap()
        .display()
        .to_string();
    let options = ChaosOptions::parse_from([
        "commerce-chaos",
        "--orders",
        "1000",
        "--rate",
        "25",
        "--kill-every",
        "3s",
        "--bin-dir",
        &bin_dir,
    ]);
    let report = run(&options).await.unwrap();
    eprintln!("{report}");

    // The faults happened: kills while the orders flowed, each server restarted once.
    // At least one round of the bag: every service killed once, the order service included.
    assert!(report.kills.len() >= 4, "{} kills", report.kills.len());
    let restarted: Vec<&str> = report.restarts.iter().map(|r| r.what.as_str()).collect();
    assert_eq!(
        restarted,
        ["restart Kafka", "restart Redis", "restart PostgreSQL"]
    );
    assert!(
        report.settled_after.is_some(),
        "not settled: {:?}",
        report.unsettled
    );
    assert_eq!(report.invariants.len(), 10);
    for invariant in &report.invariants {
        assert!(
            invariant.holds(),
            "{}: {} — {:?}",
            invariant.name,
            invariant.figure,
            invariant.violations
        );
    }
}
