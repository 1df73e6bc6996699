//! What each subcommand does.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use rollwave_api::{
    DeleteReleaseResponse, Finalize, FinalizeResponse, NodeView, PushResponse, Release,
    RolloutFile, RolloutResponse, ServiceSummary, StartRollout,
};
use rollwave_core::{
    format_duration, parse_version, validate_service_name, AuditEntry, CountOrText, OrderFile,
    Rollout, RolloutState, RolloutSummary, StrategyFile, WaveFile,
};
use sha2::{Digest, Sha256};

use crate::cli::{
    BackupArgs, CertsCommand, Cli, Command, CopyArgs, KeysCommand, ReleaseCommand, RestoreArgs,
    RolloutCommand, ServerArgs, StartArgs, StoreCommand,
};
use crate::client::{user_error, ApiClient, UserError};
use crate::{keys, render};

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let conn = cli.connection();
    match cli.command {
        Command::Server(args) => {
            let ServerArgs {
                listen,
                data_dir,
                store,
                advertise_url,
                replica_ca_file,
                tls_cert,
                tls_key,
                insecure_plain_http,
                max_downloads,
                header_read_timeout,
                max_pending_per_ip,
                rollout_retention,
                max_rollouts,
                audit_retention,
                max_audit_entries,
            } = *args;
            let retention = rollwave_server::Retention {
                rollouts: retention_flag("--rollout-retention", &rollout_retention)?,
                max_rollouts: count_flag("--max-rollouts", &max_rollouts)?,
                audit: retention_flag("--audit-retention", &audit_retention)?,
                max_audit_entries: count_flag("--max-audit-entries", &max_audit_entries)?,
            };
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(
                    rollwave_tls::ServerTls::load(&cert, &key)
                        .map_err(|e| user_error(e.to_string()))?,
                ),
                _ if insecure_plain_http => None,
                _ => {
                    return Err(user_error(
                        "the control plane serves HTTPS: pass --tls-cert and --tls-key (`rollwave certs init` makes a pair), or --insecure-plain-http to serve plain HTTP",
                    ))
                }
            };
            let store = store.config();
            let config = rollwave_server::ServerConfig {
                listen,
                data_dir,
                store,
                advertise_url,
                replica_ca_file,
                tls,
                max_downloads,
                limits: rollwave_server::ConnLimits {
                    header_read_timeout: std::time::Duration::from_secs(header_read_timeout),
                    max_pending_per_ip,
                },
                retention,
            };
            rollwave_server::run(config, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Store(StoreCommand::Copy(args)) => {
            let CopyArgs {
                from,
                to,
                force,
                etcd,
            } = *args;
            if from == to {
                return Err(user_error("--to: the same store as --from"));
            }
            let source = open_store(&etcd, from, "--from").await?;
            let target = open_store(&etcd, to, "--to").await?;
            let done = rollwave_store::copy::copy(source.as_ref(), target.as_ref(), force)
                .await
                .map_err(copy_error)?;
            crate::outln!("copied {}", render::copied(&done));
            Ok(ExitCode::SUCCESS)
        }
        Command::Store(StoreCommand::Backup(args)) => {
            let BackupArgs {
                from,
                to,
                force,
                etcd,
            } = *args;
            let source = open_store(&etcd, from, "--from").await?;
            let done = rollwave_store::backup::backup(source.as_ref(), &to, force)
                .await
                .map_err(|e| backup_error(e, "--to"))?;
            crate::outln!("saved {} to {}", render::copied(&done), to.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Store(StoreCommand::Restore(args)) => {
            let RestoreArgs {
                from,
                to,
                force,
                etcd,
            } = *args;
            let target = open_store(&etcd, to, "--to").await?;
            let done = rollwave_store::backup::restore(&from, target.as_ref(), force)
                .await
                .map_err(|e| backup_error(e, "--from"))?;
            crate::outln!("restored {}", render::copied(&done));
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Init { dir, hosts, force }) => {
            let made = rollwave_tls::certs::generate(&dir, &hosts, force).map_err(|e| match e {
                rollwave_tls::TlsError::Host(_) => user_error(format!("--host: {e}")),
                e => user_error(e.to_string()),
            })?;
            crate::out!("{}", render::certs(&made));
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent { config } => {
            let config = rollwave_agent::AgentConfig::load(&config).map_err(user_error)?;
            rollwave_agent::run(config, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoService { release, listen } => {
            crate::demo_service::run(&release, listen, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Sim(args) => crate::sim::run(conn.server(), conn.tls(), *args).await,
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command_line(), "rollwave", &mut script);
            crate::out!("{}", String::from_utf8_lossy(&script));
            Ok(ExitCode::SUCCESS)
        }
        Command::ListenExec { command } => {
            let err = rollwave_agent::listen_exec(&command[0], &command[1..]);
            Err(anyhow::anyhow!(
                "running {}: {err}",
                command[0].to_string_lossy()
            ))
        }
        Command::Nodes { json } => {
            let api = conn.api()?;
            let nodes: Vec<NodeView> = api.get("/v1/nodes").await?;
            if json {
                print_json(&nodes)?;
            } else {
                crate::out!("{}", render::nodes(&nodes, now_ms()));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Backups {
            node,
            service,
            json,
        } => {
            let api = conn.api()?;
            let nodes: Vec<NodeView> = api.get("/v1/nodes").await?;
            let n = nodes.iter().find(|n| n.name == node).ok_or_else(|| {
                user_error(format!("node: {node:?} is not known to the control plane"))
            })?;
            let s = n
                .services
                .get(&service)
                .ok_or_else(|| user_error(format!("service: {node} does not run {service:?}")))?;
            if json {
                print_json(&s.backups)?;
            } else {
                crate::out!("{}", render::backups(&s.backups));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { limit, json } => {
            let api = conn.api()?;
            let entries: Vec<AuditEntry> = api.get(&format!("/v1/audit?limit={limit}")).await?;
            if json {
                print_json(&entries)?;
            } else {
                crate::out!("{}", render::audit(&entries));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(args) => {
            // Shared with `rollout start`, but a plan starts nothing.
            if args.yes {
                return Err(user_error(
                    "--yes: plan starts nothing, so there is nothing to confirm; use `rollout start`",
                ));
            }
            if args.wait {
                return Err(user_error(
                    "--wait: plan starts nothing, so there is nothing to wait for; use `rollout start --wait`",
                ));
            }
            if args.plan_id.is_some() {
                return Err(user_error(
                    "--plan-id: plan makes a plan id; `rollout start --plan-id` takes one",
                ));
            }
            let api = conn.api()?;
            let spec = start_spec(&args)?;
            let resp: RolloutResponse = api
                .post(
                    "/v1/plan",
                    &StartRollout {
                        spec,
                        plan_id: None,
                    },
                )
                .await?;
            if args.json {
                print_json(&resp)?;
            } else {
                let plan_id = resp.plan_id.clone().unwrap_or_default();
                let nodes: Vec<NodeView> = api.get("/v1/nodes").await?;
                for r in &group(resp) {
                    crate::out!("{}", render::plan(r, &nodes));
                }
                crate::outln!(
                    "plan id: {plan_id} (`rollout start ... --plan-id {plan_id}` starts this plan, or nothing if it changed)"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Services { json } => {
            let api = conn.api()?;
            let services: Vec<ServiceSummary> = api.get("/v1/services").await?;
            if json {
                print_json(&services)?;
            } else {
                crate::out!("{}", render::services(&services));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Finalize { service, to, json } => {
            validate_service_name("service", &service).map_err(|e| user_error(e.to_string()))?;
            if let Some(v) = &to {
                parse_version("to", v).map_err(|e| user_error(e.to_string()))?;
            }
            let api = conn.api()?;
            let resp: FinalizeResponse = api
                .post(
                    &format!("/v1/services/{service}/finalize"),
                    &Finalize { to },
                )
                .await?;
            if json {
                print_json(&resp)?;
            } else if resp.changed {
                crate::outln!(
                    "{service}: active version {} (was {})",
                    resp.active.version,
                    resp.previous.as_deref().unwrap_or("none")
                );
            } else {
                crate::outln!(
                    "{service}: active version is already {}",
                    resp.active.version
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs {
            id,
            node,
            service,
            since,
            follow,
            json,
        } => {
            if let Some(service) = service {
                let Some(node) = node else {
                    return Err(user_error(
                        "--service: also name the node it runs on with --node",
                    ));
                };
                if let Some(id) = id {
                    return Err(user_error(format!(
                        "--service: shows a service's output, not rollout {id}'s log; drop one of them"
                    )));
                }
                let api = conn.api()?;
                let how = crate::service_logs::Show {
                    since: since.as_deref(),
                    follow,
                    json,
                };
                return crate::service_logs::show(&api, &node, &service, how).await;
            }
            if since.is_some() {
                return Err(user_error(
                    "--since: only with --service (a rollout's log is shown whole)",
                ));
            }
            let api = conn.api()?;
            let id = match id {
                Some(id) => id,
                None => newest(&api).await?,
            };
            logs(&api, id, node.as_deref(), follow, json).await
        }
        Command::Keys(KeysCommand::Generate { dir, name, force }) => {
            let k = keys::generate(&dir, &name, force)?;
            crate::outln!("key id      {}", k.key_id);
            crate::outln!("public key  {}", k.public_key);
            crate::outln!(
                "wrote {} (agents: trusted_key_files or trusted_keys)",
                k.public.display()
            );
            crate::outln!(
                "wrote {} (secret, not encrypted, mode 0600: release push --sign-key)",
                k.secret.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Release(cmd) => release(conn.api()?, cmd).await,
        Command::Token(cmd) => crate::tokens::run(conn.api()?, cmd).await,
        Command::Rollout(cmd) => rollout(conn.api()?, cmd).await,
    }
}

async fn release(api: ApiClient, cmd: ReleaseCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ReleaseCommand::Push {
            service,
            version,
            file,
            sign_key,
            signature,
        } => {
            validate_service_name("service", &service).map_err(|e| user_error(e.to_string()))?;
            parse_version("version", &version).map_err(|e| user_error(e.to_string()))?;
            let bytes = std::fs::read(&file)
                .map_err(|e| user_error(format!("reading release file {}: {e}", file.display())))?;
            // The control plane checks this too; checked here first, a wrong
            // file is named and never uploaded.
            if bytes.is_empty() {
                return Err(user_error(format!(
                    "release file {} is empty",
                    file.display()
                )));
            }
            if !(bytes.starts_with(&[0x1f, 0x8b])
                || bytes.starts_with(b"\x7fELF")
                || bytes.starts_with(b"#!"))
            {
                return Err(user_error(format!(
                    "release file {}: neither a .tar.gz nor an executable (ELF binary or #! script)",
                    file.display()
                )));
            }
            let signature = match (&sign_key, &signature) {
                (Some(key), _) => Some(keys::sign(key, &bytes, &service, &version)?),
                (None, Some(path)) => Some(keys::read_signature(path, &service, &version)?),
                (None, None) => None,
            };
            let headers: Vec<_> = signature
                .as_deref()
                .map(keys::signature_header)
                .into_iter()
                .collect();
            let filename = file
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or(&service)
                .to_string();
            let path = format!(
                "/v1/releases/{service}/{version}?filename={}",
                urlencode(&filename)
            );
            let resp: PushResponse = api.post_bytes_with(&path, bytes, &headers).await?;
            let r = &resp.release;
            let signed = signed_by(r);
            if resp.created {
                let declares = r
                    .manifest
                    .as_ref()
                    .map(|m| format!(", declares {}", m.describe()))
                    .unwrap_or_default();
                crate::outln!(
                    "pushed {}@{} ({}, {} bytes, sha256 {}{declares}{signed})",
                    r.service,
                    r.version,
                    r.format,
                    r.size,
                    r.sha256
                );
            } else if resp.signature_added {
                crate::outln!(
                    "{}@{} was already pushed with the same content (sha256 {}){signed}: signature added",
                    r.service, r.version, r.sha256
                );
            } else {
                crate::outln!(
                    "{}@{} was already pushed with the same content (sha256 {}){signed}",
                    r.service,
                    r.version,
                    r.sha256
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ReleaseCommand::Sign {
            release,
            sign_key,
            file,
            signature,
        } => {
            let (service, version) = release.split_once('@').ok_or_else(|| {
                user_error(format!(
                    "release: {release:?} must be service@version, like api@2.0.0"
                ))
            })?;
            validate_service_name("release", service).map_err(|e| user_error(e.to_string()))?;
            parse_version("release", version).map_err(|e| user_error(e.to_string()))?;
            let signature = match (sign_key, file, signature) {
                (Some(key), Some(file), _) => {
                    let bytes = std::fs::read(&file).map_err(|e| {
                        user_error(format!("reading release file {}: {e}", file.display()))
                    })?;
                    // Signed only if these are the bytes agents will get.
                    let stored: Release = api
                        .get(&format!("/v1/releases/{service}/{version}"))
                        .await?;
                    let sha256 = format!("{:x}", Sha256::digest(&bytes));
                    if sha256 != stored.sha256 {
                        return Err(user_error(format!(
                            "--file {}: sha256 {sha256}, but {service}@{version} was pushed with sha256 {}: not signing other bytes",
                            file.display(),
                            stored.sha256
                        )));
                    }
                    keys::sign(&key, &bytes, service, version)?
                }
                (None, None, Some(path)) => keys::read_signature(&path, service, version)?,
                _ => unreachable!("clap requires --sign-key with --file, or --signature"),
            };
            let headers = [keys::signature_header(&signature)];
            let path = format!("/v1/releases/{service}/{version}/signatures");
            let resp: PushResponse = api.post_bytes_with(&path, Vec::new(), &headers).await?;
            let r = &resp.release;
            if resp.signature_added {
                crate::outln!(
                    "{}@{}: signature added{}",
                    r.service,
                    r.version,
                    signed_by(r)
                );
            } else {
                crate::outln!(
                    "{}@{}: already carries this signature{}",
                    r.service,
                    r.version,
                    signed_by(r)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ReleaseCommand::Delete { release, json } => {
            let (service, version) = release.split_once('@').ok_or_else(|| {
                user_error(format!(
                    "release: {release:?} must be service@version, like api@1.0.0"
                ))
            })?;
            validate_service_name("release", service).map_err(|e| user_error(e.to_string()))?;
            parse_version("release", version).map_err(|e| user_error(e.to_string()))?;
            let resp: DeleteReleaseResponse = api
                .delete(&format!("/v1/releases/{service}/{}", version.trim()))
                .await?;
            if json {
                print_json(&resp)?;
                return Ok(ExitCode::SUCCESS);
            }
            let r = &resp.release;
            let artifact = if resp.artifact_removed {
                "artifact removed".to_string()
            } else if resp.shared_with.is_empty() {
                "artifact left for the next sweep (see the server's log)".to_string()
            } else {
                format!("artifact kept for {}", resp.shared_with.join(", "))
            };
            crate::outln!(
                "deleted {}@{} (sha256 {}, {} bytes{}): {artifact}",
                r.service,
                r.version,
                r.sha256,
                r.size,
                match r.signatures.len() {
                    0 => String::new(),
                    1 => ", 1 signature".to_string(),
                    n => format!(", {n} signatures"),
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        ReleaseCommand::List { json } => {
            let releases: Vec<Release> = api.get("/v1/releases").await?;
            if json {
                print_json(&releases)?;
            } else {
                crate::out!("{}", render::releases(&releases));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A `--*-retention` value: a duration like 365d, or `forever` (`None`).
fn retention_flag(flag: &str, text: &str) -> anyhow::Result<Option<Duration>> {
    let text = text.trim();
    if text == "forever" {
        return Ok(None);
    }
    let ms = rollwave_core::parse_duration(flag, text).map_err(|_| {
        user_error(format!(
            "{flag}: {text:?} is not a duration like 365d, 12h or 30m, or forever"
        ))
    })?;
    if ms == 0 {
        return Err(user_error(format!(
            "{flag}: {text:?} would keep nothing: give a duration like 365d, or forever to keep everything"
        )));
    }
    Ok(Some(Duration::from_millis(ms)))
}

/// A `--max-*` value: a whole number from 1, or `unlimited` (`None`).
fn count_flag(flag: &str, text: &str) -> anyhow::Result<Option<usize>> {
    let text = text.trim();
    if text == "unlimited" {
        return Ok(None);
    }
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(Some(n)),
        _ => Err(user_error(format!(
            "{flag}: {text:?} is not a whole number from 1, or unlimited"
        ))),
    }
}

/// `, signed by key id A` (`key ids A, B` for several); empty if unsigned.
fn signed_by(r: &Release) -> String {
    match r.signatures.len() {
        0 => String::new(),
        1 => format!(", signed by key id {}", r.signers()),
        _ => format!(", signed by key ids {}", r.signers()),
    }
}

async fn rollout(api: ApiClient, cmd: RolloutCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RolloutCommand::Start(args) => {
            let (wait, json, yes) = (args.wait, args.json, args.yes);
            let spec = start_spec(&args)?;
            let mut plan_id = args.plan_id.clone();
            // A person at a terminal sees the plan before anything starts,
            // and what starts is that plan.
            let ask = !yes && !json && plan_id.is_none() && interactive();
            if ask {
                let resp: RolloutResponse = api
                    .post(
                        "/v1/plan",
                        &StartRollout {
                            spec: spec.clone(),
                            plan_id: None,
                        },
                    )
                    .await?;
                plan_id = resp.plan_id.clone();
                let nodes: Vec<NodeView> = api.get("/v1/nodes").await?;
                for r in &group(resp) {
                    crate::out!("{}", render::plan(r, &nodes));
                }
                if !confirm("Start this rollout?")? {
                    crate::outln!("nothing started");
                    return Ok(ExitCode::FAILURE);
                }
            }
            let resp: RolloutResponse = api
                .post("/v1/rollouts", &StartRollout { spec, plan_id })
                .await?;
            let started = group(resp);
            if !json {
                if yes || ask {
                    for r in &started {
                        crate::out!("{}{}", render::started(r), render::warnings(r));
                    }
                } else {
                    let nodes: Vec<NodeView> = api.get("/v1/nodes").await?;
                    for r in &started {
                        crate::out!("{}", render::plan(r, &nodes));
                    }
                    for r in &started {
                        crate::out!("{}", render::started(r));
                    }
                }
            }
            if wait {
                // In dependency order: each waits for the ones before it.
                let mut finished = Vec::with_capacity(started.len());
                for r in &started {
                    finished.push(follow(&api, r.id, !json, false).await?);
                }
                if json {
                    print_group_json(&finished)?;
                }
                let failed = finished.iter().find(|r| !r.fully_upgraded());
                return Ok(wait_code(failed.unwrap_or(&finished[0])));
            }
            if json {
                print_group_json(&started)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Status {
            id,
            watch,
            wait,
            json,
            nodes,
        } => {
            let id = match id {
                Some(id) => id,
                None => newest(&api).await?,
            };
            if watch || wait {
                let r = follow(&api, id, !json, watch && !wait).await?;
                if json {
                    print_json(&r)?;
                }
                return Ok(if wait {
                    wait_code(&r)
                } else {
                    ExitCode::SUCCESS
                });
            }
            // A large rollout is shown as counts and what is wrong, read
            // without its nodes; `--nodes` (or `--json`) lists every node.
            if !nodes && !json {
                let s: RolloutSummary = api.get(&format!("/v1/rollouts/{id}/summary")).await?;
                if s.nodes > render::LIST_NODES_UP_TO {
                    crate::out!("{}", render::summary(&s, now_ms()));
                    return Ok(ExitCode::SUCCESS);
                }
            }
            let resp: RolloutResponse = api.get(&format!("/v1/rollouts/{id}")).await?;
            if json {
                print_json(&resp.rollout)?;
            } else {
                crate::out!("{}", render::status(&resp.rollout, now_ms()));
            }
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::List { json, limit } => {
            let rollouts: Vec<RolloutSummary> =
                api.get(&format!("/v1/rollouts?limit={limit}")).await?;
            if json {
                print_json(&rollouts)?;
            } else {
                crate::out!("{}", render::rollouts(&rollouts));
            }
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Pause { id } => command(&api, id, "pause").await,
        RolloutCommand::Resume { id } => command(&api, id, "resume").await,
        RolloutCommand::Cancel { id } => command(&api, id, "cancel").await,
        RolloutCommand::History {
            service,
            limit,
            json,
        } => {
            validate_service_name("service", &service).map_err(|e| user_error(e.to_string()))?;
            let rollouts: Vec<RolloutSummary> = api
                .get(&format!("/v1/rollouts?service={service}&limit={limit}"))
                .await?;
            if json {
                print_json(&rollouts)?;
            } else if rollouts.is_empty() {
                crate::outln!("{service} has no rollouts");
            } else {
                crate::out!("{}", render::rollouts(&rollouts));
            }
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Rollback {
            id,
            wait,
            batch,
            all_at_once,
        } => {
            if let Some(b) = &batch {
                rollwave_core::Amount::parse("--batch", b)
                    .map_err(|e| user_error(e.to_string()))?;
            }
            let id = resolve(&api, id, Pick::Newest).await?;
            let body = rollwave_api::RollbackRequest { batch, all_at_once };
            let resp: RolloutResponse = api
                .post(&format!("/v1/rollouts/{id}/rollback"), &body)
                .await?;
            crate::outln!("rollout {id} is {}", resp.rollout.state.as_str());
            if !wait {
                return Ok(ExitCode::SUCCESS);
            }
            let r = follow(&api, id, true, false).await?;
            Ok(if r.state == RolloutState::RolledBack {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        RolloutCommand::Promote { id } => command(&api, id, "promote").await,
    }
}

/// The rollouts of one request, in dependency order.
fn group(resp: RolloutResponse) -> Vec<Rollout> {
    let mut all = vec![resp.rollout];
    all.extend(resp.dependents);
    all
}

/// One rollout as an object (as before multi-service requests); several as
/// an array.
/// Whether a person is at the command: stdin and stdout both terminals.
fn interactive() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// Asks `question` on the terminal; only "y" or "yes" is a yes.
fn confirm(question: &str) -> anyhow::Result<bool> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    write!(out, "{question} [y/N] ")?;
    out.flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

fn print_group_json(rollouts: &[Rollout]) -> anyhow::Result<()> {
    match rollouts {
        [one] => print_json(one),
        many => print_json(&many),
    }
}

async fn command(api: &ApiClient, id: Option<String>, verb: &str) -> anyhow::Result<ExitCode> {
    let id = resolve(api, id, Pick::Active).await?;
    let resp: RolloutResponse = api
        .post(&format!("/v1/rollouts/{id}/{verb}"), &serde_json::json!({}))
        .await?;
    crate::outln!("rollout {id} is {}", resp.rollout.state.as_str());
    Ok(ExitCode::SUCCESS)
}

/// Builds the rollout request from the file and the flags, and validates it
/// here so bad input fails before anything reaches the control plane.
fn start_spec(args: &StartArgs) -> anyhow::Result<RolloutFile> {
    let base = match &args.file {
        Some(path) => read_rollout_file(path)?,
        None => RolloutFile::default(),
    };
    let (service, version) = match &args.target {
        Some(t) => {
            let (s, v) = t.split_once('@').ok_or_else(|| {
                user_error(format!(
                    "target: {t:?} must be service@version, like api@2.0.0"
                ))
            })?;
            (Some(s.to_string()), Some(v.to_string()))
        }
        None => (None, None),
    };
    let waves = args.waves.as_ref().map(|list| {
        list.split(',')
            .map(|w| {
                let w = w.trim();
                match w.strip_suffix(":pause") {
                    Some(size) => WaveFile::Table {
                        size: size.into(),
                        pause: true,
                    },
                    None => WaveFile::Size(w.into()),
                }
            })
            .collect()
    });
    let flags = RolloutFile {
        service,
        version,
        selector: args.selector.clone(),
        nodes: args.nodes.clone(),
        services: None,
        downgrade: args.downgrade.then_some(true),
        hooks: None,
        strategy: StrategyFile {
            kind: if args.all_at_once {
                Some("all_at_once".to_string())
            } else {
                waves.as_ref().map(|_| "canary".to_string())
            },
            waves,
            min_healthy: args.min_healthy.as_deref().map(|m| match m.parse::<i64>() {
                Ok(n) => CountOrText::Count(n),
                Err(_) => m.into(),
            }),
            min_healthy_per: args.min_healthy_per.clone(),
            spread_by: args.spread_by.clone(),
            max_per_domain: args.max_per_domain,
            order_by: args.order_by.clone(),
            order: if args.leader_last {
                Some(OrderFile::Named("leader_last".into()))
            } else {
                args.order.clone().map(OrderFile::Values)
            },
            batch: args.batch.as_deref().map(Into::into),
            max_unavailable: args.max_unavailable.as_deref().map(Into::into),
            min_healthy_time: args.min_healthy_time.clone(),
            healthy_deadline: args.healthy_deadline.clone(),
            progress_deadline: args.progress_deadline.clone(),
            max_failures: args.max_failures,
            auto_rollback: args.no_auto_rollback.then_some(false),
            auto_finalize: args.auto_finalize.then_some(true),
        },
        analysis: None,
    };
    let file = base.merge(flags);
    let origin = args
        .file
        .as_ref()
        .map(|p| format!(" {}", p.display()))
        .unwrap_or_default();
    file.resolve_all()
        .map_err(|e| user_error(format!("invalid rollout spec{origin}: {e}")))?;
    Ok(file)
}

fn read_rollout_file(path: &Path) -> anyhow::Result<RolloutFile> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| user_error(format!("reading rollout spec {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().to_string();
        let at = e
            .span()
            .map(|s| {
                let line = text[..s.start].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        user_error(format!(
            "invalid rollout spec {}{at}: {msg}",
            path.display()
        ))
    })
}

/// For a service named instead of a rollout id: its active rollout, or
/// (to roll back one that ended) its newest.
#[derive(Clone, Copy, PartialEq)]
enum Pick {
    Active,
    Newest,
}

/// The rollout a steering command means: an id as given; a service's
/// active rollout (or newest, for `pick` Newest); without either, the one
/// rollout in progress, if there is exactly one.
async fn resolve(api: &ApiClient, given: Option<String>, pick: Pick) -> anyhow::Result<u64> {
    let given = given.map(|g| g.trim().to_string());
    if let Some(id) = given.as_deref().and_then(|g| g.parse::<u64>().ok()) {
        return Ok(id);
    }
    if let Some(service) = &given {
        validate_service_name("id", service).map_err(|_| {
            user_error(format!(
                "id: {service:?} is neither a rollout id nor a service name"
            ))
        })?;
        let active: Vec<RolloutSummary> = api
            .get(&format!("/v1/rollouts?service={service}&active=true"))
            .await?;
        match (active.as_slice(), pick) {
            ([one], _) => return Ok(one.id),
            ([], Pick::Newest) => {}
            ([], Pick::Active) => {
                return Err(user_error(format!("{service} has no rollout in progress")))
            }
            (several, _) => return Err(several_active(several)),
        }
        let newest: Vec<RolloutSummary> = api
            .get(&format!("/v1/rollouts?service={service}&limit=1"))
            .await?;
        return newest
            .first()
            .map(|r| r.id)
            .ok_or_else(|| user_error(format!("{service} has no rollouts")));
    }
    let active: Vec<RolloutSummary> = api.get("/v1/rollouts?active=true").await?;
    match active.as_slice() {
        [one] => Ok(one.id),
        [] => Err(user_error(
            "no rollout is in progress: name one by id or by service",
        )),
        several => Err(several_active(several)),
    }
}

fn several_active(rollouts: &[RolloutSummary]) -> anyhow::Error {
    let named: Vec<String> = rollouts
        .iter()
        .map(|r| format!("{} ({}@{})", r.id, r.service, r.version))
        .collect();
    user_error(format!(
        "{} rollouts are in progress: {}; name one by id",
        rollouts.len(),
        named.join(", ")
    ))
}

async fn newest(api: &ApiClient) -> anyhow::Result<u64> {
    let rollouts: Vec<RolloutSummary> = api.get("/v1/rollouts?limit=1").await?;
    rollouts
        .first()
        .map(|r| r.id)
        .ok_or_else(|| user_error("there are no rollouts yet"))
}

/// Prints a rollout's events (as text, or as JSON lines), and with `follow`
/// the new ones as they happen, until the rollout ends.
async fn logs(
    api: &ApiClient,
    id: u64,
    node: Option<&str>,
    follow: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut printed = 0;
    loop {
        let resp: RolloutResponse = api.get(&format!("/v1/rollouts/{id}")).await?;
        let r = resp.rollout;
        if let Some(n) = node {
            if printed == 0 && !r.nodes.contains_key(n) {
                return Err(user_error(format!(
                    "node: {n:?} is not part of rollout {id}"
                )));
            }
        }
        // Events are only ever appended: print what is new since last time.
        for e in r.events.iter().skip(printed) {
            if node.is_none() || e.node.is_none() || e.node.as_deref() == node {
                if json {
                    crate::outln!("{}", serde_json::to_string(e)?);
                } else {
                    crate::out!("{}", render::log_line(e));
                }
            }
        }
        printed = r.events.len();
        if !follow || r.settled() || crate::out::closed() {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How long `--wait` and `--watch` ride out a control plane they cannot
/// reach (a restart, a failover) before giving up: the rollout goes on
/// without them, so a brief outage must not fail a deploy script.
const FOLLOW_OUTAGE_LIMIT: Duration = Duration::from_secs(120);
/// One poll's limit, so that a control plane that accepts but never answers
/// counts as unreachable instead of hanging the wait.
const FOLLOW_POLL_TIMEOUT: Duration = Duration::from_secs(15);

/// A rollout this large is read whole no more often than [`FULL_EVERY`]
/// while it is followed: its summary, polled in between, costs a few
/// hundred bytes where the rollout costs megabytes.
const FOLLOW_WHOLE_UP_TO: usize = 500;
const FULL_EVERY: Duration = Duration::from_secs(2);

/// With `watch_only`, it also stops once nobody reads what it prints (its
/// output piped into `head`): watching is all it does.
pub async fn follow(
    api: &ApiClient,
    id: u64,
    show: bool,
    watch_only: bool,
) -> anyhow::Result<Rollout> {
    let mut view = render::Follower::new(show);
    let mut down_since: Option<std::time::Instant> = None;
    let path = format!("/v1/rollouts/{id}");
    let summary_path = format!("/v1/rollouts/{id}/summary");
    // What the last whole read showed, and when it was made.
    let mut seen: Option<(u64, usize)> = None;
    let mut read_at: Option<std::time::Instant> = None;
    loop {
        let poll = async {
            let s: RolloutSummary = api.get(&summary_path).await?;
            let settled = s.settled();
            let changed = seen != Some((s.generation, s.log_len));
            let due = s.nodes <= FOLLOW_WHOLE_UP_TO
                || settled
                || read_at.is_none_or(|at| at.elapsed() >= FULL_EVERY);
            if changed && due {
                let whole: RolloutResponse = api.get(&path).await?;
                Ok::<_, anyhow::Error>(Some(whole))
            } else {
                Ok(None)
            }
        };
        let got = tokio::time::timeout(FOLLOW_POLL_TIMEOUT, poll)
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "the control plane at {} did not answer within {FOLLOW_POLL_TIMEOUT:?}",
                    api.base()
                ))
            });
        let resp = match got {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                if down_since.take().is_some() {
                    eprintln!("following rollout {id}: the control plane answers again");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            // An answer that refuses (a 4xx) will not change by asking again.
            Err(e) if e.chain().any(|c| c.downcast_ref::<UserError>().is_some()) => {
                return Err(e.context(format!("following rollout {id}")));
            }
            Err(e) => {
                let since = *down_since.get_or_insert_with(|| {
                    eprintln!(
                        "following rollout {id}: {e:#}; retrying for up to {}",
                        format_duration(FOLLOW_OUTAGE_LIMIT.as_millis() as u64)
                    );
                    std::time::Instant::now()
                });
                if since.elapsed() >= FOLLOW_OUTAGE_LIMIT {
                    return Err(e.context(format!(
                        "following rollout {id}: gave up after {} without the control plane",
                        format_duration(FOLLOW_OUTAGE_LIMIT.as_millis() as u64)
                    )));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if down_since.take().is_some() {
            eprintln!("following rollout {id}: the control plane answers again");
        }
        let r = resp.rollout;
        seen = Some((r.generation, r.events.len()));
        read_at = Some(std::time::Instant::now());
        view.update(&r);
        // A completed rollout may keep converging nodes that were offline
        // for as long as they stay away: that is not worth waiting for.
        if r.settled() || (watch_only && crate::out::closed()) {
            view.finish(&r);
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn wait_code(r: &Rollout) -> ExitCode {
    if r.fully_upgraded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    crate::outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn open_store(
    etcd: &crate::cli::StoreArgs,
    url: rollwave_store::StoreUrl,
    flag: &str,
) -> anyhow::Result<std::sync::Arc<dyn rollwave_store::Store>> {
    rollwave_store::open(&etcd.config_for(url))
        .await
        .map_err(|e| user_error(format!("{flag}: {e}")))
}

/// A store that failed is the store's error; anything else is the
/// target's (not empty, a conflicting release).
fn copy_error(e: rollwave_store::copy::CopyError) -> anyhow::Error {
    match e {
        rollwave_store::copy::CopyError::Store(e) => anyhow::Error::new(e),
        e => user_error(format!("--to: {e}")),
    }
}

/// `flag` names the file: the backup's target, or the restore's source.
fn backup_error(e: rollwave_store::backup::BackupError, flag: &str) -> anyhow::Error {
    use rollwave_store::backup::BackupError;
    match e {
        BackupError::Copy(e) => copy_error(e),
        BackupError::Io(..) => anyhow::Error::new(e),
        e => user_error(format!("{flag}: {e}")),
    }
}
