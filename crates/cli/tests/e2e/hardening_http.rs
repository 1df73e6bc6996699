//! Every error the control plane answers is the JSON error body with the
//! status its code maps to: what axum's extractors refuse, unknown paths and
//! methods, oversized bodies and messages, and plain HTTP sent to the TLS
//! port.

use rollwave::fleet::{Fleet, FleetSpec};

use crate::harness::*;

/// The status, `error.code` and `error.message` of an answer, which must be
/// the JSON error body.
async fn json_error(r: reqwest::Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = r.text().await.unwrap();
    assert_eq!(content_type, "application/json", "{status}: {text:?}");
    let json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status}: {text:?} is not JSON: {e}"));
    let code = json["error"]["code"].as_str().unwrap().to_string();
    let message = json["error"]["message"].as_str().unwrap().to_string();
    assert!(!message.is_empty(), "{status}: an empty message");
    (status, code, message)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_is_the_json_error_body() {
    let fleet = Fleet::launch(FleetSpec {
        tls: true,
        ..FleetSpec::new(exe().into(), 0)
    })
    .await
    .unwrap();
    let http = fleet.http();
    let url = fleet.url();

    for query in ["limit=99999999999999999999", "before=-1"] {
        let r = http
            .get(format!("{url}/v1/audit?{query}"))
            .send()
            .await
            .unwrap();
        let (status, code, message) = json_error(r).await;
        assert_eq!((status, code.as_str()), (400, "bad_request"), "{query}");
        assert!(message.contains("query string"), "{query}: {message}");
    }

    // Over the JSON body limit.
    let big = format!("{{\"spec\": {{\"service\": \"{}\"}}}}", "a".repeat(3 << 20));
    let r = http
        .post(format!("{url}/v1/rollouts"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    let (status, code, _) = json_error(r).await;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));

    // A megabyte of token name: refused by name, the message shortened.
    let r = http
        .post(format!("{url}/v1/tokens"))
        .json(&serde_json::json!({"name": "x".repeat(1 << 20), "role": "viewer"}))
        .send()
        .await
        .unwrap();
    let (status, code, message) = json_error(r).await;
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    assert!(message.starts_with("name: "), "{message:.200}");
    assert!(message.len() < 4096, "{} bytes", message.len());

    let r = http
        .delete(format!("{url}/v1/rollouts"))
        .send()
        .await
        .unwrap();
    let (status, code, _) = json_error(r).await;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));

    let r = http.get(format!("{url}/v1/nope")).send().await.unwrap();
    let (status, code, _) = json_error(r).await;
    assert_eq!((status, code.as_str()), (404, "not_found"));

    // The audit trail kept the refused token's message, not an empty one.
    let audit: serde_json::Value = http
        .get(format!("{url}/v1/audit"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let create = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "token.create")
        .expect("the refused token creation is in the audit trail");
    assert!(
        create["detail"].as_str().unwrap().starts_with("name: "),
        "{create}"
    );

    // Plain HTTP to the TLS port.
    let plain = url.replacen("https://", "http://", 1);
    let r = reqwest::get(format!("{plain}/v1/health")).await.unwrap();
    let (status, code, message) = json_error(r).await;
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    assert!(message.starts_with("this port speaks TLS"), "{message}");
}
