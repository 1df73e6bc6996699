//! Several control planes on one real etcd: one leads, the others pass
//! requests to it; when the leader dies or stalls past its lease, another
//! takes over, and a stalled leader that wakes changes nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rollwave_api::HealthResponse;
use rollwave_store::etcd::testing::TestEtcd;

use crate::harness::{exe, wait_until};

/// One `rollwave server` on the test's etcd, killed when dropped.
struct Replica {
    child: Option<Child>,
    url: String,
    dir: PathBuf,
}

impl Replica {
    /// kill -9, and wait for it to be gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn replica(etcd: &TestEtcd, dir: &Path, name: &str) -> Replica {
    replica_at(etcd, dir, name, 0, "/replicas/").await
}

/// How a replica is started besides its store.
#[derive(Default)]
struct Launch<'a> {
    /// 0: any; a port chosen beforehand lets agents be told of it before
    /// it starts.
    port: u16,
    prefix: &'a str,
    /// Serve HTTPS with the certificate `rollwave certs init` wrote there,
    /// announcing `https://127.0.0.1:PORT` (`port` must be set).
    tls: Option<&'a Path>,
    /// `--replica-ca-file`.
    replica_ca: Option<&'a Path>,
}

async fn health(url: &str) -> Option<HealthResponse> {
    let resp = reqwest::get(format!("{url}/v1/health")).await.ok()?;
    resp.json().await.ok()
}

async fn leader_of<'a>(replicas: &[&'a Replica]) -> &'a Replica {
    wait_until("a leader elected", || async {
        for r in replicas {
            if health(&r.url).await.is_some_and(|h| h.leader) {
                return Some(*r);
            }
        }
        None
    })
    .await
}

fn admin_token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("data").join("admin.token"))
        .unwrap()
        .trim()
        .to_string()
}

/// `--store` and `--store-prefix` for a fleet's control plane.
fn store_args(etcd: &TestEtcd, prefix: &str) -> Vec<String> {
    vec![
        "--store".into(),
        etcd.store_url(),
        "--store-prefix".into(),
        prefix.into(),
    ]
}

/// Two distinct free ports, for replicas agents are told of beforehand.
fn two_ports() -> (u16, u16) {
    let first = rollwave::fleet::free_port().unwrap();
    loop {
        let second = rollwave::fleet::free_port().unwrap();
        if second != first {
            return (first, second);
        }
    }
}

