//! The rules a rollout must never break, each written once and used by the
//! planner's assertions and by the property tests.

use std::collections::BTreeSet;

use crate::{Fleet, NodeState, Rollout, RolloutState};

/// Selected nodes that cannot serve now: in flight, offline or not healthy.
pub fn unavailable_count(r: &Rollout, fleet: &Fleet) -> usize {
    r.nodes
        .iter()
        .filter(|(name, n)| {
            n.state.in_flight()
                || !fleet
                    .get(*name)
                    .is_some_and(|v| v.available(&r.spec.service))
        })
        .count()
}

/// Every selected node appears in exactly one batch, and nothing else does.
pub fn planned_once<'a>(
    batches: &[Vec<String>],
    selected: impl IntoIterator<Item = &'a str>,
) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for b in batches {
        for n in b {
            if !seen.insert(n.as_str()) {
                return Err(format!("{n} is planned twice"));
            }
        }
    }
    let selected: BTreeSet<&str> = selected.into_iter().collect();
    if seen != selected {
        return Err(format!("planned {seen:?} but selected {selected:?}"));
    }
    Ok(())
}

/// No batch is larger than the batch size, and none is empty.
pub fn batches_within(batches: &[Vec<String>], size: usize) -> Result<(), String> {
    match batches.iter().position(|b| b.is_empty() || b.len() > size) {
        Some(i) => Err(format!(
            "batch {i} has {} nodes, limit {size}",
            batches[i].len()
        )),
        None => Ok(()),
    }
}

/// A step may only take nodes down while the budget allows: afterwards no
/// more are unavailable than before or than the budget, whichever is larger.
pub fn within_budget(before: usize, after: usize, budget: usize) -> Result<(), String> {
    if after > before.max(budget) {
        Err(format!(
            "{after} nodes unavailable after the step (before: {before}, budget: {budget})"
        ))
    } else {
        Ok(())
    }
}

/// Batches run in order: a node of batch `k + 1` is only started once no node
/// of batches `0..=k` is pending or in flight. `started` are the nodes a step
/// just dispatched upgrades to; `r` is the rollout that step decided.
pub fn batch_order<'a>(
    r: &Rollout,
    started: impl IntoIterator<Item = &'a str>,
) -> Result<(), String> {
    for name in started {
        let Some(batch) = r.nodes.get(name).map(|n| n.batch) else {
            return Err(format!("{name} was started but is not in the rollout"));
        };
        let open = r.nodes.iter().find(|(_, n)| {
            n.batch < batch && (n.state == NodeState::Pending || n.state.in_flight())
        });
        if let Some((other, n)) = open {
            return Err(format!(
                "{name} of batch {} started while {other} of batch {} is {}",
                batch + 1,
                n.batch + 1,
                n.state.as_str()
            ));
        }
    }
    Ok(())
}

/// A finished rollout's nodes agree with its verdict: a rolled-back rollout
/// leaves no node upgraded or in flight; a completed one leaves no node
/// pending or in flight, and no more failed nodes than `max_failures`.
pub fn settled(r: &Rollout) -> Result<(), String> {
    let bad = |allowed: &dyn Fn(NodeState) -> bool| {
        r.nodes
            .iter()
            .find(|(_, n)| !allowed(n.state))
            .map(|(name, n)| {
                format!(
                    "rollout is {} but {name} is {}",
                    r.state.as_str(),
                    n.state.as_str()
                )
            })
    };
    let problem = match r.state {
        RolloutState::RolledBack => bad(&|s| s != NodeState::Upgraded && !s.in_flight()),
        RolloutState::Completed => {
            let failed = r.count(NodeState::Failed);
            if failed > r.spec.max_failures as usize {
                Some(format!(
                    "rollout is completed with {failed} failed nodes, max_failures = {}",
                    r.spec.max_failures
                ))
            } else {
                bad(&|s| s != NodeState::Pending && !s.in_flight())
            }
        }
        _ => None,
    };
    problem.map_or(Ok(()), Err)
}

/// Nodes running the service, fleet-wide (selected or not), that serve now
/// and have no task of this rollout in flight: what `min_healthy` floors.
pub fn fleet_healthy(r: &Rollout, fleet: &Fleet) -> usize {
    fleet
        .values()
        .filter(|v| v.services.contains_key(&r.spec.service))
        .filter(|v| v.available(&r.spec.service))
        .filter(|v| !r.nodes.get(&v.name).is_some_and(|n| n.state.in_flight()))
        .count()
}

/// In-flight nodes of the rollout per value of `label` (`max_per_domain`).
pub fn in_flight_by_domain(
    r: &Rollout,
    fleet: &Fleet,
    label: &str,
) -> std::collections::BTreeMap<String, usize> {
    let mut by = std::collections::BTreeMap::new();
    for (name, _) in r.in_flight() {
        let value = fleet
            .get(name)
            .map(|v| crate::planner::label_value(v, label))
            .unwrap_or_default();
        *by.entry(value).or_default() += 1;
    }
    by
}
