//! A local fleet of real processes: one control plane and N agents, each
//! supervising the demo service on a loopback port, all under one directory.
//! Used by `rollwave demo` and by the integration tests. Everything it starts
//! is killed when it is dropped, services included.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use rollwave_api::NodeView;

use rollwave_tls::{ClientTls, Pin};

use crate::client::ApiClient;

pub struct FleetSpec {
    /// The `rollwave` executable to run.
    pub exe: PathBuf,
    pub nodes: usize,
    /// Health check interval of the demo service.
    pub check_interval: String,
    /// `handoff` (the agent holds the sockets) or `restart` (the service
    /// binds its own port).
    pub switch: String,
    /// An HAProxy admin socket to drain each node in (backend `api`, server
    /// named after the node), for `restart`.
    pub haproxy_socket: Option<PathBuf>,
    /// Services every node runs besides `api`, each a demo service on a
    /// port of its own, with handoff.
    pub extra_services: Vec<String>,
    /// Hooks every node declares for `api` (`service.hooks`), by name: the
    /// commands a rollout's `kind = "node"` hooks may run.
    pub hooks: Vec<(String, Vec<String>)>,
    /// Serve over TLS, with certificates from `rollwave certs init`, which
    /// agents and the fleet's own client verify; otherwise plain HTTP.
    pub tls: bool,
    /// Minisign public key files every agent trusts (`trusted_key_files`):
    /// with any, agents install only releases signed by one of them.
    pub trusted_key_files: Vec<PathBuf>,
    /// The `api` service's command instead of the demo service (`{release}`
    /// is the release dir), for `handoff`: it gets its sockets by socket
    /// activation, so it is told no port.
    pub command: Option<Vec<String>>,
    /// More arguments for `rollwave server`, e.g. `--max-downloads 1`.
    pub server_args: Vec<String>,
    /// Other control plane replicas agents are told of, after the fleet's.
    pub extra_servers: Vec<String>,
    /// More top-level settings for every `agent.toml`, one per line, e.g.
    /// `max_release_size = "1MiB"`.
    pub agent_settings: Vec<String>,
    /// A second backup path for `api`, `state_dir/raft`, that a rollback
    /// never restores (`restore = "never"`), as a consensus member's data.
    pub kept_data: bool,
    /// The path the `api` health check GETs on the node's port.
    pub health_path: String,
    /// More entries for the `api` health check's table, e.g.
    /// `expect_json = { field = "version", equals = "{version}" }`.
    pub health_settings: Vec<String>,
    /// More lines for every node's `api` service table, e.g. a role probe.
    pub service_settings: Vec<String>,
}

impl FleetSpec {
    pub fn new(exe: PathBuf, nodes: usize) -> FleetSpec {
        FleetSpec {
            exe,
            nodes,
            check_interval: "100ms".into(),
            switch: "handoff".into(),
            haproxy_socket: None,
            extra_services: Vec::new(),
            hooks: Vec::new(),
            tls: false,
            trusted_key_files: Vec::new(),
            command: None,
            server_args: Vec::new(),
            extra_servers: Vec::new(),
            agent_settings: Vec::new(),
            kept_data: false,
            health_path: "/healthz".into(),
            health_settings: Vec::new(),
            service_settings: Vec::new(),
        }
    }
}

/// The quick-start certificates of a fleet served over TLS.
#[derive(Debug, Clone)]
pub struct Certs {
    /// Where `certs init` wrote them.
    pub dir: PathBuf,
    pub ca_file: PathBuf,
    /// The server certificate's pin, as `certs init` printed it.
    pub pin: Pin,
}

pub struct Node {
    pub name: String,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    /// Port of the node's service.
    pub port: u16,
    /// Ports of the `extra_services`, by name.
    pub extra_ports: BTreeMap<String, u16>,
    agent: Option<Child>,
}

pub struct Fleet {
    exe: PathBuf,
    server_args: Vec<String>,
    /// Where data dirs, state dirs, configs and logs go.
    pub dir: PathBuf,
    /// Removed after every process is killed (fields drop after `drop`):
    /// finding the services to kill needs the agents' state dirs.
    tmp: Option<tempfile::TempDir>,
    pub addr: SocketAddr,
    /// Present when the fleet is served over TLS.
    pub certs: Option<Certs>,
    server: Option<Child>,
    pub nodes: Vec<Node>,
    /// The bootstrap admin token the control plane wrote on first start.
    pub admin_token: String,
}

