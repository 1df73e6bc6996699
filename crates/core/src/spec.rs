use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    normalize_version, parse_duration, validate_service_name, Amount, Selector, Span, SpecError,
};

/// A rollout as users write it, in `rollout.toml` or as flags: every field
/// optional and unparsed, so that [`RolloutFile::resolve`] can name the field
/// that is wrong. This is also the body of `POST /v1/rollouts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Explicit node names; with a selector, a node must match both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<String>>,
    /// Several services in one rollout, instead of `service` and `version`;
    /// each is rolled out with the same selector and strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<ServiceFile>>,
    /// Going to an older version than nodes run must be said explicitly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downgrade: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<crate::HooksFile>,
    #[serde(default)]
    pub strategy: StrategyFile,
    /// Analysis gates (`[[analysis]]`): queries each wave must pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Vec<crate::AnalysisFile>>,
}

/// One service of a multi-service rollout (`[[services]]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Services of the same rollout that must have completed before this
    /// one starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StrategyFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<CountOrText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<CountOrText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_deadline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rollback: Option<bool>,
    /// Finalize (set the service's active version) once the rollout has
    /// every node of the service on its version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    /// `rolling` (the default), `canary` or `all_at_once`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Canary waves, cumulative: `["1", "10%", {size = "50%", pause = true}, "100%"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<Vec<WaveFile>>,
    /// Healthy nodes of the service that must always remain: a count, a
    /// percentage or `"majority"`, fleet-wide or per `min_healthy_per` group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy: Option<CountOrText>,
    /// A label: `min_healthy` applies within each group of nodes sharing its
    /// value (`cluster=etcd-a`, `cluster=etcd-b`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy_per: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_domain: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_by: Option<String>,
    /// The values of `order_by` to go first, or `"leader_last"`: the node
    /// whose role probe says `leader` goes after the others of its group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<OrderFile>,
}

/// `order = ["eu", "us"]` (with `order_by`) or `order = "leader_last"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum OrderFile {
    Values(Vec<String>),
    Named(String),
}

impl From<Vec<String>> for OrderFile {
    fn from(v: Vec<String>) -> Self {
        OrderFile::Values(v)
    }
}

/// A canary wave: its cumulative size, and whether the rollout waits for
/// `rollwave rollout promote` once it is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum WaveFile {
    Size(CountOrText),
    Table {
        size: CountOrText,
        #[serde(default)]
        pause: bool,
    },
}

/// Each wave is a step an operator watches (and may pause at): far beyond
/// this is a mistake or an attack on the planner, not a plan.
pub const MAX_WAVES: usize = 1000;

/// `batch = 2` and `batch = "25%"` are both natural to write in TOML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum CountOrText {
    Count(i64),
    Text(String),
}

