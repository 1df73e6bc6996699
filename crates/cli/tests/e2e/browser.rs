//! The dashboard in a real headless Chromium, driven over WebDriver
//! (`chromedriver`), during a real rollout and a restart of the control
//! plane.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use rollwave_core::{NodeState, RolloutState};

use crate::harness::*;

/// A program on the PATH (or where Debian puts it).
fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            PathBuf::from("/usr/bin"),
            PathBuf::from("/usr/lib/chromium"),
        ])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: run scripts/test.sh, which installs it \
                 (or `apt-get install chromium chromium-driver`)"
            )
        })
}

/// `chromedriver` on an ephemeral port, killed with the browsers it started
/// when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start(dir: &Path) -> Driver {
        let exe = program("chromedriver");
        for _ in 0..5 {
            let port = rollwave::fleet::free_port().unwrap();
            let log = std::fs::File::create(dir.join("chromedriver.log")).unwrap();
            let child = Command::new(&exe)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .process_group(0)
                .spawn()
                .unwrap();
            let driver = Driver {
                child,
                url: format!("http://127.0.0.1:{port}"),
            };
            for _ in 0..100 {
                let status = reqwest::get(format!("{}/status", driver.url)).await;
                if status.is_ok_and(|s| s.status().is_success()) {
                    return driver;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Another process took the port first: try another.
        }
        panic!(
            "chromedriver did not start; see {}",
            dir.join("chromedriver.log").display()
        );
    }

    async fn browser(&self) -> Client {
        let chrome = serde_json::json!({
            "binary": program("chromium"),
            "args": [
                "--headless=new",
                // The tests may run as root, in a container.
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--disable-gpu",
                "--window-size=1366,768",
            ],
        });
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), chrome);
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .unwrap()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of the first element `css` finds, if any.
async fn text(browser: &Client, css: &str) -> Option<String> {
    let el = browser.find(Locator::Css(css)).await.ok()?;
    el.text().await.ok().map(|t| t.trim().to_string())
}

/// Waits until the element `css` finds reads `want`.
async fn wait_text(browser: &Client, css: &str, want: &str) {
    wait_until(&format!("{css} to read {want:?}"), || async {
        (text(browser, css).await.as_deref() == Some(want)).then_some(())
    })
    .await
}

async fn click(browser: &Client, css: &str) {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// The page never reloaded since the test marked it.
async fn assert_same_document(browser: &Client) {
    let marked = browser
        .execute("return window.sameDocument === true;", Vec::new())
        .await
        .unwrap();
    assert_eq!(marked, serde_json::json!(true), "the page reloaded");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_follows_a_rollout_live_and_pauses_and_resumes_it() {
    let fleet = installed_fleet(3).await;
    let api = fleet.api().unwrap();
    push(&fleet, "2.0.0", true).await;
    let driver = Driver::start(&fleet.dir).await;
    let browser = driver.browser().await;

    // An operator's token, as an admin would hand one out.
    let operator = fleet
        .create_token("dashboard-user", rollwave_core::Role::Operator, Some("1h"))
        .await
        .unwrap();
    browser
        .goto(&format!("{}/#/fleet", fleet.url()))
        .await
        .unwrap();
    // Without a token the page asks for one, and shows nothing until then.
    wait_until("the sign-in dialog", || async {
        let open = browser
            .execute("return document.querySelector('#signin').open;", Vec::new())
            .await
            .ok()?;
        (open == serde_json::Value::Bool(true)).then_some(())
    })
    .await;
    browser
        .find(Locator::Css("#signin-token"))
        .await
        .unwrap()
        .send_keys(&operator.token)
        .await
        .unwrap();
    click(&browser, "#signin-go").await;
    let node_version = |n: u32| format!(r#"[data-node="node-{n}"] [data-service="api"] .version"#);
    for n in 1..=3 {
        wait_text(&browser, &node_version(n), "1.0.0").await;
    }
    // Gone if the page ever reloads.
    browser
        .execute("window.sameDocument = true;", Vec::new())
        .await
        .unwrap();
    wait_text(&browser, "#conn", "live").await;

    let r = start(&fleet, "2.0.0", |s| {
        s.batch = Some("1".into());
        s.min_healthy_time = Some("2s".into());
    })
    .await
    .unwrap();
    // Node versions change in the page as agents report them.
    wait_text(&browser, &node_version(1), "2.0.0").await;
    assert_eq!(
        text(&browser, &node_version(3)).await.as_deref(),
        Some("1.0.0")
    );

    // To the rollout's page through the links, and pause it there.
    click(&browser, "#nav-rollouts").await;
    click(&browser, &format!(r##"a[href="#/rollouts/{}"]"##, r.id)).await;
    wait_text(&browser, "#rollout-state", "running").await;
    click(&browser, "button#pause").await;
    wait_text(&browser, "#rollout-state", "paused").await;
    assert_eq!(get(&api, r.id).await.unwrap().state, RolloutState::Paused);
    // The node in flight finishes; the page shows it without reloading.
    let paused = wait_rollout(&fleet, r.id, "the node in flight to finish", |r| {
        r.in_flight().count() == 0
    })
    .await;
    assert_eq!(paused.state, RolloutState::Paused);
    for (name, n) in &paused.nodes {
        let css = format!(r#"#waves [data-node="{name}"] .node-state"#);
        wait_text(&browser, &css, &n.state.as_str().replace('_', " ")).await;
    }
    assert!(paused.count(NodeState::Pending) >= 1, "{paused:#?}");

    click(&browser, "button#resume").await;
    wait_text(&browser, "#rollout-state", "completed").await;
    let done = wait_done(&fleet, r.id).await;
    assert!(done.fully_upgraded(), "{done:#?}");
    for name in done.nodes.keys() {
        let css = format!(r#"#waves [data-node="{name}"] .node-state"#);
        wait_text(&browser, &css, "upgraded").await;
    }
    let log = format!("#rollout-log li:nth-child({})", done.events.len());
    wait_until("the whole execution log", || async {
        text(&browser, &log).await.map(|_| ())
    })
    .await;
    assert_same_document(&browser).await;

    // Kept for people: what the rollout page looked like.
    let png = browser.screenshot().await.unwrap();
    let target = Path::new(exe()).ancestors().nth(2).unwrap();
    let artifacts = target.join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("rollout.png"), png).unwrap();

    // The control plane restarts: the page reconnects by itself, is told
    // its position is unknown, reloads its data and follows again.
    let mut fleet = fleet;
    fleet.restart_server().await.unwrap();
    fleet.wait_online(3).await.unwrap();
    wait_text(&browser, "#conn", "live").await;
    click(&browser, "#nav-fleet").await;
    push(&fleet, "3.0.0", true).await;
    start(&fleet, "3.0.0", |s| {
        s.batch = Some("100%".into());
        s.min_healthy_time = Some("0s".into());
    })
    .await
    .unwrap();
    for n in 1..=3 {
        wait_text(&browser, &node_version(n), "3.0.0").await;
    }
    assert_same_document(&browser).await;

    browser.close().await.unwrap();
}
