//! The rules a rollout must never break, each written once and used by the
//! planner's assertions and by the property tests.

use std::collections::{BTreeMap, BTreeSet};

use crate::fleet::join_by_name;
use crate::planner::label_value;
use crate::{Fleet, NodeState, Order, Rollout, RolloutState, TaskKind};

/// Selected nodes that cannot serve now: in flight, offline or not healthy.
pub fn unavailable_count(r: &Rollout, fleet: &Fleet) -> usize {
    join_by_name(fleet, &r.nodes)
        .filter(|(_, n, view)| {
            n.state.in_flight() || !view.is_some_and(|v| v.available(&r.spec.service))
        })
        .count()
}

/// The nodes `unavailable_count` counts, each with why (`node-2 offline`),
/// for messages.
pub fn unavailable_nodes(r: &Rollout, fleet: &Fleet) -> Vec<String> {
    join_by_name(fleet, &r.nodes)
        .filter_map(|(name, n, view)| {
            let why = match view {
                _ if n.state.in_flight() => "in flight",
                None => "unknown",
                Some(v) if !v.online => "offline",
                Some(v) if !v.available(&r.spec.service) => "unhealthy",
                Some(_) => return None,
            };
            Some(format!("{name} {why}"))
        })
        .collect()
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
/// leaves no node upgraded, in flight or not back ([`crate::NodeProgress::not_back`]);
/// one whose rollback failed leaves none upgraded or in flight and at least
/// one not back; a completed one leaves no node
/// pending or in flight (but converging: see [`converged_when_back`]), and no
/// more failed nodes than `max_failures`.
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
        RolloutState::RolledBack => r
            .nodes
            .iter()
            .find(|(_, n)| n.not_back())
            .map(|(name, n)| {
                format!(
                    "rollout is rolled_back but {name} is not back ({})",
                    n.state.as_str()
                )
            })
            .or_else(|| bad(&|s| s != NodeState::Upgraded && !s.in_flight())),
        RolloutState::RollbackFailed if !r.nodes.values().any(|n| n.not_back()) => {
            Some("rollout is rollback_failed but every node is back".into())
        }
        RolloutState::RollbackFailed => bad(&|s| s != NodeState::Upgraded && !s.in_flight()),
        RolloutState::Completed => {
            let failed = r.count(NodeState::Failed);
            if failed > r.spec.max_failures as usize {
                Some(format!(
                    "rollout is completed with {failed} failed nodes, max_failures = {}",
                    r.spec.max_failures
                ))
            } else {
                bad(&|s| s != NodeState::Pending && (!s.in_flight() || s == NodeState::Converging))
            }
        }
        _ => None,
    };
    problem.map_or(Ok(()), Err)
}

/// Nodes running the service, fleet-wide (selected or not), that serve now
/// and have no task of this rollout in flight: what `min_healthy` floors.
pub fn fleet_healthy(r: &Rollout, fleet: &Fleet) -> usize {
    // Serving implies running the service: one lookup of it per node.
    join_by_name(&r.nodes, fleet)
        .filter(|(_, v, _)| v.available(&r.spec.service))
        .filter(|(_, _, n)| !n.is_some_and(|n| n.state.in_flight()))
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
        let value = label_of(fleet, name, label);
        *by.entry(value.to_string()).or_default() += 1;
    }
    by
}

/// A node's value of `label` in `fleet`; nodes without it, or gone from the
/// fleet, have the empty value.
fn label_of<'f>(fleet: &'f Fleet, name: &str, label: &str) -> &'f str {
    fleet.get(name).map_or("", |v| label_value(v, label))
}

/// Where a value of the `order_by` label falls: the listed values first, in
/// their order, then the others by name.
fn domain_rank<'v>(order: &Order, value: &'v str) -> (usize, &'v str) {
    match order.values.iter().position(|v| v == value) {
        Some(i) => (i, ""),
        None => (order.values.len(), value),
    }
}

