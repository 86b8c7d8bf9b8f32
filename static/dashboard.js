// The dashboard: one websocket (/ws/dashboard) delivers a full state, then deltas several times a second.
// This module applies them and updates the tiles, the pool map, the adapter table and the charts.

import { AdapterTable } from "./adapters.js";
import { drawLoad, drawOccupancy } from "./charts.js";
import { loadModels, Playground, setupAdmin } from "./playground.js";
import { PoolMap } from "./poolmap.js";

const $ = (id) => document.getElementById(id);

const state = { engine: null, load: null, occupancy: [], loadHistory: [], updates: [], messages: 0, charts: {} };
window.lorafleetDashboard = state; // for operators' consoles and the browser test

const pool = new PoolMap($("pool-canvas"), $("pool-tip"), $("pool-legend"));
const table = new AdapterTable($("adapter-head"), $("adapter-scroller"), $("adapter-spacer"), $("adapter-rows"),
  $("adapter-search"), $("adapter-tier"), $("adapter-count"));
state.pool = pool;
state.table = table;

function fmtNum(v, digits = 0) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return v >= 10000 ? v.toLocaleString("en-US", { maximumFractionDigits: 0 }) : v.toFixed(digits);
}
const fmtMs = (v) => (v === null || v === undefined ? "–" : v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${v.toFixed(0)} ms`);
const fmtPct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)}%`);

/** Set a tile: data-value carries the raw number (what tests compare), the text a readable form. */
function tile(id, value, text) {
  const el = $(id);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = text ?? fmtNum(value);
}

function applyMessage(msg) {
  if (!pool.setNames(msg.owners_from, msg.owners)) return false;
  if (msg.type === "snapshot") {
    pool.setPool(msg.pool);
    table.replace(msg.adapters);
    state.occupancy = msg.occupancy;
  } else {
    pool.patch(msg.pool_patches);
    table.update(msg.adapters, msg.adapters_removed);
    state.occupancy.push(...msg.occupancy);
    if (state.occupancy.length > 2000) state.occupancy.splice(0, state.occupancy.length - 2000);
  }
  state.engine = msg.engine;
  state.load = msg.load;
  state.at = msg.at;
  state.messages += 1;
  state.loadHistory.push([msg.at, msg.load.tokens_per_s, msg.load.ttft_p50_ms, msg.load.ttft_p99_ms]);
  if (state.loadHistory.length > 2000) state.loadHistory.shift();
  const now = performance.now();
  state.updates.push(now);
  while (state.updates.length && state.updates[0] < now - 2000) state.updates.shift();
  return true;
}

function renderTiles() {
  const e = state.engine, l = state.load;
  tile("stat-step", e.step);
  tile("stat-ups", state.updates.length / 2, (state.updates.length / 2).toFixed(1));
  tile("pool-total", e.num_pages);
  for (const kind of ["free", "kv", "adapter"]) {
    const n = e.usage[kind] ?? 0;
    tile(`pool-${kind}`, n, `${fmtNum(n)} (${e.num_pages ? ((100 * n) / e.num_pages).toFixed(0) : 0}%)`);
  }
  tile("pool-evictions", e.evictions);
  tile("pool-preemptions", e.preemptions);
  $("pool-caption").textContent = `${fmtNum(e.num_pages)} pages · one cell per page`;
  tile("load-queue", e.waiting);
  tile("load-running", e.running);
  tile("load-batch", l.batch_size, fmtNum(l.batch_size, 1));
  tile("load-tps", l.tokens_per_s, fmtNum(l.tokens_per_s, 1));
  tile("load-rps", l.req_per_s, fmtNum(l.req_per_s, 2));
  tile("load-ttft-p50", l.ttft_p50_ms, fmtMs(l.ttft_p50_ms));
  tile("load-ttft-p99", l.ttft_p99_ms, fmtMs(l.ttft_p99_ms));
  tile("load-tpot-p50", l.tpot_p50_ms, fmtMs(l.tpot_p50_ms));
  tile("load-tpot-p99", l.tpot_p99_ms, fmtMs(l.tpot_p99_ms));
  tile("load-e2e-p99", l.e2e_p99_ms, fmtMs(l.e2e_p99_ms));
  tile("load-slo", l.slo_attainment, fmtPct(l.slo_attainment));
  tile("load-window-requests", l.requests);
  tile("load-succeeded", l.succeeded);
  tile("load-failed", l.failed);
  tile("load-early-aborted", l.early_aborted);
  tile("load-rejected", l.rejected);
  const slo = l.default_slo_ttft_ms ? `, default TTFT SLO ${l.default_slo_ttft_ms} ms` : "";
  $("load-window").textContent = `percentiles and SLO over the last ${l.window_s} s${slo}`;
  tile("ad-gpu", e.tiers.gpu);
  tile("ad-host", e.tiers.host);
  tile("ad-disk", e.tiers.disk);
  tile("ad-batch", l.adapters_in_batch, fmtNum(l.adapters_in_batch, 1));
  tile("ad-loads", e.adapter_loads);
  tile("ad-prefetch-hit", e.prefetch_hit_rate, fmtPct(e.prefetch_hit_rate));
  tile("ad-host-hit", e.host_hit_rate, fmtPct(e.host_hit_rate));
  renderServing(e);
}

/** Health and prefetcher figures, shown only when the server reports them. */
function renderServing(e) {
  const health = $("stat-health");
  health.hidden = !e.health;
  if (e.health) {
    const ok = e.health.healthy && !e.health.draining;
    health.className = `conn ${ok ? "on" : "off"}`;
    health.textContent = !e.health.healthy ? `unhealthy: ${e.health.reason}` : e.health.draining ? "draining" : "healthy";
  }
  $("prefetcher-tile").hidden = !e.prefetcher;
  if (e.prefetcher) {
    const p = e.prefetcher;
    const mean = p.loaded ? ` · ${((1000 * p.load_seconds) / p.loaded).toFixed(0)} ms` : "";
    tile("ad-prefetcher", p.loaded, `${p.loaded}/${p.requested}${p.failed ? ` (${p.failed} failed)` : ""}${mean}`);
  }
}

let framePending = false;
function scheduleRender() {
  if (framePending) return;
  framePending = true;
  requestAnimationFrame(() => {
    framePending = false;
    if (!state.engine) return;
    renderTiles();
    pool.draw();
    table.refresh();
    state.charts.occupancy = drawOccupancy($("occupancy-canvas"), state.occupancy, state.at);
    state.charts.load = drawLoad($("load-canvas"), state.loadHistory, state.at);
  });
}

function connect(delay = 500) {
  const url = new URL("/ws/dashboard", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(url);
  const conn = $("conn");
  ws.onopen = () => { conn.textContent = "live"; conn.className = "conn on"; delay = 500; };
  ws.onmessage = (event) => {
    if (!applyMessage(JSON.parse(event.data))) ws.send(JSON.stringify({ type: "resync" }));
    else scheduleRender();
  };
  ws.onclose = () => {
    conn.textContent = "disconnected · retrying";
    conn.className = "conn off";
    setTimeout(() => connect(Math.min(delay * 2, 10000)), delay);
  };
}

connect();
new Playground();
setupAdmin();
loadModels();
