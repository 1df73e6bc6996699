use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::SpecError;

/// A number of nodes, absolute (`3`) or relative to a total (`25%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    Count(u32),
    Percent(u32),
}

impl Amount {
    pub fn parse(field: &str, s: &str) -> Result<Amount, SpecError> {
        let s = s.trim();
        let bad = || {
            SpecError::new(
                field,
                format!("{s:?} is not a node count or percentage (like 2 or 25%)"),
            )
        };
        if let Some(p) = s.strip_suffix('%') {
            let p: u32 = p.trim().parse().map_err(|_| bad())?;
            if p > 100 {
                return Err(SpecError::new(field, format!("{s:?} is above 100%")));
            }
            Ok(Amount::Percent(p))
        } else {
            s.parse().map(Amount::Count).map_err(|_| bad())
        }
    }

    /// Resolves against `total` rounding up: for batch sizes, where 25% of 6 is 2.
    pub fn resolve_up(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n as usize,
            Amount::Percent(p) => (total * p as usize).div_ceil(100),
        }
    }

    /// Resolves against `total` rounding down: for unavailability budgets, which
    /// must never be exceeded by rounding.
    pub fn resolve_down(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n as usize,
            Amount::Percent(p) => total * p as usize / 100,
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves() {
        assert_eq!(Amount::parse("b", "3"), Ok(Amount::Count(3)));
        assert_eq!(Amount::parse("b", "25%"), Ok(Amount::Percent(25)));
        assert_eq!(Amount::Percent(25).resolve_up(6), 2);
        assert_eq!(Amount::Percent(25).resolve_down(6), 1);
        assert_eq!(Amount::Percent(100).resolve_down(7), 7);
        assert!(Amount::parse("b", "150%")
            .unwrap_err()
            .to_string()
            .contains("above 100%"));
        assert!(Amount::parse("b", "two").is_err());
        assert!(Amount::parse("b", "-1").is_err());
    }
}