fn is_open(state: NodeState) -> bool {
    state == NodeState::Pending || state.in_flight()
}

/// `spread_by`: no more than `max_per_domain` upgrades in flight per value of
/// the label. Reverts are exempt: a rollback goes straight back, all at once.
pub fn spread_within(r: &Rollout, fleet: &Fleet) -> Result<(), String> {
    let Some(spread) = &r.spec.spread else {
        return Ok(());
    };
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, task) in r.in_flight() {
        if task.kind == TaskKind::Upgrade {
            *by.entry(label_of(fleet, name, &spread.label)).or_default() += 1;
        }
    }
    match by.iter().find(|(_, &c)| c > spread.max_per_domain as usize) {
        Some((value, c)) => Err(format!(
            "{c} upgrades in flight with {}={value:?}, max_per_domain {}",
            spread.label, spread.max_per_domain
        )),
        None => Ok(()),
    }
}

/// `min_healthy`: a step never takes the fleet below the floor. Afterwards at
/// least as many nodes are healthy fleet-wide ([`fleet_healthy`]) as the
/// floor, or as before the step if there were fewer already.
pub fn healthy_floor(before: usize, after: usize, min_healthy: usize) -> Result<(), String> {
    if after < before.min(min_healthy) {
        Err(format!(
            "{after} nodes healthy fleet-wide after the step (before: {before}, min_healthy: {min_healthy})"
        ))
    } else {
        Ok(())
    }
}

/// [`healthy_floor`] in each quorum group (`min_healthy_per`), from the
/// rollout before a step and after it, over the same fleet.
pub fn floors_kept(before: &Rollout, after: &Rollout, fleet: &Fleet) -> Result<(), String> {
    let (b, a) = (
        crate::Quorum::of(before, fleet),
        crate::Quorum::of(after, fleet),
    );
    for g in a.groups.keys() {
        healthy_floor(b.healthy(g), a.healthy(g), a.floor_of(g))
            .map_err(|e| format!("{}: {e}", a.describe(g)))?;
    }
    Ok(())
}

/// `order_by`, as planned: no batch mixes values of the label, and the values
/// come in their order (listed ones first, then the others by name). `fleet`
/// holds the labels the rollout was planned with.
pub fn domains_in_order(r: &Rollout, fleet: &Fleet) -> Result<(), String> {
    let Some(order) = &r.spec.order else {
        return Ok(());
    };
    let value = |n: &str| label_of(fleet, n, &order.label);
    for (b, batch) in r.batches.iter().enumerate() {
        if let Some(other) = batch.iter().find(|n| value(n) != value(&batch[0])) {
            return Err(format!(
                "batch {} mixes {}={:?} ({}) and {:?} ({other})",
                b + 1,
                order.label,
                value(&batch[0]),
                batch[0],
                value(other)
            ));
        }
    }
    let flat: Vec<&String> = r.batches.iter().flatten().collect();
    for pair in flat.windows(2) {
        let (a, b) = (value(pair[0]), value(pair[1]));
        if domain_rank(order, a) > domain_rank(order, b) {
            return Err(format!(
                "{} ({}={a:?}) is planned before {} ({}={b:?})",
                pair[1], order.label, pair[0], order.label
            ));
        }
    }
    Ok(())
}

/// `order_by`, as run: a node is started only once no node of an earlier
/// value of the label is pending or in flight. `started` are the nodes a step
/// just dispatched upgrades to; `r` is the rollout that step decided.
pub fn domain_order<'a>(
    r: &Rollout,
    fleet: &Fleet,
    started: impl IntoIterator<Item = &'a str>,
) -> Result<(), String> {
    let Some(order) = &r.spec.order else {
        return Ok(());
    };
    let rank = |n: &str| domain_rank(order, label_of(fleet, n, &order.label));
    let Some(last) = started.into_iter().max_by_key(|n| rank(n)) else {
        return Ok(());
    };
    let first_open = r
        .nodes
        .iter()
        .filter(|(_, n)| is_open(n.state))
        .min_by_key(|(name, _)| rank(name));
    match first_open {
        Some((other, n)) if rank(other) < rank(last) => Err(format!(
            "{last} ({}={:?}) started while {other} ({}={:?}) is {}",
            order.label,
            label_of(fleet, last, &order.label),
            order.label,
            label_of(fleet, other, &order.label),
            n.state.as_str()
        )),
        _ => Ok(()),
    }
}

