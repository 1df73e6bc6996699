//! The planner: given a rollout, the fleet as observed and the time, decide
//! what happens next. See `crates/core/PLANNER.md` for the rules.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;

use crate::analysis;
use crate::fleet::join_by_name;
use crate::invariants::{self, unavailable_count};
use crate::{
    describe_group, format_duration, Fleet, Health, NodeProgress, NodeState, NodeView, Quorum,
    Rollout, RolloutSpec, RolloutState, SpecError, TaskKind, TaskOutcome, TaskRef, Timestamp,
};

/// A task to send to a node's agent, persisted before it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub node: String,
    pub task: TaskRef,
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub rollout: Rollout,
    pub dispatch: Vec<Dispatch>,
    /// Stage tasks: nodes to download and verify the release ahead of their
    /// turn, so that a wave's time is the switch and the health gate.
    pub stage: Vec<Dispatch>,
    /// When `step` should run again even if nothing is observed to change.
    pub next_wakeup: Option<Timestamp>,
    pub changed: bool,
}

/// Creates a rollout: selects the nodes that run the service and match the
/// selector, and splits them into batches.
pub fn plan_batches(
    id: u64,
    spec: RolloutSpec,
    fleet: &Fleet,
    now: Timestamp,
) -> Result<Rollout, SpecError> {
    let runs: Vec<_> = fleet
        .values()
        .filter(|n| n.services.contains_key(&spec.service))
        .collect();
    if runs.is_empty() {
        return Err(SpecError::new(
            "service",
            format!("no node runs service {:?}", spec.service),
        ));
    }
    let wanted: BTreeSet<&str> = spec.nodes.iter().map(String::as_str).collect();
    if !spec.nodes.is_empty() {
        let running: BTreeSet<&str> = runs.iter().map(|v| v.name.as_str()).collect();
        let unknown: Vec<&str> = spec
            .nodes
            .iter()
            .map(String::as_str)
            .filter(|n| !running.contains(n))
            .collect();
        if !unknown.is_empty() {
            return Err(SpecError::new(
                "nodes",
                format!(
                    "{} {} not run service {}",
                    unknown.join(", "),
                    if unknown.len() == 1 { "does" } else { "do" },
                    spec.service
                ),
            ));
        }
    }
    let (selected, left_out): (Vec<_>, Vec<_>) = runs.into_iter().partition(|n| {
        spec.selector.matches(&n.labels) && (wanted.is_empty() || wanted.contains(n.name.as_str()))
    });
    if selected.is_empty() {
        let what = if spec.nodes.is_empty() {
            format!("{:?}", spec.selector.to_string())
        } else {
            format!(
                "{:?} with nodes {:?}",
                spec.selector.to_string(),
                spec.nodes
            )
        };
        return Err(SpecError::new(
            "selector",
            format!(
                "{what} matches none of the {} nodes running {}",
                left_out.len(),
                spec.service
            ),
        ));
    }
    if let Some(spread) = &spec.spread {
        if !selected
            .iter()
            .any(|n| n.labels.contains_key(&spread.label))
        {
            return Err(SpecError::new(
                "strategy.spread_by",
                format!(
                    "none of the {} selected nodes has label {:?}: there is nothing to spread over (`rollwave nodes` shows their labels)",
                    selected.len(),
                    spread.label
                ),
            ));
        }
    }
    check_floor(&spec, &selected, &left_out)?;
    check_leader_last(&spec, &selected)?;
    let bootstrap = bootstrap(&spec, &selected, &left_out)?;
    let ordered = order_nodes(&spec, &selected);
    let (waves, pauses) = match &bootstrap {
        Some(_) => (vec![ordered.concat()], vec![false]),
        None => cut(&spec, &ordered),
    };
    let batches: Vec<Vec<String>> = waves
        .iter()
        .map(|w| w.iter().map(|&i| selected[i].name.clone()).collect())
        .collect();
    let mut batch_of = vec![0; selected.len()];
    for (b, wave) in waves.iter().enumerate() {
        for &i in wave {
            batch_of[i] = b;
        }
    }
    // `selected` is in the fleet's order, by name: the map is built from it
    // in one pass rather than by a search and an insertion per node.
    let nodes: BTreeMap<String, NodeProgress> = selected
        .iter()
        .zip(batch_of)
        .map(|(n, b)| {
            let from_version = n
                .services
                .get(&spec.service)
                .and_then(|s| s.version.clone());
            let progress = NodeProgress {
                batch: b,
                from_version,
                state: NodeState::Pending,
                task: None,
                phase: None,
                reason: None,
                waiting_since: None,
                stage_sent: false,
                converged: false,
                leader: false,
                updated_at: now,
            };
            (n.name.clone(), progress)
        })
        .collect();
    let mut rollout = Rollout {
        id,
        generation: 0,
        spec,
        state: RolloutState::Running,
        reason: None,
        waiting: None,
        created_at: now,
        updated_at: now,
        finished_at: None,
        last_progress_at: now,
        batches,
        pauses,
        promoted: Vec::new(),
        nodes,
        left_out: left_out.iter().map(|n| n.name.clone()).collect(),
        events: Vec::new(),
        after: Vec::new(),
        dependencies_done: false,
        superseded_by: None,
        finalized: None,
        pre_rollout_done: false,
        end_hooks_done: false,
        dry_run_done: false,
        rollback_batch: None,
        analysis: Vec::new(),
    };
    let down: Vec<String> = selected
        .iter()
        .filter(|n| !n.available(&rollout.spec.service))
        .map(|n| describe_down(n, &rollout.spec.service))
        .collect();
    let on_target = |n: &&NodeView| {
        n.services
            .get(&rollout.spec.service)
            .is_some_and(|s| s.version.as_deref() == Some(rollout.spec.version.as_str()))
    };
    if selected.iter().all(on_target) {
        // Nothing to switch: said so, rather than a task per node that
        // changes nothing and a count of nodes "upgraded".
        let reason = format!(
            "already on {}: {} it, nothing switched",
            rollout.spec.version,
            if selected.len() == 1 {
                "the selected node runs".to_string()
            } else {
                format!("all {} selected nodes run", selected.len())
            },
        );
        rollout.nodes.clear();
        rollout.batches.clear();
        rollout.pauses.clear();
        // No hook runs and no dry run either: nothing happens.
        rollout.pre_rollout_done = true;
        rollout.dry_run_done = true;
        rollout.end_hooks_done = true;
        rollout.event(now, None, reason.clone());
        rollout.set_state(RolloutState::Completed, Some(reason), now);
        return Ok(rollout);
    }
    rollout.event(
        now,
        None,
        format!(
            "rollout of {}@{} over {} in {}",
            rollout.spec.service,
            rollout.spec.version,
            crate::count(selected.len(), "node"),
            crate::count(rollout.batches.len(), "wave")
        ),
    );
    if let Some(why) = bootstrap {
        rollout.event(now, None, why);
    }
    if rollout.spec.dry_run {
        rollout.event(
            now,
            None,
            "the release declares a dry run: it runs first, on one node, against a copy of that node's data".into(),
        );
    }
    if !down.is_empty() {
        // Offline nodes cannot be switched back into service: if they spend
        // the whole budget, nothing healthy may start until one returns.
        let offline = selected.iter().filter(|n| !n.online).count();
        let budget = rollout.spec.unavailable_budget(selected.len());
        let blocked = if offline >= budget && offline < selected.len() {
            format!(
                "; {offline} offline {} all of max_unavailable {budget}: \
                 no healthy node can start until one returns, or progress_deadline ({}) fails the rollout",
                if offline == 1 { "node spends" } else { "nodes spend" },
                format_duration(rollout.spec.progress_deadline)
            )
        } else {
            String::new()
        };
        rollout.event(
            now,
            None,
            format!(
                "already unavailable before the rollout, counted against max_unavailable: {}{blocked}",
                down.join(", ")
            ),
        );
    }
    debug_assert_eq!(
        invariants::planned_once(&rollout.batches, selected.iter().map(|n| n.name.as_str())),
        Ok(())
    );
    Ok(rollout)
}

