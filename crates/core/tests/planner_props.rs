//! Whole rollouts, simulated: random fleets and specs, agents that report
//! results at random later times, nodes that drop off and come back. After
//! every planner step the rules in `rollwave_core::invariants` must hold.
//!
//! The simulation is driven by a seed so that a failing case replays exactly;
//! proptest shrinks the fleet, the spec and the knobs around it.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use rollwave_core::invariants::{
    batch_order, batches_within, planned_once, settled, unavailable_count, within_budget,
};
use rollwave_core::{
    plan_batches, step, Amount, Decision, Fleet, Health, NodeState, NodeView, Rollout, RolloutFile,
    RolloutSpec, RolloutState, ServiceView, StrategyFile, TaskKind, TaskOutcome, Timestamp,
};

const SEC: u64 = 1000;
const T0: Timestamp = 1_700_000_000_000;
const SERVICE: &str = "api";
const FROM: &str = "1.0.0";
const TO: &str = "2.0.0";
/// Every simulated rollout must reach its end within this many steps.
const MAX_STEPS: usize = 10_000;
/// Nodes stop dropping off, health stops changing and the operator stops
/// intervening after this many steps, so that termination does not depend on
/// luck.
const CHAOS_STEPS: usize = MAX_STEPS / 2;

// ---------------------------------------------------------------------------
// Building fleets and specs

fn node(name: &str, rack: &str, health: Health, online: bool) -> NodeView {
    NodeView {
        name: name.to_string(),
        labels: BTreeMap::from([("rack".to_string(), rack.to_string())]),
        online,
        last_seen: T0,
        services: BTreeMap::from([(
            SERVICE.to_string(),
            ServiceView {
                version: Some(FROM.to_string()),
                health,
                staged: Vec::new(),
            },
        )]),
    }
}

fn fleet_of(nodes: impl IntoIterator<Item = NodeView>) -> Fleet {
    nodes.into_iter().map(|n| (n.name.clone(), n)).collect()
}

/// A spec as a user would write it, validated by `RolloutFile::resolve`.
fn spec(batch: &str, max_unavailable: &str, strategy: StrategyFile) -> RolloutSpec {
    RolloutFile {
        service: Some(SERVICE.into()),
        version: Some(TO.into()),
        selector: None,
        nodes: None,
        strategy: StrategyFile {
            batch: Some(batch.into()),
            max_unavailable: Some(max_unavailable.into()),
            ..strategy
        },
    }
    .resolve()
    .expect("test spec is valid")
}

// ---------------------------------------------------------------------------
// Random cases

#[derive(Debug, Clone)]
struct NodeGen {
    rack: u8,
    gpu: bool,
    health: Health,
    offline_for: Option<u64>,
    runs_api: bool,
}

#[derive(Debug, Clone)]
enum AmountGen {
    /// Resolved to a count in `1..=n` once the fleet size `n` is known.
    Count(u32),
    Percent(u32),
}

