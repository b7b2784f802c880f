/* Shared helpers of the dashboard pages: API access, the SSE reader, formatting, the health reading.
 * Plain ES2017, no build step. API data is only ever put into the page as text (never innerHTML). */
"use strict";

window.Excb = (function () {
  // Okabe-Ito: distinguishable with the common colour-vision deficiencies.
  const PALETTE = {
    blue: "#0072B2", orange: "#E69F00", green: "#009E73", vermillion: "#D55E00",
    purple: "#CC79A7", sky: "#56B4E9", yellow: "#F0E442", black: "#000000", grey: "#6b6b6b",
  };
  const KEY_STORAGE = "excb.apiKey";
  const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
  // Same threshold as excb/method/stats.py EMPTY_RELATIVE_SIZE: an EMA below K*s = 0.01 counts as an empty cluster.
  const EMPTY_RELATIVE_SIZE = 0.01;

  class ApiError extends Error {
    constructor(status, type, message) { super(message); this.status = status; this.type = type; }
  }

  function apiKey() { try { return localStorage.getItem(KEY_STORAGE) || ""; } catch (e) { return ""; } }

  function authHeaders(extra) {
    const h = Object.assign({ Accept: "application/json" }, extra || {});
    const key = apiKey();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  /** GET a JSON document from the API; throws ApiError carrying the shared error shape. */
  async function api(path) {
    let resp;
    try {
      resp = await fetch(path, { headers: authHeaders(), cache: "no-store" });
    } catch (e) {
      throw new ApiError(0, "network", "the control plane is not reachable (" + e.message + ")");
    }
    if (resp.status === 401) showKeyForm();
    if (!resp.ok) {
      let type = "http_" + resp.status, message = resp.statusText || "request failed";
      try {
        const body = await resp.json();
        if (body && body.error) { type = body.error.type || type; message = body.error.message || message; }
      } catch (e) { /* not JSON: keep the status text */ }
      throw new ApiError(resp.status, type, message);
    }
    return resp.json();
  }

  /** Read a Server-Sent-Events stream with fetch (so the API key header can be sent), reconnecting with
   * backoff. handlers: {eventName: fn(data)}; opts.onState(state) gets "open" | "retry" | "closed";
   * opts.shouldReconnect() decides after the server ends the stream. Returns {close()}. */
  function streamEvents(path, handlers, opts) {
    opts = opts || {};
    let closed = false, lastId = null, delay = 1000, controller = null;
    const state = (s) => { if (opts.onState) opts.onState(s); };

    function dispatch(ev) {
      if (ev.id) lastId = ev.id;
      const fn = handlers[ev.event || "message"];
      if (!fn) return;
      let data = ev.data;
      try { data = JSON.parse(ev.data); } catch (e) { /* plain text event, e.g. a log line */ }
      try { fn(data); } catch (e) { console.error("event handler failed", ev.event, e); }
    }

    async function readOnce() {
      controller = new AbortController();
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (lastId) headers["Last-Event-ID"] = lastId;
      const resp = await fetch(path, { headers, signal: controller.signal, cache: "no-store" });
      if (resp.status === 401) showKeyForm();
      if (!resp.ok || !resp.body) throw new ApiError(resp.status, "stream", "event stream refused");
      state("open");
      delay = 1000;
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "", ev = { data: "" , event: "", id: "" }, hasData = false;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buf += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buf.search(/\r\n|\n|\r/)) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + (buf.startsWith("\r\n", nl) ? 2 : 1));
          if (line === "") {
            if (hasData) dispatch(ev);
            ev = { data: "", event: "", id: "" }; hasData = false;
            continue;
          }
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "data") { ev.data = hasData ? ev.data + "\n" + val : val; hasData = true; }
          else if (field === "event") ev.event = val;
          else if (field === "id") ev.id = val;
          else if (field === "retry" && /^\d+$/.test(val)) delay = Math.max(250, Number(val));
        }
      }
    }

    (async function loop() {
      while (!closed) {
        try { await readOnce(); } catch (e) { if (closed) break; }
        if (closed) break;
        if (opts.shouldReconnect && !opts.shouldReconnect()) { state("closed"); break; }
        state("retry");
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 15000);
      }
    })();

    return { close() { closed = true; if (controller) controller.abort(); state("closed"); } };
  }

  // ---------------------------------------------------------------------------------------------- DOM
  /** Build an element; children may be strings (inserted as text) or nodes. */
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role" || k === "title" || k === "href" ||
               k === "id" || k === "for" || k === "type" || k === "value" || k === "name" || k === "tabindex" ||
               k === "colspan" || k === "scope" || k === "placeholder" || k === "autocomplete") node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of [].concat(children || [])) {
      if (c === null || c === undefined) continue;
      node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

  /** An empty state that says what to do: a title, a sentence and optionally a command to copy. */
  function emptyState(title, body, code) {
    return el("div", { class: "empty", role: "status" }, [
      el("p", { class: "empty-title", text: title }),
      body ? el("p", { text: body }) : null,
      code ? el("pre", { class: "code" }, [el("code", { text: code })]) : null,
    ]);
  }

  function errorState(err, what) {
    if (err && err.status === 404) return emptyState(what + " not found", err.message + ". Check the link, or go back to the jobs list.");
    if (err && err.status === 401) return emptyState("API key needed", "This control plane requires an API key: enter it with the \u201cAPI key\u201d button at the top right.");
    return emptyState("Could not load " + what.toLowerCase(), (err && err.message) || String(err) + ". The page retries automatically.");
  }

  // --------------------------------------------------------------------------------------- formatting
  function fmtNum(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "\u2013";
    if (typeof v !== "number") return String(v);
    const d = digits === undefined ? 3 : digits;
    if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(2);
    return Number(v.toFixed(d)).toString();
  }

  function fmtPct(v) { return v === null || v === undefined ? "\u2013" : (Math.round(v * 10) / 10).toFixed(1) + "%"; }

  function fmtEta(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "\u2013";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    const h = Math.floor(s / 3600);
    return h + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function fmtTime(iso) {
    if (!iso) return "\u2013";
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toLocaleString();
  }

  function shortId(id) { return id && id.length > 12 ? id.slice(0, 8) + "\u2026" : id; }

  // --------------------------------------------------------------------------------- health reading
  // Thresholds (heuristics from method.md §7 "healthy reading"; shown in the badge tooltip):
  const THRESHOLDS = {
    effRatio: { watch: 0.6, collapse: 0.25 },   // effective clusters / K of the size estimate s
    empty: { watch: 0.05, collapse: 0.25 },     // fraction of clusters with K*s < 0.01
    lhbMin: { watch: 0.1, collapse: 0.02 },     // 1 / largest relative size K*s
  };

  /** The config that runs: `effective` (reported by the worker once the trainer has fitted its recipe and
   * budget) or, until then, the submitted one. {cfg, effective: bool}; a recipe=auto job's submitted config is
   * not what will run (K, batch, input size are fitted at train time), so callers say which one they show. */
  function runConfig(job) {
    if (job && job.effective) return { cfg: job.effective, effective: true };
    return { cfg: (job && (job.requested || job.config)) || null, effective: false };
  }

  /** K of the run: the effective config's; else the K the logged balance statistics imply (entropy over
   * normalised entropy = log K); else the submitted K only when no recipe will change it; else null (unknown). */
  function numClusters(job, row) {
    const run = runConfig(job);
    const k = run.cfg && run.cfg.model && run.cfg.model.num_clusters;
    if (k && run.effective) return Number(k);
    if (row && row.s_normalized_entropy > 0 && row.s_entropy > 0) return Math.round(Math.exp(row.s_entropy / row.s_normalized_entropy));
    if (k && run.cfg.recipe !== "auto") return Number(k);
    return null;
  }

  /** Classify a run from one metric row: {level: healthy|watch|collapsing|unknown, reasons[], explain}. */
  function health(row, k) {
    const checks = [];
    if (row && typeof row.s_effective_clusters === "number" && k) {
      checks.push(["effective clusters / K", row.s_effective_clusters / k, "low", THRESHOLDS.effRatio]);
    }
    if (row && typeof row.s_empty_fraction === "number") checks.push(["empty-cluster fraction", row.s_empty_fraction, "high", THRESHOLDS.empty]);
    if (row && typeof row.lhb_min === "number") checks.push(["lhb_min (1 / largest K\u00b7s)", row.lhb_min, "low", THRESHOLDS.lhbMin]);
    if (!checks.length) return { level: "unknown", reasons: ["no balance metrics yet"], explain: explainText() };
    let level = "healthy";
    const reasons = [];
    for (const [name, v, bad, t] of checks) {
      const collapse = bad === "low" ? v < t.collapse : v > t.collapse;
      const watch = bad === "low" ? v < t.watch : v > t.watch;
      if (collapse) { level = "collapsing"; reasons.push(name + " = " + fmtNum(v) + " (" + (bad === "low" ? "< " : "> ") + t.collapse + ")"); }
      else if (watch) { if (level === "healthy") level = "watch"; reasons.push(name + " = " + fmtNum(v) + " (" + (bad === "low" ? "< " : "> ") + t.watch + ")"); }
    }
    if (!reasons.length) reasons.push("all balance signals inside the healthy range");
    return { level, reasons, explain: explainText() };
  }

  function explainText() {
    const t = THRESHOLDS;
    return "Healthy: effective clusters \u2265 " + t.effRatio.watch + "\u00b7K, empty fraction \u2264 " + t.empty.watch +
      ", lhb_min \u2265 " + t.lhbMin.watch + ". Collapsing: effective clusters < " + t.effRatio.collapse +
      "\u00b7K, or empty fraction > " + t.empty.collapse + ", or lhb_min < " + t.lhbMin.collapse +
      " (one cluster over " + Math.round(1 / t.lhbMin.collapse) + "\u00d7 its uniform share). In between: watch.";
  }

  const LEVEL_TEXT = { healthy: "\u25cf Healthy", watch: "\u25b2 Watch", collapsing: "\u2716 Collapsing", unknown: "\u25cb No data yet" };

  function healthBadge(h) {
    const tip = h.reasons.join("; ") + "\n" + h.explain;
    return el("span", { class: "badge health-" + h.level, title: tip, "aria-label": "balance: " + h.level + ". " + tip,
                        "data-health": h.level, tabindex: "0" }, [LEVEL_TEXT[h.level]]);
  }

  function statusBadge(status) {
    const s = String(status || "UNKNOWN");
    return el("span", { class: "badge status-" + s.toLowerCase(), "data-status": s }, [s]);
  }

  function progressBar(progress) {
    const p = progress || {};
    const pct = typeof p.percent === "number" ? Math.max(0, Math.min(100, p.percent)) : 0;
    return el("div", { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
                       "aria-valuenow": String(Math.round(pct)), title: fmtPct(pct) }, [
      el("div", { class: "progress-fill", style: "width:" + pct + "%" }),
      el("span", { class: "progress-text", text: fmtPct(pct) + (p.total_steps ? " \u00b7 " + (p.step || 0) + "/" + p.total_steps : "") }),
    ]);
  }

  // ------------------------------------------------------------------------------------- API key UI
  function showKeyForm() {
    const dlg = document.getElementById("key-dialog");
    if (dlg && !dlg.open && typeof dlg.showModal === "function") dlg.showModal();
  }

  function initChrome() {
    const btn = document.getElementById("key-button");
    const dlg = document.getElementById("key-dialog");
    if (!btn || !dlg) return;
    btn.addEventListener("click", () => showKeyForm());
    dlg.addEventListener("close", () => {
      if (dlg.returnValue !== "save") return;
      const input = dlg.querySelector("input");
      try { localStorage.setItem(KEY_STORAGE, input.value.trim()); } catch (e) { /* private mode */ }
      location.reload();
    });
  }

  /** Rows that are per-step metrics (not curves, epochs or checkpoints), sorted, one per step. */
  function stepRows(rows) {
    const byStep = new Map();
    for (const r of rows || []) {
      if (!r || typeof r.step !== "number") continue;
      if (r.type && r.type !== "step") continue;
      byStep.set(r.step, r);
    }
    return Array.from(byStep.values()).sort((a, b) => a.step - b.step);
  }

  /** All metric rows of a job, paging with since_step until the API has nothing newer. */
  async function allMetrics(jobId, sinceStep) {
    const out = [];
    let since = sinceStep === undefined ? -1 : sinceStep;
    for (let page = 0; page < 1000; page++) {
      const q = "?limit=1000" + (since >= 0 ? "&since_step=" + since : "");
      const body = await api("/v1/jobs/" + encodeURIComponent(jobId) + "/metrics" + q);
      const items = (body && body.items) || [];
      const newer = items.filter((r) => typeof r.step === "number" && r.step > since);
      out.push(...newer);
      if (!newer.length || items.length < 1000) break;
      since = Math.max(...newer.map((r) => r.step));
    }
    return out;
  }

  function pathId(prefix) {
    const rest = location.pathname.slice(location.pathname.indexOf(prefix) + prefix.length);
    return decodeURIComponent(rest.split("/")[0] || "");
  }

  document.addEventListener("DOMContentLoaded", initChrome);

  return {
    PALETTE, TERMINAL, EMPTY_RELATIVE_SIZE, THRESHOLDS, ApiError, api, streamEvents, el, clear, emptyState, errorState,
    fmtNum, fmtPct, fmtEta, fmtTime, shortId, runConfig, numClusters, health, healthBadge, statusBadge, progressBar,
    stepRows, allMetrics, pathId,
  };
})();