/// The rollout order: one `order_by` domain after another; within each,
/// nodes already down first (switching them costs no availability), then
/// healthy ones, offline ones last (time to come back); within each of those,
/// alternating between `spread_by` domains, so each batch spans as many as it can.
/// The nodes are given as positions in `selected`.
fn order_nodes(spec: &RolloutSpec, selected: &[&NodeView]) -> Vec<Vec<usize>> {
    let groups: Vec<Vec<usize>> = match &spec.order {
        None => vec![(0..selected.len()).collect()],
        Some(o) => {
            let mut by: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
            for (i, n) in selected.iter().enumerate() {
                by.entry(label_value(n, &o.label)).or_default().push(i);
            }
            let mut out: Vec<Vec<usize>> = o
                .values
                .iter()
                .filter_map(|v| by.remove(v.as_str()))
                .collect();
            out.extend(by.into_values());
            out
        }
    };
    let rank = |n: &NodeView| match (n.online, n.available(&spec.service)) {
        (true, false) => 0,
        (true, true) => 1,
        (false, _) => 2,
    };
    groups
        .into_iter()
        .map(|g| {
            // Sorting each class by name, rather than the group by class and
            // name, ranks every node once; the fleet's name order also makes
            // the sorts a single pass.
            let mut classes: [Vec<usize>; 3] = Default::default();
            for i in g {
                classes[rank(selected[i])].push(i);
            }
            for class in &mut classes {
                class.sort_by(|&a, &b| selected[a].name.cmp(&selected[b].name));
            }
            let mut order: Vec<usize> = match &spec.spread {
                None => classes.concat(),
                Some(spread) => classes
                    .into_iter()
                    .flat_map(|class| interleave(class, selected, &spread.label))
                    .collect(),
            };
            if spec.leader_last {
                // As leadership stands now; `leaders_last` moves a node that
                // leads when its turn comes.
                let (leaders, others): (Vec<usize>, Vec<usize>) = order
                    .into_iter()
                    .partition(|&i| is_leader(selected[i], &spec.service));
                order = others;
                order.extend(leaders);
            }
            order
        })
        .collect()
}

/// The role word that makes a node go last with `order = "leader_last"`.
pub const LEADER: &str = "leader";

fn is_leader(v: &NodeView, service: &str) -> bool {
    v.services
        .get(service)
        .is_some_and(|s| s.role.as_deref() == Some(LEADER))
}

/// The group a node's quorum floor and leadership are counted in.
fn quorum_group<'v>(spec: &RolloutSpec, v: &'v NodeView) -> &'v str {
    spec.min_healthy_per
        .as_deref()
        .map_or("", |label| label_value(v, label))
}

/// Refuses a floor that could never let a healthy node go, in any group
/// the rollout takes healthy nodes from.
fn check_floor(
    spec: &RolloutSpec,
    selected: &[&NodeView],
    left_out: &[&NodeView],
) -> Result<(), SpecError> {
    if spec.min_healthy.is_none() {
        return Ok(());
    }
    if let Some(label) = &spec.min_healthy_per {
        if !selected.iter().any(|n| n.labels.contains_key(label)) {
            return Err(SpecError::new(
                "strategy.min_healthy_per",
                format!(
                    "none of the {} selected nodes has label {label:?}: there are no groups to keep a floor in (`rollwave nodes` shows their labels)",
                    selected.len()
                ),
            ));
        }
    }
    // Per group: members, healthy selected, healthy left out.
    let mut groups: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    for (nodes, is_selected) in [(selected, true), (left_out, false)] {
        for n in nodes {
            let g = groups.entry(quorum_group(spec, n)).or_default();
            g.0 += 1;
            if n.available(&spec.service) {
                if is_selected {
                    g.1 += 1;
                } else {
                    g.2 += 1;
                }
            }
        }
    }
    let per = spec.min_healthy_per.as_deref();
    for (g, (members, healthy_selected, healthy_outside)) in groups {
        if healthy_selected == 0 {
            // Nothing healthy is taken down there: a fresh install.
            continue;
        }
        let floor = spec.min_healthy.of(members);
        let floor_text = match spec.min_healthy {
            crate::Floor::Count(_) => format!("{floor}"),
            f => format!("{floor} ({f} of {members})"),
        };
        let place = match per {
            None => format!("{} runs on {members}", spec.service),
            Some(_) => format!("{} has {members}", describe_group(per, g)),
        };
        if floor >= members {
            return Err(SpecError::new(
                "strategy.min_healthy",
                format!(
                    "{floor_text} healthy nodes must remain but {place}: no healthy node could ever be taken down"
                ),
            ));
        }
        if spec.all_at_once && healthy_outside < floor {
            return Err(SpecError::new(
                "strategy.min_healthy",
                format!(
                    "all_at_once switches all {} selected nodes together, leaving {healthy_outside} healthy nodes of {} outside the selection{}, fewer than {floor_text}",
                    selected.len(),
                    spec.service,
                    match per {
                        None => String::new(),
                        Some(_) => format!(" in {}", describe_group(per, g)),
                    }
                ),
            ));
        }
    }
    Ok(())
}

/// `leader_last` needs nodes that report a role: refused when none of the
/// serving selected nodes does, as the order would silently be by name.
fn check_leader_last(spec: &RolloutSpec, selected: &[&NodeView]) -> Result<(), SpecError> {
    if !spec.leader_last {
        return Ok(());
    }
    let serving: Vec<&&NodeView> = selected
        .iter()
        .filter(|n| n.available(&spec.service))
        .collect();
    let probed = serving.iter().any(|n| {
        n.services
            .get(&spec.service)
            .is_some_and(|s| s.role.is_some() || s.role_error.is_some())
    });
    if !serving.is_empty() && !probed {
        return Err(SpecError::new(
            "strategy.order",
            format!(
                "leader_last needs a role probe: none of the {} serving selected nodes reports a role for {} (declare `role = {{ ... }}` in its [[service]] in agent.toml)",
                serving.len(),
                spec.service
            ),
        ));
    }
    Ok(())
}

