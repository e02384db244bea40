//! The shipping service alone. Run with `cargo run -p commerce --bin shipping`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    commerce::run(&[commerce::Service::Shipping]).await
}
