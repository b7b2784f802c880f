/* Model page: balance of the traffic a served model has assigned, and how far it drifted from training.
 * Polls GET /v1/models/{id}/balance (the embed service's live monitor; statistics from excb/method/stats.py). */
"use strict";

(function (Excb) {
  const { el, clear, api, PALETTE } = Excb;
  const POLL_MS = 3000;
  const state = { id: null, model: null, curve: null, drift: null, polls: 0 };

  function kOf(model) {
    const mj = (model && model.model_json) || {};
    return mj.num_clusters || mj.K || null;
  }

  function archText(arch) {
    if (!arch) return "\u2013";
    if (typeof arch !== "object") return String(arch);
    return [arch.backbone, arch.width ? "width " + arch.width : null].filter(Boolean).join(", ") || "\u2013";
  }

  function renderHeader() {
    const m = state.model, mj = m.model_json || {};
    const facts = [["status", Excb.statusBadge(m.status)], ["job", m.job_id ? el("a", { href: "/dashboard/jobs/" + encodeURIComponent(m.job_id) }, [el("code", { text: m.job_id })]) : "\u2013"],
      ["K", String(kOf(m) || "\u2013")], ["embed dim", String(mj.embed_dim || "\u2013")], ["arch", archText(mj.arch)],
      ["sha256", el("code", { text: (m.sha256 || "").slice(0, 16) || "\u2013" })], ["created", Excb.fmtTime(m.created_at)]];
    const dl = el("dl", { class: "facts" });
    for (const [k, v] of facts) dl.append(el("dt", { text: k }), el("dd", {}, [v]));
    const gallery = el("p", {}, [el("a", { id: "gallery-link", href: "/dashboard/models/" + encodeURIComponent(m.id) + "/clusters" },
      ["Cluster gallery and similar-image search"])]);
    clear(document.getElementById("model-header")).append(el("h1", {}, ["Model ", el("code", { text: m.id })]), dl, gallery);
  }

  function stat(label, value, help) {
    return el("div", { class: "stat", title: help || "" }, [el("span", { class: "stat-label", text: label }), el("span", { class: "stat-value", text: value })]);
  }

  /** Sampling noise alone makes TV of an n-sample histogram over K clusters about sqrt(K / (2*pi*n)). */
  function tvNoise(k, n) { return k && n ? Math.sqrt(k / (2 * Math.PI * n)) : null; }

  function driftReading(tv, noise) {
    if (tv === null || tv === undefined) return "no reading";
    if (noise !== null && tv <= 1.5 * noise) return "within sampling noise of training";
    if (tv < 0.1) return "close to training";
    if (tv < 0.3) return "drifting";
    return "far from training";
  }

  const ROWS = [
    ["effective clusters", (st) => Excb.fmtNum(st.effective_clusters, 1), "exp(entropy): K when balanced, 1 when one cluster takes everything"],
    ["normalised entropy", (st) => Excb.fmtNum(st.normalized_entropy), "1 = every cluster equally used"],
    ["empty clusters", (st) => Excb.fmtPct(100 * st.empty_fraction), "served: clusters no image in the window went to; training: K\u00b7s < 0.01"],
    ["largest cluster (\u00d7 uniform)", (st) => Excb.fmtNum(st.max_share * st.num_clusters, 2), "largest share \u00d7 K"],
    ["Gini", (st) => Excb.fmtNum(st.gini), "0 = balanced, 1 = one cluster"],
    ["K\u00b7s p01 / p50 / p99", (st) => [st.rel_size_p01, st.rel_size_p50, st.rel_size_p99].map((v) => Excb.fmtNum(v, 2)).join(" / "), "quantiles of the relative size"],
  ];

  function statsTable(bal) {
    const cols = [["served (balanced)", bal.served], ["served (raw argmax)", bal.served_raw], ["training (final s)", bal.training]]
      .filter(([, st]) => st);
    return el("div", { class: "table-wrap" }, [el("table", { class: "balance" }, [
      el("thead", {}, [el("tr", {}, [el("th", { scope: "col", text: "statistic" })].concat(cols.map(([h]) => el("th", { scope: "col", text: h }))))]),
      el("tbody", {}, ROWS.map(([label, f, help]) => el("tr", {}, [el("th", { scope: "row", title: help, text: label })]
        .concat(cols.map(([, st]) => el("td", { class: "num", text: f(st) })))))),
    ])]);
  }

  function renderServed(bal) {
    const host = clear(document.getElementById("served"));
    const n = typeof bal.assignments === "number" ? bal.assignments : (bal.served && bal.served.total) || 0;
    const root = document.getElementById("model");
    root.setAttribute("data-served", String(n));
    if (!bal.served || n <= 0) {
      host.append(Excb.emptyState("No served traffic yet",
        "This model has not assigned any images since the embed service started. Send a few and this page fills in within seconds:",
        "curl -F files=@image.jpg -F model=" + state.id + " " + location.origin + "/v1/embed"));
      return;
    }
    const k = bal.served.num_clusters || kOf(state.model);
    const noise = tvNoise(k, n);
    const d = bal.drift || {};
    host.append(
      el("div", { class: "stats drift", "data-drift-tv": String(d.tv) }, [
        stat("images in window", String(n) + (bal.window ? " / " + bal.window : ""), "assignments the monitor currently holds"),
        stat("drift TV", Excb.fmtNum(d.tv), "total-variation distance to the training distribution (0 = same, 1 = disjoint)"),
        stat("drift JS", Excb.fmtNum(d.js), "Jensen-Shannon divergence in nats (max log 2 \u2248 0.693)"),
        stat("drift KL", Excb.fmtNum(d.kl), "KL(served \u2016 training), smoothed"),
        stat("reading", driftReading(d.tv, noise), noise ? "with " + n + " images over " + k + " clusters, sampling noise alone gives TV \u2248 " + Excb.fmtNum(noise, 2) : ""),
      ]),
      statsTable(bal));
  }

  function renderCurves(bal) {
    state.curve.setCurve("training", bal && bal.training_curve ? Object.assign({ step: "final" }, bal.training_curve) : null);
    const served = bal && bal.served && bal.assignments > 0 ? bal.served_curve : null;
    state.curve.setCurve("served", served ? Object.assign({ step: "live" }, served) : null);
  }

  function recordDrift(bal) {
    if (!bal || !bal.drift || !(bal.assignments > 0)) return;
    state.drift.addRows([{ t: Date.now() / 1000, tv: bal.drift.tv, js: bal.drift.js }]);
  }

  async function poll() {
    try {
      const bal = await api("/v1/models/" + encodeURIComponent(state.id) + "/balance");
      renderServed(bal);
      renderCurves(bal);
      recordDrift(bal);
      document.getElementById("model-refresh").textContent = "updated " + new Date().toLocaleTimeString();
      document.getElementById("model").setAttribute("data-state", "ready");
    } catch (err) {
      const host = clear(document.getElementById("served"));
      if (err.status === 404 || err.status === 503) {
        host.append(Excb.emptyState("Balance not available", err.message +
          ". The model may not be loaded by the embed service yet (it loads READY models at start or on rescan); this page retries."));
      } else host.append(Excb.errorState(err, "Balance"));
      document.getElementById("model").setAttribute("data-state", "no-balance");
    }
    state.polls += 1;
    setTimeout(poll, document.hidden ? POLL_MS * 5 : POLL_MS);
  }

  async function main() {
    state.id = Excb.pathId("/dashboard/models/");
    const root = document.getElementById("model");
    try { state.model = await api("/v1/models/" + encodeURIComponent(state.id)); }
    catch (err) { root.setAttribute("data-state", "error"); clear(root).append(Excb.errorState(err, "Model")); return; }
    renderHeader();
    state.curve = new Excb.CurveChart(document.getElementById("model-curve"), {
      id: "served_sizes", title: "Relative cluster size K\u00b7s, sorted (log)",
      help: "Training: the final size estimate s of the run. Served: the assignments of recent traffic. Similar curves = traffic looks like the training data.",
      curves: [{ id: "served", label: "served", color: PALETTE.vermillion, markEmpty: true },
               { id: "training", label: "training", color: PALETTE.blue, dash: [6, 3] }],
      emptyText: "No served traffic yet: the served curve appears after the first /v1/embed request.", height: 280,
    });
    state.drift = new Excb.TimeChart(document.getElementById("drift-chart"), {
      id: "drift", title: "Drift over time", xTime: true, xKey: "t", emptyText: "Drift is sampled every few seconds once the model serves traffic.",
      help: "Total-variation distance and Jensen-Shannon divergence of served assignments vs training.",
      series: [{ key: "tv", label: "TV", color: PALETTE.vermillion }, { key: "js", label: "JS (nats)", color: PALETTE.blue, dash: [6, 3] }],
    });
    poll();
  }

  document.addEventListener("DOMContentLoaded", main);
})(window.Excb);
