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

/// Guards against a hung test only; nothing here depends on speed.
const GUARD: std::time::Duration = std::time::Duration::from_secs(30);

fn limited_fleet(args: &[&str]) -> FleetSpec {
    FleetSpec {
        tls: true,
        server_args: args.iter().map(|a| a.to_string()).collect(),
        ..FleetSpec::new(exe().into(), 0)
    }
}

/// A TLS connection to the fleet that sends half a request's headers and
/// then stalls.
async fn stalled(fleet: &Fleet) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let connector = tokio_rustls::TlsConnector::from(fleet.client_tls().config().unwrap());
    let tcp = tokio::net::TcpStream::connect(fleet.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /v1/health HTTP/1.1\r\nhost: localhost\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    tls
}

/// Whether the server closed the connection (before `GUARD`).
async fn closed_by_server(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(GUARD, tls.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // hyper may answer a timed-out request with a 408 first.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stalls_in_its_headers_is_let_go() {
    let fleet = Fleet::launch(limited_fleet(&["--header-read-timeout", "1"]))
        .await
        .unwrap();
    let mut slow = stalled(&fleet).await;
    assert!(
        closed_by_server(&mut slow).await,
        "the stalled connection was kept open"
    );
    // And the server still answers.
    let r = fleet
        .http()
        .get(format!("{}/v1/health", fleet.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_holds_only_so_many_connections_without_a_request() {
    // A header timeout longer than the test: only the cap closes anything.
    let fleet = Fleet::launch(limited_fleet(&[
        "--header-read-timeout",
        "3600",
        "--max-pending-per-ip",
        "5",
    ]))
    .await
    .unwrap();
    // A connection that has made a request does not count: an event
    // stream stays open throughout.
    let events = fleet
        .http()
        .get(format!("{}/v1/events", fleet.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(stalled(&fleet).await);
    }
    let mut over = stalled(&fleet).await;
    assert!(
        closed_by_server(&mut over).await,
        "a sixth connection without a request was kept"
    );
    // One stalled client gone, another connection is served.
    drop(held.pop());
    let http = fleet.http();
    let url = fleet.url();
    wait_until("a connection under the cap is served", || {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http.get(format!("{url}/v1/health")).send().await.ok()?;
            (r.status() == 200).then_some(())
        }
    })
    .await;
    drop(events);
}
