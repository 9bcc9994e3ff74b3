// Spate's web console: one page, no build step, talking only to the public HTTP and WebSocket API.
// Live data comes over one WebSocket (/v1/ws); nothing polls faster than once every 2 s.
"use strict";

// ---- small helpers -------------------------------------------------------------------------

const $ = (sel, root = document) => root.querySelector(sel);

/** Builds an element: h("button", {onclick}, "text", child...). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "value") el.value = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function toast(message) {
  const box = h("div", {}, message);
  $("#toast").append(box);
  setTimeout(() => box.remove(), 6000);
}

const enc = encodeURIComponent;

// ---- access token (servers started with --auth-tokens-file) -------------------------------
// Given once as /#token=<token>, kept for the tab's life in sessionStorage, taken out of the
// address bar; asked for when the server answers 401.
const auth = {
  key: "spate-token",
  get() {
    const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
    if (m) {
      sessionStorage.setItem(this.key, decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(this.key);
  },
  ask() {
    const t = window.prompt("This server needs an access token:");
    if (t) sessionStorage.setItem(this.key, t.trim());
    return !!t;
  },
  /** `url` with the token in its query, for WebSocket and EventSource (they take no headers). */
  url(url) {
    const t = this.get();
    if (!t) return url;
    return url + (url.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(t);
  },
};
// Before the router reads the address: a #token=… is taken out of it first.
auth.get();

/** Calls the API; a problem+json answer becomes an Error carrying its detail. */
async function api(method, path, body, contentType, retried) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = contentType || "application/json";
    init.body = typeof body === "string" ? body : JSON.stringify(body);
  }
  const token = auth.get();
  if (token) init.headers["authorization"] = "Bearer " + token;
  const res = await fetch(path, init);
  if (res.status === 401 && !retried && auth.ask()) {
    return api(method, path, body, contentType, true);
  }
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (!res.ok) {
    const err = new Error((json && (json.detail || json.title)) || `${res.status} ${text}`);
    err.status = res.status;
    err.body = json;
    throw err;
  }
  return json;
}

function fmt(n, digits = 0) {
  if (n === undefined || n === null || Number.isNaN(n)) return "–";
  return Number(n).toLocaleString("en-US", { maximumFractionDigits: digits });
}

function ago(ms) {
  if (!ms) return "–";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  return `${(ms / 60000).toFixed(1)} min`;
}

function field(label, input) {
  return h("label", {}, label, input);
}

// ---- the WebSocket: one connection, many subscriptions ------------------------------------

