//! Real etcd clusters run by rollwave agents, for the tests and the
//! benchmark of quorum upgrades: each node runs one etcd member (Debian's
//! `etcd`) as service `etcd`, its release a script that starts it, and
//! clients write to every cluster throughout while a monitor samples the
//! members.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use tokio::sync::watch;

use crate::demo_service::{tarball_with, DemoRelease};
use crate::fleet::{free_port, Fleet};

pub const SERVICE: &str = "etcd";
pub const ETCD: &str = "/usr/bin/etcd";

/// One etcd member and the node that runs it.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    /// The value of the node's `cluster` label: the members of one raft
    /// cluster share it.
    pub cluster: String,
    pub client: u16,
    pub peer: u16,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }
}

/// `per` members in each of `clusters`, named `<cluster>-<i>`, on ports of
/// their own.
pub fn members(clusters: &[&str], per: usize) -> anyhow::Result<Vec<Member>> {
    let mut taken = std::collections::HashSet::new();
    let mut port = || -> anyhow::Result<u16> {
        loop {
            let p = free_port()?;
            if taken.insert(p) {
                return Ok(p);
            }
        }
    };
    let mut out = Vec::new();
    for c in clusters {
        for i in 1..=per {
            out.push(Member {
                name: format!("{c}-{i}"),
                cluster: c.to_string(),
                client: port()?,
                peer: port()?,
            });
        }
    }
    Ok(out)
}

/// What the node of `m` says in its `agent.toml` after the common part:
/// its `cluster` label and service `etcd`, configured through etcd's
/// environment variables so that every release is the same small script.
/// With `role_probe`, the service reports `leader` or `follower` from the
/// member's own `etcd_server_is_leader` metric. `extra` goes at the end of
/// the `[[service]]` table (e.g. its `hooks`).
pub fn agent_body(m: &Member, all: &[Member], role_probe: bool, extra: &str) -> String {
    let initial: Vec<String> = all
        .iter()
        .filter(|o| o.cluster == m.cluster)
        .map(|o| format!("{}=http://127.0.0.1:{}", o.name, o.peer))
        .collect();
    let role = if role_probe {
        format!(
            "role = {{ type = \"exec\", command = [\"/bin/sh\", \"-c\", \"m=$(curl -sf --max-time 1 http://127.0.0.1:{}/metrics) || exit 1; echo \\\"$m\\\" | grep -q '^etcd_server_is_leader 1' && echo leader || echo follower\"], interval = \"200ms\", timeout = \"1500ms\" }}\n",
            m.client
        )
    } else {
        String::new()
    };
    format!(
        r#"
[labels]
cluster = "{cluster}"

[[service]]
name = "{SERVICE}"
command = ["/bin/sh", "{{release}}/run.sh"]
switch = "restart"
stop_grace = "10s"
health = {{ type = "http", url = "http://127.0.0.1:{client}/health", interval = "200ms", timeout = "1s", healthy_threshold = 1, unhealthy_threshold = 2 }}
{role}{extra}
[service.env]
ETCD_NAME = "{name}"
ETCD_DATA_DIR = "{{state_dir}}/etcd-data"
ETCD_LISTEN_CLIENT_URLS = "http://127.0.0.1:{client}"
ETCD_ADVERTISE_CLIENT_URLS = "http://127.0.0.1:{client}"
ETCD_LISTEN_PEER_URLS = "http://127.0.0.1:{peer}"
ETCD_INITIAL_ADVERTISE_PEER_URLS = "http://127.0.0.1:{peer}"
ETCD_INITIAL_CLUSTER = "{initial}"
ETCD_INITIAL_CLUSTER_STATE = "new"
ETCD_INITIAL_CLUSTER_TOKEN = "{cluster}"
ETCD_HEARTBEAT_INTERVAL = "50"
ETCD_ELECTION_TIMEOUT = "500"
ETCD_LOG_LEVEL = "warn"
"#,
        cluster = m.cluster,
        name = m.name,
        client = m.client,
        peer = m.peer,
        initial = initial.join(","),
    )
}

/// A release of `etcd`: a script that starts the member, saying which
/// release it is, as an operator's wrapper would.
pub fn release(version: &str) -> anyhow::Result<Vec<u8>> {
    let script = format!("#!/bin/sh\necho \"etcd release {version}\"\nexec {ETCD}\n");
    tarball_with(
        &DemoRelease {
            version: version.into(),
            healthy: true,
            broken_on: Vec::new(),
            error_rate: 0.0,
        },
        &[("run.sh", &script, 0o755)],
    )
}

/// Adds one node per member to `fleet`.
pub async fn add_members(
    fleet: &mut Fleet,
    all: &[Member],
    role_probe: bool,
    extra: &str,
) -> anyhow::Result<()> {
    for m in all {
        fleet
            .add_node(&m.name, &agent_body(m, all, role_probe, extra))
            .await?;
    }
    Ok(())
}

