//! All four services in one process. Run with `cargo run -p commerce --bin commerce`.

use commerce::Service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    commerce::run(&[
        Service::Order,
        Service::Payment,
        Service::Shipping,
        Service::Notification,
    ])
    .await
}
