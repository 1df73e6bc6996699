//! Quorum floors: how many nodes of a service must stay healthy, fleet-wide
//! or within each group of nodes that share a label's value (one raft
//! cluster of several under one service name), like one Kubernetes
//! PodDisruptionBudget per group.

use std::collections::BTreeMap;
use std::fmt;

use crate::fleet::join_by_name;
use crate::planner::label_value;
use crate::{CountOrText, Fleet, NodeView, Rollout, SpecError};
use serde::{Deserialize, Serialize};

/// `min_healthy`: a node count, a percentage of the group's members, or a
/// majority of them. Stored as the number for a count (what rollouts
/// stored before percentages existed) and as text otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    Count(u32),
    /// Rounded up, as a PodDisruptionBudget's `minAvailable` is.
    Percent(u32),
    /// More than half of the members: what a raft cluster needs to commit.
    Majority,
}

impl Default for Floor {
    fn default() -> Floor {
        Floor::NONE
    }
}

impl Floor {
    pub const NONE: Floor = Floor::Count(0);

    pub fn parse(field: &str, v: &CountOrText) -> Result<Floor, SpecError> {
        let bad = |s: &str| {
            SpecError::new(
                field,
                format!("{s:?} is not a node count, a percentage or \"majority\" (like 2, \"60%\" or \"majority\")"),
            )
        };
        match v {
            CountOrText::Count(n) => u32::try_from(*n)
                .map(Floor::Count)
                .map_err(|_| bad(&n.to_string())),
            CountOrText::Text(t) => {
                let s = t.trim();
                if s.eq_ignore_ascii_case("majority") {
                    return Ok(Floor::Majority);
                }
                if let Some(p) = s.strip_suffix('%') {
                    let p: u32 = p.trim().parse().map_err(|_| bad(s))?;
                    if p > 100 {
                        return Err(SpecError::new(field, format!("{s:?} is above 100%")));
                    }
                    return Ok(Floor::Percent(p));
                }
                s.parse().map(Floor::Count).map_err(|_| bad(s))
            }
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Floor::Count(0) | Floor::Percent(0))
    }

    /// The healthy nodes that must remain of a group of `members` nodes.
    pub fn of(self, members: usize) -> usize {
        match self {
            Floor::Count(n) => n as usize,
            Floor::Percent(p) => (members * p as usize).div_ceil(100),
            Floor::Majority => members / 2 + 1,
        }
    }
}

impl fmt::Display for Floor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Floor::Count(n) => write!(f, "{n}"),
            Floor::Percent(p) => write!(f, "{p}%"),
            Floor::Majority => f.write_str("majority"),
        }
    }
}

impl Serialize for Floor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Floor::Count(n) => s.serialize_u32(*n),
            other => s.collect_str(other),
        }
    }
}

impl<'de> Deserialize<'de> for Floor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = CountOrText::deserialize(d)?;
        Floor::parse("min_healthy", &v).map_err(serde::de::Error::custom)
    }
}

/// The members and healthy nodes of one group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCount {
    /// Nodes that run the service, whatever their health: the group's size.
    pub members: usize,
    /// Nodes serving now with no task of this rollout in flight.
    pub healthy: usize,
}

/// A rollout's floor applied to the fleet: each group's counts, kept up to
/// date by the planner as a step takes nodes down.
#[derive(Debug, Clone)]
pub struct Quorum {
    pub floor: Floor,
    /// The label whose values are the groups; none: one fleet-wide group.
    pub per: Option<String>,
    pub groups: BTreeMap<String, GroupCount>,
}

impl Quorum {
    /// Counts the fleet for `r`. One pass over the fleet, as the fleet-wide
    /// count always was; only rollouts with a floor pay for it.
    pub fn of(r: &Rollout, fleet: &Fleet) -> Quorum {
        let mut q = Quorum {
            floor: r.spec.min_healthy,
            per: r.spec.min_healthy_per.clone(),
            groups: BTreeMap::new(),
        };
        if r.spec.min_healthy.is_none() {
            return q;
        }
        let service = &r.spec.service;
        for (_, v, n) in join_by_name(&r.nodes, fleet) {
            if !v.services.contains_key(service) {
                continue;
            }
            let g = q.groups.entry(q.group_of(v).to_string()).or_default();
            g.members += 1;
            if v.available(service) && !n.is_some_and(|n| n.state.in_flight()) {
                g.healthy += 1;
            }
        }
        q
    }

