//! The dashboard in a real headless Chromium, driven over WebDriver
//! (`chromedriver`), during real rollouts (a rolling one paused and resumed,
//! a canary held for its promotion, one rolled back, one failed) and a
//! restart of the control plane.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use rollwave_core::{CountOrText, NodeState, RolloutState, WaveFile};

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

/// Clicks the element `css` finds. Live updates replace elements as events
/// arrive, so one found may be gone by the click: then it is found again.
async fn click(browser: &Client, css: &str) {
    wait_until(&format!("{css} to be clicked"), || async {
        let el = browser.find(Locator::Css(css)).await.ok()?;
        el.click().await.ok()
    })
    .await
}

/// What the page shows, as a reader sees it (hidden and folded parts left
/// out).
async fn page_text(browser: &Client) -> String {
    let shown = browser
        .execute("return document.body.innerText;", Vec::new())
        .await
        .unwrap();
    shown.as_str().unwrap_or_default().to_string()
}

/// The colour the first element `css` finds is painted with, as the browser
/// computed it, once there is one.
async fn wait_color(browser: &Client, css: &str) -> String {
    wait_until(&format!("{css} to be shown"), || async {
        let color = browser
            .execute(
                "const el = document.querySelector(arguments[0]); \
                 return el ? getComputedStyle(el).backgroundColor : null;",
                vec![serde_json::json!(css)],
            )
            .await
            .ok()?;
        color.as_str().map(str::to_string)
    })
    .await
}

/// Whether `css` finds nothing.
async fn absent(browser: &Client, css: &str) -> bool {
    browser.find(Locator::Css(css)).await.is_err()
}

async fn wait_signin_dialog(browser: &Client) {
    wait_until("the sign-in dialog", || async {
        let open = browser
            .execute("return document.querySelector('#signin').open;", Vec::new())
            .await
            .ok()?;
        (open == serde_json::Value::Bool(true)).then_some(())
    })
    .await;
}

