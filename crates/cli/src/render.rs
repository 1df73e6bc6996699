//! Human-readable output: tables, rollout status, and live following.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rollwave_api::{NodeView, Release, ServiceSummary};
use rollwave_core::analysis::format_value;
use rollwave_core::{
    format_duration, AuditEntry, BackupInfo, Health, NodeState, Rollout, RolloutEvent,
    RolloutSummary, ServiceView, TokenView,
};

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn ago(now: u64, then: u64) -> String {
    let s = now.saturating_sub(then) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn table(rows: Vec<Vec<String>>) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn health(h: Health) -> &'static str {
    match h {
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
        Health::Starting => "starting",
        Health::Stopped => "stopped",
    }
}

/// What the service's role probe says: `leader`; with a failing probe the
/// last role it gave, marked stale, and why (`leader (stale: timed out
/// after 1s)`, `? (exit status 1: ...)`).
fn role(s: &ServiceView) -> String {
    let last = s.role.as_deref();
    match (&s.role_error, last) {
        (None, r) => r.unwrap_or("-").to_string(),
        (Some(e), Some(r)) => format!("{r} (stale: {e})"),
        (Some(e), None) => format!("? ({e})"),
    }
}

pub fn nodes(nodes: &[NodeView], now: u64) -> String {
    let mut rows = vec![vec![
        "NODE".into(),
        "STATUS".into(),
        "LAST SEEN".into(),
        "SERVICE".into(),
        "VERSION".into(),
        "HEALTH".into(),
        "ROLE".into(),
        "STAGED".into(),
        "CONVERGENCE".into(),
        "LABELS".into(),
    ]];
    for n in nodes {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let status = if n.online { "online" } else { "offline" };
        let seen = if n.online {
            "now".to_string()
        } else {
            ago(now, n.last_seen)
        };
        if n.services.is_empty() {
            rows.push(vec![
                n.name.clone(),
                status.into(),
                seen.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                labels.join(","),
            ]);
        }
        for (name, s) in &n.services {
            // A node left behind by a completed rollout, and whether it is
            // catching up now.
            let convergence = match (&s.desired, s.converging) {
                (Some(v), true) => format!("converging: {v}"),
                (Some(v), false) => format!("behind: {v}"),
                (None, _) => "-".into(),
            };
            rows.push(vec![
                n.name.clone(),
                status.into(),
                seen.clone(),
                name.clone(),
                s.version.clone().unwrap_or_else(|| "-".into()),
                if n.online {
                    health(s.health).into()
                } else {
                    "unknown".into()
                },
                role(s),
                if s.staged.is_empty() {
                    "-".into()
                } else {
                    s.staged.join(",")
                },
                convergence,
                labels.join(","),
            ]);
        }
    }
    table(rows)
}

/// One step of the execution log: when (UTC, to the millisecond), which
/// node (`-` for the rollout itself), what.
pub fn log_line(e: &RolloutEvent) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at);
    format!(
        "{}  {:<12} {}\n",
        humantime::format_rfc3339_millis(at),
        e.node.as_deref().unwrap_or("-"),
        e.message
    )
}

pub fn backups(backups: &[BackupInfo]) -> String {
    let mut rows = vec![vec![
        "TASK".into(),
        "TAKEN".into(),
        "FROM".into(),
        "TO".into(),
        "FILES".into(),
        "SIZE".into(),
    ]];
    for b in backups {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(b.taken_at);
        rows.push(vec![
            b.task.clone(),
            humantime::format_rfc3339_seconds(at).to_string(),
            b.from_version.clone().unwrap_or_else(|| "-".into()),
            b.to_version.clone().unwrap_or_else(|| "-".into()),
            b.file_count.to_string(),
            rollwave_core::format_bytes(b.bytes),
        ]);
    }
    table(rows)
}

