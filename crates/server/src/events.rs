//! The change stream behind `GET /v1/events`: every change of a rollout or a
//! node, in order, as server-sent events, for the dashboard and any client
//! that follows the fleet live.
//!
//! Producers push entries into one bounded ring, each under a sequence
//! number that only grows; a subscriber reads what follows the last number it
//! sent and sleeps on a `watch` channel until there is more. A subscriber
//! whose position the ring no longer holds (it was away or read too slowly
//! for too long, or names another run of the control plane) first gets a
//! `reset`: it refetches snapshots and follows from there. So a client sees
//! every entry after its position, or a `reset`, never a silent gap.
//!
//! The reconciler feeds rollouts through a [`RolloutFeed`]: each new entry
//! of a rollout's execution log as a `log` event of its own, then one
//! `rollout` event with what changed. Agent sessions feed `node` events.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use futures_util::Stream;
use rollwave_api::{stream as kind, LogEntry, Reset, ResetReason, RolloutChange, RolloutHead};
use rollwave_core::{NodeProgress, NodeView, Rollout};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{now_ms, ApiError, Shared};

/// Entries the ring holds. A 10,000-node rollout logs a few entries per
/// node; a client away for longer than that is reset.
pub const CAPACITY: usize = 10_000;
/// A comment line this often keeps proxies and browsers from closing an
/// idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Entries a subscriber copies out per lock of the ring.
const READ_BATCH: usize = 256;

#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub kind: &'static str,
    /// The rollout it is about, for `?rollout=`.
    pub rollout: Option<u64>,
    pub data: Arc<str>,
}

/// The ring of change events of this run of the control plane.
pub struct Events {
    /// Names this run: ids of another run are unknown here.
    epoch: String,
    capacity: usize,
    ring: Mutex<Ring>,
    /// The newest sequence number, to wake subscribers.
    wake: watch::Sender<u64>,
}

#[derive(Default)]
struct Ring {
    entries: VecDeque<Entry>,
    /// The sequence number of the newest entry; 0 before the first.
    last: u64,
    closed: bool,
}

impl Ring {
    /// The sequence number of the oldest entry held, or of the next one.
    fn oldest(&self) -> u64 {
        self.entries.front().map_or(self.last + 1, |e| e.seq)
    }
}

/// Where a subscriber starts: after `after`, with a `reset` first if its
/// position is unknown.
#[derive(Debug, PartialEq, Eq)]
pub struct Start {
    pub after: u64,
    pub reset: Option<ResetReason>,
}

#[derive(Debug)]
pub enum Read {
    /// What follows, up to `through` (entries the filter left out included).
    Entries { entries: Vec<Entry>, through: u64 },
    /// The ring no longer holds what follows; the newest is `last`.
    Expired { last: u64 },
    /// The control plane is shutting down.
    Closed,
}

impl Events {
    pub fn new(capacity: usize) -> Events {
        let epoch = format!("{:x}{:x}", now_ms(), std::process::id());
        Events::with_epoch(epoch, capacity)
    }

    fn with_epoch(epoch: String, capacity: usize) -> Events {
        Events {
            epoch,
            capacity: capacity.max(1),
            ring: Mutex::default(),
            wake: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The id of the event with sequence number `seq`.
    pub fn id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.epoch)
    }

    pub fn push(&self, kind: &'static str, rollout: Option<u64>, data: String) {
        self.push_all(vec![(kind, rollout, data)]);
    }