/// A quorum service installed where it runs nowhere yet: members started
/// one at a time never become healthy (a lone raft member elects no
/// leader), so every node goes in one wave. Returns the plan's word on it,
/// or refuses what cannot be planned so.
fn bootstrap(
    spec: &RolloutSpec,
    selected: &[&NodeView],
    left_out: &[&NodeView],
) -> Result<Option<String>, SpecError> {
    if spec.min_healthy.is_none() || spec.all_at_once {
        return Ok(None);
    }
    let fresh = |n: &&NodeView| {
        n.services
            .get(&spec.service)
            .is_none_or(|s| s.version.is_none())
    };
    // Groups with no version anywhere, and how many selected nodes each has.
    let mut groups: BTreeMap<&str, (bool, usize)> = BTreeMap::new();
    for n in left_out {
        let g = groups.entry(quorum_group(spec, n)).or_insert((true, 0));
        g.0 &= fresh(n);
    }
    for n in selected {
        let g = groups.entry(quorum_group(spec, n)).or_insert((true, 0));
        g.0 &= fresh(n);
        g.1 += 1;
    }
    let per = spec.min_healthy_per.as_deref();
    let new_groups: Vec<&str> = groups
        .iter()
        .filter(|(_, (all_fresh, chosen))| *all_fresh && *chosen > 1)
        .map(|(g, _)| *g)
        .collect();
    if new_groups.is_empty() {
        return Ok(None);
    }
    let place = match per {
        None => String::new(),
        Some(_) => {
            let names: Vec<String> = new_groups.iter().map(|g| describe_group(per, g)).collect();
            format!(" of {}", names.join(", "))
        }
    };
    let why = format!(
        "no node{place} runs {} yet and min_healthy is {}: members started one at a time never become healthy",
        spec.service, spec.min_healthy
    );
    if !selected.iter().all(fresh) {
        let fix = match per {
            Some(label) => format!("--selector {label}={}", new_groups[0]),
            None => "--nodes with only the new nodes".to_string(),
        };
        return Err(SpecError::new(
            "selector",
            format!(
                "{why}, but this rollout also takes running nodes one wave at a time; roll the new nodes out on their own ({fix}) and they are planned in one wave"
            ),
        ));
    }
    if !spec.waves.is_empty() {
        return Err(SpecError::new(
            "strategy.waves",
            format!("{why}, so a canary's first wave would wait out healthy_deadline; install with kind = \"rolling\" (planned as one wave) or \"all_at_once\""),
        ));
    }
    if let Some(spread) = &spec.spread {
        return Err(SpecError::new(
            "strategy.spread_by",
            format!(
                "{why}, and spread_by {} would start them a few at a time; install without it",
                spread.label
            ),
        ));
    }
    Ok(Some(format!(
        "bootstrap: {why}, so all {} go in one wave",
        crate::count(selected.len(), "node")
    )))
}

/// Round-robin over the values of `label`, keeping each value's order.
fn interleave(nodes: Vec<usize>, selected: &[&NodeView], label: &str) -> Vec<usize> {
    let mut out = Vec::with_capacity(nodes.len());
    let mut buckets: BTreeMap<&str, VecDeque<usize>> = BTreeMap::new();
    for i in nodes {
        buckets
            .entry(label_value(selected[i], label))
            .or_default()
            .push_back(i);
    }
    while !buckets.is_empty() {
        buckets.retain(|_, q| {
            if let Some(n) = q.pop_front() {
                out.push(n);
            }
            !q.is_empty()
        });
    }
    out
}

/// A node's value of `label`; nodes without it form their own domain.
pub(crate) fn label_value<'a>(n: &'a NodeView, label: &str) -> &'a str {
    n.labels.get(label).map_or("", String::as_str)
}

/// Cuts the ordered groups into batches: rolling batches of `batch` nodes
/// within each group, or canary waves (cumulative sizes) additionally cut at
/// group boundaries. Returns the batches and, for each, whether the rollout
/// waits for a promotion after it.
fn cut<T: Copy>(spec: &RolloutSpec, groups: &[Vec<T>]) -> (Vec<Vec<T>>, Vec<bool>) {
    let total: usize = groups.iter().map(Vec::len).sum();
    if spec.waves.is_empty() {
        let size = spec.batch_size(total);
        let batches: Vec<Vec<T>> = groups
            .iter()
            .flat_map(|g| g.chunks(size).map(<[_]>::to_vec))
            .collect();
        let pauses = vec![false; batches.len()];
        return (batches, pauses);
    }
    // Cut points: each wave's cumulative size (waves that add no node are
    // dropped), the end, and the group boundaries.
    let mut wave_ends: BTreeMap<usize, bool> = BTreeMap::new();
    for w in &spec.waves {
        let end = w.size.resolve_up(total).clamp(1, total);
        let e = wave_ends.entry(end).or_insert(false);
        *e |= w.pause;
    }
    let mut cuts: std::collections::BTreeSet<usize> = wave_ends.keys().copied().collect();
    cuts.insert(total);
    let mut at = 0;
    for g in groups {
        at += g.len();
        cuts.insert(at);
    }
    let flat: Vec<T> = groups.iter().flatten().copied().collect();
    let mut batches = Vec::new();
    let mut pauses = Vec::new();
    let mut start = 0;
    for end in cuts {
        if end > start {
            batches.push(flat[start..end].to_vec());
            pauses.push(end < total && wave_ends.get(&end).copied().unwrap_or(false));
            start = end;
        }
    }
    (batches, pauses)
}

fn describe_down(n: &crate::NodeView, service: &str) -> String {
    if !n.online {
        return format!("{} (offline)", n.name);
    }
    let health = n
        .services
        .get(service)
        .map(|s| s.health)
        .unwrap_or_default();
    let h = match health {
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
        Health::Starting => "starting",
        Health::Stopped => "stopped",
    };
    format!("{} ({h})", n.name)
}

/// Decides the next actions of a rollout. Pure and idempotent: calling it
/// again with the same inputs decides nothing new.
pub fn step(current: &Rollout, fleet: &Fleet, now: Timestamp) -> Decision {
    let mut r = current.clone();
    let actions = step_in_place(&mut r, fleet, now);
    // A step only ever appends to the event log: a longer one says the
    // rollout changed without comparing every node.
    let changed = r.events.len() != current.events.len() || r != *current;
    if changed {
        r.updated_at = now;
    }
    Decision {
        rollout: r,
        dispatch: actions.dispatch,
        stage: actions.stage,
        next_wakeup: actions.next_wakeup,
        changed,
    }
}

/// What one step decided to send, and when to look again.
#[derive(Debug, Clone, Default)]
pub struct Actions {
    pub dispatch: Vec<Dispatch>,
    /// Stage tasks: see [`Decision::stage`].
    pub stage: Vec<Dispatch>,
    pub next_wakeup: Option<Timestamp>,
}