/// Canary pauses: no node of a wave after a pause starts before that pause's
/// wave is promoted. `started` are the nodes a step just dispatched upgrades
/// to; `r` is the rollout that step decided.
pub fn promotion_respected<'a>(
    r: &Rollout,
    started: impl IntoIterator<Item = &'a str>,
) -> Result<(), String> {
    for name in started {
        let Some(batch) = r.nodes.get(name).map(|n| n.batch) else {
            return Err(format!("{name} was started but is not in the rollout"));
        };
        let held = (0..batch).find(|&w| r.pauses.get(w) == Some(&true) && !r.promoted.contains(&w));
        if let Some(w) = held {
            return Err(format!(
                "{name} of wave {} started before wave {} was promoted",
                batch + 1,
                w + 1
            ));
        }
    }
    Ok(())
}

/// Where batches end, as planned. Rolling: every `batch` nodes within each
/// `order_by` domain, and at each domain's end. Canary: at each wave's
/// cumulative size (rounded up, at least 1, at most every node) and at each
/// domain's end, nowhere else. Pauses only after a wave marked `pause`, never
/// after the last batch. `fleet` holds the labels the rollout was planned with.
pub fn batch_cuts(r: &Rollout, fleet: &Fleet) -> Result<(), String> {
    if let Some(b) = r.batches.iter().position(Vec::is_empty) {
        return Err(format!("batch {} is empty", b + 1));
    }
    if r.pauses.len() != r.batches.len() {
        return Err(format!(
            "{} pauses for {} batches",
            r.pauses.len(),
            r.batches.len()
        ));
    }
    let flat: Vec<&String> = r.batches.iter().flatten().collect();
    let total = flat.len();
    let mut domain_ends = BTreeSet::from([total]);
    if let Some(order) = &r.spec.order {
        for i in 1..total {
            if label_of(fleet, flat[i - 1], &order.label) != label_of(fleet, flat[i], &order.label)
            {
                domain_ends.insert(i);
            }
        }
    }
    let mut want_cuts = BTreeSet::new();
    let mut want_pauses = BTreeSet::new();
    if r.spec.waves.is_empty() {
        let size = r.spec.batch_size(total);
        let mut start = 0;
        for &end in &domain_ends {
            want_cuts.extend((start..end).step_by(size).skip(1));
            want_cuts.insert(end);
            start = end;
        }
    } else {
        want_cuts.clone_from(&domain_ends);
        for w in &r.spec.waves {
            let end = w.size.resolve_up(total).clamp(1, total);
            want_cuts.insert(end);
            if w.pause && end < total {
                want_pauses.insert(end);
            }
        }
    }
    let mut cuts = BTreeSet::new();
    let mut pauses = BTreeSet::new();
    let mut at = 0;
    for (b, batch) in r.batches.iter().enumerate() {
        at += batch.len();
        cuts.insert(at);
        if r.pauses[b] {
            pauses.insert(at);
        }
    }
    if cuts != want_cuts {
        return Err(format!(
            "batches end after {cuts:?} nodes, expected {want_cuts:?}"
        ));
    }
    if pauses != want_pauses {
        return Err(format!(
            "pauses after {pauses:?} nodes, expected {want_pauses:?}"
        ));
    }
    Ok(())
}

