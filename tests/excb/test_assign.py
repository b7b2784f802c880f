"""excb.inference.assign: one assignment for the service and `excb embed`, bit-identical to the training operator."""

from __future__ import annotations

import numpy as np
import torch

from excb.inference.assign import Assigner
from excb.method.balancing import balance


def test_balanced_scores_are_the_training_operator_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    for k in (32, 1024):
        s = torch.softmax(torch.randn(k, generator=g) * 2, 0)
        s[3] = 0.0  # an empty cluster
        z = torch.rand(64, k, generator=g) * 2 - 1
        want = balance(z, s, mode="paper").numpy()
        got = Assigner(s.numpy()).balanced(z.numpy())
        assert got.dtype == np.float32 and np.array_equal(got, want)


def test_assignment_fields() -> None:
    rng = np.random.default_rng(1)
    sizes = rng.dirichlet(np.ones(16)).astype(np.float32)
    emb = rng.standard_normal((5, 8)).astype(np.float32)
    sims = rng.uniform(-1, 1, (5, 16)).astype(np.float32)
    a = Assigner(sizes)(emb, sims, top_k=3)
    bal = balance(torch.from_numpy(sims), torch.from_numpy(sizes), mode="paper").numpy()
    assert np.array_equal(a.cluster, sims.argmax(1)) and np.array_equal(a.balanced_cluster, bal.argmax(1))
    assert np.array_equal(a.similarity, sims.max(1)) and np.array_equal(a.balanced_score, bal.max(1))
    assert np.array_equal(a.balanced_similarity, sims[np.arange(5), bal.argmax(1)])
    assert np.array_equal(a.top_ids, np.argsort(-sims, 1)[:, :3])
    assert np.allclose(np.linalg.norm(a.embeddings, axis=1), 1)
    raw = Assigner(sizes)(emb, sims, normalize=False)
    assert raw.top_ids is None and np.array_equal(raw.embeddings, emb) and len(raw) == 5
