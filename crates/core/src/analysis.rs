//! Analysis gates: PromQL queries a rollout runs against Prometheus while
//! each wave settles, in the manner of Argo Rollouts' AnalysisTemplate.
//!
//! Everything here is pure. The spec (`[[analysis]]`), the condition
//! language (`result < 0.01 && result >= 0`), how a Prometheus answer becomes
//! a measurement, and how measurements add up to a verdict are decided
//! here; the control plane only sends the queries and hands the answers to
//! [`crate::Rollout::record_measurement`], and the planner asks
//! [`holds`] and [`failure`] before it moves on.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{format_duration, parse_duration, Rollout, RolloutState, Span, SpecError, Timestamp};

/// One `[[analysis]]` as written: every field optional and unparsed, so
/// that [`resolve`] can name the one that is wrong.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AnalysisFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The Prometheus to ask, e.g. `http://127.0.0.1:9090`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<String>,
    /// A PromQL query whose instant result is a single number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Time between measurements (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Measurements per wave (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// When a measurement passes, e.g. `result < 0.01`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inconclusive_limit: Option<u32>,
    /// `fail` (the default) or `pause`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_inconclusive: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_error_limit: Option<u32>,
}

/// A validated analysis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Analysis {
    pub name: String,
    /// Base URL, without a trailing `/`.
    pub prometheus: String,
    pub query: String,
    /// Milliseconds between measurements.
    #[schema(value_type = u64)]
    pub interval: Span,
    /// Measurements (answers that are not errors) each wave needs.
    pub count: u32,
    /// The condition as written; it parsed when the spec was resolved.
    pub success: String,
    /// Failed measurements tolerated; one more fails the analysis.
    pub failure_limit: u32,
    /// Inconclusive measurements tolerated.
    pub inconclusive_limit: u32,
    pub on_inconclusive: OnInconclusive,
    /// Query errors in a row tolerated; one more fails the analysis.
    pub consecutive_error_limit: u32,
}

/// What happens once more measurements were inconclusive than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnInconclusive {
    /// The analysis fails, and with it the rollout.
    Fail,
    /// The rollout pauses; `resume` accepts the analysis, `cancel` or
    /// `rollback` does not.
    Pause,
}

pub const DEFAULT_INTERVAL: Span = 10_000;
pub const MIN_INTERVAL: Span = 1_000;
pub const DEFAULT_COUNT: u32 = 3;
pub const MAX_COUNT: u32 = 100;
/// Argo Rollouts' default: a Prometheus restart does not fail a rollout.
pub const DEFAULT_CONSECUTIVE_ERROR_LIMIT: u32 = 4;
/// Analyses per rollout: each one is a query per wave per interval.
pub const MAX_ANALYSES: usize = 20;
const MAX_QUERY_BYTES: usize = 8 * 1024;

/// Validates the `[[analysis]]` entries; errors name `analysis[i].field`.
/// `progress_deadline` bounds the interval: a wave waiting longer than it
/// for its next measurement would fail for lack of progress.
pub fn resolve(
    files: &[AnalysisFile],
    progress_deadline: Span,
) -> Result<Vec<Analysis>, SpecError> {
    if files.len() > MAX_ANALYSES {
        return Err(SpecError::new(
            "analysis",
            format!("{} analyses is more than {MAX_ANALYSES}", files.len()),
        ));
    }
    let mut out: Vec<Analysis> = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let field = |name: &str| format!("analysis[{i}].{name}");
        let name = f
            .name
            .as_deref()
            .ok_or_else(|| SpecError::new(field("name"), "is required"))?;
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !ok {
            return Err(SpecError::new(
                field("name"),
                format!("{name:?} is not an analysis name (1-64 characters of a-z, 0-9, '-', '_')"),
            ));
        }
        if out.iter().any(|a| a.name == name) {
            return Err(SpecError::new(
                field("name"),
                format!("{name:?} is used by an earlier analysis"),
            ));
        }
        let prometheus = f.prometheus.as_deref().ok_or_else(|| {
            SpecError::new(
                field("prometheus"),
                "is required, e.g. \"http://127.0.0.1:9090\"",
            )
        })?;
        let prometheus = prometheus_url(&field("prometheus"), prometheus)?;
        let query = f
            .query
            .as_deref()
            .map(str::trim)
            .ok_or_else(|| SpecError::new(field("query"), "is required"))?;
        if query.is_empty() {
            return Err(SpecError::new(field("query"), "is empty"));
        }
        if query.len() > MAX_QUERY_BYTES {
            return Err(SpecError::new(
                field("query"),
                format!("{} bytes is longer than {MAX_QUERY_BYTES}", query.len()),
            ));
        }
        let interval = match &f.interval {
            Some(s) => parse_duration(&field("interval"), s)?,
            None => DEFAULT_INTERVAL,
        };
        if interval < MIN_INTERVAL {
            return Err(SpecError::new(
                field("interval"),
                format!(
                    "{} is shorter than {}: Prometheus scrapes every few seconds at best",
                    format_duration(interval),
                    format_duration(MIN_INTERVAL)
                ),
            ));
        }
        if interval >= progress_deadline {
            return Err(SpecError::new(
                field("interval"),
                format!(
                    "{} must be shorter than strategy.progress_deadline ({}): a wave waits for its measurements",
                    format_duration(interval),
                    format_duration(progress_deadline)
                ),
            ));
        }
        let count = f.count.unwrap_or(DEFAULT_COUNT);
        if !(1..=MAX_COUNT).contains(&count) {
            return Err(SpecError::new(
                field("count"),
                format!("{count} is not between 1 and {MAX_COUNT}"),
            ));
        }
        let success = f.success.as_deref().ok_or_else(|| {
            SpecError::new(field("success"), "is required, e.g. \"result < 0.01\"")
        })?;
        Condition::parse(&field("success"), success)?;
        let on_inconclusive = match f.on_inconclusive.as_deref() {
            None | Some("fail") => OnInconclusive::Fail,
            Some("pause") => OnInconclusive::Pause,
            Some(other) => {
                return Err(SpecError::new(
                    field("on_inconclusive"),
                    format!("{other:?} is not \"fail\" or \"pause\""),
                ))
            }
        };
        out.push(Analysis {
            name: name.to_string(),
            prometheus,
            query: query.to_string(),
            interval,
            count,
            success: success.trim().to_string(),
            failure_limit: f.failure_limit.unwrap_or(0),
            inconclusive_limit: f.inconclusive_limit.unwrap_or(0),
            on_inconclusive,
            consecutive_error_limit: f
                .consecutive_error_limit
                .unwrap_or(DEFAULT_CONSECUTIVE_ERROR_LIMIT),
        });
    }
    Ok(out)
}

