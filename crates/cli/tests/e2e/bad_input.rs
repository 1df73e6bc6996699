//! Bad input gets a one-line error naming the field, exit code 2 (or a JSON
//! error with the right HTTP status), and changes nothing.

use std::process::{Command, Output};

use rollwave_core::RolloutSummary;

use crate::harness::*;

fn assert_bad(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains(needle),
        "{stderr:?} should mention {needle:?}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_rollouts_are_refused_and_change_nothing() {
    let fleet = installed_fleet(3).await;
    push(&fleet, "2.0.0", true).await;

    let before: Vec<RolloutSummary> = fleet.api().unwrap().get("/v1/rollouts").await.unwrap();

    let out = cli(
        &fleet,
        &[
            "rollout",
            "start",
            "api@2.0.0",
            "--min-healthy-time",
            "5 parsecs",
        ],
    );
    assert_bad(
        &out,
        "strategy.min_healthy_time: \"5 parsecs\" is not a duration",
    );
    let out = cli(
        &fleet,
        &["rollout", "start", "api@2.0.0", "--batch", "150%"],
    );
    assert_bad(&out, "strategy.batch");
    let out = cli(&fleet, &["rollout", "start", "api@9.9.9"]);
    assert_bad(&out, "release api@9.9.9 not found");
    let out = cli(&fleet, &["rollout", "start", "nope@2.0.0"]);
    assert_bad(&out, "release nope@2.0.0 not found");
    let out = cli(&fleet, &["rollout", "start", "api@two"]);
    assert_bad(&out, "version: \"two\" is not a semantic version");
    let out = cli(&fleet, &["rollout", "start", "api"]);
    assert_bad(&out, "target");
    let out = cli(
        &fleet,
        &["rollout", "start", "api@2.0.0", "--selector", "rack=r9"],
    );
    assert_bad(&out, "selector: \"rack=r9\" matches none of the 3 nodes");
    let out = cli(
        &fleet,
        &["rollout", "start", "api@2.0.0", "--selector", "rack in (r1"],
    );
    assert_bad(&out, "selector");
    let out = cli(&fleet, &["rollout", "start", "api@2.0.0", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));

    let toml = fleet.dir.join("rollout.toml");
    std::fs::write(
        &toml,
        "service = \"api\"\nversion = \"2.0.0\"\n[strategy]\nbatch = [1\n",
    )
    .unwrap();
    let out = cli(&fleet, &["rollout", "start", "-f", toml.to_str().unwrap()]);
    assert_bad(&out, "invalid rollout spec");
    std::fs::write(
        &toml,
        "service = \"api\"\nversion = \"2.0.0\"\n[strategy]\nbatchsize = 2\n",
    )
    .unwrap();
    let out = cli(&fleet, &["rollout", "start", "-f", toml.to_str().unwrap()]);
    assert_bad(&out, "unknown field `batchsize`");
    std::fs::write(
        &toml,
        "service = \"api\"\nversion = \"2.0.0\"\n[strategy]\nhealthy_deadline = \"soon\"\n",
    )
    .unwrap();
    let out = cli(&fleet, &["rollout", "start", "-f", toml.to_str().unwrap()]);
    assert_bad(&out, "strategy.healthy_deadline");
    let out = cli(
        &fleet,
        &["rollout", "start", "-f", "/nonexistent/rollout.toml"],
    );
    assert_bad(&out, "/nonexistent/rollout.toml");

    let out = cli(&fleet, &["rollout", "pause", "999"]);
    assert_bad(&out, "rollout 999 not found");

    let after: Vec<RolloutSummary> = fleet.api().unwrap().get("/v1/rollouts").await.unwrap();
    assert_eq!(
        after.len(),
        before.len(),
        "a refused rollout must not be stored"
    );
    assert_fleet_on(&fleet, "1.0.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn releases_are_immutable_and_validated() {
    let fleet = installed_fleet(1).await;

    let a = fleet.dir.join("a.sh");
    std::fs::write(&a, "#!/bin/sh\necho a\n").unwrap();
    let b = fleet.dir.join("b.sh");
    std::fs::write(&b, "#!/bin/sh\necho b\n").unwrap();
    let junk = fleet.dir.join("junk.bin");
    std::fs::write(&junk, "not an executable").unwrap();

    let out = cli(
        &fleet,
        &["release", "push", "tool", "1.0.0", a.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(
        &fleet,
        &["release", "push", "tool", "1.0.0", a.to_str().unwrap()],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("already pushed"));
    let out = cli(
        &fleet,
        &["release", "push", "tool", "1.0.0", b.to_str().unwrap()],
    );
    assert_bad(&out, "releases are immutable");
    let out = cli(
        &fleet,
        &["release", "push", "tool", "1.0.1", junk.to_str().unwrap()],
    );
    assert_bad(
        &out,
        &format!("{}: neither a .tar.gz nor an executable", junk.display()),
    );
    let out = cli(
        &fleet,
        &["release", "push", "../etc", "1.0.1", a.to_str().unwrap()],
    );
    assert_bad(&out, "service");
    let out = cli(
        &fleet,
        &["release", "push", "tool", "1.0.2", "/nonexistent"],
    );
    assert_bad(&out, "/nonexistent");
}

#[tokio::test(flavor = "multi_thread")]
async fn api_answers_json_errors_with_status_codes() {
    let fleet = installed_fleet(1).await;
    let http = fleet.http();
    let url = fleet.url();
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (http.post(format!("{url}/v1/rollouts")).body("{not json"), 400, "bad_request"),
        (
            http.post(format!("{url}/v1/rollouts"))
                .json(&serde_json::json!({"spec": {"service": "api", "version": "1.0.0", "strategy": {"batch": "x"}}})),
            400,
            "bad_request",
        ),
        (http.get(format!("{url}/v1/rollouts/999")), 404, "not_found"),
        (http.get(format!("{url}/v1/rollouts/abc")), 400, "bad_request"),
        (http.post(format!("{url}/v1/rollouts/1/explode")), 404, "not_found"),
        (http.get(format!("{url}/v1/releases/api/9.0.0")), 404, "not_found"),
        (http.get(format!("{url}/v1/releases/api/9.0.0/artifact")), 404, "not_found"),
        (http.post(format!("{url}/v1/releases/api/1.0.0")).body(""), 400, "bad_request"),
        (http.post(format!("{url}/v1/releases/api/3.0.0")).body("plain text"), 400, "bad_request"),
        (http.get(format!("{url}/v1/nope")), 404, "not_found"),
        (http.post(format!("{url}/v1/rollouts/1/pause")), 409, "conflict"),
    ];
    for (req, status, code) in cases {
        let resp = req.send().await.unwrap();
        let got = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(got, status, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_agent_config_is_refused_with_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "state_dir = \"/tmp/x\"\n[[service]]\nname = \"api\"\ncommand = [\"true\"]\nstop_grace = \"5 parsecs\"\nhealth = { type = \"tcp\", address = \"127.0.0.1:1\" }\n",
    )
    .unwrap();
    let out = Command::new(exe())
        .args(["agent", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_bad(&out, "service.api.stop_grace");
    let out = Command::new(exe())
        .args(["agent", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_bad(&out, "/nonexistent/agent.toml");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_json_is_refused_and_large_artifacts_stream() {
    let fleet = installed_fleet(1).await;
    let url = fleet.url();
    let http = fleet.http();
    // A JSON body far beyond any real rollout spec is refused, not buffered:
    // the answer is 413, or, when the server answers and closes before the
    // client has finished writing, a connection cut short. Either way the
    // server carries on and stores nothing.
    let huge = format!("{{\"spec\": {{\"service\": \"{}\"}}}}", "a".repeat(8 << 20));
    let sent = http
        .post(format!("{url}/v1/rollouts"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await;
    match sent {
        Ok(resp) => assert_eq!(resp.status().as_u16(), 413),
        Err(e) => assert!(e.is_request(), "{e:?}"),
    }
    let rollouts: Vec<RolloutSummary> = fleet.api().unwrap().get("/v1/rollouts").await.unwrap();
    assert_eq!(rollouts.len(), 1, "only the install");
    // An artifact larger than that limit still uploads: it streams to disk.
    let mut script = b"#!/bin/sh\n".to_vec();
    script.extend(std::iter::repeat_n(b'#', 5 << 20));
    let resp = http
        .post(format!("{url}/v1/releases/tool/1.0.0"))
        .body(script)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
}