/// What `certs init` wrote and where each file goes.
pub fn certs(made: &rollwave_tls::certs::Generated) -> String {
    let files = [
        (
            &made.ca_cert,
            "the CA: ca_file in agent.toml, --ca-file for the CLI",
        ),
        (&made.ca_key, "the CA's key (0600): keep it private"),
        (&made.server_cert, "rollwave server --tls-cert"),
        (&made.server_key, "rollwave server --tls-key (0600)"),
    ];
    let width = files
        .iter()
        .map(|(p, _)| p.display().to_string().len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (path, role) in files {
        let path = path.display().to_string();
        let _ = writeln!(out, "created {path:<width$}  {role}");
    }
    let _ = writeln!(
        out,
        "server certificate for {}, valid until {}",
        made.names.join(", "),
        made.not_after.date()
    );
    let _ = writeln!(out, "pin: {}", made.pin);
    out
}

pub fn audit(entries: &[AuditEntry]) -> String {
    let mut rows = vec![vec![
        "AT".into(),
        "ACTOR".into(),
        "ACTION".into(),
        "TARGET".into(),
        "RESULT".into(),
    ]];
    for e in entries {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at);
        let result = match (e.ok, e.detail.is_empty()) {
            (true, true) => "ok".to_string(),
            (true, false) => format!("ok: {}", e.detail),
            (false, _) => format!("refused ({}): {}", e.status, e.detail),
        };
        rows.push(vec![
            humantime::format_rfc3339_seconds(at).to_string(),
            e.actor.clone(),
            e.action.clone(),
            if e.target.is_empty() {
                "-".into()
            } else {
                e.target.clone()
            },
            result,
        ]);
    }
    table(rows)
}

/// How long from `now` to `then`, like `3h 5m` (`0s` if past).
pub fn duration_until(now: u64, then: u64) -> String {
    format_duration(then.saturating_sub(now) / 1000 * 1000)
}

pub fn tokens(tokens: &[TokenView], now: u64) -> String {
    let mut rows = vec![vec![
        "NAME".into(),
        "ROLE".into(),
        "ID".into(),
        "NODE".into(),
        "CREATED".into(),
        "BY".into(),
        "STATE".into(),
    ]];
    for t in tokens {
        let state = match (t.revoked_at, t.expires_at, t.uses_left) {
            (Some(_), _, _) => "revoked".to_string(),
            (None, Some(at), _) if at <= now => "expired".to_string(),
            (None, _, Some(0)) => "used".to_string(),
            (None, expires, uses) => {
                let mut s = "live".to_string();
                if let Some(at) = expires {
                    s.push_str(&format!(", expires in {}", duration_until(now, at)));
                }
                if let Some(n) = uses {
                    s.push_str(&format!(", {n} use{} left", if n == 1 { "" } else { "s" }));
                }
                s
            }
        };
        rows.push(vec![
            t.name.clone(),
            t.role.to_string(),
            t.id.clone(),
            t.node.clone().unwrap_or_else(|| "-".into()),
            ago(now, t.created_at),
            t.created_by.clone(),
            state,
        ]);
    }
    table(rows)
}

pub fn services(services: &[ServiceSummary]) -> String {
    let mut rows = vec![vec![
        "SERVICE".into(),
        "ACTIVE".into(),
        "SET BY".into(),
        "RUNNING".into(),
    ]];
    for s in services {
        let running: Vec<String> = s
            .running
            .iter()
            .map(|(v, n)| format!("{v} on {n}"))
            .collect();
        rows.push(vec![
            s.service.clone(),
            s.active.as_ref().map_or("-".into(), |a| a.version.clone()),
            s.active.as_ref().map_or("-".into(), |a| a.by.clone()),
            if running.is_empty() {
                "-".into()
            } else {
                running.join(", ")
            },
        ]);
    }
    table(rows)
}

pub fn releases(releases: &[Release]) -> String {
    let mut rows = vec![vec![
        "SERVICE".into(),
        "VERSION".into(),
        "FORMAT".into(),
        "SIZE".into(),
        "DECLARES".into(),
        "SIGNED".into(),
        "SHA256".into(),
    ]];
    for r in releases {
        let declares = r
            .manifest
            .as_ref()
            .map(|m| m.describe())
            .unwrap_or_default();
        rows.push(vec![
            r.service.clone(),
            r.version.clone(),
            r.format.to_string(),
            r.size.to_string(),
            if declares.is_empty() {
                "-".into()
            } else {
                declares
            },
            r.signers(),
            r.sha256.clone(),
        ]);
    }
    table(rows)
}

fn from_versions(r: &Rollout) -> String {
    let mut v: Vec<String> = r
        .nodes
        .values()
        .map(|n| n.from_version.clone().unwrap_or_else(|| "none".into()))
        .collect();
    v.sort();
    v.dedup();
    v.join(",")
}