const live = {
  ws: null,
  next: 1,
  handlers: new Map(), // id → {msg, err, sub (the op to send again on reconnect)}
  queue: [],
  connect() {
    const url = auth.url(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`);
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onopen = () => {
      $("#conn").textContent = "live";
      for (const [, hd] of this.handlers) if (hd.sub) ws.send(JSON.stringify(hd.sub));
      for (const m of this.queue.splice(0)) ws.send(m);
    };
    ws.onclose = () => {
      $("#conn").textContent = "reconnecting…";
      setTimeout(() => this.connect(), 2000);
    };
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      const id = m.sub || m.id;
      const hd = this.handlers.get(id);
      if (!hd) return;
      if (m.op === "error") hd.err && hd.err(m);
      else hd.msg(m);
    };
  },
  send(op) {
    const text = JSON.stringify(op);
    if (this.ws && this.ws.readyState === 1) this.ws.send(text);
    else this.queue.push(text);
  },
  /** Subscribes to a topic; returns the subscription id. */
  subscribe(params, onEvent, onError, onOther) {
    const id = `s${this.next++}`;
    const sub = Object.assign({ op: "subscribe", id }, params);
    this.handlers.set(id, {
      sub,
      msg: (m) => (m.op === "event" ? onEvent(m) : onOther && onOther(m)),
      err: onError,
    });
    this.send(sub);
    return id;
  },
  /** Watches a projection's rows; returns the watch id. */
  watch(params, onRow, onError) {
    const id = `w${this.next++}`;
    const sub = Object.assign({ op: "watch", id }, params);
    this.handlers.set(id, { sub, msg: (m) => m.op === "row" && onRow(m), err: onError });
    this.send(sub);
    return id;
  },
  drop(id) {
    if (!this.handlers.has(id)) return;
    this.handlers.delete(id);
    this.send({ op: "unsubscribe", id });
  },
};

// ---- charts ---------------------------------------------------------------------------------

const COLORS = ["#1f6feb", "#e36209", "#2e7d32", "#8250df", "#c4302b", "#0a7ea4"];

/**
 * Draws lines on a canvas. series: [{label, points: [[t, v]...]}]; opts.band: [[t, low, high]...];
 * opts.marks: [[t, v]...] (anomalies); opts.window: ms of history shown.
 */
function drawChart(canvas, series, opts = {}) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300;
  const hgt = canvas.clientHeight || 140;
  canvas.width = w * dpr;
  canvas.height = hgt * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, hgt);
  const all = series.flatMap((s) => s.points);
  const band = opts.band || [];
  const marks = opts.marks || [];
  const ts = all.map((p) => p[0]).concat(band.map((b) => b[0]));
  if (!ts.length) {
    g.fillStyle = "#999";
    g.font = "12px system-ui";
    g.fillText("no data yet", 8, hgt / 2);
    return;
  }
  let t1 = Math.max(...ts);
  let t0 = opts.window ? t1 - opts.window : Math.min(...ts);
  if (t1 === t0) t0 = t1 - 1000;
  const vs = all.filter((p) => p[0] >= t0).map((p) => p[1])
    .concat(band.filter((b) => b[0] >= t0).flatMap((b) => [b[1], b[2]]).filter(Number.isFinite));
  let v0 = Math.min(0, ...vs);
  let v1 = Math.max(...vs, v0 + 1e-9);
  if (v1 === v0) v1 = v0 + 1;
  const pad = { l: 44, r: 8, t: 8, b: 16 };
  const x = (t) => pad.l + ((t - t0) / (t1 - t0)) * (w - pad.l - pad.r);
  const y = (v) => hgt - pad.b - ((v - v0) / (v1 - v0)) * (hgt - pad.t - pad.b);
  g.strokeStyle = "#e3e3de";
  g.fillStyle = "#888";
  g.font = "10px system-ui";
  for (const v of [v0, (v0 + v1) / 2, v1]) {
    g.beginPath(); g.moveTo(pad.l, y(v)); g.lineTo(w - pad.r, y(v)); g.stroke();
    g.fillText(fmt(v, v1 - v0 < 10 ? 2 : 0), 2, y(v) + 3);
  }
  const inBand = band.filter((b) => b[0] >= t0 && Number.isFinite(b[1]) && Number.isFinite(b[2]));
  if (inBand.length > 1) {
    g.fillStyle = "rgba(31,111,235,0.12)";
    g.beginPath();
    inBand.forEach((b, i) => (i ? g.lineTo(x(b[0]), y(b[2])) : g.moveTo(x(b[0]), y(b[2]))));
    for (let i = inBand.length - 1; i >= 0; i--) g.lineTo(x(inBand[i][0]), y(inBand[i][1]));
    g.closePath();
    g.fill();
  }
  series.forEach((s, i) => {
    const pts = s.points.filter((p) => p[0] >= t0);
    g.strokeStyle = s.color || COLORS[i % COLORS.length];
    g.lineWidth = 1.5;
    g.beginPath();
    pts.forEach((p, j) => (j ? g.lineTo(x(p[0]), y(p[1])) : g.moveTo(x(p[0]), y(p[1]))));
    g.stroke();
  });
  g.fillStyle = "#c4302b";
  for (const m of marks.filter((m) => m[0] >= t0)) {
    g.beginPath(); g.arc(x(m[0]), y(m[1]), 4, 0, 2 * Math.PI); g.fill();
  }
  if (series.length > 1) {
    let lx = pad.l + 4;
    series.forEach((s, i) => {
      g.fillStyle = s.color || COLORS[i % COLORS.length];
      g.fillText(s.label, lx, pad.t + 8);
      lx += g.measureText(s.label).width + 12;
    });
  }
}

function chartCard(title) {
  const canvas = h("canvas", { class: "chart", role: "img", "aria-label": title });
  const value = h("div", { class: "big" }, "–");
  return { el: h("div", { class: "card" }, h("h3", {}, title), value, canvas), canvas, value };
}

// ---- the server's own metrics, from the __metrics topic -----------------------------------

/** Follows __metrics from `minutes` ago; calls onSample({name, series, labels, value, t}). */
function followMetrics(minutes, onSample) {
  const from = new Date(Date.now() - minutes * 60000).toISOString();
  return live.subscribe({ topic: "__metrics", from }, (m) => {
    const d = m.event.data;
    if (d) onSample(Object.assign({ t: Date.parse(m.event.time) }, d));
  }, () => {});
}

/** Time series kept per key, trimmed to a window. */
class Series {
  constructor(windowMs) { this.windowMs = windowMs; this.map = new Map(); }
  add(key, t, v) {
    if (!this.map.has(key)) this.map.set(key, []);
    const pts = this.map.get(key);
    pts.push([t, v]);
    while (pts.length && pts[0][0] < t - this.windowMs) pts.shift();
  }
  get(key) { return this.map.get(key) || []; }
  last(key) { const p = this.get(key); return p.length ? p[p.length - 1][1] : undefined; }
}

// ---- pages ----------------------------------------------------------------------------------

const pages = {};

pages.overview = (main) => {
  main.append(h("h1", {}, "Overview"));
  const cards = {
    in: chartCard("Events in per second"),
    out: chartCard("Events delivered per second"),
    bytes: chartCard("Bytes in per second"),
    fsync: chartCard("fsync latency (ms, mean and max)"),
    conns: chartCard("Open connections"),
    alerts: chartCard("Alerts raised (last 10 minutes)"),
  };
  main.append(h("div", { class: "grid" }, Object.values(cards).map((c) => c.el)));
  const recent = h("tbody");
  main.append(h("h2", {}, "Recent alerts"),
    h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "time"), h("th", {}, "type"),
      h("th", {}, "detector"), h("th", {}, "series"), h("th", {}, "value"))), recent));
  const s = new Series(10 * 60000);
  const totals = new Map(); // per tick time: sum of produce_rate
  const redraw = () => {
    drawChart(cards.in.canvas, [{ label: "in", points: s.get("in") }]);
    drawChart(cards.out.canvas, [{ label: "out", points: s.get("out") }]);
    drawChart(cards.bytes.canvas, [{ label: "bytes", points: s.get("bytes") }]);
    drawChart(cards.fsync.canvas, [{ label: "mean", points: s.get("fsync") }, { label: "max", points: s.get("fsyncmax") }]);
    drawChart(cards.conns.canvas, [{ label: "connections", points: s.get("conns") }]);
    drawChart(cards.alerts.canvas, [{ label: "alerts", points: s.get("alerts") }]);
    cards.in.value.textContent = fmt(s.last("in"));
    cards.out.value.textContent = fmt(s.last("out"));
    cards.bytes.value.textContent = fmt(s.last("bytes"));
    cards.fsync.value.textContent = fmt(s.last("fsync"), 2);
    cards.conns.value.textContent = fmt(s.last("conns"));
  };
  const sub = followMetrics(10, (m) => {
    const key = { produce_rate: null, delivery_rate: "out", bytes_in_rate: "bytes", fsync_ms: "fsync",
      fsync_max_ms: "fsyncmax", connections: "conns" }[m.name];
    if (m.name === "produce_rate") {
      totals.set(m.t, (totals.get(m.t) || 0) + m.value);
      s.add("in", m.t, totals.get(m.t));
      const pts = s.get("in");
      // Several topics at the same tick: keep one point per tick.
      if (pts.length > 1 && pts[pts.length - 2][0] === m.t) pts.splice(pts.length - 2, 1);
    } else if (key) {
      s.add(key, m.t, m.value);
    }
  });
  let alertCount = 0;
  const alertSubs = [];
  api("GET", "/v1/detectors").then(({ detectors }) => {
    const topics = [...new Set(detectors.map((d) => d.definition.alert_topic))];
    for (const topic of topics) {
      alertSubs.push(live.subscribe({ topic, from: new Date(Date.now() - 600000).toISOString(), types: "spate.alert.>" }, (m) => {
        const e = m.event;
        alertCount += 1;
        s.add("alerts", Date.parse(e.time) || Date.now(), alertCount);
        recent.prepend(h("tr", {}, h("td", {}, e.time), h("td", {}, e.type), h("td", {}, e.data.detector),
          h("td", {}, e.data.series), h("td", {}, fmt(e.data.value, 3))));
        while (recent.children.length > 20) recent.lastChild.remove();
        cards.alerts.value.textContent = fmt(alertCount);
      }, () => {}));
    }
  }).catch((e) => toast(e.message));
  const timer = setInterval(redraw, 2000);
  redraw();
  return () => { clearInterval(timer); live.drop(sub); alertSubs.forEach((id) => live.drop(id)); };
};

pages.topics = (main) => {
  main.append(h("h1", {}, "Topics"));
  const err = h("div", { class: "error" });
  const name = h("input", { id: "new-topic", placeholder: "orders", required: true });
  const parts = h("input", { id: "new-partitions", type: "number", min: 1, value: 3, style: "width:6rem" });
  const retention = h("input", { id: "new-retention", type: "number", min: 1, placeholder: "7 days", style: "width:10rem" });
  const form = h("form", { class: "inline", onsubmit: async (e) => {
    e.preventDefault();
    err.textContent = "";
    const body = { name: name.value.trim(), partitions: Number(parts.value) };
    if (retention.value) body.retention_ms = Number(retention.value);
    try { await api("POST", "/v1/topics", body); name.value = ""; refresh(); } catch (x) { err.textContent = x.message; }
  } }, field("name", name), field("partitions", parts), field("retention (ms)", retention),
  h("button", { type: "submit" }, "Create topic"));
  const body = h("tbody");
  main.append(form, err, h("table", {}, h("thead", {}, h("tr", {}, ["topic", "partitions", "size", "retention", "events/s", ""].map((t) => h("th", {}, t)))), body));
  const rates = new Series(5 * 60000);
  const sparks = new Map();
  const sub = followMetrics(5, (m) => {
    if (m.name === "produce_rate" && m.labels) rates.add(m.labels.topic, m.t, m.value);
  });
  async function refresh() {
    let topics;
    try { ({ topics } = await api("GET", "/v1/topics")); } catch (x) { err.textContent = x.message; return; }
    body.replaceChildren();
    for (const t of topics) {
      const spark = h("canvas", { class: "spark", role: "img", "aria-label": `events per second of ${t.name}` });
      sparks.set(t.name, spark);
      const size = t.partitions.reduce((a, p) => a + (p.size_bytes || 0), 0);
      const del = h("button", { class: "danger", "aria-label": `Delete topic ${t.name}`, onclick: async () => {
        if (!confirm(`Delete topic ${t.name} and all its events?`)) return;
        try { await api("DELETE", `/v1/topics/${enc(t.name)}`); refresh(); } catch (x) { err.textContent = x.message; }
      } }, "Delete");
      body.append(h("tr", {},
        h("td", {}, h("a", { href: `#/topics/${enc(t.name)}` }, t.name)),
        h("td", {}, t.config.partitions),
        h("td", {}, `${fmt(size / 1024)} KiB`),
        h("td", {}, t.config.retention_ms ? ago(t.config.retention_ms) : "none"),
        h("td", {}, spark),
        h("td", {}, t.internal ? "" : del)));
    }
    drawSparks();
  }
  function drawSparks() {
    for (const [name, c] of sparks) drawChart(c, [{ label: name, points: rates.get(name) }]);
  }
  refresh();
  const timer = setInterval(() => { drawSparks(); }, 2000);
  const slow = setInterval(refresh, 10000);
  return () => { clearInterval(timer); clearInterval(slow); live.drop(sub); };
};