impl AmountGen {
    fn resolve(&self, n: usize) -> Amount {
        match *self {
            AmountGen::Count(c) => Amount::Count(1 + (c - 1) % n as u32),
            AmountGen::Percent(p) => Amount::Percent(p),
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    nodes: Vec<NodeGen>,
    selector: &'static str,
    batch: AmountGen,
    max_unavailable: AmountGen,
    max_failures: u32,
    auto_rollback: bool,
    /// Seconds; healthy_deadline = min_healthy + extra, progress = healthy + extra.
    min_healthy_s: u64,
    healthy_extra_s: u64,
    progress_extra_s: u64,
    /// Percent of tasks whose agent reports a failure.
    fail_pct: u64,
    /// Percent of steps after which a random node goes offline or comes back.
    flap_pct: u64,
    /// Percent of steps after which a random node's health changes.
    churn_pct: u64,
    /// Percent of steps after which the operator pauses, resumes, cancels or
    /// rolls back.
    operator_pct: u64,
    seed: u64,
}

fn node_gen() -> impl Strategy<Value = NodeGen> {
    (
        0u8..4,
        any::<bool>(),
        prop_oneof![
            6 => Just(Health::Healthy),
            1 => Just(Health::Unhealthy),
            1 => Just(Health::Starting),
        ],
        prop::option::weighted(0.1, 0u64..3_600),
        prop::bool::weighted(0.95),
    )
        .prop_map(|(rack, gpu, health, offline_for, runs_api)| NodeGen {
            rack,
            gpu,
            health,
            offline_for,
            runs_api,
        })
}

fn amount_gen(min_percent: u32) -> impl Strategy<Value = AmountGen> {
    prop_oneof![
        (1u32..=300).prop_map(AmountGen::Count),
        (min_percent..=100).prop_map(AmountGen::Percent),
    ]
}

fn case_gen() -> impl Strategy<Value = Case> {
    let nodes = prop_oneof![
        3 => prop::collection::vec(node_gen(), 1..=20),
        1 => prop::collection::vec(node_gen(), 1..=300),
    ];
    let selector = prop::sample::select(vec![
        "",
        "",
        "rack=r1",
        "rack in (r1,r2)",
        "rack!=r4",
        "!gpu",
    ]);
    (
        (nodes, selector, amount_gen(1), amount_gen(0)),
        (0u32..=3, any::<bool>(), 0u64..=10, 1u64..=30, 0u64..=60),
        (
            0u64..=30,
            0u64..=20,
            0u64..=10,
            prop_oneof![3 => Just(0u64), 1 => 1u64..=3],
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (nodes, selector, batch, max_unavailable),
                (max_failures, auto_rollback, min_healthy_s, healthy_extra_s, progress_extra_s),
                (fail_pct, flap_pct, churn_pct, operator_pct, seed),
            )| Case {
                nodes,
                selector,
                batch,
                max_unavailable,
                max_failures,
                auto_rollback,
                min_healthy_s,
                healthy_extra_s,
                progress_extra_s,
                fail_pct,
                flap_pct,
                churn_pct,
                operator_pct,
                seed,
            },
        )
}

impl Case {
    fn fleet(&self) -> Fleet {
        fleet_of(self.nodes.iter().enumerate().map(|(i, g)| {
            let mut n = node(
                &format!("n{i:03}"),
                &format!("r{}", g.rack + 1),
                g.health,
                g.offline_for.is_none(),
            );
            n.last_seen = T0 - g.offline_for.unwrap_or(0) * SEC;
            if g.gpu {
                n.labels.insert("gpu".into(), "yes".into());
            }
            if !g.runs_api {
                n.services.clear();
            }
            n
        }))
    }

    fn spec(&self) -> RolloutSpec {
        let n = self.nodes.len();
        let healthy_s = self.min_healthy_s + self.healthy_extra_s;
        let file = RolloutFile {
            service: Some(SERVICE.into()),
            version: Some(TO.into()),
            selector: Some(self.selector.into()),
            nodes: None,
            strategy: StrategyFile {
                batch: Some(self.batch.resolve(n).to_string().as_str().into()),
                max_unavailable: Some(self.max_unavailable.resolve(n).to_string().as_str().into()),
                min_healthy_time: Some(format!("{}s", self.min_healthy_s)),
                healthy_deadline: Some(format!("{healthy_s}s")),
                progress_deadline: Some(format!("{}s", healthy_s + self.progress_extra_s)),
                max_failures: Some(self.max_failures),
                auto_rollback: Some(self.auto_rollback),
                ..Default::default()
            },
        };
        file.resolve().expect("generated spec is valid")
    }
}

/// SplitMix64: the simulation's randomness, replayable from the case's seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
}

// ---------------------------------------------------------------------------
// The simulation

/// A task result an agent will report once `due` has passed and its node is
/// online.
#[derive(Debug, Clone)]
struct Report {
    due: Timestamp,
    node: String,
    task: String,
    kind: TaskKind,
    outcome: TaskOutcome,
}

struct Sim {
    case: Case,
    rng: Rng,
    now: Timestamp,
    fleet: Fleet,
    rollout: Rollout,
    selected: BTreeSet<String>,
    batch_size: usize,
    budget: usize,
    reports: Vec<Report>,
    /// Simulated time spent paused, when no deadline runs.
    paused: u64,
    /// Task ids dispatched so far, per node and kind.
    dispatched: BTreeMap<(String, u8), String>,
}

fn kind_key(k: TaskKind) -> u8 {
    match k {
        TaskKind::Upgrade => 0,
        TaskKind::Revert => 1,
    }
}

impl Sim {
    /// Plans the rollout, or returns `None` when the fleet has nothing to
    /// roll out to (checking that the planner said so for the right reason).
    fn new(case: Case) -> Option<Sim> {
        let fleet = case.fleet();
        let spec = case.spec();
        let selected: BTreeSet<String> = fleet
            .values()
            .filter(|n| n.services.contains_key(SERVICE) && spec.selector.matches(&n.labels))
            .map(|n| n.name.clone())
            .collect();
        let rollout = match plan_batches(7, spec.clone(), &fleet, T0) {
            Ok(r) => r,
            Err(e) => {
                assert!(selected.is_empty(), "planning failed: {e}");
                return None;
            }
        };
        let batch_size = spec.batch_size(selected.len());
        let budget = spec.unavailable_budget(selected.len());
        let rng = Rng(case.seed);
        let sim = Sim {
            case,
            rng,
            now: T0,
            fleet,
            rollout,
            selected,
            batch_size,
            budget,
            reports: Vec::new(),
            paused: 0,
            dispatched: BTreeMap::new(),
        };
        sim.check_plan(&sim.rollout);
        // Nodes already down go first, offline ones last.
        let rank = |name: &String| {
            let v = &sim.fleet[name];
            match (v.online, v.available(SERVICE)) {
                (true, false) => 0,
                (true, true) => 1,
                (false, _) => 2,
            }
        };
        let order: Vec<u8> = sim.rollout.batches.iter().flatten().map(rank).collect();
        assert!(
            order.windows(2).all(|w| w[0] <= w[1]),
            "batches not ordered by availability: {order:?}"
        );
        Some(sim)
    }

