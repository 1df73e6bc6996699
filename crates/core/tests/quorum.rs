//! Quorum groups (`min_healthy` per label, as a count, a percentage or a
//! majority), fresh installs of quorum services, and `leader_last`: the
//! planner's decisions step by step, against fleets built by hand.

use std::collections::BTreeMap;

use rollwave_core::invariants::floors_kept;
use rollwave_core::{
    plan_batches, step, CountOrText, Decision, Fleet, Health, NodeView, OrderFile, Rollout,
    RolloutFile, RolloutSpec, RolloutState, ServiceView, StrategyFile, TaskKind, TaskOutcome,
    Timestamp,
};

const SEC: u64 = 1000;
const T0: Timestamp = 1_700_000_000_000;
const SERVICE: &str = "etcd";
const TO: &str = "2.0.0";

/// `n` members per cluster, `a-1`.. and `b-1`.., labelled `cluster=a|b`,
/// running 1.0.0 (or nothing) and healthy (or stopped).
fn clusters(n: usize, installed: bool) -> Fleet {
    let mut fleet = Fleet::new();
    for c in ["a", "b"] {
        for i in 1..=n {
            let name = format!("{c}-{i}");
            fleet.insert(
                name.clone(),
                NodeView {
                    name,
                    labels: BTreeMap::from([("cluster".to_string(), c.to_string())]),
                    online: true,
                    last_seen: T0,
                    services: BTreeMap::from([(
                        SERVICE.to_string(),
                        ServiceView {
                            version: installed.then(|| "1.0.0".to_string()),
                            health: if installed {
                                Health::Healthy
                            } else {
                                Health::Stopped
                            },
                            role: installed.then(|| "follower".to_string()),
                            ..Default::default()
                        },
                    )]),
                },
            );
        }
    }
    fleet
}

fn spec(strategy: StrategyFile) -> Result<RolloutSpec, rollwave_core::SpecError> {
    RolloutFile {
        service: Some(SERVICE.into()),
        version: Some(TO.into()),
        strategy,
        ..RolloutFile::default()
    }
    .resolve()
}

fn majority_per_cluster() -> StrategyFile {
    StrategyFile {
        batch: Some("100%".into()),
        max_unavailable: Some("100%".into()),
        min_healthy: Some("majority".into()),
        min_healthy_per: Some("cluster".into()),
        ..StrategyFile::default()
    }
}

fn set_role(fleet: &mut Fleet, node: &str, role: &str) {
    fleet
        .get_mut(node)
        .and_then(|v| v.services.get_mut(SERVICE))
        .unwrap()
        .role = Some(role.into());
}

fn dispatched(d: &Decision) -> Vec<String> {
    d.dispatch
        .iter()
        .filter(|x| x.task.kind == TaskKind::Upgrade)
        .map(|x| x.node.clone())
        .collect()
}

/// The upgrades of `d` on `nodes` succeed: those nodes run the target.
fn finish(r: &mut Rollout, fleet: &mut Fleet, d: &Decision, nodes: &[String], now: Timestamp) {
    for x in d.dispatch.iter().filter(|x| nodes.contains(&x.node)) {
        assert!(r.record_result(&x.node, &x.task.id, &TaskOutcome::Succeeded, now));
        let s = fleet
            .get_mut(&x.node)
            .and_then(|v| v.services.get_mut(SERVICE))
            .unwrap();
        s.version = Some(TO.into());
        s.health = Health::Healthy;
    }
}

/// Steps `r` to its end, finishing every upgrade at once; returns the
/// nodes started at each step. Checks the floors at every step.
fn run(mut r: Rollout, fleet: &mut Fleet) -> (Rollout, Vec<Vec<String>>) {
    let mut now = T0;
    let mut starts = Vec::new();
    for _ in 0..100 {
        let d = step(&r, fleet, now);
        floors_kept(&r, &d.rollout, fleet).unwrap();
        r = d.rollout.clone();
        let started = dispatched(&d);
        if r.state != RolloutState::Running {
            return (r, starts);
        }
        now += 20 * SEC;
        finish(&mut r, fleet, &d, &started, now);
        starts.push(started);
    }
    panic!("no end after 100 steps: {:?}", r.waiting);
}

#[test]
fn majority_per_cluster_takes_one_member_of_each_cluster_at_a_time() {
    let mut fleet = clusters(3, true);
    let r = plan_batches(1, spec(majority_per_cluster()).unwrap(), &fleet, T0).unwrap();
    let d = step(&r, &fleet, T0);
    // Budget and batch allow all six: the floor, 2 of 3 in each cluster,
    // lets one member of each go.
    assert_eq!(dispatched(&d), ["a-1", "b-1"]);
    let waiting = d.rollout.waiting.clone().unwrap();
    assert!(
        waiting.contains(
            "a-2 waits: 2 nodes of etcd are healthy in cluster=a and min_healthy is majority (2 of 3)"
        ),
        "{waiting}"
    );
    let (r, starts) = run(r, &mut fleet);
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.reason);
    assert_eq!(starts.len(), 3);
    assert!(starts.iter().all(|s| s.len() == 2), "{starts:?}");
}