/// [`step`] on the rollout itself, for a caller that finds out what changed
/// on its own (the control plane compares with what it stored, which it
/// must do anyway to write only that) and so need not pay for a copy of a
/// large rollout and a comparison on every step. It does not set
/// `updated_at`: the caller does, if anything changed.
pub fn step_in_place(r: &mut Rollout, fleet: &Fleet, now: Timestamp) -> Actions {
    let mut dispatch = Vec::new();
    let mut wake = Wake::default();

    give_up_on_lost_tasks(r, fleet, now, &mut wake);

    if r.state == RolloutState::Running {
        let failures = r.count(NodeState::Failed) as u32;
        if fail_all_at_once(r, now) {
            // Every node goes back: see `fail_all_at_once`.
        } else if failures > r.spec.max_failures {
            let failed: Vec<String> = r
                .nodes
                .iter()
                .filter(|(_, n)| n.state == NodeState::Failed)
                .map(|(name, n)| format!("{name}: {}", n.reason.as_deref().unwrap_or("failed")))
                .collect();
            let reason = format!(
                "{} failed, more than max_failures = {} ({})",
                crate::count(failures as usize, "node"),
                r.spec.max_failures,
                failed.join("; ")
            );
            fail(r, reason, now);
        } else if let Some(reason) = analysis::failure(r) {
            fail(r, reason, now);
        } else if awaiting_promotion(r) {
            // Waiting for the operator, like a pause: not a lack of progress.
        } else if now >= r.last_progress_at + r.spec.progress_deadline {
            let reason = format!(
                "no node finished for {} (progress_deadline){}",
                format_duration(r.spec.progress_deadline),
                r.waiting
                    .as_deref()
                    .map(|w| format!(": {w}"))
                    .unwrap_or_default()
            );
            fail(r, reason, now);
        } else {
            wake.at(r.last_progress_at + r.spec.progress_deadline);
        }
    }

    let state = r.state;
    match state {
        RolloutState::Running if !dry_run_first(r, fleet, now, &mut dispatch) => {}
        RolloutState::Running if r.spec.all_at_once => {
            run_all_at_once(r, fleet, now, &mut dispatch, &mut wake);
            // A node given up in this step sends every node back in it too,
            // so that the same step again decides nothing new.
            if fail_all_at_once(r, now) && r.state == RolloutState::RollingBack {
                roll_back(r, now, &mut dispatch);
            }
        }
        RolloutState::Running => run_batches(r, fleet, now, &mut dispatch, &mut wake),
        RolloutState::RollingBack => roll_back(r, now, &mut dispatch),
        _ => {}
    }
    // After the upgrades of this step are assigned: a node upgraded now
    // needs no stage task as well, which would fetch and unpack the release
    // a second time, even after its upgrade failed.
    let mut stage = Vec::new();
    if matches!(r.state, RolloutState::Running | RolloutState::Paused) && !r.spec.all_at_once {
        stage_ahead(r, fleet, now, &mut stage);
    }
    // Also in the step that completes the rollout: nodes already back get
    // their converge task now, not on a second look.
    if r.converging() {
        converge(r, fleet, now, &mut dispatch);
    }

    Actions {
        dispatch,
        stage,
        next_wakeup: wake.0,
    }
}

/// Before any node changes, when the release declares a dry run: runs it on
/// the first node of the plan that is online, and again on another if that
/// one is lost. Returns whether the rollout may go on to change nodes.
fn dry_run_first(
    r: &mut Rollout,
    fleet: &Fleet,
    now: Timestamp,
    dispatch: &mut Vec<Dispatch>,
) -> bool {
    if !r.spec.dry_run || r.dry_run_done {
        return true;
    }
    if let Some((name, n)) = r
        .nodes
        .iter()
        .find(|(_, n)| n.state == NodeState::DryRunning)
    {
        let phase = n.phase.as_deref().unwrap_or("running");
        r.waiting = Some(format!("dry run on {name}: {phase}"));
        return false;
    }
    let online = r
        .batches
        .iter()
        .flatten()
        .find(|name| {
            r.nodes[*name].state == NodeState::Pending && fleet.get(*name).is_some_and(|v| v.online)
        })
        .cloned();
    match online {
        Some(name) => {
            r.event(
                now,
                Some(&name),
                format!(
                    "dry run of {}@{} against a copy of this node's data",
                    r.spec.service, r.spec.version
                ),
            );
            r.waiting = Some(format!("dry run on {name}: running"));
            dispatch.push(assign(
                r,
                name,
                TaskKind::DryRun,
                NodeState::DryRunning,
                now,
            ));
        }
        None => r.waiting = Some("dry run waits for a node of the plan to be online".into()),
    }
    false
}

/// Sends each pending node that is online and lacks the release one stage
/// task, once; a node that comes back online later gets it then.
fn stage_ahead(r: &mut Rollout, fleet: &Fleet, now: Timestamp, stage: &mut Vec<Dispatch>) {
    let (service, version) = (&r.spec.service, &r.spec.version);
    let mut due = Vec::with_capacity(r.nodes.len());
    for (name, n, view) in join_by_name(fleet, &r.nodes) {
        let send = n.state == NodeState::Pending
            && !n.stage_sent
            && view.is_some_and(|v| {
                v.online
                    && !v
                        .services
                        .get(service)
                        .is_some_and(|s| s.staged.contains(version))
            });
        if send {
            let task = TaskRef {
                id: r.task_id(name, TaskKind::Stage),
                kind: TaskKind::Stage,
                started_at: now,
            };
            stage.push(Dispatch {
                node: name.clone(),
                task,
            });
        }
        due.push(send);
    }
    // Marked in a second pass, in the same order: the task ids above borrow
    // the whole rollout.
    for (n, sent) in r.nodes.values_mut().zip(due) {
        n.stage_sent |= sent;
    }
}

fn fail(r: &mut Rollout, reason: String, now: Timestamp) {
    if r.spec.auto_rollback {
        r.set_state(RolloutState::RollingBack, Some(reason), now);
    } else {
        r.set_state(RolloutState::Failed, Some(reason), now);
    }
}

