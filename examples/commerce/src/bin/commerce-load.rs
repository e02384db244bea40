//! Load tool for a running commerce system. Run with
//! `cargo run --release -p commerce --bin commerce-load -- --orders 2000 --concurrency 32`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = commerce::load::LoadOptions::parse();
    let report = commerce::load::run(&options).await?;
    print!("{report}");
    if !report.violations.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
