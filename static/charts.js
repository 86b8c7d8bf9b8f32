// Small canvas time-series charts: stacked pool occupancy, and throughput with TTFT p50/p99.

const SPAN_S = 300;

/** Seconds shown: the data's age, at least 30 s and at most SPAN_S. */
function spanOf(pts, now) {
  return Math.min(SPAN_S, Math.max(30, now - pts[0][0]));
}

function prepare(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = Math.max(100, canvas.clientWidth), h = Math.max(60, canvas.clientHeight);
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

/** Draw labels left to right on the top line. */
function labels(ctx, items) {
  let x = 4;
  for (const [text, color] of items) {
    ctx.fillStyle = color;
    ctx.fillText(text, x, 10);
    x += ctx.measureText(text).width + 14;
  }
}

/** Stacked area of [t, free, kv, adapter] samples over the last SPAN_S seconds. */
export function drawOccupancy(canvas, samples, now) {
  const [ctx, w, h] = prepare(canvas);
  const pts = samples.filter((s) => s[0] >= now - SPAN_S);
  if (!pts.length) return;
  const total = Math.max(1, pts[pts.length - 1][1] + pts[pts.length - 1][2] + pts[pts.length - 1][3]);
  const span = spanOf(pts, now);
  const x = (t) => ((t - (now - span)) / span) * w;
  const y = (v) => h - (v / total) * (h - 12);
  const layers = [
    [(s) => s[2], "#3d8bfd"],
    [(s) => s[2] + s[3], "#f59f00"],
  ];
  for (let i = layers.length - 1; i >= 0; i--) {
    const [top, color] = layers[i];
    ctx.beginPath();
    ctx.moveTo(x(pts[0][0]), h);
    for (const s of pts) ctx.lineTo(x(s[0]), y(top(s)));
    ctx.lineTo(x(pts[pts.length - 1][0]), h);
    ctx.closePath();
    ctx.fillStyle = color;
    ctx.globalAlpha = 0.8;
    ctx.fill();
  }
  ctx.globalAlpha = 1;
  const last = pts[pts.length - 1];
  labels(ctx, [[`KV ${last[2]}`, "#3d8bfd"], [`adapters ${last[3]}`, "#f59f00"],
    [`free ${last[1]} of ${total} pages · last ${span.toFixed(0)} s`, "#8591a5"]]);
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

/** tokens/s (left scale) and TTFT p50/p99 in ms (right scale) from [t, tps, p50, p99] samples. */
export function drawLoad(canvas, samples, now) {
  const [ctx, w, h] = prepare(canvas);
  const pts = samples.filter((s) => s[0] >= now - SPAN_S);
  if (!pts.length) return;
  const span = spanOf(pts, now);
  const x = (t) => ((t - (now - span)) / span) * w;
  const maxTps = Math.max(1, ...pts.map((s) => s[1]));
  const maxMs = Math.max(1, ...pts.map((s) => s[3] ?? 0));
  line(ctx, pts.map((s) => [s[0], s[1]]), x, (v) => h - (v / maxTps) * (h - 14), "#51cf66");
  line(ctx, pts.map((s) => [s[0], s[2]]), x, (v) => h - (v / maxMs) * (h - 14), "#74c0fc");
  line(ctx, pts.map((s) => [s[0], s[3]]), x, (v) => h - (v / maxMs) * (h - 14), "#ff6b6b");
  labels(ctx, [[`tokens/s (max ${maxTps.toFixed(0)})`, "#51cf66"], ["TTFT p50", "#74c0fc"],
    [`TTFT p99 (max ${maxMs.toFixed(0)} ms) · last ${span.toFixed(0)} s`, "#ff6b6b"]]);
}
