//! A rollout in a few lines: how many nodes are in each state and what is
//! wrong, without the node list or the log. What `rollout status` shows by
//! default and what list endpoints return, so that a 10,000-node rollout
//! costs a few hundred bytes to look at.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{NodeState, Rollout, RolloutState, Timestamp};

/// At most this many problem nodes are named in a summary; the rest are
/// counted in `problems_total`.
pub const PROBLEMS_SHOWN: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RolloutSummary {
    pub id: u64,
    pub generation: u64,
    pub service: String,
    pub version: String,
    pub state: RolloutState,
    /// Why the rollout is in its state (failure, cancellation, rollback).
    pub reason: Option<String>,
    /// What the rollout waits for now, if anything.
    pub waiting: Option<String>,
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub created_at: Timestamp,
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub updated_at: Timestamp,
    /// Unix milliseconds.
    #[schema(value_type = Option<u64>)]
    pub finished_at: Option<Timestamp>,
    /// How many waves the plan has.
    pub waves: usize,
    /// How many nodes the rollout targets.
    pub nodes: usize,
    /// Nodes per state (`pending`, `upgraded`, ...); states no node is in
    /// are left out.
    pub counts: BTreeMap<String, usize>,
    /// Nodes that failed, could not be reached or did not come back, with
    /// why: at most [`PROBLEMS_SHOWN`], in name order.
    pub problems: Vec<NodeProblem>,
    /// How many nodes have a problem in all.
    pub problems_total: usize,
    /// How many entries the execution log holds.
    pub log_len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeProblem {
    pub node: String,
    pub state: NodeState,
    pub reason: Option<String>,
}

impl NodeState {
    pub const ALL: [NodeState; 12] = [
        NodeState::Pending,
        NodeState::Upgrading,
        NodeState::Upgraded,
        NodeState::Failed,
        NodeState::Unreachable,
        NodeState::RollingBack,
        NodeState::RolledBack,
        NodeState::RollbackFailed,
        NodeState::Staging,
        NodeState::Staged,
        NodeState::Converging,
        NodeState::DryRunning,
    ];

    /// The state [`NodeState::as_str`] names.
    pub fn named(name: &str) -> Option<NodeState> {
        NodeState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether a node in this state is something an operator must look at.
    pub fn is_problem(self) -> bool {
        matches!(
            self,
            NodeState::Failed | NodeState::Unreachable | NodeState::RollbackFailed
        )
    }
}

impl RolloutSummary {
    /// Whether the rollout has ended with nothing in flight, as
    /// [`Rollout::settled`] says of the whole rollout.
    pub fn settled(&self) -> bool {
        self.state.is_terminal()
            && !self
                .counts
                .iter()
                .any(|(s, n)| *n > 0 && NodeState::named(s).is_some_and(NodeState::in_flight))
    }

    /// Summarises a rollout held in full.
    pub fn of(r: &Rollout) -> RolloutSummary {
        let mut counts = BTreeMap::new();
        let mut problems = Vec::new();
        let mut problems_total = 0;
        for (name, n) in &r.nodes {
            *counts.entry(n.state.as_str().to_string()).or_insert(0) += 1;
            if n.state.is_problem() {
                problems_total += 1;
                if problems.len() < PROBLEMS_SHOWN {
                    problems.push(NodeProblem {
                        node: name.clone(),
                        state: n.state,
                        reason: n.reason.clone(),
                    });
                }
            }
        }
        let mut s = RolloutSummary::header(r, counts, problems, problems_total, r.events.len());
        s.nodes = r.nodes.len();
        s
    }

    /// Summarises a rollout from its header (a [`Rollout`] whose nodes and
    /// log may be left out) and counts made elsewhere, as a store does.
    pub fn header(
        r: &Rollout,
        counts: BTreeMap<String, usize>,
        problems: Vec<NodeProblem>,
        problems_total: usize,
        log_len: usize,
    ) -> RolloutSummary {
        RolloutSummary {
            id: r.id,
            generation: r.generation,
            service: r.spec.service.clone(),
            version: r.spec.version.clone(),
            state: r.state,
            reason: r.reason.clone(),
            waiting: r.waiting.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            finished_at: r.finished_at,
            waves: r.batches.len().max(r.pauses.len()),
            nodes: counts.values().sum(),
            counts,
            problems,
            problems_total,
            log_len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{plan_batches, Fleet, NodeView, RolloutFile};

    fn rollout(nodes: usize) -> Rollout {
        let mut fleet = Fleet::new();
        for i in 0..nodes {
            let name = format!("n{i:03}");
            let mut services = BTreeMap::new();
            services.insert(
                "api".to_string(),
                crate::ServiceView {
                    version: Some("1.0.0".into()),
                    health: crate::Health::Healthy,
                    staged: vec![],
                    previous: None,
                    desired: None,
                    converging: false,
                    role: None,
                    role_error: None,
                    backups: vec![],
                },
            );
            fleet.insert(
                name.clone(),
                NodeView {
                    name,
                    labels: BTreeMap::new(),
                    online: true,
                    last_seen: 0,
                    services,
                },
            );
        }
        let file: RolloutFile = toml::from_str("service = \"api\"\nversion = \"2.0.0\"").unwrap();
        let spec = file.resolve_all().unwrap().remove(0);
        plan_batches(1, spec, &fleet, 0).unwrap()
    }

    #[test]
    fn counts_every_node_and_names_the_first_problems() {
        let mut r = rollout(30);
        for (i, n) in r.nodes.values_mut().enumerate() {
            if i % 2 == 0 {
                n.state = NodeState::Failed;
                n.reason = Some(format!("broke {i}"));
            }
        }
        let s = RolloutSummary::of(&r);
        assert_eq!(s.nodes, 30);
        assert_eq!(s.counts["failed"], 15);
        assert_eq!(s.counts["pending"], 15);
        assert_eq!(s.problems_total, 15);
        assert_eq!(s.problems.len(), 15.min(PROBLEMS_SHOWN));
        assert_eq!(s.problems[0].node, "n000");
        assert_eq!(s.problems[0].reason.as_deref(), Some("broke 0"));
        assert_eq!(s.log_len, r.events.len());
    }

    #[test]
    fn every_state_is_named_once() {
        for s in NodeState::ALL {
            assert_eq!(NodeState::named(s.as_str()), Some(s));
        }
        assert_eq!(NodeState::named("sleeping"), None);
    }

    #[test]
    fn settled_agrees_with_the_whole_rollout() {
        let mut r = rollout(4);
        r.state = RolloutState::Completed;
        assert_eq!(RolloutSummary::of(&r).settled(), r.settled());
        r.nodes.values_mut().next().unwrap().state = NodeState::RollingBack;
        r.nodes.values_mut().next().unwrap().task = Some(crate::TaskRef {
            id: "t".into(),
            kind: crate::TaskKind::Revert,
            started_at: 0,
        });
        assert!(!r.settled());
        assert_eq!(RolloutSummary::of(&r).settled(), r.settled());
    }

    #[test]
    fn names_at_most_the_shown_number_of_problems() {
        let mut r = rollout(PROBLEMS_SHOWN + 5);
        for n in r.nodes.values_mut() {
            n.state = NodeState::Unreachable;
        }
        let s = RolloutSummary::of(&r);
        assert_eq!(s.problems.len(), PROBLEMS_SHOWN);
        assert_eq!(s.problems_total, PROBLEMS_SHOWN + 5);
    }
}