/** Renders an event for the inspector. */
function inspect(box, m) {
  const e = m.event;
  const attrs = Object.entries(e).filter(([k]) => k !== "data" && k !== "data_base64");
  box.replaceChildren(
    h("h2", {}, `Event ${m.partition}:${m.offset}`),
    h("table", {}, h("tbody", {}, attrs.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, String(v)))))),
    h("h2", {}, "data"),
    h("pre", { id: "inspector-data" }, e.data !== undefined ? JSON.stringify(e.data, null, 2) : (e.data_base64 || "")));
}

pages.topic = (main, topic) => {
  main.append(h("h1", {}, `Topic ${topic}`));
  const filter = h("input", { id: "tail-filter", class: "wide", placeholder: "CEL, e.g. data.amount > 100", "aria-describedby": "tail-error" });
  const types = h("input", { id: "tail-types", placeholder: "order.*" });
  const from = h("select", { id: "tail-from" }, h("option", { value: "latest" }, "latest"),
    h("option", { value: "earliest" }, "earliest"), h("option", { value: "time" }, "time…"));
  const time = h("input", { id: "tail-time", type: "datetime-local", step: 1 });
  const error = h("div", { id: "tail-error", class: "error", role: "alert" });
  const pause = h("button", { id: "tail-pause", type: "button", class: "secondary" }, "Pause");
  const count = h("span", { id: "tail-count", class: "muted" }, "0 events");
  const rows = h("tbody", { id: "tail-rows" });
  const box = h("div", { class: "card", id: "inspector" }, h("p", { class: "muted" }, "Select an event to inspect it."));
  let sub = null;
  let paused = false;
  let seen = 0;
  // Events are drawn in batches, at most 5 times a second, so a fast topic cannot swamp the page.
  const TAIL_ROWS = 500;
  let pending = [];
  let flushing = null;
  function row(m) {
    const tr = h("tr", { class: "clickable", tabindex: 0, "data-id": m.event.id }, h("td", {}, `${m.partition}:${m.offset}`),
      h("td", {}, m.event.type), h("td", {}, m.event.id), h("td", {}, m.event.partitionkey || ""),
      h("td", {}, m.event.data !== undefined ? JSON.stringify(m.event.data).slice(0, 80) : ""));
    const open = () => { rows.querySelectorAll(".selected").forEach((r) => r.classList.remove("selected")); tr.classList.add("selected"); inspect(box, m); };
    tr.addEventListener("click", open);
    tr.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
    return tr;
  }
  function flush() {
    flushing = null;
    const batch = pending;
    pending = [];
    const frag = document.createDocumentFragment();
    for (let i = batch.length - 1; i >= Math.max(0, batch.length - TAIL_ROWS); i--) frag.append(row(batch[i]));
    rows.prepend(frag);
    while (rows.children.length > TAIL_ROWS) rows.lastChild.remove();
    count.textContent = `${seen} events`;
  }
  const positions = {}; // partition → next offset, to resume after a pause
  function start(fromValue) {
    if (sub) live.drop(sub);
    error.textContent = "";
    const params = { topic, from: fromValue };
    if (filter.value.trim()) params.filter = filter.value.trim();
    if (types.value.trim()) params.types = types.value.trim();
    sub = live.subscribe(params, (m) => {
      positions[m.partition] = m.offset + 1;
      seen += 1;
      pending.push(m);
      if (pending.length > 2 * TAIL_ROWS) pending = pending.slice(-TAIL_ROWS);
      if (!flushing) flushing = setTimeout(flush, 200);
    }, (m) => { error.textContent = m.message || m.code; });
  }
  function fromChoice() {
    if (from.value === "time" && time.value) return new Date(time.value).toISOString();
    return from.value === "time" ? "latest" : from.value;
  }
  const apply = h("button", { id: "tail-apply", type: "submit" }, "Apply");
  const form = h("form", { class: "inline", onsubmit: (e) => {
    e.preventDefault();
    rows.replaceChildren(); seen = 0; pending = []; count.textContent = "0 events";
    for (const k of Object.keys(positions)) delete positions[k];
    paused = false; pause.textContent = "Pause";
    start(fromChoice());
  } }, field("filter", filter), field("types", types), field("from", from), field("time", time), apply, pause, count);
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    if (paused) { live.drop(sub); sub = null; }
    else start(Object.keys(positions).length ? Object.assign({}, positions) : fromChoice());
  });
  // Publishing.
  const ptype = h("input", { id: "pub-type", placeholder: "order.created", required: true });
  const pkey = h("input", { id: "pub-key", placeholder: "order-42" });
  const pdata = h("textarea", { id: "pub-data", rows: 3, cols: 50 }, '{"amount": 5}');
  const presult = h("div", { id: "pub-result", class: "error", role: "status" });
  const pub = h("form", { class: "inline", onsubmit: async (e) => {
    e.preventDefault();
    presult.className = "error";
    presult.textContent = "";
    let data;
    try { data = JSON.parse(pdata.value); } catch (x) { presult.textContent = `data is not JSON: ${x.message}`; return; }
    const event = { specversion: "1.0", id: crypto.randomUUID(), source: "/console", type: ptype.value.trim(), data };
    if (pkey.value.trim()) event.partitionkey = pkey.value.trim();
    try {
      const r = await api("POST", `/v1/topics/${enc(topic)}/events`, event, "application/cloudevents+json");
      presult.className = "ok";
      presult.textContent = `published at ${r.offsets[0].partition}:${r.offsets[0].offset}`;
    } catch (x) { presult.textContent = x.message; }
  } }, field("type", ptype), field("key", pkey), field("data (JSON)", pdata), h("button", { type: "submit", id: "pub-send" }, "Publish"));
  main.append(h("h2", {}, "Live tail"), form, error,
    h("div", { class: "split" },
      h("div", { class: "tail" }, h("table", {}, h("thead", {}, h("tr", {}, ["at", "type", "id", "key", "data"].map((t) => h("th", {}, t)))), rows)),
      box),
    h("h2", {}, "Publish"), pub, presult);
  start("latest");
  return () => { if (sub) live.drop(sub); if (flushing) clearTimeout(flushing); };
};