pub async fn push(fleet: &Fleet, version: &str) -> anyhow::Result<()> {
    fleet
        .api()?
        .post_bytes::<rollwave_api::PushResponse>(
            &format!("/v1/releases/{SERVICE}/{version}"),
            release(version)?,
        )
        .await
        .with_context(|| format!("pushing {SERVICE} {version}"))?;
    Ok(())
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(800))
        .build()
        .expect("a plain HTTP client builds")
}

/// What the writers of one cluster saw.
#[derive(Debug, Clone, Default)]
pub struct Writes {
    /// Writes acknowledged.
    pub ok: u64,
    /// Requests that failed (each write retries on the next member).
    pub failed_requests: u64,
    /// Writes never acknowledged within their 20 s.
    pub lost: u64,
    /// The longest time one write took to be acknowledged, retries included.
    pub longest_stall: Duration,
}

/// Writes to each cluster in turn, one key after another, retrying each on
/// the next member until acknowledged, as a client with every endpoint
/// would. Stops when `stop` is set; returns the figures per cluster.
pub fn start_writers(
    all: &[Member],
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<BTreeMap<String, Writes>> {
    let mut clusters: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in all {
        clusters
            .entry(m.cluster.clone())
            .or_default()
            .push(m.endpoint());
    }
    tokio::spawn(async move {
        let tasks: Vec<_> = clusters
            .into_iter()
            .map(|(cluster, endpoints)| {
                let stop = stop.clone();
                tokio::spawn(async move { (cluster, write_loop(endpoints, stop).await) })
            })
            .collect();
        let mut out = BTreeMap::new();
        for t in tasks {
            if let Ok((c, w)) = t.await {
                out.insert(c, w);
            }
        }
        out
    })
}

async fn write_loop(endpoints: Vec<String>, stop: watch::Receiver<bool>) -> Writes {
    let http = client();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut w = Writes::default();
    let mut next = 0usize;
    let mut seq = 0u64;
    while !*stop.borrow() {
        seq += 1;
        let body =
            serde_json::json!({ "key": b64("rollwave-writes"), "value": b64(&seq.to_string()) });
        let started = Instant::now();
        let mut acked = false;
        while started.elapsed() < Duration::from_secs(20) {
            let url = format!("{}/v3/kv/put", endpoints[next % endpoints.len()]);
            let r = http.post(&url).json(&body).send().await;
            if r.is_ok_and(|r| r.status().is_success()) {
                acked = true;
                break;
            }
            w.failed_requests += 1;
            next += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w.longest_stall = w.longest_stall.max(started.elapsed());
        if acked {
            w.ok += 1;
        } else {
            w.lost += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w
}

/// The fewest members of each cluster seen answering at once, sampled
/// every 50 ms until `stop`.
pub fn start_monitor(
    all: &[Member],
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<BTreeMap<String, usize>> {
    let all = all.to_vec();
    tokio::spawn(async move {
        let http = client();
        let mut fewest: BTreeMap<String, usize> = BTreeMap::new();
        while !*stop.borrow() {
            let answers = futures_util::future::join_all(all.iter().map(|m| {
                let http = http.clone();
                async move {
                    let up = http
                        .get(format!("{}/version", m.endpoint()))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    (m.cluster.clone(), up)
                }
            }))
            .await;
            let mut up: BTreeMap<String, usize> = BTreeMap::new();
            for (c, ok) in answers {
                *up.entry(c).or_default() += usize::from(ok);
            }
            for (c, n) in up {
                let e = fewest.entry(c).or_insert(n);
                *e = (*e).min(n);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        fewest
    })
}

/// `etcdctl endpoint status` of every member of a cluster: the name of
/// the member it calls leader, and the raft term (which rises by one per
/// election), from the first member that answers.
pub async fn leader_and_term(members: &[&Member]) -> Option<(String, u64)> {
    let endpoints: Vec<String> = members.iter().map(|m| m.endpoint()).collect();
    let out = tokio::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--command-timeout=2s", "endpoint", "status", "-w", "json"])
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .output()
        .await
        .ok()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let rows = status.as_array()?;
    let ids: Vec<(u64, String)> = rows
        .iter()
        .filter_map(|r| {
            let id = r["Status"]["header"]["member_id"].as_u64()?;
            let ep = r["Endpoint"].as_str()?;
            let m = members.iter().find(|m| m.endpoint() == ep)?;
            Some((id, m.name.clone()))
        })
        .collect();
    let first = rows.first()?;
    let leader = first["Status"]["leader"].as_u64()?;
    let term = first["Status"]["raft_term"].as_u64()?;
    let name = ids.iter().find(|(id, _)| *id == leader)?.1.clone();
    Some((name, term))
}

/// Samples `leader_and_term` of one cluster every 100 ms until `stop`:
/// (milliseconds since the Unix epoch, leader, term).
pub fn start_leader_log(
    members: Vec<Member>,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<(u64, String, u64)>> {
    tokio::spawn(async move {
        let mut log = Vec::new();
        while !*stop.borrow() {
            let refs: Vec<&Member> = members.iter().collect();
            if let Some((leader, term)) = leader_and_term(&refs).await {
                log.push((now_ms(), leader, term));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        log
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
