// The dashboard: polls the admin API every second and acts through it (the same token,
// If-Match and audit rules as curl). No dependencies; charts are inline SVG.
"use strict";

const POLL_MS = 1000;
const WINDOW = 300; // samples kept: 5 minutes at one a second
const RATE_SPAN = 5; // seconds a rate or a p99 is computed over
// Okabe-Ito colours (told apart with any colour vision), each with its own dash pattern.
const PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#000000"];
const DASHES = ["", "6 3", "2 3", "8 3 2 3", "1 2", "10 4", "4 4"];

const state = { version: null, table: null, samples: [], edited: new Map() };

const $ = (id) => document.getElementById(id);

function token() {
  return sessionStorage.getItem("canary-token");
}

async function api(method, path, body, ifMatch) {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (ifMatch) headers["If-Match"] = ifMatch;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
  });
  if (response.status === 401) {
    $("token-form").hidden = false;
    throw new Error("the admin API wants its token");
  }
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  return { status: response.status, etag: response.headers.get("ETag"), json };
}

function text(el, value) {
  el.textContent = value;
  return el;
}

function make(tag, attrs = {}, children = []) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const c of children) el.append(c);
  return el;
}

function svg(tag, attrs = {}) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

// p99 in ms from the difference of two cumulative histograms ([upper bound s, count]).
function p99(now, then) {
  if (!now || !now.length) return null;
  const counts = now.map(([le, c], i) => [le, c - ((then && then[i] && then[i][1]) || 0)]);
  const total = counts[counts.length - 1][1];
  if (total <= 0) return null;
  const target = 0.99 * total;
  for (const [le, c] of counts) if (c >= target) return le * 1000;
  return counts[counts.length - 1][0] * 1000;
}

function series(name) {
  const out = { rate: [], errors: [], p99: [] };
  const s = state.samples;
  for (let i = 0; i < s.length; i++) {
    const j = Math.max(0, i - RATE_SPAN);
    const now = s[i].backends[name];
    const then = s[j].backends[name];
    if (!now || i === j) { out.rate.push(null); out.errors.push(null); out.p99.push(null); continue; }
    const seconds = (s[i].at - s[j].at) / 1000;
    const requests = now.requests - ((then && then.requests) || 0);
    const errors = now.errors - ((then && then.errors) || 0);
    out.rate.push(seconds > 0 ? requests / seconds : null);
    out.errors.push(requests > 0 ? (100 * errors) / requests : null);
    out.p99.push(p99(now.latency, then && then.latency));
  }
  return out;
}

function drawCharts(names) {
  const all = Object.fromEntries(names.map((n) => [n, series(n)]));
  for (const chart of document.querySelectorAll("svg.chart")) {
    const metric = chart.dataset.metric;
    chart.replaceChildren();
    let max = 0;
    for (const n of names) for (const v of all[n][metric]) if (v !== null && v > max) max = v;
    max = max > 0 ? max * 1.1 : 1;
    chart.append(svg("line", { x1: 0, y1: 99, x2: 300, y2: 99, stroke: "#d0d0d0" }));
    const label = svg("text", { x: 2, y: 10, "font-size": 9, fill: "#5a5a5a" });
    label.textContent = max >= 10 ? max.toFixed(0) : max.toFixed(2);
    chart.append(label);
    names.forEach((n, k) => {
      const values = all[n][metric];
      const points = [];
      values.forEach((v, i) => {
        if (v === null) return;
        const x = (300 * (WINDOW - values.length + i)) / (WINDOW - 1);
        points.push(`${x.toFixed(1)},${(98 - (96 * v) / max).toFixed(1)}`);
      });
      if (points.length) {
        chart.append(svg("polyline", {
          points: points.join(" "), fill: "none", "stroke-width": 2,
          stroke: PALETTE[k % PALETTE.length], "stroke-dasharray": DASHES[k % DASHES.length],
        }));
      }
    });
  }
  const legend = $("legend");
  legend.replaceChildren(...names.map((n, k) => {
    const mark = svg("svg", { width: 28, height: 10, "aria-hidden": "true" });
    mark.append(svg("line", { x1: 0, y1: 5, x2: 28, y2: 5, "stroke-width": 3,
      stroke: PALETTE[k % PALETTE.length], "stroke-dasharray": DASHES[k % DASHES.length] }));
    return make("li", {}, [mark, " " + n]);
  }));
}

