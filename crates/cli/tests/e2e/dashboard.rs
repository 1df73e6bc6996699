//! The web dashboard's assets, and the change stream (`/v1/events`) it
//! follows, during a real rollout.

use std::time::Duration;

use rollwave_api::{LogEntry, Reset, ResetReason};
use rollwave_core::{NodeState, Rollout};

use rollwave::fleet::Fleet;

use crate::harness::*;

/// Every `src="..."` and `href="..."` of a page.
fn references(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for (i, _) in html.match_indices(attr) {
            let rest = &html[i + attr.len()..];
            out.push(rest[..rest.find('"').unwrap()].to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_is_served_whole_from_the_binary() {
    let fleet = rollwave::fleet::Fleet::launch(rollwave::fleet::FleetSpec::new(exe().into(), 0))
        .await
        .unwrap();
    let base = fleet.url();
    let http = fleet.http();
    let resp = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let header = |resp: &reqwest::Response, name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    assert!(header(&resp, "content-type").starts_with("text/html"));
    // The browser itself refuses anything from elsewhere.
    assert!(header(&resp, "content-security-policy").starts_with("default-src 'self'"));
    let html = resp.text().await.unwrap();

    let refs = references(&html);
    let mut assets = Vec::new();
    for r in &refs {
        let local = r.starts_with('#') || r.starts_with("data:") || r.starts_with('/');
        assert!(local && !r.starts_with("//"), "{r} is not on this server");
        if r.starts_with("/ui/") {
            assets.push(r.clone());
        }
    }
    assets.sort();
    assert_eq!(assets, ["/ui/app.css", "/ui/app.js"]);
    let mut texts = vec![html];
    for a in &assets {
        let resp = http.get(format!("{base}{a}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{a}");
        let want = if a.ends_with(".js") {
            "text/javascript"
        } else {
            "text/css"
        };
        assert!(header(&resp, "content-type").starts_with(want), "{a}");
        texts.push(resp.text().await.unwrap());
    }
    for text in &texts {
        assert!(!text.contains("http://") && !text.contains("https://"));
    }
    let resp = http.get(format!("{base}/ui/nope.js")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
}

/// One server-sent event.
#[derive(Debug, Clone)]
struct Frame {
    id: String,
    event: String,
    data: String,
}

impl Frame {
    /// The sequence number in `EPOCH-SEQ`.
    fn seq(&self) -> u64 {
        let (_, seq) = self.id.rsplit_once('-').expect("an id is EPOCH-SEQ");
        seq.parse().expect("SEQ is a number")
    }

    fn epoch(&self) -> &str {
        self.id.rsplit_once('-').expect("an id is EPOCH-SEQ").0
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

/// A client of `/v1/events` reading the response as it arrives.
struct EventStream {
    resp: reqwest::Response,
    buf: String,
}

impl EventStream {
    /// Connects with `Last-Event-ID: last` if given; `query` is appended.
    async fn connect(fleet: &Fleet, query: &str, last: Option<&str>) -> EventStream {
        let base = fleet.url();
        let mut req = fleet.http().get(format!("{base}/v1/events{query}"));
        if let Some(id) = last {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        EventStream {
            resp,
            buf: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped). The limit only guards
    /// against a hung test.
    async fn next(&mut self) -> Frame {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut frame = Frame {
                    id: String::new(),
                    event: "message".into(),
                    data: String::new(),
                };
                let mut data = Vec::new();
                for line in block.lines() {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "id" => frame.id = value.to_string(),
                        "event" => frame.event = value.to_string(),
                        "data" => data.push(value),
                        _ => {}
                    }
                }
                if data.is_empty() {
                    continue;
                }
                frame.data = data.join("\n");
                return frame;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(120), self.resp.chunk())
                .await
                .expect("no event within 120s")
                .unwrap()
                .expect("the stream ended");
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

/// Collects a rollout's log entries from frames, checking that each comes
/// at the index it names: no gap, no repeat.
struct Log {
    entries: Vec<rollwave_core::RolloutEvent>,
    /// The last frame read: each one's id follows it.
    last: Frame,
}

impl Log {
    fn take(&mut self, rollout: u64, f: &Frame) {
        assert_eq!(
            f.seq(),
            self.last.seq() + 1,
            "ids skip after {:?}",
            self.last
        );
        self.last = f.clone();
        if f.event != "log" {
            return;
        }
        let e: LogEntry = serde_json::from_str(&f.data).unwrap();
        if e.rollout == rollout {
            assert_eq!(
                e.index,
                self.entries.len(),
                "{:?} after {:?}",
                e,
                self.entries
            );
            self.entries.push(e.event);
        }
    }
}

fn is_reset(f: &Frame, reason: ResetReason) -> bool {
    f.event == "reset" && serde_json::from_str::<Reset>(&f.data).unwrap().reason == reason
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_reconnects_mid_rollout_gets_every_log_entry_once_in_order() {
    let fleet = installed_fleet(3).await;
    push(&fleet, "2.0.0", true).await;

    // Where the stream stands before the rollout: a new client is told to
    // load snapshots, by a reset carrying its position.
    let mut s = EventStream::connect(&fleet, "", None).await;
    let hello = s.next().await;
    assert!(is_reset(&hello, ResetReason::New), "{hello:?}");
    let before = hello.id.clone();
    drop(s);
    let mut log = Log {
        entries: Vec::new(),
        last: hello,
    };

    let r = start(&fleet, "2.0.0", |s| {
        s.batch = Some("1".into());
        s.min_healthy_time = Some("1s".into());
    })
    .await
    .unwrap();
    let mid = wait_rollout(&fleet, r.id, "a first node upgraded", |r| {
        r.count(NodeState::Upgraded) >= 1
    })
    .await;
    assert!(mid.is_active(), "{mid:#?}");

    // Mid-rollout, from before it began: everything it logged so far, then
    // what it logs while we listen.
    let mut s = EventStream::connect(&fleet, "", Some(&before)).await;
    while log.entries.len() <= mid.events.len() {
        let f = s.next().await;
        assert_ne!(f.event, "reset", "{f:?}");
        log.take(r.id, &f);
    }
    drop(s);

    // Away while the rollout goes on; then back from the last event read.
    wait_rollout(&fleet, r.id, "a second node upgraded", |r| {
        r.count(NodeState::Upgraded) >= 2
    })
    .await;
    let mut s = EventStream::connect(&fleet, "", Some(&log.last.id.clone())).await;
    loop {
        let f = s.next().await;
        assert_ne!(f.event, "reset", "{f:?}");
        log.take(r.id, &f);
        if f.event == "rollout" {
            let d = f.json();
            let ended = d["id"] == r.id && d["state"] != "running" && d["state"] != "paused";
            if ended && d["log_len"] == log.entries.len() {
                break;
            }
        }
    }
    let done: Rollout = wait_done(&fleet, r.id).await;
    assert!(done.fully_upgraded(), "{done:#?}");
    while log.entries.len() < done.events.len() {
        let f = s.next().await;
        log.take(r.id, &f);
    }
    assert_eq!(log.entries, done.events);

    // One rollout's events only, from the same point: the same log.
    let mut s = EventStream::connect(&fleet, &format!("?rollout={}", r.id), None).await;
    let reset = s.next().await;
    assert!(is_reset(&reset, ResetReason::New), "{reset:?}");
    let query = format!("?rollout={}&last_event_id={before}", r.id);
    let mut s = EventStream::connect(&fleet, &query, None).await;
    let mut filtered = Vec::new();
    while filtered.len() < done.events.len() {
        let f = s.next().await;
        assert!(f.event == "log" || f.event == "rollout", "{f:?}");
        assert_eq!(
            f.json()["rollout"].as_u64().or(f.json()["id"].as_u64()),
            Some(r.id)
        );
        if f.event == "log" {
            filtered.push(serde_json::from_str::<LogEntry>(&f.data).unwrap().event);
        }
    }
    assert_eq!(filtered, done.events);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_last_event_id_gets_a_reset_first() {
    let fleet = installed_fleet(1).await;
    let mut s = EventStream::connect(&fleet, "", None).await;
    let first = s.next().await;
    assert!(is_reset(&first, ResetReason::New), "{first:?}");
    let epoch = first.epoch().to_string();

    // The stream goes on from there.
    let mut s = EventStream::connect(&fleet, "", Some(&first.id)).await;
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let next = s.next().await;
    assert_ne!(next.event, "reset", "{next:?}");
    assert_eq!(next.seq(), first.seq() + 1);
    wait_done(&fleet, r.id).await;

    // Another run of the control plane, an id never issued, junk; by header
    // and by query: a reset, naming where the stream goes on from.
    let ahead = format!("{epoch}-{}", u64::MAX);
    for id in ["0-1", ahead.as_str(), "junk"] {
        for by_query in [false, true] {
            let mut s = if by_query {
                let query = format!("?last_event_id={id}");
                EventStream::connect(&fleet, &query, None).await
            } else {
                EventStream::connect(&fleet, "", Some(id)).await
            };
            let f = s.next().await;
            assert!(is_reset(&f, ResetReason::UnknownId), "{id}: {f:?}");
            assert_eq!(f.epoch(), epoch);
            assert!(f.seq() > first.seq(), "{f:?}");
        }
    }

    // After a restart the old ids name another run.
    let mut fleet = fleet;
    fleet.restart_server().await.unwrap();
    fleet.wait_online(1).await.unwrap();
    let mut s = EventStream::connect(&fleet, "", Some(&first.id)).await;
    let f = s.next().await;
    assert!(is_reset(&f, ResetReason::UnknownId), "{f:?}");
    assert_ne!(f.epoch(), epoch);
}
