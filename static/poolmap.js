// The unified pool drawn on one canvas: one cell per page, coloured by owner (free / KV by request /
// adapter weights by adapter). Pixels are written straight into an ImageData, so 100,000 pages cost one
// putImageData, never one DOM node per page.

const FREE_RGB = [42, 49, 64];

function hash(text) {
  let h = 2166136261;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 16777619);
  }
  return h >>> 0;
}

function hslToRgb(h, s, l) {
  const k = (n) => (n + h / 30) % 12;
  const a = s * Math.min(l, 1 - l);
  const f = (n) => l - a * Math.max(-1, Math.min(k(n) - 3, Math.min(9 - k(n), 1)));
  return [Math.round(f(0) * 255), Math.round(f(8) * 255), Math.round(f(4) * 255)];
}

function hexRgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

// Adapter colours: a categorical palette, picked greedily (max-min) from OKLCH candidates for the largest
// CIEDE2000 distance to the colours already chosen, among those at least 20 from the KV blues, the free
// grey and the background. Any two of these 12 differ by ΔE2000 >= 16.6 (any two of the first 8 by
// >= 22.5; about 2 is a just-noticeable difference). docs/dashboard.md says how to regenerate it.
export const ADAPTER_PALETTE = ["#f0a646", "#bf56b9", "#3cf4a7", "#7c9217", "#dd503f", "#2c9a88", "#feb8e6",
  "#d9da26", "#f19f91", "#b27744", "#a2c580", "#e3769b"].map(hexRgb);

const adapterOrder = new Map();

/** An adapter's colour: palette entries in the order adapters first appear on this page, so the first 12
 * adapters seen all differ; later ones reuse the palette, darker per round. */
export function adapterColor(name) {
  if (!adapterOrder.has(name)) adapterOrder.set(name, adapterOrder.size);
  const i = adapterOrder.get(name);
  const shade = 1 - 0.22 * (Math.floor(i / ADAPTER_PALETTE.length) % 3);
  return ADAPTER_PALETTE[i % ADAPTER_PALETTE.length].map((c) => Math.round(c * shade));
}

/** Colour of an owner label: KV in blues (one shade per request), adapters from the palette. */
export function ownerColor(label) {
  if (!label) return FREE_RGB;
  if (label.startsWith("kv:")) {
    const h = hash(label);
    return hslToRgb(195 + (h % 45), 0.75, 0.45 + ((h >>> 8) % 20) / 100);
  }
  return adapterColor(label.startsWith("adapter:") ? label.slice(8) : label);
}

export function kindOf(label) {
  if (!label) return "free";
  return label.startsWith("kv:") ? "kv" : "adapter";
}