pages.streams = (main) => {
  main.append(h("h1", {}, "Streams"));
  const topic = h("input", { id: "stream-topic", placeholder: "orders", required: true });
  const stream = h("input", { id: "stream-id", placeholder: "order-42", required: true });
  const err = h("div", { class: "error" });
  const info = h("div", { class: "muted" });
  const rows = h("tbody");
  async function load() {
    err.textContent = "";
    rows.replaceChildren();
    info.textContent = "";
    try {
      const i = await api("GET", `/v1/topics/${enc(topic.value)}/streams/${enc(stream.value)}`);
      info.textContent = `version ${i.version}, partition ${i.partition}, offsets ${i.first_offset}–${i.last_offset}`;
      const r = await api("GET", `/v1/topics/${enc(topic.value)}/streams/${enc(stream.value)}/events?from_version=0&limit=1000`);
      for (const e of r.events) {
        rows.append(h("tr", {}, h("td", {}, e.version), h("td", {}, `${e.partition}:${e.offset}`), h("td", {}, e.event.type),
          h("td", {}, h("code", {}, JSON.stringify(e.event.data)))));
      }
    } catch (x) { err.textContent = x.status === 404 ? "no such stream" : x.message; }
  }
  const look = h("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); load(); } },
    field("topic", topic), field("stream", stream), h("button", { type: "submit" }, "Look up"));
  const etype = h("input", { placeholder: "order.shipped", required: true });
  const edata = h("textarea", { rows: 2, cols: 40 }, "{}");
  const expected = h("input", { placeholder: "any | no_stream | exists | 3", value: "any" });
  const res = h("div", { class: "error", role: "status" });
  const append = h("form", { class: "inline", onsubmit: async (e) => {
    e.preventDefault();
    res.className = "error";
    res.textContent = "";
    try {
      const data = JSON.parse(edata.value);
      const r = await api("POST", `/v1/topics/${enc(topic.value)}/streams/${enc(stream.value)}/events?expected_version=${enc(expected.value.trim())}`,
        { specversion: "1.0", id: crypto.randomUUID(), source: "/console", type: etype.value.trim(), data }, "application/cloudevents+json");
      res.className = "ok";
      res.textContent = `appended as version ${r.first_version}`;
      load();
    } catch (x) {
      res.textContent = x.body && "current_version" in x.body ? `${x.message} (current version: ${x.body.current_version})` : x.message;
    }
  } }, field("type", etype), field("data (JSON)", edata), field("expected version", expected), h("button", { type: "submit" }, "Append"));
  main.append(look, err, info, h("table", {}, h("thead", {}, h("tr", {}, ["version", "at", "type", "data"].map((t) => h("th", {}, t)))), rows),
    h("h2", {}, "Append"), append, res);
};

