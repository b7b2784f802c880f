/* Job page: header with status/progress/health, the live cluster-size curve and the training-signal charts.
 * History comes from GET /v1/jobs/{id}/metrics; updates from the SSE stream GET /v1/jobs/{id}/events. */
"use strict";

(function (Excb) {
  const { el, clear, api } = Excb;
  const MAX_LOG_LINES = 200;

  const state = { id: null, job: null, rows: [], charts: [], curve: null, firstCurve: null, stream: null, sseRows: 0, k: null };

  /** Facts of the run from the config that runs (Excb.runConfig). Until the worker reports it, a recipe=auto
   * job's K, batch and input size are not known (they are fitted when training starts): say so, not 65536. */
  function cfgSummary(job) {
    const run = Excb.runConfig(job), cfg = run.cfg;
    if (!cfg) return [];
    const m = cfg.model || {}, b = cfg.balancing || {}, a = cfg.augment || {};
    const pending = !run.effective && cfg.recipe === "auto";
    const fitted = (v) => (pending ? "fitted when it starts" : v);
    const items = [
      ["config", run.effective ? "as run (reported by the worker)" : "as submitted" + (pending ? "; the recipe is fitted when training starts" : "")],
      ["method", b.method], ["K", fitted(m.num_clusters)], ["backbone", fitted(m.backbone)], ["batch", fitted(cfg.batch_size)],
      ["input", pending ? "fitted when it starts" : (a.global_size ? a.global_size + " px" : null)],
      ["data", typeof cfg.data === "object" && cfg.data ? (cfg.data.source || cfg.data.name || JSON.stringify(cfg.data)) : cfg.data],
    ];
    return items.filter(([, v]) => v !== undefined && v !== null && v !== "");
  }

  /** The recipe the trainer fitted, one line per choice as `excb train --dry-run` prints them, and the step count. */
  function recipeBlock(job) {
    const r = job.recipe;
    const box = el("section", { id: "recipe", class: "recipe", "aria-labelledby": "recipe-h" }, [el("h2", { id: "recipe-h", text: "Recipe" })]);
    if (!r) {
      box.setAttribute("data-state", "pending");
      box.append(el("p", { class: "muted", text: Excb.TERMINAL.has(job.status)
        ? "The worker did not report a recipe for this job (it stopped before training started)."
        : "The recipe and the step count are fitted when training starts; they appear here then." }));
      return box;
    }
    box.setAttribute("data-state", r.fitted ? "fitted" : "as-given");
    box.append(el("p", { text: r.fitted
      ? "Fitted to " + (r.data || "the data") + " on " + (r.device || "its device") + ":"
      : "No recipe fitted: the config runs as given (a preset or recipe=off)." }));
    if (r.reasons && r.reasons.length) box.append(el("ul", { class: "reasons" }, r.reasons.map((t) => el("li", { text: t }))));
    if (r.kept && r.kept.length) box.append(el("p", { class: "muted small", text: "Kept as submitted: " + r.kept.join(", ") }));
    const steps = r.steps || {};
    if (steps.line) box.append(el("p", { id: "steps", "data-chosen-by": steps.chosen_by || "", "data-max-steps": steps.max_steps === null || steps.max_steps === undefined ? "" : String(steps.max_steps) }, [el("strong", { text: "Steps: " }), steps.line]));
    return box;
  }

  /** A corpus embedding job's progress (services/corpus): chunks, images, undecodable ones, rate. */
  function corpusLine(p, status) {
    const parts = ["chunks " + (p.chunks_done || 0) + "/" + p.chunks_total, "images " + (p.images || 0) + "/" + (p.images_total || 0)];
    if (p.errors) parts.push(p.errors + " undecodable");
    if (p.images_per_second && status === "RUNNING") parts.push(Math.round(p.images_per_second) + " images/s");
    return parts.join(" \u00b7 ");
  }

  function latestRow() { return state.rows.length ? state.rows[state.rows.length - 1] : (state.job && state.job.latest_metrics) || null; }

  function renderHeader() {
    const job = state.job, host = document.getElementById("job-header");
    const p = job.progress || {};
    const h = Excb.health(latestRow(), state.k);
    const dl = el("dl", { class: "facts" }, [
      el("dt", { text: "status" }), el("dd", {}, [Excb.statusBadge(job.status),
        job.status_detail ? el("span", { id: "status-detail", class: "muted small", text: " " + job.status_detail }) : null]),
      el("dt", { text: "balance" }), el("dd", { id: "health" }, [Excb.healthBadge(h), el("span", { class: "muted small", text: " " + h.reasons.join("; ") })]),
      el("dt", { text: "progress" }), el("dd", {}, [Excb.progressBar(p)]),
      el("dt", { text: "ETA" }), el("dd", { id: "eta", text: Excb.TERMINAL.has(job.status) ? "done" : Excb.fmtEta(p.eta_seconds) }),
      el("dt", { text: "attempt" }), el("dd", { text: String(job.attempt === undefined ? "\u2013" : job.attempt) }),
      el("dt", { text: "epoch" }), el("dd", { text: String(p.epoch === undefined ? "\u2013" : p.epoch) }),
    ]);
    if (job.name) dl.append(el("dt", { text: "name" }), el("dd", { text: job.name }));
    if (p.chunks_total !== undefined && p.chunks_total !== null) dl.append(el("dt", { text: "corpus" }), el("dd", { id: "corpus-progress", text: corpusLine(p, job.status) }));
    for (const [k, v] of cfgSummary(job)) dl.append(el("dt", { text: k }), el("dd", { "data-fact": k, text: String(v) }));
    const links = el("p", { class: "actions" }, [
      job.model_id ? el("a", { class: "button", href: "/dashboard/models/" + encodeURIComponent(job.model_id), text: "Served model \u2192" }) : null,
      p.chunks_total !== undefined && p.chunks_total !== null ? el("a", { class: "button", id: "corpus-link", href: "/dashboard/corpora/" + encodeURIComponent(job.id), text: "Search and curate the corpus \u2192" }) : null,
      el("a", { class: "button secondary", href: "/dashboard/compare?a=" + encodeURIComponent(job.id), text: "Compare with another run" }),
    ]);
    clear(host).append(
      el("h1", {}, ["Job ", el("code", { text: job.id })]),
      dl,
      job.error ? el("p", { class: "error-box", role: "alert", text: (job.error.type || "error") + ": " + (job.error.message || "") }) : "",
      job.status === "QUEUED" && /no live worker/.test(job.status_detail || "")
        ? el("p", { class: "warn-box", role: "alert", id: "no-worker", text: job.status_detail }) : "",
      recipeBlock(job),
      links);
    document.title = "Job " + Excb.shortId(job.id) + " \u00b7 excb dashboard";
    document.getElementById("job").setAttribute("data-status", job.status);
  }

  /** The training-signal charts; their reference lines and y-ranges follow K (state.k), so a new K rebuilds them. */
  function buildTimeCharts() {
    const host = clear(document.getElementById("charts"));
    host.setAttribute("data-k", state.k ? String(state.k) : "");
    state.charts = Excb.metricCharts(state.k).map((spec) => {
      const box = el("figure", { class: "card" });
      host.append(box);
      return new Excb.TimeChart(box, spec);
    });
    for (const c of state.charts) if (state.rows.length) c.addRows(state.rows);
  }

  /** K changed (the worker reported the fitted config, or the first balance row implies it): redraw against it. */
  function followK() {
    const k = Excb.numClusters(state.job, state.rows[0] || state.job.latest_metrics);
    if (k === state.k) return;
    state.k = k;
    buildTimeCharts();
    renderHeaderHealth();
  }

  function buildCharts() {
    buildTimeCharts();
    state.curve = new Excb.CurveChart(document.getElementById("curve"), {
      id: "cluster_sizes", title: "Relative cluster size K\u00b7s, sorted (paper Fig. 5)",
      help: "A balanced run stays close to the uniform line at 1 across the whole rank range. A collapsing run has a few huge clusters at the left and a long tail of empty clusters (marked \u2716 at the floor) at the right.",
      curves: [{ id: "latest", label: "latest", color: Excb.PALETTE.blue, markEmpty: true },
               { id: "first", label: "earliest seen", color: Excb.PALETTE.grey, dash: [4, 4] }],
      height: 300,
    });
  }

  function addRows(rows) {
    const fresh = Excb.stepRows(rows);
    if (!fresh.length) return;
    state.rows = Excb.stepRows(state.rows.concat(fresh));
    for (const c of state.charts) c.addRows(fresh);
  }

  /** Latest curve, plus the earliest one this page saw as a faded reference once training has moved on. */
  function setCurve(curve) {
    if (!curve || typeof curve.step !== "number") return;
    if (!state.firstCurve || curve.step < state.firstCurve.step) state.firstCurve = curve;
    state.curve.setCurve("latest", curve);
    state.curve.setCurve("first", state.firstCurve.step < curve.step ? state.firstCurve : null);
  }

  function curveEmptyText() {
    const cfg = Excb.runConfig(state.job).cfg;
    const every = cfg && cfg.histogram_every_steps;
    return "No cluster-size snapshot yet: the trainer logs one every " + (every || "histogram_every_steps") +
      " steps. It appears here as soon as the job reaches that step.";
  }

  function appendLog(line) {
    const pre = document.getElementById("log");
    const text = typeof line === "string" ? line : (line && (line.line || line.message)) || JSON.stringify(line);
    const lines = (pre.textContent ? pre.textContent.split("\n") : []).concat(text).slice(-MAX_LOG_LINES);
    pre.textContent = lines.join("\n");
    pre.setAttribute("data-lines", String(lines.length));
  }

  function setLive(s) {
    const live = document.getElementById("live");
    const terminal = state.job && Excb.TERMINAL.has(state.job.status);
    const text = { open: "\u25cf live", retry: "reconnecting\u2026", closed: terminal ? "finished" : "stream closed", connecting: "connecting\u2026" }[s] || s;
    live.textContent = text;
    live.setAttribute("data-state", s);
  }

  async function refetchMetrics() {
    const last = state.rows.length ? state.rows[state.rows.length - 1].step : -1;
    addRows(await Excb.allMetrics(state.id, last));
  }

  function connect() {
    const path = "/v1/jobs/" + encodeURIComponent(state.id) + "/events";
    state.stream = Excb.streamEvents(path, {
      status: (job) => {
        if (!job || !job.id) return;
        const wasTerminal = Excb.TERMINAL.has(state.job.status);
        state.job = job;
        renderHeader();
        followK();
        if (Excb.TERMINAL.has(job.status) && !wasTerminal) refetchMetrics().catch(() => {});
      },
      metrics: (row) => {
        if (row && row.type === "cluster_sizes") { setCurve(row); return; }
        state.sseRows += 1;
        document.getElementById("job").setAttribute("data-sse-rows", String(state.sseRows));
        addRows([row]);
        if (state.job && !state.k) followK();
        if (state.job) renderHeaderHealth();
      },
      cluster_sizes: (curve) => setCurve(curve),
      log: (line) => appendLog(line),
    }, {
      onState: (s) => {
        setLive(s);
        if (s === "open") refetchMetrics().catch(() => {});  // fill anything logged before the stream opened
      },
      shouldReconnect: () => !(state.job && Excb.TERMINAL.has(state.job.status)),
    });
  }

  function renderHeaderHealth() {
    const dd = document.getElementById("health");
    if (!dd) return;
    const h = Excb.health(latestRow(), state.k);
    clear(dd).append(Excb.healthBadge(h), el("span", { class: "muted small", text: " " + h.reasons.join("; ") }));
  }

  async function main() {
    state.id = Excb.pathId("/dashboard/jobs/");
    const root = document.getElementById("job");
    try {
      state.job = await api("/v1/jobs/" + encodeURIComponent(state.id));
    } catch (err) {
      root.setAttribute("data-state", "error");
      clear(root).append(Excb.errorState(err, "Job"));
      return;
    }
    state.k = Excb.numClusters(state.job, state.job.latest_metrics);
    buildCharts();
    state.curve.setEmptyText(curveEmptyText());
    renderHeader();
    try {
      addRows(await Excb.allMetrics(state.id));
      followK();
    } catch (err) { console.warn("metrics", err); }
    try { setCurve(await api("/v1/jobs/" + encodeURIComponent(state.id) + "/cluster-sizes")); }
    catch (err) { if (err.status !== 404) console.warn("cluster sizes", err); }
    for (const c of state.charts) c.redraw();
    renderHeader();
    root.setAttribute("data-state", "ready");
    connect();
  }

  document.addEventListener("DOMContentLoaded", main);
})(window.Excb);