/// A task whose node has been offline for longer than the node's health
/// deadline is given up as unreachable (not failed: nothing is known of it).
/// A task whose agent is online but has not reported for the whole progress
/// deadline has failed: every wait has a deadline, rollbacks included.
fn give_up_on_lost_tasks(r: &mut Rollout, fleet: &Fleet, now: Timestamp, wake: &mut Wake) {
    let deadline = r.spec.healthy_deadline;
    let mut lost = Vec::new();
    let mut silent = Vec::new();
    for (name, task) in r.in_flight() {
        let view = fleet.get(name);
        if view.is_some_and(|v| v.online) {
            let limit = task.started_at + r.spec.progress_deadline;
            if now >= limit {
                silent.push((name.to_string(), task.kind));
            } else {
                wake.at(limit);
            }
            continue;
        }
        let since = view.map_or(task.started_at, |v| v.last_seen.max(task.started_at));
        if now >= since + deadline {
            lost.push((name.to_string(), since, task.kind));
        } else {
            wake.at(since + deadline);
        }
    }
    for (name, since, kind) in lost {
        let n = r
            .nodes
            .get_mut(&name)
            .expect("in-flight node is in the rollout");
        let reason = format!(
            "agent unreachable for {} while its task ran; its outcome is unknown",
            format_duration(now - since)
        );
        if kind == TaskKind::DryRun {
            // Nothing changed on the node: another one runs the dry run.
            n.state = NodeState::Pending;
            n.phase = None;
            n.updated_at = now;
            r.event(now, Some(&name), format!("dry run given up: {reason}"));
            continue;
        }
        n.state = NodeState::Unreachable;
        n.reason = Some(reason.clone());
        n.phase = None;
        n.updated_at = now;
        r.last_progress_at = now;
        r.event(now, Some(&name), reason);
    }
    for (name, kind) in silent {
        let reason = format!(
            "the agent reported no result within {} (progress_deadline) of the task's start",
            format_duration(r.spec.progress_deadline)
        );
        if kind == TaskKind::DryRun {
            let failed = TaskOutcome::Failed { reason };
            let id = r.task_id(&name, kind);
            r.record_result(&name, &id, &failed, now);
            continue;
        }
        let n = r
            .nodes
            .get_mut(&name)
            .expect("in-flight node is in the rollout");
        n.state = match kind {
            TaskKind::Revert => NodeState::RollbackFailed,
            TaskKind::Upgrade | TaskKind::Stage | TaskKind::Converge => NodeState::Failed,
            TaskKind::DryRun => NodeState::Pending,
        };
        n.reason = Some(reason.clone());
        n.phase = None;
        n.updated_at = now;
        r.last_progress_at = now;
        r.event(now, Some(&name), reason);
    }
}

fn run_batches(
    r: &mut Rollout,
    fleet: &Fleet,
    now: Timestamp,
    dispatch: &mut Vec<Dispatch>,
    wake: &mut Wake,
) {
    // Giving up on the last pending nodes of a batch finishes it: the next
    // batch starts (or the rollout completes) in this same step, so that a
    // second step with the same inputs has nothing left to decide.
    while run_current_batch(r, fleet, now, dispatch, wake) {}
}

/// Whether the rollout has finished a wave that waits for `promote`.
pub(crate) fn awaiting_promotion(r: &Rollout) -> bool {
    first_open_batch(r).is_some_and(|b| paused_before(r, b))
}

/// The batch being worked on: the first with a node pending or in flight.
fn first_open_batch(r: &Rollout) -> Option<usize> {
    (0..r.batches.len()).find(|&b| batch_open(r, b))
}

/// Whether batch `b` waits for the wave before it to be promoted.
fn paused_before(r: &Rollout, b: usize) -> bool {
    b > 0 && r.pauses.get(b - 1) == Some(&true) && !r.promoted.contains(&(b - 1))
}

/// Whether batch `b` still has a node pending or in flight.
fn batch_open(r: &Rollout, b: usize) -> bool {
    r.batches[b].iter().any(|n| {
        let s = r.nodes[n].state;
        s == NodeState::Pending || s.in_flight()
    })
}

/// Works on the first unfinished batch. Returns true when this finished it,
/// so that the next one can start at once.
fn run_current_batch(
    r: &mut Rollout,
    fleet: &Fleet,
    now: Timestamp,
    dispatch: &mut Vec<Dispatch>,
    wake: &mut Wake,
) -> bool {
    let Some(batch) = first_open_batch(r) else {
        if analysis::holds(r, r.batches.len()) {
            return false;
        }
        let reason = summary(r);
        r.set_state(RolloutState::Completed, Some(reason), now);
        return false;
    };

    if analysis::holds(r, batch) {
        return false;
    }
    if paused_before(r, batch) {
        r.waiting = Some(format!(
            "wave {batch} of {} is done: waiting for `rollwave rollout promote {}`",
            r.batches.len(),
            r.id
        ));
        return false;
    }
    // With leader_last: each group's followers still pending or in flight,
    // counted once per step rather than once per leader.
    let open_followers = if r.spec.leader_last {
        leaders_last(r, fleet, batch, now);
        open_followers(r, fleet)
    } else {
        BTreeMap::new()
    };
    let service = r.spec.service.clone();
    let budget = r.spec.unavailable_budget(r.nodes.len());
    let mut unavailable = unavailable_count(r, fleet);
    let mut quorum = Quorum::of(r, fleet);
    let spread = r.spec.spread.clone();
    let mut busy = spread
        .as_ref()
        .map(|s| invariants::in_flight_by_domain(r, fleet, &s.label))
        .unwrap_or_default();
    let limits = Limits {
        service: service.clone(),
        budget,
        spread: spread.clone(),
    };
    // Why each pending node waits is said once every start of this step is
    // counted, so that calling `step` again with its output says the same.
    let mut waits: Vec<Wait> = Vec::new();
    for name in r.batches[batch].clone() {
        if r.nodes[&name].state != NodeState::Pending {
            continue;
        }
        let view = fleet.get(&name).filter(|v| v.online);
        let Some(view) = view else {
            let n = r
                .nodes
                .get_mut(&name)
                .expect("batch node is in the rollout");
            let since = *n.waiting_since.get_or_insert(now);
            if now >= since + r.spec.healthy_deadline {
                let last_seen = fleet.get(&name).map(|v| v.last_seen).unwrap_or(0);
                let reason = format!(
                    "offline when its turn came and for {} after (last seen {} ago)",
                    format_duration(r.spec.healthy_deadline),
                    format_duration(now.saturating_sub(last_seen) / 1000 * 1000)
                );
                n.state = NodeState::Unreachable;
                n.reason = Some(reason.clone());
                n.updated_at = now;
                r.last_progress_at = now;
                r.event(now, Some(&name), reason);
            } else {
                wake.at(since + r.spec.healthy_deadline);
                waits.push(Wait::Offline(name));
            }
            continue;
        };
        // Back online: should it drop off again, its grace period starts anew.
        if let Some(n) = r.nodes.get_mut(&name) {
            n.waiting_since = None;
        }
        let already_down = !view.available(&service);
        let mut leader = false;
        if r.spec.leader_last && !already_down {
            match leadership(r, &open_followers, view) {
                Leadership::Follower => {}
                Leadership::Leader => leader = true,
                other => {
                    waits.push(Wait::Role(other.reason(r, view)));
                    continue;
                }
            }
        }
        let domain = spread.as_ref().map(|s| label_value(view, &s.label));
        let held = Held {
            name,
            already_down,
            domain,
            group: quorum_group(&r.spec, view),
        };
        if held.hold(&limits, unavailable, &quorum, &busy).is_some() {
            waits.push(Wait::Held(held));
            continue;
        }
        let name = held.name;
        if let Some(d) = domain {
            *busy.entry(d.to_string()).or_default() += 1;
        }
        if !already_down {
            unavailable += 1;
            quorum.take(held.group);
        }
        let started = format!(
            "{} to {} started{}",
            r.move_of(&name),
            r.spec.version,
            if leader {
                ", last of its group: its role probe says leader"
            } else {
                ""
            }
        );
        r.event(now, Some(&name), started);
        let d = assign(r, name, TaskKind::Upgrade, NodeState::Upgrading, now);
        if leader {
            r.nodes.get_mut(&d.node).expect("assigned above").leader = true;
        }
        dispatch.push(d);
    }
    analysis::start(r, batch, now);
    let held = waits.len();
    let down = invariants::unavailable_nodes(r, fleet);
    let mut waits: Vec<String> = waits
        .into_iter()
        .take(MAX_WAITS_SHOWN)
        .map(|w| match w {
            Wait::Held(h) => {
                let hold = h
                    .hold(&limits, unavailable, &quorum, &busy)
                    .expect("a held node stays held as the step starts others");
                h.reason(&limits, hold, &quorum, &down)
            }
            Wait::Offline(name) => format!("{name} is offline"),
            Wait::Role(why) => why,
        })
        .collect();
    if held > MAX_WAITS_SHOWN {
        waits.push(format!("and {} more", held - MAX_WAITS_SHOWN));
    }
    let in_flight: Vec<&str> = r.in_flight().map(|(n, _)| n).collect();
    let waiting = if !waits.is_empty() {
        Some(format!("wave {}: {}", batch + 1, waits.join("; ")))
    } else if !in_flight.is_empty() {
        Some(format!(
            "wave {} of {}: waiting for {} to pass the health gate",
            batch + 1,
            r.batches.len(),
            in_flight.join(", ")
        ))
    } else {
        None
    };
    r.waiting = waiting;
    !batch_open(r, batch)
}