pages.subscriptions = (main) => {
  main.append(h("h1", {}, "Subscriptions"));
  const body = h("tbody");
  const groups = h("tbody");
  const err = h("div", { class: "error" });
  const lagChart = chartCard("Consumer group lag (s)");
  const lagSeconds = new Series(10 * 60000);
  const metrics = followMetrics(10, (m) => {
    if (m.name === "consumer_lag_seconds" && m.labels) lagSeconds.add(m.labels.group, m.t, m.value);
  });
  main.append(err, h("table", {}, h("thead", {}, h("tr", {}, ["subscription", "topic", "backlog", "in flight", "oldest unacked", "acked", "dead-lettered"].map((t) => h("th", {}, t)))), body),
    h("h2", {}, "Consumer groups"), h("div", { class: "grid" }, lagChart.el),
    h("table", {}, h("thead", {}, h("tr", {}, ["group", "state", "members", "lag (records)", "lag (s)"].map((t) => h("th", {}, t)))), groups));
  async function refresh() {
    try {
      const { subscriptions } = await api("GET", "/v1/subscriptions");
      body.replaceChildren(...subscriptions.map((s) => h("tr", {},
        h("td", {}, h("a", { href: `#/subscriptions/${enc(s.name)}` }, s.name)), h("td", {}, s.topic),
        h("td", {}, fmt(s.stats.backlog)), h("td", {}, fmt(s.stats.in_flight)), h("td", {}, ago(s.stats.oldest_unacked_age_ms)),
        h("td", {}, fmt(s.stats.acked)), h("td", {}, fmt(s.stats.dead_lettered)))));
      const { groups: list } = await api("GET", "/v1/groups");
      groups.replaceChildren(...list.map((g) => h("tr", {}, h("td", {}, g.group), h("td", {}, g.state), h("td", {}, g.members),
        h("td", {}, fmt(g.lag)), h("td", {}, fmt(lagSeconds.last(g.group), 1)))));
      drawChart(lagChart.canvas, [...lagSeconds.map.keys()].map((k) => ({ label: k, points: lagSeconds.get(k) })));
    } catch (x) { err.textContent = x.message; }
  }
  refresh();
  const timer = setInterval(refresh, 2000);
  return () => { clearInterval(timer); live.drop(metrics); };
};

pages.subscription = (main, name) => {
  main.append(h("h1", {}, `Subscription ${name}`));
  const stats = h("div", { class: "grid" });
  const backlog = chartCard("Backlog");
  const inflight = chartCard("In flight");
  const oldest = chartCard("Oldest unacked (s)");
  const def = h("pre");
  const err = h("div", { class: "error", role: "alert" });
  const dead = h("tbody", { id: "dlq-rows" });
  const redriveFilter = h("input", { id: "redrive-filter", class: "wide", placeholder: "CEL over the dead letters, empty for all" });
  const result = h("div", { id: "dlq-result", class: "ok", role: "status" });
  main.append(stats, h("div", { class: "grid" }, backlog.el, inflight.el, oldest.el), h("h2", {}, "Definition"), def,
    h("h2", {}, "Dead-letter queue"), err,
    h("form", { class: "inline", onsubmit: async (e) => {
      e.preventDefault();
      err.textContent = "";
      const body = redriveFilter.value.trim() ? { filter: redriveFilter.value.trim() } : {};
      try {
        const r = await api("POST", `/v1/subscriptions/${enc(name)}/redrive`, body);
        result.textContent = `redriven: ${r.redriven}`;
        loadDead();
      } catch (x) { err.textContent = x.message; }
    } }, field("filter", redriveFilter), h("button", { id: "redrive", type: "submit" }, "Redrive")),
    result,
    h("table", {}, h("thead", {}, h("tr", {}, ["at", "event", "reason", "attempts", "source"].map((t) => h("th", {}, t)))), dead),
    h("h2", {}, "Seek"),
    h("div", { class: "row" },
      h("button", { class: "secondary", onclick: () => seek({ to: "earliest" }) }, "Seek to earliest"),
      h("button", { class: "secondary", onclick: () => seek({ to: "latest" }) }, "Seek to latest")));
  async function seek(body) {
    err.textContent = "";
    try { await api("POST", `/v1/subscriptions/${enc(name)}/seek`, body); result.textContent = `seeked to ${body.to}`; } catch (x) { err.textContent = x.message; }
  }
  async function loadDead() {
    try {
      const r = await api("GET", `/v1/subscriptions/${enc(name)}/dead-letters?limit=100`);
      dead.replaceChildren(...r.dead_letters.map((d) => h("tr", {}, h("td", {}, `${d.partition}:${d.offset}`),
        h("td", {}, d.event.id), h("td", {}, d.event.spatedlqreason || ""), h("td", {}, d.event.spateattempts || ""),
        h("td", {}, `${d.event.spatesourcetopic} ${d.event.spatesourcepartition}:${d.event.spatesourceoffset}`))));
    } catch (x) { err.textContent = x.message; }
  }
  const s = new Series(10 * 60000);
  async function refresh() {
    try {
      const info = await api("GET", `/v1/subscriptions/${enc(name)}`);
      const st = info.stats;
      stats.replaceChildren(...[["backlog", st.backlog], ["in flight", st.in_flight], ["delivered", st.delivered],
        ["acked", st.acked], ["redelivered", st.redelivered], ["dead-lettered", st.dead_lettered]].map(([k, v]) =>
        h("div", { class: "card" }, h("h3", {}, k), h("div", { class: "big", "data-stat": k }, fmt(v)))));
      const copy = Object.assign({}, info);
      delete copy.stats;
      def.textContent = JSON.stringify(copy, null, 2);
      backlog.value.textContent = fmt(st.backlog);
      inflight.value.textContent = fmt(st.in_flight);
      oldest.value.textContent = ago(st.oldest_unacked_age_ms);
    } catch (x) { err.textContent = x.message; }
    drawChart(backlog.canvas, [{ label: "backlog", points: s.get("backlog") }]);
    drawChart(inflight.canvas, [{ label: "in flight", points: s.get("inflight") }]);
    drawChart(oldest.canvas, [{ label: "oldest", points: s.get("oldest") }]);
  }
  const sub = followMetrics(10, (m) => {
    if (!m.labels || m.labels.subscription !== name) return;
    if (m.name === "subscription_backlog") s.add("backlog", m.t, m.value);
    if (m.name === "subscription_in_flight") s.add("inflight", m.t, m.value);
    if (m.name === "subscription_oldest_unacked_ms") s.add("oldest", m.t, m.value / 1000);
  });
  refresh();
  loadDead();
  const timer = setInterval(() => { refresh(); loadDead(); }, 2000);
  return () => { clearInterval(timer); live.drop(sub); };
};

