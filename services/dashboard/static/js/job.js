/* Job page: header with status/progress/health, the live cluster-size curve and the training-signal charts.
 * History comes from GET /v1/jobs/{id}/metrics; updates from the SSE stream GET /v1/jobs/{id}/events. */
"use strict";

(function (Excb) {
  const { el, clear, api } = Excb;
  const MAX_LOG_LINES = 200;

  const state = { id: null, job: null, rows: [], charts: [], curve: null, firstCurve: null, stream: null, sseRows: 0, k: null };

  function cfgSummary(cfg) {
    if (!cfg) return [];
    const m = cfg.model || {}, b = cfg.balancing || {};
    const items = [
      ["method", b.method], ["K", m.num_clusters], ["arch", m.arch], ["batch", cfg.batch_size],
      ["data", typeof cfg.data === "object" && cfg.data ? (cfg.data.source || cfg.data.name || JSON.stringify(cfg.data)) : cfg.data],
    ];
    return items.filter(([, v]) => v !== undefined && v !== null && v !== "");
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
    for (const [k, v] of cfgSummary(job.config)) dl.append(el("dt", { text: k }), el("dd", { text: String(v) }));
    const links = el("p", { class: "actions" }, [
      job.model_id ? el("a", { class: "button", href: "/dashboard/models/" + encodeURIComponent(job.model_id), text: "Served model \u2192" }) : null,
      el("a", { class: "button secondary", href: "/dashboard/compare?a=" + encodeURIComponent(job.id), text: "Compare with another run" }),
    ]);
    clear(host).append(
      el("h1", {}, ["Job ", el("code", { text: job.id })]),
      dl,
      job.error ? el("p", { class: "error-box", role: "alert", text: (job.error.type || "error") + ": " + (job.error.message || "") }) : "",
      job.status === "QUEUED" && /no live worker/.test(job.status_detail || "")
        ? el("p", { class: "warn-box", role: "alert", id: "no-worker", text: job.status_detail }) : "",
      links);
    document.title = "Job " + Excb.shortId(job.id) + " \u00b7 excb dashboard";
    document.getElementById("job").setAttribute("data-status", job.status);
  }

  function buildCharts() {
    const host = clear(document.getElementById("charts"));
    state.charts = Excb.metricCharts(state.k).map((spec) => {
      const box = el("figure", { class: "card" });
      host.append(box);
      return new Excb.TimeChart(box, spec);
    });
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
    const every = state.job && state.job.config && state.job.config.histogram_every_steps;
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
        if (Excb.TERMINAL.has(job.status) && !wasTerminal) refetchMetrics().catch(() => {});
      },
      metrics: (row) => {
        if (row && row.type === "cluster_sizes") { setCurve(row); return; }
        state.sseRows += 1;
        document.getElementById("job").setAttribute("data-sse-rows", String(state.sseRows));
        addRows([row]);
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
      if (!state.k && state.rows.length) { state.k = Excb.numClusters(null, state.rows[0]); buildCharts(); addRows(state.rows); }
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
