"""Vector index libraries side by side for the image index (services/index): faiss-cpu and usearch.

For each size (default 10k and 100k vectors) and each index (faiss exact IndexFlatIP, faiss HNSW, usearch exact,
usearch HNSW) it measures: build time, single-query latency p50/p99 (one query per call, as a search request
makes), recall@10 against an exact numpy ground truth, file size and load time. One thread everywhere (the
services run with small thread counts on shared CPUs; see README "Vector index" in benchmarks/RESULTS.md).

Data: L2-normalised vectors drawn around 1000 random centres (a mixture, like embeddings of real images, where
clusters exist; uniform random vectors are the worst case for graph indexes and unlike our data); queries are
held-out vectors of the same mixture. Inner product = cosine, as in the service.

    pip install usearch   # the compared library only; faiss-cpu comes with excb[services]
    python benchmarks/index_bench.py [--sizes 10000 100000] [--dim 128] [--queries 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

K = 10
HNSW_M = 32
EF_CONSTRUCTION = 80
EF_SEARCH = 128


def mixture(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    """n unit vectors around ``centres`` fixed centres (always the same ones); ``seed`` draws the points."""
    c = np.random.default_rng(12345).standard_normal((centres, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), 256):
        sims = queries[s:s + 256] @ base.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        out[s:s + 256] = np.take_along_axis(part, order, 1)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


class Candidate:
    """One index kind: build, search one query, save, load."""

    def __init__(self, name: str, build: Callable[[np.ndarray], Any], search: Callable[[Any, np.ndarray], np.ndarray],
                 save: Callable[[Any, str], None] | None, load: Callable[[str], Any] | None) -> None:
        self.name, self.build, self.search, self.save, self.load = name, build, search, save, load


def faiss_candidates() -> list[Candidate]:
    import faiss

    faiss.omp_set_num_threads(1)

    def flat(x: np.ndarray) -> Any:
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        return index

    def hnsw(x: np.ndarray) -> Any:
        index = faiss.IndexHNSWFlat(x.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = EF_CONSTRUCTION
        index.add(x)
        index.hnsw.efSearch = EF_SEARCH
        return index

    def search(index: Any, q: np.ndarray) -> np.ndarray:
        return index.search(q, K)[1][0]

    def load(path: str) -> Any:
        index = faiss.read_index(path)
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = EF_SEARCH
        return index

    ver = faiss.__version__
    return [Candidate(f"faiss {ver} IndexFlatIP (exact)", flat, search, faiss.write_index, load),
            Candidate(f"faiss {ver} IndexHNSWFlat M={HNSW_M}", hnsw, search, faiss.write_index, load)]


def usearch_candidates() -> list[Candidate]:
    import usearch
    from usearch.index import Index, MetricKind
    from usearch.index import search as brute

    def graph(x: np.ndarray) -> Any:
        index = Index(ndim=x.shape[1], metric=MetricKind.IP, dtype="f32", connectivity=HNSW_M,
                      expansion_add=EF_CONSTRUCTION, expansion_search=EF_SEARCH)
        index.add(np.arange(len(x)), x, threads=1)
        return index

    def search(index: Any, q: np.ndarray) -> np.ndarray:
        return index.search(q[0], K, threads=1).keys

    def exact(x: np.ndarray) -> Any:
        return x  # brute force needs no structure: the "index" is the matrix

    def exact_search(x: Any, q: np.ndarray) -> np.ndarray:
        return brute(x, q[0], K, MetricKind.IP, exact=True, threads=1).keys

    def load(path: str) -> Any:
        return Index.restore(path)

    ver = usearch.__version__
    return [Candidate(f"usearch {ver} exact (search exact=True)", exact, exact_search, None, None),
            Candidate(f"usearch {ver} HNSW connectivity={HNSW_M}", graph, search, lambda i, p: i.save(p), load)]


def measure(c: Candidate, base: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    t0 = time.perf_counter()
    index = c.build(base)
    build_s = time.perf_counter() - t0
    for q in queries[:20]:  # warm caches
        c.search(index, q[None])
    lat, found = [], []
    for q in queries:
        t = time.perf_counter()
        ids = c.search(index, q[None])
        lat.append(time.perf_counter() - t)
        found.append(np.asarray(ids, dtype=np.int64))
    row: dict[str, Any] = {"index": c.name, "n": len(base), "build_s": round(build_s, 3),
                           "p50_ms": round(1000 * float(np.percentile(lat, 50)), 3),
                           "p99_ms": round(1000 * float(np.percentile(lat, 99)), 3),
                           "recall_at_10": round(recall(np.stack(found), truth), 4)}
    if c.save is not None and c.load is not None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "index.bin")
            c.save(index, path)
            t = time.perf_counter()
            c.load(path)
            row.update(file_mb=round(os.path.getsize(path) / 1e6, 1), load_s=round(time.perf_counter() - t, 3))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=128, help="128 = the cpu-small preset's embedding size")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    cands = faiss_candidates() + usearch_candidates()
    rows = []
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread; dim {args.dim}, "
          f"{args.queries} single queries, k={K}")
    for n in args.sizes:
        base = mixture(n, args.dim, 1000, seed=0)
        queries = mixture(args.queries, args.dim, 1000, seed=1)  # same centres, points not in the index
        truth = exact_topk(base, queries, K)
        for c in cands:
            row = measure(c, base, queries, truth)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| vectors | index | build s | query p50 ms | query p99 ms | recall@10 | file MB | load s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['index']} | {r['build_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['recall_at_10']} | "
              f"{r.get('file_mb', '-')} | {r.get('load_s', '-')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