pages.projections = (main) => {
  main.append(h("h1", {}, "Projections"));
  const body = h("tbody");
  const err = h("div", { class: "error" });
  main.append(err, h("table", {}, h("thead", {}, h("tr", {}, ["projection", "topic", "status", "lag", "errors"].map((t) => h("th", {}, t)))), body),
    h("p", {}, h("a", { href: "#/builders" }, "Create one with the builder")));
  async function refresh() {
    try {
      const { projections } = await api("GET", "/v1/projections");
      body.replaceChildren(...projections.map((p) => h("tr", {}, h("td", {}, h("a", { href: `#/projections/${enc(p.name)}` }, p.name)),
        h("td", {}, p.definition.topic), h("td", {}, p.status), h("td", {}, `${fmt(p.lag_records)} (${fmt(p.lag_seconds, 1)} s)`), h("td", {}, fmt(p.errors)))));
    } catch (x) { err.textContent = x.message; }
  }
  refresh();
  const timer = setInterval(refresh, 2000);
  return () => clearInterval(timer);
};

pages.projection = (main, name) => {
  main.append(h("h1", {}, `Projection ${name}`));
  const status = h("div", { class: "muted", id: "projection-status" });
  const def = h("pre");
  const prefix = h("input", { id: "row-prefix", placeholder: "key prefix" });
  const rows = h("tbody", { id: "projection-rows" });
  const err = h("div", { class: "error", role: "alert" });
  const byKey = new Map();
  let watch = null;
  function show(key, value, offset) {
    let tr = byKey.get(key);
    const cells = [h("td", {}, key), h("td", {}, h("code", {}, JSON.stringify(value))), h("td", {}, offset)];
    if (tr) tr.replaceChildren(...cells);
    else {
      tr = h("tr", { "data-key": key }, cells);
      byKey.set(key, tr);
      rows.append(tr);
    }
  }
  async function load() {
    err.textContent = "";
    rows.replaceChildren();
    byKey.clear();
    try {
      const r = await api("GET", `/v1/projections/${enc(name)}/rows?prefix=${enc(prefix.value)}&limit=200`);
      for (const row of r.rows) show(row.key, row.value, row.offset);
    } catch (x) { err.textContent = x.message; }
    if (watch) live.drop(watch);
    watch = live.watch({ projection: name, prefix: prefix.value }, (m) => show(m.key, m.value, m.offset), (m) => { err.textContent = m.message; });
  }
  async function refresh() {
    try {
      const p = await api("GET", `/v1/projections/${enc(name)}`);
      status.textContent = `${p.status} · lag ${fmt(p.lag_records)} records (${fmt(p.lag_seconds, 1)} s) · ${fmt(p.errors)} errors · position ${p.position}`;
      def.textContent = JSON.stringify(p.definition, null, 2);
    } catch (x) { err.textContent = x.message; }
  }
  main.append(status, h("h2", {}, "Definition"), def, h("h2", {}, "Rows"),
    h("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); load(); } }, field("prefix", prefix), h("button", { type: "submit" }, "Search")),
    err, h("table", {}, h("thead", {}, h("tr", {}, ["key", "value", "offset"].map((t) => h("th", {}, t)))), rows));
  refresh();
  load();
  const timer = setInterval(refresh, 2000);
  return () => { clearInterval(timer); if (watch) live.drop(watch); };
};

pages.detectors = (main) => {
  main.append(h("h1", {}, "Detectors"));
  const body = h("tbody");
  const err = h("div", { class: "error" });
  main.append(err, h("table", {}, h("thead", {}, h("tr", {}, ["detector", "kind", "topic", "series", "points", "alerts", "lag", "attention"].map((t) => h("th", {}, t)))), body),
    h("p", {}, h("a", { href: "#/builders" }, "Create one with the builder")));
  async function refresh() {
    try {
      const { detectors } = await api("GET", "/v1/detectors");
      body.replaceChildren(...detectors.map((d) => h("tr", {}, h("td", {}, h("a", { href: `#/detectors/${enc(d.name)}` }, d.name)),
        h("td", {}, d.definition.algorithm.kind), h("td", {}, d.definition.topic), h("td", {}, fmt(d.series)), h("td", {}, fmt(d.points)),
        h("td", {}, fmt(d.alerts)), h("td", {}, fmt(d.lag_records)), h("td", {}, d.error ? h("span", { class: "badge bad" }, d.error) : ""))));
    } catch (x) { err.textContent = x.message; }
  }
  refresh();
  const timer = setInterval(refresh, 2000);
  return () => clearInterval(timer);
};

pages.detector = (main, name) => {
  main.append(h("h1", {}, `Detector ${name}`));
  const status = h("div", { class: "muted", id: "detector-status" });
  const pick = h("select", { id: "detector-series", "aria-label": "series" });
  const card = chartCard("Values, expected band and anomalies");
  const alerts = h("tbody", { id: "detector-alerts" });
  const err = h("div", { class: "error", role: "alert" });
  main.append(status, err, h("div", { class: "row" }, field("series", pick)), card.el,
    h("h2", {}, "Alerts"), h("table", {}, h("thead", {}, h("tr", {}, ["time", "type", "series", "value", "score", "expected"].map((t) => h("th", {}, t)))), alerts));
  let sub = null;
  async function refresh() {
    try {
      const d = await api("GET", `/v1/detectors/${enc(name)}`);
      status.textContent = `${d.definition.algorithm.kind} on ${d.definition.topic} · ${fmt(d.series)} series · ${fmt(d.points)} points · ${fmt(d.alerts)} alerts · lag ${fmt(d.lag_records)}${d.error ? " · " + d.error : ""}`;
      if (!sub) {
        sub = live.subscribe({ topic: d.definition.alert_topic, from: "earliest", filter: `data.detector == ${JSON.stringify(name)}` }, (m) => {
          const e = m.event;
          alerts.prepend(h("tr", {}, h("td", {}, e.time), h("td", {}, e.type), h("td", {}, e.subject), h("td", {}, fmt(e.data.value, 3)),
            h("td", {}, fmt(e.data.score, 2)), h("td", {}, `${fmt(e.data.expected.low, 2)} – ${fmt(e.data.expected.high, 2)}`)));
          while (alerts.children.length > 200) alerts.lastChild.remove();
        }, () => {
          // The alert topic appears with the first alert: try again on the next refresh.
          if (sub) live.drop(sub);
          sub = null;
        });
      }
      const { series } = await api("GET", `/v1/detectors/${enc(name)}/series?limit=100`);
      const current = pick.value;
      pick.replaceChildren(...series.map((s) => h("option", { value: s.series }, s.series)));
      if (series.some((s) => s.series === current)) pick.value = current;
      if (pick.value) {
        const { points } = await api("GET", `/v1/detectors/${enc(name)}/series/${enc(pick.value)}`);
        const pts = points.map((p) => [Date.parse(p.time), p.value]);
        drawChart(card.canvas, [{ label: pick.value, points: pts }], {
          band: points.map((p) => [Date.parse(p.time), p.low, p.high]),
          marks: points.filter((p) => p.alert).map((p) => [Date.parse(p.time), p.value]),
        });
        card.value.textContent = points.length ? fmt(points[points.length - 1].value, 3) : "–";
      }
    } catch (x) { err.textContent = x.message; }
  }
  pick.addEventListener("change", refresh);
  refresh();
  const timer = setInterval(refresh, 2000);
  return () => { clearInterval(timer); if (sub) live.drop(sub); };
};

// ---- builders: subscriptions, projections, detectors and rules without writing JSON ----------

pages.builders = (main) => {
  main.append(h("h1", {}, "Builders"));
  const kind = h("select", { id: "builder-kind" },
    h("option", { value: "subscription" }, "Subscription"), h("option", { value: "projection" }, "Projection"),
    h("option", { value: "threshold" }, "Threshold rule"), h("option", { value: "auto" }, "Anomaly detector"));
  const topic = h("select", { id: "builder-topic" });
  const name = h("input", { id: "builder-name", placeholder: "name", required: true });
  const filter = h("input", { id: "builder-filter", class: "wide", placeholder: "CEL filter (optional)" });
  const target = { el: filter };
  const fields = h("div", { id: "builder-fields" });
  const preview = h("div", { id: "builder-preview" });
  const err = h("div", { id: "builder-error", class: "error", role: "alert" });
  const done = h("div", { id: "builder-done", class: "ok", role: "status" });
  // Kind-specific inputs.
  const extra = h("div");
  const inputs = {};
  const mk = (id, label, attrs) => { inputs[id] = h("input", Object.assign({ id: `builder-${id}` }, attrs || {})); return field(label, inputs[id]); };
  function renderExtra() {
    extra.replaceChildren();
    const k = kind.value;
    if (k === "subscription") {
      extra.append(h("div", { class: "row" }, mk("max_attempts", "max attempts", { type: "number", min: 1, value: 5 }),
        mk("backoff", "first retry after (ms)", { type: "number", min: 1, value: 1000 }),
        mk("webhook", "webhook URL (optional)", { class: "wide", placeholder: "http://127.0.0.1:8080/hook" })));
    } else if (k === "projection") {
      extra.append(h("div", { class: "row" }, mk("key", "row key (CEL)", { placeholder: "data.customer" }),
        mk("sum", "sum of (CEL, optional)", { placeholder: "data.amount" })));
    } else {
      extra.append(h("div", { class: "row" }, mk("series", "series (CEL)", { placeholder: "data.sensor_id" }),
        mk("value", "value (CEL)", { placeholder: "data.temperature" }),
        k === "threshold" ? [mk("min", "min", { type: "number", step: "any" }), mk("max", "max", { type: "number", step: "any" }),
          mk("for_ms", "for (ms)", { type: "number", min: 0, value: 0 })]
          : mk("sensitivity", "sensitivity", { type: "number", min: 0, max: 1, step: 0.05, value: 0.5 }),
        mk("alert_topic", "alert topic", { value: "alerts" })));
    }
    for (const el of Object.values(inputs)) el.addEventListener("focus", () => { target.el = el; });
  }
  filter.addEventListener("focus", () => { target.el = filter; });
  kind.addEventListener("change", renderExtra);
  renderExtra();
  async function loadTopics() {
    const { topics } = await api("GET", "/v1/topics");
    topic.replaceChildren(...topics.filter((t) => !t.name.startsWith("__")).map((t) => h("option", { value: t.name }, t.name)));
  }
  /** Recent events of the topic and the JSON paths seen in them, as chips that fill the input in focus. */
  async function sample() {
    err.textContent = "";
    fields.replaceChildren();
    if (!topic.value) return;
    try {
      const r = await api("POST", `/v1/topics/${enc(topic.value)}/preview`, { limit: 200 });
      fields.append(h("span", { class: "muted" }, `fields seen in the last ${r.scanned} events (click to insert): `),
        ...r.fields.map((f) => h("button", { type: "button", class: "chip", "data-field": f, onclick: () => insert(f) }, f)));
    } catch (x) { err.textContent = x.message; }
  }
  function insert(path) {
    const el = target.el;
    if (el === filter) el.value = el.value ? `${el.value} && ${path}` : path;
    else el.value = path;
    el.focus();
  }
  async function runPreview() {
    err.textContent = "";
    preview.replaceChildren();
    const body = { limit: 200 };
    if (filter.value.trim()) body.filter = filter.value.trim();
    const k = kind.value;
    if ((k === "threshold" || k === "auto") && inputs.value.value) {
      body.value = inputs.value.value;
      if (inputs.series.value) body.series = inputs.series.value;
    }
    if (k === "projection" && inputs.key.value) body.series = inputs.key.value;
    try {
      const r = await api("POST", `/v1/topics/${enc(topic.value)}/preview`, body);
      let breach = "";
      if (k === "threshold") {
        const lo = inputs.min.value === "" ? -Infinity : Number(inputs.min.value);
        const hi = inputs.max.value === "" ? Infinity : Number(inputs.max.value);
        const out = r.matched.filter((m) => typeof m.value === "number" && (m.value < lo || m.value > hi)).length;
        breach = ` · ${out} outside the range`;
      }
      preview.append(h("p", { id: "builder-preview-summary" }, `${r.matched.length} of ${r.scanned} recent events match${r.errors ? ` (${r.errors} could not be evaluated)` : ""}${breach}`),
        h("table", {}, h("thead", {}, h("tr", {}, ["at", "type", "series/key", "value", "data"].map((t) => h("th", {}, t)))),
          h("tbody", {}, r.matched.slice(0, 20).map((m) => h("tr", {}, h("td", {}, `${m.partition}:${m.offset}`), h("td", {}, m.event.type),
            h("td", {}, m.series ?? ""), h("td", {}, m.value ?? ""), h("td", {}, h("code", {}, JSON.stringify(m.event.data))))))));
    } catch (x) { err.textContent = x.message; }
  }
  function definition() {
    const k = kind.value;
    const f = filter.value.trim() || undefined;
    const num = (id) => (inputs[id].value === "" ? undefined : Number(inputs[id].value));
    if (k === "subscription") {
      const d = { topic: topic.value, filter: f, from: "earliest", max_attempts: num("max_attempts"),
        backoff: { initial_ms: num("backoff"), max_ms: Math.max(num("backoff") || 1000, 60000), multiplier: 2.0 } };
      if (inputs.webhook.value.trim()) d.push = { url: inputs.webhook.value.trim() };
      return ["PUT", `/v1/subscriptions/${enc(name.value.trim())}`, d];
    }
    if (k === "projection") {
      const aggregate = { count: "count()" };
      if (inputs.sum.value.trim()) aggregate.sum = `sum(${inputs.sum.value.trim()})`;
      return ["PUT", `/v1/projections/${enc(name.value.trim())}`, { topic: topic.value, filter: f, key: inputs.key.value.trim() || undefined, reduce: { aggregate } }];
    }
    const algorithm = k === "threshold"
      ? { kind: "threshold", min: num("min"), max: num("max"), for_ms: num("for_ms") || 0 }
      : { kind: "auto", sensitivity: num("sensitivity") };
    return ["PUT", `/v1/detectors/${enc(name.value.trim())}`, { topic: topic.value, filter: f,
      series: inputs.series.value.trim() || undefined, value: inputs.value.value.trim(), algorithm,
      alert_topic: inputs.alert_topic.value.trim() || "alerts", cooldown_ms: k === "threshold" ? 0 : 60000 }];
  }
  const form = h("form", { onsubmit: async (e) => {
    e.preventDefault();
    err.textContent = "";
    done.textContent = "";
    const [method, path, body] = definition();
    try {
      await api(method, path, body);
      const page = { subscription: "subscriptions", projection: "projections", threshold: "detectors", auto: "detectors" }[kind.value];
      done.replaceChildren("Saved: ", h("a", { href: `#/${page}/${enc(name.value.trim())}` }, `open ${name.value.trim()}`));
    } catch (x) { err.textContent = x.message; }
  } },
  h("div", { class: "row" }, field("what", kind), field("topic", topic), field("name", name),
    h("button", { type: "button", class: "secondary", id: "builder-sample", onclick: sample }, "Show fields")),
  fields, h("div", { class: "row" }, field("filter", filter)), extra,
  h("div", { class: "row" }, h("button", { type: "button", class: "secondary", id: "builder-preview-run", onclick: runPreview }, "Preview"),
    h("button", { type: "submit", id: "builder-save" }, "Save")), err, done, preview);
  main.append(form);
  topic.addEventListener("change", sample);
  loadTopics().then(sample).catch((x) => { err.textContent = x.message; });
};

// ---- routing ----------------------------------------------------------------------------------

let cleanup = null;

function route() {
  const main = $("#main");
  if (cleanup) { try { cleanup(); } catch (_) { /* the page is gone anyway */ } cleanup = null; }
  main.replaceChildren();
  const parts = (location.hash.replace(/^#\/?/, "") || "overview").split("/").map(decodeURIComponent);
  const [section, arg] = parts;
  const one = { topics: "topic", subscriptions: "subscription", projections: "projection", detectors: "detector" };
  const page = arg !== undefined && one[section] ? one[section] : section;
  const render = pages[page] || pages.overview;
  for (const a of document.querySelectorAll("header nav a")) {
    if (a.getAttribute("href") === `#/${section}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = `Spate · ${section}${arg ? " · " + arg : ""}`;
  cleanup = render(main, arg) || null;
  main.focus({ preventScroll: true });
}

window.addEventListener("hashchange", route);
live.connect();
route();