    fn check_plan(&self, r: &Rollout) {
        let selected = self.selected.iter().map(String::as_str);
        planned_once(&r.batches, selected).unwrap();
        batches_within(&r.batches, self.batch_size).unwrap();
        for (b, batch) in r.batches.iter().enumerate() {
            for name in batch {
                assert_eq!(r.nodes[name].batch, b, "{name} batch index");
            }
        }
    }

    /// One planner step, checked, then applied.
    fn step(&mut self) -> Decision {
        let before = unavailable_count(&self.rollout, &self.fleet);
        let d = step(&self.rollout, &self.fleet, self.now);
        let r = &d.rollout;
        let ctx = || format!("step at +{}ms, state {}", self.now - T0, r.state.as_str());

        self.check_plan(r);
        assert_eq!(
            r.batches,
            self.rollout.batches,
            "batches changed: {}",
            ctx()
        );
        assert_eq!(
            differs(r, &self.rollout),
            d.changed,
            "changed flag: {}",
            ctx()
        );
        if let Some(w) = d.next_wakeup {
            assert!(w > self.now, "next_wakeup {w} is not after now: {}", ctx());
        }

        let after = unavailable_count(r, &self.fleet);
        let reverts = d.dispatch.iter().any(|x| x.task.kind == TaskKind::Revert);
        if !reverts {
            // Rolling back is all at once, on purpose; every other step keeps
            // to the budget.
            within_budget(before, after, self.budget).unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        }

        let mut started = Vec::new();
        for x in &d.dispatch {
            let prior = self.rollout.nodes[&x.node].state;
            let now_state = r.nodes[&x.node].state;
            match x.task.kind {
                TaskKind::Upgrade => {
                    assert_eq!(
                        prior,
                        NodeState::Pending,
                        "upgrade of {}: {}",
                        x.node,
                        ctx()
                    );
                    assert_eq!(now_state, NodeState::Upgrading);
                    started.push(x.node.as_str());
                }
                TaskKind::Revert => {
                    assert_eq!(
                        prior,
                        NodeState::Upgraded,
                        "revert of {}: {}",
                        x.node,
                        ctx()
                    );
                    assert_eq!(now_state, NodeState::RollingBack);
                }
            }
            assert_eq!(x.task.started_at, self.now);
            assert_eq!(r.nodes[&x.node].task.as_ref(), Some(&x.task));
            let key = (x.node.clone(), kind_key(x.task.kind));
            if let Some(old) = self.dispatched.insert(key, x.task.id.clone()) {
                panic!(
                    "{} got a second {:?} task ({old}, then {}): {}",
                    x.node,
                    x.task.kind,
                    x.task.id,
                    ctx()
                );
            }
        }
        let kinds: BTreeSet<u8> = d.dispatch.iter().map(|x| kind_key(x.task.kind)).collect();
        assert!(
            kinds.len() <= 1,
            "one step both upgrades and reverts: {}",
            ctx()
        );
        batch_order(r, started).unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        if r.state.is_terminal() && !self.rollout.state.is_terminal() {
            settled(r).unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        }

        // Level-triggered: the same inputs again decide nothing new.
        let again = step(r, &self.fleet, self.now);
        assert!(
            again.dispatch.is_empty(),
            "second step dispatched: {}",
            ctx()
        );
        assert!(
            !again.changed,
            "second step changed the rollout: {}\nfirst: {r:#?}\nsecond: {:#?}",
            ctx(),
            again.rollout
        );

        self.rollout = d.rollout.clone();
        for x in &d.dispatch {
            self.agent_takes(&x.node, &x.task.id, x.task.kind);
        }
        d
    }