/// All at once, the switch: upgrades go out in one step, to every node of the
/// rollout, and only once every node has staged the release (none pending,
/// staging, failed or unreachable, whether online or not); and they leave at
/// least `min_healthy` nodes healthy outside the selection. `before` is the
/// rollout as the step found it, `after` as it decided it; `started` are the
/// nodes the step dispatched upgrades to. Other rollouts pass.
pub fn switched_together<'a>(
    before: &Rollout,
    after: &Rollout,
    fleet: &Fleet,
    started: impl IntoIterator<Item = &'a str>,
) -> Result<(), String> {
    let started: BTreeSet<&str> = started.into_iter().collect();
    if !after.spec.all_at_once || started.is_empty() {
        return Ok(());
    }
    if let Some((name, n)) = before
        .nodes
        .iter()
        .find(|(_, n)| n.state != NodeState::Staged)
    {
        return Err(format!(
            "all_at_once switched while {name} was {}",
            n.state.as_str()
        ));
    }
    if let Some(name) = started.iter().find(|n| !after.nodes.contains_key(**n)) {
        return Err(format!("{name} was switched but is not in the rollout"));
    }
    if let Some(name) = after.nodes.keys().find(|n| !started.contains(n.as_str())) {
        return Err(format!(
            "all_at_once switched {} of {} nodes, not {name}",
            started.len(),
            after.nodes.len()
        ));
    }
    let mut times = BTreeSet::new();
    for (name, n) in &after.nodes {
        match &n.task {
            Some(t) if n.state == NodeState::Upgrading && t.kind == TaskKind::Upgrade => {
                times.insert(t.started_at);
            }
            _ => {
                return Err(format!(
                    "{name} is {} after the switch, not upgrading",
                    n.state.as_str()
                ))
            }
        }
    }
    if times.len() > 1 {
        return Err(format!(
            "all_at_once switch started at {} different times",
            times.len()
        ));
    }
    let short = crate::quorum::short_outside(after, fleet);
    if !short.is_empty() {
        return Err(format!("all_at_once switched leaving {}", short.join("; ")));
    }
    Ok(())
}

/// All at once, as run: once a step decided a running rollout, no pending
/// node is online (each was sent its stage task), and the nodes are not all
/// staged unless fewer than `min_healthy` nodes serve outside the selection
/// (the switch goes out as soon as the last one has staged). Other rollouts
/// pass.
pub fn staged_then_switched(r: &Rollout, fleet: &Fleet) -> Result<(), String> {
    // A dry run comes first: see `dry_run_first`.
    let dry_running = r.spec.dry_run && !r.dry_run_done;
    if !r.spec.all_at_once || r.state != RolloutState::Running || dry_running {
        return Ok(());
    }
    let online = |name: &str| fleet.get(name).is_some_and(|v| v.online);
    if let Some((name, _)) = r
        .nodes
        .iter()
        .find(|(name, n)| n.state == NodeState::Pending && online(name))
    {
        return Err(format!("{name} is online but still pending, not staging"));
    }
    if r.nodes.values().all(|n| n.state == NodeState::Staged)
        && crate::quorum::short_outside(r, fleet).is_empty()
    {
        return Err(
            "every node is staged but not switched, and no quorum floor holds the switch".into(),
        );
    }
    Ok(())
}

/// All at once, while running: a step never leaves a node failed or
/// unreachable in a running rollout, since any such node sends every node
/// back (the rollout goes `RollingBack` in that step). Other rollouts pass.
pub fn fails_as_one(r: &Rollout) -> Result<(), String> {
    if !r.spec.all_at_once || r.state != RolloutState::Running {
        return Ok(());
    }
    match r
        .nodes
        .iter()
        .find(|(_, n)| matches!(n.state, NodeState::Failed | NodeState::Unreachable))
    {
        Some((name, n)) => Err(format!(
            "all_at_once rollout still running with {name} {}",
            n.state.as_str()
        )),
        None => Ok(()),
    }
}

