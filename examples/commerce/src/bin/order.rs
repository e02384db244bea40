//! The order service alone. Run with `cargo run -p commerce --bin order`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    commerce::run(&[commerce::Service::Order]).await
}
