// rollwave dashboard: plain script, no build step, nothing loaded from
// elsewhere. It reads snapshots from the /v1 API, then follows /v1/events
// (server-sent events) and applies each change as it comes; the controls
// call the same endpoints as the CLI.
'use strict';

// ---------------------------------------------------------------------------
// Access: the one place that decides how requests are authorized. A bearer
// token in localStorage (`rollwave.token`), if any, goes in the
// Authorization header of every request, and as `access_token` in the query
// of the event stream, which browsers open without custom headers.

const access = {
  token() {
    try {
      return localStorage.getItem('rollwave.token') || '';
    } catch (_) {
      return '';
    }
  },
  headers(extra) {
    const headers = Object.assign({}, extra);
    const token = access.token();
    if (token) headers.Authorization = 'Bearer ' + token;
    return headers;
  },
  streamUrl(path) {
    const token = access.token();
    if (!token) return path;
    return path + (path.includes('?') ? '&' : '?') + 'access_token=' + encodeURIComponent(token);
  },
  /** Asks for a token, saying why (the server's 401 message). */
  ask(why) {
    const dialog = $('#signin');
    $('#signin-error').textContent = access.token() ? why : '';
    $('#signout').hidden = !access.token();
    // Back to the form after closing it without signing in.
    $('#signin-open').hidden = false;
    if (!dialog.open) {
      dialog.showModal();
      $('#signin-token').focus();
    }
  },
  signIn(token) {
    try {
      localStorage.setItem('rollwave.token', token);
    } catch (_) {
      // Private windows may refuse storage: the token lasts this page.
      access.token = () => token;
    }
    $('#signout').hidden = false;
    $('#signin-open').hidden = true;
    // Start over with the new token: the stream and every snapshot.
    if (source) source.close();
    connect();
    loadSnapshots();
  },
  signOut() {
    try {
      localStorage.removeItem('rollwave.token');
    } catch (_) {
      // Nothing stored.
    }
    if (source) source.close();
    source = null;
    access.ask('');
  },
};

/** Calls the API; rejects with the server's own error message. */
async function api(method, path, body) {
  const init = {
    method,
    headers: access.headers(body === undefined ? {} : { 'Content-Type': 'application/json' }),
  };
  if (body !== undefined) init.body = JSON.stringify(body);
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new Error('cannot reach the control plane: ' + e.message);
  }
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    // Not JSON: reported below with the status.
  }
  if (!resp.ok) {
    let message = data && data.error && data.error.message;
    if (resp.status === 401) {
      // Without a token the server answers how a CLI user passes one; here
      // the token comes from the sign-in form, which says so itself.
      if (!access.token()) message = 'not signed in: sign in with an API token';
      access.ask(message || 'the token was refused');
    }
    const err = new Error(message || `http ${resp.status}: ${text.slice(0, 200)}`);
    err.status = resp.status;
    throw err;
  }
  return data;
}

// ---------------------------------------------------------------------------
// Small helpers.

/** Builds an element; text is always set as text, never parsed as HTML. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'style') for (const [p, val] of Object.entries(v)) el.style.setProperty(p, val);
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const $ = (sel, root) => (root || document).querySelector(sel);

/**
 * Replaces a container's content and gives focus back to the element that
 * had it (matched by data-key), so that live updates never move a keyboard
 * user's place.
 */
function fill(container, ...children) {
  const active = document.activeElement;
  const key = active && container.contains(active) ? active.getAttribute('data-key') : null;
  container.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  if (key) {
    const again = container.querySelector(`[data-key="${CSS.escape(key)}"]`);
    if (again) again.focus();
  }
}

const pad = (n, w) => String(n).padStart(w || 2, '0');

function fmtTime(ms) {
  if (!ms) return '-';
  const d = new Date(ms);
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  const today = new Date();
  if (d.toDateString() === today.toDateString()) return time;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
}

