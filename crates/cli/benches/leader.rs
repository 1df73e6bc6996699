//! Leader kills mid-rollout: three control planes on a three-member etcd.
//!
//! `cargo bench -p rollwave --features etcd --bench leader [-- --rounds 20 --nodes 6]`
//! (`bench/run.sh leader`)
//!
//! Starts a three-member etcd, three `rollwave server` replicas on it and
//! `--nodes` real agents, each given all three replicas (`server = [..]`).
//! Then, `--rounds` times, rolls the fleet to the other of two releases one
//! node at a time (`min_healthy_time` 1 s), `kill -9`s the leader while the
//! second node is in flight and starts it again at once, as its service
//! manager would, so that three replicas run in every round. It measures,
//! from the kill:
//!
//! - a new leader elected: a replica's `/v1/health` says `leader`, polled
//!   every 20 ms;
//! - every agent back in session, with that leader;
//! - the next task dispatched: the first "upgrade to V started" entry of
//!   the rollout's log after the kill, stamped by the new leader when it
//!   decided the task, which it sends as soon as the decision is stored.
//!
//! and counts the rollouts that completed with every node upgraded, and the
//! nodes switched more than once in one rollout (from each agent's switch
//! history). Prints p50, p99 and max beside the goals (p50 < 3 s, p99 < 10 s)
//! and the floor, the leader's lease: a killed leader keeps its role until
//! its lease lapses, between 2/3 of its TTL and all of it after the kill (it
//! is renewed every third of it). Timings never fail it; a rollout that did
//! not complete or a node switched twice does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use rollwave::client::ApiClient;
use rollwave::demo::push;
use rollwave::fleet::{free_port, Fleet, FleetSpec};
use rollwave_api::{HealthResponse, RolloutResponse};
use rollwave_core::{NodeState, Rollout, RolloutFile, RolloutState, StrategyFile};
use rollwave_store::etcd::testing::TestEtcd;
use serde_json::json;

/// Past this a wait is given up on.
const LIMIT: Duration = Duration::from_secs(300);
/// How often replicas and the rollout are read while a figure is pending:
/// the resolution of the election and reconnection figures.
const POLL: Duration = Duration::from_millis(20);
const PREFIX: &str = "/leader-bench/";

#[derive(Parser)]
#[command(about = "kill -9 of the leading control plane mid-rollout, among three on etcd")]
struct Args {
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Real agents (at least 3: the kill comes while the second is in
    /// flight, and a third must follow it).
    #[arg(long, default_value_t = 6)]
    nodes: usize,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = tokio::select! {
        r = run(args) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: every process stopped and cleaned up");
            return ExitCode::from(130);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", rollwave::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn exe() -> PathBuf {
    std::env::var_os("ROLLWAVE_EXE")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_rollwave").into())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A replica besides the fleet's own control plane, started again on the
/// same port and data dir after each kill.
struct Replica {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Replica {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self, exe: &Path, store: &str) -> anyhow::Result<()> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))?;
        let child = Command::new(exe)
            .args(["server", "--insecure-plain-http"])
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--store", store, "--store-prefix", PREFIX])
            .env("ROLLWAVE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting a replica")?;
        self.child = Some(child);
        Ok(())
    }

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

/// The three replicas: the fleet's control plane (0) and two more.
struct Cluster {
    fleet: Fleet,
    others: Vec<Replica>,
    store: String,
    exe: PathBuf,
    http: reqwest::Client,
}

impl Cluster {
    fn urls(&self) -> Vec<String> {
        std::iter::once(self.fleet.url())
            .chain(self.others.iter().map(Replica::url))
            .collect()
    }

