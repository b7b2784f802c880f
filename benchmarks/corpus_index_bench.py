"""The corpus search index (services/corpus/index.py) at corpus scale: exact vs IVF-Flat at 1M vectors.

What it does, end to end through the service's own code:

1. writes a synthetic corpus (``--n`` L2-normalised ``--dim``-d vectors around ``--centres`` fixed centres, as
   benchmarks/index_bench.py draws them, plus ``--dups`` planted near-duplicates: a copy of an earlier row with
   a little noise, cosine ~0.99) as real Parquet parts through ``services.corpus.parts``;
2. builds the index with ``build_corpus_index`` in a child process (its time and peak memory), which above
   50,000 vectors is IVF-Flat (nlist ~ sqrt(N), trained on 64 points per list);
3. exact ground truth for ``--queries`` held-out vectors (a batched faiss IndexFlatIP scan), and the exact index's
   own one-query-per-call latency over ``--exact-queries`` of them;
4. loads the index as the service does (``CorpusIndex``) and, per ``--nprobe`` value, one query per call:
   p50 / p99 latency and recall@10 against exact;
5. the near-duplicate pass (``services.corpus.curate.near_duplicates``, threshold 0.95) over the whole corpus:
   its time, how many planted pairs it put in one group, and how many groups hold no planted pair.

    OMP_NUM_THREADS=2 python benchmarks/corpus_index_bench.py [--n 1000000] [--dim 384] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

K = 10
CHUNK = 50_000


SUBSPACE = 0  # > 0: the centres lie in a random subspace of this dimension (set from --subspace)


def mixture(n: int, dim: int, centres: int, seed: int, noise: float) -> np.ndarray:
    """n unit vectors around ``centres`` fixed centres; with SUBSPACE the centres span only that many dimensions,
    so clusters overlap and neighbours are not one cluster's members (harder for an IVF index than orthogonal
    centres, where every list is one cluster)."""
    g = np.random.default_rng(12345)
    if SUBSPACE:
        c = (g.standard_normal((centres, SUBSPACE)) @ g.standard_normal((SUBSPACE, dim)) / np.sqrt(SUBSPACE))
        c = c.astype(np.float32)
    else:
        c = g.standard_normal((centres, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_corpus(root: Path, n: int, dim: int, centres: int, noise: float, dups: int) -> np.ndarray:
    """The parts and manifest of a synthetic corpus; returns the planted pairs [dups, 2] (original, copy rows)."""
    from services.corpus.parts import part_name, part_table, write_json, write_part

    rng = np.random.default_rng(7)
    originals = np.sort(rng.choice(n - dups, dups, replace=False))
    pairs = np.stack([originals, np.arange(n - dups, n)], 1)
    chunks = []
    for index, start in enumerate(range(0, n, CHUNK)):
        stop = min(n, start + CHUNK)
        x = mixture(stop - start, dim, centres, seed=1000 + index, noise=noise)
        x_rows = np.arange(start, stop)
        copy_rows = pairs[(pairs[:, 1] >= start) & (pairs[:, 1] < stop)]
        if len(copy_rows):
            src = _rows_of(copy_rows[:, 0], n, dim, centres, noise)
            jitter = 0.1 * np.random.default_rng(index).standard_normal(src.shape).astype(np.float32) / np.sqrt(dim)
            y = src + jitter
            x[copy_rows[:, 1] - start] = y / np.linalg.norm(y, axis=1, keepdims=True)
        m = len(x_rows)
        table = part_table(dim, [f"/data/img/{r:08d}.jpg" for r in x_rows], x, np.zeros(m, np.int32),
                           np.zeros(m, np.int32), np.ones(m, np.float32), [None] * m)
        write_part(root, index, table)
        chunks.append({"index": index, "part": part_name(index), "items": m, "errors": 0, "status": "done"})
    write_json(root / "manifest.json", {"job_id": "bench", "model_id": "synthetic", "owner": None,
                                        "source": "synthetic", "embed_dim": dim, "num_clusters": 1,
                                        "chunks": chunks, "status": "succeeded", "created": time.time()})
    return pairs


def _rows_of(rows: np.ndarray, n: int, dim: int, centres: int, noise: float) -> np.ndarray:
    """The vectors of corpus rows ``rows`` (regenerated from their part's seed: rows are not kept in memory)."""
    out = np.empty((len(rows), dim), np.float32)
    for index in np.unique(rows // CHUNK):
        sel = rows // CHUNK == index
        size = min(CHUNK, n - int(index) * CHUNK)
        part = mixture(size, dim, centres, seed=1000 + int(index), noise=noise)
        out[sel] = part[rows[sel] - index * CHUNK]
    return out


def build_child(root: Path) -> dict[str, Any]:
    """Build in a child process: its own wall time and peak RSS."""
    code = ("import json,resource,sys,time; from services.corpus.index import build_corpus_index;"
            "t=time.perf_counter(); m=build_corpus_index(sys.argv[1]); m['wall_s']=round(time.perf_counter()-t,2);"
            "m['peak_rss_mb']=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024);"
            "m.pop('parts'); print(json.dumps(m))")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def latencies(search: Any, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    for q in queries[:10]:
        search(q[None])
    found, lat = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(search(q[None]))
        lat.append(time.perf_counter() - t)
    return np.stack(found), lat


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def ms(lat: list[float], q: float) -> float:
    return round(1000 * float(np.percentile(lat, q)), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.35)
    ap.add_argument("--subspace", type=int, default=0, help="centres in a random subspace of this dimension")
    ap.add_argument("--dups", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--exact-queries", type=int, default=200)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed at the end)")
    ap.add_argument("--skip-dedup", action="store_true")
    ap.add_argument("--hnsw", action="store_true", help="also build faiss HNSW (M=32, efConstruction=80, efSearch=128, "
                                                       "the sample index's settings) over the same vectors")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    global SUBSPACE
    SUBSPACE = args.subspace
    import faiss

    from services.corpus.curate import near_duplicates
    from services.corpus.index import CorpusIndex, current_version

    work = args.dir or Path(tempfile.mkdtemp(prefix="corpus-bench-"))
    root = work / "corpus"
    shutil.rmtree(root, ignore_errors=True)
    report: dict[str, Any] = {"n": args.n, "dim": args.dim, "centres": args.centres, "noise": args.noise,
                              "subspace": args.subspace,
                              "planted": args.dups, "faiss": faiss.__version__,
                              "omp_threads": faiss.omp_get_max_threads(),
                              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
                              "load_before": os.getloadavg()}
    t = time.perf_counter()
    pairs = write_corpus(root, args.n, args.dim, args.centres, args.noise, args.dups)
    report["write_parts_s"] = round(time.perf_counter() - t, 1)
    report["parts_mb"] = round(sum(p.stat().st_size for p in (root / "parts").iterdir()) / 1e6)
    print(json.dumps({"written": report}), flush=True)

    report["build"] = build_child(root)
    version = current_version(root)
    report["index_file_mb"] = round((root / "index" / str(version) / "vectors.faiss").stat().st_size / 1e6)
    print(json.dumps({"build": report["build"], "file_mb": report["index_file_mb"]}), flush=True)

    queries = mixture(args.queries, args.dim, args.centres, seed=999_999, noise=args.noise)
    t = time.perf_counter()
    idx = CorpusIndex(root, str(version))
    report["load_s"] = round(time.perf_counter() - t, 2)
    vectors = idx.vectors(np.arange(idx.count))
    flat = faiss.IndexFlatIP(args.dim)
    t = time.perf_counter()
    flat.add(vectors)
    report["exact_build_s"] = round(time.perf_counter() - t, 2)
    del vectors
    t = time.perf_counter()
    truth = flat.search(queries, K)[1]
    report["exact_batch_s_per_1000"] = round((time.perf_counter() - t) * 1000 / len(queries), 2)
    _, lat = latencies(lambda q: flat.search(q, K)[1][0], queries[:args.exact_queries])
    report["exact"] = {"p50_ms": ms(lat, 50), "p99_ms": ms(lat, 99), "recall_at_10": 1.0,
                       "memory_mb": round(args.n * args.dim * 4 / 1e6)}
    print(json.dumps({"exact": report["exact"]}), flush=True)
    flat.reset()  # its 1.5 GB at 1M
    rows = []
    for nprobe in args.nprobe:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        found, lat = latencies(lambda q, p=params: idx.faiss.search(q, K, params=p)[1][0], queries)
        rows.append({"nprobe": nprobe, "p50_ms": ms(lat, 50), "p99_ms": ms(lat, 99),
                     "recall_at_10": round(recall(found, truth), 4)})
        print(json.dumps(rows[-1]), flush=True)
    report["ivf"] = rows
    if args.hnsw:
        hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 80
        t = time.perf_counter()
        for start in range(0, idx.count, CHUNK):
            hnsw.add(idx.vectors(np.arange(start, min(idx.count, start + CHUNK))))
        build_s = time.perf_counter() - t
        hnsw.hnsw.efSearch = 128
        found, lat = latencies(lambda q: hnsw.search(q, K)[1][0], queries)
        report["hnsw"] = {"build_s": round(build_s, 1), "p50_ms": ms(lat, 50), "p99_ms": ms(lat, 99),
                          "recall_at_10": round(recall(found, truth), 4)}
        print(json.dumps({"hnsw": report["hnsw"]}), flush=True)
        hnsw.reset()
    if not args.skip_dedup:
        t = time.perf_counter()
        groups = near_duplicates(idx, args.threshold)
        took = time.perf_counter() - t
        member = {}
        for g, grp in enumerate(groups):
            for r in grp.rows:
                member[int(r)] = g
        found_pairs = sum(member.get(int(a), -1) == member.get(int(b), -2) for a, b in pairs)
        planted_rows = set(pairs.ravel().tolist())
        false_groups = sum(not (set(g.rows.tolist()) & planted_rows) for g in groups)
        report["dedup"] = {"threshold": args.threshold, "seconds": round(took, 1), "groups": len(groups),
                           "planted_pairs_found": int(found_pairs), "groups_without_planted": int(false_groups),
                           "largest_group": max((len(g.rows) for g in groups), default=0)}
        print(json.dumps({"dedup": report["dedup"]}), flush=True)
    report["peak_rss_mb_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
