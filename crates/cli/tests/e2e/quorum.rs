//! Quorum services for real: etcd clusters (Debian's `etcd`) run by rollwave
//! agents, installed and upgraded while clients write to them and a monitor
//! samples every member.

use std::time::Duration;

use rollwave::etcd_fleet::{self, Member, SERVICE};
use rollwave::fleet::{Fleet, FleetSpec};
use rollwave_core::{Rollout, RolloutState};
use tokio::sync::watch;

use crate::harness::{cli, exe, versions_of, wait_until};

/// A control plane and one agent per member, each running nothing yet.
async fn etcd_fleet(all: &[Member], role_probe: bool, extra: &str) -> Fleet {
    let mut fleet = Fleet::launch(FleetSpec::new(exe().into(), 0))
        .await
        .unwrap();
    etcd_fleet::add_members(&mut fleet, all, role_probe, extra)
        .await
        .unwrap();
    fleet.wait_online(all.len()).await.unwrap();
    fleet
}

/// Runs `rollwave <args> --yes --wait --json` and returns the rollout.
fn start(fleet: &Fleet, args: &[&str]) -> Rollout {
    let mut all = vec!["rollout", "start"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--yes", "--wait", "--json"]);
    let out = cli(fleet, &all);
    let text = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
    let r = if r.get("rollout").is_some() {
        r["rollout"].clone()
    } else {
        r
    };
    serde_json::from_value(r).unwrap_or_else(|e| panic!("{e}: {text}"))
}

const TIMINGS: [&str; 6] = [
    "--min-healthy-time",
    "1s",
    "--healthy-deadline",
    "30s",
    "--progress-deadline",
    "2m",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_etcd_clusters_under_one_service_keep_a_majority_each() {
    let all = etcd_fleet::members(&["a", "b"], 3).unwrap();
    let fleet = etcd_fleet(&all, false, "").await;
    etcd_fleet::push(&fleet, "1.0.0").await.unwrap();
    etcd_fleet::push(&fleet, "2.0.0").await.unwrap();

    // A fresh install, asked for one member at a time: a lone member never
    // becomes healthy, so the plan is one wave, and says why.
    let quorum = ["--min-healthy", "majority", "--min-healthy-per", "cluster"];
    let mut plan = vec!["plan", "etcd@1.0.0", "--batch", "1"];
    plan.extend_from_slice(&quorum);
    let out = cli(&fleet, &plan);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("in 1 wave"), "{text}");
    assert!(
        text.contains(
            "bootstrap: no node of cluster=a, cluster=b runs etcd yet and min_healthy is majority"
        ),
        "{text}"
    );
    let mut install = vec!["etcd@1.0.0", "--batch", "1"];
    install.extend_from_slice(&quorum);
    install.extend_from_slice(&TIMINGS);
    let r = start(&fleet, &install);
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.reason);

    // The upgrade: budget for every node at once, the floor alone holds.
    let mut plan = vec![
        "plan",
        "etcd@2.0.0",
        "--batch",
        "100%",
        "--max-unavailable",
        "100%",
    ];
    plan.extend_from_slice(&quorum);
    let out = cli(&fleet, &plan);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("min_healthy majority in each value of cluster"),
        "{text}"
    );
    assert!(
        text.contains("2 at a time: min_healthy per cluster, cluster=a: majority (2) of 3 healthy, cluster=b: majority (2) of 3 healthy"),
        "{text}"
    );

    let (stop_tx, stop) = watch::channel(false);
    let writers = etcd_fleet::start_writers(&all, stop.clone());
    let monitor = etcd_fleet::start_monitor(&all, stop);
    // The writers reach every cluster before anything changes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut upgrade = vec!["etcd@2.0.0", "--batch", "100%", "--max-unavailable", "100%"];
    upgrade.extend_from_slice(&quorum);
    upgrade.extend_from_slice(&TIMINGS);
    let r = start(&fleet, &upgrade);
    stop_tx.send(true).unwrap();
    let writes = writers.await.unwrap();
    let fewest = monitor.await.unwrap();
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.reason);

    for c in ["a", "b"] {
        assert!(
            fewest[c] >= 2,
            "cluster {c} had {} members up at one moment: {fewest:?}",
            fewest[c]
        );
        let w = &writes[c];
        eprintln!("cluster {c}: {w:?}");
        assert!(w.ok > 0 && w.lost == 0, "cluster {c}: {w:?}");
    }
    // Both clusters upgraded.
    let vs = versions_of(&fleet, SERVICE).await;
    assert!(
        vs.iter().all(|(_, v)| v.as_deref() == Some("2.0.0")),
        "{vs:?}"
    );
    wait_until("every member healthy", || async {
        let nodes = fleet.nodes_view().await.ok()?;
        nodes.iter().all(|n| n.available(SERVICE)).then_some(())
    })
    .await;
}
