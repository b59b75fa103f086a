// edgecoop live dashboard: renders /api/state and the /events stream. No dependencies, works offline.
// Every text that comes from the wire (agent descriptions, questions, answers) is data: it is only ever put
// into the page with textContent / createTextNode, never as HTML.
"use strict";

const TERMINAL = new Set(["done", "failed", "timed_out"]);
const MAX_DONE_SHOWN = 40;
const SPLIT_MINUTES = 30;
const SVG_NS = "http://www.w3.org/2000/svg";

// How a finished task counts (see state.py): done at the edge, done in the cloud, done with no tier (the
// orchestrator refused or asked back), failed (failed or timed out, whatever tier it tried).
const OUTCOMES = ["edge", "cloud", "none", "failed"];
const OUTCOME_LABELS = { edge: "edge", cloud: "cloud", none: "refused / asked back", failed: "failed" };

const model = {
  prefix: "",
  agents: new Map(),   // id -> agent record
  tasks: new Map(),    // task_id -> task record (comparison runs are marked: task.comparison)
  sensors: new Map(),  // "agent/sensor" -> {agent, sensor, unit, points: [[ts, value], ...]}
  orchestrators: new Map(), // id -> {id, online, epoch, status_ts, alarm}
  split: { minutes: [], totals: { edge: 0, cloud: 0, none: 0, failed: 0 }, comparison: {} },
  broker: { connected: false, since: 0, url: "" }, // the dashboard's own broker connection
  streamOpen: false,   // our event stream from the dashboard
  maxPoints: 120,
};

// -- DOM helpers ------------------------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function setAttrs(node, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(key, String(value));
  }
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }
}

function replaceChildren(container, nodes, emptyText) {
  container.replaceChildren(...(nodes.length ? nodes : [el("p", { class: "empty" }, emptyText)]));
}

function clock(ts) {
  if (!ts) return "";
  const d = new Date(ts * 1000);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
}

function fmt(value, digits = 1) {
  if (typeof value !== "number" || !isFinite(value)) return "";
  if (Math.abs(value) >= 1000 || Number.isInteger(value)) return String(Math.round(value));
  return value.toFixed(digits);
}