pub fn rollouts(rollouts: &[RolloutSummary]) -> String {
    let mut rows = vec![vec![
        "ID".into(),
        "SERVICE".into(),
        "VERSION".into(),
        "STATE".into(),
        "PROGRESS".into(),
        "PROBLEMS".into(),
        "DURATION".into(),
    ]];
    for r in rollouts {
        let end = r.finished_at.unwrap_or(r.updated_at);
        rows.push(vec![
            r.id.to_string(),
            r.service.clone(),
            r.version.clone(),
            r.state.as_str().into(),
            format!(
                "{}/{}",
                r.counts.get(NodeState::Upgraded.as_str()).unwrap_or(&0),
                r.nodes
            ),
            r.problems_total.to_string(),
            format_duration(end.saturating_sub(r.created_at) / 1000 * 1000),
        ]);
    }
    table(rows)
}

/// Up to this many nodes, `rollout status` lists every node; above, it
/// shows counts and the nodes with a problem (`--nodes` lists them all).
pub const LIST_NODES_UP_TO: usize = 50;

/// A rollout too large to list node by node: its counts and what is wrong.
pub fn summary(s: &RolloutSummary, now: u64) -> String {
    let end = s.finished_at.unwrap_or(now);
    let mut out = format!(
        "rollout {}: {} -> {}  {}  ({} elapsed)\n",
        s.id,
        s.service,
        s.version,
        s.state.as_str(),
        format_duration(end.saturating_sub(s.created_at) / 1000 * 1000)
    );
    let counts = s
        .counts
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(out, "  nodes: {} in {} waves: {counts}", s.nodes, s.waves);
    if let Some(reason) = &s.reason {
        let _ = writeln!(out, "  reason: {reason}");
    }
    if let Some(w) = &s.waiting {
        let _ = writeln!(out, "  waiting: {w}");
    }
    if s.problems_total > 0 {
        let _ = writeln!(out, "  problems ({}):", s.problems_total);
        for p in &s.problems {
            let _ = writeln!(
                out,
                "    {}  {}  {}",
                p.node,
                p.state.as_str(),
                p.reason.as_deref().unwrap_or("-")
            );
        }
        if s.problems_total > s.problems.len() {
            let _ = writeln!(
                out,
                "    ... and {} more: rollwave rollout status {} --nodes",
                s.problems_total - s.problems.len(),
                s.id
            );
        }
    }
    let _ = writeln!(
        out,
        "  every node: rollwave rollout status {} --nodes",
        s.id
    );
    out
}

pub fn started(r: &Rollout) -> String {
    format!(
        "rollout {} started: {} {} -> {} on {} nodes in {} waves{}\n",
        r.id,
        r.spec.service,
        from_versions(r),
        r.spec.version,
        r.nodes.len(),
        r.batches.len(),
        after(r)
    )
}

/// When a rollout of a multi-service request begins, if it waits.
fn after(r: &Rollout) -> String {
    if r.spec.depends_on.is_empty() {
        return String::new();
    }
    format!(
        ", once {} completed (depends_on)",
        r.spec.depends_on.join(" and ")
    )
}

/// Nodes already down when the rollout was planned, one warning line each.
pub fn warnings(r: &Rollout) -> String {
    r.events
        .iter()
        .filter_map(|e| {
            if e.message.starts_with("already unavailable") {
                Some(format!("  warning: {}\n", e.message))
            } else if e.message.starts_with("bootstrap:") {
                // Why the plan is one wave when batches were asked for.
                Some(format!("  {}\n", e.message))
            } else {
                None
            }
        })
        .collect()
}