/// A release's dry run comes before any change: until it has passed, every
/// node waits (pending) or runs the dry run, and at most one does.
pub fn dry_run_first(r: &Rollout) -> Result<(), String> {
    if !r.spec.dry_run || r.dry_run_done {
        return Ok(());
    }
    if let Some((name, n)) = r
        .nodes
        .iter()
        .find(|(_, n)| !matches!(n.state, NodeState::Pending | NodeState::DryRunning))
    {
        return Err(format!(
            "{name} is {} before the dry run passed",
            n.state.as_str()
        ));
    }
    let running = r.count(NodeState::DryRunning);
    if running > 1 {
        return Err(format!("{running} nodes run the dry run at once"));
    }
    Ok(())
}

/// All at once, at the end: once the rollout is terminal with nothing in
/// flight, either every node is upgraded or none is, leaving aside nodes whose
/// revert failed or whose outcome is unknown (unreachable). A completed one
/// has every node upgraded. Other rollouts pass.
pub fn all_or_nothing(r: &Rollout) -> Result<(), String> {
    if !r.spec.all_at_once || !r.state.is_terminal() || r.in_flight().next().is_some() {
        return Ok(());
    }
    if r.state == RolloutState::Completed {
        if let Some((name, n)) = r.nodes.iter().find(|(_, n)| n.state != NodeState::Upgraded) {
            return Err(format!(
                "all_at_once rollout completed with {name} {}",
                n.state.as_str()
            ));
        }
        return Ok(());
    }
    let counted = r
        .nodes
        .iter()
        .filter(|(_, n)| !matches!(n.state, NodeState::RollbackFailed | NodeState::Unreachable));
    let up = counted
        .clone()
        .find(|(_, n)| n.state == NodeState::Upgraded);
    let other = counted
        .clone()
        .find(|(_, n)| n.state != NodeState::Upgraded);
    match (up, other) {
        (Some((u, _)), Some((o, n))) => Err(format!(
            "all_at_once rollout {} with {u} upgraded but {o} {}",
            r.state.as_str(),
            n.state.as_str()
        )),
        _ => Ok(()),
    }
}

/// Convergence: once a step decided it, a completed rollout that converges
/// leaves no node unreachable that it could bring to its version. Each
/// unreachable node is offline, or online on another version, serving, and
/// held back by the budget (`unavailable_count` at `unavailable_budget`) or
/// the `min_healthy` floor (`fleet_healthy` at or below it). One already on
/// the target version is upgraded at once; one already down converges
/// whatever the budget. Other rollouts pass.
pub fn converged_when_back(r: &Rollout, fleet: &Fleet) -> Result<(), String> {
    if !r.converging() {
        return Ok(());
    }
    let budget = r.spec.unavailable_budget(r.nodes.len());
    let unavailable = unavailable_count(r, fleet);
    let quorum = crate::Quorum::of(r, fleet);
    for (name, n, view) in join_by_name(fleet, &r.nodes) {
        let Some(v) = view.filter(|v| v.online) else {
            continue;
        };
        if n.state != NodeState::Unreachable {
            continue;
        }
        let version = v
            .services
            .get(&r.spec.service)
            .and_then(|s| s.version.as_deref());
        if version == Some(r.spec.version.as_str()) {
            return Err(format!(
                "{name} is back on {} but still unreachable",
                r.spec.version
            ));
        }
        if !v.available(&r.spec.service) {
            return Err(format!("{name} is back, down already, but not converging"));
        }
        let group = quorum.group_of(v);
        if unavailable < budget && !quorum.holds(group) {
            return Err(format!(
                "{name} is back but not converging: {unavailable} of at most {budget} nodes unavailable, {} healthy {}, min_healthy {}",
                quorum.healthy(group),
                quorum.describe(group),
                quorum.describe_floor(group)
            ));
        }
    }
    Ok(())
}
