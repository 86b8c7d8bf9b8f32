// The adapter list: a virtual-scrolled table (only the visible rows exist in the DOM), searchable,
// filterable by tier and sortable by any column; fine at thousands of adapters.

import { escapeHtml } from "./poolmap.js";

const ROW_HEIGHT = 22;
// Row layout from the feed: [tier, in_batch, running, waiting, requests, tokens, req/s, load ms, pages, loads]
export const COLUMNS = [
  { key: "name", label: "adapter", title: "adapter name" },
  { key: 0, label: "tier", title: "gpu: resident in the pool; host: in the host cache; disk: on disk only" },
  { key: 1, label: "batch", title: "used by a request of the running batch" },
  { key: 2, label: "run", num: true, title: "running requests" },
  { key: 3, label: "wait", num: true, title: "waiting requests" },
  { key: 4, label: "requests", num: true, title: "finished requests (all time)" },
  { key: 5, label: "tokens", num: true, title: "prompt + generated tokens of finished requests" },
  { key: 6, label: "req/s", num: true, title: "finished requests per second, recent window" },
  { key: 7, label: "load ms", num: true, title: "mean load latency into the pool" },
  { key: 8, label: "pages", num: true, title: "pool pages holding its weights" },
  { key: 9, label: "loads", num: true, title: "times loaded into the pool" },
];
const TIER_ORDER = { gpu: 0, host: 1, disk: 2, gone: 3 };

export class AdapterTable {
  constructor(head, scroller, spacer, rows, search, tier, count) {
    Object.assign(this, { head, scroller, spacer, rows, search, tier, count });
    this.data = new Map();
    this.sortKey = 4;
    this.sortDesc = true;
    this.view = [];
    this.dirty = true;
    head.innerHTML = COLUMNS.map((c, i) =>
      `<span data-col="${i}" class="${c.num ? "num" : ""}" title="${c.title}">${c.label}</span>`).join("");
    head.addEventListener("click", (e) => this.sortBy(e.target.closest("span")?.dataset.col));
    scroller.addEventListener("scroll", () => this.render());
    search.addEventListener("input", () => { this.dirty = true; this.refresh(); });
    tier.addEventListener("change", () => { this.dirty = true; this.refresh(); });
    this.markSorted();
  }

  replace(rows) {
    this.data = new Map(Object.entries(rows));
    this.dirty = true;
  }

  update(rows, removed) {
    for (const [name, row] of Object.entries(rows)) this.data.set(name, row);
    for (const name of removed || []) this.data.delete(name);
    if (Object.keys(rows).length || (removed && removed.length)) this.dirty = true;
  }

  sortBy(col) {
    if (col === undefined) return;
    const key = COLUMNS[Number(col)].key;
    this.sortDesc = this.sortKey === key ? !this.sortDesc : key !== "name";
    this.sortKey = key;
    this.markSorted();
    this.dirty = true;
    this.refresh();
  }

  markSorted() {
    for (const span of this.head.children) {
      span.classList.toggle("sorted", COLUMNS[Number(span.dataset.col)].key === this.sortKey);
    }
  }

  refresh() {
    if (!this.dirty) return;
    this.dirty = false;
    const query = this.search.value.trim().toLowerCase();
    const tier = this.tier.value;
    let view = [...this.data.entries()];
    if (query) view = view.filter(([name]) => name.toLowerCase().includes(query));
    if (tier === "batch") view = view.filter(([, r]) => r[1]);
    else if (tier) view = view.filter(([, r]) => r[0] === tier);
    const key = this.sortKey, sign = this.sortDesc ? -1 : 1;
    const value = ([name, r]) => (key === "name" ? name : key === 0 ? TIER_ORDER[r[0]] ?? 9 : r[key] ?? -1);
    view.sort((a, b) => {
      const va = value(a), vb = value(b);
      return va < vb ? -sign : va > vb ? sign : a[0] < b[0] ? -1 : 1;
    });
    this.view = view;
    this.count.textContent = `${view.length} of ${this.data.size}`;
    this.spacer.style.height = `${view.length * ROW_HEIGHT}px`;
    this.render();
  }

  render() {
    const first = Math.max(0, Math.floor(this.scroller.scrollTop / ROW_HEIGHT) - 5);
    const last = Math.min(this.view.length, first + Math.ceil(this.scroller.clientHeight / ROW_HEIGHT) + 10);
    this.rows.style.transform = `translateY(${first * ROW_HEIGHT}px)`;
    const html = [];
    for (let i = first; i < last; i++) html.push(rowHtml(...this.view[i]));
    this.rows.innerHTML = html.join("");
  }
}

function fmt(value) {
  if (value === null || value === undefined) return "–";
  return Number.isInteger(value) ? String(value) : value.toFixed(value < 10 ? 2 : 1);
}

function rowHtml(name, r) {
  const cells = [
    `<span title="${escapeHtml(name)}">${escapeHtml(name)}</span>`,
    `<span><b class="badge ${r[0]}">${r[0]}</b></span>`,
    `<span class="dot">${r[1] ? "●" : ""}</span>`,
  ];
  for (let k = 2; k < r.length; k++) cells.push(`<span class="num">${fmt(r[k])}</span>`);
  return `<div class="row" data-name="${escapeHtml(name)}" data-tier="${r[0]}">${cells.join("")}</div>`;
}
