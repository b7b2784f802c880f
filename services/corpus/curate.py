"""Curation of an embedded corpus from the clusters ExCB balances: near-duplicate groups and balanced subsets.

Both read a loaded :class:`services.corpus.index.CorpusIndex` (its vectors and the corpus's columns), never an
N x N similarity matrix:

- :func:`near_duplicates`: the pairs with cosine >= ``threshold`` joined by union-find. Exact index (small
  corpora, up to :data:`DEDUP_EXACT_MAX`): every image's ``k`` nearest through the index, a query batch at a time.
  Above it (an IVF index, or a throwaway one over an exact index's vectors): the images of each inverted list
  against each other, a block at a time; pairs split across two lists are missed (2.5% of planted pairs at 1M,
  1% at 50k: benchmarks/RESULTS.md). At most ``k`` pairs per image rather than
  a ``range_search``: a range search's answer is unbounded (m copies of one image give m^2 pairs), while k per
  image bound memory and still connect a group of any size (each copy links to others of it).
- :func:`balanced_subset`: N images spread evenly over the balanced clusters (water-filling: a cluster smaller
  than its share gives all it has and the rest is spread over the others), and within each cluster either the
  most typical (nearest the cluster's mean embedding) or the most diverse (farthest-point sampling, from the
  most typical one).

A subset is written as a ``list:`` file (``excb.data.datasets``: one path per line, ``#`` comments), which
``excb train data=list:FILE`` and labelling tools read as is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from excb.fileio import atomic_write
from services.corpus.index import TRAIN_PER_LIST, CorpusIndex, nlist_for

DEFAULT_THRESHOLD = 0.95
DEFAULT_NEIGHBOURS = 16
QUERY_BATCH = 4096
BLOCK_FLOATS = 1 << 24  # similarities per matrix product in the IVF pass (64 MB)
DEDUP_EXACT_MAX = 10_000  # above this many vectors an exact index is deduplicated through a throwaway IVF
MAX_SAMPLE = 20
Strategy = Literal["typical", "diverse"]


class _UnionFind:
    """Components over n items in two int arrays (no Python object per image)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = int(parent[root])
        while parent[x] != root:  # path compression
            parent[x], x = root, int(parent[x])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the lowest id is the root: groups come out in corpus order

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


@dataclass
class DuplicateGroup:
    rows: np.ndarray     # corpus rows, ascending
    min_score: float     # lowest cosine of the pairs that joined the group (transitive groups can drift)
    max_score: float


Pairs = Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (faiss ids a, faiss ids b, cosine), a != b


def _capped(sims: np.ndarray, threshold: float, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of the entries >= threshold, at most ``neighbours`` per row (its highest)."""
    hit = sims >= threshold
    if hit.sum(1).max(initial=0) > neighbours:
        top = np.argpartition(-sims, neighbours - 1, axis=1)[:, :neighbours]
        keep = np.zeros_like(hit)
        np.put_along_axis(keep, top, True, axis=1)
        hit &= keep
    rows, cols = np.nonzero(hit)
    return rows, cols


def _knn_pairs(idx: CorpusIndex, threshold: float, neighbours: int, batch: int) -> Pairs:
    """Exact index: each image's ``neighbours`` nearest through the index, a query batch at a time (BLAS)."""
    n = idx.count
    k = min(neighbours + 1, n)  # + the image itself
    for start in range(0, n, batch):
        ids = np.arange(start, min(n, start + batch), dtype=np.int64)
        scores, found = idx.faiss.search(idx.vectors(ids), k)
        qi, col = np.nonzero((scores >= threshold) & (found >= 0) & (found != ids[:, None]))
        yield ids[qi], found[qi, col], scores[qi, col]


def _dedup_ivf(idx: CorpusIndex, seed: int = 0) -> Any:
    """A throwaway IVF-Flat over an exact index's vectors (same ids), for the per-list pass on mid-size corpora."""
    import faiss

    n, d = idx.count, int(idx.faiss.d)
    nlist = nlist_for(n)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(n, nlist * TRAIN_PER_LIST), replace=False))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(idx.vectors(pick))
    for start in range(0, n, QUERY_BATCH * 16):
        ivf.add(idx.vectors(np.arange(start, min(n, start + QUERY_BATCH * 16))))
    return ivf