pub fn status(r: &Rollout, now: u64) -> String {
    let end = r.finished_at.unwrap_or(now);
    let mut out = format!(
        "rollout {}: {} {} -> {}  {}  ({} elapsed)\n",
        r.id,
        r.spec.service,
        from_versions(r),
        r.spec.version,
        r.state.as_str(),
        format_duration(end.saturating_sub(r.created_at) / 1000 * 1000)
    );
    let _ = writeln!(out, "  nodes: {}", counts(r, r.nodes.keys()));
    if let Some(reason) = &r.reason {
        let _ = writeln!(out, "  reason: {reason}");
    }
    if let Some(w) = &r.waiting {
        let _ = writeln!(out, "  waiting: {w}");
    }
    out.push_str(&analysis_runs(r));
    let mut rows = vec![vec![
        "  BATCH".into(),
        "NODE".into(),
        "STATE".into(),
        "FROM".into(),
        "AT".into(),
        "DETAIL".into(),
    ]];
    for (i, b) in r.batches.iter().enumerate() {
        for name in b {
            let n = &r.nodes[name];
            let detail = n
                .reason
                .clone()
                .or_else(|| n.phase.clone())
                .unwrap_or_default();
            rows.push(vec![
                format!("  {}", i + 1),
                name.clone(),
                n.state.as_str().into(),
                n.from_version.clone().unwrap_or_else(|| "-".into()),
                if n.state == NodeState::Pending {
                    "-".into()
                } else {
                    format!("+{}", secs(n.updated_at.saturating_sub(r.created_at)))
                },
                detail,
            ]);
        }
    }
    out.push_str(&table(rows));
    out
}

/// Each analysis run: its wave, its state and every measurement.
fn analysis_runs(r: &Rollout) -> String {
    let mut out = String::new();
    for run in &r.analysis {
        let Some(a) = r.spec.analysis.iter().find(|a| a.name == run.name) else {
            continue;
        };
        let values: Vec<String> = run
            .measurements
            .iter()
            .map(|m| match m.value {
                Some(v) => format!("{} {}", format_value(v), m.verdict.as_str()),
                None => m.verdict.as_str().to_string(),
            })
            .collect();
        let _ = writeln!(
            out,
            "  analysis {} wave {}: {}, {} of {} measurements ({}){}",
            run.name,
            run.wave + 1,
            run.state.as_str(),
            run.taken(),
            a.count,
            a.success,
            if values.is_empty() {
                String::new()
            } else {
                format!(": {}", values.join(", "))
            }
        );
        if let Some(last) = run.measurements.last().filter(|m| m.value.is_none()) {
            if let Some(d) = &last.detail {
                let _ = writeln!(out, "    last: {d}");
            }
        }
    }
    out
}

/// Prints a rollout's events as they appear. On a terminal, progress bars
/// below them: one for the whole rollout (with node counts by state and what
/// it waits for) and one per wave; elsewhere, a plain line each time those
/// counts or the wait change.
pub struct Follower {
    show: bool,
    printed: usize,
    bars: Option<Bars>,
    last_line: String,
}

struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    waves: Vec<ProgressBar>,
}

/// Waves shown as bars; a rollout with more shows the first ones and sums
/// the rest in one bar.
const MAX_WAVE_BARS: usize = 8;

impl Follower {
    pub fn new(show: bool) -> Self {
        Follower {
            show,
            printed: 0,
            bars: None,
            last_line: String::new(),
        }
    }

    fn line(&self, s: String) {
        match &self.bars {
            Some(b) => {
                let _ = b.multi.println(s);
            }
            None => crate::outln!("{s}"),
        }
    }

    pub fn update(&mut self, r: &Rollout) {
        if !self.show {
            return;
        }
        if self.bars.is_none() && std::io::stdout().is_terminal() {
            self.bars = Some(Bars::new(r));
        }
        for e in &r.events[self.printed.min(r.events.len())..] {
            let at = secs(e.at.saturating_sub(r.created_at));
            let who = e.node.as_deref().unwrap_or("rollout");
            self.line(format!("[{at:>7}] {who}: {}", e.message));
        }
        self.printed = r.events.len();
        let summary = progress_line(r);
        match &self.bars {
            Some(b) => b.update(r, &summary),
            None if summary != self.last_line => {
                crate::outln!("progress: {summary}");
            }
            None => {}
        }
        self.last_line = summary;
    }

    pub fn finish(&mut self, r: &Rollout) {
        if let Some(b) = self.bars.take() {
            b.overall.finish_and_clear();
            for w in &b.waves {
                w.finish_and_clear();
            }
            let _ = b.multi.clear();
        }
        if self.show {
            crate::out!("{}", status(r, r.finished_at.unwrap_or(r.updated_at)));
        }
    }
}

impl Bars {
    fn new(r: &Rollout) -> Bars {
        let multi = MultiProgress::new();
        let style = |template: &str| {
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ")
        };
        let overall = multi.add(ProgressBar::new(r.nodes.len() as u64));
        overall.set_style(style("{spinner} overall [{bar:30}] {pos}/{len}  {msg}"));
        overall.enable_steady_tick(std::time::Duration::from_millis(120));
        let shown = r.batches.len().min(MAX_WAVE_BARS);
        let waves = (0..shown)
            .map(|_| {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(style("  {prefix:<9} [{bar:30}] {pos}/{len}  {msg}"));
                bar
            })
            .collect();
        Bars {
            multi,
            overall,
            waves,
        }
    }