    /// Appends entries with consecutive sequence numbers: no other entry
    /// comes between them.
    pub fn push_all(&self, items: Vec<(&'static str, Option<u64>, String)>) {
        if items.is_empty() {
            return;
        }
        let last = {
            let mut ring = self.lock();
            for (kind, rollout, data) in items {
                ring.last += 1;
                let seq = ring.last;
                if ring.entries.len() >= self.capacity {
                    ring.entries.pop_front();
                }
                ring.entries.push_back(Entry {
                    seq,
                    kind,
                    rollout,
                    data: data.into(),
                });
            }
            ring.last
        };
        self.wake.send_replace(last);
    }

    /// A node's view changed.
    pub fn node(&self, view: &NodeView) {
        self.push(kind::NODE, None, json(view));
    }

    /// Ends every subscription (the control plane is shutting down).
    pub fn close(&self) {
        let last = {
            let mut ring = self.lock();
            ring.closed = true;
            ring.last
        };
        self.wake.send_replace(last);
    }

    /// Where a client that last saw `last_event_id` starts.
    pub fn start(&self, last_event_id: Option<&str>) -> Start {
        let ring = self.lock();
        let reset = |reason| Start {
            after: ring.last,
            reset: Some(reason),
        };
        let Some(id) = last_event_id else {
            return reset(ResetReason::New);
        };
        let seq = id
            .trim()
            .rsplit_once('-')
            .filter(|(epoch, _)| *epoch == self.epoch)
            .and_then(|(_, seq)| seq.parse::<u64>().ok());
        match seq {
            None => reset(ResetReason::UnknownId),
            Some(seq) if seq > ring.last => reset(ResetReason::UnknownId),
            Some(seq) if seq + 1 < ring.oldest() => reset(ResetReason::Expired),
            Some(seq) => Start {
                after: seq,
                reset: None,
            },
        }
    }

    /// The entries after `after`, at most [`READ_BATCH`], of `rollout` only
    /// if given.
    pub fn read(&self, after: u64, rollout: Option<u64>) -> Read {
        let ring = self.lock();
        if ring.closed {
            return Read::Closed;
        }
        let oldest = ring.oldest();
        if after + 1 < oldest {
            return Read::Expired { last: ring.last };
        }
        // Sequence numbers are consecutive, so a position is an offset.
        let from = (after + 1 - oldest) as usize;
        let mut through = after;
        let mut entries = Vec::new();
        for e in ring
            .entries
            .range(from.min(ring.entries.len())..)
            .take(READ_BATCH)
        {
            through = e.seq;
            if rollout.is_none() || e.rollout == rollout {
                entries.push(e.clone());
            }
        }
        Read::Entries { entries, through }
    }

    /// The stream of a client that last saw `last_event_id`.
    pub fn subscribe(
        self: &Arc<Self>,
        last_event_id: Option<&str>,
        rollout: Option<u64>,
    ) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
        let start = self.start(last_event_id);
        let mut sub = Subscriber {
            wake: self.wake.subscribe(),
            events: self.clone(),
            after: start.after,
            rollout,
            pending: VecDeque::new(),
        };
        if let Some(reason) = start.reset {
            sub.reset(reason);
        }
        futures_util::stream::unfold(sub, |mut sub| async move {
            let event = sub.next().await?;
            Some((Ok(event), sub))
        })
    }
}

struct Subscriber {
    events: Arc<Events>,
    wake: watch::Receiver<u64>,
    /// The sequence number of the last entry sent (or skipped by the filter).
    after: u64,
    rollout: Option<u64>,
    pending: VecDeque<SseEvent>,
}

impl Subscriber {
    /// A `reset`, with the id of the position the stream goes on from.
    fn reset(&mut self, reason: ResetReason) {
        let event = SseEvent::default()
            .id(self.events.id(self.after))
            .event(kind::RESET)
            .data(json(&Reset { reason }));
        self.pending.push_back(event);
    }

    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            // Seen before reading: an entry pushed after the read wakes us.
            let _ = *self.wake.borrow_and_update();
            match self.events.read(self.after, self.rollout) {
                Read::Closed => return None,
                Read::Expired { last } => {
                    self.after = last;
                    self.reset(ResetReason::Expired);
                }
                Read::Entries { entries, through } => {
                    let moved = through != self.after;
                    self.after = through;
                    for e in entries {
                        self.pending.push_back(
                            SseEvent::default()
                                .id(self.events.id(e.seq))
                                .event(e.kind)
                                .data(&*e.data),
                        );
                    }
                    if !moved && self.wake.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// For clients that cannot set the `Last-Event-ID` header.
    last_event_id: Option<String>,
    /// Only this rollout's events.
    rollout: Option<String>,
}

/// `GET /v1/events`: the change stream, from after the `Last-Event-ID`
/// header (or `?last_event_id=`), of one rollout with `?rollout=ID`.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "meta",
    params(
        StreamQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event"),
    ),
    responses(
        (status = 200, description = "Server-sent events: `reset`, `log` (a LogEntry), `rollout` (a rollout's head and changed nodes), `node` (a NodeView)", content_type = "text/event-stream", body = String),
        (status = 400, description = "A rollout id that is not a number", body = rollwave_api::ErrorBody),
    )
)]
pub async fn stream(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let rollout = query
        .rollout
        .map(|id| {
            id.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("rollout id {id:?} is not a number")))
        })
        .transpose()?;
    // The header wins: a browser's EventSource sends it when it reconnects.
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(query.last_event_id.as_deref());
    let events = shared.events.subscribe(last, rollout);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

