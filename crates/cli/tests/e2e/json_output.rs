//! `--json` on the read commands prints what the API answers, with its field
//! names, so that scripts can rely on the OpenAPI document.

use serde_json::Value;

use crate::harness::*;

/// The value with every scalar replaced by its kind: what field names and
/// types a script sees, whatever the times and counters are now.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(shape).collect()),
        Value::Null => "null".into(),
        Value::Bool(_) => "bool".into(),
        Value::Number(_) => "number".into(),
        Value::String(_) => "string".into(),
    }
}

fn cli_json(fleet: &rollwave::fleet::Fleet, args: &[&str]) -> Value {
    let out = cli(fleet, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

async fn api_json(fleet: &rollwave::fleet::Fleet, path: &str) -> Value {
    fleet
        .http()
        .get(format!("{}{path}", fleet.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn read_commands_print_the_apis_json() {
    let fleet = installed_fleet(2).await;
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |s| s.auto_finalize = Some(true))
        .await
        .unwrap();
    let done = wait_done(&fleet, r.id).await;
    assert!(done.fully_upgraded(), "{done:#?}");
    let url = fleet.url();
    let id = r.id.to_string();

    // Settled: the same values.
    for (args, path) in [
        (vec!["services", "--json"], "/v1/services"),
        (vec!["release", "list", "--json"], "/v1/releases"),
        (vec!["rollout", "list", "--json"], "/v1/rollouts"),
    ] {
        assert_eq!(
            cli_json(&fleet, &args),
            api_json(&fleet, path).await,
            "{args:?}"
        );
    }
    let api = api_json(&fleet, &format!("/v1/rollouts/{id}")).await;
    assert_eq!(
        cli_json(&fleet, &["rollout", "status", &id, "--json"]),
        api["rollout"]
    );

    // Reported by agents as they go: the same fields.
    let nodes = api_json(&fleet, "/v1/nodes").await;
    assert_eq!(
        shape(&cli_json(&fleet, &["nodes", "--json"])),
        shape(&nodes)
    );
    let backups = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node-1")
        .map(|n| n["services"]["api"]["backups"].clone())
        .unwrap();
    let backups = if backups.is_null() {
        Value::Array(Vec::new())
    } else {
        backups
    };
    assert_eq!(
        shape(&cli_json(&fleet, &["backups", "node-1", "api", "--json"])),
        shape(&backups)
    );
    let spec = serde_json::json!({"spec": {"service": "api", "version": "2.0.0"}});
    let planned: Value = fleet
        .http()
        .post(format!("{url}/v1/plan"))
        .json(&spec)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The API's answer as it is: the rollout and the plan's id.
    assert_eq!(
        shape(&cli_json(&fleet, &["plan", "api@2.0.0", "--json"])),
        shape(&planned)
    );
    assert!(planned["plan_id"].is_string(), "{planned}");

    // `logs --json`: one event per line, as in the rollout's `events`.
    let events = api["rollout"]["events"].as_array().unwrap();
    assert!(!events.is_empty());
    let lines = |args: &[&str]| -> Vec<Value> {
        let out = cli(&fleet, args);
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    assert_eq!(&lines(&["logs", &id, "--json"]), events);
    let node_1: Vec<Value> = events
        .iter()
        .filter(|e| e.get("node").is_none_or(|n| n == "node-1"))
        .cloned()
        .collect();
    assert!(node_1.len() < events.len(), "node-2's steps are left out");
    assert_eq!(lines(&["logs", &id, "--node", "node-1", "--json"]), node_1);
    // The newest rollout without an id, followed to its (past) end.
    assert_eq!(&lines(&["logs", "--follow", "--json"]), events);
}
