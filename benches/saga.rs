//! Placeholder until the saga benchmark lands.
fn main() {}