/// An `http(s)://host[:port][/path]` base URL, without a trailing `/`.
fn prometheus_url(field: &str, s: &str) -> Result<String, SpecError> {
    let s = s.trim();
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
    match host {
        Some(h) if !h.is_empty() && !h.contains(char::is_whitespace) && !s.contains(['?', '#']) => {
            Ok(s.trim_end_matches('/').to_string())
        }
        _ => Err(SpecError::new(
            field,
            format!("{s:?} is not an http(s) URL of a Prometheus, like \"http://127.0.0.1:9090\""),
        )),
    }
}

/// A success condition: comparisons of `result` with a number, joined by
/// `&&` and `||` (`&&` binds tighter; no parentheses, no other variable).
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// Alternatives (`||`), each a conjunction (`&&`) of comparisons.
    any: Vec<Vec<(Op, f64)>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Condition {
    pub fn parse(field: &str, text: &str) -> Result<Condition, SpecError> {
        let bad = |why: String| {
            SpecError::new(
                field,
                format!("{:?} is not a condition: {why}; write comparisons of result with a number, like \"result < 0.01\" or \"result >= 0.99 && result <= 1\"", text.trim()),
            )
        };
        if text.trim().is_empty() {
            return Err(bad("it is empty".into()));
        }
        let mut any = Vec::new();
        for alt in text.split("||") {
            let mut all = Vec::new();
            for term in alt.split("&&") {
                all.push(Self::term(term).map_err(bad)?);
            }
            any.push(all);
        }
        Ok(Condition { any })
    }

    fn term(term: &str) -> Result<(Op, f64), String> {
        let t = term.trim();
        if t.is_empty() {
            return Err("a comparison is missing beside && or ||".into());
        }
        let Some(rest) = t.strip_prefix("result") else {
            return Err(format!("{t:?} does not start with result"));
        };
        let rest = rest.trim_start();
        let ops = [
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<", Op::Lt),
            (">", Op::Gt),
        ];
        let Some((sym, op)) = ops.iter().find(|(sym, _)| rest.starts_with(sym)) else {
            let found: String = rest
                .chars()
                .take_while(|c| !c.is_ascii_digit() && !c.is_whitespace() && *c != '-' && *c != '.')
                .collect();
            return Err(format!(
                "{:?} is not a comparison (<, <=, >, >=, == or !=)",
                if found.is_empty() { rest } else { &found }
            ));
        };
        let number = rest[sym.len()..].trim();
        if number.starts_with(['<', '>', '=', '!']) {
            let op: String = rest.chars().take_while(|c| "<>=!".contains(*c)).collect();
            return Err(format!(
                "{op:?} is not a comparison (<, <=, >, >=, == or !=)"
            ));
        }
        match number.parse::<f64>() {
            Ok(n) if n.is_finite() => Ok((*op, n)),
            _ => Err(format!("{number:?} is not a number")),
        }
    }

    pub fn holds(&self, result: f64) -> bool {
        self.any.iter().any(|all| {
            all.iter().all(|&(op, n)| match op {
                Op::Lt => result < n,
                Op::Le => result <= n,
                Op::Gt => result > n,
                Op::Ge => result >= n,
                Op::Eq => result == n,
                Op::Ne => result != n,
            })
        })
    }
}

/// A Prometheus answer that is not a measurement, by whose fault: the
/// field a plan-time check names, and the word a run-time reason uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    /// No answer: the connection failed or timed out.
    Unreachable(String),
    /// Prometheus refused the query (HTTP 400 or 422, `status: error`).
    Rejected(String),
    /// An answer that is not a query result (another status, not JSON).
    BadAnswer(String),
    /// A result that is not one number: a range vector or a string.
    NotANumber(String),
}

impl QueryError {
    /// The spec field the problem is with.
    pub fn field(&self) -> &'static str {
        match self {
            QueryError::Unreachable(_) | QueryError::BadAnswer(_) => "prometheus",
            QueryError::Rejected(_) | QueryError::NotANumber(_) => "query",
        }
    }
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryError::Unreachable(e) => write!(f, "unreachable: {e}"),
            QueryError::Rejected(e) => write!(f, "rejected the query: {e}"),
            QueryError::BadAnswer(e) => write!(f, "answered {e}"),
            QueryError::NotANumber(e) => write!(f, "returned {e}, not one number"),
        }
    }
}