/// Where a pending node stands for `leader_last`, from its role probe.
enum Leadership {
    Follower,
    Leader,
    /// It leads, and other nodes of its group still have to go first.
    LeaderWaits(Vec<String>),
    /// Its probe gave no role: which node leads is not known.
    Unknown,
}

impl Leadership {
    fn reason(&self, r: &Rollout, v: &NodeView) -> String {
        match self {
            Leadership::LeaderWaits(before) => format!(
                "{} waits: its role probe says leader, so it goes after {}",
                v.name,
                names_capped(&before.iter().map(String::as_str).collect::<Vec<_>>())
            ),
            _ => {
                let s = v.services.get(&r.spec.service);
                format!(
                    "{} waits: leader_last and its role is not known ({})",
                    v.name,
                    s.and_then(|s| s.role_error.as_deref())
                        .unwrap_or("its agent reports no role for the service")
                )
            }
        }
    }
}

/// Reads `v`'s role now: leadership moves, so it is read as the node's turn
/// comes rather than planned once. `open`: see `open_followers`.
fn leadership(r: &Rollout, open: &BTreeMap<String, Vec<String>>, v: &NodeView) -> Leadership {
    let Some(role) = v
        .services
        .get(&r.spec.service)
        .and_then(|s| s.role.as_deref())
    else {
        return Leadership::Unknown;
    };
    if role != LEADER {
        return Leadership::Follower;
    }
    match open.get(quorum_group(&r.spec, v)) {
        Some(before) if !before.is_empty() => Leadership::LeaderWaits(before.clone()),
        _ => Leadership::Leader,
    }
}

/// Per quorum group, the rollout's nodes that do not lead and are still
/// pending or in flight: a group's leader goes after them. The rollout's
/// nodes only, so a leader outside the selection is not waited for.
fn open_followers(r: &Rollout, fleet: &Fleet) -> BTreeMap<String, Vec<String>> {
    let mut open: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, n, v) in join_by_name(fleet, &r.nodes) {
        if !(n.state == NodeState::Pending || n.state.in_flight()) {
            continue;
        }
        let group = match v {
            Some(v) if is_leader(v, &r.spec.service) => continue,
            Some(v) => quorum_group(&r.spec, v),
            None => "",
        };
        open.entry(group.to_string())
            .or_default()
            .push(name.clone());
    }
    open
}

/// With `leader_last`, a node of batch `b` that leads when its turn comes
/// trades places with the last pending node of its group in a later batch,
/// so that the group's leader goes in its last wave, whoever leads by then.
fn leaders_last(r: &mut Rollout, fleet: &Fleet, b: usize, now: Timestamp) {
    let service = r.spec.service.clone();
    let leaders: Vec<String> = r.batches[b]
        .iter()
        .filter(|n| r.nodes[*n].state == NodeState::Pending)
        .filter(|n| {
            fleet
                .get(n.as_str())
                .is_some_and(|v| is_leader(v, &service))
        })
        .cloned()
        .collect();
    for leader in leaders {
        let group = quorum_group(&r.spec, &fleet[&leader]).to_string();
        let later = (b + 1..r.batches.len()).rev().find_map(|lb| {
            r.batches[lb]
                .iter()
                .rposition(|n| {
                    r.nodes[n].state == NodeState::Pending
                        && fleet.get(n.as_str()).is_some_and(|v| {
                            quorum_group(&r.spec, v) == group && !is_leader(v, &service)
                        })
                })
                .map(|i| (lb, i))
        });
        let Some((lb, i)) = later else { continue };
        let at = r.batches[b]
            .iter()
            .position(|n| *n == leader)
            .expect("the leader is in this batch");
        let other = std::mem::replace(&mut r.batches[lb][i], leader.clone());
        r.batches[b][at] = other.clone();
        r.nodes.get_mut(&leader).expect("planned").batch = lb;
        r.nodes.get_mut(&other).expect("planned").batch = b;
        r.event(
            now,
            Some(&leader),
            format!(
                "its role probe says leader: moved to wave {} in place of {other}, so that it goes last",
                lb + 1
            ),
        );
    }
}

/// Held nodes named in `waiting`; the rest are counted.
const MAX_WAITS_SHOWN: usize = 5;

enum Wait<'f> {
    Offline(String),
    Held(Held<'f>),
    /// Waits on leadership (`leader_last`): the reason is final when found.
    Role(String),
}

/// What holds a pending node back, re-evaluated against the step's counts.
struct Limits {
    service: String,
    budget: usize,
    spread: Option<crate::Spread>,
}

struct Held<'f> {
    name: String,
    already_down: bool,
    domain: Option<&'f str>,
    /// Its quorum group (see `quorum_group`).
    group: &'f str,
}

/// The limit a held node waits on, with the count that reached it. Kept
/// apart from its wording: most held nodes are only counted in `waiting`.
enum Hold<'a> {
    Budget(usize),
    Floor(usize),
    Domain {
        in_domain: usize,
        spread: &'a crate::Spread,
        value: &'a str,
    },
}