function fmtTimeMs(ms) {
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function fmtDuration(ms) {
  if (ms < 0 || ms === undefined || ms === null || Number.isNaN(ms)) return '-';
  if (ms < 1000) return `${ms}ms`;
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${pad(s % 60)}s`;
  return `${Math.floor(m / 60)}h ${pad(m % 60)}m`;
}

function ago(ms) {
  if (!ms) return '-';
  return fmtDuration(Math.max(0, Date.now() - ms)).split(' ')[0] + ' ago';
}

function timeEl(ms, withMs) {
  if (!ms) return h('span', { class: 'muted' }, '-');
  return h('time', { datetime: new Date(ms).toISOString(), title: new Date(ms).toLocaleString() },
    withMs ? fmtTimeMs(ms) : fmtTime(ms));
}

/** Orders semantic versions, newest first; anything else after, by name. */
function compareVersions(a, b) {
  const parse = (v) => {
    const m = /^v?(\d+)\.(\d+)\.(\d+)(?:-([^+]*))?/.exec(v || '');
    return m ? [Number(m[1]), Number(m[2]), Number(m[3]), m[4] || null] : null;
  };
  const pa = parse(a);
  const pb = parse(b);
  if (!pa || !pb) return pa ? -1 : pb ? 1 : String(a).localeCompare(String(b));
  for (let i = 0; i < 3; i++) if (pa[i] !== pb[i]) return pb[i] - pa[i];
  if (pa[3] === pb[3]) return 0;
  if (pa[3] === null) return -1;
  if (pb[3] === null) return 1;
  return pb[3].localeCompare(pa[3]);
}

const TERMINAL = new Set(['completed', 'failed', 'cancelled', 'rolled_back', 'rollback_failed']);
const IN_FLIGHT = new Set(['upgrading', 'rolling_back', 'staging', 'converging', 'dry_running']);
/** Node states, in the order progress bars show them. */
const NODE_STATES = ['upgraded', 'staged', 'failed', 'rollback_failed', 'unreachable',
  'rolled_back', 'upgrading', 'staging', 'converging', 'dry_running', 'rolling_back', 'pending'];
/** Node states that ended a node's part other than on the target version. */
const ENDED_ELSEWHERE = ['failed', 'rollback_failed', 'unreachable', 'rolled_back'];

const badge = (state, id) => h('span', { class: `badge s-${state}`, id }, String(state).replace(/_/g, ' '));

/** FNV-1a over the string's UTF-16 units, with a final mix of the bits. */
function hashString(text) {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 0x01000193);
  h = Math.imul(h ^ (h >>> 16), 0x45d9f3b);
  return (h ^ (h >>> 16)) >>> 0;
}

/**
 * A version's colour, from the version string alone, so that a version
 * keeps its colour whatever else the fleet runs and on every page. A
 * semantic version turns each of its numbers by its own angle (the major
 * by the golden angle), so that neighbouring releases (1.0.0, 2.0.0, 3.0.0;
 * 1.1.0, 1.2.0; 1.0.1, 1.0.2) land far apart on the colour wheel, which a
 * hash would not promise; anything after the numbers, and any other
 * string, turns it by a hash.
 */
function versionColor(v) {
  if (!v || v === 'none') return null;
  const m = /^(\d+)\.(\d+)\.(\d+)(.*)$/.exec(v);
  const turn = m
    ? Number(m[1]) * 137.508 + Number(m[2]) * 83.1 + Number(m[3]) * 29.7 + (m[4] ? hashString(m[4]) % 360 : 0)
    : hashString(v) % 360;
  const hue = Math.round(((turn % 360) + 360) % 360);
  return `hsl(${hue}, 60%, 45%)`;
}

/** A small square in a version's colour (grey for none). */
function swatch(v) {
  const color = versionColor(v);
  return h('span', {
    class: color ? 'swatch' : 'swatch cnone', 'data-version': v || 'none', 'aria-hidden': 'true',
    style: color ? { 'background-color': color } : null,
  });
}

/** A version with its colour. */
const versionTag = (v) => h('span', { class: 'version-tag' }, swatch(v), h('span', { class: 'version' }, v || 'none'));

// ---------------------------------------------------------------------------
// State: what the page knows, from snapshots and then events.

const S = {
  nodes: new Map(), // name -> NodeView
  rollouts: new Map(), // id -> rollout (see adopt)
  services: new Map(), // name -> ServiceSummary (its active version)
  loaded: false,
  loading: null, // a promise while snapshots load
  buffer: null, // events received while snapshots load
  reloadAgain: false,
  fetching: new Map(), // rollout id -> promise
  refetch: new Map(), // rollout id -> fetches in a row that left a gap
  missing: new Set(), // rollout ids the server does not know
  ui: {
    filter: '',
    group: '',
    openWaves: new Set(), // "id:wave" of big waves shown
    allLog: new Set(), // rollout ids whose whole log is shown
    logOpen: new Map(), // rollout id -> whether its log was opened or folded by hand
  },
};

const version = (gen, len) => [gen, len];
/** Whether a is at least as new as b: by generation, then log length. */
const newer = (a, b) => a[0] > b[0] || (a[0] === b[0] && a[1] >= b[1]);

/** A rollout as read from the API, with what the page tracks beside it. */
function adopt(full) {
  const r = Object.assign({}, full);
  r.nodes = Object.assign({}, full.nodes);
  r.events = (full.events || []).slice();
  r.pendingLog = [];
  r.version = version(full.generation, r.events.length);
  r.partial = false;
  return r;
}

/**
 * A rollout known from the list, which carries summaries (counts per node
 * state, not nodes): its full copy is fetched when it is shown or active.
 */
function fromSummary(s) {
  return {
    id: s.id, generation: s.generation, spec: { service: s.service, version: s.version },
    state: s.state, reason: s.reason, waiting: s.waiting, created_at: s.created_at,
    updated_at: s.updated_at, finished_at: s.finished_at, waves: s.waves, counts: s.counts,
    nodes: {}, events: [], batches: null, pendingLog: [], version: [-1, -1], partial: true,
  };
}

/** A rollout known only from events so far; its full copy is fetched. */
function stub(id) {
  const r = { id, nodes: {}, events: [], batches: null, pendingLog: [], version: [-1, -1], partial: true, state: 'running' };
  S.rollouts.set(id, r);
  fetchRollout(id);
  return r;
}

function isActive(r) {
  return !TERMINAL.has(r.state) || Object.values(r.nodes).some((n) => IN_FLIGHT.has(n.state) || n.state === 'unreachable');
}

/**
 * The wave (from 0) that is done and waits for an operator to promote the
 * rollout, or -1: the planner's `awaiting_promotion`. It needs the plan, so
 * a rollout known only from the list (a summary) never waits here; an
 * active one's full copy is fetched at once.
 */
function promotionWait(r) {
  if (!r.batches || !r.pauses) return -1;
  const open = r.batches.findIndex((b) => b.some((name) => {
    const s = (r.nodes[name] || {}).state || 'pending';
    return s === 'pending' || IN_FLIGHT.has(s);
  }));
  const done = open - 1;
  return open > 0 && r.pauses[done] === true && !(r.promoted || []).includes(done) ? done : -1;
}

/**
 * A rollout's state in words. A canary held after a wave for a promotion is
 * `running` in the API (nothing failed, nobody paused it), but what it does
 * is wait for an operator, and the badge says so.
 */
function stateOf(r) {
  if (r.state === 'running' && promotionWait(r) >= 0) return { key: 'waiting', text: 'waiting for promotion' };
  return { key: r.state, text: String(r.state).replace(/_/g, ' ') };
}

function stateBadge(r, id) {
  const s = stateOf(r);
  return h('span', { class: `badge s-${s.key} rollout-state`, id, 'data-state': r.state }, s.text);
}

/**
 * What the rollout waits for, in words for someone at this page: the API's
 * `waiting` names the CLI command for a promotion, which is the Promote
 * button here. Said only from the full copy, which has the plan.
 */
function waitingText(r) {
  if (TERMINAL.has(r.state) || r.partial) return '';
  const done = promotionWait(r);
  if (done >= 0) {
    return `Wave ${done + 1} of ${r.batches.length} is done. The rollout waits for an operator to promote it before wave ${done + 2} starts.`;
  }
  return r.waiting || '';
}

/** Appends the pending log entries that now follow on. */
function drainPending(r) {
  r.pendingLog.sort((a, b) => a.index - b.index);
  while (r.pendingLog.length && r.pendingLog[0].index <= r.events.length) {
    const e = r.pendingLog.shift();
    if (e.index === r.events.length) r.events.push({ at: e.at, node: e.node, message: e.message });
  }
}

function applyFull(full) {
  const r = S.rollouts.get(full.id);
  const n = adopt(full);
  if (r && !newer(n.version, r.version)) {
    // The stream is already past this copy: keep what it brought, take what
    // only the copy has.
    if (!r.batches) {
      r.batches = n.batches;
      r.left_out = n.left_out;
      r.nodes = Object.assign({}, n.nodes, r.nodes);
      r.partial = false;
    }
    if (n.events.length > r.events.length) r.events = n.events;
    drainPending(r);
    return;
  }
  if (r) {
    // Both logs are prefixes of the same log: keep the longer.
    if (r.events.length > n.events.length) n.events = r.events;
    n.pendingLog = r.pendingLog;
    drainPending(n);
  }
  S.rollouts.set(n.id, n);
}

function fetchRollout(id) {
  if (S.fetching.has(id)) return S.fetching.get(id);
  const p = api('GET', `/v1/rollouts/${id}`)
    .then((resp) => {
      S.missing.delete(id);
      applyFull(resp.rollout);
    })
    .catch((e) => {
      if (e.status === 404) S.missing.add(id);
      else showError(`rollout ${id}: ${e.message}`);
    })
    .finally(() => {
      S.fetching.delete(id);
      const r = S.rollouts.get(id);
      // A gap the copy did not close: it was read before the entries the
      // stream brought since; the next copy has them.
      if (r && r.pendingLog.length) {
        const tries = (S.refetch.get(id) || 0) + 1;
        S.refetch.set(id, tries);
        if (tries <= 5) fetchRollout(id);
      } else {
        S.refetch.delete(id);
      }
      schedule();
    });
  S.fetching.set(id, p);
  return p;
}

let servicesTimer = null;
/** The active versions change only at a finalize; refetched after one. */
function refreshServices() {
  clearTimeout(servicesTimer);
  servicesTimer = setTimeout(() => {
    api('GET', '/v1/services')
      .then((list) => {
        S.services = new Map(list.map((s) => [s.service, s]));
        schedule();
      })
      .catch((e) => showError(`services: ${e.message}`));
  }, 200);
}

const apply = {
  node(view) {
    S.nodes.set(view.name, view);
  },
  rollout(change) {
    const r = S.rollouts.get(change.id) || stub(change.id);
    const v = version(change.generation, change.log_len);
    if (!newer(v, r.version)) return; // a fetched copy is newer
    const { nodes, counts, log_len, ...head } = change;
    const wasTerminal = TERMINAL.has(r.state);
    Object.assign(r, head);
    Object.assign(r.nodes, nodes);
    r.counts = counts;
    r.version = v;
    if (!wasTerminal && TERMINAL.has(r.state)) refreshServices();
  },
  log(entry) {
    const r = S.rollouts.get(entry.rollout) || stub(entry.rollout);
    if (entry.index < r.events.length) return; // already here
    if (entry.index > r.events.length) {
      // Entries between are missing here (a snapshot older than the
      // stream): the live copy has them.
      r.pendingLog.push(entry);
      fetchRollout(r.id);
      return;
    }
    r.events.push({ at: entry.at, node: entry.node, message: entry.message });
    drainPending(r);
    if (/^finalized:/.test(entry.message)) refreshServices();
  },
};

/** Loads every snapshot; events that arrive meanwhile are applied after. */
function loadSnapshots() {
  if (S.loading) {
    S.reloadAgain = true;
    return S.loading;
  }
  S.buffer = [];
  S.loading = (async () => {
    try {
      const [nodes, rollouts, services] = await Promise.all([
        api('GET', '/v1/nodes'),
        api('GET', '/v1/rollouts'),
        api('GET', '/v1/services'),
      ]);
      S.nodes = new Map(nodes.map((n) => [n.name, n]));
      S.rollouts = new Map(rollouts.map((s) => [s.id, fromSummary(s)]));
      S.services = new Map(services.map((s) => [s.service, s]));
      S.missing.clear();
      S.loaded = true;
      clearError('loading');
    } catch (e) {
      showError(`loading: ${e.message}`, 'loading');
    } finally {
      const buffered = S.buffer;
      S.buffer = null;
      S.loading = null;
      for (const [kind, data] of buffered) apply[kind](data);
      // The list comes from the store; an active rollout's live copy also
      // holds the steps not yet written.
      for (const r of S.rollouts.values()) if (isActive(r)) fetchRollout(r.id);
      const route = currentRoute();
      if (route.id !== undefined) fetchRollout(route.id);
      schedule();
      if (S.reloadAgain) {
        S.reloadAgain = false;
        loadSnapshots();
      }
    }
  })();
  return S.loading;
}

// ---------------------------------------------------------------------------
// The event stream. EventSource reconnects by itself and sends the last id
// it saw, so the server replays what was missed, or says `reset`.

let source = null;
/** The id of the last event received, to resume from. */
let lastEventId = '';

function connect() {
  const conn = $('#conn');
  const setConn = (state, text) => {
    conn.dataset.state = state;
    conn.textContent = text;
  };
  const query = lastEventId ? `?last_event_id=${encodeURIComponent(lastEventId)}` : '';
  if (source) source.close();
  const es = new EventSource(access.streamUrl(`/v1/events${query}`));
  source = es;
  source.addEventListener('open', () => setConn('live', 'live'));
  source.addEventListener('error', () => {
    setConn('reconnecting', 'reconnecting');
    // Show what can be shown even if the stream cannot be opened.
    if (!S.loaded && !S.loading) loadSnapshots();
    // The browser retries by itself after a dropped connection, but gives
    // up after an answer that is not a stream (a proxy's error page, say):
    // then start again, from the last event seen.
    if (es.readyState === EventSource.CLOSED && source === es) {
      source = null;
      setTimeout(() => {
        if (!source) connect();
      }, 5000);
    }
  });
  source.addEventListener('reset', (ev) => {
    lastEventId = ev.lastEventId;
    loadSnapshots();
  });
  for (const kind of Object.keys(apply)) {
    source.addEventListener(kind, (ev) => {
      lastEventId = ev.lastEventId;
      let data;
      try {
        data = JSON.parse(ev.data);
      } catch (_) {
        return;
      }
      if (S.buffer) {
        S.buffer.push([kind, data]);
        return;
      }
      apply[kind](data);
      schedule();
    });
  }
}

// ---------------------------------------------------------------------------
// Messages.

let errorSource = null;

/** Shows an error until dismissed, or cleared by what caused it. */
function showError(message, from) {
  $('#error-text').textContent = message;
  $('#error').hidden = false;
  errorSource = from || null;
}

/** Clears the error; with `from`, only an error `from` showed. */
function clearError(from) {
  if (from && errorSource !== from) return;
  $('#error').hidden = true;
  $('#error-text').textContent = '';
  errorSource = null;
}

let noticeTimer = null;
function notice(message) {
  const el = $('#notice');
  el.textContent = message;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => {
    el.textContent = '';
  }, 8000);
}

/** Asks before a destructive command; resolves to true to go on. */
function confirmAction(title, text, yes) {
  const dialog = $('#confirm');
  const back = document.activeElement;
  const backKey = back && back.getAttribute('data-key');
  // A live update may have replaced the button meanwhile: find its successor.
  const refocus = () => {
    const again = back && back.isConnected ? back
      : backKey ? document.querySelector(`[data-key="${CSS.escape(backKey)}"]`)
        : back && back.id ? document.getElementById(back.id) : null;
    if (again) again.focus();
  };
  $('#confirm-title').textContent = title;
  $('#confirm-text').textContent = text;
  $('#confirm-yes').textContent = yes;
  return new Promise((resolve) => {
    const done = (ok) => {
      $('#confirm-yes').onclick = null;
      $('#confirm-no').onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      refocus();
      resolve(ok);
    };
    $('#confirm-yes').onclick = () => done(true);
    $('#confirm-no').onclick = () => done(false);
    dialog.onclose = () => done(false); // Escape
    dialog.showModal();
    $('#confirm-no').focus();
  });
}

/**
 * Runs a command from a button: asks first if `confirm` is given, shows the
 * server's message on failure. Buttons stay focusable throughout.
 */
async function run(button, what, call, confirm) {
  if (button.getAttribute('aria-disabled') === 'true') {
    notice(button.title || `${what}: not possible now`);
    return;
  }
  if (button.getAttribute('aria-busy') === 'true') return;
  if (confirm && !(await confirmAction(confirm.title, confirm.text, confirm.yes))) return;
  button.setAttribute('aria-busy', 'true');
  try {
    const resp = await call();
    clearError('command');
    notice(`${what}: done`);
    return resp;
  } catch (e) {
    showError(`${what}: ${e.message}`, 'command');
    return undefined;
  } finally {
    button.removeAttribute('aria-busy');
    schedule();
  }
}

function finalize(button, service, to) {
  const target = to ? ` to ${to}` : ' to the newest version its nodes run';
  return run(button, `finalize ${service}`, async () => {
    const resp = await api('POST', `/v1/services/${encodeURIComponent(service)}/finalize`, to ? { to } : {});
    refreshServices();
    notice(`active version of ${service}: ${resp.active.version}`);
    return resp;
  }, {
    title: `Finalize ${service}?`,
    text: `The active version of ${service} moves${target}. Rollouts and rollbacks to older versions are refused from then on: the data may already use the new format.`,
    yes: 'Finalize',
  });
}

// ---------------------------------------------------------------------------
// Routing: #/fleet, #/rollouts, #/rollouts/ID, #/rollouts/ID/nodes/NODE.

function currentRoute() {
  const hash = location.hash || '#/fleet';
  let m = /^#\/rollouts\/(\d+)(?:\/nodes\/(.+))?$/.exec(hash);
  if (m) return { name: 'rollout', id: Number(m[1]), node: m[2] ? decodeURIComponent(m[2]) : null };
  if (/^#\/rollouts\/?$/.test(hash)) return { name: 'rollouts' };
  m = /^#\/fleet(?:\?q=(.*))?$/.exec(hash);
  if (m && m[1] !== undefined) S.ui.filter = decodeURIComponent(m[1]);
  return { name: 'fleet' };
}

let mounted = null;

function render() {
  const route = currentRoute();
  const key = route.name + (route.id === undefined ? '' : `:${route.id}`);
  if (!mounted || mounted.key !== key) {
    const view = $('#view');
    const mount = { fleet: fleetView, rollouts: rolloutsView, rollout: rolloutView }[route.name];
    mounted = Object.assign({ key }, mount(view, route));
    for (const a of document.querySelectorAll('.top nav a')) {
      const on = a.id === `nav-${route.name === 'rollout' ? 'rollouts' : route.name}`;
      if (on) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
  }
  mounted.update(route);
}

let renderTimer = null;
let lastRender = 0;
/** Renders soon, at most every so often however fast events come. */
function schedule() {
  if (renderTimer) return;
  const gap = S.nodes.size > 2000 ? 1000 : 100;
  const wait = Math.max(0, lastRender + gap - Date.now());
  renderTimer = setTimeout(() => {
    renderTimer = null;
    lastRender = Date.now();
    render();
  }, wait);
}

// ---------------------------------------------------------------------------
// Fleet.

const MAX_ROWS = 1000;

/** Every service a node runs or one has an active version for. */
function serviceNames() {
  const names = new Set(S.services.keys());
  for (const n of S.nodes.values()) for (const s of Object.keys(n.services)) names.add(s);
  return [...names].sort();
}

/** What completed rollouts still want of the nodes they could not reach. */
function desired() {
  const out = new Map(); // "node/service" -> {version, converging}
  for (const r of S.rollouts.values()) {
    if (r.state !== 'completed' || r.superseded_by || !r.spec) continue;
    for (const [name, n] of Object.entries(r.nodes)) {
      if (n.state !== 'unreachable' && n.state !== 'converging') continue;
      const view = S.nodes.get(name);
      const running = view && view.services[r.spec.service] && view.services[r.spec.service].version;
      if (running !== r.spec.version) out.set(`${name}/${r.spec.service}`, { version: r.spec.version, converging: n.state === 'converging' });
    }
  }
  return out;
}

/**
 * The fleet filter: words, all of which must match. `key=value` and
 * `key!=value` test labels, `service@version` (or `@version`, any service)
 * the running version, `online`/`offline` the session; anything else is
 * part of a node's name.
 */
function nodeFilter(text) {
  const tests = text.trim().split(/\s+/).filter(Boolean).map((term) => {
    let m;
    if (term === 'online') return (n) => n.online;
    if (term === 'offline') return (n) => !n.online;
    if ((m = /^([^=!@]+)!=(.*)$/.exec(term))) return (n) => n.labels[m[1]] !== m[2];
    if ((m = /^([^=!@]+)=(.*)$/.exec(term))) return (n) => n.labels[m[1]] === m[2];
    if ((m = /^([^@]*)@(.+)$/.exec(term))) {
      const [, svc, ver] = m;
      const runs = (s) => (s && s.version ? s.version : 'none') === ver;
      return (n) => (svc ? runs(n.services[svc]) : Object.values(n.services).some(runs));
    }
    const word = term.toLowerCase();
    return (n) => n.name.toLowerCase().includes(word);
  });
  return (n) => tests.every((t) => t(n));
}

function versionCounts(service, nodes) {
  const counts = new Map();
  for (const n of nodes) {
    const s = n.services[service];
    if (!s) continue;
    const v = s.version || 'none';
    counts.set(v, (counts.get(v) || 0) + 1);
  }
  return [...counts.entries()].sort((a, b) => (a[0] === 'none' ? 1 : b[0] === 'none' ? -1 : compareVersions(a[0], b[0])));
}

function fleetView(root) {
  const filter = h('input', {
    id: 'fleet-filter', type: 'search', autocomplete: 'off', spellcheck: 'false',
    placeholder: 'node name, rack=r1, api@2.0.0, offline', 'aria-describedby': 'fleet-filter-help',
  });
  filter.value = S.ui.filter;
  filter.addEventListener('input', () => {
    S.ui.filter = filter.value;
    schedule();
  });
  const group = h('select', { id: 'fleet-group' });
  group.addEventListener('change', () => {
    S.ui.group = group.value;
    schedule();
  });
  const active = h('section', { id: 'active-rollouts', 'aria-label': 'Rollouts in progress', 'aria-live': 'polite' });
  const services = h('section', { id: 'services', class: 'services', 'aria-label': 'Versions per service' });
  const count = h('span', { id: 'fleet-count', class: 'muted', 'aria-live': 'polite' });
  const table = h('div', { id: 'fleet-table' });
  fill(root,
    h('h1', {}, 'Fleet'),
    active,
    services,
    h('div', { class: 'toolbar' },
      h('label', {}, 'Filter ', filter),
      h('label', {}, 'Group by ', group),
      count),
    h('p', { id: 'fleet-filter-help', class: 'help' },
      'Words that must all match: part of a node name, a label (rack=r1, rack!=r1), a running version (api@2.0.0, or @2.0.0 for any service), online or offline. Press / to filter.'),
    table);

  function setFilter(text) {
    filter.value = text;
    S.ui.filter = text;
    schedule();
  }

  function updateGroups(labelKeys, names) {
    const options = [['', 'nothing']];
    for (const k of labelKeys) options.push([`label:${k}`, `label ${k}`]);
    for (const s of names) options.push([`version:${s}`, `version of ${s}`]);
    const want = options.map((o) => o.join('\u0000')).join('\u0001');
    if (group.dataset.options !== want) {
      group.dataset.options = want;
      group.replaceChildren(...options.map(([v, t]) => h('option', { value: v }, t)));
    }
    group.value = options.some((o) => o[0] === S.ui.group) ? S.ui.group : '';
  }

  function serviceCard(name, all) {
    const counts = versionCounts(name, all);
    const total = counts.reduce((a, [, n]) => a + n, 0);
    const summary = S.services.get(name);
    const active = summary && summary.active;
    const label = counts.map(([v, n]) => `${v} on ${n}`).join(', ') || 'no node runs it';
    const finalizeButton = h('button', {
      type: 'button', class: 'finalize', 'data-service': name, 'data-key': `finalize:${name}`,
      onclick: (ev) => finalize(ev.currentTarget, name, null),
    }, 'Finalize…');
    return h('article', { class: 'service', 'data-service-bar': name },
      h('header', {},
        h('h2', { class: 'grow' }, name),
        h('span', { class: 'active muted' }, 'active: ', h('span', { class: 'version' }, active ? active.version : 'none')),
        finalizeButton),
      h('div', { class: 'bar', role: 'img', 'aria-label': `${name}: ${label}` },
        counts.map(([v, n]) => {
          const color = versionColor(v);
          return h('span', {
            class: color ? null : 'cnone', 'data-version': v, title: `${v}: ${n} of ${total}`,
            style: Object.assign({ 'flex-grow': String(n) }, color ? { 'background-color': color } : {}),
          });
        })),
      h('ul', { class: 'legend', 'aria-label': `${name} versions` },
        counts.map(([v, n]) => {
          const term = `${name}@${v}`;
          return h('li', { 'data-version': v },
            h('button', {
              type: 'button', 'data-key': `legend:${term}`, 'aria-pressed': String(S.ui.filter.trim() === term),
              title: `Show the nodes running ${term}`,
              onclick: () => setFilter(S.ui.filter.trim() === term ? '' : term),
            },
            swatch(v),
            h('span', { class: 'version' }, v), ' ',
            h('span', { class: 'count' }, String(n))));
        })));
  }

  function nodeRow(n, names, want) {
    return h('tr', { 'data-node': n.name, class: n.online ? 'online' : 'offline' },
      h('th', { scope: 'row' }, n.name),
      h('td', { class: 'status' }, badge(n.online ? 'online' : 'offline')),
      h('td', { class: 'last-seen' }, n.online ? 'now' : h('span', { title: new Date(n.last_seen).toLocaleString() }, ago(n.last_seen))),
      h('td', {}, h('div', { class: 'labels' }, Object.entries(n.labels).map(([k, v]) => h('span', { class: 'label' }, `${k}=${v}`)))),
      names.map((svc) => {
        const s = n.services[svc];
        if (!s) return h('td', { 'data-service': svc, class: 'muted' }, '-');
        const d = want.get(`${n.name}/${svc}`) || (s.desired ? { version: s.desired, converging: s.converging } : null);
        return h('td', { 'data-service': svc },
          h('div', { class: 'svc' },
            versionTag(s.version),
            n.online ? badge(s.health) : h('span', { class: 'badge muted' }, 'unknown'),
            s.role || s.role_error
              ? h('span', { class: s.role_error ? 'role stale' : 'role', title: s.role_error ? `role probe: ${s.role_error}` : 'role' }, s.role || 'role unknown')
              : null,
            s.staged && s.staged.length ? h('span', { class: 'staged' }, `staged ${s.staged.join(', ')}`) : null,
            d ? h('span', { class: 'desired' }, `${d.converging ? 'converging' : 'behind'}: ${d.version}`) : null));
      }));
  }

  /**
   * Every rollout under way (not ended), each a link to its page, so that
   * the fleet's versions moving are never a surprise.
   */
  function updateActive() {
    const list = [...S.rollouts.values()].filter((r) => r.spec && !TERMINAL.has(r.state)).sort((a, b) => a.id - b.id);
    active.hidden = !list.length;
    fill(active, list.map((r) => {
      const wait = waitingText(r);
      return h('p', { class: 'active-rollout', 'data-rollout': r.id },
        h('a', { href: `#/rollouts/${r.id}`, 'data-key': `active:${r.id}` },
          `Rollout #${r.id}: ${r.spec.service} `, versionList(r), ' → ', versionTag(r.spec.version)),
        ' ', stateBadge(r),
        ' ', h('span', { class: 'progress-text' }, progressText(stateCounts(r))),
        wait ? h('span', { class: 'muted' }, ` · ${wait}`) : null);
    }));
  }

  return {
    update() {
      updateActive();
      const all = [...S.nodes.values()].sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }));
      const names = serviceNames();
      const labelKeys = [...new Set(all.flatMap((n) => Object.keys(n.labels)))].sort();
      updateGroups(labelKeys, names);
      if (filter.value !== S.ui.filter && document.activeElement !== filter) filter.value = S.ui.filter;

      fill(services, names.map((name) => serviceCard(name, all)));

      const shown = all.filter(nodeFilter(S.ui.filter));
      const online = all.filter((n) => n.online).length;
      count.textContent = `${shown.length} of ${all.length} nodes, ${online} online`;

      const want = desired();
      const head = h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'Node'), h('th', { scope: 'col' }, 'Status'),
        h('th', { scope: 'col' }, 'Last seen'), h('th', { scope: 'col' }, 'Labels'),
        names.map((s) => h('th', { scope: 'col' }, s))));
      const cols = 4 + names.length;
      const body = h('tbody');
      const [kind, key] = S.ui.group ? S.ui.group.split(/:(.*)/s) : [null, null];
      const groupOf = (n) => {
        if (kind === 'label') return n.labels[key] === undefined ? '(no label)' : n.labels[key];
        const s = n.services[key];
        return s ? s.version || 'none' : '(not running)';
      };
      let rows = 0;
      const addRows = (nodes) => {
        for (const n of nodes) {
          if (rows++ >= MAX_ROWS) return;
          body.append(nodeRow(n, names, want));
        }
      };
      if (kind) {
        const groups = new Map();
        for (const n of shown) {
          const g = groupOf(n);
          if (!groups.has(g)) groups.set(g, []);
          groups.get(g).push(n);
        }
        const order = [...groups.keys()].sort(kind === 'version' ? compareVersions : (a, b) => a.localeCompare(b, undefined, { numeric: true }));
        for (const g of order) {
          const members = groups.get(g);
          const mix = names.map((svc) => {
            const c = versionCounts(svc, members);
            return c.length ? `${svc}: ${c.map(([v, n]) => `${v}×${n}`).join(', ')}` : null;
          }).filter(Boolean).join(' · ');
          body.append(h('tr', { class: 'group', 'data-group': g },
            h('th', { colspan: cols, scope: 'rowgroup' }, `${kind === 'label' ? key : `${key} version`} = ${g}`,
              h('span', { class: 'muted' }, ` · ${members.length} node${members.length === 1 ? '' : 's'}${mix ? ` · ${mix}` : ''}`))));
          addRows(members);
        }
      } else {
        addRows(shown);
      }
      const more = rows > MAX_ROWS
        ? h('p', { class: 'muted' }, `Showing the first ${MAX_ROWS} of ${shown.length} nodes: filter to see the others.`)
        : null;
      const empty = !S.loaded ? h('p', { class: 'muted' }, 'Loading…')
        : all.length === 0 ? h('p', { class: 'muted' }, 'No node has connected yet.')
          : shown.length === 0 ? h('p', { class: 'muted' }, 'No node matches the filter.') : null;
      fill(table, empty || [h('table', { id: 'nodes' }, head, body), more]);
    },
    focusFilter() {
      filter.focus();
      filter.select();
    },
  };
}