/// What an instant query answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    Value(f64),
    /// An empty vector: no series matched (no traffic, a wrong label).
    Empty,
    /// A vector of several series: the query must aggregate them.
    Several(usize),
}

/// Reads the answer to `GET /api/v1/query` (status code and body).
pub fn read_answer(status: u16, body: &str) -> Result<Sample, QueryError> {
    let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let text = |v: &serde_json::Value, key: &str| {
        v.get(key)
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let Some(json) = json.filter(|j| j.get("status").is_some()) else {
        let head: String = body.trim().chars().take(200).collect();
        return Err(QueryError::BadAnswer(format!(
            "HTTP {status} that is not a Prometheus API response: {head:?}"
        )));
    };
    if text(&json, "status") != "success" {
        let (kind, error) = (text(&json, "errorType"), text(&json, "error"));
        return Err(if matches!(status, 400 | 422) {
            QueryError::Rejected(format!("{kind}: {error}"))
        } else {
            QueryError::BadAnswer(format!("HTTP {status} ({kind}): {error}"))
        });
    }
    let data = json.get("data").cloned().unwrap_or_default();
    let value_of = |pair: &serde_json::Value| -> Result<f64, QueryError> {
        let s = pair.get(1).and_then(serde_json::Value::as_str);
        // Prometheus writes NaN and infinities as "NaN", "+Inf", "-Inf".
        s.and_then(|s| match s {
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            s => s.parse().ok(),
        })
        .ok_or_else(|| QueryError::BadAnswer(format!("a sample without a number: {pair}")))
    };
    match text(&data, "resultType").as_str() {
        "scalar" => {
            value_of(data.get("result").unwrap_or(&serde_json::Value::Null)).map(Sample::Value)
        }
        "vector" => {
            let series = data
                .get("result")
                .and_then(serde_json::Value::as_array)
                .cloned()
                .unwrap_or_default();
            match series.as_slice() {
                [] => Ok(Sample::Empty),
                [one] => value_of(one.get("value").unwrap_or(&serde_json::Value::Null))
                    .map(Sample::Value),
                many => Ok(Sample::Several(many.len())),
            }
        }
        "matrix" => Err(QueryError::NotANumber(
            "a range vector (matrix); wrap it in a function such as rate(...)".into(),
        )),
        other => Err(QueryError::NotANumber(format!("a {other:?} result"))),
    }
}

/// How one measurement came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Successful,
    Failed,
    /// No single number to judge: an empty result, NaN, several series.
    Inconclusive,
    /// No answer to judge: Prometheus unreachable, or an error.
    Error,
}

impl Verdict {
    pub const ALL: [Verdict; 4] = [
        Verdict::Successful,
        Verdict::Failed,
        Verdict::Inconclusive,
        Verdict::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Successful => "successful",
            Verdict::Failed => "failed",
            Verdict::Inconclusive => "inconclusive",
            Verdict::Error => "error",
        }
    }
}

/// One query of one analysis.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Measurement {
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub at: Timestamp,
    /// The number the query returned, when it returned one (not NaN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Why there is no value to judge: the error, or what came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub verdict: Verdict,
}

/// By bits, so that a rollout (which holds measurements) stays `Eq`: the
/// value is data to compare as stored, not arithmetic.
impl PartialEq for Measurement {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at
            && self.value.map(f64::to_bits) == o.value.map(f64::to_bits)
            && self.detail == o.detail
            && self.verdict == o.verdict
    }
}

impl Eq for Measurement {}

impl Analysis {
    /// Judges what a query answered at `at`.
    pub fn judge(&self, answer: Result<Sample, QueryError>, at: Timestamp) -> Measurement {
        let (value, detail, verdict) = match answer {
            Ok(Sample::Value(v)) if v.is_nan() => (
                None,
                Some("the query returned NaN (a ratio of zero to zero?)".to_string()),
                Verdict::Inconclusive,
            ),
            Ok(Sample::Value(v)) => {
                // Parsed when the spec was resolved.
                let holds = Condition::parse("success", &self.success)
                    .map(|c| c.holds(v))
                    .unwrap_or(false);
                let verdict = if holds {
                    Verdict::Successful
                } else {
                    Verdict::Failed
                };
                (Some(v), None, verdict)
            }
            Ok(Sample::Empty) => (
                None,
                Some("the query returned no series".to_string()),
                Verdict::Inconclusive,
            ),
            Ok(Sample::Several(n)) => (
                None,
                Some(format!(
                    "the query returned {n} series; it must return one (aggregate it, e.g. with sum(...))"
                )),
                Verdict::Inconclusive,
            ),
            Err(e) => (
                None,
                Some(format!("prometheus {} {e}", self.prometheus)),
                Verdict::Error,
            ),
        };
        Measurement {
            at,
            value,
            detail,
            verdict,
        }
    }
}

/// Where an analysis of one wave stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Passed,
    Failed,
    /// More inconclusive measurements than allowed, with `on_inconclusive =
    /// "pause"`: the rollout paused; resuming it accepts this.
    Inconclusive,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Passed => "passed",
            RunState::Failed => "failed",
            RunState::Inconclusive => "inconclusive",
        }
    }
}

