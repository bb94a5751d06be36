// The splitserve dashboard: polls /debug/dashboard with the operator token and draws what it returns.
// No build step: plain browser JavaScript plus the vendored uPlot (static/vendor/). Everything received is
// written as text (textContent), never as HTML.
"use strict";

const TOKEN_KEY = "splitserve-operator-token";
const params = new URLSearchParams(location.search);
const INTERVAL_MS = Math.max(250, Number(params.get("interval") || 1000));
const HISTORY = 300; // points kept per chart: 5 minutes at the default interval
const PHASE_COLORS = {
  request: "#d9dde5", reserve: "#9aa5b8", queue: "#f2b134", prefill: "#d9534f",
  transfer: "#8e5cc9", "wait-for-KV": "#5bc0de", decode: "#3b9b57", recompute: "#ff7f0e",
};
const LANES = ["frontend", "prefill", "link", "decode"]; // a request's sub-rows in the timeline
const PALETTE = ["#3b6fd6", "#d9534f", "#3b9b57", "#8e5cc9", "#f2b134", "#17a2b8", "#6c757d", "#e83e8c"];

const $ = (id) => document.getElementById(id);
const history = { t: [], ttft: [[], [], []], itl: [[], [], []], transfer: [[], []], requests: [[], [], []], kv: {}, compute: {}, bandwidth: {} };
const charts = {};
let workerKeys = "";
let timer = null;

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function showLogin(message) {
  $("main").hidden = true;
  $("forget").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setStatus("signed out");
}

function setStatus(text, stale) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("stale", Boolean(stale));
}

// One poll; the next is scheduled whatever happens, except when the token was refused.
async function poll() {
  let keepPolling = true;
  try {
    keepPolling = await pollOnce();
  } catch (err) {
    // A bug here, not a network failure (those are handled in pollOnce): say so in the console too.
    console.error(err);
    setStatus("cannot show the data: " + err.message, true);
  }
  if (keepPolling) schedule();
}

async function pollOnce() {
  let response;
  try {
    response = await fetch("/debug/dashboard?timeline=40", { headers: { Authorization: "Bearer " + token() }, cache: "no-store" });
  } catch (err) {
    setStatus("server unreachable: " + err.message, true);
    return true;
  }
  if (response.status === 401 || response.status === 403) {
    sessionStorage.removeItem(TOKEN_KEY);
    let message = "the server refused this token";
    try { message = (await response.json()).error.message; } catch (_) { /* keep the default */ }
    showLogin(message);
    return false;
  }
  if (!response.ok) {
    setStatus("HTTP " + response.status + " from /debug/dashboard", true);
    return true;
  }
  const data = await response.json();
  $("login").hidden = true;
  $("main").hidden = false;
  $("forget").hidden = false;
  render(data);
  setStatus("updated " + new Date().toLocaleTimeString() + " · window " + data.window_s.toFixed(0) + " s · every " + INTERVAL_MS / 1000 + " s");
  return true;
}

function schedule() { timer = setTimeout(poll, INTERVAL_MS); }

// ------------------------------------------------------------------------------------------- formatting

