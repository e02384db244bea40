//! Chaos at scale for the commerce example. Run with
//! `cargo build --release -p commerce --bins && target/release/commerce-chaos --orders 10000`
//! (after `scripts/services install`: it starts private PostgreSQL, Redis and Kafka servers of
//! its own, so it can restart them, and never touches the shared ones).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = commerce::chaos::ChaosOptions::parse();
    let report = commerce::chaos::run(&options).await?;
    print!("{report}");
    if !report.passed() {
        std::process::exit(1);
    }
    Ok(())
}