    async fn health(&self, url: &str) -> Option<HealthResponse> {
        let resp = self
            .http
            .get(format!("{url}/v1/health"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        resp.json().await.ok()
    }

    /// The replica that says it leads, by index.
    async fn leader(&self, among: &[usize]) -> Option<usize> {
        let urls = self.urls();
        for &i in among {
            if self.health(&urls[i]).await.is_some_and(|h| h.leader) {
                return Some(i);
            }
        }
        None
    }

    /// `kill -9` of replica `i`, started again at once.
    async fn kill_and_restart(&mut self, i: usize) -> anyhow::Result<()> {
        if i == 0 {
            self.fleet.kill_server();
            self.fleet.restart_server().await
        } else {
            let r = &mut self.others[i - 1];
            r.kill();
            r.spawn(&self.exe, &self.store)
        }
    }
}

/// Times of one round, from the kill.
struct Round {
    elected: Duration,
    agents_back: Duration,
    dispatched: Duration,
    completed: bool,
    switched_twice: usize,
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.nodes < 3 || args.rounds == 0 {
        bail!("--nodes: at least 3, --rounds: at least 1");
    }
    let exe = exe();
    let ttl = rollwave_store::etcd::LEASE_TTL;
    eprintln!(
        "leader benchmark: 3-member etcd, 3 replicas, {} agents, {} rounds, lease TTL {ttl:?}, {}",
        args.nodes,
        args.rounds,
        exe.display()
    );
    let etcd = TestEtcd::cluster(3).await;
    let store = etcd.store_url();
    let tmp = tempfile::Builder::new()
        .prefix("rollwave-leader-")
        .tempdir()?;
    let mut others = Vec::new();
    let mut taken = std::collections::HashSet::new();
    for name in ["b", "c"] {
        let port = loop {
            let p = free_port()?;
            if taken.insert(p) {
                break p;
            }
        };
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir)?;
        others.push(Replica {
            dir,
            port,
            child: None,
        });
    }
    // The fleet's control plane starts first and leads; the others are
    // started once it does, and agents know all three from the start.
    let fleet = Fleet::launch(FleetSpec {
        server_args: vec![
            "--store".into(),
            store.clone(),
            "--store-prefix".into(),
            PREFIX.into(),
        ],
        extra_servers: others.iter().map(Replica::url).collect(),
        ..FleetSpec::new(exe.clone(), args.nodes)
    })
    .await
    .context("launching the fleet")?;
    let mut cluster = Cluster {
        fleet,
        others,
        store,
        exe,
        http: reqwest::Client::new(),
    };
    for r in &mut cluster.others {
        r.spawn(&cluster.exe, &cluster.store)?;
    }
    let urls = cluster.urls();
    wait("every replica to answer", || async {
        for u in &urls {
            cluster.health(u).await?;
        }
        Some(())
    })
    .await?;
    // Listed replicas get each artifact before its push is answered.
    let view = etcd.store(PREFIX).await;
    wait("every replica to be listed", || async {
        let listed = rollwave_store::Store::election(&view)?
            .replicas()
            .await
            .ok()?;
        urls.iter().all(|u| listed.contains(u)).then_some(())
    })
    .await?;
    let api = ApiClient::new(&urls.join(","), &cluster.fleet.client_tls())?
        .with_token(Some(cluster.fleet.admin_token.clone()));
    push(&api, "1.0.0", true).await?;
    push(&api, "2.0.0", true).await?;
    let install = start(&api, "1.0.0", "100%", "0s").await?;
    let install = wait_done(&api, install.id).await?;
    if !install.fully_upgraded() {
        bail!("installing 1.0.0 failed: {:?}", install.reason);
    }

    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let version = if round % 2 == 1 { "2.0.0" } else { "1.0.0" };
        let r = one_round(&mut cluster, &api, version, args.nodes).await?;
        eprintln!(
            "round {round:>2} to {version}: elected {:.2}s after the kill, agents back {:.2}s, next task {:.2}s; {}{}",
            r.elected.as_secs_f64(),
            r.agents_back.as_secs_f64(),
            r.dispatched.as_secs_f64(),
            if r.completed { "completed" } else { "NOT completed" },
            match r.switched_twice {
                0 => String::new(),
                n => format!(", {n} nodes switched twice"),
            },
        );
        rounds.push(r);
    }
    report(&rounds, ttl);
    let incomplete = rounds.iter().filter(|r| !r.completed).count();
    let twice: usize = rounds.iter().map(|r| r.switched_twice).sum();
    if incomplete > 0 || twice > 0 {
        bail!(
            "{incomplete} rollouts did not complete; {twice} nodes switched twice in one rollout"
        );
    }
    Ok(())
}

async fn one_round(
    cluster: &mut Cluster,
    api: &ApiClient,
    version: &str,
    nodes: usize,
) -> anyhow::Result<Round> {
    let before: Vec<usize> = cluster
        .fleet
        .nodes
        .iter()
        .map(|n| switches_to(&n.state_dir, version))
        .collect();
    let r = start(api, version, "1", "1s").await?;
    let began = Instant::now();
    loop {
        let now = get(api, r.id).await?;
        if now.count(NodeState::Upgraded) == 1 && now.in_flight().count() == 1 {
            break;
        }
        if !now.is_active() || began.elapsed() > LIMIT {
            bail!("rollout {} never had its second node in flight", r.id);
        }
        tokio::time::sleep(POLL).await;
    }
    let all = [0, 1, 2];
    let leader = wait("a leader", || cluster.leader(&all)).await?;
    let killed_ms = unix_ms();
    let killed = Instant::now();
    cluster.kill_and_restart(leader).await?;
    // Any replica that leads now was elected after the kill: the killed
    // process is gone, and the one started in its place follows until it
    // is elected (last in line, behind the survivors' campaigns).
    let new_leader = wait("a new leader elected", || cluster.leader(&all)).await?;
    let elected = killed.elapsed();
    let new_url = cluster.urls()[new_leader].clone();
    wait("every agent back", || async {
        let h = cluster.health(&new_url).await?;
        (h.leader && h.agents_connected == nodes).then_some(())
    })
    .await?;
    let agents_back = killed.elapsed();
    let started = format!("upgrade to {version} started");
    let after_kill = wait("the next task dispatched", || async {
        let r = get(api, r.id).await.ok()?;
        let next = r
            .events
            .iter()
            .find(|e| e.at >= killed_ms && e.message == started);
        match next {
            Some(e) => Some(Ok(e.at)),
            None if !r.is_active() => Some(Err(r)),
            None => None,
        }
    })
    .await?;
    let dispatched_at = match after_kill {
        Ok(at) => at,
        Err(r) => bail!(
            "rollout {} ended ({:?}) with no task dispatched after the kill: {:#?}",
            r.id,
            r.state,
            r.events
        ),
    };
    let done = wait_done(api, r.id).await?;
    let switched_twice = cluster
        .fleet
        .nodes
        .iter()
        .zip(&before)
        .filter(|(n, b)| switches_to(&n.state_dir, version) - **b > 1)
        .count();
    Ok(Round {
        elected,
        agents_back,
        dispatched: Duration::from_millis(dispatched_at - killed_ms),
        completed: done.state == RolloutState::Completed && done.fully_upgraded(),
        switched_twice,
    })
}

fn report(rounds: &[Round], ttl: Duration) {
    let stats = |f: fn(&Round) -> Duration| {
        let mut v: Vec<f64> = rounds.iter().map(|r| f(r).as_secs_f64()).collect();
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        (at(0.5), at(0.99), v[v.len() - 1])
    };
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    let floor = (ttl.as_secs_f64() * 2.0 / 3.0, ttl.as_secs_f64());
    let completed = rounds.iter().filter(|r| r.completed).count();
    let twice: usize = rounds.iter().map(|r| r.switched_twice).sum();
    let (e50, e99, emax) = stats(|r| r.elected);
    let (a50, a99, amax) = stats(|r| r.agents_back);
    let (d50, d99, dmax) = stats(|r| r.dispatched);
    println!(
        "{:#}",
        json!({
            "rounds": rounds.len(),
            "lease_ttl_s": ttl.as_secs_f64(),
            "kill_to_elected_s": { "p50": round2(e50), "p99": round2(e99), "max": round2(emax) },
            "kill_to_agents_back_s": { "p50": round2(a50), "p99": round2(a99), "max": round2(amax) },
            "kill_to_next_task_s": {
                "p50": round2(d50), "p99": round2(d99), "max": round2(dmax),
                "goal": "p50 < 3, p99 < 10",
                "ideal": format!("the lease lapsing: {:.1} to {:.1} after the kill", floor.0, floor.1),
            },
            "rollouts_completed": { "value": completed, "goal": rounds.len() },
            "nodes_switched_twice": { "value": twice, "goal": 0 },
        })
    );
    eprintln!();
    eprintln!(
        "{:<34} {:>6} {:>6} {:>6}",
        "from the kill (s)", "p50", "p99", "max"
    );
    eprintln!(
        "{:<34} {e50:>6.2} {e99:>6.2} {emax:>6.2}",
        "a new leader elected"
    );
    eprintln!(
        "{:<34} {a50:>6.2} {a99:>6.2} {amax:>6.2}",
        "every agent back"
    );
    eprintln!(
        "{:<34} {d50:>6.2} {d99:>6.2} {dmax:>6.2}",
        "next task dispatched"
    );
    eprintln!(
        "goal: next task p50 < 3.00 s, p99 < 10.00 s; floor: the lease ({:.0} s TTL) lapsing, {:.2} to {:.2} s after the kill",
        ttl.as_secs_f64(),
        floor.0,
        floor.1
    );
    eprintln!(
        "rollouts completed: {completed}/{} (goal: all); nodes switched twice in one rollout: {twice} (goal: 0)",
        rounds.len()
    );
}

/// How many times the node's agent switched `api` to `version`.
fn switches_to(state_dir: &Path, version: &str) -> usize {
    let history = state_dir.join("services").join("api").join("history.log");
    std::fs::read_to_string(history)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            matches!(parts.as_slice(), [_, _, _, "->", to] if *to == version)
        })
        .count()
}