/// One analysis of one wave, with its measurements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AnalysisRun {
    /// The wave, from 0 (as `NodeProgress::batch`).
    pub wave: usize,
    pub name: String,
    /// Unix milliseconds: when the wave's first node was switched.
    #[schema(value_type = u64)]
    pub started_at: Timestamp,
    pub state: RunState,
    #[serde(default)]
    pub measurements: Vec<Measurement>,
    /// Why it failed or was inconclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl AnalysisRun {
    fn counted(&self, v: Verdict) -> usize {
        self.measurements.iter().filter(|m| m.verdict == v).count()
    }

    /// Measurements that are not errors: what `count` counts.
    pub fn taken(&self) -> usize {
        self.measurements
            .iter()
            .filter(|m| m.verdict != Verdict::Error)
            .count()
    }

    fn errors_in_a_row(&self) -> usize {
        self.measurements
            .iter()
            .rev()
            .take_while(|m| m.verdict == Verdict::Error)
            .count()
    }

    /// `2 of 3 measurements passed`.
    pub fn progress(&self, a: &Analysis) -> String {
        format!(
            "{} of {} measurements passed",
            self.counted(Verdict::Successful),
            a.count
        )
    }

    /// When the next query is due: `interval` after the last one (or after
    /// the start), so that a restart of the control plane neither repeats
    /// stored measurements nor crowds the ones left.
    pub fn next_at(&self, a: &Analysis) -> Timestamp {
        self.measurements.last().map_or(self.started_at, |m| m.at) + a.interval
    }

    /// What the measurements so far decide, and why, if anything.
    fn verdict(&self, a: &Analysis, wave: &str) -> Option<(RunState, String)> {
        let values = || {
            let v: Vec<String> = self
                .measurements
                .iter()
                .filter(|m| m.verdict != Verdict::Error)
                .map(|m| m.value.map_or_else(|| "none".into(), format_value))
                .collect();
            v.join(", ")
        };
        let head = format!("analysis {} failed in {wave}", a.name);
        let failed = self.counted(Verdict::Failed);
        if failed > a.failure_limit as usize {
            return Some((
                RunState::Failed,
                format!(
                    "{head}: {failed} of {} measurements failed {} (failure_limit {}; values {}); query: {}",
                    self.taken(),
                    a.success,
                    a.failure_limit,
                    values(),
                    a.query
                ),
            ));
        }
        let inconclusive = self.counted(Verdict::Inconclusive);
        if inconclusive > a.inconclusive_limit as usize {
            let last = self
                .measurements
                .iter()
                .rev()
                .find(|m| m.verdict == Verdict::Inconclusive)
                .and_then(|m| m.detail.clone())
                .unwrap_or_default();
            let why = format!(
                "{inconclusive} of {} measurements inconclusive (inconclusive_limit {}; last: {last}); query: {}",
                self.taken(),
                a.inconclusive_limit,
                a.query
            );
            return Some(match a.on_inconclusive {
                OnInconclusive::Fail => (RunState::Failed, format!("{head}: {why}")),
                OnInconclusive::Pause => (
                    RunState::Inconclusive,
                    format!(
                        "analysis {} inconclusive in {wave}: {why}: resume to accept it, or roll back",
                        a.name
                    ),
                ),
            });
        }
        let errors = self.errors_in_a_row();
        if errors > a.consecutive_error_limit as usize {
            let last = self
                .measurements
                .last()
                .and_then(|m| m.detail.clone())
                .unwrap_or_default();
            return Some((
                RunState::Failed,
                format!(
                    "{head}: {errors} query errors in a row (consecutive_error_limit {}; last: {last}); query: {}",
                    a.consecutive_error_limit, a.query
                ),
            ));
        }
        if self.taken() >= a.count as usize {
            return Some((
                RunState::Passed,
                format!(
                    "analysis {} passed in {wave}: {} (values {})",
                    a.name,
                    self.progress(a),
                    values()
                ),
            ));
        }
        None
    }
}