    fn update(&self, r: &Rollout, summary: &str) {
        self.overall
            .set_position(finished(r, r.nodes.keys()) as u64);
        self.overall.set_message(summary.to_string());
        let last = self.waves.len().saturating_sub(1);
        for (i, bar) in self.waves.iter().enumerate() {
            // The last bar stands for every wave from it on.
            let nodes: Vec<&String> = if i == last && r.batches.len() > self.waves.len() {
                r.batches[i..].iter().flatten().collect()
            } else {
                r.batches
                    .get(i)
                    .map(|b| b.iter().collect())
                    .unwrap_or_default()
            };
            bar.set_prefix(if i == last && r.batches.len() > self.waves.len() {
                format!("waves {}+", i + 1)
            } else {
                format!("wave {}", i + 1)
            });
            bar.set_length(nodes.len() as u64);
            bar.set_position(finished(r, nodes.iter().copied()) as u64);
            bar.set_message(counts(r, nodes.iter().copied()));
        }
    }
}

/// Nodes whose part is over: not pending, nothing in flight.
fn finished<'a>(r: &Rollout, nodes: impl Iterator<Item = &'a String>) -> usize {
    nodes
        .filter(|n| {
            r.nodes
                .get(*n)
                .is_some_and(|p| p.state != NodeState::Pending && !p.state.in_flight())
        })
        .count()
}