    /// The node's agent starts the task and schedules how it will end: within
    /// the healthy deadline, as the agent enforces it.
    fn agent_takes(&mut self, name: &str, task: &str, kind: TaskKind) {
        let spec = &self.rollout.spec;
        let (min, deadline) = (spec.min_healthy_time, spec.healthy_deadline);
        let fails = self.rng.percent(self.case.fail_pct);
        let (due, outcome) = if fails {
            let reason = format!("health gate failed on {name}");
            (
                self.now + self.rng.range(0, deadline),
                TaskOutcome::Failed { reason },
            )
        } else {
            (
                self.now + self.rng.range(min, deadline),
                TaskOutcome::Succeeded,
            )
        };
        if let Some(s) = self.service(name) {
            s.health = Health::Starting;
        }
        self.reports.push(Report {
            due,
            node: name.to_string(),
            task: task.to_string(),
            kind,
            outcome,
        });
    }

    fn service(&mut self, name: &str) -> Option<&mut ServiceView> {
        self.fleet.get_mut(name)?.services.get_mut(SERVICE)
    }

    /// Delivers every due report of an online node, checking that a repeated
    /// delivery is ignored.
    fn deliver_due(&mut self) {
        let (due, rest): (Vec<Report>, Vec<Report>) = std::mem::take(&mut self.reports)
            .into_iter()
            .partition(|x| x.due <= self.now && self.fleet[&x.node].online);
        self.reports = rest;
        for x in due {
            self.rollout
                .record_result(&x.node, &x.task, &x.outcome, self.now);
            let once = self.rollout.clone();
            let twice = self
                .rollout
                .record_result(&x.node, &x.task, &x.outcome, self.now + 1);
            assert!(!twice, "second result of {} was recorded", x.task);
            assert_eq!(
                self.rollout, once,
                "second result of {} changed the rollout",
                x.task
            );

            let healthy = self.rng.percent(90);
            let Some(s) = self.service(&x.node) else {
                continue;
            };
            s.version = Some(match (x.kind, &x.outcome) {
                (TaskKind::Upgrade, TaskOutcome::Succeeded) => TO.to_string(),
                (TaskKind::Revert, TaskOutcome::Failed { .. }) => TO.to_string(),
                _ => FROM.to_string(),
            });
            s.health = match x.outcome {
                TaskOutcome::Succeeded => Health::Healthy,
                TaskOutcome::Failed { .. } if healthy => Health::Healthy,
                TaskOutcome::Failed { .. } => Health::Unhealthy,
            };
        }
    }

    /// Moves time to the next interesting moment, no later than a random one,
    /// and lets the world change.
    fn advance(&mut self, wakeup: Option<Timestamp>, chaos: bool) {
        let deadline = self.rollout.spec.healthy_deadline;
        let mut next = self.now + self.rng.range(1, deadline.max(1));
        if let Some(w) = wakeup {
            next = next.min(w);
        }
        let now = self.now;
        let report = self
            .reports
            .iter()
            .filter(|x| x.due > now && self.fleet[&x.node].online)
            .map(|x| x.due)
            .min();
        if let Some(due) = report {
            next = next.min(due);
        }
        if self.rollout.state == RolloutState::Paused {
            self.paused += next - self.now;
        }
        self.now = next;

        if chaos && self.rng.percent(self.case.flap_pct) {
            let i = self.rng.range(0, self.fleet.len() as u64 - 1) as usize;
            let v = self.fleet.values_mut().nth(i).expect("index in range");
            v.online = !v.online;
            v.last_seen = next;
        }
        if chaos && self.rng.percent(self.case.churn_pct) {
            let i = self.rng.range(0, self.fleet.len() as u64 - 1) as usize;
            let health = [Health::Healthy, Health::Unhealthy, Health::Starting]
                [self.rng.range(0, 2) as usize];
            let v = self.fleet.values_mut().nth(i).expect("index in range");
            if let Some(s) = v.services.get_mut(SERVICE) {
                s.health = health;
            }
        }
        self.operate(chaos);
        self.deliver_due();
    }