#[test]
fn a_floor_as_a_percentage_or_count_applies_within_each_group() {
    let mut fleet = clusters(5, true);
    let mut s = majority_per_cluster();
    s.min_healthy = Some("60%".into());
    let r = plan_batches(1, spec(s).unwrap(), &fleet, T0).unwrap();
    // 60% of 5 is 3 to keep: two of each cluster at once.
    assert_eq!(dispatched(&step(&r, &fleet, T0)).len(), 4);
    let (r, _) = run(r, &mut fleet);
    assert_eq!(r.state, RolloutState::Completed);

    let fleet = clusters(5, true);
    let mut s = majority_per_cluster();
    s.min_healthy = Some(CountOrText::Count(4));
    let r = plan_batches(1, spec(s).unwrap(), &fleet, T0).unwrap();
    assert_eq!(dispatched(&step(&r, &fleet, T0)), ["a-1", "b-1"]);
}

#[test]
fn floors_that_could_never_let_a_node_go_are_refused_naming_the_group() {
    let fleet = clusters(2, true);
    let e = plan_batches(1, spec(majority_per_cluster()).unwrap(), &fleet, T0).unwrap_err();
    assert_eq!(e.field, "strategy.min_healthy");
    assert!(
        e.to_string()
            .contains("2 (majority of 2) healthy nodes must remain but cluster=a has 2"),
        "{e}"
    );

    let mut s = majority_per_cluster();
    s.min_healthy_per = Some("zone".into());
    let e = plan_batches(1, spec(s).unwrap(), &clusters(3, true), T0).unwrap_err();
    assert_eq!(e.field, "strategy.min_healthy_per");
    assert!(e
        .to_string()
        .contains("none of the 6 selected nodes has label \"zone\""));

    for (value, why) in [
        (
            "most",
            "\"most\" is not a node count, a percentage or \"majority\"",
        ),
        ("101%", "above 100%"),
    ] {
        let mut s = majority_per_cluster();
        s.min_healthy = Some(value.into());
        let e = spec(s).unwrap_err();
        assert_eq!(e.field, "strategy.min_healthy");
        assert!(e.to_string().contains(why), "{e}");
    }
    let mut s = majority_per_cluster();
    s.min_healthy = None;
    assert_eq!(spec(s).unwrap_err().field, "strategy.min_healthy_per");
}

#[test]
fn a_fresh_quorum_cluster_is_planned_in_one_wave_and_says_why() {
    let mut fleet = clusters(3, false);
    let s = StrategyFile {
        batch: Some(CountOrText::Count(1)),
        min_healthy: Some("majority".into()),
        min_healthy_per: Some("cluster".into()),
        ..StrategyFile::default()
    };
    let r = plan_batches(1, spec(s.clone()).unwrap(), &fleet, T0).unwrap();
    assert_eq!(r.batches.len(), 1);
    let said = r
        .events
        .iter()
        .find(|e| e.message.starts_with("bootstrap:"))
        .expect("the plan says why it is one wave");
    assert!(
        said.message
            .contains("no node of cluster=a, cluster=b runs etcd yet and min_healthy is majority"),
        "{}",
        said.message
    );
    // Every member starts together, whatever the batch size.
    assert_eq!(dispatched(&step(&r, &fleet, T0)).len(), 6);
    let (r, _) = run(r, &mut fleet);
    assert_eq!(r.state, RolloutState::Completed);

    // A canary's first wave would start one member alone: refused.
    let mut canary = s.clone();
    canary.batch = None;
    canary.waves = Some(vec![
        rollwave_core::WaveFile::Size("1".into()),
        rollwave_core::WaveFile::Size("100%".into()),
    ]);
    let e = plan_batches(1, spec(canary).unwrap(), &clusters(3, false), T0).unwrap_err();
    assert_eq!(e.field, "strategy.waves");

    // A new cluster beside a running one: roll it out on its own.
    let mut mixed = clusters(3, true);
    for i in 1..=3 {
        let s = mixed
            .get_mut(&format!("b-{i}"))
            .and_then(|v| v.services.get_mut(SERVICE))
            .unwrap();
        s.version = None;
        s.health = Health::Stopped;
    }
    let e = plan_batches(1, spec(s).unwrap(), &mixed, T0).unwrap_err();
    assert_eq!(e.field, "selector");
    assert!(e.to_string().contains("--selector cluster=b"), "{e}");
}

fn leader_last() -> StrategyFile {
    StrategyFile {
        batch: Some(CountOrText::Count(1)),
        min_healthy: Some("majority".into()),
        min_healthy_per: Some("cluster".into()),
        order: Some(OrderFile::Named("leader_last".into())),
        ..StrategyFile::default()
    }
}