function truncate(text, n) {
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

// -- state updates ------------------------------------------------------------------------------------------
function applySnapshot(snap) {
  model.prefix = snap.prefix || model.prefix;
  model.agents = new Map((snap.agents || []).map((a) => [a.id, a]));
  model.tasks = new Map((snap.tasks || []).map((t) => [t.task_id, t]));
  model.sensors = new Map((snap.sensors || []).map((s) => [`${s.agent}/${s.sensor}`, s]));
  model.split = snap.split || model.split;
  model.orchestrators = new Map((snap.orchestrators || []).map((o) => [o.id, o]));
  model.broker = snap.broker || model.broker;
  schedule();
}

const handlers = {
  snapshot: applySnapshot,
  agent: (a) => { model.agents.set(a.id, a); schedule(); },
  agent_removed: (a) => { model.agents.delete(a.id); schedule(); },
  task: (t) => {
    model.tasks.delete(t.task_id); // re-insert: most recently changed last
    model.tasks.set(t.task_id, t);
    while (model.tasks.size > 200) model.tasks.delete(model.tasks.keys().next().value);
    schedule();
  },
  reading: (r) => {
    const key = `${r.agent}/${r.sensor}`;
    const series = model.sensors.get(key) || { agent: r.agent, sensor: r.sensor, unit: r.unit, points: [] };
    series.unit = r.unit;
    series.points.push([r.ts, r.value]);
    if (series.points.length > model.maxPoints) series.points.splice(0, series.points.length - model.maxPoints);
    model.sensors.set(key, series);
    schedule();
  },
  split: (s) => { model.split = s; schedule(); },
  orchestrator: (o) => { model.orchestrators.set(o.id, o); schedule(); },
  orchestrator_removed: (o) => { model.orchestrators.delete(o.id); schedule(); },
  broker: (b) => { model.broker = b; schedule(); },
};

let renderPending = false;
function schedule() {
  if (renderPending) return;
  renderPending = true;
  setTimeout(() => { renderPending = false; render(); }, 60);
}

// -- agents ---------------------------------------------------------------------------------------------------
function renderAgent(a) {
  const card = a.card || {};
  // without the broker, nobody can tell who is online: the last known state is not shown as current
  const online = !model.broker.connected ? "unknown" : a.online === true ? "online" : a.online === false ? "offline" : "unknown";
  const hw = card.hardware || {};
  const load = card.load || {};
  const caps = (card.capabilities || []).map((c) =>
    el("li", { class: `chip kind-${c.kind}`, title: c.description || "" }, c.name, " ", el("small", {}, `${c.kind} · ${c.cooperation}`)));
  const sensors = (card.sensors || []).map((s) => el("li", { class: "chip sensor" }, `${s.name}${s.unit ? ` (${s.unit})` : ""}`));
  const models = (card.models || []).map((m) => el("li", { class: "chip model" }, m.name));
  const facts = [
    card.site && `site ${card.site}`,
    card.location && card.location.name,
    hw.cpu && truncate(hw.cpu, 40),
    hw.cores && `${hw.cores} cores`,
    hw.ram_mb && `${Math.round(hw.ram_mb / 102.4) / 10} GB`,
    hw.accelerator && hw.accelerator !== "none" && hw.accelerator,
    card.privacy && `privacy ${card.privacy}`,
  ].filter(Boolean).join(" · ");
  const queued = (load.queue || 0) + (load.inflight || 0);
  const bar = el("span", { class: load.busy ? "busy" : "" });
  bar.style.width = `${Math.min(100, queued * 20)}%`; // CSSOM, not a style attribute: allowed by the CSP
  return el("article", { class: "agent", "data-agent-id": a.id, "data-online": model.broker.connected ? String(a.online) : "unknown" },
    el("header", {}, el("h3", { title: a.id }, a.id), el("span", { class: `badge ${online}` }, online)),
    card.description ? el("p", { class: "desc" }, truncate(card.description, 160)) : null,
    a.card ? null : el("p", { class: "facts" }, "no capability card yet"),
    facts ? el("p", { class: "facts" }, facts) : null,
    el("ul", { class: "chips" }, caps, models, sensors),
    el("div", { class: "load", title: "requests queued + in flight" },
      `load ${load.inflight || 0} in flight · ${load.queue || 0} queued`,
      el("div", { class: "loadbar" }, bar)));
}

function renderAgents() {
  const agents = [...model.agents.values()].sort((x, y) =>
    (y.online === true) - (x.online === true) || x.id.localeCompare(y.id));
  replaceChildren(document.getElementById("agents"), agents.map(renderAgent), "No agents yet.");
  const online = agents.filter((a) => a.online === true).length;
  document.getElementById("agents-count").textContent = model.broker.connected
    ? `${online} online / ${agents.length}`
    : `broker unreachable: ${agents.length} known, online status unknown (${online} online when last seen)`;
}

// -- orchestrators: status and alarms ----------------------------------------------------------------------------
function renderOrchestrator(o) {
  const online = !model.broker.connected ? "unknown" : o.online === true ? "online" : o.online === false ? "offline" : "unknown";
  const alarm = o.alarm;
  let alarmNode = null;
  if (alarm && alarm.active) {
    const suspects = (alarm.suspects || []).map((x) => `${x.agent_id} (${fmt(x.outstanding, 0)} outstanding)`).join(", ");
    alarmNode = el("p", { class: "alarm active" },
      `overload (${alarm.alarm}): the broker dropped ${fmt(alarm.dropped, 0)} message${alarm.dropped === 1 ? "" : "s"}`,
      alarm.since ? ` since ${clock(alarm.since)}` : "", suspects ? `; suspects: ${suspects}` : "",
      ". Requests are re-sent until answered.");
  } else if (alarm) {
    alarmNode = el("p", { class: "alarm cleared" },
      `last overload alarm cleared${alarm.ts ? ` at ${clock(alarm.ts)}` : ""} (${fmt(alarm.dropped_total, 0)} dropped in all)`);
  }
  return el("article", { class: "orchestrator", "data-orchestrator-id": o.id, "data-online": online,
    "data-alarm": alarm ? String(alarm.active) : "none" },
  el("header", {}, el("h3", { title: o.id }, o.id), el("span", { class: `badge ${online}` }, online),
    alarm && alarm.active ? el("span", { class: "badge alarm" }, "degraded") : null),
  o.online === false && model.broker.connected ? el("p", { class: "facts" },
    `offline since ${clock(o.status_ts)}: tasks submitted now wait for it`) : null,
  alarmNode);
}

function renderOrchestrators() {
  const list = [...model.orchestrators.values()].sort((x, y) => x.id.localeCompare(y.id));
  replaceChildren(document.getElementById("orchestrators"), list.map(renderOrchestrator),
    "No orchestrator has connected: tasks are not being answered.");
  const online = list.filter((o) => o.online === true).length;
  const alarms = list.filter((o) => o.alarm && o.alarm.active).length;
  document.getElementById("orchestrators-count").textContent = list.length
    ? `${online} online${alarms ? ` · ${alarms} alarm${alarms === 1 ? "" : "s"}` : ""}` : "";
}

// -- tasks and their cooperation graph ---------------------------------------------------------------------------
function graphNodes(task) {
  // Plan steps, matched in order with the steps that were executed; executed steps outside the plan
  // (an escalation to the cloud, a retry) are appended after it.
  const plan = task.plan || { shape: "single", steps: [] };
  const done = (task.steps || []).slice();
  const take = (p) => {
    const i = done.findIndex((s) => s.agent === p.agent && s.capability === p.capability);
    return i >= 0 ? done.splice(i, 1)[0] : null;
  };
  const planned = plan.steps.map((p) => ({ ...p, result: take(p) }));
  const extra = done.map((s) => ({ ...s, result: s }));
  const columns = [];
  if (plan.shape === "parallel" && planned.length) columns.push(planned);
  else planned.forEach((n) => columns.push([n]));
  extra.forEach((n) => columns.push([n]));
  return { shape: plan.shape, columns };
}

let graphCount = 0;
function renderGraph(task) {
  const { columns } = graphNodes(task);
  const terminal = TERMINAL.has(task.state);
  const W = 156, H = 40, GX = 40, GY = 12, PAD = 6;
  const all = [[{ io: "in" }], ...columns, [{ io: "out" }]];
  const rows = Math.max(...all.map((c) => c.length));
  const width = PAD * 2 + all.length * W + (all.length - 1) * GX;
  const height = PAD * 2 + rows * H + (rows - 1) * GY + 12;
  const markerId = `arrow-${++graphCount}`;
  const root = svg("svg", { class: "graph", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `cooperation graph of ${task.task_id}` },
  svg("defs", {}, svg("marker", { id: markerId, viewBox: "0 0 8 8", refX: 8, refY: 4, markerWidth: 7, markerHeight: 7, orient: "auto" },
    svg("path", { d: "M0,0 L8,4 L0,8 z", class: "arrow" }))));
  const pos = all.map((col, ci) => col.map((_, ri) => {
    const colHeight = col.length * H + (col.length - 1) * GY;
    return { x: PAD + ci * (W + GX), y: PAD + (rows * H + (rows - 1) * GY - colHeight) / 2 + ri * (H + GY) };
  }));
  for (let ci = 0; ci + 1 < all.length; ci++) {
    for (const a of pos[ci]) {
      for (const b of pos[ci + 1]) {
        const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
        root.appendChild(svg("path", { class: "edge-line", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 1},${y2}`,
          "marker-end": `url(#${markerId})` }));
      }
    }
  }
  all.forEach((col, ci) => col.forEach((node, ri) => {
    const { x, y } = pos[ci][ri];
    let cls, label, sub;
    if (node.io === "in") {
      cls = "node io ok"; label = "task"; sub = task.classification ? (task.classification.cooperation || []).join("+") || "received" : "received";
    } else if (node.io === "out") {
      const ok = task.state === "done";
      cls = `node io ${terminal ? (ok ? "ok" : "bad") : "pending"}`;
      label = terminal ? (ok ? "answer" : task.state.replace("_", " ")) : "…";
      sub = terminal ? [task.tier, task.latency_ms != null ? `${fmt(task.latency_ms, 0)} ms` : ""].filter(Boolean).join(" · ") : task.state.replace("_", " ");
    } else {
      const r = node.result;
      const state = r ? (r.ok === false ? "failed" : "done") : "pending";
      cls = `node step tier-${node.tier || "edge"} ${state}`;
      label = truncate(node.agent || "?", 22);
      sub = [truncate(node.capability || "", 16), node.tier, r && r.ms != null ? `${fmt(r.ms, 0)} ms` : ""].filter(Boolean).join(" · ");
    }
    root.appendChild(svg("g", { class: cls, "data-agent": node.agent || null },
      svg("rect", { x, y, width: W, height: H, rx: 6 }),
      svg("text", { x: x + W / 2, y: y + 16, "text-anchor": "middle" }, label),
      svg("text", { x: x + W / 2, y: y + 31, "text-anchor": "middle", class: "sub" }, truncate(sub, 30))));
  }));
  return root;
}

function renderTask(t) {
  const c = t.classification;
  const meta = c ? [
    c.cooperation && c.cooperation.length ? `cooperation ${c.cooperation.join(", ")}` : "",
    c.domain && `domain ${c.domain}`,
    c.difficulty !== "" && c.difficulty != null ? `difficulty ${c.difficulty}` : "",
    c.privacy && `privacy ${c.privacy}`,
    c.edge_capable === true ? "edge-capable" : c.edge_capable === false ? "needs cloud" : "",
  ].filter(Boolean).join(" · ") : "";
  const shape = t.plan ? `${t.plan.shape} plan, ${t.plan.steps.length} step${t.plan.steps.length === 1 ? "" : "s"}` : "";
  const t0 = t.started;
  return el("article", { class: "task", "data-task-id": t.task_id, "data-state": t.state, "data-tier": t.tier || null,
    "data-comparison": t.comparison ? "true" : null },
    el("header", {},
      t.comparison ? el("span", { class: "comparison", title: "a comparison run (baseline or benchmark): not live traffic, not counted" }, "baseline run") : null,
      el("span", { class: "state" }, t.state.replace("_", " ")),
      // a failed task "tried" a tier: it was not answered there
      t.tier ? (t.state === "failed" || t.state === "timed_out"
        ? el("span", { class: "tier tier-none" }, `tried ${t.tier}`)
        : el("span", { class: `tier tier-${t.tier}` }, t.tier)) : null,
      (t.history || []).some((h) => h.state === "escalated") ? el("span", { class: "escalated" }, "escalated") : null,
      // the cloud was unreachable: the answer is the edge model's best, with the confidence it measured
      (t.history || []).some((h) => h.state === "degraded") ? el("span", { class: "degraded", title: "cloud unreachable: the edge model's best answer" },
        t.confidence != null ? `degraded · confidence ${fmt(t.confidence, 2)}` : "degraded") : null,
      t.latency_ms != null ? el("span", {}, `${fmt(t.latency_ms, 0)} ms`) : null,
      t.cost != null ? el("span", {}, `cost ${fmt(t.cost, 4)}`) : null,
      shape ? el("span", {}, shape) : null,
      t.strategy ? el("span", { class: "strategy" }, `strategy ${t.strategy}`) : null,
      el("span", { class: "tid" }, t.task_id),
      el("time", {}, clock(t.updated))),
    el("p", { class: "question" }, t.question || "(no question text)"),
    meta ? el("p", { class: "meta" }, meta) : null,
    renderGraph(t),
    t.answer != null && t.answer !== "" ? el("p", { class: "answer" }, t.answer) : null,
    el("ol", { class: "timeline" }, (t.history || []).map((h) =>
      el("li", {}, `${h.state.replace("_", " ")} +${fmt(Math.max(0, (h.ts - t0) * 1000), 0)} ms`))));
}

function renderTasks() {
  const all = [...model.tasks.values()].sort((a, b) => b.started - a.started);
  const tasks = all.filter((t) => !t.comparison);
  const comparison = all.filter((t) => t.comparison);
  const inflight = tasks.filter((t) => !TERMINAL.has(t.state));
  const done = tasks.filter((t) => TERMINAL.has(t.state));
  const failed = done.filter((t) => t.state !== "done").length;
  graphCount = 0;
  replaceChildren(document.getElementById("tasks-inflight"), inflight.map(renderTask), "Nothing in flight.");
  replaceChildren(document.getElementById("tasks-done"), done.slice(0, MAX_DONE_SHOWN).map(renderTask), "No finished tasks yet.");
  document.getElementById("tasks-count").textContent =
    `${inflight.length} in flight · ${done.length} finished${failed ? ` (${failed} failed)` : ""}`;
  const section = document.getElementById("comparison-section");
  section.hidden = comparison.length === 0;
  replaceChildren(document.getElementById("tasks-comparison"), comparison.slice(0, MAX_DONE_SHOWN).map(renderTask), "");
  document.getElementById("comparison-count").textContent = String(comparison.length);
}

// -- edge/cloud split ------------------------------------------------------------------------------------------
function renderSplit() {
  const byMinute = new Map(model.split.minutes.map((m) => [m.t, m]));
  const nowMinute = Math.floor(Date.now() / 60000) * 60;
  const last = Math.max(nowMinute, ...model.split.minutes.map((m) => m.t));
  const bars = [];
  for (let i = SPLIT_MINUTES - 1; i >= 0; i--) bars.push(byMinute.get(last - i * 60) || { t: last - i * 60, edge: 0, cloud: 0, none: 0, failed: 0 });
  const W = 360, H = 130, left = 26, bottom = 18, top = 6;
  const max = Math.max(1, ...bars.map((b) => OUTCOMES.reduce((n, o) => n + (b[o] || 0), 0)));
  const bw = (W - left) / bars.length;
  const scale = (H - bottom - top) / max;
  const root = svg("svg", { class: "split", width: "100%", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "edge/cloud split per minute" },
    svg("line", { x1: left, y1: H - bottom, x2: W, y2: H - bottom }),
    svg("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, String(max)),
    svg("text", { x: left - 4, y: H - bottom, "text-anchor": "end" }, "0"),
    svg("text", { x: left, y: H - 4 }, `-${SPLIT_MINUTES} min`),
    svg("text", { x: W, y: H - 4, "text-anchor": "end" }, "now"));
  bars.forEach((b, i) => {
    let y = H - bottom;
    for (const outcome of OUTCOMES) {
      const h = (b[outcome] || 0) * scale;
      if (h <= 0) continue;
      y -= h;
      root.appendChild(svg("rect", { class: `bar-${outcome}`, x: left + i * bw + 1, y, width: Math.max(1, bw - 2), height: h },
        svg("title", {}, `${clock(b.t)}: ${b[outcome]} ${OUTCOME_LABELS[outcome]}`)));
    }
  });
  const totals = model.split.totals || {};
  const sum = OUTCOMES.reduce((n, o) => n + (totals[o] || 0), 0);
  const pct = (n) => (sum ? ` (${Math.round((100 * n) / sum)} %)` : "");
  const legend = el("div", { class: "split-legend" },
    OUTCOMES.filter((o) => o !== "none" || totals.none).map((o) => el("span", { "data-outcome": o },
      el("span", { class: `swatch ${o}` }), `${OUTCOME_LABELS[o]} ${totals[o] || 0}${pct(totals[o] || 0)}`)));
  const comparison = OUTCOMES.reduce((n, o) => n + ((model.split.comparison || {})[o] || 0), 0);
  const note = comparison ? el("p", { class: "meta" }, `not counted: ${comparison} baseline run${comparison === 1 ? "" : "s"}`) : null;
  document.getElementById("split").replaceChildren(root, legend, ...(note ? [note] : []));
}

// -- sensors --------------------------------------------------------------------------------------------------
function sparkline(points) {
  const W = 240, H = 36, P = 2;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
  if (points.length < 2) return root;
  const ts = points.map((p) => p[0]), vs = points.map((p) => p[1]);
  const t0 = Math.min(...ts), t1 = Math.max(...ts), v0 = Math.min(...vs), v1 = Math.max(...vs);
  const x = (t) => P + ((t - t0) / (t1 - t0 || 1)) * (W - 2 * P);
  const y = (v) => H - P - ((v - v0) / (v1 - v0 || 1)) * (H - 2 * P);
  const coords = points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`);
  root.appendChild(svg("polygon", { class: "area", points: `${x(t0)},${H} ${coords.join(" ")} ${x(t1)},${H}` }));
  root.appendChild(svg("polyline", { points: coords.join(" ") }));
  root.appendChild(svg("title", {}, `min ${fmt(v0, 2)} · max ${fmt(v1, 2)} · ${points.length} readings`));
  return root;
}

function renderSensors() {
  const series = [...model.sensors.values()].sort((a, b) => `${a.agent}/${a.sensor}`.localeCompare(`${b.agent}/${b.sensor}`));
  replaceChildren(document.getElementById("sensors"), series.map((s) => {
    const lastPoint = s.points[s.points.length - 1];
    return el("div", { class: "sensor", "data-agent": s.agent, "data-sensor": s.sensor },
      el("span", { class: "name", title: `${s.agent}/${s.sensor}` }, `${s.agent} / ${s.sensor}`),
      el("span", { class: "value" }, lastPoint ? `${fmt(lastPoint[1], 2)} ${s.unit || ""}` : ""),
      sparkline(s.points));
  }), "No readings yet.");
  document.getElementById("sensors-count").textContent = series.length ? String(series.length) : "";
}

// -- page ----------------------------------------------------------------------------------------------------
function render() {
  document.getElementById("prefix").textContent = model.prefix;
  renderConn();
  renderAgents();
  renderOrchestrators();
  renderTasks();
  renderSplit();
  renderSensors();
  const totals = model.split.totals || {};
  const live = [...model.tasks.values()].filter((t) => !t.comparison).length;
  const parts = [`${totals.edge || 0} answered at the edge`, `${totals.cloud || 0} in the cloud`];
  if (totals.none) parts.push(`${totals.none} refused or asked back`);
  parts.push(`${totals.failed || 0} failed`);
  document.getElementById("summary").textContent = `${model.agents.size} agents · ${live} tasks · ${parts.join(", ")}`;
  document.body.dataset.rendered = "true";
}

// "live" only while both hold: our event stream from the dashboard, and the dashboard's connection to the broker
function renderConn() {
  const conn = document.getElementById("conn");
  let state = "live", text = "live";
  if (!model.streamOpen) { state = "reconnecting"; text = "dashboard unreachable, reconnecting…"; }
  else if (!model.broker.connected) {
    state = "broker-down";
    text = `broker down${model.broker.since ? ` since ${clock(model.broker.since)}` : ""}`;
  }
  conn.dataset.state = state;
  conn.textContent = text;
  conn.title = model.broker.url ? `broker ${model.broker.url}` : "";
}

function connect() {
  const source = new EventSource("/events");
  source.onopen = () => { model.streamOpen = true; schedule(); };
  source.onerror = () => { model.streamOpen = false; renderConn(); };
  for (const [name, handler] of Object.entries(handlers)) {
    source.addEventListener(name, (ev) => {
      try { handler(JSON.parse(ev.data)); } catch (err) { console.error("bad event", name, err); }
    });
  }
}

fetch("/api/state", { cache: "no-store" })
  .then((r) => r.json())
  .then(applySnapshot)
  .catch((err) => console.error("state fetch failed", err))
  .finally(connect);
setInterval(renderSplit, 30000); // the time axis moves even when nothing happens
