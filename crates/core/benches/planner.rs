//! Planner speed: planning and stepping a rollout of 10,000 nodes with spread
//! and order constraints. Run with `cargo bench -p rollwave-core --bench planner`.
//!
//! The goal is a full plan in under 50 ms. The reference printed beside it is
//! one read-only pass over the same fleet, which no plan can beat.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use rollwave_core::{
    plan_batches, step, Fleet, Health, NodeView, RolloutFile, ServiceView, StrategyFile,
};

const NODES: usize = 10_000;
const RUNS: usize = 20;

fn fleet() -> Fleet {
    (0..NODES)
        .map(|i| {
            let name = format!("node-{i:05}");
            let labels: BTreeMap<String, String> = [
                ("rack".to_string(), format!("r{}", i % 40)),
                (
                    "region".to_string(),
                    ["eu-1", "us-1", "ap-1"][i % 3].to_string(),
                ),
            ]
            .into();
            let health = if i % 97 == 0 {
                Health::Unhealthy
            } else {
                Health::Healthy
            };
            let view = NodeView {
                name: name.clone(),
                labels,
                online: i % 211 != 0,
                last_seen: 0,
                services: [(
                    "api".to_string(),
                    ServiceView {
                        version: Some("1.0.0".into()),
                        health,
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

fn time<T>(mut f: impl FnMut() -> T) -> (Duration, Duration) {
    let mut samples: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed()
        })
        .collect();
    samples.sort();
    (samples[RUNS / 2], samples[RUNS - 1])
}

fn main() {
    let fleet = fleet();
    let spec = RolloutFile {
        service: Some("api".into()),
        version: Some("2.0.0".into()),
        strategy: StrategyFile {
            batch: Some("5%".into()),
            max_unavailable: Some("5%".into()),
            min_healthy: Some(rollwave_core::CountOrText::Count(9_000)),
            spread_by: Some("rack".into()),
            max_per_domain: Some(20),
            order_by: Some("region".into()),
            order: Some(vec!["eu-1".to_string(), "us-1".to_string()].into()),
            ..Default::default()
        },
        ..Default::default()
    }
    .resolve()
    .expect("benchmark spec is valid");

    // The least any planner must do: read every node's labels and health once.
    let (walk_p50, _) = time(|| {
        fleet
            .values()
            .filter(|n| n.available("api"))
            .map(|n| {
                n.labels.get("rack").map_or(0, String::len)
                    + n.labels.get("region").map_or(0, String::len)
            })
            .sum::<usize>()
    });
    let (plan_p50, plan_max) = time(|| plan_batches(1, spec.clone(), &fleet, 0).expect("plan"));
    let rollout = plan_batches(1, spec.clone(), &fleet, 0).expect("plan");
    let (step_p50, step_max) = time(|| step(&rollout, &fleet, 1));
    let first = step(&rollout, &fleet, 1);

    println!("planner benchmark: {NODES} nodes, spread_by rack (40 racks, 20 per rack at once), order_by region, batch 5%, min_healthy 9000; {RUNS} runs each");
    println!(
        "  plan (select, order, spread, cut): p50 {plan_p50:?}, max {plan_max:?}  -> {} waves",
        rollout.batches.len()
    );
    println!(
        "  first step (constraints, dispatch): p50 {step_p50:?}, max {step_max:?}  -> {} tasks",
        first.dispatch.len()
    );
    println!(
        "  reference: one read-only pass over every node's health and labels: p50 {walk_p50:?}"
    );
    let total = plan_p50 + step_p50;
    println!(
        "  [{}] full plan and first decision: {total:?} (goal: under 50 ms)",
        if total < Duration::from_millis(50) {
            "pass"
        } else {
            "MISS"
        }
    );
}
