//! `GET /metrics`: Prometheus metrics in the OpenMetrics text format.
//!
//! Two kinds: what the control plane counts as it goes (API requests, task
//! and wave durations, hook failures, rollouts that finished), kept in the
//! registry; and what it holds now (rollouts by state, nodes by service,
//! version and health, connected agents), filled in from the same state the
//! API shows at each scrape, so that the two always agree.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use rollwave_core::{
    Fleet, NodeState, Rollout, RolloutState, TaskKind, TaskOutcome, Timestamp, Verdict,
};

type Labels = Vec<(&'static str, String)>;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub struct Metrics {
    registry: Registry,
    rollouts: Family<Labels, Gauge>,
    nodes: Family<Labels, Gauge>,
    service_nodes: Family<Labels, Gauge>,
    agents: Gauge,
    tasks: Family<Labels, Histogram>,
    waves: Family<Labels, Histogram>,
    hook_failures: Family<Labels, Counter>,
    analysis_measurements: Family<Labels, Counter>,
    requests: Family<Labels, Counter>,
    request_seconds: Family<Labels, Histogram>,
    /// Artifact streams open now, and requests refused past the cap
    /// (`downloads.rs` holds clones and keeps them up to date).
    pub downloads_in_flight: Gauge,
    pub downloads_refused: Counter,
    /// Rollouts the reconciler no longer watches, by id: with the active
    /// ones (counted at each scrape), every rollout in the store. By id, so
    /// that one still in the readers' copy of the active ones for a moment
    /// is not counted twice.
    finished: Mutex<BTreeMap<u64, &'static str>>,
    /// One scrape at a time: each clears and refills the gauges.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("rollwave");
        let rollouts = Family::<Labels, Gauge>::default();
        registry.register("rollouts", "Rollouts by state", rollouts.clone());
        let nodes = Family::<Labels, Gauge>::default();
        registry.register(
            "nodes",
            "Nodes known to the control plane, by whether their agent is connected",
            nodes.clone(),
        );
        let service_nodes = Family::<Labels, Gauge>::default();
        registry.register(
            "service_nodes",
            "Nodes running a service, by service, running version and health",
            service_nodes.clone(),
        );
        // A control plane that serves metrics through this registry leads:
        // a follower answers /metrics with 0 without one (replicas.rs).
        let leader = Gauge::<i64>::default();
        leader.set(1);
        registry.register(
            "leader",
            "Whether this control plane leads (1) or follows (0)",
            leader,
        );
        let agents = Gauge::default();
        registry.register(
            "agents_connected",
            "Agent sessions open now",
            agents.clone(),
        );
        // Tasks and waves take from a second (a stage) to an hour (a slow
        // migration): 0.25s to about 2.3h.
        let slow = || Histogram::new(exponential_buckets(0.25, 2.0, 16));
        let tasks = Family::<Labels, Histogram>::new_with_constructor(slow);
        registry.register(
            "task_duration_seconds",
            "Node tasks, from dispatch to result, by kind and outcome",
            tasks.clone(),
        );
        let waves = Family::<Labels, Histogram>::new_with_constructor(slow);
        registry.register(
            "wave_duration_seconds",
            "Rollout waves, from their first task to their last node done, by service",
            waves.clone(),
        );
        let hook_failures = Family::<Labels, Counter>::default();
        registry.register(
            "hook_failures",
            "Hooks that failed (after their retries), by where they ran",
            hook_failures.clone(),
        );
        let analysis_measurements = Family::<Labels, Counter>::default();
        registry.register(
            "analysis_measurements",
            "Analysis queries taken during rollouts, by verdict",
            analysis_measurements.clone(),
        );
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "http_requests",
            "API requests by method, route and status",
            requests.clone(),
        );
        // API answers take from 100µs to seconds (an artifact upload).
        let fast = || Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        let request_seconds = Family::<Labels, Histogram>::new_with_constructor(fast);
        registry.register(
            "http_request_duration_seconds",
            "API request latency by method and route",
            request_seconds.clone(),
        );
        let downloads_in_flight = Gauge::default();
        registry.register(
            "downloads_in_flight",
            "Artifact downloads being streamed now",
            downloads_in_flight.clone(),
        );
        let downloads_refused = Counter::default();
        registry.register(
            "downloads_refused",
            "Artifact downloads refused with 429 because --max-downloads streams were open",
            downloads_refused.clone(),
        );
        // Every series that can be known is there from the start, at 0, so
        // that alert rules and rates need no `or vector(0)`.
        for on in ["control_plane", "node"] {
            let _ = hook_failures.get_or_create(&vec![("on", on.into())]);
        }
        for verdict in Verdict::ALL {
            let _ =
                analysis_measurements.get_or_create(&vec![("verdict", verdict.as_str().into())]);
        }
        for kind in TaskKind::ALL {
            for outcome in ["succeeded", "failed"] {
                let _ = tasks.get_or_create(&task_labels(kind, outcome));
            }
        }
        Metrics {
            registry,
            rollouts,
            nodes,
            service_nodes,
            agents,
            tasks,
            waves,
            hook_failures,
            analysis_measurements,
            requests,
            request_seconds,
            downloads_in_flight,
            downloads_refused,
            finished: Mutex::default(),
            scrape: Mutex::default(),
        }
    }

    /// Counts a rollout the reconciler stopped watching (or, at start, one
    /// it does not resume).
    pub fn rollout_finished(&self, id: u64, state: RolloutState) {
        self.finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, state.as_str());
    }

    pub fn task_ended(&self, kind: TaskKind, outcome: &TaskOutcome, ms: u64) {
        let outcome = match outcome {
            TaskOutcome::Succeeded => "succeeded",
            TaskOutcome::Failed { .. } => "failed",
        };
        self.tasks
            .get_or_create(&task_labels(kind, outcome))
            .observe(ms as f64 / 1000.0);
    }

    /// Observes the wave of `node`, which its result just finished (see
    /// [`wave_done`], asked before the result was recorded).
    pub fn wave_finished(&self, r: &Rollout, node: &str, now: Timestamp) {
        if !wave_done(r, node) {
            return;
        }
        let Some(wave) = r.nodes.get(node).and_then(|n| r.batches.get(n.batch)) else {
            return;
        };
        let started = wave
            .iter()
            .filter_map(|n| r.nodes.get(n)?.task.as_ref())
            .map(|t| t.started_at)
            .min();
        if let Some(started) = started {
            self.waves
                .get_or_create(&vec![("service", r.spec.service.clone())])
                .observe(now.saturating_sub(started) as f64 / 1000.0);
        }
    }

    /// `on`: `control_plane` (rollout hooks) or `node`.
    pub fn hook_failed(&self, on: &'static str) {
        self.hook_failures
            .get_or_create(&vec![("on", on.into())])
            .inc();
    }

    pub fn measured(&self, verdict: Verdict) {
        self.analysis_measurements
            .get_or_create(&vec![("verdict", verdict.as_str().into())])
            .inc();
    }

    pub fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&vec![
                ("method", method.into()),
                ("route", route.into()),
                ("status", status.to_string()),
            ])
            .inc();
        self.request_seconds
            .get_or_create(&vec![("method", method.into()), ("route", route.into())])
            .observe(seconds);
    }

    /// The exposition: the gauges refilled from `live` (the active
    /// rollouts), `fleet` and the connected agents, then everything encoded.
    pub fn render(
        &self,
        live: &BTreeMap<u64, std::sync::Arc<Rollout>>,
        fleet: &Fleet,
        agents: usize,
    ) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.rollouts.clear();
        let mut by_state: BTreeMap<&str, i64> =
            RolloutState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        let finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        for state in finished.values() {
            *by_state.entry(state).or_default() += 1;
        }
        for r in live.values().filter(|r| !finished.contains_key(&r.id)) {
            *by_state.entry(r.state.as_str()).or_default() += 1;
        }
        drop(finished);
        for (state, n) in by_state {
            self.rollouts
                .get_or_create(&vec![("state", state.into())])
                .set(n);
        }
        self.nodes.clear();
        self.service_nodes.clear();
        for online in ["true", "false"] {
            let _ = self.nodes.get_or_create(&vec![("online", online.into())]);
        }
        for n in fleet.values() {
            self.nodes
                .get_or_create(&vec![("online", n.online.to_string())])
                .inc();
            for (service, s) in &n.services {
                let labels = vec![
                    ("service", service.clone()),
                    (
                        "version",
                        s.version.clone().unwrap_or_else(|| "none".into()),
                    ),
                    ("health", format!("{:?}", s.health).to_lowercase()),
                ];
                self.service_nodes.get_or_create(&labels).inc();
            }
        }
        self.agents.set(agents as i64);
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

/// Whether every node of `node`'s wave has finished. Only that wave is
/// looked at: a result is recorded for every node, in rollouts of thousands.
pub fn wave_done(r: &Rollout, node: &str) -> bool {
    let Some(wave) = r.nodes.get(node).and_then(|n| r.batches.get(n.batch)) else {
        return false;
    };
    wave.iter().all(|n| {
        r.nodes
            .get(n)
            .is_some_and(|p| p.state != NodeState::Pending && !p.state.in_flight())
    })
}

fn task_labels(kind: TaskKind, outcome: &str) -> Labels {
    let kind = format!("{kind:?}").to_lowercase();
    vec![("kind", kind), ("outcome", outcome.into())]
}
