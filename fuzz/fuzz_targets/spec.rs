//! A rollout spec from text to a planned rollout, the way it travels: the
//! CLI reads `rollout.toml`, validates it and posts it as JSON; the server
//! parses that JSON (`POST /v1/rollouts`), validates it again, plans it
//! against the fleet and stores the rollout as JSON. The input is tried as
//! both TOML and JSON.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rollwave_api::StartRollout;
use rollwave_core::{
    parse_version, plan_batches, step, validate_service_name, Amount, Fleet, Health, NodeView,
    Rollout, RolloutFile, RolloutSpec, Selector, ServiceView,
};

const NOW: u64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = toml::from_str::<RolloutFile>(text) {
        check(file);
    }
    if let Ok(req) = serde_json::from_str::<StartRollout>(text) {
        check(req.spec);
    }
});

fn check(file: RolloutFile) {
    let resolved = file.resolve_all();
    if file.services.is_none() {
        assert_eq!(resolved, file.resolve().map(|s| vec![s]));
    }

    // What the CLI validated is what the server validates.
    let body = serde_json::to_vec(&StartRollout { spec: file.clone() }).expect("serializing");
    let received: StartRollout = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "the server cannot read what the CLI sends ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    assert_eq!(received.spec, file);
    assert_eq!(received.spec.resolve_all(), resolved);

    // Flags left unset change nothing, and a file under no flags is itself.
    assert_eq!(file.clone().merge(RolloutFile::default()), file);
    assert_eq!(RolloutFile::default().merge(file.clone()), file);

    let Ok(specs) = resolved else {
        return;
    };
    for (i, spec) in specs.iter().enumerate() {
        check_spec(spec);
        for d in &spec.depends_on {
            assert!(
                specs[..i].iter().any(|s| &s.service == d),
                "{} comes before {d}, which it depends on",
                spec.service
            );
        }
    }
    for spec in specs {
        if let Ok(rollout) = plan_batches(1, spec, fleet(), NOW) {
            check_stored(&rollout);
            let decision = step(&rollout, fleet(), NOW);
            check_stored(&decision.rollout);
        }
    }
}

/// What `resolve` promises about every spec it returns.
fn check_spec(spec: &RolloutSpec) {
    validate_service_name("service", &spec.service).expect("a valid service name");
    parse_version("version", &spec.version).expect("a valid version");
    assert_eq!(spec.version.trim(), spec.version);
    let amounts = [spec.batch, spec.max_unavailable]
        .into_iter()
        .chain(spec.waves.iter().map(|w| w.size));
    for a in amounts {
        assert!(!matches!(a, Amount::Percent(p) if p > 100), "{spec:?}");
    }
    assert!(!matches!(spec.batch, Amount::Count(0) | Amount::Percent(0)));
    assert_ne!(spec.max_unavailable, Amount::Count(0));
    assert!(spec.healthy_deadline > spec.min_healthy_time, "{spec:?}");
    assert!(spec.progress_deadline >= spec.healthy_deadline, "{spec:?}");
    for selected in [0, 1, 7, 10_000] {
        assert!(spec.batch_size(selected) >= 1);
        assert!(spec.unavailable_budget(selected) >= 1);
    }
    let shown = spec.selector.to_string();
    assert_eq!(
        Selector::parse("selector", &shown).as_ref(),
        Ok(&spec.selector),
        "{shown:?}"
    );
    let json = serde_json::to_string(spec).expect("serializing");
    let back: RolloutSpec = serde_json::from_str(&json).expect("a spec reads back");
    assert_eq!(&back, spec);
}

/// The store keeps rollouts as JSON and must read back the same rollout.
fn check_stored(rollout: &Rollout) {
    let json = serde_json::to_string(rollout).expect("serializing");
    let back: Rollout = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("a stored rollout does not read back ({e}): {json}"));
    assert_eq!(&back, rollout);
}

/// A small fleet with the labels and services the seeds use, some nodes
/// unhealthy or offline, so that selectors, spreads and orders have
/// something to choose from.
fn fleet() -> &'static Fleet {
    static FLEET: OnceLock<Fleet> = OnceLock::new();
    FLEET.get_or_init(|| {
        let mut fleet = Fleet::new();
        for i in 0..12u32 {
            let name = format!("web-{}", i + 1);
            let labels: BTreeMap<String, String> = [
                ("rack", format!("r{}", i % 3 + 1)),
                ("zone", ["a", "b"][i as usize % 2].to_string()),
                (
                    "region",
                    ["eu-1", "us-1", "ap-1"][i as usize % 3].to_string(),
                ),
                ("tier", "web".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let health = match i % 5 {
                3 => Health::Unhealthy,
                4 => Health::Stopped,
                _ => Health::Healthy,
            };
            let services = ["api", "db", "web", "cache"]
                .into_iter()
                .enumerate()
                .filter(|(j, _)| (i as usize + j) % 4 != 0)
                .map(|(_, s)| {
                    let view = ServiceView {
                        version: Some("1.0.0".to_string()),
                        health,
                        ..Default::default()
                    };
                    (s.to_string(), view)
                })
                .collect();
            let node = NodeView {
                name: name.clone(),
                labels,
                online: i % 6 != 5,
                last_seen: NOW - 1_000,
                services,
            };
            fleet.insert(name, node);
        }
        fleet
    })
}
