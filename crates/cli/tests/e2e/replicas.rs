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

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn replica(etcd: &TestEtcd, dir: &Path, name: &str) -> Replica {
    replica_at(etcd, dir, name, 0, "/replicas/").await
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

/// A replica on `port` (0: any; a port chosen beforehand lets agents be
/// told of it before it starts), keeping its records under `prefix`.
async fn replica_at(etcd: &TestEtcd, dir: &Path, name: &str, port: u16, prefix: &str) -> Replica {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("server.out");
    let child = Command::new(exe())
        .args(["server", "--insecure-plain-http"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--store", &etcd.store_url()])
        .args(["--store-prefix", prefix])
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

/// The leader is killed mid-rollout: the other replica is elected, the
/// agents move to it, it has the release's artifact (copied at the push),
/// and the rollout completes with no node switched twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_completes_across_the_death_of_its_leader() {
    use rollwave::fleet::{free_port, Fleet, FleetSpec};
    use rollwave_core::{NodeState, RolloutState};

    let etcd = TestEtcd::start().await;
    let store = etcd.endpoint.replace("http://", "etcd://");
    let b_port = free_port().unwrap();
    let b_url = format!("http://127.0.0.1:{b_port}");
    let mut fleet = Fleet::launch(FleetSpec {
        server_args: vec![
            "--store".into(),
            store,
            "--store-prefix".into(),
            "/roll/".into(),
        ],
        extra_servers: vec![b_url.clone()],
        ..FleetSpec::new(exe().into(), 3)
    })
    .await
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let b = replica_at(&etcd, tmp.path(), "b", b_port, "/roll/").await;
    wait_until("b to follow the fleet's control plane", || async {
        health(&b.url)
            .await
            .filter(|h| !h.leader && h.leader_url.as_deref() == Some(&fleet.url()))
    })
    .await;
    // Once b is listed, a push copies the artifact to it before answering.
    let view = etcd.store("/roll/").await;
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
    let copied = std::fs::read_dir(b.dir.join("data").join("blobs"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_file())
        .count();
    assert_eq!(
        copied, 2,
        "both artifacts are on b before the pushes answered"
    );
    let api = rollwave::client::ApiClient::new(
        &format!("{},{}", fleet.url(), b_url),
        &fleet.client_tls(),
    )
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
    assert!(health(&b.url).await.unwrap().leader);
    for node in &fleet.nodes {
        let to_new = crate::harness::switches_to(&node.state_dir, "2.0.0");
        assert_eq!(to_new, 1, "{} switched to 2.0.0 {to_new} times", node.name);
    }
    let log = std::fs::read_to_string(b.dir.join("server.log")).unwrap();
    assert!(log.contains("elected leader"), "{log}");
    for node in &fleet.nodes {
        assert!(
            term(node) > first_term,
            "{}: the new leader's term is newer",
            node.name
        );
    }
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
