//! Downloads under a crowd: a control plane that streams one artifact at a
//! time (`--max-downloads 1`) and agents that wait their turn.

use std::io::Write;
use std::net::TcpStream;

use rollwave::demo_service::DemoRelease;
use rollwave::fleet::{Fleet, FleetSpec};
use rollwave_api::PushResponse;

use crate::harness::*;

/// A demo release with a large file that gzip stores rather than
/// compresses: an artifact whose stream a reader that never reads holds
/// open, as it is far larger than what the sockets between them buffer.
fn large_release(version: &str) -> Vec<u8> {
    const FILLER: usize = 24 << 20;
    let release = DemoRelease {
        version: version.into(),
        healthy: true,
        broken_on: Vec::new(),
        error_rate: 0.0,
    };
    let toml = toml::to_string(&release).unwrap();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::none(),
    ));
    for (path, content) in [
        ("release.toml", toml.as_bytes().to_vec()),
        ("filler", vec![0u8; FILLER]),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, path, content.as_slice())
            .unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// A value from the control plane's metrics, e.g.
/// `rollwave_downloads_refused_total`.
async fn metric(fleet: &Fleet, name: &str) -> Option<u64> {
    let text = fleet
        .http()
        .get(format!("{}/metrics", fleet.url()))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_beyond_max_downloads_wait_and_then_succeed() {
    let nodes = 3;
    let fleet = Fleet::launch(FleetSpec {
        server_args: vec!["--max-downloads".into(), "1".into()],
        ..FleetSpec::new(exe().into(), nodes)
    })
    .await
    .unwrap();
    let _: PushResponse = fleet
        .api()
        .unwrap()
        .post_bytes(
            &format!("/v1/releases/{SERVICE}/1.0.0"),
            large_release("1.0.0"),
        )
        .await
        .unwrap();

    // Take the one stream and read nothing: until this connection closes,
    // every agent is told to come back later.
    let mut holder = TcpStream::connect(fleet.addr).unwrap();
    write!(
        holder,
        "GET /v1/releases/{SERVICE}/1.0.0/artifact HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\r\n",
        fleet.addr, fleet.admin_token
    )
    .unwrap();
    holder.flush().unwrap();
    wait_until("the held stream to start", || async {
        metric(&fleet, "rollwave_downloads_in_flight")
            .await
            .filter(|&n| n == 1)
    })
    .await;

    let r = start(&fleet, "1.0.0", |s| {
        s.batch = Some("100%".into());
        s.min_healthy_time = Some("0s".into());
    })
    .await
    .unwrap();
    // Every agent has been refused at least once (past the first refusal
    // of each, the count only grows while the stream is held).
    let n = wait_until("every agent to be refused a download", || async {
        metric(&fleet, "rollwave_downloads_refused_total")
            .await
            .filter(|&n| n >= nodes as u64)
    })
    .await;
    assert!(n >= nodes as u64);
    let api = fleet.api().unwrap();
    let held = get(&api, r.id).await.unwrap();
    assert!(held.is_active(), "{held:#?}");
    for node in &fleet.nodes {
        let staged = node.state_dir.join("services/api/releases/1.0.0");
        assert!(
            !staged.exists(),
            "{} staged while the stream was held",
            node.name
        );
    }

    drop(holder);
    let r = wait_done(&fleet, r.id).await;
    assert!(r.fully_upgraded(), "{r:#?}");
    assert_fleet_on(&fleet, "1.0.0").await;
    // They waited rather than failed: each agent retried, and says why.
    for node in &fleet.nodes {
        let log = std::fs::read_to_string(node.state_dir.join("agent.log")).unwrap();
        assert!(
            log.contains("download failed; retrying") && log.contains("429 Too Many Requests"),
            "{}: {log}",
            node.name
        );
    }
}