// ---------------------------------------------------------------------------
// Rollouts.

/** The versions the rollout's nodes ran before it, newest first. */
function sourceVersions(r) {
  return [...new Set(Object.values(r.nodes).map((n) => n.from_version || 'none'))].sort(compareVersions);
}

function fromVersions(r) {
  const vs = sourceVersions(r);
  if (vs.length <= 2) return vs.join(', ') || '-';
  return `${vs.slice(0, 2).join(', ')} +${vs.length - 2}`;
}

/** The same, each version with its colour. */
function versionList(r) {
  const vs = sourceVersions(r);
  if (!vs.length) return h('span', { class: 'muted' }, '-');
  const shown = vs.slice(0, 2).map(versionTag);
  const out = [];
  shown.forEach((el, i) => out.push(i ? ', ' : null, el));
  if (vs.length > 2) out.push(` +${vs.length - 2}`);
  return h('span', { class: 'versions' }, out);
}

/**
 * Progress as `rollwave rollout list` counts it, from the same counts: the
 * nodes on the target version out of all of them, then the nodes whose part
 * ended otherwise. A rolled-back rollout of 4 nodes is `0/4 upgraded, 4
 * rolled back`: counting every finished node as progress would say 4/4.
 */
function progressText(counts) {
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  const others = ENDED_ELSEWHERE.filter((s) => counts[s]).map((s) => `${counts[s]} ${s.replace(/_/g, ' ')}`);
  return [`${counts.upgraded || 0}/${total} upgraded`, ...others].join(', ');
}