    /// The group `v` is in.
    pub fn group_of<'v>(&self, v: &'v NodeView) -> &'v str {
        match &self.per {
            Some(label) => label_value(v, label),
            None => "",
        }
    }

    /// The healthy nodes group `g` must keep.
    pub fn floor_of(&self, g: &str) -> usize {
        self.floor.of(self.groups.get(g).map_or(0, |c| c.members))
    }

    pub fn healthy(&self, g: &str) -> usize {
        self.groups.get(g).map_or(0, |c| c.healthy)
    }

    /// Whether taking one more healthy node of `g` down would break the floor.
    pub fn holds(&self, g: &str) -> bool {
        !self.floor.is_none() && self.healthy(g) <= self.floor_of(g)
    }

    /// Counts a healthy node of `g` as taken down.
    pub fn take(&mut self, g: &str) {
        if let Some(c) = self.groups.get_mut(g) {
            c.healthy = c.healthy.saturating_sub(1);
        }
    }

    /// "cluster=etcd-a", or "fleet-wide" without groups.
    pub fn describe(&self, g: &str) -> String {
        describe_group(self.per.as_deref(), g)
    }

    /// The floor of group `g` as set and, unless a count, as resolved:
    /// "2", "majority (2 of 3)".
    pub fn describe_floor(&self, g: &str) -> String {
        let members = self.groups.get(g).map_or(0, |c| c.members);
        match self.floor {
            Floor::Count(n) => format!("{n}"),
            f => format!("{f} ({} of {members})", f.of(members)),
        }
    }
}

/// All at once: the groups the switch would take below the floor, said for
/// people. A group counts when the rollout takes a healthy node from it and
/// the healthy nodes outside the rollout there are fewer than its floor; a
/// group whose selected nodes are all down already loses nothing (a fresh
/// install). One pass over the fleet.
pub fn short_outside(r: &Rollout, fleet: &Fleet) -> Vec<String> {
    if r.spec.min_healthy.is_none() {
        return Vec::new();
    }
    let q = Quorum {
        floor: r.spec.min_healthy,
        per: r.spec.min_healthy_per.clone(),
        groups: BTreeMap::new(),
    };
    let service = &r.spec.service;
    // Per group: members, healthy outside, whether a healthy node is inside.
    let mut groups: BTreeMap<&str, (usize, usize, bool)> = BTreeMap::new();
    for (_, v, n) in join_by_name(&r.nodes, fleet) {
        if !v.services.contains_key(service) {
            continue;
        }
        let g = groups.entry(q.group_of(v)).or_default();
        g.0 += 1;
        match (v.available(service), n.is_some()) {
            (true, true) => g.2 = true,
            (true, false) => g.1 += 1,
            (false, _) => {}
        }
    }
    groups
        .into_iter()
        .filter(|(_, (members, outside, inside))| *inside && *outside < q.floor.of(*members))
        .map(|(g, (members, outside, _))| {
            let floor = match q.floor {
                Floor::Count(n) => format!("{n}"),
                f => format!("{f} ({} of {members})", f.of(members)),
            };
            match &q.per {
                None => format!("{outside} healthy nodes of {service} outside the rollout and min_healthy is {floor}"),
                Some(_) => format!(
                    "{outside} healthy nodes outside the rollout in {} and min_healthy is {floor}",
                    describe_group(q.per.as_deref(), g)
                ),
            }
        })
        .collect()
}

/// A group's name for people: `cluster=etcd-a`, `without cluster`, or
/// `fleet-wide`.
pub fn describe_group(per: Option<&str>, g: &str) -> String {
    match per {
        None => "fleet-wide".into(),
        Some(label) if g.is_empty() => format!("without label {label}"),
        Some(label) => format!("{label}={g}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: CountOrText) -> Result<Floor, SpecError> {
        Floor::parse("strategy.min_healthy", &v)
    }

    #[test]
    fn floors_parse_and_resolve() {
        assert_eq!(parse(CountOrText::Count(2)), Ok(Floor::Count(2)));
        assert_eq!(parse("60%".into()), Ok(Floor::Percent(60)));
        assert_eq!(parse("Majority".into()), Ok(Floor::Majority));
        assert_eq!(parse("3".into()), Ok(Floor::Count(3)));
        for bad in ["most", "120%", "-1", ""] {
            let e = parse(bad.into()).unwrap_err();
            assert_eq!(e.field, "strategy.min_healthy", "{bad}");
        }
        assert!(parse("most".into())
            .unwrap_err()
            .to_string()
            .contains("\"majority\""));
        assert!(parse(CountOrText::Count(-2)).is_err());
        assert_eq!(Floor::Majority.of(3), 2);
        assert_eq!(Floor::Majority.of(5), 3);
        assert_eq!(Floor::Majority.of(4), 3);
        assert_eq!(Floor::Percent(50).of(3), 2);
        assert_eq!(Floor::Count(2).of(9), 2);
        assert!(Floor::NONE.is_none() && Floor::Percent(0).is_none());
    }

    #[test]
    fn a_count_is_stored_as_the_number_it_always_was() {
        assert_eq!(serde_json::to_string(&Floor::Count(2)).unwrap(), "2");
        assert_eq!(
            serde_json::to_string(&Floor::Majority).unwrap(),
            "\"majority\""
        );
        let old: Floor = serde_json::from_str("3").unwrap();
        assert_eq!(old, Floor::Count(3));
        let pct: Floor = serde_json::from_str("\"40%\"").unwrap();
        assert_eq!(pct, Floor::Percent(40));
    }
}