#[test]
fn the_leader_of_each_cluster_goes_last_even_when_leadership_moves() {
    let mut fleet = clusters(3, true);
    set_role(&mut fleet, "a-1", "leader");
    set_role(&mut fleet, "b-2", "leader");
    let r = plan_batches(1, spec(leader_last()).unwrap(), &fleet, T0).unwrap();
    // As leadership stands at plan time, the leaders are planned last.
    let flat: Vec<&str> = r.batches.iter().flatten().map(String::as_str).collect();
    assert_eq!(&flat[4..], ["a-1", "b-2"]);

    // a-2 switches first; then leadership in cluster a moves to a-3, which
    // was next: it trades places with the last follower of its cluster.
    let d = step(&r, &fleet, T0);
    assert_eq!(dispatched(&d), ["a-2"]);
    let mut r = d.rollout.clone();
    finish(&mut r, &mut fleet, &d, &dispatched(&d), T0 + SEC);
    set_role(&mut fleet, "a-1", "follower");
    set_role(&mut fleet, "a-3", "leader");
    let d = step(&r, &fleet, T0 + 2 * SEC);
    assert_eq!(dispatched(&d), ["a-1"], "{:?}", d.rollout.batches);
    assert!(d
        .rollout
        .events
        .iter()
        .any(|e| e.node.as_deref() == Some("a-3")
            && e.message
                .contains("its role probe says leader: moved to wave")));

    let mut order = vec!["a-2".to_string()];
    let (r, starts) = {
        let mut r = d.rollout.clone();
        let mut now = T0 + 2 * SEC;
        let mut starts = vec![dispatched(&d)];
        finish(&mut r, &mut fleet, &d, &dispatched(&d), now);
        loop {
            now += 20 * SEC;
            let d = step(&r, &fleet, now);
            r = d.rollout.clone();
            if r.state != RolloutState::Running {
                break (r, starts);
            }
            let started = dispatched(&d);
            for n in &started {
                let leader = r.nodes[n].leader;
                let role = fleet[n].services[SERVICE].role.clone();
                assert_eq!(leader, role.as_deref() == Some("leader"), "{n}");
            }
            finish(&mut r, &mut fleet, &d, &started, now);
            starts.push(started);
        }
    };
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.reason);
    order.extend(starts.into_iter().flatten());
    let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
    for (leader, followers) in [("a-3", ["a-1", "a-2"]), ("b-2", ["b-1", "b-3"])] {
        for f in followers {
            assert!(pos(f) < pos(leader), "{f} before {leader}: {order:?}");
        }
    }
}

#[test]
fn a_leader_waits_for_the_others_of_its_wave_and_an_unknown_role_holds_a_node() {
    let mut fleet = clusters(3, true);
    set_role(&mut fleet, "a-1", "leader");
    let mut s = leader_last();
    s.batch = Some("100%".into());
    s.max_unavailable = Some("100%".into());
    s.min_healthy = Some(CountOrText::Count(1));
    let r = plan_batches(1, spec(s).unwrap(), &fleet, T0).unwrap();
    let d = step(&r, &fleet, T0);
    // One wave: the floor (1 of 3) lets two of cluster a go, but not the
    // leader while its followers are in flight.
    let started = dispatched(&d);
    assert!(!started.contains(&"a-1".to_string()), "{started:?}");
    assert!(started.contains(&"a-2".to_string()) && started.contains(&"a-3".to_string()));
    assert!(d
        .rollout
        .waiting
        .as_deref()
        .unwrap()
        .contains("a-1 waits: its role probe says leader, so it goes after a-2, a-3"));

    let mut fleet = clusters(3, true);
    let svc = fleet
        .get_mut("a-1")
        .and_then(|v| v.services.get_mut(SERVICE))
        .unwrap();
    svc.role = None;
    svc.role_error = Some("exec sh: answered \"I lead!\" which is not a role word".into());
    let r = plan_batches(1, spec(leader_last()).unwrap(), &fleet, T0).unwrap();
    let d = step(&r, &fleet, T0);
    assert!(!dispatched(&d).contains(&"a-1".to_string()));
    let waiting = d.rollout.waiting.clone().unwrap();
    assert!(
        waiting.contains("a-1 waits: leader_last and its role is not known (exec sh: answered"),
        "{waiting}"
    );
}

#[test]
fn leader_last_needs_a_role_probe_and_pre_leader_needs_leader_last() {
    let mut fleet = clusters(3, true);
    for v in fleet.values_mut() {
        v.services.get_mut(SERVICE).unwrap().role = None;
    }
    let e = plan_batches(1, spec(leader_last()).unwrap(), &fleet, T0).unwrap_err();
    assert_eq!(e.field, "strategy.order");
    assert!(
        e.to_string().contains("leader_last needs a role probe"),
        "{e}"
    );

    let mut s = majority_per_cluster();
    s.order = Some(OrderFile::Named("leaders_first".into()));
    assert_eq!(spec(s).unwrap_err().field, "strategy.order");

    let file = RolloutFile {
        service: Some(SERVICE.into()),
        version: Some(TO.into()),
        strategy: majority_per_cluster(),
        hooks: Some(rollwave_core::HooksFile {
            pre_leader: vec![rollwave_core::HookFile {
                kind: Some("node".into()),
                hook: Some("move-leader".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..RolloutFile::default()
    };
    assert_eq!(file.resolve().unwrap_err().field, "hooks.pre_leader");
}
