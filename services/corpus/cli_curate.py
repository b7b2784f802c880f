"""``excb corpus index|search|dedup|subset``: the corpus search index and curation, run in this process on a
corpus directory (what ``excb corpus embed --local --out DIR`` writes) or on a job's corpus by id (found under
``--home``'s runs, as ``excb up --home`` keeps them). The same functions answer ``/v1/corpora/{id}/...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from services.corpus.curate import DEFAULT_NEIGHBOURS, DEFAULT_THRESHOLD, balanced_subset, dedup_report, write_list
from services.corpus.index import CorpusIndex, CorpusIndexCache, CorpusIndexNotFound, build_corpus_index
from services.corpus.parts import corpus_dir, read_manifest


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the index and curation verbs to ``excb corpus``."""

    def corpus_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("corpus", metavar="CORPUS", help="a corpus directory (manifest.json + parts/), or a corpus "
                                                        "job id under --home's runs")
        p.add_argument("--home", type=Path, help="state directory, as `excb up --home` (default: EXCB_HOME or "
                                                 "./.excb)")

    i = sub.add_parser("index", help="build (or rebuild) a corpus's search index",
                       description="Exact (IndexFlatIP) up to 50,000 images, IVF-Flat above; written into the "
                                   "corpus (index/), where POST /v1/search with corpus reads it.")
    corpus_arg(i)
    i.set_defaults(func=_cmd_index)
    s = sub.add_parser("search", help="the corpus images nearest to an image file (or to a corpus row)")
    corpus_arg(s)
    s.add_argument("image", nargs="?", help="query image file (embedded with the corpus's model)")
    s.add_argument("--row", type=int, help="query: this corpus row instead of a file")
    s.add_argument("--k", type=int, default=10, help="how many results (default 10)")
    s.add_argument("--models-dir", type=Path, help="where the corpus's model bundle is (default: HOME/models)")
    s.set_defaults(func=_cmd_search)
    d = sub.add_parser("dedup", help="near-duplicate groups (cosine >= --threshold)")
    corpus_arg(d)
    d.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help=f"default {DEFAULT_THRESHOLD}")
    d.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS, help="neighbours looked at per image")
    d.add_argument("--sample", type=int, default=5, help="paths shown per group")
    d.add_argument("--limit", type=int, default=20, help="groups shown, largest first")
    d.add_argument("--json", action="store_true", help="the whole report as JSON")
    d.set_defaults(func=_cmd_dedup)
    b = sub.add_parser("subset", help="N images even across the balanced clusters, as a list: file",
                       description="Spread N images evenly over the corpus's balanced clusters and pick within "
                                   "each the most typical (nearest its mean) or the most diverse (farthest-point); "
                                   "write them as a list: file (`excb train data=list:FILE`).")
    corpus_arg(b)
    b.add_argument("--n", type=int, required=True, help="images in the subset")
    b.add_argument("--strategy", choices=["diverse", "typical"], default="diverse",
                   help="within each cluster: a farthest-point spread (default), or the images nearest its mean")
    b.add_argument("--out", type=Path, required=True, help="the list file to write")
    b.set_defaults(func=_cmd_subset)


def _root(args: argparse.Namespace) -> Path:
    given = Path(args.corpus).expanduser()
    if (given / "manifest.json").is_file():
        return given.resolve()
    from services.settings import Settings

    settings = Settings(home=args.home) if args.home else Settings()
    return corpus_dir(settings, str(args.corpus))


def _load(args: argparse.Namespace, build_up_to: int) -> CorpusIndex:
    return CorpusIndexCache().get(_root(args), build_up_to=build_up_to)


def _fail(verb: str, exc: Exception) -> int:
    print(f"excb corpus {verb}: {exc}", file=sys.stderr)
    return 2


def _cmd_index(args: argparse.Namespace) -> int:
    try:
        meta = build_corpus_index(_root(args))
    except (CorpusIndexNotFound, OSError, ValueError) as exc:
        return _fail("index", exc)
    print(json.dumps({k: meta[k] for k in ("count", "dim", "index_type", "nlist", "nprobe", "seconds")}))
    return 0


def _query(args: argparse.Namespace, idx: CorpusIndex) -> Any:
    import numpy as np

    if args.row is not None:
        fid = idx.faiss_id(args.row)
        if fid < 0:
            raise ValueError(f"row {args.row}: not an embedded row of this corpus")
        return idx.vectors(np.array([fid]))
    from excb.data.decode import load_image
    from excb.inference.onnx_runtime import OrtEmbedder, l2_normalize, load_bundle
    from services.settings import Settings

    manifest = read_manifest(idx.corpus_dir) or {}
    settings = Settings(home=args.home) if args.home else Settings()
    models = args.models_dir or settings.resolved_models_dir
    embedder = OrtEmbedder(load_bundle(Path(models) / str(manifest.get("model_id"))))
    emb, _ = embedder.run(embedder.preprocess(load_image(args.image))[None])
    return l2_normalize(emb)


def _cmd_search(args: argparse.Namespace) -> int:
    if (args.image is None) == (args.row is None):
        print("excb corpus search: give an image file or --row (one of them)", file=sys.stderr)
        return 2
    try:
        idx = _load(args, sys.maxsize)
        scores, rows = idx.search(_query(args, idx), args.k)
    except (CorpusIndexNotFound, OSError, ValueError) as exc:
        return _fail("search", exc)
    for score, row in zip(scores[0], rows[0]):
        if row >= 0:
            print(f"{score:.4f}  {idx.columns.path(int(row))}")
    return 0


def _cmd_dedup(args: argparse.Namespace) -> int:
    try:
        report = dedup_report(_load(args, sys.maxsize), args.threshold, args.neighbours, args.sample, args.limit)
    except (CorpusIndexNotFound, OSError, ValueError) as exc:
        return _fail("dedup", exc)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{report['groups']} groups of near-duplicates (cosine >= {args.threshold}) in {report['indexed']} images; "
          f"{report['removable']} removable (one kept per group)")
    for g in report["data"]:
        print(f"{g['count']:6d}  keep {g['keep']}  (cosine {g['min_score']:.3f}-{g['max_score']:.3f})")
        for s in g["sample"][1:]:
            print(f"        {s['path']}")
    return 0


def _cmd_subset(args: argparse.Namespace) -> int:
    try:
        idx = _load(args, sys.maxsize)
        sub = balanced_subset(idx, args.n, args.strategy)
        write_list(idx, sub["rows"], args.out.expanduser().resolve(),
                   {"excb subset of corpus": str(idx.corpus_dir), "strategy": args.strategy, "requested": args.n,
                    "images": sub["count"]})
    except (CorpusIndexNotFound, OSError, ValueError) as exc:
        return _fail("subset", exc)
    used = [c["taken"] for c in sub["clusters"] if c["taken"]]
    print(json.dumps({"images": sub["count"], "clusters": len(sub["clusters"]), "clusters_used": len(used),
                      "per_cluster": [min(used, default=0), max(used, default=0)], "out": str(args.out)}))
    return 0
