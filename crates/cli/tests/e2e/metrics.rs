//! `GET /metrics` after real rollouts: it parses as Prometheus exposition
//! and its counts match what the API says.

use std::collections::BTreeMap;

use prometheus_parse::{Scrape, Value};
use rollwave_api::{NodeView, RolloutFile};
use rollwave_core::{HookFile, HooksFile, StrategyFile};

use crate::harness::*;

async fn scrape(fleet: &rollwave::fleet::Fleet) -> Scrape {
    let resp = fleet
        .http()
        .get(format!("{}/metrics", fleet.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of the sample `name` whose labels include `labels`; 0 if none.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.last().map_or(0.0, |b| b.count),
            Value::Summary(_) => panic!("{name} is a summary"),
        })
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?}: {found:?}");
    found.first().copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_and_match_the_api() {
    let fleet = installed_with_hooks(3, &[("flaky", "exit 1")]).await;
    push(&fleet, "2.0.0", true).await;
    let flaky = HookFile {
        on_error: Some("continue".into()),
        ..node_hook("flaky")
    };
    let spec = RolloutFile {
        service: Some(SERVICE.into()),
        version: Some("2.0.0".into()),
        hooks: Some(HooksFile {
            pre_node: vec![flaky],
            ..Default::default()
        }),
        strategy: StrategyFile {
            batch: Some("1".into()),
            min_healthy_time: Some("200ms".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let r = start_file(&fleet, spec).await.unwrap().remove(0);
    let r = wait_done(&fleet, r.id).await;
    assert!(r.fully_upgraded(), "{r:#?}");
    // Agents report their new versions shortly after their tasks end.
    wait_until("every node to report 2.0.0 healthy", || async {
        let s = scrape(&fleet).await;
        let want = [
            ("service", "api"),
            ("version", "2.0.0"),
            ("health", "healthy"),
        ];
        (value(&s, "rollwave_service_nodes", &want) == 3.0).then_some(())
    })
    .await;

    let api = fleet.api().unwrap();
    let s = scrape(&fleet).await;
    let rollouts: Vec<rollwave_core::RolloutSummary> = api.get("/v1/rollouts").await.unwrap();
    let mut by_state: BTreeMap<&str, f64> = BTreeMap::new();
    for r in &rollouts {
        *by_state.entry(r.state.as_str()).or_default() += 1.0;
    }
    for (state, n) in &by_state {
        assert_eq!(
            value(&s, "rollwave_rollouts", &[("state", state)]),
            *n,
            "{state}"
        );
    }
    let nodes: Vec<NodeView> = api.get("/v1/nodes").await.unwrap();
    let mut by_version: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    for n in &nodes {
        for (service, v) in &n.services {
            let version = v.version.clone().unwrap_or_else(|| "none".into());
            let health = format!("{:?}", v.health).to_lowercase();
            *by_version
                .entry((service.clone(), version, health))
                .or_default() += 1.0;
        }
    }
    for ((service, version, health), n) in &by_version {
        let labels = [
            ("service", service.as_str()),
            ("version", version),
            ("health", health),
        ];
        assert_eq!(
            value(&s, "rollwave_service_nodes", &labels),
            *n,
            "{labels:?}"
        );
    }
    assert_eq!(value(&s, "rollwave_nodes", &[("online", "true")]), 3.0);
    let health: serde_json::Value = api.get("/v1/health").await.unwrap();
    assert_eq!(
        value(&s, "rollwave_agents_connected", &[]),
        health["agents_connected"].as_f64().unwrap()
    );
    // The install and this rollout: three upgrades each, in four waves.
    let upgrades = [("kind", "upgrade"), ("outcome", "succeeded")];
    assert_eq!(value(&s, "rollwave_task_duration_seconds", &upgrades), 6.0);
    assert_eq!(
        value(&s, "rollwave_wave_duration_seconds", &[("service", "api")]),
        4.0
    );
    assert_eq!(
        value(&s, "rollwave_hook_failures_total", &[("on", "node")]),
        3.0
    );
    let started = [
        ("method", "POST"),
        ("route", "/v1/rollouts"),
        ("status", "201"),
    ];
    let started_ok = value(&s, "rollwave_http_requests_total", &started)
        + value(
            &s,
            "rollwave_http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/v1/rollouts"),
                ("status", "200"),
            ],
        );
    assert_eq!(started_ok, 2.0);
    assert!(
        value(
            &s,
            "rollwave_http_request_duration_seconds",
            &[("method", "GET"), ("route", "/v1/rollouts/:id")]
        ) >= 1.0
    );
}

/// Every series that can be known is exported from the start, at 0, so
/// that alert rules need no `or vector(0)`.
#[tokio::test(flavor = "multi_thread")]
async fn known_series_are_exported_at_zero_from_the_start() {
    let fleet = rollwave::fleet::Fleet::launch(rollwave::fleet::FleetSpec::new(exe().into(), 0))
        .await
        .unwrap();
    let s = scrape(&fleet).await;
    let present = |name: &str, labels: &[(&str, &str)]| {
        s.samples
            .iter()
            .any(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
    };
    for state in rollwave_core::RolloutState::ALL {
        assert!(
            present("rollwave_rollouts", &[("state", state.as_str())]),
            "{state:?}"
        );
    }
    for on in ["control_plane", "node"] {
        assert!(
            present("rollwave_hook_failures_total", &[("on", on)]),
            "{on}"
        );
    }
    for online in ["true", "false"] {
        assert!(present("rollwave_nodes", &[("online", online)]), "{online}");
    }
    for kind in ["upgrade", "revert", "stage", "converge", "dryrun"] {
        for outcome in ["succeeded", "failed"] {
            assert!(
                present(
                    "rollwave_task_duration_seconds_count",
                    &[("kind", kind), ("outcome", outcome)]
                ),
                "{kind} {outcome}"
            );
        }
    }
    assert_eq!(value(&s, "rollwave_rollouts", &[("state", "running")]), 0.0);
}