/// By hand rather than `untagged`: any number or string is taken here and
/// judged by [`CountOrText::amount`], whose error names the field. An
/// untagged enum would answer `1e30` with "data did not match any variant".
impl<'de> Deserialize<'de> for CountOrText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = CountOrText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a node count like 2 or a text like \"25%\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<CountOrText, E> {
                Ok(CountOrText::Count(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<CountOrText, E> {
                Ok(i64::try_from(v)
                    .map_or_else(|_| CountOrText::Text(v.to_string()), CountOrText::Count))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<CountOrText, E> {
                Ok(CountOrText::Text(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CountOrText, E> {
                Ok(CountOrText::Text(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl CountOrText {
    fn amount(&self, field: &str) -> Result<Amount, SpecError> {
        match self {
            CountOrText::Count(n) => u32::try_from(*n)
                .map(Amount::Count)
                .map_err(|_| SpecError::new(field, format!("{n} is not a node count"))),
            CountOrText::Text(s) => Amount::parse(field, s),
        }
    }
}

impl From<&str> for CountOrText {
    fn from(s: &str) -> Self {
        CountOrText::Text(s.to_string())
    }
}

/// A validated rollout specification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RolloutSpec {
    pub service: String,
    pub version: String,
    pub selector: Selector,
    /// Nodes per batch; a batch starts when the previous one has finished.
    pub batch: Amount,
    /// How many selected nodes may be unavailable at once, counting nodes
    /// that were already unhealthy or offline.
    pub max_unavailable: Amount,
    /// How long (milliseconds) a node must stay healthy after its switch to
    /// pass its gate.
    #[schema(value_type = u64)]
    pub min_healthy_time: Span,
    /// How long (milliseconds) a node has, from its switch, to pass its gate.
    #[schema(value_type = u64)]
    pub healthy_deadline: Span,
    /// The rollout fails when no node finishes for this long (milliseconds).
    #[schema(value_type = u64)]
    pub progress_deadline: Span,
    /// Failed nodes tolerated; one more fails the rollout.
    pub max_failures: u32,
    /// Whether a failed rollout returns upgraded nodes to their previous version.
    pub auto_rollback: bool,
    /// Explicit node names (empty: every node the selector matches).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Canary waves (empty: rolling batches of `batch`).
    #[serde(default)]
    pub waves: Vec<Wave>,
    /// Healthy nodes of the service never to go below, fleet-wide or in
    /// each `min_healthy_per` group.
    #[serde(default)]
    #[schema(value_type = CountOrText, example = "majority")]
    pub min_healthy: crate::Floor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy_per: Option<String>,
    /// The node whose role probe says `leader` is switched after the others
    /// of its group, re-read before each node starts as leadership moves.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leader_last: bool,
    #[serde(default)]
    pub spread: Option<Spread>,
    #[serde(default)]
    pub order: Option<Order>,
    /// Two phases: every node stages the release, then every node switches
    /// at once; any failure switches every node back.
    #[serde(default)]
    pub all_at_once: bool,
    /// Services (rolled out by sibling rollouts) that must have completed
    /// before this one starts.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Nodes may go to an older version than they run.
    #[serde(default)]
    pub downgrade: bool,
    /// Set the service's active version once every node runs this version.
    #[serde(default)]
    pub auto_finalize: bool,
    #[serde(default, skip_serializing_if = "crate::Hooks::is_empty")]
    pub hooks: crate::Hooks,
    /// The release declares a dry run: one node runs it against a copy of
    /// its data before any node changes. Set from the release, not the file.
    #[serde(default)]
    pub dry_run: bool,
    /// Analysis gates: each wave waits for them to pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysis: Vec<crate::Analysis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Wave {
    /// Cumulative: the nodes done once this wave is done.
    pub size: Amount,
    pub pause: bool,
}

/// At most `max_per_domain` nodes with the same value of `label` in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Spread {
    pub label: String,
    pub max_per_domain: u32,
}

/// One value of `label` at a time: `values` first, in that order, then the
/// others by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Order {
    pub label: String,
    pub values: Vec<String>,
}

pub const DEFAULT_BATCH: Amount = Amount::Percent(25);
pub const DEFAULT_MIN_HEALTHY_TIME: Span = 10_000;
pub const DEFAULT_HEALTHY_DEADLINE: Span = 5 * 60_000;
pub const DEFAULT_PROGRESS_DEADLINE: Span = 10 * 60_000;

impl RolloutFile {
    /// Overlays the fields set in `other` (flags) on this file.
    pub fn merge(mut self, other: RolloutFile) -> RolloutFile {
        let s = other.strategy;
        self.service = other.service.or(self.service);
        self.version = other.version.or(self.version);
        self.selector = other.selector.or(self.selector);
        self.nodes = other.nodes.or(self.nodes);
        self.services = other.services.or(self.services);
        self.downgrade = other.downgrade.or(self.downgrade);
        self.hooks = other.hooks.or(self.hooks);
        self.analysis = other.analysis.or(self.analysis);
        let t = &mut self.strategy;
        t.kind = s.kind.or(t.kind.take());
        t.waves = s.waves.or(t.waves.take());
        t.min_healthy = s.min_healthy.or(t.min_healthy.take());
        t.min_healthy_per = s.min_healthy_per.or(t.min_healthy_per.take());
        t.spread_by = s.spread_by.or(t.spread_by.take());
        t.max_per_domain = s.max_per_domain.or(t.max_per_domain);
        t.order_by = s.order_by.or(t.order_by.take());
        t.order = s.order.or(t.order.take());
        t.batch = s.batch.or(t.batch.take());
        t.max_unavailable = s.max_unavailable.or(t.max_unavailable.take());
        t.min_healthy_time = s.min_healthy_time.or(t.min_healthy_time.take());
        t.healthy_deadline = s.healthy_deadline.or(t.healthy_deadline.take());
        t.progress_deadline = s.progress_deadline.or(t.progress_deadline.take());
        t.max_failures = s.max_failures.or(t.max_failures);
        t.auto_rollback = s.auto_rollback.or(t.auto_rollback);
        t.auto_finalize = s.auto_finalize.or(t.auto_finalize);
        self
    }

    /// Validates a single-service rollout and fills in defaults.
    pub fn resolve(&self) -> Result<RolloutSpec, SpecError> {
        if self.services.is_some() {
            return Err(SpecError::new(
                "services",
                "lists several services: this request takes one (service and version)",
            ));
        }
        self.resolve_one(
            "service",
            self.service.as_deref(),
            "version",
            self.version.as_deref(),
        )
    }

    /// Validates a rollout of one or several services; returns one spec per
    /// service, each after every service it depends on.
    pub fn resolve_all(&self) -> Result<Vec<RolloutSpec>, SpecError> {
        let Some(entries) = &self.services else {
            return Ok(vec![self.resolve()?]);
        };
        for (field, set) in [
            ("service", self.service.is_some()),
            ("version", self.version.is_some()),
        ] {
            if set {
                return Err(SpecError::new(
                    field,
                    "cannot be combined with [[services]]: give each service its name and version there",
                ));
            }
        }
        if entries.is_empty() {
            return Err(SpecError::new("services", "needs at least one service"));
        }
        let mut specs = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let name_field = format!("services[{i}].name");
            let mut spec = self.resolve_one(
                &name_field,
                e.name.as_deref(),
                &format!("services[{i}].version"),
                e.version.as_deref(),
            )?;
            if specs
                .iter()
                .any(|s: &RolloutSpec| s.service == spec.service)
            {
                return Err(SpecError::new(
                    name_field,
                    format!("{:?} is listed twice", spec.service),
                ));
            }
            let deps_field = format!("services[{i}].depends_on");
            let deps = e.depends_on.clone().unwrap_or_default();
            for (j, d) in deps.iter().enumerate() {
                if !entries.iter().any(|o| o.name.as_deref() == Some(d)) {
                    return Err(SpecError::new(
                        deps_field,
                        format!("{d:?} is not a service of this rollout"),
                    ));
                }
                if deps[..j].contains(d) {
                    return Err(SpecError::new(deps_field, format!("{d:?} is listed twice")));
                }
            }
            spec.depends_on = deps;
            specs.push(spec);
        }
        dependency_order(specs)
    }

    fn resolve_one(
        &self,
        service_field: &str,
        service: Option<&str>,
        version_field: &str,
        version: Option<&str>,
    ) -> Result<RolloutSpec, SpecError> {
        let service = service.ok_or_else(|| SpecError::new(service_field, "is required"))?;
        validate_service_name(service_field, service)?;
        let version = version.ok_or_else(|| SpecError::new(version_field, "is required"))?;
        let version = normalize_version(version_field, version)?;
        let selector = Selector::parse("selector", self.selector.as_deref().unwrap_or(""))?;
        let s = &self.strategy;
        let all_at_once = s.kind.as_deref() == Some("all_at_once");
        if all_at_once {
            all_at_once_fits(s)?;
        }
        let batch = match &s.batch {
            Some(b) => b.amount("strategy.batch")?,
            None if all_at_once => Amount::Percent(100),
            None => DEFAULT_BATCH,
        };
        if matches!(batch, Amount::Count(0) | Amount::Percent(0)) {
            return Err(SpecError::new("strategy.batch", "must be at least 1 node"));
        }
        let canary = s.waves.is_some();
        let max_unavailable = match &s.max_unavailable {
            Some(m) => m.amount("strategy.max_unavailable")?,
            // A canary's waves set how many nodes go at once.
            None if canary || all_at_once => Amount::Percent(100),
            None => batch,
        };
        if max_unavailable == Amount::Count(0) {
            return Err(SpecError::new(
                "strategy.max_unavailable",
                "0 would never let a node be switched: each switch takes its node out of service for a moment",
            ));
        }
        let dur = |field: &str, v: &Option<String>, default: Span| match v {
            Some(v) => parse_duration(field, v),
            None => Ok(default),
        };
        let min_healthy_time = dur(
            "strategy.min_healthy_time",
            &s.min_healthy_time,
            DEFAULT_MIN_HEALTHY_TIME,
        )?;
        let healthy_deadline = dur(
            "strategy.healthy_deadline",
            &s.healthy_deadline,
            DEFAULT_HEALTHY_DEADLINE,
        )?;
        let progress_deadline = dur(
            "strategy.progress_deadline",
            &s.progress_deadline,
            DEFAULT_PROGRESS_DEADLINE,
        )?;
        if healthy_deadline <= min_healthy_time {
            return Err(SpecError::new(
                "strategy.healthy_deadline",
                format!(
                    "{} must be longer than strategy.min_healthy_time ({})",
                    crate::format_duration(healthy_deadline),
                    crate::format_duration(min_healthy_time)
                ),
            ));
        }
        if progress_deadline < healthy_deadline {
            return Err(SpecError::new(
                "strategy.progress_deadline",
                format!(
                    "{} must be at least strategy.healthy_deadline ({})",
                    crate::format_duration(progress_deadline),
                    crate::format_duration(healthy_deadline)
                ),
            ));
        }
        let waves = match (s.kind.as_deref(), &s.waves) {
            (None | Some("rolling"), None) => Vec::new(),
            (None | Some("canary"), Some(waves)) => {
                if waves.is_empty() {
                    return Err(SpecError::new("strategy.waves", "needs at least one wave"));
                }
                if waves.len() > MAX_WAVES {
                    return Err(SpecError::new(
                        "strategy.waves",
                        format!("{} waves is more than {MAX_WAVES}", waves.len()),
                    ));
                }
                if s.batch.is_some() {
                    return Err(SpecError::new(
                        "strategy.batch",
                        "is for rolling rollouts; a canary's waves set their own sizes",
                    ));
                }
                let mut out: Vec<Wave> = Vec::new();
                for (i, w) in waves.iter().enumerate() {
                    let field = format!("strategy.waves[{i}]");
                    let (size, pause) = match w {
                        WaveFile::Size(size) => (size, false),
                        WaveFile::Table { size, pause } => (size, *pause),
                    };
                    let size = size.amount(&field)?;
                    if matches!(size, Amount::Count(0) | Amount::Percent(0)) {
                        return Err(SpecError::new(field, "a wave must hold at least 1 node"));
                    }
                    // Sizes are cumulative: one not above an earlier one of
                    // the same unit would add no node, and be dropped
                    // without a word.
                    let earlier = out.iter().rev().find_map(|w| match (w.size, size) {
                        (Amount::Count(a), Amount::Count(b)) if b <= a => Some(format!("{a}")),
                        (Amount::Percent(a), Amount::Percent(b)) if b <= a => Some(format!("{a}%")),
                        (Amount::Percent(100), _) => Some("100%".into()),
                        _ => None,
                    });
                    if let Some(earlier) = earlier {
                        return Err(SpecError::new(
                            field,
                            format!(
                                "{} is not above the wave before it ({earlier}): waves are cumulative sizes, each larger than the last, e.g. [\"1\", \"10%\", \"100%\"]",
                                size
                            ),
                        ));
                    }
                    out.push(Wave { size, pause });
                }
                out
            }
            (Some("canary"), None) => {
                return Err(SpecError::new(
                    "strategy.waves",
                    "is required for kind = \"canary\", e.g. [\"1\", \"10%\", \"100%\"]",
                ))
            }
            (Some("rolling"), Some(_)) => {
                return Err(SpecError::new(
                    "strategy.waves",
                    "is for kind = \"canary\"; a rolling rollout uses strategy.batch",
                ))
            }
            (Some("all_at_once"), _) => Vec::new(),
            (Some(other), _) => {
                return Err(SpecError::new(
                    "strategy.kind",
                    format!("{other:?} is not a strategy (rolling, canary or all_at_once)"),
                ))
            }
        };
        let spread = match (&s.spread_by, s.max_per_domain) {
            (Some(label), max) => {
                label_key("strategy.spread_by", label)?;
                let max = max.unwrap_or(1);
                if max == 0 {
                    return Err(SpecError::new(
                        "strategy.max_per_domain",
                        "must be at least 1",
                    ));
                }
                Some(Spread {
                    label: label.clone(),
                    max_per_domain: max,
                })
            }
            (None, Some(_)) => {
                return Err(SpecError::new(
                    "strategy.max_per_domain",
                    "needs strategy.spread_by, the label whose values are the domains",
                ))
            }
            (None, None) => None,
        };
        let (values, leader_last) = match &s.order {
            None => (None, false),
            Some(OrderFile::Values(v)) => (Some(v), false),
            Some(OrderFile::Named(n)) if n == "leader_last" => (None, true),
            Some(OrderFile::Named(n)) => {
                return Err(SpecError::new(
                    "strategy.order",
                    format!("{n:?} is not an order: \"leader_last\", or a list of strategy.order_by's values"),
                ))
            }
        };
        let order = match (&s.order_by, values) {
            (Some(label), values) => {
                label_key("strategy.order_by", label)?;
                let values = values.cloned().unwrap_or_default();
                if let Some(dup) = values
                    .iter()
                    .enumerate()
                    .find(|(i, v)| values[..*i].contains(v))
                {
                    return Err(SpecError::new(
                        "strategy.order",
                        format!("{:?} is listed twice", dup.1),
                    ));
                }
                Some(Order {
                    label: label.clone(),
                    values,
                })
            }
            (None, Some(_)) => {
                return Err(SpecError::new(
                    "strategy.order",
                    "needs strategy.order_by, the label the order is about",
                ))
            }
            (None, None) => None,
        };
        let min_healthy = match &s.min_healthy {
            Some(m) => crate::Floor::parse("strategy.min_healthy", m)?,
            None => crate::Floor::NONE,
        };
        if let Some(label) = &s.min_healthy_per {
            label_key("strategy.min_healthy_per", label)?;
            if min_healthy.is_none() {
                return Err(SpecError::new(
                    "strategy.min_healthy_per",
                    "needs strategy.min_healthy, the floor to keep in each group",
                ));
            }
        }
        let hooks = match &self.hooks {
            Some(h) => h.resolve()?,
            None => crate::Hooks::default(),
        };
        if !hooks.pre_leader.is_empty() && !leader_last {
            return Err(SpecError::new(
                "hooks.pre_leader",
                "runs on the leader before its switch, which only strategy.order = \"leader_last\" picks out",
            ));
        }
        let nodes = self.nodes.clone().unwrap_or_default();
        if let Some(n) = nodes.iter().find(|n| n.trim().is_empty()) {
            return Err(SpecError::new("nodes", format!("{n:?} is not a node name")));
        }
        Ok(RolloutSpec {
            nodes,
            waves,
            min_healthy,
            min_healthy_per: s.min_healthy_per.clone(),
            leader_last,
            spread,
            order,
            service: service.to_string(),
            version,
            selector,
            batch,
            max_unavailable,
            min_healthy_time,
            healthy_deadline,
            progress_deadline,
            max_failures: s.max_failures.unwrap_or(0),
            auto_rollback: s.auto_rollback.unwrap_or(true),
            all_at_once,
            depends_on: Vec::new(),
            downgrade: self.downgrade.unwrap_or(false),
            auto_finalize: s.auto_finalize.unwrap_or(false),
            hooks,
            dry_run: false,
            analysis: crate::analysis::resolve(
                self.analysis.as_deref().unwrap_or_default(),
                progress_deadline,
            )?,
        })
    }
}

/// Refuses the settings that contradict switching every node at once and
/// ending all on one version.
fn all_at_once_fits(s: &StrategyFile) -> Result<(), SpecError> {
    let why = "all_at_once switches every selected node in one step";
    if s.batch.is_some() {
        return Err(SpecError::new(
            "strategy.batch",
            format!("{why}: batches are for kind = \"rolling\""),
        ));
    }
    if s.waves.is_some() {
        return Err(SpecError::new(
            "strategy.waves",
            format!("{why}: waves are for kind = \"canary\""),
        ));
    }
    if let Some(m) = &s.max_unavailable {
        if m.amount("strategy.max_unavailable")? != Amount::Percent(100) {
            return Err(SpecError::new(
                "strategy.max_unavailable",
                format!("{why}: leave it unset (every selected node is in flight at once), or use kind = \"rolling\""),
            ));
        }
    }
    if s.max_failures.is_some_and(|m| m > 0) {
        return Err(SpecError::new(
            "strategy.max_failures",
            "all_at_once tolerates no failure: one node failing switches every node back",
        ));
    }
    if s.auto_rollback == Some(false) {
        return Err(SpecError::new(
            "strategy.auto_rollback",
            "all_at_once always switches every node back on a failure, so the fleet never ends mixed",
        ));
    }
    for (field, set) in [
        ("strategy.spread_by", s.spread_by.is_some()),
        ("strategy.max_per_domain", s.max_per_domain.is_some()),
        ("strategy.order_by", s.order_by.is_some()),
        ("strategy.order", s.order.is_some()),
    ] {
        if set {
            return Err(SpecError::new(
                field,
                format!("{why}: there are no waves to spread or order"),
            ));
        }
    }
    Ok(())
}

/// Sorts specs so that each comes after everything it depends on, keeping
/// the listed order otherwise; a cycle is refused with its path.
fn dependency_order(specs: Vec<RolloutSpec>) -> Result<Vec<RolloutSpec>, SpecError> {
    fn visit(
        i: usize,
        specs: &[RolloutSpec],
        marks: &mut [u8],
        path: &mut Vec<usize>,
        out: &mut Vec<usize>,
    ) -> Result<(), SpecError> {
        match marks[i] {
            2 => return Ok(()),
            1 => {
                let start = path.iter().position(|&p| p == i).unwrap_or(0);
                let mut cycle: Vec<&str> = path[start..]
                    .iter()
                    .map(|&p| specs[p].service.as_str())
                    .collect();
                cycle.push(&specs[i].service);
                return Err(SpecError::new(
                    "services",
                    format!("depends_on forms a cycle: {}", cycle.join(" -> ")),
                ));
            }
            _ => {}
        }
        marks[i] = 1;
        path.push(i);
        for d in &specs[i].depends_on {
            let j = specs
                .iter()
                .position(|s| &s.service == d)
                .expect("dependencies were checked to be services of the rollout");
            visit(j, specs, marks, path, out)?;
        }
        path.pop();
        marks[i] = 2;
        out.push(i);
        Ok(())
    }
    let mut marks = vec![0u8; specs.len()];
    let mut order = Vec::with_capacity(specs.len());
    for i in 0..specs.len() {
        visit(i, &specs, &mut marks, &mut Vec::new(), &mut order)?;
    }
    let mut slots: Vec<Option<RolloutSpec>> = specs.into_iter().map(Some).collect();
    Ok(order
        .into_iter()
        .map(|i| slots[i].take().expect("each spec is placed once"))
        .collect())
}

fn label_key(field: &str, label: &str) -> Result<(), SpecError> {
    let ok = !label.is_empty()
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("{label:?} is not a label key"),
        ))
    }
}

impl RolloutSpec {
    /// Batch size in nodes for a rollout over `selected` nodes (at least 1).
    pub fn batch_size(&self, selected: usize) -> usize {
        self.batch.resolve_up(selected).max(1)
    }

    /// Unavailability budget for `selected` nodes: rounds down, at least 1.
    pub fn unavailable_budget(&self, selected: usize) -> usize {
        self.max_unavailable.resolve_down(selected).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(service: &str, version: &str) -> RolloutFile {
        RolloutFile {
            service: Some(service.into()),
            version: Some(version.into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let spec = file("api", "2.0.0").resolve().unwrap();
        assert_eq!(spec.batch, Amount::Percent(25));
        assert_eq!(spec.max_unavailable, Amount::Percent(25));
        assert_eq!(spec.min_healthy_time, 10_000);
        assert!(spec.auto_rollback);
        assert_eq!(spec.batch_size(6), 2);
        assert_eq!(spec.unavailable_budget(6), 1);
    }

    #[test]
    fn errors_name_the_field() {
        let mut f = file("api", "2.0.0");
        f.strategy.min_healthy_time = Some("5 parsecs".into());
        assert_eq!(f.resolve().unwrap_err().field, "strategy.min_healthy_time");

        let mut f = file("api", "two");
        assert_eq!(f.resolve().unwrap_err().field, "version");
        f.version = Some("2.0.0".into());
        f.strategy.batch = Some("0".into());
        assert_eq!(f.resolve().unwrap_err().field, "strategy.batch");
        f.strategy.batch = Some(CountOrText::Count(-2));
        assert_eq!(f.resolve().unwrap_err().field, "strategy.batch");
        f.strategy.batch = None;
        f.strategy.max_unavailable = Some("150%".into());
        assert_eq!(f.resolve().unwrap_err().field, "strategy.max_unavailable");

        assert_eq!(
            RolloutFile::default().resolve().unwrap_err().field,
            "service"
        );
        assert_eq!(
            file("../x", "1.0.0").resolve().unwrap_err().field,
            "service"
        );
    }

    #[test]
    fn canary_and_constraints_resolve() {
        let mut f = file("api", "2.0.0");
        f.strategy.waves = Some(vec![
            WaveFile::Size("1".into()),
            WaveFile::Table {
                size: "50%".into(),
                pause: true,
            },
        ]);
        f.strategy.spread_by = Some("rack".into());
        f.strategy.order_by = Some("region".into());
        f.strategy.order = Some(vec!["eu-1".to_string()].into());
        f.strategy.min_healthy = Some(CountOrText::Count(2));
        let spec = f.resolve().unwrap();
        assert_eq!(spec.waves.len(), 2);
        assert!(spec.waves[1].pause);
        assert_eq!(spec.spread.unwrap().max_per_domain, 1);
        assert_eq!(spec.order.unwrap().values, ["eu-1"]);
        assert_eq!(spec.min_healthy, crate::Floor::Count(2));
    }

    #[test]
    fn strategy_errors_name_the_field() {
        type Edit = Box<dyn Fn(&mut StrategyFile)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|s| s.kind = Some("canary".into())),
                "strategy.waves",
            ),
            (
                Box::new(|s| s.kind = Some("blue-green".into())),
                "strategy.kind",
            ),
            (
                Box::new(|s| {
                    s.kind = Some("all_at_once".into());
                    s.max_failures = Some(1);
                }),
                "strategy.max_failures",
            ),
            (
                Box::new(|s| {
                    s.kind = Some("all_at_once".into());
                    s.max_unavailable = Some("50%".into());
                }),
                "strategy.max_unavailable",
            ),
            (
                Box::new(|s| {
                    s.kind = Some("all_at_once".into());
                    s.auto_rollback = Some(false);
                }),
                "strategy.auto_rollback",
            ),
            (
                Box::new(|s| {
                    s.kind = Some("all_at_once".into());
                    s.spread_by = Some("rack".into());
                }),
                "strategy.spread_by",
            ),
            (
                Box::new(|s| s.waves = Some(vec![WaveFile::Size("0".into())])),
                "strategy.waves[0]",
            ),
            (
                Box::new(|s| {
                    s.waves = Some(vec![
                        WaveFile::Size("50%".into()),
                        WaveFile::Size("10%".into()),
                    ])
                }),
                "strategy.waves[1]",
            ),
            (
                Box::new(|s| s.waves = Some(vec![WaveFile::Size("1".into()); 3])),
                "strategy.waves[1]",
            ),
            (
                Box::new(|s| {
                    s.waves = Some(vec![
                        WaveFile::Size("1".into()),
                        WaveFile::Size("100%".into()),
                        WaveFile::Size("5".into()),
                    ])
                }),
                "strategy.waves[2]",
            ),
            (Box::new(|s| s.waves = Some(vec![])), "strategy.waves"),
            (
                Box::new(|s| s.waves = Some(vec![WaveFile::Size("1".into()); MAX_WAVES + 1])),
                "strategy.waves",
            ),
            (
                Box::new(|s| {
                    s.waves = Some(vec![WaveFile::Size("1".into())]);
                    s.batch = Some("2".into());
                }),
                "strategy.batch",
            ),
            (
                Box::new(|s| s.max_per_domain = Some(2)),
                "strategy.max_per_domain",
            ),
            (
                Box::new(|s| s.order = Some(vec!["a".to_string()].into())),
                "strategy.order",
            ),
            (
                Box::new(|s| {
                    s.order_by = Some("region".into());
                    s.order = Some(vec!["a".to_string(), "a".to_string()].into());
                }),
                "strategy.order",
            ),
            (
                Box::new(|s| s.spread_by = Some("a b".into())),
                "strategy.spread_by",
            ),
        ];
        for (set, field) in cases {
            let mut f = file("api", "2.0.0");
            set(&mut f.strategy);
            assert_eq!(f.resolve().unwrap_err().field, field);
        }
    }

    #[test]
    fn all_at_once_takes_every_node_at_once() {
        let mut f = file("api", "2.0.0");
        f.strategy.kind = Some("all_at_once".into());
        let spec = f.resolve().unwrap();
        assert!(spec.all_at_once);
        assert_eq!(spec.batch_size(7), 7);
        assert_eq!(spec.unavailable_budget(7), 7);
        assert_eq!(spec.max_failures, 0);
        assert!(spec.auto_rollback);
    }

    fn services(list: &[(&str, &[&str])]) -> RolloutFile {
        RolloutFile {
            services: Some(
                list.iter()
                    .map(|(name, deps)| ServiceFile {
                        name: Some(name.to_string()),
                        version: Some("2.0.0".into()),
                        depends_on: Some(deps.iter().map(|d| d.to_string()).collect()),
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn services_come_after_their_dependencies() {
        let specs = services(&[("api", &["db", "cache"]), ("db", &[]), ("cache", &["db"])])
            .resolve_all()
            .unwrap();
        let order: Vec<&str> = specs.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(order, ["db", "cache", "api"]);
        assert_eq!(specs[2].depends_on, ["db", "cache"]);
        // A single service resolves the same either way.
        assert_eq!(file("api", "2.0.0").resolve_all().unwrap().len(), 1);
    }

    #[test]
    fn dependency_errors_name_the_problem() {
        let err = services(&[("api", &["web"]), ("web", &["db"]), ("db", &["api"])])
            .resolve_all()
            .unwrap_err();
        assert_eq!(err.field, "services");
        assert_eq!(
            err.message,
            "depends_on forms a cycle: api -> web -> db -> api"
        );
        let err = services(&[("api", &["api"])]).resolve_all().unwrap_err();
        assert_eq!(err.message, "depends_on forms a cycle: api -> api");
        let err = services(&[("api", &["dbx"]), ("db", &[])])
            .resolve_all()
            .unwrap_err();
        assert_eq!(err.field, "services[0].depends_on");
        assert_eq!(err.message, "\"dbx\" is not a service of this rollout");
        let err = services(&[("db", &[]), ("db", &[])])
            .resolve_all()
            .unwrap_err();
        assert_eq!(err.field, "services[1].name");
        let mut both = services(&[("db", &[])]);
        both.service = Some("api".into());
        assert_eq!(both.resolve_all().unwrap_err().field, "service");
        assert_eq!(services(&[]).resolve_all().unwrap_err().field, "services");
        let mut f = services(&[("db", &[])]);
        f.services.as_mut().unwrap()[0].version = None;
        assert_eq!(f.resolve_all().unwrap_err().field, "services[0].version");
    }

    #[test]
    fn downgrade_and_auto_finalize_are_off_unless_asked() {
        let spec = file("api", "1.0.0").resolve().unwrap();
        assert!(!spec.downgrade && !spec.auto_finalize);
        let mut f = file("api", "1.0.0");
        f.downgrade = Some(true);
        f.strategy.auto_finalize = Some(true);
        let spec = f.resolve().unwrap();
        assert!(spec.downgrade && spec.auto_finalize);
    }

    #[test]
    fn flags_override_the_file() {
        let mut base = file("api", "1.0.0");
        base.strategy.batch = Some("2".into());
        let mut flags = RolloutFile {
            version: Some("2.0.0".into()),
            ..Default::default()
        };
        flags.strategy.min_healthy_time = Some("1s".into());
        let spec = base.merge(flags).resolve().unwrap();
        assert_eq!(spec.version, "2.0.0");
        assert_eq!(spec.batch, Amount::Count(2));
        assert_eq!(spec.min_healthy_time, 1000);
    }
}
