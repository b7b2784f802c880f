/* Chart wrappers around the vendored uPlot: step-indexed time series and the sorted cluster-size curve.
 * Each chart keeps its own copy of the data and records how many points it draws in data-points (and
 * data-points-<source>) on its container, so a reader or a browser test can check it against the API. */
"use strict";

(function (Excb) {
  const { el, PALETTE } = Excb;
  const CURVE_FLOOR = 2e-3;  // where empty clusters (K*s < 0.01, possibly exactly 0) are drawn on the log axis
  const CURVE_AXIS_MIN = 1e-3;  // bottom of the log axis: one decade, so the floor sits visibly inside the empty band

  function chartWidth(node) { return Math.max(260, Math.floor(node.clientWidth || node.getBoundingClientRect().width || 320)); }

  /** Dashed horizontal reference lines with a small label (uniform share, 1/K, K, log K ...). */
  function refLinesHook(refs) {
    return (u) => {
      const ctx = u.ctx, dpr = window.devicePixelRatio || 1;
      for (const ref of refs()) {
        if (ref.value === null || ref.value === undefined || !isFinite(ref.value)) continue;
        const y = Math.round(u.valToPos(ref.value, ref.scale || "y", true));
        if (y < u.bbox.top - 1 || y > u.bbox.top + u.bbox.height + 1) continue;
        ctx.save();
        ctx.strokeStyle = ref.color || PALETTE.black;
        ctx.lineWidth = dpr;
        ctx.setLineDash([6 * dpr, 4 * dpr]);
        ctx.beginPath();
        ctx.moveTo(u.bbox.left, y);
        ctx.lineTo(u.bbox.left + u.bbox.width, y);
        ctx.stroke();
        ctx.setLineDash([]);
        ctx.fillStyle = ref.color || PALETTE.black;
        ctx.font = Math.round(11 * dpr) + "px system-ui, sans-serif";
        ctx.textAlign = "right";
        ctx.textBaseline = "alphabetic";
        ctx.fillText(ref.label, u.bbox.left + u.bbox.width - 4 * dpr, y - 4 * dpr);
        ctx.restore();
      }
    };
  }

  /** Shared frame: a figure with title, help text, the plot and an empty-state overlay. */
  function frame(container, spec) {
    container.classList.add("chart-card");
    if (spec.id) container.setAttribute("data-chart", spec.id);
    container.setAttribute("data-points", "0");
    const plot = el("div", { class: "plot" });
    const empty = el("p", { class: "chart-empty", role: "status", text: spec.emptyText || "Waiting for the first logged step\u2026" });
    const caption = el("p", { class: "chart-caption" });
    Excb.clear(container).append(
      el("h3", { class: "chart-title", text: spec.title }),
      spec.help ? el("p", { class: "chart-help", text: spec.help }) : "",
      plot, empty, caption);
    return { plot, empty, caption };
  }

  /** Linear-axis tick labels: short, and small values (learning rates) in exponent form so they stay distinct. */
  function tickLabels(u, ticks) {
    return ticks.map((t) => {
      if (t === null || t === undefined) return "";
      if (t !== 0 && Math.abs(t) < 0.01) return t.toExponential(1);
      return String(Number(t.toPrecision(4)));
    });
  }

  class TimeChart {
    /** spec: {id, title, help, series: [{key | value(row), label, color, dash, source, scale}],
     *         yLabel, y2Label, refs: [{value, label, color}] | () => refs, include: () => [values], xTime, height} */
    constructor(container, spec) {
      this.container = container;
      this.spec = spec;
      this.sources = new Map();
      this.parts = frame(container, spec);
      container.excbChart = this;  // inspectable from devtools and the browser tests
      this.u = null;
      this.pending = false;
      new ResizeObserver(() => { if (this.u) this.u.setSize({ width: chartWidth(this.parts.plot), height: spec.height || 200 }); })
        .observe(this.parts.plot);
    }

    _refs() { const r = this.spec.refs; return typeof r === "function" ? r() : (r || []); }

    _options() {
      const spec = this.spec;
      const hasY2 = spec.series.some((s) => s.scale === "y2");
      const include = () => (spec.include ? spec.include() : []).concat(this._refs().map((r) => r.value)).filter((v) => v !== null && v !== undefined && isFinite(v));
      const yRange = (u, min, max) => {
        const vals = [min, max].concat(include()).filter((v) => v !== null && isFinite(v));
        if (!vals.length) return [0, 1];
        let lo = Math.min(...vals), hi = Math.max(...vals);
        if (spec.zeroBased !== false && lo >= 0) lo = 0;
        if (hi === lo) hi = lo + (Math.abs(lo) || 1);
        const pad = (hi - lo) * 0.08;
        return [lo === 0 ? 0 : lo - pad, hi + pad];
      };
      // From the data itself: for a single point uPlot pre-widens a time axis by 1000 days; give it a minute.
      const xPad = spec.xTime ? 60 : 1;
      const xRange = (u) => {
        const xs = u.data[0] || [];
        if (!xs.length) return [0, 1];
        const lo = xs[0], hi = xs[xs.length - 1];
        return hi - lo < xPad ? [lo - xPad / 2, hi + xPad / 2] : [lo, hi];
      };
      const scales = { x: { time: !!spec.xTime, range: xRange }, y: { range: yRange } };
      if (hasY2) scales.y2 = { range: (u, min, max) => [0, Math.max(max || 1, 1e-9) * 1.08] };
      const axes = [
        { label: spec.xLabel || (spec.xTime ? "" : "step"), stroke: "#333", grid: { stroke: "#e6e6e6" } },
        { label: spec.yLabel || "", stroke: "#333", grid: { stroke: "#e6e6e6" }, size: 56, values: tickLabels },
      ];
      if (hasY2) axes.push({ scale: "y2", side: 1, label: spec.y2Label || "", stroke: "#333", grid: { show: false }, size: 56, values: tickLabels });
      const series = [{ label: spec.xTime ? "time" : "step" }].concat(spec.series.map((s) => ({
        label: s.label, stroke: s.color, width: 2, dash: s.dash, scale: s.scale || "y", spanGaps: true,
        points: { show: (u, si) => u.data[0].length < 40, size: 5 }, value: (u, v) => Excb.fmtNum(v),
      })));
      return {
        width: chartWidth(this.parts.plot), height: spec.height || 200, scales, axes, series,
        legend: { show: true, live: true }, cursor: { drag: { x: true, y: false } },
        hooks: { draw: [refLinesHook(() => this._refs())] },
      };
    }

    /** Replace the rows of one source (default "main"). */
    setRows(rows, source) { this.sources.set(source || "main", new Map()); this.addRows(rows, source); }

    /** Add rows to a source; a row with an x already present replaces it (SSE replays are harmless). */
    addRows(rows, source) {
      const name = source || "main";
      if (!this.sources.has(name)) this.sources.set(name, new Map());
      const map = this.sources.get(name);
      const xKey = this.spec.xKey || "step";
      for (const r of rows) if (r && typeof r[xKey] === "number") map.set(r[xKey], r);
      this._schedule();
    }

    _schedule() {
      if (this.pending) return;
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.redraw(); });
    }

    _value(s, row) {
      if (!row) return null;
      const v = s.value ? s.value(row) : row[s.key];
      return typeof v === "number" && isFinite(v) ? v : null;
    }

    /** Rebuild the aligned data arrays (x = union over sources) and update the plot and data attributes. */
    redraw() {
      const xsSet = new Set();
      const drawn = new Map();
      for (const s of this.spec.series) {
        const src = this.sources.get(s.source || "main");
        if (!src) continue;
        for (const [x, row] of src) if (this._value(s, row) !== null) { xsSet.add(x); drawn.set(s.source || "main", (drawn.get(s.source || "main") || new Set()).add(x)); }
      }
      const xs = Array.from(xsSet).sort((a, b) => a - b);
      const data = [xs].concat(this.spec.series.map((s) => {
        const src = this.sources.get(s.source || "main");
        return xs.map((x) => this._value(s, src && src.get(x)));
      }));
      this.lastData = data;
      this.container.setAttribute("data-points", String(xs.length));
      for (const [name, set] of drawn) this.container.setAttribute("data-points-" + name, String(set.size));
      if (xs.length) this.container.setAttribute("data-last-x", String(xs[xs.length - 1]));
      this.parts.empty.hidden = xs.length > 0;
      this.parts.plot.hidden = xs.length === 0;
      if (!xs.length) return;
      if (!this.u) this.u = new uPlot(this._options(), data, this.parts.plot);
      else this.u.setData(data);
      if (this.spec.captionFn) this.parts.caption.textContent = this.spec.captionFn(xs, data);
    }
  }

  /** Label only whole decades on the log axis (the minor ticks stay as grid lines). */
  function decadeLabel(t) {
    if (t === null || !(t > 0)) return "";
    const e = Math.log10(t);
    if (Math.abs(e - Math.round(e)) > 1e-9) return "";
    return t >= 1 ? String(Math.round(t)) : String(+t.toPrecision(1));
  }

  /** Log-scale sorted relative cluster sizes (the paper's Figure 5): x = rank fraction, y = K*s. */
  class CurveChart {
    /** spec: {id, title, help, curves: [{id, label, color, dash, markEmpty}], height, emptyText} */
    constructor(container, spec) {
      this.container = container;
      this.spec = spec;
      this.curves = new Map();
      this.parts = frame(container, Object.assign({ emptyText: "No cluster-size snapshot yet." }, spec));
      container.excbChart = this;
      this.u = null;
      container.setAttribute("data-curve", "size");
      new ResizeObserver(() => { if (this.u) this.u.setSize({ width: chartWidth(this.parts.plot), height: spec.height || 280 }); })
        .observe(this.parts.plot);
    }

    setEmptyText(text) { this.parts.empty.textContent = text; }

    /** Set one curve ({step, rank, relative_size}) by id; null removes it. */
    setCurve(id, curve) {
      if (curve && Array.isArray(curve.rank) && Array.isArray(curve.relative_size) && curve.rank.length) this.curves.set(id, curve);
      else this.curves.delete(id);
      this.redraw();
    }

    _options(specCurves) {
      const series = [{ label: "rank" }];
      for (const c of specCurves) {
        series.push({ label: c.label, stroke: c.color, width: 2, dash: c.dash, spanGaps: true, points: { show: false },
                      value: (u, v) => (v === null ? "\u2013" : v <= CURVE_FLOOR ? "empty" : Excb.fmtNum(v)) });
        if (c.markEmpty) {
          series.push({ label: c.label + ": empty clusters", stroke: PALETTE.vermillion, fill: PALETTE.vermillion, width: 0,
                        paths: () => null, points: { show: true, size: 9, space: 0, stroke: PALETTE.vermillion, fill: c.color },
                        value: (u, v) => (v === null ? "\u2013" : "empty") });
        }
      }
      const dpr = window.devicePixelRatio || 1;
      const emptyBand = (u) => {
        const top = u.valToPos(Excb.EMPTY_RELATIVE_SIZE, "y", true), bottom = u.bbox.top + u.bbox.height;
        const ctx = u.ctx;
        ctx.save();
        ctx.fillStyle = "rgba(213, 94, 0, 0.08)";
        ctx.fillRect(u.bbox.left, top, u.bbox.width, bottom - top);
        ctx.fillStyle = "#7a2e00";
        ctx.textAlign = "left";
        ctx.textBaseline = "alphabetic";
        ctx.font = Math.round(11 * dpr) + "px system-ui, sans-serif";
        ctx.fillText("empty (K\u00b7s < " + Excb.EMPTY_RELATIVE_SIZE + ")", u.bbox.left + 4 * dpr, bottom - 4 * dpr);
        ctx.restore();
      };
      return {
        width: chartWidth(this.parts.plot), height: this.spec.height || 280,
        scales: { x: { time: false, range: [0, 1] }, y: { distr: 3, log: 10, range: (u, min, max) => [CURVE_AXIS_MIN, Math.pow(10, Math.ceil(Math.log10(Math.max(10, (max || 1) * 1.2))))] } },
        axes: [
          { label: "cluster rank (fraction of K, largest first)", stroke: "#333", grid: { stroke: "#e6e6e6" } },
          { label: "relative size K\u00b7s (log)", stroke: "#333", grid: { stroke: "#e6e6e6" }, size: 60,
            values: (u, ticks) => ticks.map((t) => decadeLabel(t)) },
        ],
        series, legend: { show: true, live: true },
        hooks: { drawClear: [emptyBand], draw: [refLinesHook(() => [{ value: 1, label: "uniform (K\u00b7s = 1)", color: PALETTE.black }])] },
      };
    }

    redraw() {
      const specCurves = this.spec.curves.filter((c) => this.curves.has(c.id));
      const xsSet = new Set();
      for (const c of specCurves) for (const r of this.curves.get(c.id).rank) xsSet.add(r);
      const xs = Array.from(xsSet).sort((a, b) => a - b);
      const data = [xs];
      let emptyTotal = 0;
      const captions = [];
      for (const c of specCurves) {
        const curve = this.curves.get(c.id);
        const byRank = new Map(curve.rank.map((r, i) => [r, curve.relative_size[i]]));
        const ys = xs.map((x) => (byRank.has(x) ? Math.max(byRank.get(x), CURVE_FLOOR) : null));
        data.push(ys);
        const empties = curve.relative_size.filter((v) => v < Excb.EMPTY_RELATIVE_SIZE).length;
        if (c.markEmpty) {
          data.push(xs.map((x) => (byRank.has(x) && byRank.get(x) < Excb.EMPTY_RELATIVE_SIZE ? CURVE_FLOOR : null)));
          emptyTotal += empties;
        }
        captions.push(c.label + ": step " + curve.step + ", " + curve.relative_size.length + " points, max K\u00b7s " +
          Excb.fmtNum(Math.max(...curve.relative_size)) + ", " + empties + " empty");
      }
      const main = specCurves.length ? this.curves.get(specCurves[0].id) : null;
      this.container.setAttribute("data-points", String(main ? main.rank.length : 0));
      this.container.setAttribute("data-curves", String(specCurves.length));
      this.container.setAttribute("data-empty", String(emptyTotal));
      if (main) this.container.setAttribute("data-step", String(main.step));
      this.parts.empty.hidden = specCurves.length > 0;
      this.parts.plot.hidden = specCurves.length === 0;
      this.parts.caption.textContent = captions.join(" \u00b7 ");
      if (!specCurves.length) return;
      const key = specCurves.map((c) => c.id).join("|");
      if (this.u && this.key !== key) { this.u.destroy(); this.u = null; }
      if (!this.u) { this.u = new uPlot(this._options(specCurves), data, this.parts.plot); this.key = key; }
      else this.u.setData(data);
    }
  }

  Excb.TimeChart = TimeChart;
  Excb.CurveChart = CurveChart;
  Excb.CURVE_FLOOR = CURVE_FLOOR;
})(window.Excb);