function stateCounts(r) {
  // Known from the list or the stream only: the counts they carried.
  if (r.partial && r.counts && !Object.keys(r.nodes).length) return r.counts;
  const counts = {};
  for (const n of Object.values(r.nodes)) counts[n.state] = (counts[n.state] || 0) + 1;
  return counts;
}

function progressBar(r) {
  const counts = stateCounts(r);
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  const text = NODE_STATES.filter((s) => counts[s]).map((s) => `${counts[s]} ${s.replace(/_/g, ' ')}`).join(', ');
  return h('div', { class: 'progress-cell' },
    h('div', { class: 'progress', role: 'img', 'aria-label': text || 'no nodes', title: text },
      NODE_STATES.filter((s) => counts[s] && s !== 'pending').map((s) =>
        h('span', { class: `p-${s}`, style: { width: `${(100 * counts[s]) / total}%` } }))),
    h('span', { class: 'progress-text' }, progressText(counts)));
}

function duration(r) {
  if (!r.created_at) return '-';
  return fmtDuration((r.finished_at || Date.now()) - r.created_at);
}

function rolloutsView(root) {
  const table = h('div', { id: 'rollouts-table' });
  fill(root, h('h1', {}, 'Rollouts'), table);
  return {
    update() {
      const list = [...S.rollouts.values()].filter((r) => r.spec).sort((a, b) => b.id - a.id);
      if (!list.length) {
        fill(table, h('p', { class: 'muted' }, S.loaded ? 'No rollout yet: `rollwave rollout start SERVICE@VERSION` starts one.' : 'Loading…'));
        return;
      }
      const rows = list.map((r) => h('tr', { 'data-rollout': r.id },
        h('th', { scope: 'row' }, h('a', { href: `#/rollouts/${r.id}`, 'data-key': `rollout:${r.id}` }, `#${r.id}`)),
        h('td', { class: 'service-name' }, r.spec.service),
        h('td', { class: 'versions' }, versionList(r), ' → ', versionTag(r.spec.version)),
        h('td', { class: 'state' }, stateBadge(r), waitingText(r) ? h('div', { class: 'muted' }, waitingText(r)) : null),
        h('td', {}, progressBar(r)),
        h('td', { class: 'num' }, r.batches ? r.batches.length : r.waves || '-'),
        h('td', {}, timeEl(r.created_at)),
        h('td', { class: 'num' }, duration(r))));
      fill(table, h('table', { id: 'rollouts' },
        h('thead', {}, h('tr', {},
          ['Rollout', 'Service', 'From → to', 'State', 'Progress', 'Waves', 'Started', 'Duration'].map((t, i) =>
            h('th', { scope: 'col', class: i >= 5 && i !== 6 ? 'num' : null }, t)))),
        h('tbody', {}, rows)));
    },
  };
}

