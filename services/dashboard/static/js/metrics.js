/* Which training signals get a chart, with the reading from method.md §7 as the help text.
 * Keys are those of excb/training/trainer.py `_step_row` (balance stats of the size estimate carry the prefix s_). */
"use strict";

(function (Excb) {
  const P = Excb.PALETTE;

  /** Chart definitions; `k` is the job's number of clusters K (null when unknown). */
  function metricCharts(k) {
    return [
      { id: "loss", title: "Loss", help: "Cross-entropy between balanced teacher targets and the student; should go down.",
        series: [{ key: "loss", label: "loss", color: P.blue }], zeroBased: false },
      { id: "lr", title: "Learning rate", help: "Schedule value of the backbone group (warm-up, then cosine).",
        series: [{ key: "lr", label: "lr", color: P.blue }] },
      { id: "changed_labels", title: "Changed labels",
        help: "Share of teacher rows whose argmax the balancer moved. Large early, then low but not zero; spikes revive near-dead clusters.",
        series: [{ key: "changed_labels", label: "changed labels", color: P.vermillion }] },
      { id: "confidence", title: "Teacher and student confidence",
        help: "Mean max probability. Near 1/K means uniform or collapsed-uniform targets; the student tracks the teacher from below.",
        series: [{ key: "confidence_tr", label: "teacher", color: P.blue }, { key: "confidence_st", label: "student", color: P.orange, dash: [6, 3] }],
        refs: k ? [{ value: 1 / k, label: "1/K", color: P.grey }] : [] },
      { id: "unique_labels", title: "Unique labels per batch",
        help: "Distinct argmax labels / batch size. Collapse shows as a drop towards 0 (teacher in (0,2], student in (0,16]).",
        series: [{ key: "unique_labels_tr", label: "teacher", color: P.blue },
                 { key: "unique_labels_st", label: "student (right axis)", color: P.orange, dash: [6, 3], scale: "y2" }],
        yLabel: "teacher", y2Label: "student" },
      { id: "agreement", title: "Two-view agreement",
        help: "Share of images whose two global views get the same teacher label (rises with quality; 1.0 with few unique labels means collapse), and student\u2013teacher accuracy.",
        series: [{ key: "label_agreement", label: "view agreement", color: P.green }, { key: "acc", label: "student acc", color: P.purple, dash: [6, 3] }],
        include: () => [1] },
      { id: "llb_lhb", title: "llb_min / lhb_min",
        help: "llb_min: smallest relative size (near 0 = a dead cluster). lhb_min: 1 / largest relative size (small = one cluster far over-sized, an early sign of collapse). 1 = uniform.",
        series: [{ key: "llb_min", label: "llb_min", color: P.sky }, { key: "lhb_min", label: "lhb_min", color: P.vermillion, dash: [6, 3] }],
        include: () => [1], refs: [{ value: Excb.THRESHOLDS.lhbMin.watch, label: "lhb watch", color: P.grey }] },
      { id: "empty_fraction", title: "Empty-cluster fraction",
        help: "Share of clusters whose size estimate is below K\u00b7s = 0.01 (\u2248 0 when balanced), and share below 0.1.",
        series: [{ key: "s_empty_fraction", label: "empty (K\u00b7s<0.01)", color: P.vermillion }, { key: "s_below_0.1_fraction", label: "K\u00b7s<0.1", color: P.orange, dash: [6, 3] }],
        refs: [{ value: Excb.THRESHOLDS.empty.watch, label: "watch", color: P.grey }] },
      { id: "effective_clusters", title: "Effective clusters",
        help: "exp(entropy) of the size estimate: K when perfectly balanced, 1 when everything is one cluster.",
        series: [{ key: "s_effective_clusters", label: "effective clusters", color: P.green }],
        refs: k ? [{ value: k, label: "K = " + k, color: P.black }, { value: k * Excb.THRESHOLDS.effRatio.watch, label: "watch", color: P.grey }] : [] },
      { id: "entropy", title: "Entropy of cluster sizes",
        help: "Entropy of the size estimate in nats; log K is perfectly balanced.",
        series: [{ key: "s_entropy", label: "entropy", color: P.blue }],
        refs: k ? [{ value: Math.log(k), label: "log K", color: P.black }] : [] },
    ];
  }

  /** The few signals overlaid on the compare page (normalised by K so runs with different K compare). */
  function compareCharts() {
    const norm = (row) => (typeof row.s_normalized_entropy === "number" ? row.s_normalized_entropy : null);
    return [
      { id: "cmp_loss", title: "Loss", key: "loss", zeroBased: false },
      { id: "cmp_norm_entropy", title: "Normalised entropy (1 = balanced)", value: norm, include: () => [1] },
      { id: "cmp_empty", title: "Empty-cluster fraction", key: "s_empty_fraction" },
      { id: "cmp_lhb", title: "lhb_min (1 / largest K\u00b7s)", key: "lhb_min", include: () => [1] },
      { id: "cmp_changed", title: "Changed labels", key: "changed_labels" },
      { id: "cmp_unique", title: "Unique teacher labels per batch", key: "unique_labels_tr" },
    ];
  }

  Excb.metricCharts = metricCharts;
  Excb.compareCharts = compareCharts;
})(window.Excb);