impl Held<'_> {
    fn hold<'a>(
        &'a self,
        l: &'a Limits,
        unavailable: usize,
        quorum: &Quorum,
        busy: &BTreeMap<String, usize>,
    ) -> Option<Hold<'a>> {
        if !self.already_down && unavailable >= l.budget {
            return Some(Hold::Budget(unavailable));
        }
        if !self.already_down && quorum.holds(self.group) {
            return Some(Hold::Floor(quorum.healthy(self.group)));
        }
        if let (Some(spread), Some(value)) = (&l.spread, self.domain) {
            let in_domain = busy.get(value).copied().unwrap_or(0);
            if in_domain >= spread.max_per_domain as usize {
                return Some(Hold::Domain {
                    in_domain,
                    spread,
                    value,
                });
            }
        }
        None
    }

    /// `down`: the unavailable nodes, named when the budget holds this one.
    fn reason(&self, l: &Limits, hold: Hold, quorum: &Quorum, down: &[String]) -> String {
        let name = &self.name;
        match hold {
            Hold::Budget(unavailable) => {
                let mut named = down[..down.len().min(MAX_WAITS_SHOWN)].join(", ");
                if down.len() > MAX_WAITS_SHOWN {
                    let _ = write!(named, ", and {} more", down.len() - MAX_WAITS_SHOWN);
                }
                format!(
                    "{name} waits: {unavailable} of at most {} nodes unavailable ({named})",
                    l.budget
                )
            }
            Hold::Floor(healthy) => format!(
                "{name} waits: {healthy} nodes of {} are healthy {} and min_healthy is {}",
                l.service,
                match quorum.per {
                    None => "fleet-wide".to_string(),
                    Some(_) => format!("in {}", quorum.describe(self.group)),
                },
                quorum.describe_floor(self.group),
            ),
            Hold::Domain {
                in_domain,
                spread: s,
                value: d,
            } => format!(
                "{name} waits: {} with {}={d} already in flight (max_per_domain {})",
                crate::count(in_domain, "node"),
                s.label,
                s.max_per_domain
            ),
        }
    }
}

/// The fleet must end all on one version: while an all-at-once rollout
/// runs, any node that failed, or whose outcome is unknown, sends every node
/// back. Returns whether it did.
fn fail_all_at_once(r: &mut Rollout, now: Timestamp) -> bool {
    if !r.spec.all_at_once || r.state != RolloutState::Running {
        return false;
    }
    let bad: Vec<String> = r
        .nodes
        .iter()
        .filter(|(_, n)| matches!(n.state, NodeState::Failed | NodeState::Unreachable))
        .map(|(name, n)| format!("{name}: {}", n.reason.as_deref().unwrap_or("failed")))
        .collect();
    if bad.is_empty() {
        return false;
    }
    let switched = r
        .nodes
        .values()
        .any(|n| matches!(n.state, NodeState::Upgrading | NodeState::Upgraded));
    let reason = format!(
        "all_at_once: {}; {}",
        bad.join("; "),
        if switched {
            "switching every node back"
        } else {
            "no node was switched"
        }
    );
    fail(r, reason, now);
    true
}

/// Two phases. One: every node stages the release (its own stage task);
/// a node offline for `healthy_deadline` ends it, as does any failure (see
/// `step`). Two: once every node is staged, every switch is sent in this
/// one step.
fn run_all_at_once(
    r: &mut Rollout,
    fleet: &Fleet,
    now: Timestamp,
    dispatch: &mut Vec<Dispatch>,
    wake: &mut Wake,
) {
    let pending: Vec<String> = r
        .nodes
        .iter()
        .filter(|(_, n)| n.state == NodeState::Pending)
        .map(|(name, _)| name.clone())
        .collect();
    let mut offline = Vec::new();
    for name in pending {
        let online = fleet.get(&name).is_some_and(|v| v.online);
        let n = r
            .nodes
            .get_mut(&name)
            .expect("pending node is in the rollout");
        if !online {
            let since = *n.waiting_since.get_or_insert(now);
            if now >= since + r.spec.healthy_deadline {
                let reason = format!(
                    "offline for {} while every node had to stage",
                    format_duration(r.spec.healthy_deadline)
                );
                n.state = NodeState::Unreachable;
                n.reason = Some(reason.clone());
                n.updated_at = now;
                r.last_progress_at = now;
                r.event(now, Some(&name), reason);
            } else {
                wake.at(since + r.spec.healthy_deadline);
                offline.push(name);
            }
            continue;
        }
        n.waiting_since = None;
        dispatch.push(assign(r, name, TaskKind::Stage, NodeState::Staging, now));
    }
    let total = r.nodes.len();
    let staged = r.count(NodeState::Staged);
    if staged == total {
        let short = crate::quorum::short_outside(r, fleet);
        if !short.is_empty() {
            r.waiting = Some(format!(
                "all {total} nodes staged: the switch waits, {}",
                short.join("; ")
            ));
            return;
        }
        let names: Vec<String> = r.nodes.keys().cloned().collect();
        for name in names {
            let started = format!("{} to {} started", r.move_of(&name), r.spec.version);
            r.event(now, Some(&name), started);
            dispatch.push(assign(
                r,
                name,
                TaskKind::Upgrade,
                NodeState::Upgrading,
                now,
            ));
        }
        analysis::start(r, 0, now);
    }
    if r.nodes.values().all(|n| n.state == NodeState::Upgraded) {
        if analysis::holds(r, r.batches.len()) {
            return;
        }
        let reason = summary(r);
        r.set_state(RolloutState::Completed, Some(reason), now);
        return;
    }
    let staging: Vec<&str> = r
        .nodes
        .iter()
        .filter(|(_, n)| n.state == NodeState::Staging)
        .map(|(name, _)| name.as_str())
        .chain(offline.iter().map(String::as_str))
        .collect();
    r.waiting = Some(if !staging.is_empty() {
        format!(
            "phase 1 of 2, staging {}: {} of {total} nodes staged, waiting for {}",
            r.spec.version,
            r.count(NodeState::Staged),
            names_capped(&staging)
        )
    } else {
        let gating: Vec<&str> = r.in_flight().map(|(n, _)| n).collect();
        format!(
            "phase 2 of 2, all {total} nodes switched: waiting for {} to pass the health gate",
            names_capped(&gating)
        )
    });
}

