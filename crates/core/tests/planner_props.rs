//! Whole rollouts, simulated: random fleets and specs (rolling or canary
//! waves, or all at once; `min_healthy`, `spread_by`, `order_by`, explicit
//! nodes), agents that report results at random later times (or never, when
//! their node drops off), nodes that drop off and come back, and an operator
//! who pauses, cancels, rolls back and promotes canary waves. A completed
//! rollout keeps converging the nodes it could not reach as they come back,
//! until it is superseded. After every planner step the rules in
//! `rollwave_core::invariants` must hold.
//!
//! The simulation is driven by a seed so that a failing case replays exactly;
//! proptest shrinks the fleet, the spec and the knobs around it. Most cases
//! have up to 300 nodes; a second, smaller set has 300 to 2000.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use rollwave_core::invariants::{
    all_or_nothing, batch_cuts, batch_order, batches_within, converged_when_back, domain_order,
    domains_in_order, dry_run_first, fails_as_one, fleet_healthy, floors_kept, in_flight_by_domain,
    planned_once, promotion_respected, settled, spread_within, staged_then_switched,
    switched_together, unavailable_count, within_budget,
};
use rollwave_core::{
    plan_batches, step, Amount, CountOrText, Decision, Fleet, Health, NodeState, NodeView,
    OrderFile, Rollout, RolloutFile, RolloutSpec, RolloutState, ServiceView, StrategyFile,
    TaskKind, TaskOutcome, Timestamp, WaveFile,
};

const SEC: u64 = 1000;
const T0: Timestamp = 1_700_000_000_000;
const SERVICE: &str = "api";
const FROM: &str = "1.0.0";
const TO: &str = "2.0.0";
/// Every simulated rollout must reach its end within this many steps, or ten
/// per node for large fleets.
const MAX_STEPS: usize = 10_000;
const REGIONS: [&str; 3] = ["eu-1", "us-1", "ap-1"];

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
                ..Default::default()
            },
        )]),
    }
}

fn fleet_of(nodes: impl IntoIterator<Item = NodeView>) -> Fleet {
    nodes.into_iter().map(|n| (n.name.clone(), n)).collect()
}

/// A spec as a user would write it, validated by `RolloutFile::resolve`.
fn spec_of(strategy: StrategyFile) -> RolloutSpec {
    RolloutFile {
        service: Some(SERVICE.into()),
        version: Some(TO.into()),
        selector: None,
        nodes: None,
        services: None,
        downgrade: None,
        hooks: None,
        strategy,
        analysis: None,
    }
    .resolve()
    .expect("test spec is valid")
}

/// A rolling spec with the given batch and budget.
fn spec(batch: &str, max_unavailable: &str, strategy: StrategyFile) -> RolloutSpec {
    spec_of(StrategyFile {
        batch: Some(batch.into()),
        max_unavailable: Some(max_unavailable.into()),
        ..strategy
    })
}

// ---------------------------------------------------------------------------
// Random cases

#[derive(Debug, Clone)]
struct NodeGen {
    /// `rack` label r1..r5.
    rack: u8,
    /// `region` label, one of `REGIONS`; `None`: the node has no region.
    region: Option<u8>,
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
enum KindGen {
    /// `named`: whether the file says `kind = "rolling"` or leaves it implied.
    Rolling { batch: AmountGen, named: bool },
    /// Waves as `(cumulative size, pause after it)`.
    Canary {
        waves: Vec<(AmountGen, bool)>,
        named: bool,
    },
    /// `kind = "all_at_once"`; each flag: whether the file spells out the
    /// only value it allows for `max_unavailable` ("100%"), `max_failures`
    /// (0) and `auto_rollback` (true). The case's batch, budget, spread,
    /// order, failures and rollback settings are left out.
    AllAtOnce {
        max_unavailable: bool,
        max_failures: bool,
        auto_rollback: bool,
    },
}

#[derive(Debug, Clone)]
struct Case {
    nodes: Vec<NodeGen>,
    selector: &'static str,
    /// Explicit `nodes`, as indices into the fleet; see `Case::explicit_name`.
    explicit: Option<Vec<u16>>,
    kind: KindGen,
    /// `None`: the default (the batch size; every node for a canary).
    max_unavailable: Option<AmountGen>,
    /// `min_healthy` as a percentage of the nodes running the service.
    min_healthy_pct: Option<u32>,
    /// How the floor is written: 0 a count (from `min_healthy_pct`), 1 that
    /// percentage, 2 `"majority"`; and whether per `rack` (`min_healthy_per`).
    floor_kind: (u8, bool),
    /// `spread_by = "rack"`, with `max_per_domain` if set.
    spread: Option<Option<u32>>,
    /// `order_by = "region"`, with these values first.
    order: Option<Vec<&'static str>>,
    max_failures: u32,
    auto_rollback: bool,
    /// Seconds; healthy_deadline = healthy_time + extra, progress = healthy + extra.
    healthy_time_s: u64,
    healthy_extra_s: u64,
    progress_extra_s: u64,
    /// Agents report at multiples of this many milliseconds (when the health
    /// gate allows), so that reports come together as they do in big fleets.
    tick: u64,
    /// Percent of tasks whose agent reports a failure.
    fail_pct: u64,
    /// Percent of steps after which a random node goes offline or comes back.
    flap_pct: u64,
    /// Percent of steps after which a random node's health changes.
    churn_pct: u64,
    /// Percent of steps after which the operator pauses, resumes, cancels,
    /// rolls back or promotes.
    operator_pct: u64,
    /// Percent of paused canary waves the operator rolls back or cancels
    /// instead of promoting.
    abandon_pct: u64,
    /// Percent of nodes that, once offline, stay offline until the very end
    /// (`Sim::late_reports`): a completed rollout converges without them.
    gone_pct: u64,
    /// Percent of a node's pending task results lost when it drops off: its
    /// agent finishes the task meanwhile, but the result never arrives.
    lose_pct: u64,
    /// Percent of steps after which a newer rollout of the service
    /// supersedes a converging one.
    supersede_pct: u64,
    seed: u64,
}

/// Large fleets are mostly healthy and online, as real ones are: otherwise
/// they start far beyond any budget and every case is the same stuck one.
fn node_gen(large: bool) -> impl Strategy<Value = NodeGen> {
    let (healthy, offline) = if large { (98, 0.01) } else { (6, 0.1) };
    (
        0u8..5,
        prop::option::weighted(0.9, 0u8..3),
        any::<bool>(),
        prop_oneof![
            healthy => Just(Health::Healthy),
            1 => Just(Health::Unhealthy),
            1 => Just(Health::Starting),
        ],
        prop::option::weighted(offline, 0u64..3_600),
        prop::bool::weighted(0.95),
    )
        .prop_map(
            |(rack, region, gpu, health, offline_for, runs_api)| NodeGen {
                rack,
                region,
                gpu,
                health,
                offline_for,
                runs_api,
            },
        )
}

fn amount_gen(min_percent: u32) -> impl Strategy<Value = AmountGen> {
    prop_oneof![
        (1u32..=300).prop_map(AmountGen::Count),
        (min_percent..=100).prop_map(AmountGen::Percent),
    ]
}

/// Large fleets keep batches and budgets to percentages of at least
/// `min_percent`, so that a case runs in a bounded number of steps.
fn sized_amount(large: bool, min_percent: u32) -> BoxedStrategy<AmountGen> {
    if large {
        (min_percent.max(5)..=100)
            .prop_map(AmountGen::Percent)
            .boxed()
    } else {
        amount_gen(min_percent).boxed()
    }
}

/// The waves a spec accepts: each above the earlier ones of its unit, and
/// none after 100% (sizes are cumulative); the others are left out.
fn increasing(waves: &[(Amount, bool)]) -> Vec<(Amount, bool)> {
    let mut out: Vec<(Amount, bool)> = Vec::new();
    for &(size, pause) in waves {
        let above = out.iter().all(|(earlier, _)| match (*earlier, size) {
            (Amount::Count(a), Amount::Count(b)) => b > a,
            (Amount::Percent(a), Amount::Percent(b)) => b > a,
            (Amount::Percent(100), _) => false,
            _ => true,
        });
        if above {
            out.push((size, pause));
        }
    }
    out
}

fn kind_gen(large: bool) -> impl Strategy<Value = KindGen> {
    let wave = (amount_gen(1), prop::bool::weighted(0.3));
    prop_oneof![
        2 => (sized_amount(large, 1), any::<bool>())
            .prop_map(|(batch, named)| KindGen::Rolling { batch, named }),
        2 => (prop::collection::vec(wave, 1..=4), any::<bool>())
            .prop_map(|(waves, named)| KindGen::Canary { waves, named }),
        1 => (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(max_unavailable, max_failures, auto_rollback)| KindGen::AllAtOnce {
                max_unavailable,
                max_failures,
                auto_rollback,
            }
        ),
    ]
}

fn case_gen(large: bool) -> impl Strategy<Value = Case> {
    let nodes = if large {
        prop::collection::vec(node_gen(true), 300..=2000).boxed()
    } else {
        prop_oneof![
            3 => prop::collection::vec(node_gen(false), 1..=20),
            1 => prop::collection::vec(node_gen(false), 1..=300),
        ]
        .boxed()
    };
    let selector = prop::sample::select(vec![
        "",
        "",
        "",
        "rack=r1",
        "rack in (r1,r2)",
        "rack!=r4",
        "!gpu",
        "region in (eu-1,us-1)",
    ]);
    let explicit = prop::option::weighted(0.15, prop::collection::vec(any::<u16>(), 1..=12));
    // Large fleets keep their floor below 95%, so that enough nodes may be
    // in flight at once.
    let min_healthy = prop::option::weighted(0.4, 0u32..=if large { 95 } else { 100 });
    // In large fleets, one node per rack at a time (also the default when
    // max_per_domain is left out) would take thousands of steps: small
    // fleets cover that.
    let max_per_domain = if large {
        (5u32..=50).prop_map(Some).boxed()
    } else {
        prop::option::weighted(0.7, 1u32..=3).boxed()
    };
    let spread = prop::option::weighted(0.4, max_per_domain);
    let order = prop::option::weighted(
        0.4,
        prop::sample::subsequence(vec!["eu-1", "us-1", "ap-1", "sa-1"], 0..=4).prop_shuffle(),
    );
    // Half the cases without failed tasks; large fleets with few, or any
    // would be more than max_failures.
    let fail_pct = if large {
        prop_oneof![3 => Just(0u64), 1 => 1u64..=2].boxed()
    } else {
        prop_oneof![Just(0u64), 1u64..=30].boxed()
    };
    let tick = if large {
        Just(5 * SEC).boxed()
    } else {
        prop_oneof![Just(1u64), Just(SEC)].boxed()
    };
    (
        (
            nodes,
            selector,
            explicit,
            kind_gen(large),
            prop::option::weighted(0.8, sized_amount(large, 0)),
        ),
        (
            min_healthy,
            spread,
            order,
            0u32..=3,
            any::<bool>(),
            (0u8..=2, any::<bool>()),
        ),
        (0u64..=10, 1u64..=30, 0u64..=60, tick),
        (
            fail_pct,
            0u64..=20,
            0u64..=10,
            prop_oneof![3 => Just(0u64), 1 => 1u64..=3],
            0u64..=40,
            any::<u64>(),
        ),
        (
            prop_oneof![Just(0u64), 0u64..=100],
            prop_oneof![3 => Just(0u64), 1 => 1u64..=50],
            prop_oneof![3 => Just(0u64), 1 => 1u64..=20],
        ),
    )
        .prop_map(
            |(
                (nodes, selector, explicit, kind, max_unavailable),
                (min_healthy_pct, spread, order, max_failures, auto_rollback, floor_kind),
                (healthy_time_s, healthy_extra_s, progress_extra_s, tick),
                (fail_pct, flap_pct, churn_pct, operator_pct, abandon_pct, seed),
                (gone_pct, lose_pct, supersede_pct),
            )| Case {
                nodes,
                selector,
                explicit,
                kind,
                max_unavailable,
                min_healthy_pct,
                floor_kind,
                spread,
                order,
                max_failures,
                auto_rollback,
                healthy_time_s,
                healthy_extra_s,
                progress_extra_s,
                tick,
                fail_pct,
                flap_pct,
                churn_pct,
                operator_pct,
                abandon_pct,
                gone_pct,
                lose_pct,
                supersede_pct,
                seed,
            },
        )
}

fn node_name(i: usize) -> String {
    format!("n{i:04}")
}

/// One quorum group as the model sees it, to predict the planner's refusals.
struct FloorGroup {
    members: usize,
    floor: usize,
    healthy_selected: usize,
    healthy_outside: usize,
}

/// The quorum groups of `runs` (by rack with `min_healthy_per`), from
/// scratch rather than through the crate's own `Quorum`.
fn floor_groups(
    spec: &RolloutSpec,
    runs: &[&NodeView],
    selected: &BTreeSet<String>,
) -> Vec<FloorGroup> {
    let mut by: BTreeMap<String, Vec<&NodeView>> = BTreeMap::new();
    for n in runs {
        let g = match &spec.min_healthy_per {
            Some(l) => n.labels.get(l).cloned().unwrap_or_default(),
            None => String::new(),
        };
        by.entry(g).or_default().push(n);
    }
    by.into_values()
        .map(|nodes| {
            let members = nodes.len();
            let floor = match spec.min_healthy {
                rollwave_core::Floor::Count(n) => n as usize,
                rollwave_core::Floor::Percent(p) => (members * p as usize).div_ceil(100),
                rollwave_core::Floor::Majority => members / 2 + 1,
            };
            let healthy = |inside: bool| {
                nodes
                    .iter()
                    .filter(|n| n.available(SERVICE) && selected.contains(&n.name) == inside)
                    .count()
            };
            FloorGroup {
                members,
                floor,
                healthy_selected: healthy(true),
                healthy_outside: healthy(false),
            }
        })
        .collect()
}

impl Case {
    /// `min_healthy` as written, see `floor_kind`.
    fn min_healthy(&self, running: usize) -> Option<CountOrText> {
        let p = self.min_healthy_pct?;
        Some(match self.floor_kind.0 {
            0 => CountOrText::Count((p as usize * running / 100) as i64),
            1 => CountOrText::Text(format!("{p}%")),
            _ => CountOrText::Text("majority".into()),
        })
    }
    fn fleet(&self) -> Fleet {
        fleet_of(self.nodes.iter().enumerate().map(|(i, g)| {
            let mut n = node(
                &node_name(i),
                &format!("r{}", g.rack + 1),
                g.health,
                g.offline_for.is_none(),
            );
            n.last_seen = T0 - g.offline_for.unwrap_or(0) * SEC;
            if let Some(r) = g.region {
                n.labels.insert("region".into(), REGIONS[r as usize].into());
            }
            if g.gpu {
                n.labels.insert("gpu".into(), "yes".into());
            }
            if !g.runs_api {
                n.services.clear();
            }
            n
        }))
    }

