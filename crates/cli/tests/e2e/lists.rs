//! What keeps the control plane answering at size: pages of nodes and
//! rollouts, a rollout's summary, and enrollments that arrive together.

use reqwest::StatusCode;
use rollwave_api::CreatedToken;
use rollwave_core::{NodeView, Role, RolloutSummary};
use serde_json::{json, Value};

use crate::harness::*;

async fn answer(req: reqwest::RequestBuilder) -> (StatusCode, Value, Option<String>) {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let link = resp
        .headers()
        .get(reqwest::header::LINK)
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body, link)
}

/// The address in a `Link: <...>; rel="next"` header.
fn next_page(link: &str) -> String {
    assert!(link.ends_with("; rel=\"next\""), "{link}");
    link.trim_start_matches('<')
        .split('>')
        .next()
        .unwrap()
        .to_string()
}

fn assert_bad(got: &(StatusCode, Value, Option<String>), field: &str) {
    let (status, body, _) = got;
    assert_eq!(status.as_u16(), 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with(&format!("{field}: ")), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_come_in_pages_and_a_rollout_in_a_summary() {
    let fleet = installed_fleet(3).await;
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |s| s.batch = Some("1".into()))
        .await
        .unwrap();
    let done = wait_done(&fleet, r.id).await;
    let url = fleet.url();
    let http = fleet.http();

    // Nodes: whole without a limit, in pages with one.
    let (status, all, link) = answer(http.get(format!("{url}/v1/nodes"))).await;
    assert_eq!(status, 200);
    assert_eq!(link, None);
    let all: Vec<NodeView> = serde_json::from_value(all).unwrap();
    assert_eq!(all.len(), 3);
    let mut paged = Vec::new();
    let mut path = "/v1/nodes?limit=2".to_string();
    loop {
        let (status, page, link) = answer(http.get(format!("{url}{path}"))).await;
        assert_eq!(status, 200, "{page}");
        let page: Vec<NodeView> = serde_json::from_value(page).unwrap();
        assert!(page.len() <= 2);
        paged.extend(page);
        match link {
            Some(link) => path = next_page(&link),
            None => break,
        }
    }
    assert_eq!(
        paged, all,
        "the pages together are the whole list, in order"
    );

    // Rollouts: summaries, newest first, in pages.
    let (status, first, link) = answer(http.get(format!("{url}/v1/rollouts?limit=1"))).await;
    assert_eq!(status, 200, "{first}");
    let first: Vec<RolloutSummary> = serde_json::from_value(first).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].id, done.id);
    assert_eq!(first[0], RolloutSummary::of(&done));
    assert_eq!(first[0].counts["upgraded"], 3);
    let (status, second, link) =
        answer(http.get(format!("{url}{}", next_page(&link.unwrap())))).await;
    assert_eq!(status, 200, "{second}");
    let second: Vec<RolloutSummary> = serde_json::from_value(second).unwrap();
    assert_eq!(second.len(), 1, "the install");
    assert!(second[0].id < done.id);
    assert_eq!(link, None, "nothing after the install");

    // One rollout's summary, live or stored.
    let (status, summary, _) =
        answer(http.get(format!("{url}/v1/rollouts/{}/summary", done.id))).await;
    assert_eq!(status, 200, "{summary}");
    let summary: RolloutSummary = serde_json::from_value(summary).unwrap();
    assert_eq!(summary, RolloutSummary::of(&done));
    let (status, body, _) = answer(http.get(format!("{url}/v1/rollouts/999/summary"))).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");

    // Bad pages: a JSON error naming the parameter.
    for bad in ["0", "1001", "-1", "many"] {
        assert_bad(
            &answer(http.get(format!("{url}/v1/rollouts?limit={bad}"))).await,
            "limit",
        );
        assert_bad(
            &answer(http.get(format!("{url}/v1/nodes?limit={bad}"))).await,
            "limit",
        );
    }
    assert_bad(
        &answer(http.get(format!("{url}/v1/rollouts?cursor=abc"))).await,
        "cursor",
    );

    // The CLI lists summaries.
    let out = cli(&fleet, &["rollout", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("PROBLEMS"), "{text}");
    assert!(text.contains("3/3"), "{text}");
    let out = cli(&fleet, &["rollout", "list", "--limit", "0"]);
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollments_that_arrive_together_each_get_one_answer() {
    let mut fleet = installed_fleet(1).await;
    let url = fleet.url();
    let http = fleet.http();
    let enroll = |join: String, node: String| {
        let req = http
            .post(format!("{url}/v1/enroll"))
            .bearer_auth(join)
            .json(&json!({ "node": node }));
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    // A fleet's join token, many nodes at once: each gets its own credential.
    let join = fleet
        .create_token("rack-1", Role::Join, Some("1h"))
        .await
        .unwrap()
        .token;
    let answers =
        futures_util::future::join_all((0..40).map(|i| enroll(join.clone(), format!("burst-{i}"))))
            .await;
    let mut ids = std::collections::BTreeSet::new();
    for (status, body) in &answers {
        assert_eq!(*status, 201, "{body}");
        let created: CreatedToken = serde_json::from_value(body.clone()).unwrap();
        assert!(
            ids.insert(created.view.id.clone()),
            "one id, one credential"
        );
    }

    // One node, many enrollments at once: exactly one wins.
    let answers =
        futures_util::future::join_all((0..20).map(|_| enroll(join.clone(), "twin".into()))).await;
    let won = answers.iter().filter(|(s, _)| *s == 201).count();
    assert_eq!(won, 1, "{answers:?}");
    assert!(
        answers.iter().all(|(s, _)| *s == 201 || *s == 409),
        "{answers:?}"
    );

    // A join token with 5 uses, 25 nodes at once: exactly 5 enroll, and the
    // count stored survives a restart.
    let out = cli(
        &fleet,
        &[
            "token", "create", "--role", "join", "--name", "five", "--uses", "5",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let five = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let answers = futures_util::future::join_all(
        (0..25).map(|i| enroll(five.clone(), format!("limited-{i}"))),
    )
    .await;
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == 201).count(),
        5,
        "{answers:?}"
    );
    assert!(
        answers.iter().all(|(s, _)| *s == 201 || *s == 401),
        "{answers:?}"
    );
    fleet.kill_server();
    fleet.restart_server().await.unwrap();
    let (status, _) = enroll(five.clone(), "after-restart".into()).await;
    assert_eq!(status, 401, "every use was spent, and stored so");
    let (status, body) = enroll(join.clone(), "after-restart".into()).await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = enroll(join, "burst-3".into()).await;
    assert_eq!(status, 409, "credentials issued in the burst were stored");
}