def _list_pairs(index: Any, threshold: float, neighbours: int) -> Pairs:
    """IVF index: the images of each inverted list against each other (one matrix product per block of
    ``BLOCK_FLOATS``). A near-duplicate almost always shares its original's nearest centroid, so this finds
    the pairs a k-NN pass would, at a matrix product's speed instead of a probe per image (at 1M images: tens
    of seconds instead of a quarter of an hour); pairs split across two lists are missed (benchmarks/RESULTS.md
    counts planted pairs)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    lists, d = ivf.invlists, ivf.d
    assert lists is not None
    for ell in range(ivf.nlist):
        size = int(lists.list_size(ell))
        if size < 2:
            continue
        ids = faiss.rev_swig_ptr(lists.get_ids(ell), size).copy()
        vecs = faiss.rev_swig_ptr(lists.get_codes(ell), size * ivf.code_size).copy().view(np.float32).reshape(size, d)
        step = max(1, BLOCK_FLOATS // size)
        for start in range(0, size, step):
            sims = vecs[start:start + step] @ vecs.T
            np.fill_diagonal(sims[:, start:start + step], -np.inf)  # not an image with itself
            qi, col = _capped(sims, threshold, neighbours)
            yield ids[start + qi], ids[col], sims[qi, col]


def near_duplicates(idx: CorpusIndex, threshold: float = DEFAULT_THRESHOLD, neighbours: int = DEFAULT_NEIGHBOURS,
                    batch: int = QUERY_BATCH) -> list[DuplicateGroup]:
    """Groups of two or more images whose embeddings have cosine >= ``threshold`` (transitively), largest first."""
    import faiss

    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: a cosine in [-1, 1], got {threshold}")
    if neighbours < 1:
        raise ValueError(f"neighbours: at least 1, got {neighbours}")
    n = idx.count
    uf = _UnionFind(n)
    lo = np.full(n, np.inf, dtype=np.float32)
    hi = np.full(n, -np.inf, dtype=np.float32)
    if isinstance(idx.faiss, faiss.IndexIVF):
        pairs = _list_pairs(idx.faiss, threshold, neighbours)
    elif n > DEDUP_EXACT_MAX:  # an exact pass is O(N^2): 45 s at 50k x 384-d, the per-list pass 3 s
        pairs = _list_pairs(_dedup_ivf(idx), threshold, neighbours)
    else:
        pairs = _knn_pairs(idx, threshold, neighbours, batch)
    for a, b, s in pairs:
        for x, y in zip(a.tolist(), b.tolist()):
            uf.union(x, y)
        for ends in (a, b):
            np.minimum.at(lo, ends, s)
            np.maximum.at(hi, ends, s)
    roots = uf.roots()
    grouped = np.flatnonzero(np.bincount(roots, minlength=n)[roots] >= 2)
    order = grouped[np.argsort(roots[grouped], kind="stable")]
    out = [DuplicateGroup(rows=np.sort(idx.rows[ids]), min_score=float(lo[ids].min()), max_score=float(hi[ids].max()))
           for ids in np.split(order, np.flatnonzero(np.diff(roots[order])) + 1) if len(ids)]
    out.sort(key=lambda g: (-len(g.rows), int(g.rows[0])))
    return out


def dedup_report(idx: CorpusIndex, threshold: float = DEFAULT_THRESHOLD, neighbours: int = DEFAULT_NEIGHBOURS,
                 sample: int = 5, limit: int = 100) -> dict[str, Any]:
    """The near-duplicate groups as the API and CLI show them: counts, then the ``limit`` largest groups with a
    sample of ``sample`` paths each (the first is the one to keep: the lowest corpus row)."""
    t0 = time.perf_counter()
    groups = near_duplicates(idx, threshold, neighbours)
    cols = idx.columns
    return {
        "threshold": threshold, "neighbours": neighbours, "indexed": idx.count, "groups": len(groups),
        "images_in_groups": int(sum(len(g.rows) for g in groups)),
        "removable": int(sum(len(g.rows) - 1 for g in groups)),
        "data": [{"count": int(len(g.rows)), "keep": cols.path(int(g.rows[0])),
                  "sample": [{"row": int(r), "path": cols.path(int(r))} for r in g.rows[:sample]],
                  "min_score": round(g.min_score, 6), "max_score": round(g.max_score, 6)} for g in groups[:limit]],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def quotas(sizes: np.ndarray, n: int) -> np.ndarray:
    """Per-cluster counts summing to min(n, sizes.sum()), as even as the sizes allow (water-filling); the
    remainder of an uneven split goes to the largest clusters first."""
    sizes = np.asarray(sizes, dtype=np.int64)
    take = np.zeros_like(sizes)
    left = int(min(n, sizes.sum()))
    open_ = sizes > 0
    while left > 0 and open_.any():
        share = left // int(open_.sum())
        if share == 0:  # fewer left than open clusters: one each, largest remaining capacity first
            room = np.where(open_, sizes - take, -1)
            for c in np.argsort(-room, kind="stable")[:left]:
                take[c] += 1
            break
        add = np.where(open_, np.minimum(share, sizes - take), 0)
        take += add
        left -= int(add.sum())
        open_ = take < sizes
    return take


def farthest_points(vectors: np.ndarray, m: int, first: int) -> np.ndarray:
    """``m`` indices into ``vectors`` (unit rows), each the farthest (lowest max cosine) from those picked."""
    m = min(m, len(vectors))
    picked = [first]
    closest = vectors @ vectors[first]
    for _ in range(m - 1):
        nxt = int(np.argmin(closest))
        picked.append(nxt)
        closest = np.maximum(closest, vectors @ vectors[nxt])
    return np.array(picked, dtype=np.int64)


def balanced_subset(idx: CorpusIndex, n: int, strategy: Strategy = "diverse") -> dict[str, Any]:
    """Corpus rows of ``n`` images spread evenly over the balanced clusters; per cluster its size, quota and rows."""
    if n < 1:
        raise ValueError(f"n: at least 1, got {n}")
    if strategy not in ("typical", "diverse"):
        raise ValueError(f"strategy: typical or diverse, got {strategy!r}")
    cluster = idx.columns.balanced_cluster[idx.rows]  # faiss id order: rows that have a vector
    labels, sizes = np.unique(cluster, return_counts=True)
    take = quotas(sizes, n)
    order = np.argsort(cluster, kind="stable")
    starts = np.searchsorted(cluster[order], labels)
    chosen: list[np.ndarray] = []
    per_cluster = []
    for c, s, size, q in zip(labels, starts, sizes, take):
        if q == 0:
            per_cluster.append({"cluster": int(c), "size": int(size), "taken": 0})
            continue
        ids = order[s:s + size]
        vecs = idx.vectors(ids)
        mean = vecs.mean(0)
        typical = vecs @ (mean / max(float(np.linalg.norm(mean)), 1e-12))
        if strategy == "typical":
            pick = np.argsort(-typical, kind="stable")[:q]
        else:
            pick = farthest_points(vecs, int(q), int(np.argmax(typical)))
        chosen.append(idx.rows[ids[pick]])
        per_cluster.append({"cluster": int(c), "size": int(size), "taken": int(q)})
    rows = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return {"rows": rows, "clusters": per_cluster, "strategy": strategy, "requested": int(n), "count": int(len(rows))}


def write_list(idx: CorpusIndex, rows: np.ndarray, path: Path, header: dict[str, Any]) -> Path:
    """A ``list:`` file of the rows' paths (as the corpus job wrote them: absolute for files), with the subset's
    provenance as ``#`` comment lines."""
    lines = [f"# {k}: {v}" for k, v in header.items()]
    lines += [idx.columns.path(int(r)) for r in rows]
    atomic_write(path, "\n".join(lines) + "\n", mode=0o644)
    return path
