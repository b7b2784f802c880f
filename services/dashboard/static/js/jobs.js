/* Landing page: the jobs table (status, progress, ETA, attempt, balance health) and the served models.
 * Polls the API every few seconds; the per-job page is the live (SSE) view. */
"use strict";

(function (Excb) {
  const { el, clear, api } = Excb;
  const POLL_MS = 3000;
  const selected = new Set();

  const SUBMIT_HINT = "curl -X POST " + location.origin + "/v1/jobs -H 'content-type: application/json' \\\n" +
    "     -d '{\"preset\": \"cpu-small\", \"data\": \"digits\", \"max_steps\": 200}'\n" +
    "# or, with the same YAML that `excb train --config` reads:\n" +
    "excb jobs submit job.yaml max_steps=200";

  function jobRow(job) {
    const p = job.progress || {};
    const k = Excb.numClusters(job, job.latest_metrics);
    const box = el("input", { type: "checkbox", "aria-label": "select " + job.id + " for comparison", value: job.id });
    box.checked = selected.has(job.id);
    box.addEventListener("change", () => { if (box.checked) selected.add(job.id); else selected.delete(job.id); updateCompare(); });
    const run = Excb.runConfig(job);
    const method = run.cfg && run.cfg.balancing && run.cfg.balancing.method;
    const kText = k ? "K=" + k : (run.cfg && run.cfg.recipe === "auto" ? "K fitted when it starts" : null);
    return el("tr", { "data-job-id": job.id, "data-status": job.status }, [
      el("td", {}, [box]),
      el("th", { scope: "row" }, [el("a", { href: "/dashboard/jobs/" + encodeURIComponent(job.id), title: job.id }, [el("code", { text: Excb.shortId(job.id) })]),
        job.name ? el("span", { class: "job-name", text: job.name }) : null]),
      el("td", { title: job.status_detail || null }, [Excb.statusBadge(job.status)]),
      el("td", { class: "col-progress" }, [Excb.progressBar(p)]),
      el("td", { text: Excb.TERMINAL.has(job.status) ? "\u2013" : Excb.fmtEta(p.eta_seconds) }),
      el("td", { class: "num", text: String(job.attempt === undefined ? "\u2013" : job.attempt) }),
      el("td", {}, [Excb.healthBadge(Excb.health(job.latest_metrics, k))]),
      el("td", { class: "col-hide-sm", "data-k": k ? String(k) : null, text: [method, kText].filter(Boolean).join(", ") || "\u2013" }),
      el("td", { class: "col-hide-sm", text: Excb.fmtTime(job.created_at) }),
    ]);
  }

  let lastJobs = null;

  function renderJobs(items) {
    // Re-render only on change: a rebuilt table every poll would steal keyboard focus from the checkboxes.
    const digest = JSON.stringify(items.map((j) => [j.id, j.status, j.attempt, j.progress, j.latest_metrics && j.latest_metrics.step, j.status_detail, !!j.effective]));
    if (digest === lastJobs) return;
    lastJobs = digest;
    const host = clear(document.getElementById("jobs"));
    host.setAttribute("data-count", String(items.length));
    host.setAttribute("data-state", items.length ? "ready" : "empty");
    if (!items.length) {
      host.append(Excb.emptyState("No training jobs yet",
        "Submit one from the command line or the API; it appears here within a few seconds and its page shows live charts.", SUBMIT_HINT));
      return;
    }
    const head = ["", "job", "status", "progress", "ETA", "attempt", "balance", "run", "created"];
    const table = el("table", { class: "jobs" }, [
      el("caption", { class: "sr-only", text: "Training jobs, newest first" }),
      el("thead", {}, [el("tr", {}, head.map((h, i) => el("th", { scope: "col", class: i >= 7 ? "col-hide-sm" : null, text: h })))]),
      el("tbody", {}, items.map(jobRow)),
    ]);
    // Queued jobs that no live worker will pick up: say so above the table instead of letting them look normal.
    const stuck = items.find((j) => j.status === "QUEUED" && /no live worker/.test(j.status_detail || ""));
    if (stuck) host.append(el("p", { class: "warn-box", role: "alert", id: "no-worker", text: stuck.status_detail }));
    host.append(el("div", { class: "table-wrap" }, [table]));
  }

  function renderModels(items) {
    const host = clear(document.getElementById("models"));
    host.setAttribute("data-count", String(items.length));
    host.setAttribute("data-state", items.length ? "ready" : "empty");
    if (!items.length) {
      host.append(Excb.emptyState("No models yet",
        "A job that finishes successfully is exported to ONNX and registered here; open it to watch the balance of the traffic it serves."));
      return;
    }
    const table = el("table", { class: "models" }, [
      el("thead", {}, [el("tr", {}, ["model", "status", "job", "K", "created"].map((h) => el("th", { scope: "col", text: h })))]),
      el("tbody", {}, items.map((m) => el("tr", { "data-model-id": m.id }, [
        el("th", { scope: "row" }, [el("a", { href: "/dashboard/models/" + encodeURIComponent(m.id), title: m.id }, [el("code", { text: Excb.shortId(m.id) })])]),
        el("td", {}, [Excb.statusBadge(m.status)]),
        el("td", {}, [m.job_id ? el("a", { href: "/dashboard/jobs/" + encodeURIComponent(m.job_id) }, [el("code", { text: Excb.shortId(m.job_id) })]) : "\u2013"]),
        el("td", { class: "num", text: String((m.model_json && (m.model_json.num_clusters || m.model_json.K)) || "\u2013") }),
        el("td", { text: Excb.fmtTime(m.created_at) }),
      ]))),
    ]);
    host.append(el("div", { class: "table-wrap" }, [table]));
  }

  function updateCompare() {
    const link = document.getElementById("compare-link");
    const ids = Array.from(selected);
    const ok = ids.length === 2;
    link.classList.toggle("disabled", !ok);
    link.setAttribute("aria-disabled", ok ? "false" : "true");
    link.href = ok ? "/dashboard/compare?a=" + encodeURIComponent(ids[0]) + "&b=" + encodeURIComponent(ids[1]) : "/dashboard/compare";
    document.getElementById("compare-hint").textContent = ok ? "" : "Tick two jobs (" + ids.length + " ticked) to compare their cluster balance side by side.";
  }

  async function refresh() {
    const stamp = document.getElementById("refresh");
    try {
      const jobs = await api("/v1/jobs?limit=100");
      renderJobs(jobs.items || []);
      stamp.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      lastJobs = null;
      const host = clear(document.getElementById("jobs"));
      host.setAttribute("data-state", "error");
      host.append(Excb.errorState(err, "Jobs"));
    }
    try {
      const models = await api("/v1/models");
      renderModels(models.items || models || []);
    } catch (err) {
      const host = clear(document.getElementById("models"));
      host.setAttribute("data-state", "error");
      host.append(Excb.errorState(err, "Models"));
    }
  }

  async function loop() {
    await refresh();
    setTimeout(loop, document.hidden ? POLL_MS * 5 : POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => { updateCompare(); loop(); });
})(window.Excb);
