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

/** Colour of an owner label: KV in blues (one shade per request), adapters in warm hues (one per adapter). */
export function ownerColor(label) {
  if (!label) return FREE_RGB;
  const h = hash(label);
  if (label.startsWith("kv:")) return hslToRgb(195 + (h % 45), 0.75, 0.45 + ((h >>> 8) % 20) / 100);
  const warm = [0, 12, 24, 36, 48, 300, 320, 340];
  return hslToRgb(warm[h % warm.length] + ((h >>> 4) % 10), 0.85, 0.5 + ((h >>> 8) % 14) / 100);
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
    const swatch = (rgb) => `<i style="background:rgb(${rgb.join(",")})"></i>`;
    const parts = [
      `${swatch(FREE_RGB)}free ${kinds.free}`,
      `${swatch(ownerColor("kv:0"))}KV ${kinds.kv} (${requests.size} requests)`,
      `${swatch(ownerColor("adapter:x"))}adapters ${kinds.adapter}`,
    ];
    const top = owners.filter(([l]) => l.startsWith("adapter:")).slice(0, 8);
    for (const [label, n, code] of top) parts.push(`${swatch(this.color(code))}${escapeHtml(label.slice(8))} ${n}`);
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