    /// One in fifty explicit names is a node the fleet does not have.
    fn explicit_name(&self, i: u16) -> String {
        if i % 50 == 49 {
            "n-ghost".into()
        } else {
            node_name(i as usize % self.nodes.len())
        }
    }

    fn spec(&self) -> RolloutSpec {
        let n = self.nodes.len();
        let running = self.nodes.iter().filter(|g| g.runs_api).count();
        let amount = |a: &AmountGen| CountOrText::Text(a.resolve(n).to_string());
        let (kind, batch, waves) = match &self.kind {
            KindGen::Rolling { batch, named } => {
                (named.then(|| "rolling".into()), Some(amount(batch)), None)
            }
            KindGen::AllAtOnce { .. } => (Some("all_at_once".into()), None, None),
            KindGen::Canary { waves, named } => {
                let resolved: Vec<(Amount, bool)> = waves
                    .iter()
                    .map(|(size, pause)| (size.resolve(n), *pause))
                    .collect();
                let text = |a: Amount| CountOrText::Text(a.to_string());
                let waves = increasing(&resolved)
                    .into_iter()
                    .map(|(size, pause)| match pause {
                        true => WaveFile::Table {
                            size: text(size),
                            pause: true,
                        },
                        false => WaveFile::Size(text(size)),
                    })
                    .collect();
                (named.then(|| "canary".into()), None, Some(waves))
            }
        };
        let healthy_s = self.healthy_time_s + self.healthy_extra_s;
        let mut file = RolloutFile {
            service: Some(SERVICE.into()),
            version: Some(TO.into()),
            selector: Some(self.selector.into()),
            nodes: self
                .explicit
                .as_ref()
                .map(|ix| ix.iter().map(|&i| self.explicit_name(i)).collect()),
            services: None,
            downgrade: None,
            hooks: None,
            strategy: StrategyFile {
                kind,
                batch,
                waves,
                max_unavailable: self.max_unavailable.as_ref().map(amount),
                min_healthy: self.min_healthy(running),
                min_healthy_per: self
                    .min_healthy(running)
                    .filter(|m| {
                        self.floor_kind.1
                            && !matches!(m, CountOrText::Count(0))
                            && *m != CountOrText::Text("0%".into())
                    })
                    .map(|_| "rack".into()),
                spread_by: self.spread.map(|_| "rack".into()),
                max_per_domain: self.spread.flatten(),
                order_by: self.order.as_ref().map(|_| "region".into()),
                order: self
                    .order
                    .as_ref()
                    .filter(|o| !o.is_empty())
                    .map(|o| OrderFile::Values(o.iter().map(|v| v.to_string()).collect())),
                min_healthy_time: Some(format!("{}s", self.healthy_time_s)),
                healthy_deadline: Some(format!("{healthy_s}s")),
                progress_deadline: Some(format!("{}s", healthy_s + self.progress_extra_s)),
                max_failures: Some(self.max_failures),
                auto_rollback: Some(self.auto_rollback),
                auto_finalize: None,
            },
            analysis: None,
        };
        if let KindGen::AllAtOnce {
            max_unavailable,
            max_failures,
            auto_rollback,
        } = self.kind
        {
            let s = &mut file.strategy;
            s.max_unavailable = max_unavailable.then(|| "100%".into());
            s.max_failures = max_failures.then_some(0);
            s.auto_rollback = auto_rollback.then_some(true);
            (s.spread_by, s.max_per_domain) = (None, None);
            (s.order_by, s.order) = (None, None);
        }
        let mut spec = file.resolve().expect("generated spec is valid");
        // One case in four has a release that declares a dry run; drawn
        // from the seed so that existing regressions replay unchanged.
        spec.dry_run = self.seed % 4 == 1;
        spec
    }

    /// The nodes that, once offline, stay offline until the end: drawn from
    /// the seed, apart from the simulation's own draws.
    fn gone(&self) -> BTreeSet<String> {
        let mut rng = Rng(self.seed ^ 0x676f_6e65);
        (0..self.nodes.len())
            .filter(|_| rng.percent(self.gone_pct))
            .map(node_name)
            .collect()
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
    /// The node dropped off while the task ran: the task still ends at
    /// `due`, but its result never reaches the control plane.
    lost: bool,
}

struct Sim {
    case: Case,
    rng: Rng,
    now: Timestamp,
    /// Nodes' labels never change, so this is also the fleet as planned.
    fleet: Fleet,
    rollout: Rollout,
    selected: BTreeSet<String>,
    batch_size: usize,
    budget: usize,
    reports: Vec<Report>,
    /// Simulated time spent waiting for the operator (paused, or a canary
    /// wave waiting for its promotion), which no deadline should count.
    held: u64,
    /// What the operator decides about each paused wave, and when.
    verdicts: BTreeMap<usize, (Timestamp, Verdict)>,
    /// Task ids dispatched so far, per node and kind (converge tasks aside).
    dispatched: BTreeMap<(String, u8), String>,
    /// Nodes that, once offline, stay offline until `late_reports`.
    gone: BTreeSet<String>,
    /// Steps that dispatched upgrades of an all-at-once rollout.
    switches: usize,
    /// Per node: converge tasks sent, and converge tasks given up as
    /// unreachable (each of which starts a new period of being unreachable).
    converges: BTreeMap<String, (usize, usize)>,
}

/// What the operator does about a wave waiting for its promotion.
#[derive(Debug, Clone, Copy)]
enum Verdict {
    Promote,
    RollBack,
    Cancel,
}

fn kind_key(k: TaskKind) -> u8 {
    match k {
        TaskKind::Upgrade => 0,
        TaskKind::Revert => 1,
        TaskKind::Stage => 2,
        TaskKind::Converge => 3,
        TaskKind::DryRun => 4,
    }
}

/// Whether the rollout has finished (a terminal state, nothing in flight)
/// apart from converging the nodes it could not reach.
fn done(r: &Rollout) -> bool {
    r.state.is_terminal() && r.in_flight().next().is_none()
}

/// The wave whose promotion the rollout waits for, if any: every node up to
/// it is done, it pauses, and it is not promoted yet.
fn awaiting_promotion(r: &Rollout) -> Option<usize> {
    let running = matches!(r.state, RolloutState::Running | RolloutState::Paused);
    if !running || !r.pauses.contains(&true) {
        return None;
    }
    let open = r.batches.iter().position(|b| {
        b.iter().any(|n| {
            let s = r.nodes[n].state;
            s == NodeState::Pending || s.in_flight()
        })
    })?;
    let w = open.checked_sub(1)?;
    (r.pauses[w] && !r.promoted.contains(&w)).then_some(w)
}

/// Whether `n` is already down (0), healthy (1) or offline (2): the order in
/// which nodes of one `order_by` domain are planned.
fn availability_rank(n: &NodeView) -> u8 {
    match (n.online, n.available(SERVICE)) {
        (true, false) => 0,
        (true, true) => 1,
        (false, _) => 2,
    }
}

impl Sim {
    /// Plans the rollout, or returns `None` when the planner refuses the spec
    /// (checking that it did so for the right reason).
    fn new(case: Case) -> Option<Sim> {
        let fleet = case.fleet();
        let spec = case.spec();
        let runs: Vec<&NodeView> = fleet
            .values()
            .filter(|n| n.services.contains_key(SERVICE))
            .collect();
        let selected: BTreeSet<String> = runs
            .iter()
            .filter(|n| spec.selector.matches(&n.labels))
            .filter(|n| spec.nodes.is_empty() || spec.nodes.contains(&n.name))
            .map(|n| n.name.clone())
            .collect();
        let refusal = if runs.is_empty() {
            Some("service")
        } else if spec
            .nodes
            .iter()
            .any(|x| !runs.iter().any(|v| &v.name == x))
        {
            Some("nodes")
        } else if selected.is_empty() {
            Some("selector")
        } else if floor_groups(&spec, &runs, &selected)
            .iter()
            .any(|g| g.floor >= g.members && g.healthy_selected > 0)
        {
            Some("strategy.min_healthy")
        } else if spec.all_at_once
            && floor_groups(&spec, &runs, &selected)
                .iter()
                .any(|g| g.healthy_outside < g.floor && g.healthy_selected > 0)
        {
            // Switching every selected node at once would leave fewer
            // healthy nodes than the floor.
            Some("strategy.min_healthy")
        } else {
            None
        };
        let rollout = match (plan_batches(7, spec.clone(), &fleet, T0), refusal) {
            (Ok(r), None) => r,
            (Err(e), Some(field)) => {
                assert_eq!(e.field, field, "refused for the wrong reason: {e}");
                return None;
            }
            (Ok(_), Some(field)) => panic!("planned, but {field} should have been refused"),
            (Err(e), None) => panic!("planning failed: {e}"),
        };
        let batch_size = spec.batch_size(selected.len());
        let budget = spec.unavailable_budget(selected.len());
        let rng = Rng(case.seed);
        let gone = case.gone();
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
            held: 0,
            verdicts: BTreeMap::new(),
            dispatched: BTreeMap::new(),
            gone,
            switches: 0,
            converges: BTreeMap::new(),
        };
        sim.check_plan();
        Some(sim)
    }

