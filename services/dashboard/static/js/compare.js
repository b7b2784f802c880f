/* Compare page (?a=<job>&b=<job>): both size curves overlaid and side by side, and the key balance signals
 * of the two runs overlaid (e.g. ExCB vs DINO centring, or two batch sizes). Running jobs update live. */
"use strict";

(function (Excb) {
  const { el, clear, api, PALETTE } = Excb;
  const RUNS = [{ slot: "a", color: PALETTE.blue, dash: undefined }, { slot: "b", color: PALETTE.orange, dash: [8, 4] }];

  const state = { jobs: {}, charts: [], overlay: null, single: {}, streams: [] };

  function runLabel(slot) {
    const job = state.jobs[slot];
    const run = Excb.runConfig(job), cfg = run.cfg;
    const m = cfg && cfg.balancing && cfg.balancing.method;
    const bs = cfg && (run.effective || cfg.recipe !== "auto") ? cfg.batch_size : null;  // a fitted batch is not known yet
    return slot.toUpperCase() + ": " + [m, bs ? "B=" + bs : null].filter(Boolean).join(", ");
  }

  async function renderPicker(a, b) {
    const host = clear(document.getElementById("picker"));
    let items = [];
    try { items = (await api("/v1/jobs?limit=100")).items || []; } catch (err) { host.append(Excb.errorState(err, "Jobs")); return; }
    if (items.length < 2) {
      host.append(Excb.emptyState("Two runs are needed to compare",
        "There " + (items.length === 1 ? "is one job" : "are no jobs") + " so far. Submit a second run, e.g. the same data with DINO centring:",
        "excb jobs submit job.yaml balancing.method=dino-centering"));
      return;
    }
    const select = (name, value) => el("select", { id: "pick-" + name, name }, items.map((j) => {
      const o = el("option", { value: j.id, text: Excb.shortId(j.id) + " \u00b7 " + j.status + " \u00b7 " + (((Excb.runConfig(j).cfg || {}).balancing || {}).method || "") });
      if (j.id === value) o.selected = true;
      return o;
    }));
    const form = el("form", { class: "picker", method: "get", action: "/dashboard/compare" }, [
      el("label", { for: "pick-a", text: "Run A" }), select("a", a || items[0].id),
      el("label", { for: "pick-b", text: "Run B" }), select("b", b || items[1].id),
      el("button", { type: "submit", text: "Compare" }),
    ]);
    host.append(form);
  }

  function head(slot) {
    const job = state.jobs[slot];
    const row = job.latest_metrics;
    const k = Excb.numClusters(job, row);
    return el("div", { class: "card run-head", "data-slot": slot, "data-job-id": job.id }, [
      el("h2", {}, [el("span", { class: "swatch swatch-" + slot, "aria-hidden": "true" }), runLabel(slot) + " ",
        el("a", { href: "/dashboard/jobs/" + encodeURIComponent(job.id) }, [el("code", { text: Excb.shortId(job.id) })])]),
      el("p", {}, [Excb.statusBadge(job.status), " ", Excb.healthBadge(Excb.health(row, k)), " ", Excb.progressBar(job.progress)]),
    ]);
  }

  function renderHeads() {
    const host = clear(document.getElementById("cmp-heads"));
    host.append(head("a"), head("b"));
  }

  function buildCharts() {
    state.overlay = new Excb.CurveChart(document.getElementById("cmp-curve"), {
      id: "cmp_cluster_sizes", title: "Relative cluster size K\u00b7s, sorted (log)",
      help: "Closer to the uniform line at 1 over more of the rank range = better balanced. Empty clusters are marked at the floor.",
      curves: RUNS.map((r) => ({ id: r.slot, label: runLabel(r.slot), color: r.color, dash: r.dash, markEmpty: true })), height: 320,
    });
    for (const r of RUNS) {
      state.single[r.slot] = new Excb.CurveChart(document.getElementById("curve-" + r.slot), {
        id: "curve_" + r.slot, title: runLabel(r.slot),
        curves: [{ id: "latest", label: "latest", color: r.color, markEmpty: true }], height: 240,
      });
    }
    const host = clear(document.getElementById("cmp-charts"));
    state.charts = Excb.compareCharts().map((c) => {
      const box = el("figure", { class: "card" });
      host.append(box);
      return new Excb.TimeChart(box, {
        id: c.id, title: c.title, include: c.include, zeroBased: c.zeroBased,
        series: RUNS.map((r) => ({ key: c.key, value: c.value, label: runLabel(r.slot), color: r.color, dash: r.dash, source: r.slot })),
      });
    });
  }

  function setCurve(slot, curve) {
    state.overlay.setCurve(slot, curve);
    state.single[slot].setCurve("latest", curve);
  }

  function addRows(slot, rows) {
    const fresh = Excb.stepRows(rows);
    if (fresh.length) for (const c of state.charts) c.addRows(fresh, slot);
  }

  function connect(slot) {
    const job = state.jobs[slot];
    if (Excb.TERMINAL.has(job.status)) return;
    state.streams.push(Excb.streamEvents("/v1/jobs/" + encodeURIComponent(job.id) + "/events", {
      status: (j) => { if (j && j.id) { state.jobs[slot] = j; renderHeads(); } },
      metrics: (row) => { if (row && row.type === "cluster_sizes") setCurve(slot, row); else addRows(slot, [row]); },
      cluster_sizes: (curve) => setCurve(slot, curve),
    }, { shouldReconnect: () => !Excb.TERMINAL.has(state.jobs[slot].status) }));
  }

  async function loadRun(slot) {
    const id = state.jobs[slot].id;
    addRows(slot, await Excb.allMetrics(id));
    try { setCurve(slot, await api("/v1/jobs/" + encodeURIComponent(id) + "/cluster-sizes")); }
    catch (err) {
      if (err.status !== 404) throw err;
      state.single[slot].setEmptyText("No cluster-size snapshot for this run yet; it appears once the job logs one.");
    }
  }

  async function main() {
    const params = new URLSearchParams(location.search);
    const a = params.get("a"), b = params.get("b");
    const root = document.getElementById("compare");
    await renderPicker(a, b);
    if (!a || !b) {
      root.setAttribute("data-state", "picking");
      for (const id of ["cmp-heads", "cmp-curve", "curve-a", "curve-b", "cmp-charts"]) document.getElementById(id).closest("section").hidden = true;
      return;
    }
    try {
      const [ja, jb] = await Promise.all([api("/v1/jobs/" + encodeURIComponent(a)), api("/v1/jobs/" + encodeURIComponent(b))]);
      state.jobs = { a: ja, b: jb };
    } catch (err) {
      root.setAttribute("data-state", "error");
      document.getElementById("picker").append(Excb.errorState(err, "Job"));
      return;
    }
    renderHeads();
    buildCharts();
    await Promise.all(RUNS.map((r) => loadRun(r.slot).catch((err) => console.warn(r.slot, err))));
    root.setAttribute("data-state", "ready");
    for (const r of RUNS) connect(r.slot);
  }

  document.addEventListener("DOMContentLoaded", main);
})(window.Excb);
