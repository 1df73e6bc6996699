//! Analysis gates against a real Prometheus (Debian's `prometheus`), started
//! here on loopback and scraping every node's service, with steady load on
//! every node while rollouts run.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rollwave::fleet::{free_port, Fleet};
use rollwave_api::{RolloutFile, StartRollout};
use rollwave_core::{AnalysisFile, RolloutState, RolloutSummary, RunState, StrategyFile, Verdict};

use crate::harness::*;

/// Errors over requests, fleet-wide, over the last 10 seconds.
const ERROR_RATIO: &str =
    r#"sum(rate(demo_requests_total{code=~"5.."}[10s])) / sum(rate(demo_requests_total[10s]))"#;

/// A Prometheus scraping the given service ports every second, killed on drop.
struct Prometheus {
    child: Option<Child>,
    url: String,
    /// Its config and data, removed on drop.
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(ports: &[u16]) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("rollwave-prometheus-")
            .tempdir()
            .unwrap();
        let targets: Vec<String> = ports.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: api\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let log_path = dir.path().join("prometheus.log");
        // The port is free when drawn, not held: another may take it first.
        for _ in 0..5 {
            let port = free_port().unwrap();
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("starting prometheus (Debian package prometheus)");
            let url = format!("http://127.0.0.1:{port}");
            for _ in 0..300 {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                let ready = reqwest::get(format!("{url}/-/ready")).await;
                if ready.is_ok_and(|r| r.status().is_success()) {
                    return Prometheus {
                        child: Some(child),
                        url,
                        _dir: dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "prometheus did not start: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The query's single value now, if it has one.
    async fn value(&self, query: &str) -> Option<f64> {
        let resp = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", query)])
            .send()
            .await
            .ok()?;
        let json: serde_json::Value = resp.json().await.ok()?;
        let result = json["data"]["result"].as_array()?;
        let [one] = result.as_slice() else {
            return None;
        };
        one["value"][1].as_str()?.parse().ok()
    }

    /// Waits until every node's service has been scraped.
    async fn wait_scraped(&self, nodes: usize) {
        let up = format!("count(up == 1) == {nodes}");
        wait_until("prometheus to scrape every node", || self.value(&up)).await;
    }

    /// Waits until every node is scraped and the error ratio has a value:
    /// measurements taken from now on judge the release, not a cold start.
    async fn wait_for_traffic(&self, nodes: usize) {
        self.wait_scraped(nodes).await;
        wait_until("traffic in prometheus", || async {
            self.value(ERROR_RATIO).await.filter(|v| !v.is_nan())
        })
        .await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Steady requests to every node's service until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(fleet: &Fleet) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let tasks = fleet
            .service_urls()
            .into_iter()
            .map(|url| {
                let (stop, client) = (stop.clone(), client.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        // A connection refused mid-switch is not an answer:
                        // the service counts what it answers.
                        let _ = client.get(&url).send().await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
            .collect();
        Load { stop, tasks }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn analysis(prometheus: &str, f: impl FnOnce(&mut AnalysisFile)) -> AnalysisFile {
    let mut a = AnalysisFile {
        name: Some("error-rate".into()),
        prometheus: Some(prometheus.into()),
        query: Some(ERROR_RATIO.into()),
        interval: Some("2s".into()),
        count: Some(3),
        success: Some("result < 0.01".into()),
        ..Default::default()
    };
    f(&mut a);
    a
}

/// One node per wave; each node healthy for `healthy` before the next wave.
fn spec(version: &str, healthy: &str, a: AnalysisFile) -> RolloutFile {
    RolloutFile {
        service: Some(SERVICE.into()),
        version: Some(version.into()),
        strategy: StrategyFile {
            batch: Some("1".into()),
            min_healthy_time: Some(healthy.into()),
            healthy_deadline: Some("1m".into()),
            progress_deadline: Some("2m".into()),
            ..Default::default()
        },
        analysis: Some(vec![a]),
        ..Default::default()
    }
}

fn ports(fleet: &Fleet) -> Vec<u16> {
    fleet.nodes.iter().map(|n| n.port).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_release_that_fails_a_tenth_of_requests_is_rolled_back_by_analysis() {
    let fleet = installed_fleet(3).await;
    let prometheus = Prometheus::start(&ports(&fleet)).await;
    let _load = Load::start(&fleet);
    prometheus.wait_for_traffic(3).await;
    push_failing_requests(&fleet, "2.0.0", 0.1).await;

    let started = fleet
        .api()
        .unwrap()
        .start_rollout(spec("2.0.0", "8s", analysis(&prometheus.url, |_| {})))
        .await
        .unwrap();
    let r = wait_done(&fleet, started.rollout.id).await;

    assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
    let reason = r.reason.clone().unwrap();
    assert!(
        reason.starts_with("analysis error-rate failed in wave 1 of 3: "),
        "{reason}"
    );
    assert!(
        reason.contains("measurements failed result < 0.01 (failure_limit 0; values "),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("query: {ERROR_RATIO}")),
        "{reason}"
    );
    // The values the reason quotes are the ones kept on the rollout.
    let run = &r.analysis[0];
    assert_eq!((run.wave, run.state), (0, RunState::Failed), "{run:#?}");
    let failed = run
        .measurements
        .iter()
        .find(|m| m.verdict == Verdict::Failed)
        .expect("a failed measurement");
    let value = failed.value.unwrap();
    assert!(value >= 0.01, "{value}");
    assert!(
        reason.contains(&rollwave_core::analysis::format_value(value)),
        "{reason}"
    );
    assert_eq!(r.analysis.len(), 1, "wave 2 never started: {r:#?}");
    assert!(r.events.iter().any(|e| e
        .message
        .starts_with("analysis error-rate, wave 1 of 3: measurement ")));
    assert_fleet_on(&fleet, "1.0.0").await;

    let out = cli(&fleet, &["rollout", "status", &r.id.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("analysis error-rate wave 1: failed, "),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_release_passes_its_analysis() {
    let fleet = installed_fleet(2).await;
    let prometheus = Prometheus::start(&ports(&fleet)).await;
    let _load = Load::start(&fleet);
    prometheus.wait_for_traffic(2).await;
    push(&fleet, "2.0.0", true).await;

    let file = spec("2.0.0", "2s", analysis(&prometheus.url, |_| {}));
    // The plan lists the analysis it will run.
    let toml_path = fleet.dir.join("good.toml");
    std::fs::write(&toml_path, toml::to_string(&file).unwrap()).unwrap();
    let out = cli(&fleet, &["plan", "-f", toml_path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("analysis error-rate: each wave waits for 3 measurements 2s apart passing result < 0.01"),
        "{text}"
    );
    assert!(
        text.contains(&format!("prometheus: {}", prometheus.url)),
        "{text}"
    );

    let started = fleet.api().unwrap().start_rollout(file).await.unwrap();
    let r = wait_done(&fleet, started.rollout.id).await;
    assert_eq!(r.state, RolloutState::Completed, "{r:#?}");
    assert_eq!(r.analysis.len(), 2, "one per wave: {r:#?}");
    for run in &r.analysis {
        assert_eq!(run.state, RunState::Passed, "{run:#?}");
        assert_eq!(run.measurements.len(), 3, "{run:#?}");
        assert!(run
            .measurements
            .iter()
            .all(|m| m.verdict == Verdict::Successful && m.value.is_some_and(|v| v < 0.01)));
    }
    // Wave 2 started only once wave 1's analysis had passed.
    let passed_1 = r.analysis[0].measurements[2].at;
    assert!(r.analysis[1].started_at >= passed_1, "{r:#?}");
    assert_fleet_on(&fleet, "2.0.0").await;

    let metrics = fleet
        .http()
        .get(format!("{}/metrics", fleet.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for verdict in ["successful", "failed", "inconclusive", "error"] {
        assert!(
            metrics.contains(&format!(
                "rollwave_analysis_measurements_total{{verdict=\"{verdict}\"}}"
            )),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains("rollwave_analysis_measurements_total{verdict=\"successful\"} 6\n"),
        "{metrics}"
    );
}

/// A rollout.toml of `api@2.0.0` with one `[[analysis]]` of these lines
/// (and more after them).
fn toml_file(fleet: &Fleet, name: &str, analysis: &str) -> String {
    let path = fleet.dir.join(name);
    std::fs::write(
        &path,
        format!(
            "service = \"api\"\nversion = \"2.0.0\"\n\n[strategy]\nbatch = 1\n\n[[analysis]]\nname = \"error-rate\"\n{analysis}\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

fn assert_refused(out: &std::process::Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{stderr:?} should mention {needle:?}"
        );
    }
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
}

async fn rollouts(fleet: &Fleet) -> usize {
    let list: Vec<RolloutSummary> = fleet.api().unwrap().get("/v1/rollouts").await.unwrap();
    list.len()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_prometheus_rejects_is_refused_at_plan_time() {
    let fleet = installed_fleet(1).await;
    let prometheus = Prometheus::start(&ports(&fleet)).await;
    prometheus.wait_scraped(1).await;
    push(&fleet, "2.0.0", true).await;
    let before = rollouts(&fleet).await;
    let url = &prometheus.url;

    let bad = toml_file(
        &fleet,
        "bad-query.toml",
        &format!("prometheus = \"{url}\"\nsuccess = \"result < 0.01\"\nquery = 'sum(rate(demo_requests_total[10s])'"),
    );
    let rejected = [
        &format!("analysis[0].query: prometheus {url} rejected the query: bad_data: ")[..],
        "parse error",
    ];
    assert_refused(&cli(&fleet, &["plan", "-f", &bad]), &rejected);
    assert_refused(&cli(&fleet, &["rollout", "start", "-f", &bad]), &rejected);

    // Through the API: 400, the JSON error body, the field named.
    let mut file: RolloutFile = toml::from_str(&std::fs::read_to_string(&bad).unwrap()).unwrap();
    let resp = fleet
        .http()
        .post(format!("{}/v1/plan", fleet.url()))
        .json(&StartRollout {
            spec: file.clone(),
            plan_id: None,
        })
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("analysis[0].query: "), "{message}");

    // Several series where one number is needed.
    file.analysis.as_mut().unwrap()[0].query = Some("demo_requests_total".into());
    let err = fleet.api().unwrap().start_rollout(file).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("analysis[0].query: returns 2 series now; an analysis needs one number"),
        "{err}"
    );

    // What is wrong without asking Prometheus is said before anything is sent.
    let cases = [
        (
            "success = \"result <> 1\"",
            "analysis[0].success: \"result <> 1\" is not a condition: \"<>\" is not a comparison",
        ),
        (
            "interval = \"soon\"",
            "analysis[0].interval: \"soon\" is not a duration",
        ),
        ("count = 0", "analysis[0].count: 0 is not between 1 and 100"),
        (
            "on_inconclusive = \"maybe\"",
            "analysis[0].on_inconclusive: \"maybe\" is not \"fail\" or \"pause\"",
        ),
        ("when = \"now\"", "unknown field `when`"),
    ];
    for (line, needle) in cases {
        let success = if line.starts_with("success") {
            ""
        } else {
            "success = \"result < 0.01\"\n"
        };
        let lines = format!("prometheus = \"{url}\"\nquery = \"up\"\n{success}{line}");
        let path = toml_file(&fleet, "static.toml", &lines);
        assert_refused(&cli(&fleet, &["plan", "-f", &path]), &[needle]);
    }
    let dup = toml_file(
        &fleet,
        "dup.toml",
        &format!("prometheus = \"{url}\"\nquery = \"up\"\nsuccess = \"result > 0\"\n\n[[analysis]]\nname = \"error-rate\"\nprometheus = \"{url}\"\nquery = \"up\"\nsuccess = \"result > 0\""),
    );
    assert_refused(
        &cli(&fleet, &["rollout", "start", "-f", &dup]),
        &["analysis[1].name: \"error-rate\" is used by an earlier analysis"],
    );
    assert_eq!(rollouts(&fleet).await, before, "nothing started");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_prometheus_is_named() {
    let fleet = installed_fleet(2).await;
    push(&fleet, "2.0.0", true).await;
    let before = rollouts(&fleet).await;

    // At plan time: nothing listens there.
    let nowhere = format!("http://127.0.0.1:{}", free_port().unwrap());
    let path = toml_file(
        &fleet,
        "nowhere.toml",
        &format!("prometheus = \"{nowhere}\"\nquery = \"up\"\nsuccess = \"result > 0\""),
    );
    let unreachable = format!("analysis[0].prometheus: prometheus {nowhere} unreachable: ");
    assert_refused(&cli(&fleet, &["plan", "-f", &path]), &[&unreachable]);
    assert_refused(
        &cli(&fleet, &["rollout", "start", "-f", &path]),
        &[&unreachable],
    );
    assert_eq!(rollouts(&fleet).await, before, "nothing started");

    // At run time: Prometheus goes away after the first measurement.
    let mut prometheus = Prometheus::start(&ports(&fleet)).await;
    let _load = Load::start(&fleet);
    prometheus.wait_for_traffic(2).await;
    let a = analysis(&prometheus.url, |a| {
        a.interval = Some("1s".into());
        a.count = Some(10);
        a.consecutive_error_limit = Some(2);
    });
    let started = fleet
        .api()
        .unwrap()
        .start_rollout(spec("2.0.0", "20s", a))
        .await
        .unwrap();
    let id = started.rollout.id;
    wait_rollout(&fleet, id, "a first measurement", |r| {
        r.analysis
            .first()
            .is_some_and(|a| !a.measurements.is_empty())
    })
    .await;
    prometheus.kill();
    let r = wait_done(&fleet, id).await;
    assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
    let reason = r.reason.clone().unwrap();
    assert!(
        reason.starts_with("analysis error-rate failed in wave 1 of 2: 3 query errors in a row (consecutive_error_limit 2; last: "),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("prometheus {} unreachable: ", prometheus.url)),
        "{reason}"
    );
    let errors = r.analysis[0]
        .measurements
        .iter()
        .filter(|m| m.verdict == Verdict::Error)
        .count();
    assert_eq!(errors, 3, "{r:#?}");
    assert_fleet_on(&fleet, "1.0.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_analysis_goes_on_where_it_was_after_a_control_plane_crash() {
    let mut fleet = installed_fleet(1).await;
    let prometheus = Prometheus::start(&ports(&fleet)).await;
    let _load = Load::start(&fleet);
    prometheus.wait_for_traffic(1).await;
    push(&fleet, "2.0.0", true).await;
    let a = analysis(&prometheus.url, |a| a.count = Some(4));
    let started = fleet
        .api()
        .unwrap()
        .start_rollout(spec("2.0.0", "2s", a))
        .await
        .unwrap();
    let id = started.rollout.id;
    let seen = wait_rollout(&fleet, id, "two measurements", |r| {
        r.analysis
            .first()
            .is_some_and(|a| a.measurements.len() >= 2)
    })
    .await;
    fleet.kill_server();
    fleet.restart_server().await.unwrap();
    let r = wait_done(&fleet, id).await;
    assert_eq!(r.state, RolloutState::Completed, "{r:#?}");
    let run = &r.analysis[0];
    assert_eq!(run.state, RunState::Passed, "{run:#?}");
    // What was stored counts: taken once, not again from the start.
    assert_eq!(run.measurements.len(), 4, "{run:#?}");
    let before = &seen.analysis[0].measurements;
    assert_eq!(&run.measurements[..before.len()], &before[..], "{run:#?}");
}