/// A free loopback port for a service, released again for the service to
/// bind. Taken below the kernel's ephemeral range: outgoing connections (the
/// load generators open thousands) draw from that range and could grab a
/// port between this check and the service's bind.
pub fn free_port() -> anyhow::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    let (low, high) = ephemeral_range();
    let (from, to) = if low > 12_000 {
        (10_000, low)
    } else {
        (high + 1, 65_535)
    };
    for _ in 0..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        let port = from + (h.finish() % u64::from(to - from)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

impl Fleet {
    /// Starts the control plane and every agent in a new temporary
    /// directory, and waits until all agents are connected.
    pub async fn launch(spec: FleetSpec) -> anyhow::Result<Fleet> {
        let tmp = tempfile::Builder::new()
            .prefix("rollwave-fleet-")
            .tempdir()
            .context("creating a temporary directory")?;
        let dir = tmp.path().to_path_buf();
        let certs = match spec.tls {
            true => Some(certs_init(&spec.exe, &dir.join("certs"))?),
            false => None,
        };
        let listen = "127.0.0.1:0".parse()?;
        let (server, addr) =
            start_server(&spec.exe, &dir, listen, certs.as_ref(), &spec.server_args).await?;
        let token_file = dir
            .join("server-data")
            .join(rollwave_server::ADMIN_TOKEN_FILE);
        // On a shared store, written once this replica is elected leader.
        let mut read = std::fs::read_to_string(&token_file);
        for _ in 0..300 {
            if read.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            read = std::fs::read_to_string(&token_file);
        }
        let admin_token = read
            .with_context(|| format!("reading {}", token_file.display()))?
            .trim()
            .to_string();
        let mut fleet = Fleet {
            exe: spec.exe.clone(),
            server_args: spec.server_args.clone(),
            dir: dir.clone(),
            tmp: Some(tmp),
            addr,
            certs,
            server: Some(server),
            nodes: Vec::new(),
            admin_token,
        };
        // The token is written while the elected replica loads the state,
        // before it answers as the leader.
        fleet.wait_leading().await?;
        // One join token for the whole fleet, as an operator would make
        // for a batch of machines; each agent trades it for its own
        // credential.
        let join = fleet
            .create_token("fleet-join", rollwave_core::Role::Join, Some("1h"))
            .await
            .context("creating the fleet's join token")?;
        // Each port is free when drawn but not held: with hundreds of
        // nodes, two draws would otherwise collide now and then.
        let mut taken = std::collections::HashSet::new();
        let mut unique_port = || -> anyhow::Result<u16> {
            loop {
                let port = free_port()?;
                if taken.insert(port) {
                    return Ok(port);
                }
            }
        };
        for i in 1..=spec.nodes {
            let name = format!("node-{i}");
            let state_dir = dir.join(&name);
            std::fs::create_dir_all(state_dir.join("data"))?;
            if spec.kept_data {
                std::fs::create_dir_all(state_dir.join("raft"))?;
            }
            let port = unique_port()?;
            let mut extra_ports = BTreeMap::new();
            for service in &spec.extra_services {
                extra_ports.insert(service.clone(), unique_port()?);
            }
            let config = state_dir.join("agent.toml");
            let ca_file = fleet.certs.as_ref().map(|c| c.ca_file.as_path());
            let mut toml = agent_toml(&spec, &fleet.url(), ca_file, &name, i, &state_dir, port);
            toml.insert_str(0, &format!("join_token = {:?}\n", join.token));
            for (service, port) in &extra_ports {
                toml.push_str(&extra_service_toml(&spec, service, *port));
            }
            std::fs::write(&config, toml)?;
            fleet.nodes.push(Node {
                name,
                state_dir,
                config,
                port,
                extra_ports,
                agent: None,
            });
            fleet.start_agent(i - 1)?;
        }
        fleet.wait_online(spec.nodes).await?;
        Ok(fleet)
    }

    pub fn url(&self) -> String {
        match self.certs {
            Some(_) => format!("https://{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    /// What a client of this fleet's control plane trusts.
    pub fn client_tls(&self) -> ClientTls {
        ClientTls {
            ca_file: self.certs.as_ref().map(|c| c.ca_file.clone()),
            pin: None,
        }
    }

    /// An API client with the admin token.
    pub fn api(&self) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::new(&self.url(), &self.client_tls())?
            .with_token(Some(self.admin_token.clone())))
    }

    /// A token made by the admin, as `rollwave token create` makes one.
    pub async fn create_token(
        &self,
        name: &str,
        role: rollwave_core::Role,
        ttl: Option<&str>,
    ) -> anyhow::Result<rollwave_api::CreatedToken> {
        let req = rollwave_api::CreateToken {
            name: name.into(),
            role,
            ttl: ttl.map(str::to_string),
            uses: None,
            node: None,
        };
        self.api()?.post("/v1/tokens", &req).await
    }

    /// A plain HTTP client that sends the admin token with every request.
    pub fn http(&self) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        let value = format!("Bearer {}", self.admin_token);
        headers.insert(
            reqwest::header::AUTHORIZATION,
            value.parse().expect("a token is a valid header value"),
        );
        let mut builder = reqwest::Client::builder().default_headers(headers);
        if let Some(certs) = &self.certs {
            let pem = std::fs::read(&certs.ca_file).expect("reading the fleet's CA");
            builder = builder.tls_built_in_root_certs(false).add_root_certificate(
                reqwest::Certificate::from_pem(&pem).expect("the fleet's CA is PEM"),
            );
        }
        builder.build().expect("building an http client")
    }

    /// A `rollwave` command line against this fleet's control plane, with
    /// the admin token (in the environment, not in the arguments).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--server")
            .arg(self.url())
            .env("ROLLWAVE_TOKEN", &self.admin_token);
        if let Some(certs) = &self.certs {
            cmd.arg("--ca-file").arg(&certs.ca_file);
        }
        cmd
    }

    pub fn service_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("http://127.0.0.1:{}/", n.port))
            .collect()
    }

    /// Adds a node whose `agent.toml` says `body` (labels and services)
    /// after what every agent of this fleet is told (name, control plane,
    /// state dir, a join token); `{state_dir}` in `body` is the node's state
    /// directory. Starts its agent; returns its index in `nodes`.
    pub async fn add_node(&mut self, name: &str, body: &str) -> anyhow::Result<usize> {
        let join = self
            .create_token(
                &format!("join-{name}"),
                rollwave_core::Role::Join,
                Some("1h"),
            )
            .await
            .context("creating a join token")?;
        let state_dir = self.dir.join(name);
        std::fs::create_dir_all(&state_dir)?;
        let ca_file = match &self.certs {
            Some(c) => format!("ca_file = {:?}\n", c.ca_file.display().to_string()),
            None => String::new(),
        };
        let dir = state_dir.display().to_string();
        let toml = format!(
            "join_token = {:?}\nnode = {name:?}\nserver = {:?}\n{ca_file}state_dir = {dir:?}\n{}",
            join.token,
            self.url(),
            body.replace("{state_dir}", &dir)
        );
        let config = state_dir.join("agent.toml");
        std::fs::write(&config, toml)?;
        self.nodes.push(Node {
            name: name.to_string(),
            state_dir,
            config,
            port: 0,
            extra_ports: BTreeMap::new(),
            agent: None,
        });
        let i = self.nodes.len() - 1;
        self.start_agent(i)?;
        Ok(i)
    }

    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(node.state_dir.join("agent.log"))?;
        let child = Command::new(&self.exe)
            .arg("agent")
            .arg("--config")
            .arg(&node.config)
            .env("ROLLWAVE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting agent of {}", node.name))?;
        node.agent = Some(child);
        Ok(())
    }

    /// Kills an agent with SIGKILL; its service keeps running.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(child) = self.nodes[i].agent.take() {
            kill_group(child);
        }
    }

    /// Sends `signal` to an agent alone, not its services: SIGSTOP makes it
    /// fall silent as if cut off by a partition (its connection stays open,
    /// nothing answers), SIGCONT brings it back.
    pub fn signal_agent(&self, i: usize, signal: Signal) {
        if let Some(child) = &self.nodes[i].agent {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// Sends `signal` to the control plane: SIGSTOP freezes it with every
    /// connection open, as a lost host or a partition looks to its agents.
    pub fn signal_server(&self, signal: Signal) {
        if let Some(child) = &self.server {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// The control plane's process id, while it runs.
    pub fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// Kills the control plane with SIGKILL.
    pub fn kill_server(&mut self) {
        if let Some(child) = self.server.take() {
            kill_group(child);
        }
    }

    /// Replaces the extra arguments of `rollwave server`, for its next
    /// start ([`Fleet::restart_server`]).
    pub fn set_server_args(&mut self, args: Vec<String>) {
        self.server_args = args;
    }

    /// Starts the control plane again on the same address and data dir.
    pub async fn restart_server(&mut self) -> anyhow::Result<()> {
        self.kill_server();
        let (child, _) = start_server(
            &self.exe,
            &self.dir,
            self.addr,
            self.certs.as_ref(),
            &self.server_args,
        )
        .await?;
        self.server = Some(child);
        Ok(())
    }

    /// Waits until the control plane answers as the leader: at once on its
    /// own store; on a shared one (etcd), once it is elected and has loaded
    /// the state (until then it answers as a follower, 503 to the API).
    pub async fn wait_leading(&self) -> anyhow::Result<()> {
        let api = self.api()?;
        for _ in 0..600 {
            let health = api.get::<rollwave_api::HealthResponse>("/v1/health").await;
            if health.is_ok_and(|h| h.leader) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "the control plane did not lead within 30s; see {}",
            self.dir.join("server.log").display()
        )
    }

    pub async fn nodes_view(&self) -> anyhow::Result<Vec<NodeView>> {
        self.api()?.get("/v1/nodes").await
    }

    /// Waits until `n` agents hold a session: up to a minute, and 100 ms
    /// more per agent for large fleets.
    pub async fn wait_online(&self, n: usize) -> anyhow::Result<()> {
        let api = self.api()?;
        let polls = 600 + n;
        for _ in 0..polls {
            if let Ok(nodes) = api.get::<Vec<NodeView>>("/v1/nodes").await {
                if nodes.iter().filter(|v| v.online).count() >= n {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "agents did not connect within {}s; see the logs under {}",
            polls / 10,
            self.dir.display()
        )
    }

    /// Kills every process of the fleet: agents, their services, the server.
    pub fn shutdown(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_agent(i);
            kill_services(&self.nodes[i].state_dir);
        }
        self.kill_server();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn kill_group(mut child: Child) {
    let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills the services an agent left running, found through its state dir.
pub fn kill_services(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir.join("services")) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(bytes) = std::fs::read(e.path().join("process.json")) else {
            continue;
        };
        // A list of {pid, ...} records: the current process and any
        // handoff candidate.
        let records = serde_json::from_slice::<Vec<serde_json::Value>>(&bytes).unwrap_or_default();
        for pid in records.iter().filter_map(|r| r.get("pid")?.as_i64()) {
            if pid > 1 {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// Runs `rollwave certs init` into `dir`, as an operator would.
fn certs_init(exe: &Path, dir: &Path) -> anyhow::Result<Certs> {
    let out = Command::new(exe)
        .args(["certs", "init", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .context("running rollwave certs init")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "rollwave certs init failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let pin = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pin: "))
        .with_context(|| format!("rollwave certs init printed no pin: {stdout}"))?
        .parse()?;
    Ok(Certs {
        dir: dir.to_path_buf(),
        ca_file: dir.join(rollwave_tls::certs::CA_CERT),
        pin,
    })
}

async fn start_server(
    exe: &Path,
    dir: &Path,
    listen: SocketAddr,
    certs: Option<&Certs>,
    args: &[String],
) -> anyhow::Result<(Child, SocketAddr)> {
    let out_path = dir.join("server.out");
    let out = File::create(&out_path)?;
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))?;
    let mut command = Command::new(exe);
    command
        .arg("server")
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--data-dir")
        .arg(dir.join("server-data"));
    match certs {
        Some(c) => command
            .arg("--tls-cert")
            .arg(c.dir.join(rollwave_tls::certs::SERVER_CERT))
            .arg("--tls-key")
            .arg(c.dir.join(rollwave_tls::certs::SERVER_KEY)),
        None => command.arg("--insecure-plain-http"),
    };
    command.args(args);
    let mut child = command
        .env("ROLLWAVE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the control plane")?;
    const READY: &str = "listening on ";
    for _ in 0..600 {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        if let Some(rest) = text.split(READY).nth(1) {
            let url = rest.lines().next().unwrap_or("").trim();
            let addr = url.split_once("://").map_or(url, |(_, addr)| addr);
            let addr = addr
                .parse()
                .with_context(|| format!("control plane printed address {addr:?}"))?;
            return Ok((child, addr));
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "control plane exited with {status}; see {}",
                dir.join("server.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill_group(child);
    bail!("control plane did not start within 30s")
}

fn agent_toml(
    spec: &FleetSpec,
    server: &str,
    ca_file: Option<&Path>,
    name: &str,
    i: usize,
    state_dir: &Path,
    port: u16,
) -> String {
    let exe = spec.exe.display().to_string();
    let (listen, sockets) = if spec.switch == "handoff" {
        (format!("listen = [\"127.0.0.1:{port}\"]\n"), String::new())
    } else {
        (
            String::new(),
            format!(", \"--listen\", \"127.0.0.1:{port}\""),
        )
    };
    let command = match &spec.command {
        Some(c) => c
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        None => format!("{exe:?}, \"demo-service\", \"--release\", \"{{release}}\"{sockets}"),
    };
    let drain = match &spec.haproxy_socket {
        Some(sock) => format!(
            "drain = {{ haproxy_socket = {:?}, backend = \"api\", server = \"{name}\", timeout = \"10s\" }}\n",
            sock.display().to_string()
        ),
        None => String::new(),
    };
    let hooks = if spec.hooks.is_empty() {
        String::new()
    } else {
        let entries: Vec<String> = spec
            .hooks
            .iter()
            .map(|(name, command)| format!("{name:?} = {command:?}"))
            .collect();
        format!("hooks = {{ {} }}\n", entries.join(", "))
    };
    let ca_file = match ca_file {
        Some(path) => format!("ca_file = {:?}\n", path.display().to_string()),
        None => String::new(),
    };
    let trusted: Vec<String> = spec
        .trusted_key_files
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    let server = if spec.extra_servers.is_empty() {
        format!("{server:?}")
    } else {
        let all: Vec<String> = std::iter::once(server.to_string())
            .chain(spec.extra_servers.iter().cloned())
            .map(|s| format!("{s:?}"))
            .collect();
        format!("[{}]", all.join(", "))
    };
    format!(
        r#"node = "{name}"
server = {server}
{ca_file}state_dir = {state_dir:?}
trusted_key_files = [{trusted}]
{settings}
[labels]
rack = "r{rack}"

[[service]]
name = "api"
command = [{command}]
switch = "{switch}"
{listen}{drain}{hooks}{service_settings}stop_grace = "5s"
backup = [{data:?}{kept}]
health = {{ type = "http", url = "http://127.0.0.1:{port}{health_path}", interval = "{interval}", timeout = "1s", healthy_threshold = 1, unhealthy_threshold = 2{health_settings} }}
"#,
        state_dir = state_dir.display().to_string(),
        trusted = trusted.join(", "),
        settings = spec.agent_settings.join("\n"),
        rack = (i - 1) % 3 + 1,
        switch = spec.switch,
        data = state_dir.join("data").display().to_string(),
        kept = if spec.kept_data {
            format!(
                ", {{ path = {:?}, restore = \"never\" }}",
                state_dir.join("raft").display().to_string()
            )
        } else {
            String::new()
        },
        interval = spec.check_interval,
        health_path = spec.health_path,
        health_settings = spec
            .health_settings
            .iter()
            .map(|s| format!(", {s}"))
            .collect::<String>(),
        service_settings = spec
            .service_settings
            .iter()
            .map(|s| format!("{s}\n"))
            .collect::<String>(),
    )
}

/// Another demo service on the node, with handoff and no drain or backup.
fn extra_service_toml(spec: &FleetSpec, service: &str, port: u16) -> String {
    let exe = spec.exe.display().to_string();
    format!(
        r#"
[[service]]
name = "{service}"
command = [{exe:?}, "demo-service", "--release", "{{release}}"]
listen = ["127.0.0.1:{port}"]
stop_grace = "5s"
health = {{ type = "http", url = "http://127.0.0.1:{port}/healthz", interval = "{interval}", timeout = "1s", healthy_threshold = 1, unhealthy_threshold = 2 }}
"#,
        interval = spec.check_interval,
    )
}

impl Fleet {
    /// Leaves every process and the directory in place and forgets them
    /// (for `demo --keep`).
    pub fn detach(mut self) -> PathBuf {
        self.server = None;
        for n in &mut self.nodes {
            n.agent = None;
        }
        if let Some(tmp) = self.tmp.take() {
            let _ = tmp.keep();
        }
        self.nodes.clear();
        self.dir.clone()
    }
}