// ---------------------------------------------------------------------------
// One rollout: its plan as waves, each node's steps, its log, the controls.

/** Waves of at most this many nodes are always shown whole. */
const SMALL_WAVE = 50;
/** Rows shown of an opened big wave. */
const WAVE_ROWS = 500;
/** Entries of the execution log shown unless all are asked for. */
const LOG_TAIL = 200;

const COMMANDS = [
  { id: 'pause', label: 'Pause', what: 'pause' },
  { id: 'resume', label: 'Resume', what: 'resume' },
  { id: 'promote', label: 'Promote', what: 'promote' },
  { id: 'cancel', label: 'Cancel…', what: 'cancel', danger: true },
  { id: 'rollback', label: 'Roll back…', what: 'rollback', danger: true },
];

/** Why a command does not apply to the rollout now, or null. */
function refusal(cmd, r) {
  const s = r.state;
  switch (cmd) {
    case 'pause': return s === 'running' ? null : `the rollout is ${s.replace(/_/g, ' ')}`;
    case 'resume': return s === 'paused' ? null : `the rollout is ${s.replace(/_/g, ' ')}`;
    case 'promote': return (s === 'running' || s === 'paused') && promotionWait(r) >= 0 ? null : 'no wave waits for a promotion';
    case 'cancel': return s === 'running' || s === 'paused' ? null : `the rollout is ${s.replace(/_/g, ' ')}`;
    case 'rollback': return ['rolling_back', 'rolled_back', 'rollback_failed'].includes(s) ? `the rollout is ${s.replace(/_/g, ' ')}` : null;
    case 'finalize': return s === 'completed' ? null : 'finalize once the rollout has completed';
    default: return null;
  }
}