/// Waits until the replicas listed under `prefix` are `urls`, no more, no
/// fewer (a killed one stays listed until its lease lapses): from then on,
/// a push copies its artifact to each other one before it is answered.
async fn wait_listed(etcd: &TestEtcd, prefix: &str, urls: &[&str]) {
    let view = etcd.store(prefix).await;
    wait_until("the replicas listed", || async {
        let listed = rollwave_store::Store::election(&view)?
            .replicas()
            .await
            .ok()?;
        let mut listed: Vec<&str> = listed.iter().map(String::as_str).collect();
        listed.sort();
        listed.dedup();
        let mut want = urls.to_vec();
        want.sort();
        (listed == want).then_some(())
    })
    .await;
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The artifact a replica holds itself, copied from the one that took the
/// push.
fn blob(replica: &Replica, sha256: &str) -> Vec<u8> {
    std::fs::read(replica.dir.join("data").join("blobs").join(sha256))
        .unwrap_or_else(|e| panic!("{}: no artifact {sha256}: {e}", replica.url))
}

/// `rollwave ARGS --json` with every replica in `--server`, as the admin.
fn cli_json(servers: &[&str], token: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(exe())
        .args(["--server", &servers.join(",")])
        .args(args)
        .arg("--json")
        .env("ROLLWAVE_TOKEN", token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_serves_through_the_leader_and_takes_over_when_it_dies() {
    let etcd = TestEtcd::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(&etcd, tmp.path(), "a").await;
    let b = replica(&etcd, tmp.path(), "b").await;
    let leader = leader_of(&[&a, &b]).await;
    let (mut leader, mut follower) = if std::ptr::eq(leader, &a) {
        (a, b)
    } else {
        (b, a)
    };
    let h = wait_until("the follower to know the leader", || async {
        health(&follower.url)
            .await
            .filter(|h| h.leader_url.is_some())
    })
    .await;
    assert!(!h.leader, "{h:?}");
    assert_eq!(h.leader_url.as_deref(), Some(leader.url.as_str()));
    let metrics = reqwest::get(format!("{}/metrics", follower.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("rollwave_leader 0"), "{metrics}");

    // Through the follower, with the token the leader wrote: answered by
    // the leader, which stores the release.
    let token = admin_token(&leader.dir);
    let http = reqwest::Client::new();
    let push = http
        .post(format!("{}/v1/releases/api/1.0.0", follower.url))
        .bearer_auth(&token)
        .body(b"#!/bin/sh\nexec sleep 60\n".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(push.status(), 201, "{:?}", push.text().await);
    let unauthorized = http
        .get(format!("{}/v1/releases", follower.url))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401, "the leader checks the token");
    let session = http
        .get(format!(
            "{}{}",
            follower.url,
            rollwave_api::AGENT_CONNECT_PATH
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(session.status(), 503, "agents are sent to the leader");
    assert_eq!(
        session.headers()[rollwave_api::LEADER_HEADER],
        leader.url.as_str(),
        "named in a header for agents"
    );
    let body = session.text().await.unwrap();
    assert!(body.contains(&leader.url), "{body}");

    // kill -9 the leader: the follower is elected once the lease lapses,
    // and has the state (the token, the release) from etcd.
    let mut dead = leader.child.take().unwrap();
    dead.kill().unwrap();
    dead.wait().unwrap();
    wait_until("the follower to take over", || async {
        health(&follower.url).await.filter(|h| h.leader)
    })
    .await;
    let releases: Vec<rollwave_core::Release> = http
        .get(format!("{}/v1/releases", follower.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(releases.len(), 1, "{releases:?}");
    let metrics = http
        .get(format!("{}/metrics", follower.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("rollwave_leader 1"), "{metrics}");
    let h = health(&follower.url).await.unwrap();
    assert_eq!(
        h.leader_url.as_deref(),
        Some(follower.url.as_str()),
        "the leader names itself"
    );

    // The old leader, started again, follows.
    leader = replica(&etcd, tmp.path(), "again").await;
    let h = wait_until("the restarted replica to follow", || async {
        health(&leader.url).await.filter(|h| h.leader_url.is_some())
    })
    .await;
    assert!(!h.leader);
    assert_eq!(h.leader_url.as_deref(), Some(follower.url.as_str()));

    // A leader stalled past its lease (SIGSTOP): the other replica takes
    // over; woken, the stalled one finds it lost the lease and exits
    // rather than act on what it held.
    let stalled = follower.child.as_ref().unwrap().id() as i32;
    kill(Pid::from_raw(stalled), Signal::SIGSTOP).unwrap();
    wait_until("the other replica to take over", || async {
        health(&leader.url).await.filter(|h| h.leader)
    })
    .await;
    kill(Pid::from_raw(stalled), Signal::SIGCONT).unwrap();
    let mut child = follower.child.take().unwrap();
    let status = wait_until("the stalled leader to exit", || {
        let exited = child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(follower.dir.join("server.log")).unwrap();
    assert!(log.contains("lost leadership: exiting"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_release_leaves_its_artifact_on_no_replica() {
    let etcd = TestEtcd::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let a = replica(&etcd, tmp.path(), "a").await;
    let b = replica(&etcd, tmp.path(), "b").await;
    let leader = leader_of(&[&a, &b]).await;
    let follower = if std::ptr::eq(leader, &a) { &b } else { &a };
    wait_until("the follower to know the leader", || async {
        health(&follower.url)
            .await
            .filter(|h| h.leader_url.is_some())
    })
    .await;
    let token = admin_token(&leader.dir);
    let http = reqwest::Client::new();
    let bytes = b"#!/bin/sh\nexec sleep 60\n".to_vec();
    let sha = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes));
    let push = http
        .post(format!("{}/v1/releases/api/1.0.0", follower.url))
        .bearer_auth(&token)
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(push.status(), 201, "{:?}", push.text().await);
    let copies = [&a, &b].map(|r| r.dir.join("data").join("blobs").join(&sha));
    for c in &copies {
        assert!(c.exists(), "{} before the delete", c.display());
    }
    // Through the follower: the leader deletes, and has both copies dropped
    // before it answers.
    let deleted = http
        .delete(format!("{}/v1/releases/api/1.0.0", follower.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200, "{:?}", deleted.text().await);
    for c in &copies {
        assert!(!c.exists(), "{} after the delete", c.display());
    }
}

/// A fleet of three agents whose control plane is replica a, with
/// replicas b and c beside it on the same `prefix`: the agents know all
/// three.
async fn three_replicas(
    etcd: &TestEtcd,
    dir: &Path,
    prefix: &str,
) -> (rollwave::fleet::Fleet, Replica, Replica) {
    use rollwave::fleet::{Fleet, FleetSpec};
    let (b_port, c_port) = two_ports();
    let fleet = Fleet::launch(FleetSpec {
        server_args: store_args(etcd, prefix),
        extra_servers: vec![
            format!("http://127.0.0.1:{b_port}"),
            format!("http://127.0.0.1:{c_port}"),
        ],
        ..FleetSpec::new(exe().into(), 3)
    })
    .await
    .unwrap();
    let b = replica_at(etcd, dir, "b", b_port, prefix).await;
    let c = replica_at(etcd, dir, "c", c_port, prefix).await;
    (fleet, b, c)
}

/// A replica on `port` (0: any; a port chosen beforehand lets agents be
/// told of it before it starts), keeping its records under `prefix`.
async fn replica_at(etcd: &TestEtcd, dir: &Path, name: &str, port: u16, prefix: &str) -> Replica {
    launch(
        etcd,
        dir,
        name,
        Launch {
            port,
            prefix,
            ..Default::default()
        },
    )
    .await
}

async fn launch(etcd: &TestEtcd, dir: &Path, name: &str, how: Launch<'_>) -> Replica {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("server.out");
    let mut cmd = Command::new(exe());
    cmd.arg("server")
        .args(["--listen", &format!("127.0.0.1:{}", how.port)])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--store", &etcd.store_url()])
        .args(["--store-prefix", how.prefix]);
    match how.tls {
        Some(certs) => {
            assert_ne!(how.port, 0, "an advertised https URL needs its port");
            cmd.arg("--tls-cert")
                .arg(certs.join(rollwave_tls::certs::SERVER_CERT))
                .arg("--tls-key")
                .arg(certs.join(rollwave_tls::certs::SERVER_KEY))
                .args([
                    "--advertise-url",
                    &format!("https://127.0.0.1:{}", how.port),
                ]);
        }
        None => {
            cmd.arg("--insecure-plain-http");
        }
    }
    if let Some(ca) = how.replica_ca {
        cmd.arg("--replica-ca-file").arg(ca);
    }
    let child = cmd
        .env("ROLLWAVE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
        .spawn()
        .unwrap();
    let url = wait_until(&format!("{name} listening"), || async {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        text.split("listening on ")
            .nth(1)
            .map(|rest| rest.lines().next().unwrap_or("").trim().to_string())
    })
    .await;
    Replica {
        child: Some(child),
        url,
        dir,
    }
}

/// The leader is killed mid-rollout: another replica is elected, the
/// agents move to it, it has the release's artifact (copied at the push),
/// and the rollout completes with no node switched twice. Meanwhile the
/// CLI given every replica, and the dashboard through the replica that
/// follows, answer as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_completes_across_the_death_of_its_leader() {
    use rollwave_core::{NodeState, RolloutState};

    let etcd = TestEtcd::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (mut fleet, b, c) = three_replicas(&etcd, tmp.path(), "/roll/").await;
    let (a_url, b_url, c_url) = (fleet.url(), b.url.clone(), c.url.clone());
    for r in [&b, &c] {
        wait_until("b and c to follow the fleet's control plane", || async {
            health(&r.url)
                .await
                .filter(|h| !h.leader && h.leader_url.as_deref() == Some(&a_url))
        })
        .await;
    }
    // Once b and c are listed, a push copies the artifact to them before
    // answering.
    wait_listed(&etcd, "/roll/", &[&a_url, &b_url, &c_url]).await;
    let v1 = crate::harness::push(&fleet, "1.0.0", true).await.release;
    let v2 = crate::harness::push(&fleet, "2.0.0", true).await.release;
    for r in [&b, &c] {
        for v in [&v1, &v2] {
            assert_eq!(sha256_hex(&blob(r, &v.sha256)), v.sha256);
        }
    }
    let all = [a_url.as_str(), b_url.as_str(), c_url.as_str()];
    let api = rollwave::client::ApiClient::new(&all.join(","), &fleet.client_tls())
        .unwrap()
        .with_token(Some(fleet.admin_token.clone()));
    let install = crate::harness::start(&fleet, "1.0.0", |s| {
        s.batch = Some("100%".into());
        s.min_healthy_time = Some("0s".into());
    })
    .await
    .unwrap();
    crate::harness::wait_done(&fleet, install.id).await;
    let r = crate::harness::start(&fleet, "2.0.0", |s| s.min_healthy_time = Some("1s".into()))
        .await
        .unwrap();
    crate::harness::wait_rollout(&fleet, r.id, "the first node upgraded", |r| {
        r.count(NodeState::Upgraded) == 1
    })
    .await;
    let term = |node: &rollwave::fleet::Node| -> u64 {
        std::fs::read_to_string(node.state_dir.join("term"))
            .map_or(0, |t| t.trim().parse().unwrap())
    };
    let first_term = term(&fleet.nodes[0]);
    assert!(first_term > 0, "agents learn the leader's term");
    fleet.kill_server();

    // At once, while no replica leads yet: the CLI passes over the dead
    // one and the followers' 503s until a leader answers.
    let token = fleet.admin_token.clone();
    let id = r.id.to_string();
    let status = cli_json(&all, &token, &["rollout", "status", &id]);
    assert_eq!(status["id"], r.id, "{status:#}");
    assert_eq!(status["spec"]["version"], "2.0.0", "{status:#}");

    let done = wait_until("the rollout to complete under the new leader", || {
        let api = api.clone();
        async move {
            let r = crate::harness::get(&api, r.id).await.ok()?;
            r.state.is_terminal().then_some(r)
        }
    })
    .await;
    assert_eq!(done.state, RolloutState::Completed, "{done:#?}");
    assert!(done.fully_upgraded());
    for node in &fleet.nodes {
        let to_new = crate::harness::switches_to(&node.state_dir, "2.0.0");
        assert_eq!(to_new, 1, "{} switched to 2.0.0 {to_new} times", node.name);
    }
    let leader = leader_of(&[&b, &c]).await;
    let follower = if std::ptr::eq(leader, &b) { &c } else { &b };
    let log = std::fs::read_to_string(leader.dir.join("server.log")).unwrap();
    assert!(log.contains("elected leader"), "{log}");
    for node in &fleet.nodes {
        assert!(
            term(node) > first_term,
            "{}: the new leader's term is newer",
            node.name
        );
    }

    // The CLI, with one replica dead.
    let status = cli_json(&all, &token, &["rollout", "status", &id]);
    assert_eq!(status["state"], "completed", "{status:#}");
    let nodes = cli_json(&all, &token, &["nodes"]);
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{nodes:#?}");
    for n in nodes {
        assert_eq!(n["online"], true, "{n:#}");
        assert_eq!(n["services"]["api"]["version"], "2.0.0", "{n:#}");
    }
    wait_until("the follower to know the new leader", || async {
        health(&follower.url)
            .await
            .filter(|h| h.leader_url.as_deref() == Some(leader.url.as_str()))
    })
    .await;
    dashboard_through(follower, &token, r.id, &mut fleet).await;
}

/// What the dashboard loads, through a replica that follows: its page and
/// assets, the snapshots it fetches, and its change stream, which carries
/// what happens on the leader (an agent lost, here).
async fn dashboard_through(
    follower: &Replica,
    token: &str,
    rollout: u64,
    fleet: &mut rollwave::fleet::Fleet,
) {
    let http = reqwest::Client::new();
    let base = &follower.url;
    for (path, kind) in [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let resp = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let got = resp.headers()["content-type"].to_str().unwrap();
        assert!(got.starts_with(kind), "{path}: {got}");
    }
    let get = |path: String| {
        let http = http.clone();
        async move {
            let resp = http
                .get(format!("{base}{path}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{path}");
            resp.json::<serde_json::Value>().await.unwrap()
        }
    };
    let nodes = get("/v1/nodes".into()).await;
    assert_eq!(nodes.as_array().unwrap().len(), 3, "{nodes:#}");
    let rollouts = get("/v1/rollouts".into()).await;
    assert!(
        rollouts
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == rollout && r["state"] == "completed"),
        "{rollouts:#}"
    );
    let services = get("/v1/services".into()).await;
    assert!(services.is_array(), "{services:#}");
    let one = get(format!("/v1/rollouts/{rollout}")).await;
    assert_eq!(one["rollout"]["state"], "completed", "{one:#}");

    // The stream, with the token in the query as the browser's EventSource
    // sends it.
    let mut stream = http
        .get(format!("{base}/v1/events?access_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let kind = stream.headers()["content-type"].to_str().unwrap();
    assert!(kind.starts_with("text/event-stream"), "{kind}");
    fleet.kill_agent(0);
    let mut text = String::new();
    let offline = |frame: &str| {
        frame.contains("event: node")
            && frame.contains("\"name\":\"node-1\"")
            && frame.contains("\"online\":false")
    };
    // The limit only guards against a hung test.
    let seen = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        while !text.split("\n\n").any(offline) {
            let chunk = stream.chunk().await.unwrap().expect("the stream ended");
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await;
    assert!(seen.is_ok(), "no event said node-1 went offline: {text}");
}

/// A release is on every replica before its push is answered: with the
/// replica that took the push killed (it led, too), agents download it from
/// the two others, and a rollout started through one of them completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_release_outlives_the_replica_it_was_pushed_to() {
    use rollwave_core::RolloutState;

    let etcd = TestEtcd::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (mut fleet, b, c) = three_replicas(&etcd, tmp.path(), "/outlive/").await;
    wait_listed(&etcd, "/outlive/", &[&fleet.url(), &b.url, &c.url]).await;

    // a, the fleet's control plane, takes both pushes.
    crate::harness::push(&fleet, "1.0.0", true).await;
    let install = crate::harness::start(&fleet, "1.0.0", |s| {
        s.batch = Some("100%".into());
        s.min_healthy_time = Some("0s".into());
    })
    .await
    .unwrap();
    let installed = crate::harness::wait_done(&fleet, install.id).await;
    assert!(installed.fully_upgraded(), "{installed:#?}");
    let release = crate::harness::push(&fleet, "2.0.0", true).await.release;
    for r in [&b, &c] {
        assert_eq!(sha256_hex(&blob(r, &release.sha256)), release.sha256);
    }
    fleet.kill_server();

    // Through b, whichever of b and c is elected.
    let leader = leader_of(&[&b, &c]).await;
    wait_until("b to know the new leader", || async {
        health(&b.url)
            .await
            .filter(|h| h.leader_url.as_deref() == Some(leader.url.as_str()))
    })
    .await;
    let via_b = rollwave::client::ApiClient::new(&b.url, &fleet.client_tls())
        .unwrap()
        .with_token(Some(fleet.admin_token.clone()));
    let r = crate::harness::start_on(&via_b, "2.0.0", |s| {
        s.min_healthy_time = Some("0s".into());
    })
    .await
    .unwrap();
    let done = wait_until("the rollout to complete", || {
        let api = via_b.clone();
        async move {
            let r = crate::harness::get(&api, r.id).await.ok()?;
            r.state.is_terminal().then_some(r)
        }
    })
    .await;
    assert_eq!(done.state, RolloutState::Completed, "{done:#?}");
    assert!(done.fully_upgraded(), "{done:#?}");
    // a is dead: each node downloaded 2.0.0 from b or c, and switched once.
    for node in &fleet.nodes {
        let to_new = crate::harness::switches_to(&node.state_dir, "2.0.0");
        assert_eq!(to_new, 1, "{} switched to 2.0.0 {to_new} times", node.name);
    }
    let http = reqwest::Client::new();
    for r in [&b, &c] {
        let resp = http
            .get(format!("{}/v1/releases/api/2.0.0/artifact", r.url))
            .bearer_auth(&fleet.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", r.url);
        let bytes = resp.bytes().await.unwrap();
        assert_eq!(sha256_hex(&bytes), release.sha256, "{}", r.url);
    }
}

/// A replica over HTTPS on `port`, with the certificate `rollwave certs
/// init` wrote into `certs`, trusting `replica_ca` for the others.
async fn tls_replica(
    etcd: &TestEtcd,
    dir: &Path,
    name: &str,
    port: u16,
    certs: &Path,
    replica_ca: &Path,
) -> Replica {
    let how = Launch {
        port,
        prefix: "/tls/",
        tls: Some(certs),
        replica_ca: Some(replica_ca),
    };
    launch(etcd, dir, name, how).await
}

async fn health_over(https: &reqwest::Client, url: &str) -> Option<HealthResponse> {
    let resp = https.get(format!("{url}/v1/health")).send().await.ok()?;
    resp.json().await.ok()
}

/// Replicas over HTTPS: a follower passes requests to the leader, and the
/// leader copies artifacts to the others, verifying their certificates
/// with `--replica-ca-file`. A replica given another CA reaches none of the
/// others: what it passes on is answered 503 naming the refused
/// certificate, and a push it would have to copy is refused, storing
/// nothing.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_over_https_verify_each_other_with_the_replica_ca() {
    let etcd = TestEtcd::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs_init = |name: &str| {
        let certs = dir.join(name);
        let out = Command::new(exe())
            .args(["certs", "init", "--dir"])
            .arg(&certs)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        certs
    };
    let certs = certs_init("certs");
    let ca = certs.join(rollwave_tls::certs::CA_CERT);
    let other_ca = certs_init("other").join(rollwave_tls::certs::CA_CERT);
    let (a_port, b_port) = two_ports();
    let c_port = loop {
        let p = rollwave::fleet::free_port().unwrap();
        if p != a_port && p != b_port {
            break p;
        }
    };
    let https = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let mut a = tls_replica(&etcd, dir, "a", a_port, &certs, &ca).await;
    assert_eq!(a.url, format!("https://127.0.0.1:{a_port}"));
    wait_until("a to lead", || async {
        health_over(&https, &a.url).await.filter(|h| h.leader)
    })
    .await;
    let mut b = tls_replica(&etcd, dir, "b", b_port, &certs, &ca).await;
    wait_listed(&etcd, "/tls/", &[&a.url, &b.url]).await;
    wait_until("b to follow a", || async {
        health_over(&https, &b.url)
            .await
            .filter(|h| h.leader_url.as_deref() == Some(a.url.as_str()))
    })
    .await;

    // Through b, over HTTPS to a; a copies the artifact to b over HTTPS.
    let token = admin_token(&a.dir);
    let artifact = b"#!/bin/sh\nexec sleep 60\n".to_vec();
    let push = https
        .post(format!("{}/v1/releases/api/1.0.0", b.url))
        .bearer_auth(&token)
        .body(artifact.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(push.status(), 201, "{:?}", push.text().await);
    assert_eq!(blob(&b, &sha256_hex(&artifact)), artifact, "copied to b");

    // c trusts another CA: it cannot pass anything on to a.
    let mut c = tls_replica(&etcd, dir, "c", c_port, &certs, &other_ca).await;
    wait_until("c to know the leader", || async {
        health_over(&https, &c.url)
            .await
            .filter(|h| h.leader_url.is_some())
    })
    .await;
    let refused = https
        .get(format!("{}/v1/releases", c.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let message = refused
        .json::<rollwave_api::ErrorBody>()
        .await
        .unwrap()
        .error
        .message;
    let refusal = "its certificate was refused (invalid peer certificate: UnknownIssuer): is --replica-ca-file the CA that signed it?";
    assert_eq!(
        message,
        format!("passing the request to the leader, {}: {refusal}", a.url)
    );

    // With a and b gone, c leads; b, started again, follows it. A push
    // through b reaches c, which cannot copy the artifact to b: refused,
    // and the release is not stored.
    a.kill();
    b.kill();
    wait_until("c to lead", || async {
        health_over(&https, &c.url).await.filter(|h| h.leader)
    })
    .await;
    b = tls_replica(&etcd, dir, "b", b_port, &certs, &ca).await;
    wait_listed(&etcd, "/tls/", &[&b.url, &c.url]).await;
    wait_until("b to follow c", || async {
        health_over(&https, &b.url)
            .await
            .filter(|h| h.leader_url.as_deref() == Some(c.url.as_str()))
    })
    .await;
    let push = https
        .post(format!("{}/v1/releases/api/2.0.0", b.url))
        .bearer_auth(&token)
        .body(b"#!/bin/sh\nexec sleep 61\n".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(push.status(), 503);
    let message = push
        .json::<rollwave_api::ErrorBody>()
        .await
        .unwrap()
        .error
        .message;
    assert_eq!(
        message,
        format!("release api@2.0.0 not stored: the artifact could not be copied to every replica (copying to {}: {refusal}); push it again", b.url)
    );
    let releases: Vec<rollwave_core::Release> = https
        .get(format!("{}/v1/releases", b.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let versions: Vec<&str> = releases.iter().map(|r| r.version.as_str()).collect();
    assert_eq!(versions, ["1.0.0"], "nothing stored of 2.0.0");
    c.kill();
}

/// etcd loses its quorum mid-rollout: nothing moves, the leader gives up
/// its role, the other replica answers 503; with the quorum back, the other
/// replica is elected and the rollout completes, no node switched twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_waits_out_a_lost_etcd_quorum() {
    use rollwave::fleet::{free_port, Fleet, FleetSpec};
    use rollwave_core::{NodeState, RolloutState};

    let etcd = TestEtcd::cluster(3).await;
    let b_port = free_port().unwrap();
    let b_url = format!("http://127.0.0.1:{b_port}");
    let fleet = Fleet::launch(FleetSpec {
        server_args: vec![
            "--store".into(),
            etcd.store_url(),
            "--store-prefix".into(),
            "/quorum/".into(),
        ],
        extra_servers: vec![b_url.clone()],
        ..FleetSpec::new(exe().into(), 3)
    })
    .await
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let b = replica_at(&etcd, tmp.path(), "b", b_port, "/quorum/").await;
    let view = etcd.store("/quorum/").await;
    wait_until("b listed as a replica", || async {
        let listed = rollwave_store::Store::election(&view)?
            .replicas()
            .await
            .ok()?;
        listed.contains(&b_url).then_some(())
    })
    .await;
    crate::harness::push(&fleet, "1.0.0", true).await;
    crate::harness::push(&fleet, "2.0.0", true).await;
    let install = crate::harness::start(&fleet, "1.0.0", |s| {
        s.batch = Some("100%".into());
        s.min_healthy_time = Some("0s".into());
    })
    .await
    .unwrap();
    crate::harness::wait_done(&fleet, install.id).await;
    let r = crate::harness::start(&fleet, "2.0.0", |s| {
        s.min_healthy_time = Some("1s".into());
        s.progress_deadline = Some("10m".into());
    })
    .await
    .unwrap();
    crate::harness::wait_rollout(&fleet, r.id, "the first node upgraded", |r| {
        r.count(NodeState::Upgraded) == 1
    })
    .await;

    // Two of three members paused: no quorum.
    let pids = etcd.pids();
    for pid in &pids[1..] {
        kill(Pid::from_raw(*pid as i32), Signal::SIGSTOP).unwrap();
    }
    let a_log = fleet.dir.join("server.log");
    wait_until("the leader to give up its role", || async {
        let log = std::fs::read_to_string(&a_log).unwrap_or_default();
        log.contains("lost leadership: exiting").then_some(())
    })
    .await;
    let switched = || -> usize {
        fleet
            .nodes
            .iter()
            .map(|n| crate::harness::switches_to(&n.state_dir, "2.0.0"))
            .sum()
    };
    let before = switched();
    let b_log = b.dir.join("server.log");
    wait_until("b to fail a campaign without quorum", || async {
        let log = std::fs::read_to_string(&b_log).unwrap_or_default();
        log.contains("campaigning to lead; trying again")
            .then_some(())
    })
    .await;
    let resp = reqwest::get(format!("{b_url}/v1/rollouts")).await.unwrap();
    assert_eq!(resp.status(), 503, "no leader, no answer but 503");
    assert_eq!(switched(), before, "nothing is dispatched without a quorum");

    for pid in &pids[1..] {
        kill(Pid::from_raw(*pid as i32), Signal::SIGCONT).unwrap();
    }
    let api = rollwave::client::ApiClient::new(&b_url, &fleet.client_tls())
        .unwrap()
        .with_token(Some(fleet.admin_token.clone()));
    let done = wait_until("the rollout to complete once the quorum is back", || {
        let api = api.clone();
        async move {
            let r = crate::harness::get(&api, r.id).await.ok()?;
            r.state.is_terminal().then_some(r)
        }
    })
    .await;
    assert_eq!(done.state, RolloutState::Completed, "{done:#?}");
    assert!(done.fully_upgraded(), "{done:#?}");
    for node in &fleet.nodes {
        let to_new = crate::harness::switches_to(&node.state_dir, "2.0.0");
        assert_eq!(
            to_new, 1,
            "{} switched to 2.0.0 {to_new} times: {done:#?}",
            node.name
        );
    }
}

/// An existing control plane's state moves from SQLite to etcd with one
/// command; a non-empty target is refused unless forced, and a forced copy
/// again changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn store_copy_moves_a_control_plane_to_etcd() {
    let mut fleet = crate::harness::installed_fleet(2).await;
    fleet.kill_server();
    let etcd = TestEtcd::start().await;
    let db = fleet.dir.join("server-data").join("rollwave.db");
    let copy = |extra: &[&str]| {
        let mut c = Command::new(exe());
        c.args([
            "store",
            "copy",
            "--from",
            &format!("sqlite:{}", db.display()),
        ])
        .args(["--to", &etcd.store_url(), "--store-prefix", "/moved/"])
        .args(extra);
        c.output().unwrap()
    };
    let out = copy(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("copied 2 nodes"), "{stdout}");
    let moved = etcd.store("/moved/").await;
    use rollwave_store::Store;
    assert_eq!(moved.list_rollouts().await.unwrap().len(), 1);
    assert_eq!(moved.list_nodes().await.unwrap().len(), 2);

    let out = copy(&[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--to: the target store is not empty (it holds nodes"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let out = copy(&["--force"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0 rollouts (1 there already)"), "{stdout}");

    let out = Command::new(exe())
        .args([
            "store",
            "copy",
            "--from",
            "mysql://x",
            "--to",
            "sqlite:/tmp/x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A data dir used by one cluster is refused for another's store, naming
/// both; an etcd that cannot be reached stops the server with one line.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_refuses_another_clusters_store_or_an_unreachable_one() {
    let etcd = TestEtcd::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let serve = |prefix: &str, store: &str| {
        Command::new(exe())
            .args(["server", "--listen", "127.0.0.1:0", "--insecure-plain-http"])
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .args(["--store", store, "--store-prefix", prefix])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = serve("/one/", &etcd.store_url());
    wait_until("the first cluster's id recorded", || async {
        tmp.path()
            .join("data")
            .join("cluster")
            .exists()
            .then_some(())
    })
    .await;
    first.kill().unwrap();
    first.wait().unwrap();
    let out = serve("/two/", &etcd.store_url())
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("this store belongs to cluster") && err.contains("was used by cluster"),
        "{err}"
    );

    // An advertised address the others could not use.
    let out = Command::new(exe())
        .args(["server", "--listen", "127.0.0.1:0", "--insecure-plain-http"])
        .arg("--data-dir")
        .arg(tmp.path().join("advertise"))
        .args(["--store", &etcd.store_url(), "--store-prefix", "/three/"])
        .args(["--advertise-url", "https://cp1:7700"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--advertise-url: \"https://cp1:7700\" is not an http:// URL with a host, as this control plane serves plain HTTP"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let port = rollwave_store::etcd::testing::free_port();
    let out = serve("/one/", &format!("etcd://127.0.0.1:{port}"))
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "--store: storage failure: etcd http://127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
