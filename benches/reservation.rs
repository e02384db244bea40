//! Placeholder until the reservation benchmark lands.
fn main() {}
