//! The payment service alone. Run with `cargo run -p commerce --bin payment`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    commerce::run(&[commerce::Service::Payment]).await
}