/// A rolling rollout of `api`; going back to an older version is allowed.
async fn start(
    api: &ApiClient,
    version: &str,
    batch: &str,
    min_healthy_time: &str,
) -> anyhow::Result<Rollout> {
    let spec = RolloutFile {
        service: Some("api".into()),
        version: Some(version.into()),
        downgrade: Some(true),
        strategy: StrategyFile {
            batch: Some(batch.into()),
            min_healthy_time: Some(min_healthy_time.into()),
            healthy_deadline: Some("1m".into()),
            progress_deadline: Some("5m".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let resp: RolloutResponse = api.start_rollout(spec).await?;
    Ok(resp.rollout)
}

async fn get(api: &ApiClient, id: u64) -> anyhow::Result<Rollout> {
    let resp: RolloutResponse = api.get(&format!("/v1/rollouts/{id}")).await?;
    Ok(resp.rollout)
}

async fn wait_done(api: &ApiClient, id: u64) -> anyhow::Result<Rollout> {
    wait("the rollout to end", || async {
        get(api, id).await.ok().filter(|r| !r.is_active())
    })
    .await
}

/// Polls `f` every [`POLL`] until it gives a value, for up to [`LIMIT`].
async fn wait<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let began = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if began.elapsed() > LIMIT {
            bail!("waited {LIMIT:?} for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}
