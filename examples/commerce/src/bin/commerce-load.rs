//! Load tool for a running commerce system. Run with
//! `cargo run --release -p commerce --bin commerce-load -- --orders 2000 --concurrency 32`
//! (closed loop), `-- --rate 100 --duration 30s` (open loop), or
//! `-- --sweep 50,100,200 --duration 20s --csv sweep.csv --chart sweep.svg`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = commerce::load::LoadOptions::parse();
    if !commerce::load::execute(&options).await? {
        std::process::exit(1);
    }
    Ok(())
}
