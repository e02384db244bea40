//! Order states and the transitions between them; pure, testable without a network.

use serde::{Deserialize, Serialize};

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    /// Stock is held until `expires_at`; waiting for payment.
    OrderReserved,
    /// Paid; the hold became a sale.
    Paid,
    /// A shipment started. Terminal.
    Shipping,
    /// Payment declined; stock released. Terminal.
    OrderCanceled,
    /// Not paid in time; stock released. Terminal.
    OrderExpired,
}

impl OrderStatus {
    /// The name stored in the database and shown over HTTP.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OrderReserved => "ORDER_RESERVED",
            Self::Paid => "PAID",
            Self::Shipping => "SHIPPING",
            Self::OrderCanceled => "ORDER_CANCELED",
            Self::OrderExpired => "ORDER_EXPIRED",
        }
    }

    /// Parses a stored name.
    pub fn parse(value: &str) -> Option<Self> {
        [
            Self::OrderReserved,
            Self::Paid,
            Self::Shipping,
            Self::OrderCanceled,
            Self::OrderExpired,
        ]
        .into_iter()
        .find(|status| status.as_str() == value)
    }

    /// No transition leaves a terminal state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Shipping | Self::OrderCanceled | Self::OrderExpired
        )
    }

    /// Whether the flow allows `self → next`.
    pub fn can_become(self, next: Self) -> bool {
        use OrderStatus::*;
        matches!(
            (self, next),
            (OrderReserved, Paid)
                | (OrderReserved, OrderCanceled)
                | (OrderReserved, OrderExpired)
                | (Paid, Shipping)
        )
    }
}

impl std::fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::OrderStatus::*;
    use super::*;

    #[test]
    fn names_round_trip() {
        for status in [OrderReserved, Paid, Shipping, OrderCanceled, OrderExpired] {
            assert_eq!(OrderStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(OrderStatus::parse("NOPE"), None);
    }

    #[test]
    fn only_the_flow_transitions_are_allowed() {
        assert!(OrderReserved.can_become(Paid));
        assert!(OrderReserved.can_become(OrderCanceled));
        assert!(OrderReserved.can_become(OrderExpired));
        assert!(Paid.can_become(Shipping));
        assert!(!Paid.can_become(OrderExpired));
        assert!(!OrderExpired.can_become(Paid));
        assert!(!OrderCanceled.can_become(Paid));
        for terminal in [Shipping, OrderCanceled, OrderExpired] {
            assert!(terminal.is_terminal());
            for next in [OrderReserved, Paid, Shipping, OrderCanceled, OrderExpired] {
                assert!(!terminal.can_become(next));
            }
        }
    }
}