const ms = (s) => (s == null ? "–" : (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms");
const pct = (x) => (x == null ? "–" : (x * 100).toFixed(0) + "%");
const num = (x) => (x == null ? "–" : String(Math.round(x)));
const mbps = (x) => (x == null ? "–" : (x / 1e6).toFixed(2) + " MB/s");
const toMs = (s) => (s == null ? null : s * 1000);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text != null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function bar(ratio) {
  const td = el("td");
  const b = el("span", null, "bar");
  const fill = el("span");
  fill.style.width = Math.max(0, Math.min(1, ratio || 0)) * 100 + "%";
  b.appendChild(fill);
  td.appendChild(b);
  td.appendChild(document.createTextNode(pct(ratio)));
  return td;
}

// ------------------------------------------------------------------------------------------- rendering

function render(data) {
  $("model").textContent = data.model;
  $("trace-url").textContent = location.origin + "/debug/trace";
  renderCards(data);
  renderWorkers(data.workers);
  record(data);
  renderCharts(data.workers);
  renderTimeline(data.timeline);
}

function renderCards(data) {
  const l = data.latency, r = data.requests, t = data.transfer;
  const cards = [
    ["requests/s", r.per_s == null ? "–" : r.per_s.toFixed(2)],
    ["running / queued", num(r.running) + " / " + num(r.waiting)],
    ["TTFT p50 · p90 · p99", [l.ttft.p50, l.ttft.p90, l.ttft.p99].map(ms).join(" · ")],
    ["ITL p50 · p90 · p99", [l.itl.p50, l.itl.p90, l.itl.p99].map(ms).join(" · ")],
    ["E2E p50 · p90", [l.e2e.p50, l.e2e.p90].map(ms).join(" · ")],
    ["KV transfer", mbps(t.bytes_per_s)],
    ["exposed transfer (mean)", ms(t.exposed_mean_s)],
    ["transfer failures", num(t.failures)],
  ];
  const box = $("cards");
  box.replaceChildren(...cards.map(([label, value]) => {
    const c = el("div", null, "card");
    c.appendChild(el("div", label, "label"));
    c.appendChild(el("div", value, "value"));
    return c;
  }));
}

function renderWorkers(workers) {
  const body = $("workers").tBodies[0];
  body.replaceChildren(...workers.map((w) => {
    const tr = el("tr");
    tr.appendChild(el("td", w.url));
    tr.appendChild(el("td", w.role, "role"));
    tr.appendChild(el("td", w.status, w.status === "ok" ? "status-ok" : "status-bad"));
    tr.appendChild(el("td", w.pid == null ? "–" : String(w.pid)));
    tr.appendChild(el("td", num(w.in_flight)));
    tr.appendChild(el("td", num(w.running)));
    tr.appendChild(el("td", num(w.waiting)));
    tr.appendChild(bar(w.kv_usage));
    tr.appendChild(bar(w.compute_util));
    tr.appendChild(bar(w.bandwidth_util));
    tr.appendChild(el("td", w.role === "prefill" ? mbps(w.transfer_bytes_per_s) : "–"));
    tr.appendChild(el("td", w.role === "prefill" ? ms(w.exposed_p90_s) : "–"));
    tr.appendChild(el("td", w.role === "decode" ? ms(w.kv_wait_p90_s) : "–"));
    return tr;
  }));
}

function push(arr, v) {
  arr.push(v);
  if (arr.length > HISTORY) arr.shift();
}

function record(data) {
  const l = data.latency;
  push(history.t, Date.now() / 1000);
  ["p50", "p90", "p99"].forEach((q, i) => {
    push(history.ttft[i], toMs(l.ttft[q]));
    push(history.itl[i], toMs(l.itl[q]));
  });
  push(history.transfer[0], data.transfer.bytes_per_s == null ? null : data.transfer.bytes_per_s / 1e6);
  push(history.transfer[1], toMs(data.transfer.exposed_mean_s));
  push(history.requests[0], data.requests.running);
  push(history.requests[1], data.requests.waiting);
  push(history.requests[2], data.requests.per_s);
  const n = history.t.length;
  for (const w of data.workers) {
    for (const [key, field] of [["kv", "kv_usage"], ["compute", "compute_util"], ["bandwidth", "bandwidth_util"]]) {
      // A worker that joined late has no past: its series starts with gaps.
      const series = history[key][w.url] || (history[key][w.url] = new Array(n - 1).fill(null));
      push(series, w[field] == null ? null : w[field]);
    }
  }
  for (const key of ["kv", "compute", "bandwidth"]) {
    for (const url of Object.keys(history[key])) {
      const series = history[key][url];
      if (series.length < n) push(series, null); // a worker that left: a gap
      if (series.every((v) => v == null)) delete history[key][url];
    }
  }
}

function chartWidth(id) { return Math.max(320, $(id).parentElement.clientWidth - 16); }

const fromZero = (u, lo, hi) => [0, Math.max(hi || 0, 1e-9) * 1.1];

// `scales`: per series, the name of its y scale (two figures of different units get an axis each).
function makeChart(id, series, yRange, scales) {
  const names = scales ? [...new Set(scales)] : ["y"];
  const opts = {
    width: chartWidth(id), height: 180, legend: { live: false },
    scales: Object.fromEntries([["x", { time: true }], ...names.map((n) => [n, { range: yRange || fromZero }])]),
    series: [{}].concat(series.map((s, i) => ({
      label: s, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: false, scale: scales ? scales[i] : "y",
    }))),
    axes: [{}].concat(names.map((n, i) => ({ scale: n, size: 60, side: i === 0 ? 3 : 1, label: scales ? n : undefined, grid: { show: i === 0 } }))),
  };
  if (charts[id]) charts[id].destroy();
  charts[id] = new uPlot(opts, [[]].concat(series.map(() => [])), $(id));
}

function renderCharts(workers) {
  const keys = workers.map((w) => w.role + " " + w.url).join("|") + "#" + Object.keys(history.kv).join("|");
  if (keys !== workerKeys || !charts["chart-ttft"]) {
    // The worker set changed (or first draw): per-worker charts get one series per worker.
    workerKeys = keys;
    makeChart("chart-ttft", ["p50", "p90", "p99"]);
    makeChart("chart-itl", ["p50", "p90", "p99"]);
    const urls = Object.keys(history.kv);
    const label = (u) => { const w = workers.find((x) => x.url === u); return (w ? w.role + " " : "") + u; };
    makeChart("chart-kv", urls.map(label), [0, 1]);
    makeChart("chart-util", urls.flatMap((u) => [label(u) + " compute", label(u) + " bandwidth"]), [0, 1]);
    makeChart("chart-transfer", ["MB/s", "exposed ms (mean)"], null, ["MB/s", "ms"]);
    makeChart("chart-requests", ["running", "queued", "finished/s"]);
  }
  const t = history.t;
  const urls = Object.keys(history.kv);
  charts["chart-ttft"].setData([t, ...history.ttft]);
  charts["chart-itl"].setData([t, ...history.itl]);
  charts["chart-kv"].setData([t, ...urls.map((u) => history.kv[u])]);
  charts["chart-util"].setData([t, ...urls.flatMap((u) => [history.compute[u] || [], history.bandwidth[u] || []])]);
  charts["chart-transfer"].setData([t, ...history.transfer]);
  charts["chart-requests"].setData([t, ...history.requests]);
}

function renderTimeline(records) {
  // Records arrive in the order requests ended; a waterfall reads better in the order they arrived.
  const rows = records.filter((r) => r.spans.length).sort((a, b) => a.spans[0].start - b.spans[0].start);
  const canvas = $("timeline");
  const width = Math.max(600, canvas.clientWidth || 1200);
  const lane = 5, rowH = LANES.length * lane + 4, left = 150, top = 18;
  canvas.width = width;
  canvas.height = top + Math.max(1, rows.length) * rowH + 4;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#1d2330";
  if (!rows.length) {
    ctx.fillText("no finished request yet", left, top + 10);
    return;
  }
  const span = Math.max(1, -Math.min(...rows.flatMap((r) => r.spans.map((s) => s.start))));
  const x = (t) => left + (width - left - 10) * (1 + t / span);
  for (let s = 0; s <= span; s += tickStep(span)) {
    ctx.fillStyle = "#8a93a3";
    ctx.fillText("-" + s.toFixed(s < 10 ? 1 : 0) + " s", x(-s) - 14, 11);
    ctx.fillRect(x(-s), top - 4, 1, 3);
  }
  rows.forEach((r, i) => {
    const y = top + i * rowH;
    ctx.fillStyle = r.error ? "#b00020" : "#1d2330";
    ctx.fillText((r.path + " " + r.id.slice(-8)).slice(0, 24), 2, y + rowH - 6);
    for (const s of r.spans) {
      const laneIdx = s.role === "frontend" ? 0 : s.role === "link" ? 2 : s.role === "prefill" ? 1 : 3;
      ctx.fillStyle = PHASE_COLORS[s.name] || "#999";
      ctx.fillRect(x(s.start), y + laneIdx * lane, Math.max(1, x(s.end) - x(s.start)), lane - 1);
    }
  });
}

function tickStep(span) {
  for (const step of [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]) if (span / step <= 8) return step;
  return 1200;
}

function renderLegend() {
  $("legend").replaceChildren(...Object.entries(PHASE_COLORS).map(([name, color]) => {
    const item = el("span");
    const swatch = el("i");
    swatch.style.background = color;
    item.appendChild(swatch);
    item.appendChild(document.createTextNode(name));
    return item;
  }));
}

// ------------------------------------------------------------------------------------------- start

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  clearTimeout(timer);
  poll();
});
$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(timer);
  showLogin();
});
window.addEventListener("resize", () => { workerKeys = ""; });
renderLegend();
if (token()) poll(); else showLogin();