function confirmation(cmd, r) {
  const what = `rollout #${r.id} (${r.spec.service} → ${r.spec.version})`;
  if (cmd === 'cancel') {
    return { title: `Cancel ${what}?`, text: 'No further node is upgraded. Nodes already upgraded keep the new version. A cancelled rollout cannot be resumed.', yes: 'Cancel the rollout' };
  }
  if (cmd === 'rollback') {
    return { title: `Roll back ${what}?`, text: 'Every node this rollout upgraded goes back to the version it ran before, and gets its backup restored.', yes: 'Roll back' };
  }
  return null;
}

function rolloutView(root, route) {
  const id = route.id;
  const title = h('span', { id: 'rollout-title' });
  const state = h('span', { id: 'rollout-state', class: 'badge' });
  const reason = h('p', { id: 'rollout-reason' });
  const waiting = h('p', { id: 'rollout-waiting' });
  const facts = h('dl', { id: 'rollout-facts', class: 'facts' });
  const progress = h('div', { id: 'rollout-progress' });
  const buttons = new Map();
  for (const c of COMMANDS) {
    buttons.set(c.id, h('button', {
      type: 'button', id: c.id, class: c.danger ? 'danger' : null,
      onclick: (ev) => {
        const r = S.rollouts.get(id);
        if (!r || !r.spec) return;
        run(ev.currentTarget, `${c.what} rollout #${id}`, async () => {
          const resp = await api('POST', `/v1/rollouts/${id}/${c.what}`, {});
          applyFull(resp.rollout);
          return resp;
        }, confirmation(c.id, r));
      },
    }, c.label));
  }
  buttons.set('finalize', h('button', {
    type: 'button', id: 'finalize',
    onclick: (ev) => {
      const r = S.rollouts.get(id);
      if (r && r.spec) finalize(ev.currentTarget, r.spec.service, r.spec.version);
    },
  }, 'Finalize…'));
  const controls = h('div', { class: 'controls', role: 'toolbar', 'aria-label': 'Rollout controls' }, [...buttons.values()]);
  const waves = h('section', { id: 'waves', 'aria-label': 'Waves' });
  const nodeLog = h('aside', { id: 'node-log', class: 'node-log', hidden: true, 'aria-labelledby': 'node-log-title' });
  const split = h('div', { class: 'split' }, waves, nodeLog);
  // The whole log repeats what the waves show node by node (a failure's
  // reason among it): open while the rollout runs, to follow it, folded
  // once it has ended unless asked for.
  const logTitle = h('h2', { id: 'rollout-log-title' });
  const log = h('details', { id: 'rollout-log-section' },
    h('summary', { 'data-key': 'log-summary', onclick: () => S.ui.logOpen.set(id, !log.open) }, logTitle));
  const logBody = h('div');
  log.append(logBody);
  const missing = h('p', { class: 'error', hidden: true }, `Rollout ${id} does not exist.`);
  fill(root,
    h('p', {}, h('a', { href: '#/rollouts' }, '← All rollouts')),
    missing,
    h('div', { class: 'rollout-head' }, h('h1', {}, `Rollout #${id}: `, title), state),
    reason, waiting, facts, progress, controls, split, log);
  fetchRollout(id);
  let shownNode = null;

  function fact(label, value) {
    return h('div', {}, h('dt', {}, label), h('dd', {}, value));
  }

  function strategy(spec) {
    const amount = (a) => (a ? ('percent' in a ? `${a.percent}%` : String(a.count)) : '-');
    if (spec.all_at_once) return 'all at once';
    if (spec.waves && spec.waves.length) return `canary: ${spec.waves.map((w) => amount(w.size) + (w.pause ? ' (pause)' : '')).join(', ')}`;
    return `rolling, batches of ${amount(spec.batch)}`;
  }

  function updateFacts(r) {
    const spec = r.spec;
    fill(facts,
      fact('Service', spec.service),
      fact('From', versionList(r)),
      fact('To', versionTag(spec.version)),
      fact('Strategy', strategy(spec)),
      fact('Max unavailable', spec.max_unavailable ? ('percent' in spec.max_unavailable ? `${spec.max_unavailable.percent}%` : String(spec.max_unavailable.count)) : '-'),
      fact('Healthy for', fmtDuration(spec.min_healthy_time)),
      spec.analysis && spec.analysis.length ? fact('Analysis', spec.analysis.map((a) => `${a.name}: ${a.success}`).join('; ')) : null,
      fact('Started', timeEl(r.created_at)),
      fact('Finished', r.finished_at ? timeEl(r.finished_at) : '-'),
      fact('Duration', duration(r)),
      r.after && r.after.length ? fact('After', r.after.map((a) => h('a', { href: `#/rollouts/${a}` }, `#${a} `))) : null,
      r.superseded_by ? fact('Superseded by', h('a', { href: `#/rollouts/${r.superseded_by}` }, `#${r.superseded_by}`)) : null,
      r.finalized ? fact('Finalize', r.finalized) : null,
      r.left_out && r.left_out.length ? fact('Left out', `${r.left_out.length} node${r.left_out.length === 1 ? '' : 's'}`) : null);
  }

  function updateControls(r) {
    for (const [cmd, button] of buttons) {
      const why = refusal(cmd, r);
      button.setAttribute('aria-disabled', why ? 'true' : 'false');
      button.title = why ? `${cmd}: ${why}` : '';
    }
  }

  /** Each node's log entries, in order. */
  function byNode(r) {
    const out = new Map();
    for (const e of r.events) {
      if (!e.node) continue;
      if (!out.has(e.node)) out.set(e.node, []);
      out.get(e.node).push(e);
    }
    return out;
  }

  /**
   * A node's reason is said once on the page: in the rollout's reason when
   * that quotes it (a failure names the nodes that caused it), else under
   * the node's row; its step that ended with it shows the step alone.
   */
  function nodeReasonShown(r, n) {
    return n.reason && !(r.reason && r.reason.includes(n.reason));
  }

  function stepText(n, message) {
    const tail = n.reason ? `: ${n.reason}` : null;
    return tail && message.endsWith(tail) && message.length > tail.length ? message.slice(0, -tail.length) : message;
  }

  function nodeRows(r, name, steps) {
    const n = r.nodes[name] || {};
    const view = S.nodes.get(name);
    const mine = steps.get(name) || [];
    // What this rollout moved the node from and to, which stays true once
    // the node has moved on; what it runs now is on the Fleet page.
    const row = h('tr', { 'data-node': name, class: shownNode === name ? 'selected' : null },
      h('th', { scope: 'row' }, name, view && !view.online ? h('span', { class: 'muted' }, ' (offline)') : null),
      h('td', { class: 'node-state' }, badge(n.state || 'pending')),
      h('td', { class: 'node-versions' }, versionTag(n.from_version), ' → ', versionTag(r.spec.version)),
      h('td', { class: 'steps' }, h('ol', { class: 'steps', 'aria-label': `${name} steps` },
        mine.map((e) => h('li', {}, timeEl(e.at), stepText(n, e.message))))),
      h('td', {}, h('a', {
        class: 'show-log', href: `#/rollouts/${r.id}/nodes/${encodeURIComponent(name)}`,
        'data-key': `log:${name}`, 'aria-label': `Log of ${name}`,
      }, 'Log')));
    const out = [row];
    if (nodeReasonShown(r, n)) {
      out.push(h('tr', { class: 'reason', 'data-node-reason': name },
        h('td', { colspan: 5 }, h('span', { class: 'reason' }, n.reason))));
    }
    return out;
  }

  /** A measured value as people read it, as the CLI writes it. */
  function fmtValue(v) {
    if (v !== 0 && Math.abs(v) < 1e-3) return v.toExponential(2);
    return String(Number(v.toFixed(4)));
  }

  /** The analyses of wave `i`, each with its state and its measurements. */
  function analysisList(r, i) {
    const runs = (r.analysis || []).filter((a) => a.wave === i);
    if (!runs.length) return null;
    const specs = (r.spec && r.spec.analysis) || [];
    return h('ul', { class: 'analysis', 'aria-label': `Analyses of wave ${i + 1}` }, runs.map((a) => {
      const spec = specs.find((s) => s.name === a.name) || {};
      const taken = a.measurements.filter((m) => m.verdict !== 'error').length;
      return h('li', { 'data-analysis': a.name },
        h('span', { class: 'analysis-name' }, `analysis ${a.name}`), ' ', badge(a.state), ' ',
        h('span', { class: 'muted' }, `${taken} of ${spec.count || '?'} measurements, passing when ${spec.success || '?'}: `),
        a.measurements.map((m) => h('span', {
          class: `measurement s-${m.verdict}`, title: `${m.verdict}${m.detail ? `: ${m.detail}` : ''}`,
        }, m.value !== undefined ? fmtValue(m.value) : m.verdict)),
        a.reason ? h('div', { class: 'reason' }, a.reason) : null);
    }));
  }

  function updateWaves(r) {
    if (!r.batches) {
      fill(waves, h('p', { class: 'muted' }, 'Loading the plan…'));
      return;
    }
    const steps = byNode(r);
    const current = r.batches.findIndex((b) => b.some((n) => r.nodes[n] && (r.nodes[n].state === 'pending' || IN_FLIGHT.has(r.nodes[n].state))));
    fill(waves, r.batches.map((batch, i) => {
      const counts = {};
      for (const name of batch) {
        const s = (r.nodes[name] || {}).state || 'pending';
        counts[s] = (counts[s] || 0) + 1;
      }
      const summary = NODE_STATES.filter((s) => counts[s]).map((s) => `${counts[s]} ${s.replace(/_/g, ' ')}`).join(', ');
      const pause = r.pauses && r.pauses[i];
      const promoted = r.promoted && r.promoted.includes(i);
      const key = `${r.id}:${i}`;
      const open = batch.length <= SMALL_WAVE || S.ui.openWaves.has(key);
      const toggle = batch.length > SMALL_WAVE
        ? h('button', {
          type: 'button', class: 'link', 'aria-expanded': String(open), 'data-key': `wave:${i}`,
          onclick: () => {
            if (S.ui.openWaves.has(key)) S.ui.openWaves.delete(key);
            else S.ui.openWaves.add(key);
            schedule();
          },
        }, open ? 'Hide nodes' : `Show ${batch.length} nodes`)
        : null;
      const names = open ? batch.slice(0, WAVE_ROWS) : [];
      return h('section', { class: `wave${i === current ? ' current' : ''}`, 'data-wave': i + 1, 'aria-label': `Wave ${i + 1}` },
        h('header', {},
          h('h3', {}, `Wave ${i + 1} of ${r.batches.length}`),
          h('span', { class: 'muted' }, `${batch.length} node${batch.length === 1 ? '' : 's'}: ${summary}`),
          pause ? h('span', { class: promoted ? 'muted' : 'badge s-paused' }, promoted ? 'promoted' : 'pauses for promotion') : null,
          toggle),
        analysisList(r, i),
        names.length ? h('table', { class: 'wave-nodes' },
          h('thead', {}, h('tr', {},
            [['Node', 'c-node'], ['State', 'c-state'], ['From → to', 'c-versions'], ['Steps', 'c-steps'], ['', 'c-log']]
              .map(([t, c]) => h('th', { scope: 'col', class: c }, t)))),
          h('tbody', {}, names.map((name) => nodeRows(r, name, steps)))) : null,
        open && batch.length > WAVE_ROWS ? h('p', { class: 'more muted' }, `and ${batch.length - WAVE_ROWS} more`) : null);
    }));
  }

  function updateNodeLog(r, node) {
    const wasShown = shownNode;
    shownNode = node;
    split.classList.toggle('with-log', !!node);
    if (!node) {
      nodeLog.hidden = true;
      fill(nodeLog);
      if (wasShown) {
        const link = waves.querySelector(`[data-key="${CSS.escape(`log:${wasShown}`)}"]`);
        if (link) link.focus();
      }
      return;
    }
    nodeLog.hidden = false;
    const n = r.nodes[node];
    const entries = r.events.filter((e) => e.node === node);
    const close = h('a', { href: `#/rollouts/${r.id}`, id: 'node-log-close', 'data-key': 'node-log-close' }, 'Close');
    const title = h('h2', { id: 'node-log-title', tabindex: '-1' }, `Log of ${node}`);
    fill(nodeLog,
      h('header', {}, title, close),
      n ? h('p', {}, badge(n.state, 'node-log-state'), n.phase ? h('span', { class: 'muted' }, ` ${n.phase}`) : null) : h('p', { class: 'muted' }, 'Not in this rollout.'),
      n && n.reason ? h('p', { class: 'reason' }, n.reason) : null,
      n && n.from_version ? h('p', { class: 'muted' }, `ran ${n.from_version} before`) : null,
      entries.length ? h('ol', { class: 'log', id: 'node-log-entries', 'aria-label': `Log of ${node}` },
        entries.map((e) => h('li', { class: 'log-entry' }, timeEl(e.at, true), h('span', { class: 'log-msg' }, e.message))))
        : h('p', { class: 'muted' }, 'Nothing logged for this node yet.'));
    if (wasShown !== node) title.focus();
  }

  function updateLog(r) {
    const all = S.ui.allLog.has(r.id);
    const entries = all ? r.events : r.events.slice(-LOG_TAIL);
    const toggle = r.events.length > LOG_TAIL
      ? h('button', {
        type: 'button', class: 'link', 'data-key': 'log-toggle',
        onclick: () => {
          if (all) S.ui.allLog.delete(r.id);
          else S.ui.allLog.add(r.id);
          schedule();
        },
      }, all ? `Show the last ${LOG_TAIL}` : `Show all ${r.events.length}`)
      : null;
    const open = S.ui.logOpen.has(r.id) ? S.ui.logOpen.get(r.id) : !TERMINAL.has(r.state);
    if (log.open !== open) log.open = open;
    fill(logTitle, 'Execution log ', h('span', { class: 'muted' }, `(${r.events.length} entries)`));
    fill(logBody,
      toggle ? h('p', {}, toggle) : null,
      h('ol', { class: 'log', id: 'rollout-log', 'aria-label': 'Execution log' },
        entries.map((e) => h('li', { class: 'log-entry' },
          timeEl(e.at, true),
          e.node ? h('a', { class: 'who', href: `#/rollouts/${r.id}/nodes/${encodeURIComponent(e.node)}` }, e.node) : h('span', { class: 'who muted' }, 'rollout'),
          h('span', { class: 'log-msg' }, e.message)))));
  }

  return {
    update(route) {
      const r = S.rollouts.get(id);
      missing.hidden = !(S.missing.has(id) && !r);
      if (!r || !r.spec) {
        title.textContent = '';
        return;
      }
      title.textContent = `${r.spec.service} ${fromVersions(r)} → ${r.spec.version}`;
      const shown = stateOf(r);
      state.className = `badge s-${shown.key}`;
      state.textContent = shown.text;
      state.dataset.state = r.state;
      reason.textContent = r.reason || '';
      reason.className = r.state === 'completed' ? 'muted' : 'warn';
      waiting.textContent = waitingText(r);
      updateFacts(r);
      fill(progress, progressBar(r));
      updateControls(r);
      updateWaves(r);
      updateNodeLog(r, route.node);
      updateLog(r);
    },
  };
}

// ---------------------------------------------------------------------------
// Start.

function start() {
  $('#error-close').addEventListener('click', () => clearError());
  $('#signin-form').addEventListener('submit', () => {
    const token = $('#signin-token').value.trim();
    $('#signin-token').value = '';
    if (token) access.signIn(token);
  });
  $('#signout').addEventListener('click', () => access.signOut());
  $('#signin-open').addEventListener('click', () => access.ask(''));
  $('#signout').hidden = !access.token();
  window.addEventListener('hashchange', () => {
    const before = mounted && mounted.key;
    render();
    if (mounted && mounted.key !== before) $('#view').focus();
  });
  document.addEventListener('keydown', (ev) => {
    const typing = /^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement.tagName);
    if (ev.key === '/' && !typing && mounted && mounted.focusFilter) {
      ev.preventDefault();
      mounted.focusFilter();
    } else if (ev.key === 'Escape' && !$('#confirm').open) {
      const route = currentRoute();
      if (route.name === 'rollout' && route.node) location.hash = `#/rollouts/${route.id}`;
    }
  });
  // Ages and durations move on with nothing new from the server.
  setInterval(schedule, 5000);
  render();
  if (typeof EventSource === 'function') connect();
  else loadSnapshots();
}

start();
