// Playground (one generation at a time over WS /v1/stream, protocol per docs/protocol.md) and the
// admin actions (POST /v1/load_lora_adapter, /v1/unload_lora_adapter with Authorization: Bearer <key>).

const $ = (id) => document.getElementById(id);

function wsUrl(path, key) {
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (key) url.searchParams.set("api_key", key);
  return url.toString();
}

function authHeaders(key) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The key typed in the admin panel, else the one the page was opened with (/dashboard?api_key=KEY): a server
// started with --api-key needs it on /v1/models and /v1/stream too, which the dashboard's cookie does not open.
function apiKey() {
  return $("admin-key").value || new URLSearchParams(window.location.search).get("api_key") || "";
}

const KEY_HINT = "this server needs its API key: open the page as /dashboard?api_key=KEY or type it in Admin";

export async function loadModels() {
  const select = $("pg-model");
  const keep = select.value;
  try {
    const resp = await fetch("/v1/models", { headers: authHeaders(apiKey()) });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}${resp.status === 401 ? ` (${KEY_HINT})` : ""}`);
    const body = await resp.json();
    select.innerHTML = "";
    for (const model of body.data || []) {
      const option = document.createElement("option");
      option.value = option.textContent = model.id;
      select.appendChild(option);
    }
    if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  } catch (err) {
    $("pg-status").textContent = `models: ${err.message}`;
  }
}

export class Playground {
  constructor() {
    this.ws = null;
    this.current = null;
    this.counter = 0;
    $("pg-send").addEventListener("click", () => this.send());
    $("pg-stop").addEventListener("click", () => this.stop());
  }

  socket() {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) return Promise.resolve(this.ws);
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(wsUrl("/v1/stream", apiKey()));
      ws.onopen = () => resolve(ws);
      ws.onerror = () => reject(new Error(`cannot open /v1/stream (if ${KEY_HINT})`));
      ws.onclose = () => { if (this.ws === ws) this.ws = null; this.finish("connection closed"); };
      ws.onmessage = (e) => this.onEvent(JSON.parse(e.data));
      this.ws = ws;
    });
  }

  async send() {
    if (this.current) return;
    const id = `pg-${Date.now()}-${this.counter++}`;
    const frame = {
      type: "generate", id, model: $("pg-model").value, prompt: $("pg-prompt").value,
      max_tokens: Number($("pg-max-tokens").value) || 16, temperature: Number($("pg-temperature").value) || 0,
    };
    $("pg-output").textContent = "";
    $("pg-status").textContent = "sending…";
    this.current = { id, tokens: 0, started: performance.now() };
    $("pg-send").disabled = true;
    $("pg-stop").disabled = false;
    try {
      const ws = await this.socket();
      if (ws.readyState !== WebSocket.OPEN) await new Promise((r) => ws.addEventListener("open", r, { once: true }));
      ws.send(JSON.stringify(frame));
    } catch (err) {
      this.finish(err.message);
    }
  }

  stop() {
    if (this.current && this.ws) this.ws.send(JSON.stringify({ type: "cancel", id: this.current.id }));
  }

  onEvent(event) {
    const cur = this.current;
    if (!cur || (event.id !== cur.id && event.id !== null)) return;
    if (event.type === "accepted") $("pg-status").textContent = "queued…";
    else if (event.type === "delta") {
      cur.tokens += (event.token_ids || []).length;
      $("pg-output").textContent += event.text || "";
      $("pg-status").textContent = `streaming · ${cur.tokens} tokens`;
    } else if (event.type === "done") {
      const t = event.timing || {};
      const ttft = t.ttft_ms != null ? ` · TTFT ${t.ttft_ms.toFixed(0)} ms` : "";
      const e2e = t.e2e_ms != null ? ` · ${t.e2e_ms.toFixed(0)} ms total` : "";
      this.finish(`done (${event.finish_reason}) · ${event.usage?.completion_tokens ?? cur.tokens} tokens${ttft}${e2e}`);
    } else if (event.type === "error") {
      this.finish(`error ${event.error?.code}: ${event.error?.message}`);
    }
  }

  finish(status) {
    if (!this.current) return;
    this.current = null;
    $("pg-status").textContent = status;
    $("pg-send").disabled = false;
    $("pg-stop").disabled = true;
  }
}

async function admin(path, body) {
  const result = $("admin-result");
  result.textContent = "…";
  try {
    const resp = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders($("admin-key").value) },
      body: JSON.stringify(body),
    });
    const text = await resp.text();
    let message = text;
    try {
      const json = JSON.parse(text);
      message = json.error ? json.error.message : JSON.stringify(json);
    } catch { /* plain text body */ }
    result.textContent = `${resp.status} ${resp.ok ? "ok" : "failed"}: ${message}`;
    result.dataset.status = String(resp.status);
    if (resp.ok) await loadModels();
  } catch (err) {
    result.textContent = `failed: ${err.message}`;
  }
}

export function setupAdmin() {
  $("admin-form").addEventListener("submit", (e) => e.preventDefault());
  $("admin-load").addEventListener("click", () =>
    admin("/v1/load_lora_adapter", { lora_name: $("admin-name").value, lora_path: $("admin-path").value }));
  $("admin-unload").addEventListener("click", () =>
    admin("/v1/unload_lora_adapter", { lora_name: $("admin-name").value }));
  $("admin-key").addEventListener("change", () => loadModels());
}
