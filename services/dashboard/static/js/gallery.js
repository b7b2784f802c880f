/* Cluster gallery of a model (three views, one page, chosen by the URL):
 *   /dashboard/models/{id}/clusters            every cluster: size against uniform, training and served share,
 *                                              a strip of its most typical images; ordered by size or drift
 *   /dashboard/models/{id}/clusters/{c}        one cluster: members nearest the centroid, then its edge
 *   /dashboard/models/{id}/similar/{image}     "more like this": the nearest indexed images to one image
 * Everything comes from the embed service's index routes (GET .../clusters, POST /v1/search) with the same API
 * key as the rest of the dashboard; thumbnails arrive inline as data: URIs (thumbs=true), never from the data
 * folder, so the page needs no other origin and no cookie. */
"use strict";

(function (Excb) {
  const { el, clear, api } = Excb;
  const PAGE = 200;          // clusters per request (K may be 65536)
  const TYPICAL = 8;         // thumbnails per cluster strip
  const MEMBERS = 48;        // members nearest the centroid on a cluster page
  const EDGE = 12;           // members from the far end
  const SIMILAR_K = 10;

  function route() {
    const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
    // ["dashboard", "models", id, "clusters" | "similar", x?]
    const q = new URLSearchParams(location.search);
    return { model: parts[2], view: parts[3] === "similar" ? "similar" : parts[4] !== undefined ? "cluster" : "gallery",
             arg: parts[4], index: q.get("index") || "default", order: q.get("order") === "drift" ? "drift" : "size" };
  }

  const R = route();
  const root = () => document.getElementById("gallery");
  const base = "/dashboard/models/" + encodeURIComponent(R.model);
  const idxQ = "index=" + encodeURIComponent(R.index);

  function similarHref(id) { return base + "/similar/" + id + (R.index !== "default" ? "?" + idxQ : ""); }
  function clusterHref(c) { return base + "/clusters/" + c + (R.index !== "default" ? "?" + idxQ : ""); }

  function crumbs(extra) {
    const items = [el("a", { href: "/dashboard/models/" + encodeURIComponent(R.model) }, ["Model ", el("code", { text: R.model })]),
      el("a", { href: base + "/clusters" + (R.index !== "default" ? "?" + idxQ : "") }, ["Clusters"])].concat(extra || []);
    const nav = clear(document.getElementById("crumbs"));
    items.forEach((it, i) => { if (i) nav.append(" \u203a "); nav.append(it); });
  }

  function thumb(item, big) {
    const label = item.label !== null && item.label !== undefined ? "label " + item.label + ", " : "";
    const title = "image " + item.id + " (" + label + "cluster " + item.cluster + ", similarity " + Excb.fmtNum(item.similarity, 3) +
      (item.score !== undefined ? ", score " + Excb.fmtNum(item.score, 3) : "") + ") \u2013 more like this";
    const img = el("img", { class: "thumb" + (big ? " big" : ""), src: item.thumbnail, alt: title, title: title, loading: "lazy",
      "data-image-id": String(item.id), "data-cluster": String(item.cluster), "data-label": item.label === null ? "" : String(item.label) });
    return el("a", { class: "thumb-link", href: similarHref(item.id), "data-image-id": String(item.id) }, [img]);
  }

  /** Relative size as a bar: the line marks uniform (1x); the bar is capped at 4x so one giant does not flatten the rest. */
  function sizeBar(rel, status) {
    const pct = Math.min(rel, 4) / 4 * 100;
    return el("div", { class: "sizebar", role: "img", "aria-label": Excb.fmtNum(rel, 2) + " \u00d7 uniform" }, [
      el("div", { class: "sizebar-fill st-" + status, style: "width:" + pct.toFixed(1) + "%" }),
      el("div", { class: "sizebar-uniform", title: "uniform share (1\u00d7)" })]);
  }

  function statusBadge(status) {
    if (status === "ok") return null;
    return el("span", { class: "badge cl-" + status, text: status === "empty" ? "empty" : "over-full" });
  }

  function pct(v) { return Excb.fmtPct(100 * v); }

  // ------------------------------------------------------------------------------------------ gallery view
  function clusterCard(c, served) {
    const head = el("div", { class: "cluster-head" }, [
      el("a", { class: "cluster-link", href: clusterHref(c.id) }, ["Cluster ", el("strong", { text: String(c.id) })]),
      statusBadge(c.status),
      el("span", { class: "muted small", text: c.size + (c.size === 1 ? " image" : " images") + " \u00b7 " + Excb.fmtNum(c.relative_size, 2) + "\u00d7 uniform" })]);
    const facts = el("p", { class: "cluster-facts small muted" }, [
      "index " + pct(c.share) + " \u00b7 training " + pct(c.training_share) +
      (served ? " \u00b7 served " + pct(c.served_share) + " (" + (c.drift >= 0 ? "+" : "") + pct(c.drift) + ")" : " \u00b7 no served traffic")]);
    const strip = c.typical.length ? el("div", { class: "strip" }, c.typical.map((t) => thumb(t)))
      : el("p", { class: "strip-empty", text: "no indexed image went to this cluster" });
    return el("article", { class: "cluster-card st-" + c.status, "data-cluster-id": String(c.id), "data-size": String(c.size),
      "data-status": c.status, "data-served-share": String(c.served_share) }, [head, sizeBar(c.relative_size, c.status), facts, strip]);
  }

  async function gallery() {
    crumbs([]);
    const q = "?" + idxQ + "&order=" + R.order + "&typical=" + TYPICAL + "&thumbs=true&limit=" + PAGE;
    const first = await api("/v1/models/" + encodeURIComponent(R.model) + "/clusters" + q);
    const info = await api("/v1/models/" + encodeURIComponent(R.model) + "/index?" + idxQ);
    const meta = info.meta || {};
    const served = first.served_assignments > 0;
    const orderLinks = ["size", "drift"].map((o) => o === R.order ? el("strong", { text: o === "size" ? "by size" : "by drift in served traffic" })
      : el("a", { href: base + "/clusters?order=" + o + (R.index !== "default" ? "&" + idxQ : ""), text: o === "size" ? "by size" : "by drift in served traffic" }));
    clear(document.getElementById("gallery-header")).append(
      el("h1", {}, ["Clusters of ", el("code", { text: R.model })]),
      el("p", { class: "muted" }, [first.indexed + " indexed images (" + (meta.origin === "job" ? "the job's training images" : "images of " + (meta.source || "a folder")) +
        ", a seeded sample of at most " + (meta.sample_cap || "?") + ") in " + first.num_clusters + " clusters \u00b7 " +
        first.empty + " empty \u00b7 " + first.over_full + " over-full (\u2265 2\u00d7 uniform) \u00b7 " +
        (served ? first.served_assignments + " served assignments" : "no served traffic yet")]),
      el("p", { class: "order" }, ["Order: ", orderLinks[0], " \u00b7 ", orderLinks[1]]));
    const list = el("div", { class: "clusters", id: "cluster-list" }, first.data.map((c) => clusterCard(c, served)));
    clear(document.getElementById("gallery-body")).append(list);
    let offset = first.data.length;
    if (offset < first.num_clusters) {
      const more = el("button", { type: "button", class: "more", text: "Show more clusters" });
      more.addEventListener("click", async () => {
        const page = await api("/v1/models/" + encodeURIComponent(R.model) + "/clusters" + q + "&offset=" + offset);
        page.data.forEach((c) => list.append(clusterCard(c, served)));
        offset += page.data.length;
        if (offset >= first.num_clusters) more.remove();
      });
      document.getElementById("gallery-body").append(more);
    }
    root().setAttribute("data-clusters", String(first.num_clusters));
    root().setAttribute("data-shown", String(first.data.length));
  }

  // ------------------------------------------------------------------------------------------ cluster view
  async function cluster() {
    const c = Number(R.arg);
    crumbs([el("span", { text: "Cluster " + R.arg })]);
    const body = await api("/v1/models/" + encodeURIComponent(R.model) + "/clusters/" + encodeURIComponent(R.arg) +
      "?" + idxQ + "&nearest=" + MEMBERS + "&edge=" + EDGE + "&thumbs=true");
    clear(document.getElementById("gallery-header")).append(
      el("h1", {}, ["Cluster " + c + " ", statusBadge(body.status)]),
      sizeBar(body.relative_size, body.status),
      el("p", { class: "muted" }, [body.size + " of " + body.indexed + " indexed images (" + Excb.fmtNum(body.relative_size, 2) +
        "\u00d7 uniform) \u00b7 training share " + pct(body.training_share) + " \u00b7 served share " + pct(body.served_share)]));
    const section = (title, help, items, id) => el("section", { id: id }, [el("h2", { text: title }), el("p", { class: "muted small", text: help }),
      items.length ? el("div", { class: "grid-thumbs" }, items.map((t) => thumb(t, true))) : el("p", { class: "strip-empty", text: "none" })]);
    clear(document.getElementById("gallery-body")).append(
      section("Nearest the centroid", "The most typical members, most similar to the cluster's centroid first.", body.nearest, "members-nearest"),
      section("At the edge", "The members least similar to the centroid: what the cluster barely holds.", body.edge, "members-edge"));
    root().setAttribute("data-cluster-id", String(c));
    root().setAttribute("data-size", String(body.size));
  }

  // ------------------------------------------------------------------------------------------ similar view
  async function similar() {
    const id = Number(R.arg);
    const query = await api("/v1/models/" + encodeURIComponent(R.model) + "/index/images/" + encodeURIComponent(R.arg) + "?" + idxQ + "&thumbs=true");
    crumbs([el("a", { href: clusterHref(query.cluster), text: "Cluster " + query.cluster }), el("span", { text: "More like image " + id })]);
    const resp = await fetch("/v1/search", { method: "POST", cache: "no-store",
      headers: Object.assign(authHeadersJson()), body: JSON.stringify({ model: R.model, index: R.index, image_id: id, k: SIMILAR_K, thumbs: true }) });
    const body = await resp.json();
    if (!resp.ok) throw new Excb.ApiError(resp.status, (body.error || {}).type, (body.error || {}).message || "search failed");
    clear(document.getElementById("gallery-header")).append(
      el("h1", { text: "More like this" }),
      el("div", { class: "query" }, [thumb(query, true), el("p", { class: "muted" }, ["image " + id + (query.label !== null ? " \u00b7 label " + query.label : "") +
        " \u00b7 cluster ", el("a", { href: clusterHref(query.cluster), text: String(query.cluster) })])]));
    const same = body.data.filter((r) => query.label !== null && r.label === query.label).length;
    const results = el("ol", { class: "results" }, body.data.map((r) => el("li", { class: "result", "data-image-id": String(r.id),
      "data-label": r.label === null ? "" : String(r.label), "data-cluster": String(r.cluster), "data-score": String(r.score) },
      [thumb(r, true), el("span", { class: "small muted", text: Excb.fmtNum(r.score, 3) + (r.label !== null ? " \u00b7 " + r.label : "") })])));
    clear(document.getElementById("gallery-body")).append(el("h2", { text: "The " + body.data.length + " nearest indexed images" }),
      query.label !== null ? el("p", { class: "muted", id: "same-label" }, [same + " of " + body.data.length + " share the query's label"]) : "", results);
    root().setAttribute("data-image-id", String(id));
    root().setAttribute("data-results", String(body.data.length));
    root().setAttribute("data-same-label", String(same));
  }

  function authHeadersJson() {
    const h = { "Content-Type": "application/json", Accept: "application/json" };
    try { const k = localStorage.getItem("excb.apiKey"); if (k) h.Authorization = "Bearer " + k; } catch (e) { /* private mode */ }
    return h;
  }

  async function main() {
    root().setAttribute("data-view", R.view);
    try {
      if (R.view === "gallery") await gallery();
      else if (R.view === "cluster") await cluster();
      else await similar();
      root().setAttribute("data-state", "ready");
    } catch (err) {
      const notIndexed = err && err.type === "index_not_found";
      clear(document.getElementById("gallery-body")).append(notIndexed
        ? Excb.emptyState("This model has no image index yet",
          "A job's model gets one when the job finishes; any folder under the data roots can be indexed too:",
          "excb index build FOLDER --model " + R.model)
        : Excb.errorState(err, "the cluster gallery"));
      root().setAttribute("data-state", notIndexed ? "no-index" : "error");
    }
  }

  document.addEventListener("DOMContentLoaded", main);
})(window.Excb);