function fmt(value, digits = 1) {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : value.toFixed(digits);
}

function drawBackends(routes) {
  const tbody = document.querySelector("#backends tbody");
  const rows = routes.backends.map((b) => {
    const s = series(b.name);
    const last = (a) => a.length ? a[a.length - 1] : null;
    const counts = state.samples.length ? state.samples[state.samples.length - 1].backends[b.name] : null;
    const slider = make("input", {
      type: "range", min: 0, max: Math.max(100, b.weight), step: 1,
      value: state.edited.has(b.name) ? state.edited.get(b.name) : b.weight,
      class: "weight-slider", "aria-label": `weight of ${b.name}`,
    });
    const shown = make("output", { class: "weight-value" });
    text(shown, slider.value);
    slider.addEventListener("input", () => {
      state.edited.set(b.name, Number(slider.value));
      text(shown, slider.value);
      $("apply-weights").disabled = false;
    });
    const endpoints = (b.endpoints || []).map((e) =>
      text(make("span", { class: e.healthy ? "up" : "down" }), e.url + " "));
    // data-label: the column's name, shown beside each value where the table is laid out
    // as one card per version (a phone's width).
    const cell = (cls, label, value) => text(make("td", { class: cls, "data-label": label }), value);
    return make("tr", { "data-backend": b.name }, [
      make("th", { scope: "row" }, [b.name]),
      cell("weight", "weight", String(b.weight)),
      cell("effective", "effective", String(b.effective_weight)),
      cell("requests", "requests", counts ? String(counts.requests) : "0"),
      cell("rate", "req/s", fmt(last(s.rate))),
      cell("errors", "5xx", fmt(last(s.errors)) + "%"),
      cell("p99", "p99", fmt(last(s.p99)) + " ms"),
      make("td", { "data-label": "endpoints" }, endpoints),
      make("td", { "data-label": "set weight" }, [slider, " ", shown]),
    ]);
  });
  // Keep the slider being dragged or focused: rebuild only the cells around it.
  if (tbody.contains(document.activeElement)) {
    for (const row of rows) {
      const old = tbody.querySelector(`tr[data-backend="${CSS.escape(row.dataset.backend)}"]`);
      if (!old) continue;
      for (const cls of ["weight", "effective", "requests", "rate", "errors", "p99"]) {
        old.querySelector("." + cls).textContent = row.querySelector("." + cls).textContent;
      }
    }
  } else {
    tbody.replaceChildren(...rows);
  }
  const select = $("fault-backend");
  if (select.options.length !== routes.backends.length) {
    select.replaceChildren(...routes.backends.map((b) => text(make("option", { value: b.name }), b.name)));
  }
}

function drawRollout(r) {
  const buttons = ["start", "pause", "resume", "promote", "abort"].map((c) => $("rollout-" + c));
  if (!r) {
    text($("rollout-state"), "none configured");
    buttons.forEach((b) => (b.disabled = true));
    return;
  }
  text($("rollout-state"), r.state);
  text($("rollout-step"), r.steps && r.steps.length ? `${r.step + 1} of ${r.steps.length}` : "–");
  text($("rollout-percent"), String(r.canary_percent));
  const active = ["running", "paused", "waiting_approval", "shadow"].includes(r.state);
  const ended = ["promoted", "rolled_back"].includes(r.state);
  $("rollout-start").disabled = !(r.state === "idle" || r.state === "rolled_back");
  $("rollout-pause").disabled = !(r.state === "running" || r.state === "shadow");
  $("rollout-resume").disabled = !(r.state === "paused" || r.state === "waiting_approval");
  $("rollout-promote").disabled = !active;
  $("rollout-abort").disabled = !active || ended;
  $("rollout-progress").replaceChildren(...(r.steps || []).map((p, i) => {
    const cls = r.state === "promoted" || i < r.step ? "done" : i === r.step && active ? "current" : "";
    return text(make("li", { class: cls }), `${p}%`);
  }));
  const intervals = r.intervals || {};
  const rows = ["errors", "latency", "differences"].map((m) => {
    const v = intervals[m] || {};
    const verdict = (r.verdict && r.verdict[m]) || "inconclusive";
    const bounds = v.low === null || v.low === undefined ? "–" : `[${fmt(v.low, 3)}, ${fmt(v.high, 3)}]`;
    return make("tr", {}, [
      text(make("td"), m),
      text(make("td", { class: "verdict-" + verdict }), verdict),
      text(make("td"), bounds),
    ]);
  });
  document.querySelector("#rollout-verdicts tbody").replaceChildren(...rows);
  $("rollout-history").replaceChildren(...(r.history || []).slice(-20).reverse().map((h) =>
    text(make("li"), `${new Date(h.at).toISOString().slice(11, 19)} ${h.event}: ${h.state} at ${h.canary_percent}% — ${h.reason}`)));
}