    /// The plan covers the selection once, cut where the spec says, one
    /// `order_by` domain after another.
    fn check_plan(&self) {
        let r = &self.rollout;
        planned_once(&r.batches, self.selected.iter().map(String::as_str)).unwrap();
        if r.spec.waves.is_empty() {
            batches_within(&r.batches, self.batch_size).unwrap();
        }
        if r.spec.all_at_once {
            assert_eq!(r.batches.len(), 1, "all at once is one batch");
        }
        batch_cuts(r, &self.fleet).unwrap();
        domains_in_order(r, &self.fleet).unwrap();
        assert!(r.promoted.is_empty());
        for (b, batch) in r.batches.iter().enumerate() {
            for name in batch {
                assert_eq!(r.nodes[name].batch, b, "{name} batch index");
            }
        }
        self.check_order_within_domains();
    }

    /// Within each `order_by` domain, nodes already down go first and
    /// offline ones last; within each of those, `spread_by` domains take
    /// turns, so that the k-th node of one rack comes before the (k+1)-th of
    /// any other.
    fn check_order_within_domains(&self) {
        let r = &self.rollout;
        let label = |name: &str, key: &str| -> String {
            self.fleet[name]
                .labels
                .get(key)
                .cloned()
                .unwrap_or_default()
        };
        let group = |name: &str| match &r.spec.order {
            Some(o) => label(name, &o.label),
            None => String::new(),
        };
        let rank = |name: &str| availability_rank(&self.fleet[name]);
        let flat: Vec<&String> = r.batches.iter().flatten().collect();
        for domain in flat.chunk_by(|a, b| group(a) == group(b)) {
            let ranks: Vec<u8> = domain.iter().map(|n| rank(n)).collect();
            assert!(
                ranks.windows(2).all(|w| w[0] <= w[1]),
                "not ordered by availability: {ranks:?}"
            );
            let Some(spread) = &r.spec.spread else {
                continue;
            };
            for class in domain.chunk_by(|a, b| rank(a) == rank(b)) {
                let mut seen: BTreeMap<String, usize> = BTreeMap::new();
                let turns: Vec<usize> = class
                    .iter()
                    .map(|n| {
                        let c = seen.entry(label(n, &spread.label)).or_default();
                        *c += 1;
                        *c
                    })
                    .collect();
                assert!(
                    turns.windows(2).all(|w| w[0] <= w[1]),
                    "{} domains do not take turns: {turns:?}",
                    spread.label
                );
            }
        }
    }

