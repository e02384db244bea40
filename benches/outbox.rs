//! Placeholder until the outbox benchmark lands.
fn main() {}