/// A value as people read it: `0.0333`, `0.1`, `12`, `1.5e-6`.
pub fn format_value(v: f64) -> String {
    if v != 0.0 && v.abs() < 1e-3 {
        return format!("{v:.2e}");
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// A measurement the control plane should take now or later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub rollout: u64,
    pub wave: usize,
    pub analysis: Analysis,
    pub at: Timestamp,
}

fn wave_name(r: &Rollout, wave: usize) -> String {
    format!("wave {} of {}", wave + 1, r.batches.len())
}

impl Rollout {
    /// The measurements this rollout waits for, each with when it is due.
    /// None while it is paused: an operator looking at a paused rollout
    /// expects it to hold still.
    pub fn analysis_due(&self) -> Vec<Due> {
        if self.state != RolloutState::Running {
            return Vec::new();
        }
        self.analysis
            .iter()
            .filter(|run| run.state == RunState::Running)
            .filter_map(|run| {
                let a = self.spec.analysis.iter().find(|a| a.name == run.name)?;
                Some(Due {
                    rollout: self.id,
                    wave: run.wave,
                    at: run.next_at(a),
                    analysis: a.clone(),
                })
            })
            .collect()
    }

    /// Adds a measurement to the running analysis `name` of `wave` and
    /// decides its verdict. Returns false, changing nothing, if no such
    /// analysis is running (it ended, or the rollout did).
    pub fn record_measurement(
        &mut self,
        wave: usize,
        name: &str,
        m: Measurement,
        now: Timestamp,
    ) -> bool {
        if self.state.is_terminal() || self.state == RolloutState::RollingBack {
            return false;
        }
        let Some(a) = self.spec.analysis.iter().find(|a| a.name == name).cloned() else {
            return false;
        };
        let where_ = wave_name(self, wave);
        let Some(run) = self
            .analysis
            .iter_mut()
            .find(|run| run.wave == wave && run.name == name && run.state == RunState::Running)
        else {
            return false;
        };
        let what = match (m.value, &m.detail) {
            (Some(v), _) => format!("{} ({} {})", format_value(v), a.success, m.verdict.as_str()),
            (None, Some(d)) => format!("{}: {d}", m.verdict.as_str()),
            (None, None) => m.verdict.as_str().to_string(),
        };
        let counts = m.verdict != Verdict::Error;
        run.measurements.push(m);
        let line = format!(
            "analysis {name}, {where_}: measurement {} of {}: {what}",
            run.taken(),
            a.count
        );
        let decided = run.verdict(&a, &where_);
        if let Some((state, reason)) = &decided {
            run.state = *state;
            if *state != RunState::Passed {
                run.reason = Some(reason.clone());
            }
        }
        self.event(now, None, line);
        if counts {
            // A wave held for its analysis is not a lack of progress while
            // measurements come in.
            self.last_progress_at = now;
        }
        match decided {
            Some((RunState::Passed, reason)) => self.event(now, None, reason),
            Some((RunState::Inconclusive, reason)) if self.state == RolloutState::Running => {
                self.set_state(RolloutState::Paused, Some(reason.clone()), now);
                self.waiting = Some(reason);
            }
            // Failures are the planner's to act on (`failure`), with the
            // other reasons a rollout fails for.
            _ => {}
        }
        self.updated_at = now;
        true
    }
}

/// Starts the analyses of `wave` once one of its nodes has been switched
/// (so that their measurements fall in `min_healthy_time`), once.
pub(crate) fn start(r: &mut Rollout, wave: usize, now: Timestamp) {
    if r.spec.analysis.is_empty() || r.analysis.iter().any(|run| run.wave == wave) {
        return;
    }
    let switched = r.batches.get(wave).is_some_and(|b| {
        b.iter().any(|n| {
            r.nodes[n]
                .task
                .as_ref()
                .is_some_and(|t| t.kind == crate::TaskKind::Upgrade)
        })
    });
    if !switched {
        return;
    }
    let where_ = wave_name(r, wave);
    for a in r.spec.analysis.clone() {
        r.event(
            now,
            None,
            format!(
                "analysis {} started for {where_}: {} measurements {} apart, passing when {}",
                a.name,
                a.count,
                format_duration(a.interval),
                a.success
            ),
        );
        r.analysis.push(AnalysisRun {
            wave,
            name: a.name.clone(),
            started_at: now,
            state: RunState::Running,
            measurements: Vec::new(),
            reason: None,
        });
    }
}

/// Whether an analysis of a wave before `next` is still measuring, which
/// holds back wave `next` (or, past the last wave, the rollout's end); if
/// so, `waiting` says how far it is.
pub(crate) fn holds(r: &mut Rollout, next: usize) -> bool {
    let open: Vec<String> = r
        .analysis
        .iter()
        .filter(|run| run.wave < next && run.state == RunState::Running)
        .map(|run| {
            let progress = r
                .spec
                .analysis
                .iter()
                .find(|a| a.name == run.name)
                .map(|a| run.progress(a))
                .unwrap_or_default();
            format!(
                "{}: analysis {} {progress}",
                wave_name(r, run.wave),
                run.name
            )
        })
        .collect();
    if open.is_empty() {
        return false;
    }
    r.waiting = Some(open.join("; "));
    true
}

/// Why the rollout must fail, if an analysis failed.
pub(crate) fn failure(r: &Rollout) -> Option<String> {
    r.analysis
        .iter()
        .find(|run| run.state == RunState::Failed)
        .map(|run| {
            run.reason
                .clone()
                .unwrap_or_else(|| format!("analysis {} failed", run.name))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(f: impl FnOnce(&mut AnalysisFile)) -> AnalysisFile {
        let mut a = AnalysisFile {
            name: Some("error-rate".into()),
            prometheus: Some("http://127.0.0.1:9090/".into()),
            query: Some("sum(rate(x[1m]))".into()),
            success: Some("result < 0.01".into()),
            ..Default::default()
        };
        f(&mut a);
        a
    }

    fn resolved(f: impl FnOnce(&mut AnalysisFile)) -> Result<Analysis, SpecError> {
        resolve(&[file(f)], 600_000).map(|mut v| v.remove(0))
    }

    #[test]
    fn analysis_defaults_follow_argo() {
        let a = resolved(|_| {}).unwrap();
        assert_eq!(a.prometheus, "http://127.0.0.1:9090");
        assert_eq!(a.interval, 10_000);
        assert_eq!(a.count, 3);
        assert_eq!(a.failure_limit, 0);
        assert_eq!(a.inconclusive_limit, 0);
        assert_eq!(a.on_inconclusive, OnInconclusive::Fail);
        assert_eq!(a.consecutive_error_limit, 4);
    }

    #[test]
    fn analysis_errors_name_the_field() {
        type Edit = Box<dyn FnOnce(&mut AnalysisFile)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("analysis[0].name", Box::new(|a| a.name = None)),
            (
                "analysis[0].name",
                Box::new(|a| a.name = Some("Error Rate".into())),
            ),
            ("analysis[0].prometheus", Box::new(|a| a.prometheus = None)),
            (
                "analysis[0].prometheus",
                Box::new(|a| a.prometheus = Some("ftp://x".into())),
            ),
            (
                "analysis[0].prometheus",
                Box::new(|a| a.prometheus = Some("http://".into())),
            ),
            (
                "analysis[0].query",
                Box::new(|a| a.query = Some("  ".into())),
            ),
            (
                "analysis[0].interval",
                Box::new(|a| a.interval = Some("10 parsecs".into())),
            ),
            (
                "analysis[0].interval",
                Box::new(|a| a.interval = Some("500ms".into())),
            ),
            (
                "analysis[0].interval",
                Box::new(|a| a.interval = Some("1h".into())),
            ),
            ("analysis[0].count", Box::new(|a| a.count = Some(0))),
            ("analysis[0].count", Box::new(|a| a.count = Some(101))),
            ("analysis[0].success", Box::new(|a| a.success = None)),
            (
                "analysis[0].success",
                Box::new(|a| a.success = Some("result <> 1".into())),
            ),
            (
                "analysis[0].on_inconclusive",
                Box::new(|a| a.on_inconclusive = Some("maybe".into())),
            ),
        ];
        for (field, f) in cases {
            let e = resolved(f).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        let twice = resolve(&[file(|_| {}), file(|_| {})], 600_000).unwrap_err();
        assert_eq!(twice.field, "analysis[1].name");
        assert!(twice.message.contains("earlier analysis"), "{twice}");
    }

    #[test]
    fn analysis_conditions_compare_result_with_numbers() {
        let c = |s: &str| Condition::parse("success", s).unwrap();
        assert!(c("result < 0.01").holds(0.0));
        assert!(!c("result < 0.01").holds(0.01));
        assert!(c("result <= 0.01").holds(0.01));
        assert!(c("result>0.5").holds(0.6));
        assert!(c("result >= -1").holds(-1.0));
        assert!(c("result == 1").holds(1.0));
        assert!(c("result != 1").holds(2.0));
        let range = c("result >= 0.99 && result <= 1");
        assert!(range.holds(0.995) && !range.holds(0.98) && !range.holds(1.1));
        let outside = c("result < 1 || result > 2 && result < 3");
        assert!(
            outside.holds(0.5) && outside.holds(2.5) && !outside.holds(1.5) && !outside.holds(4.0)
        );
        assert!(!c("result < 0.01").holds(f64::INFINITY));
    }

    #[test]
    fn analysis_bad_conditions_say_what_is_wrong() {
        let e = |s: &str| {
            Condition::parse("analysis[0].success", s)
                .unwrap_err()
                .to_string()
        };
        assert!(
            e("result <> 1").contains("\"<>\" is not a comparison"),
            "{}",
            e("result <> 1")
        );
        assert!(
            e("result =< 1").contains("\"=<\" is not a comparison"),
            "{}",
            e("result =< 1")
        );
        assert!(e("value < 1").contains("does not start with result"));
        assert!(e("result < x").contains("\"x\" is not a number"));
        assert!(e("result < 1 &&").contains("missing"));
        assert!(e("result < NaN").contains("not a number"));
        assert!(e("").contains("empty"));
        assert!(
            e("result <> 1").starts_with("analysis[0].success: \"result <> 1\" is not a condition")
        );
    }

    #[test]
    fn analysis_answers_are_classified() {
        let vector = |series: &str| {
            format!(
                r#"{{"status":"success","data":{{"resultType":"vector","result":[{series}]}}}}"#
            )
        };
        let one = r#"{"metric":{},"value":[1700000000.1,"0.098"]}"#;
        assert_eq!(read_answer(200, &vector(one)), Ok(Sample::Value(0.098)));
        assert_eq!(read_answer(200, &vector("")), Ok(Sample::Empty));
        assert_eq!(
            read_answer(200, &vector(&[one, one, one].join(","))),
            Ok(Sample::Several(3))
        );
        let scalar =
            r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"+Inf"]}}"#;
        assert_eq!(read_answer(200, scalar), Ok(Sample::Value(f64::INFINITY)));
        let nan = vector(r#"{"metric":{},"value":[1,"NaN"]}"#);
        assert!(matches!(read_answer(200, &nan), Ok(Sample::Value(v)) if v.is_nan()));
        let bad =
            r#"{"status":"error","errorType":"bad_data","error":"1:5: parse error: unexpected"}"#;
        let e = read_answer(400, bad).unwrap_err();
        assert_eq!(e.field(), "query");
        assert_eq!(
            e.to_string(),
            "rejected the query: bad_data: 1:5: parse error: unexpected"
        );
        let down = r#"{"status":"error","errorType":"unavailable","error":"shutting down"}"#;
        assert_eq!(read_answer(503, down).unwrap_err().field(), "prometheus");
        let html = read_answer(502, "<html>bad gateway</html>").unwrap_err();
        assert_eq!(html.field(), "prometheus");
        assert!(html.to_string().contains("HTTP 502"), "{html}");
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert_eq!(read_answer(200, matrix).unwrap_err().field(), "query");
    }

    #[test]
    fn analysis_measurements_get_verdicts() {
        let a = resolved(|_| {}).unwrap();
        assert_eq!(
            a.judge(Ok(Sample::Value(0.001)), 1).verdict,
            Verdict::Successful
        );
        let failed = a.judge(Ok(Sample::Value(0.1)), 1);
        assert_eq!((failed.verdict, failed.value), (Verdict::Failed, Some(0.1)));
        assert_eq!(
            a.judge(Ok(Sample::Value(f64::NAN)), 1).verdict,
            Verdict::Inconclusive
        );
        assert_eq!(a.judge(Ok(Sample::Empty), 1).verdict, Verdict::Inconclusive);
        let several = a.judge(Ok(Sample::Several(4)), 1);
        assert_eq!(several.verdict, Verdict::Inconclusive);
        assert!(several.detail.unwrap().contains("4 series"));
        let e = a.judge(Err(QueryError::Unreachable("connection refused".into())), 1);
        assert_eq!(e.verdict, Verdict::Error);
        assert_eq!(
            e.detail.as_deref(),
            Some("prometheus http://127.0.0.1:9090 unreachable: connection refused")
        );
    }

    #[test]
    fn analysis_values_read_as_people_read_them() {
        assert_eq!(format_value(0.098039), "0.098");
        assert_eq!(format_value(0.1), "0.1");
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(12.0), "12");
        assert_eq!(format_value(0.0000015), "1.50e-6");
    }

    mod planner {
        use super::super::*;
        use crate::{
            plan_batches, step, Fleet, Health, NodeView, RolloutFile, ServiceView, StrategyFile,
            TaskKind, TaskOutcome,
        };

        fn fleet(n: usize) -> Fleet {
            (1..=n)
                .map(|i| {
                    let name = format!("n{i}");
                    let view = NodeView {
                        name: name.clone(),
                        labels: Default::default(),
                        online: true,
                        last_seen: 0,
                        services: [(
                            "api".to_string(),
                            ServiceView {
                                version: Some("1.0.0".into()),
                                health: Health::Healthy,
                                ..Default::default()
                            },
                        )]
                        .into(),
                    };
                    (name, view)
                })
                .collect()
        }

        fn rollout(kind: Option<&str>, f: impl FnOnce(&mut AnalysisFile)) -> Rollout {
            let mut a = AnalysisFile {
                name: Some("error-rate".into()),
                prometheus: Some("http://prom:9090".into()),
                query: Some("sum(errors)".into()),
                success: Some("result < 0.01".into()),
                count: Some(2),
                ..Default::default()
            };
            f(&mut a);
            let spec = RolloutFile {
                service: Some("api".into()),
                version: Some("2.0.0".into()),
                strategy: StrategyFile {
                    batch: kind.is_none().then(|| "1".into()),
                    kind: kind.map(str::to_string),
                    ..Default::default()
                },
                analysis: Some(vec![a]),
                ..Default::default()
            }
            .resolve()
            .unwrap();
            plan_batches(1, spec, &fleet(3), 0).unwrap()
        }

        /// Steps, and reports every upgrade sent as having succeeded at `now`.
        fn settle(r: &Rollout, now: Timestamp) -> (Rollout, Vec<String>) {
            let d = step(r, &fleet(3), now);
            let mut r = d.rollout;
            let mut sent = Vec::new();
            for t in d.dispatch {
                if t.task.kind == TaskKind::Upgrade {
                    assert!(r.record_result(&t.node, &t.task.id, &TaskOutcome::Succeeded, now));
                }
                sent.push(format!("{:?} {}", t.task.kind, t.node));
            }
            (r, sent)
        }

        fn measure(r: &mut Rollout, value: Result<Sample, QueryError>) -> Timestamp {
            let due = r.analysis_due();
            assert_eq!(due.len(), 1, "{due:?}");
            let due = &due[0];
            let m = due.analysis.judge(value, due.at);
            assert!(r.record_measurement(due.wave, &due.analysis.name, m, due.at));
            due.at
        }

        #[test]
        fn a_wave_is_held_until_its_analysis_passed() {
            let r = rollout(None, |_| {});
            let (r, sent) = settle(&r, 0);
            assert_eq!(sent, ["Upgrade n1"]);
            assert_eq!(r.analysis.len(), 1, "started with the wave's first switch");
            assert_eq!(r.analysis[0].started_at, 0);
            // n1 is upgraded; the next wave waits for the analysis.
            let (mut r, sent) = settle(&r, 1_000);
            assert!(sent.is_empty(), "{sent:?}");
            assert_eq!(
                r.waiting.as_deref(),
                Some("wave 1 of 3: analysis error-rate 0 of 2 measurements passed")
            );
            assert_eq!(r.analysis_due()[0].at, 10_000, "interval after the start");
            let at = measure(&mut r, Ok(Sample::Value(0.001)));
            let (mut r, sent) = settle(&r, at);
            assert!(sent.is_empty(), "{sent:?}");
            assert!(r
                .waiting
                .as_deref()
                .unwrap()
                .contains("1 of 2 measurements passed"));
            assert_eq!(r.analysis_due()[0].at, 20_000);
            let at = measure(&mut r, Ok(Sample::Value(0.0)));
            assert_eq!(r.analysis[0].state, RunState::Passed);
            let d = step(&r, &fleet(3), at);
            assert_eq!(d.dispatch.len(), 1);
            assert_eq!(d.dispatch[0].node, "n2");
            let r = d.rollout;
            assert_eq!(r.analysis.len(), 2, "wave 2 has its own analysis");
            assert_eq!((r.analysis[1].wave, r.analysis[1].started_at), (1, at));
            // The same step again decides nothing new.
            let again = step(&r, &fleet(3), at);
            assert!(!again.changed);
        }

        #[test]
        fn the_rollout_does_not_complete_before_the_last_analysis_passed() {
            let mut r = rollout(None, |a| a.count = Some(1));
            let mut now = 0;
            for _ in 0..3 {
                let (next, _) = settle(&r, now);
                r = next;
                now += 1_000;
                let (next, _) = settle(&r, now);
                r = next;
                assert_eq!(r.state, RolloutState::Running, "{:?}", r.waiting);
                now = measure(&mut r, Ok(Sample::Value(0.0)));
            }
            let (r, _) = settle(&r, now);
            assert_eq!(r.state, RolloutState::Completed, "{:?}", r.waiting);
            assert_eq!(r.analysis.len(), 3);
        }

        #[test]
        fn a_failed_analysis_fails_and_rolls_back_the_rollout() {
            let r = rollout(None, |_| {});
            let (r, _) = settle(&r, 0);
            let (mut r, _) = settle(&r, 1_000);
            let at = measure(&mut r, Ok(Sample::Value(0.098)));
            assert_eq!(r.analysis[0].state, RunState::Failed);
            let d = step(&r, &fleet(3), at);
            assert_eq!(d.rollout.state, RolloutState::RollingBack);
            let reason = d.rollout.reason.clone().unwrap();
            assert_eq!(
                reason,
                "analysis error-rate failed in wave 1 of 3: 1 of 1 measurements failed result < 0.01 (failure_limit 0; values 0.098); query: sum(errors)"
            );
            let sent: Vec<_> = d
                .dispatch
                .iter()
                .map(|t| (t.task.kind, t.node.as_str()))
                .collect();
            assert_eq!(sent, [(TaskKind::Revert, "n1")]);
        }

        #[test]
        fn failures_within_the_limit_pass() {
            let r = rollout(None, |a| {
                a.count = Some(3);
                a.failure_limit = Some(1);
            });
            let (r, _) = settle(&r, 0);
            let (mut r, _) = settle(&r, 1_000);
            measure(&mut r, Ok(Sample::Value(0.5)));
            measure(&mut r, Ok(Sample::Value(0.0)));
            measure(&mut r, Ok(Sample::Value(0.0)));
            assert_eq!(r.analysis[0].state, RunState::Passed);
        }

        #[test]
        fn an_all_at_once_rollout_completes_after_its_analysis() {
            let r = rollout(Some("all_at_once"), |a| a.count = Some(1));
            let d = step(&r, &fleet(3), 0);
            let mut r = d.rollout;
            for t in d.dispatch {
                assert!(r.record_result(&t.node, &t.task.id, &TaskOutcome::Succeeded, 0));
            }
            let (r, sent) = settle(&r, 1);
            assert_eq!(sent.len(), 3, "every node switches at once");
            assert_eq!(r.analysis.len(), 1);
            let (mut r, _) = settle(&r, 2);
            assert_eq!(r.state, RolloutState::Running);
            assert!(r
                .waiting
                .as_deref()
                .unwrap()
                .contains("analysis error-rate"));
            let at = measure(&mut r, Ok(Sample::Value(1.0)));
            let d = step(&r, &fleet(3), at);
            assert_eq!(d.rollout.state, RolloutState::RollingBack);
            assert_eq!(d.dispatch.len(), 3, "every node switches back");
        }

        #[test]
        fn errors_in_a_row_fail_the_analysis_naming_the_prometheus() {
            let r = rollout(None, |a| a.consecutive_error_limit = Some(1));
            let (r, _) = settle(&r, 0);
            let (mut r, _) = settle(&r, 1_000);
            let down = || Err(QueryError::Unreachable("connection refused".into()));
            measure(&mut r, down());
            // An answer in between starts the count again.
            measure(&mut r, Ok(Sample::Value(0.0)));
            measure(&mut r, down());
            assert_eq!(r.analysis[0].state, RunState::Running);
            let at = measure(&mut r, down());
            assert_eq!(r.analysis[0].state, RunState::Failed);
            let d = step(&r, &fleet(3), at);
            let reason = d.rollout.reason.unwrap();
            assert!(
                reason.contains("2 query errors in a row (consecutive_error_limit 1; last: prometheus http://prom:9090 unreachable: connection refused)"),
                "{reason}"
            );
        }

        #[test]
        fn inconclusive_results_pause_when_asked_and_resume_accepts_them() {
            let r = rollout(None, |a| {
                a.on_inconclusive = Some("pause".into());
                a.count = Some(1);
            });
            let (r, _) = settle(&r, 0);
            let (mut r, _) = settle(&r, 1_000);
            let at = measure(&mut r, Ok(Sample::Several(3)));
            assert_eq!(r.state, RolloutState::Paused);
            assert!(
                r.reason.as_deref().unwrap().contains("returned 3 series"),
                "{:?}",
                r.reason
            );
            assert!(
                r.analysis_due().is_empty(),
                "a paused rollout measures nothing"
            );
            r.resume(at + 1).unwrap();
            let (_, sent) = settle(&r, at + 1);
            assert_eq!(sent, ["Upgrade n2"]);
        }

        #[test]
        fn inconclusive_results_fail_by_default() {
            let r = rollout(None, |_| {});
            let (r, _) = settle(&r, 0);
            let (mut r, _) = settle(&r, 1_000);
            let at = measure(&mut r, Ok(Sample::Empty));
            let d = step(&r, &fleet(3), at);
            assert_eq!(d.rollout.state, RolloutState::RollingBack);
            assert!(d.rollout.reason.unwrap().contains("returned no series"));
        }

        #[test]
        fn stored_rollouts_without_analysis_still_load() {
            let r = rollout(None, |_| {});
            let mut json = serde_json::to_value(&r).unwrap();
            json["spec"].as_object_mut().unwrap().remove("analysis");
            let old: Rollout = serde_json::from_value(json).unwrap();
            assert!(old.spec.analysis.is_empty() && old.analysis.is_empty());
        }
    }
}
