//! Command-line definitions.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "rollwave",
    version,
    about = "Upgrade a fleet of nodes to a new release, safely"
)]
pub struct Cli {
    /// Control plane address for client commands; several replicas
    /// comma-separated (tried in turn while one cannot be reached).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "ROLLWAVE_SERVER",
        default_value = "https://127.0.0.1:7700"
    )]
    pub server: String,
    /// API token for client commands (prefer ROLLWAVE_TOKEN_FILE: a token
    /// on a command line is visible to other users of the machine).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "ROLLWAVE_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// A file holding the API token, like the server's admin.token.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "ROLLWAVE_TOKEN_FILE",
        conflicts_with = "token"
    )]
    pub token_file: Option<PathBuf>,
    /// Trust only the CA certificates in this PEM file for the control
    /// plane's certificate (e.g. the ca.pem of `rollwave certs init`),
    /// instead of the usual web roots.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "ROLLWAVE_CA_FILE",
        value_name = "FILE"
    )]
    pub ca_file: Option<PathBuf>,
    /// Also require the control plane's certificate to be this one:
    /// `sha256:` and the hex SHA-256 of the certificate (DER), as `rollwave
    /// certs init` prints it.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "ROLLWAVE_PIN",
        value_name = "sha256:HEX"
    )]
    pub pin: Option<rollwave_tls::Pin>,
    /// How rollwave's own log lines (on stderr) are written.
    #[arg(long, global = true,
        help_heading = "Global options", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command line, as parsed and as completions and help show it:
    /// the client's options (`--server`, `--token`, ...) are global, so
    /// that they go anywhere on a client's command line, but mean nothing
    /// to the daemons and `certs`, whose help leaves them out.
    pub fn command_line() -> clap::Command {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        cmd.build();
        for name in ["server", "agent", "certs"] {
            cmd = cmd.mut_subcommand(name, hide_client_options);
        }
        cmd
    }

    /// Parses the process's arguments (exits on bad ones, as clap does).
    pub fn from_env() -> Cli {
        use clap::FromArgMatches;
        let matches = Cli::command_line().get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// The options only a client uses.
const CLIENT_OPTIONS: [&str; 5] = ["server", "token", "token-file", "ca-file", "pin"];

fn hide_client_options(cmd: clap::Command) -> clap::Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    let mut cmd = cmd.mut_args(|a| {
        if a.is_global_set() && a.get_long().is_some_and(|l| CLIENT_OPTIONS.contains(&l)) {
            a.hide(true)
        } else {
            a
        }
    });
    for name in names {
        cmd = cmd.mut_subcommand(name, hide_client_options);
    }
    cmd
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane.
    Server(Box<ServerArgs>),
    /// The control plane's store, offline: copy it to another engine.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Certificates for the control plane.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run the node agent.
    Agent {
        /// The agent's settings (agent.toml: its node name, the control
        /// plane, its services).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Push and list releases.
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Keys to sign releases with.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Start, watch and steer rollouts.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Show the plan a rollout would follow now, changing nothing.
    Plan(Box<StartArgs>),
    /// Show the fleet: every node, its services, versions and health.
    Nodes {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show each service's active version and the versions its nodes run.
    Services {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the backups of a service's data a node holds, newest first, as
    /// its agent last reported them.
    Backups {
        /// The node's name.
        node: String,
        /// The service whose backups to list.
        service: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create, list and revoke API tokens and join tokens (admin only).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Show the audit trail: who changed what through the API, and when,
    /// newest first.
    Audit {
        /// How many entries (1 to 10000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Set a service's fleet-wide active version (the version gate), once
    /// every node runs it or newer.
    Finalize {
        /// The service whose active version to set.
        service: String,
        /// The version to activate (default: the newest one any node runs).
        #[arg(long)]
        to: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The execution log of a rollout: every step of every node's tasks,
    /// with timestamps (the newest rollout if no id is given). With
    /// `--node N --service S`: that service's output on that node instead.
    Logs {
        /// The rollout's id (default: the newest rollout).
        id: Option<u64>,
        /// Only this node's steps (and the rollout's own); with `--service`,
        /// the node whose service's output to show.
        #[arg(long)]
        node: Option<String>,
        /// Show this service's output on `--node` (what it writes to stdout
        /// and stderr, as its agent keeps it), not a rollout's log.
        #[arg(long)]
        service: Option<String>,
        /// With `--service`: only lines written since, a duration back
        /// (`10m`) or a time (`2026-01-02T15:04:05Z`).
        #[arg(long)]
        since: Option<String>,
        /// Keep printing new steps until the rollout ends; with `--service`,
        /// new lines until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
        /// One JSON object per line per step, as in the rollout's `events`;
        /// with `--service`, `{"time", "line"}` per line.
        #[arg(long)]
        json: bool,
    },
    /// Print a completion script for a shell, e.g. `source <(rollwave
    /// completions bash)`.
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Start a local fleet and upgrade it end to end under load.
    Demo(DemoArgs),
    /// Run N virtual agents in this process, each a real session with the
    /// control plane (enrolled with its own credential) that answers tasks
    /// without running anything: to try the control plane at fleet size.
    Sim(Box<SimArgs>),
    /// The small HTTP service the demo fleet runs.
    #[command(hide = true)]
    DemoService {
        /// The release directory (holds release.toml).
        #[arg(long)]
        release: PathBuf,
        /// Bind this address; without it, serve the sockets passed by
        /// socket activation (LISTEN_FDS).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Sets LISTEN_PID and runs a service in its place (used by the agent).
    #[command(hide = true)]
    ListenExec {
        /// The service's command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
}

impl Command {
    /// Long-running commands log at info by default; client verbs stay quiet.
    pub fn is_daemon(&self) -> bool {
        matches!(self, Command::Server(_) | Command::Agent { .. })
    }
}

/// `rollwave server`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The address to serve the API, the dashboard and agent sessions on.
    #[arg(long, default_value = "127.0.0.1:7700", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Where the control plane keeps release artifacts, its SQLite store
    /// (unless --store says otherwise) and the bootstrap admin token.
    #[arg(long, default_value = "./rollwave-data", value_name = "DIR")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// With several control planes on one etcd: the URL the others
    /// reach this one at when it leads (default: the scheme and the
    /// address it listens on).
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,
    /// With several control planes over HTTPS: the CA their
    /// certificates chain to, for requests passed to the leader.
    #[arg(long, value_name = "FILE")]
    pub replica_ca_file: Option<PathBuf>,
    /// The server's certificate chain, PEM, leaf first (e.g. the
    /// server.pem of `rollwave certs init`).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key, PEM.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP: anyone on the network can read and change what
    /// goes to and from the control plane. For tests on one machine.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub insecure_plain_http: bool,
    /// Release artifacts streamed to agents at once. Agents past it are
    /// answered 429 with Retry-After and come back later, rather than
    /// all sharing the link and timing out.
    #[arg(long, value_name = "N", default_value_t = rollwave_server::DEFAULT_MAX_DOWNLOADS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_downloads: usize,
    /// Seconds a client has to send its request's headers before the
    /// connection is closed (slow or stalled clients).
    #[arg(long, value_name = "SECONDS", default_value_t = rollwave_server::DEFAULT_HEADER_READ_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_read_timeout: u64,
    /// Connections one source address may hold open without having sent
    /// a request; past it, its new connections are closed at once.
    /// Connections that sent one (agent sessions) do not count.
    #[arg(long, value_name = "N", default_value_t = rollwave_server::DEFAULT_MAX_PENDING_PER_IP,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_pending_per_ip: usize,
    /// How long rollouts that ended are kept: a duration like 365d, 12h
    /// or 30m, or `forever`. A rollout still running, or still converging
    /// nodes, is never deleted. Pruned at start and hourly, by the leader.
    #[arg(long, value_name = "DURATION", default_value = "365d")]
    pub rollout_retention: String,
    /// At most this many rollouts are kept, the newest, whatever their age:
    /// the bound on the space their history takes. A number, or
    /// `unlimited`.
    #[arg(long, value_name = "N", default_value_t = rollwave_server::DEFAULT_MAX_ROLLOUTS.to_string())]
    pub max_rollouts: String,
    /// How long audit entries are kept: a duration like 365d, or `forever`.
    #[arg(long, value_name = "DURATION", default_value = "365d")]
    pub audit_retention: String,
    /// At most this many audit entries are kept, the newest. A number, or
    /// `unlimited`.
    #[arg(long, value_name = "N", default_value_t = rollwave_server::DEFAULT_MAX_AUDIT_ENTRIES.to_string())]
    pub max_audit_entries: String,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy every record (nodes, tokens, releases, active versions,
    /// rollouts, audit trail) from one store to another, e.g. from SQLite
    /// to etcd: `rollwave store copy --from sqlite:./rollwave-data/rollwave.db
    /// --to etcd://etcd1:2379`. Stop the source's control plane first.
    /// Artifacts stay in the data dir: copy its blobs/ to each replica's.
    Copy(Box<CopyArgs>),
    /// Save everything the store holds, as of one instant, to a file (a
    /// SQLite database): `rollwave store backup --from etcd://etcd1:2379
    /// --to rollwave.backup`. Safe while control planes run. Artifacts are
    /// not in it: back up the data dir's blobs/ as files.
    Backup(Box<BackupArgs>),
    /// Load a backup into an empty store (stop its control planes first):
    /// `rollwave store restore --from rollwave.backup --to etcd://etcd1:2379`.
    /// The store then leads in terms above any its cluster used, so agents
    /// follow it.
    Restore(Box<RestoreArgs>),
}

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The store to save: sqlite:PATH or etcd://HOST:PORT[,...].
    #[arg(long, value_name = "URL")]
    pub from: rollwave_store::StoreUrl,
    /// The backup file to write.
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
    /// Replace the file if it exists.
    #[arg(long)]
    pub force: bool,
    /// How to reach etcd.
    #[command(flatten)]
    pub etcd: StoreArgs,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The backup file, from `rollwave store backup`.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// The store to load it into, empty unless --force.
    #[arg(long, value_name = "URL")]
    pub to: rollwave_store::StoreUrl,
    /// Load into a store that holds records already, keeping those it has.
    #[arg(long)]
    pub force: bool,
    /// How to reach etcd.
    #[command(flatten)]
    pub etcd: StoreArgs,
}

#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// The store to read: sqlite:PATH or etcd://HOST:PORT[,...].
    #[arg(long, value_name = "URL")]
    pub from: rollwave_store::StoreUrl,
    /// The store to write, empty unless --force.
    #[arg(long, value_name = "URL")]
    pub to: rollwave_store::StoreUrl,
    /// Copy into a store that holds records already, keeping those it
    /// has (a copy run again changes nothing).
    #[arg(long)]
    pub force: bool,
    /// How to reach etcd, on either side.
    #[command(flatten)]
    pub etcd: StoreArgs,
}

/// Where the control plane keeps its state.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// `sqlite:PATH` (default: `sqlite:<data-dir>/rollwave.db`) or
    /// `etcd://HOST:PORT[,HOST:PORT...]` (`etcds://` for TLS): several
    /// control planes on one etcd share its state.
    #[arg(long = "store", value_name = "URL", env = "ROLLWAVE_STORE")]
    pub url: Option<rollwave_store::StoreUrl>,
    /// etcd: the CA that signed etcd's certificate (turns TLS on).
    #[arg(long = "store-ca-file", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// etcd: a client certificate, for etcd's --client-cert-auth.
    #[arg(long = "store-cert-file", value_name = "FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// etcd: the client certificate's key.
    #[arg(long = "store-key-file", value_name = "FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// etcd: its user, when etcd's authentication is on.
    #[arg(long = "store-user", value_name = "NAME")]
    pub user: Option<String>,
    /// etcd: that user's password (better from the environment).
    #[arg(
        long = "store-password",
        value_name = "PASSWORD",
        env = "ROLLWAVE_STORE_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// etcd: the key prefix rollwave's records live under.
    #[arg(
        long = "store-prefix",
        value_name = "PREFIX",
        default_value = "/rollwave/"
    )]
    pub prefix: String,
}

impl StoreArgs {
    /// The store to open; `None`: the default SQLite file in the data dir.
    pub fn config(self) -> Option<rollwave_store::StoreConfig> {
        let url = self.url.clone()?;
        Some(self.config_for(url))
    }

    /// `url`, reached with these options.
    pub fn config_for(&self, url: rollwave_store::StoreUrl) -> rollwave_store::StoreConfig {
        rollwave_store::StoreConfig {
            url,
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            prefix: self.prefix.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a private CA and a server certificate it signed, to start
    /// with: ca.pem and ca.key, server.pem and server.key. The certificate
    /// is valid for localhost, 127.0.0.1, ::1 and every --host.
    Init {
        /// The directory to write the four files in (created if missing).
        #[arg(long, default_value = "./rollwave-certs")]
        dir: PathBuf,
        /// Another DNS name or IP address the control plane is reached by
        /// (repeatable).
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Upload a release: a .tar.gz or a single executable.
    Push {
        /// The service the release is of, e.g. api.
        service: String,
        /// Its version, e.g. 2.0.0 (semantic versioning).
        version: String,
        /// The artifact: a .tar.gz (may hold a rollwave.toml) or an
        /// executable.
        file: PathBuf,
        /// Sign the artifact with this minisign secret key before uploading
        /// (trusted comment `rollwave release SERVICE@VERSION sha256:HEX`).
        #[arg(long, value_name = "KEY_FILE", conflicts_with = "signature")]
        sign_key: Option<PathBuf>,
        /// Upload this detached minisign signature of the file, made
        /// elsewhere, e.g. `minisign -S -m FILE -t "rollwave release
        /// SERVICE@VERSION"`.
        #[arg(long, value_name = "MINISIG_FILE")]
        signature: Option<PathBuf>,
    },
    /// Add a signature to a pushed release without uploading it again:
    /// agents install it when any of its signatures is by a key they trust.
    #[command(group(clap::ArgGroup::new("how").required(true).args(["sign_key", "signature"])))]
    Sign {
        /// `service@version`, like api@2.0.0.
        release: String,
        /// Sign with this minisign secret key; needs the release's file
        /// (`--file`), checked against the stored sha256 before signing.
        #[arg(long, value_name = "KEY_FILE", requires = "file")]
        sign_key: Option<PathBuf>,
        /// The release's file, to sign with `--sign-key`.
        #[arg(long, value_name = "FILE", requires = "sign_key")]
        file: Option<PathBuf>,
        /// Add this detached minisign signature, made elsewhere.
        #[arg(long, value_name = "MINISIG_FILE", conflicts_with = "sign_key")]
        signature: Option<PathBuf>,
    },
    /// List releases.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete a release, with its signatures, and its artifact unless
    /// another release has the same bytes. Refused while a rollout that
    /// has not finished targets it or may roll back to it, while it is the
    /// service's active version, and while a node runs it or ran it last.
    Delete {
        /// `service@version`, like api@1.0.0.
        release: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an Ed25519 key pair in minisign's format: NAME.key, the
    /// secret key (mode 0600, not encrypted), for `release push --sign-key`,
    /// and NAME.pub, the public key, for agents' `trusted_key_files`.
    Generate {
        /// The directory to write both files in (created if missing).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The files' name, without extension.
        #[arg(long, default_value = "rollwave")]
        name: String,
        /// Replace key files that exist.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a rollout: `rollwave rollout start api@2.0.0 --batch 2`.
    Start(Box<StartArgs>),
    /// Show a rollout (the newest if no id is given).
    Status {
        /// The rollout's id (default: the newest rollout).
        id: Option<u64>,
        /// Follow the rollout until it ends.
        #[arg(long)]
        watch: bool,
        /// Wait for the end; exit non-zero unless every node is on the target version.
        #[arg(long)]
        wait: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// List every node, however many (a rollout of more than 50 nodes
        /// is otherwise shown as counts and the nodes with a problem).
        #[arg(long)]
        nodes: bool,
    },
    /// List rollouts, newest first.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// How many (1 to 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
    },
    /// Stop starting nodes; nodes in flight finish.
    Pause {
        /// A rollout id, or a service (its active rollout); default: the
        /// only active rollout.
        id: Option<String>,
    },
    /// Go on with a paused rollout.
    Resume {
        /// A rollout id, or a service (its active rollout); default: the
        /// only active rollout.
        id: Option<String>,
    },
    /// Stop the rollout; upgraded nodes keep the new version.
    Cancel {
        /// A rollout id, or a service (its active rollout); default: the
        /// only active rollout.
        id: Option<String>,
    },
    /// Return every node this rollout upgraded to its previous version.
    Rollback {
        /// A rollout id, or a service (its newest rollout); default: the
        /// only active rollout.
        id: Option<String>,
        /// Follow the rollback until it ends; exit non-zero unless every
        /// node is back on its previous version (state `rolled_back`).
        #[arg(long)]
        wait: bool,
        /// Nodes sent back at once: a count or a percentage of the
        /// rollout's nodes (default: the rollout's max_unavailable).
        #[arg(long, value_name = "N|P%")]
        batch: Option<String>,
        /// Send every node back at once, whatever the rollout's budget.
        #[arg(long, conflicts_with = "batch")]
        all_at_once: bool,
    },
    /// Let a canary continue past the wave it waits after.
    Promote {
        /// A rollout id, or a service (its active rollout); default: the
        /// only active rollout.
        id: Option<String>,
    },
    /// A service's past rollouts, newest first.
    History {
        /// The service.
        service: String,
        /// How many (1 to 1000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// `service@version`; may come from the file instead.
    pub target: Option<String>,
    /// A rollout.toml; flags override its fields.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Label selector: `k=v`, `k!=v`, `k in (a,b)`, `k`, `!k`, comma-separated.
    #[arg(long)]
    pub selector: Option<String>,
    /// Nodes per batch: a count or a percentage of the selected nodes.
    #[arg(long)]
    pub batch: Option<String>,
    /// Nodes that may be unavailable at once (count or %); defaults to the batch size.
    #[arg(long)]
    pub max_unavailable: Option<String>,
    /// How long a node must stay healthy after its switch.
    #[arg(long)]
    pub min_healthy_time: Option<String>,
    /// How long a node has to become healthy after its switch.
    #[arg(long)]
    pub healthy_deadline: Option<String>,
    /// The rollout fails if no node finishes for this long.
    #[arg(long)]
    pub progress_deadline: Option<String>,
    /// Failed nodes tolerated before the rollout fails.
    #[arg(long)]
    pub max_failures: Option<u32>,
    /// Leave upgraded nodes as they are when the rollout fails.
    #[arg(long)]
    pub no_auto_rollback: bool,
    /// Explicit node names, comma-separated (with a selector, both apply).
    #[arg(long, value_delimiter = ',')]
    pub nodes: Option<Vec<String>>,
    /// Canary waves, cumulative and comma-separated; `:pause` waits for
    /// `rollout promote` after a wave: `1:pause,10%,50%,100%`.
    #[arg(long)]
    pub waves: Option<String>,
    /// Two phases: stage on every node, then switch every node at once;
    /// any failure switches every node back.
    #[arg(long, conflicts_with_all = ["waves", "batch"])]
    pub all_at_once: bool,
    /// Allow going to a version older than the nodes run (never below the
    /// service's active version).
    #[arg(long)]
    pub downgrade: bool,
    /// Once every node runs the new version, make it the service's active
    /// version (as `rollwave finalize` does).
    #[arg(long)]
    pub auto_finalize: bool,
    /// Healthy nodes of the service that must always remain: a count, a
    /// percentage ("60%") or "majority"; fleet-wide, or in each group of
    /// `--min-healthy-per`.
    #[arg(long, value_name = "N|P%|majority")]
    pub min_healthy: Option<String>,
    /// A label: `--min-healthy` applies within each group of nodes sharing
    /// its value (e.g. cluster), like one disruption budget per group.
    #[arg(long, value_name = "LABEL", requires = "min_healthy")]
    pub min_healthy_per: Option<String>,
    /// Switch the node whose role probe says `leader` after the others of
    /// its group, re-read as each node's turn comes (order = "leader_last").
    #[arg(long, conflicts_with = "order")]
    pub leader_last: bool,
    /// A label whose values are failure domains (e.g. rack).
    #[arg(long)]
    pub spread_by: Option<String>,
    /// Nodes of one `--spread-by` domain in flight at once (default 1).
    #[arg(long)]
    pub max_per_domain: Option<u32>,
    /// Upgrade one value of this label completely before the next.
    #[arg(long)]
    pub order_by: Option<String>,
    /// Values of `--order-by` to go first, in order, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub order: Option<Vec<String>>,
    /// Start without showing the plan and asking first (on a terminal;
    /// elsewhere a start never asks).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Start only if the plan is still the one `rollwave plan` printed with
    /// this id (the fleet, the release and the spec unchanged).
    #[arg(long, value_name = "ID")]
    pub plan_id: Option<String>,
    /// Wait for the end; exit non-zero unless every node is on the target version.
    #[arg(long)]
    pub wait: bool,
    /// Print the rollout as JSON (with --wait, as it ended).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    /// Roll out a release that never becomes healthy, and watch it roll back.
    #[arg(long)]
    pub bad: bool,
    /// Print one JSON object at the end instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Leave the fleet running and print the server address.
    #[arg(long)]
    pub keep: bool,
    /// How nodes switch versions: `handoff` (no connection refused) or
    /// `restart` (stop, then start), for comparison.
    #[arg(long, value_enum, default_value_t = DemoSwitch::Handoff)]
    pub switch: DemoSwitch,
}

/// `rollwave sim`. Values are checked by `sim`, so that a bad one gets one
/// line naming the flag.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Nodes are named sim-1 ... sim-N. They find and trust the control plane as \
`rollwave agent` does: --server (ROLLWAVE_SERVER), --ca-file, --pin.

--labels is comma-separated key=value pairs; in a value, {i} is the node's \
number (1 to N) and {i%K} that number modulo K:
  --labels 'rack=r{i%40},zone=z{i%3},host=h{i}'   # sim-7: rack=r7, zone=z1, host=h7

A task takes --task-latency (an upgrade also its min_healthy_time), then \
fails with probability --fail-rate (stage and upgrade tasks; dry runs and \
reverts always succeed). The draw depends on --seed, the node and the task \
only, so a run can be repeated. A task received again is answered from the \
node's record, as an agent's journal does.

--report FILE is JSON, replaced atomically every --report-every and at exit \
(SIGINT, SIGTERM): per node its version and how often it switched (to each \
version), and totals (enrolled, connected, tasks by kind and outcome, nodes \
that switched more than once).")]
pub struct SimArgs {
    /// How many virtual agents.
    #[arg(long)]
    pub agents: usize,
    /// The service every node runs.
    #[arg(long, default_value = "api")]
    pub service: String,
    /// The version every node runs at start (default: none installed).
    #[arg(long)]
    pub version: Option<String>,
    /// A join token, traded by each node for its own credential.
    #[arg(long, env = "ROLLWAVE_JOIN_TOKEN_FILE", value_name = "FILE")]
    pub join_token_file: PathBuf,
    /// Where the nodes' credentials are kept (JSON, mode 0600), so that a
    /// restarted sim comes back as the same nodes (default: memory only).
    #[arg(long, value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    /// Each node's labels, with {i} and {i%K} templates (see below).
    #[arg(long, value_name = "K=V,...")]
    pub labels: Option<String>,
    /// How long a task takes.
    #[arg(long, default_value = "50ms")]
    pub task_latency: String,
    /// The probability that a stage or upgrade task fails (0 to 1).
    #[arg(long, default_value = "0")]
    pub fail_rate: String,
    /// Seed of the failure draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Enrollments and connects in flight at once.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Write the counts here (JSON).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// How often to write the report and the progress line.
    #[arg(long, default_value = "2s")]
    pub report_every: String,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DemoSwitch {
    Handoff,
    Restart,
}

impl DemoSwitch {
    pub fn as_str(self) -> &'static str {
        match self {
            DemoSwitch::Handoff => "handoff",
            DemoSwitch::Restart => "restart",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token. The token itself is printed once, alone on stdout;
    /// the control plane keeps only its hash.
    Create {
        /// admin: everything; operator: rollouts and their commands,
        /// finalize; viewer: read only; agent: one node's credential; join:
        /// enrolls agents.
        #[arg(long, value_parser = ["admin", "operator", "viewer", "agent", "join"])]
        role: String,
        /// Unique among live tokens; names the token in the audit trail.
        #[arg(long)]
        name: String,
        /// Valid for this long, like 12h or 30d (default: until revoked).
        #[arg(long)]
        ttl: Option<String>,
        /// join: a one-time token (one enrollment).
        #[arg(long, conflicts_with = "uses")]
        once: bool,
        /// join: at most this many enrollments.
        #[arg(long)]
        uses: Option<u32>,
        /// agent: the node the credential belongs to.
        #[arg(long)]
        node: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List every token (never a secret).
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by name (or id); an agent credential's session ends.
    Revoke {
        /// The token's name, or its id.
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[cfg(test)]
mod help_tests {
    /// Every command and every argument a user can see says what it is.
    #[test]
    fn every_command_and_argument_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            // `help` is clap's own.
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        let cmd = super::Cli::command_line();
        walk(&cmd, "rollwave", &mut missing);
        assert!(missing.is_empty(), "undescribed:\n{}", missing.join("\n"));
    }

    /// `--server`, `--token` and the other client options are not offered
    /// where they mean nothing; the store's own `--store-ca-file` stays.
    #[test]
    fn client_options_are_not_offered_to_the_daemons() {
        let cmd = super::Cli::command_line();
        let shown = |path: &[&str]| -> Vec<String> {
            let mut c = &cmd;
            for p in path {
                c = c.find_subcommand(p).unwrap();
            }
            c.get_arguments()
                .filter(|a| !a.is_hide_set())
                .filter_map(|a| a.get_long().map(str::to_string))
                .collect()
        };
        for path in [&["server"][..], &["agent"], &["certs", "init"]] {
            let longs = shown(path);
            for client in super::CLIENT_OPTIONS {
                assert!(
                    !longs.iter().any(|l| l == client),
                    "{path:?} shows --{client}"
                );
            }
        }
        assert!(shown(&["server"]).iter().any(|l| l == "store-ca-file"));
        assert!(shown(&["nodes"]).iter().any(|l| l == "server"));
        assert!(shown(&["rollout", "start"]).iter().any(|l| l == "token"));
    }
}