function drawFaults(f) {
  const list = (f && f.faults) || [];
  $("faults").replaceChildren(...(list.length ? list.map((x) =>
    text(make("li"), `${x.backend}: abort ${x.abort_percent}% (${x.abort_status}), delay ${x.delay_percent}%${x.delay ? " " + x.delay : ""}`))
    : [text(make("li"), "none")]));
}

function drawMirror(m) {
  const paths = $("mirror-paths");
  if (!m || !m.config) { text($("mirror"), "off"); paths.replaceChildren(); return; }
  const c = m.counts || {};
  const rate = m.difference_rate === null || m.difference_rate === undefined ? "–" : fmt(100 * m.difference_rate) + "%";
  text($("mirror"), `${m.config.percent}% of ${m.config.from || "all"} requests copied to ${m.config.backend}: ` +
    `${c.copied || 0} copied, ${c.compared || 0} compared, ${c.different || 0} different (${rate}), ` +
    `${c.errors || 0} errors, ${c.timeouts || 0} timeouts, ${c.dropped || 0} dropped`);
  // Where answers differ, most first; noise (differing between two copies too) is marked.
  paths.replaceChildren(...(m.paths || []).slice(0, 10).map((p) =>
    text(make("li", { class: p.reported ? "" : "noise" }),
      `${p.path}: ${p.different} different${p.reported ? "" : `, noise (${p.noise} between copies)`}`)));
}

async function poll() {
  try {
    const [routes, stats, rollout, faults, mirror] = await Promise.all([
      api("GET", "/admin/routes"), api("GET", "/admin/stats"), api("GET", "/admin/rollout"),
      api("GET", "/admin/faults"), api("GET", "/admin/mirror"),
    ]);
    state.version = routes.etag;
    state.table = routes.json;
    state.samples.push({ at: stats.json.at_ms, backends: stats.json.backends });
    if (state.samples.length > WINDOW) state.samples.shift();
    const names = routes.json.backends.map((b) => b.name);
    drawBackends(routes.json);
    drawCharts(names);
    drawRollout(rollout.status === 200 ? rollout.json : null);
    drawFaults(faults.json);
    drawMirror(mirror.json);
    text($("status"), `table version ${routes.json.version}, updated ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    text($("status"), "not updated: " + e.message);
  }
}

async function act(statusId, method, path, body, ifMatch) {
  const shown = $(statusId);
  try {
    const answer = await api(method, path, body, ifMatch);
    text(shown, answer.status === 200 ? "done" : `refused (${answer.status}): ${(answer.json && answer.json.error) || ""}`);
    return answer.status === 200;
  } catch (e) {
    text(shown, e.message);
    return false;
  } finally {
    poll();
  }
}

function setup() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("canary-token", $("token-input").value);
    $("token-input").value = "";
    $("token-form").hidden = true;
    poll();
  });
  $("apply-weights").addEventListener("click", async () => {
    const body = Object.fromEntries(state.edited);
    if (await act("weights-status", "POST", "/admin/weight", body, state.version)) {
      state.edited.clear();
      $("apply-weights").disabled = true;
    }
  });
  for (const c of ["start", "pause", "resume", "promote", "abort"]) {
    $("rollout-" + c).addEventListener("click", () => act("rollout-status", "POST", "/admin/rollout/" + c));
  }
  $("fault-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const fault = { backend: $("fault-backend").value, abort_percent: Number($("fault-percent").value) };
    act("fault-status", "PUT", "/admin/faults", [fault], state.version);
  });
  $("fault-clear").addEventListener("click", () => act("fault-status", "DELETE", "/admin/faults"));
  poll();
  setInterval(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", setup);
