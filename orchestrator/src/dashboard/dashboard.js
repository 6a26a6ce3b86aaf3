// The servicekit dashboard: the registry, live, through the orchestrator's public read API.
//
// State comes from the watch feed (`services?watch=true`): a snapshot, then registered /
// updated / deregistered / expired events, applied in order. Pings make no events, so a poll
// of `services` refreshes each instance's last ping, expiry and health output. The page only
// reads; every string from a registration reaches the DOM through textContent or an attribute
// value, never as markup (anyone who may register writes those strings). Design notes:
// docs/dashboard.md.
"use strict";

(function () {
  // How often the plain list is polled for ping times (only while the tab is visible).
  const POLL_MS = 3000;
  // How often /health and /metrics are read.
  const STATUS_MS = 5000;
  // Records per page of the poll, and the most pages one poll walks.
  const PAGE_LIMIT = 1000;
  const MAX_PAGES = 50;
  // Timeline entries kept.
  const TIMELINE_CAP = 200;
  // Reconnect backoff after the feed closed for good (a non-200 answer such as 429 or 503).
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 5000;
  // A clock difference with the orchestrator below this is the Date header's rounding.
  const SKEW_THRESHOLD_MS = 2000;
  // A tab hidden this long closes its feed (and opens a new one when shown again): over plain
  // HTTP a browser keeps at most six connections per host, and every open feed holds one, so
  // six dashboard tabs left none for a seventh, for /docs, or for their own polls.
  const HIDDEN_RELEASE_MS = 30000;

  const $ = (id) => document.getElementById(id);
  const el = {
    body: document.body,
    connection: $("connection"),
    connectionDetail: $("connection-detail"),
    health: $("orchestrator-health"),
    store: $("orchestrator-store"),
    services: $("services"),
    empty: $("empty"),
    totals: $("totals"),
    filter: $("filter"),
    timeline: $("timeline"),
    timelineEmpty: $("timeline-empty"),
    version: $("version"),
  };

  // ---- state -------------------------------------------------------------------------------

  /** id → record, as the feed says: the feed alone decides which instances exist. */
  let instances = new Map();
  /** Whether a snapshot has been applied since the page loaded. */
  let haveSnapshot = false;
  /** Server clock minus browser clock, in ms (0 unless the Date header says otherwise). */
  let skewMs = 0;
  /** The lower-cased filter terms; every term must match an instance. */
  let terms = [];

  const now = () => Date.now() + skewMs;

  // ---- small helpers -----------------------------------------------------------------------

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function setAttr(node, name, value) {
    if (value === null || value === undefined || value === "") {
      if (node.hasAttribute(name)) node.removeAttribute(name);
    } else if (node.getAttribute(name) !== value) {
      node.setAttribute(name, value);
    }
  }

  const str = (v) => (typeof v === "string" ? v : "");
  const obj = (v) => (v && typeof v === "object" && !Array.isArray(v) ? v : {});

  function displayName(record) {
    const name = str(obj(record.info).display_name);
    return name === "" ? "(unnamed)" : name;
  }
  const version = (record) => str(obj(record.info).version);
  function healthOf(record) {
    const h = obj(record.health);
    const status = ["passing", "warning", "critical"].includes(h.status) ? h.status : "passing";
    return { status, output: str(h.output) };
  }

  function parseTime(s) {
    const t = Date.parse(str(s));
    return Number.isNaN(t) ? null : t;
  }

  /** A duration in ms, compact: "5s", "3m 4s", "2h 5m", "3d 4h". */
  function duration(ms) {
    let s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return s + "s";
    let m = Math.floor(s / 60);
    s %= 60;
    if (m < 60) return s ? `${m}m ${s}s` : `${m}m`;
    let h = Math.floor(m / 60);
    m %= 60;
    if (h < 24) return m ? `${h}h ${m}m` : `${h}h`;
    const d = Math.floor(h / 24);
    h %= 24;
    return h ? `${d}d ${h}h` : `${d}d`;
  }

  const clock = (t) =>
    new Date(t).toLocaleTimeString([], {
      hour: "2-digit",
      minute: "2-digit",
      second: "2-digit",
      hourCycle: "h23",
    });

  function isoTitle(s) {
    const t = parseTime(s);
    return t === null ? "" : new Date(t).toLocaleString();
  }

  // ---- connection state --------------------------------------------------------------------

  const CONNECTION_TEXT = {
    connecting: "Connecting…",
    live: "Live",
    disconnected: "Disconnected — reconnecting…",
  };
  let disconnectedSince = null;
  /** When this page itself opens the next feed (after the browser gave up), else null. */
  let retryAt = null;
  /** Whether the last attempt got an answer that was not a feed (429 at --max-watchers, 503). */
  let refused = false;

  function setConnection(state) {
    if (state === "disconnected" && el.body.dataset.connection !== "disconnected") {
      disconnectedSince = Date.now();
    }
    if (state !== "disconnected") disconnectedSince = null;
    el.body.dataset.connection = state;
    setText(el.connection, CONNECTION_TEXT[state]);
    showDetail();
  }

  /** The line beside the status: how long the page has been disconnected, the next try. */
  function showDetail() {
    let text = "";
    if (disconnectedSince !== null) {
      const shown = haveSnapshot ? "showing the last known state" : "nothing to show yet";
      text = `${shown} · for ${duration(Date.now() - disconnectedSince)}`;
      // An EventSource cannot read the status, but only an answer (not a network error) makes
      // the browser give up: the orchestrator is up and said no.
      if (refused) text = `the orchestrator refused the feed (too many watchers, or its store is failing) · ${text}`;
      if (retryAt !== null) text += ` · next try in ${duration(Math.max(0, retryAt - Date.now()) + 999)}`;
    }
    setText(el.connectionDetail, text);
  }

  // ---- the watch feed ----------------------------------------------------------------------

  let source = null;
  let backoffMs = BACKOFF_MIN_MS;
  /** The pending reconnect after a backoff, so that only one ever is. */
  let retryTimer = null;
  /** Whether the feed was closed because the tab is hidden (see HIDDEN_RELEASE_MS). */
  let released = false;

  /** Closes the feed and cancels a pending retry. */
  function stopFeed() {
    clearTimeout(retryTimer);
    retryTimer = null;
    retryAt = null;
    if (source) source.close();
    source = null;
  }

  function connect() {
    stopFeed();
    if (released) return;
    // A new EventSource cannot send Last-Event-ID, so this one starts with a snapshot; the
    // browser's own reconnects (after a network error) do send it and resume.
    const es = new EventSource("services?watch=true");
    source = es;
    es.addEventListener("open", () => {
      if (source !== es) return;
      backoffMs = BACKOFF_MIN_MS;
      refused = false;
      setConnection("live");
      refreshStatus();
    });
    es.addEventListener("error", () => {
      if (source !== es) return;
      if (es.readyState === EventSource.CLOSED) {
        // A non-200 answer (429 too many watchers, 503): the browser gives up for good.
        es.close();
        source = null;
        refused = true;
        const wait = backoffMs;
        backoffMs = Math.min(backoffMs * 2, BACKOFF_MAX_MS);
        retryAt = Date.now() + wait;
        setConnection("disconnected");
        retryTimer = setTimeout(connect, wait);
      } else {
        // A network error or the end of the stream: the browser retries by itself and resumes
        // with Last-Event-ID.
        refused = false;
        setConnection("disconnected");
      }
      refreshStatus();
    });
    for (const kind of ["snapshot", "registered", "updated", "deregistered", "expired"]) {
      es.addEventListener(kind, (event) => {
        if (source !== es) return;
        let data;
        try {
          data = JSON.parse(event.data);
        } catch (_) {
          return;
        }
        if (el.body.dataset.connection !== "live") setConnection("live");
        apply(kind, obj(data));
      });
    }
  }

  function apply(kind, data) {
    if (kind === "snapshot") {
      applySnapshot(Array.isArray(data.services) ? data.services : []);
    } else {
      const id = str(data.id);
      if (id === "") return;
      const before = instances.get(id);
      if (kind === "registered" || kind === "updated") {
        instances.set(id, data);
        note(kind, id, data, kind === "updated" ? changes(before, data) : "");
      } else {
        // Removals of ids this page does not know (a resumed feed may send some) are ignored.
        if (!before) return;
        instances.delete(id);
        note(kind, id, before, "");
      }
    }
    scheduleRender();
  }

  function applySnapshot(records) {
    const next = new Map();
    for (const r of records) {
      const record = obj(r);
      if (str(record.id) !== "") next.set(record.id, record);
    }
    const names = new Set([...next.values()].map(displayName));
    let text = `snapshot: ${next.size} ${next.size === 1 ? "instance" : "instances"} of ` +
      `${names.size} ${names.size === 1 ? "service" : "services"}`;
    if (haveSnapshot) {
      let added = 0;
      let gone = 0;
      for (const id of next.keys()) if (!instances.has(id)) added += 1;
      for (const id of instances.keys()) if (!next.has(id)) gone += 1;
      text += ` (${added} new, ${gone} gone since the last known state)`;
    }
    haveSnapshot = true;
    instances = next;
    addTimeline("snapshot", null, text, null);
  }

  /** What an `updated` event changed, in words. */
  function changes(before, after) {
    if (!before) return "re-registered";
    const parts = [];
    const h0 = healthOf(before);
    const h1 = healthOf(after);
    if (h0.status !== h1.status) {
      parts.push(`health ${h0.status} → ${h1.status}` + (h1.output ? ` (${h1.output})` : ""));
    }
    if (displayName(before) !== displayName(after)) {
      parts.push(`renamed from ${displayName(before)}`);
    }
    if (version(before) !== version(after)) {
      parts.push(`version ${version(before) || "none"} → ${version(after) || "none"}`);
    }
    return parts.length ? parts.join("; ") : "re-registered";
  }

  function note(kind, id, record, detail) {
    const name = displayName(record);
    const url = str(record.url);
    let text;
    switch (kind) {
      case "registered":
        text = `${name} registered at ${url}` + (version(record) ? ` (version ${version(record)})` : "");
        break;
      case "updated":
        text = `${name} at ${url}: ${detail}`;
        break;
      case "deregistered":
        text = `${name} at ${url} deregistered`;
        break;
      default:
        text = `${name} at ${url} expired (no ping before its TTL ran out)`;
    }
    addTimeline(kind, id, text, kind === "updated" ? healthOf(record).status : null);
  }

  function addTimeline(kind, id, text, status) {
    const li = make("li");
    li.dataset.event = kind;
    if (id) li.dataset.instance = id;
    if (status) li.dataset.status = status;
    const t = Date.now();
    const time = make("time", "when", clock(t));
    time.dateTime = new Date(t).toISOString();
    li.append(time, make("span", "kind", kind), make("span", "what", text));
    el.timeline.prepend(li);
    while (el.timeline.children.length > TIMELINE_CAP) el.timeline.lastElementChild.remove();
    el.timelineEmpty.hidden = true;
  }

  // ---- the poll: ping times, which make no feed events -------------------------------------

  let polling = false;
  /** No poll before this: a slow walk (a large registry, a busy orchestrator) is followed by
   * a rest of twice its length, so the page never lists back to back. */
  let pollNotBefore = 0;

  async function poll() {
    if (polling || document.hidden || Date.now() < pollNotBefore) return;
    polling = true;
    const started = Date.now();
    try {
      let cursor = null;
      for (let page = 0; page < MAX_PAGES; page += 1) {
        const url = `services?limit=${PAGE_LIMIT}` + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : "");
        const requested = Date.now();
        const res = await fetch(url, { cache: "no-store", headers: { accept: "application/json" } });
        if (!res.ok) break;
        learnSkew(res, requested);
        const body = obj(await res.json());
        merge(Array.isArray(body.services) ? body.services : []);
        cursor = str(body.next_cursor);
        if (cursor === "") break;
      }
    } catch (_) {
      // Unreachable: the feed's state says so; the next poll tries again.
    } finally {
      polling = false;
      pollNotBefore = Date.now() + 2 * (Date.now() - started);
    }
  }

  // The poll only refreshes instances the feed knows, and only with newer timestamps: it never
  // adds an instance (a registration the feed has not delivered yet arrives there within
  // moments, and while disconnected the page shows the last known state) and never drops one
  // (a removal comes as an event, or the next snapshot settles it). Health STATUS changes come
  // as `updated` events, which the timeline describes, so only the output (which changes with
  // no event) is taken from the poll.
  function merge(records) {
    let changed = false;
    for (const r of records) {
      const fresh = obj(r);
      const id = str(fresh.id);
      const known = instances.get(id);
      if (!known) continue;
      // A changed record is a new object, so that render() redraws only the rows whose
      // record is not the one they show.
      let next = null;
      for (const field of ["last_ping_at", "expires_at"]) {
        const before = parseTime(known[field]);
        const after = parseTime(fresh[field]);
        if (after !== null && (before === null || after > before)) {
          next = next || Object.assign({}, known);
          next[field] = fresh[field];
        }
      }
      const h0 = healthOf(known);
      const h1 = healthOf(fresh);
      if (h0.status === h1.status && h0.output !== h1.output) {
        next = next || Object.assign({}, known);
        next.health = Object.assign({}, obj(known.health), { output: h1.output });
      }
      if (next) {
        instances.set(id, next);
        changed = true;
      }
    }
    if (changed) scheduleRender();
  }

  /** The orchestrator's clock from the Date header, when it differs from ours by seconds. */
  function learnSkew(res, requested) {
    const date = Date.parse(res.headers.get("date") || "");
    if (Number.isNaN(date)) return;
    // The header is rounded down to the second: its midpoint, against the request's midpoint.
    const offset = date + 500 - (requested + Date.now()) / 2;
    skewMs = Math.abs(offset) > SKEW_THRESHOLD_MS ? offset : 0;
  }

  // ---- orchestrator health and figures -----------------------------------------------------

  async function refreshHealth() {
    try {
      const res = await fetch("health", { cache: "no-store", headers: { accept: "application/json" } });
      const body = obj(await res.json());
      const status = ["healthy", "degraded", "unhealthy"].includes(body.status) ? body.status : "unhealthy";
      el.health.dataset.status = status;
      setText(el.health, status);
      const store = obj(obj(body.checks).store);
      const parts = [];
      if (str(store.kind)) parts.push(`${store.kind} store`);
      if (typeof store.latency_ms === "number") parts.push(`${store.latency_ms.toFixed(1)} ms`);
      if (str(store.error)) parts.push(store.error);
      setText(el.store, parts.join(" · "));
    } catch (_) {
      el.health.dataset.status = "unreachable";
      setText(el.health, "unreachable");
      setText(el.store, "no answer from /health");
    }
  }

  /** Prometheus text → name → sum of its samples. */
  function parseMetrics(text) {
    const sums = new Map();
    for (const line of text.split("\n")) {
      if (line === "" || line.startsWith("#")) continue;
      const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)/.exec(line);
      if (!match) continue;
      const value = Number(match[3]);
      if (!Number.isFinite(value)) continue;
      sums.set(match[1], (sums.get(match[1]) || 0) + value);
    }
    return sums;
  }

  const FIGURES = {
    registrations: "servicekit_registrations",
    watchers: "servicekit_watchers",
    connections: "servicekit_connections",
    requests: "servicekit_http_requests_total",
    checks: "servicekit_checks_total",
    "lease-rejections": "servicekit_lease_rejections_total",
  };

  async function refreshMetrics() {
    let sums = null;
    try {
      const res = await fetch("metrics", { cache: "no-store" });
      if (res.ok) sums = parseMetrics(await res.text());
    } catch (_) {
      sums = null;
    }
    // Unreachable: the figures keep their last values (dimmed with the rest of the page while
    // the feed is down); the health card says the orchestrator does not answer.
    if (sums === null) return;
    for (const [figure, name] of Object.entries(FIGURES)) {
      const node = document.querySelector(`[data-figure="${figure}"]`);
      if (!node) continue;
      const value = sums.get(name);
      setText(node, value === undefined ? "–" : Math.round(value).toLocaleString());
      // Hidden for an orchestrator from before health checks, which has no such family.
      if (figure === "checks") node.parentElement.hidden = value === undefined;
    }
  }

  let statusInFlight = false;
  let statusAgain = false;
  async function refreshStatus() {
    // A refresh asked for during one (the feed just opened) runs right after it.
    if (statusInFlight) {
      statusAgain = true;
      return;
    }
    statusInFlight = true;
    try {
      do {
        statusAgain = false;
        await Promise.all([refreshHealth(), refreshMetrics()]);
      } while (statusAgain);
    } finally {
      statusInFlight = false;
    }
  }

  async function loadVersion() {
    try {
      const res = await fetch("openapi.json", { headers: { accept: "application/json" } });
      const v = str(obj(obj(await res.json()).info).version);
      if (v) setText(el.version, `servicekit orchestrator ${v}`);
    } catch (_) {
      // The footer keeps its plain name.
    }
  }

  // ---- rendering ---------------------------------------------------------------------------

  /** display name → {section, rows: Map id → row}, reused across renders. */
  const groups = new Map();
  let renderPending = false;

  function scheduleRender() {
    if (renderPending) return;
    renderPending = true;
    setTimeout(() => {
      renderPending = false;
      render();
    }, 0);
  }

  function matches(record, name) {
    if (terms.length === 0) return true;
    const hay = [name, str(record.url), version(record), str(record.id)]
      .join("\n")
      .toLowerCase();
    return terms.every((t) => hay.includes(t));
  }

  function buildGroup(name) {
    const section = make("section", "service");
    section.dataset.name = name;
    const head = make("header", "service-head");
    const h3 = make("h3");
    h3.append(make("span", "name", name), make("span", "count", "0"));
    const summary = make("p", "summary");
    head.append(h3, summary);
    const table = make("table", "instances");
    const caption = make("caption", "visually-hidden", `Instances of ${name}`);
    const thead = make("thead");
    const tr = make("tr");
    for (const h of ["Instance", "Version", "Health", "Age", "Last ping", "Expires"]) {
      const th = make("th", null, h);
      th.scope = "col";
      tr.append(th);
    }
    thead.append(tr);
    const tbody = make("tbody");
    table.append(caption, thead, tbody);
    section.append(head, table);
    return { section, count: h3.lastChild, summary, tbody, rows: new Map() };
  }

  function buildRow(id) {
    const tr = make("tr", "instance");
    tr.dataset.instance = id;
    const cells = {};
    const cell = (cls, label) => {
      const td = make("td", "cell " + cls);
      td.dataset.label = label;
      tr.append(td);
      return td;
    };
    const where = cell("where", "Instance");
    cells.url = make("span", "url");
    cells.id = make("span", "id");
    where.append(cells.url, cells.id);
    cells.version = cell("version", "Version");
    // One wrapper per cell, so that a phone's card layout has a label and one value.
    const health = make("span", "health-wrap");
    cells.health = make("span", "health");
    cells.output = make("span", "output");
    health.append(cells.health, cells.output);
    cell("health-cell", "Health").append(health);
    cells.age = cell("age", "Age");
    cells.lastPing = cell("last-ping", "Last ping");
    cells.expires = cell("expires", "Expires");
    return { tr, cells };
  }

  function fillRow(row, record) {
    const c = row.cells;
    setText(c.url, str(record.url));
    setText(c.id, str(record.id));
    setText(c.version, version(record) || "—");
    const h = healthOf(record);
    setText(c.health, h.status);
    setAttr(c.health, "data-status", h.status);
    setAttr(c.health, "title", h.output);
    setText(c.output, h.output);
    setAttr(c.age, "title", isoTitle(record.registered_at));
    setAttr(c.lastPing, "title", isoTitle(record.last_ping_at));
    setAttr(c.expires, "title", isoTitle(record.expires_at));
    tickRow(row, record);
  }

  /** The cells that move with the clock. */
  function tickRow(row, record) {
    const c = row.cells;
    const t = now();
    const registered = parseTime(record.registered_at);
    setText(c.age, registered === null ? "—" : duration(t - registered));
    const pinged = parseTime(record.last_ping_at);
    setText(c.lastPing, pinged === null ? "—" : duration(t - pinged) + " ago");
    const expires = parseTime(record.expires_at);
    let state = "ok";
    let text = "—";
    if (expires !== null) {
      const left = expires - t;
      if (left <= 0) {
        // The reaper removes it within about half a second and the feed says so.
        text = "expiring";
        state = "expiring";
      } else {
        text = "in " + duration(left + 999);
        // "soon": less than a quarter of the TTL (as of the last ping) left.
        const ttl = pinged === null ? 20000 : expires - pinged;
        if (left < Math.max(1000, ttl / 4)) state = "soon";
      }
    }
    setText(c.expires, text);
    setAttr(c.expires, "data-state", state);
  }

  function render() {
    const byName = new Map();
    const allNames = new Set();
    let shown = 0;
    for (const record of instances.values()) {
      const name = displayName(record);
      allNames.add(name);
      if (!matches(record, name)) continue;
      if (!byName.has(name)) byName.set(name, []);
      byName.get(name).push(record);
      shown += 1;
    }
    const names = [...byName.keys()].sort((a, b) => a.localeCompare(b));

    // Drop what is gone (or filtered out) first, then put everything in order.
    for (const [name, group] of groups) {
      if (!byName.has(name)) {
        group.section.remove();
        groups.delete(name);
      }
    }
    let previous = null;
    for (const name of names) {
      let group = groups.get(name);
      if (!group) {
        group = buildGroup(name);
        groups.set(name, group);
      }
      const records = byName.get(name).sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
      const ids = new Set(records.map((r) => r.id));
      for (const [id, row] of group.rows) {
        if (!ids.has(id)) {
          row.tr.remove();
          group.rows.delete(id);
        }
      }
      let prevRow = null;
      const health = { passing: 0, warning: 0, critical: 0 };
      for (const record of records) {
        let row = group.rows.get(record.id);
        if (!row) {
          row = buildRow(record.id);
          group.rows.set(record.id, row);
        }
        // The clock's cells move in tick(); the rest only when the record changed.
        if (row.record !== record) {
          row.record = record;
          fillRow(row, record);
        }
        health[healthOf(record).status] += 1;
        const want = prevRow ? prevRow.tr.nextSibling : group.tbody.firstChild;
        if (want !== row.tr) group.tbody.insertBefore(row.tr, want);
        prevRow = row;
      }
      setText(group.count, String(records.length));
      const parts = Object.entries(health)
        .filter(([, n]) => n > 0)
        .map(([s, n]) => `${n} ${s}`);
      setText(group.summary, parts.join(" · "));
      setAttr(group.section, "data-health",
        health.critical ? "critical" : health.warning ? "warning" : "passing");
      const want = previous ? previous.section.nextSibling : el.services.firstChild;
      if (want !== group.section) el.services.insertBefore(group.section, want);
      previous = group;
    }

    const total = instances.size;
    const totalNames = allNames.size;
    setText(el.totals, haveSnapshot
      ? `${totalNames} ${totalNames === 1 ? "service" : "services"}, ${total} ${total === 1 ? "instance" : "instances"}` +
        (terms.length ? ` · ${shown} shown` : "")
      : "");
    if (!haveSnapshot) {
      el.empty.hidden = false;
      setText(el.empty, "Waiting for the registry…");
    } else if (total === 0) {
      el.empty.hidden = false;
      setText(el.empty, "No service is registered.");
    } else if (shown === 0) {
      el.empty.hidden = false;
      setText(el.empty, "No instance matches the filter.");
    } else {
      el.empty.hidden = true;
    }
  }

  function tick() {
    for (const group of groups.values()) {
      for (const row of group.rows.values()) if (row.record) tickRow(row, row.record);
    }
    showDetail();
  }

  // ---- the filter, kept in the URL's hash (#q=...) so a reload keeps it --------------------

  function filterFromHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    return params.get("q") || "";
  }

  function setFilter(value, fromHash) {
    terms = value.toLowerCase().split(/\s+/).filter((t) => t !== "");
    if (el.filter.value !== value) el.filter.value = value;
    if (!fromHash) {
      const hash = value === "" ? "" : "#" + new URLSearchParams({ q: value }).toString();
      history.replaceState(null, "", location.pathname + location.search + hash);
    }
    scheduleRender();
  }

  // ---- start -------------------------------------------------------------------------------

  /** Closes the feed of a tab that stayed hidden; shown again, it starts with a snapshot. */
  let releaseTimer = null;
  function release() {
    releaseTimer = null;
    if (!document.hidden) return;
    released = true;
    stopFeed();
  }

  el.filter.addEventListener("input", () => setFilter(el.filter.value, false));
  window.addEventListener("hashchange", () => setFilter(filterFromHash(), true));
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      if (releaseTimer === null) releaseTimer = setTimeout(release, HIDDEN_RELEASE_MS);
      return;
    }
    clearTimeout(releaseTimer);
    releaseTimer = null;
    if (released) {
      released = false;
      setConnection("connecting");
      connect();
    }
    poll();
    refreshStatus();
  });

  setFilter(filterFromHash(), true);
  setConnection("connecting");
  render();
  connect();
  loadVersion();
  refreshStatus();
  setInterval(tick, 1000);
  setInterval(poll, POLL_MS);
  setInterval(() => {
    if (!document.hidden) refreshStatus();
  }, STATUS_MS);
})();
