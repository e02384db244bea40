//! The notification service alone. Run with `cargo run -p commerce --bin notification`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    commerce::run(&[commerce::Service::Notification]).await
}