/// At most `MAX_WAITS_SHOWN` names, then how many more.
fn names_capped(names: &[&str]) -> String {
    let mut out = names
        .iter()
        .take(MAX_WAITS_SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > MAX_WAITS_SHOWN {
        out.push_str(&format!(" and {} more", names.len() - MAX_WAITS_SHOWN));
    }
    out
}

/// A completed rollout brings nodes it could not reach to its version when
/// they come back, under the same unavailability budget and health floor,
/// through the same health gate (the agent switches back if it fails).
fn converge(r: &mut Rollout, fleet: &Fleet, now: Timestamp, dispatch: &mut Vec<Dispatch>) {
    let service = r.spec.service.clone();
    let back: Vec<(String, bool, bool)> = r
        .nodes
        .iter()
        .filter(|(_, n)| n.state == NodeState::Unreachable)
        .filter_map(|(name, _)| {
            let v = fleet.get(name).filter(|v| v.online)?;
            let s = v.services.get(&service);
            let on_target = s.is_some_and(|s| s.version.as_deref() == Some(&r.spec.version));
            Some((name.clone(), on_target, !v.available(&service)))
        })
        .collect();
    if back.is_empty() {
        return;
    }
    let budget = r.spec.unavailable_budget(r.nodes.len());
    let mut unavailable = unavailable_count(r, fleet);
    let mut quorum = Quorum::of(r, fleet);
    for (name, on_target, already_down) in back {
        let group = fleet
            .get(&name)
            .map_or("", |v| quorum_group(&r.spec, v))
            .to_string();
        let n = r.nodes.get_mut(&name).expect("node is in the rollout");
        if on_target {
            // Its upgrade finished while it could not report.
            n.state = NodeState::Upgraded;
            n.reason = None;
            n.updated_at = now;
            r.event(now, Some(&name), format!("came back on {}", r.spec.version));
            continue;
        }
        if !already_down && (unavailable >= budget || quorum.holds(&group)) {
            continue;
        }
        if !already_down {
            unavailable += 1;
            quorum.take(&group);
        }
        n.reason = None;
        r.event(
            now,
            Some(&name),
            format!("back online: converging to {}", r.spec.version),
        );
        dispatch.push(assign(
            r,
            name,
            TaskKind::Converge,
            NodeState::Converging,
            now,
        ));
    }
    r.reason = Some(summary(r));
}

/// Gives a node its task of `kind`, in `state`: the node's task is what
/// `record_result` matches and what is sent again after a crash.
fn assign(
    r: &mut Rollout,
    name: String,
    kind: TaskKind,
    state: NodeState,
    now: Timestamp,
) -> Dispatch {
    let task = TaskRef {
        id: r.task_id(&name, kind),
        kind,
        started_at: now,
    };
    let n = r.nodes.get_mut(&name).expect("node is in the rollout");
    n.state = state;
    n.task = Some(task.clone());
    n.updated_at = now;
    Dispatch { node: name, task }
}

fn roll_back(r: &mut Rollout, now: Timestamp, dispatch: &mut Vec<Dispatch>) {
    let to_revert: Vec<String> = r
        .nodes
        .iter()
        .filter(|(_, n)| n.state == NodeState::Upgraded)
        .map(|(name, _)| name.clone())
        .collect();
    // In waves no wider than the rollout's budget (or what the operator
    // asked): a rollback takes no more of the service down at once than the
    // rollout might. Last upgraded first, no waiting between waves.
    let width = match r.rollback_batch {
        Some(batch) => batch.resolve_down(r.nodes.len()).max(1),
        None => r.spec.unavailable_budget(r.nodes.len()),
    };
    let room = width.saturating_sub(r.in_flight().count());
    let mut to_revert = to_revert;
    to_revert.sort_by_key(|name| std::cmp::Reverse(r.nodes[name].batch));
    to_revert.truncate(room);
    for name in to_revert {
        let to = r.nodes[&name]
            .from_version
            .clone()
            .unwrap_or_else(|| "nothing".into());
        r.event(now, Some(&name), format!("rollback to {to} started"));
        dispatch.push(assign(
            r,
            name,
            TaskKind::Revert,
            NodeState::RollingBack,
            now,
        ));
    }
    let busy: Vec<&str> = r.in_flight().map(|(n, _)| n).collect();
    if busy.is_empty() {
        r.finish_rollback(now);
    } else {
        r.waiting = Some(format!("rolling back: waiting for {}", busy.join(", ")));
    }
}

/// Names a plan by what it would do: the specs, the waves, the pauses, the
/// nodes left out, and each node's wave and the version it runs, never the
/// time it was made. `start --plan-id` starts only if a fresh plan has the
/// same id, so that what an operator reviewed is what runs (as Nomad's `job
/// plan` and `-check-index`).
pub fn plan_id(planned: &[Rollout]) -> String {
    use sha2::{Digest, Sha256};
    let what: Vec<serde_json::Value> = planned
        .iter()
        .map(|r| {
            let nodes: BTreeMap<&str, (usize, Option<&str>)> = r
                .nodes
                .iter()
                .map(|(name, n)| (name.as_str(), (n.batch, n.from_version.as_deref())))
                .collect();
            serde_json::json!({
                "spec": r.spec,
                "state": r.state,
                "batches": r.batches,
                "pauses": r.pauses,
                "left_out": r.left_out,
                "nodes": nodes,
            })
        })
        .collect();
    let bytes = serde_json::to_vec(&what).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..8])
}

fn summary(r: &Rollout) -> String {
    let total = r.nodes.len();
    let up = r.count(NodeState::Upgraded);
    let downgrades = r
        .nodes
        .keys()
        .filter(|n| r.move_of(n) == "downgrade")
        .count();
    let moved = match downgrades {
        0 => "upgraded",
        d if d == total => "downgraded",
        _ => "switched",
    };
    let mut parts = vec![format!("{up} of {total} nodes {moved}")];
    for (state, label) in [
        (NodeState::Failed, "failed"),
        (NodeState::Unreachable, "unreachable"),
    ] {
        let c = r.count(state);
        if c > 0 {
            parts.push(format!("{c} {label}"));
        }
    }
    parts.join(", ")
}

#[derive(Default)]
struct Wake(Option<Timestamp>);

impl Wake {
    fn at(&mut self, t: Timestamp) {
        self.0 = Some(self.0.map_or(t, |w| w.min(t)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RolloutFile, ServiceView, StrategyFile, WaveFile};

    fn fleet(n: usize) -> Fleet {
        (1..=n)
            .map(|i| {
                let name = format!("n{i}");
                let view = NodeView {
                    name: name.clone(),
                    labels: Default::default(),
                    online: true,
                    last_seen: 0,
                    services: [(
                        "api".to_string(),
                        ServiceView {
                            version: Some("1.0.0".into()),
                            health: Health::Healthy,
                            staged: Vec::new(),
                            ..Default::default()
                        },
                    )]
                    .into(),
                };
                (name, view)
            })
            .collect()
    }

    #[test]
    fn waiting_for_a_promotion_is_not_a_lack_of_progress() {
        let spec = RolloutFile {
            service: Some("api".into()),
            version: Some("2.0.0".into()),
            strategy: StrategyFile {
                waves: Some(vec![
                    WaveFile::Table {
                        size: "1".into(),
                        pause: true,
                    },
                    WaveFile::Size("100%".into()),
                ]),
                progress_deadline: Some("10m".into()),
                ..Default::default()
            },
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let fleet = fleet(3);
        let d = step(&plan_batches(1, spec, &fleet, 0).unwrap(), &fleet, 0);
        let mut r = d.rollout;
        assert!(r.record_result("n1", &d.dispatch[0].task.id, &TaskOutcome::Succeeded, 1_000));
        // An hour later, still waiting: not failed, nothing started.
        let hour = 3_600_000;
        let d = step(&r, &fleet, hour);
        assert_eq!(d.rollout.state, RolloutState::Running);
        assert!(d.dispatch.is_empty());
        assert!(d.rollout.waiting.as_deref().unwrap().contains("promote 1"));
        r = d.rollout;
        r.promote(hour).unwrap();
        let d = step(&r, &fleet, hour + 1);
        assert_eq!(d.dispatch.len(), 2, "the rest starts after the promotion");
        assert_eq!(d.rollout.state, RolloutState::Running);
    }
}
