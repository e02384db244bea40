//! Placeholder until the idempotency benchmark lands.
fn main() {}
