/* One embedded corpus (an embedding job's output): /dashboard/corpora/{id}
 *   search      an uploaded image against the corpus index (POST /v1/search, multipart, corpus=id)
 *   dedup       near-duplicate groups (POST /v1/corpora/{id}/dedup): count, cosine range, a sample per group
 *   subset      N images even across the balanced clusters (POST /v1/corpora/{id}/subset), as a list: file
 * The index state comes from GET /v1/corpora/{id}/index; a corpus too big to index inside a request gets a
 * "Build the index" button (POST /v1/corpora/{id}/index). Thumbnails come inline as data: URIs (thumbs=true), read
 * by the server from the corpus's own files; the API key is the dashboard's (Authorization header). */
"use strict";

(function (Excb) {
  const { el, clear, api } = Excb;
  const id = decodeURIComponent(location.pathname.split("/").filter(Boolean)[2] || "");
  let searchId = id;  // the job's server id (GET .../index says it): what an embed service without the job store takes
  const base = "/v1/corpora/" + encodeURIComponent(id);
  const root = () => document.getElementById("corpus");

  function headers(json) {
    const h = { Accept: "application/json" };
    if (json) h["Content-Type"] = "application/json";
    try { const k = localStorage.getItem("excb.apiKey"); if (k) h.Authorization = "Bearer " + k; } catch (e) { /* private mode */ }
    return h;
  }

  /** POST a body (JSON object or FormData); the shared error shape becomes an Excb.ApiError. */
  async function post(path, body) {
    const form = body instanceof FormData;
    const resp = await fetch(path, { method: "POST", cache: "no-store", headers: headers(!form),
      body: form ? body : JSON.stringify(body || {}) });
    let doc = null;
    try { doc = await resp.json(); } catch (e) { /* not JSON */ }
    if (!resp.ok) {
      const err = (doc && doc.error) || {};
      throw new Excb.ApiError(resp.status, err.type || "http_" + resp.status, err.message || resp.statusText);
    }
    return doc;
  }

  function thumb(item) {
    const title = item.path + " (cluster " + item.balanced_cluster + ")";
    return item.thumbnail ? el("img", { class: "thumb", src: item.thumbnail, alt: title, title: title, loading: "lazy" })
      : el("div", { class: "thumb missing", title: title + ": file not readable" });
  }

  function hit(item, caption) {
    return el("li", { class: "hit", "data-row": String(item.row), "data-path": item.path }, [thumb(item),
      el("span", { class: "path", text: item.path.split("/").slice(-2).join("/"), title: item.path }), caption ? el("span", { class: "small muted", text: caption }) : null]);
  }

  function fail(where, err) {
    clear(document.getElementById(where)).append(Excb.emptyState("Could not finish", (err && err.message) || String(err)));
    document.getElementById(where).setAttribute("data-error", (err && err.type) || "error");
  }

  // --------------------------------------------------------------------------------------------- header
  async function header() {
    const info = await api(base + "/index");
    const m = info.meta || {};
    const facts = info.ready
      ? m.count + " images indexed \u00b7 " + m.index_type + (m.nlist ? " (nlist " + m.nlist + ", nprobe " + m.nprobe + ")" : " (exact)") +
        " \u00b7 built " + Excb.fmtTime(m.built_at)
      : "no search index yet: small corpora are indexed on first use, big ones need a build";
    const build = el("button", { type: "button", id: "build-index", text: info.ready ? "Rebuild the index" : "Build the index" });
    build.addEventListener("click", async () => {
      build.disabled = true;
      build.textContent = "Building\u2026";
      try { await post(base + "/index"); await header(); } catch (err) { fail("corpus-header", err); }
    });
    clear(document.getElementById("corpus-header")).append(el("h1", {}, ["Corpus ", el("code", { text: id })]),
      el("p", { class: "muted", id: "index-facts", text: facts + (info.corpus_status ? " \u00b7 job " + info.corpus_status : "") }), build);
    root().setAttribute("data-index", info.ready ? "ready" : "missing");
    searchId = info.server_id || id;
  }

  // --------------------------------------------------------------------------------------------- search
  async function search(ev) {
    ev.preventDefault();
    const out = clear(document.getElementById("search-results"));
    const file = document.getElementById("search-file").files[0];
    if (!file) return;
    const form = new FormData();
    form.append("file", file);
    form.append("corpus", searchId);
    form.append("k", document.getElementById("search-k").value || "12");
    form.append("thumbs", "true");
    out.append(el("p", { class: "muted", text: "Searching\u2026" }));
    try {
      const body = await post("/v1/search", form);
      clear(out).append(el("p", { class: "small muted", text: body.data.length + " nearest of " + body.indexed + " (" + body.usage.latency_ms + " ms)" }),
        el("ol", { class: "hits", id: "search-hits" }, body.data.map((r) => hit(r, "cosine " + Excb.fmtNum(r.score, 3)))));
      out.setAttribute("data-results", String(body.data.length));
    } catch (err) { fail("search-results", err); }
  }

  // ---------------------------------------------------------------------------------------------- dedup
  async function dedup(ev) {
    ev.preventDefault();
    const out = clear(document.getElementById("dedup-results"));
    out.append(el("p", { class: "muted", text: "Looking for near-duplicates\u2026" }));
    try {
      const threshold = Number(document.getElementById("dedup-threshold").value);
      const body = await post(base + "/dedup", { threshold: threshold, sample: 6, limit: 50, thumbs: true });
      const groups = body.data.map((g) => el("li", { class: "group", "data-count": String(g.count) }, [
        el("p", { class: "small" }, [el("strong", { text: g.count + " images" }), " \u00b7 cosine " + Excb.fmtNum(g.min_score, 3) +
          "\u2013" + Excb.fmtNum(g.max_score, 3) + " \u00b7 keep ", el("span", { class: "path", text: g.keep })]),
        el("ul", { class: "hits" }, g.sample.map((s) => hit({ ...s, balanced_cluster: "" }, null)))]));
      clear(out).append(el("p", { id: "dedup-summary", text: body.groups + " groups, " + body.images_in_groups + " images in them, " +
          body.removable + " removable (one kept per group) of " + body.indexed + " \u00b7 " + body.seconds + " s" }),
        body.groups ? el("ol", { class: "groups" }, groups) : Excb.emptyState("No near-duplicates", "No two images reach cosine " + threshold + "."));
      out.setAttribute("data-groups", String(body.groups));
    } catch (err) { fail("dedup-results", err); }
  }

  // --------------------------------------------------------------------------------------------- subset
  async function subset(ev) {
    ev.preventDefault();
    const out = clear(document.getElementById("subset-results"));
    out.append(el("p", { class: "muted", text: "Choosing\u2026" }));
    try {
      const body = await post(base + "/subset", { n: Number(document.getElementById("subset-n").value),
        strategy: document.getElementById("subset-strategy").value, name: document.getElementById("subset-name").value,
        preview: 24, thumbs: true });
      const download = el("button", { type: "button", id: "subset-download", text: "Download " + body.name + ".txt" });
      download.addEventListener("click", async () => {
        const resp = await fetch(body.download_url, { headers: headers(false), cache: "no-store" });
        const url = URL.createObjectURL(await resp.blob());
        const a = el("a", { href: url, download: body.name + ".txt" });
        document.body.append(a); a.click(); a.remove(); URL.revokeObjectURL(url);
      });
      clear(out).append(el("p", { id: "subset-summary", text: body.count + " images from " + body.clusters_used + " of " +
          body.clusters_total + " clusters, " + body.per_cluster_min + "\u2013" + body.per_cluster_max + " per cluster (" + body.strategy + ")" }),
        el("p", {}, ["Train on it: ", el("code", { text: "data=" + body.source }), " ", download]),
        el("ul", { class: "hits" }, body.preview.map((r) => hit(r, "cluster " + r.balanced_cluster))));
      out.setAttribute("data-count", String(body.count));
    } catch (err) { fail("subset-results", err); }
  }

  async function main() {
    document.getElementById("search-form").addEventListener("submit", search);
    document.getElementById("dedup-form").addEventListener("submit", dedup);
    document.getElementById("subset-form").addEventListener("submit", subset);
    try {
      await header();
      root().setAttribute("data-state", "ready");
    } catch (err) {
      clear(document.getElementById("corpus-header")).append(Excb.errorState(err, "Corpus"));
      root().setAttribute("data-state", "error");
    }
  }

  document.addEventListener("DOMContentLoaded", main);
})(window.Excb);