fn json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| {
        tracing::error!(error = %e, "encoding a change event");
        "null".into()
    })
}

/// What the stream has carried of each rollout, so that each pass pushes
/// only what changed, and each execution-log entry exactly once.
#[derive(Default)]
pub struct RolloutFeed {
    seen: HashMap<u64, Seen>,
}

#[derive(Default)]
struct Seen {
    /// None until the first event.
    generation: Option<u64>,
    /// Log entries carried.
    log_len: usize,
    /// Entries carried are no longer in the log: a reset goes first.
    rewound: bool,
    /// Each node's progress as last carried; emptied when the rollout
    /// leaves the reconciler, so that a rollout that comes back (a rollback
    /// of a finished one) is carried whole again.
    nodes: BTreeMap<String, NodeProgress>,
}

impl RolloutFeed {
    /// Takes what `r` holds now as carried already. For rollouts read from
    /// the store, whose log was written before this run of the control
    /// plane or already carried by it; a rollout the feed has never seen is
    /// carried from its first log entry.
    pub fn baseline(&mut self, r: &Rollout) {
        self.seen.entry(r.id).or_insert_with(|| Seen {
            generation: Some(r.generation),
            log_len: r.events.len(),
            rewound: false,
            nodes: r.nodes.clone(),
        });
    }

    /// `r` was read back from the store after a write failed: the log
    /// entries the stream carried beyond its log are gone (the store's log
    /// is a prefix of the one in memory, so its length tells).
    pub fn reloaded(&mut self, r: &Rollout) {
        if let Some(seen) = self.seen.get_mut(&r.id) {
            if r.events.len() < seen.log_len {
                seen.rewound = true;
                seen.log_len = r.events.len();
            }
            seen.generation = None;
        }
    }

    /// Pushes what changed in `r` since it was last observed: its new log
    /// entries in order, then a `rollout` event. Cheap when nothing changed:
    /// a write bumps the generation, and every change between writes (a task
    /// phase) appends to the log.
    pub fn observe(&mut self, r: &Rollout, events: &Events) {
        let seen = self.seen.entry(r.id).or_default();
        if seen.generation == Some(r.generation) && seen.log_len == r.events.len() {
            return;
        }
        let mut out = Vec::new();
        if seen.rewound || r.events.len() < seen.log_len {
            tracing::warn!(
                rollout = r.id,
                carried = seen.log_len,
                now = r.events.len(),
                "execution log went back; streaming a reset"
            );
            let reset = Reset {
                reason: ResetReason::Rewound,
            };
            out.push((kind::RESET, Some(r.id), json(&reset)));
            seen.log_len = seen.log_len.min(r.events.len());
            seen.rewound = false;
        }
        for (index, event) in r.events.iter().enumerate().skip(seen.log_len) {
            let entry = LogEntry {
                rollout: r.id,
                index,
                event: event.clone(),
            };
            out.push((kind::LOG, Some(r.id), json(&entry)));
        }
        // One walk of both maps side by side (both are sorted by name):
        // a 10,000-node rollout is compared without a lookup per node.
        let mut changed = BTreeMap::new();
        let mut counts = BTreeMap::new();
        let mut before = seen.nodes.iter().peekable();
        for (name, n) in &r.nodes {
            *counts.entry(n.state.as_str()).or_insert(0) += 1;
            while before
                .next_if(|(b, _)| b.as_str() < name.as_str())
                .is_some()
            {}
            let same = before
                .next_if(|(b, _)| *b == name)
                .is_some_and(|(_, b)| b == n);
            if !same {
                changed.insert(name.as_str(), n);
            }
        }
        let change = RolloutChange {
            rollout: RolloutHead::of(r),
            counts,
            nodes: changed,
            log_len: r.events.len(),
        };
        out.push((kind::ROLLOUT, Some(r.id), json(&change)));
        for (name, n) in change.nodes {
            seen.nodes.insert(name.to_string(), n.clone());
        }
        seen.generation = Some(r.generation);
        seen.log_len = r.events.len();
        events.push_all(out);
    }

