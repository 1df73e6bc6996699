//! Who may do what, with a real control plane and real agents: tokens and
//! roles, agent enrollment, a node that claims to be another, and hostile
//! requests. Every refusal is a JSON error with its status, changes
//! nothing, and leaves the server up.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use rollwave::fleet::Fleet;
use rollwave_api::{AgentMessage, CreatedToken, ServerMessage, AGENT_CONNECT_PATH, AGENT_PROTOCOL};
use rollwave_core::{AuditEntry, Release, Role, RolloutSummary, TokenView};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

async fn token(fleet: &Fleet, name: &str, role: Role, ttl: Option<&str>) -> CreatedToken {
    fleet.create_token(name, role, ttl).await.unwrap()
}

/// Sends `req` and returns its status and JSON body.
async fn answer(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// Asserts a JSON error: status, code, and a message containing `text`.
fn assert_refused(got: &(StatusCode, Value), status: u16, code: &str, text: &str) {
    let (s, body) = got;
    // Bounded: a body echoing a hostile request can be megabytes.
    let shown: String = body.to_string().chars().take(500).collect();
    assert_eq!(s.as_u16(), status, "{shown}");
    assert_eq!(body["error"]["code"], code, "{shown}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(text),
        "{message:?} should contain {text:?}"
    );
}

async fn health(fleet: &Fleet) {
    let resp = reqwest::get(format!("{}/v1/health", fleet.url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the control plane is down");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_call_needs_a_live_token_whose_role_may() {
    let fleet = installed_fleet(1).await;
    push(&fleet, "2.0.0", true).await;
    let url = fleet.url();
    let bare = reqwest::Client::new();

    // Only the health check and the dashboard's page answer without one.
    assert_eq!(
        bare.get(format!("{url}/v1/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        bare.get(format!("{url}/")).send().await.unwrap().status(),
        200
    );
    for path in [
        "/v1/nodes",
        "/v1/rollouts",
        "/v1/audit",
        "/metrics",
        "/v1/openapi.json",
    ] {
        let resp = bare.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(resp.headers()["www-authenticate"], "Bearer", "{path}");
        let got = (resp.status(), resp.json().await.unwrap());
        assert_refused(&got, 401, "unauthorized", "a token is required");
    }
    let with = |t: &str| {
        bare.get(format!("{url}/v1/nodes"))
            .bearer_auth(t.to_string())
    };
    assert_refused(
        &answer(with("nope")).await,
        401,
        "unauthorized",
        "malformed",
    );
    assert_refused(
        &answer(with("rw_abcdef_0123456789")).await,
        401,
        "unauthorized",
        "not known",
    );
    // A real token's id with another secret is no better.
    let admin_id = fleet.admin_token.split('_').nth(1).unwrap();
    let forged = format!("rw_{admin_id}_{}", "0".repeat(64));
    assert_refused(
        &answer(with(&forged)).await,
        401,
        "unauthorized",
        "not known",
    );

    // Roles, each made with the CLI.
    let create = |role: &str, name: &str| {
        let out = cli(&fleet, &["token", "create", "--role", role, "--name", name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let viewer = create("viewer", "alice");
    let operator = create("operator", "ci-deploy");
    let as_ = |t: &str, req: reqwest::RequestBuilder| req.bearer_auth(t.to_string());
    let start = json!({"spec": {"service": "api", "version": "2.0.0"}});

    assert_eq!(
        answer(as_(&viewer, bare.get(format!("{url}/v1/rollouts"))))
            .await
            .0,
        200
    );
    assert_refused(
        &answer(as_(
            &viewer,
            bare.post(format!("{url}/v1/rollouts")).json(&start),
        ))
        .await,
        403,
        "forbidden",
        "token \"alice\" has the viewer role; this needs admin or operator",
    );
    assert_refused(
        &answer(as_(
            &operator,
            bare.post(format!("{url}/v1/releases/api/3.0.0"))
                .body("#!/bin/sh\n"),
        ))
        .await,
        403,
        "forbidden",
        "this needs admin",
    );
    assert_refused(
        &answer(as_(
            &operator,
            bare.post(format!("{url}/v1/tokens"))
                .json(&json!({"name": "mine", "role": "admin"})),
        ))
        .await,
        403,
        "forbidden",
        "operator role",
    );
    // Operators start rollouts, but not commands on the control plane.
    let with_hook = json!({"spec": {"service": "api", "version": "2.0.0",
        "hooks": {"pre_rollout": [{"command": ["sh", "-c", "id > /tmp/owned"]}]}}});
    assert_refused(
        &answer(as_(&operator, bare.post(format!("{url}/v1/rollouts")).json(&with_hook))).await,
        403,
        "forbidden",
        "hooks.pre_rollout[0]: exec hooks run commands on the control plane and need an admin token",
    );
    // Nor can any rollout send a command to the nodes.
    let to_nodes = json!({"spec": {"service": "api", "version": "2.0.0",
        "hooks": {"pre_node": [{"command": ["rm", "-rf", "/"]}]}}});
    assert_refused(
        &answer(
            fleet
                .http()
                .post(format!("{url}/v1/rollouts"))
                .json(&to_nodes),
        )
        .await,
        400,
        "bad_request",
        "hooks.pre_node[0].kind: a rollout cannot send commands to nodes",
    );
    let (status, body) = answer(as_(
        &operator,
        bare.post(format!("{url}/v1/rollouts")).json(&start),
    ))
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["rollout"]["id"].as_u64().unwrap();
    assert!(wait_done(&fleet, id).await.fully_upgraded());

    // Refused changes changed nothing, and are in the audit trail by name.
    let releases: Vec<Release> = fleet.api().unwrap().get("/v1/releases").await.unwrap();
    assert!(releases.iter().all(|r| r.version != "3.0.0"));
    let audit: Vec<AuditEntry> = fleet.api().unwrap().get("/v1/audit").await.unwrap();
    let find = |action: &str, actor: &str, status: u16| {
        audit
            .iter()
            .find(|e| e.action == action && e.actor == actor && e.status == status)
            .unwrap_or_else(|| panic!("no {action} by {actor} ({status}) in {audit:#?}"))
    };
    find("release.push", "ci-deploy", 403);
    find("rollout.start", "alice", 403);
    find("rollout.start", "ci-deploy", 201);
    find("token.create", rollwave_server::BOOTSTRAP_ADMIN, 201);
    let anonymous = answer(bare.post(format!("{url}/v1/rollouts")).json(&start)).await;
    assert_refused(&anonymous, 401, "unauthorized", "a token is required");
    let audit: Vec<AuditEntry> = fleet.api().unwrap().get("/v1/audit").await.unwrap();
    assert!(audit
        .iter()
        .any(|e| e.action == "rollout.start" && e.actor == "unauthenticated" && e.status == 401));

    // Listed without secrets; revoked and expired tokens stop working.
    let out = cli(&fleet, &["token", "list", "--json"]);
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listed
        .iter()
        .any(|t| t["name"] == "alice" && t["role"] == "viewer"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains(&viewer) && !text.contains("secret"),
        "{text}"
    );
    let out = cli(&fleet, &["token", "revoke", "alice"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = answer(as_(&viewer, bare.get(format!("{url}/v1/rollouts")))).await;
    assert_refused(&again, 401, "unauthorized", "revoked");
    let out = cli(&fleet, &["token", "revoke", "alice"]);
    assert_eq!(out.status.code(), Some(2));

    let short = token(&fleet, "short-lived", Role::Viewer, Some("1s")).await;
    let expired = wait_until("the token to expire", || async {
        let got = answer(as_(&short.token, bare.get(format!("{url}/v1/nodes")))).await;
        (got.0 == 401).then_some(got)
    })
    .await;
    assert_refused(&expired, 401, "unauthorized", "expired");
    // The CLI says the same, in one line, with exit code 2.
    let out = fleet
        .command()
        .env("ROLLWAVE_TOKEN", &short.token)
        .arg("nodes")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: the token has expired"
    );

    // The bootstrap token is its owner's alone; the store has no secret.
    let data = fleet.dir.join("server-data");
    let mode = std::fs::metadata(data.join(rollwave_server::ADMIN_TOKEN_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut stored = Vec::new();
    for f in ["rollwave.db", "rollwave.db-wal"] {
        stored.extend(std::fs::read(data.join(f)).unwrap_or_default());
    }
    let stored = String::from_utf8_lossy(&stored);
    for t in [&fleet.admin_token, &operator, &viewer] {
        let secret = t.rsplit('_').next().unwrap();
        assert!(!stored.contains(secret), "a secret is in the store");
    }
    health(&fleet).await;
}

/// Opens an agent session with `credential`, says hello as `node`, and
/// returns the control plane's first answer.
async fn hello_as(
    fleet: &Fleet,
    credential: Option<&str>,
    node: &str,
) -> Result<ServerMessage, u16> {
    let ws = format!(
        "{}{AGENT_CONNECT_PATH}",
        fleet.url().replacen("http", "ws", 1)
    );
    let mut req = ws.into_client_request().unwrap();
    if let Some(c) = credential {
        req.headers_mut()
            .insert("authorization", format!("Bearer {c}").parse().unwrap());
    }
    let (mut ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            return Err(resp.status().as_u16())
        }
        Err(e) => panic!("{e}"),
    };
    let hello = AgentMessage::Hello {
        protocol: AGENT_PROTOCOL,
        node: node.into(),
        labels: Default::default(),
        agent_version: "impostor".into(),
        services: Default::default(),
    };
    ws.send(Message::text(serde_json::to_string(&hello).unwrap()))
        .await
        .unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(_)) => continue,
            other => panic!("session ended without an answer: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_enroll_once_and_act_only_as_themselves() {
    let fleet = installed_fleet(2).await;
    let url = fleet.url();
    let http = reqwest::Client::new();
    let enroll = |join: &str, node: &str| {
        http.post(format!("{url}/v1/enroll"))
            .bearer_auth(join.to_string())
            .json(&json!({ "node": node }))
    };

    // A one-time join token enrolls one node; replayed, it is refused.
    let out = cli(
        &fleet,
        &[
            "token", "create", "--role", "join", "--name", "rack-7", "--once",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let once = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (status, body) = answer(enroll(&once, "node-9")).await;
    assert_eq!(status, 201, "{body}");
    let node9: CreatedToken = serde_json::from_value(body).unwrap();
    assert_eq!(node9.view.node.as_deref(), Some("node-9"));
    assert_refused(
        &answer(enroll(&once, "node-10")).await,
        401,
        "unauthorized",
        "already used",
    );
    // A join token cannot take over an enrolled node's name.
    let reusable = token(&fleet, "more-racks", Role::Join, Some("1h")).await;
    assert_refused(
        &answer(enroll(&reusable.token, "node-1")).await,
        409,
        "conflict",
        "node \"node-1\" is already enrolled",
    );
    // Nor do other tokens enroll, or join tokens read.
    assert_refused(
        &answer(enroll(&fleet.admin_token, "node-11")).await,
        403,
        "forbidden",
        "this needs join",
    );
    let read = http
        .get(format!("{url}/v1/nodes"))
        .bearer_auth(&reusable.token);
    assert_refused(&answer(read).await, 403, "forbidden", "join role");

    // A session needs a node credential, and acts as its own node only.
    assert_eq!(hello_as(&fleet, None, "node-2").await.unwrap_err(), 401);
    assert_eq!(
        hello_as(&fleet, Some(&reusable.token), "node-2")
            .await
            .unwrap_err(),
        403
    );
    let node1 = std::fs::read_to_string(fleet.nodes[0].state_dir.join("credential")).unwrap();
    let mode = std::fs::metadata(fleet.nodes[0].state_dir.join("credential"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let before: Vec<_> = fleet.nodes_view().await.unwrap();
    match hello_as(&fleet, Some(node1.trim()), "node-2").await {
        Ok(ServerMessage::Refused { reason }) => assert_eq!(
            reason,
            "this credential belongs to node \"node-1\"; it cannot act as \"node-2\""
        ),
        other => panic!("{other:?}"),
    }
    // node-2's view is its own agent's, and both agents are still online.
    let after: Vec<_> = fleet.nodes_view().await.unwrap();
    assert_eq!(before, after);
    assert!(after.iter().all(|n| n.online), "{after:#?}");
    let audit: Vec<AuditEntry> = fleet.api().unwrap().get("/v1/audit").await.unwrap();
    let lie = audit
        .iter()
        .find(|e| e.action == "agent.refused")
        .unwrap_or_else(|| panic!("{audit:#?}"));
    assert_eq!(
        (lie.actor.as_str(), lie.target.as_str()),
        ("agent@node-1", "node node-2")
    );
    // An agent's credential reads nothing but artifacts.
    let read = http
        .get(format!("{url}/v1/nodes"))
        .bearer_auth(node1.trim());
    assert_refused(&answer(read).await, 403, "forbidden", "agent role");

    // Revoking a node's credential ends its session.
    let out = cli(&fleet, &["token", "revoke", "agent@node-2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("node-2 to go offline", || async {
        let nodes = fleet.nodes_view().await.ok()?;
        nodes
            .iter()
            .any(|n| n.name == "node-2" && !n.online)
            .then_some(())
    })
    .await;
    let tokens: Vec<TokenView> = fleet.api().unwrap().get("/v1/tokens").await.unwrap();
    let revoked = tokens.iter().find(|t| t.name == "agent@node-2").unwrap();
    assert!(revoked.revoked_at.is_some());
    health(&fleet).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_requests_get_clear_errors_and_change_nothing() {
    let fleet = installed_fleet(1).await;
    push(&fleet, "2.0.0", true).await;
    let url = fleet.url();
    let http = fleet.http();
    let before: Vec<RolloutSummary> = fleet.api().unwrap().get("/v1/rollouts").await.unwrap();
    let start = |strategy: Value| {
        http.post(format!("{url}/v1/rollouts"))
            .json(&json!({"spec": {"service": "api", "version": "2.0.0", "strategy": strategy}}))
    };

    // Extreme numbers.
    let cases = [
        (json!({"max_unavailable": 1e30}), "max_unavailable"),
        (json!({"batch": i64::MAX}), "batch"),
        (json!({"batch": -1}), "batch"),
        (json!({"max_failures": u64::MAX}), "max_failures"),
        (
            json!({"min_healthy_time": "99999999999999999999h"}),
            "min_healthy_time",
        ),
        (json!({"batch": "1e30%"}), "batch"),
    ];
    for (strategy, field) in cases {
        let got = answer(start(strategy.clone())).await;
        let shown: String = got.1.to_string().chars().take(500).collect();
        assert_eq!(got.0, 400, "{strategy}: {shown}");
        let message = got.1["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{strategy}: {message}");
        assert!(!message.contains('\n'), "{message}");
    }
    // 100,000 waves.
    let waves: Vec<String> = (1..=100_000).map(|i| i.to_string()).collect();
    let got = answer(start(json!({ "waves": waves }))).await;
    assert_refused(&got, 400, "bad_request", "waves");
    // The same through the CLI, from a file.
    let spec = fleet.dir.join("extreme.toml");
    std::fs::write(
        &spec,
        "service = \"api\"\nversion = \"2.0.0\"\n[strategy]\nmax_unavailable = 1e30\n",
    )
    .unwrap();
    let out = cli(&fleet, &["rollout", "start", "-f", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_unavailable"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Malformed and mistyped JSON.
    for body in ["{", "null", "[]", "{\"spec\": 7}", "\u{0}\u{1}"] {
        let got = answer(
            http.post(format!("{url}/v1/rollouts"))
                .header("content-type", "application/json")
                .body(body),
        )
        .await;
        assert_refused(&got, 400, "bad_request", "invalid rollout request");
    }
    // Oversized headers are refused by the HTTP layer before any handler.
    let huge = "x".repeat(1 << 20);
    let sent = http
        .get(format!("{url}/v1/nodes"))
        .header("x-junk", huge)
        .send()
        .await;
    match sent {
        Ok(resp) => assert_eq!(resp.status(), 431),
        Err(e) => assert!(e.is_request() || e.is_connect(), "{e:?}"),
    }
    let many = (0..1000).fold(http.get(format!("{url}/v1/nodes")), |req, i| {
        req.header(format!("x-h{i}"), "v")
    });
    match many.send().await {
        Ok(resp) => assert!(
            resp.status() == 431 || resp.status() == 200,
            "{}",
            resp.status()
        ),
        Err(e) => assert!(e.is_request(), "{e:?}"),
    }

    let after: Vec<RolloutSummary> = fleet.api().unwrap().get("/v1/rollouts").await.unwrap();
    assert_eq!(
        before.len(),
        after.len(),
        "a refused request started a rollout"
    );
    health(&fleet).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
}