async fn type_token(browser: &Client, token: &str) {
    browser
        .find(Locator::Css("#signin-token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    click(browser, "#signin-go").await;
}

/// Opens the Fleet page and signs in with a new operator token.
async fn sign_in(fleet: &rollwave::fleet::Fleet, browser: &Client) {
    let operator = fleet
        .create_token("dashboard-user", rollwave_core::Role::Operator, Some("1h"))
        .await
        .unwrap();
    browser
        .goto(&format!("{}/#/fleet", fleet.url()))
        .await
        .unwrap();
    wait_signin_dialog(browser).await;
    type_token(browser, &operator.token).await;
    wait_text(browser, "#conn", "live").await;
}

/// The CLI's `rollout list` PROGRESS of rollout `id`.
fn cli_progress(fleet: &rollwave::fleet::Fleet, id: u64) -> String {
    let out = cli(fleet, &["rollout", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>());
    let head = lines.next().unwrap();
    let column = head.iter().position(|c| *c == "PROGRESS").unwrap();
    lines
        .find(|cols| cols.first() == Some(&id.to_string().as_str()))
        .unwrap_or_else(|| panic!("rollout {id} is not listed: {text}"))[column]
        .to_string()
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
    // It says how to sign in here, with the form, not how the CLI is given
    // a token.
    wait_signin_dialog(&browser).await;
    let said = wait_until("the page to say why it shows nothing", || async {
        text(&browser, "#error-text")
            .await
            .filter(|t| !t.is_empty())
    })
    .await;
    assert_eq!(said, "loading: not signed in: sign in with an API token");
    let not_for_browsers = ["--token", "ROLLWAVE_TOKEN"];
    let shown = page_text(&browser).await;
    for words in not_for_browsers {
        assert!(!shown.contains(words), "{words}: {shown}");
    }
    assert!(
        shown.contains("Paste an API token below and sign in"),
        "{shown}"
    );
    // A token the control plane does not know: the form says so.
    type_token(&browser, "rw_0000_0000").await;
    wait_text(
        &browser,
        "#signin-error",
        "the token is not known to this control plane",
    )
    .await;
    wait_signin_dialog(&browser).await;
    let shown = page_text(&browser).await;
    for words in not_for_browsers {
        assert!(!shown.contains(words), "{words}: {shown}");
    }
    type_token(&browser, &operator.token).await;
    let node_version = |n: u32| format!(r#"[data-node="node-{n}"] [data-service="api"] .version"#);
    for n in 1..=3 {
        wait_text(&browser, &node_version(n), "1.0.0").await;
    }
    // A version's colour, while it is the only one.
    let legend = |v: &str| format!(r#"#services .legend .swatch[data-version="{v}"]"#);
    let first = wait_color(&browser, &legend("1.0.0")).await;
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
    // A version keeps its colour when another appears, and two versions
    // differ; the nodes' own versions wear the same colours.
    let old = wait_color(&browser, &legend("1.0.0")).await;
    let new = wait_color(&browser, &legend("2.0.0")).await;
    assert_eq!(old, first, "1.0.0 changed colour when 2.0.0 appeared");
    assert_ne!(old, new, "1.0.0 and 2.0.0 look the same");
    let node_swatch = |n: u32, v: &str| {
        format!(r#"#nodes [data-node="node-{n}"] [data-service="api"] .swatch[data-version="{v}"]"#)
    };
    assert_eq!(wait_color(&browser, &node_swatch(1, "2.0.0")).await, new);
    assert_eq!(wait_color(&browser, &node_swatch(3, "1.0.0")).await, old);

    // To the rollout's page through the links, and pause it there. The list
    // and the page show each version in the Fleet page's colour.
    click(&browser, "#nav-rollouts").await;
    let row = format!(r#"#rollouts [data-rollout="{}"]"#, r.id);
    let listed = |v: &str| format!(r#"{row} .swatch[data-version="{v}"]"#);
    assert_eq!(wait_color(&browser, &listed("1.0.0")).await, old);
    assert_eq!(wait_color(&browser, &listed("2.0.0")).await, new);
    click(&browser, &format!(r##"a[href="#/rollouts/{}"]"##, r.id)).await;
    wait_text(&browser, "#rollout-state", "running").await;
    let fact = |v: &str| format!(r#"#rollout-facts .swatch[data-version="{v}"]"#);
    assert_eq!(wait_color(&browser, &fact("1.0.0")).await, old);
    assert_eq!(wait_color(&browser, &fact("2.0.0")).await, new);
    click(&browser, "button#pause").await;
    wait_text(&browser, "#rollout-state", "paused").await;
    assert_eq!(get(&api, r.id).await.unwrap().state, RolloutState::Paused);

    // The Fleet page says a rollout is under way, and links to it.
    click(&browser, "#nav-fleet").await;
    let banner = format!(r#"#active-rollouts [data-rollout="{}"]"#, r.id);
    wait_text(&browser, &format!("{banner} .rollout-state"), "paused").await;
    click(
        &browser,
        &format!(r##"{banner} a[href="#/rollouts/{}"]"##, r.id),
    )
    .await;
    wait_text(&browser, "#rollout-state", "paused").await;
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

    // The first rollout's page still says what it did to each node, not
    // what the node runs now.
    click(&browser, "#nav-rollouts").await;
    click(&browser, &format!(r##"a[href="#/rollouts/{}"]"##, r.id)).await;
    for name in done.nodes.keys() {
        let css = format!(r#"#waves [data-node="{name}"] .node-versions"#);
        wait_text(&browser, &css, "1.0.0 → 2.0.0").await;
    }
    let waves = text(&browser, "#waves").await.unwrap();
    assert!(!waves.contains("3.0.0"), "{waves}");
    assert_same_document(&browser).await;

    browser.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_says_what_a_canary_waits_for_and_how_rollouts_ended() {
    let fleet = installed_fleet(4).await;
    push(&fleet, "2.0.0", true).await;
    let driver = Driver::start(&fleet.dir).await;
    let browser = driver.browser().await;
    sign_in(&fleet, &browser).await;
    browser
        .execute("window.sameDocument = true;", Vec::new())
        .await
        .unwrap();
    let node_version = |n: u32| format!(r#"[data-node="node-{n}"] [data-service="api"] .version"#);
    for n in 1..=4 {
        wait_text(&browser, &node_version(n), "1.0.0").await;
    }

    // A canary that waits for a promotion after its first node.
    let r = start(&fleet, "2.0.0", |s| {
        s.kind = Some("canary".into());
        s.batch = None;
        s.waves = Some(vec![
            WaveFile::Table {
                size: CountOrText::Count(1),
                pause: true,
            },
            WaveFile::Size(CountOrText::Text("100%".into())),
        ]);
        s.min_healthy_time = Some("0s".into());
    })
    .await
    .unwrap();
    wait_rollout(&fleet, r.id, "the canary wave to finish", |r| {
        r.waiting.as_deref().is_some_and(|w| w.contains("promote"))
    })
    .await;
    // The Fleet page says it is under way and what it waits for, and links
    // to it.
    let banner = format!(r#"#active-rollouts [data-rollout="{}"]"#, r.id);
    wait_text(
        &browser,
        &format!("{banner} .rollout-state"),
        "waiting for promotion",
    )
    .await;
    click(
        &browser,
        &format!(r##"{banner} a[href="#/rollouts/{}"]"##, r.id),
    )
    .await;
    // Its page says the same, in words for whoever is at it: the Promote
    // button beside them, not the CLI's command.
    wait_text(&browser, "#rollout-state", "waiting for promotion").await;
    wait_text(
        &browser,
        "#rollout-waiting",
        "Wave 1 of 2 is done. The rollout waits for an operator to promote it before wave 2 starts.",
    )
    .await;
    let shown = page_text(&browser).await;
    assert!(!shown.contains("rollwave rollout promote"), "{shown}");
    let promote = browser
        .find(Locator::Css("button#promote"))
        .await
        .unwrap()
        .attr("aria-disabled")
        .await
        .unwrap();
    assert_eq!(promote.as_deref(), Some("false"));
    click(&browser, "button#promote").await;
    wait_text(&browser, "#rollout-state", "completed").await;
    let done = wait_done(&fleet, r.id).await;
    assert!(done.fully_upgraded(), "{done:#?}");
    // Nothing is under way: the Fleet page says nothing of a rollout.
    click(&browser, "#nav-fleet").await;
    for n in 1..=4 {
        wait_text(&browser, &node_version(n), "2.0.0").await;
    }
    assert!(absent(&browser, &banner).await);

    // Rolled back from its page: its progress is what `rollout list` says.
    click(&browser, "#nav-rollouts").await;
    click(&browser, &format!(r##"a[href="#/rollouts/{}"]"##, r.id)).await;
    wait_text(&browser, "#rollout-state", "completed").await;
    click(&browser, "button#rollback").await;
    wait_until("the confirmation", || async {
        let open = browser
            .execute(
                "return document.querySelector('#confirm').open;",
                Vec::new(),
            )
            .await
            .ok()?;
        (open == serde_json::Value::Bool(true)).then_some(())
    })
    .await;
    click(&browser, "#confirm-yes").await;
    wait_text(&browser, "#rollout-state", "rolled back").await;
    let back = wait_done(&fleet, r.id).await;
    assert_eq!(back.state, RolloutState::RolledBack, "{back:#?}");
    assert_eq!(back.count(NodeState::RolledBack), 4, "{back:#?}");
    let progress = cli_progress(&fleet, r.id);
    assert_eq!(progress, "0/4");
    let want = format!("{progress} upgraded, 4 rolled back");
    wait_text(&browser, "#rollout-progress .progress-text", &want).await;
    click(&browser, "#nav-rollouts").await;
    let row = format!(r#"#rollouts [data-rollout="{}"] .progress-text"#, r.id);
    wait_text(&browser, &row, &want).await;

    // A failed rollout: its reason is said once on its page.
    push(&fleet, "3.0.0", false).await;
    let bad = start(&fleet, "3.0.0", |s| {
        s.auto_rollback = Some(false);
        s.healthy_deadline = Some("3s".into());
    })
    .await
    .unwrap();
    let bad = wait_done(&fleet, bad.id).await;
    assert_eq!(bad.state, RolloutState::Failed, "{bad:#?}");
    let (name, failed) = bad
        .nodes
        .iter()
        .find(|(_, n)| n.state == NodeState::Failed)
        .unwrap();
    let reason = failed.reason.clone().unwrap();
    click(&browser, &format!(r##"a[href="#/rollouts/{}"]"##, bad.id)).await;
    wait_text(&browser, "#rollout-state", "failed").await;
    let css = format!(r#"#waves [data-node="{name}"] .node-state"#);
    wait_text(&browser, &css, "failed").await;
    // The page has the whole log (results that come after the end, such as
    // a late download, add to it).
    let api = fleet.api().unwrap();
    wait_until("the page to show the whole log", || async {
        let logged = get(&api, bad.id).await.ok()?.events.len();
        let title = format!("Execution log ({logged} entries)");
        (text(&browser, "#rollout-log-title").await? == title).then_some(())
    })
    .await;
    let rollout_reason = text(&browser, "#rollout-reason").await.unwrap();
    assert!(rollout_reason.contains(&reason), "{rollout_reason}");
    let shown = page_text(&browser).await;
    assert_eq!(shown.matches(&reason).count(), 1, "{reason:?} in {shown}");
    assert_same_document(&browser).await;

    browser.close().await.unwrap();
}