/// `2 pending, 3 upgraded, 1 upgrading`: node counts by state.
fn counts<'a>(r: &Rollout, nodes: impl Iterator<Item = &'a String>) -> String {
    let mut by: BTreeMap<&'static str, usize> = BTreeMap::new();
    for n in nodes {
        if let Some(p) = r.nodes.get(n) {
            *by.entry(p.state.as_str()).or_default() += 1;
        }
    }
    by.into_iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line: the rollout's state, node counts and what it waits for.
pub fn progress_line(r: &Rollout) -> String {
    let mut line = format!(
        "{} {}/{} done: {}",
        r.state.as_str(),
        finished(r, r.nodes.keys()),
        r.nodes.len(),
        counts(r, r.nodes.keys())
    );
    if let Some(w) = &r.waiting {
        let _ = write!(line, "; {w}");
    }
    line
}

/// Assumed time from a switch command to the new version's first passing
/// check, for estimates (the health gate's `min_healthy_time` comes on top).
const SWITCH_ESTIMATE_MS: u64 = 2_000;

/// A rollout's plan: its waves with each node's labels, the constraints that
/// shaped them, and an estimate of how long it takes.
pub fn plan(r: &Rollout, fleet: &[NodeView]) -> String {
    let labels = |name: &str| {
        fleet
            .iter()
            .find(|n| n.name == name)
            .map(|n| {
                n.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    let s = &r.spec;
    let mut out = format!(
        "plan: {} {} -> {} on {} nodes in {} waves\n",
        s.service,
        from_versions(r),
        s.version,
        r.nodes.len(),
        r.batches.len()
    );
    let mut rows = vec![vec!["  WAVE".into(), "NODE".into(), "LABELS".into()]];
    for (i, b) in r.batches.iter().enumerate() {
        for (j, name) in b.iter().enumerate() {
            let wave = if j == 0 {
                format!("  {}", i + 1)
            } else {
                "  ".into()
            };
            rows.push(vec![wave, name.clone(), labels(name)]);
        }
        let (width, why) = wave_width(r, fleet, b);
        if width < b.len() {
            rows.push(vec![
                "  ".into(),
                format!("({} at a time: {why})", width),
                String::new(),
            ]);
        }
        if r.pauses.get(i) == Some(&true) {
            rows.push(vec![
                "  ".into(),
                "(then waits for `rollwave rollout promote`)".into(),
                String::new(),
            ]);
        }
    }
    out.push_str(&table(rows));
    let budget = s.unavailable_budget(r.nodes.len());
    let mut constraints = vec![if s.all_at_once {
        format!(
            "all at once: every node stages {} first, then all switch together; one failure switches all back",
            s.version
        )
    } else if s.waves.is_empty() {
        format!("batches of {}", s.batch)
    } else {
        let waves: Vec<String> = s
            .waves
            .iter()
            .map(|w| format!("{}{}", w.size, if w.pause { " (pause)" } else { "" }))
            .collect();
        format!("canary waves {}", waves.join(", "))
    }];
    constraints.push(format!(
        "max_unavailable {} ({budget} of {} nodes)",
        s.max_unavailable,
        r.nodes.len()
    ));
    if !s.min_healthy.is_none() {
        constraints.push(match &s.min_healthy_per {
            None => format!("min_healthy {} fleet-wide", s.min_healthy),
            Some(label) => format!("min_healthy {} in each value of {label}", s.min_healthy),
        });
    }
    if s.leader_last {
        constraints.push(
            "leader last: the node whose role probe says leader goes after the others of its group"
                .into(),
        );
    }
    if let Some(sp) = &s.spread {
        constraints.push(format!(
            "spread_by {}: at most {} per value at once",
            sp.label, sp.max_per_domain
        ));
    }
    if let Some(o) = &s.order {
        let first = if o.values.is_empty() {
            String::new()
        } else {
            format!(": {} first", o.values.join(", "))
        };
        constraints.push(format!("order_by {}{first}", o.label));
    }
    let _ = writeln!(out, "  constraints: {}", constraints.join("; "));
    if !s.selector.is_empty() || !s.nodes.is_empty() {
        let _ = writeln!(
            out,
            "  selected by: {}{}",
            s.selector,
            if s.nodes.is_empty() {
                String::new()
            } else {
                format!(" nodes {}", s.nodes.join(","))
            }
        );
    }
    if !r.left_out.is_empty() {
        let _ = writeln!(out, "  left out: {}", r.left_out.join(", "));
    }
    if !s.depends_on.is_empty() {
        let _ = writeln!(
            out,
            "  starts after: {} (depends_on)",
            s.depends_on.join(", ")
        );
    }
    for a in &s.analysis {
        let _ = writeln!(
            out,
            "  analysis {}: each wave waits for {} measurements {} apart passing {} (failure_limit {}, inconclusive_limit {} then {}, consecutive_error_limit {})\n    query: {}\n    prometheus: {}",
            a.name,
            a.count,
            format_duration(a.interval),
            a.success,
            a.failure_limit,
            a.inconclusive_limit,
            match a.on_inconclusive {
                rollwave_core::OnInconclusive::Fail => "fail",
                rollwave_core::OnInconclusive::Pause => "pause",
            },
            a.consecutive_error_limit,
            a.query,
            a.prometheus
        );
    }
    out.push_str(&warnings(r));
    // Each wave runs in rounds of at most `budget` nodes (fewer with a spread
    // limit); a round is a switch plus the health gate.
    let per_round = SWITCH_ESTIMATE_MS + s.min_healthy_time;
    let mut total = 0;
    for b in &r.batches {
        let (width, _) = wave_width(r, fleet, b);
        // A wave also lasts until its analyses have measured, from its
        // first switch.
        let measured = s
            .analysis
            .iter()
            .map(|a| SWITCH_ESTIMATE_MS + u64::from(a.count) * a.interval)
            .max()
            .unwrap_or(0);
        total += (b.len().div_ceil(width) as u64 * per_round).max(measured);
    }
    let _ = writeln!(
        out,
        "  estimated duration: about {} (each round: ~{} to switch + min_healthy_time {}{})",
        format_duration(total / 1000 * 1000),
        format_duration(SWITCH_ESTIMATE_MS),
        format_duration(s.min_healthy_time),
        if r.pauses.contains(&true) {
            "; waits for promotion not counted"
        } else {
            ""
        }
    );
    out
}

/// How many nodes of wave `b` can be switched at once, and what limits it
/// below the wave's size: `max_unavailable`, the spread limit, or the
/// quorum floor (`min_healthy` among the healthy nodes running the service
/// fleet-wide), as the planner will apply them.
fn wave_width(r: &Rollout, fleet: &[NodeView], b: &[String]) -> (usize, String) {
    let s = &r.spec;
    if s.all_at_once {
        return (b.len().max(1), String::new());
    }
    let budget = s.unavailable_budget(r.nodes.len());
    let mut width = (budget, format!("max_unavailable {}", s.max_unavailable));
    if let Some(sp) = &s.spread {
        let mut domains: Vec<String> = b
            .iter()
            .map(|n| {
                fleet
                    .iter()
                    .find(|v| &v.name == n)
                    .and_then(|v| v.labels.get(&sp.label).cloned())
                    .unwrap_or_default()
            })
            .collect();
        domains.sort();
        domains.dedup();
        let spread = domains.len() * sp.max_per_domain as usize;
        if spread < width.0 {
            width = (
                spread,
                format!("spread_by {}, {} per value", sp.label, sp.max_per_domain),
            );
        }
    }
    if !s.min_healthy.is_none() {
        // Per quorum group the wave touches: the healthy nodes above the
        // group's floor may go at once, summed over those groups.
        let group = |v: &NodeView| {
            s.min_healthy_per.as_ref().map_or(String::new(), |l| {
                v.labels.get(l).cloned().unwrap_or_default()
            })
        };
        let mut groups: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
        for v in fleet.iter().filter(|v| v.services.contains_key(&s.service)) {
            let g = groups.entry(group(v)).or_default();
            g.0 += 1;
            if v.available(&s.service) {
                g.1 += 1;
            }
        }
        for v in fleet.iter().filter(|v| b.contains(&v.name)) {
            if let Some(g) = groups.get_mut(&group(v)) {
                g.2 += 1;
            }
        }
        let touched: Vec<(&String, &(usize, usize, usize))> =
            groups.iter().filter(|(_, g)| g.2 > 0).collect();
        let room: usize = touched
            .iter()
            .map(|(_, (members, healthy, in_wave))| {
                healthy
                    .saturating_sub(s.min_healthy.of(*members))
                    .min(*in_wave)
            })
            .sum();
        if room < width.0 {
            let why = match (&s.min_healthy_per, touched.as_slice()) {
                (None, [(_, (members, healthy, _))]) => format!(
                    "min_healthy {} of {healthy} healthy nodes running {}",
                    floor_text(s.min_healthy, *members),
                    s.service
                ),
                (Some(label), touched) => {
                    let each: Vec<String> = touched
                        .iter()
                        .map(|(g, (members, healthy, _))| {
                            format!(
                                "{label}={g}: {} of {healthy} healthy",
                                floor_text(s.min_healthy, *members)
                            )
                        })
                        .collect();
                    format!("min_healthy per {label}, {}", each.join(", "))
                }
                _ => format!("min_healthy {}", s.min_healthy),
            };
            width = (room, why);
        }
    }
    (width.0.max(1), width.1)
}

/// A floor as written and, unless a count, as it resolves for a group of
/// `members`: "2", "majority (2)".
fn floor_text(f: rollwave_core::Floor, members: usize) -> String {
    match f {
        rollwave_core::Floor::Count(n) => n.to_string(),
        f => format!("{f} ({})", f.of(members)),
    }
}

/// What a store copy, backup or restore wrote: "3 nodes, 1 token, ...".
pub fn copied(done: &rollwave_store::copy::Copied) -> String {
    let there = |(new, old): (usize, usize), what: &str| match old {
        0 => count(new, what),
        old => format!("{} ({old} there already)", count(new, what)),
    };
    [
        count(done.nodes, "node"),
        count(done.tokens, "token"),
        there(done.releases, "release"),
        count(done.active_versions, "active version"),
        there(done.rollouts, "rollout"),
        there(done.audit, "audit entry"),
    ]
    .join(", ")
}

/// "1 node", "3 nodes", "2 audit entries".
fn count(n: usize, what: &str) -> String {
    match (n, what.strip_suffix('y')) {
        (1, _) => format!("1 {what}"),
        (n, Some(stem)) => format!("{n} {stem}ies"),
        (n, None) => format!("{n} {what}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_shows_with_why_it_may_be_stale() {
        let view = |role: Option<&str>, error: Option<&str>| ServiceView {
            role: role.map(str::to_string),
            role_error: error.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(role(&view(None, None)), "-");
        assert_eq!(role(&view(Some("leader"), None)), "leader");
        assert_eq!(
            role(&view(Some("leader"), Some("timed out after 1s"))),
            "leader (stale: timed out after 1s)"
        );
        assert_eq!(
            role(&view(None, Some("exit status 1"))),
            "? (exit status 1)"
        );
    }
}