    /// Now and then the operator steps in. A paused rollout is always resumed
    /// eventually: while paused, no deadline runs.
    fn operate(&mut self, chaos: bool) {
        let paused = self.rollout.state == RolloutState::Paused;
        let command = if paused && (!chaos || self.rng.percent(20)) {
            3
        } else if chaos && self.rng.percent(self.case.operator_pct) {
            self.rng.range(0, 3)
        } else {
            return;
        };
        let before = self.rollout.clone();
        let now = self.now;
        let result = match command {
            0 => self.rollout.cancel(now),
            1 => self.rollout.rollback(now),
            2 => self.rollout.pause(now),
            _ => self.rollout.resume(now),
        };
        if result.is_err() {
            assert_eq!(
                self.rollout, before,
                "a refused command changed the rollout"
            );
        }
    }

    /// Runs the rollout to its end.
    fn run(&mut self) {
        // While running, something finishes (or is given up) at least every
        // progress deadline, and each node finishes at most a few times.
        let n = self.rollout.nodes.len() as u64;
        let time_bound = (4 * n + 4) * self.rollout.spec.progress_deadline;
        for steps in 0..MAX_STEPS {
            let d = self.step();
            if !self.rollout.is_active() {
                self.check_end();
                let took = self.now - T0 - self.paused;
                assert!(
                    took <= time_bound,
                    "took {}s of simulated time, bound {}s",
                    took / SEC,
                    time_bound / SEC
                );
                return;
            }
            self.advance(d.next_wakeup, steps < CHAOS_STEPS);
        }
        panic!(
            "rollout still {} after {MAX_STEPS} steps ({}s simulated), waiting: {:?}",
            self.rollout.state.as_str(),
            (self.now - T0) / SEC,
            self.rollout.waiting
        );
    }

    fn check_end(&self) {
        let r = &self.rollout;
        assert!(r.state.is_terminal());
        assert_eq!(r.in_flight().count(), 0, "in flight after the end");
        assert!(r.finished_at.is_some());
        assert!(r.waiting.is_none(), "finished but waiting: {:?}", r.waiting);
        settled(r).unwrap_or_else(|e| panic!("at the end: {e}"));
    }

