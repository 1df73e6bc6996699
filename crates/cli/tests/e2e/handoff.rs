//! Clients never notice: rolling upgrades under continuous load (a fresh
//! connection per request), with listener handoff, and with plain restarts
//! behind a real HAProxy that the agent drains.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rollwave::fleet::{free_port, Fleet, FleetSpec};
use rollwave::load::{Load, LoadStats};
use rollwave_core::RolloutState;

use crate::harness::*;

/// No request failed, enough were made to mean something, and every answer
/// came from one of `versions`.
fn assert_clean(stats: &LoadStats, versions: &[&str]) {
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    assert!(stats.ok >= 200, "only {} requests made", stats.ok);
    for v in stats.versions.keys() {
        assert!(versions.contains(&v.as_str()), "answer from {v}: {stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn handoff_upgrade_under_load_fails_no_request() {
    let fleet = installed_fleet(5).await;
    push(&fleet, "2.0.0", true).await;
    let load = Load::start(fleet.service_urls(), 4, Duration::from_millis(2));
    let r = start(&fleet, "2.0.0", |s| s.batch = Some("2".into()))
        .await
        .unwrap();
    let r = wait_done(&fleet, r.id).await;
    let stats = load.stop().await;
    assert!(r.fully_upgraded(), "{r:#?}");
    assert_clean(&stats, &["1.0.0", "2.0.0"]);
    assert!(stats.versions.contains_key("2.0.0"), "{stats:?}");
    assert_fleet_on(&fleet, "2.0.0").await;
    // The agent measured each switch: from the command to the new version
    // passing its check.
    let switched = r
        .events
        .iter()
        .filter(|e| e.message.starts_with("serving after "))
        .count();
    assert_eq!(switched, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_release_under_handoff_fails_no_request() {
    let fleet = installed_fleet(5).await;
    push(&fleet, "2.0.0", false).await;
    let load = Load::start(fleet.service_urls(), 4, Duration::from_millis(2));
    let r = start(&fleet, "2.0.0", |s| {
        s.batch = Some("2".into());
        s.healthy_deadline = Some("2s".into());
    })
    .await
    .unwrap();
    let r = wait_done(&fleet, r.id).await;
    let stats = load.stop().await;
    assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
    // During its gate the candidate shares the sockets and may answer some
    // requests; it is never promoted, and nothing fails.
    assert_clean(&stats, &["1.0.0", "2.0.0"]);
    assert_fleet_on(&fleet, "1.0.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_and_restarted_while_serving_fails_no_request() {
    let mut fleet = installed_fleet(2).await;
    let load = Load::start(fleet.service_urls(), 2, Duration::from_millis(2));
    fleet.kill_agent(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.start_agent(0).unwrap();
    fleet.wait_online(2).await.unwrap();
    // The new agent took the listening socket back: a handoff still works.
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let r = wait_done(&fleet, r.id).await;
    let stats = load.stop().await;
    assert!(r.fully_upgraded(), "{r:#?}");
    assert_clean(&stats, &["1.0.0", "2.0.0"]);
    let log = std::fs::read_to_string(fleet.nodes[0].state_dir.join("agent.log")).unwrap();
    assert!(log.contains("re-adopted running service"), "{log}");
    assert!(!log.contains("switching by restart"), "{log}");
}

/// HAProxy in front of the fleet, killed when dropped.
struct Haproxy {
    child: Child,
    port: u16,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// No retries and no redispatch: a request HAProxy sends to a stopped
/// server fails instead of being quietly sent elsewhere, so only the drain
/// keeps the count of failed requests at zero.
fn start_haproxy(dir: &Path, socket: &Path, fleet: &Fleet) -> Haproxy {
    let port = free_port().unwrap();
    let servers: String = fleet
        .nodes
        .iter()
        .map(|n| {
            format!(
                "    server {} 127.0.0.1:{} check inter 100ms fall 2 rise 2\n",
                n.name, n.port
            )
        })
        .collect();
    let cfg = format!(
        "global\n    stats socket {} mode 600 level admin\n\
         defaults\n    mode http\n    timeout connect 1s\n    timeout client 10s\n    timeout server 10s\n    \
         retries 0\n    option http-server-close\n\
         frontend web\n    bind 127.0.0.1:{port}\n    default_backend api\n\
         backend api\n    balance roundrobin\n{servers}",
        socket.display()
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&path)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
        .spawn()
        .expect("haproxy is not installed: run scripts/test.sh, which installs it");
    Haproxy { child, port }
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_switch_behind_haproxy_drains_and_fails_no_request() {
    let lb_dir = tempfile::tempdir().unwrap();
    let socket = lb_dir.path().join("admin.sock");
    let fleet = installed(FleetSpec {
        switch: "restart".into(),
        haproxy_socket: Some(socket.clone()),
        ..FleetSpec::new(exe().into(), 3)
    })
    .await;
    let lb = start_haproxy(lb_dir.path(), &socket, &fleet);
    let front = format!("http://127.0.0.1:{}/", lb.port);
    // Every server is up in HAProxy before the load starts.
    wait_until("haproxy to serve", || {
        let front = front.clone();
        async move {
            let ok = reqwest::get(&front).await.ok()?.status().is_success();
            ok.then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    push(&fleet, "2.0.0", true).await;
    let load = Load::start(vec![front], 4, Duration::from_millis(2));
    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let r = wait_done(&fleet, r.id).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = load.stop().await;
    assert!(r.fully_upgraded(), "{r:#?}");
    assert_clean(&stats, &["1.0.0", "2.0.0"]);
    let drained = r.events.iter().filter(|e| e.message == "draining").count();
    assert_eq!(drained, 3, "every node was drained first");
    assert_fleet_on(&fleet, "2.0.0").await;
}

/// A WSGI app answering like the demo service, from the release's
/// `release.toml`.
const WSGI_APP: &str = r#"import os, re
here = os.path.dirname(os.path.abspath(__file__))
text = open(os.path.join(here, "release.toml")).read()
version = re.search(r'^version = "([^"]+)"', text, re.M).group(1)
healthy = re.search(r"^healthy = true", text, re.M) is not None

def app(environ, start_response):
    if environ["PATH_INFO"] == "/healthz":
        status = "200 OK" if healthy else "503 Service Unavailable"
        body = b"ok\n" if healthy else b"broken\n"
    else:
        status, body = "200 OK", ("api %s\n" % version).encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"#;

async fn push_wsgi(fleet: &Fleet, version: &str, healthy: bool) {
    let release = rollwave::demo_service::DemoRelease {
        version: version.into(),
        healthy,
        broken_on: Vec::new(),
        error_rate: 0.0,
    };
    let bytes =
        rollwave::demo_service::tarball_with(&release, &[("app.py", WSGI_APP, 0o644)]).unwrap();
    let _: rollwave_api::PushResponse = fleet
        .api()
        .unwrap()
        .post_bytes(&format!("/v1/releases/{SERVICE}/{version}"), bytes)
        .await
        .unwrap();
}

/// Socket activation is a standard: gunicorn, from Debian's package and
/// unchanged, takes the agent's sockets and hands off under load like the
/// demo service, for a good release and a broken one.
#[tokio::test(flavor = "multi_thread")]
async fn gunicorn_unchanged_hands_off_under_load_and_fails_no_request() {
    let installed = Command::new("gunicorn").arg("--version").output();
    assert!(
        installed.is_ok_and(|o| o.status.success()),
        "gunicorn is not installed: run scripts/test.sh, which installs it"
    );
    let gunicorn = ["gunicorn", "--chdir", "{release}", "--workers", "2"];
    let fleet = Fleet::launch(FleetSpec {
        command: Some(
            gunicorn
                .iter()
                .map(|a| a.to_string())
                .chain(["--graceful-timeout".into(), "5".into(), "app:app".into()])
                .collect(),
        ),
        ..FleetSpec::new(exe().into(), 3)
    })
    .await
    .unwrap();
    push_wsgi(&fleet, "1.0.0", true).await;
    let r = start(&fleet, "1.0.0", |s| s.batch = Some("100%".into()))
        .await
        .unwrap();
    assert!(wait_done(&fleet, r.id).await.fully_upgraded());

    push_wsgi(&fleet, "2.0.0", false).await;
    push_wsgi(&fleet, "3.0.0", true).await;
    let load = Load::start(fleet.service_urls(), 4, Duration::from_millis(2));
    let bad = start(&fleet, "2.0.0", |s| s.healthy_deadline = Some("2s".into()))
        .await
        .unwrap();
    let bad = wait_done(&fleet, bad.id).await;
    let good = start(&fleet, "3.0.0", |_| {}).await.unwrap();
    let good = wait_done(&fleet, good.id).await;
    let stats = load.stop().await;
    assert_eq!(bad.state, RolloutState::RolledBack, "{bad:#?}");
    assert!(good.fully_upgraded(), "{good:#?}");
    assert_clean(&stats, &["1.0.0", "2.0.0", "3.0.0"]);
    assert!(stats.versions.contains_key("3.0.0"), "{stats:?}");
    assert_fleet_on(&fleet, "3.0.0").await;
    for node in &fleet.nodes {
        let log = std::fs::read_to_string(node.state_dir.join("agent.log")).unwrap();
        assert!(log.contains("handoff candidate started"), "{log}");
        assert!(!log.contains("switching by restart"), "{log}");
    }
}