    /// One planner step, checked, then applied. Returns its `next_wakeup`.
    fn step(&mut self) -> Option<Timestamp> {
        let mut d = step(&self.rollout, &self.fleet, self.now);
        let changed = differs(&mut d.rollout, &self.rollout);
        let (old, r) = (&self.rollout, &d.rollout);
        let ctx = || format!("step at +{}ms, state {}", self.now - T0, r.state.as_str());

        // The plan is fixed; only the operator promotes.
        assert_eq!(r.batches, old.batches, "batches changed: {}", ctx());
        assert_eq!(r.pauses, old.pauses, "pauses changed: {}", ctx());
        assert_eq!(r.promoted, old.promoted, "promoted changed: {}", ctx());
        assert!(
            r.nodes
                .iter()
                .zip(&old.nodes)
                .all(|((a, x), (b, y))| a == b && x.batch == y.batch),
            "nodes changed: {}",
            ctx()
        );
        assert_eq!(changed, d.changed, "changed flag: {}", ctx());
        if let Some(w) = d.next_wakeup {
            assert!(w > self.now, "next_wakeup {w} is not after now: {}", ctx());
        }

        let switching = d
            .dispatch
            .iter()
            .any(|x| matches!(x.task.kind, TaskKind::Upgrade | TaskKind::Converge));
        let reverts = d.dispatch.iter().any(|x| x.task.kind == TaskKind::Revert);
        if switching && !reverts {
            // Rolling back is all at once, on purpose; every step that starts
            // upgrades or converges keeps to the budget and the floor. (A step
            // that starts nothing only ever ends tasks.)
            let fleet = &self.fleet;
            let (before, after) = (unavailable_count(old, fleet), unavailable_count(r, fleet));
            within_budget(before, after, self.budget).unwrap_or_else(|e| panic!("{e}: {}", ctx()));
            floors_kept(old, r, fleet).unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        }
        spread_within(r, &self.fleet).unwrap_or_else(|e| panic!("{e}: {}", ctx()));

        // Staging ahead: only pending, online nodes, each at most once; never
        // all at once, whose nodes stage as their own task.
        assert!(
            !r.spec.all_at_once || d.stage.is_empty(),
            "stage-ahead tasks all at once: {}",
            ctx()
        );
        for x in &d.stage {
            assert_eq!(x.task.kind, TaskKind::Stage, "{}", ctx());
            assert_eq!(old.nodes[&x.node].state, NodeState::Pending, "{}", ctx());
            assert!(
                self.fleet[&x.node].online,
                "staging offline {}: {}",
                x.node,
                ctx()
            );
            let key = (x.node.clone(), kind_key(TaskKind::Stage));
            assert!(
                self.dispatched.insert(key, x.task.id.clone()).is_none(),
                "{} staged twice: {}",
                x.node,
                ctx()
            );
        }

        let mut started = Vec::new();
        let mut converging = Vec::new();
        for x in &d.dispatch {
            let prior = old.nodes[&x.node].state;
            let now_state = r.nodes[&x.node].state;
            match x.task.kind {
                TaskKind::Upgrade => {
                    // All at once switches staged nodes; the others, pending ones.
                    let from = match r.spec.all_at_once {
                        true => NodeState::Staged,
                        false => NodeState::Pending,
                    };
                    assert_eq!(prior, from, "upgrade of {}: {}", x.node, ctx());
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
                TaskKind::Stage => {
                    assert!(
                        r.spec.all_at_once,
                        "a stage task among switching tasks: {}",
                        ctx()
                    );
                    assert_eq!(old.state, RolloutState::Running, "{}", ctx());
                    assert_eq!(prior, NodeState::Pending, "stage of {}: {}", x.node, ctx());
                    assert_eq!(now_state, NodeState::Staging);
                    assert!(
                        self.fleet[&x.node].online,
                        "stage task to offline {}: {}",
                        x.node,
                        ctx()
                    );
                    assert_eq!(x.task.id, r.task_id(&x.node, TaskKind::Stage));
                }
                TaskKind::DryRun => {
                    assert!(r.spec.dry_run && !old.dry_run_done, "{}", ctx());
                    assert_eq!(old.state, RolloutState::Running, "{}", ctx());
                    assert_eq!(
                        prior,
                        NodeState::Pending,
                        "dry run on {}: {}",
                        x.node,
                        ctx()
                    );
                    assert_eq!(now_state, NodeState::DryRunning);
                    assert!(
                        self.fleet[&x.node].online,
                        "dry run on offline {}: {}",
                        x.node,
                        ctx()
                    );
                    assert!(
                        r.in_flight().all(|(n, _)| n == x.node),
                        "a dry run beside other tasks: {}",
                        ctx()
                    );
                }
                TaskKind::Converge => {
                    // Converging starts once completed (in the step that
                    // completes the rollout, or later), until superseded.
                    assert!(
                        r.state == RolloutState::Completed && r.superseded_by.is_none(),
                        "converge of {} in a rollout {} (superseded by {:?}): {}",
                        x.node,
                        old.state.as_str(),
                        r.superseded_by,
                        ctx()
                    );
                    assert_eq!(
                        prior,
                        NodeState::Unreachable,
                        "converge of {}: {}",
                        x.node,
                        ctx()
                    );
                    assert_eq!(now_state, NodeState::Converging);
                    let view = &self.fleet[&x.node];
                    assert!(view.online, "converge of offline {}: {}", x.node, ctx());
                    assert_ne!(
                        view.services[SERVICE].version.as_deref(),
                        Some(TO),
                        "converge of {}, already on {TO}: {}",
                        x.node,
                        ctx()
                    );
                    assert_eq!(x.task.id, format!("r7-cv-{}", x.node));
                    converging.push(x.node.as_str());
                }
            }
            assert_eq!(x.task.started_at, self.now);
            assert_eq!(r.nodes[&x.node].task.as_ref(), Some(&x.task));
            // A dry run given up on a lost node may come back to it.
            if matches!(x.task.kind, TaskKind::Converge | TaskKind::DryRun) {
                continue;
            }
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
            "one step dispatched several kinds of tasks: {}",
            ctx()
        );

        // Convergence: one converge task per period of being unreachable; a
        // period ends when the node is sent one, and a new one starts when
        // that task is given up as unreachable. A node comes back on the
        // target version only if it runs it.
        for ((name, a), b) in old.nodes.iter().zip(r.nodes.values()) {
            match (a.state, b.state) {
                (NodeState::Converging, NodeState::Unreachable) => {
                    assert!(
                        !self.fleet[name].online,
                        "{name}'s converge given up while online: {}",
                        ctx()
                    );
                    self.converges.entry(name.clone()).or_default().1 += 1;
                }
                (NodeState::Unreachable, NodeState::Upgraded) => {
                    let view = &self.fleet[name];
                    assert!(
                        view.online && view.services[SERVICE].version.as_deref() == Some(TO),
                        "{name} came back on {TO} without running it: {}",
                        ctx()
                    );
                    assert!(
                        r.state == RolloutState::Completed && r.superseded_by.is_none(),
                        "{name} came back on {TO}: {}",
                        ctx()
                    );
                }
                _ => {}
            }
        }
        for name in &converging {
            let (sent, lost) = self.converges.entry(name.to_string()).or_default();
            *sent += 1;
            assert!(
                *sent <= *lost + 1,
                "{name} got converge task {sent} after losing {lost}: {}",
                ctx()
            );
        }
        converged_when_back(r, &self.fleet).unwrap_or_else(|e| panic!("{e}: {}", ctx()));

        // All at once: one switch, of every node, once all are staged; any
        // failure sends every node back; it ends all upgraded or none.
        switched_together(old, r, &self.fleet, started.iter().copied())
            .unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        if r.spec.all_at_once && !started.is_empty() {
            self.switches += 1;
            assert_eq!(self.switches, 1, "all at once switched twice: {}", ctx());
        }
        fails_as_one(r).unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        dry_run_first(r).unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        all_or_nothing(r).unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        staged_then_switched(r, &self.fleet).unwrap_or_else(|e| panic!("{e}: {}", ctx()));

        batch_order(r, started.iter().copied()).unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        domain_order(r, &self.fleet, started.iter().copied())
            .unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        promotion_respected(r, started.iter().copied())
            .unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        if awaiting_promotion(old).is_some() && old.state == RolloutState::Running {
            // Waiting for the operator is not a lack of progress.
            let reason = r.reason.as_deref().unwrap_or_default();
            assert!(
                !reason.contains("progress_deadline"),
                "failed while waiting for a promotion: {reason}: {}",
                ctx()
            );
        }
        if r.state == RolloutState::Running && awaiting_promotion(r).is_some() {
            assert!(d.dispatch.is_empty(), "dispatched at a pause: {}", ctx());
            let waiting = r.waiting.as_deref().unwrap_or_default();
            assert!(
                waiting.contains("waiting for `rollwave rollout promote 7`"),
                "waiting for a promotion, but says {waiting:?}: {}",
                ctx()
            );
        }
        if r.state.is_terminal() && !old.state.is_terminal() {
            settled(r).unwrap_or_else(|e| panic!("{e}: {}", ctx()));
        }

        // Level-triggered: the same inputs again decide nothing new.
        let again = step(r, &self.fleet, self.now);
        assert!(
            again.dispatch.is_empty() && again.stage.is_empty(),
            "second step dispatched: {}",
            ctx()
        );
        assert!(
            !again.changed,
            "second step changed the rollout: {}\nfirst: {r:#?}\nsecond: {:#?}",
            ctx(),
            again.rollout
        );

        let Decision {
            rollout,
            dispatch,
            next_wakeup,
            ..
        } = d;
        self.rollout = rollout;
        for x in &dispatch {
            self.agent_takes(&x.node, &x.task.id, x.task.kind);
        }
        next_wakeup
    }

    /// The node's agent starts the task and schedules how it will end: within
    /// the healthy deadline, as the agent enforces it.
    fn agent_takes(&mut self, name: &str, task: &str, kind: TaskKind) {
        let spec = &self.rollout.spec;
        let (min, deadline) = (spec.min_healthy_time, spec.healthy_deadline);
        let fails = self.rng.percent(self.case.fail_pct);
        let lo = if fails { 0 } else { min };
        let tick = self.case.tick;
        let due = ((self.now + self.rng.range(lo, deadline)) / tick * tick).max(self.now + lo);
        let outcome = if fails {
            let reason = format!("health gate failed on {name}");
            TaskOutcome::Failed { reason }
        } else {
            TaskOutcome::Succeeded
        };
        // Staging and dry runs switch nothing: the service keeps serving.
        if !matches!(kind, TaskKind::Stage | TaskKind::DryRun) {
            if let Some(s) = self.service(name) {
                s.health = Health::Starting;
            }
        }
        self.reports.push(Report {
            due,
            node: name.to_string(),
            task: task.to_string(),
            kind,
            outcome,
            lost: false,
        });
    }

    /// A node's agent connects or drops off. Dropping off loses some of the
    /// results it still owes.
    fn set_online(&mut self, name: &str, online: bool) {
        let v = self.fleet.get_mut(name).expect("node is in the fleet");
        v.online = online;
        v.last_seen = self.now;
        if !online {
            for x in self.reports.iter_mut().filter(|x| x.node == name) {
                x.lost |= self.rng.percent(self.case.lose_pct);
            }
        }
    }

    fn service(&mut self, name: &str) -> Option<&mut ServiceView> {
        self.fleet.get_mut(name)?.services.get_mut(SERVICE)
    }

    /// Delivers every due report of an online node, checking that delivering
    /// them all again is ignored; lost ones only end their task on the node.
    fn deliver_due(&mut self) {
        let (due, rest): (Vec<Report>, Vec<Report>) = std::mem::take(&mut self.reports)
            .into_iter()
            .partition(|x| x.due <= self.now && (x.lost || self.fleet[&x.node].online));
        self.reports = rest;
        if due.is_empty() {
            return;
        }
        let heard = || due.iter().filter(|x| !x.lost);
        for x in heard() {
            if self
                .rollout
                .record_result(&x.node, &x.task, &x.outcome, self.now)
            {
                // Each kind of task ends in its own states.
                let ok = x.outcome == TaskOutcome::Succeeded;
                let want = match (x.kind, ok) {
                    (TaskKind::Stage, true) => NodeState::Staged,
                    (TaskKind::Upgrade | TaskKind::Converge, true) => NodeState::Upgraded,
                    (TaskKind::Revert, true) => NodeState::RolledBack,
                    (TaskKind::Revert, false) => NodeState::RollbackFailed,
                    (TaskKind::DryRun, _) => NodeState::Pending,
                    (_, false) => NodeState::Failed,
                };
                let got = self.rollout.nodes[&x.node].state;
                assert_eq!(
                    got, want,
                    "{:?} of {} ended {:?}",
                    x.kind, x.node, x.outcome
                );
            }
        }
        let once = self.rollout.clone();
        for x in heard() {
            let twice = self
                .rollout
                .record_result(&x.node, &x.task, &x.outcome, self.now + 1);
            assert!(!twice, "second result of {} was recorded", x.task);
        }
        assert_eq!(self.rollout, once, "second results changed the rollout");
        for x in due {
            let healthy = self.rng.percent(90);
            let Some(s) = self.service(&x.node) else {
                continue;
            };
            if x.kind == TaskKind::Stage {
                if x.outcome == TaskOutcome::Succeeded && !s.staged.iter().any(|v| v == TO) {
                    s.staged.push(TO.to_string());
                }
                continue;
            }
            s.version = Some(match (x.kind, &x.outcome) {
                (TaskKind::Upgrade | TaskKind::Converge, TaskOutcome::Succeeded) => TO.to_string(),
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
            .filter(|x| x.due > now && (x.lost || self.fleet[&x.node].online))
            .map(|x| x.due)
            .min();
        if let Some(due) = report {
            next = next.min(due);
        }
        let awaiting = awaiting_promotion(&self.rollout);
        if let Some(w) = awaiting {
            if !self.verdicts.contains_key(&w) {
                // Promoted some time after the wave is done, up to one and a
                // half progress deadlines; or given up on within three.
                let pd = self.rollout.spec.progress_deadline;
                let verdict = match self.rng.percent(self.case.abandon_pct) {
                    false => (now + self.rng.range(0, pd + pd / 2), Verdict::Promote),
                    true if self.rng.percent(50) => {
                        (now + self.rng.range(0, 3 * pd), Verdict::RollBack)
                    }
                    true => (now + self.rng.range(0, 3 * pd), Verdict::Cancel),
                };
                self.verdicts.insert(w, verdict);
            }
            let (at, _) = self.verdicts[&w];
            if at > now {
                next = next.min(at);
            }
        }
        if self.rollout.state == RolloutState::Paused || awaiting.is_some() {
            self.held += next - self.now;
        }
        self.now = next;

        if chaos && self.rng.percent(self.case.flap_pct) {
            let i = self.rng.range(0, self.fleet.len() as u64 - 1) as usize;
            let v = self.fleet.values().nth(i).expect("index in range");
            let (name, online) = (v.name.clone(), v.online);
            self.set_online(&name, !online);
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
        if self.rollout.converging() {
            // Nodes the rollout could not reach come back, now and then,
            // unless they are gone for good; some drop off again while they
            // converge.
            let away: Vec<(String, NodeState)> = self
                .rollout
                .nodes
                .iter()
                .filter(|(_, n)| matches!(n.state, NodeState::Unreachable | NodeState::Converging))
                .map(|(name, n)| (name.clone(), n.state))
                .collect();
            for (name, state) in away {
                let online = self.fleet[&name].online;
                match state {
                    NodeState::Unreachable
                        if !online && !self.gone.contains(&name) && self.rng.percent(25) =>
                    {
                        self.set_online(&name, true)
                    }
                    NodeState::Converging if online && chaos && self.rng.percent(10) => {
                        self.set_online(&name, false)
                    }
                    _ => {}
                }
            }
            if chaos && self.rng.percent(self.case.supersede_pct) {
                self.rollout.supersede(8, next);
                assert!(!self.rollout.converging(), "superseded but converging");
            }
        }
        self.operate(chaos);
        self.deliver_due();
    }

    /// The operator decides about a wave waiting for its promotion when the
    /// time has come, and now and then steps in otherwise. A paused rollout is
    /// always resumed and a waiting wave promoted eventually: while paused,
    /// no deadline runs.
    fn operate(&mut self, chaos: bool) {
        if let Some(w) = awaiting_promotion(&self.rollout) {
            let (at, verdict) = self
                .verdicts
                .get(&w)
                .copied()
                .unwrap_or((self.now, Verdict::Promote));
            let now = self.now;
            let r = &mut self.rollout;
            let result = match (chaos, at <= now, verdict) {
                (true, false, _) => Ok(()),
                (false, _, _) | (true, true, Verdict::Promote) => r
                    .promote(now)
                    .map(|()| assert_eq!(r.promoted.last(), Some(&w))),
                (true, true, Verdict::RollBack) => r.rollback(None, now),
                (true, true, Verdict::Cancel) => r.cancel(now),
            };
            result.unwrap_or_else(|e| panic!("{verdict:?} at wave {}: {e}", w + 1));
        }
        let paused = self.rollout.state == RolloutState::Paused;
        let command = if paused && (!chaos || self.rng.percent(20)) {
            3
        } else if chaos && self.rng.percent(self.case.operator_pct) {
            self.rng.range(0, 4)
        } else {
            return;
        };
        let before = self.rollout.clone();
        let now = self.now;
        let result = match command {
            0 => self.rollout.cancel(now),
            1 => self.rollout.rollback(None, now),
            2 => self.rollout.pause(now),
            3 => self.rollout.resume(now),
            _ => self.rollout.promote(now),
        };
        if result.is_err() {
            assert_eq!(
                self.rollout, before,
                "a refused command changed the rollout"
            );
        }
    }

    /// Whether a converging rollout can only wait: nothing in flight, no
    /// result on its way, and each node it could not reach either offline for
    /// good or back but held back by the budget or the floor (which
    /// `converged_when_back` checks after every step).
    fn resting(&self) -> bool {
        let r = &self.rollout;
        r.converging()
            && r.in_flight().next().is_none()
            && !self
                .reports
                .iter()
                .any(|x| x.lost || self.fleet[&x.node].online)
            && r.nodes.iter().all(|(name, n)| {
                n.state != NodeState::Unreachable
                    || self.fleet[name].online
                    || self.gone.contains(name)
            })
    }

    /// Runs the rollout to its end: not active any more, or completed and
    /// resting while it converges.
    fn run(&mut self) {
        // While running, something finishes (or is given up) at least every
        // progress deadline, and each node finishes at most a few times.
        let n = self.rollout.nodes.len() as u64;
        let time_bound = (4 * n + 4) * self.rollout.spec.progress_deadline;
        // Nodes stop dropping off, health stops changing and the operator
        // stops intervening halfway, so that termination does not depend on
        // luck.
        let max_steps = MAX_STEPS.max(10 * self.fleet.len());
        let mut finished = false;
        for steps in 0..max_steps {
            let wakeup = self.step();
            if !finished && done(&self.rollout) {
                // Converging the nodes it could not reach takes as long as
                // they take to come back: not counted.
                finished = true;
                let took = self.now - T0 - self.held;
                assert!(
                    took <= time_bound,
                    "took {}s of simulated time, bound {}s",
                    took / SEC,
                    time_bound / SEC
                );
            }
            if !self.rollout.is_active() || self.resting() {
                self.check_end();
                return;
            }
            self.advance(wakeup, steps < max_steps / 2);
        }
        panic!(
            "rollout still {} after {max_steps} steps ({}s simulated), waiting: {:?}, converging: {}",
            self.rollout.state.as_str(),
            (self.now - T0) / SEC,
            self.rollout.waiting,
            self.rollout.converging()
        );
    }

    fn check_end(&self) {
        let r = &self.rollout;
        assert!(r.state.is_terminal());
        assert_eq!(r.in_flight().count(), 0, "in flight after the end");
        assert!(r.finished_at.is_some());
        assert!(r.waiting.is_none(), "finished but waiting: {:?}", r.waiting);
        let wakeup = step(r, &self.fleet, self.now).next_wakeup;
        assert_eq!(wakeup, None, "finished, but asks to be woken up");
        if r.state == RolloutState::Completed {
            // Results that came late (while converging) may have failed more
            // nodes than max_failures: `settled` held when it completed.
            assert_eq!(r.count(NodeState::Pending), 0);
        } else {
            settled(r).unwrap_or_else(|e| panic!("at the end: {e}"));
        }
        all_or_nothing(r).unwrap_or_else(|e| panic!("at the end: {e}"));
    }

    /// Every node comes back and reports what it still owes, as agents do
    /// after an outage; the rollout must settle again consistently, and
    /// finish converging unless the budget or the floor holds nodes back.
    fn late_reports(&mut self) {
        for v in self.fleet.values_mut() {
            v.online = true;
            v.last_seen = self.now;
        }
        let mut wakeup = None;
        // Converging takes a round per node at worst (a budget of one).
        for _ in 0..self.rollout.nodes.len() + 10 {
            self.now = self
                .reports
                .iter()
                .map(|x| x.due)
                .chain(wakeup)
                .fold(self.now + 1, u64::max);
            self.deliver_due();
            wakeup = self.step();
            if (!self.rollout.is_active() || self.resting()) && self.reports.is_empty() {
                break;
            }
        }
        let r = &self.rollout;
        assert!(
            !r.is_active() || self.resting(),
            "still active after late reports: {}, {:?}",
            r.state.as_str(),
            r.waiting
        );
        assert_eq!(r.in_flight().count(), 0);
        if matches!(
            r.state,
            RolloutState::RolledBack | RolloutState::RollbackFailed
        ) {
            settled(r).unwrap_or_else(|e| panic!("after late reports: {e}"));
        }
        // A late failure after completion is recorded without reopening the
        // rollout (see PLANNER.md), so max_failures is only checked when the
        // rollout completes.
        if r.state == RolloutState::Completed {
            assert_eq!(r.count(NodeState::Pending), 0);
        }
        all_or_nothing(r).unwrap_or_else(|e| panic!("after late reports: {e}"));
    }
}

/// What `Decision::changed` must say: whether the step changed anything
/// besides `updated_at`.
fn differs(after: &mut Rollout, before: &Rollout) -> bool {
    let updated_at = after.updated_at;
    after.updated_at = before.updated_at;
    let differs = after != before;
    after.updated_at = updated_at;
    differs
}

fn simulate(case: Case) {
    if let Some(mut sim) = Sim::new(case) {
        sim.run();
        sim.late_reports();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn simulated_rollouts_keep_every_invariant(case in case_gen(false)) {
        simulate(case);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn simulated_rollouts_of_large_fleets_keep_every_invariant(case in case_gen(true)) {
        simulate(case);
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
        waiting.contains("n1 waits: 1 of at most 1 nodes unavailable (n3 in flight)"),
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
    assert!(
        blocked.events[1].message.ends_with(
            "n2 (offline); 1 offline node spends all of max_unavailable 1: \
             no healthy node can start until one returns, or progress_deadline (5m) fails the rollout"
        ),
        "{}",
        blocked.events[1].message
    );
    let d = step(&blocked, &fleet, T0);
    assert!(d.dispatch.is_empty());
    assert_eq!(
        d.rollout.waiting.as_deref(),
        Some("wave 1: n1 waits: 1 of at most 1 nodes unavailable (n2 offline)")
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
fn a_failure_beyond_max_failures_reverts_every_upgraded_node_within_the_budget() {
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

    let mut d = step(&r, &fleet, now);
    assert_eq!(d.rollout.state, RolloutState::RollingBack);
    assert_eq!(
        d.rollout.reason.as_deref(),
        Some("1 node failed, more than max_failures = 0 (n6: health check failed)")
    );
    // Two at a time (max_unavailable 2), the last upgraded first.
    let mut reverted = Vec::new();
    while d.rollout.state == RolloutState::RollingBack {
        assert!(d.dispatch.len() <= 2, "{:?}", dispatched(&d));
        reverted.extend(dispatched(&d).into_iter().map(|(n, _)| n.to_string()));
        r = d.rollout.clone();
        now += SEC;
        succeed_all(&mut r, &d, now);
        d = step(&r, &fleet, now);
    }
    assert_eq!(reverted, names(&["n5", "n3", "n4", "n1", "n2"]));
    assert_eq!(d.rollout.state, RolloutState::RolledBack);
    assert_eq!(d.rollout.count(NodeState::RolledBack), 5);
    assert_eq!(d.rollout.count(NodeState::Failed), 1);
    settled(&d.rollout).unwrap();
}

#[test]
fn a_rollback_that_leaves_a_node_behind_ends_rollback_failed_naming_it() {
    let fleet = healthy_fleet(3);
    let mut r = plan_batches(1, spec("1", "1", StrategyFile::default()), &fleet, T0).unwrap();
    let mut now = T0;
    for _ in 0..2 {
        let d = step(&r, &fleet, now);
        r = d.rollout.clone();
        now += 20 * SEC;
        succeed_all(&mut r, &d, now);
    }
    // n3 fails: n1 and n2 go back, and n2's revert fails.
    let d = step(&r, &fleet, now);
    r = d.rollout.clone();
    let failed = |reason: &str| TaskOutcome::Failed {
        reason: reason.into(),
    };
    assert!(r.record_result(
        "n3",
        &d.dispatch[0].task.id,
        &failed("health check failed"),
        now
    ));
    // One at a time (max_unavailable 1), the last upgraded first.
    let d = step(&r, &fleet, now);
    assert_eq!(dispatched(&d), [("n2", TaskKind::Revert)]);
    r = d.rollout.clone();
    now += SEC;
    let restore = "restore of backup r1-up-n2 not verified: 0/db: sha256 differs";
    assert!(r.record_result("n2", &d.dispatch[0].task.id, &failed(restore), now));
    let d = step(&r, &fleet, now);
    assert_eq!(dispatched(&d), [("n1", TaskKind::Revert)]);
    r = d.rollout.clone();
    now += SEC;
    assert!(r.record_result("n1", &d.dispatch[0].task.id, &TaskOutcome::Succeeded, now));
    let d = step(&r, &fleet, now);
    let r = d.rollout;
    assert_eq!(r.state, RolloutState::RollbackFailed, "{:?}", r.reason);
    assert!(r.state.is_terminal() && !r.is_active());
    assert_eq!(
        r.reason.as_deref(),
        Some(
            "1 of 3 nodes not back on their previous version: \
             n2 (rollback_failed: restore of backup r1-up-n2 not verified: 0/db: sha256 differs); \
             the rollback followed: 1 node failed, more than max_failures = 0 (n3: health check failed)"
        )
    );
    assert_eq!(
        r.rollback_cause(),
        Some("1 node failed, more than max_failures = 0 (n3: health check failed)")
    );
    settled(&r).unwrap();
    // Nothing more to decide, and asking for a rollback again changes nothing.
    let again = step(&r, &fleet, now + SEC);
    assert!(!again.changed && again.dispatch.is_empty());
    let mut asked = r.clone();
    asked.rollback(None, now + SEC).unwrap();
    assert_eq!(asked, r);
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
    // What n1 runs is not known: the rollback cannot claim it is back.
    assert_eq!(d.rollout.state, RolloutState::RollbackFailed);
    let reason = d.rollout.reason.as_deref().unwrap();
    assert!(
        reason.starts_with("1 of 2 nodes not back on their previous version: n1 (unreachable: agent unreachable for 1m"),
        "{reason}"
    );
    assert!(
        reason.contains("the rollback followed: 1 node failed"),
        "{reason}"
    );
    settled(&d.rollout).unwrap();
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
    let reason = d.rollout.reason.as_deref().unwrap();
    assert!(reason.starts_with("1 node failed"), "{reason}");
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

// ---------------------------------------------------------------------------
// Examples: canary waves, min_healthy, spread_by, order_by

fn labelled(name: &str, key: &str, value: &str) -> NodeView {
    let mut n = node(name, "r1", Health::Healthy, true);
    n.labels.insert(key.into(), value.into());
    n
}

/// Records success for the dispatched tasks of `nodes`, which then run the
/// new version, healthy.
fn finish(r: &mut Rollout, fleet: &mut Fleet, d: &Decision, nodes: &[&str], now: Timestamp) {
    for x in d
        .dispatch
        .iter()
        .filter(|x| nodes.contains(&x.node.as_str()))
    {
        assert!(r.record_result(&x.node, &x.task.id, &TaskOutcome::Succeeded, now));
        let s = fleet
            .get_mut(&x.node)
            .and_then(|v| v.services.get_mut(SERVICE))
            .expect("node runs the service");
        s.version = Some(TO.into());
        s.health = Health::Healthy;
    }
}

#[test]
fn a_canary_waits_for_its_promotion_after_the_first_wave_then_continues() {
    let mut fleet = healthy_fleet(4);
    let spec = spec_of(StrategyFile {
        kind: Some("canary".into()),
        waves: Some(vec![
            WaveFile::Table {
                size: "1".into(),
                pause: true,
            },
            WaveFile::Size("50%".into()),
            WaveFile::Size("100%".into()),
        ]),
        max_unavailable: Some("2".into()),
        ..StrategyFile::default()
    });
    let mut r = plan_batches(1, spec, &fleet, T0).unwrap();
    assert_eq!(
        r.batches,
        vec![names(&["n1"]), names(&["n2"]), names(&["n3", "n4"])]
    );
    assert_eq!(r.pauses, [true, false, false]);

    let d = step(&r, &fleet, T0);
    assert_eq!(dispatched(&d), [("n1", TaskKind::Upgrade)]);
    r = d.rollout.clone();
    assert!(
        r.clone().promote(T0).is_err(),
        "nothing to promote while the canary runs"
    );
    finish(&mut r, &mut fleet, &d, &["n1"], T0 + 20 * SEC);

    // The canary is done: nothing starts until the operator promotes it,
    // however long that takes (the progress deadline is 10 minutes).
    let waiting = Some("wave 1 of 3 is done: waiting for `rollwave rollout promote 1`");
    for now in [T0 + 20 * SEC, T0 + 2 * 3600 * SEC] {
        let d = step(&r, &fleet, now);
        assert!(d.dispatch.is_empty());
        assert_eq!(d.rollout.waiting.as_deref(), waiting);
        assert_eq!(d.rollout.state, RolloutState::Running);
        promotion_respected(&d.rollout, []).unwrap();
        r = d.rollout;
    }
    let now = T0 + 2 * 3600 * SEC;
    r.promote(now).unwrap();
    assert_eq!(r.promoted, [0]);
    assert_eq!(
        r.events.last().unwrap().message,
        "wave 1 promoted by operator"
    );

    let d = step(&r, &fleet, now);
    assert_eq!(dispatched(&d), [("n2", TaskKind::Upgrade)]);
    r = d.rollout.clone();
    assert!(r.clone().promote(now).is_err(), "wave 2 does not pause");
    finish(&mut r, &mut fleet, &d, &["n2"], now + 20 * SEC);
    let d = step(&r, &fleet, now + 20 * SEC);
    assert_eq!(
        dispatched(&d),
        [("n3", TaskKind::Upgrade), ("n4", TaskKind::Upgrade)]
    );
    r = d.rollout.clone();
    finish(&mut r, &mut fleet, &d, &["n3", "n4"], now + 40 * SEC);
    let d = step(&r, &fleet, now + 40 * SEC);
    assert!(d.rollout.fully_upgraded());
}

#[test]
fn min_healthy_keeps_two_of_a_three_node_quorum_upgrading_the_down_node_first() {
    let mut fleet = healthy_fleet(3);
    fleet
        .get_mut("n2")
        .and_then(|v| v.services.get_mut(SERVICE))
        .unwrap()
        .health = Health::Unhealthy;
    // Budget and batch would allow all three at once: only the floor holds
    // them back.
    let spec = spec_of(StrategyFile {
        batch: Some("100%".into()),
        max_unavailable: Some("100%".into()),
        min_healthy: Some(CountOrText::Count(2)),
        ..StrategyFile::default()
    });
    let mut r = plan_batches(1, spec, &fleet, T0).unwrap();
    assert_eq!(r.batches, vec![names(&["n2", "n1", "n3"])]);
    assert_eq!(fleet_healthy(&r, &fleet), 2);

    let mut now = T0;
    for node in ["n2", "n1", "n3"] {
        let d = step(&r, &fleet, now);
        assert_eq!(dispatched(&d), [(node, TaskKind::Upgrade)]);
        assert_eq!(
            fleet_healthy(&d.rollout, &fleet),
            2,
            "while {node} upgrades"
        );
        if node == "n2" {
            // n2 was down already: switching it costs nothing. The others
            // wait, as taking either down would leave one healthy node.
            assert_eq!(
                d.rollout.waiting.as_deref(),
                Some(
                    "wave 1: n1 waits: 2 nodes of api are healthy fleet-wide and min_healthy is 2; \
                     n3 waits: 2 nodes of api are healthy fleet-wide and min_healthy is 2"
                )
            );
        }
        r = d.rollout.clone();
        now += 20 * SEC;
        finish(&mut r, &mut fleet, &d, &[node], now);
        assert_eq!(fleet_healthy(&r, &fleet), 3);
    }
    let d = step(&r, &fleet, now);
    assert!(d.rollout.fully_upgraded());
}

#[test]
fn spread_by_rack_never_has_two_nodes_of_one_rack_in_flight() {
    let mut fleet = fleet_of(
        [
            ("n1", "r1"),
            ("n2", "r1"),
            ("n3", "r2"),
            ("n4", "r2"),
            ("n5", "r3"),
            ("n6", "r3"),
        ]
        .map(|(name, rack)| node(name, rack, Health::Healthy, true)),
    );
    let spec = spec_of(StrategyFile {
        batch: Some("100%".into()),
        max_unavailable: Some("100%".into()),
        spread_by: Some("rack".into()),
        max_per_domain: Some(1),
        ..StrategyFile::default()
    });
    let mut r = plan_batches(1, spec, &fleet, T0).unwrap();
    // Racks take turns within the batch.
    assert_eq!(
        r.batches,
        vec![names(&["n1", "n3", "n5", "n2", "n4", "n6"])]
    );

    let one_per_rack = |r: &Rollout, fleet: &Fleet| {
        spread_within(r, fleet).unwrap();
        assert!(in_flight_by_domain(r, fleet, "rack")
            .values()
            .all(|&c| c <= 1));
    };
    let d = step(&r, &fleet, T0);
    assert_eq!(
        dispatched(&d),
        ["n1", "n3", "n5"].map(|n| (n, TaskKind::Upgrade))
    );
    let waiting = d.rollout.waiting.as_deref().unwrap();
    assert!(
        waiting.contains("n2 waits: 1 node with rack=r1 already in flight (max_per_domain 1)"),
        "{waiting}"
    );
    one_per_rack(&d.rollout, &fleet);
    let first = d;
    r = first.rollout.clone();

    // r2 is free again: n4 starts, n2 and n6 still wait for their racks.
    finish(&mut r, &mut fleet, &first, &["n3"], T0 + 20 * SEC);
    let d = step(&r, &fleet, T0 + 20 * SEC);
    assert_eq!(dispatched(&d), [("n4", TaskKind::Upgrade)]);
    one_per_rack(&d.rollout, &fleet);
    r = d.rollout.clone();

    finish(&mut r, &mut fleet, &first, &["n1", "n5"], T0 + 30 * SEC);
    let last = step(&r, &fleet, T0 + 30 * SEC);
    assert_eq!(
        dispatched(&last),
        ["n2", "n6"].map(|n| (n, TaskKind::Upgrade))
    );
    one_per_rack(&last.rollout, &fleet);
    r = last.rollout.clone();
    finish(&mut r, &mut fleet, &d, &["n4"], T0 + 40 * SEC);
    finish(&mut r, &mut fleet, &last, &["n2", "n6"], T0 + 40 * SEC);
    assert!(step(&r, &fleet, T0 + 40 * SEC).rollout.fully_upgraded());
}

#[test]
fn order_by_region_finishes_eu_before_any_us_node_starts() {
    let mut fleet = fleet_of([
        labelled("n1", "region", "ap-1"),
        labelled("n2", "region", "eu-1"),
        labelled("n3", "region", "us-1"),
        labelled("n4", "region", "eu-1"),
        labelled("n5", "region", "us-1"),
        node("n6", "r1", Health::Healthy, true),
    ]);
    let spec = spec_of(StrategyFile {
        batch: Some("100%".into()),
        max_unavailable: Some("100%".into()),
        order_by: Some("region".into()),
        order: Some(OrderFile::Values(vec!["eu-1".into(), "us-1".into()])),
        ..StrategyFile::default()
    });
    let mut r = plan_batches(1, spec, &fleet, T0).unwrap();
    // The listed regions in their order, then the others by name: n6 has no
    // region, which sorts first.
    assert_eq!(
        r.batches,
        vec![
            names(&["n2", "n4"]),
            names(&["n3", "n5"]),
            names(&["n6"]),
            names(&["n1"])
        ]
    );
    domains_in_order(&r, &fleet).unwrap();

    let mut now = T0;
    let d = step(&r, &fleet, now);
    assert_eq!(dispatched(&d), ["n2", "n4"].map(|n| (n, TaskKind::Upgrade)));
    let eu = d;
    r = eu.rollout.clone();

    // One eu-1 node done is not enough: us-1 waits for the whole region.
    now += 10 * SEC;
    finish(&mut r, &mut fleet, &eu, &["n2"], now);
    let d = step(&r, &fleet, now);
    assert!(d.dispatch.is_empty());
    assert_eq!(
        d.rollout.waiting.as_deref(),
        Some("wave 1 of 4: waiting for n4 to pass the health gate")
    );
    r = d.rollout;

    now += 10 * SEC;
    finish(&mut r, &mut fleet, &eu, &["n4"], now);
    for next in [&["n3", "n5"][..], &["n6"], &["n1"]] {
        let d = step(&r, &fleet, now);
        let started: Vec<&str> = d.dispatch.iter().map(|x| x.node.as_str()).collect();
        assert_eq!(started, next);
        domain_order(&d.rollout, &fleet, started.iter().copied()).unwrap();
        r = d.rollout.clone();
        now += 10 * SEC;
        finish(&mut r, &mut fleet, &d, next, now);
    }
    assert!(step(&r, &fleet, now).rollout.fully_upgraded());
}

#[test]
fn a_second_step_says_the_same_of_a_node_its_rack_holds_back() {
    // n1 is down and goes first; n2 waits for its rack (r1); n3, on r2,
    // starts after it and fills the budget. Asked again, the planner must
    // decide nothing new: not even a different reason for n2 to wait.
    let fleet = fleet_of([
        node("n1", "r1", Health::Unhealthy, true),
        node("n2", "r1", Health::Healthy, true),
        node("n3", "r2", Health::Healthy, true),
    ]);
    let spec = spec_of(StrategyFile {
        batch: Some("100%".into()),
        max_unavailable: Some("2".into()),
        spread_by: Some("rack".into()),
        ..StrategyFile::default()
    });
    let r = plan_batches(1, spec, &fleet, T0).unwrap();
    assert_eq!(r.batches, vec![names(&["n1", "n2", "n3"])]);
    let d = step(&r, &fleet, T0);
    assert_eq!(dispatched(&d), ["n1", "n3"].map(|n| (n, TaskKind::Upgrade)));
    let again = step(&d.rollout, &fleet, T0);
    assert_eq!(again.rollout.waiting, d.rollout.waiting);
    assert!(!again.changed);
}

// ---------------------------------------------------------------------------
// Examples: all at once

fn all_at_once(strategy: StrategyFile) -> RolloutSpec {
    spec_of(StrategyFile {
        kind: Some("all_at_once".into()),
        ..strategy
    })
}

fn failed() -> TaskOutcome {
    TaskOutcome::Failed {
        reason: "health check failed".into(),
    }
}

/// Records `outcome` for the dispatched tasks of `nodes`.
fn report(r: &mut Rollout, d: &Decision, nodes: &[&str], outcome: &TaskOutcome, now: Timestamp) {
    for x in d
        .dispatch
        .iter()
        .filter(|x| nodes.contains(&x.node.as_str()))
    {
        assert!(r.record_result(&x.node, &x.task.id, outcome, now));
    }
}

#[test]
fn all_at_once_stages_every_node_then_switches_them_all_in_one_step() {
    let mut fleet = healthy_fleet(3);
    let mut r = plan_batches(1, all_at_once(StrategyFile::default()), &fleet, T0).unwrap();
    assert_eq!(r.batches, vec![names(&["n1", "n2", "n3"])]);

    // Phase 1: each node stages, as its own task; nothing is staged ahead.
    let staging = step(&r, &fleet, T0);
    assert_eq!(
        dispatched(&staging),
        ["n1", "n2", "n3"].map(|n| (n, TaskKind::Stage))
    );
    assert!(staging.stage.is_empty());
    assert_eq!(staging.dispatch[0].task.id, "r1-st-n1");
    r = staging.rollout.clone();
    assert_eq!(r.count(NodeState::Staging), 3);

    // Two of three staged: the switch waits for the third.
    report(
        &mut r,
        &staging,
        &["n1", "n2"],
        &TaskOutcome::Succeeded,
        T0 + SEC,
    );
    let d = step(&r, &fleet, T0 + SEC);
    assert!(d.dispatch.is_empty());
    assert_eq!(d.rollout.count(NodeState::Staged), 2);
    r = d.rollout;
    report(
        &mut r,
        &staging,
        &["n3"],
        &TaskOutcome::Succeeded,
        T0 + 2 * SEC,
    );

    // Phase 2: every switch, in this one step.
    let switch = step(&r, &fleet, T0 + 2 * SEC);
    assert_eq!(
        dispatched(&switch),
        ["n1", "n2", "n3"].map(|n| (n, TaskKind::Upgrade))
    );
    assert!(switch
        .dispatch
        .iter()
        .all(|x| x.task.started_at == T0 + 2 * SEC));
    switched_together(&r, &switch.rollout, &fleet, ["n1", "n2", "n3"]).unwrap();
    r = switch.rollout.clone();
    finish(&mut r, &mut fleet, &switch, &["n1", "n2"], T0 + 20 * SEC);
    let d = step(&r, &fleet, T0 + 20 * SEC);
    assert!(d.dispatch.is_empty());
    assert_eq!(d.rollout.state, RolloutState::Running);
    r = d.rollout;
    finish(&mut r, &mut fleet, &switch, &["n3"], T0 + 30 * SEC);
    let d = step(&r, &fleet, T0 + 30 * SEC);
    assert!(d.rollout.fully_upgraded());
    assert!(!d.rollout.is_active());
    all_or_nothing(&d.rollout).unwrap();
}

#[test]
fn all_at_once_stages_an_offline_node_once_it_is_back_within_its_grace_period() {
    let mut fleet = healthy_fleet(2);
    fleet.get_mut("n2").unwrap().online = false;
    let spec = all_at_once(StrategyFile {
        healthy_deadline: Some("1m".into()),
        ..StrategyFile::default()
    });
    let r = plan_batches(1, spec, &fleet, T0).unwrap();
    let d = step(&r, &fleet, T0);
    assert_eq!(dispatched(&d), [("n1", TaskKind::Stage)]);
    assert_eq!(d.next_wakeup, Some(T0 + 60 * SEC));
    let mut r = d.rollout.clone();
    report(&mut r, &d, &["n1"], &TaskOutcome::Succeeded, T0 + SEC);
    let d = step(&r, &fleet, T0 + SEC);
    assert!(d.dispatch.is_empty(), "no switch while n2 has not staged");
    let r = d.rollout;

    // n2 is back after 30 s: it stages then, and the switch follows.
    fleet.get_mut("n2").unwrap().online = true;
    let d = step(&r, &fleet, T0 + 30 * SEC);
    assert_eq!(dispatched(&d), [("n2", TaskKind::Stage)]);
    let mut r = d.rollout.clone();
    report(&mut r, &d, &["n2"], &TaskOutcome::Succeeded, T0 + 40 * SEC);
    let d = step(&r, &fleet, T0 + 40 * SEC);
    assert_eq!(dispatched(&d), ["n1", "n2"].map(|n| (n, TaskKind::Upgrade)));
}

/// Planner bug: the step that gives up a pending offline node of an
/// all-at-once rollout leaves the rollout running; only the next step sends
/// every node back, so `step` is not idempotent there.
#[test]
fn all_at_once_a_node_offline_for_its_whole_grace_period_ends_the_rollout_in_that_step() {
    let mut fleet = healthy_fleet(2);
    fleet.get_mut("n2").unwrap().online = false;
    let spec = all_at_once(StrategyFile {
        healthy_deadline: Some("1m".into()),
        ..StrategyFile::default()
    });
    let r = plan_batches(1, spec, &fleet, T0).unwrap();
    let d = step(&r, &fleet, T0);
    let mut r = d.rollout.clone();
    report(&mut r, &d, &["n1"], &TaskOutcome::Succeeded, T0 + SEC);
    let d = step(&r, &fleet, T0 + 60 * SEC);
    assert_eq!(d.rollout.nodes["n2"].state, NodeState::Unreachable);
    fails_as_one(&d.rollout).unwrap();
    // Nothing was switched: nothing to revert, nothing in flight.
    assert_eq!(d.rollout.state, RolloutState::RolledBack);
    let again = step(&d.rollout, &fleet, T0 + 60 * SEC);
    assert!(!again.changed, "a second step changed the rollout");
}

#[test]
fn all_at_once_a_failed_stage_ends_the_rollout_before_any_switch() {
    let fleet = healthy_fleet(3);
    let r = plan_batches(1, all_at_once(StrategyFile::default()), &fleet, T0).unwrap();
    let staging = step(&r, &fleet, T0);
    let mut r = staging.rollout.clone();
    report(&mut r, &staging, &["n1"], &TaskOutcome::Succeeded, T0 + SEC);
    report(&mut r, &staging, &["n2"], &failed(), T0 + SEC);
    let d = step(&r, &fleet, T0 + SEC);
    assert!(d.dispatch.is_empty(), "no switch, and nothing to revert");
    assert_eq!(d.rollout.state, RolloutState::RollingBack);
    let reason = d.rollout.reason.as_deref().unwrap();
    assert!(
        reason.contains("n2: staging failed") && reason.contains("no node was switched"),
        "{reason}"
    );
    // n3 still stages: the rollout ends once it has reported.
    let mut r = d.rollout;
    report(
        &mut r,
        &staging,
        &["n3"],
        &TaskOutcome::Succeeded,
        T0 + 2 * SEC,
    );
    let d = step(&r, &fleet, T0 + 2 * SEC);
    assert!(d.dispatch.is_empty());
    assert_eq!(d.rollout.state, RolloutState::RolledBack);
    assert_eq!(d.rollout.count(NodeState::Upgraded), 0);
    all_or_nothing(&d.rollout).unwrap();
}

#[test]
fn all_at_once_a_failed_switch_reverts_every_node_including_those_still_switching() {
    let mut fleet = healthy_fleet(3);
    let r = plan_batches(1, all_at_once(StrategyFile::default()), &fleet, T0).unwrap();
    let staging = step(&r, &fleet, T0);
    let mut r = staging.rollout.clone();
    succeed_all(&mut r, &staging, T0 + SEC);
    let switch = step(&r, &fleet, T0 + SEC);
    assert_eq!(switch.dispatch.len(), 3);
    let mut r = switch.rollout.clone();
    finish(&mut r, &mut fleet, &switch, &["n1"], T0 + 20 * SEC);
    report(&mut r, &switch, &["n2"], &failed(), T0 + 20 * SEC);
    let first = step(&r, &fleet, T0 + 20 * SEC);
    assert_eq!(first.rollout.state, RolloutState::RollingBack);
    assert_eq!(dispatched(&first), [("n1", TaskKind::Revert)]);

    // n3's switch passes after all: it is switched back too.
    let mut r = first.rollout.clone();
    finish(&mut r, &mut fleet, &switch, &["n3"], T0 + 25 * SEC);
    let second = step(&r, &fleet, T0 + 25 * SEC);
    assert_eq!(dispatched(&second), [("n3", TaskKind::Revert)]);
    let mut r = second.rollout.clone();
    succeed_all(&mut r, &first, T0 + 30 * SEC);
    succeed_all(&mut r, &second, T0 + 30 * SEC);
    let d = step(&r, &fleet, T0 + 30 * SEC);
    assert_eq!(d.rollout.state, RolloutState::RolledBack);
    assert_eq!(d.rollout.count(NodeState::Upgraded), 0);
    all_or_nothing(&d.rollout).unwrap();
    settled(&d.rollout).unwrap();
}

/// Open question for the planner: cancelling an all-at-once rollout after
/// its switch leaves the nodes that passed upgraded and those that failed on
/// the old version, a mixed fleet that all at once promises never to leave.
#[test]
fn all_at_once_cancelled_mid_switch_does_not_end_mixed() {
    let fleet = healthy_fleet(2);
    let r = plan_batches(1, all_at_once(StrategyFile::default()), &fleet, T0).unwrap();
    let d = step(&r, &fleet, T0);
    let mut r = d.rollout.clone();
    succeed_all(&mut r, &d, T0 + SEC);
    let switch = step(&r, &fleet, T0 + SEC);
    let mut r = switch.rollout.clone();
    // Refusing the command would do too.
    let _ = r.cancel(T0 + 2 * SEC);
    report(
        &mut r,
        &switch,
        &["n1"],
        &TaskOutcome::Succeeded,
        T0 + 3 * SEC,
    );
    report(&mut r, &switch, &["n2"], &failed(), T0 + 3 * SEC);
    let mut now = T0 + 3 * SEC;
    for _ in 0..3 {
        let d = step(&r, &fleet, now);
        r = d.rollout.clone();
        now += SEC;
        succeed_all(&mut r, &d, now);
    }
    assert!(!r.is_active());
    all_or_nothing(&r).unwrap();
}

#[test]
fn all_at_once_keeps_min_healthy_nodes_serving_outside_the_selection() {
    let mut fleet = fleet_of([
        node("n1", "r1", Health::Healthy, true),
        node("n2", "r1", Health::Healthy, true),
        node("n3", "r2", Health::Healthy, true),
    ]);
    let file = |min_healthy| RolloutFile {
        service: Some(SERVICE.into()),
        version: Some(TO.into()),
        selector: Some("rack=r1".into()),
        nodes: None,
        services: None,
        downgrade: None,
        hooks: None,
        strategy: StrategyFile {
            kind: Some("all_at_once".into()),
            min_healthy: Some(min_healthy),
            ..StrategyFile::default()
        },
        analysis: None,
    };
    // Switching n1 and n2 together leaves only n3: a floor of 2 is refused.
    let refused = plan_batches(
        1,
        file(CountOrText::Count(2)).resolve().unwrap(),
        &fleet,
        T0,
    )
    .unwrap_err();
    assert_eq!(refused.field, "strategy.min_healthy");

    let r = plan_batches(
        1,
        file(CountOrText::Count(1)).resolve().unwrap(),
        &fleet,
        T0,
    )
    .unwrap();
    let staging = step(&r, &fleet, T0);
    let mut r = staging.rollout.clone();
    succeed_all(&mut r, &staging, T0 + SEC);
    // n3 is down when both are staged: the switch waits for it.
    fleet
        .get_mut("n3")
        .and_then(|v| v.services.get_mut(SERVICE))
        .unwrap()
        .health = Health::Unhealthy;
    let d = step(&r, &fleet, T0 + SEC);
    assert!(d.dispatch.is_empty());
    let waiting = d.rollout.waiting.as_deref().unwrap();
    assert!(waiting.contains("min_healthy is 1"), "{waiting}");
    fleet
        .get_mut("n3")
        .and_then(|v| v.services.get_mut(SERVICE))
        .unwrap()
        .health = Health::Healthy;
    let switch = step(&d.rollout, &fleet, T0 + 2 * SEC);
    assert_eq!(
        dispatched(&switch),
        ["n1", "n2"].map(|n| (n, TaskKind::Upgrade))
    );
    switched_together(&d.rollout, &switch.rollout, &fleet, ["n1", "n2"]).unwrap();
    assert_eq!(fleet_healthy(&switch.rollout, &fleet), 1);
}

// ---------------------------------------------------------------------------
// Examples: convergence

/// Three healthy nodes, batches of one, room for two unavailable, a one
/// minute health deadline; `n3` (planned last) is offline throughout. The
/// rollout completes with n3 unreachable, and converges.
fn completed_without_n3() -> (Rollout, Fleet, Timestamp) {
    let mut fleet = healthy_fleet(3);
    fleet.get_mut("n3").unwrap().online = false;
    let strategy = StrategyFile {
        healthy_deadline: Some("1m".into()),
        ..StrategyFile::default()
    };
    let mut r = plan_batches(1, spec("1", "2", strategy), &fleet, T0).unwrap();
    let mut now = T0;
    for node in ["n1", "n2"] {
        let d = step(&r, &fleet, now);
        assert_eq!(dispatched(&d), [(node, TaskKind::Upgrade)]);
        r = d.rollout.clone();
        now += 20 * SEC;
        finish(&mut r, &mut fleet, &d, &[node], now);
    }
    let d = step(&r, &fleet, now);
    assert!(d.dispatch.is_empty());
    now += 60 * SEC;
    let d = step(&d.rollout, &fleet, now);
    let r = d.rollout;
    assert_eq!(r.state, RolloutState::Completed);
    assert_eq!(r.nodes["n3"].state, NodeState::Unreachable);
    assert!(r.converging() && r.is_active());
    (r, fleet, now)
}

#[test]
fn a_completed_rollout_converges_a_node_that_comes_back() {
    let (r, mut fleet, now) = completed_without_n3();
    let d = step(&r, &fleet, now + 60 * SEC);
    assert!(!d.changed && d.dispatch.is_empty(), "n3 is still away");

    fleet.get_mut("n3").unwrap().online = true;
    let now = now + 120 * SEC;
    let d = step(&r, &fleet, now);
    assert_eq!(dispatched(&d), [("n3", TaskKind::Converge)]);
    assert_eq!(d.dispatch[0].task.id, "r1-cv-n3");
    assert_eq!(d.rollout.nodes["n3"].state, NodeState::Converging);
    assert_eq!(d.rollout.state, RolloutState::Completed);
    converged_when_back(&d.rollout, &fleet).unwrap();
    let mut r = d.rollout.clone();
    finish(&mut r, &mut fleet, &d, &["n3"], now + 20 * SEC);
    assert_eq!(r.nodes["n3"].state, NodeState::Upgraded);
    assert!(r.nodes["n3"].converged);
    assert!(!r.converging() && !r.is_active());
    let d = step(&r, &fleet, now + 20 * SEC);
    assert!(d.dispatch.is_empty());
    assert!(d.rollout.fully_upgraded());
}

#[test]
fn a_node_back_on_the_target_version_is_upgraded_without_a_task() {
    let (r, mut fleet, now) = completed_without_n3();
    let n3 = fleet.get_mut("n3").unwrap();
    n3.online = true;
    n3.services.get_mut(SERVICE).unwrap().version = Some(TO.into());
    let d = step(&r, &fleet, now + SEC);
    assert!(d.dispatch.is_empty());
    assert_eq!(d.rollout.nodes["n3"].state, NodeState::Upgraded);
    assert_eq!(
        d.rollout.events.last().unwrap().message,
        format!("came back on {TO}")
    );
    assert!(!d.rollout.is_active());
}

#[test]
fn a_node_that_drops_off_while_converging_converges_again_once_back() {
    let (r, mut fleet, now) = completed_without_n3();
    fleet.get_mut("n3").unwrap().online = true;
    let first = step(&r, &fleet, now);
    assert_eq!(dispatched(&first), [("n3", TaskKind::Converge)]);
    let n3 = fleet.get_mut("n3").unwrap();
    n3.online = false;
    n3.last_seen = now + SEC;
    let d = step(&first.rollout, &fleet, now + 61 * SEC);
    assert_eq!(d.rollout.nodes["n3"].state, NodeState::Unreachable);
    assert!(d.dispatch.is_empty());
    let d = step(&d.rollout, &fleet, now + 120 * SEC);
    assert!(d.dispatch.is_empty(), "n3 is away: nothing to send");
    fleet.get_mut("n3").unwrap().online = true;
    let again = step(&d.rollout, &fleet, now + 180 * SEC);
    assert_eq!(dispatched(&again), [("n3", TaskKind::Converge)]);
    let twice = step(&again.rollout, &fleet, now + 180 * SEC);
    assert!(twice.dispatch.is_empty() && !twice.changed);
}

#[test]
fn converging_keeps_to_the_unavailability_budget() {
    // Five nodes, room for three unavailable; n4 and n5 are offline
    // throughout and end unreachable.
    let mut fleet = healthy_fleet(5);
    for n in ["n4", "n5"] {
        fleet.get_mut(n).unwrap().online = false;
    }
    let strategy = StrategyFile {
        healthy_deadline: Some("1m".into()),
        ..StrategyFile::default()
    };
    let mut r = plan_batches(1, spec("1", "3", strategy), &fleet, T0).unwrap();
    let mut now = T0;
    for _ in 0..10 {
        let d = step(&r, &fleet, now);
        r = d.rollout.clone();
        now += 60 * SEC;
        succeed_all(&mut r, &d, now);
    }
    assert_eq!(r.state, RolloutState::Completed);
    assert_eq!(r.count(NodeState::Unreachable), 2);

    // Both back, while n1 and n2 are down: converging one takes the third
    // and last unavailable slot; the other waits for it.
    for n in ["n1", "n2"] {
        fleet
            .get_mut(n)
            .and_then(|v| v.services.get_mut(SERVICE))
            .unwrap()
            .health = Health::Unhealthy;
    }
    for n in ["n4", "n5"] {
        fleet.get_mut(n).unwrap().online = true;
    }
    let before = unavailable_count(&r, &fleet);
    let d = step(&r, &fleet, now);
    assert_eq!(dispatched(&d), [("n4", TaskKind::Converge)]);
    within_budget(before, unavailable_count(&d.rollout, &fleet), 3).unwrap();
    converged_when_back(&d.rollout, &fleet).unwrap();
    let mut r = d.rollout.clone();
    finish(&mut r, &mut fleet, &d, &["n4"], now + 20 * SEC);
    let d = step(&r, &fleet, now + 20 * SEC);
    assert_eq!(dispatched(&d), [("n5", TaskKind::Converge)]);
}

#[test]
fn a_superseded_rollout_stops_converging() {
    let (mut r, mut fleet, now) = completed_without_n3();
    r.supersede(2, now);
    assert!(!r.converging() && !r.is_active());
    fleet.get_mut("n3").unwrap().online = true;
    let d = step(&r, &fleet, now + SEC);
    assert!(d.dispatch.is_empty() && !d.changed);
    assert_eq!(d.rollout.nodes["n3"].state, NodeState::Unreachable);
}

/// Planner bug: the step that completes a rollout does not converge a node
/// that is already back, so a second step with the same inputs dispatches
/// its converge task.
#[test]
fn the_step_that_completes_a_rollout_converges_the_nodes_already_back() {
    let mut fleet = healthy_fleet(2);
    let strategy = StrategyFile {
        healthy_deadline: Some("1m".into()),
        ..StrategyFile::default()
    };
    let r = plan_batches(1, spec("1", "2", strategy), &fleet, T0).unwrap();
    let d = step(&r, &fleet, T0);
    assert_eq!(dispatched(&d), [("n1", TaskKind::Upgrade)]);
    // n1 drops off mid-upgrade and is given up; n2 goes next.
    let n1 = fleet.get_mut("n1").unwrap();
    n1.online = false;
    n1.last_seen = T0;
    let d = step(&d.rollout, &fleet, T0 + 60 * SEC);
    assert_eq!(d.rollout.nodes["n1"].state, NodeState::Unreachable);
    assert_eq!(dispatched(&d), [("n2", TaskKind::Upgrade)]);
    // n1 is back, its result lost, still on the old version; n2 passes.
    fleet.get_mut("n1").unwrap().online = true;
    let mut r = d.rollout.clone();
    succeed_all(&mut r, &d, T0 + 70 * SEC);
    let d = step(&r, &fleet, T0 + 70 * SEC);
    assert_eq!(d.rollout.state, RolloutState::Completed);
    converged_when_back(&d.rollout, &fleet).unwrap();
    assert_eq!(dispatched(&d), [("n1", TaskKind::Converge)]);
    let again = step(&d.rollout, &fleet, T0 + 70 * SEC);
    assert!(again.dispatch.is_empty() && !again.changed);
}

/// A rollback sends nodes back no more at once than the rollout's
/// `max_unavailable`, or than the operator asked; all at once only when
/// asked, last upgraded first.
#[test]
fn a_rollback_goes_in_waves_within_the_budget() {
    let fleet = healthy_fleet(4);
    let upgraded = || {
        let mut r = plan_batches(1, spec("1", "1", StrategyFile::default()), &fleet, T0).unwrap();
        for n in r.nodes.values_mut() {
            n.state = NodeState::Upgraded;
        }
        r
    };
    let first_wave = |batch: Option<Amount>| {
        let mut r = upgraded();
        r.rollback(batch, T0 + SEC).unwrap();
        let d = step(&r, &fleet, T0 + SEC);
        assert!(d.dispatch.iter().all(|x| x.task.kind == TaskKind::Revert));
        d
    };
    let d = first_wave(None);
    assert_eq!(
        dispatched(&d),
        vec![("n4", TaskKind::Revert)],
        "within max_unavailable 1"
    );
    // The next goes once that one is back, and the rollback ends with all.
    let mut r = d.rollout.clone();
    let mut now = T0 + SEC;
    let mut order = vec!["n4".to_string()];
    let mut d = d;
    while r.state == RolloutState::RollingBack {
        now += SEC;
        succeed_all(&mut r, &d, now);
        d = step(&r, &fleet, now);
        assert!(d.dispatch.len() <= 1, "{:?}", dispatched(&d));
        order.extend(d.dispatch.iter().map(|x| x.node.clone()));
        r = d.rollout.clone();
    }
    assert_eq!(r.state, RolloutState::RolledBack);
    assert_eq!(order, names(&["n4", "n3", "n2", "n1"]));

    assert_eq!(first_wave(Some(Amount::Count(2))).dispatch.len(), 2);
    assert_eq!(first_wave(Some(Amount::Percent(100))).dispatch.len(), 4);
}