export class PoolMap {
  constructor(canvas, tip, legend) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.tip = tip;
    this.legend = legend;
    this.codes = new Int32Array(0);
    this.names = [""];
    this.rgb = [];
    this.cell = 1;
    this.cols = 1;
    this.dirty = true;
    canvas.addEventListener("mousemove", (e) => this.hover(e));
    canvas.addEventListener("mouseleave", () => { this.tip.hidden = true; });
    new ResizeObserver(() => { this.dirty = true; }).observe(canvas.parentElement);
  }

  /** Owner-name table update: names[from:] = added (a new table when from == 0). */
  setNames(from, added) {
    if (from > this.names.length) return false;
    this.names.length = from;
    this.rgb.length = Math.min(this.rgb.length, from);
    for (const name of added) this.names.push(name);
    return true;
  }

  setPool(runs) {
    let total = 0;
    for (let i = 1; i < runs.length; i += 2) total += runs[i];
    const codes = new Int32Array(total);
    this.writeRuns(codes, 0, runs);
    this.codes = codes;
    this.dirty = true;
  }

  patch(patches) {
    for (const [start, runs] of patches) this.writeRuns(this.codes, start, runs);
    if (patches.length) this.dirty = true;
  }

  writeRuns(codes, start, runs) {
    let at = start;
    for (let i = 0; i < runs.length; i += 2) {
      codes.fill(runs[i], at, at + runs[i + 1]);
      at += runs[i + 1];
    }
  }

  color(code) {
    let rgb = this.rgb[code];
    if (!rgb) rgb = this.rgb[code] = ownerColor(this.names[code] ?? "");
    return rgb;
  }

  layout() {
    const n = Math.max(1, this.codes.length);
    const width = Math.max(100, Math.floor(this.canvas.parentElement.clientWidth));
    const maxHeight = 360;
    let cell = Math.floor(Math.sqrt((width * maxHeight) / n));
    cell = Math.max(1, Math.min(cell, 24));
    this.cell = cell;
    this.cols = Math.max(1, Math.floor(width / cell));
    return [this.cols * cell, Math.ceil(n / this.cols) * cell];
  }

  draw() {
    if (!this.dirty) return;
    this.dirty = false;
    const [w, h] = this.layout();
    if (this.canvas.width !== w || this.canvas.height !== h) {
      this.canvas.width = w;
      this.canvas.height = h;
      this.canvas.style.height = `${h}px`;
    }
    const image = this.ctx.createImageData(w, h);
    const px = image.data;
    const cell = this.cell, cols = this.cols, gap = cell >= 4 ? 1 : 0;
    for (let p = 0; p < this.codes.length; p++) {
      const [r, g, b] = this.color(this.codes[p]);
      const x0 = (p % cols) * cell, y0 = Math.floor(p / cols) * cell;
      for (let y = y0; y < y0 + cell - gap; y++) {
        let o = (y * w + x0) * 4;
        for (let x = 0; x < cell - gap; x++, o += 4) {
          px[o] = r; px[o + 1] = g; px[o + 2] = b; px[o + 3] = 255;
        }
      }
    }
    this.ctx.putImageData(image, 0, 0);
    this.drawLegend();
  }

  /** Page counts by owner label, biggest first. */
  owners() {
    const counts = new Map();
    for (let p = 0; p < this.codes.length; p++) counts.set(this.codes[p], (counts.get(this.codes[p]) || 0) + 1);
    return [...counts.entries()].map(([c, n]) => [this.names[c] ?? "", n, c]).sort((a, b) => b[1] - a[1]);
  }

  drawLegend() {
    const owners = this.owners();
    const kinds = { free: 0, kv: 0, adapter: 0 };
    const requests = new Set();
    for (const [label, n] of owners) {
      kinds[kindOf(label)] += n;
      if (label.startsWith("kv:")) requests.add(label);
    }
    const rgb = (c) => `rgb(${c.join(",")})`;
    const swatch = (c) => `<i style="background:${rgb(c)}"></i>`;
    // the kinds get mixed swatches, never one adapter's colour: KV shades, and the palette's first three
    const mixed = (colors) => `<i style="background:linear-gradient(90deg,${colors.map(rgb).join(",")})"></i>`;
    const parts = [
      `${swatch(FREE_RGB)}free ${kinds.free}`,
      `${mixed(["kv:1", "kv:2", "kv:3"].map(ownerColor))}KV ${kinds.kv} (${requests.size} requests)`,
      `${mixed(ADAPTER_PALETTE.slice(0, 3))}adapters ${kinds.adapter}`,
    ];
    const top = owners.filter(([l]) => l.startsWith("adapter:")).slice(0, 8);
    for (const [label, n, code] of top) {
      parts.push(`<span data-adapter="${escapeHtml(label.slice(8))}">${swatch(this.color(code))}`
        + `${escapeHtml(label.slice(8))} ${n}</span>`);
    }
    this.legend.innerHTML = parts.map((p) => `<span>${p}</span>`).join("");
  }

  pageAt(event) {
    const rect = this.canvas.getBoundingClientRect();
    const sx = this.canvas.width / rect.width, sy = this.canvas.height / rect.height;
    const col = Math.floor(((event.clientX - rect.left) * sx) / this.cell);
    const row = Math.floor(((event.clientY - rect.top) * sy) / this.cell);
    const page = row * this.cols + col;
    return col < this.cols && page >= 0 && page < this.codes.length ? page : -1;
  }

  hover(event) {
    const page = this.pageAt(event);
    if (page < 0) { this.tip.hidden = true; return; }
    const label = this.names[this.codes[page]] ?? "";
    let same = 0;
    for (let p = 0; p < this.codes.length; p++) if (this.codes[p] === this.codes[page]) same++;
    const what = label ? `${kindOf(label) === "kv" ? "KV of request" : "adapter"} ${label.slice(label.indexOf(":") + 1)}`
      : "free";
    this.tip.textContent = `page ${page} · ${what} · ${same} page${same === 1 ? "" : "s"}`;
    const rect = this.canvas.parentElement.getBoundingClientRect();
    this.tip.style.left = `${event.clientX - rect.left + 12}px`;
    this.tip.style.top = `${event.clientY - rect.top + 12}px`;
    this.tip.hidden = false;
  }
}

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