    /// Observes a rollout that leaves the reconciler (it finished).
    pub fn finish(&mut self, r: &Rollout, events: &Events) {
        self.observe(r, events);
        if let Some(seen) = self.seen.get_mut(&r.id) {
            seen.nodes = BTreeMap::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use rollwave_api::LogEntry;
    use rollwave_core::{plan_batches, Fleet, Health, RolloutEvent, RolloutFile, ServiceView};

    fn events(capacity: usize) -> Arc<Events> {
        Arc::new(Events::with_epoch("e1".into(), capacity))
    }

    fn push_n(ev: &Events, n: usize) {
        for i in 0..n {
            ev.push(kind::NODE, None, format!("{i}"));
        }
    }

    fn seqs(read: Read) -> Vec<u64> {
        match read {
            Read::Entries { entries, .. } => entries.iter().map(|e| e.seq).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_client_resumes_after_its_last_event_or_is_reset() {
        let ev = events(5);
        push_n(&ev, 3);
        let start = |id: Option<&str>| ev.start(id);
        assert_eq!(
            start(None),
            Start {
                after: 3,
                reset: Some(ResetReason::New)
            }
        );
        assert_eq!(
            start(Some("e1-1")),
            Start {
                after: 1,
                reset: None
            }
        );
        assert_eq!(seqs(ev.read(1, None)), [2, 3]);
        assert_eq!(seqs(ev.read(3, None)), Vec::<u64>::new());
        // From before the first event: everything is still held.
        assert_eq!(start(Some("e1-0")).reset, None);
        for foreign in ["e0-2", "e1-9", "junk", "e1-x", ""] {
            assert_eq!(
                start(Some(foreign)),
                Start {
                    after: 3,
                    reset: Some(ResetReason::UnknownId)
                },
                "{foreign}"
            );
        }
        push_n(&ev, 4);
        // The ring holds 3..=7: after 2 is the oldest position it can serve.
        assert_eq!(start(Some("e1-2")).reset, None);
        assert_eq!(seqs(ev.read(2, None)), [3, 4, 5, 6, 7]);
        assert_eq!(
            start(Some("e1-1")),
            Start {
                after: 7,
                reset: Some(ResetReason::Expired)
            }
        );
        assert!(matches!(ev.read(1, None), Read::Expired { last: 7 }));
    }

    #[test]
    fn a_filter_skips_other_rollouts_but_moves_the_position() {
        let ev = events(10);
        ev.push_all(vec![
            (kind::LOG, Some(1), "a".into()),
            (kind::LOG, Some(2), "b".into()),
            (kind::NODE, None, "c".into()),
            (kind::LOG, Some(1), "d".into()),
        ]);
        match ev.read(0, Some(1)) {
            Read::Entries { entries, through } => {
                assert_eq!(through, 4);
                let data: Vec<&str> = entries.iter().map(|e| &*e.data).collect();
                assert_eq!(data, ["a", "d"]);
            }
            other => panic!("{other:?}"),
        }
    }

    /// The id, kind and data of each SSE frame in `text`.
    fn frames(text: &str) -> Vec<(String, String, String)> {
        text.split("\n\n")
            .filter(|f| !f.trim().is_empty())
            .map(|f| {
                let field = |name: &str| {
                    f.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .unwrap_or_default()
                        .to_string()
                };
                (field("id: "), field("event: "), field("data: "))
            })
            .collect()
    }

    async fn collect(
        stream: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
        n: usize,
    ) -> Vec<(String, String, String)> {
        let body = Sse::new(stream.take(n)).into_response().into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        frames(std::str::from_utf8(&bytes).unwrap())
    }

    #[tokio::test]
    async fn a_subscriber_gets_what_follows_as_it_is_pushed() {
        let ev = events(100);
        push_n(&ev, 2);
        let stream = ev.subscribe(Some("e1-1"), None);
        let pusher = {
            let ev = ev.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                push_n(&ev, 2);
            })
        };
        let got = collect(stream, 3).await;
        pusher.await.unwrap();
        let ids: Vec<&str> = got.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(ids, ["e1-2", "e1-3", "e1-4"]);
        assert!(got.iter().all(|f| f.1 == "node"));

        // A new client: a reset naming where it stands, then what follows.
        let stream = ev.subscribe(None, None);
        push_n(&ev, 1);
        let got = collect(stream, 2).await;
        assert_eq!(got[0].0, "e1-4");
        assert_eq!(got[0].1, "reset");
        assert_eq!(got[0].2, r#"{"reason":"new"}"#);
        assert_eq!(got[1].0, "e1-5");

        // Closing ends every stream.
        let stream = ev.subscribe(Some("e1-5"), None);
        ev.close();
        assert!(collect(stream, 10).await.is_empty());
    }

    fn rollout(nodes: usize) -> Rollout {
        let fleet: Fleet = (1..=nodes)
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
            .collect();
        let spec = RolloutFile {
            service: Some("api".into()),
            version: Some("2.0.0".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        plan_batches(7, spec, &fleet, 0).unwrap()
    }

    fn log(r: &mut Rollout, node: Option<&str>, message: &str) {
        r.events.push(RolloutEvent {
            at: 1,
            node: node.map(str::to_string),
            message: message.into(),
        });
    }

    /// Every entry in the ring, as (kind, data).
    fn drain(ev: &Events) -> Vec<(&'static str, serde_json::Value)> {
        match ev.read(0, None) {
            Read::Entries { entries, .. } => entries
                .iter()
                .map(|e| (e.kind, serde_json::from_str(&e.data).unwrap()))
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    fn logs(all: &[(&'static str, serde_json::Value)]) -> Vec<(usize, String)> {
        all.iter()
            .filter(|(k, _)| *k == kind::LOG)
            .map(|(_, d)| {
                let e: LogEntry = serde_json::from_value(d.clone()).unwrap();
                (e.index, e.event.message)
            })
            .collect()
    }

    #[test]
    fn the_feed_carries_each_log_entry_once_and_only_changed_nodes() {
        let ev = events(1000);
        let mut feed = RolloutFeed::default();
        let mut r = rollout(3);
        let planned = r.events.len();
        feed.observe(&r, &ev);
        feed.observe(&r, &ev);
        let first = drain(&ev);
        assert_eq!(logs(&first).len(), planned);
        let rollouts: Vec<_> = first.iter().filter(|(k, _)| *k == kind::ROLLOUT).collect();
        assert_eq!(
            rollouts.len(),
            1,
            "an unchanged rollout is not pushed again"
        );
        let change = &rollouts[0].1;
        assert_eq!(change["id"], 7);
        assert_eq!(change["state"], "running");
        assert_eq!(change["nodes"].as_object().unwrap().len(), 3);
        assert_eq!(change["counts"]["pending"], 3);
        assert_eq!(change["log_len"], planned);
        assert!(change.get("events").is_none() && change.get("batches").is_none());

        // A phase: one more entry, one node changed.
        r.nodes.get_mut("n2").unwrap().phase = Some("switching".into());
        log(&mut r, Some("n2"), "switching");
        feed.observe(&r, &ev);
        let all = drain(&ev);
        let new = &all[first.len()..];
        assert_eq!(logs(new), [(planned, "switching".to_string())]);
        assert_eq!(new[1].1["nodes"].as_object().unwrap().len(), 1);
        assert!(new[1].1["nodes"]["n2"].is_object());

        // It finishes in a write and comes back later (a rollback): the log
        // goes on where it was, every node is carried again.
        r.generation += 1;
        log(&mut r, None, "rollout completed");
        feed.finish(&r, &ev);
        let mut back = r.clone();
        feed.baseline(&back);
        back.generation += 1;
        log(&mut back, None, "rollout rolling_back");
        feed.observe(&back, &ev);
        let all = drain(&ev);
        let indices: Vec<usize> = logs(&all).iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, (0..back.events.len()).collect::<Vec<_>>());
        let last = &all.last().unwrap().1;
        assert_eq!(last["nodes"].as_object().unwrap().len(), 3);
    }

    #[test]
    fn a_rollout_read_from_the_store_is_carried_from_there() {
        let ev = events(1000);
        let mut feed = RolloutFeed::default();
        let mut r = rollout(2);
        feed.baseline(&r);
        feed.observe(&r, &ev);
        assert!(drain(&ev).is_empty());
        r.generation += 1;
        log(&mut r, None, "rollback requested");
        feed.observe(&r, &ev);
        assert_eq!(
            logs(&drain(&ev)),
            [(r.events.len() - 1, "rollback requested".to_string())]
        );
    }

    #[test]
    fn a_log_that_went_back_is_announced_by_a_reset() {
        let ev = events(1000);
        let mut feed = RolloutFeed::default();
        let mut r = rollout(1);
        log(&mut r, Some("n1"), "downloading");
        feed.observe(&r, &ev);
        let before = drain(&ev).len();
        // The write failed; the stored copy, without the phase, came back,
        // and the next pass logged as much again.
        r.events.pop();
        feed.reloaded(&r);
        r.generation += 1;
        log(&mut r, Some("n1"), "upgraded");
        feed.observe(&r, &ev);
        let all = drain(&ev);
        let new = &all[before..];
        assert_eq!(new[0].0, kind::RESET);
        assert_eq!(new[0].1["reason"], "rewound");
        assert_eq!(logs(new), [(r.events.len() - 1, "upgraded".to_string())]);
    }
}
