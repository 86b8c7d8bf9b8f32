// Small canvas time-series charts with axes: stacked pool occupancy (pages), and throughput (tokens/s,
// left axis) with TTFT p50/p99 (ms, right axis). Each draw returns what it drew (axis labels, units,
// tick values, data maxima) so the dashboard can expose it to operators' consoles and the browser test.

const SPAN_S = 300;
const PAD = { left: 46, right: 50, top: 16, bottom: 20 };
const AXIS = "#8591a5";
const GRID = "rgba(133, 145, 165, 0.18)";

/** Seconds shown: the data's age, at least 30 s and at most SPAN_S. */
function spanOf(pts, now) {
  return Math.min(SPAN_S, Math.max(30, now - pts[0][0]));
}

function prepare(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = Math.max(160, canvas.clientWidth), h = Math.max(90, canvas.clientHeight);
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "10px system-ui, sans-serif";
  return [ctx, w, h];
}

/** "Nice" tick values from 0 to at least `max` (1, 2 or 5 times a power of ten apart). */
export function niceTicks(max, count = 4) {
  const top = max > 0 ? max : 1;
  const raw = top / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let v = 0; v < top + step * 0.999; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

function fmtTick(v) {
  if (v >= 10000) return `${(v / 1000).toFixed(0)}k`;
  if (v >= 1000) return `${(v / 1000).toFixed(1)}k`;
  return v % 1 ? v.toFixed(1) : String(v);
}

/** Plot area, time axis (seconds before now) and one or two value axes; returns the mappings. */
function frame(ctx, w, h, span, now, left, right) {
  const x0 = PAD.left, x1 = w - PAD.right, y0 = PAD.top, y1 = h - PAD.bottom;
  const x = (t) => x0 + ((t - (now - span)) / span) * (x1 - x0);
  const scale = (axis) => (v) => y1 - (v / axis.ticks[axis.ticks.length - 1]) * (y1 - y0);
  ctx.strokeStyle = GRID;
  ctx.lineWidth = 1;
  for (const v of left.ticks) {
    const y = Math.round(scale(left)(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(x0, y); ctx.lineTo(x1, y); ctx.stroke();
  }
  ctx.strokeStyle = AXIS;
  ctx.beginPath(); ctx.moveTo(x0 + 0.5, y0); ctx.lineTo(x0 + 0.5, y1 + 0.5); ctx.lineTo(x1 + 0.5, y1 + 0.5);
  if (right) ctx.lineTo(x1 + 0.5, y0);
  ctx.stroke();
  ctx.fillStyle = AXIS;
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  for (const v of left.ticks) ctx.fillText(fmtTick(v), x0 - 4, scale(left)(v));
  if (right) {
    ctx.textAlign = "left";
    for (const v of right.ticks) ctx.fillText(fmtTick(v), x1 + 4, scale(right)(v));
  }
  const timeTicks = niceTicks(span, 5).filter((s) => s <= span);
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const ago of timeTicks) ctx.fillText(ago ? `-${ago} s` : "now", x(now - ago), y1 + 4);
  ctx.save();
  ctx.translate(10, (y0 + y1) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  ctx.fillText(left.label, 0, -8);
  ctx.restore();
  if (right) {
    ctx.save();
    ctx.translate(w - 8, (y0 + y1) / 2);
    ctx.rotate(Math.PI / 2);
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    ctx.fillText(right.label, 0, -2);
    ctx.restore();
  }
  ctx.textAlign = "left";
  ctx.textBaseline = "alphabetic";
  const time = { label: "time (s before now)", unit: "s", ticks: timeTicks };
  return { x, left: scale(left), right: right ? scale(right) : null, time };
}

/** Draw labels left to right on the top line. */
function labels(ctx, items) {
  let x = PAD.left;
  for (const [text, color] of items) {
    ctx.fillStyle = color;
    ctx.fillText(text, x, 10);
    x += ctx.measureText(text).width + 14;
  }
}

/** Stacked area of [t, free, kv, adapter] samples over the last SPAN_S seconds (pages over time). */
export function drawOccupancy(canvas, samples, now) {
  const [ctx, w, h] = prepare(canvas);
  const pts = samples.filter((s) => s[0] >= now - SPAN_S);
  if (!pts.length) return null;
  const last = pts[pts.length - 1];
  const total = Math.max(1, last[1] + last[2] + last[3]);
  const span = spanOf(pts, now);
  const left = { label: "pages", unit: "pages", ticks: niceTicks(total) };
  const f = frame(ctx, w, h, span, now, left, null);
  const layers = [
    [(s) => s[2], "#3d8bfd"],
    [(s) => s[2] + s[3], "#f59f00"],
  ];
  for (let i = layers.length - 1; i >= 0; i--) {
    const [top, color] = layers[i];
    ctx.beginPath();
    ctx.moveTo(f.x(pts[0][0]), f.left(0));
    for (const s of pts) ctx.lineTo(f.x(s[0]), f.left(top(s)));
    ctx.lineTo(f.x(last[0]), f.left(0));
    ctx.closePath();
    ctx.fillStyle = color;
    ctx.globalAlpha = 0.8;
    ctx.fill();
  }
  ctx.globalAlpha = 1;
  labels(ctx, [[`KV ${last[2]}`, "#3d8bfd"], [`adapters ${last[3]}`, "#f59f00"],
    [`free ${last[1]} of ${total} pages`, AXIS]]);
  return { x: f.time, y: left, total };
}

function line(ctx, pts, x, y, color) {
  ctx.beginPath();
  let started = false;
  for (const [t, v] of pts) {
    if (v === null || v === undefined) { started = false; continue; }
    if (started) ctx.lineTo(x(t), y(v));
    else ctx.moveTo(x(t), y(v));
    started = true;
  }
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.stroke();
}

/** tokens/s (left axis) and TTFT p50/p99 in ms (right axis) from [t, tps, p50, p99] samples. */
export function drawLoad(canvas, samples, now) {
  const [ctx, w, h] = prepare(canvas);
  const pts = samples.filter((s) => s[0] >= now - SPAN_S);
  if (!pts.length) return null;
  const span = spanOf(pts, now);
  const maxTps = Math.max(0, ...pts.map((s) => s[1]));
  const maxMs = Math.max(0, ...pts.map((s) => s[3] ?? 0));
  const left = { label: "tokens/s", unit: "tokens/s", ticks: niceTicks(maxTps), max: maxTps };
  const right = { label: "TTFT (ms)", unit: "ms", ticks: niceTicks(maxMs), max: maxMs };
  const f = frame(ctx, w, h, span, now, left, right);
  line(ctx, pts.map((s) => [s[0], s[1]]), f.x, f.left, "#51cf66");
  line(ctx, pts.map((s) => [s[0], s[2]]), f.x, f.right, "#74c0fc");
  line(ctx, pts.map((s) => [s[0], s[3]]), f.x, f.right, "#ff6b6b");
  labels(ctx, [["tokens/s (left)", "#51cf66"], ["TTFT p50 (right)", "#74c0fc"], ["TTFT p99 (right)", "#ff6b6b"]]);
  return { x: f.time, left, right };
}