    /// Every node comes back and reports what it still owes, as agents do
    /// after an outage; the rollout must settle again consistently.
    fn late_reports(&mut self) {
        for v in self.fleet.values_mut() {
            v.online = true;
            v.last_seen = self.now;
        }
        for _ in 0..10 {
            self.now = self
                .reports
                .iter()
                .map(|x| x.due)
                .fold(self.now + 1, u64::max);
            self.deliver_due();
            self.step();
            if !self.rollout.is_active() && self.reports.is_empty() {
                break;
            }
        }
        let r = &self.rollout;
        assert!(!r.is_active(), "still active after late reports");
        assert_eq!(r.in_flight().count(), 0);
        if r.state == RolloutState::RolledBack {
            settled(r).unwrap_or_else(|e| panic!("after late reports: {e}"));
        }
        // A late failure after completion is recorded without reopening the
        // rollout (see PLANNER.md), so max_failures is only checked when the
        // rollout completes.
        if r.state == RolloutState::Completed {
            assert_eq!(r.count(NodeState::Pending), 0);
        }
    }
}

/// What `Decision::changed` must say: whether the step changed anything
/// besides `updated_at`.
fn differs(after: &Rollout, before: &Rollout) -> bool {
    let mut a = after.clone();
    a.updated_at = before.updated_at;
    a != *before
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn simulated_rollouts_keep_every_invariant(case in case_gen()) {
        if let Some(mut sim) = Sim::new(case) {
            sim.run();
            sim.late_reports();
        }
    }
}

// ---------------------------------------------------------------------------
// Examples

fn healthy_fleet(n: usize) -> Fleet {
    fleet_of((1..=n).map(|i| node(&format!("n{i}"), "r1", Health::Healthy, true)))
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn dispatched(d: &Decision) -> Vec<(&str, TaskKind)> {
    d.dispatch
        .iter()
        .map(|x| (x.node.as_str(), x.task.kind))
        .collect()
}

/// Reports success for every task the decision dispatched.
fn succeed_all(r: &mut Rollout, d: &Decision, now: Timestamp) {
    for x in &d.dispatch {
        assert!(r.record_result(&x.node, &x.task.id, &TaskOutcome::Succeeded, now));
    }
}

#[test]
fn six_healthy_nodes_in_batches_of_two() {
    let fleet = healthy_fleet(6);
    let spec = spec("2", "2", StrategyFile::default());
    let mut r = plan_batches(1, spec, &fleet, T0).unwrap();
    assert_eq!(
        r.batches,
        vec![
            names(&["n1", "n2"]),
            names(&["n3", "n4"]),
            names(&["n5", "n6"])
        ]
    );
    let mut now = T0;
    for batch in [["n1", "n2"], ["n3", "n4"], ["n5", "n6"]] {
        let d = step(&r, &fleet, now);
        let want: Vec<_> = batch.iter().map(|n| (*n, TaskKind::Upgrade)).collect();
        assert_eq!(dispatched(&d), want);
        r = d.rollout.clone();
        assert!(r.waiting.as_deref().unwrap().contains("health gate"));
        // Nothing more starts until the batch is done.
        now += 5 * SEC;
        assert!(step(&r, &fleet, now).dispatch.is_empty());
        succeed_all(&mut r, &d, now);
    }
    let d = step(&r, &fleet, now);
    assert_eq!(d.rollout.state, RolloutState::Completed);
    assert!(d.rollout.fully_upgraded());
    assert_eq!(d.rollout.reason.as_deref(), Some("6 of 6 nodes upgraded"));
}

#[test]
fn an_unhealthy_node_goes_first_and_costs_no_budget() {
    let mut fleet = healthy_fleet(4);
    fleet
        .get_mut("n3")
        .unwrap()
        .services
        .get_mut(SERVICE)
        .unwrap()
        .health = Health::Unhealthy;
    let spec = spec("2", "1", StrategyFile::default());
    let r = plan_batches(1, spec, &fleet, T0).unwrap();
    assert_eq!(r.batches[0], names(&["n3", "n1"]));
    assert!(r.events[1].message.contains("n3 (unhealthy)"));

    // n3 is already down: it may be switched, but with one of at most one
    // node unavailable, n1 has to wait for it.
    let d = step(&r, &fleet, T0);
    assert_eq!(dispatched(&d), vec![("n3", TaskKind::Upgrade)]);
    let waiting = d.rollout.waiting.as_deref().unwrap();
    assert!(
        waiting.contains("n1 waits: 1 of at most 1 nodes unavailable"),
        "{waiting}"
    );
}

#[test]
fn an_offline_node_counts_against_the_budget_then_becomes_unreachable() {
    let mut fleet = healthy_fleet(3);
    let n2 = fleet.get_mut("n2").unwrap();
    n2.online = false;
    n2.last_seen = T0 - 60 * SEC;
    let strategy = StrategyFile {
        healthy_deadline: Some("1m".into()),
        progress_deadline: Some("5m".into()),
        ..StrategyFile::default()
    };

    // Offline nodes go last; with a budget of one, the offline node blocks
    // everyone else until the progress deadline fails the rollout.
    let blocked = plan_batches(1, spec("1", "1", strategy.clone()), &fleet, T0).unwrap();
    assert_eq!(
        blocked.batches,
        vec![names(&["n1"]), names(&["n3"]), names(&["n2"])]
    );
    let d = step(&blocked, &fleet, T0);
    assert!(d.dispatch.is_empty());
    assert_eq!(
        d.rollout.waiting.as_deref(),
        Some("wave 1: n1 waits: 1 of at most 1 nodes unavailable")
    );
    assert_eq!(d.next_wakeup, Some(T0 + 5 * 60 * SEC));
    let d = step(&d.rollout, &fleet, T0 + 5 * 60 * SEC);
    assert_eq!(d.rollout.state, RolloutState::RolledBack);
    assert!(d
        .rollout
        .reason
        .as_deref()
        .unwrap()
        .contains("progress_deadline"));

    // With room for two, the others go ahead and the offline node is given up
    // as unreachable a healthy deadline after its turn came.
    let mut r = plan_batches(2, spec("1", "2", strategy), &fleet, T0).unwrap();
    let mut now = T0;
    for _ in 0..2 {
        let d = step(&r, &fleet, now);
        assert_eq!(d.dispatch.len(), 1);
        r = d.rollout.clone();
        now += 10 * SEC;
        succeed_all(&mut r, &d, now);
    }
    let d = step(&r, &fleet, now);
    assert!(d.dispatch.is_empty());
    assert_eq!(d.rollout.waiting.as_deref(), Some("wave 3: n2 is offline"));
    assert_eq!(d.next_wakeup, Some(now + 60 * SEC));
    let d = step(&d.rollout, &fleet, now + 60 * SEC);
    assert_eq!(d.rollout.nodes["n2"].state, NodeState::Unreachable);
    let d = step(&d.rollout, &fleet, now + 60 * SEC);
    assert_eq!(d.rollout.state, RolloutState::Completed);
    assert_eq!(
        d.rollout.reason.as_deref(),
        Some("2 of 3 nodes upgraded, 1 unreachable")
    );
}

#[test]
fn a_failure_beyond_max_failures_reverts_every_upgraded_node_at_once() {
    let fleet = healthy_fleet(6);
    let mut r = plan_batches(1, spec("2", "2", StrategyFile::default()), &fleet, T0).unwrap();
    let mut now = T0;
    for _ in 0..2 {
        let d = step(&r, &fleet, now);
        r = d.rollout.clone();
        now += 20 * SEC;
        succeed_all(&mut r, &d, now);
    }
    // Batch 3: n5 upgrades, n6 fails; max_failures is 0.
    let d = step(&r, &fleet, now);
    r = d.rollout.clone();
    let failed = TaskOutcome::Failed {
        reason: "health check failed".into(),
    };
    assert!(r.record_result("n5", &d.dispatch[0].task.id, &TaskOutcome::Succeeded, now));
    assert!(r.record_result("n6", &d.dispatch[1].task.id, &failed, now));

    let d = step(&r, &fleet, now);
    assert_eq!(d.rollout.state, RolloutState::RollingBack);
    let reverted: Vec<_> = dispatched(&d);
    assert_eq!(
        reverted,
        ["n1", "n2", "n3", "n4", "n5"].map(|n| (n, TaskKind::Revert))
    );
    assert_eq!(
        d.rollout.reason.as_deref(),
        Some("1 node(s) failed, more than max_failures = 0 (n6: health check failed)")
    );
    r = d.rollout.clone();
    succeed_all(&mut r, &d, now + SEC);
    let d = step(&r, &fleet, now + SEC);
    assert_eq!(d.rollout.state, RolloutState::RolledBack);
    assert_eq!(d.rollout.count(NodeState::RolledBack), 5);
    assert_eq!(d.rollout.count(NodeState::Failed), 1);
    settled(&d.rollout).unwrap();
}

#[test]
fn a_late_upgrade_after_the_rollback_finished_is_rolled_back_too() {
    let mut fleet = healthy_fleet(2);
    let strategy = StrategyFile {
        healthy_deadline: Some("1m".into()),
        ..StrategyFile::default()
    };
    let r = plan_batches(1, spec("1", "2", strategy), &fleet, T0).unwrap();
    let d = step(&r, &fleet, T0);
    let n1_task = d.dispatch[0].task.id.clone();
    // n1's agent drops off mid-upgrade and is given up as unreachable.
    let n1 = fleet.get_mut("n1").unwrap();
    n1.online = false;
    n1.last_seen = T0 + SEC;
    let now = T0 + 61 * SEC;
    let d = step(&d.rollout, &fleet, now);
    assert_eq!(d.rollout.nodes["n1"].state, NodeState::Unreachable);
    // n2 fails; max_failures is 0, nothing is upgraded: rolled back at once.
    let mut r = d.rollout.clone();
    let failed = TaskOutcome::Failed {
        reason: "health check failed".into(),
    };
    assert!(r.record_result("n2", &d.dispatch[0].task.id, &failed, now));
    let d = step(&r, &fleet, now);
    assert_eq!(d.rollout.state, RolloutState::RolledBack);
    assert!(!d.rollout.is_active());

    // n1 comes back and reports that its upgrade went through after all.
    fleet.get_mut("n1").unwrap().online = true;
    let mut r = d.rollout.clone();
    assert!(r.record_result("n1", &n1_task, &TaskOutcome::Succeeded, now + SEC));
    assert_eq!(r.nodes["n1"].state, NodeState::Upgraded);
    assert!(r.is_active(), "an upgraded node is left to roll back");
    let d = step(&r, &fleet, now + SEC);
    assert_eq!(d.rollout.state, RolloutState::RollingBack);
    assert_eq!(dispatched(&d), vec![("n1", TaskKind::Revert)]);
    let mut r = d.rollout.clone();
    succeed_all(&mut r, &d, now + 2 * SEC);
    let d = step(&r, &fleet, now + 2 * SEC);
    assert_eq!(d.rollout.state, RolloutState::RolledBack);
    assert_eq!(d.rollout.finished_at, Some(now + 2 * SEC));
    settled(&d.rollout).unwrap();
}

#[test]
fn a_node_that_came_back_gets_a_fresh_grace_period_when_it_drops_off_again() {
    // Batch 1 at a time, room for one unavailable node: n2's turn comes while
    // it is offline; it comes back but waits behind n3, which dropped off.
    let mut fleet = healthy_fleet(3);
    let strategy = StrategyFile {
        healthy_deadline: Some("1m".into()),
        progress_deadline: Some("10m".into()),
        ..StrategyFile::default()
    };
    let r = plan_batches(1, spec("1", "1", strategy), &fleet, T0).unwrap();
    let d = step(&r, &fleet, T0);
    let mut r = d.rollout.clone();
    succeed_all(&mut r, &d, T0 + 10 * SEC);
    fleet.get_mut("n2").unwrap().online = false;
    let d = step(&r, &fleet, T0 + 10 * SEC);
    assert_eq!(d.rollout.waiting.as_deref(), Some("wave 2: n2 is offline"));

    fleet.get_mut("n2").unwrap().online = true;
    fleet.get_mut("n3").unwrap().online = false;
    let d = step(&d.rollout, &fleet, T0 + 20 * SEC);
    assert!(d.dispatch.is_empty());
    assert_eq!(d.rollout.nodes["n2"].waiting_since, None);

    // Long after its first outage, n2 drops off again: it is given the full
    // healthy deadline again rather than written off at once.
    fleet.get_mut("n2").unwrap().online = false;
    let d = step(&d.rollout, &fleet, T0 + 120 * SEC);
    assert_eq!(d.rollout.nodes["n2"].state, NodeState::Pending);
    assert_eq!(d.next_wakeup, Some(T0 + 180 * SEC));
    let d = step(&d.rollout, &fleet, T0 + 180 * SEC);
    assert_eq!(d.rollout.nodes["n2"].state, NodeState::Unreachable);
}

#[test]
fn the_last_pending_node_given_up_lets_the_next_batch_start_in_the_same_step() {
    let mut fleet = healthy_fleet(2);
    fleet.get_mut("n2").unwrap().online = false;
    let strategy = StrategyFile {
        healthy_deadline: Some("1m".into()),
        ..StrategyFile::default()
    };
    // Both nodes are offline when the rollout is planned. n2 comes back; once
    // n1's grace period runs out, n2 starts in that same step.
    fleet.get_mut("n1").unwrap().online = false;
    let r = plan_batches(1, spec("1", "100%", strategy), &fleet, T0).unwrap();
    assert_eq!(r.batches, vec![names(&["n1"]), names(&["n2"])]);
    let d = step(&r, &fleet, T0);
    assert!(d.dispatch.is_empty());
    fleet.get_mut("n2").unwrap().online = true;
    let d = step(&d.rollout, &fleet, T0 + 60 * SEC);
    assert_eq!(d.rollout.nodes["n1"].state, NodeState::Unreachable);
    assert_eq!(dispatched(&d), vec![("n2", TaskKind::Upgrade)]);
    let again = step(&d.rollout, &fleet, T0 + 60 * SEC);
    assert!(!again.changed && again.dispatch.is_empty());
}
